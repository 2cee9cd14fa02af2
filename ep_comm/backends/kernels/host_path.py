"""The C++ host path (``kernels/host/host_path.cpp``): the low-latency calls and the layout.

A later call of a shape the Python path has validated goes from ``Buffer`` straight to the C++
object of its sizes: one call that guards, allocates, patches the launch plan's argument slots
and launches (docs/host_path.md). The Python path (``LowLatencyRuntime``) stays the validator
and teaches this module each plan and shape after it ran them (``learn_dispatch`` /
``learn_combine``). Whatever the C++ side does not know (a new shape, a receive hook, a CUDA
graph capture, a status word already set) it declines, and the Python path runs the call.

Used only where the extension loads (``ep_comm.runtime.host_ext``), and only for calls the
Buffer makes without per-call host checks (no ``EP_COMM_DEBUG``, ``EP_COMM_CHECK_IDS=1``,
``EP_COMM_CHECK_FINITE=1`` or ``EP_COMM_CHECK_AGREEMENT=1``): those calls keep the Python path.
"""
from __future__ import annotations

import torch

from ep_comm.backends.kernels.args import (LL_COMBINE_PER_CALL, LL_DISPATCH_PER_CALL,
                                           LL_RECV_PHASE, LL_SEND_PHASE, NVL_LAYOUT_PER_CALL)
from ep_comm.core import agreement
from ep_comm.core.constants import LL_STATUS_WORDS, LL_TAG_SEQ_MOD, LL_TAG_SEQ_SHIFT
from ep_comm.errors import EpCommError
from ep_comm.handles import LowLatencyHandle
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
            or tuple(ext.LAYOUT_SLOTS) != NVL_LAYOUT_PER_CALL):
        raise EpCommError("ep_comm internal: kernels/host/host_path.cpp writes other per-call "
                          "arguments than args.LL_DISPATCH_PER_CALL / LL_COMBINE_PER_CALL / "
                          "NVL_LAYOUT_PER_CALL")
    return ext


def _native(fn, *args):
    """``fn(*args)`` of the extension, or None where it declines or an argument is not a
    tensor (pybind's TypeError: the Python path then raises its own, clear error); a failed
    launch (the extension's only exception) as ``JitError``."""
    try:
        return fn(*args)
    except TypeError:
        return None
    except RuntimeError as e:
        raise jit.JitError(str(e)) from e


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
        if entry is None:
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
        comm.begin_call(agreement.Signature(
            "low_latency_dispatch", hidden, torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
            num_experts, topk_idx.shape[1], -1, m), None, False)
        recv_x, scales, src_info, begin, count, recv_count = out
        handle = LowLatencyHandle(src_info, begin, count, recv_count, m, hidden, num_experts,
                                  half, use_fp8, self._state_type(half, ()))
        return ((recv_x, scales) if use_fp8 else recv_x), recv_count, handle

    def combine(self, x, topk_idx, topk_weights, handle, zero_copy: bool, out, wait):
        """combined_x [T, H] bf16, or None (the caller runs the Python path)."""
        m, hidden, e = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        obj = self._combine.get((m, hidden, e))
        if obj is None:
            return None
        comm = self.rt.comm
        result = _native(obj.call, x, bool(zero_copy), handle.src_info, handle.range_begin,
                         handle.range_count, topk_idx, topk_weights, out, wait,
                         handle.buffer_idx, comm.seq + 1,
                         jit.current_stream_handle(self.rt._dev_index))
        if result is None:
            return None
        self.calls += 1
        comm.begin_call(agreement.Signature(
            "low_latency_combine", hidden, x.dtype, e, topk_idx.shape[1],
            getattr(handle.backend_state, "call_seq", -1), m), None, False)
        return result


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


__all__ = ["EXTENSION", "LayoutHostPath", "LowLatencyHostPath", "load_extension"]
