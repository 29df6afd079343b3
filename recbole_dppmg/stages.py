"""The stages of ``run_dppmg.py``: one table the command line and ``--stage all`` both read.

Each stage has a name (``--stage <name>``), a one-line help, the ``log/`` folder it writes to when
RecBole does not set up logging for it, whether ``--profile`` applies to it, and the steps it
contributes to ``--stage all`` (in pipeline order; the names ``--until`` takes and
``pipeline.json`` records). The command line dispatches each name to its handler
(``cli.HANDLERS``); the pipeline runs the steps (``Pipeline._<step>``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    steps: tuple[str, ...] = ()  # what the stage adds to --stage all, in order
    log: str | None = None  # log/<log>/ for stages RecBole does not log
    profile: bool = False  # --profile applies


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "build the dataset cache from its spec", ("prepare",)),
    Stage("train", "train a model (several: a comparison table; --ablation: DPPMG variants)", ("train",)),
    Stage("export", "export the DPPMG run's preference tokens", ("export",)),
    Stage("text", "train the text generator (warm-up) on a token export", ("text",), log="TextGen"),
    Stage(
        "image",
        "train the image generator on a token export (then its history baseline under --stage all)",
        ("image", "image_history"),
        log="ImageGen",
    ),
    Stage(
        "rl",
        "tune the text and image generators with RL (rl: settings), resuming unfinished runs",
        ("rl_text", "rl_image"),
        log="RL",
        profile=True,
    ),
    Stage(
        "generate", "text and poster for --users with the final generators (RL-tuned when RL finished)", log="Generate"
    ),
    Stage("text_eval", "evaluate the text generator alone on held-out users", log="TextEval"),
    Stage("evaluate", "the generation report of the newest generators", ("evaluate",), log="Report", profile=True),
    Stage("all", "the whole pipeline, skipping what is already there and valid (--profile, --until)", profile=True),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
PIPELINE_STEPS: tuple[str, ...] = tuple(step for stage in STAGES for step in stage.steps)


def stage(name: str) -> Stage:
    """The table's entry for ``name``."""
    return STAGES[STAGE_NAMES.index(name)]
