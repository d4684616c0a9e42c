"""The one entry check every command makes on a model folder before any work.

`open_model` reads only safetensors headers (pickles are never opened), checks the config's sizes are
positive integers, and builds the model's skeleton on the meta device to compare every tensor shape
the config implies with the shapes the weights declare. A config that disagrees with its weights
(hidden size, head counts, layer count, a norm of shape [0]) is refused in one line here, instead of
surfacing later as a shape error deep inside a forward pass.

The skeleton's shapes are a function of config.json's bytes and the transformers and melsurgery versions, so
they are cached under those (`shapes/` in melsurgery's cache): importing the model's code and building it is
most of what a patch costs once its bytes are cloned, and scan, patch and verify of one model build the same
skeleton. The cache is only ever an answer transformers gave before; an unreadable entry is built again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from melsurgery.architectures import WEMASK_KEY, Family, family_for, has_custom_layer
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import from_config, load_config
from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import read_bytes
from melsurgery.formats.wording import count
from melsurgery.outputs import cache_dir
from melsurgery.version import __version__

# Config sizes that must be positive integers when present (the first four always).
REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
OPTIONAL_SIZES = ("num_key_value_heads", "intermediate_size", "head_dim", "moe_intermediate_size", "num_experts",
                  "num_experts_per_tok", "max_position_embeddings")
# What transformers raises when a config it accepted cannot build a model.
_BUILD_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError, RuntimeError,
                 OverflowError, AssertionError)


def open_model(folder: Path) -> tuple[Checkpoint, Family]:
    """The checkpoint and its family, with config and tensor shapes proven consistent."""
    ckpt = Checkpoint(folder)
    family = family_for(ckpt.config)  # an unsupported architecture is named as such, whatever else it lacks
    check_config_types(ckpt.config, ckpt.folder / "config.json")  # before anything sizes a list by them
    check_shapes(ckpt, family)
    return ckpt, family


MAX_SIZE = 2**31 - 1  # no real size comes near; a larger one would size lists and tensors by it


def refuse_custom_layer(ckpt: Checkpoint, what: str) -> None:
    """scan and patch read weights, not a custom layer: a checkpoint that runs one would be measured (and planned)
    as its base model, so it is refused; its base model is what to scan and patch."""
    if has_custom_layer(ckpt.config):
        raise UserError(f"{ckpt.folder}: a melsurgery patch with a custom layer ({WEMASK_KEY}); {what} reads plain "
                        "weights and would measure it without the layer: give its base model, with every recipe "
                        "in one manifest")


def _is_size(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_SIZE


def check_config_types(config: dict, where: Path | str) -> None:
    """Every size is a positive integer and rms_norm_eps a finite non-negative number: one message per field."""
    for key in REQUIRED_SIZES:
        if key not in config:
            raise UserError(f"{where}: missing {quote(key)}; is this a complete model config?")
    for key in (*REQUIRED_SIZES, *OPTIONAL_SIZES):
        value = config.get(key)
        if (key in REQUIRED_SIZES or value is not None) and not _is_size(value):
            limit = " of at most 2^31 - 1" if isinstance(value, int) and value > MAX_SIZE else ""
            raise UserError(f"{where}: {key} must be a positive integer{limit}, got {quote(value)}")
    window = config.get("sliding_window")  # 0 or null: no sliding window (Qwen2-MoE configs say 0)
    if window is not None and not (_is_size(window) or window == 0):
        raise UserError(f"{where}: sliding_window must be a non-negative integer or null, got {quote(window)}")
    eps = config.get("rms_norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps)
                            or eps < 0):
        raise UserError(f"{where}: rms_norm_eps must be a finite non-negative number, got {quote(eps)}")


def _skeleton_shapes(ckpt: Checkpoint, fresh: bool = False) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Parameter shapes of the model transformers builds from config.json, and whether they came from the cache
    (`fresh`: built, whatever the cache holds; the built answer replaces the entry)."""
    path = _shapes_cache(ckpt.folder / "config.json")
    shapes = None if fresh else _read_shapes(path)
    if shapes is not None:
        return shapes, True
    shapes = _build_shapes(ckpt)
    _write_shapes(path, shapes)
    return shapes, False


def _shapes_cache(config: Path) -> Path:
    """Where the skeleton of this config.json is cached: named by its bytes and the versions that build it."""
    key = hashlib.sha256(read_bytes(config, "the model config") + f"|{version('transformers')}|{__version__}"
                         .encode()).hexdigest()
    return cache_dir() / "shapes" / f"{key}.json"


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """A cached skeleton, or None where there is none or it is not one (then it is built again)."""
    try:
        data = json.loads(read_bytes(path, "a cached skeleton"))
    except (UserError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
            for v in data.values()):
        return None
    return {str(k): tuple(v) for k, v in data.items()}


def _write_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Cache a skeleton (whole or not at all); a cache that cannot be written only costs the next build. The
    temporary file is created new (O_EXCL: never a file or link someone left under that name)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({k: list(v) for k, v in shapes.items()}))
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _build_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model transformers builds from config.json (on the meta device: no memory)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    where = ckpt.folder / "config.json"
    try:
        config = load_config(ckpt.folder)
        with torch.device("meta"):
            model = from_config(AutoModelForCausalLM, config, attn_implementation="eager")
    except (*_BUILD_ERRORS, StrictDataclassError) as exc:
        last = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: transformers cannot build a model from it ({last})") from None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_shapes(ckpt: Checkpoint, family: Family) -> None:
    """The layer count and every tensor shape the config implies match the weights' headers."""
    where = ckpt.folder / "config.json"
    n = ckpt.config["num_hidden_layers"]
    pattern = re.compile("^" + re.escape(family.layers).replace(r"\{i\}", r"(\d+)"))
    present = sorted({int(m[1]) for name in ckpt.names() if (m := pattern.match(name))})
    if len(present) != n or present != list(range(n)):
        held = f"layers {present[0]}-{present[-1]}" if present else "no decoder layers"
        raise UserError(f"{where}: num_hidden_layers is {n}, but the weights hold {held} "
                        f"({count(len(present), 'layer')}); fix the config or re-download the checkpoint")
    actual = {name: info.shape for name, info in ckpt.tensors.items()}
    for i in range(n):  # MoE: per-expert tensors as the model holds them (stacked), compared stacked
        prefix = family.prefix(i)
        layer = {k[len(prefix):]: torch.empty(s, device="meta") for k, s in actual.items() if k.startswith(prefix)}
        try:
            stacked = family.module_state(layer)
        except RuntimeError:
            raise UserError(f"{ckpt.folder}: the experts of layer {i} have different shapes") from None
        if stacked is not layer:
            actual = {k: s for k, s in actual.items() if not k.startswith(prefix)}
            actual.update({prefix + k: tuple(t.shape) for k, t in stacked.items()})
    expected, cached = _skeleton_shapes(ckpt)
    if cached and (_mismatch(expected, actual) or not expected.keys() & actual.keys()):
        expected, _ = _skeleton_shapes(ckpt, fresh=True)  # a cached entry is never the reason for a refusal
    bad = _mismatch(expected, actual)
    if bad:
        name, shape, want = bad
        raise UserError(
            f"{where} disagrees with the weights: {name} has shape {list(shape)}, but the config "
            f"(hidden_size {ckpt.config['hidden_size']}, heads {ckpt.config['num_attention_heads']}, ...) implies "
            f"{list(want)}; fix the config or re-download the checkpoint")
    for name in (family.embed, family.tensor(0, family.attn_norm) if family.attn_norm else None):
        if name is not None and name not in actual:
            raise UserError(f"{ckpt.folder}: the weights have no {name}")


def _mismatch(expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]]
              ) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """The first tensor whose shape differs from the skeleton's (name, actual, expected), or None."""
    for name, shape in actual.items():
        want = expected.get(name)
        if want is not None and tuple(want) != tuple(shape):
            return name, shape, want
    return None


def nonfinite(t: torch.Tensor) -> int:
    """How many entries of a tensor are NaN or infinite (0 for integer tensors)."""
    if not t.is_floating_point():
        return 0
    return int((~torch.isfinite(t)).sum())


def check_finite(t: torch.Tensor, name: str, where: Path | str) -> None:
    """A UserError naming the tensor and how many of its entries are NaN and infinite."""
    if nonfinite(t):
        nan = int(torch.isnan(t).sum())
        raise UserError(f"{where}: tensor {name} has {nan} NaN and {nonfinite(t) - nan} infinite entries "
                        f"(of {t.numel()}); the checkpoint is broken: re-download or re-export it")
