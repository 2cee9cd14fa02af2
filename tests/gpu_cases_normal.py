"""Normal-mode GPU cases (NVLink; over nodes with EP_COMM_TEST_RANKS_PER_NODE): inputs from
seeds, expectations from every rank's inputs, checks against a reference Buffer, the sweep,
CUDA-graph and backward tasks, and the case lists (bad inputs, create/destroy and a stuck peer:
gpu_cases_lifecycle).
See gpu_common for how the comparisons work."""
from __future__ import annotations

import dataclasses
import random

import torch

import oracle
from cases import add_duplicates_and_holes
from gpu_common import (Failures, NAN, check_status, is_cuda, llc_dequant, normal_buffer, sync,
                        wait_events)


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
    dups: bool = False            # duplicate ids in rows, -1 in every slot, rows routed nowhere
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
    """(x bf16 [T, H], topk_idx int64 [T, K] (distinct experts per row unless ``case.dups``),
    topk_weights float32), on CPU, from the seed: every rank computes every rank's inputs."""
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
    if case.dups:
        add_duplicates_and_holes(idx, g)
    w = torch.rand(t, k, generator=g).float() + 0.1
    return x, idx, w


def fp8_cast(x: torch.Tensor):
    from ep_comm.core import fp8
    return fp8.per_token_cast_to_fp8(x)


def oracle_fp8(x: torch.Tensor):
    """The independent oracle's cast of ``x`` (tests/oracle.py): (float8_e4m3fn [T, H] with the
    oracle's bits, float32 scales [T, H // 128]), what a received fp8 row must equal."""
    codes, scales = oracle.fp8_quantize(x.cpu())
    return codes.view(torch.float8_e4m3fn), scales


def sent_f32(case: NCase, x: torch.Tensor) -> torch.Tensor:
    """float32 values a token arrives with (the oracle's fp8 cast dequantised, or x itself)."""
    if case.fp8:
        codes, scales = oracle.fp8_quantize(x.cpu())
        return oracle.fp8_dequantize(codes, scales).float()
    return x.float()


def cached_x(case: NCase, rank: int, shape) -> torch.Tensor:
    """x of ``rank`` for the cached dispatch of ``run_normal_case`` (new data, same routes)."""
    g = torch.Generator().manual_seed(case.seed * 31 + rank)
    return (torch.randn(shape, generator=g) * 3).to(torch.bfloat16)


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
        parts["x"].append(oracle_fp8(x[sel]) if case.fp8 else x[sel])
        parts["idx"].append(torch.where(mine[sel], idx[sel] - lo, torch.full_like(idx[sel], -1)))
        parts["w"].append(w[sel])
        parts["src_rank"].append(torch.full((len(sel),), s, dtype=torch.int32))
        parts["src_idx"].append(sel.to(torch.int32))
        for row in (idx[sel] - lo).tolist():  # once per distinct local expert of a token
            for e in {v for v in row if 0 <= v < per}:
                counts[e] += 1
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


def partial_sum_ranks(buf, num_ranks: int) -> int:
    """Ranks whose rows ``buf``'s combine sums into one partial that is rounded to bf16: a node's
    ranks on the internode kernels (each node's partial crosses the network as a bf16 row,
    kernels/cuda/internode.cu, combine), else every rank (one rounding, of the whole sum)."""
    from ep_comm.backends.kernels.internode import InternodeRuntime
    normal = getattr(buf.backend, "normal", None)
    return normal.ranks_per_node if isinstance(normal, InternodeRuntime) else num_ranks


def combine_of_partials(case: NCase, x: torch.Tensor, idx: torch.Tensor, num_ranks: int,
                        group: int) -> torch.Tensor:
    """The bf16 combine of ``expert_rows`` for this rank's tokens (x: its bf16 rows as
    dispatched, which arrive unchanged; idx: their top-k ids) by a backend that sums the rows
    of each ``group`` consecutive ranks in float32 (in rank order, holders only), rounds that
    partial to bf16, and adds the partials of the groups that hold the token in float32 (in
    group order) before the final rounding: the internode kernels' order with ``group`` =
    ranks per node, the NVLink kernels' and the reference's with ``group`` = the rank count
    (the float32 sums of these rows are exact, so the order of the reference's index_add_ does
    not show). Bit for bit, so that a row from a stale buffer shows, however close its value."""
    per = case.num_experts // num_ranks
    vals, idx = x.cpu().float(), idx.cpu()
    acc = torch.zeros(vals.shape, dtype=torch.float32)
    for first in range(0, num_ranks, group):
        part = torch.zeros_like(acc)
        any_holder = torch.zeros(vals.shape[0], 1, dtype=torch.bool)
        for d in range(first, first + group):
            holds = ((idx >= d * per) & (idx < (d + 1) * per)).any(dim=1, keepdim=True)
            part = torch.where(holds, part + expert_rows(vals, d).float(), part)
            any_holder |= holds
        acc = torch.where(any_holder, acc + part.to(torch.bfloat16).float(), acc)
    return acc.to(torch.bfloat16)


def expected_combined_weights(case: NCase, me: int, inputs, num_ranks: int):
    """float64 sum over holder ranks d of ``topk_weights * (d + 2)`` (what combine sums)."""
    _, idx, w = inputs[me]
    per = case.num_experts // num_ranks
    acc = torch.zeros(w.shape, dtype=torch.float64)
    for d in range(num_ranks):
        holds = ((idx >= d * per) & (idx < (d + 1) * per)).any(dim=1)
        acc += w.double() * (d + 2) * holds.unsqueeze(1)
    return acc


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
    x2_cpu = cached_x(case, me, x_cpu.shape)
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
    # ... and the reference's cached rows against the oracle (bit-exact, fp8 included), so
    # that a reference wrong on cached dispatch cannot hide behind the comparison above.
    inputs2 = [(cached_x(case, s, inp[0].shape), inp[1], inp[2]) for s, inp in enumerate(inputs)]
    want2 = expected_dispatch(case, me, inputs2, r)["x"]
    if case.fp8:
        fails.equal("reference cached dispatch fp8 payload", ref2[0][0][:n].cpu(), want2[0])
        fails.equal("reference cached dispatch scales", ref2[0][1][:n].cpu(), want2[1])
    else:
        fails.equal("reference cached dispatch recv_x", ref2[0][:n].cpu(), want2)

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


def task_normal_through_cpp(ctx, backend: str, cases: list, rounds: int = 4):
    """Each case's shapes ``rounds`` times on one Buffer, fresh data and routing each round
    (the seed changes, the token counts do not): layout, dispatch (from the layout or with
    num_worst_tokens), cached dispatch and combine, each round compared with a reference
    Buffer and the expectation (``run_normal_case``). From the second round on the C++ host
    path (kernels/host/host_path.cpp) launches the dispatch, the cached dispatch and the
    combine (whose received rows change with the routing of a dispatch from a layout).
    Returns [dispatches, combines] the C++ side ran per case ([0, 0] where the path is not
    loaded)."""
    fails = Failures(ctx.rank)
    made = []
    for case in cases:
        buf = normal_buffer(ctx, backend, case.hidden)
        ref = normal_buffer(ctx, "reference", case.hidden)
        try:
            host = buf._normal_host
            before = [0, 0] if host is None else [host.calls, host.combine_calls]
            for i in range(rounds):
                run_normal_case(ctx, buf, ref, dataclasses.replace(case, seed=case.seed + 101 * i),
                                fails)
                sync(ctx)
                check_status(buf)
            made.append([0, 0] if host is None else
                        [host.calls - before[0], host.combine_calls - before[1]])
        finally:
            buf.destroy()
            ref.destroy()
    fails.raise_if_any(f"normal-mode {backend} through the C++ host path vs reference")
    return made


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


def task_normal_back_to_back(ctx, backend: str, case: NCase, rounds: int = 200,
                             num_sms: int = 48, wait_s: float = 60.0):
    """``rounds`` of layout + dispatch (num_worst_tokens: no host wait) + combine on the same
    inputs, queued without a host sync, on ``Buffer.set_num_sms(num_sms)`` channels: with few
    tokens most rings of a channel carry no row, and each kernel follows the previous one at
    once. The regression of the NVLink handshake race (kernels/cuda/intranode.cu, top): a
    combine receiver that answered an empty ring before hearing its sender could overwrite the
    answer the peer's dispatch sender still had to read, which then waited in vain (the
    transformers GPU stall of 2026-12-07). Every round's combine must equal the reference
    Buffer's, and the GPU work must end within ``wait_s`` (an AssertionError naming the rounds
    that finished, not a hang)."""
    import ep_comm
    old_sms = ep_comm.Buffer.num_sms
    ep_comm.Buffer.set_num_sms(num_sms)
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    try:
        buf = normal_buffer(ctx, backend, case.hidden)
        ref = normal_buffer(ctx, "reference", case.hidden)
    except BaseException:
        ep_comm.Buffer.num_sms = old_sms
        raise
    worst = worst_tokens(dataclasses.replace(case, worst=-1), r)
    try:
        x, idx, w = (t.to(dev) for t in n_inputs(case, me, r))

        def round_trip(b):
            lay = b.get_dispatch_layout(idx, case.num_experts)
            res = b.dispatch(x, **layout_args(lay), topk_idx=idx, topk_weights=w,
                             num_worst_tokens=worst)
            return b.combine(expert_rows(res[0].float(), me), res[4])[0]

        want = round_trip(ref)
        outs, events = [], []
        for _ in range(rounds):
            outs.append(round_trip(buf))
            if dev.type == "cuda":
                events.append(torch.cuda.Event())
                events[-1].record()
        wait_events(events, wait_s, f"rank {me}: back-to-back rounds")
        check_status(buf)
        bad = [i for i, o in enumerate(outs) if not torch.equal(o.cpu(), want.cpu())]
        assert not bad, (f"rank {me}: {len(bad)} of {rounds} rounds differ from the reference "
                         f"(first: round {bad[0]})")
    finally:
        ep_comm.Buffer.num_sms = old_sms
        buf.destroy()
        ref.destroy()
    return rounds


def task_normal_interleaved_streams(ctx, backend: str, case: NCase, rounds: int = 3,
                                    wait_s: float = 60.0):
    """Two micro-batches A and B per round on one Buffer, their calls interleaved across the
    compute and the comm stream (the stream order of ep_comm.buffer: two normal-mode kernels
    of one rank must never run at once, they share the sequence word ctrl[0] and the rings):

    1. layout and dispatch of A, synchronous (compute stream);
    2. layout of B, then its dispatch with ``async_finish=True`` (comm stream);
    3. the synchronous combine of A *before* B's event is waited on;
    4. wait for B; a synchronous cached dispatch of A queued behind ~10 ms of GPU sleep, after
       capturing an event;
    5. the combine of B with ``async_finish`` and that earlier event as ``previous_event``
       (which does not cover the cached dispatch: the comm stream must wait for it anyway);
       then wait for it.

    Dispatches (and the cached one) bit-exact against the reference Buffer, combines against
    the expectation as in ``run_normal_case``; the GPU work must end within ``wait_s`` (an
    AssertionError, not a hang). Dispatches use num_worst_tokens (no host wait), so the host
    queues everything before the GPU ran it. Returns ``rounds``."""
    import time
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    fails = Failures(me)
    case = dataclasses.replace(case, fp8=False, worst=-1, bias=0)
    buf = normal_buffer(ctx, backend, case.hidden)
    ref = normal_buffer(ctx, "reference", case.hidden)
    try:
        for i in range(rounds):
            ca = dataclasses.replace(case, seed=case.seed + 211 * i)
            cb = dataclasses.replace(case, seed=case.seed + 211 * i + 1)
            fails.where = f"round {i}: A {ca}, B {cb}"
            inputs_a = [n_inputs(ca, s, r) for s in range(r)]
            inputs_b = [n_inputs(cb, s, r) for s in range(r)]
            x_a, idx_a, w_a = (t.to(dev) for t in inputs_a[me])
            x_b, idx_b, w_b = (t.to(dev) for t in inputs_b[me])
            x2_a = cached_x(ca, me, x_a.shape).to(dev)
            worst_a, worst_b = worst_tokens(ca, r), worst_tokens(cb, r)

            def back(res):  # expert rows and weights sent back (padding rows ignored)
                return expert_rows(res[0].float(), me), res[2] * (me + 2)

            # 1. A, synchronous
            lay_a = buf.get_dispatch_layout(idx_a, ca.num_experts)
            got_a = buf.dispatch(x_a, **layout_args(lay_a), topk_idx=idx_a, topk_weights=w_a,
                                 num_worst_tokens=worst_a)
            y_a, yw_a = back(got_a)
            # 2. B on the comm stream
            lay_b = buf.get_dispatch_layout(idx_b, cb.num_experts)
            got_b = buf.dispatch(x_b, **layout_args(lay_b), topk_idx=idx_b, topk_weights=w_b,
                                 num_worst_tokens=worst_b, async_finish=True)
            # 3. A's combine, synchronous, before B's event was waited on
            comb_a = buf.combine(y_a, got_a[4], topk_weights=yw_a)
            # 4. wait for B; A's cached dispatch late on the compute stream
            got_b[5].current_stream_wait()
            y_b, yw_b = back(got_b)
            before = buf.capture()
            if is_cuda(ctx):
                torch.cuda._sleep(20_000_000)
            got_a2 = buf.dispatch(x2_a, handle=got_a[4])
            # 5. B's combine on the comm stream after an event that predates the cached dispatch
            comb_b = buf.combine(y_b, got_b[4], topk_weights=yw_b, previous_event=before,
                                 async_finish=True)
            comb_b[2].current_stream_wait()
            if is_cuda(ctx):
                done = torch.cuda.Event()
                done.record()
                deadline = time.monotonic() + wait_s
                while not done.query():
                    if time.monotonic() > deadline:
                        raise AssertionError(f"rank {me}: round {i} of the interleaved calls "
                                             f"did not finish on the GPU within {wait_s:g} s")
                    time.sleep(0.01)
            check_status(buf)

            # the reference, after: its host syncs must not order the calls under test
            for label, c, inputs, idx, w, x, got, worst in (
                    ("A", ca, inputs_a, idx_a, w_a, x_a, got_a, worst_a),
                    ("B", cb, inputs_b, idx_b, w_b, x_b, got_b, worst_b)):
                rlay = ref.get_dispatch_layout(idx, c.num_experts)
                rres = ref.dispatch(x, **layout_args(rlay), topk_idx=idx, topk_weights=w,
                                    num_worst_tokens=worst)
                n = rres[4].num_recv_tokens
                compare_dispatch(fails, c, got, rres, n, f"dispatch {label}")
                compare_with_expectation(fails, c, rres, expected_dispatch(c, me, inputs, r), n,
                                         f"reference dispatch {label}")
                if label == "A":
                    ref2 = ref.dispatch(x2_a, handle=rres[4])
                    fails.equal("cached dispatch A recv_x", got_a2[0][:n], ref2[0][:n])
            for label, c, inputs, comb in (("A", ca, inputs_a, comb_a), ("B", cb, inputs_b, comb_b)):
                exact, mag = expected_combine(c, me, inputs, r)
                fails.close_sum(f"combine {label} combined_x", comb[0], exact, mag)
                want_w = expected_combined_weights(c, me, inputs, r)
                err = (comb[1].detach().cpu().double() - want_w).abs()
                fails.check(f"combine {label} combined_topk_weights",
                            bool((err <= want_w.abs() * 2.0 ** -21).all()),
                            f"off by up to {err.max().item() if err.numel() else 0:.3g}")
    finally:
        buf.destroy()
        ref.destroy()
    fails.raise_if_any(f"normal-mode {backend}: calls interleaved across streams")
    return rounds


def task_normal_two_batches(ctx, backend: str, case: NCase, rounds: int = 3):
    """Micro-batch overlap order, synchronous calls: dispatch A, dispatch B, combine A, combine B
    (two combines with no dispatch between), ``rounds`` times with new data and routing, each
    combine bit for bit against ``combine_of_partials`` in the Buffer's order of rounding, and
    a reference Buffer running the same sequence against it with one rounding (the internode
    kernels round each node's partial, so with 2+ ranks per node they differ from the
    reference by that rounding: the 4r-2x2 GPU failure of 2026-12-07, session 16, on every
    rank, was this comparison, not a wrong row). Across nodes the second combine stages its
    input while a same-node peer may still read the first one's (regions.InternodeRegions,
    combine_src halves): a row read from the wrong half differs from the model."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    buf = normal_buffer(ctx, backend, case.hidden)
    ref = normal_buffer(ctx, "reference", case.hidden)
    fails = Failures(ctx.rank)
    try:
        group = partial_sum_ranks(buf, r)
        for i in range(rounds):
            inputs = [n_inputs(case, me, r, step=2 * i + j) for j in range(2)]
            batches = [tuple(t.to(dev) for t in inp) for inp in inputs]
            got, want = [], []
            for b, out in ((buf, got), (ref, want)):
                res = []
                for x, idx, w in batches:
                    lay = b.get_dispatch_layout(idx, case.num_experts)
                    res.append(b.dispatch(x, **layout_args(lay), topk_idx=idx, topk_weights=w))
                for recv in res:
                    out.append(b.combine(expert_rows(recv[0].float(), me), recv[4])[0])
            sync(ctx)
            check_status(buf)
            for j, (g, w) in enumerate(zip(got, want)):
                x, idx, _ = inputs[j]
                label = f"round {i} combine of batch {'AB'[j]}"
                fails.equal(label, g.cpu(), combine_of_partials(case, x, idx, r, group))
                fails.equal(f"{label} (reference Buffer)", w.cpu(),
                            combine_of_partials(case, x, idx, r, r))
    finally:
        buf.destroy()
        ref.destroy()
    fails.raise_if_any(f"normal-mode {backend}: two dispatches then two combines")
    return rounds


def task_normal_uneven_buffers(ctx, backend: str, cases: list, extra: int = 3 << 20):
    """Ranks whose Buffers have different ``num_nvl_bytes`` (rank r: the size hint plus r *
    ``extra`` bytes): the rings' per-source stride comes from the smallest buffer on every
    rank, so every call is exact against the reference (with strides from each rank's own
    size the ranks would place the rings differently)."""
    import ep_comm
    r, me = ctx.world_size, ctx.rank
    hidden = max(c.hidden for c in cases)
    cfg = ep_comm.Buffer.get_dispatch_config(r)
    nvl = cfg.get_nvl_buffer_size_hint(hidden * 2, r) + me * extra
    buf = ep_comm.Buffer(ctx.group, num_nvl_bytes=nvl, backend=backend, explicitly_destroy=True)
    ref = normal_buffer(ctx, "reference", hidden)
    fails = Failures(ctx.rank)
    try:
        for case in cases:
            run_normal_case(ctx, buf, ref, case, fails)
            sync(ctx)
            check_status(buf)
    finally:
        buf.destroy()
        ref.destroy()
    fails.raise_if_any(f"normal-mode {backend} with uneven num_nvl_bytes vs reference")
    return len(cases)


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


# ================================================================== case lists
def edge_routing_cases(base: int) -> list:
    """Normal-mode edge routings: zero tokens on the last rank, a single token, every token to
    rank 0 (with num_worst_tokens), every top-k entry -1, two in bf16 and two in fp8 (which two
    follows the seed, so runs with fresh seeds cover both for each; one GPU call must hold the
    whole suite); then top-9 of 256 experts with expert_alignment 128."""
    cases = []
    for i, (routing, hidden) in enumerate([("empty_last", 2048), ("one_token", 4096),
                                           ("to_rank0", 7168), ("all_dropped", 2048)]):
        fp8 = (base + i) % 2 == 1
        cases.append(NCase(seed=base + 2 * i + fp8, routing=routing, hidden=hidden, fp8=fp8,
                           num_tokens=100, num_topk=8, num_experts=64, bias=2 * fp8,
                           worst=-1 if i == 2 else 0))
    cases.append(NCase(seed=base + 20, hidden=7168, num_experts=256, num_topk=9, num_tokens=512,
                       alignment=128))
    cases += duplicate_id_cases(base + 30)
    return cases


def duplicate_id_cases(base: int, hidden: int = 2048, num_experts: int = 64) -> list:
    """Duplicate ids in rows, -1 in every slot position, rows routed nowhere (bf16 and fp8),
    and top-k at NORMAL_MAX_TOPK with duplicates."""
    from ep_comm.core.constants import NORMAL_MAX_TOPK
    return [NCase(seed=base, hidden=hidden, num_experts=num_experts, num_topk=6, dups=True,
                  num_tokens=90, bias=1),
            NCase(seed=base + 1, hidden=hidden, num_experts=num_experts, num_topk=5, dups=True,
                  fp8=True, num_tokens=70, worst=-1),
            NCase(seed=base + 2, hidden=hidden, num_experts=max(num_experts, NORMAL_MAX_TOPK),
                  num_topk=NORMAL_MAX_TOPK, dups=True, num_tokens=60)]


def small_cases(base: int, num_ranks: int) -> list:
    """The many-rank list (3, 4, 8 ranks sharing a GPU): few small cases that still cover
    bf16 / fp8, alignment, num_worst_tokens, bias, duplicates, empty and skewed routings."""
    e = 8 * num_ranks
    # hidden 64 (128-byte rows): the tiny transformers models of tests/hf_cases.py
    cases = normal_cases(base, num_ranks, count=4, hiddens=(1024, 64, 2048), max_tokens=48)
    cases += [NCase(seed=base + 10, routing=r, hidden=1024, num_experts=e, num_topk=4,
                    num_tokens=40, fp8=i % 2 == 1, worst=-1 if i == 1 else 0)
              for i, r in enumerate(("empty_last", "to_rank0", "all_dropped", "one_token"))]
    return cases + duplicate_id_cases(base + 20, hidden=1024, num_experts=max(e, 16))


def normal_cases(base: int, num_ranks: int, count: int, hiddens=(2048, 4096, 7168, 1000, 64),
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
            bias=i % 3 if i % 2 == 0 else 0, dups=i % 4 == 3))
    return cases

