"""Build ml-100k as if it were a user's own dataset, to show the pipeline is not tied to ml-100k-mm.

The same movies, ratings, plots and posters as ml-100k-mm, but nothing matches what the embedded
source expects: other column names (``uid``/``mid``/``stars``/``ts``, ``name``/``released``/
``tags``/``plot``/``cover``), string ids (``u_196``, ``m_242``), genres as one ``|``-joined token,
posters in two formats (PNG for even item ids, the original JPEG for odd ones), a subset of the
interactions (ratings >= 3 of a seeded share of the users), and a few broken covers on purpose
(named but absent, and one of garbage bytes) so the image-failure paths run too. The folder gets
a prepare spec, ``<name>.prepare.yaml``, that maps these columns for ``run_dppmg.py --spec``.

    python bench/make_rekeyed_ml100k.py                       # -> .cache/ml-100k-rekeyed/
    python run_dppmg.py --stage all --profile quick -d ml-100k-rekeyed \\
        --spec .cache/ml-100k-rekeyed/ml-100k-rekeyed.prepare.yaml

The output is derived from ml-100k and the shared posters and plots, so it lives in a git-ignored
folder and must never be committed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from recbole_dppmg.data.atomic import read_atomic, sanitize_text, write_atomic
from recbole_dppmg.data.sources import PLACEHOLDER_PREFIX, recbole_ml100k_dir
from recbole_dppmg.folders import swap_into_place
from recbole_dppmg.paths import CACHE_DIR, shared_dir

logger = logging.getLogger("make_rekeyed_ml100k")

DEFAULT_NAME = "ml-100k-rekeyed"
MIN_RATING = 3
MISSING_COVERS = 5
CORRUPT_COVERS = 1
COVER_DIR = "covers"
TAGS_SEPARATOR = "|"
INTER_COLUMNS = [("uid", "token"), ("mid", "token"), ("stars", "float"), ("ts", "float")]
ITEM_COLUMNS = [
    ("mid", "token"),
    ("name", "token_seq"),
    ("released", "token"),
    ("tags", "token_seq"),
    ("plot", "token_seq"),
    ("cover", "token"),
]
# (key, value, comment) of the prepare spec; the comments say what each key maps.
SPEC_KEYS = [
    ("source_dir", ".", "folder with the files, relative to this YAML (the spec sits inside it)"),
    ("inter_file", "{name}.inter", "interactions: uid, mid, stars, ts"),
    ("item_file", "{name}.item", "one row per movie: mid, name, released, tags, plot, cover"),
    ("user_id_field", "uid", "user id column (string ids u_<ml-100k id>)"),
    ("item_id_field", "mid", "item id column (string ids m_<ml-100k id>)"),
    ("rating_field", "stars", "rating column (only ratings >= 3 are in the file)"),
    ("timestamp_field", "ts", "unix time of the rating"),
    ("like_rating", 4, "liked from 4 stars, as on ml-100k-mm (the data's own 3-5 range would give 4.5)"),
    ("title_field", "name", "movie title, shown in the dataset card"),
    ("year_field", "released", "release year"),
    ("description_field", "plot", "plot text; empty where ml-100k-mm has none or only a placeholder"),
    ("tags_field", "tags", "genres as one token joined with tags_separator"),
    ("tags_separator", "|", "separator inside tags"),
    ("text_fields", ["name", "tags", "plot"], "columns joined into the text encoder's input"),
    ("image_field", "cover", "image file name, relative to image_dir; empty = no image"),
    ("image_dir", COVER_DIR, "image folder, relative to source_dir (PNG and JPEG, some missing or corrupt)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: .cache/<name> in the repository)"
    )
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help=f"dataset name: file stem and -d value (default: {DEFAULT_NAME})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the user sample and the broken covers (default 0)")
    parser.add_argument(
        "--user-share", type=float, default=0.7, help="share of ml-100k's users kept, in (0, 1] (default 0.7)"
    )
    parser.add_argument(
        "--max-items",
        type=int,
        default=None,
        help="keep only the first N items by numeric id and their interactions (small copies for tests)",
    )
    parser.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    parser.add_argument(
        "--shared", type=Path, default=None, help="shared data folder (default: recbole_dppmg.paths.shared_dir())"
    )
    args = parser.parse_args(argv)
    if not 0 < args.user_share <= 1:
        parser.error(f"--user-share must be in (0, 1], not {args.user_share}")
    if args.max_items is not None and args.max_items < 1:
        parser.error(f"--max-items must be at least 1, not {args.max_items}")
    if not args.name or "/" in args.name or args.name.startswith("."):
        parser.error(f"--name {args.name!r} must be one plain folder name")
    return args


def real_plots(details: Path) -> dict[str, str]:
    """Plot text by ml-100k item id; the 'no plot summary yet' placeholders count as no plot."""
    plots = {}
    for record in json.loads(details.read_text(encoding="utf-8")):
        item_id = str(record.get("movie_id", "")).strip()
        text = sanitize_text(record.get("description"))
        if item_id and text and not text.startswith(PLACEHOLDER_PREFIX):
            plots[item_id] = text
    return plots


def number(value: float) -> str:
    """A float column value as written by ml-100k: integers without '.0' (timestamps keep every digit)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def pick_broken(with_poster: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(missing, corrupt) item ids among those with a poster, drawn with the seed, each list sorted."""
    need = MISSING_COVERS + CORRUPT_COVERS
    if len(with_poster) < need:
        raise SystemExit(f"only {len(with_poster)} items have a poster; {need} are needed for the broken covers")
    rng = np.random.default_rng([seed, 1])  # a stream apart from the user sample's
    drawn = [with_poster[i] for i in rng.choice(len(with_poster), size=need, replace=False)]
    return sorted(drawn[:MISSING_COVERS], key=int), sorted(drawn[MISSING_COVERS:], key=int)


def cover_name(item_id: str) -> str:
    """Even ids get a PNG, odd ids a JPEG, so one image folder mixes both formats."""
    return f"m_{item_id}.png" if int(item_id) % 2 == 0 else f"m_{item_id}.jpg"


def write_cover(source: Path, target: Path) -> None:
    """A PNG target is re-encoded with PIL; a JPEG one gets the poster's bytes unchanged."""
    if target.suffix == ".png":
        with Image.open(source) as image:
            image.convert("RGB").save(target, format="PNG")
    else:
        shutil.copyfile(source, target)


def spec_text(name: str) -> str:
    """The prepare YAML, one commented key per line."""
    lines = [
        f"# Prepare spec of {name}: ml-100k re-keyed as a user's own dataset (bench/make_rekeyed_ml100k.py).",
        f"# python run_dppmg.py --stage prepare -d {name} --spec <this file>",
    ]
    for key, value, comment in SPEC_KEYS:
        if isinstance(value, list):
            text = "[" + ", ".join(value) + "]"
        elif value == TAGS_SEPARATOR:
            text = f'"{value}"'
        elif not isinstance(value, str):
            text = str(value)
        else:
            text = value.format(name=name)
        lines.append(f"{key}: {text}".ljust(36) + f" # {comment}")
    return "\n".join(lines) + "\n"


def build(args: argparse.Namespace, folder: Path) -> dict:
    """Write the dataset into ``folder`` (empty); returns the counts for the log and README."""
    ml100k = recbole_ml100k_dir()
    mm = Path(args.shared or shared_dir()) / "data" / "ml-100k-mm"
    details, posters = mm / "details.json", mm / "posters"
    if not details.is_file() or not posters.is_dir():
        raise SystemExit(f"the shared ml-100k-mm data is missing: need {details} and {posters}/")

    movies = read_atomic(ml100k / "ml-100k.item")
    movies = movies.assign(_num=movies["item_id"].astype(int)).sort_values("_num", kind="stable")
    if args.max_items is not None:
        movies = movies.head(args.max_items)
    item_ids = list(movies["item_id"])
    kept_items = set(item_ids)

    inter = read_atomic(ml100k / "ml-100k.inter")
    users = sorted(set(inter["user_id"]), key=int)
    rng = np.random.default_rng(seed=args.seed)
    sample = {users[i] for i in rng.choice(len(users), size=round(len(users) * args.user_share), replace=False)}
    kept = inter[inter["user_id"].isin(sample) & inter["item_id"].isin(kept_items) & (inter["rating"] >= MIN_RATING)]
    write_atomic(
        folder / f"{args.name}.inter",
        INTER_COLUMNS,
        (
            (f"u_{u}", f"m_{i}", number(r), number(t))
            for u, i, r, t in zip(kept["user_id"], kept["item_id"], kept["rating"], kept["timestamp"])
        ),
    )

    plots = real_plots(details)
    with_poster = [i for i in item_ids if (posters / f"{i}.jpg").is_file()]
    missing, corrupt = pick_broken(with_poster, args.seed)
    covers = folder / COVER_DIR
    covers.mkdir()
    cover_names, formats = {}, {"png": 0, "jpg": 0}
    garbage = b"not an image: " + np.random.default_rng([args.seed, 2]).bytes(256)
    for item_id in with_poster:
        name = cover_names[item_id] = cover_name(item_id)
        if item_id in corrupt:
            (covers / name).write_bytes(garbage)
        elif item_id not in missing:
            write_cover(posters / f"{item_id}.jpg", covers / name)
            formats[name.rsplit(".", 1)[1]] += 1
    rows = [
        (
            f"m_{item_id}",
            sanitize_text(title),
            sanitize_text(year),
            TAGS_SEPARATOR.join(sanitize_text(genres).split()),
            plots.get(item_id, ""),
            cover_names.get(item_id, ""),
        )
        for item_id, title, year, genres in zip(
            movies["item_id"], movies["movie_title"], movies["release_year"], movies["class"]
        )
    ]
    write_atomic(folder / f"{args.name}.item", ITEM_COLUMNS, rows)
    (folder / f"{args.name}.prepare.yaml").write_text(spec_text(args.name), encoding="utf-8")

    counts = {
        "users_in_ml100k": len(users),
        "users_sampled": len(sample),
        "users": int(kept["user_id"].nunique()),
        "interactions_in_ml100k": len(inter),
        "interactions": len(kept),
        "items": len(item_ids),
        "items_with_interactions": int(kept["item_id"].nunique()),
        "items_with_plot": sum(1 for r in rows if r[4]),
        "items_with_cover_name": len(cover_names),
        "items_without_cover": len(item_ids) - len(cover_names),
        "covers_png": formats["png"],
        "covers_jpg": formats["jpg"],
        "covers_missing": len(missing),
        "covers_corrupt": len(corrupt),
    }
    (folder / "README.md").write_text(readme(args, counts, missing, corrupt, cover_names), encoding="utf-8")
    return {"counts": counts, "missing": missing, "corrupt": corrupt, "cover_names": cover_names}


def readme(args: argparse.Namespace, counts: dict, missing: list[str], corrupt: list[str], names: dict) -> str:
    """What the folder is, for whoever finds it later."""
    c = counts
    subset = f" (first {args.max_items} items by id only)" if args.max_items else ""
    return "\n".join(
        [
            f"# {args.name}",
            "",
            "MovieLens-100k re-keyed as a user's own dataset, made by `bench/make_rekeyed_ml100k.py` "
            f"(seed {args.seed}, user share {args.user_share}){subset}. Derived from ml-100k and the shared "
            "posters and plots: do not commit or redistribute.",
            "",
            f"- `{args.name}.inter` (`uid`, `mid`, `stars`, `ts`): {c['interactions']:,} ratings >= {MIN_RATING} "
            f"of {c['interactions_in_ml100k']:,} in ml-100k, {c['users']:,} users "
            f"({c['users_sampled']:,} of {c['users_in_ml100k']:,} sampled); ids `u_<id>` / `m_<id>`.",
            f"- `{args.name}.item` (`mid`, `name`, `released`, `tags`, `plot`, `cover`): all {c['items']:,} items "
            f"({c['items_with_interactions']:,} with interactions left), {c['items_with_plot']:,} with a real plot; "
            f"`tags` = genres joined with `{TAGS_SEPARATOR}`.",
            f"- `{COVER_DIR}/`: {c['covers_png']:,} PNG (even ids, re-encoded) and {c['covers_jpg']:,} JPEG "
            f"(odd ids, original bytes); {c['items_without_cover']:,} items have no cover (empty `cover`).",
            f"- missing on purpose (named in `.item`, no file): {', '.join(names[i] for i in missing)}",
            f"- corrupt on purpose (garbage bytes): {', '.join(names[i] for i in corrupt)}",
            f"- `{args.name}.prepare.yaml`: the prepare spec (`--spec`).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = (args.out if args.out is not None else CACHE_DIR / args.name).resolve()
    if out.exists() and not args.force:
        logger.error("%s already exists; pass --force to replace it", out)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        result = build(args, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    names = result["cover_names"]
    logger.info("covers missing on purpose: %s", ", ".join(names[i] for i in result["missing"]))
    logger.info("covers corrupt on purpose: %s", ", ".join(names[i] for i in result["corrupt"]))
    logger.info("wrote %s: %s", out, json.dumps(result["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
