"""Tasks that decide whether the kernels backend is right, written against the public API only.

Every task takes the backend under test as a parameter. On the GPU machine it is ``"kernels"``
and each result is compared with a second Buffer on the same process group using
``backend="reference"`` (bit-exact where the contract fixes the bits) and with independent
expectations computed here from every rank's inputs (each rank regenerates all ranks' inputs
from the case seed, so no communication is needed to know the answer). On CPU
(``test_gpu_cases_on_cpu.py``) the backend under test is ``"reference"`` on gloo: that run
proves the test logic itself (layouts, comparisons, tolerances), so that a GPU failure points at
the kernels.

Failures are collected, not raised at once: a rank that stopped at its first wrong value would
leave the other ranks waiting in the next collective until a timeout. Every rank runs the same
sequence of calls whatever it finds, and raises one AssertionError at the end listing each
differing field with its case, seed, rank, first differing index and the size of the error.

Tolerances (one place, used by every combine check): a combine returns the bf16 rounding of a
float32 sum, so ``|got - exact| <= |exact| * 2**-8 + sum(|terms|) * 2**-20``: half a bf16 ulp
(relative 2**-8) for the final rounding, plus float32 accumulation error (at most 16 terms of
relative 2**-24 each) which, under cancellation, scales with the sum of the magnitudes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import random
import time

import torch

import low_latency_cases as llc
from low_latency_cases import LLCase

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
WORLDS = [1, 2]


def case_seed(offset: int) -> int:
    """``BASE_SEED + offset``, printed with how to replay it (pytest shows it on failure)."""
    print(f"base seed {BASE_SEED} ({SEED_ENV}={BASE_SEED} replays), case seeds from "
          f"{BASE_SEED + offset}")
    return BASE_SEED + offset


# ================================================================== failure collection
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


# ================================================================== normal-mode inputs
@dataclasses.dataclass(frozen=True)
class NCase:
    """One normal-mode scenario. Tokens on rank r: ``num_tokens + r * ragged`` (see routing)."""
    seed: int = 0
    num_tokens: int = 64
    ragged: int = 7
    hidden: int = 256
    num_experts: int = 32
    num_topk: int = 4
    drop: float = 0.1             # probability of a -1 top-k entry
    routing: str = "random"       # random | to_rank0 | empty_last | one_token | all_dropped
    fp8: bool = False
    alignment: int = 1
    worst: int = 0                # num_worst_tokens; -1 = the largest possible receive count
    bias: int = 0                 # 0, 1 (a tensor) or 2 (a pair)


ROUTINGS = ("random", "to_rank0", "empty_last", "one_token", "all_dropped")


def n_tokens(case: NCase, rank: int, num_ranks: int) -> int:
    if case.routing == "empty_last" and rank == num_ranks - 1:
        return 0
    if case.routing == "one_token":
        return 1
    return case.num_tokens + rank * case.ragged


def worst_tokens(case: NCase, num_ranks: int) -> int:
    if case.worst < 0:
        return max(1, sum(n_tokens(case, r, num_ranks) for r in range(num_ranks)))
    return case.worst


def n_inputs(case: NCase, rank: int, num_ranks: int, step: int = 0):
    """(x bf16 [T, H], topk_idx int64 [T, K] distinct experts per row, topk_weights float32),
    on CPU, from the seed: every rank computes every rank's inputs."""
    g = torch.Generator().manual_seed(case.seed * 1_000_003 + step * 7919 + rank)
    t, h, e, k = n_tokens(case, rank, num_ranks), case.hidden, case.num_experts, case.num_topk
    # Rows of very different magnitudes, an all-zero row and an outlier: the fp8 scales and the
    # combine tolerance must follow each row's own size.
    x = torch.randn(t, h, generator=g) * torch.exp(torch.randn(t, 1, generator=g) * 2)
    if t > 1:
        x[1] = 0
    if t > 2:
        x[2, h // 3] = 2000.0
    x = x.to(torch.bfloat16)
    pool = e // num_ranks if case.routing == "to_rank0" else e
    kk = min(k, pool)
    idx = torch.rand(t, pool, generator=g).topk(kk, dim=1).indices.to(torch.int64)
    if kk < k:
        idx = torch.cat([idx, torch.full((t, k - kk), -1, dtype=torch.int64)], dim=1)
    drop = 1.0 if case.routing == "all_dropped" else case.drop
    idx[torch.rand(t, k, generator=g) < drop] = -1
    w = torch.rand(t, k, generator=g).float() + 0.1
    return x, idx, w


def fp8_cast(x: torch.Tensor):
    from ep_comm.core import fp8
    return fp8.per_token_cast_to_fp8(x)


def sent_f32(case: NCase, x: torch.Tensor) -> torch.Tensor:
    """float32 values a token arrives with (its fp8 cast dequantised, or x itself)."""
    if case.fp8:
        from ep_comm.core import fp8
        return fp8.dequantize(*fp8_cast(x))
    return x.float()


def expected_dispatch(case: NCase, dst: int, inputs, num_ranks: int):
    """What rank ``dst`` receives, by the contract, from every rank's inputs (CPU tensors):
    rows by source rank, then token index; local top-k ids; weights; sources; counts."""
    per = case.num_experts // num_ranks
    lo = dst * per
    parts = {k: [] for k in ("x", "idx", "w", "src_rank", "src_idx")}
    counts = torch.zeros(per, dtype=torch.int64)
    for s, (x, idx, w) in enumerate(inputs):
        mine = (idx >= lo) & (idx < lo + per)
        sel = mine.any(dim=1).nonzero().flatten()
        parts["x"].append(fp8_cast(x[sel]) if case.fp8 else x[sel])
        parts["idx"].append(torch.where(mine[sel], idx[sel] - lo, torch.full_like(idx[sel], -1)))
        parts["w"].append(w[sel])
        parts["src_rank"].append(torch.full((len(sel),), s, dtype=torch.int32))
        parts["src_idx"].append(sel.to(torch.int32))
        counts += torch.bincount((idx[sel] - lo)[mine[sel]], minlength=per)[:per]
    out = {k: torch.cat(v) if k != "x" else v for k, v in parts.items()}
    if case.fp8:
        out["x"] = (torch.cat([q for q, _ in parts["x"]]), torch.cat([s for _, s in parts["x"]]))
    else:
        out["x"] = torch.cat(parts["x"])
    out["counts"] = counts.tolist()
    out["aligned"] = [(c + case.alignment - 1) // case.alignment * case.alignment
                      for c in out["counts"]]
    return out


def expert_rows(recv_f32: torch.Tensor, rank: int) -> torch.Tensor:
    """What rank ``rank`` sends back for received float32 rows: exact float32 operations (the
    same bits on CPU and GPU) that differ per rank, so a row summed twice or from the wrong
    rank shows."""
    a = (1.0, -0.5, 2.0, 0.25, -1.0, 4.0, 0.5, -2.0)[rank % 8]
    return (recv_f32 * a + 0.125 * (rank + 1)).to(torch.bfloat16)


def expected_combine(case: NCase, me: int, inputs, num_ranks: int, bias=None):
    """float64 combine of rank ``me`` and the sum of |terms| (for the tolerance)."""
    x, idx, _ = inputs[me]
    per = case.num_experts // num_ranks
    vals = sent_f32(case, x)
    acc = torch.zeros(x.shape, dtype=torch.float64)
    mag = torch.zeros(x.shape, dtype=torch.float64)
    for d in range(num_ranks):
        holds = ((idx >= d * per) & (idx < (d + 1) * per)).any(dim=1)
        term = expert_rows(vals, d).double() * holds.unsqueeze(1)
        acc += term
        mag += term.abs()
    for b in bias or ():
        acc += b.double()
        mag += b.double().abs()
    return acc, mag


def expected_combined_weights(case: NCase, me: int, inputs, num_ranks: int):
    """float64 sum over holder ranks d of ``topk_weights * (d + 2)`` (what combine sums)."""
    _, idx, w = inputs[me]
    per = case.num_experts // num_ranks
    acc = torch.zeros(w.shape, dtype=torch.float64)
    for d in range(num_ranks):
        holds = ((idx >= d * per) & (idx < (d + 1) * per)).any(dim=1)
        acc += w.double() * (d + 2) * holds.unsqueeze(1)
    return acc


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


# ================================================================== normal-mode checks
def layout_args(layout):
    per_rank, per_node, per_expert, in_rank = layout[:4]
    return dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


HANDLE_FIELDS = ("is_token_in_rank", "num_tokens_per_rank", "rank_prefix_matrix", "send_pos",
                 "recv_src_idx", "recv_src_rank", "num_recv_tokens_per_expert",
                 "num_worst_tokens", "num_tokens_per_rdma_rank", "num_experts", "rank",
                 "num_ranks")


def compare_dispatch(fails: Failures, case: NCase, got, ref, n: int, label: str) -> None:
    """Backend under test vs reference: the fields the contract fixes, bit for bit."""
    recv, idx, w, counts, handle = got[:5]
    rrecv, ridx, rw, rcounts, rhandle = ref[:5]
    if case.fp8:
        fails.check(f"{label} recv_x", isinstance(recv, tuple), f"got {type(recv).__name__}, "
                    "want the (fp8, scales) tuple")
        if isinstance(recv, tuple):
            fails.equal(f"{label} recv_x[0] (fp8 payload) shape", recv[0].shape, rrecv[0].shape)
            fails.equal(f"{label} recv_x[0] (fp8 payload)", recv[0][:n], rrecv[0][:n])
            fails.equal(f"{label} recv_x[1] (scales)", recv[1][:n], rrecv[1][:n])
    else:
        fails.equal(f"{label} recv_x shape", tuple(recv.shape), tuple(rrecv.shape))
        fails.equal(f"{label} recv_x", recv[:n], rrecv[:n])
    # Padding rows (num_worst_tokens) are part of the contract: -1 ids and zero weights.
    fails.equal(f"{label} recv_topk_idx", idx, ridx)
    fails.equal(f"{label} recv_topk_weights", w, rw)
    fails.equal(f"{label} num_recv_tokens_per_expert_list", counts, rcounts)
    for field in HANDLE_FIELDS:
        fails.equal(f"{label} handle.{field}", getattr(handle, field), getattr(rhandle, field))
    if not case.worst:
        # With num_worst_tokens the kernels promise no host sync, so the host may not know it.
        fails.equal(f"{label} handle.num_recv_tokens", handle.num_recv_tokens, n)


def compare_with_expectation(fails: Failures, case: NCase, got, want, n: int, label: str) -> None:
    """A backend's dispatch vs the contract computed here (independent of both backends)."""
    recv, idx, w, counts, handle = got[:5]
    fails.equal(f"{label} received row count", n, len(want["src_rank"]))
    if n != len(want["src_rank"]):
        return
    if case.fp8:
        fails.equal(f"{label} recv_x[0] (fp8 payload)", recv[0][:n], want["x"][0])
        fails.equal(f"{label} recv_x[1] (scales)", recv[1][:n], want["x"][1])
    else:
        fails.equal(f"{label} recv_x", recv[:n], want["x"])
    fails.equal(f"{label} recv_topk_idx", idx[:n], want["idx"])
    fails.equal(f"{label} recv_topk_weights", w[:n], want["w"])
    fails.equal(f"{label} handle.recv_src_rank (order)", handle.recv_src_rank[:n],
                want["src_rank"])
    fails.equal(f"{label} handle.recv_src_idx (order)", handle.recv_src_idx[:n], want["src_idx"])
    fails.equal(f"{label} handle.num_recv_tokens_per_expert",
                handle.num_recv_tokens_per_expert.cpu().tolist(), want["counts"])
    if case.worst:
        fails.equal(f"{label} count list with num_worst_tokens", counts, [])
        rows = idx.shape[0]
        fails.equal(f"{label} padding recv_topk_idx", idx[n:].cpu(),
                    torch.full((rows - n, case.num_topk), -1, dtype=torch.int64))
        fails.equal(f"{label} padding recv_topk_weights", w[n:].cpu(),
                    torch.zeros(rows - n, case.num_topk))
    else:
        fails.equal(f"{label} num_recv_tokens_per_expert_list (aligned)", counts, want["aligned"])


def _corrupt(kind: str | None, result, n: int):
    """Deliberately damage a result (CPU self-test of the checks: each must be caught)."""
    if kind is None or n == 0:
        return result
    recv, idx, w, counts, handle, ev = result
    payload = recv[0] if isinstance(recv, tuple) else recv
    if kind == "recv_x" and n > 1:
        payload[[0, n - 1]] = payload[[n - 1, 0]].clone()
        payload[0].view(torch.uint8)[0] ^= 1
    elif kind == "topk_weights":
        w[n - 1, 0] = torch.nextafter(w[n - 1, 0], torch.tensor(float("inf"), device=w.device))
    elif kind == "src_idx":
        handle.recv_src_idx[n - 1] += 1
    elif kind == "counts" and counts:
        counts = [counts[0] + 1, *counts[1:]]
    return recv, idx, w, counts, handle, ev


def run_normal_case(ctx, buf, ref, case: NCase, fails: Failures, *, corrupt=None,
                    stream_mode: str = "sync") -> None:
    """Layout, dispatch, cached dispatch and combine of one case on both Buffers, checked.

    ``stream_mode``: ``"sync"`` (defaults), ``"previous_event"`` (inputs written after a delay
    on the compute stream, then previous_event + async_finish + allocate_on_comm_stream: a
    backend that ignores the event reads the poison), ``"async"`` (async_finish only; the
    default must still order after the compute stream)."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    fails.where = f"{case}"
    inputs = [n_inputs(case, s, r) for s in range(r)]
    x_cpu, idx_cpu, w_cpu = inputs[me]
    idx, w = idx_cpu.to(dev), w_cpu.to(dev)
    worst = worst_tokens(case, r) if case.worst else 0

    def late_write(cpu_tensor: torch.Tensor, poison) -> torch.Tensor:
        """A device copy of ``cpu_tensor`` whose final values land only after a delay on the
        compute stream (poison before): catches a backend that does not wait for it."""
        t = torch.full(cpu_tensor.shape, poison, dtype=cpu_tensor.dtype, device=dev)
        staged = cpu_tensor.to(dev)
        if stream_mode != "sync" and is_cuda(ctx):
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before the real values land
        t.copy_(staged)
        return t

    def stream_args():
        if stream_mode == "previous_event":
            return dict(previous_event=buf.capture(), async_finish=True,
                        allocate_on_comm_stream=True)
        if stream_mode == "async":
            return dict(async_finish=True)
        return {}

    def wait(event):
        import ep_comm
        fails.check("event type", isinstance(event, ep_comm.EventOverlap),
                    f"got {type(event).__name__}")
        if stream_mode != "sync":
            with event:  # overlapped region; on exit the current stream waits
                if is_cuda(ctx):
                    torch.cuda._sleep(1_000_000)

    # ---- layout
    idx_late = late_write(idx_cpu, -1)
    lay = buf.get_dispatch_layout(idx_late, case.num_experts, **stream_args())
    wait(lay[4])
    rlay = ref.get_dispatch_layout(idx, case.num_experts)
    for i, name in enumerate(("num_tokens_per_rank", "num_tokens_per_rdma_rank",
                              "num_tokens_per_expert", "is_token_in_rank")):
        fails.equal(f"layout {name}", lay[i], rlay[i])

    # ---- dispatch
    x_late = late_write(x_cpu, NAN)
    send = fp8_cast(x_late) if case.fp8 else x_late
    args = dict(topk_idx=idx_late, topk_weights=late_write(w_cpu, NAN),
                expert_alignment=case.alignment, num_worst_tokens=worst)
    got = buf.dispatch(send, **layout_args(lay), **args, **stream_args())
    wait(got[5])
    rsend = fp8_cast(x_cpu.to(dev)) if case.fp8 else x_cpu.to(dev)
    ref_res = ref.dispatch(rsend, **layout_args(rlay), topk_idx=idx, topk_weights=w,
                           expert_alignment=case.alignment, num_worst_tokens=worst)
    n = ref_res[4].num_recv_tokens
    got = _corrupt(corrupt, got, n)
    want = expected_dispatch(case, me, inputs, r)
    compare_dispatch(fails, case, got, ref_res, n, "dispatch")
    compare_with_expectation(fails, case, ref_res, want, n, "reference dispatch")
    handle, rhandle = got[4], ref_res[4]

    # ---- cached dispatch: new data along the same routes
    g = torch.Generator().manual_seed(case.seed * 31 + me)
    x2_cpu = (torch.randn(x_cpu.shape, generator=g) * 3).to(torch.bfloat16)
    x2 = late_write(x2_cpu, NAN)
    got2 = buf.dispatch(fp8_cast(x2) if case.fp8 else x2, handle=handle, **stream_args())
    wait(got2[5])
    x2r = x2_cpu.to(dev)
    ref2 = ref.dispatch(fp8_cast(x2r) if case.fp8 else x2r, handle=rhandle)
    fails.check("cached dispatch returns", got2[1] is None and got2[2] is None,
                "recv_topk_idx / recv_topk_weights must be None with handle=")
    if case.fp8:
        fails.equal("cached dispatch recv_x[0] (fp8 payload)", got2[0][0][:n], ref2[0][0][:n])
        fails.equal("cached dispatch recv_x[1] (scales)", got2[0][1][:n], ref2[0][1][:n])
    else:
        fails.equal("cached dispatch recv_x", got2[0][:n], ref2[0][:n])
    fails.equal("cached dispatch count list", got2[3], ref2[3])

    # ---- combine: expert rows from what this backend received; padding rows poisoned
    bias_cpu = None
    if case.bias:
        gb = torch.Generator().manual_seed(case.seed * 17 + me)
        bias_cpu = tuple(torch.randn(x_cpu.shape, generator=gb).to(torch.bfloat16)
                         for _ in range(case.bias))

    def combine_on(b, res, late: bool):
        recv = res[0]
        vals = (llc_dequant(recv) if case.fp8 else recv.float())
        y = torch.full((res[4].num_recv_rows, case.hidden), NAN, dtype=torch.bfloat16, device=dev)
        y[:n] = expert_rows(vals[:n], me)
        yw = torch.full((res[4].num_recv_rows, case.num_topk), NAN, device=dev)
        yw[:n] = res[2][:n] * (me + 2)
        if late and stream_mode != "sync":
            y = late_write(y.cpu(), NAN)
        bias = None
        if bias_cpu is not None:
            bias = tuple(bb.to(dev) for bb in bias_cpu)
            bias = bias[0] if len(bias) == 1 else bias
        extra = stream_args() if late else {}
        out = b.combine(y, res[4], topk_weights=yw, bias=bias, **extra)
        if late:
            wait(out[2])
        return out

    combined, combined_w, _ = combine_on(buf, got, True)
    if corrupt == "combine" and combined.numel():
        combined = combined.clone()
        combined.view(-1)[-1] = combined.view(-1)[-1].float() * (1 + 2 ** -5) + 2 ** -10
    rcombined, rcombined_w, _ = combine_on(ref, ref_res, False)
    exact, mag = expected_combine(case, me, inputs, r, bias_cpu)
    fails.close_sum("combined_x", combined, exact, mag)
    fails.close_sum("reference combined_x", rcombined, exact, mag)
    want_w = expected_combined_weights(case, me, inputs, r)
    for label, cw in (("combined_topk_weights", combined_w),
                      ("reference combined_topk_weights", rcombined_w)):
        err = (cw.detach().cpu().double() - want_w).abs()
        tol = want_w.abs() * 2.0 ** -21
        fails.check(label, bool((err <= tol).all()),
                    f"off by up to {err.max().item() if err.numel() else 0:.3g} (tolerance "
                    f"relative 2**-21)")


def llc_dequant(recv):
    from ep_comm.core import fp8
    return fp8.dequantize(*recv)


# ================================================================== normal-mode tasks
def task_normal_sweep(ctx, backend: str, cases: list, corrupt: str | None = None,
                      stream_mode: str = "sync", num_sms: int | None = None):
    """Many cases on one Buffer of ``backend`` (buffers reused across changing routing, sizes
    and dtypes), each compared with a reference Buffer and with the expectation. With
    ``corrupt``, returns the failure messages instead of raising (self-test of the checks).
    ``num_sms``: run under ``Buffer.set_num_sms(num_sms)`` (restored after)."""
    import ep_comm
    old_sms = ep_comm.Buffer.num_sms
    if num_sms is not None:
        ep_comm.Buffer.set_num_sms(num_sms)
    hidden = max(c.hidden for c in cases)
    fails = Failures(ctx.rank)
    try:
        buf = normal_buffer(ctx, backend, hidden)
        ref = normal_buffer(ctx, "reference", hidden)
    except BaseException:
        ep_comm.Buffer.num_sms = old_sms
        raise
    try:
        for case in cases:
            run_normal_case(ctx, buf, ref, case, fails, corrupt=corrupt, stream_mode=stream_mode)
            sync(ctx)
            check_status(buf)
    finally:
        ep_comm.Buffer.num_sms = old_sms
        buf.destroy()
        ref.destroy()
    return fails.outcome(corrupt, f"normal-mode {backend} vs reference ({stream_mode})", len(cases))


def task_normal_graph(ctx, backend: str, case: NCase, replays: int = 4, capture: bool = True):
    """get_dispatch_layout + dispatch (num_worst_tokens) + expert rows + combine captured in one
    CUDA graph, replayed with new data and new routing copied into the captured inputs; every
    replay compared with an eager reference run on the same inputs. ``capture=False`` runs the
    same steps eagerly on the static inputs (the CPU self-test of this task's checks)."""
    if capture and not is_cuda(ctx):
        return "skipped: CUDA graphs need a GPU"
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    fixed = dataclasses.replace(case, ragged=0, routing="random", worst=-1)
    worst = worst_tokens(fixed, r)
    buf = normal_buffer(ctx, backend, fixed.hidden)
    ref = normal_buffer(ctx, "reference", fixed.hidden)
    fails = Failures(ctx.rank)
    try:
        x0, idx0, w0 = n_inputs(fixed, me, r, step=0)
        x_s, idx_s, w_s = x0.to(dev), idx0.to(dev), w0.to(dev)

        def step():
            lay = buf.get_dispatch_layout(idx_s, fixed.num_experts)
            send = fp8_cast(x_s) if fixed.fp8 else x_s
            res = buf.dispatch(send, **layout_args(lay), topk_idx=idx_s, topk_weights=w_s,
                               num_worst_tokens=worst)
            recv = res[0]
            vals = llc_dequant(recv) if fixed.fp8 else recv.float()
            # Every row, padding too (a graph cannot read the count); combine must skip padding.
            y = expert_rows(vals, me)
            yw = res[2] * (me + 2)
            combined, combined_w, _ = buf.combine(y, res[4], topk_weights=yw)
            return res, combined, combined_w

        res, combined, combined_w = step()  # warm-up outside the capture: compiles kernels
        sync(ctx)
        graph = None
        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                res, combined, combined_w = step()
        for rep in range(1, replays + 1):
            fails.where = f"{fixed} graph replay {rep}"
            inputs = [n_inputs(fixed, s, r, step=rep) for s in range(r)]
            x, idx, w = inputs[me]
            x_s.copy_(x)
            idx_s.copy_(idx)
            w_s.copy_(w)
            if graph is not None:
                graph.replay()
            else:
                res, combined, combined_w = step()
            sync(ctx)
            check_status(buf)
            xd = x.to(dev)
            rlay = ref.get_dispatch_layout(idx.to(dev), fixed.num_experts)
            ref_res = ref.dispatch(fp8_cast(xd) if fixed.fp8 else xd, **layout_args(rlay),
                                   topk_idx=idx.to(dev), topk_weights=w.to(dev),
                                   num_worst_tokens=worst)
            n = ref_res[4].num_recv_tokens
            compare_dispatch(fails, fixed, res, ref_res, n, "graph dispatch")
            want = expected_dispatch(fixed, me, inputs, r)
            compare_with_expectation(fails, fixed, ref_res, want, n, "reference dispatch")
            exact, mag = expected_combine(fixed, me, inputs, r)
            fails.close_sum("graph combined_x", combined, exact, mag)
            want_w = expected_combined_weights(fixed, me, inputs, r)
            err = (combined_w.cpu().double() - want_w).abs()
            fails.check("graph combined_topk_weights", bool((err <= want_w.abs() * 2.0 ** -21).all()),
                        f"off by up to {err.max().item() if err.numel() else 0:.3g}")
    finally:
        buf.destroy()
        ref.destroy()
    fails.raise_if_any(f"normal-mode CUDA graph ({backend})")
    return replays


def task_normal_backward(ctx, backend: str, case: NCase):
    """One training step through ep_comm.autograd on both Buffers: y = combine(rows * (d + 1))
    of dispatch(x); loss = sum(y * gy) + sum(recv_w * (d + 1)). The closed form:
    grad_x[t] = sum over holders d of bf16(bf16(gy[t]) * (d + 1)) (combine of the cached
    dispatch of bf16(gy)), within bf16 rounding; grad_w[t, k] = sum over holders of (d + 1)."""
    from ep_comm import autograd
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    inputs = [n_inputs(case, s, r) for s in range(r)]
    x_cpu, idx_cpu, w_cpu = inputs[me]
    per = case.num_experts // r
    holders = [((idx_cpu >= d * per) & (idx_cpu < (d + 1) * per)).any(dim=1) for d in range(r)]
    g = torch.Generator().manual_seed(case.seed + 1000 + me)
    gy = torch.randn(x_cpu.shape, generator=g)
    gy_b = gy.to(torch.bfloat16).float()
    exact_gx = torch.zeros(x_cpu.shape, dtype=torch.float64)
    mag_gx = torch.zeros(x_cpu.shape, dtype=torch.float64)
    exact_y = torch.zeros(x_cpu.shape, dtype=torch.float64)
    mag_y = torch.zeros(x_cpu.shape, dtype=torch.float64)
    exact_gw = torch.zeros(w_cpu.shape, dtype=torch.float64)
    for d in range(r):
        h = holders[d].unsqueeze(1)
        term = (gy_b * (d + 1)).to(torch.bfloat16).double() * h
        exact_gx += term
        mag_gx += term.abs()
        ty = (x_cpu.float() * (d + 1)).to(torch.bfloat16).double() * h
        exact_y += ty
        mag_y += ty.abs()
        exact_gw += float(d + 1) * h
    fails = Failures(ctx.rank)
    fails.where = f"{case} backward"
    bufs = [("backend", normal_buffer(ctx, backend, case.hidden)),
            ("reference", normal_buffer(ctx, "reference", case.hidden))]
    try:
        for label, b in bufs:
            # clone(): on CPU .to(dev) is the same tensor, and its .grad would accumulate.
            x = x_cpu.to(dev).clone().requires_grad_(True)
            w = w_cpu.to(dev).clone().requires_grad_(True)
            recv_x, recv_idx, recv_w, _, handle = autograd.dispatch(b, x, idx_cpu.to(dev), w,
                                                                    case.num_experts)
            y = autograd.combine(b, (recv_x.float() * (me + 1)).to(torch.bfloat16), handle)
            # This rank's rows of y hold the sum over holders d of bf16(x * (d + 1)).
            loss = (y.float() * gy.to(dev)).sum() + (recv_w * (me + 1)).sum()
            loss.backward()
            sync(ctx)
            fails.close_sum(f"{label} forward combined y", y.detach(), exact_y, mag_y)
            fails.close_sum(f"{label} grad x", x.grad.to(torch.bfloat16), exact_gx, mag_gx)
            err = (w.grad.cpu().double() - exact_gw).abs()
            fails.check(f"{label} grad topk_weights", bool((err <= exact_gw * 2.0 ** -21).all()),
                        f"off by up to {err.max().item() if err.numel() else 0:.3g}")
    finally:
        for _, b in bufs:
            b.destroy()
    fails.raise_if_any(f"backward through ep_comm.autograd ({backend})")


def task_normal_bad_inputs(ctx, backend: str, hidden: int = 512):
    """Bad arguments raise InputError before any kernel or communication starts. Only rank 0
    makes the bad calls while the other ranks wait at nothing: a call that started talking to
    its peers would hang until the timeout instead of failing fast. Afterwards one good case
    must still match the reference (no half-done state was left behind)."""
    import ep_comm
    from ep_comm.errors import BufferTooSmallError, InputError
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    case = NCase(seed=5, hidden=hidden, num_tokens=16, ragged=3)
    buf = normal_buffer(ctx, backend, hidden)
    try:
        small = ep_comm.Buffer(ctx.group, num_nvl_bytes=4096, backend=backend,
                               explicitly_destroy=True)
    except InputError as e:
        # Refusing a buffer too small for any call already at construction is also "before
        # any kernel"; the dispatch-time check is then not reachable.
        print(f"rank {ctx.rank}: a 4096-byte Buffer is refused at construction: {e}")
        small = None
    ref = normal_buffer(ctx, "reference", hidden)
    fails = Failures(me)
    fails.where = "bad inputs"
    try:
        x, idx, w = (t.to(dev) for t in n_inputs(case, me, r))
        lay = buf.get_dispatch_layout(idx, case.num_experts)
        good = dict(**layout_args(lay), topk_idx=idx, topk_weights=w)
        t = x.shape[0]
        bad_calls = {
            "x float32": lambda: buf.dispatch(x.float(), **good),
            "x 1-D": lambda: buf.dispatch(x.view(-1), **good),
            "x not contiguous": lambda: buf.dispatch(x.t(), **good),
            "hidden not a multiple of 8": lambda: buf.dispatch(x[:, :hidden - 4].contiguous(), **good),
            "fp8 scales shape": lambda: buf.dispatch(
                (x.to(torch.float8_e4m3fn), torch.ones(t, 3, device=dev)), **good),
            "topk_idx int32": lambda: buf.get_dispatch_layout(idx.int(), case.num_experts),
            "experts not divisible": lambda: buf.get_dispatch_layout(idx, r * 4 + 1 if r > 1 else 0),
            "topk rows": lambda: buf.dispatch(x[:-1].contiguous(), **good),
            "weights shape": lambda: buf.dispatch(x, **{**good, "topk_weights": w[:, :1].contiguous()}),
            "alignment 0": lambda: buf.dispatch(x, **good, expert_alignment=0),
            "allocate_on_comm_stream alone": lambda: buf.dispatch(x, **good,
                                                                  allocate_on_comm_stream=True),
            "num_worst_tokens < 0": lambda: buf.dispatch(x, **good, num_worst_tokens=-1),
            "combine handle type": lambda: buf.combine(torch.zeros(4, hidden, dtype=torch.bfloat16,
                                                                   device=dev), handle=None),
        }
        if is_cuda(ctx):
            bad_calls["x on the CPU"] = lambda: buf.dispatch(x.cpu(), **good)
        if small is not None:
            bad_calls["buffer too small"] = lambda: small.dispatch(x, **good)
        if me == 0:
            for name, call in bad_calls.items():
                t0 = time.monotonic()
                try:
                    call()
                    sync(ctx)
                    fails.add(name, "no error raised")
                except (InputError, BufferTooSmallError) as e:
                    elapsed = time.monotonic() - t0
                    fails.check(name, elapsed < 2.0, f"InputError only after {elapsed:.1f} s "
                                "(did it start communicating?)")
                    fails.check(name, len(str(e)) > 20, f"unhelpful message {str(e)!r}")
                except Exception as e:  # noqa: BLE001 - any other type is itself the failure
                    fails.add(name, f"raised {type(e).__name__} ({e}), want InputError")
        import torch.distributed as dist
        dist.barrier(group=ctx.group)
        run_normal_case(ctx, buf, ref, case, fails)
        sync(ctx)
        check_status(buf)
    finally:
        buf.destroy()
        if small is not None:
            small.destroy()
        ref.destroy()
    fails.raise_if_any(f"bad inputs ({backend})")


def task_normal_create_destroy(ctx, backend: str, times: int = 100, hidden: int = 7168,
                               slack_mib: int = 64):
    """Create and destroy a Buffer ``times`` times (a dispatch + combine in some of them): free
    GPU memory must not shrink by more than ``slack_mib`` (a leak of even one NVLink buffer per
    cycle would cost ``times`` buffers)."""
    if not is_cuda(ctx):
        return "skipped: free GPU memory needs a GPU"
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    case = NCase(seed=9, hidden=hidden, num_tokens=32)
    x, idx, w = (t.to(dev) for t in n_inputs(case, me, r))

    def cycle(i):
        buf = normal_buffer(ctx, backend, hidden)
        if i % 20 == 0:
            lay = buf.get_dispatch_layout(idx, case.num_experts)
            recv, _, _, _, handle, _ = buf.dispatch(x, **layout_args(lay), topk_idx=idx,
                                                    topk_weights=w)
            buf.combine(recv, handle)
        buf.destroy()

    def free_bytes():
        # Ranks may share the GPU (EP_COMM_TEST_RANKS_PER_GPU): the free memory is then the
        # device's, so every rank empties its caches before anyone measures, and nobody
        # allocates again before everyone has.
        import torch.distributed as dist
        sync(ctx)
        gc.collect()
        torch.cuda.empty_cache()
        dist.barrier(group=ctx.group)
        free = torch.cuda.mem_get_info(dev)[0]
        dist.barrier(group=ctx.group)
        return free

    cycle(0)  # first use: kernel modules, CUDA context pieces, allocator pools
    before = free_bytes()
    t0 = time.monotonic()
    for i in range(times):
        cycle(i)
    after = free_bytes()
    lost = (before - after) / 2 ** 20
    assert lost <= slack_mib, (f"rank {me}: free GPU memory shrank by {lost:.1f} MiB over {times} "
                               f"create/destroy cycles ({lost / times:.2f} MiB per cycle), slack "
                               f"{slack_mib} MiB")
    return {"lost_mib": lost, "seconds": time.monotonic() - t0}


def _timed_raise(call, exc_type):
    """Runs ``call``; returns (the ``exc_type`` error it raised, or None; seconds it took)."""
    t0 = time.monotonic()
    try:
        call()
    except exc_type as e:
        return e, time.monotonic() - t0
    return None, time.monotonic() - t0


def task_normal_stuck_peer(ctx, backend: str, skipper: int = 1, timeout_s: str = "3"):
    """Rank ``skipper`` skips a dispatch: every other rank gets CommTimeoutError naming its rank
    and the dispatch phase within about ``timeout_s``; a further call on that Buffer raises an
    EpCommError too (never a hang, never a wrong result); then its Buffer is destroyed within a
    few seconds, without meeting the skipper.

    The skipper models a rank that is gone: it makes no further call and keeps its Buffer
    (freed when its process exits). Its sequence of collectives no longer matches the others',
    so run this task on a fresh pool (``multiproc.run_ranks``), never on the shared one."""
    from ep_comm.errors import CommTimeoutError, EpCommError
    old = os.environ.get("EP_COMM_TIMEOUT_S")
    os.environ["EP_COMM_TIMEOUT_S"] = timeout_s
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    limit = float(timeout_s)
    case = NCase(seed=13, hidden=1024, num_tokens=48)
    try:
        buf = normal_buffer(ctx, backend, case.hidden)
        x, idx, w = (t.to(dev) for t in n_inputs(case, me, r))
        lay = buf.get_dispatch_layout(idx, case.num_experts)
        if me == skipper:
            _keep_alive.append(buf)
            return "skipped"
        args = dict(**layout_args(lay), topk_idx=idx, topk_weights=w)

        def attempt():
            buf.dispatch(x, **args)
            sync(ctx)
            check_status(buf)

        err, elapsed = _timed_raise(attempt, CommTimeoutError)
        assert err is not None, f"rank {me}: no CommTimeoutError although rank {skipper} " \
                                f"skipped the dispatch ({elapsed:.1f} s)"
        msg = str(err)
        assert err.rank == me and f"rank {me}" in msg, f"error does not name rank {me}: {msg}"
        assert err.phase.startswith("dispatch") and "dispatch" in msg, \
            f"error does not name the dispatch phase: {msg}"
        assert 0.5 * limit <= elapsed <= limit + 10, \
            f"rank {me}: CommTimeoutError after {elapsed:.1f} s, expected about {limit} s"
        # The Buffer is now unusable: a further call must say so, not hang or return garbage.
        again, again_s = _timed_raise(attempt, EpCommError)
        assert again is not None, f"rank {me}: a dispatch after the timeout raised nothing"
        assert again_s <= limit + 10, f"rank {me}: the call after the timeout took {again_s:.1f} s"
        t2 = time.monotonic()
        buf.destroy()
        destroy_s = time.monotonic() - t2
        assert destroy_s <= limit + 10, f"rank {me}: destroy after the timeout took {destroy_s:.1f} s"
        return elapsed
    finally:
        if old is None:
            os.environ.pop("EP_COMM_TIMEOUT_S", None)
        else:
            os.environ["EP_COMM_TIMEOUT_S"] = old


#: Buffers of ranks that model a vanished peer: kept (not destroyed) until the process exits.
_keep_alive: list = []


# ================================================================== low-latency tasks
def _ll_corrupt(kind: str | None, recv, count, handle):
    """Deliberately damage a low-latency result (CPU self-test: each must be caught)."""
    if kind is None:
        return
    e = int(torch.argmax(count.cpu()))
    if int(count[e]) == 0:
        return
    payload = recv[0] if isinstance(recv, tuple) else recv
    if kind == "row":
        payload[e, 0].view(torch.uint8)[0] ^= 1
    elif kind == "src_info":
        handle.src_info[e, 0] += 1
    elif kind == "recv_count":
        count[e] -= 1


def ll_round(ctx, buf, case: LLCase, step: int, fails: Failures, stats=None, masked=(),
             corrupt: str | None = None):
    """One low-latency dispatch + combine, checked with low_latency_cases' oracle checks, with
    failures recorded (every rank still makes every call). The zero-copy buffer and ``out=``
    are poisoned with NaN first and only valid rows are written, as a user would."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    fails.where = f"{case} step {step}"
    inputs = [llc.make_inputs(case, s, r, step) for s in range(r)]
    x, idx, w = (t.to(dev) for t in inputs[me])
    cum, wait = stats if stats is not None else (None, None)
    recv, count, handle, _, hook = buf.low_latency_dispatch(
        x, idx, case.max_tokens, case.num_experts, cumulative_local_expert_recv_stats=cum,
        dispatch_wait_recv_cost_stats=wait, use_fp8=case.fp8, round_scale=case.round_scale,
        use_ue8m0=case.ue8m0, return_recv_hook=case.hook)
    fails.check("dispatch hook", (hook is not None) == case.hook,
                f"hook is {hook!r} with return_recv_hook={case.hook}")
    if hook is not None:
        if is_cuda(ctx):
            torch.cuda._sleep(200_000)  # compute between send and receive
        hook()
    _ll_corrupt(corrupt, recv, count, handle)
    with fails.guard("dispatch vs oracle"):
        llc.check_dispatch(ctx, case, recv, count, handle, inputs, masked)
    y = llc.expert_outputs(case, recv, count, dev, me, r)
    src = y
    if case.zero_copy:
        zbuf = buf.get_next_low_latency_combine_buffer(handle)
        fails.check("zero-copy buffer", tuple(zbuf.shape) == tuple(y.shape)
                    and zbuf.dtype == torch.bfloat16, f"{zbuf.dtype} {list(zbuf.shape)}")
        zbuf.fill_(NAN)
        counts = count.cpu().tolist()
        for e, n in enumerate(counts):
            if n:
                zbuf[e, :n] = y[e, :n]
        src = zbuf
    out = None
    if case.use_out:
        out = torch.full((idx.shape[0], case.hidden), NAN, dtype=torch.bfloat16, device=dev)
    combined, _, chook = buf.low_latency_combine(
        src, idx, w, handle, zero_copy=case.zero_copy, return_recv_hook=case.hook, out=out,
        combine_wait_recv_cost_stats=wait)
    if chook is not None:
        chook()
    sync(ctx)
    if out is not None:
        fails.check("out=", combined.data_ptr() == out.data_ptr(),
                    "combine did not return the out= tensor")
    with fails.guard("combine vs oracle"):
        expect, mag = llc.expected_combine(case, me, inputs, r, masked)
        llc.assert_combined(combined, expect, mag, "combined_x")
    return count.cpu()


def task_ll_sweep(ctx, backend: str, cases: list, corrupt: str | None = None):
    """Many low-latency cases; cases sharing (M, hidden, E, nvlink) share one Buffer, so both
    halves of the double buffer and every signal are reused with changing data. With
    ``corrupt``, returns the failure messages instead of raising (self-test of the checks)."""
    groups: dict[tuple, list] = {}
    for c in cases:
        groups.setdefault((c.max_tokens, c.hidden, c.num_experts, c.nvlink), []).append(c)
    fails = Failures(ctx.rank)
    r = ctx.world_size
    import ep_comm
    # Largest Buffer first: released symmetric buffers go back to ep_comm's NVSHMEM pool and
    # the smaller Buffers after it reuse that memory, so the sweep never needs the sum of all
    # sizes in the symmetric heap (sized from the first request of the process).
    order = sorted(groups, key=lambda k: -ep_comm.Buffer.get_low_latency_rdma_size_hint(
        k[0], k[1], r, k[2]))
    for key in order:
        group = groups[key]
        buf = llc.make_buffer(ctx, dataclasses.replace(group[0], backend=backend))
        try:
            for step, case in enumerate(group):
                local = case.num_experts // r
                stats = None
                total = torch.zeros(local, dtype=torch.int32)
                if case.stats:
                    # Nonzero starting values: the stats must be added to, not overwritten.
                    total = torch.arange(local, dtype=torch.int32) * 1000 + 7
                    stats = (total.to(ctx.device),
                             torch.full((r,), 5, dtype=torch.int64, device=ctx.device))
                for it in range(case.iterations):
                    total += ll_round(ctx, buf, case, step * 16 + it, fails, stats,
                                      corrupt=corrupt)
                if stats is not None:
                    fails.equal("cumulative_local_expert_recv_stats", stats[0].cpu(), total)
                    fails.check("dispatch/combine_wait_recv_cost_stats",
                                bool((stats[1] >= 5).all()),
                                f"{stats[1].cpu().tolist()} fell below their starting value 5")
                check_status(buf)
        finally:
            buf.destroy()
    return fails.outcome(corrupt, f"low-latency {backend} vs oracle", len(cases))


def task_ll_graph(ctx, backend: str, case: LLCase, replays: int = 4, capture: bool = True):
    """Low-latency dispatch + expert function + combine captured in one CUDA graph, replayed
    with new data and routing copied into the captured inputs; every replay checked against
    the oracle. Rows past ``recv_count`` are poisoned with NaN inside the graph (a graph cannot
    read counts on the host), and so is ``out=`` before each combine. ``capture=False`` runs
    the same steps eagerly (the CPU self-test of this task)."""
    if capture and not is_cuda(ctx):
        return "skipped: CUDA graphs need a GPU"
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    # A graph has fixed shapes: every rank uses the same token count at every replay.
    fixed = dataclasses.replace(case, ragged=0, backend=backend, iterations=1, stats=False)
    m, h, local = fixed.max_tokens, fixed.hidden, fixed.num_experts // r
    buf = llc.make_buffer(ctx, fixed)
    fails = Failures(me)
    try:
        x0, idx0, w0 = llc.make_inputs(fixed, me, r, 0)
        x_s, idx_s, w_s = x0.to(dev).clone(), idx0.to(dev).clone(), w0.to(dev).clone()
        out_s = torch.empty(x0.shape[0], h, dtype=torch.bfloat16, device=dev)
        row = torch.arange(r * m, device=dev)

        def step():
            recv, count, handle, _, hook = buf.low_latency_dispatch(
                x_s, idx_s, m, fixed.num_experts, use_fp8=fixed.fp8, round_scale=fixed.round_scale,
                use_ue8m0=fixed.ue8m0, return_recv_hook=fixed.hook)
            if hook is not None:
                hook()
            vals = llc_dequant(recv) if fixed.fp8 else recv.float()
            y = torch.stack([llc.expert_fn(vals[e], me * local + e) for e in range(local)]) \
                if local else torch.empty(0, r * m, h, dtype=torch.bfloat16, device=dev)
            valid = (row.unsqueeze(0) < count.unsqueeze(1)).unsqueeze(2)
            y = torch.where(valid, y, torch.full_like(y, NAN))
            src = y
            if fixed.zero_copy:
                src = buf.get_next_low_latency_combine_buffer(handle)
                src.copy_(y)
            out = None
            if fixed.use_out:
                out_s.fill_(NAN)
                out = out_s
            combined, _, chook = buf.low_latency_combine(
                src, idx_s, w_s, handle, zero_copy=fixed.zero_copy,
                return_recv_hook=fixed.hook, out=out)
            if chook is not None:
                chook()
            return recv, count, handle, combined

        res = step()  # warm-up outside the capture: compiles and loads the kernels
        sync(ctx)
        graph = None
        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                res = step()
        for rep in range(1, replays + 1):
            fails.where = f"{fixed} graph replay {rep}"
            ins = [llc.make_inputs(fixed, s, r, rep) for s in range(r)]
            x, idx, w = ins[me]
            x_s.copy_(x)
            idx_s.copy_(idx)
            w_s.copy_(w)
            if graph is not None:
                graph.replay()
            else:
                res = step()
            sync(ctx)
            check_status(buf)
            recv, count, handle, combined = res
            with fails.guard("dispatch vs oracle"):
                llc.check_dispatch(ctx, fixed, recv, count, handle, ins)
            if fixed.use_out:
                fails.check("out=", combined.data_ptr() == out_s.data_ptr(),
                            "combine did not return the out= tensor")
            with fails.guard("combine vs oracle"):
                expect, mag = llc.expected_combine(fixed, me, ins, r)
                llc.assert_combined(combined, expect, mag, "combined_x")
    finally:
        buf.destroy()
    fails.raise_if_any(f"low-latency CUDA graph ({backend})")
    return replays


def task_ll_clean_after_normal(ctx, backend: str, seed: int, hidden: int = 2048,
                               num_experts: int = 32, max_tokens: int = 32):
    """One Buffer used in normal mode, then clean_low_latency_buffer, then low-latency rounds,
    then normal mode and low latency again: each result checked."""
    import ep_comm
    r = ctx.world_size
    ll_case = LLCase(seed=seed, max_tokens=max_tokens, num_tokens=max_tokens - 5,
                     ragged=3, hidden=hidden, num_experts=num_experts, fp8=True, backend=backend)
    n_case = NCase(seed=ll_case.seed, hidden=hidden, num_experts=num_experts, num_tokens=40)
    nvl = ep_comm.Buffer.get_dispatch_config(r).get_nvl_buffer_size_hint(hidden * 2, r)
    rdma = ep_comm.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, r, num_experts)
    buf = ep_comm.Buffer(ctx.group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True,
                         backend=backend, explicitly_destroy=True)
    ref = normal_buffer(ctx, "reference", hidden)
    fails = Failures(ctx.rank)
    try:
        for round_ in range(2):
            run_normal_case(ctx, buf, ref, dataclasses.replace(n_case, seed=n_case.seed + round_),
                            fails)
            sync(ctx)
            buf.clean_low_latency_buffer(max_tokens, hidden, num_experts)
            for step in range(2):
                ll_round(ctx, buf, ll_case, 10 * round_ + step, fails)
            check_status(buf)
    finally:
        buf.destroy()
        ref.destroy()
    fails.raise_if_any(f"normal mode then clean_low_latency_buffer then low latency ({backend})")


def task_internode_network_bytes(ctx, backend: str, case: NCase, rpn: int):
    """Bytes the internode kernels put to other nodes, counted by the kernels, against the
    minimum: every (token, other node holding one of its experts) pair once, each way. Returns
    (counted dispatch, counted combine, minimum pairs) summed over all ranks."""
    import torch.distributed as dist
    r, me, dev = ctx.world_size, ctx.rank, ctx.device
    buf = normal_buffer(ctx, backend, case.hidden)
    runtime = buf.backend.normal
    counter = runtime.count_network_bytes(True)
    try:
        inputs = [n_inputs(case, s, r) for s in range(r)]
        x, idx, w = (t.to(dev) for t in inputs[me])
        layout = buf.get_dispatch_layout(idx, case.num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x, topk_idx=idx, topk_weights=w, **layout_args(layout))
        buf.combine(recv_x, handle, topk_weights=recv_w)
        sync(ctx)
        check_status(buf)
        counted = counter.cpu()
        d_bytes, c_bytes = runtime.network_bytes_per_token(case.hidden, 2, case.num_topk)
    finally:
        runtime.count_network_bytes(False)
        buf.destroy()
    per = case.num_experts // r
    pairs = 0
    for s, (_, sidx, _) in enumerate(inputs):
        ranks = torch.where(sidx >= 0, sidx // per, -1)
        for n in range(r // rpn):
            if n == s // rpn:
                continue
            pairs += int(((ranks >= n * rpn) & (ranks < (n + 1) * rpn)).any(dim=1).sum())
    on_gloo = dist.get_backend(ctx.group) == "gloo"
    total = counted.clone() if on_gloo else counted.to(dev)
    dist.all_reduce(total, group=ctx.group)
    total = total.cpu()
    assert int(total[0]) == pairs * d_bytes, (int(total[0]), pairs, d_bytes)
    assert int(total[1]) == pairs * c_bytes, (int(total[1]), pairs, c_bytes)
    return int(total[0]), int(total[1]), pairs


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


# ================================================================== case lists
def edge_routing_cases(base: int) -> list:
    """Normal-mode edge routings, each in bf16 and fp8: zero tokens on the last rank, a single
    token, every token to rank 0 (with num_worst_tokens), every top-k entry -1; then top-9 of
    256 experts with expert_alignment 128."""
    cases = []
    for i, (routing, hidden) in enumerate([("empty_last", 2048), ("one_token", 4096),
                                           ("to_rank0", 7168), ("all_dropped", 2048)]):
        for fp8 in (False, True):
            cases.append(NCase(seed=base + 2 * i + fp8, routing=routing, hidden=hidden, fp8=fp8,
                               num_tokens=100, num_topk=8, num_experts=64, bias=2 * fp8,
                               worst=-1 if i == 2 else 0))
    cases.append(NCase(seed=base + 20, hidden=7168, num_experts=256, num_topk=9, num_tokens=512,
                       alignment=128))
    return cases


def normal_cases(base: int, num_ranks: int, count: int, hiddens=(2048, 4096, 7168, 1000),
                 max_tokens: int = 384) -> list:
    """``count`` cases from ``base``: top-k cycles 1..9, hidden cycles through ``hiddens``, the
    special routings and fp8 / alignment / num_worst_tokens / bias cycle on other periods, so
    that every value appears (given count >= 9) and the combinations change with the seed."""
    rng = random.Random(base)
    cases = []
    for i in range(count):
        hidden = hiddens[i % len(hiddens)]
        k = 1 + i % 9
        experts = rng.choice([32, 64, 256]) if i % 4 else 64
        experts = max(experts, num_ranks * 2, k)
        experts -= experts % num_ranks
        routing = ROUTINGS[i % len(ROUTINGS)] if i % 2 else "random"
        cases.append(NCase(
            seed=base + i, num_tokens=rng.randint(1, max_tokens), ragged=rng.randint(0, 40),
            hidden=hidden, num_experts=experts, num_topk=k, drop=rng.choice([0.0, 0.1, 0.4]),
            routing=routing, fp8=(i % 3 == 1 and hidden % 128 == 0),
            alignment=rng.choice([1, 1, 4, 128]), worst=-1 if i % 5 == 2 else 0,
            bias=i % 3 if i % 2 == 0 else 0))
    return cases


def ll_cases(base: int, count: int, max_tokens: int, hidden: int, num_experts: int,
             nvlink: bool = True, backend: str = "reference") -> list:
    """``count`` low-latency cases of one buffer shape: token counts from 0 to M with
    different counts per rank, top-k 1..9, -1 entries, fp8 (plain, round_scale, ue8m0) and
    bf16, hook and not, zero_copy, out=, stats, special routings."""
    rng = random.Random(base)
    routings = ("random", "to_rank0", "one_expert", "empty_rank1", "dup")
    cases = []
    for i in range(count):
        fp8_mode = i % 4  # 0: bf16, 1: fp8, 2: fp8 round_scale, 3: fp8 ue8m0
        tokens = (0, max_tokens, rng.randint(1, max_tokens))[i % 3]
        cases.append(LLCase(
            seed=base + i, max_tokens=max_tokens, num_tokens=tokens,
            ragged=rng.choice([0, 1, -(max_tokens // 2), max_tokens]), hidden=hidden,
            num_experts=num_experts, num_topk=min(1 + (i * 4 + base) % 9, num_experts),
            drop=rng.choice([0.0, 0.1, 0.5]), routing=routings[i % len(routings)] if i % 2 else "random",
            fp8=fp8_mode > 0, round_scale=fp8_mode >= 2,
            ue8m0=fp8_mode == 3 and hidden % 512 == 0, hook=bool(i % 2),
            zero_copy=i % 3 == 1, use_out=i % 3 == 2, nvlink=nvlink, stats=i % 4 == 1,
            iterations=1 + i % 2, backend=backend))
    return cases
