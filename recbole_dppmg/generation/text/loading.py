"""A finished text warm-up run read back: its recorded settings, its token export, its trained
generator and soft prompt, and the targets it was trained on.

The text stage's entry points (``pipeline.py``), RL and the report all read runs through these
functions, so the entry points stay entry points and nobody imports a private helper.
"""

from __future__ import annotations

import logging
from pathlib import Path

from recbole_dppmg.data.item_content import ItemContent
from recbole_dppmg.errors import CheckpointError, DataError
from recbole_dppmg.generation.text.backbone import load_backbone
from recbole_dppmg.generation.text.baselines import prompt_condition
from recbole_dppmg.generation.text.config import (
    newest_token_export,
    recorded_settings,
    saved_root,
    user_field,
)
from recbole_dppmg.generation.text.generate import (
    SoftPromptConditioner,
)
from recbole_dppmg.generation.text.injection import (
    add_preference_tokens,
    load_preference_lm,
    read_meta,
)
from recbole_dppmg.generation.text.user_genres import UserGenres, genres_by_item
from recbole_dppmg.generation.text.warmup import (
    item_text_table,
)
from recbole_dppmg.paths import dataset_root
from recbole_dppmg.runs import (
    RUN_META,
    TEXT_KINDS,
    read_run_meta,
)
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)


def item_file(dataset: str) -> Path:
    """The prepared ``.item`` file (its feature columns; item content goes through :func:`item_content`)."""
    path = dataset_root() / dataset / f"{dataset}.item"
    if not path.is_file():
        raise DataError(f"{path} is missing; run --stage prepare for dataset {dataset} first")
    return path


def item_content(dataset: str) -> ItemContent:
    """The dataset's items by role, checked for what the text generator needs (a description)."""
    return ItemContent.load(dataset).require("description", "the text generator (its training targets)")


def load_tokens(dataset: str, tokens_folder, cfg: dict, recorded: str | None = None):

    folder = tokens_folder or cfg.get("tokens") or recorded or newest_token_export(dataset, saved_root(cfg))
    if recorded and Path(folder).resolve() != Path(recorded).resolve():
        logger.warning("using token export %s, but the text generator was trained on %s", folder, recorded)
    return PreferenceTokens.load(folder, dataset=dataset)


def generation_options(cfg: dict, lm_token_ids) -> dict:
    g = cfg["generate"]
    return dict(
        batch_size=g["batch_size"],
        max_new_tokens=g["max_new_tokens"],
        do_sample=g["do_sample"],
        temperature=g["temperature"],
        top_p=g["top_p"],
        seed=cfg["seed"],
        suppress_ids=lm_token_ids,
        progress=cfg["progress"],
        guidance=g["guidance"],
        no_repeat_ngram_size=g["no_repeat_ngram_size"],
    )


def run_settings(run: Path) -> dict:
    meta = read_run_meta(run, TEXT_KINDS)
    if meta is None:
        raise CheckpointError(f"{run} is not a text warm-up run (no {RUN_META})")
    return meta


# what a run's trained baselines share with the DPPMG generator they are compared with
BASELINE_KEYS = (
    "backbone",
    "min_rating",
    "pairs_per_user",
    "pair_choice",
    "valid_users",
    "test_users",
    "target_template",
    "user_genres_from",
    "user_genres_count",
    "max_target_tokens",
    "batch_size",
    "max_steps",
    "learning_rate",
    "history_items",
)


def check_baselines_run(run: Path, baselines: Path) -> Path:
    """``baselines``, checked to have trained its prompt baselines on what ``run`` trained DPPMG
    on: the same held-out users, token export, targets and budget. Why: a DPPMG variant (another
    injection, a routing) is compared with one set of baselines instead of retraining them."""
    run, baselines = Path(run), Path(baselines)
    if run.resolve() == baselines.resolve():
        return baselines
    mine, theirs = run_settings(run), run_settings(baselines)
    what = f"the baselines run {baselines} does not fit the text generator {run}"
    if not (baselines / "users.json").is_file():
        raise CheckpointError(f"{what}: it has no users.json")
    if (run / "users.json").read_text() != (baselines / "users.json").read_text():
        raise CheckpointError(f"{what}: they hold out different users (train both with the same text.split_seed)")
    if Path(mine["tokens"]).resolve() != Path(theirs["tokens"]).resolve():
        raise CheckpointError(f"{what}: token exports differ ({mine['tokens']} vs {theirs['tokens']})")
    a, b = recorded_settings(mine["text"]), recorded_settings(theirs["text"])
    differ = [k for k in BASELINE_KEYS if a[k] != b[k]]
    if differ:
        raise CheckpointError(f"{what}: text.{', text.'.join(differ)} differ")
    return baselines


def target_texts(dataset: str, settings: dict, tokens, content: ItemContent | None = None):
    """The warm-up targets (``TargetTexts``) in the shape a text config (or a run's recorded
    one) gives them."""

    settings = recorded_settings(settings)
    content = content or item_content(dataset)
    user_genres = None
    if user_field(settings["target_template"]):
        user_genres = UserGenres(
            tokens,
            genres_by_item(content),
            settings["user_genres_from"],
            settings["user_genres_count"],
            content.like_threshold(settings["min_rating"]),
        )
    return item_text_table(content, settings["target_template"], user_genres)


def run_target_texts(dataset: str, run: Path, tokens, content: ItemContent | None = None):
    """The targets in the shape warm-up ``run`` was trained on (its reference texts use it)."""
    return target_texts(dataset, run_settings(Path(run))["text"], tokens, content)


def load_text_generator(run: Path, vocabulary, cfg: dict):
    """The trained DPPMG text generator of a warm-up run, on a freshly loaded backbone."""

    meta = read_meta(run / "dppmg")
    model, tokenizer = load_backbone(meta.backbone or cfg["backbone"], cfg["dtype"], cfg["device"])
    return load_preference_lm(run / "dppmg", model, tokenizer, vocabulary)


def load_prompt_baseline(run: Path, name: str, tokens, vocabulary, cfg: dict, content: ItemContent | None = None):
    """``(model, tokenizer, conditioner)`` of a run's trained ``population`` / ``history`` /
    ``token_items`` prompt; the written items come from ``content`` (default: the dataset's)."""
    meta = read_meta(run / "dppmg")
    model, tokenizer = load_backbone(meta.backbone or cfg["backbone"], cfg["dtype"], cfg["device"])
    add_preference_tokens(model, tokenizer, vocabulary.strings)
    settings = recorded_settings(run_settings(run)["text"])
    content = content if content is not None or name == "population" else item_content(tokens.manifest["dataset"])
    prompt = prompt_condition(
        name, model, tokenizer, tokens, content, settings["history_items"], folder=run / f"{name}_prompt"
    )
    return model, tokenizer, prompt


def load_soft_prompt(run: Path, tokens, vocabulary, cfg: dict):

    meta = read_meta(run / "dppmg")
    model, tokenizer = load_backbone(meta.backbone or cfg["backbone"], cfg["dtype"], cfg["device"])
    add_preference_tokens(model, tokenizer, vocabulary.strings)
    return model, tokenizer, SoftPromptConditioner.load(run / "soft_prompt", model, tokenizer, tokens)
