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


def _report(folder, users, texts):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"dataset": "toy", "split": "test", "users": users, "runs": {}}))
    lines = [json.dumps({"user": u, **{f"{c}/seed0": t[k] for c, t in texts.items()}}) for k, u in enumerate(users)]
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_text_examples_shows_the_first_users_in_report_order(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import text_examples

    from recbole_dppmg.errors import CheckpointError

    users = ["9", "3", "7"]
    report = _report(tmp_path / "report", users, {"dppmg": ["a|b", "c\nd", "e"], "history": ["x", "y", "z"]})
    meta, rows = text_examples.read_samples(report)
    table = text_examples.example_table(
        meta, rows, lambda u: f"liked {u}", lambda u: f"next {u}", ["dppmg", "history"], seed=0, users=2
    )
    body = [line for line in table.splitlines() if line.startswith("| 9") or line.startswith("| 3")]
    assert body == ["| 9 | liked 9 | next 9 | a\\|b | x |", "| 3 | liked 3 | next 3 | c d | y |"]
    assert "| 7" not in table and "first 2 test users" in table
    with pytest.raises(CheckpointError, match="no texts of population"):
        text_examples.example_table(meta, rows, str, str, ["population"], seed=0, users=2)
    (report / "samples.jsonl").write_text(json.dumps({"user": "3"}) + "\n")
    with pytest.raises(CheckpointError, match="does not list the users"):
        text_examples.read_samples(report)
    with pytest.raises(CheckpointError, match="report.json is missing"):
        text_examples.read_samples(tmp_path)
