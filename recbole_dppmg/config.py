"""Build a RecBole ``Config`` from the plugin's property files, never from ``sys.argv``.

Layering, lowest to highest priority: ``properties/overall.yaml`` ->
``properties/model/<Model>.yaml`` -> ``<data_path>/<dataset>/<dataset>.yaml`` (written by
``prepare`` with the data) -> ``properties/dataset/<dataset>.yaml`` (optional hand-written
overrides) -> the user's config files -> ``--key=value`` overrides (``config_dict``).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch
import yaml
from recbole.config import Config

from recbole_dppmg.distributed import DIST_KEYS
from recbole_dppmg.errors import ConfigError
from recbole_dppmg.paths import PROPERTIES_DIR, dataset_root, saved_path

# RecBole resolves the name ml-100k to its bundled copy; everything else lives in dataset/.
RECBOLE_BUNDLED_DATASETS = ("ml-100k",)


def property_files(
    model_name: str, dataset: str, config_files: Iterable[str | Path] = (), data_path: str | Path | None = None
) -> list[str]:
    """The YAML files for one run, in the order RecBole should read them."""
    files = [PROPERTIES_DIR / "overall.yaml"]
    prepared = Path(data_path or dataset_root()) / dataset / f"{dataset}.yaml"
    for candidate in (
        PROPERTIES_DIR / "model" / f"{model_name}.yaml",
        prepared,
        PROPERTIES_DIR / "dataset" / f"{dataset}.yaml",
    ):
        if candidate.is_file():
            files.append(candidate)
    for user_file in config_files:
        path = Path(user_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from None
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
        files.append(path)
    return [str(f) for f in files]


def parse_overrides(args: Iterable[str]) -> dict:
    """``--key=value`` strings -> typed dict (values read as YAML: 5, 1e-3, [a, b], True)."""
    overrides: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"malformed override '{arg}': expected --key=value")
        key, raw = arg[2:].split("=", 1)
        if not key or not key.replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"malformed override '{arg}': bad key '{key}'")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"malformed override '{arg}': value '{raw}' is not valid YAML") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 as a string
                value = float(value)
            except ValueError:
                pass
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"override '{key}' given twice with different values")
        overrides[key] = value
    return overrides


@contextmanager
def _argv_isolated():
    """RecBole's Config reads ``--key=value`` from sys.argv by itself; we pass overrides
    explicitly instead, so the command line (or pytest's) must not leak in."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def build_config(
    model_class, dataset: str, config_files: Iterable[str | Path] = (), config_dict: dict | None = None
) -> Config:
    """A RecBole Config for ``model_class`` on ``dataset`` with the plugin's defaults."""
    values = {"data_path": str(dataset_root())}
    values.update(config_dict or {})
    files = property_files(model_class.__name__, dataset, config_files, values["data_path"])
    with _argv_isolated():
        config = Config(model=model_class, dataset=dataset, config_file_list=files, config_dict=values)
    config["checkpoint_dir"] = str(saved_path(config["checkpoint_dir"]))
    if config["use_gpu"] is False:
        config["device"] = torch.device("cpu")
    return config


def apply_threads(config) -> None:
    """Intra-op threads for this run. Note: with more than one thread, torch's CPU sparse
    matmul sums in a varying order, so graph models (RecBole's NGCF included) are not
    bit-reproducible run to run; set ``torch_num_threads: 1`` when that matters."""
    import os

    threads = config["torch_num_threads"] or os.cpu_count() or 1
    torch.set_num_threads(int(threads))


def to_jsonable(value):
    """Config values as plain JSON types (enums by name, devices as strings)."""
    import enum
    import json

    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def jsonable_config(config: Config) -> dict:
    """The final config, for run folders and checkpoints (read by people and by tools)."""
    return {key: to_jsonable(config[key]) for key in sorted(config.final_config_dict)}


# Keys that describe where things are on this machine, not what was trained.
# The multi-process keys are among them: a checkpoint of a 2-process run reloads in one process.
MACHINE_KEYS = (
    "data_path",
    "checkpoint_dir",
    "gpu_id",
    "use_gpu",
    "device",
    "torch_num_threads",
    "show_progress",
    "state",
    *DIST_KEYS,
    "single_spec",
)


def user_settings(config: Config) -> dict:
    """What the property files and overrides set (no RecBole internals), enough to rebuild
    the same split and network later with ``build_config``."""
    settings = to_jsonable(dict(config.external_config_dict))
    return {k: v for k, v in settings.items() if k not in MACHINE_KEYS and k not in ("model", "dataset")}
