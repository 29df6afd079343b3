"""The RecBole dataset property file ``prepare`` writes beside the atomic files.

Why generated: the field names, which columns exist (a rating? a timestamp?) and the feature
widths are facts of one build, so the file that tells RecBole what to load comes from the same
place as the data. A hand-copied file that names ``rating`` for a dataset whose rating column
is called ``stars`` makes RecBole load every interaction as rating 1.0 without a word.
``config.property_files`` reads it before ``properties/dataset/<name>.yaml`` (optional
hand-written overrides).
"""

from __future__ import annotations

import yaml

ITEM_COLUMNS = ["item_id", "text_feat", "image_feat", "text_mask", "image_mask"]


def _value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _line(key: str, value, comment: str, indent: int = 0) -> str:
    text = " " * indent + f"{key}: {_value(value)}"
    return f"{text:<35} # {comment}"


def property_file(dataset: str, inter_columns: list[tuple[str, str]], manifest: dict, has_split_files: bool) -> str:
    """The YAML text of ``<name>.yaml`` for a prepared dataset (comments say what each key does)."""
    names = [n for n, _ in inter_columns]
    rating = "rating" if "rating" in names else None
    timestamp = "timestamp" if "timestamp" in names else None
    content = manifest.get("content") or {}
    scale = content.get("rating") or {}
    widths = {m: info["width"] for m, info in manifest["modalities"].items()}
    inter = ["user_id", "item_id", *[c for c in (rating, timestamp) if c]]
    rating_note = (
        f"ratings {scale.get('min'):g}-{scale.get('max'):g} (from {scale.get('source_field')}); every rating is an "
        "interaction"
        if rating
        else "none: implicit feedback, every interaction counts"
    )
    lines = [
        f"# RecBole dataset properties of {dataset}, written by `python run_dppmg.py --stage prepare -d {dataset}`.",
        "# Generated with the data: do not edit (the next prepare replaces it); put overrides in",
        f"# properties/dataset/{dataset}.yaml, which is read after this file. Only how to read the atomic files lives",
        "# here; the evaluation protocol (split, ordering, metrics) is in properties/overall.yaml for every dataset.",
        "# The features and masks are loaded; titles, texts and image names are not (no vocabularies): stage 2",
        "# reads them through recbole_dppmg.data.item_content.ItemContent.",
        "",
        "# Atomic File Format",
        _line("field_separator", "\t", "(str) Separator of different columns in atomic files."),
        _line("seq_separator", " ", "(str) Separator inside the sequence features (the float_seq feature vectors)."),
        "",
        "# Basic Information",
        _line(
            "USER_ID_FIELD",
            "user_id",
            f"(str) Field name of user ID feature (source: {content_field(manifest, 'user')}).",
        ),
        _line(
            "ITEM_ID_FIELD",
            "item_id",
            f"(str) Field name of item ID feature (source: {content_field(manifest, 'item')}).",
        ),
        _line("RATING_FIELD", rating, f"(str) Field name of rating feature; {rating_note}."),
        _line(
            "TIME_FIELD",
            timestamp,
            "(str) Field name of timestamp feature"
            + (f" (source: {content.get('timestamp_field')})." if timestamp else "; none in this dataset."),
        ),
        _line(
            "numerical_features", [], "(list) Float fields embedded as numbers; empty, so feature vectors stay vectors."
        ),
        "",
        "# Selectively Loading",
        "load_col:                           # (dict) The suffix of atomic files: (list) field names to be loaded.",
        _line("inter", inter, "(list) Interaction fields.", indent=4),
        _line("item", ITEM_COLUMNS, "(list) Features + masks only.", indent=4),
        _line("unload_col", None, "(dict) The suffix of atomic files: (list) field names NOT to be loaded."),
        _line(
            "unused_col", None, "(dict) The suffix of atomic files: (list) field names which are loaded but not used."
        ),
        "",
        "# Filtering",
        _line("rm_dup_inter", None, "(str) Whether to remove duplicated user-item interactions; kept as written."),
        _line("val_interval", None, "(dict) Filter inter by {field: interval}; none: all ratings kept."),
        _line("filter_inter_by_user_or_item", True, "(bool) Whether or not to filter inter by user or item."),
        _line("user_inter_num_interval", "[0,inf)", "(str) User interval for filtering inter; every user kept."),
        _line("item_inter_num_interval", "[0,inf)", "(str) Item interval for filtering inter; every item kept."),
        "",
        "# Preprocessing",
        _line("normalize_field", None, "(list) Fields to normalize; none: features and masks stay as written."),
        _line("normalize_all", None, "(bool) Normalize all float fields; off (it would min-max scale the features)."),
        _line("discretization", None, "(dict) The discretization settings; none."),
        _line("preload_weight", None, "(dict) Preloaded {ID field: vector field} weights; none (features: the .item)."),
        "",
        "# Multimodal fields written by prepare (read by the DPPMG model and the multimodal baselines)",
        _line(
            "text_feature_field", "text_feat", f"(str) float_seq field of the item's text feature ({widths['text']}-d)."
        ),
        _line(
            "image_feature_field",
            "image_feat",
            f"(str) float_seq field of the item's image feature ({widths['image']}-d).",
        ),
        _line("text_mask_field", "text_mask", "(str) float field: 1.0 if the item has a text feature, else 0.0."),
        _line("image_mask_field", "image_mask", "(str) float field: 1.0 if the item's image decoded, else 0.0."),
    ]
    missing = [m for m in widths if not manifest["counts"].get(f"items_with_{m}")]
    lines += [
        "",
        _line(
            "missing_modalities",
            missing,
            "(list) Modalities no item has; models leave these channels out"
            + (f" ({', '.join(missing)}: set image_field / text_fields in the spec to add them)." if missing else "."),
        ),
    ]
    if has_split_files:
        lines += [
            "",
            "# The source's own split is kept as <name>.train.inter / .valid.inter / .test.inter; to train on it",
            "# instead of overall.yaml's split, set in properties/dataset/<name>.yaml:",
            "# benchmark_filename: [train, valid, test]",
        ]
    return "\n".join(lines) + "\n"


def content_field(manifest: dict, kind: str) -> str:
    """The source's name of the user / item id column (for the comment)."""
    spec = (manifest.get("source") or {}).get("settings", {}).get("spec") or {}
    return str(spec.get(f"{kind}_id_field", f"{kind}_id"))
