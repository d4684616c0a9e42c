"""Writing a patched checkpoint: untouched bytes copied, edited tensors rewritten in place.

Edits keep dtype and shape, so an edited tensor occupies exactly its old byte range: a shard with
edits is copied and then only those ranges are overwritten. Headers, the index and every other
tensor stay byte-identical, and peak memory is one tensor.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..recipes import Edit
from .hashing import copy_hashing, sha256_file
from .reader import INDEX_NAME, Checkpoint
from .safetensors_file import load_tensor, tensor_bytes

# Files the writer produces itself rather than copying from the source.
GENERATED = ("README.md", "provenance.json", "melsurgery-manifest.yaml")


@dataclass
class AppliedEdit:
    tensor: str
    shard: str
    changed: int
    max_abs_delta: float


def apply_edit(weight: torch.Tensor, edit: Edit) -> torch.Tensor:
    """The edited tensor in fp32 (callers cast back to the stored dtype)."""
    w = weight.float().clone()
    if edit.index is None:
        w.copy_(_affine(w, edit))
        return w
    if edit.axis >= w.dim():
        raise UserError(f"{edit.tensor}: cannot edit axis {edit.axis} of a {w.dim()}-D tensor")
    size = w.shape[edit.axis]
    bad = [i for i in edit.index if not 0 <= i < size]
    if bad:
        raise UserError(f"{edit.tensor}: indices {bad} out of range 0-{size - 1}")
    idx = torch.tensor(edit.index, dtype=torch.long)
    w.index_copy_(edit.axis, idx, _affine(w.index_select(edit.axis, idx), edit))
    return w


def _affine(x: torch.Tensor, e: Edit) -> torch.Tensor:
    if e.offset:
        return (x + e.offset) * e.scale + e.shift - e.offset
    return x * e.scale + e.shift


def is_identity(edit: Edit) -> bool:
    return edit.scale == 1.0 and edit.shift == 0.0


def write_weights(ckpt: Checkpoint, edits: list[Edit], out: Path, link: bool = False) -> tuple[list[AppliedEdit], dict]:
    """Write every shard (and the index) into `out`; returns what changed and sha256 of each input file."""
    by_tensor: dict[str, list[Edit]] = {}
    for e in edits:
        if is_identity(e):
            continue
        ckpt.info(e.tensor)  # fails clearly on an unknown name
        by_tensor.setdefault(e.tensor, []).append(e)
    applied: list[AppliedEdit] = []
    inputs: dict[str, str] = {}
    for shard in ckpt.shards:
        src, dst = ckpt.folder / shard, out / shard
        dst.parent.mkdir(parents=True, exist_ok=True)
        mine = [n for n in by_tensor if ckpt.info(n).path.name == Path(shard).name]
        if not mine and link:
            inputs[shard] = sha256_file(src)
            try:
                os.link(src, dst)
                continue
            except OSError:
                pass  # another filesystem: copy instead
        inputs[shard] = copy_hashing(src, dst)
        if not mine:
            continue
        header = ckpt.headers[shard]
        with open(dst, "r+b") as fh:
            for name in mine:
                info = header.tensors[name]
                original = load_tensor(info)
                new = original.float()
                for e in by_tensor[name]:
                    new = apply_edit(new, e)
                new = new.to(original.dtype)
                delta = (new.float() - original.float()).abs()
                data = tensor_bytes(new)
                assert len(data) == info.nbytes
                fh.seek(info.start)
                fh.write(data)
                applied.append(AppliedEdit(name, shard, int((delta > 0).sum()), float(delta.max()) if delta.numel()
                                           else 0.0))
            fh.flush()
            os.fsync(fh.fileno())
    if ckpt.index is not None:
        inputs[INDEX_NAME] = copy_hashing(ckpt.folder / INDEX_NAME, out / INDEX_NAME)
    return applied, inputs


def copy_side_files(ckpt: Checkpoint, out: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Copy tokenizer, templates, generation config, licences... verbatim; returns their sha256."""
    inputs = {}
    for rel in ckpt.side_files():
        src = ckpt.folder / rel
        if rel in skip or rel in GENERATED:
            inputs[rel] = sha256_file(src)
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        inputs[rel] = copy_hashing(src, dst)
        shutil.copymode(src, dst)
    return inputs
