"""The Stable Diffusion path on a tiny pipeline assembled from configs (no downloads):
training moves only the new preference-token embeddings, and generation uses them."""

import json

import pytest
import torch
from image_fixtures import write_tiny_export, write_tiny_posters

from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.generation.image.sd import (
    generate_sd_posters,
    load_sd_pipeline,
    train_sd_tokens,
)


def _tiny_tokenizer(folder):
    """A byte-level CLIP tokenizer with no merges: every character is a token."""
    from transformers import CLIPTokenizer

    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = [chr(b) for b in printable] + [chr(256 + k) for k in range(256 - len(printable))]  # GPT-2 byte alphabet
    vocab = {c: k for k, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(root / "tok")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def _state(pipe):
    return {
        f"{name}.{k}": v.detach().clone()
        for name in ("text_encoder", "unet", "vae")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def test_only_new_token_embeddings_change(tmp_path, tiny_pipeline):
    export = write_tiny_export(tmp_path / "tokens")
    posters = write_tiny_posters(tmp_path / "posters")
    pipe = load_sd_pipeline(tiny_pipeline, "cpu")
    old_vocab = len(pipe.tokenizer)
    before = _state(pipe)
    config = {
        "height": 16,
        "width": 16,
        "batch_size": 2,
        "max_steps": 3,
        "learning_rate": 0.05,
        "progress": False,
        "device": "cpu",
        "valid_users": 1,
        "test_users": 1,
    }
    run = train_sd_tokens(tiny_pipeline, "tiny", export, config, tmp_path / "run", posters=posters, pipe=pipe)
    after = _state(pipe)
    key = next(k for k in after if k.startswith("text_encoder.") and k.endswith("token_embedding.weight"))
    assert after[key].shape[0] == old_vocab + 16  # 2 modalities x 2 levels x 4 codes
    assert torch.equal(after[key][:old_vocab], before[key])
    changed = [k for k in before if k != key and not torch.equal(before[k], after[k])]
    assert changed == []
    # the trained rows are saved and used by generation on a fresh pipeline
    images = generate_sd_posters(run, ["u0", "u1"], export, seed=1, steps=2)
    assert len(images) == 2 and images[0].size == (16, 16)
    again = generate_sd_posters(run, ["u0"], export, seed=1, steps=2)
    assert list(again[0].getdata()) == list(images[0].getdata())


def test_embeddings_actually_train(tmp_path, tiny_pipeline):
    export = write_tiny_export(tmp_path / "tokens")
    posters = write_tiny_posters(tmp_path / "posters")
    pipe = load_sd_pipeline(tiny_pipeline, "cpu")
    config = {
        "height": 16,
        "width": 16,
        "batch_size": 2,
        "max_steps": 1,
        "learning_rate": 0.0,
        "progress": False,
        "device": "cpu",
        "valid_users": 1,
        "test_users": 1,
    }
    start = train_sd_tokens(tiny_pipeline, "tiny", export, config, tmp_path / "a", posters=posters, pipe=pipe)
    trained = train_sd_tokens(
        tiny_pipeline,
        "tiny",
        export,
        {**config, "max_steps": 3, "learning_rate": 0.05},
        tmp_path / "b",
        posters=posters,
    )
    from safetensors.torch import load_file

    a, b = (
        load_file(str(start / "sd_tokens.safetensors"))["embeddings"],
        load_file(str(trained / "sd_tokens.safetensors"))["embeddings"],
    )
    assert a.shape == b.shape == (16, 16) and not torch.allclose(a, b)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a diffusers pipeline folder"):
        load_sd_pipeline(tmp_path)
