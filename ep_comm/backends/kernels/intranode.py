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

An expanding dispatch (``expand=ExpandRequest``, ``ElasticBuffer``'s ``do_expand``) has the
kernels write each token straight into its expanded rows, one per local expert it hits: notify
also turns the per-source, per-expert counts into each source's first row in each expert's
aligned block (``expand_base``), the sender ships each top-k entry's index among its tokens of
that expert (``expand_positions``) in the slot, and the receiver adds the two.

Launch geometry (``launch_geometry``): ``config.num_sms`` blocks, one sender and one receiver
block per channel, ``KERNEL_THREADS`` threads each; tokens travel in windows of
``nvl_window(config)`` tokens through rings of ``config.nvl_buffer`` slots.

Host path: the first call of a shape builds a launch plan (checks, regions, grid, every constant
kernel argument packed once into C memory, ``args.ArgBuffer``); later calls patch the pointers
and counts and launch with one ``cuLaunchKernel`` (``jit.PreparedLaunch``). The count wait of a
dispatch without ``num_worst_tokens`` waits for an event recorded right after the notify kernel
(``last_count_wait_ns`` holds its host time for the bench).

Agreement: the notify kernel receives the call's signature (``Comm.call_words``: sequence
number, operation, sizes, handle, this rank's input check) as one kernel argument, writes it
into its counts row and compares every rank's row with it. A call whose ranks disagree (or
whose rank had a bad input) is refused on every rank: no outputs, nothing moved (the dispatch
kernel queued behind it returns at once), and ``STATUS_DISAGREE`` with every rank's words in the
status word. The host raises the same ``CollectiveMismatchError`` / ``InputError`` /
``PeerInputError`` as the reference backend after its count wait, before it launches the
dispatch kernel (with ``num_worst_tokens`` nothing waits: the next call of the Buffer raises
it). The refusal leaves every rank's kernels in step, so the Buffer stays usable.

Failures: every wait in the kernels is bounded by ``EP_COMM_TIMEOUT_S``, read once when the
Buffer is created. A kernel that gives up
writes the status word; the host reads it after the notify synchronisation and before every
call, and raises ``CommTimeoutError`` naming this rank, the phase, the peer and the channel.
A wait that finds the peer it waits for in another kernel (each numbered kernel announces its
kind and row layout to every peer first: a skipped or extra call, another hidden, dtype or
top-k in a cached dispatch or a combine) does not wait for the timeout: it publishes the
finding to every rank, every rank's kernels (and those queued behind them) stop at once, and
the host raises ``CollectiveMismatchError`` naming the field, both values and both ranks
(``status.nvl_kernel_mismatch``). The runtime is then unusable (the kernels stopped mid-exchange)
but ``destroy()`` still frees everything.
"""
from __future__ import annotations

import dataclasses
import functools

import time

import torch

from ep_comm.runtime.comm import timeout_s
from ep_comm.backends.base import ExpandRequest
from ep_comm.backends.kernels import args, status
from ep_comm.backends.kernels.layout import LayoutKernel
from ep_comm.config import Config
from ep_comm.core.constants import (CALL_SIG_WORDS, FP8_BLOCK, NORMAL_MAX_TOPK,
                                    NVL_INFO_EXPERT_COUNTS, NVL_INFO_NUM_RECV, NVL_MAX_CHANNELS,
                                    NVL_MAX_LOCAL_EXPERTS, NVL_MAX_RANKS, NVL_MAX_WINDOW,
                                    NVL_STATUS_WORDS, NVL_WARPS, STATUS_DISAGREE,
                                    STATUS_DISAGREE_KERNEL, align)
from ep_comm.errors import BackendUnavailableError, EpCommError, InputError
from ep_comm.handles import DispatchHandle
from ep_comm.core.regions import IntranodeRegions
from ep_comm.runtime import jit

#: Threads of a dispatch/combine block (kernels/cuda/intranode_common.cuh kThreads).
KERNEL_THREADS = NVL_WARPS * 32
#: Dynamic shared memory of a dispatch/combine block (intranode_common.cuh kStageBytes): each
#: warp stages 8 KiB of row data through cp.async, 16 int4 per lane in flight.
KERNEL_SMEM = NVL_WARPS * 32 * 16 * 16
#: Threads of the notify block.
NOTIFY_THREADS = 256
#: Index of the notify kernel's call-signature argument in ``args.NVL_NOTIFY``.
NOTIFY_SIG_SLOT = [name for name, _ in args.NVL_NOTIFY].index("sig")


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


def dispatch_outputs(rows: int, x: torch.Tensor, x_scales, topk_idx, topk_weights,
                     payload: bool = True):
    """Uninitialised outputs of a dispatch kernel (it writes every row, padding included):
    recv_x [rows, H] (x's dtype), recv_scales [rows, H / 128] float32 (FP8 only), recv_idx
    [rows, K] int64 and recv_w [rows, K] float32 (when the call has top-k ids / weights).
    ``payload=False`` (an expanding dispatch: ``expand_outputs`` hold them): recv_x,
    recv_scales and recv_w are None."""
    dev, hidden = x.device, x.shape[1]
    num_topk = topk_idx.shape[1] if topk_idx is not None else (
        topk_weights.shape[1] if topk_weights is not None else 0)
    if not payload:
        x_scales = topk_weights = None
    recv_x = torch.empty(rows, hidden, dtype=x.dtype, device=dev) if payload else None
    recv_scales = (torch.empty(rows, hidden // FP8_BLOCK, dtype=torch.float32, device=dev)
                   if x_scales is not None else None)
    recv_idx = (torch.empty(rows, num_topk, dtype=torch.int64, device=dev)
                if topk_idx is not None else None)
    recv_w = (torch.empty(rows, num_topk, dtype=torch.float32, device=dev)
              if topk_weights is not None else None)
    return recv_x, recv_scales, recv_idx, recv_w


def expand_outputs(rows: int, x: torch.Tensor, x_scales, topk_weights):
    """Uninitialised expanded outputs of an expanding dispatch: exp_x [rows, H] (x's dtype),
    exp_scales [rows, H / 128] float32 (FP8 only), exp_w [rows] float32 (with weights)."""
    dev, hidden = x.device, x.shape[1]
    exp_x = torch.empty(rows, hidden, dtype=x.dtype, device=dev)
    exp_scales = (torch.empty(rows, hidden // FP8_BLOCK, dtype=torch.float32, device=dev)
                  if x_scales is not None else None)
    exp_w = (torch.empty(rows, dtype=torch.float32, device=dev)
             if topk_weights is not None else None)
    return exp_x, exp_scales, exp_w


def expand_positions(topk_idx: torch.Tensor) -> torch.Tensor:
    """[T, K] int32: entry (t, k)'s index among this rank's tokens routed to expert
    ``topk_idx[t, k]``, in token order (the sender's part of an expanded row; unspecified for
    -1 entries). Top-k ids must be distinct within a token (as DeepEP requires).

    A stable sort puts the entries of each expert together in (t, k) order; an entry's index
    is its place in the sorted order minus its expert's first place (a binary search)."""
    flat = topk_idx.flatten()
    keys, order = torch.sort(flat, stable=True)
    rank = torch.arange(flat.numel(), device=flat.device) - torch.searchsorted(keys, keys)
    pos = torch.empty(flat.numel(), dtype=torch.int32, device=flat.device)
    pos.scatter_(0, order, rank.to(torch.int32))
    return pos.view(topk_idx.shape)


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
    """Each count rounded up to ``expert_alignment`` (``num_recv_tokens_per_expert_list``), a
    new list the caller owns. Alignment 1 (the common case) is a copy: a call of ``align`` per
    expert cost ~40 us of host time per dispatch at 256 local experts (cProfile on the H200)."""
    if alignment == 1:
        return list(counts)
    return [align(c, alignment) for c in counts]


@functools.lru_cache(maxsize=64)
def regions_for(config: Config, hidden: int, num_ranks: int,
                nvl_bytes: int | None = None) -> IntranodeRegions:
    """The buffer layout of a call with rows of ``hidden`` elements (bf16-sized slots) in a
    Buffer of ``nvl_bytes`` (which fix the rings' per-source stride; None: the size hint's)."""
    return IntranodeRegions(config, hidden * 2, num_ranks, nvl_bytes)


class IntranodeRuntime:
    """Normal-mode dispatch/combine of one Buffer over NVLink (see the module docstring)."""

    #: The notify kernel checks the call agreement (``KernelsBackend.fuses_agreement``).
    carries_call_signature = True

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
        self.status = ipc.HostStatus(NVL_STATUS_WORDS, self.device.index)
        self.nvl = ipc.NvlBuffer(comm, num_nvl_bytes) if num_nvl_bytes > 0 else None
        self._stream = torch.cuda.Stream(self.device)
        # Read once per Buffer: a change of EP_COMM_TIMEOUT_S applies to Buffers created later.
        self._timeout_s = timeout_s()
        self._timeout_ns = int(self._timeout_s * 1e9)
        self._status_ptr = int(self.status.device_ptr)
        self._dev_index = self.device.index
        self._plans: dict = {}
        # This rank's bad input in the last notify launched (its InputError text, if refused).
        self._notify_input = None
        self._notify_done = torch.cuda.Event()  # the count wait waits for this, not the stream
        # The per-call expert-id check on the device (constants.ID_CHECK_*): the layout kernel
        # keeps the first id outside [-1, E) here, the next notify kernel refuses the call with
        # it on every rank and clears it (all ones = none).
        self._id_check = torch.full((1,), -1, dtype=torch.int64, device=self.device)
        self._layout = LayoutKernel(self.num_ranks, self.device, self._id_check.data_ptr())
        #: ns the host spent in the last dispatch-from-layout's count wait (for the bench).
        self.last_count_wait_ns = 0
        # The C++ host path of later dispatches and combines (host_path.IntranodeHostPath), once
        # enable_host_path() loaded it; it learns each plan from this class's calls.
        self.host_path = None

    # ------------------------------------------------------------------ plumbing
    def comm_stream(self):
        return self._stream

    def _check_alive(self) -> None:
        if self._broken is not None:
            raise EpCommError(f"this Buffer's NVLink kernels failed earlier ({self._broken}); "
                              "destroy it and create a new one") from self._broken
        if self.nvl is None:
            raise InputError("normal-mode dispatch/combine need a Buffer with num_nvl_bytes > 0")
        self.check_status()

    def check_status(self) -> None:
        """Raise the failure a kernel reported in the status word, if any (no device sync)."""
        code, err = status.read_normal_status(self.status, status.NVLINK, self.rank,
                                              self._timeout_s, self.num_ranks,
                                              own_input=self._notify_input, seq=self.comm.seq)
        if err is None:
            return
        if code == STATUS_DISAGREE:
            # Refused on every rank alike, nothing moved and the kernels' tags stay in step:
            # the Buffer stays usable once the word is cleared (the refusal claims no ctrl[2]).
            self.status.clear()
        else:
            self._broken = err
            if code == STATUS_DISAGREE_KERNEL:
                # a CollectiveMismatchError, which the Buffer's fault guard lets through
                # unmarked (elsewhere it is found before any exchange); here the kernels
                # stopped mid-exchange, so every later call must fail at once
                self.comm.mark_failed(err, [])
        raise err

    def _stream_handle(self) -> int:
        return jit.current_stream_handle(self._dev_index)

    def _layout_bytes(self) -> int:
        """The NVLink bytes the buffer layout is computed for: the smallest of the ranks'
        ``num_nvl_bytes`` (the rings' per-source stride must be the same on every rank)."""
        return self.nvl.min_nbytes if self.nvl is not None else self.num_nvl_bytes

    def _check_fits(self, regions: IntranodeRegions) -> None:
        have = self._layout_bytes()  # every rank refuses alike, by the smallest buffer
        if regions.total_bytes > have:
            from ep_comm.errors import BufferTooSmallError
            raise BufferTooSmallError("num_nvl_bytes", regions.total_bytes, have,
                                      "this NVLink call (the smallest of the ranks' buffers)")

    # ------------------------------------------------------------------ plans
    def _plan(self, key, build):
        """The launch plan of a shape ``key``, built (with every check) on its first call."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build()
        return plan

    def _prepare(self, module, kernel, params, values, grid, block, smem=0):
        return module.prepare(kernel, args.ArgBuffer(params, values), grid, block, smem)

    def _ring_values(self, regions: IntranodeRegions, config: Config, channels: int) -> dict:
        r = regions.regions
        return dict(peers=self.nvl.peer_ptrs_dev.data_ptr(), rank=self.rank, R=self.num_ranks,
                    C=channels, S=config.nvl_buffer, window=nvl_window(config),
                    off_ctrl=r["ctrl"].offset, off_tail=r["tail"].offset,
                    off_head=r["head"].offset, off_ring=r["ring"].offset,
                    ring_stride=regions.ring_stride, slot_bytes=regions.slot_bytes)

    def enable_host_path(self):
        """Load the C++ host path of later dispatches and combines
        (``host_path.IntranodeHostPath``).
        Returns it, or None (off, or not buildable: ``host_ext.status`` says why)."""
        if self.host_path is None:
            from ep_comm.backends.kernels import host_path
            ext = host_path.load_extension()
            if ext is not None:
                self.host_path = host_path.IntranodeHostPath(self, ext, NvlDispatchState,
                                                             aligned_counts)
        return self.host_path

    # ------------------------------------------------------------------ layout
    def layout_host_path(self):
        """The layout's C++ host path (``host_path.LayoutHostPath``), or None."""
        return self._layout.enable_host_path()

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """-> (num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool), from topk_idx [T, K] int64."""
        counts, in_rank = self._layout(topk_idx, num_experts, self._stream_handle())
        r = self.num_ranks
        return counts[:r], None, counts[r:], in_rank

    # ------------------------------------------------------------------ dispatch
    def _dispatch_plan(self, fresh, x, x_scales, num_topk, has_idx, has_w, num_experts,
                       num_worst_tokens, config):
        """(notify launch or None, dispatch launch, regions) for one shape: the checks, the
        regions, the grid and every constant argument, done once."""
        r, hidden = self.num_ranks, x.shape[1]
        check_sizes(r, num_experts, num_topk)
        channels, blocks = launch_geometry(config, self.num_device_sms)
        regions = regions_for(config, hidden, r, self._layout_bytes())
        self._check_fits(regions)
        local = num_experts // r
        notify = None
        if fresh:
            reg = regions.regions
            values = {n: 0 for n, _ in args.NVL_NOTIFY}
            values.update(peers=self.nvl.peer_ptrs_dev.data_ptr(), rank=self.rank, R=r, L=local,
                          num_worst_tokens=num_worst_tokens, off_ctrl=reg["ctrl"].offset,
                          off_flag=reg["notify_flag"].offset,
                          off_counts=reg["notify_counts"].offset,
                          host_status=self._status_ptr, timeout_ns=self._timeout_ns,
                          sig=[0] * CALL_SIG_WORDS, id_check=self._id_check.data_ptr())
            notify = self._prepare(self._module, "nvl_notify", args.NVL_NOTIFY, values, 1,
                                   NOTIFY_THREADS)
        offs = regions.slot_offsets()
        values = {n: 0 for n, _ in args.NVL_DISPATCH}
        values.update(self._ring_values(regions, config, channels))
        values.update(off_payload=offs["payload"], off_scales=offs["scales"],
                      off_idx=offs["topk_idx"], off_w=offs["topk_weights"],
                      off_pos=offs["topk_pos"], row_int4=hidden * x.element_size() // 16,
                      num_scales=hidden // FP8_BLOCK if x_scales is not None else 0, K=num_topk,
                      L=local, zero_padding=int(num_worst_tokens > 0),
                      host_status=self._status_ptr, timeout_ns=self._timeout_ns)
        launch = self._prepare(self._module, "nvl_dispatch", args.NVL_DISPATCH, values, blocks,
                               KERNEL_THREADS, KERNEL_SMEM)
        slots = {n: launch.args.slot(n) for n in (
            "x", "x_scales", "topk_idx", "topk_weights", "is_token_in_rank", "T",
            "rank_prefix_matrix", "send_pos", "recv_x", "recv_scales", "recv_topk_idx",
            "recv_topk_weights", "recv_src_idx", "recv_src_rank", "num_rows", "num_recv_dev",
            "expand", "expand_pos", "expand_base", "exp_x", "exp_scales", "exp_w",
            "num_exp_rows", "expert_alignment", "zero_exp_padding")}
        return notify, launch, slots

    def dispatch(self, x, x_scales, *, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                 is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, num_experts,
                 expert_alignment, num_worst_tokens, config, expand: ExpandRequest | None = None):
        """See ``Backend.dispatch``. x: [T, H] bf16 or fp8, x_scales: [T, H / 128] float32.

        With ``expand`` (a dispatch without a handle, with ``topk_idx``) recv_x, the scales and
        the weights come expanded: [N_exp, H], [N_exp, H / 128] and [N_exp] float32, N_exp =
        ``expand.rows`` with ``num_worst_tokens``, else the sum of the aligned counts; recv_topk_idx
        stays [N, K] (one row per received token, for the handle).

        The first call of a shape (fresh or cached, dtype, hidden, scales, top-k, experts,
        worst-case rows, config) builds its plan; later calls patch pointers and launch."""
        self._check_alive()
        if expand is not None and (handle is not None or topk_idx is None):
            raise InputError("an expanding dispatch needs topk_idx and no handle")
        r, me, dev = self.num_ranks, self.rank, x.device
        t, hidden = x.shape
        fresh = handle is None
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        if not fresh:
            num_worst_tokens = handle.num_worst_tokens
        key = ("dispatch", fresh, hidden, x.dtype, x_scales is not None, num_topk,
               topk_idx is not None, topk_weights is not None, num_experts, num_worst_tokens,
               config)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._dispatch_plan(
                fresh, x, x_scales, num_topk, topk_idx is not None, topk_weights is not None,
                num_experts, num_worst_tokens, config)
        notify, launch, s = plan
        local = num_experts // r
        stream = self._stream_handle()
        if fresh:
            # one allocation for the small notify outputs
            n_base = (r + 1) * local if expand is not None else 0
            small = torch.empty(r * r + local + r + 1 + n_base, dtype=torch.int32, device=dev)
            prefix = small[:r * r].view(r, r)
            recv_per_expert = small[r * r:r * r + local]
            tokens_of_rank = small[r * r + local:r * r + local + r]
            num_recv_dev = small[r * r + local + r:r * r + local + r + 1]
            expand_base = small[r * r + local + r + 1:]
            ntpr = num_tokens_per_rank if num_tokens_per_rank.dtype == torch.int32 else \
                num_tokens_per_rank.to(torch.int32)
            a = notify.args.slots
            a[3].value = t
            a[6].value, a[7].value = ntpr.data_ptr(), num_tokens_per_expert.data_ptr()
            a[11].value, a[12].value = prefix.data_ptr(), recv_per_expert.data_ptr()
            a[13].value, a[14].value = tokens_of_rank.data_ptr(), num_recv_dev.data_ptr()
            a[15].value = expert_alignment
            a[16].value = expand_base.data_ptr() if expand is not None else 0
            # fault handling: the call's signature travels with the counts (docs/faults.md)
            a[NOTIFY_SIG_SLOT][:], self._notify_input = self.comm.call_words()
            notify.launch(stream)
            if num_worst_tokens > 0:
                n_recv, rows, counts_host = -1, num_worst_tokens, None
            else:
                # Wait for exactly the notify kernel (bounded: it gives up after the timeout),
                # not for whatever else is queued on the stream.
                t0 = time.perf_counter_ns()
                self._notify_done.record()
                self._notify_done.synchronize()
                self.last_count_wait_ns = time.perf_counter_ns() - t0
                self.check_status()
                words = self.status.read(NVL_INFO_EXPERT_COUNTS + local)
                n_recv = words[NVL_INFO_NUM_RECV]
                rows = n_recv
                counts_host = words[NVL_INFO_EXPERT_COUNTS:]  # = recv_per_expert, no D2H copy
            route = torch.empty(t * r + 2 * rows, dtype=torch.int32, device=dev)
            send_pos = route[:t * r].view(t, r)
            # every row written by nvl_dispatch, padding rows included (-1)
            src_idx = route[t * r:t * r + rows]
            src_rank = route[t * r + rows:]
            handle = DispatchHandle(
                rank=me, num_ranks=r, num_experts=num_experts, is_token_in_rank=is_token_in_rank,
                num_tokens_per_rank=ntpr, rank_prefix_matrix=prefix, send_pos=send_pos,
                recv_src_idx=src_idx, recv_src_rank=src_rank, num_recv_tokens=n_recv,
                num_recv_tokens_per_expert=recv_per_expert, num_worst_tokens=num_worst_tokens,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                backend_state=NvlDispatchState(num_tokens_of_rank=tokens_of_rank,
                                              num_recv=num_recv_dev, counts_host=counts_host))
            s["send_pos"].value = send_pos.data_ptr()
        else:
            state = _intranode_state(handle)
            num_recv_dev = state.num_recv
            counts_host = state.counts_host
            rows = handle.num_recv_rows
            s["send_pos"].value = 0  # the handle has it: same routes
        # Every row of these is written by nvl_dispatch (padding rows: zeros, ids -1).
        recv_x, recv_scales, recv_idx, recv_w = dispatch_outputs(
            rows, x, x_scales, topk_idx, topk_weights, payload=expand is None)
        count_list = [] if num_worst_tokens > 0 else aligned_counts(counts_host, expert_alignment)
        if expand is None:
            s["expand"].value = 0
            s["expand_pos"].value = s["expand_base"].value = s["exp_x"].value = 0
            s["exp_scales"].value = s["exp_w"].value = 0
        else:
            exp_rows = expand.rows if num_worst_tokens > 0 else sum(count_list)
            exp_x, exp_scales, exp_w = expand_outputs(exp_rows, x, x_scales, topk_weights)
            pos = expand_positions(topk_idx)
            s["expand"].value = 1
            s["expand_pos"].value = pos.data_ptr()
            s["expand_base"].value = expand_base.data_ptr()
            s["exp_x"].value = exp_x.data_ptr()
            s["exp_scales"].value = 0 if exp_scales is None else exp_scales.data_ptr()
            s["exp_w"].value = 0 if exp_w is None else exp_w.data_ptr()
            s["num_exp_rows"].value = exp_rows
            s["expert_alignment"].value = expert_alignment
            s["zero_exp_padding"].value = int(expand.zero_padding)
        s["x"].value = x.data_ptr()
        s["x_scales"].value = 0 if x_scales is None else x_scales.data_ptr()
        s["topk_idx"].value = 0 if topk_idx is None else topk_idx.data_ptr()
        s["topk_weights"].value = 0 if topk_weights is None else topk_weights.data_ptr()
        s["is_token_in_rank"].value = handle.is_token_in_rank.data_ptr()
        s["T"].value = t
        s["rank_prefix_matrix"].value = handle.rank_prefix_matrix.data_ptr()
        s["recv_x"].value = 0 if recv_x is None else recv_x.data_ptr()
        s["recv_scales"].value = 0 if recv_scales is None else recv_scales.data_ptr()
        s["recv_topk_idx"].value = 0 if recv_idx is None else recv_idx.data_ptr()
        s["recv_topk_weights"].value = 0 if recv_w is None else recv_w.data_ptr()
        s["recv_src_idx"].value = handle.recv_src_idx.data_ptr()
        s["recv_src_rank"].value = handle.recv_src_rank.data_ptr()
        s["num_rows"].value = rows
        s["num_recv_dev"].value = num_recv_dev.data_ptr()
        launch.launch(stream)
        if self.host_path is not None and expand is None:  # later calls can go through C++
            self.host_path.learn(
                notify, launch, fresh=fresh, x=x, has_scales=x_scales is not None,
                num_topk=num_topk, has_idx=topk_idx is not None,
                has_w=topk_weights is not None, num_experts=num_experts,
                num_worst_tokens=num_worst_tokens, config=config, t=t,
                alignment=expert_alignment)
        if expand is not None:
            return exp_x, exp_scales, recv_idx, exp_w, count_list, handle
        return recv_x, recv_scales, recv_idx, recv_w, count_list, handle

    # ------------------------------------------------------------------ combine
    def _combine_plan(self, hidden, num_topk, num_experts, config):
        r = self.num_ranks
        check_sizes(r, num_experts, num_topk)
        channels, blocks = launch_geometry(config, self.num_device_sms)
        regions = regions_for(config, hidden, r, self._layout_bytes())
        self._check_fits(regions)
        offs = regions.slot_offsets()
        values = {n: 0 for n, _ in args.NVL_COMBINE}
        values.update(self._ring_values(regions, config, channels))
        values.update(off_payload=offs["payload"], off_w=offs["topk_weights"],
                      row_int4=hidden * 2 // 16, K=num_topk, host_status=self._status_ptr,
                      timeout_ns=self._timeout_ns)
        launch = self._prepare(self._module, "nvl_combine", args.NVL_COMBINE, values, blocks,
                               KERNEL_THREADS, KERNEL_SMEM)
        slots = {n: launch.args.slot(n) for n in args.NVL_COMBINE_PER_CALL}
        return launch, slots

    def combine(self, x, handle, topk_weights, biases, config):
        """See ``Backend.combine``. x: [N, H] bf16 -> ([T, H] bf16, [T, K] float32 or None)."""
        self._check_alive()
        state = _intranode_state(handle)
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        key = ("combine", x.shape[1], num_topk, handle.num_experts, config)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._combine_plan(x.shape[1], num_topk,
                                                         handle.num_experts, config)
        launch, s = plan
        t = handle.num_tokens
        out, out_w, bias0, bias1 = combine_outputs(t, x, topk_weights, biases)
        s["x"].value = x.data_ptr()
        s["topk_w"].value = 0 if topk_weights is None else topk_weights.data_ptr()
        s["recv_src_idx"].value = handle.recv_src_idx.data_ptr()
        s["rank_prefix_matrix"].value = handle.rank_prefix_matrix.data_ptr()
        s["num_tokens_of_rank"].value = state.num_tokens_of_rank.data_ptr()
        s["is_token_in_rank"].value = handle.is_token_in_rank.data_ptr()
        s["send_pos"].value = handle.send_pos.data_ptr()
        s["T"].value = t
        s["bias0"].value = 0 if bias0 is None else bias0.data_ptr()
        s["bias1"].value = 0 if bias1 is None else bias1.data_ptr()
        s["out"].value = out.data_ptr()
        s["out_w"].value = 0 if out_w is None else out_w.data_ptr()
        s["num_recv_dev"].value = state.num_recv.data_ptr()  # < 0: a refused dispatch
        launch.launch(self._stream_handle())
        if self.host_path is not None:  # later calls of this plan can go through C++
            self.host_path.learn_combine(launch, hidden=x.shape[1], num_topk=num_topk,
                                         has_w=topk_weights is not None,
                                         num_experts=handle.num_experts, config=config)
        return out, out_w

    # ------------------------------------------------------------------ teardown
    def destroy(self) -> None:
        """Free the NVLink buffer (after the peers unmapped it) and the status word. Works after
        a failure too: then the ranks do not meet first (a peer may be gone)."""
        self.host_path = None  # it reads the status words freed below
        if self.nvl is not None:
            # a failed Buffer (a timeout here, or in any exchange of its Comm, e.g. the host
            # agreement) meets no peer: the one it would wait for may be gone (soak, run 8)
            self.nvl.free(synchronize_peers=self._broken is None and self.comm.failure is None)
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
