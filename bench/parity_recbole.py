"""Does the plugin change baseline numbers? Full training runs of RecBole models through the
plugin (``quick_start.run``) and through RecBole's own ``Trainer`` (``parity.stock_run``),
same config and seed, one CPU thread (multi-threaded sparse matmul is not bit-reproducible).

    python bench/parity_recbole.py                         # BPR, LightGCN, NGCF on ml-100k
    python bench/parity_recbole.py -m BPR --epochs 2       # quick
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from recbole_dppmg.parity import stock_run
from recbole_dppmg.quick_start import run

METRICS = ("recall@10", "ndcg@10", "hit@10", "recall@20", "ndcg@20", "hit@20")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--models", default="BPR,LightGCN,NGCF")
    parser.add_argument("-d", "--dataset", default="ml-100k")
    parser.add_argument("--epochs", type=int, default=None, help="default: properties/overall.yaml (early stopping)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"torch_num_threads": 1, "state": "WARNING", "checkpoint_dir": tmp}
        if args.epochs is not None:
            settings["epochs"] = args.epochs
        for model in args.models.split(","):
            start = time.time()
            ours = run(model, args.dataset, config_dict=settings)
            ours_s = time.time() - start
            start = time.time()
            stock = stock_run(model, args.dataset, config_dict=settings)
            stock_s = time.time() - start
            same = ours.test_result == stock["test_result"] and ours.best_valid_result == stock["best_valid_result"]
            rows.append(
                {
                    "model": model,
                    "identical": same,
                    "epochs": ours.epochs_trained,
                    "plugin": ours.test_result,
                    "recbole": stock["test_result"],
                    "plugin_s": ours_s,
                    "recbole_s": stock_s,
                }
            )
            print(
                f"{model}: identical={same} epochs={ours.epochs_trained} plugin {ours_s:.0f}s recbole {stock_s:.0f}s",
                flush=True,
            )
    print()
    print("| model | trainer | epochs | " + " | ".join(METRICS) + " | identical |")
    print("|---|---|---|" + "---|" * len(METRICS) + "---|")
    for row in rows:
        for name in ("plugin", "recbole"):
            values = " | ".join(f"{row[name][m]:.4f}" for m in METRICS)
            print(f"| {row['model']} | {name} | {row['epochs']} | {values} | {row['identical']} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
