"""Bad input and unusual setups (issue 21): each answered by one line and exit status 2 before any
data is loaded or folder made, or handled without writing; one test per row of the issue's table."""

import errno
import fcntl
import json
import logging
import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch
from data_fixtures import fake_encoders, leftovers, write_user_dataset
from tiny_mm import write_tiny_mm

from recbole_dppmg import cli
from recbole_dppmg.cli import main
from recbole_dppmg.data import prepare as prepare_module
from recbole_dppmg.data.atomic import read_atomic
from recbole_dppmg.data.prepare import is_prepared, prepare_dataset
from recbole_dppmg.errors import DataError
from recbole_dppmg.quick_start import finite_or_null
from recbole_dppmg.trainer import CHECKPOINT_FORMAT


@pytest.fixture
def tiny(tmp_path):
    """Command-line arguments of a quick run on a tiny dataset, everything inside tmp_path."""
    write_tiny_mm(tmp_path / "data", "tiny", n_users=20, n_items=24, per_user=6)
    return [
        "-d",
        "tiny",
        f"--data_path={tmp_path / 'data'}",
        f"--checkpoint_dir={tmp_path / 'saved'}",
        "--state=WARNING",
        "--show_progress=False",
        "--torch_num_threads=1",
    ]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("run_dppmg.py: error: ")
    return lines[0]


def nothing_written(tmp_path) -> bool:
    """No run folder, and RecBole's logger (which runs just before the data loads) never started."""
    return not (tmp_path / "saved").exists() and not (tmp_path / "log").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-m", "BPR", "--epochs=-1"], "epochs=-1 is not allowed: epochs must be an integer >= 1"),
        (["-m", "BPR", "--epochs=0"], "epochs=0 is not allowed"),
        (["-m", "DPPMG", "--epochs=-1"], "epochs=-1 is not allowed"),
        (
            ["-m", "BPR", "--learning_rate=0"],
            "learning_rate=0 is not allowed: learning_rate must be a finite number > 0",
        ),
        (["-m", "BPR", "--learning_rate=-1e-3"], "learning_rate=-0.001 is not allowed"),
        (["-m", "BPR", "--epochs=abc"], "epochs='abc' is not allowed"),
        (["-m", "BPR", "--topk=[0]"], "topk=[0] is not allowed: topk must be an integer >= 1"),
        (["-m", "BPR", "--topk=[]"], "topk=[] is not allowed"),
        (["-m", "BPR", "--train_batch_size=0"], "train_batch_size=0 is not allowed"),
        (["-m", "BPR", "--eval_batch_size=1.5"], "eval_batch_size=1.5 is not allowed"),
        (["-m", "BPR", "--stopping_step=0"], "stopping_step=0 is not allowed"),
        (["-m", "BPR", "--embedding_size=-4"], "embedding_size=-4 is not allowed"),
        (["-m", "BPR", "--seeds=abc"], "--seeds must be a list of integers"),
        (["-m", "BPR,Pop", "--seeds=[1,-2]"], "--seeds value -2 is not allowed"),
        (["-m", "BPR,Pop", "--epochs=0"], "epochs=0 is not allowed"),
    ],
)
def test_settings_are_checked_before_anything_is_loaded_or_written(tiny, tmp_path, capsys, argv, message):
    assert main(tiny + argv) == 2
    assert message in one_error_line(capsys)
    assert nothing_written(tmp_path)


def test_a_run_that_trained_no_epoch_is_not_a_result(tiny, tmp_path, capsys):
    """RecBole's fit saves an untrained model as epoch -1; the plugin never writes that best.pth,
    and the export stage refuses a checkpoint of such a run (written by earlier versions)."""
    untrained = tmp_path / "old" / "best.pth"
    untrained.parent.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "model": "DPPMG", "dataset": "tiny", "epoch": -1}, untrained)
    assert main(["--stage", "export", "--checkpoint", str(untrained), *tiny]) == 2
    assert "trained no epoch: it is not a result" in one_error_line(capsys)
    assert not (untrained.parent / "tokens").exists()


def test_result_json_is_strict_json(tiny, tmp_path):
    assert main(tiny + ["-m", "BPR", "--epochs=1"]) == 0
    (result,) = (tmp_path / "saved" / "tiny").glob("BPR-*/result.json")

    def refuse(constant):
        raise AssertionError(f"{constant} in result.json")

    values = json.loads(result.read_text(), parse_constant=refuse)
    assert values["epochs_trained"] == 1 and (result.parent / "best.pth").is_file()
    assert finite_or_null({"a": float("-inf"), "b": [float("nan"), 1.0]}) == {"a": None, "b": [None, 1.0]}


def test_read_only_dataset_folder_is_read_without_writing(tmp_path):
    """A valid prepared dataset: a second prepare (what every training run does) takes no lock
    and writes nothing, so a read-only dataset/ works."""
    spec = write_user_dataset(tmp_path)
    dataset_dir = tmp_path / "dataset"
    folder = prepare_dataset("tiny", dataset_dir=dataset_dir, spec_file=spec, encoders=fake_encoders(), num_threads=1)
    (dataset_dir / ".locks" / "tiny.lock").unlink()
    (dataset_dir / ".locks").rmdir()
    before = {p.name: p.stat().st_mtime_ns for p in dataset_dir.rglob("*")}
    os.chmod(dataset_dir, 0o555)
    try:
        assert prepare_dataset("tiny", dataset_dir=dataset_dir, spec_file=spec, encoders=fake_encoders()) == folder
    finally:
        os.chmod(dataset_dir, 0o755)
    assert {p.name: p.stat().st_mtime_ns for p in dataset_dir.rglob("*")} == before


def test_unwritable_saved_folder_is_one_line(tiny, tmp_path, capsys):
    (tmp_path / "saved").write_text("not a folder")
    assert main(tiny + ["-m", "BPR", "--epochs=1"]) == 2
    line = one_error_line(capsys)
    assert f"cannot write run folders under {tmp_path / 'saved'}" in line
    assert (tmp_path / "saved").read_text() == "not a folder" and not (tmp_path / "log").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "a\\b"])
def test_dataset_names_are_checked(tmp_path, capsys, name, monkeypatch):
    monkeypatch.setattr(cli, "prepare_dataset", lambda *a, **k: pytest.fail("prepare ran"))
    for stage in ("train", "prepare"):
        assert main(["--stage", stage, "-d", name, f"--checkpoint_dir={tmp_path / 'saved'}"]) == 2
        assert f"dataset name {name!r} is not allowed" in one_error_line(capsys)
    assert nothing_written(tmp_path)
    with pytest.raises(DataError.__mro__[1], match="is not allowed"):
        prepare_dataset(name, dataset_dir=tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists() and not (tmp_path / "evil.lock").exists()


def test_lock_files_live_in_a_git_ignored_folder(tmp_path):
    spec = write_user_dataset(tmp_path)
    prepare_dataset("tiny", dataset_dir=tmp_path / "dataset", spec_file=spec, encoders=fake_encoders(), num_threads=1)
    assert sorted(p.name for p in (tmp_path / "dataset").iterdir()) == [".locks", "tiny"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ignored = subprocess.run(["git", "check-ignore", "-q", "dataset/.locks/ml-100k-mm.lock"], cwd=repo)
    assert ignored.returncode == 0


def test_leftovers_of_a_killed_prepare_are_removed_even_on_a_cache_hit(tmp_path):
    spec = write_user_dataset(tmp_path)
    dataset_dir = tmp_path / "dataset"
    prepare_dataset("tiny", dataset_dir=dataset_dir, spec_file=spec, encoders=fake_encoders(), num_threads=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (dataset_dir / f".tiny.tmp-{dead.pid}-abc123").mkdir()
    (dataset_dir / f".tiny.tmp-{dead.pid}-abc123" / "tiny.item").write_text("half written")
    alive = dataset_dir / f".tiny.tmp-{os.getppid()}-xyz"  # a prepare still running elsewhere: kept
    alive.mkdir()
    prepare_dataset("tiny", dataset_dir=dataset_dir, spec_file=spec, encoders=fake_encoders())
    assert leftovers(dataset_dir) == [alive.name]


def _checkpoint_cases(tmp_path):
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(os.urandom(256))
    pickled = tmp_path / "recbole.pth"
    torch.save({"config": pathlib.PosixPath("x")}, pickled)  # a pickled object, as RecBole's Config
    other = tmp_path / "other.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": "Pop", "dataset": "tiny", "epoch": 3}, other)
    other_data = tmp_path / "other_data.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": "BPR", "dataset": "ml-100k", "epoch": 3}, other_data)
    return [
        (tmp_path / "missing.pth", "checkpoint not found"),
        (random_bytes, "is not a recbole_dppmg checkpoint that loads with weights_only=True"),
        (pickled, "Unsupported global: GLOBAL pathlib.PosixPath"),
        (other, "was trained for model Pop, not BPR"),
        (other_data, "was trained on dataset ml-100k, not tiny"),
    ]


def test_resume_is_checked_before_the_data_loads(tiny, tmp_path, capsys):
    for path, message in _checkpoint_cases(tmp_path):
        assert main(tiny + ["-m", "BPR", "--resume", str(path)]) == 2
        line = one_error_line(capsys)
        assert message in line
        assert nothing_written(tmp_path)


def test_weights_only_message_is_whole(tmp_path):
    pickled = _checkpoint_cases(tmp_path)[2][0]
    with pytest.raises(Exception) as caught:
        cli.check_checkpoint(pickled, None, None)
    message = str(caught.value)
    assert "\n" not in message and "..." not in message
    assert message.rstrip().endswith(
        "pathlib.PosixPath was not an allowed global by default. Please use "
        "`torch.serialization.add_safe_globals([pathlib.PosixPath])` or the "
        "`torch.serialization.safe_globals([pathlib.PosixPath])` context manager "
        "to allowlist this global if you trust this class/function."
    )


def test_export_checkpoint_is_checked_before_the_data_loads(tiny, tmp_path, capsys):
    cases = _checkpoint_cases(tmp_path)
    for path, message in cases[:3]:
        assert main(["--stage", "export", "--checkpoint", str(path), *tiny]) == 2
        assert message in one_error_line(capsys)
    assert main(["--stage", "export", "--checkpoint", str(cases[3][0]), *tiny]) == 2
    assert "was trained for model Pop, not DPPMG" in one_error_line(capsys)
    assert nothing_written(tmp_path)


def test_non_numeric_rating_names_the_file_line(tmp_path):
    rows = [f"u{u}\ti{1 + u % 5}\t{u}\t{1000 + u}" for u in range(1, 6)]
    rows[2] = "u3\ti4\tfive\t1003"  # file line 4: the header is line 1
    rows.insert(1, "")  # an empty line still counts as a line of the file
    spec = write_user_dataset(tmp_path, inter_rows=rows)
    with pytest.raises(DataError, match=r"tiny\.inter:5: column rating:float holds a non-number 'five'"):
        prepare_dataset("tiny", dataset_dir=tmp_path / "dataset", spec_file=spec, encoders=fake_encoders())
    assert not (tmp_path / "dataset" / "tiny").exists()
    path = tmp_path / "raw" / "tiny.inter"
    with pytest.raises(DataError, match=":5: "):
        read_atomic(path)


def test_prepared_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        spec = write_user_dataset(tmp_path)
        folder = prepare_dataset(
            "tiny", dataset_dir=tmp_path / "dataset", spec_file=spec, encoders=fake_encoders(), num_threads=1
        )
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())


def test_prepare_stage_honours_torch_num_threads(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_prepare(dataset, **kwargs):
        seen.update(kwargs)
        return tmp_path / dataset

    monkeypatch.setattr(cli, "prepare_dataset", fake_prepare)
    assert main(["--stage", "prepare", "-d", "ml-100k-mm", "--torch_num_threads=1"]) == 0
    assert seen["num_threads"] == 1
    spec = write_user_dataset(tmp_path)
    folder = prepare_dataset(
        "tiny", dataset_dir=tmp_path / "dataset", spec_file=spec, encoders=fake_encoders(), num_threads=1
    )
    assert json.loads((folder / "manifest.json").read_text())["threads"] == 1


def test_a_waiting_prepare_says_so(tmp_path, caplog):
    spec = write_user_dataset(tmp_path)
    lock_dir = tmp_path / "dataset" / ".locks"
    lock_dir.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="recbole_dppmg.data.prepare")
    with open(lock_dir / "tiny.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=prepare_dataset,
            args=("tiny",),
            kwargs={
                "dataset_dir": tmp_path / "dataset",
                "spec_file": spec,
                "encoders": fake_encoders(),
                "num_threads": 1,
            },
        )
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive()
        waiting = [r for r in caplog.records if "waiting for it" in r.getMessage()]
        assert waiting and waiting[0].levelno == logging.WARNING
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=30)
    assert is_prepared("tiny", tmp_path / "dataset")


def test_stale_dataset_on_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    """Inputs changed but dataset/ cannot be written: one line naming the path, the old copy intact."""
    spec = write_user_dataset(tmp_path)
    folder = prepare_dataset(
        "tiny", dataset_dir=tmp_path / "dataset", spec_file=spec, encoders=fake_encoders(), num_threads=1
    )
    before = (folder / "tiny.inter").read_text()
    with open(tmp_path / "raw" / "tiny.inter", "a") as raw:
        raw.write("u9\ti1\t3\t5000\n")

    def read_only(dataset_dir, dataset):
        raise OSError(errno.EROFS, "Read-only file system", str(dataset_dir / ".locks" / f"{dataset}.lock"))

    monkeypatch.setattr(prepare_module, "_exclusive", read_only)
    with pytest.raises(DataError, match=r"cannot prepare tiny in .*dataset: Read-only file system: .*tiny\.lock$"):
        prepare_dataset("tiny", dataset_dir=tmp_path / "dataset", spec_file=spec, encoders=fake_encoders())
    assert (folder / "tiny.inter").read_text() == before


def test_seed_is_a_recbole_key_not_an_abbreviation_of_seeds():
    from recbole_dppmg.cli import parse_args

    args, models, config_files, overrides = parse_args(["-d", "ml-100k", "-m", "BPR", "--seed=7"])
    assert args.seeds is None and overrides["seed"] == 7


def test_a_first_run_reads_the_property_file_that_prepare_just_wrote(tmp_path, monkeypatch):
    """On a fresh checkout stage 1 prepares the dataset; the config must then include the file
    prepare wrote (its load_col and feature fields), not the one read before it existed."""
    from recbole_dppmg import quick_start
    from recbole_dppmg.utils import get_model

    root = tmp_path / "dataset"
    monkeypatch.setenv("DPPMG_DATASET_DIR", str(root))

    def fake_prepare(dataset, dataset_dir, num_threads=None):
        folder = pathlib.Path(dataset_dir) / dataset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{dataset}.inter").write_text("user_id:token\titem_id:token\tscore:float\n1\t2\t5\n")
        (folder / f"{dataset}.yaml").write_text("load_col: {inter: [user_id, item_id, score]}\nRATING_FIELD: score\n")

    monkeypatch.setattr(quick_start, "ensure_prepared", fake_prepare)
    config = quick_start.prepared_config(get_model("BPR"), "fresh", config_dict={"torch_num_threads": 1})
    assert config["load_col"] == {"inter": ["user_id", "item_id", "score"]} and config["RATING_FIELD"] == "score"
