"""Memory planner: never overlaps live tensors; footprint against the brute-force optimum."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from turboserve.planner import (ALIGN, UsageRecord, brute_force_footprint, peak_live_bytes, plan)

records_strategy = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 6), st.integers(1, 5 << 20)), min_size=1, max_size=14,
).map(lambda rows: [UsageRecord(f"t{i}", a, a + d, n) for i, (a, d, n) in enumerate(rows)])


def _ranges(p, records):
    by_name = {r.name: r for r in records}
    for name, place in p.placements.items():
        size = -(-by_name[name].nbytes // ALIGN) * ALIGN
        yield by_name[name], place.chunk, place.offset, place.offset + size


@settings(max_examples=300, deadline=None)
@given(records_strategy)
def test_no_two_live_tensors_share_bytes(records):
    p = plan(records)
    placed = list(_ranges(p, records))
    assert {r.name for r, *_ in placed} == {r.name for r in records}
    for rec, chunk, start, end in placed:
        assert start % ALIGN == 0 and end <= p.chunk_sizes[chunk]
    for i, (a, ca, sa, ea) in enumerate(placed):
        for b, cb, sb, eb in placed[i + 1:]:
            if ca == cb and a.overlaps(b):
                assert ea <= sb or eb <= sa, (a, b)


def test_footprint_near_brute_force_optimum():
    rng = random.Random(0)
    worst = 1.0
    for _ in range(60):
        n = rng.randint(2, 6)
        recs = []
        for i in range(n):
            a = rng.randint(0, 6)
            recs.append(UsageRecord(f"t{i}", a, a + rng.randint(0, 4), rng.randint(1, 64) * 4096))
        best = brute_force_footprint(recs)
        assert peak_live_bytes(recs) <= best
        p = plan(recs, min_chunk=1 << 40)          # one chunk: compare placement, not chunking
        used = max(end for *_, end in _ranges(p, recs))
        assert used >= best
        worst = max(worst, used / best)
    assert worst <= 1.5


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_encoder_layer_plan_is_optimal(model_dirs, dtype):
    """The records model.py plans for one layer (its int8 version with the shared int32
    accumulator), T = 512: placed in one chunk they take exactly the peak of live bytes, the least
    any layout can; the workspace's chunks add CHUNK_GROWTH's headroom on top."""
    from turboserve import Encoder
    recs = Encoder.load(model_dirs["bert"], dtype=dtype).model.workspace._records(512)
    p = plan(recs, min_chunk=1 << 40)
    used = max(end for *_, end in _ranges(p, recs))
    assert used == brute_force_footprint(recs) == peak_live_bytes(recs)
    assert used < sum(r.nbytes for r in recs)          # than one allocation per tensor


def test_plan_reuses_one_chunk_and_grows_by_1_2():
    p = plan([UsageRecord("a", 0, 1, 10 << 20), UsageRecord("b", 2, 3, 10 << 20)])
    assert p.chunk_sizes == (-(-int((10 << 20) * 1.2) // ALIGN) * ALIGN,)
    assert p.placements["a"].offset == p.placements["b"].offset == 0


def test_workspace_keeps_its_chunks_across_batch_sizes():
    """After the largest batch, alternating large and small batches allocate nothing (a small
    batch's plan needs fewer chunks; the others were once dropped and reallocated)."""
    import torch
    from turboserve.workspace import Workspace
    ws = Workspace([("a", 0, 1, 1024, torch.float32), ("b", 1, 2, 4096, torch.float32),
                    ("c", 2, 3, 64, torch.float32)], bucket_tokens=64)
    ws.views(4096)
    chunks = [c.data_ptr() for c in ws._chunks]
    for tokens in (100, 4096, 3, 2048, 4096):
        views = ws.views(tokens)
        assert all(v.shape[0] == tokens for v in views.values())
    assert [c.data_ptr() for c in ws._chunks] == chunks
