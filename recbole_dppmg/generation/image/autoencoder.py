"""The pretrained tiny autoencoder (TAEF2, ``../shared/models/taef2/``) that maps posters to
a 32-channel latent at 8x downsampling, so the CPU diffusion model works on 16x24 latents
instead of 128x192 pixels.

diffusers' ``AutoencoderTiny`` has the same conv/ReLU blocks but not TAEF2's group-norm
"pool" branch in the blocks next to the latent, so its keys cannot hold these weights; this
module reproduces the TAESD-family layout (``nn.Sequential`` indices = state-dict keys).
Images go in and come out in [-1, 1]; the weights themselves work on [0, 1].

``PixelCodec`` is the identity stand-in for pixel-space diffusion (and for tests).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.paths import shared_dir

logger = logging.getLogger(__name__)

ENCODER_FILE, DECODER_FILE = "taef2_encoder.pth", "taef2_decoder.pth"


def default_autoencoder_dir() -> Path:
    return shared_dir() / "models" / "taef2"


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    """Soft clamp of the decoder input to about [-3, 3], as the weights were trained with."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, channels: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(), _conv(channels, channels)
        )
        self.pool = None
        if pool:  # the group-norm mixing branch of the blocks beside the latent
            wide = channels * 4
            self.pool = nn.Sequential(
                nn.Conv2d(channels, wide, 1, bias=False),
                nn.GroupNorm(4, wide),
                nn.ReLU(),
                nn.Conv2d(wide, channels, 1, bias=False),
            )
        self.fuse = nn.ReLU()

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def build_encoder(latent_channels: int = 32, width: int = 64) -> nn.Sequential:
    c = width
    return nn.Sequential(
        _conv(3, c),
        _Block(c),
        _conv(c, c, stride=2, bias=False),
        _Block(c),
        _Block(c),
        _Block(c),
        _conv(c, c, stride=2, bias=False),
        _Block(c),
        _Block(c),
        _Block(c),
        _conv(c, c, stride=2, bias=False),
        _Block(c, True),
        _Block(c, True),
        _Block(c, True),
        _conv(c, latent_channels),
    )


def build_decoder(latent_channels: int = 32, width: int = 64) -> nn.Sequential:
    c = width
    return nn.Sequential(
        _Clamp(),
        _conv(latent_channels, c),
        nn.ReLU(),
        _Block(c, True),
        _Block(c, True),
        _Block(c, True),
        nn.Upsample(scale_factor=2),
        _conv(c, c, bias=False),
        _Block(c),
        _Block(c),
        _Block(c),
        nn.Upsample(scale_factor=2),
        _conv(c, c, bias=False),
        _Block(c),
        _Block(c),
        _Block(c),
        nn.Upsample(scale_factor=2),
        _conv(c, c, bias=False),
        _Block(c),
        _conv(c, 3),
    )


class TinyAutoencoder(nn.Module):
    """TAEF2 encoder + decoder; ``encode``/``decode`` speak [-1, 1] images."""

    downsample = 8

    def __init__(self, latent_channels: int = 32, width: int = 64):
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = build_encoder(latent_channels, width)
        self.decoder = build_decoder(latent_channels, width)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder((images + 1) / 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).clamp(0, 1) * 2 - 1


class PixelCodec(nn.Module):
    """Identity "autoencoder" for diffusion directly in pixel space."""

    downsample = 1
    latent_channels = 3

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


def load_autoencoder(folder: str | Path | None = None) -> TinyAutoencoder:
    """TAEF2 from ``folder`` (default ``shared_dir()/models/taef2``), float32, eval mode."""
    folder = Path(folder) if folder else default_autoencoder_dir()
    paths = [folder / ENCODER_FILE, folder / DECODER_FILE]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"autoencoder weights missing in {folder}: {', '.join(missing)} (set image.autoencoder_path, or "
            "image.space: pixel)"
        )
    model = TinyAutoencoder()
    for part, path in zip((model.encoder, model.decoder), paths):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a corrupt or non-tensor file
            raise CheckpointError(f"cannot read autoencoder weights {path}: {type(exc).__name__}: {exc}") from None
        try:
            part.load_state_dict({k: v.float() for k, v in state.items()})
        except (RuntimeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not hold TAEF2 {path.stem.split('_')[-1]} weights: {first}") from None
    logger.info("loaded autoencoder from %s", folder)
    return model.eval().requires_grad_(False)
