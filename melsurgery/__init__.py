"""melsurgery: find and fix massive activations (the Massive Emergence Layer) in decoder checkpoints."""

__version__ = "0.1.0"


def load(path, *, device: str = "cpu", dtype=None, **kwargs):
    """Load a (patched) checkpoint with its custom layer, without trust_remote_code.

    Returns (model, tokenizer). The WeMask hooks come from melsurgery's own copy of the custom layer,
    configured by the checkpoint's config.json; folded checkpoints load as stock models.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .modeling.modeling_melsurgery import apply_wemask
    from .samples import load_tokenizer

    tokenizer = load_tokenizer(path)
    # safetensors only: transformers would otherwise fall back to unpickling pytorch_model.bin
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=False,
                                                 use_safetensors=True, **kwargs)
    model._melsurgery_hooks = apply_wemask(model)
    model.to(device).eval()
    return model, tokenizer
