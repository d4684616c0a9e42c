"""The C allocator, set for a process that allocates and frees large tensors at every step.

glibc serves each allocation over its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it
when freed, so the logits, hidden states and layer weights of every window are page-faulted in anew: on
the default model a third of a search's CPU time went to the kernel. Never mapping, and returning freed
memory to the system only past 1 GiB at the heap's top, keeps those pages for the next step. A user's own
MALLOC_* settings win; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of unmapping it; True when the setting took effect."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
