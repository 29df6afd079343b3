"""Configuration and folder lookup of the text generator.

Defaults live in the ``text:`` section of ``properties/generation.yaml`` (one source of truth,
every key commented there); callers pass overrides as a dict, nested sections merged key by
key, unknown keys refused. Token exports and trained generators are found by path, or as the
newest one under ``saved/<dataset>/``.
"""

from __future__ import annotations

import copy
import string
from pathlib import Path

import yaml

from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.generation.text.user_genres import check_genre_settings
from recbole_dppmg.paths import PROPERTIES_DIR, REPO_ROOT, SAVED_DIR
from recbole_dppmg.runs import TEXT_GEN, newest_finished_run
from recbole_dppmg.tokens.export import newest_token_export  # noqa: F401  (re-exported for the text stage)

GENERATION_YAML = PROPERTIES_DIR / "generation.yaml"
RUN_PREFIX = TEXT_GEN.name
TARGET_FIELDS = ("head", "title", "year", "genres", "plot", "user_genres")
PLAIN_TARGET_TEMPLATE = "{head}: {plot}"  # an item alone; the targets of runs from before text.target_template existed
PAIR_CHOICES = ("random", "token_score")


def check_target_template(template) -> str:
    """``template`` if it is a ``str.format`` pattern over :data:`TARGET_FIELDS` only."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(str(template)) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"text.target_template {template!r} is not a format string ({exc})") from None
    unknown = sorted(fields - set(TARGET_FIELDS))
    if unknown or not fields:
        raise ConfigError(f"text.target_template {template!r} may only use the fields {{{'}, {'.join(TARGET_FIELDS)}}}"
                          + (f", not {{{'}, {'.join(unknown)}}}" if unknown else ""))
    return str(template)


def user_field(template: str) -> bool:
    """Whether targets in the shape of ``template`` differ per user (``{user_genres}``)."""
    return any(name == "user_genres" for _, name, _, _ in string.Formatter().parse(str(template)))


def default_text_config() -> dict:
    if not GENERATION_YAML.is_file():
        raise ConfigError(f"{GENERATION_YAML} is missing")
    data = yaml.safe_load(GENERATION_YAML.read_text()) or {}
    if not isinstance(data.get("text"), dict):
        raise ConfigError(f"{GENERATION_YAML} has no text: section")
    return data["text"]


def recorded_settings(recorded: dict) -> dict:
    """A warm-up run's recorded ``text`` settings; a key the run predates counts as its default,
    except ``target_template``: runs from before it existed wrote :data:`PLAIN_TARGET_TEMPLATE`."""
    return {**default_text_config(), "target_template": PLAIN_TARGET_TEMPLATE, **recorded}


def _merge(base: dict, overrides: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if key not in base:
            raise ConfigError(f"unknown text generator setting {where}{key} (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def text_config(overrides: dict | None = None) -> dict:
    """Defaults from ``properties/generation.yaml`` with ``overrides`` applied."""
    config = _merge(default_text_config(), overrides or {}, "text.")
    check_target_template(config["target_template"])
    check_genre_settings(config["user_genres_from"], config["user_genres_count"])
    if config["pair_choice"] not in PAIR_CHOICES:
        raise ConfigError(f"text.pair_choice {config['pair_choice']!r} is not one of {', '.join(PAIR_CHOICES)}")
    return config


def saved_root(config: dict) -> Path:
    root = Path(config.get("checkpoint_dir") or SAVED_DIR)
    return root if root.is_absolute() else REPO_ROOT / root


def newest_generator_run(dataset: str, root: Path | None = None) -> Path:
    """The newest finished text warm-up run ``saved/<dataset>/TextGen-*``."""
    root = Path(root or SAVED_DIR)
    run = newest_finished_run(root, dataset, TEXT_GEN)
    if run is None:
        raise CheckpointError(
            f"no trained text generator for dataset {dataset} under {root / dataset}; run the text warm-up first"
        )
    return run
