"""Stage-1 comparison over seeds, the ablation table, the plots and their command-line flags."""

import csv
import math

import pytest
from tiny_mm import tiny_config, write_tiny_mm

from recbole_dppmg.cli import COMPARISON_SEEDS, parse_args, parse_seeds
from recbole_dppmg.errors import ConfigError, DataError, DPPMGError
from recbole_dppmg.model import DPPMG
from recbole_dppmg.quick_start import (
    RunResult,
    ablation,
    ablation_variants,
    compare,
    compare_runs,
)
from recbole_dppmg.tables import fmt_spread, spread, write_ablation, write_comparison

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_result(model, seed, ndcg, seconds=1.0, label="", quantized=None, continuous=None, used=(8, 6)):
    extra = {}
    if quantized is not None:
        extra = {
            "test_quantized": {"ndcg@10": quantized},
            "test_continuous": {"ndcg@10": continuous},
            "quantizer": {"modalities": ["text", "image"], "levels": 2, "codebook_size": 8, "graph_users": 30},
            "code_stats": {
                "text/L0/codes_used": used[0],
                "image/L0/codes_used": used[1],
                "text/L0/perplexity": 7.0,
                "image/L0/perplexity": 5.0,
                "text/L1/quant_error": 0.1,
                "image/L1/quant_error": 0.3,
            },
        }
    metrics = {m: ndcg for m in ("recall@10", "ndcg@10", "hit@10", "recall@20", "ndcg@20", "hit@20")}
    return RunResult(
        model=model,
        dataset="toy",
        best_valid_score=ndcg,
        best_valid_result={"ndcg@10": ndcg - 0.05},
        test_result=metrics,
        epochs_trained=10,
        seconds_per_epoch=seconds,
        peak_memory_mb=5.0,
        run_dir=f"/nowhere/{model}-{seed}",
        checkpoint="",
        extra=extra,
        seed=seed,
        label=label,
    )


def test_spread_is_median_min_max_of_finite_values():
    assert spread([0.3, 0.1, 0.2]) == (0.2, 0.1, 0.3)
    assert spread([0.1, float("nan"), 0.3]) == (0.2, 0.1, 0.3)
    assert all(math.isnan(v) for v in spread([]))
    assert fmt_spread([0.31, 0.29, 0.30]) == "0.3000 [0.2900, 0.3100]"
    assert fmt_spread([0.3]) == "0.3000"
    assert fmt_spread([float("nan")]) == "-"


def test_comparison_table_over_seeds(tmp_path):
    results = [
        fake_result("LightGCN", 1, 0.30, seconds=2.0),
        fake_result("DPPMG", 1, 0.31, 3.0, quantized=0.31, continuous=0.32),
        fake_result("LightGCN", 2, 0.29, seconds=2.0),
        fake_result("DPPMG", 2, 0.33, 4.0, quantized=0.33, continuous=0.30),
        fake_result("LightGCN", 3, 0.32, seconds=2.0),
        fake_result("DPPMG", 3, 0.30, 2.0, quantized=0.30, continuous=0.30, used=(8, 4)),
    ]
    md_path, csv_path = write_comparison(results, tmp_path)
    text = md_path.read_text()
    assert "| LightGCN | 0.3000 [0.2900, 0.3200]" in text
    assert "| DPPMG | 0.3100 [0.3000, 0.3300]" in text
    assert "Seeds 1, 2, 3" in text
    # per seed: DPPMG s/epoch over LightGCN's of the same seed
    assert "1.50, 2.00, 1.00; median 1.50" in text
    # quantized / continuous per seed, level-0 usage = the worse modality
    assert "| 2 | 0.3300 | 0.3000 | 1.100 | 0.750 |" in text
    assert "| 3 | 0.3000 | 0.3000 | 1.000 | 0.500 |" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in rows] == ["LightGCN", "DPPMG"]
    assert rows[0]["ndcg@10"] == "0.3000" and rows[0]["ndcg@10 min"] == "0.2900" and rows[0]["seeds"] == "3"
    assert b"\r" not in (tmp_path / "runs.csv").read_bytes()  # LF lines: a shell's last column has no \r
    runs = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert len(runs) == 6 and runs[1]["test ndcg@10 quantized"] == "0.3100"


def test_ablation_table(tmp_path):
    variants = {"defaults": {}, "levels 1": {"levels": 1}}
    results = [
        fake_result("DPPMG", s, 0.30 + 0.01 * s, label=label, quantized=0.30 + 0.01 * s, continuous=0.30)
        for s in (0, 1)
        for label in variants
    ]
    md_path, csv_path = write_ablation(results, variants, tmp_path)
    text = md_path.read_text()
    assert "| defaults | (defaults) | 2 | 0.2550 [0.2500, 0.2600] | 0.3050 [0.3000, 0.3100]" in text
    assert "| levels 1 | levels=1 | 2 |" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["variant"] for r in rows] == ["defaults", "levels 1"]
    assert rows[0]["level-0 usage"] == "0.750" and rows[0]["variance left"] == "0.2000"
    assert rows[0]["users per level-0 code"] == "5.0"  # 30 users over the 6 codes image uses


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory):
    root = write_tiny_mm(tmp_path_factory.mktemp("data"))
    config = tiny_config(DPPMG, root)
    keys = (
        "data_path",
        "load_col",
        "text_feature_field",
        "image_feature_field",
        "text_mask_field",
        "image_mask_field",
        "eval_args",
        "metrics",
        "topk",
        "valid_metric",
        "train_batch_size",
        "eval_batch_size",
        "learning_rate",
        "embedding_size",
        "levels",
        "codebook_size",
        "modalities",
    )
    values = {k: config[k] for k in keys}
    values.update(
        data_path=str(root),
        use_gpu=False,
        state="WARNING",
        show_progress=False,
        torch_num_threads=1,
        epochs=2,
        metrics=["Recall", "NDCG", "Hit"],
        topk=[10, 20],
        valid_metric="NDCG@10",
        kmeans_warmup_epochs=0,
    )
    return values


def test_compare_over_seeds_writes_tables_and_plots(tiny_settings, tmp_path):
    settings = dict(tiny_settings, checkpoint_dir=str(tmp_path / "saved"))
    results, md_path = compare(
        ["LightGCN", "DPPMG"], "tiny", config_dict=settings, seeds=[0, 1], out_dir=tmp_path / "cmp"
    )
    assert [(r.model, r.seed) for r in results] == [("LightGCN", 0), ("DPPMG", 0), ("LightGCN", 1), ("DPPMG", 1)]
    assert results[0].run_dir != results[2].run_dir
    prefixes = results[1].extra["test_quantized_levels"]
    assert list(prefixes) == ["1", "2"] and prefixes["2"] == results[1].extra["test_quantized"]["ndcg@10"]
    text = md_path.read_text()
    assert "Seeds 0, 1" in text and "quantized versus continuous" in text and "DPPMG / LightGCN" in text
    assert "first l codes" in text and "l = 2: " in text
    for name in ("training_curves.png", "code_usage.png"):
        data = (tmp_path / "cmp" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_ablation_runs_each_variant_and_seed(tiny_settings, tmp_path):
    settings = dict(tiny_settings, checkpoint_dir=str(tmp_path / "saved"), epochs=1)
    variants = {"defaults": {}, "levels 1": {"levels": 1}}
    results, md_path = ablation("tiny", config_dict=settings, seeds=[0], variants=variants, out_dir=tmp_path / "abl")
    assert [r.label for r in results] == ["defaults", "levels 1"]
    assert results[1].extra["quantizer"]["levels"] == 1
    assert "| levels 1 | levels=1 | 1 |" in md_path.read_text()


def test_ablation_variants_are_one_factor_at_a_time(tiny_settings):
    variants = ablation_variants("tiny", config_dict=tiny_settings)
    assert variants == {
        "defaults": {},
        "text only": {"modalities": ["text"]},
        "image only": {"modalities": ["image"]},
        "levels 1": {"levels": 1},
        "levels 3": {"levels": 3},
        "codebook 32": {"codebook_size": 32},
        "codebook 64": {"codebook_size": 64},
        "codebook 256": {"codebook_size": 256},
    }
    only_codebooks = ablation_variants("tiny", config_dict=tiny_settings, factors=["codebook"])
    assert list(only_codebooks) == ["defaults", "codebook 32", "codebook 64", "codebook 256"]
    with pytest.raises(ConfigError, match="unknown ablation factor.*'layers'"):
        ablation_variants("tiny", config_dict=tiny_settings, factors=["layers"])
    with_id = ablation_variants("tiny", config_dict=dict(tiny_settings, modalities=["text", "image", "id"]))
    assert with_id["text only + id"] == {"modalities": ["text", "id"]}
    assert with_id["without id"] == {"modalities": ["text", "image"]}


def test_parallel_jobs_keep_task_order(tiny_settings, tmp_path):
    settings = dict(tiny_settings, checkpoint_dir=str(tmp_path / "saved"), epochs=1)
    results, _ = compare(["BPR", "DPPMG"], "tiny", config_dict=settings, seeds=[3], jobs=2, out_dir=tmp_path / "cmp")
    assert [(r.model, r.seed) for r in results] == [("BPR", 3), ("DPPMG", 3)]


def test_seed_flags():
    assert parse_seeds("[2020, 2021,2022]") == [2020, 2021, 2022]
    assert parse_seeds("7") == [7]
    assert parse_seeds(None) is None
    with pytest.raises(DPPMGError, match="--seeds"):
        parse_seeds("[a,b]")
    args, models, _, _ = parse_args(["-m", "BPR,DPPMG", "--seeds=[1,2]", "--jobs=2", "--out=x"])
    assert args.seeds == [1, 2] and args.jobs == 2 and args.out == "x" and models == ["BPR", "DPPMG"]
    assert len(COMPARISON_SEEDS) == 3
    with pytest.raises(DPPMGError, match="--jobs"):
        parse_args(["--jobs=0"])
    assert parse_args(["--ablation"])[0].ablation == "modalities,levels,codebook"
    assert parse_args(["--ablation=codebook"])[0].ablation == "codebook"


def test_bad_seed_list_is_a_config_error(tiny_settings, tmp_path):
    with pytest.raises(ConfigError, match="seeds"):
        compare(["BPR"], "tiny", config_dict=tiny_settings, seeds=[], out_dir=tmp_path)


def test_tables_from_finished_run_folders(tiny_settings, tmp_path):
    settings = dict(tiny_settings, checkpoint_dir=str(tmp_path / "saved"), epochs=1)
    results, _ = compare(["BPR"], "tiny", config_dict=settings, seeds=[4, 5], out_dir=tmp_path / "a")
    loaded, md_path = compare_runs([r.run_dir for r in results], tmp_path / "b")
    assert [(r.model, r.seed) for r in loaded] == [("BPR", 4), ("BPR", 5)]
    assert loaded[0].test_result == results[0].test_result
    assert "| BPR |" in md_path.read_text() and (tmp_path / "b" / "training_curves.png").is_file()
    with pytest.raises(DataError, match="no result.json"):
        compare_runs([tmp_path], tmp_path / "c")
