"""melsurgery's vLLM plugin (entry point group `vllm.general_plugins`, name `melsurgery`).

vLLM calls `register` in each of its processes. It teaches vLLM the patched checkpoints' config type
(model type "melsurgery", read as the base architecture's config, spec checked) and the patched
architecture names, each served by vLLM's own model class plus the mask (`vllm_models`). Imported lazily
by vLLM only: importing melsurgery never imports vLLM. `VLLM_PLUGINS` (a comma-separated allow-list)
that leaves out `melsurgery` disables it, and vLLM then refuses the patched checkpoints.
"""

from __future__ import annotations

# the base architectures whose vLLM model classes vllm_models wraps; any other patched architecture is
# refused by vLLM as unsupported
BASE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Gemma3ForCausalLM")


def register() -> None:
    """Register the patched config type with transformers and the patched architectures with vLLM."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from melsurgery.engines.modeling_melsurgery import MODEL_TYPE, MelsurgeryConfig, patched_architectures

    AutoConfig.register(MODEL_TYPE, MelsurgeryConfig, exist_ok=True)
    for name in patched_architectures(list(BASE_ARCHITECTURES)):
        ModelRegistry.register_model(name, f"melsurgery.engines.vllm_models:{name}")
