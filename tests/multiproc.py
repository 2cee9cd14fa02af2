"""Run a function on N ranks (processes) and report each rank's failure with its rank number.

``RankPool(n)`` starts n processes once, joined in a gloo (CPU) or NCCL (one GPU each) process
group (gloo with the Buffers on GPUs when there are more ranks than GPUs), and runs tasks on all of them: ``pool.run(fn, *args)`` calls ``fn(ctx, *args)`` on every
rank, where ``ctx`` has ``rank``, ``world_size``, ``group`` and ``device``, and returns the list
of results by rank. Starting processes costs seconds (importing torch), so tests share a pool
per world size; a test that breaks its group (a timeout test) uses ``run_ranks`` for a fresh one.

Task functions must be importable module-level functions (they are pickled by name).
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import traceback

#: Seconds a pool waits for its ranks' answers before it names a hang (RankFailure) and is
#: replaced. 300 by default: a transformers test's first call compiles Triton kernels in every
#: rank. bench/gpu_suite.sh sets EP_COMM_TEST_HANG_S lower for its shards, so that one stuck
#: test fails and the shard's other tests still run within the step's limit.
DEFAULT_TIMEOUT_S = float(os.environ.get("EP_COMM_TEST_HANG_S", "300"))
#: Lines of each rank's main-thread stack that a hang report keeps (innermost first).
STACK_LINES = 40


@dataclasses.dataclass
class RankContext:
    rank: int
    world_size: int
    group: object
    device: object


def _stack_file(store: str, rank: int) -> str:
    return f"{store}.stacks.{rank}"


def _worker(rank, world_size, store, use_gpu, env, tasks, results):
    import faulthandler
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    init = f"file://{store}"
    # On a hang the parent sends SIGUSR1 before it kills the ranks: every thread's stack goes to
    # a file that the RankFailure then quotes, so a hang says where each rank was waiting.
    stacks = open(_stack_file(store, rank), "w")  # noqa: SIM115 - open for the process's life
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        if use_gpu:
            torch.cuda.set_device(rank % torch.cuda.device_count())
            dev = torch.device("cuda", torch.cuda.current_device())
            if world_size > torch.cuda.device_count():
                # Ranks share GPUs: NCCL refuses that, so gloo carries the collectives and
                # ep_comm puts the Buffers on the GPUs (see ep_comm.runtime.comm.GLOO_DEVICE_ENV).
                os.environ["EP_COMM_GLOO_DEVICE"] = "cuda"
                dist.init_process_group("gloo", init_method=init, rank=rank,
                                        world_size=world_size)
            else:
                dist.init_process_group("nccl", init_method=init, rank=rank,
                                        world_size=world_size, device_id=dev)
        else:
            dev = torch.device("cpu")
            dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
        ctx = RankContext(rank, world_size, dist.group.WORLD, dev)
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank number
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(ctx, *args)))
        except BaseException:  # noqa: BLE001 - reported to the parent with the rank number
            results.put((rank, False, traceback.format_exc()))
        if use_gpu:
            # An idle rank of a persistent pool keeps no cached blocks: the GPU suite runs many
            # pools at once on one GPU, and their caching allocators' leftovers ran it out of
            # memory (2026-12-07).
            torch.cuda.empty_cache()
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        print(f"rank {rank}: destroy_process_group failed: {e}")


#: Seconds the ranks' kernels wait before they report a timeout (default 60).
KERNEL_TIMEOUT_ENV = "EP_COMM_TEST_KERNEL_TIMEOUT_S"


class RankFailure(AssertionError):
    pass


class RankPool:
    """n persistent rank processes; see module docstring."""

    def __init__(self, world_size: int, use_gpu: bool = False, env: dict | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S):
        self.world_size, self.timeout = world_size, timeout
        # The ranks' kernel timeout: 60 s, or EP_COMM_TEST_KERNEL_TIMEOUT_S (a diagnosis run
        # wants a stalled kernel's report, phase, peer and counts, before the shard's limit).
        env = {"EP_COMM_TIMEOUT_S": os.environ.get(KERNEL_TIMEOUT_ENV, "60"), **(env or {})}
        ctx = mp.get_context("spawn")
        # The ranks meet in a file store, not on a TCP port: a port picked free can be taken by
        # another pytest process before rank 0 listens on it (the GPU suite runs several at
        # once; seen as EADDRINUSE), and ranks could even join another pool's store.
        self._store_dir = tempfile.mkdtemp(prefix="ep_comm_pool_")
        self._store = store = os.path.join(self._store_dir, "store")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, store, use_gpu, env, self._tasks[r],
                                         self._results))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self._collect("start-up")

    def _collect(self, what: str) -> list:
        import queue
        out, errors = [None] * self.world_size, []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=self.timeout)
            except queue.Empty:
                stacks = self._stacks()
                self.close(force=True)
                raise RankFailure(f"{what}: no answer from some ranks within {self.timeout} s "
                                  f"(a hang); got {sum(o is not None for o in out)} of "
                                  f"{self.world_size}{stacks}") from None
            if ok:
                out[rank] = value
            else:
                errors.append((rank, value))
        if errors:
            msg = "\n".join(f"--- rank {r} failed:\n{tb}" for r, tb in sorted(errors))
            raise RankFailure(f"{what}: {len(errors)} of {self.world_size} ranks failed\n{msg}")
        return out

    def _stacks(self) -> str:
        """Each live rank's Python stacks (faulthandler, SIGUSR1), innermost lines, as text."""
        alive = [(r, p) for r, p in enumerate(self._procs) if p.is_alive()]
        for _, p in alive:
            os.kill(p.pid, signal.SIGUSR1)
        time.sleep(1.0)  # the handlers write at once; a rank stuck in C code writes on return
        parts = []
        for r, _ in alive:
            try:
                with open(_stack_file(self._store, r)) as f:
                    lines = f.read().splitlines()
            except OSError as e:
                lines = [f"(no stacks: {e})"]
            # faulthandler writes the other threads first, then "Current thread ..." (the one
            # the task runs on), innermost frame first
            main = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), 0)
            parts.append(f"\n--- rank {r}, where it waits (innermost first):\n"
                         + "\n".join(lines[main:main + STACK_LINES]))
        return "".join(parts)

    def run(self, fn, *args) -> list:
        """``fn(ctx, *args)`` on every rank; results by rank, or RankFailure naming ranks."""
        for q in self._tasks:
            q.put((fn, args))
        return self._collect(getattr(fn, "__name__", str(fn)))

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self._store_dir, ignore_errors=True)


def run_ranks(fn, world_size: int, *args, use_gpu: bool = False, env: dict | None = None,
              timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """Run ``fn(ctx, *args)`` once on a fresh pool of ``world_size`` ranks."""
    pool = RankPool(world_size, use_gpu=use_gpu, env=env, timeout=timeout)
    try:
        return pool.run(fn, *args)
    finally:
        pool.close()
