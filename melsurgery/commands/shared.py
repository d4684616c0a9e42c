"""What every command shares: the error mapping, device/dtype helpers, and options defined once."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UserError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}


class Group(click.Group):
    """Turns UserError into one line on stderr and its exit code; never a traceback for user errors."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"melsurgery: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("melsurgery: interrupted", err=True)
            sys.exit(130)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    return device


def torch_dtype(name: str):
    """The torch dtype of a --dtype choice; None for `checkpoint` (the checkpoint's own dtype)."""
    import torch

    return None if name == "checkpoint" else getattr(torch, DTYPES[name])


class SampleCount(click.ParamType):
    """A positive sample count, or `auto` for adaptive calibration."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto" or isinstance(value, int):
            return value
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r} is neither a positive number nor 'auto'", param, ctx)
        return n


device_option = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
dtype_option = click.option(
    "--dtype", type=click.Choice([*sorted(DTYPES), "checkpoint"]), default="float32", show_default=True,
    help="Compute dtype; `checkpoint`: the dtype that holds most of the checkpoint's weights."
)
revision_option = click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")


def calibration_options(f):
    for opt in reversed([
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="Calibration text: .txt (blank-line separated samples) or .jsonl (text or messages)."),
        click.option("--num-samples", type=SampleCount(), default=None,
                     help="Use this many samples (default: all), or 'auto': start with 4 and double while the ME "
                          "Layer, its dims or its tokens still change."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=128, show_default=True,
                     help="Truncate each sample to this many tokens."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for sample selection."),
        click.option("--abs-threshold", type=float, default=100.0, show_default=True,
                     help="An entry is massive when |h| is at least this ..."),
        click.option("--ratio", type=float, default=1000.0, show_default=True,
                     help="... and at least this many times the layer's median |h|."),
        click.option("--persist-fraction", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                     help="A massive entry must stay massive for this fraction of the remaining layers."),
    ]):
        f = opt(f)
    return f
