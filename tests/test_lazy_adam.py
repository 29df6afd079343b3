"""LazyAdam: torch.optim.SparseAdam's update on the touched rows, and its state layout."""

from __future__ import annotations

import pytest
import torch

from recbole_dppmg.lazy_adam import LazyAdam


def _pair(rows=200, dim=8):
    torch.manual_seed(0)
    ours, theirs = torch.nn.Embedding(rows, dim, sparse=True), torch.nn.Embedding(rows, dim, sparse=True)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step(table, optimizer, index, weight):
    optimizer.zero_grad()
    (table(index) * weight).sum().backward()  # repeated rows: the gradient has duplicates to coalesce
    optimizer.step()


def test_lazy_adam_follows_sparse_adam_and_leaves_untouched_rows_alone():
    ours, theirs = _pair()
    lazy = LazyAdam(ours.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    reference = torch.optim.SparseAdam(theirs.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    start = ours.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        index = torch.randint(0, 150, (120,), generator=gen)  # rows 150.. never get a gradient
        weight = torch.randn(120, 8, generator=gen)
        _step(ours, lazy, index, weight)
        _step(theirs, reference, index, weight)
    assert torch.allclose(ours.weight, theirs.weight, atol=1e-6)
    assert torch.equal(ours.weight[150:], start[150:])
    state, ref_state = lazy.state[ours.weight], reference.state[theirs.weight]
    assert int(state["step"]) == int(ref_state["step"]) == 25
    assert torch.allclose(state["exp_avg_sq"], ref_state["exp_avg_sq"], atol=1e-7)


def test_lazy_adam_state_round_trips_and_refuses_dense_gradients():
    ours, _ = _pair()
    lazy = LazyAdam(ours.parameters(), lr=0.01)
    _step(ours, lazy, torch.tensor([1, 2, 2]), torch.ones(3, 8))
    again = LazyAdam(ours.parameters(), lr=0.01)
    again.load_state_dict(lazy.state_dict())
    assert torch.equal(again.state[ours.weight]["exp_avg"], lazy.state[ours.weight]["exp_avg"])
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="LazyAdam takes sparse gradients"):
        LazyAdam([dense]).step()
    with pytest.raises(ValueError, match="invalid LazyAdam settings"):
        LazyAdam([dense], betas=(1.0, 0.9))
