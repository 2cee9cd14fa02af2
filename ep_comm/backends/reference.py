"""The reference backend: every operation built from torch.distributed collectives.

Runs on gloo (CPU) and NCCL (GPU). It is the oracle the GPU kernels are tested against and the
path for machines without GPUs. It favours obviousness over speed: it synchronises with the
host to learn counts, and it is never used unless asked for (``backend="reference"``, or
``"auto"`` on CPU).

Normal mode uses ``all_to_all_single``; low-latency mode uses point-to-point sends among the
ranks that are not masked, so that a failed (masked) rank is neither sent to nor waited for.
"""
from __future__ import annotations


import dataclasses
import time

import torch

from ep_comm.core import fp8
from ep_comm.core import routing
from ep_comm.core.constants import align
from ep_comm.backends.base import Backend
from ep_comm.runtime.comm import Comm
from ep_comm.handles import DispatchHandle, LowLatencyHandle


@dataclasses.dataclass(slots=True)
class ReferenceDispatchState:
    """The reference backend's part of a ``DispatchHandle``: the sequence number of the dispatch
    call that made it (the handle's identity in call agreement, the same on every rank)."""

    call_seq: int


@dataclasses.dataclass(slots=True)
class ReferenceLowLatencyState:
    """The reference backend's part of a ``LowLatencyHandle`` (``backend_state``).

    Attributes:
        token_of: per source rank, the token index of each row received from it.
        peers: the ranks this rank exchanged rows with in the dispatch.
        expert_counts: per peer, [L_peer] int64 rows this rank sent to each of its experts.
        call_seq: sequence number of the dispatch call (the handle's identity).
    """

    token_of: dict
    peers: list
    expert_counts: dict
    call_seq: int = -1


class ReferenceBackend(Backend):
    """Every call first agrees (``Comm.agree``): the call's signature travels with its first
    exchange, and ranks masked with ``low_latency_update_mask_buffer`` take no part in any
    exchange, in normal and low-latency mode alike (tokens routed to their experts are dropped,
    as if their ids were -1)."""

    name = "reference"

    def fuses_agreement(self, op: str, waits_for_counts: bool) -> bool:
        """Always: every call agrees in its first exchange (with the counts, for a dispatch)."""
        return True

    def __init__(self, comm: Comm):
        self.comm = comm
        self.device = comm.device
        self._mask = torch.zeros(comm.num_ranks, dtype=torch.int32, device=self.device)
        self._ll_next_buffer = 0
        # Zero-copy combine buffers, one per half of the double buffer, keyed by their shape.
        self._ll_combine_buffers: dict[tuple, list[torch.Tensor]] = {}

    # ---------------------------------------------------------------- normal mode
    def get_dispatch_layout(self, topk_idx, num_experts):
        return routing.compute_dispatch_layout(topk_idx, num_experts, self.comm.num_ranks,
                                              self.comm.ranks_per_node)

    def dispatch(self, x, x_scales, *, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                 is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, num_experts,
                 expert_alignment, num_worst_tokens, config):
        comm, r, me = self.comm, self.comm.num_ranks, self.comm.rank
        peers = self._active_peers()
        if handle is None:
            handle = self._notify(is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert,
                                  num_tokens_per_rdma_rank, num_experts, num_worst_tokens, peers)
        else:
            comm.agree(None, peers, "dispatch/agree")
        send_counts = handle.num_tokens_per_rank.tolist()
        prefix = handle.rank_prefix_matrix
        recv_counts = (prefix[:, me] - torch.cat([prefix.new_zeros(1), prefix[:-1, me]])).tolist()
        n_recv, rows = handle.num_recv_tokens, handle.num_recv_rows
        # Tokens to each rank, in token order, ranks one after the other.
        send_idx = _send_order(handle.is_token_in_rank)

        def exchange(src: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((rows, *src.shape[1:]), fill, dtype=src.dtype, device=src.device) \
                if fill is not None else torch.empty((rows, *src.shape[1:]), dtype=src.dtype,
                                                     device=src.device)
            comm.all_to_all(out[:n_recv], src[send_idx].contiguous(), recv_counts, send_counts,
                            "dispatch/data", "token rows", peers)
            return out

        recv_x = exchange(x, 0)
        recv_scales = exchange(x_scales, 0) if x_scales is not None else None
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            per_rank = num_experts // r
            dest = torch.repeat_interleave(torch.arange(r, device=x.device),
                                           torch.tensor(send_counts, device=x.device))
            sent = topk_idx[send_idx]
            lo = (dest * per_rank).unsqueeze(1)
            local = torch.where((sent >= lo) & (sent < lo + per_rank), sent - lo,
                                torch.full_like(sent, -1))
            recv_topk_idx = torch.full((rows, topk_idx.shape[1]), -1, dtype=topk_idx.dtype,
                                       device=x.device)
            comm.all_to_all(recv_topk_idx[:n_recv], local.contiguous(), recv_counts,
                            send_counts, "dispatch/data", "top-k ids", peers)
        if topk_weights is not None:
            recv_topk_weights = exchange(topk_weights, 0.0)
        counts = handle.num_recv_tokens_per_expert.tolist()
        if num_worst_tokens > 0:
            count_list = []  # no host synchronisation is promised: counts stay on the device
        else:
            count_list = [align(c, expert_alignment) for c in counts]
        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, count_list, handle

    def _notify(self, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert,
                num_tokens_per_rdma_rank, num_experts, num_worst_tokens, peers) -> DispatchHandle:
        """Agree on the call, exchange counts and build the handle (the kernels' 'notify')."""
        comm, r, me = self.comm, self.comm.num_ranks, self.comm.rank
        dev = is_token_in_rank.device
        per_rank = num_experts // r
        if len(peers) < r:  # masked ranks receive nothing: their experts count as -1
            live = torch.zeros(r, dtype=torch.bool, device=dev)
            live[peers] = True
            is_token_in_rank = is_token_in_rank & live.unsqueeze(0)
            num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
            num_tokens_per_expert = num_tokens_per_expert * live.repeat_interleave(per_rank)
        # The call's signature and the per-rank counts travel in one all-gather.
        gathered = comm.agree(num_tokens_per_rank.to(torch.int64), peers, "dispatch/notify")
        matrix = gathered.to(torch.int32).to(dev)  # [i, j] = tokens rank i sends to rank j
        prefix = torch.cumsum(matrix, dim=0, dtype=torch.int32)
        expert_counts = torch.zeros(r * per_rank, dtype=torch.int32, device=dev)
        comm.all_to_all(expert_counts, num_tokens_per_expert.to(torch.int32).contiguous(),
                        None, None, "dispatch/notify", "per-expert token counts", peers)
        recv_per_expert = expert_counts.view(r, per_rank).sum(dim=0, dtype=torch.int32)
        col = matrix[:, me].tolist()
        n_recv = sum(col)
        if num_worst_tokens and n_recv > num_worst_tokens:
            from ep_comm.errors import InputError
            raise InputError(f"rank {me} receives {n_recv} tokens, more than "
                             f"num_worst_tokens={num_worst_tokens}")
        rows = num_worst_tokens if num_worst_tokens > 0 else n_recv
        # This rank's block in rank j's received rows starts after the blocks of ranks < me.
        send_pos = routing.send_positions(is_token_in_rank, prefix[me] - matrix[me])
        src_rank = torch.full((rows,), -1, dtype=torch.int32, device=dev)
        src_rank[:n_recv] = torch.repeat_interleave(
            torch.arange(r, dtype=torch.int32, device=dev), matrix[:, me])
        src_idx = torch.full((rows,), -1, dtype=torch.int32, device=dev)
        my_idx = torch.cat([torch.nonzero(is_token_in_rank[:, j]).flatten()
                            for j in range(r)]).to(torch.int32)
        comm.all_to_all(src_idx[:n_recv], my_idx.contiguous(), col,
                        num_tokens_per_rank.tolist(), "dispatch/notify", "source token indices",
                        peers)
        return DispatchHandle(
            rank=me, num_ranks=r, num_experts=num_experts, is_token_in_rank=is_token_in_rank,
            num_tokens_per_rank=num_tokens_per_rank.to(torch.int32), rank_prefix_matrix=prefix,
            send_pos=send_pos, recv_src_idx=src_idx, recv_src_rank=src_rank,
            num_recv_tokens=n_recv, num_recv_tokens_per_expert=recv_per_expert,
            num_worst_tokens=num_worst_tokens, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            backend_state=ReferenceDispatchState(call_seq=comm.seq))

    def combine(self, x, handle, topk_weights, biases, config):
        comm, me = self.comm, self.comm.rank
        peers = self._active_peers()
        comm.agree(None, peers, "combine/agree")
        prefix = handle.rank_prefix_matrix
        back_counts = (prefix[:, me] - torch.cat([prefix.new_zeros(1), prefix[:-1, me]])).tolist()
        send_counts = handle.num_tokens_per_rank.tolist()
        n_recv, t = handle.num_recv_tokens, handle.num_tokens
        send_idx = _send_order(handle.is_token_in_rank)

        def gather_back(src: torch.Tensor) -> torch.Tensor:
            """Rows sent back by every rank, summed per source token in float32."""
            back = torch.empty((len(send_idx), *src.shape[1:]), dtype=src.dtype, device=src.device)
            comm.all_to_all(back, src[:n_recv].contiguous(), send_counts, back_counts,
                            "combine/data", "expert output rows", peers)
            acc = torch.zeros((t, *src.shape[1:]), dtype=torch.float32, device=src.device)
            acc.index_add_(0, send_idx, back.float())
            return acc

        acc = gather_back(x)
        for b in biases:
            acc += b.float()
        combined_w = gather_back(topk_weights) if topk_weights is not None else None
        return acc.to(torch.bfloat16), combined_w

    # ----------------------------------------------------------- low-latency mode
    def _active_peers(self) -> list[int]:
        mask = self._mask.tolist()
        return [p for p in range(self.comm.num_ranks) if not mask[p] or p == self.comm.rank]

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, *,
                             use_fp8, round_scale, use_ue8m0, cumulative_local_expert_recv_stats,
                             dispatch_wait_recv_cost_stats, return_recv_hook):
        r = self.comm.num_ranks
        m, hidden, dev = num_max_dispatch_tokens_per_rank, x.shape[1], x.device
        per_rank = num_experts // r
        peers = self._active_peers()
        # Agree first (fixed-size vectors): per-expert count messages are sized by num_experts,
        # which is one of the things the ranks could disagree on.
        agree_wait = self._agree_timed(peers, "low_latency_dispatch/agree")
        # Per destination: for each of its experts in order, that expert's tokens in token order.
        token_of, expert_counts = {}, {}
        for p in peers:
            toks, cnts = [], []
            for e in range(per_rank):
                sel = (topk_idx == p * per_rank + e).any(dim=1).nonzero().flatten()
                toks.append(sel)
                cnts.append(len(sel))
            token_of[p] = torch.cat(toks) if toks else torch.zeros(0, dtype=torch.long, device=dev)
            expert_counts[p] = torch.tensor(cnts, dtype=torch.int32, device=dev)
        recv_counts = {p: torch.empty(per_rank, dtype=torch.int32, device=dev) for p in peers}
        waited = self._exchange(expert_counts, recv_counts, "low_latency_dispatch/count",
                                "per-expert token counts")
        if use_fp8:
            q, scales = fp8.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
        sends, recvs = {}, {}
        for p in peers:
            idx = token_of[p]
            n_in = int(recv_counts[p].sum())
            sends[("src", p)] = idx.to(torch.int32)
            recvs[("src", p)] = torch.empty(n_in, dtype=torch.int32, device=dev)
            if use_fp8:
                sends[("x", p)], recvs[("x", p)] = q[idx], torch.empty(n_in, hidden, dtype=q.dtype, device=dev)
                sends[("s", p)] = scales[idx]
                recvs[("s", p)] = torch.empty(n_in, scales.shape[1], dtype=scales.dtype, device=dev)
            else:
                sends[("x", p)], recvs[("x", p)] = x[idx], torch.empty(n_in, hidden, dtype=x.dtype, device=dev)
        waited2 = self._exchange_keyed(sends, recvs, "low_latency_dispatch/data", "token rows")

        buffer_idx = self._ll_next_buffer
        self._ll_next_buffer ^= 1
        rows = r * m
        recv_x = torch.empty(per_rank, rows, hidden, dtype=fp8.FP8_DTYPE if use_fp8 else x.dtype,
                             device=dev)
        recv_scales = None
        if use_fp8:
            g = hidden // (512 if use_ue8m0 else 128)
            sdtype = torch.int32 if use_ue8m0 else torch.float32
            recv_scales = torch.empty(per_rank, g, rows, dtype=sdtype, device=dev).transpose(1, 2)
        src_info = torch.full((per_rank, rows), -1, dtype=torch.int32, device=dev)
        range_begin = torch.zeros(per_rank, r, dtype=torch.int32, device=dev)
        range_count = torch.zeros(per_rank, r, dtype=torch.int32, device=dev)
        recv_count = torch.zeros(per_rank, dtype=torch.int32, device=dev)

        def unpack():
            """Place rows into the per-expert layout: sources ascending, token order within."""
            for p in peers:
                cnt = recv_counts[p].tolist()
                row = 0
                for e in range(per_rank):
                    n, begin = cnt[e], int(recv_count[e])
                    sl = slice(row, row + n)
                    recv_x[e, begin:begin + n] = recvs[("x", p)][sl]
                    if use_fp8:
                        recv_scales[e, begin:begin + n] = recvs[("s", p)][sl]
                    src_info[e, begin:begin + n] = recvs[("src", p)][sl]
                    range_begin[e, p], range_count[e, p] = begin, n
                    recv_count[e] += n
                    row += n
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)
            if dispatch_wait_recv_cost_stats is not None:
                for p in peers:
                    ns = int((agree_wait.get(p, 0.0) + waited.get(p, 0.0) + waited2.get(p, 0.0))
                             * 1e9)
                    dispatch_wait_recv_cost_stats[p] += ns

        handle = LowLatencyHandle(
            src_info=src_info, range_begin=range_begin, range_count=range_count,
            recv_count=recv_count, num_max_dispatch_tokens_per_rank=m, hidden=hidden,
            num_experts=num_experts, buffer_idx=buffer_idx, use_fp8=use_fp8,
            backend_state=ReferenceLowLatencyState(token_of=token_of, peers=peers,
                                                  expert_counts=expert_counts,
                                                  call_seq=self.comm.seq))
        if return_recv_hook:
            return recv_x, recv_scales, recv_count, handle, unpack
        unpack()
        return recv_x, recv_scales, recv_count, handle, None

    def _exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor],
                  phase: str, what: str) -> dict[int, float]:
        """``Comm.exchange``: only the peers named take part (masked ranks neither send nor are
        waited for); returns the seconds waited per peer received from."""
        return self.comm.exchange(sends, recvs, phase, what, self._active_peers())

    def _exchange_keyed(self, sends, recvs, phase, what):
        """Several point-to-point exchanges ``(kind, peer)`` with one bounded wait per message."""
        waited: dict[int, float] = {}
        for kind in sorted({k for k, _ in recvs} | {k for k, _ in sends}):
            w = self._exchange({p: t.contiguous() for (k, p), t in sends.items() if k == kind},
                               {p: t for (k, p), t in recvs.items() if k == kind}, phase, what)
            for p, s in w.items():
                waited[p] = waited.get(p, 0.0) + s
        return waited

    def _agree_timed(self, peers, phase: str) -> dict:
        """The call agreement, which also tells how long this rank waited for each peer: every
        rank sends the wall-clock time it entered the call with its signature, so a late peer
        (whose arrival the agreement absorbs) is charged to the wait-cost statistics, not to
        the exchanges after it. {peer: seconds this rank waited for it}."""
        now = time.time_ns()
        # the agreement payload is R entries (its fixed size); every entry holds the time
        got = self.comm.agree(torch.full((self.comm.num_ranks,), now, dtype=torch.int64), peers,
                              phase)
        return {p: max(0, int(got[p, 0]) - now) / 1e9 for p in peers}

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, *, zero_copy, use_logfmt,
                            out, return_recv_hook, combine_wait_recv_cost_stats):
        r = self.comm.num_ranks
        dev, hidden = topk_idx.device, handle.hidden
        per_rank = handle.num_experts // r
        src = self.get_next_low_latency_combine_buffer(handle) if zero_copy else x
        state = handle.backend_state
        active = self._active_peers()
        agree_wait = self._agree_timed(active, "low_latency_combine/agree")
        peers = [p for p in state.peers if p in active]
        sends, recvs = {}, {}
        begin, count = handle.range_begin.tolist(), handle.range_count.tolist()
        for p in peers:
            sends[p] = torch.cat([src[e, begin[e][p]:begin[e][p] + count[e][p]]
                                  for e in range(per_rank)]) if per_rank else src.new_zeros(0, hidden)
            n_back = int(state.expert_counts[p].sum())
            recvs[p] = torch.empty(n_back, hidden, dtype=torch.bfloat16, device=dev)
        waited = self._exchange(sends, recvs, "low_latency_combine/data", "expert output rows")
        result = out if out is not None else torch.empty(topk_idx.shape[0], hidden,
                                                         dtype=torch.bfloat16, device=dev)

        def reduce():
            acc = torch.zeros(topk_idx.shape[0], hidden, dtype=torch.float32, device=dev)
            for p in peers:
                row = 0
                cnts = state.expert_counts[p].tolist()
                for e in range(per_rank):
                    n = cnts[e]
                    if n:
                        toks = (topk_idx == p * per_rank + e).any(dim=1).nonzero().flatten()
                        w = (topk_weights * (topk_idx == p * per_rank + e)).sum(dim=1)[toks]
                        acc.index_add_(0, toks, recvs[p][row:row + n].float() * w.unsqueeze(1))
                    row += n
            result.copy_(acc.to(torch.bfloat16))
            if combine_wait_recv_cost_stats is not None:
                for p in peers:
                    combine_wait_recv_cost_stats[p] += int((agree_wait.get(p, 0.0) +
                                                            waited.get(p, 0.0)) * 1e9)

        if return_recv_hook:
            return result, reduce
        reduce()
        return result, None

    def get_next_low_latency_combine_buffer(self, handle):
        r = self.comm.num_ranks
        key = (handle.num_experts // r, r * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
        if key not in self._ll_combine_buffers:
            self._ll_combine_buffers[key] = [
                torch.zeros(key, dtype=torch.bfloat16, device=self.device) for _ in range(2)]
        return self._ll_combine_buffers[key][handle.buffer_idx]

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        # Nothing persists between calls here; the kernels backend zeroes its signal words.
        self._ll_next_buffer = 0

    def mask_buffer(self):
        return self._mask

    def destroy(self):
        self._ll_combine_buffers.clear()


def _send_order(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """Token indices sent to rank 0, then to rank 1, ...; each in token order."""
    r = is_token_in_rank.shape[1]
    return torch.cat([torch.nonzero(is_token_in_rank[:, j]).flatten() for j in range(r)]) \
        if r else torch.zeros(0, dtype=torch.long)
