"""A patch costs what it edits: untouched bytes cloned (or copied where the filesystem cannot share blocks),
edited tensors written over the copy, sha256 of untouched files reused when a record of them is trusted.

Most checks run on whatever filesystem holds pytest's tmp_path (ext4 on the development machine: the copy
fallback). Those that need blocks really shared run in $MELSURGERY_REFLINK_DIR, a folder on a filesystem
that clones (XFS with reflink=1, btrfs); without it they are reported as skipped, naming the variable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from melsurgery.checkpoint import clone
from melsurgery.checkpoint.clone import CLONE, KERNEL_COPY, PROCESS_COPY, Copier, shared_bytes, unshared_bytes
from melsurgery.checkpoint.hashing import KnownHash, Recorded, known_sha256, sha256_file, write_sidecar
from melsurgery.checkpoint.provenance import Provenance, SourceFile, WriteRecord, recorded_hashes
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safetensors_file import read_bytes
from melsurgery.checkpoint.writer import ShardPlan, copy_spliced, plan_shards
from melsurgery.errors import UserError
from melsurgery.surgery.patch import PatchResult
from tests.support.helpers import hub_cache_layout, json_round_trip, run_cli, snapshot

REFLINK_ENV = "MELSURGERY_REFLINK_DIR"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"  # holds layer 3's down projection, which ffn-dampen edits
EDITED = "model.layers.3.mlp.down_proj.weight"


@pytest.fixture
def reflink_dir(tmp_path_factory) -> Path:
    """A fresh folder on a filesystem that clones; skipped (with the reason) where none was given."""
    root = os.environ.get(REFLINK_ENV)
    if not root:
        pytest.skip(f"needs a reflink filesystem: set {REFLINK_ENV} to a folder on XFS (reflink=1) or btrfs")
    folder = Path(root) / f"test-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    probe = Copier()
    (folder / "probe").write_bytes(b"x" * 4096)
    assert probe.clone(folder / "probe", folder / "probe2"), f"{root}: this filesystem cannot clone"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["here", "reflink"])
def where(request, tmp_path) -> Path:
    """The folder a test writes in: pytest's tmp_path (this machine's filesystem), or the reflink folder."""
    return tmp_path if request.param == "here" else request.getfixturevalue("reflink_dir")


def patch_api(src: Path, out: Path, scan_json: Path, recipe: str = "ffn-dampen", link: bool = False):
    """run_patch as the Python API calls it, on the sharded planted model's scan."""
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import run_patch

    return run_patch(resolve(str(src)), out, Manifest(model=str(src), recipes=[(recipe, {})]),
                     scan=read_json(scan_json), link=link)


def is_shared(path: Path) -> bool:
    """Whether FIEMAP reports every byte of the file's extents shared (a clone of an untouched file)."""
    shared, total = shared_bytes(path)
    return total > 0 and shared == total


# --- planning: pure functions ----------------------------------------------------------------------------


def test_plan_links_only_untouched_files_and_hashes_only_what_is_not_known():
    known = KnownHash("a" * 64, "sidecar")
    plans = plan_shards({"a": 100, "b": 200, "c": 300}, {"b": [(50, 60), (10, 20)]}, {"a": known, "b": known},
                        link=True)
    assert plans == [ShardPlan("a", 100, (), known, link=True), ShardPlan("b", 200, ((10, 20), (50, 60)), known),
                     ShardPlan("c", 300, (), None, link=True)]
    # only the bytes written are hashed: a known file's sha256 is reused, an unknown one's deferred to push (an
    # unknown edited one's replaced bytes are hashed too)
    assert [p.hashed_bytes for p in plans] == [0, 20, 0]
    assert plan_shards({"d": 100}, {"d": [(0, 10)]}, {}, link=False)[0].hashed_bytes == 20
    assert [p.rewritten_bytes for p in plans] == [0, 20, 0]
    assert [p.copied_bytes(CLONE) for p in plans] == [0, 0, 0]
    assert [p.copied_bytes(KERNEL_COPY) for p in plans] == [0, 200, 0]  # linked files are never copied
    assert not any(p.link for p in plan_shards({"a": 1}, {}, {}, link=False))


@pytest.mark.parametrize(("ranges", "block", "expected"), [
    ([], 4096, 0),
    ([(10, 10)], 4096, 0),  # an empty range touches nothing
    ([(0, 4096)], 4096, 4096),  # exactly one block
    ([(4095, 4097)], 4096, 8192),  # two bytes across a block boundary: both blocks
    ([(100, 200), (300, 400)], 4096, 4096),  # two edits in one block: that block once
    ([(100, 5000), (4500, 9000)], 4096, 3 * 4096),  # overlapping spans merge
    ([(8192, 8193), (0, 1)], 4096, 8192),  # unsorted, apart
    ([(0, 4096), (4096, 8192)], 4096, 8192),  # adjacent, aligned
])
def test_unshared_bytes_counts_each_touched_block_once(ranges, block, expected):
    assert unshared_bytes(ranges, block) == expected


# --- copying on this machine's filesystem ----------------------------------------------------------------


def test_copier_reports_what_the_filesystem_did(tmp_path):
    """Cloned where the filesystem can (FIEMAP then shows the blocks shared), else copied in the kernel."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * 65536 + 7))
    copier = Copier()
    mode = copier.copy(src, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert mode in (CLONE, KERNEL_COPY) and copier.mode == mode
    assert is_shared(tmp_path / "dst") == (mode == CLONE)
    assert (CLONE in copier.refused) == (mode != CLONE)


def test_copier_falls_back_once_per_refused_method(tmp_path, monkeypatch):
    """Across filesystems (tmpfs -> tmp_path) nothing can clone: each refused method is tried once per run."""
    shm = Path("/dev/shm")
    assert shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev, "needs tmpfs at /dev/shm"
    sources = []
    for k in range(2):
        sources.append(shm / f"melsurgery-test-{os.getpid()}-{k}")
        sources[-1].write_bytes(os.urandom(100_000 + k))
    calls = {"ioctl": 0, "copy_file_range": 0}
    ioctl, copy_file_range = clone.fcntl.ioctl, os.copy_file_range

    def count(name, real):
        def spy(*args):
            calls[name] += 1
            return real(*args)
        return spy

    monkeypatch.setattr(clone.fcntl, "ioctl", count("ioctl", ioctl))
    monkeypatch.setattr(os, "copy_file_range", count("copy_file_range", copy_file_range))
    copier = Copier()
    try:
        modes = [copier.copy(s, tmp_path / s.name) for s in sources]
        assert all((tmp_path / s.name).read_bytes() == s.read_bytes() for s in sources)
    finally:
        for s in sources:
            s.unlink()
    assert CLONE in copier.refused and calls["ioctl"] == 1
    assert modes[0] == modes[1] and copier.mode == modes[0]
    # a kernel that copies across filesystems (5.3-5.18) keeps using copy_file_range; one that refuses is asked once
    if modes[0] == PROCESS_COPY:
        assert KERNEL_COPY in copier.refused and calls["copy_file_range"] == 1
    else:
        assert modes[0] == KERNEL_COPY and calls["copy_file_range"] >= 2


@given(data=st.binary(min_size=1, max_size=5000), cuts=st.sets(st.integers(0, 5000), max_size=6))
def test_spliced_write_over_a_copy_writes_and_hashes_exactly(tmp_path_factory, data, cuts):
    """cloned=True: dst already holds src's bytes, only the spliced ranges are written; the input hash is not
    computed past the first splice when it is known."""
    folder = tmp_path_factory.mktemp("spliced")
    src, dst = folder / "src", folder / "dst"
    src.write_bytes(data)
    Copier().copy(src, dst)
    cuts = sorted(c for c in cuts if c <= len(data))
    ranges = {a: b for a, b in zip(cuts[::2], cuts[1::2]) if b > a}
    expected = bytearray(data)
    for a, b in ranges.items():
        expected[a:b] = bytes(255 - x for x in data[a:b])
    splices = {a: (b, lambda d: bytes(255 - x for x in d)) for a, b in ranges.items()}
    digest_in, digest_out = copy_spliced(src, dst, splices, cloned=True, input_hash=False)
    assert dst.read_bytes() == expected and digest_out == hashlib.sha256(expected).hexdigest()
    assert digest_in == (None if ranges else hashlib.sha256(data).hexdigest())


# --- the writer, end to end ------------------------------------------------------------------------------


def assert_untouched_identical(src: Path, out: Path, edited: set[str]) -> None:
    """Every tensor not edited has the source's bytes, every edited one its dtype and shape."""
    a, b = Checkpoint(src), Checkpoint(out)
    assert set(a.tensors) == set(b.tensors)
    for name, info in a.tensors.items():
        got = b.tensors[name]
        assert (got.dtype, got.shape, got.start, got.end) == (info.dtype, info.shape, info.start, info.end), name
        assert (read_bytes(got) == read_bytes(info)) == (name not in edited), name


@pytest.mark.slow
def test_patch_clones_or_copies_and_keeps_every_untouched_byte(sharded, where):
    src = shutil.copytree(sharded[0], where / "src")
    before = snapshot(src)
    res = patch_api(src, where / "out", sharded[1])
    out, record = where / "out", res.writer
    assert [a.tensor for a in res.applied] == [EDITED]
    assert_untouched_identical(src, out, {EDITED})
    assert (out / SHARD1).read_bytes() == (src / SHARD1).read_bytes()
    assert snapshot(src) == before
    prov = Provenance.read(out)
    prov.verify(out, sources={s: [src / s] for s in (SHARD1, SHARD2)})
    assert prov.writer == record and record.reused_sha256 == {}  # a plain folder: every hash deferred
    doc = json_round_trip(res)  # the patch's JSON result says it too
    assert doc["writer"]["mode"] == record.mode and PatchResult.from_json(doc).writer == record
    info = Checkpoint(src).info(EDITED)
    # only the edited tensor's bytes are hashed: as written, and as they were in the source (its sha256 deferred)
    assert record.rewritten_bytes == info.nbytes and record.hashed_bytes == 2 * info.nbytes
    # the record tells the truth about the blocks: a clone shares all but the edited tensor's blocks
    assert record.mode in (CLONE, KERNEL_COPY)
    assert is_shared(out / SHARD1) == (record.mode == CLONE)
    if record.mode == CLONE:
        block = os.statvfs(out).f_bsize
        shared, total = shared_bytes(out / SHARD2)
        assert total - shared == unshared_bytes([(info.start, info.end)], block)
    else:
        assert shared_bytes(out / SHARD2)[0] == 0


def test_link_hard_links_untouched_shards_and_clones_or_copies_edited_ones(sharded, tmp_path):
    src = shutil.copytree(sharded[0], tmp_path / "src")
    record = patch_api(src, tmp_path / "out", sharded[1], link=True).writer
    assert record.linked == (SHARD1,)
    assert os.path.samefile(tmp_path / "out" / SHARD1, src / SHARD1)
    assert not os.path.samefile(tmp_path / "out" / SHARD2, src / SHARD2)
    assert record.mode in (CLONE, KERNEL_COPY)
    assert record.hashed_bytes == 2 * record.rewritten_bytes  # nothing known: the sources' sha256 left to push
    Provenance.read(tmp_path / "out").verify(tmp_path / "out", sources={s: [src / s] for s in (SHARD1, SHARD2)})


def test_a_source_file_changed_while_written_stops_the_patch(sharded, tmp_path, monkeypatch):
    """A file modified between the judging of its hash and the end of its copy: refused, nothing written."""
    from melsurgery.errors import UserError

    src = shutil.copytree(sharded[0], tmp_path / "src")
    copy_file = Copier.copy

    def copy_then_touch(self, a, b):
        done = copy_file(self, a, b)
        st = a.stat()
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        return done

    monkeypatch.setattr(Copier, "copy", copy_then_touch)
    with pytest.raises(UserError, match=f"{SHARD1}: changed while being copied"):
        patch_api(src, tmp_path / "out", sharded[1])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".melsurgery-tmp-*"))


# --- hash reuse --------------------------------------------------------------------------------------------


def test_hf_cache_blob_is_trusted_only_in_a_real_cache_layout(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "w.safetensors").write_bytes(b"weights")
    (plain / "config.json").write_bytes(b"{}")
    snap = hub_cache_layout(plain, tmp_path / "hub" / "models--org--m")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert known_sha256(snap, "w.safetensors") == KnownHash(digest, "hf-cache-blob")
    assert known_sha256(plain, "w.safetensors") is None  # a plain file: nothing names its hash
    # the same links outside a snapshots/<rev> folder of that repo
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "w.safetensors").symlink_to(snap / "w.safetensors")
    assert known_sha256(loose, "w.safetensors") is None
    other = tmp_path / "hub" / "models--org--other" / "snapshots" / ("1" * 40)
    other.mkdir(parents=True)
    (other / "w.safetensors").symlink_to(tmp_path / "hub" / "models--org--m" / "blobs" / digest)
    assert known_sha256(other, "w.safetensors") is None  # another repo's blob
    # a blob written after the snapshot linked it (through the link, say) no longer is what its name says
    blob = tmp_path / "hub" / "models--org--m" / "blobs" / digest
    later = (snap / "w.safetensors").lstat().st_mtime_ns + 10**9
    os.utime(blob, ns=(later, later))
    assert known_sha256(snap, "w.safetensors") is None
    # small files are named by their git sha1 in a real cache: 40 hex digits, never taken for a sha256
    sha1 = hashlib.sha1(b"{}").hexdigest()
    (snap / "config.json").unlink()
    (blob.parent / hashlib.sha256(b"{}").hexdigest()).rename(blob.parent / sha1)
    (snap / "config.json").symlink_to(Path("..", "..", "blobs", sha1))
    assert known_sha256(snap, "config.json") is None


def test_sidecar_is_trusted_only_while_size_and_mtime_match(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"weights")
    digest = write_sidecar(path)
    assert digest == hashlib.sha256(b"weights").hexdigest()
    assert known_sha256(tmp_path, path.name) == KnownHash(digest, "sidecar")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same bytes, another mtime: not trusted
    assert known_sha256(tmp_path, path.name) is None
    write_sidecar(path)
    path.write_bytes(b"weights!")  # rewritten: another size, another mtime
    assert known_sha256(tmp_path, path.name) is None
    for bad in (f"{digest}  w.safetensors\n", "{", json.dumps({"sha256": digest.upper(), "size": 8})):
        (tmp_path / "w.safetensors.sha256").write_text(bad)  # sha256sum's format records no size or mtime
        assert known_sha256(tmp_path, path.name) is None


def test_provenance_of_an_earlier_patch_is_trusted_while_files_are_unchanged(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "w.safetensors").write_bytes(b"weights")
    old = time.time_ns() - 10**9
    os.utime(folder / "w.safetensors", ns=(old, old))
    Provenance(recipes=(), source={"id": "x"}).with_outputs(folder).write(folder)
    recorded = recorded_hashes(folder)
    digest = hashlib.sha256(b"weights").hexdigest()
    assert recorded == Recorded({"w.safetensors": digest}, {"w.safetensors": 7},
                                (folder / "provenance.json").stat().st_mtime_ns)
    assert known_sha256(folder, "w.safetensors", recorded) == KnownHash(digest, "provenance")
    later = recorded.written_ns + 1
    os.utime(folder / "w.safetensors", ns=(later, later))  # modified after the record was written
    assert known_sha256(folder, "w.safetensors", recorded) is None
    # a provenance.json of an older melsurgery (no sizes) stays readable, and reuses nothing
    data = json.loads((folder / "provenance.json").read_text())
    del data["sizes"]
    (folder / "provenance.json").write_text(json.dumps(data))
    assert Provenance.read(folder).outputs == {"w.safetensors": digest} and recorded_hashes(folder) is None
    (folder / "provenance.json").write_text("{not json")
    assert recorded_hashes(folder) is None


def test_write_record_round_trips_through_provenance_json():
    record = WriteRecord(mode="clone", linked=("a",), rewritten_bytes=3, hashed_bytes=9,
                         reused_sha256={"b": "sidecar"}, trusted_because={"sidecar": "why"})
    prov = Provenance(recipes=(), source={"id": "x"}, writer=record, outputs={}, sizes={})
    assert Provenance.from_json(prov.to_json(), "test") == prov
    assert "untouched bytes cloned" in record.summary and "sha256 reused for 1 (sidecar)" in record.summary


@pytest.mark.parametrize("trusted", [True, False], ids=["sidecar-matches", "sidecar-mtime-wrong"])
def test_patch_reuses_a_trusted_sidecar_without_reading_the_file(sharded, tmp_path, trusted):
    """A sidecar whose digest is deliberately not the file's: reused, it shows in provenance as the input's hash
    (proof that the file was not read for it); distrusted (wrong mtime), the digest is left to push."""
    src = shutil.copytree(sharded[0], tmp_path / "src")
    st = (src / SHARD1).stat()
    fake = "f" * 64
    (src / f"{SHARD1}.sha256").write_text(json.dumps(
        {"sha256": fake, "size": st.st_size, "mtime_ns": st.st_mtime_ns + (0 if trusted else 1)}))
    record = patch_api(src, tmp_path / "out", sharded[1]).writer
    prov = Provenance.read(tmp_path / "out")
    assert prov.source["files"].get(SHARD1) == (fake if trusted else None)
    assert record.reused_sha256 == ({SHARD1: "sidecar"} if trusted else {})
    assert record.deferred == ((SHARD2,) if trusted else (SHARD1, SHARD2))
    assert record.hashed_bytes == 2 * Checkpoint(src).info(EDITED).nbytes  # SHARD2's sha256 is deferred
    assert not list((tmp_path / "out").glob("*.sha256"))  # sidecars describe the source; never copied


def test_patch_of_a_hub_cache_snapshot_reuses_the_blob_names(sharded, tmp_path):
    snap = hub_cache_layout(sharded[0], tmp_path / "models--org--tiny")
    record = patch_api(snap, tmp_path / "out", sharded[1]).writer
    assert record.reused_sha256 == {SHARD1: "hf-cache-blob", SHARD2: "hf-cache-blob"}
    info = Checkpoint(snap).info(EDITED)
    assert record.hashed_bytes == record.rewritten_bytes == info.nbytes  # only the bytes written were hashed
    assert record.derived == (SHARD2,) and "sha256 of 1 edited file is left to push" in record.summary
    assert "no trusted sha256" not in (tmp_path / "out" / "README.md").read_text()
    out = tmp_path / "out"
    prov = Provenance.read(out)
    assert prov.source["files"][SHARD1] == sha256_file(snap / SHARD1) == prov.outputs[SHARD1]
    # the edited shard is recorded by its derivation: the source's sha256 and the edited range's
    assert SHARD2 not in prov.outputs and prov.sizes[SHARD2] == (out / SHARD2).stat().st_size
    derived = prov.derived[SHARD2]
    assert derived.source_sha256 == sha256_file(snap / SHARD2)
    assert [(r.start, r.end, r.sha256) for r in derived.edits] == [
        (info.start, info.end, hashlib.sha256((out / SHARD2).read_bytes()[info.start:info.end]).hexdigest())]
    assert derived.mtime_ns == (out / SHARD2).stat().st_mtime_ns
    complete, judged = prov.verify(out)  # what push does: checks the derivation, computes the whole-file sha256
    assert complete.outputs[SHARD2] == sha256_file(out / SHARD2) and complete.derived == prov.derived
    assert judged == {SHARD2: "mtime"}  # no source given: the untouched bytes are trusted on size and mtime
    # given where the source is (push finds it), the untouched bytes are compared with it, in the same pass
    other = tmp_path / "not-the-source"
    other.write_bytes((snap / SHARD2).read_bytes()[:-1] + b"\0")
    assert prov.verify(out, sources={SHARD2: [other]})[1] == {SHARD2: "mtime"}  # another file proves nothing
    assert prov.verify(out, sources={SHARD2: [other, snap / SHARD2]}) == (complete, {SHARD2: "source"})
    # patching the patched folder again trusts its provenance for the untouched shard (the edited one is read)
    again = patch_api(out, tmp_path / "again", sharded[1], recipe="norm-rescale").writer
    assert again.reused_sha256 == {SHARD1: "provenance"}
    Provenance.read(tmp_path / "again").verify(tmp_path / "again", sources={SHARD2: [out / SHARD2]})


def test_a_plain_folder_patch_hashes_no_untouched_byte(sharded, tmp_path):
    """A folder saved with save_pretrained (no sidecar, no Hub cache): patch costs what it edits. The shards are
    recorded by their derivation with the source named by size, mtime and inode; no whole-file sha256 of a source
    or an output shard was computed (none appears in the record); push proves and records them later."""
    src = shutil.copytree(sharded[0], tmp_path / "src")
    out = tmp_path / "out"
    record = patch_api(src, out, sharded[1]).writer
    info = Checkpoint(src).info(EDITED)
    assert record.hashed_bytes == 2 * info.nbytes  # the edited tensor, as written and as it was; nothing else
    assert record.deferred == record.derived == (SHARD1, SHARD2) and record.reused_sha256 == {}
    assert "sha256 of 2 source files and of their outputs is left to push" in record.summary
    assert "2 weight files had no trusted sha256 when patched" in (out / "README.md").read_text()  # the card says so
    prov = Provenance.read(out)
    text = (out / "provenance.json").read_text()
    for shard in (SHARD1, SHARD2):
        assert sha256_file(src / shard) not in text and sha256_file(out / shard) not in text
        d = prov.derived[shard]
        assert d.deferred and d.source_file == SourceFile.of(src / shard) and shard not in prov.source["files"]
    assert prov.derived[SHARD1].edits == ()
    [edit] = prov.derived[SHARD2].edits
    assert edit.source_sha256 == hashlib.sha256((src / SHARD2).read_bytes()[info.start:info.end]).hexdigest()
    with pytest.raises(UserError, match=f"{SHARD1}: its source .* cannot be read"):  # no source: nothing proven
        prov.verify(out)
    complete, judged = prov.verify(out, sources={s: [src / s] for s in (SHARD1, SHARD2)})
    assert judged == {SHARD1: "source-hashed", SHARD2: "source-hashed"}
    for shard in (SHARD1, SHARD2):
        assert complete.source["files"][shard] == complete.derived[shard].source_sha256 == sha256_file(src / shard)
        assert complete.outputs[shard] == sha256_file(out / shard)
    assert Provenance.from_json(complete.to_json(), "sealed") == complete


@pytest.mark.parametrize("change", ["touched", "replaced", "untouched-byte", "replaced-byte"])
def test_a_deferred_source_changed_since_the_patch_proves_nothing(sharded, tmp_path, change):
    """The source's sha256 is computed at push from the source itself: a source written to, replaced by another
    file, or rewritten with its mtime put back (an untouched byte: it differs from the output; a byte the edit
    replaced: it differs from the recorded sha256 of the replaced bytes) is refused, naming the file."""
    src = shutil.copytree(sharded[0], tmp_path / "src")
    out = tmp_path / "out"
    patch_api(src, out, sharded[1])
    prov, path = Provenance.read(out), src / SHARD2
    st, edit = path.stat(), prov.derived[SHARD2].edits[0]
    data = bytearray(path.read_bytes())
    if change == "touched":
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif change == "replaced":  # the same bytes in a new file: not the file patch read
        new = path.with_name("new")
        new.write_bytes(data)
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
        new.replace(path)
    else:
        at = edit.start if change == "replaced-byte" else 0
        data[at] ^= 1
        with open(path, "r+b") as fh:
            fh.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    why = {"touched": "changed since the patch", "replaced": "changed since the patch",
           "untouched-byte": "byte 0 differs from its source", "replaced-byte": "differ from what the patch replaced"}
    with pytest.raises(UserError, match=why[change]):
        prov.verify(out, sources={s: [src / s] for s in (SHARD1, SHARD2)})


@pytest.mark.parametrize("tamper", ["edited-bytes", "untouched-byte", "size", "sealed-then-changed"])
def test_a_derived_file_changed_after_the_patch_is_refused(sharded, tmp_path, tamper):
    """The derivation holds while the file's size and mtime are unchanged and its edited bytes are as recorded;
    any change is a one-line refusal naming the file (what push says before sending anything)."""
    from melsurgery.errors import UserError

    snap = hub_cache_layout(sharded[0], tmp_path / "models--org--tiny")
    out = tmp_path / "out"
    patch_api(snap, out, sharded[1])
    prov, path = Provenance.read(out), out / SHARD2
    edit = prov.derived[SHARD2].edits[0]
    st = path.stat()
    if tamper == "sealed-then-changed":
        prov, _ = prov.verify(out)  # sealed: from now on the whole-file sha256 decides
    with open(path, "r+b") as fh:
        if tamper == "size":
            fh.truncate(st.st_size - 1)
        else:
            fh.seek(edit.start if tamper in ("edited-bytes", "sealed-then-changed") else 0)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 1]))
    if tamper in ("edited-bytes", "sealed-then-changed"):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back: the bytes still tell
    why = {"edited-bytes": f"bytes {edit.start}-{edit.end} differ", "untouched-byte": "modified after surgery",
           "size": "size differs", "sealed-then-changed": "sha256 differs"}[tamper]
    with pytest.raises(UserError, match=f"{SHARD2}: {why}"):
        prov.verify(out)


def test_an_untouched_byte_rewritten_with_the_mtime_put_back_is_caught_when_the_source_is_there(sharded, tmp_path):
    """The mtime rule alone cannot see such a rewrite; compared with its source (a Hub cache blob here), the
    derived file's untouched bytes are checked byte for byte, and the first byte that differs is named."""
    from melsurgery.errors import UserError

    snap = hub_cache_layout(sharded[0], tmp_path / "models--org--tiny")
    out = tmp_path / "out"
    patch_api(snap, out, sharded[1])
    prov, path = Provenance.read(out), out / SHARD2
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(0)
        byte = fh.read(1)
        fh.seek(0)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prov.verify(out)[1] == {SHARD2: "mtime"}  # without the source: passes, as documented
    with pytest.raises(UserError, match=f"{SHARD2}: byte 0 differs from its source"):
        prov.verify(out, sources={SHARD2: [snap / SHARD2]})


def test_a_copy_without_its_times_is_judged_by_its_source(sharded, tmp_path):
    """An output copied without its mtimes (cp -r): with its source there it is compared and accepted; without,
    the mtime rule refuses it, naming the fix."""
    from melsurgery.errors import UserError

    snap = hub_cache_layout(sharded[0], tmp_path / "models--org--tiny")
    patch_api(snap, tmp_path / "out", sharded[1])
    copy = Path(shutil.copytree(tmp_path / "out", tmp_path / "copy", copy_function=shutil.copyfile))
    later = (copy / SHARD2).stat().st_mtime_ns + 10**9
    os.utime(copy / SHARD2, ns=(later, later))
    prov = Provenance.read(copy)
    record, judged = prov.verify(copy, sources={SHARD2: [snap / SHARD2]})
    assert judged == {SHARD2: "source"} and record.outputs[SHARD2] == sha256_file(copy / SHARD2)
    with pytest.raises(UserError, match=f"{SHARD2}: modified after surgery.*cp -p"):
        prov.verify(copy)


def test_a_derivation_that_is_not_one_is_refused_on_reading(tmp_path):
    from melsurgery.errors import UserError

    good = {"source_sha256": "a" * 64, "size": 10, "mtime_ns": 1, "edits": [{"start": 2, "end": 4, "sha256": "b" * 64}]}
    doc = {"recipes": [{"name": "x"}], "source": {"id": "x"}, "outputs": {}, "derived": {"w.safetensors": good}}
    assert Provenance.from_json(doc, "p").derived["w.safetensors"].edits[0].end == 4
    for bad in ({**good, "source_sha256": "A" * 64}, {**good, "edits": [{"start": 2, "end": 11, "sha256": "b" * 64}]},
                {**good, "edits": [{"start": 2, "end": 4}]}, {**good, "size": "10"},
                {**good, "edits": [{"start": 4, "end": 2, "sha256": "b" * 64}]},  # backwards
                {**good, "edits": [{"start": 2, "end": 6, "sha256": "b" * 64},  # overlapping: read twice
                                   {"start": 5, "end": 8, "sha256": "b" * 64}]}):
        with pytest.raises(UserError, match="^p: derived"):
            Provenance.from_json({**doc, "derived": {"w.safetensors": bad}}, "p")


# --- diff, verify and push on a cloned output, the source untouched ---------------------------------------


def test_diff_verify_and_push_work_on_a_cloned_output(sharded, reflink_dir, hub_server):
    """(On this machine's filesystem the same commands run on copied outputs in test_diff, test_verify and
    test_push.)"""
    from tests.hub.test_push import all_bytes, download, downloaded_files, run_push

    where = reflink_dir
    src = shutil.copytree(sharded[0], where / "src")
    out = where / "out"
    res = run_cli("patch", src, "-o", out, "--scan", sharded[1], "--recipe", "ffn-dampen", "--quiet")
    assert res.returncode == 0, res.stderr
    assert Provenance.read(out).writer.mode == CLONE and "weights: untouched bytes cloned" in res.stdout
    diff = run_cli("diff", src, out, "--json", where / "diff.json")
    assert diff.returncode == 1, diff.stderr
    tensors = json.loads((where / "diff.json").read_text())["tensors"]
    assert [t["name"] for t in tensors if t["status"] != "identical"] == [EDITED]
    verify = run_cli("verify", src, out, "--windows", "1", "--max-tokens", "32", "--generations", "0", "--quiet")
    assert verify.returncode == 0, verify.stderr
    repo = f"{hub_server.user}/cloned"
    assert run_push(hub_server, str(out), repo).returncode == 0
    got = download(hub_server, repo, where / "dl")
    assert got["proc"].returncode == 0 and downloaded_files(where / "dl") == all_bytes(out)


@pytest.mark.slow
def test_push_records_the_whole_file_sha256_of_derived_files(sharded, tmp_path, hub_server):
    """patch leaves the edited shard's sha256 to push; push checks the derivation, records the digest in the
    folder's provenance.json (the dry run only says it would) and uploads the completed record."""
    from tests.hub.test_push import all_bytes, download, downloaded_files, run_push

    snap = hub_cache_layout(sharded[0], tmp_path / "models--org--tiny")
    out = tmp_path / "out"
    res = run_cli("patch", snap, "-o", out, "--scan", sharded[1], "--recipe", "ffn-dampen", "--quiet", "--verbose")
    assert res.returncode == 0, res.stderr
    assert "is left to push" in res.stdout
    written = (out / "provenance.json").read_bytes()
    repo = f"{hub_server.user}/derived"
    dry = run_push(hub_server, str(out), repo, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would record in provenance.json the sha256 of 1 derived file ({SHARD2})" in dry.stdout
    assert f"{SHARD2}: its untouched bytes are its source's (compared byte for byte)" in dry.stdout
    assert (out / "provenance.json").read_bytes() == written
    pushed = run_push(hub_server, str(out), repo)
    assert pushed.returncode == 0, pushed.stderr
    assert f"recorded in provenance.json the sha256 of 1 derived file ({SHARD2})" in pushed.stdout
    prov = Provenance.read(out)
    assert prov.outputs[SHARD2] == sha256_file(out / SHARD2) and prov.derived[SHARD2].source_sha256
    got = download(hub_server, repo, tmp_path / "dl")
    assert got["proc"].returncode == 0 and downloaded_files(tmp_path / "dl") == all_bytes(out)
    again = run_push(hub_server, str(out), repo, "--dry-run")
    assert again.returncode == 0 and "would record" not in again.stdout


@pytest.mark.slow
def test_push_never_writes_the_record_through_a_symlink(sharded, tmp_path, hub_server):
    """A provenance.json that is a link to a file elsewhere: push would have to write the completed record
    through it, so it refuses (one line, nothing sent) and the file the link names is untouched."""
    from tests.hub.test_push import run_push
    from tests.support.helpers import assert_clean_failure

    snap = hub_cache_layout(sharded[0], tmp_path / "models--org--tiny")
    out = tmp_path / "out"
    patch_api(snap, out, sharded[1])
    elsewhere = tmp_path / "elsewhere.json"
    (out / "provenance.json").rename(elsewhere)
    (out / "provenance.json").symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    proc = run_push(hub_server, str(out), f"{hub_server.user}/linked")
    assert_clean_failure(proc, "provenance.json: a symlink")
    assert elsewhere.read_bytes() == before


def test_writing_to_a_clone_never_changes_the_source(sharded, reflink_dir):
    """On a filesystem that shares blocks: the output shares all but the edited blocks with the source, and
    writing over every byte of the output leaves the source's bytes as they were."""
    snap = hub_cache_layout(sharded[0], reflink_dir / "models--org--tiny")
    before = snapshot(snap)
    record = patch_api(snap, reflink_dir / "out", sharded[1]).writer
    assert record.mode == CLONE and record.hashed_bytes == Checkpoint(snap).info(EDITED).nbytes
    for shard in (SHARD1, SHARD2):
        assert shared_bytes(snap / shard)[0] > 0  # the source's blocks are shared now
        out = reflink_dir / "out" / shard
        with open(out, "r+b") as fh:
            fh.write(b"\xff" * out.stat().st_size)
            os.fsync(fh.fileno())
    assert snapshot(snap) == before
    for shard in (SHARD1, SHARD2):  # the blob names are still their content's sha256
        assert sha256_file(snap / shard) == os.path.basename(os.path.realpath(snap / shard))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_interrupted_clone_leaves_nothing(sharded, reflink_dir, sig):
    """Interrupted after its first cloned shard (test hook): no output, and a rerun cleans what KILL left."""
    src = shutil.copytree(sharded[0], reflink_dir / "src")
    before = snapshot(src)
    out, ready = reflink_dir / "out", reflink_dir / "first-shard-written"
    cmd = ["melsurgery", "patch", str(src), "-o", str(out), "--scan", str(sharded[1]), "--recipe", "ffn-dampen",
           "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "MELSURGERY_TEST_PAUSE_FILE": str(ready)})
    try:
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        assert list(reflink_dir.glob(".melsurgery-tmp-out-*/" + SHARD1)), "paused after cloning a shard"
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert not out.exists() and snapshot(src) == before
    res = run_cli("patch", src, "-o", out, "--scan", sharded[1], "--recipe", "ffn-dampen", "--quiet")
    assert res.returncode == 0, res.stderr
    assert not list(reflink_dir.glob(".melsurgery-tmp-*")) and Provenance.read(out).writer.mode == CLONE
