"""Run folders of every stage: how one is made, which ones are finished, what a run records.

A run is a folder ``<root>/<dataset>/<Kind>-<time>[-k]`` (``DPPMG-...``, ``TextGen-...``,
``ImageRL-...``, ``Report-...``). A kind says what a *finished* run holds (:class:`RunKind`);
runs of a kind are ordered by that file's modification time, so "the newest finished run"
means the same thing for every stage.

Generator runs (``TextGen``, ``TextRL``, ``ImageGen``, ``ImageRL``) record their settings in
one file, ``run.json``: ``{"kind": <Kind>, ...}``. An RL run also carries the generator it
produced, so its own record (source run, partner, user pool, RL settings) sits under
``"rl_run"`` beside the generator's. Stage-1 runs keep RecBole's ``config.json`` /
``result.json`` (``results.RunResult`` and RecBole's tooling read them), and a token export
keeps ``tokens/manifest.json`` (the export contract of DESIGN.md).

This module sits below every layer (it imports nothing of the project but errors and paths):
stage 1, the token export and stage 2 all find runs through it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

STAMP_FORMAT = "%b-%d-%Y_%H-%M-%S"  # RecBole's get_local_time(), used by every stage
RUN_META = "run.json"
RL_SECTION = "rl_run"
SECTIONS = (RL_SECTION,)

# Folders written before run.json recorded a kind's settings in its own file (and an RL run's
# record in rl_config.json); they are still read, run.json winning where both exist.
LEGACY_META = {
    "TextGen": "config.json",
    "TextRL": "config.json",
    "ImageGen": "image_config.json",
    "ImageRL": "image_config.json",
}
LEGACY_SECTIONS = {RL_SECTION: "rl_config.json"}
TEXT_KINDS, IMAGE_KINDS, RL_KINDS = ("TextGen", "TextRL"), ("ImageGen", "ImageRL"), ("TextRL", "ImageRL")


@dataclass(frozen=True)
class RunKind:
    """Runs ``<name>-*`` whose finished ones hold ``done`` (a path inside the run folder)."""

    name: str
    done: str


DPPMG_RUN = RunKind("DPPMG", "best.pth")  # stage 1, a best epoch saved
DPPMG_RESULT = RunKind("DPPMG", "result.json")  # stage 1, trained and tested
TOKEN_EXPORT = RunKind("DPPMG", "tokens/manifest.json")  # stage 1 run with its token export
TEXT_GEN = RunKind("TextGen", "dppmg/text_generator.json")  # text warm-up, adapter saved
TEXT_RL = RunKind("TextRL", "dppmg/text_generator.json")
IMAGE_GEN = RunKind("ImageGen", "model.safetensors")  # image generator, EMA weights saved
IMAGE_RL = RunKind("ImageRL", "model.safetensors")
PIPELINE_REPORT = RunKind("Pipeline", "report/report.json")  # --stage all, its report written
REPORT = RunKind("Report", "report/report.json")  # --stage report


# ---------------------------------------------------------------------------- creating
def new_run_folder(root: str | Path, dataset: str, kind: str, separator: str = "-", first: int = 1) -> Path:
    """Create and return ``<root>/<dataset>/<kind>-<time>``; when that exists (another run, or
    another process, started in the same second) ``...<separator><k>`` for k = first, first+1...
    ``mkdir`` without ``exist_ok`` makes the claim atomic: no two callers get one folder."""
    stamp = time.strftime(STAMP_FORMAT)
    parent = Path(root) / dataset
    parent.mkdir(parents=True, exist_ok=True)
    folder, k = parent / f"{kind}-{stamp}", first
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            folder, k = parent / f"{kind}-{stamp}{separator}{k}", k + 1


# ---------------------------------------------------------------------------- finding
def _marked_runs(root: str | Path, dataset: str, name: str, marker) -> list[Path]:
    """Runs ``<name>-*`` holding a file ``marker(run)`` gives, oldest first by its time."""
    found = []
    for run in (Path(root) / dataset).glob(f"{name}-*"):
        path = marker(run)
        if path is not None and path.is_file():
            found.append((path.stat().st_mtime, run))
    return [run for _, run in sorted(found, key=lambda item: item[0])]


def finished_runs(root: str | Path, dataset: str, kind: RunKind) -> list[Path]:
    """The finished runs of ``kind`` under ``<root>/<dataset>``, oldest first."""
    return _marked_runs(root, dataset, kind.name, lambda run: run / kind.done)


def newest_finished_run(root: str | Path, dataset: str, kind: RunKind) -> Path | None:
    """The newest finished run of ``kind``, None when there is none."""
    runs = finished_runs(root, dataset, kind)
    return runs[-1] if runs else None


def recorded_runs(root: str | Path, dataset: str, kind: str, section: str | None = None) -> list[Path]:
    """Generator runs of ``kind`` that recorded their settings (``section`` of them), newest
    first by when the record was last written: the candidates a resumable stage checks."""
    return _marked_runs(root, dataset, kind, lambda run: meta_path(run, (kind,), section))[::-1]


# ---------------------------------------------------------------------------- recording
def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def meta_path(run: str | Path, kinds, section: str | None = None) -> Path | None:
    """The file that holds the record of ``run`` as one of ``kinds`` (``section`` of it), or None."""
    run = Path(run)
    path = run / RUN_META
    if path.is_file():
        data = _read(path)
        return path if data.get("kind") in kinds and (section is None or section in data) else None
    legacy = LEGACY_SECTIONS[section] if section else next((LEGACY_META[k] for k in kinds if k in LEGACY_META), None)
    return run / legacy if legacy and (run / legacy).is_file() else None


def read_run_meta(run: str | Path, kinds, section: str | None = None) -> dict | None:
    """What ``run`` recorded as one of ``kinds`` (without the ``kind`` key and the sections), or
    its ``section``; None when it recorded nothing of the sort."""
    path = meta_path(run, kinds, section)
    if path is None:
        return None
    data = _read(path)
    if path.name != RUN_META:
        return data
    if section:
        return data[section]
    return {k: v for k, v in data.items() if k != "kind" and k not in SECTIONS}


def _legacy_record(run: Path, kind: str) -> dict:
    """A folder from before ``run.json`` as one record, so that resuming it keeps what it had."""
    record = {}
    if kind in LEGACY_META and (run / LEGACY_META[kind]).is_file():
        record = _read(run / LEGACY_META[kind])
    for section, name in LEGACY_SECTIONS.items():
        if kind in RL_KINDS and (run / name).is_file():
            record[section] = _read(run / name)
    return record


def write_run_meta(run: str | Path, kind: str, meta: dict, section: str | None = None) -> None:
    """Record ``meta`` in ``run/run.json`` (as its ``section``; the other part is kept),
    written to a temporary file and renamed."""
    path = Path(run) / RUN_META
    old = _read(path) if path.is_file() else _legacy_record(Path(run), kind)
    if section:
        data = {**old, "kind": kind, section: meta}
    else:
        data = {"kind": kind, **meta, **{k: old[k] for k in SECTIONS if k in old}}
    tmp = path.with_name(RUN_META + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_kind(run: str | Path) -> str | None:
    """The kind a generator run recorded, None for folders from before ``run.json``."""
    path = Path(run) / RUN_META
    return _read(path).get("kind") if path.is_file() else None


# ---------------------------------------------------------------------------- RL chains
def rl_source(run: str | Path) -> str | None:
    """The run an RL run started from (resolved), None when ``run`` is no RL run."""
    record = read_run_meta(run, RL_KINDS, RL_SECTION)
    return str(Path(record["source_run"]).resolve()) if record is not None else None


def rl_phases(run) -> list[Path]:
    """The RL runs that led to ``run``, first phase first (``rl.<modality>.then`` starts each
    later phase from the one before); ``[run]`` when RL ran in one phase."""
    chain, seen = [Path(run)], set()
    source = rl_source(chain[0])
    while source is not None and meta_path(source, RL_KINDS, RL_SECTION) is not None and source not in seen:
        seen.add(source)
        chain.insert(0, Path(source))
        source = rl_source(chain[0])
    return chain


# ---------------------------------------------------------------------------- final generators
GENERATOR_KINDS = {"text": (TEXT_GEN, TEXT_RL), "image": (IMAGE_GEN, IMAGE_RL)}


def rl_finished(run: str | Path) -> bool:
    """All of an RL run's steps done (its record gets ``steps_done`` when training ends)."""
    record = read_run_meta(run, RL_KINDS, RL_SECTION) or {}
    return int(record.get("steps_done", -1)) >= int((record.get("rl") or {}).get("steps", 0))


def final_generator(dataset: str, modality: str, root: str | Path) -> Path | None:
    """The generator ``--stage generate`` uses by default: the newest finished warm-up run of
    ``modality`` ("text" or "image"), then, phase by phase, the newest finished RL run made from
    it (``source_run``), i.e. the last finished phase of its RL chain; the warm-up itself when
    no RL run from it finished; None when no warm-up run finished."""
    warmup_kind, rl_kind = GENERATOR_KINDS[modality]
    warmups = finished_runs(root, dataset, warmup_kind)
    if not warmups:
        return None
    rl_runs = [run for run in finished_runs(root, dataset, rl_kind) if rl_finished(run)]
    run, seen = warmups[-1], set()
    while run not in seen:
        seen.add(run)
        children = [child for child in rl_runs if rl_source(child) == str(run.resolve())]
        if not children:
            break
        run = children[-1]
    return run
