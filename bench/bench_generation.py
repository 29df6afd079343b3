"""The generation test table under the evaluation protocol, from reports of several training seeds.

Each ``--seed`` names the report (``report/`` folder of ``--stage evaluate`` or ``--stage all``)
of one training seed's generators on the *test* users; each ``--variant NAME=REPORT[,REPORT...]``
adds the DPPMG rows of other runs (the routing ablation: ``dppmg_text_tokens_only`` etc.). Per
condition and measure the output gives the mean over users of the per-user values averaged over
the training seeds, the 95% bootstrap interval over users of that average, and the range of the
per-seed means (``train_seed_range``: the training-seed spread).

    python bench/bench_generation.py --seed saved/ml-100k-mm/Report-a/report --seed .../Report-b/report \\
        --seed .../Report-c/report --variant dppmg_text_tokens_only=.../Report-d/report \\
        --out bench/results/generation_ml-100k-mm.json

The shape: ``{modality: {condition: {measure: {"mean", "ci95", "train_seed_range"}}}}`` with the
modalities ``text`` / ``image``; measures without per-user values (perplexity, consistency level,
Fréchet distance) have ``ci95`` null.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from recbole_dppmg.generation.common.protocol import bootstrap_interval

logger = logging.getLogger("bench_generation")

# report condition -> table condition, per modality (the image generator's population baseline is its
# null conditioning, trained on the same pairs: the report's "no tokens" row; its history baseline is the
# history generator of evaluate.image_history_run)
CONDITIONS = {
    "text": {
        "dppmg": "dppmg",
        "dppmg_rl": "dppmg_rl",
        "shuffled": "shuffled",
        "population": "population",
        "history": "history",
        "token_items": "dppmg_token_items",
        "constant_popular": "constant_popular",
        "unseen_popular": "unseen_popular",
        "ceiling": "reference",
    },
    "image": {
        "dppmg": "dppmg",
        "dppmg_rl": "dppmg_rl",
        "shuffled": "shuffled",
        "no_tokens": "population",
        "history": "history",
        "constant_popular": "constant_popular",
        "unseen_popular": "unseen_popular",
        "ceiling": "reference",
    },
}
# table measure -> (report per-user interval name, or None) and (report summary metric, or None)
MEASURES = {
    "text": {
        "gap_retrieval_ndcg10": ("gap_text_retrieval_ndcg@10", None),
        "gap_judge": ("gap_text_judge", None),
        "gap_heldout_judge": ("gap_text_heldout_judge", None),
        "gap_consistency": ("gap_consistency", None),
        "retrieval_ndcg10": ("text_ndcg@10", None),
        "judge": ("text_judge", None),
        "heldout_judge": ("text_heldout_judge", None),
        "consistency": (None, "consistency"),
        "perplexity": (None, "perplexity"),
        "degenerate_share": (None, "degenerate_share"),
    },
    "image": {
        "gap_retrieval_ndcg10": ("gap_image_retrieval_ndcg@10", None),
        "gap_judge": ("gap_image_judge", None),
        "gap_heldout_judge": ("gap_image_heldout_judge", None),
        "gap_consistency": ("gap_consistency", None),
        "gap_personal_similarity": ("gap_image_personal_similarity", None),
        "retrieval_ndcg10": ("image_ndcg@10", None),
        "judge": ("image_judge", None),
        "heldout_judge": ("image_heldout_judge", None),
        "consistency": (None, "consistency"),
        "fd": (None, "frechet_distance"),
        "between_user_similarity": (None, "between_user_similarity"),
        "near_duplicate_share": (None, "near_duplicate_share"),
    },
}


def read_report(folder: Path) -> dict:
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no report.json (give the report/ folder of --stage evaluate)")
    result = json.loads(path.read_text())
    if "intervals" not in result:
        raise SystemExit(f"{folder}: a report from before the evaluation protocol (no intervals); evaluate again")
    return result


def _cell(reports: list[dict], condition: str, interval: str | None, metric: str | None) -> dict | None:
    """One measure of one condition pooled over the training seeds' reports (None if absent)."""
    if interval is not None:
        per_user = _per_user(reports, condition, interval)
        if per_user is None:
            return None
        seeds = [r["intervals"][condition][interval]["mean"] for r in reports]
        return {
            "mean": float(per_user.mean()),
            "ci95": bootstrap_interval(per_user),
            "train_seed_range": [float(min(seeds)), float(max(seeds))],
        }
    values = [r["summary"].get(condition, {}).get(metric, {}).get("mean") for r in reports]
    if any(v is None for v in values):
        return None
    return {"mean": float(np.mean(values)), "ci95": None, "train_seed_range": [float(min(values)), float(max(values))]}


def build_table(seed_reports: list[dict], variants: dict[str, list[dict]], allow_valid: bool = False) -> dict:
    splits = {r.get("split", "test") for rs in [seed_reports, *variants.values()] for r in rs}
    if splits != {"test"} and not allow_valid:
        raise SystemExit(f"the test table needs reports of the test users; got splits {sorted(splits)}")
    users = {tuple(r["users"]) for rs in [seed_reports, *variants.values()] for r in rs}
    if len(users) != 1:
        raise SystemExit("the reports score different users; evaluate every run on the same test users")
    table: dict = {}
    for modality, conditions in CONDITIONS.items():
        rows = [(out, cond, seed_reports) for cond, out in conditions.items()]
        rows += [(name, "dppmg", reports) for name, reports in variants.items()]
        for out, condition, reports in rows:
            cells = {
                measure: _cell(reports, condition, interval, metric)
                for measure, (interval, metric) in MEASURES[modality].items()
            }
            cells = {m: c for m, c in cells.items() if c is not None}
            if cells:
                table.setdefault(modality, {})[out] = cells
        floors = [r.get("fd_real_floor") or {} for r in seed_reports]
        if modality == "image" and all(f.get("mean") is not None for f in floors) and "image" in table:
            values = [f["mean"] for f in floors]
            for cells in table["image"].values():
                if "fd" in cells:
                    cells["fd_real_floor"] = {
                        "mean": float(np.mean(values)),
                        "ci95": None,
                        "train_seed_range": [float(min(values)), float(max(values))],
                    }
    return table


# (modality, first, second): the comparisons the issues accept on, paired by user, per measure
COMPARISONS = (
    ("image", "dppmg", "history"),
    ("image", "dppmg", "population"),
    ("image", "dppmg_rl", "dppmg"),
    ("image", "dppmg", "dppmg_image_tokens_only"),
    ("image", "dppmg", "dppmg_tokens_from_noise"),
    ("text", "dppmg", "history"),
    ("text", "dppmg", "population"),
    ("text", "dppmg_rl", "dppmg"),
)
PAIRED_MEASURES = ("gap_heldout_judge", "gap_judge", "gap_personal_similarity", "gap_retrieval_ndcg10", "heldout_judge")


def _per_user(reports: list[dict], condition: str, interval: str) -> np.ndarray | None:
    """One condition's per-user values averaged over the training seeds (None if a report lacks them)."""
    found = [r["intervals"].get(condition, {}).get(interval) for r in reports]
    if any(f is None for f in found):
        return None
    lengths = {len(f["per_user"]) for f in found}
    if len(lengths) != 1:
        raise SystemExit(f"{condition} {interval}: the reports score different numbers of users {lengths}")
    return np.mean([f["per_user"] for f in found], axis=0)


def paired_differences(seed_reports: list[dict], variants: dict[str, list[dict]]) -> dict:
    """``{modality: {"A - B": {measure: {"mean", "ci95", "train_seed_range"}}}}``: per user, A's value
    minus B's (each averaged over its training seeds), with a bootstrap 95% interval over users; the
    range of the per-seed differences where both rows come from the same training seeds."""
    sources = {m: {out: (cond, seed_reports) for cond, out in conds.items()} for m, conds in CONDITIONS.items()}
    for modality in sources:
        sources[modality].update({name: ("dppmg", reports) for name, reports in variants.items()})
    out: dict = {}
    for modality, first, second in COMPARISONS:
        if first not in sources[modality] or second not in sources[modality]:
            continue
        (cond_a, reports_a), (cond_b, reports_b) = sources[modality][first], sources[modality][second]
        cells = {}
        for measure in PAIRED_MEASURES:
            interval = MEASURES[modality].get(measure, (None, None))[0]
            if interval is None:
                continue
            a, b = _per_user(reports_a, cond_a, interval), _per_user(reports_b, cond_b, interval)
            if a is None or b is None or len(a) != len(b):
                continue
            diff = a - b
            per_seed = None
            if reports_a is reports_b:
                per_seed = [
                    float(np.mean(r["intervals"][cond_a][interval]["per_user"]))
                    - float(np.mean(r["intervals"][cond_b][interval]["per_user"]))
                    for r in reports_a
                ]
            cells[measure] = {
                "mean": float(diff.mean()),
                "ci95": bootstrap_interval(diff),
                "train_seed_range": [min(per_seed), max(per_seed)] if per_seed else None,
            }
        if cells:
            out.setdefault(modality, {})[f"{first} - {second}"] = cells
    return out


def plot_gaps(table: dict, path: Path, measures=("gap_heldout_judge", "gap_judge", "gap_personal_similarity")) -> None:
    """One panel per modality and measure: each condition's own - shuffled gap with its 95% interval
    over users (bar) and its training-seed range (tick marks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, g) for m in table for g in measures if any(g in cells for cells in table[m].values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (modality, measure) in zip(axes[0], panels):
        rows = [(c, cells[measure]) for c, cells in table[modality].items() if measure in cells]
        for y, (condition, cell) in enumerate(rows):
            low, high = cell["ci95"] if cell["ci95"] else (cell["mean"], cell["mean"])
            ax.errorbar(cell["mean"], y, xerr=[[cell["mean"] - low], [high - cell["mean"]]], fmt="o", capsize=3)
            ax.plot(cell["train_seed_range"], [y, y], "|", color="black", markersize=10)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(range(len(rows)), [c for c, _ in rows], fontsize=8)
        ax.set_title(f"{modality}: {measure}", fontsize=9)
        ax.set_xlabel("own - shuffled: 95% CI over users, | training-seed range", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", action="append", required=True, help="report/ folder of one training seed")
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=REPORT[,REPORT...]: the dppmg rows of other runs"
    )
    parser.add_argument("--out", required=True, help="the JSON table to write")
    parser.add_argument("--allow-valid", action="store_true", help="accept validation reports (selection only)")
    parser.add_argument("--differences", help="JSON of the paired differences (DPPMG - history, RL - before, ...)")
    parser.add_argument("--plot", help="PNG of the own - shuffled gaps per condition")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seed_reports = [read_report(Path(p)) for p in args.seed]
    variants = {}
    for spec in args.variant:
        name, _, paths = spec.partition("=")
        if not name or not paths:
            raise SystemExit(f"--variant {spec!r}: expected NAME=REPORT[,REPORT...]")
        variants[name] = [read_report(Path(p)) for p in paths.split(",")]
    table = build_table(seed_reports, variants, args.allow_valid)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    logger.info("wrote %s: %s", out, {m: sorted(rows) for m, rows in table.items()})
    if args.differences:
        Path(args.differences).write_text(json.dumps(paired_differences(seed_reports, variants), indent=2) + "\n")
        logger.info("wrote %s", args.differences)
    if args.plot:
        plot_gaps(table, Path(args.plot))
        logger.info("wrote %s", args.plot)


if __name__ == "__main__":
    main()
