"""Model families as data: the one place that knows tensor and module names.

Everything else speaks of roles ("attention-input norm of layer i", "FFN down projection") and asks
the family entry where that role lives. Adding a family is adding an entry.

Roles, for one decoder layer (module paths relative to it):
- `attn_norm`: the norm whose output is the attention input (None where the raw residual feeds the
  attention, as in OLMo 2; then `attn` is where the attention input is formed, and scalings of it fold
  into the input columns of `attn_inputs`).
- `ffn_norm`: the norm whose output is the FFN input (its input is the residual after attention);
  None where the raw residual feeds the FFN (OLMo 2).
- `ffn_post_norm`: a norm applied to the FFN output before it joins the residual (Gemma 2/3, OLMo 2).
- `ffn_down`: the down projection of a dense FFN; `experts`: the expert bank of an MoE FFN;
  `shared_down`: the down projection of a dense expert every token passes through (Qwen2-MoE), whose
  output is scaled per token by sigmoid(`shared_gate`).
- `mixers`: hybrid families, the layer types (config `layer_types`) whose token mixer is not attention:
  its kind ("conv", "state-space") and module. Such layers have no attention input and no sink.

Role paths name modules as transformers holds them in memory; `disk_renames` maps them to the
checkpoint's tensor names where these differ (Mixtral's `mlp` is `block_sparse_moe` on disk).


GGUF (llama.cpp) names live here too (`gguf_layer`, `gguf_global`), with the two layout differences
llama.cpp's converter (convert_hf_to_gguf.py) introduces and transformers' GGUF loader undoes:
- Llama-style models (`gguf_rope_permuted`): the rows of q_proj and k_proj are permuted per head from
  the Hugging Face rotary layout (first half, second half) to llama.cpp's interleaved pairs;
- Gemma (`gguf_norm_added` = 1): norm weights are stored as 1 + g, i.e. as the effective weight.
Residual dims, FFN neurons and layer indices are the same in both, so a scan's indices map directly.
MoE experts are stacked into one 3-D tensor per projection (`blk.N.ffn_down_exps.weight`, expert first).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from melsurgery.errors import UserError, quote

if TYPE_CHECKING:
    import torch


ATTENTION = "attention"
ATTENTION_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Mixer:
    """A layer's token mixer: its config layer type, its kind (attention, conv, state-space), its module."""

    layer_type: str
    kind: str
    module: str


SHARED = "shared"  # the expert id of a shared expert in neuron records ("shared:41")
# transformers' fused MoE expert bank in memory: every expert's gate and up rows stacked [E, 2I, D] (gate
# first), the down projections [E, D, I], and the activation between them
FUSED_GATE_UP, FUSED_DOWN, EXPERT_ACT = "gate_up_proj", "down_proj", "act_fn"
# where a norm module keeps its epsilon: Llama-style RMSNorm, then Gemma's and torch's
NORM_EPS_ATTRS = ("variance_epsilon", "eps")


@dataclass(frozen=True)
class Family:
    """How one decoder family lays out its weights.

    Module paths are relative to a decoder layer; tensor names are `layers.format(i) + path + ".weight"`.
    `norm_offset` is 1.0 where the norm multiplies by (1 + g) (Gemma), 0.0 where it multiplies by g.
    """

    name: str
    model_types: tuple[str, ...]
    attn: str = "self_attn"
    attn_norm: str | None = "input_layernorm"
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    ffn: str = "mlp"
    ffn_norm: str | None = "post_attention_layernorm"
    ffn_post_norm: str | None = None
    ffn_down: str = "mlp.down_proj"
    # MoE: the expert bank module. In the checkpoint each expert e has its own `experts.{e}.{proj}.weight`
    # (`expert_projs` = gate, up, down); transformers fuses them in memory into 3-D `gate_up_proj`
    # [E, 2I, D] (gate rows first) and `down_proj` [E, D, I].
    experts: str | None = None
    expert_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # (module-path prefix in memory, the same prefix in the checkpoint), applied in order
    disk_renames: tuple[tuple[str, str], ...] = ()
    shared_down: str | None = None
    shared_gate: str | None = None
    mixers: tuple[Mixer, ...] = ()
    norm_offset: float = 0.0
    # queries and keys are normalised per head before the scores: the key's direction, not its size,
    # decides the sink, so the dims that drive the sink may differ from the massive dims
    qk_norm: bool = False
    layers: str = "model.layers.{i}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # GGUF: module path (relative to a decoder layer) -> llama.cpp name (relative to `blk.N.`)
    gguf_layer: tuple[tuple[str, str], ...] = ()  # filled from GGUF_LAYER in __post_init__ when empty
    gguf_rope_permuted: bool = False
    gguf_norm_added: float = 0.0

    def __post_init__(self) -> None:
        if not self.gguf_layer:
            object.__setattr__(self, "gguf_layer", GGUF_LAYER)

    @property
    def layers_module(self) -> str:
        """Module path of the decoder-layer list, e.g. "model.layers"."""
        return self.layers.split(".{i}")[0]

    @property
    def rotary_module(self) -> str:
        """Module path of the model-level rotary embedding, beside the layer list (absent in some hybrids)."""
        return self.layers_module.rsplit(".", 1)[0] + ".rotary_emb"

    @property
    def embed_module(self) -> str:
        """Module path of the token embedding, for reading module attributes (e.g. Gemma's embed scale)."""
        return self.embed.removesuffix(".weight")

    @property
    def residual_after_attn(self) -> str:
        """The module whose input is the residual after attention (a pre-hook there captures it)."""
        return self.ffn_norm or self.ffn

    @property
    def me_norm(self) -> str:
        """The norm me-norm rescales: the FFN-input norm, or the FFN-output norm where none exists.

        Both decide, per dim, how strongly the ME Layer's FFN pathway acts: the input norm gates what the
        writing neurons read, the output norm (OLMo 2) scales what they write into the residual.
        """
        norm = self.ffn_norm or self.ffn_post_norm
        if norm is None:
            raise UserError(f"{self.name} has no FFN norm to rescale")
        return norm

    @property
    def me_norm_role(self) -> str:
        """"input" or "output": which side of the FFN the me-norm norm sits on, so reports say what was edited."""
        return "input" if self.ffn_norm else "output"

    def prefix(self, layer: int) -> str:
        """The name prefix of one decoder layer's tensors: the only place layer names are spelled."""
        return self.layers.format(i=layer)

    def disk_path(self, module: str) -> str:
        """A module path as the checkpoint spells it."""
        for memory, disk in self.disk_renames:
            if module.startswith(memory):
                module = disk + module.removeprefix(memory)
        return module

    def memory_path(self, name: str) -> str:
        """A checkpoint name (relative to a layer) as transformers' modules spell it."""
        for memory, disk in reversed(self.disk_renames):
            if name.startswith(disk):
                name = memory + name.removeprefix(disk)
        return name

    def tensor(self, layer: int, module: str) -> str:
        """The checkpoint name of a layer module's weight, disk renames applied (what edits and reads address)."""
        return f"{self.prefix(layer)}{self.disk_path(module)}.weight"

    def mixer(self, layer_type: str) -> Mixer:
        """The token mixer of a layer of this config layer type (attention, or a hybrid's other kinds)."""
        if layer_type in ATTENTION_TYPES:
            return Mixer(layer_type, ATTENTION, self.attn)
        for m in self.mixers:
            if m.layer_type == layer_type:
                return m
        raise UserError(f"{self.name}: layer type {quote(layer_type)} is not one melsurgery can run")

    def layer_kinds(self, config: dict) -> list[str]:
        """Mixer kind of each decoder layer of a config.json.

        Hybrid configs spell the layer pattern in family-specific ways (Bamba: `attn_layer_indices`), so
        their layer types are asked of transformers' own config class; other families' layers all attend.
        """
        n = int(config["num_hidden_layers"])
        if not self.mixers:
            return [ATTENTION] * n
        try:
            types = list(transformers_config(config).layer_types)
        except (ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"config.json: transformers cannot read the layer pattern of this {self.name} model "
                            f"({exc})") from None
        return [self.mixer(t).kind for t in types[:n]]

    def attn_norm_tensor(self, layer: int) -> str:
        """The attention-input norm weight of a layer; a one-line refusal for families that have none."""
        if self.attn_norm is None:
            raise UserError(f"{self.name} has no attention-input norm; edit the q/k/v columns instead")
        return self.tensor(layer, self.attn_norm)

    def ffn_norm_tensor(self, layer: int) -> str:
        """The FFN-input norm weight of a layer; a one-line refusal for families that have none."""
        if self.ffn_norm is None:
            raise UserError(f"{self.name} has no FFN-input norm")
        return self.tensor(layer, self.ffn_norm)

    def me_norm_tensor(self, layer: int) -> str:
        """The weight me-norm rescales in a layer (see `me_norm` for which norm that is)."""
        return self.tensor(layer, self.me_norm)

    def down_tensor(self, layer: int, expert: int | str | None = None) -> str:
        """The down projection of layer's dense FFN, or of one expert (its own tensor in the checkpoint)."""
        if expert is None:
            return self.tensor(layer, self.ffn_down)
        if expert == SHARED:
            if self.shared_down is None:
                raise UserError(f"{self.name} has no shared expert")
            return self.tensor(layer, self.shared_down)
        if self.experts is None:
            raise UserError(f"{self.name} has no experts; name FFN neurons without an expert")
        return self.tensor(layer, f"{self.experts}.{expert}.{self.expert_projs[2]}")

    def attn_input_tensors(self, layer: int) -> list[str]:
        """The projections that read the attention-input norm (q, k, v): folding a norm edit scales their columns."""
        return [self.tensor(layer, m) for m in self.attn_inputs]

    def module_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A layer's checkpoint tensors (relative names) as transformers' modules hold them.

        Checkpoint names are renamed to module paths (`disk_renames`), and MoE layers' per-expert tensors
        are stacked into the fused 3-D expert parameters.
        """
        state = {self.memory_path(k): v for k, v in state.items()}
        if self.experts is None:
            return state
        import torch

        pattern = re.compile(rf"^{re.escape(self.experts)}\.(\d+)\.(\w+)\.weight$")
        per: dict[str, dict[int, torch.Tensor]] = {}
        out = {}
        for name, t in state.items():
            m = pattern.match(name)
            if m:
                per.setdefault(m[2], {})[int(m[1])] = t
            else:
                out[name] = t
        if set(per) != set(self.expert_projs):  # nothing per-expert (already fused), or not this layout
            return state
        gate, up, down = (torch.stack([w for _, w in sorted(per[p].items())]) for p in self.expert_projs)
        out[f"{self.experts}.{FUSED_GATE_UP}"] = torch.cat([gate, up], dim=1)
        out[f"{self.experts}.{FUSED_DOWN}"] = down
        return out


@dataclass(frozen=True)
class GGUFTarget:
    """Where a Hugging Face tensor lives in a GGUF file and how its indices and values translate.

    `expert`: the slice of a stacked 3-D expert tensor; `row_order[r]`: the GGUF row holding Hugging Face
    row r (None: same order); `norm_added`: what the converter added to the stored values (Gemma norms: 1).
    """

    name: str
    expert: int | None = None
    row_order: tuple[int, ...] | None = None
    norm_added: float = 0.0


def rope_row_order(rows: int, n_head: int) -> tuple[int, ...]:
    """GGUF row of each Hugging Face row of q_proj/k_proj after llama.cpp's rotary permutation.

    llama.cpp's `permute` reshapes the rows to (head, 2, d/2) and swaps the last two axes: Hugging Face
    row h*d + j*d/2 + i (half j, pair i) is stored at h*d + 2*i + j.
    """
    d = rows // n_head
    half = d // 2
    return tuple(h * d + 2 * i + j for h in range(n_head) for j in range(2) for i in range(half))


# llama.cpp names of the per-layer modules (gguf's tensor_mapping, MODEL_TENSOR.*), shared by most families
GGUF_LAYER: tuple[tuple[str, str], ...] = (
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("self_attn.qkv_proj", "attn_qkv"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("mlp.gate_up_proj", "ffn_up"),  # Phi-3's fused gate/up is stored as ffn_up
    ("mlp.gate", "ffn_gate_inp"),
    ("mlp.experts.gate_proj", "ffn_gate_exps"),
    ("mlp.experts.up_proj", "ffn_up_exps"),
    ("mlp.experts.down_proj", "ffn_down_exps"),
)
# Gemma 2/3 and OLMo 2 have a norm after attention that is not the FFN input norm
_GGUF_POST_NORMS = (("post_attention_layernorm", "post_attention_norm"),
                    ("pre_feedforward_layernorm", "ffn_norm"),
                    ("post_feedforward_layernorm", "post_ffw_norm"))
GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def _gguf_with(*overrides: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    keys = {k for k, _ in overrides}
    return tuple(overrides) + tuple(kv for kv in GGUF_LAYER if kv[0] not in keys)


def gguf_target(family: Family, hf_name: str, config: dict) -> GGUFTarget:
    """The GGUF tensor (and index translation) for a Hugging Face tensor name of this family."""
    if hf_name in GGUF_GLOBAL:
        return GGUFTarget(GGUF_GLOBAL[hf_name])
    m = re.fullmatch(re.escape(family.layers).replace(r"\{i\}", r"(\d+)") + r"(.+)\.weight", hf_name)
    if m is None:
        raise UserError(f"{hf_name}: no GGUF name known for this tensor of a {family.name} model")
    layer, module = int(m[1]), m[2]
    expert = None
    if family.experts and (e := re.fullmatch(rf"{re.escape(family.experts)}\.(\d+)\.(\w+)", module)):
        expert, module = int(e[1]), f"{family.experts}.{e[2]}"
    names = dict(family.gguf_layer)
    if module not in names:
        raise UserError(f"{hf_name}: no GGUF name known for {quote(module)} in a {family.name} model")
    gguf = names[module]
    row_order = None
    if family.gguf_rope_permuted and gguf in ("attn_q", "attn_k"):
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        n = heads if gguf == "attn_q" else kv_heads
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        row_order = rope_row_order(n * head_dim, n)
    added = family.gguf_norm_added if gguf.endswith("norm") else 0.0
    return GGUFTarget(f"blk.{layer}.{gguf}.weight", expert, row_order, added)


_POST_NORMS = {"ffn_norm": "pre_feedforward_layernorm", "ffn_post_norm": "post_feedforward_layernorm"}

_GEMMA_GGUF = {"gguf_norm_added": 1.0, "gguf_layer": _gguf_with(*_GGUF_POST_NORMS)}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), gguf_rope_permuted=True),
    Family("mistral", ("mistral",), gguf_rope_permuted=True),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",), qk_norm=True),
    Family("qwen3-moe", ("qwen3_moe",), experts="mlp.experts", qk_norm=True),
    Family("mixtral", ("mixtral",), experts="mlp.experts", expert_projs=("w1", "w3", "w2"),
           disk_renames=(("mlp.", "block_sparse_moe."),)),
    Family("qwen2-moe", ("qwen2_moe",), experts="mlp.experts", shared_down="mlp.shared_expert.down_proj",
           shared_gate="mlp.shared_expert_gate"),
    Family("gemma", ("gemma",), norm_offset=1.0, gguf_norm_added=1.0),
    Family("gemma2", ("gemma2",), norm_offset=1.0, **_POST_NORMS, **_GEMMA_GGUF),
    Family("gemma3", ("gemma3_text",), norm_offset=1.0, qk_norm=True, **_POST_NORMS, **_GEMMA_GGUF),
    Family("phi3", ("phi3",), attn_inputs=("self_attn.qkv_proj",)),
    Family("olmo2", ("olmo2",), attn_norm=None, ffn_norm=None, ffn_post_norm="post_feedforward_layernorm",
           qk_norm=True, gguf_layer=_gguf_with(*_GGUF_POST_NORMS)),
    # hybrids: attention layers and layers with another token mixer, each with its own FFN
    Family("bamba", ("bamba",), ffn="feed_forward", ffn_norm="pre_ff_layernorm", ffn_down="feed_forward.down_proj",
           final_norm="model.final_layernorm.weight", mixers=(Mixer("linear_attention", "state-space", "mamba"),)),
    Family("jamba", ("jamba",), ffn="feed_forward", ffn_norm="pre_ff_layernorm", ffn_down="feed_forward.down_proj",
           experts="feed_forward.experts", final_norm="model.final_layernorm.weight",
           mixers=(Mixer("linear_attention", "state-space", "mamba"),)),
    Family("lfm2", ("lfm2",), attn_norm="operator_norm", ffn="feed_forward", ffn_norm="ffn_norm",
           ffn_down="feed_forward.w2", final_norm="model.embedding_norm.weight",
           mixers=(Mixer("conv", "conv", "conv"),)),
)

def supported() -> str:
    """Every supported model_type, for error messages."""
    return ", ".join(t for f in FAMILIES for t in f.model_types)


# A checkpoint that needs run-time code (a token-selective custom layer) declares a model type and
# architecture names no stock engine knows, so that transformers without remote code, vLLM without
# melsurgery's plugin and llama.cpp's converter refuse it instead of running the base model; its base
# architecture is recorded under BASE_KEY for melsurgery's own code. The shipped custom layer
# (engines/modeling_melsurgery.py) spells the same contract: it cannot import this package.
PATCHED_MODEL_TYPE = "melsurgery"
PATCHED_ARCH_PREFIX = "Melsurgery"
BASE_KEY = "melsurgery_base"
WEMASK_KEY = "melsurgery_wemask"  # the custom layer's spec


def base_config(config: dict) -> dict:
    """config.json as its base architecture reads it: a patched config's own model type, architecture names
    and remote-code map replaced by the base's (recorded under BASE_KEY); any other config unchanged."""
    if config.get("model_type") != PATCHED_MODEL_TYPE and BASE_KEY not in config:
        return config
    base = config.get(BASE_KEY)
    if not (isinstance(base, dict) and isinstance(base.get("model_type"), str)
            and isinstance(base.get("architectures"), list) and base["architectures"]
            and all(isinstance(a, str) for a in base["architectures"])):
        raise UserError(f"config.json: model type {PATCHED_MODEL_TYPE!r} needs {BASE_KEY} with the base model_type "
                        f"and architectures, got {base!r}; the checkpoint is damaged: patch its base again")
    rest = {k: v for k, v in config.items() if k not in (BASE_KEY, "auto_map")}
    return {**rest, "model_type": base["model_type"], "architectures": list(base["architectures"])}


def is_patched_config(config: dict) -> bool:
    """Whether a config.json declares melsurgery's own model type (a checkpoint that needs the custom layer)."""
    return config.get("model_type") == PATCHED_MODEL_TYPE or BASE_KEY in config


def has_custom_layer(config: dict) -> bool:
    """Whether a checkpoint runs melsurgery's custom layer (also one written before patches declared themselves)."""
    return is_patched_config(config) or WEMASK_KEY in config


def transformers_config(config: dict):
    """transformers' config object for a config.json dict, a patched one as its base architecture: nothing shipped
    with a checkpoint is imported."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**base_config(config))


def family_for(config: dict) -> Family:
    """The family entry for a config (a patched config's base architecture), or a UserError naming what is supported."""
    model_type = base_config(config).get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UserError(f"unsupported architecture {quote(model_type)}; melsurgery supports: {supported()}")


def submodule(root: object, path: str) -> object:
    """The module at a dotted path (`self_attn.q_proj`) below `root`."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def fused_experts(experts: object) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    """A fused expert bank's (gate/up [E, 2I, D], down [E, D, I], activation), as transformers holds them."""
    return getattr(experts, FUSED_GATE_UP), getattr(experts, FUSED_DOWN), getattr(experts, EXPERT_ACT)


def norm_eps(norm: object) -> float:
    """The epsilon a norm module adds under its root (1e-6 when it names it otherwise)."""
    return float(next((getattr(norm, a) for a in NORM_EPS_ATTRS if hasattr(norm, a)), 1e-6))


def has_submodule(root: object, path: str) -> bool:
    """Whether `root` has a module at the dotted path (hybrid layers lack some)."""
    try:
        submodule(root, path)
    except AttributeError:
        return False
    return True
