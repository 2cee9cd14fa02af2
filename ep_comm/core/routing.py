"""Dispatch layout: which token goes to which rank, computed with plain tensor ops.

This is the reference computation of ``Buffer.get_dispatch_layout`` (the kernels backend runs
``kernels/layout.cu`` instead and is checked against this). Experts are split evenly and
contiguously over ranks: rank r owns experts ``[r * E / R, (r + 1) * E / R)``.
"""
from __future__ import annotations

import torch


def token_ranks(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, K] int64: the rank owning each selected expert, -1 where ``topk_idx`` is -1."""
    per_rank = num_experts // num_ranks
    return torch.where(topk_idx >= 0, torch.div(topk_idx, per_rank, rounding_mode="floor"), -1)


def is_token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: token t has at least one expert on rank r."""
    ranks = token_ranks(topk_idx, num_experts, num_ranks)
    hit = torch.zeros(topk_idx.shape[0], num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    # -1 lands in the extra column num_ranks, which is dropped.
    hit.scatter_(1, torch.where(ranks >= 0, ranks, num_ranks), True)
    return hit[:, :num_ranks].contiguous()


def distinct_ids(topk_idx: torch.Tensor) -> torch.Tensor:
    """[T, K] int64: each row's ids sorted, with repeats of an id replaced by -1.

    A token that names one expert twice in its top-k row still goes to that expert once (one
    received row), so per-expert counts count distinct ids, not slots.
    """
    ids = torch.sort(topk_idx, dim=1).values
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return torch.where(repeat, torch.full_like(ids, -1), ids)


def compute_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                            ranks_per_node: int):
    """The four layout tensors of ``get_dispatch_layout``.

    Returns:
        num_tokens_per_rank: [R] int32.
        num_tokens_per_rdma_rank: [nodes] int32, or None when all ranks are on one node.
        num_tokens_per_expert: [E] int32 (a token counts once per distinct selected expert).
        is_token_in_rank: [T, R] bool.
    """
    in_rank = is_token_in_rank(topk_idx, num_experts, num_ranks)
    per_rank = in_rank.sum(dim=0, dtype=torch.int32)
    distinct = distinct_ids(topk_idx)
    per_expert = torch.bincount(distinct[distinct >= 0], minlength=num_experts).to(torch.int32)
    num_nodes = num_ranks // ranks_per_node
    per_node = None
    if num_nodes > 1:
        in_node = in_rank.view(-1, num_nodes, ranks_per_node).any(dim=2)
        per_node = in_node.sum(dim=0, dtype=torch.int32)
    return per_rank, per_node, per_expert, in_rank


def send_positions(is_token_in_rank: torch.Tensor, recv_offset: torch.Tensor) -> torch.Tensor:
    """[T, R] int32: row of token t in rank r's received tensor, -1 if t is not sent to r.

    ``recv_offset[r]`` is where this rank's block starts in rank r's received rows
    (``rank_prefix_matrix[rank - 1, r]``, 0 for rank 0).
    """
    order = torch.cumsum(is_token_in_rank.to(torch.int32), dim=0, dtype=torch.int32) - 1
    pos = order + recv_offset.to(torch.int32).unsqueeze(0)
    return torch.where(is_token_in_rank, pos, torch.full_like(pos, -1))


def local_topk_idx(topk_idx: torch.Tensor, rank: int, experts_per_rank: int) -> torch.Tensor:
    """``topk_idx`` as seen by ``rank``: local expert ids, -1 for experts elsewhere (and for -1)."""
    lo = rank * experts_per_rank
    mine = (topk_idx >= lo) & (topk_idx < lo + experts_per_rank)
    return torch.where(mine, topk_idx - lo, torch.full_like(topk_idx, -1))

