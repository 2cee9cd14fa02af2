"""An independent model of the contract (../shared/API.md), written with plain Python loops.

It shares no code with ep_comm: every test compares a backend's output with what these loops
say, computed from the inputs of *all* ranks (each rank regenerates every rank's inputs from
the same seeds, so no communication is needed to know the expected answer).
"""
from __future__ import annotations

import torch


def owner(expert: int, num_experts: int, num_ranks: int) -> int:
    return expert // (num_experts // num_ranks)


def ranks_of_token(row, num_experts, num_ranks) -> list[int]:
    """Sorted distinct ranks owning the experts in one top-k row (-1 skipped)."""
    return sorted({owner(int(e), num_experts, num_ranks) for e in row.tolist() if e >= 0})


def layout(topk_idx, num_experts, num_ranks, ranks_per_node):
    t = topk_idx.shape[0]
    per_rank = [0] * num_ranks
    per_expert = [0] * num_experts
    in_rank = [[False] * num_ranks for _ in range(t)]
    nodes = num_ranks // ranks_per_node
    per_node = [0] * nodes
    for i in range(t):
        seen_nodes = set()
        for r in ranks_of_token(topk_idx[i], num_experts, num_ranks):
            per_rank[r] += 1
            in_rank[i][r] = True
            seen_nodes.add(r // ranks_per_node)
        for n in seen_nodes:
            per_node[n] += 1
        for e in set(int(v) for v in topk_idx[i].tolist() if v >= 0):
            per_expert[e] += 1
    return per_rank, (per_node if nodes > 1 else None), per_expert, in_rank


def dispatch(dst, xs, topk_idxs, topk_weights, num_experts, alignment=1):
    """What rank ``dst`` receives. ``xs[r]``: [T_r, ...] tensor of rank r (any dtype, any
    trailing shape: payload or scales), ``topk_idxs[r]``, ``topk_weights[r]`` (or None).

    Returns dict with lists: rows (tensors), topk (lists of local ids), weights (lists),
    src (source rank, token index) and counts (per local expert, aligned).
    """
    num_ranks = len(xs)
    per_rank = num_experts // num_ranks
    lo = dst * per_rank
    rows, topk, weights, src = [], [], [], []
    counts = [0] * per_rank
    for s in range(num_ranks):
        for t in range(topk_idxs[s].shape[0]):
            row = topk_idxs[s][t].tolist()
            if dst not in ranks_of_token(topk_idxs[s][t], num_experts, num_ranks):
                continue
            rows.append(xs[s][t])
            topk.append([e - lo if lo <= e < lo + per_rank else -1 for e in row])
            if topk_weights is not None:
                weights.append(topk_weights[s][t].tolist())
            src.append((s, t))
            for e in set(row):
                if lo <= e < lo + per_rank:
                    counts[e - lo] += 1
    aligned = [(c + alignment - 1) // alignment * alignment for c in counts]
    return {"rows": rows, "topk": topk, "weights": weights, "src": src, "counts": counts,
            "aligned": aligned}


def combine(me, num_tokens, recv_src_by_rank, ys_by_rank, bias=None):
    """combined_x of rank ``me``: for every rank r, every row i that r received from (me, t)
    adds ``ys_by_rank[r][i]`` to token t, in float64. ``recv_src_by_rank[r]`` lists the
    (source rank, token) of r's received rows."""
    hidden = next((y.shape[1] for y in ys_by_rank if y.dim() == 2), 0)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for r, srcs in enumerate(recv_src_by_rank):
        for i, (s, t) in enumerate(srcs):
            if s == me:
                acc[t] += ys_by_rank[r][i].double()
    if bias is not None:
        for b in bias:
            acc += b.double()
    return acc


def low_latency_dispatch(dst, xs, topk_idxs, num_experts, masked=()):
    """Per local expert of ``dst``, per source rank (not masked): the list of (token index,
    row) it must receive, in token order."""
    num_ranks = len(xs)
    per_rank = num_experts // num_ranks
    out = {}
    for e in range(per_rank):
        g = dst * per_rank + e
        for s in range(num_ranks):
            if s in masked and s != dst:
                continue
            out[(e, s)] = [(t, xs[s][t]) for t in range(topk_idxs[s].shape[0])
                           if g in topk_idxs[s][t].tolist()]
    return out


def low_latency_combine(me, topk_idx, topk_weights, expert_out, num_experts, num_ranks,
                        masked=()):
    """combined[t] = sum_k w[t, k] * expert_out(rank, local expert, t) in float64, where
    ``expert_out(r, e, t)`` returns the row rank r's expert e produced for token (me, t);
    experts on masked ranks contribute nothing."""
    t_n, k_n = topk_idx.shape
    rows = []
    for t in range(t_n):
        acc = None
        for k in range(k_n):
            g = int(topk_idx[t, k])
            if g < 0:
                continue
            r = owner(g, num_experts, num_ranks)
            if r in masked and r != me:
                continue
            v = expert_out(r, g - r * (num_experts // num_ranks), t).double() * float(topk_weights[t, k])
            acc = v if acc is None else acc + v
        rows.append(acc)
    return rows


# ------------------------------------------------------------------------------ FP8 (e4m3fn)
# Written from the format's definition, sharing nothing with ep_comm.core.fp8 (nor torch's
# float8 cast): every value is encoded to its 8 bits here and compared bit for bit.
#
# e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no infinities; exponent field
# 0 is subnormal (m / 8 * 2**-6); the largest finite value is 0b0_1111_110 = 448; 0x7F is NaN.
# A block of 128 channels of one token shares one float32 scale:
#   amax = max |x| over the block, at least 1e-4; scale = amax / 448 (float32 division);
#   optionally rounded up to a power of two; q = e4m3(x / scale) rounded to nearest even.
# ue8m0 stores a power-of-two scale as its 8-bit biased float32 exponent, four blocks per
# int32, block 4j + i in byte i (bits 8i..8i+7, little-endian).

E4M3_MAX = 448.0
E4M3_MIN_NORMAL_EXP = -6
E4M3_MANTISSA_BITS = 3
SCALE_BLOCK = 128
AMAX_FLOOR = 1e-4


def e4m3_bits(v: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3fn codes of float32 ``v`` (any shape), round to nearest even; |v| must round
    to at most 448 (the cast never sees larger values: scale = amax / 448)."""
    a = v.double().abs()  # exact: float64 holds every float32
    sign = (torch.signbit(v.float())).to(torch.int64) << 7
    _, e2 = torch.frexp(a)                 # a = f * 2**e2, f in [0.5, 1); a = 0 -> e2 = 0
    exp = torch.clamp(e2 - 1, min=E4M3_MIN_NORMAL_EXP)  # unbiased exponent of the code
    step = torch.ldexp(torch.ones_like(a), exp - E4M3_MANTISSA_BITS)  # spacing at that exponent
    m = torch.round(a / step).to(torch.int64)  # a / step is exact; round() is half-to-even
    # m in [0, 16]: 8..15 normal significands, 0..7 subnormal (exp = -6), 16 = next exponent.
    carry = m == 16
    exp = exp + carry.to(torch.int64)
    m = torch.where(carry, torch.full_like(m, 8), m)
    normal = m >= 8
    field = torch.where(normal, exp + 7, torch.zeros_like(exp))
    frac = torch.where(normal, m - 8, m)
    if bool(((field > 15) | ((field == 15) & (frac == 7))).any()):
        raise ValueError("value above 448 reached the e4m3 cast")
    return (sign | (field << 3) | frac).to(torch.uint8)


def e4m3_value(bits: torch.Tensor) -> torch.Tensor:
    """float64 value of uint8 e4m3fn codes (0x7F/0xFF, NaN, map to nan)."""
    b = bits.to(torch.int64)
    field, frac = (b >> 3) & 0xF, b & 0x7
    mag = torch.where(field == 0, torch.ldexp(frac.double() / 8, torch.full_like(b, -6)),
                      torch.ldexp(1 + frac.double() / 8, field - 7))
    mag = torch.where((field == 15) & (frac == 7), torch.full_like(mag, float("nan")), mag)
    return torch.where(((b >> 7) & 1) == 1, -mag, mag)


def pow2_ceil_f32(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= positive normal float32 ``s``, through the float32 bits."""
    bits = s.float().contiguous().view(torch.int32).to(torch.int64)
    exp_field, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    exp_field = exp_field + (mant != 0).to(torch.int64)
    return (exp_field << 23).to(torch.int32).view(torch.float32)


def fp8_scales(x: torch.Tensor, round_scale: bool = False) -> torch.Tensor:
    """float32 [T, H // 128] scales of ``x [T, H]`` (bf16 or float32)."""
    t, h = x.shape
    xf = x.float().reshape(t, h // SCALE_BLOCK, SCALE_BLOCK)
    amax = torch.maximum(xf.abs().amax(dim=-1), torch.tensor(AMAX_FLOOR, dtype=torch.float32))
    scale = amax / torch.tensor(E4M3_MAX, dtype=torch.float32)  # IEEE float32 division
    return pow2_ceil_f32(scale) if round_scale else scale


def ue8m0_pack(scale: torch.Tensor) -> torch.Tensor:
    """int32 [T, G // 4]: power-of-two float32 scales [T, G] as exponent bytes, block 4j + i in
    byte i of word j."""
    exp_byte = (scale.float().contiguous().view(torch.int32).to(torch.int64) >> 23) & 0xFF
    t, g = exp_byte.shape
    words = torch.zeros(t, g // 4, dtype=torch.int64)
    for i in range(4):
        words |= exp_byte[:, i::4] << (8 * i)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement int32
    return words.to(torch.int32)


def ue8m0_unpack(words: torch.Tensor) -> torch.Tensor:
    """float32 [T, G] scales 2**(byte - 127) of packed int32 [T, G // 4] words."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    t, n = w.shape
    out = torch.empty(t, n * 4, dtype=torch.float64)
    for i in range(4):
        out[:, i::4] = torch.ldexp(torch.ones(t, n, dtype=torch.float64),
                                   ((w >> (8 * i)) & 0xFF) - 127)
    return out.float()


def fp8_quantize(x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False):
    """(uint8 e4m3 codes [T, H], scales) of ``x [T, H]``: scales float32 [T, H // 128], or with
    ``use_ue8m0`` packed int32 [T, H // 512] (which implies power-of-two scales)."""
    t, h = x.shape
    scale = fp8_scales(x, round_scale or use_ue8m0)
    xf = x.float().reshape(t, h // SCALE_BLOCK, SCALE_BLOCK)
    q = e4m3_bits((xf / scale.unsqueeze(-1)).reshape(t, h))  # float32 division, then encode
    return q, (ue8m0_pack(scale) if use_ue8m0 else scale)


def fp8_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 [T, H] values of e4m3 codes [T, H] (uint8) with float32 or packed int32 scales."""
    if scales.dtype == torch.int32:
        scales = ue8m0_unpack(scales)
    t, h = codes.shape
    v = e4m3_value(codes).reshape(t, h // SCALE_BLOCK, SCALE_BLOCK)
    return (v * scales.double().unsqueeze(-1)).reshape(t, h)


def fp8_codes(t: torch.Tensor) -> torch.Tensor:
    """The uint8 bits of an fp8 tensor (or of uint8 codes)."""
    return t.contiguous().view(torch.uint8) if t.dtype != torch.uint8 else t
