"""The one loader of properties/generation.yaml: the YAML and the dataclasses hold the same keys,
bad settings are refused with their dotted key, overrides merge nested sections, profiles load."""

import copy
import json
from dataclasses import MISSING, fields

import pytest

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.generation.common.settings import (
    SECTIONS,
    RLSettings,
    Section,
    TextSettings,
    load_settings,
    merge,
    read_generation_yaml,
    rl_phase_settings,
)
from recbole_dppmg.pipeline import PROFILES_DIR, load_profile


def _compare(schema: type[Section], data: dict, where: str) -> None:
    """Same keys in the same order (the order run folders record them in), recursively."""
    assert list(data) == list(schema.field_names()), where
    sections = schema.section_fields()
    for name in schema.field_names():
        if name in sections:
            _compare(sections[name], data[name], f"{where}.{name}")


def test_every_yaml_key_is_a_field_and_every_field_a_yaml_key():
    data = read_generation_yaml()
    assert list(data) == list(SECTIONS)
    for name, schema in SECTIONS.items():
        _compare(schema, data[name], name)
    # mapping-valued settings hold keys of the section they override
    rl = data["rl"]
    for modality in ("text", "image"):
        phase = RLSettings.section_fields()[modality]
        assert set(rl["quick"][modality]) <= set(phase.field_names())
        assert set(rl[modality]["then"] or {}) <= set(phase.field_names()) - {"then", "resume"}


def test_fields_carry_no_python_defaults():
    """Defaults are written once, in the YAML."""

    def walk(schema):
        for f in fields(schema):
            assert f.default is MISSING and f.default_factory is MISSING, f"{schema.__name__}.{f.name}"
        for nested in schema.section_fields().values():
            walk(nested)

    for schema in SECTIONS.values():
        walk(schema)


@pytest.mark.parametrize(
    "section, overrides, message",
    [
        ("text", {"bogus": 1}, "unknown text generator setting text.bogus"),
        ("text", {"generate": {"bogus": 1}}, "unknown text generator setting text.generate.bogus"),
        ("image", {"bogus": 1}, "unknown image setting image.bogus"),
        ("reward", {"bogus": 1}, "unknown reward setting reward.bogus"),
        ("evaluate", {"bogus": 1}, "unknown evaluate setting evaluate.bogus"),
        ("rl", {"text": {"bogus": 1}}, "unknown RL setting rl.text.bogus"),
        ("rl", {"quick": {"image": {"bogus": 1}}}, "unknown RL setting rl.quick.image.bogus"),
    ],
)
def test_unknown_keys_are_refused_with_their_dotted_name(section, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(section, overrides)


@pytest.mark.parametrize(
    "section, overrides, message",
    [
        ("text", {"max_steps": "many"}, "text.max_steps must be an integer, got 'many'"),
        ("text", {"progress": 1}, "text.progress must be true or false, got 1"),
        ("text", {"generate": {"do_sample": "yes"}}, "text.generate.do_sample must be true or false"),
        ("text", {"lora_targets": "q_proj"}, "text.lora_targets must be a list of strings"),
        ("image", {"num_threads": 1.5}, "image.num_threads must be an integer or None, got 1.5"),
        ("rl", {"image": {"learning_rate": "fast"}}, "rl.image.learning_rate must be a number, got 'fast'"),
        ("rl", {"text": {"then": "component"}}, "rl.text.then must be a mapping or None"),
        ("reward", {"clip_path": 3}, "reward.clip_path must be a string or None, got 3"),
    ],
)
def test_wrong_types_are_refused_with_their_dotted_name(section, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(section, overrides)


@pytest.mark.parametrize(
    "section, overrides, message",
    [
        ("text", {"generate": {"temperature": -1}}, r"text.generate.temperature must be > 0, got -1"),
        ("text", {"generate": {"top_p": 1.5}}, r"text.generate.top_p must be <= 1, got 1.5"),
        ("text", {"dtype": "int8"}, "text.dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
        ("image", {"cond_dropout": 2.0}, "image.cond_dropout must be <= 1, got 2.0"),
        ("image", {"sampler": "euler"}, "image.sampler must be one of dpm, ddim, got 'euler'"),
        ("image", {"width": 60}, "image.width=60 must be a positive multiple of 32"),
        ("rl", {"text": {"then": {"kl_weight": -0.1}}}, r"rl.text.then.kl_weight must be >= 0, got -0.1"),
        ("rl", {"image": {"steps": 0}}, "rl.image.steps must be >= 1, got 0"),
        ("reward", {"consistency_temperature": 0}, "reward.consistency_temperature must be > 0, got 0"),
        ("evaluate", {"topk": 0}, "evaluate.topk must be >= 1, got 0"),
    ],
)
def test_out_of_range_values_are_refused_with_their_dotted_name(section, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(section, overrides)


def test_overrides_merge_nested_sections_key_by_key():
    defaults = load_settings("text")
    cfg = load_settings("text", {"max_steps": 3, "generate": {"temperature": 0.5}})
    assert cfg.max_steps == cfg["max_steps"] == 3 and cfg.generate.temperature == 0.5
    assert {k: v for k, v in cfg.generate.items() if k != "temperature"} == {
        k: v for k, v in defaults.generate.items() if k != "temperature"
    }
    assert isinstance(cfg.generate, Section) and cfg.evaluate == defaults.evaluate
    # a mapping-valued setting (the next RL phase) is replaced whole, not merged
    assert rl_phase_settings("text", {"then": {"kl_weight": 0.5}}).then == {"kl_weight": 0.5}
    # quick first, then the caller's overrides
    quick = rl_phase_settings("text", {"steps": 5}, quick=True)
    assert quick.steps == 5 and quick.user_pool == read_generation_yaml()["rl"]["quick"]["text"]["user_pool"]
    # without a schema (profile over command line) every nested mapping merges
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}, "d": [1]}


def test_settings_read_as_the_plain_dicts_run_folders_record():
    cfg = load_settings("text", {"seed": 7})
    plain = cfg.to_dict()
    assert type(plain) is dict and type(plain["generate"]) is dict
    assert json.dumps(cfg) == json.dumps(plain) and cfg == plain and copy.deepcopy(cfg) == cfg
    assert load_settings("text", cfg) == cfg  # a settings object is a valid override
    assert cfg.get("seed") == 7 and {**cfg}["seed"] == 7
    with pytest.raises(TypeError, match="read-only"):
        cfg["seed"] = 1
    with pytest.raises(AttributeError):
        cfg.seed = 1


def test_profiles_load():
    profiles = ["full"] + sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    assert len(profiles) > 1
    for name in profiles:
        profile = load_profile(name)
        for section in ("text", "image", "reward", "evaluate"):
            assert isinstance(load_settings(section, profile[section]), SECTIONS[section])
        rl = profile["rl"]
        for modality in ("text", "image"):
            rl_phase_settings(modality, rl.get(modality), bool(rl.get("quick")))


def test_missing_key_in_the_yaml_is_refused(tmp_path):
    data = read_generation_yaml()
    del data["text"]["seed"]
    path = tmp_path / "generation.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="text lacks the setting.*seed"):
        load_settings("text", path=path)
    assert TextSettings.field_names()[0] == "backbone"
