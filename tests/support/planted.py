"""Tiny random decoder models with a planted massive activation: exact ground truth for scan and patch.

The first token of every sequence is BOS (id 1). Its embedding alone carries a marker dim; at the
planted layer one FFN neuron reads that marker (gate and up rows) and its down-projection column
writes a large value into the planted dim. Nothing else is special, so the planted layer, dim, token
and neuron are the only right answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class Plant:
    layer: int = 3
    dim: int = 17
    neuron: int = 41
    marker: int = 5  # the embedding dim that only BOS carries
    strength: float = 30.0
    expert: int | str = 1  # MoE layers: the expert that holds the neuron (BOS is routed to it), or "shared"
    post_gain: float = 1000.0  # families that normalise the FFN output: the output norm's weight on `dim`


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(**overrides):
    return family_config("llama", **overrides)


BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(VOCAB), max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)

# Per model type: the config class and what differs from BASE. Windows of 8 tokens make the sliding
# layers differ from full attention on calibration text; Gemma 3 alternates local and global layers
# (each with its own rotary embedding); Qwen2 has full then sliding layers; Qwen3-MoE has one dense layer;
# Qwen2-MoE has a shared expert. The hybrids put the planted layer (3) on a non-attention mixer, with
# attention layers before and after it.
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         mlp_only_layers=[0], norm_topk_prob=True)),
    "gemma": ("GemmaConfig", dict(head_dim=16, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                    tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                             tie_word_embeddings=True,
                                             layer_types=["sliding_attention", "full_attention"] * 3)),
    "phi3": ("Phi3Config", dict(sliding_window=8)),
    "olmo2": ("Olmo2Config", {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=96, mlp_only_layers=[0])),
    "bamba": ("BambaConfig", dict(attn_layer_indices=[1, 4], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                                  mamba_n_groups=1, mamba_chunk_size=16)),
    "jamba": ("JambaConfig", dict(attn_layer_period=3, attn_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                                  expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8)),
    "lfm2": ("Lfm2Config", dict(layer_types=["conv", "full_attention", "conv", "conv", "full_attention", "conv"],
                                norm_eps=1e-6)),
}


def family_config(model_type: str, **overrides):
    """A tiny config of one family (hidden 64, 6 layers), from its transformers config class."""
    import transformers

    cls, extra = FAMILY_CONFIGS[model_type]
    return getattr(transformers, cls)(**{**BASE, **extra, **overrides})


def _norm_offset(norm) -> float:
    """1.0 for norms that multiply by (1 + g) (Gemma), 0.0 for those that multiply by g: asked of the module."""
    saved = norm.weight.detach().clone()
    norm.weight.zero_()
    out = norm(torch.ones(1, saved.numel()))
    norm.weight.copy_(saved)
    return float(out.abs().max())


def _params(module, suffixes: tuple[str, ...]) -> list[torch.Tensor]:
    return [p for name, p in module.named_parameters() if name.endswith(suffixes)]


# rows (dim -2): residual dims written
WRITERS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "w2.weight", "experts.down_proj")
FFN_READERS = ("gate_proj.weight", "up_proj.weight", "gate_up_proj")  # last dim: residual dims read


def build_model(config, plant: Plant | None = Plant(), seed: int = 0):
    """A random model of `config`'s class, with `plant` engineered in (None: nothing planted).

    Only BOS carries the marker dim. The planted neuron's gate and up rows read the marker and its down
    column writes `dim`. MoE: the neuron lives in expert `plant.expert`, and the router sends BOS there.

    Where the FFN output is normalised before joining the residual (Gemma 2/3, OLMo 2) the size of a
    write is lost, so selectivity must be exact: no layer writes the marker (the output projections'
    rows for it are tiny), no other neuron of the planted layer writes `dim`, and the output norm's
    weight on `dim` is `post_gain` (as in the real models, that norm sets the massive value). Later
    FFNs hardly read `dim` (OLMo 2's FFNs read the raw residual and would overflow fp16). In hybrids no
    layer writes the marker either: a convolution or state space would carry BOS's into later tokens.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    layers = model.model.layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norm weights: non-trivial, so that norm edits show; effective 0.5-1.5
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0, 0.05)
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.sub_(_norm_offset(module))
        emb = model.get_input_embeddings()
        scale = getattr(emb, "scalar_embed_scale", 1.0)  # Gemma multiplies embeddings by sqrt(hidden)
        emb.weight.normal_(0, 1.0 / scale)
        if plant is None:
            return model
        m, d, j = plant.marker, plant.dim, plant.neuron
        emb.weight[:, m] = 0.0
        emb.weight[1, m] = 8.0 / scale
        mlp = getattr(layers[plant.layer], "mlp", None) or layers[plant.layer].feed_forward  # hybrids: feed_forward
        if plant.expert == "shared":  # Qwen2-MoE: a dense expert every token passes through, gated per token
            mlp.shared_expert_gate.weight[0, m] = 2.0
            mlp = mlp.shared_expert
        if hasattr(mlp, "experts"):  # fused expert bank [E, 2I, D] / [E, D, I], gate rows first
            ex, e = mlp.experts, plant.expert
            inter = ex.down_proj.shape[2]
            rows = [ex.gate_up_proj[e, j], ex.gate_up_proj[e, inter + j]]
            down = ex.down_proj[e, :, j]
            (getattr(mlp, "gate", None) or mlp.router).weight[e, m] = 2.0  # Jamba: router
        elif hasattr(mlp, "gate_up_proj"):  # Phi-3: gate rows, then up rows
            inter = mlp.down_proj.in_features
            rows = [mlp.gate_up_proj.weight[j], mlp.gate_up_proj.weight[inter + j]]
            down = mlp.down_proj.weight[:, j]
        elif hasattr(mlp, "w2"):  # LFM2: silu(w1 x) * w3 x, down projection w2
            rows = [mlp.w1.weight[j], mlp.w3.weight[j]]
            down = mlp.w2.weight[:, j]
        else:
            rows = [mlp.gate_proj.weight[j], mlp.up_proj.weight[j]]
            down = mlp.down_proj.weight[:, j]
        for row in rows:
            row.zero_()
            row[m] = plant.strength / 8
        down.zero_()
        post = getattr(layers[plant.layer], "post_feedforward_layernorm", None)
        if post is not None or not all(hasattr(layer, "self_attn") for layer in layers):
            # convolutions and state spaces carry BOS's marker into later tokens: no layer may write it
            for p in _params(layers, WRITERS):
                p[..., m, :] *= 1e-3
        if post is not None:
            for p in _params(mlp, WRITERS):
                p[..., d, :] = 0.0
            for p in _params(layers[plant.layer + 1 :], FFN_READERS):
                p[..., d] *= 1e-2
            post.weight[d] = plant.post_gain - _norm_offset(post)
        down[d] = 4.0
    return model


def _checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The state dict as published checkpoints store it, by transformers' own reverse conversion (what
    save_pretrained writes): MoE experts one tensor per expert and projection, Mixtral's
    `block_sparse_moe.experts.N.w1/w2/w3`."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(model.state_dict()))


def save_model(model, folder: Path, dtype: torch.dtype = torch.float32, shards: int = 1, tokenizer=None) -> Path:
    """Write a Hugging Face folder with safetensors weights (optionally sharded) and a tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in _checkpoint_state(model).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    names = list(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        per = -(-len(names) // shards)
        for k in range(shards):
            part = names[k * per : (k + 1) * per]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, folder / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
            total += sum(state[n].numel() * state[n].element_size() for n in part)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (tokenizer or make_tokenizer()).save_pretrained(folder)
    return folder


def planted_folder(folder: Path, config=None, plant: Plant | None = Plant(), **save_kw) -> Path:
    return save_model(build_model(config or llama_config(), plant), folder, **save_kw)
