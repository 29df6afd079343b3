"""The stage entry points end to end on a tiny backbone folder and a fake export: warm-up ->
generate -> evaluate write what they promise; resume refuses changed settings."""

import json

import numpy as np
import pytest
from text_tiny import tiny_text_stage

from recbole_dppmg.errors import CheckpointError, DataError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.text import pipeline as text_pipeline


class HashEncoder:
    """Bag of words hashed into 64 dims: texts about the same genre land close together."""

    def encode(self, texts, progress=False):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for k, text in enumerate(texts):
            for word in text.lower().split():
                out[k, hash(word) % 64] += 1
        return out


@pytest.fixture
def setup(tmp_path, monkeypatch):
    encoder = HashEncoder()
    tokens, config = tiny_text_stage(tmp_path, monkeypatch, text_features=encoder)
    config = {
        **config,
        "max_steps": 2,
        "eval_steps": 2,
        "generate": {"max_new_tokens": 4, "batch_size": 3},
        "evaluate": {"users": 4},
    }
    return tokens, config, encoder


def test_warmup_generate_evaluate(setup):
    tokens, config, encoder = setup
    run = text_pipeline.train_text_generator("tiny-text", None, config)
    summary = json.loads((run / "warmup.json").read_text())
    assert summary["dppmg"]["steps"] == 2 and summary["soft_prompt"]["steps"] == 2 and summary["users"]["test"] == 4
    assert summary["population_prompt"]["steps"] == 2 and summary["history_prompt"]["trainable_parameters"] > 0
    split = json.loads((run / "users.json").read_text())
    out = text_pipeline.run_generate_text("tiny-text", ["u1", "u2"], None, config)
    rows = [json.loads(line) for line in (out / "texts.jsonl").read_text().splitlines()]
    assert [r["user"] for r in rows] == ["u1", "u2"] and (out / "texts.md").is_file()
    assert out == text_pipeline.run_generate_text("tiny-text", ["u1", "u2"], None, {**config, "output_dir": str(out)})
    report = text_pipeline.evaluate_text_generation(
        "tiny-text", None, {**config, "evaluate": {"users": 4, "seeds": [0, 1]}}, encoder=encoder
    )
    result = json.loads((report / "text_eval.json").read_text())
    rows = {r["condition"]: r for r in result["rows"]}
    assert list(rows) == list(load_settings("text")["evaluate"]["conditions"])
    assert all(r["users"] == 4 and 0 <= r["hit@10"] <= 1 for r in rows.values()) and result["seeds"] == [0, 1]
    assert rows["dppmg"]["hit@10_per_seed"] != [] and len(rows["no_tokens"]["hit@10_per_seed"]) == 2
    assert (
        rows["dppmg"]["hit@10"] == np.mean(rows["dppmg"]["hit@10_per_seed"])
        and len(rows["real_liked_item"]["seeds"]) == 1
    )
    gap = rows["shuffled"]["dppmg_minus"]["ndcg"]
    assert "dppmg_minus" not in rows["dppmg"] and gap["low"] <= gap["diff"] <= gap["high"]
    assert gap["diff"] == pytest.approx(
        np.mean(rows["dppmg"]["per_user_ndcg"]) - np.mean(rows["shuffled"]["per_user_ndcg"])
    )
    assert 0 < result["random_hit@10"] < 1 and "DPPMG - this" in (report / "text_eval.md").read_text()
    assert result["split"] == "test" and "own - shuffled NDCG@10" in (report / "text_eval.md").read_text()
    assert "degenerate texts" in (report / "text_eval.md").read_text()
    for row in rows.values():
        g = row["gap_ndcg@10"]
        assert g is None or g["ci95"][0] <= g["mean"] <= g["ci95"][1]
    assert rows["real_liked_item"]["gap_ndcg@10"] is not None  # the user's own liked item: personal content
    split = json.loads((run / "users.json").read_text())
    valid = text_pipeline.evaluate_text_generation(
        "tiny-text", None, {**config, "evaluate": {"users": 3, "seeds": [0], "split": "valid"}}, encoder=encoder
    )
    samples = [json.loads(line) for line in (valid / "samples.jsonl").read_text().splitlines()]
    assert {s["user"] for s in samples} <= set(split["valid"]) and not {s["user"] for s in samples} & set(split["test"])
    samples = [json.loads(line) for line in (report / "samples.jsonl").read_text().splitlines()]
    assert (
        len(samples) == 8
        and {s["seed"] for s in samples} == {0, 1}
        and set(samples[0]) >= {"user", "dppmg", "shuffled"}
    )
    assert not set(split["test"]) & set(split["train"])


def test_generate_errors(setup):
    tokens, config, _ = setup
    with pytest.raises(CheckpointError, match="no trained text generator"):
        text_pipeline.run_generate_text("tiny-text", ["u1"], None, config)
    with pytest.raises(DataError, match="no users given"):
        text_pipeline.run_generate_text("tiny-text", [" "], None, config)
    run = text_pipeline.train_text_generator("tiny-text", None, {**config, "soft_prompt": False})
    with pytest.raises(DataError, match="user 'ghost' is not in the token export"):
        text_pipeline.run_generate_text("tiny-text", ["u1", "ghost"], None, config)
    with pytest.raises(CheckpointError, match="cannot resume .*text.seed"):
        text_pipeline.train_text_generator("tiny-text", None, {**config, "resume": str(run), "seed": 1})
    # resuming a finished run is a no-op that returns the same folder
    assert (
        text_pipeline.train_text_generator("tiny-text", None, {**config, "resume": str(run), "soft_prompt": False})
        == run
    )


def test_init_from_continues_a_finished_warmup(setup):
    tokens, config, _ = setup
    first = text_pipeline.train_text_generator("tiny-text", None, config)
    history = json.loads((first / "dppmg" / "history.json").read_text())
    best = min(h["valid_loss"] for h in history)
    second = text_pipeline.train_text_generator(
        "tiny-text", None, {**config, "init_from": str(first), "contrast_weight": 0.5}
    )
    continued = json.loads((second / "dppmg" / "history.json").read_text())
    assert continued[0]["valid_loss"] == pytest.approx(best, abs=1e-5)  # starts where the first run's best state was
    assert json.loads((second / "warmup.json").read_text())["soft_prompt"]["steps"] == 2
    runs = sorted((first.parent).iterdir())
    with pytest.raises(CheckpointError, match="text.init_from .*text.lora_r was 0, now 4"):
        text_pipeline.train_text_generator("tiny-text", None, {**config, "init_from": str(first), "lora_r": 4})
    assert sorted(first.parent.iterdir()) == runs  # refused before a run folder was made


def test_a_dppmg_variant_is_evaluated_against_another_runs_trained_baselines(setup):
    """``text.evaluate.baselines_run``: a DPPMG-only warm-up (slot vectors on, baselines off) is
    compared with the population / history prompts of a run on the same split; a run holding
    out other users is refused by name."""
    tokens, config, encoder = setup
    only = {"soft_prompt": False, "population_prompt": False, "history_prompt": False, "token_items_prompt": False}
    baselines = text_pipeline.train_text_generator("tiny-text", None, {**config, "soft_prompt": False})
    variant = text_pipeline.train_text_generator("tiny-text", None, {**config, **only, "slot_vectors": True})
    assert not (variant / "population_prompt").exists()
    evaluate = {"users": 4, "seeds": [0], "conditions": ["dppmg", "shuffled", "population", "history"]}
    report = text_pipeline.evaluate_text_generation(
        "tiny-text",
        None,
        {**config, "generator": str(variant), "evaluate": {**evaluate, "baselines_run": str(baselines)}},
        encoder=encoder,
    )
    result = json.loads((report / "text_eval.json").read_text())
    assert result["baselines"] == str(baselines) and result["generator"] == str(variant)
    assert [r["condition"] for r in result["rows"]] == evaluate["conditions"]
    assert f"trained baselines from `{baselines.name}`" in (report / "text_eval.md").read_text()
    other = text_pipeline.train_text_generator("tiny-text", None, {**config, **only, "split_seed": 7})
    with pytest.raises(CheckpointError, match="hold out different users"):
        text_pipeline.evaluate_text_generation(
            "tiny-text",
            None,
            {**config, "generator": str(other), "evaluate": {**evaluate, "baselines_run": str(baselines)}},
            encoder=encoder,
        )
    with pytest.raises(CheckpointError, match="text.max_target_tokens differ"):
        changed = text_pipeline.train_text_generator("tiny-text", None, {**config, **only, "max_target_tokens": 9})
        text_pipeline.evaluate_text_generation(
            "tiny-text",
            None,
            {**config, "generator": str(changed), "evaluate": {**evaluate, "baselines_run": str(baselines)}},
            encoder=encoder,
        )
