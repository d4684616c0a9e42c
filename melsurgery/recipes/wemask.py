"""WeMask (Shi et al. 2026): mask dims of the massive tokens in the attention input.

Token-selective, so it cannot fold into weights: the patched checkpoint carries a custom layer
(a forward hook on the attention-input norm of the chosen layers, or a pre-hook on the attention
where the family has no such norm) configured from config.json. Everything it needs per layer (the
selector threshold, the dims, the strength, the replacement values) comes from the scan result, so
planning is a pure function of it; `install` applies a plan's spec to a model in memory.
"""

from __future__ import annotations

from melsurgery.architectures import Family
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.formats.wording import dims_by_layer, layers_text
from melsurgery.params import ATTN_DIMS, Param
from melsurgery.recipes.base import RecipePlan, WeMaskLayer, WeMaskSpec, attention_layers, layer_dims, require_me

NAME = "wemask"
FOLDS = False
PARAMS = (*ATTN_DIMS,
          Param("strength", "float", 1.0, "wemask: 1 replaces the dims, 0.5 moves them halfway.", flag="--strength",
                low=0.0, high=1.0, neutral=0.0),
          Param("strength_end", "float", None, "wemask: strength at the last masked layer, interpolated linearly "
                "in the layer index from --strength at the first.", flag="--strength-end", low=0.0, high=1.0,
                same_as="strength", neutral=0.0),
          Param("selector", "choice", "magnitude", "wemask: which tokens are masked.", flag="--selector",
                choices=("magnitude", "first")),
          Param("replace", "choice", "zero", "wemask: replace the dims by zero or by the mean attention input of "
                "the ordinary tokens at that layer (from calibration).", flag="--replace", choices=("zero", "mean")))


def _strengths(layers: tuple[int, ...], start: float, end: float | None) -> list[float]:
    if end is None or len(layers) == 1:
        return [start] * len(layers)
    lo, hi = layers[0], layers[-1]
    return [start + (end - start) * (i - lo) / (hi - lo) for i in layers]


def plan(scan: ScanResult, family: Family, config: dict, params: dict) -> RecipePlan:
    """The custom-layer spec: per layer after the ME Layer, which dims to mask, by how much, on which tokens."""
    p = params
    me = require_me(scan)
    layers = attention_layers(p["layers"], me, family, config, "wemask")
    if any(i <= me for i in layers):
        raise UserError(f"wemask acts on layers after the ME Layer ({me}); got {list(layers)}")
    thresholds: dict[int, float | None] = dict.fromkeys(layers)
    skipped: list[int] = []
    if p["selector"] == "magnitude":
        selectors = {s.layer: s for s in scan.selector_layers}
        thresholds = {i: selectors[i].threshold if i in selectors else None for i in layers}
        skipped = [i for i in layers if thresholds[i] is None]
        if len(skipped) == len(layers):
            worst = selectors.get(layers[0])
            lo, hi = (worst.massive_min, worst.others_max) if worst else (0, 0)
            raise UserError(
                f"wemask: the magnitude selector would select no token on the calibration set at layers "
                f"{list(layers)}: the massive tokens do not stand out in the residual entering them (smallest "
                f"massive {lo:,.1f} vs others up to {hi:,.1f} at layer {layers[0]}); choose other --layers or "
                "--selector first")
        layers = tuple(i for i in layers if i not in skipped)
    means = {m.layer: m.mean for m in scan.ordinary_mean} if p["replace"] == "mean" else {}
    if p["replace"] == "mean" and any(i not in means for i in layers):
        raise UserError(f"wemask --replace mean: the scan has no ordinary-token mean for layers "
                        f"{[i for i in layers if i not in means]}; rerun scan")
    dims_of = layer_dims(scan, p, "wemask")
    per_layer = []
    for i, strength in zip(layers, _strengths(layers, float(p["strength"]), p["strength_end"])):
        dims = dims_of(i)
        values = tuple(float(means[i][d]) for d in dims) if means else None
        per_layer.append(WeMaskLayer(i, dims, strength, thresholds[i], values))
    spec = WeMaskSpec.for_family(family, tuple(per_layer), selector=p["selector"], selector_dims=scan.massive_dims,
                                 replace=p["replace"])
    return RecipePlan("wemask", {**p, "layers": list(layers), "dims": _dims_param(per_layer)}, _summary(spec, skipped),
                      wemask=spec, folds=False)


def _dims_param(per_layer: list[WeMaskLayer]) -> list[int] | dict[str, list[int]]:
    """The dims for provenance: one list when every layer masks the same dims, else per layer."""
    if len({m.dims for m in per_layer}) == 1:
        return list(per_layer[0].dims)
    return {str(m.layer): list(m.dims) for m in per_layer}


def _summary(spec: WeMaskSpec, skipped: list[int]) -> str:
    which = "the first token"
    if spec.selector == "magnitude":
        which = "tokens whose residual exceeds the layer's calibrated threshold"
    dims = dims_by_layer({m.layer: m.dims for m in spec.per_layer})
    strengths = sorted({m.strength for m in spec.per_layer})
    how = "set to the ordinary tokens' mean" if spec.replace == "mean" else "zeroed"
    amount = (f"strength {strengths[0]:g}" if len(strengths) == 1
              else f"strength {spec.per_layer[0].strength:g} to {spec.per_layer[-1].strength:g}")
    text = f"WeMask: in the attention input, {dims}: those of {which} {how} ({amount})"
    if skipped:
        text += f"; {layers_text(skipped)} left alone: the massive tokens do not stand out there on calibration text"
    return text


def install(model, spec: WeMaskSpec) -> list:
    """Apply a spec to a loaded model in memory (the custom layer's own hooks); remove the handles to undo."""
    from melsurgery.engines.modeling_melsurgery import apply_wemask

    return apply_wemask(model, spec.to_config())
