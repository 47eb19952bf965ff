"""Load-time measurements' one timer: what turboserve picks by measuring on the machine (the int8
GEMM kernel per weight shape, the masked-LM decoder's precision, a whole-bf16 model against a
precision plan) times the same way."""
from __future__ import annotations

import time


def best_seconds(fn, repeat: int = 3, sync=None) -> float:
    """The best of `repeat` timed calls of fn() after one untimed one; sync(), if given, ends each
    timed call (a GPU's kernels run asynchronously: time the work, not its launch)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - start)
    return best
