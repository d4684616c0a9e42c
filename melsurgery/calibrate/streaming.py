"""The streaming engine: push token sequences through the model one decoder layer at a time.

Only the embeddings and one decoder layer are ever materialised, so scan, verify and tune need about
embeddings + one layer + activations of memory whatever the model size. The engine knows nothing of
what is measured: callers observe each layer's inputs and outputs (`run_layers`), and what they record
is plain data (`stats.Stats`), so detection is a pure function of it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from melsurgery.allocator import keep_step_buffers
from melsurgery.architectures import ATTENTION, Family, Mixer, has_submodule, submodule
from melsurgery.checkpoint.edits import Edit, edited_rows
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import from_config, load_config
from melsurgery.checkpoint.validate import check_finite
from melsurgery.errors import UserError, quote


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
        from transformers import AutoModelForCausalLM

        self.ckpt, self.family, self.device, self.dtype = ckpt, family, torch.device(device), dtype
        keep_step_buffers()  # activations and weights come and go per layer
        config = load_config(ckpt.folder)
        if getattr(config, "use_bidirectional_attention", False):
            raise UserError(f"{ckpt.folder}: bidirectional attention (an encoder); melsurgery scans causal LMs")
        with torch.device("meta"):
            self.skeleton = from_config(AutoModelForCausalLM, config, attn_implementation="eager")
        self.config = self.skeleton.config
        self.layers: nn.ModuleList = submodule(self.skeleton, family.layers_module)  # type: ignore[assignment]
        # Gemma scales embeddings inside the embedding module, by a non-persistent buffer: read its
        # plain-float twin, since the skeleton's buffer lives on the meta device.
        self.embed_scale: float | None = getattr(submodule(self.skeleton, family.embed_module), "scalar_embed_scale",
                                                 None)
        self.rotary = None  # Jamba-style models have no position embedding at all
        if has_submodule(self.skeleton, family.rotary_module):
            self.rotary = type(submodule(self.skeleton, family.rotary_module))(config=self.config).to(self.device)
        self._rotary_per_type = self.rotary is not None and "layer_type" in inspect.signature(
            self.rotary.forward).parameters
        self.num_layers = len(self.layers)
        self._hold: set[int] = set()
        self._held: dict[int, dict[str, torch.Tensor]] = {}
        self.layer_types = [self._layer_type(i) for i in range(self.num_layers)]
        self.mixers: list[Mixer] = []
        for i, t in enumerate(self.layer_types):
            try:
                self.mixers.append(family.mixer(t))
            except UserError:
                raise UserError(f"{self.ckpt.folder}: layer {i} has type {quote(t)}, which melsurgery cannot reproduce "
                                f"for {family.name}") from None
            if not has_submodule(self.layers[i], self.mixers[i].module):
                raise UserError(f"{self.ckpt.folder}: layer {i} ({t}) has no {quote(self.mixers[i].module)} module; "
                                f"is this really a {family.name} model?")

    def _layer_type(self, i: int) -> str:
        """Type of layer i (full or sliding attention, or a hybrid's other mixer), as the model's forward decides."""
        types = getattr(self.config, "layer_types", None)
        if types is None:  # Mistral, Phi-3, Qwen3-MoE: one window (or none) for all layers
            return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        return types[i]

    def embed(self, sequences: list[list[int]], ckpt: Checkpoint | None = None,
              edits: list[Edit] | None = None) -> list[torch.Tensor]:
        """Embeddings [T, D] of each sequence, reading only the table rows of the tokens that occur.

        `ckpt`: read the table from another checkpoint of the same architecture (a patched copy); `edits`:
        edits of the embedding table, applied in memory (a search trial)."""
        vocab = sorted({t for ids in sequences for t in ids}
                       | {i for e in edits or () if e.axis == 0 and e.index is not None for i in e.index})
        weight = (ckpt or self.ckpt).load_rows(self.family.embed, vocab, self.dtype, self.device)
        check_finite(weight, f"{self.family.embed} (rows of the calibration tokens)", (ckpt or self.ckpt).folder)
        if edits:
            weight = edited_rows(weight, vocab, edits)
        row = {t: k for k, t in enumerate(vocab)}
        out = [nn.functional.embedding(torch.tensor([row[t] for t in ids], device=self.device), weight)
               for ids in sequences]
        if self.embed_scale is not None:  # as transformers does: a float32 scalar cast to the weight dtype
            scale = torch.tensor(self.embed_scale).to(weight.dtype)
            out = [e * scale for e in out]
        return out

    def hold(self, layers: range) -> None:
        """Keep these decoder layers in memory once read (in the compute dtype, on the device, checked finite):
        a search reruns them every trial, and reading and converting them again costs more than running them."""
        self._hold = set(layers)

    def read_layer(self, i: int, ckpt: Checkpoint | None = None) -> dict[str, torch.Tensor]:
        """Decoder layer i's tensors (names relative to the layer): as stored (checkpoint dtype, on the CPU), or
        a held layer's tensors in the compute dtype on the device."""
        if ckpt is None and i in self._held:
            return dict(self._held[i])
        state = (ckpt or self.ckpt).load_prefix(self.family.prefix(i))
        if ckpt is None and i in self._hold:
            for name, t in state.items():
                check_finite(t, self.family.prefix(i) + name, self.ckpt.folder)
            self._held[i] = {k: v.to(self.device, self.dtype) for k, v in state.items()}
            return dict(self._held[i])
        return state

    def load_layer(self, i: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """Materialise decoder layer i on the device with these tensors (checkpoint names, relative)."""
        layer = self.layers[i]
        held = self._held.get(i, {})
        for name, t in state.items():
            if held.get(name) is not t:
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

    def logits(self, h: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [T, V'] of final-normed states h [T, D] for a block of LM-head rows, as the model computes them
        (`out`: a [T, V'] buffer of the compute dtype to write them into)."""
        z = torch.mm(h, rows.to(self.device, self.dtype).T, out=out)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def run_layer(self, layer: nn.Module, h: torch.Tensor, keys: KeyRule | None = None) -> torch.Tensor:
        """One decoder layer on one unpadded sequence [1, T, D], exactly as the full model runs it.

        Attention layers get their causal mask and rotary embedding; other mixers get no mask (the
        full model passes none for an unpadded batch) and no rotary embedding (they do not use one).
        `keys`: a further rule on which keys each query may see (ANDed with the layer's own mask)."""
        i = next(k for k, other in enumerate(self.layers) if other is layer)
        kind = self.layer_types[i]
        T = h.shape[1]
        pos = torch.arange(T, device=self.device).unsqueeze(0)
        mask, extra = None, {}
        if self.mixers[i].kind == ATTENTION:
            window = self.config.sliding_window if kind == "sliding_attention" else None
            mask = causal_mask(T, h.dtype, self.device, window, keys(T, self.device) if keys else None)
            if self.rotary is not None:
                rotary = self.rotary(h, pos, kind) if self._rotary_per_type else self.rotary(h, pos)
                extra["position_embeddings"] = rotary
        out = layer(h, attention_mask=mask, position_ids=pos, **extra)
        return out[0] if isinstance(out, tuple) else out


KeyRule = Callable[[int, torch.device], torch.Tensor]  # T -> bool [T, T]: may query q see key k


def causal_mask(T: int, dtype: torch.dtype, device: torch.device, window: int | None = None,
                also: torch.Tensor | None = None) -> torch.Tensor:
    """Additive [1, 1, T, T] causal mask (with an optional sliding window, and `also` a bool [T, T] that must
    hold too) for eager attention."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed &= k > q - window
    if also is not None:
        allowed &= also
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
    spec (config.json `melsurgery_wemask`) whose hooks run on this stream only. A stream may also run the
    layers differently: `keys` restricts which keys each query sees (on top of the layer's own mask), `hooks`
    installs forward hooks on each loaded layer for this stream (returns their handles). `observed` False: the
    probe and the observer skip this stream. `twin`: an earlier stream of the same run that starts from the same
    states and runs the layers the same way (the base model under the same arrangement, say): while this stream
    has no edits and no custom layer, it takes the twin's outputs instead of computing them again, as a patched
    model's stream equals the base's up to its first edited layer; `borrowed` counts those layers, which the
    probe and the observer do not see for this stream (the twin's records are its records there).
    """

    states: list[torch.Tensor]
    edits: Edits | None = None
    wemask: dict | None = None
    keys: KeyRule | None = None
    hooks: Callable[[nn.Module], list] | None = None
    observed: bool = True
    twin: Stream | None = field(default=None, repr=False)
    borrowed: int = 0

    def edits_for(self, i: int, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stream's replacement tensors for layer i (none: the layer runs as stored), given its stored ones."""
        if self.edits is None:
            return {}
        return self.edits(i, base) if callable(self.edits) else dict(self.edits.get(i, {}))


class LayerProbe(Protocol):
    """What `run_layers` needs of a probe (measure.probes.Probe is one): a context manager that installs
    its hooks on one layer, and a check after each sequence. The engine knows nothing of what it records."""

    def __enter__(self) -> LayerProbe: ...
    def __exit__(self, *exc: object) -> None: ...
    def end_sample(self) -> None: ...


Observer = Callable[[int, int, list[torch.Tensor], list[torch.Tensor], LayerProbe], None]


def run_layers(
    model: StreamingModel,
    streams: list[Stream],
    start: int = 0,
    stop: int | None = None,
    *,
    probe: Callable[[nn.Module], LayerProbe] | None = None,
    observe: Observer | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Push every stream through decoder layers [start, stop), reading each layer once for all of them.

    For each layer, stream k runs with its own edits swapped in and its WeMask hooks installed; then
    `observe(layer index, k, inputs, outputs, probe)` sees the pass (with `probe(layer)`'s records).
    The streams' states are replaced by the layer outputs. Consecutive streams whose edits are the same object
    share one loaded copy. Memory: one layer (twice while an edited copy is loaded) plus the streams' activations.
    """
    from melsurgery.engines.modeling_melsurgery import apply_wemask

    stop = model.num_layers if stop is None else stop
    order = {id(stream): k for k, stream in enumerate(streams)}
    if any(s.twin is not None and order.get(id(s.twin), k) >= k for k, s in enumerate(streams)):
        raise ValueError("a stream's twin must run before it, in the same call")
    for i in range(start, stop):
        base = model.read_layer(i)
        loaded: dict | None = None
        try:
            for k, stream in enumerate(streams):
                edits = stream.edits_for(i, base)
                spec = stream.wemask
                if stream.twin is not None:
                    if not edits and not (spec and i in spec["layers"]):
                        stream.states = list(stream.twin.states)  # the twin ran this layer just before
                        stream.borrowed += 1
                        continue
                    stream.twin = None  # from its first edited layer on, the stream runs its own layers
                if loaded is None or (edits or loaded) and edits is not loaded:  # the same edits object: loaded
                    layer = model.load_layer(i, {**base, **edits})
                    loaded = edits
                hooks = apply_wemask(model.skeleton, {**spec, "layers": [i]}) if spec and i in spec["layers"] else []
                hooks += stream.hooks(layer) if stream.hooks else []
                try:
                    with probe(layer) if probe and stream.observed else nullcontext() as p, torch.no_grad():
                        inputs = stream.states
                        outputs = []
                        for h in inputs:
                            outputs.append(model.run_layer(layer, h[None], stream.keys)[0])
                            if p is not None:
                                p.end_sample()
                        if observe and stream.observed:
                            observe(i, k, inputs, outputs, p)
                finally:
                    for handle in hooks:
                        handle.remove()
                stream.states = outputs
        finally:
            model.free_layer(i)
        if progress:
            progress(1)
