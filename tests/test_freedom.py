"""FREEDOM on the tiny multimodal graph: training, scoring, the frozen kNN graph, degree-sensitive
pruning of the user-item graph, and a plugin run whose checkpoint reloads with weights_only."""

import io

import pytest
import torch
from recbole.data.interaction import Interaction
from tiny_mm import TINY_RUN, build_model, tiny_data, write_tiny_mm

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.model import FREEDOM
from recbole_dppmg.model.freedom import graph_weights
from recbole_dppmg.model.freedom_graphs import knn_edges, sample_kept_edges
from recbole_dppmg.model.graph import normalized_adjacency
from recbole_dppmg.quick_start import load_data_and_model, run
from recbole_dppmg.trainer import load_checkpoint_file
from recbole_dppmg.utils import get_model, get_trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(FREEDOM, write_tiny_mm(tmp_path_factory.mktemp("tiny_freedom")))


def build(data, **overrides):
    return build_model(FREEDOM, data, **overrides)


def mean_loss(model, batches):
    model.eval()  # full graph: a deterministic loss
    with torch.no_grad():
        return sum(model.calculate_loss(b).item() for b in batches) / len(batches)


def train_epochs(model, data, epochs):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        model.train()  # a fresh pruned graph each epoch, as under RecBole's trainer
        for batch in data[1]:
            optimizer.zero_grad()
            model.calculate_loss(batch).backward()
            optimizer.step()


def test_training_lowers_the_loss_and_reaches_every_part(data):
    model = build(data)
    batches = list(data[1])
    before = mean_loss(model, batches)
    features = model.features["text"].detach().clone()
    train_epochs(model, data, 10)
    assert mean_loss(model, batches) < 0.8 * before
    for m in ("text", "image"):
        assert model.projections[m].weight.grad.abs().sum() > 0
    assert not torch.equal(model.features["text"], features)  # fine-tuned, as MMRec's tables
    frozen = build(data, tune_features=False)
    train_epochs(frozen, data, 1)
    assert frozen.features["text"].grad is None


def test_the_knn_graph_is_frozen_and_has_k_neighbours_per_item(data):
    model = build(data)
    graph = model.item_graph.to_dense().clone()
    k = model.knn_k  # the checks below read the features before fine-tuning changes them
    features_before = {m: model.features[m].detach().clone() for m in ("text", "image")}
    for m in ("text", "image"):
        present = getattr(model, f"present_{m}")
        edge_index, weight = knn_edges(model.features[m].detach(), present, k)
        counts = torch.bincount(edge_index[0], minlength=model.n_items)
        assert torch.equal(counts, present.long() * k)  # k neighbours per item with the modality
        assert present[edge_index[1]].all() and torch.allclose(weight, torch.full_like(weight, 1 / k))
        rows = torch.nonzero(present).flatten()
        assert (edge_index[1][edge_index[0] == rows[0]] == rows[0]).any()  # itself included
        blocked = knn_edges(model.features[m].detach(), present, k, block_rows=5)
        assert torch.equal(blocked[0], edge_index) and torch.equal(blocked[1], weight)
    # Rows are stochastic (fusion weights sum to 1); an item without a poster keeps its text row.
    image = model.present_image
    assert torch.allclose(graph[1:].sum(1), torch.ones(model.n_items - 1), atol=1e-6)
    assert graph[0].abs().sum() == 0  # the padding item
    no_image = torch.nonzero(~image[1:]).flatten()[0] + 1
    text_only, text_w = knn_edges(model.features["text"].detach(), model.present_text, k)
    expected = torch.zeros(model.n_items)
    expected[text_only[1][text_only[0] == no_image]] = text_w[text_only[0] == no_image]
    assert torch.allclose(graph[no_image], expected)
    weights = graph_weights(["text", "image"], 0.1)
    assert weights == pytest.approx({"text": 0.9, "image": 0.1})

    train_epochs(model, data, 3)
    assert not torch.equal(model.features["image"], features_before["image"])
    assert torch.equal(model.item_graph.to_dense(), graph)  # the features moved, the graph did not
    assert "item_graph" not in model.state_dict()  # rebuilt from the raw features, never learned


def test_pruning_keeps_the_expected_fraction_of_train_edges(data):
    model = build(data)
    n_edges = model.edge_users.numel()
    train_edges = set(zip(model.edge_users.tolist(), model.edge_items.tolist()))
    for dropout in (0.8, 0.5, 0.0):
        model.dropout = dropout
        adj = model.prune_graph()
        rows, cols = adj.to_sparse_coo().coalesce().indices()
        assert len(rows) == 2 * round(n_edges * (1 - dropout))  # both directions of each kept edge
        user_side = rows < model.n_users
        kept = set(zip(rows[user_side].tolist(), (cols[user_side] - model.n_users).tolist()))
        assert kept <= train_edges and len(kept) == round(n_edges * (1 - dropout))
    # Each epoch draws a new graph; evaluation uses the full one, LightGCN's adjacency.
    model.dropout = 0.8
    model.train()
    model.calculate_loss(next(iter(data[1])))
    first = model._pruned_adj.to_dense()
    model.train()
    model.calculate_loss(next(iter(data[1])))
    assert not torch.equal(first, model._pruned_adj.to_dense())
    full = normalized_adjacency(data[1].dataset.inter_matrix(form="coo"), model.n_users, model.n_items)
    assert torch.allclose(model.full_adj.to_dense(), full.to_dense())


def test_pruning_prefers_edges_between_rare_nodes():
    weights = torch.tensor([1.0] * 50 + [0.1] * 50)  # 1/sqrt(d_u d_i): rare ends first
    generator = torch.Generator().manual_seed(0)
    kept = torch.zeros(100)
    for _ in range(200):
        kept[sample_kept_edges(weights, 0.8, generator)] += 1
    assert kept[:50].sum() > 5 * kept[50:].sum()
    assert kept.sum() == 200 * 20


def test_full_sort_predict_shape_agrees_with_predict_and_round_trips(data):
    model = build(data)
    train_epochs(model, data, 2)
    model.eval()
    users = torch.arange(1, model.n_users)
    full = model.full_sort_predict(Interaction({model.USER_ID: users}))
    assert full.shape == (len(users) * model.n_items,)
    full = full.view(len(users), -1)
    pairs = Interaction(
        {
            model.USER_ID: users.repeat_interleave(model.n_items),
            model.ITEM_ID: torch.arange(model.n_items).repeat(len(users)),
        }
    )
    assert torch.allclose(model.predict(pairs).view(len(users), -1), full, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(data, seed=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert torch.equal(fresh.full_sort_predict(Interaction({model.USER_ID: users})).view(len(users), -1), full)


def test_bad_settings_name_the_key(data):
    with pytest.raises(ConfigError, match="FREEDOM key modalities"):
        build(data, modalities=["text", "id"])
    with pytest.raises(ConfigError, match="FREEDOM key dropout = 1.0: must be"):
        build(data, dropout=1.0)
    assert build(data, modalities=["image"]).item_graph.shape == (49, 49)


def test_a_plugin_run_reloads_its_checkpoint_with_weights_only(tmp_path):
    write_tiny_mm(tmp_path / "data")
    settings = dict(
        TINY_RUN, data_path=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "saved"), epochs=2, knn_k=4
    )
    assert get_model("freedom") is FREEDOM
    result = run("FREEDOM", "tiny", config_dict=settings)
    state = load_checkpoint_file(result.checkpoint)  # weights_only=True
    assert state["model"] == "FREEDOM" and state["epoch"] >= 0
    config, net, _, _, _, test_data = load_data_and_model(result.checkpoint, settings)
    assert isinstance(net, FREEDOM) and net.knn_k == 4
    reloaded = get_trainer(config, type(net))(config, net).evaluate(test_data, load_best_model=False)
    assert {k: float(v) for k, v in reloaded.items()} == pytest.approx(result.test_result, abs=1e-9)
