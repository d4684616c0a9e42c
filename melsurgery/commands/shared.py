"""What every command shares: the error mapping, device/dtype helpers, and options defined once."""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from melsurgery.checkpoint.atomic import FULL, check_output_file, unwind_on_signals
from melsurgery.checkpoint.guard import exists, protect, protecting
from melsurgery.errors import BAD_INPUT, INTERNAL, NO_SPACE, SIGNAL_BASE, UserError, escape, printable, quote, redact
from melsurgery.formats.typed import JsonRecord
from melsurgery.params import CALIBRATION, DETECTION, Param

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}


class Group(click.Group):
    """The output layer of every command: what reaches the terminal is redacted, every failure is one line and a
    documented exit code (melsurgery/errors.py), never a traceback."""

    def main(self, *args, **kwargs):  # type: ignore[override]
        """Run with stdout and stderr redacted, the catchable signals unwinding (cleanup, then 128 + n), and the
        models the command reads protected from its writers."""
        _open_standard_fds()
        with redacted_output(), unwind_on_signals(), protecting():
            try:
                return super().main(*args, **kwargs)
            except BrokenPipeError:  # shell completion (outside `invoke`) piped into `head`: the reader left
                _drop(1)
                sys.exit(SIGNAL_BASE + signal.SIGPIPE)

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[override]
        """The command to run, once no argument is empty: `melsurgery scan "$MODEL"` with MODEL unset scanned the
        current folder (an empty path is "."), and `-o ""` named it as the output."""
        for i, arg in enumerate(args[1:] if not ctx.resilient_parsing else (), start=1):  # not while completing
            option, equals, value = arg.partition("=")
            if arg == "" or (option.startswith("--") and equals and not value):
                what = (f"{option} ''" if equals else f"{args[i - 1]} ''" if args[i - 1].startswith("-")
                        else f"argument {i} of `{args[0]}`")
                raise UserError(f"{what}: an empty value (an unset shell variable?); give the model, path or value")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        """Run the command; any failure becomes one `melsurgery: error:` line and its exit status."""
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place every failure is turned into a line
            code, message = failure(exc)
            if isinstance(exc, BrokenPipeError):
                _drop(1)
            if message:
                _say(f"melsurgery: {message}")
            if code == INTERNAL and os.environ.get(DEBUG_ENV):
                traceback.print_exception(exc)
            sys.exit(code)


def _say(line: str) -> None:
    """The one error line, best effort: stderr on /dev/full, closed, or a pipe nobody reads must not turn the
    documented exit status into click's generic 1 (nor Python's 120 when it flushes the line again on exit)."""
    try:
        click.echo(line, err=True)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # ValueError: a closed stream; AttributeError: none at all
        _drop(2)


def _open_standard_fds() -> None:
    """A process started with stdin, stdout or stderr closed gets /dev/null there: otherwise the first file the
    command opens takes that number, and a library printing to "stderr" (a C warning, a progress bar) would
    write into a model or an output file."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: `fd`, the lower ones being open


DEBUG_ENV = "MELSURGERY_DEBUG"
# OSError kinds a user can act on: named with the file, exit 2 (a full disk: exit 5)
_OS_ERRORS = {errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
              errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.EBUSY, errno.ETXTBSY, errno.EMFILE,
              errno.ENFILE, errno.EIO, errno.EINVAL, errno.ENXIO, errno.ENODEV, errno.ETIMEDOUT, errno.ECONNREFUSED,
              errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}


def failure(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line (without the `melsurgery: ` prefix) of any exception leaving a command."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else BAD_INPUT, ""
    if isinstance(exc, UserError):
        return exc.exit_code, "error: " + printable(str(exc))
    if isinstance(exc, click.UsageError):  # click's own parse errors: the same one line, not usage text
        where = f"melsurgery {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx.parent else "melsurgery"
        return exc.exit_code, "error: " + printable(f"{exc.format_message()} (see `{where} --help`)")
    if isinstance(exc, BrokenPipeError):  # `melsurgery ... | head`: the reader left; nothing to say
        return SIGNAL_BASE + signal.SIGPIPE, ""
    if isinstance(exc, KeyboardInterrupt):
        signum = getattr(exc, "signum", signal.SIGINT)
        return SIGNAL_BASE + signum, f"interrupted ({signal.Signals(signum).name}); unfinished output removed"
    if isinstance(exc, OSError) and (exc.errno in FULL or exc.errno in _OS_ERRORS or isinstance(exc, TimeoutError)):
        where = " -> ".join(quote(str(f)) for f in (exc.filename, exc.filename2) if f is not None)
        why = exc.strerror or str(exc) or type(exc).__name__
        code = NO_SPACE if exc.errno in FULL else BAD_INPUT
        return code, "error: " + printable(f"{where + ': ' if where else ''}{why}")
    if isinstance(exc, MemoryError):
        return NO_SPACE, "error: out of memory; use a smaller model, fewer samples or --max-tokens, or another device"
    name = type(exc).__name__
    return INTERNAL, "error: " + printable(f"internal error ({name}: {str(exc) or 'no message'}); this is a bug in "
                                           f"melsurgery, please report it (set {DEBUG_ENV}=1 for the traceback)", 400)


class _Redacted(io.TextIOBase):
    """A text stream that passes on whole lines with secrets redacted and control characters escaped."""

    def __init__(self, raw, keep: str) -> None:
        super().__init__()
        self.raw, self.keep, self.pending = raw, keep, ""

    def write(self, text: str | bytes) -> int:
        if isinstance(text, bytes | bytearray):  # click.echo of bytes (shell completion's script) where no buffer is
            text = bytes(text).decode(self.encoding, "replace")
        self.pending += text
        *done, self.pending = re.split(r"(?<=[\n\r])", self.pending)
        for piece in done:
            self.raw.write(escape(redact(piece), keep=self.keep))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.raw.write(escape(redact(self.pending), keep=self.keep))
            self.pending = ""
        self.raw.flush()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.raw, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return getattr(self.raw, "errors", None) or "strict"

    def __getattr__(self, name: str):
        if name == "buffer":  # click writes through a stream's binary buffer when it finds one: around redaction
            raise AttributeError(name)
        return getattr(self.raw, name)

    def isatty(self) -> bool:
        return self.raw.isatty()

    def fileno(self) -> int:
        return self.raw.fileno()


@contextmanager
def redacted_output() -> Iterator[None]:
    """While a command runs, stdout and stderr (reports, progress bars, warnings, logs) pass through `redact`
    and `escape`: \\n and \\t stay, \\r stays on stderr (progress bars), any other control character is shown
    escaped; log records and warnings are made one printable line first (\\r escaped too)."""
    saved = sys.stdout, sys.stderr, logging.getLogRecordFactory()
    logging.setLogRecordFactory(_filtered_records(saved[2]))
    logging.captureWarnings(True)  # the warnings module's lines become log records: the same filter
    if sys.stdout is not None:  # None when the process started with its stdout closed
        sys.stdout = _Redacted(sys.stdout, "\n\t")
    if sys.stderr is not None:
        sys.stderr = _Redacted(sys.stderr, "\n\t\r")
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if stream is None:
                continue
            try:
                stream.flush()
            except BrokenPipeError:
                _drop(1)
            except (OSError, ValueError):
                pass
        logging.captureWarnings(False)
        sys.stdout, sys.stderr, factory = saved
        logging.setLogRecordFactory(factory)


def _filtered_records(factory):
    """A log record factory whose records' messages are `printable`: a library's log line (transformers echoing a
    config value, huggingface_hub, optuna, a Python warning) is one line, secrets redacted, every control
    character escaped, \\r included, whichever handler and stream it reaches (some were bound to the real
    stderr when the library was imported)."""
    def make(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        message = record.getMessage
        record.getMessage = lambda: printable(message().rstrip())  # type: ignore[method-assign]
        return record

    return make


def _drop(fd: int) -> None:
    """Point `fd` at /dev/null: the reader of stdout left (`| head`), or stderr cannot take the error line; what
    its stream still buffers goes nowhere, instead of failing again (with a second message, or Python's exit
    status 120) when the interpreter flushes it on exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass


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


def examples(*lines: str) -> str:
    """A command's --help epilog: "Examples:" and one real invocation per line, kept as written (click's
    `\\b` marks a paragraph it must not rewrap). tests/commands/test_cli_help.py parses every line against the
    command's parameters, so an example cannot name a flag the command no longer has."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of a MODEL argument: the `default` aliases, folders and .gguf files (Hub ids are not
    listed: that would need the network)."""
    from click.shell_completion import CompletionItem

    from melsurgery.checkpoint.source import DEFAULT_ALIASES

    items = [CompletionItem(a, help="the embedded SmolLM2-135M-Instruct") for a in DEFAULT_ALIASES
             if a.startswith(incomplete)]
    head, _, stem = incomplete.rpartition("/")
    folder = Path(head or ("/" if incomplete.startswith("/") else ".")).expanduser()
    try:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        entries = []
    for entry in entries:
        if not entry.name.startswith(stem) or (entry.name.startswith(".") and not stem.startswith(".")):
            continue
        shown = f"{head}/{entry.name}" if head or incomplete.startswith("/") else entry.name
        if entry.is_dir():
            items.append(CompletionItem(shown + "/"))
        elif entry.suffix.lower() == ".gguf":
            items.append(CompletionItem(shown))
    return items


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


def preflight(sources: tuple, outputs: tuple = ()) -> None:
    """Before any work: each local model named on the command line is read-only for the command (the path guard),
    and each file output (--json, --plot) is checked by the guard: outside the models, in an existing folder,
    not a folder itself, a name the filesystem can hold."""
    for source in sources:
        if source and exists(Path(source).expanduser()):
            protect(Path(source).expanduser())
    for out in outputs:
        if out is not None:
            check_output_file(out)


def write_outputs(result: JsonRecord | dict, json_path: Path | None, plot_path: Path | None, plot) -> None:
    """--json (`to_json()` of a typed result) and --plot of a command's result, each announced on its own line."""
    if json_path:
        from melsurgery.detect.scan import write_json

        write_json(result, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path)
        click.echo(f"wrote {plot_path}")
