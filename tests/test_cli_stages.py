"""The stage-2 command-line wiring: argument errors are one line, exit status 2."""

import pytest

from recbole_dppmg.cli import main, parse_args


def test_generation_overrides_are_split_by_section():
    args, models, _, overrides = parse_args(
        ["--stage", "text", "--text.max_steps=10", "--image.num_threads=1", "--epochs=3"]
    )
    assert args.generation == {
        "text": {"max_steps": 10},
        "image": {"num_threads": 1},
        "rl": {},
        "reward": {},
        "evaluate": {},
    }
    assert overrides == {"epochs": 3} and models == ["DPPMG"]
    args, *_ = parse_args(
        [
            "--stage",
            "all",
            "--rl.text.steps=8",
            "--rl.quick=true",
            "--evaluate.users=5",
            "--text.generate.max_new_tokens=16",
        ]
    )
    assert args.generation["rl"] == {"text": {"steps": 8}, "quick": True} and args.generation["evaluate"] == {
        "users": 5
    }
    assert args.generation["text"] == {"generate": {"max_new_tokens": 16}}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stage", "generate", "-d", "ml-100k-mm"], "--stage generate needs --users"),
        (["--stage", "text", "--foo.bar=1"], "dotted keys must be --text.<key> or --image.<key>"),
        (
            ["--stage", "generate", "--users", "1", "--tokens", "/nonexistent/tokens"],
            "/nonexistent/tokens is not a token export",
        ),
        (
            ["--stage", "text_eval", "--text.evaluate.conditions=[dppmg,nope]"],
            "unknown text evaluation condition 'nope'",
        ),
        (
            ["--stage", "text_eval", "--text.generator=/nonexistent/TextGen-x"],
            "/nonexistent/TextGen-x is not a text warm-up run",
        ),
        (["--stage", "text", "--profile", "quick"], "--profile applies to --stage rl, evaluate and all, not text"),
    ],
)
def test_generation_stage_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_one_stage_table_for_the_command_line_and_the_pipeline():
    from recbole_dppmg import cli, pipeline, stages

    actions = {action.dest: action for action in cli.build_parser()._actions}
    assert actions["stage"].choices is stages.STAGE_NAMES and actions["until"].choices is stages.PIPELINE_STEPS
    assert pipeline.STAGES is stages.PIPELINE_STEPS
    assert list(cli.HANDLERS) == list(stages.STAGE_NAMES)
    assert pipeline.STAGES == (
        "prepare",
        "train",
        "export",
        "text",
        "image",
        "image_history",
        "rl_text",
        "rl_image",
        "evaluate",
    )
    assert all(callable(getattr(pipeline.Pipeline, f"_{step}", None)) for step in pipeline.STAGES)
    assert stages.stage("rl").steps == ("rl_text", "rl_image") and stages.stage("rl").profile


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stage", "deploy"], "argument --stage: invalid choice: 'deploy'"),
        (["--stage"], "argument --stage: expected one argument"),
        (["--stage", "all", "--until", "deploy"], "argument --until: invalid choice: 'deploy'"),
        (
            ["--stage", "generate", "--profile", "quick"],
            "--profile applies to --stage rl, evaluate and all, not generate",
        ),
    ],
)
def test_argument_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_dppmg.py: error: ") and message in err and len(err.splitlines()) == 1
