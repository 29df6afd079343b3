"""End to end with the real encoders and real data (marked e2e; skipped without the shared data).

``test_real_encoders_on_a_slice`` builds ml-100k-mm through the real ml-100k-mm source from a
20-movie slice (RecBole's ml-100k files cut to those movies, the shared posters and plots
linked in), so only 20 texts and 20 posters are encoded, then loads it with RecBole.
``test_full_build_loads_in_recbole`` checks the real, full build in dataset/ml-100k-mm when
it has been prepared (it is never built by the tests: that takes minutes).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from recbole_dppmg.data import sources
from recbole_dppmg.data.atomic import read_atomic, read_item_table, write_atomic
from recbole_dppmg.data.cache import PIPELINE_VERSION
from recbole_dppmg.data.prepare import is_prepared, prepare_dataset
from recbole_dppmg.data.sources import PLACEHOLDER_PREFIX
from recbole_dppmg.paths import dataset_root, shared_dir

SOURCE = shared_dir() / "data" / "ml-100k-mm"
needs_shared = pytest.mark.skipif(not (SOURCE / "details.json").is_file(), reason=f"shared data not found at {SOURCE}")
# Star Wars, The Empire Strikes Back (both without a plot), Return of the Jedi, then others.
STAR_WARS, SEQUELS = "50", {"172", "181"}
SLICE_SIZE = 20


def recbole_dataset(data_path, name):
    from recbole.config import Config
    from recbole.data import create_dataset

    config = Config(
        model="BPR",
        dataset=name,
        config_file_list=[str(Path(data_path) / name / f"{name}.yaml")],
        config_dict={"data_path": str(data_path), "show_progress": False, "state": "ERROR"},
    )
    dataset = create_dataset(config)
    dataset.build()  # feature tables -> padded tensors, as data_preparation does
    return dataset


def write_slice(tmp_path):
    """RecBole-style ml-100k cut to 20 movies + a shared folder with their posters and plots."""
    full = sources.recbole_ml100k_dir()
    movies = read_atomic(full / "ml-100k.item")
    details = json.loads((SOURCE / "details.json").read_text())
    placeholder = next(str(r["movie_id"]) for r in details if r["description"].startswith(PLACEHOLDER_PREFIX))
    chosen = [STAR_WARS, *sorted(SEQUELS), placeholder]
    chosen += [i for i in movies["item_id"] if i not in chosen][: SLICE_SIZE - len(chosen)]
    ml = tmp_path / "ml-100k"
    ml.mkdir()
    movies = movies[movies["item_id"].isin(chosen)]
    write_atomic(
        ml / "ml-100k.item", list(movies.attrs["field_types"].items()), movies.itertuples(index=False, name=None)
    )
    inter = read_atomic(full / "ml-100k.inter")
    inter = inter[inter["item_id"].isin(chosen)]
    write_atomic(
        ml / "ml-100k.inter", list(inter.attrs["field_types"].items()), inter.itertuples(index=False, name=None)
    )
    shared = tmp_path / "shared" / "data" / "ml-100k-mm"
    (shared / "posters").mkdir(parents=True)
    (shared / "details.json").write_text(json.dumps([r for r in details if str(r["movie_id"]) in chosen]))
    for item_id in chosen:
        poster = SOURCE / "posters" / f"{item_id}.jpg"
        if poster.is_file():
            os.symlink(poster, shared / "posters" / poster.name)
    return ml, tmp_path / "shared", chosen, placeholder, len(inter)


@pytest.mark.e2e
@needs_shared
def test_real_encoders_on_a_slice(tmp_path, monkeypatch):
    ml, shared, chosen, placeholder, n_inter = write_slice(tmp_path)
    monkeypatch.setattr(sources, "recbole_ml100k_dir", lambda: ml)
    folder = prepare_dataset("ml-100k-mm", dataset_dir=tmp_path / "dataset", shared_dir=shared, num_threads=2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {m: v["width"] for m, v in manifest["modalities"].items()} == {"text": 384, "image": 1280}
    assert manifest["counts"]["items_with_text"] == SLICE_SIZE  # every movie has a title
    assert manifest["notes"]["descriptions_placeholder"] >= 1
    table = read_item_table(folder / "ml-100k-mm.item")
    assert table.loc[placeholder, "description"] == "" and table.loc[placeholder, "description_mask"] == 0.0
    assert table.loc[STAR_WARS, "description_mask"] == 0.0 and table.loc["181", "description_mask"] == 1.0

    dataset = recbole_dataset(tmp_path / "dataset", "ml-100k-mm")
    assert (dataset.item_num - 1, dataset.inter_num) == (SLICE_SIZE, n_inter)
    feats = dataset.get_item_feature()
    assert tuple(feats["text_feat"].shape) == (SLICE_SIZE + 1, 384) and tuple(feats["image_feat"].shape) == (
        SLICE_SIZE + 1,
        1280,
    )
    rows = dataset.token2id(dataset.iid_field, chosen)
    with_poster = [(SOURCE / "posters" / f"{i}.jpg").is_file() for i in chosen]
    assert feats["image_mask"][rows].numpy().tolist() == [float(p) for p in with_poster]
    np.testing.assert_allclose(feats["text_feat"][rows].norm(dim=1).numpy(), 1.0, atol=1e-4)

    text = feats["text_feat"][rows].numpy()
    nearest = [chosen[i] for i in np.argsort(-(text @ text[0]))[1:3]]
    assert set(nearest) & SEQUELS, f"Star Wars' nearest by text are {nearest}, not its sequels"


@pytest.mark.e2e
@pytest.mark.skipif(
    not is_prepared("ml-100k-mm")
    or json.loads((dataset_root() / "ml-100k-mm" / "manifest.json").read_text()).get("format_version")
    != PIPELINE_VERSION,
    reason="dataset/ml-100k-mm not prepared by this version (run the prepare stage)",
)
def test_full_build_loads_in_recbole():
    dataset = recbole_dataset(dataset_root(), "ml-100k-mm")
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (943, 1682, 100000)
    feats = dataset.get_item_feature()
    assert tuple(feats["text_feat"].shape) == (1683, 384) and tuple(feats["image_feat"].shape) == (1683, 1280)
    assert feats["image_mask"][1:].sum().item() == 1644 and feats["text_mask"][1:].sum().item() == 1682
    missing = feats["image_mask"][1:] == 0
    assert feats["image_feat"][1:][missing].abs().sum().item() == 0.0
    table = read_item_table(dataset_root() / "ml-100k-mm" / "ml-100k-mm.item")
    assert int(table["description_mask"].sum()) == 1540
    assert not table["description"].str.startswith("It looks like").any()
