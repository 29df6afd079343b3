"""The result of one stage-1 training run: what the tables, plots and comparisons read.

Kept apart from ``quick_start`` (which trains) so the tables and plots below it need no
training code."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from recbole_dppmg.errors import DataError


@dataclass
class RunResult:
    """What one training run produced; the row of a comparison table."""

    model: str
    dataset: str
    best_valid_score: float
    best_valid_result: dict
    test_result: dict
    epochs_trained: int
    seconds_per_epoch: float
    peak_memory_mb: float
    run_dir: str
    checkpoint: str
    extra: dict = field(default_factory=dict)
    seed: int = 0
    label: str = ""  # the ablation variant, empty for a plain run

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunResult":
        """The result of a finished run folder (its ``result.json``; the seed from
        ``config.json`` for folders written before results recorded it)."""
        run_dir = Path(run_dir)
        path = run_dir / "result.json"
        if not path.is_file():
            raise DataError(f"{run_dir} is not a finished run folder: no result.json")
        values = json.loads(path.read_text())
        config_path = run_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        values.setdefault("seed", config.get("seed", 0))
        extra = values.get("extra") or {}
        if "code_stats" in extra and "quantizer" not in extra:  # DPPMG runs before it was recorded
            extra["quantizer"] = {k: config.get(k) for k in ("modalities", "levels", "codebook_size")}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
