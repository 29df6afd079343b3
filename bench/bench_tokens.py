"""Token lookup and fold-in speed.

Residual nearest-code lookup of N random vectors (dim 64, 256 codes, 3 levels): FAISS exact
index versus a numpy brute-force argmin, measured in the same run (median of --repeats), with
their ratio; then fold-in throughput (users/s) on a token export, or on a synthetic one.

    python bench/bench_tokens.py                    # 1M vectors, as in the issue
    python bench/bench_tokens.py --vectors 10000 --repeats 2  # quick
    python bench/bench_tokens.py --export saved/ml-100k-mm/DPPMG-<time>/tokens
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from recbole_dppmg.tokens.faiss_lookup import brute_force_search, build_index, residual_search


def chunked_brute_force(vectors: np.ndarray, codebooks: np.ndarray, chunk: int = 65536) -> np.ndarray:
    return np.concatenate(
        [brute_force_search(vectors[i : i + chunk], codebooks) for i in range(0, len(vectors), chunk)]
    )


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_lookup(n: int, dim: int, codes: int, levels: int, repeats: int, threads: list[int]) -> None:
    rng = np.random.default_rng(0)
    codebooks = rng.normal(size=(levels, codes, dim)).astype(np.float32)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    indexes = [build_index(book, "flat") for book in codebooks]
    assert (residual_search(vectors[:5000], indexes, codebooks) == brute_force_search(vectors[:5000], codebooks)).all()
    print(f"lookup of {n:,} vectors (dim {dim}, {codes} codes, {levels} levels, median of {repeats}):")
    numpy_s = median_seconds(lambda: chunked_brute_force(vectors, codebooks), repeats)
    print(f"  numpy argmin ({torch.get_num_threads()} BLAS threads) {numpy_s:8.3f} s {n / numpy_s:12,.0f} vectors/s")
    for count in threads:
        faiss_s = median_seconds(lambda: residual_search(vectors, indexes, codebooks, threads=count), repeats)
        print(
            f"  faiss flat ({count} OpenMP threads)  {faiss_s:8.3f} s {n / faiss_s:12,.0f} vectors/s   faiss speed-up "
            f"x{numpy_s / faiss_s:.2f}"
        )


def bench_fold_in(export: str | None, users: int, repeats: int) -> None:
    from recbole_dppmg.tokens import PreferenceTokens

    if export is None:
        print("fold-in: pass --export <tokens folder> to time fold-in on a real export")
        return
    tokens = PreferenceTokens.load(export)
    rng = np.random.default_rng(0)
    item_ids = tokens.item_ids[1:]
    histories = [list(rng.choice(item_ids, size=20, replace=False)) for _ in range(users)]
    seconds = median_seconds(lambda: [tokens.fold_in(h) for h in histories], repeats)
    print(f"fold-in of {users} users x 20 items, one at a time: {users / seconds:,.0f} users/s (median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="FAISS OpenMP thread counts to measure, comma-separated")
    parser.add_argument("--export", default=None, help="a token export folder for the fold-in benchmark")
    parser.add_argument("--foldin-users", type=int, default=500)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(threads))
    bench_lookup(args.vectors, args.dim, args.codes, args.levels, args.repeats, threads)
    bench_fold_in(args.export, args.foldin_users, args.repeats)


if __name__ == "__main__":
    main()
