"""Reading, sanitising and writing RecBole atomic files.

RecBole parses atomic files with ``pandas.read_csv(engine="python")`` and the default
quote character, so a bare ``"``, a tab or a newline inside a text field silently shifts
or merges columns. Everything this project writes goes through :func:`sanitize_text`
and :func:`write_atomic`, which refuse such values; everything it reads from users goes
through :func:`read_atomic`, which never interprets quotes and names the offending line
when a row has the wrong number of fields.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from recbole_dppmg.errors import DataError

FIELD_SEPARATOR = "\t"
SEQ_SEPARATOR = " "
FIELD_TYPES = ("token", "token_seq", "float", "float_seq")

_WHITESPACE_RUN = re.compile(r"\s+")
_FORBIDDEN_IN_FIELD = re.compile(r'[\t\n\r"]')


def sanitize_text(value: object) -> str:
    """One line of text safe for an atomic-file field.

    Tabs, newlines and runs of whitespace become one space; double quotes become single
    quotes (RecBole's parser treats ``"`` as a quote character); ``None``/NaN become "".
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).replace('"', "'")
    return _WHITESPACE_RUN.sub(" ", text).strip()


def split_header(header_line: str, path: Path) -> list[tuple[str, str]]:
    """``["item_id:token", ...]`` -> ``[("item_id", "token"), ...]``, checking the types."""
    columns = []
    for raw in header_line.rstrip("\r\n").split(FIELD_SEPARATOR):
        name, sep, ftype = raw.strip().rpartition(":")
        if not sep or not name or ftype not in FIELD_TYPES:
            raise DataError(f"{path}: header column {raw!r} is not 'name:type' with type in {', '.join(FIELD_TYPES)}")
        columns.append((name, ftype))
    names = [name for name, _ in columns]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DataError(f"{path}: header repeats column(s) {', '.join(duplicated)}")
    return columns


def read_atomic(path: Path, *, parse_float_seq: bool = True) -> pd.DataFrame:
    """Read an atomic file without quote handling; columns lose their ``:type`` suffix.

    Token and token_seq columns stay strings, float columns become float64 (empty -> NaN),
    float_seq columns become float32 numpy arrays (or stay strings with
    ``parse_float_seq=False``, which is much faster when features are not needed).
    The column types are kept in ``df.attrs["field_types"]``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"atomic file not found: {path}")
    with open(path, encoding="utf-8", newline="") as handle:
        header = handle.readline()
        if not header.strip():
            raise DataError(f"{path}: empty file (no header line)")
        columns = split_header(header, path)
        width = len(columns)
        rows, line_numbers = [], []
        for line_no, line in enumerate(handle, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split(FIELD_SEPARATOR)
            line_numbers.append(line_no)
            if len(fields) != width:
                raise DataError(
                    f"{path}:{line_no}: expected {width} tab-separated fields, found {len(fields)}"
                    f" (a tab inside a text field?) in row starting {fields[0][:40]!r}"
                )
            rows.append(fields)
    frame = pd.DataFrame(rows, columns=[name for name, _ in columns], dtype=object)
    for name, ftype in columns:
        if ftype == "float":
            try:
                frame[name] = pd.to_numeric(frame[name].replace("", np.nan), errors="raise").astype(np.float64)
            except (ValueError, TypeError):
                row = _first_non_number(frame[name])
                raise DataError(
                    f"{path}:{line_numbers[row]}: column {name}:float holds a non-number {frame[name].iloc[row]!r}"
                ) from None
        elif ftype == "float_seq" and parse_float_seq:
            frame[name] = [_parse_float_seq(value, path, name) for value in frame[name]]
    frame.attrs["field_types"] = dict(columns)
    return frame


def _first_non_number(column: pd.Series) -> int:
    """Position of the first value that is neither empty nor a number."""
    for position, value in enumerate(column):
        try:
            if value != "":
                float(value)
        except (ValueError, TypeError):
            return position
    return 0


def _parse_float_seq(value: str, path: Path, name: str) -> np.ndarray:
    try:
        return np.array(value.split(), dtype=np.float32)
    except ValueError:
        raise DataError(f"{path}: column {name}:float_seq holds a non-number in {value[:40]!r}") from None


def read_item_table(path: Path, *, with_features: bool = False) -> pd.DataFrame:
    """The prepared ``.item`` file as a DataFrame indexed by original item id (a string).

    Generation stages use this for titles, descriptions and poster file names; feature
    columns are skipped unless ``with_features`` (then they are float32 arrays).
    """
    frame = read_atomic(Path(path), parse_float_seq=with_features)
    types = frame.attrs["field_types"]
    if not with_features:
        frame = frame.drop(columns=[n for n, t in types.items() if t == "float_seq"])
    frame = frame.set_index("item_id", drop=False)
    frame.attrs["field_types"] = types
    return frame


def format_float_seq(vector: np.ndarray) -> str:
    """Space-separated float32 values with 7 significant digits (float32 round-trip is ~7)."""
    return SEQ_SEPARATOR.join(f"{v:.7g}" for v in np.asarray(vector, dtype=np.float32).tolist())


def format_float(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.7g}"


def write_atomic(path: Path, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]]) -> int:
    """Write rows under a ``name:type`` header; returns the row count.

    Values are written as given (already formatted strings, numbers or arrays for
    float_seq); any tab, newline or double quote in a value is an error rather than a
    silently corrupt file, so callers must sanitise text first.
    """
    path = Path(path)
    header = FIELD_SEPARATOR.join(f"{name}:{ftype}" for name, ftype in columns)
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(header + "\n")
        for row in rows:
            if len(row) != len(columns):
                raise DataError(f"{path}: row {count + 1} has {len(row)} values for {len(columns)} columns")
            fields = []
            for (name, ftype), value in zip(columns, row):
                if ftype == "float_seq" and not isinstance(value, str):
                    text = format_float_seq(value)
                elif ftype == "float" and not isinstance(value, str):
                    text = format_float(value)
                else:
                    text = str(value)
                if _FORBIDDEN_IN_FIELD.search(text):
                    raise DataError(f"{path}: value of {name} in row {count + 1} holds a tab, newline or double quote")
                fields.append(text)
            handle.write(FIELD_SEPARATOR.join(fields) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    return count
