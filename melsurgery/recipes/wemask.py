"""WeMask (Shi et al. 2026): zero the top massive dims of the massive tokens in the attention input.

Token-selective, so it cannot fold into weights: the patched checkpoint carries a custom layer
(a forward hook on the attention-input norm of the chosen layers, or a pre-hook on the attention
where the family has no such norm) configured from config.json.
"""

from __future__ import annotations

from ..architectures import Family
from ..errors import UserError
from . import RecipePlan, WeMaskSpec, attention_layers, pick_dims, require_me
from .params import ATTN_DIMS, Param

NAME = "wemask"
FOLDS = False
PARAMS = (*ATTN_DIMS,
          Param("strength", "float", 1.0, "wemask: 1 zeroes the dims, 0.5 halves them.", flag="--strength",
                low=0.0, high=1.0),
          Param("selector", "choice", "magnitude", "wemask: which tokens are masked.", flag="--selector",
                choices=("magnitude", "first")))


def plan(scan: dict, family: Family, config: dict, params: dict) -> RecipePlan:
    p = params
    me = require_me(scan)
    layers = attention_layers(p["layers"], me, family, config, "wemask")
    if any(i <= me for i in layers):
        raise UserError(f"wemask acts on layers after the ME Layer ({me}); got {list(layers)}")
    dims = pick_dims(scan, p["top_k"], p["dims"], p["mask_ratio"])
    threshold = scan.get("selector_threshold")
    if p["selector"] == "magnitude" and not threshold:
        raise UserError("the scan has no selector threshold; rerun scan or use --selector first")
    spec = WeMaskSpec(layers, dims, float(p["strength"]), p["selector"], tuple(scan["massive_dims"]),
                      float(threshold) if threshold else None, norm=family.attn_norm, attn=family.attn,
                      layers_module=family.layers_module)
    which = "the first token"
    if p["selector"] == "magnitude":
        which = "tokens whose residual exceeds the calibrated threshold"
    summary = (f"WeMask: in the attention input of layers {list(layers)}, dims {list(dims)} of {which} "
               f"scaled by {1 - spec.strength:g}")
    return RecipePlan("wemask", {**p, "layers": list(layers), "dims": list(dims)}, summary, wemask=spec, folds=False)
