"""A tiny multimodal RecBole atomic dataset for the model tests (seconds to load, no encoders).

Items fall into a few clusters; a user mostly interacts with one cluster, and an item's text
and image features are noisy copies of its cluster centre, so features carry preference.
Every fifth item has no image (mask 0, zero feature), as in ml-100k-mm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_dppmg.model.config_check import model_defaults
from recbole_dppmg.model.quantizer import ResidualVectorQuantizer
from recbole_dppmg.paths import PROPERTIES_DIR

TEXT_DIM, IMAGE_DIM = 8, 6


def write_tiny_mm(
    root: Path,
    name: str = "tiny",
    n_users: int = 40,
    n_items: int = 48,
    per_user: int = 10,
    clusters: int = 4,
    seed: int = 0,
    item_columns=("text_feat", "image_feat", "text_mask", "image_mask"),
    text_dim: int = TEXT_DIM,
    image_dim: int = IMAGE_DIM,
) -> Path:
    """Write ``root/name/name.inter`` and ``name.item``; returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    item_cluster = np.arange(n_items) % clusters
    with open(folder / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(n_users):
            own = np.flatnonzero(item_cluster == u % clusters)
            other = np.flatnonzero(item_cluster != u % clusters)
            n_own = min(len(own), per_user - 2)
            items = np.concatenate(
                [rng.choice(own, n_own, replace=False), rng.choice(other, per_user - n_own, replace=False)]
            )
            for t, i in enumerate(items):
                f.write(f"u{u}\ti{i}\t5\t{t}\n")
    text_centres = rng.normal(size=(clusters, text_dim))
    image_centres = rng.random(size=(clusters, image_dim)) * 3
    types = {"text_feat": "float_seq", "image_feat": "float_seq", "text_mask": "float", "image_mask": "float"}
    with open(folder / f"{name}.item", "w") as f:
        f.write("\t".join(["item_id:token"] + [f"{c}:{types[c]}" for c in item_columns]) + "\n")
        for i in range(n_items):
            has_image = i % 5 != 0
            text = text_centres[item_cluster[i]] + 0.3 * rng.normal(size=text_dim)
            image = image_centres[item_cluster[i]] + 0.3 * rng.random(size=image_dim)
            values = {
                "text_feat": " ".join(f"{v:.5f}" for v in text),
                "image_feat": " ".join(f"{v:.5f}" for v in image) if has_image else " ".join(["0"] * image_dim),
                "text_mask": "1",
                "image_mask": "1" if has_image else "0",
            }
            f.write("\t".join([f"i{i}"] + [values[c] for c in item_columns]) + "\n")
    return root


def yaml_quantizer(**kwargs) -> ResidualVectorQuantizer:
    """A quantizer with properties/model/DPPMG.yaml's settings for the keys ``kwargs`` leaves out."""
    defaults = model_defaults("DPPMG")
    keys = ("commitment_beta", "ema_decay", "dead_code_threshold")
    return ResidualVectorQuantizer(**{**{key: defaults[key] for key in keys}, **kwargs})


# RecBole settings of a tiny DPPMG run through quick_start.run (token export, judge and report tests).
TINY_RUN = {
    "state": "ERROR",
    "show_progress": False,
    "epochs": 3,
    "torch_num_threads": 1,
    "load_col": {
        "inter": ["user_id", "item_id"],
        "item": ["item_id", "text_feat", "image_feat", "text_mask", "image_mask"],
    },
    "text_feature_field": "text_feat",
    "image_feature_field": "image_feat",
    "text_mask_field": "text_mask",
    "image_mask_field": "image_mask",
    "metrics": ["Recall", "NDCG"],
    "topk": [5],
    "valid_metric": "NDCG@5",
    "train_batch_size": 64,
    "learning_rate": 0.01,
    "embedding_size": 8,
    "levels": 2,
    "codebook_size": 4,
    "modalities": ["text", "image"],  # pinned: the tests do not follow the property file's channels
}


def tiny_config(model_class, root: Path, name: str = "tiny", **overrides) -> Config:
    """RecBole Config for ``model_class`` on the tiny dataset: the model's property file plus
    small sizes and the project's evaluation protocol (8/1/1 random split, full ranking)."""
    values = {
        "data_path": str(root),
        "use_gpu": False,
        "seed": 0,
        "reproducibility": True,
        "state": "ERROR",
        "show_progress": False,
        "load_col": {
            "inter": ["user_id", "item_id"],
            "item": ["item_id", "text_feat", "image_feat", "text_mask", "image_mask"],
        },
        "text_feature_field": "text_feat",
        "image_feature_field": "image_feat",
        "text_mask_field": "text_mask",
        "image_mask_field": "image_mask",
        "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
        "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "group_by": "user", "order": "RO", "mode": "full"},
        "metrics": ["Recall", "NDCG"],
        "topk": [5],
        "valid_metric": "NDCG@5",
        "train_batch_size": 64,
        "eval_batch_size": 100000,
        "learning_rate": 0.01,
        "embedding_size": 8,
        "content_embedding_size": 8,
        "levels": 2,
        "codebook_size": 4,
        "modalities": ["text", "image"],  # the feature channels (the id channel is tested on its own)
    }
    values.update(overrides)
    files = [str(PROPERTIES_DIR / "model" / f"{model_class.__name__}.yaml")]
    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config parses --key=value from argv
    try:
        return Config(model=model_class, dataset=name, config_file_list=files, config_dict=values)
    finally:
        sys.argv = argv


def tiny_data(model_class, root: Path, name: str = "tiny", **overrides):
    """``(config, train_data, valid_data, test_data)`` for the tiny dataset."""
    config = tiny_config(model_class, root, name, **overrides)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return config, train_data, valid_data, test_data


def build_model(model_class, data, **overrides):
    """A fresh ``model_class`` on ``data`` (from ``tiny_data``) with config overrides for this
    model only; the shared config is restored afterwards."""
    config, train_data, _, _ = data
    saved = {key: config[key] for key in overrides}
    for key, value in overrides.items():
        config[key] = value
    try:
        init_seed(overrides.get("seed", 0), True)
        return model_class(config, train_data.dataset)
    finally:
        for key, value in saved.items():
            config[key] = value
