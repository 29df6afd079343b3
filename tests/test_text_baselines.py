"""The trained text baselines without tokens: the population prompt is the same for every user;
the history prompt writes the user's best-rated training items (title, year, tags) into it; both
save and load their one learned tensor."""

import numpy as np
import pandas as pd
import torch
from text_tiny import FakeTokens, tiny_lm, tiny_tokenizer

from recbole_dppmg.data.item_content import ContentMap, ItemContent
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.text.baselines import (
    HistoryText,
    PopulationPromptConditioner,
    TokenItemsText,
    prompt_condition,
)
from recbole_dppmg.generation.text.generate import prompt_ids
from recbole_dppmg.generation.text.injection import add_preference_tokens


def content():
    frame = pd.DataFrame(
        {"item_id": [str(i) for i in range(1, 25)], "name": [f"Film {i}" for i in range(1, 25)]}
    ).set_index("item_id", drop=False)
    frame["made"] = [str(1990 + i % 10) for i in range(1, 25)]
    frame["cats"] = ["Drama|War" if i % 2 else "Comedy" for i in range(1, 25)]
    roles = {"title": "name", "year": "made", "tags": "cats", "description": None, "image": None}
    return ItemContent("tiny-text", frame, ContentMap(fields=roles, tags_separator="|"))


def lm_with_slots(tokens):
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    add_preference_tokens(model, tokenizer, PreferenceVocabulary(tokens).strings)
    return model, tokenizer


def test_population_prompt_is_the_same_for_everyone_and_history_is_not(tmp_path):
    tokens = FakeTokens(n_users=6)
    model, tokenizer = lm_with_slots(tokens)
    population = PopulationPromptConditioner.build(model, tokenizer, tokens, seed=0)
    assert population.name == "population" and population.token_text("u0") == population.token_text("u3")
    ids = torch.tensor([prompt_ids(tokenizer, population.token_text("u0"))] * 2)
    embeds = population.inputs_embeds(ids, ["u0", "u3"])
    assert torch.equal(embeds[0], embeds[1])
    assert sum(p.numel() for p in population.parameters()) == tokens.levels * len(tokens.modalities) * embeds.shape[-1]
    # distinct slots at the embeddings' norm (one repeated mean vector starts the LM at a much worse NLL)
    assert not torch.allclose(population.vectors[0], population.vectors[1])
    norm = model.get_input_embeddings().weight.norm(dim=1).mean()
    assert torch.allclose(population.vectors.norm(dim=1), norm.expand(len(population.slot_strings)), rtol=1e-4)

    history = HistoryText(tokens, content(), items=2)
    liked = [i for i, _ in tokens.history("u0", "train")][:2]
    text = history("u0")
    assert text.count(";") >= 1 and f"Film {liked[0]} (" in text
    assert "Drama, War" in text or "Comedy" in text
    with_history = PopulationPromptConditioner.build(model, tokenizer, tokens, seed=0, history=history)
    assert with_history.name == "history" and with_history.token_text("u0") != with_history.token_text("u1")
    assert with_history.token_text("u0").endswith(f"Liked: {text}")

    pointed = TokenItemsText(tokens, content(), items=3)("u0")
    scores = tokens.token_scores(["u0"], relative=True)[0]
    best = tokens.item_ids[int(np.argmax(np.where(np.arange(len(scores)) > 0, scores, -np.inf)))]
    assert pointed.startswith(f"Film {best} (") and pointed.count(";") >= 2
    items = prompt_condition("token_items", model, tokenizer, tokens, content(), 3)
    assert items.name == "token_items" and items.token_text("u0").endswith(f"Tokens point to: {pointed}")

    folder = population.save(tmp_path / "population_prompt")
    loaded = PopulationPromptConditioner.load(folder, model, tokenizer)
    assert torch.equal(loaded.vectors, population.vectors) and loaded.slot_strings == population.slot_strings


def test_a_text_generator_routed_to_text_tokens_prompts_with_those_only(tmp_path):
    from recbole_dppmg.generation.text.generate import TokenConditioner
    from recbole_dppmg.generation.text.injection import inject_preference_tokens, load_preference_lm

    tokens = FakeTokens(n_users=4)
    vocabulary = PreferenceVocabulary(tokens)
    tokenizer = tiny_tokenizer()
    lm = inject_preference_tokens(tiny_lm(tokenizer), tokenizer, vocabulary, channels=["text"])
    text = TokenConditioner(lm, vocabulary).token_text("u1")
    assert text == "".join(vocabulary.strings_for("u1", ["text"])) and "<img_" not in text
    lm.save(tmp_path / "dppmg")
    tokenizer = tiny_tokenizer()
    reloaded = load_preference_lm(tmp_path / "dppmg", tiny_lm(tokenizer), tokenizer, vocabulary)
    assert reloaded.meta.channels == ["text"] and TokenConditioner(reloaded, vocabulary).token_text("u1") == text
