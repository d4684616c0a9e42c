"""Dampen the FFN neurons that write the massive activation at the ME Layer (down-projection columns).

In an MoE layer a neuron belongs to an expert, and its column lies in that expert's down projection
(in the checkpoint each expert has its own); a shared expert (Qwen2-MoE) is named "shared".
"""

from __future__ import annotations

from melsurgery.architectures import Family
from melsurgery.checkpoint.edits import Edit
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError, quote
from melsurgery.params import Param, expert_id
from melsurgery.recipes.base import RecipePlan, require_me

NAME = "ffn-dampen"
FOLDS = True
PARAMS = (Param("factor", "float", 0.2, "ffn-dampen: factor on the neurons' down-projection columns.",
                flag="--dampen", low=0.0, high=1.0,
                neutral=1.0),
          Param("neurons", "neurons", None, "ffn-dampen: explicit neurons (E:J for expert E of a mixture of experts, "
                "shared:J for a shared expert).",
                flag="--neurons"))

Neuron = tuple[int | str | None, int]


def _expert(e: object) -> int | str | None:
    return None if e is None else expert_id(e)


def parse_neuron(n: object) -> Neuron:
    """A neuron as (expert, "shared" or None; index), from 41, "41", "3:41", "shared:41" or [3, 41]."""
    try:
        if isinstance(n, list | tuple) and len(n) == 2:
            return _expert(n[0]), int(n[1])
        if isinstance(n, str) and ":" in n:
            e, j = n.split(":")
            return _expert(e), int(j)
        return None, int(n)  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError):
        raise UserError(f"--neurons: cannot read {quote(n)}; use 41, or expert:neuron like 3:41 or shared:41 in MoE "
                        "layers") from None


def plan(scan: ScanResult, family: Family, config: dict, params: dict) -> RecipePlan:
    """The down-projection columns of the scan's FFN neurons (or --neurons) of the ME Layer, scaled."""
    p = params
    me = require_me(scan)
    found = [(n.expert, n.neuron) for n in scan.ffn_neurons]
    neurons = list(dict.fromkeys(parse_neuron(n) for n in (p["neurons"] or found)))
    if not neurons:
        att = scan.dims_attribution
        if att and all(abs(d.attn_write) > abs(d.ffn_write) for d in att):
            mixer = att[0].mixer
            raise UserError(f"the {mixer} mixer of layer {me}, not its FFN, writes the massive dims: ffn-dampen has "
                            "no FFN neurons to dampen (wemask and norm-rescale act downstream of it)")
        raise UserError("the scan names no FFN neurons writing the massive dims; pass --neurons")
    a = float(p["factor"])
    by_expert: dict[int | str | None, list[int]] = {}
    for e, j in neurons:
        by_expert.setdefault(e, []).append(j)
    edits = [Edit(family.down_tensor(me, e), a, axis=1, index=tuple(js), why=f"ffn-dampen x{a:g}")
             for e, js in by_expert.items()]
    moe = any(e is not None for e, _ in neurons)
    names = ", ".join(f"{e}:{j}" if e is not None else str(j) for e, j in neurons)
    summary = (f"ffn-dampen: FFN neurons {'(expert:neuron) ' if moe else ''}{names} of layer {me} "
               f"(down-projection columns) scaled by {a:g}")
    listed = [j if e is None else [e, j] for e, j in neurons]
    return RecipePlan("ffn-dampen", {**p, "neurons": listed, "layer": me}, summary, edits)
