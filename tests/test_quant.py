"""The Triton FP8 quantiser and SiLU(gate) * up, against ``ep_comm.core.fp8`` and float64.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before ep_comm
is imported); ``-m gpu`` repeats the checks at DeepSeek-V3 shapes on a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ep_comm.core import fp8  # noqa: E402
from ep_comm.moe import gemm
from ep_comm.errors import InputError  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (run with -m gpu on the GPU machine)")


def make_x(shape, seed, dtype=torch.bfloat16):
    """Rows spanning 12 orders of magnitude, one all-zero block (amax clamp), one huge value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    rows = x.shape[-2]
    x = x * torch.logspace(-7, 5, rows).view(*([1] * (x.dim() - 2)), rows, 1)
    x[..., 0, :128] = 0
    if rows > 1:
        x[..., 1, 5] = 3e4
    return x.to(dtype).to(DEV)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ----------------------------------------------------------------------------- quantiser
@pytest.mark.parametrize("round_scale", [False, True], ids=["exact_scale", "pow2_scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_quantize_is_bit_identical_to_the_fp8_format(round_scale, dtype):
    x = make_x((37, 384), seed=1, dtype=dtype)
    q, s = gemm.quantize_fp8(x, round_scale=round_scale)
    q_ref, s_ref = fp8.per_token_cast_to_fp8(x, round_scale=round_scale)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (37, 3)
    assert same_bits(q, q_ref)
    assert torch.equal(s, s_ref)


def test_quantize_rounds_ties_and_carries_like_torch():
    # values just below powers of two (mantissa carry) and exact ties of the e4m3 grid
    base = torch.tensor([1.9999, 1.0625, 1.1875, 3.99, 0.0107421875, 0.0029296875, -1.96875, 447.9])
    x = torch.zeros(2, 128)
    x[0, :8] = base
    x[0, 8] = 448.0  # amax 448 -> scale 1: the values above are cast as they are
    x[1] = torch.linspace(-448, 448, 128)
    x = x.to(DEV)
    q, s = gemm.quantize_fp8(x)
    q_ref, s_ref = fp8.per_token_cast_to_fp8(x)
    assert same_bits(q, q_ref) and torch.equal(s, s_ref)


def test_quantize_3d_masked_rows_with_column_major_scales():
    e, m, h = 3, 10, 256
    x = make_x((e, m, h), seed=2)
    count = torch.tensor([0, 10, 4], dtype=torch.int32, device=DEV)
    q, s = gemm.quantize_fp8(x, count=count)
    assert s.shape == (e, m, h // 128) and s.stride(1) == 1, "scales must be column-major"
    q_ref, s_ref = fp8.per_token_cast_to_fp8(x.view(-1, h))
    q_ref, s_ref = q_ref.view(e, m, h), s_ref.view(e, m, -1)
    for i, c in enumerate(count.tolist()):
        assert same_bits(q[i, :c], q_ref[i, :c]) and torch.equal(s[i, :c], s_ref[i, :c])


def test_quantize_row_major_scales_when_asked():
    x = make_x((2, 5, 128), seed=3)
    _, s = gemm.quantize_fp8(x, column_major_scales=False)
    assert s.is_contiguous()
    _, s2 = gemm.quantize_fp8(x[0], column_major_scales=True)
    assert s2.stride(0) == 1


# ----------------------------------------------------------------------------- SiLU * up
def silu_mul_f64(x: torch.Tensor) -> torch.Tensor:
    g, u = x.double().chunk(2, dim=-1)
    return g / (1 + torch.exp(-g)) * u


@pytest.mark.parametrize("shape", [(13, 2 * 256), (1, 2 * 128), (5, 2 * 80)])
def test_silu_mul_matches_float64(shape):
    x = (make_x(shape, seed=4).float() * 1e-3).clamp(-30, 30).to(torch.bfloat16)
    h = gemm.silu_mul(x)
    ref = silu_mul_f64(x)
    assert h.dtype == torch.bfloat16 and h.shape == ref.shape
    err = (h.double() - ref).abs()
    assert (err <= 2.0 ** -8 * ref.abs() + 1e-30).all(), err.max()


def test_silu_mul_3d_writes_only_valid_rows():
    e, m, i = 2, 6, 128
    x = torch.randn(e, m, 2 * i).to(torch.bfloat16).to(DEV)
    count = torch.tensor([2, 0], dtype=torch.int32, device=DEV)
    out = torch.full((e, m, i), 7.0, dtype=torch.bfloat16, device=DEV)
    gemm.silu_mul(x, count=count, out=out)
    ref = silu_mul_f64(x)
    assert ((out[0, :2].double() - ref[0, :2]).abs() <= 2.0 ** -8 * ref[0, :2].abs()).all()
    assert (out[0, 2:] == 7).all() and (out[1] == 7).all()


@pytest.mark.parametrize("round_scale", [False, True], ids=["exact_scale", "pow2_scale"])
def test_silu_mul_quant_matches_float64_within_fp8_rounding(round_scale):
    e, m, i = 3, 9, 256
    x = (torch.randn(e, m, 2 * i) * 4).to(torch.bfloat16).to(DEV)
    count = torch.tensor([9, 0, 5], dtype=torch.int32, device=DEV)
    q, s = gemm.silu_mul_quant_fp8(x, count=count, round_scale=round_scale)
    assert q.shape == (e, m, i) and s.shape == (e, m, i // 128) and s.stride(1) == 1
    ref = silu_mul_f64(x)
    for j, c in enumerate(count.tolist()):
        if c == 0:
            continue
        r = ref[j, :c].view(c, -1, 128)
        amax = r.abs().amax(-1).clamp(min=1e-4)
        want_s = amax / 448
        if not round_scale:  # fp32 silu vs float64: the scale agrees to a few fp32 ulps
            assert torch.allclose(s[j, :c].double(), want_s, rtol=1e-5)
        sc = s[j, :c].double().unsqueeze(-1)
        got = q[j, :c].double().view(c, -1, 128) * sc
        # e4m3: 3 mantissa bits (half ulp 2**-4 relative), subnormal spacing 2**-9 * scale
        assert ((got - r).abs() <= 2.0 ** -4 * r.abs() + 2.0 ** -9 * sc).all()


def test_silu_mul_quant_2d_equals_quantising_the_bf16_free_product():
    x = (torch.randn(4, 2 * 128) * 2).to(torch.bfloat16).to(DEV)
    q, s = gemm.silu_mul_quant_fp8(x)
    assert s.is_contiguous() and s.shape == (4, 1)
    q_ref, s_ref = gemm.silu_mul_quant_fp8_torch(x)
    assert torch.allclose(s, s_ref, rtol=1e-6)
    # the cast may differ by one e4m3 step where exp() rounds differently
    assert ((fp8.dequantize(q, s) - fp8.dequantize(q_ref, s_ref)).abs()
            <= 2.0 ** -3 * fp8.dequantize(q_ref, s_ref).abs() + 2.0 ** -9 * s).all()


def test_quant_rejects_bad_arguments():
    with pytest.raises(InputError, match="multiple of 128"):
        gemm.quantize_fp8(torch.zeros(2, 100, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(InputError, match="multiple of 128"):
        gemm.silu_mul_quant_fp8(torch.zeros(2, 200, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(InputError, match="must be even"):
        gemm.silu_mul(torch.zeros(2, 201, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(InputError, match="only accepted with a 3D"):
        gemm.quantize_fp8(torch.zeros(2, 128, dtype=torch.bfloat16, device=DEV),
                          count=torch.zeros(1, dtype=torch.int32, device=DEV))
    with pytest.raises(InputError, match="bfloat16 or float32"):
        gemm.quantize_fp8(torch.zeros(2, 128, dtype=torch.float16, device=DEV))


# ----------------------------------------------------------------------------- GPU shapes
@pytest.mark.gpu
@gpu_only
def test_gpu_quantize_deepseek_shapes_bit_identical():
    x = make_x((4096, 7168), seed=10)
    for rs in (False, True):
        q, s = gemm.quantize_fp8(x, round_scale=rs)
        q_ref, s_ref = fp8.per_token_cast_to_fp8(x, round_scale=rs)
        assert same_bits(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.gpu
@gpu_only
def test_gpu_silu_mul_quant_deepseek_shapes():
    e, m, i = 16, 256, 2048
    x = (torch.randn(e, m, 2 * i, device=DEV) * 4).to(torch.bfloat16)
    count = torch.randint(0, m + 1, (e,), dtype=torch.int32, device=DEV)
    count[0] = 0
    q, s = gemm.silu_mul_quant_fp8(x, count=count)
    ref = silu_mul_f64(x)
    for j, c in enumerate(count.tolist()):
        # Explicit group count: view(c, -1, 128) is ambiguous (an error) for an empty expert.
        r = ref[j, :c].reshape(c, i // 128, 128)
        sc = s[j, :c].double().unsqueeze(-1)  # [c, i // 128, 1]; s is column-major per expert
        got = q[j, :c].double().reshape(c, i // 128, 128) * sc
        assert ((got - r).abs() <= 2.0 ** -4 * r.abs() + 2.0 ** -9 * sc).all()
    h = gemm.silu_mul(x.view(-1, 2 * i))
    refh = ref.view(-1, i)
    assert ((h.double() - refh).abs() <= 2.0 ** -8 * refh.abs() + 1e-30).all()
