"""Metrics of generated text: retrieval Hit/NDCG with exclusion, chance level, paired bootstrap,
distinct-n, perplexity."""

import math

import numpy as np
import pytest
import torch
from text_tiny import tiny_lm, tiny_tokenizer

from recbole_dppmg.errors import DataError
from recbole_dppmg.generation.common.protocol import random_hit_rate
from recbole_dppmg.generation.text.metrics import (
    distinct_n,
    paired_bootstrap,
    perplexity,
    retrieval_metrics,
)


def test_retrieval_hit_and_ndcg_with_exclusion():
    items = np.eye(4, dtype=np.float32)
    queries = np.array([[1.0, 0.9, 0, 0], [0, 0, 0, 1.0]], dtype=np.float32)
    # user 0: item 0 is a training item (excluded), so item 1 ranks first; user 1: target 2 not in top 1
    metrics = retrieval_metrics(queries, items, targets=[[1], [2]], exclude=[[0], []], k=1)
    assert metrics["hit@1"] == 0.5 and metrics["ndcg@1"] == 0.5 and metrics["users"] == 2
    metrics = retrieval_metrics(np.array([[0, 0, 0.5, 1.0]]), items, targets=[[2]], exclude=[[]], k=2)
    assert metrics["hit@2"] == 1.0 and metrics["ndcg@2"] == pytest.approx(1 / math.log2(3))  # found at rank 2


def test_retrieval_skips_users_without_test_items_and_refuses_none():
    items = np.eye(3, dtype=np.float32)
    metrics = retrieval_metrics(np.eye(3)[:2], items, targets=[[0], []], exclude=[[], []], k=1)
    assert metrics["users"] == 1 and metrics["hit@1"] == 1.0
    with pytest.raises(DataError, match="no evaluated user has a test item"):
        retrieval_metrics(np.eye(3)[:1], items, targets=[[0]], exclude=[[0]], k=1)


def test_random_hit_rate_matches_enumeration_and_simulation():
    # 5 items, user 0 has item 0 excluded and targets {1, 2}: 4 candidates, P(hit@2) = 1 - C(2,2)/C(4,2) = 5/6
    assert random_hit_rate([[1, 2]], [[0]], n_items=5, k=2) == pytest.approx(5 / 6)
    # a user whose only target is excluded is skipped, as retrieval_metrics skips them
    assert random_hit_rate([[1, 2], [0]], [[0], [0]], n_items=5, k=2) == pytest.approx(5 / 6)
    rng = np.random.default_rng(0)
    hits = [bool({1, 2} & set(rng.permutation([1, 2, 3, 4])[:2])) for _ in range(20000)]
    assert np.mean(hits) == pytest.approx(5 / 6, abs=0.01)
    with pytest.raises(DataError, match="no evaluated user"):
        random_hit_rate([[0]], [[0]], n_items=5, k=2)


def test_paired_bootstrap_interval():
    a, b = np.r_[np.ones(50), np.zeros(50)], np.zeros(100)
    result = paired_bootstrap(a, b, resamples=4000, seed=0)
    assert result["diff"] == 0.5 and result["low"] < 0.5 < result["high"]
    assert result["high"] - result["low"] == pytest.approx(2 * 1.96 * 0.05, rel=0.15)  # binomial standard error
    assert paired_bootstrap(a, a)["low"] == paired_bootstrap(a, a)["high"] == 0.0  # identical pairs: no spread
    with pytest.raises(DataError, match="paired bootstrap"):
        paired_bootstrap([], [])


def test_distinct_2():
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == 0.5
    assert distinct_n(["a", ""], 2) == 0.0


def test_degenerate_texts_repeat_a_4gram_three_times():
    from recbole_dppmg.generation.text.metrics import degenerate_share, is_degenerate

    assert is_degenerate("Aria: Aria: Aria Aria: Aria: Aria Aria: Aria: Aria: Aria: Aria")
    assert is_degenerate("A tale of war. a tale of war and a TALE OF WAR again")
    assert not is_degenerate("A tale of war. A tale of war, twice only.")
    assert degenerate_share(["x y z w x y z w x y z w", "fine text", "", "another fine one"]) == 0.25
    assert degenerate_share([]) == 0.0


def test_perplexity_matches_a_direct_computation():
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    text = "Film 3 (1993): a story of love."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = [tokenizer.bos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids))
    assert perplexity(model, tokenizer, [text, text], context) == pytest.approx(math.exp(float(nll)), rel=1e-4)
    with pytest.raises(DataError, match="at least one text"):
        perplexity(model, tokenizer, [])
