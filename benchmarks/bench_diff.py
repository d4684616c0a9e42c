"""Benchmark `melsurgery diff` against reading the files once and against the naive load-and-compare.

Writes a synthetic Llama-shaped bf16 checkpoint (TinyLlama-1.1B geometry by default: about 2.2 GB,
several shards, random data written shard by shard), a copy with one tensor edited (two down_proj
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
import time
from pathlib import Path

CHUNK = 8 * 1024 * 1024
EDITED = "model.layers.{layer}.mlp.down_proj.weight"
COLUMNS = [1229, 1487]


def tensor_specs(layers: int, hidden: int, inter: int, vocab: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    return specs + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """Random bf16 weights, generated and saved shard by shard (peak memory: one shard)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    kv = args.hidden // 32 * 4
    specs = tensor_specs(args.layers, args.hidden, args.inter, args.vocab, kv)
    total = sum(2 * _numel(s) for _, s in specs)
    per_shard = -(-total // args.shards)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        if size >= per_shard and len(groups) < args.shards:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += 2 * _numel(shape)
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        state = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in group}
        save_file(state, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in state})
        del state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                num_attention_heads=32, num_key_value_heads=4, vocab_size=args.vocab, tie_word_embeddings=False,
                dtype="bfloat16").to_json_file(str(folder / "config.json"))
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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


def _vmhwm_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover - not Linux


def child(name: str, a: Path, b: Path) -> None:
    """Run one path after its imports; print wall time, peak RSS and what it found as one JSON line."""
    import numpy  # noqa: F401  (imports outside the timing, as for every path)
    import torch  # noqa: F401

    if name == "diff":
        pass
    if name == "transformers":
        import transformers  # noqa: F401
    base = _vmhwm_kib()
    t0 = time.perf_counter()
    out = PATHS[name](a, b)
    out.update(wall_s=time.perf_counter() - t0, peak_rss_mib=_vmhwm_kib() / 1024, base_rss_mib=base / 1024)
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
    ap.add_argument("--shards", type=int, default=4)
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
            t0 = time.perf_counter()
            total = write_checkpoint(a, args)
            edited = edited_copy(a, b, min(11, args.layers - 1))
            print(f"wrote 2 x {total / 1e9:.2f} GB ({args.shards} shards, bf16) in {time.perf_counter() - t0:.0f} s; "
                  f"edited {edited} columns {COLUMNS}")
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
    print(f"both checkpoints: {nbytes / 1e9:.2f} GB, warm page cache")
    print("| path | wall s | MB/s | x read | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.2f} | {nbytes / 1e6 / r['wall_s']:.0f} | {r['wall_s'] / ref:.2f} "
              f"| {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
