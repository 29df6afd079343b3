"""Prompts, conditioners and batched, seeded generation for the text generator.

A *conditioner* decides what a user's prompt holds and how it is embedded:

- ``TokenConditioner``: the user's discrete preference tokens (DPPMG); with a ``user_map`` it
  gives each user another user's tokens (the "shuffled" control);
- ``NoTokenConditioner``: the same instruction without any preference tokens;
- ``SoftPromptConditioner``: the PMG-style baseline. The same number of prompt positions as
  DPPMG's tokens (modalities x levels) is filled with continuous vectors computed from the
  user's continuous stage-1 vectors u_m by a learned linear map, so discrete vs continuous is
  compared at the same prompt budget.

Generation pads on the left, embeds through the conditioner and calls ``generate`` with
``inputs_embeds``; preference tokens can never be emitted (suppressed). Each batch is seeded
with ``seed + batch index``: the same users, seed and batch size give the same texts.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recbole_dppmg.errors import CheckpointError, DataError
from recbole_dppmg.generation.text.injection import ridge_map
from recbole_dppmg.tokens.format import token_string

logger = logging.getLogger(__name__)

# Short on purpose: every prompt token is paid for in each warm-up step on a CPU.
SYSTEM_PROMPT = "You recommend films."
USER_PROMPT = "Reader's taste: {tokens}\nWrite the title (year) and plot of a film this reader would love."
USER_PROMPT_NO_TOKENS = "Write the title (year) and plot of a film a reader would love."


def prompt_messages(token_text: str | None) -> list[dict]:
    """The chat for one user; ``None`` = the instruction without preference tokens."""
    user = USER_PROMPT_NO_TOKENS if token_text is None else USER_PROMPT.format(tokens=token_text)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def prompt_ids(tokenizer, token_text: str | None) -> list[int]:
    """Token ids of the chat-templated prompt, ending where the assistant's answer starts."""
    text = tokenizer.apply_chat_template(prompt_messages(token_text), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- conditioners
class NoTokenConditioner:
    """The instruction alone: what the base LM writes for anybody."""

    name = "no_tokens"

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], output_vocab: int | None = None):
        self.embed, self.output_vocab = embed, output_vocab

    def token_text(self, user: str) -> str | None:
        return None

    def inputs_embeds(self, input_ids: torch.Tensor, users: Sequence[str]) -> torch.Tensor:
        return self.embed(input_ids)


class TokenConditioner:
    """DPPMG: the user's preference tokens in the prompt (``user_map``: someone else's)."""

    name = "dppmg"

    def __init__(self, lm, vocabulary, user_map: dict[str, str] | None = None, name: str | None = None):
        self.lm, self.vocabulary, self.user_map = lm, vocabulary, user_map
        self.output_vocab = lm.first_id  # the base vocabulary: preference tokens are never predicted
        if name:
            self.name = name

    def token_text(self, user: str) -> str:
        source = self.user_map.get(user, user) if self.user_map else user
        return self.lm.prefix_text + "".join(self.vocabulary.strings_for(source, self.lm.meta.channels))

    def unconditional_text(self) -> str | None:
        """What guidance contrasts with: the shared prefix without the user's tokens (None: the
        instruction without tokens)."""
        return self.lm.prefix_text or None

    def inputs_embeds(self, input_ids: torch.Tensor, users: Sequence[str]) -> torch.Tensor:
        return self.lm.embed(input_ids)

    @contextlib.contextmanager
    def inference(self):
        """Write the token values into the embedding matrix while generating: PEFT otherwise
        rebuilds the whole matrix at every decode step (measured ~2x slower on CPU). Undone
        exactly (the original rows are copied back); not used with LoRA, whose merge is not exact."""
        merge = self.lm.meta.lora_r == 0 and hasattr(self.lm.model, "merge_adapter")
        if merge:
            self.lm.model.merge_adapter()
        try:
            yield
        finally:
            if merge:
                self.lm.model.unmerge_adapter()

    def parameters(self) -> list[nn.Parameter]:
        return self.lm.trainable_parameters()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.lm.trainable_state()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.lm.load_trainable_state(state)

    def save(self, folder: Path) -> Path:
        return self.lm.save(folder)

    def train(self, mode: bool = True) -> None:
        self.lm.projection.train(mode)


def shuffled_user_map(users: Sequence[str], seed: int) -> dict[str, str]:
    """A seeded derangement: every user gets another user's tokens."""
    users = list(users)
    if len(users) < 2:
        raise DataError("the shuffled-tokens control needs at least two users")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(users))
    shift = int(rng.integers(1, len(users)))
    return {users[order[k]]: users[order[(k + shift) % len(users)]] for k in range(len(users))}


class SoftPromptEncoder(nn.Module):
    """Continuous soft prompt: per modality, standardised u_m -> ``levels`` vectors of the LM width."""

    def __init__(
        self,
        modalities: list[str],
        levels: int,
        dim: int,
        hidden: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        target_scale: float | None = None,
    ):
        super().__init__()
        self.modalities, self.levels, self.dim, self.hidden = list(modalities), levels, dim, hidden
        self.register_buffer("mean", mean.float().clone())  # [n_modalities, dim]
        self.register_buffer("std", std.float().clone())
        self.maps = nn.ModuleList(nn.Linear(dim, levels * hidden) for _ in self.modalities)
        if target_scale is not None:
            with torch.no_grad():
                probe = torch.randn(256, dim)
                for linear in self.maps:
                    norms = linear(probe).view(256, levels, hidden).norm(dim=-1).mean().clamp_min(1e-8)
                    linear.weight.mul_(target_scale / norms)
                    linear.bias.mul_(target_scale / norms)

    def fit_to_content(self, vectors: torch.Tensor, targets: torch.Tensor, target_scale: float | None) -> None:
        """Same initialisation as DPPMG's projection (for a fair comparison): every slot of a
        user approximates the user's content vector, by a closed-form ridge fit per modality."""

        x = (vectors.float() - self.mean) / self.std  # [U, M, dim]
        with torch.no_grad():
            for k, linear in enumerate(self.maps):
                weight, _ = ridge_map(x[:, k], targets.float())  # intercept-free, as DPPMG's
                linear.weight.copy_(weight.repeat(self.levels, 1))
                linear.bias.zero_()
            if target_scale is not None:
                factor = target_scale / self(vectors).norm(dim=-1).mean().clamp_min(1e-8)
                for linear in self.maps:
                    linear.weight.mul_(factor)
                    linear.bias.mul_(factor)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[B, n_modalities, dim]`` -> ``[B, n_modalities * levels, hidden]``."""
        x = (vectors.float() - self.mean) / self.std
        parts = [linear(x[:, k]).view(len(x), self.levels, self.hidden) for k, linear in enumerate(self.maps)]
        return torch.cat(parts, dim=1)


class SoftPromptConditioner:
    """PMG-style baseline: fixed slot tokens in the prompt, their embeddings replaced per user."""

    name = "soft_prompt"
    WEIGHTS = "soft_prompt.safetensors"

    def __init__(self, model, tokenizer, tokens, encoder: SoftPromptEncoder):
        self.model, self.tokens, self.encoder = model, tokens, encoder
        self.slot_strings = [token_string(m, l, 0) for m in encoder.modalities for l in range(encoder.levels)]
        ids = tokenizer.convert_tokens_to_ids(self.slot_strings)
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise CheckpointError("the soft-prompt model's tokenizer lacks the preference-token slots")
        device = next(model.parameters()).device
        self.slot_ids = torch.tensor(ids, device=device)
        # the first added token: everything from there on is preference vocabulary, never predicted
        self.output_vocab = tokenizer.convert_tokens_to_ids(token_string(encoder.modalities[0], 0, 0))
        self.encoder.to(device)
        stacked = np.stack([tokens.user_vectors[m] for m in encoder.modalities], axis=1)  # [n_users+1, M, dim]
        self.user_vectors = torch.from_numpy(stacked.astype(np.float32)).to(device)

    @classmethod
    def build(
        cls, model, tokenizer, tokens, seed: int = 0, content: dict[str, torch.Tensor] | None = None
    ) -> "SoftPromptConditioner":
        stacked = np.stack([tokens.user_vectors[m][1:] for m in tokens.modalities], axis=1)
        mean = torch.from_numpy(stacked.mean(0)).float()
        std = torch.from_numpy(stacked.std(0)).float().clamp_min(1e-6)
        embed = model.get_input_embeddings().weight
        scale = float(embed[: embed.shape[0]].float().norm(dim=1).mean())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = SoftPromptEncoder(
                tokens.modalities, tokens.levels, tokens.dim, embed.shape[1], mean, std, target_scale=scale
            )
        if content:
            users = list(content)
            rows = [tokens.user_row(u) for u in users]
            vectors = torch.from_numpy(
                np.stack([tokens.user_vectors[m][rows] for m in tokens.modalities], axis=1).astype(np.float32)
            )
            encoder.fit_to_content(vectors, torch.stack([content[u].float().cpu() for u in users]), scale)
        return cls(model, tokenizer, tokens, encoder)

    def token_text(self, user: str) -> str:
        return "".join(self.slot_strings)

    def inputs_embeds(self, input_ids: torch.Tensor, users: Sequence[str]) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        rows = torch.tensor([self.tokens.user_row(u) for u in users], device=input_ids.device)
        soft = self.encoder(self.user_vectors[rows]).to(embeds.dtype)  # [B, S, H]
        match = (input_ids.unsqueeze(-1) == self.slot_ids).to(embeds.dtype)  # [B, T, S]
        keep = 1 - match.sum(-1, keepdim=True)
        return embeds * keep + torch.einsum("bts,bsh->bth", match, soft)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.encoder.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.encoder.load_state_dict(state)

    def train(self, mode: bool = True) -> None:
        self.encoder.train(mode)

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        meta = {
            "modalities": ",".join(self.encoder.modalities),
            "levels": str(self.encoder.levels),
            "dim": str(self.encoder.dim),
        }
        save_file(state, str(folder / self.WEIGHTS), metadata=meta)
        return folder

    @classmethod
    def load(cls, folder: Path, model, tokenizer, tokens) -> "SoftPromptConditioner":
        state, meta = load_weights(
            Path(folder) / cls.WEIGHTS,
            f"{folder} holds no soft-prompt baseline ({cls.WEIGHTS}); run the text warm-up with text.soft_prompt: true",
        )
        modalities, levels, dim = meta["modalities"].split(","), int(meta["levels"]), int(meta["dim"])
        if (modalities, levels, dim) != (list(tokens.modalities), tokens.levels, tokens.dim):
            raise CheckpointError(
                f"soft prompt in {folder} was built for {modalities} x {levels} levels, dim {dim}; the token export "
                "differs"
            )
        hidden = state["maps.0.weight"].shape[0] // levels
        encoder = SoftPromptEncoder(modalities, levels, dim, hidden, state["mean"], state["std"])
        encoder.load_state_dict(state)
        return cls(model, tokenizer, tokens, encoder)


def load_weights(path: Path, missing: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A conditioner's safetensors file: its tensors and its metadata; ``missing`` when absent."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(missing)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


# ---------------------------------------------------------------------------- generation
def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for k, s in enumerate(sequences):
        ids[k, width - len(s) :] = torch.tensor(s)
        mask[k, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    conditioner,
    users: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    seed: int = 0,
    do_sample: bool = True,
    temperature: float = 0.7,
    top_p: float = 0.9,
    suppress_ids: Sequence[int] = (),
    progress: bool = True,
    guidance: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """One generated text per user, in order.

    ``guidance`` != 1: classifier-free guidance for language models (Sanchez et al., 2023, "Stay
    on topic with classifier-free guidance"; transformers' ``guidance_scale`` with a negative
    prompt): each step samples from ``log p(x | no tokens) + g * (log p(x | tokens) - log p(x |
    no tokens))``, the unconditional branch being the same instruction without preference
    tokens (with a shared prefix, the prefix alone). Why: after the warm-up a user's own tokens
    explain their liked texts only ~0.013-0.018 nats/token better than another user's, while
    most of what the tokens learned (the catalogue's style) is shared; g > 1 amplifies what the
    user's tokens change, as ``image.guidance_scale`` does for posters. Ignored for the
    no-tokens condition.

    ``no_repeat_ngram_size`` > 0 forbids repeating any n-gram of the text (transformers'
    ``no_repeat_ngram_size``, over the generated tokens: the prompt is passed as embeddings).
    Why: unguided texts are fluent, but a sixth of them loop ("Aria: Aria: Aria ...")."""
    from tqdm.auto import tqdm

    users = [str(u) for u in users]
    if not users:
        raise DataError("no users to generate text for (empty prompt batch)")
    if batch_size < 1 or max_new_tokens < 1:
        raise DataError("text generation needs batch_size >= 1 and max_new_tokens >= 1")
    prompts = [prompt_ids(tokenizer, conditioner.token_text(u)) for u in users]
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    if suppress_ids:
        options["suppress_tokens"] = list(suppress_ids)
    if no_repeat_ngram_size:
        options["no_repeat_ngram_size"] = int(no_repeat_ngram_size)
    model.eval()
    bar = tqdm(
        range(0, len(users), batch_size), desc=f"generate ({conditioner.name})", unit="batch", disable=not progress
    )
    unconditional = None
    if guidance != 1.0 and conditioner.token_text(users[0]) is not None:
        unconditional = prompt_ids(tokenizer, getattr(conditioner, "unconditional_text", lambda: None)())
    with getattr(conditioner, "inference", contextlib.nullcontext)():
        texts = _generate_batches(
            model, tokenizer, conditioner, users, prompts, bar, batch_size, seed, options, unconditional, guidance
        )
    return texts


def _generate_batches(
    model, tokenizer, conditioner, users, prompts, bar, batch_size, seed, options, unconditional=None, guidance=1.0
) -> list[str]:
    device = next(model.parameters()).device
    texts: list[str] = []
    for index, start in enumerate(bar):
        batch_users = users[start : start + batch_size]
        ids, mask = left_pad(prompts[start : start + batch_size], tokenizer.pad_token_id, device)
        embeds = conditioner.inputs_embeds(ids, batch_users)
        torch.manual_seed(seed + index)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed + index)
        extra = {}
        if unconditional is not None:  # one instruction for every row: no padding, default positions
            uncond = torch.tensor([unconditional] * len(batch_users), device=device)
            extra = dict(
                guidance_scale=guidance,
                negative_prompt_ids=uncond,
                negative_prompt_attention_mask=torch.ones_like(uncond),
            )
        with warnings.catch_warnings():  # the prompt is embeddings: no-repeat covers the new tokens, as wanted
            warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*inputs_embeds", category=UserWarning)
            out = model.generate(inputs_embeds=embeds, attention_mask=mask, **options, **extra)
        texts += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return texts
