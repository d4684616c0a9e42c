"""A small, strict reader of the safetensors format.

We parse headers ourselves (rather than trusting `safe_open` alone) so that a header that lies about
offsets, a truncated file or an unsupported dtype is reported as one clear line before any work, and
so that untouched tensors can be copied byte for byte without a float round trip.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

# safetensors dtype codes we can compute with; anything else (fp8, packed ints) is refused.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute offsets into its file."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header; every inconsistency is a UserError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download it")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise UserError(f"{path}: corrupt safetensors header (length {hlen} exceeds the file); re-download it")
            raw = fh.read(hlen)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors header (not JSON); re-download it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + hlen
    metadata = obj.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, spec in obj.items():
        try:
            dtype, shape, (lo, hi) = spec["dtype"], tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise UserError(
                f"{path}: tensor {name!r} has dtype {dtype}, which melsurgery cannot edit "
                f"(supported: {', '.join(DTYPES)}); use an unquantised checkpoint"
            )
        numel = 1
        for s in shape:
            numel *= s
        if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 0 or hi < lo or hi - lo != numel * ITEMSIZE[dtype]:
            raise UserError(f"{path}: corrupt safetensors header: offsets of {name!r} do not match its shape and dtype")
        if data_start + hi > size:
            raise UserError(f"{path}: truncated file: tensor {name!r} ends past the end of the file; re-download it")
        spans.append((lo, hi, name))
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + lo, data_start + hi)
    spans.sort()
    for (_lo1, hi1, n1), (lo2, _hi2, n2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise UserError(f"{path}: corrupt safetensors header: tensors {n1!r} and {n2!r} overlap")
    return SafetensorsHeader(path, data_start, tensors, dict(metadata))


def read_bytes(info: TensorInfo) -> bytes:
    with open(info.path, "rb") as fh:
        fh.seek(info.start)
        return fh.read(info.nbytes)


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Load one tensor by its byte range: one read, no whole-file mapping."""
    data = bytearray(read_bytes(info))
    if len(data) != info.nbytes:
        raise UserError(f"{info.path}: truncated while reading {info.name!r}; re-download it")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(data, dtype=info.torch_dtype).reshape(info.shape)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor as safetensors stores them."""
    t = tensor.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
