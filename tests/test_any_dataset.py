"""Any dataset, end to end: a user's own catalogue with unusual column names (string ids, a
0-10 rating scale, comma-separated multi-word tags, PNG and JPEG images, one missing and one
corrupt image) goes through ``--stage all`` with a tiny profile to a report with a gallery; a
text-only variant runs the text generator and says what the image stages need; an MMRec
dataset stops at the generation stages with a line naming the spec keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from image_fixtures import TINY_MODEL
from PIL import Image
from text_tiny import tiny_lm, tiny_text_settings, tiny_tokenizer

from recbole_dppmg.data.item_content import ItemContent, MissingContentError
from recbole_dppmg.data.prepare import prepare_dataset
from recbole_dppmg.paths import REPO_ROOT
from recbole_dppmg.tokens import PreferenceTokens

N_USERS, N_ITEMS, CLUSTERS = 36, 24, 4
TAGS = ["Space Opera,Robots", "Romance,Paris", "Horror,Night Terror", "Western,Horses"]
PLOTS = ["stars ships robots war", "love wedding paris kiss", "ghost night blood scream", "cowboy horse desert gun"]
COLOURS = [(200, 40, 40), (40, 180, 60), (40, 60, 200), (210, 190, 40)]
MISSING_IMAGE, CORRUPT_IMAGE, NO_TEXT = "p-5", "p-7", "p-0"


def write_shop(root: Path, name: str, with_images: bool = True) -> Path:
    """Raw files of a small shop in ``root/raw`` and their prepare spec; returns the spec path."""
    rng = np.random.default_rng(0)
    raw = root / "raw"
    (raw / "pictures").mkdir(parents=True, exist_ok=True)
    cluster = np.arange(N_ITEMS) % CLUSTERS
    with open(raw / "shop.inter", "w") as f:
        f.write("who:token\twhat:token\tscore:float\twhen:float\n")
        for u in range(N_USERS):
            own = rng.choice(np.flatnonzero(cluster == u % CLUSTERS), 5, replace=False)
            other = rng.choice(np.flatnonzero(cluster != u % CLUSTERS), 3, replace=False)
            for t, i in enumerate(np.concatenate([own, other])):
                score = rng.integers(8, 11) if i in own else rng.integers(2, 6)  # 0-10 scale
                f.write(f"c_{u:03d}\tp-{i}\t{score}\t{1_000_000 + 3600 * t}\n")
    with open(raw / "shop.item", "w") as f:
        f.write("what:token\tlabel:token_seq\tmade:token\tcats:token_seq\tblurb:token_seq\tpic:token\n")
        for i in range(N_ITEMS):
            c = cluster[i]
            blurb = "" if f"p-{i}" == NO_TEXT else f"A tale of {PLOTS[c]} number {i}."
            picture = f"p-{i}.png" if i % 2 == 0 else f"p-{i}.jpg"
            f.write(f"p-{i}\tThing {i}\t{2000 + i % 10}\t{TAGS[c]}\t{blurb}\t{picture}\n")
            if f"p-{i}" == MISSING_IMAGE:
                continue
            if f"p-{i}" == CORRUPT_IMAGE:
                (raw / "pictures" / picture).write_bytes(b"this is not an image")
                continue
            pixels = np.clip(np.array(COLOURS[c]) + rng.normal(0, 20, (48, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(raw / "pictures" / picture, "PNG" if i % 2 == 0 else "JPEG")
    spec = {
        "source_dir": "raw",
        "inter_file": "shop.inter",
        "item_file": "shop.item",
        "user_id_field": "who",
        "item_id_field": "what",
        "rating_field": "score",
        "timestamp_field": "when",
        "title_field": "label",
        "year_field": "made",
        "description_field": "blurb",
        "tags_field": "cats",
        "tags_separator": ",",
        "text_fields": ["label", "cats", "blurb"],
        **({"image_field": "pic", "image_dir": "pictures"} if with_images else {}),
    }
    path = root / f"{name}.prepare.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tiny_profile(root: Path) -> Path:
    """A profile of tiny sizes (a 2-layer LM built here, a pixel-space UNet, a few steps)."""
    tokenizer = tiny_tokenizer()
    backbone = root / "tiny-lm"
    tiny_lm(tokenizer).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    split = {"valid_users": 3, "test_users": 4}
    profile = {
        "recbole": {
            "epochs": 2,
            "embedding_size": 8,
            "levels": 2,
            "codebook_size": 4,
            "train_batch_size": 64,
            "metrics": ["Recall", "NDCG"],
            "topk": [5],
            "valid_metric": "NDCG@5",
            "state": "ERROR",
            "show_progress": False,
            "torch_num_threads": 1,
            "checkpoint_dir": str(root / "saved"),
        },
        "text": {
            **tiny_text_settings(backbone, root, split),
            "generate": {"max_new_tokens": 4, "batch_size": 4, "guidance": 1.0},
        },
        "image": {
            **TINY_MODEL,
            "conditioning": "retrieval",  # the defaults' generator: retrieved posters and the SDEdit start
            "sdedit_strength": 0.6,
            **split,
            "batch_size": 4,
            "max_steps": 3,
            "save_every": 3,
            "warmup_steps": 1,
            "progress": False,
            "num_threads": 1,
            "cache_dir": str(root / "cache"),
            "sample_steps": 2,
            "sample_batch": 4,
        },
        "rl": {
            "quick": True,
            "text": {"steps": 1, "users_per_step": 2, "group_size": 2, "user_pool": 4, "max_new_tokens": 4},
            "image": {
                "steps": 1,
                "users_per_step": 2,
                "group_size": 2,
                "user_pool": 4,
                "sample_steps": 2,
                "sdedit_strength": 0.6,
            },
        },
        "reward": {},
        "evaluate": {"users": 4, "fd_users": 4, "seeds": [0], "gallery_users": 2, "gallery_history": 2},
    }
    path = root / "tiny-profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def run_all(root: Path, name: str, spec: Path, profile: Path) -> subprocess.CompletedProcess:
    """``python run_dppmg.py --stage all`` in a child process with its own dataset and saved folders."""
    env = {
        **os.environ,
        "DPPMG_DATASET_DIR": str(root / "dataset"),
        "DPPMG_SAVED_DIR": str(root / "saved"),
        "HF_HUB_OFFLINE": "1",
        "DPPMG_NUM_THREADS": "1",
    }
    command = [sys.executable, str(REPO_ROOT / "run_dppmg.py"), "--stage", "all", "-d", name]
    command += ["--spec", str(spec), "--profile", str(profile), "--torch_num_threads=1"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)


def stages(root: Path, name: str) -> dict:
    (record,) = sorted((root / "saved" / name).glob("Pipeline-*/pipeline.json"))
    return {s["stage"]: s for s in json.loads(record.read_text())["stages"]}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("any-dataset")
    return root, tiny_profile(root)


@pytest.mark.e2e
def test_a_rekeyed_catalogue_runs_every_stage_to_a_report(shop):
    root, profile = shop
    spec = write_shop(root, "shop")
    result = run_all(root, "shop", spec, profile)
    assert result.returncode == 0, result.stderr[-3000:]
    record = stages(root, "shop")
    assert all(s["status"] == "ran" for s in record.values()), record

    folder = root / "dataset" / "shop"
    manifest = json.loads((folder / "manifest.json").read_text())
    content = manifest["content"]
    assert content["fields"] == {
        "title": "label",
        "year": "made",
        "description": "blurb",
        "tags": "cats",
        "image": "pic",
    }
    assert content["rating"] == {"source_field": "score", "min": 2.0, "max": 10.0, "like_rating": 8.0}
    assert content["image_dir"] == str((root / "raw" / "pictures").resolve())
    assert manifest["counts"]["images_missing_file"] == 1 and manifest["counts"]["images_failed"] == 1
    properties = yaml.safe_load((folder / "shop.yaml").read_text())
    assert properties["RATING_FIELD"] == "rating" and properties["TIME_FIELD"] == "timestamp"
    assert properties["load_col"]["inter"] == ["user_id", "item_id", "rating", "timestamp"]

    items = ItemContent.load("shop", folder)
    assert items.head("p-3") == "Thing 3 (2003)" and items.tags("p-2") == ["Horror", "Night Terror"]
    assert set(items.images()) == {f"p-{i}" for i in range(N_ITEMS)} - {MISSING_IMAGE, CORRUPT_IMAGE}
    assert NO_TEXT not in items.described_items()

    tokens = next((root / "saved" / "shop").glob("DPPMG-*/tokens"))
    codes = (tokens / "codes.md").read_text()
    assert "Thing " in codes and "[p-" in codes and ("Romance" in codes or "Western" in codes)
    ratings = {r for u in ("c_000", "c_001") for _, r in PreferenceTokens.load(tokens, dataset="shop").history(u)}
    assert ratings <= set(range(2, 11)) and max(ratings) >= 8  # the 0-10 scale reached stage 2, not all 1.0

    report = Path(record["evaluate"]["output"])
    image_runs = [json.loads(p.read_text()) for p in (root / "saved" / "shop").glob("ImageGen-*/run.json")]
    assert sorted(r["model"]["conditioning"] for r in image_runs) == ["history", "retrieval"]  # + history baseline
    result = json.loads((report / "report.json").read_text())
    assert result["image_sampling"]["strength"] == 0.6 and result["conditions"]["history"]["image"] == "run"
    assert "gap_image_heldout_judge" in result["intervals"]["history"]
    table = (report / "report.md").read_text()
    assert "DPPMG before RL" in table and "poster Hit@10" in table
    gallery = (report / "gallery.html").read_text()
    assert "Thing " in gallery and any(p.suffix == ".png" for p in (report / "gallery").iterdir())


@pytest.mark.e2e
def test_a_text_only_catalogue_runs_the_text_generator_and_names_image_field(shop):
    root, profile = shop
    spec = write_shop(root / "text-only", "shoptext", with_images=False)
    result = run_all(root, "shoptext", spec, profile)
    assert result.returncode == 0, result.stderr[-3000:]
    record = stages(root, "shoptext")
    assert record["text"]["status"] == "ran"
    assert record["image"]["status"] == "skipped" and "set image_field and image_dir in" in record["image"]["note"]
    assert record["rl_text"]["status"] == "skipped" and record["rl_image"]["status"] == "skipped"
    assert not list((root / "saved" / "shoptext").glob("ImageGen-*"))
    report = Path(record["evaluate"]["output"])
    assert "poster Hit" not in (report / "report.md").read_text()
    assert "Thing " in (report / "gallery.html").read_text()


def test_generation_stages_of_an_mmrec_dataset_name_the_raw_content_keys(tmp_path, monkeypatch):
    from test_data_mmrec import write_mmrec

    from recbole_dppmg.generation.image.train import train_image_generator
    from recbole_dppmg.generation.text.pipeline import train_text_generator

    spec = write_mmrec(tmp_path)
    prepare_dataset("mm", dataset_dir=tmp_path / "dataset", spec_file=spec, num_threads=1)
    monkeypatch.setenv("DPPMG_DATASET_DIR", str(tmp_path / "dataset"))
    with pytest.raises(MissingContentError, match="MMRec dataset carries features only.*description_field"):
        train_text_generator("mm", tmp_path / "no-export", {"checkpoint_dir": str(tmp_path / "saved")})
    with pytest.raises(MissingContentError, match="MMRec dataset carries features only.*image_field and image_dir"):
        train_image_generator("mm", tmp_path / "no-export", {})
    assert not (tmp_path / "saved").exists()
