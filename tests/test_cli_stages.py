"""The stage-2 command-line wiring: argument errors are one line, exit status 2."""

import pytest

from recbole_dppmg.cli import main, parse_args


def test_generation_overrides_are_split_by_section():
    args, models, _, overrides = parse_args(["--stage", "text", "--text.max_steps=10", "--image.num_threads=1", "--epochs=3"])
    assert args.generation == {"text": {"max_steps": 10}, "image": {"num_threads": 1}}
    assert overrides == {"epochs": 3} and models == ["DPPMG"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stage", "generate", "-d", "ml-100k-mm"], "--stage generate needs --users"),
        (["--stage", "text", "--foo.bar=1"], "dotted keys must be --text.<key> or --image.<key>"),
        (["--stage", "generate", "--users", "1", "--tokens", "/nonexistent/tokens"], "/nonexistent/tokens is not a token export"),
    ],
)
def test_generation_stage_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
