"""What every command shares: the error mapping, device/dtype helpers, and options defined once."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import click

from melsurgery.errors import UserError
from melsurgery.formats.typed import JsonRecord
from melsurgery.params import CALIBRATION, DETECTION, Param

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}


class Group(click.Group):
    """Turns UserError into one line on stderr and its exit code; never a traceback for user errors."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        """Run the command; a UserError or usage error becomes one `melsurgery: error:` line and its exit status,
        Ctrl-C exit 130, never a traceback."""
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"melsurgery: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:  # click's own parse errors: the same one line, not usage text
            where = f"melsurgery {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx.parent else "melsurgery"
            click.echo(f"melsurgery: error: {exc.format_message()} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("melsurgery: interrupted", err=True)
            sys.exit(130)


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(device: str) -> str:
    """`auto`, `cpu`, `mps`, `cuda` or `cuda:N`, checked against what this machine has."""
    if not DEVICE.match(device):
        raise UserError(f"--device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no MPS device is available")
    return device


def quiet_transformers() -> None:
    """--quiet: no loading bars from transformers or huggingface_hub either."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    logging.disable_progress_bar()
    disable_progress_bars()


def torch_dtype(name: str):
    """The torch dtype of a --dtype choice; None for `checkpoint` (the checkpoint's own dtype)."""
    import torch

    return None if name == "checkpoint" else getattr(torch, DTYPES[name])


device_option = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, mps or auto.",
                             callback=lambda ctx, param, value: resolve_device(value))
dtype_option = click.option(
    "--dtype", type=click.Choice([*sorted(DTYPES), "checkpoint"]), default="float32", show_default=True,
    help="Compute dtype; `checkpoint`: the dtype that holds most of the checkpoint's weights."
)
revision_option = click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bar.")


def json_option(what: str = "Write every figure as JSON."):
    """--json PATH: where a command writes its result as strict JSON."""
    return click.option("--json", "json_path", type=click.Path(path_type=Path), help=what)


def plot_option(what: str):
    """--plot PATH: where a command writes its PNG (matplotlib, the `plot` extra)."""
    return click.option("--plot", "plot_path", type=click.Path(path_type=Path), help=what)


def finite_float(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Callback for float options: NaN and infinities are refused (they would make every comparison pass)."""
    if value is not None and not math.isfinite(value):
        raise UserError(f"{param.opts[0]} {value}: must be a finite number")
    return value


def declared_option(param: Param):
    """A click option for a declared parameter: parsed and range-checked by the declaration (finite numbers)."""
    kinds = {"float": "FLOAT", "int": "INTEGER"}
    default = f" (default {param.default})" if param.default is not None else ""
    return click.option(param.flag, param.name, default=None, metavar=kinds.get(param.kind, "VALUE"),
                        help=param.help + default, callback=lambda ctx, _, value: param.parse(value, ctx.info_name))


def calibration_options(f):
    """--calib, then every calibration and detection parameter as declared in params.py."""
    for param in reversed([p for p in (*CALIBRATION, *DETECTION) if p.flag]):
        f = declared_option(param)(f)
    return click.option("--calib", type=click.Path(path_type=Path), default=None,
                        help="Calibration text: .txt (blank-line separated samples) or .jsonl (text or messages).")(f)


def write_outputs(result: JsonRecord | dict, json_path: Path | None, plot_path: Path | None, plot) -> None:
    """--json (`to_json()` of a typed result) and --plot of a command's result, each announced on its own line."""
    if json_path:
        from melsurgery.detect.scan import write_json

        write_json(result, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path)
        click.echo(f"wrote {plot_path}")
