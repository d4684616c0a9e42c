"""Atomic outputs (folders, GGUF files, JSON, plots, text): built in a hidden sibling, renamed into place at the end.

An interrupted run (Ctrl-C, SIGTERM, SIGHUP, a crash, a full disk) leaves no output and no sibling; a run
killed with SIGKILL leaves a hidden sibling named after its pid, which the next run removes. The one signal
handler of the project lives here (`unwind_on_signals`): the CLI holds it for a whole command, the writers
hold it while they write (for library callers).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from melsurgery.checkpoint.guard import TMP_PREFIX as PREFIX
from melsurgery.checkpoint.guard import check_writable
from melsurgery.checkpoint.hashing import SIDECAR
from melsurgery.errors import NO_SPACE, Interrupted, UserError, quote
from melsurgery.formats.wording import count
from melsurgery.outputs import PROVENANCE

CAUGHT = ("SIGINT", "SIGTERM", "SIGHUP")  # unwound, cleaned up, exit 128 + n
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # out of space: exit 5, not bad input


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
    """Refuse an output folder that is a file, lies under a file, is non-empty (unless overwrite), or leads into
    a protected source (the path guard: `protect`, and every model the command reads)."""
    out = Path(out)
    check_writable(out, protect)
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{quote(str(out))}: {quote(str(parent))} is a file, not a folder; choose another "
                                "output path")
            break
    if out.exists() and not out.is_dir():
        raise UserError(f"{quote(str(out))}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        foreign = foreign_files(out)
        if foreign:
            shown = ", ".join(quote(f, 60) for f in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserError(f"{quote(str(out))}: holds {count(len(foreign), 'file')} melsurgery did not write "
                            f"({shown}); choose another -o or remove them")
        if not overwrite:
            raise UserError(f"{quote(str(out))}: holds an earlier melsurgery output; pass --overwrite to replace it")


def foreign_files(folder: Path) -> list[str]:
    """The files of `folder` (relative, sorted) that melsurgery did not write: --overwrite replaces only a folder
    whose provenance.json melsurgery wrote and whose every other file that provenance lists (or is a file's
    .sha256 sidecar), so that it never deletes a user's notes, another tool's output or a model."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    try:
        record = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return files
    if not (isinstance(record, dict) and str(record.get("tool", "")).startswith("melsurgery")):
        return files
    known = {PROVENANCE, *(record.get("outputs") or {}), *(record.get("derived") or {})}
    known |= {name + SIDECAR for name in known}
    return [f for f in files if f not in known]


def foreign_file(path: Path) -> bool:
    """A GGUF file melsurgery did not write (its header holds no `melsurgery.version`): --overwrite keeps it."""
    from melsurgery.checkpoint.gguf_file import GGUFFile

    try:
        return "melsurgery.version" not in GGUFFile(path).kv
    except (UserError, OSError, ValueError):
        return True


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False, protect: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `out`, on any failure it disappears.

    While it is open, the catchable signals unwind (see `unwind_on_signals`), so the cleanup below always runs.
    """
    out = Path(out).absolute()
    check_output(out, overwrite, protect)
    tmp = out.parent / f"{PREFIX}{out.name}-{os.getpid()}"
    # The handlers go in first and the folder is made inside the cleanup scope: a signal at any point
    # after this line leaves nothing behind.
    with unwind_on_signals():
        try:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                _clean_stale(out.parent, out.name)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as exc:
                raise write_failed(out.parent, exc, "cannot create the output there") from None
            try:
                yield tmp
                _commit(tmp, out, overwrite)
            except OSError as exc:
                raise write_failed(out, exc) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(out: Path, overwrite: bool = True, protect: Path | None = None, hint: str = "name a file",
                      new_folder: bool = False) -> Path:
    """Refuse a single-file output that leads into a protected source (the path guard), is a folder, lies under a
    file or (unless `new_folder`) in a folder that does not exist, or exists (unless overwrite); returns it
    absolute."""
    out = check_writable(out, protect)
    if out.is_dir():
        raise UserError(f"{quote(str(out))}: is a folder; {hint}")
    parent = next(p for p in out.parents if p.exists() or p == Path(p.anchor))
    if not parent.is_dir() or (parent != out.parent and not new_folder):
        why = "is a file" if not parent.is_dir() else "does not exist"
        raise UserError(f"{quote(str(out))}: cannot write ({quote(str(parent if why == 'is a file' else out.parent))}"
                        f" {why})")
    if out.exists() and out.suffix.lower() == ".gguf" and foreign_file(out):
        raise UserError(f"{quote(str(out))}: a file melsurgery did not write (no melsurgery.* metadata); choose "
                        "another -o or remove it")
    if out.exists() and not overwrite:
        raise UserError(f"{quote(str(out))}: exists; pass --overwrite to replace it")
    return out


@contextmanager
def atomic_file(out: Path, overwrite: bool = False, protect: Path | None = None, hint: str = "name a file",
                new_folder: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed to `out`, on any failure it disappears.

    Without overwrite the commit is a hard link, which fails if another run created `out` meanwhile.
    """
    out = check_output_file(out, overwrite, protect, hint, new_folder)
    tmp = out.parent / f"{PREFIX}{out.name}-{os.getpid()}"
    with unwind_on_signals():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _clean_stale(out.parent, out.name)
            tmp.unlink(missing_ok=True)
            yield tmp
            if overwrite:
                os.replace(tmp, out)
            else:
                try:
                    os.link(tmp, out)
                except FileExistsError:
                    raise UserError(f"{quote(str(out))}: another run wrote this file meanwhile; nothing was changed"
                                    ) from None
        except OSError as exc:
            raise write_failed(out, exc) from None
        finally:
            tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, protect: Path | None = None, mode: int | None = None) -> Path:
    """Write one file (JSON, PNG, YAML, text) whole or not at all: guarded, written and synced as a hidden
    sibling, renamed over `path` (over the file a symlink names); a failure or a signal leaves neither a partial
    file nor the sibling. A pipe or terminal (`--json /dev/stdout`, a process substitution) is written to as a
    stream: it cannot be replaced, and must not be (as root, renaming over /dev/stdout would replace it)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        return _write_stream(path, raw, protect)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    with atomic_file(target, overwrite=True, protect=protect, new_folder=False) as tmp:
        with open(tmp, "wb") as fh:
            if mode is not None:  # the replaced file's permissions, never wider (`mode`: what it had)
                os.fchmod(fh.fileno(), mode)
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
    return path.absolute()


def _write_stream(path: Path, data: bytes, protect: Path | None) -> Path:
    """Write to an existing pipe or character device; anything else that is not a regular file is refused."""
    check_writable(path, protect)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        why = "a FIFO that nobody reads" if exc.errno == errno.ENXIO else exc.strerror or str(exc)
        raise UserError(f"{quote(str(path), 300)}: cannot write there ({why})") from None
    try:
        if not (stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISCHR(os.fstat(fd).st_mode)):
            raise UserError(f"{quote(str(path), 300)}: not a file, a pipe or a terminal; name a file")
        os.set_blocking(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise write_failed(path, exc) from None
    finally:
        os.close(fd)
    return path


def write_failed(out: Path, exc: OSError, what: str = "write failed") -> UserError:
    """The one line of a failed write (the output was removed): exit 5 when the disk or a size limit is full."""
    why = exc.strerror or str(exc)
    if exc.errno in FULL:
        return UserError(f"{quote(str(out))}: {what} ({why}); nothing was written: free some space and rerun",
                         exit_code=NO_SPACE)
    return UserError(f"{quote(str(out))}: {what} ({why}); nothing was written")


_fired: list[Interrupted] = []  # the signal that is unwinding the command (at most one)
_held: list[Interrupted] = []  # a signal that arrived inside a critical section, raised when it ends
_critical: list[bool] = []  # the stack of critical (True) and interruptible (False) sections


@contextmanager
def unwind_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt) once, so every `finally` on the way
    out removes its temporary sibling; signals that follow are ignored until that cleanup is done. SIGXFSZ is
    ignored (a file-size limit then fails the write with EFBIG instead of killing the process).

    Handlers a caller installed, and signals ignored on purpose (nohup), are left alone; nested scopes and
    threads other than the main one change nothing (Python only lets the main thread set handlers).
    """
    changed: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        wanted = [(getattr(signal, name, None), _unwind) for name in CAUGHT]
        for sig, handler in [*wanted, (getattr(signal, "SIGXFSZ", None), signal.SIG_IGN)]:
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler, None):
                changed[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in changed.items():
            signal.signal(sig, previous)
        if changed:
            _fired.clear()
            _held.clear()


def _unwind(signum, frame):  # noqa: ARG001 - signal handler signature
    if _fired:  # the first signal unwinds; a second one must not interrupt the cleanup it started
        return
    if _critical and _critical[-1]:
        _held[:] = _held or [Interrupted(signum)]
        return
    _fired.append(Interrupted(signum))
    raise _fired[0]


def _raise_held() -> None:
    if _held and not _fired:
        _fired.append(_held.pop())
        raise _fired[0]


@contextmanager
def critical() -> Iterator[None]:
    """A section a signal must not cut, such as a library's own bookkeeping (Optuna recording a trial): a signal
    arriving inside is held and raised when the section ends, or at the next `interruptible` section in it."""
    _critical.append(True)
    try:
        yield
    finally:
        _critical.pop()
    if not any(_critical):
        _raise_held()


@contextmanager
def interruptible() -> Iterator[None]:
    """Inside a critical section, the part a signal may cut (melsurgery's own computation); a signal held so far
    is raised on entry."""
    _critical.append(False)
    try:
        _raise_held()
        yield
    finally:
        _critical.pop()


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp to out. Without overwrite, only an absent or empty `out` is replaced, and if two runs race
    exactly one wins: the loser's rename fails because the winner's folder is not empty."""
    raced = UserError(f"{quote(str(out))}: another run wrote this folder meanwhile; nothing was changed")
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
