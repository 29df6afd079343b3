"""The plugin skeleton: config layering, model lookup, plain checkpoints, resume, the CLI's
one-line errors, and parity with RecBole's own trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.sparse as sp
import torch

from recbole_dppmg import compat
from recbole_dppmg.cli import main
from recbole_dppmg.config import parse_overrides
from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.parity import stock_run
from recbole_dppmg.paths import REPO_ROOT
from recbole_dppmg.quick_start import compare, load_data_and_model, run
from recbole_dppmg.trainer import load_checkpoint_file
from recbole_dppmg.utils import available_models, get_model


def test_overrides_are_typed():
    values = parse_overrides(
        ["--epochs=5", "--learning_rate=1e-3", "--topk=[10, 20]", "--use_gpu=False", "--learner=adam"]
    )
    assert values == {"epochs": 5, "learning_rate": 1e-3, "topk": [10, 20], "use_gpu": False, "learner": "adam"}


@pytest.mark.parametrize("bad", ["--epochs", "epochs=5", "--=5", "--epochs=[1,", "--bad key=1"])
def test_malformed_override_is_named(bad):
    with pytest.raises(ConfigError, match="malformed override"):
        parse_overrides([bad])


def test_model_lookup_plugin_first_and_case_insensitive():
    assert get_model("lightgcn").__name__ == "LightGCN"
    assert "DPPMG" in available_models() and "BPR" in available_models()
    with pytest.raises(ConfigError, match=r"unknown model 'NoSuchModel'; available: .*LightGCN"):
        get_model("NoSuchModel")


def test_dok_update_restored_when_scipy_lacks_it(monkeypatch):
    reference = sp.dok_matrix((3, 3))
    entries = {(0, 1): 1.0, (2, 0): 1.0}
    for key, value in entries.items():
        reference[key] = value
    for owner in sp.dok_matrix.__mro__:  # simulate scipy >= 1.13, where it is gone
        if "_update" in vars(owner):
            monkeypatch.delattr(owner, "_update")
    assert not hasattr(sp.dok_matrix, "_update")
    compat._restore_dok_update()
    patched = sp.dok_matrix((3, 3))
    patched._update(entries)
    assert (patched.toarray() == reference.toarray()).all()


def _cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-d", "ml-100k", "-m", "NoSuchModel"], "unknown model 'NoSuchModel'"),
        (["-d", "no-such-dataset", "-m", "BPR"], "unknown dataset 'no-such-dataset'"),
        (["-d", "ml-100k", "-m", "BPR", "--config_files", "missing.yaml"], "config file not found: missing.yaml"),
        (["-d", "ml-100k", "-m", "BPR", "--epochs"], "malformed override '--epochs'"),
    ],
)
def test_cli_bad_input_is_one_line(argv, message, capsys):
    code, err = _cli(argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_error_in_a_real_process_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_dppmg.py"), "-m", "NoSuchModel", "-d", "ml-100k"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("run_dppmg.py: error: unknown model 'NoSuchModel'")


def test_config_file_that_is_not_a_mapping(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    code, err = _cli(["-d", "ml-100k", "-m", "BPR", "--config_files", str(bad)], capsys)
    assert code == 2 and "must hold a mapping" in err


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["BPR", "LightGCN", "NGCF"])
def test_baselines_match_recbole_trainer(model, run_settings):
    # One thread: torch's multi-threaded CPU sparse matmul is not bit-reproducible.
    settings = dict(run_settings, epochs=2, torch_num_threads=1)
    ours = run(model, "ml-100k", config_dict=settings)
    stock = stock_run(model, "ml-100k", config_dict=settings)
    assert ours.test_result == stock["test_result"]
    assert ours.best_valid_result == stock["best_valid_result"]


@pytest.mark.e2e
def test_checkpoints_are_plain_and_reload(run_settings):
    result = run("BPR", "ml-100k", config_dict=dict(run_settings, epochs=2))
    best = Path(result.checkpoint)
    state = torch.load(best, weights_only=True)  # must not need pickle
    assert state["model"] == "BPR" and state["dataset"] == "ml-100k"
    json.loads(state["config_json"])
    config, model, _, _, _, test_data = load_data_and_model(best, config_dict=run_settings)
    from recbole_dppmg.utils import get_trainer

    trainer = get_trainer(config, type(model))(config, model)
    assert dict(trainer.evaluate(test_data, load_best_model=False)) == result.test_result
    history = json.loads((Path(result.run_dir) / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1] and "valid_score" in history[0]


@pytest.mark.e2e
def test_resume_from_last_checkpoint_continues_exactly(run_settings):
    straight = run("BPR", "ml-100k", config_dict=dict(run_settings, epochs=3))
    first_part = run("BPR", "ml-100k", config_dict=dict(run_settings, epochs=1))
    last = Path(first_part.run_dir) / "last.pth"
    assert load_checkpoint_file(last)["epoch"] == 0
    resumed = run("BPR", "ml-100k", config_dict=dict(run_settings, epochs=3), resume=last)
    history = json.loads((Path(resumed.run_dir) / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert resumed.test_result == straight.test_result


@pytest.mark.e2e
def test_checkpoint_of_another_model_is_refused(run_settings, capsys):
    result = run("BPR", "ml-100k", config_dict=dict(run_settings, epochs=1))
    overrides = [f"--{k}={v}" for k, v in run_settings.items()]
    code, err = _cli(["-d", "ml-100k", "-m", "LightGCN", "--resume", result.checkpoint, *overrides], capsys)
    assert code == 2 and "was trained for model BPR, not LightGCN" in err
    assert len(err.splitlines()) == 1


class PickledConfig:
    """Stands in for RecBole's Config object, which RecBole pickles into checkpoints."""


def test_recbole_pickled_checkpoint_is_refused(tmp_path):
    pickled = tmp_path / "recbole.pth"
    torch.save({"config": PickledConfig(), "state_dict": {}}, pickled)
    with pytest.raises(CheckpointError, match="not a recbole_dppmg checkpoint"):
        load_checkpoint_file(pickled)


@pytest.mark.e2e
def test_compare_writes_tables(run_settings, tmp_path):
    results, table = compare(
        ["Pop", "BPR"], "ml-100k", config_dict=dict(run_settings, epochs=1), out_dir=tmp_path / "cmp"
    )
    text = table.read_text()
    assert "| Pop |" in text and "| BPR |" in text and "ndcg@10" in text
    csv_lines = (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,recall@10") and len(csv_lines) == 3


def test_generation_stages_log_like_recbole(tmp_path, monkeypatch):
    """--stage text|image|generate|evaluate log to the console and log/<Stage>/ with RecBole's
    format, and leave alone a process that already logs."""
    import logging

    from recbole_dppmg.stage_logging import init_stage_logger

    root = logging.getLogger()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    try:
        init_stage_logger("TextGen", "ml-100k-mm")
        added = list(root.handlers)
        init_stage_logger("Report", "ml-100k-mm")  # already logging: nothing added
        assert root.handlers == added and len(added) == 2
        logging.getLogger("recbole_dppmg.generation.text.warmup").info("dppmg step 50: valid loss 3.5")
    finally:
        for handler in root.handlers:
            handler.close()
    files = list((tmp_path / "log" / "TextGen").glob("TextGen-ml-100k-mm-*.log"))
    assert len(files) == 1 and "INFO  dppmg step 50: valid loss 3.5" in files[0].read_text()
    assert not (tmp_path / "log" / "Report").exists()


class _LoggerReached(Exception):
    pass


def test_log_folders_exist_before_recbole_checks_them(tmp_path, monkeypatch, run_settings):
    """RecBole's ensure_dir checks, then creates: two runs started together (a grid, a comparison
    with --jobs) crashed one of them on log/<model>; the plugin creates the folders first."""
    from recbole_dppmg import quick_start, stage_logging

    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_init_logger(config):
        seen["log"] = Path("log", str(config["model"])).is_dir()
        raise _LoggerReached

    monkeypatch.setattr(quick_start, "init_logger", fake_init_logger)
    with pytest.raises(_LoggerReached):
        run("BPR", "ml-100k", config_dict=dict(run_settings, checkpoint_dir=str(tmp_path / "saved")))
    assert seen["log"]
    monkeypatch.setattr("logging.root.handlers", [])
    monkeypatch.setattr("recbole.utils.init_logger", fake_init_logger)
    with pytest.raises(_LoggerReached):
        stage_logging.init_stage_logger("TextGen", "tiny")
    assert seen["log"] and (tmp_path / "log" / "TextGen").is_dir()
