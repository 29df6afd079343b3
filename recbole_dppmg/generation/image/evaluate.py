"""Evaluation of the poster generator (DESIGN "Evaluation of generation", image part).

Quality: Fréchet distance (EfficientNet-Lite0 features) between ``n_fd`` generated posters and
all real posters at the generator's size, for the trained model, the same architecture
untrained, a per-pixel mean poster, and the autoencoder's reconstructions of real posters
(the ceiling this size and autoencoder allow).

Personalization on the users held out of generator training: rank the catalogue (real poster
features, same size) by similarity to the generated poster; Hit@K / NDCG@K of the user's test
items, training and validation items excluded; conditions: the user's DPPMG tokens, no tokens
(the null sequence), another held-out user's tokens, and as a reference the real poster of the
user's best-rated training item. Same starting noise per user in every condition.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from recbole_dppmg.data.featurize import (
    image_encoder_version,
    load_default_encoder,
    torch_threads,
)
from recbole_dppmg.devices import module_device
from recbole_dppmg.errors import DataError
from recbole_dppmg.generation.common.protocol import (
    evaluation_users,
    own_minus_shuffled,
    random_hit_rate,
    retrieval_scorer,
)
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.checkpoint import is_sd_run, poster_size
from recbole_dppmg.generation.image.data import (
    cached_latents,
    load_poster,
    poster_files,
    tensor_to_pil,
)
from recbole_dppmg.generation.image.generate import (
    GENERATE_KEYS,
    generate_posters,
    sampling_arguments,
    user_context,
    user_positions,
)
from recbole_dppmg.generation.image.metrics import (
    frechet_distance,
    image_features,
    real_frechet_floor,
    real_poster_features,
    retrieval_metrics,
)
from recbole_dppmg.generation.image.sd import load_sd_generator
from recbole_dppmg.generation.image.train import (
    build_model,
    load_image_generator,
    run_codec,
    run_image_settings,
)
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)


def evaluate_image_generator(
    dataset: str,
    tokens_folder: str | Path,
    checkpoint: str | Path,
    config: dict | None = None,
    n_fd: int = 500,
    topk: int = 10,
    max_users: int | None = None,
    out_dir: str | Path | None = None,
    split: str = "test",
) -> dict:
    """All figures as a dict; also written to ``<out_dir>/image_eval.json`` and ``.md``."""

    config = dict(config or {})
    image = load_settings("image", config)
    gen = {k: image[k] for k in GENERATE_KEYS}
    tokens = PreferenceTokens.load(tokens_folder, dataset=dataset)
    vocab = PreferenceVocabulary(tokens)
    model, meta = load_image_generator(checkpoint, vocab, dataset=dataset, device=image["device"])
    settings = run_image_settings(meta, config)
    height, width = poster_size(meta)
    out_dir = Path(out_dir or Path(checkpoint) / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = sampling_arguments(gen)
    result = {
        "checkpoint": str(checkpoint),
        "trained_steps": meta.get("trained_steps"),
        "train_seconds": meta.get("train_seconds"),
        "size": [height, width],
        "sampling": sample,
    }

    with torch_threads(settings["num_threads"]):
        encoder = load_default_encoder("image")
        codec, codec_id = run_codec(model, meta, settings)
        posters = poster_files(dataset, settings["poster_dir"])
        item_ids, latents = cached_latents(posters, codec, height, width, codec_id)
        logger.info("features of %d real posters at %dx%d", len(item_ids), height, width)
        feature_ids, real = real_poster_features(
            posters, height, width, lambda images: image_features(encoder, images), image_encoder_version()
        )
        if feature_ids != item_ids:
            raise DataError("real poster features and latents list the posters in different orders")
        rng = np.random.default_rng(gen["sample_seed"])

        # ---------------------------------------------------------------- quality
        fd_users = [tokens.users[k] for k in rng.choice(len(tokens.users), n_fd, replace=n_fd > len(tokens.users))]
        fd = {}
        started = time.perf_counter()
        fd_context = user_context(model, tokens, fd_users)
        trained = generate_posters(model, codec, user_positions(vocab, fd_users), context=fd_context, **sample)
        result["seconds_per_poster"] = (time.perf_counter() - started) / n_fd
        trained_images = [tensor_to_pil(x) for x in trained]
        fd["trained"] = frechet_distance(image_features(encoder, trained_images), real)
        untrained = _untrained(model, meta, vocab, latents, settings).to(module_device(model))
        raw = generate_posters(untrained.eval(), codec, user_positions(vocab, fd_users), context=fd_context, **sample)
        fd["untrained"] = frechet_distance(image_features(encoder, [tensor_to_pil(x) for x in raw]), real)
        mean_poster = torch.stack([load_poster(posters[i], height, width) for i in item_ids]).mean(0)
        fd["mean_poster"] = frechet_distance(
            np.repeat(image_features(encoder, [tensor_to_pil(mean_poster)]), n_fd, 0), real
        )
        rows = rng.choice(len(item_ids), min(n_fd, len(item_ids)), replace=False)
        recon = torch.cat([codec.decode(latents[rows[s : s + 32]]) for s in range(0, len(rows), 32)])
        fd["autoencoder_reconstruction"] = frechet_distance(
            image_features(encoder, [tensor_to_pil(x) for x in recon]), real
        )
        fd["real_floor"] = real_frechet_floor(real, n_fd, [0, 1, 2])  # real-vs-real at the same N
        result["frechet_distance"] = fd
        grid = [trained_images[k] for k in range(min(32, n_fd))]
        _save_grid(grid, out_dir / "samples_trained.png")
        _save_grid([tensor_to_pil(x) for x in raw[:32]], out_dir / "samples_untrained.png")

        # ---------------------------------------------------------------- personalization
        row_of = {item: k for k, item in enumerate(item_ids)}
        test = [str(u) for u in meta["test_users"]]
        valid = [str(u) for u in meta.get("heldout_users", []) if str(u) not in set(test)]
        pool = evaluation_users({"valid": valid, "test": test}, split)  # valid: for choosing settings
        users = [u for u in pool if any(i in row_of for i, _ in tokens.history(u, "test"))]
        users = users[:max_users] if max_users else users
        targets = [{row_of[i] for i, _ in tokens.history(u, "test") if i in row_of} for u in users]
        exclude = [
            {row_of[i] for s in ("train", "valid") for i, _ in tokens.history(u, s) if i in row_of} for u in users
        ]
        retrieval = {}
        for mode in ("tokens", "none", "shuffled"):
            positions = user_positions(vocab, users, mode, seed=gen["sample_seed"])
            context = user_context(model, tokens, users, mode, seed=gen["sample_seed"])
            images = generate_posters(model, codec, positions, context=context, **sample)
            feats = image_features(encoder, [tensor_to_pil(x) for x in images])
            name = {"tokens": "dppmg_tokens", "none": "no_tokens", "shuffled": "shuffled_tokens"}[mode]
            retrieval[name] = retrieval_metrics(feats, real, targets, exclude, topk)
            scorer = retrieval_scorer(feats, real, [list(t) for t in targets], [list(e) for e in exclude], topk)
            gap = own_minus_shuffled(scorer, len(users), gen["sample_seed"])
            retrieval[name][f"gap_ndcg@{topk}"] = {k: gap[k] for k in ("mean", "ci95", "users")}
        best = [next((row_of[i] for i, _ in tokens.history(u, "train") if i in row_of), None) for u in users]
        keep = [k for k, b in enumerate(best) if b is not None]
        retrieval["real_top_train_poster"] = retrieval_metrics(
            real[[best[k] for k in keep]], real, [targets[k] for k in keep], [exclude[k] for k in keep], topk
        )
        retrieval["random_expected"] = {
            f"hit@{topk}": random_hit_rate([list(t) for t in targets], [list(e) for e in exclude], len(item_ids), topk),
            "users": len(users),
        }
        result["retrieval"] = retrieval
    (out_dir / "image_eval.json").write_text(json.dumps(result, indent=2))
    (out_dir / "image_eval.md").write_text(_markdown(result, topk))
    return result


def _untrained(model, meta: dict, vocab: PreferenceVocabulary, latents: torch.Tensor, settings):
    """The run's architecture before training: a Stable Diffusion run's pipeline with its seeded
    initial token rows; the small model re-initialised with the run's seed, latent statistics,
    codebook and (retrieval / history) catalogue posters."""
    if is_sd_run(meta):
        return load_sd_generator(meta, vocab)
    torch.manual_seed(settings["seed"])
    untrained = build_model(meta)
    untrained.set_latent_stats(latents)
    untrained.projection.codebook_vectors.copy_(vocab.vectors)
    if model.context is not None:  # the same catalogue posters and retrieval keys, untrained projection
        untrained.context.load_state_dict(
            {k: v for k, v in model.context.state_dict().items() if k in dict(untrained.context.named_buffers())},
            strict=False,
        )
    return untrained


def _save_grid(images, path: Path, columns: int = 8) -> None:
    from PIL import Image

    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, -(-len(images) // columns) * h), "white")
    for k, image in enumerate(images):
        sheet.paste(image, ((k % columns) * w, (k // columns) * h))
    sheet.save(path)


def _markdown(result: dict, topk: int) -> str:
    lines = [
        "# Image generator evaluation",
        "",
        f"checkpoint `{result['checkpoint']}`, {result['trained_steps']} steps, "
        f"{result['train_seconds']} s of training, posters {result['size'][0]}x{result['size'][1]}, "
        f"{result['seconds_per_poster']:.3f} s per poster",
        "",
        "| poster set | Fréchet distance to real posters |",
        "|---|---|",
    ]
    for k, v in result["frechet_distance"].items():
        value = v["mean"] if isinstance(v, dict) else v  # real_floor: random real posters vs all, same N
        lines.append(f"| {'real posters (sampling floor at this N)' if k == 'real_floor' else k} | {value:.2f} |")
    lines += [
        "",
        f"| condition (held-out users) | own - shuffled NDCG@{topk} [95% CI] | Hit@{topk} | NDCG@{topk} | users |",
        "|---|---|---|---|---|",
    ]
    for k, v in result["retrieval"].items():
        g = v.get(f"gap_ndcg@{topk}")
        gap = f"{g['mean']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" if g else "–"
        ndcg = v.get(f"ndcg@{topk}", float("nan"))
        lines.append(f"| {k} | {gap} | {v[f'hit@{topk}']:.4f} | {ndcg:.4f} | {v['users']} |")
    return "\n".join(lines) + "\n"
