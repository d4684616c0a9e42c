"""Finding the Massive Emergence Layer in calibration statistics: pure functions, no model needed.

What is massive, what persists and what the sink is are defined once, in `melsurgery.measure`. Layers
before the ME Layer whose entries reach `abs_threshold` and `precursor_ratio` x median are
*precursors*: large, but they do not persist.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from melsurgery.calibrate.stats import Entry, LayerStats, Stats
from melsurgery.measure.definitions import find_massive, sink, sink_rate
from melsurgery.params import DetectParams

ATTRIBUTION_KEYS = ("dim", "value", "input", "mixer", "attn_write", "ffn_write", "ffn_norm_weight")


@dataclass
class Detection:
    """What detection concluded from the statistics: ME Layer, massive dims and tokens, attribution."""

    me_layer: int | None
    massive_dims: list[int] = field(default_factory=list)
    massive_tokens: list[dict] = field(default_factory=list)  # {sample, pos, token}
    token_summary: list[dict] = field(default_factory=list)  # {pos, token, count}
    top_dims: list[dict] = field(default_factory=list)  # dims of the massive tokens by mean |h| at the ME layer
    massive_layers: list[int] = field(default_factory=list)
    persist_until: int | None = None
    precursors: list[dict] = field(default_factory=list)
    sink: list[float | None] = field(default_factory=list)  # per decoder layer
    sink_rate: list[float | None] = field(default_factory=list)  # per decoder layer
    ffn_neurons: list[dict] = field(default_factory=list)
    dims_attribution: list[dict] = field(default_factory=list)
    norm: dict = field(default_factory=dict)
    selector_threshold: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready data: the scan JSON's detection fields are exactly these."""
        return asdict(self)


def detect(stats: Stats, p: DetectParams | None = None) -> Detection:
    """Locate the ME Layer and explain it from recorded statistics."""
    p = p or DetectParams()
    decoder = [layer for layer in stats.layers if layer.index >= 0]
    n = len(decoder)
    found = find_massive(decoder, p)
    me, persistent, sets = found.me_layer, found.persistent, found.per_layer
    massive_layers = [layer.index for layer, s in zip(decoder, sets) if s]
    precursors = _precursors(decoder[: me if me is not None else n], stats, p)
    if me is None:
        return Detection(None, massive_layers=massive_layers, precursors=precursors)

    keys = set(persistent)
    until = me
    while until + 1 < n and keys & set(sets[until + 1]):
        until += 1
    dims = sorted({d for _, _, d in keys}, key=lambda d: -max(abs(v) for k, v in persistent.items() if k[2] == d))
    tokens = found.tokens
    det = Detection(
        me,
        massive_dims=dims,
        massive_tokens=[{"sample": s, "pos": q, "token": _token(stats, s, q)} for s, q in tokens],
        token_summary=_token_summary(stats, tokens),
        top_dims=_top_dims(decoder[me], set(tokens)),
        massive_layers=massive_layers,
        persist_until=until,
        precursors=precursors,
        sink=[sink(layer, tokens) for layer in decoder],
        sink_rate=[sink_rate(layer, tokens) for layer in decoder],
        selector_threshold=_selector_threshold(decoder[me : until + 1], set(tokens), dims),
    )
    _explain(det, decoder[me], p)
    return det


def _token(stats: Stats, sample: int, pos: int) -> str:
    try:
        return stats.samples[sample].tokens[pos]
    except IndexError:
        return "?"


def _token_summary(stats: Stats, tokens: list[tuple[int, int]]) -> list[dict]:
    counts = Counter((q, _token(stats, s, q)) for s, q in tokens)
    return [{"pos": q, "token": t, "count": c} for (q, t), c in counts.most_common()]


def _top_dims(layer: LayerStats, tokens: set[tuple[int, int]], limit: int = 8) -> list[dict]:
    """Dims of the massive tokens at the ME layer, by mean |h| over those tokens (WeMask's top-k)."""
    acc: dict[int, list[float]] = {}
    for e in layer.top:
        if (e.sample, e.pos) in tokens:
            acc.setdefault(e.dim, []).append(abs(e.value))
    ranked = sorted(acc.items(), key=lambda kv: -sum(kv[1]) / len(tokens))
    return [{"dim": d, "mean_abs": sum(v) / len(tokens), "tokens": len(v)} for d, v in ranked[:limit]]


def _selector_threshold(layers: list[LayerStats], tokens: set[tuple[int, int]], dims: list[int]) -> float:
    """A magnitude that separates massive tokens from all others in the massive dims.

    The geometric mean of the smallest massive value and an upper bound on every other token's
    value (an entry absent from a layer's top list is at most that list's smallest value).
    """
    dimset = set(dims)
    lo, hi = math.inf, 0.0
    for layer in layers:
        per_token: dict[tuple[int, int], float] = {}
        for e in layer.top:
            if e.dim in dimset:
                key = (e.sample, e.pos)
                per_token[key] = max(per_token.get(key, 0.0), abs(e.value))
        for key, v in per_token.items():
            if key in tokens:
                lo = min(lo, v)
            else:
                hi = max(hi, v)
        missing = tokens - set(per_token)
        if missing:  # a massive token fell off the list: its value is at most the list's minimum
            lo = min(lo, min(abs(e.value) for e in layer.top))
        hi = max(hi, min((abs(e.value) for e in layer.top), default=0.0))
    return math.sqrt(lo * max(hi, 1e-6))


def _precursors(layers: list[LayerStats], stats: Stats, p: DetectParams) -> list[dict]:
    out = []
    for layer in layers:
        floor = max(p.abs_threshold, p.precursor_ratio * layer.median_abs)
        big = [e for e in layer.top if abs(e.value) >= floor]
        if big:
            e = max(big, key=lambda x: abs(x.value))
            out.append({
                "layer": layer.index,
                "dim": e.dim,
                "value": e.value,
                "ratio": abs(e.value) / layer.median_abs if layer.median_abs else math.inf,
                "dims": sorted({x.dim for x in big}),
                "tokens": len({(x.sample, x.pos) for x in big}),
                "example_token": _token(stats, e.sample, e.pos),
                "example_pos": e.pos,
            })
    return out


def _explain(det: Detection, layer: LayerStats, p: DetectParams) -> None:
    """Fill attribution figures for the massive dims from the ME layer's attribution record."""
    att = layer.attribution or {}
    by_dim = {r["dim"]: r for r in att.get("dims", [])}
    neurons: dict[tuple, dict] = {}
    for d in det.massive_dims:
        rec = by_dim.get(d)
        if rec is None:
            continue
        det.dims_attribution.append({k: rec[k] for k in ATTRIBUTION_KEYS})
        for n in rec["neurons"]:
            if abs(n["share"]) < p.min_neuron_share:
                continue
            key = (n.get("expert"), n["neuron"])  # MoE: neuron j of two experts are different neurons
            cur = neurons.get(key)
            if cur is None or abs(n["contribution"]) > abs(cur["contribution"]):
                other = n["activation_other_max"]
                # JSON has no infinity: a neuron silent everywhere else gets selectivity None
                neurons[key] = {**n, "dim": d, "selectivity": abs(n["activation_massive"]) / other if other else None}
    det.ffn_neurons = sorted(neurons.values(), key=lambda n: -abs(n["contribution"]))
    if att:
        det.norm = {
            "ffn_norm_role": att.get("ffn_norm_role", "input"),
            "ffn_norm_scale_massive": att["ffn_norm_scale_massive"],
            "ffn_norm_scale_other_median": att["ffn_norm_scale_other_median"],
            "ffn_norm_weight_mean": att["ffn_norm_weight_mean"],
            "ffn_norm_weight_on_dims": {str(r["dim"]): r["ffn_norm_weight"] for r in det.dims_attribution},
        }


def entry_dict(e: Entry, stats: Stats) -> dict:
    """An entry as it appears in the scan JSON, with its token string."""
    return {"sample": e.sample, "pos": e.pos, "token": _token(stats, e.sample, e.pos), "dim": e.dim, "value": e.value}
