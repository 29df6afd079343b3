"""User-facing errors.

Anything a user can cause (a bad name, a missing file, malformed data) raises
``DPPMGError`` with a one-line message naming the problem; the command line prints
that line and exits non-zero instead of showing a traceback.
"""


class DPPMGError(Exception):
    """An error caused by the user's input, reported as one line."""


class DataError(DPPMGError):
    """A dataset file or feature is missing or malformed."""


class ConfigError(DPPMGError):
    """A configuration key, file or name is invalid."""


class CheckpointError(DPPMGError):
    """A checkpoint or export folder does not fit the requested run."""
