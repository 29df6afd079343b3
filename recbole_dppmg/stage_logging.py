"""RecBole's console + file logger for the stages RecBole itself does not run.

``--stage text|image|generate|evaluate`` never build a RecBole ``Config``, so nothing set up
logging and their progress (validation losses, timings, where files went) was dropped. They
get RecBole's own ``init_logger``: the same format on the console and a file
``log/<Stage>/<Stage>-<dataset>-<time>-<hash>.log``.
"""

from __future__ import annotations

import logging
from pathlib import Path


class _StageLogConfig(dict):
    """The four things ``recbole.utils.init_logger`` reads from a ``Config``."""

    def __init__(self, stage: str, dataset: str, state: str = "info"):
        super().__init__(model=stage, dataset=dataset, state=state)
        self.final_config_dict = dict(self)


def init_stage_logger(stage: str, dataset: str) -> None:
    """Log INFO to the console and ``log/<stage>/`` unless this process already logs (a
    RecBole stage that ran before in the same process set the root handlers)."""
    if logging.getLogger().handlers:
        return
    from recbole.utils import init_logger

    # RecBole checks, then creates log/<stage>: two stages started together would crash one of them
    Path("log", stage).mkdir(parents=True, exist_ok=True)
    init_logger(_StageLogConfig(stage, dataset))
