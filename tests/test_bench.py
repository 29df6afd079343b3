"""Benchmarks are not tests; this only checks that each bench script runs on a tiny size."""

import subprocess
import sys

from recbole_dppmg.paths import REPO_ROOT


def _run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_tokens_runs_tiny():
    out = _run("bench/bench_tokens.py", "--vectors", "2000", "--repeats", "1", "--threads", "1")
    assert "faiss speed-up" in out


def test_parity_bench_runs_tiny():
    out = _run("bench/parity_recbole.py", "-m", "Pop", "--epochs", "1")
    assert "| Pop | plugin | 1 |" in out and "True |" in out


def test_bench_stage1_runs_tiny(tmp_path):
    out = _run(
        "bench/bench_stage1.py",
        "-d",
        "synth-3000",
        "--repeats",
        "1",
        "--max-batches",
        "1",
        "--max-eval-batches",
        "3",
        "--train-batch-size",
        "256",
        "--eval-batch-size",
        "2000",
        "--data-root",
        str(tmp_path),
    )
    assert "| synth-3000 | 3,000 | DPPMG | text+image+id |" in out and "| synth-3000 | 3,000 | LightGCN | id |" in out
    assert "1 of 10 batches, scaled" in out and "3 of 4 batches, scaled" in out


def test_bench_stage1_scale_table_tiny(tmp_path):
    out = _run(
        "bench/bench_stage1.py",
        "--scale",
        "2000,4000",
        "--full-below",
        "3000",
        "--repeats",
        "1",
        "--max-batches",
        "1",
        "--max-eval-batches",
        "3",
        "--train-batch-size",
        "256",
        "--eval-batch-size",
        "2000",
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "out"),
    )
    assert "Growth exponent" in out and "| 4,000 | 200 | 50 | DPPMG |" in out
    assert {"scale.md", "scale.csv", "scale.json", "scale.png"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_synthetic_cli_runs_tiny(tmp_path):
    out = _run(
        "bench/synthetic.py",
        "--interactions",
        "2e3",
        "--users",
        "100",
        "--text-dim",
        "4",
        "--image-dim",
        "3",
        "--root",
        str(tmp_path),
    )
    assert f"dataset: {tmp_path / 'synth-2000'}" in out and '"interactions": 2000' in out


def test_bench_ddp_runs_tiny(tmp_path):
    from recbole_dppmg.data.synthetic import SyntheticSpec, write_synthetic

    folder = write_synthetic(
        SyntheticSpec(interactions=2000, users=100, items=60, text_dim=4, image_dim=3, clusters=3), tmp_path, "tiny"
    )
    out = _run(
        "bench/bench_ddp.py",
        "-d",
        "tiny",
        "--nproc",
        "1,2",
        "--epochs",
        "1",
        "--data-path",
        str(tmp_path),
        "--config_files",
        str(folder / "tiny.yaml"),
        "--embedding_size=8",
        "--codebook_size=4",
    )
    assert "| 1 |" in out and "| 2 |" in out and "speed-up" in out


def test_bench_stage1_profile_runs_tiny(tmp_path):
    out = _run(
        "bench/bench_stage1.py",
        "-d",
        "synth-3000",
        "--models",
        "DPPMG",
        "--profile",
        "1",
        "--train-batch-size",
        "256",
        "--data-root",
        str(tmp_path),
    )
    assert "DPPMG on synth-3000:" in out and "| own time % |" in out
