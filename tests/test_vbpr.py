"""VBPR baseline on the tiny multimodal graph: training, scoring contract, checkpoints, errors."""

import io

import pytest
import torch
from recbole.data.interaction import Interaction
from tiny_mm import IMAGE_DIM, TEXT_DIM, build_model, tiny_data, write_tiny_mm

from recbole_dppmg.errors import ConfigError, DataError
from recbole_dppmg.model import VBPR


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(VBPR, write_tiny_mm(tmp_path_factory.mktemp("tiny_vbpr")))


def build(data, **overrides):
    return build_model(VBPR, data, **overrides)


def mean_loss(model, batches):
    model.eval()
    with torch.no_grad():
        return sum(model.calculate_loss(b).item() for b in batches) / len(batches)


def test_uses_both_modalities_and_loss_decreases(data):
    model = build(data)
    assert model.content.shape == (model.n_items, TEXT_DIM + IMAGE_DIM)
    batches = list(data[1])
    before = mean_loss(model, batches)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):
        model.train()
        for batch in data[1]:
            optimizer.zero_grad()
            model.calculate_loss(batch).backward()
            optimizer.step()
    assert mean_loss(model, batches) < 0.8 * before
    assert model.content_projection.weight.grad.abs().sum() > 0


def test_full_sort_predict_agrees_with_predict_and_round_trips(data):
    model = build(data)
    model.eval()
    users = torch.arange(1, model.n_users)
    full = model.full_sort_predict(Interaction({model.USER_ID: users})).view(len(users), -1)
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


def test_missing_feature_field_and_bad_modalities(data):
    with pytest.raises(DataError, match="'poster_feat'"):
        build(data, feature_fields={"image": "poster_feat"})
    with pytest.raises(ConfigError, match="modalities"):
        build(data, modalities=["text", "id"])
    assert build(data, modalities=["text"]).content.shape[1] == TEXT_DIM
