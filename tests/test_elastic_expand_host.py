"""CPU tests of the expanding NVLink dispatch (``ElasticBuffer.dispatch(do_expand=True)`` on the
kernels backend): the row arithmetic the kernels share with the host (the sender's index of an
entry within its expert, the receiver's per-source expert bases) against the expanded layout's
definition, and the host path on the fake GPU: the launch writes the expanded outputs the
caller gets back (no gather copy after it) and passes the expansion's arguments."""
from __future__ import annotations

import ctypes

import pytest
import torch

import fake_gpu
from ep_comm.backends.kernels.intranode import expand_positions, regions_for


def _topk(t: int, experts: int, k: int, seed: int) -> torch.Tensor:
    """[t, k] int64 distinct expert ids per token, about 15 % of the entries -1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(t, experts, generator=g).topk(k, dim=1).indices
    idx[torch.rand(t, k, generator=g) < 0.15] = -1
    return idx


def test_expand_positions_count_the_earlier_tokens_of_the_same_expert():
    idx = _topk(50, 12, 4, seed=1)
    pos = expand_positions(idx)
    assert pos.dtype == torch.int32 and pos.shape == idx.shape
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k].item()
            if e >= 0:
                assert pos[t, k].item() == (idx[:t] == e).sum().item()


@pytest.mark.parametrize("align", [1, 4])
def test_base_plus_position_is_the_expanded_row_of_every_entry(align):
    """The receiver's row of (source s, token t, entry k) = expand_base[s, e] (nvl_notify) +
    expand_positions on s, equals the expanded layout: expert blocks aligned in expert order,
    within an expert by source rank, then source token (ElasticBuffer's handle)."""
    r, local, k = 3, 4, 3
    idxs = [_topk(n, r * local, k, seed=10 + s) for s, n in enumerate((17, 0, 9))]
    for me in range(r):
        lo = me * local
        # the rows an expert gets, in receive order: (source, token)
        hits = [[(s, t) for s in range(r) for t in range(idxs[s].shape[0])
                 if (idxs[s][t] == lo + e).any()] for e in range(local)]
        counts = [[int((idxs[s] == lo + e).sum()) for e in range(local)] for s in range(r)]
        # nvl_notify's expand_base: aligned exclusive prefix over experts, then over sources
        totals = [sum(counts[s][e] for s in range(r)) for e in range(local)]
        starts = [sum((c + align - 1) // align * align for c in totals[:e]) for e in range(local)]
        base = [[starts[e] + sum(counts[q][e] for q in range(s)) for e in range(local)]
                for s in range(r)]
        for s in range(r):
            pos = expand_positions(idxs[s])
            for t in range(idxs[s].shape[0]):
                for j in range(k):
                    e = idxs[s][t, j].item() - lo
                    if 0 <= e < local:
                        row = base[s][e] + pos[t, j].item()
                        assert row == starts[e] + hits[e].index((s, t))


class _PaddingKernels(fake_gpu.FakeModule):
    """Fake launches that write what the dispatch kernel writes into the rows of a dispatch
    without received tokens: ids -1 (the handle is then built from defined memory)."""

    def _launch(self, prepared, stream):
        super()._launch(prepared, stream)
        if prepared.name == "nvl_dispatch":
            v = prepared.args.values()
            ctypes.memset(v["recv_topk_idx"], 0xFF, v["num_rows"] * v["K"] * 8)
            ctypes.memset(v["recv_src_idx"], 0xFF, v["num_rows"] * 4)
            ctypes.memset(v["recv_src_rank"], 0xFF, v["num_rows"] * 4)


def _elastic_over(buf, nmax):
    """An ElasticBuffer of one rank over the fake ``Buffer`` (no process group)."""
    import ep_comm
    eb = ep_comm.ElasticBuffer.__new__(ep_comm.ElasticBuffer)
    eb.runtime, eb.num_ranks, eb.rank_idx = buf, 1, 0
    eb.config = ep_comm.Buffer.get_dispatch_config(1)
    eb.device, eb.num_max_tokens_per_rank = torch.device("cpu"), nmax
    eb.prefer_overlap_with_compute, eb.allow_multiple_reduction = True, True
    return eb


@pytest.mark.parametrize("fp8", [False, True])
def test_expanding_dispatch_launches_into_the_outputs_it_returns(monkeypatch, fp8):
    import ep_comm
    hidden, nmax, experts, k, align = 256, 12, 8, 3, 4
    monkeypatch.setattr(fake_gpu, "FakeModule", _PaddingKernels)
    cfg = ep_comm.Buffer.get_dispatch_config(1)
    nvl = cfg.get_nvl_buffer_size_hint(hidden * 2, 1)
    with fake_gpu.fake_buffer(monkeypatch, num_nvl_bytes=nvl) as (buf, module):
        eb = _elastic_over(buf, nmax)
        assert buf.expands_in_dispatch
        idx = _topk(10, experts, k, seed=3)
        w = torch.rand(10, k)
        x = torch.zeros(10, hidden, dtype=torch.bfloat16)
        if fp8:
            x = (x.to(torch.float8_e4m3fn), torch.ones(10, hidden // 128))
        recv, recv_idx, recv_w, h, _ = eb.dispatch(
            x, topk_idx=idx, topk_weights=w, num_experts=experts, expert_alignment=align,
            do_cpu_sync=False, do_expand=True, do_zero_padding=True)
        assert [n for n, _, _ in module.launches] == [
            "nvl_get_dispatch_layout", "nvl_notify", "nvl_dispatch"]
        notify, d = module.launches[1][2], module.launches[2][2]
        recv_x, recv_sf = recv if fp8 else (recv, None)
        assert recv_idx is None
        # the kernel writes the rows the caller gets: nothing is gathered after it
        assert d["expand"] == 1 and d["exp_x"] == recv_x.data_ptr()
        assert d["exp_w"] == recv_w.data_ptr() and recv_w.shape == (recv_x.shape[0],)
        assert d["exp_scales"] == (recv_sf.data_ptr() if fp8 else 0)
        assert d["recv_x"] == d["recv_scales"] == d["recv_topk_weights"] == 0
        assert d["num_exp_rows"] == recv_x.shape[0] == h.num_expanded_tokens
        assert d["expert_alignment"] == notify["expert_alignment"] == align
        assert d["expand_base"] == notify["expand_base"] != 0 and d["expand_pos"] != 0
        # notify's outputs share one allocation: their int32 spans must not overlap
        spans = sorted((notify[n], notify[n] + 4 * size) for n, size in (
            ("rank_prefix_matrix", 1), ("recv_per_expert", experts), ("num_tokens_of_rank", 1),
            ("num_recv_dev", 1), ("expand_base", 2 * experts)))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
        assert d["zero_exp_padding"] == 1
        assert d["off_pos"] == regions_for(cfg, hidden, 1).slot_offsets()["topk_pos"]

        # A cached dispatch re-sends along the handle's routes: the copy path, no expansion.
        eb.dispatch(x, handle=h, do_expand=True)
        assert module.launches[-1][0] == "nvl_dispatch" and module.launches[-1][2]["expand"] == 0


def test_plain_dispatch_does_not_expand(monkeypatch):
    import ep_comm
    hidden = 256
    monkeypatch.setattr(fake_gpu, "FakeModule", _PaddingKernels)
    nvl = ep_comm.Buffer.get_dispatch_config(1).get_nvl_buffer_size_hint(hidden * 2, 1)
    with fake_gpu.fake_buffer(monkeypatch, num_nvl_bytes=nvl) as (buf, module):
        eb = _elastic_over(buf, 12)
        recv_x, recv_idx, _, _, _ = eb.dispatch(
            torch.zeros(10, hidden, dtype=torch.bfloat16), topk_idx=_topk(10, 8, 3, seed=4),
            num_experts=8, do_cpu_sync=False)
        d = module.launches[-1][2]
        assert d["expand"] == 0 and d["exp_x"] == 0
        assert d["recv_x"] == recv_x.data_ptr() and module.launches[1][2]["expand_base"] == 0
