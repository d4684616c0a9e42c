"""Streaming calibration: push calibration text through the model one decoder layer at a time.

Only the embeddings and one decoder layer are ever materialised, so a scan needs about
embeddings + one layer + activations of memory whatever the model size. Everything recorded is
plain data (see `Stats`), so detection is a pure function of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import Family, submodule
from .checkpoint.reader import Checkpoint
from .errors import UserError

# Entries at least this large (absolute, and times the layer median) get an attribution record, so
# that any reasonable detection threshold finds its massive entries already explained.
CANDIDATE_ABS = 50.0
CANDIDATE_RATIO = 50.0
CANDIDATE_DIMS = 8
TOP_NEURONS = 8


@dataclass
class Sample:
    ids: list[int]
    tokens: list[str]
    kind: str = "text"


@dataclass
class Entry:
    """One hidden-state entry: (sample, token position, dim) and its value."""

    sample: int
    pos: int
    dim: int
    value: float


@dataclass
class LayerStats:
    """Statistics of one residual-stream state: index -1 is the embeddings, i the output of layer i."""

    index: int
    max_abs: float
    median_abs: float
    top: list[Entry]
    # per sample: mean attention weight that each key position receives from later queries (this
    # layer's attention, averaged over heads); None for the embeddings.
    key_attention: list[list[float]] | None = None
    attribution: dict | None = None

    @property
    def ratio(self) -> float:
        return self.max_abs / self.median_abs if self.median_abs > 0 else math.inf


@dataclass
class Stats:
    layers: list[LayerStats] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    num_layers: int = 0
    hidden_size: int = 0


class StreamingModel:
    """A model skeleton without weights; layers are filled from the checkpoint one at a time."""

    def __init__(
        self, ckpt: Checkpoint, family: Family, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt, self.family, self.device, self.dtype = ckpt, family, torch.device(device), dtype
        try:
            config = AutoConfig.from_pretrained(ckpt.folder)
        except (ValueError, OSError) as exc:
            raise UserError(f"{ckpt.folder}/config.json: transformers cannot read it: {exc}") from None
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        self.config = self.skeleton.config
        self.layers: nn.ModuleList = submodule(self.skeleton, family.layers_module)  # type: ignore[assignment]
        rotary = submodule(self.skeleton, family.layers_module.rsplit(".", 1)[0] + ".rotary_emb")
        self.rotary = type(rotary)(config=self.config).to(self.device)
        self.num_layers = len(self.layers)

    def embed(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Embeddings [T, D] of each sequence; the table is loaded once and dropped."""
        weight = self.ckpt.load(self.family.embed, self.dtype, self.device)
        return [nn.functional.embedding(torch.tensor(ids, device=self.device), weight) for ids in sequences]

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Materialise decoder layer i from the checkpoint, and free it afterwards."""
        layer = self.layers[i]
        state = self.ckpt.load_prefix(self.family.prefix(i), self.dtype, self.device)
        layer.to_empty(device=self.device).to(self.dtype)
        missing, unexpected = layer.load_state_dict(state, strict=False)
        if missing or unexpected:
            layer.to("meta")
            raise UserError(
                f"{self.ckpt.folder}: layer {i} weights do not match the architecture "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        layer.eval()
        try:
            yield layer
        finally:
            layer.to("meta")

    def run_layer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """One decoder layer on one unpadded sequence [1, T, D], exactly as the full model runs it."""
        T = h.shape[1]
        pos = torch.arange(T, device=self.device).unsqueeze(0)
        mask = causal_mask(T, h.dtype, self.device, getattr(layer.self_attn, "sliding_window", None))
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=self.rotary(h, pos))
        return out[0] if isinstance(out, tuple) else out


def causal_mask(T: int, dtype: torch.dtype, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Additive [1, 1, T, T] causal mask (with an optional sliding window) for eager attention."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed &= k > q - window
    mask = torch.zeros(T, T, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def key_attention(weights: torch.Tensor) -> list[float]:
    """Mean attention each key gets from strictly later queries, averaged over heads ([1,H,T,T] in)."""
    a = weights[0].float().mean(0)  # [T, T]
    T = a.shape[0]
    received = a.tril(-1).sum(0)
    count = torch.arange(T - 1, -1, -1, device=a.device, dtype=torch.float32)
    return (received / count.clamp(min=1)).masked_fill(count == 0, float("nan")).tolist()


def top_entries(states: list[torch.Tensor], k: int) -> list[Entry]:
    """The k largest |h| entries over all samples ([T, D] each), largest first."""
    cands: list[tuple[float, int, int, int, float]] = []
    for s, h in enumerate(states):
        flat = h.flatten()
        vals, idx = flat.abs().topk(min(k, flat.numel()))
        D = h.shape[-1]
        cands.extend(zip(vals.tolist(), [s] * len(idx), (idx // D).tolist(), (idx % D).tolist(), flat[idx].tolist()))
    cands.sort(key=lambda c: -c[0])
    return [Entry(s, p, d, val) for _, s, p, d, val in cands[:k]]


def median_abs(states: list[torch.Tensor]) -> float:
    return float(torch.cat([h.abs().flatten() for h in states]).float().median())


def calibrate(
    ckpt: Checkpoint,
    family: Family,
    samples: list[Sample],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    top_k: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Stats:
    """Record per-layer statistics of the residual stream, streaming the model layer by layer."""
    model = StreamingModel(ckpt, family, device, dtype)
    k = top_k or max(64, 8 * len(samples))
    states = model.embed([s.ids for s in samples])
    stats = Stats(samples=samples, num_layers=model.num_layers, hidden_size=states[0].shape[-1])
    stats.layers.append(LayerStats(-1, _max(states), median_abs(states), top_entries(states, k)))
    for i in range(model.num_layers):
        with model.layer(i) as layer, _Probe(layer, family) as probe, torch.no_grad():
            inputs = states
            states = []
            for h in inputs:
                states.append(model.run_layer(layer, h[None])[0])
                probe.end_sample()
            med = median_abs(states)
            entry = LayerStats(i, _max(states), med, top_entries(states, k), key_attention=probe.key_attention)
            entry.attribution = attribute(layer, family, inputs, states, probe, entry)
        stats.layers.append(entry)
        if progress:
            progress(1)
    return stats


def _max(states: list[torch.Tensor]) -> float:
    return max(float(h.abs().max()) for h in states)


class _Probe:
    """Forward hooks that capture what attribution needs: attention weights, FFN input, FFN activations."""

    def __init__(self, layer: nn.Module, family: Family) -> None:
        self.layer, self.family = layer, family
        self.key_attention: list[list[float]] = []
        self.mid: list[torch.Tensor] = []
        self.act: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> _Probe:
        attn = self.layer.self_attn
        norm = submodule(self.layer, self.family.ffn_norm)
        down = submodule(self.layer, self.family.ffn_down)
        self._handles = [
            attn.register_forward_hook(lambda m, a, out: self.key_attention.append(key_attention(out[1]))),
            norm.register_forward_pre_hook(lambda m, args: self.mid.append(args[0][0].detach())),
            down.register_forward_pre_hook(lambda m, args: self.act.append(args[0][0].detach())),
        ]
        return self

    def end_sample(self) -> None:
        if len(self.mid) != len(self.act) or len(self.mid) != len(self.key_attention):
            raise RuntimeError("layer hooks fired an unexpected number of times")

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def attribute(
    layer: nn.Module, family: Family, inputs: list[torch.Tensor], outputs: list[torch.Tensor], probe: _Probe,
    stats: LayerStats,
) -> dict | None:
    """Who wrote this layer's large entries: attention vs FFN, which neurons, what norm scale."""
    floor = max(CANDIDATE_ABS, CANDIDATE_RATIO * stats.median_abs)
    cands = [e for e in stats.top if abs(e.value) >= floor]
    if not cands:
        return None
    by_dim: dict[int, list[Entry]] = {}
    for e in cands:
        by_dim.setdefault(e.dim, []).append(e)
    dims = sorted(by_dim, key=lambda d: -max(abs(e.value) for e in by_dim[d]))[:CANDIDATE_DIMS]
    tokens = sorted({(e.sample, e.pos) for e in cands})
    token_set = set(tokens)
    down_w = submodule(layer, family.ffn_down).weight.float()
    norm = submodule(layer, family.ffn_norm)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

    others_mask = []
    for s, mid in enumerate(probe.mid):
        m = torch.ones(mid.shape[0], dtype=torch.bool, device=mid.device)
        for (ss, p) in tokens:
            if ss == s:
                m[p] = False
        others_mask.append(m)

    def rscale(mid: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(mid.float().pow(2).mean(-1) + eps)

    scale_massive = [float(rscale(probe.mid[s][p])) for s, p in tokens]
    other_scales = torch.cat([rscale(mid)[m] for mid, m in zip(probe.mid, others_mask)])
    other_acts = [act[m].float() for act, m in zip(probe.act, others_mask)]
    dim_records = []
    for d in dims:
        toks = sorted({(e.sample, e.pos) for e in by_dim[d]})
        h_in = torch.tensor([float(inputs[s][p, d]) for s, p in toks])
        h_mid = torch.tensor([float(probe.mid[s][p, d]) for s, p in toks])
        h_out = torch.tensor([float(outputs[s][p, d]) for s, p in toks])
        acts = torch.stack([probe.act[s][p].float() for s, p in toks])  # [n, I]
        contrib = (acts * down_w[d][None, :]).mean(0)  # mean write of each neuron into dim d
        ffn_write = float((h_out - h_mid).mean())
        order = contrib.abs().topk(min(TOP_NEURONS, contrib.numel())).indices.tolist()
        neurons = []
        for j in order:
            other_max = max((float(a[:, j].abs().max()) for a in other_acts if a.shape[0]), default=0.0)
            neurons.append({
                "neuron": j,
                "contribution": float(contrib[j]),
                "share": float(contrib[j]) / ffn_write if ffn_write else 0.0,
                "activation_massive": float(acts[:, j].mean()),
                "activation_other_max": other_max,
                "down_weight": float(down_w[d, j]),
            })
        dim_records.append({
            "dim": d,
            "tokens": [list(t) for t in toks],
            "value": float(h_out.mean()),
            "input": float(h_in.mean()),
            "attn_write": float((h_mid - h_in).mean()),
            "ffn_write": ffn_write,
            "ffn_norm_weight": float(norm.weight.float()[d]) + family.norm_offset,
            "neurons": neurons,
        })
    return {
        "tokens": [list(t) for t in tokens if t in token_set],
        "dims": dim_records,
        "ffn_norm_scale_massive": sum(scale_massive) / len(scale_massive),
        "ffn_norm_scale_other_median": float(other_scales.median()) if other_scales.numel() else float("nan"),
        "ffn_norm_weight_mean": float(norm.weight.float().mean()) + family.norm_offset,
    }
