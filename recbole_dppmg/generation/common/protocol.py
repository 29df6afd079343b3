"""The evaluation protocol every generation measure follows (docs/evaluation.md#protocol).

Why own minus shuffled: an absolute score rewards content that suits everybody (the text of a
popular film wins retrieval and the judge for most users), so it cannot tell personalization from
popularity. The same content judged for its own user minus judged for another user, paired by
user, is exactly zero for any content that does not depend on the user (a constant text, the
most popular film), and positive only when the content fits its own user better than others.

Which users: settings are chosen on the *validation* users of the shared split
(``generation/common/user_split.py``); the *test* users are scored once per reported
configuration. :func:`evaluation_users` is the one place a measure gets its users from, so a
selection run cannot read a test user.

A measure is a function ``score(content_rows, judged_as_users) -> per-row values``; the gap
scores every user's content for the user and for the user's partner of a seeded derangement of
the evaluated users (a permutation without fixed points), so the partner term averages the
same per-user function over the same users: the mean gap of user-independent content is 0.
"""

from __future__ import annotations

from math import comb
from typing import Callable, Sequence

import numpy as np

from recbole_dppmg.errors import ConfigError, DataError

SPLITS = ("valid", "test")


def evaluation_users(split: dict[str, list[str]], which: str, count: int | None = None) -> list[str]:
    """The users a measure scores: ``valid`` to select settings on, ``test`` to report once."""
    if which not in SPLITS:
        raise ConfigError(f"evaluation split must be one of {', '.join(SPLITS)}, got {which!r}")
    users = [str(u) for u in split[which]]
    return users[: count or None]


def partner_rows(n: int, seed: int) -> np.ndarray:
    """A seeded derangement of ``range(n)``: row ``j``'s content is also judged as user
    ``partner[j]`` (never ``j`` itself)."""
    if n < 2:
        raise DataError("own minus shuffled needs at least two users")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    shift = int(rng.integers(1, n))
    partner = np.empty(n, dtype=np.int64)
    partner[order] = order[(np.arange(n) + shift) % n]
    return partner


def bootstrap_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of ``values`` when users are resampled."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise DataError("a bootstrap interval needs a non-empty list of per-user values")
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def own_minus_shuffled(
    score: Callable[[np.ndarray, Sequence[int]], np.ndarray],
    n: int,
    seed: int,
    resamples: int = 2000,
) -> dict:
    """``score(rows, judged_as)`` gives per-row values of content row ``rows[j]`` judged for user
    ``judged_as[j]``; returns the paired gap (mean, 95% interval over users) and both levels."""
    rows = np.arange(n)
    partner = partner_rows(n, seed)
    own = np.asarray(score(rows, rows), dtype=np.float64)
    other = np.asarray(score(rows, partner), dtype=np.float64)
    gap = own - other
    return {
        "mean": float(gap.mean()),
        "ci95": bootstrap_interval(gap, resamples, seed),
        "own": float(own.mean()),
        "shuffled": float(other.mean()),
        "users": int(n),
        "per_user": gap.tolist(),
    }


def judge_gap(judge, users: Sequence[str], modality: str, features: np.ndarray, seed: int) -> dict:
    """Own minus shuffled of a judge's percentile (``judge.personalization(users, modality,
    features)``): row ``j``'s content judged for ``users[j]`` minus for its partner."""
    features = np.asarray(features)
    return own_minus_shuffled(
        lambda rows, judged_as: judge.personalization([users[j] for j in judged_as], modality, features[rows]),
        len(users),
        seed,
    )


def retrieval_scorer(
    queries: np.ndarray, items: np.ndarray, targets: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]], k: int
) -> Callable[[np.ndarray, Sequence[int]], np.ndarray]:
    """NDCG@k of query row ``j`` against the test items of user ``judged_as[j]`` (that user's
    training items excluded), users given by position in ``targets`` / ``exclude``."""
    queries = np.asarray(queries, dtype=np.float32)
    items = np.asarray(items, dtype=np.float32)
    qn = queries / np.clip(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12, None)
    inorm = items / np.clip(np.linalg.norm(items, axis=1, keepdims=True), 1e-12, None)
    scores = qn @ inorm.T
    discount = 1.0 / np.log2(np.arange(2, k + 2))

    def ndcg(rows: np.ndarray, judged_as: Sequence[int]) -> np.ndarray:
        out = np.zeros(len(rows))
        for j, (row, user) in enumerate(zip(rows, judged_as)):
            target = set(targets[user]) - set(exclude[user])
            if not target:
                raise DataError("retrieval gap: every evaluated user needs a test item (filter users first)")
            ranked = scores[row].copy()
            ranked[list(exclude[user])] = -np.inf
            top = np.argsort(-ranked, kind="stable")[:k]
            gains = sum(discount[r] for r, item in enumerate(top) if int(item) in target)
            out[j] = gains / discount[: min(len(target), k)].sum()
        return out

    return ndcg


def users_with_targets(targets: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]]) -> list[int]:
    """Positions of users who have a test item outside their training items (retrieval needs one)."""
    return [u for u, (t, e) in enumerate(zip(targets, exclude)) if set(t) - set(e)]


def random_hit_rate(
    targets: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]], n_items: int, k: int = 10
) -> float:
    """Expected Hit@k of a uniformly random ranking, over the users :func:`retrieval_metrics` scores:
    1 - C(N - T, k) / C(N, k) with N candidates (catalogue minus excluded) and T test items."""
    rates = []
    for target, excluded in zip(targets, exclude):
        excluded = set(int(e) for e in excluded)
        t = len(set(int(x) for x in target) - excluded)
        if t:
            n = n_items - len(excluded)
            rates.append(1.0 - comb(n - t, k) / comb(n, k) if n >= k else 1.0)
    if not rates:
        raise DataError("no evaluated user has a test item outside their training items")
    return float(np.mean(rates))
