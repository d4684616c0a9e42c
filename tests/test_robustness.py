"""Robustness: bad inputs, hostile inputs and hostile environments fail cleanly and change nothing.

Every CLI check runs the real console script and expects what a user should see: a non-zero exit,
exactly one `melsurgery: error:` line on stderr, no traceback, no output folder (not even a hidden
temporary one), and a source folder whose bytes and mtimes are as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import resource
import shutil
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from melsurgery.checkpoint.atomic import atomic_folder
from melsurgery.checkpoint.safetensors_file import DTYPES, ITEMSIZE, load_tensor, read_header
from melsurgery.errors import UserError
from tests.support.helpers import QUICK_SCAN, assert_clean_failure, default_signals, hub_cache_layout, run_cli, snapshot

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
PATCH = ("--recipe", "ffn-dampen", "--quiet")
SCAN = QUICK_SCAN  # a short calibration: these tests are about I/O


@pytest.fixture(scope="module")
def base(sharded) -> tuple[Path, Path]:
    """A tiny planted model in two shards, and its scan JSON (so patch runs skip the scan)."""
    return sharded


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- corrupt inputs ---------------------------------------------------------------------------------


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header in place (the data region is kept as it is)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def edit_index(folder: Path, edit: Callable[[dict], None]) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def truncate(f: Path) -> None:
    data = (f / SHARD2).read_bytes()
    (f / SHARD2).write_bytes(data[: len(data) * 2 // 3])


def header_too_long(f: Path) -> None:
    data = (f / SHARD1).read_bytes()
    (f / SHARD1).write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])


def offsets_overlap(f: Path) -> None:
    def edit(h: dict) -> None:
        h["model.layers.0.self_attn.o_proj.weight"]["data_offsets"] = h["model.layers.0.self_attn.q_proj.weight"][
            "data_offsets"]
    rewrite_header(f / SHARD1, edit)


def offsets_past_end(f: Path) -> None:
    def edit(h: dict) -> None:
        name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        h[name]["data_offsets"] = [o + 4096 for o in h[name]["data_offsets"]]
    rewrite_header(f / SHARD1, edit)


def shape_lies(f: Path) -> None:
    def edit(h: dict) -> None:
        h["model.layers.0.self_attn.q_proj.weight"]["shape"] = [64, 65]
    rewrite_header(f / SHARD1, edit)


def shard_missing(f: Path) -> None:
    (f / SHARD2).unlink()


def tensor_missing(f: Path) -> None:
    edit_index(f, lambda wm: wm.update({"model.layers.0.mlp.ghost.weight": SHARD1}))


def tensor_twice(f: Path) -> None:
    one, two = load_file(f / SHARD1), load_file(f / SHARD2)
    name = next(iter(one))
    save_file({**two, name: one[name]}, f / SHARD2, metadata={"format": "pt"})


def shard_outside(f: Path) -> None:
    shutil.copy(f / SHARD2, f.parent / "outside.safetensors")
    edit_index(f, lambda wm: wm.update({k: "../outside.safetensors" for k, v in wm.items() if v == SHARD2}))


def no_config(f: Path) -> None:
    (f / "config.json").unlink()


def bad_config(f: Path) -> None:
    (f / "config.json").write_text('{"model_type": "llama", ')


def replace_tensors(f: Path, old: str, new: dict[str, torch.Tensor]) -> None:
    """Swap one tensor for others in its shard, keeping the index right."""
    shard = json.loads((f / INDEX).read_text())["weight_map"][old]
    state = load_file(f / shard)
    del state[old]
    save_file({**state, **new}, f / shard, metadata={"format": "pt"})

    def edit(wm: dict) -> None:
        del wm[old]
        wm.update({k: shard for k in new})
    edit_index(f, edit)


def fp8_tensor(f: Path) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    replace_tensors(f, name, {name: load_file(f / SHARD1)[name].to(torch.float8_e4m3fn)})


def packed_int4(f: Path) -> None:
    """A GPTQ-style checkpoint: quantization_config, I32 packed weights and F16 scales."""
    cfg = json.loads((f / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (f / "config.json").write_text(json.dumps(cfg))
    p = "model.layers.0.mlp.down_proj."
    replace_tensors(f, p + "weight", {p + "qweight": torch.zeros(128 // 8, 64, dtype=torch.int32),
                                      p + "scales": torch.ones(4, 64, dtype=torch.float16)})


CORRUPT = {
    "truncated": (truncate, "truncated"),
    "header-length-lies": (header_too_long, "exceeds the file"),
    "offsets-overlap": (offsets_overlap, "overlap"),
    "offsets-past-end": (offsets_past_end, "past the end"),
    "shape-lies": (shape_lies, "do not match its shape"),
    "index-shard-missing": (shard_missing, "missing"),
    "index-tensor-missing": (tensor_missing, "ghost"),
    "tensor-in-two-shards": (tensor_twice, "appears in both"),
    "index-escapes-folder": (shard_outside, "outside the model folder"),
    "no-config": (no_config, "no config.json"),
    "invalid-config": (bad_config, "invalid JSON"),
    "fp8": (fp8_tensor, "F8_E4M3"),
    "packed-int4": (packed_int4, "quantised"),
}


# Cases whose failure `scan` is also run on (it opens checkpoints through the same reader as patch, so
# the rest would only repeat interpreter start-ups).
ALSO_SCAN = {"truncated", "invalid-config", "fp8", "packed-int4"}


def run_both(folder: Path, scan: Path, out: Path, also_scan: bool = True) -> list[subprocess.CompletedProcess]:
    """`patch` (and `scan`) of the same folder, side by side: each is mostly interpreter start-up."""
    runs = [("patch", folder, "-o", out, "--scan", scan, *PATCH)] + [("scan", folder, *SCAN)] * also_scan
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: run_cli(*args), runs))


@pytest.mark.parametrize("case", sorted(CORRUPT))
@pytest.mark.slow
def test_corrupt_input_is_refused_cleanly(base, tmp_path, case):
    mutate, needle = CORRUPT[case]
    folder = copy_model(base[0], tmp_path / "model")
    mutate(folder)
    before = snapshot(folder)
    out = tmp_path / "out"
    for res in run_both(folder, base[1], out, also_scan=case in ALSO_SCAN):
        assert_clean_failure(res, needle, out=out)
    assert snapshot(folder) == before


# --- hostile inputs: pickles and custom code ------------------------------------------------------


class _Planter:
    """Unpickling this creates `path`: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_pickled_weights_are_refused_and_never_unpickled(base, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base[0] / name, folder / name)
    marker = tmp_path / "UNPICKLED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Planter(marker)))
    out = tmp_path / "out"
    for res in run_both(folder, base[1], out):
        assert_clean_failure(res, "pickled", out=out)
    assert not marker.exists()


@pytest.mark.slow
def test_custom_code_and_stray_pickles_are_never_run(base, tmp_path):
    """A folder that would run code on import (auto_map) or on unpickling: scan and patch work, run nothing."""
    folder = copy_model(base[0], tmp_path / "custom")
    marker = tmp_path / "EXECUTED"
    hook = f"open({str(marker)!r}, 'a').write(__name__)\n"
    (folder / "configuration_evil.py").write_text(hook + "from transformers import LlamaConfig\n\n\n"
                                                  "class EvilConfig(LlamaConfig):\n    pass\n")
    (folder / "modeling_evil.py").write_text(hook + "from transformers import LlamaForCausalLM\n\n\n"
                                             "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    (folder / "tokenization_evil.py").write_text(hook + "from transformers import PreTrainedTokenizerFast\n\n\n"
                                                 "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Planter(marker)))
    out = tmp_path / "out"
    with ThreadPoolExecutor(2) as pool:
        runs = [("scan", folder, *SCAN), ("patch", folder, "-o", out, "--scan", base[1], *PATCH)]
        scan, patch = pool.map(lambda args: run_cli(*args), runs)
    assert scan.returncode == 0, scan.stderr
    assert patch.returncode == 0, patch.stderr
    assert not marker.exists()
    # the stale pickled weights are not shipped beside the patched ones
    assert not (out / "pytorch_model.bin").exists() and (out / "model.safetensors.index.json").is_file()


# --- hostile environments: full disk, races ------------------------------------------------------


@pytest.mark.slow
def test_write_error_fails_cleanly_and_removes_partial_output(base, tmp_path):
    """A file-size limit (as a full disk would) stops the shard copy: EFBIG, one line, nothing left."""
    limit = (base[0] / SHARD1).stat().st_size // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    res = subprocess.run(["melsurgery", "patch", str(base[0]), "-o", str(out), "--scan", str(base[1]), *PATCH],
                         capture_output=True, text=True, preexec_fn=small_files, timeout=600,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode == 5, res.stderr  # not killed by SIGXFSZ; 5: out of space
    assert_clean_failure(res, "write failed", "nothing was written", out=out, code=5)


@pytest.mark.slow
def test_concurrent_patches_into_one_output(base, tmp_path):
    out = tmp_path / "out"
    args = ("patch", base[0], "-o", out, "--scan", base[1], *PATCH)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_cli(*args), range(2)))
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr for r in results]
    assert_clean_failure(next(r for r in results if r.returncode))
    prov = json.loads((out / "provenance.json").read_text())
    files = {p.name for p in out.iterdir()} - {"provenance.json"}
    assert set(prov["outputs"]) | set(prov.get("derived", {})) == files  # a plain folder's shards: derived
    for name, digest in prov["outputs"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert not list(tmp_path.glob(".melsurgery-tmp-*"))


@pytest.mark.parametrize("premade", [False, True], ids=["absent", "empty-folder"])
def test_commit_race_has_exactly_one_winner(tmp_path, premade):
    """Another run finishes `out` while this one is writing: this one fails and leaves the winner intact."""
    out = tmp_path / "out"
    if premade:
        out.mkdir()
    with pytest.raises(UserError, match="another run"):
        with atomic_folder(out) as tmp:
            (tmp / "mine").write_text("loser")
            out.mkdir(exist_ok=True)
            (out / "theirs").write_text("winner")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert not list(tmp_path.glob(".melsurgery-tmp-*"))


def test_premade_empty_output_folder_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_folder(out) as tmp:
        (tmp / "mine").write_text("x")
    assert [p.name for p in out.iterdir()] == ["mine"]


# --- interruptions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
@pytest.mark.slow
def test_interrupted_patch_leaves_nothing(base, tmp_path, sig):
    """The writer pauses after its first shard (test hook): the signal always lands mid-write."""
    src = copy_model(base[0], tmp_path / "src")
    before = snapshot(src)
    out, ready = tmp_path / "out", tmp_path / "first-shard-written"
    cmd = ["melsurgery", "patch", str(src), "-o", str(out), "--scan", str(base[1]), *PATCH]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_signals,
                            env={**os.environ, "MELSURGERY_TEST_PAUSE_FILE": str(ready)})
    try:
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        assert list(tmp_path.glob(".melsurgery-tmp-out-*")), "paused inside the write"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), err
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert b"interrupted" in err and b"Traceback" not in err, err
        assert not list(tmp_path.glob(".melsurgery-tmp-*"))
    assert snapshot(src) == before
    res = run_cli("patch", src, "-o", out, "--scan", base[1], *PATCH)  # a rerun trips on nothing left behind
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.glob(".melsurgery-tmp-*")) and (out / "provenance.json").is_file()


# --- awkward paths and folders ----------------------------------------------------------------------


def assert_patched_copy(src: Path, out: Path) -> None:
    """out holds real files; untouched shards and side files have the source's bytes, edited ones its size."""
    for p in out.iterdir():
        assert p.is_file() and not p.is_symlink(), p
    prov = json.loads((out / "provenance.json").read_text())
    edited = {e["shard"] for e in prov["edits"]}
    assert edited and edited < {SHARD1, SHARD2}
    for name in (SHARD1, SHARD2, INDEX, "tokenizer.json", "tokenizer_config.json"):
        same = (out / name).read_bytes() == (src / name).read_bytes()
        assert same != (name in edited) and (out / name).stat().st_size == (src / name).stat().st_size, name
    for name, digest in prov["outputs"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


@pytest.mark.slow
def test_paths_with_spaces_and_non_ascii(base, tmp_path):
    folder = copy_model(base[0], tmp_path / "mes modèles" / "petit modèle 模型")
    scan = tmp_path / "scan résultat.json"
    res = run_cli("scan", folder, *SCAN, "--json", scan)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "sortie é" / "ü out"
    res = run_cli("patch", folder, "-o", out, "--scan", scan, *PATCH)
    assert res.returncode == 0, res.stderr
    assert_patched_copy(folder, out)


@pytest.mark.slow
def test_read_only_source_is_never_modified(base, tmp_path):
    folder = copy_model(base[0], tmp_path / "ro")
    for p in [folder, *folder.iterdir()]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = snapshot(folder)
    try:
        out = tmp_path / "out"
        with ThreadPoolExecutor(2) as pool:
            runs = [("scan", folder, *SCAN), ("patch", folder, "-o", out, "--scan", base[1], *PATCH)]
            scan, patch = pool.map(lambda args: run_cli(*args), runs)
        assert scan.returncode == 0 and patch.returncode == 0, scan.stderr + patch.stderr
        assert snapshot(folder) == before
        assert all(p.stat().st_mode & stat.S_IWUSR for p in out.iterdir())  # the output is an ordinary folder
    finally:
        for p in [folder, *folder.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
@pytest.mark.slow
def test_hub_cache_symlinks_become_real_files(base, tmp_path, link):
    snap = hub_cache_layout(base[0], tmp_path / "models--org--tiny")
    out = tmp_path / "out"
    res = run_cli("patch", snap, "-o", out, "--scan", base[1], *PATCH, *(["--link"] if link else []))
    assert res.returncode == 0, res.stderr
    assert_patched_copy(snap, out)
    assert all(p.is_symlink() for p in snap.iterdir())
    edited = {e["shard"] for e in json.loads((out / "provenance.json").read_text())["edits"]}
    for shard in {SHARD1, SHARD2} - edited:  # --link: the untouched shard is the blob itself, hard-linked
        assert os.path.samefile(out / shard, snap / shard) == link, shard


# --- the safetensors reader, property-based ----------------------------------------------------------

PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
NAME = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters='"\\'), min_size=1,
               max_size=12)


@st.composite
def tensor_dicts(draw, nonempty: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of every supported dtype, with arbitrary bytes (NaN payloads, denormals) and shapes."""
    names = draw(st.lists(NAME.filter(lambda s: s != "__metadata__"), min_size=1, max_size=4, unique=True))
    out = {}
    for name in names:
        code = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(1 if nonempty else 0, 4), max_size=3))
        nbytes = math.prod(shape) * ITEMSIZE[code]
        raw = draw(st.binary(min_size=nbytes, max_size=nbytes)) if code != "BOOL" else bytes(
            draw(st.lists(st.integers(0, 1), min_size=nbytes, max_size=nbytes)))
        out[name] = torch.frombuffer(bytearray(raw) or bytearray(1), dtype=torch.uint8)[:nbytes].view(
            DTYPES[code]).reshape(shape)
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@PROPS
@given(tensors=tensor_dicts(), metadata=st.dictionaries(NAME, NAME, max_size=3))
def test_valid_files_round_trip_exactly(tmp_path, tensors, metadata):
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata=metadata or None)
    header = read_header(path)
    assert set(header.tensors) == set(tensors)
    assert header.metadata == metadata
    for name, t in tensors.items():
        info = header.tensors[name]
        assert DTYPES[info.dtype] == t.dtype and info.shape == tuple(t.shape)
        got = load_tensor(info)
        assert got.dtype == t.dtype and got.shape == t.shape and raw_bytes(got) == raw_bytes(t)


def write_with_header(path: Path, header: object, data: bytes, hlen: int | None = None) -> None:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob) if hlen is None else hlen) + blob + data)


def parse_valid_file(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    save_file(tensors, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=12)


@PROPS
@given(garbage=st.binary(max_size=80))
def test_garbage_files_never_escape_as_other_errors(tmp_path, garbage):
    path = tmp_path / "g.safetensors"
    path.write_bytes(garbage)
    try:
        read_header(path)
    except UserError:
        pass


@PROPS
@given(header=JSON, data=st.binary(max_size=32))
@pytest.mark.slow
def test_arbitrary_json_headers_only_raise_user_errors(tmp_path, header, data):
    path = tmp_path / "j.safetensors"
    write_with_header(path, header, data)
    try:
        read_header(path)
    except UserError:
        pass


@st.composite
def broken_headers(draw, tensors: dict[str, torch.Tensor]) -> tuple[str, Callable[[dict], None] | int]:
    """One targeted corruption of a valid header: a lying length, offset, dtype or shape, or a garbage entry."""
    name = draw(st.sampled_from(sorted(tensors)))
    kind = draw(st.sampled_from(["length", "offsets", "dtype", "shape", "entry"]))
    if kind == "length":
        return kind, draw(st.integers(0, 2**64 - 1))
    if kind == "offsets":
        new = draw(st.lists(st.integers(-2**40, 2**40), min_size=0, max_size=3))
        return kind, lambda h: h[name].update(data_offsets=new)
    if kind == "dtype":
        itemsize = ITEMSIZE[next(k for k, v in DTYPES.items() if v == tensors[name].dtype)]
        other = draw(st.sampled_from([k for k in ITEMSIZE if ITEMSIZE[k] != itemsize] + ["F8_E4M3", "I4", "Q4_K"])
                     | st.text(max_size=6) | JSON)
        return kind, lambda h: h[name].update(dtype=other)
    if kind == "shape":
        shape = draw(st.lists(st.integers(-3, 6), max_size=3) | JSON)
        return kind, lambda h: h[name].update(shape=shape)
    entry = draw(JSON)
    return kind, lambda h: h.update({name: entry})


@PROPS
@given(data=st.data())
def test_malformed_headers_raise_user_error(tmp_path, data):
    tensors = data.draw(tensor_dicts(nonempty=True))
    path = tmp_path / "m.safetensors"
    header, body = parse_valid_file(path, tensors)
    original = json.loads(json.dumps(header))
    kind, corruption = data.draw(broken_headers(tensors))
    if kind == "length":
        blob = json.dumps(header).encode()
        if corruption == len(blob):
            return
        write_with_header(path, blob, body, hlen=corruption)
    else:
        corruption(header)
        if header == original:
            return  # the draw happened to rebuild the valid header
        write_with_header(path, header, body)
    try:
        got = read_header(path)
    except UserError:
        return
    # the only corruptions that may parse are those that describe the same bytes another valid way
    assert kind in ("dtype", "shape") and sum(i.nbytes for i in got.tensors.values()) == len(body)


def test_load_rows_reads_just_those_rows(base):
    from melsurgery.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(base[0])
    name = "model.embed_tokens.weight"
    rows = [1, 0, 5, 1, ckpt.info(name).shape[0] - 1]
    assert torch.equal(ckpt.load_rows(name, rows), ckpt.load(name)[rows])
    assert ckpt.load_rows(name, [2], dtype=torch.float64).dtype == torch.float64
    with pytest.raises(UserError, match="out of range"):
        ckpt.load_rows(name, [ckpt.info(name).shape[0]])


# --- the writer's spliced copy ------------------------------------------------------------------------


@st.composite
def splice_plans(draw) -> tuple[bytes, dict[int, int]]:
    """A file and disjoint byte ranges of it (start -> end) to rewrite."""
    data = draw(st.binary(max_size=6000))
    cuts = sorted(draw(st.sets(st.integers(0, len(data)), max_size=8)))
    ranges = {a: b for a, b in zip(cuts[::2], cuts[1::2]) if b > a}
    return data, ranges


@PROPS
@given(plan=splice_plans())
def test_spliced_copy_writes_and_hashes_exactly(tmp_path, monkeypatch, plan):
    from melsurgery.checkpoint import writer

    monkeypatch.setattr(writer, "PIECE", 512)  # many pieces: the copy, hash and output-hash threads interleave
    monkeypatch.setattr(writer, "WINDOW", 1024)
    data, ranges = plan
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    expected = bytearray(data)
    for a, b in ranges.items():
        expected[a:b] = bytes(255 - x for x in data[a:b])
    splices = {a: (b, lambda d: bytes(255 - x for x in d)) for a, b in ranges.items()}
    digest_in, digest_out = writer.copy_spliced(src, dst, splices)
    assert dst.read_bytes() == expected
    assert digest_in == hashlib.sha256(data).hexdigest() and digest_out == hashlib.sha256(expected).hexdigest()


def test_spliced_copy_failure_raises_the_real_error(tmp_path, monkeypatch):
    from melsurgery.checkpoint import writer

    monkeypatch.setattr(writer, "PIECE", 512)
    src = tmp_path / "src"
    src.write_bytes(bytes(20000))

    def broken(data: bytes) -> bytes:
        raise UserError("the edit failed")

    with pytest.raises(UserError, match="the edit failed"):
        writer.copy_spliced(src, tmp_path / "dst", {100: (200, lambda d: d), 9000: (9500, broken)})


# --- the benchmarks' synthetic checkpoint ---------------------------------------------------------------


@pytest.mark.slow
def test_synthetic_checkpoint_is_sharded_loadable_and_planted(tmp_path):
    """benchmarks/make_synthetic_checkpoint.py at toy width: many shards with an index, and scan finds the plant."""
    import sys

    folder = tmp_path / "synthetic"
    script = Path(__file__).parents[1] / "benchmarks" / "make_synthetic_checkpoint.py"
    subprocess.run([sys.executable, script, folder, "--layers", "5", "--hidden", "256", "--intermediate", "512",
                    "--vocab", "256", "--shard-gb", "0.002", "--plant-dim", "141", "--plant-neuron", "300"],
                   check=True, capture_output=True)
    index = json.loads((folder / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2 and len(index["weight_map"]) == 2 + 5 * 9 + 1
    scan = tmp_path / "scan.json"
    res = run_cli("scan", folder, *SCAN, "--json", scan)
    assert res.returncode == 0, res.stderr
    result = json.loads(scan.read_text())
    assert result["me_layer"] == 1 and result["massive_dims"] == [141]
    assert result["ffn_neurons"][0]["neuron"] == 300
