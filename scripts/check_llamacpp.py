#!/usr/bin/env python
"""Check a patched GGUF in a real GGUF runtime (llama.cpp, through llama-cpp-python). Not part of CI.

Patches a GGUF (default: the embedded SmolLM2-135M-Instruct, Q4_1; `--source` another .gguf) into GGUF
with each folded recipe, then runs base and patched in llama.cpp and in transformers (its GGUF loader,
dequantised to fp32) on the same token ids of the held-out text `verify` uses, and reports per runtime: mean KL(base ||
patched) of the next-token distributions and top-1 agreement base vs patched (the definitions of
`melsurgery verify`), plus how far the two runtimes are apart on the same model.

llama-cpp-python is a source package (it builds llama.cpp with the system compiler and cmake: about
an hour on 2 shared cores, minutes on a free machine). `--build` installs it with one compile job:

    CMAKE_BUILD_PARALLEL_LEVEL=1 pip install llama-cpp-python
    python scripts/check_llamacpp.py --windows 4 --json out/llamacpp.json

Built in a separate venv instead (its numpy must not shadow the project's), expose only its llama_cpp
package: `mkdir /tmp/lc && ln -s VENV/lib/python3.11/site-packages/{llama_cpp,diskcache} /tmp/lc/` and
run with `PYTHONPATH=$PWD:/tmp/lc`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

RECIPES = ("ffn-dampen", "norm-rescale", "me-norm", "first-token")


def ensure_llama_cpp(build: bool) -> None:
    if importlib.util.find_spec("llama_cpp") is not None:
        return
    if not build:
        sys.exit("llama_cpp is not installed: pip install llama-cpp-python (or rerun with --build)")
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "1"}
    subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True, env=env)


def llamacpp_logprobs(gguf: Path, chunks: list[list[int]]) -> list[np.ndarray]:
    """log-softmax of llama.cpp's logits at every position of each chunk (fresh context per chunk)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=max(len(c) for c in chunks) + 8, logits_all=True, n_threads=2,
                n_batch=512, verbose=False, seed=0)
    out = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[: len(chunk)], dtype=np.float64)
        out.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    del llm
    return out


def transformers_logprobs(gguf: Path, chunks: list[list[int]]) -> list[np.ndarray]:
    """The same through transformers' GGUF loader (dequantised to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for chunk in chunks:
            logits = model(torch.tensor([chunk])).logits[0].double()
            out.append(logits.log_softmax(-1).numpy())
    return out


def figures(base: list[np.ndarray], patched: list[np.ndarray]) -> dict:
    """Mean and max KL(base || patched) per predicted token, and top-1 agreement (as `melsurgery verify`)."""
    kls, agree, n = [], 0, 0
    for lb, lp in zip(base, patched):
        lb, lp = lb[:-1], lp[:-1]
        kls.append((np.exp(lb) * (lb - lp)).sum(-1))
        agree += int((lb.argmax(-1) == lp.argmax(-1)).sum())
        n += len(lb)
    kl = np.concatenate(kls)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": agree / n, "tokens": n}


def check(base_gguf: Path, patched_gguf: Path, n_windows: int, size: int) -> dict:
    """Both runtimes on base and patched: the patch's effect in each, and llama.cpp vs transformers."""
    from transformers import AutoTokenizer

    from melsurgery.measure.verify import eval_text, make_windows

    tok = AutoTokenizer.from_pretrained(base_gguf.parent, gguf_file=base_gguf.name)
    chunks = make_windows(tok, eval_text(None)[0], size, n_windows).ids
    lc_b, lc_p = llamacpp_logprobs(base_gguf, chunks), llamacpp_logprobs(patched_gguf, chunks)
    tf_b, tf_p = transformers_logprobs(base_gguf, chunks), transformers_logprobs(patched_gguf, chunks)
    return {"windows": len(chunks), "window_tokens": size,
            "llama.cpp": figures(lc_b, lc_p), "transformers": figures(tf_b, tf_p),
            "runtimes_base": figures(tf_b, lc_b), "runtimes_patched": figures(tf_p, lc_p)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="pip install llama-cpp-python if it is missing")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="Folded recipes, one GGUF patch each")
    ap.add_argument("--source", default="default", help="The GGUF to patch: default or a .gguf file")
    ap.add_argument("--scan", type=Path, help="A scan JSON of the source (else scanned once)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/melsurgery-llamacpp"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    ensure_llama_cpp(args.build)
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json, run_scan
    from melsurgery.surgery.gguf_patch import run_patch_gguf
    from melsurgery.surgery.manifest import Manifest

    src = resolve(args.source)
    scan = read_json(args.scan) if args.scan else run_scan(src)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    print("| recipe | runtime | KL mean | KL max | top-1 agreement |\n|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        out = args.work / f"{recipe}.gguf"
        patched = run_patch_gguf(src, out, Manifest(recipes=[(recipe, {})]), scan=scan, overwrite=True)
        r = results[recipe] = check(src.origin_file, out, args.windows, args.max_tokens)
        r["types"] = {a.tensor: f"{a.type}->{a.written_type}" for a in patched.applied}
        for runtime in ("llama.cpp", "transformers"):
            f = r[runtime]
            print(f"| {recipe} | {runtime} | {f['kl_mean']:.4f} | {f['kl_max']:.3f} | {f['top1_agreement']:.1%} |")
    print("\nllama.cpp vs transformers on the same model (KL(transformers || llama.cpp), top-1 agreement):")
    for recipe, r in results.items():
        for key in ("runtimes_base", "runtimes_patched"):
            f = r[key]
            print(f"  {recipe} {key.split('_')[1]}: KL mean {f['kl_mean']:.4f}, top-1 {f['top1_agreement']:.1%}")
    n = next(iter(results.values()))
    print(f"\n{n['windows']} windows x {n['window_tokens']} tokens of the embedded held-out text (Hamlet)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
