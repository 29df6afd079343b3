"""prepare on a tiny user dataset: masks, counts, caching, bad input and atomic writes."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import yaml
from data_fixtures import (
    IMAGE_DIM,
    TEXT_DIM,
    fake_encoders,
    leftovers,
    write_user_dataset,
)

from recbole_dppmg.data import prepare as prepare_module
from recbole_dppmg.data.atomic import read_atomic, read_item_table
from recbole_dppmg.data.prepare import ensure_prepared, is_prepared, prepare_dataset
from recbole_dppmg.errors import DataError


def build(tmp_path, spec, encoders=None, **kwargs):
    return prepare_dataset(
        "tiny",
        dataset_dir=tmp_path / "dataset",
        spec_file=spec,
        encoders=encoders or fake_encoders(),
        num_threads=1,
        **kwargs,
    )


def manifest_of(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_builds_atomic_files_with_features_and_masks(tmp_path):
    folder = build(tmp_path, write_user_dataset(tmp_path))
    counts = manifest_of(folder)["counts"]
    assert counts == {
        "users": 4,
        "items": 5,
        "interactions": 12,
        "interactions_dropped_unknown_item": 0,
        "items_with_text": 3,
        "items_with_image": 4,
        "images_failed": 0,
        "images_missing_file": 0,
    }
    items = read_item_table(folder / "tiny.item", with_features=True)
    assert items.attrs["field_types"]["text_feat"] == "float_seq"
    assert items["text_mask"].to_dict() == {"i1": 1.0, "i2": 1.0, "i3": 0.0, "i4": 1.0, "i5": 0.0}
    assert items["image_mask"].to_dict() == {"i1": 1.0, "i2": 1.0, "i3": 1.0, "i4": 0.0, "i5": 1.0}
    assert all(len(v) == TEXT_DIM for v in items["text_feat"]) and all(len(v) == IMAGE_DIM for v in items["image_feat"])
    assert not items.loc["i5", "text_feat"].any() and not items.loc["i4", "image_feat"].any()  # missing -> zeros
    assert items.loc["i5", "plot"] == ""  # the placeholder is not kept as if it were a plot
    inter = read_atomic(folder / "tiny.inter")
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp"] and len(inter) == 12
    card = (folder / "README.md").read_text()
    assert "Nearest neighbours" in card and "Space Saga II [i2]" in card
    assert is_prepared("tiny", tmp_path / "dataset") and leftovers(tmp_path / "dataset") == []


def test_rerun_is_a_noop_until_an_input_changes(tmp_path):
    spec = write_user_dataset(tmp_path)
    folder = build(tmp_path, spec)
    stamp = (folder / "tiny.item").stat().st_mtime_ns
    encoders = fake_encoders()
    build(tmp_path, spec, encoders)
    assert encoders["text"].calls == encoders["image"].calls == 0
    assert (folder / "tiny.item").stat().st_mtime_ns == stamp
    (tmp_path / "raw" / "images" / "i1.png").write_bytes((tmp_path / "raw" / "images" / "i3.png").read_bytes())
    build(tmp_path, spec, encoders)
    assert encoders["image"].calls == 1 and (folder / "tiny.item").stat().st_mtime_ns != stamp
    assert encoders["text"].calls == 0  # text inputs unchanged: the previous text features are reused
    build(tmp_path, spec, encoders, force=True)
    assert encoders["image"].calls == 2 and encoders["text"].calls == 1  # force trusts no cache


def test_changed_text_reencodes_text_only_and_keeps_image_features(tmp_path):
    spec = write_user_dataset(tmp_path)
    folder = build(tmp_path, spec)
    before = read_item_table(folder / "tiny.item", with_features=True)
    item_file = tmp_path / "raw" / "tiny.item"
    item_file.write_text(item_file.read_text().replace("The empire strikes back.", "The empire strikes back hard."))
    encoders = fake_encoders()
    build(tmp_path, spec, encoders)
    assert (encoders["text"].calls, encoders["image"].calls) == (1, 0)
    after = read_item_table(folder / "tiny.item", with_features=True)
    assert np.array_equal(np.stack(after["image_feat"]), np.stack(before["image_feat"]))
    assert not np.array_equal(after.loc["i2", "text_feat"], before.loc["i2", "text_feat"])
    assert np.array_equal(after.loc["i1", "text_feat"], before.loc["i1", "text_feat"])


def test_corrupt_and_missing_images_are_masked_and_counted(tmp_path):
    spec = write_user_dataset(tmp_path)
    (tmp_path / "raw" / "images" / "i2.png").write_bytes(b"not a png at all")
    (tmp_path / "raw" / "images" / "i3.png").unlink()
    folder = build(tmp_path, spec)
    manifest = manifest_of(folder)
    assert manifest["counts"]["images_failed"] == 1 and "i2" in manifest["image_failures"]
    assert manifest["counts"]["images_missing_file"] == 1 and manifest["images_missing_file"] == ["i3"]
    items = read_item_table(folder / "tiny.item", with_features=True)
    assert items.loc["i2", "image_mask"] == 0.0 and not items.loc["i2", "image_feat"].any()
    assert items.loc["i1", "image_mask"] == 1.0


def test_bare_quote_in_item_text_is_sanitised(tmp_path):
    rows = ['i1\tThe "Best\tA "quoted" plot.\ti1.png', "i2\tOther\tPlot two.\ti2.png"]
    spec = write_user_dataset(tmp_path, item_rows=rows, inter_rows=["u1\ti1\t5\t1", "u1\ti2\t4\t2"])
    folder = build(tmp_path, spec)
    recbole_view = pd.read_csv(folder / "tiny.item", delimiter="\t", dtype=str, engine="python")
    assert recbole_view.shape == (2, 8)
    assert recbole_view["title:token_seq"].tolist() == ["The 'Best", "Other"]
    assert recbole_view["plot:token_seq"][0] == "A 'quoted' plot."


def test_tab_in_item_text_fails_naming_the_line_and_leaves_nothing(tmp_path):
    rows = ["i1\tTitle\tA plot\twith a tab.\ti1.png"]
    spec = write_user_dataset(tmp_path, item_rows=rows, inter_rows=["u1\ti1\t5\t1"])
    with pytest.raises(DataError, match=r"tiny\.item:2: expected 4 tab-separated fields, found 5"):
        build(tmp_path, spec)
    assert not (tmp_path / "dataset" / "tiny").exists() and leftovers(tmp_path / "dataset") == []


def test_duplicate_item_ids_fail_and_keep_the_previous_build(tmp_path):
    spec = write_user_dataset(tmp_path)
    folder = build(tmp_path, spec)
    before = (folder / "tiny.item").read_bytes()
    rows = ["i1\tA\tPlot.\ti1.png", "i2\tB\tPlot.\ti2.png", "i2\tB again\tPlot.\ti2.png"]
    write_user_dataset(tmp_path, item_rows=rows)
    with pytest.raises(DataError, match=r"tiny\.item: duplicate item id\(s\) i2"):
        build(tmp_path, spec)
    assert (folder / "tiny.item").read_bytes() == before and leftovers(tmp_path / "dataset") == []


def test_interactions_with_unknown_items_are_dropped_and_reported(tmp_path):
    inter = ["u1\ti1\t5\t1", "u1\tghost\t4\t2", "u2\tghost\t3\t3", "u2\ti2\t3\t4"]
    folder = build(tmp_path, write_user_dataset(tmp_path, inter_rows=inter))
    manifest = manifest_of(folder)
    assert manifest["counts"]["interactions"] == 2
    assert manifest["counts"]["interactions_dropped_unknown_item"] == 2 and manifest["dangling_item_ids"] == ["ghost"]
    assert "interactions dropped (item not in `.item`) | 2" in (folder / "README.md").read_text()


def test_all_interactions_unknown_is_an_error(tmp_path):
    spec = write_user_dataset(tmp_path, inter_rows=["u1\tghost\t4\t2"])
    with pytest.raises(DataError, match="no interaction refers to an item"):
        build(tmp_path, spec)
    assert leftovers(tmp_path / "dataset") == []


def test_failure_while_writing_leaves_no_half_written_folder(tmp_path, monkeypatch):
    spec = write_user_dataset(tmp_path)

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "render_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        build(tmp_path, spec)
    assert not (tmp_path / "dataset" / "tiny").exists() and leftovers(tmp_path / "dataset") == []


def test_missing_shared_data_names_where_it_must_be(tmp_path):
    with pytest.raises(DataError, match=r"shared data at .*nowhere/data/ml-100k-mm .*DPPMG_SHARED"):
        prepare_dataset("ml-100k-mm", dataset_dir=tmp_path / "dataset", shared_dir=tmp_path / "nowhere")
    assert not (tmp_path / "dataset").exists() or leftovers(tmp_path / "dataset") == []


def test_ensure_prepared_leaves_plain_recbole_datasets_alone(tmp_path):
    assert ensure_prepared("ml-100k", dataset_dir=tmp_path) is None
    assert ensure_prepared("some-atomic-folder", dataset_dir=tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_ensure_prepared_finds_the_conventional_spec(tmp_path, monkeypatch):
    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    spec = write_user_dataset(tmp_path)
    os.replace(spec, dataset_dir / "tiny.prepare.yaml")
    (dataset_dir / "tiny.prepare.yaml").write_text(
        (dataset_dir / "tiny.prepare.yaml").read_text().replace("source_dir: raw", "source_dir: ../raw")
    )
    monkeypatch.setattr(prepare_module.featurize, "load_default_encoder", lambda m: fake_encoders()[m])
    monkeypatch.setattr(
        prepare_module.featurize, "default_encoder_versions", lambda: {"text": "fake-text==1", "image": "fake-image==1"}
    )
    assert ensure_prepared("tiny", dataset_dir=dataset_dir) == dataset_dir / "tiny"
    assert is_prepared("tiny", dataset_dir)


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    spec = write_user_dataset(tmp_path)
    (tmp_path / "dataset" / "tiny").mkdir(parents=True)
    (tmp_path / "dataset" / "tiny" / "tiny.inter").write_text("user_id:token\titem_id:token\n")
    with pytest.raises(DataError, match="refusing to replace"):
        build(tmp_path, spec)


def test_spec_naming_a_missing_field_is_an_error(tmp_path):
    spec = write_user_dataset(tmp_path, extra_spec={"text_fields": ["title", "synopsis"]})
    with pytest.raises(DataError, match="names field 'synopsis'"):
        build(tmp_path, spec)


def test_recbole_loads_the_prepared_features(tmp_path):
    recbole_config = pytest.importorskip("recbole.config")
    from recbole.data import create_dataset

    build(tmp_path, write_user_dataset(tmp_path))
    config = recbole_config.Config(
        model="BPR",
        dataset="tiny",
        config_file_list=[str(tmp_path / "dataset" / "tiny" / "tiny.yaml")],  # written by prepare
        config_dict={"data_path": str(tmp_path / "dataset"), "show_progress": False, "state": "ERROR"},
    )
    dataset = create_dataset(config)
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (4, 5, 12)
    dataset.build()  # turns the feature tables into padded tensors, as data_preparation does
    feats = dataset.get_item_feature()
    assert tuple(feats["text_feat"].shape) == (6, TEXT_DIM) and tuple(feats["image_feat"].shape) == (6, IMAGE_DIM)
    row = dataset.token2id(dataset.iid_field, "i4")
    assert feats["image_mask"][row].item() == 0.0 and feats["text_mask"][row].item() == 1.0
    assert feats["text_feat"].abs().max().item() <= 1.0 + 1e-5  # not min-max normalised: unit vectors stay unit
    norms = np.linalg.norm(feats["text_feat"].numpy(), axis=1)
    assert np.allclose(norms[feats["text_mask"].numpy() == 1.0], 1.0, atol=1e-5)


def test_prepared_copy_is_used_when_raw_inputs_are_gone(tmp_path, monkeypatch):
    spec = write_user_dataset(tmp_path)
    folder = build(tmp_path, spec)
    (tmp_path / "raw" / "tiny.inter").unlink()
    assert ensure_prepared("tiny", dataset_dir=tmp_path / "dataset", spec_file=spec) == folder
    assert is_prepared("tiny", tmp_path / "dataset")


def test_leftovers_of_a_killed_run_are_cleaned_up(tmp_path):
    dataset_dir = tmp_path / "dataset"
    (dataset_dir / ".tiny.tmp-999999999-abc").mkdir(parents=True)
    (dataset_dir / ".tiny.old-999999999-123").mkdir()
    build(tmp_path, write_user_dataset(tmp_path))
    assert leftovers(dataset_dir) == []


def test_a_second_prepare_waits_for_the_first(tmp_path):
    import fcntl
    import threading

    spec = write_user_dataset(tmp_path)
    lock_dir = tmp_path / "dataset" / ".locks"
    lock_dir.mkdir(parents=True)
    with open(lock_dir / "tiny.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=build, args=(tmp_path, spec))
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not is_prepared("tiny", tmp_path / "dataset")
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=30)
    assert not worker.is_alive() and is_prepared("tiny", tmp_path / "dataset")


def test_the_manifest_maps_roles_and_the_property_file_loads_rating_and_timestamp(tmp_path):
    spec = write_user_dataset(tmp_path, extra_spec={"description_field": "plot", "like_rating": 2})
    folder = build(tmp_path, spec)
    content = manifest_of(folder)["content"]
    assert content["fields"] == {"title": "title", "year": None, "description": "plot", "tags": None, "image": "image"}
    assert content["rating"] == {"source_field": "rating", "like_rating": 2.0, "min": 1.0, "max": 3.0}
    assert content["image_dir"] == str((tmp_path / "raw" / "images").resolve()) and content["spec"] == str(spec)
    properties = yaml.safe_load((folder / "tiny.yaml").read_text())
    assert (properties["RATING_FIELD"], properties["TIME_FIELD"]) == ("rating", "timestamp")
    assert properties["load_col"]["inter"] == ["user_id", "item_id", "rating", "timestamp"]
    assert properties["missing_modalities"] == []


def test_a_renamed_rating_is_found_and_an_implicit_dataset_has_none(tmp_path):
    inter = [f"u{u}\ti{1 + (u + k) % 5}\t{2 * k}\t{k}" for u in range(1, 5) for k in range(3)]
    write_user_dataset(tmp_path, inter_rows=inter)
    raw = tmp_path / "raw" / "tiny.inter"
    raw.write_text(raw.read_text().replace("rating:float\ttimestamp:float", "stars:float\twhen:float"))
    spec = tmp_path / "tiny.prepare.yaml"
    values = yaml.safe_load(spec.read_text())
    spec.write_text(yaml.safe_dump({**values, "rating_field": "stars"}))
    folder = build(tmp_path, spec)
    assert manifest_of(folder)["content"]["rating"]["like_rating"] == 3.0  # 3/4 up 0-4
    assert read_atomic(folder / "tiny.inter").columns.tolist() == ["user_id", "item_id", "rating", "when"]
    properties = yaml.safe_load((folder / "tiny.yaml").read_text())
    assert properties["TIME_FIELD"] is None and properties["load_col"]["inter"] == ["user_id", "item_id", "rating"]

    spec.write_text(yaml.safe_dump(values))  # no rating_field and no column called rating: implicit feedback
    folder = build(tmp_path, spec, force=True)
    assert manifest_of(folder)["content"]["rating"] is None
    assert yaml.safe_load((folder / "tiny.yaml").read_text())["RATING_FIELD"] is None


@pytest.mark.parametrize(
    "extra, inter_header, message",
    [
        ({"rating_field": "stars"}, None, "sets rating_field: stars, but the header has no such column"),
        ({"rating_field": "user"}, None, "rating_field column 'user' must be of type float, not token"),
        ({"timestamp_field": "when"}, None, "sets timestamp_field: when, but the header has no such column"),
        ({"like_rating": "lots"}, None, "like_rating must be a number, not 'lots'"),
        ({"description_field": "blurb"}, None, "names field 'blurb' \\(description_field\\), which the file lacks"),
        ({"tags_field": ["a", "b"]}, None, "tags_field must be a column name"),
        ({"image_dir": None}, None, "image_field is set but image_dir is not"),
    ],
)
def test_bad_role_keys_name_the_key_and_leave_nothing(tmp_path, extra, inter_header, message):
    spec = write_user_dataset(tmp_path, extra_spec=extra)
    with pytest.raises(DataError, match=message):
        build(tmp_path, spec)
    assert not (tmp_path / "dataset" / "tiny").exists() and leftovers(tmp_path / "dataset") == []


def test_an_empty_rating_names_the_row(tmp_path):
    inter = [f"u{u}\ti{1 + (u + k) % 5}\t{'' if (u, k) == (2, 1) else 4}\t{k}" for u in range(1, 5) for k in range(3)]
    spec = write_user_dataset(tmp_path, inter_rows=inter, extra_spec={"rating_field": "rating"})
    with pytest.raises(DataError, match="rating_field column 'rating' is empty in 1 row"):
        build(tmp_path, spec)
