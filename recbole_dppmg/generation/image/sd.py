"""The GPU path: any local diffusers Stable Diffusion pipeline (a folder) steered by preference
tokens added to its tokenizer and text encoder, textual-inversion style.

The new token embeddings start as a projection of the stage-1 codebook vectors, scaled to the
norm of the encoder's own embeddings; then only those rows train (gradient of the old rows
zeroed and the old rows restored after each step, so the base vocabulary stays bit-identical),
optionally with LoRA adapters on the UNet's attention. Training pairs are the same as the
default model's: a user's tokens -> the poster of an item the user rated highly. The run folder
holds ``sd_tokens.safetensors`` (new rows, + LoRA weights) and ``sd_config.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from recbole_dppmg.devices import resolve_device
from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import (
    CodebookProjection,
    PreferenceVocabulary,
)
from recbole_dppmg.generation.image.data import (
    load_poster,
    training_images,
    training_pairs,
)
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)

SD_CONFIG, SD_WEIGHTS = "sd_config.json", "sd_tokens.safetensors"


def _device(name: str) -> torch.device:
    return resolve_device(name, key="image.device")


def load_sd_pipeline(path: str | Path, device: str = "auto"):
    """A Stable Diffusion pipeline from a local folder (no hub access)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(_device(device))


def add_preference_tokens(pipe, vocab: PreferenceVocabulary, embeddings: torch.Tensor | None = None) -> tuple[int, int]:
    """Add every preference token to the pipeline's tokenizer and text encoder; new rows =
    ``embeddings`` or the scaled codebook projection. Returns (first new id, count)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    old = len(tokenizer)
    if tokenizer.add_tokens(vocab.strings) != len(vocab):
        raise ConfigError("some preference tokens already exist in the pipeline's tokenizer")
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        if embeddings is None:
            scale = table[:old].norm(dim=1).mean().item()
            embeddings = CodebookProjection(vocab.vectors, table.shape[1], target_scale=scale)()
        table[old:] = embeddings.to(table)
    return old, len(vocab)


def user_prompt(vocab: PreferenceVocabulary, user: str, template: str) -> str:
    return template.format(tokens=" ".join(vocab.strings_for(user)))


def train_sd_tokens(
    pipeline_path: str | Path,
    dataset: str,
    tokens_folder: str | Path,
    config: dict | None,
    out_dir: str | Path,
    posters: dict[str, Path] | None = None,
    pipe=None,
) -> Path:
    """Textual-inversion training of the preference-token embeddings (optionally + UNet LoRA);
    ``config`` overrides the ``image.sd`` settings."""
    from diffusers import DDPMScheduler

    s = load_settings("image", {"sd": config or {}}).sd.to_dict()
    tokens = PreferenceTokens.load(tokens_folder, dataset=dataset)
    vocab = PreferenceVocabulary(tokens)
    pipe = pipe or load_sd_pipeline(pipeline_path, s["device"])
    device = pipe.device
    first, count = add_preference_tokens(pipe, vocab)
    posters, liked = training_images(dataset, s["poster_dir"], s["min_rating"], posters)
    split = training_pairs(tokens, list(posters), liked, s["valid_users"], s["test_users"], s["seed"])
    factor = pipe.vae_scale_factor
    if s["height"] % (factor * 8) or s["width"] % (factor * 8):
        raise ConfigError(
            f"image height/width must be multiples of {factor * 8} for this pipeline, got {s['height']}x{s['width']}"
        )

    for part in (pipe.vae, pipe.unet, pipe.text_encoder):
        part.requires_grad_(False)
    table = pipe.text_encoder.get_input_embeddings().weight
    table.requires_grad_(True)
    frozen_rows = table[:first].detach().clone()
    keep = torch.zeros(table.shape[0], 1, device=table.device)
    keep[first:] = 1
    table.register_hook(lambda grad: grad * keep)
    params = [table]
    if s["lora_rank"]:
        from peft import LoraConfig

        pipe.unet.add_adapter(
            LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_rank"], target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
        params += [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["learning_rate"], weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = torch.Generator().manual_seed(s["seed"])
    pipe.text_encoder.train()
    started, step = time.perf_counter(), 0
    for step in tqdm(range(1, s["max_steps"] + 1), desc="SD preference tokens", disable=not s["progress"]):
        batch = [split.pairs[k] for k in torch.randint(len(split.pairs), (s["batch_size"],), generator=rng).tolist()]
        images = torch.stack([load_poster(posters[item], s["height"], s["width"]) for _, item in batch]).to(
            device, pipe.vae.dtype
        )
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.sample(generator=None) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=rng).to(latents)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=rng).to(device)
        ids = pipe.tokenizer(
            [user_prompt(vocab, u, s["prompt_template"]) for u, _ in batch],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        states = pipe.text_encoder(ids)[0]
        out = pipe.unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=states).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            table[:first] = frozen_rows
        if time.perf_counter() - started > s["max_minutes"] * 60:
            break
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {"embeddings": table[first:].detach().cpu().contiguous()}
    if s["lora_rank"]:
        from peft import get_peft_model_state_dict

        weights.update(
            {f"lora.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()}
        )
    save_file(weights, str(out / SD_WEIGHTS))
    meta = {
        "pipeline": str(pipeline_path),
        "dataset": dataset,
        "tokens_folder": str(tokens_folder),
        "config": s,
        "vocabulary": {
            "modalities": vocab.modalities,
            "levels": vocab.levels,
            "codebook_size": vocab.codebook_size,
            "dim": vocab.dim,
        },
        "trained_steps": step,
        "train_seconds": round(time.perf_counter() - started, 1),
        "heldout_users": split.heldout_users,
        "test_users": split.test_users,
    }
    (out / SD_CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def generate_sd_posters(
    run_folder: str | Path,
    users: list,
    tokens_folder: str | Path,
    seed: int = 0,
    steps: int = 30,
    guidance: float = 7.5,
    pipe=None,
) -> list:
    """PIL posters for ``users`` from a trained token run; user k uses seed ``seed + k``."""

    run_folder = Path(run_folder)
    if not (run_folder / SD_CONFIG).is_file():
        raise CheckpointError(f"{run_folder} is not a Stable Diffusion token run (no {SD_CONFIG})")
    meta = json.loads((run_folder / SD_CONFIG).read_text())
    tokens = PreferenceTokens.load(tokens_folder, dataset=meta["dataset"])
    vocab = PreferenceVocabulary(tokens)
    v = meta["vocabulary"]
    vocab.check_compatible(v["levels"], v["codebook_size"], v["modalities"])
    weights = load_file(str(run_folder / SD_WEIGHTS))
    pipe = pipe or load_sd_pipeline(meta["pipeline"], meta["config"]["device"])
    add_preference_tokens(pipe, vocab, weights["embeddings"])
    lora = {k[5:]: v for k, v in weights.items() if k.startswith("lora.")}
    if lora:
        from peft import LoraConfig, set_peft_model_state_dict

        rank = meta["config"]["lora_rank"]
        pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        set_peft_model_state_dict(pipe.unet, lora)
    c = meta["config"]
    images = []
    for k, user in enumerate(str(u) for u in users):
        generator = torch.Generator().manual_seed(seed + k)
        images += pipe(
            user_prompt(vocab, user, c["prompt_template"]),
            height=c["height"],
            width=c["width"],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
        ).images
    return images
