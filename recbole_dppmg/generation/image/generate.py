"""Seeded poster generation from preference tokens, PNG files and a contact sheet.

Sample ``k`` of a call starts from noise drawn with seed ``sample_seed + k``, so the same
user list, seed and checkpoint give the same posters whatever the batch size, and the
comparisons (tokens / no tokens / shuffled tokens) share their starting noise per user.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from recbole_dppmg.data.featurize import torch_threads
from recbole_dppmg.devices import module_device
from recbole_dppmg.errors import CheckpointError, ConfigError, DataError
from recbole_dppmg.generation.common.settings import check_image_size, load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.context import history_rows
from recbole_dppmg.generation.image.data import load_poster, poster_files, tensor_to_pil
from recbole_dppmg.generation.image.model import PosterDiffusion
from recbole_dppmg.generation.image.train import (
    load_image_generator,
    run_codec,
    run_image_settings,
)
from recbole_dppmg.paths import SAVED_DIR
from recbole_dppmg.runs import IMAGE_GEN, new_run_folder, newest_finished_run
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)

# The keys of the ``image:`` section that sampling reads (a generate call records them in this order).
GENERATE_KEYS = (
    "sample_steps",
    "guidance_scale",
    "sdedit_strength",
    "sdedit_blend",
    "sampler",
    "sample_seed",
    "contact_top",
    "sample_batch",
    "checkpoint",
    "output_dir",
)


def initial_noise(model: PosterDiffusion, count: int, seed: int, first: int = 0) -> torch.Tensor:
    shape = (model.latent_channels, *model.latent_size)
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + k)) for k in range(count)]
    )


def generate_posters(
    model: PosterDiffusion,
    codec,
    positions: torch.Tensor,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 2.0,
    sampler: str = "dpm",
    batch_size: int = 16,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    context: torch.Tensor | None = None,
    strength: float = 1.0,
    shared_noise: bool = False,
    blend: int = 1,
) -> torch.Tensor:
    """Posters ``[N, 3, H, W]`` in [-1, 1] for token positions ``[N, n_slots]`` (a row of -1
    = no preference tokens); ``context`` ``[N, k]``: the history posters of a history
    generator (:func:`user_context`; a retrieval generator retrieves from the tokens);
    ``strength`` < 1: SDEdit from the mean of each row's first ``blend`` context posters
    (``image.sdedit_strength``, ``image.sdedit_blend``);
    ``shared_noise``: every row from the one noise of ``seed`` (is the picture the user's or the seed's?)."""
    c = model.config
    if (height, width) != (None, None) and (height, width) != (c["height"], c["width"]):
        if "unet_channels" in c:  # the small model: say first whether the size could be trained at all
            check_image_size(c, height, width)
        raise ConfigError(
            f"this image generator draws {c['height']}x{c['width']} posters (height x width), not {height}x{width}; "
            "train one at that size"
        )
    strength = effective_strength(model, strength)
    out = []
    for start in tqdm(range(0, len(positions), batch_size), desc="posters", unit="batch", disable=not progress):
        rows = positions[start : start + batch_size]
        if shared_noise:
            noise = initial_noise(model, 1, seed).expand(len(rows), -1, -1, -1)
        else:
            noise = initial_noise(model, len(rows), seed, first=start)
        rows_context = None if context is None else context[start : start + batch_size]
        init = model.init_latents(rows, rows_context, blend) if strength < 1.0 else None
        latents = model.sample(
            rows,
            noise,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            context=rows_context,
            init=init,
            strength=strength,
        )
        out.append(codec.decode(model.denormalise(latents).to(module_device(codec))).cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, c["height"], c["width"])


def effective_strength(model, strength: float) -> float:
    """``image.sdedit_strength`` for ``model``: generators without a poster context (tokens-only, a
    Stable Diffusion pipeline) have no start poster and sample from noise (1.0)."""
    if strength < 1.0 and not getattr(model, "has_start_poster", False):
        logger.info(
            "image.sdedit_strength=%s does not apply to a generator without a poster context: sampling from noise",
            strength,
        )
        return 1.0
    return strength


def sampling_arguments(settings) -> dict:
    """:func:`generate_posters`' sampling keywords from the ``image:`` section's keys."""
    return {
        "seed": settings["sample_seed"],
        "steps": settings["sample_steps"],
        "guidance": settings["guidance_scale"],
        "sampler": settings["sampler"],
        "batch_size": settings["sample_batch"],
        "strength": settings["sdedit_strength"],
        "blend": settings["sdedit_blend"],
    }


def user_positions(vocab: PreferenceVocabulary, users: list[str], mode: str = "tokens", seed: int = 0) -> torch.Tensor:
    """Conditioning per user: its own tokens, none (-1 rows), or another user's (a seeded
    derangement of the list)."""
    return _by_mode(torch.tensor([vocab.ids_for(u) for u in users], dtype=torch.long), mode, seed)


def user_context(model: PosterDiffusion, tokens, users: list[str], mode: str = "tokens", seed: int = 0):
    """Context posters per user for a history generator: its top-rated training posters, none
    (-1 rows) or another user's (the same derangement as :func:`user_positions`, so a shuffled
    user keeps one partner); None for the other generators (a retrieval generator's context
    follows from the positions, shuffled with them)."""
    if model.conditioning != "history":
        return None
    k = model.context.k
    rows = torch.tensor([history_rows(tokens, u, model.context.row_of, k) for u in users], dtype=torch.long)
    return _by_mode(rows, mode, seed)


def _by_mode(rows: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    if mode == "tokens":
        return rows
    if mode == "none":
        return torch.full_like(rows, -1)
    if mode == "shuffled":
        if len(rows) < 2:
            raise DataError("shuffled tokens need at least two users")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(rows))
        return rows[np.roll(order, 1)][np.argsort(order)]  # each user gets another user's tokens
    raise ConfigError(f"unknown conditioning mode {mode!r} (tokens, none, shuffled)")


def context_items(model: PosterDiffusion, positions: torch.Tensor, context: torch.Tensor | None) -> list[list[str]]:
    """The item ids of each row's context posters (empty lists for a tokens-only generator)."""
    if model.context is None:
        return [[] for _ in range(len(positions))]
    with torch.no_grad():
        rows = context if context is not None else model.retrieve(positions.to(module_device(model))).cpu()
    return model.context.ids(rows)


def contact_sheet(
    rows: list[tuple[str, list, object]],
    path: Path,
    cell: tuple[int, int] = (128, 192),
    columns: Sequence[str] = ("generated",),
) -> Path:
    """One row per user: label, the user's top training posters, a gap, then the generated poster
    (or a list of them, one per name in ``columns``: conditions side by side)."""
    from PIL import Image, ImageDraw

    width, height = cell
    rows = [
        (label, real, generated if isinstance(generated, (list, tuple)) else [generated])
        for label, real, generated in rows
    ]
    n_real = max([len(real) for _, real, _ in rows] + [1])
    n_generated = max(len(generated) for _, _, generated in rows) if rows else 1
    label_h, gap = 28, 16
    sheet = Image.new(
        "RGB",
        ((n_real + n_generated) * (width + 4) + gap + 4, len(rows) * (height + label_h + 4) + 4),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for r, (label, real, generated) in enumerate(rows):
        y = 4 + r * (height + label_h + 4)
        draw.text((4, y), label, fill="black")
        for k, image in enumerate(real):
            sheet.paste(image.resize(cell), (4 + k * (width + 4), y + label_h))
        for k, image in enumerate(generated):
            x = 4 + (n_real + k) * (width + 4) + gap
            sheet.paste(
                image.resize(cell, resample=Image.NEAREST if image.width < width else Image.BICUBIC), (x, y + label_h)
            )
            draw.text((x, y + 12), columns[k] if k < len(columns) else "generated", fill="darkred")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def newest_image_run(dataset: str) -> Path:
    """The newest finished image generator run ``saved/<dataset>/ImageGen-*``."""
    run = newest_finished_run(SAVED_DIR, dataset, IMAGE_GEN)
    if run is None:
        raise CheckpointError(
            f"no trained image generator under {SAVED_DIR / dataset}; train one first (or set image.checkpoint)"
        )
    return run


def run_generate_images(
    dataset: str,
    users: list,
    tokens_folder: str | Path,
    config: dict | None = None,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    codec=None,
    posters: dict[str, Path] | None = None,
) -> Path:
    """Write ``<user>.png`` for each user, ``contact_sheet.png`` and ``generated.json``; returns
    the folder (default ``<checkpoint>/generated-<time>/``). ``codec`` / ``posters`` replace
    the autoencoder and the dataset's posters (tests)."""

    config = dict(config or {})
    image = load_settings("image", config)
    settings = {k: image[k] for k in GENERATE_KEYS}
    tokens = PreferenceTokens.load(tokens_folder, dataset=dataset)
    vocab = PreferenceVocabulary(tokens)
    folder = Path(checkpoint or settings["checkpoint"] or newest_image_run(dataset))
    model, meta = load_image_generator(folder, vocab, dataset=dataset, device=image["device"])
    train_settings = run_image_settings(meta, config)
    users = [str(u) for u in users]
    if not users:
        raise DataError("no users given to generate posters for")
    for u in users:
        tokens.user_row(u)  # one clear error for an unknown user before any sampling
    with torch_threads(train_settings["num_threads"]):
        if codec is None:
            codec, _ = run_codec(model, meta, train_settings)
        positions, context = user_positions(vocab, users), user_context(model, tokens, users)
        shown = context_items(model, positions, context)
        images = generate_posters(
            model,
            codec,
            positions,
            **sampling_arguments(settings),
            height=config.get("height"),
            width=config.get("width"),
            context=context,
        )
    out = out_dir or settings["output_dir"]
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = new_run_folder(folder, "", "generated")
    real_posters = posters
    if real_posters is None:
        try:
            real_posters = poster_files(dataset, train_settings["poster_dir"])
        except DataError as exc:  # the sheet still shows the generated posters
            logger.warning("contact sheet without real posters: %s", exc)
            real_posters = {}
    rows, record = [], {}
    for k, user in enumerate(users):
        image = tensor_to_pil(images[k])
        image.save(out / f"{user}.png")
        liked = [item for item, _ in tokens.history(user, "train") if item in real_posters][: settings["contact_top"]]
        real = [tensor_to_pil(load_poster(real_posters[i], 192, 128)) for i in liked]
        rows.append((f"user {user}: " + " ".join(vocab.strings_for(user)), real, image))
        record[user] = {
            "file": f"{user}.png",
            "tokens": vocab.strings_for(user),
            "seed": settings["sample_seed"] + k,
            "top_train_items": liked,
            **({"context_items": shown[k]} if model.context is not None else {}),
        }
    contact_sheet(rows, out / "contact_sheet.png")
    (out / "generated.json").write_text(
        json.dumps({"checkpoint": str(folder), "settings": settings, "users": record}, indent=2)
    )
    logger.info("wrote %d posters and a contact sheet to %s", len(users), out)
    return out
