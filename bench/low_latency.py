"""Low-latency (decode) benchmark: FP8 dispatch and BF16 combine, timed as DeepEP's
test_low_latency times them.

Sizes (GPU defaults): 128 tokens per rank (= num_max_dispatch_tokens_per_rank), hidden 7168,
top-8 of 256 experts, uniform random routing; the Buffer is sized with
``Buffer.get_low_latency_rdma_size_hint``. On CPU the defaults are small (gloo, reference).

What is timed (all ranks synchronised before every timed phase, see bench/common.py):
  dispatch_us, combine_us   each alone (combine after an untimed dispatch, ranks synchronised
                            in between).
  dispatch_combine_us       dispatch then combine, back to back.
  dispatch_kernel_us, combine_kernel_us
                            kernel durations (torch.profiler) of one dispatch + combine
                            after a synchronisation, as DeepEP's bench_kineto (kernels backend).
  dispatch_send_us, dispatch_recv_us, combine_send_us, combine_recv_us
                            hook mode (``return_recv_hook=True``): the call that issues the
                            sends, and ``hook()`` that receives, with all ranks synchronised in
                            between (so the data has arrived, as DeepEP's test puts a large
                            GEMM there).
Bandwidth as DeepEP's test counts it: per selected (token, expert) pair, dispatch moves hidden
+ hidden / 128 x 4 + 16 bytes, combine hidden x 2 bytes.

``--backend nccl`` times ``all_to_all_single`` of the same bytes (one row per selection).
``--no-nvlink`` builds the Buffer with ``allow_nvlink_for_low_latency_mode=False``.
Before timing, each ep_comm backend is checked once: ``recv_count`` equals the counts from
every rank's routing, and combine of the dequantised received rows gives ``x * sum(weights)``
up to FP8 rounding.

    torchrun --nproc-per-node=2 bench/low_latency.py --backend kernels,reference,nccl \\
        --sweep-tokens 1,2,4,8,16,32,64,128,256
"""
from __future__ import annotations

import argparse
import sys

import common
import torch

import ep_comm
from ep_comm.core import fp8

GPU_DEFAULTS = dict(tokens=128, hidden=7168, topk=8, experts=256, warmup=10, iters=50)
CPU_DEFAULTS = dict(tokens=32, hidden=1024, topk=8, experts=64, warmup=1, iters=3)
#: calc_diff bound of combine(dequantised dispatch) vs x * sum(weights): FP8 e4m3 rounding
#: (3 mantissa bits) alone gives ~1e-4; a misrouted row gives > 1e-2.
CHECK_DIFF = 2e-3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--tokens", type=int, help="tokens per rank = num_max_dispatch_tokens_per_rank")
    p.add_argument("--hidden", type=int, help="hidden size (GPU 7168, CPU 1024)")
    p.add_argument("--topk", type=int, help="experts per token (8)")
    p.add_argument("--experts", type=int, help="experts in all (GPU 256, CPU 64)")
    p.add_argument("--no-nvlink", action="store_true",
                   help="allow_nvlink_for_low_latency_mode=False (NVSHMEM puts only)")
    p.add_argument("--sweep-tokens", default="", help="tokens per rank, e.g. 1,2,4,...,256")
    p.add_argument("--sweep-iters", type=int, default=None, help="timed runs per sweep point")
    return p.parse_args(argv)


def config_of(args) -> dict:
    return {"num_tokens": args.tokens, "hidden": args.hidden, "num_topk": args.topk,
            "num_experts": args.experts, "use_fp8": True, "nvlink": not args.no_nvlink,
            "warmup": args.warmup, "iters": args.iters, "pad_us": args.pad_us, "seed": args.seed}


def _bytes(topk_idx: torch.Tensor, hidden: int) -> tuple[int, int]:
    """(dispatch, combine) bytes of this rank as DeepEP's test counts them."""
    selections = int((topk_idx >= 0).sum())
    return selections * (common.fp8_row_bytes(hidden) + 16), selections * hidden * 2


def _figures(t: dict, topk_idx: torch.Tensor, hidden: int) -> dict:
    d_bytes, c_bytes = _bytes(topk_idx, hidden)
    f = {}
    for name in ("dispatch", "combine", "dispatch_combine", "dispatch_send", "dispatch_recv",
                 "combine_send", "combine_recv"):
        if name in t:
            f[f"{name}_us"] = t[name] * 1e6
    f["dispatch_gbps"] = common.gbps(d_bytes, t["dispatch"])
    f["combine_gbps"] = common.gbps(c_bytes, t["combine"])
    f["dispatch_combine_gbps"] = common.gbps(d_bytes + c_bytes, t["dispatch_combine"])
    return f


# ------------------------------------------------------------------------------ ep_comm backends
def _check(ctx, buffer, x, topk_idx, weights, m, num_experts) -> torch.Tensor:
    """One checked dispatch + combine; returns the combine input used for timing
    ([L, R * m, H] bf16: the dequantised received rows, zero past each expert's count)."""
    r, me = ctx.num_ranks, ctx.rank
    local = num_experts // r
    (q, scales), recv_count, handle, _, _ = buffer.low_latency_dispatch(
        x, topk_idx, m, num_experts, use_fp8=True)
    problems = []
    every = common.gather(ctx, topk_idx.cpu())
    per_expert = sum(torch.bincount(idx[idx >= 0].flatten(), minlength=num_experts)
                     for idx in every)
    want = per_expert[me * local:(me + 1) * local].tolist()
    got = recv_count.cpu().tolist()
    if got != want:
        problems.append(f"recv_count {got[:8]}... != {want[:8]}... from the routing")
    rows = torch.arange(r * m, device=x.device)
    valid = (rows.unsqueeze(0) < recv_count.to(rows.dtype).unsqueeze(1)).unsqueeze(-1)
    sim = torch.where(valid, fp8.dequantize(q, scales), 0.0).to(torch.bfloat16)
    if not problems:
        combined, _, _ = buffer.low_latency_combine(sim, topk_idx, weights, handle)
        ref = x.float() * (weights * (topk_idx >= 0)).sum(1, keepdim=True)
        diff = common.calc_diff(combined.float(), ref)
        if not torch.isfinite(combined.float()).all():
            problems.append("combine returned NaN or inf")
        elif diff > CHECK_DIFF:
            problems.append(f"combine(dispatch(x)) differs from x * sum(weights): "
                            f"calc_diff {diff:.2e} > {CHECK_DIFF}")
    common.agree(ctx, problems)
    return sim


def _measure_ep_point(ctx, buffer, args, tokens, timer, salt, full: bool) -> dict:
    """Figures of one size (``tokens`` = num_max_dispatch_tokens_per_rank) on an ep_comm
    backend; ``full``: also the check and the hook-mode phases."""
    m, e, h = tokens, args.experts, args.hidden
    topk_idx, weights = common.make_routing(ctx, tokens, e, args.topk, args.seed, salt)
    x = common.make_x(ctx, tokens, h, args.seed, salt)
    # num_max_dispatch_tokens_per_rank changes between sizes: reset the buffer's signals (all
    # ranks do this at the same point, between synchronised runs).
    buffer.clean_low_latency_buffer(m, h, e)
    if full:
        sim = _check(ctx, buffer, x, topk_idx, weights, m, e)
    else:
        # Any [L, R * m, H] bf16 will do: combine's cost does not depend on the values.
        sim = common.make_x(ctx, e * m, h, args.seed, salt + 1).view(
            e // ctx.num_ranks, ctx.num_ranks * m, h)
    state = {}

    def dispatch(hook=False):
        state["d"] = buffer.low_latency_dispatch(x, topk_idx, m, e, use_fp8=True,
                                                 return_recv_hook=hook)

    def combine(hook=False):
        state["c"] = buffer.low_latency_combine(sim, topk_idx, weights, state["d"][2],
                                                return_recv_hook=hook)

    t = timer.run([("dispatch", dispatch), ("combine", combine)])
    t.update(timer.run([("dispatch_combine", lambda: (dispatch(), combine()))]))
    if full:
        t.update(timer.run([
            ("dispatch_send", lambda: dispatch(hook=True)),
            ("dispatch_recv", lambda: state["d"][4]()),
            ("combine_send", lambda: combine(hook=True)),
            ("combine_recv", lambda: state["c"][2]()),
        ]))
    f = _figures(t, topk_idx, h)
    if full and ctx.on_gpu:
        f.update(_kernel_figures(timer, lambda: (dispatch(), combine()), timer.iters))
    state.clear()
    return f


def _kernel_figures(timer, step, iters: int) -> dict:
    """Kernel durations (torch.profiler / kineto, as DeepEP's bench_kineto) of the dispatch and
    combine kernels of ``step`` (one dispatch + combine), each run after ``timer.sync()``.
    Backends whose kernels have other names (reference) report NaN."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            timer.sync()
            step()
        torch.cuda.synchronize()
    found: dict[str, list[float]] = {"dispatch": [], "combine": []}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        for phase, prefix in (("dispatch", "ep_ll_dispatch"), ("combine", "ep_ll_combine")):
            if ev.name.startswith(prefix):
                found[phase].append(ev.time_range.end - ev.time_range.start)
    return {f"{phase}_kernel_us": (sorted(v)[len(v) // 2] if v else float("nan"))
            for phase, v in found.items()}


def measure_ep(ctx, args, backend: str):
    sweep = common.parse_ints(args.sweep_tokens)
    m_max = max([args.tokens] + sweep)
    rdma = ep_comm.Buffer.get_low_latency_rdma_size_hint(m_max, args.hidden, ctx.num_ranks,
                                                         args.experts)
    ctx.log(f"low-latency buffer: {rdma / 2**20:.1f} MiB per rank "
            f"(num_max_dispatch_tokens_per_rank up to {m_max})")
    buffer = ep_comm.Buffer(ctx.group, num_rdma_bytes=rdma, low_latency_mode=True,
                            num_qps_per_rank=max(1, args.experts // ctx.num_ranks),
                            allow_nvlink_for_low_latency_mode=not args.no_nvlink,
                            backend=backend, explicitly_destroy=True)
    try:
        timer = common.Timer(ctx, args.warmup, args.iters, args.pad_us)
        mine = _measure_ep_point(ctx, buffer, args, args.tokens, timer, 0, full=True)
        figures, per_rank = common.reduce_figures(ctx, mine)
        common.figures_table(ctx, figures, per_rank,
                             f"low_latency / {backend} / {ctx.num_ranks} rank(s), {args.tokens} "
                             f"tokens per rank (times in us, GB/s)")
        extra = {"per_rank": per_rank}
        if sweep:
            sweep_timer = common.Timer(ctx, min(args.warmup, 3), args.sweep_iters, args.pad_us)
            rows = []
            for i, tokens in enumerate(sweep):
                f, _ = common.reduce_figures(ctx, _measure_ep_point(
                    ctx, buffer, args, tokens, sweep_timer, 100 + i, full=False))
                rows.append({"num_tokens": tokens, **f})
            extra["sweep_tokens"] = rows
            _sweep_table(ctx, rows, f"low_latency / {backend}: token sweep")
        return figures, extra
    finally:
        buffer.destroy()


def _sweep_table(ctx, rows, title):
    cols = ["dispatch_us", "combine_us", "dispatch_combine_us", "dispatch_gbps", "combine_gbps"]
    common.print_table(ctx, ["num_tokens"] + cols,
                       [[r["num_tokens"]] + [r.get(c) for c in cols] for r in rows], title)


# ------------------------------------------------------------------------------ nccl alone
def _measure_nccl_point(ctx, args, tokens, timer, salt) -> dict:
    """all_to_all_single of the same bytes: one FP8 message per selection, BF16 rows back."""
    topk_idx, _ = common.make_routing(ctx, tokens, args.experts, args.topk, args.seed, salt)
    local = args.experts // ctx.num_ranks
    owners = torch.div(topk_idx[topk_idx >= 0], local, rounding_mode="floor")
    send_counts = torch.bincount(owners, minlength=ctx.num_ranks).tolist()
    recv_counts = common.exchange_counts(ctx, send_counts)
    n_send, n_recv, h, dev = sum(send_counts), sum(recv_counts), args.hidden, ctx.device
    msg = common.fp8_row_bytes(h) + 16
    d_send = torch.randint(0, 255, (n_send, msg), dtype=torch.uint8, device=dev)
    d_recv = torch.empty(n_recv, msg, dtype=torch.uint8, device=dev)
    c_send = torch.randint(0, 255, (n_recv, 2 * h), dtype=torch.uint8, device=dev)
    c_recv = torch.empty(n_send, 2 * h, dtype=torch.uint8, device=dev)

    def dispatch():
        common.a2a_rows(ctx, d_recv, d_send, recv_counts, send_counts)

    def combine():
        common.a2a_rows(ctx, c_recv, c_send, send_counts, recv_counts)

    t = timer.run([("dispatch", dispatch), ("combine", combine)])
    t.update(timer.run([("dispatch_combine", lambda: (dispatch(), combine()))]))
    return _figures(t, topk_idx, h)


def measure_nccl(ctx, args):
    figures, extra, rows = common.measure_nccl_with_sweep(ctx, args, "low_latency",
                                                          _measure_nccl_point, sweep_warmup=3)
    if rows:
        _sweep_table(ctx, rows, "low_latency / nccl: token sweep")
    return figures, extra


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx, backends = common.start_sweep_bench(args, GPU_DEFAULTS, CPU_DEFAULTS)

    def measure(backend):
        return measure_nccl(ctx, args) if backend == "nccl" else measure_ep(ctx, args, backend)

    code = common.run_backends(ctx, "low_latency", backends, args.out, config_of(args), measure)
    return common.finish(ctx, code)


if __name__ == "__main__":
    sys.exit(main())
