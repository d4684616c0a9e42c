"""WeMask custom layer for checkpoints patched by melsurgery (https://pypi.org/project/melsurgery).

This file is self-contained: it needs only torch and transformers, and ships verbatim beside the weights.

Patched or refused, never silently unpatched: a token-selective patch cannot fold into weights, so its
config.json declares the model type "melsurgery" and the architecture "Melsurgery" + the base's (e.g.
"MelsurgeryLlamaForCausalLM"), which no stock engine knows. transformers without trust_remote_code, vLLM
without melsurgery's plugin and llama.cpp's converter therefore refuse the checkpoint instead of running
the base model. The base model type and architectures are kept under `melsurgery_base`.

`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` reads the config through
`MelsurgeryConfig`, which returns the base architecture's config class under a name of its own
("MelsurgeryLlamaConfig": no stock model class takes it, and it saves back as model type "melsurgery"),
then `MelsurgeryForCausalLM` builds the stock model class and adds forward hooks configured by
`melsurgery_wemask`:

    in the attention input of each layer of `per_layer`, the entries `dims` of the selected tokens are
    moved towards `values` (zero when `values` is null) by `strength`: x <- (1 - strength) x +
    strength value. The attention input is the output of the attention-input norm `norm`, or, in
    families without one (OLMo 2: `norm` is null), the residual stream itself as it enters `attn`.

Selectors: "magnitude" selects a token when max |h[selector_dims]| of its residual stream (the norm's
input, or the attention's input) reaches that layer's `threshold`; "first" selects the first real
token of each sequence, found from the 2-D attention mask (left padding) or the cache position, so
that KV-cache decoding never selects newly generated tokens. Hooks do not change parameter names: the
weights are the stock model's. A spec that does not fit the model (a dim or layer out of range, a
wrong type) fails at load with one line, never runs as the base model.
"""

from __future__ import annotations

import math

import torch
import transformers

CONFIG_KEY = "melsurgery_wemask"
# the same contract as melsurgery.architectures (PATCHED_MODEL_TYPE, PATCHED_ARCH_PREFIX, BASE_KEY)
MODEL_TYPE = "melsurgery"
ARCH_PREFIX = "Melsurgery"
BASE_KEY = "melsurgery_base"
SELECTORS = ("magnitude", "first")


class SpecError(ValueError):
    """A config.json that does not describe a loadable patch; the message is one line."""


def base_record(config: dict) -> dict:
    """The `melsurgery_base` record of a patched config: the base model type and architecture names."""
    base = config.get(BASE_KEY)
    if not (isinstance(base, dict) and isinstance(base.get("model_type"), str)
            and isinstance(base.get("architectures"), list) and base["architectures"]
            and all(isinstance(a, str) for a in base["architectures"])):
        raise SpecError(f"melsurgery: config.json: model type {MODEL_TYPE!r} needs {BASE_KEY} with the base "
                        f"model_type and architectures, got {base!r}; the checkpoint is damaged: patch its base again")
    return base


def _base_config_class(config: dict) -> type:
    from transformers import CONFIG_MAPPING

    model_type = base_record(config)["model_type"]
    if model_type == MODEL_TYPE or model_type not in CONFIG_MAPPING:
        raise SpecError(f"melsurgery: config.json: {BASE_KEY} names the base model type {model_type!r}, which "
                        f"transformers {transformers.__version__} does not know; the patch cannot run")
    return CONFIG_MAPPING[model_type]


def patched_architectures(names: list) -> list:
    """Architecture names as a patched config.json declares them (each with the melsurgery prefix once)."""
    return [n if n.startswith(ARCH_PREFIX) else ARCH_PREFIX + n for n in names]


def patched_config_class(base: type) -> type:
    """The base architecture's config class under a name of its own: no stock model class is registered for
    it (so AutoModel refuses it without remote code), and it writes itself back as model type "melsurgery"."""
    name = ARCH_PREFIX + base.__name__
    cls = globals().get(name)
    if cls is None:
        def to_dict(self) -> dict:
            out = base.to_dict(self)
            names = [n.removeprefix(ARCH_PREFIX) for n in out.get("architectures") or []]
            record = dict(out.get(BASE_KEY) or {})
            record.update(model_type=base.model_type, architectures=names or record.get("architectures", []))
            out.update(model_type=MODEL_TYPE, architectures=patched_architectures(record["architectures"]))
            out[BASE_KEY] = record
            return out

        # the module attribute makes instances picklable by reference (vLLM sends its config to other processes)
        cls = globals()[name] = type(name, (base,), {"__module__": __name__, "__qualname__": name,
                                                     "to_dict": to_dict})
    return cls


def __getattr__(name: str) -> type:
    """Rebuild a patched config class on first use in a fresh process (unpickling one of its configs)."""
    base = getattr(transformers, name.removeprefix(ARCH_PREFIX), None) if name.startswith(ARCH_PREFIX) else None
    if isinstance(base, type) and issubclass(base, transformers.PreTrainedConfig):
        return patched_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patched_config(config_dict: dict, **kwargs):
    """The in-memory config of a patched config.json: the base config class (renamed), carrying the patched
    architecture names, `melsurgery_base`, `melsurgery_wemask` and `auto_map`; the spec is checked here."""
    cls = patched_config_class(_base_config_class(config_dict))
    out = cls.from_dict({k: v for k, v in config_dict.items() if k != "model_type"}, **kwargs)
    config = out[0] if isinstance(out, tuple) else out
    if getattr(config, CONFIG_KEY, None) is None:
        raise SpecError(f"melsurgery: config.json declares model type {MODEL_TYPE!r} but has no {CONFIG_KEY}; "
                        "the checkpoint is damaged: patch its base again")
    check_spec(getattr(config, CONFIG_KEY), config.hidden_size, config.num_hidden_layers)
    return out


class MelsurgeryConfig(transformers.PreTrainedConfig):
    """config.json `auto_map` AutoConfig entry (and what melsurgery's vLLM plugin registers for the model type):
    reads a patched config as its base architecture's config class, checked."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """The patched config (a renamed base config class), not an instance of this class."""
        return patched_config(config_dict, **kwargs)


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _indices(x: object, size: int) -> bool:
    return (isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
            and all(0 <= i < size for i in x))


def check_spec(spec: object, hidden_size: int, num_layers: int) -> dict | None:
    """The `melsurgery_wemask` spec, checked against the model's sizes; SpecError (one line) when it does not fit.

    Checked at load in every engine, so a damaged or hand-edited spec never runs as (or instead of) the patch."""
    if spec is None:
        return None

    def bad(what: str) -> SpecError:
        return SpecError(f"melsurgery: config.json {CONFIG_KEY}: {what}; the patch cannot run: "
                         "re-run the patch on its base model")

    if not isinstance(spec, dict):
        raise bad(f"must be an object, got {type(spec).__name__}")
    selector = spec.get("selector", "magnitude")
    if selector not in SELECTORS:
        raise bad(f"selector {selector!r} is not one of {', '.join(SELECTORS)}")
    if selector == "magnitude" and not _indices(spec.get("selector_dims"), hidden_size):
        raise bad(f"selector_dims {spec.get('selector_dims')!r} must be dims 0-{hidden_size - 1}")
    for key in ("attn", "layers_module"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise bad(f"{key} {spec.get(key)!r} must name a module")
    if spec.get("norm") is not None and not isinstance(spec["norm"], str):
        raise bad(f"norm {spec['norm']!r} must name a module or be null")
    per_layer = spec.get("per_layer")
    if not isinstance(per_layer, list) or not per_layer or not all(isinstance(e, dict) for e in per_layer):
        raise bad("per_layer must be a non-empty list of layer entries")
    for e in per_layer:
        layer = e.get("layer")
        if not _indices([layer], num_layers):
            raise bad(f"layer {layer!r} is not a layer of this model (0-{num_layers - 1})")
        if not _indices(e.get("dims"), hidden_size):
            raise bad(f"dims {e.get('dims')!r} of layer {layer} must be dims 0-{hidden_size - 1}")
        if not _number(e.get("strength")) or not 0 <= e["strength"] <= 1:
            raise bad(f"strength {e.get('strength')!r} of layer {layer} must be a number in 0-1")
        if selector == "magnitude" and not _number(e.get("threshold")):
            raise bad(f"threshold {e.get('threshold')!r} of layer {layer} must be a finite number")
        values = e.get("values")
        if values is not None and not (isinstance(values, list) and len(values) == len(e["dims"])
                                       and all(map(_number, values))):
            raise bad(f"values of layer {layer} must be null or {len(e['dims'])} finite numbers")
    layers = spec.get("layers")
    if layers is not None and not (_indices(layers, num_layers) and set(layers) <= {e.get("layer") for e in per_layer}):
        raise bad(f"layers {layers!r} must list layers of per_layer")
    return spec


def magnitude_selected(h: torch.Tensor, selector_dims: torch.Tensor, threshold: float) -> torch.Tensor:
    """[...] bool: the tokens whose residual h [..., D] reaches `threshold` in any selector dim."""
    return h[..., selector_dims.to(h.device)].abs().amax(-1).float() >= threshold


def masked(x: torch.Tensor, chosen: torch.Tensor, dims: torch.Tensor, strength: float,
           values: torch.Tensor) -> torch.Tensor:
    """x [..., D] with dims of the chosen tokens ([...] bool) moved towards `values` by `strength`."""
    d = dims.to(x.device)
    old = x[..., d]
    new = (1.0 - strength) * old + strength * values.to(device=x.device, dtype=x.dtype)
    out = x.clone()
    out[..., d] = torch.where(chosen[..., None].to(x.device), new, old)
    return out


class LayerMask:
    """One layer's mask, as tensors: which dims, how far, towards which values, above which threshold."""

    def __init__(self, entry: dict, spec: dict) -> None:
        self.layer = entry["layer"]
        self.dims = torch.tensor(entry["dims"], dtype=torch.long)
        self.strength = float(entry["strength"])
        self.values = torch.tensor(entry.get("values") or [0.0] * len(entry["dims"]), dtype=torch.float32)
        self.threshold = entry.get("threshold")
        self.selector_dims = torch.tensor(spec.get("selector_dims") or [], dtype=torch.long)

    def by_magnitude(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x (the attention input) masked on the tokens whose residual h stands out."""
        return masked(x, magnitude_selected(h, self.selector_dims, float(self.threshold)), self.dims,
                      self.strength, self.values)

    def on(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """x masked on the given tokens."""
        return masked(x, chosen, self.dims, self.strength, self.values)


def layer_masks(spec: dict) -> list[LayerMask]:
    """The masks of a checked spec, in its order (a caller may narrow `layers` to a subset of `per_layer`)."""
    active = set(spec.get("layers", [e["layer"] for e in spec["per_layer"]]))
    return [LayerMask(e, spec) for e in spec["per_layer"] if e["layer"] in active]


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
    """Install the WeMask hooks on a loaded transformers model; returns the hook handles (remove them to undo)."""
    spec = spec if spec is not None else getattr(model.config, CONFIG_KEY, None)
    if not spec:
        return []
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    spec = check_spec(dict(spec), text.hidden_size, text.num_hidden_layers)
    layers = _submodule(model, spec["layers_module"])
    first = spec.get("selector", "magnitude") == "first"
    state: dict = {}

    def mask(m: LayerMask, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not first:
            return m.by_magnitude(h, x)
        chosen = state.get("first")
        if chosen is None or chosen.shape != h.shape[:-1]:
            chosen = torch.zeros(h.shape[:-1], dtype=torch.bool, device=h.device)
            chosen[..., 0] = True
        return m.on(x, chosen)

    def norm_hook(m):
        return lambda module, args, output: mask(m, args[0], output)

    def attn_pre_hook(m):
        def hook(module, args, kwargs):
            if args:
                return (mask(m, args[0], args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": mask(m, kwargs["hidden_states"], kwargs["hidden_states"])}

        return hook

    def model_pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        state["first"] = _first_tokens(kwargs, ref.shape[0], ref.shape[1], ref.device)

    handles = []
    for m in layer_masks(spec):
        layer = layers[m.layer]
        if spec.get("norm"):
            handles.append(_submodule(layer, spec["norm"]).register_forward_hook(norm_hook(m)))
        else:
            handles.append(_submodule(layer, spec["attn"]).register_forward_pre_hook(attn_pre_hook(m),
                                                                                    with_kwargs=True))
    if first:
        handles.append(model.register_forward_pre_hook(model_pre_hook, with_kwargs=True))
    return handles


def base_model_class(config) -> type:
    """The stock transformers class of a (patched) config's base architecture."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    record = getattr(config, BASE_KEY, None) or {}
    names = list(record.get("architectures") or [])
    names += [n.removeprefix(ARCH_PREFIX) for n in getattr(config, "architectures", None) or []]
    names.append(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""))
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise SpecError(f"melsurgery: no transformers class for the base architectures {names}")


class MelsurgeryForCausalLM:
    """Entry point named by config.json `auto_map`: the stock class plus the WeMask hooks."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """transformers calls this on a remote-code class it loads; this entry point is not a model
        class and registers nothing, so the stock class stays what AutoModel builds."""
        return None

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        """Load the stock class of the base architecture, then install the WeMask hooks the config names."""
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("adapter_kwargs", None)
        if config is None:
            config = MelsurgeryConfig.from_pretrained(path)
        model = base_model_class(config).from_pretrained(path, *args, config=config, **kwargs)
        model._melsurgery_hooks = apply_wemask(model)
        return model

    @classmethod
    def _from_config(cls, config, **kwargs):
        kwargs.pop("trust_remote_code", None)
        model = base_model_class(config)._from_config(config, **kwargs)
        model._melsurgery_hooks = apply_wemask(model)
        return model
