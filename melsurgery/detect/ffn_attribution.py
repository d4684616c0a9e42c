"""Who wrote a layer's large entries: the mixer or the FFN, which FFN neurons, what norm scale.

The scan installs `ScanProbe` on each layer (the shared attention probe plus the FFN's activations and
the attention-input recorder) and turns what it captured into the layer's attribution record
(scan JSON `ffn_neurons`, `dims_attribution`, `norm`).
"""

from __future__ import annotations

import torch
from torch import nn

from melsurgery.architectures import ATTENTION, SHARED, Family, fused_experts, has_submodule, norm_eps, submodule
from melsurgery.calibrate.stats import Entry, LayerStats
from melsurgery.detect.attn_input import CANDIDATE_ABS, CANDIDATE_RATIO, AttnInputRecorder
from melsurgery.measure.probes import Probe

CANDIDATE_DIMS = 8
TOP_NEURONS = 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A captured activation of one sequence as [T, width], whether the module saw [1, T, w] or [T, w]."""
    return x.detach().reshape(-1, x.shape[-1])


class ScanProbe(Probe):
    """Probe plus what attribution needs, per sample: the residual after the mixer, the FFN output
    (before any post-FFN norm), and the neurons' activations (dense: the down projection's input; MoE:
    the expert bank's input and routing, and a shared expert's down-projection input and gate logit)."""

    def __init__(self, layer: nn.Module, family: Family, input_median: float) -> None:
        super().__init__(layer, family)
        self.attn_input = AttnInputRecorder(layer, family, input_median) if self.attends else None
        self.moe = family.experts is not None and has_submodule(layer, family.experts)
        self.shared = self.moe and family.shared_down is not None and has_submodule(layer, family.shared_down)
        self.mid: list[torch.Tensor] = []
        self.ffn_out: list[torch.Tensor] = []
        self.act: list[torch.Tensor] = []
        self.routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.shared_act: list[torch.Tensor] = []
        self.shared_gate: list[torch.Tensor] = []

    def hooks(self) -> list:
        """The shared attention hooks, the attention-input recorder's, and the FFN captures listed above."""
        fam, layer = self.family, self.layer
        handles = super().hooks() + (self.attn_input.hooks() if self.attn_input else [])

        def pre(path: str, into: list) -> None:
            handles.append(submodule(layer, path).register_forward_pre_hook(
                lambda m, args: into.append(_rows(args[0]))))

        def post(path: str, into: list) -> None:
            handles.append(submodule(layer, path).register_forward_hook(
                lambda m, a, out: into.append(_rows(out[0] if isinstance(out, tuple) else out))))

        pre(fam.residual_after_attn, self.mid)
        post(fam.ffn, self.ffn_out)
        if self.moe:  # the expert bank is called as experts(x [N, D], top_k_index [N, k], top_k_weights [N, k])
            handles.append(submodule(layer, fam.experts).register_forward_pre_hook(
                lambda m, args: self.routed.append(tuple(a.detach() for a in args[:3]))))
        else:
            pre(fam.ffn_down, self.act)
        if self.shared:
            pre(fam.shared_down, self.shared_act)
            post(fam.shared_gate, self.shared_gate)
        return handles

    def counts(self) -> list[list]:
        """Every per-sample record list, so that `end_sample` checks the FFN captures too."""
        shared = [self.shared_act, self.shared_gate] if self.shared else []
        return [*super().counts(), self.mid, self.ffn_out, self.routed if self.moe else self.act, *shared]


Neuron = tuple[int | str | None, int]  # (expert, "shared", or None for a dense FFN; neuron index)


class _Neurons:
    """The FFN neurons of one layer as columns: a neuron, its write direction, its activation.

    Dense FFN: neuron j is column j of the down projection; its activation is the down projection's
    input. MoE: neuron (e, j) is column j of expert e's down projection; its *effective* activation is
    the routing weight of e times the expert's activation j on tokens routed to e, and 0 elsewhere; a
    shared expert's neuron ("shared", j) has effective activation sigmoid(gate logit) times its
    activation j on every token. So the contributions of all neurons sum to the FFN output.
    """

    def __init__(self, layer: nn.Module, family: Family, probe: ScanProbe) -> None:
        self.probe = probe
        if probe.shared:
            self.shared_down = submodule(layer, family.shared_down).weight.float()
            self.shared_scale = [torch.sigmoid(g.float()) for g in probe.shared_gate]  # per sample [T, 1]
        if probe.moe:
            self.gate_up, self.expert_down, self.expert_act = fused_experts(submodule(layer, family.experts))
            E = self.expert_down.shape[0]
            self.routing = []  # per sample: [T, E] routing weights (0 where not routed)
            for _, index, weight in probe.routed:
                r = torch.zeros(index.shape[0], E + 1, dtype=torch.float32, device=index.device)
                self.routing.append(r.scatter_(1, index.long(), weight.float())[:, :E])
        else:
            self.down = submodule(layer, family.ffn_down).weight.float()

    def _expert_act(self, e: int, x: torch.Tensor, j: int | None = None) -> torch.Tensor:
        """Expert e's activations [N, I] (or of neuron j only: [N, 1]) on inputs x [N, D], computed as
        transformers' expert bank does (gate rows first in the fused gate/up matrix)."""
        w = self.gate_up[e]
        if j is not None:
            w = w[[j, w.shape[0] // 2 + j]]
        gate, up = nn.functional.linear(x.float(), w.float()).chunk(2, dim=-1)
        return self.expert_act(gate) * up

    def at(self, tokens: list[tuple[int, int]]) -> tuple[list[Neuron], torch.Tensor, torch.Tensor]:
        """Neurons that act on these tokens, their activations [n, K] there, and write directions [D, K]."""
        if not self.probe.moe:
            acts = torch.stack([self.probe.act[s][p].float() for s, p in tokens])
            return [(None, j) for j in range(self.down.shape[1])], acts, self.down
        used = sorted({e for s, p in tokens for e in self.routing[s][p].nonzero().flatten().tolist()})
        x = torch.stack([self.probe.routed[s][0][p] for s, p in tokens])
        r = torch.stack([self.routing[s][p] for s, p in tokens])
        I = self.expert_down.shape[2]
        keys: list[Neuron] = [(e, j) for e in used for j in range(I)]
        acts = [self._expert_act(e, x) * r[:, e : e + 1] for e in used]
        downs = [self.expert_down[e].float() for e in used]
        if self.probe.shared:
            keys += [(SHARED, j) for j in range(self.shared_down.shape[1])]
            acts.append(torch.stack([self.probe.shared_act[s][p].float() * self.shared_scale[s][p] for s, p in tokens]))
            downs.append(self.shared_down)
        if not keys:
            return keys, torch.zeros(len(tokens), 0), torch.zeros(self.expert_down.shape[1], 0)
        return keys, torch.cat(acts, dim=1), torch.cat(downs, dim=1)

    def activation(self, neuron: Neuron, s: int) -> torch.Tensor:
        """Effective activation [T] of one neuron over all tokens of sample s."""
        e, j = neuron
        if e is None:
            return self.probe.act[s][:, j].float()
        if e == SHARED:
            return self.probe.shared_act[s][:, j].float() * self.shared_scale[s][:, 0]
        return self._expert_act(e, self.probe.routed[s][0], j)[:, 0] * self.routing[s][:, e]


def _post_scale(layer: nn.Module, family: Family, y: torch.Tensor) -> torch.Tensor | None:
    """Per-token, per-dim factor [T, D] by which a post-FFN norm turns the FFN output into the write."""
    if family.ffn_post_norm is None:
        return None
    norm = submodule(layer, family.ffn_post_norm)
    rs = torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + norm_eps(norm))
    return (norm.weight.float() + family.norm_offset) * rs


def attribute(
    layer: nn.Module, family: Family, inputs: list[torch.Tensor], outputs: list[torch.Tensor], probe: ScanProbe,
    stats: LayerStats,
) -> dict | None:
    """Who wrote this layer's large entries: the mixer (attention, or a hybrid's conv or state space) vs
    the FFN, which neurons, what norm scale. `attn_write` is what the layer's mixer wrote, whatever its kind.

    Neuron contributions include the post-FFN norm's per-token scale where there is one (Gemma 2/3,
    OLMo 2), so that they add up to the FFN's write into the residual. The norm figures describe the
    norm that me-norm rescales (`Family.me_norm`): the FFN-input norm, or the FFN-output norm (OLMo 2).
    """
    floor = max(CANDIDATE_ABS, CANDIDATE_RATIO * stats.median_abs)
    cands = [e for e in stats.top if abs(e.value) >= floor]
    if not cands:
        return None
    by_dim: dict[int, list[Entry]] = {}
    for e in cands:
        by_dim.setdefault(e.dim, []).append(e)
    dims = sorted(by_dim, key=lambda d: -max(abs(e.value) for e in by_dim[d]))[:CANDIDATE_DIMS]
    tokens = sorted({(e.sample, e.pos) for e in cands})
    neurons = _Neurons(layer, family, probe)
    post = [_post_scale(layer, family, y) for y in probe.ffn_out]
    norm = submodule(layer, family.me_norm)
    norm_weight = norm.weight.float() + family.norm_offset
    norm_in = probe.mid if family.ffn_norm else probe.ffn_out
    eps = norm_eps(norm)

    others_mask = []
    for s, mid in enumerate(probe.mid):
        m = torch.ones(mid.shape[0], dtype=torch.bool, device=mid.device)
        for (ss, p) in tokens:
            if ss == s:
                m[p] = False
        others_mask.append(m)

    def rscale(x: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(x.float().pow(2).mean(-1) + eps)

    scale_massive = [float(rscale(norm_in[s][p])) for s, p in tokens]
    other_scales = torch.cat([rscale(x)[m] for x, m in zip(norm_in, others_mask)])
    dim_records = []
    for d in dims:
        toks = sorted({(e.sample, e.pos) for e in by_dim[d]})
        h_in = torch.tensor([float(inputs[s][p, d]) for s, p in toks])
        h_mid = torch.tensor([float(probe.mid[s][p, d]) for s, p in toks])
        h_out = torch.tensor([float(outputs[s][p, d]) for s, p in toks])
        keys, acts, down = neurons.at(toks)
        writes = acts * down[d][None, :]  # [n, K]: each neuron's write into dim d on each token
        if post[0] is not None:
            writes = writes * torch.stack([post[s][p, d] for s, p in toks])[:, None]
        contrib = writes.mean(0)
        ffn_write = float((h_out - h_mid).mean())
        order = contrib.abs().topk(min(TOP_NEURONS, contrib.numel())).indices.tolist()
        records = []
        for k in order:
            expert, j = keys[k]
            other_max = max((float(neurons.activation(keys[k], s)[m].abs().max()) for s, m in enumerate(others_mask)
                             if m.any()), default=0.0)
            records.append({
                "neuron": j,
                **({"expert": expert} if expert is not None else {}),
                "contribution": float(contrib[k]),
                "share": float(contrib[k]) / ffn_write if ffn_write else 0.0,
                "activation_massive": float(acts[:, k].mean()),
                "activation_other_max": other_max,
                "down_weight": float(down[d, k]),
            })
        dim_records.append({
            "dim": d,
            "tokens": [list(t) for t in toks],
            "value": float(h_out.mean()),
            "input": float(h_in.mean()),
            "mixer": stats.mixer or ATTENTION,
            "attn_write": float((h_mid - h_in).mean()),
            "ffn_write": ffn_write,
            "ffn_norm_weight": float(norm_weight[d]),
            "neurons": records,
        })
    return {
        "tokens": [list(t) for t in tokens],
        "dims": dim_records,
        "ffn_norm": family.me_norm,
        "ffn_norm_role": family.me_norm_role,
        "ffn_norm_scale_massive": sum(scale_massive) / len(scale_massive),
        "ffn_norm_scale_other_median": float(other_scales.median()) if other_scales.numel() else float("nan"),
        "ffn_norm_weight_mean": float(norm_weight.mean()),
    }
