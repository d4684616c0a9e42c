"""The C allocator, set once for a process that allocates and frees the same large tensors at every step.

A buffer glibc serves from a fresh mapping is unmapped when freed and page-faulted in anew next time: with
a 1 MB mmap threshold every activation of every layer and window took that path, and a third of a search's
CPU time went to the kernel (40 million page faults in `make demo`). glibc's own default raises its
threshold as large buffers are freed, which ends the faults but lets the threshold drift. A fixed 32 MiB
threshold (glibc's largest) and a 64 MiB trim threshold keep the step-sized buffers in the heap for the
next step, and still map anything larger (a layer's weights in a 7B model), so that it goes back to the
system when freed. The head is scored in blocks smaller than the threshold
(`measure.logsoftmax.TOKEN_ROWS`). A user's own MALLOC_* settings win; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


@functools.cache
def keep_step_buffers() -> bool:
    """Set glibc's thresholds (once per process); True when the setting took effect."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
