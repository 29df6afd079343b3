"""The text generator on tiny models built from config (no downloads): injection, warm-up,
save/load, generation, baselines and clear errors."""

import copy
import json

import numpy as np
import pytest
import torch
from text_tiny import FakeTokens, item_texts, tiny_lm, tiny_tokenizer

from recbole_dppmg.errors import CheckpointError, ConfigError, DataError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.user_split import split_seed, split_users
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.text import warmup as text_warmup
from recbole_dppmg.generation.text.generate import (
    NoTokenConditioner,
    SoftPromptConditioner,
    TokenConditioner,
    generate_texts,
    prompt_ids,
    shuffled_user_map,
)
from recbole_dppmg.generation.text.injection import (
    add_preference_tokens,
    inject_preference_tokens,
    load_preference_lm,
)
from recbole_dppmg.generation.text.warmup import build_pairs, train_conditioner

CFG = dict(
    batch_size=4,
    max_steps=4,
    learning_rate=0.05,
    weight_decay=0.0,
    warmup_steps=1,
    grad_clip=1.0,
    eval_steps=2,
    save_steps=2,
    max_target_tokens=16,
    seed=0,
    progress=False,
)


@pytest.fixture
def tokens():
    return FakeTokens()


def make_lm(tokens, lora_r=0, tie=True, init_range=0.02):
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer, tie=tie, init_range=init_range)
    vocabulary = PreferenceVocabulary(tokens)
    return inject_preference_tokens(model, tokenizer, vocabulary, backbone="tiny", lora_r=lora_r, seed=0), vocabulary


def pairs_for(tokens, users):
    return build_pairs(tokens, users, item_texts(), None, 3, 0)


def warm_up(lm, conditioner, tokens, folder, train_users=None):
    """The tiny warm-up most tests share: 8 training users' pairs, 2 validation users'."""
    train_users = tokens.users[:8] if train_users is None else train_users
    return train_conditioner(
        lm.model,
        lm.tokenizer,
        conditioner,
        pairs_for(tokens, train_users),
        pairs_for(tokens, tokens.users[8:10]),
        item_texts(),
        CFG,
        folder,
    )


@pytest.mark.parametrize("tie,lora_r", [(True, 0), (False, 0), (True, 4)])
def test_only_new_tokens_move(tokens, tmp_path, tie, lora_r):
    lm, vocabulary = make_lm(tokens, lora_r=lora_r, tie=tie)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters() if not p.requires_grad}
    embed_before = (
        lm.model.get_input_embeddings().base_layer.weight.detach().clone()
        if hasattr(lm.model.get_input_embeddings(), "base_layer")
        else None
    )
    new_before = lm.token_embeddings().detach().clone()
    warm_up(lm, TokenConditioner(lm, vocabulary), tokens, tmp_path / "run")
    for name, p in lm.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[name]), name  # every base weight, base vocabulary included, bit-identical
    # the effective embeddings of the base vocabulary are bit-identical, the new tokens moved
    ids = torch.arange(lm.first_id)
    reference = base[[n for n in base if "embed_tokens" in n and n.endswith("weight")][0]][: lm.first_id]
    assert torch.equal(lm.embed(ids), reference)
    if embed_before is not None:
        assert torch.equal(lm.model.get_input_embeddings().base_layer.weight, embed_before)
    assert not torch.allclose(lm.token_embeddings(), new_before)
    assert any(p.requires_grad for n, p in lm.model.named_parameters() if "trainable_tokens_delta" in n)
    if lora_r:
        assert any("lora_" in n for n, p in lm.model.named_parameters() if p.requires_grad)


def test_adapter_round_trip_identical_generations(tokens, tmp_path):
    lm, vocabulary = make_lm(tokens)
    warm_up(lm, TokenConditioner(lm, vocabulary), tokens, tmp_path / "dppmg")
    assert (tmp_path / "dppmg" / "adapter" / "adapter_config.json").is_file()
    users = tokens.users[10:15]
    options = dict(batch_size=2, max_new_tokens=6, seed=3, suppress_ids=lm.token_ids, progress=False)
    before = generate_texts(lm.model, lm.tokenizer, TokenConditioner(lm, vocabulary), users, **options)
    greedy_before = generate_texts(
        lm.model, lm.tokenizer, TokenConditioner(lm, vocabulary), users, do_sample=False, **options
    )
    embeds_before = lm.token_embeddings().detach().clone()
    assert not any(getattr(m, "merged", False) for m in lm.model.modules())  # generation merged, then restored exactly
    weight = lm.model.get_input_embeddings().base_layer.weight
    assert torch.count_nonzero(weight[lm.first_id :]) > 0 and torch.equal(
        weight[: lm.first_id], tiny_lm(tiny_tokenizer()).get_input_embeddings().weight
    )

    tokenizer = tiny_tokenizer()
    loaded = load_preference_lm(
        tmp_path / "dppmg", tiny_lm(tokenizer), tokenizer, vocabulary
    )  # the same backbone, fresh
    assert loaded.token_ids == lm.token_ids
    assert torch.equal(loaded.token_embeddings(), embeds_before)
    after = generate_texts(loaded.model, loaded.tokenizer, TokenConditioner(loaded, vocabulary), users, **options)
    greedy_after = generate_texts(
        loaded.model, loaded.tokenizer, TokenConditioner(loaded, vocabulary), users, do_sample=False, **options
    )
    assert before == after and greedy_before == greedy_after


def test_guidance_mixes_with_the_instruction_without_tokens(tokens):
    """One greedy step with guidance g equals argmax of log p(.|no tokens) + g (log p(.|tokens) -
    log p(.|no tokens)) over the tokens generation may emit, computed by hand."""
    lm, vocabulary = make_lm(tokens, init_range=0.3)  # a model whose next token depends on the prompt
    conditioner = TokenConditioner(lm, vocabulary)
    users, g = tokens.users[:4], 3.0
    options = dict(batch_size=4, max_new_tokens=1, seed=0, suppress_ids=lm.token_ids, progress=False, do_sample=False)
    guided = generate_texts(lm.model, lm.tokenizer, conditioner, users, guidance=g, **options)
    with torch.no_grad():
        plain = torch.tensor([prompt_ids(lm.tokenizer, None)])
        without = torch.log_softmax(lm.model(input_ids=plain).logits[0, -1].float(), -1)
        expected = []
        for user in users:
            ids = torch.tensor([prompt_ids(lm.tokenizer, conditioner.token_text(user))])
            with_tokens = torch.log_softmax(
                lm.model(inputs_embeds=conditioner.inputs_embeds(ids, [user])).logits[0, -1].float(), -1
            )
            mixed = without + g * (with_tokens - without)
            mixed[lm.token_ids] = float("-inf")
            expected.append(lm.tokenizer.decode([int(mixed.argmax())], skip_special_tokens=True).strip())
    assert guided == expected and any(guided)
    longer = {**options, "max_new_tokens": 8}
    assert generate_texts(lm.model, lm.tokenizer, conditioner, users, guidance=g, **longer) != generate_texts(
        lm.model, lm.tokenizer, conditioner, users, **longer
    )
    no_tokens = NoTokenConditioner(lm.embed)
    assert generate_texts(lm.model, lm.tokenizer, no_tokens, users, guidance=g, **longer) == generate_texts(
        lm.model, lm.tokenizer, no_tokens, users, **longer
    )


def test_no_repeat_ngram_size_forbids_repeated_ngrams_in_the_generated_text(tokens, monkeypatch):
    """Greedy decoding on the tiny LM loops; with the option no bigram of the output repeats."""
    lm, vocabulary = make_lm(tokens)
    conditioner = TokenConditioner(lm, vocabulary)
    outputs = []
    original = lm.model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        outputs.append(out)
        return out

    monkeypatch.setattr(lm.model, "generate", spy)
    options = dict(batch_size=4, max_new_tokens=24, seed=0, suppress_ids=lm.token_ids, progress=False, do_sample=False)

    def repeated_bigrams(out):
        rows = [[t for t in row.tolist() if t != lm.tokenizer.pad_token_id] for row in out]
        return sum(len(r) - 1 - len(set(zip(r, r[1:]))) for r in rows)

    looping = generate_texts(lm.model, lm.tokenizer, conditioner, tokens.users[:4], **options)
    assert repeated_bigrams(outputs[-1]) > 0  # the test can fail: without the option the text loops
    free = generate_texts(lm.model, lm.tokenizer, conditioner, tokens.users[:4], no_repeat_ngram_size=2, **options)
    assert repeated_bigrams(outputs[-1]) == 0 and free != looping


def test_tokens_change_the_model_input(tokens):
    lm, vocabulary = make_lm(tokens)
    users = ["u0", "u1"]  # different clusters -> different tokens
    ids = [prompt_ids(lm.tokenizer, TokenConditioner(lm, vocabulary).token_text(u)) for u in users]
    assert ids[0] != ids[1]
    shuffled = TokenConditioner(lm, vocabulary, {"u0": "u1"})
    assert shuffled.token_text("u0") == TokenConditioner(lm, vocabulary).token_text("u1")
    assert "<txt_" not in lm.tokenizer.decode(prompt_ids(lm.tokenizer, NoTokenConditioner(lm.embed).token_text("u0")))


def test_soft_prompt_baseline_trains_only_its_map_and_round_trips(tokens, tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    vocabulary = PreferenceVocabulary(tokens)
    add_preference_tokens(model, tokenizer, vocabulary.strings)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    soft = SoftPromptConditioner.build(model, tokenizer, tokens, seed=0)
    assert len(soft.slot_strings) == len(vocabulary.ids_for("u0"))  # same prompt budget as DPPMG
    weights_before = soft.encoder.maps[0].weight.detach().clone()
    train_conditioner(
        model,
        tokenizer,
        soft,
        pairs_for(tokens, tokens.users[:8]),
        pairs_for(tokens, tokens.users[8:10]),
        item_texts(),
        CFG,
        tmp_path / "soft",
    )
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    assert not torch.equal(soft.encoder.maps[0].weight, weights_before)
    users = tokens.users[10:14]
    options = dict(batch_size=3, max_new_tokens=5, seed=1, do_sample=False, progress=False)
    before = generate_texts(model, tokenizer, soft, users, **options)
    loaded = SoftPromptConditioner.load(tmp_path / "soft", model, tokenizer, tokens)
    assert generate_texts(model, tokenizer, loaded, users, **options) == before
    # two users' soft prompts differ
    ids = torch.tensor([prompt_ids(tokenizer, soft.token_text("u0"))] * 2)
    embeds = soft.inputs_embeds(ids, ["u0", "u1"])
    assert not torch.allclose(embeds[0], embeds[1])


def test_warmup_resume_is_exact(tokens, tmp_path, monkeypatch):
    train, valid = pairs_for(tokens, tokens.users[:8]), pairs_for(tokens, tokens.users[8:10])
    lm, vocabulary = make_lm(tokens)
    straight = train_conditioner(
        lm.model, lm.tokenizer, TokenConditioner(lm, vocabulary), train, valid, item_texts(), CFG, tmp_path / "a"
    )
    full = {k: v.clone() for k, v in lm.trainable_state().items()}

    lm2, _ = make_lm(tokens)
    real_save = text_warmup._save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(text_warmup, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_conditioner(
            lm2.model, lm2.tokenizer, TokenConditioner(lm2, vocabulary), train, valid, item_texts(), CFG, tmp_path / "b"
        )
    monkeypatch.setattr(text_warmup, "_save_checkpoint", real_save)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    torch.manual_seed(999)  # the checkpoint restores the RNG
    lm3, _ = make_lm(tokens)
    resumed = train_conditioner(
        lm3.model, lm3.tokenizer, TokenConditioner(lm3, vocabulary), train, valid, item_texts(), CFG, tmp_path / "b"
    )
    assert resumed["step"] == straight["step"] == 4
    assert [h["valid_loss"] for h in resumed["history"]] == pytest.approx(
        [h["valid_loss"] for h in straight["history"]], abs=1e-6
    )
    for key, value in lm3.trainable_state().items():
        assert torch.allclose(value, full[key], atol=1e-6), key


def test_warmup_lowers_validation_loss(tokens, tmp_path):
    lm, vocabulary = make_lm(tokens)
    state = train_conditioner(
        lm.model,
        lm.tokenizer,
        TokenConditioner(lm, vocabulary),
        pairs_for(tokens, tokens.users[:12]),
        pairs_for(tokens, tokens.users[12:]),
        item_texts(),
        {**CFG, "max_steps": 10, "eval_steps": 10},
        tmp_path / "r",
    )
    assert state["best_valid"] < state["history"][0]["valid_loss"]


def test_contrast_term_trains_only_tokens_and_records_the_gap(tokens, tmp_path):
    lm, vocabulary = make_lm(tokens)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters() if not p.requires_grad}
    before = lm.token_embeddings().detach().clone()
    cfg = {**CFG, "contrast_weight": 1.0, "contrast_beta": 20.0}
    state = train_conditioner(
        lm.model,
        lm.tokenizer,
        TokenConditioner(lm, vocabulary),
        pairs_for(tokens, tokens.users[:8]),
        pairs_for(tokens, tokens.users[8:12]),
        item_texts(),
        cfg,
        tmp_path / "run",
    )
    for name, p in lm.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[name]), name
    assert not torch.allclose(lm.token_embeddings(), before)
    gaps = [h["valid_gap"] for h in state["history"]]
    assert len(gaps) == 3 and all(np.isfinite(gaps))  # steps 0, 2, 4: other users' prompts vs own, per token


def test_contrast_loss_pays_only_when_the_own_prompt_does_not_explain_better(tokens):
    lm, vocabulary = make_lm(tokens)
    conditioner = TokenConditioner(lm, vocabulary)
    texts = item_texts()
    chunk = pairs_for(tokens, tokens.users[:4])[::3][:4]
    cfg = {**CFG, "contrast_beta": 20.0}
    batch = text_warmup.collate(
        [text_warmup.encode_pair(lm.tokenizer, conditioner, u, texts[i], 16) for u, i in chunk],
        lm.tokenizer.pad_token_id,
        "cpu",
    )
    with torch.no_grad():
        own_sum, count = text_warmup.sequence_nll(lm.model, conditioner, batch, [u for u, _ in chunk])
        other = text_warmup.contrast_loss(lm.model, lm.tokenizer, conditioner, chunk, texts, cfg, own_sum, count, "cpu")
        much_better = text_warmup.contrast_loss(
            lm.model, lm.tokenizer, conditioner, chunk, texts, cfg, own_sum - 10 * count, count, "cpu"
        )
        much_worse = text_warmup.contrast_loss(
            lm.model, lm.tokenizer, conditioner, chunk, texts, cfg, own_sum + 10 * count, count, "cpu"
        )
    assert float(much_better) < 1e-6 < float(other) < float(much_worse)
    assert float(much_worse) == pytest.approx(200.0, rel=0.05)  # softplus(20 x 10 nats per token)
    same_user = [(chunk[0][0], i) for _, i in chunk]
    assert (
        text_warmup.contrast_loss(lm.model, lm.tokenizer, conditioner, same_user, texts, cfg, own_sum, count, "cpu")
        is None
    )


# ---------------------------------------------------------------------------- clear errors
def test_user_without_tokens_is_a_clear_error(tokens):
    lm, vocabulary = make_lm(tokens)
    with pytest.raises(DataError, match="user 'nobody' is not in the token export"):
        generate_texts(lm.model, lm.tokenizer, TokenConditioner(lm, vocabulary), ["u1", "nobody"], progress=False)


def test_codebook_size_mismatch_is_a_clear_error(tokens, tmp_path):
    lm, vocabulary = make_lm(tokens)
    lm.save(tmp_path / "gen")
    other = PreferenceVocabulary(FakeTokens(codebook_size=8))
    tokenizer = tiny_tokenizer()
    with pytest.raises(CheckpointError, match="token export has 2 levels x 8 codes"):
        load_preference_lm(tmp_path / "gen", tiny_lm(tokenizer), tokenizer, other)
    with pytest.raises(CheckpointError, match="token export has 2 levels x 8 codes"):
        lm.check_compatible(other)


def test_empty_prompt_batch_is_a_clear_error(tokens):
    lm, vocabulary = make_lm(tokens)
    with pytest.raises(DataError, match="empty prompt batch"):
        generate_texts(lm.model, lm.tokenizer, TokenConditioner(lm, vocabulary), [], progress=False)


def test_missing_generator_folder_is_a_clear_error(tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.raises(CheckpointError, match="is not a saved text generator"):
        load_preference_lm(tmp_path, tiny_lm(tokenizer), tokenizer)


def test_user_split_and_pairs(tokens):
    split = split_users(tokens.users, 3, 4, seed=0)
    assert len(split["valid"]) == 3 and len(split["test"]) == 4
    assert not set(split["train"]) & (set(split["valid"]) | set(split["test"]))
    assert split == split_users(tokens.users, 3, 4, seed=0)
    assert split_seed({"seed": 5, "split_seed": None}) == 5 and split_seed({"seed": 5, "split_seed": 0}) == 0
    assert all(load_settings(section)["split_seed"] is None for section in ("text", "image"))
    assert load_settings("image")["sd"]["split_seed"] is None
    with pytest.raises(ConfigError, match="cannot hold out"):
        split_users(tokens.users, 10, 10, seed=0)
    pairs = build_pairs(tokens, ["u0"], item_texts(), 4, 2, 0)
    assert len(pairs) == 2 and all(int(i) % 4 == 0 for _, i in pairs)  # u0's cluster, training split only
    top = build_pairs(tokens, ["u0"], item_texts(), 4, 2, 0, choice="token_score")
    liked = sorted((int(i) for i, _ in tokens.history("u0")), reverse=True)
    assert sorted(int(i) for _, i in top) == sorted(liked[:2])  # the two the tokens score highest
    with pytest.raises(ConfigError, match="text.pair_choice 'best' is not one of random, token_score"):
        load_settings("text", {"pair_choice": "best"})
    mapping = shuffled_user_map(tokens.users, 0)
    assert sorted(mapping.values()) == sorted(tokens.users) and all(k != v for k, v in mapping.items())


def test_text_config_refuses_unknown_keys():
    cfg = load_settings("text", {"max_steps": 3, "generate": {"max_new_tokens": 5}})
    assert cfg["max_steps"] == 3 and cfg["generate"]["max_new_tokens"] == 5 and cfg["generate"]["batch_size"] == 16
    with pytest.raises(ConfigError, match="unknown text generator setting text.generate.nope"):
        load_settings("text", {"generate": {"nope": 1}})


def test_target_template_shapes_targets_and_refuses_unknown_fields(tmp_path):
    from data_fixtures import movie_content

    from recbole_dppmg.generation.text.warmup import item_text_table

    item = tmp_path / "x.item"
    item.write_text(
        "item_id:token\ttitle:token_seq\tyear:token\tgenres:token_seq\tdescription:token_seq\tdescription_mask:float\n"
        "1\tToy Story\t1995\tAnimation Comedy\tToys come alive.\t1.0\n"
        "2\tNo Year\t\t\tA plot.\t1.0\n"
        "3\tNo Plot\t1990\tDrama\t\t0.0\n"
    )
    content = movie_content(item)
    assert item_text_table(content) == {"1": "Toy Story (1995): Toys come alive.", "2": "No Year: A plot."}
    shaped = item_text_table(content, "Genres: {genres}. {head}: {plot}")
    assert shaped == {
        "1": "Genres: Animation, Comedy. Toy Story (1995): Toys come alive.",
        "2": "Genres: unknown. No Year: A plot.",
    }
    assert load_settings("text", {"target_template": "{title} | {year}"})["target_template"] == "{title} | {year}"
    for bad, message in (
        ("{rating}: {plot}", "not {rating}"),
        ("plain text", "may only use the fields"),
        ("{plot", "not a format string"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings("text", {"target_template": bad})


def test_content_init_points_tokens_at_liked_content(tokens):
    from recbole_dppmg.generation.text.warmup import content_vectors

    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    vocabulary = PreferenceVocabulary(tokens)
    pairs = pairs_for(tokens, tokens.users[:12])
    content = content_vectors(tokenizer, model.get_input_embeddings().weight, pairs, item_texts(), 16)
    assert set(content) == set(tokens.users[:12])
    lm = inject_preference_tokens(model, tokenizer, vocabulary, content=content)
    # a held-out user's tokens land closer to the content of their own cluster than to other clusters'
    user = tokens.users[12]  # cluster 0
    mine = torch.stack([content[u] for u in tokens.users[:12] if tokens.cluster[u] == tokens.cluster[user]]).mean(0)
    others = torch.stack([content[u] for u in tokens.users[:12] if tokens.cluster[u] != tokens.cluster[user]]).mean(0)
    embeds = lm.embed(torch.tensor([lm.first_id + k for k in vocabulary.ids_for(user)])).mean(0)
    cos = torch.nn.functional.cosine_similarity
    assert cos(embeds, mine, dim=0) > cos(embeds, others, dim=0)
    base_norm = model.get_input_embeddings().base_layer.weight[: lm.first_id].norm(dim=1).mean()
    assert float(lm.token_embeddings().detach().norm(dim=1).mean()) == pytest.approx(float(base_norm), rel=1e-3)
    soft = SoftPromptConditioner.build(tiny_lm(tokenizer), tokenizer, tokens, content=content)
    assert torch.isfinite(soft.encoder(soft.user_vectors[1:3])).all()


def test_text_and_image_generators_hold_out_the_same_users(tokens):
    """One shared split: the poster and the text of a held-out user are judged together."""
    from recbole_dppmg.generation.image.data import training_pairs

    text, image = load_settings("text"), load_settings("image")
    assert (text["seed"], text["valid_users"], text["test_users"]) == (
        image["seed"],
        image["valid_users"],
        image["test_users"],
    )
    split = split_users(tokens.users, 2, 3, seed=7)
    items = [i for u in tokens.users for i, _ in tokens.history(u, "train")]
    pairs = training_pairs(tokens, items, min_rating=0, valid_users=2, test_users=3, seed=7)
    assert pairs.test_users == split["test"] and set(pairs.heldout_users) == set(split["valid"] + split["test"])
    assert not {u for u, _ in pairs.pairs} & set(pairs.heldout_users)


def test_slot_vectors_train_one_shared_vector_per_slot_and_round_trip(tokens, tmp_path):
    tokenizer = tiny_tokenizer()
    vocabulary = PreferenceVocabulary(tokens)
    lm = inject_preference_tokens(tiny_lm(tokenizer), tokenizer, vocabulary, backbone="tiny", slot_vectors=True)
    projection = lm.projection
    assert projection.slot_vectors.shape[0] == len(vocabulary.modalities) * vocabulary.levels
    start = lm.token_embeddings().detach().clone()
    start_linear = copy.deepcopy(projection.linear)
    assert torch.count_nonzero(projection.slot_vectors) == 0  # the start is the plain projection's
    assert any(p is projection.slot_vectors for p in lm.trainable_parameters())
    warm_up(lm, TokenConditioner(lm, vocabulary), tokens, tmp_path / "dppmg", tokens.users[:2])
    slots = projection.slot_vectors.detach()
    assert torch.count_nonzero(slots) > 0
    # the slot's vector moved every code of that slot, even codes no training user has (their
    # own deltas never got a gradient: they moved by the projection's change alone)
    k = vocabulary.codebook_size
    unused = sorted(set(range(len(vocabulary))) - {p for u in tokens.users[:2] for p in vocabulary.ids_for(u)})
    assert unused
    unused = torch.tensor(unused)
    codes = projection.codebook_vectors[unused]
    moved = lm.token_embeddings().detach()[unused] - start[unused]
    with torch.no_grad():
        expected = projection.linear(codes) - start_linear(codes) + slots[unused // k]
    assert torch.allclose(moved, expected, atol=1e-5)

    tokenizer = tiny_tokenizer()
    loaded = load_preference_lm(tmp_path / "dppmg", tiny_lm(tokenizer), tokenizer, vocabulary)
    assert loaded.meta.slot_vectors and torch.equal(loaded.projection.slot_vectors, slots)
    assert torch.equal(loaded.token_embeddings(), lm.token_embeddings())


def test_prefix_tokens_are_shared_trained_never_emitted_and_round_trip(tokens, tmp_path):
    tokenizer = tiny_tokenizer()
    vocabulary = PreferenceVocabulary(tokens)
    lm = inject_preference_tokens(tiny_lm(tokenizer), tokenizer, vocabulary, backbone="tiny", prefix_tokens=3)
    assert lm.prefix_text == "<pfx_0><pfx_1><pfx_2>" and len(lm.token_ids) == len(vocabulary) + 3
    assert lm.preference_ids == lm.token_ids[: len(vocabulary)]
    conditioner = TokenConditioner(lm, vocabulary)
    u0, u1 = tokens.users[:2]
    assert conditioner.token_text(u0).startswith(lm.prefix_text) and conditioner.unconditional_text() == lm.prefix_text
    assert conditioner.token_text(u0)[len(lm.prefix_text) :] == "".join(vocabulary.strings_for(u0))
    ids = torch.tensor(lm.token_ids[len(vocabulary) :])
    prefix_before = lm.embed(ids).detach().clone()
    norm = lm.model.get_input_embeddings().base_layer.weight[: lm.first_id].norm(dim=1).mean()
    assert torch.allclose(prefix_before.norm(dim=1), norm.expand(3), rtol=1e-4)
    warm_up(lm, conditioner, tokens, tmp_path / "dppmg")
    assert not torch.allclose(lm.embed(ids), prefix_before)  # trained
    options = dict(batch_size=2, max_new_tokens=6, seed=3, suppress_ids=lm.token_ids, progress=False)
    users = tokens.users[10:14]
    before = generate_texts(lm.model, lm.tokenizer, conditioner, users, guidance=2.0, **options)
    tokenizer = tiny_tokenizer()
    loaded = load_preference_lm(tmp_path / "dppmg", tiny_lm(tokenizer), tokenizer, vocabulary)
    assert loaded.meta.prefix_tokens == 3 and loaded.token_ids == lm.token_ids
    assert torch.equal(loaded.embed(ids), lm.embed(ids)) and torch.equal(
        loaded.token_embeddings(), lm.token_embeddings()
    )
    after = generate_texts(
        loaded.model, loaded.tokenizer, TokenConditioner(loaded, vocabulary), users, guidance=2.0, **options
    )
    assert before == after


def test_guidance_with_a_prefix_contrasts_with_the_prefix_alone(tokens):
    tokenizer = tiny_tokenizer()
    vocabulary = PreferenceVocabulary(tokens)
    model = tiny_lm(tokenizer, init_range=0.3)
    lm = inject_preference_tokens(model, tokenizer, vocabulary, backbone="tiny", prefix_tokens=2)
    conditioner = TokenConditioner(lm, vocabulary)
    users, g = tokens.users[:4], 3.0
    options = dict(batch_size=4, max_new_tokens=1, seed=0, suppress_ids=lm.token_ids, progress=False, do_sample=False)
    guided = generate_texts(lm.model, lm.tokenizer, conditioner, users, guidance=g, **options)
    with torch.no_grad():
        plain = torch.tensor([prompt_ids(lm.tokenizer, lm.prefix_text)])
        without = torch.log_softmax(lm.model(input_ids=plain).logits[0, -1].float(), -1)
        expected = []
        for user in users:
            ids = torch.tensor([prompt_ids(lm.tokenizer, conditioner.token_text(user))])
            with_tokens = torch.log_softmax(lm.model(inputs_embeds=lm.embed(ids)).logits[0, -1].float(), -1)
            mixed = without + g * (with_tokens - without)
            mixed[lm.token_ids] = float("-inf")
            expected.append(lm.tokenizer.decode([int(mixed.argmax())], skip_special_tokens=True).strip())
    assert guided == expected and any(guided)
