"""The files of the evaluation report (``generation/report.py`` computes what they show).

``<run>/report/``:

- ``report.md``: the comparison table (mean ± std over the generation seeds), what each row and
  column means, the runs and settings;
- ``report.csv`` (condition, metric, mean, std, min, max, seeds) and ``per_seed.csv``;
- ``report.json``: everything, including per-seed values, the ceiling items and timings;
- ``samples.jsonl``: every generated text per user, condition and seed;
- ``reward_curves.png``: the reward components per RL step (when RL runs exist);
- ``gallery.html`` + ``gallery/``: per user the history posters, then text and poster per
  condition (first seed); self-contained (relative paths inside ``report/``).

The folder is written beside its destination and renamed into place, so a report that exists
is complete.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from recbole_dppmg.folders import swap_into_place
from recbole_dppmg.generation.image.data import load_poster, tensor_to_pil
from recbole_dppmg.runs import rl_phases  # noqa: E402
from recbole_dppmg.tokens.format import token_string

REPORT = "report"
LABELS = {
    "no_tokens": "no tokens (base LM)",
    "population": "population prompt",
    "history": "history (prompt / posters)",
    "token_items": "DPPMG tokens as retrieval keys (item titles)",
    "shuffled": "shuffled tokens",
    "soft_prompt": "continuous soft prompt",
    "dppmg": "DPPMG before RL",
    "dppmg_rl": "DPPMG after RL",
    "ceiling": "ceiling: real top recommended item",
    "constant_popular": "control: most popular item, for everyone",
    "unseen_popular": "control: most popular item the user has not seen",
}
REAL = ("ceiling", "constant_popular", "unseen_popular")  # real content: no image state, "no item" when absent
# own-minus-shuffled gaps (generation/common/protocol.py), the primary personalization measures
GAP_LABELS = {
    "gap_text_retrieval_ndcg@{k}": "text NDCG@{k}",
    "gap_text_judge": "text judge",
    "gap_text_heldout_judge": "text held-out judge",
    "gap_text_personal_similarity": "text sim. to held-out items",
    "gap_image_retrieval_ndcg@{k}": "poster NDCG@{k}",
    "gap_image_judge": "poster judge",
    "gap_image_heldout_judge": "poster held-out judge",
    "gap_image_personal_similarity": "poster sim. to held-out items",
    "gap_consistency": "consistency",
}


# poster measures whose names do not start with image_ (a condition without posters shows n/a / not run)
IMAGE_LEVELS = ("frechet_distance", "between_user_similarity", "near_duplicate_share", "median_nearest_real_similarity")


def _columns(k: int) -> list[tuple[str, str, int]]:
    """(metric, header, decimals) of the main table."""
    return [
        (f"text_hit@{k}", f"text Hit@{k}", 3),
        (f"text_ndcg@{k}", f"text NDCG@{k}", 3),
        (f"image_hit@{k}", f"poster Hit@{k}", 3),
        (f"image_ndcg@{k}", f"poster NDCG@{k}", 3),
        ("text_judge", "text judge pct", 3),
        ("image_judge", "poster judge pct", 3),
        ("text_heldout_judge", "text held-out judge", 3),
        ("image_heldout_judge", "poster held-out judge", 3),
        ("consistency", "consistency", 3),
        ("reward", "reward", 3),
        ("clip", "CLIP", 3),
        ("perplexity", "perplexity", 2),
        ("distinct2", "distinct-2", 3),
        ("degenerate_share", "degenerate", 3),
        ("frechet_distance", "Fréchet dist.", 1),
        ("between_user_similarity", "poster between-user sim.", 3),
        ("near_duplicate_share", "near-duplicate posters", 3),
    ]


def write_report(out_dir: Path, result: dict, tokens, catalogues, texts: dict, images: dict, runs) -> Path:
    """Write ``out_dir/report/`` atomically; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / REPORT
    tmp = Path(tempfile.mkdtemp(prefix=f".{REPORT}.", suffix=".tmp", dir=out_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; a report is for people to read
    try:
        (tmp / "report.json").write_text(json.dumps(result, indent=2, default=str))
        _write_csv(tmp, result)
        curves = reward_curves([rl_phases(r) for r in (runs.text_rl, runs.image_rl) if r], tmp / "reward_curves.png")
        (tmp / "report.md").write_text(markdown(result, curves is not None))
        _write_samples(tmp / "samples.jsonl", result, tokens, texts)
        write_gallery(tmp, result, tokens, catalogues, texts, images)
        swap_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- tables
def _cell(summary: dict | None, decimals: int) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    if summary["seeds"] > 1 and round(summary["std"], decimals) > 0:  # identical seeds (real content) show no spread
        return f"{summary['mean']:.{decimals}f} ± {summary['std']:.{decimals}f}"
    return f"{summary['mean']:.{decimals}f}"


def _status_cell(metric: str, status: dict) -> str | None:
    """'n/a' / 'not run' where a modality of the condition does not exist."""
    modality = (
        "text"
        if metric.startswith("text_") or metric in ("perplexity", "distinct2", "degenerate_share")
        else "image"
        if metric.startswith("image_") or metric in IMAGE_LEVELS
        else "both"
    )
    states = [status["text"], status["image"]] if modality == "both" else [status[modality]]
    for state in ("not run", "n/a"):
        if state in states:
            return state
    return None


def markdown(result: dict, has_curves: bool) -> str:
    k = result["evaluate"]["topk"]
    columns = [c for c in _columns(k) if any(c[0] in s for s in result["summary"].values())]
    runs = result["runs"]
    seeds = result["seeds"]
    split = result.get("split", "test")
    who = (
        "held-out **validation** users (settings are chosen on these)"
        if split == "valid"
        else "held-out **test** users (scored once per reported configuration)"
    )
    lines = [
        f"# Generation report: {result['dataset']}",
        "",
        f"{len(result['users'])} {who}, never trained on by either generator; generation seeds {seeds}.",
        "",
        "## Personalization: own minus shuffled",
        "",
        "Each user's content judged for that user minus judged for another evaluated user (a seeded derangement), "
        "per user, averaged over the seeds; [95% bootstrap interval over users]. Content that does not depend on the "
        "user scores 0 by construction, so the controls' rows are the yardstick.",
        "",
        *_gap_table(result, k),
        "",
        "## Absolute levels (context, not the claim: a popular item's content wins them)",
        "",
        "Cells are mean ± std over the seeds (min–max in report.csv). Fréchet distance over the posters of "
        f"{result['fd_users']} users" + _floor_text(result.get("fd_real_floor")) + ".",
        "",
        "| condition | " + " | ".join(h for _, h, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for condition, label in LABELS.items():
        status = result["conditions"][condition]
        summary = result["summary"].get(condition, {})
        cells = [
            _status_cell(metric, status) or _cell(summary.get(metric), decimals) for metric, _, decimals in columns
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## What the rows and columns are",
        "",
        "- *no tokens*: the instruction alone / the null conditioning sequence. *shuffled tokens*: another held-out "
        "user's tokens (one derangement per seed, the same for text and poster). *continuous soft prompt*: PMG-style "
        "prompt vectors from the continuous u_m, text only (the image generator has none: n/a). *DPPMG before / after "
        "RL*: the user's tokens, generators after the supervised warm-up / after RL (not run: no RL run made from "
        "these generators). *history*: the user's best-rated training items as the conditioning, no tokens: written "
        "into the text prompt (LaMP-style), and their posters as the poster generator's context "
        "(image.conditioning: history, PMG-style).",
        "- *ceiling*: the real text and poster (resized to the generator's size) of the user's top recommended item: "
        "the highest stage-1 score from the token export among items outside the user's training and validation "
        "splits. *controls*: the real content of the most popular training item, the same for everyone, and of the "
        "most popular item outside each user's training and validation splits.",
        "- *held-out judge*: a second preference model never used as a reward (EASE on the same training split with a "
        "cosine-kNN content head, reward/heldout_judge.py), as a percentile like the judge.",
        f"- *Hit@{k} / NDCG@{k}*: the catalogue ranked by cosine similarity to the generated content's features (text: "
        "MiniLM vs the items' text features; poster: EfficientNet-Lite0 vs the real posters at the generator's size), "
        "the user's training and validation items excluded, hits = the user's test items.",
        "- *judge pct*: percentile of the generated content's stage-1 score for the user among the catalogue items' "
        f"scores (reward.PreferenceJudge, user vector: {result['reward']['user_vector']}); 0.5 = a random item. "
        "*consistency*: agreement of the item distributions text and poster induce "
        f"({result['reward']['consistency_measure']}, temperature {result['reward']['consistency_temperature']}). "
        "*reward*: the weighted mean the RL optimises.",
        "- *perplexity*: of the texts under the frozen base LM (instruction without tokens as context). *distinct-2*: "
        "unique word bigrams / bigrams. *Fréchet dist.*: between EfficientNet features of generated and all real "
        "posters.",
        "",
        "## Runs",
        "",
        f"- token export: `{runs['tokens']}`",
        f"- text generator: `{runs['text']}`; after RL: `{runs['text_rl'] or 'not run'}`",
        f"- image generator: `{runs['image']}`; after RL: `{runs['image_rl'] or 'not run'}`",
        *(
            [
                f"- text RL sampled with {json.dumps(result['rl_text_sampling'])}; the evaluation samples as below, "
                "so RL's effect is measured under other decoding than it was trained with"
            ]
            if result.get("rl_text_sampling")
            else []
        ),
        f"- text sampling: {json.dumps(result['text_generation'])}; poster sampling: "
        f"{json.dumps(result['image_sampling'])}",
        f"- wall time (s): {json.dumps(result['timings'])}",
    ]
    if result.get("rl_effect"):
        lines += [
            "",
            "## DPPMG after RL vs before",
            "",
            "| metric | before | after | difference | verdict |",
            "|---|---|---|---|---|",
        ]
        for metric, e in result["rl_effect"].items():
            if "raised_beyond_seed_spread" in e:
                verdict = (
                    "raised beyond the seed spread" if e["raised_beyond_seed_spread"] else "not beyond the seed spread"
                )
            else:
                verdict = f"{e['relative_change']:+.1%}: " + ("within" if e["within_tolerance"] else "outside") + " 10%"
            lines.append(f"| {metric} | {e['before']:.4f} | {e['after']:.4f} | {e['difference']:+.4f} | {verdict} |")
        lines += [
            "",
            "Beyond the seed spread = every seed after RL scores above every seed before RL (min after > max before).",
        ]
    if has_curves:
        lines += ["", "## RL reward curves", "", "![reward curves](reward_curves.png)"]
    lines += ["", "Gallery: [gallery.html](gallery.html)."]
    return "\n".join(lines) + "\n"


def _gap_table(result: dict, k: int) -> list[str]:
    gaps = result.get("intervals") or {}
    names = [(n.format(k=k), label.format(k=k)) for n, label in GAP_LABELS.items()]
    names = [(n, label) for n, label in names if any(n in g for g in gaps.values())]
    if not names:
        return ["(no condition has content for two or more users)"]
    lines = ["| condition | " + " | ".join(label for _, label in names) + " |", "|---|" + "---|" * len(names)]
    for condition, label in LABELS.items():
        if condition not in gaps:
            continue
        cells = []
        for name, _ in names:
            g = gaps[condition].get(name)
            as_metric = name.removeprefix("gap_") if name != "gap_consistency" else "consistency"
            state = _status_cell(as_metric, result["conditions"][condition])
            cells.append(state or (f"{g['mean']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g else "–"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _floor_text(floor: dict | None) -> str:
    if not floor or floor.get("mean") is None:
        return ""
    spread = f"range {floor['min']:.1f}–{floor['max']:.1f}"
    return f" (real-vs-real floor at the same N = {floor['n']}: {floor['mean']:.1f}, {spread})"


def _write_csv(folder: Path, result: dict) -> None:
    with open(folder / "report.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["condition", "metric", "mean", "std", "min", "max", "seeds"])
        for condition, metrics in result["summary"].items():
            for metric, s in metrics.items():
                writer.writerow([condition, metric, s["mean"], s["std"], s["min"], s["max"], s["seeds"]])
    metrics = sorted({m for rows in result["per_seed"].values() for row in rows.values() for m in row})
    with open(folder / "per_seed.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["condition", "seed", *metrics])
        for condition, rows in result["per_seed"].items():
            for seed, row in rows.items():
                writer.writerow([condition, seed, *[row.get(m, "") for m in metrics]])


def _write_samples(path: Path, result: dict, tokens, texts: dict) -> None:

    with open(path, "w") as f:
        for j, user in enumerate(result["users"]):
            codes = tokens.codes_for(user)
            record = {
                "user": user,
                "tokens": [
                    token_string(m, l, int(c)) for k, m in enumerate(tokens.modalities) for l, c in enumerate(codes[k])
                ],
                "ceiling_item": result["ceiling_items"].get(user),
            }
            record.update({f"{c}/seed{s}": per_seed[s][j] for c, per_seed in texts.items() for s in per_seed})
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------- plots
def chained_history(phases: list[Path]) -> tuple[list[dict], list[int]]:
    """The per-step records of an RL chain as one history (each phase's steps continue the
    previous phase's), and the last step of every phase but the final one."""
    records, boundaries, offset = [], [], 0
    for run in phases:
        file = Path(run) / "rl_history.json"
        phase = json.loads(file.read_text()) if file.is_file() else []
        if not phase:
            continue
        if records:
            boundaries.append(offset)
        records += [{**r, "step": r["step"] + offset} for r in phase]
        offset = records[-1]["step"]
    return records, boundaries


def reward_curves(chains: list[list[Path]], path: Path) -> Path | None:
    """Mean reward components (and KL when logged) per RL step, one panel per modality's RL
    chain, a dotted line where a later phase starts."""
    histories = [(" -> ".join(Path(r).name for r in chain), *chained_history(chain)) for chain in chains]
    histories = [h for h in histories if h[1]]
    if not histories:
        return None
    fig, axes = plt.subplots(1, len(histories), figsize=(6 * len(histories), 4), squeeze=False)
    for ax, (name, records, boundaries) in zip(axes[0], histories):
        steps = [r["step"] for r in records]
        for key in sorted({k for r in records for k in r if k.startswith("reward_") and k != "reward_std"}):
            ax.plot(
                steps, [r.get(key) for r in records], label=key[len("reward_") :], lw=2 if key == "reward_total" else 1
            )
        for step in boundaries:
            ax.axvline(step + 0.5, color="black", ls=":", lw=1)
        kl = [r.get("kl") for r in records]
        if any(v is not None for v in kl):
            twin = ax.twinx()
            twin.plot(steps, kl, color="grey", ls="--", label="KL")
            twin.set_ylabel("KL to the phase's starting policy")
        ax.set(
            xlabel="RL step" + (" (dotted: next phase)" if boundaries else ""),
            ylabel="mean reward of the step's samples",
        )
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- gallery
def write_gallery(folder: Path, result: dict, tokens, catalogues, texts: dict, images: dict) -> Path:
    """``gallery.html`` with its images under ``gallery/``."""

    cfg = result["evaluate"]
    pictures = folder / "gallery"
    pictures.mkdir()
    seed = result["seeds"][0]
    conditions = [c for c in LABELS if c in texts or c in images]
    rows = []
    for j, user in enumerate(result["users"][: cfg["gallery_users"]]):
        liked = [i for i, _ in tokens.history(user, "train")]
        # with images: the liked items that have one; a text-only dataset: the liked items by title
        history = ([i for i in liked if i in catalogues.posters] if catalogues.posters else liked)[
            : cfg["gallery_history"]
        ]
        cells = []
        for k, item in enumerate(history):
            title = html.escape(catalogues.item_titles.get(item, item))
            if item in catalogues.posters:
                name = f"{user}_history{k}.png"
                tensor_to_pil(load_poster(catalogues.posters[item], 144, 96)).save(pictures / name)
                cells.append(
                    f'<figure><img src="gallery/{html.escape(name)}" width="96">'
                    f"<figcaption>{title}</figcaption></figure>"
                )
            else:
                cells.append(f"<figure><figcaption>{title}</figcaption></figure>")
        codes = tokens.codes_for(user)
        token_text = " ".join(
            token_string(m, l, int(c)) for k, m in enumerate(tokens.modalities) for l, c in enumerate(codes[k])
        )
        block = [
            f'<h2>user {html.escape(user)}</h2><p class="tokens">{html.escape(token_text)}</p>',
            '<div class="history"><b>liked in training</b>' + "".join(cells) + "</div>",
            "<table><tr>",
        ]
        for condition in conditions:
            poster = images[condition][seed][j] if condition in images else None
            if poster is not None:
                name = f"{user}_{condition}.png"
                poster.save(pictures / name)
                picture = f'<img src="gallery/{html.escape(name)}" width="128">'
            else:
                state = result["conditions"][condition]["image"] if condition not in REAL else "no item"
                picture = (
                    f'<p class="missing">{html.escape("no image" if state == "n/a" and not images else state)}</p>'
                )

            text = texts[condition][seed][j] if condition in texts else result["conditions"][condition]["text"]
            block.append(f"<td><h3>{html.escape(LABELS[condition])}</h3>{picture}<p>{html.escape(text)}</p></td>")
        block.append("</tr></table>")
        rows.append("\n".join(block))
    page = (
        f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Generation gallery: {html.escape(result["dataset"])}</title>
"""
        "<style>body{font-family:sans-serif;max-width:1500px;margin:auto} "
        f"td{{vertical-align:top;width:{100 // max(1, len(conditions))}%;font-size:13px}}\n"
        "figure{display:inline-block;margin:4px;width:100px;font-size:11px} .tokens{font-family:monospace;color:#555} "
        ".missing{color:#999}\n"
        f"""h2{{border-top:1px solid #ccc;padding-top:8px}}</style></head><body>
<h1>Generated text and poster per held-out user ({html.escape(result["dataset"])}, seed {seed})</h1>
{"".join(rows)}
</body></html>
"""
    )
    path = folder / "gallery.html"
    path.write_text(page)
    return path
