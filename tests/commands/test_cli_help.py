"""Every command's --help ends with real examples, and every example parses against that command.

An example is parsed by the command's own click parser (unknown flags, a flag missing its value, too
many or too few positional arguments fail) and each value is converted by its parameter's type
(`--recipe` must be a known recipe, `--windows` a positive integer...), without running the command.
So renaming or removing a flag breaks this test rather than leaving a stale example in the help.
"""

from __future__ import annotations

import shlex

import click
import pytest
from click.testing import CliRunner

from melsurgery.cli import main

COMMANDS = sorted(main.commands)


def examples_of(command: click.Command) -> list[list[str]]:
    """The example invocations in a command's epilog, each split like a shell would (comments dropped)."""
    epilog = command.epilog or ""
    assert "Examples:" in epilog, "no Examples: block"
    lines = [line.strip() for line in epilog.split("Examples:", 1)[1].splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith("melsurgery ")]


def parse(command: click.Command, name: str, args: list[str]) -> dict:
    """Parse args as the command would and convert each value by its parameter's type; run nothing."""
    ctx = click.Context(command, info_name=name)
    values, extra, _ = command.make_parser(ctx).parse_args(list(args))
    assert not extra, f"unexpected arguments {extra}"
    for param in command.params:
        value = values.get(param.name)
        if value is None:
            assert not param.required, f"missing {param.human_readable_name}"
        elif not isinstance(param.type, click.Path):  # paths need not exist here
            param.type_cast_value(ctx, value)
    return values


def test_every_command_is_covered():
    assert set(COMMANDS) >= {"scan", "patch", "verify", "diff", "push", "tune"}


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_examples(name):
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    shown = res.output.split("Examples:", 1)
    assert len(shown) == 2, f"`melsurgery {name} --help` has no Examples: block"
    lines = [line.strip() for line in shown[1].splitlines() if line.strip()]
    assert 2 <= len(lines) <= 4 and all(line.startswith(f"melsurgery {name} ") for line in lines), lines
    # kept as written: click must not rewrap an example onto two lines
    assert all(line in (main.commands[name].epilog or "") for line in lines)


@pytest.mark.parametrize("name", COMMANDS)
def test_examples_parse_against_the_command(name):
    command = main.commands[name]
    invocations = examples_of(command)
    assert len(invocations) >= 2
    for argv in invocations:
        assert argv[:2] == ["melsurgery", name], argv
        parse(command, name, argv[2:])


@pytest.mark.parametrize(
    "args, error",
    [
        (["default", "-o", "out", "--no-such-flag"], click.NoSuchOption),
        (["default", "-o"], click.BadOptionUsage),
        (["default", "-o", "out", "--recipe", "no-such-recipe"], click.BadParameter),
        (["default", "extra", "-o", "out"], AssertionError),
        (["default", "--recipe", "wemask"], AssertionError),  # -o is required
    ],
)
def test_a_stale_example_fails(args, error):
    """The checker itself: what a rotten example looks like is caught."""
    with pytest.raises(error):
        parse(main.commands["patch"], "patch", args)
