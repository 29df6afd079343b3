"""Per-modality item feature matrices read from a RecBole dataset, validated once.

Multimodal models (DPPMG, VBPR) read the same config keys: ``modalities``, ``feature_fields``,
``mask_fields``, ``feature_dims``, ``feature_norm``. A modality's field names come from
``feature_fields.<m>`` / ``mask_fields.<m>`` when set, else from the dataset property keys
``<m>_feature_field`` / ``<m>_mask_field`` (so a dataset YAML names its own columns). Every problem a user can cause (a modality
without a field, a field the dataset lacks, a width that does not match the config, NaNs)
raises ``ConfigError`` / ``DataError`` with one line naming the key or field, instead of a
shape error deep inside a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from recbole.utils import FeatureType

from recbole_dppmg.errors import ConfigError, DataError

ID_MODALITY = "id"  # the optional ID-only channel: learned embeddings, no feature field
FEATURE_NORMS = ("zscore", "standard", "l2", "none")


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


def config_value(config, key, default=None):
    """``config[key]`` for a RecBole ``Config`` or a plain dict, ``default`` when unset."""
    try:
        value = config[key]
    except KeyError:
        value = None
    return default if value is None else value


def parse_modalities(config) -> list[str]:
    """The ``modalities`` key as a list of unique names (a list or ``"text,image"``)."""
    raw = config_value(config, "modalities")
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(m, str) for m in raw):
        raise ConfigError(f"modalities must be a non-empty list of names, got {raw!r}")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"modalities lists a name twice: {list(raw)}")
    return list(raw)


def _mapping(config, key) -> dict:
    value = config_value(config, key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping modality -> value, got {value!r}")
    return value


def _feature_fields(dataset) -> list[str]:
    item_feat = dataset.item_feat
    if item_feat is None:
        return []
    return [
        f for f in item_feat.columns
        if dataset.field2type.get(f) == FeatureType.FLOAT_SEQ
    ]


def feature_scaling(rows: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension ``(mean, divisor)`` that ``feature_norm = how`` applies to present rows:
    ``(x - mean) / divisor``. For ``l2`` (a per-row scaling) it is ``(0, 1)`` and rows are
    then divided by their norm. Public so that exports map new content exactly like items.

    ``zscore``: z-score per dimension; ``standard``: z-score divided by sqrt(width), so rows
    have unit norm on average and a fresh encoder gives item vectors at the scale of ID
    embeddings. DPPMG on ml-100k-mm with commitment weight 1 and no item residual: ``standard``
    valid NDCG@10 0.186 after 61 epochs vs a 0.205 peak at epoch 33 with ``zscore``; with
    ``item_id_residual`` and ``vq_weight`` 0 (DPPMG.yaml) ``standard`` is the default; VBPR
    keeps ``zscore``. ``l2``: unit rows; ``none``: as stored.
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
    fields = _mapping(config, "feature_fields")
    masks = _mapping(config, "mask_fields")
    dims = _mapping(config, "feature_dims")
    how = config_value(config, "feature_norm", "standard")
    if how not in FEATURE_NORMS:
        raise ConfigError(f"feature_norm must be one of {FEATURE_NORMS}, got {how!r}")
    name = getattr(dataset, "dataset_name", "?")

    wanted = [m for m in modalities if m != ID_MODALITY]
    fields = {m: fields.get(m, config_value(config, f"{m}_feature_field")) for m in wanted}
    masks = {m: masks.get(m, config_value(config, f"{m}_mask_field")) for m in wanted}
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
            raise DataError(
                f"feature field {field!r} (modality {m!r}) has NaN/inf values in"
                f" {int(bad.sum())} items"
            )
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
