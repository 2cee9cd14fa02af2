"""Fault scenarios run on every rank (issue 23): disagreeing, dying, stalling and skipping ranks.

Each task returns, per rank, a small dict (what it raised, how long it took, what it checked),
so the test in test_faults.py can assert on every rank at once. Results after recovery are
checked exactly against tests/oracle.py, with the lost rank's experts treated as -1.
"""
from __future__ import annotations

import os
import threading
import time

import torch

import oracle
from cases import Case, _assert_bf16_sum, all_inputs, fp8_cast, make_buffer
from low_latency_cases import LLCase, make_buffer as ll_make_buffer, one_round


def _timeout() -> float:
    return float(os.environ.get("EP_COMM_TIMEOUT_S", "10"))


def _outcome(fn) -> dict:
    """Run ``fn``; return what it raised (class name, message, attributes) and the time taken."""
    t0 = time.monotonic()
    try:
        fn()
        return {"error": None, "elapsed": time.monotonic() - t0}
    except Exception as e:  # noqa: BLE001 - the test asserts on the class and text
        return {"error": type(e).__name__, "message": str(e), "elapsed": time.monotonic() - t0,
                "field": getattr(e, "field", None), "odd": getattr(e, "odd_ranks", None),
                "peer": getattr(e, "peer", None), "peers": getattr(e, "peers", None)}


def _layout_and_dispatch(buf, x, idx, w, num_experts):
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                        topk_idx=idx, topk_weights=w)


# ------------------------------------------------------------------ exact normal-mode round
def normal_round(ctx, buf, case: Case, masked=(), rank_map=None) -> None:
    """One dispatch + combine on ``buf``, checked exactly against the oracle.

    ``masked``: ranks lost and masked (they send nothing; ids of their experts act as -1).
    ``rank_map``: for a Buffer over survivors, the survivors' original ranks (their inputs are
    those of the original ranks, renumbered 0..n-1).
    """
    n, me = buf.group_size, buf.rank
    base = all_inputs(case, max(rank_map) + 1 if rank_map else n)
    inputs = [base[r] for r in rank_map] if rank_map else base
    e, per = case.num_experts, case.num_experts // n
    eff = []
    for s, (x, idx, w) in enumerate(inputs):
        if s in masked:
            eff.append((x[:0], idx[:0], w[:0]))
            continue
        own = torch.div(idx, per, rounding_mode="floor")
        dead = torch.zeros_like(idx, dtype=torch.bool)
        for m in masked:
            dead |= (own == m) & (idx >= 0)
        eff.append((x, torch.where(dead, -1, idx), w))
    x, idx, w = (t.to(ctx.device) for t in inputs[me])
    recv, recv_idx, recv_w, counts, handle, _ = _layout_and_dispatch(buf, x, idx, w, e)
    xs, idxs, ws = [a for a, _, _ in eff], [b for _, b, _ in eff], [c for _, _, c in eff]
    want = oracle.dispatch(me, xs, idxs, ws, e)
    got_n = len(want["rows"])
    assert recv.shape[0] == got_n, (recv.shape, got_n)
    if got_n:
        assert torch.equal(recv.cpu(), torch.stack(want["rows"])), "recv_x differs"
    assert recv_idx.cpu().tolist() == want["topk"], "recv_topk_idx differs"
    assert recv_w.cpu().tolist() == want["weights"], "recv_topk_weights differs"
    assert counts == want["counts"], (counts, want["counts"])
    y = (recv.float() * (me + 1) + 0.5).to(torch.bfloat16)
    combined, _, _ = buf.combine(y, handle)
    srcs = [oracle.dispatch(d, xs, idxs, None, e)["src"] for d in range(n)]

    def rows_of(d):
        got = oracle.dispatch(d, xs, idxs, None, e)["rows"]
        return (torch.stack(got).float() * (d + 1) + 0.5).to(torch.bfloat16) if got else \
            torch.zeros(0, case.hidden)
    expect = oracle.combine(me, x.shape[0], srcs, [rows_of(d) for d in range(n)])
    _assert_bf16_sum(combined.cpu(), expect, terms=n + 1)


# ------------------------------------------------------------------ disagreements (no hang)
def task_disagree(ctx, kind: str, odd: int, backend: str = "reference") -> dict:
    """Rank ``odd`` disagrees with the rest on one thing; every rank must raise the same
    CollectiveMismatchError (or the input errors) before data moves, then the Buffer must still
    give exact results. (Kernels backend: a dispatch from a layout agrees in the NVLink notify
    kernel; the other calls need EP_COMM_CHECK_AGREEMENT=1.)"""
    case = Case(seed=5, num_experts=16, backend=backend)
    me, r = ctx.rank, ctx.world_size
    x, idx, w = (t.to(ctx.device) for t in all_inputs(case, r)[me])
    ll = LLCase(seed=6, num_experts=16, backend=backend)
    buf = ll_make_buffer(ctx, ll) if kind.startswith("ll_") else make_buffer(ctx, case)
    try:
        if kind == "hidden":
            xx = x[:, :128].contiguous() if me == odd else x
            res = _outcome(lambda: _layout_and_dispatch(buf, xx, idx, w, 16))
        elif kind == "num_experts":
            e = 8 if me == odd else 16
            res = _outcome(lambda: _layout_and_dispatch(buf, x, idx % e, w, e))
        elif kind == "topk":
            k = 2 if me == odd else 4
            res = _outcome(lambda: _layout_and_dispatch(buf, x, idx[:, :k].contiguous(),
                                                        w[:, :k].contiguous(), 16))
        elif kind == "dtype":
            xx = fp8_cast(x) if me == odd else x
            res = _outcome(lambda: _layout_and_dispatch(buf, xx, idx, w, 16))
        elif kind == "reorder":
            # Two calls of different hidden sizes, made in the other order by rank ``odd``.
            a, b = x, x[:, :128].contiguous()
            first, second = (b, a) if me == odd else (a, b)
            res = _outcome(lambda: (_layout_and_dispatch(buf, first, idx, w, 16),
                                    _layout_and_dispatch(buf, second, idx, w, 16)))
        elif kind == "skip":
            # Rank ``odd`` skips the second dispatch and goes on to combine the first one's
            # handle: its call #3 is a combine while the others' is a dispatch.
            recv, _, _, _, handle, _ = _layout_and_dispatch(buf, x, idx, w, 16)
            if me == odd:
                res = _outcome(lambda: buf.combine(recv, handle))
            else:
                res = _outcome(lambda: _layout_and_dispatch(buf, x, idx, w, 16))
        elif kind == "ll_hidden":
            h = 128 if me == odd else 256
            xx = x[:ll.max_tokens, :h].contiguous()
            res = _outcome(lambda: buf.low_latency_dispatch(
                xx, idx[:ll.max_tokens].contiguous(), ll.max_tokens, 16, use_fp8=False))
        elif kind == "ll_fp8":
            res = _outcome(lambda: buf.low_latency_dispatch(
                x[:ll.max_tokens].contiguous(), idx[:ll.max_tokens].contiguous(), ll.max_tokens,
                16, use_fp8=(me == odd)))
        else:
            raise ValueError(kind)
        # The Buffer is still usable and exact after the disagreement.
        return _exact_after(ctx, buf, kind.startswith("ll_"), ll, case, res)
    finally:
        buf.destroy()


def _exact_after(ctx, buf, low_latency: bool, ll, case, res: dict) -> dict:
    """One more round on ``buf`` (low-latency or normal), checked exactly: a fault that was
    named leaves the Buffer usable. Marks ``res["after"]`` and returns ``res``."""
    if low_latency:
        one_round(ctx, buf, ll, 0)
    else:
        normal_round(ctx, buf, case)
    res["after"] = "exact"
    return res


BAD_IDS = {"E": lambda e: e, "E+1": lambda e: e + 1, "E+5": lambda e: e + 5,
           "-2": lambda e: -2, "1000": lambda e: 1000}


def task_bad_ids(ctx, where: str, value: str, bad_rank: int | None,
                 backend: str = "reference") -> dict:
    """Expert id ``BAD_IDS[value](E)`` at token 3, column 1 of ``bad_rank`` (None: every rank); the
    bad rank(s) raise InputError naming token and value, the others PeerInputError naming the
    bad rank; then the Buffer gives exact results."""
    e = 16
    case = Case(seed=7, num_experts=e, backend=backend)
    ll = LLCase(seed=8, num_experts=e, backend=backend)
    me, r = ctx.rank, ctx.world_size
    x, idx, w = (t.to(ctx.device) for t in all_inputs(case, r)[me])
    bad_idx = idx.clone()
    if bad_rank is None or me == bad_rank:
        bad_idx[3, 1] = BAD_IDS[value](e)
    buf = ll_make_buffer(ctx, ll) if where == "ll" else make_buffer(ctx, case)
    try:
        if where == "layout":  # local: only the bad ranks raise
            res = _outcome(lambda: buf.get_dispatch_layout(bad_idx, e))
        elif where == "dispatch":  # layout from the clean ids, bad ids to dispatch
            per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
            res = _outcome(lambda: buf.dispatch(
                x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=bad_idx,
                topk_weights=w))
        else:
            m = ll.max_tokens
            res = _outcome(lambda: buf.low_latency_dispatch(
                x[:m].contiguous(), bad_idx[:m].contiguous(), m, e, use_fp8=False))
        return _exact_after(ctx, buf, where == "ll", ll, case, res)
    finally:
        buf.destroy()


def task_nan_check(ctx, bad_rank: int, backend: str = "reference") -> dict:
    """EP_COMM_CHECK_FINITE=1: a NaN in token 2 of ``bad_rank``'s fp8 low-latency dispatch is
    named (token and 128-channel block) before anything moves."""
    os.environ["EP_COMM_CHECK_FINITE"] = "1"
    ll = LLCase(seed=9, num_experts=16, backend=backend)
    case = Case(seed=9, num_experts=16, backend=backend)
    x, idx, _ = (t.to(ctx.device) for t in all_inputs(case, ctx.world_size)[ctx.rank])
    m = ll.max_tokens
    x = x[:m].clone()
    if ctx.rank == bad_rank:
        x[2, 200] = float("nan")
    buf = ll_make_buffer(ctx, ll)
    try:
        return _outcome(lambda: buf.low_latency_dispatch(x, idx[:m].contiguous(), m, 16,
                                                         use_fp8=True))
    finally:
        os.environ.pop("EP_COMM_CHECK_FINITE")
        buf.destroy()


# ------------------------------------------------------------------ lost peers (fresh groups)
def _later_call(buf, x, idx, w, e) -> dict:
    """A call after the failure: must raise BufferFailedError at once."""
    return _outcome(lambda: _layout_and_dispatch(buf, x, idx, w, e))


def task_stall(ctx, staller: int, stall_s: float) -> dict:
    """``staller`` sleeps ``stall_s`` before its dispatch. The others raise CommTimeoutError
    naming it within the timeout (+2 s); then every call raises BufferFailedError at once."""
    case = Case(seed=10, num_experts=16)
    x, idx, w = all_inputs(case, ctx.world_size)[ctx.rank]
    buf = make_buffer(ctx, case)
    normal_round(ctx, buf, case)
    if ctx.rank == staller:
        time.sleep(stall_s)
    res = _outcome(lambda: _layout_and_dispatch(buf, x, idx, w, 16))
    res["later"] = _later_call(buf, x, idx, w, 16)
    res["failed"], res["lost"] = buf.failed, buf.lost_ranks
    buf.destroy()
    return res


def task_skip_last(ctx, skipper: int) -> dict:
    """Every rank makes two dispatches; ``skipper`` makes only the first and then waits (as a
    rank that skipped a call and went on to other work): the others name it."""
    case = Case(seed=11, num_experts=16)
    x, idx, w = all_inputs(case, ctx.world_size)[ctx.rank]
    buf = make_buffer(ctx, case)
    normal_round(ctx, buf, case)
    if ctx.rank == skipper:
        time.sleep(_timeout() + 1)
        return {"error": None, "skipped": True}
    res = _outcome(lambda: _layout_and_dispatch(buf, x, idx, w, 16))
    buf.destroy()
    return res


def task_exit_then_mask(ctx, dying: int) -> dict:
    """``dying`` exits (os._exit, as a crash) right after a good round; the others get
    PeerLostError naming it, mask it, and go on in low-latency and normal mode with exact
    results, on the same Buffer."""
    e = 12
    case, ll = Case(seed=12, num_experts=e), LLCase(seed=13, num_experts=e)
    x, idx, w = all_inputs(case, ctx.world_size)[ctx.rank]
    buf = make_buffer(ctx, case, low_latency_max_tokens=ll.max_tokens)  # both modes
    one_round(ctx, buf, ll, 0)
    normal_round(ctx, buf, case)
    if ctx.rank == dying:
        threading.Timer(1.0, os._exit, (3,)).start()  # after this result reached the parent
        return {"error": None, "died": True}
    res = _outcome(lambda: _layout_and_dispatch(buf, x, idx, w, e))
    res["later"] = _later_call(buf, x, idx, w, e)
    buf.low_latency_update_mask_buffer(dying, True)
    res["failed_after_mask"] = buf.failed
    for step in (1, 2):
        one_round(ctx, buf, ll, step, masked=(dying,))
        normal_round(ctx, buf, Case(seed=20 + step, num_experts=e), masked=(dying,))
    res["after"] = "exact"
    buf.destroy()
    return res


def task_stuck_then_new_buffer(ctx, stuck: int) -> dict:
    """``stuck`` stops answering (sleeps through the test). The others raise CommTimeoutError
    naming it, then build a new Buffer over the survivors and go on with exact results."""
    import torch.distributed as dist
    case = Case(seed=14, num_experts=12)
    x, idx, w = all_inputs(case, ctx.world_size)[ctx.rank]
    buf = make_buffer(ctx, case)
    normal_round(ctx, buf, case)
    if ctx.rank == stuck:
        time.sleep(3 * _timeout() + 4)
        return {"error": None, "stuck": True}
    res = _outcome(lambda: _layout_and_dispatch(buf, x, idx, w, 12))
    survivors = [p for p in range(ctx.world_size) if p not in buf.lost_ranks]
    res["survivors"] = survivors
    buf.destroy()
    group = dist.new_group(survivors, use_local_synchronization=True)
    new = ep_buffer(group, case, len(survivors))
    for seed in (30, 31):
        normal_round(ctx, new, Case(seed=seed, num_experts=12), rank_map=survivors)
    res["after"] = "exact"
    new.destroy()
    return res


def ep_buffer(group, case: Case, n: int):
    import ep_comm
    cfg = ep_comm.Buffer.get_dispatch_config(n)
    return ep_comm.Buffer(group, num_nvl_bytes=cfg.get_nvl_buffer_size_hint(case.hidden * 2, n),
                          backend=case.backend, explicitly_destroy=True)


# ------------------------------------------------------------------ GPU (kernels backend)
def task_gpu_bad_ids(ctx) -> dict:
    """Kernels backend: E+1 on every rank is an InputError naming token and value, in
    get_dispatch_layout and low_latency_dispatch, before any kernel runs."""
    e = 16
    case = Case(seed=15, num_experts=e, backend="kernels")
    ll = LLCase(seed=15, num_experts=e, backend="kernels")
    x, idx, _ = all_inputs(case, ctx.world_size)[ctx.rank]
    idx = idx.clone()
    idx[3, 1] = e + 1
    x, idx = x.to(ctx.device), idx.to(ctx.device)
    res = {}
    buf = make_buffer(ctx, case)
    res["layout"] = _outcome(lambda: buf.get_dispatch_layout(idx, e))
    buf.destroy()
    lbuf = ll_make_buffer(ctx, ll)
    m = ll.max_tokens
    res["ll"] = _outcome(lambda: lbuf.low_latency_dispatch(
        x[:m].contiguous(), idx[:m].contiguous(), m, e, use_fp8=False))
    lbuf.destroy()
    return res


def task_gpu_bad_ids_later_call(ctx, value: str, bad_rank: int | None) -> dict:
    """Kernels backend: a first exact round (the host checks the ids of a shape's first call),
    then a layout + dispatch whose ids the host does not read, with ``value`` at token 3, column
    1 on ``bad_rank`` (None: every rank). The layout kernel records it and the notify kernel
    refuses the dispatch on every rank: InputError on a bad rank, PeerInputError naming it on
    the others; then one more exact round (the record was cleared)."""
    assert os.environ.get("EP_COMM_CHECK_IDS") is None
    case = Case(seed=18, num_experts=16, backend="kernels")
    x, idx, w = (t.to(ctx.device) for t in all_inputs(case, ctx.world_size)[ctx.rank])
    buf = make_buffer(ctx, case)
    try:
        normal_round(ctx, buf, case)
        bad = idx.clone()
        if bad_rank is None or ctx.rank == bad_rank:
            bad[3, 1] = BAD_IDS[value](case.num_experts)
        res = _outcome(lambda: _layout_and_dispatch(buf, x, bad, w, case.num_experts))
        return _exact_after(ctx, buf, False, None, case, res)
    finally:
        buf.destroy()


def task_gpu_ll_bad_ids_later_call(ctx, bad_rank: int) -> dict:
    """Kernels backend, low-latency: an exact round (the host checks a shape's first call),
    then a dispatch whose ids the host does not read, with E+1 at token 3, column 1 on
    ``bad_rank``. Its dispatch kernel skips the entry and reports it: after a synchronisation
    the status read raises InputError there (nothing on the others); the round's combine then
    completes on every rank, and one more round is exact."""
    from low_latency_cases import check_status, make_inputs
    assert os.environ.get("EP_COMM_CHECK_IDS") is None
    ll = LLCase(seed=19, num_experts=16, backend="kernels")
    buf = ll_make_buffer(ctx, ll)
    try:
        one_round(ctx, buf, ll, 0)
        x, idx, w = (t.to(ctx.device) for t in make_inputs(ll, ctx.rank, ctx.world_size, 1))
        if ctx.rank == bad_rank:
            idx = idx.clone()
            idx[3, 1] = ll.num_experts + 1
        recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, ll.max_tokens, ll.num_experts,
                                                         use_fp8=False)
        torch.cuda.synchronize()
        res = _outcome(lambda: check_status(buf))
        y = torch.zeros_like(recv)
        buf.low_latency_combine(y, idx, w, handle)
        torch.cuda.synchronize()
        check_status(buf)
        return _exact_after(ctx, buf, True, ll, None, res)
    finally:
        buf.destroy()


def task_gpu_stuck(ctx, stuck: int) -> dict:
    """Kernels backend: ``stuck`` stops calling; the other raises a named timeout, then
    BufferFailedError at once."""
    case = Case(seed=16, num_experts=16, backend="kernels")
    x, idx, w = (t.to(ctx.device) for t in all_inputs(case, ctx.world_size)[ctx.rank])
    buf = make_buffer(ctx, case)
    if ctx.rank == stuck:
        time.sleep(2 * _timeout() + 4)
        return {"stuck": True}

    def call():
        _layout_and_dispatch(buf, x, idx, w, 16)
        torch.cuda.synchronize()
    res = _outcome(call)
    res["later"] = _later_call(buf, x, idx, w, 16)
    return res


KERNEL_DISAGREEMENTS = ("hidden", "num_experts", "topk", "dtype")


def task_gpu_disagree(ctx, kinds, odd: int) -> dict:
    """Kernels backend without EP_COMM_CHECK_AGREEMENT: each disagreement of ``kinds`` (see
    ``task_disagree``) in a dispatch from a layout is refused by the NVLink notify kernel and
    raised on every rank as CollectiveMismatchError before data moves; the Buffer then gives
    exact results. One result dict per kind."""
    assert os.environ.get("EP_COMM_CHECK_AGREEMENT", "0") != "1"
    return {kind: task_disagree(ctx, kind, odd, backend="kernels") for kind in kinds}


def task_gpu_skip(ctx, odd: int) -> dict:
    """Kernels backend: rank ``odd`` skips the second dispatch and combines the first one's
    handle instead. The NVLink kernels of the two ranks then run different kernels as the same
    kernel number, and each sees the other's announcement: both stop at once, and each rank
    raises the CollectiveMismatchError naming the operation (rank ``odd`` at its next call: its
    combine did not wait), then every later call raises BufferFailedError. 8 experts per rank,
    so any number of ranks divides them."""
    e = 8 * ctx.world_size
    case = Case(seed=17, num_experts=e, backend="kernels")
    x, idx, w = (t.to(ctx.device) for t in all_inputs(case, ctx.world_size)[ctx.rank])
    buf = make_buffer(ctx, case)
    try:
        recv, _, _, _, handle, _ = _layout_and_dispatch(buf, x, idx, w, e)
        torch.cuda.synchronize()
        if ctx.rank == odd:
            def skipped():
                buf.combine(recv, handle)
                torch.cuda.synchronize()
                _layout_and_dispatch(buf, x, idx, w, e)
            res = _outcome(skipped)
        else:
            res = _outcome(lambda: _layout_and_dispatch(buf, x, idx, w, e))
        res["later"] = _later_call(buf, x, idx, w, e)
        return res
    finally:
        buf.destroy()


RING_LAYOUT_DISAGREEMENTS = ("combine_hidden", "cached_dispatch_hidden",
                             "combine_hidden_queued")


def task_gpu_ring_layout(ctx, kind: str, odd: int) -> dict:
    """Kernels backend without EP_COMM_CHECK_AGREEMENT: after an agreed dispatch from a layout,
    rank ``odd`` makes the next call with half the hidden size: a combine (``combine_hidden``)
    or a cached dispatch with the handle (``cached_dispatch_hidden``); with
    ``combine_hidden_queued`` rank ``odd`` queues a second such combine before it synchronises,
    which no peer kernel will ever meet: it must stop at once on the published finding, not
    wait for its timeout. No signature exchange
    checks these calls (the host's agreement is off, they have no notify kernel), so only the
    NVLink rings' tags, which hash the row layout, stand between the ranks and rows read at the
    wrong size. Each rank's kernel must refuse the other's words, and finds the other's
    announcement of another row size: the next call raises the CollectiveMismatchError naming
    hidden (``res["hidden"]``: the hidden of the agreeing rank), then every later call raises
    BufferFailedError. Before the layout was in the tag the call completed: no error, wrong
    rows; before the announcements each rank timed out."""
    assert os.environ.get("EP_COMM_CHECK_AGREEMENT", "0") != "1"
    case = Case(seed=24, num_experts=16, backend="kernels")
    x, idx, w = (t.to(ctx.device) for t in all_inputs(case, ctx.world_size)[ctx.rank])
    h = case.hidden // 2 if ctx.rank == odd else case.hidden
    buf = make_buffer(ctx, case)
    try:
        recv, _, _, _, handle, _ = _layout_and_dispatch(buf, x, idx, w, case.num_experts)
        torch.cuda.synchronize()

        def disagreeing():
            if kind in ("combine_hidden", "combine_hidden_queued"):
                buf.combine(recv[:, :h].contiguous(), handle)
                if kind == "combine_hidden_queued" and ctx.rank == odd:
                    buf.combine(recv[:, :h].contiguous(), handle)
            elif kind == "cached_dispatch_hidden":
                buf.dispatch(x[:, :h].contiguous(), handle=handle)
            else:
                raise ValueError(kind)
            torch.cuda.synchronize()  # nothing on the host waits for these kernels
            # the next call reads the status word: what the kernels reported
            _layout_and_dispatch(buf, x, idx, w, case.num_experts)
        res = _outcome(disagreeing)
        res["hidden"] = case.hidden
        res["later"] = _later_call(buf, x, idx, w, case.num_experts)
        return res
    finally:
        buf.destroy()


# ------------------------------------- GPU: low-latency call agreement in the kernels
LL_KERNEL_DISAGREEMENTS = ("ll_hidden", "ll_num_experts", "ll_topk", "ll_fp8")


def _ll_sync_and_check(buf, fn):
    """Run ``fn`` (low-latency calls), wait for the stream, then raise what the kernels
    reported (the kernels backend reports through its status word, read by the host)."""
    from low_latency_cases import check_status
    fn()
    torch.cuda.synchronize()
    check_status(buf)


def task_gpu_ll_disagree(ctx, kinds, odd: int) -> dict:
    """Kernels backend with EP_COMM_LL_KERNEL_AGREEMENT=1: rank ``odd`` passes another hidden /
    num_experts / top-k / use_fp8 to low_latency_dispatch. The receivers find the other call's
    tag in the count words and refuse it (no rows written): CollectiveMismatchError on every
    rank, without waiting for the timeout; after clean_low_latency_buffer one round is exact.
    One result dict per kind."""
    assert os.environ.get("EP_COMM_LL_KERNEL_AGREEMENT") == "1"
    assert os.environ.get("EP_COMM_CHECK_AGREEMENT", "0") != "1"
    ll = LLCase(seed=18, num_experts=16, backend="kernels")
    case = Case(seed=18, num_experts=16, backend="kernels")
    me, m = ctx.rank, ll.max_tokens
    x, idx, _ = (t.to(ctx.device) for t in all_inputs(case, ctx.world_size)[me])
    x, idx = x[:m].contiguous(), idx[:m].contiguous()
    out = {}
    buf = ll_make_buffer(ctx, ll)
    try:
        for kind in kinds:
            h, e, k, use_fp8 = ll.hidden, ll.num_experts, idx.shape[1], False
            if me == odd:
                h = 128 if kind == "ll_hidden" else h
                e = 8 if kind == "ll_num_experts" else e
                k = 2 if kind == "ll_topk" else k
                use_fp8 = kind == "ll_fp8"
            ii = idx[:, :k] if e == ll.num_experts else idx[:, :k] % e  # ids in [0, e)
            xx, ii = x[:, :h].contiguous(), ii.contiguous()
            res = _outcome(lambda: _ll_sync_and_check(buf, lambda: buf.low_latency_dispatch(
                xx, ii, m, e, use_fp8=use_fp8)))
            buf.clean_low_latency_buffer(m, ll.hidden, ll.num_experts)
            one_round(ctx, buf, ll, 0)
            res["after"] = "exact"
            out[kind] = res
    finally:
        buf.destroy()
    return out


def task_gpu_ll_skip(ctx, odd: int, skip: str) -> dict:
    """Kernels backend with EP_COMM_LL_KERNEL_AGREEMENT=1, one checked round first. ``skip``:

    * ``"dispatch"``: rank ``odd`` skips the second low_latency_dispatch and combines the first
      one's handle again instead; the other rank makes the dispatch.
    * ``"combine"``: rank ``odd`` skips the combine of the second round and dispatches again;
      the other rank combines, then dispatches: the two dispatches land on the same buffer half
      with call numbers one apart, which the count words' tags refuse.

    Every rank must raise an error naming the other (a timeout or a refused call), within the
    timeout + 2 s, never a silent result."""
    assert os.environ.get("EP_COMM_LL_KERNEL_AGREEMENT") == "1"
    ll = LLCase(seed=19, num_experts=16, backend="kernels")
    from low_latency_cases import make_inputs
    buf = ll_make_buffer(ctx, ll)
    dev, me, m = ctx.device, ctx.rank, ll.max_tokens
    try:
        one_round(ctx, buf, ll, 0)
        x, idx, w = (t.to(dev) for t in make_inputs(ll, me, ctx.world_size, 1))

        def dispatch():
            return buf.low_latency_dispatch(x, idx, m, ll.num_experts, use_fp8=False)

        if skip == "dispatch":
            _, _, h1, _, _ = dispatch()
            torch.cuda.synchronize()
            y = torch.zeros(ll.num_experts // ctx.world_size, ctx.world_size * m, ll.hidden,
                            dtype=torch.bfloat16, device=dev)
            if me == odd:
                steps = lambda: (buf.low_latency_combine(y, idx, w, h1),  # noqa: E731
                                 buf.low_latency_combine(y, idx, w, h1))
            else:
                steps = lambda: (buf.low_latency_combine(y, idx, w, h1),  # noqa: E731
                                 dispatch())
        else:
            _, _, h1, _, _ = dispatch()
            torch.cuda.synchronize()
            y = torch.zeros(ll.num_experts // ctx.world_size, ctx.world_size * m, ll.hidden,
                            dtype=torch.bfloat16, device=dev)
            steps = (dispatch if me == odd else  # noqa: E731
                     lambda: (buf.low_latency_combine(y, idx, w, h1), dispatch()))
        res = _outcome(lambda: _ll_sync_and_check(buf, steps))
        res["later"] = _outcome(lambda: _ll_sync_and_check(buf, dispatch))
        return res
    finally:
        buf.destroy()
