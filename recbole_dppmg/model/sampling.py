"""Sampled L-hop neighbourhoods of a training batch and LightGCN propagation over them.

GraphSAGE / PinSage-style mini-batching for DPPMG's ``propagation: sampled``: a training step
propagates over the neighbourhood of its batch's users and items only, so its cost depends on
the batch size and the fan-outs, not on the size of the graph.

The graph is the one ``recbole_dppmg.model.graph`` propagates over in full mode: the symmetric
normalised adjacency ``A`` (``D^-1/2 A D^-1/2`` of the bipartite user-item graph, or an epoch's
pruned copy under ``graph_dropout``) as a sparse CSR tensor. torch_geometric's own neighbour
sampler needs the compiled ``pyg-lib`` or ``torch-sparse`` packages, which are not installed
here, so the sampler below is plain vectorised torch (one Python iteration per hop and per
fan-out slot, never per node).

Sampling. ``fanouts[h]`` neighbours are drawn for every node that hop ``h`` expands: hop 0
expands the seeds (the batch's distinct users and items), hop 1 the seeds and their sampled
neighbours, and so on, giving nested node sets ``nodes[:n_0] (seeds) ⊂ nodes[:n_1] ⊂ ... ⊂
nodes[:n_L]``. A node with at most ``fanout`` neighbours keeps all of them; a node with more
draws ``fanout`` distinct ones uniformly without replacement (Floyd's algorithm, vectorised
over the nodes).

Normalisation. A sampled edge ``(v, u)`` keeps its full-graph weight ``A[v, u]`` (degrees from
the whole graph, not from the sample) multiplied by ``deg(v) / fanout`` when ``v`` was
subsampled (1 otherwise). Each layer's sampled row ``sum_u w_vu h_u`` is then an unbiased
estimate of the full row ``(A h)_v``; hops are drawn independently, so the propagated
embeddings of the seeds equal full-graph propagation in expectation, and exactly when every
fan-out covers every neighbour (``tests/test_sampled_propagation.py``). Row-normalising the
sample instead (GraphSAGE's mean aggregator) would be cheaper to explain but would change the
operator: high-degree nodes would get the same total weight as low-degree ones.

Variance. ``DPPMG`` propagates, by default, not the layer-0 vectors ``x`` themselves but their
change ``x - x0`` since a per-epoch snapshot ``x0`` whose full-graph output ``P x0`` is known
(``DPPMG.propagation_snapshot``): ``P x = P x0 + P (x - x0)`` by linearity, the sampled estimate
of the second term is unbiased as above, and its spread scales with the drift since the snapshot
instead of with ``x`` (the control variate of VR-GCN, Chen, Zhu and Song, ICML 2018); the
gradient to the neighbours is still sampled, so small fan-outs still cost accuracy
(``bench/sampled_tuning.md``). With ``close_last_hop`` the outermost hop's new nodes are
left out altogether (their change taken as zero: they stand at their snapshot values, the
historical embeddings of GNNAutoScale, Fey et al., ICML 2021), and with ``propagate_sampled``'s
``outer`` they are propagated without gradient; either way most of a step's rows drop out of the
backward and the optimiser.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch_geometric.utils import spmm


def _csr(crow: torch.Tensor, col: torch.Tensor, value: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch flags CSR as "beta"; it is what PyG recommends
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
        return torch.sparse_csr_tensor(crow, col, value, size=shape)


def distinct_offsets(sizes: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[len(sizes), k]``: for every row, ``k`` distinct integers drawn uniformly from
    ``[0, sizes[r])`` (every size must be >= k). Floyd's algorithm, run for all rows at once:
    step ``j`` draws ``t`` from ``[0, n - k + j]`` and takes ``n - k + j`` instead when ``t`` is
    already taken, which leaves every ``k``-subset equally likely."""
    rows = sizes.numel()
    out = torch.empty(rows, k, dtype=torch.long, device=sizes.device)
    for j in range(k):
        limit = sizes - k + j  # inclusive upper bound of this step's draw
        draw = torch.rand(rows, generator=generator, dtype=torch.float64, device=sizes.device)
        t = torch.minimum((draw * (limit + 1).double()).long(), limit)
        if j:
            t = torch.where((out[:, :j] == t.unsqueeze(1)).any(1), limit, t)
        out[:, j] = t
    return out


def sample_neighbours(
    adj: torch.Tensor, rows: torch.Tensor, fanout: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``fanout`` neighbours of each node of ``rows`` in the CSR matrix ``adj``.

    Returns ``(row_index, neighbour, weight)``, one entry per sampled edge, grouped by row in the
    order of ``rows``: ``row_index`` is the position in ``rows``, ``neighbour`` the column (a
    node id), ``weight`` the stored value times ``deg / fanout`` for a subsampled row (an
    unbiased estimate of the row's product with any vector).
    """
    crow, col, value = adj.crow_indices(), adj.col_indices(), adj.values()
    start = crow[rows]
    degree = crow[rows + 1] - start
    take = degree.clamp(max=fanout)
    total = int(take.sum())
    row_index = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), take, output_size=total)
    first = take.cumsum(0) - take
    offset = torch.arange(total, device=rows.device) - first[row_index]  # 0..take-1 within each row
    subsampled = degree > fanout
    if bool(subsampled.any()):
        edges = subsampled[row_index]  # rows of exactly ``fanout`` entries each, in row order
        offset[edges] = distinct_offsets(degree[subsampled], fanout, generator).flatten()
    position = start[row_index] + offset
    scale = torch.where(subsampled, degree.to(value.dtype) / fanout, torch.ones_like(degree, dtype=value.dtype))
    return row_index, col[position], value[position] * scale[row_index]


def append_nodes(nodes: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``nodes`` (distinct ids) followed by the distinct ``candidates`` not among them, in
    increasing order (``DPPMG`` reads a hop's users and items in place by it), and the position of
    every candidate in that list."""
    n = len(nodes)
    unique, inverse = torch.unique(torch.cat([nodes, candidates]), return_inverse=True)
    position = torch.full((len(unique),), -1, dtype=torch.long, device=nodes.device)
    position[inverse[:n]] = torch.arange(n, device=nodes.device)
    new = position < 0
    position[new] = n + torch.arange(int(new.sum()), device=nodes.device)
    return torch.cat([nodes, unique[new]]), position[inverse[n:]]


@dataclass
class Block:
    """One sampled layer: ``h_dst = W h_src`` with ``W`` an ``[n_dst, n_src]`` sparse matrix
    (rows: the first ``n_dst`` nodes of the subgraph, columns: its first ``n_src``)."""

    dst: torch.Tensor  # [E] row of each sampled edge (non-decreasing)
    src: torch.Tensor  # [E] column of each sampled edge
    weight: torch.Tensor  # [E]
    n_dst: int
    n_src: int

    def split(self, k: int) -> tuple["Block", "Block"]:
        """The edges from columns ``< k`` (columns kept) and those from columns ``>= k``
        (columns shifted down by ``k``): ``W h = W_a h[:k] + W_b h[k:]``."""
        low = self.src < k
        high = ~low
        return (
            Block(self.dst[low], self.src[low], self.weight[low], self.n_dst, k),
            Block(self.dst[high], self.src[high] - k, self.weight[high], self.n_dst, self.n_src - k),
        )

    def matrix(self) -> torch.Tensor:
        counts = torch.bincount(self.dst, minlength=self.n_dst)
        crow = torch.zeros(self.n_dst + 1, dtype=torch.long, device=self.dst.device)
        crow[1:] = counts.cumsum(0)
        return _csr(crow, self.src, self.weight, (self.n_dst, self.n_src))

    def transposed(self) -> torch.Tensor:
        order = torch.argsort(self.src, stable=True)
        counts = torch.bincount(self.src, minlength=self.n_src)
        crow = torch.zeros(self.n_src + 1, dtype=torch.long, device=self.src.device)
        crow[1:] = counts.cumsum(0)
        return _csr(crow, self.dst[order], self.weight[order], (self.n_src, self.n_dst))


class _BlockSpmm(torch.autograd.Function):
    """``W @ x`` whose backward multiplies by ``W^T``, built once per block (torch's own CSR
    backward would transpose on every call)."""

    @staticmethod
    def forward(ctx, block, x):
        ctx.block = block
        return spmm(block.matrix(), x)

    @staticmethod
    def backward(ctx, grad):
        return None, spmm(ctx.block.transposed(), grad.contiguous())


@dataclass
class SampledSubgraph:
    """The sampled L-hop neighbourhood of some seed nodes.

    ``nodes``: global node ids, the seeds first; ``sizes[h]``: how many of ``nodes`` are within
    ``h`` sampled hops (``sizes[0]`` = the seeds, ``sizes[-1]`` = ``len(nodes)``); ``blocks[h]``
    maps embeddings of ``nodes[:sizes[h+1]]`` to ``nodes[:sizes[h]]`` (drawn with
    ``fanouts[h]``)."""

    nodes: torch.Tensor
    sizes: list[int]
    blocks: list[Block]

    @property
    def num_edges(self) -> int:
        return sum(len(b.dst) for b in self.blocks)


def positions_within(nodes: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The position of every candidate in ``nodes`` (distinct ids), -1 where absent; by binary
    search over the sorted ``nodes``, so the cost does not depend on the size of the graph."""
    order = torch.argsort(nodes)
    ordered = nodes[order]
    at = torch.searchsorted(ordered, candidates).clamp(max=len(nodes) - 1)
    return torch.where(ordered[at] == candidates, order[at], torch.full_like(at, -1))


def sample_subgraph(
    adj: torch.Tensor,
    seeds: torch.Tensor,
    fanouts: list[int],
    generator: torch.Generator | None = None,
    close_last_hop: bool = False,
) -> SampledSubgraph:
    """The ``len(fanouts)``-hop sampled neighbourhood of ``seeds`` (distinct node ids) in the
    CSR adjacency ``adj``. ``close_last_hop``: the last hop keeps only its sampled edges to nodes
    already in the subgraph (weights unchanged) and adds no node; with the control variate the
    left-out nodes stand at their snapshot values (``DPPMG``'s ``sampled_outer_hop: snapshot``)."""
    nodes, sizes, blocks = seeds, [len(seeds)], []
    for hop, fanout in enumerate(fanouts):
        n_dst = len(nodes)
        dst, neighbour, weight = sample_neighbours(adj, nodes, int(fanout), generator)
        if close_last_hop and hop == len(fanouts) - 1:
            src = positions_within(nodes, neighbour)
            keep = src >= 0
            dst, src, weight = dst[keep], src[keep], weight[keep]
        else:
            nodes, src = append_nodes(nodes, neighbour)
        blocks.append(Block(dst, src, weight, n_dst, len(nodes)))
        sizes.append(len(nodes))
    return SampledSubgraph(nodes, sizes, blocks)


def propagate_sampled(x: torch.Tensor, subgraph: SampledSubgraph, outer: torch.Tensor | None = None) -> torch.Tensor:
    """LightGCN over a sampled subgraph: the mean of ``[x, Ax, ..., A^L x]`` at the seeds, each
    ``A`` estimated by its block. ``x``: layer-0 embeddings of ``subgraph.nodes`` (in that
    order); returns ``[n_seeds, dim]``. With ``outer``, the layer-0 rows of the outermost hop's
    nodes (``nodes[sizes[-2]:]``) come apart and carry no gradient, and ``x`` covers
    ``nodes[:sizes[-2]]``: the outermost block's edges from them are multiplied once outside
    autograd, so the backward never visits them."""
    n_seeds = subgraph.sizes[0]
    out, h = x[:n_seeds], x
    last = len(subgraph.blocks) - 1
    for depth in range(last, -1, -1):  # the innermost layer first
        block = subgraph.blocks[depth]
        if depth == last and outer is not None:
            with_grad, without = block.split(len(x))
            with torch.no_grad():
                fixed = spmm(without.matrix(), outer)
            h = _BlockSpmm.apply(with_grad, h) + fixed
        else:
            h = _BlockSpmm.apply(block, h[: block.n_src])
        out = out + h[:n_seeds]
    return out / (len(subgraph.blocks) + 1)
