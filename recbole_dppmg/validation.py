"""Settings and checkpoint paths checked before any data is loaded or any folder is made.

RecBole accepts ``epochs=-1`` or ``learning_rate=0`` and trains nothing (a random model's
metrics then look like a result), and reads ``epochs=abc`` only to fail with a traceback
after loading the data. Every check here raises a one-line ``ConfigError`` /
``CheckpointError`` naming the key, the value and what is allowed. DPPMG's own keys are
checked by the model (``recbole_dppmg/model``); these are the generic RecBole keys.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

from recbole_dppmg.config import build_config
from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.paths import check_dataset_name
from recbole_dppmg.trainer import load_checkpoint_file
from recbole_dppmg.utils import get_model

POSITIVE_INTEGER_KEYS = ("epochs", "train_batch_size", "eval_batch_size", "stopping_step", "embedding_size")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_settings(config) -> None:
    """The generic RecBole training keys of a built config: types and ranges."""
    check_values(config.final_config_dict)


def check_values(values: dict) -> None:
    """The generic RecBole training keys among ``values`` (overrides, or a final config)."""
    for key in POSITIVE_INTEGER_KEYS:
        if key in values and values[key] is not None and not (_is_int(values[key]) and values[key] >= 1):
            raise ConfigError(f"{key}={values[key]!r} is not allowed: {key} must be an integer >= 1")
    rate = values.get("learning_rate")
    if rate is not None and not (_is_number(rate) and rate > 0):
        raise ConfigError(f"learning_rate={rate!r} is not allowed: learning_rate must be a finite number > 0")
    topk = values.get("topk")
    cutoffs = topk if isinstance(topk, list) else [topk]
    if topk is not None and not (cutoffs and all(_is_int(k) and k >= 1 for k in cutoffs)):
        raise ConfigError(f"topk={topk!r} is not allowed: topk must be an integer >= 1 or a non-empty list of them")
    seed = values.get("seed")
    if seed is not None and not (_is_int(seed) and seed >= 0):
        raise ConfigError(f"seed={seed!r} is not allowed: seed must be an integer >= 0")


def check_seeds(seeds: Iterable[int] | None) -> None:
    """``--seeds``: non-negative integers (numpy seeds cannot be negative)."""
    for seed in seeds or ():
        if not (_is_int(seed) and seed >= 0):
            raise ConfigError(f"--seeds value {seed!r} is not allowed: seeds must be integers >= 0")


def check_writable_root(path: str | Path) -> None:
    """The run folders' root (``checkpoint_dir``) must be creatable: its nearest existing
    ancestor is a writable folder."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"cannot write run folders under {path}: {existing} is not a writable folder")


def check_checkpoint(path: str | Path, model: str | None, dataset: str | None, trained: bool = False) -> dict:
    """A ``--resume`` / ``--checkpoint`` file: it exists, loads with ``weights_only=True`` and was
    made by ``model`` on ``dataset`` (each None: any); ``trained``: at least one epoch trained."""
    state = load_checkpoint_file(path)
    if model is not None and str(state.get("model", "")).lower() != model.lower():
        raise CheckpointError(f"checkpoint {path} was trained for model {state.get('model')}, not {model}")
    if dataset is not None and state.get("dataset") != dataset:
        raise CheckpointError(f"checkpoint {path} was trained on dataset {state.get('dataset')}, not {dataset}")
    if trained and int(state.get("epoch", -1)) < 0:
        raise CheckpointError(f"checkpoint {path} is of a run that trained no epoch: it is not a result")
    return state


def check_request(args, models: list[str], config_files: list[str], overrides: dict) -> None:
    """Everything ``run_dppmg.py`` can check before loading data, for the chosen stage."""
    check_dataset_name(args.dataset)
    check_seeds(args.seeds)
    if args.stage in ("train", "all") and not args.from_runs:
        check_values(overrides)  # before RecBole's Config, which raises tracebacks on some of them
        for name in models:
            try:
                config = build_config(get_model(name), args.dataset, config_files, overrides)
            except ValueError as error:  # RecBole's own checks of the config files' values
                raise ConfigError(f"invalid settings for {name}: {error}") from None
            check_settings(config)
            check_writable_root(config["checkpoint_dir"])
        if args.resume:
            check_checkpoint(args.resume, models[0] if len(models) == 1 else None, args.dataset)
    if args.stage == "export" and args.checkpoint:
        check_checkpoint(args.checkpoint, "DPPMG", None, trained=True)
