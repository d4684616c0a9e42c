"""The one definition of every measured quantity: massive entries and tokens, persistence, the sink.

`scan` (over calibration samples) and `verify` (over evaluation windows, base and patched) both
record `LayerStats` per layer and apply these functions to them, so the two commands cannot disagree
about what is massive or what the sink is. Definitions (thresholds in `DetectParams`):

- An entry h[sequence, pos, dim] of a layer's output is *massive* when |h| >= `abs_threshold` and
  |h| >= `ratio` x the median |h| of that layer's output (over all sequences measured together).
- A massive entry of layer l *persists* when the same (sequence, pos, dim) is massive in each of the
  next ceil(`persist_fraction` x (L - 1 - l)) layers, L the number of decoder layers (at least one).
- The *ME Layer* is the first decoder layer with a persisting massive entry; the (sequence, pos) of
  its persisting entries are the *massive tokens*.
- *Key attention* of a head to key position p: the mean attention weight that the queries after p
  put on p. The *sink* of a layer for one sequence is, per head, the sum of the key attention over
  the sequence's massive tokens, i.e. the attention mass that queries after the massive tokens put
  on them; a layer's sink is the mean over heads and over the sequences that hold massive tokens.
- The *sink rate* of a layer: the share of its heads whose sink (mean over sequences) exceeds
  `SINK_RATE_THRESHOLD` (0.3, Gu et al., ICLR 2025).
- *Attention-input similarity* (representation diversity, lower is more diverse): the mean pairwise
  cosine similarity of the tokens' attention inputs (the attention-input norm's output, after any
  custom-layer mask) within a sequence, averaged over sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from melsurgery.calibrate.stats import Entry, LayerStats
from melsurgery.params import DetectParams

SINK_RATE_THRESHOLD = 0.3


Key = tuple[int, int, int]  # (sequence, pos, dim)


@dataclass
class Massive:
    """Where the massive activations are: the ME Layer, its persisting entries, and every layer's."""

    me_layer: int | None
    persistent: dict[Key, float] = field(default_factory=dict)
    per_layer: list[dict[Key, float]] = field(default_factory=list)

    @property
    def tokens(self) -> list[tuple[int, int]]:
        """(sample, position) of every token holding a persisting massive entry, each once, in order."""
        return sorted({(s, q) for s, q, _ in self.persistent})


def top_k_for(num_sequences: int) -> int:
    """How many of the largest entries each layer records: enough for every sequence's massive token."""
    return max(64, 8 * num_sequences)


def key_attention(weights: torch.Tensor) -> torch.Tensor:
    """[heads, T]: mean attention each key gets from strictly later queries ([1, H, T, T] in; NaN for the last)."""
    a = weights[0].float()
    T = a.shape[-1]
    received = a.tril(-1).sum(1)  # [H, T]
    count = torch.arange(T - 1, -1, -1, device=a.device, dtype=torch.float32)
    return (received / count.clamp(min=1)).masked_fill(count == 0, float("nan")).cpu()


def top_entries(states: list[torch.Tensor], k: int) -> list[Entry]:
    """The k largest |h| entries over all sequences ([T, D] each), largest first."""
    cands: list[tuple[float, int, int, int, float]] = []
    for s, h in enumerate(states):
        flat = h.flatten()
        vals, idx = flat.abs().topk(min(k, flat.numel()))
        D = h.shape[-1]
        cands.extend(zip(vals.tolist(), [s] * len(idx), (idx // D).tolist(), (idx % D).tolist(), flat[idx].tolist()))
    cands.sort(key=lambda c: -c[0])
    return [Entry(s, p, d, val) for _, s, p, d, val in cands[:k]]


def median_abs(states: list[torch.Tensor]) -> float:
    """The median |h| over every entry of the given states (the ratio's denominator)."""
    return float(torch.cat([h.abs().flatten() for h in states]).float().median())


def layer_stats(index: int, states: list[torch.Tensor], k: int, key_att: list[torch.Tensor] | None = None,
                similarity: float | None = None) -> LayerStats:
    """The statistics of one residual-stream state over all sequences measured together."""
    return LayerStats(index, max(float(h.abs().max()) for h in states), median_abs(states), top_entries(states, k),
                      key_attention=key_att, similarity=similarity)


def massive_keys(layer: LayerStats, p: DetectParams) -> dict[Key, float]:
    """The massive entries of one layer (from its recorded largest entries)."""
    floor = max(p.abs_threshold, p.ratio * layer.median_abs)
    return {(e.sample, e.pos, e.dim): e.value for e in layer.top if abs(e.value) >= floor}


def required_persistence(layer: int, num_layers: int, p: DetectParams) -> int:
    """How many following layers a massive entry of `layer` must stay massive in."""
    return max(1, math.ceil(p.persist_fraction * (num_layers - 1 - layer)))


def find_massive(decoder: list[LayerStats], p: DetectParams) -> Massive:
    """The ME Layer and its persisting massive entries, from the decoder layers' statistics."""
    sets = [massive_keys(layer, p) for layer in decoder]
    n = len(decoder)
    for i, current in enumerate(sets):
        if not current or i == n - 1:
            continue
        need = required_persistence(i, n, p)
        keep = {k: v for k, v in current.items() if all(k in sets[j] for j in range(i + 1, min(n, i + 1 + need)))}
        if i + need < n and keep:
            return Massive(i, keep, sets)
    return Massive(None, {}, sets)


def head_sinks(layer: LayerStats, tokens: list[tuple[int, int]]) -> torch.Tensor | None:
    """[heads]: each head's sink on this layer, averaged over the sequences that hold massive tokens."""
    return head_sinks_of(layer.key_attention, tokens)


def head_sinks_of(key_att: list[torch.Tensor] | None, tokens: list[tuple[int, int]]) -> torch.Tensor | None:
    """`head_sinks` from the key attention of each sequence ([heads, T] each, see `key_attention`).

    Differentiable: the first-token fit follows its gradient, so the fit and verify share this definition."""
    if not key_att or not tokens:
        return None
    by_seq: dict[int, list[int]] = {}
    for s, q in tokens:
        by_seq.setdefault(s, []).append(q)
    per_seq = []
    for s, positions in sorted(by_seq.items()):
        ka = key_att[s]
        cols = ka[:, [q for q in positions if q < ka.shape[1]]]
        cols = cols[:, ~cols.isnan().any(0)]  # a massive token in last place has no later queries
        if cols.shape[1]:
            per_seq.append(cols.sum(1))
    return torch.stack(per_seq).mean(0) if per_seq else None


def sink(layer: LayerStats, tokens: list[tuple[int, int]]) -> float | None:
    """The sink of a layer onto `tokens` (sample, pos): per-head mass, averaged over heads."""
    h = head_sinks(layer, tokens)
    return None if h is None else float(h.mean())


def sink_rate(layer: LayerStats, tokens: list[tuple[int, int]]) -> float | None:
    """The share of heads whose sink onto `tokens` exceeds SINK_RATE_THRESHOLD (Gu et al. 2025)."""
    h = head_sinks(layer, tokens)
    return None if h is None else float((h > SINK_RATE_THRESHOLD).float().mean())


def similarity(x: torch.Tensor) -> float:
    """Mean pairwise cosine similarity (i != j) of the rows of x [T, D]; NaN for fewer than two rows."""
    T = x.shape[0]
    if T < 2:
        return math.nan
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    total = u.sum(0)
    return float((total @ total - (u * u).sum()) / (T * (T - 1)))
