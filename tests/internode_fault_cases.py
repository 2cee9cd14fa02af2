"""Fault scenarios of the internode kernels (issue 23, call agreement), run on every rank of a
group split into nodes with ``Buffer(..., ranks_per_node=1)`` (2 nodes x 1 rank; on one GPU with
EP_COMM_TEST_RANKS_PER_GPU=2). Each task returns, per rank, what the faulty call raised (see
``fault_cases._outcome``), whether the kernels left the data regions untouched, and whether the
Buffer then gave exact results."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from cases import Case, all_inputs, fp8_cast, make_buffer
from fault_cases import _layout_and_dispatch, _outcome, normal_round

#: One byte written over the internode data regions before a faulty call: still there after it
#: means no token slot was written or put (nothing moved).
SENTINEL = 0x5A


def _case(seed: int) -> Case:
    return Case(seed=seed, num_experts=16, backend="kernels", ranks_per_node=1)


def _slots(buf, hidden: int) -> torch.Tensor:
    """The bytes of this rank's symmetric buffer that token slots use (dispatch receive and
    stage regions, where dispatch writes and puts and combine sends its partial rows); not the
    combine input staging (a combine's host copy writes it before its kernel runs)."""
    rt = buf.backend.normal
    reg = rt.regions(hidden)
    return rt.sym.tensor[reg["dispatch_recv"].offset:reg["combine_src"].offset]


def _mark(ctx, buf, hidden: int) -> None:
    _slots(buf, hidden).fill_(SENTINEL)
    torch.cuda.synchronize()
    dist.barrier(group=ctx.group)  # every rank marked before any rank's faulty call


def _untouched(ctx, buf, hidden: int) -> bool:
    torch.cuda.synchronize()
    dist.barrier(group=ctx.group)  # every rank's kernels of the faulty call have ended
    return bool((_slots(buf, hidden) == SENTINEL).all())


def task_gpu_internode_disagree(ctx, kinds, odd: int) -> dict:
    """Without EP_COMM_CHECK_AGREEMENT: rank ``odd`` passes another hidden / num_experts / top-k
    / dtype to a dispatch from a layout. The internode notify kernels exchange the call's
    signature with the counts and refuse it on every rank: CollectiveMismatchError (the
    reference backend's text) before any slot is written; then the Buffer gives exact results.
    One result dict per kind."""
    assert os.environ.get("EP_COMM_CHECK_AGREEMENT", "0") != "1"
    case = _case(31)
    me = ctx.rank
    x, idx, w = (t.to(ctx.device) for t in all_inputs(case, ctx.world_size)[me])
    out = {}
    buf = make_buffer(ctx, case)
    try:
        assert buf.backend.normal.__class__.__name__ == "InternodeRuntime"
        for kind in kinds:
            xx, ii, ww, e = x, idx, w, case.num_experts
            if me == odd:
                if kind == "hidden":
                    xx = x[:, :128].contiguous()
                elif kind == "num_experts":
                    e, ii = 8, idx % 8
                elif kind == "topk":
                    ii, ww = idx[:, :2].contiguous(), w[:, :2].contiguous()
                elif kind == "dtype":
                    xx = fp8_cast(x)
                else:
                    raise ValueError(kind)
            _mark(ctx, buf, case.hidden)
            res = _outcome(lambda: _layout_and_dispatch(buf, xx, ii, ww, e))
            res["untouched"] = _untouched(ctx, buf, case.hidden)
            normal_round(ctx, buf, case)
            res["after"] = "exact"
            out[kind] = res
        return out
    finally:
        buf.destroy()


def task_gpu_internode_skip(ctx, odd: int) -> dict:
    """Rank ``odd`` skips the second dispatch and combines the first one's handle instead. The
    other rank's notify meets rank ``odd``'s combine kernel: each sees the other's flag carry
    another kind of kernel and call tag and refuses (nothing moves). The other rank raises at
    its count wait; rank ``odd``'s combine does not wait, so its next call raises (and gives
    its call number back). Both name the other rank; then the Buffer gives exact results."""
    case = _case(32)
    x, idx, w = (t.to(ctx.device) for t in all_inputs(case, ctx.world_size)[ctx.rank])
    buf = make_buffer(ctx, case)
    try:
        recv, _, _, _, handle, _ = _layout_and_dispatch(buf, x, idx, w, case.num_experts)
        torch.cuda.synchronize()
        _mark(ctx, buf, case.hidden)
        if ctx.rank == odd:
            def skipped():
                buf.combine(recv, handle)
                torch.cuda.synchronize()
                _layout_and_dispatch(buf, x, idx, w, case.num_experts)
            res = _outcome(skipped)
        else:
            res = _outcome(lambda: _layout_and_dispatch(buf, x, idx, w, case.num_experts))
        res["untouched"] = _untouched(ctx, buf, case.hidden)
        normal_round(ctx, buf, case)
        res["after"] = "exact"
        return res
    finally:
        buf.destroy()
