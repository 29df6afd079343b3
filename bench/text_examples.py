"""A markdown table of generated texts beside each user's history, for the README.

The users are the report's first ``--users`` evaluated users in the report's own order (the
shared split's order, not a pick), so the table cannot be cherry-picked. Each row shows the
user's best-rated training items (what the history-prompt baseline reads), their best-rated
items of the test split (what a personalized text should point to), and one text per
``--conditions`` entry from generation seed ``--seed`` of the report's ``samples.jsonl``.

    python bench/text_examples.py --report saved/ml-100k-mm/Report-text-test-2020/report \\
        --out bench/results/text_examples_ml-100k-mm.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recbole_dppmg.errors import CheckpointError

HEADERS = {"dppmg": "DPPMG", "dppmg_rl": "DPPMG after RL", "history": "history prompt", "population": "population"}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def read_samples(report: Path) -> tuple[dict, list[dict]]:
    """The report's ``report.json`` and its ``samples.jsonl`` rows, checked to belong together."""
    meta_file, samples_file = report / "report.json", report / "samples.jsonl"
    for file in (meta_file, samples_file):
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: --report must be the report/ folder of --stage evaluate")
    meta = json.loads(meta_file.read_text())
    rows = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    if [r["user"] for r in rows] != [str(u) for u in meta["users"]]:
        raise CheckpointError(f"{samples_file} does not list the users of {meta_file}")
    return meta, rows


def example_table(meta: dict, rows: list[dict], history, test_items, conditions, seed: int, users: int) -> str:
    """``history(user)`` / ``test_items(user)``: the text of those columns."""
    missing = [c for c in conditions if rows and f"{c}/seed{seed}" not in rows[0]]
    if missing:
        raise CheckpointError(f"the report has no texts of {', '.join(missing)} for generation seed {seed}")
    head = ["user", "best-rated training items", "best-rated test items"] + [HEADERS.get(c, c) for c in conditions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows[:users]:
        cells = [row["user"], history(row["user"]), test_items(row["user"])]
        cells += [row[f"{c}/seed{seed}"] for c in conditions]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    split = meta.get("split", "test")
    note = (
        f"The first {min(users, len(rows))} {split} users of `{meta['dataset']}` in the split's order (not chosen), "
        f"generation seed {seed}."
    )
    return note + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, help="the report/ folder of --stage evaluate")
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="generation seed whose texts are shown")
    parser.add_argument("--conditions", nargs="+", default=["dppmg", "history", "population"])
    parser.add_argument("--history-items", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from recbole_dppmg.data.item_content import ItemContent
    from recbole_dppmg.generation.text.baselines import HistoryText
    from recbole_dppmg.tokens import PreferenceTokens

    meta, rows = read_samples(Path(args.report))
    tokens = PreferenceTokens.load(meta["runs"]["tokens"], dataset=meta["dataset"])
    content = ItemContent.load(meta["dataset"])
    history = HistoryText(tokens, content, args.history_items)

    def test_items(user: str) -> str:
        return "; ".join(content.title(i) for i, _ in tokens.history(user, "test")[: args.history_items])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(example_table(meta, rows, history, test_items, args.conditions, args.seed, args.users))
    print(out)
    return out


if __name__ == "__main__":
    main()
