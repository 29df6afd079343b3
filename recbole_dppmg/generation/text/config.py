"""Text-generator settings helpers and folder lookup.

The settings themselves are ``load_settings("text", overrides)`` (``generation/common/settings.py``:
defaults in the ``text:`` section of ``properties/generation.yaml``, validated there). Token exports
and trained generators are found by path, or as the newest one under ``saved/<dataset>/``.
"""

from __future__ import annotations

import string
from pathlib import Path

from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.generation.common.settings import (  # noqa: F401  (re-exported for the text stage)
    PAIR_CHOICES,
    TARGET_FIELDS,
    TextSettings,
    check_target_template,
    load_settings,
)
from recbole_dppmg.paths import SAVED_DIR, saved_path
from recbole_dppmg.runs import TEXT_GEN, newest_finished_run
from recbole_dppmg.tokens.export import newest_token_export  # noqa: F401  (re-exported for the text stage)

RUN_PREFIX = TEXT_GEN.name
PLAIN_TARGET_TEMPLATE = "{head}: {plot}"  # an item alone; the targets of runs from before text.target_template existed


def user_field(template: str) -> bool:
    """Whether targets in the shape of ``template`` differ per user (``{user_genres}``)."""
    return any(name == "user_genres" for _, name, _, _ in string.Formatter().parse(str(template)))


# what runs from before a key existed did, where that is not (or may stop being) the key's default
PREDATING = {"target_template": PLAIN_TARGET_TEMPLATE, "slot_vectors": False, "prefix_tokens": 0}


def recorded_settings(recorded: dict) -> TextSettings:
    """A warm-up run's recorded ``text`` settings; a key the run predates counts as its default,
    except the keys of :data:`PREDATING` (e.g. runs from before ``target_template`` existed wrote
    :data:`PLAIN_TARGET_TEMPLATE`). Keys later versions dropped are ignored."""
    known = TextSettings.field_names()
    kept = {k: v for k, v in recorded.items() if k in known}
    return load_settings("text", {**PREDATING, **kept})


def saved_root(config: dict) -> Path:
    return saved_path(config.get("checkpoint_dir"))


def newest_generator_run(dataset: str, root: Path | None = None) -> Path:
    """The newest finished text warm-up run ``saved/<dataset>/TextGen-*``."""
    root = Path(root or SAVED_DIR)
    run = newest_finished_run(root, dataset, TEXT_GEN)
    if run is None:
        raise CheckpointError(
            f"no trained text generator for dataset {dataset} under {root / dataset}; run the text warm-up first"
        )
    return run
