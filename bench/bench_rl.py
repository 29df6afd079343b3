"""RL of the generators on a dataset, and its effect on held-out users (before vs after RL).

``train``: one RL run (text GRPO or image DDPO) from a warm-up run, judged by the stage-1
model of that run's token export; prints the run folder.

``measure``: on the first --users held-out TEST users of the shared split (never seen by the
generators or by RL) and for each --seeds value, generates text with the warm-up and the RL
text generator and posters (for the first --fd-users test users) with the trained and the RL
image generator, then reports per seed and as mean / std / [min, max] over seeds: the judge
percentile of text (--users) and poster (--fd-users), the text-poster consistency and the
reward total for the pairs (text before, poster before), (text after, poster before) = what
text RL optimised, (text before, poster after) = what image RL optimised, (after, after) = the
joint effect; perplexity (frozen base LM) and distinct-2 of the texts; the Fréchet distance of
the posters to all real posters.

    python bench/bench_rl.py train text  --run saved/ml-100k-mm/TextGen-<time> [--quick] [--set steps=40 ...]
    python bench/bench_rl.py train image --run saved/ml-100k-mm/ImageGen-<time> [--quick]
    python bench/bench_rl.py measure --text-before saved/.../TextGen-<t> --text-after saved/.../TextRL-<t> \\
        --image-before saved/.../ImageGen-<t> --image-after saved/.../ImageRL-<t> --out rl_effect.json

``measure`` also writes each seed's row and each user's judge, consistency and reward values, so
seeds measured by parallel calls can be joined: ``combine a.json b.json --out rl_effect.json``
(spread over all seeds; after - before paired by user with a 95% bootstrap interval, and by seed).

``snr``: how much of one step's policy gradient is signal: the gradients of --batches
independent batches (same --users training users, --group samples each, fresh sampling noise)
at the start of RL, and their pairwise cosine (near 0: the step is mostly noise; the same
direction needs ~1/cos^2 times more samples per step).

    python bench/bench_rl.py snr text --run saved/ml-100k-mm/TextGen-<time>
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


def _judge(dataset: str, tokens_folder: str, reward: dict | None = None):
    from recbole_dppmg.generation.reward.judge import PreferenceJudge
    from recbole_dppmg.tokens import PreferenceTokens

    tokens = PreferenceTokens.load(tokens_folder, dataset=dataset)
    return tokens, PreferenceJudge.for_dataset(dataset, tokens, reward)


def _overrides(items: list[str]) -> dict:
    """``key=value`` pairs, each value read as YAML (``relative=True`` -> ``{"relative": True}``)."""
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def _protocol_measures(row, per_user, prefix, users, modality, features, judge, heldout, seed) -> None:
    """The held-out judge's level and the own-minus-shuffled gaps of both judges
    (``generation/common/protocol.py``), into ``row`` (means) and ``per_user`` (per user)."""
    from recbole_dppmg.generation.common.protocol import judge_gap

    row[f"{prefix}_heldout_judge"] = float(np.nanmean(heldout.personalization(users, modality, features)))
    for name, model in (("judge", judge), ("heldout_judge", heldout)):
        gap = judge_gap(model, users, modality, features, seed)
        per_user[f"{prefix}_gap_{name}"] = gap["per_user"]
        row[f"{prefix}_gap_{name}"] = gap["mean"]


def train(args) -> None:
    overrides, reward = _overrides(args.set), _overrides(args.reward) or None
    run = Path(args.run)
    if args.modality == "text":
        from recbole_dppmg.generation.rl.text import train_text_rl
        from recbole_dppmg.runs import TEXT_KINDS, read_run_meta

        tokens_folder = read_run_meta(run, TEXT_KINDS)["tokens"]
        _, judge = _judge(args.dataset, tokens_folder, reward)
        out = train_text_rl(args.dataset, run, judge, overrides, quick=args.quick, out_dir=args.out)
    else:
        from recbole_dppmg.generation.image.train import read_image_config
        from recbole_dppmg.generation.rl.image import train_image_rl

        _, judge = _judge(args.dataset, read_image_config(run)["tokens_folder"], reward)
        out = train_image_rl(args.dataset, run, judge, overrides, quick=args.quick, out_dir=args.out)
    print(out)


def _texts(dataset, run: Path, users, seed: int, vocabulary):
    from recbole_dppmg.generation.common.settings import load_settings
    from recbole_dppmg.generation.text.generate import TokenConditioner, generate_texts
    from recbole_dppmg.generation.text.loading import (
        generation_options,
        load_text_generator,
    )

    cfg = load_settings("text", {"num_threads": 1, "progress": False, "device": "cpu", "seed": seed})
    lm = load_text_generator(run, vocabulary, cfg)
    return generate_texts(
        lm.model, lm.tokenizer, TokenConditioner(lm, vocabulary), users, **generation_options(cfg, lm.token_ids)
    )


def _posters(dataset, run: Path, users, seed: int, vocab, codec):
    from recbole_dppmg.generation.common.settings import load_settings
    from recbole_dppmg.generation.image.data import tensor_to_pil
    from recbole_dppmg.generation.image.generate import (
        GENERATE_KEYS,
        generate_posters,
        user_positions,
    )
    from recbole_dppmg.generation.image.train import load_image_generator

    config = load_settings("image")
    gen = {k: config[k] for k in GENERATE_KEYS}
    model, _ = load_image_generator(run, vocab, dataset=dataset)
    images = generate_posters(
        model,
        codec,
        user_positions(vocab, users),
        seed=seed,
        steps=gen["sample_steps"],
        guidance=gen["guidance_scale"],
        sampler=gen["sampler"],
        batch_size=gen["sample_batch"],
        progress=False,
    )
    return [tensor_to_pil(x) for x in images]


def _spread(values):
    values = [float(v) for v in values]
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "per_seed": values,
    }


def _per_user(values) -> list[float]:
    return [round(float(v), 5) for v in values]


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        print(f"{key:32s} {value['mean']:.4f} ± {value['std']:.4f}  [{value['min']:.4f}, {value['max']:.4f}]")


def measure(args) -> None:
    from recbole_dppmg.data.featurize import image_encoder_version, load_default_encoder
    from recbole_dppmg.generation.common.settings import load_settings
    from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
    from recbole_dppmg.generation.image.data import poster_files
    from recbole_dppmg.generation.image.metrics import (
        frechet_distance,
        image_features,
        real_poster_features,
    )
    from recbole_dppmg.generation.image.train import build_codec, read_image_config
    from recbole_dppmg.generation.reward.heldout_judge import HeldoutJudge
    from recbole_dppmg.generation.text.backbone import load_backbone
    from recbole_dppmg.generation.text.generate import prompt_ids
    from recbole_dppmg.generation.text.injection import read_meta
    from recbole_dppmg.generation.text.metrics import distinct_n, perplexity

    for needed, skipped_by in (("text_after", "image"), ("image_after", "text")):
        if getattr(args, needed) is None and args.only != skipped_by:
            raise SystemExit(f"measure: --{needed.replace('_', '-')} is required unless --only {skipped_by}")
    started = time.perf_counter()
    text_before, text_after = Path(args.text_before), args.text_after and Path(args.text_after)
    image_before, image_after = Path(args.image_before), args.image_after and Path(args.image_after)
    from recbole_dppmg.runs import (  # after the argument checks: they need no run
        TEXT_KINDS,
        read_run_meta,
    )

    tokens_folder = read_run_meta(text_before, TEXT_KINDS)["tokens"]
    tokens, judge = _judge(args.dataset, tokens_folder)
    vocabulary = PreferenceVocabulary(tokens)
    test = json.loads((text_before / "users.json").read_text())["test"]
    meta = read_image_config(image_before)
    assert [str(u) for u in meta["test_users"]] == [str(u) for u in test], (
        "the generators hold out different test users"
    )
    users, fd_users = test[: args.users], test[: max(args.users, args.fd_users)]
    text_encoder, image_encoder = load_default_encoder("text"), load_default_encoder("image")
    image_cfg = load_settings("image")
    settings = load_settings(
        "image", {**meta["train"], **meta["model"], **{k: image_cfg[k] for k in ("autoencoder_path", "poster_dir")}}
    )
    codec, _ = build_codec(settings)
    poster_ids, real = real_poster_features(
        poster_files(args.dataset, settings["poster_dir"]),
        settings["height"],
        settings["width"],
        lambda images: image_features(image_encoder, images),
        cache_key=image_encoder_version(),
    )
    # the held-out judge (never a reward): RL's gains are read on it and on own-minus-shuffled gaps
    heldout = HeldoutJudge.for_export(
        tokens,
        {
            "text": (judge.catalogues["text"].item_ids, judge.catalogues["text"].features),
            "image": (poster_ids, real),
        },
    )
    base, base_tokenizer, context = None, None, None
    if args.only != "image":
        base, base_tokenizer = load_backbone(read_meta(text_before / "dppmg").backbone, "float32", "cpu")
        context = prompt_ids(base_tokenizer, None)
    rows, samples, per_user = {}, {}, {}
    text_runs = {"before": text_before, "after": text_after} if args.only != "image" else {}
    image_runs = {"before": image_before, "after": image_after} if args.only != "text" else {"before": image_before}
    for seed in args.seeds:
        tick = time.perf_counter()
        texts = {name: _texts(args.dataset, run, users, seed, vocabulary) for name, run in text_runs.items()}
        text_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        drawn = users if args.only == "text" else fd_users
        posters = {
            name: _posters(args.dataset, run, drawn, seed, vocabulary, codec) for name, run in image_runs.items()
        }
        poster_seconds = time.perf_counter() - tick
        tf = {k: text_encoder.encode([t or " " for t in v], progress=False) for k, v in texts.items()}
        pf = {k: image_features(image_encoder, v) for k, v in posters.items()}
        row = {"text_seconds": text_seconds, "poster_seconds": poster_seconds}
        per_user[seed] = {}
        for t_name in texts:
            judged = judge.personalization(users, "text", tf[t_name])
            per_user[seed][f"text_{t_name}_judge"] = _per_user(judged)
            row[f"text_{t_name}_judge"] = float(judged.mean())
            row[f"text_{t_name}_perplexity"] = perplexity(
                base, base_tokenizer, [t for t in texts[t_name] if t], context, 16
            )
            row[f"text_{t_name}_distinct2"] = distinct_n(texts[t_name], 2)
            _protocol_measures(row, per_user[seed], f"text_{t_name}", users, "text", tf[t_name], judge, heldout, seed)
        for p_name in posters:
            judged = judge.personalization(drawn, "image", pf[p_name])  # every poster drawn
            per_user[seed][f"image_{p_name}_judge"] = _per_user(judged)
            row[f"image_{p_name}_judge"] = float(judged.mean())
            if args.only != "text":
                row[f"image_{p_name}_fd"] = frechet_distance(pf[p_name], real)
            _protocol_measures(row, per_user[seed], f"image_{p_name}", drawn, "image", pf[p_name], judge, heldout, seed)
        for t_name in texts:
            for p_name in posters:
                out = judge.reward(users, text_features=tf[t_name], image_features=pf[p_name][: len(users)])
                per_user[seed][f"consistency_t{t_name}_p{p_name}"] = _per_user(out["consistency"])
                per_user[seed][f"reward_t{t_name}_p{p_name}"] = _per_user(out["total"])
                row[f"consistency_t{t_name}_p{p_name}"] = float(out["consistency"].mean())
                row[f"reward_t{t_name}_p{p_name}"] = float(out["total"].mean())
        rows[seed] = row
        samples[seed] = [{"user": u, **{name: t[k] for name, t in texts.items()}} for k, u in enumerate(users[:10])]
        print(json.dumps({"seed": seed, **{k: round(v, 4) for k, v in row.items()}}), flush=True)
    summary = {k: _spread([rows[s][k] for s in args.seeds]) for k in rows[args.seeds[0]]}
    result = {
        "dataset": args.dataset,
        "users": len(users),
        "fd_users": len(fd_users),
        "seeds": args.seeds,
        "runs": {
            "text_before": str(text_before),
            "text_after": args.text_after,
            "image_before": str(image_before),
            "image_after": args.image_after,
        },
        "summary": summary,
        "per_seed": rows,
        "per_user": per_user,
        "users_measured": [str(u) for u in users],
        "text_samples": samples,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "num_threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    _print_summary(summary)


def combine(args) -> None:
    """Seeds measured in separate ``measure`` calls (same runs and users) as one result: spread over
    all seeds, and after - before per metric, paired by user (values averaged over the seeds) with a
    95% bootstrap interval, next to the difference paired by seed."""
    from recbole_dppmg.generation.text.metrics import paired_bootstrap

    parts = [json.loads(Path(path).read_text()) for path in args.inputs]
    first = parts[0]
    for part in parts[1:]:
        if part["runs"] != first["runs"] or part["users_measured"] != first["users_measured"]:
            raise SystemExit(f"combine: {args.inputs} measured different runs or users")
    rows = {str(seed): row for part in parts for seed, row in part["per_seed"].items()}
    per_user = {str(seed): values for part in parts for seed, values in part["per_user"].items()}
    seeds = sorted(rows, key=int)
    summary = {k: _spread([rows[s][k] for s in seeds]) for k in rows[seeds[0]]}
    deltas = {}
    for key in per_user[seeds[0]]:
        base = key.replace("after", "before")  # consistency_tbefore_pafter -> consistency_tbefore_pbefore
        if base == key or base not in per_user[seeds[0]]:
            continue
        after = np.mean([per_user[s][key] for s in seeds], axis=0)
        before = np.mean([per_user[s][base] for s in seeds], axis=0)
        by_seed = [rows[s][key] - rows[s][base] for s in seeds]
        deltas[f"{key} - {base}"] = {
            **paired_bootstrap(after, before, 2000, 2020),
            "by_seed": by_seed,
            "before_seed_std": summary[base]["std"],
        }
    for key in summary:
        if "perplexity" in key or "_fd" in key:
            base = key.replace("after", "before")
            if base != key and base in summary:
                deltas[f"{key} / {base}"] = {"ratio": summary[key]["mean"] / summary[base]["mean"]}
    result = {
        **{k: first[k] for k in ("dataset", "users", "fd_users", "runs")},
        "seeds": [int(s) for s in seeds],
        "summary": summary,
        "after_minus_before": deltas,
        "inputs": [Path(path).name for path in args.inputs],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    _print_summary(summary)
    for key, value in deltas.items():
        if "ratio" in value:
            print(f"{key:50s} {value['ratio']:.3f}")
        else:
            print(
                f"{key:50s} {value['diff']:+.4f} [{value['low']:+.4f}, {value['high']:+.4f}]  by seed "
                f"{[round(v, 4) for v in value['by_seed']]}  "
                f"(seed std before {value['before_seed_std']:.4f})"
            )


def snr(args) -> None:

    from recbole_dppmg.data.featurize import load_default_encoder
    from recbole_dppmg.generation.common.settings import (
        load_settings,
        rl_phase_settings,
    )
    from recbole_dppmg.generation.rl.common import (
        JudgeReward,
        group_advantages,
        pre_rl_poster_features,
        pre_rl_text_features,
        user_pool,
    )

    run = Path(args.run)
    cfg = rl_phase_settings(args.modality)
    grads = []
    if args.modality == "text":
        from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
        from recbole_dppmg.generation.image.generate import newest_image_run
        from recbole_dppmg.generation.rl import text as rl_text
        from recbole_dppmg.generation.text.generate import TokenConditioner
        from recbole_dppmg.generation.text.loading import load_text_generator
        from recbole_dppmg.runs import TEXT_KINDS, read_run_meta

        tokens, judge = _judge(args.dataset, read_run_meta(run, TEXT_KINDS)["tokens"], _overrides(args.reward) or None)
        vocabulary = PreferenceVocabulary(tokens)
        users = user_pool(json.loads((run / "users.json").read_text())["train"], cfg["user_pool"], cfg["seed"])[
            : args.users
        ]
        encoder = load_default_encoder("text")
        reward = JudgeReward(
            judge,
            "text",
            lambda texts: encoder.encode([t or " " for t in texts], progress=False),
            pre_rl_poster_features(
                args.dataset, Path(args.partner) if args.partner else newest_image_run(args.dataset), users
            ),
        )
        lm = load_text_generator(run, vocabulary, load_settings("text", {"num_threads": args.threads}))
        conditioner, named = TokenConditioner(lm, vocabulary), rl_text.token_parameters(lm)
        for batch in range(args.batches):
            rollout = rl_text.sample_rollout(
                lm, conditioner, users, args.group, cfg["max_new_tokens"], cfg["temperature"], 1000 + batch
            )
            adv = torch.tensor(
                group_advantages(reward(rollout.users, rollout.texts)["total"], args.group), dtype=torch.float32
            )
            logps = rl_text.completion_logprobs(lm, conditioner, rollout, cfg["temperature"])
            loss, _ = rl_text.grpo_loss(logps, logps.detach(), adv, rollout.completion_mask, cfg["clip_range"])
            grads.append(dict(zip(named, torch.autograd.grad(loss, list(named.values())))))
    else:
        from recbole_dppmg.generation.common.user_split import split_users
        from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
        from recbole_dppmg.generation.image.data import tensor_to_pil
        from recbole_dppmg.generation.image.metrics import image_features
        from recbole_dppmg.generation.image.train import (
            build_codec,
            load_image_generator,
            read_image_config,
        )
        from recbole_dppmg.generation.rl import image as rl_image
        from recbole_dppmg.generation.text.config import newest_generator_run

        meta = read_image_config(run)
        tokens, judge = _judge(args.dataset, meta["tokens_folder"], _overrides(args.reward) or None)
        vocab = PreferenceVocabulary(tokens)
        train = meta["train"]
        users = user_pool(
            split_users(list(tokens.users), train["valid_users"], train["test_users"], train["seed"])["train"],
            cfg["user_pool"],
            cfg["seed"],
        )[: args.users]
        encoder = load_default_encoder("image")
        reward = JudgeReward(
            judge,
            "image",
            lambda posters: image_features(encoder, [tensor_to_pil(x) for x in posters]),
            pre_rl_text_features(
                args.dataset, Path(args.partner) if args.partner else newest_generator_run(args.dataset), users
            ),
        )
        model, meta = load_image_generator(run, vocab, dataset=args.dataset)
        codec, _ = build_codec(load_settings("image", {**train, **meta["model"]}))
        named = rl_image.conditioning_parameters(model)
        scheduler = rl_image.ddim_scheduler(model, cfg["sample_steps"])
        repeated = [u for u in users for _ in range(args.group)]
        positions = torch.tensor([vocab.ids_for(u) for u in repeated])
        for batch in range(args.batches):
            traj = rl_image.sample_trajectories(
                model,
                scheduler,
                positions,
                cfg["eta"],
                cfg["guidance_scale"],
                torch.Generator().manual_seed(1000 + batch),
            )
            with torch.no_grad():
                posters = codec.decode(model.denormalise(traj.final))
            adv = torch.tensor(group_advantages(reward(repeated, posters)["total"], args.group), dtype=torch.float32)
            total = [torch.zeros_like(p) for p in named.values()]
            for k, t in enumerate(traj.timesteps):
                cond = model.condition(positions)
                out = rl_image.guided_output(
                    model, traj.starts[:, k], t, cond, model.null.expand_as(cond), cfg["guidance_scale"]
                )
                mean, _ = rl_image.ddim_transition(scheduler, out, t, traj.starts[:, k], cfg["eta"])
                loss, _ = rl_image.ppo_loss(
                    rl_image.gaussian_logprob(traj.ends[:, k], mean, traj.stds[k]),
                    traj.logps[:, k],
                    adv,
                    cfg["clip_range"],
                )
                total = [a + g for a, g in zip(total, torch.autograd.grad(loss, list(named.values())))]
            grads.append(dict(zip(named, total)))
    print(
        json.dumps(
            {
                "modality": args.modality,
                "users": len(users),
                "samples_per_batch": len(users) * args.group,
                "reward": judge.config,
                **gradient_agreement(grads),
            }
        )
    )


def gradient_agreement(grads: list[dict[str, torch.Tensor]]) -> dict:
    """Pairwise cosine of independent batches' gradients, over all tensors and per tensor (a shared
    tensor can carry signal while per-user rows are noise, or the reverse)."""
    from itertools import combinations

    def cosines(pairs):
        return [float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30)) for a, b in pairs]

    flat = [torch.cat([g.flatten() for g in grad.values()]) for grad in grads]
    overall = cosines(combinations(flat, 2))
    per_tensor = {
        name: round(float(np.mean(cosines(combinations([grad[name].flatten() for grad in grads], 2)))), 3)
        for name in grads[0]
    }
    return {
        "pairwise_cosine": [round(c, 3) for c in overall],
        "mean_cosine": round(float(np.mean(overall)), 3),
        "mean_cosine_per_tensor": per_tensor,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", default="ml-100k-mm")
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("modality", choices=["text", "image"])
    t.add_argument("--run", required=True, help="TextGen-* (text) or ImageGen-* (image) run folder")
    t.add_argument("--quick", action="store_true", help="the rl.quick profile")
    t.add_argument("--set", nargs="*", default=[], help="rl.<modality> overrides key=value")
    t.add_argument("--reward", nargs="*", default=[], help="reward overrides key=value (e.g. relative=True)")
    t.add_argument("--out", help="run folder (default: saved/<dataset>/TextRL-<time> or ImageRL-<time>)")
    m = sub.add_parser("measure")
    for name in ("--text-before", "--image-before"):
        m.add_argument(name, required=True)
    m.add_argument("--text-after", help="TextRL-* run (required unless --only image)")
    m.add_argument("--image-after", help="ImageRL-* run (required unless --only text)")
    m.add_argument("--users", type=int, default=50, help="held-out test users for the judge metrics and perplexity")
    m.add_argument(
        "--fd-users", type=int, default=200, help="held-out test users whose posters enter the Fréchet distance"
    )
    m.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    m.add_argument(
        "--only",
        choices=["text", "image"],
        help="only the text metrics (+ consistency with the pre-RL posters) or only the poster metrics",
    )
    m.add_argument("--out", default="rl_effect.json")
    c = sub.add_parser("combine")
    c.add_argument("inputs", nargs="+", help="measure outputs of the same runs and users, other seeds")
    c.add_argument("--out", default="rl_effect.json")
    n = sub.add_parser("snr")
    n.add_argument("modality", choices=["text", "image"])
    n.add_argument("--run", required=True, help="TextGen-* (text) or ImageGen-* (image) run folder")
    n.add_argument("--users", type=int, default=4, help="training users per batch (the first of the RL pool)")
    n.add_argument("--group", type=int, default=8, help="samples per user per batch")
    n.add_argument("--batches", type=int, default=3)
    n.add_argument("--partner", help="the other generator's run (default: the newest); give the RL run's partner")
    n.add_argument("--reward", nargs="*", default=[], help="reward overrides key=value (e.g. relative=True)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    {"train": train, "measure": measure, "combine": combine, "snr": snr}[args.command](args)


if __name__ == "__main__":
    main()
