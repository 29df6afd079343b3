"""Command line of ``run_dppmg.py``, in the style of RecBole-GNN's ``run_recbole_gnn.py``.

Known flags are parsed here; every other ``--key=value`` is a RecBole config override, except
``--<section>.<key>=value`` (sections text, image, rl, reward, evaluate; nested keys with more
dots, e.g. ``--rl.text.steps=8``), which override the sections of ``properties/generation.yaml``.
``--stage all`` runs the whole pipeline (``recbole_dppmg/pipeline.py``) with ``--profile``.
The stages, their help and their log folders come from ``recbole_dppmg/stages.py``, the table
the pipeline reads too; ``HANDLERS`` maps each stage to the function that runs it.
User errors (argparse's included) print one line (``run_dppmg.py: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from recbole_dppmg.config import build_config, parse_overrides
from recbole_dppmg.data.prepare import prepare_dataset
from recbole_dppmg.errors import CheckpointError, ConfigError, DPPMGError
from recbole_dppmg.generation.common.settings import load_settings, merge
from recbole_dppmg.generation.image.generate import run_generate_images
from recbole_dppmg.generation.image.train import train_image_generator
from recbole_dppmg.generation.report.build import build_report
from recbole_dppmg.generation.text.config import saved_root
from recbole_dppmg.generation.text.pipeline import (
    evaluate_text_generation,
    run_generate_text,
    train_text_generator,
)
from recbole_dppmg.paths import SAVED_DIR
from recbole_dppmg.pipeline import Pipeline, load_profile
from recbole_dppmg.quick_start import ABLATION_FACTORS, ablation, compare, compare_runs, run
from recbole_dppmg.runs import (
    final_generator,
    rl_phases,
    rl_source,
)
from recbole_dppmg.stage_logging import init_stage_logger
from recbole_dppmg.stages import PIPELINE_STEPS, STAGE_NAMES, STAGES, stage
from recbole_dppmg.tokens.export import (
    export_tokens,
    newest_stage1_checkpoint,
    newest_token_export,
)
from recbole_dppmg.utils import get_model
from recbole_dppmg.validation import check_checkpoint, check_request

logger = logging.getLogger(__name__)

COMPARISON_SEEDS = (2020, 2021, 2022)  # a comparison or ablation reports the median over these
GENERATION_SECTIONS = ("text", "image", "rl", "reward", "evaluate")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown --stage, a missing value) become the one-line error
    ``main`` prints, exit status 2, instead of the usage text."""

    def error(self, message):
        raise DPPMGError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run_dppmg.py",
        description="DPPMG: discrete preference tokens for personalized multimodal generation (RecBole plugin).",
        epilog=(
            "Any other --key=value is passed to RecBole as a config override, e.g. --epochs=50 --learning_rate=1e-3."
        ),
        allow_abbrev=False,  # else --seed=1 (a RecBole key) would be read as --seeds=1
    )
    parser.add_argument("--dataset", "-d", default="ml-100k-mm", help="dataset name (default: ml-100k-mm)")
    parser.add_argument(
        "--model", "-m", default="DPPMG", help="model name, or a comma-separated list for a comparison table"
    )
    parser.add_argument("--config_files", default=None, help="space-separated extra YAML config files")
    parser.add_argument(
        "--stage",
        default="train",
        choices=STAGE_NAMES,
        help="stage to run (default: train): " + "; ".join(f"{s.name}: {s.help}" for s in STAGES),
    )
    parser.add_argument("--resume", default=None, help="checkpoint (best.pth or last.pth) to continue training from")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="export: the DPPMG best.pth to export (default: the newest DPPMG run of the dataset)",
    )
    parser.add_argument(
        "--tokens",
        default=None,
        help="text/image/rl/generate: token export folder (default: the newest saved/<dataset>/DPPMG-*/tokens)",
    )
    parser.add_argument("--users", default=None, help="generate: comma-separated original user ids")
    parser.add_argument(
        "--spec", default=None, help="prepare: YAML that describes a user dataset (see dataset/README.md)"
    )
    parser.add_argument(
        "--force", action="store_true", help="prepare: rebuild even if the cached dataset is up to date"
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="all / rl / evaluate: settings profile "
        "properties/profiles/<name>.yaml, or a YAML file of the same shape, over the defaults (quick = the README "
        "quick start; default: full = the defaults)",
    )
    parser.add_argument(
        "--until",
        default=None,
        choices=PIPELINE_STEPS,
        help="all: stop after this pipeline stage (default: run all of %s)" % ", ".join(PIPELINE_STEPS),
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help=(
            "train: seeds of a comparison or ablation, e.g. [2020,2021,2022] (default for several models or "
            "--ablation: %s; a single model without --seeds: the config's seed)" % list(COMPARISON_SEEDS)
        ),
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train: runs of a comparison / ablation at a time, each in its own process (default 1)",
    )
    parser.add_argument(
        "--ablation",
        nargs="?",
        const=",".join(ABLATION_FACTORS),
        default=None,
        help=(
            "train: DPPMG ablation, one factor at a time, instead of a comparison; optionally which factors, "
            "comma-separated, of %s (default: all)" % ",".join(ABLATION_FACTORS)
        ),
    )
    parser.add_argument(
        "--out",
        default=None,
        help=(
            "train: folder for the comparison / ablation tables and plots (default saved/<dataset>/compare-<time> or "
            "ablation-<time>)"
        ),
    )
    parser.add_argument(
        "--from_runs",
        default=None,
        help=(
            "train: no training; the comparison tables and plots of these finished run folders (space-separated), "
            "written to --out"
        ),
    )
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
            raise DPPMGError(
                f"malformed override '--{key}': dotted keys must be --text.<key> or --image.<key> "
                f"(or --rl.<key>, --reward.<key>, --evaluate.<key>; nested: --rl.text.<key>)"
            )
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


def _stage_prepare(args, models, config_files, overrides) -> None:

    folder = prepare_dataset(
        args.dataset,
        spec_file=Path(args.spec) if args.spec else None,
        force=args.force,
        num_threads=overrides.get("torch_num_threads"),
    )
    print(f"dataset ready: {folder}")


def _stage_train(args, models, config_files, overrides) -> None:
    """One model's run, a comparison, an ablation, or the tables of finished runs."""

    if args.from_runs:
        if not args.out:
            raise DPPMGError("--from_runs needs --out, the folder for the tables")
        _, table = compare_runs(args.from_runs.split(), args.out)
        print(table.read_text())
        print(f"comparison table: {table}")
        return
    seeds = args.seeds
    if seeds is None and "seed" not in overrides and (len(models) > 1 or args.ablation):
        seeds = list(COMPARISON_SEEDS)
    if args.ablation:
        if models != ["DPPMG"]:
            raise DPPMGError("--ablation trains DPPMG variants; leave --model at DPPMG")
        factors = [f.strip() for f in args.ablation.split(",") if f.strip()]
        _, table = ablation(
            args.dataset, config_files, overrides, out_dir=args.out, seeds=seeds, jobs=args.jobs, factors=factors
        )
        print(table.read_text())
        print(f"ablation table: {table} (and ablation.csv beside it)")
        return
    if len(models) == 1 and args.seeds is None:
        result = run(models[0], args.dataset, config_files, overrides, resume=args.resume)
        print(f"{result.model} on {result.dataset}: test {result.test_result}  (run folder {result.run_dir})")
        return
    if args.resume:
        raise DPPMGError("--resume continues one model's run; give a single --model")
    _, table = compare(models, args.dataset, config_files, overrides, out_dir=args.out, seeds=seeds, jobs=args.jobs)
    print(table.read_text())
    print(f"comparison table: {table} (comparison.csv, runs.csv and the PNG plots beside it)")


def _stage_export(args, models, config_files, overrides) -> None:

    checkpoint = args.checkpoint
    if checkpoint is None:
        config = build_config(get_model("DPPMG"), args.dataset, config_files, overrides)
        checkpoint = newest_stage1_checkpoint(Path(config["checkpoint_dir"]), args.dataset)
    check_checkpoint(checkpoint, "DPPMG", None, trained=True)
    folder = export_tokens(checkpoint, config_dict=overrides)
    print(f"token export: {folder}")


def _token_folder(args) -> Path:

    return Path(args.tokens) if args.tokens else newest_token_export(args.dataset)


def _stage_text(args, models, config_files, overrides) -> None:

    run = train_text_generator(args.dataset, _token_folder(args), args.generation["text"])
    print(f"text generator: {run}")


def _stage_text_eval(args, models, config_files, overrides) -> None:
    """The text generator alone on held-out users: every text condition over text.evaluate.seeds,
    with paired bootstrap intervals (the report of --stage evaluate adds posters, judge and RL)."""

    out = evaluate_text_generation(args.dataset, Path(args.tokens) if args.tokens else None, args.generation["text"])
    print((out / "text_eval.md").read_text())
    print(f"text evaluation: {out} (text_eval.md, text_eval.json, samples.jsonl)")


def _stage_image(args, models, config_files, overrides) -> None:

    settings = load_settings("image", args.generation["image"])  # a bad setting (image.backbone) before the export
    run = train_image_generator(args.dataset, _token_folder(args), settings)
    print(f"image generator: {run}")


def _final_generators(args) -> tuple[dict, dict]:
    """The text and image settings of ``--stage generate``, each naming its generator: the one
    given (``--text.generator`` / ``--image.checkpoint``) or the final generator of the newest
    finished chain (the last finished RL phase, else the warm-up); logs which runs are used."""
    text, image = dict(args.generation["text"]), dict(load_settings("image", args.generation["image"]))
    for modality, settings, key, root in (
        ("text", text, "generator", saved_root(load_settings("text", text))),
        ("image", image, "checkpoint", SAVED_DIR),
    ):
        if settings.get(key):
            logger.info("%s generator: %s (given by --%s.%s)", modality, settings[key], modality, key)
            continue
        run = final_generator(args.dataset, modality, root)
        if run is None:  # left unset: generating this modality fails with its own message
            continue
        settings[key] = str(run)
        phases = rl_phases(run) if rl_source(run) else []
        if phases:
            logger.info(
                "%s generator: %s (RL %s from the warm-up %s)",
                modality,
                run,
                " -> ".join(p.name for p in phases),
                Path(rl_source(phases[0])).name,
            )
        else:
            logger.info("%s generator: %s (the warm-up; no finished RL run made from it)", modality, run)
    return text, image


def _stage_generate(args, models, config_files, overrides) -> None:
    """Text and poster for each user, from the final generators (see ``_final_generators``)."""

    if not args.users:
        raise DPPMGError("--stage generate needs --users, e.g. --users 1,2,3")
    users = [u.strip() for u in args.users.split(",") if u.strip()]
    tokens = _token_folder(args)
    text_settings, image_settings = _final_generators(args)
    written = []
    try:
        written.append(("text", run_generate_text(args.dataset, users, tokens, text_settings)))
    except CheckpointError as error:
        missing_text = str(error)
    else:
        missing_text = None
    try:
        written.append(("image", run_generate_images(args.dataset, users, tokens, image_settings)))
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


def _stage_evaluate(args, models, config_files, overrides) -> None:
    """The report of the newest generators (or those named in the evaluate: section)."""

    profile = load_profile(args.profile)
    sections = {s: merge(profile[s], args.generation[s]) for s in ("text", "image", "reward", "evaluate")}
    if args.tokens:
        sections["evaluate"]["tokens"] = args.tokens
    report = build_report(
        args.dataset,
        sections["evaluate"],
        text_config_overrides=sections["text"],
        image_config_overrides=sections["image"],
        reward_overrides=sections["reward"],
    )
    print((report / "report.md").read_text())
    print(f"report: {report} (report.md, report.csv, report.json, gallery.html)")


def _stage_rl(args, models, config_files, overrides) -> None:
    """Text and image RL alone: the pipeline's RL steps from the newest finished warm-up generators
    (or --tokens, --text.generator, --image.checkpoint), finished runs skipped, unfinished resumed."""

    pipeline = Pipeline(args.dataset, args.profile, config_files, overrides, args.generation)
    folder = pipeline.run_rl(
        args.tokens, pipeline.sections["text"].get("generator"), pipeline.sections["image"].get("checkpoint")
    )
    print(f"pipeline: {folder / 'pipeline.json'}")


def _stage_all(args, models, config_files, overrides) -> None:
    """prepare -> train -> export -> text -> image (+ history baseline) -> RL -> evaluate, skipping what is valid."""

    if models != ["DPPMG"]:
        raise DPPMGError(
            "--stage all runs the DPPMG pipeline; leave --model at DPPMG (compare models with --stage train)"
        )
    pipeline = Pipeline(
        args.dataset, args.profile, config_files, overrides, args.generation, spec=args.spec, force_prepare=args.force
    )
    folder = pipeline.run(until=args.until)
    print(f"pipeline: {folder / 'pipeline.json'}")


HANDLERS = {
    "prepare": _stage_prepare,
    "train": _stage_train,
    "export": _stage_export,
    "text": _stage_text,
    "image": _stage_image,
    "rl": _stage_rl,
    "generate": _stage_generate,
    "text_eval": _stage_text_eval,
    "evaluate": _stage_evaluate,
    "all": _stage_all,
}  # one per stage of the table (tests check)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, models, config_files, overrides = parse_args(argv)
        check_request(args, models, config_files, overrides)
        entry = stage(args.stage)
        if args.profile and not entry.profile:
            profiled = [s.name for s in STAGES if s.profile]
            raise ConfigError(
                f"--profile applies to --stage {', '.join(profiled[:-1])} and {profiled[-1]}, "
                f"not {args.stage} (give that stage's settings as --text.<key>=... / --image.<key>=...)"
            )
        if entry.log:
            init_stage_logger(entry.log, args.dataset)
        HANDLERS[args.stage](args, models, config_files, overrides)
    except DPPMGError as error:
        print(f"run_dppmg.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run_dppmg.py: interrupted", file=sys.stderr)
        return 130
    return 0
