"""The attention input of each layer, as the wemask custom layer needs it: sink attribution, the mean
of ordinary tokens, and a magnitude threshold per layer.

Calibration records (`AttnInputRecorder`, while the layer runs) and the figures (`figures`, a pure
function of the records and the detection) are split, because the massive tokens are only known once
every layer has been seen. What is recorded per layer and sample:

- the sum of every token's attention input (for the mean of the ordinary tokens);
- for up to `CANDIDATES` *candidate* tokens (those whose residual entering the layer has an entry of
  at least `CANDIDATE_ABS` and `CANDIDATE_RATIO` x that residual's median, largest first: a superset
  of the massive tokens wherever they stand out) their attention input x_t and, for each pair of
  candidates (a, b), grad_{x_b}(mass on a) * x_b, where the *mass* on a token is the mean attention
  that later queries pay to it, averaged over heads (the figure behind the scan's sink).

Sink attribution of a layer (per dim): over the massive tokens t, the mean of
|x_t * grad_{x_t} (sum over the sample's massive tokens a of the mass on a)|. It is the first-order
estimate of what zeroing that dim of the massive tokens' attention input does to the sink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from melsurgery.architectures import Family, submodule

if TYPE_CHECKING:
    from melsurgery.calibrate.stats import LayerStats, Stats

# Entries at least this large (absolute, and times the median) mark a token that may be massive: they
# get an attribution record here and in ffn_attribution.py, so that any reasonable detection threshold finds
# its massive entries already recorded.
CANDIDATE_ABS = 50.0
CANDIDATE_RATIO = 50.0
CANDIDATES = 4  # per sample and layer
SINK_TOP = 16  # dims per layer kept in the scan result
OVERLAP_K = 3  # the magnitude top-k that the sink dims are compared with (wemask's default top-k)


@dataclass
class AttnInputRecord:
    """One layer's attention-input record (see the module docstring)."""

    count: int = 0
    total: torch.Tensor | None = None  # [D] float64: sum of every token's attention input
    positions: list[list[int]] = field(default_factory=list)  # per sample: candidate positions
    x: list[torch.Tensor] = field(default_factory=list)  # per sample: [c, D] attention input of candidates
    gx: list[torch.Tensor] = field(default_factory=list)  # per sample: [c, c, D] grad of mass on a wrt x_b, * x_b


def candidates(h: torch.Tensor, median: float) -> list[int]:
    """Positions of the tokens of one sample ([T, D] residual) that may be massive, largest first."""
    floor = max(CANDIDATE_ABS, CANDIDATE_RATIO * median)
    peak = h.abs().amax(-1).float()
    order = peak.argsort(descending=True)[:CANDIDATES]
    return [int(p) for p in order if peak[p] >= floor]


def _masses(weights: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Mean attention from strictly later queries to each position, averaged over heads ([1,H,T,T] in)."""
    a = weights[0].float().mean(0)
    T = a.shape[0]
    return torch.stack([a[p + 1 :, p].sum() / max(T - 1 - p, 1) for p in positions])


class AttnInputRecorder:
    """Hooks on one layer: its input picks the candidates of each sample (given the median of the
    residual entering the layer), its attention's input is recorded and differentiated."""

    def __init__(self, layer: nn.Module, family: Family, input_median: float) -> None:
        self.layer, self.attn = layer, submodule(layer, family.attn)
        self.median = input_median
        self.record = AttnInputRecord()
        self._pending: list[int] = []

    def hooks(self) -> list:
        """Install both pre-hooks and return their handles: the caller owns their lifetime (one layer pass)."""
        return [self.layer.register_forward_pre_hook(self._layer_hook, with_kwargs=True),
                self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)]

    def _layer_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        self._pending = candidates(h[0], self.median)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = (args[0] if args else kwargs["hidden_states"]).detach()
        rec, pos = self.record, self._pending
        rec.count += x.shape[1]
        s = x[0].double().sum(0).cpu()
        rec.total = s if rec.total is None else rec.total + s
        rec.positions.append(pos)
        rec.x.append(x[0, pos].float().cpu())
        if not pos:
            rec.gx.append(torch.zeros(0, 0, x.shape[-1]))
            return
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for p in module.parameters():  # gradients with respect to the input only
            p.requires_grad_(False)
        with torch.enable_grad():  # forward, not __call__: the other hooks on the attention must not fire
            xg = x.clone().requires_grad_(True)
            out = module.forward(xg, *args[1:], **rest) if args else module.forward(hidden_states=xg, **rest)
            masses = _masses(out[1], pos)
            eye = torch.eye(len(pos), dtype=masses.dtype, device=masses.device)
            (grads,) = torch.autograd.grad(masses, xg, grad_outputs=eye, is_grads_batched=True)
        rec.gx.append(grads[:, 0, pos].float().cpu() * rec.x[-1][None])


def _entry(stats: Stats, index: int) -> LayerStats:
    """The LayerStats of state `index` (-1: the embeddings, i: the output of layer i)."""
    return next(la for la in stats.layers if la.index == index)


def ordinary_mean(rec: AttnInputRecord, massive: set[tuple[int, int]]) -> list[float]:
    """Mean attention input of all tokens but the massive ones that stand out at this layer."""
    total, n = rec.total.clone(), rec.count
    for s, (positions, x) in enumerate(zip(rec.positions, rec.x)):
        for k, p in enumerate(positions):
            if (s, p) in massive:
                total -= x[k].double()
                n -= 1
    return (total / max(n, 1)).tolist()


def sink_attribution(rec: AttnInputRecord, massive: set[tuple[int, int]]) -> torch.Tensor | None:
    """[D] mean over the massive tokens of |x_t * grad_{x_t} sink| (see the module docstring)."""
    scores = []
    for s, (positions, gx) in enumerate(zip(rec.positions, rec.gx)):
        rows = [k for k, p in enumerate(positions) if (s, p) in massive]
        for b in rows:
            scores.append(gx[rows, b].sum(0).abs())
    return torch.stack(scores).mean(0) if scores else None


def selector_layer(layer: LayerStats, tokens: set[tuple[int, int]], dims: list[int]) -> dict:
    """Magnitude selector for the layer that reads `layer`'s output (a LayerStats).

    `massive_min`: the smallest max over `dims` of |h| among the massive tokens; `others_max`: an upper
    bound on the same figure for every other token (an entry absent from the recorded top list is at
    most the list's smallest value). Where massive_min > others_max the threshold is their geometric
    mean and selects exactly the massive tokens; otherwise there is none (the tokens do not stand out).
    """
    dimset = set(dims)
    per_token: dict[tuple[int, int], float] = {}
    for e in layer.top:
        if e.dim in dimset:
            key = (e.sample, e.pos)
            per_token[key] = max(per_token.get(key, 0.0), abs(e.value))
    floor = min((abs(e.value) for e in layer.top), default=0.0)
    lo = min((per_token.get(t, floor) for t in tokens), default=0.0)
    hi = max([floor] + [v for t, v in per_token.items() if t not in tokens])
    threshold = math.sqrt(lo * max(hi, 1e-6)) if lo > hi else None
    return {"threshold": threshold, "massive_min": lo, "others_max": hi,
            "selected": sum(per_token.get(t, 0.0) >= threshold for t in tokens) if threshold else 0,
            "massive_tokens": len(tokens)}


def figures(stats: Stats, me: int | None, tokens: list[tuple[int, int]], dims: list[int],
            magnitude_dims: list[int]) -> dict:
    """The scan's per-layer attention-input figures for the layers after the ME Layer (JSON-ready).

    `selector_layers`, `sink_dims` and `ordinary_mean` each hold one entry per layer i > ME (the layer
    whose attention input is meant), in order. `sink_dims[].overlap`: the share of the top-k sink dims
    (k = `OVERLAP_K`, or fewer magnitude dims where the scan ranks fewer) that are also among the
    magnitude top-k (`magnitude_dims`, the dims wemask masks by default); `*_top_share`: the share of the
    layer's sink attribution that each top-k captures.
    """
    if me is None:
        return {"selector_layers": [], "sink_dims": [], "ordinary_mean": [], "sink_dims_overlap": None,
                "sink_dims_k": None}
    massive = set(tokens)
    k = min(OVERLAP_K, len(magnitude_dims)) or OVERLAP_K
    selectors, sinks, means = [], [], []
    for i in range(me + 1, stats.num_layers):
        selectors.append({"layer": i, **selector_layer(_entry(stats, i - 1), massive, dims)})
        rec = _entry(stats, i).attn_input
        if rec is None or rec.total is None:
            continue
        means.append({"layer": i, "mean": ordinary_mean(rec, massive)})
        score = sink_attribution(rec, massive)
        if score is None:
            sinks.append({"layer": i, "dims": [], "overlap": None, "sink_top_share": None,
                          "magnitude_top_share": None})
            continue
        total = float(score.sum()) or 1.0
        top = score.topk(min(SINK_TOP, score.numel())).indices.tolist()
        sinks.append({"layer": i, "dims": [{"dim": d, "score": float(score[d]), "share": float(score[d]) / total}
                                           for d in top],
                      "overlap": len(set(top[:k]) & set(magnitude_dims[:k])) / k,
                      "sink_top_share": float(score[top[:k]].sum()) / total,
                      "magnitude_top_share": float(score[magnitude_dims[:k]].sum()) / total})
    measured = [s["overlap"] for s in sinks if s["overlap"] is not None]
    return {"selector_layers": selectors, "sink_dims": sinks, "ordinary_mean": means,
            "sink_dims_overlap": sum(measured) / len(measured) if measured else None, "sink_dims_k": k}
