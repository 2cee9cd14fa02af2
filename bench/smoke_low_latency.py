"""Smoke test of the low-latency kernels (GPU): correctness against the oracle and the
reference backend on a few cases, then timings at the decode shape.

    torchrun --nproc-per-node=N bench/smoke_low_latency.py [--skip-timing] [--iters 30]

Every case prints PASS or FAIL (with the first rank's error) on rank 0; the exit code is 1 if
any case failed. Cases (``tests/low_latency_cases.py`` tasks, checked against the oracle of
``tests/oracle.py``: dispatch bit-exact, combine within bf16 rounding):

* bf16 and fp8 (plain, round_scale, ue8m0), hook and non-hook, allow_nvlink True and False,
  zero-copy and ``out=``, a rank with 0 tokens, stats, two results alive, a masked rank,
  a CUDA graph of dispatch + combine replayed with new data;
* the decode shape (128 tokens/rank, hidden 7168, top-8 of 256, fp8) compared field by field
  with the reference backend (``backend="reference"`` over NCCL) on the same inputs.

Timings at the decode shape, for allow_nvlink True and False (see ``timings``), as DeepEP's
test_low_latency times: the dispatch (fp8) and combine (bf16) kernels' durations from
torch.profiler (kineto), the end-to-end time of dispatch + combine between CUDA events with the
host work hidden behind a long GPU sleep, the host (Python) time of each call, and the list of
every GPU activity per dispatch + combine. Targets on 2x H200: 21 / 31 / 52 us.

Each ``Buffer`` is destroyed after its case; symmetric memory is pooled and reused
(ep_comm/nvshmem.py), so cases after the first allocate nothing collectively.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import low_latency_cases as llc  # noqa: E402
from low_latency_cases import LLCase  # noqa: E402

SHAPE = dict(max_tokens=128, hidden=7168, num_experts=256, num_topk=8)


@dataclasses.dataclass
class Ctx:
    """What the tasks of tests/low_latency_cases.py read (like tests/multiproc.RankContext)."""
    rank: int
    world_size: int
    group: object
    device: torch.device


class _LowLatencyOnly:
    """Routes the low-latency calls of a Buffer to a LowLatencyRuntime. Used only when the
    kernels backend cannot be built because its normal-mode runtime is not there yet, so that
    this smoke test still checks low-latency mode through the public Buffer methods."""

    name = "kernels(low-latency only)"

    def __init__(self, runtime):
        self.ll = runtime

    def __getattr__(self, name):
        if name in ("low_latency_dispatch", "low_latency_combine", "mask_buffer",
                    "get_next_low_latency_combine_buffer", "clean_low_latency_buffer"):
            return getattr(self.ll, name)
        raise AttributeError(name)

    def comm_stream(self):
        return None

    def destroy(self):
        self.ll.destroy()


def make_kernels_buffer(group, rdma_bytes: int, nvlink: bool):
    import ep_comm
    try:
        return ep_comm.Buffer(group, num_rdma_bytes=rdma_bytes, low_latency_mode=True,
                              allow_nvlink_for_low_latency_mode=nvlink, backend="kernels",
                              explicitly_destroy=True)
    except ImportError as e:
        if "intranode" not in str(e):
            raise
    from ep_comm.backends.kernels.low_latency import LowLatencyRuntime
    buf = ep_comm.Buffer(group, num_rdma_bytes=rdma_bytes, low_latency_mode=True,
                         backend="reference", explicitly_destroy=True)
    buf._backend.destroy()
    buf._backend = _LowLatencyOnly(LowLatencyRuntime(buf.comm, rdma_bytes, nvlink))
    buf.backend_name = "kernels"
    return buf


def _buffer_for_case(ctx, case: LLCase):
    import ep_comm
    hint = ep_comm.Buffer.get_low_latency_rdma_size_hint(case.max_tokens, case.hidden,
                                                         ctx.world_size, case.num_experts)
    if case.backend == "reference":
        return ep_comm.Buffer(ctx.group, num_rdma_bytes=hint, low_latency_mode=True,
                              backend="reference", explicitly_destroy=True)
    return make_kernels_buffer(ctx.group, hint, case.nvlink)


# The tasks build their Buffer through this module-level function.
llc.make_buffer = _buffer_for_case


def compare_with_reference(ctx, case: LLCase):
    """Same inputs through the kernels and the reference backend: every dispatch field equal
    (valid rows only), combine within bf16 rounding of each other."""
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    inputs = [llc.make_inputs(case, s, r, 0) for s in range(r)]
    x, idx, w = (t.to(dev) for t in inputs[me])
    results = []
    # The reference first: a kernels failure on one rank then cannot leave the other ranks
    # inside a collective of the reference (kernel waits end in a timeout instead).
    for backend in ("reference", "kernels"):
        c = dataclasses.replace(case, backend=backend)
        buf = _buffer_for_case(ctx, c)
        try:
            recv, count, handle, hook = llc._dispatch(buf, c, x, idx)
            if hook is not None:
                hook()
            y = llc.expert_outputs(c, recv, count, dev, me, r)
            combined = llc._combine(buf, c, y, idx, w, handle, dev)
            torch.cuda.synchronize()
            llc.check_status(buf)
            results.append((recv, count.cpu(), handle, combined.cpu()))
        finally:
            buf.destroy()
    (rr, rc, rh, rout), (kr, kc, kh, kout) = results
    assert torch.equal(kc, rc), f"recv_count {kc.tolist()} != reference {rc.tolist()}"
    assert torch.equal(kh.range_count.cpu(), rh.range_count.cpu()), "range_count differs"
    local = case.num_experts // r
    for e in range(local):
        n = int(kc[e])
        for s in range(r):
            kb, rb = int(kh.range_begin[e, s]), int(rh.range_begin[e, s])
            c = int(kh.range_count[e, s])
            if c == 0:
                continue
            ks, rs = slice(kb, kb + c), slice(rb, rb + c)
            assert torch.equal(kh.src_info[e, ks].cpu(), rh.src_info[e, rs].cpu()), \
                f"expert {e} source {s}: source indices differ"
            if case.fp8:
                assert torch.equal(kr[0][e, ks].view(torch.uint8).cpu(),
                                   rr[0][e, rs].view(torch.uint8).cpu()), \
                    f"expert {e} source {s}: fp8 payload differs"
                assert torch.equal(kr[1][e, ks].cpu(), rr[1][e, rs].cpu()), \
                    f"expert {e} source {s}: fp8 scales differ"
            else:
                assert torch.equal(kr[e, ks].cpu(), rr[e, rs].cpu()), \
                    f"expert {e} source {s}: rows differ"
        assert bool((kh.src_info[e, n:] == -1).all()), f"expert {e}: src_info past count"
    diff = (kout.float() - rout.float()).abs()
    tol = rout.float().abs() * 2 ** -7 + 1e-6
    assert bool((diff <= tol).all()), f"combine differs from the reference by {diff.max():.3g}"


def cases(world: int) -> list[tuple[str, object, tuple]]:
    """(name, task, args) of every correctness case."""
    small = dict(max_tokens=32, num_tokens=20, ragged=5, hidden=2048, num_experts=8 * world,
                 num_topk=6)
    out = [
        ("bf16 nvlink", llc.task_ll_rounds, (LLCase(seed=1, backend="kernels", iterations=3,
                                                    **small),)),
        ("bf16 put-only hook zero_copy", llc.task_ll_rounds,
         (LLCase(seed=2, backend="kernels", nvlink=False, hook=True, zero_copy=True,
                 iterations=2, **small),)),
        ("fp8 nvlink hook out=", llc.task_ll_rounds,
         (LLCase(seed=3, backend="kernels", fp8=True, hook=True, use_out=True, iterations=2,
                 **small),)),
        ("fp8 round_scale ue8m0 put-only", llc.task_ll_rounds,
         (LLCase(seed=4, backend="kernels", fp8=True, round_scale=True, ue8m0=True,
                 nvlink=False, iterations=2, **small),)),
        ("fp8 rank with 0 tokens + stats", llc.task_ll_rounds,
         (LLCase(seed=5, backend="kernels", fp8=True, routing="empty_rank1", stats=True,
                 iterations=2, **small),)),
        ("bf16 top-9 dup experts", llc.task_ll_rounds,
         (LLCase(seed=6, backend="kernels", num_topk=9, routing="dup", max_tokens=16,
                 hidden=1024, num_experts=16 * world),)),
        ("fp8 two results alive (hook)", llc.task_ll_two_alive,
         (LLCase(seed=7, backend="kernels", fp8=True, hook=True, **small),)),
        ("graph replay fp8", llc.task_ll_graph,
         (LLCase(seed=8, backend="kernels", fp8=True, **small),)),
        ("graph replay bf16 hook put-only", llc.task_ll_graph,
         (LLCase(seed=9, backend="kernels", hook=True, nvlink=False, **small),)),
        ("decode shape fp8 vs reference", compare_with_reference,
         (LLCase(seed=10, backend="kernels", fp8=True, num_tokens=128, ragged=0, drop=0.0,
                 **SHAPE),)),
        ("decode shape bf16 hook vs reference", compare_with_reference,
         (LLCase(seed=11, backend="kernels", hook=True, num_tokens=100, ragged=28,
                 **SHAPE),)),
    ]
    if world > 1:
        out.append(("masked rank", llc.task_ll_masked,
                    (LLCase(seed=12, backend="kernels", **small), world - 1)))
    return out


def agree(ctx, ok: bool, msg: str) -> tuple[bool, str]:
    every = [None] * ctx.world_size
    dist.all_gather_object(every, (ok, msg), group=ctx.group)
    bad = [(r, m) for r, (o, m) in enumerate(every) if not o]
    return (not bad), (f"rank {bad[0][0]}: {bad[0][1]}" if bad else "")


# GPU cycles of the sleep before every timed call: ~2 ms at H200 clocks, far above the host
# time of a dispatch + combine, so the calls are enqueued before the GPU reaches them and the
# end-to-end figure is GPU time only (printed beside the host time to show it holds).
SLEEP_CYCLES = 4_000_000
# Kernels of the timing harness itself (the barrier's all-reduce and the sleep), not of a call.
HARNESS_KERNELS = ("nccl", "sleep", "spin")


def _is_harness(name: str) -> bool:
    low = name.lower()
    return any(h in low for h in HARNESS_KERNELS)


def _device_kernels(prof) -> list[tuple[str, float, float]]:
    """(name, start_us, duration_us) of every GPU activity (kernels, memsets, copies) in a
    torch.profiler run, in start order."""
    out = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out.append((ev.name, ev.time_range.start, ev.time_range.end - ev.time_range.start))
    return sorted(out, key=lambda k: k[1])


def timings(ctx, nvlink: bool, iters: int) -> dict:
    """At the decode shape (fp8 dispatch, bf16 combine), as DeepEP's test_low_latency times:

    * kernel time (torch.profiler / kineto durations) of the dispatch and the combine kernels,
      each call of dispatch + combine preceded by a barrier and a long GPU sleep;
    * end-to-end time of dispatch + combine between two CUDA events, the host work hidden
      behind the sleep;
    * host (Python) time of each call;
    * every GPU activity launched per call (beyond the harness's barrier and sleep), so extra
      small kernels (fills, copies, allocations' memsets) show up.
    """
    m, h, e, k = SHAPE["max_tokens"], SHAPE["hidden"], SHAPE["num_experts"], SHAPE["num_topk"]
    dev, r = ctx.device, ctx.world_size
    import ep_comm
    buf = make_kernels_buffer(ctx.group, ep_comm.Buffer.get_low_latency_rdma_size_hint(
        m, h, r, e), nvlink)
    g = torch.Generator(device=dev).manual_seed(100 + ctx.rank)
    x = torch.randn(m, h, device=dev, generator=g).to(torch.bfloat16)
    scores = torch.rand(m, e, device=dev, generator=g)
    idx = scores.topk(k, dim=1).indices.to(torch.int64)
    w = torch.rand(m, k, device=dev, generator=g)
    y = torch.randn(e // r, r * m, h, device=dev, generator=g).to(torch.bfloat16)
    flag = torch.zeros(1, device=dev)
    host = {"dispatch": [], "combine": []}

    def sync():
        torch.cuda.synchronize(dev)
        dist.all_reduce(flag, group=ctx.group)
        torch.cuda._sleep(SLEEP_CYCLES)  # the host enqueues the work while this runs

    def step():
        """dispatch + combine, as DeepEP's test_func (non-hook), with their host times."""
        t0 = time.perf_counter()
        d = buf.low_latency_dispatch(x, idx, m, e, use_fp8=True)
        t1 = time.perf_counter()
        buf.low_latency_combine(y, idx, w, d[2])
        t2 = time.perf_counter()
        host["dispatch"].append((t1 - t0) * 1e6)
        host["combine"].append((t2 - t1) * 1e6)

    res: dict = {}
    try:
        for _ in range(5):  # warm-up: module load, caching allocator, NVSHMEM first touch
            sync()
            step()
        torch.cuda.synchronize(dev)
        host["dispatch"].clear()
        host["combine"].clear()

        # End to end: events around dispatch + combine, after the sleep.
        e2e = []
        for _ in range(iters):
            sync()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            e2e.append(a.elapsed_time(b) * 1e3)

        # Kernel durations from the profiler.
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                sync()
                step()
            torch.cuda.synchronize(dev)
        acts = [a for a in _device_kernels(prof) if not _is_harness(a[0])]
        per_name: dict[str, list[float]] = {}
        for name, _, dur in acts:
            per_name.setdefault(name, []).append(dur)
        torch.cuda.synchronize(dev)
        llc.check_status(buf)
    finally:
        buf.destroy()
    disp = [d for n, ds in per_name.items() if n.startswith("ep_ll_dispatch") for d in ds]
    comb = [d for n, ds in per_name.items() if n.startswith("ep_ll_combine") for d in ds]
    res["kernel_dispatch"] = statistics.median(disp) if disp else float("nan")
    res["kernel_combine"] = statistics.median(comb) if comb else float("nan")
    res["e2e_both"] = statistics.median(e2e)
    res["host_dispatch"] = statistics.median(host["dispatch"])
    res["host_combine"] = statistics.median(host["combine"])
    res["sleep_us_est"] = SLEEP_CYCLES / 1.98e3  # at the H200's 1.98 GHz boost clock
    # Activities per dispatch + combine step: anything but one dispatch and one combine kernel
    # is work to remove.
    res["per_step"] = {n: (len(ds) / iters, statistics.median(ds)) for n, ds in per_name.items()}
    return res


def _report(say, nvlink: bool, every: list[dict]) -> None:
    world = len(every)
    mean = {k: sum(d[k] for d in every) / world for k in every[0] if k != "per_step"}
    say(f"TIME  nvlink={str(nvlink):5s} 128 tok/rank h7168 top8/256 (mean over ranks, median "
        f"over runs; targets 21 / 31 / 52 us on 2x H200)")
    say(f"      kernel (kineto): dispatch(fp8) {mean['kernel_dispatch']:.1f} us  combine(bf16) "
        f"{mean['kernel_combine']:.1f} us  sum {mean['kernel_dispatch'] + mean['kernel_combine']:.1f} us")
    say(f"      end to end (events, host hidden by a ~{mean['sleep_us_est']:.0f} us sleep): "
        f"dispatch+combine {mean['e2e_both']:.1f} us")
    say(f"      host (Python) per call: dispatch {mean['host_dispatch']:.1f} us  combine "
        f"{mean['host_combine']:.1f} us")
    if mean["host_dispatch"] + mean["host_combine"] > mean["sleep_us_est"]:
        say("      WARNING: host time exceeds the sleep: the end-to-end figure includes host time")
    say("      GPU activities per dispatch+combine (rank 0; harness barrier/sleep excluded):")
    for name, (per, med) in sorted(every[0]["per_step"].items(), key=lambda kv: -kv[1][0]):
        say(f"        {per:5.2f} x  {med:8.1f} us  {name[:100]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    args = ap.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    os.environ.setdefault("EP_COMM_TIMEOUT_S", "10")
    # Two decode-shape buffers (nvlink on and off) may be alive in the pool: size the heap once.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(8 << 30))
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    ctx = Ctx(rank, world, dist.group.WORLD, dev)

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    t_start = time.monotonic()
    failed = 0
    for name, task, task_args in cases(world):
        if args.only and args.only not in name:
            continue
        t0 = time.monotonic()
        try:
            task(ctx, *task_args)
            ok, msg = True, ""
        except Exception as e:  # reported with its rank below; the other cases still run
            ok, msg = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        ok, msg = agree(ctx, ok, msg)
        failed += not ok
        say(f"{'PASS' if ok else 'FAIL'}  {name:40s} {time.monotonic() - t0:6.2f} s  {msg[:400]}")
        if not ok and "Timeout" in msg:
            say("  (a timeout leaves the buffer failed; later cases use a fresh one)")
    if not args.skip_timing:
        for nvlink in (True, False):
            try:
                res = (True, timings(ctx, nvlink, args.iters))
            except Exception as e:  # every rank still joins the gather below
                traceback.print_exc()
                res = (False, f"{type(e).__name__}: {e}")
            every = [None] * world
            dist.all_gather_object(every, res, group=ctx.group)
            bad = [(r, m) for r, (ok, m) in enumerate(every) if not ok]
            if bad:
                failed += 1
                say(f"FAIL  timing nvlink={nvlink}: rank {bad[0][0]}: {bad[0][1][:400]}")
                continue
            _report(say, nvlink, [d for _, d in every])
    dist.barrier()
    # Every Buffer is destroyed and every rank is here: free the symmetric pool and finalize
    # NVSHMEM (collective), so that the exit is clean.
    from ep_comm.runtime import nvshmem
    try:
        nvshmem.finalize()
    except Exception as e:  # the results above stand; say why the exit is not clean
        failed += 1
        say(f"FAIL  nvshmem finalize: {type(e).__name__}: {e}")
    say(f"{'ALL PASS' if not failed else f'{failed} FAILED'} in {time.monotonic() - t_start:.1f} s")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
