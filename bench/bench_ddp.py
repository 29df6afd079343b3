"""Data-parallel DPPMG: 1 process versus N processes (RecBole's torch.distributed path).

Full training runs (same config and seed, early stopping as in properties/overall.yaml unless
--epochs) through ``recbole_dppmg.quick_start.run`` with ``nproc`` 1 and N; prints seconds per
training epoch (rank 0's timing of each epoch), epochs, wall time and test metrics side by
side, and the speed-up measured in the same run. Each rank gets ``train_batch_size / N``
interactions per step, but every rank propagates the whole graph every step, so a full-graph
model gains less than N.

    python bench/bench_ddp.py                                  # ml-100k-mm, 1 vs 2 CPU processes
    python bench/bench_ddp.py --epochs 3 --nproc 1,2           # quick
    python bench/bench_ddp.py --device cuda --nproc 1,2 --threads 4   # one GPU per rank (nccl)

Any other ``--key=value`` is a RecBole config override, as for run_dppmg.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from recbole_dppmg.config import parse_overrides
from recbole_dppmg.quick_start import run

METRICS = ("recall@10", "ndcg@10", "hit@10", "recall@20", "ndcg@20", "hit@20")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="ml-100k-mm")
    parser.add_argument("-m", "--model", default="DPPMG")
    parser.add_argument("--nproc", default="1,2", help="process counts to compare, comma-separated")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's (early stopping)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--config_files", default="", help="space-separated extra YAML files (e.g. a synthetic dataset's)"
    )
    parser.add_argument("--data-path", default=None, help="folder holding the dataset (default: dataset/)")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args, unknown = parser.parse_known_args(argv)
    overrides = parse_overrides(unknown)  # any other --key=value: a RecBole config override

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in [int(n) for n in args.nproc.split(",")]:
            settings = {
                **overrides,
                "nproc": nproc,
                "torch_num_threads": args.threads,
                "use_gpu": args.device == "cuda",
                "checkpoint_dir": tmp,
                "state": "WARNING",
                "show_progress": False,
            }
            if args.epochs is not None:
                settings["epochs"] = args.epochs
            if args.data_path:
                settings["data_path"] = args.data_path
            start = time.perf_counter()
            result = run(args.model, args.dataset, args.config_files.split(), settings)
            wall = time.perf_counter() - start
            rows.append({"nproc": nproc, "wall_s": wall, **asdict(result)})
            print(
                f"nproc {nproc}: {result.seconds_per_epoch:.2f} s/epoch, {result.epochs_trained} epochs,"
                f" wall {wall:.0f} s, test ndcg@10 {result.test_result['ndcg@10']:.4f}",
                flush=True,
            )
    base = rows[0]
    print()
    print(f"{args.model} on {args.dataset}, {args.device}, {args.threads} thread(s) per process")
    print("| processes | s/epoch (train) | speed-up | epochs | wall s | " + " | ".join(METRICS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(METRICS))
    for row in rows:
        speedup = base["seconds_per_epoch"] / row["seconds_per_epoch"] if row["seconds_per_epoch"] else float("nan")
        values = " | ".join(f"{row['test_result'][m]:.4f}" for m in METRICS)
        print(
            f"| {row['nproc']} | {row['seconds_per_epoch']:.2f} | {speedup:.2f} | {row['epochs_trained']} |"
            f" {row['wall_s']:.0f} | {values} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
