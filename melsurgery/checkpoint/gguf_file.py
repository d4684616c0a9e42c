"""A GGUF file as melsurgery needs it: tensors by name and byte range, metadata as raw bytes and values.

The output of a GGUF patch is the source file with its header re-emitted (the original metadata bytes,
then melsurgery's keys, then the original tensor infos) and edited tensors spliced into the data
section. Tensor-info offsets are relative to the data section, so they stay valid byte for byte.
Reading uses the `gguf` package (llama.cpp's own Python library); its quantisers are the only ones used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

MELSURGERY_PREFIX = "melsurgery."
_STRING = 8  # GGUFValueType.STRING


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
        return self.type.name

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    @property
    def blocks_per_row(self) -> int:
        return self.shape[-1] // self.block_size


class GGUFFile:
    """Headers of a GGUF file; tensor bytes are read on request through the reader's memory map."""

    def __init__(self, path: Path) -> None:
        try:
            from gguf import GGML_QUANT_SIZES, GGUFReader
        except ImportError:
            raise UserError("reading .gguf files needs the gguf extra: pip install 'melsurgery[gguf]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such GGUF file")
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, OSError, struct.error) as exc:
            raise UserError(f"{self.path}: not a readable GGUF file ({exc})") from None
        if self.reader.byte_order != "I":
            raise UserError(f"{self.path}: a big-endian GGUF; melsurgery handles little-endian files only")
        size = self.path.stat().st_size
        self.tensors: dict[str, GGUFInfo] = {}
        for t in self.reader.tensors:
            bs, ts = GGML_QUANT_SIZES[t.tensor_type]
            info = GGUFInfo(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                            int(t.data_offset), int(t.n_bytes), bs, ts)
            if info.end > size:
                raise UserError(f"{self.path}: tensor {t.name!r} extends past the end of the file; re-download it")
            self.tensors[t.name] = info
        self.data_offset = int(self.reader.data_offset)
        self.alignment = int(self.reader.alignment)
        self.kv_fields = [f for k, f in self.reader.fields.items() if not k.startswith("GGUF.")]
        infos = [t.field for t in self.reader.tensors]
        self.kv_start = self.kv_fields[0].offset if self.kv_fields else _field_end(self.reader.fields["GGUF.kv_count"])
        self.ti_start = infos[0].offset if infos else (_field_end(self.kv_fields[-1]) if self.kv_fields else
                                                       self.kv_start)
        self.ti_end = _field_end(infos[-1]) if infos else self.ti_start

    @property
    def architecture(self) -> str | None:
        return self.value("general.architecture")

    def value(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        return None if field is None else field.contents()

    def metadata(self) -> dict[str, Any]:
        """Every key/value pair (arrays as lists), in file order."""
        return {f.name: f.contents() for f in self.kv_fields}

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor (a copy), shape [rows, bytes per row]."""
        info = self.tensors[name]
        data = np.array(self.reader.data[info.start : info.end], dtype=np.uint8)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return data.reshape(rows, -1)

    def dequantise(self, name: str, raw: np.ndarray | None = None) -> np.ndarray:
        """float32 values of a tensor (numpy shape), through gguf's dequantisers."""
        info = self.tensors[name]
        return dequantise_bytes(self.raw(name) if raw is None else raw, info)

    def header(self, extra: dict[str, str]) -> bytes:
        """This file's header with melsurgery's string keys `extra` in place of any it carried before."""
        data = self.reader.data
        kept = [f for f in self.kv_fields if not f.name.startswith(MELSURGERY_PREFIX)]
        out = bytearray(data[:8].tobytes())  # magic, version
        out += struct.pack("<QQ", len(self.tensors), len(kept) + len(extra))
        for f in kept:
            out += data[f.offset : _field_end(f)].tobytes()
        for key, value in extra.items():
            out += _string(key) + struct.pack("<I", _STRING) + _string(value)
        out += data[self.ti_start : self.ti_end].tobytes()
        out += bytes(-len(out) % self.alignment)
        return bytes(out)


def _field_end(field: Any) -> int:
    return int(field.offset + sum(int(p.nbytes) for p in field.parts))


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def dequantise_bytes(raw: np.ndarray, info: GGUFInfo) -> np.ndarray:
    from gguf import quants

    try:
        values = quants.dequantize(raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw[None], info.type)
    except NotImplementedError:
        raise UserError(f"{info.name}: the gguf package cannot read {info.type_name} tensors") from None
    return np.asarray(values, dtype=np.float32).reshape(info.shape)


@cache
def can_quantise(qtype: Any) -> bool:
    """Whether the gguf package has a quantiser for this type (it has none for K-quants and i-quants)."""
    from gguf import GGML_QUANT_SIZES, quants

    try:
        quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except (NotImplementedError, quants.QuantError):
        return False
    return True


def quantise_blocks(values: np.ndarray, info: GGUFInfo) -> np.ndarray:
    """Blocks of float32 values [k, block_size] as stored bytes [k, type_size], with gguf's quantiser."""
    from gguf import quants

    q = quants.quantize(np.ascontiguousarray(values, dtype=np.float32), info.type)
    return np.ascontiguousarray(q).view(np.uint8).reshape(len(values), info.type_size)
