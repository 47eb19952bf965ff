"""Paged KV cache: fixed-size blocks, a free list, per-request block tables, prefix sharing.

The cache tensors are the backend's (ops/cpu.py PagedKV: K [blocks, kv_heads, head_dim, block_size], V
[blocks, kv_heads, block_size, head_dim]; ops/cuda.py: both [blocks, kv_heads, block_size, head_dim]);
a request owns a list of block ids (its block table) and its token i lives in block
table[i // block_size], slot i % block_size. Blocks are reference-counted so that requests with the
same prompt prefix can share its full blocks (prefix caching): a full block is registered under the
hash of every token before and in it, and a later request whose prompt starts with the same tokens
takes those blocks instead of recomputing them. A shared block is never written: only the last,
partial block of a request receives new tokens, and a partial block is never shared.

The manager only does bookkeeping; it never touches the tensors. Invariants (tests/test_kv_cache.py):
every block is either free or owned (ref count > 0), never both; the ref count of a block equals the
number of block tables holding it; freeing a request returns exactly its unshared blocks.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class CacheFull(Exception):
    """Not enough free blocks for the allocation (the scheduler preempts and retries)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))   # pop() gives low ids first
        self._ref = [0] * num_blocks
        self.tables: dict[object, list[int]] = {}
        # prefix cache: hash of the tokens up to and including a full block -> block id. A cached
        # block whose ref count drops to 0 stays cached (and counts as free, evictable, LRU order).
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        # what a cached block holds: (the block before it in its sequence, its own tokens), checked on
        # every hit, so a hash collision is a miss, never another prompt's K/V
        self._key_of: dict[int, tuple] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_grow(self, request, total_tokens: int) -> bool:
        have = len(self.tables.get(request, ()))
        return self.blocks_needed(total_tokens) - have <= self.free_blocks

    # ------------------------------------------------------------------ allocation
    def _take_block(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)        # least recently used cached block
            del self._by_hash[self._hash_of.pop(block)]
            del self._key_of[block]
        else:
            raise CacheFull
        self._ref[block] = 1
        return block

    def allocate_prompt(self, request, tokens: list[int], reuse: bool = True) -> int:
        """Give a new request the blocks for its prompt. Returns how many leading tokens are already
        in the cache (shared full blocks), which the model need not compute; at least one token is
        always left to compute, so the request has logits to sample from. reuse False: none are taken
        from the cache (a request that wants every prompt position's logits)."""
        if request in self.tables:
            raise ValueError(f"request {request!r} already has blocks")
        table: list[int] = []
        cached = 0
        if self.prefix_caching and reuse:
            h = 0
            for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % self.block_size, self.block_size):
                chunk = tuple(tokens[start:start + self.block_size])
                h = hash((h, chunk))
                block = self._by_hash.get(h)
                if block is None or self._key_of[block] != (table[-1] if table else None, chunk):
                    break
                if self._ref[block] == 0:
                    self._evictable.pop(block)
                self._ref[block] += 1
                table.append(block)
                cached += self.block_size
        self.tables[request] = table
        self.prefix_hits += len(table)
        try:
            self.grow(request, len(tokens))
        except CacheFull:
            self.free(request)
            raise
        return cached

    def grow(self, request, total_tokens: int) -> None:
        """Make the request's table hold `total_tokens` tokens (all or nothing)."""
        table = self.tables[request]
        need = self.blocks_needed(total_tokens) - len(table)
        if need > self.free_blocks:
            raise CacheFull
        for _ in range(need):
            table.append(self._take_block())

    def register_full_blocks(self, request, tokens: list[int]) -> None:
        """After the model wrote `tokens` (the request's tokens so far) into the cache, publish its
        full blocks for prefix sharing."""
        if not self.prefix_caching:
            return
        table = self.tables[request]
        h = 0
        for i in range(len(tokens) // self.block_size):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = hash((h, chunk))
            block = table[i]
            if block in self._hash_of:
                continue
            if h not in self._by_hash:
                self._by_hash[h] = block
                self._hash_of[block] = h
                self._key_of[block] = (table[i - 1] if i else None, chunk)

    def free(self, request) -> None:
        """Release a request's blocks (finished, aborted or preempted)."""
        for block in reversed(self.tables.pop(request, [])):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------------ tensors
    def block_table_tensor(self, requests) -> torch.Tensor:
        """int32 [len(requests), max blocks] (rows padded with 0; lengths bound what is read)."""
        tables = [self.tables[r] for r in requests]
        width = max((len(t) for t in tables), default=0)
        out = torch.zeros(len(tables), max(width, 1), dtype=torch.int32)
        for i, t in enumerate(tables):
            if t:
                out[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        return out

    def check(self) -> None:
        """Assert the invariants (tests)."""
        owners = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                owners[b] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            assert owners[b] == self._ref[b], f"block {b}: ref {self._ref[b]} but {owners[b]} owners"
            in_free = b in free or b in self._evictable
            assert in_free == (self._ref[b] == 0), f"block {b}: ref {self._ref[b]}, free {in_free}"
            assert not (b in free and b in self._evictable)
        for h, b in self._by_hash.items():
            assert self._hash_of[b] == h
