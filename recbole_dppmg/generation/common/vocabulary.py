"""The preference-token vocabulary that stage 2 adds to a generator, and the learned
projection that initialises the new token embeddings from the stage-1 codebooks.

Shared by the text generator (tokens added to the LM's tokenizer) and the image generator
(tokens as cross-attention conditioning, or added to a Stable Diffusion text encoder).
Stage 2 reads stage 1 only through ``PreferenceTokens`` (the token export).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.tokens import PreferenceTokens
from recbole_dppmg.tokens.format import all_token_strings


class PreferenceVocabulary:
    """All tokens of an export in a fixed order (modality, level, code) with their codebook
    vectors; ``ids_for(user)`` gives a user's tokens as positions in this order."""

    def __init__(self, tokens: PreferenceTokens):
        self.tokens = tokens
        self.modalities = list(tokens.modalities)
        self.levels, self.codebook_size, self.dim = tokens.levels, tokens.codebook_size, tokens.dim
        self.strings: list[str] = []
        vectors = []
        for m in self.modalities:
            self.strings += all_token_strings(m, self.levels, self.codebook_size)
            vectors.append(tokens.codebooks[m].reshape(-1, self.dim))
        self.vectors = torch.from_numpy(np.concatenate(vectors).astype(np.float32))
        self.position = {s: k for k, s in enumerate(self.strings)}

    def __len__(self) -> int:
        return len(self.strings)

    def check_compatible(self, levels: int, codebook_size: int, modalities: list[str]) -> None:
        """A generator trained on one export can only read exports of the same shape."""
        if (levels, codebook_size, list(modalities)) != (self.levels, self.codebook_size, self.modalities):
            raise CheckpointError(
                f"token export has {self.levels} levels x {self.codebook_size} codes for {self.modalities}, "
                f"the generator was built for {levels} x {codebook_size} for {list(modalities)}"
            )

    def offset(self, modality: str, level: int, code: int) -> int:
        return (self.modalities.index(modality) * self.levels + level) * self.codebook_size + int(code)

    def routed(self, channels: list[str] | None) -> list[str]:
        """The modalities a generator reads (``token_channels``; None = all), checked."""
        if channels is None:
            return list(self.modalities)
        unknown = [c for c in channels if c not in self.modalities]
        if unknown or not channels:
            raise ConfigError(
                f"token_channels {channels!r}: give a non-empty subset of the export's modalities {self.modalities}"
            )
        return [m for m in self.modalities if m in channels]

    def ids_for_codes(self, codes, channels: list[str] | None = None) -> list[int]:
        """Positions of a ``[n_modalities, levels]`` code array, modality-major; ``channels``
        keeps only those modalities' tokens (the routing ablation)."""
        codes = np.asarray(codes)
        keep = set(self.routed(channels))
        return [
            self.offset(m, l, codes[k, l])
            for k, m in enumerate(self.modalities)
            if m in keep
            for l in range(self.levels)
        ]

    def ids_for(self, user_id, channels: list[str] | None = None) -> list[int]:
        """The user's exported tokens as positions (modality-major, then level)."""
        return self.ids_for_codes(self.tokens.codes_for(user_id), channels)

    def strings_for(self, user_id, channels: list[str] | None = None) -> list[str]:
        return [self.strings[k] for k in self.ids_for(user_id, channels)]

    def slot_modalities(self) -> list[str]:
        """The modality of each of a user's token slots, in ``ids_for`` order (all channels)."""
        return [m for m in self.modalities for _ in range(self.levels)]


class CodebookProjection(nn.Module):
    """Token embeddings = a learned linear map of the (frozen) stage-1 codebook vectors, so
    that tokens close in preference space start close in the generator's embedding space.

    With ``codes_per_slot``, a learned vector per slot (one modality's level: that many
    consecutive codes) is added to every token of the slot. Why: every user's prompt has one
    token in each slot, so that vector is the part of the prompt all users share (what a
    population prompt learns, from every batch), and the codes are left with what differs
    between users; without it the shared part is learned through the sparse per-code deltas.
    It starts at zero, so the start is the plain projection."""

    def __init__(
        self,
        codebook_vectors: torch.Tensor,
        out_dim: int,
        target_scale: float | None = None,
        codes_per_slot: int | None = None,
    ):
        super().__init__()
        self.register_buffer("codebook_vectors", codebook_vectors.float().clone())
        self.linear = nn.Linear(codebook_vectors.shape[1], out_dim)
        with torch.no_grad():
            nn.init.orthogonal_(self.linear.weight)
            self.linear.bias.zero_()
            if target_scale is not None:  # match the norm of the generator's own embeddings
                norms = self.linear(self.codebook_vectors).norm(dim=1).mean().clamp_min(1e-8)
                self.linear.weight.mul_(target_scale / norms)
        self.codes_per_slot = codes_per_slot
        if codes_per_slot is not None:
            if codes_per_slot < 1 or len(codebook_vectors) % codes_per_slot:
                raise ConfigError(
                    f"{len(codebook_vectors)} codebook vectors do not split into slots of {codes_per_slot} codes"
                )
            self.slot_vectors = nn.Parameter(torch.zeros(len(codebook_vectors) // codes_per_slot, out_dim))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "CodebookProjection":
        """Rebuilt from a saved ``state_dict`` (with or without slot vectors)."""
        vectors = state["codebook_vectors"]
        slots = state.get("slot_vectors")
        per_slot = None if slots is None else len(vectors) // len(slots)
        projection = cls(vectors, state["linear.weight"].shape[0], codes_per_slot=per_slot)
        projection.load_state_dict({k: v for k, v in state.items() if k != "anchor"})
        return projection

    def forward(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        out = self.linear(self.codebook_vectors if positions is None else self.codebook_vectors[positions])
        if self.codes_per_slot is None:
            return out
        slots = self.slot_vectors.repeat_interleave(self.codes_per_slot, dim=0)
        return out + (slots if positions is None else slots[positions])
