"""A contact sheet of posters per user: the user's best-rated training posters, then the poster of
each condition from the same initial noise: DPPMG (own tokens), the history baseline (a history
generator reading the user's own posters), shuffled (another user's tokens) and population (no
tokens). For looking, not scoring: nothing is measured here.

    python bench/poster_sheet.py -d ml-100k-mm --tokens saved/ml-100k-mm/DPPMG-<time>/tokens \\
        --dppmg saved/ml-100k-mm/ImageGen-<retrieval> --history saved/ml-100k-mm/ImageGen-<history> \\
        --out docs/img/poster_sheet_ml-100k-mm.png
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.data import load_poster, poster_files, tensor_to_pil
from recbole_dppmg.generation.image.generate import (
    contact_sheet,
    generate_posters,
    sampling_arguments,
    user_context,
    user_positions,
)
from recbole_dppmg.generation.image.train import build_codec, load_image_generator
from recbole_dppmg.tokens import PreferenceTokens

COLUMNS = ("DPPMG", "history", "shuffled", "population")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", "-d", default="ml-100k-mm")
    parser.add_argument("--tokens", required=True, help="the token export both generators were trained on")
    parser.add_argument("--dppmg", required=True, help="ImageGen-* run of the DPPMG generator (tokens or retrieval)")
    parser.add_argument("--history", required=True, help="ImageGen-* run of the history baseline")
    parser.add_argument("--users", type=int, default=6, help="the first N test users of the generators' split")
    parser.add_argument("--history-posters", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="PNG file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    image = load_settings("image")
    sample = {**sampling_arguments(image), "seed": args.seed, "progress": False}
    tokens = PreferenceTokens.load(args.tokens, dataset=args.dataset)
    vocab = PreferenceVocabulary(tokens)
    dppmg, meta = load_image_generator(Path(args.dppmg), vocab, dataset=args.dataset)
    history, history_meta = load_image_generator(Path(args.history), vocab, dataset=args.dataset)
    if history.conditioning != "history" or history_meta["test_users"] != meta["test_users"]:
        raise SystemExit(f"{args.history} is not a history generator of the same user split as {args.dppmg}")
    codec, _ = build_codec(load_settings("image", {**meta["train"], **meta["model"], "num_threads": 1}))
    users = [str(u) for u in meta["test_users"][: args.users]]
    conditions = [
        generate_posters(dppmg, codec, user_positions(vocab, users), **sample),
        generate_posters(
            history, codec, user_positions(vocab, users), context=user_context(history, tokens, users), **sample
        ),
        generate_posters(dppmg, codec, user_positions(vocab, users, "shuffled", seed=args.seed), **sample),
        generate_posters(dppmg, codec, user_positions(vocab, users, "none"), **sample),
    ]
    posters = poster_files(args.dataset)
    height, width = meta["model"]["height"], meta["model"]["width"]
    rows = []
    for k, user in enumerate(users):
        liked = [i for i, _ in tokens.history(user, "train") if i in posters][: args.history_posters]
        real = [tensor_to_pil(load_poster(posters[i], height, width)) for i in liked]
        rows.append((f"test user {user}: best-rated training posters", real, [tensor_to_pil(c[k]) for c in conditions]))
    out = contact_sheet(rows, Path(args.out), cell=(64, 96), columns=COLUMNS)
    record = {"users": users, "columns": COLUMNS, "dppmg": args.dppmg, "history": args.history, "sampling": sample}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
