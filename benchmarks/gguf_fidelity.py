#!/usr/bin/env python
"""Measure how closely a GGUF patch carries a recipe: KL of the GGUF patch and of the safetensors patch of the
same recipe, against the same base, on the same windows (the first N windows of `verify`'s text, as
`verify --windows N --max-tokens T` cuts them; `verify`'s definitions of KL and top-1 agreement; transformers'
fp32 forward). The GGUF patch is read as transformers' GGUF loader reads it: the source's conversion with the
edited tensors dequantised from the bytes written (`scripts/check_ggml.py` checks that llama.cpp's own
dequantisers read the same values). Not part of CI.

    python benchmarks/gguf_fidelity.py --source default --windows 4 --json out/fidelity-q4_1.json
    python benchmarks/gguf_fidelity.py --source model.Q4_K_M.gguf --windows 4 --json out/fidelity-q4_k_m.json

One scan per source, one fit of first-token (shared by both patches), each recipe with its defaults.

A Q4_K_M source (the gguf package cannot quantise K-quants): the default model requantised with llama.cpp's
own quantiser, `ggml_quantize_chunk` of libggml-base (the first library a llama-cpp-python source build
compiles, under build/bin of its build folder), tensor types chosen as llama.cpp's Q4_K_M does:

    python benchmarks/gguf_fidelity.py --write-q4-k-m BUILD/bin/libggml-base.so /tmp/SmolLM2-135M-Instruct.Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RECIPES = ("ffn-dampen", "norm-rescale", "me-norm", "first-token")


def _figures(model, windows: list[list[int]], base: list) -> tuple[float, float, list]:
    """Mean KL(base || model) per predicted token and top-1 agreement with base, as `verify` defines them."""
    import torch

    kls, agree, n, out = [], 0, 0, []
    with torch.no_grad():
        for k, ids in enumerate(windows):
            lp = model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
            out.append(lp)
            if base:
                lb = base[k]
                kls.append((lb.exp() * (lb - lp)).sum(-1))
                agree += int((lb.argmax(-1) == lp.argmax(-1)).sum())
                n += len(lb)
    if not base:
        return 0.0, 1.0, out
    return float(torch.cat(kls).mean()), agree / n, out


def _gguf_view(model, src, res) -> None:
    """The GGUF patch as transformers' GGUF loader reads it: the source's conversion (every tensor not edited is
    byte-identical to the source's) with each edited tensor replaced by gguf's dequantisation of the bytes
    written, in the Hugging Face layout (the inverse of the architecture entry's row order and norm offset)."""
    import torch

    from melsurgery.architectures import family_for, gguf_target
    from melsurgery.checkpoint.gguf_file import GGUFFile
    from melsurgery.checkpoint.reader import Checkpoint

    config = Checkpoint(src.folder).config
    family, written = family_for(config), GGUFFile(res.file)
    state = dict(model.named_parameters())
    for a in res.applied:
        target = gguf_target(family, a.hf_tensor, config)
        values = written.dequantise(a.tensor) - np.float32(target.norm_added)
        if target.row_order is not None:
            values = values[list(target.row_order)]
        with torch.no_grad():
            state[a.hf_tensor].copy_(torch.from_numpy(values))


def measure(source: str, recipes: list[str], windows: int, max_tokens: int, work: Path,
            scan_json: Path | None) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json, run_scan
    from melsurgery.measure.verify import eval_text, input_prefix, make_windows
    from melsurgery.recipes import resolve_recipes
    from melsurgery.surgery.gguf_patch import run_patch_gguf
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import fitted, run_patch

    src = resolve(source)
    scan = read_json(scan_json) if scan_json else run_scan(src)
    tok, base_model = load_tokenizer(src.folder), AutoModelForCausalLM.from_pretrained(src.folder, dtype="float32")
    rows, bases = [], {}
    for spec in recipes:  # NAME or NAME:KEY=VALUE (first-token:of=chat)
        recipe, _, param = spec.partition(":")
        params = dict([param.split("=", 1)]) if param else {}
        man = fitted(Manifest(model=source, recipes=resolve_recipes([(recipe, params)])), src, scan)
        prefix = input_prefix(man.recipes)  # as verify opens the windows for this patch
        if prefix not in bases:
            ids = make_windows(tok, eval_text(None)[0], max_tokens, windows, prefix).ids
            bases[prefix] = ids, _figures(base_model.eval(), ids, [])[2]
        ids, base = bases[prefix]
        tag = f"{src.origin_file.stem}-{recipe}"
        st = run_patch(src, work / f"{tag}-st", man, scan=scan, overwrite=True)
        gg = run_patch_gguf(src, work / f"{tag}.gguf", man, scan=scan, overwrite=True)
        st_kl, st_top1, _ = _figures(AutoModelForCausalLM.from_pretrained(st.out, dtype="float32").eval(), ids, base)
        model = AutoModelForCausalLM.from_pretrained(src.folder, dtype="float32").eval()
        _gguf_view(model, src, gg)
        gg_kl, gg_top1, _ = _figures(model, ids, base)
        rows.append({"source": src.origin_file.name, "recipe": recipe, "window_prefix": prefix,
                     "params": dict(man.recipes[0][1]),
                     "safetensors": {"kl_mean": st_kl, "top1": st_top1}, "gguf": {"kl_mean": gg_kl, "top1": gg_top1},
                     "ratio": gg_kl / st_kl if st_kl else None,
                     "source_bytes": src.origin_file.stat().st_size, "gguf_bytes": gg.file.stat().st_size,
                     "edits": [{"tensor": a.tensor, "type": a.type, "written_type": a.written_type,
                                "edit_error": a.edit_error, "source_type_error": a.source_type_error,
                                "bytes_added": a.bytes_added} for a in gg.applied]})
        rows[-1]["params"].pop("row", None)  # first-token's fitted row: 576 numbers
        print(json.dumps(rows[-1]), flush=True)
    return rows


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layer: int):
    """llama.cpp's choice for Q4_K_M (llama-quant.cpp, llama_tensor_get_type) as it plays out on a dense Llama:
    Q6_K for the tied embedding and for attn_v / ffn_down in the layers `use_more_bits` picks, Q4_K for the other
    matrices, a row length that is not a multiple of 256 falling back (Q4_K to Q5_0, Q6_K to Q8_0); 1-D F32."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1:
        return Q.F32
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    more = layer is not None and (layer < n_layer // 8 or layer >= 7 * n_layer // 8
                                  or (layer - n_layer // 8) % 3 == 2)
    wide = name == "token_embd.weight" or (more and name.endswith(("attn_v.weight", "ffn_down.weight")))
    if shape[-1] % 256:
        return Q.Q8_0 if wide else Q.Q5_0
    return Q.Q6_K if wide else Q.Q4_K


def write_q4_k_m(ggml: Path, out: Path) -> None:
    """The default model requantised to Q4_K_M with llama.cpp's own quantiser (`ggml_quantize_chunk` of the
    libggml-base that a llama-cpp-python source build compiles first), from its dequantised Q4_1 values."""
    import ctypes

    from melsurgery.checkpoint.gguf_file import GGUFFile
    from melsurgery.checkpoint.source import default_gguf
    from melsurgery.checkpoint.writer import copy_spliced

    lib = ctypes.CDLL(str(ggml))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    gf = GGUFFile(default_gguf())
    n_layer = int(gf.value("llama.block_count"))
    data, types = {}, {}
    for name, info in gf.tensors.items():
        qtype = q4_k_m_type(name, info.shape, n_layer)
        values = np.ascontiguousarray(gf.dequantise(name), dtype=np.float32)
        rows, n = values.size // info.shape[-1], info.shape[-1]
        dst = np.zeros(lib.ggml_row_size(int(qtype), n) * rows, dtype=np.uint8)
        size = lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, dst.ctypes.data, 0, rows, n, None)
        data[name], types[name] = dst[:size].tobytes(), (qtype, size)
    header = gf.header({}, types)
    splices = {0: (gf.data_offset, lambda _old: header)}
    for name, d in data.items():
        padded = d + bytes(-len(d) % gf.alignment)
        splices[gf.tensors[name].start] = (gf.padded_end(name), lambda _old, b=padded: b)
    copy_spliced(gf.path, out, splices)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="default", help="A GGUF source: default or a .gguf file")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/melsurgery-gguf-fidelity"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--scan", type=Path, help="A scan JSON to plan from (else the source is scanned)")
    ap.add_argument("--write-q4-k-m", nargs=2, type=Path, metavar=("LIBGGML_BASE", "OUT"),
                    help="Only write the default model requantised to Q4_K_M with llama.cpp's quantiser")
    a = ap.parse_args(argv)
    if a.write_q4_k_m:
        write_q4_k_m(*a.write_q4_k_m)
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    rows = measure(a.source, a.recipes.split(","), a.windows, a.max_tokens, a.work, a.scan)
    if a.json:
        a.json.write_text(json.dumps({"windows": a.windows, "max_tokens": a.max_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
