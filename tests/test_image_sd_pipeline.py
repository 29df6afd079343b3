"""The pretrained path, wired (#25): a tiny Stable Diffusion pipeline built from configs and saved
with ``save_pretrained`` is ``image.backbone``, and every image stage runs on it on the CPU through
the entry points of ``--stage all``: the image stage (``Pipeline._image``), image RL
(``train_image_rl``), ``--stage generate`` (``run_generate_images``) and the report
(``build_report``). Also the errors of a backbone that is not a Stable Diffusion folder."""

import json
import re

import numpy as np
import pytest
import torch
from image_fixtures import TINY_SD, save_tiny_sd_pipeline, write_tiny_export, write_tiny_posters
from PIL import Image
from report_fixtures import QUICK, SPLIT, poster_features, report_options, tiny_text_run
from safetensors.torch import load_file

from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image import sd as sd_module
from recbole_dppmg.generation.image.checkpoint import SD_FORMAT
from recbole_dppmg.generation.image.generate import run_generate_images
from recbole_dppmg.generation.image.train import load_image_generator, train_image_generator
from recbole_dppmg.generation.report.build import build_report
from recbole_dppmg.generation.rl.image import train_image_rl
from recbole_dppmg.pipeline import Pipeline
from recbole_dppmg.tokens import PreferenceTokens

SD = {**TINY_SD, "batch_size": 4, "max_steps": 4, **SPLIT}


def sd_settings(backbone, root) -> dict:
    """``image`` settings with the tiny pipeline as backbone (what ``--image.backbone=...`` gives)."""
    return {
        "backbone": str(backbone),
        "num_threads": 1,
        "progress": False,
        "cache_dir": str(root / "cache"),
        "sample_steps": 2,
        "sample_batch": 4,
        "sd": SD,
    }


def brightness_reward(users, posters):
    """Half of the users want bright posters, the other half dark ones (a reward that depends on the user)."""
    sign = np.array([1.0 if sum(map(ord, str(u))) % 2 else -1.0 for u in users])
    return sign * np.array([float(p.mean()) for p in posters])


@pytest.fixture(scope="module")
def sd_chain(tmp_path_factory):
    """The image stage of ``--stage all`` twice (the second finds the first run), then image RL."""
    root = tmp_path_factory.mktemp("sd_chain")
    backbone = save_tiny_sd_pipeline(root / "sd")
    inputs = tiny_text_run(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPPMG_DATASET_DIR", str(inputs["data"]))
        patch.setattr(sd_module, "SAVED_DIR", root / "saved")
        generation = {"image": sd_settings(backbone, root)}
        pipeline = Pipeline("tiny", None, (), {}, generation=generation, root=root / "saved")
        pipeline.outputs["export"] = inputs["export"]
        stages = [pipeline._image(), pipeline._image()]
        history = pipeline._image_history()  # a Stable Diffusion backbone has no history baseline: skipped, said why
    rl = {"steps": 2, "users_per_step": 2, "group_size": 2, "sample_steps": 3, "save_steps": 1, "progress": False}
    rl_run = train_image_rl(
        "tiny", stages[0][1], None, rl, reward_fn=brightness_reward, out_dir=root / "saved" / "tiny" / "ImageRL-sd"
    )
    chain = {
        "root": root,
        "sd_backbone": backbone,
        "stages": stages,
        "history_stage": history,
        "image_run": stages[0][1],
        "rl_run": rl_run,
    }
    return {**inputs, **chain}


def test_the_image_stage_trains_the_tokens_into_the_pipeline(sd_chain):
    (status, run, _), (again, same, note) = sd_chain["stages"]
    assert status == "ran" and again == "skipped" and same == run and "finished image generator" in note
    assert sd_chain["history_stage"] == (
        "skipped",
        None,
        "a Stable Diffusion backbone has no history baseline (image.conditioning)",
    )
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "ImageGen" and meta["format"] == SD_FORMAT and meta["trained_steps"] == 4
    assert meta["model"]["backbone"] == str(sd_chain["sd_backbone"].resolve()) and meta["model"]["height"] == 16
    assert meta["test_users"] == json.loads((sd_chain["text_run"] / "users.json").read_text())["test"]
    vocab = PreferenceVocabulary(PreferenceTokens.load(sd_chain["export"]))
    weights = load_file(str(run / "model.safetensors"))
    assert set(weights) == {"embeddings"} and weights["embeddings"].shape == (len(vocab), 16)
    model, _ = load_image_generator(run, vocab, dataset="tiny")
    fresh = sd_module.load_sd_pipeline(sd_chain["sd_backbone"])
    base = fresh.text_encoder.get_input_embeddings().weight
    assert model.tokens.first == len(fresh.tokenizer) and torch.equal(model.tokens.base.weight, base)
    assert torch.equal(model.tokens.rows, weights["embeddings"])
    untrained = sd_module.load_sd_generator(meta, vocab)  # the seeded starting rows
    assert not torch.allclose(untrained.tokens.rows, model.tokens.rows)


def test_image_rl_moves_only_the_token_rows(sd_chain):
    run, source = sd_chain["rl_run"], sd_chain["image_run"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "ImageRL" and meta["format"] == SD_FORMAT and meta["rl"]["steps"] == 2
    assert meta["rl_run"]["source_run"] == str(source.resolve())
    before, after = (load_file(str(r / "model.safetensors")) for r in (source, run))
    assert set(after) == {"embeddings"} and not torch.equal(before["embeddings"], after["embeddings"])
    assert len(json.loads((run / "rl_history.json").read_text())) == 2


def test_generate_draws_each_users_poster_from_their_tokens(sd_chain, tmp_path):
    tokens = PreferenceTokens.load(sd_chain["export"])
    vocab = PreferenceVocabulary(tokens)
    test_users = json.loads((sd_chain["image_run"] / "run.json").read_text())["test_users"]
    a = test_users[0]
    b = next(u for u in test_users if vocab.ids_for(u) != vocab.ids_for(a))
    images = []
    for k, user in enumerate((a, b, a)):  # one user per call: the same starting noise, only the tokens differ
        out = run_generate_images(
            "tiny",
            [user],
            sd_chain["export"],
            {"sample_steps": 2, "device": "cpu"},
            checkpoint=sd_chain["rl_run"],
            out_dir=tmp_path / f"generated-{k}",
            posters=sd_chain["posters"],
        )
        images.append(np.asarray(Image.open(out / f"{user}.png")))
    assert images[0].shape == (16, 16, 3) and not np.array_equal(images[0], images[1])
    assert np.array_equal(images[0], images[2])  # seeded
    record = json.loads((out / "generated.json").read_text())
    assert record["checkpoint"] == str(sd_chain["rl_run"]) and record["users"][a]["tokens"] == vocab.strings_for(a)


def test_the_report_scores_the_sd_generator_before_and_after_rl(sd_chain):
    root = sd_chain["root"]
    image = {"sample_steps": 2, "sample_batch": 4, "backbone": str(sd_chain["sd_backbone"]), "sd": SD}
    options = report_options(sd_chain, root, image_config_overrides=image)
    report = build_report("tiny", QUICK, root / "Report-sd", **options)
    result = json.loads((report / "report.json").read_text())
    assert result["runs"]["image"] == str(sd_chain["image_run"].resolve())
    assert result["runs"]["image_rl"] == str(sd_chain["rl_run"].resolve())
    for condition in ("no_tokens", "shuffled", "dppmg", "dppmg_rl"):
        assert result["conditions"][condition]["image"] == "run"
        row = result["per_seed"][condition]["0"]
        assert 0 <= row["image_judge"] <= 1 and row["frechet_distance"] >= 0, condition
    assert "image_judge" in result["per_seed"]["ceiling"]["0"]  # the real posters, at the generator's size
    assert "gap_image_judge" in result["intervals"]["dppmg"]
    fd = {c: result["per_seed"][c]["0"]["frechet_distance"] for c in ("no_tokens", "shuffled", "dppmg", "dppmg_rl")}
    assert len(set(fd.values())) == 4, fd  # four sets of posters: the prompts (and RL's rows) make a difference
    assert "DPPMG after RL" in (report / "report.md").read_text()


def test_text_rl_reads_the_sd_generators_posters_as_its_partner(sd_chain, tmp_path, monkeypatch):
    """Text RL's consistency term: one pre-RL poster per user from the SD run (the image defaults' sampling)."""
    from recbole_dppmg.generation.rl import common as rl_common

    monkeypatch.setattr(rl_common, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(rl_common, "load_default_encoder", lambda modality: None)
    monkeypatch.setattr(rl_common, "image_features", lambda encoder, images: poster_features(images))
    users = json.loads((sd_chain["image_run"] / "run.json").read_text())["test_users"][:2]
    features = rl_common.pre_rl_poster_features("tiny", sd_chain["image_run"], users, progress=False)
    assert list(features) == users and features[users[0]].shape == (6,)
    assert not np.array_equal(features[users[0]], features[users[1]])


# ---------------------------------------------------------------------------- bad input
def test_a_backbone_that_is_not_a_stable_diffusion_folder(tmp_path):
    export = write_tiny_export(tmp_path / "tokens")
    posters = write_tiny_posters(tmp_path / "posters")
    missing = tmp_path / "no-such-pipeline"
    with pytest.raises(ConfigError, match=f"image.backbone='{re.escape(str(missing))}' is neither 'latent' nor"):
        train_image_generator("tiny", export, {"backbone": str(missing)}, out_dir=tmp_path / "run", posters=posters)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["x", "y"]}))
    config = {"backbone": str(broken), "sd": {**SD, "valid_users": 1, "test_users": 1}}
    with pytest.raises(CheckpointError, match=re.escape(str(broken))):
        train_image_generator("tiny", export, config, out_dir=tmp_path / "run", posters=posters)
    assert not (tmp_path / "run").exists()  # nothing half-written
    with pytest.raises(ConfigError, match="conditioning=history needs the small latent model"):
        load_settings("image", {"backbone": str(broken), "conditioning": "history"})
    assert load_settings("image", {"backbone": str(broken)})["conditioning"] == "retrieval"  # the default: n/a
    with pytest.raises(ConfigError, match="token_channels .* needs the small latent model"):
        load_settings("image", {"backbone": str(broken), "token_channels": ["image"]})


def test_the_image_evaluation_runs_on_the_sd_run(sd_chain, tmp_path, monkeypatch):
    """``evaluate.py`` (bench_image's evaluation): the untrained row is the pipeline with its starting rows."""
    from types import SimpleNamespace

    from recbole_dppmg.generation.image import evaluate as image_evaluate

    # an 8x8 "encoder" whose features are the mean colour: the plumbing, not EfficientNet, is under test
    fake = SimpleNamespace(image_size=8, dim=3, model=SimpleNamespace(extract_features=lambda x: x))
    monkeypatch.setattr(image_evaluate, "load_default_encoder", lambda modality: fake)
    monkeypatch.setattr(image_evaluate, "image_encoder_version", lambda: None)  # no feature cache
    monkeypatch.setenv("DPPMG_DATASET_DIR", str(sd_chain["data"]))
    settings = {"sample_steps": 2, "sample_batch": 4, "device": "cpu"}
    result = image_evaluate.evaluate_image_generator(
        "tiny", sd_chain["export"], sd_chain["image_run"], settings, n_fd=4, topk=3, out_dir=tmp_path / "eval"
    )
    assert result["size"] == [16, 16]
    fd = result["frechet_distance"]
    assert {"trained", "untrained", "autoencoder_reconstruction"} <= set(fd) and fd["trained"] != fd["untrained"]
    assert result["retrieval"]["dppmg_tokens"]["users"] >= 2


def test_a_wrong_backbone_stops_stage_all_before_stage_1(tmp_path, monkeypatch, capsys):
    from recbole_dppmg import cli
    from recbole_dppmg import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "SAVED_DIR", tmp_path / "saved")
    monkeypatch.setattr(cli, "init_stage_logger", lambda *a: None)
    assert cli.main(["--stage", "all", "-d", "tiny", f"--image.backbone={tmp_path / 'nope'}"]) == 2
    assert f"image.backbone='{tmp_path / 'nope'}' is neither 'latent' nor" in capsys.readouterr().err
    assert not (tmp_path / "saved").exists()  # not even the Pipeline folder
