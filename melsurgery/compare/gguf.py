"""`diff A.gguf B.gguf`: two GGUF files tensor by tensor (quantisation-type aware) and key by key.

A tensor is identical when its stored bytes are; otherwise the report says which quantisation blocks
changed (and in which rows), which entries changed after dequantisation (rows and columns), and the
largest |B - A| of the dequantised values. Different types of the same shape are compared by value.

JSON written by ``melsurgery diff A.gguf B.gguf --json`` (`GGUFDiffResult.to_json`; `from_json` reads it back):

- ``identical``; ``a`` / ``b``: the file paths; ``order_same``: same tensor names in the same order.
- ``tensors``: per name in A or B (file order of A, then B's extra): ``name``; ``status`` (``identical``,
  ``changed`` (same type and shape, bytes differ), ``type`` (same shape, another quantisation type),
  ``shape``, ``only_a``, ``only_b``); ``type_a``, ``type_b`` (e.g. Q4_1, F32); ``shape_a``, ``shape_b``
  (numpy order: rows first); ``blocks_total`` and ``blocks_changed`` (stored blocks whose bytes differ;
  F32/F16/BF16 blocks are single entries); ``changed`` (entries whose dequantised value differs),
  ``max_abs_diff``; ``rows``, ``cols`` (touched by the changed entries, first 1000) with ``n_rows``,
  ``n_cols`` (for 1-D tensors: ``cols`` are the indices).
- ``metadata``: ``added`` {key: value in B}, ``removed`` {key: value in A}, ``changed`` {key: [A, B]}.
- ``summary``: ``tensors_compared``, ``identical``, ``changed``, ``type_changed``, ``shape_changed``,
  ``only_a``, ``only_b``, ``keys_differ``, ``bytes_read``, ``wall_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from melsurgery.checkpoint.gguf_file import GGUFFile, GGUFInfo
from melsurgery.compare.checkpoints import compare_json
from melsurgery.compare.text import MAX_LIST, index_list, shape_text, value_text
from melsurgery.formats.typed import JsonRecord
from melsurgery.formats.wording import count


@dataclass
class GGUFTensorDiff:
    """How one tensor of two GGUFs compares: bytes block by block (same type) and values after dequantisation."""

    name: str
    status: str
    type_a: str | None = None
    type_b: str | None = None
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    blocks_total: int = 0
    blocks_changed: int = 0
    changed: int = 0
    max_abs_diff: float = field(default=0.0, metadata={"nonfinite_as_text": True})  # NaN written as "nan"
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    n_rows: int = 0
    n_cols: int = 0


@dataclass
class MetadataDiff:
    """The metadata keys that differ: added {key: value in B}, removed {key: value in A}, changed {key: [A, B]}."""

    added: dict[str, Any]
    removed: dict[str, Any]
    changed: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)


@dataclass
class GGUFDiffResult(JsonRecord):
    """Two GGUF files compared tensor by tensor and key by key, with what was read and how long it took.

    Its JSON is the `diff --json` document for GGUFs; `identical` and the summary's counts are derived from the
    fields, recomputed when a document is read back, never trusted from it."""

    a: Path
    b: Path
    order_same: bool
    tensors: list[GGUFTensorDiff]
    metadata: MetadataDiff
    bytes_read: int = field(metadata={"inside": "summary"})
    wall_s: float = field(metadata={"inside": "summary"})  # seconds, to 0.1 ms (as the document holds it)

    json_fix: ClassVar[str] = "rerun `melsurgery diff A.gguf B.gguf --json`"

    @property
    def identical(self) -> bool:
        """True only when every tensor's bytes and every metadata key agree: what the exit status reports."""
        return all(t.status == "identical" for t in self.tensors) and not self.metadata

    def summary(self) -> dict[str, Any]:
        """Counts per status and metadata keys that differ: the JSON `summary` and the report's last line."""
        count = {s: sum(t.status == s for t in self.tensors) for s in ("identical", "changed", "type", "shape",
                                                                       "only_a", "only_b")}
        return {"tensors_compared": len(self.tensors), "identical": count["identical"], "changed": count["changed"],
                "type_changed": count["type"], "shape_changed": count["shape"], "only_a": count["only_a"],
                "only_b": count["only_b"], "keys_differ": len(self.metadata), "bytes_read": self.bytes_read,
                "wall_s": self.wall_s}

    def json_document(self, data: dict[str, Any]) -> dict[str, Any]:
        """The `diff --json` document for GGUFs (schema in the module docstring): the verdict first, the derived
        summary last; non-finite numbers as strings."""
        return {"identical": self.identical, **{k: data[k] for k in ("a", "b", "order_same", "tensors", "metadata")},
                "summary": self.summary()}


def _compare(fa: GGUFFile, fb: GGUFFile, ia: GGUFInfo, ib: GGUFInfo) -> tuple[GGUFTensorDiff, int]:
    t = GGUFTensorDiff(ia.name, "identical", ia.type_name, ib.type_name, list(ia.shape), list(ib.shape))
    if ia.shape != ib.shape:
        t.status = "shape"
        return t, 0
    ra, rb = fa.raw(ia.name), fb.raw(ib.name)
    nread = ra.nbytes + rb.nbytes
    same_type = ia.type == ib.type
    if same_type:
        ba, bb = ra.reshape(-1, ia.type_size), rb.reshape(-1, ib.type_size)
        t.blocks_total = len(ba)
        if np.array_equal(ba, bb):
            return t, nread
        t.status = "changed"
        t.blocks_changed = int((ba != bb).any(axis=1).sum())
    else:
        t.status = "type"
    va, vb = fa.dequantise(ia.name, ra), fb.dequantise(ib.name, rb)
    mask = ~((va == vb) | (np.isnan(va) & np.isnan(vb)))
    t.changed = int(mask.sum())
    if t.changed:
        d = np.abs(vb[mask].astype(np.float64) - va[mask])
        t.max_abs_diff = float(np.nan if np.isnan(d).any() else d.max())
        flat = mask.reshape(-1, ia.shape[-1])
        rows, cols = np.flatnonzero(flat.any(axis=1)), np.flatnonzero(flat.any(axis=0))
        t.rows, t.n_rows = (rows[:MAX_LIST].tolist(), int(rows.size)) if len(ia.shape) > 1 else ([], 0)
        t.cols, t.n_cols = cols[:MAX_LIST].tolist(), int(cols.size)
    return t, nread


def diff_gguf(a: Path, b: Path) -> GGUFDiffResult:
    """Compare two GGUF files; one tensor pair in memory at a time."""
    t0 = time.perf_counter()
    fa, fb = GGUFFile(Path(a)), GGUFFile(Path(b))
    tensors, nread = [], 0
    for name, ia in fa.tensors.items():
        ib = fb.tensors.get(name)
        if ib is None:
            tensors.append(GGUFTensorDiff(name, "only_a", ia.type_name, None, list(ia.shape)))
            continue
        t, n = _compare(fa, fb, ia, ib)
        tensors.append(t)
        nread += n
    tensors += [GGUFTensorDiff(n, "only_b", None, ib.type_name, None, list(ib.shape))
                for n, ib in fb.tensors.items() if n not in fa.tensors]
    keys = MetadataDiff(*compare_json(fa.metadata(), fb.metadata()))
    return GGUFDiffResult(Path(a), Path(b), list(fa.tensors) == list(fb.tensors), tensors, keys, nread,
                          round(time.perf_counter() - t0, 4))


def describe(t: GGUFTensorDiff) -> str:
    """One report line for a tensor: status, types, shapes, and where it changed (blocks, rows, columns)."""
    if t.status == "identical":
        return f"same     {t.name}"
    if t.status in ("only_a", "only_b"):
        side = t.status[-1].upper()
        return f"only {side}   {t.name}  {t.type_a or t.type_b} {shape_text(t.shape_a or t.shape_b)}"
    if t.status == "shape":
        return f"shape    {t.name}  {t.type_a} {shape_text(t.shape_a)} -> {t.type_b} {shape_text(t.shape_b)}"
    where = f" in rows {index_list(t.rows, t.n_rows)} x columns {index_list(t.cols, t.n_cols)}" if t.n_rows else (
        f" at {index_list(t.cols, t.n_cols)}" if t.n_cols else "")
    values = f"{count(t.changed, 'entry', 'entries')} changed{where}  max|d|={t.max_abs_diff:.4g}"
    if t.status == "type":
        return f"type     {t.name}  {t.type_a} -> {t.type_b} {shape_text(t.shape_a)}  {values}"
    blocks = f"{t.blocks_changed}/{count(t.blocks_total, 'block')}"
    return f"changed  {t.name}  {t.type_a} {shape_text(t.shape_a)}  {blocks}; {values}"


def gguf_diff_report(r: GGUFDiffResult, *, only_changed: bool = False) -> str:
    """The text report of a GGUF diff: one line per tensor and key, then a one-line verdict with counts."""
    lines = [f"A: {r.a}", f"B: {r.b}"]
    lines += [describe(t) for t in r.tensors if not (only_changed and t.status == "identical")]
    lines += [f"key      {k}: {value_text(o)} -> {value_text(n)}" for k, (o, n) in r.metadata.changed.items()]
    lines += [f"key +    {k}: {value_text(v)}" for k, v in r.metadata.added.items()]
    lines += [f"key -    {k}: {value_text(v)}" for k, v in r.metadata.removed.items()]
    if not r.order_same:
        lines.append("order    the tensors are stored in a different order")
    s = r.summary()
    lines.append(f"{'identical' if r.identical else 'different'}: {count(s['tensors_compared'], 'tensor')} compared, "
                 f"{s['changed']} changed, {s['type_changed']} type changed, {s['shape_changed']} shape changed, "
                 f"{s['only_a']} only in A, {s['only_b']} only in B; {s['keys_differ']} metadata keys differ; "
                 f"read {s['bytes_read'] / 1e6:.1f} MB in {s['wall_s']:.2f} s")
    return "\n".join(lines)


def write_json(r: GGUFDiffResult, path: Path) -> None:
    """Write the JSON document, so scripts read the same figures the report prints."""
    from melsurgery.checkpoint.atomic import write_atomic
    from melsurgery.formats.jsonsafe import dumps

    write_atomic(path, dumps(r.to_json(), indent=1, ensure_ascii=False, default=str) + "\n")
