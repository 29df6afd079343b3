"""The text generation benchmark runs on a tiny model built from config (no downloads)."""

import subprocess
import sys

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
