"""Atomic files: text is sanitised on the way out and malformed rows are named on the way in."""

import numpy as np
import pandas as pd
import pytest

from recbole_dppmg.data.atomic import (
    read_atomic,
    read_item_table,
    sanitize_text,
    write_atomic,
)
from recbole_dppmg.errors import DataError


def test_sanitize_text_removes_tabs_newlines_and_double_quotes():
    assert sanitize_text('A "quoted"\tword\nand  more ') == "A 'quoted' word and more"
    assert sanitize_text(None) == "" and sanitize_text(float("nan")) == ""


def test_write_refuses_unsanitised_text(tmp_path):
    with pytest.raises(DataError, match="title.*double quote"):
        write_atomic(tmp_path / "x.item", [("item_id", "token"), ("title", "token_seq")], [("1", 'say "hi"')])


def test_float_seq_round_trip_and_recbole_style_parse(tmp_path):
    path = tmp_path / "x.item"
    vector = np.array([0.1234567, -2.5, 1e-8], dtype=np.float32)
    write_atomic(
        path,
        [("item_id", "token"), ("title", "token_seq"), ("feat", "float_seq"), ("mask", "float")],
        [("7", sanitize_text('Bob\'s "Big"\tDay'), vector, 1.0)],
    )
    frame = read_atomic(path)
    np.testing.assert_allclose(frame["feat"][0], vector, rtol=1e-6)
    assert frame["mask"][0] == 1.0 and frame.attrs["field_types"]["feat"] == "float_seq"
    # RecBole's own reader: pandas, python engine, default quoting.
    recbole_view = pd.read_csv(path, delimiter="\t", dtype=str, engine="python")
    assert recbole_view.shape == (1, 4) and recbole_view.iloc[0, 1] == "Bob's 'Big' Day"


def test_bare_quote_in_input_is_read_literally(tmp_path):
    path = tmp_path / "x.item"
    path.write_text('item_id:token\ttitle:token_seq\n1\tThe "Best\n2\tOther\n', encoding="utf-8")
    frame = read_atomic(path)
    assert frame["title"].tolist() == ['The "Best', "Other"]


def test_tab_inside_text_names_file_and_line(tmp_path):
    path = tmp_path / "x.item"
    path.write_text("item_id:token\ttitle:token_seq\n1\tfine\n2\tbroken\ttext\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.item:3: expected 2 tab-separated fields, found 3"):
        read_atomic(path)


def test_bad_header_and_non_numbers_are_named(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text("user_id\titem_id:token\n", encoding="utf-8")
    with pytest.raises(DataError, match="'user_id' is not 'name:type'"):
        read_atomic(path)
    path.write_text("item_id:token\tscore:float\n1\tabc\n", encoding="utf-8")
    with pytest.raises(DataError, match="score:float holds a non-number"):
        read_atomic(path)


def test_read_item_table_indexes_by_id_and_skips_features(tmp_path):
    path = tmp_path / "x.item"
    write_atomic(
        path,
        [("item_id", "token"), ("title", "token_seq"), ("feat", "float_seq")],
        [("1", "A", np.zeros(2)), ("2", "B", np.ones(2))],
    )
    table = read_item_table(path)
    assert table.loc["2", "title"] == "B" and "feat" not in table.columns
    assert read_item_table(path, with_features=True).loc["2", "feat"].tolist() == [1.0, 1.0]
