"""Finding the Massive Emergence Layer in calibration statistics: pure functions, no model needed.

Definitions (all thresholds in `DetectParams`):
- An entry h[sample, pos, dim] of a layer's output is *massive* when |h| >= `abs_threshold` and
  |h| >= `ratio` x the median |h| of that layer's output.
- A massive entry of layer l *persists* when the same (sample, pos, dim) is massive in each of the next
  ceil(`persist_fraction` x (L - 1 - l)) layers, L the number of decoder layers (at least one).
- The *ME Layer* is the first decoder layer with a persisting massive entry; its persisting entries
  give the massive tokens and dims. Layers before it whose entries reach `abs_threshold` and
  `precursor_ratio` x median are *precursors*: large, but they do not persist.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from .calibrate import Entry, LayerStats, Stats

ATTRIBUTION_KEYS = ("dim", "value", "input", "attn_write", "ffn_write", "ffn_norm_weight")


@dataclass(frozen=True)
class DetectParams:
    abs_threshold: float = 100.0
    ratio: float = 1000.0
    persist_fraction: float = 0.5
    precursor_ratio: float = 100.0
    min_neuron_share: float = 0.05


@dataclass
class Detection:
    me_layer: int | None
    massive_dims: list[int] = field(default_factory=list)
    massive_tokens: list[dict] = field(default_factory=list)  # {sample, pos, token}
    token_summary: list[dict] = field(default_factory=list)  # {pos, token, count}
    top_dims: list[dict] = field(default_factory=list)  # dims of the massive tokens by mean |h| at the ME layer
    massive_layers: list[int] = field(default_factory=list)
    persist_until: int | None = None
    precursors: list[dict] = field(default_factory=list)
    sink: list[float | None] = field(default_factory=list)  # per decoder layer
    ffn_neurons: list[dict] = field(default_factory=list)
    dims_attribution: list[dict] = field(default_factory=list)
    norm: dict = field(default_factory=dict)
    selector_threshold: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def massive_keys(layer: LayerStats, p: DetectParams) -> dict[tuple[int, int, int], float]:
    floor = max(p.abs_threshold, p.ratio * layer.median_abs)
    return {(e.sample, e.pos, e.dim): e.value for e in layer.top if abs(e.value) >= floor}


def required_persistence(layer: int, num_layers: int, p: DetectParams) -> int:
    return max(1, math.ceil(p.persist_fraction * (num_layers - 1 - layer)))


def detect(stats: Stats, p: DetectParams | None = None) -> Detection:
    """Locate the ME Layer and explain it from recorded statistics."""
    p = p or DetectParams()
    decoder = [layer for layer in stats.layers if layer.index >= 0]
    n = len(decoder)
    sets = [massive_keys(layer, p) for layer in decoder]
    massive_layers = [layer.index for layer, s in zip(decoder, sets) if s]
    me, persistent = None, {}
    for i, current in enumerate(sets):
        if not current or i == n - 1:
            continue
        need = required_persistence(i, n, p)
        keep = {k: v for k, v in current.items() if all(k in sets[j] for j in range(i + 1, min(n, i + 1 + need)))}
        if i + need < n and keep:
            me, persistent = i, keep
            break
    precursors = _precursors(decoder[: me if me is not None else n], stats, p)
    if me is None:
        return Detection(None, massive_layers=massive_layers, precursors=precursors)

    keys = set(persistent)
    until = me
    while until + 1 < n and keys & set(sets[until + 1]):
        until += 1
    dims = sorted({d for _, _, d in keys}, key=lambda d: -max(abs(v) for k, v in persistent.items() if k[2] == d))
    tokens = sorted({(s, q) for s, q, _ in keys})
    det = Detection(
        me,
        massive_dims=dims,
        massive_tokens=[{"sample": s, "pos": q, "token": _token(stats, s, q)} for s, q in tokens],
        token_summary=_token_summary(stats, tokens),
        top_dims=_top_dims(decoder[me], set(tokens)),
        massive_layers=massive_layers,
        persist_until=until,
        precursors=precursors,
        sink=sink_scores(decoder, tokens),
        selector_threshold=_selector_threshold(decoder[me : until + 1], set(tokens), dims),
    )
    _explain(det, decoder[me], p)
    return det


def sink_scores(decoder: list[LayerStats], tokens: list[tuple[int, int]]) -> list[float | None]:
    """Per layer: mean attention that later queries pay to the massive tokens, averaged over heads."""
    out: list[float | None] = []
    for layer in decoder:
        vals = [layer.key_attention[s][q] for s, q in tokens if layer.key_attention and q < len(layer.key_attention[s])]
        vals = [v for v in vals if not math.isnan(v)]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


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
    return {"sample": e.sample, "pos": e.pos, "token": _token(stats, e.sample, e.pos), "dim": e.dim, "value": e.value}
