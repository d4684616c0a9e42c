"""Step-sized buffers are kept for the next step instead of being page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHURN = """
import ctypes, resource, sys, torch
from melsurgery.allocator import keep_step_buffers
if sys.argv[1] == "keep":
    took = keep_step_buffers()
else:  # the policy the streaming engine had: every buffer from 1 MB up mapped afresh
    took = ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(50):
    torch.empty(4 << 20).fill_(1.0)   # 16 MiB, freed at once, as a layer's activations are
print(took, faults() - before)
"""

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def _churn(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@linux
def test_freed_step_buffers_are_reused_without_new_page_faults() -> None:
    took, mapped = _churn("mapped")
    assert took == "True"
    assert mapped > 50 * 4_000 * 0.8    # every 16 MiB buffer faulted in anew
    took, kept = _churn("keep")
    assert took == "True"
    assert kept < mapped / 4             # faulted in once (and some setting up), then reused


@linux
def test_a_users_own_malloc_setting_wins() -> None:
    took, _ = _churn("keep", MALLOC_ARENA_MAX="2")
    assert took == "False"


def test_the_cli_and_the_streaming_engine_set_it() -> None:
    import melsurgery.calibrate.streaming as streaming
    import melsurgery.cli as cli

    for module in (cli, streaming):
        assert "keep_step_buffers()" in open(module.__file__).read()
