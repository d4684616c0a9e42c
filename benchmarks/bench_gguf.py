#!/usr/bin/env python
"""Benchmark GGUF output: `melsurgery patch X.gguf -o Y.gguf` against `cp X.gguf Y.gguf`.

Each path runs in its own child process with the source evicted from the page cache first (the harness's
`run_child`): wall time, CPU time, peak RSS and I/O of that child.

Paths: `cp` (coreutils, the floor: a GGUF patch must at least copy the file), `patch` (ffn-dampen with
`--scan` given, i.e. the GGUF writer itself: header, requantisation, copy, hashes), `patch+scan`
(the whole command as a user runs it, calibration included; the dequantised cache already warm).

    python benchmarks/bench_gguf.py                       # the embedded default model
    python benchmarks/bench_gguf.py --model x.gguf --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import HEAD, melsurgery, row  # noqa: E402
from harness import GB, Cost, ratio, run_child, workload  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="A .gguf file, or default (the embedded SmolLM2 Q4_1)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/melsurgery-bench-gguf"))
    ap.add_argument("--scan", type=Path, help="A scan JSON of the model (else scanned once into --work)")
    ap.add_argument("--repeat", type=int, default=3, help="Runs per path; the table shows the median wall time.")
    ap.add_argument("--paths", default="cp,patch", help="Comma-separated: cp, patch, patch+scan")
    args = ap.parse_args(argv)
    from melsurgery.checkpoint.source import DEFAULT_ALIASES, default_gguf  # light: a forked child's RSS starts here

    src = default_gguf() if args.model.lower() in DEFAULT_ALIASES else Path(args.model)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    scan = args.scan or work / "scan.json"
    if not scan.is_file():
        r = run_child("scan", melsurgery("scan", args.model, "--json", scan, "--quiet"), ok=(0, 3))
        if not r.ok:
            print(f"scan failed: {r.note}")
            return 2
    paths = {
        "cp": ["cp", str(src), str(work / "copy.gguf")],
        "patch": melsurgery("patch", args.model, "-o", work / "patched.gguf", "--recipe", "ffn-dampen", "--scan", scan,
                            "--overwrite", "--quiet"),
        "patch+scan": melsurgery("patch", args.model, "-o", work / "patched2.gguf", "--recipe", "ffn-dampen",
                                 "--overwrite", "--quiet"),
    }
    paths = {name: cmd for name, cmd in paths.items() if name in args.paths.split(",")}
    runs: dict[str, list[Cost]] = {name: [] for name in paths}
    for _ in range(args.repeat):
        for name, cmd in paths.items():
            (work / "copy.gguf").unlink(missing_ok=True)
            runs[name].append(run_child(name, cmd, [src]))
    med = {n: sorted(rs, key=lambda r: r.wall_s)[len(rs) // 2] for n, rs in runs.items()}
    floor = med["cp"]
    print(workload(f"{src.name}: {src.stat().st_size / GB:.3f} GB", f"median of {args.repeat} runs per path",
                   "cold source"))
    print(HEAD)
    for name, r in med.items():
        walls = ", ".join(f"{x.wall_s:.2f}" for x in runs[name])
        r.note = f"{r.note} walls {walls}".strip()
        print(row(r, ratio(r.wall_s, floor.wall_s), ratio(r.peak_rss, floor.peak_rss)))
    print(f"patch - cp: {statistics.median(x.wall_s for x in runs['patch']) - floor.wall_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
