"""The `melsurgery` command group: assembles the commands of `melsurgery.commands`, nothing else."""

from __future__ import annotations

import click

from melsurgery.commands.diff import diff
from melsurgery.commands.patch import patch
from melsurgery.commands.push import push
from melsurgery.commands.scan import scan
from melsurgery.commands.shared import Group
from melsurgery.commands.tune import tune
from melsurgery.commands.verify import verify
from melsurgery.version import __version__


@click.group(cls=Group)
@click.version_option(__version__, prog_name="melsurgery")
def main() -> None:
    """Find and fix massive activations (the Massive Emergence Layer) in decoder checkpoints.

    MODEL is a local folder, a Hub repo id, a .gguf file, or `default` (SmolLM2-135M-Instruct).
    """


for _command in (scan, patch, verify, diff, push, tune):
    main.add_command(_command)
