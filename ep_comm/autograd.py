"""Differentiable dispatch and combine for training.

The gradient of dispatch is a combine along the same routes (a token's gradient is the sum of
the gradients of its copies), and the gradient of combine is a cached dispatch (each copy gets
the gradient of the sum). These wrappers make that automatic:

    recv_x, recv_idx, recv_w, counts, handle = ep_comm.autograd.dispatch(buffer, x, topk_idx,
                                                                         topk_weights, E)
    y = experts(recv_x, recv_idx, recv_w)            # any differentiable expert compute
    out = ep_comm.autograd.combine(buffer, y, handle)
    out.sum().backward()                              # gradients flow back through both
"""
from __future__ import annotations

import torch


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, num_experts, expert_alignment):
        per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights, expert_alignment=expert_alignment)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, counts, handle

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_idx, grad_recv_w, _grad_counts, _grad_handle):
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.contiguous(), ctx.handle,
                                               topk_weights=grad_recv_w.contiguous()
                                               if grad_recv_w is not None else None)
        return grad_x, grad_w, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle):
        combined, _, _ = buffer.combine(x, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return combined

    @staticmethod
    def backward(ctx, grad_combined):
        grad_x, *_ = ctx.buffer.dispatch(grad_combined.to(torch.bfloat16).contiguous(),
                                         handle=ctx.handle)
        return grad_x, None, None


def dispatch(buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
             num_experts: int, expert_alignment: int = 1):
    """Differentiable layout + dispatch (bf16 ``x`` [T, H]; gradients for x and topk_weights).

    Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
    handle)`` as ``Buffer.dispatch`` does.
    """
    return _Dispatch.apply(x, topk_weights, buffer, topk_idx, num_experts, expert_alignment)


def combine(buffer, x: torch.Tensor, handle) -> torch.Tensor:
    """Differentiable combine of ``x`` [N, H] bf16 along ``handle``; returns [T, H] bf16."""
    return _Combine.apply(x, buffer, handle)
