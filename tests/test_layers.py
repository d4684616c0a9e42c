"""The layering the README's Layout promises: contracts without torch, an engine without measurement."""

import subprocess
import sys

import pytest

TORCH_FREE = ["stats", "samples", "scan_result", "provenance", "edits", "typed", "outputs", "manifest", "recipes",
              "card", "report", "hubmeta"]


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, melsurgery.{module}; print(' '.join(sorted(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


@pytest.mark.parametrize("module", TORCH_FREE)
def test_contract_modules_import_without_torch(module: str) -> None:
    loaded = _modules_after_import(module)
    assert f"melsurgery.{module}" in loaded
    assert "torch" not in loaded


def test_the_streaming_engine_knows_nothing_of_measurement() -> None:
    loaded = {m for m in _modules_after_import("streaming") if m.startswith("melsurgery.")}
    measuring = {"measure", "probes", "detect", "ffn_attribution", "attn_input", "scan", "verify", "tune", "stats"}
    assert loaded & {f"melsurgery.{m}" for m in measuring} == set()
