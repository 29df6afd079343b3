"""The Stable Diffusion path on a tiny pipeline assembled from configs (no downloads):
training moves only the new preference-token embeddings, and generation uses them."""

import pytest
import torch
from image_fixtures import TINY_SD, save_tiny_sd_pipeline, write_tiny_export, write_tiny_posters
from safetensors.torch import load_file

from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.generate import generate_posters, user_positions
from recbole_dppmg.generation.image.sd import load_sd_pipeline, train_sd_tokens
from recbole_dppmg.generation.image.train import load_image_generator
from recbole_dppmg.tokens import PreferenceTokens


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def _state(pipe):
    return {
        f"{name}.{k}": v.detach().clone()
        for name in ("text_encoder", "unet", "vae")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def _config(pipeline, **sd) -> dict:
    return {"backbone": str(pipeline), "num_threads": 1, "sd": {**TINY_SD, "valid_users": 1, "test_users": 1, **sd}}


def test_only_new_token_embeddings_change(tmp_path, tiny_pipeline):
    export = write_tiny_export(tmp_path / "tokens")
    posters = write_tiny_posters(tmp_path / "posters")
    pipe = load_sd_pipeline(tiny_pipeline, "cpu")
    old_vocab = len(pipe.tokenizer)
    before = _state(pipe)
    config = {**_config(tiny_pipeline), "cache_dir": str(tmp_path / "cache")}
    run = train_sd_tokens("tiny", export, config, tmp_path / "run", posters=posters, pipe=pipe)
    after = _state(pipe)
    key = next(k for k in before if k.startswith("text_encoder.") and k.endswith("token_embedding.weight"))
    assert torch.equal(after[key.replace(".weight", ".base.weight")], before[key])  # the base vocabulary
    rows = after[key.replace(".weight", ".rows")]
    assert rows.shape == (16, 16) and len(pipe.tokenizer) == old_vocab + 16  # 2 modalities x 2 levels x 4 codes
    changed = [k for k in before if k != key and not torch.equal(before[k], after[k])]
    assert changed == []
    assert torch.equal(load_file(str(run / "model.safetensors"))["embeddings"], rows)
    # the trained rows are saved and used by generation on a fresh pipeline
    tokens = PreferenceTokens.load(export)
    vocab = PreferenceVocabulary(tokens)
    model, meta = load_image_generator(run, vocab, dataset="tiny")
    assert meta["format"] == "dppmg-image-sd/1" and torch.equal(model.tokens.rows, rows)
    ids = pipe.tokenizer(model.prompts(user_positions(vocab, ["u0"]))).input_ids[0]
    assert sorted(i - old_vocab for i in ids if i >= old_vocab) == sorted(vocab.ids_for("u0"))
    images = generate_posters(model, model.codec, user_positions(vocab, ["u0", "u1"]), seed=1, steps=2, progress=False)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    again = generate_posters(model, model.codec, user_positions(vocab, ["u0"]), seed=1, steps=2, progress=False)
    assert torch.allclose(again[0], images[0], atol=1e-4)  # seeded (batches of other sizes round differently)


def test_embeddings_actually_train(tmp_path, tiny_pipeline):
    export = write_tiny_export(tmp_path / "tokens")
    posters = write_tiny_posters(tmp_path / "posters")
    config = {**_config(tiny_pipeline, max_steps=1, learning_rate=0.0), "cache_dir": str(tmp_path / "cache")}
    start = train_sd_tokens("tiny", export, config, tmp_path / "a", posters=posters)
    config["sd"].update(max_steps=3, learning_rate=0.05)
    trained = train_sd_tokens("tiny", export, config, tmp_path / "b", posters=posters)
    a, b = (load_file(str(run / "model.safetensors"))["embeddings"] for run in (start, trained))
    assert a.shape == b.shape == (16, 16) and not torch.allclose(a, b)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a diffusers pipeline folder"):
        load_sd_pipeline(tmp_path)


def test_a_prompt_that_cuts_the_tokens_off_is_refused(tmp_path, tiny_pipeline):
    export = write_tiny_export(tmp_path / "tokens")
    config = _config(tiny_pipeline, prompt_template="a long movie poster prompt, {tokens}")
    with pytest.raises(ConfigError, match="keeps 0 of a user's 4 preference"):
        train_sd_tokens("tiny", export, config, tmp_path / "run", posters=write_tiny_posters(tmp_path / "posters"))
    assert not (tmp_path / "run").exists()


def test_lora_adapters_train_and_reload(tmp_path, tiny_pipeline):
    export = write_tiny_export(tmp_path / "tokens")
    config = {**_config(tiny_pipeline, lora_rank=2), "cache_dir": str(tmp_path / "cache")}
    run = train_sd_tokens("tiny", export, config, tmp_path / "run", posters=write_tiny_posters(tmp_path / "posters"))
    saved = load_file(str(run / "model.safetensors"))
    lora_b = [k for k in saved if k.startswith("lora.") and "lora_B" in k]
    assert lora_b and any(saved[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: training moved it
    model, _ = load_image_generator(run, PreferenceVocabulary(PreferenceTokens.load(export)), dataset="tiny")
    assert all(torch.equal(v, saved[k]) for k, v in model.weights().items())
    assert not any(p.requires_grad for p in model.parameters())
