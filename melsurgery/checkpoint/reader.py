"""A checkpoint folder seen as a lazy map from tensor name to bytes on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .safetensors_file import SafetensorsHeader, TensorInfo, load_tensor, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class Checkpoint:
    """A local Hugging Face model folder with safetensors weights.

    Only headers are read on open; tensors are loaded one at a time on request, so that commands can
    stream models larger than memory.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"{self.folder}: no such model folder")
        self.config = _read_config(self.folder)
        self.shards, self.index = _find_shards(self.folder)
        self.headers: dict[str, SafetensorsHeader] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            header = read_header(self.folder / shard)
            self.headers[shard] = header
            for name, info in header.tensors.items():
                if name in self.tensors:
                    raise UserError(
                        f"{self.folder}: tensor {name!r} appears in both {self.tensors[name].path.name} and {shard}"
                    )
                self.tensors[name] = info
        if self.index is not None:
            for name, shard in self.index.items():
                if name not in self.tensors:
                    raise UserError(f"{self.folder / INDEX_NAME}: names tensor {name!r}, which {shard} does not hold")
                if self.tensors[name].path.name != shard:
                    raise UserError(
                        f"{self.folder / INDEX_NAME}: places {name!r} in {shard}, but it is in "
                        f"{self.tensors[name].path.name}"
                    )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"{self.folder}: the checkpoint has no tensor {name!r}") from None

    def load(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        t = load_tensor(self.info(name))
        return t.to(device=device, dtype=dtype or t.dtype)

    def load_prefix(
        self, prefix: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """All tensors under a module prefix, keyed relative to it (a state dict for that module)."""
        return {n[len(prefix) :]: self.load(n, dtype, device) for n in self.tensors if n.startswith(prefix)}

    def side_files(self) -> list[str]:
        """Files other than weights and their index: tokenizer, templates, configs, licences, cards."""
        weights = set(self.shards) | {INDEX_NAME}
        out = []
        for p in sorted(self.folder.rglob("*")):
            rel = p.relative_to(self.folder).as_posix()
            if p.is_file() and rel not in weights and not rel.startswith("."):
                out.append(rel)
        return out

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; is this a Hugging Face model folder?")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise UserError(f"{path}: not a model config (no model_type)")
    return cfg


def _find_shards(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise UserError(f"{index_path}: invalid index (no weight_map)") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (folder / shard).is_file():
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
