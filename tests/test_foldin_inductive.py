"""Inductive fold-in (tokens/foldin_inductive.py): held-out users are absent from the training
data, the batches, early stopping and the model's graph; everyone else keeps every interaction."""

import numpy as np
import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed
from tiny_mm import tiny_config, write_tiny_mm

from recbole_dppmg.model.dppmg import DPPMG
from recbole_dppmg.tokens.export import token_vectors
from recbole_dppmg.tokens.foldin_inductive import (
    evaluate_new_users,
    evaluate_own_vectors,
    hold_out,
    pick_new_users,
    split_matrix,
)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    config = tiny_config(DPPMG, write_tiny_mm(tmp_path_factory.mktemp("inductive")))
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    new_users = pick_new_users(dataset.user_num, 0.25, seed=3)
    held = hold_out(config, dataset, loaders, new_users)
    return config, loaders, held, new_users


def _model(config, train_data):
    init_seed(0, True)
    return DPPMG(config, train_data._dataset)


def test_pick_new_users_is_seeded_and_never_the_padding_user():
    users = pick_new_users(41, 0.25, seed=3)
    assert len(users) == 10 and len(set(users)) == 10 and users.min() >= 1 and users.max() <= 40
    assert (users == pick_new_users(41, 0.25, seed=3)).all()
    assert not (users == pick_new_users(41, 0.25, seed=4)).all()
    assert len(pick_new_users(41, 0.0, seed=3)) == 0


def test_held_out_users_leave_the_training_data_and_the_graph(split):
    config, (train_data, valid_data, _), (held_train, held_valid, _), new_users = split
    full, reduced = split_matrix(train_data), split_matrix(held_train)
    others = np.setdiff1d(np.arange(1, full.shape[0]), new_users)
    assert full[new_users].nnz > 0 and reduced[new_users].nnz == 0
    assert (reduced[others] != full[others]).nnz == 0 and reduced.nnz == full[others].nnz

    batch_users = torch.cat([batch[config["USER_ID_FIELD"]] for batch in held_train]).numpy()
    assert not np.isin(batch_users, new_users).any()
    assert np.isin(others, batch_users).all()
    assert set(held_valid.uid_list.tolist()) == set(valid_data.uid_list.tolist()) - set(new_users.tolist())
    for user in others[:5]:
        assert set(held_valid.uid2positive_item[user].tolist()) == set(valid_data.uid2positive_item[user].tolist())

    model = _model(config, held_train)
    degree = model.norm_adj.crow_indices().diff()[: model.n_users]
    assert (degree[new_users] == 0).all() and (degree[others] > 0).all()
    assert set(model.graph_users.tolist()) == set(others.tolist())
    assert set(_model(config, train_data).graph_users.tolist()) == set(range(1, full.shape[0]))


def test_no_held_out_user_returns_the_loaders_unchanged(split):
    config, loaders, _, _ = split
    assert hold_out(config, None, loaders, np.array([], dtype=np.int64)) == loaders


def test_new_users_are_scored_from_fold_in(split):
    config, (train_data, valid_data, test_data), (held_train, _, _), new_users = split
    model = _model(config, held_train)
    model.eval()
    train, valid, test = (split_matrix(loader) for loader in (train_data, valid_data, test_data))
    fit_users = np.setdiff1d(np.arange(1, train.shape[0]), new_users)
    figures = evaluate_new_users(
        model, token_vectors(model), new_users, fit_users, split_matrix(held_train), train, valid, test
    )
    assert set(figures) == {"fold_in_tokens", "fold_in_continuous", "popularity"}
    for by_split in figures.values():
        assert by_split["test"]["users"] == len(new_users)
        assert all(0.0 <= by_split[s][key] <= 1.0 for s in ("valid", "test") for key in ("ndcg@10", "recall@10"))
    own = evaluate_own_vectors(model, fit_users, train, valid, test)
    assert own["own_tokens"]["test"]["users"] == len(fit_users)
