"""Fold-in: a preference vector for a user who is not in the training graph, from the items
they interacted with (a ridge map fitted on the training users), so new users get tokens
without retraining stage 1."""

from __future__ import annotations

import numpy as np

FOLDIN_RIDGE = 1e-2  # relative to the mean eigenvalue of X^T X


def fit_foldin(
    item_vectors: np.ndarray, user_items, user_vectors: np.ndarray, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge map from the mean of a user's item vectors to the user's vector."""
    x = mean_item_vectors(item_vectors, user_items, users)
    y = user_vectors[users]
    x_aug = np.hstack([x, np.ones((len(x), 1), dtype=x.dtype)]).astype(np.float64)
    gram = x_aug.T @ x_aug
    ridge = FOLDIN_RIDGE * np.trace(gram) / gram.shape[0]
    gram[np.diag_indices_from(gram)] += ridge
    solution = np.linalg.solve(gram, x_aug.T @ y.astype(np.float64))
    return solution[:-1].astype(np.float32), solution[-1].astype(np.float32)


def mean_item_vectors(item_vectors: np.ndarray, user_items, users: np.ndarray) -> np.ndarray:
    """Row ``k``: the mean of ``item_vectors`` over user ``users[k]``'s items (CSR rows)."""
    rows = user_items[users]
    counts = np.maximum(np.asarray(rows.sum(1)).ravel(), 1)
    return np.asarray(rows @ item_vectors) / counts[:, None]
