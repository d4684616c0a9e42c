#!/usr/bin/env python
"""What `patch` costs next to a full copy of the model, on the filesystem that holds --dir.

Every path runs as a child process on a cold page cache (the files it reads are evicted first, after a sync)
and is measured by its wall time and by the disk it takes: free blocks (statvfs) before and after, after a
sync. Ratios are to `cp -r --reflink=never` of the same folder in the same run, made durable the way patch
makes its output durable (each file synced).

Paths:
  cp                cp -r --reflink=never SOURCE OUT, then sync of each file: the full copy
  cp-reflink        cp -r --reflink=always (only where the filesystem clones): the floor
  patch-before      melsurgery patch at --baseline-ref (a checkout made here): the code before a change
  patch             melsurgery patch now, from the plain folder (no trusted sha256: the sources' sha256 left to
                    push, each file recorded by size, mtime and inode)
  patch-hf-cache    melsurgery patch now, from the same files laid out as a Hugging Face cache snapshot
                    (blobs named by their sha256, hard links to the plain folder's files: no extra disk)
  patch-hf-cache-warm  the same on a warm page cache (nothing evicted; as right after a scan read the model)
  hash-edited       sha256 of the shards the patch edits, cold: what recording their whole-file sha256 at patch
                    time costs (sha256 is a chain: a file with one changed byte is hashed whole). patch records
                    an edited shard whose source hash it trusts by its derivation instead, and push, which
                    reads every file anyway, records the digest

Each patch applies one recipe (--recipe, default norm-rescale with its defaults) given the scan JSON
(--scan, else a short scan is run once and kept in --dir). The patch children report run_patch's own time
too, without the interpreter's start-up and imports, and the weight writer inside it. After the measured
runs, one more `patch-hf-cache` output is checked: FIEMAP says how much of it shares blocks; with --diff,
`melsurgery diff` of source and output must show only the edited tensors; then the script writes over the
output's shards (clones, on a filesystem that clones), syncs, and re-hashes every source shard, whose blob
name is its sha256: the source must be untouched.

    python benchmarks/bench_patch.py --dir /mnt/xfs/bench                # generates the synthetic 7B there
    python benchmarks/bench_patch.py --dir /work/bench --model /work/bench/model --diff

An XFS filesystem with reflink, as root (unmount and delete the image when done; the loop device does direct
I/O, so that the image's own page cache does not make a cold path warm):

    apt-get install -y xfsprogs; truncate -s 40G /work/xfs.img; mkfs.xfs -m reflink=1 /work/xfs.img
    mkdir -p /mnt/xfs; mount -o discard $(losetup -f --show --direct-io=on /work/xfs.img) /mnt/xfs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import GB, evict, measured, ratio, run_child, workload

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINE_REF = "99c46a9"  # the writer before clone-then-overwrite: every shard copied and hashed
CALIBRATION = ("--num-samples", "4", "--max-tokens", "32", "--seed", "0")
CHUNK = 64 * 1024 * 1024
PATHS = ("cp", "cp-reflink", "patch-before", "patch", "patch-hf-cache", "patch-hf-cache-warm", "hash-edited")


@dataclass
class Row:
    """One path's cost, and (for patches) what its provenance says it did."""

    name: str
    wall_s: float
    extra_disk: int
    patch_s: float | None = None
    write_s: float | None = None  # write_weights inside run_patch: the weights' bytes and hashes
    write_cpu_s: float | None = None  # the writer's CPU time (user + system): what hashing costs shows here
    mode: str = ""
    reused: int = 0
    hashed: int = 0
    rc: int = 0
    cpu_s: float = 0.0
    read: int = 0  # bytes read from disk (cold cache: what the path really read)
    written: int = 0  # bytes written to disk
    load: float = 0.0  # the machine's 1-minute load average when the path ended (other work competes for CPU)
    deferred: int = 0  # source files whose sha256 the patch left to push


def fs_type(path: Path) -> str:
    fstype, source = subprocess.run(["df", "--output=fstype,source", str(path)], capture_output=True, text=True,
                                    check=True).stdout.split("\n")[1].split()
    return f"{fstype} ({source})"


def free_bytes(path: Path) -> int:
    """Free bytes of the filesystem once what was written is on disk (syncfs of that filesystem only) and its
    deferred frees have settled (two equal readings; at most a few tries, as other writers may never stop)."""
    last = -1
    for _ in range(8):
        subprocess.run(["sync", "-f", str(path)], check=True)
        st = os.statvfs(path)
        free = st.f_bfree * st.f_frsize
        if free == last:
            break
        last = free
        time.sleep(0.3)
    return free


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hub_layout(model: Path, root: Path) -> Path:
    """The model's files as a Hugging Face cache snapshot: blobs named by sha256, hard links to the model's
    files (the same inodes: no extra disk), snapshot entries relative symlinks to them."""
    snap = root / "snapshots" / ("0" * 40)
    if snap.is_dir():
        return snap
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    tmp = root / "snapshots" / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in sorted(model.iterdir()):
        digest = sha256_of(p)
        blob = root / "blobs" / digest
        if not blob.exists():
            os.link(p, blob)
        (tmp / p.name).symlink_to(Path("..", "..", "blobs", digest))
    tmp.rename(snap)
    return snap


def child_patch(src: str, out: str, scan_json: str, recipe: str) -> None:
    """In a child, with PYTHONPATH naming the code to measure: run_patch timed apart from the imports, and the
    weight writer timed inside it."""
    # Only the tree PYTHONPATH names: an editable install of another tree would fill in the modules it lacks.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    with measured("imports") as imports:
        from melsurgery.checkpoint.source import resolve

        patching = _first("melsurgery.patch", "melsurgery.surgery.patch")
        read_json = _first("melsurgery.scan", "melsurgery.detect.scan").read_json
        manifest = _first("melsurgery.manifest", "melsurgery.surgery.manifest").Manifest
    writer = patching.write_weights
    spent = []

    def timed(*args, **kwargs):
        with measured("writer") as w:
            result = writer(*args, **kwargs)
        spent.append(w)
        return result

    patching.write_weights = timed
    with measured("run_patch") as run:
        patching.run_patch(resolve(src), Path(out), manifest(model=src, recipes=[(recipe, {})]),
                           scan=read_json(Path(scan_json)))
    print(json.dumps({"import_s": imports.wall_s, "patch_s": run.wall_s, "write_s": spent[0].wall_s,
                      "write_cpu_s": spent[0].cpu_s}))


def _first(*modules: str):
    """The first of these modules that imports (older checkouts keep the modules at the package's top level)."""
    import importlib

    for name in modules:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise SystemExit(f"none of {modules} imports")


def measure(name: str, cmd: list[str], dirpath: Path, out: Path, cold: list[Path], env: dict | None = None) -> Row:
    """Run one path on a cold cache for `cold` (none: a warm path): the harness's wall and CPU time and disk I/O
    of the child, the disk it took; the output is left for the caller."""
    before = free_bytes(dirpath)
    cost = run_child(name, cmd, cold, env=env, capture=True)
    row = Row(name, cost.wall_s, before - free_bytes(dirpath), rc=cost.rc, load=os.getloadavg()[0],
              cpu_s=cost.cpu_s, read=cost.read_bytes, written=cost.written_bytes)
    if cost.rc:
        print(f"{name}: {cost.note}\n{cost.stderr[-3000:]}", file=sys.stderr)
        return row
    lines = [line for line in cost.stdout.splitlines() if line.startswith("{")]
    if lines:
        row.patch_s, row.write_s, row.write_cpu_s = (json.loads(lines[-1]).get(k)
                                                      for k in ("patch_s", "write_s", "write_cpu_s"))
    prov = out / "provenance.json"
    if prov.is_file():
        writer = json.loads(prov.read_text()).get("writer") or {}
        row.mode = writer.get("mode", "copy (before)")
        row.reused = len(writer.get("reused_sha256", {}))
        row.hashed = writer.get("hashed_bytes", -1)  # -1: a writer before the record: it hashed every file
        row.deferred = len(writer.get("deferred", ()))
    return row


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def baseline_checkout(ref: str, dest: Path) -> Path:
    """A detached worktree of this repository at `ref`: the code before the change, run from its own folder."""
    if not dest.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(dest), ref], check=True,
                       capture_output=True)
    return dest


def check_source_untouched(snap: Path, out: Path) -> dict:
    """Write over every output shard (clones share the source's blocks until written), sync, and re-hash the
    source's shards: each must still be the sha256 its blob is named by."""
    shards = sorted(p.name for p in snap.iterdir() if p.name.endswith(".safetensors"))
    for name in shards:
        with open(out / name, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            for offset in range(0, size, CHUNK):  # 1 MiB in every 64 MiB, header and edited tensors included
                os.pwrite(fh.fileno(), b"\xa5" * min(2**20, size - offset), offset)
            os.fsync(fh.fileno())
    evict([snap.parent.parent / "blobs"])
    ok = {name: sha256_of(snap / name) == os.path.basename(os.path.realpath(snap / name)) for name in shards}
    return {"shards_rehashed": len(shards), "all_match_blob_names": all(ok.values())}


def check_diff(src: Path, out: Path, work: Path, edited: list[str]) -> dict:
    """`melsurgery diff` of source and output: only the edited tensors differ."""
    js = work / "diff.json"
    res = subprocess.run(["melsurgery", "diff", str(src), str(out), "--json", str(js)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    changed = sorted(t["name"] for t in json.loads(js.read_text())["tensors"] if t["status"] != "identical")
    return {"rc": res.returncode, "changed": changed, "only_edited": changed == sorted(edited)}


def shared_of(out: Path) -> dict:
    """FIEMAP of the output's shards: bytes in extents shared with another file (the source)."""
    sys.path.insert(0, str(REPO))
    from melsurgery.checkpoint.clone import shared_bytes

    pairs = [shared_bytes(p) for p in sorted(out.glob("*.safetensors"))]
    return {"shared": sum(s for s, _ in pairs), "total": sum(t for _, t in pairs)}


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per path: the median wall, run_patch and CPU time over its repetitions that succeeded, the rest
    from its last."""
    out = []
    for name in dict.fromkeys(r.name for r in rows):
        mine = [r for r in rows if r.name == name and not r.rc] or [r for r in rows if r.name == name]
        last = mine[-1]
        times = {k: [getattr(r, k) for r in mine if getattr(r, k) is not None]
                 for k in ("wall_s", "cpu_s", "patch_s", "write_s", "write_cpu_s")}
        out.append(Row(**{**asdict(last), **{k: statistics.median(v) if v else None for k, v in times.items()}}))
    return out


def table(rows: list[Row], model_bytes: int) -> list[str]:
    """The rows as a table, every time also as a ratio to the full copy's (`cp`) in the same run."""
    cp = next((r for r in rows if r.name == "cp" and not r.rc), None)
    cols = [("path", 19), ("wall s", 7), ("x cp", 6), ("CPU s", 6), ("CPU x cp", 8), ("run_patch s", 11),
            ("writer s", 8), ("writer x cp", 11), ("writer CPU s", 12), ("read GB", 7), ("written GB", 10),
            ("extra disk GB", 13), ("% model", 7), ("mode", 16), ("sha256 reused", 13), ("deferred", 8),
            ("MB hashed", 9)]
    lines = ["| " + " | ".join(f"{c:<{w}}" for c, w in cols) + " |",
             "|" + "|".join("-" * (w + 2) for _, w in cols) + "|"]
    for r in rows:
        hashed = "all" if r.hashed < 0 else f"{r.hashed / 1e6:.3f}" if r.mode else "-"
        cells = [r.name, f"{r.wall_s:.2f}", ratio(r.wall_s, cp and cp.wall_s), f"{r.cpu_s:.1f}",
                 ratio(r.cpu_s, cp and cp.cpu_s), "-" if r.patch_s is None else f"{r.patch_s:.2f}",
                 "-" if r.write_s is None else f"{r.write_s:.2f}", ratio(r.write_s, cp and cp.wall_s),
                 "-" if r.write_cpu_s is None else f"{r.write_cpu_s:.2f}", f"{r.read / GB:.2f}",
                 f"{r.written / GB:.2f}", f"{r.extra_disk / GB:.3f}", f"{100 * r.extra_disk / model_bytes:.2f}",
                 r.mode or "-", str(r.reused) if r.mode else "-", str(r.deferred) if r.mode else "-", hashed]
        lines.append("| " + " | ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, cols)) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_patch(*sys.argv[2:])
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child-hash":
        for path in sys.argv[2:]:
            sha256_of(Path(path))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="Work folder, on the filesystem to measure.")
    ap.add_argument("--model", type=Path, help="Model folder (default: generate the synthetic llama2-7b in --dir).")
    ap.add_argument("--scan", type=Path, help="Scan JSON of the model (default: a short scan, kept in --dir).")
    ap.add_argument("--recipe", default="norm-rescale")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="Git ref of the code before the change.")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--reps", type=int, default=1, help="Run the paths this many times, round robin (medians).")
    ap.add_argument("--diff", action="store_true", help="Also check `melsurgery diff` of source and output.")
    ap.add_argument("--json", type=Path, help="Write the figures here (default: DIR/bench_patch.json).")
    args = ap.parse_args(argv)
    work = args.dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    env_now = {"PYTHONPATH": str(REPO)}
    model = args.model or work / "model"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, HERE / "make_synthetic_checkpoint.py", model, "--preset", "llama2-7b"],
                       check=True)
    scan = args.scan or work / "scan.json"
    if not scan.is_file():
        subprocess.run(["melsurgery", "scan", str(model), "--quiet", "--device", "cpu", *CALIBRATION, "--json",
                        str(scan)], check=True, env={**os.environ, **env_now})
    snap = hub_layout(model, work / "hub" / "models--synthetic--llama2-7b")
    model_bytes = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    paths = args.paths.split(",")
    out = work / "out"
    remove(out)
    rows: list[Row] = []
    checks: dict = {}
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    blobs = snap.parent.parent / "blobs"
    runs = {
        "cp": (["sh", "-c", 'cp -r --reflink=never "$0" "$1" && sync "$1"/*', model, out], None, [model]),
        "cp-reflink": (["sh", "-c", 'cp -r --reflink=always "$0" "$1" && sync "$1"/*', model, out], None, [model]),
        "patch-before": ([*me, model, out, scan, args.recipe], "before", [model, scan]),
        "patch": ([*me, model, out, scan, args.recipe], env_now, [model, scan]),
        "patch-hf-cache": ([*me, snap, out, scan, args.recipe], env_now, [blobs, scan]),
        "patch-hf-cache-warm": ([*me, snap, out, scan, args.recipe], env_now, []),
        "hash-edited": ([sys.executable, Path(__file__).resolve(), "--child-hash"], None, [blobs]),
    }
    baseline = None
    edited_shards: list[str] = []  # the shards the patch edits, from its provenance: what hash-edited reads
    cannot: set[str] = set()
    for name in [p for _ in range(args.reps) for p in paths]:
        if name in cannot:
            continue
        cmd, env, cold = runs[name]
        if name == "hash-edited":
            if not edited_shards:
                raise SystemExit("hash-edited needs a patch path before it in --paths (it reads the shards edited)")
            cmd = [*cmd, *(snap / s for s in edited_shards)]
        if env == "before":
            baseline = baseline_checkout(args.baseline_ref, work / "baseline")
            env = {"PYTHONPATH": str(baseline)}
        row = measure(name, [str(c) for c in cmd], work, out, cold, env)
        if name == "cp-reflink" and row.rc:
            print("cp-reflink: this filesystem does not clone; left out", file=sys.stderr)
            cannot.add(name)
            remove(out)
            continue
        rows.append(row)
        if name.startswith("patch") and not row.rc:
            edits = json.loads((out / "provenance.json").read_text())["edits"]
            edited_shards = sorted({e["shard"] for e in edits})
        remove(out)
    if "patch-hf-cache" in paths:  # after the measured runs: the checks evict and rewrite what they read
        subprocess.run([str(c) for c in runs["patch-hf-cache"][0]], check=True, capture_output=True,
                       env={**os.environ, **env_now})
        checks["fiemap"] = shared_of(out)
        if args.diff:
            checks["diff"] = check_diff(snap, out, work, sorted({e["tensor"] for e in edits}))
        checks["source_untouched"] = check_source_untouched(snap, out)
        remove(out)
    if baseline is not None:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False)
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    cfg = json.loads((model / "config.json").read_text())
    text = workload(f"{model.name} ({cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}), "
                    f"{len(shards)} shards, {model_bytes / GB:.2f} GB", f"recipe {args.recipe} (defaults) given a "
                    f"scan JSON ({' '.join(CALIBRATION)})", f"filesystem {fs_type(work)} at {work}",
                    f"cold page cache per path, {args.reps} repetition(s), medians")
    lines = [text, "", *table(median_rows(rows), model_bytes), "", f"checks: {json.dumps(checks)}"]
    print("\n".join(lines))
    result = {"workload": text, "rows": [asdict(r) for r in rows], "model_bytes": model_bytes, "checks": checks}
    (args.json or work / "bench_patch.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(not r.rc for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
