"""Tiny synthetic datasets and encoders for the data tests (no pretrained weights needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from recbole_dppmg.data.featurize import ImageBatchResult

TEXT_DIM, IMAGE_DIM = 8, 6


class FakeTextEncoder:
    """Deterministic hash-seeded unit vectors: same text, same vector."""

    name, version, dim = "fake-text", "fake-text==1", TEXT_DIM

    def __init__(self):
        self.calls = 0

    def encode(self, texts, batch_size=64, progress=True):
        self.calls += 1
        out = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
            vector = np.random.default_rng(seed).normal(size=TEXT_DIM)
            out.append(vector / np.linalg.norm(vector))
        return np.asarray(out, dtype=np.float32)


class FakeImageEncoder:
    """Channel means and standard deviations; decodes with PIL so corrupt files fail for real."""

    name, version, dim = "fake-image", "fake-image==1", IMAGE_DIM

    def __init__(self):
        self.calls = 0

    def encode(self, paths, batch_size=32, progress=True):
        self.calls += 1
        features = np.zeros((len(paths), IMAGE_DIM), np.float32)
        ok = np.zeros(len(paths), bool)
        failures = {}
        for row, path in enumerate(paths):
            try:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            except Exception as exc:
                failures[row] = f"{type(exc).__name__}: {exc}"
                continue
            features[row] = np.concatenate([pixels.mean(axis=(0, 1)), pixels.std(axis=(0, 1))])
            ok[row] = True
        return ImageBatchResult(features, ok, failures)


def fake_encoders() -> dict:
    return {"text": FakeTextEncoder(), "image": FakeImageEncoder()}


ITEMS = [
    # item_id, title, description, image file
    ("i1", "Space Saga", "Rebels fight an empire in space.", "i1.png"),
    ("i2", "Space Saga II", "The empire strikes back.", "i2.png"),
    ("i3", "Quiet Farm", "", "i3.png"),  # no description -> text missing
    ("i4", "City Lights", "A tramp falls in love.", ""),  # no image named
    ("i5", "Placeholder Movie", "N/A", "i5.png"),  # placeholder text -> missing
]
COLOURS = {"i1": (200, 30, 30), "i2": (190, 40, 35), "i3": (20, 160, 40), "i5": (30, 30, 200)}


def write_user_dataset(root: Path, name: str = "tiny", *, item_rows=None, inter_rows=None, extra_spec=None) -> Path:
    """A user's raw folder (``raw/``) plus a spec YAML; returns the spec path."""
    raw = root / "raw"
    images = raw / "images"
    images.mkdir(parents=True, exist_ok=True)
    for item_id, colour in COLOURS.items():
        Image.new("RGB", (12, 16), colour).save(images / f"{item_id}.png")
    if item_rows is None:
        item_rows = [f"{i}\t{t}\t{d}\t{p}" for i, t, d, p in ITEMS]
    (raw / f"{name}.item").write_text(
        "movie:token\ttitle:token_seq\tplot:token_seq\timage:token\n" + "\n".join(item_rows) + "\n", encoding="utf-8"
    )
    if inter_rows is None:
        inter_rows = [f"u{u}\ti{1 + (u + k) % 5}\t{1 + k}\t{1000 + 10 * u + k}" for u in range(1, 5) for k in range(3)]
    (raw / f"{name}.inter").write_text(
        "user:token\tmovie:token\trating:float\ttimestamp:float\n" + "\n".join(inter_rows) + "\n", encoding="utf-8"
    )
    spec = {
        "source_dir": "raw",
        "user_id_field": "user",
        "item_id_field": "movie",
        "text_fields": ["title", "plot"],
        "text_required_fields": ["plot"],
        "missing_text_values": ["N/A"],
        "image_field": "image",
        "image_dir": "images",
        "title_field": "title",
    }
    spec.update(extra_spec or {})
    spec_path = root / f"{name}.prepare.yaml"
    spec_path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return spec_path


def leftovers(dataset_dir: Path) -> list[str]:
    """Hidden temp folders a failed prepare might have left behind."""
    return sorted(p.name for p in Path(dataset_dir).glob(".*") if p.is_dir() and p.name != ".locks")


MOVIE_ROLES = {"title": "title", "year": "year", "description": "description", "tags": "genres", "image": "poster"}


def movie_content(item_path: Path, dataset: str = "tiny", image_dir: Path | None = None, **roles):
    """``ItemContent`` of a hand-written ``.item`` file with ml-100k-mm's column names (tests that
    build the table themselves instead of running ``prepare``); ``roles`` override the columns."""
    from recbole_dppmg.data.atomic import read_item_table
    from recbole_dppmg.data.item_content import ContentMap, ItemContent

    table = read_item_table(Path(item_path))
    fields = {role: column for role, column in {**MOVIE_ROLES, **roles}.items() if column in table.columns}
    content = ContentMap(
        fields={**{r: None for r in MOVIE_ROLES}, **fields}, image_dir=str(image_dir) if image_dir else None
    )
    return ItemContent(dataset, table, content, Path(item_path).parent)


def write_content_manifest(folder: Path, dataset: str, image_dir: Path | None = None, **roles) -> None:
    """A ``manifest.json`` with only the content map, for a hand-written prepared folder."""
    import json

    content = movie_content(folder / f"{dataset}.item", dataset, image_dir, **roles).map
    (folder / "manifest.json").write_text(json.dumps({"dataset": dataset, "content": content.to_json()}))
