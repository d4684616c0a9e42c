"""Benchmark `melsurgery diff` against reading the files once and against the naive load-and-compare.

Writes a synthetic Llama-shaped bf16 checkpoint with the benchmarks' one writer (make_synthetic_checkpoint.py;
TinyLlama-1.1B geometry by default: about 2.2 GB, shards of --shard-gb), a copy with one tensor edited (two down_proj
columns of layer 11 scaled by 0.2, in place), then times, each path in its own subprocess so that
peak RSS (VmHWM) is its own:

- ``read``: every file of both folders read once in 8 MiB chunks (the floor for any comparison);
- ``diff``: ``melsurgery.diff.diff_checkpoints(A, B)``;
- ``load_file``: every shard of both loaded with ``safetensors.torch.load_file``, compared with torch.equal;
- ``transformers`` (``--transformers``): two ``AutoModelForCausalLM.from_pretrained`` and torch.equal
  over the state dicts.

The page cache cannot be dropped here, so every path runs warm (a first ``read`` warms it); the
figures compare CPU and memory work, not disk speed. Timings exclude interpreter start and imports.

    python benchmarks/bench_diff.py --layers 22            # ~2.2 GB per checkpoint
    python benchmarks/bench_diff.py --layers 4 --keep DIR  # quick, keeps the folders
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import measured, peak_rss_self, ratio, workload

CHUNK = 8 * 1024 * 1024
EDITED = "model.layers.{layer}.mlp.down_proj.weight"
COLUMNS = [1229, 1487]


def write_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """Random bf16 Llama weights at this geometry, written by the benchmarks' one synthetic writer
    (make_synthetic_checkpoint.py: shard by shard, a planted massive activation); returns the bytes written."""
    from make_synthetic_checkpoint import main as make_model

    make_model([str(folder), "--preset", "llama2-7b", "--layers", str(args.layers), "--hidden", str(args.hidden),
                "--intermediate", str(args.inter), "--vocab", str(args.vocab), "--kv-heads", "4",
                "--shard-gb", str(args.shard_gb)])
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def edited_copy(src: Path, dst: Path, layer: int) -> str:
    """A full copy of `src` with two down_proj columns of `layer` scaled by 0.2, written in place."""
    import torch

    from melsurgery.checkpoint.reader import Checkpoint
    from melsurgery.checkpoint.safetensors_file import load_tensor, tensor_bytes

    shutil.copytree(src, dst)
    name = EDITED.format(layer=layer)
    info = Checkpoint(dst).info(name)
    w = load_tensor(info).float()
    w[:, COLUMNS] *= 0.2
    with open(info.path, "r+b") as fh:
        fh.seek(info.start)
        fh.write(tensor_bytes(w.to(torch.bfloat16)))
    return name


# --------------------------------------------------------------------------------------------------
# The paths, each run in a child process
# --------------------------------------------------------------------------------------------------


def path_read(a: Path, b: Path) -> dict:
    n = 0
    for folder in (a, b):
        for p in sorted(folder.iterdir()):
            with open(p, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    n += len(chunk)
    return {"bytes": n}


def path_diff(a: Path, b: Path) -> dict:
    from melsurgery.compare.checkpoints import diff_checkpoints

    r = diff_checkpoints(a, b)
    changed = [t.name for t in r.tensors if t.status != "identical"]
    return {"bytes": r.bytes_read, "changed": changed, "cols": [t.cols for t in r.tensors if t.cols]}


def path_load_file(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        state = {}
        for p in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(p)))
        return state

    sa, sb = load(a), load(b)
    changed = [n for n in sa if not torch.equal(sa[n], sb[n])]
    return {"bytes": sum(t.numel() * t.element_size() for s in (sa, sb) for t in s.values()), "changed": changed}


def path_transformers(a: Path, b: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ma = AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)
    mb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.bfloat16)
    sa, sb = ma.state_dict(), mb.state_dict()
    changed = [n for n in sa if not torch.equal(sa[n], sb[n])]
    return {"bytes": sum(t.numel() * t.element_size() for s in (sa, sb) for t in s.values()), "changed": changed}


PATHS = {"read": path_read, "diff": path_diff, "load_file": path_load_file, "transformers": path_transformers}


def child(name: str, a: Path, b: Path) -> None:
    """Run one path after its imports; print wall time, peak RSS and what it found as one JSON line."""
    import numpy  # noqa: F401  (imports outside the timing, as for every path)
    import torch  # noqa: F401

    if name == "diff":
        pass
    if name == "transformers":
        import transformers  # noqa: F401
    base = peak_rss_self()
    with measured(name) as cost:
        out = PATHS[name](a, b)
    out.update(wall_s=cost.wall_s, cpu_s=cost.cpu_s, minor_faults=cost.minor_faults,
               peak_rss_mib=cost.peak_rss / 2**20, base_rss_mib=base / 2**20)
    print(json.dumps(out))


def run_child(name: str, a: Path, b: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, str(a), str(b)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=0.6, help="Shard size in GB (default 0.6: 4 shards).")
    ap.add_argument("--transformers", action="store_true", help="Also time two from_pretrained loads.")
    ap.add_argument("--keep", type=Path, default=None, help="Build (or reuse) the folders here and keep them.")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, a, b = args.child
        child(name, Path(a), Path(b))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-diff-", dir=os.environ.get("TMPDIR", "/tmp")))
    a, b = root / "a", root / "b"
    try:
        if not (b / "config.json").is_file():
            shutil.rmtree(root / "a", ignore_errors=True)
            shutil.rmtree(root / "b", ignore_errors=True)
            with measured("write") as writing:
                total = write_checkpoint(a, args)
                edited = edited_copy(a, b, min(11, args.layers - 1))
            print(f"wrote 2 x {total / 1e9:.2f} GB ({len(list(a.glob('*.safetensors')))} shards, bf16) in "
                  f"{writing.wall_s:.0f} s; edited {edited} columns {COLUMNS}")
        paths = ["read", "diff", "load_file"] + (["transformers"] if args.transformers else [])
        run_child("read", a, b)  # warm the page cache
        rows = {name: run_child(name, a, b) for name in paths}
        for name in ("diff", "load_file", "transformers"):
            if name in rows:
                assert len(rows[name]["changed"]) == 1, (name, rows[name]["changed"])
        assert rows["diff"]["cols"] == [COLUMNS]
        print_table(rows)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def print_table(rows: dict) -> None:
    ref = rows["read"]["wall_s"]
    nbytes = rows["read"]["bytes"]
    print(workload(f"both checkpoints: {nbytes / 1e9:.2f} GB", "warm page cache"))
    print("| path | wall s | CPU s | MB/s | x read | peak RSS MiB | minor faults |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {nbytes / 1e6 / r['wall_s']:.0f} | "
              f"{ratio(r['wall_s'], ref)} | {r['peak_rss_mib']:.0f} | {r['minor_faults']:,} |")


if __name__ == "__main__":
    main()
