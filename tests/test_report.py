"""The evaluation report on a tiny run: a DPPMG export, a tiny text LM and a tiny pixel-space
poster model trained for a few steps, fake RL runs (copies with an RL history); and the errors
of generators that do not fit together."""

import json
import shutil

import pytest
from image_fixtures import tiny_settings
from report_fixtures import QUICK, SPLIT, report_options, tiny_text_run

from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.image.autoencoder import PixelCodec
from recbole_dppmg.generation.image.train import train_image_generator
from recbole_dppmg.generation.report.build import (
    EvaluatedRuns,
    build_report,
    resolve_runs,
)
from recbole_dppmg.runs import RL_SECTION, write_run_meta


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = tiny_text_run(root)
    export, text_run, posters = inputs["export"], inputs["text_run"], inputs["posters"]
    image_run = train_image_generator(
        "tiny", export, tiny_settings(root, **SPLIT), out_dir=root / "saved" / "tiny" / "ImageGen-tiny", posters=posters
    )
    for kind, source, steps in (("TextRL", text_run, 3), ("ImageRL", image_run, 2)):
        rl = root / "saved" / "tiny" / f"{kind}-tiny"
        shutil.copytree(source, rl)
        sampling = {"temperature": 0.7, "max_new_tokens": 32}  # as rl.text records it
        write_run_meta(rl, kind, {"source_run": str(source.resolve()), "rl": sampling}, RL_SECTION)
        history = [
            {"step": s + 1, "reward_total": 0.5 + 0.01 * s, "reward_consistency": 0.3, "kl": 0.001 * s}
            for s in range(steps)
        ]
        (rl / "rl_history.json").write_text(json.dumps(history))
    options = report_options(inputs, root, codec=PixelCodec())
    return root, export, text_run, image_run, options


def test_report_on_a_tiny_run(tiny_run):
    root, export, text_run, image_run, options = tiny_run
    report = build_report("tiny", QUICK, root / "Report-1", **options)
    assert report == root / "Report-1" / "report"
    result = json.loads((report / "report.json").read_text())
    assert result["runs"]["text"] == str(text_run.resolve()) and result["runs"]["image_rl"].endswith("ImageRL-tiny")
    assert len(result["users"]) == 4 and result["seeds"] == [0, 1]
    assert set(result["per_seed"]) == {
        "no_tokens",
        "population",
        "history",
        "token_items",
        "shuffled",
        "soft_prompt",
        "dppmg",
        "dppmg_rl",
        "ceiling",
        "constant_popular",
        "unseen_popular",
    }
    assert result["split"] == "test"
    gaps = result["intervals"]
    for name in (
        "gap_text_judge",
        "gap_text_heldout_judge",
        "gap_image_judge",
        "gap_image_personal_similarity",
        "gap_consistency",
    ):
        assert name in gaps["dppmg"], name
        low, high = gaps["dppmg"][name]["ci95"]
        assert low <= gaps["dppmg"][name]["mean"] <= high
    # the same real content for every user scores exactly 0 on every own-minus-shuffled gap
    constant = {n: g["mean"] for n, g in gaps["constant_popular"].items() if n.startswith("gap_")}
    assert constant and all(abs(v) < 1e-9 for v in constant.values()), constant
    assert len(gaps["dppmg"]["text_judge"]["per_user"]) == 4  # levels too, per user, for pooling training seeds
    assert result["fd_real_floor"]["n"] == len(result["users"]) and result["fd_real_floor"]["mean"] >= 0
    dppmg = result["per_seed"]["dppmg"]["0"]
    for metric in (
        "text_hit@10",
        "image_ndcg@10",
        "text_judge",
        "image_judge",
        "consistency",
        "reward",
        "perplexity",
        "distinct2",
        "frechet_distance",
        "between_user_similarity",
        "near_duplicate_share",
        "median_nearest_real_similarity",
    ):
        assert metric in dppmg, metric
    assert 0 <= dppmg["near_duplicate_share"] <= 1 and dppmg["between_user_similarity"] <= 1
    assert 0 <= dppmg["text_judge"] <= 1 and 0 <= dppmg["consistency"] <= 1 and dppmg["perplexity"] > 1
    assert "image_judge" not in result["per_seed"]["soft_prompt"]["0"]  # no continuous baseline for posters
    assert result["summary"]["dppmg"]["text_judge"]["seeds"] == 2
    assert result["summary"]["ceiling"]["text_judge"]["std"] == 0  # real content: the same for every seed
    table = (report / "report.md").read_text()
    for label in (
        "no tokens",
        "shuffled tokens",
        "continuous soft prompt",
        "DPPMG before RL",
        "DPPMG after RL",
        "ceiling",
        "control: most popular item, for everyone",
    ):
        assert f"| {label}" in table
    assert "## Personalization: own minus shuffled" in table and "real-vs-real floor" in table
    assert result["rl_text_sampling"] is not None and "text RL sampled with" in table
    assert (
        "| population prompt" in table
        and "| history (prompt / posters)" in table
        and "| DPPMG tokens as retrieval" in table
    )
    history = json.loads((text_run / "warmup.json").read_text())["history_prompt"]
    assert history["steps"] == 2 and history["trainable_parameters"] > 0
    soft_row = next(line for line in table.splitlines() if line.startswith("| continuous soft prompt"))
    assert "n/a" in soft_row
    assert "condition,metric,mean,std,min,max,seeds" in (report / "report.csv").read_text()
    assert (report / "reward_curves.png").stat().st_size > 0 and "reward_curves.png" in table
    effect = result["rl_effect"]
    assert set(effect) >= {"text_judge", "image_judge", "consistency", "reward", "perplexity", "frechet_distance"}
    assert effect["reward"]["raised_beyond_seed_spread"] is False  # the fake RL runs are copies of the generators
    assert effect["perplexity"]["within_tolerance"] and "## DPPMG after RL vs before" in table
    samples = [json.loads(line) for line in (report / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and "dppmg_rl/seed1" in samples[0]
    gallery = (report / "gallery.html").read_text()
    pictures = [part.split('"')[0] for part in gallery.split('src="')[1:]]
    assert len(pictures) >= 2 * 5 and all((report / p).is_file() for p in pictures)  # relative, inside report/
    assert not [p for p in (root / "Report-1").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_rows_without_rl_say_not_run(tiny_run):
    root, export, text_run, image_run, options = tiny_run
    runs = resolve_runs("tiny", load_settings("evaluate", QUICK), root / "saved")
    runs = EvaluatedRuns(runs.tokens, runs.text, runs.image, None, None, runs.test_users, runs.valid_users)
    report = build_report("tiny", {**QUICK, "seeds": [3]}, root / "Report-2", runs=runs, **options)
    row = next(line for line in (report / "report.md").read_text().splitlines() if line.startswith("| DPPMG after RL"))
    assert row.count("not run") >= 8
    assert not (report / "reward_curves.png").exists()


def test_a_warm_up_without_the_optional_baselines_reports_them_as_not_run(tiny_run, tmp_path):
    """text.soft_prompt / text.token_items_prompt False: those rows read "not run", the rest is measured."""
    root, export, text_run, image_run, options = tiny_run
    lean = tmp_path / text_run.name
    shutil.copytree(text_run, lean, ignore=shutil.ignore_patterns("soft_prompt", "token_items_prompt"))
    runs = resolve_runs("tiny", load_settings("evaluate", QUICK), root / "saved")
    runs = EvaluatedRuns(runs.tokens, str(lean), runs.image, None, None, runs.test_users, runs.valid_users)
    report = build_report("tiny", {**QUICK, "seeds": [0]}, tmp_path / "Report", runs=runs, **options)
    result = json.loads((report / "report.json").read_text())
    assert "soft_prompt" not in result["per_seed"] and "token_items" not in result["per_seed"]
    assert {"dppmg", "population", "history"} <= set(result["per_seed"])
    table = (report / "report.md").read_text().splitlines()
    soft_row = next(line for line in table if line.startswith("| continuous soft prompt"))
    assert "not run" in soft_row


def test_text_conditions_limit_what_is_generated(tiny_run, tmp_path):
    """evaluate.text_conditions: only those generated text conditions (and the real-content ones) are scored."""
    root, export, text_run, image_run, options = tiny_run
    runs = resolve_runs("tiny", load_settings("evaluate", QUICK), root / "saved")
    cfg = {**QUICK, "seeds": [0], "text_conditions": ["dppmg", "population"]}
    report = build_report("tiny", cfg, tmp_path / "Report", runs=runs, **options)
    result = json.loads((report / "report.json").read_text())
    texts = {c for c, status in result["conditions"].items() if status["text"] == "run"}
    assert texts == {"dppmg", "population", "ceiling", "constant_popular", "unseen_popular"}
    assert result["conditions"]["history"]["text"] == "not run"


def test_a_dppmg_only_warm_up_reports_the_baselines_of_another_run_on_the_same_split(tiny_run, tmp_path):
    """evaluate.text_baselines_run: the prompt baselines come from that run; a misfit is refused."""
    root, export, text_run, image_run, options = tiny_run
    lean = tmp_path / text_run.name
    shutil.copytree(text_run, lean, ignore=shutil.ignore_patterns("*_prompt", "soft_prompt"))
    cfg = {**QUICK, "seeds": [0], "text_run": str(lean), "image_run": str(image_run)}
    runs = resolve_runs("tiny", load_settings("evaluate", {**cfg, "text_baselines_run": str(text_run)}), root / "saved")
    assert runs.text == str(lean.resolve()) and runs.text_baselines == str(text_run.resolve())
    report = build_report("tiny", cfg, tmp_path / "Report", runs=runs, **options)
    result = json.loads((report / "report.json").read_text())
    assert {"dppmg", "population", "history", "soft_prompt"} <= set(result["per_seed"])
    moved = tmp_path / "other-split"
    shutil.copytree(text_run, moved)
    split = json.loads((moved / "users.json").read_text())
    (moved / "users.json").write_text(json.dumps({**split, "test": split["test"][::-1]}))
    with pytest.raises(CheckpointError, match="hold out different users"):
        resolve_runs("tiny", load_settings("evaluate", {**cfg, "text_baselines_run": str(moved)}), root / "saved")


def test_a_validation_report_scores_validation_users_only(tiny_run):
    root, export, text_run, image_run, options = tiny_run
    split = json.loads((text_run / "users.json").read_text())
    report = build_report("tiny", {**QUICK, "split": "valid", "seeds": [0]}, root / "Report-valid", **options)
    result = json.loads((report / "report.json").read_text())
    assert result["split"] == "valid" and result["users"] == split["valid"][: QUICK["users"]]
    assert not set(result["users"]) & set(split["test"]) and not set(result["ceiling_items"]) & set(split["test"])
    assert "held-out **validation** users" in (report / "report.md").read_text()


def test_generators_that_do_not_fit_together(tiny_run, tmp_path):
    root, export, text_run, image_run, _ = tiny_run
    cfg = load_settings("evaluate", QUICK)
    with pytest.raises(CheckpointError, match="no trained text generator for dataset tiny"):
        resolve_runs("tiny", cfg, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no image generator for dataset tiny .* was trained on token export"):
        resolve_runs("tiny", {**cfg, "text_run": str(text_run)}, tmp_path / "empty")

    other_export = tmp_path / "tokens-copy"
    shutil.copytree(export, other_export)
    moved = tmp_path / "ImageGen-other"
    shutil.copytree(image_run, moved)
    meta = json.loads((moved / "run.json").read_text())
    (moved / "run.json").write_text(json.dumps({**meta, "tokens_folder": str(other_export)}))
    with pytest.raises(CheckpointError, match="trained on different token exports"):
        resolve_runs("tiny", {**cfg, "text_run": str(text_run), "image_run": str(moved)}, root / "saved")

    (moved / "run.json").write_text(json.dumps({**meta, "test_users": meta["test_users"][::-1]}))
    with pytest.raises(CheckpointError, match="hold out different test users"):
        resolve_runs("tiny", {**cfg, "text_run": str(text_run), "image_run": str(moved)}, root / "saved")

    history = {**meta, "model": {**meta["model"], "conditioning": "history"}}
    (moved / "run.json").write_text(json.dumps({**history, "tokens_folder": meta["tokens_folder"]}))
    with pytest.raises(CheckpointError, match="is the history baseline"):
        resolve_runs("tiny", {**cfg, "text_run": str(text_run), "image_run": str(moved)}, root / "saved")

    stray = tmp_path / "TextRL-stray"
    stray.mkdir()
    (stray / "rl_config.json").write_text(json.dumps({"source_run": str(tmp_path)}))
    with pytest.raises(CheckpointError, match="was not made from"):
        resolve_runs("tiny", {**cfg, "text_rl_run": str(stray)}, root / "saved")


def test_evaluate_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown evaluate setting.*bogus"):
        load_settings("evaluate", {"bogus": 1})
    with pytest.raises(ConfigError, match="evaluate.seeds must be a list of distinct integers"):
        load_settings("evaluate", {"seeds": [1, 1]})
    with pytest.raises(ConfigError, match="evaluate.users must be an integer >= 2"):
        load_settings("evaluate", {"users": 1})
    with pytest.raises(ConfigError, match="evaluate.text_conditions must list dppmg.*'dppmg_rll'"):
        load_settings("evaluate", {"text_conditions": ["dppmg", "dppmg_rll"]})
    with pytest.raises(ConfigError, match="evaluate.text_conditions must list dppmg"):
        load_settings("evaluate", {"text_conditions": ["history"]})
    from recbole_dppmg.generation.common.settings import GENERATED_TEXT_CONDITIONS
    from recbole_dppmg.generation.report.build import TEXT_GENERATED

    assert set(GENERATED_TEXT_CONDITIONS) == set(TEXT_GENERATED) | {"dppmg_rl"}  # the check knows every condition


def test_evaluate_stage_without_generators_is_one_line(capsys):
    from recbole_dppmg.cli import main

    assert main(["--stage", "evaluate", "-d", "no-such-dataset"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no trained text generator for dataset no-such-dataset" in err and len(err.splitlines()) == 1


def test_rl_effect_verdicts():
    from recbole_dppmg.generation.report.build import rl_effect

    def s(mean, low, high):
        return {"mean": mean, "std": (high - low) / 2, "min": low, "max": high, "seeds": 3}

    summary = {
        "dppmg": {
            "reward": s(0.50, 0.48, 0.52),
            "consistency": s(0.60, 0.55, 0.65),
            "perplexity": s(10.0, 9, 11),
            "frechet_distance": s(100, 99, 101),
        },
        "dppmg_rl": {
            "reward": s(0.56, 0.53, 0.58),
            "consistency": s(0.66, 0.60, 0.70),
            "perplexity": s(10.5, 10, 11),
            "frechet_distance": s(115, 114, 116),
        },
    }
    effect = rl_effect(summary)
    assert effect["reward"]["raised_beyond_seed_spread"] and not effect["consistency"]["raised_beyond_seed_spread"]
    assert effect["perplexity"]["within_tolerance"] and not effect["frechet_distance"]["within_tolerance"]
    assert effect["reward"]["difference"] == pytest.approx(0.06) and "text_judge" not in effect
    assert rl_effect({"dppmg": summary["dppmg"]}) == {}  # no RL run: nothing to compare


def test_reward_curves_follow_rl_phases(tmp_path):
    from recbole_dppmg.generation.report.render import chained_history, reward_curves
    from recbole_dppmg.runs import rl_phases

    generator = tmp_path / "TextGen-x"
    generator.mkdir()
    source = generator
    for name, steps in (("TextRL-1", 3), ("TextRL-2", 2)):
        run = tmp_path / name
        run.mkdir()
        (run / "rl_config.json").write_text(json.dumps({"source_run": str(source)}))
        (run / "rl_history.json").write_text(
            json.dumps([{"step": s, "reward_total": 0.1 * s, "kl": 0.0} for s in range(1, steps + 1)])
        )
        source = run
    phases = rl_phases(tmp_path / "TextRL-2")
    assert [p.name for p in phases] == ["TextRL-1", "TextRL-2"]
    records, boundaries = chained_history(phases)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and boundaries == [3]
    assert [r["reward_total"] for r in records][3:] == [0.1, 0.2]  # phase 2's own values, steps continued
    assert rl_phases(tmp_path / "TextRL-1") == [tmp_path / "TextRL-1"]
    assert reward_curves([phases], tmp_path / "curves.png").stat().st_size > 0


def test_a_poster_only_report_with_the_history_baseline(tiny_run, tmp_path):
    """evaluate.modalities [image]: no text run is read or generated; the newest history generator
    on the same test users becomes the history row; one on other test users is refused."""
    root, export, text_run, image_run, options = tiny_run
    saved = tmp_path / "saved"
    shutil.copytree(root / "saved", saved)
    shutil.rmtree(saved / "tiny" / text_run.name, ignore_errors=True)  # nothing of the text side is needed
    history = train_image_generator(
        "tiny",
        export,
        tiny_settings(root, **SPLIT, conditioning="history", retrieval_k=2),
        out_dir=saved / "tiny" / "ImageGen-history",
        posters=options["posters"],
    )
    cfg = {**QUICK, "seeds": [0], "modalities": ["image"]}
    runs = resolve_runs("tiny", load_settings("evaluate", cfg), saved)
    assert runs.text is None and runs.image_history == str(history.resolve())
    assert runs.image == str((saved / "tiny" / "ImageGen-tiny").resolve())  # never the history run
    report = build_report("tiny", cfg, tmp_path / "Report-posters", **{**options, "root": saved})
    result = json.loads((report / "report.json").read_text())
    assert result["conditions"]["history"] == {"text": "n/a", "image": "run"}
    assert "history" in result["per_seed"] and "gap_image_heldout_judge" in result["intervals"]["history"]
    assert not any(k.startswith("text_") or k == "perplexity" for k in result["per_seed"]["dppmg"]["0"])
    assert "population" not in result["per_seed"] and "soft_prompt" not in result["per_seed"]

    other = json.loads((history / "run.json").read_text())
    (history / "run.json").write_text(json.dumps({**other, "test_users": other["test_users"][::-1]}))
    with pytest.raises(CheckpointError, match="holding out other test users"):
        resolve_runs("tiny", load_settings("evaluate", {**cfg, "image_history_run": str(history)}), saved)
    with pytest.raises(CheckpointError, match="is not a history generator"):
        resolve_runs("tiny", load_settings("evaluate", {**cfg, "image_history_run": str(image_run)}), saved)
    with pytest.raises(ConfigError, match="evaluate.modalities must list text and/or image"):
        load_settings("evaluate", {"modalities": ["audio"]})
