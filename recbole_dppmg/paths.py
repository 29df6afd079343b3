"""Where the project's folders are, so every stage resolves them the same way."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROPERTIES_DIR = REPO_ROOT / "properties"
DATASET_DIR = REPO_ROOT / "dataset"
SAVED_DIR = REPO_ROOT / "saved"
CACHE_DIR = REPO_ROOT / ".cache"


def shared_dir() -> Path:
    """The read-only shared data folder: ``$DPPMG_SHARED`` or ``../shared`` beside the repo."""
    return Path(os.environ.get("DPPMG_SHARED", REPO_ROOT.parent / "shared")).resolve()
