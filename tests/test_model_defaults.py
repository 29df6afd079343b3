"""One source of defaults: every key the stage-1 models read is in their YAML, every YAML key is
read and checked, and a config built without the YAML (or with a bad value) fails naming the key."""

import ast
from pathlib import Path

import pytest
from tiny_mm import build_model, tiny_data, write_tiny_mm

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.model import DPPMG, FREEDOM, VBPR
from recbole_dppmg.model.config_check import (
    RULES,
    check_config,
    model_defaults,
    model_overrides,
    model_yaml,
)
from recbole_dppmg.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "recbole_dppmg"
SHARED = PACKAGE / "model" / "modal_features.py"  # read by every multimodal model
# Where each model's keys are read: the model itself and the modal features it loads; DPPMG's
# token_index_type is read by the token export stage.
READERS = {
    "DPPMG": [PACKAGE / "model" / "dppmg.py", SHARED],
    "VBPR": [PACKAGE / "model" / "vbpr.py", SHARED],
    "FREEDOM": [PACKAGE / "model" / "freedom.py", SHARED],
}
ALSO_READ_BY = {"DPPMG": [PACKAGE / "tokens" / "export.py"], "VBPR": [], "FREEDOM": []}


def config_reads(path: Path) -> set[str]:
    """The constant keys of every ``config["..."]`` subscript in ``path`` (f-string keys such as
    the dataset's ``<m>_feature_field`` are dataset properties, not model keys)."""
    keys = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "config"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            keys.add(node.slice.value)
    return keys


@pytest.mark.parametrize("model", ["DPPMG", "VBPR", "FREEDOM"])
def test_every_key_read_is_in_the_yaml_and_every_yaml_key_is_read_and_checked(model):
    yaml_keys = set(model_defaults(model))
    read = set().union(*(config_reads(path) for path in READERS[model]))
    assert read, "no config reads found: the parser no longer sees the model's reads"
    assert read - yaml_keys == set(), f"read by the code but not defined in {model_yaml(model).name}"
    consumers = set().union(read, *(config_reads(path) & yaml_keys for path in ALSO_READ_BY[model]))
    assert yaml_keys - consumers == set(), f"defined in {model_yaml(model).name} but read by nothing"
    assert set(RULES[model]) == yaml_keys, "check_config must check exactly the YAML's keys"


def test_a_model_yaml_may_override_shared_settings_and_the_run_uses_them(tmp_path):
    """DPPMG.yaml sets its own train_batch_size over properties/overall.yaml's."""
    from recbole_dppmg.config import build_config

    overrides = model_overrides("DPPMG")
    assert "train_batch_size" in overrides and "train_batch_size" not in model_defaults("DPPMG")
    config = build_config(DPPMG, "ml-100k-mm", (), {"data_path": str(tmp_path)})
    assert config["train_batch_size"] == overrides["train_batch_size"]


@pytest.mark.parametrize("model", ["DPPMG", "VBPR", "FREEDOM"])
def test_the_yaml_defaults_pass_the_check(model):
    check_config(model_defaults(model), model)


def test_the_model_code_holds_no_fallback_values():
    """No ``config.get(key, default)`` or ``config_value(...)`` left in the model package."""
    for path in (PACKAGE / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(func, "value", None)
                assert name != "config_value", path.name
                assert not (name == "get" and isinstance(owner, ast.Name) and owner.id == "config"), path.name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(DPPMG, write_tiny_mm(tmp_path_factory.mktemp("tiny_defaults")))


@pytest.fixture(scope="module")
def vbpr_data(tmp_path_factory):
    return tiny_data(VBPR, write_tiny_mm(tmp_path_factory.mktemp("tiny_defaults_vbpr")))


@pytest.fixture(scope="module")
def freedom_data(tmp_path_factory):
    return tiny_data(FREEDOM, write_tiny_mm(tmp_path_factory.mktemp("tiny_defaults_freedom")))


def _without(data, key):
    """``data`` whose config lacks ``key``, as a config built without the YAML would."""
    config = data[0]
    saved = config.final_config_dict.pop(key)
    return config, saved


@pytest.mark.parametrize("key", sorted(RULES["DPPMG"]))
def test_a_missing_dppmg_key_is_an_error_naming_it_and_its_yaml(data, key):
    config, saved = _without(data, key)
    try:
        with pytest.raises(ConfigError, match=rf"DPPMG key {key} is not set: properties/model/DPPMG.yaml defines it"):
            build_model(DPPMG, data)
    finally:
        config[key] = saved


@pytest.mark.parametrize("key", sorted(RULES["VBPR"]))
def test_a_missing_vbpr_key_is_an_error_naming_it_and_its_yaml(vbpr_data, key):
    config, saved = _without(vbpr_data, key)
    try:
        with pytest.raises(ConfigError, match=rf"VBPR key {key} is not set: properties/model/VBPR.yaml"):
            build_model(VBPR, vbpr_data)
    finally:
        config[key] = saved


@pytest.mark.parametrize("key", sorted(RULES["FREEDOM"]))
def test_a_missing_freedom_key_is_an_error_naming_it_and_its_yaml(freedom_data, key):
    config, saved = _without(freedom_data, key)
    try:
        with pytest.raises(ConfigError, match=rf"FREEDOM key {key} is not set: properties/model/FREEDOM.yaml"):
            build_model(FREEDOM, freedom_data)
    finally:
        config[key] = saved


BAD_DPPMG_VALUES = [
    ("modalities", []),
    ("modalities", ["text", "text"]),
    ("modalities", [1]),
    ("feature_fields", ["text_feat"]),
    ("mask_fields", {"image": 3}),
    ("feature_dims", {"text": 0}),
    ("feature_norm", "minmax"),
    ("embedding_size", 0),
    ("embedding_size", 8.0),
    ("reg_weight", -1e-5),
    ("mlp_hidden_size", [64, 0]),
    ("mlp_hidden_size", "64"),
    ("n_layers", -1),
    ("n_layers", True),
    ("item_id_residual", "yes"),
    ("item_id_residual", 1),
    ("feature_dropout", 1.0),
    ("feature_dropout", -0.1),
    ("levels", 0),
    ("codebook_size", 1),
    ("codebook_size", "many"),
    ("commitment_beta", -0.25),
    ("vq_weight", -1),
    ("vq_weight", None),
    ("ema_decay", 1.0),
    ("dead_code_threshold", -0.1),
    ("kmeans_warmup_epochs", -1),
    ("kmeans_warmup_epochs", 0.5),
    ("continuous_bpr_weight", "0"),
    ("eval_quantized", "True"),
    ("token_index_type", "hnsw"),
    ("token_index_type", "ivf0"),
    ("propagation", "minibatch"),
    ("fanouts", [10, 0]),
    ("fanouts", 10),
    ("sampled_encoder_grad", "none"),
]


@pytest.mark.parametrize("key,value", BAD_DPPMG_VALUES)
def test_a_bad_dppmg_value_is_an_error_naming_the_key(data, key, value):
    with pytest.raises(ConfigError, match=rf"DPPMG key {key} = .*: must be "):
        build_model(DPPMG, data, **{key: value})


@pytest.mark.parametrize(
    "key,value",
    [("modalities", ["text", "id"]), ("content_embedding_size", 0), ("feature_norm", "unit"), ("reg_weight", "1e-5")],
)
def test_a_bad_vbpr_value_is_an_error_naming_the_key(vbpr_data, key, value):
    with pytest.raises(ConfigError, match=rf"VBPR key {key} = .*: must be "):
        build_model(VBPR, vbpr_data, **{key: value})


BAD_FREEDOM_VALUES = [
    ("modalities", ["text", "id"]),
    ("feature_norm", "unit"),
    ("tune_features", "yes"),
    ("knn_k", 0),
    ("knn_k", 2.5),
    ("mm_image_weight", 1.5),
    ("mm_image_weight", -0.1),
    ("n_mm_layers", -1),
    ("n_ui_layers", True),
    ("dropout", 1.0),
    ("dropout", -0.2),
    ("modal_weight", -1e-4),
    ("reg_weight", None),
]


@pytest.mark.parametrize("key,value", BAD_FREEDOM_VALUES)
def test_a_bad_freedom_value_is_an_error_naming_the_key(freedom_data, key, value):
    with pytest.raises(ConfigError, match=rf"FREEDOM key {key} = .*: must be "):
        build_model(FREEDOM, freedom_data, **{key: value})


def test_freedom_edge_values_are_accepted(freedom_data):
    model = build_model(
        FREEDOM, freedom_data, knn_k=1000, mm_image_weight=1.0, n_mm_layers=0, n_ui_layers=0, dropout=0.0
    )
    assert model.item_graph.values().numel() > 0 and model.propagation.n_layers == 0


def test_edge_values_are_accepted(data):
    model = build_model(
        DPPMG,
        data,
        modalities="text,id",
        n_layers=0,
        mlp_hidden_size=4,
        feature_dropout=0.0,
        codebook_size=2,
        vq_weight=0,
        token_index_type="ivf2",
    )
    assert model.modalities == ["text", "id"] and model.n_layers == 0
