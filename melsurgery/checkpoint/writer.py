"""Writing a patched checkpoint: untouched bytes copied, edited tensors spliced in on the way.

Edits keep dtype and shape, so an edited tensor occupies exactly its old byte range: a shard with
edits is copied with only those ranges replaced. Headers, the index and every other tensor stay
byte-identical, every byte is read and written once, and peak memory is one tensor plus a few chunks.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from melsurgery.checkpoint.edits import Edit, edited_tensor, is_identity
from melsurgery.checkpoint.hashing import copy_hashing, sha256_file
from melsurgery.checkpoint.reader import INDEX_NAME, Checkpoint
from melsurgery.checkpoint.safetensors_file import TensorInfo, tensor_bytes
from melsurgery.errors import UserError
from melsurgery.outputs import GENERATED  # produced by patch itself, never copied from the source


@dataclass
class AppliedEdit:
    """What an edit really changed in one tensor (entries, largest change): provenance and reports show it,
    so an edit that changed nothing is visible."""

    tensor: str
    shard: str
    changed: int
    max_abs_delta: float


def write_weights(ckpt: Checkpoint, edits: list[Edit], out: Path, link: bool = False,
                  outputs: dict[str, str] | None = None) -> tuple[list[AppliedEdit], dict]:
    """Write every shard (and the index) into `out`; returns what changed and sha256 of each input file.

    `outputs`, when given, receives the sha256 of every file written here, computed on the way (so that
    provenance need not read the output again).
    """
    by_tensor: dict[str, list[Edit]] = {}
    for e in edits:
        if is_identity(e):
            continue
        ckpt.info(e.tensor)  # fails clearly on an unknown name
        by_tensor.setdefault(e.tensor, []).append(e)
    applied: list[AppliedEdit] = []
    inputs: dict[str, str] = {}
    outputs = {} if outputs is None else outputs
    for shard in ckpt.shards:
        src, dst = ckpt.folder / shard, out / shard
        dst.parent.mkdir(parents=True, exist_ok=True)
        mine = [n for n in by_tensor if ckpt.info(n).path.name == Path(shard).name]
        if not mine and link:
            inputs[shard] = outputs[shard] = sha256_file(src)
            try:
                os.link(os.path.realpath(src), dst)  # os.link does not follow symlinks (Hub cache) on Linux
                continue
            except OSError:
                pass  # another filesystem: copy instead
        done: dict[str, AppliedEdit] = {}
        splices = {info.start: (info.end, _editor(info, by_tensor[info.name], shard, done))
                   for info in (ckpt.headers[shard].tensors[n] for n in mine)}
        inputs[shard], outputs[shard] = copy_spliced(src, dst, splices, sync=False)
        applied += [done[n] for n in mine]
        if shard == ckpt.shards[0]:
            _test_pause()
    for shard in ckpt.shards:  # durable before anything is committed; writeback overlapped the copying
        fsync_file(out / shard)
    if ckpt.index is not None:
        inputs[INDEX_NAME] = outputs[INDEX_NAME] = copy_hashing(ckpt.folder / INDEX_NAME, out / INDEX_NAME)
    return applied, inputs


PAUSE_ENV = "MELSURGERY_TEST_PAUSE_FILE"


def _test_pause() -> None:
    """Test hook: with $MELSURGERY_TEST_PAUSE_FILE set, announce that a shard is written by creating that
    file, then wait (up to 10 minutes) so that a test can interrupt the write at a known point."""
    path = os.environ.get(PAUSE_ENV)
    if not path:
        return
    Path(path).touch()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.05)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk before its folder is renamed into place, so a crash leaves no torn output."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _editor(info: TensorInfo, edits: list[Edit], shard: str, done: dict[str, AppliedEdit]) -> Splice:
    """The splice that turns a tensor's stored bytes into its edited bytes (same dtype, same size)."""

    def edit(data: bytes) -> bytes:
        original = torch.frombuffer(bytearray(data), dtype=info.torch_dtype).reshape(info.shape) if data else \
            torch.empty(info.shape, dtype=info.torch_dtype)
        new = edited_tensor(original, edits)
        done[info.name] = _applied(info.name, shard, original, new)
        out = tensor_bytes(new)
        if len(out) != len(data):
            raise RuntimeError(f"{info.name}: an edit changed the tensor's size")
        return out

    return edit


def _applied(name: str, shard: str, original: torch.Tensor, new: torch.Tensor) -> AppliedEdit:
    """Entries whose stored bytes changed, and the largest change among them (only those go to fp32)."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[original.element_size()]
    changed = original.view(bits) != new.view(bits) if original.dtype != torch.bool else original != new
    count = int(changed.sum())
    if not count:
        return AppliedEdit(name, shard, 0, 0.0)
    delta = (new[changed].double() - original[changed].double()).abs()
    return AppliedEdit(name, shard, count, float(delta.max()))


Splice = Callable[[bytes], bytes]
PIECE = 64 * 1024 * 1024  # unit of copying and hashing
WINDOW = 4 * PIECE  # how far the copy and the hash may drift apart (so the source is read from disk once)
NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def copy_spliced(src: Path, dst: Path, splices: dict[int, tuple[int, Splice]], sync: bool = True) -> tuple[str, str]:
    """Copy src to dst, replacing each byte range [start, end) by splice(original bytes).

    A splice may return more or fewer bytes than it replaced (a GGUF header that gains metadata keys):
    everything after it then lands shifted in dst by the difference.

    With sync=False the file is not fsynced here (the caller does, later) but its writeback is started, so
    that the next file's work overlaps it.

    Returns sha256 of the input and of the output. A second thread copies in the kernel
    (copy_file_range) while this one hashes the source through a read-only mapping, so each byte is read
    from disk once and copied in memory once: hashing costs CPU, not extra I/O, and runs alongside the copy.
    """
    size = src.stat().st_size
    pieces = list(_pieces(size, splices))
    spliced: dict[int, Future[bytes]] = {start: Future() for start in splices}
    progress = _Progress()
    in_hash = hashlib.sha256()
    out_hash = None  # a copy of in_hash from the first splice on: the bytes before it are the same
    # From the first splice on, the output's hash runs in its own thread, a few pieces behind this one.
    behind: deque[tuple[Future[None], memoryview | bytes, int]] = deque()
    with (open(src, "rb") as fi, open(dst, "wb") as fo, ThreadPoolExecutor(1, "melsurgery-copy") as pool,
          ThreadPoolExecutor(1, "melsurgery-hash") as hasher):
        copier = pool.submit(_copy_pieces, fi.fileno(), fo.fileno(), pieces, spliced, progress)
        try:
            with _mapped(fi.fileno(), size) as source:
                released = 0
                try:
                    for offset, length, splice in pieces:
                        try:
                            progress.wait("hash", offset)
                        except CancelledError:
                            copier.result()  # the copy failed (a full disk, say): raise its error
                            raise
                        if splice is not None and out_hash is None:
                            out_hash = in_hash.copy()
                        with source[offset : offset + length] as data:
                            in_hash.update(data)
                            # the output hash needs its own view of a plain piece: it outlives this block
                            out = splice(bytes(data)) if splice is not None else source[offset : offset + length]
                        if splice is not None:
                            spliced[offset].set_result(out)  # type: ignore[arg-type]
                        if out_hash is not None:
                            behind.append((hasher.submit(out_hash.update, out), out, offset))
                        elif isinstance(out, memoryview):
                            out.release()
                        _settle(behind, keep=WINDOW // PIECE)
                        progress.advance("hash", offset + length)
                        released = _release(source.obj, released, behind[0][2] if behind else offset + length)
                    _settle(behind, keep=0)
                finally:
                    _drop(behind)  # views into the mapping must go before it is closed
            copier.result()
        except BaseException:
            progress.stop()
            for f in spliced.values():
                f.cancel()
            raise
        if sync:
            os.fsync(fo.fileno())
        elif hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fo.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # starts writeback, does not wait
    return in_hash.hexdigest(), (out_hash or in_hash).hexdigest()


def _drop(behind: deque[tuple[Future[None], memoryview | bytes, int]]) -> None:
    """After an error: cancel the pending output hashes, wait for a running one, let go of their views."""
    while behind:
        future, view, _ = behind.popleft()
        if not future.cancel():
            future.exception()  # waits; its error, if any, is not the one being raised
        if isinstance(view, memoryview):
            view.release()


def _settle(behind: deque[tuple[Future[None], memoryview | bytes, int]], keep: int) -> None:
    """Wait for the output hash until at most `keep` pieces are pending, and let go of their memory."""
    while behind and (len(behind) > keep or behind[0][0].done()):
        future, view, _ = behind.popleft()
        future.result()
        if isinstance(view, memoryview):
            view.release()


class _Progress:
    """How far the copy and the hash have got; the one ahead waits when it is more than WINDOW ahead."""

    def __init__(self) -> None:
        self.done = {"copy": 0, "hash": 0}
        self.stopped = False
        self.cond = threading.Condition()

    def wait(self, who: str, offset: int) -> None:
        other = "hash" if who == "copy" else "copy"
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or offset <= self.done[other] + WINDOW)
            if self.stopped:
                raise CancelledError

    def advance(self, who: str, offset: int) -> None:
        with self.cond:
            self.done[who] = offset
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


@contextmanager
def _mapped(fd: int, size: int) -> Iterator[memoryview]:
    """A read-only view of the whole file, read sequentially."""
    if size == 0:
        yield memoryview(b"")
        return
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            yield view
        finally:
            view.release()


def _release(mm: object, start: int, end: int) -> int:
    """Drop pages [start, end) that are hashed from this process's memory (not from the page cache), so
    that RSS stays small; returns how far the mapping is now released."""
    end -= end % mmap.PAGESIZE
    if isinstance(mm, mmap.mmap) and end > start and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        return end
    return start


def _copy_pieces(fd_in: int, fd_out: int, pieces: list[tuple[int, int, Splice | None]],
                 spliced: dict[int, Future[bytes]], progress: _Progress) -> None:
    try:
        _copy_pieces_in_order(fd_in, fd_out, pieces, spliced, progress)
    except BaseException:
        progress.stop()  # wake the hashing thread, which then raises this error
        raise


def _copy_pieces_in_order(fd_in: int, fd_out: int, pieces: list[tuple[int, int, Splice | None]],
                          spliced: dict[int, Future[bytes]], progress: _Progress) -> None:
    in_kernel = hasattr(os, "copy_file_range")
    shift = 0  # where dst is relative to src, after splices that changed size
    for offset, length, splice in pieces:
        progress.wait("copy", offset)
        if splice is not None:
            data = spliced[offset].result()
            _pwrite_all(fd_out, data, offset + shift)
            shift += len(data) - length
        elif in_kernel:
            try:
                _copy_range(fd_in, fd_out, offset, length, shift)
            except OSError as exc:
                if exc.errno not in NO_COPY_RANGE:
                    raise
                in_kernel = False  # a filesystem without copy_file_range: copy through this process
        if splice is None and not in_kernel:
            _pwrite_all(fd_out, os.pread(fd_in, length, offset), offset + shift)
        progress.advance("copy", offset + length)


def _copy_range(fd_in: int, fd_out: int, offset: int, length: int, shift: int = 0) -> None:
    end = offset + length
    while offset < end:
        n = os.copy_file_range(fd_in, fd_out, end - offset, offset, offset + shift)
        if n == 0:
            raise UserError(f"{_fd_name(fd_in)}: truncated while being copied; re-download it")
        offset += n


def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "a source file"


def _pieces(size: int, splices: dict[int, tuple[int, Splice]]) -> Iterator[tuple[int, int, Splice | None]]:
    """(offset, length, splice or None) covering [0, size): spliced ranges whole, the rest in PIECEs."""
    pos = 0
    for start in [*sorted(splices), size]:
        while pos < start:
            n = min(PIECE, start - pos)
            yield pos, n, None
            pos += n
        if start < size:
            end, splice = splices[start]
            yield start, end - start, splice
            pos = end


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_side_files(ckpt: Checkpoint, out: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Copy tokenizer, templates, generation config, licences... verbatim; returns their sha256."""
    inputs = {}
    for rel in ckpt.side_files():
        src = ckpt.folder / rel
        if rel in skip or rel in GENERATED:
            inputs[rel] = sha256_file(src)
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        inputs[rel] = copy_hashing(src, dst)
        # keep the source's mode bits (an executable stays executable) but never a read-only output file
        os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode) | stat.S_IWUSR)
    return inputs
