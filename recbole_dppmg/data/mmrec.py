"""Bring a dataset in MMRec's format into this project.

The MMRec multimodal-recommendation toolbox keeps one folder per dataset:
``<name>.inter`` (tab-separated, header ``userID itemID rating timestamp x_label`` with
``x_label`` 0/1/2 = train/valid/test and item ids 0..n-1), ``text_feat.npy`` and
``image_feat.npy`` (row i = item i). This source turns it into the same atomic files as
any other dataset: the features become ``float_seq`` columns, an all-zero feature row
(MMRec's convention for a missing modality) becomes mask 0, and the predefined split is
kept both as an ``x_label`` column and as RecBole benchmark files
(``<name>.train.inter`` / ``.valid.inter`` / ``.test.inter``, use ``benchmark_filename``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_dppmg.data.item_content import ContentMap
from recbole_dppmg.data.sources import DatasetSpec, LoadedSource
from recbole_dppmg.errors import DataError

logger = logging.getLogger(__name__)

MMREC_COLUMNS = {
    "userID": "user_id",
    "itemID": "item_id",
    "rating": "rating",
    "timestamp": "timestamp",
    "x_label": "x_label",
}
SPLIT_NAMES = {"0": "train", "1": "valid", "2": "test"}


def load_feature_matrix(path: Path, n_rows: int | None, expected_dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A ``[n_items, dim]`` float32 feature file, checked; returns (features, row has data).

    Wrong shape, wrong width, a row count that does not match the items, or any NaN/inf is
    a :class:`DataError` naming the file and the first offending item ids.
    """
    if not path.is_file():
        raise DataError(f"feature file not found: {path}")
    try:
        matrix = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a numeric .npy array ({exc})") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise DataError(
            f"{path}: expected a 2-D numeric array [n_items, dim], got shape {matrix.shape} dtype {matrix.dtype}"
        )
    if n_rows is not None and matrix.shape[0] != n_rows:
        raise DataError(f"{path}: has {matrix.shape[0]} rows but the dataset has {n_rows} items")
    if expected_dim is not None and matrix.shape[1] != expected_dim:
        raise DataError(f"{path}: feature width {matrix.shape[1]}, expected {expected_dim}")
    matrix = matrix.astype(np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if bad_rows.size:
        shown = ", ".join(str(i) for i in bad_rows[:5])
        raise DataError(
            f"{path}: NaN or inf in {bad_rows.size} row(s), item ids {shown}{' ...' if bad_rows.size > 5 else ''}"
        )
    return matrix, np.abs(matrix).sum(axis=1) > 0


class MMRecSource:
    """An MMRec dataset folder (``format: mmrec`` in the spec)."""

    kind = "mmrec"

    def __init__(self, name: str, spec: DatasetSpec):
        self.name, self.spec = name, spec
        self.inter_path = spec.source_dir / (spec.inter_file or f"{name}.inter")
        self.text_path = spec.source_dir / spec.text_feat_file
        self.image_path = spec.source_dir / spec.image_feat_file
        for needed in (self.inter_path, self.text_path, self.image_path):
            if not needed.is_file():
                raise DataError(f"MMRec dataset {name}: {needed} not found (named by {spec.path})")

    def input_files(self) -> dict[str, Path]:
        return {"inter": self.inter_path, "text_feat.npy": self.text_path, "image_feat.npy": self.image_path}

    def settings(self) -> dict:
        return {"spec": self.spec.raw}

    def load(self) -> LoadedSource:
        inter = self._read_inter()
        text, text_present = load_feature_matrix(self.text_path, None, self.spec.text_dim)
        image, image_present = load_feature_matrix(self.image_path, None, self.spec.image_dim)
        if text.shape[0] != image.shape[0]:
            raise DataError(f"{self.text_path} has {text.shape[0]} rows but {self.image_path} has {image.shape[0]}")
        n_items = text.shape[0]
        item_ids = [str(i) for i in range(n_items)]
        items = pd.DataFrame({"item_id": item_ids})
        columns = [(c, "float" if c in ("rating", "timestamp", "x_label") else "token") for c in inter.columns]
        extra = {}
        if "x_label" in inter.columns:
            for label, split in SPLIT_NAMES.items():
                extra[f"{split}.inter"] = inter[inter["x_label"] == label].drop(columns=["x_label"])
        return LoadedSource(
            inter=inter,
            inter_columns=columns,
            items=items,
            item_columns=[("item_id", "token")],
            text_inputs=[None] * n_items,
            image_paths=[None] * n_items,
            precomputed={"text": (text, text_present), "image": (image, image_present)},
            featured_items=self.spec.featured_items,
            extra_files=extra,
            item_origin=str(self.text_path),
            content=ContentMap(  # features only: no title, text, tags or images for stage 2
                rating={"source_field": "rating", "like_rating": self.spec.like_rating} if "rating" in inter else None,
                timestamp_field="timestamp" if "timestamp" in inter.columns else None,
                source_format="mmrec",
                spec=str(self.spec.path.resolve()),
            ),
        )

    def _read_inter(self) -> pd.DataFrame:
        """MMRec's header has no ``:type`` suffixes; ids must be integers (feature row indices)."""
        try:
            frame = pd.read_csv(self.inter_path, sep="\t", dtype=str, quoting=3, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.inter_path}: not a tab-separated MMRec interaction file ({exc})") from None
        missing = [c for c in ("userID", "itemID") if c not in frame.columns]
        if missing:
            raise DataError(
                f"{self.inter_path}: MMRec header needs {', '.join(missing)} (found {', '.join(frame.columns)})"
            )
        frame = frame[[c for c in MMREC_COLUMNS if c in frame.columns]].rename(columns=MMREC_COLUMNS)
        if not frame["item_id"].str.fullmatch(r"\d+").all():
            raise DataError(f"{self.inter_path}: MMRec itemID values must be row indices 0..n-1 of the feature files")
        return frame
