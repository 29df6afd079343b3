"""The text generation benchmark runs on a tiny model built from config (no downloads)."""

import json
import subprocess
import sys

import pytest

from recbole_dppmg.paths import REPO_ROOT


def test_bench_text_runs_tiny():
    proc = subprocess.run(
        [
            sys.executable,
            "bench/bench_text.py",
            "--backbone",
            "tiny",
            "--users",
            "4",
            "--batch-sizes",
            "1,4",
            "--new-tokens",
            "3",
            "--threads",
            "1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 4 |" in proc.stdout and "new tokens/s" in proc.stdout


def _condition(folder, history, finished=True):
    folder.mkdir(parents=True)
    (folder.parent / "run.json").write_text(json.dumps({"kind": "TextGen", "text": {"seed": 1, "prefix_tokens": 9}}))
    records = [{"step": s, "valid_loss": v, "valid_gap": g, "train_loss": None} for s, v, g in history]
    if finished:
        (folder / "history.json").write_text(json.dumps(records))
    else:
        (folder / "checkpoint").mkdir()
        (folder / "checkpoint" / "state.json").write_text(json.dumps({"step": history[-1][0], "history": records}))


def test_bench_text_warmup_collects_finished_and_running_curves(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bench_text_warmup

    from recbole_dppmg.errors import CheckpointError

    _condition(tmp_path / "A" / "dppmg", [(0, 4.0, 0.0), (50, 3.5, 0.02)])
    _condition(tmp_path / "B" / "dppmg", [(0, 4.1, 0.0)], finished=False)
    out = bench_text_warmup.main(
        [
            "--curve",
            f"done={tmp_path / 'A' / 'dppmg'}",
            "--curve",
            f"running={tmp_path / 'B' / 'dppmg'}",
            "--out",
            str(tmp_path / "c.json"),
        ]
    )
    curves = json.loads(out.read_text())["curves"]
    assert curves["done"]["finished"] and not curves["running"]["finished"]
    assert [h["valid_gap"] for h in curves["done"]["history"]] == [0.0, 0.02]
    assert curves["done"]["settings"]["prefix_tokens"] == 9 and (tmp_path / "c.png").stat().st_size > 0
    with pytest.raises(CheckpointError, match="holds no warm-up history"):
        bench_text_warmup.main(["--curve", f"x={tmp_path}", "--out", str(tmp_path / "d.json")])
