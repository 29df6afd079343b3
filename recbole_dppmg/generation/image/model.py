"""The default image generator: a small conditional diffusion model (diffusers
``UNet2DConditionModel`` + a diffusers scheduler) whose cross-attention reads a user's
preference tokens.

Token conditioning: the embedding of each token = ``CodebookProjection`` of its stage-1
codebook vector (so tokens near in preference space start near in the UNet's conditioning
space) + a learned embedding of its slot (modality x level). A learned "null" sequence of the
same length stands for "no preference tokens": it is what classifier-free guidance contrasts
with and what the no-token baseline uses.

``conditioning`` (``image.conditioning``) adds real posters to what cross-attention reads
(``context.py``): ``retrieval`` = the tokens + the posters their image channel retrieves,
``history`` = the user's own top-rated training posters instead of the tokens.

The model works on normalised latents: ``(latent - mean) / std`` per channel, the statistics
measured once on the training posters and kept as buffers (saved with the weights).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from recbole_dppmg.devices import module_device
from recbole_dppmg.errors import ConfigError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import CodebookProjection
from recbole_dppmg.generation.image.context import RETRIEVAL_MODALITY, PosterContext

logger = logging.getLogger(__name__)

# The keys of the ``image:`` section of properties/generation.yaml that shape the network (in the
# order checkpoints record them).
MODEL_KEYS = (
    "space",
    "height",
    "width",
    "unet_channels",
    "layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
    "norm_num_groups",
    "train_timesteps",
    "beta_schedule",
    "prediction_type",
    "token_channels",
    "conditioning",
    "retrieval_k",
)


def model_config(config: dict | None = None) -> dict:
    """The network-shaping keys of ``config`` over the ``image:`` defaults, validated."""
    settings = load_settings("image", {k: v for k, v in (config or {}).items() if k in MODEL_KEYS})
    return {k: settings[k] for k in MODEL_KEYS}


def sdedit_skip(steps: int, strength: float) -> int:
    """Sampling steps an SDEdit start skips: ``strength`` 1 = none (pure noise); at least one step
    is always run."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"image.sdedit_strength must be in (0, 1], got {strength}")
    return min(steps - 1, round(steps * (1.0 - strength)))


class GuidedSampling:
    """Seeded sampling with classifier-free guidance, for any poster model that gives
    ``condition`` / ``unconditional`` sequences, a ``train_scheduler`` and ``forward(noisy, t, cond)``
    (the small model here, a Stable Diffusion pipeline in ``sd.py``)."""

    def sample_scheduler(self, sampler: str = "dpm"):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        base = self.train_scheduler().config
        if sampler == "dpm":
            return DPMSolverMultistepScheduler.from_config(base)
        if sampler == "ddim":  # latents are standardised (std 1): clipping x0 to [-1, 1] would cut their tails
            return DDIMScheduler.from_config(base, clip_sample=False)
        raise ConfigError(f"image.sampler must be 'dpm' or 'ddim', got {sampler!r}")

    @torch.no_grad()
    def sample(
        self,
        positions: torch.Tensor,
        noise: torch.Tensor,
        steps: int = 20,
        guidance: float = 1.0,
        sampler: str = "dpm",
        drop: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Normalised latents ``[B, C, h, w]`` from initial ``noise`` (which fixes the seed);
        ``context``: see :meth:`condition`. With ``init`` (normalised latents ``[B, C, h, w]``)
        and ``strength`` < 1 the sampler starts SDEdit-style (Meng et al. 2022): ``init`` noised
        to the schedule's point ``strength``, then only the last ``strength`` of the steps."""
        scheduler = self.sample_scheduler(sampler)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        cond = self.condition(positions, drop, context)
        use_cfg = guidance != 1.0
        if use_cfg:
            cond = torch.cat([self.unconditional(len(cond)), cond])
        x = noise.to(module_device(self)) * scheduler.init_noise_sigma
        if strength < 1.0:
            if init is None:
                raise ConfigError("image.sdedit_strength < 1 needs an initial poster latent per row")
            skip = sdedit_skip(steps, strength) * scheduler.order
            timesteps = timesteps[skip:]
            if hasattr(scheduler, "set_begin_index"):  # multistep solvers count their steps from here
                scheduler.set_begin_index(skip)
            x = scheduler.add_noise(init.to(x), x, timesteps[:1].expand(len(x)))
        for t in timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]) if use_cfg else x, t)
            out = self(model_in, t.expand(model_in.shape[0]), cond)
            if use_cfg:
                uncond, conditioned = out.chunk(2)
                out = uncond + guidance * (conditioned - uncond)
            x = scheduler.step(out, t, x).prev_sample
        return x


class PosterDiffusion(GuidedSampling, nn.Module):
    """Conditional UNet + token conditioning; ``n_slots`` = tokens per user."""

    def __init__(
        self,
        config: dict,
        codebook_vectors: torch.Tensor,
        n_slots: int,
        latent_channels: int,
        slot_modalities: list[str] | None = None,
        context: PosterContext | None = None,
    ):
        """``slot_modalities``: the modality of each token slot; with ``token_channels`` set, the
        UNet attends only to the slots of those modalities (the routing ablation). ``context``:
        the catalogue posters of ``retrieval`` / ``history`` conditioning."""
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = model_config(config)
        c = self.config
        factor = 8 if c["space"] == "latent" else 1
        channels = list(c["unet_channels"])
        self.latent_channels, self.n_slots = latent_channels, n_slots
        self.latent_size = (c["height"] // factor, c["width"] // factor)
        self.unet = UNet2DConditionModel(
            sample_size=self.latent_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            block_out_channels=channels,
            layers_per_block=c["layers_per_block"],
            down_block_types=["CrossAttnDownBlock2D"] * (len(channels) - 1) + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(channels) - 1),
            cross_attention_dim=c["cross_attention_dim"],
            attention_head_dim=c["attention_head_dim"],
            norm_num_groups=c["norm_num_groups"],
        )
        dim = c["cross_attention_dim"]
        self.projection = CodebookProjection(codebook_vectors, dim, target_scale=1.0)
        self.slot = nn.Parameter(torch.randn(n_slots, dim) * 0.02)
        self.null = nn.Parameter(torch.randn(n_slots, dim) * 0.02)
        channels = c.get("token_channels")
        if channels is not None and (slot_modalities is None or len(slot_modalities) != n_slots):
            raise ConfigError("image.token_channels needs the modality of every token slot")
        if channels is not None and not set(channels) & set(slot_modalities):
            raise ConfigError(
                f"image.token_channels {channels!r} names none of the export's {sorted(set(slot_modalities))}"
            )
        # not a buffer: checkpoints keep their shape; the routing is part of the recorded model config
        self.routed = None if channels is None else torch.tensor([m in channels for m in slot_modalities])
        self.conditioning = c["conditioning"]
        if self.conditioning != "tokens" and context is None:
            raise ConfigError(f"image.conditioning={self.conditioning} needs the catalogue posters (a PosterContext)")
        if self.conditioning == "tokens" and context is not None:
            raise ConfigError("image.conditioning=tokens reads no posters; pass no PosterContext")
        if self.conditioning == "retrieval" and RETRIEVAL_MODALITY not in (slot_modalities or []):
            raise ConfigError(
                f"image.conditioning=retrieval needs an {RETRIEVAL_MODALITY} channel in the token export "
                f"(its slots: {sorted(set(slot_modalities or []))})"
            )
        retrieves = self.conditioning == "retrieval"
        if context is not None and (context.k != c["retrieval_k"] or context.retrieves != retrieves):
            raise ConfigError(f"the poster context does not fit image.conditioning={self.conditioning}, retrieval_k")
        self.context = context
        # not a buffer either: which slots hold the image channel, whose decoded vector retrieves
        self.image_slots = torch.tensor([m == RETRIEVAL_MODALITY for m in slot_modalities or []])
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    # ------------------------------------------------------------------ conditioning
    def condition(
        self,
        positions: torch.Tensor,
        drop: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        drop_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, L, dim]`` from token positions ``[B, n_slots]``; rows where ``drop`` is True (or
        where every position is -1, for a history model every context row) get the null
        sequence. ``context`` ``[B, k]``: bank rows of the context posters (a history model needs
        them; a retrieval model retrieves from ``positions`` when they are None). Rows where
        ``drop_context`` is True keep their tokens but read the null posters
        (``image.context_dropout``: training rows the UNet can only draw from the tokens)."""
        if positions.shape[1] != self.n_slots:
            raise ConfigError(f"expected {self.n_slots} preference tokens per user, got {positions.shape[1]}")
        positions = positions.to(self.slot.device)
        empty = (positions < 0).all(dim=1)
        parts = []
        if self.conditioning != "history":
            tokens = self.projection(positions.clamp_min(0)) + self.slot
            parts.append(tokens if self.routed is None else tokens[:, self.routed.to(tokens.device)])
        if self.context is not None:
            if context is None:
                if self.conditioning == "history":
                    raise ConfigError(
                        "a history image generator needs each user's history posters (generate.user_context)"
                    )
                context = self.retrieve(positions)
            context = context.to(self.slot.device)
            if self.conditioning == "history":
                empty = (context < 0).all(dim=1)
            posters = self.context(context)
            if drop_context is not None:
                null = self.context.null.expand_as(posters)
                posters = torch.where(drop_context.to(posters.device)[:, None, None], null, posters)
            parts.append(posters)
        drop = empty if drop is None else drop | empty
        sequence = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return torch.where(drop[:, None, None], self.unconditional(len(sequence)), sequence)

    def unconditional(self, batch: int) -> torch.Tensor:
        """The null sequence ``[batch, L, dim]``: no tokens and no posters (guidance contrasts with it)."""
        parts = []
        if self.conditioning != "history":
            parts.append(self.null if self.routed is None else self.null[self.routed.to(self.null.device)])
        if self.context is not None:
            parts.append(self.context.null)
        null = parts[0] if len(parts) == 1 else torch.cat(parts)
        return null.expand(batch, *null.shape)

    def retrieve(self, positions: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Bank rows ``[B, count]`` (default ``retrieval_k``) of the posters the users' image-channel
        tokens point to: the sum of their codebook vectors (the decoded preference vector) scored
        against the catalogue (``PosterContext.retrieve``)."""
        if self.context is None or not self.context.retrieves:
            raise ConfigError(f"image.conditioning={self.conditioning} retrieves nothing")
        slots = self.image_slots.to(positions.device)
        decoded = self.projection.codebook_vectors[positions.clamp_min(0)[:, slots]].sum(dim=1)
        return self.context.retrieve(decoded, count)

    @property
    def has_start_poster(self) -> bool:
        """Whether SDEdit applies: a generator with a poster context starts from its first poster."""
        return self.context is not None

    def init_latents(
        self, positions: torch.Tensor, context: torch.Tensor | None = None, blend: int = 1
    ) -> torch.Tensor:
        """SDEdit starting points ``[B, C, h, w]`` (normalised): the mean of each row's first ``blend``
        context posters (the best retrieved ones, or the history's top-rated; 1 = the first alone).
        Why a blend: a start that is no single catalogue poster cannot be copied back, while its
        posters still come from the user's tokens. Rows with none (no tokens, no history) start from
        the catalogue's mean latent (zeros), on the same shortened schedule as the others."""
        if self.context is None:
            raise ConfigError(
                "image.sdedit_strength < 1 starts from a context poster: it needs a generator trained with "
                f"image.conditioning=retrieval or history, not {self.conditioning}"
            )
        if not 1 <= blend <= self.context.k:
            raise ConfigError(f"image.sdedit_blend must be in [1, image.retrieval_k={self.context.k}], got {blend}")
        positions = positions.to(self.slot.device)
        if context is None:
            if self.conditioning == "history":
                raise ConfigError("a history image generator needs each user's history posters (generate.user_context)")
            rows = self.retrieve(positions)[:, :blend]
            rows = rows.masked_fill((positions < 0).all(dim=1, keepdim=True), -1)
        else:
            rows = context[:, :blend].to(self.slot.device)
        bank = self.normalise(
            self.context.bank[rows.clamp_min(0)].float().reshape(*rows.shape, self.latent_channels, *self.latent_size)
        )
        present = (rows >= 0).float()[..., None, None, None]
        return (bank * present).sum(1) / present.sum(1).clamp_min(1.0)

    def token_parameters(self, train_null: bool = False) -> dict[str, nn.Parameter]:
        """The token conditioning (what image RL moves): projection, slot (and null) embeddings."""
        named = {f"projection.linear.{n}": p for n, p in self.projection.linear.named_parameters()}
        named["slot"] = self.slot
        if train_null:
            named["null"] = self.null
        return named

    def weights(self) -> dict[str, torch.Tensor]:
        """What a run folder saves (``model.safetensors``): every weight and buffer."""
        return self.state_dict()

    def set_latent_stats(self, latents: torch.Tensor) -> None:
        dims = [0, 2, 3]
        self.latent_mean.copy_(latents.mean(dim=dims))
        self.latent_std.copy_(latents.std(dim=dims).clamp_min(1e-4))

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.latent_std[:, None, None] + self.latent_mean[:, None, None]

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=cond).sample

    # ------------------------------------------------------------------ schedulers
    def train_scheduler(self):
        from diffusers import DDPMScheduler

        c = self.config
        return DDPMScheduler(
            num_train_timesteps=c["train_timesteps"],
            beta_schedule=c["beta_schedule"],
            prediction_type=c["prediction_type"],
        )


class EMA:
    """Exponential moving average of a model's parameters (sampled from; better posters
    after short training than the raw weights)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
