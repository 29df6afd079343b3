"""The token export format: the contract between stage 1 and stage 2.

``saved/<dataset>/<run>/tokens/`` holds:

- ``manifest.json``  format version, dataset and its fingerprint, checkpoint, modalities,
  levels, codebook size, vector dimension, token pattern, metrics, file list;
- ``codebooks.safetensors``  per modality ``[levels, codebook_size, dim]``;
- ``user_codes.npy``  ``[n_users, n_modalities, levels]`` int32, row = RecBole's internal user index;
- ``user_vectors.safetensors``  per modality the continuous user vectors ``[n_users, dim]``;
- ``item_vectors.safetensors``  per modality the propagated (``<m>``) and layer-0 (``<m>.ego``)
  item vectors ``[n_items, dim]``;
- ``foldin_quality.json``  cross-fitted fold-in agreement and validation ranking quality;
- ``foldin.safetensors``  per modality a ridge map from the mean of a user's item vectors to
  the user's vector (weight ``[dim, dim]``, bias ``[dim]``);
- ``item_encoders.safetensors``  per feature modality the feature scaling (``<m>.feature_mean``,
  ``<m>.feature_std``) and the MLP (``<m>.linear<k>.weight|bias``, LeakyReLU between layers)
  that map an item feature vector into the layer-0 item space, so new content (a generated
  text or poster) can be placed like an item;
- ``ids.json``  original user and item ids in internal-index order;
- ``interactions.npz``  the stage-1 split: per split (train / valid / test) a CSR user -> items
  (``<split>_indptr``, ``<split>_indices``, ``<split>_values`` = rating, or 1.0 without ratings);
- ``user_tokens.tsv``  RecBole atomic file ``user_id:token txt_tokens:token_seq img_tokens:token_seq``;
- ``index_<modality>_L<level>.faiss``  a FAISS index over each level's codebook;
- ``codes.md`` + ``code_usage.png``  what each code means in the data.

The manifest is written last and the folder appears by one rename, so a folder that loads
is always complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from recbole_dppmg.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_PATTERN = "<{prefix}_{level}_{code}>"
MODALITY_PREFIX = {"text": "txt", "image": "img", "id": "id"}


def modality_prefix(modality: str) -> str:
    return MODALITY_PREFIX.get(modality, modality[:3])


def token_string(modality: str, level: int, code: int) -> str:
    """``<txt_0_17>`` for text, level 0, code 17."""
    return TOKEN_PATTERN.format(prefix=modality_prefix(modality), level=level, code=code)


def all_token_strings(modality: str, levels: int, codebook_size: int) -> list[str]:
    """Every token of one modality, level-major: the vocabulary stage 2 adds."""
    return [token_string(modality, l, c) for l in range(levels) for c in range(codebook_size)]


def read_manifest(folder: str | Path, dataset: str | None = None, fingerprint: str | None = None) -> dict:
    """The manifest of a complete export; a one-line error for anything else."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a token export (no {MANIFEST}); run --stage export first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is not valid JSON") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has token export format version {version}, this code reads version {FORMAT_VERSION}; re-run "
            "--stage export"
        )
    if dataset is not None and manifest.get("dataset") != dataset:
        raise CheckpointError(f"token export {folder} was made for dataset {manifest.get('dataset')}, not {dataset}")
    if fingerprint is not None and manifest.get("dataset_fingerprint") != fingerprint:
        raise CheckpointError(
            f"token export {folder} was made from a different build of dataset {manifest.get('dataset')} (fingerprint "
            "mismatch); re-run --stage export"
        )
    missing = [name for name in manifest.get("files", []) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"token export {folder} is incomplete: missing {', '.join(missing)}")
    return manifest
