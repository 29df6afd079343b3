"""Device choice by config (``device: auto | cpu | cuda | cuda:1``), one rule for every stage."""

from __future__ import annotations

import torch

from recbole_dppmg.errors import ConfigError


def resolve_device(device: str | None = "auto", key: str = "device") -> torch.device:
    """``auto`` (or None): CUDA when visible, else CPU; an explicit CUDA device that is not
    visible is a clear error naming the config ``key`` rather than a late CUDA exception."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {device} but no CUDA device is visible")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{key} is {device!r}, not a device (auto, cpu, cuda, cuda:<n>)") from None


def module_device(module) -> torch.device:
    """Where a module's weights live (CPU for a module without any, e.g. the pixel codec)."""
    if isinstance(module, torch.nn.Module):
        for tensor in [*module.parameters(), *module.buffers()]:
            return tensor.device
    return torch.device("cpu")
