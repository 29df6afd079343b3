"""Data-parallel DPPMG: 1 process versus N processes (RecBole's torch.distributed path), per mode.

Full training runs (same config, early stopping as in properties/overall.yaml unless --epochs)
through ``recbole_dppmg.quick_start.run`` with ``nproc`` 1 and N, for each ``--modes`` entry
(DPPMG's ``propagation``: full or sampled); prints seconds per training epoch (rank 0's timing
of each epoch), epochs, wall time and test metrics side by side, and the speed-up of N processes
over 1 process at the same seed, measured in the same command. With several ``--seeds``, one
process runs every seed (the seed spread the N-process metrics are compared with) and N
processes the first seed. Each rank gets ``train_batch_size / N`` interactions per step: in full
mode every rank still propagates the whole graph every step, so it gains less than N; in sampled
mode each rank samples and propagates the neighbourhood of its own share only.

    python bench/bench_ddp.py                                  # ml-100k-mm, 1 vs 2 CPU processes, full mode
    python bench/bench_ddp.py --epochs 3 --nproc 1,2           # quick
    python bench/bench_ddp.py --modes full,sampled --seeds 2020,2021,2022 --epochs 25 --json out.json
    python bench/bench_ddp.py --device cuda --nproc 1,2 --threads 4   # one GPU per rank (nccl)

Any other ``--key=value`` is a RecBole config override, as for run_dppmg.py. With ``--json`` every
finished run is kept there and skipped when the command is run again (resume); the table is
written beside it as ``.md``.

``--scaling``: ``strong`` (RecBole's own semantics: the global batch is the same for every N,
each rank takes 1/N of it), ``weak`` (N processes run with ``train_batch_size`` x N, so each rank
keeps the 1-process batch and an epoch has 1/N of the steps), or ``both``. ``--weak-lr linear``
also multiplies the weak-scaling runs' ``learning_rate`` by N (the linear scaling rule of Goyal et
al., 2017: N times the batch, N times the step, about the same number of epochs); ``sqrt`` by the
square root of N (the rule for Adam-style optimisers, Malladi et al., 2022); ``same`` keeps it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from recbole_dppmg.config import build_config, parse_overrides
from recbole_dppmg.quick_start import run
from recbole_dppmg.utils import get_model

METRICS = ("recall@10", "ndcg@10", "hit@10", "recall@20", "ndcg@20", "hit@20")


def table(rows: list[dict], args) -> str:
    lines = [f"DPPMG on {args.dataset}, {args.device}, {args.threads} thread(s) per process", ""]
    lines.append(
        "| mode | processes | global batch | lr | seed | s/epoch (train) | speed-up | epochs | wall s | "
        + " | ".join(METRICS)
        + " |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|" + "---|" * len(METRICS))
    for row in rows:
        base = next(
            (r for r in rows if r["mode"] == row["mode"] and r["nproc"] == 1 and r["seed"] == row["seed"]), None
        )
        speedup = (
            base["seconds_per_epoch"] / row["seconds_per_epoch"] if base and row["seconds_per_epoch"] else float("nan")
        )
        values = " | ".join(f"{row['test_result'][m]:.4f}" for m in METRICS)
        lines.append(
            f"| {row['mode']} | {row['nproc']} | {row.get('train_batch_size', '-')}"
            f"{' (weak scaling)' if row.get('scaling') == 'weak' else ''} | {row.get('learning_rate', '-')} |"
            f" {row['seed']} |"
            f" {row['seconds_per_epoch']:.2f} | {speedup:.2f} | {row['epochs_trained']} | {row['wall_s']:.0f} |"
            f" {values} |"
        )
    for mode in dict.fromkeys(r["mode"] for r in rows):
        single = [r["test_result"]["ndcg@10"] for r in rows if r["mode"] == mode and r["nproc"] == 1]
        for row in (r for r in rows if r["mode"] == mode and r["nproc"] > 1):
            scaling = "weak scaling" if row.get("scaling") == "weak" else "same global batch"
            if len(single) > 1:
                value = row["test_result"]["ndcg@10"]
                where = (
                    "inside" if min(single) <= value <= max(single) else ("above" if value > max(single) else "below")
                )
                lines.append(
                    f"\n{mode}, {row['nproc']} processes ({scaling}), seed {row['seed']}: test NDCG@10"
                    f" {value:.4f}, {where} 1 process's"
                    f" seed range [{min(single):.4f}, {max(single):.4f}] (median {statistics.median(single):.4f})."
                )
    return "\n".join(lines)


def weak_learning_rate(base: float, nproc: int, rule: str) -> float:
    """The weak-scaling run's learning rate (``--weak-lr``; module doc)."""
    return {"same": base, "linear": base * nproc, "sqrt": base * nproc**0.5}[rule]


def learning_rate(args, overrides: dict, settings: dict) -> float:
    """The learning rate a run trains with (its override, or the config's)."""
    if "learning_rate" in settings:
        return settings["learning_rate"]
    config = build_config(get_model(args.model), args.dataset, args.config_files.split(), {**overrides, **settings})
    return config["learning_rate"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="ml-100k-mm")
    parser.add_argument("-m", "--model", default="DPPMG")
    parser.add_argument("--nproc", default="1,2", help="process counts to compare, comma-separated")
    parser.add_argument("--modes", default=None, help="DPPMG propagation modes, e.g. full,sampled (default: config's)")
    parser.add_argument("--seeds", default=None, help="comma-separated; 1 process runs each, N processes the first")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's (early stopping)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--config_files", default="", help="space-separated extra YAML files (e.g. a synthetic dataset's)"
    )
    parser.add_argument("--data-path", default=None, help="folder holding the dataset (default: dataset/)")
    parser.add_argument("--json", default=None, help="write the rows as JSON here (and resume from it)")
    parser.add_argument(
        "--scaling",
        choices=("strong", "weak", "both"),
        default="strong",
        help="N processes: same global batch (strong), or train_batch_size x N (weak), or both",
    )
    parser.add_argument(
        "--weak-lr",
        choices=("same", "linear", "sqrt"),
        default="same",
        help="weak scaling: keep learning_rate (same), multiply it by N (linear) or by sqrt(N) (sqrt)",
    )
    args, unknown = parser.parse_known_args(argv)
    overrides = parse_overrides(unknown)  # any other --key=value: a RecBole config override
    modes = args.modes.split(",") if args.modes else [None]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    done = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else []

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            scalings = ["strong", "weak"] if args.scaling == "both" else [args.scaling]
            plan = [
                (nproc, scaling, seed)
                for nproc in [int(n) for n in args.nproc.split(",")]
                for scaling in (scalings if nproc > 1 else ["strong"])
                for seed in (seeds if nproc == 1 else seeds[:1])
            ]
            for nproc, scaling, seed in plan:
                settings = {
                    **overrides,
                    "nproc": nproc,
                    "torch_num_threads": args.threads,
                    "use_gpu": args.device == "cuda",
                    "checkpoint_dir": tmp,
                    "state": "WARNING",
                    "show_progress": False,
                }
                if mode is not None:
                    settings["propagation"] = mode
                if seed is not None:
                    settings["seed"] = seed
                if args.epochs is not None:
                    settings["epochs"] = args.epochs
                if args.data_path:
                    settings["data_path"] = args.data_path
                if scaling == "weak":
                    batch = (
                        overrides.get("train_batch_size")
                        or build_config(get_model(args.model), args.dataset, args.config_files.split(), settings)[
                            "train_batch_size"
                        ]
                    )
                    settings["train_batch_size"] = int(batch) * nproc
                    base = float(learning_rate(args, overrides, settings))
                    settings["learning_rate"] = weak_learning_rate(base, nproc, args.weak_lr)
                key = {"mode": mode or "config", "nproc": nproc, "seed": seed, "scaling": scaling}
                if scaling == "weak":
                    key["weak_lr"] = args.weak_lr
                old = next((r for r in done if all(r.get(k) == v for k, v in key.items())), None)
                if old is not None:
                    rows.append(old)
                    continue
                start = time.perf_counter()
                result = run(args.model, args.dataset, args.config_files.split(), settings)
                wall = time.perf_counter() - start
                batch_used = settings.get("train_batch_size")
                if batch_used is None:
                    config_file = Path(result.run_dir) / "config.json"
                    batch_used = (
                        json.loads(config_file.read_text())["train_batch_size"] if config_file.is_file() else None
                    )
                rows.append(
                    {
                        **key,
                        "wall_s": wall,
                        **asdict(result),
                        "seed": seed,
                        "train_batch_size": batch_used,
                        "learning_rate": float(learning_rate(args, overrides, settings)),
                    }
                )
                print(
                    f"{key['mode']}, nproc {nproc} ({scaling}), seed {seed}: {result.seconds_per_epoch:.2f} s/epoch,"
                    f" {result.epochs_trained} epochs, wall {wall:.0f} s, test ndcg@10"
                    f" {result.test_result['ndcg@10']:.4f}",
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps(done + [r for r in rows if r not in done], indent=2))
    print()
    text = table(rows, args)
    print(text)
    if args.json:
        Path(args.json).with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
