"""DP batch scheduler: equals brute force on small queues, respects the token budget."""
import random

import numpy as np
import pytest

from turboserve.scheduler import CostTable, brute_force_partition, dp_partition, fifo_partition, plan_cost

SIZES = [1, 2, 4, 8, 16, 32]
LENGTHS = [8, 16, 32, 64, 128, 256, 512]


def synthetic_table(seed=0, budget=1024) -> CostTable:
    """A plausible measured table: fixed overhead + per-token + quadratic attention term + noise,
    cells over the budget left unmeasured as a real measurement would."""
    rng = np.random.default_rng(seed)
    secs = []
    for b in SIZES:
        row = []
        for n in LENGTHS:
            if b * n > budget:
                row.append(float("nan"))
                continue
            row.append(2e-3 + b * 1e-4 + b * n * 6e-5 + b * n * n * 2e-8 * rng.uniform(0.8, 1.2))
        secs.append(row)
    return CostTable(SIZES, LENGTHS, secs)


def test_table_reproduces_measured_points_and_fills_the_rest():
    t = synthetic_table()
    for i, b in enumerate(SIZES):
        for j, n in enumerate(LENGTHS):
            if not np.isnan(t.seconds[i][j]):
                assert t.cost(b, n) == pytest.approx(t.seconds[i][j])
    assert np.isfinite(t.cost(32, 512)) and t.cost(32, 512) > t.cost(32, 32)


@pytest.mark.parametrize("seed", range(25))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(5, 300) for _ in range(rng.randint(1, 10))]
    table = synthetic_table(seed)
    budget = rng.choice([300, 600, 1024])
    overhead = rng.choice([0.0, 0.002])          # with and without the per-batch serving overhead
    batches = dp_partition(lengths, table, budget, batch_overhead=overhead)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert sum(lengths[i] for i in b) <= budget or len(b) == 1
    assert plan_cost(lengths, batches, table) + overhead * len(batches) == pytest.approx(
        brute_force_partition(lengths, table, budget, overhead))


def test_budget_and_size_limits_hold_on_large_queues():
    rng = random.Random(1)
    lengths = [rng.randint(8, 512) for _ in range(400)]
    batches = dp_partition(lengths, synthetic_table(), 2048, max_batch_size=16)
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert all(sum(lengths[i] for i in b) <= 2048 and len(b) <= 16 for b in batches)


def test_overlong_request_runs_alone():
    batches = dp_partition([10, 5000, 20], synthetic_table(), 1024)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2]


def test_fifo_baseline_keeps_arrival_order_and_budget():
    lengths = [100, 900, 50, 50, 500, 600]
    batches = fifo_partition(lengths, 1000)
    assert [i for b in batches for i in b] == list(range(6))
    assert batches == [[0, 1], [2, 3, 4], [5]]
