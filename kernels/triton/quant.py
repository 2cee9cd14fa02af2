"""Triton FP8 per-token quantiser, and the expert activation SiLU(gate) * up fused with it.

The format is ``ep_comm.core.fp8``'s, step for step, so that ``quant_kernel`` without ``SILU`` is
bit-identical to ``ep_comm.core.fp8.per_token_cast_to_fp8``: per row and block of 128 channels,
``amax = max(|x|)`` clamped below at 1e-4, ``scale = amax / 448`` (IEEE division, ``div_rn``,
not Triton's default approximate ``/``), optionally rounded up to a power of two
(``ROUND_SCALE``: add 0x7FFFFF to the bits and clear the mantissa, exact for positive normal
floats), ``q = float8_e4m3fn(x / scale)`` (round to nearest even).

With ``SILU`` the input row is ``[gate | up]`` (``up`` starts ``up_offset`` channels after
``gate``), and the value quantised (or, without ``QUANT``, stored as bf16) is
``silu(gate) * up`` computed in fp32: one read of the gate/up GEMM output and one write of the
down GEMM's input, instead of a SiLU pass and a quantisation pass.

``INTERPRET`` (set under ``TRITON_INTERPRET=1`` only) works around the interpreter's wrong
fp32 -> fp8 and fp32 -> bf16 rounding (``_round_to_e4m3``, ``bf16_rne``); on the GPU the cast
instructions round correctly by themselves.

Channels are processed in blocks of 128 (``G`` blocks, the last one masked to the row width ``W``
when W is not a multiple of 128: allowed for the bf16 output only). Rows are addressed as ``[E, M]`` (a 2D input is E = 1): with ``HAS_COUNT`` only the rows
``m < count[e]`` of each expert are read and written (the masked low-latency layout), so the
padding rows of ``[E, max_tokens, ...]`` cost nothing but an early-exiting program.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ep_comm.kernels.triton.grouped_gemm import bf16_rne

#: Channels per scale.
GROUP = tl.constexpr(128)  # a constexpr global: Triton kernels may read only those


@triton.jit
def _round_to_e4m3(x):
    """``x`` (fp32, |x| <= 448) rounded to the nearest e4m3 value (ties to even), still fp32.

    Only for the interpreter (``INTERPRET``), whose fp32 -> fp8 cast forgets the exponent carry
    when the mantissa rounds up (1.997 -> 1.0): after this rounding the cast is exact. Normal
    e4m3 values (|x| >= 2**-6) keep 3 mantissa bits (round at bit 20 of the fp32 pattern);
    subnormals are multiples of 2**-9, rounded by adding and subtracting 2**14 (whose fp32 ulp
    is 2**-9).
    """
    bits = x.to(tl.int32, bitcast=True)
    expo = (bits >> 23) & 0xFF
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    sub = (tl.abs(x) + 16384.0) - 16384.0
    sub = tl.where(bits < 0, -sub, sub)
    return tl.where(expo >= 121, normal, sub)


@triton.jit
def quant_kernel(x_ptr, q_ptr, s_ptr, count_ptr,
                 M, W, G, up_offset,
                 stride_xe, stride_xm, stride_xc,
                 stride_qe, stride_qm, stride_qc,
                 stride_se, stride_sm, stride_sg,
                 BLOCK_G: tl.constexpr, SILU: tl.constexpr, QUANT: tl.constexpr,
                 HAS_COUNT: tl.constexpr, ROUND_SCALE: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0)
    e = (row // M).to(tl.int64)
    m = (row % M).to(tl.int64)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, GROUP)
    cols = offs_g[:, None] * GROUP + offs_c[None, :]  # [BLOCK_G, 128]
    ok = offs_g < G
    if HAS_COUNT:
        count = tl.load(count_ptr + e).to(tl.int64)
        ok = ok & (tl.zeros_like(offs_g) + m < count)
    mask = ok[:, None] & (cols < W)
    x_row = x_ptr + e * stride_xe + m * stride_xm
    x = tl.load(x_row + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        up = tl.load(x_row + (cols + up_offset) * stride_xc, mask=mask, other=0.0).to(tl.float32)
        x = x / (1.0 + tl.exp(-x)) * up
    q_ptrs = q_ptr + e * stride_qe + m * stride_qm + cols * stride_qc
    if QUANT:
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
        scale = tl.math.div_rn(amax, 448.0)
        if ROUND_SCALE:
            bits = scale.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFFFF) & 0x7F800000
            scale = bits.to(tl.float32, bitcast=True)
        q = tl.math.div_rn(x, scale[:, None])
        if INTERPRET:
            q = _round_to_e4m3(q)
        tl.store(q_ptrs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + e * stride_se + m * stride_sm + offs_g * stride_sg, scale, mask=ok)
    else:
        if INTERPRET:
            x = bf16_rne(x)
        tl.store(q_ptrs, x.to(q_ptr.dtype.element_ty), mask=mask)
