"""Throughput of the item encoders (items/s, median of several runs) on real ml-100k-mm items.

    python bench/bench_featurize.py --items 64 --repeats 3 --threads 2

Times ``encode`` end to end as ``prepare`` calls it: tokenisation + forward pass for text,
JPEG decode + resize + forward pass for images. Model loading is timed separately. Needs
the shared data (``$DPPMG_SHARED`` or ../shared); uses no more than ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recbole_dppmg.data import featurize  # noqa: E402
from recbole_dppmg.data.sources import Ml100kMMSource  # noqa: E402
from recbole_dppmg.paths import shared_dir  # noqa: E402


def measure(encode, inputs, repeats: int) -> dict:
    encode(inputs[: min(4, len(inputs))])  # warm-up: first-call allocations are not throughput
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode(inputs)
        rates.append(len(inputs) / (time.perf_counter() - started))
    return {
        "items": len(inputs),
        "repeats": repeats,
        "items_per_s_median": round(statistics.median(rates), 2),
        "items_per_s_all": [round(r, 2) for r in rates],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64, help="items per run and encoder")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, cpus))")
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--shared", type=Path, default=None, help="shared data root (default: paths.shared_dir())")
    args = parser.parse_args()

    loaded = Ml100kMMSource(args.shared or shared_dir()).load()
    texts = [t for t in loaded.text_inputs if t][: args.items]
    images = [p for p in loaded.image_paths if p is not None][: args.items]
    report = {}
    with featurize.torch_threads(args.threads) as threads:
        report["threads"] = threads
        for modality, inputs, batch in (("text", texts, args.text_batch), ("image", images, args.image_batch)):
            started = time.perf_counter()
            encoder = featurize.load_default_encoder(modality)
            load_s = time.perf_counter() - started
            result = measure(lambda xs: encoder.encode(xs, batch_size=batch, progress=False), inputs, args.repeats)
            report[modality] = {"encoder": f"{encoder.name} ({encoder.version})", "load_s": round(load_s, 2), **result}
            print(
                f"{modality:5s}: {result['items_per_s_median']:8.1f} items/s (median of {args.repeats}, "
                f"{len(inputs)} items, {threads} threads; model load {load_s:.1f}s)",
                flush=True,
            )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
