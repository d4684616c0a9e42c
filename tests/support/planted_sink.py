"""Planted Llama models for the per-layer wemask figures and the search (built on planted.build_model; ME
Layer 3, dim 17).

- `growth_model`: the massive value grows about tenfold after the ME Layer while the ordinary tokens'
  value in the massive dim passes the ME Layer's massive value, so that no single threshold over all
  layers separates the massive tokens (the per-layer selector must).
- `sink_model`: the sink of layers 4 and 5 is written through `SINK_DIM` of the massive token's attention
  input, which the keys read, while the keys ignore the massive dim: masking by magnitude leaves the
  sink alone, masking by sink attribution removes it.
- `masked_sink_model`: a sink in the last layer only, which one masked layer removes at almost no KL while
  every other way to it costs far more: the planted answer of a search (tune, `patch --max-kl`).

Both use a *constant* embedding dim `CONST_DIM` (1 on every token but BOS, and no layer writes it) as a
direction that every ordinary token carries.
"""

from __future__ import annotations

import torch

from tests.support.planted import Plant, build_model, llama_config, save_model

PLANT = Plant()
CONST_DIM = 6
SINK_DIM = 9


def _constant_dim(model, dims: tuple[int, ...]) -> None:
    """No layer writes `dims`; the embedding holds 1 in CONST_DIM on every token but BOS, 0 elsewhere."""
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            p[list(dims), :] = 0.0
    emb = model.get_input_embeddings().weight
    emb[:, list(dims)] = 0.0
    emb[:, CONST_DIM] = 1.0
    emb[1, CONST_DIM] = 0.0


def growth_model():
    model = build_model(llama_config())
    layers = model.model.layers
    with torch.no_grad():
        _constant_dim(model, (CONST_DIM,))
        mlp = layers[PLANT.layer + 1].mlp
        grow, ordinary = 7, 8  # neurons of layer 4: one reads the massive dim, one the constant dim
        for j, dim, weight, write in ((grow, PLANT.dim, 1.0, 280.0), (ordinary, CONST_DIM, 5.0, 80.0)):
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[j].zero_()
                proj.weight[j, dim] = weight
            mlp.down_proj.weight[:, j] = 0.0
            mlp.down_proj.weight[PLANT.dim, j] = write
    return model


def sink_model(key_weight: float = 6.0, query_weight: float = 6.0, write: float = 0.6):
    model = build_model(llama_config())
    layers = model.model.layers
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    slow = head // 2 - 1  # the rotary pair that turns slowest: scores hardly depend on distance
    with torch.no_grad():
        _constant_dim(model, (CONST_DIM, SINK_DIM))
        layers[PLANT.layer].mlp.down_proj.weight[SINK_DIM, PLANT.neuron] = write  # BOS only, beside the massive dim
        for layer in layers[PLANT.layer + 1 :]:
            attn = layer.self_attn
            attn.k_proj.weight[:, PLANT.dim] = 0.0
            for kv in range(cfg.num_key_value_heads):
                for r in (kv * head + slow, kv * head + slow + head // 2):
                    attn.k_proj.weight[r].zero_()
                    attn.k_proj.weight[r, SINK_DIM] = key_weight
            for q in range(cfg.num_attention_heads):
                for r in (q * head + slow, q * head + slow + head // 2):
                    attn.q_proj.weight[r].zero_()
                    attn.q_proj.weight[r, CONST_DIM] = query_weight
    return model


# --- A sink that one masked layer removes cheaply (tune and the budgeted patch find it) ---

SINK_LAYER = 5  # the last layer; the planted ME Layer is 3
HEAD_DIM, HEADS, KV_HEADS = 16, 4, 2
QUERY_DIM = 9  # a dim every token's embedding carries (1.0): every query reads it


def masked_sink_model(folder):
    """The planted model plus an attention sink in one layer only, that one masked layer removes cheaply.

    In layer 5 every query reads QUERY_DIM and every key reads the massive dim (17), on the lowest
    rotary frequency (so position hardly matters): all queries attend to the massive token. Masking dim
    17 of that token in layer 5's attention input removes the sink; layer 5's output projection is
    small, so the redistribution costs almost no KL. Layer 4's values read dim 17 strongly, so masking
    layer 4 too costs ~60x the KL for no further gain; cutting the massive value at the ME Layer
    (ffn-dampen) costs ~500x.
    """
    model = build_model(llama_config())
    layers = model.model.layers
    with torch.no_grad():
        model.model.embed_tokens.weight[:, QUERY_DIM] = 1.0
        att = layers[SINK_LAYER].self_attn
        low = HEAD_DIM // 2 - 1  # rotate_half pairs (low, low + HEAD_DIM/2) turn slowest
        for h in range(HEADS):
            for r, col in ((h * HEAD_DIM + low, QUERY_DIM), (h * HEAD_DIM + low + HEAD_DIM // 2, None)):
                att.q_proj.weight[r].zero_()
                if col is not None:
                    att.q_proj.weight[r, col] = 1.5
        for kv in range(KV_HEADS):
            att.k_proj.weight[kv * HEAD_DIM + low].zero_()
            att.k_proj.weight[kv * HEAD_DIM + low, 17] = 1.5
            att.k_proj.weight[kv * HEAD_DIM + low + HEAD_DIM // 2].zero_()
        att.o_proj.weight.mul_(0.1)
        layers[SINK_LAYER - 1].self_attn.v_proj.weight[:, 17] = 2.0 * torch.randn(KV_HEADS * HEAD_DIM)
    return save_model(model, folder)


# Tuning and held-out texts: distinct, each one window of 256 tokens (so each starts with BOS).
TUNE_TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
             "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.\n")
HELD_TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
             "lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound.\n")
