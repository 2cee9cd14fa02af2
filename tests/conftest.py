"""Shared fixtures: one persistent pool of CPU ranks per world size (see multiproc.py)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from multiproc import RankFailure, RankPool  # noqa: E402

_pools: dict[tuple, RankPool] = {}


class PoolRunner:
    """Runs tasks on a shared pool; replaces the pool after a failure (its group may be broken)."""

    def __init__(self, world_size: int, use_gpu: bool = False):
        self.world_size, self.use_gpu = world_size, use_gpu

    def run(self, fn, *args):
        key = (self.world_size, self.use_gpu)
        if key not in _pools:
            _pools[key] = RankPool(self.world_size, use_gpu=self.use_gpu)
        try:
            return _pools[key].run(fn, *args)
        except RankFailure:
            _pools.pop(key).close(force=True)
            raise


@pytest.fixture(scope="session")
def cpu_ranks():
    """``cpu_ranks(n).run(task, *args)``: run a task on n gloo ranks."""
    return lambda n: PoolRunner(n)


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch CUDA at all means no GPU
        return 0


@pytest.fixture(scope="session")
def gpu_ranks():
    """``gpu_ranks(n).run(task, *args)``: n NCCL ranks, one GPU each; skips if too few GPUs."""
    def make(n):
        have = gpu_count()
        if have < n:
            pytest.skip(f"needs {n} GPUs, this machine has {have}")
        return PoolRunner(n, use_gpu=True)
    return make


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
    _pools.clear()
