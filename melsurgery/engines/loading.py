"""Loading a patched checkpoint in transformers with melsurgery's own copy of the custom layer.

The custom layer comes from the installed package, never from the model folder: nothing shipped with a
checkpoint is executed (no trust_remote_code).
"""

from __future__ import annotations

from pathlib import Path

from melsurgery.architectures import WEMASK_KEY, Family, family_for, is_patched_config
from melsurgery.checkpoint.reader import read_config
from melsurgery.errors import UserError, quote


def custom_layer_spec(folder: Path, config: dict) -> dict | None:
    """A checkpoint's WeMask spec, checked as every engine checks it at load (the base record, the spec's
    presence, types and ranges); None for a stock or folded checkpoint; a UserError (one line) when it cannot run."""
    from melsurgery.engines.modeling_melsurgery import CONFIG_KEY, SpecError, check_spec, patched_config

    try:
        if is_patched_config(config):
            spec = getattr(patched_config(config), CONFIG_KEY)
        else:
            spec = check_spec(config.get(WEMASK_KEY), config["hidden_size"], config["num_hidden_layers"])
    except SpecError as exc:
        raise UserError(f"{folder}: {str(exc).removeprefix('melsurgery: ')}") from None
    if spec is not None:
        check_module_names(folder, spec, family_for(config))
    return spec


def check_module_names(folder: Path | str, spec: dict, family: Family) -> None:
    """The hooks look modules up by the spec's names: they must be the family's own, not any attribute path."""
    for key, want in (("layers_module", family.layers_module), ("attn", family.attn), ("norm", family.attn_norm)):
        if key in spec and spec[key] != want:
            raise UserError(f"{folder}: config.json {WEMASK_KEY}: {key} {quote(spec[key])} is not this family's "
                            f"{quote(want)}; the patch cannot run: re-run the patch on its base model")


def load(path, *, device: str = "cpu", dtype=None, **kwargs):
    """Load a (patched) checkpoint with its custom layer, without trust_remote_code.

    Returns (model, tokenizer). A token-selective patch loads as its base architecture's stock class plus
    the WeMask hooks of melsurgery's installed custom layer, configured (and checked) from config.json;
    folded checkpoints load as stock models. A spec that does not fit the model is a UserError.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from melsurgery.checkpoint.safeload import from_pretrained, load_tokenizer
    from melsurgery.engines.modeling_melsurgery import MelsurgeryForCausalLM, apply_wemask

    config = read_config(Path(path))
    custom_layer_spec(Path(path), config)  # one line on a damaged spec, before any weight is read
    tokenizer = load_tokenizer(path)
    # safetensors only: transformers would otherwise fall back to unpickling pytorch_model.bin
    options = {"dtype": dtype or torch.float32, "use_safetensors": True, **kwargs}
    if is_patched_config(config):
        model = from_pretrained(MelsurgeryForCausalLM, path, **options)
    else:  # a folded patch, a base model, or a custom layer written before patched checkpoints declared themselves
        model = from_pretrained(AutoModelForCausalLM, path, **options)
        model._melsurgery_hooks = apply_wemask(model)
    model.to(device).eval()
    return model, tokenizer
