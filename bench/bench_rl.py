"""RL of the generators on a dataset, and its effect on held-out users (before vs after RL).

``train``: one RL run (text GRPO or image DDPO) from a warm-up run, judged by the stage-1
model of that run's token export; prints the run folder.

``measure``: on the first --users held-out TEST users of the shared split (never seen by the
generators or by RL) and for each --seeds value, generates text with the warm-up and the RL
text generator and posters (for the first --fd-users test users) with the trained and the RL
image generator, then reports per seed and as mean / std / [min, max] over seeds: the judge
percentile of text (--users) and poster (--fd-users), the
text-poster consistency and the reward total for the pairs (text before, poster before),
(text after, poster before) = what text RL optimised, (text before, poster after) = what image
RL optimised, (after, after) = the joint effect; perplexity of the texts under the frozen base
LM and the Fréchet distance of the posters of --fd-users test users to all real posters.

    python bench/bench_rl.py train text  --run saved/ml-100k-mm/TextGen-<time> [--quick] [--set steps=40 ...]
    python bench/bench_rl.py train image --run saved/ml-100k-mm/ImageGen-<time> [--quick]
    python bench/bench_rl.py measure --text-before saved/.../TextGen-<t> --text-after saved/.../TextRL-<t> \\
        --image-before saved/.../ImageGen-<t> --image-after saved/.../ImageRL-<t> --out rl_effect.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def _judge(dataset: str, tokens_folder: str):
    from recbole_dppmg.generation.reward import PreferenceJudge
    from recbole_dppmg.tokens import PreferenceTokens

    tokens = PreferenceTokens.load(tokens_folder, dataset=dataset)
    return tokens, PreferenceJudge.for_dataset(dataset, tokens)


def train(args) -> None:
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    run = Path(args.run)
    if args.modality == "text":
        from recbole_dppmg.generation.rl_text import train_text_rl

        tokens_folder = json.loads((run / "config.json").read_text())["tokens"]
        _, judge = _judge(args.dataset, tokens_folder)
        out = train_text_rl(args.dataset, run, judge, overrides, quick=args.quick, out_dir=args.out)
    else:
        from recbole_dppmg.generation.image_train import read_image_config
        from recbole_dppmg.generation.rl_image import train_image_rl

        _, judge = _judge(args.dataset, read_image_config(run)["tokens_folder"])
        out = train_image_rl(args.dataset, run, judge, overrides, quick=args.quick, out_dir=args.out)
    print(out)


def _texts(dataset, run: Path, users, seed: int, vocabulary):
    from recbole_dppmg.generation.text_config import text_config
    from recbole_dppmg.generation.text_generate import TokenConditioner, generate_texts
    from recbole_dppmg.generation.text_pipeline import _generation_options, load_text_generator

    cfg = text_config({"num_threads": 1, "progress": False, "device": "cpu"})
    cfg["seed"] = seed
    lm = load_text_generator(run, vocabulary, cfg)
    return generate_texts(lm.model, lm.tokenizer, TokenConditioner(lm, vocabulary), users, **_generation_options(cfg, lm.token_ids))


def _posters(dataset, run: Path, users, seed: int, vocab, codec):
    from recbole_dppmg.generation.image_data import tensor_to_pil
    from recbole_dppmg.generation.image_generate import GENERATE_DEFAULTS, generate_posters, user_positions
    from recbole_dppmg.generation.image_train import load_image_config, load_image_generator

    config = load_image_config()
    gen = {**GENERATE_DEFAULTS, **{k: v for k, v in config.items() if k in GENERATE_DEFAULTS}}
    model, _ = load_image_generator(run, vocab, dataset=dataset)
    images = generate_posters(model, codec, user_positions(vocab, users), seed=seed, steps=gen["sample_steps"], guidance=gen["guidance_scale"],
                              sampler=gen["sampler"], batch_size=gen["sample_batch"], progress=False)
    return [tensor_to_pil(x) for x in images]


def _spread(values):
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "min": float(np.min(values)), "max": float(np.max(values)), "per_seed": values}


def measure(args) -> None:
    from recbole_dppmg.data.featurize import image_encoder_version, load_default_encoder
    from recbole_dppmg.generation.image_data import poster_files
    from recbole_dppmg.generation.image_metrics import frechet_distance, image_features, real_poster_features
    from recbole_dppmg.generation.image_train import build_codec, image_settings, load_image_config, read_image_config
    from recbole_dppmg.generation.text_backbone import load_backbone
    from recbole_dppmg.generation.text_generate import prompt_ids
    from recbole_dppmg.generation.text_injection import read_meta
    from recbole_dppmg.generation.text_metrics import perplexity
    from recbole_dppmg.generation.vocabulary import PreferenceVocabulary

    started = time.perf_counter()
    text_before, text_after = Path(args.text_before), Path(args.text_after)
    image_before, image_after = Path(args.image_before), Path(args.image_after)
    tokens_folder = json.loads((text_before / "config.json").read_text())["tokens"]
    tokens, judge = _judge(args.dataset, tokens_folder)
    vocabulary = PreferenceVocabulary(tokens)
    test = json.loads((text_before / "users.json").read_text())["test"]
    meta = read_image_config(image_before)
    assert [str(u) for u in meta["test_users"]] == [str(u) for u in test], "the generators hold out different test users"
    users, fd_users = test[: args.users], test[: max(args.users, args.fd_users)]
    text_encoder, image_encoder = load_default_encoder("text"), load_default_encoder("image")
    settings = image_settings({**meta["train"], **meta["model"], **{k: v for k, v in load_image_config().items() if k in ("autoencoder_path", "poster_dir")}})
    codec, _ = build_codec(settings)
    _, real = real_poster_features(poster_files(args.dataset, settings["poster_dir"]), settings["height"], settings["width"],
                                   lambda images: image_features(image_encoder, images), cache_key=image_encoder_version())
    base, base_tokenizer, context = None, None, None
    if args.only != "image":
        base, base_tokenizer = load_backbone(read_meta(text_before / "dppmg").backbone, "float32", "cpu")
        context = prompt_ids(base_tokenizer, None)
    rows, samples = {}, {}
    text_runs = {"before": text_before, "after": text_after} if args.only != "image" else {}
    image_runs = {"before": image_before, "after": image_after} if args.only != "text" else {"before": image_before}
    for seed in args.seeds:
        tick = time.perf_counter()
        texts = {name: _texts(args.dataset, run, users, seed, vocabulary) for name, run in text_runs.items()}
        text_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        drawn = users if args.only == "text" else fd_users
        posters = {name: _posters(args.dataset, run, drawn, seed, vocabulary, codec) for name, run in image_runs.items()}
        poster_seconds = time.perf_counter() - tick
        tf = {k: text_encoder.encode([t or " " for t in v], progress=False) for k, v in texts.items()}
        pf = {k: image_features(image_encoder, v) for k, v in posters.items()}
        row = {"text_seconds": text_seconds, "poster_seconds": poster_seconds}
        for t_name in texts:
            row[f"text_{t_name}_judge"] = float(judge.personalization(users, "text", tf[t_name]).mean())
            row[f"text_{t_name}_perplexity"] = perplexity(base, base_tokenizer, [t for t in texts[t_name] if t], context, 16)
        for p_name in posters:
            row[f"image_{p_name}_judge"] = float(judge.personalization(drawn, "image", pf[p_name]).mean())  # every poster drawn
            if args.only != "text":
                row[f"image_{p_name}_fd"] = frechet_distance(pf[p_name], real)
        for t_name in texts:
            for p_name in posters:
                out = judge.reward(users, text_features=tf[t_name], image_features=pf[p_name][: len(users)])
                row[f"consistency_t{t_name}_p{p_name}"] = float(out["consistency"].mean())
                row[f"reward_t{t_name}_p{p_name}"] = float(out["total"].mean())
        rows[seed] = row
        samples[seed] = [{"user": u, **{name: t[k] for name, t in texts.items()}} for k, u in enumerate(users[:10])]
        print(json.dumps({"seed": seed, **{k: round(v, 4) for k, v in row.items()}}), flush=True)
    summary = {k: _spread([rows[s][k] for s in args.seeds]) for k in rows[args.seeds[0]]}
    result = {"dataset": args.dataset, "users": len(users), "fd_users": len(fd_users), "seeds": args.seeds,
              "runs": {"text_before": str(text_before), "text_after": str(text_after), "image_before": str(image_before), "image_after": str(image_after)},
              "summary": summary, "text_samples": samples, "wall_seconds": round(time.perf_counter() - started, 1),
              "num_threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for key, value in summary.items():
        print(f"{key:32s} {value['mean']:.4f} ± {value['std']:.4f}  [{value['min']:.4f}, {value['max']:.4f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", default="ml-100k-mm")
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("modality", choices=["text", "image"])
    t.add_argument("--run", required=True, help="TextGen-* (text) or ImageGen-* (image) run folder")
    t.add_argument("--quick", action="store_true", help="the rl.quick profile")
    t.add_argument("--set", nargs="*", default=[], help="rl.<modality> overrides key=value")
    t.add_argument("--out", help="run folder (default: saved/<dataset>/TextRL-<time> or ImageRL-<time>)")
    m = sub.add_parser("measure")
    for name in ("--text-before", "--text-after", "--image-before", "--image-after"):
        m.add_argument(name, required=True)
    m.add_argument("--users", type=int, default=50, help="held-out test users for the judge metrics and perplexity")
    m.add_argument("--fd-users", type=int, default=200, help="held-out test users whose posters enter the Fréchet distance")
    m.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    m.add_argument("--only", choices=["text", "image"], help="only the text metrics (+ consistency with the pre-RL posters) or only the poster metrics")
    m.add_argument("--out", default="rl_effect.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    train(args) if args.command == "train" else measure(args)


if __name__ == "__main__":
    main()
