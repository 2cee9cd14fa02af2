"""Host runtime of low-latency (decode) mode: ``kernels/low_latency.cu`` over NVSHMEM.

``LowLatencyRuntime`` owns one symmetric buffer (``ep_comm.nvshmem_runtime``), carved by
``ep_comm.regions.LowLatencyRegions`` for the sizes of each call, and launches the dispatch and
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
calls: a receiver resets each word after reading it. A sender writes a word of half ``b`` again
only in a later call on ``b``; that call starts after the receiver's reset because of the
chain of waits between them: rank p's next send on ``b`` comes after p received the call in
between (on the other half), which this rank sent only after its own receive on ``b`` (stream
order). The chain holds as long as every rank receives (calls the hook of) a dispatch or
combine before it sends the call after next; that is the "at most two results alive" rule of
the API. ``clean_low_latency_buffer`` zeroes every word (after normal-mode use, or after a
timeout) and synchronises the ranks.

Bounded waits
-------------
Every wait in the kernels compares ``%globaltimer`` with a deadline of
``ep_comm.comm.timeout_s()`` seconds. The first block that times out writes a status word into
pinned host memory and every waiting block exits. The host reads the word (no
synchronisation: it is host memory) at the start of every call, in each hook and in
``check_status()``, and raises ``CommTimeoutError`` naming this rank, the phase, the peer and
what was awaited. A buffer that timed out stays failed (every call raises) until
``clean_low_latency_buffer``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ep_comm import fp8, nvshmem_runtime
from ep_comm.comm import Comm, timeout_s
from ep_comm.config import FP8_BLOCK
from ep_comm.errors import CommTimeoutError, EpCommError, InputError, KernelError
from ep_comm.handles import LowLatencyHandle
from ep_comm.regions import LowLatencyRegions

#: Threads per block of both kernels (kernels/low_latency.cu ``kThreads``).
THREADS = 1024
#: Largest top-k the kernels route (one routing warp per top-k slot: ``kMaxTopk``).
MAX_TOPK = THREADS // 32
#: Most ranks (one waiting thread per source rank: ``kMaxRanks``).
MAX_RANKS = THREADS

# Phase bits (kernels/low_latency_common.cuh kSendPhase / kRecvPhase).
SEND_PHASE = 1
RECV_PHASE = 2

# Host status word, int32[8] (low_latency_common.cuh): [0] code, [1] phase, [2] peer,
# [3] index (expert), [4] what was awaited, [5] value seen, [6] value wanted.
STATUS_WORDS = 8
STATUS_TIMEOUT = 1
_PHASES = {1: "low_latency_dispatch/recv", 2: "low_latency_combine/recv"}

# Kernel parameters in signature order (kernels/low_latency.cu EP_LL_DISPATCH_PARAMS and
# ep_ll_combine), each with its C kind: "p" pointer (uint64), "i" int (int32), "u64" uint64_t.
# tests/test_low_latency_host.py parses the .cu file and checks both lists against it.
DISPATCH_PARAMS = (
    ("x", "p"), ("topk_idx", "p"), ("num_tokens", "i"), ("num_topk", "i"), ("hidden", "i"),
    ("num_experts", "i"), ("num_ranks", "i"), ("rank", "i"), ("max_tokens", "i"),
    ("round_scale", "i"), ("ue8m0", "i"), ("nvlink", "i"), ("phases", "i"),
    ("send_stage", "p"), ("recv_msgs", "p"), ("recv_count_sig", "p"), ("recv_arrive_sig", "p"),
    ("msg_stride", "i"), ("mask", "p"), ("recv_x", "p"), ("recv_scales", "p"),
    ("src_info", "p"), ("range_begin", "p"), ("range_count", "p"), ("recv_count", "p"),
    ("cum_stats", "p"), ("wait_stats", "p"), ("host_status", "p"), ("status_claim", "p"),
    ("timeout_ns", "u64"),
)
COMBINE_PARAMS = (
    ("x", "p"), ("zero_copy", "i"), ("src_info", "p"), ("range_begin", "p"),
    ("range_count", "p"), ("topk_idx", "p"), ("topk_weights", "p"), ("out", "p"),
    ("num_tokens", "i"), ("num_topk", "i"), ("hidden", "i"), ("num_experts", "i"),
    ("num_ranks", "i"), ("rank", "i"), ("max_tokens", "i"), ("nvlink", "i"), ("phases", "i"),
    ("send_stage", "p"), ("recv_rows", "p"), ("recv_count_sig", "p"), ("recv_arrive_sig", "p"),
    ("done_counter", "p"), ("mask", "p"), ("wait_stats", "p"), ("host_status", "p"),
    ("status_claim", "p"), ("timeout_ns", "u64"),
)


def pack_args(params, values: dict) -> list:
    """Kernel arguments in signature order as the numpy scalars cuda.core passes by value.

    Args:
        params: ``DISPATCH_PARAMS`` or ``COMBINE_PARAMS``.
        values: name -> int (pointers as integer addresses, 0 for null; bools as 0/1).

    Raises:
        EpCommError: a parameter is missing, unknown, or out of its C type's range.
    """
    names = [n for n, _ in params]
    extra = set(values) - set(names)
    missing = [n for n in names if n not in values]
    if extra or missing:
        raise EpCommError(f"ep_comm internal: kernel arguments missing {missing}, unknown "
                          f"{sorted(extra)}")
    out = []
    for name, kind in params:
        v = int(values[name])
        if kind == "i":
            if not -2**31 <= v < 2**31:
                raise EpCommError(f"ep_comm internal: kernel argument {name}={v} is not an int32")
            out.append(np.int32(v))
        else:
            if not 0 <= v < 2**64:
                raise EpCommError(f"ep_comm internal: kernel argument {name}={v} is not a uint64")
            out.append(np.uint64(v))
    return out


def decode_status(words, rank: int, limit_s: float, node=None) -> Exception | None:
    """The error a status word reports, or None when it reports nothing.

    Args:
        words: the 8 int32 of the host status word.
        rank: this rank (the one whose kernel timed out).
        limit_s: the timeout the kernel ran with, in seconds.
    """
    code = int(words[0])
    if code == 0:
        return None
    if code != STATUS_TIMEOUT:
        return KernelError(f"rank {rank}: low-latency kernel reported unknown status {code} "
                           f"(words {list(map(int, words))})")
    phase = _PHASES.get(int(words[1]), f"low_latency/unknown phase {int(words[1])}")
    peer, index, what = int(words[2]), int(words[3]), int(words[4])
    seen, wanted = int(words[5]), int(words[6])
    if phase.startswith("low_latency_dispatch"):
        thing = f"tokens for local expert {index}"
    else:
        thing = f"expert outputs of global expert {index}"
    if what == 0:
        waited = f"the count of {thing} (count word still {seen})"
    else:
        waited = f"{thing} ({seen} of {wanted} arrived)"
    return CommTimeoutError(rank, phase, waited, limit_s, peer, node)


def grid_size(num_sms: int, *work: int) -> int:
    """Blocks of a launch: one per unit of the largest piece of work, at most one per SM (the
    kernels wait on each other's blocks, so every block must be resident), at least one."""
    return max(1, min(num_sms, max(work, default=1)))


def scales_shape(hidden: int, use_ue8m0: bool) -> tuple[int, torch.dtype]:
    """(columns, dtype) of the fp8 scales of one row: ``H / 128`` float32 or ``H / 512`` int32."""
    if use_ue8m0:
        return hidden // (4 * FP8_BLOCK), torch.int32
    return hidden // FP8_BLOCK, torch.float32


def kernel_signature(source: str, kernel: str) -> list[tuple[str, str]]:
    """(name, kind) of each parameter of ``kernel`` in the .cu text (macros expanded one level).

    For the CPU test that keeps ``DISPATCH_PARAMS`` / ``COMBINE_PARAMS`` in step with the kernels.
    """
    text = re.sub(r"\\\n", " ", source)
    macros = dict(re.findall(r"#define\s+(\w+)\s+(.*)", text))
    m = re.search(r"\b" + kernel + r"\s*\(([^)]*)\)", text)
    if m is None:
        raise ValueError(f"kernel {kernel} not found")
    params = m.group(1).strip()
    if params in macros:
        params = macros[params]
    out = []
    for p in params.split(","):
        p = p.strip()
        name = re.findall(r"\w+", p)[-1]
        if "*" in p:
            kind = "p"
        elif re.search(r"\buint64_t\b", p):
            kind = "u64"
        elif re.search(r"\bint\b", p):
            kind = "i"
        else:
            raise ValueError(f"unknown parameter type in {p!r}")
        out.append((name, kind))
    return out


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 16-byte aligned data pointer (the kernels move rows as int4);
    a copy only for a view that starts mid-row of its storage."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class LowLatencyRuntime:
    """Low-latency dispatch/combine for one Buffer (see the module docstring).

    Args:
        comm: the Buffer's Comm (rank, group, device).
        num_rdma_bytes: bytes of symmetric memory to hold (``Buffer.get_low_latency_rdma_size_hint``).
        allow_nvlink: store straight into NVLink peers' memory; False sends every byte with
            NVSHMEM puts (the RDMA path).
    """

    def __init__(self, comm: Comm, num_rdma_bytes: int, allow_nvlink: bool):
        from ep_comm import ipc, jit
        self.comm = comm
        self.rank, self.num_ranks = comm.rank, comm.num_ranks
        if self.num_ranks > MAX_RANKS:
            raise InputError(f"low-latency kernels support at most {MAX_RANKS} ranks, got "
                             f"{self.num_ranks}")
        self.device = comm.device
        self.nvlink = bool(allow_nvlink)
        self.num_rdma_bytes = num_rdma_bytes
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.module = jit.compile_kernels("low_latency", ["low_latency.cu"], nvshmem=True)
        self.sym = nvshmem_runtime.acquire(comm, max(num_rdma_bytes, 1))
        nvshmem_runtime.bind_module(self.module)
        self.base = self.sym.tensor.data_ptr()
        # Pinned, mapped host memory (the same primitive as the NVLink kernels): the host
        # reads it without synchronising, kernels write it through its device pointer.
        self._status = ipc.HostStatus(STATUS_WORDS, self.device.index)
        self._mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        self._regions: dict[tuple[int, int, int], LowLatencyRegions] = {}
        self._next_half = 0
        self._limit_s = timeout_s()
        # Peers may write into this buffer as soon as they return: everyone's zeroes first.
        torch.cuda.synchronize(self.device)
        comm.barrier("low_latency/init")

    # ------------------------------------------------------------------ helpers
    def regions(self, m: int, hidden: int, num_experts: int) -> LowLatencyRegions:
        key = (m, hidden, num_experts)
        reg = self._regions.get(key)
        if reg is None:
            reg = LowLatencyRegions(m, hidden, self.num_ranks, num_experts)
            if reg.total_bytes > self.sym.nbytes:
                raise InputError(f"low-latency call needs {reg.total_bytes} symmetric bytes, the "
                                 f"Buffer holds {self.sym.nbytes}")
            self._regions[key] = reg
        return reg

    def _ptr(self, reg: LowLatencyRegions, name: str) -> int:
        return self.base + reg[name].offset

    def _timeout_ns(self) -> int:
        self._limit_s = timeout_s()
        return int(self._limit_s * 1e9)

    def check_status(self) -> None:
        """Raise the error a kernel reported (CommTimeoutError); no device synchronisation."""
        words = self._status.read()
        err = decode_status(words, self.rank, self._limit_s, self.comm.node_of())
        if err is not None:
            raise err

    def _launch(self, kernel: str, grid: int, params, values: dict) -> None:
        self.module.launch(kernel, grid, THREADS, pack_args(params, values))

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
        if k > MAX_TOPK:
            raise InputError(f"low-latency kernels support top-k <= {MAX_TOPK}, got {k}")
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
        src_info = torch.empty(local, rows, dtype=torch.int32, device=dev)
        range_begin = torch.empty(local, r, dtype=torch.int32, device=dev)
        range_count = torch.empty(local, r, dtype=torch.int32, device=dev)
        recv_count = torch.empty(local, dtype=torch.int32, device=dev)
        values = dict(
            x=self._ptr_of(x), topk_idx=self._ptr_of(topk_idx), num_tokens=t, num_topk=k,
            hidden=hidden, num_experts=num_experts, num_ranks=r, rank=self.rank, max_tokens=m,
            round_scale=int(round_scale or use_ue8m0), ue8m0=int(use_ue8m0),
            nvlink=int(self.nvlink), phases=0,
            send_stage=self._ptr(reg, f"dispatch_send{half}"),
            recv_msgs=self._ptr(reg, f"dispatch_recv{half}"),
            recv_count_sig=self._ptr(reg, f"dispatch_count{half}"),
            recv_arrive_sig=self._ptr(reg, f"dispatch_arrive{half}"),
            msg_stride=reg.msg_bytes, mask=self._ptr_of(self._mask),
            recv_x=self._ptr_of(recv_x),
            recv_scales=self._ptr_of(recv_scales), src_info=self._ptr_of(src_info),
            range_begin=self._ptr_of(range_begin), range_count=self._ptr_of(range_count),
            recv_count=self._ptr_of(recv_count),
            cum_stats=self._ptr_of(cumulative_local_expert_recv_stats),
            wait_stats=self._ptr_of(dispatch_wait_recv_cost_stats),
            host_status=self._status.device_ptr, status_claim=self._ptr(reg, "status_claim"),
            timeout_ns=self._timeout_ns())
        kernel = "ep_ll_dispatch_fp8" if use_fp8 else "ep_ll_dispatch_bf16"
        send_grid = grid_size(self.num_sms, t, (num_experts + 31) // 32)
        recv_grid = grid_size(self.num_sms, local)
        # Inputs stay referenced by the hook (and the handle) until the receive is launched.
        keep = (x, topk_idx)
        handle = LowLatencyHandle(
            src_info=src_info, range_begin=range_begin, range_count=range_count,
            recv_count=recv_count, num_max_dispatch_tokens_per_rank=m, hidden=hidden,
            num_experts=num_experts, buffer_idx=half, use_fp8=use_fp8,
            backend_state={"half": half, "keep": keep})
        if not return_recv_hook:
            values["phases"] = SEND_PHASE | RECV_PHASE
            self._launch(kernel, max(send_grid, recv_grid), DISPATCH_PARAMS, values)
            return recv_x, recv_scales, recv_count, handle, None
        values["phases"] = SEND_PHASE
        self._launch(kernel, send_grid, DISPATCH_PARAMS, values)
        recv_values = dict(values, phases=RECV_PHASE)
        return recv_x, recv_scales, recv_count, handle, self._hook(
            kernel, recv_grid, DISPATCH_PARAMS, recv_values, keep)

    def _hook(self, kernel, grid, params, values, keep):
        """A callable that launches the receive phase once, on the caller's current stream."""
        called = []

        def hook():
            if called:
                raise InputError("this receive hook was already called (each hook receives once)")
            called.append(True)
            self.check_status()
            _ = keep  # the send's inputs live until the receive is launched
            self._launch(kernel, grid, params, values)

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
        if k > MAX_TOPK:
            raise InputError(f"low-latency kernels support top-k <= {MAX_TOPK}, got {k}")
        reg = self.regions(m, hidden, num_experts)
        half = handle.buffer_idx
        send_stage = self.get_next_low_latency_combine_buffer(handle)
        src = send_stage if zero_copy else _aligned16(x)
        topk_idx = topk_idx.contiguous()
        topk_weights = topk_weights.contiguous()
        if out is not None and (not out.is_contiguous() or out.data_ptr() % 16):
            raise InputError("out= must be a contiguous [T, H] bf16 tensor whose data is "
                             "16-byte aligned (the kernels store 16 bytes at a time)")
        result = out if out is not None else torch.empty(t, hidden, dtype=torch.bfloat16,
                                                         device=self.device)
        values = dict(
            x=self._ptr_of(src), zero_copy=int(zero_copy), src_info=self._ptr_of(handle.src_info),
            range_begin=self._ptr_of(handle.range_begin),
            range_count=self._ptr_of(handle.range_count), topk_idx=self._ptr_of(topk_idx),
            topk_weights=self._ptr_of(topk_weights), out=self._ptr_of(result), num_tokens=t,
            num_topk=k, hidden=hidden, num_experts=num_experts, num_ranks=r, rank=self.rank,
            max_tokens=m, nvlink=int(self.nvlink), phases=0,
            send_stage=self._ptr_of(send_stage),
            recv_rows=self._ptr(reg, f"combine_recv{half}"),
            recv_count_sig=self._ptr(reg, f"combine_count{half}"),
            recv_arrive_sig=self._ptr(reg, f"combine_arrive{half}"),
            done_counter=self._ptr(reg, f"combine_done{half}"), mask=self._ptr_of(self._mask),
            wait_stats=self._ptr_of(combine_wait_recv_cost_stats),
            host_status=self._status.device_ptr, status_claim=self._ptr(reg, "status_claim"),
            timeout_ns=self._timeout_ns())
        local = num_experts // r
        send_grid = grid_size(self.num_sms, local)
        recv_grid = grid_size(self.num_sms, t)
        keep = (src, topk_idx, topk_weights, handle)
        if not return_recv_hook:
            values["phases"] = SEND_PHASE | RECV_PHASE
            self._launch("ep_ll_combine", max(send_grid, recv_grid), COMBINE_PARAMS, values)
            return result, None
        values["phases"] = SEND_PHASE
        self._launch("ep_ll_combine", send_grid, COMBINE_PARAMS, values)
        return result, self._hook("ep_ll_combine", recv_grid, COMBINE_PARAMS,
                                  dict(values, phases=RECV_PHASE), keep)

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
        """Zero every signal word and the status, then synchronise the ranks (collective)."""
        reg = self.regions(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        torch.cuda.synchronize(self.device)
        self.sym.tensor[:reg.signals_end].zero_()
        self._status.clear()
        self._next_half = 0
        torch.cuda.synchronize(self.device)
        self.comm.barrier("low_latency/clean")

    def mask_buffer(self) -> torch.Tensor:
        """[R] int32 device tensor, 1 = masked: neither sent to nor waited for."""
        return self._mask

    def destroy(self) -> None:
        """Return the symmetric buffer to the pool (local; see ep_comm.nvshmem_runtime)."""
        if self.sym is None:
            return
        # Kernels still in flight would write into memory a later Buffer may get. They are
        # bounded by the timeout, so this wait is bounded too.
        torch.cuda.synchronize(self.device)
        self.sym.release()
        self.sym = None
        self._status.free()


__all__ = ["LowLatencyRuntime", "pack_args", "decode_status", "grid_size", "kernel_signature",
           "DISPATCH_PARAMS", "COMBINE_PARAMS", "MAX_TOPK"]


def _kernel_source() -> str:
    """Text of kernels/low_latency.cu (for tests)."""
    from ep_comm.jit import kernels_dir
    return (Path(kernels_dir()) / "low_latency.cu").read_text()
