"""MoE layer benchmark: expert parallel (EP) against tensor parallel (TP) with the same GEMMs.

One MoE layer (``ep_comm.moe``), DeepSeek-V3 shapes by default (hidden 7168, expert intermediate
2048, 256 experts spread over the ranks, top-8, FP8 weights with 128 x 128 block scales and FP8
activations; ``--bf16`` for bf16), uniform random routing, in two cases:

* prefill: 4096 tokens per rank, EP in normal mode (``moe_ep_normal``: layout, dispatch,
  permute, grouped GEMMs, SiLU * up, unpermute, combine);
* decode: 128 tokens per rank, EP in low-latency mode (``moe_ep_low_latency``: low-latency
  dispatch, masked GEMMs on ``recv_x`` as is, combine);

and TP (``moe_tp``: all-gather, the same expert pipeline over all experts' ``I / R`` slices,
reduce-scatter) on the same tokens in both. ``--backend kernels|reference`` picks the
dispatch/combine implementation of ``ep_comm.Buffer``; the GEMMs are the Triton kernels on GPUs
and plain torch on CPU (``--dry-run``) in both.

What is timed (median over ``--iters`` runs, every phase started with all ranks synchronised,
``bench/common.py``'s ``Timer``):
  ep_<case>_ms / tp_<case>_ms           the whole layer.
  ep_prefill_nosync_ms                  the EP normal layer with ``num_worst_tokens`` = R * T:
                                        dispatch does not wait for the counts, nothing in the
                                        layer syncs with the host (tp_over_ep_prefill_nosync,
                                        model_error_ep_prefill_nosync beside it).
  ep_<case>_dispatch_ms                 [FP8 cast +] layout + dispatch (decode: LL dispatch).
  ep_<case>_experts_ms                  permute + grouped GEMMs + SiLU * up + unpermute
                                        (decode: the masked GEMMs and SiLU * up).
  ep_<case>_gemms_ms                    the two grouped GEMMs alone (inside "experts");
                                        ep_<case>_gemm_tflops = 6 * valid rows * H * I / time.
  ep_<case>_combine_ms                  combine (decode: LL combine).
  tp_<case>_gather_ms / _experts_ms / _reduce_scatter_ms / _gemms_ms   the same for TP.
  <variant>_<case>_host_ms              wall time of one call of the whole layer with the GPU
                                        idle (Python, torch and Triton launch overhead; EP
                                        prefill also waits in dispatch for the receive counts).
                                        The _ms figures are GPU time: the timer queues a phase's
                                        launches behind a spin kernel longer than this
                                        (bench/common.py ``Timer``), as under CUDA graphs; only
                                        what EP prefill launches after dispatch's wait stays in.
  ep_prefill_expand_kernel_us           ``do_expand``'s layout on this run's Buffer (kernels backend
  ep_prefill_expand_copy_us             within one node only), expert_alignment 128, prefill
  ep_prefill_expand_saved_us            tokens: the dispatch kernel writing each token straight
                                        into its expanded rows (``expand=ExpandRequest``, what
                                        ``ElasticBuffer.dispatch(do_expand=True)`` runs) against a
                                        plain dispatch + index_select of the received rows,
                                        scales and weights into the same rows (ElasticBuffer's
                                        path before, and still across nodes); saved = copy -
                                        kernel. Layout outside both. ``expand`` in the JSON
                                        says which paths ran and whether their rows are equal.
  <variant>_<case>_layer_over_parts     layer / (dispatch + experts + combine): glue overhead
                                        (target EP <= 1.1).
  tp_over_ep_<case>                     TP time / EP time (> 1: EP faster; target >= 1).
  model_<variant>_<case>_ms             ``ep_comm.moe.cost_model`` prediction, fed with this run's
                                        GEMM throughput (the "gemms" phase of the same
                                        variant and case), the NCCL all_to_all / all_gather
                                        bandwidth of prefill-sized messages and a one-row
                                        all_gather's time measured here, and
                                        the HBM bandwidth of bench/results/gemm-kernels-1r-*.json
                                        (else the model's default); model_error_<...> =
                                        measured / predicted - 1 (target within +-0.15).
Before timing, EP and TP outputs are compared (``calc_diff``; they compute the same function).
A backend that cannot run here (``BackendUnavailableError``, e.g. kernels without NVLink) is
written as ``unavailable`` with the reason; a mode of it that is missing (low-latency kernels
not yet built) leaves its EP decode figures out and says why under ``unavailable_parts``.

    torchrun --nproc-per-node=2 bench/moe.py --backend kernels,reference    # 2 GPUs
    python bench/moe.py --backend kernels,reference                          # 1 GPU
    torchrun --nproc-per-node=2 bench/moe.py --dry-run --out /tmp/moe_dry   # CPU, gloo, tiny

Writes ``bench/results/moe-<backend>-<ranks>r-<device>.json``.
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

if "--dry-run" in sys.argv and "--cpu" not in sys.argv:
    sys.argv.append("--cpu")

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ep_comm  # noqa: E402
from ep_comm.moe import cost_model  # noqa: E402
from ep_comm.moe import gemm
from ep_comm import moe
from ep_comm.backends.base import ExpandRequest  # noqa: E402
from ep_comm.core import fp8 as fp8_format  # noqa: E402
from ep_comm.errors import BackendUnavailableError  # noqa: E402

MOE_BACKENDS = ("kernels", "reference")
GPU_DEFAULTS = dict(prefill_tokens=4096, decode_tokens=128, hidden=7168, intermediate=2048,
                    experts=256, topk=8, warmup=3, iters=10)
DRY_DEFAULTS = dict(prefill_tokens=32, decode_tokens=8, hidden=256, intermediate=256,
                    experts=8, topk=4, warmup=1, iters=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--prefill-tokens", type=int, default=None, help="tokens per rank, prefill")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per rank, decode")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=None, help="experts of the layer (all ranks)")
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 weights and activations (default FP8)")
    p.add_argument("--cases", default="prefill,decode")
    p.add_argument("--dry-run", action="store_true",
                   help="check the script on CPU gloo ranks: tiny shapes, reference backend, "
                        "torch GEMMs (not a measurement)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs
def expert_weights_bf16(e: int, hidden: int, inter: int, seed: int, device):
    """Expert e's full bf16 weights (w13 [2I, H], w2 [H, I]), the same on every rank: seeded
    by (seed, e) alone, so that EP and TP shards are slices of one set of weights."""
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + e)
    w13 = (torch.randn(2 * inter, hidden, generator=g, device=device) / hidden ** 0.5)
    w2 = (torch.randn(hidden, inter, generator=g, device=device) / inter ** 0.5)
    return w13.to(torch.bfloat16), w2.to(torch.bfloat16)


def make_shards(ctx, a, use_fp8: bool):
    """(EP weights, TP weights) of this rank (``moe.ExpertWeights``), filled expert by expert
    into preallocated tensors (quantised one expert at a time when FP8), so that neither the
    full layer's bf16 weights nor a stacked copy ever exist: peak memory is the two shards plus
    one expert's bf16 weights (DeepSeek-V3 FP8 on one GPU: about 23 GB)."""
    r, n = ctx.rank, ctx.num_ranks
    per_e, per_i = a.experts // n, a.intermediate // n
    h, i = a.hidden, a.intermediate
    dt = torch.float8_e4m3fn if use_fp8 else torch.bfloat16

    def alloc(e, rows, cols):
        w = torch.empty(e, rows, cols, dtype=dt, device=ctx.device)
        s = (torch.empty(e, -(-rows // 128), -(-cols // 128), dtype=torch.float32,
                         device=ctx.device) if use_fp8 else None)
        return w, s

    ep13, ep2 = alloc(per_e, 2 * i, h), alloc(per_e, h, i)
    tp13, tp2 = alloc(a.experts, 2 * per_i, h), alloc(a.experts, h, per_i)

    def put(dst, j, w):
        if use_fp8:
            q, s = moe.quantize_weight_fp8(w[None])
            dst[0][j], dst[1][j] = q[0], s[0]
        else:
            dst[0][j] = w

    sl = slice(r * per_i, (r + 1) * per_i)
    for e in range(a.experts):
        w13, w2 = expert_weights_bf16(e, h, i, a.seed, ctx.device)
        if r * per_e <= e < (r + 1) * per_e:
            put(ep13, e - r * per_e, w13)
            put(ep2, e - r * per_e, w2)
        put(tp13, e, torch.cat([w13[:i][sl], w13[i:][sl]]))
        put(tp2, e, w2[:, sl].contiguous())

    def weights(w13, w2, first):
        return moe.ExpertWeights(w13 if use_fp8 else w13[0], w2 if use_fp8 else w2[0], first)

    return weights(ep13, ep2, r * per_e), weights(tp13, tp2, 0)


def make_buffer(ctx, a, backend: str, low_latency: bool, max_tokens: int):
    cfg = ep_comm.Buffer.get_dispatch_config(ctx.num_ranks)
    nvl = cfg.get_nvl_buffer_size_hint(a.hidden * 2, ctx.num_ranks)
    rdma = cfg.get_rdma_buffer_size_hint(a.hidden * 2, ctx.num_ranks)
    if low_latency:
        rdma = max(rdma, ep_comm.Buffer.get_low_latency_rdma_size_hint(
            max_tokens, a.hidden, ctx.num_ranks, a.experts))
        return ep_comm.Buffer(ctx.group, num_nvl_bytes=0, num_rdma_bytes=rdma,
                              low_latency_mode=True,
                              num_qps_per_rank=max(1, a.experts // ctx.num_ranks),
                              backend=backend, explicitly_destroy=True)
    return ep_comm.Buffer(ctx.group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, backend=backend,
                          explicitly_destroy=True)


def try_buffer(ctx, a, backend: str, low_latency: bool, max_tokens: int):
    """(Buffer or None, reason) with every rank agreeing: a backend missing on one rank is
    missing on all, so none waits in a collective the others skip."""
    buf, reason = None, None
    try:
        buf = make_buffer(ctx, a, backend, low_latency, max_tokens)
    except (BackendUnavailableError, NotImplementedError) as e:
        reason = f"{type(e).__name__}: {e}"
    reasons = [x for x in common.gather(ctx, reason) if x]
    if reasons and buf is not None:
        buf.destroy()
        buf = None
    return buf, (reasons[0] if reasons else None)


# ----------------------------------------------------------------------------- phases
def ep_normal_phases(a, x, idx, w, weights: moe.ExpertWeights, buf, impl: str, use_fp8: bool,
                     num_ranks: int):
    """Timed phases of the EP layer in normal mode: the whole layer (exact sizes: dispatch
    waits for the counts; and with ``num_worst_tokens``: no wait) and its parts."""
    triton_ = impl == "triton"
    local = weights.num_experts
    st = {}

    def layer():
        return moe.moe_ep_normal(x, idx, w, weights, buf, a.experts, impl=impl)

    def layer_nosync():  # every rank has T tokens: at most R * T arrive
        return moe.moe_ep_normal(x, idx, w, weights, buf, a.experts, impl=impl,
                                 num_worst_tokens=num_ranks * x.shape[0])

    def dispatch():
        x_in = x
        if use_fp8:
            x_in = gemm.quantize_fp8(x) if triton_ else fp8_format.per_token_cast_to_fp8(x)
        n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, a.experts)
        st["recv_x"], st["recv_idx"], st["recv_w"], st["counts"], st["handle"], _ = buf.dispatch(
            x_in, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=idx,
            topk_weights=w)

    def experts():
        lay = moe.group_by_expert(st["recv_idx"], local, 1, num_rows=sum(st["counts"]),
                                 impl=impl)
        xp = moe.permute(st["recv_x"], lay, impl)
        y = moe.expert_ffn_contiguous(xp, lay, weights, impl)
        st["rows"] = moe.unpermute(y, lay, st["recv_w"], impl)
        st["lay"], st["xp"] = lay, xp

    def combine():
        buf.combine(st["rows"], st["handle"])

    return st, [("layer", layer), ("dispatch", dispatch), ("experts", experts),
                ("combine", combine), ("layer_nosync", layer_nosync)]


#: expert_alignment of the do_expand measurement: the contiguous grouped GEMM's block of rows.
EXPAND_ALIGNMENT = 128


def expand_phases(a, x, idx, w, buf, use_fp8: bool, local: int):
    """The two ways of laying a dispatch's rows out by expert (``ep_prefill_expand_*``): the
    kernel writing expanded rows, and a plain dispatch + the gather ElasticBuffer did (and does
    across nodes). Returns (phases, a function saying whether both gave the same rows)."""
    x_in = fp8_format.per_token_cast_to_fp8(x) if use_fp8 else x
    n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, a.experts)
    kw = dict(num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
              is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=idx,
              topk_weights=w, expert_alignment=EXPAND_ALIGNMENT)
    _, recv_idx, _, counts, _, _ = buf.dispatch(x_in, **kw)
    rows, k = sum(counts), idx.shape[1]
    # The copy's source of each expanded row (the layout ElasticBuffer's handle has): the
    # inverse of group_by_expert's dest; padding rows copy (row 0, slot 0), as ElasticBuffer's.
    dest = moe.group_by_expert(recv_idx, local, EXPAND_ALIGNMENT, num_rows=rows).dest
    dest = dest.long().flatten()
    here = dest >= 0
    slot = torch.zeros(rows, dtype=torch.int64, device=dest.device)
    slot[dest[here]] = torch.arange(dest.numel(), device=dest.device)[here]
    filled = torch.zeros(rows, dtype=torch.bool, device=dest.device)
    filled[dest[here]] = True
    src = slot // k
    st = {}

    def expand_kernel():
        st["kernel"] = buf.dispatch(x_in, **kw, expand=ExpandRequest(0, False))

    def expand_copy():
        recv, _, recv_w, _, _, _ = buf.dispatch(x_in, **kw)
        data, scales = recv if use_fp8 else (recv, None)
        st["copy"] = (data.index_select(0, src),
                      None if scales is None else scales.index_select(0, src),
                      recv_w.flatten().index_select(0, slot))

    def same() -> bool:
        recv, _, recv_w, _, _, _ = st["kernel"]
        data, scales = recv if use_fp8 else (recv, None)
        return all(g is None or torch.equal(g[filled].view(torch.uint8),
                                            c[filled].view(torch.uint8))
                   for g, c in zip((data, scales, recv_w), st["copy"]))

    return [("expand_kernel", expand_kernel), ("expand_copy", expand_copy)], same


def contiguous_gemm_phase(st, weights: moe.ExpertWeights, impl: str):
    """The two grouped GEMMs of the experts alone, on the permuted rows of the last run, and
    the number of valid rows they compute."""
    lay, xp = st["lay"], st["xp"]
    x_in = xp
    if weights.fp8 and not isinstance(xp, tuple):
        x_in = fp8_format.per_token_cast_to_fp8(xp)
    mm = gemm.grouped_gemm_contiguous if impl == "triton" else gemm.grouped_gemm_contiguous_torch
    gu = mm(x_in, weights.w13, lay.group_end, group_rows=lay.group_rows)
    h = gemm.silu_mul_quant_fp8_torch(gu) if weights.fp8 else gemm.silu_mul_torch(gu)
    if weights.fp8 and impl == "triton":
        h = (h[0], fp8_format.column_major_last2(h[1]))

    def gemms():
        mm(x_in, weights.w13, lay.group_end, group_rows=lay.group_rows)
        mm(h, weights.w2, lay.group_end, group_rows=lay.group_rows)
    return gemms, int(lay.group_rows.sum())


def ep_ll_phases(a, x, idx, w, weights: moe.ExpertWeights, buf, impl: str, use_fp8: bool,
                 max_tokens: int, num_ranks: int):
    expected_m = moe.default_expected_m(max_tokens, num_ranks, idx.shape[1], a.experts)
    st = {}

    def layer():
        return moe.moe_ep_low_latency(x, idx, w, weights, buf, a.experts, max_tokens,
                                      use_fp8=use_fp8, expected_m=expected_m, impl=impl)

    def dispatch():
        st["recv_x"], st["count"], st["handle"], _, _ = buf.low_latency_dispatch(
            x, idx, max_tokens, a.experts, use_fp8=use_fp8)

    def experts():
        out = buf.get_next_low_latency_combine_buffer(st["handle"])
        st["y"] = moe.expert_ffn_masked(st["recv_x"], st["count"], weights,
                                        expected_m=expected_m, out=out, impl=impl)

    def combine():
        buf.low_latency_combine(st["y"], idx, w, st["handle"], zero_copy=True)

    return st, expected_m, [("layer", layer), ("dispatch", dispatch), ("experts", experts),
                            ("combine", combine)]


def masked_gemm_phase(st, weights: moe.ExpertWeights, impl: str, expected_m: int):
    recv_x, count = st["recv_x"], st["count"]
    mm = gemm.grouped_gemm_masked if impl == "triton" else gemm.grouped_gemm_masked_torch
    kw = {"expected_m": expected_m}
    gu = mm(recv_x, weights.w13, count, **kw)
    if weights.fp8:
        q, s = gemm.silu_mul_quant_fp8_torch(gu)
        h = (q, fp8_format.column_major_last2(s))
    else:
        h = gemm.silu_mul_torch(gu)

    def gemms():
        mm(recv_x, weights.w13, count, **kw)
        mm(h, weights.w2, count, **kw)
    return gemms, int(count.clamp(max=gu.shape[1]).sum())


def tp_phases(ctx, a, x, idx, w, weights: moe.ExpertWeights, impl: str, use_fp8: bool):
    r, t = ctx.num_ranks, x.shape[0]
    triton_ = impl == "triton"
    st = {}

    def layer():
        return moe.moe_tp(x, idx, w, weights, ctx.group, impl=impl)

    def gather_one(v):
        raw = v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v
        out = torch.empty((r * t, *raw.shape[1:]), dtype=raw.dtype, device=raw.device)
        dist.all_gather_into_tensor(out, raw.contiguous(), group=ctx.group)
        return out.view(torch.float8_e4m3fn) if v.dtype == torch.float8_e4m3fn else out

    def gather():
        if use_fp8:
            q, s = gemm.quantize_fp8(x) if triton_ else fp8_format.per_token_cast_to_fp8(x)
            st["x_all"] = (gather_one(q), gather_one(s))
        else:
            st["x_all"] = gather_one(x)
        st["idx_all"], st["w_all"] = gather_one(idx), gather_one(w)

    def experts():
        lay = moe.group_by_expert(st["idx_all"], weights.num_experts, 1, impl=impl)
        xp = moe.permute(st["x_all"], lay, impl)
        y = moe.expert_ffn_contiguous(xp, lay, weights, impl)
        st["partial"] = moe.unpermute(y, lay, st["w_all"], impl)
        st["lay"], st["xp"] = lay, xp

    def reduce_scatter():
        p = st["partial"]
        out = torch.empty(t, p.shape[1], dtype=p.dtype, device=p.device)
        dist.reduce_scatter_tensor(out, p, group=ctx.group)

    return st, [("layer", layer), ("gather", gather), ("experts", experts),
                ("reduce_scatter", reduce_scatter)]


# ----------------------------------------------------------------------------- links
def link_bandwidths(ctx, timer, a, tokens: int, row_bytes: int) -> dict:
    """GB/s of off-rank bytes received per rank by NCCL ``all_to_all_single`` (equal splits,
    as many rows as EP dispatch sends to each peer) and ``all_gather_into_tensor`` (TP's
    gather), the link figures the cost model takes. {} on one rank (no link)."""
    n = ctx.num_ranks
    if n == 1:
        return {}
    layer = cost_model.Layer(a.hidden, a.intermediate, a.experts, a.topk)
    per_peer = max(1, int(tokens * cost_model.rank_hit_probability(layer, n)))
    send = torch.zeros(n * per_peer * row_bytes, dtype=torch.uint8, device=ctx.device)
    recv = torch.empty_like(send)
    g_in = torch.zeros(tokens * row_bytes, dtype=torch.uint8, device=ctx.device)
    g_out = torch.empty(n * tokens * row_bytes, dtype=torch.uint8, device=ctx.device)
    s_in = torch.zeros(row_bytes, dtype=torch.uint8, device=ctx.device)
    s_out = torch.empty(n * row_bytes, dtype=torch.uint8, device=ctx.device)
    ms = timer.run([
        ("a2a", lambda: dist.all_to_all_single(recv, send, group=ctx.group)),
        ("gather", lambda: dist.all_gather_into_tensor(g_out, g_in, group=ctx.group)),
        ("small", lambda: dist.all_gather_into_tensor(s_out, s_in, group=ctx.group))])
    off = (n - 1) * per_peer * row_bytes
    return {"a2a_gbps": common.gbps(off, ms["a2a"]),
            "all_gather_gbps": common.gbps((n - 1) * tokens * row_bytes, ms["gather"]),
            "small_gather_us": ms["small"] * 1e6}


def memory_from_gemm_results(slug: str, dtype: str, out_dir) -> tuple[float, float] | None:
    """(HBM read GB/s, weight-streaming fraction of it for ``dtype``) measured by bench/gemm.py
    on this kind of device: this run's --out first, else the committed results."""
    for d in dict.fromkeys([Path(out_dir), common.DEFAULT_OUT]):
        for path in sorted(glob.glob(str(d / f"gemm-kernels-1r-{slug}.json"))):
            hw = cost_model.hardware_from_results(gemm_json=path, dtype=dtype)
            return hw.hbm_gbps, hw.weight_stream_fraction
    return None


# ----------------------------------------------------------------------------- one backend
def measure(ctx, a, backend: str, cases: list[str], ep_w, tp_w, use_fp8: bool, impl: str):
    timer = common.Timer(ctx, a.warmup, a.iters, a.pad_us)
    mine: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    diffs: dict[str, float] = {}
    gemm_rows: dict[str, float] = {}
    expand: dict = {"alignment": EXPAND_ALIGNMENT}
    layer_cfg = cost_model.Layer(a.hidden, a.intermediate, a.experts, a.topk, fp8=use_fp8)
    row_bytes = int(layer_cfg.row_bytes())
    links = {}
    for case in cases:
        t = a.prefill_tokens if case == "prefill" else a.decode_tokens
        x = common.make_x(ctx, t, a.hidden, a.seed, salt=1 if case == "prefill" else 2)
        idx, w = common.make_routing(ctx, t, a.experts, a.topk, a.seed,
                                     salt=1 if case == "prefill" else 2)
        links[case] = link_bandwidths(ctx, timer, a, t, row_bytes)
        # TP: the same in every backend run (no Buffer), timed here for a same-run ratio.
        tp_st, tp_ph = tp_phases(ctx, a, x, idx, w, tp_w, impl, use_fp8)
        tp_out = tp_ph[0][1]()
        for name, fn in tp_ph[1:]:  # a first run of the parts fills the state
            fn()
        tp_ms = timer.run(tp_ph)
        mine[f"tp_{case}_host_ms"] = timer.host["layer"] * 1e3
        tp_gemms, tp_rows = contiguous_gemm_phase(tp_st, tp_w, impl)
        tp_ms["gemms"] = timer.run([("gemms", tp_gemms)])["gemms"]
        gemm_rows[f"tp_{case}"] = tp_rows
        for k, v in tp_ms.items():
            mine[f"tp_{case}_ms" if k == "layer" else f"tp_{case}_{k}_ms"] = v * 1e3
        low_latency = case == "decode"
        buf, reason = try_buffer(ctx, a, backend, low_latency, t)
        if buf is None:
            unavailable[f"ep_{case}"] = reason
            ctx.log(f"EP {case} on backend {backend}: unavailable: {reason}")
            continue
        try:
            if low_latency:
                st, expected_m, ph = ep_ll_phases(a, x, idx, w, ep_w, buf, impl, use_fp8, t,
                                                  ctx.num_ranks)
            else:
                st, ph = ep_normal_phases(a, x, idx, w, ep_w, buf, impl, use_fp8,
                                          ctx.num_ranks)
            ep_out = ph[0][1]()
            diffs[case] = common.calc_diff(ep_out, tp_out)
            problems = [] if diffs[case] < 5e-3 else [
                f"{case}: EP and TP outputs differ (calc_diff {diffs[case]:.3g})"]
            if not low_latency:
                diffs[f"{case}_nosync"] = common.calc_diff(dict(ph)["layer_nosync"](), tp_out)
                if diffs[f"{case}_nosync"] >= 5e-3:
                    problems.append(f"{case}: EP (num_worst_tokens) and TP outputs differ "
                                    f"(calc_diff {diffs[f'{case}_nosync']:.3g})")
            common.agree(ctx, problems)
            for name, fn in ph[1:]:
                fn()
            ep_ms = timer.run(ph)
            mine[f"ep_{case}_host_ms"] = timer.host["layer"] * 1e3
            if "layer_nosync" in timer.host:
                mine[f"ep_{case}_nosync_host_ms"] = timer.host["layer_nosync"] * 1e3
            if low_latency:
                gemms, rows = masked_gemm_phase(st, ep_w, impl, expected_m)
            else:
                gemms, rows = contiguous_gemm_phase(st, ep_w, impl)
            ep_ms["gemms"] = timer.run([("gemms", gemms)])["gemms"]
            gemm_rows[f"ep_{case}"] = rows
            if not low_latency and buf.expands_in_dispatch:
                eph, same = expand_phases(a, x, idx, w, buf, use_fp8, ep_w.num_experts)
                for name, fn in eph:
                    fn()
                e_s = timer.run(eph)
                for name, v in e_s.items():
                    mine[f"ep_{case}_{name}_us"] = v * 1e6
                mine[f"ep_{case}_expand_saved_us"] = (e_s["expand_copy"] -
                                                      e_s["expand_kernel"]) * 1e6
                expand["same_rows"] = common.gather(ctx, same())
                expand["paths"] = ("expand_kernel: the NVLink dispatch kernel writes expanded "
                                   "rows; expand_copy: dispatch + index_select")
            elif not low_latency:
                expand["paths"] = (f"not measured: backend {backend} here has no kernel that "
                                   "writes expanded rows (ElasticBuffer copies)")
        finally:
            buf.destroy()
        for k, v in ep_ms.items():
            k = {"layer": "", "layer_nosync": "_nosync"}.get(k, f"_{k}")
            mine[f"ep_{case}{k}_ms"] = v * 1e3
    if unavailable and len(unavailable) == len(cases):  # no EP figure at all: the row is
        # "unavailable" with the reason (TP alone is in the other backend's row)
        raise BackendUnavailableError(backend, "; ".join(f"{k}: {v}" for k, v in
                                                         unavailable.items()),
                                      "The reference backend row has EP and TP.")
    figures, per_rank = common.reduce_figures(ctx, mine)
    rows_mean, _ = common.reduce_figures(ctx, gemm_rows)
    links_mean = {c: common.reduce_figures(ctx, v)[0] if v else {} for c, v in links.items()}
    derive(ctx, a, figures, rows_mean, links_mean, layer_cfg)
    common.figures_table(ctx, {k: v for k, v in figures.items() if k in per_rank},
                         per_rank, f"moe/{backend}: per-rank figures (ms)")
    common.print_table(ctx, ["figure", "value"],
                       [[k, v] for k, v in figures.items() if k not in per_rank],
                       f"moe/{backend}: ratios and cost model")
    extra = {"per_rank": per_rank, "ep_tp_calc_diff": diffs, "links": links_mean,
             "gemm_valid_rows": rows_mean, "expand": expand}
    if unavailable:
        extra["unavailable_parts"] = unavailable
    return figures, extra


def derive(ctx, a, f: dict, rows: dict, links: dict, layer_cfg):
    """Ratios and the cost model's predictions, added to the figures ``f`` in place."""
    n = ctx.num_ranks
    for v in ("ep", "tp"):
        for case in ("prefill", "decode"):
            p = f"{v}_{case}"
            first = "dispatch" if v == "ep" else "gather"
            last = "combine" if v == "ep" else "reduce_scatter"
            parts = [f.get(f"{p}_{k}_ms") for k in (first, "experts", last)]
            if f.get(f"{p}_ms") is not None and all(x is not None for x in parts):
                f[f"{p}_parts_sum_ms"] = sum(parts)
                f[f"{p}_layer_over_parts"] = f[f"{p}_ms"] / sum(parts)
    for case in ("prefill", "decode"):
        for sfx in ("", "_nosync"):
            if f.get(f"ep_{case}{sfx}_ms") and f.get(f"tp_{case}_ms"):
                f[f"tp_over_ep_{case}{sfx}"] = f[f"tp_{case}_ms"] / f[f"ep_{case}{sfx}_ms"]
    # GEMM throughput of this run: 6 * rows * H * I flops per variant and case.
    tflops = {}
    for key, r in rows.items():
        inter = a.intermediate / n if key.startswith("tp") else a.intermediate
        ms = f.get(f"{key}_gemms_ms")
        if ms:
            tflops[key] = 6 * r * a.hidden * inter / (ms * 1e-3) / 1e12
            f[f"{key}_gemm_tflops"] = tflops[key]
    # Links: the large-message (prefill-sized) NCCL figures when measured, for both cases;
    # fixed per-collective cost: a one-row all_gather.
    lk = links.get("prefill") or links.get("decode") or {}
    base = cost_model.Hardware(ranks_per_node=n)
    dtype = "fp8" if layer_cfg.fp8 else "bf16"
    mem = memory_from_gemm_results(common.device_slug(ctx), dtype, a.out) if ctx.on_gpu else None
    if mem:
        base.hbm_gbps, base.weight_stream_fraction = mem
    base.nvlink_gbps = lk.get("a2a_gbps") or base.nvlink_gbps
    base.collective_gbps = lk.get("all_gather_gbps") or base.collective_gbps
    if lk.get("small_gather_us"):
        base.collective_fixed_us = lk["small_gather_us"]

    def hw_for(key: str, masked: bool):
        """The model's hardware with this variant's and case's measured GEMM throughput."""
        hw = cost_model.Hardware(**{k: v for k, v in base.__dict__.items()
                                    if k not in ("gemm_points", "masked_points")})
        if key in tflops:
            m = rows[key] / (a.experts if key.startswith("tp") else a.experts / n)
            pts = {dtype: [(max(m, 1e-3), tflops[key])]}
            if masked:
                hw.masked_points = pts
            else:
                hw.gemm_points = pts
        return hw

    for case in ("prefill", "decode"):
        t = a.prefill_tokens if case == "prefill" else a.decode_tokens
        mode = "normal" if case == "prefill" else "low_latency"
        pred = {"ep": cost_model.predict_ep(layer_cfg, hw_for(f"ep_{case}", case == "decode"),
                                            n, t, mode),
                "tp": cost_model.predict_tp(layer_cfg, hw_for(f"tp_{case}", False), n, t)}
        for v, pr in pred.items():
            if f.get(f"{v}_{case}_ms") is None and f.get(f"tp_{case}_ms") is None:
                continue
            f[f"model_{v}_{case}_ms"] = pr["layer"] * 1e3
            for sfx in ("", "_nosync") if v == "ep" else ("",):
                meas = f.get(f"{v}_{case}{sfx}_ms")
                if meas:
                    f[f"model_error_{v}_{case}{sfx}"] = meas / (pr["layer"] * 1e3) - 1
    f["model_hbm_gbps"] = base.hbm_gbps
    f["model_weight_stream_fraction"] = base.weight_stream_fraction
    f["model_nvlink_gbps"] = base.nvlink_gbps
    f["model_collective_gbps"] = base.collective_gbps
    f["model_collective_fixed_us"] = base.collective_fixed_us


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = parse_args(argv)
    ctx = common.init(a)
    common.fill_defaults(a, ctx, GPU_DEFAULTS, DRY_DEFAULTS)
    if a.dry_run and ctx.on_gpu:
        raise SystemExit("--dry-run runs on CPU gloo ranks")
    if a.backend:
        backends = [s.strip() for s in a.backend.split(",") if s.strip()]
    else:
        backends = ["kernels", "reference"] if ctx.on_gpu else ["reference"]
    for b in backends:
        if b not in MOE_BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {', '.join(MOE_BACKENDS)}")
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    if any(c not in ("prefill", "decode") for c in cases):
        raise SystemExit(f"--cases takes prefill and/or decode, got {a.cases!r}")
    use_fp8 = not a.bf16
    if a.experts % ctx.num_ranks or a.intermediate % ctx.num_ranks or (
            use_fp8 and (a.intermediate // ctx.num_ranks) % 128):
        raise SystemExit(f"{a.experts} experts and intermediate {a.intermediate} must split "
                         f"evenly over {ctx.num_ranks} ranks (FP8: into multiples of 128)")
    impl = "triton" if ctx.on_gpu else "torch"
    ctx.log(f"building weights: {a.experts} experts, hidden {a.hidden}, intermediate "
            f"{a.intermediate}, {'FP8' if use_fp8 else 'bf16'}")
    ep_w, tp_w = make_shards(ctx, a, use_fp8)
    config = {"prefill_tokens": a.prefill_tokens, "decode_tokens": a.decode_tokens,
              "hidden": a.hidden, "intermediate": a.intermediate, "num_experts": a.experts,
              "num_topk": a.topk, "fp8": use_fp8, "gemm_impl": impl, "cases": cases,
              "dry_run": a.dry_run, "warmup": a.warmup, "iters": a.iters, "pad_us": a.pad_us,
              "torch": torch.__version__}
    code = common.run_backends(ctx, "moe", backends, a.out, config,
                               lambda b: measure(ctx, a, b, cases, ep_w, tp_w, use_fp8, impl))
    return common.finish(ctx, code)


if __name__ == "__main__":
    sys.exit(main())
