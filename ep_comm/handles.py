"""Typed handles returned by dispatch and consumed by combine (and by cached dispatch).

Both backends fill the same fields, so a test can compare a kernels handle with a reference
handle field by field. Backend-private state (device buffers, channel offsets) lives in
``backend_state`` and is never read by the other backend.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(slots=True)
class DispatchHandle:
    """Routes of one normal-mode dispatch; what combine and a cached dispatch need.

    Shapes use T = tokens on this rank, R = ranks, L = local experts, N = received rows
    (``num_recv_tokens``, or ``num_worst_tokens`` when that was given).

    Attributes:
        rank, num_ranks, num_experts: the group and the expert count of the dispatch.
        is_token_in_rank: [T, R] bool, token t is sent to rank r.
        num_tokens_per_rank: [R] int32, tokens this rank sends to each rank.
        rank_prefix_matrix: [R, R] int32, ``[i, j]`` = tokens sent to rank j by ranks 0..i
            (so rank j's rows from source i start at ``[i - 1, j]``).
        send_pos: [T, R] int32, the row of token t in rank r's received tensor, -1 if not sent.
        recv_src_idx: [N] int32, for each received row, its token index on the source rank
            (-1 on padding rows when ``num_worst_tokens`` is used).
        recv_src_rank: [N] int32, for each received row, its source rank (-1 on padding rows).
        num_recv_tokens: rows actually received.
        num_recv_tokens_per_expert: [L] int32, received tokens per local expert (not aligned).
        num_worst_tokens: the fixed output size asked for, 0 if none.
        num_tokens_per_rdma_rank: [nodes] int32 or None (one node).
        backend_state: backend-private data (kernels: buffer offsets, channel prefix sums).
    """

    rank: int
    num_ranks: int
    num_experts: int
    is_token_in_rank: torch.Tensor
    num_tokens_per_rank: torch.Tensor
    rank_prefix_matrix: torch.Tensor
    send_pos: torch.Tensor
    recv_src_idx: torch.Tensor
    recv_src_rank: torch.Tensor
    num_recv_tokens: int
    num_recv_tokens_per_expert: torch.Tensor
    num_worst_tokens: int = 0
    num_tokens_per_rdma_rank: torch.Tensor | None = None
    backend_state: Any = None

    @property
    def num_tokens(self) -> int:
        """Tokens on this rank (rows of ``x`` at dispatch, rows of ``combined_x``)."""
        return self.is_token_in_rank.shape[0]

    @property
    def num_recv_rows(self) -> int:
        """Rows of ``recv_x``: ``num_worst_tokens`` if given, else ``num_recv_tokens``."""
        return self.num_worst_tokens if self.num_worst_tokens > 0 else self.num_recv_tokens


@dataclasses.dataclass(slots=True)
class LowLatencyHandle:
    """Layout of one low-latency dispatch; what low-latency combine needs.

    Shapes use L = local experts, R = ranks, M = ``num_max_dispatch_tokens_per_rank``.

    Attributes:
        src_info: [L, R * M] int32, source token index of each received row (-1 past the count).
        range_begin: [L, R] int32, first row of expert e's block from source rank s.
        range_count: [L, R] int32, rows in that block (tokens of s routed to expert e).
        recv_count: [L] int32, valid rows per local expert.
        num_max_dispatch_tokens_per_rank, hidden, num_experts: sizes of the call.
        buffer_idx: which half of the double buffer holds this result (0 or 1).
        use_fp8: whether the payload was cast to fp8.
        backend_state: backend-private data.
    """

    src_info: torch.Tensor
    range_begin: torch.Tensor
    range_count: torch.Tensor
    recv_count: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    buffer_idx: int
    use_fp8: bool
    backend_state: Any = None

    @property
    def layout_range(self) -> torch.Tensor:
        """[L, R] int64 with ``begin << 32 | count``, DeepEP's packed form of the ranges."""
        return (self.range_begin.to(torch.int64) << 32) | self.range_count.to(torch.int64)
