"""Per-modality item feature matrices read from a RecBole dataset, validated once.

Multimodal models (DPPMG, VBPR) read the same config keys: ``modalities``, ``feature_fields``,
``mask_fields``, ``feature_dims``, ``feature_norm``. A modality's field names come from
``feature_fields.<m>`` / ``mask_fields.<m>`` when set, else from the dataset property keys
``<m>_feature_field`` / ``<m>_mask_field`` (so a dataset YAML names its own columns). The keys'
types are checked by ``recbole_dppmg.model.config_check``; every problem the data can cause (a
modality without a field, a field the dataset lacks, a width that does not match the config,
NaNs) raises ``ConfigError`` / ``DataError`` here with one line naming the key or field, instead
of a shape error deep inside a forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from recbole.utils import FeatureType

from recbole_dppmg.errors import ConfigError, DataError

ID_MODALITY = "id"  # the optional ID-only channel: learned embeddings, no feature field
FEATURE_NORMS = ("zscore", "standard", "l2", "none")

logger = logging.getLogger(__name__)


@dataclass
class ModalFeature:
    """One modality's item features, aligned with RecBole's internal item ids."""

    modality: str
    field: str
    features: torch.Tensor  # float32 [n_items, width]; rows of missing items are zeros
    present: torch.Tensor  # bool [n_items]; False for the padding id 0 and missing items

    @property
    def width(self) -> int:
        return int(self.features.shape[1])


def modality_names(value) -> list[str] | None:
    """``modalities`` as a list of names (a list or ``"text,image"``), None if malformed."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(m, str) and m for m in value):
        return None
    return list(value)


def parse_modalities(config) -> list[str]:
    """The ``modalities`` key as a list of unique names (a list or ``"text,image"``), less the
    ones the dataset has no item for (``missing_modalities``, written by ``prepare`` into the
    dataset's property file: a text-only catalogue trains the text and id channels)."""
    names = modality_names(config["modalities"])
    if names is None or len(set(names)) != len(names):
        raise ConfigError(f"modalities must be a non-empty list of distinct names, got {config['modalities']!r}")
    missing = set(dataset_key(config, "missing_modalities") or [])  # a dataset property, not a model key
    kept = [n for n in names if n not in missing]
    dataset = dataset_key(config, "dataset")
    if kept != names:
        if not kept:
            raise ConfigError(f"modalities {names} are all missing from dataset {dataset} (missing_modalities)")
        logger.warning(
            "dataset %s has no item with %s: the model uses the channels %s",
            dataset,
            " or ".join(sorted(set(names) - set(kept))),
            ", ".join(kept),
        )
    return kept


def dataset_key(config, key: str):
    """A dataset property (``<m>_feature_field``, ``<m>_mask_field``): None where the dataset
    YAML does not name that column, which ``load_modal_features`` then reports."""
    return config[key] if key in config else None


def _feature_fields(dataset) -> list[str]:
    item_feat = dataset.item_feat
    if item_feat is None:
        return []
    return [f for f in item_feat.columns if dataset.field2type.get(f) == FeatureType.FLOAT_SEQ]


def feature_scaling(rows: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension ``(mean, divisor)`` that ``feature_norm = how`` applies to present rows:
    ``(x - mean) / divisor``. For ``l2`` (a per-row scaling) it is ``(0, 1)`` and rows are
    then divided by their norm. Public so that exports map new content exactly like items.

    ``zscore``: z-score per dimension; ``standard``: z-score divided by sqrt(width), so rows
    have unit norm on average and a fresh encoder gives item vectors at the scale of ID
    embeddings (DPPMG's default; VBPR keeps ``zscore``; measurements in
    docs/stage1-tuning-notes.md). ``l2``: unit rows; ``none``: as stored.
    """
    width = rows.shape[1]
    mean, divisor = torch.zeros(width), torch.ones(width)
    if how in ("zscore", "standard"):
        mean, divisor = rows.mean(0), rows.std(0, unbiased=False).clamp_min(1e-6)
        if how == "standard":
            divisor = divisor * width**0.5
    return mean, divisor


def _normalise(features: torch.Tensor, present: torch.Tensor, how: str) -> torch.Tensor:
    """Scale present rows as ``feature_scaling`` says; missing rows stay zero."""
    out = torch.zeros_like(features)
    rows = features[present]
    mean, divisor = feature_scaling(rows, how)
    rows = (rows - mean) / divisor
    if how == "l2":
        rows = torch.nn.functional.normalize(rows, dim=1)
    out[present] = rows
    return out


def load_modal_features(dataset, config) -> dict[str, ModalFeature]:
    """Feature matrix and presence mask for every configured modality except ``id``.

    ``dataset`` is the RecBole dataset the model is built on; features come from
    ``dataset.get_item_feature()``. An item is present in a modality when its mask field
    (if configured) is > 0.5 and its feature row is not all zeros.
    """
    modalities = parse_modalities(config)
    fields = config["feature_fields"] or {}  # None: the dataset keys <m>_feature_field
    masks = config["mask_fields"] or {}
    dims = config["feature_dims"] or {}
    how = config["feature_norm"]
    name = getattr(dataset, "dataset_name", "?")

    wanted = [m for m in modalities if m != ID_MODALITY]
    fields = {m: fields.get(m, dataset_key(config, f"{m}_feature_field")) for m in wanted}
    masks = {m: masks.get(m, dataset_key(config, f"{m}_mask_field")) for m in wanted}
    for m in wanted:
        if not isinstance(fields[m], str):
            raise ConfigError(
                f"modality {m!r} has no feature field: set feature_fields.{m} or {m}_feature_field"
                f" (or drop {m!r} from modalities)"
            )
    if not wanted:
        return {}
    available = _feature_fields(dataset)
    if not available:
        raise DataError(
            f"dataset {name!r} has no item feature column (float_seq field of {name}.item);"
            f" modality {wanted[0]!r} needs field {fields[wanted[0]]!r} (check the .item file"
            f" and load_col)"
        )

    item_feat = dataset.get_item_feature()
    n_items = dataset.item_num
    result = {}
    for m in wanted:
        field = fields[m]
        if field not in available:
            raise DataError(
                f"feature field {field!r} (modality {m!r}) is not in dataset {name!r};"
                f" its feature fields are {available} (check the .item file and load_col)"
            )
        feats = item_feat[field].float()
        if feats.shape[0] != n_items:
            raise DataError(f"feature field {field!r} has {feats.shape[0]} rows, expected {n_items}")
        expected = dims.get(m)
        if expected is not None and int(expected) != feats.shape[1]:
            raise DataError(
                f"feature field {field!r} (modality {m!r}) has width {feats.shape[1]}"
                f" but feature_dims.{m} is {expected}"
            )
        bad = (~torch.isfinite(feats)).any(1)
        if bad.any():
            raise DataError(f"feature field {field!r} (modality {m!r}) has NaN/inf values in {int(bad.sum())} items")
        present = feats.abs().sum(1) > 0
        mask_field = masks.get(m)
        if mask_field is not None:
            if item_feat is None or mask_field not in item_feat.columns:
                raise DataError(
                    f"mask field {mask_field!r} (modality {m!r}) is not in dataset {name!r};"
                    f" its fields are {list(item_feat.columns)} (check the .item file and load_col)"
                )
            mask = item_feat[mask_field].float().reshape(n_items, -1)[:, 0]
            if not torch.isfinite(mask).all() or (mask < 0).any() or (mask > 1).any():
                raise DataError(f"mask field {mask_field!r} (modality {m!r}) must hold 0 or 1")
            present &= mask > 0.5
        present[0] = False  # RecBole's padding item
        if not present.any():
            raise DataError(
                f"modality {m!r}: no item has a non-zero feature in field {field!r}"
                + (f" with mask field {mask_field!r} = 1" if mask_field else "")
            )
        result[m] = ModalFeature(m, field, _normalise(feats, present, how), present)
    return result
