"""Where the project's folders are, so every stage resolves them the same way."""

import os
from pathlib import Path

from recbole_dppmg.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
PROPERTIES_DIR = REPO_ROOT / "properties"
# Run folders: ``$DPPMG_SAVED_DIR`` (read at import) or ``saved/`` in the repo.
SAVED_DIR = Path(os.environ.get("DPPMG_SAVED_DIR", REPO_ROOT / "saved")).resolve()
CACHE_DIR = REPO_ROOT / ".cache"


def dataset_root() -> Path:
    """Where prepared datasets live: ``$DPPMG_DATASET_DIR`` or ``dataset/`` in the repo. Stage 1
    (RecBole's ``data_path``) and every stage 2 step read the same folder."""
    return Path(os.environ.get("DPPMG_DATASET_DIR", REPO_ROOT / "dataset")).resolve()


def saved_path(value: str | Path | None) -> Path:
    """A ``checkpoint_dir`` setting as a folder: the default ``saved`` is :data:`SAVED_DIR`,
    another relative path is relative to the repo, an absolute one is itself."""
    if value in (None, "", "saved"):
        return SAVED_DIR
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def shared_dir() -> Path:
    """The read-only shared data folder: ``$DPPMG_SHARED`` or ``../shared`` beside the repo."""
    return Path(os.environ.get("DPPMG_SHARED", REPO_ROOT.parent / "shared")).resolve()


def check_dataset_name(name: str) -> str:
    """A dataset name is one folder name under ``dataset/``: no path separators, no ``..``,
    no leading dot (hidden folders hold locks and temporary builds)."""
    if not name or "/" in name or "\\" in name or os.sep in name or ".." in name or name.startswith("."):
        raise ConfigError(
            f"dataset name {name!r} is not allowed: use one folder name without '/', '\\\\', '..' "
            "or a leading dot, e.g. ml-100k-mm"
        )
    return name
