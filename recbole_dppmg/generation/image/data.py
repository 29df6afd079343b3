"""Posters of a dataset as training targets: which items have one, loading them at the
generator's size, and a cache of their latents (encoding 1,644 posters with TAEF2 takes
minutes on a CPU, so it is done once per size and autoencoder, under ``.cache/``).

Training pairs come from stage 1's *training* split through the token export: a user's
preference tokens -> the poster of an item that user rated at least ``min_rating``.
A seeded share of users is held out of the pairs, for the personalization evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from recbole_dppmg.data.item_content import ItemContent
from recbole_dppmg.errors import DataError
from recbole_dppmg.generation.common.user_split import split_users
from recbole_dppmg.paths import CACHE_DIR

logger = logging.getLogger(__name__)


def poster_files(
    dataset: str, poster_dir: str | Path | None = None, dataset_dir: str | Path | None = None
) -> dict[str, Path]:
    """``{item_id: image path}`` for every item of the prepared dataset whose image ``prepare``
    encoded (``ItemContent``); ``poster_dir`` looks the same file names up in another folder."""
    content = ItemContent.load(dataset, dataset_dir).require("image", "the poster stages")
    return (content.with_image_dir(poster_dir) if poster_dir else content).images()


def training_images(
    dataset: str, poster_dir, min_rating: float | None, posters: dict[str, Path] | None = None
) -> tuple[dict[str, Path], float | None]:
    """The images a poster generator trains on and the rating from which a user's pair counts
    as liked (``min_rating``, or the dataset's own like rating when it is None). ``posters``
    given (tests): those, and ``min_rating`` as it is."""
    if posters is not None:
        return posters, min_rating
    content = ItemContent.load(dataset).require("image", "the image generator (its training targets)")
    images = (content.with_image_dir(poster_dir) if poster_dir else content).images()
    return images, content.like_threshold(min_rating)


def load_poster(path: Path, height: int, width: int) -> torch.Tensor:
    """One poster as a ``[3, height, width]`` tensor in [-1, 1] (bicubic resize, RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)


def tensor_to_pil(image: torch.Tensor):
    """``[3, H, W]`` in [-1, 1] -> PIL image."""
    from PIL import Image

    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _fingerprint(paths: list[Path], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def cached_latents(
    posters: dict[str, Path],
    codec,
    height: int,
    width: int,
    codec_id: str,
    batch_size: int = 16,
    cache_dir: Path | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Item ids and their poster latents ``[N, C, h, w]``, computed once and cached."""
    from safetensors.torch import load_file, save_file

    ids = sorted(posters, key=lambda s: (len(s), s))
    paths = [posters[i] for i in ids]
    key = _fingerprint(paths, f"{codec_id}|{height}x{width}")
    cache = Path(cache_dir or CACHE_DIR / "image_latents") / f"latents-{height}x{width}-{key}.safetensors"
    if cache.is_file():
        stored = load_file(str(cache))
        meta = json.loads(cache.with_suffix(".json").read_text())
        if meta["ids"] == ids:
            return ids, stored["latents"].float()
    chunks = []
    for start in tqdm(range(0, len(ids), batch_size), desc="poster latents", unit="batch"):
        batch = torch.stack([load_poster(p, height, width) for p in paths[start : start + batch_size]])
        chunks.append(codec.encode(batch).to(torch.float16))
    latents = torch.cat(chunks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    save_file({"latents": latents.contiguous()}, str(tmp))
    cache.with_suffix(".json").write_text(json.dumps({"ids": ids, "codec": codec_id, "size": [height, width]}))
    tmp.replace(cache)
    return ids, latents.float()


@dataclass
class Pairs:
    """Training pairs (user id, item id), the users they come from, and the held-out users
    (``valid`` + ``test`` of the shared split, never trained on; ``test`` is what is evaluated)."""

    pairs: list[tuple[str, str]]
    train_users: list[str]
    heldout_users: list[str]
    test_users: list[str]


def training_pairs(
    tokens, item_ids_with_poster, min_rating: float, valid_users: int, test_users: int, seed: int
) -> Pairs:
    """(user, liked item with a poster) from the training split of the shared user split's
    training users (``generation.user_split``: the same held-out users as the text generator)."""
    have = set(item_ids_with_poster)
    split = split_users(list(tokens.users), valid_users, test_users, seed)
    pairs = [
        (u, item)
        for u in split["train"]
        for item, _ in tokens.history(u, "train", min_rating=min_rating)
        if item in have
    ]
    if not pairs:
        raise DataError(
            f"no training pairs for the image generator: no training-split rating >= {min_rating} on an item with "
            "an image (image.min_rating, or the spec's like_rating)"
        )
    return Pairs(pairs, split["train"], split["valid"] + split["test"], split["test"])
