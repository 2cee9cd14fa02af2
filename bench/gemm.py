"""Expert GEMM benchmark on one GPU: the Triton grouped GEMMs of ep_comm against PyTorch's.

Shapes: DeepSeek-V3, 64 local experts (256 experts over 4 ranks), hidden 7168, expert
intermediate 2048: gate+up ``[M, 7168] x [7168, 4096]`` and down ``[M, 2048] x [2048, 7168]``
per expert.

What is measured (median GPU time of ``triton.testing.do_bench``, L2 flushed before each run;
ours and ``torch._grouped_mm`` BF16 timed alternately three times, the median of each kept):

* contiguous (normal-mode layout), 128 / 256 / 512 / 1024 tokens per expert:
  ep_comm BF16 vs ``torch._grouped_mm`` (same offsets) vs a loop of ``torch.mm``; ep_comm FP8
  (128-channel activation scales, 128 x 128 weight block scales) vs
  ``torch._scaled_grouped_mm`` (row-wise scales only: a simpler format, for scale). TFLOP/s =
  2 M N K / time. Targets: BF16 >= 0.9x ``torch._grouped_mm`` at every size and >= 550 TFLOP/s
  at 512; FP8 >= 1000 TFLOP/s at 512.
* masked (low-latency layout ``[64, 512, K]``), 1 to 64 valid tokens per expert: bytes of the
  expert weights read (plus FP8 block scales) / time, as a fraction of the HBM read bandwidth
  measured in the same run (the best of ``torch.sum`` and a Triton streaming read of 4 GiB).
  Target >= 0.75.
* ``--sweep`` (default on): alternative block configurations next to the heuristic's choice, so
  that ``ep_comm.moe.gemm.contiguous_config`` / ``masked_config`` can be checked on this machine.

Before timing, each kernel's output is compared with torch (BF16: ``torch._grouped_mm``; FP8:
float32 GEMMs of the dequantised operands) on a sample of experts.

    python bench/gemm.py                 # ~2 minutes on an H200 (compiles included)
    python bench/gemm.py --no-sweep --tokens 128,512
    python bench/gemm.py --dry-run --out /tmp/gemm_dry   # CPU check of the script itself

Writes ``bench/results/gemm-kernels-1r-<device>.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if "--dry-run" in sys.argv:  # CPU smoke run: the kernels in the Triton interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ep_comm.moe import gemm  # noqa: E402
from ep_comm.moe import quantize_weight_fp8  # noqa: E402

HIDDEN, INTER, EXPERTS, LL_M = 7168, 2048, 64, 512
SHAPES = {"gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}  # name: (N, K)

# Alternatives timed next to the heuristic (block_m, block_n, block_k, warps, stages[, swap]),
# each with pointer loads and with TMA (the sweep's last config field).
CONTIG_ALT = {
    False: [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 5),
            (64, 256, 64, 4, 4), (128, 256, 128, 8, 2)],
    # FP8: 128 x 256 = two 128-wide scale halves sharing the A tile (see ep_comm.moe.gemm);
    # 256 x 128 = one weight-scale block per tile, [256] activation-scale vector per K step.
    True: [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (128, 128, 128, 8, 4),
           (256, 128, 128, 8, 3), (256, 128, 128, 8, 4), (64, 256, 128, 4, 4)],
}
# FP8 only, TMA only: the warp-specialized Gluon kernel (fixed 128 x 256 x 128 tile), by ring depth.
WS_ALT = [(128, 256, 128, 4, s, False, True, True) for s in (2, 3, 4)]
MASKED_ALT = {
    False: [(64, 128, 64, 4, 5, False), (64, 64, 64, 4, 6, True), (16, 128, 128, 4, 4, True)],
    # FP8 (swap-AB; smem per CTA = stages x (BM + 128) x 128 B): 1 vs 2 vs 3 CTAs per SM.
    True: [(64, 128, 128, 4, 3, True), (32, 128, 128, 4, 4, True), (16, 128, 128, 4, 4, True),
           (16, 128, 128, 4, 6, True), (64, 128, 128, 4, 4, False), (64, 128, 128, 4, 3, False),
           (64, 64, 128, 4, 4, False), (32, 128, 128, 4, 4, False)],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="128,256,512,1024", help="tokens per expert (contiguous)")
    p.add_argument("--masked-tokens", default="1,4,16,32,64", help="valid tokens per expert (masked)")
    p.add_argument("--experts", type=int, default=EXPERTS)
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="time alternative block configurations too")
    p.add_argument("--rep", type=int, default=60, help="do_bench time budget per point (ms)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT))
    p.add_argument("--dry-run", action="store_true",
                   help="check the script on CPU: tiny shapes, Triton interpreter, one untimed "
                        "call per point, JSON into --out (not a measurement)")
    return p.parse_args(argv)


DRY_RUN = False


def bench_ms(fn, rep: int) -> float:
    if DRY_RUN:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


# ----------------------------------------------------------------------------- HBM bandwidth
@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, NPROG: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(pid * BLOCK, n, NPROG * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def measure_hbm_read(dev, rep: int) -> dict:
    """Read bandwidth of HBM (GB/s): a 4 GiB float32 tensor read by torch.sum and by a Triton
    streaming kernel (4 programs per SM); the larger is the reference."""
    n = 1 << (14 if DRY_RUN else 30)
    x = torch.ones(n, dtype=torch.float32, device=dev)
    t_sum = bench_ms(lambda: x.sum(), rep) / 1e3
    sms = 2 if DRY_RUN else torch.cuda.get_device_properties(dev).multi_processor_count
    nprog = 4 * sms
    out = torch.empty(nprog, dtype=torch.float32, device=dev)
    t_tri = bench_ms(lambda: _read_kernel[(nprog,)](x, out, n, BLOCK=4096, NPROG=nprog,
                                                   num_warps=8), rep) / 1e3
    assert abs(out.sum().item() - n) < 1e-3 * n, "HBM read kernel summed wrong"
    del x
    r = {"torch_sum_gbps": 4 * n / t_sum / 1e9, "triton_read_gbps": 4 * n / t_tri / 1e9}
    r["hbm_read_gbps"] = max(r.values())
    return r


# ----------------------------------------------------------------------------- operands
def make_weights(dev, e: int):
    g = torch.Generator(device=dev).manual_seed(1)
    w = {}
    for name, (n, k) in SHAPES.items():
        b = (torch.randn(e, n, k, generator=g, device=dev) / k ** 0.5).to(torch.bfloat16)
        w[name] = (b, quantize_weight_fp8(b))
    return w


def rowwise_fp8(t: torch.Tensor, dim: int):
    """Row-wise FP8 cast for ``torch._scaled_grouped_mm`` (scale per row along ``dim``)."""
    amax = t.float().abs().amax(dim=dim, keepdim=True).clamp(min=1e-4)
    s = amax / 448
    return (t.float() / s).to(torch.float8_e4m3fn), s.squeeze(dim)


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-9)).item()


# ----------------------------------------------------------------------------- contiguous
def bench_contiguous(args, dev, weights, tokens: int, name: str, log: list, sweep: list) -> dict:
    n, k = SHAPES[name]
    e = args.experts
    m = e * tokens
    b16, b8 = weights[name]
    a = (torch.randn(m, k, device=dev) * 0.5).to(torch.bfloat16)
    ends = torch.arange(1, e + 1, device=dev, dtype=torch.int32) * tokens
    a8 = gemm.quantize_fp8(a)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
    r = {}

    # correctness on a sample (first, middle, last expert)
    ours = gemm.grouped_gemm_contiguous(a, b16, ends, out=out).clone()
    ref = torch._grouped_mm(a, b16.transpose(-2, -1), offs=ends)
    r["bf16_check_rel_err"] = rel_err(ours, ref)
    ours8 = gemm.grouped_gemm_contiguous(a8, b8, ends, out=out)
    a8f, b8f = gemm._dequant_a(a8), gemm._dequant_b(b8)
    errs = []
    for ex in (0, e // 2, e - 1):
        rows = slice(ex * tokens, (ex + 1) * tokens)
        errs.append(rel_err(ours8[rows], a8f[rows] @ b8f[ex].T))
    r["fp8_check_rel_err"] = max(errs)
    del a8f, b8f
    if r["bf16_check_rel_err"] > 2e-2 or r["fp8_check_rel_err"] > 2e-2:
        raise RuntimeError(f"{name} {tokens}: wrong results {r}")

    # ours and torch._grouped_mm alternately, 3 rounds, medians: clock and power drift during
    # the run then weighs on both (single back-to-back runs moved the ratio by up to 15%)
    ours_ms, theirs_ms = [], []
    for _ in range(1 if DRY_RUN else 3):
        ours_ms.append(bench_ms(lambda: gemm.grouped_gemm_contiguous(a, b16, ends, out=out),
                                args.rep))
        theirs_ms.append(bench_ms(lambda: torch._grouped_mm(a, b16.transpose(-2, -1), offs=ends),
                                  args.rep))
    r["bf16_ms"], r["grouped_mm_ms"] = sorted(ours_ms)[len(ours_ms) // 2], sorted(theirs_ms)[len(theirs_ms) // 2]
    bt = b16.transpose(-2, -1)

    def loop():
        for ex in range(e):
            torch.mm(a[ex * tokens:(ex + 1) * tokens], bt[ex], out=out[ex * tokens:(ex + 1) * tokens])
    r["loop_mm_ms"] = bench_ms(loop, args.rep)
    # FP8: the heuristic's kernel (warp-specialized on Hopper), the Triton kernel's own best
    # configuration and, where it runs, the warp-specialized kernel at each ring depth,
    # alternately as above (5 rounds: these differ by a few percent).
    cfg8_triton = gemm.contiguous_config(m, n, k, e, fp8=True, warp_specialized=False)
    variants = {"fp8": None, "fp8_triton": cfg8_triton}
    if gemm.ws_available() is None:
        for st in (2, 3, 4):
            variants[f"fp8_ws{st}"] = dataclasses.replace(gemm.WS_FP8_CONFIG, num_stages=st)
    times = {key: [] for key in variants}
    for _ in range(1 if DRY_RUN else 5):
        for key, cfg in variants.items():
            times[key].append(bench_ms(lambda: gemm.grouped_gemm_contiguous(
                a8, b8, ends, out=out, config=cfg), args.rep))
    for key, ts in times.items():
        r[f"{key}_ms"] = sorted(ts)[len(ts) // 2]
    try:
        qa, sa = rowwise_fp8(a, 1)
        qb, sb = rowwise_fp8(b16, 2)  # [E, N] scales
        qbt = qb.transpose(-2, -1)
        torch._scaled_grouped_mm(qa, qbt, sa, sb, offs=ends, out_dtype=torch.bfloat16)
        r["scaled_grouped_mm_ms"] = bench_ms(
            lambda: torch._scaled_grouped_mm(qa, qbt, sa, sb, offs=ends, out_dtype=torch.bfloat16),
            args.rep)
    except Exception as ex:  # noqa: BLE001 - the baseline is optional (torch version)
        log.append(f"torch._scaled_grouped_mm unavailable: {type(ex).__name__}: {str(ex)[:120]}")
        r["scaled_grouped_mm_ms"] = None
    for key in ("bf16", "grouped_mm", "loop_mm", "scaled_grouped_mm", *variants):
        ms = r[f"{key}_ms"]
        r[f"{key}_tflops"] = tflops(m, n, k, ms) if ms else None
    cfg16 = gemm.contiguous_config(m, n, k, e, fp8=False)
    cfg8 = gemm.contiguous_config(m, n, k, e, fp8=True)
    r["bf16_config"], r["fp8_config"] = list(cfg16.__dict__.values()), list(cfg8.__dict__.values())
    if args.sweep and tokens in ((16,) if DRY_RUN else (128, 512)):
        for use_fp8, alts in CONTIG_ALT.items():
            extra = WS_ALT if use_fp8 and gemm.ws_available() is None else []
            for alt in [(*a_, False, t) for a_ in alts for t in (False, True)] + extra:
                cfg = gemm.GemmConfig(*alt)
                aa, bb = (a8, b8) if use_fp8 else (a, b16)
                try:
                    ms = bench_ms(lambda: gemm.grouped_gemm_contiguous(aa, bb, ends, out=out,
                                                                       config=cfg), args.rep)
                    tf = tflops(m, n, k, ms)
                except Exception as ex:  # noqa: BLE001 - e.g. out of shared memory
                    tf = None
                    log.append(f"config {alt} failed: {type(ex).__name__}: {str(ex)[:100]}")
                sweep.append({"layout": "contiguous", "shape": name, "tokens": tokens,
                              "fp8": use_fp8, "config": list(alt), "tflops": tf,
                              "heuristic_tflops": r["fp8_tflops" if use_fp8 else "bf16_tflops"]})
    return r


# ----------------------------------------------------------------------------- masked
def bench_masked(args, dev, weights, valid: int, name: str, hbm_gbps: float, log: list,
                 sweep: list) -> dict:
    n, k = SHAPES[name]
    e = args.experts
    b16, b8 = weights[name]
    a = (torch.randn(e, LL_M, k, device=dev) * 0.5).to(torch.bfloat16)
    count = torch.full((e,), valid, dtype=torch.int32, device=dev)
    q, s = gemm.quantize_fp8(a)  # column-major scales, as low-latency dispatch returns them
    a8 = (q, s)
    out = torch.empty(e, LL_M, n, dtype=torch.bfloat16, device=dev)
    r = {}
    o16 = gemm.grouped_gemm_masked(a, b16, count, expected_m=valid, out=out).clone()
    b16f = b16.float()
    r["bf16_check_rel_err"] = max(rel_err(o16[ex, :valid], a[ex, :valid].float() @ b16f[ex].T)
                                  for ex in (0, e - 1))
    del b16f
    o8 = gemm.grouped_gemm_masked(a8, b8, count, expected_m=valid, out=out)
    a8f, b8f = gemm._dequant_a((q[:1], s[:1])), gemm._dequant_b((b8[0][:1], b8[1][:1]))
    r["fp8_check_rel_err"] = rel_err(o8[0, :valid], a8f[0, :valid] @ b8f[0].T)
    del a8f, b8f
    if r["bf16_check_rel_err"] > 2e-2 or r["fp8_check_rel_err"] > 2e-2:
        raise RuntimeError(f"masked {name} {valid}: wrong results {r}")
    bytes16 = b16.numel() * 2
    bytes8 = b8[0].numel() + b8[1].numel() * 4
    r["bf16_ms"] = bench_ms(lambda: gemm.grouped_gemm_masked(a, b16, count, expected_m=valid,
                                                             out=out), args.rep)
    r["fp8_ms"] = bench_ms(lambda: gemm.grouped_gemm_masked(a8, b8, count, expected_m=valid,
                                                            out=out), args.rep)
    # torch._grouped_mm on the same tokens packed contiguously (it has no masked layout)
    ap = a[:, :valid].reshape(-1, k).contiguous()
    ends = torch.arange(1, e + 1, device=dev, dtype=torch.int32) * valid
    bt = b16.transpose(-2, -1)
    r["grouped_mm_ms"] = bench_ms(lambda: torch._grouped_mm(ap, bt, offs=ends), args.rep)
    r["bf16_hbm_gbps"] = bytes16 / (r["bf16_ms"] * 1e-3) / 1e9
    r["fp8_hbm_gbps"] = bytes8 / (r["fp8_ms"] * 1e-3) / 1e9
    r["grouped_mm_hbm_gbps"] = bytes16 / (r["grouped_mm_ms"] * 1e-3) / 1e9
    for key in ("bf16", "fp8", "grouped_mm"):
        r[f"{key}_hbm_fraction"] = r[f"{key}_hbm_gbps"] / hbm_gbps
    if args.sweep and valid in ((1,) if DRY_RUN else (1, 32, 64)):
        for use_fp8, alts in MASKED_ALT.items():
            for alt in [(*a_, t) for a_ in alts for t in (False, True)]:
                cfg = gemm.GemmConfig(*alt)
                aa, bb = (a8, b8) if use_fp8 else (a, b16)
                try:
                    ms = bench_ms(lambda: gemm.grouped_gemm_masked(aa, bb, count, out=out,
                                                                   config=cfg), args.rep)
                    frac = (bytes8 if use_fp8 else bytes16) / (ms * 1e-3) / 1e9 / hbm_gbps
                except Exception as ex:  # noqa: BLE001
                    frac = None
                    log.append(f"masked config {alt} failed: {type(ex).__name__}: {str(ex)[:100]}")
                sweep.append({"layout": "masked", "shape": name, "tokens": valid, "fp8": use_fp8,
                              "config": list(alt), "hbm_fraction": frac,
                              "heuristic_hbm_fraction": r["fp8_hbm_fraction" if use_fp8 else "bf16_hbm_fraction"]})
    return r


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    global DRY_RUN, LL_M
    args = parse_args(argv)
    if args.dry_run:
        DRY_RUN, LL_M = True, 16
        SHAPES.update(gate_up=(256, 128), down=(128, 128))
        args.experts, args.tokens, args.masked_tokens = 4, "16,32", "1,8"
        for alts in (*CONTIG_ALT.values(), *MASKED_ALT.values()):
            alts[:] = alts[:1]
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench/gemm.py needs a CUDA GPU (the kernels' CPU checks are tests/test_gemm.py; "
              "--dry-run checks this script on CPU)")
        return 1
    else:
        dev = torch.device("cuda", torch.cuda.current_device())
    t_start = time.time()
    ctx = common.BenchContext(0, 1, None, dev)
    tokens = common.parse_ints(args.tokens)
    masked_tokens = common.parse_ints(args.masked_tokens)
    log: list[str] = []
    sweep: list[dict] = []
    print(f"=== gemm: {common.device_name(ctx)}, {args.experts} experts, shapes (N, K) "
          f"{SHAPES}", flush=True)
    hbm = measure_hbm_read(dev, args.rep)
    print(f"HBM read: {hbm['hbm_read_gbps']:.0f} GB/s (torch.sum {hbm['torch_sum_gbps']:.0f}, "
          f"Triton {hbm['triton_read_gbps']:.0f})", flush=True)
    weights = make_weights(dev, args.experts)

    contiguous = {name: {} for name in SHAPES}
    for name in SHAPES:
        for t in tokens:
            contiguous[name][t] = bench_contiguous(args, dev, weights, t, name, log, sweep)
        rows = [[t, c["bf16_tflops"], c["grouped_mm_tflops"], c["loop_mm_tflops"],
                 c["bf16_tflops"] / c["grouped_mm_tflops"], c["fp8_tflops"], c["fp8_triton_tflops"],
                 "/".join(f"{c[f'fp8_ws{st}_tflops']:.0f}" if c.get(f"fp8_ws{st}_tflops") else "-"
                          for st in (2, 3, 4)),
                 c["scaled_grouped_mm_tflops"], str(c["bf16_config"]), str(c["fp8_config"])]
                for t, c in contiguous[name].items()]
        common.print_table(None, ["tokens/expert", "ours bf16", "_grouped_mm", "loop mm",
                                  "ours/_grouped_mm", "ours fp8", "fp8 Triton kernel",
                                  "fp8 warp-spec. 2/3/4 stages",
                                  "_scaled_grouped_mm rowwise",
                                  "bf16 config", "fp8 config"], rows,
                           f"\ncontiguous {name} (N={SHAPES[name][0]}, K={SHAPES[name][1]}), TFLOP/s")
        print(f"[{time.time() - t_start:.0f} s]", flush=True)

    masked = {name: {} for name in SHAPES}
    for name in SHAPES:
        for v in masked_tokens:
            masked[name][v] = bench_masked(args, dev, weights, v, name, hbm["hbm_read_gbps"],
                                           log, sweep)
        rows = [[v, c["bf16_ms"] * 1e3, c["bf16_hbm_fraction"], c["fp8_ms"] * 1e3,
                 c["fp8_hbm_fraction"], c["grouped_mm_hbm_fraction"]]
                for v, c in masked[name].items()]
        common.print_table(None, ["valid tokens/expert", "bf16 us", "bf16 HBM frac", "fp8 us",
                                  "fp8 HBM frac", "_grouped_mm HBM frac"], rows,
                           f"\nmasked {name} [{args.experts}, {LL_M}, K={SHAPES[name][1]}] -> "
                           f"N={SHAPES[name][0]}, weight bytes / time / HBM read bandwidth")
        print(f"[{time.time() - t_start:.0f} s]", flush=True)

    if sweep:
        rows = [[s["layout"], s["shape"], s["tokens"], "fp8" if s["fp8"] else "bf16",
                 str(s["config"]), s.get("tflops", s.get("hbm_fraction")),
                 s.get("heuristic_tflops", s.get("heuristic_hbm_fraction"))] for s in sweep]
        common.print_table(None, ["layout", "shape", "tokens", "dtype", "config (bm,bn,bk,w,s,swap,tma)",
                                  "alt (TFLOP/s | HBM frac)", "heuristic"], rows,
                           "\nblock configuration sweep (alternatives vs the heuristic's choice)")

    # headline figures and targets
    c512 = contiguous["gate_up"].get(512) or next(reversed(contiguous["gate_up"].values()))
    ratios = [c["bf16_tflops"] / c["grouped_mm_tflops"] for s in contiguous.values() for c in s.values()]
    fracs16 = [c["bf16_hbm_fraction"] for s in masked.values() for c in s.values()]
    fracs8 = [c["fp8_hbm_fraction"] for s in masked.values() for c in s.values()]
    figures = {
        "bf16_tflops": c512["bf16_tflops"],
        "baseline_bf16_tflops": c512["grouped_mm_tflops"],
        "fp8_tflops": c512["fp8_tflops"],
        "bf16_down_tflops": (contiguous["down"].get(512) or {}).get("bf16_tflops"),
        "fp8_down_tflops": (contiguous["down"].get(512) or {}).get("fp8_tflops"),
        "bf16_vs_grouped_mm_min_ratio": min(ratios),
        "masked_hbm_fraction": min(fracs16),
        "masked_fp8_hbm_fraction": min(fracs8),
        "hbm_read_gbps": hbm["hbm_read_gbps"],
    }
    # What ep_comm.moe.cost_model takes from this run: HBM bandwidth and, per dtype, the fraction of
    # it at which the masked GEMM streams weights in the decode regime (<= 4 valid rows).
    def stream_fraction(key):
        fr = [c[key] for s in masked.values() for v, c in s.items() if v <= 4]
        return sum(fr) / len(fr) if fr else None
    calibration = {"hbm_gbps": hbm["hbm_read_gbps"],
                   "weight_stream_fraction_bf16": stream_fraction("bf16_hbm_fraction"),
                   "weight_stream_fraction_fp8": stream_fraction("fp8_hbm_fraction")}
    checks = [
        ("BF16 >= 0.9x torch._grouped_mm at every size", min(ratios) >= 0.9, f"min {min(ratios):.2f}x"),
        ("BF16 >= 550 TFLOP/s at 512 tokens/expert (gate_up)", c512["bf16_tflops"] >= 550,
         f"{c512['bf16_tflops']:.0f}"),
        ("FP8 >= 1000 TFLOP/s at 512 tokens/expert (gate_up)", c512["fp8_tflops"] >= 1000,
         f"{c512['fp8_tflops']:.0f}"),
        ("masked BF16 >= 75% of HBM read bandwidth", min(fracs16) >= 0.75, f"min {min(fracs16):.2f}"),
        ("masked FP8 >= 75% of HBM read bandwidth", min(fracs8) >= 0.75, f"min {min(fracs8):.2f}"),
    ]
    common.print_table(None, ["target", "met", "measured"],
                       [[n, "yes" if ok else "NO", v] for n, ok, v in checks], "\ntargets")
    log = list(dict.fromkeys(log))
    for line in log:
        print("note:", line)
    config = {"hidden": SHAPES["down"][0], "intermediate": SHAPES["down"][1],
              "num_local_experts": args.experts, "dry_run": DRY_RUN,
              "tokens_per_expert": tokens, "masked_valid_tokens": masked_tokens,
              "masked_max_tokens": LL_M, "shapes": {k: {"N": v[0], "K": v[1]} for k, v in SHAPES.items()},
              "torch": torch.__version__, "triton": triton.__version__}
    path = common.write_result(ctx, args.out, "gemm", "kernels", config, figures,
                               contiguous={k: {str(t): v for t, v in d.items()} for k, d in contiguous.items()},
                               masked={k: {str(t): v for t, v in d.items()} for k, d in masked.items()},
                               hbm=hbm, sweep=sweep, targets={n: ok for n, ok, _ in checks},
                               calibration=calibration,
                               notes=log)
    print(f"\nwrote {path} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
