"""A second preference model that judges generated content and is never a reward.

RL optimises the DPPMG judge (``judge.py``), so gains measured by that judge are not evidence:
the policy can learn what that one model likes. This judge shares no parameters and no
architecture with it: EASE (Steck, 2019; closed-form item-item regression, the strongest stage-1
baseline here) fitted on the same training split, plus a content head that places a piece of
content among the catalogue items by cosine similarity in the item feature space (the text or
image encoder of ``prepare``). The score of content ``c`` for user ``u`` is the
similarity-weighted mean of u's EASE scores over the ``k`` catalogue items nearest ``c``, given
as a percentile among u's head scores of the catalogue items' own content, so a real item's text
scores where that item's neighbourhood ranks for the user.
"""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
import scipy.sparse as sp

from recbole_dppmg.errors import ConfigError, DataError

EASE_L2 = 250.0  # RecBole's EASE reg_weight default
NEIGHBOURS = 10


def ease_weights(train: sp.csr_matrix, l2: float = EASE_L2) -> np.ndarray:
    """EASE's item-item matrix ``B`` (zero diagonal) of a binary user x item matrix."""
    if l2 <= 0:
        raise ConfigError(f"EASE's l2 must be > 0, got {l2}")
    x = (train > 0).astype(np.float64)
    gram = (x.T @ x).toarray() + l2 * np.eye(x.shape[1])
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)


class HeldoutJudge:
    """EASE + a cosine-kNN content head, per modality (see the module docstring)."""

    def __init__(
        self,
        train: sp.csr_matrix,
        user_index: dict[str, int],
        catalogues: dict[str, tuple[np.ndarray, np.ndarray]],
        l2: float = EASE_L2,
        k: int = NEIGHBOURS,
    ):
        """``train``: users x items (internal rows and columns); ``catalogues[m]``: (item
        columns, their features) of the items that have modality ``m``."""
        if k < 1:
            raise ConfigError(f"the held-out judge needs k >= 1 neighbours, got {k}")
        self.train, self.user_index, self.k = train.tocsr(), user_index, k
        self.weights = ease_weights(self.train, l2)
        self.catalogues = {}
        for m, (columns, features) in catalogues.items():
            columns = np.asarray(columns, dtype=np.int64)
            if len(columns) != len(features) or len(columns) < k:
                raise DataError(f"held-out judge: the {m} catalogue needs >= {k} items with one feature row each")
            index = faiss.IndexFlatIP(features.shape[1])
            index.add(_unit(features))
            similarity, neighbours = index.search(_unit(features), k)
            self.catalogues[m] = (columns, index, (similarity, neighbours))

    @classmethod
    def for_export(cls, tokens, features: dict[str, tuple[list[str], np.ndarray]], **kwargs) -> "HeldoutJudge":
        """From a token export's training split and ``{modality: (item ids, features)}``."""
        train = tokens.split_matrix("train")
        catalogues = {}
        for m, (item_ids, matrix) in features.items():
            keep = [k for k, i in enumerate(item_ids) if i in tokens.item_index and np.abs(matrix[k]).sum() > 0]
            catalogues[m] = (np.array([tokens.item_index[item_ids[k]] for k in keep]), np.asarray(matrix)[keep])
        return cls(train, tokens.user_index, catalogues, **kwargs)

    def _user_scores(self, users: Sequence[str]) -> np.ndarray:
        unknown = [u for u in users if str(u) not in self.user_index]
        if unknown:
            raise DataError(f"held-out judge: unknown user(s) {', '.join(map(str, unknown[:5]))}")
        rows = [self.user_index[str(u)] for u in users]
        return np.asarray(self.train[rows] @ self.weights)

    @staticmethod
    def _head(scores: np.ndarray, similarity: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        weights = np.clip(similarity, 1e-6, None)
        return (scores[np.arange(len(scores))[:, None], neighbours] * weights).sum(1) / weights.sum(1)

    def personalization(self, users: Sequence[str], modality: str, features: np.ndarray) -> np.ndarray:
        """``[N]`` percentile in [0, 1] of row ``j``'s content for ``users[j]`` (ties count half)."""
        if modality not in self.catalogues:
            raise DataError(f"the held-out judge has no {modality} catalogue (has {', '.join(self.catalogues)})")
        columns, index, (cat_similarity, cat_neighbours) = self.catalogues[modality]
        features = np.atleast_2d(np.asarray(features, dtype=np.float32))
        if len(features) != len(users):
            raise DataError(f"held-out judge: {len(users)} users but {len(features)} content rows")
        valid = np.isfinite(features).all(1)
        similarity, neighbours = index.search(_unit(np.nan_to_num(features)), self.k)
        item_scores = self._user_scores(users)[:, columns]  # [N, catalogue]
        content = self._head(item_scores, similarity, neighbours)
        cat_weights = np.clip(cat_similarity, 1e-6, None)
        out = np.empty(len(users))
        for j in range(len(users)):
            catalogue = (item_scores[j][cat_neighbours] * cat_weights).sum(1) / cat_weights.sum(1)
            tie = np.isclose(catalogue, content[j], rtol=1e-5, atol=1e-7)
            out[j] = (((catalogue < content[j]) & ~tie).sum() + 0.5 * tie.sum()) / len(catalogue)
        out[~valid] = np.nan
        return out
