"""Text baselines trained like DPPMG but given no preference tokens (docs/evaluation.md#protocol).

- *population prompt*: the prompt slots of the soft prompt, filled with one set of learned
  vectors shared by every user, trained on the same pairs, steps and target format. It is what
  the trained format alone buys, the matched baseline DPPMG has to beat (the untrained base LM,
  "no tokens", never saw the target format, so beating it mixes format with personalization).
- *history prompt*: the population prompt plus the user's best-rated training items written
  into the instruction (title, year, first tags; the LaMP / PMG-style baseline), trained the
  same way. What a user's own history says when the LM reads it directly.
- *token items* (a DPPMG variant, not a baseline): the population prompt plus the titles of the
  catalogue items the user's decoded tokens score highest relative to the average user, i.e. the
  tokens used as retrieval keys; the tokens still decide what the LM reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.generation.text.generate import load_weights
from recbole_dppmg.tokens.format import token_string

HISTORY_TAGS = 2


class HistoryText:
    """``user -> "Star Wars (1977; Action, Sci-Fi); ..."``: the user's best-rated training items."""

    def __init__(self, tokens, content, items: int):
        self.tokens, self.content, self.items = tokens, content, items

    def __call__(self, user: str) -> str:
        return _item_line(self.content, [i for i, _ in self.tokens.history(user, "train")][: self.items])


def _item_line(content, items) -> str:
    parts = []
    for item in items:
        year, tags = content.year(item), content.tags(item)[:HISTORY_TAGS]
        detail = "; ".join(p for p in (year, ", ".join(tags)) if p)
        parts.append(f"{content.title(item)} ({detail})" if detail else content.title(item))
    return "; ".join(parts)


class TokenItemsText:
    """``user -> "Alien (1979; Sci-Fi); ..."``: the items the user's decoded tokens point to."""

    def __init__(self, tokens, content, items: int):
        self.tokens, self.content, self.items = tokens, content, items
        known = set(content.item_ids)
        self._allowed = np.array([i in known for i in tokens.item_ids])

    def __call__(self, user: str) -> str:
        scores = np.where(self._allowed, self.tokens.token_scores([user], relative=True)[0], -np.inf)
        top = [self.tokens.item_ids[k] for k in np.argsort(-scores, kind="stable")[: self.items]]
        return _item_line(self.content, top)


# the trained prompt conditions: name -> (what the prompt writes per user, or None; its label)
PROMPTS = {
    "population": (None, ""),
    "history": (HistoryText, "Liked"),
    "token_items": (TokenItemsText, "Tokens point to"),
}


def prompt_condition(name: str, model, tokenizer, tokens, content, items: int, folder=None, seed=0):
    """The ``population`` / ``history`` / ``token_items`` prompt conditioner: loaded from ``folder``
    when given, else built."""
    source, label = PROMPTS[name]
    text = source(tokens, content, items) if source is not None else None
    if folder is not None:
        return PopulationPromptConditioner.load(folder, model, tokenizer, text, name, label or "Liked")
    return PopulationPromptConditioner.build(model, tokenizer, tokens, seed, text, name, label or "Liked")


class PopulationPromptConditioner:
    """Shared learned vectors in the prompt slots; with ``history``, the user's liked items follow."""

    WEIGHTS = "population_prompt.safetensors"

    def __init__(
        self,
        model,
        tokenizer,
        slot_strings: list[str],
        vectors: torch.Tensor,
        history: Callable[[str], str] | None = None,
        name: str | None = None,
        label: str = "Liked",
    ):
        self.model, self.slot_strings, self.history, self.label = model, slot_strings, history, label
        self.name = name or ("history" if history is not None else "population")
        ids = tokenizer.convert_tokens_to_ids(slot_strings)
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise CheckpointError("the population prompt's tokenizer lacks the preference-token slots")
        device = next(model.parameters()).device
        self.slot_ids = torch.tensor(ids, device=device)
        self.output_vocab = min(ids)  # the slots and everything after are never predicted
        self.vectors = nn.Parameter(vectors.float().to(device))

    @classmethod
    def build(
        cls,
        model,
        tokenizer,
        tokens,
        seed: int = 0,
        history: Callable[[str], str] | None = None,
        name: str | None = None,
        label: str = "Liked",
    ) -> "PopulationPromptConditioner":
        """Slots of every modality and level, started at seeded random vectors of the embeddings'
        norm. Not at the users' mean content vector: that one vector repeated in every slot starts
        SmolLM2 at a target NLL of 11.8 nats/token against 4.2 for random vectors (4 users'
        targets, measured), and 12 quick-profile steps left it at 9.8."""
        slots = [token_string(m, level, 0) for m in tokens.modalities for level in range(tokens.levels)]
        embed = model.get_input_embeddings().weight
        generator = torch.Generator().manual_seed(seed)
        start = torch.randn(len(slots), embed.shape[1], generator=generator)
        start = start / start.norm(dim=1, keepdim=True) * float(embed.float().norm(dim=1).mean())
        return cls(model, tokenizer, slots, start, history, name, label)

    def token_text(self, user: str) -> str:
        slots = "".join(self.slot_strings)
        return f"{slots}\n{self.label}: {self.history(user)}" if self.history is not None else slots

    def inputs_embeds(self, input_ids: torch.Tensor, users: Sequence[str]) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        match = (input_ids.unsqueeze(-1) == self.slot_ids).to(embeds.dtype)  # [B, T, S]
        keep = 1 - match.sum(-1, keepdim=True)
        return embeds * keep + torch.einsum("bts,sh->bth", match, self.vectors.to(embeds.dtype))

    def parameters(self) -> list[nn.Parameter]:
        return [self.vectors]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.vectors.detach()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vectors.copy_(state["vectors"].to(self.vectors.device))

    def train(self, mode: bool = True) -> None:
        pass  # no dropout or normalisation layers

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"slots": ",".join(self.slot_strings), "history": str(self.history is not None)}
        save_file({"vectors": self.vectors.detach().cpu().contiguous()}, str(folder / self.WEIGHTS), metadata=meta)
        return folder

    @classmethod
    def load(
        cls,
        folder: Path,
        model,
        tokenizer,
        history: Callable[[str], str] | None = None,
        name: str | None = None,
        label: str = "Liked",
    ) -> "PopulationPromptConditioner":
        state, meta = load_weights(
            Path(folder) / cls.WEIGHTS,
            f"{folder} holds no trained prompt ({cls.WEIGHTS}); run the text warm-up with "
            f"text.{name or 'population'}_prompt: true",
        )
        return cls(model, tokenizer, meta["slots"].split(","), state["vectors"], history, name, label)
