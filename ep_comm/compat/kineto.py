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


def kernel_time_per_call(fn, kernel_names, num_tests: int = 30):
    """Seconds of device time per call of ``fn`` spent in kernels whose name contains each of
    ``kernel_names`` (a str gives a float, a tuple a tuple)."""
    names = (kernel_names,) if isinstance(kernel_names, str) else tuple(kernel_names)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(num_tests):
            fn()
        torch.cuda.synchronize()
    totals = dict.fromkeys(names, 0.0)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        for n in names:
            if n in ev.name:
                totals[n] += ev.device_time / 1e6  # microseconds
    out = tuple(totals[n] / num_tests for n in names)
    return out[0] if isinstance(kernel_names, str) else out


def wrap_bench_kineto(bench_kineto):
    """DeepEP's ``bench_kineto`` with the periodic (hook-mode) case answered by
    ``kernel_time_per_call``; everything else goes to DeepEP's function unchanged."""

    @functools.wraps(bench_kineto)
    def wrapped(fn, kernel_names, num_tests: int = 30, *args, **kwargs):
        if kwargs.get("num_kernels_per_period", 1) > 1:
            return kernel_time_per_call(fn, kernel_names, num_tests)
        return bench_kineto(fn, kernel_names, num_tests, *args, **kwargs)

    return wrapped
