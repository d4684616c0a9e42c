"""A checkpoint folder seen as a lazy map from tensor name to bytes on disk."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import torch

from melsurgery.checkpoint.hashing import SIDECAR
from melsurgery.checkpoint.safetensors_file import SafetensorsHeader, TensorInfo, load_tensor, read_header
from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import MAX_JSON, read_text, refuse_special_files
from melsurgery.formats.wording import count

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Weights in other formats (and their indexes) are never copied as side files: they would ship the
# unpatched model beside the patched one.
OTHER_WEIGHTS = (*PICKLE_PATTERNS, "*.safetensors", "*.index.json", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.pkl",
                 "*.pickle")


class Checkpoint:
    """A local Hugging Face model folder with safetensors weights.

    Only headers are read on open; tensors are loaded one at a time on request, so that commands can
    stream models larger than memory.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"{self.folder}: no such model folder")
        refuse_special_files(self.folder)
        self.config = read_config(self.folder)
        self.shards, self.index = _find_shards(self.folder)
        self.headers: dict[str, SafetensorsHeader] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            header = read_header(self.folder / shard)
            self.headers[shard] = header
            for name, info in header.tensors.items():
                if name in self.tensors:
                    raise UserError(
                        f"{self.folder}: tensor {quote(name)} appears in both "
                        f"{self.tensors[name].path.name} and {shard}"
                    )
                self.tensors[name] = info
        if self.index is not None:
            for name, shard in self.index.items():
                if name not in self.tensors:
                    raise UserError(f"{self.folder / INDEX_NAME}: names tensor {quote(name)}, which {shard} "
                                    "does not hold")
                if self.tensors[name].path.name != shard:
                    raise UserError(
                        f"{self.folder / INDEX_NAME}: places {quote(name)} in {shard}, but it is in "
                        f"{self.tensors[name].path.name}"
                    )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        """Every tensor name, shard by shard in header order (what a full pass over the weights walks)."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Where a tensor lives (shard, offsets, dtype, shape); a missing name is a UserError, not a KeyError."""
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"{self.folder}: the checkpoint has no tensor {quote(name)}") from None

    def load(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor read by its byte range alone (no shard is loaded whole), cast and moved as asked."""
        t = load_tensor(self.info(name))
        return t.to(device=device, dtype=dtype or t.dtype)

    def load_rows(self, name: str, rows: list[int], dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows of a 2-D tensor (an embedding table, for the token ids at hand), read without the rest.

        A 128k-vocabulary table is 2 GB in fp32; a calibration batch needs a few hundred of its rows.
        """
        info = self.info(name)
        if len(info.shape) != 2:
            raise UserError(f"{self.folder}: {name} is not a matrix (shape {list(info.shape)})")
        n, width = info.shape
        bad = [r for r in rows if not 0 <= r < n]
        if bad:
            raise UserError(f"{self.folder}: rows {bad[:5]} out of range for {name} ({count(n, 'row')})")
        row_bytes = info.nbytes // n if n else 0
        out = torch.empty((len(rows), width), dtype=info.torch_dtype)
        for k, r in enumerate(rows):
            part = TensorInfo(name, info.path, info.dtype, (width,), info.start + r * row_bytes,
                              info.start + (r + 1) * row_bytes)
            out[k] = load_tensor(part)
        return out.to(device=device, dtype=dtype or out.dtype)

    def load_row_block(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 of a 2-D tensor as stored, read without the rest (an LM head, block by block)."""
        info = self.info(name)
        if len(info.shape) != 2 or not 0 <= lo <= hi <= info.shape[0]:
            raise UserError(f"{self.folder}: {name} has no rows {lo}-{hi} (shape {list(info.shape)})")
        n, width = info.shape
        row_bytes = info.nbytes // n if n else 0
        return load_tensor(TensorInfo(name, info.path, info.dtype, (hi - lo, width), info.start + lo * row_bytes,
                                      info.start + hi * row_bytes))

    def load_prefix(
        self, prefix: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """All tensors under a module prefix, keyed relative to it (a state dict for that module)."""
        return {n[len(prefix) :]: self.load(n, dtype, device) for n in self.tensors if n.startswith(prefix)}

    def side_files(self) -> list[str]:
        """Files other than weights, their index and their sha256 sidecars (which describe this folder's files,
        not an output's): tokenizer, templates, configs, licences, cards."""
        out = []
        for p in sorted(self.folder.rglob("*")):
            rel = p.relative_to(self.folder).as_posix()
            weights = p.with_suffix("") if p.suffix == SIDECAR else p
            if p.is_file() and not rel.startswith(".") and not any(weights.match(pat) for pat in OTHER_WEIGHTS):
                out.append(rel)
        return out

    @property
    def float_dtype(self) -> torch.dtype:
        """The floating dtype that holds most of the weights' bytes (what `--dtype checkpoint` computes in)."""
        size: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.torch_dtype.is_floating_point:
                size[info.torch_dtype] = size.get(info.torch_dtype, 0) + info.nbytes
        return max(size, key=size.__getitem__) if size else torch.float32


def read_config(folder: Path) -> dict:
    """A model folder's config.json as a dict: refused (one line) when absent, not JSON, or quantised."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; is this a Hugging Face model folder?")
    try:
        cfg = json.loads(read_text(path, "config.json", MAX_JSON))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise UserError(f"{path}: not a model config (no model_type)")
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise UserError(
            f"{folder}: a quantised checkpoint ({method}); melsurgery edits unquantised weights only: "
            "use the original bf16/fp16/fp32 model"
        )
    return cfg


def _find_shards(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(read_text(index_path, "the index", MAX_JSON))["weight_map"]
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
            raise UserError(f"{index_path}: invalid index (no weight_map)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index_path}: invalid index (weight_map must map tensor names to shard files)")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            rel = PurePosixPath(shard)
            if rel.is_absolute() or ".." in rel.parts or "\\" in shard or not shard:
                raise UserError(f"{index_path}: shard name {quote(shard)} points outside the model folder")
            if not (folder / shard).exists():
                raise UserError(f"{index_path}: names shard {shard}, which is missing; re-download the checkpoint")
        return shards, weight_map
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    loose = sorted(p.name for p in folder.glob("*.safetensors"))
    if loose:
        return loose, None
    pickled = [p.name for pat in PICKLE_PATTERNS for p in folder.glob(pat)]
    if pickled:
        raise UserError(
            f"{folder}: only pickled weights ({', '.join(sorted(pickled)[:3])}); melsurgery reads safetensors only. "
            "Convert with transformers: from_pretrained(...).save_pretrained(out, safe_serialization=True)"
        )
    raise UserError(f"{folder}: no safetensors weights found")
