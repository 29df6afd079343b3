"""Shared test setup: offline hubs, deliberate thread count, and every run's files
(RecBole's ./log, checkpoints) inside a temporary folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

import recbole_dppmg  # noqa: E402,F401  (installs the compat patches)
from recbole_dppmg.paths import shared_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """RecBole writes ./log and ./log_tensorboard relative to the working directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread (2 threads on a busy 2-core machine ran 20x slower);
    a module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    from recbole_dppmg.data.featurize import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture
def run_settings(tmp_path):
    """Config overrides that keep a test run small, quiet and inside tmp_path."""
    return {
        "checkpoint_dir": str(tmp_path / "saved"),
        "state": "WARNING",
        "show_progress": False,
        "torch_num_threads": min(2, os.cpu_count() or 1),
    }


@pytest.fixture(scope="session")
def shared_data():
    """The real ml-100k-mm posters and plots; tests that need them skip without them."""
    root = shared_dir() / "data" / "ml-100k-mm"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root
