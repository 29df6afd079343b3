"""Export a trained DPPMG model's preference tokens (see ``tokens/format.py`` for the files).

Everything is written into a temporary folder beside the target and renamed into place at
the end, so an interrupted export never leaves a folder that ``PreferenceTokens.load``
would accept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors.numpy import save_file

from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.folders import swap_into_place
from recbole_dppmg.model.dppmg import DPPMG
from recbole_dppmg.model.modal_features import (
    ID_MODALITY,
    feature_scaling,
    load_modal_features,
)
from recbole_dppmg.paths import SAVED_DIR
from recbole_dppmg.quick_start import load_data_and_model
from recbole_dppmg.runs import DPPMG_RUN, TOKEN_EXPORT, RunKind, newest_finished_run
from recbole_dppmg.tokens.faiss_lookup import build_index
from recbole_dppmg.tokens.foldin import FOLDIN_RIDGE, fit_foldin
from recbole_dppmg.tokens.foldin_quality import evaluate_fold_in
from recbole_dppmg.tokens.format import (
    FORMAT_VERSION,
    MANIFEST,
    TOKEN_PATTERN,
    modality_prefix,
    token_string,
)
from recbole_dppmg.tokens.interpret import write_code_report
from recbole_dppmg.trainer import load_checkpoint_file

logger = logging.getLogger(__name__)


def dataset_fingerprint(data_dir: Path) -> str:
    """Identifies one build of a dataset: the prepare manifest's cache key, else a hash of
    the atomic files."""
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        key = json.loads(manifest.read_text()).get("cache_key")
        if key:
            return str(key)
    digest = hashlib.sha256()
    for path in sorted(data_dir.glob("*.inter")) + sorted(data_dir.glob("*.item")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def newest_stage1_checkpoint(checkpoint_root: Path, dataset: str, model: str = "DPPMG") -> Path:
    """The ``best.pth`` of the newest finished ``model`` run on ``dataset`` under the checkpoint folder."""
    run = newest_finished_run(checkpoint_root, dataset, RunKind(model, DPPMG_RUN.done))
    if run is None:
        raise CheckpointError(
            f"no trained {model} run for dataset {dataset} under {checkpoint_root / dataset}; "
            f"train one (python run_dppmg.py -d {dataset} -m {model}) or pass --checkpoint"
        )
    return run / DPPMG_RUN.done


def newest_token_export(dataset: str, root: Path | None = None) -> Path:
    """The newest ``saved/<dataset>/DPPMG-*/tokens`` folder that holds a manifest."""
    root = Path(root or SAVED_DIR)
    run = newest_finished_run(root, dataset, TOKEN_EXPORT)
    if run is None:
        raise CheckpointError(
            f"no token export for dataset {dataset} under {root / dataset}; run --stage export first or pass a tokens "
            "folder"
        )
    return run / "tokens"


def _write_user_tokens(path: Path, user_ids: list[str], codes: np.ndarray, modalities: list[str]) -> None:
    header = ["user_id:token"] + [f"{modality_prefix(m)}_tokens:token_seq" for m in modalities]
    with path.open("w") as handle:
        handle.write("\t".join(header) + "\n")
        for row in range(1, len(user_ids)):
            fields = [user_ids[row]] + [
                " ".join(token_string(m, level, int(code)) for level, code in enumerate(codes[row, k]))
                for k, m in enumerate(modalities)
            ]
            handle.write("\t".join(fields) + "\n")


def _write_interactions(path: Path, train_data, valid_data, test_data, config) -> None:
    """The stage-1 split (CSR user -> items per split, and training ratings when the dataset
    has them), so that stage 2 trains on exactly the training split and evaluates on the test
    split without re-running RecBole's splitter."""
    arrays = {}
    rating_field = config["RATING_FIELD"]
    for name, loader in (("train", train_data), ("valid", valid_data), ("test", test_data)):
        split = loader._dataset
        value = rating_field if rating_field in split.inter_feat else None
        matrix = split.inter_matrix(form="csr", value_field=value).astype(np.float32)
        matrix.sort_indices()
        arrays[f"{name}_indptr"] = matrix.indptr.astype(np.int64)
        arrays[f"{name}_indices"] = matrix.indices.astype(np.int64)
        arrays[f"{name}_values"] = matrix.data.astype(np.float32)
        arrays[f"{name}_has_rating"] = np.array(value is not None)
    np.savez(path, **arrays)


def _item_encoders(model, dataset, config) -> tuple[dict, dict]:
    """Everything needed to map a new item feature vector (e.g. of generated content) into
    the model's layer-0 item space without stage-1 code: feature scaling + MLP weights."""

    how = config["feature_norm"]
    raw_config = {key: config[key] for key in config.final_config_dict}
    raw_config["feature_norm"] = "none"
    raw = load_modal_features(dataset, raw_config)
    tensors, described = {}, {}
    for m in model.modalities:
        if m == ID_MODALITY:
            continue
        mean, std = feature_scaling(raw[m].features[raw[m].present], how)
        tensors[f"{m}.feature_mean"], tensors[f"{m}.feature_std"] = mean.numpy(), std.numpy()
        linear = [layer for layer in model.encoders[m] if isinstance(layer, torch.nn.Linear)]
        for k, layer in enumerate(linear):
            tensors[f"{m}.linear{k}.weight"] = layer.weight.detach().cpu().numpy()
            tensors[f"{m}.linear{k}.bias"] = layer.bias.detach().cpu().numpy()
        described[m] = {
            "field": raw[m].field,
            "width": raw[m].width,
            "feature_norm": how,
            "layers": len(linear),
            "activation": "leaky_relu(0.01) between linear layers",
        }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, described


def _run_metrics(checkpoint: Path) -> dict:
    result_file = checkpoint.parent / "result.json"
    if not result_file.is_file():
        return {}
    result = json.loads(result_file.read_text())
    return {
        "test": result.get("test_result", {}),
        "valid": result.get("best_valid_result", {}),
        **result.get("extra", {}),
    }


def token_vectors(model: DPPMG) -> dict[str, dict[str, np.ndarray]]:
    """The vectors the tokens and the fold-in map are made of, per modality: ``users`` (every
    user's continuous propagated vector, what the codes quantize and fold-in predicts),
    ``codebooks`` ``[levels, size, dim]`` and ``items`` (the propagated item vectors that users
    are scored against and folded in from)."""
    with torch.no_grad():
        return {
            "users": {m: v.cpu().numpy() for m, v in model.user_modal_vectors(quantized=False).items()},
            "codebooks": {m: v.cpu().numpy() for m, v in model.codebooks().items()},
            "items": {m: v.cpu().numpy() for m, v in model.item_modal_vectors(propagated=True).items()},
        }


def export_tokens(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    index_type: str | None = None,
    config_dict: dict | None = None,
    interpret: bool = True,
) -> Path:
    """Write the token export of a DPPMG checkpoint; returns the export folder."""

    checkpoint = Path(checkpoint)
    state = load_checkpoint_file(checkpoint)
    if state["model"] != "DPPMG":
        raise CheckpointError(
            f"checkpoint {checkpoint} is a {state['model']} model; tokens come from a DPPMG checkpoint"
        )
    del state
    start = time.time()
    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(checkpoint, config_dict)
    assert isinstance(model, DPPMG)
    index_type = index_type or config["token_index_type"]
    out_dir = Path(out_dir) if out_dir else checkpoint.parent / "tokens"
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    modalities = list(model.modalities)
    vectors = token_vectors(model)
    user_vectors, codebooks, items = vectors["users"], vectors["codebooks"], vectors["items"]
    with torch.no_grad():
        codes = model.user_codes().cpu().numpy().astype(np.int32)
        items_ego = {m: v.cpu().numpy() for m, v in model.item_modal_vectors(propagated=False).items()}

    train_dataset = train_data._dataset
    user_items = train_dataset.inter_matrix(form="csr").astype(np.float32)
    users = np.arange(1, train_dataset.user_num)
    user_ids = [str(u) for u in dataset.id2token(dataset.uid_field, np.arange(dataset.user_num))]
    item_ids = [str(i) for i in dataset.id2token(dataset.iid_field, np.arange(dataset.item_num))]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_file({m: np.ascontiguousarray(codebooks[m]) for m in modalities}, str(tmp / "codebooks.safetensors"))
        np.save(tmp / "user_codes.npy", codes)
        save_file({m: np.ascontiguousarray(user_vectors[m]) for m in modalities}, str(tmp / "user_vectors.safetensors"))
        save_file(
            {
                **{m: np.ascontiguousarray(items[m]) for m in modalities},
                **{f"{m}.ego": np.ascontiguousarray(items_ego[m]) for m in modalities},
            },
            str(tmp / "item_vectors.safetensors"),
        )
        foldin = {}
        for m in modalities:
            weight, bias = fit_foldin(items[m], user_items, user_vectors[m], users)
            foldin[f"{m}.weight"], foldin[f"{m}.bias"] = weight, bias
        save_file(foldin, str(tmp / "foldin.safetensors"))
        encoder_tensors, encoder_info = _item_encoders(model, dataset, config)
        save_file(encoder_tensors, str(tmp / "item_encoders.safetensors"))

        valid_items = valid_data._dataset.inter_matrix(form="csr")
        foldin_quality = evaluate_fold_in(
            modalities, codebooks, items, user_vectors, codes, user_items.tocsr(), valid_items
        )
        (tmp / "foldin_quality.json").write_text(json.dumps(foldin_quality, indent=2))
        (tmp / "ids.json").write_text(json.dumps({"users": user_ids, "items": item_ids}))
        _write_interactions(tmp / "interactions.npz", train_data, valid_data, test_data, config)
        _write_user_tokens(tmp / "user_tokens.tsv", user_ids, codes, modalities)
        index_files = []
        for m in modalities:
            for level in range(model.levels):
                name = f"index_{m}_L{level}.faiss"
                faiss.write_index(build_index(codebooks[m][level], index_type), str(tmp / name))
                index_files.append(name)
        files = [
            "codebooks.safetensors",
            "user_codes.npy",
            "user_vectors.safetensors",
            "item_vectors.safetensors",
            "foldin.safetensors",
            "foldin_quality.json",
            "item_encoders.safetensors",
            "ids.json",
            "interactions.npz",
            "user_tokens.tsv",
            *index_files,
        ]
        if interpret:
            files += write_code_report(tmp, config, codes, codebooks, items, user_items, modalities, item_ids)
        data_dir = Path(config["data_path"])
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": config["dataset"],
            "dataset_fingerprint": dataset_fingerprint(data_dir),
            "checkpoint": str(checkpoint.resolve()),
            "model": "DPPMG",
            "modalities": modalities,
            "levels": int(model.levels),
            "codebook_size": int(model.codebook_size),
            "dim": int(model.dim),
            "n_users": int(dataset.user_num),
            "n_items": int(dataset.item_num),
            "token_pattern": TOKEN_PATTERN,
            "token_prefixes": {m: modality_prefix(m) for m in modalities},
            "index_type": index_type,
            "item_encoders": encoder_info,
            "foldin": {
                "input": "mean of the propagated item vectors of the user's items",
                "ridge": FOLDIN_RIDGE,
                "quality": foldin_quality,
            },
            "metrics": _run_metrics(checkpoint),
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"token export written to {out_dir} in {time.time() - start:.1f}s")
    return out_dir
