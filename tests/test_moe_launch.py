"""Launch plans of the MoE layer's Triton kernels (``ep_comm.moe.launch``) and the layer's plans
per shape (``ep_comm.moe.layer``).

The direct launch (a kept compiled kernel called without ``kernel[grid]``) needs a compiled
JITFunction, which the CPU has not: these tests drive it through Triton's real
``JITFunction.run`` with a stand-in driver (current device 0, stream 7) and a stand-in compiler
whose "compiled kernel" records each launcher call. The direct path must hand the launcher
exactly what ``JITFunction.run`` hands it, and must go back to ``JITFunction.run`` whenever an
argument would specialise differently. The layer tests run in the interpreter, where every
launch is the ordinary one (``KernelPlan.direct`` is False there, by choice and checked here):
they prove that a shape's later calls, which skip the checks and reuse the plans, compute what
its first call computes.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ep_comm import moe  # noqa: E402
from ep_comm.errors import InputError  # noqa: E402
from ep_comm.kernels.triton import permute as _permute  # noqa: E402
from ep_comm.moe import gemm, launch  # noqa: E402
from ep_comm.moe import layer as _layer  # noqa: E402

INTERP = gemm.interpreting()


# ----------------------------------------------------------------------------- stand-ins
class FakeCompiled:
    """A compiled kernel whose launcher records (grid, stream, function, metadata, args)."""

    def __init__(self, log, specialization):
        self.log = log
        self.specialization = specialization
        self.function = object()
        self.packed_metadata = ("meta", specialization)

    def launch_metadata(self, grid, stream, *args):
        return None

    @property
    def run(self):
        def launcher(gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_,
                     *args):
            self.log.append(((gx, gy, gz), stream, function, metadata, args))
        return launcher


class FakeDriver:
    """The parts of a Triton driver that ``JITFunction.run`` and ``KernelPlan`` use."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7

    def get_current_target(self):
        return self.target


@pytest.fixture
def jit_permute(monkeypatch):
    """(JITFunction of the real permute kernel, launcher log, compile log) under the stand-ins."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.runtime import driver
    fake = FakeDriver()
    old = driver._active
    driver.set_active(fake)
    fn = JITFunction(getattr(_permute.permute_kernel, "fn", _permute.permute_kernel))
    log, compiles = [], []
    fn.device_caches[0]  # builds the binder (which also sets fn.compile); then replace compile

    def compile_(src, target=None, options=None, **kw):
        compiles.append(dict(src.attrs))
        return FakeCompiled(log, tuple(sorted(src.attrs.items(), key=str)))

    fn.compile = compile_
    monkeypatch.setattr(launch, "DIRECT", True)
    try:
        yield fn, log, compiles
    finally:
        driver._active = old


def permute_inputs(n=6, h=256, k=2, offset=0):
    x = torch.zeros(n * h + 64, dtype=torch.bfloat16)[offset:offset + n * h].view(n, h)
    dest = torch.zeros(n, k, dtype=torch.int32)
    out = torch.empty(n * k, h, dtype=torch.bfloat16)
    return x, dest, out


def permute_plan(fn, x, dest, out):
    n, h = x.shape
    return launch.KernelPlan(fn, (
        x, x, dest, out, out, h, 1, dest.shape[1], x.stride(0), out.stride(0), dest.stride(0),
        dest.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1)),
        dict(BLOCK_H=256, G_POW2=1, HAS_SCALES=False, num_warps=4), slots=(0, 1, 2, 3, 4))


# ----------------------------------------------------------------------------- launch.py
def test_spec_of_separates_what_triton_specialises_on():
    native = pytest.importorskip("triton.runtime.jit").__dict__.get("native_specialize_impl")
    if native is None:
        pytest.skip("this Triton has no native_specialize_impl")
    from triton.backends.nvidia.compiler import CUDABackend
    ints = [0, 1, 2, 15, 16, 17, 31, 32, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32, -1, -16]
    t = torch.empty(64, dtype=torch.bfloat16)
    tensors = [t[i:] for i in range(0, 16)] + [t.view(torch.float8_e4m3fn)[:8], t.float()]
    values = ints + tensors
    for a in values:
        for b in values:
            same_ours = launch.spec_of(a) == launch.spec_of(b)
            same_triton = (native(CUDABackend, a, False, True, True)
                           == native(CUDABackend, b, False, True, True))
            # equal for us must mean equal for Triton (we may split finer, never coarser)
            assert not same_ours or same_triton, (a if not isinstance(a, torch.Tensor) else
                                                  a.data_ptr() % 16, b)


def test_direct_launch_passes_the_launcher_what_jit_run_passes(jit_permute):
    fn, log, compiles = jit_permute
    x, dest, out = permute_inputs()
    plan = permute_plan(fn, x, dest, out)
    assert plan.direct
    plan((6, 1), (x, x, dest, out, out))  # first: JITFunction.run (compiles)
    assert len(compiles) == 1 and plan.direct_launches == 0
    x2, dest2, out2 = permute_inputs()
    plan((6, 1), (x2, x2, dest2, out2, out2))  # direct
    assert plan.direct_launches == 1 and len(compiles) == 1
    fn[(6, 1)](x2, x2, dest2, out2, out2, *plan.args[5:], **plan.kwargs)  # reference
    assert len(log) == 3
    direct, reference = log[1], log[2]
    assert direct[:4] == reference[:4]  # grid, stream, function, metadata
    assert len(direct[4]) == len(reference[4])
    for a, b in zip(direct[4], reference[4]):
        assert a is b or a == b


def test_direct_launch_goes_through_jit_run_for_a_new_alignment(jit_permute):
    fn, log, compiles = jit_permute
    x, dest, out = permute_inputs()
    plan = permute_plan(fn, x, dest, out)
    plan((6, 1), (x, x, dest, out, out))
    xo, _, _ = permute_inputs(offset=4)  # 8 bytes past a 16-byte boundary
    assert xo.data_ptr() % 16
    plan((6, 1), (xo, xo, dest, out, out))
    assert len(compiles) == 2 and plan.direct_launches == 0  # its own variant, compiled
    plan((6, 1), (xo, xo, dest, out, out))
    plan((6, 1), (x, x, dest, out, out))
    assert plan.direct_launches == 2 and len(compiles) == 2
    assert log[-1][3] == log[0][3] and log[-2][3] == log[1][3]  # each its own variant


def test_direct_launch_off_while_launch_hooks_are_registered(jit_permute):
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime.launch_enter_hook, "add"):
        pytest.skip("this Triton has no launch hook chains")
    fn, log, compiles = jit_permute
    x, dest, out = permute_inputs()
    plan = permute_plan(fn, x, dest, out)
    plan((6, 1), (x, x, dest, out, out))
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        plan((6, 1), (x, x, dest, out, out))
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert plan.direct_launches == 0 and len(log) == 2


def test_plan_keeps_no_per_call_tensor_alive(jit_permute):
    fn, _, _ = jit_permute
    x, dest, out = permute_inputs()
    plan = permute_plan(fn, x, dest, out)
    assert all(plan.args[i] is None and plan.full[i] is None for i in plan.slots)


@pytest.mark.skipif(not INTERP, reason="interpreter only")
def test_interpreted_kernels_take_the_ordinary_launch():
    x, dest, out = permute_inputs()
    plan = permute_plan(_permute.permute_kernel, x, dest, out)
    assert not plan.direct
    dest[:] = -1
    dest[0, 1] = 3
    x[0] = 2.0
    plan((6, 1), (x, x, dest, out, out))
    assert plan.launches == 1 and plan.direct_launches == 0
    assert torch.equal(out[3], x[0])


def test_plan_cache_drops_its_oldest_plan():
    cache = launch.PlanCache(size=2)
    for i in range(3):
        cache.put(i, str(i))
    assert list(cache) == [1, 2]


# ----------------------------------------------------------------------------- layer plans
def _weights(fp8, e=4, h=256, i=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(torch.bfloat16)
    return moe.ExpertWeights(*_layer._maybe_fp8(w13, w2, fp8), 0)


def _routing(n=10, k=2, e=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, e, (n, k), generator=g)
    w = torch.rand(n, k, generator=g)
    return idx, w


@pytest.mark.skipif(not INTERP and not torch.cuda.is_available(), reason="needs Triton")
@pytest.mark.parametrize("fp8", [False, True])
def test_contiguous_pipeline_later_calls_equal_the_first(fp8):
    weights = _weights(fp8)
    idx, w = _routing()
    g = torch.Generator().manual_seed(2)
    x0, x1 = (torch.randn(10, 256, generator=g).to(torch.bfloat16) for _ in range(2))
    outs = []
    for x in (x0, x1, x0):  # the first call builds the plans, the others reuse them
        xin = gemm.quantize_fp8(x) if fp8 else x
        groups = moe.group_by_expert(idx, 4, 2, num_rows=10 * 2 + 4, impl="triton")
        xp = moe.permute(xin, groups, impl="triton")
        y = moe.expert_ffn_contiguous(xp, groups, weights, impl="triton")
        outs.append(moe.unpermute(y, groups, w, impl="triton"))
    assert len(weights.plans) == 1
    assert torch.equal(outs[0], outs[2])  # same input through the plans: the same bits
    ref = moe.unpermute(moe.expert_ffn_contiguous(
        moe.permute(gemm.quantize_fp8(x0) if fp8 else x0,
                    moe.group_by_expert(idx, 4, 2, impl="torch"), impl="torch"),
        moe.group_by_expert(idx, 4, 2, impl="torch"), weights, impl="torch"),
        moe.group_by_expert(idx, 4, 2, impl="torch"), w, impl="torch")
    tol = 2 ** -3 if fp8 else 2 ** -6
    assert (outs[2].float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


@pytest.mark.skipif(not INTERP and not torch.cuda.is_available(), reason="needs Triton")
@pytest.mark.parametrize("fp8", [False, True])
def test_masked_ffn_later_calls_equal_the_first_and_write_into_out(fp8):
    weights = _weights(fp8)
    e, m, h = 4, 8, 256
    g = torch.Generator().manual_seed(3)
    x = torch.randn(e, m, h, generator=g).to(torch.bfloat16)
    xin = gemm.quantize_fp8(x) if fp8 else x
    count = torch.tensor([3, 0, 8, 5], dtype=torch.int32)
    first = moe.expert_ffn_masked(xin, count, weights, expected_m=8, impl="triton")
    out = torch.zeros(e, m, h, dtype=torch.bfloat16)
    again = moe.expert_ffn_masked(xin, count, weights, expected_m=8, out=out, impl="triton")
    third = moe.expert_ffn_masked(xin, count, weights, expected_m=8, out=out, impl="triton")
    assert again is out and third is out
    assert len(weights.plans) == 2  # without and with out=
    for ei, c in enumerate(count.tolist()):
        assert torch.equal(first[ei, :c], out[ei, :c])
        assert not out[ei, c:].any()  # rows past the count untouched


@pytest.mark.skipif(not INTERP and not torch.cuda.is_available(), reason="needs Triton")
def test_plans_still_reject_a_changed_shape_with_the_clear_error():
    weights = _weights(False)
    count = torch.tensor([1, 1, 1, 1], dtype=torch.int32)
    x = torch.zeros(4, 8, 256, dtype=torch.bfloat16)
    moe.expert_ffn_masked(x, count, weights, impl="triton")
    with pytest.raises(InputError, match="a must be"):
        moe.expert_ffn_masked(torch.zeros(4, 8, 128, dtype=torch.bfloat16), count, weights,
                              impl="triton")
    with pytest.raises(InputError, match="count must be"):
        moe.expert_ffn_masked(x, count.long(), weights, impl="triton")


@pytest.mark.skipif(not INTERP and not torch.cuda.is_available(), reason="needs Triton")
def test_debug_mode_builds_no_plans(monkeypatch):
    monkeypatch.setattr(launch, "PLANS", False)
    weights = _weights(False)
    count = torch.tensor([1, 2, 0, 1], dtype=torch.int32)
    x = torch.randn(4, 8, 256).to(torch.bfloat16)
    a = moe.expert_ffn_masked(x, count, weights, impl="triton")
    b = moe.expert_ffn_masked(x, count, weights, impl="triton")
    assert not weights.plans
    for ei, c in enumerate(count.tolist()):
        assert torch.equal(a[ei, :c], b[ei, :c])


@pytest.mark.skipif(not INTERP and not torch.cuda.is_available(), reason="needs Triton")
def test_reassigned_weights_get_new_plans():
    weights = _weights(False)
    count = torch.tensor([2, 2, 2, 2], dtype=torch.int32)
    x = torch.randn(4, 8, 256).to(torch.bfloat16)
    a = moe.expert_ffn_masked(x, count, weights, impl="triton")
    weights.w2 = weights.w2 * 2
    b = moe.expert_ffn_masked(x, count, weights, impl="triton")
    assert len(weights.plans) == 2
    assert torch.allclose(b[:, :2].float(), 2 * a[:, :2].float(), rtol=2 ** -7, atol=1e-3)
