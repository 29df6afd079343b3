"""Run folders of stage 2: where they are, how they chain.

An RL run records the run it started from (``source_run``), so a chain of phases can be
followed back to its generator."""

from __future__ import annotations

import json
from pathlib import Path


def rl_source(run: Path) -> str | None:
    path = run / "rl_config.json"
    return str(Path(json.loads(path.read_text())["source_run"]).resolve()) if path.is_file() else None


def rl_phases(run) -> list[Path]:
    """The RL runs that led to ``run``, first phase first (``rl.<modality>.then`` starts each
    later phase from the one before); ``[run]`` when RL ran in one phase."""
    chain, seen = [Path(run)], set()
    source = rl_source(chain[0])
    while source is not None and (Path(source) / "rl_config.json").is_file() and source not in seen:
        seen.add(source)
        chain.insert(0, Path(source))
        source = rl_source(chain[0])
    return chain
