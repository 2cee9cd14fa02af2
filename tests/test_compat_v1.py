"""DeepEP v1 compatibility on the CPU reference backend: tuple handles (DeepEP's element order,
dtypes and meanings), the v1 constructor arguments and extras, and the opt-in ``deep_ep`` alias.

The channel matrices and ``send_head`` are checked against plain loops over DeepEP's channel
split (ceil(T / C) tokens per channel), written here as the oracle.
"""
from __future__ import annotations

import sys

import pytest
import torch

from multiproc import run_ranks


def _layout_and_dispatch(ctx, t=37, hidden=64, experts=12, topk=3, seed=0):
    import ep_comm
    g = torch.Generator().manual_seed(seed + ctx.rank)
    scores = torch.rand(t, experts, generator=g)
    topk_idx = scores.topk(topk, dim=1).indices.to(ep_comm.topk_idx_t)
    x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
    buf = ep_comm.Buffer(ctx.group, num_nvl_bytes=1 << 26, backend="reference")
    n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(topk_idx, experts)
    cfg = ep_comm.Config(8, 8, 256)  # C = 4 channels
    out = buf.dispatch(x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                       is_token_in_rank=in_rank, num_tokens_per_expert=n_exp,
                       topk_idx=topk_idx, config=cfg)
    return buf, x, in_rank, out, cfg


def _channel_oracle(in_rank: torch.Tensor, c: int):
    t, r = in_rank.shape
    per = -(-t // c)
    chan_prefix = torch.zeros(r, c, dtype=torch.int32)
    head = torch.full((t, r), -1, dtype=torch.int32)
    for dst in range(r):
        total = 0
        for ch in range(c):
            lo, hi = min(per * ch, t), min(per * (ch + 1), t)
            seen = 0
            for tok in range(lo, hi):
                if in_rank[tok, dst]:
                    head[tok, dst] = seen
                    seen += 1
            total += seen
            chan_prefix[dst, ch] = total
    return chan_prefix, head


def task_tuple_handle(ctx):
    import torch.distributed as dist
    buf, x, in_rank, out, cfg = _layout_and_dispatch(ctx)
    recv_x, recv_idx, recv_w, counts, handle, event = out
    assert len(handle) == 6
    rpm, cpm, rcpm, src_idx, itr, send_head = handle  # unpacks like DeepEP's tuple
    assert rpm is handle.rank_prefix_matrix and handle[0] is rpm
    assert src_idx is handle.recv_src_idx and itr is in_rank
    assert [t.dtype for t in (rpm, cpm, rcpm, src_idx, send_head)] == [torch.int32] * 5
    c = cfg.num_channels
    want_cpm, want_head = _channel_oracle(in_rank, c)
    assert torch.equal(cpm, want_cpm) and torch.equal(send_head, want_head)
    # Receiver side: source s's channel c starts at s's channel_prefix_matrix[me][c - 1].
    mats = [torch.empty_like(cpm) for _ in range(ctx.world_size)]
    dist.all_gather(mats, cpm, group=ctx.group)
    want = torch.stack([torch.cat([m.new_zeros(1), m[ctx.rank, :-1]]) for m in mats])
    assert torch.equal(rcpm, want), (rcpm, want)
    # handle[0][i][rank] ends source i's block (what DeepEP's test_intranode reads).
    starts = [0] + rpm[:, ctx.rank].tolist()
    for i in range(ctx.world_size):
        assert (handle.recv_src_rank[starts[i]:starts[i + 1]] == i).all()
    return True


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dispatch_handle_indexes_and_unpacks_like_deepeps_tuple(world):
    assert all(run_ranks(task_tuple_handle, world))


def test_low_latency_handle_is_deepeps_five_tuple():
    from ep_comm.handles import LowLatencyHandle
    begin = torch.tensor([[0, 3], [0, 0]], dtype=torch.int32)
    count = torch.tensor([[3, 2], [0, 1]], dtype=torch.int32)
    h = LowLatencyHandle(src_info=torch.zeros(2, 8, dtype=torch.int32), range_begin=begin,
                         range_count=count, recv_count=count.sum(1), hidden=128,
                         num_max_dispatch_tokens_per_rank=4, num_experts=4, buffer_idx=0,
                         use_fp8=False)
    src_info, layout_range, m, hidden, experts = h
    assert len(h) == 5 and src_info is h.src_info and (m, hidden, experts) == (4, 128, 4)
    assert layout_range.dtype == torch.int64
    assert torch.equal(layout_range >> 32, begin.long())
    assert torch.equal(layout_range & 0xffffffff, count.long())
    assert h.num_experts == 4  # typed access stays


def task_v1_extras(ctx):
    import ep_comm
    from ep_comm.errors import BackendUnavailableError, InputError
    for kw in ({"allow_mnnvl": True}, {"use_fabric": True}):
        with pytest.raises(BackendUnavailableError, match=next(iter(kw))):
            ep_comm.Buffer(ctx.group, backend="reference", **kw)
    buf = ep_comm.Buffer(ctx.group, 0, 0, False, 24, True, False, False, True, True,
                         backend="reference")  # DeepEP's positional order
    assert buf.explicitly_destroy and buf.enable_shrink
    assert ep_comm.Buffer.is_sm90_compiled() is True
    assert isinstance(ep_comm.Buffer.capture(), ep_comm.EventOverlap)
    with pytest.raises(BackendUnavailableError):
        buf.get_local_buffer_tensor(torch.bfloat16)
    with pytest.raises(InputError, match="config"):
        buf.internode_dispatch(torch.zeros(2, 64, dtype=torch.bfloat16))
    ep_comm.Buffer.get_dispatch_config(1)  # DeepEP's table has no R = 1; ep_comm's formula does
    buf.destroy()
    return True


def test_v1_constructor_arguments_and_extras():
    assert all(run_ranks(task_v1_extras, 1))


def task_column_major_scales(ctx):
    import ep_comm
    from ep_comm.core import fp8
    buf, x, in_rank, out, cfg = _layout_and_dispatch(ctx, hidden=256)
    handle = out[4]
    q, s = fp8.per_token_cast_to_fp8(x)
    (rq, rs), *_ = buf.dispatch((q, s.T.contiguous().T), handle=handle, config=cfg)
    (wq, ws), *_ = buf.dispatch((q, s), handle=handle, config=cfg)
    assert torch.equal(rq.view(torch.uint8), wq.view(torch.uint8)) and torch.equal(rs, ws)
    return True


def test_dispatch_takes_column_major_fp8_scales_as_deepep_does():
    assert all(run_ranks(task_column_major_scales, 1))


def task_deepep_weights(ctx):
    """ep_comm.Buffer returns the weights as sent (API.md); the deep_ep alias's Buffer zeroes
    the weight of every slot whose expert is on another rank, as DeepEP v1 does, so that a
    combine of the weights gives each token's own weights back."""
    import ep_comm
    from ep_comm.compat.deep_ep import Buffer as DeepEPBuffer
    t, experts, topk = 29, 4 * ctx.world_size, 3
    g = torch.Generator().manual_seed(7 + ctx.rank)
    idx = torch.rand(t, experts, generator=g).topk(topk, dim=1).indices.to(ep_comm.topk_idx_t)
    idx[::5, 1] = -1
    w = torch.rand(t, topk, generator=g) + 0.5
    x = torch.randn(t, 64, generator=g).to(torch.bfloat16)
    outs = []
    for cls in (ep_comm.Buffer, DeepEPBuffer):
        buf = cls(ctx.group, num_nvl_bytes=1 << 26, backend="reference")
        n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, experts)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=idx, topk_weights=w)
        _, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        outs.append((recv_idx, recv_w, combined_w))
    (idx_a, w_a, _), (idx_b, w_b, cw_b) = outs
    assert torch.equal(idx_a, idx_b)
    assert torch.equal(w_b, torch.where(idx_b >= 0, w_a, torch.zeros_like(w_a)))
    assert bool((w_a[idx_a < 0] != 0).any())  # the two really differ where an expert is elsewhere
    # DeepEP's check: combined weights are the token's weights where its expert exists
    assert torch.allclose(cw_b, torch.where(idx >= 0, w, torch.zeros_like(w)))
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_deep_ep_alias_zeroes_weights_of_experts_elsewhere_like_deepep(world):
    assert all(run_ranks(task_deepep_weights, world))


def test_install_deep_ep_is_opt_in_and_resolves_to_ep_comm():
    import ep_comm
    from ep_comm import compat
    assert "deep_ep" not in sys.modules or getattr(sys.modules["deep_ep"], "EP_COMM_ALIAS", 0)
    compat.install_deep_ep()
    try:
        import deep_ep
        from deep_ep import Buffer, Config
        from deep_ep.utils import EventHandle, EventOverlap
        assert issubclass(Buffer, ep_comm.Buffer) and Config is ep_comm.Config
        assert deep_ep.ElasticBuffer is ep_comm.ElasticBuffer
        assert deep_ep.topk_idx_t is torch.int64
        EventOverlap(EventHandle()).current_stream_wait()  # Megatron-LM's pattern
        with EventOverlap(EventHandle()):
            pass
    finally:
        compat.uninstall_deep_ep()
    assert "deep_ep" not in sys.modules


def test_install_deep_ep_never_replaces_a_real_deep_ep():
    import types
    from ep_comm import compat
    sys.modules["deep_ep"] = types.ModuleType("deep_ep")
    try:
        with pytest.raises(RuntimeError, match="real deep_ep"):
            compat.install_deep_ep()
    finally:
        del sys.modules["deep_ep"]


def task_deepep_weights_async(ctx, rounds: int = 6):
    """GPU, kernels backend: the deep_ep alias's zeroed weights with ``async_finish=True`` (and
    without), read after the returned event, equal the synchronous result; a slow compute
    stream before each call gives the communication stream's kernel time to lag behind."""
    import ep_comm
    from ep_comm.compat.deep_ep import Buffer as DeepEPBuffer
    dev = ctx.device
    t, experts, topk, hidden = 4096, 8 * ctx.world_size, 8, 7168
    buf = DeepEPBuffer(ctx.group, num_nvl_bytes=1 << 30, explicitly_destroy=True)
    try:
        for i in range(rounds):
            g = torch.Generator().manual_seed(100 * i + ctx.rank)
            idx = torch.rand(t, experts, generator=g).topk(topk, dim=1).indices
            idx[:: 3 + i, 2] = -1
            idx = idx.to(ep_comm.topk_idx_t).to(dev)
            w = (torch.rand(t, topk, generator=g) + 0.5).to(dev)
            x = torch.randn(t, hidden, generator=g).to(torch.bfloat16).to(dev)
            n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, experts)
            args = dict(num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                        is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=idx,
                        topk_weights=w)
            _, s_idx, s_w, _, _, _ = buf.dispatch(x, **args)
            torch.cuda.synchronize()
            torch.cuda._sleep(2_000_000)  # the dispatch starts after this on the comm stream
            _, a_idx, a_w, _, _, event = buf.dispatch(x, **args, async_finish=True)
            event.current_stream_wait()
            got = a_w.clone()
            torch.cuda.synchronize()
            assert torch.equal(a_idx, s_idx)
            assert torch.equal(got, s_w), f"round {i}: async weights differ from the sync ones"
            assert bool((got[a_idx < 0] == 0).all())
    finally:
        buf.destroy()
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_gpu_deep_ep_alias_async_dispatch_zeroes_weights_after_the_kernel(gpu_ranks, world):
    assert all(gpu_ranks(world).run(task_deepep_weights_async))
