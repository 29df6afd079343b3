"""Stage-1 result tables: each model (or ablation variant) trained with several seeds and
summarised per metric as the median with its min-max spread, as Markdown and CSV.

Reads only ``RunResult`` objects (``recbole_dppmg.results``); DPPMG's ``extra`` (its
``run_summary``) adds the quantized-versus-continuous test NDCG@10 and the codebook usage.
"""

from __future__ import annotations

import csv
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

from recbole_dppmg.results import RunResult

METRIC_COLUMNS = ("recall@10", "ndcg@10", "hit@10", "recall@20", "ndcg@20", "hit@20")
NAN = float("nan")


def spread(values: Iterable[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` of the finite values; NaNs when there are none."""
    finite = [float(v) for v in values if v == v]
    if not finite:
        return NAN, NAN, NAN
    return statistics.median(finite), min(finite), max(finite)


def fmt_spread(values: Iterable[float], digits: int = 4) -> str:
    """``0.3050 [0.3010, 0.3080]``; the bare median for one value, ``-`` for none."""
    values = list(values)
    median, low, high = spread(values)
    if median != median:
        return "-"
    if len([v for v in values if v == v]) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def group_by(results: Iterable[RunResult], key) -> OrderedDict[str, list[RunResult]]:
    """Results grouped by ``key(result)``, groups in order of first appearance."""
    groups: OrderedDict[str, list] = OrderedDict()
    for result in results:
        groups.setdefault(key(result), []).append(result)
    return groups


def quantized_ndcg(result: RunResult) -> tuple[float, float]:
    """DPPMG's test NDCG@10 with quantized and with continuous user vectors (NaN otherwise)."""
    extra = result.extra or {}
    q = extra.get("test_quantized", {}).get("ndcg@10", NAN)
    c = extra.get("test_continuous", {}).get("ndcg@10", NAN)
    return float(q), float(c)


def level_stats(result: RunResult, level: int, key: str) -> list[float]:
    """``key`` (codes_used, perplexity, quant_error) of one level, per modality, from the
    best checkpoint's code statistics over all users."""
    stats = (result.extra or {}).get("code_stats", {})
    return [v for k, v in stats.items() if k.endswith(f"/L{level}/{key}")]


def level0_usage(result: RunResult) -> float:
    """Smallest fraction of level-0 codes in use over the modalities (NaN without a quantizer)."""
    size = (result.extra or {}).get("quantizer", {}).get("codebook_size")
    used = level_stats(result, 0, "codes_used")
    return min(used) / size if size and used else NAN


def users_per_level0_code(result: RunResult) -> float:
    """Users of the training graph per level-0 code in use, in the modality that uses fewest
    codes: how many users stage 2's one embedding per code has to stand for (NaN if unknown)."""
    users = (result.extra or {}).get("quantizer", {}).get("graph_users")
    used = level_stats(result, 0, "codes_used")
    return users / min(used) if users and used and min(used) > 0 else NAN


def final_quant_error(result: RunResult) -> float:
    """Mean over modalities of the users' variance left after the last level."""
    levels = (result.extra or {}).get("quantizer", {}).get("levels")
    errors = level_stats(result, levels - 1, "quant_error") if levels else []
    return sum(errors) / len(errors) if errors else NAN


def speed_ratio(results: list[RunResult], model: str = "DPPMG", reference: str = "LightGCN") -> list[float]:
    """Per seed, ``model``'s seconds per epoch over ``reference``'s (same comparison)."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in results:
        by_seed.setdefault(r.seed, {})[r.model] = r.seconds_per_epoch
    return [s[model] / s[reference] for s in by_seed.values() if model in s and s.get(reference)]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")  # LF: shell tools read the last column clean
        writer.writerow(header)
        writer.writerows(rows)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _num(value: float, digits: int = 4) -> str:
    return "" if value != value else f"{value:.{digits}f}"


def write_runs_csv(results: list[RunResult], path: Path) -> Path:
    """One row per run (every seed), the raw numbers behind the summary tables."""
    header = [
        "label",
        "model",
        "seed",
        "valid ndcg@10",
        *METRIC_COLUMNS,
        "test ndcg@10 quantized",
        "test ndcg@10 continuous",
        "level0 usage",
        "epochs",
        "s/epoch",
        "peak MB",
        "run_dir",
    ]
    rows = []
    for r in results:
        q, c = quantized_ndcg(r)
        rows.append(
            [
                r.label or r.model,
                r.model,
                r.seed,
                _num(r.best_valid_result.get("ndcg@10", NAN)),
                *(_num(r.test_result.get(m, NAN)) for m in METRIC_COLUMNS),
                _num(q),
                _num(c),
                _num(level0_usage(r), 3),
                r.epochs_trained,
                _num(r.seconds_per_epoch, 3),
                _num(r.peak_memory_mb, 0),
                r.run_dir,
            ]
        )
    _write_csv(path, header, rows)
    return path


def write_comparison(results: list[RunResult], out_dir: str | Path, note: str = "") -> tuple[Path, Path]:
    """``comparison.md`` / ``comparison.csv`` (per model: median and min-max over seeds of the
    test metrics, best valid NDCG@10, epochs, s/epoch, peak memory), DPPMG's quantized versus
    continuous NDCG@10 and codebook usage, the DPPMG/LightGCN s/epoch ratio, and ``runs.csv``;
    ``note``: a paragraph under the protocol line (e.g. where the runs come from)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_by(results, lambda r: r.model)
    seeds = sorted({r.seed for r in results})

    csv_header = ["model"]
    for m in (*METRIC_COLUMNS, "valid ndcg@10"):
        csv_header += [m, f"{m} min", f"{m} max"]
    csv_header += ["seeds", "epochs", "s/epoch", "peak MB"]
    csv_rows, md_rows = [], []
    for model, runs in groups.items():
        columns = {m: [r.test_result.get(m, NAN) for r in runs] for m in METRIC_COLUMNS}
        columns["valid ndcg@10"] = [r.best_valid_result.get("ndcg@10", NAN) for r in runs]
        epochs = spread(r.epochs_trained for r in runs)[0]
        seconds = spread(r.seconds_per_epoch for r in runs)[0]
        memory = spread(r.peak_memory_mb for r in runs)[0]
        row = [model]
        for values in columns.values():
            row += [_num(v) for v in spread(values)]
        csv_rows.append(row + [len(runs), _num(epochs, 1), _num(seconds, 3), _num(memory, 0)])
        md_rows.append(
            [
                model,
                *(fmt_spread(v) for v in columns.values()),
                str(len(runs)),
                f"{epochs:.0f}",
                f"{seconds:.2f}",
                f"{memory:.0f}",
            ]
        )
    csv_path = out_dir / "comparison.csv"
    _write_csv(csv_path, csv_header, csv_rows)
    write_runs_csv(results, out_dir / "runs.csv")

    dataset = results[0].dataset if results else "?"
    lines = [
        f"# Test metrics on {dataset}",
        "",
        "Protocol: properties/overall.yaml (random 8/1/1 split per user, full ranking, best "
        "validation NDCG@10 checkpoint). Seeds " + ", ".join(map(str, seeds)) + " (the seed sets "
        "the split, the sampling and the initialisation); each cell is the median over seeds "
        "[min, max].",
        "",
        *([note, ""] if note else []),
        *_markdown_table(["model", *METRIC_COLUMNS, "valid ndcg@10", "seeds", "epochs", "s/epoch", "peak MB"], md_rows),
        "",
    ]
    dppmg = groups.get("DPPMG", [])
    if dppmg:
        rows = []
        for r in dppmg:
            q, c = quantized_ndcg(r)
            rows.append(
                [
                    str(r.seed),
                    _num(q),
                    _num(c),
                    _num(q / c, 3),
                    _num(level0_usage(r), 3),
                    _num(users_per_level0_code(r), 1),
                    _num(final_quant_error(r), 4),
                ]
            )
        qs, cs = zip(*(quantized_ndcg(r) for r in dppmg))
        rows.append(
            [
                "median",
                fmt_spread(qs),
                fmt_spread(cs),
                fmt_spread([q / c for q, c in zip(qs, cs)], 3),
                fmt_spread([level0_usage(r) for r in dppmg], 3),
                fmt_spread([users_per_level0_code(r) for r in dppmg], 1),
                fmt_spread([final_quant_error(r) for r in dppmg], 4),
            ]
        )
        lines += [
            "## DPPMG: quantized versus continuous user vectors",
            "",
            "Test NDCG@10 of the best checkpoint scored with the users' quantized vectors "
            "(their tokens) and with the continuous ones; level-0 usage is the smallest fraction "
            "of level-0 codes used by some user, over the modalities, and users per level-0 code "
            "the training-graph users over the codes in use in that modality; the last column is "
            "the fraction of the users' variance left after the last level.",
            "",
            *_markdown_table(
                [
                    "seed",
                    "quantized",
                    "continuous",
                    "quantized / continuous",
                    "level-0 usage",
                    "users per level-0 code",
                    "variance left",
                ],
                rows,
            ),
            "",
        ]
        prefixes = [r.extra.get("test_quantized_levels", {}) for r in dppmg]
        if any(prefixes):
            depth = max(len(p) for p in prefixes)
            recorded = sum(1 for p in prefixes if p)
            runs = "" if recorded == len(prefixes) else f" ({recorded} of the {len(prefixes)} runs recorded it)"
            lines += [
                f"Test NDCG@10 when users keep only their first l codes (the same trained models){runs}: "
                + "; ".join(
                    f"l = {l}: " + fmt_spread([p.get(str(l), NAN) for p in prefixes]) for l in range(1, depth + 1)
                )
                + ".",
                "",
            ]
    ratios = speed_ratio(results)
    if ratios:
        lines += [
            "## Speed",
            "",
            "DPPMG / LightGCN seconds per training epoch, per seed: "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + f"; median {spread(ratios)[0]:.2f}.",
            "",
        ]
    lines += ["Run folders: see `runs.csv`.", ""]
    md_path = out_dir / "comparison.md"
    md_path.write_text("\n".join(lines))
    return md_path, csv_path


def write_ablation(results: list[RunResult], variants: dict[str, dict], out_dir: str | Path) -> tuple[Path, Path]:
    """``ablation.md`` / ``ablation.csv``: per variant (label -> config overrides), median and
    min-max over seeds of valid and test NDCG@10, the quantized/continuous ratio, code usage and
    seconds per epoch; and ``ablation_runs.csv`` with every run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_by(results, lambda r: r.label or r.model)
    header = [
        "variant",
        "overrides",
        "seeds",
        "valid ndcg@10",
        "test ndcg@10",
        "test ndcg@10 continuous",
        "quantized / continuous",
        "level-0 usage",
        "users per level-0 code",
        "level-0 perplexity",
        "variance left",
        "s/epoch",
    ]
    csv_header = ["variant", "overrides", "seeds"]
    for m in header[3:]:
        csv_header += [m, f"{m} min", f"{m} max"]
    md_rows, csv_rows = [], []
    for label, runs in groups.items():
        qc = [quantized_ndcg(r) for r in runs]
        columns = [
            [r.best_valid_result.get("ndcg@10", NAN) for r in runs],
            [r.test_result.get("ndcg@10", NAN) for r in runs],
            [c for _, c in qc],
            [q / c for q, c in qc],
            [level0_usage(r) for r in runs],
            [users_per_level0_code(r) for r in runs],
            [min(level_stats(r, 0, "perplexity") or [NAN]) for r in runs],
            [final_quant_error(r) for r in runs],
            [r.seconds_per_epoch for r in runs],
        ]
        overrides = ", ".join(f"{k}={v}" for k, v in variants.get(label, {}).items()) or "(defaults)"
        digits = [4, 4, 4, 3, 3, 1, 1, 4, 2]
        md_rows.append([label, overrides, str(len(runs)), *(fmt_spread(v, d) for v, d in zip(columns, digits))])
        row = [label, overrides, len(runs)]
        for values, d in zip(columns, digits):
            row += [_num(v, d) for v in spread(values)]
        csv_rows.append(row)
    csv_path = out_dir / "ablation.csv"
    _write_csv(csv_path, csv_header, csv_rows)
    write_runs_csv(results, out_dir / "ablation_runs.csv")
    seeds = sorted({r.seed for r in results})
    dataset = results[0].dataset if results else "?"
    lines = [
        f"# DPPMG ablation on {dataset}",
        "",
        "One factor at a time from the defaults in properties/model/DPPMG.yaml; same protocol as "
        "the comparison. Seeds " + ", ".join(map(str, seeds)) + "; each cell is the median over "
        "seeds [min, max]. Test NDCG@10 uses the quantized user vectors; level-0 usage is the "
        "smallest fraction of level-0 codes in use over the modalities, users per level-0 code "
        "the training-graph users over the codes in use in that modality (stage 2 learns one "
        "embedding per code); variance left is after "
        "the last level, averaged over the modalities.",
        "",
        *_markdown_table(header, md_rows),
        "",
        "Every run: `ablation_runs.csv`.",
        "",
    ]
    md_path = out_dir / "ablation.md"
    md_path.write_text("\n".join(lines))
    return md_path, csv_path
