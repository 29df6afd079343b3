"""Does the poster depend on the user? Between-user diversity, the judge's own-minus-shuffled gap,
the personalization gap and novelty of poster generators, on the generator's *validation* users
(never its test users).

For each ``--checkpoint`` (an ``ImageGen-*`` run of any ``image.conditioning``) and each
``--strength`` (``image.sdedit_strength``: 1.0 = pure noise, < 1 = SDEdit from the first context
poster), on the validation users of its user split (``heldout_users`` minus ``test_users``):

- between-user diversity: every user's poster drawn from the *same* initial noise
  (``--seed``); the mean cosine similarity of two different users' posters in EfficientNet-Lite0
  feature space (1.0 = the seed alone decides the picture; the real catalogue's pairs are the
  reference);
- the judge (``reward.PreferenceJudge``, stage-1 image channel): posters from the user's own
  tokens and from a partner's tokens (a seeded derangement; the same per-user noise), both
  judged for the user: own minus shuffled tokens, with a bootstrap 95% interval over users; and
  the protocol's gap (``protocol.judge_gap``: own posters judged for their user minus for the
  partner);
- the personalization gap: the poster's mean similarity to the posters of its user's held-out
  (stage-1 test split) items minus to those of the partner's, paired by user, with an interval;
- novelty: the share of posters closer to a real poster than 99% of real posters are to their
  nearest other poster (near-duplicates), and the median nearest-real similarity.

    python bench/bench_image_conditioning.py -d ml-100k-mm --tokens saved/ml-100k-mm/DPPMG-<time>/tokens \\
        --checkpoint saved/ml-100k-mm/ImageGen-<a> saved/ml-100k-mm/ImageGen-<b> --strength 1.0 0.6 \\
        --out bench/results/image_conditioning_ml-100k-mm.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from recbole_dppmg.data.featurize import image_encoder_version, load_default_encoder
from recbole_dppmg.generation.common.protocol import bootstrap_interval, judge_gap, partner_rows
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.data import poster_files, tensor_to_pil
from recbole_dppmg.generation.image.generate import generate_posters, initial_noise, user_context, user_positions
from recbole_dppmg.generation.image.metrics import (
    image_features,
    mean_pair_similarity,
    novelty,
    personal_similarity,
    real_poster_features,
)
from recbole_dppmg.generation.image.train import build_codec, load_image_generator
from recbole_dppmg.generation.reward.judge import PreferenceJudge
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger("bench_image_conditioning")


def same_noise_posters(model, codec, positions, context, seed, steps, guidance, batch, strength=1.0):
    """Every row's poster from the one initial noise of ``seed``."""
    noise = initial_noise(model, 1, seed)
    out = []
    for start in range(0, len(positions), batch):
        rows = positions[start : start + batch]
        rows_context = None if context is None else context[start : start + batch]
        init = model.init_latents(rows, rows_context) if strength < 1.0 else None
        latents = model.sample(
            rows,
            noise.expand(len(rows), *noise.shape[1:]),
            steps=steps,
            guidance=guidance,
            context=rows_context,
            init=init,
            strength=strength,
        )
        out.append(codec.decode(model.denormalise(latents)).cpu())
    return torch.cat(out)


def measure(checkpoint, strength, tokens, vocab, judge, encoder, real, args) -> dict:
    """``real``: (item ids, EfficientNet features) of the catalogue's posters at the generator's size."""
    model, meta = load_image_generator(checkpoint, vocab, dataset=args.dataset)
    settings = load_settings("image", {**meta["train"], **meta["model"], "num_threads": 1})
    codec, _ = build_codec(settings)
    test = {str(u) for u in meta["test_users"]}
    users = [str(u) for u in meta["heldout_users"] if str(u) not in test][: args.users]
    sample = dict(steps=args.steps, guidance=args.guidance, batch_size=args.batch, progress=False, strength=strength)
    started = time.perf_counter()
    positions, context = user_positions(vocab, users), user_context(model, tokens, users)
    partner = partner_rows(len(users), args.seed)
    own = generate_posters(model, codec, positions, seed=args.seed, context=context, **sample)
    shuffled = generate_posters(
        model,
        codec,
        positions[partner],
        seed=args.seed,
        context=None if context is None else context[partner],
        **sample,
    )
    same = same_noise_posters(
        model, codec, positions, context, args.seed, args.steps, args.guidance, args.batch, strength
    )
    feats = {
        name: image_features(encoder, [tensor_to_pil(x) for x in images])
        for name, images in (("own", own), ("shuffled", shuffled), ("same_noise", same))
    }
    own_judge = judge.personalization(users, "image", feats["own"])
    shuffled_judge = judge.personalization(users, "image", feats["shuffled"])
    gap = own_judge - shuffled_judge
    protocol = judge_gap(judge, users, "image", feats["own"], args.seed)
    real_ids, real_features = real
    row_of = {item: row for row, item in enumerate(real_ids)}
    held_out = [[row_of[i] for i, _ in tokens.history(u, "test") if i in row_of] for u in users]
    own_similarity = personal_similarity(feats["own"], real_features, held_out)
    partner_similarity = personal_similarity(feats["own"], real_features, [held_out[p] for p in partner])
    personal_gap = own_similarity - partner_similarity
    personal_gap = personal_gap[np.isfinite(personal_gap)]
    return {
        "checkpoint": str(checkpoint),
        "conditioning": meta["model"].get("conditioning", "tokens"),
        "sdedit_strength": strength,
        "trained_steps": meta.get("trained_steps"),
        "train_seconds": meta.get("train_seconds"),
        "users": len(users),
        "between_user_similarity_same_noise": mean_pair_similarity(feats["same_noise"]),
        "between_user_similarity_own_noise": mean_pair_similarity(feats["own"]),
        "judge_own": float(own_judge.mean()),
        "judge_shuffled_tokens": float(shuffled_judge.mean()),
        "judge_own_minus_shuffled_tokens": {
            "mean": float(gap.mean()),
            "ci95": bootstrap_interval(gap, 2000, args.seed),
        },
        "judge_gap_protocol": {k: protocol[k] for k in ("mean", "ci95", "own", "shuffled")},
        "personal_similarity_gap": {
            "mean": float(personal_gap.mean()),
            "ci95": bootstrap_interval(personal_gap, 2000, args.seed),
            "users": len(personal_gap),
        },
        **novelty(feats["own"], real_features),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", "-d", default="ml-100k-mm")
    parser.add_argument("--tokens", required=True, help="the token export the generators were trained on")
    parser.add_argument("--checkpoint", nargs="+", required=True, help="ImageGen-* run folders")
    parser.add_argument("--users", type=int, default=None, help="first N validation users (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument(
        "--strength", type=float, nargs="+", default=[1.0], help="image.sdedit_strength values (each checkpoint x each)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON file of the figures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    tokens = PreferenceTokens.load(args.tokens, dataset=args.dataset)
    vocab = PreferenceVocabulary(tokens)
    judge = PreferenceJudge.for_dataset(args.dataset, tokens)
    encoder = load_default_encoder("image")
    first = load_settings("image", json.loads((Path(args.checkpoint[0]) / "run.json").read_text())["model"])
    real = real_poster_features(
        poster_files(args.dataset),
        first["height"],
        first["width"],
        lambda images: image_features(encoder, images),
        image_encoder_version(),
    )
    results = [
        measure(Path(c), strength, tokens, vocab, judge, encoder, real, args)
        for c in args.checkpoint
        for strength in args.strength
    ]
    out = {
        "dataset": args.dataset,
        "split": "valid (the generators' validation users; test users never scored here)",
        "sampling": {"seed": args.seed, "steps": args.steps, "guidance": args.guidance},
        "real_catalogue_pair_similarity": mean_pair_similarity(real[1]),
        "runs": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
