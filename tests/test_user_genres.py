"""``{user_genres}`` targets: a user's genre profile by lift, per-user target texts, and the
warm-up scoring each pair against its own user's target."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from data_fixtures import movie_content
from text_tiny import FakeTokens

from recbole_dppmg.data.item_content import ContentMap, ItemContent, MissingContentError
from recbole_dppmg.errors import ConfigError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.text.user_genres import UserGenres, genres_by_item
from recbole_dppmg.generation.text.warmup import (
    TargetTexts,
    item_text_table,
    validation_loss,
)


class GenreTokens(FakeTokens):
    """u0 likes items 1-3, u1 items 4-6 (training split); the tokens score items 7-9 highest for everyone."""

    def history(self, user_id, split="train", min_rating=None):
        if split != "train":
            return []
        first = {"u0": 1, "u1": 4}.get(str(user_id))
        return [(str(i), 5.0) for i in range(first, first + 3)] if first else []


GENRES = {
    "1": ["Drama", "Horror"],
    "2": ["Drama", "Horror"],
    "3": ["Drama"],
    "4": ["Drama", "Comedy"],
    "5": ["Drama", "Comedy"],
    "6": ["Drama", "Comedy"],
    "7": ["Western"],
    "8": ["Western"],
    "9": ["War"],
}


def test_history_profile_ranks_genres_by_lift_not_count():
    genres = UserGenres(GenreTokens(n_users=2), GENRES, source="history", count=1)
    assert genres("u0") == "Horror" and genres("u1") == "Comedy"  # Drama is the most frequent, but everyone likes it
    assert UserGenres(GenreTokens(n_users=2), GENRES, source="history", count=2)("u0") == "Horror, Drama"
    assert UserGenres(GenreTokens(n_users=3), GENRES, source="history")("u2") == "unknown"  # nothing liked


def test_token_profile_comes_from_the_items_the_tokens_score_highest(monkeypatch):
    monkeypatch.setattr("recbole_dppmg.generation.text.user_genres.TOP_ITEMS", 3)
    tokens = GenreTokens(n_users=2, n_items=9)  # FakeTokens scores item i with i: the top 3 are 9, 8, 7
    assert UserGenres(tokens, GENRES, source="tokens", count=2)("u0") == "Western, War"


def test_genre_settings_are_checked():
    for bad, message in (
        (("likes", 3), "text.user_genres_from 'likes' is not one of tokens, history"),
        (("tokens", 0), "text.user_genres_count must be a positive integer, got 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings("text", {"user_genres_from": bad[0], "user_genres_count": bad[1]})
    with pytest.raises(MissingContentError, match="has no item tags: set tags_field in its prepare spec"):
        genres_by_item(ItemContent("x", pd.DataFrame({"title": ["A"]}, index=["1"]), ContentMap()))


def test_user_genres_targets_differ_per_user(tmp_path):
    item = tmp_path / "x.item"
    item.write_text(
        "item_id:token\ttitle:token_seq\tyear:token\tgenres:token_seq\tdescription:token_seq\tdescription_mask:float\n"
        "1\tToy Story\t1995\tAnimation Comedy\tToys come alive.\t1.0\n"
    )
    template = "Genres: {user_genres}. {head}: {plot}"
    with pytest.raises(ConfigError, match="needs the users' genre profiles"):
        item_text_table(movie_content(item), template)
    texts = item_text_table(movie_content(item), template, {"u0": "Horror", "u1": "Comedy, War"}.get)
    assert texts.target("u0", "1") == "Genres: Horror. Toy Story (1995): Toys come alive."
    assert texts.target("u1", "1") == "Genres: Comedy, War. Toy Story (1995): Toys come alive."
    assert texts == {"1": "Genres: {user_genres}. Toy Story (1995): Toys come alive."}  # what the item alone says


def test_validation_with_other_users_prompts_scores_the_own_users_target(monkeypatch):
    """The valid_gap asks how well *another* user's tokens explain *this* user's target."""
    from recbole_dppmg.generation.text import warmup as text_warmup

    asked = []
    texts = TargetTexts({"1": "x"}, lambda user, item: asked.append(user) or f"{user} {item}")
    monkeypatch.setattr(
        text_warmup, "encode_pair", lambda tokenizer, conditioner, prompt_user, target, n: (prompt_user, target)
    )
    monkeypatch.setattr(text_warmup, "collate", lambda examples, pad, device: examples)
    seen = []
    monkeypatch.setattr(
        text_warmup, "target_nll", lambda model, conditioner, batch, users: (seen.extend(batch) or 0.0, 1)
    )

    class Conditioner:
        def train(self, flag):
            pass

    validation_loss(
        torch.nn.Linear(1, 1),
        SimpleNamespace(pad_token_id=0),
        Conditioner(),
        [("u0", "1"), ("u1", "1")],
        texts,
        {"batch_size": 2, "max_target_tokens": 8},
        other_users={"u0": "u1", "u1": "u0"},
    )
    assert asked == ["u0", "u1"] and seen == [("u1", "u0 1"), ("u0", "u1 1")]


def test_runs_from_before_target_template_count_as_plain_targets(monkeypatch, tmp_path):
    from recbole_dppmg.generation.common import settings
    from recbole_dppmg.generation.text import config

    data = settings.read_generation_yaml()
    data["text"]["target_template"] = "Genres: {user_genres}. {head}: {plot}"
    (tmp_path / "generation.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(settings, "GENERATION_YAML", tmp_path / "generation.yaml")
    defaults = settings.load_settings("text")
    old_run = config.recorded_settings({"max_steps": 3})
    assert (
        old_run["target_template"] == "{head}: {plot}"
        and old_run["max_steps"] == 3
        and old_run["seed"] == defaults["seed"]
    )
    assert config.recorded_settings({"target_template": "{plot}"})["target_template"] == "{plot}"
    # runs from before the injection keys trained neither a prefix nor slot vectors, whatever today's default
    data["text"].update(prefix_tokens=9, slot_vectors=True)
    (tmp_path / "generation.yaml").write_text(yaml.safe_dump(data))
    assert settings.load_settings("text")["prefix_tokens"] == 9
    older = config.recorded_settings({"max_steps": 3})
    assert older["prefix_tokens"] == 0 and not older["slot_vectors"]
    assert config.recorded_settings({"prefix_tokens": 4})["prefix_tokens"] == 4
