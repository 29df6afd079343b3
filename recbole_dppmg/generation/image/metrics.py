"""Image generation metrics in the item image-feature space (EfficientNet-Lite0, 1280-d,
the encoder that made the ``.item`` image features), so "looks like a poster" and "looks like
this user's posters" are measured where stage 1 saw the images.

- Fréchet distance between two feature sets (the FID formula, another backbone).
- Retrieval: rank the catalogue by cosine similarity to the generated poster's features;
  Hit@K / NDCG@K of the user's held-out (test) items, training items excluded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from recbole_dppmg.generation.image.data import load_poster, tensor_to_pil
from recbole_dppmg.paths import CACHE_DIR

logger = logging.getLogger(__name__)


def image_features(encoder, images: Sequence, batch_size: int = 32) -> np.ndarray:
    """Features ``[N, dim]`` of PIL images with the encoder's own preprocessing (shorter side
    to 224 bicubic, centre crop, (x - 127) / 128), as ``EfficientNetLite0ImageEncoder`` does
    for files."""
    from PIL import Image

    size = encoder.image_size
    out = np.zeros((len(images), encoder.dim), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = []
            for image in images[start : start + batch_size]:
                image = image.convert("RGB")
                scale = size / min(image.size)
                new = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
                image = image.resize(new, Image.BICUBIC)
                left, top = (new[0] - size) // 2, (new[1] - size) // 2
                array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
                pixels.append(((array - 127.0) / 128.0).transpose(2, 0, 1))
            maps = encoder.model.extract_features(torch.from_numpy(np.stack(pixels)))
            out[start : start + len(pixels)] = maps.mean(dim=(2, 3)).numpy()
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets ``[N, d]``.

    Tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S_a^1/2 S_b S_a^1/2 (same spectrum), which stays finite when fewer
    samples than dimensions make the covariances singular (scipy's sqrtm does not)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.cov(a, rowvar=False) if len(a) > 1 else np.zeros((a.shape[1], a.shape[1]))
    cov_b = np.cov(b, rowvar=False) if len(b) > 1 else np.zeros((b.shape[1], b.shape[1]))
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def retrieval_metrics(
    query: np.ndarray,
    item_features: np.ndarray,
    targets: list[set[int]],
    exclude: list[set[int]] | None = None,
    k: int = 10,
) -> dict[str, float]:
    """Mean Hit@k and NDCG@k of ``targets[u]`` (item rows) when the catalogue is ranked by
    cosine similarity to ``query[u]``; ``exclude[u]`` rows (the user's training items) are
    removed from the ranking. Users without targets are skipped."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True).clip(1e-8)
    items = item_features / np.linalg.norm(item_features, axis=1, keepdims=True).clip(1e-8)
    scores = q @ items.T
    hits, ndcgs = [], []
    for u, target in enumerate(targets):
        if not target:
            continue
        row = scores[u].copy()
        if exclude is not None and exclude[u]:
            row[list(exclude[u])] = -np.inf
        top = np.argpartition(-row, k)[:k]
        top = top[np.argsort(-row[top])]
        gains = np.array([1.0 if i in target else 0.0 for i in top])
        ideal = (1.0 / np.log2(np.arange(2, min(k, len(target)) + 2))).sum()
        hits.append(float(gains.any()))
        ndcgs.append(float((gains / np.log2(np.arange(2, k + 2))).sum() / ideal))
    return {
        f"hit@{k}": float(np.mean(hits)) if hits else float("nan"),
        f"ndcg@{k}": float(np.mean(ndcgs)) if ndcgs else float("nan"),
        "users": len(hits),
    }


def real_poster_features(
    posters: dict, height: int, width: int, featurize, cache_key: str | None = None, cache_dir=None
) -> tuple[list[str], np.ndarray]:
    """Item ids (sorted as ``image_data.cached_latents`` sorts them) and ``featurize`` features of
    the real posters resized to the generator's ``height`` x ``width``: the reference set of the
    Fréchet distance and the catalogue of poster retrieval, so that generated and real posters
    are compared at the same size. Cached under ``cache_dir`` (default ``.cache/poster_features``)
    when ``cache_key`` names the featurizer (~0.1 s per poster on one CPU thread)."""
    ids = sorted(posters, key=lambda s: (len(s), s))
    path = None
    if cache_key:
        digest = hashlib.sha256(f"{cache_key}|{height}x{width}".encode())
        for item in ids:
            stat = Path(posters[item]).stat()
            digest.update(f"{item}:{Path(posters[item]).name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
        path = (
            Path(cache_dir or CACHE_DIR / "poster_features")
            / f"features-{height}x{width}-{digest.hexdigest()[:16]}.npz"
        )
        if path.is_file():
            with np.load(path) as stored:
                if [str(i) for i in stored["ids"]] == ids:
                    return ids, stored["features"]
    chunks = [
        np.asarray(
            featurize([tensor_to_pil(load_poster(posters[i], height, width)) for i in ids[start : start + 64]]),
            dtype=np.float32,
        )
        for start in tqdm(range(0, len(ids), 64), desc=f"real poster features {height}x{width}", unit="batch")
    ]
    features = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, ids=np.array(ids), features=features)
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(
            json.dumps({"featurizer": cache_key, "size": [height, width], "items": len(ids)})
        )
    return ids, features


def real_frechet_floor(real: np.ndarray, n: int, seeds: Sequence[int]) -> dict:
    """The Fréchet distance of ``n`` random real posters to all real posters: the sampling floor
    a generated set of the same size is read against (mean and range over ``seeds``)."""
    real = np.asarray(real, dtype=np.float64)
    if n < 2 or n > len(real):
        return {"n": n, "mean": None}
    values = [frechet_distance(real[np.random.default_rng(s).choice(len(real), n, replace=False)], real) for s in seeds]
    return {"n": n, "mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    return features / np.clip(np.linalg.norm(features, axis=1, keepdims=True), 1e-12, None)


def mean_pair_similarity(features: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of different rows (between-user diversity of posters
    drawn from the same noise: 1.0 = the seed alone decides the picture)."""
    unit = _unit(features)
    n = len(unit)
    if n < 2:
        return float("nan")
    total = unit.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def near_duplicate_threshold(real: np.ndarray, quantile: float = 0.99) -> float:
    """The ``quantile`` of the real posters' similarities to their nearest *other* poster. Identical
    real posters (one film listed twice, a shared placeholder) are one picture, not each other's
    neighbours: left in, they would put the threshold at 1 and no copy would ever count."""
    real_unit = _unit(real)
    among = real_unit @ real_unit.T
    among[among >= 1.0 - 1e-6] = -np.inf  # itself and its exact copies
    nearest_other = among.max(axis=1)
    return float(np.quantile(nearest_other[np.isfinite(nearest_other)], quantile))


def nearest_real_similarity(generated: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Each generated poster's cosine similarity to its nearest real poster."""
    return (_unit(generated) @ _unit(real).T).max(axis=1)


def novelty(generated: np.ndarray, real: np.ndarray, quantile: float = 0.99, threshold: float | None = None) -> dict:
    """Is a generator copying the catalogue? A generated poster closer to a real one than
    :func:`near_duplicate_threshold` (pass ``threshold`` to reuse it across calls) is a near-duplicate."""
    if threshold is None:
        threshold = near_duplicate_threshold(real, quantile)
    nearest = nearest_real_similarity(generated, real)
    return {
        "near_duplicate_share": float((nearest >= threshold).mean()),
        "median_nearest_real_similarity": float(np.median(nearest)),
        "near_duplicate_threshold": threshold,
    }


def personal_similarity(generated: np.ndarray, real: np.ndarray, item_rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Per poster, the mean cosine similarity to the real posters ``real[item_rows[k]]`` (a user's
    held-out items); NaN where a user has none. Own rows minus a partner's rows, paired by poster,
    is the personalization gap: the same picture judged for two users."""
    gen_unit, real_unit = _unit(generated), _unit(real)
    out = np.full(len(gen_unit), np.nan)
    for k, rows in enumerate(item_rows):
        if len(rows):
            out[k] = float((real_unit[list(rows)] @ gen_unit[k]).mean())
    return out
