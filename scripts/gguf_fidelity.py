#!/usr/bin/env python
"""Measure how closely a GGUF patch carries a recipe: KL of the GGUF patch and of the safetensors patch of the
same recipe, against the same base, on the same held-out windows (`verify`'s definitions, transformers' fp32
forward; the GGUF read through transformers' GGUF loader). Not part of CI.

    python scripts/gguf_fidelity.py --source default --windows 4 --json out/fidelity-q4_1.json
    python scripts/gguf_fidelity.py --source model.Q4_K_M.gguf --windows 4 --json out/fidelity-q4_k_m.json

One scan per source, one fit of first-token (shared by both patches), each recipe with its defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECIPES = ("ffn-dampen", "norm-rescale", "me-norm", "first-token")


def measure(source: str, recipes: list[str], windows: int, max_tokens: int, work: Path) -> list[dict]:
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import run_scan
    from melsurgery.measure.verify import run_verify
    from melsurgery.recipes import resolve_recipes
    from melsurgery.surgery.gguf_patch import run_patch_gguf
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import fitted, run_patch

    src = resolve(source)
    scan = run_scan(src)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="default", help="A GGUF source: default or a .gguf file")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/melsurgery-gguf-fidelity"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    rows = measure(a.source, a.recipes.split(","), a.windows, a.max_tokens, a.work)
    if a.json:
        a.json.write_text(json.dumps({"windows": a.windows, "max_tokens": a.max_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
