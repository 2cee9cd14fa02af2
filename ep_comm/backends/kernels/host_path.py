"""The C++ host path (``kernels/host/host_path.cpp``): the low-latency calls, the layout and
the normal-mode dispatch and combine over NVLink.

A later call of a shape the Python path has validated goes from ``Buffer`` straight to the C++
object of its sizes: one call that guards, allocates, patches the launch plan's argument slots
and launches (docs/host_path.md). The Python path (``LowLatencyRuntime``) stays the validator
and teaches this module each plan and shape after it ran them (``learn_dispatch`` /
``learn_combine``). Whatever the C++ side does not know (a new shape, a receive hook, a CUDA
graph capture, a status word already set) it declines, and the Python path runs the call.

The normal-mode dispatch (``IntranodeHostPath``) works the same way: ``IntranodeRuntime``
teaches it each plan (notify and dispatch launches) with the token count and expert alignment
of the call, and ``Buffer.dispatch`` without stream flags or ``expand`` tries it first. So does
the combine: ``IntranodeRuntime.combine`` teaches each plan (hidden, top-k, weights or not,
experts, Config), and ``Buffer.combine`` without stream flags tries it first.

Used only where the extension loads (``ep_comm.runtime.host_ext``), and only for calls the
Buffer makes without per-call host checks (no ``EP_COMM_DEBUG``, ``EP_COMM_CHECK_IDS=1``,
``EP_COMM_CHECK_FINITE=1`` or ``EP_COMM_CHECK_AGREEMENT=1``): those calls keep the Python path.
"""
from __future__ import annotations

import torch

from ep_comm.backends.kernels.args import (LL_COMBINE_PER_CALL, LL_DISPATCH_PER_CALL,
                                           LL_RECV_PHASE, LL_SEND_PHASE, NVL_COMBINE_PER_CALL,
                                           NVL_DISPATCH_PER_CALL, NVL_LAYOUT_PER_CALL,
                                           NVL_NOTIFY_PER_CALL)
from ep_comm.core import agreement
from ep_comm.core.constants import (LL_STATUS_WORDS, LL_TAG_SEQ_MOD, LL_TAG_SEQ_SHIFT,
                                    NVL_INFO_EXPERT_COUNTS, NVL_INFO_NUM_RECV)
from ep_comm.errors import EpCommError
from ep_comm.handles import DispatchHandle, LowLatencyHandle
from ep_comm.runtime import host_ext, jit

#: kernels/host/host_path.cpp (the low-latency calls and the layout)
EXTENSION = "host_path"
_TAG_HASH_MASK = (1 << LL_TAG_SEQ_SHIFT) - 1


def load_extension():
    """The compiled extension, checked against the runtime's per-call argument lists, or None."""
    ext = host_ext.load(EXTENSION)
    if ext is None:
        return None
    if (tuple(ext.DISPATCH_SLOTS) != LL_DISPATCH_PER_CALL
            or tuple(ext.COMBINE_SLOTS) != LL_COMBINE_PER_CALL
            or tuple(ext.LAYOUT_SLOTS) != NVL_LAYOUT_PER_CALL
            or tuple(ext.NVL_NOTIFY_SLOTS) != NVL_NOTIFY_PER_CALL
            or tuple(ext.NVL_DISPATCH_SLOTS) != NVL_DISPATCH_PER_CALL
            or tuple(ext.NVL_COMBINE_SLOTS) != NVL_COMBINE_PER_CALL):
        raise EpCommError("ep_comm internal: kernels/host/host_path.cpp writes other per-call "
                          "arguments than args.LL_DISPATCH_PER_CALL / LL_COMBINE_PER_CALL / "
                          "NVL_LAYOUT_PER_CALL / NVL_NOTIFY_PER_CALL / NVL_DISPATCH_PER_CALL / "
                          "NVL_COMBINE_PER_CALL")
    return ext


def _native(fn, *args, before_raise=None):
    """``fn(*args)`` of the extension, or None where it declines or an argument is not of its
    type (pybind's TypeError: the Python path then raises its own, clear error). The guard never
    fails, so an error comes from after it (an allocation, a launch, a count wait):
    ``before_raise()`` runs first (e.g. numbering the call, as the Python path numbers it before
    its backend runs), then a failed launch is raised as ``JitError``, anything else as is."""
    try:
        return fn(*args)
    except TypeError:
        return None
    except RuntimeError as e:
        if before_raise is not None:
            before_raise()
        if str(e).startswith("cuLaunchKernel"):
            raise jit.JitError(str(e)) from e
        raise


def _slots(prepared, names: tuple) -> tuple[list[int], list[int]]:
    """(addresses, widths in bytes) of the ctypes slots of ``names`` in a prepared launch."""
    import ctypes
    slots = [prepared.args.slot(n) for n in names]
    return [ctypes.addressof(s) for s in slots], [ctypes.sizeof(s) for s in slots]


class LowLatencyHostPath:
    """The C++ objects of one ``LowLatencyRuntime``: one per dispatch (M, experts, format) and
    per combine (M, hidden, experts), each holding both buffer halves' launch plans."""

    def __init__(self, runtime, ext, state_type):
        self.rt = runtime
        self.ext = ext
        self._state_type = state_type  # the runtime's LowLatencyState (handle.backend_state)
        self._dispatch: dict = {}  # (M, E, use_fp8, round_scale, use_ue8m0) -> (hidden, C++)
        self._combine: dict = {}   # (M, hidden, E) -> C++
        # The calls' Signatures (frozen), built once per (kind, sizes, top-k): a new one cost
        # ~1.5 us of every call.
        self._sigs: dict = {}
        self._status_ptr = runtime._status.host_ptr
        self._like = torch.empty(0, device=runtime.device)
        self.calls = 0  # calls the C++ side ran (for tests and the bench)

    def _common(self, native) -> tuple:
        launch_fn, capturing_fn, _ = native
        return (launch_fn, capturing_fn, self._status_ptr, LL_STATUS_WORDS, self._like,
                LL_TAG_SEQ_SHIFT, LL_TAG_SEQ_MOD, bool(self.rt.tags_calls),
                LL_SEND_PHASE | LL_RECV_PHASE)

    # ------------------------------------------------------------------ learning
    def learn_dispatch(self, prepared, half: int, *, m: int, hidden: int, num_experts: int,
                       use_fp8: bool, round_scale: bool, use_ue8m0: bool, scale_cols: int,
                       scales_int32: bool, t: int, k: int, has_cum: bool, has_wait: bool,
                       grid: int, call_tag: int) -> None:
        """After the Python path ran a whole dispatch (no hook, not captured) with plan
        ``prepared`` of buffer half ``half``: remember the plan and the shape."""
        native = prepared.native
        if native is None:
            return
        key = (m, num_experts, use_fp8, round_scale, use_ue8m0)
        entry = self._dispatch.get(key)
        if entry is None or entry[0] != hidden:
            obj = self.ext.Dispatch(*self._common(native), num_experts // self.rt.num_ranks,
                                    self.rt.num_ranks, m, hidden, use_fp8, scale_cols,
                                    scales_int32)
            entry = self._dispatch[key] = (hidden, obj)
        obj = entry[1]
        if not obj.ready(half):
            addrs, widths = _slots(prepared, LL_DISPATCH_PER_CALL)
            obj.set_launch(half, native[2], prepared.args.address, prepared.block,
                           prepared.shared_mem, addrs, widths, 0)
        obj.add_shape(t, k, has_cum, has_wait, grid, call_tag & _TAG_HASH_MASK)

    def learn_combine(self, prepared, half: int, *, m: int, hidden: int, num_experts: int,
                      t: int, k: int, has_out: bool, has_wait: bool, grid: int,
                      call_tag: int) -> None:
        """As ``learn_dispatch``, for a whole combine."""
        native = prepared.native
        if native is None:
            return
        key = (m, hidden, num_experts)
        obj = self._combine.get(key)
        if obj is None:
            obj = self._combine[key] = self.ext.Combine(
                *self._common(native), num_experts // self.rt.num_ranks, self.rt.num_ranks, m,
                hidden)
        if not obj.ready(half):
            addrs, widths = _slots(prepared, LL_COMBINE_PER_CALL)
            obj.set_launch(half, native[2], prepared.args.address, prepared.block,
                           prepared.shared_mem, addrs, widths,
                           prepared.args.slot("send_stage").value)
        obj.add_shape(t, k, has_out, has_wait, grid, call_tag & _TAG_HASH_MASK)

    # ------------------------------------------------------------------ calls
    def dispatch(self, x, topk_idx, m: int, num_experts: int, cum, wait, use_fp8: bool,
                 round_scale: bool, use_ue8m0: bool):
        """(recv, recv_count, handle) as ``Buffer.low_latency_dispatch`` returns them, or None
        (the C++ side declined: the caller runs the Python path)."""
        entry = self._dispatch.get((m, num_experts, use_fp8, round_scale, use_ue8m0))
        if entry is None or self.rt.hooks_out:  # a receive hook out: the Python path checks
            return None
        rt, comm = self.rt, self.rt.comm
        half = rt._next_half
        out = _native(entry[1].call, x, topk_idx, cum, wait, half, comm.seq + 1,
                      jit.current_stream_handle(rt._dev_index))
        if out is None:
            return None
        self.calls += 1
        rt._next_half = half ^ 1
        hidden = entry[0]
        comm.begin_call(self._signature("low_latency_dispatch", hidden,
                                        torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
                                        num_experts, topk_idx.shape[1], m), None, False)
        recv_x, scales, src_info, begin, count, recv_count = out
        handle = LowLatencyHandle(src_info, begin, count, recv_count, m, hidden, num_experts,
                                  half, use_fp8, self._state_type(half, ()))
        return ((recv_x, scales) if use_fp8 else recv_x), recv_count, handle

    def combine(self, x, topk_idx, topk_weights, handle, zero_copy: bool, out, wait):
        """combined_x [T, H] bf16, or None (the caller runs the Python path)."""
        m, hidden, e = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        obj = self._combine.get((m, hidden, e))
        if obj is None or self.rt.hooks_out:  # a receive hook out: the Python path checks
            return None
        comm = self.rt.comm
        result = _native(obj.call, x, bool(zero_copy), handle.src_info, handle.range_begin,
                         handle.range_count, topk_idx, topk_weights, out, wait,
                         handle.buffer_idx, comm.seq + 1,
                         jit.current_stream_handle(self.rt._dev_index))
        if result is None:
            return None
        self.calls += 1
        called = getattr(handle.backend_state, "call_seq", -1)  # -1: this runtime's handles
        comm.begin_call(self._signature("low_latency_combine", hidden, torch.bfloat16, e,
                                        topk_idx.shape[1], m) if called == -1 else
                        agreement.Signature("low_latency_combine", hidden, x.dtype, e,
                                            topk_idx.shape[1], called, m), None, False)
        return result

    def _signature(self, op: str, hidden: int, dtype, num_experts: int, num_topk: int,
                   m: int) -> "agreement.Signature":
        """The Signature of a low-latency call of these sizes (no handle field), built once."""
        key = (op, hidden, dtype, num_experts, num_topk, m)
        sig = self._sigs.get(key)
        if sig is None:
            if len(self._sigs) >= 256:  # many shapes: keep the newest
                self._sigs.pop(next(iter(self._sigs)))
            sig = self._sigs[key] = agreement.Signature(op, hidden, dtype, num_experts,
                                                         num_topk, -1, m)
        return sig


class LayoutHostPath:
    """The C++ twin of a ``layout.LayoutKernel``: one object per (top-k, experts), learning
    the plan, the token counts and the (stream -> scratch) pairs of the Python path's calls."""

    def __init__(self, ext, num_ranks: int, device, threads: int):
        self.ext, self.num_ranks, self.threads = ext, num_ranks, threads
        self._like = torch.empty(0, device=device)
        self._dev_index = device.index
        self._objs: dict = {}  # E -> (K, C++ Layout): the top-k last learnt for E
        self.calls = 0

    def learn(self, prepared, num_topk: int, num_experts: int, t: int, stream: int,
              scratch: int) -> None:
        """After the Python path launched plan ``prepared`` for ``t`` tokens on ``stream``."""
        native = prepared.native
        if native is None:
            return
        entry = self._objs.get(num_experts)
        if entry is None or entry[0] != num_topk:
            obj = self.ext.Layout(native[0], self._like, self.num_ranks, num_topk, num_experts,
                                  self.threads)
            self._objs[num_experts] = (num_topk, obj)
            addrs, widths = _slots(prepared, NVL_LAYOUT_PER_CALL)
            obj.set_launch(native[2], prepared.args.address, prepared.block, prepared.shared_mem,
                           addrs, widths)
        obj = self._objs[num_experts][1]
        obj.add_tokens(t)
        obj.add_scratch(stream, scratch)

    def __call__(self, topk_idx, num_experts: int):
        """(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool) on the current stream, or None (the caller runs the
        Python path)."""
        entry = self._objs.get(num_experts)
        if entry is None:
            return None
        out = _native(entry[1].call, topk_idx, jit.current_stream_handle(self._dev_index))
        if out is None:
            return None
        self.calls += 1
        return out[0], None, out[1], out[2]


class IntranodeHostPath:
    """The C++ twin of an ``IntranodeRuntime``'s dispatch (``NvlDispatch`` of host_path.cpp):
    one object per (fresh or cached, ``num_worst_tokens``, Config), holding the plans of that
    kind that the Python path built and the (tokens, expert alignment) of their calls; and of
    its combine (``NvlCombine``): one object per Config, holding the plans of (hidden, top-k,
    weights or not, experts) the Python path built.

    A fresh dispatch with ``num_worst_tokens`` is two launches and no host wait; a fresh one
    from a layout waits for the notify kernel's counts (an event after it, bounded by the
    kernel's own timeout) and reads them from the status words; a cached one is one launch.
    The call is numbered (``Comm.begin_call``) with the Signature the Python path's first call
    of the plan used, and the notify kernel gets the same signature words as on the Python path
    (the call's number in word 0), so the agreement of docs/faults.md is unchanged."""

    def __init__(self, runtime, ext, state_type, aligned_counts):
        self.rt, self.ext = runtime, ext
        self._state_type = state_type          # NvlDispatchState (handle.backend_state)
        self._aligned_counts = aligned_counts  # intranode.aligned_counts
        # (kind, num_worst_tokens, Config) -> C++ (as the plans' keys); kind: True (a fresh
        # dispatch), False (a cached one) or "combine" (num_worst_tokens 0: a combine's plan
        # does not depend on it)
        self._objs: dict = {}
        # (kind, num_worst_tokens, id(config)) -> (config, C++): the same objects found by
        # identity, which costs less than hashing a Config at every call
        self._by_id: dict = {}
        self._like = torch.empty(0, device=runtime.device)
        # (combine plan's PreparedLaunch, has weights) taught to its C++ object: a Python-path
        # call of a known plan (stream flags) then costs one set lookup, not a C++ call
        self._taught: set = set()
        self.calls = 0  # dispatches the C++ side ran (for tests and the bench)
        self.combine_calls = 0  # combines the C++ side ran

    # ------------------------------------------------------------------ learning
    def learn(self, notify, launch, *, fresh: bool, x, has_scales: bool, num_topk: int,
              has_idx: bool, has_w: bool, num_experts: int, num_worst_tokens: int, config,
              t: int, alignment: int) -> None:
        """After the Python path ran a (non-expanding) dispatch of plan (``notify``, ``launch``)
        with x [t, H]: remember the plan and the call's sizes. A call that was not the
        Buffer's call of this signature (a runtime driven directly), or that carried a bad
        input, teaches nothing."""
        native = launch.native
        if native is None:
            return
        obj = self._obj(fresh, num_worst_tokens, config)
        if obj is not None and obj.knows(launch.args.address, t, alignment):
            return  # a Python-path call of a known shape (stream flags, a declined call)
        rt = self.rt
        words, bad = rt.comm.call_words()
        sig = agreement.Signature("dispatch" if fresh else "cached_dispatch", x.shape[1], x.dtype,
                                  num_experts, num_topk if has_idx else -1, -1)
        if bad is not None or list(words) != agreement.device_words(words[0], sig):
            return
        waits = fresh and num_worst_tokens == 0
        event = getattr(rt._notify_done, "cuda_event", 0) if waits else 0
        if waits and not event:
            return  # the count wait's event does not exist yet (created at its first record)
        if obj is None:
            if len(self._objs) >= 64:  # a workload of many configs keeps the newest
                self._objs.pop(next(iter(self._objs)))
                self._by_id.clear()
                self._taught.clear()
            record, sync = rt._module.native_event_fns() if waits else (0, 0)
            obj = self._objs[fresh, num_worst_tokens, config] = self.ext.NvlDispatch(
                native[0], native[1], record, sync, event, rt.status.host_ptr, NVL_INFO_NUM_RECV,
                NVL_INFO_NUM_RECV, NVL_INFO_EXPERT_COUNTS, self._like, rt.num_ranks, fresh,
                num_worst_tokens)
        n_launch, n_addrs, n_widths = (0, 0, 0, 0), [], []
        if fresh:
            n_launch = (notify.native[2], notify.args.address, notify.block, notify.shared_mem)
            n_addrs, n_widths = _slots(notify, NVL_NOTIFY_PER_CALL)
        addrs, widths = _slots(launch, NVL_DISPATCH_PER_CALL)
        obj.learn(*n_launch, n_addrs, n_widths, native[2], launch.args.address, launch.block,
                  launch.shared_mem, addrs, widths, launch.grid, x, has_scales, num_topk, has_idx,
                  has_w, num_experts, list(words), sig, t, alignment)

    def stage_times(self, run, calls: int) -> dict:
        """{stage: us per call} of ``calls`` calls of ``run()`` (zero-argument, one dispatch each)
        inside the C++ objects, by stage (the extension's STAGE_NAMES: guard, alloc, launch,
        wait, return), plus ``"calls"``: how many of them the C++ side ran. For
        ``bench/host_overhead.py``: where a call's host time goes below Python."""
        objs = [o for key, o in self._objs.items() if key[0] != "combine"]  # the dispatches
        for o in objs:
            o.set_timing(True)
        try:
            for _ in range(calls):
                run()
        finally:
            sums = [o.stage_ns() for o in objs]
            for o in objs:
                o.set_timing(False)
        n = sum(s[0] for s in sums)
        out = {"calls": n}
        for i, name in enumerate(self.ext.STAGE_NAMES):
            out[name] = sum(s[1 + i] for s in sums) / 1e3 / max(n, 1)
        return out

    def learn_combine(self, launch, *, hidden: int, num_topk: int, has_w: bool,
                      num_experts: int, config) -> None:
        """After the Python path ran a combine of plan ``launch`` (rows of ``hidden``,
        ``num_topk`` weights per row, 0 and ``has_w`` False without weights, ``num_experts``,
        ``config``): remember the plan with the call's Signature. A call that was not the
        Buffer's call of this signature (a runtime driven directly) teaches nothing."""
        if (launch, has_w) in self._taught:
            return  # a Python-path call of a known plan (stream flags, a declined call)
        native = launch.native
        if native is None:
            return
        obj = self._obj("combine", 0, config)
        if obj is not None and obj.knows(hidden, num_topk, has_w, num_experts):
            self._taught.add((launch, has_w))
            return
        rt = self.rt
        words, bad = rt.comm.call_words()
        sig = agreement.Signature("combine", hidden, torch.bfloat16, num_experts,
                                  num_topk if has_w else -1, -1)
        if bad is not None or list(words) != agreement.device_words(words[0], sig):
            return
        if obj is None:
            if len(self._objs) >= 64:  # a workload of many configs keeps the newest
                self._objs.pop(next(iter(self._objs)))
                self._by_id.clear()
                self._taught.clear()
            obj = self._objs["combine", 0, config] = self.ext.NvlCombine(
                native[0], rt.status.host_ptr, NVL_INFO_NUM_RECV, self._like, rt.num_ranks)
        addrs, widths = _slots(launch, NVL_COMBINE_PER_CALL)
        if obj.learn(native[2], launch.args.address, launch.block, launch.shared_mem, addrs,
                     widths, launch.grid, hidden, num_topk, has_w, num_experts, sig):
            self._taught.clear()  # the object forgot its oldest plan: ask it again
        self._taught.add((launch, has_w))

    # ------------------------------------------------------------------ calls
    def combine(self, x, handle, topk_weights, bias, config):
        """(combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None, the call's
        Signature): ``Buffer.combine``'s results less the event; or None (declined: nothing ran
        and the call is not numbered; the caller runs the Python path). x: [N, H] bf16, N the
        handle's received rows; topk_weights: [N, K] float32 or None; bias: None, a [T, H] bf16
        tensor or a tuple / list of up to two."""
        if type(handle) is not DispatchHandle or self.rt._broken is not None:
            return None
        state = handle.backend_state
        if type(state) is not self._state_type:
            return None
        # the Python path's reading of ``bias``; anything else (a None inside, three tensors,
        # not a tensor) is its InputError
        if bias is None:
            b0 = b1 = None
        elif isinstance(bias, torch.Tensor):
            b0, b1 = bias, None
        elif isinstance(bias, (tuple, list)) and len(bias) <= 2 and all(
                isinstance(b, torch.Tensor) for b in bias):
            b0, b1 = (tuple(bias) + (None, None))[:2]
        else:
            return None
        obj = self._obj("combine", 0, config)
        if obj is None:
            return None
        rt = self.rt
        out = self._run(obj.call, (
            x, topk_weights, b0, b1, handle.is_token_in_rank, handle.rank_prefix_matrix,
            handle.send_pos, handle.recv_src_idx, state.num_tokens_of_rank, state.num_recv,
            handle.num_recv_rows, handle.num_experts, jit.current_stream_handle(rt._dev_index)),
            lambda: agreement.Signature("combine", x.shape[1], x.dtype, handle.num_experts,
                                        -1 if topk_weights is None else topk_weights.shape[1]))
        if out is None:
            return None
        rt.comm.begin_call(out[2], None, False)
        self.combine_calls += 1
        return out

    def dispatch(self, payload, scales, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                 is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                 expert_alignment, num_worst_tokens, config):
        """(recv_x or (recv_x, recv_scales), recv_topk_idx, recv_topk_weights, the count list,
        handle) as ``Buffer.dispatch`` returns them less the event, or None (declined: nothing
        ran and the call is not numbered; the caller runs the Python path)."""
        if num_tokens_per_rdma_rank is not None or self.rt._broken is not None:
            return None
        if handle is None:
            return self._fresh(payload, scales, num_tokens_per_rank, is_token_in_rank,
                               num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                               num_worst_tokens, config)
        state = getattr(handle, "backend_state", None)
        if (type(state) is not self._state_type or handle.num_tokens_per_rdma_rank is not None
                or num_tokens_per_rank is not None or is_token_in_rank is not None
                or num_tokens_per_expert is not None or topk_idx is not None
                or topk_weights is not None):
            return None
        worst = handle.num_worst_tokens
        # the call's own num_worst_tokens is ignored but checked by the Python path: take the
        # values it accepts for a handle that has them (the default 0, or the handle's own)
        if type(num_worst_tokens) is not int or num_worst_tokens not in (0, worst):
            return None
        obj = self._obj(False, worst, config)
        if obj is None:
            return None
        rt = self.rt
        out = self._run(obj.cached, (
            payload, scales, handle.is_token_in_rank, handle.rank_prefix_matrix,
            handle.recv_src_idx, handle.recv_src_rank, state.num_recv, handle.num_recv_rows,
            handle.num_experts, expert_alignment, jit.current_stream_handle(rt._dev_index)),
            lambda: agreement.Signature("cached_dispatch", payload.shape[1], payload.dtype,
                                        handle.num_experts))
        if out is None:
            return None
        rt.comm.begin_call(out[2], None, False)
        self.calls += 1
        counts = [] if worst > 0 else self._aligned_counts(state.counts_host, expert_alignment)
        return (out[0] if scales is None else (out[0], out[1])), None, None, counts, handle

    def _fresh(self, payload, scales, ntpr, in_rank, ntpe, idx, w, alignment, worst, config):
        if type(worst) is not int:  # 0.0 would find the plan of 0; the Python path refuses it
            return None
        obj = self._obj(True, worst, config)
        if obj is None:
            return None
        rt = self.rt
        comm = rt.comm
        out = self._run(obj.fresh, (
            payload, scales, ntpr, in_rank, ntpe, idx, w, alignment, comm.seq + 1,
            jit.current_stream_handle(rt._dev_index)),
            lambda: agreement.Signature("dispatch", payload.shape[1], payload.dtype,
                                        ntpe.shape[0], -1 if idx is None else idx.shape[1]))
        if out is None:
            return None
        comm.begin_call(out[-1], None, False)
        rt._notify_input = None  # this call's input passed the checks of its shape's first call
        self.calls += 1
        if len(out) == 2:  # the notify kernel reported: raised from the status word, as there
            rt.last_count_wait_ns = out[0]
            rt.check_status()
            raise EpCommError("ep_comm internal: the notify kernel reported a failure that the "
                              "status word no longer holds")
        (recv_x, recv_scales, recv_idx, recv_w, prefix, per_expert, of_rank, num_recv, send_pos,
         src_idx, src_rank, n_recv, counts_host, wait_ns, _) = out
        if worst == 0:
            rt.last_count_wait_ns = wait_ns
        handle = DispatchHandle(rt.rank, rt.num_ranks, ntpe.shape[0], in_rank, ntpr, prefix,
                                send_pos, src_idx, src_rank, n_recv, per_expert, worst, None,
                                self._state_type(of_rank, num_recv, counts_host),
                                config.num_channels)
        counts = [] if worst > 0 else self._aligned_counts(counts_host, alignment)
        return ((recv_x if scales is None else (recv_x, recv_scales)), recv_idx, recv_w, counts,
                handle)

    def _obj(self, kind, worst: int, config):
        """The C++ object of (``kind``: True / False for a fresh / cached dispatch, "combine";
        ``num_worst_tokens``, ``config``), or None: by identity first, else by value (a
        Config equal to a learnt one has the same plans; another type: None, the Python path
        refuses it)."""
        hit = self._by_id.get((kind, worst, id(config)))
        if hit is not None and hit[0] is config:
            return hit[1]
        try:
            obj = self._objs.get((kind, worst, config))
        except TypeError:  # not hashable, so not a Config
            return None
        if obj is not None:
            if len(self._by_id) >= 256:
                self._by_id.clear()
            self._by_id[kind, worst, id(config)] = (config, obj)  # keeps config alive
        return obj

    def _run(self, fn, args: tuple, signature):
        """``_native(fn, *args)``; an error after the guard numbers the call first (with
        ``signature()``)."""
        return _native(fn, *args, before_raise=lambda: self.rt.comm.begin_call(
            signature(), None, False))


__all__ = ["EXTENSION", "IntranodeHostPath", "LayoutHostPath", "LowLatencyHostPath",
           "load_extension"]
