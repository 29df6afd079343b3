"""RecBole's trainers with pickle-free, resumable checkpoints and a per-epoch history.

RecBole 1.2.1 pickles its whole ``Config`` into each checkpoint; torch>=2.6 refuses to load
that with ``weights_only=True``, which breaks resume, the final test evaluation and model
loading. We keep RecBole's training loop untouched (so baseline numbers do not move) and
replace only how checkpoints are written and read: plain tensors, numbers and a JSON config,
read back with ``weights_only=True``.

Two files per run: ``best.pth`` (the best validation epoch, what ``evaluate`` loads) and
``last.pth`` (written after every epoch, with the random generator states, so that
``resume_checkpoint`` continues exactly where an interrupted run stopped).

Models whose embedding tables have sparse gradients (``nn.Embedding(sparse=True)``: DPPMG with
``propagation: sampled``) train those tables with lazy Adam (``recbole_dppmg.lazy_adam``,
``torch.optim.SparseAdam``'s update at a cost in the touched rows) and the other parameters with
the configured Adam, so that a step's optimiser cost depends on the rows
the batch touched, not on the size of the tables. Under data-parallel training DDP leaves these
tables out: their row gradients are averaged over the ranks by dense all-gathers just before the
lazy Adam step (``distributed.average_sparse_grads_``; DDP's own sparse all-reduce crashed on gloo
and does not exist on NCCL), and RecBole's zero-weighted "sync loss" covers the other parameters.

Models may define ``on_epoch_end() -> dict`` (DPPMG does: k-means after warm-up, codebook
usage); it is called after every training epoch and its dict is logged and kept in the history.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from time import time

import numpy as np
import scipy.sparse as sp
import torch

from recbole_dppmg.config import jsonable_config, user_settings
from recbole_dppmg.distributed import average_sparse_grads_, is_distributed, sync_from_rank0_
from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.lazy_adam import LazyAdam

CHECKPOINT_FORMAT = "recbole_dppmg.checkpoint/1"


def save_checkpoint_file(state: dict, path: str | Path) -> None:
    """Write atomically: an interrupted save never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint_file(path: str | Path, map_location="cpu") -> dict:
    """Read a plugin checkpoint with ``weights_only=True``; a one-line error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds on a file that is not a checkpoint
        raise CheckpointError(
            f"{path} is not a recbole_dppmg checkpoint that loads with weights_only=True "
            f"(RecBole's own pickled checkpoints are refused on purpose): {_load_failure(error)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a recbole_dppmg checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def _load_failure(error: Exception) -> str:
    """What torch's (multi-paragraph) load error says was refused, whole, on one line."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation of torch.load", 1)[0]
    return " ".join(text.split()) or type(error).__name__


def encode_other_parameter(values: dict | None) -> dict | None:
    """A model's ``other_parameter()`` (numpy arrays, scipy sparse matrices, tensors, numbers)
    as tensors and plain values, which ``torch.load(weights_only=True)`` reads back."""
    if values is None:
        return None
    return {str(key): _encode_value(value) for key, value in values.items()}


def decode_other_parameter(values: dict | None) -> dict | None:
    """The inverse of ``encode_other_parameter``: the original numpy / scipy types again."""
    if values is None:
        return None
    return {key: _decode_value(value) for key, value in values.items()}


def _encode_value(value):
    if sp.issparse(value):
        coo = value.tocoo()
        return {
            "__kind__": "scipy_sparse",
            "format": value.format,
            "shape": [int(n) for n in coo.shape],
            "row": torch.from_numpy(np.asarray(coo.row, dtype=np.int64)),
            "col": torch.from_numpy(np.asarray(coo.col, dtype=np.int64)),
            "data": torch.from_numpy(np.ascontiguousarray(coo.data)),
        }
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype == object:
            raise CheckpointError(f"cannot store a numpy object array ({array.shape}) in a plain checkpoint")
        return {
            "__kind__": "numpy",
            "array": torch.from_numpy(np.ascontiguousarray(array).reshape(-1)),
            "shape": list(array.shape),
            "scalar": isinstance(value, np.generic),
        }
    if isinstance(value, dict):
        return {"__kind__": "dict", "items": {str(k): _encode_value(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"__kind__": type(value).__name__, "items": [_encode_value(v) for v in value]}
    return value  # tensors, numbers, strings, None


def _decode_value(value):
    kind = value.get("__kind__") if isinstance(value, dict) else None
    if kind == "scipy_sparse":
        matrix = sp.coo_matrix(
            (value["data"].numpy(), (value["row"].numpy(), value["col"].numpy())), shape=tuple(value["shape"])
        )
        return matrix.asformat(value["format"])
    if kind == "numpy":
        array = value["array"].numpy().reshape(value["shape"])
        return array[()] if value["scalar"] else array
    if kind == "dict":
        return {k: _decode_value(v) for k, v in value["items"].items()}
    if kind in ("list", "tuple"):
        items = [_decode_value(v) for v in value["items"]]
        return items if kind == "list" else tuple(items)
    return value


def _rng_state(train_data) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(train_data, "generator", None)
    if generator is not None:
        state["train_generator"] = generator.get_state()
    return state


def _restore_rng_state(state: dict, train_data) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(train_data, "generator", None)
    if generator is not None and "train_generator" in state:
        generator.set_state(state["train_generator"])


def sparse_embeddings(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    """The model's embedding tables with sparse gradients."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]


class SparseDenseOptimizer:
    """Two optimisers stepped as one (the interface RecBole's trainer uses: ``zero_grad``,
    ``step``, ``state_dict``, ``load_state_dict``, ``param_groups``): one for the parameters with
    dense gradients, ``LazyAdam`` for the tables with sparse ones."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer):
        self.dense, self.sparse = dense, sparse
        self._sparse_params = [p for group in sparse.param_groups for p in group["params"]]

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups + self.sparse.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = self.dense.step(closure)
        average_sparse_grads_(self._sparse_params)  # no-op in one process
        self.sparse.step()
        return loss

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"dense", "sparse"}:
            raise CheckpointError("optimizer state is not a dense + sparse pair (saved with another propagation mode?)")
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


class SparseEmbeddingMixin:
    """Mixed in front of a RecBole trainer: lazy Adam for sparse-gradient tables (module doc)."""

    def _build_optimizer(self, **kwargs):
        learner = str(kwargs.get("learner", self.learner)).lower()
        tables = sparse_embeddings(self.model) if "params" not in kwargs and learner == "adam" else []
        if not tables:
            return super()._build_optimizer(**kwargs)
        sparse_ids = {id(m.weight) for m in tables}
        dense = [p for p in self.model.parameters() if id(p) not in sparse_ids]
        learning_rate = kwargs.get("learning_rate", self.learning_rate)
        return SparseDenseOptimizer(
            super()._build_optimizer(params=dense, **kwargs),
            LazyAdam([m.weight for m in tables], lr=learning_rate),
        )

    def sync_grad_loss(self):
        tables = sparse_embeddings(self.model)
        if not tables:
            return super().sync_grad_loss()
        sparse_ids = {id(m.weight) for m in tables}  # left out of DDP (module doc)
        return sum(torch.sum(param) * 0 for param in self.model.parameters() if id(param) not in sparse_ids)


def leave_sparse_tables_out_of_ddp(model: torch.nn.Module) -> None:
    """Name the sparse-gradient tables in DDP's ignore list (read when DDP wraps the model), and
    give them rank 0's values, as DDP does for what it wraps (RecBole seeds each rank apart)."""
    sparse = [id(m) for m in sparse_embeddings(model)]
    tables = {f"{name}.weight": m.weight for name, m in model.named_modules() if id(m) in sparse}
    if tables and is_distributed():
        ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        model._ddp_params_and_buffers_to_ignore = sorted(ignored | set(tables))
        sync_from_rank0_(*(weight.data for weight in tables.values()))


def _plain_floats(result) -> dict | None:
    return None if result is None else {str(k): float(v) for k, v in result.items()}


class PlainCheckpointMixin(SparseEmbeddingMixin):
    """Mixed in front of any RecBole trainer class (see ``plain_checkpoint_trainer``)."""

    def _plugin_init(self):
        base = Path(self.saved_model_file)
        self.saved_model_file = str(base)
        self.last_model_file = str(base.with_name(base.stem + "-last" + base.suffix))
        self.history: list[dict] = []
        self._epoch_record: dict = {}
        self._pending_rng: dict | None = None
        self._train_data = None
        self._last_finished_epoch: int | None = None

    def set_checkpoint_files(self, best: str | Path, last: str | Path) -> None:
        self.saved_model_file, self.last_model_file = str(best), str(last)

    # ------------------------------------------------------------------ checkpoints
    def _state(self, epoch: int, with_rng: bool) -> dict:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "config_json": json.dumps(jsonable_config(self.config)),
            "settings_json": json.dumps(user_settings(self.config)),
            "epoch": int(epoch),
            "cur_step": int(self.cur_step),
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": _plain_floats(self.best_valid_result),
            "best_model_file": str(self.saved_model_file),
            "history_json": json.dumps(self.history),
            "state_dict": self.model.state_dict(),
            "other_parameter": encode_other_parameter(self.model.other_parameter()),
            "optimizer": self.optimizer.state_dict(),
        }
        if with_rng:
            state["rng"] = _rng_state(self._train_data)
        return state

    def _is_writer(self) -> bool:
        return self.config["single_spec"] or self.config["local_rank"] == 0

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self._is_writer() or epoch < 0:  # RecBole saves epoch -1 when none is trained: not a result
            return
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        save_checkpoint_file(self._state(epoch, with_rng=False), path)
        if verbose:
            self.logger.info(f"Saving current best: {path}")

    def save_pretrained_model(self, epoch, saved_model_file):
        """Pre-training trainers (RaCT's): RecBole pickles its Config into ``saved_model_file``
        beside the run folders; here a plain checkpoint of that name goes into the run folder,
        and into ``best.pth`` too (a pre-training run's result is its last saved epoch)."""
        if not self._is_writer():
            return
        state = self._state(epoch, with_rng=False)
        save_checkpoint_file(state, Path(self.saved_model_file).with_name(Path(saved_model_file).name))
        save_checkpoint_file(state, self.saved_model_file)

    def _save_last(self, epoch: int) -> None:
        if self._is_writer():
            save_checkpoint_file(self._state(epoch, with_rng=True), self.last_model_file)

    def _check_model(self, state: dict, path) -> None:
        if state["model"].lower() != self.config["model"].lower():
            raise CheckpointError(
                f"checkpoint {path} was trained for model {state['model']}, not {self.config['model']}"
            )
        if state["dataset"] != self.config["dataset"]:
            raise CheckpointError(
                f"checkpoint {path} was trained on dataset {state['dataset']}, not {self.config['dataset']}"
            )

    def _load_weights(self, state: dict, path) -> None:
        try:
            self.model.load_state_dict(state["state_dict"])
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit this model's configuration: {first}") from None
        self.model.load_other_parameter(decode_other_parameter(state.get("other_parameter")))

    def resume_checkpoint(self, resume_file):
        """Continue training from ``best.pth`` or (exactly) from ``last.pth``."""
        state = load_checkpoint_file(resume_file, map_location=self.device)
        self._check_model(state, resume_file)
        self._load_weights(state, resume_file)
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = state["best_valid_result"]
        self.history = json.loads(state.get("history_json", "[]"))
        self._pending_rng = state.get("rng")
        best_file = state.get("best_model_file")
        if best_file and Path(best_file).is_file():
            self.saved_model_file = best_file
        self.logger.info(f"Checkpoint {resume_file} loaded. Resume training from epoch {self.start_epoch}")

    # ------------------------------------------------------------------ training loop hooks
    def _model_epoch_end(self) -> dict | None:
        hook = getattr(self.model, "on_epoch_end", None)
        return hook() if callable(hook) else None

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._train_data = train_data
        if self._pending_rng is not None:
            _restore_rng_state(self._pending_rng, train_data)
            self._pending_rng = None
        result = super().fit(
            train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress, callback_fn=callback_fn
        )
        self._close_epoch_record()
        if saved and self._last_finished_epoch is not None:
            self._save_last(self._last_finished_epoch)
        return result

    def _close_epoch_record(self) -> None:
        if self._epoch_record:
            self.history.append(self._epoch_record)
            self._epoch_record = {}

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self._last_finished_epoch is not None:
            # The previous epoch, its validation and early-stopping update are complete.
            self._close_epoch_record()
            self._save_last(self._last_finished_epoch)
        start = time()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        seconds = time() - start
        total = float(sum(loss)) if isinstance(loss, tuple) else float(loss)
        record = {"epoch": int(epoch_idx), "train_loss": total, "train_seconds": seconds}
        stats = self._model_epoch_end()
        if stats:
            record["model_stats"] = {k: float(v) for k, v in stats.items()}
            describe = getattr(self.model, "describe_epoch_stats", None)
            line = (
                describe(stats)
                if callable(describe)
                else ", ".join(f"{k}={v:.4g}" for k, v in record["model_stats"].items())
            )
            self.logger.info(f"epoch {epoch_idx} model stats: {line}")
        self._epoch_record = record
        self._last_finished_epoch = int(epoch_idx)
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time()
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        if self._epoch_record:
            self._epoch_record.update(
                valid_score=float(score), valid_result=_plain_floats(result), valid_seconds=time() - start
            )
        return score, result

    # ------------------------------------------------------------------ evaluation
    def load_best(self, model_file=None) -> str:
        path = model_file or self.saved_model_file
        state = load_checkpoint_file(path, map_location=self.device)
        self._check_model(state, path)
        self._load_weights(state, path)
        self.logger.info(f"Loading model structure and parameters from {path}")
        return str(path)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            self.load_best(model_file)
        return super().evaluate(eval_data, load_best_model=False, model_file=None, show_progress=show_progress)


_TRAINER_CACHE: dict[type, type] = {}


def plain_checkpoint_trainer(base: type) -> type:
    """``base`` (any RecBole trainer class) with plain checkpoints and a history."""
    if base not in _TRAINER_CACHE:

        def __init__(self, config, model):
            # RecBole's ensure_dir checks, then creates: ranks spawned by the user's own
            # launcher (not ours, which pre-creates it) would race on a fresh folder.
            Path(config["checkpoint_dir"]).mkdir(parents=True, exist_ok=True)
            leave_sparse_tables_out_of_ddp(model)
            base.__init__(self, config, model)
            self._plugin_init()

        _TRAINER_CACHE[base] = type(f"Plain{base.__name__}", (PlainCheckpointMixin, base), {"__init__": __init__})
    return _TRAINER_CACHE[base]
