"""Text files the user names (calibration and evaluation text, scan JSON, provenance): plain files only.

A FIFO would block the reader forever and /dev/zero would fill memory, so anything but a regular file is
refused before it is opened.
"""

from __future__ import annotations

import stat
from pathlib import Path

from melsurgery.errors import UserError


def read_text(path: Path, what: str) -> str:
    """The file's UTF-8 text; a missing, special or undecodable file is a one-line error naming `what`."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: cannot read {what} (not a regular file: {file_kind(mode)})")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: cannot read {what} (not UTF-8 text)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def file_kind(mode: int) -> str:
    """What a non-regular file is ("a FIFO", "a folder"...), so the refusal names it."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"
