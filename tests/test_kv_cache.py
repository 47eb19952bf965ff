"""Paged KV block manager: invariants under thousands of random events, prefix sharing rules."""
from __future__ import annotations

import random

import pytest

from turboserve.kv_cache import BlockManager, CacheFull


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_join_grow_finish_abort_preempt_never_leaks_or_double_owns(seed, prefix_caching):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=48, block_size=4, prefix_caching=prefix_caching)
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]     # shared prompt starts
    live: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(3000):
        event = rng.random()
        if event < 0.35:                                   # join
            tokens = rng.choice(prefixes)[:rng.randrange(0, 13)] + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            try:
                cached = bm.allocate_prompt(next_id, tokens)
            except CacheFull:
                assert next_id not in bm.tables            # all or nothing
                continue
            assert cached % bm.block_size == 0 and cached < len(tokens)
            bm.register_full_blocks(next_id, tokens)
            live[next_id] = tokens
            next_id += 1
        elif event < 0.75 and live:                        # decode: grow by one token
            rid = rng.choice(list(live))
            tokens = live[rid] + [rng.randrange(50)]
            try:
                bm.grow(rid, len(tokens))
            except CacheFull:                              # preempt the newest and drop it
                victim = max(live)
                bm.free(victim)
                del live[victim]
                continue
            live[rid] = tokens
            bm.register_full_blocks(rid, tokens)
        elif live:                                         # finish or abort
            rid = rng.choice(list(live))
            bm.free(rid)
            del live[rid]
        if rng.random() < 0.05:
            bm.check()
            for rid, tokens in live.items():
                assert len(bm.tables[rid]) == bm.blocks_needed(len(tokens))
    for rid in list(live):
        bm.free(rid)
    bm.check()
    assert bm.free_blocks == bm.num_blocks and bm.used_blocks == 0


def test_prefix_blocks_are_shared_and_partial_blocks_are_not():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))                               # 2 full blocks + 2 tokens
    assert bm.allocate_prompt("a", prompt) == 0
    bm.register_full_blocks("a", prompt)
    assert bm.allocate_prompt("b", prompt) == 8            # both full blocks reused
    assert bm.tables["b"][:2] == bm.tables["a"][:2] and bm.tables["b"][2] != bm.tables["a"][2]
    exact = list(range(8))                                 # a prompt of exactly two blocks
    assert bm.allocate_prompt("c", exact) == 4             # the last token is always computed
    bm.check()
    for r in "abc":
        bm.free(r)
    bm.check()
    assert bm.allocate_prompt("d", prompt) == 8            # freed but still cached: reused
    bm.free("d")
    big = BlockManager(num_blocks=3, block_size=4)
    big.allocate_prompt("x", list(range(8)))
    big.register_full_blocks("x", list(range(8)))
    big.free("x")
    big.allocate_prompt("y", list(range(100, 112)))        # needs all 3 blocks: evicts the cached ones
    big.check()


def test_a_hash_collision_is_a_miss_not_another_prompts_blocks():
    """hash(-1) == hash(-2) in CPython: two different prompts whose block hashes collide. The second
    must not take the first one's K/V (each hit checks the block's tokens and its predecessor)."""
    assert hash((0, (-1,) * 4)) == hash((0, (-2,) * 4))
    bm = BlockManager(num_blocks=8, block_size=4)
    first = [-1] * 4 + [7]
    assert bm.allocate_prompt("a", first) == 0
    bm.register_full_blocks("a", first)
    assert bm.allocate_prompt("b", [-2] * 4 + [7]) == 0            # collision: computed anew
    assert bm.allocate_prompt("c", list(first)) == 4                # the same tokens: shared
    assert bm.tables["c"][0] == bm.tables["a"][0] != bm.tables["b"][0]
    bm.check()
