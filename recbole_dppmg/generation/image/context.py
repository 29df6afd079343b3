"""Real posters as cross-attention context of the poster generator, beside or instead of the tokens.

A UNet trained from scratch on ~1,600 posters learns their marginal distribution and its
cross-attention learns to ignore six token embeddings; it does not ignore posters it is shown
(retrieval-augmented diffusion: Blattmann et al. 2022, KNN-Diffusion). Two ways to choose them:

- ``retrieval``: the user's decoded image-channel tokens score the catalogue's stage-1 image
  item vectors, relative to the average *training* user (so popularity is taken out, as the
  text generator's ``token_items`` prompt does), and the top ``k`` items' posters are the
  context. The tokens still decide what the UNet sees; shuffled tokens retrieve another set.
- ``history``: the user's own top-rated training items' posters, no tokens (the PMG-style
  baseline, trained as its own model).

A training pair's own target poster is never in its context (:func:`without_target`): the
generator would learn to copy it. Each context poster is one cross-attention entry: its latent,
flattened, layer-normalised and projected to ``cross_attention_dim``, plus a learned embedding
of its rank. The posters and the retrieval keys are buffers saved with the weights, so a
checkpoint retrieves on its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from recbole_dppmg.errors import ConfigError

RETRIEVAL_MODALITY = "image"


class PosterContext(nn.Module):
    """``k`` posters of the catalogue ``bank`` as ``[B, k, dim]`` cross-attention entries.

    ``item_ids`` name the bank's rows; ``keys`` ``[N, d]`` / ``center`` ``[d]`` (retrieval only)
    are the items' stage-1 image vectors and the average training user's decoded image vector."""

    def __init__(
        self,
        bank: torch.Tensor,
        item_ids: list[str],
        k: int,
        dim: int,
        keys: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
        retrievable: torch.Tensor | None = None,
    ):
        super().__init__()
        if len(item_ids) != len(bank):
            raise ConfigError(f"{len(item_ids)} context item ids for {len(bank)} posters")
        if k >= len(bank):
            raise ConfigError(f"image.retrieval_k={k} needs more than {k} posters (the catalogue has {len(bank)})")
        self.k, self.item_ids = k, list(item_ids)
        self.row_of = {item: row for row, item in enumerate(self.item_ids)}
        bank = bank.reshape(len(bank), -1)
        self.register_buffer("bank", bank.to(torch.float16))  # the latents' own precision in the cache
        if keys is not None:
            self.register_buffer("keys", keys.float())
            self.register_buffer("center", center.float())
            ok = torch.ones(len(bank), dtype=torch.bool) if retrievable is None else retrievable.bool()
            self.register_buffer("retrievable", ok)
        self.norm = nn.LayerNorm(bank.shape[1])
        self.project = nn.Linear(bank.shape[1], dim)
        with torch.no_grad():  # entries of norm ~1, like the token embeddings (CodebookProjection, target_scale 1)
            nn.init.normal_(self.project.weight, std=1 / math.sqrt(bank.shape[1] * dim))
            self.project.bias.zero_()
        self.rank = nn.Parameter(torch.randn(k, dim) * 0.02)
        self.null = nn.Parameter(torch.randn(k, dim) * 0.02)

    @property
    def retrieves(self) -> bool:
        return hasattr(self, "keys")

    def retrieve(self, user_vectors: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Bank rows ``[B, count]`` (default ``k``) the users' decoded image vectors score highest,
        best first: ``<u - center, key>`` (exact inner product over the catalogue)."""
        scores = (user_vectors.float() - self.center) @ self.keys.T
        scores = scores.masked_fill(~self.retrievable, float("-inf"))
        return scores.topk(count or self.k, dim=1).indices

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, k, dim]`` for bank rows ``[B, k]``; a row of -1 (fewer posters) reads a learned null."""
        rows = rows.to(self.bank.device)
        x = self.project(self.norm(self.bank[rows.clamp_min(0)].float())) + self.rank
        return torch.where((rows < 0)[..., None], self.null.expand_as(x), x)

    def ids(self, rows: torch.Tensor) -> list[list[str]]:
        """The item ids of bank rows (``-1`` left out), for records and contact sheets."""
        return [[self.item_ids[r] for r in row if r >= 0] for row in rows.tolist()]


def check_conditioning(conditioning: str, modalities: list[str]) -> None:
    """Refuse ``retrieval`` on a token export without an image channel (before any data loads)."""
    if conditioning == "retrieval" and RETRIEVAL_MODALITY not in modalities:
        raise ConfigError(
            f"image.conditioning=retrieval needs an {RETRIEVAL_MODALITY} channel in the token export "
            f"(it has {', '.join(modalities)}); use image.conditioning=tokens or export the image channel"
        )


def retrieval_keys(tokens, item_ids: list[str], train_users: list[str]) -> tuple[torch.Tensor, ...]:
    """``(keys [N, d], center [d], retrievable [N])`` from a token export: the items' stage-1
    image vectors and the mean decoded image vector of the *training* users only (held-out
    users' tokens never shape what is retrieved)."""
    check_conditioning("retrieval", tokens.modalities)
    vectors = tokens.item_vectors[RETRIEVAL_MODALITY]
    rows = [tokens.item_index.get(str(i), 0) for i in item_ids]  # 0: the padding row (never retrieved)
    keys = torch.from_numpy(np.asarray(vectors[rows], dtype=np.float32))
    column = tokens.modalities.index(RETRIEVAL_MODALITY)
    users = np.array([tokens.user_row(u) for u in train_users])
    center = tokens.decode(tokens.user_codes[users, column], RETRIEVAL_MODALITY).mean(0)
    return keys, torch.from_numpy(np.asarray(center, dtype=np.float32)), torch.tensor([r > 0 for r in rows])


def history_rows(tokens, user: str, row_of: dict[str, int], count: int) -> list[int]:
    """Bank rows of the user's ``count`` best-rated *training* items with a poster (best first,
    -1 padded): the history baseline's context."""
    items = [row_of[i] for i, _ in tokens.history(user, "train") if i in row_of][:count]
    return items + [-1] * (count - len(items))


def without_target(ranked: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """``[P, k]``: each row of ``ranked`` ``[P, >k]`` without its pair's ``target`` row, order
    kept (no leakage: a training pair never sees the poster it is trained to draw)."""
    keep = ranked != target[:, None]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return ranked.gather(1, order)[:, :k]


def training_contexts(model, tokens, pairs: list[tuple[str, str]], positions: torch.Tensor) -> torch.Tensor | None:
    """Context rows ``[n_pairs, k]`` of training pairs (user, target item), each without its
    target; None for a tokens-only model. ``positions`` ``[n_pairs, n_slots]``: the pairs' tokens."""
    context = model.context
    if context is None:
        return None
    target = torch.tensor([context.row_of[item] for _, item in pairs])
    if context.retrieves:
        users = {}  # one retrieval per user, not per pair
        for k, (user, _) in enumerate(pairs):
            users.setdefault(user, k)
        first = torch.tensor(list(users.values()))
        with torch.no_grad():
            ranked = model.retrieve(positions[first], count=context.k + 1).cpu()
        index = {user: n for n, user in enumerate(users)}
        ranked = ranked[torch.tensor([index[user] for user, _ in pairs])]
    else:
        cache = {}
        for user, _ in pairs:
            if user not in cache:
                cache[user] = history_rows(tokens, user, context.row_of, context.k + 1)
        ranked = torch.tensor([cache[user] for user, _ in pairs], dtype=torch.long)
    return without_target(ranked, target, context.k)
