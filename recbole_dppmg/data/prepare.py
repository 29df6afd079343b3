"""``prepare``: build a dataset's RecBole atomic files with text and image features.

Output, in ``<dataset_dir>/<name>/``: ``<name>.inter``, ``<name>.item`` (descriptive
fields, ``text_feat``/``image_feat`` float_seq columns, ``text_mask``/``image_mask``),
``manifest.json`` (counts, hashes, encoder versions, throughput) and ``README.md`` (the
card). Everything is written to a temporary folder beside the target and renamed into
place only when complete, so a failure never leaves a half-written dataset; a re-run whose
inputs, settings and encoders hash the same as the manifest's does nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_dppmg.data import featurize
from recbole_dppmg.data.atomic import read_atomic, write_atomic
from recbole_dppmg.data.cache import (
    MANIFEST_NAME,
    PIPELINE_VERSION,
    cache_key,
    hash_file,
    hash_inputs,
    read_manifest,
)
from recbole_dppmg.data.card import featured_rows, render_card
from recbole_dppmg.data.item_content import like_rating_default
from recbole_dppmg.data.mmrec import MMRecSource
from recbole_dppmg.data.properties import property_file
from recbole_dppmg.data.sources import (
    ML100K_MM,
    AtomicFolderSource,
    DatasetSpec,
    LoadedSource,
    Ml100kMMSource,
    Source,
)
from recbole_dppmg.errors import DataError
from recbole_dppmg.paths import check_dataset_name, dataset_root
from recbole_dppmg.paths import shared_dir as default_shared_dir

logger = logging.getLogger(__name__)

KNOWN_DATASETS = (ML100K_MM,)
SPEC_SUFFIX = ".prepare.yaml"
MODALITIES = ("text", "image")
BATCH_SIZE = {"text": 64, "image": 32}


def find_spec_file(dataset: str, dataset_dir: Path | None = None) -> Path | None:
    """The conventional spec location ``<dataset_dir>/<name>.prepare.yaml``, if it exists."""
    path = Path(dataset_dir or dataset_root()) / f"{dataset}{SPEC_SUFFIX}"
    return path if path.is_file() else None


def is_prepared(dataset: str, dataset_dir: Path | None = None) -> bool:
    """Cheap check: the folder has a readable manifest whose listed files exist (no hashing)."""
    return read_manifest(Path(dataset_dir or dataset_root()) / dataset) is not None


def ensure_prepared(
    dataset: str,
    *,
    dataset_dir: Path | None = None,
    shared_dir: Path | None = None,
    spec_file: Path | None = None,
    num_threads: int | None = None,
) -> Path | None:
    """Prepare ``dataset`` if it is one this project builds and is missing or stale.

    Plain RecBole datasets (``ml-100k``, or any name without a spec) are left alone and
    None is returned. A prepared dataset whose raw inputs are no longer available is used
    as it is, with a log line, so runs work on machines without the shared folder.
    """
    dataset_dir = Path(dataset_dir or dataset_root())
    spec_file = spec_file or find_spec_file(dataset, dataset_dir)
    if dataset not in KNOWN_DATASETS and spec_file is None:
        return None
    target = dataset_dir / dataset
    try:
        return prepare_dataset(
            dataset, dataset_dir=dataset_dir, shared_dir=shared_dir, spec_file=spec_file, num_threads=num_threads
        )
    except DataError:
        if is_prepared(dataset, dataset_dir) and not _sources_available(dataset, shared_dir, spec_file):
            logger.warning("%s: raw inputs not found; using the prepared copy in %s as it is", dataset, target)
            return target
        raise


def _sources_available(dataset: str, shared_dir: Path | None, spec_file: Path | None) -> bool:
    try:
        resolve_source(dataset, shared_dir=shared_dir, spec_file=spec_file)
    except DataError:
        return False
    return True


def resolve_source(dataset: str, *, shared_dir: Path | None = None, spec_file: Path | None = None) -> Source:
    """The raw-input reader for ``dataset``: a spec names a user folder, else the embedded one."""
    if spec_file is not None:
        spec = DatasetSpec.from_yaml(Path(spec_file))
        return MMRecSource(dataset, spec) if spec.format == "mmrec" else AtomicFolderSource(dataset, spec)
    if dataset == ML100K_MM:
        return Ml100kMMSource(Path(shared_dir) if shared_dir else default_shared_dir())
    if dataset == "ml-100k":
        raise DataError(
            "ml-100k is RecBole's own bundled dataset and needs no prepare; the multimodal one is ml-100k-mm"
        )
    raise DataError(
        f"don't know how to prepare dataset {dataset!r}: pass a spec YAML or write "
        f"{dataset_root() / (dataset + SPEC_SUFFIX)} "
        "(see dataset/README.md)"
    )


def prepare_dataset(
    dataset: str,
    *,
    dataset_dir: Path | None = None,
    shared_dir: Path | None = None,
    spec_file: Path | None = None,
    force: bool = False,
    num_threads: int | None = None,
    encoders: dict | None = None,
) -> Path:
    """Build (or verify the cache of) ``<dataset_dir>/<dataset>/`` and return that folder.

    ``encoders`` maps "text"/"image" to encoder objects (see ``featurize``) to use instead
    of the pretrained defaults; tests pass tiny fakes, and a different encoder version
    invalidates the cache like any changed input.
    """
    check_dataset_name(dataset)
    dataset_dir = Path(dataset_dir or dataset_root())
    target = dataset_dir / dataset
    spec_file = spec_file or find_spec_file(dataset, dataset_dir)
    source = resolve_source(dataset, shared_dir=shared_dir, spec_file=spec_file)
    _refuse_source_inside_target(source, target)
    if not force and _cache_hit(dataset, target, source, encoders):  # read-only: no lock on a valid dataset
        _remove_stale_temp_dirs(dataset_dir, dataset)
        return target
    try:
        with _exclusive(dataset_dir, dataset):
            return _prepare_locked(dataset, dataset_dir, target, source, force, num_threads, encoders)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise DataError(f"cannot prepare {dataset} in {dataset_dir}: {error.strerror}: {error.filename}") from None


def _cache_hit(dataset: str, target: Path, source: Source, encoders: dict | None) -> bool:
    """The prepared folder's manifest matches the inputs' hashes: nothing to build, nothing written."""
    started = time.perf_counter()
    input_hashes = hash_inputs(source.input_files())
    key = cache_key(source.kind, source.settings(), input_hashes, _encoder_versions(source, encoders))
    manifest = read_manifest(target)
    if manifest is None or manifest.get("cache_key") != key:
        return False
    logger.info("%s is up to date (%s); checked in %.1fs", dataset, target, time.perf_counter() - started)
    return True


@contextlib.contextmanager
def _exclusive(dataset_dir: Path, dataset: str):
    """One prepare per output folder at a time: a second process waits, then finds the cache valid.

    The lock file lives in ``<dataset_dir>/.locks/`` (a folder, so git-ignored like the datasets).
    """
    lock_dir = dataset_dir / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{dataset}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another process is preparing %s; waiting for it", dataset_dir / dataset)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_locked(dataset, dataset_dir, target, source, force, num_threads, encoders) -> Path:
    started = time.perf_counter()
    input_hashes = hash_inputs(source.input_files())
    versions = _encoder_versions(source, encoders)
    key = cache_key(source.kind, source.settings(), input_hashes, versions)
    manifest = read_manifest(target)
    if not force and manifest is not None and manifest.get("cache_key") == key:
        logger.info("%s is up to date (%s); checked in %.1fs", dataset, target, time.perf_counter() - started)
        return target
    if target.is_dir() and not (target / MANIFEST_NAME).exists() and any(target.iterdir()):
        raise DataError(f"refusing to replace {target}: it holds files not written by prepare (no {MANIFEST_NAME})")

    dataset_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(dataset_dir, dataset)
    with featurize.torch_threads(num_threads) as threads:
        logger.info("preparing %s into %s with %d torch thread(s)", dataset, target, threads)
        loaded = source.load()
        previous = _PreviousBuild(target, None if force else manifest)  # force: encode everything again
        built = _build(dataset, loaded, encoders, versions, previous)
    manifest = _manifest(dataset, source, loaded, built, key, input_hashes, versions, threads)
    _write_atomically(dataset_dir, target, dataset, loaded, built, manifest)
    logger.info("prepared %s in %.1fs: %s", dataset, time.perf_counter() - started, json.dumps(manifest["counts"]))
    return target


def _refuse_source_inside_target(source: Source, target: Path) -> None:
    resolved = target.resolve()
    for path in source.input_files().values():
        if resolved == Path(path).resolve() or resolved in Path(path).resolve().parents:
            raise DataError(f"the raw input {path} lies inside the output folder {target}; keep raw data elsewhere")


def _encoder_versions(source: Source, encoders: dict | None) -> dict[str, str]:
    if isinstance(source, MMRecSource):
        return {m: "precomputed" for m in MODALITIES}
    encoders = encoders or {}
    defaults = None
    versions = {}
    for modality in MODALITIES:
        if modality in encoders:
            versions[modality] = encoders[modality].version
        else:
            defaults = defaults or featurize.default_encoder_versions()
            versions[modality] = defaults[modality]
    return versions


class _PreviousBuild:
    """Feature columns of the last complete build, reused per modality when its inputs match.

    Changing one plot text then re-encodes text only, not 1,644 posters.
    """

    def __init__(self, target: Path, manifest: dict | None):
        self.target, self.manifest = target, manifest or {}
        self._table: pd.DataFrame | None = None

    def features(self, modality: str, key: str, item_ids: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        if self.manifest.get("modality_keys", {}).get(modality) != key:
            return None
        try:
            if self._table is None:
                self._table = read_atomic(self.target / self.manifest["files"]["item"]).set_index("item_id")
            rows = self._table.loc[item_ids]
            features = np.stack(rows[f"{modality}_feat"].to_numpy()).astype(np.float32)
            present = rows[f"{modality}_mask"].to_numpy() == 1.0
        except (DataError, KeyError, ValueError, OSError) as exc:
            logger.info("%s features of the previous build not reusable (%s); encoding again", modality, exc)
            return None
        logger.info("%s: inputs unchanged since the last build, reusing its %d features", modality, int(present.sum()))
        return features, present


def _modality_key(modality: str, loaded: LoadedSource, version: str) -> str:
    """Hash of exactly what one modality's features depend on: encoder version + per-item inputs."""
    item_ids = loaded.items["item_id"].tolist()
    if modality in loaded.precomputed:
        features, _ = loaded.precomputed[modality]
        payload = [item_ids, hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()]
    elif modality == "text":
        payload = list(zip(item_ids, loaded.text_inputs))
    else:
        payload = [
            (i, None if p is None else (hash_file(p) if Path(p).is_file() else "missing"))
            for i, p in zip(item_ids, loaded.image_paths)
        ]
    return hashlib.sha256(json.dumps([version, payload], default=str).encode()).hexdigest()


class _Built:
    """The validated tables and feature arrays of one build, before they are written."""

    def __init__(self, inter: pd.DataFrame, dropped: int, dangling_ids: list[str]):
        self.inter, self.dropped, self.dangling_ids = inter, dropped, dangling_ids
        self.features: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.encoder_names: dict[str, str] = {}
        self.throughput: dict[str, dict] = {}
        self.image_failures: dict[str, str] = {}
        self.images_missing: list[str] = []
        self.modality_keys: dict[str, str] = {}


def _build(
    dataset: str, loaded: LoadedSource, encoders: dict | None, versions: dict, previous: _PreviousBuild
) -> _Built:
    items = loaded.items
    if items.empty:
        raise DataError(f"{loaded.item_origin}: no items")
    empty_ids = int((items["item_id"] == "").sum())
    if empty_ids:
        raise DataError(f"{loaded.item_origin}: {empty_ids} row(s) with an empty item id")
    duplicated = items["item_id"][items["item_id"].duplicated()].unique().tolist()
    if duplicated:
        shown = ", ".join(duplicated[:10])
        raise DataError(f"{loaded.item_origin}: duplicate item id(s) {shown}{' ...' if len(duplicated) > 10 else ''}")

    in_catalogue = loaded.inter["item_id"].isin(set(items["item_id"]))
    dangling = sorted(set(loaded.inter.loc[~in_catalogue, "item_id"]))
    built = _Built(loaded.inter[in_catalogue].reset_index(drop=True), int((~in_catalogue).sum()), dangling)
    if built.dropped:
        logger.warning(
            "%s: dropped %d interaction(s) whose item is not in the item table (item ids %s%s)",
            dataset,
            built.dropped,
            ", ".join(dangling[:10]),
            " ..." if len(dangling) > 10 else "",
        )
    if built.inter.empty:
        raise DataError(f"{dataset}: no interaction refers to an item in {loaded.item_origin}")

    encoders = dict(encoders or {})
    item_ids = items["item_id"].tolist()
    for modality in MODALITIES:
        key = built.modality_keys[modality] = _modality_key(modality, loaded, versions[modality])
        reused = previous.features(modality, key, item_ids)
        if reused is not None:
            features, present = reused
            _carry_over(modality, previous.manifest, built)
        elif modality in loaded.precomputed:
            features, present = loaded.precomputed[modality]
            built.encoder_names[modality] = "precomputed"
        elif modality == "text":
            features, present = _featurize_text(loaded, encoders, built)
        else:
            features, present = _featurize_images(loaded, encoders, built)
        features = np.where(present[:, None], features, 0.0).astype(np.float32)
        built.features[modality], built.masks[modality] = features, present
    return built


def _carry_over(modality: str, manifest: dict, built: _Built) -> None:
    """Keep the reused modality's encoder name, failures and measured throughput in the new manifest."""
    built.encoder_names[modality] = manifest["modalities"][modality]["encoder"]
    if modality in manifest.get("throughput", {}):
        built.throughput[modality] = {**manifest["throughput"][modality], "reused": True}
    if modality == "image":
        built.image_failures = dict(manifest.get("image_failures", {}))
        built.images_missing = list(manifest.get("images_missing_file", []))


def _encoder(encoders: dict, modality: str):
    if modality not in encoders:
        encoders[modality] = featurize.load_default_encoder(modality)
    return encoders[modality]


def _checked(features: np.ndarray, rows: list[int], encoder, modality: str) -> np.ndarray:
    """An encoder's output must be ``[len(rows), dim]`` and finite; anything else is a bug upstream."""
    if features.shape != (len(rows), encoder.dim):
        raise DataError(
            f"{modality} encoder {encoder.name} returned shape {features.shape}, expected {(len(rows), encoder.dim)}"
        )
    return features


def _featurize_text(loaded: LoadedSource, encoders: dict, built: _Built) -> tuple[np.ndarray, np.ndarray]:
    rows = [i for i, text in enumerate(loaded.text_inputs) if text]
    n = len(loaded.items)
    if not rows:
        built.encoder_names["text"] = "none (no item has text)"
        return np.zeros((n, 1), np.float32), np.zeros(n, bool)
    encoder = _encoder(encoders, "text")
    started = time.perf_counter()
    vectors = _checked(
        encoder.encode([loaded.text_inputs[i] for i in rows], batch_size=BATCH_SIZE["text"]), rows, encoder, "text"
    )
    built.throughput["text"] = _rate(len(rows), time.perf_counter() - started)
    features = np.zeros((n, encoder.dim), np.float32)
    present = np.zeros(n, bool)
    finite = np.isfinite(vectors).all(axis=1)
    features[rows], present[rows] = np.nan_to_num(vectors), finite
    if not finite.all():
        logger.warning("text: %d item(s) got non-finite features and are masked", int((~finite).sum()))
    built.encoder_names["text"] = f"{encoder.name} ({encoder.version})"
    return features, present


def _featurize_images(loaded: LoadedSource, encoders: dict, built: _Built) -> tuple[np.ndarray, np.ndarray]:
    n = len(loaded.items)
    item_ids = loaded.items["item_id"].tolist()
    rows = []
    for i, path in enumerate(loaded.image_paths):
        if path is None:
            continue
        if Path(path).is_file():
            rows.append(i)
        else:
            built.images_missing.append(item_ids[i])
    if built.images_missing:
        logger.warning(
            "image: %d named image file(s) not found; those items are masked (e.g. item %s)",
            len(built.images_missing),
            built.images_missing[0],
        )
    if not rows:
        built.encoder_names["image"] = "none (no item has an image)"
        return np.zeros((n, 1), np.float32), np.zeros(n, bool)
    encoder = _encoder(encoders, "image")
    started = time.perf_counter()
    result = encoder.encode([loaded.image_paths[i] for i in rows], batch_size=BATCH_SIZE["image"])
    built.throughput["image"] = _rate(len(rows), time.perf_counter() - started)
    vectors = _checked(result.features, rows, encoder, "image")
    ok = result.ok & np.isfinite(vectors).all(axis=1)
    for position, reason in result.failures.items():
        built.image_failures[item_ids[rows[position]]] = reason
    for position in np.flatnonzero(result.ok & ~ok):
        built.image_failures[item_ids[rows[position]]] = "non-finite features"
    if built.image_failures:
        first = next(iter(built.image_failures.items()))
        logger.warning(
            "image: %d image(s) failed to decode and are masked (e.g. item %s: %s)", len(built.image_failures), *first
        )
    features = np.zeros((n, encoder.dim), np.float32)
    present = np.zeros(n, bool)
    features[rows], present[rows] = np.nan_to_num(vectors), ok
    built.encoder_names["image"] = f"{encoder.name} ({encoder.version})"
    return features, present


def _rate(items: int, seconds: float) -> dict:
    return {"items": items, "seconds": round(seconds, 3), "items_per_s": round(items / max(seconds, 1e-9), 2)}


def _manifest(dataset, source, loaded, built, key, input_hashes, versions, threads) -> dict:
    counts = {
        "users": int(built.inter["user_id"].nunique()),
        "items": len(loaded.items),
        "interactions": len(built.inter),
        "interactions_dropped_unknown_item": built.dropped,
        "items_with_text": int(built.masks["text"].sum()),
        "items_with_image": int(built.masks["image"].sum()),
        "images_failed": len(built.image_failures),
        "images_missing_file": len(built.images_missing),
    }
    return {
        "format_version": PIPELINE_VERSION,
        "dataset": dataset,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cache_key": key,
        "source": {"kind": source.kind, "settings": source.settings()},
        "inputs": input_hashes,
        "encoders": versions,
        "modalities": {
            m: {
                "field": f"{m}_feat",
                "mask_field": f"{m}_mask",
                "width": int(built.features[m].shape[1]),
                "encoder": built.encoder_names[m],
            }
            for m in MODALITIES
        },
        "counts": counts,
        "notes": loaded.notes,
        "dangling_item_ids": built.dangling_ids[:100],
        "image_failures": built.image_failures,
        "images_missing_file": built.images_missing,
        "throughput": built.throughput,
        "threads": threads,
        "modality_keys": built.modality_keys,
        "content": _content_map(loaded, built),
        "files": {
            "inter": f"{dataset}.inter",
            "item": f"{dataset}.item",
            "card": "README.md",
            "properties": f"{dataset}.yaml",
            **{k: f"{dataset}.{k}" for k in loaded.extra_files},
        },
    }


def _content_map(loaded: LoadedSource, built: _Built) -> dict:
    """The item-content map (``item_content.py``) with the rating scale measured on the data."""
    content = loaded.content.to_json()
    if content["rating"] is not None:
        ratings = pd.to_numeric(built.inter["rating"], errors="coerce")
        low, high = float(ratings.min()), float(ratings.max())
        like = content["rating"].get("like_rating")
        content["rating"] = {
            **content["rating"],
            "min": low,
            "max": high,
            "like_rating": float(like) if like is not None else like_rating_default(low, high),
        }
    return content


def _item_rows(loaded: LoadedSource, built: _Built):
    columns = [c for c, _ in loaded.item_columns]
    values = loaded.items[columns].itertuples(index=False, name=None)
    text, image = built.features["text"], built.features["image"]
    text_mask, image_mask = built.masks["text"], built.masks["image"]
    for row, descriptive in enumerate(values):
        yield (*descriptive, text[row], image[row], float(text_mask[row]), float(image_mask[row]))


def _write_atomically(
    dataset_dir: Path, target: Path, dataset: str, loaded: LoadedSource, built: _Built, manifest: dict
) -> None:
    """Write everything into a temp folder beside ``target``, then swap it into place."""
    temp = Path(tempfile.mkdtemp(prefix=f".{dataset}.tmp-{os.getpid()}-", dir=dataset_dir))
    try:
        temp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a published dataset follows the umask
        inter_columns = loaded.inter_columns
        write_atomic(
            temp / f"{dataset}.inter",
            inter_columns,
            built.inter[[c for c, _ in inter_columns]].itertuples(index=False, name=None),
        )
        for suffix, frame in loaded.extra_files.items():
            in_catalogue = frame[frame["item_id"].isin(set(loaded.items["item_id"]))]
            columns = [(c, t) for c, t in inter_columns if c in frame.columns]
            write_atomic(
                temp / f"{dataset}.{suffix}",
                columns,
                in_catalogue[[c for c, _ in columns]].itertuples(index=False, name=None),
            )
        item_columns = [
            *loaded.item_columns,
            ("text_feat", "float_seq"),
            ("image_feat", "float_seq"),
            ("text_mask", "float"),
            ("image_mask", "float"),
        ]
        write_atomic(temp / f"{dataset}.item", item_columns, _item_rows(loaded, built))
        (temp / f"{dataset}.yaml").write_text(
            property_file(dataset, loaded.inter_columns, manifest, bool(loaded.extra_files)), encoding="utf-8"
        )
        query_rows = featured_rows(loaded.items, built.inter, loaded.featured_items)
        card = render_card(
            manifest, loaded.items, built.features, built.masks, query_rows, loaded.title_field, loaded.explanation
        )
        (temp / "README.md").write_text(card, encoding="utf-8")
        # The manifest goes last: a folder with a manifest is a complete folder.
        (temp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _publish(temp, target, dataset)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _publish(temp: Path, target: Path, dataset: str) -> None:
    if not target.exists():
        os.replace(temp, target)
        return
    old = target.with_name(f".{dataset}.old-{os.getpid()}-{time.time_ns()}")
    os.replace(target, old)
    try:
        os.replace(temp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    """The process umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temp_dirs(dataset_dir: Path, dataset: str) -> None:
    """Leftovers of a killed run (``.<name>.tmp-<pid>-*``) whose process is gone."""
    for leftover in list(dataset_dir.glob(f".{dataset}.tmp-*")) + list(dataset_dir.glob(f".{dataset}.old-*")):
        try:
            pid = int(
                leftover.name.split("-")[-2]
                if ".old-" in leftover.name
                else leftover.name.split(".tmp-")[1].split("-")[0]
            )
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
