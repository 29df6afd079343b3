"""Synthetic multimodal datasets in RecBole's atomic format, for scale benchmarks.

Users have power-law activity (Pareto tail, at least ``min_user_interactions`` each) and items
Zipf popularity; each user has a taste cluster, and ``affinity`` of their interactions fall
inside it, so there is a preference signal to learn, not just popularity. Item features are
noisy copies of the item's cluster centre (text and image widths configurable), with a share of
items missing each modality (zero row, mask 0), as in ml-100k-mm. Everything is drawn from one
seed: the same spec always writes the same files.

``write_synthetic(spec, root)`` writes ``root/<name>/``: ``<name>.inter``
(``user_id item_id timestamp``), ``<name>.item`` (``item_id text_feat image_feat text_mask
image_mask``), ``<name>.yaml`` (the RecBole dataset properties to read it, pass it with
``--config_files``) and ``manifest.json`` (the spec and the realised counts). A folder already
written from the same spec is reused; a new one appears by one rename when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_dppmg.data.atomic import FIELD_SEPARATOR, SEQ_SEPARATOR
from recbole_dppmg.errors import ConfigError

FORMAT_VERSION = 1
ITEM_ROWS_PER_WRITE = 20_000  # bounds the formatted text held at once (10^6 items are ~10 GB of it)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. ``users`` / ``items`` default to ``interactions // 20`` and
    ``interactions // 100`` (at least 10 and 50; ml-100k has 106 ratings per user and 59 per
    item)."""

    interactions: int = 100_000
    users: int | None = None
    items: int | None = None
    text_dim: int = 384  # all-MiniLM-L6-v2 width, as ml-100k-mm
    image_dim: int = 1280  # EfficientNet-Lite0 width, as ml-100k-mm
    clusters: int = 16
    affinity: float = 0.7  # share of a user's interactions inside their taste cluster
    user_tail: float = 2.0  # Pareto exponent of user activity: P(activity > x) ~ x^-user_tail
    item_zipf: float = 0.8  # item popularity ~ rank^-item_zipf
    min_user_interactions: int = 5
    text_missing: float = 0.0  # share of items without a text feature
    image_missing: float = 0.05  # share of items without an image feature
    feature_noise: float = 1.0  # noise std around the cluster centre (centres have unit std)
    seed: int = 0

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(10, self.interactions // 20)

    @property
    def n_items(self) -> int:
        return self.items if self.items is not None else max(50, self.interactions // 100)

    def validate(self) -> None:
        if self.interactions < 1 or self.n_users < 1 or self.n_items < 2:
            raise ConfigError(f"synthetic: need interactions >= 1, users >= 1, items >= 2, got {self}")
        if self.n_users * self.min_user_interactions > self.interactions:
            raise ConfigError(
                f"synthetic: {self.n_users} users x min_user_interactions {self.min_user_interactions}"
                f" exceed interactions {self.interactions}"
            )
        if self.interactions > self.n_users * (self.n_items // 2):
            raise ConfigError(
                f"synthetic: {self.interactions} interactions do not fit {self.n_users} users x"
                f" half of {self.n_items} items (the per-user cap)"
            )
        if min(self.text_dim, self.image_dim, self.clusters) < 1 or self.clusters > self.n_items:
            raise ConfigError("synthetic: text_dim, image_dim >= 1 and 1 <= clusters <= items required")
        for name in ("affinity", "text_missing", "image_missing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"synthetic: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.user_tail <= 0 or self.item_zipf < 0 or self.feature_noise < 0:
            raise ConfigError("synthetic: user_tail > 0, item_zipf >= 0 and feature_noise >= 0 required")


def default_name(interactions: int) -> str:
    """``synth-1e5`` for 100,000 interactions, ``synth-250000`` otherwise."""
    exponent = int(round(np.log10(interactions))) if interactions > 0 else 0
    return f"synth-1e{exponent}" if 10**exponent == interactions else f"synth-{interactions}"


def user_activity(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Interactions per user: ``min_user_interactions`` each, the rest spread in proportion to
    Pareto weights, capped at half the items; sums to ``spec.interactions`` exactly."""
    n, floor, cap = spec.n_users, spec.min_user_interactions, spec.n_items // 2
    weights = rng.pareto(spec.user_tail, n) + 1.0
    counts = np.full(n, floor, dtype=np.int64)
    left = spec.interactions - counts.sum()
    while left > 0:
        open_ = counts < cap
        share = np.where(open_, weights, 0.0)
        counts += np.minimum(rng.multinomial(left, share / share.sum()), cap - counts)
        left = spec.interactions - counts.sum()
    return counts


def _sample_items(cumulative: np.ndarray, members: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws from ``members`` with the popularity whose cumulative sum is given."""
    return members[
        np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right").clip(max=len(members) - 1)
    ]


def interactions(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user, item, item_cluster)``: distinct user-item pairs, sorted by user."""
    n_items = spec.n_items
    popularity = np.arange(1, n_items + 1, dtype=np.float64) ** -spec.item_zipf
    popularity = popularity[rng.permutation(n_items)]  # popular items anywhere in the id range
    item_cluster = rng.integers(0, spec.clusters, n_items)
    item_cluster[: spec.clusters] = np.arange(spec.clusters)  # no empty cluster
    all_cum = np.cumsum(popularity)
    cluster_items = [np.flatnonzero(item_cluster == c) for c in range(spec.clusters)]
    cluster_cum = [np.cumsum(popularity[m]) for m in cluster_items]
    user_cluster = rng.integers(0, spec.clusters, spec.n_users)

    target = user_activity(spec, rng)
    need = target
    keys = np.empty(0, dtype=np.int64)
    for round_ in range(64):
        users = np.repeat(np.arange(spec.n_users), need)
        if users.size == 0:
            break
        if round_ < 3:  # popularity x taste; later rounds fill the last gaps uniformly
            items = _sample_items(all_cum, np.arange(n_items), users.size, rng)
            home = rng.random(users.size) < spec.affinity
            for c in range(spec.clusters):
                slots = np.flatnonzero(home & (user_cluster[users] == c))
                items[slots] = _sample_items(cluster_cum[c], cluster_items[c], slots.size, rng)
        else:
            items = rng.integers(0, n_items, users.size)
        keys = np.unique(np.concatenate([keys, users * n_items + items]))
        need = target - np.bincount(keys // n_items, minlength=spec.n_users)
    return keys // n_items, keys % n_items, item_cluster


def item_features(spec: SyntheticSpec, item_cluster: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 text and image features (cluster centre + noise) and their 0/1 masks; a
    missing modality has a zero row."""
    out = {}
    for name, width, missing in (
        ("text", spec.text_dim, spec.text_missing),
        ("image", spec.image_dim, spec.image_missing),
    ):
        centres = rng.standard_normal((spec.clusters, width), dtype=np.float32)
        feats = centres[item_cluster]
        feats += spec.feature_noise * rng.standard_normal(feats.shape, dtype=np.float32)
        present = rng.random(spec.n_items) >= missing
        present[: spec.clusters] = True  # every modality keeps some items
        feats[~present] = 0.0
        out[f"{name}_feat"], out[f"{name}_mask"] = feats, present.astype(np.float32)
    return out


def _float_seq_lines(matrix: np.ndarray) -> list[str]:
    """Rows as space-separated values with 3 decimals (one %-format per row: 5x faster than
    pandas' ``to_csv`` with a ``float_format``)."""
    row_format = SEQ_SEPARATOR.join(["%.3f"] * matrix.shape[1])
    return [row_format % tuple(row) for row in matrix.tolist()]


PROPERTIES = (
    """\
# RecBole dataset properties for the synthetic dataset {name} (recbole_dppmg.data.synthetic).
# Pass with --config_files dataset/{name}/{name}.yaml; the protocol comes from properties/overall.yaml.
field_separator: "\\t"           # (str) Separator of the columns of the atomic files.
seq_separator: " "              # (str) Separator inside the float_seq feature vectors.
USER_ID_FIELD: user_id          # (str) User id field.
ITEM_ID_FIELD: item_id          # (str) Item id field.
RATING_FIELD: ~                 # (str or None) No ratings: every row is an interaction.
TIME_FIELD: timestamp           # (str) Random timestamps (the random split does not use them).
numerical_features: []          # (list) The feature vectors must not become [N, L, 2] pairs.
load_col:                       # (dict) Columns to load per atomic file.
    inter: [user_id, item_id, timestamp]
    item: [item_id, text_feat, image_feat, text_mask, image_mask]
normalize_field: ~              # (list) No min-max scaling of the features or masks.
normalize_all: ~                # (bool) Off, as above.
user_inter_num_interval: "[0,inf)"    # (str) Keep every user (each has >= {min_user} interactions).
item_inter_num_interval: "[0,inf)"    # (str) Keep every item, interacted or not.
"""
    "text_feature_field: text_feat   # (str) float_seq text feature ({text_dim}-d, cluster centre + noise; zeros where"
    " text_mask is 0).\n"
    """image_feature_field: image_feat # (str) float_seq image feature ({image_dim}-d; zeros where image_mask is 0).
text_mask_field: text_mask      # (str) 1.0 where the item has a text feature.
image_mask_field: image_mask    # (str) 1.0 where the item has an image feature.
"""
)


def write_synthetic(spec: SyntheticSpec, root: str | Path, name: str | None = None) -> Path:
    """Write (or reuse) ``root/<name>/`` for ``spec``; returns the folder."""
    spec.validate()
    name = name or default_name(spec.interactions)
    folder = Path(root) / name
    wanted = {"format_version": FORMAT_VERSION, "spec": asdict(spec)}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        if {k: existing.get(k) for k in wanted} == wanted:
            return folder

    rng = np.random.default_rng(spec.seed)
    users, items, item_cluster = interactions(spec, rng)
    features = item_features(spec, item_cluster, rng)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}."))
    tmp.chmod(0o755)
    try:
        inter = pd.DataFrame(
            {
                "user_id:token": users + 1,
                "item_id:token": items + 1,
                "timestamp:float": rng.integers(0, 10**9, users.size),
            }
        )
        inter.to_csv(tmp / f"{name}.inter", sep=FIELD_SEPARATOR, index=False, lineterminator="\n")
        header = ["item_id:token", "text_feat:float_seq", "image_feat:float_seq", "text_mask:float", "image_mask:float"]
        with open(tmp / f"{name}.item", "w", encoding="utf-8", newline="\n") as handle:
            handle.write(FIELD_SEPARATOR.join(header) + "\n")
            for start in range(0, spec.n_items, ITEM_ROWS_PER_WRITE):  # text rows of a chunk at a time
                stop = min(start + ITEM_ROWS_PER_WRITE, spec.n_items)
                columns = [
                    [str(i) for i in range(start + 1, stop + 1)],
                    _float_seq_lines(features["text_feat"][start:stop]),
                    _float_seq_lines(features["image_feat"][start:stop]),
                    *[["1" if v else "0" for v in features[f"{m}_mask"][start:stop]] for m in ("text", "image")],
                ]
                for row in zip(*columns):
                    handle.write(FIELD_SEPARATOR.join(row) + "\n")
        (tmp / f"{name}.yaml").write_text(
            PROPERTIES.format(
                name=name, min_user=spec.min_user_interactions, text_dim=spec.text_dim, image_dim=spec.image_dim
            )
        )
        per_user = np.bincount(users, minlength=spec.n_users)
        per_item = np.bincount(items, minlength=spec.n_items)
        stats = {
            "interactions": int(users.size),
            "users": spec.n_users,
            "items": spec.n_items,
            "items_interacted": int((per_item > 0).sum()),
            "user_interactions": {
                "min": int(per_user.min()),
                "median": float(np.median(per_user)),
                "max": int(per_user.max()),
            },
            "item_interactions": {"median": float(np.median(per_item)), "max": int(per_item.max())},
            "text_coverage": float(features["text_mask"].mean()),
            "image_coverage": float(features["image_mask"].mean()),
        }
        (tmp / "manifest.json").write_text(json.dumps({**wanted, "stats": stats}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
