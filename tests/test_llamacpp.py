"""Optional: the patched default-model GGUF in a real GGUF runtime (llama.cpp via llama-cpp-python).

Skipped where llama-cpp-python is not installed (it is a source build, not part of the test extra):
`CMAKE_BUILD_PARALLEL_LEVEL=1 pip install llama-cpp-python`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_llamacpp_sees_the_patch_transformers_sees(smollm2, smollm2_scan, tmp_path):
    from check_llamacpp import check

    from melsurgery.gguf_patch import run_patch_gguf
    from melsurgery.manifest import Manifest

    out = run_patch_gguf(smollm2, tmp_path / "damp.gguf", Manifest(recipes=[("ffn-dampen", {"factor": 0.0})]),
                         scan=smollm2_scan)
    r = check(smollm2.origin_file, out.file, n_windows=1, size=128)
    assert r["runtimes_base"]["top1_agreement"] > 0.9  # llama.cpp runs the same model transformers loads
    assert r["runtimes_patched"]["top1_agreement"] > 0.9  # ... and reads the patched file the same way
    lc, tf = r["llama.cpp"]["kl_mean"], r["transformers"]["kl_mean"]
    assert tf > 0.05  # removing the massive-activation neurons matters ...
    assert abs(lc - tf) < 0.25 * tf  # ... to llama.cpp as much as to transformers
