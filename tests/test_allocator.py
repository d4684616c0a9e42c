"""The CLI keeps freed tensor memory for the next step instead of page-faulting it in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHURN = """
import resource, sys, torch
from melsurgery.allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(50):
    torch.empty(16 << 20).fill_(1.0)   # 64 MiB, freed at once, as a window's logits are
print(took, faults() - before)
"""


def _churn(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_without_new_page_faults() -> None:
    _, plain = _churn("plain")
    took, kept = _churn("keep")
    assert took == "True"
    assert plain > 50 * 16_000 * 0.8     # every 64 MiB buffer faulted in anew
    assert kept < plain / 4              # faulted in once (and some setting up), then reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_users_own_malloc_setting_wins() -> None:
    took, _ = _churn("keep", MALLOC_ARENA_MAX="2")
    assert took == "False"


def test_the_cli_sets_it_before_any_command() -> None:
    import melsurgery.cli as cli

    assert "keep_freed_memory()" in open(cli.__file__).read()
