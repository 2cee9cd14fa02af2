"""Lifecycle GPU cases of normal mode: bad inputs raise before any kernel and leave the Buffer
usable, many create/destroy cycles keep free memory, and a stuck peer gives a CommTimeoutError
naming rank and phase (never a hang). Inputs and Buffers come from gpu_cases_normal and
gpu_common."""
from __future__ import annotations

import gc
import os
import time

import torch

from gpu_cases_normal import NCase, layout_args, n_inputs, run_normal_case
from gpu_common import Failures, check_status, is_cuda, normal_buffer, sync


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
