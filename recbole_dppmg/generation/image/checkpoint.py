"""A poster generator's run folder, whichever the backbone: ``model.safetensors`` (the weights
the model's ``weights()`` gives) and ``run.json`` (its record: format, dataset, token export,
model, vocabulary shape, training settings, held-out users), each written to a temporary file and
renamed, plus the small model's ``train_state.pt`` for an exact resume (``weights_only=True``
loadable). ``train.py`` writes the small model's runs, ``sd.py`` a Stable Diffusion backbone's,
``rl/image.py`` the tuned generator of an RL run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.runs import (
    IMAGE_GEN,
    IMAGE_KINDS,
    RUN_META,
    meta_path,
    read_run_meta,
    run_kind,
    write_run_meta,
)

WEIGHTS_FILE, STATE_FILE = IMAGE_GEN.done, "train_state.pt"
FORMAT = "dppmg-image-diffusion/1"  # the small latent (or pixel) model of train.py
SD_FORMAT = "dppmg-image-sd/1"  # a Stable Diffusion backbone's run (sd.py)


def is_sd_run(meta: dict) -> bool:
    """Whether a run's record is a Stable Diffusion backbone's (``sd.py``)."""
    return meta.get("format") == SD_FORMAT


def vocabulary_record(vocab: PreferenceVocabulary) -> dict:
    """The token vocabulary's shape as a run records it (checked when the run is loaded)."""
    return {
        "modalities": vocab.modalities,
        "levels": vocab.levels,
        "codebook_size": vocab.codebook_size,
        "dim": vocab.dim,
    }


def poster_size(meta: dict) -> tuple[int, int]:
    """(height, width) of a run's posters."""
    return meta["model"]["height"], meta["model"]["width"]


def refuse_existing_run(folder: Path) -> None:
    """A new run never overwrites a finished one (or a folder that recorded one)."""
    if run_kind(folder) is not None or meta_path(folder, IMAGE_KINDS) is not None:
        raise CheckpointError(f"{folder} already holds an image generator; pass resume=True or another folder")


def save_checkpoint(
    folder: Path, model, meta: dict, train_state: dict | None = None, kind: str = IMAGE_GEN.name
) -> None:
    """Weights + config (+ training state), each written to a temp file and renamed; ``kind``
    is the run kind ``run.json`` records (an RL run saves its tuned generator here too)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.weights().items()}, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    if train_state is not None:
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save(train_state, tmp)
        tmp.replace(folder / STATE_FILE)
    write_run_meta(folder, kind, meta)


def read_image_config(folder: str | Path) -> dict:
    meta = read_run_meta(folder, IMAGE_KINDS)
    if meta is None:
        raise CheckpointError(f"{folder} is not an image generator checkpoint (no {RUN_META})")
    if meta.get("format") not in (FORMAT, SD_FORMAT):
        path = meta_path(folder, IMAGE_KINDS)
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, this code reads {FORMAT!r} or {SD_FORMAT!r}")
    return meta
