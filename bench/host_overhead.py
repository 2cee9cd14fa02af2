"""Host (Python) time per call of the kernels backend, and where it goes.

At decode-sized batches the kernels take tens of microseconds, so the Python side of
``get_dispatch_layout`` / ``dispatch`` / ``combine`` (argument checks, output allocation, kernel
argument packing and launch) can bound a step. This times each call back to back without
synchronising (a small batch keeps the GPU ahead of the host, so the loop's wall time per call
is the host's), then profiles the same loops with cProfile and prints the functions that take
the most time of their own.

    python bench/host_overhead.py                       # 1 GPU
    torchrun --nproc-per-node=2 bench/host_overhead.py  # 2 GPUs

Writes ``bench/results/host_overhead-kernels-<ranks>r-<device>.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import common
import torch

import ep_comm

CALLS = ("layout", "dispatch", "dispatch_cached", "dispatch_worst", "combine")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--calls", type=int, default=300, help="calls per timed loop")
    p.add_argument("--top", type=int, default=20, help="functions listed from the profile")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = common.init(args)
    if not ctx.on_gpu:
        print("bench/host_overhead.py times the kernels backend: it needs CUDA GPUs")
        return common.finish(ctx, 1)
    r = ctx.num_ranks
    cfg = ep_comm.Buffer.get_dispatch_config(r)
    buf = ep_comm.Buffer(ctx.group, num_nvl_bytes=cfg.get_nvl_buffer_size_hint(args.hidden * 2, r),
                         backend="kernels", explicitly_destroy=True)
    g = torch.Generator(device=ctx.device).manual_seed(ctx.rank)
    x = torch.randn(args.tokens, args.hidden, generator=g, device=ctx.device).to(torch.bfloat16)
    scores = torch.rand(args.tokens, args.experts, generator=g, device=ctx.device)
    idx = scores.topk(args.topk, dim=1).indices.to(torch.int64)
    w = torch.rand(args.tokens, args.topk, generator=g, device=ctx.device)
    lay = buf.get_dispatch_layout(idx, args.experts)
    kw = dict(num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
              num_tokens_per_expert=lay[2], topk_idx=idx, topk_weights=w)
    recv = buf.dispatch(x, **kw)
    handle, y = recv[4], recv[0]
    worst = args.tokens * r
    fns = {
        "layout": lambda: buf.get_dispatch_layout(idx, args.experts),
        "dispatch": lambda: buf.dispatch(x, **kw),
        "dispatch_cached": lambda: buf.dispatch(x, handle=handle),
        "dispatch_worst": lambda: buf.dispatch(x, **kw, num_worst_tokens=worst),
        "combine": lambda: buf.combine(y, handle),
    }
    figures, prof_text = {}, {}
    for name in CALLS:
        fn = fns[name]
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        torch.distributed.barrier(ctx.group)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        host = (time.perf_counter() - t0) / args.calls
        torch.cuda.synchronize()
        figures[f"{name}_host_us"] = host * 1e6
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        prof_text[name] = out.getvalue()
    if ctx.rank == 0:
        common.print_table(None, ["call", "host us per call"],
                           [[n, figures[f"{n}_host_us"]] for n in CALLS],
                           f"\nhost time per call, {args.tokens} tokens x {args.hidden}, "
                           f"top-{args.topk} of {args.experts}, {r} rank(s) (no sync in the loop)")
        for name in CALLS:
            print(f"\n--- cProfile, {args.calls} x {name}, by own time")
            print("\n".join(prof_text[name].splitlines()[:12 + args.top]))
    config = {"num_tokens": args.tokens, "hidden": args.hidden, "num_topk": args.topk,
              "num_experts": args.experts}
    path = common.write_result(ctx, args.out, "host_overhead", "kernels", config, figures)
    if path:
        print(f"\nwrote {path}")
    buf.destroy()
    return common.finish(ctx, 0)


if __name__ == "__main__":
    sys.exit(main())
