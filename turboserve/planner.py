"""Sequence-length-aware activation memory planner (TurboTransformers' allocator).

One encoder layer's intermediate tensors are described by usage records (name, first_op, last_op,
bytes). `plan()` assigns each a (chunk, offset) so that no two tensors whose lifetimes overlap share a
byte, placing the largest tensors first, each at the best-fitting gap (the smallest gap that holds it)
among already-placed tensors whose lifetimes overlap it. Chunks are at least 2 MiB; a tensor that fits
no chunk opens a new one of 1.2 x its size. Every layer has the same records, so one plan serves all
layers, and plans are cached per token-count bucket by `Workspace`.

This module is pure bookkeeping (no torch) so it can be tested against brute force.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

MIN_CHUNK_BYTES = 2 << 20
CHUNK_GROWTH = 1.2
ALIGN = 64  # cache-line alignment of every tensor's offset


@dataclass(frozen=True)
class UsageRecord:
    name: str
    first_op: int
    last_op: int
    nbytes: int

    def overlaps(self, other: "UsageRecord") -> bool:
        return self.first_op <= other.last_op and other.first_op <= self.last_op


@dataclass(frozen=True)
class Placement:
    chunk: int
    offset: int


@dataclass(frozen=True)
class Plan:
    placements: dict          # name -> Placement
    chunk_sizes: tuple        # bytes of each chunk

    @property
    def footprint(self) -> int:
        return sum(self.chunk_sizes)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _best_fit(size: int, busy: list[tuple[int, int]], limit: int | None) -> int | None:
    """Smallest gap of at least `size` bytes between the busy [start, end) ranges, below `limit`."""
    best_offset, best_gap = None, None
    cursor = 0
    for start, end in sorted(busy) + [(limit if limit is not None else 1 << 62, 0)]:
        gap = start - cursor
        if gap >= size and (best_gap is None or gap < best_gap):
            best_offset, best_gap = cursor, gap
        cursor = max(cursor, end)
    return best_offset


def plan(records: list[UsageRecord], min_chunk: int = MIN_CHUNK_BYTES) -> Plan:
    """Greedy-by-size placement of `records` into chunks; see the module docstring."""
    placed: list[tuple[UsageRecord, int, int]] = []      # (record, chunk, offset)
    chunk_sizes: list[int] = []
    order = sorted(records, key=lambda r: (-r.nbytes, r.first_op, r.name))
    for rec in order:
        size = _align(rec.nbytes)
        spot = None
        for chunk, limit in enumerate(chunk_sizes):
            busy = [(off, off + _align(r.nbytes)) for r, c, off in placed if c == chunk and r.overlaps(rec)]
            offset = _best_fit(size, busy, limit)
            if offset is not None:
                spot = (chunk, offset)
                break
        if spot is None:
            chunk_sizes.append(max(min_chunk, _align(int(size * CHUNK_GROWTH))))
            spot = (len(chunk_sizes) - 1, 0)
        placed.append((rec, *spot))
    return Plan({r.name: Placement(c, off) for r, c, off in placed}, tuple(chunk_sizes))


def peak_live_bytes(records: list[UsageRecord]) -> int:
    """Lower bound on any plan's footprint: the most bytes alive at one op."""
    ops = {op for r in records for op in (r.first_op, r.last_op)}
    return max((sum(_align(r.nbytes) for r in records if r.first_op <= op <= r.last_op) for op in ops),
               default=0)


def single_arena_footprint(records: list[UsageRecord], order) -> int:
    """Footprint of placing `records` in `order`, each at the lowest offset free during its lifetime."""
    placed: list[tuple[UsageRecord, int]] = []
    top = 0
    for rec in order:
        size = _align(rec.nbytes)
        busy = sorted((off, off + _align(r.nbytes)) for r, off in placed if r.overlaps(rec))
        offset = 0
        for start, end in busy:
            if offset + size <= start:
                break
            offset = max(offset, end)
        placed.append((rec, offset))
        top = max(top, offset + size)
    return top


def brute_force_footprint(records: list[UsageRecord]) -> int:
    """Optimal single-arena footprint. Some order of lowest-offset placement reaches the optimum (take
    the tensors in the order of their offsets in an optimal layout), so trying every order is exact.
    Factorial time: for tests on a handful of tensors only."""
    return min(single_arena_footprint(records, order) for order in permutations(records))
