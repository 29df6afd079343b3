"""Residual nearest-code search with FAISS: one index per modality and level.

Level ``l`` searches the residual left after subtracting the codes of levels ``< l``, exactly
as the quantizer encodes. ``flat`` indexes are exact; ``ivf<nlist>`` trades exactness for
speed on large codebooks.
"""

from __future__ import annotations

import faiss
import numpy as np

from recbole_dppmg.errors import ConfigError


def build_index(codebook: np.ndarray, index_type: str = "flat") -> faiss.Index:
    """An L2 index over the rows of one level's codebook ``[codebook_size, dim]``."""
    vectors = np.ascontiguousarray(codebook, dtype=np.float32)
    dim = vectors.shape[1]
    kind = index_type.lower()
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind.startswith("ivf"):
        try:
            nlist = int(kind[3:])
        except ValueError:
            raise ConfigError(f"token_index_type '{index_type}': expected flat or ivf<nlist>, e.g. ivf16") from None
        if not 1 <= nlist <= len(vectors):
            raise ConfigError(
                f"token_index_type '{index_type}': nlist must be between 1 and the codebook size {len(vectors)}"
            )
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        index.cp.min_points_per_centroid = 1
        index.train(vectors)
        index.nprobe = max(1, nlist // 4)
    else:
        raise ConfigError(f"token_index_type '{index_type}': expected flat or ivf<nlist>")
    index.add(vectors)
    return index


# FAISS OpenMP threads for a search. Measured on a shared 2-core machine (bench/bench_tokens.py,
# 1M vectors): 1 thread 1.9x faster than numpy, 2 threads 7x slower (OpenMP spin-waits when the
# cores are busy). Raise it on machines with idle cores.
SEARCH_THREADS = 1


def residual_search(
    vectors: np.ndarray, indexes: list[faiss.Index], codebooks: np.ndarray, threads: int | None = SEARCH_THREADS
) -> np.ndarray:
    """Codes ``[N, levels]`` of ``vectors [N, dim]``: greedy residual nearest codes."""
    residual = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    codes = np.empty((residual.shape[0], len(indexes)), dtype=np.int64)
    previous = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        for level, index in enumerate(indexes):
            _, found = index.search(residual, 1)
            codes[:, level] = found[:, 0]
            residual -= codebooks[level][found[:, 0]]
    finally:
        faiss.omp_set_num_threads(previous)
    return codes


def brute_force_search(vectors: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """The same result by explicit argmin over all codes (reference and benchmark baseline)."""
    residual = np.asarray(vectors, dtype=np.float32).copy()
    codes = np.empty((residual.shape[0], codebooks.shape[0]), dtype=np.int64)
    for level, codebook in enumerate(codebooks):
        dist = (residual**2).sum(1, keepdims=True) - 2 * residual @ codebook.T + (codebook**2).sum(1)[None, :]
        codes[:, level] = dist.argmin(1)
        residual -= codebook[codes[:, level]]
    return codes
