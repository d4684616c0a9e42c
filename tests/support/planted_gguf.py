"""Planted models written as GGUF with the gguf package's GGUFWriter, the way llama.cpp's converter does.

Names, the rotary row permutation of q/k and Gemma's stored norms come from the architecture entry
(the same knowledge the patcher uses; `test_gguf.py` checks it against transformers' GGUF loader, which
is independent of it). Matrices are quantised with gguf's quantisers; norms stay F32, as in llama.cpp.
A type without a gguf quantiser (K-quants) is written from raw bytes: valid blocks with small scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

from melsurgery.architectures import family_for, gguf_target

Q = GGMLQuantizationType


def _kquant_bytes(shape: tuple[int, ...], qtype, seed: int) -> np.ndarray:
    """Random but valid blocks: every f16 scale a small finite number, the rest random bits."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n_blocks = int(np.prod(shape)) // bs
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    scale = np.full((n_blocks,), 1e-3, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin first
        raw[:, 0:2] = scale
        raw[:, 2:4] = scale
    else:  # Q6_K: d last
        raw[:, -2:] = scale
    return raw.reshape(*shape[:-1], shape[-1] // bs * ts)


def write_gguf(model, path: Path, matrix_type=Q.F32, kquant: tuple[str, object] | None = None) -> Path:
    """Write `model` (a planted transformers model) as a llama.cpp GGUF.

    2-D tensors get `matrix_type`; `kquant` = (llama.cpp role such as "ffn_down", K-quant type) stores
    that role's tensors as random valid K-quant blocks (the gguf package cannot quantise K-quants).
    """
    config = model.config.to_dict()
    family = family_for(config)
    arch = "llama"
    w = GGUFWriter(str(path), arch)
    c = model.config
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(int(matrix_type))
    # a byte-level BPE vocabulary without merges: one token per character, ids as the planted tokenizer's
    from tests.support.planted import VOCAB

    byte_level = {" ": "\u0120", "\n": "\u010a"}
    tokens = [byte_level.get(t, t) for t in VOCAB]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges([])
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_string("general.license", "apache-2.0")
    for k, (name, t) in enumerate(model.state_dict().items()):
        target = gguf_target(family, name, config)
        data = t.detach().float().numpy().copy()
        if target.row_order is not None:
            permuted = np.empty_like(data)
            permuted[list(target.row_order)] = data
            data = permuted
        data = data + np.float32(target.norm_added) if target.norm_added else data
        if data.ndim == 1:
            w.add_tensor(target.name, data.astype(np.float32))
        elif kquant is not None and target.name.endswith(f".{kquant[0]}.weight"):
            w.add_tensor(target.name, _kquant_bytes(data.shape, kquant[1], k), raw_dtype=kquant[1])
        elif matrix_type == Q.F32:
            w.add_tensor(target.name, data.astype(np.float32))
        else:
            w.add_tensor(target.name, quants.quantize(data, matrix_type), raw_dtype=matrix_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
