"""conftest's helpers of bench/gpu_suite.sh: shard_of (how the GPU tests are dealt to its
concurrent shards) and the cap on GPU rank processes per pytest process."""
from __future__ import annotations

import random

from conftest import DEFAULT_SECONDS, by_pool_size, shard_of


def test_every_test_lands_in_exactly_one_shard_and_the_deal_is_repeatable():
    ids = [f"tests/test_x.py::test_{i}" for i in range(37)]
    seconds = {n: random.Random(i).uniform(0.1, 60) for i, n in enumerate(ids[:30])}
    deal = shard_of(ids, 4, seconds)
    assert set(deal) == set(ids) and set(deal.values()) <= {0, 1, 2, 3}
    shuffled = ids[:]
    random.Random(5).shuffle(shuffled)
    assert shard_of(shuffled, 4, seconds) == deal  # every shard process computes the same deal


def test_longest_first_keeps_the_shards_within_one_test_of_each_other():
    ids = [f"t{i}" for i in range(40)]
    seconds = {n: float(1 + (i * 7) % 23) for i, n in enumerate(ids)}
    deal = shard_of(ids, 4, seconds)
    load = [sum(seconds[n] for n in ids if deal[n] == s) for s in range(4)]
    assert max(load) - min(load) <= max(seconds.values())
    # a test never measured counts DEFAULT_SECONDS
    deal2 = shard_of(ids + ["new"], 4, seconds)
    load2 = [sum(seconds.get(n, DEFAULT_SECONDS) for n in deal2 if deal2[n] == s)
             for s in range(4)]
    assert sum(load2) == sum(load) + DEFAULT_SECONDS


def test_gpu_pools_beyond_the_process_cap_close_least_recently_used_first(monkeypatch):
    """A new GPU pool closes the least recently used GPU pools until its ranks fit under
    EP_COMM_TEST_MAX_GPU_PROCS; CPU pools never count."""
    import conftest
    closed = []

    class FakePool:
        def __init__(self, n, use_gpu=False):
            self.n = n

        def run(self, fn, *args):
            return fn(*args)

        def close(self, force=False):
            closed.append(self.n)

    monkeypatch.setattr(conftest, "RankPool", FakePool)
    monkeypatch.setenv(conftest.MAX_GPU_PROCS_ENV, "8")
    saved = dict(conftest._pools)
    conftest._pools.clear()
    try:
        for n in (1, 2, 3):
            conftest.PoolRunner(n, use_gpu=True).run(lambda: 0)
        conftest.PoolRunner(1, use_gpu=True).run(lambda: 0)  # 1 is now the most recent
        conftest.PoolRunner(2, use_gpu=False).run(lambda: 0)
        conftest.PoolRunner(4, use_gpu=True).run(lambda: 0)  # 6 + 4 > 8: the 2-rank pool goes
        assert closed == [2]
        conftest.PoolRunner(8, use_gpu=True).run(lambda: 0)
        assert closed == [2, 3, 1, 4]
    finally:
        conftest._pools.clear()
        conftest._pools.update(saved)


def test_a_shard_runs_its_tests_by_pool_size_and_otherwise_as_collected():
    """Tests without a world parameter first, then 1, 2, 3, 4, 8 ranks: each pool starts once
    (a bool or a tuple is not a world size)."""
    worlds = [2, 1, None, 8, 2, 4, 1, "2x1", 3, True]
    order = by_pool_size(worlds)
    assert sorted(order) == list(range(len(worlds)))
    assert [worlds[i] for i in order] == [None, "2x1", True, 1, 1, 2, 2, 3, 4, 8]
    assert order[:3] == [2, 7, 9] and order[3:5] == [1, 6]  # equal sizes keep their order
