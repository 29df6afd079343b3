"""Command line of ``run_dppmg.py``, in the style of RecBole-GNN's ``run_recbole_gnn.py``.

Known flags are parsed here; every other ``--key=value`` is a RecBole config override, except
``--<section>.<key>=value`` (sections text, image, rl, reward, evaluate; nested keys with more
dots, e.g. ``--rl.text.steps=8``), which override the sections of ``properties/generation.yaml``.
``--stage all`` runs the whole pipeline (``recbole_dppmg/pipeline.py``) with ``--profile``.
User errors print one line (``run_dppmg.py: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recbole_dppmg.config import build_config, parse_overrides
from recbole_dppmg.data.prepare import prepare_dataset
from recbole_dppmg.errors import CheckpointError, ConfigError, DPPMGError
from recbole_dppmg.generation.image.generate import run_generate_images
from recbole_dppmg.generation.image.train import (
    load_image_config,
    train_image_generator,
)
from recbole_dppmg.generation.report.build import build_report
from recbole_dppmg.generation.text.pipeline import (
    evaluate_text_generation,
    run_generate_text,
    train_text_generator,
)
from recbole_dppmg.pipeline import STAGES as PIPELINE_STAGES
from recbole_dppmg.pipeline import Pipeline, load_profile, merge
from recbole_dppmg.quick_start import ablation, compare, compare_runs, run
from recbole_dppmg.stage_logging import init_stage_logger
from recbole_dppmg.tokens.export import (
    export_tokens,
    latest_checkpoint,
    newest_token_export,
)
from recbole_dppmg.utils import get_model
from recbole_dppmg.validation import check_checkpoint, check_request

COMPARISON_SEEDS = (2020, 2021, 2022)  # a comparison or ablation reports the median over these
STAGES = ("prepare", "train", "export", "text", "image", "generate", "text_eval", "evaluate", "all")
GENERATION_SECTIONS = ("text", "image", "rl", "reward", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_dppmg.py",
        description="DPPMG: discrete preference tokens for personalized multimodal generation (RecBole plugin).",
        epilog="Any other --key=value is passed to RecBole as a config override, e.g. --epochs=50 --learning_rate=1e-3.",
    )
    parser.add_argument("--dataset", "-d", default="ml-100k-mm", help="dataset name (default: ml-100k-mm)")
    parser.add_argument("--model", "-m", default="DPPMG", help="model name, or a comma-separated list for a comparison table")
    parser.add_argument("--config_files", default=None, help="space-separated extra YAML config files")
    parser.add_argument("--stage", default="train", choices=STAGES, help="pipeline stage to run (default: train)")
    parser.add_argument("--resume", default=None, help="checkpoint (best.pth or last.pth) to continue training from")
    parser.add_argument("--checkpoint", default=None, help="export: the DPPMG best.pth to export (default: the newest DPPMG run of the dataset)")
    parser.add_argument("--tokens", default=None, help="text/image/generate: token export folder (default: the newest saved/<dataset>/DPPMG-*/tokens)")
    parser.add_argument("--users", default=None, help="generate: comma-separated original user ids")
    parser.add_argument("--spec", default=None, help="prepare: YAML that describes a user dataset (see dataset/README.md)")
    parser.add_argument("--force", action="store_true", help="prepare: rebuild even if the cached dataset is up to date")
    parser.add_argument("--profile", default=None, help="all / evaluate: settings profile properties/profiles/<name>.yaml over the defaults (quick = the README quick start; default: full = the defaults)")
    parser.add_argument("--until", default=None, choices=PIPELINE_STAGES, help="all: stop after this pipeline stage (default: run all of %s)" % ", ".join(PIPELINE_STAGES))
    parser.add_argument("--seeds", default=None, help="train: seeds of a comparison or ablation, e.g. [2020,2021,2022] (default for several models or --ablation: %s; a single model without --seeds: the config's seed)" % list(COMPARISON_SEEDS))
    parser.add_argument("--jobs", type=int, default=1, help="train: runs of a comparison / ablation at a time, each in its own process (default 1)")
    parser.add_argument("--ablation", action="store_true", help="train: DPPMG ablation (modalities, levels, codebook size; one factor at a time) instead of a comparison")
    parser.add_argument("--out", default=None, help="train: folder for the comparison / ablation tables and plots (default saved/<dataset>/compare-<time> or ablation-<time>)")
    parser.add_argument("--from_runs", default=None, help="train: no training; the comparison tables and plots of these finished run folders (space-separated), written to --out")
    return parser


def parse_seeds(raw: str | None) -> list[int] | None:
    """``[2020,2021]`` or ``2020,2021`` -> ``[2020, 2021]``."""
    if raw is None:
        return None
    parts = [p.strip() for p in raw.strip().strip("[]").split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        seeds = []
    if not seeds:
        raise DPPMGError(f"--seeds must be a list of integers such as [2020,2021,2022], got '{raw}'")
    return seeds




def parse_args(argv: list[str]):

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = parse_overrides(unknown)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not models:
        raise DPPMGError("no model given to --model")
    config_files = args.config_files.split() if args.config_files else []
    generation = {section: {} for section in GENERATION_SECTIONS}
    for key in [k for k in overrides if "." in k]:
        section, *names = key.split(".")
        if section not in GENERATION_SECTIONS or not all(names):
            raise DPPMGError(f"malformed override '--{key}': dotted keys must be --text.<key> or --image.<key> "
                             f"(or --rl.<key>, --reward.<key>, --evaluate.<key>; nested: --rl.text.<key>)")
        target = generation[section]
        for name in names[:-1]:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise DPPMGError(f"malformed override '--{key}': --{section}.{name} is both a value and a section")
        target[names[-1]] = overrides.pop(key)
    args.generation = generation
    args.seeds = parse_seeds(args.seeds)
    if args.jobs < 1:
        raise DPPMGError(f"--jobs must be at least 1, got {args.jobs}")
    return args, models, config_files, overrides


def _stage_prepare(args, overrides) -> None:

    folder = prepare_dataset(args.dataset, spec_file=Path(args.spec) if args.spec else None, force=args.force,
                             num_threads=overrides.get("torch_num_threads"))
    print(f"dataset ready: {folder}")


def _stage_train(args, models, config_files, overrides) -> str | None:
    """Train; returns the DPPMG checkpoint when one was trained (for a following export)."""

    if args.from_runs:
        if not args.out:
            raise DPPMGError("--from_runs needs --out, the folder for the tables")
        _, table = compare_runs(args.from_runs.split(), args.out)
        print(table.read_text())
        print(f"comparison table: {table}")
        return None
    seeds = args.seeds
    if seeds is None and "seed" not in overrides and (len(models) > 1 or args.ablation):
        seeds = list(COMPARISON_SEEDS)
    if args.ablation:
        if models != ["DPPMG"]:
            raise DPPMGError("--ablation trains DPPMG variants; leave --model at DPPMG")
        _, table = ablation(args.dataset, config_files, overrides, out_dir=args.out, seeds=seeds, jobs=args.jobs)
        print(table.read_text())
        print(f"ablation table: {table} (and ablation.csv beside it)")
        return None
    if len(models) == 1 and args.seeds is None:
        result = run(models[0], args.dataset, config_files, overrides, resume=args.resume)
        print(f"{result.model} on {result.dataset}: test {result.test_result}  (run folder {result.run_dir})")
        return result.checkpoint if result.model == "DPPMG" else None
    if args.resume:
        raise DPPMGError("--resume continues one model's run; give a single --model")
    results, table = compare(models, args.dataset, config_files, overrides, out_dir=args.out, seeds=seeds, jobs=args.jobs)
    print(table.read_text())
    print(f"comparison table: {table} (comparison.csv, runs.csv and the PNG plots beside it)")
    dppmg = [r.checkpoint for r in results if r.model == "DPPMG"]
    return dppmg[-1] if dppmg else None


def _stage_export(args, models, config_files, overrides, trained_checkpoint=None) -> None:

    checkpoint = args.checkpoint or trained_checkpoint
    if checkpoint is None:
        config = build_config(get_model("DPPMG"), args.dataset, config_files, overrides)
        checkpoint = latest_checkpoint(Path(config["checkpoint_dir"]), args.dataset)
    check_checkpoint(checkpoint, "DPPMG", None, trained=True)
    folder = export_tokens(checkpoint, config_dict=overrides)
    print(f"token export: {folder}")


def _token_folder(args) -> Path:

    return Path(args.tokens) if args.tokens else newest_token_export(args.dataset)


def _stage_text(args) -> None:

    run = train_text_generator(args.dataset, _token_folder(args), args.generation["text"])
    print(f"text generator: {run}")


def _stage_text_eval(args) -> None:
    """The text generator alone on held-out users: every text condition over text.evaluate.seeds,
    with paired bootstrap intervals (the report of --stage evaluate adds posters, judge and RL)."""

    out = evaluate_text_generation(args.dataset, Path(args.tokens) if args.tokens else None, args.generation["text"])
    print((out / "text_eval.md").read_text())
    print(f"text evaluation: {out} (text_eval.md, text_eval.json, samples.jsonl)")


def _stage_image(args) -> None:

    run = train_image_generator(args.dataset, _token_folder(args), load_image_config(args.generation["image"]))
    print(f"image generator: {run}")


def _stage_generate(args) -> None:
    """Text and poster for each user, from whichever generators have been trained."""

    if not args.users:
        raise DPPMGError("--stage generate needs --users, e.g. --users 1,2,3")
    users = [u.strip() for u in args.users.split(",") if u.strip()]
    tokens = _token_folder(args)
    written = []
    try:

        written.append(("text", run_generate_text(args.dataset, users, tokens, args.generation["text"])))
    except CheckpointError as error:
        missing_text = str(error)
    else:
        missing_text = None
    try:

        written.append(("image", run_generate_images(args.dataset, users, tokens, load_image_config(args.generation["image"]))))
    except CheckpointError as error:
        missing_image = str(error)
    else:
        missing_image = None
    if not written:
        raise DPPMGError(f"nothing to generate with: {missing_text}; {missing_image}")
    for kind, folder in written:
        print(f"generated {kind}: {folder}")
    for missing in (missing_text, missing_image):
        if missing:
            print(f"skipped: {missing}")


def _stage_evaluate(args) -> None:
    """The report of the newest generators (or those named in the evaluate: section)."""

    profile = load_profile(args.profile)
    sections = {s: merge(profile[s], args.generation[s]) for s in ("text", "image", "reward", "evaluate")}
    if args.tokens:
        sections["evaluate"]["tokens"] = args.tokens
    report = build_report(args.dataset, sections["evaluate"], text_config_overrides=sections["text"],
                          image_config_overrides=sections["image"], reward_overrides=sections["reward"])
    print((report / "report.md").read_text())
    print(f"report: {report} (report.md, report.csv, report.json, gallery.html)")


def _stage_all(args, models, config_files, overrides) -> None:
    """prepare -> train -> export -> text -> image -> RL -> evaluate, skipping what is valid."""

    if models != ["DPPMG"]:
        raise DPPMGError("--stage all runs the DPPMG pipeline; leave --model at DPPMG (compare models with --stage train)")
    pipeline = Pipeline(args.dataset, args.profile, config_files, overrides, args.generation, spec=args.spec, force_prepare=args.force)
    folder = pipeline.run(until=args.until)
    print(f"pipeline: {folder / 'pipeline.json'}")


# Stages RecBole does not run, and the log/ folder each writes to.
STAGE_LOGS = {"text": "TextGen", "image": "ImageGen", "generate": "Generate", "text_eval": "TextEval", "evaluate": "Report"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, models, config_files, overrides = parse_args(argv)
        check_request(args, models, config_files, overrides)
        if args.profile and args.stage not in ("all", "evaluate"):
            raise ConfigError(f"--profile applies to --stage all and evaluate, not {args.stage} "
                              "(give that stage's settings as --text.<key>=... / --image.<key>=...)")
        if args.stage in STAGE_LOGS:
            init_stage_logger(STAGE_LOGS[args.stage], args.dataset)
        if args.stage == "all":
            _stage_all(args, models, config_files, overrides)
        if args.stage == "prepare":
            _stage_prepare(args, overrides)
        if args.stage == "train":
            _stage_train(args, models, config_files, overrides)
        if args.stage == "export":
            _stage_export(args, models, config_files, overrides)
        if args.stage == "text":
            _stage_text(args)
        if args.stage == "image":
            _stage_image(args)
        if args.stage == "generate":
            _stage_generate(args)
        if args.stage == "text_eval":
            _stage_text_eval(args)
        if args.stage == "evaluate":
            _stage_evaluate(args)
    except DPPMGError as error:
        print(f"run_dppmg.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run_dppmg.py: interrupted", file=sys.stderr)
        return 130
    return 0
