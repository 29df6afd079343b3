"""How good is fold-in? Measured at export time, cross-fitted so that no user is judged by a
map fitted on that same user.

- agreement: for training users folded in from their own training items, the share of
  tokens identical to their exported tokens, per modality and level;
- ranking: NDCG@10 / Recall@10 on the validation split from the folded-in tokens (decoded
  codes, items of the training split excluded), next to the trained users' own tokens and a
  training-popularity ranking.
"""

from __future__ import annotations

import numpy as np

from recbole_dppmg.tokens.faiss_lookup import brute_force_search
from recbole_dppmg.tokens.foldin import fit_foldin, mean_item_vectors

TOPK = 10


def ranking_metrics(scores: np.ndarray, train, valid, users: np.ndarray, k: int = TOPK) -> dict:
    """NDCG@k and Recall@k as RecBole computes them (binary relevance), averaged over users
    with at least one validation item; training items are never ranked."""
    ndcg, recall = [], []
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for row, user in enumerate(users):
        positives = valid[user].indices
        if len(positives) == 0:
            continue
        s = scores[row].copy()
        s[0] = -np.inf
        s[train[user].indices] = -np.inf
        top = np.argpartition(-s, k)[:k]
        top = top[np.argsort(-s[top])]
        hits = np.isin(top, positives)
        ideal = discounts[: min(len(positives), k)].sum()
        ndcg.append((hits * discounts).sum() / ideal)
        recall.append(hits.sum() / len(positives))
    return {f"ndcg@{k}": float(np.mean(ndcg)), f"recall@{k}": float(np.mean(recall)), "users": len(ndcg)}


def evaluate_fold_in(modalities, codebooks, items, user_vectors, user_codes, train, valid, seed: int = 0) -> dict:
    """Cross-fitted (2 folds of users) fold-in agreement and validation ranking quality."""
    n_users = train.shape[0]
    users = np.arange(1, n_users)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(users)) % 2
    folded = {m: np.zeros((n_users, user_vectors[m].shape[1]), dtype=np.float32) for m in modalities}
    for m in modalities:
        for f in (0, 1):
            fit_users, eval_users = users[fold != f], users[fold == f]
            weight, bias = fit_foldin(items[m], train, user_vectors[m], fit_users)
            folded[m][eval_users] = mean_item_vectors(items[m], train, eval_users) @ weight + bias

    agreement = {}
    folded_codes = {}
    for k, m in enumerate(modalities):
        codes = brute_force_search(folded[m][users], codebooks[m])
        folded_codes[m] = codes
        for level in range(codes.shape[1]):
            agreement[f"{m}/L{level}"] = float((codes[:, level] == user_codes[users, k, level]).mean())
        agreement[f"{m}/all_levels"] = float((codes == user_codes[users, k]).all(1).mean())

    def decoded(codes_by_modality):
        return sum(
            sum(codebooks[m][l][codes_by_modality[m][:, l]] for l in range(codebooks[m].shape[0])) @ items[m].T
            for m in modalities
        )

    trained_codes = {m: user_codes[users, k] for k, m in enumerate(modalities)}
    popularity = np.asarray(train.sum(0)).ravel().astype(np.float64)
    return {
        "agreement": agreement,
        "valid_ranking": {
            "fold_in_tokens": ranking_metrics(decoded(folded_codes), train, valid, users),
            "trained_tokens": ranking_metrics(decoded(trained_codes), train, valid, users),
            "popularity": ranking_metrics(np.tile(popularity, (len(users), 1)), train, valid, users),
        },
        "protocol": (
            "2-fold cross-fitted ridge map; fold-in from the user's training items; validation split; training "
            "items excluded"
        ),
    }
