"""Atomic outputs (folders, single GGUF files): built in a hidden sibling, renamed into place at the very end.

An interrupted run (Ctrl-C, SIGTERM, a crash, a full disk) leaves no output folder; a run killed
with SIGKILL leaves a hidden sibling named after its pid, which the next run removes.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from melsurgery.errors import UserError

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
    """Remove what killed runs left: `PREFIX<name>-<pid>` folders (and `-<pid>-old` ones of --overwrite)."""
    for p in parent.glob(f"{PREFIX}{name}-*"):
        try:
            pid = int(p.name.removesuffix("-old").rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _alive(pid):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)  # a single-file output (GGUF)


def check_output(out: Path, overwrite: bool, protect: Path | None = None) -> None:
    """Refuse an output that is a file, lies under a file, is a non-empty folder (unless overwrite), or
    overlaps `protect` (the source): holding it, or inside it (writing there would change the source)."""
    out = Path(out)
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{out}: {parent} is a file, not a folder; choose another output path")
            break
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if protect is not None:
        check_apart(out, protect)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; pass --overwrite to replace it")


def check_apart(out: Path, protect: Path, what: str = "the source model") -> None:
    """Refuse an output that is `protect`, holds it, or lies inside it (writing there would change it)."""
    source, target = Path(protect).resolve(), Path(out).resolve()
    if source == target or target in source.parents:
        raise UserError(f"{out}: holds {what} ({source}); write the output somewhere else")
    if source in target.parents:
        raise UserError(f"{out}: is inside {what} folder {source}; write the output somewhere else")


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False, protect: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `out`, on any failure it disappears.

    While it is open, SIGTERM unwinds like Ctrl-C and SIGXFSZ is ignored (a file-size limit then fails the
    write with EFBIG instead of killing the process), so that the cleanup below always runs.
    """
    out = Path(out).absolute()
    check_output(out, overwrite, protect)
    tmp = out.parent / f"{PREFIX}{out.name}-{os.getpid()}"
    # The handlers go in first and the folder is made inside the cleanup scope: a signal at any point
    # after this line leaves nothing behind.
    with _signals_unwind():
        try:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                _clean_stale(out.parent, out.name)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as exc:
                raise UserError(f"{out.parent}: cannot create the output there ({exc.strerror or exc})") from None
            try:
                yield tmp
                _commit(tmp, out, overwrite)
            except OSError as exc:
                raise UserError(f"{out}: write failed ({exc.strerror or exc}); nothing was written") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(out: Path, overwrite: bool, protect: Path | None = None) -> None:
    """Refuse a single-file output that is a folder, exists (unless overwrite), or is the source itself."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; name a .gguf file, or pass --format gguf to write a folder")
    if protect is not None and out.exists() and out.resolve() == Path(protect).resolve():
        raise UserError(f"{out}: is the source model; write the output somewhere else")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")


@contextmanager
def atomic_file(out: Path, overwrite: bool = False, protect: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed to `out`, on any failure it disappears.

    Without overwrite the commit is a hard link, which fails if another run created `out` meanwhile.
    """
    out = Path(out).absolute()
    check_output_file(out, overwrite, protect)
    tmp = out.parent / f"{PREFIX}{out.name}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(out.parent, out.name)
        tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"{out.parent}: cannot create the output there ({exc.strerror or exc})") from None
    with _signals_unwind():
        try:
            yield tmp
            if overwrite:
                os.replace(tmp, out)
            else:
                try:
                    os.link(tmp, out)
                except FileExistsError:
                    raise UserError(f"{out}: another run wrote this file meanwhile; nothing was changed") from None
        except OSError as exc:
            raise UserError(f"{out}: write failed ({exc.strerror or exc}); nothing was written") from None
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt and SIGXFSZ is ignored, where their default would kill us uncleaned.

    Handlers a caller installed are left alone, and nothing is changed off the main thread (Python only
    lets the main thread set handlers).
    """
    changed: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig, handler in ((signal.SIGTERM, _raise_interrupt), (getattr(signal, "SIGXFSZ", None), signal.SIG_IGN)):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                changed[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in changed.items():
            signal.signal(sig, previous)


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp to out. Without overwrite, only an absent or empty `out` is replaced, and if two runs race
    exactly one wins: the loser's rename fails because the winner's folder is not empty."""
    raced = UserError(f"{out}: another run wrote this folder meanwhile; nothing was changed")
    if overwrite and out.is_dir():
        trash = out.parent / f"{PREFIX}{out.name}-{os.getpid()}-old"
        try:
            os.rename(out, trash)
        except FileNotFoundError:
            trash = None  # another run moved it away meanwhile
        try:
            os.rename(tmp, out)
        except OSError:
            if trash is not None:
                os.rename(trash, out)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return
    if out.is_dir():
        try:
            os.rmdir(out)  # only succeeds while empty
        except FileNotFoundError:
            pass
        except OSError:
            raise raced from None
    try:
        os.rename(tmp, out)  # fails when a racing run's non-empty folder is already there
    except OSError as exc:
        if out.exists():
            raise raced from None
        raise exc
