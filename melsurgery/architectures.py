"""Model families as data: the one place that knows tensor and module names.

Everything else speaks of roles ("attention-input norm of layer i", "FFN down projection") and asks
the family entry where that role lives. Adding a family is adding an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Family:
    """How one decoder family lays out its weights.

    Module paths are relative to a decoder layer; tensor names are `layers.format(i) + path + ".weight"`.
    `norm_offset` is 1.0 where the norm multiplies by (1 + g) (Gemma), 0.0 where it multiplies by g.
    """

    name: str
    model_types: tuple[str, ...]
    attn_norm: str | None = "input_layernorm"
    ffn_norm: str = "post_attention_layernorm"
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    ffn_gate: str | None = "mlp.gate_proj"
    ffn_up: str = "mlp.up_proj"
    ffn_down: str = "mlp.down_proj"
    fused_gate_up: bool = False  # Phi-3: gate and up stacked in one matrix (gate rows first)
    norm_offset: float = 0.0
    layers: str = "model.layers.{i}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    @property
    def layers_module(self) -> str:
        """Module path of the decoder-layer list, e.g. "model.layers"."""
        return self.layers.split(".{i}")[0]

    def prefix(self, layer: int) -> str:
        return self.layers.format(i=layer)

    def tensor(self, layer: int, module: str) -> str:
        return f"{self.prefix(layer)}{module}.weight"

    def attn_norm_tensor(self, layer: int) -> str:
        if self.attn_norm is None:
            raise UserError(f"{self.name} has no attention-input norm; edit the q/k/v columns instead")
        return self.tensor(layer, self.attn_norm)

    def ffn_norm_tensor(self, layer: int) -> str:
        return self.tensor(layer, self.ffn_norm)

    def down_tensor(self, layer: int) -> str:
        return self.tensor(layer, self.ffn_down)

    def attn_input_tensors(self, layer: int) -> list[str]:
        return [self.tensor(layer, m) for m in self.attn_inputs]


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
)


def supported() -> str:
    return ", ".join(t for f in FAMILIES for t in f.model_types)


def family_for(config: dict) -> Family:
    """The family entry for a config, or a UserError naming what is supported."""
    model_type = config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UserError(f"unsupported architecture {model_type!r}; melsurgery supports: {supported()}")


def submodule(root: object, path: str) -> object:
    for part in path.split("."):
        root = getattr(root, part)
    return root
