"""Fold-in measured inductively: new users whose interactions the model never saw.

``foldin_quality.evaluate_fold_in`` folds in users with a cross-fitted map, but the item vectors
it folds from were propagated over a graph that held those very users. Here a seeded share of
the users is held out before the model is built:

- ``pick_new_users``: which users (seeded, RecBole internal ids ``1..n_users-1``);
- ``hold_out``: the train and validation dataloaders without any of their interactions, so
  they are absent from the training graph (``DPPMG`` builds it from the train dataset's
  ``inter_matrix``), from the training batches and from early stopping;
- ``evaluate_new_users``: after training, the fold-in map is fitted on the trained users (the
  export's vectors, ``tokens.export.token_vectors``), the new users are folded in from their
  own training items, quantized with the model's codebooks, and ranked on their validation and
  test items next to their folded-in continuous vectors and a training-popularity ranking;
- ``evaluate_own_vectors``: the same users scored by their own (quantized or continuous)
  vectors, for a model that trained on them (the transductive reference).

Ranking follows RecBole's full-ranking protocol: validation items are ranked with the user's
training items excluded, test items with training and validation items excluded.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from recbole.data.utils import create_samplers

from recbole_dppmg.tokens.faiss_lookup import brute_force_search
from recbole_dppmg.tokens.foldin import fit_foldin, mean_item_vectors
from recbole_dppmg.tokens.foldin_quality import ranking_metrics


def pick_new_users(n_users: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random ``fraction`` of the users ``1..n_users-1`` (row 0 is RecBole's padding
    user), sorted; at least one user when ``fraction`` > 0."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    users = np.arange(1, n_users)
    count = int(round(fraction * len(users)))
    if fraction > 0:
        count = min(max(count, 1), len(users) - 1)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(users, size=count, replace=False)).astype(np.int64)


def drop_users(split, users: np.ndarray):
    """A copy of the RecBole dataset ``split`` without any interaction of ``users``."""
    uids = split.inter_feat[split.uid_field].numpy()
    keep = np.flatnonzero(~np.isin(uids, users))
    return split.copy(split.inter_feat[torch.from_numpy(keep)])


def hold_out(config, dataset, loaders: tuple, users: np.ndarray) -> tuple:
    """``(train, valid, test)`` dataloaders of ``data_preparation`` -> the same with ``users``'
    training and validation interactions removed (samplers rebuilt on the reduced splits, as
    ``data_preparation`` builds them); the test loader is returned unchanged."""
    train_data, valid_data, test_data = loaders
    if len(users) == 0:
        return train_data, valid_data, test_data
    train_split = drop_users(train_data._dataset, users)
    valid_split = drop_users(valid_data._dataset, users)
    train_sampler, valid_sampler, _ = create_samplers(config, dataset, [train_split, valid_split, test_data._dataset])
    train_data = type(train_data)(config, train_split, train_sampler, shuffle=train_data.shuffle)
    valid_data = type(valid_data)(config, valid_split, valid_sampler, shuffle=False)
    return train_data, valid_data, test_data


def split_matrix(loader) -> sp.csr_matrix:
    """The users x items CSR matrix of a dataloader's split (1.0 per interaction)."""
    return loader._dataset.inter_matrix(form="csr").astype(np.float32).tocsr()


def score(model, user_vectors: dict[str, np.ndarray], items: dict[str, np.ndarray]) -> np.ndarray:
    """``[rows, n_items]`` scores as the model scores (``score: dot`` or ``cosine``)."""
    device = next(model.parameters()).device
    users = {m: torch.as_tensor(v, dtype=torch.float32, device=device) for m, v in user_vectors.items()}
    item_tensors = {m: torch.as_tensor(v, dtype=torch.float32, device=device) for m, v in items.items()}
    with torch.no_grad():
        return model.score_matrix(users, item_tensors).cpu().numpy()


def decode(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Sum over levels of the codebook rows: ``codes [N, levels]``, ``codebooks [levels, K, dim]``."""
    return sum(codebooks[level][codes[:, level]] for level in range(codes.shape[1]))


def _splits_metrics(scores, users, train, valid, test) -> dict:
    return {
        "valid": ranking_metrics(scores, train, valid, users),
        "test": ranking_metrics(scores, (train + valid).tocsr(), test, users),
    }


def evaluate_new_users(
    model, vectors: dict, new_users: np.ndarray, fit_users: np.ndarray, graph_train, train, valid, test
) -> dict:
    """Validation and test NDCG@10 / Recall@10 of ``new_users`` from fold-in.

    ``vectors``: ``tokens.export.token_vectors(model)``; ``graph_train``: the training matrix
    the model was built on (the map is fitted on ``fit_users``' rows of it, popularity counts
    it); ``train``: the full training split, whose rows of ``new_users`` are the items they
    are folded in from; ``valid`` / ``test``: the splits ranked."""
    modalities = list(vectors["items"])
    continuous, quantized = {}, {}
    for m in modalities:
        weight, bias = fit_foldin(vectors["items"][m], graph_train, vectors["users"][m], fit_users)
        continuous[m] = mean_item_vectors(vectors["items"][m], train, new_users) @ weight + bias
        codes = brute_force_search(np.ascontiguousarray(continuous[m], dtype=np.float32), vectors["codebooks"][m])
        quantized[m] = decode(codes, vectors["codebooks"][m])
    popularity = np.asarray(graph_train.sum(0)).ravel().astype(np.float32)
    return {
        "fold_in_tokens": _splits_metrics(score(model, quantized, vectors["items"]), new_users, train, valid, test),
        "fold_in_continuous": _splits_metrics(
            score(model, continuous, vectors["items"]), new_users, train, valid, test
        ),
        "popularity": _splits_metrics(np.tile(popularity, (len(new_users), 1)), new_users, train, valid, test),
    }


def evaluate_own_vectors(model, users: np.ndarray, train, valid, test) -> dict:
    """Validation and test metrics of ``users`` scored by their own quantized (the tokens) and
    continuous vectors, as the model's evaluation scores them."""
    with torch.no_grad():
        items = {m: v.cpu().numpy() for m, v in model.item_modal_vectors(propagated=True).items()}
        out = {}
        for name, quantized in (("own_tokens", True), ("own_continuous", False)):
            own = {m: v[users].cpu().numpy() for m, v in model.user_modal_vectors(quantized=quantized).items()}
            out[name] = _splits_metrics(score(model, own, items), users, train, valid, test)
    return out
