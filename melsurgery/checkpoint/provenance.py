"""provenance.json, typed: what a patch did (source, manifest, recipes, edits, scan summary, measurements) and
the sha256 of every file it wrote.

Written by `patch` (folder outputs, GGUF folder outputs) and, for a converted patched GGUF, from its
`melsurgery.*` metadata; read by `verify` (the detection thresholds and the claimed edits) and by `push`
(`verify`: the folder is exactly what was written). Torch-free.

An edited weight file whose source sha256 was trusted is recorded by its derivation (`DerivedFile`: the
source's sha256 and the sha256 of each edited byte range) rather than by its own sha256, which would mean
reading the whole file (sha256 is a chain: one changed byte and the file is hashed whole). Push reads every
file anyway; it checks the derivation and records the whole-file sha256 then (`Provenance.verify`).

Fields absent from a record (older versions, a converted GGUF) stay absent when it is written again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from melsurgery.checkpoint.hashing import CHUNK, Recorded, is_sha256, sha256_file, sha256_range
from melsurgery.errors import UserError
from melsurgery.formats.jsonsafe import dumps, load_strict
from melsurgery.formats.typed import JsonRecord, Need, load
from melsurgery.outputs import PROVENANCE
from melsurgery.params import DetectParams

FIX = "re-run the patch"
_OMIT = {"omit_none": True}


@dataclass(frozen=True, kw_only=True)
class RecipeRecord:
    """One applied recipe: its name, resolved parameters, whether it folds into weights, its summary line."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    folds: bool | None = field(default=None, metadata=_OMIT)
    summary: str | None = field(default=None, metadata=_OMIT)


_MODE_WORDS = {"clone": "cloned (blocks shared with the source)", "copy_file_range": "copied in the kernel",
               "read-write": "copied through this process", "link": "hard-linked"}


@dataclass(frozen=True)
class EditedRange:
    """Bytes [start, end) of a weight file that an edit rewrote, and the sha256 of the bytes written there; where
    the source's sha256 was deferred, also of the source's bytes it replaced (`source_sha256`), so that push can
    prove every byte of the source: the untouched ones against the output, these against the record."""

    start: int
    end: int
    sha256: str
    source_sha256: str | None = field(default=None, metadata=_OMIT)


@dataclass(frozen=True)
class SourceFile:
    """A source file as patch found it, recorded without reading it (its sha256 deferred): what changes when a
    file is written to or replaced. Push hashes the source only while all three still hold."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> SourceFile:
        """The file's size, mtime and inode now (symlinks followed: a Hub snapshot links to its blob)."""
        st = Path(path).stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class Sealed:
    """What push computed of a derived file: the output's sha256 and its source's (the source's is new
    information only where patch deferred it)."""

    output_sha256: str
    source_sha256: str


@dataclass(frozen=True, kw_only=True)
class DerivedFile:
    """A weight file recorded without reading it whole: the source file it was cloned or copied from with `edits`
    written over it. The source is named by its trusted sha256 or, where none was trusted (a plain folder without
    sidecars), by `source_file` (its size, mtime and inode; `source_sha256` None): push then hashes the source,
    which must still be that file, and records both digests. `size` and `mtime_ns` are the file's as patch left
    it: the untouched bytes are trusted only while the file has not been written since (the rule a .sha256
    sidecar follows)."""

    source_sha256: str | None
    size: int
    mtime_ns: int
    edits: tuple[EditedRange, ...]
    source_file: SourceFile | None = field(default=None, metadata=_OMIT)

    @property
    def deferred(self) -> bool:
        """Whether the source's sha256 is left to push (only its size, mtime and inode recorded)."""
        return self.source_sha256 is None

    def check(self, path: Path) -> None:
        """The file still has the size patch left and every edited range the bytes recorded."""
        if path.stat().st_size != self.size:
            raise UserError(f"{path}: size differs from {PROVENANCE}; the file changed after surgery")
        with open(path, "rb") as fh:
            for r in self.edits:
                if sha256_range(fh.fileno(), r.start, r.end) != r.sha256:
                    raise UserError(f"{path}: bytes {r.start}-{r.end} differ from {PROVENANCE}; the file changed "
                                    "after surgery")

    def check_mtime(self, path: Path) -> None:
        """Not written since patch (its mtime as recorded): what vouches for the untouched bytes without a source."""
        if path.stat().st_mtime_ns != self.mtime_ns:
            raise UserError(f"{path}: modified after surgery (its mtime differs from {PROVENANCE}, which records "
                            "only its edited bytes' sha256); re-run the patch, and copy output folders with their "
                            "times (cp -p, rsync -t)")

    def check_source(self, source: Path) -> None:
        """A deferred source is still the file patch copied: same size, mtime and inode, else its bytes now prove
        nothing of what was patched."""
        try:
            now = SourceFile.of(source)
        except OSError:
            now = None
        if now != self.source_file:
            raise UserError(f"{source}: changed since the patch (its size, mtime or inode differ from {PROVENANCE}, "
                            "which records the source by them until push hashes it); patch again from the source "
                            "as it is now")

    def compare(self, output: Path, source: Path) -> Sealed | None:
        """Both sha256 when `source` is this derivation's source (its bytes hash to `source_sha256`, or, deferred,
        it is still the file patch recorded) and the output holds its bytes everywhere outside the edited ranges:
        both files read once, side by side. None when `source` is another file (nothing can be said from it); a
        byte that differs, or a deferred source that changed, is a UserError."""
        if self.deferred:
            self.check_source(source)
        h_out, h_src, differs, pos = hashlib.sha256(), hashlib.sha256(), None, 0
        edits = [(r.start, r.end) for r in self.edits]
        try:
            with open(output, "rb") as fo, open(source, "rb") as fs:
                while chunk := fo.read(CHUNK):
                    theirs = fs.read(len(chunk))
                    h_out.update(chunk)
                    h_src.update(theirs)
                    if differs is None and chunk != theirs:
                        differs = _first_untouched_difference(chunk, theirs, pos, edits)
                    pos += len(chunk)
                h_src.update(fs.read())
        except OSError:
            return None
        if not self.deferred and h_src.hexdigest() != self.source_sha256:
            return None
        if differs is not None:
            raise UserError(f"{output}: byte {differs} differs from its source ({source}) outside the edited "
                            "ranges; the file changed after surgery")
        if self.deferred:
            self._check_replaced(source)
            self.check_source(source)  # not written to while it was read
        return Sealed(h_out.hexdigest(), h_src.hexdigest())

    def _check_replaced(self, source: Path) -> None:
        """The source's bytes under each edited range are those the edit replaced (recorded by patch)."""
        with open(source, "rb") as fh:
            for r in self.edits:
                if sha256_range(fh.fileno(), r.start, r.end) != r.source_sha256:
                    raise UserError(f"{source}: bytes {r.start}-{r.end} differ from what the patch replaced there "
                                    f"({PROVENANCE}); the source changed since the patch: patch again")


def _first_untouched_difference(a: bytes, b: bytes, offset: int, edits: list[tuple[int, int]]) -> int | None:
    """The first file offset in [offset, offset + len(a)) outside every edited range where a and b differ."""
    if len(a) != len(b):
        return offset + min(len(a), len(b))
    pos, end = offset, offset + len(a)
    for start, stop in [*sorted(edits), (end, end)]:  # the untouched spans between the edits, slice by slice
        span_end = min(max(start, pos), end)
        if pos < span_end and a[pos - offset:span_end - offset] != b[pos - offset:span_end - offset]:
            return next(i for i in range(pos, span_end) if a[i - offset] != b[i - offset])
        pos = max(pos, min(stop, end))
        if pos >= end:
            break
    return None


@dataclass(frozen=True, kw_only=True)
class WriteRecord:
    """How patch wrote the weight files. `mode`: how untouched bytes reached the output: clone (blocks shared
    with the source, copy-on-write), copy_file_range (copied in the kernel) or read-write (through the
    process), joined by '+' when files differed ("link" when every file was hard-linked); `linked`: files
    hard-linked (--link); `rewritten_bytes`: bytes of edited tensors written; `hashed_bytes`: bytes read to
    compute sha256; `reused_sha256`: input files whose sha256 was reused, not computed, each with the key of
    its reason, which `trusted_because` spells out; `derived`: files recorded by their derivation
    (`DerivedFile`), their whole-file sha256 left to push; `deferred`: those among them whose source had no
    trusted sha256 (a plain folder): recorded by size, mtime and inode, its sha256 left to push too."""

    mode: str
    linked: tuple[str, ...] = ()
    rewritten_bytes: int = 0
    hashed_bytes: int = 0
    reused_sha256: dict[str, str] = field(default_factory=dict)
    trusted_because: dict[str, str] = field(default_factory=dict)
    derived: tuple[str, ...] = ()
    deferred: tuple[str, ...] = field(default=(), metadata=_OMIT)

    @property
    def summary(self) -> str:
        """One line for the command's report: how untouched bytes were written, what was hashed and reused."""
        how = "+".join(_MODE_WORDS.get(m, m) for m in self.mode.split("+"))
        linked = f", {len(self.linked)} hard-linked" if self.linked and self.mode != "link" else ""
        reused = (f"sha256 reused for {len(self.reused_sha256)} ({', '.join(sorted(set(self.reused_sha256.values())))})"
                  if self.reused_sha256 else "no sha256 reused")
        edited = len(self.derived) - len(self.deferred)
        derived = (f" (the whole-file sha256 of {edited} edited file{'s' * (edited != 1)} is left to push)"
                   if edited else "")
        if self.deferred:
            derived += (f" (the sha256 of {len(self.deferred)} source file{'s' * (len(self.deferred) > 1)} and of "
                        "their outputs is left to push, which hashes the source while its size, mtime and inode "
                        "hold)")
        return (f"untouched bytes {how}{linked}; {self.rewritten_bytes:,} edited bytes written; {reused}; "
                f"{self.hashed_bytes / 1e9:.2f} GB hashed{derived}")


@dataclass(frozen=True, kw_only=True)
class SearchRecord:
    """How a budgeted patch (`patch --max-kl`) was chosen: the budget, the space searched, the study, the texts,
    and the chosen setting's figures on the tuning and the held-out text (the engine's `Figures`; the sink is the
    mean over `sink_layers`, the layers after the ME Layer)."""

    budget: dict[str, float | None]
    objective: str
    sink_layers: str
    space: dict[str, Any]
    study: dict[str, Any]
    tuning: dict[str, Any]
    heldout: dict[str, Any]
    compute: dict[str, Any]
    trial: int
    figures_tuning: dict[str, float | None]
    figures_heldout: dict[str, float | None]


@dataclass(frozen=True, kw_only=True)
class Provenance(JsonRecord):
    """The record of one patch. `edits` are the writers' records (each names its `tensor`, the Hugging Face
    name); `scan` is the scan summary (`melsurgery.patch.scan_summary`); `writer` says how the weights were
    written; `outputs` maps each other file of the folder to its sha256, `sizes` to its size (so that a later
    patch of this folder can reuse the sha256 of a file still that size and not modified since), except the
    edited files in `derived`, recorded by their derivation until push records their sha256 too."""

    tool: str | None = field(default=None, metadata=_OMIT)
    source: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = field(default=None, metadata=_OMIT)
    recipes: tuple[RecipeRecord, ...] = ()
    edits: tuple[dict[str, Any], ...] | None = field(default=None, metadata=_OMIT)
    scan: dict[str, Any] | None = field(default=None, metadata=_OMIT)
    measurements: dict[str, Any] | None = field(default=None, metadata=_OMIT)
    search: SearchRecord | None = field(default=None, metadata=_OMIT)
    writer: WriteRecord | None = field(default=None, metadata=_OMIT)
    outputs: dict[str, str] | None = field(default=None, metadata=_OMIT)
    sizes: dict[str, int] | None = field(default=None, metadata=_OMIT)
    derived: dict[str, DerivedFile] | None = field(default=None, metadata=_OMIT)

    json_fix = FIX

    @classmethod
    def json_check(cls, data: Any, need: Need | None, path: str) -> None:
        """What the field types cannot say, each in its own words: digests, named recipes and edits, the source."""
        if need is None:
            return
        where = need.where
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object with 'outputs', 'recipes' and 'source'")
        outputs = data.get("outputs")
        if outputs is not None and not (isinstance(outputs, dict) and all(
                isinstance(k, str) and is_sha256(v) for k, v in outputs.items())):
            raise UserError(f"{where}: 'outputs' must map relative file paths to lowercase sha256 hex digests")
        recipes = data.get("recipes", [])
        if not isinstance(recipes, list) or not all(
                isinstance(r, dict) and isinstance(r.get("name"), str) and r["name"] for r in recipes):
            raise UserError(f"{where}: 'recipes' must be a non-empty list of objects with a 'name'")
        if not isinstance(data.get("source", {}), dict):
            raise UserError(f"{where}: 'source' must be an object whose 'id' names the base model")
        for k, e in enumerate(data.get("edits") or []):
            need(isinstance(e, dict) and isinstance(e.get("tensor"), str), f"edits[{k}]",
                 "an object naming its 'tensor'", e)
        scan = data.get("scan")
        if isinstance(scan, dict) and "params" in scan:
            load(DetectParams, scan["params"], "scan.params", need)

    @classmethod
    def from_json(cls, data: object, where: str | None = None) -> Provenance:
        """The record, every field checked (one line naming the first bad one), derivations included."""
        record = super().from_json(data, where)
        need = Need(where or "provenance.json", FIX)
        for rel, d in (record.derived or {}).items():
            ends = [0, *(x for r in d.edits for x in (r.start, r.end)), d.size]  # in order, none overlapping
            need((is_sha256(d.source_sha256) or (d.deferred and d.source_file is not None))
                 and all(is_sha256(r.sha256) and (r.source_sha256 is None or is_sha256(r.source_sha256))
                         and (is_sha256(r.source_sha256) or d.source_file is None) for r in d.edits)
                 and all(a <= b for a, b in zip(ends, ends[1:])), f"derived.{rel}",
                 "a source sha256 (or, deferred, the source's size, mtime and inode) and edited ranges in order "
                 "inside the file, none overlapping, each with its sha256", d)
            # patch derives the safetensors shards it edited, and with a deferred source every shard: a derivation
            # without edits and without a source to read would be trusted on its size and mtime alone
            parts = rel.split("/")
            need(rel.endswith(".safetensors") and "" not in parts and ".." not in parts and "." not in parts
                 and (bool(d.edits) or d.source_file is not None), f"derived.{rel}",
                 "a .safetensors file of the folder, edited or copied from a source recorded by size, mtime and "
                 "inode", rel)
        return record

    @classmethod
    def read(cls, path: Path) -> Provenance:
        """A provenance.json (or the folder holding one), as strict JSON: NaN and Infinity are refused."""
        path = Path(path)
        if path.is_dir():
            path = path / PROVENANCE
        try:
            data = load_strict(path, "provenance")
        except OSError as exc:
            raise UserError(f"{path}: cannot read provenance ({exc.strerror})") from None
        return cls.from_json(data, str(path))

    @classmethod
    def find(cls, folder: Path) -> Provenance | None:
        """The folder's record, or None where it has none; an unreadable one is a UserError saying why."""
        if not (Path(folder) / PROVENANCE).is_file():
            return None
        return cls.read(folder)

    def text(self) -> str:
        """provenance.json's text (non-finite figures as null)."""
        return dumps(self.to_json(), indent=2, default=str) + "\n"

    def write(self, folder: Path) -> None:
        """Write provenance.json into `folder` (a folder being written, committed whole later)."""
        (Path(folder) / PROVENANCE).write_text(self.text())

    def with_outputs(self, folder: Path, known: dict[str, str] | None = None,
                     derived: dict[str, DerivedFile] | None = None) -> Provenance:
        """This record with the sha256 of every other file below `folder`; `known`: hashes computed while writing
        (the weights), not read again; `derived`: edited files recorded by their derivation, not hashed."""
        known, derived = known or {}, derived or {}
        files = {rel: p for p in sorted(Path(folder).rglob("*"))
                 if p.is_file() and (rel := p.relative_to(folder).as_posix()) != PROVENANCE}
        return replace(self, outputs={rel: known.get(rel) or sha256_file(p) for rel, p in files.items()
                                      if rel not in derived},
                       sizes={rel: p.stat().st_size for rel, p in files.items()}, derived=derived or None)

    @property
    def detect_params(self) -> DetectParams | None:
        """The detection thresholds of the patch's scan (verify measures with the same definition)."""
        params = (self.scan or {}).get("params")
        return DetectParams(**params) if isinstance(params, dict) else None

    @property
    def edited_tensors(self) -> list[str] | None:
        """The tensors the patch says it changed, by their Hugging Face names, sorted (None: it does not say)."""
        return None if self.edits is None else sorted({e["tensor"] for e in self.edits})

    def check_publishable(self, where: str) -> None:
        """What push needs from the record: the outputs it hashed, the recipes applied, the source's id."""
        if self.outputs is None:
            raise UserError(f"{where}: 'outputs' must map relative file paths to lowercase sha256 hex digests")
        if not self.recipes:
            raise UserError(f"{where}: 'recipes' must be a non-empty list of objects with a 'name'")
        if not isinstance(self.source.get("id"), str) or not self.source["id"]:
            raise UserError(f"{where}: 'source' must be an object whose 'id' names the base model")

    def verify(self, folder: Path, files: dict[str, Path] | None = None,
               sources: dict[str, list[Path]] | None = None) -> tuple[Provenance, dict[str, str]]:
        """The folder is exactly what was written: every listed file present with its sha256 (or, for a derived
        file, its size, mtime and edited bytes), nothing else. Returns the record with the sha256 of every file,
        derived ones included (computed here).

        `files`: the folder's files by relative posix path (push passes those it would upload); default all.
        `sources`: where each derived file's source may be; the first that is it proves the untouched bytes.
        Also returns, per derived file, how its untouched bytes were judged: "source" (compared with it),
        "source-hashed" (compared with it, and its sha256, deferred by patch, computed: the record completed with
        it) or "mtime" (no source found: trusted while size and mtime hold; never for a deferred source)."""
        folder = Path(folder)
        if files is None:
            files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        where = folder / PROVENANCE
        self.check_publishable(str(where))
        outputs, derived = dict(self.outputs or {}), self.derived or {}
        judged: dict[str, str] = {}
        sources_found: dict[str, str] = {}
        for rel in [*outputs, *derived]:
            if rel == PROVENANCE:
                raise UserError(f"{where}: 'outputs' lists {PROVENANCE} itself, which cannot hash itself")
            if rel not in files:
                raise UserError(f"{folder / rel}: listed in {PROVENANCE} but missing from the folder")
        for rel, path in files.items():
            if rel == PROVENANCE:
                continue
            expected = outputs.get(rel)
            if expected is None and rel in derived:
                d = derived[rel]
                d.check(path)
                candidates = (sources or {}).get(rel, ())
                sealed = next((got for src in candidates if (got := d.compare(path, src)) is not None), None)
                if sealed is None and (d.deferred or not d.edits):  # nothing else vouches for its bytes
                    what = "by size, mtime and inode" if d.deferred else "without an edited range"
                    raise UserError(f"{path}: its source ({', '.join(map(str, candidates)) or 'not found'}) cannot "
                                    f"be read, and {PROVENANCE} records it only {what}; push needs the source "
                                    "folder as patch read it, or patch again")
                if sealed is None:  # no source to compare with: the untouched bytes only have the mtime rule
                    d.check_mtime(path)
                judged[rel] = "mtime" if sealed is None else "source-hashed" if d.deferred else "source"
                outputs[rel] = sealed.output_sha256 if sealed else sha256_file(path)
                if d.deferred:
                    sources_found[rel] = sealed.source_sha256
            elif expected is None:
                raise UserError(f"{path}: not listed in {PROVENANCE} 'outputs'; remove it or re-run the surgery")
            elif sha256_file(path) != expected:
                raise UserError(f"{path}: sha256 differs from {PROVENANCE}; the file changed after surgery")
        return self.with_sources(outputs, sources_found), judged

    def with_sources(self, outputs: dict[str, str], sources: dict[str, str]) -> Provenance:
        """This record with these output digests and, for each deferred source, its sha256 (in the derivation and
        in `source.files`): what push seals."""
        derived = {rel: replace(d, source_sha256=sources.get(rel, d.source_sha256))
                   for rel, d in (self.derived or {}).items()} or None
        files = {**(self.source.get("files") or {}), **sources}
        return replace(self, outputs=outputs, derived=derived,
                       source={**self.source, "files": files} if sources else self.source)


def recorded_hashes(folder: Path) -> Recorded | None:
    """What the folder's own provenance.json (written by the patch that made it) records of its files' sha256
    and sizes, for reuse when the folder is patched again; None where it has no record with sizes (an older
    melsurgery, a folder of another origin) or an unreadable one (then its files are simply hashed)."""
    path = Path(folder) / PROVENANCE
    try:
        record = Provenance.find(folder)
        written_ns = path.stat().st_mtime_ns
    except (UserError, OSError):
        return None
    if record is None or not record.outputs or not record.sizes:
        return None
    return Recorded(dict(record.outputs), dict(record.sizes), written_ns)

