"""Test scenarios run on every rank: inputs from seeds, the backend's answer, the oracle's answer.

Each task takes a ``RankContext`` (see multiproc.py) and a ``Case``, regenerates the inputs of
all ranks from the case's seed, runs ep_comm on its own inputs, and asserts against the oracle.
The same tasks run on CPU (gloo, reference backend) and on GPUs (NCCL; kernels or reference).
"""
from __future__ import annotations

import dataclasses

import torch

import oracle

POISON_BF16 = float("nan")


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int = 0
    num_tokens: int = 24          # tokens on rank r: num_tokens + r * ragged (see tokens_of)
    ragged: int = 3
    hidden: int = 256
    num_experts: int = 16
    num_topk: int = 4
    drop: float = 0.1             # probability of a -1 top-k entry
    routing: str = "random"       # random | to_rank0 | skip_last_rank | empty_rank1 | one_token
    dups: bool = False            # duplicate ids in rows, -1 at every slot, rows routed nowhere
    fp8: bool = False
    alignment: int = 1
    worst: int = 0                # num_worst_tokens (0 = off)
    backend: str = "reference"
    ranks_per_node: int | None = None
    with_bias: bool = False
    async_mode: bool = False      # previous_event + async_finish + allocate_on_comm_stream


def tokens_of(case: Case, rank: int) -> int:
    if case.routing == "empty_rank1" and rank == 1:
        return 0
    if case.routing == "one_token":
        return 1
    return case.num_tokens + rank * case.ragged


def make_inputs(case: Case, rank: int, num_ranks: int):
    """(x bf16 [T, H], topk_idx int64 [T, K], topk_weights float32 [T, K]) of ``rank``, on CPU."""
    g = torch.Generator().manual_seed(case.seed * 1000 + rank)
    t, h, e, k = tokens_of(case, rank), case.hidden, case.num_experts, case.num_topk
    x = (torch.randn(t, h, generator=g) * (1 + torch.rand(t, 1, generator=g) * 4)).to(torch.bfloat16)
    per_rank = e // num_ranks
    if case.routing == "to_rank0":
        pool = list(range(per_rank))
    elif case.routing == "skip_last_rank":
        pool = list(range(e - per_rank))
    else:
        pool = list(range(e))
    pool_t = torch.tensor(pool)
    idx = torch.empty(t, k, dtype=torch.int64)
    for i in range(t):
        perm = torch.randperm(len(pool), generator=g)[:k]
        row = pool_t[perm]
        if len(row) < k:
            row = torch.cat([row, torch.full((k - len(row),), -1, dtype=torch.int64)])
        idx[i] = row
    idx[torch.rand(t, k, generator=g) < case.drop] = -1
    if case.dups:
        add_duplicates_and_holes(idx, g)
    w = torch.rand(t, k, generator=g).float() + 0.1
    return x, idx, w


def add_duplicates_and_holes(idx: torch.Tensor, g: torch.Generator) -> None:
    """In place on ``idx [T, K]``: every other row repeats one of its ids in another slot (some
    rows name one expert three times), -1 lands in every slot position somewhere, and every
    fifth row is all -1 (a token routed to no rank)."""
    t, k = idx.shape
    for i in range(t):
        if i % 5 == 4:
            idx[i] = -1
        elif k > 1 and i % 2 == 0:
            a, b = torch.randperm(k, generator=g)[:2].tolist()
            idx[i, b] = idx[i, a]
            if k > 2 and i % 6 == 0:
                idx[i, (b + 1) % k if (b + 1) % k != a else (b + 2) % k] = idx[i, a]
        elif i % 2 == 1:
            idx[i, (i // 2) % k] = -1


def all_inputs(case: Case, num_ranks: int):
    return [make_inputs(case, r, num_ranks) for r in range(num_ranks)]


def make_buffer(ctx, case: Case, low_latency_max_tokens: int = 0, hidden: int | None = None,
                **kw):
    import ep_comm
    hidden = hidden or case.hidden
    r = ctx.world_size
    cfg = ep_comm.Buffer.get_dispatch_config(r)
    nvl = cfg.get_nvl_buffer_size_hint(hidden * 2, r)
    rdma = cfg.get_rdma_buffer_size_hint(hidden * 2, r, ranks_per_node=case.ranks_per_node or r)
    if low_latency_max_tokens:
        rdma = max(rdma, ep_comm.Buffer.get_low_latency_rdma_size_hint(
            low_latency_max_tokens, hidden, r, case.num_experts))
    return ep_comm.Buffer(ctx.group, num_nvl_bytes=nvl, num_rdma_bytes=rdma,
                          low_latency_mode=bool(low_latency_max_tokens), backend=case.backend,
                          ranks_per_node=case.ranks_per_node, explicitly_destroy=True, **kw)


def fp8_cast(x):
    from ep_comm.core import fp8
    return fp8.per_token_cast_to_fp8(x)


# --------------------------------------------------------------------- normal mode tasks
def task_layout(ctx, case: Case):
    inputs = all_inputs(case, ctx.world_size)
    buf = make_buffer(ctx, case)
    _, idx, _ = inputs[ctx.rank]
    rpn = case.ranks_per_node or ctx.world_size
    # The rows again as 600 tokens (several blocks of the layout kernel), then the first call
    # again: the kernel's scratch must be back to zero after every call.
    big = idx.repeat(-(-600 // max(1, idx.shape[0])), 1)[:600]
    for ids in (idx, big, idx):
        per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(
            ids.to(ctx.device), case.num_experts)
        want = oracle.layout(ids, case.num_experts, ctx.world_size, rpn)
        assert per_rank.dtype == torch.int32 and per_rank.tolist() == want[0]
        if want[1] is None:
            assert per_node is None
        else:
            assert per_node.dtype == torch.int32 and per_node.tolist() == want[1]
        assert per_expert.dtype == torch.int32 and per_expert.tolist() == want[2]
        assert in_rank.dtype == torch.bool and in_rank.cpu().tolist() == want[3]
    buf.destroy()


def _recv_src(case: Case, num_ranks: int, dst: int, inputs):
    xs = [x for x, _, _ in inputs]
    return oracle.dispatch(dst, xs, [i for _, i, _ in inputs], None, case.num_experts)["src"]


def task_dispatch_combine(ctx, case: Case):
    """Fresh dispatch, cached dispatch, combine (with bias and weights) against the oracle."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    inputs = all_inputs(case, r)
    x, idx, w = (t.to(dev) for t in inputs[me])
    buf = make_buffer(ctx, case)
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, case.num_experts)
    send = fp8_cast(x) if case.fp8 else x
    stream_args = {}
    if case.async_mode:
        stream_args = dict(previous_event=buf.capture(), async_finish=True,
                           allocate_on_comm_stream=True)
    recv, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        send, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
        expert_alignment=case.alignment, num_worst_tokens=case.worst, **stream_args)
    import ep_comm
    assert isinstance(event, ep_comm.EventOverlap)
    if case.async_mode:
        with event:  # overlapped region; on exit the current stream waits for the dispatch
            pass

    xs = [i[0] for i in inputs]
    want = oracle.dispatch(me, xs, [i[1] for i in inputs], [i[2] for i in inputs],
                           case.num_experts, case.alignment)
    n = len(want["rows"])
    rows = case.worst if case.worst else n
    recv_x = recv[0] if case.fp8 else recv
    assert recv_x.shape == (rows, case.hidden), (recv_x.shape, rows)
    if case.fp8:
        _assert_fp8_rows(recv, n, me, xs, inputs, case, "dispatch")
    elif n:
        assert torch.equal(recv_x[:n].cpu(), torch.stack(want["rows"])), "recv_x differs"
    assert recv_idx.shape == (rows, case.num_topk) and recv_idx.dtype == torch.int64
    assert recv_idx[:n].cpu().tolist() == want["topk"]
    assert recv_w[:n].cpu().tolist() == want["weights"]
    if case.worst:
        assert counts == []
        assert (recv_idx[n:] == -1).all()
    else:
        assert counts == want["aligned"], (counts, want["aligned"])
    assert handle.num_recv_tokens == n
    assert handle.recv_src_rank[:n].cpu().tolist() == [s for s, _ in want["src"]]
    assert handle.recv_src_idx[:n].cpu().tolist() == [t for _, t in want["src"]]
    assert handle.num_recv_tokens_per_expert.cpu().tolist() == want["counts"]

    # Cached dispatch: new data, same routes, no layout arguments.
    x2 = (x.float() * -2 + 1).to(torch.bfloat16)
    recv2, i2, w2, _, handle2, _ = buf.dispatch(fp8_cast(x2) if case.fp8 else x2, handle=handle)
    assert i2 is None and w2 is None and handle2 is handle
    want2 = [((xx.float() * -2 + 1).to(torch.bfloat16)) for xx in xs]
    rows2 = oracle.dispatch(me, want2, [i[1] for i in inputs], None, case.num_experts)["rows"]
    if case.fp8:
        _assert_fp8_rows(recv2, n, me, want2, inputs, case, "cached dispatch")
    elif n:
        assert torch.equal(recv2[:n].cpu(), torch.stack(rows2)), "cached dispatch differs"

    # Combine: every rank returns a function of the rows it received (and its rank), so the
    # sum at the source is checkable; padding rows carry poison that must not leak back.
    recv_f = recv_x.float() if not case.fp8 else dequant_rows(recv)
    y = torch.full((rows, case.hidden), POISON_BF16, dtype=torch.bfloat16, device=dev)
    y[:n] = (recv_f[:n] * (me + 1) + 0.5).to(torch.bfloat16)
    yw = torch.full((rows, case.num_topk), float("nan"), device=dev)
    yw[:n] = recv_w[:n] * (me + 2)
    bias = None
    if case.with_bias:
        g = torch.Generator().manual_seed(case.seed + 77 + me)
        bias = (torch.randn(x.shape, generator=g).to(torch.bfloat16).to(dev),
                torch.randn(x.shape, generator=g).to(torch.bfloat16).to(dev))
    combined, combined_w, event = buf.combine(y, handle, topk_weights=yw, bias=bias,
                                              **stream_args and dict(
                                                  previous_event=buf.capture(), async_finish=True))
    event.current_stream_wait()
    assert combined.dtype == torch.bfloat16 and combined.shape == x.shape

    # Expected: for each rank r that received our token t, its row (computed in float64 from
    # the same received values) - written with the oracle's source lists of every rank.
    srcs = [_recv_src(case, r, d, inputs) for d in range(r)]
    def rows_of(d):
        got = oracle.dispatch(d, xs if not case.fp8 else
                              [oracle.fp8_dequantize(*oracle.fp8_quantize(xx)).float() for xx in xs],
                              [i[1] for i in inputs], [i[2] for i in inputs], case.num_experts)
        if not got["rows"]:
            return torch.zeros(0, case.hidden)
        return (torch.stack(got["rows"]).float() * (d + 1) + 0.5).to(torch.bfloat16)
    expect = oracle.combine(me, x.shape[0], srcs, [rows_of(d) for d in range(r)],
                            None if bias is None else [b.cpu() for b in bias])
    _assert_bf16_sum(combined.cpu(), expect, terms=r + 2)
    want_w = torch.zeros(x.shape[0], case.num_topk, dtype=torch.float64)
    for d in range(r):
        for s, t in srcs[d]:
            if s == me:
                want_w[t] += w[t].double().cpu() * (d + 2)
    assert torch.allclose(combined_w.cpu().double(), want_w, rtol=1e-6, atol=1e-6)
    buf.destroy()


def _assert_fp8_rows(recv, n, me, xs, inputs, case: Case, what: str) -> None:
    """The fp8 tuple rank ``me`` received equals, bit for bit, the independent oracle's cast of
    the rows it should receive (codes and float32 scales): the cast and the copy both checked."""
    q_want = [oracle.fp8_quantize(xx) for xx in xs]
    idxs = [i[1] for i in inputs]
    wq = oracle.dispatch(me, [q for q, _ in q_want], idxs, None, case.num_experts)["rows"]
    ws = oracle.dispatch(me, [s for _, s in q_want], idxs, None, case.num_experts)["rows"]
    assert recv[0].dtype == torch.float8_e4m3fn and recv[1].dtype == torch.float32
    assert recv[1].shape == (recv[0].shape[0], case.hidden // oracle.SCALE_BLOCK)
    if n:
        assert torch.equal(oracle.fp8_codes(recv[0][:n].cpu()), torch.stack(wq)), \
            f"{what}: fp8 payload differs from the oracle's cast"
        assert torch.equal(recv[1][:n].cpu(), torch.stack(ws)), \
            f"{what}: fp8 scales differ from the oracle's"


def dequant_rows(recv):
    from ep_comm.core import fp8
    return fp8.dequantize(*recv) if isinstance(recv, tuple) else recv.float()


def _assert_bf16_sum(got: torch.Tensor, expect: torch.Tensor, terms: int):
    """bf16 result of a float32 sum of ``terms`` bf16 values: within one bf16 rounding of the
    exact sum, plus float32 accumulation error (negligible at these sizes)."""
    assert not torch.isnan(got).any(), "combine output has NaN (poisoned padding rows leaked?)"
    err = (got.double() - expect).abs()
    tol = expect.abs() * 2 ** -8 + 1e-6 * terms
    bad = err > tol
    assert not bad.any(), f"combine off by up to {err.max():.3g} at {bad.nonzero()[:4].tolist()}"


def task_dispatch_without_topk(ctx, case: Case):
    """dispatch with the layout but no topk_idx / topk_weights: the same rows arrive (in the
    contract's order), no top-k outputs, counts from num_tokens_per_expert; combine still sums."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    inputs = all_inputs(case, r)
    x, idx, _ = (t.to(dev) for t in inputs[me])
    buf = make_buffer(ctx, case)
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, case.num_experts)
    send = fp8_cast(x) if case.fp8 else x
    recv, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        send, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    xs = [i[0] for i in inputs]
    want = oracle.dispatch(me, xs, [i[1] for i in inputs], None, case.num_experts)
    n = len(want["rows"])
    assert recv_idx is None and recv_w is None, (type(recv_idx), type(recv_w))
    assert handle.num_recv_tokens == n
    assert counts == want["aligned"], (counts, want["aligned"])
    if case.fp8:
        _assert_fp8_rows(recv, n, me, xs, inputs, case, "dispatch without top-k")
    elif n:
        assert torch.equal(recv[:n].cpu(), torch.stack(want["rows"])), "recv_x differs"
    assert handle.recv_src_rank[:n].cpu().tolist() == [s for s, _ in want["src"]]
    assert handle.recv_src_idx[:n].cpu().tolist() == [t for _, t in want["src"]]
    recv_f = dequant_rows(recv)[:n]
    combined, combined_w, _ = buf.combine(recv_f.to(torch.bfloat16), handle)
    assert combined_w is None
    srcs = [_recv_src(case, r, d, inputs) for d in range(r)]
    sent = [xx.float() if not case.fp8 else
            oracle.fp8_dequantize(*oracle.fp8_quantize(xx)).float() for xx in xs]
    rows = [oracle.dispatch(d, sent, [i[1] for i in inputs], None, case.num_experts)["rows"]
            for d in range(r)]
    ys = [torch.stack(rw).to(torch.bfloat16) if rw else torch.zeros(0, case.hidden)
          for rw in rows]
    _assert_bf16_sum(combined.cpu(), oracle.combine(me, x.shape[0], srcs, ys), terms=r)
    buf.destroy()


def task_worst_tokens_overflow(ctx, case: Case):
    """num_worst_tokens=1 while every rank receives more: every rank raises an ep_comm error
    that names num_worst_tokens and its rank (rows must never be dropped silently)."""
    import ep_comm
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    case = dataclasses.replace(case, routing="random", drop=0.0, num_tokens=max(case.num_tokens, 8))
    inputs = all_inputs(case, r)
    x, idx, w = (t.to(dev) for t in inputs[me])
    want = oracle.dispatch(me, [i[0] for i in inputs], [i[1] for i in inputs], None,
                           case.num_experts)
    assert len(want["rows"]) > 1, "the case must overflow num_worst_tokens=1 on every rank"
    buf = make_buffer(ctx, case)
    try:
        layout = buf.get_dispatch_layout(idx, case.num_experts)[:4]
        kw = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                  is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=idx,
                  topk_weights=w)
        outcome = "returned"
        try:
            recv = buf.dispatch(x, num_worst_tokens=1, **kw)[0]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            for name in ("normal", "ll"):  # the kernels report through a status word
                runtime = getattr(buf.backend, name, None)
                if runtime is not None and hasattr(runtime, "check_status"):
                    runtime.check_status()
        except ep_comm.EpCommError as e:
            assert "num_worst_tokens" in str(e) and f"rank {me}" in str(e), str(e)
            outcome = "raised"
        assert outcome == "raised", f"rank {me}: overflow not reported ({recv.shape[0]} rows)"
    finally:
        buf.destroy()
    return outcome
