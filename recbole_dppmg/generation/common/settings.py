"""Typed stage-2 settings: the one loader of ``properties/generation.yaml``.

Each top-level section of the YAML (``text``, ``image``, ``reward``, ``rl``, ``evaluate``) becomes a
frozen dataclass whose fields are the section's keys, in the YAML's order. Defaults are written once,
in the YAML: no field carries a Python default. Callers pass overrides of the same shape, merged
key by key into nested sections (:func:`merge`); unknown keys and bad values (wrong type, out of
range, not an allowed choice) raise :class:`~recbole_dppmg.errors.ConfigError` naming the dotted
key, here, when the settings are loaded. Only checks that need the data or the machine (enough
users to hold out, a visible device, a pipeline's VAE factor) stay where those are known; the one
file looked at here is a Stable Diffusion ``image.backbone``'s ``model_index.json``, so that a wrong
path fails before any stage starts.

A settings object is also a read-only ``dict`` of its fields, so ``s["key"]``, ``s.get``, ``{**s}``
and ``json.dumps(s)`` give exactly what the plain dicts of earlier versions gave (the JSON recorded
in run folders is unchanged).
"""

from __future__ import annotations

import os
import string
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Union

import yaml

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.paths import PROPERTIES_DIR

GENERATION_YAML = PROPERTIES_DIR / "generation.yaml"

TARGET_FIELDS = ("head", "title", "year", "genres", "plot", "user_genres")
PAIR_CHOICES = ("random", "token_score")
GENRE_SOURCES = ("tokens", "history")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TEXT_CONDITIONS = (
    "dppmg",
    "no_tokens",
    "shuffled",
    "soft_prompt",
    "population",
    "history",
    "token_items",
    "real_liked_item",
)
SPACES = ("latent", "pixel")
LATENT_BACKBONE = "latent"  # image.backbone: the small latent model; anything else is a Stable Diffusion folder
IMAGE_CONDITIONINGS = ("tokens", "retrieval", "history")
SAMPLERS = ("dpm", "ddim")
USER_VECTORS = ("quantized", "continuous")
CONSISTENCY_SPACES = ("features", "stage1")
MEASURES = ("js", "bhattacharyya")
ADVANTAGE_SCALES = ("group", "batch", "none", "component")
RL_MODALITIES = ("text", "image")


# ---------------------------------------------------------------------------- value checks
def check_target_template(template) -> str:
    """``template`` if it is a ``str.format`` pattern over :data:`TARGET_FIELDS` only."""
    try:
        fields_used = {name for _, name, _, _ in string.Formatter().parse(str(template)) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"text.target_template {template!r} is not a format string ({exc})") from None
    unknown = sorted(fields_used - set(TARGET_FIELDS))
    if unknown or not fields_used:
        raise ConfigError(
            f"text.target_template {template!r} may only use the fields {{{'}, {'.join(TARGET_FIELDS)}}}"
            + (f", not {{{'}, {'.join(unknown)}}}" if unknown else "")
        )
    return str(template)


def check_genre_settings(source, count) -> None:
    """``text.user_genres_from`` / ``text.user_genres_count``."""
    if source not in GENRE_SOURCES:
        raise ConfigError(f"text.user_genres_from {source!r} is not one of {', '.join(GENRE_SOURCES)}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"text.user_genres_count must be a positive integer, got {count!r}")


def downsample_factor(config: Mapping) -> int:
    """Pixels per latent cell times the UNet's own downsampling."""
    autoencoder = 8 if config["space"] == "latent" else 1
    return autoencoder * 2 ** (len(config["unet_channels"]) - 1)


def check_image_size(config: Mapping, height: int, width: int) -> None:
    factor = downsample_factor(config)
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % factor:
            raise ConfigError(
                f"image.{name}={value} must be a positive multiple of {factor} "
                f"({config['space']} space with {len(config['unet_channels'])} UNet levels)"
            )


def sd_backbone(settings: Mapping) -> Path | None:
    """The Stable Diffusion folder ``image.backbone`` names, None for the small latent model."""
    backbone = settings["backbone"]
    return None if backbone == LATENT_BACKBONE else Path(backbone)


def check_backbone(settings: Mapping, where: str = "image") -> None:
    """``image.backbone``: ``latent`` or a diffusers Stable Diffusion folder, which reads the tokens
    alone (its UNet has no poster context and every token is part of the prompt): ``retrieval`` and
    the SDEdit start do not apply to it, and the ``history`` baseline cannot be one."""
    folder = sd_backbone(settings)
    if folder is None:
        return
    if not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"{where}.backbone={str(folder)!r} is neither {LATENT_BACKBONE!r} nor a diffusers Stable Diffusion folder "
            f"(no {folder / 'model_index.json'})"
        )
    if settings["conditioning"] == "history":  # retrieval (the default) does not apply and is left out: sd.py
        raise ConfigError(
            f"{where}.conditioning=history needs the small latent model: a Stable Diffusion backbone ({folder}) "
            f"reads the preference tokens in its prompt only; use {where}.conditioning=tokens"
        )
    if settings["token_channels"] is not None:
        raise ConfigError(f"{where}.token_channels (the routing ablation) needs the small latent model, not {folder}")


def rule(*, gt=None, ge=None, le=None, choices=None):
    """A field's allowed values: bounds (``gt`` / ``ge`` / ``le``) or ``choices``; no default."""
    return field(metadata={"gt": gt, "ge": ge, "le": le, "choices": choices})


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:  # a path object is accepted where a path is asked for, as before
        return isinstance(value, (str, os.PathLike))
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    if hint is dict:
        return isinstance(value, Mapping)
    raise TypeError(f"settings type {hint} is not supported")


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is list:
        item = typing.get_args(hint)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, _type_name(item))
    if hint is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _check_rule(key: str, value, meta) -> None:
    if value is None or isinstance(value, bool):
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key} must be one of {', '.join(meta['choices'])}, got {value!r}")
    for name, sign, bad in (
        ("gt", ">", lambda v, b: not v > b),
        ("ge", ">=", lambda v, b: v < b),
        ("le", "<=", lambda v, b: v > b),
    ):
        bound = meta.get(name)
        if bound is not None and isinstance(value, (int, float)) and bad(value, bound):
            raise ConfigError(f"{key} must be {sign} {bound}, got {value!r}")


def _plain(value):
    """``value`` with every mapping (settings objects included) as a plain ``dict``."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def merge(base: Mapping, overrides: Mapping | None, schema: type[Section] | None = None) -> dict:
    """``overrides`` over ``base``, nested sections merged key by key.

    With ``schema`` (a settings class) only its section fields nest; a mapping-valued setting
    (``rl.text.then``) is replaced whole. Without it every nested mapping nests (profiles)."""
    out = _plain(base)
    sections = schema.section_fields() if schema is not None else None
    for key, value in (overrides or {}).items():
        nested = isinstance(out.get(key), dict) and isinstance(value, Mapping)
        if nested and (sections is None or key in sections):
            out[key] = merge(out[key], value, sections[key] if sections is not None else None)
        else:
            out[key] = _plain(value)
    return out


# ---------------------------------------------------------------------------- the base class
@dataclass(frozen=True, eq=False)
class Section(dict):
    """A section of ``generation.yaml``: typed fields, readable as a frozen ``dict`` too."""

    LABEL: ClassVar[str] = ""  # what unknown-key errors call a key of this section

    def __post_init__(self):
        dict.update(self, {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def hints(cls) -> dict:
        return typing.get_type_hints(cls)

    @classmethod
    def section_fields(cls) -> dict[str, type[Section]]:
        """``{name: class}`` of the fields that are nested sections."""
        return {
            name: hint
            for name, hint in cls.hints().items()
            if isinstance(hint, type) and issubclass(hint, Section) and name in cls.field_names()
        }

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def check_keys(cls, data: Mapping, where: str) -> None:
        known = cls.field_names()
        unknown = [key for key in data if key not in known]
        if unknown:
            raise ConfigError(
                f"unknown {cls.LABEL} setting {', '.join(f'{where}.{k}' for k in unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )

    @classmethod
    def build(cls, data: Mapping, where: str):
        """A validated instance from a complete mapping of this section's keys."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping of settings, got {data!r}")
        cls.check_keys(data, where)
        missing = [name for name in cls.field_names() if name not in data]
        if missing:
            raise ConfigError(
                f"{where} lacks the setting(s) {', '.join(missing)} (is {GENERATION_YAML.name} complete?)"
            )
        hints, values = cls.hints(), {}
        for f in fields(cls):
            key, value, hint = f"{where}.{f.name}", data[f.name], hints[f.name]
            if isinstance(hint, type) and issubclass(hint, Section):
                values[f.name] = hint.build(value, key)
                continue
            if not _type_ok(value, hint):
                raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")
            _check_rule(key, value, f.metadata)
            values[f.name] = value
        built = cls(**values)
        built.validate(where)
        return built

    def validate(self, where: str) -> None:
        """Checks across fields (none by default)."""

    def to_dict(self) -> dict:
        return _plain(self)

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; pass overrides to load_settings instead")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self):  # copy / deepcopy / pickle rebuild through __init__, not dict item assignment
        return _rebuild, (type(self), {name: getattr(self, name) for name in self.field_names()})


def _rebuild(cls, values):
    return cls(**values)


# ---------------------------------------------------------------------------- text
@dataclass(frozen=True, eq=False)
class TextGenerateSettings(Section):
    """``text.generate``: sampling of the text generator."""

    LABEL: ClassVar[str] = "text generator"
    batch_size: int = rule(ge=1)
    max_new_tokens: int = rule(ge=1)
    do_sample: bool = rule()
    temperature: float = rule(gt=0)
    top_p: float = rule(gt=0, le=1)
    guidance: float = rule(gt=0)
    no_repeat_ngram_size: int = rule(ge=0)


@dataclass(frozen=True, eq=False)
class TextEvaluateSettings(Section):
    """``text.evaluate``: the text-only evaluation on held-out users."""

    LABEL: ClassVar[str] = "text generator"
    split: str = rule(choices=("valid", "test"))
    users: int | None = rule(ge=1)
    seeds: list[int] | None = rule()
    baselines_run: str | None = rule()
    bootstrap: int = rule(ge=1)
    topk: int = rule(ge=1)
    min_test_rating: float | None = rule()
    conditions: list[str] = rule()
    ppl_batch_size: int = rule(ge=1)

    def validate(self, where: str) -> None:
        unknown = [name for name in self.conditions if name not in TEXT_CONDITIONS]
        if unknown:
            raise ConfigError(
                f"{where}.conditions: unknown text evaluation condition {unknown[0]!r} ({', '.join(TEXT_CONDITIONS)})"
            )


@dataclass(frozen=True, eq=False)
class TextSettings(Section):
    """``text``: the causal-LM text generator (warm-up, generation, evaluation)."""

    LABEL: ClassVar[str] = "text generator"
    backbone: str = rule()
    dtype: str = rule(choices=DTYPES)
    device: str = rule()
    num_threads: int | None = rule(ge=1)
    checkpoint_dir: str = rule()
    tokens: str | None = rule()
    generator: str | None = rule()
    output_dir: str | None = rule()
    seed: int = rule()
    split_seed: int | None = rule()
    lora_r: int = rule(ge=0)
    lora_alpha: int = rule(gt=0)
    lora_targets: list[str] = rule()
    content_init: bool = rule()
    slot_vectors: bool = rule()
    prefix_tokens: int = rule(ge=0)
    token_channels: list[str] | None = rule()
    soft_prompt: bool = rule()
    population_prompt: bool = rule()
    history_prompt: bool = rule()
    token_items_prompt: bool = rule()
    history_items: int = rule(ge=1)
    min_rating: float | None = rule()
    pairs_per_user: int = rule(ge=1)
    pair_choice: str = rule()
    train_users: int | None = rule(ge=1)
    valid_users: int = rule(ge=0)
    test_users: int = rule(ge=0)
    target_template: str = rule()
    user_genres_from: str = rule()
    user_genres_count: int = rule()
    max_target_tokens: int = rule(ge=1)
    batch_size: int = rule(ge=1)
    max_steps: int = rule(ge=0)
    learning_rate: float = rule(gt=0)
    weight_decay: float = rule(ge=0)
    warmup_steps: int = rule(ge=0)
    grad_clip: float | None = rule(gt=0)
    contrast_weight: float = rule(ge=0)
    contrast_beta: float = rule(gt=0)
    eval_steps: int = rule(ge=1)
    valid_pairs: int = rule(ge=0)
    save_steps: int = rule(ge=1)
    resume: str | None = rule()
    init_from: str | None = rule()
    progress: bool = rule()
    generate: TextGenerateSettings = rule()
    evaluate: TextEvaluateSettings = rule()

    def validate(self, where: str) -> None:
        check_target_template(self.target_template)
        check_genre_settings(self.user_genres_from, self.user_genres_count)
        if self.pair_choice not in PAIR_CHOICES:
            raise ConfigError(f"text.pair_choice {self.pair_choice!r} is not one of {', '.join(PAIR_CHOICES)}")


# ---------------------------------------------------------------------------- image
@dataclass(frozen=True, eq=False)
class ImageSDSettings(Section):
    """``image.sd``: textual inversion of the preference tokens on a Stable Diffusion pipeline."""

    LABEL: ClassVar[str] = "image"
    prompt_template: str = rule()
    height: int = rule(ge=8)
    width: int = rule(ge=8)
    batch_size: int = rule(ge=1)
    learning_rate: float = rule(ge=0)
    max_steps: int = rule(ge=0)
    max_minutes: float = rule(gt=0)
    lora_rank: int = rule(ge=0)
    min_rating: float | None = rule()
    valid_users: int = rule(ge=0)
    test_users: int = rule(ge=0)
    seed: int = rule()
    split_seed: int | None = rule()
    device: str = rule()
    progress: bool = rule()
    poster_dir: str | None = rule()

    def validate(self, where: str) -> None:
        if "{tokens}" not in self.prompt_template:
            raise ConfigError(f"{where}.prompt_template must contain {{tokens}}, got {self.prompt_template!r}")


@dataclass(frozen=True, eq=False)
class ImageSettings(Section):
    """``image``: the poster diffusion model (training, sampling, evaluation)."""

    LABEL: ClassVar[str] = "image"
    backbone: str = rule()
    space: str = rule(choices=SPACES)
    autoencoder_path: str | None = rule()
    poster_dir: str | None = rule()
    cache_dir: str | None = rule()
    height: int = rule()
    width: int = rule()
    unet_channels: list[int] = rule()
    layers_per_block: int = rule(ge=1)
    attention_head_dim: int = rule(ge=1)
    cross_attention_dim: int = rule(ge=1)
    norm_num_groups: int = rule(ge=1)
    train_timesteps: int = rule(ge=1)
    beta_schedule: str = rule()
    prediction_type: str = rule(choices=("epsilon", "v_prediction"))
    token_channels: list[str] | None = rule()
    conditioning: str = rule(choices=IMAGE_CONDITIONINGS)
    retrieval_k: int = rule(ge=1)
    min_rating: float | None = rule()
    valid_users: int = rule(ge=0)
    test_users: int = rule(ge=0)
    seed: int = rule()
    split_seed: int | None = rule()
    batch_size: int = rule(ge=1)
    learning_rate: float = rule(gt=0)
    warmup_steps: int = rule(ge=0)
    cond_dropout: float = rule(ge=0, le=1)
    context_dropout: float = rule(ge=0, le=1)
    ema_decay: float = rule(ge=0, le=1)
    max_steps: int = rule(ge=0)
    max_minutes: float = rule(gt=0)
    save_every: int = rule(ge=1)
    log_every: int = rule(ge=1)
    device: str = rule()
    num_threads: int | None = rule(ge=1)
    progress: bool = rule()
    checkpoint: str | None = rule()
    output_dir: str | None = rule()
    sample_steps: int = rule(ge=1)
    sampler: str = rule(choices=SAMPLERS)
    guidance_scale: float = rule(gt=0)
    sdedit_strength: float = rule(gt=0, le=1)
    sdedit_blend: int = rule(ge=1)
    sample_seed: int = rule()
    sample_batch: int = rule(ge=1)
    contact_top: int = rule(ge=0)
    sd: ImageSDSettings = rule()

    def validate(self, where: str) -> None:
        if not self.unet_channels:
            raise ConfigError(f"{where}.unet_channels must list at least one width, got {self.unet_channels!r}")
        check_image_size(self, self.height, self.width)
        check_backbone(self, where)


# ---------------------------------------------------------------------------- reward
@dataclass(frozen=True, eq=False)
class RewardSettings(Section):
    """``reward``: the judge of generated content (RL and the report)."""

    LABEL: ClassVar[str] = "reward"
    user_vector: str = rule(choices=USER_VECTORS)
    consistency_space: str = rule(choices=CONSISTENCY_SPACES)
    consistency_measure: str = rule(choices=MEASURES)
    consistency_temperature: float = rule(gt=0)
    text_personalization_weight: float = rule()
    image_personalization_weight: float = rule()
    consistency_weight: float = rule()
    relative: bool = rule()
    clip_path: str | None = rule()
    clip_weight: float = rule()

    def validate(self, where: str) -> None:
        weights = {k: v for k, v in self.items() if k.endswith("_weight")}
        if any(float(v) < 0 for v in weights.values()) or not sum(float(v) for v in weights.values()) > 0:
            raise ConfigError(f"reward weights must be >= 0 and not all 0, got {weights}")


# ---------------------------------------------------------------------------- rl
class _RLPhase(Section):
    """What the two RL modalities share: the ``then`` phase check."""

    LABEL: ClassVar[str] = "RL"

    def validate(self, where: str) -> None:
        if self.group_size < 2:
            raise ConfigError(
                f"{where}.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        then = self.then
        if then is None:
            return
        if not then:
            raise ConfigError(f"{where}.then must be a mapping of {where} settings or None, got {then!r}")
        nested = sorted(set(then) & {"then", "resume"})
        if nested:
            raise ConfigError(
                f"{where}.then cannot set {', '.join(nested)} (one further phase; it starts fresh from the first)"
            )
        self.check_keys(then, f"{where}.then")
        type(self).build({**self, **then, "then": None}, f"{where}.then")


@dataclass(frozen=True, eq=False)
class RLTextSettings(_RLPhase):
    """``rl.text``: GRPO of the text generator's token parameters."""

    steps: int = rule(ge=1)
    users_per_step: int = rule(ge=1)
    group_size: int = rule()
    user_pool: int = rule(ge=1)
    learning_rate: float = rule(gt=0)
    kl_weight: float = rule(ge=0)
    clip_range: float = rule(gt=0)
    inner_epochs: int = rule(ge=1)
    temperature: float = rule(gt=0)
    max_new_tokens: int = rule(ge=1)
    advantage_scale: str = rule(choices=ADVANTAGE_SCALES)
    train_deltas: bool = rule()
    grad_clip: float | None = rule(gt=0)
    save_steps: int = rule(ge=1)
    max_minutes: float | None = rule(gt=0)
    seed: int = rule()
    num_threads: int | None = rule(ge=1)
    partner: str | None = rule()
    resume: str | None = rule()
    then: dict | None = rule()
    progress: bool = rule()


@dataclass(frozen=True, eq=False)
class RLImageSettings(_RLPhase):
    """``rl.image``: DDPO of the image generator's token conditioning."""

    steps: int = rule(ge=1)
    users_per_step: int = rule(ge=1)
    group_size: int = rule()
    user_pool: int = rule(ge=1)
    learning_rate: float = rule(gt=0)
    clip_range: float = rule(gt=0)
    advantage_clip: float = rule(gt=0)
    kl_weight: float = rule(ge=0)
    inner_epochs: int = rule(ge=1)
    sample_steps: int = rule(ge=1)
    eta: float = rule(ge=0)
    guidance_scale: float = rule(gt=0)
    sdedit_strength: float = rule(gt=0, le=1)
    sdedit_blend: int = rule(ge=1)
    timestep_fraction: float = rule(gt=0, le=1)
    train_null: bool = rule()
    advantage_scale: str = rule(choices=ADVANTAGE_SCALES)
    grad_clip: float | None = rule(gt=0)
    save_steps: int = rule(ge=1)
    max_minutes: float | None = rule(gt=0)
    seed: int = rule()
    num_threads: int | None = rule(ge=1)
    partner: str | None = rule()
    resume: str | None = rule()
    then: dict | None = rule()
    progress: bool = rule()


@dataclass(frozen=True, eq=False)
class RLQuickSettings(Section):
    """``rl.quick``: overrides of ``rl.text`` / ``rl.image`` for the quick profile."""

    LABEL: ClassVar[str] = "RL"
    text: dict = rule()
    image: dict = rule()


@dataclass(frozen=True, eq=False)
class RLSettings(Section):
    """``rl``: both modalities' RL and the quick profile's overrides."""

    LABEL: ClassVar[str] = "RL"
    text: RLTextSettings = rule()
    image: RLImageSettings = rule()
    quick: RLQuickSettings = rule()

    def validate(self, where: str) -> None:
        for modality in RL_MODALITIES:
            phase_class = type(self[modality])
            quick = self.quick[modality]
            phase_class.check_keys(quick, f"{where}.quick.{modality}")
            phase_class.build({**self[modality], **quick}, f"{where}.quick.{modality}")


# ---------------------------------------------------------------------------- evaluate
# the text conditions the report generates (the real-content ones are always scored)
GENERATED_TEXT_CONDITIONS = (
    "no_tokens",
    "population",
    "history",
    "token_items",
    "shuffled",
    "soft_prompt",
    "dppmg",
    "dppmg_rl",
)


@dataclass(frozen=True, eq=False)
class EvaluateSettings(Section):
    """``evaluate``: the report of ``--stage evaluate``."""

    LABEL: ClassVar[str] = "evaluate"
    tokens: str | None = rule()
    text_run: str | None = rule()
    image_run: str | None = rule()
    text_rl_run: str | None = rule()
    image_rl_run: str | None = rule()
    image_history_run: str | None = rule()
    text_baselines_run: str | None = rule()
    text_conditions: list[str] | None = rule()
    modalities: list[str] = rule()
    split: str = rule(choices=("valid", "test"))
    users: int | None = rule()
    fd_users: int | None = rule()
    seeds: list[int] = rule()
    topk: int = rule(ge=1)
    min_test_rating: float | None = rule()
    ppl_batch_size: int = rule(ge=1)
    gallery_users: int = rule(ge=0)
    gallery_history: int = rule(ge=0)
    num_threads: int | None = rule(ge=1)
    progress: bool = rule()
    output_dir: str | None = rule()

    def validate(self, where: str) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{where}.seeds must be a list of distinct integers, got {self.seeds!r}")
        if not self.modalities or set(self.modalities) - {"text", "image"}:
            raise ConfigError(f"{where}.modalities must list text and/or image, got {self.modalities!r}")
        for key in ("users", "fd_users"):
            if self[key] is not None and self[key] < 2:
                raise ConfigError(f"{where}.{key} must be an integer >= 2 or None, got {self[key]!r}")
        if self.text_conditions is not None:
            unknown = sorted(set(self.text_conditions) - set(GENERATED_TEXT_CONDITIONS))
            if unknown or "dppmg" not in self.text_conditions:
                raise ConfigError(
                    f"{where}.text_conditions must list dppmg and only generated text conditions "
                    f"({', '.join(GENERATED_TEXT_CONDITIONS)}), got {self.text_conditions!r}"
                )


SECTIONS: dict[str, type[Section]] = {
    "text": TextSettings,
    "image": ImageSettings,
    "reward": RewardSettings,
    "rl": RLSettings,
    "evaluate": EvaluateSettings,
}


# ---------------------------------------------------------------------------- the loader
def read_generation_yaml(path: str | Path | None = None) -> dict:
    """The raw YAML (every section), refused when it is missing or not a mapping."""
    path = Path(path or GENERATION_YAML)
    if not path.is_file():
        raise ConfigError(f"generation config {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a mapping of sections")
    return data


def load_settings(
    section: str, overrides: Mapping | None = None, *, quick: bool = False, path: str | Path | None = None
) -> Section:
    """The ``section`` of ``generation.yaml`` (or ``path``) with ``overrides`` merged in, typed and
    validated. ``quick`` (``rl`` only) first applies the ``rl.quick`` overrides to each modality."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown generation settings section {section!r} (known: {', '.join(SECTIONS)})")
    schema = SECTIONS[section]
    data = read_generation_yaml(path)
    base = data.get(section)
    if not isinstance(base, dict):
        raise ConfigError(f"{path or GENERATION_YAML} has no {section}: section")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"{section} overrides must be a mapping, got {overrides!r}")
    if quick:
        if section != "rl":
            raise ConfigError(f"quick overrides exist for the rl section only, not {section}")
        quick_overrides = base.get("quick") or {}
        for modality in RL_MODALITIES:
            schema.section_fields()[modality].check_keys(quick_overrides.get(modality) or {}, f"rl.quick.{modality}")
        base = merge(base, {m: quick_overrides.get(m) or {} for m in RL_MODALITIES}, schema)
    return schema.build(merge(base, overrides, schema), section)


def rl_phase_settings(
    modality: str, overrides: Mapping | None = None, quick: bool = False, path: str | Path | None = None
) -> Section:
    """``rl.<modality>`` from :func:`load_settings` (``overrides`` are that modality's keys)."""
    if modality not in RL_MODALITIES:
        raise ConfigError(f"RL modality must be text or image, got {modality!r}")
    return load_settings("rl", {modality: overrides or {}}, quick=quick, path=path)[modality]
