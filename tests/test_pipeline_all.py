"""``--stage all``: which stage outputs count as already there and valid, the pipeline record,
RL missing, and the profiles (every key of the shipped profiles is a known setting)."""

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from judge_fixtures import TINY_DPPMG
from tiny_mm import write_tiny_mm

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.generation.common.settings import load_settings, rl_phase_settings
from recbole_dppmg.generation.image.model import MODEL_KEYS
from recbole_dppmg.generation.image.train import FORMAT, TRAIN_KEYS
from recbole_dppmg.generation.report.build import EvaluatedRuns
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
    cfg = load_settings("text", {"max_steps": 5})
    run = _text_run(root, "TextGen-a", tokens, cfg)
    assert valid_text_run("tiny", tokens, cfg, root) == (run, True)
    assert valid_text_run("tiny", tokens, {**cfg, "num_threads": 2, "progress": False}, root) == (
        run,
        True,
    )  # runtime keys
    assert valid_text_run("tiny", tokens, {**cfg, "max_steps": 6}, root) == (None, False)
    assert valid_text_run("tiny", tmp_path / "other-tokens", cfg, root) == (None, False)
    time.sleep(0.01)
    unfinished = _text_run(root, "TextGen-b", tokens, cfg, finished=False)
    assert valid_text_run("tiny", tokens, cfg, root) == (unfinished, False)  # resumed by the pipeline

    settings = load_settings("image", {"max_steps": 10})
    image = root / "tiny" / "ImageGen-a"
    image.mkdir(parents=True)
    meta = {
        "tokens_folder": str(tokens),
        "model": {k: settings[k] for k in MODEL_KEYS},
        "train": {k: settings[k] for k in TRAIN_KEYS},
        "trained_steps": 10,
    }
    (image / "image_config.json").write_text(json.dumps(meta))
    assert valid_image_run("tiny", tokens, settings, root) == (image, True)
    assert valid_image_run("tiny", tokens, {**settings, "max_minutes": 1.0}, root) == (image, True)
    assert valid_image_run("tiny", tokens, {**settings, "learning_rate": 1.0}, root) == (None, False)
    (image / "image_config.json").write_text(json.dumps({**meta, "trained_steps": 4}))
    assert valid_image_run("tiny", tokens, settings, root) == (image, False)

    rl = root / "tiny" / "TextRL-a"
    rl.mkdir()
    rl_cfg = {"steps": 8, "learning_rate": 0.002, "max_minutes": 2.0, "partner": "x"}
    (rl / "rl_config.json").write_text(
        json.dumps({"source_run": str(run), "partner_run": str(image), "rl": rl_cfg, "steps_done": 8})
    )
    assert valid_rl_run("tiny", "TextRL", run, {**rl_cfg, "max_minutes": 9.0}, root, partner=image) == (rl, True)
    assert valid_rl_run("tiny", "TextRL", run, rl_cfg, root, partner=tmp_path / "another-image-run") == (None, False)
    assert valid_rl_run("tiny", "TextRL", unfinished, rl_cfg, root) == (None, False)
    assert valid_rl_run("tiny", "TextRL", run, {**rl_cfg, "steps": 9}, root) == (None, False)
    # a run recorded before rl.text.train_deltas / reward.relative existed ran with True / False
    assert valid_rl_run("tiny", "TextRL", run, {**rl_cfg, "train_deltas": True}, root) == (rl, True)
    assert valid_rl_run("tiny", "TextRL", run, {**rl_cfg, "train_deltas": False}, root) == (None, False)
    saved = json.loads((rl / "rl_config.json").read_text())
    (rl / "rl_config.json").write_text(json.dumps({**saved, "reward": {"consistency_weight": 1.0}}))
    old_reward = {"consistency_weight": 1.0, "relative": False}
    assert valid_rl_run("tiny", "TextRL", run, rl_cfg, root, reward=old_reward) == (rl, True)
    assert valid_rl_run("tiny", "TextRL", run, rl_cfg, root, reward={**old_reward, "relative": True}) == (None, False)


def test_a_report_counts_only_for_the_same_runs_settings_and_weights(tmp_path):
    root = tmp_path / "saved"
    text = _text_run(root, "TextGen-a", tmp_path, {})
    runs = EvaluatedRuns(str(tmp_path), str(text), str(tmp_path / "image"), None, None, ["u1", "u2"])
    cfg, reward = load_settings("evaluate", {"users": 4}), load_settings("reward")
    report = root / "tiny" / "Report-a" / "report"
    report.mkdir(parents=True)
    (report / "report.json").write_text(
        json.dumps({"runs": runs.__dict__, "evaluate": {**cfg, "progress": False}, "reward": reward})
    )
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

    sections = load_profile(profile)
    load_settings("text", sections["text"])
    load_settings("image", sections["image"])
    load_settings("evaluate", sections["evaluate"])
    load_settings("reward", sections["reward"])
    for modality in ("text", "image"):
        rl_phase_settings(modality, sections["rl"].get(modality), bool(sections["rl"].get("quick")))
    assert set(sections["rl"]) <= {"quick", "text", "image"}


def test_rl_in_two_phases_starts_the_second_from_the_first(tiny_pipeline, monkeypatch, tmp_path):
    """rl.text.then: the second phase is a new run from the first one's result; a re-run skips both."""
    from recbole_dppmg.generation.rl import text as rl_text

    calls = []

    def fake_train(dataset, source, judge, overrides, quick):
        run = tmp_path / "saved" / "tiny" / f"TextRL-{len(calls)}"
        run.mkdir(parents=True)
        cfg = rl_phase_settings("text", overrides, quick)
        calls.append((Path(source).name, cfg["advantage_scale"], cfg["then"]))
        (run / "rl_config.json").write_text(
            json.dumps(
                {
                    "source_run": str(source),
                    "partner_run": overrides["partner"],
                    "rl": cfg,
                    "reward": judge.config,
                    "steps_done": cfg["steps"] - stopped_early,
                }
            )
        )
        return run

    def two_phase_pipeline():
        pipeline = tiny_pipeline()
        pipeline.sections["rl"] = {"text": {"steps": 2, "then": {"advantage_scale": "component"}}}
        pipeline.outputs.update(
            text=str(tmp_path / "TextGen-x"),
            image=str(tmp_path / "ImageGen-x"),
            export="e",
            judge=SimpleNamespace(config={"relative": False}),
        )
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
    from recbole_dppmg.generation.rl.common import next_phase

    with pytest.raises(ConfigError, match="unknown RL setting rl.text.then.stepz"):
        rl_phase_settings("text", {"then": {"stepz": 3}})
    with pytest.raises(ConfigError, match="rl.text.then cannot set then"):
        rl_phase_settings("text", {"then": {"then": {"steps": 1}}})
    with pytest.raises(ConfigError, match="rl.image.then must be a mapping"):
        rl_phase_settings("image", {"then": "component"})
    cfg = rl_phase_settings("text", {"steps": 3, "resume": "x", "then": {"advantage_scale": "component"}})
    assert next_phase({"steps": 3, "resume": "x", "then": {"advantage_scale": "component"}}, cfg) == {
        "steps": 3,
        "advantage_scale": "component",
        "then": None,
    }
    assert next_phase({}, rl_phase_settings("text", {"then": None})) is None
    assert next_phase({}, rl_phase_settings("text", quick=True)) is None  # the quick profile: one phase


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
    assert _rl_run("tiny", root, "TextRL", None, warmup, _finished_text_runs) == str(
        (root / "tiny" / "TextRL-2").resolve()
    )
    assert _rl_run("tiny", root, "TextRL", str(root / "tiny" / "TextRL-2"), warmup, _finished_text_runs).endswith(
        "TextRL-2"
    )
    with pytest.raises(CheckpointError, match="was not made from"):
        _rl_run("tiny", root, "TextRL", str(root / "tiny" / "TextRL-3"), warmup, _finished_text_runs)


# ---------------------------------------------------------------------------- --stage rl and the final generators
def _generators(root, tokens):
    """A finished text warm-up and image generator on ``tokens`` with the same test users."""
    text = _text_run(root, "TextGen-a", tokens, {})
    (text / "users.json").write_text(json.dumps({"test": ["u1", "u2"], "valid": []}))
    image = root / "tiny" / "ImageGen-a"
    image.mkdir(parents=True)
    meta = {"format": FORMAT, "dataset": "tiny", "tokens_folder": str(tokens), "test_users": ["u1", "u2"]}
    (image / "image_config.json").write_text(json.dumps(meta))
    (image / "model.safetensors").write_text("weights")
    return text, image


def _fake_rl(root, prefix, weights, calls, steps_short=0):
    """A stand-in for train_text_rl / train_image_rl: writes the RL run's rl_config.json and weights."""

    def train(dataset, source, judge, overrides, quick):
        run = Path(overrides["resume"]) if overrides.get("resume") else root / "tiny" / f"{prefix}-{len(calls)}"
        (run / Path(weights).parent).mkdir(parents=True, exist_ok=True)
        cfg = rl_phase_settings(prefix[:-2].lower(), overrides, quick)
        calls.append((prefix, Path(source).name, cfg["steps"], overrides.get("resume")))
        saved = {
            "source_run": str(source),
            "partner_run": overrides["partner"],
            "rl": cfg,
            "reward": getattr(judge, "config", None),
            "steps_done": cfg["steps"] - steps_short,
        }
        (run / "rl_config.json").write_text(json.dumps(saved))
        (run / weights).write_text("weights")
        return run

    return train


def test_stage_rl_runs_text_and_image_rl_and_a_second_call_skips_them(tmp_path, monkeypatch):
    """--stage rl: RL from the newest finished generators with the profile's rl: settings; an
    unfinished run is resumed, a finished one skipped; pipeline.json records the two RL steps."""
    from recbole_dppmg import cli
    from recbole_dppmg import pipeline as pipeline_module
    from recbole_dppmg.generation.rl import image as rl_image
    from recbole_dppmg.generation.rl import text as rl_text

    root, tokens = tmp_path / "saved", tmp_path / "tokens"
    tokens.mkdir()
    text, image = _generators(root, tokens)
    calls = []
    monkeypatch.setattr(pipeline_module, "SAVED_DIR", root)
    monkeypatch.setattr(Pipeline, "_judge", lambda self: SimpleNamespace(config={"relative": False}))
    monkeypatch.setattr(cli, "init_stage_logger", lambda *a: None)
    monkeypatch.setattr(rl_image, "train_image_rl", _fake_rl(root, "ImageRL", "model.safetensors", calls))
    text_rl = _fake_rl(root, "TextRL", "dppmg/text_generator.json", calls, steps_short=1)
    monkeypatch.setattr(rl_text, "train_text_rl", text_rl)
    argv = ["--stage", "rl", "-d", "tiny", "--profile", "quick"]
    assert cli.main(argv) == 0  # text RL stops short (max_minutes), image RL finishes
    assert calls == [("TextRL", "TextGen-a", 8, None), ("ImageRL", "ImageGen-a", 24, None)]  # rl.quick sizes

    monkeypatch.setattr(rl_text, "train_text_rl", _fake_rl(root, "TextRL", "dppmg/text_generator.json", calls))
    calls.clear()
    assert cli.main(argv) == 0
    assert calls == [("TextRL", "TextGen-a", 8, str(root / "tiny" / "TextRL-0"))]  # resumed; image RL skipped
    calls.clear()
    assert cli.main(argv) == 0 and calls == []
    record = json.loads(sorted((root / "tiny").glob("Pipeline-*/pipeline.json"))[-1].read_text())
    assert [s["stage"] for s in record["stages"]] == ["rl_text", "rl_image"]
    assert {s["status"] for s in record["stages"]} == {"skipped"}
    assert record["generators"] == {
        "tokens": str(tokens.resolve()),
        "text": str(text.resolve()),
        "image": str(image.resolve()),
    }


def test_generate_takes_the_last_finished_rl_phase_over_the_warm_up(tmp_path, monkeypatch, caplog):
    from recbole_dppmg import cli
    from recbole_dppmg.runs import final_generator

    root, tokens = tmp_path / "saved", tmp_path / "tokens"
    tokens.mkdir()
    text, image = _generators(root, tokens)
    assert final_generator("tiny", "text", root) == text and final_generator("tiny", "image", root) == image
    assert final_generator("other", "text", root) is None
    calls = []
    time.sleep(0.01)
    phase1 = _fake_rl(root, "TextRL", "dppmg/text_generator.json", calls)("tiny", text, None, {"partner": "i"}, True)
    time.sleep(0.01)
    phase2 = _fake_rl(root, "TextRL", "dppmg/text_generator.json", calls, steps_short=1)
    unfinished = phase2("tiny", phase1, None, {"partner": "i"}, True)
    time.sleep(0.01)
    image_rl = _fake_rl(root, "ImageRL", "model.safetensors", calls)("tiny", image, None, {"partner": "t"}, True)
    assert final_generator("tiny", "text", root) == phase1  # phase 2 stopped short: phase 1 is the last finished
    assert final_generator("tiny", "image", root) == image_rl
    time.sleep(0.01)
    _text_run(root, "TextGen-b", tokens, {})  # a newer warm-up without RL: its chain is the newest
    assert final_generator("tiny", "text", root).name == "TextGen-b"
    shutil.rmtree(root / "tiny" / "TextGen-b")
    rl = json.loads((unfinished / "rl_config.json").read_text())
    (unfinished / "rl_config.json").write_text(json.dumps({**rl, "steps_done": rl["rl"]["steps"]}))
    assert final_generator("tiny", "text", root) == unfinished

    monkeypatch.setattr(cli, "SAVED_DIR", root)
    monkeypatch.setattr(cli, "saved_root", lambda cfg: root)
    args, *_ = cli.parse_args(["--stage", "generate", "-d", "tiny", "--users", "u1"])
    with caplog.at_level("INFO", logger="recbole_dppmg.cli"):
        text_settings, image_settings = cli._final_generators(args)
    assert text_settings["generator"] == str(unfinished) and image_settings["checkpoint"] == str(image_rl)
    assert f"RL {phase1.name} -> {unfinished.name} from the warm-up TextGen-a" in caplog.text
    assert f"RL {image_rl.name} from the warm-up ImageGen-a" in caplog.text
    args, *_ = cli.parse_args(["--stage", "generate", "-d", "tiny", "--users", "u1", f"--text.generator={text}"])
    assert cli._final_generators(args)[0]["generator"] == str(text)  # a named generator wins
