"""Normal mode over NVLink: the host side of ``kernels/layout.cu`` and ``kernels/intranode.cu``.

``IntranodeRuntime(comm, num_nvl_bytes)`` owns this rank's NVLink buffer (``ep_comm.runtime.ipc``,
mapped on every local rank), a host-mapped status word, the communication stream, and the
compiled kernels. ``ep_comm.backends.kernels.backend`` routes normal-mode calls here with arguments that
``Buffer`` already checked; the results equal the reference backend's (``ep_comm.backends.reference``)
bit for bit, handles included (``DispatchHandle``; private state in ``backend_state``).

A dispatch without a handle is two kernels: ``nvl_notify`` exchanges the counts (tokens per
rank, per expert, tokens on each rank) and builds the rank prefix matrix on the GPU; then
``nvl_dispatch`` moves the tokens. Without ``num_worst_tokens`` the host waits for the notify
kernel to learn how many rows to allocate (after checking its status word, so a peer that never
came raises instead of hanging); with it, nothing waits and the calls are CUDA-graph capturable.
A cached dispatch (``handle=``) runs ``nvl_dispatch`` alone; combine is ``nvl_combine``.

Launch geometry (``launch_geometry``): ``config.num_sms`` blocks, one sender and one receiver
block per channel, ``KERNEL_THREADS`` threads each; tokens travel in windows of
``nvl_window(config)`` tokens through rings of ``config.nvl_buffer`` slots.

Failures: every wait in the kernels is bounded by ``EP_COMM_TIMEOUT_S``. A kernel that gives up
writes the status word; the host reads it after the notify synchronisation and before every
call, and raises ``CommTimeoutError`` naming this rank, the phase, the peer and the channel.
The runtime is then unusable (peers disagree about the sequence of calls) but ``destroy()``
still frees everything.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch

from ep_comm.runtime.comm import timeout_s
from ep_comm.backends.kernels import status
from ep_comm.config import Config
from ep_comm.core.constants import (FP8_BLOCK, NORMAL_MAX_TOPK, NVL_INFO_EXPERT_COUNTS,
                                    NVL_INFO_NUM_RECV, NVL_MAX_CHANNELS, NVL_MAX_LOCAL_EXPERTS,
                                    NVL_MAX_RANKS,
                                    NVL_MAX_WINDOW, NVL_STATUS_WORDS, NVL_WARPS, align)
from ep_comm.errors import BackendUnavailableError, EpCommError, InputError
from ep_comm.handles import DispatchHandle
from ep_comm.core.regions import IntranodeRegions

#: Threads of a dispatch/combine block (kernels/cuda/intranode_common.cuh kThreads).
KERNEL_THREADS = NVL_WARPS * 32
#: Dynamic shared memory of a dispatch/combine block (intranode_common.cuh kStageBytes): each
#: warp stages 8 KiB of row data through cp.async, 16 int4 per lane in flight.
KERNEL_SMEM = NVL_WARPS * 32 * 16 * 16
#: Threads of the notify block and of a layout block.
NOTIFY_THREADS = 256
LAYOUT_THREADS = 256


@dataclasses.dataclass(slots=True)
class NvlDispatchState:
    """The NVLink dispatch's part of a ``DispatchHandle`` (``backend_state``).

    Attributes:
        num_tokens_of_rank: [R] int32 device, tokens on each rank (from the notify step).
        num_recv: [1] int32 device, rows received (the kernels read it; no host sync).
        counts_host: received rows per local expert (list of L ints), None with
            ``num_worst_tokens`` (then nothing waits for the host).
    """

    num_tokens_of_rank: torch.Tensor
    num_recv: torch.Tensor
    counts_host: list | None


def nvl_window(config: Config) -> int:
    """Tokens per window: ``nvl_chunk``, at most one warp ballot (32) and at most half the
    ring, so a combine receiver waiting for a whole window never blocks a sender that waits
    for room (a window of the sender plus one of the receiver always fit in the ring)."""
    return min(config.nvl_chunk, NVL_MAX_WINDOW, config.nvl_buffer // 2)


def launch_geometry(config: Config, num_device_sms: int | None = None) -> tuple[int, int]:
    """(channels, blocks) of a dispatch/combine launch for ``config``; raises ``InputError`` if
    the config cannot run (every block must be resident at once: they wait on each other)."""
    channels = config.num_channels
    if channels > NVL_MAX_CHANNELS:
        raise InputError(f"Config.num_sms={config.num_sms} gives {channels} channels; the NVLink "
                         f"kernels support at most {NVL_MAX_CHANNELS} (num_sms <= "
                         f"{2 * NVL_MAX_CHANNELS})")
    if num_device_sms is not None and 2 * channels > num_device_sms:
        raise InputError(f"Config.num_sms={config.num_sms} is more than the {num_device_sms} SMs "
                         "of this GPU; the kernels need all their blocks resident at once")
    if nvl_window(config) < 1:
        raise InputError(f"Config.nvl_buffer={config.nvl_buffer} must be >= 2 (a ring holds two "
                         "windows)")
    return channels, 2 * channels


def check_sizes(num_ranks: int, num_experts: int, num_topk: int) -> None:
    """Limits of the kernels' fixed-size arrays, as ``InputError`` before anything runs."""
    if num_ranks > NVL_MAX_RANKS:
        raise InputError(f"the NVLink kernels support at most {NVL_MAX_RANKS} ranks per node, "
                         f"got {num_ranks}")
    if num_experts // num_ranks > NVL_MAX_LOCAL_EXPERTS:
        raise InputError(f"{num_experts // num_ranks} experts per rank; the NVLink kernels "
                         f"support at most {NVL_MAX_LOCAL_EXPERTS}")
    if num_topk > NORMAL_MAX_TOPK:
        raise InputError(f"top-k {num_topk} is more than the {NORMAL_MAX_TOPK} the kernels carry")


def dispatch_outputs(rows: int, x: torch.Tensor, x_scales, topk_idx, topk_weights):
    """Uninitialised outputs of a dispatch kernel (it writes every row, padding included):
    recv_x [rows, H] (x's dtype), recv_scales [rows, H / 128] float32 (FP8 only), recv_idx
    [rows, K] int64 and recv_w [rows, K] float32 (when the call has top-k ids / weights)."""
    dev, hidden = x.device, x.shape[1]
    num_topk = topk_idx.shape[1] if topk_idx is not None else (
        topk_weights.shape[1] if topk_weights is not None else 0)
    recv_x = torch.empty(rows, hidden, dtype=x.dtype, device=dev)
    recv_scales = (torch.empty(rows, hidden // FP8_BLOCK, dtype=torch.float32, device=dev)
                   if x_scales is not None else None)
    recv_idx = (torch.empty(rows, num_topk, dtype=torch.int64, device=dev)
                if topk_idx is not None else None)
    recv_w = (torch.empty(rows, num_topk, dtype=torch.float32, device=dev)
              if topk_weights is not None else None)
    return recv_x, recv_scales, recv_idx, recv_w


def combine_outputs(num_tokens: int, x: torch.Tensor, topk_weights, biases):
    """Outputs of a combine kernel for input rows ``x`` [N, H]: out [T, H] bf16 and, with
    weights, out_w [T, K] float32; and the kernel's two bias pointers from ``biases`` (0 to 2
    [T, H] bf16 tensors, checked by the Buffer), None where absent."""
    dev = x.device
    out = torch.empty(num_tokens, x.shape[1], dtype=torch.bfloat16, device=dev)
    out_w = (torch.empty(num_tokens, topk_weights.shape[1], dtype=torch.float32, device=dev)
             if topk_weights is not None else None)
    bias0, bias1 = (tuple(biases) + (None, None))[:2]
    return out, out_w, bias0, bias1


def aligned_counts(counts: list[int], alignment: int) -> list[int]:
    """Each count rounded up to ``expert_alignment`` (``num_recv_tokens_per_expert_list``)."""
    return [align(c, alignment) for c in counts]


@functools.lru_cache(maxsize=64)
def regions_for(config: Config, hidden: int, num_ranks: int) -> IntranodeRegions:
    """The buffer layout of a call with rows of ``hidden`` elements (bf16-sized slots)."""
    return IntranodeRegions(config, hidden * 2, num_ranks)


class IntranodeRuntime:
    """Normal-mode dispatch/combine of one Buffer over NVLink (see the module docstring)."""

    def __init__(self, comm, num_nvl_bytes: int):
        from ep_comm.runtime import ipc
        from ep_comm.runtime import jit
        self.comm = comm
        self.rank, self.num_ranks = comm.rank, comm.num_ranks
        self.device = comm.device
        if self.num_ranks > NVL_MAX_RANKS:
            raise BackendUnavailableError(
                "kernels", f"{self.num_ranks} ranks share NVLink here; the intranode kernels "
                f"support at most {NVL_MAX_RANKS}", "Use backend='reference'.")
        self.num_nvl_bytes = num_nvl_bytes
        self.num_device_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._broken: EpCommError | None = None
        self._module = jit.compile_kernels("intranode", ["intranode.cu"], nvshmem=False)
        self._layout_module = jit.compile_kernels("layout", ["layout.cu"], nvshmem=False)
        self.status = ipc.HostStatus(NVL_STATUS_WORDS, self.device.index)
        self.nvl = ipc.NvlBuffer(comm, num_nvl_bytes) if num_nvl_bytes > 0 else None
        self._stream = torch.cuda.Stream(self.device)

    # ------------------------------------------------------------------ plumbing
    def comm_stream(self):
        return self._stream

    def _check_alive(self) -> None:
        if self._broken is not None:
            raise EpCommError(f"this Buffer's NVLink kernels failed earlier ({self._broken}); "
                              "destroy it and create a new one") from self._broken
        if self.nvl is None:
            raise InputError("normal-mode dispatch/combine need a Buffer with num_nvl_bytes > 0")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        """Raise the failure a kernel reported in the status word, if any (no device sync)."""
        err = status.decode_status(self.status.read(NVL_INFO_NUM_RECV), status.NVLINK,
                                   self.rank, timeout_s())
        if err is not None:
            self._broken = err
            raise err

    def _timeout_ns(self) -> np.uint64:
        return np.uint64(int(timeout_s() * 1e9))

    def _buffer_args(self, regions: IntranodeRegions):
        r = regions.regions
        return (np.int64(r["ctrl"].offset), np.int64(r["tail"].offset), np.int64(r["head"].offset),
                np.int64(r["ring"].offset), np.int64(regions.slot_bytes))

    def _check_fits(self, regions: IntranodeRegions) -> None:
        if regions.total_bytes > self.num_nvl_bytes:
            from ep_comm.errors import BufferTooSmallError
            raise BufferTooSmallError("num_nvl_bytes", regions.total_bytes, self.num_nvl_bytes,
                                      "this NVLink call")

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """-> (num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool), from topk_idx [T, K] int64."""
        t, k = topk_idx.shape
        r, dev = self.num_ranks, topk_idx.device
        counts = torch.zeros(r + num_experts, dtype=torch.int32, device=dev)
        in_rank = torch.empty(t, r, dtype=torch.bool, device=dev)
        if t > 0:
            self._layout_module.launch(
                "nvl_get_dispatch_layout", math.ceil(t / LAYOUT_THREADS), LAYOUT_THREADS,
                (topk_idx, t, k, num_experts, r, counts[:r], counts[r:], in_rank),
                shared_mem=(r + num_experts) * 4)
        return counts[:r], None, counts[r:], in_rank

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, x_scales, *, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                 is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, num_experts,
                 expert_alignment, num_worst_tokens, config):
        """See ``Backend.dispatch``. x: [T, H] bf16 or fp8, x_scales: [T, H / 128] float32."""
        self._check_alive()
        r, me, dev = self.num_ranks, self.rank, x.device
        t, hidden = x.shape
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        check_sizes(r, num_experts, num_topk)
        channels, blocks = launch_geometry(config, self.num_device_sms)
        regions = regions_for(config, hidden, r)
        self._check_fits(regions)
        local = num_experts // r
        stream = torch.cuda.current_stream(dev)
        if handle is None:
            prefix = torch.empty(r, r, dtype=torch.int32, device=dev)
            recv_per_expert = torch.empty(local, dtype=torch.int32, device=dev)
            tokens_of_rank = torch.empty(r, dtype=torch.int32, device=dev)
            num_recv_dev = torch.empty(1, dtype=torch.int32, device=dev)
            ntpr = num_tokens_per_rank.to(torch.int32)
            reg = regions.regions
            self._module.launch("nvl_notify", 1, NOTIFY_THREADS, (
                self.nvl.peer_ptrs_dev, me, r, t, local, num_worst_tokens, ntpr,
                num_tokens_per_expert, np.int64(reg["ctrl"].offset),
                np.int64(reg["notify_flag"].offset), np.int64(reg["notify_counts"].offset),
                prefix, recv_per_expert, tokens_of_rank, num_recv_dev, np.uint64(self.status.device_ptr),
                self._timeout_ns()))
            if num_worst_tokens > 0:
                n_recv, rows, counts_host = -1, num_worst_tokens, None
            else:
                stream.synchronize()  # bounded: the kernel gives up after the timeout
                self._raise_if_failed()
                words = self.status.read(NVL_INFO_EXPERT_COUNTS + local)
                n_recv = words[NVL_INFO_NUM_RECV]
                rows = n_recv
                counts_host = words[NVL_INFO_EXPERT_COUNTS:]  # = recv_per_expert, no D2H copy
            send_pos = torch.empty(t, r, dtype=torch.int32, device=dev)
            # every row written by nvl_dispatch, padding rows included (-1)
            src_idx = torch.empty(rows, dtype=torch.int32, device=dev)
            src_rank = torch.empty(rows, dtype=torch.int32, device=dev)
            handle = DispatchHandle(
                rank=me, num_ranks=r, num_experts=num_experts, is_token_in_rank=is_token_in_rank,
                num_tokens_per_rank=ntpr, rank_prefix_matrix=prefix, send_pos=send_pos,
                recv_src_idx=src_idx, recv_src_rank=src_rank, num_recv_tokens=n_recv,
                num_recv_tokens_per_expert=recv_per_expert, num_worst_tokens=num_worst_tokens,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                backend_state=NvlDispatchState(num_tokens_of_rank=tokens_of_rank,
                                              num_recv=num_recv_dev, counts_host=counts_host))
            write_send_pos = send_pos
        else:
            state = _intranode_state(handle)
            num_recv_dev = state.num_recv
            counts_host = state.counts_host
            rows = handle.num_recv_rows
            write_send_pos = None  # the handle has it: same routes
        pad = handle.num_worst_tokens > 0
        # Every row of these is written by nvl_dispatch (padding rows: zeros, ids -1).
        recv_x, recv_scales, recv_idx, recv_w = dispatch_outputs(rows, x, x_scales, topk_idx,
                                                                 topk_weights)
        row_bytes = hidden * x.element_size()
        offs = regions.slot_offsets()
        self._module.launch("nvl_dispatch", blocks, KERNEL_THREADS, (
            self.nvl.peer_ptrs_dev, me, r, channels, config.nvl_buffer, nvl_window(config),
            *self._buffer_args(regions), offs["payload"], offs["scales"], offs["topk_idx"],
            offs["topk_weights"], x, row_bytes // 16, x_scales,
            hidden // FP8_BLOCK if x_scales is not None else 0, topk_idx, topk_weights, num_topk,
            local, handle.is_token_in_rank, t, handle.rank_prefix_matrix, write_send_pos, recv_x,
            recv_scales, recv_idx, recv_w, handle.recv_src_idx, handle.recv_src_rank, rows,
            num_recv_dev, 1 if pad else 0, np.uint64(self.status.device_ptr), self._timeout_ns()),
            shared_mem=KERNEL_SMEM)
        count_list = [] if pad else aligned_counts(counts_host, expert_alignment)
        return recv_x, recv_scales, recv_idx, recv_w, count_list, handle

    # ------------------------------------------------------------------ combine
    def combine(self, x, handle, topk_weights, biases, config):
        """See ``Backend.combine``. x: [N, H] bf16 -> ([T, H] bf16, [T, K] float32 or None)."""
        self._check_alive()
        state = _intranode_state(handle)
        r, me = self.num_ranks, self.rank
        rows, hidden = x.shape
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        check_sizes(r, handle.num_experts, num_topk)
        channels, blocks = launch_geometry(config, self.num_device_sms)
        regions = regions_for(config, hidden, r)
        self._check_fits(regions)
        t = handle.num_tokens
        out, out_w, bias0, bias1 = combine_outputs(t, x, topk_weights, biases)
        offs = regions.slot_offsets()
        self._module.launch("nvl_combine", blocks, KERNEL_THREADS, (
            self.nvl.peer_ptrs_dev, me, r, channels, config.nvl_buffer, nvl_window(config),
            *self._buffer_args(regions), offs["payload"], offs["topk_weights"], x, hidden * 2 // 16,
            topk_weights, num_topk, handle.recv_src_idx, handle.rank_prefix_matrix,
            state.num_tokens_of_rank, handle.is_token_in_rank, handle.send_pos, t, bias0, bias1,
            out, out_w, np.uint64(self.status.device_ptr), self._timeout_ns()),
            shared_mem=KERNEL_SMEM)
        return out, out_w

    # ------------------------------------------------------------------ teardown
    def destroy(self) -> None:
        """Free the NVLink buffer (after the peers unmapped it) and the status word. Works after
        a failure too: then the ranks do not meet first (a peer may be gone)."""
        if self.nvl is not None:
            self.nvl.free(synchronize_peers=self._broken is None)
            self.nvl = None
        else:
            torch.cuda.synchronize(self.device)
        if self.status is not None:
            self.status.free()
            self.status = None


def _intranode_state(handle: DispatchHandle) -> NvlDispatchState:
    state = handle.backend_state
    if not isinstance(state, NvlDispatchState):
        raise InputError("this handle was not made by the kernels backend's NVLink dispatch "
                         "(a reference-backend handle cannot drive the kernels)")
    return state
