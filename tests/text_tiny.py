"""Tiny, download-free pieces for the text-generator tests: a byte-level BPE tokenizer trained in
memory, a 2-layer Llama built from its config, and a fake token export with item texts.

Users fall into genre clusters; each user's codes and continuous vectors depend on the cluster,
and the items they rated highly are that cluster's films, so tokens carry preference.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

GENRES = ["space war robots", "love wedding paris", "ghost night blood", "cowboy horse desert"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def patch_everywhere(monkeypatch, original, replacement) -> None:
    """Replace a project function in every loaded module that imported it by name (project
    imports sit at module top, so patching only the defining module would miss the callers)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("recbole_dppmg") and module is not None:
            for attr, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attr, replacement)


def item_texts(n_items: int = 24):
    from recbole_dppmg.generation.text.warmup import TargetTexts

    return TargetTexts(
        {str(i): f"Film {i} ({1990 + i % 10}): a story of {GENRES[i % len(GENRES)]}." for i in range(1, n_items + 1)}
    )


def tiny_item_text_table(path, template=None, user_genres=None):
    """``item_text_table`` of the fake catalogue; with ``user_genres`` each user's targets start with their genres."""
    texts = item_texts()
    if user_genres is None:
        return texts
    from recbole_dppmg.generation.text.warmup import TargetTexts

    return TargetTexts(texts, lambda user, item: f"Genres: {user_genres(user)}. {texts[item]}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(item_texts(40).values()) * 3 + [
        "Reader profile: write the title, year and plot of a film this reader would love."
    ]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_lm(tokenizer, tie: bool = True, seed: int = 0, init_range: float = 0.02):
    """``init_range`` 0.3 makes the output depend on the prompt: at the usual 0.02 a random
    model's next-token distribution barely moves with the prompt embeddings (measured:
    randomising the preference rows changed log-probs by 0.003)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        initializer_range=init_range,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


class FakeTokens:
    """The part of ``PreferenceTokens`` that stage 2 reads, for ``n_users`` synthetic users."""

    modalities = ["text", "image"]

    def __init__(
        self, n_users: int = 16, levels: int = 2, codebook_size: int = 4, dim: int = 8, n_items: int = 24, seed: int = 0
    ):
        rng = np.random.default_rng(seed)
        self.levels, self.codebook_size, self.dim = levels, codebook_size, dim
        self.manifest = {"dataset": "tiny-text", "dataset_fingerprint": "fake"}
        self.folder = None
        self.codebooks = {m: rng.normal(size=(levels, codebook_size, dim)).astype(np.float32) for m in self.modalities}
        self.user_ids = ["[PAD]"] + [f"u{k}" for k in range(n_users)]
        self.item_ids = ["[PAD]"] + [str(i) for i in range(1, n_items + 1)]
        self.cluster = {f"u{k}": k % len(GENRES) for k in range(n_users)}
        self.user_codes = np.zeros((n_users + 1, 2, levels), dtype=np.int32)
        for k in range(n_users):
            c = k % len(GENRES)
            self.user_codes[k + 1] = [[c % codebook_size] + [(c + l) % codebook_size for l in range(1, levels)]] * 2
        self.user_vectors = {m: rng.normal(size=(n_users + 1, dim)).astype(np.float32) for m in self.modalities}
        self.n_items = n_items

    @property
    def users(self) -> list[str]:
        return self.user_ids[1:]

    def user_row(self, user_id) -> int:
        from recbole_dppmg.errors import DataError

        if str(user_id) not in self.user_ids[1:]:
            raise DataError(f"user '{user_id}' is not in the token export of tiny-text")
        return self.user_ids.index(str(user_id))

    def codes_for(self, user_id):
        return self.user_codes[self.user_row(user_id)]

    def token_scores(self, user_ids, relative=False):
        """Item ``i`` scores ``i`` (padding column 0) for every user, minus the mean when relative (= 0 offset)."""
        scores = np.tile(np.arange(self.n_items + 1, dtype=np.float32), (len(list(user_ids)), 1))
        return scores - scores.mean(1, keepdims=True) if relative else scores

    def history(self, user_id, split="train", min_rating=None):
        c = self.cluster[str(self.user_ids[self.user_row(user_id)])]
        items = [i for i in range(1, self.n_items + 1) if i % len(GENRES) == c]
        chosen = {"train": items[:-2], "valid": items[-2:-1], "test": items[-1:]}[split]
        return [(str(i), 5.0) for i in chosen]


def tiny_text_stage(tmp_path, monkeypatch, text_features=None):
    """The text stage's entry points wired to a tiny backbone folder, a fake export and the
    fake item texts; returns ``(tokens, config)`` with the settings of a one-minute warm-up.
    ``text_features`` (an encoder) fills the item table's ``text_feat`` column for evaluation."""
    import pandas as pd

    from recbole_dppmg.data.atomic import read_item_table
    from recbole_dppmg.data.item_content import ContentMap, ItemContent
    from recbole_dppmg.generation.text import pipeline as text_pipeline
    from recbole_dppmg.generation.text import warmup as text_warmup

    tokenizer = tiny_tokenizer()
    backbone = tmp_path / "tiny-lm"
    tiny_lm(tokenizer).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    tokens = FakeTokens(n_users=16)
    tokens.folder = tmp_path / "tokens"
    patch_everywhere(monkeypatch, text_pipeline.load_tokens, lambda *a, **k: tokens)
    patch_everywhere(monkeypatch, text_warmup.item_text_table, tiny_item_text_table)
    patch_everywhere(monkeypatch, text_pipeline.item_file, lambda dataset: tmp_path / "x.item")
    frame = pd.DataFrame({"item_id": list(item_texts())}).set_index("item_id", drop=False)
    frame["genres"] = [GENRES[int(i) % len(GENRES)] for i in frame.index]
    frame["description"] = list(item_texts().values())
    content = ItemContent("tiny", frame, ContentMap(fields={"description": "description", "tags": "genres"}))
    patch_everywhere(monkeypatch, text_pipeline.item_content, lambda dataset: content)
    if text_features is not None:
        frame["text_feat"] = list(text_features.encode(list(item_texts().values())))
    patch_everywhere(monkeypatch, read_item_table, lambda path, with_features=False: frame)
    config = {
        "backbone": str(backbone),
        "checkpoint_dir": str(tmp_path / "saved"),
        "valid_users": 2,
        "test_users": 4,
        "batch_size": 2,
        "save_steps": 1,
        "valid_pairs": 2,
        "max_target_tokens": 8,
        "progress": False,
        "num_threads": 1,
    }
    return tokens, config


def tiny_text_settings(backbone, root, split: dict) -> dict:
    """``text`` settings of a two-step warm-up of the tiny LM saved at ``backbone``."""
    return {
        "backbone": str(backbone),
        "checkpoint_dir": str(root / "saved"),
        **split,
        "max_steps": 2,
        "batch_size": 2,
        "eval_steps": 2,
        "save_steps": 2,
        "valid_pairs": 2,
        "max_target_tokens": 8,
        "progress": False,
        "num_threads": 1,
        "generate": {"max_new_tokens": 4, "batch_size": 4},
    }
