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
  nearest other poster (near-duplicates), and the median nearest-real similarity; and for an
  SDEdit start, the share of posters whose nearest real poster is their own start;
- ``paired_differences``: every later run's gaps minus the first run's, paired by user.

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
from recbole_dppmg.generation.common.protocol import bootstrap_interval, judge_gap, own_minus_shuffled, partner_rows
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.data import poster_files, tensor_to_pil
from recbole_dppmg.generation.image.generate import generate_posters, user_context, user_positions
from recbole_dppmg.generation.image.metrics import (
    image_features,
    mean_pair_similarity,
    nearest_real_similarity,
    novelty,
    personal_similarity,
    real_poster_features,
)
from recbole_dppmg.generation.image.train import build_codec, load_image_generator
from recbole_dppmg.generation.report.build import popular_items, top_recommended_items
from recbole_dppmg.generation.reward.heldout_judge import HeldoutJudge
from recbole_dppmg.generation.reward.judge import PreferenceJudge
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger("bench_image_conditioning")


def validation_users(meta: dict, count: int | None) -> list[str]:
    """The generator's validation users: held out of its training, not among its test users."""
    test = {str(u) for u in meta["test_users"]}
    return [str(u) for u in meta["heldout_users"] if str(u) not in test][:count]


def protocol_gaps(features, users, tokens, judges, real, seed) -> dict:
    """Own minus shuffled (a seeded derangement of the users) of one poster per user: the stage-1
    judge (the RL reward's), the held-out judge (EASE + content head, never a reward) and the
    mean similarity to the posters of the user's held-out (test split) items."""
    judge, heldout = judges
    real_ids, real_features = real
    row_of = {item: row for row, item in enumerate(real_ids)}
    held_out = [[row_of[i] for i, _ in tokens.history(u, "test") if i in row_of] for u in users]
    has = [j for j, rows in enumerate(held_out) if rows]
    personal = own_minus_shuffled(
        lambda r, judged_as: personal_similarity(
            features[has][r], real_features, [held_out[has[j]] for j in judged_as]
        ),
        len(has),
        seed,
    )
    keep = ("mean", "ci95", "own", "shuffled", "per_user")
    return {
        "judge_gap_protocol": {k: v for k, v in judge_gap(judge, users, "image", features, seed).items() if k in keep},
        "heldout_judge_gap_protocol": {
            k: v for k, v in judge_gap(heldout, users, "image", features, seed).items() if k in keep
        },
        "personal_similarity_gap": {**{k: personal[k] for k in keep}, "users": len(has)},
    }


def real_rows(users, tokens, judges, real, seed) -> dict:
    """The same measures for real posters: the reference (the poster of the user's top stage-1
    recommendation), the user's own best-rated training poster (what a history SDEdit starts
    from) and one popular poster for everybody (a constant: 0 on every gap)."""
    real_ids, real_features = real
    row_of = {item: row for row, item in enumerate(real_ids)}
    popular = popular_items(tokens, set(real_ids))[0]
    choices = {
        "reference": top_recommended_items(tokens, users, set(real_ids)),
        "history_top": [next((i for i, _ in tokens.history(u, "train") if i in row_of), None) for u in users],
        "constant_popular": [popular] * len(users),
    }
    out = {}
    for name, items in choices.items():
        kept = [j for j, item in enumerate(items) if item is not None]
        features = real_features[[row_of[items[j]] for j in kept]]
        out[name] = {
            "users": len(kept),
            "judge_own": float(judges[0].personalization([users[j] for j in kept], "image", features).mean()),
            **protocol_gaps(features, [users[j] for j in kept], tokens, judges, real, seed),
        }
    return out


def start_copies(model, positions, context, features, real, blend: int = 1) -> dict:
    """How much of each poster is its SDEdit start (the first ``blend`` context posters: retrieved,
    or the history's best): the mean cosine similarity to the closest of them, and the share of
    posters whose nearest real poster is one of them (a copy, however degraded, that the
    catalogue-wide near-duplicate rule can miss). None for a tokens-only generator (no start)."""
    if model.context is None:
        return {"start_similarity": None, "start_is_nearest_real_share": None}
    with torch.no_grad():
        starts = (context if context is not None else model.retrieve(positions))[:, :blend]
    real_ids, real_features = real
    row_of = {item: row for row, item in enumerate(real_ids)}
    start_ids = model.context.ids(starts)
    to_start = np.max(  # a missing poster (a short history) counts as dissimilar (-1)
        [
            np.nan_to_num(
                personal_similarity(
                    features, real_features, [[row_of[ids[j]]] if len(ids) > j else [] for ids in start_ids]
                ),
                nan=-1.0,
            )
            for j in range(starts.shape[1])
        ],
        axis=0,
    )
    return {
        "start_similarity": float(to_start.mean()),
        "start_is_nearest_real_share": float(
            (to_start >= nearest_real_similarity(features, real_features) - 1e-9).mean()
        ),
    }


def measure(checkpoint, strength, blend, tokens, vocab, judges, encoder, real, args) -> dict:
    """``real``: (item ids, EfficientNet features) of the catalogue's posters at the generator's size;
    ``judges``: (stage-1 judge, held-out judge)."""
    judge = judges[0]
    model, meta = load_image_generator(checkpoint, vocab, dataset=args.dataset)
    settings = load_settings("image", {**meta["train"], **meta["model"], "num_threads": 1})
    codec, _ = build_codec(settings)
    users = validation_users(meta, args.users)
    sample = dict(
        steps=args.steps, guidance=args.guidance, batch_size=args.batch, progress=False, strength=strength, blend=blend
    )
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
    same = generate_posters(model, codec, positions, seed=args.seed, context=context, shared_noise=True, **sample)
    feats = {
        name: image_features(encoder, [tensor_to_pil(x) for x in images])
        for name, images in (("own", own), ("shuffled", shuffled), ("same_noise", same))
    }
    own_judge = judge.personalization(users, "image", feats["own"])
    shuffled_judge = judge.personalization(users, "image", feats["shuffled"])
    gap = own_judge - shuffled_judge
    return {
        "checkpoint": str(checkpoint),
        "conditioning": meta["model"].get("conditioning", "tokens"),
        "sdedit_strength": strength,
        "sdedit_blend": blend,
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
        **protocol_gaps(feats["own"], users, tokens, judges, real, args.seed),
        **novelty(feats["own"], real[1]),
        **start_copies(model, positions, context, feats["own"], real, blend),
        "seconds": round(time.perf_counter() - started, 1),
    }


GAPS = ("judge_gap_protocol", "heldout_judge_gap_protocol", "personal_similarity_gap")


def paired_differences(results: list[dict], seed: int) -> list[dict]:
    """Each run's gaps minus the first run's, paired by user (the same validation users and partners
    for every run of one call), with a bootstrap 95% interval: e.g. DPPMG minus the history baseline."""
    out = []
    for run in results[1:]:
        row = {
            "run": run["checkpoint"],
            "strength": run["sdedit_strength"],
            "blend": run["sdedit_blend"],
            "minus": results[0]["checkpoint"],
        }
        for gap in GAPS:
            diff = np.asarray(run[gap]["per_user"]) - np.asarray(results[0][gap]["per_user"])
            row[gap] = {"mean": float(diff.mean()), "ci95": bootstrap_interval(diff, 2000, seed)}
        out.append(row)
    return out


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
    parser.add_argument(
        "--blend", type=int, nargs="+", default=[1], help="image.sdedit_blend values (posters averaged into the start)"
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
    judges = (judge, HeldoutJudge.for_export(tokens, {"image": real}))
    first_meta = json.loads((Path(args.checkpoint[0]) / "run.json").read_text())
    real_posters = real_rows(validation_users(first_meta, args.users), tokens, judges, real, args.seed)
    results = [
        measure(Path(c), strength, blend, tokens, vocab, judges, encoder, real, args)
        for c in args.checkpoint
        for strength in args.strength
        for blend in args.blend
    ]
    out = {
        "dataset": args.dataset,
        "paired_differences": paired_differences(results, args.seed),
        "split": "valid (the generators' validation users; test users never scored here)",
        "sampling": {"seed": args.seed, "steps": args.steps, "guidance": args.guidance},
        "real_catalogue_pair_similarity": mean_pair_similarity(real[1]),
        "real_posters": real_posters,
        "runs": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
