"""The synthetic dataset generator: deterministic, the counts it promises, readable by RecBole."""

import json

import numpy as np
import pytest
from recbole.data import create_dataset, data_preparation

from recbole_dppmg.config import build_config
from recbole_dppmg.data.atomic import read_atomic
from recbole_dppmg.data.synthetic import SyntheticSpec, default_name, write_synthetic
from recbole_dppmg.errors import ConfigError
from recbole_dppmg.utils import get_model

SPEC = SyntheticSpec(interactions=3000, users=200, items=150, text_dim=6, image_dim=5, clusters=3, image_missing=0.2)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = write_synthetic(SPEC, tmp_path / "a", "tiny")
    b = write_synthetic(SPEC, tmp_path / "b", "tiny")
    c = write_synthetic(SyntheticSpec(**{**SPEC.__dict__, "seed": 1}), tmp_path / "c", "tiny")
    for suffix in (".inter", ".item"):
        assert (a / f"tiny{suffix}").read_bytes() == (b / f"tiny{suffix}").read_bytes()
        assert (a / f"tiny{suffix}").read_bytes() != (c / f"tiny{suffix}").read_bytes()


def test_counts_tails_and_masks(tmp_path):
    folder = write_synthetic(SPEC, tmp_path, "tiny")
    inter = read_atomic(folder / "tiny.inter")
    assert len(inter) == SPEC.interactions
    assert not inter.duplicated(["user_id", "item_id"]).any()
    per_user = inter.groupby("user_id").size()
    assert len(per_user) == SPEC.users and per_user.min() >= SPEC.min_user_interactions
    assert per_user.max() <= SPEC.items // 2
    assert per_user.max() > 2 * per_user.median()  # heavy-tailed activity
    per_item = inter.groupby("item_id").size().sort_values(ascending=False)
    assert per_item.iloc[0] > 3 * per_item.iloc[len(per_item) // 2]  # popular head

    items = read_atomic(folder / "tiny.item")
    image = np.stack(items["image_feat"].to_numpy())
    assert image.shape == (SPEC.items, SPEC.image_dim)
    assert ((np.abs(image).sum(1) > 0) == (items["image_mask"] > 0.5)).all()
    assert 0 < (items["image_mask"] < 0.5).sum() < SPEC.items
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stats"]["interactions"] == SPEC.interactions


def test_reused_when_the_spec_matches(tmp_path):
    folder = write_synthetic(SPEC, tmp_path, "tiny")
    before = (folder / "tiny.inter").stat().st_mtime_ns
    write_synthetic(SPEC, tmp_path, "tiny")
    assert (folder / "tiny.inter").stat().st_mtime_ns == before
    write_synthetic(SyntheticSpec(**{**SPEC.__dict__, "seed": 5}), tmp_path, "tiny")
    assert (folder / "tiny.inter").stat().st_mtime_ns != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_recbole_reads_it_with_its_yaml(tmp_path):
    folder = write_synthetic(SPEC, tmp_path, "tiny")
    config = build_config(
        get_model("DPPMG"),
        "tiny",
        [folder / "tiny.yaml"],
        {"data_path": str(tmp_path), "state": "ERROR", "use_gpu": False},
    )
    dataset = create_dataset(config)
    assert dataset.inter_num == SPEC.interactions
    assert dataset.item_num == SPEC.items + 1  # + RecBole's padding item
    train, _, _ = data_preparation(config, dataset)
    assert tuple(train._dataset.get_item_feature()["text_feat"].shape) == (SPEC.items + 1, SPEC.text_dim)


def test_impossible_specs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="min_user_interactions"):
        write_synthetic(SyntheticSpec(interactions=100, users=50), tmp_path)
    with pytest.raises(ConfigError, match="per-user cap"):
        write_synthetic(SyntheticSpec(interactions=5000, users=100, items=60), tmp_path)
    assert not list(tmp_path.iterdir())


def test_default_names():
    assert default_name(10**6) == "synth-1e6"
    assert default_name(250_000) == "synth-250000"
