"""bench_rl.py combine: seeds measured by parallel calls are joined, and after - before is paired by user."""

import json
import subprocess
import sys

import pytest

from recbole_dppmg.paths import REPO_ROOT

RUNS = {"text_before": "T0", "text_after": "T1", "image_before": "I0", "image_after": "I0"}


def _part(seeds, shift):
    """A measure output where every user's text judge rises by ``shift`` after RL."""
    before = {0: [0.2, 0.4, 0.6], 1: [0.3, 0.5, 0.7], 2: [0.1, 0.3, 0.5]}
    per_user, per_seed = {}, {}
    for seed in seeds:
        after = [v + shift for v in before[seed]]
        per_user[str(seed)] = {"text_before_judge": before[seed], "text_after_judge": after}
        per_seed[str(seed)] = {
            "text_before_judge": sum(before[seed]) / 3,
            "text_after_judge": sum(after) / 3,
            "text_before_perplexity": 10.0,
            "text_after_perplexity": 11.0,
        }
    return {
        "dataset": "x",
        "users": 3,
        "fd_users": 3,
        "runs": RUNS,
        "seeds": seeds,
        "users_measured": ["1", "2", "3"],
        "per_seed": per_seed,
        "per_user": per_user,
    }


def _combine(tmp_path, parts):
    paths = []
    for k, part in enumerate(parts):
        paths.append(tmp_path / f"part{k}.json")
        paths[-1].write_text(json.dumps(part))
    out = tmp_path / "joined.json"
    proc = subprocess.run(
        [sys.executable, "bench/bench_rl.py", "combine", *map(str, paths), "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, out


def test_combine_joins_seeds_and_pairs_by_user(tmp_path):
    proc, out = _combine(tmp_path, [_part([0, 1], 0.1), _part([2], 0.1)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1, 2]
    assert result["summary"]["text_before_judge"]["per_seed"] == pytest.approx([0.4, 0.5, 0.3])
    delta = result["after_minus_before"]["text_after_judge - text_before_judge"]
    assert (
        delta["diff"] == pytest.approx(0.1)
        and delta["low"] == pytest.approx(0.1)
        and delta["high"] == pytest.approx(0.1)
    )
    assert delta["by_seed"] == pytest.approx([0.1, 0.1, 0.1])
    assert delta["before_seed_std"] == pytest.approx(0.1)
    assert result["after_minus_before"]["text_after_perplexity / text_before_perplexity"]["ratio"] == pytest.approx(1.1)


def test_combine_refuses_other_users(tmp_path):
    other = _part([2], 0.1)
    other["users_measured"] = ["1", "2", "4"]
    proc, out = _combine(tmp_path, [_part([0], 0.1), other])
    assert proc.returncode != 0 and "different runs or users" in proc.stderr
    assert not out.exists()


def test_measure_asks_only_for_the_runs_it_measures(tmp_path):
    base = [sys.executable, "bench/bench_rl.py", "measure", "--text-before", "T0", "--image-before", "I0"]
    proc = subprocess.run([*base, "--text-after", "T1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--image-after is required unless --only text" in proc.stderr
    proc = subprocess.run([*base, "--image-after", "I1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--text-after is required unless --only image" in proc.stderr


def test_train_passes_reward_overrides_to_the_judge(monkeypatch, tmp_path):
    """``--reward relative=True`` reaches the judge RL is rewarded by (the reward chosen on validation users)."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bench_rl

    import recbole_dppmg.generation.rl.text as rl_text
    import recbole_dppmg.runs as runs

    seen = {}
    monkeypatch.setattr(runs, "read_run_meta", lambda run, kinds: {"tokens": "export"})
    monkeypatch.setattr(bench_rl, "_judge", lambda dataset, folder, reward=None: (None, reward))
    monkeypatch.setattr(rl_text, "train_text_rl", lambda *a, **k: seen.update(judge=a[2], overrides=a[3]) or "out")
    bench_rl.main(["train", "text", "--run", str(tmp_path), "--set", "steps=3", "--reward", "relative=True"])
    assert seen == {"judge": {"relative": True}, "overrides": {"steps": 3}}
    bench_rl.main(["train", "text", "--run", str(tmp_path)])
    assert seen == {"judge": None, "overrides": {}}


def test_gradient_agreement_reports_each_tensor():
    """snr: a tensor whose batches agree shows cosine 1 even when another tensor's batches cancel."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bench_rl
    import torch

    grads = [{"shared": torch.tensor([1.0, 2.0]), "rows": torch.tensor([s, 0.0])} for s in (1.0, -1.0)]
    out = bench_rl.gradient_agreement(grads)
    assert out["mean_cosine_per_tensor"] == {"shared": 1.0, "rows": -1.0}
    assert out["pairwise_cosine"] == [round((5 - 1) / 6, 3)]
