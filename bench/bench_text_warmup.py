"""Text warm-up curves side by side: validation loss and ``valid_gap`` per step of several
trained conditions (DPPMG injections, the population prompt, ...), read from their run folders.

Why: choosing how the tokens enter the LM (``text.slot_vectors``, ``text.prefix_tokens``) is a
validation-user decision, and the warm-up records both validation measures every
``text.eval_steps``; this collects them into one JSON and one PNG without re-running anything.
A run still training is read from its last checkpoint (its curve simply ends earlier).

    python bench/bench_text_warmup.py \\
        --curve plain=saved/ml-100k-mm/TextGen-A/dppmg \\
        --curve population=saved/ml-100k-mm/TextGen-A/population_prompt \\
        --out bench/results/text_warmup_injection_ml-100k-mm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recbole_dppmg.errors import CheckpointError  # noqa: E402
from recbole_dppmg.runs import TEXT_KINDS, read_run_meta  # noqa: E402

# the run settings written beside a curve
RECORDED = ("seed", "split_seed", "max_steps", "slot_vectors", "prefix_tokens")


def phase_history(folder: Path) -> tuple[list[dict], bool]:
    """The validation records of one trained condition and whether it finished."""
    done = folder / "history.json"
    if done.is_file():
        return json.loads(done.read_text()), True
    state = folder / "checkpoint" / "state.json"
    if state.is_file():
        return json.loads(state.read_text())["history"], False
    raise CheckpointError(f"{folder} holds no warm-up history (history.json or checkpoint/state.json)")


def run_settings(folder: Path) -> dict:
    """The recorded text settings of the run that holds ``folder`` (a condition's folder)."""
    return (read_run_meta(folder.parent, TEXT_KINDS) or {}).get("text", {})


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in curves.items():
        steps = [h["step"] for h in curve["history"]]
        loss_ax.plot(steps, [h["valid_loss"] for h in curve["history"]], marker=".", label=label)
        gap_ax.plot(steps, [h["valid_gap"] for h in curve["history"]], marker=".", label=label)
    loss_ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="held-out validation users' targets")
    gap_ax.set(
        xlabel="step", ylabel="other users' prompt - own (nats/token)", title="valid_gap: the part about the user"
    )
    gap_ax.axhline(0, color="grey", lw=0.5)
    loss_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curve", action="append", required=True, help="LABEL=<TextGen run>/<condition folder>")
    parser.add_argument("--out", type=Path, required=True, help="JSON file; the PNG goes beside it")
    args = parser.parse_args(argv)
    curves = {}
    for spec in args.curve:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            parser.error(f"--curve {spec!r}: give LABEL=<run>/<condition folder>")
        history, finished = phase_history(Path(folder))
        settings = run_settings(Path(folder))
        curves[label] = {
            "folder": folder,
            "finished": finished,
            "settings": {
                k: settings.get(k) for k in ("seed", "split_seed", "max_steps", "slot_vectors", "prefix_tokens")
            },
            "history": [{k: h[k] for k in ("step", "valid_loss", "valid_gap")} for h in history],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "curves": curves}, indent=2) + "\n")
    plot(curves, args.out.with_suffix(".png"))
    for label, curve in curves.items():
        last = curve["history"][-1]
        print(f"{label:>14}: step {last['step']:4d} valid loss {last['valid_loss']:.4f} gap {last['valid_gap']:+.4f}")
    return args.out


if __name__ == "__main__":
    main()
