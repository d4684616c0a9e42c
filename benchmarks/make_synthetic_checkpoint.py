#!/usr/bin/env python
"""Write a random-weight Llama checkpoint with real shapes and a planted massive activation.

Benchmarks need a model as big as the ones users patch (7-8B parameters), and no such model can be
downloaded here. Random weights have the right shapes and sizes; the planted neuron gives `scan`
something real to find, so the scan and patch paths do the same work they do on a real model.

The model is written tensor by tensor: each tensor is generated, added to the current shard and the
shard is flushed when it reaches `--shard-gb`, so memory stays about one shard whatever the model size.

Planting (as in tests/support/planted.py): only the BOS embedding row carries the marker dim; at the planted
layer one FFN neuron's gate and up rows read the marker and its down column writes `--massive-value`
into the planted dim. Layers up to the planted one never write into the marker dim, so no other token
reaches that neuron. Random weights are small (std 0.02, output projections 0.02/sqrt(2 * layers), as
in GPT-2's initialisation) so that the random residual stream stays near 1 and the planted value is
massive by the usual definition (|h| > 100 and > 1000x the layer median).

    python benchmarks/make_synthetic_checkpoint.py /tmp/llama2-7b --preset llama2-7b
    python benchmarks/make_synthetic_checkpoint.py /tmp/tiny --preset llama2-7b --layers 4
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=500000.0),
}
# Where the massive activation sits in the real models (Sun et al. 2024), so the synthetic one looks alike.
PLANT_DEFAULTS = {"llama2-7b": dict(layer=1, dim=1415, neuron=7890), "llama3-8b": dict(layer=1, dim=788, neuron=9000)}
SPECIAL = ["<unk>", "<s>", "</s>"]
BOS = 1
EOS = 2
GATE_INPUT = 16.0  # the planted neuron's gate and up pre-activations on BOS: silu(16) * 16 ~ 256
MARKER_VALUE = 8.0


@dataclass(frozen=True)
class Plant:
    layer: int
    dim: int
    neuron: int
    marker: int
    value: float


@dataclass(frozen=True)
class Spec:
    """One tensor to generate: its name, shape, and how to fill it."""

    name: str
    shape: tuple[int, ...]
    std: float  # 0: a norm weight, filled with ones

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # bf16


def tensor_specs(cfg: dict, init_layers: int) -> list[Spec]:
    """Every tensor of a Llama checkpoint, in the order transformers writes them.

    Output projections are scaled for `init_layers` (the preset's depth), so that a run with fewer
    layers has the same per-layer statistics as the full model, just fewer of them.
    """
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    out_std = 0.02 / math.sqrt(2 * init_layers)
    specs = [Spec("model.embed_tokens.weight", (v, d), 1.0)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            Spec(p + "input_layernorm.weight", (d,), 0.0),
            Spec(p + "self_attn.q_proj.weight", (d, d), 0.02),
            Spec(p + "self_attn.k_proj.weight", (kv, d), 0.02),
            Spec(p + "self_attn.v_proj.weight", (kv, d), 0.02),
            Spec(p + "self_attn.o_proj.weight", (d, d), out_std),
            Spec(p + "post_attention_layernorm.weight", (d,), 0.0),
            Spec(p + "mlp.gate_proj.weight", (f, d), 0.02),
            Spec(p + "mlp.up_proj.weight", (f, d), 0.02),
            Spec(p + "mlp.down_proj.weight", (d, f), out_std),
        ]
    return specs + [Spec("model.norm.weight", (d,), 0.0), Spec("lm_head.weight", (v, d), 0.02)]


def plan_shards(specs: list[Spec], shard_bytes: int) -> list[list[Spec]]:
    """Group tensors, in order, into shards of at most `shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def generate(spec: Spec, index: int, seed: int, plant: Plant) -> torch.Tensor:
    """One tensor in bf16, reproducible on its own (seeded by its position), planting applied."""
    if spec.std == 0.0:
        return torch.ones(spec.shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    t = torch.empty(spec.shape, dtype=torch.float32)
    t.normal_(0.0, spec.std, generator=g)
    _plant(spec.name, t, plant)
    return t.to(torch.bfloat16)


def _plant(name: str, t: torch.Tensor, plant: Plant) -> None:
    if name == "model.embed_tokens.weight":
        t[:, plant.marker] = 0.0
        t[BOS, plant.marker] = MARKER_VALUE
        return
    if not name.startswith("model.layers."):
        return
    layer = int(name.split(".")[2])
    # Keep the marker nearly clean, so that only BOS drives the planted neuron hard (not exactly clean:
    # a neuron that is exactly silent on every other token would be unrealistically perfect).
    if layer <= plant.layer and name.endswith("self_attn.o_proj.weight"):
        t[plant.marker] *= 0.01
    if layer < plant.layer and name.endswith("mlp.down_proj.weight"):
        t[plant.marker] *= 0.01
    if layer != plant.layer:
        return
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        t[plant.neuron] = 0.0
        t[plant.neuron, plant.marker] = GATE_INPUT / MARKER_VALUE
    elif name.endswith("mlp.down_proj.weight"):
        t[:, plant.neuron] = 0.0
        act = GATE_INPUT * GATE_INPUT * torch.sigmoid(torch.tensor(GATE_INPUT)).item()  # silu(g) * g
        t[plant.dim, plant.neuron] = plant.value / act


def llama_config(cfg: dict) -> dict:
    """config.json of the model, as transformers writes it."""
    from transformers import LlamaConfig

    shape = {k: v for k, v in cfg.items() if k != "rope_theta"}
    config = LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
                         tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    out = config.to_dict()
    out["architectures"] = ["LlamaForCausalLM"]
    out["dtype"] = "bfloat16"
    return out


def save_char_tokenizer(folder: Path, vocab_size: int) -> None:
    """A character-level WordLevel tokenizer (printable ASCII) that prepends BOS: tiny, and fits any vocab."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
    if len(vocab) > vocab_size:
        raise SystemExit(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(vocab)} tokens")
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.save_pretrained(folder)


def write_checkpoint(folder: Path, cfg: dict, plant: Plant, shard_gb: float, seed: int,
                     init_layers: int | None = None) -> Iterator[str]:
    """Write all shards, the index, config and tokenizer; yields each file name as it is written."""
    specs = tensor_specs(cfg, init_layers or cfg["num_hidden_layers"])
    shards = plan_shards(specs, int(shard_gb * 1e9))
    n = len(shards)
    weight_map: dict[str, str] = {}
    index = 0
    for k, group in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        state = {}
        for spec in group:
            state[spec.name] = generate(spec, index, seed, plant)
            weight_map[spec.name] = fname
            index += 1
        save_file(state, folder / fname, metadata={"format": "pt"})
        (folder / fname).chmod(0o644)  # safetensors creates 0600; a model folder is normally world-readable
        del state
        yield fname
    if n > 1:
        total = sum(s.nbytes for s in specs)
        index_obj = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_obj, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(llama_config(cfg), indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS}, indent=2) + "\n")
    save_char_tokenizer(folder, cfg["vocab_size"])
    plant_info = {"layer": plant.layer, "dim": plant.dim, "neuron": plant.neuron, "marker": plant.marker,
                  "value": plant.value, "token": 0}
    (folder / "synthetic.json").write_text(json.dumps({"plant": plant_info, "seed": seed}, indent=2) + "\n")
    yield "config.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="Output folder (must not exist unless --overwrite).")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b")
    ap.add_argument("--layers", type=int, help="Override the number of decoder layers (smaller runs).")
    ap.add_argument("--hidden", type=int, help="Override hidden size (tests).")
    ap.add_argument("--intermediate", type=int, help="Override FFN size (tests).")
    ap.add_argument("--vocab", type=int, help="Override vocab size (tests).")
    ap.add_argument("--kv-heads", type=int, help="Override the number of key/value heads (grouped-query attention).")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="Shard size in GB (default 5).")
    ap.add_argument("--plant-layer", type=int, help="Layer whose FFN writes the massive value.")
    ap.add_argument("--plant-dim", type=int, help="Hidden dim that carries it.")
    ap.add_argument("--plant-neuron", type=int, help="FFN neuron that writes it.")
    ap.add_argument("--marker-dim", type=int, default=100, help="Embedding dim only BOS carries.")
    ap.add_argument("--massive-value", type=float, default=3000.0,
                    help="Target size of the planted activation (the BOS norm makes it come out somewhat smaller).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    cfg = dict(PRESETS[args.preset])
    for key, val in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden),
                     ("intermediate_size", args.intermediate), ("vocab_size", args.vocab),
                     ("num_key_value_heads", args.kv_heads)):
        if val is not None:
            cfg[key] = val
    defaults = PLANT_DEFAULTS[args.preset]

    def pick(given: int | None, default: int, size: int) -> int:
        return given if given is not None else default % size

    plant = Plant(
        layer=pick(args.plant_layer, min(defaults["layer"], cfg["num_hidden_layers"] - 2), cfg["num_hidden_layers"]),
        dim=pick(args.plant_dim, defaults["dim"], cfg["hidden_size"]),
        neuron=pick(args.plant_neuron, defaults["neuron"], cfg["intermediate_size"]),
        marker=args.marker_dim % cfg["hidden_size"],
        value=args.massive_value,
    )
    if plant.dim == plant.marker:
        raise SystemExit("--plant-dim and --marker-dim must differ")
    if args.out.exists():
        if not args.overwrite:
            raise SystemExit(f"{args.out}: exists; pass --overwrite")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    start = time.perf_counter()
    init_layers = PRESETS[args.preset]["num_hidden_layers"]
    for name in write_checkpoint(args.out, cfg, plant, args.shard_gb, args.seed, init_layers):
        print(f"{time.perf_counter() - start:7.1f}s  wrote {name}", file=sys.stderr)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{args.out}: {size / 1e9:.2f} GB, plant {plant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
