"""The FP8 format of ep_comm: one definition shared by the reference backend, the MoE layer and
the kernels (``kernels/cuda/low_latency_common.cuh`` and ``kernels/triton/quant.py`` follow it
step by step; the constants come from ``ep_comm.core.constants``).

Per token, every block of ``FP8_BLOCK`` = 128 channels gets one float32 scale:

    amax  = max(|x[block]|) clamped below at 1e-4      (float32)
    scale = amax / 448                                 (IEEE division, correctly rounded)
    scale = next power of two >= scale                 (only with round_scale / use_ue8m0)
    q     = float8_e4m3fn(x / scale)                   (round to nearest even, |x/scale| <= 448)

With ``use_ue8m0`` the scales are powers of two and are stored as their 8-bit biased exponent,
four consecutive blocks packed little-endian into one int32 (hidden must divide by 512).

Each step is exact IEEE arithmetic, so a kernel that follows it gives bit-identical results.
"""
from __future__ import annotations

import torch

from ep_comm.core.constants import FP8_AMAX_MIN as AMAX_MIN
from ep_comm.core.constants import FP8_BLOCK, FP8_MAX

#: The one FP8 dtype of ep_comm (activations, weights, the low-latency payload).
FP8_DTYPE = torch.float8_e4m3fn


def ceil_pow2(v: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= v (v > 0, float32), computed exactly through frexp."""
    mantissa, exponent = torch.frexp(v)  # v = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(v), exponent)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False):
    """Cast ``x [T, H]`` (bf16 or float32) to ``(x_fp8 [T, H] float8_e4m3fn, scales)``.

    ``scales`` is ``[T, H // 128]`` float32, or with ``use_ue8m0`` ``[T, H // 512]`` int32
    (packed exponents; implies ``round_scale``). H must divide by 128 (512 with ue8m0).
    """
    t, h = x.shape
    if h % FP8_BLOCK:
        raise ValueError(f"hidden {h} must be a multiple of {FP8_BLOCK} for the fp8 cast")
    if use_ue8m0 and h % (4 * FP8_BLOCK):
        raise ValueError(f"hidden {h} must be a multiple of {4 * FP8_BLOCK} with use_ue8m0")
    xf = x.float().view(t, h // FP8_BLOCK, FP8_BLOCK)
    amax = xf.abs().amax(dim=-1).clamp(min=AMAX_MIN)
    # A tensor divisor, not the Python float: torch's CUDA division by a CPU scalar multiplies
    # by its reciprocal (fl(1/448) is inexact), which would make the cast device-dependent.
    scale = amax / torch.full_like(amax, FP8_MAX)
    if round_scale or use_ue8m0:
        scale = ceil_pow2(scale)
    q = (xf / scale.unsqueeze(-1)).to(FP8_DTYPE).view(t, h)
    if use_ue8m0:
        return q, pack_ue8m0(scale)
    return q, scale


def pack_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales ``[..., G]`` into int32 ``[..., G // 4]`` exponent bytes."""
    exp_bytes = (scale.contiguous().view(torch.int32) >> 23) & 0xFF
    g = exp_bytes.shape[-1]
    b = exp_bytes.view(*exp_bytes.shape[:-1], g // 4, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_ue8m0``: int32 ``[..., G // 4]`` -> float32 scales ``[..., G]``."""
    parts = [(packed >> (8 * j)) & 0xFF for j in range(4)]
    exp_bytes = torch.stack(parts, dim=-1).flatten(-2)
    return (exp_bytes << 23).view(torch.float32)


def dequantize(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of an fp8 tuple; ``scales`` float32 ``[..., H // 128]`` or packed int32."""
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    h = x_fp8.shape[-1]
    xf = x_fp8.float().view(*x_fp8.shape[:-1], h // FP8_BLOCK, FP8_BLOCK)
    return (xf * scales.unsqueeze(-1)).view(x_fp8.shape)


def column_major_last2(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t [..., A, B]`` whose last two dims are stored column-major (stride(-2) == 1)."""
    out = torch.empty(*t.shape[:-2], t.shape[-1], t.shape[-2], dtype=t.dtype, device=t.device)
    out = out.transpose(-1, -2)
    out.copy_(t)
    return out
