"""Stage-1 recommenders: DPPMG and the multimodal baselines VBPR and FREEDOM, plus their building blocks."""

from recbole_dppmg.model.dppmg import DPPMG
from recbole_dppmg.model.freedom import FREEDOM
from recbole_dppmg.model.quantizer import ResidualVectorQuantizer
from recbole_dppmg.model.vbpr import VBPR

MODELS = {"DPPMG": DPPMG, "FREEDOM": FREEDOM, "VBPR": VBPR}  # plugin models by name, for the config/model lookup

__all__ = ["DPPMG", "FREEDOM", "VBPR", "ResidualVectorQuantizer", "MODELS"]
