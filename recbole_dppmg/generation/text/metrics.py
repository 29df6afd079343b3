"""Metrics of generated text: personalization by retrieval, fluency by perplexity, diversity.

- Retrieval: the generated text is embedded with the item text encoder (MiniLM) and used as a
  query over the catalogue's text features (cosine); the user's training-split items are
  excluded; Hit@K and NDCG@K of the user's test items. A text that describes what the user
  will watch next ranks their test items high.
- Perplexity under the frozen base LM of the generated answer, given the instruction without
  preference tokens (the same context for every condition), pooled over all tokens.
- distinct-n: unique word n-grams / all word n-grams over the corpus of generated texts.
- The chance level of retrieval (a random ranking) and paired bootstrap intervals of the
  difference between two conditions over the same users: differences of a few hundredths in
  Hit@10 on 200 users are within noise, and the tables say so.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch

from recbole_dppmg.errors import DataError


def retrieval_metrics(
    queries: np.ndarray,
    items: np.ndarray,
    targets: Sequence[Sequence[int]],
    exclude: Sequence[Sequence[int]],
    k: int = 10,
) -> dict:
    """Hit@k and NDCG@k per query (row of ``queries``) over the ``items`` matrix rows.

    ``targets[u]`` / ``exclude[u]`` are item row indices; users without targets are skipped.
    """
    queries = np.asarray(queries, dtype=np.float32)
    items = np.asarray(items, dtype=np.float32)
    if len(queries) != len(targets) or len(targets) != len(exclude):
        raise DataError("retrieval needs one target list and one exclusion list per query")
    qn = queries / np.clip(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12, None)
    inorm = items / np.clip(np.linalg.norm(items, axis=1, keepdims=True), 1e-12, None)
    scores = qn @ inorm.T
    hits, ndcgs = [], []
    for u in range(len(queries)):
        target = set(int(t) for t in targets[u]) - set(int(e) for e in exclude[u])
        if not target:
            continue
        row = scores[u].copy()
        row[list(exclude[u])] = -np.inf
        top = np.argsort(-row, kind="stable")[:k]
        gains = [1.0 / math.log2(rank + 2) for rank, item in enumerate(top) if int(item) in target]
        ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(target), k)))
        hits.append(1.0 if gains else 0.0)
        ndcgs.append(sum(gains) / ideal)
    if not hits:
        raise DataError("no evaluated user has a test item outside their training items")
    return {
        f"hit@{k}": float(np.mean(hits)),
        f"ndcg@{k}": float(np.mean(ndcgs)),
        "users": len(hits),
        "per_user_hit": hits,
        "per_user_ndcg": ndcgs,
    }


def is_degenerate(text: str, n: int = 4, repeats: int = 3) -> bool:
    """A word ``n``-gram occurs ``repeats`` or more times ("Aria: Aria: Aria: ..."), words lower-cased
    and stripped of punctuation."""
    words = [w for w in (re.sub(r"[^\w]", "", w) for w in text.lower().split()) if w]
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= repeats:
            return True
    return False


def degenerate_share(texts: Sequence[str]) -> float:
    """Share of texts that repeat a 4-gram 3 or more times (0 for no texts)."""
    return float(np.mean([is_degenerate(t) for t in texts])) if texts else 0.0


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Corpus-level distinct-n over lower-cased whitespace words (0 when there is no n-gram)."""
    grams = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], context_ids: Sequence[int] = (), batch_size: int = 16) -> float:
    """exp(mean NLL) of the texts' tokens under ``model``, each text after ``context_ids``."""
    if not texts:
        raise DataError("perplexity needs at least one text")
    device = next(model.parameters()).device
    context = list(context_ids) or (
        [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [tokenizer.eos_token_id]
    )
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start : start + batch_size]]
        encoded = [e for e in encoded if e]
        if not encoded:
            continue
        width = len(context) + max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for k, e in enumerate(encoded):
            seq = context + e
            ids[k, : len(seq)] = torch.tensor(seq)
            labels[k, len(context) : len(seq)] = torch.tensor(e)
            mask[k, : len(seq)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count += int((target != -100).sum())
    if count == 0:
        raise DataError("perplexity: every text is empty")
    return math.exp(total / count)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired users and its 95% percentile interval from resampling users."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or len(diff) == 0:
        raise DataError("paired bootstrap needs two equally long, non-empty lists of per-user values")
    means = diff[np.random.default_rng(seed).integers(0, len(diff), (resamples, len(diff)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": float(diff.mean()), "low": float(low), "high": float(high)}
