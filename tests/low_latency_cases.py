"""Low-latency (decode) scenarios run on every rank, checked against tests/oracle.py.

Each task regenerates the inputs of all ranks from the case's seed, runs ep_comm on its own
inputs, and checks the result against the oracle's ``low_latency_dispatch`` /
``low_latency_combine``. The same tasks run on the reference backend over gloo (CPU) and on the
kernels backend over NCCL (GPUs).

What is checked after a dispatch (see ``check_dispatch``): per local expert and source rank, the
(begin, count) range of the handle, the rows inside it (bf16 bit-exact, or fp8 payload and
scales bit-exact against the independent FP8 oracle of tests/oracle.py), their source token
indices, ``recv_count``, that the ranges of one expert tile ``[0, recv_count)`` without
overlap, ``-1`` source indices past the count, and the column-major layout of the scales. Blocks of different source ranks may
be in any order, so rows are located through the ranges, never by absolute position.

Combine is checked against the float64 oracle, within one bf16 rounding of the result plus
float32 accumulation error (``assert_combined``). Expert outputs are ``expert_fn`` of the
received rows: an exact float32 computation whose result differs per expert, so a row taken
from the wrong expert or token shows up.
"""
from __future__ import annotations

import dataclasses
import time

import torch

import oracle

NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class LLCase:
    seed: int = 0
    max_tokens: int = 16          # num_max_dispatch_tokens_per_rank (M)
    num_tokens: int = 12          # tokens on rank r: min(M, num_tokens + r * ragged)
    ragged: int = 3
    hidden: int = 256
    num_experts: int = 16
    num_topk: int = 4
    drop: float = 0.1             # probability of a -1 top-k entry
    routing: str = "random"       # random | to_rank0 | one_expert | empty_rank1 | dup
    fp8: bool = False
    round_scale: bool = False
    ue8m0: bool = False
    hook: bool = False
    zero_copy: bool = False
    use_out: bool = False
    nvlink: bool = True           # allow_nvlink_for_low_latency_mode
    stats: bool = False
    iterations: int = 1           # dispatch + combine rounds on one Buffer, fresh data each
    backend: str = "reference"


def tokens_of(case: LLCase, rank: int) -> int:
    if case.routing == "empty_rank1" and rank == 1:
        return 0
    return max(0, min(case.max_tokens, case.num_tokens + rank * case.ragged))


def make_inputs(case: LLCase, rank: int, num_ranks: int, step: int = 0):
    """(x bf16 [T, H], topk_idx int64 [T, K], topk_weights float32 [T, K]) of ``rank`` at
    ``step``, on CPU."""
    g = torch.Generator().manual_seed(case.seed * 100003 + step * 1009 + rank)
    t, h, e, k = tokens_of(case, rank), case.hidden, case.num_experts, case.num_topk
    # Rows of very different magnitudes (the per-128 scales must follow), one all-zero row
    # (amax is clamped), and a large outlier in one block.
    x = torch.randn(t, h, generator=g) * torch.exp(torch.randn(t, 1, generator=g) * 2)
    if t > 1:
        x[1] = 0
    if t > 2:
        x[2, 5] = 3000.0
    x = x.to(torch.bfloat16)
    idx = torch.empty(t, k, dtype=torch.int64)
    for i in range(t):
        if case.routing == "to_rank0":
            pool = torch.arange(e // num_ranks)
        elif case.routing == "one_expert":
            pool = torch.tensor([e - 1])
        else:
            pool = torch.arange(e)
        row = pool[torch.randperm(len(pool), generator=g)[:k]]
        if len(row) < k:
            row = torch.cat([row, torch.full((k - len(row),), -1, dtype=torch.int64)])
        idx[i] = row
    if case.drop:
        idx[torch.rand(t, k, generator=g) < case.drop] = -1
    if case.routing == "dup" and k > 1:
        idx[::2, 1] = idx[::2, 0]  # the same expert twice in one row: sent once, weights add
    w = torch.rand(t, k, generator=g).float() + 0.1
    return x, idx, w


def expert_fn(rows_f32: torch.Tensor, global_expert: int) -> torch.Tensor:
    """What expert ``global_expert`` returns for received rows (float32 [n, H]) -> bf16.

    Two exact-in-float32 constants per expert; the same float32 operations on CPU and GPU give
    the same bits, so the oracle reproduces every row exactly."""
    a = (0.5, 1.0, -2.0, 0.25)[global_expert % 4]
    c = 0.125 * (global_expert % 7)
    return (rows_f32 * a + c).to(torch.bfloat16)


def sent_values(case: LLCase, x: torch.Tensor):
    """What a token must arrive as: x itself (bf16), or its fp8 cast by the independent oracle
    (uint8 e4m3 codes, scales float32 or packed ue8m0 int32), to compare bit for bit."""
    if case.fp8:
        return oracle.fp8_quantize(x, round_scale=case.round_scale, use_ue8m0=case.ue8m0)
    return x, None


def received_f32(case: LLCase, recv, rows: slice | torch.Tensor, e: int) -> torch.Tensor:
    """float32 values of rows of local expert e of a dispatch result (dequantised for fp8)."""
    from ep_comm.core import fp8
    if case.fp8:
        q, s = recv
        return fp8.dequantize(q[e, rows], s[e, rows])
    return recv[e, rows].float()


def make_buffer(ctx, case: LLCase):
    import ep_comm
    hint = ep_comm.Buffer.get_low_latency_rdma_size_hint(case.max_tokens, case.hidden,
                                                         ctx.world_size, case.num_experts)
    return ep_comm.Buffer(ctx.group, num_rdma_bytes=hint, low_latency_mode=True,
                          allow_nvlink_for_low_latency_mode=case.nvlink, backend=case.backend,
                          explicitly_destroy=True)


def check_status(buf) -> None:
    """Raise a pending kernel error (kernels backend; the reference raises in the call)."""
    ll = getattr(buf.backend, "ll", None)
    if ll is not None and hasattr(ll, "check_status"):
        ll.check_status()


# ------------------------------------------------------------------------------ checks
def check_dispatch(ctx, case: LLCase, recv, recv_count, handle, inputs, masked=()):
    """Compare one dispatch result of rank ``ctx.rank`` with the oracle (see module doc)."""
    me, r = ctx.rank, ctx.world_size
    e_n, m, h = case.num_experts, case.max_tokens, case.hidden
    local = e_n // r
    sent = [sent_values(case, x) for x, _, _ in inputs]
    want = oracle.low_latency_dispatch(me, [p for p, _ in sent], [i for _, i, _ in inputs],
                                       e_n, masked)
    want_s = None
    if case.fp8:
        want_s = oracle.low_latency_dispatch(me, [s for _, s in sent], [i for _, i, _ in inputs],
                                             e_n, masked)
    recv_x = recv[0] if case.fp8 else recv
    dtype = torch.float8_e4m3fn if case.fp8 else torch.bfloat16
    assert recv_x.dtype == dtype and recv_x.shape == (local, r * m, h), (recv_x.dtype, recv_x.shape)
    if case.fp8:
        scales = recv[1]
        g = h // 512 if case.ue8m0 else h // 128
        sdtype = torch.int32 if case.ue8m0 else torch.float32
        assert scales.dtype == sdtype and scales.shape == (local, r * m, g), scales.shape
        assert scales.stride() == (g * r * m, 1, r * m), f"scales not column-major: {scales.stride()}"
    assert recv_count.dtype == torch.int32 and recv_count.shape == (local,)
    counts = recv_count.cpu().tolist()
    begin = handle.range_begin.cpu()
    count = handle.range_count.cpu()
    src_info = handle.src_info.cpu()
    assert handle.range_begin.shape == (local, r) and handle.range_count.shape == (local, r)
    assert src_info.shape == (local, r * m) and src_info.dtype == torch.int32
    recv_cpu = recv_x.cpu()
    scales_cpu = recv[1].cpu() if case.fp8 else None
    for e in range(local):
        covered = torch.zeros(r * m, dtype=torch.int32)
        total = 0
        for s in range(r):
            b, c = int(begin[e, s]), int(count[e, s])
            rows = want.get((e, s), [])
            assert c == len(rows), f"expert {e} source {s}: count {c}, want {len(rows)}"
            total += c
            if c == 0:
                continue
            assert 0 <= b and b + c <= counts[e], f"expert {e} source {s}: range {b}+{c} " \
                                                  f"outside recv_count {counts[e]}"
            covered[b:b + c] += 1
            toks = [t for t, _ in rows]
            assert src_info[e, b:b + c].tolist() == toks, \
                f"expert {e} source {s}: token order {src_info[e, b:b + c].tolist()} != {toks}"
            want_rows = torch.stack([row for _, row in rows])
            got = recv_cpu[e, b:b + c]
            if case.fp8:
                assert torch.equal(got.view(torch.uint8), want_rows.view(torch.uint8)), \
                    f"expert {e} source {s}: fp8 payload differs"
                want_sc = torch.stack([sc for _, sc in want_s[(e, s)]])
                assert torch.equal(scales_cpu[e, b:b + c], want_sc), \
                    f"expert {e} source {s}: fp8 scales differ"
            else:
                assert torch.equal(got, want_rows), f"expert {e} source {s}: rows differ"
        assert counts[e] == total, f"expert {e}: recv_count {counts[e]}, want {total}"
        assert bool((covered[:total] == 1).all()) and bool((covered[total:] == 0).all()), \
            f"expert {e}: ranges do not tile [0, {total})"
        assert bool((src_info[e, total:] == -1).all()), f"expert {e}: src_info past count != -1"
    return want


def expert_outputs(case: LLCase, recv, recv_count, dev, rank, num_ranks):
    """[L, R * M, H] bf16 expert outputs of every valid row, NaN poison past the counts."""
    local = case.num_experts // num_ranks
    y = torch.full((local, num_ranks * case.max_tokens, case.hidden), NAN,
                   dtype=torch.bfloat16, device=dev)
    counts = recv_count.cpu().tolist()
    for e in range(local):
        n = counts[e]
        if n:
            y[e, :n] = expert_fn(received_f32(case, recv, slice(0, n), e), rank * local + e)
    return y


def expected_combine(case: LLCase, me: int, inputs, num_ranks, masked=()):
    """float64 [T, H] oracle combine for rank ``me`` given every rank's inputs."""
    local = case.num_experts // num_ranks
    x, idx, w = inputs[me]
    q, s = sent_values(case, x)
    if case.fp8:
        vals = oracle.fp8_dequantize(q, s).float()
    else:
        vals = x.float()

    def out(r, e, t):
        return expert_fn(vals[t:t + 1], r * local + e)[0]

    rows = oracle.low_latency_combine(me, idx, w, out, case.num_experts, num_ranks, masked)
    res = torch.zeros(x.shape[0], case.hidden, dtype=torch.float64)
    mag = torch.zeros(x.shape[0], case.hidden, dtype=torch.float64)
    for t, row in enumerate(rows):
        if row is not None:
            res[t] = row
    # Sum of |terms| bounds the float32 accumulation error under cancellation.
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            g = int(idx[t, k])
            if g < 0 or (oracle.owner(g, case.num_experts, num_ranks) in masked
                         and oracle.owner(g, case.num_experts, num_ranks) != me):
                continue
            mag[t] += (out(g // local, g % local, t).double() * float(w[t, k])).abs()
    return res, mag


def assert_combined(got: torch.Tensor, expect: torch.Tensor, mag: torch.Tensor, what: str):
    got = got.cpu()
    assert got.dtype == torch.bfloat16 and got.shape == expect.shape, (got.dtype, got.shape)
    assert not torch.isnan(got).any(), f"{what}: NaN in the result (poisoned rows leaked?)"
    err = (got.double() - expect).abs()
    tol = expect.abs() * 2 ** -8 + mag * 2 ** -20 + 1e-30
    bad = err > tol
    assert not bad.any(), f"{what}: off by up to {err.max():.3g} at {bad.nonzero()[:4].tolist()}"


# ------------------------------------------------------------------------------ rounds
def _dispatch(buf, case: LLCase, x, idx, stats=None):
    cum, wait = stats if stats is not None else (None, None)
    recv, count, handle, event, hook = buf.low_latency_dispatch(
        x, idx, case.max_tokens, case.num_experts, cumulative_local_expert_recv_stats=cum,
        dispatch_wait_recv_cost_stats=wait, use_fp8=case.fp8, round_scale=case.round_scale,
        use_ue8m0=case.ue8m0, return_recv_hook=case.hook)
    assert (hook is not None) == case.hook
    return recv, count, handle, hook


def _combine(buf, case: LLCase, y, idx, w, handle, dev, wait_stats=None):
    out = None
    if case.use_out:
        out = torch.full((idx.shape[0], case.hidden), NAN, dtype=torch.bfloat16, device=dev)
    src = y
    if case.zero_copy:
        zbuf = buf.get_next_low_latency_combine_buffer(handle)
        assert zbuf.shape == y.shape and zbuf.dtype == torch.bfloat16, (zbuf.shape, zbuf.dtype)
        zbuf.copy_(y)
        src = zbuf
    combined, event, hook = buf.low_latency_combine(
        src, idx, w, handle, zero_copy=case.zero_copy, return_recv_hook=case.hook, out=out,
        combine_wait_recv_cost_stats=wait_stats)
    assert (hook is not None) == case.hook
    if hook is not None:
        hook()
    if out is not None:
        assert combined.data_ptr() == out.data_ptr(), "combine did not write into out="
    return combined


def one_round(ctx, buf, case: LLCase, step: int, masked=(), stats=None):
    """One checked dispatch + combine; returns the recv counts."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    inputs = [make_inputs(case, s, r, step) for s in range(r)]
    x, idx, w = (t.to(dev) for t in inputs[me])
    recv, count, handle, hook = _dispatch(buf, case, x, idx, stats)
    if hook is not None:
        hook()
    check_dispatch(ctx, case, recv, count, handle, inputs, masked)
    y = expert_outputs(case, recv, count, dev, me, r)
    combined = _combine(buf, case, y, idx, w, handle, dev, stats[1] if stats else None)
    expect, mag = expected_combine(case, me, inputs, r, masked)
    assert_combined(combined, expect, mag, f"combine step {step}")
    return count.cpu()


# ------------------------------------------------------------------------------ tasks
def task_ll_rounds(ctx, case: LLCase):
    """``case.iterations`` dispatch + combine rounds with fresh data on one Buffer (exercises
    both halves of the double buffer and the reuse of every signal)."""
    buf = make_buffer(ctx, case)
    r = ctx.world_size
    local = case.num_experts // r
    stats = None
    if case.stats:
        stats = (torch.zeros(local, dtype=torch.int32, device=ctx.device),
                 torch.zeros(r, dtype=torch.int64, device=ctx.device))
    total = torch.zeros(local, dtype=torch.int32)
    try:
        for step in range(case.iterations):
            total += one_round(ctx, buf, case, step, stats=stats)
        if stats is not None:
            assert stats[0].cpu().tolist() == total.tolist(), \
                f"cumulative recv stats {stats[0].cpu().tolist()} != {total.tolist()}"
            assert bool((stats[1].cpu() >= 0).all()), f"wait-cost stats {stats[1].cpu().tolist()}"
    finally:
        buf.destroy()


def task_ll_two_alive(ctx, case: LLCase):
    """Two dispatches in flight (hook mode: both sends first, then both receives), both results
    alive and checked, then both combines."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    buf = make_buffer(ctx, case)
    try:
        ins = [[make_inputs(case, s, r, step) for s in range(r)] for step in (0, 1)]
        mine = [[t.to(dev) for t in ins[step][me]] for step in (0, 1)]
        a = _dispatch(buf, case, mine[0][0], mine[0][1])
        b = _dispatch(buf, case, mine[1][0], mine[1][1])
        assert a[2].buffer_idx != b[2].buffer_idx, "two live results share a buffer half"
        for res in (a, b):
            if res[3] is not None:
                res[3]()
        ys = []
        for step, (recv, count, handle, _) in enumerate((a, b)):
            check_dispatch(ctx, case, recv, count, handle, ins[step])
            ys.append(expert_outputs(case, recv, count, dev, me, r))
        for step, (recv, count, handle, _) in enumerate((a, b)):
            x, idx, w = mine[step]
            combined = _combine(buf, case, ys[step], idx, w, handle, dev)
            expect, mag = expected_combine(case, me, ins[step], r)
            assert_combined(combined, expect, mag, f"combine of live result {step}")
    finally:
        buf.destroy()


def task_ll_peer_two_sends_ahead(ctx, case: LLCase, late: int, delay_s: float = 1.0):
    """Receive hooks, one rank two sends ahead of a peer's receive (docs/faults.md, the race the
    acknowledged reuse of a half closes): every rank sends D0 and D1; the ranks other than
    ``late`` then receive D0 and send D2 into half 0 at once, while ``late`` waits ``delay_s``
    (its GPU idle) before it receives D0. D2 must not land before ``late`` has read D0: D0,
    D1 and D2 are checked exactly on every rank, then D1's and D2's combines (the two results
    alive). Returns "ok"."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    case = dataclasses.replace(case, hook=True)
    buf = make_buffer(ctx, case)
    try:
        ins = [[make_inputs(case, s, r, 70 + step) for s in range(r)] for step in range(3)]
        mine = [[t.to(dev) for t in ins[step][me]] for step in range(3)]
        res = [_dispatch(buf, case, mine[0][0], mine[0][1]),
               _dispatch(buf, case, mine[1][0], mine[1][1])]
        if me == late:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            time.sleep(delay_s)
        res[0][3]()
        check_dispatch(ctx, case, *res[0][:3], ins[0])
        res.append(_dispatch(buf, case, mine[2][0], mine[2][1]))
        assert res[2][2].buffer_idx == res[0][2].buffer_idx
        for step in (1, 2):
            res[step][3]()
            check_dispatch(ctx, case, *res[step][:3], ins[step])
        for step in (1, 2):
            recv, count, handle, _ = res[step]
            _, idx, w = mine[step]
            y = expert_outputs(case, recv, count, dev, me, r)
            combined = _combine(buf, dataclasses.replace(case, hook=False), y, idx, w, handle,
                                dev)
            expect, mag = expected_combine(case, me, ins[step], r)
            assert_combined(combined, expect, mag, f"combine of D{step}")
        check_status(buf)
        return "ok"
    finally:
        buf.destroy()


def task_ll_shape_changes(ctx, case: LLCase, shapes):
    """Rounds on one Buffer (sized for the largest of ``shapes``) whose (M, hidden) change from
    call to call, hook mode included: the two live halves of consecutive shapes must never
    overlap. ``shapes``: [(max_tokens, num_tokens, hidden)]; each round is checked exactly."""
    import ep_comm
    hint = max(ep_comm.Buffer.get_low_latency_rdma_size_hint(m, h, ctx.world_size,
                                                             case.num_experts)
               for m, _, h in shapes)
    buf = ep_comm.Buffer(ctx.group, num_rdma_bytes=hint, low_latency_mode=True,
                         allow_nvlink_for_low_latency_mode=case.nvlink, backend=case.backend,
                         explicitly_destroy=True)
    try:
        for step, (m, t, h) in enumerate(shapes):
            c = dataclasses.replace(case, max_tokens=m, num_tokens=t, hidden=h,
                                    seed=case.seed + step)
            one_round(ctx, buf, c, step)
        # two results alive, of two shapes (hook mode: both sends, then both receives)
        (m0, t0, h0), (m1, t1, h1) = shapes[0], shapes[1]
        cases = [dataclasses.replace(case, max_tokens=m0, num_tokens=t0, hidden=h0, hook=True),
                 dataclasses.replace(case, max_tokens=m1, num_tokens=t1, hidden=h1, hook=True)]
        r, me = ctx.world_size, ctx.rank
        ins = [[make_inputs(c, s, r, 50 + i) for s in range(r)] for i, c in enumerate(cases)]
        res = []
        for i, c in enumerate(cases):
            x, idx, _ = (t.to(ctx.device) for t in ins[i][me])
            res.append(_dispatch(buf, c, x, idx))
        for i, c in enumerate(cases):
            recv, count, handle, hook = res[i]
            hook()
            check_dispatch(ctx, c, recv, count, handle, ins[i])
        for i, c in enumerate(cases):
            recv, count, handle, _ = res[i]
            x, idx, w = (t.to(ctx.device) for t in ins[i][me])
            y = expert_outputs(c, recv, count, ctx.device, me, r)
            combined = _combine(buf, c, y, idx, w, handle, ctx.device)
            expect, mag = expected_combine(c, me, ins[i], r)
            assert_combined(combined, expect, mag, f"combine of live shape {i}")
        return "ok"
    finally:
        buf.destroy()


def task_ll_masked(ctx, case: LLCase, stopper: int):
    """All ranks run a round; then ``stopper`` stops calling. The others mask it and must still
    finish, with the oracle's answer for a world without it."""
    buf = make_buffer(ctx, case)
    try:
        one_round(ctx, buf, case, 0)
        if ctx.rank == stopper:
            return "stopped"
        buf.low_latency_update_mask_buffer(stopper, True)
        status = torch.zeros(ctx.world_size, dtype=torch.int32, device=ctx.device)
        buf.low_latency_query_mask_buffer(status)
        assert status.cpu().tolist() == [int(s == stopper) for s in range(ctx.world_size)]
        for step in (1, 2, 3):
            one_round(ctx, buf, case, step, masked=(stopper,))
        buf.low_latency_clean_mask_buffer()
        buf.low_latency_query_mask_buffer(status)
        assert status.cpu().tolist() == [0] * ctx.world_size
        # Unmasked, the stopper may have left signal words: refused until a clean (local, so
        # the survivors raise without waiting for anyone).
        from ep_comm.errors import InputError
        x, idx, _ = (t.to(ctx.device) for t in make_inputs(case, ctx.rank, ctx.world_size, 4))
        try:
            _dispatch(buf, case, x, idx)
        except InputError as e:
            assert f"[{stopper}]" in str(e) and "clean_low_latency_buffer" in str(e), e
        else:
            raise AssertionError("a low-latency call after unmasking ran without a clean")
        return "ok"
    finally:
        buf.destroy()


def task_ll_skip_dispatch(ctx, case: LLCase, skipper: int):
    """A rank skips a low-latency dispatch: the others raise CommTimeoutError naming their rank,
    the phase and the peer they waited for (the skipper), within about EP_COMM_TIMEOUT_S (the
    kernels report through their status word: at the next call, the hook, or an explicit
    check)."""
    from ep_comm.errors import CommTimeoutError
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    buf = make_buffer(ctx, case)
    try:
        x, idx, _ = (t.to(dev) for t in make_inputs(case, me, r))
        if me == skipper:
            return "skipped"
        t0 = time.monotonic()
        err = None
        try:
            _, _, _, hook = _dispatch(buf, case, x, idx)
            if hook is not None:
                hook()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            check_status(buf)
        except CommTimeoutError as e:
            err = e
        elapsed = time.monotonic() - t0
        assert err is not None, "no CommTimeoutError although a rank skipped the dispatch"
        assert err.rank == me and err.phase.startswith("low_latency_dispatch"), str(err)
        assert f"rank {me}" in str(err) and "doctor" in str(err), str(err)
        assert err.peer == skipper and f"from rank {skipper}" in str(err), \
            f"the error does not name the peer that never called (rank {skipper}): {err}"
        return elapsed
    finally:
        buf.destroy()


def task_ll_graph(ctx, case: LLCase, replays: int = 3):
    """Dispatch + expert function + combine captured in one CUDA graph, replayed with new data
    copied into the captured inputs; every replay checked against the oracle."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    m, h, k = case.max_tokens, case.hidden, case.num_topk
    local = case.num_experts // r
    # A graph has fixed shapes: every rank uses the same token count at every replay.
    fixed = dataclasses.replace(case, ragged=0)
    buf = make_buffer(ctx, fixed)
    try:
        ins0 = [make_inputs(fixed, s, r, 0) for s in range(r)]
        x_s, idx_s, w_s = (t.to(dev).clone() for t in ins0[me])

        def step():
            recv, count, handle, hook = _dispatch(buf, fixed, x_s, idx_s)
            if hook is not None:
                hook()
            # Expert outputs for every row (padding rows too: a graph cannot read counts).
            rows = recv[0] if fixed.fp8 else recv
            from ep_comm.core import fp8
            vals = fp8.dequantize(recv[0], recv[1]) if fixed.fp8 else rows.float()
            y = torch.empty(local, r * m, h, dtype=torch.bfloat16, device=dev)
            for e in range(local):
                y[e] = expert_fn(vals[e], me * local + e)
            out = _combine(buf, fixed, y, idx_s, w_s, handle, dev)
            return recv, count, handle, out

        step()  # warm-up: compiles and loads kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            recv, count, handle, out = step()
        for rep in range(1, replays + 1):
            ins = [make_inputs(fixed, s, r, rep) for s in range(r)]
            x, idx, w = ins[me]
            x_s.copy_(x)
            idx_s.copy_(idx)
            w_s.copy_(w)
            graph.replay()
            torch.cuda.synchronize()
            check_status(buf)
            check_dispatch(ctx, fixed, recv, count, handle, ins)
            expect, mag = expected_combine(fixed, me, ins, r)
            assert_combined(out, expect, mag, f"graph replay {rep}")
    finally:
        buf.destroy()


def task_ll_wait_cost_stats(ctx, case: LLCase, late: int, delay_s: float = 0.4):
    """Rank ``late`` calls dispatch, then combine, ``delay_s`` after the others: every other
    rank's ``dispatch_wait_recv_cost_stats[late]`` and ``combine_wait_recv_cost_stats[late]``
    grow by at least half the delay (nanoseconds), and results
    stay right; the late rank is the longest wait. A no-op implementation (stats never added
    to) fails."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    import torch.distributed as dist
    buf = make_buffer(ctx, case)
    try:
        inputs = [make_inputs(case, s, r) for s in range(r)]
        x, idx, w = (t.to(dev) for t in inputs[me])
        d_stats = torch.zeros(r, dtype=torch.int64, device=dev)
        c_stats = torch.zeros(r, dtype=torch.int64, device=dev)
        local = case.num_experts // r
        cum = torch.zeros(local, dtype=torch.int32, device=dev)
        one = dataclasses.replace(case, hook=False, zero_copy=False, use_out=False)
        dist.barrier(group=ctx.group)
        if me == late:
            time.sleep(delay_s)
        recv, count, handle, _ = _dispatch(buf, one, x, idx, (cum, d_stats))
        check_dispatch(ctx, one, recv, count, handle, inputs)
        y = expert_outputs(one, recv, count, dev, me, r)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dist.barrier(group=ctx.group)
        if me == late:
            time.sleep(delay_s)
        combined = _combine(buf, one, y, idx, w, handle, dev, c_stats)
        expect, mag = expected_combine(one, me, inputs, r)
        assert_combined(combined, expect, mag, "combine with wait-cost stats")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        d, c = d_stats.cpu().tolist(), c_stats.cpu().tolist()
        assert cum.cpu().tolist() == count.cpu().tolist()
        assert min(d + c) >= 0, (d, c)
        if me != late:
            floor = int(delay_s * 0.5e9)
            for name, s in (("dispatch", d), ("combine", c)):
                assert s[late] >= floor, \
                    f"rank {me}: {name} wait cost for late rank {late} is {s[late]} ns < {floor}"
                assert s[late] == max(s), f"rank {me}: {name} stats {s}: late rank {late} is " \
                                          f"not the longest wait"
        return d, c
    finally:
        buf.destroy()
