"""sha256 of files, computed while copying where possible so that big checkpoints are read once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """sha256 of a file read in chunks: provenance records it, so that push can prove nothing changed since."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def copy_hashing(src: Path, dst: Path) -> str:
    """Copy src to dst and return the sha256 of the bytes copied (one read, one write)."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(CHUNK):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()
