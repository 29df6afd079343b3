"""The evaluation report of stage 2 (DESIGN "Evaluation of generation"; ``--stage evaluate``).

On the shared held-out test users (``generation/user_split.py``; never trained on by either
generator) and for each generation seed, text and poster are generated under each condition:

- ``no_tokens``: the instruction / the null conditioning sequence, no preference tokens;
- ``shuffled``: another held-out user's tokens (one seeded derangement per seed, the same for
  text and poster, so the pair still describes one user);
- ``soft_prompt``: the PMG-style continuous soft prompt from u_m (text only; the image
  generator has no continuous baseline, its columns read n/a);
- ``dppmg``: the user's preference tokens, generators after the supervised warm-up;
- ``dppmg_rl``: the same after RL (``TextRL-*`` / ``ImageRL-*`` runs made from those
  generators; "not run" when there is none);
- ``ceiling``: the real text and poster (at the generator's size) of the user's top
  recommended item: the highest stage-1 score ``sum_m <q(u_m), i_m>`` from the export among
  the items outside the user's training and validation splits that have a text and a poster.

Metrics per condition and seed (then mean, std, min, max over seeds):
personalization: retrieval Hit@K / NDCG@K of the user's test items ranked by similarity to the
generated content's features (text: MiniLM vs the catalogue's text features; poster:
EfficientNet vs the real posters at the generator's size; training and validation items
excluded), and the judge percentile (``reward.PreferenceJudge``) per modality; cross-modal
consistency (judge); the reward total; quality: perplexity of the texts under the frozen base
LM, distinct-2, and the Fréchet distance of the posters of ``fd_users`` test users to all real
posters (EfficientNet features, generator size). Files: ``report_render.py``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from recbole_dppmg.data.featurize import (
    image_encoder_version,
    load_default_encoder,
    torch_threads,
)
from recbole_dppmg.data.item_content import ItemContent
from recbole_dppmg.errors import CheckpointError, DataError
from recbole_dppmg.generation.common.protocol import (
    bootstrap_interval,
    evaluation_users,
    judge_gap,
    own_minus_shuffled,
    retrieval_scorer,
    users_with_targets,
)
from recbole_dppmg.generation.common.settings import GENERATED_TEXT_CONDITIONS, load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.checkpoint import is_sd_run, poster_size, read_image_config
from recbole_dppmg.generation.image.data import load_poster, poster_files, tensor_to_pil
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
    mean_pair_similarity,
    near_duplicate_threshold,
    novelty,
    personal_similarity,
    real_frechet_floor,
    real_poster_features,
)
from recbole_dppmg.generation.image.train import (
    load_image_generator,
    run_codec,
    run_image_settings,
)
from recbole_dppmg.generation.report.render import write_report
from recbole_dppmg.generation.reward.heldout_judge import HeldoutJudge
from recbole_dppmg.generation.reward.judge import PreferenceJudge
from recbole_dppmg.generation.text.backbone import load_backbone
from recbole_dppmg.generation.text.baselines import PROMPTS
from recbole_dppmg.generation.text.generate import prompt_ids, shuffled_user_map
from recbole_dppmg.generation.text.injection import read_meta
from recbole_dppmg.generation.text.loading import check_baselines_run, run_target_texts
from recbole_dppmg.generation.text.metrics import (
    degenerate_share,
    distinct_n,
    perplexity,
    retrieval_metrics,
)
from recbole_dppmg.generation.text.pipeline import TextConditions
from recbole_dppmg.generation.text.warmup import item_text_table
from recbole_dppmg.paths import SAVED_DIR, dataset_root
from recbole_dppmg.runs import (
    IMAGE_GEN,
    IMAGE_KINDS,
    IMAGE_RL,
    REPORT,
    RL_KINDS,
    RL_SECTION,
    RUN_META,
    TEXT_GEN,
    TEXT_KINDS,
    TEXT_RL,
    RunKind,
    finished_runs,
    meta_path,
    new_run_folder,
    read_run_meta,
    rl_phases,
    rl_source,
)
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)

# real content, one item per user (None: no such item): the reference and the non-personal controls
REAL_CONDITIONS = ("ceiling", "constant_popular", "unseen_popular")
CONDITIONS = (
    "no_tokens",
    "population",
    "history",
    "shuffled",
    "soft_prompt",
    "token_items",
    "dppmg",
    "dppmg_rl",
    *REAL_CONDITIONS,
)
TEXT_GENERATED = {
    "no_tokens": "no_tokens",
    "population": "population",
    "history": "history",
    "token_items": "token_items",
    "shuffled": "shuffled",
    "soft_prompt": "soft_prompt",
    "dppmg": "dppmg",
}
IMAGE_MODES = {"no_tokens": "none", "shuffled": "shuffled", "dppmg": "tokens"}
# text baselines a warm-up trains only when asked (text.soft_prompt, text.<name>_prompt): their folders in the run
OPTIONAL_TEXT = {"soft_prompt": "soft_prompt", **{name: f"{name}_prompt" for name in PROMPTS}}
RUN_PREFIX = REPORT.name


# ---------------------------------------------------------------------------- which runs
@dataclass
class EvaluatedRuns:
    """The generator runs a report compares, checked to fit together."""

    tokens: str
    text: str | None  # None: a poster-only report (evaluate.modalities)
    image: str | None  # None: a text-only report (no item images, or evaluate.modalities)
    text_rl: str | None = None
    image_rl: str | None = None
    test_users: list[str] = field(default_factory=list)
    valid_users: list[str] = field(default_factory=list)
    image_history: str | None = None  # the history baseline's generator (image.conditioning: history)
    text_baselines: str | None = None  # the run holding the trained text baselines (None: the text run)

    @property
    def text_baselines_run(self) -> str | None:
        return self.text_baselines or self.text

    def evaluated(self, split: str) -> list[str]:
        """The users a report of ``split`` scores (``generation/common/protocol.py``)."""
        return evaluation_users({"valid": self.valid_users, "test": self.test_users}, split)


def _text_run_tokens(run: Path) -> str:
    meta = read_run_meta(run, TEXT_KINDS)
    if meta is None or not (run / "users.json").is_file():
        raise CheckpointError(f"{run} is not a text generator run (needs {RUN_META} and users.json)")
    return str(Path(meta["tokens"]).resolve())


def _finished_text_runs(dataset: str, root: Path, prefix: str) -> list[Path]:
    """Finished ``<prefix>-*`` text runs (TextGen, TextRL) with their user split, oldest first."""
    runs = finished_runs(root, dataset, RunKind(prefix, TEXT_GEN.done))
    return [r for r in runs if (r / "users.json").is_file()]


def _finished_image_runs(dataset: str, root: Path, prefix: str) -> list[Path]:
    """Finished ``<prefix>-*`` image runs (ImageGen, ImageRL) with their record, oldest first."""
    runs = finished_runs(root, dataset, RunKind(prefix, IMAGE_GEN.done))
    return [r for r in runs if meta_path(r, IMAGE_KINDS) is not None]


def resolve_runs(dataset: str, cfg: dict, root: Path | None = None) -> EvaluatedRuns:
    """The runs named in ``cfg`` or, for those left at None, the newest that fit: text and
    image generators trained on the same token export with the same held-out test users, RL
    runs made from exactly those generators, the history baseline on the same test users. A
    clear error otherwise. ``evaluate.modalities: [image]`` needs no text run."""

    root = Path(root or SAVED_DIR)
    tokens = str(Path(cfg["tokens"]).resolve()) if cfg.get("tokens") else None
    modalities = cfg.get("modalities", ("text", "image"))
    if "text" not in modalities:
        image = _image_run(dataset, root, cfg, tokens, "set evaluate.tokens or evaluate.image_run")
        meta = read_image_config(image)
        test_users = [str(u) for u in meta["test_users"]]
        valid_users = [str(u) for u in meta["heldout_users"] if str(u) not in set(test_users)]
        return EvaluatedRuns(
            str(Path(meta["tokens_folder"]).resolve()),
            None,
            str(image.resolve()),
            None,
            _rl_run(dataset, root, IMAGE_RL.name, cfg.get("image_rl_run"), image, _finished_image_runs),
            test_users,
            valid_users,
            _history_run(dataset, root, cfg.get("image_history_run"), test_users),
        )
    if cfg.get("text_run"):
        text = Path(cfg["text_run"])
    else:
        runs = [
            r
            for r in _finished_text_runs(dataset, root, TEXT_GEN.name)
            if tokens is None or _text_run_tokens(r) == tokens
        ]
        if not runs:
            raise CheckpointError(
                f"no trained text generator for dataset {dataset} under {root / dataset}"
                + (f" on token export {tokens}" if tokens else "")
                + "; run --stage text first (or set evaluate.text_run)"
            )
        text = runs[-1]
    text_tokens = _text_run_tokens(text)
    if tokens is not None and text_tokens != tokens:
        raise CheckpointError(f"text generator {text} was trained on token export {text_tokens}, not {tokens}")
    tokens = text_tokens
    user_split = json.loads((text / "users.json").read_text())
    test_users, valid_users = [str(u) for u in user_split["test"]], [str(u) for u in user_split["valid"]]
    text_rl = _rl_run(dataset, root, TEXT_RL.name, cfg.get("text_rl_run"), text, _finished_text_runs)
    baselines = cfg.get("text_baselines_run")
    baselines = str(check_baselines_run(text, Path(baselines)).resolve()) if baselines else None
    has_images = bool(cfg.get("image_run")) or _has_images(dataset)
    if "image" not in modalities or not has_images:
        logger.info("a text-only report (%s)", "evaluate.modalities" if has_images else "no item images")
        return EvaluatedRuns(
            tokens, str(text.resolve()), None, text_rl, None, test_users, valid_users, text_baselines=baselines
        )
    image = _image_run(dataset, root, cfg, tokens, f"the text generator {text.name}'s")
    meta = read_image_config(image)
    if [str(u) for u in meta["test_users"]] != test_users:
        raise CheckpointError(
            f"the generators hold out different test users (text {text}: {len(test_users)}, image {image}: "
            f"{len(meta['test_users'])}); train both with the same split seed, valid_users and test_users"
        )
    image_rl = _rl_run(dataset, root, IMAGE_RL.name, cfg.get("image_rl_run"), image, _finished_image_runs)
    return EvaluatedRuns(
        tokens,
        str(text.resolve()),
        str(image.resolve()),
        text_rl,
        image_rl,
        test_users,
        valid_users,
        _history_run(dataset, root, cfg.get("image_history_run"), test_users),
        text_baselines=baselines,
    )


def _image_run(dataset: str, root: Path, cfg: dict, tokens: str | None, whose: str) -> Path:
    """The DPPMG poster generator: ``evaluate.image_run`` or the newest on the token export ``tokens``
    (any export when None), never a history baseline."""
    if cfg.get("image_run"):
        image = Path(cfg["image_run"])
    else:
        runs = [
            r
            for r in _finished_image_runs(dataset, root, IMAGE_GEN.name)
            if (tokens is None or str(Path(read_image_config(r)["tokens_folder"]).resolve()) == tokens)
            and not _is_history(r)
        ]
        if not runs:
            raise CheckpointError(
                f"no image generator for dataset {dataset} under {root / dataset}"
                + (f" was trained on token export {tokens} ({whose})" if tokens else "")
                + f"; run --stage image{f' with --tokens {tokens}' if tokens else ''} (or set evaluate.image_run)"
            )
        image = runs[-1]
    meta = read_image_config(image)
    if meta["dataset"] != dataset:
        raise CheckpointError(f"image generator {image} was trained on {meta['dataset']}, not {dataset}")
    if _is_history(image):
        raise CheckpointError(
            f"image generator {image} is the history baseline (image.conditioning=history), not a DPPMG generator; "
            "set evaluate.image_run to a tokens or retrieval run (the baseline goes in evaluate.image_history_run)"
        )
    image_tokens = str(Path(meta["tokens_folder"]).resolve())
    if tokens is not None and image_tokens != tokens:
        raise CheckpointError(
            f"the generators were trained on different token exports: {whose} {tokens}, image {image} on {image_tokens}"
        )
    return image


def _history_run(dataset: str, root: Path, given: str | None, test_users: list[str]) -> str | None:
    """The history baseline (``image.conditioning: history``): ``given``, else the newest finished one
    holding out ``test_users`` (None: its rows read "not run"). It reads no tokens, so any export fits."""
    if given:
        run = Path(given)
        meta = read_image_config(run)
        if not _is_history(run):
            raise CheckpointError(f"evaluate.image_history_run {run} is not a history generator (image.conditioning)")
        if meta["dataset"] != dataset or [str(u) for u in meta["test_users"]] != test_users:
            raise CheckpointError(
                f"history generator {run} was trained on {meta['dataset']} holding out other test users than the "
                "evaluated generators; train it with the same split seed, valid_users and test_users"
            )
        return str(run.resolve())
    runs = [
        r
        for r in _finished_image_runs(dataset, root, IMAGE_GEN.name)
        if _is_history(r) and [str(u) for u in read_image_config(r)["test_users"]] == test_users
    ]
    return str(runs[-1].resolve()) if runs else None


def _is_history(run: Path) -> bool:
    """Whether an image run is the history baseline (no tokens: never the report's DPPMG generator)."""
    return read_image_config(run).get("model", {}).get("conditioning", "tokens") == "history"


def _has_images(dataset: str) -> bool:
    """Whether the prepared dataset has an image role (one without a content map: assume so)."""
    try:
        return ItemContent.load(dataset).has("image")
    except DataError:
        return True


def _rl_origin(run: Path) -> str | None:
    """The generator an RL run descends from: the source of its chain's first phase."""
    return rl_source(rl_phases(run)[0])


def _rl_run(dataset: str, root: Path, prefix: str, given, source: Path, finished: Callable) -> str | None:
    """The RL run named by ``given`` or the newest finished one descending from ``source`` (the
    last phase, when RL ran in phases)."""
    source = str(source.resolve())
    if given:
        run = Path(given)
        if _rl_origin(run) != source:
            raise CheckpointError(f"RL run {run} was not made from {source} (its {RUN_META} names {rl_source(run)})")
        return str(run.resolve())
    runs = [r for r in finished(dataset, root, prefix) if _rl_origin(r) == source]
    return str(runs[-1].resolve()) if runs else None


# ---------------------------------------------------------------------------- inputs
@dataclass
class Catalogues:
    """What the metrics compare generated content with."""

    text_ids: list[str]
    text_features: np.ndarray
    poster_ids: list[str]
    poster_features: np.ndarray  # real posters at the generator's size
    item_texts: dict[
        str, str
    ]  # TargetTexts in the shape the text generator was trained to write (the ceiling: .target(user, item))
    posters: dict[str, Path]
    item_titles: dict[str, str]  # "Title (year) · tags" for the gallery
    plain_texts: dict[str, str] = field(default_factory=dict)  # "Title (year): description", no user part


def top_recommended_items(tokens, users: Sequence[str], allowed: set[str]) -> list[str | None]:
    """Per user, the item with the highest stage-1 score ``sum_m <q(u_m), i_m>`` (decoded
    tokens, propagated item vectors of the export) among ``allowed`` items outside the user's
    training and validation splits."""
    scores = tokens.token_scores(users)
    ok = np.array([i in allowed for i in tokens.item_ids])
    out = []
    for k, user in enumerate(users):
        row = np.where(ok, scores[k], -np.inf)
        seen = [tokens.item_index[i] for s in ("train", "valid") for i, _ in tokens.history(user, s)]
        row[seen] = -np.inf
        out.append(tokens.item_ids[int(row.argmax())] if np.isfinite(row.max()) else None)
    return out


def popular_items(tokens, allowed: set[str]) -> list[str]:
    """Catalogue items by training-split popularity, most popular first, among ``allowed``."""
    counts = np.asarray((tokens.split_matrix("train") > 0).sum(0)).ravel()
    order = np.argsort(-counts, kind="stable")
    return [tokens.item_ids[k] for k in order if k > 0 and tokens.item_ids[k] in allowed]


def unseen_popular_items(tokens, users: Sequence[str], ranked: list[str]) -> list[str | None]:
    """Per user, the most popular item (``ranked``) outside the user's training and validation splits."""
    out = []
    for user in users:
        seen = {i for s in ("train", "valid") for i, _ in tokens.history(user, s)}
        out.append(next((i for i in ranked if i not in seen), None))
    return out


def _targets(tokens, users: Sequence[str], ids: list[str], min_rating) -> tuple[list[list[int]], list[list[int]]]:
    row = {item: k for k, item in enumerate(ids)}
    targets = [[row[i] for i, _ in tokens.history(u, "test", min_rating) if i in row] for u in users]
    exclude = [[row[i] for s in ("train", "valid") for i, _ in tokens.history(u, s) if i in row] for u in users]
    return targets, exclude


def _spread(values: list[float | None]) -> dict:
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "seeds": 0}
    return {
        "mean": float(np.mean(kept)),
        "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0,
        "min": float(np.min(kept)),
        "max": float(np.max(kept)),
        "seeds": len(kept),
    }


# ---------------------------------------------------------------------------- the report
def build_report(
    dataset: str,
    config: dict | None = None,
    out_dir: str | Path | None = None,
    *,
    runs: EvaluatedRuns | None = None,
    text_config_overrides: dict | None = None,
    image_config_overrides: dict | None = None,
    reward_overrides: dict | None = None,
    text_featurize: Callable | None = None,
    image_featurize: Callable | None = None,
    codec=None,
    posters: dict[str, Path] | None = None,
    dataset_dir: str | Path | None = None,
    root: Path | None = None,
) -> Path:
    """Generate, measure and write ``<out_dir>/report/``; returns that folder.

    ``out_dir`` defaults to ``evaluate.output_dir`` or ``saved/<dataset>/Report-<time>/``.
    ``text_featurize`` / ``image_featurize`` (lists of texts / PIL images -> features), ``codec``,
    ``posters`` and ``dataset_dir`` replace the default encoders, autoencoder, the dataset's
    posters and ``dataset/<dataset>/`` (tests)."""

    cfg = load_settings("evaluate", config)
    reward_cfg = load_settings("reward", reward_overrides)
    runs = runs or resolve_runs(dataset, cfg, root)
    started = time.perf_counter()
    tokens = PreferenceTokens.load(runs.tokens, dataset=dataset)
    pool = runs.evaluated(cfg["split"])  # validation users to select on, test users to report
    users = pool[: cfg["users"] or None]
    fd_users = pool[: max(len(users), cfg["fd_users"] or len(pool))]
    dataset_dir = Path(dataset_dir) if dataset_dir else None
    timings: dict[str, float] = {}
    with torch_threads(cfg["num_threads"]):
        judge = PreferenceJudge.for_dataset(dataset, tokens, reward_cfg, dataset_dir=dataset_dir)
        text_featurize, image_featurize = _featurizers(text_featurize, image_featurize)
        generation = _Generation(
            dataset, runs, tokens, cfg, text_config_overrides, image_config_overrides, codec, posters, dataset_dir, pool
        )
        catalogues = generation.catalogues(judge, image_featurize)
        allowed = (
            set(catalogues.item_texts) & set(catalogues.poster_ids)
            if runs.image and runs.text
            else set(catalogues.poster_ids or catalogues.item_texts)
        )
        ranked = popular_items(tokens, allowed)
        real_items = {
            "ceiling": top_recommended_items(tokens, fd_users, allowed),
            "constant_popular": [ranked[0] if ranked else None] * len(fd_users),
            "unseen_popular": unseen_popular_items(tokens, fd_users, ranked),
        }
        heldout = HeldoutJudge.for_export(
            tokens,
            {
                "text": (catalogues.text_ids, catalogues.text_features),
                **({"image": (catalogues.poster_ids, catalogues.poster_features)} if runs.image else {}),
            },
        )

        tick = time.perf_counter()
        # the reference in the shape the generator writes for its user; the controls in a shape with no user part,
        # so that they are the same content for whoever reads them
        real_texts = {
            c: [
                (catalogues.item_texts.target(u, i) if c == "ceiling" else catalogues.plain_texts[i])
                if i in catalogues.item_texts
                else ""
                for u, i in zip(users, items)
            ]
            for c, items in real_items.items()
        }
        texts = generation.texts(users, real_texts)
        timings["generate_texts"] = time.perf_counter() - tick
        tick = time.perf_counter()
        images = generation.posters(fd_users, real_items, catalogues.posters)
        timings["generate_posters"] = time.perf_counter() - tick

        tick = time.perf_counter()
        text_features = _per_list(texts, text_featurize)
        image_features = _per_list(images, lambda posters: _featurize_posters(image_featurize, posters))
        timings["featurize"] = time.perf_counter() - tick

        tick = time.perf_counter()
        per_seed = _measure(
            tokens,
            judge,
            cfg,
            users,
            fd_users,
            catalogues,
            texts,
            text_features,
            images,
            image_features,
            generation,
            real_items,
            heldout,
        )
        intervals = _intervals(per_seed)
        fd_floor = real_frechet_floor(catalogues.poster_features, len(fd_users), cfg["seeds"]) if runs.image else None
        timings["metrics"] = time.perf_counter() - tick
    summary = {
        c: {
            metric: _spread([row.get(metric) for row in rows.values()])
            for metric in sorted({k for row in rows.values() for k in row})
        }
        for c, rows in per_seed.items()
    }
    result = {
        "rl_effect": rl_effect(summary),
        "dataset": dataset,
        "runs": asdict(runs),
        "evaluate": cfg,
        "reward": reward_cfg,
        "text_generation": generation.text_cfg["generate"],
        "rl_text_sampling": _rl_sampling(runs.text_rl),
        "image_sampling": generation.sampling,
        "users": users,
        "fd_users": len(fd_users),
        "seeds": cfg["seeds"],
        "conditions": {c: generation.status(c) for c in CONDITIONS},
        "split": cfg["split"],
        "ceiling_items": dict(zip(fd_users, real_items["ceiling"])),
        "control_items": {c: dict(zip(fd_users, real_items[c])) for c in ("constant_popular", "unseen_popular")},
        "intervals": intervals,
        "fd_real_floor": fd_floor,
        "per_seed": per_seed,
        "summary": summary,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    out_dir = Path(out_dir or cfg.get("output_dir") or new_run_folder(root or SAVED_DIR, dataset, RUN_PREFIX))
    report = write_report(out_dir, result, tokens, catalogues, texts, images, runs)
    result["timings"]["total"] = round(time.perf_counter() - started, 1)
    logger.info("report written to %s in %.0f s", report, result["timings"]["total"])
    return report


REWARD_METRICS = ("text_judge", "image_judge", "consistency", "reward")
QUALITY_METRICS = ("perplexity", "frechet_distance")
QUALITY_TOLERANCE = 0.10


def rl_effect(summary: dict) -> dict:
    """DPPMG after RL vs before, per metric: difference of the seed means, and whether it is
    beyond the seed spread (the [min, max] ranges over seeds do not overlap) for the reward
    metrics, or within ``QUALITY_TOLERANCE`` (relative) for perplexity and Fréchet distance."""
    before, after = summary.get("dppmg", {}), summary.get("dppmg_rl", {})
    out = {}
    for metric in REWARD_METRICS + QUALITY_METRICS:
        b, a = before.get(metric), after.get(metric)
        if not b or not a or b["mean"] is None or a["mean"] is None:
            continue
        entry = {"before": b["mean"], "after": a["mean"], "difference": a["mean"] - b["mean"]}
        if metric in REWARD_METRICS:
            entry["raised_beyond_seed_spread"] = a["min"] > b["max"]
        else:
            entry["relative_change"] = a["mean"] / b["mean"] - 1 if b["mean"] else None
            entry["within_tolerance"] = (
                entry["relative_change"] is not None and abs(entry["relative_change"]) <= QUALITY_TOLERANCE
            )
        out[metric] = entry
    return out


def _trained(text_run: str, condition: str) -> bool:
    """Whether ``text_run`` holds ``condition``'s generator (optional baselines may be absent)."""
    return condition not in OPTIONAL_TEXT or (Path(text_run) / OPTIONAL_TEXT[condition]).is_dir()


def _featurizers(text_featurize, image_featurize):
    """The item encoders of the dataset (MiniLM, EfficientNet-Lite0) unless given."""
    if text_featurize is None:
        encoder = load_default_encoder("text")
        text_featurize = lambda texts: encoder.encode([t or " " for t in texts], progress=False)  # noqa: E731
    if image_featurize is None:
        image_encoder = load_default_encoder("image")
        image_featurize = lambda images: image_features(image_encoder, images)  # noqa: E731
        image_featurize.cache_key = image_encoder_version()
    return text_featurize, image_featurize


class _Generation:
    """Loads the generators of ``runs`` and writes every condition's content per seed."""

    def __init__(
        self,
        dataset,
        runs: EvaluatedRuns,
        tokens,
        cfg,
        text_overrides,
        image_overrides,
        codec,
        posters,
        dataset_dir,
        pool: list[str],
    ):

        self.dataset, self.runs, self.tokens, self.cfg, self.pool = dataset, runs, tokens, cfg, pool
        self.vocabulary = PreferenceVocabulary(tokens)
        self.text_cfg = load_settings(
            "text", {"num_threads": cfg["num_threads"], "progress": cfg["progress"], **(text_overrides or {})}
        )
        image_cfg = load_settings("image", image_overrides)
        gen = {k: image_cfg[k] for k in GENERATE_KEYS}
        self.sampling = {k: v for k, v in sampling_arguments(gen).items() if k != "seed"}  # seeds: cfg["seeds"]
        meta = read_image_config(runs.image) if runs.image else {"train": {}, "model": {}}
        local = {k: v for k, v in image_cfg.items() if k in ("autoencoder_path", "poster_dir")}
        self.image_meta, self.image_settings = meta, run_image_settings(meta, local)
        self.poster_size = poster_size(meta) if runs.image else (image_cfg["height"], image_cfg["width"])
        self._codec, self._posters, self.dataset_dir = codec, posters, dataset_dir
        self._base = None  # the frozen base LM for perplexity, loaded on first use
        self._perplexities: dict[tuple, float] = {}

    def status(self, condition: str) -> dict:
        text = {"dppmg_rl": "run" if self.runs.text_rl else "not run"}.get(condition, "run")
        if not self.runs.text:
            text = "n/a"
        elif not _trained(self.runs.text_baselines_run, condition) or not self._scored(condition):
            text = "not run"
        image = {
            "soft_prompt": "n/a",
            "population": "n/a",  # the image generator's population baseline is its null conditioning: no tokens
            "history": "run" if self.runs.image_history else "not run",
            "token_items": "n/a",
            "dppmg_rl": "run" if self.runs.image_rl else "not run",
        }.get(condition, "run")
        if not self.runs.image:
            image = "n/a"
        return {"text": text, "image": image}

    def _scored(self, condition: str) -> bool:
        """Whether ``evaluate.text_conditions`` asks for this generated text condition."""
        chosen = self.cfg.get("text_conditions")
        return not chosen or condition not in GENERATED_TEXT_CONDITIONS or condition in chosen

    def codec(self, model):
        """The decoder of ``model``'s latents (the one given, or the run's: ``run_codec``)."""
        if self._codec is None and is_sd_run(self.image_meta):
            return model.codec  # each Stable Diffusion model decodes with its own pipeline's VAE
        if self._codec is None:
            self._codec, _ = run_codec(model, self.image_meta, self.image_settings)
        return self._codec

    def catalogues(self, judge, image_featurize) -> Catalogues:

        folder = self.dataset_dir or dataset_root() / self.dataset
        content = self.content = ItemContent.load(self.dataset, folder)
        posters = (
            self._posters
            if self._posters is not None
            else poster_files(self.dataset, self.image_settings["poster_dir"], folder)
            if self.runs.image
            else {}
        )
        known = set(self.tokens.item_ids[1:])
        posters = {i: p for i, p in posters.items() if i in known}
        height, width = self.poster_size
        poster_ids, poster_features = (
            real_poster_features(posters, height, width, image_featurize, getattr(image_featurize, "cache_key", None))
            if posters
            else ([], np.zeros((0, 1), np.float32))
        )
        text = judge.catalogues["text"]
        return Catalogues(
            text.item_ids,
            text.features,
            poster_ids,
            poster_features,
            run_target_texts(self.dataset, Path(self.runs.text), self.tokens, content) if self.runs.text else {},
            posters,
            {i: _caption(content, i) for i in content.item_ids},
            item_text_table(content),
        )

    # ------------------------------------------------------------------ text
    def texts(self, users: list[str], real: dict[str, list[str]]) -> dict[str, dict[int, list[str]]]:
        """Texts per condition and seed for ``users``; ``real`` = the real-content conditions' texts."""

        out: dict[str, dict[int, list[str]]] = {}
        if not self.runs.text:  # a poster-only report
            return out
        before = TextConditions(
            self.dataset,
            Path(self.runs.text),
            self.tokens,
            self.vocabulary,
            self.text_cfg,
            content=self.content,
            baselines=Path(self.runs.text_baselines_run),
        )
        for condition, name in TEXT_GENERATED.items():
            if not _trained(self.runs.text_baselines_run, name) or not self._scored(condition):
                continue  # a warm-up without this baseline (older, or switched off), or not asked for: "not run"
            out[condition] = {
                seed: before.generate(name, users, seed, shuffled_user_map(self.pool, seed))
                for seed in self.cfg["seeds"]
            }
        before.release()
        if self.runs.text_rl and self._scored("dppmg_rl"):
            after = TextConditions(self.dataset, Path(self.runs.text_rl), self.tokens, self.vocabulary, self.text_cfg)
            out["dppmg_rl"] = {seed: after.generate("dppmg", users, seed) for seed in self.cfg["seeds"]}
            after.release()
        for condition, listed in real.items():
            out[condition] = {seed: listed for seed in self.cfg["seeds"]}  # one list: measured once
        return out

    # ------------------------------------------------------------------ posters
    def posters(
        self, users: list[str], real_items: dict[str, list[str | None]], real: dict[str, Path]
    ) -> dict[str, dict[int, list]]:
        """PIL posters per condition and seed for ``users`` (the FD users; the evaluated users
        first); the real-content conditions' are the ``real`` poster files of their items."""
        import torch

        out: dict[str, dict[int, list]] = {}
        if not self.runs.image:  # a text-only dataset
            return out
        models = [(IMAGE_MODES, self.runs.image)]
        models += [({"dppmg_rl": "tokens"}, self.runs.image_rl)] if self.runs.image_rl else []
        models += [({"history": "tokens"}, self.runs.image_history)] if self.runs.image_history else []
        for modes, run in models:
            model, _ = load_image_generator(run, self.vocabulary, dataset=self.dataset)
            context = user_context(model, self.tokens, users)  # the history baseline's own posters; else None
            for condition, mode in modes.items():
                out[condition] = {}
                for seed in self.cfg["seeds"]:
                    if mode == "shuffled":
                        mapping = shuffled_user_map(self.pool, seed)
                        positions = torch.tensor([self.vocabulary.ids_for(mapping[u]) for u in users], dtype=torch.long)
                    else:
                        positions = user_positions(self.vocabulary, users, mode)
                    images = generate_posters(
                        model,
                        self.codec(model),
                        positions,
                        seed=seed,
                        progress=self.cfg["progress"],
                        context=context,
                        **self.sampling,
                    )
                    out[condition][seed] = [tensor_to_pil(x) for x in images]
            del model
        height, width = self.poster_size
        for condition, items in real_items.items():
            listed = [tensor_to_pil(load_poster(real[i], height, width)) if i else None for i in items]
            out[condition] = {seed: listed for seed in self.cfg["seeds"]}  # one list: measured once
        return out

    # ------------------------------------------------------------------ quality
    def perplexity(self, texts: list[str], batch_size: int) -> float | None:

        nonempty = [t for t in texts if t]
        if not nonempty:
            return None
        if self._base is None:
            backbone = read_meta(Path(self.runs.text) / "dppmg").backbone or self.text_cfg["backbone"]
            model, tokenizer = load_backbone(backbone, self.text_cfg["dtype"], self.text_cfg["device"])
            self._base = (model, tokenizer, prompt_ids(tokenizer, None))
        model, tokenizer, context = self._base
        key = tuple(nonempty)
        if key not in self._perplexities:  # the ceiling's real texts are the same for every seed
            self._perplexities[key] = perplexity(model, tokenizer, nonempty, context, batch_size)
        return self._perplexities[key]


def _measure(
    tokens,
    judge,
    cfg,
    users,
    fd_users,
    catalogues: Catalogues,
    texts,
    text_features,
    images,
    image_features,
    generation,
    real_items: dict[str, list[str | None]],
    heldout: HeldoutJudge,
) -> dict:
    """``{condition: {seed: {metric: value}}}``, each real-content condition over the users who
    have its item. Besides the absolute levels, the own-minus-shuffled gaps of the protocol
    (``generation/common/protocol.py``): a row's content judged for its own user minus for the
    user's partner in a seeded derangement of the same rows (per-user values under
    ``_per_user`` for the pooled intervals of :func:`_gaps`)."""

    k = cfg["topk"]
    text_targets, text_exclude = _targets(tokens, users, catalogues.text_ids, cfg["min_test_rating"])
    poster_targets, poster_exclude = _targets(tokens, users, catalogues.poster_ids, cfg["min_test_rating"])
    scorer = judge.clip_scorer()
    threshold = near_duplicate_threshold(catalogues.poster_features) if images else None  # one catalogue, once
    out: dict[str, dict[int, dict]] = {}
    for condition in CONDITIONS:
        if condition not in texts and condition not in images:
            continue
        present = real_items.get(condition)
        rows = [j for j in range(len(users)) if present is None or present[j] is not None]
        fd_rows = [j for j in range(len(fd_users)) if present is None or present[j] is not None]
        picked = [users[j] for j in rows]
        out[condition] = {}
        for seed in cfg["seeds"]:
            row: dict = {"users": len(rows)}
            per_user: dict[str, list[float]] = {}
            if condition in texts:
                generated, features = texts[condition][seed], text_features[condition][seed][rows]
                metrics = retrieval_metrics(
                    features,
                    catalogues.text_features,
                    [text_targets[j] for j in rows],
                    [text_exclude[j] for j in rows],
                    k,
                )
                levels = {
                    f"text_ndcg@{k}": metrics["per_user_ndcg"],
                    "text_judge": judge.personalization(picked, "text", features).tolist(),
                    "text_heldout_judge": heldout.personalization(picked, "text", features).tolist(),
                }
                per_user.update(levels)
                row.update(
                    {
                        f"text_hit@{k}": metrics[f"hit@{k}"],
                        "perplexity": generation.perplexity([generated[j] for j in rows], cfg["ppl_batch_size"]),
                        "distinct2": distinct_n([generated[j] for j in rows], 2),
                        "degenerate_share": degenerate_share([generated[j] for j in rows]),
                        "mean_words": float(np.mean([len(generated[j].split()) for j in rows])),
                    }
                )
                per_user.update(
                    _modality_gaps(
                        "text",
                        features,
                        picked,
                        rows,
                        text_targets,
                        text_exclude,
                        catalogues.text_features,
                        judge,
                        heldout,
                        k,
                        seed,
                    )
                )
            if condition in images:
                features = image_features[condition][seed]
                metrics = retrieval_metrics(
                    features[rows],
                    catalogues.poster_features,
                    [poster_targets[j] for j in rows],
                    [poster_exclude[j] for j in rows],
                    k,
                )
                per_user.update(
                    {
                        f"image_ndcg@{k}": metrics["per_user_ndcg"],
                        "image_judge": judge.personalization(picked, "image", features[rows]).tolist(),
                        "image_heldout_judge": heldout.personalization(picked, "image", features[rows]).tolist(),
                    }
                )
                row.update(
                    {
                        f"image_hit@{k}": metrics[f"hit@{k}"],
                        "frechet_distance": frechet_distance(features[fd_rows], catalogues.poster_features),
                        "fd_posters": len(fd_rows),
                        "between_user_similarity": mean_pair_similarity(features[rows]),
                        **novelty(features[rows], catalogues.poster_features, threshold=threshold),
                    }
                )
                row.pop("near_duplicate_threshold")
                per_user.update(
                    _modality_gaps(
                        "image",
                        features[rows],
                        picked,
                        rows,
                        poster_targets,
                        poster_exclude,
                        catalogues.poster_features,
                        judge,
                        heldout,
                        k,
                        seed,
                    )
                )
            if condition in texts and condition in images:
                clip_inputs = (
                    {
                        "texts": [texts[condition][seed][j] for j in rows],
                        "images": [images[condition][seed][j] for j in rows],
                    }
                    if scorer
                    else {}
                )
                text_rows, image_rows = text_features[condition][seed][rows], image_features[condition][seed][rows]
                reward = judge.reward(picked, text_features=text_rows, image_features=image_rows, **clip_inputs)
                row.update(
                    {
                        name: float(values.mean())
                        for name, values in reward.items()
                        if name in ("consistency", "total", "clip")
                    }
                )
                row["reward"] = row.pop("total")
                if len(rows) >= 2:  # a text with its own user's poster minus with the partner's poster
                    gap = own_minus_shuffled(
                        lambda r, judged_as: judge.consistency(text_rows[r], image_rows[np.asarray(judged_as)]),
                        len(rows),
                        seed,
                    )
                    per_user["gap_consistency"] = gap["per_user"]
            for name, values in per_user.items():
                row[name] = float(np.nanmean(values))
            row["_per_user"] = per_user
            out[condition][seed] = row
    return out


def _modality_gaps(
    modality, features, picked, rows, targets, exclude, catalogue, judge, heldout, k, seed
) -> dict[str, list[float]]:
    """Per-user own-minus-shuffled gaps of one modality's content: retrieval NDCG@k and the mean
    similarity to the user's held-out items' content (over the rows whose user has a test item),
    the DPPMG judge and the held-out judge."""
    out: dict[str, list[float]] = {}
    if len(rows) < 2:
        return out
    with_targets = users_with_targets([targets[j] for j in rows], [exclude[j] for j in rows])
    if len(with_targets) >= 2:
        score = retrieval_scorer(
            features[with_targets],
            catalogue,
            [targets[rows[j]] for j in with_targets],
            [exclude[rows[j]] for j in with_targets],
            k,
        )
        out[f"gap_{modality}_retrieval_ndcg@{k}"] = own_minus_shuffled(score, len(with_targets), seed)["per_user"]
        held_out = [sorted(set(targets[rows[j]]) - set(exclude[rows[j]])) for j in with_targets]
        queries = features[with_targets]
        out[f"gap_{modality}_personal_similarity"] = own_minus_shuffled(
            lambda r, judged_as: personal_similarity(queries[r], catalogue, [held_out[j] for j in judged_as]),
            len(with_targets),
            seed,
        )["per_user"]
    for name, model in (("judge", judge), ("heldout_judge", heldout)):
        out[f"gap_{modality}_{name}"] = judge_gap(model, picked, modality, features, seed)["per_user"]
    return out


def _intervals(per_seed: dict) -> dict:
    """``{condition: {measure: {"mean", "ci95", "seeds", "users", "per_user"}}}`` for every
    per-user measure (the own-minus-shuffled gaps and the levels): per-user values averaged over
    the generation seeds, then a 95% bootstrap interval over users; ``seeds`` the per-seed means.
    ``per_user`` lets runs of other training seeds be pooled on the same users."""
    out: dict = {}
    for condition, by_seed in per_seed.items():
        names = sorted({n for row in by_seed.values() for n in row.get("_per_user", {})})
        for name in names:
            lists = [row["_per_user"][name] for row in by_seed.values() if name in row.get("_per_user", {})]
            per_user = np.mean(np.asarray(lists, dtype=np.float64), axis=0)
            per_user = per_user[np.isfinite(per_user)]
            if not len(per_user):
                continue
            out.setdefault(condition, {})[name] = {
                "mean": float(per_user.mean()),
                "ci95": bootstrap_interval(per_user),
                "seeds": [float(np.nanmean(v)) for v in lists],
                "users": len(per_user),
                "per_user": per_user.round(6).tolist(),
            }
        for row in by_seed.values():
            row.pop("_per_user", None)
    return out


def _per_list(content: dict[str, dict[int, list]], featurize: Callable) -> dict[str, dict[int, np.ndarray]]:
    """Features of every (condition, seed) list; a list shared by several seeds (the ceiling's
    real content) is featurized once."""
    done: dict[int, np.ndarray] = {}
    out: dict[str, dict[int, np.ndarray]] = {}
    for condition, per_seed in content.items():
        out[condition] = {}
        for seed, items in per_seed.items():
            if id(items) not in done:
                done[id(items)] = featurize(items)
            out[condition][seed] = done[id(items)]
    return out


def _rl_sampling(run: str | None) -> dict | None:
    """How text RL sampled (temperature, new tokens; no top-p, guidance or no-repeat: exact log-probs), to set
    beside the evaluation's sampling when they differ."""
    meta = read_run_meta(run, RL_KINDS, RL_SECTION) if run else None
    rl = (meta or {}).get("rl") or {}
    if not rl:
        return None
    return {
        "temperature": rl.get("temperature"),
        "max_new_tokens": rl.get("max_new_tokens"),
        "top_p": None,
        "guidance": 1.0,
        "no_repeat_ngram_size": 0,
    }


def _caption(content: ItemContent, item: str) -> str:
    """``Title (year) · tag, tag`` under a history poster in the gallery."""
    tags = content.tags(item)[:3]
    return content.head(item) + (" · " + ", ".join(tags) if tags else "")


def _featurize_posters(featurize, images: list) -> np.ndarray:
    """Features of the posters; a missing poster (None: no ceiling item) gets a NaN row."""
    present = [k for k, image in enumerate(images) if image is not None]
    features = np.asarray(featurize([images[k] for k in present]), dtype=np.float32) if present else None
    width = features.shape[1] if features is not None else 1
    out = np.full((len(images), width), np.nan, dtype=np.float32)
    if present:
        out[present] = features
    return out
