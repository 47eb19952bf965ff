"""Keep freed tensor memory in the process (glibc malloc settings), set when a model is loaded.

glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap and
unmaps it on free, and trims the heap top back to the kernel. A prefill step of 4,096 tokens allocates
int32 GEMM accumulators and activations of 12-50 MB per linear, so every step faulted its outputs in
page by page and the kernel zeroed each page first (`clear_page_erms` was the top symbol of a perf
profile of GPT-2 int8 generation). With mmap off and trimming disabled, freed chunks stay in malloc's
free lists and the next step reuses them. Measured in pairs on the 2-core VM (the variable below set to
0 and 1, the same commit; docs/benchmarks.md): GPT-2 int8 offline generation 476 -> 559 tokens/s with
TTFT p50 4.1 -> 2.2 s, LLaMA int8 652 / 708 -> 667 / 775 (TTFT p50 3.3 / 2.6 -> 2.3 / 2.0 s), MiniLM
int8 encoder `short` 24,925 / 22,235 -> 29,470 / 26,327 real tokens/s. The price: the process keeps
its high-water mark of heap memory instead of giving it back between batches, which a server that runs
the same shapes again wants anyway.

`TURBOSERVE_KEEP_FREED_MEMORY=0` leaves malloc alone (for embedding turboserve in a process that must
return memory). No effect on other C libraries (musl) or platforms.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("turboserve")

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True if they are in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("TURBOSERVE_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    _applied = ok
    if not ok:
        log.debug("mallopt unavailable: freed tensor memory goes back to the kernel")
    return ok
