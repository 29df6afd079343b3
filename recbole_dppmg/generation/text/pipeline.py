"""Entry points of the text generator for the command line: warm-up, generate, evaluate.

- :func:`train_text_generator` trains DPPMG's preference tokens (and the soft-prompt baseline)
  into a run folder ``saved/<dataset>/TextGen-<time>/``: ``run.json``, ``users.json`` (the
  train / valid / test user split), ``dppmg/`` (PEFT adapter + projection), ``soft_prompt/``,
  ``warmup.json`` (wall times, best validation losses).
- :func:`run_generate_text` writes each requested user's text (``texts.jsonl`` + ``texts.md``).
- :func:`evaluate_text_generation` compares DPPMG tokens, no tokens, shuffled users' tokens,
  the continuous soft prompt (and the real text of a liked item as a reference) on the test
  users: retrieval Hit@K / NDCG@K, perplexity under the frozen base LM, distinct-2, seconds.

Stage 2 reads stage 1 only through the token export (``PreferenceTokens``) and the dataset.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from recbole_dppmg.data.atomic import read_item_table
from recbole_dppmg.data.featurize import load_default_encoder
from recbole_dppmg.errors import CheckpointError, DataError
from recbole_dppmg.generation.common.protocol import (
    bootstrap_interval,
    evaluation_users,
    own_minus_shuffled,
    random_hit_rate,
    retrieval_scorer,
    users_with_targets,
)
from recbole_dppmg.generation.common.settings import TEXT_CONDITIONS, load_settings
from recbole_dppmg.generation.common.user_split import split_seed, split_users
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.text.backbone import load_backbone
from recbole_dppmg.generation.text.baselines import PROMPTS, prompt_condition
from recbole_dppmg.generation.text.config import (
    newest_generator_run,
    recorded_settings,
    saved_root,
)
from recbole_dppmg.generation.text.generate import (
    NoTokenConditioner,
    SoftPromptConditioner,
    TokenConditioner,
    generate_texts,
    prompt_ids,
    shuffled_user_map,
)
from recbole_dppmg.generation.text.injection import (
    add_preference_tokens,
    inject_preference_tokens,
)
from recbole_dppmg.generation.text.loading import (
    check_baselines_run,
    generation_options,
    item_content,
    item_file,
    load_prompt_baseline,
    load_soft_prompt,
    load_text_generator,
    load_tokens,
    run_settings,
    run_target_texts,
    target_texts,
)
from recbole_dppmg.generation.text.metrics import (
    degenerate_share,
    distinct_n,
    paired_bootstrap,
    perplexity,
    retrieval_metrics,
)
from recbole_dppmg.generation.text.warmup import (
    build_pairs,
    content_vectors,
    train_conditioner,
)
from recbole_dppmg.runs import (
    TEXT_GEN,
    new_run_folder,
    write_run_meta,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- helpers
def _threads(cfg: dict) -> None:
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))


# ---------------------------------------------------------------------------- warm-up
def train_text_generator(dataset: str, tokens_folder: Path | None = None, config: dict | None = None) -> Path:
    """Warm up the text generator on ``dataset``'s training split; returns the run folder."""

    cfg = load_settings("text", config)
    _threads(cfg)
    catalogue = item_content(dataset)  # first: a dataset without item texts says so before anything loads
    if cfg.get("resume"):
        run = Path(cfg["resume"])
        previous = run_settings(run)
        tokens = load_tokens(dataset, tokens_folder, cfg, previous["tokens"])
        _check_same_settings(
            previous,
            cfg,
            (
                "backbone",
                "seed",
                "lora_r",
                "init_from",
                "contrast_weight",
                "content_init",
                "slot_vectors",
                "prefix_tokens",
                "max_steps",
                "min_rating",
                "pairs_per_user",
                "pair_choice",
                "valid_users",
                "test_users",
                "batch_size",
                "max_target_tokens",
                "target_template",
                "user_genres_from",
                "user_genres_count",
            ),
            f"cannot resume {run}",
        )
        init_run = _init_run(cfg, tokens)
    else:
        tokens = load_tokens(dataset, tokens_folder, cfg)
        init_run = _init_run(cfg, tokens)  # checked before the run folder exists
        run = None  # made once the data is known to be usable: a failure leaves no folder behind
    vocabulary = PreferenceVocabulary(tokens)
    texts = target_texts(dataset, cfg, tokens, catalogue)
    liked = catalogue.like_threshold(cfg["min_rating"])
    split = split_users(tokens.users, cfg["valid_users"], cfg["test_users"], split_seed(cfg), cfg["train_users"])
    train_pairs = build_pairs(
        tokens, split["train"], texts, liked, cfg["pairs_per_user"], cfg["seed"], cfg["pair_choice"]
    )
    valid_pairs = build_pairs(
        tokens, split["valid"], texts, liked, cfg["pairs_per_user"], cfg["seed"] + 1, cfg["pair_choice"]
    )
    if not train_pairs or not valid_pairs:
        raise DataError(
            f"{dataset}: no {'training' if not train_pairs else 'validation'} pairs for the text generator: no "
            f"training-split rating >= {liked} on an item with a description among those users "
            "(text.min_rating, or the spec's like_rating)"
        )
    if run is None:
        run = new_run_folder(saved_root(cfg), dataset, TEXT_GEN.name)
    valid_pairs = [
        valid_pairs[k]
        for k in sorted(np.random.default_rng(cfg["seed"]).permutation(len(valid_pairs))[: cfg["valid_pairs"]])
    ]
    write_run_meta(run, TEXT_GEN.name, {"dataset": dataset, "tokens": str(Path(tokens.folder).resolve()), "text": cfg})
    (run / "users.json").write_text(json.dumps(split))
    logger.info(
        "text warm-up in %s: %d training pairs from %d users, %d validation pairs",
        run,
        len(train_pairs),
        len(split["train"]),
        len(valid_pairs),
    )

    summary = {
        "train_pairs": len(train_pairs),
        "valid_pairs": len(valid_pairs),
        "users": {k: len(v) for k, v in split.items()},
        "num_threads": torch.get_num_threads(),
    }
    start = time.perf_counter()
    content = None
    if init_run is not None:  # continue a finished warm-up: its tokens, projection (and LoRA)
        lm = load_text_generator(init_run, vocabulary, cfg)
        lm.make_trainable()
        tokenizer = lm.tokenizer
    else:
        model, tokenizer = load_backbone(cfg["backbone"], cfg["dtype"], cfg["device"])
        if cfg["content_init"]:
            content = content_vectors(
                tokenizer, model.get_input_embeddings().weight, train_pairs, texts, cfg["max_target_tokens"]
            )
        lm = inject_preference_tokens(
            model,
            tokenizer,
            vocabulary,
            backbone=cfg["backbone"],
            lora_r=cfg["lora_r"],
            lora_alpha=cfg["lora_alpha"],
            lora_targets=cfg["lora_targets"],
            seed=cfg["seed"],
            content=content,
            channels=cfg["token_channels"],
            slot_vectors=cfg["slot_vectors"],
            prefix_tokens=cfg["prefix_tokens"],
        )
    state = train_conditioner(
        lm.model, tokenizer, TokenConditioner(lm, vocabulary), train_pairs, valid_pairs, texts, cfg, run / "dppmg"
    )
    summary["dppmg"] = _phase_summary(state, time.perf_counter() - start, lm.trainable_parameters())
    del lm
    if cfg["soft_prompt"]:
        start = time.perf_counter()
        model, tokenizer = load_backbone(cfg["backbone"], cfg["dtype"], cfg["device"])
        add_preference_tokens(model, tokenizer, vocabulary.strings)
        if init_run is not None:
            soft = SoftPromptConditioner.load(init_run / "soft_prompt", model, tokenizer, tokens)
        else:
            soft = SoftPromptConditioner.build(model, tokenizer, tokens, seed=cfg["seed"], content=content)
        state = train_conditioner(model, tokenizer, soft, train_pairs, valid_pairs, texts, cfg, run / "soft_prompt")
        summary["soft_prompt"] = _phase_summary(state, time.perf_counter() - start, soft.parameters())
    for name in PROMPTS:  # the trained prompt conditions: same pairs, steps and format as DPPMG
        if not cfg[f"{name}_prompt"]:
            continue
        start = time.perf_counter()
        model, tokenizer = load_backbone(cfg["backbone"], cfg["dtype"], cfg["device"])
        add_preference_tokens(model, tokenizer, vocabulary.strings)
        prompt = prompt_condition(name, model, tokenizer, tokens, catalogue, cfg["history_items"], seed=cfg["seed"])
        state = train_conditioner(
            model, tokenizer, prompt, train_pairs, valid_pairs, texts, cfg, run / f"{name}_prompt"
        )
        summary[f"{name}_prompt"] = _phase_summary(state, time.perf_counter() - start, prompt.parameters())
    (run / "warmup.json").write_text(json.dumps(summary, indent=2))
    logger.info("text warm-up done: %s", json.dumps({k: v for k, v in summary.items() if isinstance(v, dict)}))
    return run


def _check_same_settings(previous: dict, cfg: dict, keys, what: str) -> None:
    """Refuse when a recorded warm-up's ``text.<key>`` differs from ``cfg``'s."""

    recorded = recorded_settings(previous["text"])
    for key in keys:
        if recorded[key] != cfg[key]:
            raise CheckpointError(f"{what}: text.{key} was {recorded[key]!r}, now {cfg[key]!r}")


def _init_run(cfg: dict, tokens) -> Path | None:
    """The warm-up run ``text.init_from`` continues from, checked against this run's settings."""
    if not cfg.get("init_from"):
        return None
    run = Path(cfg["init_from"])
    previous = run_settings(run)
    if Path(previous["tokens"]).resolve() != Path(tokens.folder).resolve():
        raise CheckpointError(
            f"text.init_from {run} was trained on tokens {previous['tokens']}, this warm-up uses {tokens.folder}"
        )
    _check_same_settings(
        previous,
        cfg,
        ("backbone", "lora_r", "seed", "valid_users", "test_users", "slot_vectors", "prefix_tokens"),
        f"text.init_from {run}",
    )
    if cfg["soft_prompt"] and not (run / "soft_prompt").is_dir():
        raise CheckpointError(f"text.init_from {run} has no soft_prompt/ to continue (set text.soft_prompt False)")
    return run


def _phase_summary(state: dict, wall: float, params) -> dict:
    return {
        "wall_seconds_this_call": round(wall, 1),
        "train_seconds": round(state["train_seconds"], 1),
        "steps": state["step"],
        "best_valid_loss": state["best_valid"],
        "best_step": state["best_step"],
        "initial_valid_loss": state["history"][0]["valid_loss"] if state["history"] else None,
        "trainable_parameters": int(sum(p.numel() for p in params)),
    }


# ---------------------------------------------------------------------------- generate
def run_generate_text(
    dataset: str, users: Sequence[str], tokens_folder: Path | None = None, config: dict | None = None
) -> Path:
    """Generate one text per user with the newest (or ``text.generator``) warm-up run.

    Writes ``texts.jsonl`` ({user, tokens, text}) and ``texts.md`` into ``text.output_dir`` or
    ``<run>/generate-<time>/`` and returns that folder.
    """

    cfg = load_settings("text", config)
    _threads(cfg)
    users = [str(u).strip() for u in users if str(u).strip()]
    if not users:
        raise DataError("no users given to generate text for (e.g. --users 1,2,3)")
    run = Path(cfg["generator"]) if cfg.get("generator") else newest_generator_run(dataset, saved_root(cfg))
    tokens = load_tokens(dataset, tokens_folder, cfg, run_settings(run).get("tokens"))
    for user in users:
        tokens.user_row(user)  # a clear error before any model loads
    vocabulary = PreferenceVocabulary(tokens)
    lm = load_text_generator(run, vocabulary, cfg)
    start = time.perf_counter()
    texts = generate_texts(
        lm.model, lm.tokenizer, TokenConditioner(lm, vocabulary), users, **generation_options(cfg, lm.token_ids)
    )
    seconds = time.perf_counter() - start
    if cfg.get("output_dir"):
        out = Path(cfg["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = new_run_folder(run, "", "generate")
    with open(out / "texts.jsonl", "w") as f:
        for user, text in zip(users, texts):
            f.write(json.dumps({"user": user, "tokens": vocabulary.strings_for(user), "text": text}) + "\n")
    lines = [
        f"# Generated text ({dataset}, generator {run.name}, seed {cfg['seed']})",
        "",
        "| user | tokens | text |",
        "|---|---|---|",
    ]
    lines += [
        f"| {u} | {' '.join(vocabulary.strings_for(u))} | {t.replace('|', '/').replace(chr(10), ' ')} |"
        for u, t in zip(users, texts)
    ]
    (out / "texts.md").write_text("\n".join(lines) + "\n")
    logger.info("wrote %d texts to %s in %.1f s", len(texts), out, seconds)
    return out


# ---------------------------------------------------------------------------- evaluate


class TextConditions:
    """The texts of each evaluation condition from one warm-up (or RL) run: DPPMG tokens, no
    tokens, another user's tokens, the continuous soft prompt, and the real text of the user's
    best-rated training item. Each generator is loaded on first use and kept for later seeds.
    Shared by :func:`evaluate_text_generation` and the report (``generation/report.py``)."""

    def __init__(
        self,
        dataset: str,
        run: Path,
        tokens,
        vocabulary,
        cfg: dict,
        item_texts: dict[str, str] | None = None,
        content=None,
        baselines: Path | None = None,
    ):
        self.dataset, self.run, self.tokens, self.vocabulary, self.cfg = dataset, Path(run), tokens, vocabulary, cfg
        # the trained prompt baselines and the soft prompt may come from another run on the same split
        self.baselines = check_baselines_run(self.run, baselines) if baselines else self.run
        self._item_texts, self._content = item_texts, content
        self._lm = self._soft = None
        self._prompts: dict[str, tuple] = {}

    @property
    def lm(self):
        if self._lm is None:
            self._lm = load_text_generator(self.run, self.vocabulary, self.cfg)
        return self._lm

    def prepare(self, name: str) -> None:
        """Load what condition ``name`` needs (so that generation can be timed alone)."""
        if name == "soft_prompt" and self._soft is None:
            self._soft = load_soft_prompt(self.baselines, self.tokens, self.vocabulary, self.cfg)
        elif name in PROMPTS and name not in self._prompts:
            self._prompts[name] = load_prompt_baseline(
                self.baselines, name, self.tokens, self.vocabulary, self.cfg, self._content
            )
        elif name == "real_liked_item" and self._item_texts is None:
            self._item_texts = run_target_texts(self.dataset, self.run, self.tokens)
        elif name in ("dppmg", "no_tokens", "shuffled", "soft_prompt"):
            self.lm  # noqa: B018  (loads the generator)

    def generate(self, name: str, users: Sequence[str], seed: int, user_map: dict[str, str] | None = None) -> list[str]:
        """One text per user; ``user_map`` is the shuffled condition's derangement (default:
        ``shuffled_user_map(users, seed)``)."""

        users = list(users)
        if name not in TEXT_CONDITIONS:
            raise DataError(f"unknown text evaluation condition {name!r} ({', '.join(TEXT_CONDITIONS)})")
        self.prepare(name)
        if name == "real_liked_item":
            return [self._liked_text(u) for u in users]
        if name in PROMPTS:
            model, tokenizer, prompt = self._prompts[name]
            options = {**generation_options(self.cfg, self.lm.preference_ids), "seed": seed}
            return generate_texts(model, tokenizer, prompt, users, **options)
        if name == "soft_prompt":
            model, tokenizer, soft = self._soft
            options = {**generation_options(self.cfg, self.lm.preference_ids), "seed": seed}
            return generate_texts(model, tokenizer, soft, users, **options)
        lm = self.lm
        options = {**generation_options(self.cfg, lm.token_ids), "seed": seed}
        if name == "dppmg":
            return generate_texts(lm.model, lm.tokenizer, TokenConditioner(lm, self.vocabulary), users, **options)
        if name == "no_tokens":
            return generate_texts(lm.model, lm.tokenizer, NoTokenConditioner(lm.embed), users, **options)
        mapping = user_map or shuffled_user_map(users, seed)
        return generate_texts(
            lm.model, lm.tokenizer, TokenConditioner(lm, self.vocabulary, mapping, name="shuffled"), users, **options
        )

    def _liked_text(self, user: str) -> str:
        liked = [i for i, _ in self.tokens.history(user, "train") if i in self._item_texts]
        return self._item_texts.target(user, liked[0]) if liked else ""

    def release(self) -> None:
        """Drop the loaded generators (the next condition may load other ones)."""
        self._lm = self._soft = None
        self._prompts = {}


def evaluate_text_generation(
    dataset: str, tokens_folder: Path | None = None, config: dict | None = None, encoder=None
) -> Path:
    """Compare the conditions on held-out test users over ``text.evaluate.seeds`` generation
    seeds; writes ``text_eval.{json,md}`` + ``samples.jsonl``. Each condition's retrieval is
    also given as its paired difference from DPPMG tokens with a bootstrap interval over users,
    next to the chance level of a random ranking."""

    cfg = load_settings("text", config)
    _threads(cfg)
    ev = cfg["evaluate"]
    seeds = [int(s) for s in (ev["seeds"] or [cfg["seed"]])]
    run = Path(cfg["generator"]) if cfg.get("generator") else newest_generator_run(dataset, saved_root(cfg))
    tokens = load_tokens(dataset, tokens_folder, cfg, run_settings(run).get("tokens"))
    vocabulary = PreferenceVocabulary(tokens)
    pool = evaluation_users(json.loads((run / "users.json").read_text()), ev["split"])  # valid: selection only
    users = pool[: ev["users"] or None]

    items = read_item_table(item_file(dataset), with_features=True)  # the text features of the catalogue
    catalogue = [i for i in tokens.item_ids[1:] if i in items.index]
    row_of = {item: k for k, item in enumerate(catalogue)}
    features = np.stack([np.asarray(items.loc[i, "text_feat"], dtype=np.float32) for i in catalogue])
    targets = [[row_of[i] for i, r in tokens.history(u, "test", ev["min_test_rating"]) if i in row_of] for u in users]
    # the user's training and validation items are excluded, as in the report (one protocol)
    exclude = [[row_of[i] for s in ("train", "valid") for i, _ in tokens.history(u, s) if i in row_of] for u in users]

    baselines = Path(ev["baselines_run"]) if ev.get("baselines_run") else None
    generator = TextConditions(dataset, run, tokens, vocabulary, cfg, baselines=baselines)
    texts: dict[str, dict[int, list[str]]] = {}
    seconds: dict[str, list[float]] = {}
    for name in ev["conditions"]:
        generator.prepare(name)  # model loading is not timed
        for seed in seeds[:1] if name == "real_liked_item" else seeds:  # the reference does not depend on the seed
            start = time.perf_counter()
            texts.setdefault(name, {})[seed] = generator.generate(name, users, seed)
            seconds.setdefault(name, []).append(time.perf_counter() - start)
    backbone = generator.lm.meta.backbone or cfg["backbone"]
    generator.release()

    rows = _score_conditions(texts, seconds, features, targets, exclude, backbone, cfg, encoder)
    chance = random_hit_rate(targets, exclude, len(catalogue), ev["topk"])
    out = new_run_folder(run, "", "eval")
    with open(out / "samples.jsonl", "w") as f:
        for seed in seeds:
            for idx, user in enumerate(users):
                record = {n: by_seed.get(seed, by_seed[seeds[0]])[idx] for n, by_seed in texts.items()}
                f.write(
                    json.dumps({"seed": seed, "user": user, "tokens": vocabulary.strings_for(user), **record}) + "\n"
                )
    report = {
        "dataset": dataset,
        "generator": str(run),
        "baselines": str(generator.baselines),
        "tokens": str(tokens.folder),
        "users": len(users),
        "split": ev["split"],
        "seeds": seeds,
        "num_threads": torch.get_num_threads(),
        "generate": cfg["generate"],
        f"random_hit@{ev['topk']}": chance,
        "rows": rows,
    }
    (out / "text_eval.json").write_text(json.dumps(report, indent=2))
    lines = _text_eval_markdown(report, run, tokens.folder, ev["topk"])
    (out / "text_eval.md").write_text("\n".join(lines) + "\n")
    logger.info("text evaluation written to %s\n%s", out, "\n".join(lines))
    return out


def _score_conditions(texts, seconds, features, targets, exclude, backbone, cfg, encoder) -> list[dict]:
    """Retrieval per seed (mean, std, per-seed values), the paired difference from DPPMG
    (per-user metrics averaged over seeds, bootstrap over users), perplexity pooled over seeds,
    distinct-2 averaged over seeds."""

    if encoder is None:
        encoder = load_default_encoder("text")
    ev, k = cfg["evaluate"], cfg["evaluate"]["topk"]
    base, base_tokenizer = load_backbone(backbone, cfg["dtype"], cfg["device"])
    context = prompt_ids(base_tokenizer, None)
    rows, per_user = [], {}
    for name, by_seed in texts.items():
        runs = [
            retrieval_metrics(
                encoder.encode([t or " " for t in batch], progress=False), features, targets, exclude, k=k
            )
            for batch in by_seed.values()
        ]
        per_user[name] = {m: np.mean([r[f"per_user_{m}"] for r in runs], axis=0) for m in ("hit", "ndcg")}
        gap = _retrieval_gap(by_seed, encoder, features, targets, exclude, k, ev["bootstrap"])
        nonempty = [t for batch in by_seed.values() for t in batch if t]
        row = {"condition": name, "users": runs[0]["users"], "seeds": list(by_seed)}
        for m in ("hit", "ndcg"):
            values = [r[f"{m}@{k}"] for r in runs]
            row.update(
                {
                    f"{m}@{k}": float(np.mean(values)),
                    f"{m}@{k}_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    f"{m}@{k}_per_seed": values,
                }
            )
        row.update(
            {
                "perplexity": perplexity(base, base_tokenizer, nonempty, context, ev["ppl_batch_size"])
                if nonempty
                else None,
                "distinct2": float(np.mean([distinct_n(batch, 2) for batch in by_seed.values()])),
                "degenerate_share": degenerate_share([t for batch in by_seed.values() for t in batch]),
                "mean_words": float(np.mean([len(t.split()) for batch in by_seed.values() for t in batch])),
                "seconds": round(float(np.mean(seconds[name])), 1),
                f"gap_ndcg@{k}": gap,
                "per_user_hit": per_user[name]["hit"].tolist(),
                "per_user_ndcg": per_user[name]["ndcg"].tolist(),
            }
        )
        rows.append(row)
    if "dppmg" in per_user:
        for row in rows:
            if row["condition"] != "dppmg":
                row["dppmg_minus"] = {
                    m: paired_bootstrap(
                        per_user["dppmg"][m], per_user[row["condition"]][m], ev["bootstrap"], cfg["seed"]
                    )
                    for m in ("hit", "ndcg")
                }
    return rows


def _retrieval_gap(by_seed: dict, encoder, features, targets, exclude, k: int, resamples: int) -> dict | None:
    """Own minus shuffled NDCG@k (``generation/common/protocol.py``): per user averaged over the
    seeds, 95% bootstrap interval over users; None with fewer than two users with test items."""
    users = users_with_targets(targets, exclude)
    if len(users) < 2:
        return None
    per_seed = []
    for seed, batch in by_seed.items():
        queries = encoder.encode([batch[u] or " " for u in users], progress=False)
        score = retrieval_scorer(queries, features, [targets[u] for u in users], [exclude[u] for u in users], k)
        per_seed.append(own_minus_shuffled(score, len(users), int(seed), resamples)["per_user"])
    per_user = np.mean(np.asarray(per_seed), axis=0)
    return {"mean": float(per_user.mean()), "ci95": bootstrap_interval(per_user, resamples), "users": len(users)}


def _text_eval_markdown(report: dict, run: Path, tokens_folder, k: int) -> list[str]:
    def interval(row, m):
        d = row.get("dppmg_minus", {}).get(m)
        return f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else "-"

    def gap(row):
        g = row.get(f"gap_ndcg@{k}")
        return f"{g['mean']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" if g else "-"

    seeds = report["seeds"]
    split = report.get("split", "test")
    lines = [
        f"# Text generation on {report['users']} held-out {split} users of {report['dataset']}",
        "",
        f"generator `{run.name}`"
        + (f" (trained baselines from `{Path(report['baselines']).name}`)" if report["baselines"] != str(run) else "")
        + f", tokens `{tokens_folder}`, generation seeds {seeds}, {report['num_threads']} CPU threads. "
        + ("Validation users: for choosing settings. " if split == "valid" else "Test users: scored once. ")
        + f"*Own - shuffled NDCG@{k}*: each user's text ranked against that user's test items minus against another "
        "evaluated user's (0 for a text that does not depend on the user), per user averaged over the seeds, 95% "
        "bootstrap interval over users: the personalization measure. Retrieval: mean ± std over the seeds; DPPMG "
        f"minus the condition as above. A random ranking hits {report[f'random_hit@{k}']:.4f} (Hit@{k}).",
        "",
        f"| condition | own - shuffled NDCG@{k} | Hit@{k} | NDCG@{k} | DPPMG - this, Hit@{k} | "
        f"DPPMG - this, NDCG@{k} | perplexity (base LM) | distinct-2 | degenerate texts | mean words | "
        f"seconds per {report['users']} texts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] is not None else "-"
        lines.append(
            f"| {r['condition']} | {gap(r)} | {r[f'hit@{k}']:.4f} ± {r[f'hit@{k}_std']:.4f} | {r[f'ndcg@{k}']:.4f} ± "
            f"{r[f'ndcg@{k}_std']:.4f} | "
            f"{interval(r, 'hit')} | {interval(r, 'ndcg')} | {ppl} | {r['distinct2']:.3f} | "
            f"{r['degenerate_share']:.1%} | {r['mean_words']:.1f} | "
            f"{r['seconds']} |"
        )
    return lines
