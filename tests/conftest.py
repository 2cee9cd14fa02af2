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


#: Ranks allowed per GPU (default 1). With 2 on a 1-GPU machine the 2-rank GPU tests run as two
#: processes sharing the GPU (gloo between them, kernels time-sliced): a correctness check with a
#: real peer where no 2-GPU machine is at hand; figures from such runs mean nothing.
RANKS_PER_GPU_ENV = "EP_COMM_TEST_RANKS_PER_GPU"


def ranks_per_gpu() -> int:
    return int(os.environ.get(RANKS_PER_GPU_ENV, "1") or 1)


@pytest.fixture(scope="session")
def gpu_ranks():
    """``gpu_ranks(n).run(task, *args)``: n ranks on the GPUs (NCCL, one GPU each; or gloo with
    several ranks per GPU under EP_COMM_TEST_RANKS_PER_GPU); skips if too few GPUs."""
    def make(n):
        have, share = gpu_count(), ranks_per_gpu()
        if have == 0 or have * share < n:
            pytest.skip(f"needs {n} GPUs, this machine has {have} "
                        f"({RANKS_PER_GPU_ENV}={share} rank(s) per GPU)")
        return PoolRunner(n, use_gpu=True)
    return make


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
    _pools.clear()


#: ``1``: print each test's duration as it finishes (``bench/gpu_suite.sh`` sets it), so that a
#: step cut by its timeout still says where the time went (``--durations`` prints only at the end).
PRINT_DURATIONS_ENV = "EP_COMM_TEST_PRINT_DURATIONS"


def pytest_runtest_logreport(report):
    if report.when == "call" and os.environ.get(PRINT_DURATIONS_ENV) == "1":
        sys.stderr.write(f"\n[{report.duration:7.1f}s {report.outcome}] {report.nodeid}\n")
        sys.stderr.flush()
