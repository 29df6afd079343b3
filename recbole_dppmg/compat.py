"""The one place that adapts RecBole 1.2.1 to today's torch / scipy / pandas stack.

RecBole 1.2.1 (the latest release) was written for torch<2.6, scipy<1.13 and pandas<2.
Every patch here is small, idempotent, and keeps RecBole's numbers unchanged; each says
which break it fixes. ``apply()`` runs on ``import recbole_dppmg``.

Breaks handled elsewhere, by design:
- RecBole pickles its ``Config`` into checkpoints, which ``torch.load(weights_only=True)``
  (the default since torch 2.6) refuses. We never unpickle: ``recbole_dppmg.trainer``
  writes plain state dicts plus a JSON config and reads them with ``weights_only=True``.
- ``recbole.quick_start`` imports ray (which needs ``pkg_resources``) and looks models up
  by name; ``recbole_dppmg.quick_start`` replaces it and never imports it.
- numpy 2 removed ``np.float_`` that RecBole's Config re-aliases: pinned ``numpy<2``.

Multi-process training (``recbole_dppmg.distributed``): RecBole 1.2.1 starts torch.distributed
with NCCL unconditionally and wraps the model in DDP with ``device_ids=[local_rank]``, so it
only runs with one GPU per rank; ``_configurable_dist_backend`` makes the backend a config key.
"""

from __future__ import annotations

import warnings

import numpy as np

from recbole_dppmg.distributed import resolve_backend
from recbole_dppmg.errors import ConfigError

_APPLIED = False


def _restore_dok_update() -> None:
    """scipy 1.13 removed ``dok_matrix._update``, which LightGCN, NGCF, NCL, GCMC and
    SpectralCF call in ``__init__`` to bulk-insert the interaction graph."""
    import scipy.sparse as sp

    if hasattr(sp.dok_matrix, "_update"):
        return

    def _update(self, data):
        store = getattr(self, "_dict", None)
        if store is not None:  # scipy >= 1.13 keeps entries in a private dict
            store.update(data)
        else:
            dict.update(self, data)

    sp.dok_matrix._update = _update


def _fix_fill_nan() -> None:
    """RecBole fills missing values with ``df[col].fillna(..., inplace=True)``: a chained
    in-place call that pandas 2 warns about and pandas 3 silently ignores (copy-on-write).
    Same values, assigned back explicitly."""
    from recbole.data.dataset import dataset as dataset_module
    from recbole.utils import FeatureType

    def _fill_nan(self):
        for feat_name in self.feat_name_list:
            feat = getattr(self, feat_name)
            for field in feat:
                ftype = self.field2type[field]
                if ftype == FeatureType.TOKEN:
                    feat[field] = feat[field].fillna(value=0)
                elif ftype == FeatureType.FLOAT:
                    feat[field] = feat[field].fillna(value=feat[field].mean())
                else:
                    dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                    feat[field] = feat[field].apply(lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x)

    _fill_nan.__doc__ = dataset_module.Dataset._fill_nan.__doc__
    dataset_module.Dataset._fill_nan = _fill_nan


def _quiet_known_warnings() -> None:
    """Deprecation chatter from RecBole's own calls that we cannot change and that
    says nothing to a user (e.g. ``torch.cuda.amp.GradScaler``)."""
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*", category=UserWarning)
    # Dataset._load_feat's chained fillna on sequence fields: correct under the pinned
    # pandas<3 (the pin exists because of it); the warning is only about pandas 3.
    warnings.filterwarnings("ignore", message=r".*chained assignment using an inplace method.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.sparse\.SparseTensor.*is deprecated.*", category=UserWarning)


def _configurable_dist_backend() -> None:
    """RecBole's ``Config._init_device`` joins the process group with ``backend="nccl"`` and
    ``torch.cuda.set_device``, and ``AbstractTrainer`` builds ``DistributedDataParallel(model,
    device_ids=[local_rank])``: both fail on CPU. Here the backend is the config key
    ``dist_backend`` (``auto``: NCCL on CUDA, gloo on CPU), CPU ranks get DDP without device
    ids, and DDP skips the model's non-persistent buffers (derived from the dataset at
    construction, identical on every rank; a sparse adjacency cannot be broadcast at all).
    Single-process runs take RecBole's own code paths unchanged."""
    import os

    import torch
    from recbole.config.configurator import Config
    from recbole.trainer import trainer as trainer_module

    if getattr(Config._init_device, "_dppmg_patched", False):
        return
    recbole_init_device = Config._init_device

    def _init_device(self):
        values = self.final_config_dict
        if "local_rank" not in values:
            return recbole_init_device(self)

        gpu_id = values["gpu_id"]
        gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
        values["gpu_id"] = gpu_id
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
        cuda = bool(values.get("use_gpu", True)) and len(gpu_id) > 0 and torch.cuda.is_available()
        backend = resolve_backend(values.get("dist_backend"), cuda)
        local_rank = int(values["local_rank"])
        if cuda and len(gpu_id.split(",")) < values["nproc"]:
            raise ConfigError(f"nproc {values['nproc']} needs as many CUDA devices in gpu_id, got '{gpu_id}'")
        torch.distributed.init_process_group(
            backend=backend,
            rank=local_rank + int(values["offset"]),
            world_size=int(values["world_size"]),
            init_method=f"tcp://{values['ip']}:{values['port']}",
        )
        values["device"] = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        values["single_spec"] = False
        if cuda:
            torch.cuda.set_device(local_rank)
        if local_rank != 0:  # as RecBole: only rank 0 logs
            values["state"] = "error"
            values["show_progress"] = False
            values["verbose"] = False

    _init_device._dppmg_patched = True
    _init_device.__doc__ = recbole_init_device.__doc__
    Config._init_device = _init_device

    def __init__(self, config, model):
        self.config = config
        self.model = model
        if not config["single_spec"]:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            derived = set(dict(self.model.named_buffers())) - set(self.model.state_dict())
            ignored = set(getattr(self.model, "_ddp_params_and_buffers_to_ignore", ()))
            self.model._ddp_params_and_buffers_to_ignore = sorted(ignored | derived)
            on_cuda = config["device"].type == "cuda"
            self.distributed_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[config["local_rank"]] if on_cuda else None
            )

    __init__.__doc__ = trainer_module.AbstractTrainer.__init__.__doc__
    trainer_module.AbstractTrainer.__init__ = __init__


def apply() -> None:
    """Install every patch once."""
    global _APPLIED
    if _APPLIED:
        return
    _restore_dok_update()
    _fix_fill_nan()
    _configurable_dist_backend()
    _quiet_known_warnings()
    _APPLIED = True
