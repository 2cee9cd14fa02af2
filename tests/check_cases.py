"""Bad inputs and the errors they must raise, run inside a rank process (see test_input_checks)."""
from __future__ import annotations

import pytest
import torch

import ep_comm
from ep_comm.errors import BackendUnavailableError, BufferTooSmallError, InputError

H, E, T, K = 256, 8, 6, 2


def _buffer(ctx, **kw):
    r = ctx.world_size
    cfg = ep_comm.Buffer.get_dispatch_config(r)
    args = dict(num_nvl_bytes=cfg.get_nvl_buffer_size_hint(H * 2, r),
                num_rdma_bytes=ep_comm.Buffer.get_low_latency_rdma_size_hint(16, H, r, E),
                low_latency_mode=True, backend="reference", explicitly_destroy=True)
    args.update(kw)
    return ep_comm.Buffer(ctx.group, **args)


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g)
    return x, idx, w


def _layout(buf, idx):
    return buf.get_dispatch_layout(idx, E)[:4]


def _dispatch(buf, x, idx, w, **kw):
    per_rank, per_node, per_expert, in_rank = _layout(buf, idx)
    args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
                topk_weights=w)
    args.update(kw)
    return buf.dispatch(x, **args)


def run_check(ctx, which: str):
    x, idx, w = _inputs()
    buf = _buffer(ctx)
    expect = {
        # name: (exception, message fragment, callable)
        "x_dtype": (InputError, "dtype torch.bfloat16", lambda: _dispatch(buf, x.float(), idx, w)),
        "x_dims": (InputError, "2 dimensions", lambda: _dispatch(buf, x.view(-1), idx, w)),
        "x_noncontiguous": (InputError, "contiguous", lambda: _dispatch(buf, x.t(), idx, w)),
        "fp8_scales_shape": (InputError, "scales", lambda: _dispatch(
            buf, (x.to(torch.float8_e4m3fn), torch.ones(T, 3)), idx, w)),
        "topk_dtype": (InputError, "topk_idx must have dtype", lambda: buf.get_dispatch_layout(
            idx.int(), E)),
        "topk_rows": (InputError, "topk_idx has 6 rows but x has 5", lambda: buf.low_latency_dispatch(
            x[:-1], idx, 16, E)),
        "layout_rows": (InputError, "is_token_in_rank must have shape [5, ", lambda: _dispatch(
            buf, x[:-1], idx, w)),
        "weights_shape": (InputError, "topk_weights must have shape", lambda: _dispatch(
            buf, x, idx, w[:, :1].contiguous())),
        "experts_not_divisible": (InputError, "not divisible", lambda: buf.get_dispatch_layout(
            idx, ctx.world_size * 2 + 1 if ctx.world_size > 1 else 0)),
        "cached_with_layout": (InputError, "cached dispatch", lambda: buf.dispatch(
            x, handle=_dispatch(buf, x, idx, w)[4], topk_idx=idx)),
        "combine_rows": (InputError, "combine x has", lambda: buf.combine(
            torch.zeros(10_000, H, dtype=torch.bfloat16), _dispatch(buf, x, idx, w)[4])),
        "bias_shape": (InputError, "bias[0] must have shape", lambda: (lambda r: buf.combine(
            r[0], r[4], bias=torch.zeros(1, H, dtype=torch.bfloat16)))(_dispatch(buf, x, idx, w))),
        "alignment": (InputError, "expert_alignment", lambda: _dispatch(buf, x, idx, w,
                                                                       expert_alignment=0)),
        "comm_stream_flags": (InputError, "allocate_on_comm_stream", lambda: _dispatch(
            buf, x, idx, w, allocate_on_comm_stream=True)),
        "nvl_too_small": (BufferTooSmallError, "num_nvl_bytes >=", lambda: _dispatch(
            _buffer(ctx, num_nvl_bytes=1024), x, idx, w)),
        "ll_tokens_over_max": (InputError, "more than num_max_dispatch_tokens_per_rank",
                               lambda: buf.low_latency_dispatch(x, idx, 4, E)),
        "ll_rdma_too_small": (BufferTooSmallError, "num_rdma_bytes >=", lambda: _buffer(
            ctx, num_rdma_bytes=4096).low_latency_dispatch(x, idx, 16, E)),
        "ll_not_enabled": (InputError, "low_latency_mode=True", lambda: _buffer(
            ctx, low_latency_mode=False).low_latency_dispatch(x, idx, 16, E)),
        "ll_ue8m0_needs_round": (InputError, "round_scale", lambda: buf.low_latency_dispatch(
            x, idx, 16, E, use_ue8m0=True)),
        "ll_combine_handle": (InputError, "LowLatencyHandle", lambda: buf.low_latency_combine(
            torch.zeros(1), idx, w, handle=None)),
        "ll_mask_rank": (InputError, "rank_to_mask", lambda: buf.low_latency_update_mask_buffer(99)),
        "backend_name": (InputError, "backend must be one of", lambda: _buffer(ctx, backend="x")),
        "kernels_on_cpu": (BackendUnavailableError, "backend='reference'", lambda: _buffer(
            ctx, backend="kernels")),
        "ranks_per_node": (InputError, "ranks_per_node", lambda: _buffer(ctx, ranks_per_node=3)),
        "destroyed": (ep_comm.EpCommError, "destroyed", lambda: (buf.destroy(), _layout(buf, idx))),
    }
    exc, fragment, fn = expect[which]
    with pytest.raises(exc) as info:
        fn()
    assert fragment in str(info.value), f"message {str(info.value)!r} lacks {fragment!r}"
    return str(info.value)


CHECKS = ["x_dtype", "x_dims", "x_noncontiguous", "fp8_scales_shape", "topk_dtype", "topk_rows",
          "layout_rows",
          "weights_shape", "experts_not_divisible", "cached_with_layout", "combine_rows",
          "bias_shape", "alignment", "comm_stream_flags", "nvl_too_small", "ll_tokens_over_max",
          "ll_rdma_too_small", "ll_not_enabled", "ll_ue8m0_needs_round", "ll_combine_handle",
          "ll_mask_rank", "backend_name", "kernels_on_cpu", "ranks_per_node", "destroyed"]
