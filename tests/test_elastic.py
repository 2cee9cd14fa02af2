"""``ep_comm.ElasticBuffer`` (DeepEP v2's API) on the CPU reference backend, 1 to 3 gloo ranks:
the v2 dispatch outputs and handle fields, the ``do_expand`` layout, cached dispatch, combine,
deterministic results, no-CPU-sync sizes, and the features that raise ``NotImplementedError``.

The oracle is plain loops over the inputs of every rank (all-gathered), written here.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from multiproc import run_ranks

NMAX, HIDDEN, TOPK = 24, 64, 3


def _inputs(ctx, experts, seed):
    import ep_comm
    g = torch.Generator().manual_seed(seed * 100 + ctx.rank)
    t = NMAX - ctx.rank  # ranks hold different token counts
    idx = torch.rand(t, experts, generator=g).topk(TOPK, dim=1).indices
    idx[torch.rand(t, TOPK, generator=g) < 0.15] = -1
    w = torch.rand(t, TOPK, generator=g).masked_fill(idx < 0, 0.0)
    x = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)
    return x, idx.to(ep_comm.topk_idx_t), w


def _gather(ctx, t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (ranks hold ``NMAX - rank`` rows; gloo gathers equal sizes)."""
    pad = torch.zeros((NMAX, *t.shape[1:]), dtype=t.dtype)
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(ctx.world_size)]
    dist.all_gather(out, pad, group=ctx.group)
    return [o[: NMAX - s] for s, o in enumerate(out)]


def task_dispatch_expand_combine(ctx, experts, align, sync, seed):
    import ep_comm
    buf = ep_comm.ElasticBuffer(ctx.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN,
                                explicitly_destroy=True, backend="reference")
    r, me = ctx.world_size, ctx.rank
    local = experts // r
    x, idx, w = _inputs(ctx, experts, seed)
    xs, idxs, ws = _gather(ctx, x), _gather(ctx, idx), _gather(ctx, w)
    # Oracle: rows by source rank, then token; local ids or -1.
    rows = [(s, i) for s in range(r) for i in range(len(idxs[s]))
            if ((idxs[s][i] >= me * local) & (idxs[s][i] < (me + 1) * local)).any()]
    n = len(rows)
    args = dict(topk_idx=idx, topk_weights=w, num_experts=experts, expert_alignment=align,
                do_cpu_sync=sync)
    recv_x, recv_idx, recv_w, h, _ = buf.dispatch(x, **args)
    assert h.psum_num_recv_tokens_per_scaleup_rank[-1].item() == n
    assert recv_x.shape[0] == (n if sync else NMAX * r)
    for j, (s, i) in enumerate(rows):
        assert torch.equal(recv_x[j], xs[s][i])
        assert h.recv_src_metadata[j, 0].item() == s * NMAX + i
        g = idxs[s][i]
        here = (g >= me * local) & (g < (me + 1) * local)
        assert torch.equal(recv_idx[j], torch.where(here, g - me * local, -1))
        assert h.recv_src_metadata[j, 1].item() == s * TOPK + int(here.nonzero().max())
    counts = [sum(int((idxs[s] == me * local + e).sum()) for s in range(r)) for e in range(local)]
    assert h.num_unaligned_recv_tokens_per_expert.tolist() == counts
    aligned = [-(-c // align) * align for c in counts]
    assert h.num_recv_tokens_per_expert_list == (aligned if sync else [])
    assert h.psum_num_recv_tokens_per_expert.tolist() == torch.tensor(aligned).cumsum(0).tolist()

    # Expanded: expert e's selections at [start_e, start_e + count_e), in received-row order.
    ex, ex_idx, ex_w, eh, _ = buf.dispatch(x, **args, do_expand=True, do_zero_padding=True)
    assert ex_idx is None and ex_w.dim() == 1
    start = 0
    for e in range(local):
        sel = [j for j in range(n) if (recv_idx[j] == e).any()]
        assert eh.psum_num_recv_tokens_per_expert[e].item() == start + len(sel)
        for q, j in enumerate(sel):
            k = int((recv_idx[j] == e).nonzero())
            assert eh.recv_src_metadata[j, 2 + k].item() == start + q
            assert torch.equal(ex[start + q], recv_x[j]) and ex_w[start + q] == recv_w[j, k]
        pad = slice(start + len(sel), start + aligned[e])
        assert (ex[pad] == 0).all() and (ex_w[pad] == 0).all()
        start += aligned[e]

    # Cached: same rows, the same handle object back.
    cx, cidx, _, ch, _ = buf.dispatch(x * 2, handle=h)
    assert ch is h and torch.equal(cx[:n], recv_x[:n] * 2) and torch.equal(cidx, recv_idx)
    cex, _, cew, _, _ = buf.dispatch(x, handle=eh, topk_weights=w, do_expand=True,
                                     do_zero_padding=True)
    assert torch.equal(cex, ex) and torch.equal(cew, ex_w)

    # Combine (no weighting): each token gets the sum of its ranks' rows, weights come back.
    y, cw, _ = buf.combine(recv_x, h, topk_weights=recv_w)
    owners = [(torch.unique(idx[i][idx[i] >= 0] // local)).numel() for i in range(len(idx))]
    want = torch.stack([(x[i].float() * owners[i]).to(torch.bfloat16) for i in range(len(x))])
    assert torch.equal(y, want) and torch.equal(cw, w)
    # Expanded combine reduces a token's local selections first (float32, slot order).
    yy, ew, _ = buf.combine(ex, eh, topk_weights=ex_w)
    assert torch.equal(ew, w)
    ref = torch.zeros_like(x, dtype=torch.float32)
    for i in range(len(x)):
        for o in torch.unique(idx[i][idx[i] >= 0] // local).tolist():
            k_here = int(((idx[i] >= o * local) & (idx[i] < (o + 1) * local)).sum())
            ref[i] += (x[i].float() * k_here).to(torch.bfloat16).float()
    assert torch.equal(yy, ref.to(torch.bfloat16))

    # Deterministic: bit-identical run to run.
    again = buf.dispatch(x, **args, do_expand=True, do_zero_padding=True)
    assert torch.equal(again[0], ex) and torch.equal(again[3].recv_src_metadata,
                                                     eh.recv_src_metadata)
    stats = torch.zeros(local, dtype=torch.int32)
    buf.dispatch(x, **args, cumulative_local_expert_recv_stats=stats)
    buf.dispatch(x, **args, cumulative_local_expert_recv_stats=stats)
    assert stats.tolist() == [2 * c for c in counts]
    buf.destroy()
    return True


@pytest.mark.parametrize("world,experts,align,sync", [(1, 6, 1, True), (1, 6, 4, False),
                                                      (2, 8, 4, True), (3, 9, 2, False)])
def test_elastic_dispatch_expand_cached_combine(world, experts, align, sync):
    assert all(run_ranks(task_dispatch_expand_combine, world, experts, align, sync, 1))


def task_bias_and_queries(ctx):
    import ep_comm
    buf = ep_comm.ElasticBuffer(ctx.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN,
                                explicitly_destroy=True, backend="reference")
    assert buf.get_logical_domain_size() == (1, ctx.world_size)
    assert buf.get_theoretical_num_qps(buf.get_theoretical_num_sms(8, 2)) <= buf.num_allocated_qps
    x, idx, w = _inputs(ctx, 8, 3)
    _, _, _, h, _ = buf.dispatch(x, topk_idx=idx, num_experts=8)
    b0, b1 = (torch.randn_like(x, dtype=torch.float32).to(torch.bfloat16) for _ in range(2))
    y, _, _ = buf.combine(torch.ones(h.num_recv_tokens, HIDDEN, dtype=torch.bfloat16), h,
                          bias=(b0, b1))
    sent = (idx >= 0).any(1, keepdim=True).float()
    assert torch.equal(y, ((b0.float() + b1.float()) + sent).to(torch.bfloat16))
    for call in (lambda: buf.engram_write(None), lambda: buf.pp_send(None, 0),
                 lambda: buf.all_gather(None), lambda: buf.create_agrs_session()):
        with pytest.raises(NotImplementedError, match="Engram|PP|AGRS"):
            call()
    with pytest.raises(NotImplementedError, match="Engram"):
        ep_comm.ElasticBuffer(ctx.group, num_bytes=1 << 20, num_cpu_bytes=1,
                              backend="reference")
    buf.destroy()
    return True


def test_elastic_bias_is_added_first_and_out_of_scope_features_raise():
    assert all(run_ranks(task_bias_and_queries, 1))
