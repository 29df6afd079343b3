"""Token export, FAISS lookup, fold-in and their failure modes, on a tiny trained DPPMG."""

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_mm import TINY_RUN, write_tiny_mm

from recbole_dppmg.errors import CheckpointError, DataError
from recbole_dppmg.quick_start import load_data_and_model, run
from recbole_dppmg.tokens import PreferenceTokens
from recbole_dppmg.tokens import export as export_module
from recbole_dppmg.tokens.export import export_tokens
from recbole_dppmg.tokens.faiss_lookup import (
    brute_force_search,
    build_index,
    residual_search,
)
from recbole_dppmg.tokens.format import MANIFEST


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    write_tiny_mm(root / "data")
    settings = dict(TINY_RUN, data_path=str(root / "data"), checkpoint_dir=str(root / "saved"))
    result = run("DPPMG", "tiny", config_dict=settings)
    folder = export_tokens(result.checkpoint, config_dict=settings)
    return result, folder, settings


def test_export_layout_and_manifest(trained):
    _, folder, _ = trained
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["dataset"] == "tiny" and manifest["modalities"] == ["text", "image"]
    assert manifest["levels"] == 2 and manifest["codebook_size"] == 4 and manifest["dim"] == 8
    for name in manifest["files"]:
        assert (folder / name).is_file(), name
    lines = (folder / "user_tokens.tsv").read_text().splitlines()
    assert lines[0] == "user_id:token\ttxt_tokens:token_seq\timg_tokens:token_seq"
    assert len(lines) == 1 + 40 and lines[1].split("\t")[1].startswith("<txt_0_")
    assert "## text, level 0" in (folder / "codes.md").read_text()


def test_exported_codes_equal_the_models_quantizer(trained):
    result, folder, settings = trained
    _, model, dataset, *_ = load_data_and_model(result.checkpoint, config_dict=settings)
    tokens = PreferenceTokens.load(folder, dataset="tiny")
    expected = model.user_codes().numpy()
    assert (tokens.user_codes == expected).all()
    users = model.user_modal_vectors(quantized=False)
    for k, m in enumerate(model.modalities):
        assert (tokens.encode(users[m][1:].numpy(), m) == expected[1:, k]).all()
    some_user = dataset.id2token(dataset.uid_field, 5)
    assert tokens.tokens_for(some_user)["text"] == [f"<txt_{l}_{c}>" for l, c in enumerate(expected[5, 0])]


@pytest.mark.parametrize("index_type", ["flat", "ivf4"])
def test_faiss_lookup_equals_brute_force(index_type):
    rng = np.random.default_rng(0)
    codebooks = rng.normal(size=(3, 64, 16)).astype(np.float32)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    indexes = [build_index(book, index_type) for book in codebooks]
    for index in indexes:
        if hasattr(index, "nprobe"):
            index.nprobe = index.nlist  # search every list: exact
    assert (residual_search(vectors, indexes, codebooks) == brute_force_search(vectors, codebooks)).all()


def test_item_features_map_into_the_models_item_space(trained):
    result, folder, settings = trained
    _, model, dataset, *_ = load_data_and_model(result.checkpoint, config_dict=settings)
    tokens = PreferenceTokens.load(folder)
    raw = dataset.get_item_feature()
    for m, field in (("text", "text_feat"), ("image", "image_feat")):
        present = raw[f"{m}_mask"].numpy() > 0.5
        present[0] = False
        mapped = tokens.embed_item_features(raw[field].numpy()[present], m)
        ego = tokens.item_vectors[f"{m}.ego"][present]
        if model.item_id_residual:  # layer-0 item = content map + per-item residual; new content has no residual
            ego = ego - model.item_embeddings[m].weight.detach().numpy()[present]
        np.testing.assert_allclose(mapped, ego, atol=1e-4)
    with pytest.raises(DataError, match="width 3, the export's encoder expects 8"):
        tokens.embed_item_features(np.zeros((1, 3)), "text")


def test_token_scores_are_the_quantized_stage1_scores(trained):
    result, folder, settings = trained
    _, model, dataset, *_ = load_data_and_model(result.checkpoint, config_dict=settings)
    tokens = PreferenceTokens.load(folder)
    users = tokens.users
    absolute = tokens.token_scores(users)
    vectors = model.user_modal_vectors(quantized=True)
    rows = [tokens.user_row(u) for u in users]
    expected = sum(vectors[m][rows].numpy() @ tokens.item_vectors[m].T for m in tokens.modalities)
    np.testing.assert_allclose(absolute, expected, rtol=1e-4, atol=1e-4)
    relative = tokens.token_scores(users, relative=True)
    np.testing.assert_allclose(relative.mean(0), 0, atol=1e-4)  # every item's average over users taken out
    offset = absolute - relative
    np.testing.assert_allclose(
        offset, np.broadcast_to(offset[:1], offset.shape), rtol=1e-5, atol=1e-5
    )  # the same per-item offset for everyone


def test_history_is_the_stage1_split(trained):
    result, folder, settings = trained
    _, _, dataset, train_data, _, test_data = load_data_and_model(result.checkpoint, config_dict=settings)
    tokens = PreferenceTokens.load(folder)
    user = dataset.id2token(dataset.uid_field, 3)
    expected_train = set(dataset.id2token(dataset.iid_field, train_data._dataset.inter_matrix(form="csr")[3].indices))
    expected_test = set(dataset.id2token(dataset.iid_field, test_data._dataset.inter_matrix(form="csr")[3].indices))
    assert {i for i, _ in tokens.history(user)} == expected_train
    assert {i for i, _ in tokens.history(user, "test")} == expected_test
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        tokens.history(user, "holdout")


def test_fold_in_from_items(trained):
    _, folder, _ = trained
    tokens = PreferenceTokens.load(folder)
    new_user = tokens.fold_in(["i0", "i4", "i8", "i12"])
    assert set(new_user) == {"text", "image"} and len(new_user["text"]) == 2
    assert all(t.startswith("<img_") for t in new_user["image"])


def test_fold_in_unknown_items_are_listed(trained):
    _, folder, _ = trained
    with pytest.raises(DataError, match="unknown item ids for tiny: nope, i999"):
        PreferenceTokens.load(folder).fold_in(["i1", "nope", "i999"])


def test_unknown_user(trained):
    _, folder, _ = trained
    with pytest.raises(DataError, match="user 'ghost' is not in the token export"):
        PreferenceTokens.load(folder).tokens_for("ghost")


def test_export_for_another_dataset_or_version_is_refused(trained, tmp_path):
    _, folder, _ = trained
    with pytest.raises(CheckpointError, match="made for dataset tiny, not ml-100k-mm"):
        PreferenceTokens.load(folder, dataset="ml-100k-mm")
    copy = tmp_path / "old"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format_version"] = 0
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 0"):
        PreferenceTokens.load(copy)


def test_checkpoint_that_is_not_dppmg(trained, tmp_path):
    result, _, settings = trained
    state = torch.load(result.checkpoint, weights_only=True)
    state["model"] = "LightGCN"
    other = tmp_path / "lightgcn.pth"
    torch.save(state, other)
    with pytest.raises(CheckpointError, match="is a LightGCN model; tokens come from a DPPMG checkpoint"):
        export_tokens(other, config_dict=settings)


def test_interrupted_export_leaves_nothing_loadable(trained, tmp_path, monkeypatch):
    result, _, settings = trained
    target = tmp_path / "tokens"

    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash mid-export")

    monkeypatch.setattr(export_module, "_write_user_tokens", fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_tokens(result.checkpoint, out_dir=target, config_dict=settings)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind
    with pytest.raises(CheckpointError, match="not a token export"):
        PreferenceTokens.load(target)
