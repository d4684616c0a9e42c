"""Files melsurgery opens itself (named text, scan JSON, provenance, lock and side files): regular files only.

A FIFO would block the reader (or a writer of a lock file) forever and /dev/zero would fill memory, so
anything but a regular file is refused. `open_regular` opens without blocking and judges the opened file
itself, so nothing can swap the file between a check and the open; `refuse_special` judges a path that
another library will open (Optuna's journal, transformers' tokenizer files).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from melsurgery.errors import UserError, quote

MAX_TEXT = 1 << 30  # 1 GiB: more is not a calibration or evaluation text
MAX_JSON = 64 << 20  # 64 MB: more is not a config, an index or a scan result


def open_regular(path: Path, what: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A file descriptor of `path`, opened with `flags`; anything but a regular file is refused, unopened."""
    verb = "read" if flags == os.O_RDONLY else "use it as"
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing while nobody reads it
            raise UserError(f"{quote(str(path), 300)}: cannot {verb} {what} (not a regular file: a FIFO)") from None
        raise UserError(f"{quote(str(path), 300)}: cannot {verb} {what} ({exc.strerror or exc})") from None
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise UserError(f"{quote(str(path), 300)}: cannot {verb} {what} (not a regular file: {file_kind(kind)})")
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: Path, what: str, limit: int = MAX_TEXT) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is a one-line error naming `what`."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise UserError(f"{quote(str(path), 300)}: cannot read {what} ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise UserError(f"{quote(str(path), 300)}: {what} is larger than {limit:,} bytes")
    return data


def read_text(path: Path, what: str, limit: int = MAX_TEXT) -> str:
    """The file's UTF-8 text; a missing, special, huge or undecodable file is a one-line error naming `what`."""
    try:
        return read_bytes(path, what, limit).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{quote(str(path), 300)}: cannot read {what} (not UTF-8 text)") from None


def refuse_special(path: Path, what: str) -> None:
    """Refuse `path` when it exists and is not a regular file (a library will open it, and would block)."""
    try:
        kind = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{quote(str(path), 300)}: cannot use it as {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(kind):
        raise UserError(f"{quote(str(path), 300)}: cannot use it as {what} (not a regular file: {file_kind(kind)})")


def refuse_special_files(folder: Path) -> None:
    """FIFOs, devices and sockets in a model folder would block or stream forever when read: refused before
    anything is opened."""
    for p in Path(folder).iterdir():
        try:
            kind = p.stat().st_mode
        except OSError:
            continue  # a dangling symlink: whatever needs it reports it missing
        if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
            raise UserError(f"{p}: not a regular file ({file_kind(kind)}); a model folder holds plain files")


def file_kind(mode: int) -> str:
    """What a non-regular file is ("a FIFO", "a folder"...), so the refusal names it."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"
