"""DPPMG on a tiny multimodal graph: training, scoring contract, checkpoints, hooks, bad input."""

import io

import pytest
import torch
from recbole.data.interaction import Interaction
from tiny_mm import build_model, tiny_data, write_tiny_mm

from recbole_dppmg.errors import ConfigError, DataError
from recbole_dppmg.model import DPPMG
from recbole_dppmg.model.graph import LightGCNPropagation, normalized_adjacency


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_mm(tmp_path_factory.mktemp("tiny_mm"))


@pytest.fixture(scope="module")
def data(root):
    return tiny_data(DPPMG, root)


def build(data, **overrides):
    return build_model(DPPMG, data, **overrides)


def train_epochs(model, train_data, epochs, lr=0.01):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        model.train()
        total, batches = 0.0, 0
        for batch in train_data:
            optimizer.zero_grad()
            loss = sum(model.calculate_loss(batch))
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        model.on_epoch_end()
        history.append(total / batches)
    return history


def all_users(model):
    return torch.arange(1, model.n_users)


def fixed_batch_loss(model, batches):
    """Mean loss over fixed batches (fixed negatives), in eval mode: no codebook updates."""
    model.eval()
    with torch.no_grad():
        return sum(sum(model.calculate_loss(b)).item() for b in batches) / len(batches)


def test_loss_decreases(data):
    model = build(data, kmeans_warmup_epochs=0, embedding_size=16, codebook_size=8)
    batches = list(data[1])
    before = fixed_batch_loss(model, batches)
    train_epochs(model, data[1], 10, lr=0.03)
    after = fixed_batch_loss(model, batches)
    assert after < 0.9 * before, (before, after)  # the floor is ~0.75: 20% off-cluster noise
    assert int(model.epochs_done) == 10  # eval-mode loss calls are not training steps


def test_commitment_weight_zero_keeps_codebooks_tracking_the_users(data):
    model = build(data, vq_weight=0.0, kmeans_warmup_epochs=0)
    batch = next(iter(data[1]))
    rec, vq, _ = model.calculate_loss(batch)
    assert vq.item() == 0.0
    before = {m: q.codebooks.clone() for m, q in model.quantizers.items()}
    train_epochs(model, data[1], 2)
    for m, q in model.quantizers.items():
        assert not torch.equal(q.codebooks, before[m])  # EMA updates still run
    model.set_eval_quantized(True)
    assert model.epoch_stats()[f"{model.modalities[0]}/L0/codes_used"] >= 1


def test_full_sort_predict_agrees_with_predict(data):
    model = build(data)
    train_epochs(model, data[1], 2)
    model.eval()
    users = all_users(model)
    for quantized in (True, False):
        model.set_eval_quantized(quantized)
        full = model.full_sort_predict(Interaction({model.USER_ID: users})).view(len(users), -1)
        assert full.shape == (len(users), model.n_items)
        pairs = Interaction(
            {
                model.USER_ID: users.repeat_interleave(model.n_items),
                model.ITEM_ID: torch.arange(model.n_items).repeat(len(users)),
            }
        )
        assert torch.allclose(model.predict(pairs).view(len(users), -1), full, atol=1e-5)


def test_quantized_scores_use_the_decoded_codes(data):
    model = build(data)
    train_epochs(model, data[1], 2)
    model.eval()
    codes = model.user_codes()
    assert codes.shape == (model.n_users, 2, model.levels)
    assert codes.max() < model.codebook_size
    quantized = model.user_modal_vectors(quantized=True)
    continuous = model.user_modal_vectors(quantized=False)
    items = model.item_modal_vectors()
    for k, m in enumerate(model.modalities):
        decoded = model.quantizers[m].decode(codes[:, k])
        assert torch.allclose(decoded, quantized[m], atol=1e-6)
        assert not torch.allclose(quantized[m], continuous[m])
        assert model.codebooks()[m].shape == (model.levels, model.codebook_size, model.dim)
        assert items[m].shape == (model.n_items, model.dim)
    users = all_users(model)
    scores = model.full_sort_predict(Interaction({model.USER_ID: users})).view(len(users), -1)
    expected = sum(quantized[m][users] @ items[m].t() for m in model.modalities)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert model.item_modal_vectors(propagated=False)["text"].shape == (model.n_items, model.dim)
    # Scoring with each user's first code only decodes level 0 alone.
    model.set_eval_quantized(True, levels=1)
    first = model.user_modal_vectors(quantized=True, levels=1)
    for k, m in enumerate(model.modalities):
        assert torch.allclose(first[m], model.quantizers[m].codebooks[0][codes[:, k, 0]], atol=1e-6)
    scores = model.full_sort_predict(Interaction({model.USER_ID: users})).view(len(users), -1)
    assert torch.allclose(scores, sum(first[m][users] @ items[m].t() for m in model.modalities), atol=1e-5)
    with pytest.raises(ValueError, match="levels"):
        model.set_eval_quantized(True, levels=model.levels + 1)


def test_checkpoint_round_trip_weights_only(data):
    model = build(data)
    train_epochs(model, data[1], 2)
    model.eval()
    users = Interaction({model.USER_ID: all_users(model)})
    expected = model.full_sort_predict(users)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(data, seed=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert torch.equal(fresh.full_sort_predict(users), expected)
    assert int(fresh.epochs_done) == 2
    # A load into a model that already scored clears its evaluation cache.
    model.load_state_dict(build(data, seed=3).state_dict())
    assert not torch.equal(model.full_sort_predict(users), expected)


def test_epoch_hook_warmup_and_stats(data):
    model = build(data, kmeans_warmup_epochs=2)
    assert model.epoch_stats() == {}
    train_epochs(model, data[1], 1)
    assert model.in_warmup
    stats = model.epoch_stats()
    assert stats["epoch"] == 1
    for m in ("text", "image"):
        for level in range(model.levels):
            assert 1 <= stats[f"{m}/L{level}/codes_used"] <= model.codebook_size
            assert 1 <= stats[f"{m}/L{level}/perplexity"] <= model.codebook_size
            assert 0 <= stats[f"{m}/L{level}/quant_error"]
    # Idempotent: closing again without training steps changes nothing.
    assert model.on_epoch_end() == stats
    train_epochs(model, data[1], 1)  # end of warm-up: codebooks re-seeded by k-means
    assert not model.in_warmup
    assert model.epoch_stats()["epoch"] == 2


def test_epoch_closes_on_train_or_eval_without_explicit_hook(data):
    model = build(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for batch in data[1]:
        optimizer.zero_grad()
        sum(model.calculate_loss(batch)).backward()
        optimizer.step()
    assert int(model.epochs_done) == 0
    model.eval()  # what RecBole's Trainer does before validating
    assert int(model.epochs_done) == 1
    assert model.epoch_stats()["epoch"] == 1
    model.train()
    assert int(model.epochs_done) == 1


def test_warmup_trains_continuous_only_then_quantized_path_has_gradients(data):
    model = build(data, kmeans_warmup_epochs=1, vq_weight=1.0)
    batch = next(iter(data[1]))
    rec, vq, _ = model.calculate_loss(batch)
    assert vq.item() == 0.0 and not vq.requires_grad
    train_epochs(model, data[1], 1)
    model.train()
    rec, vq, _ = model.calculate_loss(batch)
    assert vq.item() > 0
    model.zero_grad()
    rec.backward()  # BPR on quantized users reaches the encoders through straight-through
    for m in model.modalities:
        assert model.encoders[m][0].weight.grad.abs().sum() > 0
        assert model.user_embeddings[m].weight.grad.abs().sum() > 0


def test_id_channel_and_single_modality(data):
    model = build(data, modalities=["text", "id"])
    train_epochs(model, data[1], 1)
    assert set(model.encoders) == {"text"}
    assert model.user_codes().shape == (model.n_users, 2, model.levels)
    assert build(data, modalities="image").modalities == ["image"]


def test_item_id_residual_starts_at_the_content_and_learns_per_item(data):
    plain = build(data, item_id_residual=False)
    model = build(data, item_id_residual=True)
    present = {m: getattr(model, f"present_{m}") for m in model.encoders}
    ego = model.item_modal_vectors(propagated=False)
    for m, rows in present.items():
        # Same seed, same encoder: at initialisation only the residual table differs, and it
        # is zero on the items that have the modality (missing items keep their embedding).
        assert torch.equal(model.item_embeddings[m].weight[rows], torch.zeros_like(ego[m][rows]))
        assert torch.allclose(ego[m], plain.item_modal_vectors(propagated=False)[m])
    train_epochs(model, data[1], 2)
    model.eval()
    ego = model.item_modal_vectors(propagated=False)
    for m, rows in present.items():
        residual = model.item_embeddings[m].weight[rows]
        assert residual.abs().sum() > 0  # the per-item vectors train
        content = model.encoders[m](getattr(model, f"feat_{m}"))
        assert torch.allclose(ego[m][rows], content[rows] + residual, atol=1e-6)
    # The scoring contract is unchanged.
    users = all_users(model)
    scores = model.full_sort_predict(Interaction({model.USER_ID: users})).view(len(users), -1)
    quantized, items = model.user_modal_vectors(quantized=True), model.item_modal_vectors()
    assert torch.allclose(scores, sum(quantized[m][users] @ items[m].t() for m in model.modalities), atol=1e-5)


def test_feature_dropout_only_in_the_training_loss(data):
    model = build(data, feature_dropout=0.5, kmeans_warmup_epochs=0)
    batch = next(iter(data[1]))
    model.train()
    ego = model.item_modal_vectors(propagated=False)
    assert all(torch.equal(ego[m], v) for m, v in model.item_modal_vectors(propagated=False).items())
    torch.manual_seed(0)
    first = sum(model.calculate_loss(batch)).item()
    torch.manual_seed(1)
    second = sum(model.calculate_loss(batch)).item()
    assert first != second  # different dropout masks
    model.eval()
    assert sum(model.calculate_loss(batch)).item() == sum(model.calculate_loss(batch)).item()
    plain = build(data, kmeans_warmup_epochs=0, feature_dropout=0.0)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    users = Interaction({model.USER_ID: all_users(model)})
    assert torch.equal(plain.full_sort_predict(users), model.full_sort_predict(users))


def test_softmax_loss_is_cross_entropy_over_every_item(data):
    model = build(data, loss_type="softmax", softmax_temperature=0.5, kmeans_warmup_epochs=0, reg_weight=0.0)
    model.eval()
    batch = next(iter(data[1]))
    rec_loss = model.calculate_loss(batch)[0]
    users = model.user_modal_vectors(quantized=True)
    items = model.item_modal_vectors()
    user, pos = batch[model.USER_ID], batch[model.ITEM_ID]
    scores = model.score_matrix({m: v[user] for m, v in users.items()}, items) / 0.5
    scores[:, 0] = float("-inf")  # the padding item is never a candidate
    expected = torch.nn.functional.cross_entropy(scores, pos)
    assert torch.allclose(rec_loss, expected, atol=1e-5)
    assert train_epochs(model, data[1], 5, lr=0.03)[-1] < expected.item()


def test_cosine_score_ignores_vector_norms(data):
    model = build(data, score="cosine", kmeans_warmup_epochs=0)
    users = {m: torch.randn(3, model.dim) for m in model.modalities}
    items = {m: torch.randn(4, model.dim) for m in model.modalities}
    scaled = {m: 5.0 * v for m, v in users.items()}
    assert torch.allclose(model.score_matrix(users, items), model.score_matrix(scaled, items), atol=1e-5)
    assert model.score_matrix(users, items).abs().max() <= len(model.modalities) + 1e-5


def test_graph_dropout_prunes_the_training_graph_only(data):
    model = build(data, graph_dropout=0.5, kmeans_warmup_epochs=0)
    model.train()
    pruned = model.training_adjacency()
    assert model.training_adjacency() is pruned  # one graph per epoch
    full_edges = model.norm_adj.values().numel()
    assert pruned.values().numel() == pytest.approx(full_edges / 2, abs=2)
    model.calculate_loss(next(iter(data[1])))  # seeds the codebooks, so the copy below has them
    model.train()  # the trainer's call at the start of the next epoch draws a new graph
    assert model.training_adjacency() is not pruned
    model.eval()
    plain = build(data, kmeans_warmup_epochs=0)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    users = Interaction({model.USER_ID: all_users(model)})
    assert torch.equal(plain.full_sort_predict(users), model.full_sort_predict(users))


def test_graph_propagation_matches_dense_lightgcn():
    import scipy.sparse as sp

    inter = sp.coo_matrix(([1, 1, 1, 1], ([1, 1, 2, 2], [1, 2, 2, 3])), shape=(3, 4))
    adj = normalized_adjacency(inter, 3, 4)
    assert adj.layout == torch.sparse_csr
    dense = torch.zeros(7, 7)
    for u, i in zip(inter.row, inter.col):
        dense[u, 3 + i] = dense[3 + i, u] = 1
    deg = dense.sum(1)
    inv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    norm = inv[:, None] * dense * inv[None, :]
    assert torch.allclose(adj.to_dense(), norm)
    x = torch.randn(7, 5, requires_grad=True)
    weights = torch.randn(7, 5)
    out = LightGCNPropagation(2)(x, adj)
    (out * weights).sum().backward()  # the symmetric backward reuses adj as its transpose
    grad = x.grad.clone()
    x.grad = None
    expected = (x + norm @ x + norm @ norm @ x) / 3
    (expected * weights).sum().backward()
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(grad, x.grad, atol=1e-6)


# --------------------------------------------------------------------------- bad input
def test_configured_modality_missing_from_dataset(data):
    with pytest.raises(DataError, match="'audio_feat'"):
        build(data, modalities=["text", "audio"], feature_fields={"audio": "audio_feat"})


def test_modality_without_a_feature_field(data):
    with pytest.raises(ConfigError, match="feature_fields.audio"):
        build(data, modalities=["text", "audio"])


def test_feature_width_mismatch(data):
    with pytest.raises(DataError, match="'image_feat'.*width 6.*feature_dims.image is 1280"):
        build(data, feature_dims={"text": 8, "image": 1280})
    build(data, feature_dims={"text": 8, "image": 6})  # matching widths are fine


def test_missing_mask_field(data):
    with pytest.raises(DataError, match="'img_mask'"):
        build(data, mask_fields={"image": "img_mask"})


def test_dataset_without_feature_columns(tmp_path):
    root = write_tiny_mm(tmp_path, name="plain", item_columns=())
    with pytest.raises(DataError, match="no item feature column.*'text_feat'"):
        build(tiny_data(DPPMG, root, name="plain", load_col={"inter": ["user_id", "item_id"]}))


def test_nan_features(tmp_path):
    root = write_tiny_mm(tmp_path, name="nan")
    item_file = root / "nan" / "nan.item"
    lines = item_file.read_text().splitlines()
    cells = lines[3].split("\t")
    cells[1] = "nan " + " ".join(cells[1].split()[1:])
    lines[3] = "\t".join(cells)
    item_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="'text_feat'.*NaN"):
        build(tiny_data(DPPMG, root, name="nan"))


@pytest.mark.parametrize(
    "key,value",
    [
        ("levels", 0),
        ("codebook_size", "many"),
        ("ema_decay", 1.0),
        ("modalities", []),
        ("feature_norm", "minmax"),
        ("item_id_residual", "yes"),
        ("feature_dropout", 1.0),
        ("graph_dropout", -0.1),
        ("loss_type", "hinge"),
        ("softmax_temperature", 0),
        ("score", "euclidean"),
    ],
)
def test_bad_config_values(data, key, value):
    with pytest.raises(ConfigError, match=key):
        build(data, **{key: value})
