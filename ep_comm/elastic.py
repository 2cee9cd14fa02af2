"""``ep_comm.ElasticBuffer`` and ``EPHandle``: DeepEP v2's unified expert-parallel API.

DeepEP v2 (``deep_ep.ElasticBuffer`` at dd758ca) replaced the v1 ``Buffer`` calls with one
``dispatch``/``combine`` pair that takes ``num_max_tokens_per_rank`` instead of a layout, can lay
received rows out grouped by expert (``do_expand``) and returns an ``EPHandle`` with named
fields. This module gives that API over ep_comm's ``Buffer`` (either backend): a dispatch is
``get_dispatch_layout`` + ``Buffer.dispatch``; the v2 outputs (source metadata, prefix sums,
the expanded layout) are derived from the typed ``DispatchHandle`` on the device, with no host
synchronisation when ``do_cpu_sync=False``.

Differences from DeepEP v2, all deliberate:

* Received rows always come by source rank, then source token (ep_comm's kernels write them in
  that order), so every dispatch is deterministic; ``deterministic=True`` changes nothing.
* ``do_expand``: within one node on the kernels backend, the NVLink dispatch kernel writes each
  received token straight into its expanded rows (one per local expert it hits), as DeepEP's
  kernels do. Across nodes (internode kernels), on the reference backend and for a cached
  dispatch (``handle=``), the received rows are gathered into expert order with one row copy
  (``recv_x`` to its expert slots). The rows are bitwise the same either way.
* Combine sums a token's rank contributions in rank order, then adds the bias. DeepEP adds the
  bias first and the ranks in top-k slot order; the results are bitwise equal when a token's
  rows come from one rank (always on one rank) and may differ in the last bf16 bit otherwise.
* ``num_sms``/``num_qps`` are recorded in the handle; the kernels use the Buffer's analytic
  ``Config``. Engram, PP, AGRS and host (``num_cpu_bytes``) buffers raise
  ``NotImplementedError`` naming the feature.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ep_comm.backends.base import ExpandRequest
from ep_comm.buffer import Buffer
from ep_comm.config import Config, default_config
from ep_comm.core.checks import topk_idx_t
from ep_comm.core.constants import NVL_MAX_RANKS
from ep_comm.errors import EpCommError, InputError
from ep_comm.event import EventOverlap
from ep_comm.handles import DispatchHandle

#: DeepEP v2 aligns its buffer sizes to 2 MiB (``get_elastic_buffer_alignment``).
BUFFER_ALIGNMENT = 2 * 1024 * 1024
_INT32_MAX = 2 ** 31 - 1


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _worst_expanded_rows(num_ranks: int, nmax: int, num_topk: int, local: int,
                         align_to: int) -> int:
    """Expanded rows of a dispatch without CPU sync: every rank's ``nmax`` tokens hitting up to
    ``min(K, L)`` local experts, plus each expert's alignment padding."""
    return _align(num_ranks * nmax * min(num_topk, local) + (align_to - 1) * local, align_to)


def _not_here(feature: str):
    raise NotImplementedError(f"{feature} is a DeepEP v2 feature that ep_comm does not provide "
                              "(only the expert-parallel dispatch/combine part of ElasticBuffer)")


class EPHandle:
    """What a v2 dispatch leaves for combine and for cached dispatches (DeepEP's ``EPHandle``).

    Shapes: T = tokens on this rank, K = top-k, L = local experts, R = ranks, N = received rows
    (the worst case ``num_max_tokens_per_rank * R`` without CPU sync), N_exp = expanded rows.

    Attributes (DeepEP's, in its constructor order):
        do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms: the call.
        topk_idx: [T, K] the caller's tensor (``do_handle_copy=False``) or a copy.
        num_recv_tokens: N; num_expanded_tokens: N_exp (0 without ``do_expand``).
        num_recv_tokens_per_expert_list: L ints, each rounded up to ``expert_alignment``
            ([] without CPU sync).
        psum_num_recv_tokens_per_scaleup_rank: [R] int32 inclusive prefix of rows per source.
        psum_num_recv_tokens_per_expert: [L] int32. Not expanded: inclusive prefix of the
            aligned counts. Expanded: ``[e] = align([e - 1], A) + count[e]`` (end of e's rows).
        num_unaligned_recv_tokens_per_expert: [L] int32 received (token, expert) pairs.
        recv_src_metadata: [N, K + 2] int32 per received row: ``[0]`` = source rank *
            ``num_max_tokens_per_rank`` + source token, ``[1]`` = source rank * K + the highest
            top-k slot whose expert is here, ``[2 + k]`` = expanded row of slot k or -1.
            Padding rows: ``[0]`` = INT32_MAX, the rest -1. A plain attribute (callers slice it).
        dst_buffer_slot_idx: [T, K] int32, the row of token t in the receiving rank of slot k
            (-1 for an empty slot).
        token_metadata_at_forward, channel_linked_list: None (DeepEP's hybrid-mode state).

    ep_comm's own: ``dispatch_handle`` (the typed ``DispatchHandle``), ``recv_topk_idx`` ([N, K]
    local expert ids), ``expand_rows`` ([N, K] int64, the expanded row of each slot or -1) and
    ``expand_src`` ([N_exp] int64, the received row each expanded row holds; -1 = padding)
    and ``expand_slot`` ([N_exp] int64, that row's ``row * K + slot``; -1 = padding).
    """

    def __init__(self, do_expand, num_experts, expert_alignment, num_max_tokens_per_rank,
                 num_sms, topk_idx, num_recv_tokens, num_expanded_tokens,
                 num_recv_tokens_per_expert_list, psum_num_recv_tokens_per_scaleup_rank,
                 psum_num_recv_tokens_per_expert, num_unaligned_recv_tokens_per_expert,
                 recv_src_metadata, dst_buffer_slot_idx, token_metadata_at_forward=None,
                 channel_linked_list=None):
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.topk_idx = topk_idx
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.cached_recv_src_metadata_before_sort = None
        self.dispatch_handle: DispatchHandle | None = None
        self.recv_topk_idx: torch.Tensor | None = None
        self.expand_rows: torch.Tensor | None = None
        self.expand_src: torch.Tensor | None = None
        self.expand_slot: torch.Tensor | None = None

    def deterministic_sort(self, *args, **kwargs) -> None:
        """DeepEP sorts rows after a deterministic dispatch; ep_comm's rows are already in
        source order, so there is nothing to do."""
        return None

    def __repr__(self):
        return (f"EPHandle(do_expand={self.do_expand}, num_experts={self.num_experts}, "
                f"num_recv_tokens={self.num_recv_tokens}, "
                f"num_expanded_tokens={self.num_expanded_tokens})")


def get_physical_domain_size(group) -> tuple[int, int]:
    """(nodes, ranks per node) of ``group`` (a collective: it exchanges host names)."""
    from ep_comm.runtime.comm import Comm
    c = Comm(group)
    return c.num_nodes, c.ranks_per_node


def get_logical_domain_size(group, allow_hybrid_mode: bool = True) -> tuple[int, int]:
    """(scale-out, scale-up) ranks: (nodes, ranks per node) in hybrid mode, else (1, R)."""
    nodes, per_node = get_physical_domain_size(group)
    return (nodes, per_node) if allow_hybrid_mode else (1, nodes * per_node)


class ElasticBuffer:
    """DeepEP v2's ``ElasticBuffer`` over an ep_comm ``Buffer``.

    Args (DeepEP's):
        group: the expert-parallel ProcessGroup (NCCL on GPUs, gloo on CPU).
        num_bytes: NVLink buffer bytes per rank; None sizes it with ``get_buffer_size_hint``.
        num_cpu_bytes: DeepEP's host buffer (Engram); must be 0.
        num_max_tokens_per_rank: the most tokens any rank dispatches (default of dispatch).
        hidden, num_topk, use_fp8_dispatch: sizes for ``num_bytes=None``.
        deterministic: accepted; every ep_comm dispatch is deterministic.
        allow_hybrid_mode: the logical domain is (nodes, ranks per node) rather than (1, R).
        allow_multiple_reduction: expanded combine reduces a token's local rows before sending.
        prefer_overlap_with_compute, sl_idx, num_allocated_qps, num_cpu_timeout_secs,
            num_gpu_timeout_secs: kept as attributes (the kernels' waits are bounded by
            ep_comm's own timeouts; no RDMA queue pairs are allocated here).
        explicitly_destroy: ``destroy()`` must be called (as DeepEP).
    ep_comm's: ``backend`` ("auto", "kernels", "reference") and ``ranks_per_node``.
    """

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None,
                 num_cpu_bytes: int = 0, num_max_tokens_per_rank: int = 0, hidden: int = 0,
                 num_topk: int = 0, use_fp8_dispatch: bool = False, deterministic: bool = False,
                 allow_hybrid_mode: bool = True, allow_multiple_reduction: bool = True,
                 prefer_overlap_with_compute: bool = True, sl_idx: int = 3,
                 num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300,
                 num_gpu_timeout_secs: int = 100, explicitly_destroy: bool = False, *,
                 backend: str = "auto", ranks_per_node: int | None = None):
        if num_cpu_bytes:
            _not_here("num_cpu_bytes (Engram host storage)")
        self.group = group
        self.rank_idx, self.num_ranks = group.rank(), group.size()
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.deterministic = deterministic
        self.sl_idx = sl_idx
        self.num_cpu_timeout_secs, self.num_gpu_timeout_secs = num_cpu_timeout_secs, num_gpu_timeout_secs
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.explicitly_destroy = explicitly_destroy
        self.config: Config = default_config(self.num_ranks, Buffer.num_sms)
        if num_bytes is None:
            num_bytes = self.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden,
                                                  num_topk, use_fp8_dispatch, allow_hybrid_mode,
                                                  allow_multiple_reduction)
        self.num_bytes = num_bytes
        self.num_allocated_qps = num_allocated_qps or (65 if allow_hybrid_mode else 17)
        probe = None
        from ep_comm.runtime.comm import Comm
        probe = Comm(group, ranks_per_node)
        rdma = 0
        if probe.num_nodes > 1:
            rdma = self.config.get_rdma_buffer_size_hint(
                max(hidden, 1) * 2, self.num_ranks, ranks_per_node=probe.ranks_per_node,
                num_max_tokens_per_rank=max(num_max_tokens_per_rank, 1))
        self.runtime = Buffer(group, num_nvl_bytes=num_bytes, num_rdma_bytes=rdma,
                              explicitly_destroy=True, backend=backend,
                              ranks_per_node=probe.ranks_per_node)
        self.num_rdma_ranks, self.num_nvlink_ranks = probe.num_nodes, probe.ranks_per_node
        if allow_hybrid_mode:
            self.num_scaleout_ranks, self.num_scaleup_ranks = probe.num_nodes, probe.ranks_per_node
        else:
            self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx = self.rank_idx // self.num_scaleup_ranks
        self.scaleup_rank_idx = self.rank_idx % self.num_scaleup_ranks
        self.device = self.runtime.device
        self.barrier(with_cpu_sync=True)

    # ------------------------------------------------------------------ lifetime and sizes
    def destroy(self) -> None:
        """Free the buffers (needs ``explicitly_destroy=True``, as DeepEP)."""
        if not self.explicitly_destroy:
            raise InputError("destroy() needs an ElasticBuffer made with explicitly_destroy=True")
        if self.runtime is not None:
            self.runtime.destroy()
            self.runtime = None

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int,
                             num_topk: int = 0, use_fp8_dispatch: bool = False,
                             allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """NVLink buffer bytes (2 MiB aligned) for rows of ``hidden`` bf16 values.

        ep_comm's rings hold a fixed number of token windows per channel and peer, so the size
        depends on ``hidden`` and the ranks sharing NVLink, not on the token count, top-k or
        FP8 (bf16 rows are the larger ones)."""
        if num_max_tokens_per_rank <= 0 or hidden <= 0:
            raise InputError("get_buffer_size_hint needs num_max_tokens_per_rank > 0 and "
                             f"hidden > 0, got {num_max_tokens_per_rank}, {hidden}")
        r = group.size()
        cfg = default_config(r, Buffer.num_sms)
        need = cfg.get_nvl_buffer_size_hint(hidden * 2, min(r, NVL_MAX_RANKS))
        return _align(need, BUFFER_ALIGNMENT)

    @staticmethod
    def get_engram_storage_size_hint(*args, **kwargs):
        _not_here("Engram (get_engram_storage_size_hint)")

    @staticmethod
    def get_pp_buffer_size_hint(*args, **kwargs):
        _not_here("PP (get_pp_buffer_size_hint)")

    @staticmethod
    def get_agrs_num_max_session_bytes(*args, **kwargs):
        _not_here("AGRS (get_agrs_num_max_session_bytes)")

    @staticmethod
    def get_agrs_buffer_size_hint(*args, **kwargs):
        _not_here("AGRS (get_agrs_buffer_size_hint)")

    def engram_write(self, *args, **kwargs):
        _not_here("Engram (engram_write)")

    def engram_fetch(self, *args, **kwargs):
        _not_here("Engram (engram_fetch)")

    def pp_set_config(self, *args, **kwargs):
        _not_here("PP (pp_set_config)")

    def pp_send(self, *args, **kwargs):
        _not_here("PP (pp_send)")

    def pp_recv(self, *args, **kwargs):
        _not_here("PP (pp_recv)")

    def create_agrs_session(self, *args, **kwargs):
        _not_here("AGRS (create_agrs_session)")

    def destroy_agrs_session(self, *args, **kwargs):
        _not_here("AGRS (destroy_agrs_session)")

    def agrs_new_session(self, *args, **kwargs):
        _not_here("AGRS (agrs_new_session)")

    def agrs_set_config(self, *args, **kwargs):
        _not_here("AGRS (agrs_set_config)")

    def agrs_get_inplace_tensor(self, *args, **kwargs):
        _not_here("AGRS (agrs_get_inplace_tensor)")

    def all_gather(self, *args, **kwargs):
        _not_here("AGRS (all_gather)")

    # ------------------------------------------------------------------ queries
    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False,
                sequential: bool = True) -> None:
        """All ranks meet; with ``with_cpu_sync`` the device work before it has finished too."""
        del use_comm_stream, sequential  # one barrier over the group serves every variant
        if self.device.type == "cuda" and with_cpu_sync:
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        if self.device.type == "cuda" and with_cpu_sync:
            torch.cuda.synchronize(self.device)

    @staticmethod
    def capture():
        """An ``EventHandle`` recorded now on the current stream (DeepEP v2 returns the raw
        handle, not an EventOverlap)."""
        from ep_comm.compat.event import EventHandle
        return EventHandle()

    def get_comm_stream(self):
        """The CUDA stream the communication runs on (None on CPU)."""
        return self.runtime.get_comm_stream()

    def get_physical_domain_size(self) -> tuple[int, int]:
        """(nodes, ranks per node)."""
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self) -> tuple[int, int]:
        """(scale-out ranks, scale-up ranks): see ``allow_hybrid_mode``."""
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int,
                                num_scaleout_topk: int = 0, rdma_gbs: float = 0,
                                nvlink_gbs: float = 0, sm_read_gbs: float = 200,
                                sm_write_gbs: float = 50) -> int:
        """SMs the dispatch/combine kernels occupy: the analytic ``Config.num_sms`` (see
        ``ep_comm.config``: one sender and one receiver block per channel, sized to NVLink's
        rate), at least 64 when ``prefer_overlap_with_compute`` is False (as DeepEP), capped
        by the device's SMs."""
        if num_scaleout_topk:
            raise InputError("num_scaleout_topk must be 0 (as DeepEP)")
        n = self.config.num_sms if self.prefer_overlap_with_compute else max(self.config.num_sms, 64)
        if self.device.type == "cuda":
            n = min(n, torch.cuda.get_device_properties(self.device).multi_processor_count)
        return n

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        """DeepEP's formula: ``num_sms * 16 + 1`` in hybrid mode, else ``min(num_sms, 9)``,
        capped at ``num_allocated_qps`` (a count only: no queue pairs exist here)."""
        n = num_sms * 16 + 1 if self.allow_hybrid_mode else min(num_sms, 9)
        return min(n, self.num_allocated_qps)

    @staticmethod
    def _unpack_handle(handle: Optional[EPHandle] = None):
        """DeepEP's 10 cached fields of a handle (all None without one)."""
        if handle is None:
            return (None,) * 10
        return (handle.num_recv_tokens, handle.num_expanded_tokens,
                handle.num_recv_tokens_per_expert_list,
                handle.psum_num_recv_tokens_per_scaleup_rank,
                handle.psum_num_recv_tokens_per_expert,
                handle.num_unaligned_recv_tokens_per_expert, handle.dst_buffer_slot_idx,
                handle.token_metadata_at_forward, handle.recv_src_metadata,
                handle.channel_linked_list)

    # ------------------------------------------------------------------ streams
    def _stream_scope(self, fn, previous_event, async_with_compute_stream: bool):
        """Run ``fn`` after ``previous_event``; with ``async_with_compute_stream`` on the
        communication stream, returning an event the caller waits on. Returns (result, event)."""
        ev = previous_event.event if isinstance(previous_event, EventOverlap) else previous_event
        if self.device.type != "cuda":
            return fn(), EventOverlap()
        compute = torch.cuda.current_stream(self.device)
        if not async_with_compute_stream:
            if ev is not None:
                compute.wait_event(ev)
            return fn(), EventOverlap()
        comm = self.runtime.get_comm_stream()
        if ev is not None:
            comm.wait_event(ev)
        else:
            comm.wait_stream(compute)
        # The inner Buffer's calls run on the comm stream as synchronous calls: the Buffer's
        # stream order (Buffer._comm_begin) keeps them after its last call on another stream,
        # and a later synchronous call after them, as for its own async calls.
        self.runtime._comm_begin(comm)
        try:
            with torch.cuda.stream(comm):
                result = fn()
        finally:
            done = torch.cuda.Event()
            done.record(comm)
            self.runtime._comm_end(done)
        kept = tuple(_tensors(result))
        for t in kept:
            t.record_stream(compute)
        return result, EventOverlap(done, extra_tensors=kept)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None, num_sms: int = 0, num_qps: int = 0,
                 previous_event=None, previous_event_before_epilogue=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                 handle: Optional[EPHandle] = None, do_handle_copy: bool = True,
                 do_cpu_sync: Optional[bool] = None, do_expand: bool = False,
                 do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False):
        """Send each token to the ranks of its experts (DeepEP v2's ``dispatch``).

        Args:
            x: [T, H] bf16, or (fp8 [T, H], scales [T, H / 128] float32 or packed-UE8M0 int32).
            topk_idx: [T, K] ``topk_idx_t`` global expert ids (-1 = none); None with ``handle``.
            topk_weights: [T, K] float32 or None (allowed with ``handle``: re-sent).
            cumulative_local_expert_recv_stats: [L] int32 or None; received (token, expert)
                pairs are added.
            num_experts, num_max_tokens_per_rank, expert_alignment: E, the token bound
                (default: the constructor's), the alignment A of each expert's rows (default 1).
            num_sms, num_qps: recorded in the handle (see the module doc).
            previous_event, previous_event_before_epilogue: ``EventHandle``/``EventOverlap``
                the dispatch / its layout epilogue waits for.
            async_with_compute_stream: run on the communication stream and return an event.
            allocate_on_comm_stream: outputs are made on the communication stream whenever
                ``async_with_compute_stream`` is set (ep_comm records them on both streams).
            handle: an ``EPHandle``: re-send new ``x`` along its routes (cached dispatch).
            do_handle_copy: the handle keeps a copy of ``topk_idx`` (else the tensor itself).
            do_cpu_sync: exact sizes (default True); False allocates the worst case and never
                waits for the host (the valid rows are ``psum_num_recv_tokens_per_scaleup_rank[-1]``).
            do_expand: one row per (token, local expert), grouped by expert, each expert's
                rows starting at a multiple of A (``psum_num_recv_tokens_per_expert``); within
                an expert by source rank, then source token. Within one node on the kernels
                backend the dispatch kernel writes these rows; otherwise (internode, reference
                backend, cached dispatch) the received rows are gathered into them.
            do_zero_padding: zero the expanded padding rows (and weights).
            use_tma_aligned_col_major_sf: FP8 scales column-major, leading dim aligned to 4.

        Returns:
            recv_x: [N, H] (or [N_exp, H]) like ``x`` (a (data, scales) tuple for FP8).
            recv_topk_idx: [N, K] local expert ids (-1 = not here); None with ``do_expand``.
            recv_topk_weights: [N, K] float32 (zero on slots that are not here), [N_exp] with
                ``do_expand``; None without ``topk_weights``.
            handle: ``EPHandle`` (the same object for a cached dispatch).
            event: ``EventOverlap`` (empty unless ``async_with_compute_stream``).
        """
        del num_qps, allocate_on_comm_stream
        cached = handle is not None
        if cached:
            if topk_idx is not None:
                raise InputError("a cached dispatch (handle=...) takes no topk_idx")
            if do_cpu_sync:
                raise InputError("cannot do a CPU sync with a cached handle")
            if (num_experts, expert_alignment, num_max_tokens_per_rank) != (None, None, None) and \
                    (num_experts or handle.num_experts,
                     expert_alignment or handle.expert_alignment,
                     num_max_tokens_per_rank or handle.num_max_tokens_per_rank) != \
                    (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank):
                raise InputError("num_experts, expert_alignment and num_max_tokens_per_rank of a "
                                 "cached dispatch must match the handle's")
            if do_expand != handle.do_expand:
                raise InputError(f"do_expand={do_expand} but the handle was made with "
                                 f"do_expand={handle.do_expand}")
            num_experts, expert_alignment = handle.num_experts, handle.expert_alignment
            nmax = handle.num_max_tokens_per_rank
            do_cpu_sync = False
        else:
            if topk_idx is None or num_experts is None:
                raise InputError("dispatch needs topk_idx and num_experts (or a handle)")
            nmax = num_max_tokens_per_rank or self.num_max_tokens_per_rank
            expert_alignment = expert_alignment or 1
            do_cpu_sync = True if do_cpu_sync is None else bool(do_cpu_sync)
        if do_zero_padding and not do_expand:
            raise InputError("do_zero_padding needs do_expand=True")
        data, sf = x if isinstance(x, (tuple, list)) else (x, None)
        t = data.shape[0]
        if nmax <= 0 or t > nmax:
            raise InputError(f"x has {t} tokens; num_max_tokens_per_rank must be >= that on "
                             f"every rank, got {nmax}")
        num_sms = num_sms or (handle.num_sms if cached else
                              self.get_theoretical_num_sms(num_experts, topk_idx.shape[1]))

        def run():
            return self._dispatch(data, sf, topk_idx, topk_weights,
                                  cumulative_local_expert_recv_stats, num_experts, nmax,
                                  expert_alignment, num_sms, handle, do_handle_copy,
                                  do_cpu_sync, do_expand, do_zero_padding,
                                  use_tma_aligned_col_major_sf, previous_event_before_epilogue)

        (recv_x, recv_idx, recv_w, out_handle), event = self._stream_scope(
            run, previous_event, async_with_compute_stream)
        return recv_x, recv_idx, recv_w, out_handle, event

    def _dispatch(self, data, sf, topk_idx, topk_weights, stats, num_experts, nmax, align_to,
                  num_sms, handle, do_handle_copy, do_cpu_sync, do_expand, do_zero_padding,
                  col_major_sf, epilogue_event):
        buf, r, me = self.runtime, self.num_ranks, self.rank_idx
        local = num_experts // r
        sf_is_int = sf is not None and sf.dtype == torch.int32
        # Packed UE8M0 scales (int32) travel bit for bit as float32 words.
        send_x = (data, sf.view(torch.float32) if sf_is_int else sf) if sf is not None else data
        # A fresh dispatch over NVLink kernels writes the expanded rows itself; otherwise the
        # received rows are copied to their expanded rows below.
        in_kernel = do_expand and handle is None and buf.expands_in_dispatch
        if handle is None:
            n_tok_rank, n_tok_rdma, n_tok_expert, in_rank, _ = buf.get_dispatch_layout(
                topk_idx, num_experts)
            worst = 0 if do_cpu_sync else nmax * r
            expand = None
            if in_kernel:
                expand = ExpandRequest(
                    0 if do_cpu_sync else _worst_expanded_rows(r, nmax, topk_idx.shape[1],
                                                               local, align_to),
                    do_zero_padding)
            recv, recv_idx, recv_w, counts, inner, _ = buf.dispatch(
                send_x, num_tokens_per_rank=n_tok_rank, num_tokens_per_rdma_rank=n_tok_rdma,
                is_token_in_rank=in_rank, num_tokens_per_expert=n_tok_expert, topk_idx=topk_idx,
                topk_weights=topk_weights, expert_alignment=align_to, num_worst_tokens=worst,
                config=self.config, expand=expand)
        else:
            inner = handle.dispatch_handle
            recv, _, _, _, _, _ = buf.dispatch(send_x, handle=inner, config=self.config)
            recv_idx = handle.recv_topk_idx
            recv_w = self._resend_weights(topk_weights, inner) if topk_weights is not None else None
            counts = handle.num_recv_tokens_per_expert_list
        recv_x, recv_sf = recv if sf is not None else (recv, None)
        if sf_is_int and recv_sf is not None:
            recv_sf = recv_sf.view(torch.int32)
        if stats is not None:
            stats += inner.num_recv_tokens_per_expert.to(stats.dtype)
        if epilogue_event is not None and self.device.type == "cuda":
            ev = epilogue_event.event if isinstance(epilogue_event, EventOverlap) else epilogue_event
            torch.cuda.current_stream(self.device).wait_event(ev)

        if handle is None:
            handle = self._new_handle(inner, topk_idx, recv_idx, counts, num_experts, nmax,
                                      align_to, num_sms, do_handle_copy, do_cpu_sync, do_expand)
        if in_kernel:
            recv_idx = None
        elif do_expand:
            src = handle.expand_src
            take = src.clamp(min=0)
            pad = src < 0
            recv_x = recv_x.index_select(0, take)
            if recv_sf is not None:
                recv_sf = recv_sf.index_select(0, take)
            if recv_w is not None:
                recv_w = recv_w.flatten().index_select(0, handle.expand_slot.clamp(min=0))
            if do_zero_padding:
                # Byte views: one masked fill serves bf16, fp8 and the scales alike.
                recv_x.view(torch.uint8).masked_fill_(pad.unsqueeze(1), 0)
                if recv_sf is not None:
                    recv_sf.view(torch.uint8).masked_fill_(pad.unsqueeze(1), 0)
                if recv_w is not None:
                    recv_w.masked_fill_(pad, 0.0)
            recv_idx = None
        elif recv_idx is not None:
            recv_idx = recv_idx.clone()  # the caller may edit it; the handle keeps its own
        if recv_sf is not None and col_major_sf:
            n, p = recv_sf.shape
            out = torch.empty_strided((n, p), (1, _align(max(n, 1), 4)), dtype=recv_sf.dtype,
                                      device=recv_sf.device)
            out.copy_(recv_sf)
            recv_sf = out
        recv = (recv_x, recv_sf) if sf is not None else recv_x
        return recv, recv_idx, recv_w, handle

    def _resend_weights(self, topk_weights: torch.Tensor, inner: DispatchHandle) -> torch.Tensor:
        """Send [T, K] float32 weights along a cached route, bit for bit: each float32 travels
        as two bf16 lanes of a row padded to 16 bytes (cached dispatch moves rows only)."""
        t, k = topk_weights.shape
        if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
            raise InputError("topk_weights must be a contiguous float32 [T, K] tensor")
        width = _align(2 * k, 8)
        rows = torch.zeros((t, width), dtype=torch.bfloat16, device=topk_weights.device)
        rows[:, :2 * k] = topk_weights.view(torch.bfloat16)
        back, _, _, _, _, _ = self.runtime.dispatch(rows, handle=inner, config=self.config)
        return back[:, :2 * k].contiguous().view(torch.float32)

    def _new_handle(self, inner: DispatchHandle, topk_idx, recv_idx, counts, num_experts, nmax,
                    align_to, num_sms, do_handle_copy, do_cpu_sync, do_expand) -> EPHandle:
        r, me = self.num_ranks, self.rank_idx
        local = num_experts // r
        dev = inner.recv_src_idx.device
        rows, k = recv_idx.shape
        psum_rank = inner.rank_prefix_matrix[:, me].contiguous()
        unaligned = inner.num_recv_tokens_per_expert.to(torch.int32)
        aligned = (unaligned + (align_to - 1)) // align_to * align_to
        starts = torch.cumsum(aligned, 0, dtype=torch.int32) - aligned  # expert block starts

        # Source metadata.
        src_rank, src_idx = inner.recv_src_rank, inner.recv_src_idx
        valid_row = src_rank >= 0
        meta = torch.full((rows, k + 2), -1, dtype=torch.int32, device=dev)
        meta[:, 0] = torch.where(valid_row, src_rank * nmax + src_idx,
                                 torch.full_like(src_idx, _INT32_MAX))
        here = recv_idx >= 0
        slot = torch.arange(k, device=dev).expand(rows, k)
        master = torch.where(here, slot, torch.full_like(slot, -1)).amax(dim=1)
        meta[:, 1] = torch.where(valid_row & (master >= 0), src_rank * k + master.to(torch.int32),
                                 torch.full_like(src_idx, -1))

        # Expanded layout: slot (i, k) of expert e goes to starts[e] + (rows before i with e).
        expand_rows = expand_src = expand_slot = None
        if not do_expand:
            n_exp = 0
        elif do_cpu_sync:
            n_exp = sum(counts)
        else:
            n_exp = _worst_expanded_rows(r, nmax, k, local, align_to)
        if do_expand:
            e = recv_idx.clamp(min=0).to(torch.int64)
            hit = torch.zeros((rows, local), dtype=torch.int32, device=dev)
            hit.scatter_add_(1, e, here.to(torch.int32))
            before = torch.cumsum(hit, 0, dtype=torch.int32) - hit
            pos = starts.to(torch.int64)[e] + before.gather(1, e).to(torch.int64)
            expand_rows = torch.where(here, pos, torch.full_like(pos, -1))
            # Inverse maps by scatter (empty slots land in a spare last entry): a boolean index
            # would wait for the host, which do_cpu_sync=False promises not to do.
            target = torch.where(here, pos, torch.full_like(pos, n_exp)).flatten()
            flat_slot = torch.arange(rows * k, device=dev)
            expand_slot = torch.full((n_exp + 1,), -1, dtype=torch.int64, device=dev)
            expand_slot.scatter_(0, target, flat_slot)
            expand_slot = expand_slot[:n_exp]
            expand_src = torch.where(expand_slot >= 0, expand_slot // k, expand_slot)
            meta[:, 2:] = expand_rows.to(torch.int32)
            psum_expert = starts + unaligned
        else:
            psum_expert = torch.cumsum(aligned, 0, dtype=torch.int32)

        # Sender side: the receiving row of each (token, slot).
        t = topk_idx.shape[0]
        dst = torch.where(topk_idx >= 0, topk_idx // local, torch.zeros_like(topk_idx))
        slots = inner.send_pos.gather(1, dst.to(torch.int64))
        dst_slot = torch.where(topk_idx >= 0, slots, torch.full_like(slots, -1)).to(torch.int32)
        del t

        n_recv = inner.num_recv_tokens if do_cpu_sync else rows
        h = EPHandle(do_expand, num_experts, align_to, nmax, num_sms,
                     topk_idx.clone() if do_handle_copy else topk_idx, n_recv, n_exp,
                     list(counts) if do_cpu_sync else [], psum_rank, psum_expert, unaligned,
                     meta, dst_slot)
        h.dispatch_handle = inner
        h.recv_topk_idx = recv_idx
        h.expand_rows = expand_rows
        h.expand_src = expand_src
        h.expand_slot = expand_slot
        return h

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, handle: EPHandle,
                topk_weights: Optional[torch.Tensor] = None, bias=None, num_sms: int = 0,
                num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False):
        """Send rows back to their source tokens and sum them there (no weighting).

        Args:
            x: [N, H] bf16 (one row per received row; with ``do_expand`` [N_exp, H], one row
                per expanded row, reduced per token here before sending).
            handle: the ``EPHandle`` of the dispatch.
            topk_weights: [N, K] float32 (expanded: [N_exp]) or None: routed back so that
                ``combined_topk_weights[t, k]`` is the weight of slot k from its expert's rank.
            bias: None, a [T, H] bf16 tensor or a pair, added in float32.
            num_sms, num_qps, previous_event_before_epilogue, allocate_on_comm_stream: as
                dispatch; previous_event, async_with_compute_stream: as dispatch.

        Returns:
            combined_x: [T, H] bf16; combined_topk_weights: [T, K] float32 or None;
            event: ``EventOverlap``.
        """
        del num_sms, num_qps, allocate_on_comm_stream
        if not isinstance(handle, EPHandle):
            raise InputError(f"handle must be the EPHandle of a dispatch, got {type(handle).__name__}")

        def run():
            if previous_event_before_epilogue is not None and self.device.type == "cuda":
                ev = previous_event_before_epilogue
                ev = ev.event if isinstance(ev, EventOverlap) else ev
                torch.cuda.current_stream(self.device).wait_event(ev)
            return self._combine(x, handle, topk_weights, bias)

        (out, out_w), event = self._stream_scope(run, previous_event, async_with_compute_stream)
        return out, out_w, event

    def _combine(self, x, handle: EPHandle, topk_weights, bias):
        inner = handle.dispatch_handle
        biases = () if bias is None else (tuple(bias) if isinstance(bias, (tuple, list)) else (bias,))
        if handle.do_expand:
            if x.shape[0] != handle.expand_src.shape[0]:
                raise InputError(f"expanded combine x has {x.shape[0]} rows, the dispatch made "
                                 f"{handle.expand_src.shape[0]}")
            rows = handle.expand_rows
            here = rows >= 0
            safe = rows.clamp(min=0)
            if not self.allow_multiple_reduction:
                if self.num_ranks > 1:
                    raise NotImplementedError(
                        "allow_multiple_reduction=False with do_expand across ranks (one "
                        "reduction of every selection at the source) is not provided by ep_comm")
                return self._single_rank_unreduced(x, handle, safe, here, topk_weights, biases)
            # Reduce this rank's selections of a token first, in top-k slot order (float32).
            acc = torch.zeros((rows.shape[0], x.shape[1]), dtype=torch.float32, device=x.device)
            for j in range(rows.shape[1]):
                acc += torch.where(here[:, j:j + 1], x.index_select(0, safe[:, j]).float(), 0.0)
            y = acc.to(torch.bfloat16)
            w = None
            if topk_weights is not None:
                if topk_weights.dim() != 1 or topk_weights.shape[0] != x.shape[0]:
                    raise InputError("expanded combine topk_weights must be [N_exp] float32")
                w = torch.where(here, topk_weights.index_select(0, safe.flatten()).view_as(safe),
                                0.0).to(torch.float32)
        else:
            y = x
            w = None
            if topk_weights is not None:
                w = topk_weights.masked_fill(handle.recv_topk_idx < 0, 0.0)
        if self.num_ranks == 1 and biases:
            # One source row per token: add the bias sum first, as DeepEP does (bitwise equal).
            combined, combined_w, _ = self.runtime.combine(y, inner, topk_weights=w,
                                                           config=self.config)
            total = biases[0].float()
            for b in biases[1:]:
                total = total + b.float()
            return (total + combined.float()).to(torch.bfloat16), combined_w
        combined, combined_w, _ = self.runtime.combine(y, inner, topk_weights=w,
                                                       bias=biases or None, config=self.config)
        return combined, combined_w

    def _single_rank_unreduced(self, x, handle, safe, here, topk_weights, biases):
        """``allow_multiple_reduction=False`` on one rank: bias sum, then every selection in
        slot order, one rounding (DeepEP's single reduction)."""
        inner = handle.dispatch_handle
        t = inner.num_tokens
        acc = torch.zeros((t, x.shape[1]), dtype=torch.float32, device=x.device)
        for b in biases:
            acc += b.float()
        src_tok = inner.recv_src_idx[: safe.shape[0]].to(torch.int64)
        valid = inner.recv_src_rank[: safe.shape[0]] >= 0
        for j in range(safe.shape[1]):
            sel = here[:, j] & valid
            acc.index_add_(0, src_tok[sel], x.index_select(0, safe[sel, j]).float())
        w = None
        if topk_weights is not None:
            w = torch.zeros((t, safe.shape[1]), dtype=torch.float32, device=x.device)
            vals = torch.where(here, topk_weights.index_select(0, safe.flatten()).view_as(safe), 0.0)
            w.index_put_((src_tok[valid],), vals[valid].float())
        return acc.to(torch.bfloat16), w


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, EPHandle):
        for v in vars(obj).values():
            if isinstance(v, torch.Tensor):
                yield v


__all__ = ["ElasticBuffer", "EPHandle", "get_physical_domain_size", "get_logical_domain_size",
           "topk_idx_t", "BUFFER_ALIGNMENT"]
