"""Supervised training of the default image generator: a user's preference tokens -> the
poster of an item the user rated highly in the training split (noise-prediction loss on the
poster's normalised latent). Only the token export and the posters are read. With
``image.conditioning`` retrieval or history, each pair also reads its context posters
(``context.py``), never including its own target.

A run folder holds the checkpoint as plain state dicts + JSON, never pickles:
``model.safetensors`` (EMA weights, what sampling uses), ``run.json`` (everything
needed to rebuild the model and check a token export against it), ``train_state.pt`` (raw
weights, optimizer, step and random state: ``weights_only=True`` loadable, for an exact
resume) and ``history.json`` (loss per logged step, seconds); ``checkpoint.py`` writes and reads it.

This module is also where a run is loaded and trained whatever its backbone: ``image.backbone`` a
Stable Diffusion folder sends training to ``sd.py``, and a run recorded in ``SD_FORMAT`` loads as an
``sd.SDPosterModel`` (:func:`load_image_generator`, :func:`run_image_settings`, :func:`run_codec`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from recbole_dppmg.data.featurize import torch_threads
from recbole_dppmg.devices import resolve_device
from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.generation.common.settings import load_settings, sd_backbone
from recbole_dppmg.generation.common.user_split import split_seed
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.autoencoder import (
    ENCODER_FILE,
    PixelCodec,
    default_autoencoder_dir,
    load_autoencoder,
)
from recbole_dppmg.generation.image.checkpoint import (
    FORMAT,
    SD_FORMAT,
    STATE_FILE,
    WEIGHTS_FILE,
    is_sd_run,
    read_image_config,
    refuse_existing_run,
    save_checkpoint,
    vocabulary_record,
)
from recbole_dppmg.generation.image.context import (
    PosterContext,
    check_conditioning,
    retrieval_keys,
    training_contexts,
)
from recbole_dppmg.generation.image.data import (
    cached_latents,
    training_images,
    training_pairs,
)
from recbole_dppmg.generation.image.model import EMA, PosterDiffusion, model_config
from recbole_dppmg.generation.image.sd import (
    load_sd_generator,
    run_sd_settings,
    sd_model_config,
    sd_train_config,
    train_sd_tokens,
)
from recbole_dppmg.paths import SAVED_DIR
from recbole_dppmg.runs import (
    IMAGE_GEN,
    RUN_META,
    new_run_folder,
)
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
# the image keys that describe this machine rather than a run: they override a run's own when it is loaded
LOCAL_KEYS = ("autoencoder_path", "poster_dir", "num_threads")

# The keys of the ``image:`` section a run records under ``train`` (in this order).
TRAIN_KEYS = (
    "autoencoder_path",
    "poster_dir",
    "cache_dir",
    "min_rating",
    "valid_users",
    "test_users",
    "split_seed",
    "seed",
    "batch_size",
    "learning_rate",
    "warmup_steps",
    "cond_dropout",
    "context_dropout",
    "ema_decay",
    "max_steps",
    "max_minutes",
    "save_every",
    "log_every",
    "num_threads",
    "device",
    "progress",
)


def build_codec(settings: dict):
    """(codec, codec id): TAEF2 for latent space, the identity for pixel space."""
    if settings["space"] == "pixel":
        return PixelCodec(), "pixel"
    folder = Path(settings["autoencoder_path"]) if settings["autoencoder_path"] else default_autoencoder_dir()
    codec = load_autoencoder(folder)
    return codec, f"taef2:{(folder / ENCODER_FILE).stat().st_size}"


def run_image_settings(meta: dict, config: dict | None = None):
    """The ``image`` settings a run was trained with, this machine's keys of ``config``
    (:data:`LOCAL_KEYS`) over them: what decoding its posters and finding the real ones read."""
    local = {k: v for k, v in (config or {}).items() if k in LOCAL_KEYS}
    if is_sd_run(meta):
        return run_sd_settings(meta, local)
    return load_settings("image", {**meta["train"], **meta["model"], **local})


def run_codec(model, meta: dict, settings) -> tuple:
    """(codec, codec id) that decode ``model``'s latents: a Stable Diffusion run's own VAE, else
    the autoencoder of ``settings`` (:func:`run_image_settings`)."""
    if is_sd_run(meta):
        return model.codec, meta["codec"]
    return build_codec(settings)


def run_record(settings) -> tuple[str, dict, dict]:
    """``(format, model, train)`` as a run trained on ``settings`` records them: a recorded run with
    the same three (``train`` up to runtime keys) is the same run."""
    if sd_backbone(settings) is not None:
        return SD_FORMAT, sd_model_config(settings), sd_train_config(settings)
    return FORMAT, model_config(settings), {k: settings[k] for k in TRAIN_KEYS}


def recorded_model(meta: dict) -> dict:
    """A run's model record as :func:`run_record` gives it (old small-model runs lack later keys)."""
    return meta.get("model") if is_sd_run(meta) else model_config(meta.get("model"))


# ---------------------------------------------------------------------- the small model
def build_context(
    config: dict, latents: torch.Tensor, item_ids: list[str], tokens=None, train_users: list[str] | None = None
) -> PosterContext | None:
    """The poster context of ``image.conditioning`` over the catalogue ``latents`` (None for
    tokens); retrieval keys from ``tokens`` and ``train_users``, or zeros when they are None (a
    checkpoint's buffers fill them on load)."""
    c = model_config(config)
    if c["conditioning"] == "tokens":
        return None
    keys = center = retrievable = None
    if c["conditioning"] == "retrieval":
        if tokens is not None:
            keys, center, retrievable = retrieval_keys(tokens, item_ids, train_users)
        else:
            dim = config["vocabulary_dim"]
            keys, center = torch.zeros(len(item_ids), dim), torch.zeros(dim)
    return PosterContext(latents, item_ids, c["retrieval_k"], c["cross_attention_dim"], keys, center, retrievable)


def build_model(meta: dict) -> PosterDiffusion:
    """An untrained model of the checkpoint's shape (codebook and poster buffers filled on load)."""
    vocab = meta["vocabulary"]
    n_vectors = len(vocab["modalities"]) * vocab["levels"] * vocab["codebook_size"]
    slots = [m for m in vocab["modalities"] for _ in range(vocab["levels"])]
    config = model_config(meta["model"])
    context = None
    if config["conditioning"] != "tokens":
        factor = 8 if config["space"] == "latent" else 1
        shape = (meta["latent_channels"], config["height"] // factor, config["width"] // factor)
        items = meta["context_items"]
        context = build_context({**config, "vocabulary_dim": vocab["dim"]}, torch.zeros(len(items), *shape), items)
    return PosterDiffusion(
        config, torch.zeros(n_vectors, vocab["dim"]), meta["n_slots"], meta["latent_channels"], slots, context
    )


def load_image_generator(
    folder: str | Path,
    vocab: PreferenceVocabulary | None = None,
    dataset: str | None = None,
    device: str | None = None,
) -> tuple[PosterDiffusion, dict]:
    """The sampling (EMA) model of a run folder and its config; refuses a token export or dataset
    the model was not built for. ``device``: cpu, cuda or auto; None = the CPU for the small model,
    the ``image.sd.device`` a Stable Diffusion run trained with for that (an ``SDPosterModel``)."""
    folder = Path(folder)
    meta = read_image_config(folder)
    if dataset is not None and meta["dataset"] != dataset:
        raise CheckpointError(f"image generator {folder} was trained on {meta['dataset']}, not {dataset}")
    if vocab is not None:
        v = meta["vocabulary"]
        vocab.check_compatible(v["levels"], v["codebook_size"], v["modalities"])
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder / WEIGHTS_FILE} is missing")
    weights = load_file(str(folder / WEIGHTS_FILE))
    if is_sd_run(meta):
        vocab = vocab or PreferenceVocabulary(PreferenceTokens.load(meta["tokens_folder"], dataset=meta["dataset"]))
        model = load_sd_generator(meta, vocab, weights)
        device = device or meta["train"]["device"]
    else:
        model = build_model(meta)
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
            raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit its {RUN_META}: {reason}") from None
    return model.to(resolve_device(device or "cpu", key="image.device")).eval(), meta


# ---------------------------------------------------------------------- loading and training
def train_image_generator(
    dataset: str,
    tokens_folder: str | Path,
    config: dict | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    posters: dict[str, Path] | None = None,
    codec=None,
) -> Path:
    """Train (or, with ``resume``, continue training in ``out_dir``) the poster generator for
    ``max_minutes`` or until ``max_steps``; returns the run folder. With ``image.backbone`` a
    Stable Diffusion folder, the preference tokens of that pipeline instead (``sd.train_sd_tokens``;
    it does not resume: a run is written when its training ended).

    ``posters`` / ``codec`` replace the dataset's posters and the autoencoder (tests)."""

    settings = load_settings("image", config)
    if sd_backbone(settings) is not None:
        if resume:
            raise CheckpointError(f"a Stable Diffusion run does not resume ({out_dir}); start a new one")
        return train_sd_tokens(dataset, tokens_folder, settings, out_dir, posters)
    # the dataset's images first: a dataset without them says so at once and leaves no run folder
    posters, liked = training_images(dataset, settings["poster_dir"], settings["min_rating"], posters)
    tokens = PreferenceTokens.load(tokens_folder, dataset=dataset)
    vocab = PreferenceVocabulary(tokens)
    check_conditioning(settings["conditioning"], tokens.modalities)
    folder = Path(out_dir) if out_dir else new_run_folder(SAVED_DIR, dataset, IMAGE_GEN.name)
    if resume and not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"nothing to resume in {folder} (no {STATE_FILE})")
    if not resume:
        refuse_existing_run(folder)

    with torch_threads(settings["num_threads"]):
        if codec is None:
            codec, codec_id = build_codec(settings)
        else:
            codec_id = type(codec).__name__
        item_ids, latents = cached_latents(
            posters, codec, settings["height"], settings["width"], codec_id, cache_dir=settings["cache_dir"]
        )
        latent_row = {item: k for k, item in enumerate(item_ids)}
        split = training_pairs(
            tokens, item_ids, liked, settings["valid_users"], settings["test_users"], split_seed(settings)
        )
        users = sorted({u for u, _ in split.pairs}, key=lambda s: (len(s), s))
        user_row = {u: k for k, u in enumerate(users)}
        positions = torch.tensor([vocab.ids_for(u) for u in users], dtype=torch.long)
        pair_user = torch.tensor([user_row[u] for u, _ in split.pairs])
        pair_item = torch.tensor([latent_row[i] for _, i in split.pairs])

        torch.manual_seed(settings["seed"])
        context = build_context(settings, latents, item_ids, tokens, split.train_users)
        model = PosterDiffusion(
            settings, vocab.vectors, positions.shape[1], latents.shape[1], vocab.slot_modalities(), context
        )
        model.set_latent_stats(latents)
        # each pair's context posters, its own target left out (None: tokens only)
        pair_context = training_contexts(model, tokens, split.pairs, positions[pair_user])
        # Random draws stay on the CPU generator (same batches and noise on every device).
        device = resolve_device(settings["device"], key="image.device")
        model.to(device)
        latents, positions = latents.to(device), positions.to(device)
        pair_context = None if pair_context is None else pair_context.to(device)
        ema = EMA(model, settings["ema_decay"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=0.0)
        rng = torch.Generator().manual_seed(settings["seed"])
        step, seconds, history = 0, 0.0, []
        meta = {
            "format": FORMAT,
            "dataset": dataset,
            "tokens_folder": str(tokens_folder),
            "model": model.config,
            "latent_channels": latents.shape[1],
            "n_slots": positions.shape[1],
            "vocabulary": vocabulary_record(vocab),
            "codec": codec_id,
            "train": {k: settings[k] for k in TRAIN_KEYS},
            "pairs": len(split.pairs),
            "train_users": len(split.train_users),
            "heldout_users": split.heldout_users,
            "test_users": split.test_users,
            **({"context_items": context.item_ids} if context is not None else {}),
        }
        if resume:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
            old = read_image_config(folder)
            if model_config(old["model"]) != model.config or old["vocabulary"] != meta["vocabulary"]:
                raise CheckpointError(
                    f"{folder} was trained with another model or token vocabulary shape; start a new folder"
                )
            model.load_state_dict(state["model"])
            ema.model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
            optimizer.load_state_dict(state["optimizer"])
            rng.set_state(state["rng"])
            step, seconds = int(state["step"]), float(state["seconds"])
            if (folder / HISTORY_FILE).is_file():
                history = json.loads((folder / HISTORY_FILE).read_text())

        scheduler = model.train_scheduler()
        n_timesteps = scheduler.config.num_train_timesteps
        prediction = settings["prediction_type"]

        def checkpoint():
            meta.update(trained_steps=step, train_seconds=round(seconds, 1))
            save_checkpoint(
                folder,
                ema.model,
                meta,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng.get_state(),
                    "step": step,
                    "seconds": seconds,
                },
            )
            (folder / HISTORY_FILE).write_text(json.dumps(history))

        budget = settings["max_minutes"] * 60
        started = time.perf_counter()
        bar = tqdm(
            total=settings["max_steps"],
            initial=step,
            desc="image generator",
            unit="step",
            disable=not settings["progress"],
        )
        model.train()
        running = None
        while step < settings["max_steps"] and time.perf_counter() - started < budget:
            tick = time.perf_counter()
            batch = torch.randint(len(pair_user), (settings["batch_size"],), generator=rng)
            x0 = model.normalise(latents[pair_item[batch].to(device)])
            noise = torch.randn(x0.shape, generator=rng).to(device)
            t = torch.randint(n_timesteps, (x0.shape[0],), generator=rng).to(device)
            drop = (torch.rand(x0.shape[0], generator=rng) < settings["cond_dropout"]).to(device)
            drop_context = None
            if settings["context_dropout"] > 0:  # drawn only when on: runs without it keep their random stream
                drop_context = (torch.rand(x0.shape[0], generator=rng) < settings["context_dropout"]).to(device)
            noisy = scheduler.add_noise(x0, noise, t)
            target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
            rows = None if pair_context is None else pair_context[batch.to(device)]
            out = model(noisy, t, model.condition(positions[pair_user[batch].to(device)], drop, rows, drop_context))
            loss = torch.nn.functional.mse_loss(out, target)
            for group in optimizer.param_groups:
                group["lr"] = settings["learning_rate"] * min(1.0, (step + 1) / max(1, settings["warmup_steps"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            ema.update(model, step)
            seconds += time.perf_counter() - tick
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if step % settings["log_every"] == 0:
                history.append({"step": step, "loss": round(running, 5), "seconds": round(seconds, 1)})
            if step % settings["save_every"] == 0:
                checkpoint()
        bar.close()
        checkpoint()
    logger.info("image generator: %d steps, %.0f s of training, saved in %s", step, seconds, folder)
    return folder
