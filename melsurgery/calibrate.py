"""Streaming calibration: push calibration text through the model one decoder layer at a time.

Only the embeddings and one decoder layer are ever materialised, so a scan needs about
embeddings + one layer + activations of memory whatever the model size. Everything recorded is
plain data (see `Stats`), so detection is a pure function of it.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from . import measure
from .architectures import ATTENTION, SHARED, Family, Mixer, has_submodule, submodule
from .attn_input import CANDIDATE_ABS, CANDIDATE_RATIO, AttnInputRecorder
from .checkpoint.reader import Checkpoint
from .checkpoint.validate import check_finite, nonfinite
from .errors import UserError
from .measure import Entry, LayerStats

CANDIDATE_DIMS = 8
TOP_NEURONS = 8


@dataclass
class Sample:
    """One tokenised calibration sample: ids, their token strings and where it came from."""

    ids: list[int]
    tokens: list[str]
    kind: str = "text"


@dataclass
class Stats:
    """Everything a streaming pass measured: per-layer statistics and the samples they refer to."""

    layers: list[LayerStats] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    num_layers: int = 0
    hidden_size: int = 0


@functools.cache
def _fixed_mmap_threshold() -> None:
    """Make glibc return freed layer-sized buffers to the system.

    Streaming allocates and frees a layer's weights and activations per layer. glibc raises its mmap
    threshold after each large free (up to 32 MB), so later activation-sized buffers come from the heap,
    which fragments: a scan of the 7B shape grew by about 50 MB per layer (8 x 128 tokens). A fixed 1 MB
    threshold keeps peak memory flat in the number of layers. Other C libraries are left alone.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


class StreamingModel:
    """A model skeleton without weights; layers are filled from the checkpoint one at a time.

    It reproduces the full model's forward exactly: the embedding scale (Gemma), each layer's own
    attention mask (full or sliding window) and rotary embedding (Gemma 3 has one per layer type).
    Layers of hybrid families whose mixer is not attention (convolution, state space) run on the
    unpadded sequence without a mask, as the full model runs them.
    """

    def __init__(
        self, ckpt: Checkpoint, family: Family, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt, self.family, self.device, self.dtype = ckpt, family, torch.device(device), dtype
        _fixed_mmap_threshold()
        try:
            config = AutoConfig.from_pretrained(ckpt.folder)
        except (ValueError, OSError) as exc:
            raise UserError(f"{ckpt.folder}/config.json: transformers cannot read it: {exc}") from None
        if getattr(config, "use_bidirectional_attention", False):
            raise UserError(f"{ckpt.folder}: bidirectional attention (an encoder); melsurgery scans causal LMs")
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        self.config = self.skeleton.config
        self.layers: nn.ModuleList = submodule(self.skeleton, family.layers_module)  # type: ignore[assignment]
        # Gemma scales embeddings inside the embedding module, by a non-persistent buffer: read its
        # plain-float twin, since the skeleton's buffer lives on the meta device.
        self.embed_scale: float | None = getattr(submodule(self.skeleton, family.embed_module), "scalar_embed_scale",
                                                 None)
        rotary_path = family.layers_module.rsplit(".", 1)[0] + ".rotary_emb"
        self.rotary = None  # Jamba-style models have no position embedding at all
        if has_submodule(self.skeleton, rotary_path):
            self.rotary = type(submodule(self.skeleton, rotary_path))(config=self.config).to(self.device)
        self._rotary_per_type = self.rotary is not None and "layer_type" in inspect.signature(
            self.rotary.forward).parameters
        self.num_layers = len(self.layers)
        self.layer_types = [self._layer_type(i) for i in range(self.num_layers)]
        self.mixers: list[Mixer] = []
        for i, t in enumerate(self.layer_types):
            try:
                self.mixers.append(family.mixer(t))
            except UserError:
                raise UserError(f"{self.ckpt.folder}: layer {i} has type {t!r}, which melsurgery cannot reproduce "
                                f"for {family.name}") from None
            if not has_submodule(self.layers[i], self.mixers[i].module):
                raise UserError(f"{self.ckpt.folder}: layer {i} ({t}) has no {self.mixers[i].module!r} module; "
                                f"is this really a {family.name} model?")

    def _layer_type(self, i: int) -> str:
        """Type of layer i (full or sliding attention, or a hybrid's other mixer), as the model's forward decides."""
        types = getattr(self.config, "layer_types", None)
        if types is None:  # Mistral, Phi-3, Qwen3-MoE: one window (or none) for all layers
            return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        return types[i]

    def embed(self, sequences: list[list[int]], ckpt: Checkpoint | None = None) -> list[torch.Tensor]:
        """Embeddings [T, D] of each sequence, reading only the table rows of the tokens that occur.

        `ckpt`: read the table from another checkpoint of the same architecture (a patched copy)."""
        vocab = sorted({t for ids in sequences for t in ids})
        weight = (ckpt or self.ckpt).load_rows(self.family.embed, vocab, self.dtype, self.device)
        check_finite(weight, f"{self.family.embed} (rows of the calibration tokens)", (ckpt or self.ckpt).folder)
        row = {t: k for k, t in enumerate(vocab)}
        out = [nn.functional.embedding(torch.tensor([row[t] for t in ids], device=self.device), weight)
               for ids in sequences]
        if self.embed_scale is not None:  # as transformers does: a float32 scalar cast to the weight dtype
            scale = torch.tensor(self.embed_scale).to(weight.dtype)
            out = [e * scale for e in out]
        return out

    def read_layer(self, i: int, ckpt: Checkpoint | None = None) -> dict[str, torch.Tensor]:
        """Decoder layer i's tensors as stored (names relative to the layer, checkpoint dtype, on the CPU)."""
        return (ckpt or self.ckpt).load_prefix(self.family.prefix(i))

    def load_layer(self, i: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """Materialise decoder layer i on the device with these tensors (checkpoint names, relative)."""
        layer = self.layers[i]
        for name, t in state.items():
            check_finite(t, self.family.prefix(i) + name, self.ckpt.folder)
        state = self.family.module_state({k: v.to(self.device, self.dtype) for k, v in state.items()})
        # assign: the converted tensors become the parameters, so the layer is never held twice in memory
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        for module in layer.modules():  # buffers the checkpoint does not hold, materialised as to_empty would
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_meta:
                    setattr(module, name, torch.empty_like(buf, device=self.device))
        if missing or unexpected:
            layer.to("meta")
            raise UserError(
                f"{self.ckpt.folder}: layer {i} weights do not match the architecture "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return layer.eval()

    def free_layer(self, i: int) -> None:
        """Send layer i's weights back to the meta device, so that only one layer is ever resident."""
        self.layers[i].to("meta")

    def final_norm(self, weight: torch.Tensor) -> nn.Module:
        """The model's final norm, materialised with this weight."""
        norm = submodule(self.skeleton, self.family.final_norm.removesuffix(".weight"))
        norm.to_empty(device=self.device).to(self.dtype)
        norm.load_state_dict({"weight": weight.to(self.device, self.dtype)})
        return norm.eval()

    @property
    def head_tensor(self) -> str:
        """The LM head's tensor name (the embedding table where they are tied)."""
        return self.family.lm_head if self.family.lm_head in self.ckpt else self.family.embed

    def logits(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits [T, V'] of final-normed states h [T, D] for a block of LM-head rows, as the model computes them."""
        z = h @ rows.to(self.device, self.dtype).T
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def run_layer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """One decoder layer on one unpadded sequence [1, T, D], exactly as the full model runs it.

        Attention layers get their causal mask and rotary embedding; other mixers get no mask (the
        full model passes none for an unpadded batch) and no rotary embedding (they do not use one)."""
        i = next(k for k, other in enumerate(self.layers) if other is layer)
        kind = self.layer_types[i]
        T = h.shape[1]
        pos = torch.arange(T, device=self.device).unsqueeze(0)
        mask, extra = None, {}
        if self.mixers[i].kind == ATTENTION:
            window = self.config.sliding_window if kind == "sliding_attention" else None
            mask = causal_mask(T, h.dtype, self.device, window)
            if self.rotary is not None:
                rotary = self.rotary(h, pos, kind) if self._rotary_per_type else self.rotary(h, pos)
                extra["position_embeddings"] = rotary
        out = layer(h, attention_mask=mask, position_ids=pos, **extra)
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


Edits = Mapping[int, dict[str, torch.Tensor]] | Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class Stream:
    """Hidden states [T, D] of each sequence on their way through the decoder layers.

    A stream may run a model that differs from the checkpoint: `edits` gives, per layer, replacement
    tensors (names relative to the layer, as the checkpoint names them), either as a mapping or as a
    function (layer, the checkpoint's tensors of that layer) -> replacements; `wemask` is a custom-layer
    spec (config.json `melsurgery_wemask`) whose hooks run on this stream only.
    """

    states: list[torch.Tensor]
    edits: Edits | None = None
    wemask: dict | None = None

    def edits_for(self, i: int, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stream's replacement tensors for layer i (none: the layer runs as stored), given its stored ones."""
        if self.edits is None:
            return {}
        return self.edits(i, base) if callable(self.edits) else dict(self.edits.get(i, {}))


class Probe:
    """Hooks that record, per sequence run through one layer, each head's key attention and, when
    asked, the mean pairwise cosine similarity of the attention inputs (after any WeMask hook).
    Layers of hybrids whose mixer is not attention have neither (`attends` False)."""

    def __init__(self, layer: nn.Module, family: Family, similarity: bool = False) -> None:
        self.layer, self.family = layer, family
        self.attends = has_submodule(layer, family.attn)
        self.measure_similarity = similarity and self.attends
        self.key_attention: list[torch.Tensor] = []
        self.similarity: list[float] = []
        self._handles: list = []

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.similarity.append(measure.similarity(x[0]))

    def hooks(self) -> list:
        """Install the recording hooks on the layer's attention and return their handles (none without attention)."""
        if not self.attends:
            return []
        attn = submodule(self.layer, self.family.attn)
        handles = [attn.register_forward_hook(
            lambda m, a, out: self.key_attention.append(measure.key_attention(out[1])))]
        if self.measure_similarity:
            handles.append(attn.register_forward_pre_hook(self._capture_input, with_kwargs=True))
        return handles

    def __enter__(self) -> Probe:
        self._handles = self.hooks()
        return self

    def end_sample(self) -> None:
        """Check after each sequence that every hook fired once for it, so records stay aligned with samples."""
        if len({len(records) for records in self.counts()}) > 1:  # none at all: a layer without attention
            raise RuntimeError("layer hooks fired an unexpected number of times")

    def counts(self) -> list[list]:
        """The per-sample record lists this probe fills (what end_sample compares in length)."""
        attention = [self.key_attention] if self.attends else []
        return [*attention, *([self.similarity] if self.measure_similarity else [])]

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


Observer = Callable[[int, int, list[torch.Tensor], list[torch.Tensor], Probe], None]


def run_layers(
    model: StreamingModel,
    streams: list[Stream],
    start: int = 0,
    stop: int | None = None,
    *,
    probe: Callable[[nn.Module], Probe] | None = None,
    observe: Observer | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Push every stream through decoder layers [start, stop), reading each layer once for all of them.

    For each layer, stream k runs with its own edits swapped in and its WeMask hooks installed; then
    `observe(layer index, k, inputs, outputs, probe)` sees the pass (with `probe(layer)`'s records).
    The streams' states are replaced by the layer outputs. Memory: one layer (twice while an edited
    copy is loaded) plus the streams' activations.
    """
    from .modeling.modeling_melsurgery import apply_wemask

    stop = model.num_layers if stop is None else stop
    for i in range(start, stop):
        base = model.read_layer(i)
        loaded: dict | None = None
        try:
            for k, stream in enumerate(streams):
                edits = stream.edits_for(i, base)
                if loaded is None or edits or loaded:
                    layer = model.load_layer(i, {**base, **edits})
                    loaded = edits
                spec = stream.wemask
                hooks = apply_wemask(model.skeleton, {**spec, "layers": [i]}) if spec and i in spec["layers"] else []
                try:
                    with probe(layer) if probe else nullcontext() as p, torch.no_grad():
                        inputs = stream.states
                        outputs = []
                        for h in inputs:
                            outputs.append(model.run_layer(layer, h[None])[0])
                            if p is not None:
                                p.end_sample()
                        if observe:
                            observe(i, k, inputs, outputs, p)
                finally:
                    for handle in hooks:
                        handle.remove()
                stream.states = outputs
        finally:
            model.free_layer(i)
        if progress:
            progress(1)


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
    k = top_k or measure.top_k_for(len(samples))
    stream = Stream(model.embed([s.ids for s in samples]))
    stats = Stats(samples=samples, num_layers=model.num_layers, hidden_size=stream.states[0].shape[-1])
    stats.layers.append(measure.layer_stats(-1, stream.states, k))

    def observe(i: int, _: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor], probe: Probe) -> None:
        _check_outputs(outputs, i, dtype)
        entry = measure.layer_stats(i, outputs, k, probe.key_attention if probe.attends else None)
        entry.mixer = model.mixers[i].kind
        entry.attribution = attribute(probe.layer, family, inputs, outputs, probe, entry)  # type: ignore[arg-type]
        entry.attn_input = probe.attn_input.record if probe.attn_input else None  # type: ignore[attr-defined]
        stats.layers.append(entry)

    def probe(layer: nn.Module) -> _Probe:  # the median of the residual entering the layer: the last state's
        return _Probe(layer, family, stats.layers[-1].median_abs)

    run_layers(model, [stream], probe=probe, observe=observe, progress=progress)
    return stats


def _check_outputs(states: list[torch.Tensor], i: int, dtype: torch.dtype) -> None:
    """Finite weights can still overflow (fp16): say so, rather than detect on NaN statistics."""
    bad = sum(nonfinite(h) for h in states)
    if bad:
        hint = "; scan with --dtype float32" if dtype != torch.float32 else ""
        raise UserError(f"layer {i} produced {bad} non-finite activations (NaN or Inf) on the calibration text "
                        f"in {str(dtype).removeprefix('torch.')}, although its weights are finite{hint}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A captured activation of one sequence as [T, width], whether the module saw [1, T, w] or [T, w]."""
    return x.detach().reshape(-1, x.shape[-1])


class _Probe(Probe):
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

    def __init__(self, layer: nn.Module, family: Family, probe: _Probe) -> None:
        self.probe = probe
        if probe.shared:
            self.shared_down = submodule(layer, family.shared_down).weight.float()
            self.shared_scale = [torch.sigmoid(g.float()) for g in probe.shared_gate]  # per sample [T, 1]
        if probe.moe:
            self.experts = submodule(layer, family.experts)
            E = self.experts.down_proj.shape[0]
            self.routing = []  # per sample: [T, E] routing weights (0 where not routed)
            for _, index, weight in probe.routed:
                r = torch.zeros(index.shape[0], E + 1, dtype=torch.float32, device=index.device)
                self.routing.append(r.scatter_(1, index.long(), weight.float())[:, :E])
        else:
            self.down = submodule(layer, family.ffn_down).weight.float()

    def _expert_act(self, e: int, x: torch.Tensor, j: int | None = None) -> torch.Tensor:
        """Expert e's activations [N, I] (or of neuron j only: [N, 1]) on inputs x [N, D], computed as
        transformers' expert bank does (gate rows first in the fused gate/up matrix)."""
        w = self.experts.gate_up_proj[e]
        if j is not None:
            w = w[[j, w.shape[0] // 2 + j]]
        gate, up = nn.functional.linear(x.float(), w.float()).chunk(2, dim=-1)
        return self.experts.act_fn(gate) * up

    def at(self, tokens: list[tuple[int, int]]) -> tuple[list[Neuron], torch.Tensor, torch.Tensor]:
        """Neurons that act on these tokens, their activations [n, K] there, and write directions [D, K]."""
        if not self.probe.moe:
            acts = torch.stack([self.probe.act[s][p].float() for s, p in tokens])
            return [(None, j) for j in range(self.down.shape[1])], acts, self.down
        used = sorted({e for s, p in tokens for e in self.routing[s][p].nonzero().flatten().tolist()})
        x = torch.stack([self.probe.routed[s][0][p] for s, p in tokens])
        r = torch.stack([self.routing[s][p] for s, p in tokens])
        I = self.experts.down_proj.shape[2]
        keys: list[Neuron] = [(e, j) for e in used for j in range(I)]
        acts = [self._expert_act(e, x) * r[:, e : e + 1] for e in used]
        downs = [self.experts.down_proj[e].float() for e in used]
        if self.probe.shared:
            keys += [(SHARED, j) for j in range(self.shared_down.shape[1])]
            acts.append(torch.stack([self.probe.shared_act[s][p].float() * self.shared_scale[s][p] for s, p in tokens]))
            downs.append(self.shared_down)
        if not keys:
            return keys, torch.zeros(len(tokens), 0), torch.zeros(self.experts.down_proj.shape[1], 0)
        return keys, torch.cat(acts, dim=1), torch.cat(downs, dim=1)

    def activation(self, neuron: Neuron, s: int) -> torch.Tensor:
        """Effective activation [T] of one neuron over all tokens of sample s."""
        e, j = neuron
        if e is None:
            return self.probe.act[s][:, j].float()
        if e == SHARED:
            return self.probe.shared_act[s][:, j].float() * self.shared_scale[s][:, 0]
        return self._expert_act(e, self.probe.routed[s][0], j)[:, 0] * self.routing[s][:, e]


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _post_scale(layer: nn.Module, family: Family, y: torch.Tensor) -> torch.Tensor | None:
    """Per-token, per-dim factor [T, D] by which a post-FFN norm turns the FFN output into the write."""
    if family.ffn_post_norm is None:
        return None
    norm = submodule(layer, family.ffn_post_norm)
    rs = torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + _eps(norm))
    return (norm.weight.float() + family.norm_offset) * rs


def attribute(
    layer: nn.Module, family: Family, inputs: list[torch.Tensor], outputs: list[torch.Tensor], probe: _Probe,
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
    eps = _eps(norm)

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
