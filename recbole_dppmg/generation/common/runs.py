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


# ---------------------------------------------------------------------------- final generators
# per modality: (warm-up prefix, RL prefix, the file a finished run has)
GENERATOR_RUNS = {"text": ("TextGen", "TextRL", "dppmg/text_generator.json"),
                  "image": ("ImageGen", "ImageRL", "model.safetensors")}


def _finished_runs(folder: Path, prefix: str, weights: str) -> list[Path]:
    """Runs ``<prefix>-*`` holding ``weights``, oldest weights first."""
    found = sorted(folder.glob(f"{prefix}-*/{weights}"), key=lambda path: path.stat().st_mtime)
    return [path.parents[len(Path(weights).parts) - 1] for path in found]


def _rl_finished(run: Path) -> bool:
    """All the run's RL steps done (``rl_config.json`` gets ``steps_done`` when training ends)."""
    path = run / "rl_config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return int(saved.get("steps_done", -1)) >= int((saved.get("rl") or {}).get("steps", 0))


def final_generator(dataset: str, modality: str, root: Path) -> Path | None:
    """The generator ``--stage generate`` uses by default: the newest finished warm-up run of
    ``modality`` ("text" or "image") under ``root/<dataset>``, then, phase by phase, the newest
    finished RL run made from it (``source_run``), i.e. the last finished phase of its RL chain;
    the warm-up itself when no RL run from it finished; None when no warm-up run finished."""
    warmup_prefix, rl_prefix, weights = GENERATOR_RUNS[modality]
    warmups = _finished_runs(Path(root) / dataset, warmup_prefix, weights)
    if not warmups:
        return None
    rl_runs = [run for run in _finished_runs(Path(root) / dataset, rl_prefix, weights) if _rl_finished(run)]
    run, seen = warmups[-1], set()
    while run not in seen:
        seen.add(run)
        children = [child for child in rl_runs if rl_source(child) == str(run.resolve())]
        if not children:
            break
        run = children[-1]
    return run
