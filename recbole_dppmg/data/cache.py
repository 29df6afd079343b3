"""Content hashes and the manifest that make re-running ``prepare`` a no-op.

The cache key is a hash of everything that decides the output: the inputs' content (not
their timestamps, so a fresh clone or a copied folder still hits the cache), the source
settings, the encoder versions and the pipeline's own format version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
# Bump when the written files change in a way the inputs do not show.
PIPELINE_VERSION = 3  # 3: manifest content map + the RecBole property file
_CHUNK = 1 << 20


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_folder(folder: Path) -> dict:
    """One digest over every file's relative path and content, plus the file count."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(b"\0" + hash_file(path).encode() + b"\n")
    return {"files": len(files), "sha256": digest.hexdigest()}


def hash_inputs(files: dict[str, Path]) -> dict:
    """Label -> sha256 of a file, or {files, sha256} of a folder."""
    return {label: hash_folder(path) if Path(path).is_dir() else hash_file(path) for label, path in files.items()}


def cache_key(kind: str, settings: dict, input_hashes: dict, encoder_versions: dict) -> str:
    payload = {
        "pipeline_version": PIPELINE_VERSION,
        "kind": kind,
        "settings": settings,
        "inputs": input_hashes,
        "encoders": encoder_versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a prepared folder, or None if absent, unreadable or its files are gone."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    files = manifest.get("files", {}).values() if isinstance(manifest, dict) else None
    if not files or not all((Path(folder) / name).is_file() for name in files):
        return None
    return manifest
