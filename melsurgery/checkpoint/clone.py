"""Whole-file copies at the cost the filesystem allows: a clone (shared blocks, no data moved) where it can,
else an in-kernel copy, else a copy through this process.

A clone (`ioctl(FICLONE)`: XFS with reflink, btrfs, bcachefs, ZFS 2.2+, NFS 4.2 servers that clone) makes
the output file share the source's blocks copy-on-write: writing to the clone later allocates new blocks
for what is written and never touches the source's. Where the filesystem cannot clone (ext4, tmpfs, across
filesystems) `os.copy_file_range` copies in the kernel; where even that is refused, the bytes go through
this process. `Copier` tries the cheapest method first and remembers what a filesystem refused, so that a
refusal is met once per run, not once per file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from melsurgery.errors import UserError

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
FIEMAP_FLAG_SYNC = 0x1

CLONE = "clone"
KERNEL_COPY = "copy_file_range"
PROCESS_COPY = "read-write"
MODES = (CLONE, KERNEL_COPY, PROCESS_COPY)  # cheapest first
# What a filesystem (or a pair of them) answers when it cannot do a method; anything else is a real error.
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.ENOTTY,
                         errno.EPERM, errno.EBADF})
CHUNK = 64 * 1024 * 1024


@dataclass
class Copier:
    """Copies whole files, each by the cheapest method not yet refused in this run; `used` records which
    method wrote which file (by destination path), so that reports say how the output was made."""

    refused: set[str] = field(default_factory=set)
    used: dict[str, str] = field(default_factory=dict)

    def copy(self, src: Path, dst: Path) -> str:
        """Copy src to a new file dst; returns the method used (CLONE, KERNEL_COPY or PROCESS_COPY)."""
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            size = os.fstat(fi.fileno()).st_size
            for mode in MODES:
                if mode in self.refused:
                    continue
                try:
                    _COPY[mode](fi.fileno(), fo.fileno(), size)
                except OSError as exc:
                    if mode == PROCESS_COPY or exc.errno not in UNSUPPORTED:
                        raise
                    self.refused.add(mode)
                    os.ftruncate(fo.fileno(), 0)  # a copy refused part way starts again from nothing
                    continue
                self.used[str(dst)] = mode
                return mode
        raise AssertionError("unreachable: the process copy never declines")

    def clone(self, src: Path, dst: Path) -> bool:
        """Make dst a clone of src if this filesystem can (and has not refused before); False otherwise, and dst
        is then an empty file."""
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            if CLONE in self.refused:
                return False
            try:
                _clone(fi.fileno(), fo.fileno(), 0)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED:
                    raise
                self.refused.add(CLONE)
                return False
        self.used[str(dst)] = CLONE
        return True

    @property
    def mode(self) -> str | None:
        """The method that wrote the files: one name, or several joined by '+' when files differed."""
        modes = [m for m in MODES if m in self.used.values()]
        return "+".join(modes) if modes else None


def _clone(fd_in: int, fd_out: int, size: int) -> None:  # noqa: ARG001 - one signature for all methods
    fcntl.ioctl(fd_out, FICLONE, fd_in)


def kernel_copy(fd_in: int, fd_out: int, offset: int, length: int, shift: int = 0) -> None:
    """Copy [offset, offset + length) of fd_in to offset + shift of fd_out in the kernel (copy_file_range)."""
    end = offset + length
    while offset < end:
        n = os.copy_file_range(fd_in, fd_out, end - offset, offset, offset + shift)
        if n == 0:
            raise UserError(f"{_fd_name(fd_in)}: truncated while being copied; re-download it")
        offset += n


def process_copy(fd_in: int, fd_out: int, offset: int, length: int, shift: int = 0) -> None:
    """The same through this process's memory, a chunk at a time (where copy_file_range is refused)."""
    end = offset + length
    while offset < end:
        data = os.pread(fd_in, min(CHUNK, end - offset), offset)
        if not data:
            raise UserError(f"{_fd_name(fd_in)}: truncated while being copied; re-download it")
        view = memoryview(data)
        while view:
            n = os.pwrite(fd_out, view, offset + shift)
            view, offset = view[n:], offset + n


_COPY = {CLONE: _clone, KERNEL_COPY: lambda fi, fo, size: kernel_copy(fi, fo, 0, size),
         PROCESS_COPY: lambda fi, fo, size: process_copy(fi, fo, 0, size)}


def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "a source file"


def unshared_bytes(ranges: list[tuple[int, int]], block: int) -> int:
    """Disk a clone needs once `ranges` of it are rewritten: every block a range touches is copied on write
    (a partial block as a whole), each block once however many ranges touch it."""
    blocks: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        lo, hi = start // block, -(-end // block)
        if blocks and lo <= blocks[-1][1]:
            blocks[-1] = (blocks[-1][0], max(blocks[-1][1], hi))
        else:
            blocks.append((lo, hi))
    return sum(hi - lo for lo, hi in blocks) * block


def shared_bytes(path: Path) -> tuple[int, int]:
    """(bytes in extents the filesystem reports shared with another file, bytes in all extents) of `path`,
    from FIEMAP: how a benchmark or a test sees that a clone really shares blocks. Holes count in neither."""
    header = struct.Struct("=QQIIII")
    extent = struct.Struct("=QQQQQIIII")
    shared = total = 0
    start = 0
    count = 512
    with open(path, "rb") as fh:
        while True:
            buf = bytearray(header.pack(start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, count, 0) + bytes(
                extent.size * count))
            fcntl.ioctl(fh.fileno(), FS_IOC_FIEMAP, buf)
            mapped = header.unpack_from(buf)[3]
            last = False
            for k in range(mapped):
                logical, _, length, _, _, flags, *_ = extent.unpack_from(buf, header.size + k * extent.size)
                total += length
                shared += length if flags & FIEMAP_EXTENT_SHARED else 0
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if last or mapped == 0:
                return shared, total
