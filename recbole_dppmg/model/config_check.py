"""The stage-1 models' keys: defined once in ``properties/model/<Model>.yaml``, checked here.

RecBole's ``Config`` answers ``None`` for a key nobody set, so a config built without the
model's YAML (a test, a notebook) would train whatever the code makes of ``None``. The models
therefore call ``check_config`` first: it refuses a missing key (naming the key and the file
that defines it) and checks the type and range of every value, after which the model reads
``config[key]`` as RecBole's own models do. ``RULES`` lists each model's keys; a test holds
them, the keys the code reads and the YAML to the same set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import yaml

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.model.modal_features import (
    FEATURE_NORMS,
    ID_MODALITY,
    modality_names,
)
from recbole_dppmg.paths import PROPERTIES_DIR

Rule = Callable[[object], str | None]  # None when the value is fine, else what it must be


def model_yaml(model: str) -> Path:
    """The property file that defines every key of ``model``."""
    return PROPERTIES_DIR / "model" / f"{model}.yaml"


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-05`` as a float, as RecBole's config loader does."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_YamlLoader) or {}


def protocol_keys() -> set[str]:
    """The shared settings of ``properties/overall.yaml`` (RecBole's own keys: batch size,
    learning rate, ...), which a model's property file may override for that model."""
    return set(_load_yaml(PROPERTIES_DIR / "overall.yaml"))


def _model_yaml_parts(model: str, shared: bool) -> dict:
    keys = protocol_keys()
    return {k: v for k, v in _load_yaml(model_yaml(model)).items() if (k in keys) == shared}


def model_defaults(model: str) -> dict:
    """The model's own keys and values in its property file (its defaults, the only ones);
    overrides of the shared settings are left out (``model_overrides``)."""
    return _model_yaml_parts(model, shared=False)


def model_overrides(model: str) -> dict:
    """The shared settings (``properties/overall.yaml``) that ``model``'s property file
    overrides for that model, e.g. DPPMG's training batch size."""
    return _model_yaml_parts(model, shared=True)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(low: int) -> Rule:
    return lambda value: None if _is_int(value) and value >= low else f"an integer >= {low}"


def _number(low: float = 0.0, high: float | None = None) -> Rule:
    bound = f"in [{low}, {high})" if high is not None else f">= {low}"

    def rule(value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
        return None if ok and (high is None or value < high) else f"a number {bound}"

    return rule


def _weight_in_unit_interval(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    return None if ok else "a number in [0, 1]"


def _boolean(value) -> str | None:
    return None if isinstance(value, bool) else "True or False"


def _choice(options: tuple[str, ...]) -> Rule:
    return lambda value: None if value in options else f"one of {', '.join(options)}"


def _mapping(values: Rule | None = None, what: str = "values") -> Rule:
    """None, or a mapping modality -> value (each value checked by ``values``)."""

    def rule(value):
        if value is None:
            return None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return "None or a mapping modality -> value"
        if values is not None and any(values(v) for v in value.values()):
            return f"None or a mapping modality -> {what}"
        return None

    return rule


def _modalities(allow_id: bool) -> Rule:
    what = "a non-empty list of distinct names"
    if not allow_id:
        what += f" without {ID_MODALITY!r} (the model always has ID embeddings)"

    def rule(value):
        names = modality_names(value)
        ok = names is not None and len(set(names)) == len(names) and (allow_id or ID_MODALITY not in names)
        return None if ok else what

    return rule


def _hidden_sizes(value) -> str | None:
    sizes = [value] if _is_int(value) else value
    ok = isinstance(sizes, (list, tuple)) and all(_is_int(h) and h > 0 for h in sizes)
    return None if ok else "a list of positive integers ([] for one linear layer)"


def _fanouts(value) -> str | None:
    ok = isinstance(value, (list, tuple)) and all(_is_int(f) and f >= 1 for f in value)
    return None if ok else "a list of positive integers, one per layer"


def _index_type(value) -> str | None:
    ok = isinstance(value, str) and re.fullmatch(r"flat|ivf[1-9][0-9]*", value) is not None
    return None if ok else "flat or ivf<nlist> (e.g. ivf16)"


# Keys every multimodal model reads through recbole_dppmg.model.modal_features.
_FEATURE_RULES: dict[str, Rule] = {
    "feature_fields": _mapping(lambda v: None if isinstance(v, str) else "a field name", "field name"),
    "mask_fields": _mapping(lambda v: None if isinstance(v, str) else "a field name", "field name"),
    "feature_dims": _mapping(_integer(1), "positive integer"),
    "feature_norm": _choice(FEATURE_NORMS),
    "embedding_size": _integer(1),
    "reg_weight": _number(),
}

RULES: dict[str, dict[str, Rule]] = {
    "DPPMG": {
        "modalities": _modalities(allow_id=True),
        **_FEATURE_RULES,
        "mlp_hidden_size": _hidden_sizes,
        "n_layers": _integer(0),
        "item_id_residual": _boolean,
        "feature_dropout": _number(0.0, 1.0),
        "graph_dropout": _number(0.0, 1.0),
        "propagation": _choice(("full", "sampled")),
        "fanouts": _fanouts,
        "sampled_encoder_grad": _choice(("batch", "all")),
        "sampled_control_variate": _boolean,
        "sampled_outer_hop": _choice(("grad", "no_grad", "snapshot")),
        "levels": _integer(1),
        "codebook_size": _integer(2),
        "commitment_beta": _number(),
        "vq_weight": _number(),
        "ema_decay": _number(0.0, 1.0),
        "dead_code_threshold": _number(),
        "kmeans_warmup_epochs": _integer(0),
        "continuous_bpr_weight": _number(),
        "loss_type": _choice(("bpr", "softmax")),
        "softmax_temperature": lambda v: None if _number()(v) is None and v > 0 else "a number > 0",
        "score": _choice(("dot", "cosine")),
        "eval_quantized": _boolean,
        "token_index_type": _index_type,
    },
    "VBPR": {
        "modalities": _modalities(allow_id=False),
        **_FEATURE_RULES,
        "content_embedding_size": _integer(1),
    },
    "FREEDOM": {
        "modalities": _modalities(allow_id=False),
        **_FEATURE_RULES,
        "tune_features": _boolean,
        "knn_k": _integer(1),
        "mm_image_weight": _weight_in_unit_interval,
        "n_mm_layers": _integer(0),
        "n_ui_layers": _integer(0),
        "dropout": _number(0.0, 1.0),
        "modal_weight": _number(),
    },
}


def check_config(config, model: str) -> None:
    """Refuse a config that lacks one of ``model``'s keys or holds a bad value, naming the key."""
    yaml_file = model_yaml(model).relative_to(PROPERTIES_DIR.parent)
    for key, rule in RULES[model].items():
        if key not in config:
            raise ConfigError(
                f"{model} key {key} is not set: {yaml_file} defines it (build the config with"
                f" recbole_dppmg.config.build_config, which reads that file)"
            )
        problem = rule(config[key])
        if problem is not None:
            raise ConfigError(f"{model} key {key} = {config[key]!r}: must be {problem}")
    if model == "DPPMG":
        check_sampled_mode(config)


def check_sampled_mode(config) -> None:
    """DPPMG's ``propagation: sampled`` needs one fan-out per layer, and its embedding tables have
    sparse gradients, stepped by lazy Adam (``recbole_dppmg.lazy_adam``, see
    ``recbole_dppmg.trainer``): the shared settings that cannot apply to them are refused."""
    if config["propagation"] != "sampled":
        return
    if len(config["fanouts"]) != config["n_layers"]:
        raise ConfigError(
            f"DPPMG key fanouts = {config['fanouts']!r}: propagation sampled needs one fan-out per layer"
            f" (n_layers = {config['n_layers']})"
        )
    if config["sampled_outer_hop"] == "snapshot" and not config["sampled_control_variate"]:
        raise ConfigError(
            "DPPMG key sampled_outer_hop = 'snapshot' needs sampled_control_variate = true (the outermost hop's"
            " nodes are left at their snapshot values, which only the control variate provides)"
        )
    why = "with DPPMG key propagation = sampled (its embedding tables have sparse gradients)"
    learner = str(config["learner"]).lower() if "learner" in config and config["learner"] is not None else "adam"
    if learner != "adam":
        raise ConfigError(
            f"learner = {config['learner']!r} {why}: must be adam (dense parameters: Adam; tables: lazy Adam)"
        )
    if "weight_decay" in config and config["weight_decay"]:
        raise ConfigError(f"weight_decay = {config['weight_decay']!r} {why}: must be 0 (use reg_weight)")
    if "clip_grad_norm" in config and config["clip_grad_norm"]:
        raise ConfigError(
            f"clip_grad_norm = {config['clip_grad_norm']!r} {why}: must be None (no norm of a sparse gradient)"
        )
