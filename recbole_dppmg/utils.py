"""Model and trainer lookup: the plugin's own models first, then RecBole's."""

from __future__ import annotations

import importlib
import re
from functools import lru_cache
from pathlib import Path

from recbole.utils import get_trainer as recbole_get_trainer

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.trainer import plain_checkpoint_trainer

# Plugin models: name -> "module:Class". Imported lazily so a broken optional model
# never stops the others from loading.
PLUGIN_MODELS = {
    "DPPMG": "recbole_dppmg.model.dppmg:DPPMG",
    "FREEDOM": "recbole_dppmg.model.freedom:FREEDOM",
    "VBPR": "recbole_dppmg.model.vbpr:VBPR",
}

_RECBOLE_MODEL_PACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


@lru_cache(maxsize=1)
def recbole_model_names() -> tuple[str, ...]:
    """Every model class RecBole ships, read from its source files without importing them
    (some need optional extras such as lightgbm)."""
    import recbole.model

    root = Path(recbole.model.__file__).parent
    names = set()
    for package in _RECBOLE_MODEL_PACKAGES:
        for source in (root / package).glob("*.py"):
            stem = source.stem
            for class_name in re.findall(r"^class (\w+)\(", source.read_text(), flags=re.M):
                if class_name.lower() == stem:
                    names.add(class_name)
    return tuple(sorted(names))


def available_models() -> list[str]:
    return sorted(PLUGIN_MODELS) + [n for n in recbole_model_names() if n not in PLUGIN_MODELS]


def _load_plugin(spec: str):
    module_name, class_name = spec.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_model(name: str):
    """The model class for ``name`` (case-insensitive): plugin models win over RecBole's."""
    for plugin_name, spec in PLUGIN_MODELS.items():
        if plugin_name.lower() == name.lower():
            return _load_plugin(spec)
    for recbole_name in recbole_model_names():
        if recbole_name.lower() == name.lower():
            from recbole.utils import get_model as recbole_get_model

            return recbole_get_model(recbole_name)
    raise ConfigError(f"unknown model '{name}'; available: {', '.join(available_models())}")


def get_trainer(config, model_class):
    """RecBole's trainer for this model type, with plain (pickle-free) checkpoints."""

    base = recbole_get_trainer(config["MODEL_TYPE"], model_class.__name__)
    return plain_checkpoint_trainer(base)
