"""GPU smoke test and timing of the NVLink normal-mode kernels against the reference backend.

Run:  torchrun --nproc-per-node=N bench/smoke_intranode.py        (N = 1 or 2; < 60 s)
      EP_COMM_TIMEOUT_S (default here 10) bounds every wait.

Prints one PASS/FAIL line per case (layout, dispatch BF16/FP8, cached, worst tokens, CUDA
graph, -1 entries, a rank with no tokens, every token to one rank, combine with bias and
weights), then timings at 4096 tokens/rank, hidden 7168, top-8 of 256, 24 SMs: layout,
dispatch BF16 / FP8 (with notify and its host sync, and cached), combine; GB/s counted as
DeepEP does (all bytes this rank receives, its own included, over the operation's time).
Then a breakdown: per op, the Python time per call and each kernel's GPU time (notify,
dispatch, combine, torch fills) from the profiler, and speed-of-light lines (a torch copy of
the same bytes; with 2+ ranks an NCCL all_to_all of the bytes that cross NVLink).
"""
from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist

os.environ.setdefault("EP_COMM_TIMEOUT_S", "10")
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
# A bounded NCCL timeout: if one rank raises inside a case, the others must not hang.
dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()),
                        timeout=datetime.timedelta(seconds=60))

import ep_comm  # noqa: E402
from ep_comm.core import fp8  # noqa: E402

T0 = time.time()


def p0(*a):
    if rank == 0:
        print(*a, flush=True)


def make_inputs(seed, t, hidden, k, e, drop=0.0, zero_rank=None, one_rank=None):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    t = 0 if zero_rank == rank else t
    x = torch.randn(t, hidden, generator=g).bfloat16()
    per = e // world
    if one_rank is not None:
        idx = torch.stack([torch.randperm(per, generator=g)[:k] for _ in range(t)]) + one_rank * per \
            if t else torch.zeros(0, k, dtype=torch.int64)
    else:
        idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    idx = idx.to(torch.int64)
    idx[torch.rand(t, k, generator=g) < drop] = -1
    w = torch.rand(t, k, generator=g).float()
    return x.cuda(), idx.cuda(), w.cuda()


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    if a.shape != b.shape:
        return False
    if a.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float32):
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return torch.equal(a, b)


def check(name, ok_local, detail=""):
    flag = torch.tensor([0 if ok_local else 1], device="cuda")
    dist.all_reduce(flag)
    bad = int(flag.item())
    p0(f"{'PASS' if bad == 0 else 'FAIL'} {name}" + (f" ({bad} rank(s) differ) {detail}" if bad else ""))
    return bad == 0


def handle_fields_equal(kh, rh, worst):
    names = ["is_token_in_rank", "num_tokens_per_rank", "rank_prefix_matrix", "send_pos",
             "recv_src_idx", "recv_src_rank", "num_recv_tokens_per_expert"]
    bad = [n for n in names if not same(getattr(kh, n), getattr(rh, n))]
    if not worst and kh.num_recv_tokens != rh.num_recv_tokens:
        bad.append("num_recv_tokens")
    return bad


def run_case(kern, ref, name, seed, t, hidden, k, e, *, use_fp8=False, drop=0.0, zero_rank=None,
             one_rank=None, worst=0, alignment=1, graph=False):
    x, idx, w = make_inputs(seed, t, hidden, k, e, drop, zero_rank, one_rank)
    xin = fp8.per_token_cast_to_fp8(x) if use_fp8 else x
    kl = kern.get_dispatch_layout(idx, e)
    rl = ref.get_dispatch_layout(idx, e)
    ok = all(same(a, b) for a, b in zip(kl[:4], rl[:4]))
    if not check(f"{name}: layout", ok):
        return
    kw = dict(num_tokens_per_rank=rl[0], num_tokens_per_rdma_rank=rl[1], is_token_in_rank=rl[3],
              num_tokens_per_expert=rl[2], topk_idx=idx, topk_weights=w,
              expert_alignment=alignment, num_worst_tokens=worst)
    rr = ref.dispatch(xin, **kw)
    if graph:
        kern.dispatch(xin, **kw)  # warm-up (compiles, allocates) outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            kr = kern.dispatch(xin, **kw)
        for _ in range(2):
            g.replay()
        torch.cuda.synchronize()
    else:
        kr = kern.dispatch(xin, **kw)
    torch.cuda.synchronize()
    bad = [n for n, a, b in zip(["recv_x", "topk_idx", "topk_weights", "counts"], kr[:4], rr[:4])
           if not (a == b if isinstance(a, list) else same(a, b))]
    bad += handle_fields_equal(kr[4], rr[4], worst)
    if not check(f"{name}: dispatch", not bad, str(bad)):
        return
    # cached dispatch with new data
    x2 = (x.float() * -0.5).bfloat16()
    x2in = fp8.per_token_cast_to_fp8(x2) if use_fp8 else x2
    kc, rc = kern.dispatch(x2in, handle=kr[4]), ref.dispatch(x2in, handle=rr[4])
    torch.cuda.synchronize()
    check(f"{name}: cached dispatch", same(kc[0], rc[0]) and kc[3] == rc[3])
    # combine: rows scaled per row, weights and two biases
    rows = rr[0][0] if use_fp8 else rr[0]
    y = (rows.float()[:, :hidden] if not use_fp8 else torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed)).cuda())
    y = (y * 0.75 + 0.25).bfloat16()
    b0 = torch.randn(idx.shape[0], hidden, device="cuda").bfloat16()
    b1 = torch.randn(idx.shape[0], hidden, device="cuda").bfloat16()
    kx, kw_, _ = kern.combine(y, kr[4], topk_weights=rr[2], bias=(b0, b1))
    rx, rw_, _ = ref.combine(y, rr[4], topk_weights=rr[2], bias=(b0, b1))
    torch.cuda.synchronize()
    exact = same(kx, rx) and same(kw_, rw_)
    close = torch.allclose(kx.float(), rx.float(), rtol=1e-2, atol=1e-2)
    check(f"{name}: combine (bit-exact {exact})", exact or (world > 2 and close))


def timed(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters * 1e3  # us


def kernel_times(fn, iters=10):
    """{kernel name: GPU us per call} of the kernels ``fn`` launches, from CUPTI (torch.profiler
    sees cuda.core launches too), so host gaps between kernels do not count."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        us = 0.0
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if getattr(ev, attr, None) is not None:
                us = float(getattr(ev, attr))
                break
        if us > 0:
            out[ev.key] = us / iters
    return out


def host_us(fn, iters=20):
    """Python time per call with no device sync (a call that syncs itself includes its wait)."""
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def breakdown(label, fn, nbytes=None):
    """One line per op: host time per call, then each kernel's GPU time (nvl_* first)."""
    h = host_us(fn)
    ks = kernel_times(fn)
    names = sorted(ks, key=lambda k: (not k.startswith("nvl_"), -ks[k]))
    gpu = sum(ks.values())
    parts = ", ".join(f"{k[:40]} {ks[k]:.1f}" for k in names)
    bw = ""
    main = [k for k in names if k in ("nvl_dispatch", "nvl_combine")]
    if nbytes and main:
        bw = f"; {main[0]} alone {nbytes / (ks[main[0]] * 1e-6) / 1e9:.0f} GB/s"
    p0(f"  {label:18s} host {h:7.1f} us | GPU {gpu:7.1f} us: {parts}{bw}")


def speed_of_light(nbytes, own_bytes):
    """Plain torch figures for the same bytes: a local copy of all received bytes (HBM), and
    with several ranks an NCCL all_to_all_single of the bytes that cross NVLink."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = timed(lambda: dst.copy_(src))
    p0(f"  torch copy       {us:8.1f} us  {nbytes / (us * 1e-6) / 1e9:6.1f} GB/s  "
       f"({nbytes / 2**20:.1f} MiB, local HBM: the floor of a 1-rank dispatch or combine)")
    if world > 1:
        per_peer = (nbytes - own_bytes) // (world - 1) // 16 * 16
        buf_in = torch.empty(per_peer * world, dtype=torch.uint8, device="cuda")
        buf_out = torch.empty_like(buf_in)
        us = timed(lambda: dist.all_to_all_single(buf_out, buf_in))
        moved = per_peer * (world - 1)
        p0(f"  nccl all_to_all  {us:8.1f} us  {moved / (us * 1e-6) / 1e9:6.1f} GB/s  "
           f"({moved / 2**20:.1f} MiB from peers per rank, already permuted)")
    del src, dst


def bench(kern, ref):
    t, hidden, k, e = 4096, 7168, 8, 256
    x, idx, w = make_inputs(7, t, hidden, k, e)
    lay = kern.get_dispatch_layout(idx, e)
    kw = dict(num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1],
              is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=idx,
              topk_weights=w)
    us_layout = timed(lambda: kern.get_dispatch_layout(idx, e))
    us_ref_layout = timed(lambda: ref.get_dispatch_layout(idx, e), iters=5)
    out = kern.dispatch(x, **kw)
    n = out[0].shape[0]
    bf16_bytes = n * hidden * 2
    xq = fp8.per_token_cast_to_fp8(x)
    fp8_bytes = n * (hidden + hidden // 128 * 4)
    us_d = timed(lambda: kern.dispatch(x, **kw))
    us_dc = timed(lambda: kern.dispatch(x, handle=out[4]))
    us_dw = timed(lambda: kern.dispatch(x, **kw, num_worst_tokens=t * world))
    us_f = timed(lambda: kern.dispatch(xq, **kw))
    us_fc = timed(lambda: kern.dispatch(xq, handle=out[4]))
    y = out[0]
    us_c = timed(lambda: kern.combine(y, out[4]))
    us_rd = timed(lambda: ref.dispatch(x, **kw), iters=5)
    rout = ref.dispatch(x, **kw)
    us_rc = timed(lambda: ref.combine(rout[0], rout[4]), iters=5)
    gbs = lambda b, us: b / (us * 1e-6) / 1e9  # noqa: E731
    p0(f"bench: {world} rank(s), {t} tokens/rank, hidden {hidden}, top-{k} of {e}, "
       f"num_sms {ep_comm.Buffer.num_sms}, received rows on rank 0: {n}")
    p0(f"  layout           {us_layout:8.1f} us   (reference {us_ref_layout:.1f} us)")
    p0(f"  dispatch bf16    {us_d:8.1f} us  {gbs(bf16_bytes, us_d):6.1f} GB/s  (notify + host sync incl.)")
    p0(f"  dispatch bf16 c  {us_dc:8.1f} us  {gbs(bf16_bytes, us_dc):6.1f} GB/s  (cached)")
    p0(f"  dispatch bf16 w  {us_dw:8.1f} us  (num_worst_tokens={t * world}, rows padded)")
    p0(f"  dispatch fp8     {us_f:8.1f} us  {gbs(fp8_bytes, us_f):6.1f} GB/s")
    p0(f"  dispatch fp8 c   {us_fc:8.1f} us  {gbs(fp8_bytes, us_fc):6.1f} GB/s  (cached)")
    p0(f"  combine bf16     {us_c:8.1f} us  {gbs(bf16_bytes, us_c):6.1f} GB/s")
    p0(f"  reference        dispatch {us_rd:.1f} us, combine {us_rc:.1f} us")
    p0("breakdown (host: Python time per call, no sync; GPU: CUPTI time per call of each kernel, us)")
    breakdown("layout", lambda: kern.get_dispatch_layout(idx, e))
    breakdown("dispatch bf16", lambda: kern.dispatch(x, **kw), bf16_bytes)
    breakdown("dispatch bf16 c", lambda: kern.dispatch(x, handle=out[4]), bf16_bytes)
    breakdown("dispatch bf16 w", lambda: kern.dispatch(x, **kw, num_worst_tokens=t * world))
    breakdown("dispatch fp8 c", lambda: kern.dispatch(xq, handle=out[4]), fp8_bytes)
    breakdown("combine bf16", lambda: kern.combine(y, out[4]), bf16_bytes)
    own = int(out[4].recv_src_rank.eq(rank).sum()) * hidden * 2
    speed_of_light(bf16_bytes, own)


def main():
    e = 64
    cfg = ep_comm.Buffer.get_dispatch_config(world)
    nvl = cfg.get_nvl_buffer_size_hint(7168 * 2, world)
    kern = ep_comm.Buffer(dist.group.WORLD, num_nvl_bytes=nvl, backend="kernels",
                          explicitly_destroy=True)
    ref = ep_comm.Buffer(dist.group.WORLD, num_nvl_bytes=nvl, backend="reference",
                         explicitly_destroy=True)
    p0(f"buffers ready in {time.time() - T0:.1f} s (num_nvl_bytes={nvl})")
    cases = [
        dict(name="bf16 h2048 k8", seed=1, t=500, hidden=2048, k=8, e=e),
        dict(name="fp8 h4096 k6", seed=2, t=333, hidden=4096, k=6, e=e, use_fp8=True),
        dict(name="bf16 h7168 k9 drop0.3 align128", seed=3, t=257, hidden=7168, k=9, e=e,
             drop=0.3, alignment=128),
        dict(name="bf16 k1 zero tokens on rank 1", seed=4, t=300, hidden=2048, k=1, e=e,
             zero_rank=min(1, world - 1)),
        dict(name="bf16 every token to rank 0", seed=5, t=300, hidden=2048, k=4, e=e, one_rank=0),
        dict(name="fp8 worst tokens", seed=6, t=400, hidden=2048, k=8, e=e, use_fp8=True,
             worst=400 * world),
        dict(name="bf16 worst tokens CUDA graph", seed=7, t=400, hidden=2048, k=8, e=e,
             worst=400 * world, graph=True),
        dict(name="bf16 all -1", seed=8, t=64, hidden=2048, k=4, e=e, drop=1.0),
    ]
    for case in cases:
        try:
            run_case(kern, ref, **case)
        except Exception:  # noqa: BLE001 - report the case and go on with the next
            print(f"FAIL {case['name']} on rank {rank}: exception\n{traceback.format_exc()}",
                  flush=True)
    try:
        bench(kern, ref)
    except Exception:  # noqa: BLE001
        print(f"FAIL bench on rank {rank}\n{traceback.format_exc()}", flush=True)
    # create/destroy repeatedly: GPU memory must not grow
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    for _ in range(10):
        b = ep_comm.Buffer(dist.group.WORLD, num_nvl_bytes=nvl, backend="kernels",
                           explicitly_destroy=True)
        b.destroy()
    torch.cuda.synchronize()
    free1 = torch.cuda.mem_get_info()[0]
    check(f"10x create/destroy (free memory delta {(free0 - free1) / 2**20:.1f} MiB)",
          free0 - free1 < 64 << 20)
    kern.destroy()
    ref.destroy()
    p0(f"total {time.time() - T0:.1f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
