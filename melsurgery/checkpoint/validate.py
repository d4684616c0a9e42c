"""The one entry check every command makes on a model folder before any work.

`open_model` reads only safetensors headers (pickles are never opened), checks the config's sizes are
positive integers, and builds the model's skeleton on the meta device to compare every tensor shape
the config implies with the shapes the weights declare. A config that disagrees with its weights
(hidden size, head counts, layer count, a norm of shape [0]) is refused in one line here, instead of
surfacing later as a shape error deep inside a forward pass.

The skeleton's shapes are a function of config.json's bytes and the transformers and melsurgery versions, so
they are cached under those and the weights' tensor names (`shapes/` in melsurgery's cache): importing the
model's code and building it is most of what a patch costs once its bytes are cloned, and scan, patch and
verify of one model build the same skeleton. The cache is only ever an answer transformers gave before, used
as proof only when the entry records that it was built for this config, these versions and these tensor names
and holds a shape for every tensor; anything else (unreadable, mistyped, partial, another model's, a
disagreement with the weights) is built again.
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
from melsurgery.checkpoint.guard import cache_folder
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import from_config, load_config
from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import read_bytes
from melsurgery.formats.wording import count
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


Shapes = dict[str, tuple[int, ...]]
MAX_SIZE = 2**31 - 1  # no real size comes near; a larger one would size lists and tensors by it
# Decoder layers a config may claim: several times the deepest published decoders. Building the skeleton costs
# about 10 ms a layer, so a small header naming tens of thousands of one-byte layers ran for minutes.
MAX_LAYERS = 1024


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
    if config["num_hidden_layers"] > MAX_LAYERS:
        raise UserError(f"{where}: num_hidden_layers is {config['num_hidden_layers']:,}; melsurgery reads decoders "
                        f"of at most {MAX_LAYERS:,} layers")
    window = config.get("sliding_window")  # 0 or null: no sliding window (Qwen2-MoE configs say 0)
    if window is not None and not (_is_size(window) or window == 0):
        raise UserError(f"{where}: sliding_window must be a non-negative integer or null, got {quote(window)}")
    eps = config.get("rms_norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps)
                            or eps < 0):
        raise UserError(f"{where}: rms_norm_eps must be a finite non-negative number, got {quote(eps)}")
    bad = _nonfinite_number(config)
    if bad is not None:
        raise UserError(f"{where}: {quote(bad[0])} is {bad[1]}; a config holds finite numbers only")
    for rope in (config, config.get("rope_parameters"), config.get("rope_scaling")):
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0):
            raise UserError(f"{where}: rope_theta must be a positive number, got {quote(theta)}")


def _nonfinite_number(config: dict) -> tuple[str, float] | None:
    """The first NaN or infinity anywhere in a parsed config (JSON allows them as NaN and Infinity), with its key
    path: a NaN rope_theta computed NaN rotations, and the forward pass blamed the dtype. Walked with a stack, not
    recursion: a config nested as deep as the JSON parser allows must not overflow here."""
    stack: list[tuple[str, object]] = [("", config)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, value
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((f"{path}.{key}" if path else str(key), item) for key, item in items)
    return None


def _skeleton_shapes(ckpt: Checkpoint, actual: Shapes, fresh: bool = False) -> tuple[Shapes, bool]:
    """Parameter shapes of the model transformers builds from config.json, and whether they came from the cache
    (`fresh`: built, whatever the cache holds; the built answer replaces the entry)."""
    key = _skeleton_key(ckpt.folder / "config.json", actual)
    path = cache_folder("shapes") / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}.json"
    shapes = None if fresh else _read_shapes(path, key, actual)
    if shapes is not None:
        return shapes, True
    shapes = _build_shapes(ckpt)
    _write_shapes(path, key, shapes)
    return shapes, False


def _skeleton_key(config: Path, actual: Shapes) -> dict[str, str]:
    """What a cached skeleton must have been built for to answer for this model: config.json's bytes, the versions
    that build it, and the tensor names of the weights it is compared with (an entry of another model with the
    same config, or of a subset of these weights, is another key)."""
    digest = hashlib.sha256
    return {"config": digest(read_bytes(config, "the model config")).hexdigest(),
            "tensors": digest("\n".join(sorted(actual)).encode()).hexdigest(),
            "transformers": version("transformers"), "melsurgery": __version__}


def _read_shapes(path: Path, key: dict[str, str], actual: Shapes) -> Shapes | None:
    """A cached skeleton used as proof only when it is well-typed, records that it was built for `key`, and has
    a shape for every tensor of the weights; None otherwise (it is built again)."""
    try:
        data = json.loads(read_bytes(path, "a cached skeleton"))
    except (UserError, ValueError, RecursionError):
        return None
    shapes = data.get("shapes") if isinstance(data, dict) and data.get("for") == key else None
    if not isinstance(shapes, dict) or not shapes or not all(
            isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
            for v in shapes.values()):
        return None
    if not actual.keys() <= shapes.keys():  # a partial entry would leave the tensors it lacks unchecked
        return None
    return {str(k): tuple(v) for k, v in shapes.items()}


def _write_shapes(path: Path, key: dict[str, str], shapes: Shapes) -> None:
    """Cache a skeleton with what it was built for (whole or not at all); a cache that cannot be written only costs
    the next build. The temporary file is created new (O_EXCL: never a file or link someone left under that
    name)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"for": key, "shapes": {k: list(v) for k, v in shapes.items()}}))
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
    actual = _actual_shapes(ckpt, family, pattern)
    expected, cached = _skeleton_shapes(ckpt, actual)
    if cached and _mismatch(expected, actual):
        expected, _ = _skeleton_shapes(ckpt, actual, fresh=True)  # a cached entry is never the reason for a refusal
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


def _actual_shapes(ckpt: Checkpoint, family: Family, pattern: re.Pattern) -> Shapes:
    """Every tensor's shape as the model holds it: each layer's tensors renamed to module paths and, in MoE layers,
    per-expert tensors stacked. One pass over the names (a header naming thousands of layers stays linear)."""
    actual: Shapes = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, info in ckpt.tensors.items():
        m = pattern.match(name)
        if m and m[0] == family.prefix(int(m[1])):
            layers.setdefault(int(m[1]), {})[name[m.end():]] = torch.empty(info.shape, device="meta")
        else:
            actual[name] = info.shape
    for i, layer in sorted(layers.items()):
        try:
            stacked = family.module_state(layer)
        except RuntimeError:
            raise UserError(f"{ckpt.folder}: the experts of layer {i} have different shapes") from None
        actual.update({family.prefix(i) + k: tuple(t.shape) for k, t in stacked.items()})
    return actual


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
