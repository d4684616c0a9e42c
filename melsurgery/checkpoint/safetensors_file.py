"""A small, strict reader of the safetensors format.

We parse headers ourselves (rather than trusting `safe_open` alone) so that a header that lies about
offsets, a truncated file or an unsupported dtype is reported as one clear line before any work, and
so that untouched tensors can be copied byte for byte without a float round trip.
"""

from __future__ import annotations

import json
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import file_kind

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
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
# What a header may claim, checked on its bytes before they are parsed (a bomb lists millions of empty tensors in
# a header of up to MAX_HEADER bytes and no data: parsing it, and every per-tensor check after, takes minutes and
# gigabytes). A real header is a small fraction of the data it describes (about 100 bytes a tensor, and a tensor
# holds at least a row of a norm); HEADER_SLACK leaves room for tiny models and metadata.
HEADER_SLACK = 1024 * 1024
MAX_TENSORS = 100_000  # per file; the largest mixture-of-experts checkpoints hold fewer in all their shards
MAX_NAME = 1024  # characters of a tensor name; real names are under 200


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
        """Size of the tensor's bytes in the file (its offsets say so; the header check proves it matches the shape)."""
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored bytes, so a tensor is read without a safetensors round trip."""
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header of one safetensors file: where its data begins, each tensor's place, its metadata."""

    path: Path
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header; every inconsistency is a UserError naming the file."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or stream forever: never opened
            raise UserError(f"{path}: not a regular file ({file_kind(st.st_mode)}); weights must be plain files")
        size = st.st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download it")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise UserError(f"{path}: corrupt safetensors header (length {hlen} exceeds the file); re-download it")
            _check_claims(path, hlen, size - 8 - hlen, None)
            raw = fh.read(hlen)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    _check_claims(path, hlen, size - 8 - hlen, raw)
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path}: corrupt safetensors header (not JSON); re-download it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + hlen
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, spec in obj.items():
        if len(name) > MAX_NAME:
            raise UserError(f"{path}: corrupt safetensors header: a tensor name of {len(name):,} characters "
                            f"(at most {MAX_NAME}): {quote(name)}")
        dtype, shape, lo, hi = _entry(path, name, spec)
        numel = _numel(path, name, shape, dtype)
        if hi < lo or hi - lo != numel * ITEMSIZE[dtype]:
            raise UserError(f"{path}: corrupt safetensors header: offsets of {quote(name)} do not match its "
                            "shape and dtype")
        if data_start + hi > size:
            raise UserError(f"{path}: truncated file: tensor {quote(name)} ends past the end of the file; "
                            "re-download it")
        spans.append((lo, hi, name))
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + lo, data_start + hi)
    _check_coverage(path, sorted(spans), size - data_start)
    return SafetensorsHeader(path, data_start, tensors, dict(metadata))


def _check_claims(path: Path, hlen: int, data_size: int, raw: bytes | None) -> None:
    """Refuse a header that claims more than its file can hold, before it is read (`raw` None) and before it is
    parsed: a header larger than its data by more than HEADER_SLACK, or more objects (each tensor entry is one
    `{`) than MAX_TENSORS. Counting bytes is linear and allocates nothing; the JSON parser is never reached."""
    if hlen > data_size + HEADER_SLACK:
        raise UserError(f"{path}: implausible safetensors header: {hlen:,} bytes of header for {data_size:,} bytes "
                        f"of tensor data (at most {HEADER_SLACK:,} more than the data); not parsed, re-download it")
    if raw is not None and (objects := raw.count(b"{")) > MAX_TENSORS + 2:  # the header and __metadata__
        raise UserError(f"{path}: implausible safetensors header: up to {objects - 1:,} tensor entries (at most "
                        f"{MAX_TENSORS:,} in one file); not parsed, re-download it")


def _check_coverage(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors must tile the data region exactly, as safetensors itself requires (no overlap, gap or tail)."""
    for (_lo1, hi1, n1), (lo2, _hi2, n2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise UserError(f"{path}: corrupt safetensors header: tensors {quote(n1)} and {quote(n2)} overlap")
    end = 0
    for lo, hi, name in spans:
        if lo != end:
            raise UserError(f"{path}: corrupt safetensors header: a gap before tensor {quote(name)}")
        end = hi
    if end != data_size:
        raise UserError(f"{path}: corrupt safetensors file: {data_size - end} stray bytes after the last tensor")


def _numel(path: Path, name: str, shape: tuple[int, ...], dtype: str) -> int:
    """Element count, refusing what the safetensors library refuses (a running product of the dims, or the size
    in bits, past 64 bits) and dims torch cannot hold (2^63 or more), even when another dim is 0."""
    numel = 1
    for dim in shape:
        numel *= dim
        if dim >= 2**63 or numel >= 2**64:
            raise UserError(f"{path}: corrupt safetensors header: the shape {list(shape)} of {quote(name)} overflows")
    if numel * ITEMSIZE[dtype] * 8 >= 2**64:
        raise UserError(f"{path}: corrupt safetensors header: the shape {list(shape)} of {quote(name)} overflows")
    return numel


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, spec: object) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape and relative offsets of one header entry, each checked for type and sign."""
    if not isinstance(spec, dict):
        raise UserError(f"{path}: corrupt safetensors header entry for {quote(name)}")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise UserError(f"{path}: corrupt safetensors header entry for {quote(name)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise UserError(f"{path}: corrupt safetensors header: offsets of {quote(name)} are not two "
                        "non-negative integers")
    if dtype not in DTYPES:
        raise UserError(
            f"{path}: tensor {quote(name)} has dtype {dtype}, which melsurgery cannot edit "
            f"(supported: {', '.join(DTYPES)}); use an unquantised checkpoint"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_bytes(info: TensorInfo) -> bytes:
    """A tensor's raw stored bytes: byte-for-byte comparison without decoding."""
    with open(info.path, "rb") as fh:
        fh.seek(info.start)
        return fh.read(info.nbytes)


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Load one tensor by its byte range, read straight into the tensor's memory (one copy, no mapping)."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    got = 0
    if info.nbytes:
        view = memoryview(raw.numpy())
        try:
            with open(info.path, "rb", buffering=0) as fh:
                fh.seek(info.start)
                while got < info.nbytes and (n := fh.readinto(view[got:])):
                    got += n
        except OSError as exc:
            raise UserError(f"{info.path}: cannot read ({exc.strerror or exc})") from None
    if got != info.nbytes:
        raise UserError(f"{info.path}: truncated while reading {quote(info.name)}; re-download it")
    return raw.view(info.torch_dtype).reshape(info.shape)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor as safetensors stores them."""
    t = tensor.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
