"""A tiny trained DPPMG and its token export (real format, with item encoders), for the tests
of the judge and of the evaluation report. Seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

from tiny_mm import TINY_RUN, write_tiny_mm

TINY_DPPMG = {**TINY_RUN, "epochs": 8}


def tiny_export(root: Path, **overrides) -> tuple[Path, Path]:
    """``(token export folder, dataset root)``: ``root/data/tiny/tiny.{inter,item}`` and a
    DPPMG trained on it, exported."""
    from recbole_dppmg.quick_start import run
    from recbole_dppmg.tokens.export import export_tokens

    data = write_tiny_mm(root / "data")
    settings = dict(TINY_DPPMG, data_path=str(data), checkpoint_dir=str(root / "saved"), **overrides)
    result = run("DPPMG", "tiny", config_dict=settings)
    return export_tokens(result.checkpoint, config_dict=settings, interpret=False), data
