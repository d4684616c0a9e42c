"""Atomic output folders: built in a hidden sibling, renamed into place at the very end.

An interrupted run (Ctrl-C, SIGTERM, a crash, a full disk) leaves no output folder; a run killed
with SIGKILL leaves a hidden sibling named after its pid, which the next run removes.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

PREFIX = ".melsurgery-tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    for p in parent.glob(f"{PREFIX}{name}-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def check_output(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `out`, on any failure it disappears."""
    out = Path(out).absolute()
    check_output(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out.parent}: cannot create ({exc.strerror})") from None
    _clean_stale(out.parent, out.name)
    tmp = out.parent / f"{PREFIX}{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_interrupt)  # make SIGTERM unwind through the cleanup below
    try:
        yield tmp
        _commit(tmp, out, overwrite)
    except OSError as exc:
        raise UserError(f"{out}: write failed ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.is_dir():
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"{out}: another run wrote this folder meanwhile; nothing was changed")
        trash = out.parent / f"{PREFIX}{out.name}-{os.getpid()}-old"
        os.rename(out, trash)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(trash, out)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if out.exists():
            raise UserError(f"{out}: another run wrote this folder meanwhile; nothing was changed") from None
        raise exc
