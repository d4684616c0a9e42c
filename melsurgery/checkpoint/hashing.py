"""sha256 of files: computed while copying where possible so that big checkpoints are read once, and reused
without reading the file at all where a record of it can be trusted.

A reused sha256 must describe the bytes the file holds now. Three records qualify, each with the reason
provenance gives for trusting it (`TRUST`):

- a Hugging Face cache blob: `.../models--owner--name/snapshots/<rev>/<file>` is a symlink to
  `.../models--owner--name/blobs/<sha256>`, the name the Hub gave the file's content (its LFS object id),
  and the blob was not modified after the snapshot linked it;
- a `<file>.sha256` sidecar (`write_sidecar`), JSON with the sha256, size and mtime the file had when it
  was hashed, both still matching;
- the provenance.json of the melsurgery patch that wrote the folder, when it records the file's size, the
  size matches and the file was not modified after the record was written.

Anything else (a plain folder, a sidecar whose file changed since, a git-sha1 blob of a small file) is not
hashed by `patch`: its sha256 is deferred to `push`, which hashes the source while its size, mtime and inode
are those `patch` recorded (`provenance.DerivedFile`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from melsurgery.errors import UserError

CHUNK = 8 * 1024 * 1024
SIDECAR = ".sha256"
HF_REPO_KINDS = ("models--", "datasets--", "spaces--")
TRUST = {
    "hf-cache-blob": "a Hugging Face cache blob named by its sha256 (the Hub's LFS object id), not modified "
                     "since the snapshot linked it",
    "sidecar": "a .sha256 sidecar whose recorded size and mtime match the file",
    "provenance": "the provenance.json of the melsurgery patch that wrote it; size matches and the file is "
                  "older than the record",
}
_HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path) -> str:
    """sha256 of a file read in chunks: provenance records it, so that push can prove nothing changed since."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_range(fd: int, start: int, end: int) -> str:
    """sha256 of bytes [start, end) of an open file, read in chunks (what provenance records of an edit)."""
    h = hashlib.sha256()
    while start < end:
        chunk = os.pread(fd, min(CHUNK, end - start), start)
        if not chunk:
            raise UserError(f"the file ends before byte {end}")
        h.update(chunk)
        start += len(chunk)
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


def is_sha256(value: object) -> bool:
    """A lowercase sha256 hex digest, as provenance, sidecars and the Hugging Face cache write them."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


@dataclass(frozen=True)
class KnownHash:
    """A sha256 not computed here, and why it is trusted (a key of TRUST)."""

    sha256: str
    trust: str


@dataclass(frozen=True)
class Recorded:
    """What a melsurgery provenance.json says of the folder's files: sha256 and size by relative path, and
    when the record was written (its own mtime): a file modified since is not what it describes."""

    sha256: dict[str, str]
    sizes: dict[str, int]
    written_ns: int


def known_sha256(folder: Path, rel: str, recorded: Recorded | None = None) -> KnownHash | None:
    """The trusted sha256 of `folder/rel` without reading it, or None when no record can be trusted."""
    path = Path(folder) / rel
    try:
        st = path.stat()
    except OSError:
        return None
    digest = hf_blob_sha256(Path(folder), rel, st)
    if digest is not None:
        return KnownHash(digest, "hf-cache-blob")
    digest = sidecar_sha256(path, st)
    if digest is not None:
        return KnownHash(digest, "sidecar")
    if recorded is not None and recorded.sizes.get(rel) == st.st_size and st.st_mtime_ns < recorded.written_ns:
        digest = recorded.sha256.get(rel)
        if is_sha256(digest):
            return KnownHash(digest, "provenance")
    return None


def hf_blob_sha256(folder: Path, rel: str, st: os.stat_result | None = None) -> str | None:
    """The sha256 a Hugging Face cache blob is named by, when `folder` is a snapshot of a Hugging Face cache
    (`<cache>/models--owner--name/snapshots/<rev>`) and `rel` in it links to a blob of the same repo whose
    name is a sha256 (small files are named by their git sha1 instead: not trusted). A blob modified after
    the link was made (written through the snapshot, say) is not trusted either."""
    link = Path(folder) / rel
    try:
        if not link.is_symlink():
            return None
        blob = Path(os.path.realpath(link))
        snapshot = Path(os.path.realpath(folder))
        st = st or blob.stat()
        linked = link.lstat()
    except OSError:
        return None
    repo = blob.parent.parent
    if (not is_sha256(blob.name) or blob.parent.name != "blobs" or not repo.name.startswith(HF_REPO_KINDS)
            or snapshot.parent.name != "snapshots" or snapshot.parent.parent != repo):
        return None
    if st.st_mtime_ns > linked.st_mtime_ns:
        return None
    return blob.name


def sidecar_sha256(path: Path, st: os.stat_result | None = None) -> str | None:
    """The sha256 in `path`.sha256 when its recorded size and mtime match the file's; else None."""
    try:
        record = json.loads(Path(str(path) + SIDECAR).read_text(encoding="utf-8"))
        st = st or path.stat()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not is_sha256(record.get("sha256")):
        return None
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None
    return record["sha256"]


def write_sidecar(path: Path) -> str:
    """Hash `path` and write `path`.sha256 (sha256, size, mtime_ns) so that later patches of this folder reuse
    the hash instead of reading the file; returns the sha256. A file that changes while it is hashed is an
    error, not a record."""
    path = Path(path)
    before = path.stat()
    digest = sha256_file(path)
    after = path.stat()
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise UserError(f"{path}: changed while being hashed; hash it when nothing writes to it")
    record = {"sha256": digest, "size": after.st_size, "mtime_ns": after.st_mtime_ns}
    Path(str(path) + SIDECAR).write_text(json.dumps(record) + "\n", encoding="utf-8")
    return digest
