#!/usr/bin/env python
"""Benchmark melsurgery's streaming commands against the naive way and against the I/O floor.

Each path runs in its own child process, so that its peak RSS (ru_maxrss of that child), wall time
and I/O (/proc/<pid>/io, read just before the child is reaped) are its own. Before each path the
files it reads are evicted from the page cache (posix_fadvise DONTNEED on those files only, after a
sync), so every path starts cold and no other process's cache is touched.

Paths (`--paths`, default all):
  scan          melsurgery scan, streaming, small calibration (fp32 compute, scan's default)
  scan-bf16     the same computing in bf16, like for like with a naive run that only fits in bf16
  scan-auto     melsurgery scan --num-samples auto --max-tokens 128 (adaptive calibration, fp32 compute)
  naive-scan    whole model from_pretrained + output_hidden_states (+ attentions) on the same samples
  copy          plain copy of the folder, shutil.copyfile + fsync per file: the floor for patch
  patch         melsurgery patch --recipe ffn-dampen --scan (folded)
  patch-wemask  melsurgery patch --recipe wemask --scan (custom layer)
  naive-patch   from_pretrained, the same ffn-dampen edit, save_pretrained
  read          read both folders once (source and patched): the floor for diff
  diff          melsurgery diff SOURCE PATCHED
  verify        melsurgery verify SOURCE PATCHED (the ffn-dampen patch), streaming, bf16, 1 window x 128 tokens
  verify-2x512  the same on 2 windows x 512 tokens
  verify-fp32-2x512  2 windows x 512 tokens computing in fp32 (one layer upcast at a time)
  naive-verify  both whole models (from_pretrained, bf16, eager attention) on 1 window x 128 tokens: logits,
                attentions and hidden states, KL: what verify did before it streamed

Naive paths run under a memory guard: skipped when the machine has too little memory available, and
killed (and reported) when their RSS comes near what was available.

Compute-bound paths (scan, verify) also get a FLOP floor: 2 x (decoder-layer parameters, plus the LM
head for verify) x tokens (x2 for verify's base and patched streams), at the matrix-multiply rate this
machine reaches in the same run (a [256, 4096] x [4096, 11008] product in the path's dtype).

    python benchmarks/bench.py --preset llama2-7b             # generate the 7B-shape model, run all, clean up
    python benchmarks/bench.py --model /path/to/folder --paths scan,naive-scan
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import GB, Cost, measured, mem_available, run_child, workload
from harness import ratio_of as ratio

HERE = Path(__file__).resolve().parent
WORKDIR = Path("/tmp/melsurgery-bench")
CHUNK = 8 * 1024 * 1024
ALL_PATHS = ("scan", "scan-bf16", "scan-auto", "naive-scan", "copy", "patch", "patch-wemask", "naive-patch", "read",
             "diff", "verify", "verify-2x512", "verify-fp32-2x512", "naive-verify")
VERIFY = ("--dtype", "bfloat16", "--generations", "0", "--device", "cpu", "--quiet")
CALIBRATION = ("--num-samples", "4", "--max-tokens", "32", "--seed", "0")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- the naive paths and floors, run as children of this script -----------------------------------


def child_naive_scan(src: str, dtype: str, num_samples: str, max_tokens: str) -> None:
    """The whole model in memory; every hidden state and attention map of the calibration samples (0: all)."""
    import torch
    from transformers import AutoModelForCausalLM

    from melsurgery.calibrate.samples import read_records, tokenize
    from melsurgery.checkpoint.safeload import load_tokenizer

    tok = load_tokenizer(Path(src))
    records, _ = read_records(None)
    samples = tokenize(records, tok, num_samples=int(num_samples) or None, max_tokens=int(max_tokens), seed=0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), attn_implementation="eager")
    model.eval()
    ratios = []
    with torch.no_grad():
        for s in samples:
            out = model(torch.tensor([s.ids]), output_hidden_states=True, output_attentions=True)
            for h in out.hidden_states:
                a = h.float().abs()
                ratios.append(float(a.max() / a.median()))
    print(f"max ratio {max(ratios):.0f} over {len(samples)} samples")


def child_naive_patch(src: str, out: str, scan_json: str, factor: str) -> None:
    """from_pretrained, scale the scan's FFN neurons' down-projection columns, save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from melsurgery.detect.scan import read_json

    scan = read_json(Path(scan_json))
    neurons = sorted({n.neuron for n in scan.ffn_neurons})
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    with torch.no_grad():
        w = model.model.layers[scan.me_layer].mlp.down_proj.weight
        w[:, neurons] = (w[:, neurons].float() * float(factor)).to(w.dtype)
    model.save_pretrained(out, max_shard_size="5GB")


def child_naive_verify(src: str, patched: str, max_tokens: str) -> None:
    """Both whole models in memory (bf16, eager attention), one window: the pre-streaming verify."""
    import torch
    from transformers import AutoModelForCausalLM

    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.measure.verify import eval_text, make_windows

    window = make_windows(load_tokenizer(Path(src)), eval_text(None)[0], int(max_tokens), 1).ids[0]
    logits = []
    for folder in (src, patched):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager")
        with torch.no_grad():
            out = model(torch.tensor([window]), output_attentions=True, output_hidden_states=True)
        logits.append(out.logits[0].float().log_softmax(-1))
        if folder == src:
            base = model  # kept: both models are held at once, as the old verify held them
    lb, lp = logits
    print(f"KL mean {float((lb.exp() * (lb - lp)).sum(-1).mean()):.4g} ({type(base).__name__})")


def child_copy(src: str, dst: str) -> None:
    """The floor for patch: every file copied (in-kernel) and made durable, as patch makes its outputs."""
    Path(dst).mkdir(parents=True)
    for p in sorted(Path(src).iterdir()):
        if p.is_file():
            shutil.copyfile(p, Path(dst) / p.name)
            fd = os.open(Path(dst) / p.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def child_read(*folders: str) -> None:
    """The floor for diff: every file of both folders read once."""
    buf = bytearray(CHUNK)
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                with open(p, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass


CHILDREN: dict[str, Callable[..., None]] = {"naive-scan": child_naive_scan, "naive-patch": child_naive_patch,
                                            "naive-verify": child_naive_verify, "copy": child_copy,
                                            "read": child_read}


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "child", *args]


def melsurgery(*args: object) -> list[str]:
    return [sys.executable, "-m", "melsurgery", *map(str, args)]


# --- FLOP floors ---

_RATE: dict[str, float] = {}


def matmul_rate(dtype: str) -> float:
    """FLOP/s of a decoder-sized matrix product on this machine now (best of 5, cached per dtype)."""
    if dtype not in _RATE:
        import torch

        dt = getattr(torch, dtype)
        a, w = torch.randn(256, 4096, dtype=dt), torch.randn(11008, 4096, dtype=dt)
        torch.nn.functional.linear(a, w)
        best = float("inf")
        for _ in range(5):
            with measured("matmul") as m:
                torch.nn.functional.linear(a, w)
            best = min(best, m.wall_s)
        _RATE[dtype] = 2 * 256 * 4096 * 11008 / best
    return _RATE[dtype]


def param_counts(cfg: dict) -> tuple[int, int]:
    """(parameters of all decoder layers' matrices, parameters of the LM head) from a Llama-style config."""
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    return n * (attn + 3 * d * f), d * cfg["vocab_size"]


def floor(run: Cost, flops: int, dtype: str, what: str) -> None:
    """Note the path's FLOP floor and its wall time as a multiple of it."""
    rate = matmul_rate(dtype)
    secs = flops / rate
    run.note = (run.note + "; " if run.note else "") + (
        f"FLOP floor {secs:.1f} s ({what}, {flops / 1e12:.2f} TFLOP at {rate / 1e9:.0f} GFLOP/s {dtype}): "
        f"{run.wall_s / secs:.1f}x")


# --- the benchmark --------------------------------------------------------------------------------


def row(r: Cost, vs: str = "", vs_rss: str = "") -> str:
    if not r.io and not r.ok:
        return f"| {r.name} | - | - | - | - | - | - | - | {r.note} |"
    io = r.io
    return (f"| {r.name} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.peak_rss / GB:.2f} | "
            f"{io.get('read_bytes', 0) / GB:.2f} / "
            f"{io.get('rchar', 0) / GB:.2f} | {io.get('write_bytes', 0) / GB:.2f} / {io.get('wchar', 0) / GB:.2f} | "
            f"{vs} | {vs_rss} | {r.note} |")


HEAD = ("| path | wall s | CPU s | peak RSS GB | read GB disk / syscalls | written GB disk / syscalls | wall ratio | "
        "RSS ratio | note |\n|---|---|---|---|---|---|---|---|---|")


def has_diff() -> bool:
    return subprocess.run(melsurgery("diff", "--help"), capture_output=True).returncode == 0


def bench(model: Path, work: Path, paths: set[str], margin: int) -> tuple[dict[str, Cost], str]:
    runs: dict[str, Cost] = {}
    size = folder_bytes(model)
    cfg = json.loads((model / "config.json").read_text())
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scan_json = work / "scan.json"
    patched = work / "patched"

    def go(name: str, cmd: list[str], cold: list[Path], need: int | None = None, ok: tuple[int, ...] = (0,)
           ) -> Cost | None:
        if name not in paths:
            return None
        guard = None
        if need is not None:
            avail = mem_available()
            if avail - margin < need:
                runs[name] = Cost(name, note=f"skipped: needs ~{need / GB:.1f} GB, {avail / GB:.1f} GB available")
                print(runs[name].note, file=sys.stderr)
                return runs[name]
            guard = avail - margin
        print(f"running {name} ...", file=sys.stderr, flush=True)
        runs[name] = run_child(name, cmd, cold, guard=guard, log=logs / f"{name}.log", ok=ok)
        r = runs[name]
        print(f"  {r.wall_s:.1f}s, peak RSS {r.peak_rss / GB:.2f} GB {r.note}", file=sys.stderr, flush=True)
        return r

    go("scan", melsurgery("scan", model, "--quiet", "--device", "cpu", *CALIBRATION, "--json", scan_json), [model],
       ok=(0, 3))  # exit 3 (no massive activation) is a finished scan too
    go("scan-bf16", melsurgery("scan", model, "--quiet", "--device", "cpu", "--dtype", "bfloat16", *CALIBRATION),
       [model], ok=(0, 3))
    auto_json = work / "scan-auto.json"
    go("scan-auto", melsurgery("scan", model, "--quiet", "--device", "cpu", "--num-samples", "auto", "--max-tokens",
                               "128", "--seed", "0", "--json", auto_json), [model], ok=(0, 3))
    layer_params, head_params = param_counts(cfg)
    for name, js, dtype in (("scan", scan_json, "float32"), ("scan-bf16", None, "bfloat16"),
                            ("scan-auto", auto_json, "float32")):
        if name in runs and runs[name].ok:
            tokens = (json.loads(js.read_text())["calibration"]["tokens"] if js is not None and js.is_file()
                      else int(CALIBRATION[1]) * int(CALIBRATION[3]))
            floor(runs[name], 2 * layer_params * tokens, dtype, f"{tokens} tokens")
    # fp32 compute, as scan does, where it fits; else the stored dtype (naive fp32 of a 7B model needs 27 GB)
    fp32_size = size * 4 // ITEMSIZE.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), 4)
    naive_dtype = "float32" if fp32_size * 1.1 < mem_available() - margin else "bfloat16"
    r = go("naive-scan", me("naive-scan", str(model), naive_dtype, CALIBRATION[1], CALIBRATION[3]), [model],
           need=int((fp32_size if naive_dtype == "float32" else size) * 1.05))
    if r is not None and naive_dtype != "float32":
        r.note = (r.note + "; " if r.note else "") + f"computes in {naive_dtype} (fp32 would not fit)"
    if not scan_json.is_file() and paths & {"patch", "patch-wemask", "naive-patch", "diff", "verify", "verify-2x512",
                                            "naive-verify"}:
        raise SystemExit("patch paths need the scan JSON: include `scan` in --paths")
    copy_dst = work / "copy"
    go("copy", me("copy", str(model), str(copy_dst)), [model])
    shutil.rmtree(copy_dst, ignore_errors=True)
    go("patch", melsurgery("patch", model, "-o", patched, "--recipe", "ffn-dampen", "--scan", scan_json, "--quiet",
                           "--overwrite"), [model, scan_json])
    wemask_out = work / "patched-wemask"
    go("patch-wemask", melsurgery("patch", model, "-o", wemask_out, "--recipe", "wemask", "--scan", scan_json,
                                  "--quiet"), [model, scan_json])
    shutil.rmtree(wemask_out, ignore_errors=True)
    naive_out = work / "naive-patched"
    go("naive-patch", me("naive-patch", str(model), str(naive_out), str(scan_json), "0.2"), [model],
       need=int(size * 1.3))
    shutil.rmtree(naive_out, ignore_errors=True)
    if patched.is_dir():
        go("verify", melsurgery("verify", model, patched, *VERIFY, "--windows", "1", "--max-tokens", "128"),
           [model, patched])
        go("verify-2x512", melsurgery("verify", model, patched, *VERIFY, "--windows", "2", "--max-tokens", "512"),
           [model, patched])
        go("verify-fp32-2x512", melsurgery("verify", model, patched, *VERIFY, "--windows", "2", "--max-tokens",
                                           "512", "--dtype", "float32"), [model, patched])
        for name, tokens, dtype in (("verify", 128, "bfloat16"), ("verify-2x512", 1024, "bfloat16"),
                                    ("verify-fp32-2x512", 1024, "float32")):
            if name in runs and runs[name].ok:
                floor(runs[name], 2 * 2 * (layer_params + head_params) * tokens, dtype, f"2 streams x {tokens} tokens")
        go("naive-verify", me("naive-verify", str(model), str(patched), "128"), [model, patched],
           need=int(2 * size * 1.1))
        go("read", me("read", str(model), str(patched)), [model, patched])
        if has_diff():
            go("diff", melsurgery("diff", model, patched, "--json", work / "diff.json"), [model, patched], ok=(1,))
        elif "diff" in paths:
            runs["diff"] = Cost("diff", note="`melsurgery diff` does not exist in this version")
    header = workload(f"model {model} ({size / GB:.2f} GB, {cfg.get('num_hidden_layers')} layers, hidden "
                      f"{cfg.get('hidden_size')}, {cfg.get('dtype')})", "cold page cache for each path")
    return runs, header


def report(runs: dict[str, Cost], header: str) -> str:
    g = runs.get
    lines = [header, "", "scan (RSS ratio and wall ratio: naive / streaming)", "", HEAD]
    for name in ("scan", "scan-bf16", "scan-auto", "naive-scan"):
        if name in runs:
            lines.append(row(runs[name], ratio(runs[name], g("scan")) if name != "scan" else "1.00x",
                             ratio(runs[name], g("scan"), "peak_rss") if name != "scan" else "1.00x"))
    lines += ["", "patch (ratios: path / plain copy)", "", HEAD]
    for name in ("copy", "patch", "patch-wemask", "naive-patch"):
        if name in runs:
            lines.append(row(runs[name], ratio(runs[name], g("copy")), ratio(runs[name], g("copy"), "peak_rss")))
    lines += ["", "verify and diff (ratios: path / reading both folders)", "", HEAD]
    for name in ("read", "diff", "verify", "verify-2x512", "verify-fp32-2x512", "naive-verify"):
        if name in runs:
            lines.append(row(runs[name], ratio(runs[name], g("read")), ratio(runs[name], g("read"), "peak_rss")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        CHILDREN[argv[1]](*argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="An existing checkpoint folder to benchmark on.")
    src.add_argument("--preset", default="llama2-7b", help="Generate this synthetic model (default llama2-7b).")
    ap.add_argument("--layers", type=int, help="Fewer decoder layers for the generated model.")
    ap.add_argument("--paths", default=",".join(ALL_PATHS), help=f"Comma-separated subset of {', '.join(ALL_PATHS)}.")
    ap.add_argument("--workdir", type=Path, default=WORKDIR, help=f"Scratch folder (default {WORKDIR}).")
    ap.add_argument("--margin-gb", type=float, default=1.5, help="Memory kept free by the guard on naive paths.")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder (generated model, outputs).")
    ap.add_argument("--markdown", type=Path, help="Also write the tables here.")
    args = ap.parse_args(argv)
    paths = {p.strip() for p in args.paths.split(",") if p.strip()}
    if paths - set(ALL_PATHS):
        ap.error(f"unknown paths {sorted(paths - set(ALL_PATHS))}")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model
        if model is None:
            model = work / (args.preset + (f"-{args.layers}l" if args.layers else ""))
            if not (model / "config.json").is_file():
                gen = [sys.executable, str(HERE / "make_synthetic_checkpoint.py"), str(model), "--preset", args.preset,
                       "--overwrite", *(["--layers", str(args.layers)] if args.layers else [])]
                subprocess.run(gen, check=True)
        runs, header = bench(model.resolve(), work, paths, int(args.margin_gb * GB))
        text = report(runs, header)
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
