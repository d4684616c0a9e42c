"""`diff`: what differs between two checkpoints, tensor by tensor, without loading either model.

Surgery claims that only a few entries of a few tensors changed; `diff` is how anyone checks that
claim against the source, or compares two patches. It streams: one tensor pair is in memory at a
time (read by byte offset from the safetensors headers), identical tensors are recognised by
comparing their bytes, and only changed tensors are converted to floats, in bounded chunks.

Tensors are matched by name, whatever their shard: a sharded and a single-file checkpoint holding
the same tensors compare identical (the layout difference is reported as information only).

JSON written by ``melsurgery diff --json`` (`DiffResult.to_json`; `DiffResult.from_json` reads it back):

- ``identical``: true when every tensor and every side file is the same (exit status 0).
- ``a`` / ``b``: ``spec`` (as given), ``id``, ``kind`` (folder, hub, gguf), ``revision``, ``folder``,
  ``shards`` (weight files, in order).
- ``tensors``: one object per tensor name in A or B, sorted by name (layer numbers numerically):
  ``name``; ``status``, one of ``identical``, ``changed`` (same dtype and shape, bytes differ),
  ``dtype`` (same shape, dtype differs: values compared after conversion), ``shape``, ``only_a``,
  ``only_b``; ``dtype_a``, ``dtype_b`` (safetensors codes, e.g. BF16; null when absent);
  ``shape_a``, ``shape_b``; ``numel``; for compared values: ``changed`` (entries whose bytes, or for a
  dtype change whose values, differ), ``max_abs_diff`` (max |B - A|), ``rel_change`` (||B - A|| /
  ||A||, Frobenius), ``pattern`` (``indices`` for 1-D; ``all``, ``rows``, ``columns`` (the changed
  entries are exactly whole rows or columns) or ``entries`` for 2-D; null otherwise), ``indices``
  (1-D), ``rows`` and ``cols`` (2-D: rows and columns touched), each cut to the first 1000, with their
  full counts in ``n_indices``, ``n_rows``, ``n_cols``; ``layer`` (from ``.layers.N.``, or null).
  Non-finite figures are written as the strings ``"nan"`` / ``"inf"``.
- ``files``: side files (config, tokenizer, card...; not weights or their index): ``name``,
  ``status`` (``identical``, ``changed``, ``only_a``, ``only_b``), ``kind`` (``json`` for config.json
  and generation_config.json, compared key by key with nested keys joined by dots; ``sha256`` for the
  rest), ``sha256_a``, ``sha256_b``, and for JSON files ``added`` {key: new}, ``removed`` {key: old},
  ``changed`` {key: [old, new]}.
- ``layout``: ``same`` (same shard files holding the same tensors), ``shards_a``, ``shards_b``.
- ``stat``: ``layers`` {layer index: {``tensors``: tensors that differ, ``entries``: entries changed}},
  ``other`` (tensors outside ``.layers.N.``, same keys). Entries count compared values only; a tensor
  only on one side, or with another shape, counts as a tensor but adds no entries.
- ``summary``: ``tensors_compared`` (names in A or B), ``identical``, ``changed``, ``dtype_changed``,
  ``shape_changed``, ``only_a``, ``only_b``, ``entries_changed``, ``files_compared``, ``files_differ``,
  ``bytes_read`` (tensor and side-file bytes read from both sides), ``wall_s``, ``mb_per_s``.
"""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from melsurgery.checkpoint.hashing import sha256_file
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safetensors_file import ITEMSIZE, TensorInfo, read_bytes
from melsurgery.checkpoint.source import Source, as_source
from melsurgery.compare.text import MAX_LIST, index_list, shape_text, value_text
from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import read_text
from melsurgery.formats.typed import JsonRecord
from melsurgery.formats.wording import count

JSON_FILES = ("config.json", "generation_config.json")
CHUNK_ELEMS = 1 << 20  # float work on a changed tensor is done this many entries at a time
LAYER = re.compile(r"\.layers\.(\d+)\.")
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U8": "u1", "BOOL": "u1"}
_BITS = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}


_TEXT = {"nonfinite_as_text": True}  # NaN and infinities written as "nan", "inf", "-inf"
_SUMMARY = {"inside": "summary"}  # written in (and read from) the document's summary


@dataclass
class TensorDiff(JsonRecord):
    """How one tensor name compares between A and B (see the module docstring for each field)."""

    name: str
    status: str
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    numel: int = 0
    changed: int = 0
    max_abs_diff: float = field(default=0.0, metadata=_TEXT)
    rel_change: float = field(default=0.0, metadata=_TEXT)
    pattern: str | None = None
    indices: list[int] | None = None
    rows: list[int] | None = None
    cols: list[int] | None = None
    n_indices: int = 0
    n_rows: int = 0
    n_cols: int = 0

    @property
    def layer(self) -> int | None:
        """Decoder layer index parsed from the name (None outside the layers), for the per-layer `--stat` view."""
        m = LAYER.search(self.name)
        return int(m.group(1)) if m else None

    def json_document(self, data: dict[str, Any]) -> dict[str, Any]:
        """The fields, then the layer parsed from the name."""
        return {**data, "layer": self.layer}


@dataclass
class FileDiff:
    """How one side file compares: JSON configs key by key, everything else by sha256."""

    name: str
    status: str
    kind: str
    sha256_a: str | None = None
    sha256_b: str | None = None
    added: dict[str, Any] = field(default_factory=dict)
    removed: dict[str, Any] = field(default_factory=dict)
    changed: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Layout:
    """Which weight files hold the tensors: information only, never a difference by itself."""

    same: bool
    shards_a: list[str]
    shards_b: list[str]


@dataclass(frozen=True)
class DiffSide:
    """One side of a diff: the model as given (`spec`), as resolved, and its weight files in order."""

    spec: str
    id: str
    kind: str  # folder, hub or gguf
    revision: str | None
    folder: Path
    shards: list[str]


@dataclass
class DiffResult(JsonRecord):
    """Two checkpoints compared tensor by tensor, and the files beside the weights.

    Its JSON is the `diff --json` document; `identical`, `stat`, each tensor's `layer` and the summary's counts
    are derived from the fields, recomputed when a document is read back, never trusted from it."""

    a: DiffSide
    b: DiffSide
    tensors: list[TensorDiff]
    files: list[FileDiff]
    layout: Layout
    bytes_read: int = field(metadata=_SUMMARY)
    wall_s: float = field(metadata=_SUMMARY)  # seconds, to 0.1 ms (as the document holds it)

    json_fix: ClassVar[str] = "rerun `melsurgery diff --json`"

    @property
    def identical(self) -> bool:
        """True only when every tensor and every side file is identical: what the exit status reports."""
        return all(t.status == "identical" for t in self.tensors) and all(f.status == "identical" for f in self.files)

    def summary(self) -> dict[str, Any]:
        """Counts per status, entries changed and read speed: the JSON `summary` and the report's last line."""
        count = {s: sum(t.status == s for t in self.tensors) for s in ("identical", "changed", "dtype", "shape",
                                                                       "only_a", "only_b")}
        return {
            "tensors_compared": len(self.tensors),
            "identical": count["identical"],
            "changed": count["changed"],
            "dtype_changed": count["dtype"],
            "shape_changed": count["shape"],
            "only_a": count["only_a"],
            "only_b": count["only_b"],
            "entries_changed": sum(t.changed for t in self.tensors),
            "files_compared": len(self.files),
            "files_differ": sum(f.status != "identical" for f in self.files),
            "bytes_read": self.bytes_read,
            "wall_s": self.wall_s,
            "mb_per_s": round(self.bytes_read / 1e6 / self.wall_s, 1) if self.wall_s > 0 else None,
        }

    def stat(self) -> dict[str, Any]:
        """Per layer (from ``.layers.N.``): how many tensors differ and how many entries changed."""
        layers: dict[int, dict[str, int]] = {}
        other = {"tensors": 0, "entries": 0}
        for t in self.tensors:
            if t.status == "identical":
                continue
            slot = other if t.layer is None else layers.setdefault(t.layer, {"tensors": 0, "entries": 0})
            slot["tensors"] += 1
            slot["entries"] += t.changed
        return {"layers": dict(sorted(layers.items())), "other": other}

    def json_document(self, data: dict[str, Any]) -> dict[str, Any]:
        """The `diff --json` document (schema in the module docstring): the verdict first, the derived per-layer
        stat and summary last; non-finite figures are the strings "nan" / "inf"."""
        stat = self.stat()
        return {
            "identical": self.identical,
            **{k: data[k] for k in ("a", "b", "tensors", "files", "layout")},
            "stat": {"layers": {str(k): v for k, v in stat["layers"].items()}, "other": stat["other"]},
            "summary": self.summary(),
        }


def _natural(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


def _floats(raw: memoryview, dtype: str) -> np.ndarray:
    """Little-endian safetensors bytes as floats, exactly: float32 for 16/32-bit floats, else float64.

    bf16 is widened through its bit pattern (numpy has no bf16).
    """
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    wide = np.float32 if dtype in ("F32", "F16") else np.float64
    return np.frombuffer(raw, dtype=_NUMPY[dtype]).astype(wide)


def _read(info: TensorInfo) -> bytes:
    try:
        data = read_bytes(info)
    except OSError as exc:
        raise UserError(f"{info.path}: cannot read ({exc.strerror or exc})") from None
    if len(data) != info.nbytes:
        raise UserError(f"{info.path}: truncated while reading {quote(info.name)}; re-download it")
    return data


def compare_values(ia: TensorInfo, ib: TensorInfo, ra: bytes, rb: bytes) -> TensorDiff:
    """Entries that differ and by how much, for a same-shape pair whose bytes are known to differ.

    Works in chunks of CHUNK_ELEMS entries, so the float copies stay small whatever the tensor size.
    Same dtype: an entry changed when its bytes differ. Different dtypes: when its values differ.
    """
    shape = ia.shape
    n = math.prod(shape)
    same_dtype = ia.dtype == ib.dtype
    sa, sb = ITEMSIZE[ia.dtype], ITEMSIZE[ib.dtype]
    va, vb = memoryview(ra), memoryview(rb)
    hit = np.zeros(n, dtype=bool) if len(shape) == 1 else None
    row_hit = np.zeros(shape[0], dtype=bool) if len(shape) == 2 else None
    col_hit = np.zeros(shape[1], dtype=bool) if len(shape) == 2 else None
    changed, max_d, nan_d, sq_d, sq_a = 0, 0.0, False, 0.0, 0.0
    for lo in range(0, n, CHUNK_ELEMS):
        hi = min(n, lo + CHUNK_ELEMS)
        ca, cb = va[lo * sa : hi * sa], vb[lo * sb : hi * sb]
        fa = _floats(ca, ia.dtype)
        sq_a += float(np.dot(fa, fa))  # per chunk in the array's precision, summed in float64
        if same_dtype:
            mask = np.frombuffer(ca, dtype=_BITS[sa]) != np.frombuffer(cb, dtype=_BITS[sb])
            if not mask.any():
                continue
            fb = _floats(cb, ib.dtype)
        else:
            fb = _floats(cb, ib.dtype)
            mask = ~((fa == fb) | (np.isnan(fa) & np.isnan(fb)))
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            continue
        d = fb[idx].astype(np.float64) - fa[idx]
        changed += int(idx.size)
        m = float(np.abs(d).max())
        if math.isnan(m):
            nan_d = True
        else:
            max_d = max(max_d, m)
        sq_d += float(np.dot(d, d))
        flat = idx + lo
        if hit is not None:
            hit[flat] = True
        elif row_hit is not None:
            ncols = shape[1]
            row_hit[flat // ncols] = True
            col_hit[flat % ncols] = True
    norm_a = math.sqrt(sq_a)
    norm_d = math.sqrt(sq_d)
    rel = norm_d / norm_a if norm_a > 0 else (math.inf if norm_d > 0 else 0.0)
    t = TensorDiff(ia.name, "changed" if same_dtype else "dtype", ia.dtype, ib.dtype, list(shape), list(ib.shape),
                   n, changed, math.nan if nan_d else max_d, rel)
    if changed == 0:
        return t
    if hit is not None:
        idx = np.flatnonzero(hit)
        t.pattern, t.indices, t.n_indices = "indices", idx[:MAX_LIST].tolist(), int(idx.size)
    elif row_hit is not None:
        rows, cols = np.flatnonzero(row_hit), np.flatnonzero(col_hit)
        t.rows, t.cols = rows[:MAX_LIST].tolist(), cols[:MAX_LIST].tolist()
        t.n_rows, t.n_cols = int(rows.size), int(cols.size)
        if changed == n:
            t.pattern = "all"
        elif changed == cols.size * shape[0]:
            t.pattern = "columns"
        elif changed == rows.size * shape[1]:
            t.pattern = "rows"
        else:
            t.pattern = "entries"
    elif changed == n:
        t.pattern = "all"
    return t


def _compare_tensor(ia: TensorInfo, ib: TensorInfo, pool: ThreadPoolExecutor) -> tuple[TensorDiff, int]:
    """One pair: shapes and dtypes from the headers; bytes read (A and B in parallel) only if needed."""
    base = TensorDiff(ia.name, "identical", ia.dtype, ib.dtype, list(ia.shape), list(ib.shape), math.prod(ia.shape))
    if ia.shape != ib.shape:
        base.status = "shape"
        return base, 0
    pending = pool.submit(_read, ib)
    ra = _read(ia)
    rb = pending.result()
    nread = len(ra) + len(rb)
    if ia.dtype == ib.dtype and ra == rb:  # the fast path: one memcmp, no float conversion
        return base, nread
    return compare_values(ia, ib, ra, rb), nread


# --------------------------------------------------------------------------------------------------
# Side files
# --------------------------------------------------------------------------------------------------


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists and scalars are leaf values."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj} if prefix else {"": obj}


def _load_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path, "a side file"))
    except (UserError, ValueError, RecursionError):  # not JSON (or unreadable): compared as bytes
        return None


def compare_json(a: Any, b: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """Added, removed and changed keys between two JSON documents (nested keys joined by dots)."""
    fa, fb = _flatten(a), _flatten(b)
    added = {k: fb[k] for k in fb if k not in fa}
    removed = {k: fa[k] for k in fa if k not in fb}
    changed = {k: [fa[k], fb[k]] for k in fa if k in fb and fa[k] != fb[k]}
    return added, removed, changed


def _compare_file(name: str, a: Path | None, b: Path | None) -> tuple[FileDiff, int]:
    ha = sha256_file(a) if a else None
    hb = sha256_file(b) if b else None
    nread = (a.stat().st_size if a else 0) + (b.stat().st_size if b else 0)
    kind = "json" if Path(name).name in JSON_FILES else "sha256"
    if a is None or b is None:
        return FileDiff(name, "only_b" if a is None else "only_a", kind, ha, hb), nread
    if kind == "json":
        ja, jb = _load_json(a), _load_json(b)
        if ja is not None and jb is not None:
            added, removed, changed = compare_json(ja, jb)
            status = "changed" if added or removed or changed else "identical"
            return FileDiff(name, status, kind, ha, hb, added, removed, changed), nread
        kind = "sha256"  # not valid JSON on one side: fall back to the bytes
    return FileDiff(name, "identical" if ha == hb else "changed", kind, ha, hb), nread


# --------------------------------------------------------------------------------------------------
# The whole comparison
# --------------------------------------------------------------------------------------------------


def _layout(a: Checkpoint, b: Checkpoint) -> Layout:
    moved = any(i.path.name != b.tensors[n].path.name for n, i in a.tensors.items() if n in b.tensors)
    return Layout(a.shards == b.shards and not moved, list(a.shards), list(b.shards))


def _as_source(x: Source | str | Path, revision: str | None) -> tuple[Source, str]:
    return as_source(x, revision), x.id if isinstance(x, Source) else str(x)


def diff_checkpoints(
    a: Source | str | Path,
    b: Source | str | Path,
    *,
    revision_a: str | None = None,
    revision_b: str | None = None,
) -> DiffResult:
    """Compare checkpoints A and B (folders, Hub ids or resolved sources), streaming one tensor pair at a time."""
    t0 = time.perf_counter()
    src_a, spec_a = _as_source(a, revision_a)
    src_b, spec_b = _as_source(b, revision_b)
    ca, cb = Checkpoint(src_a.folder), Checkpoint(src_b.folder)
    tensors: list[TensorDiff] = []
    nread = 0
    # Read in A's file order so that its shards are read sequentially.
    order = sorted(ca.tensors.values(), key=lambda i: (i.path.name, i.start))
    with ThreadPoolExecutor(max_workers=1) as pool:
        for ia in order:
            ib = cb.tensors.get(ia.name)
            if ib is None:
                tensors.append(TensorDiff(ia.name, "only_a", ia.dtype, None, list(ia.shape), None,
                                          math.prod(ia.shape)))
                continue
            t, n = _compare_tensor(ia, ib, pool)
            tensors.append(t)
            nread += n
    for name, ib in cb.tensors.items():
        if name not in ca.tensors:
            tensors.append(TensorDiff(name, "only_b", None, ib.dtype, None, list(ib.shape), math.prod(ib.shape)))
    tensors.sort(key=lambda t: _natural(t.name))

    files: list[FileDiff] = []
    side_a, side_b = set(ca.side_files()), set(cb.side_files())
    for name in sorted(side_a | side_b):
        fd, n = _compare_file(name, ca.folder / name if name in side_a else None,
                              cb.folder / name if name in side_b else None)
        files.append(fd)
        nread += n
    sides = [DiffSide(spec, src.id, src.kind, src.revision, src.folder, list(ckpt.shards))
             for spec, src, ckpt in ((spec_a, src_a, ca), (spec_b, src_b, cb))]
    return DiffResult(*sides, tensors, files, _layout(ca, cb), nread, round(time.perf_counter() - t0, 4))


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def _figures(t: TensorDiff) -> str:
    return f"max|d|={t.max_abs_diff:.4g}  rel={t.rel_change:.3g}"


def describe_tensor(t: TensorDiff) -> str:
    """One line, e.g. ``changed  model.layers.3.mlp.down_proj.weight  64/8192 changed in columns [41]  max|d|=...``."""
    if t.status == "identical":
        return f"same     {t.name}"
    if t.status == "only_a":
        return f"only A   {t.name}  {t.dtype_a} {shape_text(t.shape_a)}"
    if t.status == "only_b":
        return f"only B   {t.name}  {t.dtype_b} {shape_text(t.shape_b)}"
    if t.status == "shape":
        return f"shape    {t.name}  {t.dtype_a} {shape_text(t.shape_a)} -> {t.dtype_b} {shape_text(t.shape_b)}"
    head = f"{t.changed}/{t.numel} changed"
    if t.pattern == "indices":
        where = f" at {index_list(t.indices or [], t.n_indices)}"
    elif t.pattern == "columns":
        where = f" in columns {index_list(t.cols or [], t.n_cols)}"
    elif t.pattern == "rows":
        where = f" in rows {index_list(t.rows or [], t.n_rows)}"
    elif t.pattern == "entries":
        where = f" in rows {index_list(t.rows or [], t.n_rows)} x columns {index_list(t.cols or [], t.n_cols)}"
    elif t.pattern == "all":
        where = " (all)"
    else:
        where = ""
    if t.status == "dtype":
        return f"dtype    {t.name}  {t.dtype_a} -> {t.dtype_b} {shape_text(t.shape_a)}  {head}{where}  {_figures(t)}"
    return f"changed  {t.name}  {head}{where}  {_figures(t)}"


def describe_file(f: FileDiff) -> str:
    """One line per side file; JSON changes as ``key: old -> new``."""
    if f.status == "identical":
        return f"same     {f.name}"
    if f.status in ("only_a", "only_b"):
        return f"only {f.status[-1].upper()}   {f.name}"
    if f.kind == "json":
        parts = [f"{k}: {value_text(o)} -> {value_text(n)}" for k, (o, n) in f.changed.items()]
        parts += [f"+{k}: {value_text(v)}" for k, v in f.added.items()]
        parts += [f"-{k}: {value_text(v)}" for k, v in f.removed.items()]
        return f"changed  {f.name}  " + "; ".join(parts)
    return f"changed  {f.name}  sha256 {(f.sha256_a or '')[:12]} -> {(f.sha256_b or '')[:12]}"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def summary_line(r: DiffResult) -> str:
    """One line: how many tensors differ, and how fast the comparison ran."""
    s = r.summary()
    structural = s["shape_changed"] + s["dtype_changed"]
    rate = f", {s['mb_per_s']:.0f} MB/s" if s["mb_per_s"] else ""
    return (
        f"{'identical' if r.identical else 'different'}: {count(s['tensors_compared'], 'tensor')} compared, "
        f"{s['changed']} changed, {structural} shape/dtype changed, {s['only_a']} only in A, {s['only_b']} only in B; "
        f"{s['files_differ']}/{s['files_compared']} side files differ; "
        f"read {_size(s['bytes_read'])} in {s['wall_s']:.2f} s{rate}"
    )


def stat_lines(r: DiffResult) -> list[str]:
    """Per layer: tensors that differ and entries changed (`diff --stat`)."""
    stat = r.stat()
    rows = [(str(k), v) for k, v in stat["layers"].items()]
    if stat["other"]["tensors"]:
        rows.append(("other", stat["other"]))
    if not rows:
        return ["no tensor differs"]
    return ["layer  tensors    entries"] + [f"{k:>5}  {v['tensors']:>7}  {v['entries']:>9}" for k, v in rows]


def diff_report(r: DiffResult, *, only_changed: bool = False, stat: bool = False) -> str:
    """The text `melsurgery diff` prints: tensors (or the per-layer stat), side files, layout, summary."""
    lines = [f"A: {r.a.spec}  ({r.a.folder})", f"B: {r.b.spec}  ({r.b.folder})"]
    if stat:
        lines += stat_lines(r)
    else:
        lines += [describe_tensor(t) for t in r.tensors if not (only_changed and t.status == "identical")]
    lines += [describe_file(f) for f in r.files if not ((only_changed or stat) and f.status == "identical")]
    if not r.layout.same:
        lines.append(
            f"layout   A: {len(r.layout.shards_a)} weight file(s), B: {len(r.layout.shards_b)} weight file(s); "
            "tensors are compared by name, so this alone is no difference"
        )
    lines.append(summary_line(r))
    return "\n".join(lines)


def write_json(r: DiffResult, path: Path) -> None:
    """Write the diff as JSON (non-finite numbers as null)."""
    from melsurgery.checkpoint.atomic import write_atomic
    from melsurgery.formats.jsonsafe import dumps

    write_atomic(path, dumps(r.to_json(), indent=1, ensure_ascii=False) + "\n")
