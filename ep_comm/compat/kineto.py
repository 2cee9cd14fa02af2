"""DeepEP's kernel-name profiling (``bench_kineto``) against ep_comm's kernel names.

DeepEP's test helper ``bench_kineto(fn, kernel_names, ..., num_kernels_per_period)`` times
kernels by name. With ``num_kernels_per_period > 1`` (low-latency hook mode: a send and a
receive launch per call) it selects trace events whose name contains ``'::' + name``, a C++
namespace qualifier that ep_comm's ``extern "C"`` kernels (``ep_ll_dispatch_fp8``,
``ep_ll_combine``, ...) do not have, and divides by zero. ``wrap_bench_kineto`` keeps DeepEP's
function for every other call and answers the periodic case itself: the summed device time of
the ep_comm kernels whose names contain ``name``, per call of ``fn``. It changes timing only.
"""
from __future__ import annotations

import functools

import torch


def kernel_time_per_call(fn, kernel_names, num_tests: int = 30, num_kernels_per_period: int = 1):
    """Seconds of device time per call of ``fn`` spent in kernels whose name contains each of
    ``kernel_names``. With ``num_kernels_per_period`` = P > 1 (a hook call launches P kernels
    of a name: send, then receive), each name gives a list of P times, the i-th the mean
    duration of every P-th matching kernel in launch order, as DeepEP's ``bench_kineto``
    returns. A str gives one entry, a tuple a tuple."""
    names = (kernel_names,) if isinstance(kernel_names, str) else tuple(kernel_names)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(num_tests):
            fn()
        torch.cuda.synchronize()
    found = {n: [] for n in names}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        for n in names:
            if n in ev.name:
                found[n].append((ev.time_range.start, ev.device_time / 1e6))  # us -> s
    out = []
    for n in names:
        durs = [d for _, d in sorted(found[n])]
        if num_kernels_per_period > 1:
            p = num_kernels_per_period
            calls = max(1, len(durs) // p)
            out.append([sum(durs[j::p]) / calls for j in range(p)])
        else:
            out.append(sum(durs) / num_tests)
    return out[0] if isinstance(kernel_names, str) else tuple(out)


def wrap_bench_kineto(bench_kineto):
    """DeepEP's ``bench_kineto`` with the periodic (hook-mode) case answered by
    ``kernel_time_per_call``; everything else goes to DeepEP's function unchanged."""

    @functools.wraps(bench_kineto)
    def wrapped(fn, kernel_names, num_tests: int = 30, *args, **kwargs):
        p = kwargs.get("num_kernels_per_period", 1)
        if p > 1:
            return kernel_time_per_call(fn, kernel_names, num_tests, p)
        return bench_kineto(fn, kernel_names, num_tests, *args, **kwargs)

    return wrapped
