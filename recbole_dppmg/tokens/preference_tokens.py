"""Read a token export and turn users, item lists or vectors into preference tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
from safetensors.numpy import load_file

from recbole_dppmg.errors import DataError
from recbole_dppmg.tokens.faiss_lookup import residual_search
from recbole_dppmg.tokens.format import read_manifest, token_string


class PreferenceTokens:
    """A loaded token export: codebooks, per-user codes, FAISS indexes and the fold-in map.

    >>> tokens = PreferenceTokens.load("saved/ml-100k-mm/DPPMG-.../tokens")
    >>> tokens.tokens_for("196")            # {'text': ['<txt_0_17>', ...], 'image': [...]}
    >>> tokens.fold_in(["50", "172", "181"])  # a new user from the items they liked
    """

    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self.modalities: list[str] = manifest["modalities"]
        self.levels: int = manifest["levels"]
        self.codebook_size: int = manifest["codebook_size"]
        self.dim: int = manifest["dim"]
        self.codebooks = load_file(str(self.folder / "codebooks.safetensors"))
        self.user_codes = np.load(self.folder / "user_codes.npy")
        self.user_vectors = load_file(str(self.folder / "user_vectors.safetensors"))
        self.item_vectors = load_file(str(self.folder / "item_vectors.safetensors"))
        self.foldin_map = load_file(str(self.folder / "foldin.safetensors"))
        self.item_encoders = load_file(str(self.folder / "item_encoders.safetensors"))
        ids = json.loads((self.folder / "ids.json").read_text())
        self.user_ids: list[str] = ids["users"]
        self.item_ids: list[str] = ids["items"]
        self.user_index = {u: i for i, u in enumerate(self.user_ids) if i > 0}
        self.item_index = {t: i for i, t in enumerate(self.item_ids) if i > 0}
        with np.load(self.folder / "interactions.npz") as npz:
            self._splits = {key: npz[key] for key in npz.files}
        self.indexes = {
            m: [faiss.read_index(str(self.folder / f"index_{m}_L{l}.faiss")) for l in range(self.levels)]
            for m in self.modalities
        }

    @classmethod
    def load(cls, folder: str | Path, dataset: str | None = None, fingerprint: str | None = None) -> "PreferenceTokens":
        """Open an export; ``dataset`` / ``fingerprint`` refuse one made for other data."""
        folder = Path(folder)
        return cls(folder, read_manifest(folder, dataset=dataset, fingerprint=fingerprint))

    # ------------------------------------------------------------------ vectors <-> codes
    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise DataError(f"modality '{modality}' is not in this token export (has {', '.join(self.modalities)})")

    def encode(self, vectors, modality: str) -> np.ndarray:
        """Codes ``[N, levels]`` for continuous preference vectors ``[N, dim]`` (FAISS, residual)."""
        self._check_modality(modality)
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.shape[1] != self.dim:
            raise DataError(f"vectors have width {vectors.shape[1]}, the {modality} codebooks have dim {self.dim}")
        return residual_search(vectors, self.indexes[modality], self.codebooks[modality])

    def decode(self, codes, modality: str) -> np.ndarray:
        """Vectors ``[N, dim]``: the sum of each row's codebook vectors."""
        self._check_modality(modality)
        codes = np.atleast_2d(np.asarray(codes, dtype=np.int64))
        books = self.codebooks[modality]
        return sum(books[level][codes[:, level]] for level in range(codes.shape[1]))

    def token_strings(self, codes, modality: str) -> list[str]:
        """``['<txt_0_17>', '<txt_1_3>', ...]`` for one row of codes."""
        return [token_string(modality, level, int(code)) for level, code in enumerate(codes)]

    def embed_item_features(self, features, modality: str) -> np.ndarray:
        """Map raw item feature vectors ``[N, width]`` (same encoder as the dataset's items)
        into the model's layer-0 item space ``[N, dim]``, as stage 1 maps its items."""
        self._check_modality(modality)
        info = self.manifest.get("item_encoders", {}).get(modality)
        if info is None:
            raise DataError(f"modality '{modality}' has no feature encoder in this export (an id channel?)")
        x = np.atleast_2d(np.asarray(features, dtype=np.float32))
        if x.shape[1] != info["width"]:
            raise DataError(
                f"{modality} features have width {x.shape[1]}, the export's encoder expects {info['width']}"
            )
        if info["feature_norm"] == "l2":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        else:
            x = (x - self.item_encoders[f"{modality}.feature_mean"]) / self.item_encoders[f"{modality}.feature_std"]
        for k in range(info["layers"]):
            x = (
                x @ self.item_encoders[f"{modality}.linear{k}.weight"].T
                + self.item_encoders[f"{modality}.linear{k}.bias"]
            )
            if k < info["layers"] - 1:
                x = np.where(x > 0, x, 0.01 * x)
        return x

    # ------------------------------------------------------------------ users
    def user_row(self, user_id) -> int:
        row = self.user_index.get(str(user_id))
        if row is None:
            raise DataError(
                f"user '{user_id}' is not in the token export of {self.manifest['dataset']} ({len(self.user_index)} "
                "users); use fold_in(item_ids) for a new user"
            )
        return row

    def codes_for(self, user_id) -> np.ndarray:
        """The user's exported codes ``[n_modalities, levels]``."""
        return self.user_codes[self.user_row(user_id)]

    def tokens_for(self, user_id) -> dict[str, list[str]]:
        """The user's preference tokens per modality."""
        codes = self.codes_for(user_id)
        return {m: self.token_strings(codes[k], m) for k, m in enumerate(self.modalities)}

    def token_scores(self, user_ids: Iterable, relative: bool = False) -> np.ndarray:
        """``[n_users, n_items]`` stage-1 scores ``sum_m <q(u_m), i_m>`` of every item (columns in
        ``item_ids`` order) from the users' decoded tokens: what the tokens alone say each user
        likes. ``relative`` subtracts the average exported user's score of each item, so what is
        left is what this user likes more than users do on average (popularity taken out)."""
        rows = np.array([self.user_row(u) for u in user_ids])
        out = 0
        for k, m in enumerate(self.modalities):
            vectors = self.decode(self.user_codes[rows, k], m)
            if relative:
                vectors = vectors - self.decode(self.user_codes[1:, k], m).mean(0)
            out = out + vectors @ self.item_vectors[m].T
        return out

    SPLITS = ("train", "valid", "test")

    def history(self, user_id, split: str = "train", min_rating: float | None = None) -> list[tuple[str, float]]:
        """``[(item_id, rating), ...]`` of the user in one split of stage 1 (rating 1.0 when the
        dataset has none), best rated first; ``min_rating`` keeps only ratings >= it."""
        if split not in self.SPLITS:
            raise DataError(f"unknown split '{split}'; expected one of {', '.join(self.SPLITS)}")
        row = self.user_row(user_id)
        start, end = self._splits[f"{split}_indptr"][row : row + 2]
        items = self._splits[f"{split}_indices"][start:end]
        values = self._splits[f"{split}_values"][start:end]
        order = np.argsort(-values, kind="stable")
        pairs = [(self.item_ids[items[k]], float(values[k])) for k in order]
        if min_rating is not None:
            pairs = [p for p in pairs if p[1] >= min_rating]
        return pairs

    def split_matrix(self, split: str = "train"):
        """The split as a scipy CSR matrix ``[users + 1, items + 1]`` (internal rows / columns,
        row and column 0 padding) of ratings (1.0 when the dataset has none)."""
        import scipy.sparse as sp

        if split not in self.SPLITS:
            raise DataError(f"unknown split '{split}'; expected one of {', '.join(self.SPLITS)}")
        shape = (len(self.user_ids), len(self.item_ids))
        arrays = (self._splits[f"{split}_values"], self._splits[f"{split}_indices"], self._splits[f"{split}_indptr"])
        return sp.csr_matrix(arrays, shape=shape)

    @property
    def users(self) -> list[str]:
        """Original ids of all users in the export (internal order, padding excluded)."""
        return self.user_ids[1:]

    # ------------------------------------------------------------------ fold-in
    def item_rows(self, item_ids: Iterable) -> np.ndarray:
        item_ids = [str(i) for i in item_ids]
        if not item_ids:
            raise DataError("fold_in needs at least one item id")
        unknown = [i for i in item_ids if i not in self.item_index]
        if unknown:
            shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise DataError(f"unknown item ids for {self.manifest['dataset']}: {shown}")
        return np.array([self.item_index[i] for i in item_ids])

    def fold_in_vectors(self, item_ids: Iterable) -> dict[str, np.ndarray]:
        """Continuous preference vectors ``[dim]`` per modality for a user who is not in the
        training graph, from the items they interacted with (ridge map fitted at export)."""
        rows = self.item_rows(item_ids)
        out = {}
        for m in self.modalities:
            mean = self.item_vectors[m][rows].mean(0)
            out[m] = mean @ self.foldin_map[f"{m}.weight"] + self.foldin_map[f"{m}.bias"]
        return out

    def fold_in(self, item_ids: Iterable) -> dict[str, list[str]]:
        """Preference tokens per modality for a new user, without retraining."""
        vectors = self.fold_in_vectors(item_ids)
        return {m: self.token_strings(self.encode(vectors[m], m)[0], m) for m in self.modalities}
