"""Scale attention-input dims for all tokens, folded into the attention-input norm weight.

Where a family has no attention-input norm the same scaling folds into the q/k/v input columns.
"""

from __future__ import annotations

from melsurgery.architectures import Family
from melsurgery.checkpoint.edits import Edit
from melsurgery.detect.scan_result import ScanResult
from melsurgery.formats.wording import dims_by_layer
from melsurgery.params import ATTN_DIMS, Param
from melsurgery.recipes.base import RecipePlan, attention_layers, layer_dims, require_me

NAME = "norm-rescale"
FOLDS = True
PARAMS = (*ATTN_DIMS,
          Param("factor", "float", 0.5, "norm-rescale: factor on the dims' norm weight.", flag="--norm-factor",
                low=0.0, high=1.0, neutral=1.0))


def plan(scan: ScanResult, family: Family, config: dict, params: dict) -> RecipePlan:
    """The chosen attention-input dims of the chosen layers, scaled for every token, folded into weights."""
    p = params
    me = require_me(scan)
    layers = attention_layers(p["layers"], me, family, config, "norm-rescale")
    dims_of = layer_dims(scan, p, "norm-rescale")
    per_layer = {i: dims_of(i) for i in layers}
    a = float(p["factor"])
    why = f"norm-rescale x{a:g}"
    edits = []
    for i, dims in per_layer.items():
        if family.attn_norm is not None:
            edits.append(Edit(family.attn_norm_tensor(i), a, axis=0, index=dims, offset=family.norm_offset, why=why))
        else:
            edits.extend(Edit(t, a, axis=1, index=dims, why=why) for t in family.attn_input_tensors(i))
    same = len(set(per_layer.values())) == 1
    dims_param = list(per_layer[layers[0]]) if same else {str(i): list(d) for i, d in per_layer.items()}
    which = dims_by_layer(per_layer) if same else f"each layer's sink-driving dims ({dims_by_layer(per_layer)})"
    summary = f"norm-rescale: attention-input {which} scaled by {a:g} for all tokens"
    return RecipePlan("norm-rescale", {**p, "layers": list(layers), "dims": dims_param}, summary, edits)
