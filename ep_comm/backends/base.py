"""The interface every backend implements. ``Buffer`` checks inputs, then calls these.

A backend receives arguments that are already validated (shapes, dtypes, devices, sizes) and
normalised (``x`` split into payload and optional fp8 scales), so it holds no argument checks.
"""
from __future__ import annotations

import abc
import dataclasses

import torch

from ep_comm.handles import DispatchHandle, LowLatencyHandle


@dataclasses.dataclass(frozen=True, slots=True)
class ExpandRequest:
    """A dispatch that writes each received token straight into its expanded rows (one per
    top-k entry whose expert is on the receiving rank), grouped by local expert and each
    expert's block aligned to the dispatch's ``expert_alignment``: ``ElasticBuffer``'s
    ``do_expand``. Within an expert, rows come by source rank, then source token.

    Attributes:
        rows: expanded rows to allocate with ``num_worst_tokens`` (the caller's worst case);
            without it the backend allocates the sum of the aligned counts (exactly the rows).
        zero_padding: zero the rows no entry fills (payload, scales, weight); otherwise their
            content is unspecified.
    """

    rows: int
    zero_padding: bool


class Backend(abc.ABC):
    """Dispatch and combine for one Buffer. See ``ep_comm.buffer.Buffer`` for the semantics."""

    name: str = "?"
    #: Whether ``dispatch`` takes ``expand=ExpandRequest(...)`` (the NVLink kernels).
    expands_in_dispatch: bool = False

    @abc.abstractmethod
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """-> (num_tokens_per_rank, num_tokens_per_rdma_rank | None, num_tokens_per_expert,
        is_token_in_rank)."""

    @abc.abstractmethod
    def dispatch(self, x: torch.Tensor, x_scales: torch.Tensor | None, *,
                 handle: DispatchHandle | None, num_tokens_per_rank, num_tokens_per_rdma_rank,
                 is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                 num_experts: int, expert_alignment: int, num_worst_tokens: int, config):
        """-> (recv_x, recv_x_scales | None, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle)."""

    @abc.abstractmethod
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights, biases, config):
        """-> (combined_x, combined_topk_weights | None)."""

    @abc.abstractmethod
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, *, use_fp8: bool, round_scale: bool,
                             use_ue8m0: bool, cumulative_local_expert_recv_stats,
                             dispatch_wait_recv_cost_stats, return_recv_hook: bool):
        """-> (recv_x, recv_x_scales | None, recv_count, handle, hook | None)."""

    @abc.abstractmethod
    def low_latency_combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, *,
                            zero_copy: bool, use_logfmt: bool, out, return_recv_hook: bool,
                            combine_wait_recv_cost_stats):
        """-> (combined_x, hook | None)."""

    @abc.abstractmethod
    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """[L, R * M, hidden] bf16 registered buffer for zero-copy combine."""

    @abc.abstractmethod
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        ...

    def check_low_latency_send(self, kind: str, handle: LowLatencyHandle | None = None) -> None:
        """Before a low-latency ``kind`` call ("dispatch", or "combine" of ``handle``) is
        numbered: raise InputError where this rank's own order of calls and receive hooks would
        overwrite a result not yet received. A backend without a double buffer has none."""

    @abc.abstractmethod
    def mask_buffer(self) -> torch.Tensor:
        """[R] int32 mask: 1 = rank masked (failed): neither sent to nor waited for."""

    def comm_stream(self):
        """The stream communication runs on (None on CPU)."""
        return None

    def fuses_agreement(self, op: str, waits_for_counts: bool) -> bool:
        """True if this backend checks the call agreement of an ``op`` call itself, inside an
        exchange the call makes anyway (docs/faults.md), so that ``Buffer`` makes no exchange
        of its own for it. ``waits_for_counts``: the host waits for the call's count exchange
        (a dispatch from a layout without ``num_worst_tokens``)."""
        return False

    def layout_host_path(self):
        """The C++ host path of ``get_dispatch_layout`` (a callable returning its four
        results, or None where it declines), or None."""
        return None

    def normal_host_path(self):
        """The C++ host path of normal-mode dispatch (``.dispatch`` returning None where it
        declines), or None: this backend has none, or it could not be built."""
        return None

    def ll_host_path(self):
        """The C++ host path of the low-latency calls (``.dispatch`` / ``.combine`` returning
        None where they decline), or None: this backend has none, or it could not be built."""
        return None

    def min_nvl_bytes(self) -> int | None:
        """The smallest ``num_nvl_bytes`` of the ranks, where this backend exchanged them (its
        NVLink buffer layout is computed for it), else None (each rank's own counts)."""
        return None

    def destroy(self) -> None:
        """Release buffers. The backend is unusable afterwards."""
