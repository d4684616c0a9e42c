"""Loading a patched checkpoint in transformers with melsurgery's own copy of the custom layer.

The custom layer comes from the installed package, never from the model folder: nothing shipped with a
checkpoint is executed (no trust_remote_code).
"""

from __future__ import annotations


def load(path, *, device: str = "cpu", dtype=None, **kwargs):
    """Load a (patched) checkpoint with its custom layer, without trust_remote_code.

    Returns (model, tokenizer). The WeMask hooks come from melsurgery's own copy of the custom layer,
    configured by the checkpoint's config.json; folded checkpoints load as stock models.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from melsurgery.checkpoint.safeload import from_pretrained, load_tokenizer
    from melsurgery.engines.modeling_melsurgery import apply_wemask

    tokenizer = load_tokenizer(path)
    # safetensors only: transformers would otherwise fall back to unpickling pytorch_model.bin
    model = from_pretrained(AutoModelForCausalLM, path, dtype=dtype or torch.float32, use_safetensors=True, **kwargs)
    model._melsurgery_hooks = apply_wemask(model)
    model.to(device).eval()
    return model, tokenizer
