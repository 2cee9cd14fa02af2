"""conftest.shard_of: how bench/gpu_suite.sh deals the GPU tests to its concurrent shards."""
from __future__ import annotations

import random

from conftest import DEFAULT_SECONDS, shard_of


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
