"""Where a dataset's raw inputs come from, normalised into one in-memory shape.

Two sources live here: the embedded ``ml-100k-mm`` (RecBole's bundled ml-100k joined with
the shared posters and plot texts) and a user's own folder of atomic files described by a
small YAML spec. The MMRec converter (``mmrec.py``) produces the same shape. ``prepare``
only ever sees :class:`LoadedSource`, so featurisation, validation and writing are shared.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import yaml

from recbole_dppmg.data.atomic import read_atomic, sanitize_text
from recbole_dppmg.data.item_content import ContentMap
from recbole_dppmg.errors import DataError

logger = logging.getLogger(__name__)

ML100K_MM = "ml-100k-mm"
PLACEHOLDER_PREFIX = "It looks like we don't have any Plot Summaries"
# Well-known films whose neighbours a person can judge at a glance (ml-100k item ids):
# Star Wars, Toy Story, The Godfather, Pulp Fiction, The Silence of the Lambs, The Lion King.
ML100K_FEATURED = ["50", "1", "127", "56", "98", "71"]
RESERVED_ITEM_COLUMNS = ("text_feat", "image_feat", "text_mask", "image_mask")


@dataclass
class LoadedSource:
    """A dataset's tables before featurisation; all values are strings, text is sanitised.

    ``inter``/``items`` columns are the output field names; ``*_columns`` give their
    RecBole types in output order. ``text_inputs[i]`` is the encoder input of item ``i``
    or None when the item has no text; ``image_paths[i]`` is None when no image is named.
    ``precomputed`` maps a modality to (features, present) when features come with the
    data (MMRec) instead of from an encoder.
    """

    inter: pd.DataFrame
    inter_columns: list[tuple[str, str]]
    items: pd.DataFrame
    item_columns: list[tuple[str, str]]
    text_inputs: list[str | None] = field(default_factory=list)
    image_paths: list[Path | None] = field(default_factory=list)
    precomputed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    title_field: str | None = None
    featured_items: list[str] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)
    extra_files: dict[str, pd.DataFrame] = field(default_factory=dict)
    item_origin: str = ""
    explanation: str = ""
    content: ContentMap = field(default_factory=ContentMap)  # roles -> .item columns (item_content.py)


class Source(Protocol):
    kind: str

    def input_files(self) -> dict[str, Path]:
        """Label -> file or folder whose content decides whether a rebuild is needed."""

    def settings(self) -> dict:
        """Everything besides file content that changes the output (hashed into the cache key)."""

    def load(self) -> LoadedSource: ...


def recbole_ml100k_dir() -> Path:
    """RecBole's bundled ml-100k atomic files, found inside the installed wheel."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("recbole is not installed; ml-100k-mm is built from its bundled ml-100k files")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise DataError(f"RecBole's bundled ml-100k is missing at {folder}")
    return folder


def _typed_columns(frame: pd.DataFrame) -> list[tuple[str, str]]:
    return list(frame.attrs["field_types"].items())


def _as_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Float columns back to exact strings (integers without '.0'), so rows pass through unchanged."""
    out = frame.copy()
    for name, ftype in frame.attrs["field_types"].items():
        if ftype == "float":
            out[name] = [
                "" if pd.isna(v) else (str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v)))
                for v in frame[name]
            ]
    out.attrs = dict(frame.attrs)
    return out


class Ml100kMMSource:
    """RecBole's ml-100k (interactions, titles, years, genres) + shared posters and plots."""

    kind = ML100K_MM

    def __init__(self, shared_dir: Path):
        self.data_dir = Path(shared_dir) / "data" / ML100K_MM
        self.details = self.data_dir / "details.json"
        self.posters = self.data_dir / "posters"
        if not self.details.is_file() or not self.posters.is_dir():
            raise DataError(
                f"ml-100k-mm needs the shared data at {self.data_dir} (details.json and posters/); "
                "put the shared folder at ../shared next to the repository or set DPPMG_SHARED"
            )
        self.ml100k = recbole_ml100k_dir()

    def input_files(self) -> dict[str, Path]:
        return {
            "ml-100k.inter": self.ml100k / "ml-100k.inter",
            "ml-100k.item": self.ml100k / "ml-100k.item",
            "details.json": self.details,
            "posters/": self.posters,
        }

    def settings(self) -> dict:
        return {
            "placeholder_prefix": PLACEHOLDER_PREFIX,
            "text_template": "title (year). Genres: a, b. plot",
            "text_present_when": "title",
            "image_dir": str(self.posters.resolve()),  # recorded in the manifest: a moved folder is a new build
        }

    def load(self) -> LoadedSource:
        inter = _as_strings(read_atomic(self.ml100k / "ml-100k.inter"))
        movies = read_atomic(self.ml100k / "ml-100k.item")
        descriptions, placeholders = self._descriptions()
        items = pd.DataFrame(
            {
                "item_id": movies["item_id"].map(sanitize_text),
                "title": movies["movie_title"].map(sanitize_text),
                "year": movies["release_year"].map(sanitize_text),
                "genres": movies["class"].map(sanitize_text),
            }
        )
        items["description"] = [descriptions.get(i, "") for i in items["item_id"]]
        items["description_mask"] = ["1.0" if d else "0.0" for d in items["description"]]
        items["poster"] = [f"{i}.jpg" if (self.posters / f"{i}.jpg").is_file() else "" for i in items["item_id"]]
        # Every movie has a title, so the text modality is present for all; an item without a
        # real plot gets the embedding of title, year and genres (a fallback feature that is
        # still real content), and description_mask records which items had a plot.
        text_inputs = [
            self.text_input(row.title, row.year, row.genres, row.description) if row.title else None
            for row in items.itertuples()
        ]
        image_paths = [self.posters / p if p else None for p in items["poster"]]
        item_columns = [
            ("item_id", "token"),
            ("title", "token_seq"),
            ("year", "token"),
            ("genres", "token_seq"),
            ("description", "token_seq"),
            ("description_mask", "float"),
            ("poster", "token"),
        ]
        return LoadedSource(
            inter=inter,
            inter_columns=_typed_columns(inter),
            items=items,
            item_columns=item_columns,
            text_inputs=text_inputs,
            image_paths=image_paths,
            title_field="title",
            featured_items=ML100K_FEATURED,
            content=ContentMap(
                fields={
                    "title": "title",
                    "year": "year",
                    "description": "description",
                    "tags": "genres",
                    "image": "poster",
                },
                image_dir=str(self.posters.resolve()),
                rating={"source_field": "rating", "like_rating": None},
                timestamp_field="timestamp",
                text_fields=["title", "year", "genres", "description"],
                text_separator=". ",
                source_format=ML100K_MM,
            ),
            item_origin=str(self.ml100k / "ml-100k.item"),
            explanation=(
                "Text is present for every movie: the encoder reads `title (year). Genres: ... . plot`, "
                "where the plot is left out for movies without a real one (none in details.json, or the "
                'placeholder "It looks like we don\'t have any Plot Summaries...", which counts as missing). '
                "`description_mask` (1.0/0.0, not loaded by RecBole) says which movies had a plot; "
                "`image_mask` says which have a poster that decoded."
            ).replace('"', "'"),
            notes={
                "descriptions_in_details": len(descriptions) + placeholders,
                "descriptions_placeholder": placeholders,
                "items_with_description": sum(1 for d in items["description"] if d),
                "posters_in_folder": sum(1 for p in items["poster"] if p),
            },
        )

    @staticmethod
    def text_input(title: str, year: str, genres: str, description: str) -> str:
        """'Star Wars (1977). Genres: Action, Adventure. <plot>' - the text encoder's input."""
        parts = [f"{title} ({year})" if year else title]
        if genres:
            parts.append("Genres: " + ", ".join(genres.split()))
        if description:
            parts.append(description)
        return ". ".join(parts) if description else ". ".join(parts) + "."

    def _descriptions(self) -> tuple[dict[str, str], int]:
        """Real plot texts by item id; placeholders ('no plot summary yet') count as missing."""
        try:
            records = json.loads(self.details.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{self.details}: not readable JSON ({exc})") from None
        texts, placeholders = {}, 0
        for record in records:
            item_id = str(record.get("movie_id", "")).strip()
            text = sanitize_text(record.get("description"))
            if not item_id:
                continue
            if text.startswith(PLACEHOLDER_PREFIX):
                placeholders += 1
                continue
            if text:
                texts[item_id] = text
        return texts, placeholders


@dataclass
class DatasetSpec:
    """A user's dataset, as described by its prepare YAML (see dataset/README.md)."""

    path: Path
    source_dir: Path
    format: str = "atomic"
    inter_file: str | None = None
    item_file: str | None = None
    user_id_field: str = "user_id"
    item_id_field: str = "item_id"
    rating_field: str | None = None
    timestamp_field: str | None = None
    like_rating: float | None = None
    text_fields: list[str] = field(default_factory=list)
    text_separator: str = ". "
    text_required_fields: list[str] = field(default_factory=list)
    missing_text_values: list[str] = field(default_factory=list)
    image_field: str | None = None
    image_dir: str | None = None
    title_field: str | None = None
    year_field: str | None = None
    description_field: str | None = None
    tags_field: str | None = None
    tags_separator: str | None = None
    featured_items: list[str] = field(default_factory=list)
    text_feat_file: str = "text_feat.npy"
    image_feat_file: str = "image_feat.npy"
    text_dim: int | None = None
    image_dim: int | None = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: Path) -> "DatasetSpec":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(f"dataset spec {path} is not readable YAML ({exc})") from None
        if not isinstance(raw, dict) or "source_dir" not in raw:
            raise DataError(f"dataset spec {path} must be a mapping with at least 'source_dir'")
        known = set(cls.__dataclass_fields__) - {"path", "raw"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(
                f"dataset spec {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = dict(raw)
        values["source_dir"] = (path.parent / str(raw["source_dir"])).resolve()
        for key in ("text_fields", "text_required_fields", "missing_text_values", "featured_items"):
            value = values.get(key) or []
            values[key] = [str(v) for v in ([value] if isinstance(value, str) else value)]
        if values.get("format", "atomic") not in ("atomic", "mmrec"):
            raise DataError(f"dataset spec {path}: format must be 'atomic' or 'mmrec', not {values['format']!r}")
        for key in (
            "rating_field",
            "timestamp_field",
            "title_field",
            "year_field",
            "description_field",
            "tags_field",
            "image_field",
            "image_dir",
            "tags_separator",
            "user_id_field",
            "item_id_field",
        ):
            if key in values and values[key] is not None and not isinstance(values[key], str):
                raise DataError(f"dataset spec {path}: {key} must be a column name (a string), not {values[key]!r}")
        if values.get("like_rating") is not None:
            try:
                values["like_rating"] = float(values["like_rating"])
            except (TypeError, ValueError):
                raise DataError(
                    f"dataset spec {path}: like_rating must be a number, not {raw['like_rating']!r}"
                ) from None
        if bool(values.get("image_field")) != bool(values.get("image_dir")):
            given, other = ("image_field", "image_dir") if values.get("image_field") else ("image_dir", "image_field")
            raise DataError(f"dataset spec {path}: {given} is set but {other} is not; images need both")
        return cls(path=path, raw=raw, **values)

    def roles(self) -> dict[str, str | None]:
        """Which .item column plays which role; unset ones default from ``text_fields``:
        the title is the first text field, the description the last one that is neither the
        title nor the tags."""
        title = self.title_field or (self.text_fields[0] if self.text_fields else None)
        description = self.description_field
        if description is None:
            rest = [f for f in self.text_fields if f not in (title, self.tags_field, self.year_field)]
            description = rest[-1] if rest else None
        return {
            "title": title,
            "year": self.year_field,
            "description": description,
            "tags": self.tags_field,
            "image": self.image_field,
        }

    def encoder_fields(self) -> list[str]:
        """The fields joined into the text encoder's input: ``text_fields``, else title + description."""
        if self.text_fields:
            return list(self.text_fields)
        roles = self.roles()
        return [f for f in (roles["title"], roles["description"]) if f]


class AtomicFolderSource:
    """A user's folder with ``.inter``, ``.item`` (text fields) and an image folder."""

    kind = "atomic"

    def __init__(self, name: str, spec: DatasetSpec):
        self.name, self.spec = name, spec
        self.inter_path = spec.source_dir / (spec.inter_file or f"{name}.inter")
        self.item_path = spec.source_dir / (spec.item_file or f"{name}.item")
        self.image_dir = spec.source_dir / spec.image_dir if spec.image_dir else None
        for needed in (self.inter_path, self.item_path):
            if not needed.is_file():
                raise DataError(f"dataset {name}: {needed} not found (named by {spec.path})")
        if spec.image_field and (self.image_dir is None or not self.image_dir.is_dir()):
            raise DataError(f"dataset {name}: image folder {self.image_dir} not found (spec {spec.path}: image_dir)")

    def input_files(self) -> dict[str, Path]:
        files = {"inter": self.inter_path, "item": self.item_path}
        if self.image_dir is not None and self.spec.image_field:
            files["images/"] = self.image_dir
        return files

    def settings(self) -> dict:
        return {"spec": self.spec.raw}

    def load(self) -> LoadedSource:
        spec = self.spec
        inter = read_atomic(self.inter_path)
        rating_field = self._optional_column(inter, spec.rating_field, "rating", "rating_field")
        timestamp_field = self._optional_column(inter, spec.timestamp_field, "timestamp", "timestamp_field")
        inter = self._rename_ids(
            _as_strings(inter), self.inter_path, {spec.user_id_field: "user_id", spec.item_id_field: "item_id"}
        )
        inter = self._rename_roles(inter, {rating_field: "rating", timestamp_field: "timestamp"})
        table = read_atomic(self.item_path, parse_float_seq=False)
        table = self._rename_ids(table, self.item_path, {spec.item_id_field: "item_id"})
        types = table.attrs["field_types"]
        clashes = [c for c in RESERVED_ITEM_COLUMNS if c in types]
        if clashes:
            raise DataError(f"{self.item_path}: column(s) {', '.join(clashes)} are reserved for the generated features")
        roles = spec.roles()
        encoder_fields = spec.encoder_fields()
        named = {"text_fields": encoder_fields, "text_required_fields": spec.text_required_fields}
        named.update({f"{role}_field": [column] for role, column in roles.items() if column})
        for key, columns in named.items():
            for name in columns:
                if name not in types:
                    raise DataError(
                        f"{self.item_path}: spec {spec.path} names field {name!r} ({key}), which the file lacks"
                        f" (columns: {', '.join(types)})"
                    )
        kept = [(n, t) for n, t in types.items() if t != "float_seq"]
        table = _as_strings(table)
        items = pd.DataFrame({n: table[n].map(sanitize_text) for n, _ in kept})
        missing_values = {sanitize_text(v) for v in spec.missing_text_values}
        for name in {*encoder_fields, *(c for r, c in roles.items() if c and r != "image")}:
            items[name] = ["" if v in missing_values else v for v in items[name]]
        text_inputs = []
        for _, row in items.iterrows():
            values = [self._readable(f, row[f]) for f in encoder_fields if row[f]]
            required_ok = all(row[f] for f in spec.text_required_fields)
            text_inputs.append(spec.text_separator.join(values) if values and required_ok else None)
        image_paths = []
        for value in items[spec.image_field] if spec.image_field else [""] * len(items):
            image_paths.append(self.image_dir / value if value else None)
        content = ContentMap(
            fields=roles,
            tags_separator=spec.tags_separator,
            image_dir=str(self.image_dir.resolve()) if self.image_dir is not None and spec.image_field else None,
            rating={"source_field": rating_field, "like_rating": spec.like_rating} if rating_field else None,
            timestamp_field=timestamp_field,
            text_fields=encoder_fields,
            text_separator=spec.text_separator,
            source_format="atomic",
            spec=str(spec.path.resolve()),
        )
        return LoadedSource(
            inter=inter,
            inter_columns=_typed_columns(inter),
            items=items,
            item_columns=kept,
            text_inputs=text_inputs,
            image_paths=image_paths,
            title_field=roles["title"],
            featured_items=spec.featured_items,
            item_origin=str(self.item_path),
            content=content,
        )

    def _rename_roles(self, inter: pd.DataFrame, renames: dict) -> pd.DataFrame:
        """The rating and timestamp columns get RecBole's usual names; other columns stay."""
        types = dict(inter.attrs["field_types"])
        renames = {old: new for old, new in renames.items() if old and old != new}
        for old, new in renames.items():
            if new in types:
                raise DataError(f"{self.inter_path}: cannot rename {old!r} to {new!r}, which already exists")
        inter = inter.rename(columns=renames)
        inter.attrs["field_types"] = {renames.get(n, n): t for n, t in types.items()}
        return inter

    def _readable(self, field_name: str, value: str) -> str:
        """A tags value reads as "a, b" in the encoder's input, whatever its separator."""
        if field_name != self.spec.tags_field:
            return value
        parts = value.split(self.spec.tags_separator) if self.spec.tags_separator else value.split()
        return ", ".join(p.strip() for p in parts if p.strip())

    def _optional_column(self, inter: pd.DataFrame, named: str | None, usual: str, key: str) -> str | None:
        """The rating / timestamp column: the one the spec names (it must exist and be a float),
        else ``usual`` when the file has it as a float, else None (the role is absent)."""
        types = inter.attrs["field_types"]
        if named is None:
            if types.get(usual) == "float":
                return usual
            if usual in types:
                logger.warning("%s: column %s is not a float; no %s (set %s)", self.inter_path, usual, usual, key)
            return None
        if named not in types:
            raise DataError(
                f"{self.inter_path}: spec {self.spec.path} sets {key}: {named}, but the header has no such column"
                f" (columns: {', '.join(types)})"
            )
        if types[named] != "float":
            raise DataError(f"{self.inter_path}: {key} column {named!r} must be of type float, not {types[named]}")
        empty = inter[named].isna()
        if empty.any():
            raise DataError(
                f"{self.inter_path}: {key} column {named!r} is empty in {int(empty.sum())} row(s) "
                f"(e.g. data row {int(np.flatnonzero(empty.to_numpy())[0]) + 1})"
            )
        return named

    @staticmethod
    def _rename_ids(frame: pd.DataFrame, path: Path, renames: dict[str, str]) -> pd.DataFrame:
        """Map the user's id field names onto RecBole's ``user_id``/``item_id``; ids must be tokens."""
        types = dict(frame.attrs["field_types"])
        for old, new in renames.items():
            if old not in types:
                raise DataError(f"{path}: id field {old!r} not in the header ({', '.join(types)})")
            if types[old] != "token":
                raise DataError(f"{path}: id field {old!r} must be of type token, not {types[old]}")
            if old != new and new in types:
                raise DataError(f"{path}: cannot rename {old!r} to {new!r}, which already exists")
        frame = frame.rename(columns=renames)
        frame.attrs["field_types"] = {renames.get(n, n): t for n, t in types.items()}
        return frame
