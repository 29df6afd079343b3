"""DPPMG's sampled mode (``propagation: sampled``): the vectorised neighbour sampler, propagation over
the sampled subgraph against full propagation, the keys that choose it, and training in that mode
with evaluation on the full graph."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tiny_mm import build_model, tiny_data, write_tiny_mm

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.model import DPPMG
from recbole_dppmg.model.graph import LightGCNPropagation, normalized_adjacency
from recbole_dppmg.model.sampling import (
    distinct_offsets,
    positions_within,
    propagate_sampled,
    sample_neighbours,
    sample_subgraph,
)
from recbole_dppmg.trainer import SparseDenseOptimizer
from recbole_dppmg.utils import get_trainer


def random_graph(n_users=40, n_items=25, nnz=300, seed=0):
    rng = np.random.default_rng(seed)
    inter = sp.coo_matrix(
        (np.ones(nnz), (rng.integers(1, n_users, nnz), rng.integers(1, n_items, nnz))), shape=(n_users, n_items)
    )
    return normalized_adjacency(inter, n_users, n_items)


def degrees(adj):
    crow = adj.crow_indices()
    return crow[1:] - crow[:-1]


def test_distinct_offsets_are_distinct_in_range_and_uniform():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([4] * 30000 + [9, 50])
    draws = distinct_offsets(sizes, 2, gen)
    assert draws.shape == (30002, 2)
    assert bool((draws[:, 0] != draws[:, 1]).all())
    assert bool((draws >= 0).all()) and bool((draws < sizes.unsqueeze(1)).all())
    pairs = torch.sort(draws[:30000], 1).values
    counts = torch.bincount(pairs[:, 0] * 4 + pairs[:, 1], minlength=16)
    subsets = counts[counts > 0]
    assert len(subsets) == 6  # every 2-subset of 4 ...
    assert float((subsets.float() / 30000 - 1 / 6).abs().max()) < 0.015  # ... equally likely


def test_sampler_respects_the_fanout_and_draws_only_real_edges():
    adj = random_graph()
    dense = adj.to_dense()
    deg = degrees(adj)
    rows = torch.nonzero(deg > 0).flatten()
    for fanout in (1, 3, 8):
        row_index, neighbour, weight = sample_neighbours(adj, rows, fanout, torch.Generator().manual_seed(1))
        counts = torch.bincount(row_index, minlength=len(rows))
        assert torch.equal(counts, deg[rows].clamp(max=fanout))  # fan-out respected, small rows whole
        assert bool((row_index[1:] >= row_index[:-1]).all())  # grouped by row
        nodes = rows[row_index]
        assert bool((dense[nodes, neighbour] > 0).all())  # only real edges
        pairs = nodes * adj.shape[0] + neighbour
        assert len(torch.unique(pairs)) == len(pairs)  # without replacement
        scale = (deg[nodes].float() / fanout).clamp(min=1.0)
        assert torch.allclose(weight, dense[nodes, neighbour] * scale)  # full-graph weight x deg / fanout


def test_subgraph_is_an_l_hop_closure_with_the_seeds_first():
    adj = random_graph()
    seeds = torch.tensor([5, 44, 12, 50])
    sub = sample_subgraph(adj, seeds, [3, 2], torch.Generator().manual_seed(2))
    assert torch.equal(sub.nodes[:4], seeds)
    for low, high in zip(sub.sizes[:-1], sub.sizes[1:]):  # each hop's new nodes in increasing order
        assert bool((sub.nodes[low + 1 : high] > sub.nodes[low : high - 1]).all())
    assert len(torch.unique(sub.nodes)) == len(sub.nodes)
    assert sub.sizes[0] == 4 and sub.sizes[-1] == len(sub.nodes) and len(sub.blocks) == 2
    for hop, block in enumerate(sub.blocks):
        assert block.n_dst == sub.sizes[hop] and block.n_src == sub.sizes[hop + 1]
        assert int(block.dst.max()) < block.n_dst and int(block.src.max()) < block.n_src
        # every node within `hop` hops was expanded, and each of its sampled neighbours is in the next set
        assert set(block.dst.tolist()) == set(torch.nonzero(degrees(adj)[sub.nodes[: block.n_dst]]).flatten().tolist())
        dense = adj.to_dense()
        assert bool((dense[sub.nodes[block.dst], sub.nodes[block.src]] > 0).all())


def test_sampler_is_deterministic_under_a_seed():
    adj = random_graph()
    seeds = torch.tensor([3, 7, 41])

    def draw(seed):
        sub = sample_subgraph(adj, seeds, [2, 2], torch.Generator().manual_seed(seed))
        return sub.nodes, [(b.dst, b.src, b.weight) for b in sub.blocks]

    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first[0], again[0])
    for a, b in zip(first[1], again[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(first[0], other[0]) or any(not torch.equal(a[1], b[1]) for a, b in zip(first[1], other[1]))


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_a_covering_fanout_gives_full_propagation_values_and_gradients(layers):
    adj = random_graph()
    seeds = torch.tensor([2, 7, 31, 45, 11, 60])
    x = torch.randn(adj.shape[0], 6, requires_grad=True)
    weights = torch.randn(len(seeds), 6)
    full = LightGCNPropagation(layers)(x, adj)[seeds]
    (full * weights).sum().backward()
    full_grad, x.grad = x.grad.clone(), None
    fanout = int(degrees(adj).max())
    sub = sample_subgraph(adj, seeds, [fanout] * layers)
    part = propagate_sampled(x[sub.nodes], sub)
    (part * weights).sum().backward()
    assert torch.allclose(part, full, atol=1e-6)
    assert torch.allclose(x.grad, full_grad, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_an_outer_hop_without_gradient_keeps_the_values_and_the_inner_gradients(layers):
    """``outer``: the outermost hop's rows enter apart, without gradient; the output and the
    gradients of every other row are those of the whole propagation."""
    adj = random_graph()
    seeds = torch.tensor([2, 7, 31, 45])
    sub = sample_subgraph(adj, seeds, [2] * layers, torch.Generator().manual_seed(3))
    inner_end = sub.sizes[-2]
    assert inner_end < len(sub.nodes)  # the outermost hop adds nodes
    x = torch.randn(len(sub.nodes), 5, requires_grad=True)
    weights = torch.randn(len(seeds), 5)
    whole = propagate_sampled(x, sub)
    (whole * weights).sum().backward()
    whole_grad, x.grad = x.grad.clone(), None
    part = propagate_sampled(x[:inner_end], sub, outer=x[inner_end:].detach())
    (part * weights).sum().backward()
    assert torch.allclose(part, whole, atol=1e-6)
    assert torch.allclose(x.grad[:inner_end], whole_grad[:inner_end], atol=1e-6)
    assert float(whole_grad[inner_end:].abs().sum()) > 0  # the whole propagation did reach them ...
    assert float(x.grad[inner_end:].abs().sum()) == 0  # ... the cut one does not


def test_a_closed_last_hop_keeps_the_inner_edges_and_adds_no_node():
    adj = random_graph()
    seeds = torch.tensor([2, 7, 31, 45])
    whole = sample_subgraph(adj, seeds, [3, 3], torch.Generator().manual_seed(4))
    closed = sample_subgraph(adj, seeds, [3, 3], torch.Generator().manual_seed(4), close_last_hop=True)
    inner_end = whole.sizes[1]
    assert torch.equal(closed.nodes, whole.nodes[:inner_end]) and closed.sizes == [4, inner_end, inner_end]
    last, kept = whole.blocks[1], closed.blocks[1]
    inner = last.src < inner_end  # the same draw, restricted to the edges into the first hop's nodes
    assert torch.equal(kept.dst, last.dst[inner]) and torch.equal(kept.src, last.src[inner])
    assert torch.equal(kept.weight, last.weight[inner]) and kept.n_src == inner_end


def test_positions_within_finds_members_and_marks_the_rest():
    nodes = torch.tensor([40, 3, 17, 8])
    assert positions_within(nodes, torch.tensor([8, 5, 40, 41, 3, 0])).tolist() == [3, -1, 0, -1, 1, -1]


def test_a_small_fanout_matches_full_propagation_in_expectation():
    adj = random_graph()
    seeds = torch.tensor([2, 7, 31, 45])
    x = torch.randn(adj.shape[0], 4)
    full = LightGCNPropagation(2)(x, adj)[seeds]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [propagate_sampled(x[s.nodes], s) for s in (sample_subgraph(adj, seeds, [2, 2], gen) for _ in range(500))]
    )
    spread = draws.std(0) / 500**0.5
    assert float(draws.std(0).max()) > 1e-3  # the draws do vary ...
    assert bool(((draws.mean(0) - full).abs() <= 5 * spread + 1e-6).all())  # ... around the full value


# ---------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(DPPMG, write_tiny_mm(tmp_path_factory.mktemp("tiny_sampled")))


SAMPLED = {"propagation": "sampled", "fanouts": [3, 3]}


def test_mode_keys_are_checked(data):
    with pytest.raises(ConfigError, match="DPPMG key propagation"):
        build_model(DPPMG, data, propagation="minibatch")
    with pytest.raises(
        ConfigError, match=r"DPPMG key fanouts = \[3\]: propagation sampled needs one fan-out per layer"
    ):
        build_model(DPPMG, data, propagation="sampled", fanouts=[3])
    with pytest.raises(ConfigError, match="learner = 'sgd' with DPPMG key propagation = sampled"):
        build_model(DPPMG, data, learner="sgd", **SAMPLED)
    with pytest.raises(ConfigError, match="weight_decay = 0.01 with DPPMG key propagation = sampled"):
        build_model(DPPMG, data, weight_decay=0.01, **SAMPLED)
    with pytest.raises(ConfigError, match="clip_grad_norm = .* with DPPMG key propagation = sampled"):
        build_model(DPPMG, data, clip_grad_norm={"max_norm": 5}, **SAMPLED)
    with pytest.raises(ConfigError, match="DPPMG key sampled_control_variate"):
        build_model(DPPMG, data, sampled_control_variate="often", **SAMPLED)
    with pytest.raises(ConfigError, match="DPPMG key sampled_outer_hop"):
        build_model(DPPMG, data, sampled_outer_hop="frozen", **SAMPLED)
    with pytest.raises(ConfigError, match="sampled_outer_hop = 'snapshot' needs sampled_control_variate = true"):
        build_model(DPPMG, data, sampled_outer_hop="snapshot", sampled_control_variate=False, **SAMPLED)
    build_model(DPPMG, data, fanouts=[3], learner="sgd")  # full mode: the sampled keys are not in the way


@pytest.mark.parametrize("loss_type", ["bpr", "softmax"])
def test_sampled_loss_with_a_covering_fanout_equals_the_full_loss(data, loss_type):
    """Eval mode (no dropout, no codebook updates), every neighbour kept, encoder gradients through
    every item: the same loss and gradients as full propagation. The softmax compares over the
    batch's items in sampled mode, so the full model is given the same candidates."""
    batch = next(iter(data[1]))
    common = dict(kmeans_warmup_epochs=0, vq_weight=1.0, loss_type=loss_type, graph_dropout=0.0, seed=3)
    full = build_model(DPPMG, data, **common)
    sampled = build_model(
        DPPMG, data, propagation="sampled", fanouts=[1000, 1000], sampled_encoder_grad="all", **common
    )
    full._ensure_initialized()  # k-means once, then the same codebooks in both
    sampled.load_state_dict(full.state_dict())
    results = []
    for model in (full, sampled):
        model.eval()
        model.zero_grad()
        if model is full and loss_type == "softmax":  # the full softmax over the same candidates
            candidates = torch.unique(torch.cat([batch[model.ITEM_ID], batch[model.NEG_ITEM_ID]]))
            losses = _full_softmax_over(model, batch, candidates)
        else:
            losses = model.calculate_loss(batch)
        sum(losses).backward()
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                grads[name] = param.grad.to_dense() if param.grad.is_sparse else param.grad
        results.append(([l.detach() for l in losses], grads))
    (full_losses, full_grads), (part_losses, part_grads) = results
    for a, b in zip(full_losses, part_losses):
        assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert full_grads.keys() == part_grads.keys()
    for name in full_grads:
        assert torch.allclose(full_grads[name], part_grads[name], atol=1e-5), name


def _full_softmax_over(model, batch, candidates):
    """The full model's softmax loss restricted to ``candidates``: full propagation, then the same
    sampled-softmax formula (what sampled mode computes over its subgraph)."""
    user, pos, neg = batch[model.USER_ID], batch[model.ITEM_ID], batch[model.NEG_ITEM_ID]
    unique_users, inverse = torch.unique(user, return_inverse=True)
    item_index = torch.searchsorted(candidates, pos)
    ego_items = model.item_ego_embeddings()
    users, items = model.forward(ego_items, rows=(unique_users, candidates))
    users_q = {m: model.quantizers[m](users[m]) for m in model.modalities}
    scores = model.score_matrix({m: o.quantized for m, o in users_q.items()}, items) / model.temperature
    rec = -torch.log_softmax(scores, 1)[inverse, item_index].mean()
    vq = model.vq_weight * sum(o.commitment_loss for o in users_q.values())
    reg = model.emb_loss(
        *[model.user_embeddings[m](user) for m in model.modalities],
        *[ego_items[m][pos] for m in model.modalities],
        *[ego_items[m][neg] for m in model.modalities],
    )
    return rec, vq, model.reg_weight * reg


def test_batch_encoder_grad_trains_the_encoders_through_the_batch_items_only(data):
    batch = next(iter(data[1]))
    model = build_model(DPPMG, data, kmeans_warmup_epochs=0, **SAMPLED)
    model.train()
    sum(model.calculate_loss(batch)).backward()
    assert model.user_embeddings["text"].weight.grad.is_sparse
    assert model.item_embeddings["image"].weight.grad.is_sparse
    assert all(p.grad is not None and not p.grad.is_sparse for p in model.encoders.parameters())


def test_tiny_dppmg_trains_sampled_and_evaluates_on_the_full_graph(data, tmp_path):
    config, train_data, valid_data, test_data = data
    model = build_model(DPPMG, data, **SAMPLED)
    saved = {k: config[k] for k in ("checkpoint_dir", "epochs", "propagation", "fanouts")}
    config["checkpoint_dir"], config["epochs"] = str(tmp_path), 3
    config["propagation"], config["fanouts"] = SAMPLED["propagation"], SAMPLED["fanouts"]
    try:
        trainer = get_trainer(config, DPPMG)(config, model)
        assert isinstance(trainer.optimizer, SparseDenseOptimizer)
        before = {m: q.codebooks.clone() for m, q in model.quantizers.items()}
        trainer.fit(train_data, valid_data, saved=True)
        result = trainer.evaluate(test_data)
    finally:
        for key, value in saved.items():
            config[key] = value
    assert 1 <= int(model.epochs_done) <= 3 and 0.0 <= result["ndcg@5"] <= 1.0  # the best epoch's weights
    assert all(q.is_initialized for q in model.quantizers.values())  # k-means ran
    assert any(not torch.equal(q.codebooks, before[m]) for m, q in model.quantizers.items())  # EMA moved them
    assert len(trainer.history) == 3 and "model_stats" in trainer.history[-1]
    # evaluation scores are full-graph propagation's
    model.eval()
    users = torch.arange(1, model.n_users)
    scores = model.full_sort_predict({model.USER_ID: users}).view(len(users), -1)
    quantized = model.user_modal_vectors(quantized=True)
    _, items = model.forward()
    expected = model.score_matrix({m: v[users] for m, v in quantized.items()}, items)
    assert torch.allclose(scores, expected, atol=1e-5)
    # the optimiser state round-trips through a plain checkpoint
    state = torch.load(trainer.last_model_file, weights_only=True)
    assert set(state["optimizer"]) == {"dense", "sparse"}
    trainer.optimizer.load_state_dict(state["optimizer"])


def test_graph_dropout_samples_from_the_epochs_pruned_graph(data):
    model = build_model(DPPMG, data, graph_dropout=0.5, **SAMPLED)
    model.train()
    batch = next(iter(data[1]))
    model.calculate_loss(batch)
    pruned = model.training_adjacency()
    assert pruned is not model.norm_adj and pruned._nnz() < model.norm_adj._nnz()


# ---------------------------------------------------------------------------------- control variate
def _seed_rows(model, batch):
    users = torch.unique(batch[model.USER_ID])
    items = torch.unique(torch.cat([batch[model.ITEM_ID], batch[model.NEG_ITEM_ID]]))
    return users, items


def _full_rows(model, users, items):
    full_users, full_items = model.forward()
    return torch.cat([torch.cat([full_users[m][users], full_items[m][items]]) for m in model.modalities], 1)


def _sampled_rows(model, users, items):
    sampled_users, sampled_items, _ = model.forward_sampled(users, items, model.norm_adj, dropout=False)
    return torch.cat([torch.cat([sampled_users[m], sampled_items[m]]) for m in model.modalities], 1)


def test_control_variate_is_exact_at_the_snapshot_whatever_the_fanout(data):
    """Nothing has moved since the epoch's snapshot: one neighbour per hop gives full propagation."""
    batch = next(iter(data[1]))
    model = build_model(DPPMG, data, graph_dropout=0.0, propagation="sampled", fanouts=[1, 1])
    model.eval()
    users, items = _seed_rows(model, batch)
    with torch.no_grad():
        assert torch.allclose(_sampled_rows(model, users, items), _full_rows(model, users, items), atol=1e-6)
        without = build_model(
            DPPMG, data, graph_dropout=0.0, propagation="sampled", fanouts=[1, 1], sampled_control_variate=False
        )
        without.load_state_dict(model.state_dict())
        without.eval()
        assert not torch.allclose(_sampled_rows(without, users, items), _full_rows(model, users, items), atol=1e-3)


def test_control_variate_propagates_the_change_since_the_snapshot(data):
    """After the tables and encoders moved: a covering fan-out is exact, a small one unbiased
    (every item encoded afresh; under the default ``batch`` the neighbours' encodings are the
    epoch's, by design)."""
    batch = next(iter(data[1]))
    model = build_model(
        DPPMG, data, graph_dropout=0.0, propagation="sampled", fanouts=[1000, 1000], sampled_encoder_grad="all"
    )
    model.eval()
    users, items = _seed_rows(model, batch)
    model.propagation_snapshot(model.norm_adj)  # taken before the step below
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
        full = _full_rows(model, users, items)
        assert torch.allclose(_sampled_rows(model, users, items), full, atol=1e-5)
        model.fanouts = [2, 2]
        torch.manual_seed(0)
        draws = torch.stack([_sampled_rows(model, users, items) for _ in range(300)])
    spread = draws.std(0) / 300**0.5
    assert float(draws.std(0).max()) > 1e-4  # the draws vary (the change is sampled) ...
    assert bool(((draws.mean(0) - full).abs() <= 5 * spread + 1e-5).all())  # ... around the full value


def test_the_snapshot_and_encodings_are_retaken_each_training_epoch(data):
    model = build_model(DPPMG, data, **SAMPLED)
    model.train()
    batch = next(iter(data[1]))
    model.calculate_loss(batch)
    first = model._snapshot
    assert first is not None and model._neighbour_encodings is not None
    model.calculate_loss(batch)
    assert model._snapshot is first  # one per epoch ...
    model.eval()
    model.train()
    assert model._snapshot is None and model._neighbour_encodings is None  # ... retaken at the next


def test_without_outer_hop_gradient_a_step_updates_only_the_inner_rows(data):
    """``sampled_outer_hop: no_grad``: the same propagated vectors (the forward is unchanged),
    and the tables' gradients cover the seeds and their inner hop, not the outermost hop's rows."""
    batch = next(iter(data[1]))
    results = []
    for outer_hop in ("grad", "no_grad"):
        model = build_model(DPPMG, data, sampled_outer_hop=outer_hop, graph_dropout=0.0, **SAMPLED)
        users, items = _seed_rows(model, batch)
        users, items = users[:2], items[:2]  # a small batch: its outermost hop adds users
        torch.manual_seed(5)
        out_users, out_items, _ = model.forward_sampled(users, items, model.norm_adj, dropout=False)
        vectors = torch.cat([torch.cat([out_users[m], out_items[m]]) for m in model.modalities], 1)
        (vectors**2).sum().backward()
        grad = model.user_embeddings[model.modalities[0]].weight.grad.coalesce()
        results.append((vectors.detach(), set(grad.indices()[0][grad.values().abs().sum(1) > 0].tolist()), users))
    (whole, touched_whole, users), (cut, touched_cut, _) = results
    assert torch.allclose(whole, cut, atol=1e-6)
    assert touched_cut < touched_whole  # strictly fewer user rows move
    assert set(users.tolist()) <= touched_cut  # the seeds themselves still do


def test_snapshot_outer_hop_is_exact_at_the_snapshot_and_leaves_the_outer_rows_alone(data):
    """``sampled_outer_hop: snapshot``: nothing moved since the snapshot, so the outermost hop's
    nodes, left at their snapshot values, lose nothing; their rows get no gradient."""
    batch = next(iter(data[1]))
    model = build_model(DPPMG, data, sampled_outer_hop="snapshot", graph_dropout=0.0, **SAMPLED)
    model.eval()
    users, items = _seed_rows(model, batch)
    users, items = users[:2], items[:2]
    assert torch.allclose(_sampled_rows(model, users, items), _full_rows(model, users, items), atol=1e-6)
    model.train()
    model.prepare_training_epoch()
    torch.manual_seed(5)
    out_users, out_items, _ = model.forward_sampled(users, items, model.norm_adj, dropout=False)
    sum((v**2).sum() for v in [*out_users.values(), *out_items.values()]).backward()
    grad = model.user_embeddings[model.modalities[0]].weight.grad.coalesce()
    touched = set(grad.indices()[0].tolist())
    torch.manual_seed(5)
    inner = sample_subgraph(model.norm_adj, torch.cat([users, model.n_users + items]), [3, 3], close_last_hop=True)
    assert touched == {int(n) for n in inner.nodes if n < model.n_users}  # the first hop's users, no further
