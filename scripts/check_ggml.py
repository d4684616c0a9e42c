#!/usr/bin/env python
"""Read GGUF files with llama.cpp's own GGUF parser and dequantisers (ggml), not the gguf package. Not part of CI.

For each file: `gguf_init_from_file` of libggml-base (llama.cpp's loader starts there: it checks the header,
every tensor info, that each tensor sits at the offset the ones before it imply, aligned) must accept it;
every tensor's name, type, offset and size as ggml reads them must be melsurgery's; and each tensor named with
`--dequantise` (default: every tensor whose type or bytes differ from `--source`) must dequantise through
ggml's `to_float` to exactly what the gguf package's dequantiser gives (what transformers' GGUF loader uses).
It does not run the model: that needs all of llama.cpp (scripts/check_llamacpp.py).

libggml-base is the first library a llama-cpp-python source build compiles (BUILD/bin/libggml-base.so):

    python scripts/check_ggml.py BUILD/bin/libggml-base.so out/patched.gguf --source base.gguf
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import numpy as np


class _Params(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def load(lib_path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(lib_path))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _Params]
    for fn, res, args in (("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
                          ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
                          ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_free", None, [ctypes.c_void_p]),
                          ("ggml_get_type_traits", ctypes.POINTER(_Traits), [ctypes.c_int])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    return lib


def to_float(lib: ctypes.CDLL, qtype: int, raw: bytes, n: int) -> np.ndarray:
    """ggml's own dequantiser for the type (what llama.cpp's CPU backend uses to read the weights as floats)."""
    address = lib.ggml_get_type_traits(qtype).contents.to_float
    if not address:  # F32: stored as floats, nothing to convert
        return np.frombuffer(raw, dtype="<f4").copy()
    out = np.zeros(n, dtype=np.float32)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(address)
    src = ctypes.create_string_buffer(raw, len(raw))
    fn(ctypes.cast(src, ctypes.c_void_p), out.ctypes.data, n)
    return out


def check(lib: ctypes.CDLL, path: Path, source: Path | None) -> dict:
    from gguf import GGMLQuantizationType, quants

    from melsurgery.checkpoint.gguf_file import GGUFFile

    ctx = lib.gguf_init_from_file(str(path).encode(), _Params(True, None))
    if not ctx:
        return {"file": str(path), "ggml_accepts": False}
    try:
        ours, src = GGUFFile(path), GGUFFile(source) if source else None
        base = lib.gguf_get_data_offset(ctx)
        same_table, checked = base == ours.data_offset, {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            name = lib.gguf_get_tensor_name(ctx, i).decode()
            info = ours.tensors[name]
            qtype = lib.gguf_get_tensor_type(ctx, i)
            same_table &= (qtype == int(info.type) and base + lib.gguf_get_tensor_offset(ctx, i) == info.start
                           and lib.gguf_get_tensor_size(ctx, i) == info.nbytes and info.end <= ours.size)
            if src is None or (src.tensors[name].type == info.type and src.raw(name).tobytes() ==
                               ours.raw(name).tobytes()):
                continue
            raw = ours.raw(name)
            theirs = to_float(lib, qtype, raw.tobytes(), int(np.prod(info.shape)))
            gguf_values = quants.dequantize(raw, GGMLQuantizationType(qtype)).reshape(-1)
            checked[name] = {"type": info.type_name, "max_abs_diff": float(np.abs(theirs - gguf_values).max())}
        return {"file": str(path), "ggml_accepts": True, "table_agrees": bool(same_table), "dequantised": checked}
    finally:
        lib.gguf_free(ctx)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lib", type=Path, help="libggml-base.so of a llama.cpp build")
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--source", type=Path, help="The GGUF the files were patched from (its changed tensors are "
                                                "dequantised by both)")
    a = ap.parse_args(argv)
    lib = load(a.lib)
    ok = True
    for f in a.files:
        r = check(lib, f, a.source)
        print(r)
        ok &= r["ggml_accepts"] and r["table_agrees"] and all(v["max_abs_diff"] == 0 for v in r["dequantised"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
