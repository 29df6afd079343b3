"""DPPMG sampled versus full-graph training on a real dataset (issue 27), in two steps.

1. ``--tune``: the fan-out candidates (``--candidates``), sampled mode, each run with every seed
   of ``--tune-seeds`` and scored by its mean validation NDCG@10 (the valid_metric) over them;
   the best is chosen on validation.
2. the comparison: full and sampled (the chosen fan-out, or ``--fanouts``) for every seed of
   ``--seeds``, one after the other in this process: test NDCG@10 / Recall@20 per seed, the
   median [min, max] per mode, whether sampled's median is inside full's seed range, and the
   training seconds per epoch of each mode measured in the same run (their ratio).

Every finished run is kept in ``<out>.json`` and skipped when the command is run again (resume
after an interruption); ``<out>.md`` holds both tables.

    python bench/bench_sampled.py --tune --candidates "5,5 10,10 20,20 40,40" --torch_num_threads=1
    python bench/bench_sampled.py --torch_num_threads=1                 # the comparison, chosen fan-out

Any other ``--key=value`` is a RecBole config override for every run (as for run_dppmg.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

from recbole_dppmg.config import parse_overrides
from recbole_dppmg.paths import REPO_ROOT
from recbole_dppmg.quick_start import run

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "sampled_ml-100k-mm"


def parse_candidate(text: str) -> tuple[list[int], str]:
    """``"10,10"`` or ``"10,10:snapshot"``: the fan-outs and DPPMG's ``sampled_outer_hop`` (default grad)."""
    fanouts, _, outer_hop = text.partition(":")
    return [int(f) for f in fanouts.split(",")], outer_hop or "grad"


def key_of(mode: str, fanouts: list[int] | None, seed: int, outer_hop: str = "grad") -> str:
    outer = f"|outer={outer_hop}" if mode == "sampled" and outer_hop != "grad" else ""  # older keys: grad
    return f"{mode}|{'/'.join(map(str, fanouts)) if fanouts else '-'}{outer}|{seed}"


def train(
    args, overrides: dict, mode: str, fanouts: list[int] | None, seed: int, checkpoints: str, outer_hop: str = "grad"
) -> dict:
    settings = {
        **overrides,
        "seed": seed,
        "propagation": mode,
        "checkpoint_dir": checkpoints,
        "state": "WARNING",
        "show_progress": False,
    }
    if fanouts:
        settings["fanouts"] = fanouts
        settings["sampled_outer_hop"] = outer_hop
    result = asdict(run("DPPMG", args.dataset, args.config_files.split(), settings))
    return {
        "mode": mode,
        "fanouts": fanouts,
        "outer_hop": outer_hop if fanouts else None,
        "seed": seed,
        "valid_ndcg@10": result["best_valid_result"].get("ndcg@10"),
        "test_ndcg@10": result["test_result"].get("ndcg@10"),
        "test_recall@20": result["test_result"].get("recall@20"),
        "test_continuous_ndcg@10": (result["extra"].get("test_continuous") or {}).get("ndcg@10"),
        "epochs": result["epochs_trained"],
        "seconds_per_epoch": result["seconds_per_epoch"],
        "best_valid_result": result["best_valid_result"],
        "test_result": result["test_result"],
    }


def fanout_text(fanouts: list[int] | None, outer_hop: str | None = "grad") -> str:
    if not fanouts:
        return "-"
    return "/".join(map(str, fanouts)) + (f", outer hop {outer_hop}" if outer_hop not in (None, "grad") else "")


def run_label(run: dict) -> str:
    return fanout_text(run["fanouts"], run.get("outer_hop"))


def tuning_by_candidate(runs: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs.values():
        if r.get("tuning"):
            out.setdefault(run_label(r), []).append(r)
    return out


def mean_valid(runs: list[dict]) -> float:
    return statistics.fmean(r["valid_ndcg@10"] for r in runs)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def report(state: dict, args, path: Path) -> str:
    runs = state["runs"]
    lines = [f"# DPPMG sampled vs full-graph training on {args.dataset}", ""]
    tuning = tuning_by_candidate(runs)
    if tuning:
        lines += [
            "Fan-out candidates, sampled mode, chosen on the mean validation NDCG@10 over the tuning seeds:",
            "",
            "| fan-outs | seeds | mean valid NDCG@10 | valid NDCG@10 per seed | epochs | s/epoch |",
            "|---|---|---|---|---|---|",
        ]
        for fanouts, mine in sorted(tuning.items(), key=lambda item: -mean_valid(item[1])):
            per_seed = ", ".join(
                f"{r['seed']}: {r['valid_ndcg@10']:.4f}" for r in sorted(mine, key=lambda r: r["seed"])
            )
            lines.append(
                f"| {fanouts} | {len(mine)} | {mean_valid(mine):.4f} | {per_seed} |"
                f" {statistics.median(r['epochs'] for r in mine):.0f} |"
                f" {statistics.median(r['seconds_per_epoch'] for r in mine):.2f} |"
            )
        lines += ["", f"Chosen: {fanout_text(state.get('chosen'), state.get('chosen_outer_hop'))}", ""]
    compared = [r for r in runs.values() if not r.get("tuning")]
    if compared:
        lines += [
            f"Seeds {', '.join(map(str, args.seeds))}; median [min, max] over seeds; test metrics at the best"
            " validation epoch (quantized users); s/epoch: training seconds per epoch, this command.",
            "",
            "| mode | fan-outs | seeds | test NDCG@10 | test Recall@20 | valid NDCG@10 | epochs | s/epoch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        by_mode = {}
        for r in compared:
            by_mode.setdefault((r["mode"], run_label(r)), []).append(r)
        for (mode, fanouts), mine in sorted(by_mode.items()):
            lines.append(
                f"| {mode} | {fanouts} | {len(mine)} |"
                f" {spread([r['test_ndcg@10'] for r in mine])} | {spread([r['test_recall@20'] for r in mine])} |"
                f" {spread([r['valid_ndcg@10'] for r in mine])} | {statistics.median(r['epochs'] for r in mine):.0f} |"
                f" {statistics.median(r['seconds_per_epoch'] for r in mine):.2f} |"
            )
        lines += [
            "",
            "| mode, fan-outs | seed | test NDCG@10 | test Recall@20 | valid NDCG@10 | epochs | s/epoch |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(compared, key=lambda r: (r["mode"], run_label(r), r["seed"])):
            lines.append(
                f"| {r['mode']} {run_label(r)} | {r['seed']} | {r['test_ndcg@10']:.4f} |"
                f" {r['test_recall@20']:.4f} |"
                f" {r['valid_ndcg@10']:.4f} | {r['epochs']} | {r['seconds_per_epoch']:.2f} |"
            )
        full_runs = by_mode.get(("full", "-"), [])
        for (mode, fanouts), mine in sorted(by_mode.items()):
            if mode != "sampled" or not full_runs:
                continue
            full = [r["test_ndcg@10"] for r in full_runs]
            sampled = statistics.median(r["test_ndcg@10"] for r in mine)
            ratio = statistics.median(r["seconds_per_epoch"] for r in mine) / statistics.median(
                r["seconds_per_epoch"] for r in full_runs
            )
            inside = min(full) <= sampled <= max(full)
            lines += [
                "",
                f"Sampled ({fanouts}) median test NDCG@10 {sampled:.4f} is {'inside' if inside else 'outside'} the"
                f" full mode's seed range [{min(full):.4f}, {max(full):.4f}]; sampled / full s/epoch = {ratio:.2f}.",
            ]
    text = "\n".join(lines) + "\n"
    path.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="ml-100k-mm")
    parser.add_argument("--config_files", default="")
    parser.add_argument("--tune", action="store_true", help="run the fan-out candidates on --tune-seeds")
    parser.add_argument(
        "--candidates",
        default="5,5 10,10 20,20 40,40",
        help="space-separated fan-out lists, each optionally :<sampled_outer_hop> (10,10:snapshot)",
    )
    parser.add_argument("--tune-seeds", default="2020", help="comma-separated; a candidate's score is the mean")
    parser.add_argument("--fanouts", default=None, help="comparison fan-outs[:outer hop] (default: the tuned choice)")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="<out>.json (runs, resumable) and <out>.md")
    args, unknown = parser.parse_known_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    overrides = parse_overrides(unknown)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_file = out.with_suffix(".json")
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"runs": {}}

    def save():
        state_file.write_text(json.dumps(state, indent=2))

    with tempfile.TemporaryDirectory() as checkpoints:
        if args.tune:
            for text in args.candidates.split():
                fanouts, outer_hop = parse_candidate(text)
                for seed in [int(s) for s in args.tune_seeds.split(",")]:
                    key = "tune|" + key_of("sampled", fanouts, seed, outer_hop)
                    if key not in state["runs"]:
                        state["runs"][key] = train(args, overrides, "sampled", fanouts, seed, checkpoints, outer_hop)
                        state["runs"][key]["tuning"] = True
                        save()
                    print(report(state, args, out), flush=True)
            tuning = tuning_by_candidate(state["runs"])
            best = max(tuning.values(), key=mean_valid)[0]
            state["chosen"], state["chosen_outer_hop"] = best["fanouts"], best.get("outer_hop") or "grad"
            save()
            print(report(state, args, out), flush=True)
            return
        if args.fanouts:
            fanouts, outer_hop = parse_candidate(args.fanouts)
        else:
            fanouts, outer_hop = state.get("chosen"), state.get("chosen_outer_hop") or "grad"
        if not fanouts:
            raise SystemExit("no fan-outs: run --tune first or pass --fanouts")
        for seed in args.seeds:
            for mode in ("full", "sampled"):
                key = key_of(mode, fanouts if mode == "sampled" else None, seed, outer_hop)
                if key not in state["runs"]:
                    state["runs"][key] = train(
                        args, overrides, mode, fanouts if mode == "sampled" else None, seed, checkpoints, outer_hop
                    )
                    save()
                print(report(state, args, out), flush=True)


if __name__ == "__main__":
    main()
