"""PNG plots of stage-1 runs, read from each run folder's ``history.json``.

``training_curves.png``: training loss and validation NDCG@10 per epoch, one colour per model,
one line per seed. ``code_usage.png``: for DPPMG, codes used, perplexity and the variance left,
per modality and residual level, per epoch (the ``model_stats`` the trainer records).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from recbole_dppmg.results import RunResult
from recbole_dppmg.tables import group_by  # noqa: E402

CODE_STATS = (("codes_used", "codes used"), ("perplexity", "perplexity"), ("quant_error", "variance left"))


def load_history(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (empty when the run wrote none)."""
    path = Path(run_dir) / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def plot_training_curves(results: list[RunResult], path: str | Path) -> Path:
    """Training loss and validation NDCG@10 per epoch for every run of ``results``."""
    fig, (loss_ax, valid_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (model, runs) in enumerate(group_by(results, lambda r: r.label or r.model).items()):
        colour = colours[k % len(colours)]
        for j, run in enumerate(runs):
            history = [h for h in load_history(run.run_dir) if "train_loss" in h]
            label = model if j == 0 else None
            loss_ax.plot(
                [h["epoch"] for h in history],
                [h["train_loss"] for h in history],
                color=colour,
                alpha=0.8,
                lw=1,
                label=label,
            )
            valid = [h for h in history if "ndcg@10" in (h.get("valid_result") or {})]
            valid_ax.plot(
                [h["epoch"] for h in valid],
                [h["valid_result"]["ndcg@10"] for h in valid],
                color=colour,
                alpha=0.8,
                lw=1,
                label=label,
            )
    loss_ax.set(xlabel="epoch", ylabel="training loss (sum over batches)", yscale="log", title="Training loss")
    valid_ax.set(xlabel="epoch", ylabel="NDCG@10", title="Validation NDCG@10")
    for ax in (loss_ax, valid_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("One line per seed" if len({r.seed for r in results}) > 1 else "")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_code_usage(results: list[RunResult], path: str | Path) -> Path | None:
    """Codes used, perplexity and variance left per modality and level, per epoch, for the
    runs whose history has DPPMG's codebook statistics; None when no run has them."""
    runs = [(r, load_history(r.run_dir)) for r in results]
    runs = [(r, [h for h in hist if "model_stats" in h]) for r, hist in runs]
    runs = [(r, hist) for r, hist in runs if hist]
    if not runs:
        return None
    level_keys = [k.split("/") for k in runs[0][1][-1]["model_stats"] if "/L" in k]
    modalities = list(dict.fromkeys(parts[0] for parts in level_keys))  # in logging order
    levels = sorted({int(parts[1][1:]) for parts in level_keys})
    fig, axes = plt.subplots(
        len(CODE_STATS), len(modalities), figsize=(4.5 * len(modalities), 8), squeeze=False, sharex=True
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, modality in enumerate(modalities):
        for row, (stat, title) in enumerate(CODE_STATS):
            ax = axes[row][col]
            for j, (run, history) in enumerate(runs):
                for level in levels:
                    key = f"{modality}/L{level}/{stat}"
                    ax.plot(
                        [h["epoch"] for h in history],
                        [h["model_stats"].get(key) for h in history],
                        color=colours[level % len(colours)],
                        alpha=0.8,
                        lw=1,
                        label=f"level {level}" if j == 0 else None,
                    )
            ax.set_title(f"{modality}: {title}")
            ax.grid(alpha=0.3)
            if row == len(CODE_STATS) - 1:
                ax.set_xlabel("epoch")
            if stat == "quant_error":
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("DPPMG codebooks over all users after each epoch" + (" (one line per seed)" if len(runs) > 1 else ""))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_stage1_plots(results: list[RunResult], out_dir: str | Path) -> list[Path]:
    """Both plots into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_training_curves(results, out_dir / "training_curves.png")]
    usage = plot_code_usage([r for r in results if r.model == "DPPMG"], out_dir / "code_usage.png")
    if usage is not None:
        written.append(usage)
    return written
