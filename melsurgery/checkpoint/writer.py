"""Writing a patched checkpoint: untouched bytes cloned or copied, edited tensors written in place.

Edits keep dtype and shape, so an edited tensor occupies exactly its old byte range and the output keeps the
source's layout byte for byte: headers, the index and every other tensor stay identical. That layout is
also the cheapest one for a filesystem that shares blocks: every untouched byte keeps its offset, so a
whole-file clone (`clone.Copier`) followed by rewriting the edited ranges in place shares every block but
those an edit touches (two partial blocks at most per edited tensor), with no range to align by hand.
Where the filesystem cannot clone, the file is copied in the kernel with the edited ranges spliced in.

sha256: only the bytes written are hashed. An untouched file's sha256 is reused when a record of it can be
trusted (`hashing.known_sha256`). An edited file whose source sha256 is trusted is recorded by its derivation
(`DerivedFile`: the source's sha256 plus each edited range's), which push, reading every file anyway, completes
with the whole-file sha256. (sha256 is a chain over the bytes in order: the output's own digest means reading
all of it, and no midstate of the source's hash is stored anywhere to resume from.) A file whose source has no
trusted sha256 (a plain folder: no sidecar, no Hub cache), edited or not, is recorded by its derivation too,
its source named by size, mtime and inode: push hashes the source while those hold and records both digests.
"""

from __future__ import annotations

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

from melsurgery.checkpoint.clone import CLONE, KERNEL_COPY, PROCESS_COPY, UNSUPPORTED, Copier, kernel_copy, process_copy
from melsurgery.checkpoint.edits import Edit, edited_tensor, is_identity
from melsurgery.checkpoint.hashing import TRUST, KnownHash, copy_hashing, known_sha256, sha256_file
from melsurgery.checkpoint.provenance import DerivedFile, EditedRange, SourceFile, WriteRecord, recorded_hashes
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


@dataclass(frozen=True)
class ShardPlan:
    """How one weight file is written: hard-linked (`link`, only when untouched) or copied (cloned where the
    filesystem can), the byte ranges rewritten with edited tensors, and the input sha256 when a trusted record
    of it exists (else it is computed)."""

    shard: str
    size: int
    rewrites: tuple[tuple[int, int], ...] = ()
    known: KnownHash | None = None
    link: bool = False

    @property
    def hashed_bytes(self) -> int:
        """Bytes hashed: only the edited bytes written (the input's sha256 is reused where trusted, else deferred
        to push, and then the source bytes they replace are hashed too; the output is recorded by its
        derivation)."""
        return self.rewritten_bytes * (1 if self.known is not None else 2)

    def copied_bytes(self, mode: str) -> int:
        """Bytes the copy moves (read and written) in `mode`: a clone or a hard link moves none."""
        return 0 if self.link or mode == CLONE else self.size

    @property
    def rewritten_bytes(self) -> int:
        """Bytes of edited tensors written over the copy."""
        return sum(end - start for start, end in self.rewrites)


def plan_shards(sizes: dict[str, int], rewrites: dict[str, list[tuple[int, int]]],
                known: dict[str, KnownHash], link: bool) -> list[ShardPlan]:
    """One plan per weight file, in the given order: `--link` hard-links only files without edits."""
    return [ShardPlan(shard, size, tuple(sorted(rewrites.get(shard, ()))), known.get(shard),
                      link and not rewrites.get(shard)) for shard, size in sizes.items()]


@dataclass
class WrittenWeights:
    """What write_weights did: the edits applied, sha256 of each input and output weight file, and the record
    of how (provenance `writer`)."""

    applied: list[AppliedEdit]
    inputs: dict[str, str]
    outputs: dict[str, str]
    record: WriteRecord
    derived: dict[str, DerivedFile]


@dataclass(frozen=True)
class WrittenShard:
    """One weight file written: its input sha256 (None: not trusted, deferred to push), its output sha256 (None
    when recorded by its derivation, `edits`), and how it was written ("link" or the copier's method)."""

    input_sha256: str | None
    output_sha256: str | None
    how: str
    edits: tuple[EditedRange, ...] = ()


def write_weights(ckpt: Checkpoint, edits: list[Edit], out: Path, link: bool = False) -> WrittenWeights:
    """Write every shard (and the index) into `out`, each untouched byte cloned or copied, each edited tensor
    written over it; sha256 of the inputs reused where trusted, of the outputs computed on the way (so that
    provenance need not read the output again)."""
    by_tensor: dict[str, list[Edit]] = {}
    for e in edits:
        if is_identity(e):
            continue
        ckpt.info(e.tensor)  # fails clearly on an unknown name
        by_tensor.setdefault(e.tensor, []).append(e)
    mine = {shard: [ckpt.headers[shard].tensors[n] for n in by_tensor if ckpt.info(n).path.name == Path(shard).name]
            for shard in ckpt.shards}
    recorded = recorded_hashes(ckpt.folder)
    # each file as it was when its hash was judged: a file that changes before it is written loses the trust
    seen = {s: _identity(ckpt.folder / s) for s in ckpt.shards}
    plans = plan_shards({s: seen[s][2] for s in ckpt.shards},
                        {s: [(i.start, i.end) for i in infos] for s, infos in mine.items() if infos},
                        {s: k for s in ckpt.shards if (k := known_sha256(ckpt.folder, s, recorded)) is not None},
                        link)
    copier = Copier()
    applied: list[AppliedEdit] = []
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    ranges: dict[str, tuple[EditedRange, ...]] = {}
    linked: list[str] = []
    for plan in plans:
        (out / plan.shard).parent.mkdir(parents=True, exist_ok=True)
        done: dict[str, AppliedEdit] = {}
        splices = {info.start: (info.end, _editor(info, by_tensor[info.name], plan.shard, done))
                   for info in mine[plan.shard]}
        shard = _write_shard(ckpt.folder, out, plan, splices, copier)
        if _identity(ckpt.folder / plan.shard) != seen[plan.shard]:
            raise UserError(f"{ckpt.folder / plan.shard}: changed while being copied; patch again when nothing "
                            "writes to it")
        if shard.input_sha256 is not None:
            inputs[plan.shard] = shard.input_sha256
        if shard.output_sha256 is None:
            ranges[plan.shard] = shard.edits
        else:
            outputs[plan.shard] = shard.output_sha256
        if shard.how == "link":
            linked.append(plan.shard)
        applied += [done[i.name] for i in mine[plan.shard]]
        if plan is plans[0]:
            _test_pause()
    for shard in ckpt.shards:  # durable before anything is committed; writeback overlapped the copying
        fsync_file(out / shard)
    derived = {}
    for shard, edits in ranges.items():  # size and mtime as left: the untouched bytes are trusted while they hold
        st = (out / shard).stat()
        ino, _, size, mtime = seen[shard]  # a source without a trusted sha256: push hashes it while these hold
        derived[shard] = DerivedFile(source_sha256=inputs.get(shard), size=st.st_size, mtime_ns=st.st_mtime_ns,
                                     edits=edits, source_file=None if shard in inputs else SourceFile(size, mtime, ino))
    if ckpt.index is not None:
        inputs[INDEX_NAME] = outputs[INDEX_NAME] = copy_hashing(ckpt.folder / INDEX_NAME, out / INDEX_NAME)
    reused = {p.shard: p.known.trust for p in plans if p.known is not None}
    record = WriteRecord(
        mode=copier.mode or "link", linked=tuple(linked),
        rewritten_bytes=sum(p.rewritten_bytes for p in plans),
        hashed_bytes=sum(p.hashed_bytes for p in plans),
        reused_sha256=reused, trusted_because={k: TRUST[k] for k in sorted(set(reused.values()))},
        derived=tuple(derived), deferred=tuple(s for s, d in derived.items() if d.deferred))
    return WrittenWeights(applied, inputs, outputs, record, derived)


def _write_shard(folder: Path, out: Path, plan: ShardPlan, splices: dict[int, tuple[int, Splice]],
                 copier: Copier) -> WrittenShard:
    """Write one weight file as planned: linked, or copied (cloned where the filesystem can) with its edits
    written over the copy. Only the bytes written are hashed: the source's sha256 is the trusted one, or, where
    none is trusted, deferred to push (the file is then recorded by its derivation, edited or not)."""
    src, dst = folder / plan.shard, out / plan.shard
    known = plan.known.sha256 if plan.known is not None else None
    if plan.link:
        try:
            os.link(os.path.realpath(src), dst)  # os.link does not follow symlinks (Hub cache) on Linux
            return WrittenShard(known, known, "link")
        except OSError:
            pass  # another filesystem: copy instead
    how = copier.copy(src, dst)
    edits = write_over(src, dst, splices, replaced=known is None)
    if how != CLONE:
        _start_writeback(dst)
    return WrittenShard(known, None if edits or known is None else known, how, edits)


def write_over(src: Path, dst: Path, splices: dict[int, tuple[int, Splice]],
               replaced: bool = False) -> tuple[EditedRange, ...]:
    """Write each splice over dst, a copy of src (same size): its original bytes read from src, only the bytes
    written hashed (and, with `replaced`, the original bytes too: a source whose sha256 is deferred); returns the
    ranges written with their sha256."""
    written = []
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        for start, (end, splice) in sorted(splices.items()):
            old = _pread_all(fi.fileno(), start, end)
            new = splice(old)
            if len(new) != end - start:
                raise RuntimeError("a splice changed the size of a range of a copied file")
            _pwrite_all(fo.fileno(), new, start)
            written.append(EditedRange(start, end, hashlib.sha256(new).hexdigest(),
                                       hashlib.sha256(old).hexdigest() if replaced else None))
    return tuple(written)


def _pread_all(fd: int, start: int, end: int) -> bytes:
    parts = []
    while start < end:
        chunk = os.pread(fd, end - start, start)
        if not chunk:
            raise UserError(f"the file ends before byte {end}; it changed while being patched")
        parts.append(chunk)
        start += len(chunk)
    return b"".join(parts)


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is written to (its size is third): a copy, or a trusted hash, is valid only if
    it stays the same."""
    st = path.stat()
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def _start_writeback(path: Path) -> None:
    """Start writing a copied file back to disk without waiting, so that the next file's work overlaps it."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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


def copy_spliced(src: Path, dst: Path, splices: dict[int, tuple[int, Splice]], sync: bool = True, *,
                 cloned: bool = False, input_hash: bool = True, copier: Copier | None = None) -> tuple[str | None, str]:
    """Copy src to dst, replacing each byte range [start, end) by splice(original bytes).

    A splice may return more or fewer bytes than it replaced (a GGUF header that gains metadata keys):
    everything after it then lands shifted in dst by the difference.

    With sync=False the file is not fsynced here (the caller does, later) but its writeback is started, so
    that the next file's work overlaps it. With cloned=True dst already holds src's bytes (a clone): only the
    spliced ranges are written, over it, and they must keep their size. `copier`: the run's record of the
    copying methods a filesystem refused and used (copy_file_range is not tried again once refused).

    Returns sha256 of the input (None with input_hash=False: not needed, so not computed past the first
    splice) and of the output. A second thread copies in the kernel (copy_file_range) while this one hashes
    the source through a read-only mapping, so each byte is read from disk once and copied in memory once:
    hashing costs CPU, not extra I/O, and runs alongside the copy.
    """
    copier = copier or Copier()
    size = src.stat().st_size
    pieces = list(_pieces(size, splices))
    spliced: dict[int, Future[bytes]] = {start: Future() for start in splices}
    progress = _Progress()
    in_hash = hashlib.sha256()
    out_hash = None  # a copy of in_hash from the first splice on: the bytes before it are the same
    # From the first splice on, the output's hash runs in its own thread, a few pieces behind this one.
    behind: deque[tuple[Future[None], memoryview | bytes, int]] = deque()
    with (open(src, "rb") as fi, open(dst, "r+b" if cloned else "wb") as fo,
          ThreadPoolExecutor(1, "melsurgery-copy") as pool, ThreadPoolExecutor(1, "melsurgery-hash") as hasher):
        copying = pool.submit(_copy_pieces, fi.fileno(), fo.fileno(), pieces, spliced, progress,
                              None if cloned else copier)
        try:
            with _mapped(fi.fileno(), size) as source:
                released = 0
                try:
                    for offset, length, splice in pieces:
                        try:
                            progress.wait("hash", offset)
                        except CancelledError:
                            copying.result()  # the copy failed (a full disk, say): raise its error
                            raise
                        if splice is not None and out_hash is None:
                            out_hash = in_hash.copy()
                        with source[offset : offset + length] as data:
                            if out_hash is None or input_hash:
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
            method = copying.result()
            if method is not None:  # None: a clone, recorded by the copier that made it
                copier.used[str(dst)] = method
        except BaseException:
            progress.stop()
            for f in spliced.values():
                f.cancel()
            raise
        if sync:
            os.fsync(fo.fileno())
        elif hasattr(os, "posix_fadvise") and not cloned:
            os.posix_fadvise(fo.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # as _start_writeback
    return in_hash.hexdigest() if input_hash or out_hash is None else None, (out_hash or in_hash).hexdigest()


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
                 spliced: dict[int, Future[bytes]], progress: _Progress, copier: Copier | None) -> str | None:
    try:
        return _copy_pieces_in_order(fd_in, fd_out, pieces, spliced, progress, copier)
    except BaseException:
        progress.stop()  # wake the hashing thread, which then raises this error
        raise


def _copy_pieces_in_order(fd_in: int, fd_out: int, pieces: list[tuple[int, int, Splice | None]],
                          spliced: dict[int, Future[bytes]], progress: _Progress, copier: Copier | None) -> str | None:
    """Write the pieces in order: spliced ones from the hashing thread, the others copied from the source
    (copy_file_range, else through this process); `copier` None: dst is a clone, only splices are written.
    Returns the copying method used (None for a clone)."""
    in_kernel = copier is not None and KERNEL_COPY not in copier.refused and hasattr(os, "copy_file_range")
    shift = 0  # where dst is relative to src, after splices that changed size
    for offset, length, splice in pieces:
        progress.wait("copy", offset)
        if splice is not None:
            data = spliced[offset].result()
            if copier is None and len(data) != length:
                raise RuntimeError("a splice changed the size of a range of a cloned file")
            _pwrite_all(fd_out, data, offset + shift)
            shift += len(data) - length
        elif copier is None:
            pass  # a clone already holds these bytes
        elif in_kernel:
            try:
                kernel_copy(fd_in, fd_out, offset, length, shift)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED:
                    raise
                in_kernel = False  # a filesystem without copy_file_range: copy through this process
                copier.refused.add(KERNEL_COPY)
        if splice is None and copier is not None and not in_kernel:
            process_copy(fd_in, fd_out, offset, length, shift)
        progress.advance("copy", offset + length)
    return None if copier is None else KERNEL_COPY if in_kernel else PROCESS_COPY


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
