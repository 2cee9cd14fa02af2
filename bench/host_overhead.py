"""Host (Python) time per call of the kernels backend, against the targets of issue #22.

Three parts, one run (about a minute on one H200; ``--quick``: a few seconds, part c skipped),
in the order a, c, b (part b's CUDA profiler can stay attached to the process afterwards):

a. Host time per call, 128 tokens x 7168, top-8 of 256 (``--tokens`` ...): each call runs
   ``--calls`` times back to back with no synchronisation in the loop (a small batch keeps the
   GPU busy behind the host, so the loop's wall time per call is the host's); the figure is the
   median of 3 such loops. Calls: ``get_dispatch_layout``, dispatch from the layout (and, on
   its own, the host's wait for the notify kernel's counts, ``last_count_wait_ns`` of the
   NVLink runtime), cached dispatch (``handle=``), dispatch with ``num_worst_tokens``, combine,
   and low-latency dispatch / combine (a ``low_latency_mode`` Buffer; timed in pairs, each call
   on its own clock, since a low-latency combine belongs to one dispatch). Then a cProfile of
   each loop by own time (not with ``--quick``).
b. DeepEP's way of timing, 4096 tokens (``--event-tokens``): CUDA events around each call, back
   to back, with L2 flushed before each (a 256 MiB ``zero_``): ``<call>_event_us``. Next to it,
   the GPU time of the call's kernels, ``<call>_kernel_us``: the sum of the durations of the
   kernels it launched, from the CUDA profiler (torch.profiler / kineto; the flush kernel left
   out), per call; ``<call>_event_over_kernel`` is the ratio (target <= 1.15). Where the
   profiler records no kernel, the kernel time is taken instead with the host queued ahead:
   events around the call behind a 2 ms spin kernel (``kernel_method`` in the JSON says which).
   ``<call>_queued_us`` is that measure for every call: the events with no host time in them.
c. MoE layer host time per step (``ep_comm.moe``, DeepSeek-V3 shapes: hidden 7168, expert
   intermediate 2048, 256 experts, top-8, FP8 weights with 128 x 128 block scales, Triton GEMMs):
   ``moe_ep_low_latency`` at 128 decode tokens (``moe_decode_host_ms``) and ``moe_ep_normal``
   with ``num_worst_tokens`` at 4096 prefill tokens (``moe_prefill_host_ms``); the wall time of
   one call started with the GPU idle, median of ``--moe-iters`` (the targets' figure); beside
   it ``moe_{decode,prefill}_queued_host_ms``, the host time per step of ``--moe-iters`` steps
   back to back with no synchronisation (part a's way), median of 3 loops. The weights are
   random bytes (the host path does not depend on their values).

``--moe-only`` runs part c alone, with a cProfile of each step, and writes
``host_overhead_moe-kernels-...json`` (the full run's file is left as it is).

``--fake-gpu`` runs part a on CPU through tests/fake_gpu.py (the real Python of Buffer and the
runtimes; launches are recorded, not run): a check of the host path where there is no GPU, not
a measurement of one, so it prints and writes nothing.

    python bench/host_overhead.py                       # 1 GPU, writes the JSON
    python bench/host_overhead.py --quick               # quick suite
    python bench/host_overhead.py --fake-gpu --quick    # CPU, no GPU needed

Writes ``bench/results/host_overhead-kernels-<ranks>r-<device>.json`` with the issue's
``targets`` beside the figures.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

if "--fake-gpu" in sys.argv and "--cpu" not in sys.argv:
    sys.argv.append("--cpu")

import common  # noqa: E402
import torch  # noqa: E402

import ep_comm  # noqa: E402

#: Issue #22's targets: host us per call (part a), ms per MoE step (part c), and the largest
#: ratio of DeepEP-style event time to kernel GPU time (part b).
TARGETS = {
    "layout_host_us": 15.0,
    "dispatch_cached_host_us": 20.0,
    "combine_host_us": 20.0,
    "dispatch_worst_host_us": 25.0,
    "dispatch_host_minus_wait_us": 40.0,
    "ll_dispatch_host_us": 15.0,
    "ll_combine_host_us": 15.0,
    "moe_decode_host_ms": 0.3,
    "moe_prefill_host_ms": 0.6,
    "layout_event_over_kernel": 1.15,
    "dispatch_cached_event_over_kernel": 1.15,
    "dispatch_worst_event_over_kernel": 1.15,
    "combine_event_over_kernel": 1.15,
}
HOST_CALLS = ("layout", "dispatch", "dispatch_cached", "dispatch_worst", "combine")
#: The calls of part a with a C++ host path besides the layout (kernels/host/host_path.cpp):
#: the dispatches (counted in ``normal_calls_through_cpp``) and the combine
#: (``combine_calls_through_cpp``).
NORMAL_CPP_CALLS = ("dispatch", "dispatch_cached", "dispatch_worst")
COMBINE_CPP_CALLS = ("combine",)
EVENT_CALLS = ("layout", "dispatch_cached", "dispatch_worst", "combine")
FLUSH_BYTES = 256 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank, part a")
    p.add_argument("--event-tokens", type=int, default=4096, help="tokens per rank, part b")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2048, help="expert intermediate, part c")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="tokens per rank, part c")
    p.add_argument("--calls", type=int, default=None, help="calls per timed loop (default 300, "
                                                           "--quick 50)")
    p.add_argument("--event-calls", type=int, default=None, help="timed calls of part b "
                                                                 "(default 30, --quick 10)")
    p.add_argument("--moe-iters", type=int, default=10)
    p.add_argument("--top", type=int, default=10, help="functions listed from each profile")
    p.add_argument("--quick", action="store_true", help="fewer calls, no profile, no MoE part")
    p.add_argument("--moe-only", action="store_true",
                   help="part c alone (the MoE layer's host time and its profile)")
    p.add_argument("--fake-gpu", action="store_true",
                   help="part a on CPU through tests/fake_gpu.py (nothing written)")
    a = p.parse_args(argv)
    a.calls = a.calls or (50 if a.quick else 300)
    a.event_calls = a.event_calls or (10 if a.quick else 30)
    return a


# ----------------------------------------------------------------------------- inputs
def routing(tokens, hidden, experts, topk, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, device=device).to(torch.bfloat16)
    scores = torch.rand(tokens, experts, generator=g, device=device)
    idx = scores.topk(topk, dim=1).indices.to(torch.int64)
    w = torch.rand(tokens, topk, generator=g, device=device)
    return x, idx, w


def normal_calls(buf, x, idx, w, experts, num_ranks):
    """{name: zero-argument call} of the normal-mode calls on these inputs, and the NVLink
    runtime (for ``last_count_wait_ns``)."""
    lay = buf.get_dispatch_layout(idx, experts)
    kw = dict(num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1],
              is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=idx,
              topk_weights=w)
    recv = buf.dispatch(x, **kw)
    handle, y = recv[4], recv[0]
    worst = x.shape[0] * num_ranks
    return {
        "layout": lambda: buf.get_dispatch_layout(idx, experts),
        "dispatch": lambda: buf.dispatch(x, **kw),
        "dispatch_cached": lambda: buf.dispatch(x, handle=handle),
        "dispatch_worst": lambda: buf.dispatch(x, **kw, num_worst_tokens=worst),
        "combine": lambda: buf.combine(y, handle),
    }


# ----------------------------------------------------------------------------- part a
def host_loops(fn, calls, sync, runs=3, warmup=10):
    """Seconds per call of ``runs`` loops of ``calls`` calls (no sync inside a loop)."""
    for _ in range(warmup):
        fn()
    sync()
    per_run = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_run.append((time.perf_counter() - t0) / calls)
        sync()
    return per_run


def profile_text(fn, calls, sync, top):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    sync()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return "\n".join(out.getvalue().splitlines()[:12 + top])


def part_a(a, buf, ll_buf, device, num_ranks, sync, profiles):
    """Host us per call of the normal-mode and low-latency calls (figures dict)."""
    f = {}
    x, idx, w = routing(a.tokens, a.hidden, a.experts, a.topk, device, a.seed)
    fns = normal_calls(buf, x, idx, w, a.experts, num_ranks)
    rt = buf.backend.normal
    waits = []

    def dispatch_counting_wait():
        out = fns["dispatch"]()
        waits.append(rt.last_count_wait_ns)
        return out

    timed = dict(fns, dispatch=dispatch_counting_wait)
    host = buf._normal_host  # the C++ host path of the dispatches and the combine, if loaded
    before = host.calls if host is not None else 0
    before_combine = host.combine_calls if host is not None else 0
    for name in HOST_CALLS:
        waits.clear()
        runs = host_loops(timed[name], a.calls, sync)
        f[f"{name}_host_us"] = statistics.median(runs) * 1e6
        if name == "dispatch":
            # the waits of the timed loops only (the warm-up's first 10 left out)
            f["dispatch_count_wait_us"] = statistics.mean(waits[10:]) / 1e3
            f["dispatch_host_minus_wait_us"] = f["dispatch_host_us"] - f["dispatch_count_wait_us"]
        if profiles is not None:
            profiles[name] = profile_text(fns[name], a.calls, sync, a.top)
    # The dispatches' and the combine's timed calls (warm-up included; the profiles' calls
    # less) through C++, then the same calls on the Python path of the same Buffer, for the
    # column that shows what the extension buys.
    for figure, names, counter, start in (
            ("normal_calls_through_cpp", NORMAL_CPP_CALLS, "calls", before),
            ("combine_calls_through_cpp", COMBINE_CPP_CALLS, "combine_calls", before_combine)):
        profiled = len(names) * a.calls if profiles is not None else 0
        f[figure] = ((getattr(host, counter) - start - profiled) / (len(names) * (10 + 3 * a.calls))
                     if host is not None else 0.0)
    if host is not None:
        # Where the C++ dispatches' host time goes: summed by stage inside the extension; the
        # rest of a call's host time is Python and pybind's argument conversion.
        for name in NORMAL_CPP_CALLS:
            stages = host.stage_times(fns[name], a.calls)
            for stage, us in stages.items():
                if stage != "calls":
                    f[f"{name}_cpp_{stage}_us"] = us
            f[f"{name}_outside_cpp_us"] = f[f"{name}_host_us"] - sum(
                us for stage, us in stages.items() if stage != "calls")
        buf._normal_host = None
        try:
            for name in NORMAL_CPP_CALLS + COMBINE_CPP_CALLS:
                runs = host_loops(fns[name], a.calls, sync)
                f[f"{name}_python_host_us"] = statistics.median(runs) * 1e6
        finally:
            buf._normal_host = host
    if ll_buf is not None:
        f.update(ll_host(a, ll_buf, x, idx, w, sync, profiles))
    return f


def ll_host(a, buf, x, idx, w, sync, profiles):
    """Low-latency dispatch and combine, timed in pairs, each on its own clock: the median
    over 3 loops of the mean per call."""
    m, e = x.shape[0], a.experts
    local = e // buf.group_size
    y = torch.randn(local, buf.group_size * m, a.hidden, device=x.device).to(torch.bfloat16)
    clock = time.perf_counter_ns

    def pair(times=None):
        t0 = clock()
        handle = buf.low_latency_dispatch(x, idx, m, e, use_fp8=True)[2]
        t1 = clock()
        buf.low_latency_combine(y, idx, w, handle)
        t2 = clock()
        if times is not None:
            times[0] += t1 - t0
            times[1] += t2 - t1

    def loops():
        for _ in range(10):
            pair()
        sync()
        runs = []
        for _ in range(3):
            times = [0, 0]
            for _ in range(a.calls):
                pair(times)
            runs.append(times)
            sync()
        return (statistics.median(r[0] for r in runs) / a.calls / 1e3,
                statistics.median(r[1] for r in runs) / a.calls / 1e3)

    # The default path first (the C++ host path where it loaded: kernels/host), then the
    # Python path on the same Buffer, for the column that shows what the extension buys.
    host = buf._ll_host
    before = host.calls if host is not None else 0
    f = dict(zip(("ll_dispatch_host_us", "ll_combine_host_us"), loops()))
    f["ll_calls_through_cpp"] = ((host.calls - before) / (2 * (10 + 3 * a.calls))
                                 if host is not None else 0.0)
    if profiles is not None:
        profiles["ll_dispatch+ll_combine"] = profile_text(pair, a.calls, sync, a.top)
    if host is not None:
        buf._ll_host = None
        try:
            f.update(zip(("ll_dispatch_python_host_us", "ll_combine_python_host_us"), loops()))
        finally:
            buf._ll_host = host
    return f


# ----------------------------------------------------------------------------- part b
def event_times_us(fn, n, flush):
    """DeepEP's timing: L2 flush, start event, the call, end event, back to back; median us."""
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    for s, e in ev:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev)


def kernel_names_and_us(fn, n, flush):
    """{kernel name: total us} of the GPU kernels that ``n`` flushed calls ran (kineto)."""
    from torch.autograd import DeviceType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            flush.zero_()
            if fn is not None:
                fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out[e.name] = out.get(e.name, 0.0) + e.time_range.elapsed_us()
    return out


def queued_kernel_us(fn, n, flush):
    """GPU time of the call with the host queued ahead (events behind a 2 ms spin), median us."""
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    for s, e in ev:
        flush.zero_()
        torch.cuda._sleep(2_000 * 1_900)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev)


def part_b(a, buf, device, num_ranks):
    """(figures, {call: {kernel: us per call}}, method) at ``--event-tokens`` tokens."""
    x, idx, w = routing(a.event_tokens, a.hidden, a.experts, a.topk, device, a.seed + 1)
    fns = normal_calls(buf, x, idx, w, a.experts, num_ranks)
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    flush_names = set(kernel_names_and_us(None, 2, flush))
    f, kernels, method = {}, {}, "kineto"
    for name in EVENT_CALLS:
        fn = fns[name]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        f[f"{name}_event_us"] = event_times_us(fn, a.event_calls, flush)
        names = kernel_names_and_us(fn, a.event_calls, flush)
        mine = {k: v / a.event_calls for k, v in names.items() if k not in flush_names}
        if mine:
            kernels[name] = mine
            f[f"{name}_kernel_us"] = sum(mine.values())
        else:  # the profiler saw no kernel of ours (no CUPTI): time the GPU with the host ahead
            method = "kineto, else events behind a 2 ms spin"
            f[f"{name}_kernel_us"] = queued_kernel_us(fn, a.event_calls, flush)
        f[f"{name}_event_over_kernel"] = f[f"{name}_event_us"] / f[f"{name}_kernel_us"]
        # The same events with the host far ahead (behind a 2 ms spin): what the events measure
        # without any host time. event - queued is the host's share of the ratio; queued -
        # kernel is the GPU's own (the events and the launch gaps), which no host path removes.
        f[f"{name}_queued_us"] = queued_kernel_us(fn, a.event_calls, flush)
    return f, kernels, method


# ----------------------------------------------------------------------------- part c
def random_fp8_weights(num, rows, cols, device):
    """(fp8 [num, rows, cols], float32 block scales [num, rows/128, cols/128]): random bytes
    below 0x30 (e4m3 values in [0, 0.06)); the host path does not depend on the values."""
    q = torch.empty(num, rows, cols, dtype=torch.uint8, device=device).random_(0, 0x30)
    s = torch.full((num, -(-rows // 128), -(-cols // 128)), 1.0, device=device)
    return q.view(torch.float8_e4m3fn), s


def step_host_ms(fn, iters):
    """Wall time of one call started with the GPU idle, median ms."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def queued_step_host_ms(fn, iters):
    """Host ms per step of ``iters`` steps back to back with no synchronisation between them
    (a decode loop's pattern, and part a's ``host_loops``: the GPU works behind the host, so a
    loop's wall time per step is the host's while the launch queue has room), median of 3
    loops. Beside ``step_host_ms`` it tells a step's own host cost from what an idle GPU and an
    idle host thread add at a step's start."""
    return statistics.median(host_loops(fn, iters, torch.cuda.synchronize, warmup=3)) * 1e3


def step_profile(fn, iters, top):
    """cProfile of ``iters`` steps, each started with the GPU idle: by own time, then
    ep_comm's functions by cumulative time (which stage of the layer the time goes to:
    quantisation, layout, dispatch, grouping, the expert GEMMs, combine)."""
    prof = cProfile.Profile()
    for _ in range(iters):
        torch.cuda.synchronize()
        prof.enable()
        fn()
        prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    own = out.getvalue().splitlines()[:12 + top]
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("cumulative").print_stats("ep_comm", 2 * top)
    cumulative = [line for line in out.getvalue().splitlines() if line.strip()]
    return "\n".join(own + ["", "  by cumulative time, ep_comm's functions:"] + cumulative[-2 * top - 1:])


def part_c(a, buf, ll_buf, device, num_ranks, profiles=None):
    """MoE layer host ms per decode and prefill step (figures dict); with ``profiles``, a
    cProfile of each step's Python too."""
    from ep_comm import moe
    local = a.experts // num_ranks
    weights = moe.ExpertWeights(
        random_fp8_weights(local, 2 * a.intermediate, a.hidden, device),
        random_fp8_weights(local, a.hidden, a.intermediate, device), 0)
    f = {}
    x, idx, w = routing(a.tokens, a.hidden, a.experts, a.topk, device, a.seed + 2)
    decode = lambda: moe.moe_ep_low_latency(  # noqa: E731
        x, idx, w, weights, ll_buf, a.experts, a.tokens, impl="triton")
    f["moe_decode_host_ms"] = step_host_ms(decode, a.moe_iters)
    f["moe_decode_queued_host_ms"] = queued_step_host_ms(decode, a.moe_iters)
    xp, idxp, wp = routing(a.prefill_tokens, a.hidden, a.experts, a.topk, device, a.seed + 3)
    prefill = lambda: moe.moe_ep_normal(  # noqa: E731
        xp, idxp, wp, weights, buf, a.experts, impl="triton",
        num_worst_tokens=num_ranks * a.prefill_tokens)
    f["moe_prefill_host_ms"] = step_host_ms(prefill, a.moe_iters)
    f["moe_prefill_queued_host_ms"] = queued_step_host_ms(prefill, a.moe_iters)
    if profiles is not None:
        profiles["moe decode step"] = step_profile(decode, a.moe_iters, a.top)
        profiles["moe prefill step"] = step_profile(prefill, a.moe_iters, a.top)
    return f


# ----------------------------------------------------------------------------- report
def verdicts(figures):
    rows = []
    for name, target in TARGETS.items():
        v = figures.get(name)
        rows.append([name, v, target, "-" if v is None else ("PASS" if v <= target else "FAIL")])
    return rows


def print_report(a, f, num_ranks, profiles, kernels):
    host = [[n, f.get(f"{n}_host_us")] for n in HOST_CALLS] + [
        ["dispatch count wait", f.get("dispatch_count_wait_us")],
        ["dispatch minus count wait", f.get("dispatch_host_minus_wait_us")],
        ["dispatch, Python path", f.get("dispatch_python_host_us")],
        ["dispatch_cached, Python path", f.get("dispatch_cached_python_host_us")],
        ["dispatch_worst, Python path", f.get("dispatch_worst_python_host_us")],
        ["dispatches through C++ (fraction)", f.get("normal_calls_through_cpp")],
        ["combine, Python path", f.get("combine_python_host_us")],
        ["combines through C++ (fraction)", f.get("combine_calls_through_cpp")],
        ["ll_dispatch", f.get("ll_dispatch_host_us")], ["ll_combine", f.get("ll_combine_host_us")],
        ["ll_dispatch, Python path", f.get("ll_dispatch_python_host_us")],
        ["ll_combine, Python path", f.get("ll_combine_python_host_us")],
        ["ll calls through C++ (fraction)", f.get("ll_calls_through_cpp")]]
    common.print_table(None, ["call", "host us per call"], host,
                       f"\na. host time per call, {a.tokens} tokens x {a.hidden}, top-{a.topk} of "
                       f"{a.experts}, {num_ranks} rank(s), no sync in the loop, median of 3 x "
                       f"{a.calls} calls")
    stages = ("guard", "alloc", "launch", "wait", "return")
    if any(f"{n}_cpp_alloc_us" in f for n in NORMAL_CPP_CALLS):
        common.print_table(None, ["call", *stages, "outside C++"],
                           [[n, *(f.get(f"{n}_cpp_{s}_us") for s in stages),
                             f.get(f"{n}_outside_cpp_us")] for n in NORMAL_CPP_CALLS],
                           "\na2. the C++ dispatches' host us per call by stage (alloc: CUDA "
                           "allocations and views; launch: cuLaunchKernel; return: the outputs "
                           "as a Python tuple; outside C++: Python and pybind's argument "
                           "conversion)")
    if any(f"{n}_event_us" in f for n in EVENT_CALLS):
        common.print_table(None, ["call", "event us", "kernel us", "event / kernel",
                                  "event, host ahead us"],
                           [[n, f.get(f"{n}_event_us"), f.get(f"{n}_kernel_us"),
                             f.get(f"{n}_event_over_kernel"), f.get(f"{n}_queued_us")]
                            for n in EVENT_CALLS],
                           f"\nb. CUDA events around each call, back to back, L2 flushed, "
                           f"{a.event_tokens} tokens, median of {a.event_calls}")
        for n, k in kernels.items():
            print(f"   {n} kernels: " + ", ".join(f"{name[:40]} {us:.1f} us"
                                                   for name, us in k.items()))
    if "moe_decode_host_ms" in f:
        common.print_table(None, ["step", "host ms, GPU idle at the call",
                                  "host ms, steps back to back"],
                           [["moe_ep_low_latency decode", f["moe_decode_host_ms"],
                             f.get("moe_decode_queued_host_ms")],
                            ["moe_ep_normal prefill, num_worst_tokens", f["moe_prefill_host_ms"],
                             f.get("moe_prefill_queued_host_ms")]],
                           f"\nc. MoE layer host time per step, "
                           f"{a.tokens} / {a.prefill_tokens} tokens, hidden {a.hidden}, "
                           f"I {a.intermediate}, {a.experts} experts, top-{a.topk}, FP8")
    common.print_table(None, ["figure", "value", "target", "verdict"], verdicts(f),
                       "\nd. issue #22 targets")
    for name, text in (profiles or {}).items():
        n = a.moe_iters if name.startswith("moe") else a.calls
        print(f"\n--- cProfile, {n} x {name}, by own time")
        print(text)


def run_fake(a) -> int:
    """Part a on the fake GPU of tests/fake_gpu.py (CPU; launches recorded, not run)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import fake_gpu
    cfg = ep_comm.Buffer.get_dispatch_config(1)
    nvl = cfg.get_nvl_buffer_size_hint(a.hidden * 2, 1)
    rdma = ep_comm.Buffer.get_low_latency_rdma_size_hint(a.tokens, a.hidden, 1, a.experts)
    profiles = None if a.quick else {}
    with fake_gpu.fake_buffer(num_nvl_bytes=nvl) as (buf, module):
        module.record = False
        with fake_gpu.fake_buffer(num_rdma_bytes=rdma, low_latency_mode=True) as (ll, ll_mod):
            ll_mod.record = False
            f = part_a(a, buf, ll, torch.device("cpu"), 1, lambda: None, profiles)
    print("fake GPU (tests/fake_gpu.py): the real Python of Buffer and the runtimes on CPU "
          "tensors, launches recorded instead of run; not a GPU measurement, nothing written")
    print_report(a, f, 1, profiles, {})
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.fake_gpu:
        return run_fake(a)
    ctx = common.init(a)
    if not ctx.on_gpu:
        print("bench/host_overhead.py times the kernels backend: it needs CUDA GPUs "
              "(--fake-gpu runs part a on CPU)")
        return common.finish(ctx, 1)
    r = ctx.num_ranks
    t_start = time.perf_counter()
    cfg = ep_comm.Buffer.get_dispatch_config(r)
    buf = ep_comm.Buffer(ctx.group, num_nvl_bytes=cfg.get_nvl_buffer_size_hint(a.hidden * 2, r),
                         backend="kernels", explicitly_destroy=True)
    rdma = ep_comm.Buffer.get_low_latency_rdma_size_hint(a.tokens, a.hidden, r, a.experts)
    ll = ep_comm.Buffer(ctx.group, num_rdma_bytes=rdma, low_latency_mode=True,
                        backend="kernels", explicitly_destroy=True)

    def sync():
        torch.cuda.synchronize()
        torch.distributed.barrier(ctx.group)

    profiles = None if (a.quick and not a.moe_only) or ctx.rank else {}
    kernels, method = {}, None
    try:
        f = {}
        if not a.moe_only:
            f.update(part_a(a, buf, ll, ctx.device, r, sync, profiles))
        # Part c before part b: part b's kineto profile (torch.profiler with CUDA activities)
        # can leave CUPTI attached to the process, and later launches pay for it
        # (pytorch/pytorch#144455), so the MoE steps are timed with no profiler yet attached.
        # (It did not explain the suite's MoE figures: 0.50 / 0.54 ms after the profile, 0.42 /
        # 0.68 ms before it, 1x H100, 2026-12-08; see docs/host_path.md, session 19.)
        if a.moe_only or not a.quick:
            f.update(part_c(a, buf, ll, ctx.device, r, profiles if not ctx.rank else None))
        if not a.moe_only:
            fb, kernels, method = part_b(a, buf, ctx.device, r)
            f.update(fb)
    finally:
        ll.destroy()
        buf.destroy()
    figures, per_rank = common.reduce_figures(ctx, f)
    wall = time.perf_counter() - t_start
    if ctx.rank == 0:
        print_report(a, figures, r, profiles, kernels)
        print(f"\nwall time {wall:.1f} s")
    config = {"num_tokens": a.tokens, "hidden": a.hidden, "num_topk": a.topk,
              "num_experts": a.experts, "event_tokens": a.event_tokens, "calls": a.calls,
              "event_calls": a.event_calls, "quick": a.quick, "kernel_method": method,
              "l2_flush_bytes": FLUSH_BYTES,
              "moe": None if a.quick and not a.moe_only else {
                  "decode_tokens": a.tokens, "prefill_tokens": a.prefill_tokens,
                  "intermediate": a.intermediate, "fp8": True, "gemm_impl": "triton",
                  "iters": a.moe_iters}}
    name = "host_overhead_moe" if a.moe_only else "host_overhead"
    path = common.write_result(ctx, a.out, name, "kernels", config, figures,
                               targets=TARGETS, per_rank=per_rank,
                               verdicts={n: v for n, _, _, v in verdicts(figures)},
                               kernels_per_call_us=kernels, wall_s=wall)
    if path:
        print(f"wrote {path}")
    return common.finish(ctx, 0)


if __name__ == "__main__":
    sys.exit(main())
