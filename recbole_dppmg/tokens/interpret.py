"""What each preference token means in the data: ``codes.md`` and ``code_usage.png``.

For every code: how many users hold it, the catalogue items that score highest against its
codebook vector (for level 0 the preference itself; for deeper levels the direction the code
adds), and the tags (genres, categories) over-represented among its holders' training items (lift over
all users).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from recbole_dppmg.data.item_content import ItemContent
from recbole_dppmg.errors import DataError
from recbole_dppmg.tokens.format import token_string

logger = logging.getLogger(__name__)
TOP_ITEMS = 3
TOP_GENRES = 2
MIN_ITEM_RATINGS = 20  # items shown for a code need this many training ratings (rarer ones are noise)


def _item_labels(config, item_ids: list[str]) -> tuple[list[str], list[list[str]]]:
    """Display names (``Title (year) [id]``) and tag lists of items in internal order, read
    through the dataset's ``ItemContent``; ids alone for a dataset without a content map."""
    labels, tags = list(item_ids), [[] for _ in item_ids]
    try:
        content = ItemContent.load(config["dataset"], Path(config["data_path"]))  # RecBole joins the name
    except DataError as error:  # a plain RecBole dataset keeps the ids
        logger.warning(f"codes.md uses item ids: {error}")
        return labels, tags
    known = set(content.item_ids)
    for row, item in enumerate(item_ids):
        if item in known:
            labels[row], tags[row] = content.label(item), content.tags(item)
    return labels, tags


def _genre_lift(user_items, genres: list[list[str]], holders: np.ndarray, profile, overall, names) -> str:
    if len(holders) == 0 or profile is None:
        return ""
    lift = profile[holders].mean(0) / np.maximum(overall, 1e-9)
    best = np.argsort(-lift)[:TOP_GENRES]
    return ", ".join(f"{names[g]} x{lift[g]:.1f}" for g in best if lift[g] > 0)


def write_code_report(folder: Path, config, codes, codebooks, items, user_items, modalities, item_ids) -> list[str]:
    labels, genres = _item_labels(config, item_ids)
    names = sorted({g for gs in genres for g in gs})
    profile = overall = None
    if names:
        column = {g: k for k, g in enumerate(names)}
        item_genre = np.zeros((len(item_ids), len(names)), dtype=np.float32)
        for row, gs in enumerate(genres):
            for g in gs:
                item_genre[row, column[g]] = 1.0
        raw = np.asarray(user_items @ item_genre)
        profile = raw / np.maximum(raw.sum(1, keepdims=True), 1e-9)
        overall = profile[1:].mean(0)

    levels, size = codebooks[modalities[0]].shape[:2]
    ratings = np.asarray(user_items.sum(0)).ravel()[1:]
    shown = ratings >= min(MIN_ITEM_RATINGS, np.median(ratings))
    lines = [
        f"# Preference tokens of {config['dataset']}",
        "",
        "For every code: users holding it, the items scoring highest against its codebook vector "
        "more than the other codes of its level do (level 0: the preference; deeper levels: the direction the code "
        "adds), and the tags (genres, categories) most "
        "over-represented in its holders' training items (lift over all users). Items with fewer than "
        f"{MIN_ITEM_RATINGS} training ratings are not shown.",
        "",
    ]
    for k, m in enumerate(modalities):
        for level in range(levels):
            held = codes[1:, k, level]
            counts = np.bincount(held, minlength=size)
            scores = items[m][1:] @ codebooks[m][level].T  # [n_items-1, size]; row 0 is padding
            # What a code prefers more than the other codes do (raw scores favour popular items).
            scores = scores - scores.mean(1, keepdims=True)
            scores[~shown] = -np.inf
            lines += [
                f"## {m}, level {level} ({int((counts > 0).sum())}/{size} codes used)",
                "",
                "| token | users | top items | tags (lift) |",
                "|---|---|---|---|",
            ]
            for code in np.argsort(-counts):
                if counts[code] == 0:
                    continue
                top = np.argsort(-scores[:, code])[:TOP_ITEMS] + 1
                holders = np.nonzero(codes[:, k, level] == code)[0]
                holders = holders[holders > 0]
                genre_text = _genre_lift(user_items, genres, holders, profile, overall, names)
                top_text = "; ".join(labels[i].replace("|", "/") for i in top)
                lines.append(f"| `{token_string(m, level, int(code))}` | {counts[code]} | {top_text} | {genre_text} |")
            lines.append("")
    (folder / "codes.md").write_text("\n".join(lines))
    _plot_usage(folder / "code_usage.png", codes, modalities, levels, size)
    return ["codes.md", "code_usage.png"]


def _plot_usage(path: Path, codes, modalities, levels, size) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 3.5), squeeze=False)
    for k, m in enumerate(modalities):
        ax = axes[0, k]
        for level in range(levels):
            counts = np.sort(np.bincount(codes[1:, k, level], minlength=size))[::-1]
            used = int((counts > 0).sum())
            ax.plot(np.arange(1, size + 1), counts, label=f"level {level} ({used}/{size} used)")
        ax.set_title(f"{m}: users per code, sorted")
        ax.set_xlabel("code rank")
        ax.set_ylabel("users")
        ax.set_yscale("symlog")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
