"""The whole pipeline on ml-100k-mm and on the same data re-keyed as a user's own dataset, side by side.

The re-keyed copy (``bench/make_rekeyed_ml100k.py``) has other column names, string ids, PNG and
JPEG covers, a subset of the ratings and a few broken covers; if ``--stage all`` runs on it as on
ml-100k-mm, with stage times and report figures of the same order, the pipeline does not depend on
ml-100k-mm's layout. Each dataset runs in its own process, one after the other:

    python run_dppmg.py --stage all --profile quick -d <name> [--spec <spec>] --torch_num_threads=1

then the newest ``saved/<name>/Pipeline-*/pipeline.json`` gives the stage times and the report
folder, and ``dataset/<name>/manifest.json`` the dataset counts.

    python bench/bench_any_dataset.py                          # both datasets (about 15 min each on 2 CPU cores)
    python bench/bench_any_dataset.py --from-pipelines saved/ml-100k-mm/Pipeline-<time> \\
        saved/ml-100k-rekeyed/Pipeline-<time>                  # only read finished runs

Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from recbole_dppmg.paths import CACHE_DIR, REPO_ROOT, SAVED_DIR, dataset_root

logger = logging.getLogger("bench_any_dataset")

ML100K_MM = "ml-100k-mm"
REKEYED = "ml-100k-rekeyed"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "any_dataset_ml-100k"
STAGE_ORDER = ["prepare", "train", "export", "text", "image", "rl_text", "rl_image", "evaluate"]
COUNT_KEYS = [
    "users",
    "items",
    "interactions",
    "interactions_dropped_unknown_item",
    "items_with_text",
    "items_with_image",
    "images_failed",
    "images_missing_file",
]


def rekeyed_spec(name: str = REKEYED) -> Path:
    """Where the maker puts the re-keyed dataset's prepare spec by default."""
    return CACHE_DIR / name / f"{name}.prepare.yaml"


def shown(path: str | Path | None) -> str:
    """A path relative to the repository when it is inside it (shorter tables)."""
    if not path:
        return "–"
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def run_command(name: str, profile: str) -> list[str]:
    """The ``--stage all`` command of one dataset (the re-keyed one names its spec)."""
    command = ["python", "run_dppmg.py", "--stage", "all", "--profile", profile, "-d", name]
    if name == REKEYED:
        command += ["--spec", shown(rekeyed_spec())]
    return command + ["--torch_num_threads=1"]


def pipeline_folders(name: str) -> set[Path]:
    return set((SAVED_DIR / name).glob("Pipeline-*"))


def run_pipeline(name: str, profile: str) -> tuple[Path | None, int, float]:
    """Run ``--stage all`` on one dataset; returns (its Pipeline folder or None, exit code, seconds)."""
    if name == REKEYED and not rekeyed_spec().is_file():
        logger.info("%s is missing: making it first", rekeyed_spec().parent)
        maker = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "make_rekeyed_ml100k.py")], cwd=REPO_ROOT)
        if maker.returncode != 0:
            logger.error("make_rekeyed_ml100k.py failed (exit code %d); %s not run", maker.returncode, name)
            return None, maker.returncode, 0.0
    command = [sys.executable, *run_command(name, profile)[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    before = pipeline_folders(name)
    logger.info("running: %s", shlex.join(run_command(name, profile)))
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO_ROOT, env=env).returncode
    seconds = round(time.perf_counter() - started, 1)
    made = [p for p in pipeline_folders(name) - before if (p / "pipeline.json").is_file()]
    folder = max(made, key=lambda p: (p / "pipeline.json").stat().st_mtime) if made else None
    logger.info("%s: exit code %d after %.1f s, pipeline %s", name, code, seconds, folder)
    return folder, code, seconds


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def main_table(report_md: Path) -> list[str]:
    """The report's first table (conditions x measures), as report.md renders it."""
    try:
        lines = report_md.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    start = next((i for i, line in enumerate(lines) if line.startswith("| condition |")), None)
    if start is None:
        return []
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def collect(
    folder: Path | None,
    returncode: int | None = None,
    wall_seconds: float | None = None,
    dataset: str | None = None,
    profile: str | None = None,
) -> dict:
    """Everything the table shows about one pipeline folder (missing parts stay None/empty)."""
    record = (read_json(folder / "pipeline.json") if folder else None) or {}
    stages = {s["stage"]: s for s in record.get("stages", [])}
    name = dataset or record.get("dataset") or folder.parent.name
    data_dir = Path((stages.get("prepare") or {}).get("output") or dataset_root() / name)
    manifest = read_json(data_dir / "manifest.json") or {}
    report_dir = (stages.get("evaluate") or {}).get("output")
    report = read_json(Path(report_dir) / "report.json") if report_dir else None
    return {
        "dataset": name,
        "pipeline": str(folder) if folder else None,
        "profile": record.get("profile") or profile,
        "returncode": returncode,
        "wall_seconds": wall_seconds,
        "total_seconds": record.get("total_seconds"),
        "stages": list(stages.values()),
        "dataset_dir": str(data_dir),
        "counts": manifest.get("counts", {}),
        "report_dir": report_dir,
        "report_table": main_table(Path(report_dir) / "report.md") if report_dir else [],
        "conditions": (report or {}).get("conditions", {}),
        "summary": (report or {}).get("summary", {}),
    }


def _stage_cell(entry: dict | None) -> str:
    return "–" if entry is None else f"{entry['seconds']:.1f} ({entry['status']})"


def _count_cell(value) -> str:
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def stage1_metrics(stages: list[dict]) -> dict:
    """The stage-1 test metrics the train stage's note carries (``test {...}``), or {}."""
    note = next((s.get("note") or "" for s in stages if s["stage"] == "train"), "")
    if not note.startswith("test {"):
        return {}
    try:
        return json.loads(note[len("test ") :])
    except json.JSONDecodeError:
        return {}


def markdown(results: list[dict], reproduce: str, read_from: str | None = None) -> str:
    """The side-by-side tables: dataset counts, stage seconds, then each report's main table."""
    names = [r["dataset"] for r in results]
    head = "| | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)
    lines = [
        f"# The pipeline on any dataset: {' vs '.join(names)}",
        "",
        f"Reproduce: `{reproduce}`",
        "",
    ]
    if read_from:
        lines += [f"(These tables were read from finished runs: `{read_from}`.)", ""]
    if REKEYED in names:
        lines += [
            f"{REKEYED} keeps only the ratings >= 3 of 70% of the users (`bench/make_rekeyed_ml100k.py`), so its "
            "figures should be of the same order as ml-100k-mm's, not equal.",
            "",
        ]
    lines += [
        "It runs, from the repository root, one after the other: "
        + "; ".join(f"`{shlex.join(run_command(r['dataset'], r['profile'] or 'quick'))}`" for r in results)
        + ".",
        "",
        "## Dataset (`dataset/<name>/manifest.json` counts)",
        "",
        head,
        rule,
    ]
    keys = COUNT_KEYS + sorted({k for r in results for k in r["counts"]} - set(COUNT_KEYS))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_count_cell(r["counts"].get(key)) for r in results) + " |")
    lines += ["", "## Stages (wall seconds, status)", "", head, rule]
    by_stage = [{s["stage"]: s for s in r["stages"]} for r in results]
    order = STAGE_ORDER + [s for stages in by_stage for s in stages if s not in STAGE_ORDER]
    for stage in dict.fromkeys(order):
        lines.append(f"| {stage} | " + " | ".join(_stage_cell(stages.get(stage)) for stages in by_stage) + " |")
    lines.append("| **total** | " + " | ".join(_count_cell(r["total_seconds"]) for r in results) + " |")
    if any(r["returncode"] is not None for r in results):
        lines.append("| process wall seconds | " + " | ".join(_count_cell(r["wall_seconds"]) for r in results) + " |")
        lines.append("| exit code | " + " | ".join(_count_cell(r["returncode"]) for r in results) + " |")
    metrics = [stage1_metrics(r["stages"]) for r in results]
    if any(metrics):
        lines += ["", "## Stage 1 (DPPMG) test metrics", "", head, rule]
        for key in dict.fromkeys(k for m in metrics for k in m):
            lines.append(f"| {key} | " + " | ".join(_count_cell(m.get(key)) for m in metrics) + " |")
    notes = [(r["dataset"], s) for r in results for s in r["stages"] if s.get("note")]
    if notes:
        lines += ["", "Stage notes:", ""] + [f"- {name} {s['stage']}: {s['note']}" for name, s in notes]
    for r in results:
        lines += ["", f"## Generation report: {r['dataset']}", ""]
        if r["report_table"]:
            lines += r["report_table"] + ["", f"From `{shown(r['report_dir'])}/report.md`."]
        else:
            lines.append("No report (the evaluate stage did not finish).")
    lines += ["", "## Runs", ""] + [f"- {r['dataset']}: `{shown(r['pipeline'])}`" for r in results]
    return "\n".join(lines) + "\n"


def write_outputs(results: list[dict], out: Path, reproduce: str, read_from: str | None = None) -> tuple[Path, Path]:
    """``<out>.md`` and ``<out>.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = out.with_name(out.name + ".md"), out.with_name(out.name + ".json")
    md.write_text(markdown(results, reproduce, read_from), encoding="utf-8")
    js.write_text(json.dumps({"reproduce": reproduce, "datasets": results}, indent=2) + "\n", encoding="utf-8")
    return md, js


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=[ML100K_MM, REKEYED],
        help=f"datasets to run, in order (default: {ML100K_MM} {REKEYED}; {REKEYED} is made first if missing)",
    )
    parser.add_argument(
        "--from-pipelines",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="read these finished saved/<name>/Pipeline-* folders instead of running anything",
    )
    parser.add_argument("--profile", default="quick", help="--profile of --stage all (default: quick)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output stem; writes <out>.md and <out>.json (default: {shown(DEFAULT_OUT)})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_pipelines:
        missing = [str(p) for p in args.from_pipelines if not (p / "pipeline.json").is_file()]
        if missing:
            logger.error("no pipeline.json in: %s", ", ".join(missing))
            return 2
        results = [collect(p.resolve()) for p in args.from_pipelines]
        datasets = [r["dataset"] for r in results]
    else:
        results, datasets = [], args.datasets
        for name in datasets:
            folder, code, seconds = run_pipeline(name, args.profile)
            if folder is None:
                logger.error("%s: no Pipeline folder was written (exit code %d)", name, code)
            results.append(collect(folder, code, seconds, dataset=name, profile=args.profile))
    profile = next((r["profile"] for r in results if r["profile"]), args.profile)
    reproduce = shlex.join(["python", "bench/bench_any_dataset.py", "--datasets", *datasets, "--profile", profile])
    read_from = None
    if args.from_pipelines:
        read_from = shlex.join(
            ["python", "bench/bench_any_dataset.py", "--from-pipelines", *map(shown, args.from_pipelines)]
        )
    md, js = write_outputs(results, args.out, reproduce, read_from)
    logger.info("wrote %s and %s", md, js)
    return 0 if all(r["returncode"] in (None, 0) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
