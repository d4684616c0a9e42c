#!/usr/bin/env python
"""Measure how closely a GGUF patch carries a recipe: KL of the GGUF patch and of the safetensors patch of the
same recipe, against the same base, on the same held-out windows (`verify`'s definitions, transformers' fp32
forward; the GGUF read through transformers' GGUF loader). Not part of CI.

    python scripts/gguf_fidelity.py --source default --windows 4 --json out/fidelity-q4_1.json
    python scripts/gguf_fidelity.py --source model.Q4_K_M.gguf --windows 4 --json out/fidelity-q4_k_m.json

One scan per source, one fit of first-token (shared by both patches), each recipe with its defaults.

A Q4_K_M source (the gguf package cannot quantise K-quants): write the default model dequantised to F32
(`--write-f32 OUT.gguf`), then quantise it with llama.cpp's own quantiser through llama-cpp-python:

    python scripts/gguf_fidelity.py --write-f32 /tmp/smollm2-f32.gguf
    /work/venv-llamacpp/bin/python scripts/gguf_fidelity.py --q4-k-m /tmp/smollm2-f32.gguf /tmp/smollm2-Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECIPES = ("ffn-dampen", "norm-rescale", "me-norm", "first-token")


def measure(source: str, recipes: list[str], windows: int, max_tokens: int, work: Path,
            scan_json: Path | None) -> list[dict]:
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json, run_scan
    from melsurgery.measure.verify import run_verify
    from melsurgery.recipes import resolve_recipes
    from melsurgery.surgery.gguf_patch import run_patch_gguf
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import fitted, run_patch

    src = resolve(source)
    scan = read_json(scan_json) if scan_json else run_scan(src)
    rows = []
    for recipe in recipes:
        man = fitted(Manifest(model=source, recipes=resolve_recipes([(recipe, {})])), src, scan)
        tag = f"{src.origin_file.stem}-{recipe}"
        st = run_patch(src, work / f"{tag}-st", man, scan=scan, overwrite=True)
        gg = run_patch_gguf(src, work / f"{tag}.gguf", man, scan=scan, overwrite=True)
        figures = {}
        for kind, folder in (("safetensors", st.out), ("gguf", resolve(str(gg.file)).folder)):
            v = run_verify(src.folder, folder, max_windows=windows, max_tokens=max_tokens, generations=0)
            figures[kind] = {"kl_mean": v.kl_mean, "top1": v.top1_agreement}
        rows.append({"source": src.origin_file.name, "recipe": recipe, "params": dict(man.recipes[0][1]),
                     **figures, "ratio": figures["gguf"]["kl_mean"] / figures["safetensors"]["kl_mean"],
                     "source_bytes": src.origin_file.stat().st_size, "gguf_bytes": gg.file.stat().st_size,
                     "edits": [{"tensor": a.tensor, "type": a.type, "written_type": a.written_type,
                                "edit_error": a.edit_error, "source_type_error": a.source_type_error,
                                "bytes_added": a.bytes_added} for a in gg.applied]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_f32(out: Path) -> None:
    """The default model's GGUF with every tensor dequantised to F32 (same metadata and tensor order)."""
    from gguf import GGMLQuantizationType

    from melsurgery.checkpoint.gguf_file import GGUFFile
    from melsurgery.checkpoint.source import default_gguf
    from melsurgery.checkpoint.writer import copy_spliced

    gf = GGUFFile(default_gguf())
    data = {n: gf.dequantise(n).astype("<f4").tobytes() for n in gf.tensors}
    header = gf.header({}, {n: (GGMLQuantizationType.F32, len(d)) for n, d in data.items()})
    splices = {0: (gf.data_offset, lambda _old: header)}
    for n, d in data.items():
        padded = d + bytes(-len(d) % gf.alignment)
        splices[gf.tensors[n].start] = (gf.padded_end(n), lambda _old, b=padded: b)
    copy_spliced(gf.path, out, splices)


def q4_k_m(src: Path, out: Path) -> None:
    """llama.cpp's quantiser (llama_model_quantize), ftype Q4_K_M, as `llama-quantize src out Q4_K_M` does."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        sys.exit(f"llama_model_quantize failed on {src}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="default", help="A GGUF source: default or a .gguf file")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/melsurgery-gguf-fidelity"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--scan", type=Path, help="A scan JSON to plan from (else the source is scanned)")
    ap.add_argument("--write-f32", type=Path, help="Only write the default model dequantised to F32 there")
    ap.add_argument("--q4-k-m", nargs=2, type=Path, metavar=("F32", "OUT"), help="Only quantise F32 to Q4_K_M")
    a = ap.parse_args(argv)
    if a.write_f32 or a.q4_k_m:
        write_f32(a.write_f32) if a.write_f32 else q4_k_m(*a.q4_k_m)
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    rows = measure(a.source, a.recipes.split(","), a.windows, a.max_tokens, a.work, a.scan)
    if a.json:
        a.json.write_text(json.dumps({"windows": a.windows, "max_tokens": a.max_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
