"""Low-latency GPU cases: rounds checked with low_latency_cases' oracle checks (failures
collected), the sweep and CUDA-graph tasks, normal mode then low latency on one Buffer, and the
case lists. See gpu_common for how the comparisons work."""
from __future__ import annotations

import dataclasses
import random

import torch

from gpu_common import Failures, NAN, check_status, is_cuda, llc_dequant, normal_buffer, sync

import low_latency_cases as llc
from gpu_cases_normal import NCase, run_normal_case
from low_latency_cases import LLCase


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


def task_ll_through_cpp(ctx, backend: str, cases: list):
    """Each case's shape made ``case.iterations`` times on one Buffer, fresh data each round:
    from the third round on (after one Python call per buffer half) the C++ host path
    (kernels/host/host_path.cpp) launches both calls. Every round checked against the
    oracle. Returns the C++ calls made per case (0 where the path is not loaded)."""
    fails = Failures(ctx.rank)
    made = []
    for i, case in enumerate(cases):
        buf = llc.make_buffer(ctx, dataclasses.replace(case, backend=backend))
        try:
            host = buf._ll_host
            for it in range(case.iterations):
                ll_round(ctx, buf, case, 16 * i + it, fails)
            made.append(0 if host is None else host.calls)
            check_status(buf)
        finally:
            buf.destroy()
    fails.raise_if_any(f"low-latency {backend} through the C++ host path vs oracle")
    return made


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
            fp8=fp8_mode > 0 and hidden % 128 == 0, round_scale=fp8_mode >= 2,
            ue8m0=fp8_mode == 3 and hidden % 512 == 0, hook=bool(i % 2),
            zero_copy=i % 3 == 1, use_out=i % 3 == 2, nvlink=nvlink, stats=i % 4 == 1,
            iterations=1 + i % 2, backend=backend))
    return cases

