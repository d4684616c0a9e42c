"""The command layer: each command module stands on its own (no import cycles through cli.py)."""

import subprocess
import sys

import pytest

COMMANDS = ["scan", "patch", "verify", "tune", "diff", "push"]


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_module_imports_on_its_own(name: str) -> None:
    code = f"import melsurgery.commands.{name} as m; assert m.{name}.name == {name!r}"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_cli_assembles_every_command() -> None:
    from melsurgery.cli import main

    assert sorted(main.commands) == sorted(COMMANDS)
