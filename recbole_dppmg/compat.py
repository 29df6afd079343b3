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
"""

from __future__ import annotations

import warnings

import numpy as np

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
                    feat[field] = feat[field].apply(
                        lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                    )

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


def apply() -> None:
    """Install every patch once."""
    global _APPLIED
    if _APPLIED:
        return
    _restore_dok_update()
    _fix_fill_nan()
    _quiet_known_warnings()
    _APPLIED = True
