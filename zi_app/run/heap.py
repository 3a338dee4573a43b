"""The job's C heap: what glibc keeps of the memory Python and torch free.

Building a model makes and frees many full-width temporaries (each layer drawn at its dtype, then quantized or
partitioned). glibc serves allocations below its mmap threshold from its heap, raises that threshold up to
32 MiB as large blocks are freed, and keeps freed heap memory in the process: on DeepSpeed's CPU accelerator,
opt-1.3b int4 held 2.11 GiB after loading for 0.69 GiB of weights, and 1.22 GiB once trimmed. A job's host RSS
is a result (the planner predicts it), so a job hands that memory back. No-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # while loading: blocks from 1 MiB up get their own mapping, unmapped when freed
# After loading: glibc's own ceiling for its threshold (64-bit), so that generate's temporaries are reused from
# the heap; mapping each one afresh made DeepSpeed's CPU-accelerator decode steps about a third slower.
STEADY_MMAP_THRESHOLD_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_large_blocks() -> None:
    """Until :func:`trim`, blocks of 1 MiB and more are mapped on their own and unmapped when freed, at a fixed
    threshold (glibc's default rises to 32 MiB, and a freed block below it stays in the heap)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def trim() -> None:
    """Return the heap's free memory to the system now (``malloc_trim(0)``), and from now on serve blocks up to
    32 MiB from the heap again: what the model built is freed, and what generate frees is reused."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD_BYTES)
