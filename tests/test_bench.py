"""Benchmarks are not tests; this only checks that each bench script runs on a tiny size."""

import json
import subprocess
import sys

import pytest

from recbole_dppmg.paths import REPO_ROOT


def _run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_tokens_runs_tiny():
    out = _run("bench/bench_tokens.py", "--vectors", "2000", "--repeats", "1", "--threads", "1")
    assert "faiss speed-up" in out


def test_parity_bench_runs_tiny():
    out = _run("bench/parity_recbole.py", "-m", "Pop", "--epochs", "1")
    assert "| Pop | plugin | 1 |" in out and "True |" in out


def test_bench_stage1_runs_tiny(tmp_path):
    out = _run(
        "bench/bench_stage1.py",
        "-d",
        "synth-3000",
        "--repeats",
        "1",
        "--max-batches",
        "1",
        "--max-eval-batches",
        "3",
        "--train-batch-size",
        "256",
        "--eval-batch-size",
        "2000",
        "--data-root",
        str(tmp_path),
    )
    assert "| synth-3000 | 3,000 | DPPMG | full | text+image+id |" in out
    assert "| synth-3000 | 3,000 | LightGCN | full | id |" in out
    assert "1 of 10 batches, scaled" in out and "3 of 4 batches, scaled" in out


def _tiny_scale_args(tmp_path, *extra) -> list[str]:
    """bench_stage1.py --scale at two tiny sizes, one batch each, into ``tmp_path``."""
    return [
        "bench/bench_stage1.py",
        "--scale",
        "2000,4000",
        *extra,
        "--repeats",
        "1",
        "--max-batches",
        "1",
        "--max-eval-batches",
        "3",
        "--train-batch-size",
        "256",
        "--eval-batch-size",
        "2000",
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "out"),
    ]


def test_bench_stage1_scale_table_tiny(tmp_path):
    out = _run(*_tiny_scale_args(tmp_path, "--full-below", "3000"))
    assert "Growth exponent" in out and "| 4,000 | 200 | 50 | DPPMG | full |" in out
    assert {"scale.md", "scale.csv", "scale.json", "scale.png"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_bench_stage1_scale_table_both_modes_tiny(tmp_path):
    """--modes full,sampled: a child per size and mode, rows with a mode, the sampled rows beside the
    full ones (reused from their part files on a second call), one exponent per model and mode."""
    args = _tiny_scale_args(
        tmp_path, "--modes", "full,sampled", "--models", "DPPMG", "--fanouts", "3,2", "--set", "loss_type=bpr"
    )
    out = _run(*args)
    assert "| 4,000 | 200 | 50 | DPPMG | full | - | bpr |" in out
    assert "| 4,000 | 200 | 50 | DPPMG | sampled | 3/2 | bpr |" in out
    assert "| DPPMG | sampled | 3/2 | 2e+03, 4e+03 |" in out
    rows = json.loads((tmp_path / "out" / "scale.json").read_text())["rows"]
    assert sorted((r["interactions"], r["mode"]) for r in rows) == [
        (2000, "full"),
        (2000, "sampled"),
        (4000, "full"),
        (4000, "sampled"),
    ]
    assert (tmp_path / "out" / "synth-4000-sampled-3x2.json").is_file()
    again = _run(*args, "--reuse")
    assert "reusing" in again and "| 4,000 | 200 | 50 | DPPMG | sampled | 3/2 | bpr |" in again


def test_synthetic_cli_runs_tiny(tmp_path):
    out = _run(
        "bench/synthetic.py",
        "--interactions",
        "2e3",
        "--users",
        "100",
        "--text-dim",
        "4",
        "--image-dim",
        "3",
        "--root",
        str(tmp_path),
    )
    assert f"dataset: {tmp_path / 'synth-2000'}" in out and '"interactions": 2000' in out


def test_bench_ddp_runs_tiny(tmp_path):
    from recbole_dppmg.data.synthetic import SyntheticSpec, write_synthetic

    folder = write_synthetic(
        SyntheticSpec(interactions=2000, users=100, items=60, text_dim=4, image_dim=3, clusters=3), tmp_path, "tiny"
    )
    out = _run(
        "bench/bench_ddp.py",
        "-d",
        "tiny",
        "--nproc",
        "1,2",
        "--epochs",
        "1",
        "--data-path",
        str(tmp_path),
        "--config_files",
        str(folder / "tiny.yaml"),
        "--embedding_size=8",
        "--codebook_size=4",
    )
    assert "| 1 |" in out and "| 2 |" in out and "speed-up" in out


def test_bench_stage1_profile_runs_tiny(tmp_path):
    out = _run(
        "bench/bench_stage1.py",
        "-d",
        "synth-3000",
        "--models",
        "DPPMG",
        "--profile",
        "1",
        "--train-batch-size",
        "256",
        "--data-root",
        str(tmp_path),
    )
    assert "DPPMG on synth-3000:" in out and "| own time % |" in out


def test_make_rekeyed_ml100k_tiny(tmp_path, shared_data):
    import yaml
    from PIL import Image

    from recbole_dppmg.data.atomic import read_atomic

    out = tmp_path / "rk"
    _run("bench/make_rekeyed_ml100k.py", "--max-items", "30", "--out", str(out))
    inter = read_atomic(out / "ml-100k-rekeyed.inter")
    items = read_atomic(out / "ml-100k-rekeyed.item")
    assert list(inter.attrs["field_types"].items()) == [
        ("uid", "token"),
        ("mid", "token"),
        ("stars", "float"),
        ("ts", "float"),
    ]
    assert list(items.attrs["field_types"]) == ["mid", "name", "released", "tags", "plot", "cover"]
    assert len(inter) > 0 and inter["uid"].str.startswith("u_").all() and inter["mid"].str.startswith("m_").all()
    assert (inter["stars"] >= 3).all()
    assert list(items["mid"]) == [f"m_{i}" for i in range(1, 31)] and set(inter["mid"]) <= set(items["mid"])
    assert items.set_index("mid").loc["m_2", "tags"] == "Action|Adventure|Thriller"

    formats, missing, corrupt = set(), 0, 0
    for name in filter(None, items["cover"]):
        path = out / "covers" / name
        if not path.is_file():
            missing += 1
            continue
        try:
            with Image.open(path) as image:
                image.load()
                formats.add(image.format)
        except OSError:
            corrupt += 1
    assert formats == {"PNG", "JPEG"} and (missing, corrupt) == (5, 1)

    spec = yaml.safe_load((out / "ml-100k-rekeyed.prepare.yaml").read_text())
    assert spec["source_dir"] == "." and spec["inter_file"] == "ml-100k-rekeyed.inter"
    assert spec["user_id_field"] == "uid" and spec["item_id_field"] == "mid" and spec["tags_separator"] == "|"
    assert spec["text_fields"] == ["name", "tags", "plot"] and spec["image_dir"] == "covers"
    assert {"rating_field", "timestamp_field", "title_field", "year_field", "description_field", "tags_field"} <= set(
        spec
    )
    assert "m_" in (out / "README.md").read_text()

    again = subprocess.run(
        [sys.executable, "bench/make_rekeyed_ml100k.py", "--max-items", "30", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "--force" in again.stderr


def _fake_pipeline(root, dataset, users, seconds):
    """A finished pipeline folder with a dataset manifest and a report, as --stage all leaves them."""
    import json

    data_dir, folder = root / "dataset" / dataset, root / "saved" / dataset / "Pipeline-Jan-01-2027_00-00-00"
    report = folder / "report"
    for path in (data_dir, report):
        path.mkdir(parents=True)
    counts = {"users": users, "items": 30, "interactions": 500, "items_with_text": 30, "items_with_image": 24}
    (data_dir / "manifest.json").write_text(json.dumps({"counts": {**counts, "images_failed": 1}}))
    (report / "report.json").write_text(
        json.dumps({"conditions": {"dppmg": {"text": "run"}}, "summary": {"dppmg": {"reward": {"mean": 0.5}}}})
    )
    (report / "report.md").write_text(
        f"# Generation report: {dataset}\n\nintro\n\n| condition | reward |\n|---|---|\n"
        f"| DPPMG before RL | 0.{users} |\n\n## What the rows and columns are\n"
    )
    stages = [
        {"stage": "prepare", "status": "ran", "seconds": seconds, "output": str(data_dir), "note": None},
        {"stage": "train", "status": "ran", "seconds": 2.0, "output": "x", "note": 'test {"ndcg@10": 0.25}'},
        {"stage": "evaluate", "status": "ran", "seconds": 3.0, "output": str(report), "note": None},
    ]
    record = {"dataset": dataset, "profile": "quick", "stages": stages, "total_seconds": seconds + 5}
    (folder / "pipeline.json").write_text(json.dumps(record))
    return folder


def test_bench_any_dataset_table_from_pipelines(tmp_path):
    import json

    first = _fake_pipeline(tmp_path, "ml-100k-mm", 943, 1.5)
    second = _fake_pipeline(tmp_path, "ml-100k-rekeyed", 660, 40.0)
    out = tmp_path / "out" / "any"
    _run("bench/bench_any_dataset.py", "--from-pipelines", str(first), str(second), "--out", str(out))
    md = (tmp_path / "out" / "any.md").read_text()
    assert "| | ml-100k-mm | ml-100k-rekeyed |" in md
    assert (
        "| users | 943 | 660 |" in md and "| images_failed | 1 | 1 |" in md and "| images_missing_file | – | – |" in md
    )
    assert "| prepare | 1.5 (ran) | 40.0 (ran) |" in md and "| rl_text | – | – |" in md
    assert "| ndcg@10 | 0.25 | 0.25 |" in md
    assert "| DPPMG before RL | 0.943 |" in md and "| DPPMG before RL | 0.660 |" in md
    assert "Reproduce: `python bench/bench_any_dataset.py --datasets ml-100k-mm ml-100k-rekeyed --profile quick`" in md
    result = json.loads((tmp_path / "out" / "any.json").read_text())
    assert [d["dataset"] for d in result["datasets"]] == ["ml-100k-mm", "ml-100k-rekeyed"]
    assert result["datasets"][1]["summary"]["dppmg"]["reward"]["mean"] == 0.5
    assert result["datasets"][1]["counts"]["users"] == 660


def _fake_report(folder, seed_offset, split="test"):
    import json

    users = ["u1", "u2", "u3", "u4"]

    def interval(values):
        return {"mean": sum(values) / len(values), "per_user": values, "ci95": [0, 1], "seeds": [0], "users": 4}

    result = {
        "split": split,
        "users": users,
        "fd_real_floor": {"n": 4, "mean": 10.0 + seed_offset},
        "intervals": {
            "dppmg": {
                "gap_text_judge": interval([0.1 + seed_offset, 0.2, 0.3, 0.2]),
                "text_judge": interval([0.6, 0.7, 0.8, 0.7]),
                "image_judge": interval([0.5, 0.5, 0.6, 0.6]),
                "gap_image_heldout_judge": interval([0.2 + seed_offset, 0.1, 0.2, 0.1]),
            },
            "constant_popular": {"gap_text_judge": interval([0.0, 0.0, 0.0, 0.0])},
            "history": {"gap_image_heldout_judge": interval([0.0, 0.1, 0.0, 0.1])},
        },
        "summary": {"dppmg": {"perplexity": {"mean": 9.0 + seed_offset}, "frechet_distance": {"mean": 50.0}}},
    }
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(result))
    return folder


def test_bench_generation_pools_training_seeds_into_the_protocol_table(tmp_path):
    import json

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bench_generation

    a, b = _fake_report(tmp_path / "a", 0.0), _fake_report(tmp_path / "b", 0.2)
    variant = _fake_report(tmp_path / "v", 0.1)
    out = tmp_path / "generation.json"
    bench_generation.main(
        ["--seed", str(a), "--seed", str(b), "--variant", f"dppmg_text_tokens_only={variant}", "--out", str(out)]
    )
    table = json.loads(out.read_text())
    gap = table["text"]["dppmg"]["gap_judge"]
    assert gap["train_seed_range"] == [0.2, 0.25] and gap["ci95"][0] <= gap["mean"] <= gap["ci95"][1]
    assert table["text"]["constant_popular"]["gap_judge"]["mean"] == 0.0
    assert table["text"]["dppmg"]["perplexity"] == {"mean": 9.1, "ci95": None, "train_seed_range": [9.0, 9.2]}
    assert table["image"]["dppmg"]["fd_real_floor"]["mean"] == 10.1 and "dppmg_text_tokens_only" in table["text"]
    differences, plot = tmp_path / "differences.json", tmp_path / "gaps.png"
    bench_generation.main(
        ["--seed", str(a), "--seed", str(b), "--out", str(out), "--differences", str(differences), "--plot", str(plot)]
    )
    versus = json.loads(differences.read_text())["image"]["dppmg - history"]["gap_heldout_judge"]
    # per user (0.3, 0.1, 0.2, 0.1), the two seeds' mean, minus (0, 0.1, 0, 0.1); per seed 0.1 and 0.15
    assert versus["mean"] == pytest.approx(0.125) and versus["train_seed_range"] == pytest.approx([0.1, 0.15])
    assert versus["ci95"][0] <= versus["mean"] <= versus["ci95"][1] and plot.stat().st_size > 0
    assert table["image"]["history"]["gap_heldout_judge"]["mean"] == pytest.approx(0.05)
    valid = _fake_report(tmp_path / "valid", 0.0, split="valid")
    with pytest.raises(SystemExit, match="needs reports of the test users"):
        bench_generation.main(["--seed", str(valid), "--out", str(out)])


def _tiny_synthetic(tmp_path):
    from recbole_dppmg.data.synthetic import SyntheticSpec, write_synthetic

    return write_synthetic(
        SyntheticSpec(interactions=2000, users=100, items=60, text_dim=4, image_dim=3, clusters=3), tmp_path, "tiny"
    )


def test_bench_ddp_modes_and_seeds_tiny(tmp_path):
    folder = _tiny_synthetic(tmp_path)
    args = [
        "bench/bench_ddp.py",
        "-d",
        "tiny",
        "--modes",
        "sampled",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--data-path",
        str(tmp_path),
        "--config_files",
        str(folder / "tiny.yaml"),
        "--json",
        str(tmp_path / "ddp.json"),
        "--embedding_size=8",
        "--codebook_size=4",
        "--fanouts=[3,3]",
        "--train_batch_size=256",
        "--scaling",
        "weak",
        "--weak-lr",
        "linear",
        "--learning_rate=0.004",
    ]
    out = _run(*args)
    assert (
        "| sampled | 1 | 256 | 0.004 | 0 |" in out
        and "| sampled | 1 | 256 | 0.004 | 1 |" in out
        and "| sampled | 2 | 512 (weak scaling) | 0.008 | 0 |" in out  # twice the batch, twice the step
    )
    assert "1 process's seed range" in out
    assert len(json.loads((tmp_path / "ddp.json").read_text())) == 3
    again = _run(*args)  # every run is read back from the JSON
    assert "s/epoch, 1 epochs" not in again and "| sampled | 2 | 512 (weak scaling) | 0.008 | 0 |" in again


def test_bench_ddp_weak_learning_rate_rules():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from bench_ddp import weak_learning_rate

    assert weak_learning_rate(0.001, 2, "same") == 0.001
    assert weak_learning_rate(0.001, 2, "linear") == 0.002
    assert weak_learning_rate(0.001, 4, "sqrt") == pytest.approx(0.002)


def test_bench_sampled_tune_and_compare_tiny(tmp_path):
    folder = _tiny_synthetic(tmp_path)
    common = [
        "bench/bench_sampled.py",
        "-d",
        "tiny",
        "--config_files",
        str(folder / "tiny.yaml"),
        "--out",
        str(tmp_path / "cmp"),
        f"--data_path={tmp_path}",
        "--epochs=1",
        "--embedding_size=8",
        "--codebook_size=4",
    ]
    out = _run(*common, "--tune", "--candidates", "2,2 3,3", "--tune-seeds", "0,1")
    assert "| 3/3 | 2 |" in out and "| 2/2 | 2 |" in out and "Chosen: " in out  # 2 seeds per candidate
    out = _run(*common, "--seeds", "0")
    assert "| full | - | 1 |" in out and "| sampled |" in out and "sampled / full s/epoch" in out


def test_bench_stage1_scale_reports_a_child_stopped_by_the_memory_cap(tmp_path):
    """Under --memory-cap-gb a child that runs out is reported (exit, peak memory, last stage), and
    the other modes of that size are not run when it stopped before any model was built."""
    out = _run(
        "bench/bench_stage1.py",
        "--scale",
        "2000",
        "--modes",
        "full,sampled",
        "--memory-cap-gb",
        "0.3",
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "out"),
    )
    assert "Stopped: 2,000 interactions, mode full, under a 0.3 GiB address-space cap" in out
    assert "Not run: 2,000 interactions, mode sampled: the data stage stopped above." in out
    failed = json.loads((tmp_path / "out" / "scale.json").read_text())["failed"]
    assert failed[0]["peak_rss_mb"] > 0 and failed[0]["returncode"] != 0
