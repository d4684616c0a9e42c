"""The `melsurgery` command group: assembles the commands of `melsurgery.commands`, nothing else."""

from __future__ import annotations

import functools
import os

import click

from melsurgery.allocator import keep_step_buffers
from melsurgery.commands.diff import diff
from melsurgery.commands.patch import patch
from melsurgery.commands.push import push
from melsurgery.commands.scan import scan
from melsurgery.commands.shared import Group
from melsurgery.commands.tune import tune
from melsurgery.commands.verify import verify
from melsurgery.version import __version__

# MELSURGERY_SMOKE=1 shrinks every sample, token, window and trial count to a few, whatever the command line
# says, so that each documented example runs end to end in seconds (the test that runs every example in the
# docs sets it). The figures such a run prints mean nothing; the commands, flags and files are real.
SMOKE = "MELSURGERY_SMOKE"
SMOKE_CAPS = {"num_samples": 4, "max_tokens": 64, "trials": 3, "windows": 1, "max_windows": 1,
              "verify_windows": 1, "generations": 1, "first_token_steps": 3, "candidates": 2, "limit": 2,
              "payoff_window": 16}


def _smoke(callback):
    """The command's callback with each count above its cap (or left to its default) set to the cap."""

    @functools.wraps(callback)
    def run(**kwargs):
        if os.environ.get(SMOKE) == "1":
            for name, cap in SMOKE_CAPS.items():
                value = kwargs.get(name, cap)
                if value is None or value == "auto" or (isinstance(value, int) and value > cap):
                    kwargs[name] = cap
        return callback(**kwargs)

    return run


@click.group(cls=Group)
@click.version_option(__version__, prog_name="melsurgery")
def main() -> None:
    """Find and fix massive activations (the Massive Emergence Layer) in decoder checkpoints.

    MODEL is a local folder, a Hub repo id, a .gguf file, or `default` (SmolLM2-135M-Instruct).
    """
    keep_step_buffers()


for _command in (scan, patch, verify, diff, push, tune):
    _command.callback = _smoke(_command.callback)
    main.add_command(_command)
