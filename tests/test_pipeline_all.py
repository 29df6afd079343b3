"""``--stage all``: which stage outputs count as already there and valid, the pipeline record,
RL missing, and the profiles (every key of the shipped profiles is a known setting)."""

import json
import shutil
import time
from pathlib import Path

import pytest
from judge_fixtures import TINY_DPPMG
from tiny_mm import write_tiny_mm

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.generation.image.train import image_settings
from recbole_dppmg.generation.report.build import EvaluatedRuns, evaluate_config
from recbole_dppmg.generation.reward.judge import reward_config
from recbole_dppmg.generation.text.config import text_config
from recbole_dppmg.pipeline import (
    PROFILES_DIR,
    STAGES,
    Pipeline,
    load_profile,
    valid_image_run,
    valid_report,
    valid_rl_run,
    valid_text_run,
)


@pytest.fixture
def tiny_pipeline(tmp_path):
    data = write_tiny_mm(tmp_path / "data")
    overrides = dict(TINY_DPPMG, data_path=str(data), checkpoint_dir=str(tmp_path / "saved"), epochs=2)
    return lambda **kw: Pipeline("tiny", None, (), overrides, root=tmp_path / "saved", **kw)


def _stages(folder):
    return {s["stage"]: s for s in json.loads((folder / "pipeline.json").read_text())["stages"]}


def test_second_run_skips_stage1_and_a_changed_setting_retrains(tiny_pipeline, tmp_path):
    first = _stages(tiny_pipeline().run(until="export"))
    assert list(first) == ["prepare", "train", "export"]
    assert first["prepare"]["status"] == "skipped" and "plain RecBole dataset" in first["prepare"]["note"]
    assert first["train"]["status"] == "ran" and first["export"]["status"] == "ran" and first["train"]["seconds"] >= 0
    second = _stages(tiny_pipeline().run(until="export"))
    assert second["train"]["status"] == "skipped" and second["export"]["status"] == "skipped"
    assert second["export"]["output"] == first["export"]["output"]
    assert len(list((tmp_path / "saved" / "tiny").glob("DPPMG-*"))) == 1

    # another setting: a new run; another build of the dataset: the old export is not valid
    changed = tiny_pipeline()
    changed.overrides["learning_rate"] = 0.02
    assert _stages(changed.run(until="train"))["train"]["status"] == "ran"
    with open(tmp_path / "data" / "tiny" / "tiny.inter", "a") as f:
        f.write("u0\ti47\t5\t99\n")
    assert _stages(tiny_pipeline().run(until="train"))["train"]["status"] == "ran"


def _text_run(root, name, tokens, cfg, finished=True):
    run = root / "tiny" / name
    (run / "dppmg").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dataset": "tiny", "tokens": str(tokens), "text": cfg}))
    if finished:
        (run / "warmup.json").write_text("{}")
        (run / "dppmg" / "text_generator.json").write_text("{}")
    return run


def test_generator_runs_count_only_with_the_same_export_and_settings(tmp_path):
    root, tokens = tmp_path / "saved", tmp_path / "tokens"
    tokens.mkdir()
    cfg = text_config({"max_steps": 5})
    run = _text_run(root, "TextGen-a", tokens, cfg)
    assert valid_text_run("tiny", tokens, cfg, root) == (run, True)
    assert valid_text_run("tiny", tokens, {**cfg, "num_threads": 2, "progress": False}, root) == (run, True)  # runtime keys
    assert valid_text_run("tiny", tokens, {**cfg, "max_steps": 6}, root) == (None, False)
    assert valid_text_run("tiny", tmp_path / "other-tokens", cfg, root) == (None, False)
    time.sleep(0.01)
    unfinished = _text_run(root, "TextGen-b", tokens, cfg, finished=False)
    assert valid_text_run("tiny", tokens, cfg, root) == (unfinished, False)  # resumed by the pipeline

    settings = image_settings({"max_steps": 10})
    image = root / "tiny" / "ImageGen-a"
    image.mkdir(parents=True)
    meta = {"tokens_folder": str(tokens), "model": {k: settings[k] for k in ("space", "height", "width", "unet_channels", "layers_per_block",
            "attention_head_dim", "cross_attention_dim", "norm_num_groups", "train_timesteps", "beta_schedule", "prediction_type")},
            "train": {k: v for k, v in settings.items() if k not in ("space", "height", "width", "unet_channels", "layers_per_block",
            "attention_head_dim", "cross_attention_dim", "norm_num_groups", "train_timesteps", "beta_schedule", "prediction_type")},
            "trained_steps": 10}
    (image / "image_config.json").write_text(json.dumps(meta))
    assert valid_image_run("tiny", tokens, settings, root) == (image, True)
    assert valid_image_run("tiny", tokens, {**settings, "max_minutes": 1.0}, root) == (image, True)
    assert valid_image_run("tiny", tokens, {**settings, "learning_rate": 1.0}, root) == (None, False)
    (image / "image_config.json").write_text(json.dumps({**meta, "trained_steps": 4}))
    assert valid_image_run("tiny", tokens, settings, root) == (image, False)

    rl = root / "tiny" / "TextRL-a"
    rl.mkdir()
    rl_cfg = {"steps": 8, "learning_rate": 0.002, "max_minutes": 2.0, "partner": "x"}
    (rl / "rl_config.json").write_text(json.dumps({"source_run": str(run), "partner_run": str(image), "rl": rl_cfg, "steps_done": 8}))
    assert valid_rl_run("tiny", "TextRL", run, {**rl_cfg, "max_minutes": 9.0}, root, partner=image) == (rl, True)
    assert valid_rl_run("tiny", "TextRL", run, rl_cfg, root, partner=tmp_path / "another-image-run") == (None, False)
    assert valid_rl_run("tiny", "TextRL", unfinished, rl_cfg, root) == (None, False)
    assert valid_rl_run("tiny", "TextRL", run, {**rl_cfg, "steps": 9}, root) == (None, False)


def test_a_report_counts_only_for_the_same_runs_settings_and_weights(tmp_path):
    root = tmp_path / "saved"
    text = _text_run(root, "TextGen-a", tmp_path, {})
    runs = EvaluatedRuns(str(tmp_path), str(text), str(tmp_path / "image"), None, None, ["u1", "u2"])
    cfg, reward = evaluate_config({"users": 4}), reward_config()
    report = root / "tiny" / "Report-a" / "report"
    report.mkdir(parents=True)
    (report / "report.json").write_text(json.dumps({"runs": runs.__dict__, "evaluate": {**cfg, "progress": False}, "reward": reward}))
    assert valid_report("tiny", runs, cfg, reward, root) == report
    assert valid_report("tiny", runs, {**cfg, "users": 5}, reward, root) is None
    assert valid_report("tiny", runs, cfg, {**reward, "consistency_weight": 2.0}, root) is None
    time.sleep(0.01)
    (text / "dppmg" / "adapter.safetensors").write_text("newer weights")  # e.g. a resumed run
    assert valid_report("tiny", runs, cfg, reward, root) is None


def test_until_and_profiles(tiny_pipeline):
    with pytest.raises(ConfigError, match="--until must be one of prepare, train"):
        tiny_pipeline().run(until="deploy")
    with pytest.raises(ConfigError, match="unknown profile 'tiny-typo'.*known: full, quick"):
        load_profile("tiny-typo")
    assert STAGES[-1] == "evaluate" and load_profile("full")["text"] == {}


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_shipped_profiles_hold_only_known_settings(profile):
    from recbole_dppmg.generation.image.train import load_image_config
    from recbole_dppmg.generation.rl.common import rl_config

    sections = load_profile(profile)
    text_config(sections["text"])
    load_image_config(sections["image"])
    evaluate_config(sections["evaluate"])
    reward_config(sections["reward"])
    for modality in ("text", "image"):
        rl_config(modality, sections["rl"].get(modality), bool(sections["rl"].get("quick")))
    assert set(sections["rl"]) <= {"quick", "text", "image"}


def test_rl_in_two_phases_starts_the_second_from_the_first(tiny_pipeline, monkeypatch, tmp_path):
    """rl.text.then: the second phase is a new run from the first one's result; a re-run skips both."""
    from recbole_dppmg.generation.rl import text as rl_text

    calls = []

    def fake_train(dataset, source, judge, overrides, quick):
        run = tmp_path / "saved" / "tiny" / f"TextRL-{len(calls)}"
        run.mkdir(parents=True)
        cfg = rl_text.rl_config("text", overrides, quick)
        calls.append((Path(source).name, cfg["advantage_scale"], cfg["then"]))
        (run / "rl_config.json").write_text(json.dumps({"source_run": str(source), "partner_run": overrides["partner"], "rl": cfg,
                                                         "steps_done": cfg["steps"] - stopped_early}))
        return run

    def two_phase_pipeline():
        pipeline = tiny_pipeline()
        pipeline.sections["rl"] = {"text": {"steps": 2, "then": {"advantage_scale": "component"}}}
        pipeline.outputs.update(text=str(tmp_path / "TextGen-x"), image=str(tmp_path / "ImageGen-x"), export="e", judge=object())
        return pipeline

    monkeypatch.setattr(rl_text, "train_text_rl", fake_train)
    stopped_early = 1  # the first phase stops by max_minutes: the second waits for it
    pipeline = two_phase_pipeline()
    status, output, note = pipeline._rl_text()
    assert len(calls) == 1 and output.name == "TextRL-0" and "stopped before its last step" in note
    calls.clear()
    shutil.rmtree(tmp_path / "saved" / "tiny" / "TextRL-0")
    stopped_early = 0
    pipeline = two_phase_pipeline()
    status, output, _ = pipeline._rl_text()
    assert calls == [("TextGen-x", "group", {"advantage_scale": "component"}), ("TextRL-0", "component", None)]
    assert status == "ran" and output.name == "TextRL-1" and pipeline.outputs["text_rl"] == output
    status, output, note = pipeline._rl_text()
    assert status == "skipped" and output.name == "TextRL-1" and len(calls) == 2 and "finished text RL run" in note


def test_rl_phase_settings_are_checked():
    from recbole_dppmg.generation.rl.common import next_phase, rl_config

    with pytest.raises(ConfigError, match="unknown RL setting rl.text.then.stepz"):
        rl_config("text", {"then": {"stepz": 3}})
    with pytest.raises(ConfigError, match="rl.text.then cannot set then"):
        rl_config("text", {"then": {"then": {"steps": 1}}})
    with pytest.raises(ConfigError, match="rl.image.then must be a mapping"):
        rl_config("image", {"then": "component"})
    cfg = rl_config("text", {"steps": 3, "resume": "x", "then": {"advantage_scale": "component"}})
    assert next_phase({"steps": 3, "resume": "x", "then": {"advantage_scale": "component"}}, cfg) == {
        "steps": 3, "advantage_scale": "component", "then": None}
    assert next_phase({}, rl_config("text", {"then": None})) is None
    assert next_phase({}, rl_config("text", quick=True)) is None  # the quick profile: one phase


def test_the_report_finds_the_last_rl_phase(tmp_path):
    from recbole_dppmg.errors import CheckpointError
    from recbole_dppmg.generation.report.build import _finished_text_runs, _rl_run

    root = tmp_path / "saved"
    warmup, other = _text_run(root, "TextGen-a", tmp_path, {}), _text_run(root, "TextGen-b", tmp_path, {})
    for name, source in (("TextRL-1", warmup), ("TextRL-2", None), ("TextRL-3", other)):
        run = _text_run(root, name, tmp_path, {})
        (run / "users.json").write_text("{}")
        source = source or root / "tiny" / "TextRL-1"  # the second phase starts from the first
        (run / "rl_config.json").write_text(json.dumps({"source_run": str(source)}))
        time.sleep(0.01)
    (warmup / "users.json").write_text("{}")
    assert _rl_run("tiny", root, "TextRL", None, warmup, _finished_text_runs) == str((root / "tiny" / "TextRL-2").resolve())
    assert _rl_run("tiny", root, "TextRL", str(root / "tiny" / "TextRL-2"), warmup, _finished_text_runs).endswith("TextRL-2")
    with pytest.raises(CheckpointError, match="was not made from"):
        _rl_run("tiny", root, "TextRL", str(root / "tiny" / "TextRL-3"), warmup, _finished_text_runs)
