"""The tiny inputs of the report tests: a DPPMG export of the tiny dataset with item texts and
posters, a tiny text LM warmed up on it, and stand-in featurizers of the tiny feature widths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_fixtures import movie_content, write_content_manifest
from image_fixtures import write_tiny_posters
from judge_fixtures import tiny_export
from text_tiny import GENRES, patch_everywhere, tiny_lm, tiny_text_settings, tiny_tokenizer

SPLIT = {"valid_users": 2, "test_users": 4, "seed": 2020, "min_rating": 0}  # the tiny export has no ratings (1.0)
QUICK = {"users": 4, "fd_users": 4, "seeds": [0, 1], "gallery_users": 2, "gallery_history": 2, "progress": False}


def text_features(texts):
    """Bag of words hashed into 8 dims (the tiny dataset's text feature width)."""
    out = np.zeros((len(texts), 8), dtype=np.float32)
    for k, text in enumerate(texts):
        for word in text.lower().split():
            out[k, sum(map(ord, word)) % 8] += 1
    return out


def poster_features(images):
    """Mean and std of each colour channel (the tiny dataset's image feature width, 6)."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images]
    return np.array([np.concatenate([a.mean((0, 1)), a.std((0, 1))]) for a in arrays], dtype=np.float32)


def add_item_texts_and_posters(item_file):
    """Title, year, genres, plot and poster columns for the tiny items (text tests read them)."""
    lines = item_file.read_text().splitlines()
    out = [
        lines[0]
        + "\ttitle:token_seq\tyear:token\tgenres:token_seq\tdescription:token_seq\tdescription_mask:float\tposter:token"
    ]
    for line in lines[1:]:
        item = line.split("\t")[0]
        k = int(item[1:])
        out.append(f"{line}\tFilm {k}\t{1990 + k % 10}\t{GENRES[k % 4]}\ta story of {GENRES[k % 4]}\t1\t{item}.png")
    item_file.write_text("\n".join(out) + "\n")


def tiny_text_run(root: Path) -> dict:
    """The tiny dataset (``root/data/tiny``, posters in ``root/posters``), its DPPMG export and a
    two-step text warm-up on it: ``{export, data, posters, backbone, text_run}``."""
    from recbole_dppmg.generation.text import pipeline as text_pipeline

    export, data = tiny_export(root)
    item_file = data / "tiny" / "tiny.item"
    add_item_texts_and_posters(item_file)
    posters = write_tiny_posters(root / "posters", n_items=48)
    write_content_manifest(data / "tiny", "tiny", root / "posters")
    tokenizer = tiny_tokenizer()
    backbone = root / "tiny-lm"
    tiny_lm(tokenizer).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    text_cfg = tiny_text_settings(backbone, root, SPLIT)
    with pytest.MonkeyPatch.context() as patch:
        patch_everywhere(patch, text_pipeline.item_file, lambda dataset: item_file)
        patch_everywhere(patch, text_pipeline.item_content, lambda dataset: movie_content(item_file))
        text_run = text_pipeline.train_text_generator("tiny", export, text_cfg)
    return {"export": export, "data": data, "posters": posters, "backbone": backbone, "text_run": text_run}


def report_options(inputs: dict, root: Path, **overrides) -> dict:
    """The keyword arguments of ``build_report`` on :func:`tiny_text_run`'s inputs."""
    text = {"backbone": str(inputs["backbone"]), "generate": {"max_new_tokens": 4, "batch_size": 4}}
    return {
        "text_config_overrides": text,
        "image_config_overrides": {"sample_steps": 2, "sample_batch": 4},
        "text_featurize": text_features,
        "image_featurize": poster_features,
        "posters": inputs["posters"],
        "dataset_dir": inputs["data"] / "tiny",
        "root": root / "saved",
        **overrides,
    }
