"""WeMask custom layer for checkpoints patched by melsurgery (https://pypi.org/project/melsurgery).

This file is self-contained: it needs only torch and transformers. Loading with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` builds the stock model class
named in config.json `architectures` and adds forward hooks configured by `melsurgery_wemask`:

    in the attention input of each layer of `per_layer`, the entries `dims` of the selected tokens are
    moved towards `values` (zero when `values` is null) by `strength`: x <- (1 - strength) x +
    strength value. The attention input is the output of the attention-input norm `norm`, or, in
    families without one (OLMo 2: `norm` is null), the residual stream itself as it enters `attn`.

Selectors: "magnitude" selects a token when max |h[selector_dims]| of its residual stream (the norm's
input, or the attention's input) reaches that layer's `threshold`; "first" selects the first real
token of each sequence, found from the 2-D attention mask (left padding) or the cache position, so
that KV-cache decoding never selects newly generated tokens. Hooks do not change parameter names: the
weights are the stock model's.
"""

from __future__ import annotations

import torch
import transformers

CONFIG_KEY = "melsurgery_wemask"


def _submodule(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _first_tokens(kwargs, batch: int, length: int, device) -> torch.Tensor:
    """[B, T] bool: the first real token of each sequence within the current chunk."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        real = mask.to(device).bool()
        first = (real.long().cumsum(-1) == 1) & real
        return first[:, -length:]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    position = kwargs.get("cache_position")
    if position is None:
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        position = torch.arange(length, device=device) + past
    return (position.to(device) == 0).reshape(1, -1).expand(batch, length)


def apply_wemask(model, spec=None):
    """Install the WeMask hooks on a loaded model; returns the hook handles (remove them to undo)."""
    spec = spec if spec is not None else getattr(model.config, CONFIG_KEY, None)
    if not spec:
        return []
    spec = dict(spec)
    layers = _submodule(model, spec.get("layers_module", "model.layers"))
    sel_dims = torch.tensor(spec["selector_dims"], dtype=torch.long)
    selector = spec.get("selector", "magnitude")
    state: dict = {}

    def make_mask(entry):
        dims = torch.tensor(entry["dims"], dtype=torch.long)
        strength = float(entry["strength"])
        values = torch.tensor(entry.get("values") or [0.0] * len(entry["dims"]), dtype=torch.float32)
        threshold = entry.get("threshold")

        def mask(h, x):
            """x (the attention input) with dims of the selected tokens replaced; h is their residual."""
            if selector == "magnitude":
                chosen = h[..., sel_dims.to(h.device)].abs().amax(-1).float() >= float(threshold)
            else:
                chosen = state.get("first")
                if chosen is None or chosen.shape != h.shape[:-1]:
                    chosen = torch.zeros(h.shape[:-1], dtype=torch.bool, device=h.device)
                    chosen[..., 0] = True
            d = dims.to(x.device)
            old = x[..., d]
            new = (1.0 - strength) * old + strength * values.to(device=x.device, dtype=x.dtype)
            out = x.clone()
            out[..., d] = torch.where(chosen[..., None].to(x.device), new, old)
            return out

        return mask

    def norm_hook(mask):
        return lambda module, args, output: mask(args[0], output)

    def attn_pre_hook(mask):
        def hook(module, args, kwargs):
            if args:
                return (mask(args[0], args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": mask(kwargs["hidden_states"], kwargs["hidden_states"])}

        return hook

    def model_pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        state["first"] = _first_tokens(kwargs, ref.shape[0], ref.shape[1], ref.device)

    handles = []
    active = set(spec.get("layers", [e["layer"] for e in spec["per_layer"]]))  # a caller may narrow `layers`
    for entry in (e for e in spec["per_layer"] if e["layer"] in active):
        mask = make_mask(entry)
        layer = layers[entry["layer"]]
        if spec.get("norm"):
            handles.append(_submodule(layer, spec["norm"]).register_forward_hook(norm_hook(mask)))
        else:
            handles.append(_submodule(layer, spec.get("attn", "self_attn")).register_forward_pre_hook(
                attn_pre_hook(mask), with_kwargs=True))
    if selector == "first":
        handles.append(model.register_forward_pre_hook(model_pre_hook, with_kwargs=True))
    return handles


def _base_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = list(getattr(config, "architectures", None) or [])
    names.append(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""))
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(f"melsurgery: no transformers class for architectures {names}")


class MelsurgeryForCausalLM:
    """Entry point named by config.json `auto_map`: the stock class plus the WeMask hooks."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """transformers calls this on a remote-code class it loads; this entry point is not a model
        class and registers nothing, so the stock class stays what AutoModel builds."""
        return None

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        """Load the stock class named in config.json, then install the WeMask hooks it configures."""
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("adapter_kwargs", None)
        if config is None:
            config = transformers.AutoConfig.from_pretrained(path)
        model = _base_class(config).from_pretrained(path, *args, config=config, **kwargs)
        model._melsurgery_hooks = apply_wemask(model)
        return model

    @classmethod
    def _from_config(cls, config, **kwargs):
        kwargs.pop("trust_remote_code", None)
        model = _base_class(config)._from_config(config, **kwargs)
        model._melsurgery_hooks = apply_wemask(model)
        return model
