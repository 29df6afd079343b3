"""Run folders (recbole_dppmg.runs): atomic creation, the newest finished run of a kind, one
record file (run.json) that still reads folders written before it."""

from __future__ import annotations

import json
import os
import threading

import pytest

from recbole_dppmg import runs
from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.runs import (
    RL_KINDS,
    RL_SECTION,
    RUN_META,
    TEXT_GEN,
    TEXT_KINDS,
    finished_runs,
    new_run_folder,
    newest_finished_run,
    read_run_meta,
    recorded_runs,
    rl_phases,
    rl_source,
    write_run_meta,
)
from recbole_dppmg.tokens.export import newest_stage1_checkpoint, newest_token_export


def _frozen_clock(monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "Jan-01-2030_00-00-00")


def test_new_run_folder_is_unique_within_one_second(tmp_path, monkeypatch):
    _frozen_clock(monkeypatch)
    made = [new_run_folder(tmp_path, "tiny", "TextGen") for _ in range(3)]
    assert [p.name for p in made] == [
        "TextGen-Jan-01-2030_00-00-00",
        "TextGen-Jan-01-2030_00-00-00-1",
        "TextGen-Jan-01-2030_00-00-00-2",
    ]
    assert all(p.is_dir() and p.parent == tmp_path / "tiny" for p in made)
    # stage 1 keeps its names: ~2, ~3 after the first
    stage1 = [new_run_folder(tmp_path, "tiny", "DPPMG", separator="~", first=2).name for _ in range(2)]
    assert stage1 == ["DPPMG-Jan-01-2030_00-00-00", "DPPMG-Jan-01-2030_00-00-00~2"]


def test_new_run_folder_never_hands_one_folder_to_two_callers(tmp_path, monkeypatch):
    _frozen_clock(monkeypatch)
    made, start = [], threading.Barrier(8)

    def claim():
        start.wait()
        made.append(new_run_folder(tmp_path, "tiny", "ImageGen"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8


def _run(root, name, files=(), mtime=None):
    run = root / "tiny" / name
    run.mkdir(parents=True)
    for rel in files:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("{}")
        if mtime is not None:
            os.utime(run / rel, (mtime, mtime))
    return run


def test_newest_finished_run_ignores_unfinished_ones(tmp_path):
    old = _run(tmp_path, "TextGen-a", [TEXT_GEN.done], mtime=1_000)
    new = _run(tmp_path, "TextGen-b", [TEXT_GEN.done], mtime=2_000)
    _run(tmp_path, "TextGen-c", ["warmup.json"], mtime=3_000)  # started later, never finished
    _run(tmp_path, "TextRL-d", [TEXT_GEN.done], mtime=4_000)  # another kind
    assert finished_runs(tmp_path, "tiny", TEXT_GEN) == [old, new]
    assert newest_finished_run(tmp_path, "tiny", TEXT_GEN) == new
    assert newest_finished_run(tmp_path, "other", TEXT_GEN) is None


def test_stage1_and_export_lookups_take_the_newest_finished_run(tmp_path):
    trained = _run(tmp_path, "DPPMG-a", ["best.pth", "tokens/manifest.json"], mtime=1_000)
    _run(tmp_path, "DPPMG-b", ["best.pth"], mtime=2_000)  # trained later, not exported
    _run(tmp_path, "DPPMG-c", ["config.json"], mtime=3_000)  # still training
    assert newest_token_export("tiny", tmp_path) == trained / "tokens"
    assert newest_stage1_checkpoint(tmp_path, "tiny") == tmp_path / "tiny" / "DPPMG-b" / "best.pth"
    with pytest.raises(CheckpointError, match="no trained DPPMG run"):
        newest_stage1_checkpoint(tmp_path, "other")


def test_run_json_records_the_kind_and_keeps_the_rl_section(tmp_path):
    run = tmp_path / "TextRL-x"
    run.mkdir()
    write_run_meta(run, "TextRL", {"dataset": "tiny", "tokens": "t"})
    write_run_meta(run, "TextRL", {"source_run": str(tmp_path / "TextGen-x"), "steps_done": 0}, RL_SECTION)
    write_run_meta(run, "TextRL", {"dataset": "tiny", "tokens": "t2"})  # the generator's part again
    stored = json.loads((run / RUN_META).read_text())
    assert stored["kind"] == "TextRL" and stored[RL_SECTION]["steps_done"] == 0
    assert read_run_meta(run, TEXT_KINDS) == {"dataset": "tiny", "tokens": "t2"}
    assert read_run_meta(run, RL_KINDS, RL_SECTION)["source_run"] == str(tmp_path / "TextGen-x")
    assert read_run_meta(run, ("ImageGen", "ImageRL")) is None  # a text run is no image run
    assert not (run / (RUN_META + ".tmp")).exists()


def test_legacy_record_files_are_still_read(tmp_path):
    text = _run(tmp_path, "TextGen-old", [])
    (text / "config.json").write_text(json.dumps({"dataset": "tiny", "tokens": "t", "text": {}}))
    image = _run(tmp_path, "ImageGen-old", [])
    (image / "image_config.json").write_text(json.dumps({"format": "f", "dataset": "tiny"}))
    rl = _run(tmp_path, "TextRL-old", [])
    (rl / "config.json").write_text(json.dumps({"dataset": "tiny", "tokens": "t"}))
    (rl / "rl_config.json").write_text(json.dumps({"source_run": str(text), "steps_done": 3}))
    assert read_run_meta(text, TEXT_KINDS)["tokens"] == "t"
    assert read_run_meta(image, ("ImageGen", "ImageRL"))["format"] == "f"
    assert read_run_meta(rl, RL_KINDS, RL_SECTION)["steps_done"] == 3
    assert read_run_meta(text, RL_KINDS, RL_SECTION) is None
    assert recorded_runs(tmp_path, "tiny", "TextRL", RL_SECTION) == [rl]
    assert rl_source(rl) == str(text.resolve()) and rl_phases(rl) == [rl]
    # the first write to an old folder (a resumed run) keeps what its old files held
    write_run_meta(rl, "TextRL", {**read_run_meta(rl, RL_KINDS, RL_SECTION), "steps_done": 5}, RL_SECTION)
    assert read_run_meta(rl, TEXT_KINDS) == {"dataset": "tiny", "tokens": "t"}
    assert read_run_meta(rl, RL_KINDS, RL_SECTION)["steps_done"] == 5


def test_rl_phases_follow_old_and_new_folders(tmp_path):
    warm = _run(tmp_path, "TextGen-w", [])
    first = _run(tmp_path, "TextRL-1", [])
    (first / "rl_config.json").write_text(json.dumps({"source_run": str(warm)}))
    second = _run(tmp_path, "TextRL-2", [])
    write_run_meta(second, "TextRL", {"source_run": str(first)}, RL_SECTION)
    assert rl_phases(second) == [first.resolve(), second]
    assert rl_source(rl_phases(second)[0]) == str(warm.resolve())
