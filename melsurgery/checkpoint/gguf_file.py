"""A GGUF file as melsurgery needs it: tensors by name and byte range, metadata as raw bytes and values.

The output of a GGUF patch is the source file with its header re-emitted (the original metadata bytes,
then melsurgery's keys, then the original tensor infos) and edited tensors spliced into the data
section. Tensor-info offsets are relative to the data section, so they stay valid byte for byte.
Reading uses the `gguf` package (llama.cpp's own Python library); its quantisers are the only ones used.

What a header claims is bounded before anything is decoded or allocated for it: every count (tensors, keys,
array entries, dimensions) against the bytes left in the file, array entries in all against
`MAX_ARRAY_ENTRIES` (the readers downstream, transformers' GGUF loader among them, build objects per entry),
tensor names and dimensions as llama.cpp bounds them.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from melsurgery.errors import UserError, quote

MELSURGERY_PREFIX = "melsurgery."
_STRING, ARRAY = 8, 9  # GGUFValueType.STRING, .ARRAY
# Metadata array entries a file may hold in all. The largest vocabularies in GGUF (Gemma's 262,144 tokens
# with scores and types; Llama 3's 128,256 tokens with 280,147 merges) hold under 800,000; transformers'
# GGUF reader spends several microseconds per entry, so a header claiming millions would hang a conversion.
MAX_ARRAY_ENTRIES = 1 << 21
MAX_DIMS, MAX_NAME = 4, 63  # llama.cpp's GGML_MAX_DIMS and GGML_MAX_NAME - 1 (it refuses more)
# The fewest bytes an entry can take: a key/value pair (key length, type, a 1-byte value) and a tensor info
# (name length, dimension count, one dimension, type, offset)
_MIN_KV, _MIN_TENSOR_INFO = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class GGUFInfo:
    """One tensor: `shape` in numpy order (rows first, the block dimension last), absolute byte range."""

    name: str
    type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    start: int
    nbytes: int
    block_size: int
    type_size: int

    @property
    def type_name(self) -> str:
        """The quantisation type as llama.cpp spells it (Q4_1, F32), for messages and reports."""
        return self.type.name

    @property
    def end(self) -> int:
        """Offset just past the tensor's bytes in the file: bounds checks and splicing use it."""
        return self.start + self.nbytes

    @property
    def blocks_per_row(self) -> int:
        """Quantisation blocks in one row: a column edit touches one block in every row."""
        return self.shape[-1] // self.block_size


@dataclass(frozen=True)
class KV:
    """One metadata pair: its type and where its bytes lie in the header (the value is decoded on request)."""

    key: str
    vtype: int
    start: int
    value_at: int
    end: int


class GGUFFile:
    """The header of a GGUF file, parsed here: values are decoded on request, so opening the default model's
    GGUF takes milliseconds where gguf's GGUFReader decodes every token string (10-15 s on the shared
    machine); tensor bytes are read on request from a memory map."""

    def __init__(self, path: Path) -> None:
        try:
            from gguf import GGMLQuantizationType
        except ImportError:
            raise UserError("reading .gguf files needs the gguf extra: pip install 'melsurgery[gguf]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such GGUF file")
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.path}: cannot read ({exc})") from None
        self.size = size = len(self._map)
        try:
            p = _Parser(self._map)
            if p.take(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            version = p.u32()
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}; melsurgery reads versions 2 and 3 (little-endian)")
            n_tensors, n_kv = p.u64(), p.u64()
            p.claim(n_kv, _MIN_KV, "metadata keys")
            p.claim(n_tensors, _MIN_TENSOR_INFO, "tensors")
            self.kv: dict[str, KV] = {}
            for _ in range(n_kv):
                start = p.pos
                key = p.string()
                vtype = p.u32()
                at = p.pos
                p.skip(vtype)  # arrays (the vocabulary) are decoded only when asked for
                self.kv[key] = KV(key, vtype, start, at, p.pos)
            self.ti_start = p.pos
            self.alignment = int(self.value("general.alignment") or 32)
            if self.alignment <= 0 or self.alignment & (self.alignment - 1):
                raise ValueError(f"alignment {self.alignment} is not a power of two")
            infos = []
            for _ in range(n_tensors):
                name = p.string()
                if len(name.encode()) > MAX_NAME:
                    raise ValueError(f"a tensor name of {len(name.encode())} bytes (llama.cpp allows {MAX_NAME})")
                n_dims = p.u32()
                if not 1 <= n_dims <= MAX_DIMS:
                    raise ValueError(f"a tensor with {n_dims} dimensions (llama.cpp allows 1 to {MAX_DIMS})")
                dims = [p.u64() for _ in range(n_dims)]
                qtype = GGMLQuantizationType(p.u32())
                infos.append((name, dims, qtype, p.u64()))
            self.ti_end = p.pos
        except (ValueError, struct.error, UnicodeDecodeError, IndexError) as exc:
            raise UserError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self.data_offset = self.ti_end + (-self.ti_end % self.alignment)
        self.tensors: dict[str, GGUFInfo] = {}
        for name, dims, qtype, offset in infos:
            self.tensors[name] = self._tensor(name, dims, qtype, offset, size)
        _refuse_overlaps(self.path, sorted(self.tensors.values(), key=lambda t: t.start))

    def _tensor(self, name: str, dims: list[int], qtype: Any, offset: int, size: int) -> GGUFInfo:
        """One tensor-info entry, checked as llama.cpp checks it: unique, whole blocks, aligned, inside the file."""
        from gguf import GGML_QUANT_SIZES

        where, shown = self.path, quote(name, 80)
        bs, ts = GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        if name in self.tensors or not shape or shape[-1] % bs:
            raise UserError(f"{where}: tensor {shown} is duplicated or its shape does not fit {qtype.name}")
        if offset % self.alignment:
            raise UserError(f"{where}: tensor {shown} starts at offset {offset}, not a multiple of the file's "
                            f"alignment {self.alignment} (llama.cpp refuses the file); re-download or re-convert it")
        info = GGUFInfo(name, qtype, shape, self.data_offset + int(offset), math.prod(shape) // bs * ts, bs, ts)
        if info.end > size:
            raise UserError(f"{where}: tensor {shown} extends past the end of the file; re-download it")
        return info

    def value(self, key: str) -> Any:
        """A metadata value, decoded only when asked (None when absent): opening a big file stays cheap."""
        kv = self.kv.get(key)
        if kv is None:
            return None
        p = _Parser(self._map)
        p.pos = kv.value_at
        return p.value(kv.vtype)

    def metadata(self) -> dict[str, Any]:
        """Every key/value pair (arrays as lists), in file order."""
        return {k: self.value(k) for k in self.kv}

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor (a copy), shape [rows, bytes per row]."""
        info = self.tensors[name]
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.start).copy()
        rows = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        return data.reshape(rows, -1)

    def head(self, name: str, n: int) -> bytes:
        """The first n stored bytes of a tensor."""
        start = self.tensors[name].start
        return bytes(self._map[start : start + n])

    def dequantise(self, name: str, raw: np.ndarray | None = None) -> np.ndarray:
        """float32 values of a tensor (numpy shape), through gguf's dequantisers."""
        info = self.tensors[name]
        return dequantise_bytes(self.raw(name) if raw is None else raw, info)

    def header(self, extra: dict[str, str], retyped: dict[str, tuple[Any, int]] | None = None) -> bytes:
        """This file's header with melsurgery's string keys `extra` in place of any it carried before.

        `retyped`: tensors written in another type, {name: (type, bytes)}; their entries name the new type and
        every tensor stored after them moves by the size difference (see `padded_end`). Without it the tensor
        table is the source's, byte for byte."""
        kept = [kv for kv in self.kv.values() if not kv.key.startswith(MELSURGERY_PREFIX)]
        out = bytearray(self._map[:8])  # magic, version
        out += struct.pack("<QQ", len(self.tensors), len(kept) + len(extra))
        for kv in kept:
            out += self._map[kv.start : kv.end]
        for key, value in extra.items():
            out += _string(key) + struct.pack("<I", _STRING) + _string(value)
        out += self._tensor_table(retyped) if retyped else self._map[self.ti_start : self.ti_end]
        out += bytes(-len(out) % self.alignment)
        return bytes(out)

    def padded_end(self, name: str) -> int:
        """Where a tensor's bytes and the padding that aligns the next one end: a retyped tensor replaces this
        span with its own bytes padded to the alignment, so every later tensor moves by whole alignments."""
        end = self.tensors[name].end
        return min(end + (-end % self.alignment), self.size)

    def _tensor_table(self, retyped: dict[str, tuple[Any, int]]) -> bytes:
        shift, offsets = 0, {}
        for info in sorted(self.tensors.values(), key=lambda t: t.start):
            offsets[info.name] = info.start - self.data_offset + shift
            if info.name in retyped:
                nbytes = retyped[info.name][1]
                shift += nbytes + (-nbytes % self.alignment) - (self.padded_end(info.name) - info.start)
        out = bytearray()
        for info in self.tensors.values():  # the table's own order
            qtype = retyped[info.name][0] if info.name in retyped else info.type
            out += _string(info.name) + struct.pack("<I", len(info.shape))
            out += struct.pack(f"<{len(info.shape)}Q", *reversed(info.shape))
            out += struct.pack("<IQ", int(qtype), offsets[info.name])
        return bytes(out)


# GGUFValueType codes -> struct formats of the scalars
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}


class _Parser:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.entries = buf, 0, 0

    def claim(self, n: int, width: int, what: str) -> None:
        """Refuse a count the rest of the file cannot hold at `width` bytes each, before anything is read for it."""
        if n * width > len(self.buf) - self.pos:
            raise ValueError(f"the header claims {n:,} {what}, more than the file's {len(self.buf):,} bytes can hold")

    def array_head(self) -> tuple[int, int]:
        """An array's item type and count, the count bounded by the file and by MAX_ARRAY_ENTRIES in all."""
        itype, n = self.u32(), self.u64()
        self.claim(n, np.dtype(_NUMPY[itype]).itemsize if itype in _NUMPY else 8 if itype == _STRING else 1,
                   "array entries")
        self.entries += n
        if self.entries > MAX_ARRAY_ENTRIES:
            raise ValueError(f"the metadata holds more than {MAX_ARRAY_ENTRIES:,} array entries (real vocabularies "
                             "hold under a million)")
        if itype == ARRAY:
            raise ValueError("an array of arrays in the metadata (llama.cpp refuses nested arrays)")
        return itype, n

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError("truncated header")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def u32(self) -> int:
        return self.scalar("<I")

    def u64(self) -> int:
        return self.scalar("<Q")

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8")

    def skip(self, vtype: int) -> None:
        """Step over a value without decoding it (numeric arrays in one step)."""
        if vtype == ARRAY:
            itype, n = self.array_head()
            if itype in _NUMPY:
                self.take(n * np.dtype(_NUMPY[itype]).itemsize)
            elif itype == _STRING:  # the vocabulary: step over each length-prefixed string
                pos, unpack, buf = self.pos, struct.unpack_from, self.buf
                for _ in range(n):
                    pos += 8 + unpack("<Q", buf, pos)[0]
                self.pos = pos
                if pos > len(buf):
                    raise ValueError("truncated header")
            else:
                for _ in range(n):
                    self.skip(itype)
        elif vtype == _STRING:
            self.take(self.u64())
        elif vtype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[vtype])
        else:
            raise ValueError(f"unknown metadata value type {vtype}")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == ARRAY:  # item type, count, items
            itype, n = self.array_head()
            if itype in _NUMPY:
                width = np.dtype(_NUMPY[itype]).itemsize
                values = np.frombuffer(self.take(n * width), dtype=_NUMPY[itype])
                return values.astype(bool).tolist() if itype == 7 else values.tolist()
            return [self.value(itype) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {vtype}")


def _refuse_overlaps(path: Path, tensors: list[GGUFInfo]) -> None:
    """Two tensors sharing bytes would make an edit of one change the other."""
    for a, b in zip(tensors, tensors[1:]):
        if b.start < a.end:
            raise UserError(f"{quote(str(path), 300)}: tensors {quote(a.name, 80)} and {quote(b.name, 80)} overlap "
                            "in the file; re-download or re-convert it")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def dequantise_bytes(raw: np.ndarray, info: GGUFInfo) -> np.ndarray:
    """A tensor's stored bytes as float32 in its shape (how GGUF weights are read and diffed); a type
    the gguf package cannot read is a one-line refusal, not a crash."""
    from gguf import quants

    try:
        values = quants.dequantize(raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw[None], info.type)
    except NotImplementedError:
        raise UserError(f"{info.name}: the gguf package cannot read {info.type_name} tensors") from None
    return np.array(values, dtype=np.float32).reshape(info.shape)  # a copy: F32 "dequantisation" is a view


@cache
def can_quantise(qtype: Any) -> bool:
    """Whether the gguf package has a quantiser for this type (it has none for K-quants and i-quants)."""
    from gguf import GGML_QUANT_SIZES, quants

    try:
        quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except (NotImplementedError, quants.QuantError):
        return False
    return True


@cache
def can_dequantise(qtype: Any) -> bool:
    """Whether the gguf package can read this type (K-quants yes; some i-quants not)."""
    from gguf import GGML_QUANT_SIZES, quants

    bs, ts = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros((1, ts), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def quantise_blocks(values: np.ndarray, info: GGUFInfo) -> np.ndarray:
    """Blocks of float32 values [k, block_size] as stored bytes [k, type_size], with gguf's quantiser."""
    from gguf import quants

    q = quants.quantize(np.ascontiguousarray(values, dtype=np.float32), info.type)
    return np.ascontiguousarray(q).view(np.uint8).reshape(len(values), info.type_size)
