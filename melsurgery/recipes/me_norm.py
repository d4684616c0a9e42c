"""Shrink the FFN-input RMSNorm weight of the ME Layer toward its mean: g <- mean + a (g - mean).

The RMSNorm's per-dim weight decides which residual dims reach the writing neurons; flattening it
weakens the pathway that creates the massive value. `--dims` restricts the shrink to chosen dims.
Where the FFN has no input norm (OLMo 2), its output norm is the one that sets, per dim, how much the
FFN writes into the residual, and it is the one rescaled (`Family.me_norm`).
"""

from __future__ import annotations

from melsurgery.architectures import Family
from melsurgery.checkpoint.edits import Edit
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.params import Param
from melsurgery.recipes.base import RecipePlan, require_me

NAME = "me-norm"
FOLDS = True
PARAMS = (Param("factor", "float", 0.5, "me-norm: shrink factor toward the mean (1 leaves the weight).",
                flag="--me-norm-factor", low=0.0, high=1.0,
                neutral=1.0),
          Param("dims", "int_list", None, "me-norm: restrict the shrink to these dims (manifest only).", low=0))


def plan(scan: ScanResult, family: Family, config: dict, params: dict) -> RecipePlan:
    """The ME Layer's FFN-norm weight shrunk toward its mean (the scan's figure), all dims or some."""
    p = params
    me = require_me(scan)
    mean = scan.norm.ffn_norm_weight_mean if scan.norm else None
    if mean is None:
        raise UserError("the scan carries no FFN-norm statistics for the ME Layer; rerun scan")
    a = float(p["factor"])
    dims = tuple(int(d) for d in p["dims"]) if p["dims"] else None
    edit = Edit(family.me_norm_tensor(me), a, shift=(1 - a) * float(mean), axis=0, index=dims,
                offset=family.norm_offset, why=f"me-norm x{a:g}")
    where = f"dims {list(dims)}" if dims else "all dims"
    summary = (f"me-norm: FFN-{family.me_norm_role} RMSNorm weight of layer {me} ({where}) shrunk toward its mean "
               f"{mean:.4g} by {a:g}")
    return RecipePlan("me-norm", {**p, "layer": me, "mean": mean}, summary, [edit])
