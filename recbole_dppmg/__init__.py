"""recbole_dppmg: DPPMG (Discrete Preference learning for Personalized Multimodal Generation)
as a RecBole plugin. Importing the package installs the RecBole compatibility patches."""

from recbole_dppmg import compat as _compat

_compat.apply()

__version__ = "0.1.0"
