"""The batch-rows propagation (last LightGCN layer only for a batch's users and items) gives the
same values and gradients as propagating everything and then selecting."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tiny_mm import build_model, tiny_data, write_tiny_mm

from recbole_dppmg.model import DPPMG
from recbole_dppmg.model.graph import (
    LightGCNPropagation,
    csr_rows,
    normalized_adjacency,
)


def random_graph(n_users=30, n_items=20, nnz=120, seed=0):
    rng = np.random.default_rng(seed)
    inter = sp.coo_matrix(
        (np.ones(nnz), (rng.integers(1, n_users, nnz), rng.integers(1, n_items, nnz))), shape=(n_users, n_items)
    )
    return normalized_adjacency(inter, n_users, n_items)


def test_csr_rows_selects_rows():
    adj = random_graph()
    rows = torch.tensor([40, 3, 0, 17, 49])
    assert torch.equal(csr_rows(adj, rows).to_dense(), adj.to_dense()[rows])


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_rows_match_full_propagation_values_and_gradients(layers):
    adj = random_graph()
    rows = torch.tensor([2, 7, 31, 45, 11, 0])
    propagation = LightGCNPropagation(layers)
    x = torch.randn(adj.shape[0], 6, requires_grad=True)
    weights = torch.randn(len(rows), 6)
    full = propagation(x, adj)[rows]
    (full * weights).sum().backward()
    full_grad, x.grad = x.grad.clone(), None
    part = propagation(x, adj, rows)
    (part * weights).sum().backward()
    assert torch.allclose(part, full, atol=1e-6)
    assert torch.allclose(x.grad, full_grad, atol=1e-6)


def test_dppmg_batch_loss_and_gradients_match_full_propagation(tmp_path, monkeypatch):
    data = tiny_data(DPPMG, write_tiny_mm(tmp_path))
    model = build_model(DPPMG, data, kmeans_warmup_epochs=0, vq_weight=1.0)
    model.eval()  # no dropout, no EMA update: two calls see the same model
    batch = next(iter(data[1]))

    def loss_and_grads():
        model.zero_grad()
        losses = model.calculate_loss(batch)
        sum(losses).backward()
        return [l.detach() for l in losses], {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    losses, grads = loss_and_grads()
    full = LightGCNPropagation.forward
    monkeypatch.setattr(
        LightGCNPropagation,
        "forward",
        lambda self, x, adj, rows=None: full(self, x, adj) if rows is None else full(self, x, adj)[rows],
    )
    ref_losses, ref_grads = loss_and_grads()
    for value, ref in zip(losses, ref_losses):
        assert torch.allclose(value, ref, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6), name
