"""Sanity of the reward's judge (``recbole_dppmg/generation/reward/judge.py``) on a real token export.

Real content stands in for generated content:

- personalization: the judge percentile of each user's held-out test items (their real text /
  poster features) against training items and random catalogue items, per modality, for the
  quantized and the continuous user vector; and for posters resized to the image generator's
  size when ``--poster-size`` names cached features (``.cache/poster_features``, written by the
  report) — generated posters are that small;
- consistency: text and poster of the same item vs of two random items, with the items in the
  catalogue and left out of it (generated content is never exactly a catalogue item: the fair
  test), posters at full size and at the generator's size.

    python bench/bench_judge.py                                  # newest export of ml-100k-mm
    python bench/bench_judge.py --tokens saved/ml-100k-mm/DPPMG-<time>/tokens --poster-size 96x64
    python bench/bench_judge.py --consistency-space features --consistency-temperature 1.0
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    from recbole_dppmg.generation.reward.judge import PreferenceJudge
    from recbole_dppmg.paths import CACHE_DIR
    from recbole_dppmg.tokens import PreferenceTokens
    from recbole_dppmg.tokens.export import newest_token_export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k-mm")
    parser.add_argument("--tokens", default=None, help="token export folder (default: the newest of the dataset)")
    parser.add_argument(
        "--poster-size", default="96x64", help="HxW of cached generator-size poster features to check too ('' = skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--consistency-space", default=None, help="reward.consistency_space to test (default: the YAML's)"
    )
    parser.add_argument(
        "--consistency-temperature", type=float, default=None, help="reward.consistency_temperature to test"
    )
    args = parser.parse_args()

    tokens = PreferenceTokens.load(args.tokens or newest_token_export(args.dataset), dataset=args.dataset)
    rng = np.random.default_rng(args.seed)
    print(f"token export: {tokens.folder}")
    print("| user vector | modality | test items | training items | random items | P(test > random) | pairs |")
    print("|---|---|---|---|---|---|---|")
    for user_vector in ("quantized", "continuous"):
        judge = PreferenceJudge.for_dataset(args.dataset, tokens, {"user_vector": user_vector})
        for modality in judge.modalities:
            catalogue = judge.catalogues[modality]
            row = {item: k for k, item in enumerate(catalogue.item_ids)}
            scores = {}
            for split in ("test", "train"):
                users, rows = zip(*[(u, row[i]) for u in tokens.users for i, _ in tokens.history(u, split) if i in row])
                scores[split] = judge.personalization(list(users), modality, catalogue.features[list(rows)])
            users = [u for u in tokens.users for _ in range(5)]
            scores["random"] = judge.personalization(
                users, modality, catalogue.features[rng.integers(0, len(row), len(users))]
            )
            beats = (scores["test"][:, None] > rng.choice(scores["random"], 2000)[None, :]).mean()
            print(
                f"| {user_vector} | {modality} | {scores['test'].mean():.4f} | {scores['train'].mean():.4f} | "
                f"{scores['random'].mean():.4f} | {beats:.3f} | {len(scores['test'])} |"
            )

    overrides = {
        k: v
        for k, v in (
            ("consistency_space", args.consistency_space),
            ("consistency_temperature", args.consistency_temperature),
        )
        if v is not None
    }
    judge = PreferenceJudge.for_dataset(args.dataset, tokens, overrides)
    text = dict(zip(judge.catalogues["text"].item_ids, judge.catalogues["text"].features))
    image = dict(zip(judge.catalogues["image"].item_ids, judge.catalogues["image"].features))
    small = None
    if args.poster_size:
        found = glob.glob(str(CACHE_DIR / "poster_features" / f"features-{args.poster_size}-*.npz"))
        if found:
            with np.load(found[0]) as stored:
                small = dict(zip([str(i) for i in stored["ids"]], stored["features"]))
            users, features, full = zip(
                *[
                    (u, small[i], image[i])
                    for u in tokens.users
                    for i, _ in tokens.history(u, "test")
                    if i in small and i in image
                ]
            )
            random = np.stack(list(small.values()))[rng.integers(0, len(small), len(users))]
            print(
                f"\nposters at {args.poster_size}: judge percentile of test items "
                f"{judge.personalization(list(users), 'image', np.stack(features)).mean():.4f}, "
                f"random posters {judge.personalization(list(users), 'image', random).mean():.4f}, "
                f"test items at full size {judge.personalization(list(users), 'image', np.stack(full)).mean():.4f} "
                f"({len(users)} pairs)"
            )
        else:
            print(f"\nno cached poster features at {args.poster_size} (run --stage evaluate once)")

    items = judge.joint_items
    picked = rng.choice(len(items), min(300, len(items)), replace=False)
    shuffle = rng.permutation(len(picked))
    t = np.stack([text[items[k]] for k in picked])
    posters = {"full size": np.stack([image[items[k]] for k in picked])}
    if small is not None and all(items[k] in small for k in picked):
        posters[args.poster_size] = np.stack([small[items[k]] for k in picked])
    print(
        f"\nconsistency ({judge.config['consistency_space']} space, {judge.config['consistency_measure']}, temperature "
        f"{judge.config['consistency_temperature']}): text and poster of the same item vs of random pairs"
    )
    full = {m: judge.joint[m] for m in judge.joint}
    keep = np.setdiff1d(np.arange(len(items)), picked)
    for where, joint in (
        ("in the catalogue", full),
        ("left out of the catalogue", {m: v[keep] for m, v in full.items()}),
    ):
        judge.joint = joint
        for size, p in posters.items():
            same, unrelated = judge.consistency(t, p), judge.consistency(t, p[shuffle])
            print(
                f"  items {where}, posters {size}: same item {same.mean():.4f}, random pair {unrelated.mean():.4f}, "
                f"P(same > random) {(same[:, None] > unrelated[None, :]).mean():.3f}"
            )
    judge.joint = full


if __name__ == "__main__":
    main()
