"""Normal-mode (training / prefill) benchmark: get_dispatch_layout, dispatch (BF16 and FP8) and
combine, at DeepEP's default sizes, counted as DeepEP counts bandwidth.

Sizes (GPU defaults): 4096 tokens per rank, hidden 7168, top-8 of 256 experts, uniform random
routing, 24 SMs (``Buffer.set_num_sms``). On CPU the defaults are small (gloo, reference).

Bandwidth: all bytes a rank receives, its own tokens included, over the time of the whole
operation: dispatch BF16 = received tokens x hidden x 2; FP8 = received tokens x (hidden +
hidden / 128 x 4); combine counts the same BF16 bytes as the BF16 dispatch.

What is timed (each with all ranks synchronised before every timed run, see bench/common.py):
  layout_us                 get_dispatch_layout alone.
  dispatch_bf16_us / _fp8   dispatch with a cached handle (the layout already computed and the
                            counts exchanged), as DeepEP's test_intranode times it.
  dispatch_bf16_notify_us   dispatch from the layout tensors (count exchange included), with
                            top-k ids and weights, as a model's first dispatch of a step runs.
  combine_us                combine of the received BF16 rows.
``--backend nccl`` times one ``all_to_all_single`` of the same rows, already permuted ("NCCL
alone"); the reference backend on GPUs is the "naive EP in torch" baseline.

Before timing, each ep_comm backend is checked once: the layout equals the reference layout,
each rank receives the rows the others' layouts say (count and per-source checksum), and
combine(dispatch(x)) == x * (ranks the token went to), exactly. A wrong backend reports nothing.

    torchrun --nproc-per-node=2 bench/normal.py --backend kernels,reference,nccl
    torchrun --nproc-per-node=4 bench/normal.py --backend reference          # CPU demo
    ... --sweep-sms 8,16,24,32,48 --sweep-tokens 256,512,1024,2048,4096,8192,16384
"""
from __future__ import annotations

import argparse
import sys

import common
import torch

import ep_comm
from ep_comm.core import fp8
from ep_comm.core import routing

GPU_DEFAULTS = dict(tokens=4096, hidden=7168, topk=8, experts=256, num_sms=24, warmup=5, iters=20)
CPU_DEFAULTS = dict(tokens=256, hidden=1024, topk=8, experts=64, num_sms=24, warmup=1, iters=3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--tokens", type=int, help="tokens per rank (GPU 4096, CPU 256)")
    p.add_argument("--hidden", type=int, help="hidden size (GPU 7168, CPU 1024)")
    p.add_argument("--topk", type=int, help="experts per token (8)")
    p.add_argument("--experts", type=int, help="experts in all (GPU 256, CPU 64)")
    p.add_argument("--num-sms", type=int, help="SMs of the kernels (Buffer.set_num_sms; 24)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="split the ranks into nodes of this many (the internode path; results "
                        "named internode-*.json); default: one node")
    p.add_argument("--sweep-sms", default="", help="e.g. 8,16,24,32,48 (ep_comm backends)")
    p.add_argument("--sweep-tokens", default="", help="tokens per rank, e.g. 256,1024,4096,16384")
    p.add_argument("--sweep-iters", type=int, default=None, help="timed runs per sweep point")
    return p.parse_args(argv)


def config_of(args) -> dict:
    return {"num_tokens": args.tokens, "hidden": args.hidden, "num_topk": args.topk,
            "num_experts": args.experts, "num_sms": args.num_sms, "warmup": args.warmup,
            "iters": args.iters, "pad_us": args.pad_us, "seed": args.seed,
            "ranks_per_node": args.ranks_per_node}


# ------------------------------------------------------------------------------ ep_comm backends
def _check_point(ctx, buffer, x, topk_idx, weights, lay, num_experts, cfg, ccfg) -> tuple:
    """One checked dispatch + combine. Returns (handle, recv_x, recv_tokens)."""
    problems = []
    ntpr, per_node, ntpe, in_rank = lay
    ref = routing.compute_dispatch_layout(topk_idx, num_experts, ctx.num_ranks, ctx.num_ranks)
    for name, got, want in (("num_tokens_per_rank", ntpr, ref[0]),
                            ("num_tokens_per_expert", ntpe, ref[2]),
                            ("is_token_in_rank", in_rank, ref[3])):
        if not torch.equal(got.cpu(), want.cpu()):
            problems.append(f"get_dispatch_layout: {name} differs from the reference layout")
    recv_x, _, _, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
        num_tokens_per_expert=ntpe, topk_idx=topk_idx, topk_weights=weights, config=cfg)
    # What every rank sends to me, from their own layouts: row counts, and the float sum of the
    # rows each source sends to each destination (a cheap checksum of the payload).
    r, me = ctx.num_ranks, ctx.rank
    sums = torch.stack([x[in_rank[:, j]].float().sum(0) for j in range(r)]).cpu()
    every = common.gather(ctx, (ntpr.cpu(), ntpe.cpu(), sums))
    from_src = [int(e[0][me]) for e in every]
    expect_rows = sum(from_src)
    local = num_experts // r
    expect_per_expert = sum(e[1][me * local:(me + 1) * local] for e in every).tolist()
    if recv_x.shape[0] != expect_rows:
        problems.append(f"dispatch received {recv_x.shape[0]} rows, the layouts say {expect_rows}")
    elif counts != expect_per_expert:
        problems.append(f"num_recv_tokens_per_expert_list {counts[:8]}... != {expect_per_expert[:8]}...")
    else:
        begin = 0
        for src, n in enumerate(from_src):
            got = recv_x[begin:begin + n].float().sum(0).cpu()
            want = every[src][2][me]
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-2 * max(1, n) ** 0.5):
                problems.append(f"dispatch rows from rank {src} have a wrong checksum")
            begin += n
    if not problems:
        combined, _, _ = buffer.combine(recv_x, handle, config=ccfg)
        want = (x.float() * in_rank.sum(1, keepdim=True).float()).to(torch.bfloat16)
        if not torch.equal(combined, want):
            bad = int((combined != want).any(1).sum())
            problems.append(f"combine(dispatch(x)) != x * ranks for {bad} tokens")
    common.agree(ctx, problems)
    return handle, recv_x, expect_rows


def _measure_ep_point(ctx, buffer, args, tokens, cfg, timer, salt, full: bool) -> dict:
    """Figures of one size on an ep_comm backend (``full``: also layout, notify and checks).

    ``cfg`` is a (dispatch Config, combine Config) pair."""
    cfg, ccfg = cfg
    topk_idx, weights = common.make_routing(ctx, tokens, args.experts, args.topk, args.seed, salt)
    x = common.make_x(ctx, tokens, args.hidden, args.seed, salt)
    x_fp8 = fp8.per_token_cast_to_fp8(x)
    lay = buffer.get_dispatch_layout(topk_idx, args.experts)[:4]
    ntpr, per_node, ntpe, in_rank = lay
    if full:
        handle, recv_x, recv_tokens = _check_point(ctx, buffer, x, topk_idx, weights, lay,
                                                   args.experts, cfg, ccfg)
    else:
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, config=cfg)
        recv_tokens = recv_x.shape[0]
        if recv_tokens != handle.num_recv_tokens:
            common.agree(ctx, [f"received {recv_tokens} rows, handle says {handle.num_recv_tokens}"])
    phases = [
        ("dispatch_bf16", lambda: buffer.dispatch(x, handle=handle, config=cfg)),
        ("dispatch_fp8", lambda: buffer.dispatch(x_fp8, handle=handle, config=cfg)),
        ("combine", lambda: buffer.combine(recv_x, handle, config=ccfg)),
    ]
    if full:
        phases = [("layout", lambda: buffer.get_dispatch_layout(topk_idx, args.experts))] + phases
        phases.append(("dispatch_bf16_notify", lambda: buffer.dispatch(
            x, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, topk_idx=topk_idx,
            topk_weights=weights, config=cfg)))
    t = timer.run(phases)
    return _figures(t, recv_tokens, args.hidden)


def _figures(t: dict, recv_tokens: int, hidden: int) -> dict:
    """Times in us and DeepEP-counted bandwidths from the phase medians (seconds)."""
    bf16_bytes = recv_tokens * hidden * 2
    fp8_bytes = recv_tokens * common.fp8_row_bytes(hidden)
    f = {}
    if "layout" in t:
        f["layout_us"] = t["layout"] * 1e6
    f["dispatch_bf16_us"] = t["dispatch_bf16"] * 1e6
    f["dispatch_bf16_gbps"] = common.gbps(bf16_bytes, t["dispatch_bf16"])
    f["dispatch_fp8_us"] = t["dispatch_fp8"] * 1e6
    f["dispatch_fp8_gbps"] = common.gbps(fp8_bytes, t["dispatch_fp8"])
    f["combine_us"] = t["combine"] * 1e6
    f["combine_gbps"] = common.gbps(bf16_bytes, t["combine"])
    if "dispatch_bf16_notify" in t:
        f["dispatch_bf16_notify_us"] = t["dispatch_bf16_notify"] * 1e6
        f["dispatch_bf16_notify_gbps"] = common.gbps(bf16_bytes, t["dispatch_bf16_notify"])
    f["recv_tokens"] = float(recv_tokens)
    return f


def _configs(num_ranks: int) -> tuple:
    """(dispatch, combine) Config for the current ``Buffer.num_sms``."""
    return (ep_comm.Buffer.get_dispatch_config(num_ranks),
            ep_comm.Buffer.get_combine_config(num_ranks))


def _nvl_bytes(num_ranks: int, hidden: int, sms_list: list[int]) -> int:
    """The largest NVLink buffer any of the SM counts needs (Config size hints)."""
    saved = ep_comm.Buffer.num_sms
    need = 0
    try:
        for sms in sms_list:
            ep_comm.Buffer.set_num_sms(sms)
            for cfg in (ep_comm.Buffer.get_dispatch_config(num_ranks),
                        ep_comm.Buffer.get_combine_config(num_ranks)):
                need = max(need, cfg.get_nvl_buffer_size_hint(hidden * 2, num_ranks))
    finally:
        ep_comm.Buffer.num_sms = saved
    return need


def measure_ep(ctx, args, backend: str):
    """All figures and sweeps of one ep_comm backend."""
    sweep_sms = common.parse_ints(args.sweep_sms)
    sweep_tokens = common.parse_ints(args.sweep_tokens)
    ep_comm.Buffer.set_num_sms(args.num_sms)
    nvl_bytes = _nvl_bytes(ctx.num_ranks, args.hidden, [args.num_sms] + sweep_sms)
    rpn = args.ranks_per_node
    rdma_bytes = 0
    if rpn:
        most = max([args.tokens] + sweep_tokens)
        rdma_bytes = ep_comm.Buffer.get_dispatch_config(ctx.num_ranks).get_rdma_buffer_size_hint(
            args.hidden * 2, ctx.num_ranks, ranks_per_node=rpn, num_max_tokens_per_rank=most)
    buffer = ep_comm.Buffer(ctx.group, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes,
                            backend=backend, explicitly_destroy=True, ranks_per_node=rpn)
    try:
        timer = common.Timer(ctx, args.warmup, args.iters, args.pad_us)
        cfg = _configs(ctx.num_ranks)
        mine = _measure_ep_point(ctx, buffer, args, args.tokens, cfg, timer, 0, full=True)
        figures, per_rank = common.reduce_figures(ctx, mine)
        common.figures_table(ctx, figures, per_rank,
                             f"normal / {backend} / {ctx.num_ranks} rank(s), {args.tokens} "
                             f"tokens per rank, {args.num_sms} SMs (times in us, GB/s)")
        extra = {"per_rank": per_rank}
        sweep_timer = common.Timer(ctx, min(args.warmup, 2), args.sweep_iters, args.pad_us)
        if sweep_sms:
            rows = []
            for sms in sweep_sms:
                ep_comm.Buffer.set_num_sms(sms)
                c = _configs(ctx.num_ranks)
                f, _ = common.reduce_figures(ctx, _measure_ep_point(
                    ctx, buffer, args, args.tokens, c, sweep_timer, 0, full=False))
                rows.append({"num_sms": sms, **f})
            ep_comm.Buffer.set_num_sms(args.num_sms)
            extra["sweep_sms"] = rows
            _sweep_table(ctx, rows, "num_sms", f"normal / {backend}: SM sweep, {args.tokens} tokens")
        if sweep_tokens:
            rows = []
            for i, tokens in enumerate(sweep_tokens):
                f, _ = common.reduce_figures(ctx, _measure_ep_point(
                    ctx, buffer, args, tokens, cfg, sweep_timer, 100 + i, full=False))
                rows.append({"num_tokens": tokens, **f})
            extra["sweep_tokens"] = rows
            _sweep_table(ctx, rows, "num_tokens", f"normal / {backend}: token sweep, "
                         f"{args.num_sms} SMs")
        return figures, extra
    finally:
        buffer.destroy()
        ep_comm.Buffer.set_num_sms(args.num_sms)


def _sweep_table(ctx, rows: list[dict], key: str, title: str) -> None:
    cols = ["dispatch_bf16_us", "dispatch_bf16_gbps", "dispatch_fp8_us", "dispatch_fp8_gbps",
            "combine_us", "combine_gbps"]
    common.print_table(ctx, [key] + cols, [[r[key]] + [r.get(c) for c in cols] for r in rows],
                       title)


# ------------------------------------------------------------------------------ nccl alone
def _measure_nccl_point(ctx, args, tokens, timer, salt) -> dict:
    """all_to_all_single of the rows dispatch would move, input already permuted."""
    topk_idx, _ = common.make_routing(ctx, tokens, args.experts, args.topk, args.seed, salt)
    in_rank = routing.is_token_in_rank(topk_idx, args.experts, ctx.num_ranks)
    send_counts = in_rank.sum(0).tolist()
    recv_counts = common.exchange_counts(ctx, send_counts)
    n_send, n_recv = sum(send_counts), sum(recv_counts)
    h, dev = args.hidden, ctx.device
    bf16_send = torch.randint(0, 255, (n_send, 2 * h), dtype=torch.uint8, device=dev)
    bf16_recv = torch.empty(n_recv, 2 * h, dtype=torch.uint8, device=dev)
    fp8_send = torch.randint(0, 255, (n_send, common.fp8_row_bytes(h)), dtype=torch.uint8,
                             device=dev)
    fp8_recv = torch.empty(n_recv, common.fp8_row_bytes(h), dtype=torch.uint8, device=dev)
    back = torch.empty_like(bf16_send)
    t = timer.run([
        ("dispatch_bf16", lambda: common.a2a_rows(ctx, bf16_recv, bf16_send, recv_counts,
                                                  send_counts)),
        ("dispatch_fp8", lambda: common.a2a_rows(ctx, fp8_recv, fp8_send, recv_counts,
                                                 send_counts)),
        ("combine", lambda: common.a2a_rows(ctx, back, bf16_recv, send_counts, recv_counts)),
    ])
    return _figures(t, n_recv, h)


def measure_nccl(ctx, args):
    figures, extra, rows = common.measure_nccl_with_sweep(ctx, args, "normal",
                                                          _measure_nccl_point, sweep_warmup=2)
    if rows:
        _sweep_table(ctx, rows, "num_tokens", "normal / nccl: token sweep")
    if common.parse_ints(args.sweep_sms):
        ctx.log("(--sweep-sms does not apply to nccl: skipped)")
    return figures, extra


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx, backends = common.start_sweep_bench(args, GPU_DEFAULTS, CPU_DEFAULTS)

    def measure(backend):
        return measure_nccl(ctx, args) if backend == "nccl" else measure_ep(ctx, args, backend)

    bench = "internode" if args.ranks_per_node and args.ranks_per_node < ctx.num_ranks else "normal"
    code = common.run_backends(ctx, bench, backends, args.out, config_of(args), measure)
    return common.finish(ctx, code)


if __name__ == "__main__":
    sys.exit(main())
