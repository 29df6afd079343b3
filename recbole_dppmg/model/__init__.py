"""Stage-1 recommenders: DPPMG and the multimodal baseline VBPR, plus their building blocks."""

from recbole_dppmg.model.dppmg import DPPMG
from recbole_dppmg.model.quantizer import ResidualVectorQuantizer
from recbole_dppmg.model.vbpr import VBPR

MODELS = {"DPPMG": DPPMG, "VBPR": VBPR}  # plugin models by name, for the config/model lookup

__all__ = ["DPPMG", "VBPR", "ResidualVectorQuantizer", "MODELS"]
