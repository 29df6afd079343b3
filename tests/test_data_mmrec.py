"""MMRec folders (.inter with x_label, text_feat.npy, image_feat.npy) through the same prepare."""

import numpy as np
import pytest
import yaml
from data_fixtures import leftovers

from recbole_dppmg.data.atomic import read_atomic, read_item_table
from recbole_dppmg.data.prepare import prepare_dataset
from recbole_dppmg.errors import DataError


def write_mmrec(root, text=None, image=None, spec_extra=None):
    raw = root / "mm"
    raw.mkdir(parents=True, exist_ok=True)
    rows = ["userID\titemID\trating\ttimestamp\tx_label"]
    rows += [f"{u}\t{(u + k) % 4}\t1\t{100 * u + k}\t{k % 3}" for u in range(3) for k in range(3)]
    (raw / "mm.inter").write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    np.save(raw / "text_feat.npy", rng.normal(size=(4, 5)).astype(np.float32) if text is None else text)
    if image is None:
        image = rng.random((4, 3)).astype(np.float32)
        image[2] = 0.0  # MMRec's convention for "no image"
    np.save(raw / "image_feat.npy", image)
    spec = {"source_dir": "mm", "format": "mmrec", **(spec_extra or {})}
    (root / "mm.prepare.yaml").write_text(yaml.safe_dump(spec))
    return root / "mm.prepare.yaml"


def run(tmp_path, spec):
    return prepare_dataset("mm", dataset_dir=tmp_path / "dataset", spec_file=spec, num_threads=1)


def test_mmrec_folder_becomes_atomic_files_with_split_files(tmp_path):
    folder = run(tmp_path, write_mmrec(tmp_path))
    items = read_item_table(folder / "mm.item", with_features=True)
    assert len(items) == 4 and len(items.loc["0", "text_feat"]) == 5 and len(items.loc["0", "image_feat"]) == 3
    assert items["image_mask"].tolist() == [1.0, 1.0, 0.0, 1.0] and items["text_mask"].tolist() == [1.0] * 4
    inter = read_atomic(folder / "mm.inter")
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp", "x_label"] and len(inter) == 9
    sizes = {s: len(read_atomic(folder / f"mm.{s}.inter")) for s in ("train", "valid", "test")}
    assert sizes == {"train": 3, "valid": 3, "test": 3}


def test_wrong_feature_width_is_named(tmp_path):
    spec = write_mmrec(tmp_path, spec_extra={"text_dim": 384})
    with pytest.raises(DataError, match=r"text_feat\.npy: feature width 5, expected 384"):
        run(tmp_path, spec)
    assert not (tmp_path / "dataset" / "mm").exists() and leftovers(tmp_path / "dataset") == []


def test_nan_features_are_named_with_item_ids(tmp_path):
    text = np.ones((4, 5), np.float32)
    text[3, 1] = np.nan
    with pytest.raises(DataError, match=r"text_feat\.npy: NaN or inf in 1 row\(s\), item ids 3"):
        run(tmp_path, write_mmrec(tmp_path, text=text))
    assert not (tmp_path / "dataset" / "mm").exists() and leftovers(tmp_path / "dataset") == []


def test_feature_files_must_agree_on_item_count(tmp_path):
    with pytest.raises(DataError, match=r"has 4 rows but .*image_feat\.npy has 6"):
        run(tmp_path, write_mmrec(tmp_path, image=np.ones((6, 3), np.float32)))


def test_not_a_matrix_is_rejected(tmp_path):
    with pytest.raises(DataError, match=r"expected a 2-D numeric array"):
        run(tmp_path, write_mmrec(tmp_path, text=np.ones(4, np.float32)))
