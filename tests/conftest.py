"""Shared fixtures: one persistent pool of CPU ranks per world size (see multiproc.py)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from multiproc import RankFailure, RankPool  # noqa: E402

_pools: dict[tuple, RankPool] = {}


#: Rank processes on the GPU that one pytest process keeps alive at once (default 8). Every GPU
#: rank that ever made a low-latency or internode Buffer keeps its NVSHMEM heap (about 3.5 GiB at
#: a DeepSeek-V3 decode shape, measured on one H100) until it exits: the GPU suite's shards
#: with pools of 1, 2, 3, 4 and 8 ranks each ran an 80 GB card out of memory (2026-12-07).
#: Before a new GPU pool starts, the least recently used ones close until it fits.
MAX_GPU_PROCS_ENV = "EP_COMM_TEST_MAX_GPU_PROCS"


_config = None  # pytest's config (pytest_configure), for _say_pool's uncaptured writes


def pytest_configure(config):
    global _config
    _config = config


def _say_pool(what: str, t0: float) -> None:
    """With PRINT_DURATIONS_ENV, a line per pool started or closed and its seconds, written
    past pytest's capture at once: a test that a step's limit cut short then shows whether its
    time went to rank processes coming and going (a pool's start-up, a closed rank's exit) or
    to the task itself."""
    if os.environ.get(PRINT_DURATIONS_ENV) != "1":
        return
    capman = _config.pluginmanager.getplugin("capturemanager") if _config else None
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        sys.stderr.write(f"[pool] {what} in {time.monotonic() - t0:.1f} s\n")
        sys.stderr.flush()


def _make_room(world_size: int) -> None:
    """Close the least recently used GPU pools until ``world_size`` more GPU ranks fit."""
    cap = int(os.environ.get(MAX_GPU_PROCS_ENV, "8") or 8)
    gpu_keys = [k for k in _pools if k[1]]  # dict order = least recently used first
    live = sum(k[0] for k in gpu_keys)
    for key in gpu_keys:
        if live + world_size <= cap:
            break
        t0 = time.monotonic()
        _pools.pop(key).close()
        _say_pool(f"closed the {key[0]}-rank GPU pool", t0)
        live -= key[0]


class PoolRunner:
    """Runs tasks on a shared pool; replaces the pool after a failure (its group may be broken)."""

    def __init__(self, world_size: int, use_gpu: bool = False):
        self.world_size, self.use_gpu = world_size, use_gpu

    def run(self, fn, *args):
        key = (self.world_size, self.use_gpu)
        if key in _pools:
            _pools[key] = _pools.pop(key)  # most recently used last
        else:
            if self.use_gpu:
                _make_room(self.world_size)
            t0 = time.monotonic()
            _pools[key] = RankPool(self.world_size, use_gpu=self.use_gpu)
            _say_pool(f"started a {self.world_size}-rank {'GPU' if self.use_gpu else 'CPU'} "
                      f"pool", t0)
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
#: step cut by its timeout still says where the time went (``--durations`` prints only at the end),
#: and a failure's message at once (pytest prints it only at the end, which a killed step never
#: reaches).
PRINT_DURATIONS_ENV = "EP_COMM_TEST_PRINT_DURATIONS"
#: A file to append ``{"test": nodeid, "seconds": s, "outcome": ...}`` lines to (the suite
#: collects them into tests/gpu_test_seconds.json, which the shards below are balanced on).
DURATIONS_OUT_ENV = "EP_COMM_TEST_DURATIONS_OUT"
#: ``i/n``: run only shard i (0-based) of n of the selected tests (bench/gpu_suite.sh runs the GPU
#: tests as n concurrent shards). Tests are dealt longest first to the shard with the least time
#: so far, by the seconds recorded in SECONDS_FILE (a test not recorded counts DEFAULT_SECONDS);
#: every shard computes the same deal, so the shards are disjoint and cover every test.
SHARD_ENV = "EP_COMM_TEST_SHARD"
SECONDS_FILE = os.path.join(os.path.dirname(__file__), "gpu_test_seconds.json")
DEFAULT_SECONDS = 5.0
FAILURE_LINES = 40


_T0 = time.monotonic()


def pytest_runtest_logstart(nodeid, location):
    """With PRINT_DURATIONS_ENV, name each test as it starts (seconds since the session began):
    a step killed by its timeout then says which test was running, and since when."""
    if os.environ.get(PRINT_DURATIONS_ENV) == "1":
        sys.stderr.write(f"\n[start {time.monotonic() - _T0:6.0f}s] {nodeid}\n")
        sys.stderr.flush()


def pytest_runtest_teardown(item):
    """A GPU test that ran in this pytest process leaves no cached blocks: the GPU suite runs
    four shards at once on one GPU, and each shard's caching allocator kept 10-12 GiB of the
    GEMM tests' memory after them, running an 80 GB card out of memory beside the rank
    processes (2026-12-07, run 7)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def pytest_runtest_logreport(report):
    verbose = os.environ.get(PRINT_DURATIONS_ENV) == "1"
    if verbose and report.failed and report.when != "call":
        sys.stderr.write(f"\n[{report.when} failed] {report.nodeid}\n")
    if report.when != "call" and not report.failed:
        return
    if verbose and report.when == "call":
        sys.stderr.write(f"\n[{report.duration:7.1f}s {report.outcome}] {report.nodeid}\n")
    if verbose and report.failed:
        lines = report.longreprtext.splitlines()
        sys.stderr.write("    " + "\n    ".join(lines[-FAILURE_LINES:]) + "\n")
    sys.stderr.flush()
    out = os.environ.get(DURATIONS_OUT_ENV)
    if out and report.when == "call" and not report.skipped:
        with open(out, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "seconds": round(report.duration, 2),
                                "outcome": report.outcome}) + "\n")


def shard_of(nodeids: list[str], shards: int, seconds: dict[str, float]) -> dict[str, int]:
    """Longest-processing-time-first deal of ``nodeids`` into ``shards`` shards: nodeid -> shard."""
    order = sorted(nodeids, key=lambda n: (-seconds.get(n, DEFAULT_SECONDS), n))
    load = [0.0] * shards
    deal = {}
    for n in order:
        i = min(range(shards), key=lambda j: (load[j], j))
        deal[n] = i
        load[i] += seconds.get(n, DEFAULT_SECONDS)
    return deal


def by_pool_size(worlds: list) -> list[int]:
    """Positions of a shard's tests in the order it runs them: by the size of the rank pool each
    needs (its ``world`` parameter; tests without one first), otherwise as collected. A shard
    keeps at most MAX_GPU_PROCS_ENV GPU ranks alive, so tests of mixed sizes closed and
    restarted pools (a GPU pool's start-up: NVSHMEM and CUDA set-up, seconds each beside the
    other jobs); by size, each pool starts once. The 2026-12-08 deal started 6-11 pools per
    shard in collection order, 4-5 by size (a cap of 6 ranks)."""
    def size(w):
        return w if isinstance(w, int) and not isinstance(w, bool) else 0
    return sorted(range(len(worlds)), key=lambda i: size(worlds[i]))


def _world_of(item):
    spec = getattr(item, "callspec", None)
    return spec.params.get("world") if spec is not None else None


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: every shard deals the same list
def pytest_collection_modifyitems(config, items):
    spec = os.environ.get(SHARD_ENV)
    if not spec:
        return
    try:
        index, shards = (int(v) for v in spec.split("/"))
        assert 0 <= index < shards
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"{SHARD_ENV}={spec!r}: want i/n with 0 <= i < n") from None
    seconds = {}
    if os.path.exists(SECONDS_FILE):
        with open(SECONDS_FILE) as f:
            seconds = json.load(f)["seconds"]
    deal = shard_of([it.nodeid for it in items], shards, seconds)
    keep = [it for it in items if deal[it.nodeid] == index]
    config.hook.pytest_deselected(items=[it for it in items if deal[it.nodeid] != index])
    items[:] = [keep[i] for i in by_pool_size([_world_of(it) for it in keep])]
