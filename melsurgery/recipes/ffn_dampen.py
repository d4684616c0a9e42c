"""Dampen the FFN neurons that write the massive activation at the ME Layer (down-projection columns)."""

from __future__ import annotations

from ..architectures import Family
from ..errors import UserError
from . import Edit, RecipePlan, require_me

DEFAULTS = {"factor": 0.2, "neurons": None}


def plan(scan: dict, family: Family, config: dict, params: dict) -> RecipePlan:
    p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    me = require_me(scan)
    neurons = tuple(int(n) for n in (p["neurons"] or [n["neuron"] for n in scan.get("ffn_neurons", [])]))
    if not neurons:
        raise UserError("the scan names no FFN neurons writing the massive dims; pass --neurons")
    a = float(p["factor"])
    edit = Edit(family.down_tensor(me), a, axis=1, index=neurons, why=f"ffn-dampen x{a:g}")
    summary = f"ffn-dampen: FFN neurons {list(neurons)} of layer {me} (down-projection columns) scaled by {a:g}"
    return RecipePlan("ffn-dampen", {**p, "neurons": list(neurons), "layer": me}, summary, [edit])
