"""vLLM model classes for token-selective (WeMask) patches: vLLM's own model code plus the mask.

Each class is vLLM's class for the base architecture, under the patched architecture name that the
checkpoint's config.json declares ("Melsurgery" + the base's); `vllm_plugin.register` makes vLLM find
it. After vLLM builds the model, the mask is installed as forward hooks where melsurgery's transformers
custom layer puts it, on the attention input of the chosen layers, with the same arithmetic
(`modeling_melsurgery.LayerMask`), so both engines compute the same thing:

- selector "magnitude": a hook on the attention-input norm. vLLM fuses the residual add into that norm
  (`norm(x, residual)` returns the normalised sum and the sum), so the residual stream h that selects
  the tokens is the norm's second output (its input, for a first layer called without a residual);
- selector "first": a pre-hook on the attention, which receives the token positions. vLLM flattens the
  tokens of all running sequences into one batch, so "first token" is `positions == 0`, per sequence,
  wherever it sits in the batch; decode steps never have position 0, so generated tokens are never masked.

Prefix caching: a cached position 0 was computed by this same model, masked, so the keys and values
read from the cache are the masked ones; its later tokens are computed as without the cache (measured in
tests/engines: a cache hit gives the same log-probs as transformers with the custom layer).

Tensor and pipeline parallelism: the mask acts before the QKV projection, on the attention input, which
vLLM holds whole (replicated) on every tensor-parallel rank, like the positions and the residual stream;
every rank computes the same selection and the same masked input, so no communication is added. Under
pipeline parallelism each rank hooks only the layers it holds (the others are `PPMissingLayer`), and the
residual stream travels between stages with the hidden states, so the magnitude selector sees it too.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from melsurgery.architectures import family_for
from melsurgery.engines.loading import check_module_names
from melsurgery.engines.modeling_melsurgery import CONFIG_KEY, LayerMask, SpecError, check_spec, layer_masks

log = logging.getLogger(__name__)


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _norm_hook(mask: LayerMask):
    def hook(module, args, output):
        if isinstance(output, tuple):  # fused residual add: (normalised sum, sum); the sum is the residual h
            x, h = output
            return mask.by_magnitude(h, x), h
        return mask.by_magnitude(args[0], output)

    return hook


def _attn_hook(mask: LayerMask, selector: str):
    def hook(module, args, kwargs):
        positions, x = (kwargs["positions"], kwargs["hidden_states"]) if not args else (args[0], args[1])
        x = mask.on(x, positions == 0) if selector == "first" else mask.by_magnitude(x, x)
        if args:
            return (positions, x, *args[2:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


def install_wemask(model: torch.nn.Module, hf_config) -> list:
    """Hook the mask of config.json `melsurgery_wemask` into a vLLM model; refuses (SpecError) a missing or
    ill-fitting spec, so a patched architecture never runs without its patch."""
    spec = getattr(hf_config, CONFIG_KEY, None)
    if spec is None:
        raise SpecError(f"melsurgery: config.json declares the architecture {hf_config.architectures} but has no "
                        f"{CONFIG_KEY}; the checkpoint is damaged: patch its base again")
    spec = check_spec(spec, hf_config.hidden_size, hf_config.num_hidden_layers)
    # the hooks find modules by the spec's names: they must be the family's own (vLLM keeps transformers' names)
    check_module_names(getattr(hf_config, "name_or_path", "") or "the checkpoint", spec,
                       family_for({"model_type": hf_config.model_type}))
    selector = spec.get("selector", "magnitude")
    layers = _submodule(model, spec["layers_module"])
    handles, hooked = [], []
    for mask in layer_masks(spec):
        layer = layers[mask.layer]
        if isinstance(layer, PPMissingLayer):  # held by another pipeline stage, which hooks it there
            continue
        if spec.get("norm") and selector == "magnitude":
            handles.append(_submodule(layer, spec["norm"]).register_forward_hook(_norm_hook(mask)))
        else:
            handles.append(_submodule(layer, spec["attn"]).register_forward_pre_hook(_attn_hook(mask, selector),
                                                                                    with_kwargs=True))
        hooked.append(mask.layer)
    log.info("melsurgery: WeMask (selector %s) on the attention input of layers %s", selector, hooked)
    return handles


class _WeMask:
    """vLLM's model for the base architecture, then the mask hooked in."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._melsurgery_hooks = install_wemask(self, vllm_config.model_config.hf_config)


class MelsurgeryLlamaForCausalLM(_WeMask, LlamaForCausalLM):
    """Llama with melsurgery's WeMask."""


class MelsurgeryMistralForCausalLM(_WeMask, MistralForCausalLM):
    """Mistral with melsurgery's WeMask."""


class MelsurgeryQwen2ForCausalLM(_WeMask, Qwen2ForCausalLM):
    """Qwen2 with melsurgery's WeMask."""


class MelsurgeryQwen3ForCausalLM(_WeMask, Qwen3ForCausalLM):
    """Qwen3 with melsurgery's WeMask."""


class MelsurgeryGemma3ForCausalLM(_WeMask, Gemma3ForCausalLM):
    """Gemma 3 (text) with melsurgery's WeMask."""
