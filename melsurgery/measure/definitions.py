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

What a cut buys (the payoff figures; `verify` reports each for base and patched, `measure.payoff` computes them).
Position t's next-token distribution predicts token t+1; the windows and their scored targets are verify's.

- *Streaming, evict* (window W): every attention layer runs with each query at position q seeing only the keys
  q-W+1..q (the last W tokens, itself included; ANDed with the layer's own causal or sliding mask), as a
  sliding-window KV cache does (StreamingLLM-style eviction *without re-indexing*: every token keeps its
  absolute position in the rotary embedding, and a cached key is the one computed when its token was processed).
  Layers whose mixer is not attention run unchanged. Scored on the positions t >= W only.
- *Streaming, keep-first* (the StreamingLLM arrangement): the same, with key 0 (the window's first token, e.g.
  BOS) visible to every query as well.
- *Int8 activations, per tensor*: the input x of every `nn.Linear` inside the decoder layers (attention
  projections, MLP, experts; not the LM head, not the embeddings) is fake-quantized to symmetric int8,
  q(x) = clamp(round(x / s), -127, 127) * s with s = max|x| / 127 over the whole input of one forward call
  of one window (dynamic, one scale per tensor); weights untouched. *Per token*: one s per token (row).
  Scored on every scored position.
- The *change* of a figure: 100 x (exp(mean NLL_arranged - mean NLL_plain) - 1) percent, the means over the
  same scored tokens of all windows pooled, NLL_plain from the same model's plain forward (full attention,
  no quantization): the perplexity ratio, as a percent change.
- Its *interval*: 95% percentile bootstrap over windows (`BOOTSTRAP` resamples of the windows with
  replacement, seed 0; each resample recomputes the change from its pooled tokens). Base against patched:
  the same resamples give both changes and their difference (patched minus base, percentage points), so
  the difference's interval is paired by window. With one window there is no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from melsurgery.calibrate.stats import Entry, LayerStats
from melsurgery.params import DetectParams

SINK_RATE_THRESHOLD = 0.3
BOOTSTRAP = 2000  # resamples behind every payoff interval
INT8_MAX = 127


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


@dataclass(frozen=True)
class Arrangement:
    """One way of running the model for a payoff figure (see the module docstring): a streaming window, with or
    without the first token, or int8 inputs to every decoder linear ("tensor" or "token" scales)."""

    name: str
    window: int | None = None
    keep_first: bool = False
    int8: str | None = None

    def first_scored(self) -> int:
        """The first position whose prediction this figure scores (positions before it are scored everywhere)."""
        return self.window or 0


def arrangements(window: int) -> list[Arrangement]:
    """The payoff figures `verify` reports, in report order."""
    return [Arrangement("evict", window), Arrangement("keep-first", window, keep_first=True),
            Arrangement("int8-tensor", int8="tensor"), Arrangement("int8-token", int8="token")]


def streaming_keys(T: int, device: torch.device | str, window: int, keep_first: bool = False) -> torch.Tensor:
    """bool [T, T]: may query q see key k under a streaming window (the last `window` keys, and key 0 with
    `keep_first`); causality is the layer's own mask's business."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    allowed = k > q - window
    if keep_first:
        allowed = allowed | (k == 0)
    return allowed


def fake_int8(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """x [B, ..., D] fake-quantized to symmetric int8: one scale per sequence (the whole tensor of one window)
    or per token (the last dim's rows)."""
    dims = (-1,) if per_token else tuple(range(1, x.dim()))
    scale = x.abs().amax(dim=dims, keepdim=True) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero input stays zero
    return (x / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale


def change_pct(nll_arranged: torch.Tensor, nll_plain: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The change (percent) from per-window NLL sums [..., windows] and scored-token counts [..., windows]."""
    n = counts.sum(-1)
    return 100 * torch.expm1((nll_arranged.sum(-1) - nll_plain.sum(-1)) / n)


@dataclass(frozen=True)
class Interval:
    """A figure with its 95% bootstrap interval over windows (low, high None with one window)."""

    value: float
    low: float | None
    high: float | None


def paired_changes(base: tuple[torch.Tensor, torch.Tensor], patched: tuple[torch.Tensor, torch.Tensor],
                   counts: torch.Tensor) -> tuple[Interval, Interval, Interval]:
    """Base change, patched change and their difference (pp), from per-window NLL sums (arranged, plain) of each
    model and the windows' scored-token counts, each with its paired bootstrap interval over windows."""
    def stats(idx: torch.Tensor | None) -> torch.Tensor:
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.double() if idx is None else t.double()[idx]
        b = change_pct(pick(base[0]), pick(base[1]), pick(counts))
        p = change_pct(pick(patched[0]), pick(patched[1]), pick(counts))
        return torch.stack([b, p, p - b], -1)

    point = stats(None)
    n = len(counts)
    if n < 2:
        return tuple(Interval(float(v), None, None) for v in point)  # type: ignore[return-value]
    g = torch.Generator().manual_seed(0)
    draws = stats(torch.randint(n, (BOOTSTRAP, n), generator=g))
    low, high = draws.quantile(0.025, dim=0), draws.quantile(0.975, dim=0)
    return tuple(Interval(float(v), float(lo), float(hi)) for v, lo, hi in zip(point, low, high))  # type: ignore
