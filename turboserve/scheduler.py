"""Encoder batch scheduling policy (TurboTransformers' DP batch scheduler). Pure Python + numpy, no torch.

The queue is sorted by length; a plan cuts it into contiguous batches. `dp_partition` minimises the
total estimated time of the plan:

    best[i] = min over k of best[i - k] + cost(batch of sorted requests i-k+1 .. i)

subject to each batch's token count <= max_batch_tokens (and <= max_batch_size requests). `cost` comes
from a `CostTable` measured on this machine at start-up (see engine.measure_cost_table), not from a
formula. `fifo_partition` is the baseline: arrival order, a batch closes when the next request would
overflow the token budget.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np


@dataclass
class CostTable:
    """Measured batch latency (seconds) at grid points (batch size, sequence length).

    cost(B, L) interpolates bilinearly in (log B, log L) between measured points, and extrapolates
    linearly in tokens beyond the grid's edge."""
    sizes: list[int]
    lengths: list[int]
    seconds: list[list[float]]          # seconds[i][j] for sizes[i], lengths[j]; nan where not measured
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        t = np.array(self.seconds, dtype=np.float64)
        # Cells over the token budget are not measured (nan); they only matter as interpolation
        # neighbours at the budget's edge. Fill them in proportion to tokens from the largest
        # measured length of their row, or for rows with none, from the largest measured size.
        measured = ~np.isnan(t)
        for i in range(t.shape[0]):
            if measured[i].any():
                j0 = int(np.flatnonzero(measured[i])[-1])
                for j in range(j0 + 1, t.shape[1]):
                    t[i, j] = t[i, j0] * self.lengths[j] / self.lengths[j0]
            else:
                t[i] = t[i - 1] * self.sizes[i] / self.sizes[i - 1]
        # A larger batch or longer sequences never cost less: take the monotone envelope, so the DP
        # cannot exploit measurement noise (seen: cost(16, 128) measured below cost(8, 128), and the
        # DP then cut a longtail queue into 15 batches where 3 fit; slower in serving).
        t = np.maximum.accumulate(np.maximum.accumulate(t, axis=0), axis=1)
        self._t = t
        self._lb = np.log(np.array(self.sizes, dtype=np.float64))
        self._ll = np.log(np.array(self.lengths, dtype=np.float64))

    def cost(self, batch_size, mean_length):
        """Vectorised over numpy arrays of batch sizes and mean lengths."""
        b = np.log(np.clip(np.asarray(batch_size, dtype=np.float64), self.sizes[0], None))
        length = np.asarray(mean_length, dtype=np.float64)
        scale = np.where(length > self.lengths[-1], length / self.lengths[-1], 1.0)
        bscale = np.where(np.exp(b) > self.sizes[-1], np.exp(b) / self.sizes[-1], 1.0)
        lnl = np.log(np.clip(length, self.lengths[0], self.lengths[-1]))
        b = np.minimum(b, self._lb[-1])
        i = np.clip(np.searchsorted(self._lb, b, side="right") - 1, 0, len(self.sizes) - 2)
        j = np.clip(np.searchsorted(self._ll, lnl, side="right") - 1, 0, len(self.lengths) - 2)
        fb = (b - self._lb[i]) / (self._lb[i + 1] - self._lb[i])
        fl = (lnl - self._ll[j]) / (self._ll[j + 1] - self._ll[j])
        t = self._t
        v = ((1 - fb) * (1 - fl) * t[i, j] + fb * (1 - fl) * t[i + 1, j]
             + (1 - fb) * fl * t[i, j + 1] + fb * fl * t[i + 1, j + 1])
        return v * scale * bscale

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "lengths": self.lengths, "seconds": self.seconds, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> "CostTable":
        return cls(d["sizes"], d["lengths"], d["seconds"], d.get("meta", {}))


def dp_partition(lengths: list[int], cost: CostTable, max_batch_tokens: int,
                 max_batch_size: int = 1 << 30, batch_overhead: float = 0.0) -> list[list[int]]:
    """Optimal contiguous partition of the length-sorted queue. Returns batches of indices into
    `lengths` (each batch ascending by length). A request longer than the budget runs alone.
    `batch_overhead` (seconds) is added per batch: what a batch costs in serving beyond the table's
    in-isolation measurement (see engine.EncoderEngine)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sl = np.array([lengths[i] for i in order], dtype=np.float64)
    n = len(sl)
    prefix = np.concatenate([[0.0], np.cumsum(sl)])
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        # batch = sorted[i-k .. i-1] for k = 1..kmax
        lo = bisect.bisect_left(prefix, prefix[i] - max_batch_tokens, 0, i)   # smallest start with tokens <= budget
        start = np.arange(max(lo, i - max_batch_size, 0), i)
        if len(start) == 0:
            start = np.array([i - 1])          # one over-long request: alone
        k = i - start
        total = best[start] + cost.cost(k, (prefix[i] - prefix[start]) / k) + batch_overhead
        m = int(np.argmin(total))
        best[i], choice[i] = total[m], start[m]
    batches, i = [], n
    while i > 0:
        s = int(choice[i])
        batches.append([order[j] for j in range(s, i)])
        i = s
    return batches[::-1]


def plan_cost(lengths: list[int], batches: list[list[int]], cost: CostTable) -> float:
    return float(sum(cost.cost(len(b), sum(lengths[i] for i in b) / len(b)) for b in batches))


def brute_force_partition(lengths: list[int], cost: CostTable, max_batch_tokens: int,
                          batch_overhead: float = 0.0) -> float:
    """Cheapest contiguous partition of the sorted queue by enumeration (tests; n <= ~12)."""
    sl = sorted(lengths)
    n = len(sl)
    best = math.inf
    for cuts_n in range(n):
        for cuts in combinations(range(1, n), cuts_n):
            bounds = [0, *cuts, n]
            groups = [sl[a:b] for a, b in zip(bounds, bounds[1:])]
            if any(sum(g) > max_batch_tokens and len(g) > 1 for g in groups):
                continue
            best = min(best, float(sum(cost.cost(len(g), sum(g) / len(g)) + batch_overhead for g in groups)))
    return best


def fifo_partition(lengths: list[int], max_batch_tokens: int, max_batch_size: int = 1 << 30) -> list[list[int]]:
    """Baseline: arrival order, close a batch when the next request would overflow the budget."""
    batches, cur, tokens = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (tokens + n > max_batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += n
    if cur:
        batches.append(cur)
    return batches
