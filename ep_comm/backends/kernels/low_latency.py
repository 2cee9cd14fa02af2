"""Host runtime of low-latency (decode) mode: ``kernels/low_latency.cu`` over NVSHMEM.

``LowLatencyRuntime`` owns one symmetric buffer (``ep_comm.runtime.nvshmem``), carved by
``ep_comm.core.regions.LowLatencyRegions`` for the sizes of each call, and launches the dispatch and
combine kernels on torch's current stream. Nothing here synchronises with the host or
allocates outside torch's caching allocator, so a dispatch + combine step can be captured in a
CUDA graph and replayed.

Halves of the double buffer
---------------------------
Consecutive dispatches alternate between two halves of the buffer (``handle.buffer_idx``);
a combine uses the half of its dispatch. So two dispatch results can be alive at once. Results
themselves (``recv_x``, scales, handle tensors) are fresh torch tensors, never views of the
symmetric buffer, except the zero-copy combine input (``get_next_low_latency_combine_buffer``).

Reuse of a half
---------------
Signal words (per half: count and arrival words of dispatch and combine) are zero between
calls: a receiver resets each word after reading it. A sender writes a word (and the rows) of
half ``b`` again only in a later call of the same kind on ``b``, and that send must come after
every destination has received the call before it there. In order (no receive hooks) the chain
of waits between the calls ensures it: rank p's next send on ``b`` comes after p received the
call in between, which this rank sent only after its own receive on ``b``. Receive hooks break
the chain (a review, 2026-12-07): ranks that run D0 send, D1 send, D0 receive, D2 send give p's
D2 send no chain to q's D0 receive, so D2 could land in half 0 before q has read it. So the
kernels acknowledge every receive (``kernels/cuda/low_latency.cu``, ``HalfSync``): the receive's
last block writes the receives completed on (kind, half) into ``ack[me]`` of every unmasked
rank, and each send first waits, bounded like every wait, until every unmasked destination's
word reaches the sends this rank made before it on (kind, half). In order the wait passes at
once; the cost is one signal per peer per receive. The counters live among the signal words
(device memory: CUDA graph replays keep them). A rank's own breach of "at most two results
alive" is still refused before any kernel (``check_send``): its send would wait for its own
receive, which comes later on the same stream. ``clean_low_latency_buffer`` zeroes every word
(after normal-mode use, or after a timeout) and synchronises the ranks.

Bounded waits
-------------
Every wait in the kernels compares ``%globaltimer`` with a deadline of
``ep_comm.runtime.comm.timeout_s()`` seconds. The first block that times out writes a status word into
pinned host memory and every waiting block exits. The host reads the word (no
synchronisation: it is host memory) at the start of every call, in each hook and in
``check_status()``, and raises ``CommTimeoutError`` naming this rank, the phase, the peer and
what was awaited. A buffer that timed out stays failed (every call raises) until
``clean_low_latency_buffer``.
"""
from __future__ import annotations

import dataclasses

import torch

from ep_comm.core import agreement, fp8
from ep_comm.runtime import jit, nvshmem
from ep_comm.runtime.comm import Comm, timeout_s
from ep_comm.backends.kernels import args, status
from ep_comm.core.constants import (FP8_BLOCK, LL_INFO_BAD_ID, LL_MAX_RANKS, LL_MAX_TOPK,
                                    LL_STATUS_WORDS, LL_THREADS)
from ep_comm.errors import CommTimeoutError, EpCommError, InputError, KernelError
from ep_comm.handles import LowLatencyHandle
from ep_comm.core.regions import LowLatencyRegions

#: Threads per block of both kernels (kernels/cuda/low_latency.cu ``kThreads``).
THREADS = LL_THREADS

# Phase bits (kernels/cuda/low_latency_common.cuh kSendPhase / kRecvPhase).
SEND_PHASE = args.LL_SEND_PHASE
RECV_PHASE = args.LL_RECV_PHASE

def grid_size(num_sms: int, *work: int) -> int:
    """Blocks of a launch: one per unit of the largest piece of work, at most one per SM (the
    kernels wait on each other's blocks, so every block must be resident), at least one."""
    return max(1, min(num_sms, max(work, default=1)))


def scales_shape(hidden: int, use_ue8m0: bool) -> tuple[int, torch.dtype]:
    """(columns, dtype) of the fp8 scales of one row: ``H / 128`` float32 or ``H / 512`` int32."""
    if use_ue8m0:
        return hidden // (4 * FP8_BLOCK), torch.int32
    return hidden // FP8_BLOCK, torch.float32


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 16-byte aligned data pointer (the kernels move rows as int4);
    a copy only for a view that starts mid-row of its storage."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


@dataclasses.dataclass(slots=True)
class LowLatencyState:
    """The kernels' part of a ``LowLatencyHandle`` (``backend_state``).

    Attributes:
        half: which half of the double buffer the dispatch used (its combine uses it too).
        keep: the dispatch's inputs (x, topk_idx), referenced until the receive is launched.
        received: truthy once the dispatch was received (at once without a hook; the hook's
            own list, filled when it is called, with one).
    """

    half: int
    keep: tuple
    received: object = (True,)


LL_DISPATCH_PER_CALL = args.LL_DISPATCH_PER_CALL
LL_COMBINE_PER_CALL = args.LL_COMBINE_PER_CALL


class LowLatencyRuntime:
    """Low-latency dispatch/combine for one Buffer (see the module docstring).

    Args:
        comm: the Buffer's Comm (rank, group, device).
        num_rdma_bytes: bytes of symmetric memory to hold (``Buffer.get_low_latency_rdma_size_hint``).
        allow_nvlink: store straight into NVLink peers' memory; False sends every byte with
            NVSHMEM puts (the RDMA path).
    """

    def __init__(self, comm: Comm, num_rdma_bytes: int, allow_nvlink: bool):
        from ep_comm.runtime import ipc
        from ep_comm.runtime import jit
        self.comm = comm
        self.rank, self.num_ranks = comm.rank, comm.num_ranks
        if self.num_ranks > LL_MAX_RANKS:
            raise InputError(f"low-latency kernels support at most {LL_MAX_RANKS} ranks, got "
                             f"{self.num_ranks}")
        self.device = comm.device
        self._dev_index = self.device.index
        self.nvlink = bool(allow_nvlink)
        self.num_rdma_bytes = num_rdma_bytes
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.module = jit.compile_kernels("low_latency", ["low_latency.cu"], nvshmem=True)
        self.sym = nvshmem.acquire(comm, max(num_rdma_bytes, 1))
        nvshmem.bind_module(self.module)
        self.base = self.sym.tensor.data_ptr()
        # Pinned, mapped host memory (the same primitive as the NVLink kernels): the host
        # reads it without synchronising, kernels write it through its device pointer.
        self._status = ipc.HostStatus(LL_STATUS_WORDS, self.device.index)
        self._mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        self._regions: dict[tuple[int, int, int], LowLatencyRegions] = {}
        # Bytes the regions are carved in: the requested size, the same on every rank (a
        # pooled buffer, at least that large, may be larger on some).
        self._capacity = max(num_rdma_bytes, 1)
        self._next_half = 0
        # Receive hooks not yet called, by (kind, half): (the hook's list, filled when called).
        # A send on a half whose previous receive is pending is refused (check_send); the C++
        # path declines while any hook is out (hooks_out), so the Python path checks.
        self._unreceived: dict[tuple[str, int], list] = {}
        self.hooks_out = 0
        self._hook_epoch = 0  # clean_low_latency_buffer forgets the hooks handed out before it
        # Read once per Buffer: a change of EP_COMM_TIMEOUT_S applies to Buffers created later.
        self._limit_s = timeout_s()
        self._timeout_ns_value = int(self._limit_s * 1e9)
        # Count words carry the call's tag unless EP_COMM_LL_KERNEL_AGREEMENT=0 (read once).
        self.tags_calls = agreement.ll_agreement_on()
        # plan key (kernel, shape, half, format) -> (jit.PreparedLaunch, per-call slots)
        self._plans: dict = {}
        # The C++ host path (host_path.LowLatencyHostPath), once enable_host_path() loaded it.
        self.host_path = None
        # Peers may write into this buffer as soon as they return: everyone's zeroes first.
        torch.cuda.synchronize(self.device)
        comm.barrier("low_latency/init")

    def enable_host_path(self):
        """Load the C++ host path of later calls (``host_path``); it learns each plan and
        shape from the Python path's calls. Returns it, or None where the extension is off or
        could not be built (``ep_comm.runtime.host_ext.status`` says why)."""
        if self.host_path is None:
            from ep_comm.backends.kernels import host_path
            ext = host_path.load_extension()
            if ext is not None:
                self.host_path = host_path.LowLatencyHostPath(self, ext, LowLatencyState)
        return self.host_path

    # ------------------------------------------------------------------ helpers
    def regions(self, m: int, hidden: int, num_experts: int) -> LowLatencyRegions:
        """The carving of shape (M, hidden, E): the signal words at one place for every shape,
        each half's data in that half's fixed area (``LowLatencyRegions``). Raises InputError
        where the Buffer is too small."""
        key = (m, hidden, num_experts)
        reg = self._regions.get(key)
        if reg is None:
            reg = LowLatencyRegions(m, hidden, self.num_ranks, num_experts, self._capacity)
            if reg.total_bytes > self._capacity:
                raise InputError(f"low-latency call needs {reg.total_bytes} symmetric bytes, the "
                                 f"Buffer holds {self._capacity}")
            self._regions[key] = reg
        return reg

    def _ptr(self, reg: LowLatencyRegions, name: str) -> int:
        return self.base + reg[name].offset

    def _half_sync(self, reg: LowLatencyRegions, kind: str, half: int) -> dict:
        """The kernel arguments of the acknowledged reuse of (``kind``, ``half``): its block
        counters, its progress words and its ack words (kernels/cuda/low_latency.cu HalfSync)."""
        return {"done_counter": self._ptr(reg, f"{kind}_done{half}"),
                "progress": self._ptr(reg, f"{kind}_progress{half}"),
                "ack_sig": self._ptr(reg, f"{kind}_ack{half}")}

    def _timeout_ns(self) -> int:
        return self._timeout_ns_value

    def check_status(self) -> None:
        """Raise the error a kernel reported (CommTimeoutError, CollectiveMismatchError), else
        the bad expert id a dispatch kernel found (InputError, then cleared: the call dropped
        only that entry, the Buffer stays usable); no device synchronisation."""
        words = self._status.read()
        if not any(words):
            return
        err = status.decode_status(words, status.LOW_LATENCY, self.rank, self._limit_s,
                                   self.comm.node_of(), seq=self.comm.seq)
        if err is not None:
            raise err
        bad = status.decode_bad_id(words)
        if bad is not None:
            self._status.clear(LL_INFO_BAD_ID)  # only these: a timeout may be written meanwhile
            for reg in self._regions.values():  # the reporter's claim, in whichever layout it ran
                at = reg["status_claim"].offset + 4
                self.sym.tensor[at:at + 4].zero_()
            raise bad

    def _build_plan(self, key: tuple, kernel: str, params, per_call: tuple, values: dict):
        """Build and keep the launch plan of ``key`` (the kernel and everything that fixes its
        other arguments; the caller found none) through a checked ``ArgBuffer`` of the first
        call's ``values``, with the slots of the ``per_call`` arguments in that order.
        Returns (prepared launch, slots)."""
        prepared = self.module.prepare(kernel, args.ArgBuffer(params, values), 1, THREADS)
        plan = self._plans[key] = (prepared, tuple(prepared.args.slot(n) for n in per_call))
        return plan

    def _launch(self, plan, grid: int, per_call_values: tuple) -> None:
        """Patch the per-call arguments of ``plan`` (pointers and sizes the plan's first call
        checked the kinds of) and launch it with one ``cuLaunchKernel``: the other arguments
        were written when the plan was built."""
        prepared, slots = plan
        for slot, value in zip(slots, per_call_values):
            slot.value = value
        prepared.grid = grid
        prepared.launch(jit.current_stream_handle(self._dev_index))

    def call_tag(self) -> int:
        """The current call's ``call_tag`` argument: its ``agreement.ll_tag`` (sequence number
        and signature hash, from ``Comm.call_words``) with the agreement on, else 0 (the
        kernels then write and read count words without tags)."""
        if not self.tags_calls:
            return 0
        words, _ = self.comm.call_words()
        return agreement.ll_tag(words, torch.cuda.is_current_stream_capturing())

    @staticmethod
    def _ptr_of(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    # ------------------------------------------------------------------ dispatch
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, *, use_fp8: bool, round_scale: bool,
                             use_ue8m0: bool, cumulative_local_expert_recv_stats,
                             dispatch_wait_recv_cost_stats, return_recv_hook: bool):
        """See ``Backend.low_latency_dispatch``. Returns (recv_x [L, R*M, H] fp8 or bf16,
        scales [L, R*M, G] column-major or None, recv_count [L] int32, handle, hook or None)."""
        self.check_status()
        r, m, dev = self.num_ranks, num_max_dispatch_tokens_per_rank, self.device
        t, hidden = x.shape
        k = topk_idx.shape[1]
        if k > LL_MAX_TOPK:
            raise InputError(f"low-latency kernels support top-k <= {LL_MAX_TOPK}, got {k}")
        local = num_experts // r
        rows = r * m
        reg = self.regions(m, hidden, num_experts)
        half = self._next_half
        self._next_half ^= 1
        x = _aligned16(x)
        topk_idx = topk_idx.contiguous()
        recv_x = torch.empty(local, rows, hidden, dtype=fp8.FP8_DTYPE if use_fp8 else x.dtype,
                             device=dev)
        recv_scales = None
        if use_fp8:
            g, sdtype = scales_shape(hidden, use_ue8m0)
            recv_scales = torch.empty(local, g, rows, dtype=sdtype, device=dev).transpose(1, 2)
        # the four int32 outputs in one allocation (a CUDA allocation costs ~3-4 us of host
        # time, a view ~1): src_info [L, R*M], range_begin / range_count [L, R], recv_count [L]
        ints = torch.empty(local * (rows + 2 * r + 1), dtype=torch.int32, device=dev)
        src_info = ints[:local * rows].view(local, rows)
        ranges = ints[local * rows:local * (rows + 2 * r)].view(2, local, r)
        range_begin, range_count = ranges[0], ranges[1]
        recv_count = ints[local * (rows + 2 * r):]
        kernel = "ep_ll_dispatch_fp8" if use_fp8 else "ep_ll_dispatch_bf16"
        round_flag = int(round_scale or use_ue8m0)
        per_call = (x.data_ptr(), topk_idx.data_ptr(), t, k, recv_x.data_ptr(),
                    0 if recv_scales is None else recv_scales.data_ptr(), src_info.data_ptr(),
                    range_begin.data_ptr(), range_count.data_ptr(), recv_count.data_ptr(),
                    self._ptr_of(cumulative_local_expert_recv_stats),
                    self._ptr_of(dispatch_wait_recv_cost_stats), self.call_tag())
        key = (kernel, m, hidden, num_experts, half, round_flag, int(use_ue8m0))
        plan = self._plans.get(key)
        if plan is None:
            values = dict(zip(LL_DISPATCH_PER_CALL, per_call + (0,)))
            values.update(
                hidden=hidden, num_experts=num_experts, num_ranks=r, rank=self.rank,
                max_tokens=m, round_scale=round_flag, ue8m0=int(use_ue8m0),
                nvlink=int(self.nvlink), send_stage=self._ptr(reg, f"dispatch_send{half}"),
                recv_msgs=self._ptr(reg, f"dispatch_recv{half}"),
                recv_count_sig=self._ptr(reg, f"dispatch_count{half}"),
                recv_arrive_sig=self._ptr(reg, f"dispatch_arrive{half}"),
                msg_stride=reg.msg_bytes, mask=self._mask.data_ptr(),
                host_status=self._status.device_ptr,
                status_claim=self._ptr(reg, "status_claim"), timeout_ns=self._timeout_ns(),
                **self._half_sync(reg, "dispatch", half))
            plan = self._build_plan(key, kernel, args.LL_DISPATCH, LL_DISPATCH_PER_CALL, values)
        send_grid = grid_size(self.num_sms, t, (num_experts + 31) // 32)
        recv_grid = grid_size(self.num_sms, local)
        # Inputs stay referenced by the hook (and the handle) until the receive is launched.
        keep = (x, topk_idx)
        handle = LowLatencyHandle(
            src_info=src_info, range_begin=range_begin, range_count=range_count,
            recv_count=recv_count, num_max_dispatch_tokens_per_rank=m, hidden=hidden,
            num_experts=num_experts, buffer_idx=half, use_fp8=use_fp8,
            backend_state=LowLatencyState(half=half, keep=keep))
        if return_recv_hook:
            handle.backend_state.received = self._expect_receive("dispatch", half)
        if not return_recv_hook:
            grid = max(send_grid, recv_grid)
            self._launch(plan, grid, per_call + (SEND_PHASE | RECV_PHASE,))
            if self.host_path is not None:  # later calls of this shape can go through C++
                cols, sdtype = scales_shape(hidden, use_ue8m0)
                self.host_path.learn_dispatch(
                    plan[0], half, m=m, hidden=hidden, num_experts=num_experts, use_fp8=use_fp8,
                    round_scale=round_scale, use_ue8m0=use_ue8m0, scale_cols=cols,
                    scales_int32=sdtype == torch.int32, t=t, k=k,
                    has_cum=cumulative_local_expert_recv_stats is not None,
                    has_wait=dispatch_wait_recv_cost_stats is not None, grid=grid,
                    call_tag=per_call[-1])
            return recv_x, recv_scales, recv_count, handle, None
        self._launch(plan, send_grid, per_call + (SEND_PHASE,))
        return recv_x, recv_scales, recv_count, handle, self._hook(
            plan, recv_grid, per_call + (RECV_PHASE,), keep, handle.backend_state.received)

    def check_send(self, kind: str, handle: LowLatencyHandle | None = None) -> None:
        """Before a low-latency call is numbered (local, no device work): refuse a ``kind``
        ("dispatch" or "combine", of ``handle``) whose buffer half holds the same kind's call
        before last not yet received (its send would land where that receive still reads,
        here and on the peers: "at most two results alive", the rule of DeepEP's API), and a
        combine of a dispatch not yet received. InputError."""
        if kind == "combine":
            state = handle.backend_state
            if isinstance(state, LowLatencyState) and not state.received:
                raise InputError("low_latency_combine: the dispatch that made this handle has "
                                 "not been received: call its receive hook first")
            half = handle.buffer_idx
        else:
            half = self._next_half
        pending = self._unreceived.get((kind, half))
        if pending is not None and not pending:
            raise InputError(
                f"low_latency_{kind}: the {kind} before last (buffer half {half}) has not been "
                f"received: call its receive hook before this {kind} (at most two results are "
                f"alive at once; this call would overwrite the one not yet received)")

    def _expect_receive(self, kind: str, half: int) -> list:
        """The list a hook of (``kind``, ``half``) fills when called (see check_send)."""
        called: list = []
        self._unreceived[kind, half] = called
        self.hooks_out += 1
        return called

    def _hook(self, plan, grid: int, per_call_values: tuple, keep, called: list):
        """A callable that launches the receive phase once, on the caller's current stream
        (with all of this call's per-call arguments: another call may have used the plan);
        ``called`` is filled when it is (``_expect_receive``)."""
        epoch = self._hook_epoch

        def hook():
            if called:
                raise InputError("this receive hook was already called (each hook receives once)")
            called.append(True)
            if epoch == self._hook_epoch:
                self.hooks_out -= 1
            self.check_status()
            _ = keep  # the send's inputs live until the receive is launched
            self._launch(plan, grid, per_call_values)

        return hook

    # ------------------------------------------------------------------ combine
    def low_latency_combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, *,
                            zero_copy: bool, use_logfmt: bool, out, return_recv_hook: bool,
                            combine_wait_recv_cost_stats):
        """See ``Backend.low_latency_combine``. Returns (combined_x [T, H] bf16, hook or None)."""
        self.check_status()
        r = self.num_ranks
        m, hidden, num_experts = (handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                                  handle.num_experts)
        t, k = topk_idx.shape
        if k > LL_MAX_TOPK:
            raise InputError(f"low-latency kernels support top-k <= {LL_MAX_TOPK}, got {k}")
        reg = self.regions(m, hidden, num_experts)
        half = handle.buffer_idx
        key = ("ep_ll_combine", m, hidden, num_experts, half)
        plan = self._plans.get(key)
        # the staging view: the rows themselves with zero_copy, and the plan's fixed pointer
        send_stage = (self.get_next_low_latency_combine_buffer(handle)
                      if zero_copy or plan is None else None)
        src = send_stage if zero_copy else _aligned16(x)
        topk_idx = topk_idx.contiguous()
        topk_weights = topk_weights.contiguous()
        if out is not None and (not out.is_contiguous() or out.data_ptr() % 16):
            raise InputError("out= must be a contiguous [T, H] bf16 tensor whose data is "
                             "16-byte aligned (the kernels store 16 bytes at a time)")
        result = out if out is not None else torch.empty(t, hidden, dtype=torch.bfloat16,
                                                         device=self.device)
        per_call = (src.data_ptr(), int(zero_copy), handle.src_info.data_ptr(),
                    handle.range_begin.data_ptr(), handle.range_count.data_ptr(),
                    topk_idx.data_ptr(), topk_weights.data_ptr(), result.data_ptr(), t, k,
                    self._ptr_of(combine_wait_recv_cost_stats), self.call_tag())
        if plan is None:
            values = dict(zip(LL_COMBINE_PER_CALL, per_call + (0,)))
            values.update(
                hidden=hidden, num_experts=num_experts, num_ranks=r, rank=self.rank,
                max_tokens=m, nvlink=int(self.nvlink), send_stage=send_stage.data_ptr(),
                recv_rows=self._ptr(reg, f"combine_recv{half}"),
                recv_count_sig=self._ptr(reg, f"combine_count{half}"),
                recv_arrive_sig=self._ptr(reg, f"combine_arrive{half}"),
                mask=self._mask.data_ptr(), host_status=self._status.device_ptr,
                status_claim=self._ptr(reg, "status_claim"), timeout_ns=self._timeout_ns(),
                **self._half_sync(reg, "combine", half))
            plan = self._build_plan(key, "ep_ll_combine", args.LL_COMBINE, LL_COMBINE_PER_CALL,
                                    values)
        local = num_experts // r
        send_grid = grid_size(self.num_sms, local)
        recv_grid = grid_size(self.num_sms, t)
        keep = (src, topk_idx, topk_weights, handle)
        if not return_recv_hook:
            grid = max(send_grid, recv_grid)
            self._launch(plan, grid, per_call + (SEND_PHASE | RECV_PHASE,))
            if self.host_path is not None:
                self.host_path.learn_combine(
                    plan[0], half, m=m, hidden=hidden, num_experts=num_experts, t=t, k=k,
                    has_out=out is not None, has_wait=combine_wait_recv_cost_stats is not None,
                    grid=grid, call_tag=per_call[-1])
            return result, None
        self._launch(plan, send_grid, per_call + (SEND_PHASE,))
        return result, self._hook(plan, recv_grid, per_call + (RECV_PHASE,), keep,
                                  self._expect_receive("combine", half))

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """[L, R * M, H] bf16 view of the symmetric combine buffer of the handle's half."""
        m, hidden, e = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        reg = self.regions(m, hidden, e)
        region = reg[f"combine_send{handle.buffer_idx}"]
        shape = (e // self.num_ranks, self.num_ranks * m, hidden)
        return self.sym.view(region.offset, region.nbytes, torch.bfloat16, shape)

    # ------------------------------------------------------------------ maintenance
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """Zero every signal word and the status, then synchronise the ranks (collective).

        Order: every rank stops (its device synchronised: its queued sends, which write into
        the peers' buffers, have completed; bounded, the kernels give up at their timeout),
        then a barrier, so no peer's send can land after the zeroing (after a timeout on this
        rank, a peer's send phases may still be queued); then zero, synchronise, and a second
        barrier, so no rank sends into a buffer before its owner zeroed it."""
        reg = self.regions(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        torch.cuda.synchronize(self.device)
        self.comm.barrier("low_latency/clean/stopped")
        self.sym.tensor[:reg.signals_end].zero_()
        self._status.clear()
        self._next_half = 0
        self._unreceived.clear()  # the hooks handed out before are void
        self.hooks_out = 0
        self._hook_epoch += 1
        torch.cuda.synchronize(self.device)
        self.comm.barrier("low_latency/clean")

    def mask_buffer(self) -> torch.Tensor:
        """[R] int32 device tensor, 1 = masked: neither sent to nor waited for."""
        return self._mask

    def destroy(self) -> None:
        """Return the symmetric buffer to the pool (local; see ep_comm.runtime.nvshmem)."""
        if self.sym is None:
            return
        # Kernels still in flight would write into memory a later Buffer may get. They are
        # bounded by the timeout, so this wait is bounded too.
        torch.cuda.synchronize(self.device)
        self.host_path = None  # it reads the status words freed below
        self.sym.release()
        self.sym = None
        self._status.free()


__all__ = ["LowLatencyRuntime", "grid_size", "scales_shape"]
