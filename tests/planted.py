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
    from transformers import LlamaConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=256, rms_norm_eps=1e-6,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def build_model(config, plant: Plant | None = Plant(), seed: int = 0):
    """A random model of `config`'s class, with `plant` engineered in (None: nothing planted)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)  # norm weights: non-trivial, so that norm edits show
        emb = model.get_input_embeddings().weight
        emb.normal_(0, 1.0)
        if plant is not None:
            emb[:, plant.marker] = 0.0
            emb[1, plant.marker] = 8.0
            mlp = model.model.layers[plant.layer].mlp
            mlp.gate_proj.weight[plant.neuron].zero_()
            mlp.up_proj.weight[plant.neuron].zero_()
            mlp.gate_proj.weight[plant.neuron, plant.marker] = plant.strength / 8
            mlp.up_proj.weight[plant.neuron, plant.marker] = plant.strength / 8
            mlp.down_proj.weight[:, plant.neuron] = 0.0
            mlp.down_proj.weight[plant.dim, plant.neuron] = 4.0
    return model


def save_model(model, folder: Path, dtype: torch.dtype = torch.float32, shards: int = 1, tokenizer=None) -> Path:
    """Write a Hugging Face folder with safetensors weights (optionally sharded) and a tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
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
