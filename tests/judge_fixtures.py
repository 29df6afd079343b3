"""A tiny trained DPPMG and its token export (real format, with item encoders), for the tests
of the judge and of the evaluation report. Seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

from tiny_mm import write_tiny_mm

TINY_DPPMG = {
    "state": "ERROR",
    "show_progress": False,
    "epochs": 8,
    "torch_num_threads": 1,
    "load_col": {"inter": ["user_id", "item_id"], "item": ["item_id", "text_feat", "image_feat", "text_mask", "image_mask"]},
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


def tiny_export(root: Path, **overrides) -> tuple[Path, Path]:
    """``(token export folder, dataset root)``: ``root/data/tiny/tiny.{inter,item}`` and a
    DPPMG trained on it, exported."""
    from recbole_dppmg.quick_start import run
    from recbole_dppmg.tokens.export import export_tokens

    data = write_tiny_mm(root / "data")
    settings = dict(TINY_DPPMG, data_path=str(data), checkpoint_dir=str(root / "saved"), **overrides)
    result = run("DPPMG", "tiny", config_dict=settings)
    return export_tokens(result.checkpoint, config_dict=settings, interpret=False), data
