"""Shared helpers of the GPU case modules (tests/gpu_cases_*.py): seeds, failure collection,
bit-exact and bf16-sum comparisons, Buffers and status checks.

The case modules hold tasks that decide whether the kernels backend is right, written against
the public API only; every task takes the backend under test as a parameter. On the GPU machine
it is ``"kernels"`` and each result is compared with a second Buffer on the same process group
using ``backend="reference"`` (bit-exact where the contract fixes the bits) and with independent
expectations computed from every rank's inputs (each rank regenerates all ranks' inputs from the
case seed, so no communication is needed to know the answer). On CPU
(``test_gpu_cases_on_cpu.py``) the backend under test is ``"reference"`` on gloo: that run
proves the test logic itself (layouts, comparisons, tolerances), so that a GPU failure points at
the kernels.

Subjects: ``gpu_cases_normal`` (normal mode over NVLink, and over nodes with
EP_COMM_TEST_RANKS_PER_NODE), ``gpu_cases_low_latency``, ``gpu_cases_internode`` (what only
the internode kernels have), ``gpu_cases_contract`` (contract points: overflow, ordering, stats).

Failures are collected, not raised at once: a rank that stopped at its first wrong value would
leave the other ranks waiting in the next collective until a timeout. Every rank runs the same
sequence of calls whatever it finds, and raises one AssertionError at the end listing each
differing field with its case, seed, rank, first differing index and the size of the error.

Tolerances (one place, used by every combine check): a combine returns the bf16 rounding of a
float32 sum, so ``|got - exact| <= |exact| * 2**-8 + sum(|terms|) * 2**-20``: half a bf16 ulp
(relative 2**-8) for the final rounding, plus float32 accumulation error (at most 16 terms of
relative 2**-24 each) which, under cancellation, scales with the sum of the magnitudes."""
from __future__ import annotations

import contextlib
import os
import random

import torch

NAN = float("nan")
#: Relative bound of one bf16 rounding (half an ulp of an 8-bit significand).
BF16_ROUNDING = 2.0 ** -8
#: Relative bound of float32 accumulation of up to 16 terms, applied to the sum of |terms|.
F32_ACCUMULATION = 2.0 ** -20
SEED_ENV = "EP_COMM_TEST_SEED"


def fresh_seed() -> int:
    """A new random base seed, or ``EP_COMM_TEST_SEED`` to replay a failure."""
    value = os.environ.get(SEED_ENV)
    if value:
        return int(value)
    return random.SystemRandom().randrange(1, 2 ** 31 - 1)


#: What the GPU test files use: the backend under test (EP_COMM_TEST_BACKEND=reference checks the
#: tests' own logic on GPUs), this run's base seed, and the rank counts each test runs on.
BACKEND = os.environ.get("EP_COMM_TEST_BACKEND", "kernels")
BASE_SEED = fresh_seed()
#: Rank counts of the NVLink and low-latency GPU tests; ranks share the GPUs under
#: EP_COMM_TEST_RANKS_PER_GPU (tests/conftest.py), so 3, 4 and 8 run on one H200.
WORLDS = [1, 2, 3, 4, 8]
#: Rank counts whose tests run the full case lists; larger counts get small shapes, few cases.
FULL_WORLDS = (1, 2)


def case_seed(offset: int) -> int:
    """``BASE_SEED + offset``, printed with how to replay it (pytest shows it on failure)."""
    print(f"base seed {BASE_SEED} ({SEED_ENV}={BASE_SEED} replays), case seeds from "
          f"{BASE_SEED + offset}")
    return BASE_SEED + offset


# ================================================================== failure collection
def wait_events(events: list, wait_s: float, label: str) -> None:
    """Wait (polling, no device sync) until the last of ``events`` (CUDA events recorded in
    order on one stream) has completed; after ``wait_s`` seconds an AssertionError says how many
    did ("<label>: 3 of 4 finished on the GPU after 60 s") instead of a hang at the first read
    of a result. No events (CPU): returns at once."""
    import time
    deadline = time.monotonic() + wait_s
    while events and not events[-1].query():
        if time.monotonic() > deadline:
            done = sum(ev.query() for ev in events)
            raise AssertionError(f"{label}: {done} of {len(events)} finished on the GPU after "
                                 f"{wait_s:g} s")
        time.sleep(0.01)


class Failures:
    """Collects failed checks with their context (case, seed, rank, field, size of the error)."""

    def __init__(self, rank: int, limit: int = 40):
        self.rank, self.limit = rank, limit
        self.messages: list[str] = []
        self.where = ""

    def add(self, field: str, detail: str) -> None:
        if len(self.messages) < self.limit:
            self.messages.append(f"rank {self.rank} | {self.where} | {field}: {detail}")

    @contextlib.contextmanager
    def guard(self, field: str):
        """Record an AssertionError of a reused checker (low_latency_cases) and go on."""
        try:
            yield
        except AssertionError as e:
            self.add(field, str(e) or repr(e))

    def equal(self, field: str, got, want) -> bool:
        detail = describe_difference(got, want)
        if detail is not None:
            self.add(field, detail)
        return detail is None

    def close_sum(self, field: str, got: torch.Tensor, exact: torch.Tensor,
                  magnitude: torch.Tensor) -> bool:
        detail = describe_sum_error(got, exact, magnitude)
        if detail is not None:
            self.add(field, detail)
        return detail is None

    def check(self, field: str, ok: bool, detail: str) -> None:
        if not ok:
            self.add(field, detail)

    def outcome(self, corrupt, what: str, count: int):
        """The end of a sweep task: the failure messages when it ran as a self-test of the
        checks (``corrupt`` set), else ``count`` after raising if any check failed."""
        if corrupt is not None:
            return self.messages
        self.raise_if_any(what)
        return count

    def raise_if_any(self, what: str) -> None:
        if self.messages:
            more = "" if len(self.messages) < self.limit else f"\n(first {self.limit} shown)"
            raise AssertionError(f"{what}: {len(self.messages)} check(s) failed (replay with "
                                 f"{SEED_ENV}=<base seed>):\n" + "\n".join(self.messages) + more)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def describe_difference(got, want) -> str | None:
    """None if ``got`` and ``want`` are identical (bit for bit for floats, NaN included), else
    a line with dtype/shape, the number of differing elements, the first one and the largest
    difference."""
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        if isinstance(got, torch.Tensor) or isinstance(want, torch.Tensor):
            return f"got {type(got).__name__}, want {type(want).__name__}"
        return None if got == want else f"got {got!r}, want {want!r}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, want {want.dtype}"
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {list(got.shape)}, want {list(want.shape)}"
    g = got.detach().contiguous().cpu()
    w = want.detach().contiguous().cpu()
    if g.dtype == torch.bool:
        bad = g != w
    else:
        view = _INT_VIEW[g.element_size()]
        bad = g.view(view) != w.view(view)
    if not bool(bad.any()):
        return None
    first = bad.nonzero()[0].tolist()
    at = tuple(first)
    msg = (f"{int(bad.sum())} of {g.numel()} elements differ; first at {first}: got "
           f"{g[at].item()!r}, want {w[at].item()!r}")
    if g.is_floating_point():
        diff = (g.float() - w.float()).abs()[bad]
        msg += f"; largest |difference| {diff.nan_to_num(nan=float('inf')).max().item():.4g}"
    elif g.dtype != torch.bool:
        msg += f"; largest |difference| {(g.long() - w.long()).abs()[bad].max().item()}"
    return msg


def _partial_rounding() -> float:
    """Error bound per unit of sum(|terms|) beyond the final rounding: float32 accumulation, or,
    on the internode path with several ranks per node, one more bf16 rounding (each node's
    partial sum crosses the network as a bf16 row; |partial| <= sum(|terms|))."""
    rpn = int(os.environ.get(RANKS_PER_NODE_ENV) or 0)
    return BF16_ROUNDING + F32_ACCUMULATION if rpn > 1 else F32_ACCUMULATION


def describe_sum_error(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> str | None:
    """None if bf16 ``got`` is within one bf16 rounding of the float64 ``exact`` sum plus float32
    accumulation error (see the module docstring), else where and by how much it is not."""
    g = got.detach().cpu()
    if g.dtype != torch.bfloat16 or tuple(g.shape) != tuple(exact.shape):
        return f"got {g.dtype} {list(g.shape)}, want torch.bfloat16 {list(exact.shape)}"
    nan = torch.isnan(g)
    if bool(nan.any()):
        return (f"{int(nan.sum())} NaN elements (poisoned padding rows leaked?), first at "
                f"{nan.nonzero()[0].tolist()}")
    err = (g.double() - exact).abs()
    tol = exact.abs() * BF16_ROUNDING + magnitude * _partial_rounding()
    bad = err > tol
    if not bool(bad.any()):
        return None
    at = tuple(bad.nonzero()[0].tolist())
    worst = (err - tol)[bad].max().item()
    return (f"{int(bad.sum())} of {g.numel()} elements outside bf16 rounding; first at "
            f"{list(at)}: got {g[at].item():.6g}, exact {exact[at].item():.6g}, tolerance "
            f"{tol[at].item():.3g}; largest excess over tolerance {worst:.3g}, largest error "
            f"{err.max().item():.3g}")


# ================================================================== buffers
#: Ranks per node for the normal-mode Buffers of the tasks: set (by task_with_env) below the
#: rank count, the same tasks test the internode path (test_internode_gpu.py).
RANKS_PER_NODE_ENV = "EP_COMM_TEST_RANKS_PER_NODE"


def normal_buffer(ctx, backend: str, hidden: int, max_tokens: int = 4096, **kw):
    import ep_comm
    r = ctx.world_size
    rpn = int(os.environ.get(RANKS_PER_NODE_ENV) or r)
    cfg = ep_comm.Buffer.get_dispatch_config(r)
    nvl = cfg.get_nvl_buffer_size_hint(hidden * 2, rpn)
    rdma = (cfg.get_rdma_buffer_size_hint(hidden * 2, r, ranks_per_node=rpn,
                                          num_max_tokens_per_rank=max_tokens) if rpn < r else 0)
    return ep_comm.Buffer(ctx.group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, backend=backend,
                          explicitly_destroy=True, ranks_per_node=rpn if rpn < r else None, **kw)


def check_status(buf) -> None:
    """Raise a pending kernel error (the kernels report through a status word the host reads;
    the reference raises inside the call)."""
    for name in ("normal", "ll"):
        runtime = getattr(buf.backend, name, None)
        if runtime is not None and hasattr(runtime, "check_status"):
            runtime.check_status()


def sync(ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def is_cuda(ctx) -> bool:
    return ctx.device.type == "cuda"



def llc_dequant(recv):
    from ep_comm.core import fp8
    return fp8.dequantize(*recv)


def task_with_env(ctx, env: dict, fn, *args):
    """Run ``fn(ctx, *args)`` with ``env`` set in this rank's environment (restored after), so
    Buffers created inside see it (e.g. EP_COMM_TIMEOUT_S)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn(ctx, *args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

