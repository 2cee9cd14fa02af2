"""Typed handles returned by dispatch and consumed by combine (and by cached dispatch).

Both backends fill the same fields, so a test can compare a kernels handle with a reference
handle field by field. Backend-private state (device buffers, channel offsets) lives in
``backend_state`` and is never read by the other backend.

Both handles also behave as DeepEP's handle tuples: ``handle[0]``, ``len(handle)`` and
``a, b, ... = handle`` give DeepEP's elements in DeepEP's order, dtypes and meanings (v1 at
567632d, ``deep_ep/buffer.py``), so code written against DeepEP's tuples runs unchanged. The
elements DeepEP keeps and ep_comm does not need (channel prefix matrices, ``send_head``) are
computed from the handle on first access, with DeepEP's channel split.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

#: DeepEP's names of the intranode handle tuple, in order (``deep_ep.Buffer.dispatch``).
DISPATCH_TUPLE_FIELDS = ("rank_prefix_matrix", "channel_prefix_matrix",
                         "recv_channel_prefix_matrix", "recv_src_idx", "is_token_in_rank",
                         "send_head")
#: DeepEP's names of the low-latency handle tuple, in order.
LOW_LATENCY_TUPLE_FIELDS = ("src_info", "layout_range", "num_max_dispatch_tokens_per_rank",
                            "hidden", "num_experts")


def channel_bounds(num_tokens: int, num_channels: int, device) -> torch.Tensor:
    """[C + 1] int64: DeepEP's split of ``num_tokens`` tokens into ``num_channels`` contiguous
    ranges (``get_channel_task_range``: ceil(T / C) tokens per channel, the last ones shorter
    or empty). Channel c holds tokens ``[b[c], b[c + 1])``."""
    per = -(-num_tokens // num_channels) if num_channels else 0
    c = torch.arange(num_channels + 1, device=device, dtype=torch.int64)
    return torch.clamp(c * per, max=num_tokens)


class _TupleView:
    """Mixin: sequence protocol over ``self._tuple()`` (a tuple built once, then cached)."""

    __slots__ = ()

    def __getitem__(self, i):
        return self._tuple()[i]

    def __iter__(self):
        return iter(self._tuple())

    def __len__(self) -> int:
        return len(self._tuple())


@dataclasses.dataclass(slots=True)
class DispatchHandle(_TupleView):
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
        num_channels: DeepEP's channel count ``config.num_sms // 2`` of the dispatch (sizes the
            channel matrices of the tuple view; 0 = ``Buffer.num_sms // 2``).

    As a tuple (one node) it is DeepEP's 6-tuple, C = ``num_channels``:

    0. ``rank_prefix_matrix`` [R, R] int32 (as above; DeepEP fills column ``rank`` only).
    1. ``channel_prefix_matrix`` [R, C] int32: ``[r, c]`` = this rank's tokens of channels
       0..c sent to rank r (inclusive prefix over channels).
    2. ``recv_channel_prefix_matrix`` [R, C] int32: ``[s, c]`` = first row of source s's
       channel c inside s's block of received rows (exclusive prefix).
    3. ``recv_src_idx`` [N] int32.
    4. ``is_token_in_rank`` [T, R] bool (the tensor given to dispatch).
    5. ``send_head`` [T, R] int32: position of token t among the tokens of its channel sent to
       rank r, -1 if not sent. (DeepEP's combine rewrites it in place; ep_comm's does not.)

    Across nodes the handle has no tuple form (DeepEP's 10-tuple holds RDMA ring state that
    ep_comm's internode path does not have): indexing raises ``EpCommError``.
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
    num_channels: int = 0
    tuple_cache: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def _tuple(self) -> tuple:
        if self.tuple_cache is None:
            if self.num_tokens_per_rdma_rank is not None:
                from ep_comm.errors import EpCommError
                raise EpCommError(
                    "an internode DispatchHandle has no DeepEP tuple form (DeepEP's 10-tuple "
                    "holds RDMA ring state ep_comm does not keep); use its named fields")
            self.tuple_cache = (self.rank_prefix_matrix, self.channel_prefix_matrix,
                                self.recv_channel_prefix_matrix, self.recv_src_idx,
                                self.is_token_in_rank, self.send_head)
        return self.tuple_cache

    def _channels(self) -> int:
        if self.num_channels > 0:
            return self.num_channels
        from ep_comm.core.constants import DEFAULT_NUM_SMS
        return DEFAULT_NUM_SMS // 2

    @property
    def channel_prefix_matrix(self) -> torch.Tensor:
        """[R, C] int32, DeepEP's sender-side channel prefix matrix (see the class doc)."""
        sent = torch.cumsum(self.is_token_in_rank.to(torch.int32), dim=0, dtype=torch.int32)
        sent = torch.cat([sent.new_zeros(1, self.num_ranks), sent])  # [T + 1, R]
        ends = channel_bounds(self.num_tokens, self._channels(), sent.device)[1:]
        return sent[ends].t().contiguous()

    @property
    def recv_channel_prefix_matrix(self) -> torch.Tensor:
        """[R, C] int32, DeepEP's receiver-side channel prefix matrix (see the class doc).

        The channel split of source s needs s's token count: the kernels backend records it
        (``backend_state.num_tokens_of_rank``); the reference backend does not exchange it, so
        there every source is taken to have this rank's token count (DeepEP's own tests use
        equal counts)."""
        r, c = self.num_ranks, self._channels()
        dev = self.recv_src_idx.device
        counts = getattr(self.backend_state, "num_tokens_of_rank", None)
        counts = counts.tolist() if counts is not None else [self.num_tokens] * r
        prefix = self.rank_prefix_matrix[:, self.rank].tolist()
        out = torch.zeros((r, c), dtype=torch.int32, device=dev)
        start = 0
        for s in range(r):
            rows = self.recv_src_idx[start:prefix[s]]
            starts = channel_bounds(int(counts[s]), c, dev)[:-1]
            # Rows of source s come in ascending token order: a channel starts after the rows
            # whose token lies before the channel's first token.
            out[s] = torch.searchsorted(rows.to(torch.int64).contiguous(), starts).to(torch.int32)
            start = prefix[s]
        return out

    @property
    def send_head(self) -> torch.Tensor:
        """[T, R] int32, DeepEP's ``send_head`` (see the class doc)."""
        sent = self.is_token_in_rank.to(torch.int32)
        before = torch.cumsum(sent, dim=0, dtype=torch.int32) - sent  # earlier tokens sent
        before = torch.cat([before, (before[-1:] + sent[-1:]) if len(sent) else before[:0]])
        bounds = channel_bounds(self.num_tokens, self._channels(), sent.device)
        tok = torch.arange(self.num_tokens, device=sent.device)
        first = bounds[torch.searchsorted(bounds, tok, right=True) - 1]  # channel start of t
        head = before[:self.num_tokens] - before[first]
        return torch.where(self.is_token_in_rank, head, torch.full_like(head, -1))

    @property
    def num_tokens(self) -> int:
        """Tokens on this rank (rows of ``x`` at dispatch, rows of ``combined_x``)."""
        return self.is_token_in_rank.shape[0]

    @property
    def num_recv_rows(self) -> int:
        """Rows of ``recv_x``: ``num_worst_tokens`` if given, else ``num_recv_tokens``."""
        return self.num_worst_tokens if self.num_worst_tokens > 0 else self.num_recv_tokens


@dataclasses.dataclass(slots=True)
class LowLatencyHandle(_TupleView):
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

    As a tuple it is DeepEP's 5-tuple: ``(src_info, layout_range,
    num_max_dispatch_tokens_per_rank, hidden, num_experts)``, ``layout_range`` being [L, R]
    int64 ``begin << 32 | count``.
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
    tuple_cache: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def _tuple(self) -> tuple:
        if self.tuple_cache is None:
            self.tuple_cache = (self.src_info, self.layout_range,
                                self.num_max_dispatch_tokens_per_rank, self.hidden,
                                self.num_experts)
        return self.tuple_cache

    @property
    def layout_range(self) -> torch.Tensor:
        """[L, R] int64 with ``begin << 32 | count``, DeepEP's packed form of the ranges."""
        return (self.range_begin.to(torch.int64) << 32) | self.range_count.to(torch.int64)
