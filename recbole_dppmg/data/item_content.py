"""The one way every stage reads a prepared dataset's items: title, text, tags, image, rating.

``prepare`` records in ``manifest.json`` (``content``) which column of the prepared ``.item``
file plays which role, how tags are separated, where the images it encoded live, and the
rating scale. Stage 2, the reward, the report, ``codes.md`` and the gallery read items only
through :class:`ItemContent`, so none of them knows a dataset's column names or where
``../shared`` is, and a dataset without a role fails with one line naming the prepare-spec key
that gives it (:class:`MissingContentError`) before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_dppmg.data.atomic import read_item_table
from recbole_dppmg.errors import DataError
from recbole_dppmg.paths import dataset_root

ROLES = ("title", "year", "description", "tags", "image")
# The prepare-spec key that gives each role (dataset/README.md, "Your own dataset").
SPEC_KEYS = {
    "title": "title_field",
    "year": "year_field",
    "description": "description_field",
    "tags": "tags_field",
    "image": "image_field and image_dir",
    "rating": "rating_field",
}
CONTENT_VERSION = 1


class MissingContentError(DataError):
    """A stage needs an item role the prepared dataset does not have."""


@dataclass
class ContentMap:
    """What ``manifest.json`` records under ``content``: role -> ``.item`` column (None when
    absent), the tag separator (None = whitespace, RecBole's token_seq), the resolved image
    folder, the rating column's scale and the rating from which an interaction counts as liked
    (None: implicit feedback, every interaction is liked), and where the roles came from."""

    fields: dict[str, str | None] = field(default_factory=lambda: {r: None for r in ROLES})
    tags_separator: str | None = None
    image_dir: str | None = None
    rating: dict | None = None  # {"source_field", "min", "max", "like_rating"}
    timestamp_field: str | None = None  # the source's column (renamed to timestamp)
    text_fields: list[str] = field(default_factory=list)
    text_separator: str = ". "
    source_format: str = "atomic"  # ml-100k-mm, atomic or mmrec
    spec: str | None = None
    version: int = CONTENT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ContentMap":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def like_rating_default(low: float, high: float) -> float:
    """Three quarters of the way up the scale: 4 on 1-5 stars, 7.75 on 1-10, 3.875 on 0.5-5."""
    return float(low + 0.75 * (high - low))


class ItemContent:
    """A prepared dataset's items seen through its content map (see the module docstring)."""

    def __init__(self, dataset: str, table: pd.DataFrame, content: ContentMap, folder: Path | None = None):
        self.dataset, self.table, self.map, self.folder = dataset, table, content, folder
        for role, column in content.fields.items():
            if column is not None and column not in table.columns:
                raise DataError(f"{dataset}: the content map names column {column!r} for {role}, which the .item lacks")
        self.item_ids = [str(i) for i in table.index]

    @classmethod
    def load(cls, dataset: str, dataset_dir: str | Path | None = None) -> "ItemContent":
        """The content of ``<dataset_dir>/<dataset>/`` (default: the prepared-dataset folder)."""
        folder = Path(dataset_dir) if dataset_dir else dataset_root() / dataset
        manifest_path, item_path = folder / "manifest.json", folder / f"{dataset}.item"
        if not manifest_path.is_file() or not item_path.is_file():
            raise DataError(
                f"{folder} is not a prepared dataset (no manifest.json or {dataset}.item): "
                f"run --stage prepare -d {dataset} first"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{manifest_path}: not readable JSON ({exc})") from None
        if "content" not in manifest:
            raise DataError(
                f"{manifest_path} has no content map (prepared by an older version): "
                f"run --stage prepare -d {dataset} --force"
            )
        return cls(dataset, read_item_table(item_path), ContentMap.from_json(manifest["content"]), folder)

    # ------------------------------------------------------------------ roles
    def has(self, role: str) -> bool:
        if role == "rating":
            return self.map.rating is not None
        if role == "image":
            return self.map.fields.get("image") is not None and self.map.image_dir is not None
        return self.map.fields.get(role) is not None

    def require(self, role: str, purpose: str) -> "ItemContent":
        """Raise one line naming the missing role and the spec key that gives it."""
        if self.has(role):
            return self
        key = SPEC_KEYS.get(role, role)
        if self.map.source_format == "mmrec":
            raise MissingContentError(
                f"{self.dataset} has no item {role}, which {purpose} needs: an MMRec dataset carries features only; "
                f"prepare the raw items from atomic files with {key} in the prepare spec (dataset/README.md)"
            )
        spec = self.map.spec or f"dataset/{self.dataset}.prepare.yaml"
        raise MissingContentError(
            f"{self.dataset} has no item {role}, which {purpose} needs: set {key} in {spec} "
            f"and run --stage prepare again (dataset/README.md)"
        )

    def _value(self, role: str, item: str) -> str:
        column = self.map.fields.get(role)
        if column is None or item not in self.table.index:
            return ""
        value = self.table.at[item, column]
        return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()

    # ------------------------------------------------------------------ per item
    def title(self, item: str) -> str:
        """The item's title, or its id when the dataset has none."""
        return self._value("title", str(item)) or str(item)

    def year(self, item: str) -> str:
        return self._value("year", str(item))

    def head(self, item: str) -> str:
        """``Title (year)``, or the title alone."""
        year = self.year(item)
        return f"{self.title(item)} ({year})" if year else self.title(item)

    def label(self, item: str) -> str:
        """``Title (year) [id]`` for tables a person reads."""
        return f"{self.head(item)} [{item}]" if self.has("title") else str(item)

    def description(self, item: str) -> str:
        """The item's text (a plot, a product description); "" when it has none."""
        return self._value("description", str(item))

    def tags(self, item: str) -> list[str]:
        """Category / genre-like labels."""
        raw = self._value("tags", str(item))
        separator = self.map.tags_separator
        parts = raw.split(separator) if separator else raw.split()
        return [p.strip() for p in parts if p.strip()]

    def image_path(self, item: str) -> Path | None:
        """The image file ``prepare`` encoded for the item (None when it named none)."""
        name = self._value("image", str(item))
        return Path(self.map.image_dir) / name if name and self.map.image_dir else None

    # ------------------------------------------------------------------ catalogue-wide
    def described_items(self) -> list[str]:
        """Items with a non-empty description, in file order."""
        return [i for i in self.item_ids if self.description(i)]

    def tags_by_item(self) -> dict[str, list[str]]:
        return {i: self.tags(i) for i in self.item_ids}

    def images(self) -> dict[str, Path]:
        """``{item_id: image path}`` for every item whose image file exists and whose image
        feature ``prepare`` could compute (``image_mask`` 1: a corrupt file is left out)."""
        self.require("image", "the poster stages")
        folder = Path(self.map.image_dir)
        if not folder.is_dir():
            raise DataError(
                f"{self.dataset}: the image folder {folder} recorded by prepare is gone; "
                f"put it back or run --stage prepare -d {self.dataset} again"
            )
        mask = self.table["image_mask"] if "image_mask" in self.table.columns else None
        out = {}
        for item in self.item_ids:
            path = self.image_path(item)
            if path is not None and (mask is None or float(mask.get(item, 0) or 0) > 0) and path.is_file():
                out[item] = path
        if not out:
            raise DataError(f"{self.dataset}: no item has a readable image under {folder}")
        return out

    def with_image_dir(self, folder: str | Path) -> "ItemContent":
        """The same items with their images looked up in another folder (``image.poster_dir``)."""
        moved = ContentMap.from_json({**self.map.to_json(), "image_dir": str(Path(folder).resolve())})
        return ItemContent(self.dataset, self.table, moved, self.folder)

    @property
    def like_rating(self) -> float | None:
        """Ratings from this value count as liked; None: implicit feedback (every interaction)."""
        return None if self.map.rating is None else self.map.rating.get("like_rating")

    def like_threshold(self, setting: float | None) -> float | None:
        """A stage's ``min_rating`` setting, or the dataset's own like rating when it is None."""
        return float(setting) if setting is not None else self.like_rating
