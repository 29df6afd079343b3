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
