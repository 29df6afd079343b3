"""Tiny inputs for the image-generator tests: a token export written directly in the export
format (no stage-1 training), small PNG posters, and tiny model settings."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
from PIL import Image
from safetensors.numpy import save_file

from recbole_dppmg.tokens.format import FORMAT_VERSION

TINY_MODEL = {
    "space": "pixel",
    "height": 16,
    "width": 8,
    "unet_channels": [8, 16],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 8,
    "norm_num_groups": 4,
    "train_timesteps": 50,
    "conditioning": "tokens",  # the tokens-only generator (retrieval needs more posters than these tests have)
}


def write_tiny_export(
    folder: Path,
    dataset: str = "tiny",
    n_users: int = 6,
    n_items: int = 5,
    levels: int = 2,
    codebook_size: int = 4,
    dim: int = 3,
    seed: int = 0,
    modalities: tuple[str, ...] = ("text", "image"),
) -> Path:
    rng = np.random.default_rng(seed)
    modalities = list(modalities)
    folder.mkdir(parents=True, exist_ok=True)
    books = {m: rng.normal(size=(levels, codebook_size, dim)).astype(np.float32) for m in modalities}
    save_file(books, str(folder / "codebooks.safetensors"))
    np.save(
        folder / "user_codes.npy",
        rng.integers(0, codebook_size, size=(n_users + 1, len(modalities), levels)).astype(np.int32),
    )
    save_file(
        {m: rng.normal(size=(n_users + 1, dim)).astype(np.float32) for m in modalities},
        str(folder / "user_vectors.safetensors"),
    )
    save_file(
        {m: rng.normal(size=(n_items + 1, dim)).astype(np.float32) for m in modalities},
        str(folder / "item_vectors.safetensors"),
    )
    save_file(
        {
            f"{m}.{p}": np.zeros((dim, dim) if p == "weight" else (dim,), np.float32)
            for m in modalities
            for p in ("weight", "bias")
        },
        str(folder / "foldin.safetensors"),
    )
    save_file({"unused": np.zeros(1, np.float32)}, str(folder / "item_encoders.safetensors"))
    users = ["[PAD]"] + [f"u{k}" for k in range(n_users)]
    items = ["[PAD]"] + [f"i{k}" for k in range(n_items)]
    (folder / "ids.json").write_text(json.dumps({"users": users, "items": items}))
    arrays = {}
    for split in ("train", "valid", "test"):
        indptr, indices, values = [0, 0], [], []
        for u in range(n_users):
            chosen = rng.choice(np.arange(1, n_items + 1), size=2, replace=False)
            indices += chosen.tolist()
            values += [5.0, 4.0] if split == "train" else [5.0, 3.0]
            indptr.append(len(indices))
        arrays.update(
            {
                f"{split}_indptr": np.array(indptr),
                f"{split}_indices": np.array(indices),
                f"{split}_values": np.array(values),
            }
        )
    np.savez(folder / "interactions.npz", **arrays)
    for m in modalities:
        for level in range(levels):
            index = faiss.IndexFlatL2(dim)
            index.add(books[m][level])
            faiss.write_index(index, str(folder / f"index_{m}_L{level}.faiss"))
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "modalities": modalities,
        "levels": levels,
        "codebook_size": codebook_size,
        "dim": dim,
        "files": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def write_tiny_posters(folder: Path, n_items: int = 5, size=(10, 14)) -> dict[str, Path]:
    """Solid-colour posters with a stripe, one per item id ``i<k>``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k in range(n_items):
        image = Image.new("RGB", size, (40 * k % 256, 255 - 40 * k % 256, 120))
        for x in range(size[0]):
            image.putpixel((x, k % size[1]), (255, 255, 255))
        path = folder / f"i{k}.png"
        image.save(path)
        out[f"i{k}"] = path
    return out


def tiny_settings(tmp_path: Path, **overrides) -> dict:
    return {
        **TINY_MODEL,
        "batch_size": 4,
        "max_steps": 3,
        "max_minutes": 5,
        "save_every": 2,
        "log_every": 1,
        "warmup_steps": 1,
        "valid_users": 1,
        "test_users": 1,
        "progress": False,
        "num_threads": 1,
        "cache_dir": str(tmp_path / "cache"),
        "sample_steps": 2,
        "sample_batch": 2,
        **overrides,
    }


# image.sd settings for the tiny pipeline of save_tiny_sd_pipeline (a short prompt: its text encoder has 16 positions)
TINY_SD = {
    "prompt_template": "p {tokens}",
    "height": 16,
    "width": 16,
    "batch_size": 2,
    "max_steps": 3,
    "learning_rate": 0.05,
    "device": "cpu",
    "progress": False,
}


def _tiny_clip_tokenizer(folder: Path):
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


def save_tiny_sd_pipeline(root: Path) -> Path:
    """A tiny Stable Diffusion pipeline built from configs (no downloads), saved with
    ``save_pretrained`` to ``root/pipe``: 16-wide CLIP text encoder, 2-level UNet and VAE
    (posters of 16x16 pixels -> 4x8x8 latents)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tiny_clip_tokenizer(root / "tok")
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
