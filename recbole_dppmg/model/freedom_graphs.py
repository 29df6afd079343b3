"""FREEDOM's two graphs (Zhou & Shen, ACM MM 2023): the frozen item-item kNN graph built from the
modality features, and the user-item graph denoised by degree-sensitive edge pruning.

Both are built in torch on the device of their inputs and returned as sparse CSR tensors, the
form ``recbole_dppmg.model.graph`` propagates over with ``torch_geometric.utils.spmm``.
"""

from __future__ import annotations

import warnings

import torch
from torch_geometric.utils import coalesce, degree, to_torch_csr_tensor


def _csr(edge_index: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    with warnings.catch_warnings():  # torch flags CSR as "beta"; it is what PyG recommends
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
        return to_torch_csr_tensor(edge_index, weight, size=(n, n))


def knn_edges(
    features: torch.Tensor, present: torch.Tensor, k: int, block_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each present item's ``k`` most cosine-similar present items (itself included, cosine 1,
    as in MMRec), weighted ``D^-1/2 S D^-1/2`` with ``D`` the row degrees of the kNN matrix ``S``
    (so every weight is ``1/k``). Items without this modality have no edge and are nobody's
    neighbour. Returns ``edge_index [2, E]`` (row: item, column: neighbour) and ``weight [E]``.
    Similarities are computed ``block_rows`` items at a time, so memory stays
    ``block_rows x n_items`` (MMRec holds the whole ``n_items x n_items`` matrix).
    """
    rows = torch.nonzero(present).flatten()
    k = min(k, len(rows))
    if k == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=features.device), features.new_zeros(0)
    unit = torch.nn.functional.normalize(features[rows], dim=1)
    blocks = [torch.topk(block @ unit.t(), k, dim=1).indices for block in unit.split(block_rows)]
    neighbours = rows[torch.cat(blocks)]  # [n_present, k] item ids
    edge_index = torch.stack([rows.repeat_interleave(k), neighbours.flatten()])
    inv_sqrt = degree(edge_index[0], num_nodes=len(present)).clamp_min(1).pow(-0.5)
    return edge_index, inv_sqrt[edge_index[0]] * inv_sqrt[edge_index[1]]


def fused_item_graph(
    graphs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    weights: dict[str, float],
    present: dict[str, torch.Tensor],
    n_items: int,
) -> torch.Tensor:
    """``sum_m w_m S_m`` as an ``[n_items, n_items]`` CSR tensor. An item missing a modality takes
    its row from the other modalities, their weights rescaled to sum to 1 (with every modality
    present this is MMRec's ``w * S_image + (1 - w) * S_text``)."""
    device = next(iter(present.values())).device
    total = torch.zeros(n_items, device=device)
    for m, mask in present.items():
        total += weights[m] * mask.float()
    indices, values = [], []
    for m, (edge_index, weight) in graphs.items():
        indices.append(edge_index)
        values.append(weight * weights[m] / total[edge_index[0]].clamp_min(1e-12))
    edge_index, weight = coalesce(torch.cat(indices, 1), torch.cat(values), num_nodes=n_items)
    return _csr(edge_index, weight, n_items)


def unique_edges(users: torch.Tensor, items: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ``(user, item)`` pairs of the interaction list, sorted by user then item."""
    keys = torch.unique(users.long() * n_items + items.long())
    return keys // n_items, keys % n_items


def edge_keep_weights(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """``1 / sqrt(d_u d_i)`` per edge: FREEDOM keeps an edge with probability proportional to it,
    so edges between popular nodes (the likelier noise) are pruned first."""
    d_user = degree(users, num_nodes=n_users).clamp_min(1)
    d_item = degree(items, num_nodes=n_items).clamp_min(1)
    return (d_user[users] * d_item[items]).pow(-0.5)


def sample_kept_edges(keep_weights: torch.Tensor, dropout: float, generator: torch.Generator | None = None):
    """Indices of the ``round(E * (1 - dropout))`` edges kept, drawn without replacement with
    probability proportional to ``keep_weights`` (MMRec's ``degree_len`` and ``multinomial``)."""
    n_keep = round(keep_weights.numel() * (1.0 - dropout))
    if n_keep >= keep_weights.numel():
        return torch.arange(keep_weights.numel(), device=keep_weights.device)
    return torch.multinomial(keep_weights, n_keep, replacement=False, generator=generator)


def bipartite_adjacency(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """``D^-1/2 A D^-1/2`` of the undirected user-item graph of these edges, users ``0..n_users-1``
    then items, degrees counted on these edges alone (a pruned graph is re-normalised)."""
    n = n_users + n_items
    item_nodes = items + n_users
    edge_index = torch.stack([torch.cat([users, item_nodes]), torch.cat([item_nodes, users])])
    inv_sqrt = degree(edge_index[0], num_nodes=n).clamp_min(1).pow(-0.5)
    return _csr(edge_index, inv_sqrt[edge_index[0]] * inv_sqrt[edge_index[1]], n)


def prunable_edges(inter, n_users: int, n_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ``(user, item)`` edges of a scipy COO interaction matrix and their keep
    weights: what ``pruned_adjacency`` draws from (FREEDOM's denoising, DPPMG's graph dropout)."""
    users, items = unique_edges(
        torch.as_tensor(inter.row, dtype=torch.long), torch.as_tensor(inter.col, dtype=torch.long), n_items
    )
    return users, items, edge_keep_weights(users, items, n_users, n_items)


def pruned_adjacency(
    users: torch.Tensor, items: torch.Tensor, keep_weights: torch.Tensor, dropout: float, n_users: int, n_items: int
) -> torch.Tensor:
    """The normalised adjacency of ``1 - dropout`` of the edges, degree-sensitively drawn."""
    kept = sample_kept_edges(keep_weights, dropout)
    return bipartite_adjacency(users[kept], items[kept], n_users, n_items)
