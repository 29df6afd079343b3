"""The judge of generated content on hand-made cases, on a tiny trained DPPMG export: consistency
prefers a text and a poster of the same item, personalization prefers a user's own liked items,
the optional CLIP term, and the errors a user can cause."""

import json
import string

import numpy as np
import pytest
from judge_fixtures import tiny_export
from PIL import Image

from recbole_dppmg.errors import CheckpointError, ConfigError, DataError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.reward.judge import PreferenceJudge
from recbole_dppmg.tokens import PreferenceTokens


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    folder, data = tiny_export(tmp_path_factory.mktemp("judge"))
    tokens = PreferenceTokens.load(folder)
    return tokens, data, PreferenceJudge.for_dataset("tiny", tokens, dataset_dir=data / "tiny")


def _features(judge, modality, items):
    rows = {i: k for k, i in enumerate(judge.catalogues[modality].item_ids)}
    return judge.catalogues[modality].features[[rows[i] for i in items]]


def test_items_without_the_modality_are_left_out(judged):
    tokens, _, judge = judged
    assert len(judge.catalogues["text"].item_ids) == 48
    assert len(judge.catalogues["image"].item_ids) == 48 - len(range(0, 48, 5))  # every fifth tiny item has no image
    assert "i0" not in judge.catalogues["image"].item_ids and "i0" in judge.catalogues["text"].item_ids
    assert judge.joint_items == judge.catalogues["image"].item_ids


def test_text_and_poster_of_one_item_are_more_consistent_than_unrelated_ones(judged):
    _, _, judge = judged
    items = judge.joint_items
    cluster = {i: int(i[1:]) % 4 for i in items}  # tiny_mm: item k belongs to cluster k % 4
    unrelated = [next(j for j in items[k:] + items if cluster[j] != cluster[i]) for k, i in enumerate(items)]
    same = judge.consistency(_features(judge, "text", items), _features(judge, "image", items))
    other = judge.consistency(_features(judge, "text", items), _features(judge, "image", unrelated))
    assert same.shape == (len(items),) and ((0 <= same) & (same <= 1)).all()
    assert same.mean() > other.mean() + 0.2 and (same > other).mean() > 0.9
    bhattacharyya = PreferenceJudge(
        judge.tokens, judge.catalogues, load_settings("reward", {"consistency_measure": "bhattacharyya"})
    )
    assert (
        bhattacharyya.consistency(_features(judge, "text", items[:5]), _features(judge, "image", items[:5])).mean()
        > bhattacharyya.consistency(
            _features(judge, "text", items[:5]), _features(judge, "image", unrelated[:5])
        ).mean()
    )


@pytest.mark.parametrize("user_vector", ["quantized", "continuous"])
def test_a_users_liked_item_scores_a_higher_percentile_than_a_random_item(judged, user_vector):
    tokens, data, _ = judged
    judge = PreferenceJudge.for_dataset("tiny", tokens, {"user_vector": user_vector}, dataset_dir=data / "tiny")
    rng = np.random.default_rng(0)
    for modality in ("text", "image"):
        have = set(judge.catalogues[modality].item_ids)
        users, liked, random = [], [], []
        for user in tokens.users:
            own = [i for i, _ in tokens.history(user, "train") if i in have]
            users += [user] * len(own)
            liked += own
            random += list(rng.choice(sorted(have), len(own)))
        own_score = judge.personalization(users, modality, _features(judge, modality, liked))
        random_score = judge.personalization(users, modality, _features(judge, modality, random))
        assert ((0 <= own_score) & (own_score <= 1)).all()
        assert own_score.mean() > random_score.mean() + 0.1, modality


def test_percentile_counts_the_catalogue_below(judged):
    tokens, _, judge = judged
    user = tokens.users[0]
    u = judge.user_vectors([user], "text")[0]
    scores = judge.catalogues["text"].embedded @ u
    best, worst = judge.catalogues["text"].features[[scores.argmax(), scores.argmin()]]
    top, bottom = judge.personalization([user, user], "text", np.stack([best, worst]))
    n = len(scores)
    assert top == pytest.approx((n - 0.5) / n) and bottom == pytest.approx(0.5 / n)


def test_reward_total_is_the_weighted_mean(judged):
    tokens, data, _ = judged
    judge = PreferenceJudge.for_dataset(
        "tiny", tokens, {"consistency_weight": 2.0, "image_personalization_weight": 0.0}, dataset_dir=data / "tiny"
    )
    users = tokens.users[:3]
    text, image = _features(judge, "text", ["i1", "i2", "i3"]), _features(judge, "image", ["i1", "i2", "i3"])
    out = judge.reward(users, text_features=text, image_features=image)
    assert set(out) == {"text_personalization", "image_personalization", "consistency", "total"}
    np.testing.assert_allclose(out["total"], (out["text_personalization"] + 2 * out["consistency"]) / 3)
    assert set(judge.reward(users, text_features=text)) == {"text_personalization", "total"}


def _tiny_clip(folder):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder.mkdir()
    chars = list(string.ascii_lowercase + string.digits + ".,:()'-!?")
    vocab = {c: k for k, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + k for k, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_optional_clip_term(judged, tmp_path):
    tokens, data, _ = judged
    judge = PreferenceJudge.for_dataset(
        "tiny", tokens, {"clip_path": str(_tiny_clip(tmp_path / "clip")), "clip_weight": 1.0}, dataset_dir=data / "tiny"
    )
    users = tokens.users[:2]
    text, image = _features(judge, "text", ["i1", "i2"]), _features(judge, "image", ["i1", "i2"])
    posters = [Image.new("RGB", (8, 12), (200, 30, 30)), Image.new("RGB", (8, 12), (30, 30, 200))]
    out = judge.reward(users, text, image, texts=["a red film", "a blue film"], images=posters)
    assert out["clip"].shape == (2,) and ((0 <= out["clip"]) & (out["clip"] <= 1)).all()
    parts = [out[k] for k in ("text_personalization", "image_personalization", "consistency")]
    np.testing.assert_allclose(out["total"], (sum(parts) + out["clip"]) / 4)
    assert "clip" not in judge.reward(users, text, image)  # no raw content given: no CLIP term
    with pytest.raises(CheckpointError, match="not a Hugging Face CLIP folder"):
        PreferenceJudge.for_dataset(
            "tiny", tokens, {"clip_path": str(tmp_path)}, dataset_dir=data / "tiny"
        ).clip_scorer()


def test_bad_settings_and_inputs(judged):
    tokens, data, judge = judged
    with pytest.raises(ConfigError, match="unknown reward setting.*bogus"):
        load_settings("reward", {"bogus": 1})
    with pytest.raises(ConfigError, match="reward.consistency_measure must be one of js, bhattacharyya"):
        load_settings("reward", {"consistency_measure": "kl"})
    with pytest.raises(ConfigError, match="weights must be >= 0 and not all 0"):
        load_settings(
            "reward",
            {
                k: 0
                for k in (
                    "text_personalization_weight",
                    "image_personalization_weight",
                    "consistency_weight",
                    "clip_weight",
                )
            },
        )
    with pytest.raises(DataError, match="one feature row per user, got 1 rows for 2 users"):
        judge.personalization(tokens.users[:2], "text", np.zeros((1, 8)))
    with pytest.raises(DataError, match="width 5, the export's encoder expects 6"):
        judge.personalization(tokens.users[:1], "image", np.zeros((1, 5)))
    with pytest.raises(DataError, match="user 'ghost' is not in the token export"):
        judge.personalization(["ghost"], "text", np.zeros((1, 8)))
    with pytest.raises(DataError, match="one image per text, got 2 texts and 1 images"):
        judge.consistency(np.zeros((2, 8)), np.zeros((1, 6)))
    with pytest.raises(CheckpointError, match="made for dataset tiny, not other"):
        PreferenceJudge.for_dataset("other", tokens, dataset_dir=data / "tiny")
    with pytest.raises(DataError, match="run --stage prepare"):
        PreferenceJudge.for_dataset("tiny", tokens, dataset_dir=data / "missing")


def test_an_export_with_an_id_channel(tmp_path):
    from recbole_dppmg.generation.report.build import top_recommended_items

    folder, data = tiny_export(tmp_path, modalities=["text", "image", "id"])
    tokens = PreferenceTokens.load(folder)
    judge = PreferenceJudge.for_dataset("tiny", tokens, dataset_dir=data / "tiny")
    assert judge.modalities == ["text", "image"] and tokens.modalities == ["text", "image", "id"]
    users = tokens.users[:3]
    out = judge.reward(
        users, _features(judge, "text", ["i1", "i2", "i3"]), _features(judge, "image", ["i1", "i2", "i3"])
    )
    assert out["total"].shape == (3,)
    top = top_recommended_items(tokens, users, set(tokens.item_ids[1:]))
    seen = {i for i, _ in tokens.history(users[0], "train")} | {i for i, _ in tokens.history(users[0], "valid")}
    assert top[0] is not None and top[0] not in seen


def test_the_relative_reward_gives_nothing_for_content_everybody_likes_alike(judged):
    """reward.relative (RL): a constant text given to the whole batch earns exactly 0 on average,
    the same poster paired with it earns exactly 0 consistency per row, and a user's own liked
    item earns more than a constant popular one."""
    tokens, data, _ = judged
    judge = PreferenceJudge.for_dataset("tiny", tokens, {"relative": True}, dataset_dir=data / "tiny")
    users = [u for u in tokens.users[:6] for _ in range(2)]  # two samples per user, as in an RL group
    constant = np.repeat(_features(judge, "text", ["i1"]), len(users), 0)
    poster = np.repeat(_features(judge, "image", ["i2"]), len(users), 0)
    out = judge.reward(users, text_features=constant, image_features=poster, partner="image")
    assert out["text_personalization"].mean() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(out["consistency"], 0.0, atol=1e-12)
    assert "image_personalization" not in out  # the partner's poster is fixed: not part of what RL is paid for
    assert out["total"].mean() == pytest.approx(0.0, abs=1e-12)  # a constant text's reward is 0 by construction
    absolute = judge.reward(users, text_features=constant, image_features=poster)  # no partner: the report's reward
    assert absolute["text_personalization"].mean() > 0.05
    own = _features(judge, "text", [next(i for i, _ in tokens.history(u, "train")) for u in users])
    mine = judge.relative_personalization(users, "text", own)
    assert mine.mean() > 0.05
    with pytest.raises(DataError, match="at least two users"):
        judge.relative_personalization([users[0]], "text", own[:1])
