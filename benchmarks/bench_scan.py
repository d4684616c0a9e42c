#!/usr/bin/env python
"""Streaming `scan` against the naive whole-model scan, on the same model and text.

Streaming loads one decoder layer at a time; naive loads the whole model with `from_pretrained` and
asks for every hidden state (and attention map, as scan records sinks). Both run as child processes
with the same calibration samples, computing in fp32; this prints wall time, CPU time and peak RSS of
each and their ratios. The measuring is benchmarks/bench.py's.

    python benchmarks/bench_scan.py                   # the embedded SmolLM2-135M-Instruct
    python benchmarks/bench_scan.py /path/to/model --num-samples 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench import me, melsurgery
from harness import GB, ratio, run_child, workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default", help="A model folder, or `default` (SmolLM2).")
    ap.add_argument("--num-samples", type=int, help="Calibration samples (default: scan's default, all of them).")
    ap.add_argument("--max-tokens", type=int, default=128, help="Tokens per sample (default 128, as scan).")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Compute dtype of both.")
    args = ap.parse_args(argv)

    from melsurgery.checkpoint.source import resolve

    folder = resolve(args.model).folder  # converts and caches the default GGUF once, outside the timings
    calib = ["--max-tokens", str(args.max_tokens)] + (["--num-samples", str(args.num_samples)]
                                                      if args.num_samples else [])
    with tempfile.TemporaryDirectory(prefix="melsurgery-bench-scan-") as tmp:
        streaming = run_child("streaming scan", melsurgery("scan", folder, "--quiet", "--device", "cpu", "--dtype",
                                                         args.dtype, *calib, "--json", Path(tmp) / "scan.json"),
                              [folder], ok=(0, 3))
        naive = run_child("naive scan", me("naive-scan", str(folder), args.dtype, str(args.num_samples or 0),
                                           str(args.max_tokens)), [folder])
    print(workload(f"model {folder}", f"calibration {args.num_samples or 'all'} samples x {args.max_tokens} tokens, "
                   f"{args.dtype}", "cold page cache for each") + "\n")
    print("| path | wall s | CPU s | peak RSS GB | minor faults | note |\n|---|---|---|---|---|---|")
    for r in (streaming, naive):
        print(f"| {r.name} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.peak_rss / GB:.2f} | {r.minor_faults:,} | {r.note} |")
    if streaming.ok and naive.ok:
        print(f"\nnaive / streaming: wall {ratio(naive.wall_s, streaming.wall_s)}, "
              f"CPU {ratio(naive.cpu_s, streaming.cpu_s)}, peak RSS {ratio(naive.peak_rss, streaming.peak_rss)}")
    return 0 if streaming.ok and naive.ok else 1


if __name__ == "__main__":
    sys.exit(main())
