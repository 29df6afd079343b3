"""Retrieval and history conditioning of the poster generator (image.conditioning) with tiny
models from config: context shapes, a training pair never seeing its own target, different
users reading different posters, shuffled tokens retrieving the partner's set, the checkpoint
round trip, and the errors a user can cause."""

import json

import pytest
import torch
from image_fixtures import tiny_settings, write_tiny_export, write_tiny_posters

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.autoencoder import PixelCodec
from recbole_dppmg.generation.image.context import (
    history_rows,
    training_contexts,
    without_target,
)
from recbole_dppmg.generation.image.data import training_pairs
from recbole_dppmg.generation.image.generate import (
    generate_posters,
    run_generate_images,
    user_context,
    user_positions,
)
from recbole_dppmg.generation.image.model import PosterDiffusion
from recbole_dppmg.generation.image.train import (
    build_context,
    load_image_generator,
    train_image_generator,
)
from recbole_dppmg.tokens import PreferenceTokens

N_ITEMS, K = 12, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def inputs(tmp_path):
    export = write_tiny_export(tmp_path / "tokens", n_users=8, n_items=N_ITEMS, codebook_size=6)
    posters = write_tiny_posters(tmp_path / "posters", n_items=N_ITEMS)
    return export, posters


def _train(tmp_path, export, posters, name="run", **overrides):
    settings = tiny_settings(tmp_path, **{"retrieval_k": K, **overrides})
    return train_image_generator("tiny", export, settings, out_dir=tmp_path / name, posters=posters)


def _model(tmp_path, export, conditioning):
    """An untrained tiny model over random 'latents' of the catalogue, and its export's pairs."""
    tokens = PreferenceTokens.load(export)
    vocab = PreferenceVocabulary(tokens)
    items = [f"i{k}" for k in range(N_ITEMS)]
    pairs = training_pairs(tokens, items, 4.0, valid_users=1, test_users=1, seed=0)
    settings = tiny_settings(tmp_path, conditioning=conditioning, retrieval_k=K)
    latents = torch.randn(N_ITEMS, 3, 16, 8, generator=torch.Generator().manual_seed(0))
    context = build_context(settings, latents, items, tokens, pairs.train_users)
    model = PosterDiffusion(settings, vocab.vectors, 2 * vocab.levels, 3, vocab.slot_modalities(), context)
    return tokens, vocab, model, pairs


def test_without_target_drops_only_the_target_and_keeps_the_order():
    ranked = torch.tensor([[4, 7, 1, 9], [4, 7, 1, 9], [2, 5, -1, -1]])
    target = torch.tensor([7, 3, 2])
    assert without_target(ranked, target, 3).tolist() == [[4, 1, 9], [4, 7, 1], [5, -1, -1]]


@pytest.mark.parametrize("conditioning", ["retrieval", "history"])
def test_a_training_pair_never_sees_its_target(tmp_path, inputs, conditioning):
    """The leakage rule: each pair's context is the user's ranked list without the pair's target."""
    tokens, vocab, model, pairs = _model(tmp_path, inputs[0], conditioning)
    positions = torch.tensor([vocab.ids_for(u) for u, _ in pairs.pairs])
    rows = training_contexts(model, tokens, pairs.pairs, positions)
    assert rows.shape == (len(pairs.pairs), K)
    row_of = model.context.row_of
    for (user, item), row in zip(pairs.pairs, rows.tolist()):
        assert row_of[item] not in row
        if conditioning == "retrieval":
            ranked = model.retrieve(torch.tensor([vocab.ids_for(user)]), count=K + 1)[0].tolist()
        else:
            ranked = history_rows(tokens, user, row_of, K + 1)
        assert row == [r for r in ranked if r != row_of[item]][:K]
    # only training users' pairs: held-out users' data never enters training
    assert not {u for u, _ in pairs.pairs} & set(pairs.heldout_users)


def test_users_read_different_posters_and_shuffled_tokens_retrieve_the_partners(tmp_path, inputs):
    tokens, vocab, model, _ = _model(tmp_path, inputs[0], "retrieval")
    users = list(tokens.users)
    own = user_positions(vocab, users)
    retrieved = model.retrieve(own)
    assert retrieved.shape == (len(users), K)
    assert len({tuple(r) for r in retrieved.tolist()}) > 1  # the tokens decide what the UNet sees
    cond = model.condition(own)
    assert cond.shape == (len(users), 2 * vocab.levels + K, model.config["cross_attention_dim"])
    different = [a for a in range(len(users)) for b in range(a) if retrieved[a].tolist() != retrieved[b].tolist()]
    assert different and not torch.allclose(cond[different[0]], cond[0])
    shuffled = user_positions(vocab, users, "shuffled", seed=3)
    partner = [next(b for b in range(len(users)) if torch.equal(own[b], shuffled[a])) for a in range(len(users))]
    assert torch.equal(model.retrieve(shuffled), retrieved[partner])
    # no tokens: the null sequence, posters included
    empty = model.condition(user_positions(vocab, users[:2], "none"))
    assert torch.equal(empty, model.unconditional(2))


def test_context_dropout_keeps_the_tokens_and_nulls_only_the_posters(tmp_path, inputs):
    """image.context_dropout: the dropped rows read their own tokens and the null posters."""
    tokens, vocab, model, _ = _model(tmp_path, inputs[0], "retrieval")
    users = list(tokens.users)[:4]
    own = user_positions(vocab, users)
    full = model.condition(own)
    dropped = torch.tensor([True, False, True, False])
    cond = model.condition(own, drop_context=dropped)
    n_tokens = 2 * vocab.levels
    assert torch.equal(cond[:, :n_tokens], full[:, :n_tokens])  # the tokens stay for every row
    assert torch.equal(cond[~dropped], full[~dropped])
    assert torch.equal(cond[dropped, n_tokens:], model.context.null.expand(2, -1, -1))
    assert not torch.equal(cond[dropped], full[dropped])
    # a generator trained with it records the key and trains as before otherwise
    folder = _train(tmp_path, *inputs, name="ctxdrop", conditioning="retrieval", context_dropout=0.5)
    assert json.loads((folder / "run.json").read_text())["train"]["context_dropout"] == 0.5
    with pytest.raises(ConfigError, match="image.context_dropout must be <= 1"):
        load_settings("image", {"context_dropout": 1.5})


def test_history_context_is_the_users_own_best_training_posters(tmp_path, inputs):
    tokens, vocab, model, _ = _model(tmp_path, inputs[0], "history")
    users = list(tokens.users)[:4]
    rows = user_context(model, tokens, users)
    best = [[i for i, _ in tokens.history(u, "train")][:K] for u in users]
    assert model.context.ids(rows) == best
    cond = model.condition(user_positions(vocab, users), context=rows)
    assert cond.shape == (4, K, model.config["cross_attention_dim"])  # no tokens
    shuffled = user_context(model, tokens, users, "shuffled", seed=1)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, rows.tolist()))
    assert (user_context(model, tokens, users, "none") == -1).all()
    with pytest.raises(ConfigError, match="history image generator needs each user's history posters"):
        model.condition(user_positions(vocab, users))


@pytest.mark.parametrize("conditioning", ["retrieval", "history"])
def test_checkpoint_round_trip_records_the_conditioning(tmp_path, inputs, conditioning):
    export, posters = inputs
    folder = _train(tmp_path, *inputs, conditioning=conditioning)
    meta = json.loads((folder / "run.json").read_text())
    assert meta["model"]["conditioning"] == conditioning and meta["model"]["retrieval_k"] == K
    assert meta["context_items"] == sorted(posters, key=lambda s: (len(s), s))
    tokens = PreferenceTokens.load(export)
    vocab = PreferenceVocabulary(tokens)
    users = ["u0", "u1", "u2"]
    samples = []
    for _ in range(2):
        model, _ = load_image_generator(folder, vocab, dataset="tiny")
        assert model.conditioning == conditioning and model.context.k == K
        context = user_context(model, tokens, users)
        samples.append(
            generate_posters(
                model, PixelCodec(), user_positions(vocab, users), seed=5, steps=2, progress=False, context=context
            )
        )
    assert samples[0].shape == (3, 3, 16, 8) and torch.equal(samples[0], samples[1])
    assert model.context.bank.abs().sum() > 0  # the catalogue posters came back with the weights
    out = run_generate_images(
        "tiny", users, export, tiny_settings(tmp_path), checkpoint=folder, codec=PixelCodec(), posters=posters
    )
    record = json.loads((out / "generated.json").read_text())["users"]
    assert all(len(record[u]["context_items"]) == K or conditioning == "history" for u in users)
    if conditioning == "history":
        assert record["u0"]["context_items"] == [i for i, _ in tokens.history("u0", "train")][:K]
    # resuming keeps the recorded conditioning
    resumed = train_image_generator(
        "tiny",
        export,
        tiny_settings(tmp_path, conditioning=conditioning, retrieval_k=K, max_steps=4),
        out_dir=folder,
        resume=True,
        posters=posters,
    )
    assert json.loads((resumed / "run.json").read_text())["trained_steps"] == 4


def test_bad_conditioning_settings_name_the_key(tmp_path, inputs):
    with pytest.raises(ConfigError, match="image.conditioning must be one of tokens, retrieval, history"):
        _train(tmp_path, *inputs, conditioning="posters")
    with pytest.raises(ConfigError, match="image.retrieval_k must be >= 1"):
        _train(tmp_path, *inputs, conditioning="retrieval", retrieval_k=0)
    with pytest.raises(ConfigError, match="image.retrieval_k=12 needs more than 12 posters"):
        _train(tmp_path, *inputs, conditioning="retrieval", retrieval_k=N_ITEMS)
    no_image = write_tiny_export(tmp_path / "text_id", n_users=8, n_items=N_ITEMS, modalities=("text", "id"))
    with pytest.raises(ConfigError, match="image.conditioning=retrieval needs an image channel"):
        _train(tmp_path, no_image, inputs[1], name="no_image", conditioning="retrieval")
    assert not (tmp_path / "no_image").exists()  # refused before any run folder or latent is made
