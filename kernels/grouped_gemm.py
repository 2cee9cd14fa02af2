"""Triton grouped GEMMs of the MoE experts, on the two layouts that dispatch produces.

For every local expert ``e``: ``out[rows of e] = a[rows of e] @ b[e].T`` (``b[e]`` is ``[N, K]``,
the PyTorch ``nn.Linear`` weight layout, so both operands are K-contiguous, which is what the
FP8 tensor-core instructions want), fp32 accumulation, bf16 output.

* ``contiguous_gemm_kernel`` (normal mode): ``a [M_total, K]``; expert ``e`` owns the rows
  ``[end[e-1], end[e-1] + rows[e])`` (``end`` = cumulative group ends as in
  ``torch._grouped_mm``'s ``offs``, ``rows[e]`` <= ``end[e] - end[e-1]`` the valid rows, the rest
  being alignment padding that is neither computed nor written). Persistent: every program walks
  the flat tile list ``pid, pid + NUM_PROGRAMS, ...``; the tile -> (expert, m tile, n tile) map is
  computed inside the kernel from the group ends (a cumulative sum over at most ``E_POW2``
  experts), so the launch needs no host synchronisation. Within an expert the m tiles are the
  inner index, so the programs that run at the same time share one weight tile (one HBM read,
  L2 hits for the others).
* ``masked_gemm_kernel`` (low-latency mode): ``a [E, M, K]``, rows ``[0, count[e])`` valid. Grid
  ``(n tiles, E)``; a program loops over the valid m tiles of its expert (none when the count is
  0), so each weight tile is read once when ``BLOCK_M`` covers the count. Rows past the count
  are not loaded (row indices are clamped into the valid range) and not stored.
  ``SWAP_AB`` computes ``(b_tile @ a_tile.T)`` so that the weight tile fills the MMA's M
  dimension and a handful of tokens its N dimension (decode shapes).

FP8 (``FP8=True``): ``a`` and ``b`` are float8_e4m3fn; ``a`` has one float32 scale per row per
128 channels (``a_s[row, k // 128]``, any strides: row-major from normal dispatch, column-major
from low-latency dispatch), ``b`` one per 128 x 128 block (``b_s[e, n // 128, k // 128]``,
DeepSeek-V3). Every ``BLOCK_K`` (<= 128, divides 128) slice is multiplied on the tensor cores in
FP8 and added to the fp32 accumulator scaled by ``a_s * b_s`` (the promotion DeepGEMM does).

``INTERPRET`` (set by the launchers under ``TRITON_INTERPRET=1`` only) works around two
interpreter bugs: it multiplies bfloat16 ``tl.dot`` operands wrongly (triton issue #11584), so
operands are upcast to fp32 there (exact); and its fp32 -> bf16 cast truncates instead of
rounding to nearest even, so ``bf16_rne`` rounds first (the GPU's cast rounds by itself).
Offsets that can pass 2**31 (expert and row strides) are computed in int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

#: Channels per FP8 scale along K (activations and weights) and rows per weight scale along N.
SCALE_BLOCK = 128


@triton.jit
def bf16_rne(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still fp32, so that the
    interpreter's truncating cast to bf16 afterwards is exact. Finite values only."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_tile(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, K, stride_ak, stride_bk, stride_ask, stride_bsk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              FP8: tl.constexpr, INTERPRET: tl.constexpr, EVEN_K: tl.constexpr,
              SWAP_AB: tl.constexpr):
    """One output tile: the K loop over ``a_ptrs [BM, 1]`` rows and ``b_ptrs [1, BN]`` columns.

    ``as_ptrs [BM]`` / ``bs_ptrs [BN]`` point at k-block 0 of the row / column scales (FP8 only).
    Returns the fp32 accumulator, ``[BN, BM]`` when ``SWAP_AB`` else ``[BM, BN]``.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptrs + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptrs + offs_k[:, None] * stride_bk  # [BK, BN]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k + k0 < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if INTERPRET:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP8:
            kb = k0 // 128
            a_s = tl.load(as_ptrs + kb * stride_ask)
            b_s = tl.load(bs_ptrs + kb * stride_bsk)
            if SWAP_AB:
                acc += tl.dot(tl.trans(b), tl.trans(a)) * (b_s[:, None] * a_s[None, :])
            else:
                acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
        else:
            if SWAP_AB:
                acc = tl.dot(tl.trans(b), tl.trans(a), acc)
            else:
                acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def contiguous_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, group_end_ptr, group_rows_ptr,
        M, N, K, E,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
        NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, E_POW2: tl.constexpr, HAS_ROWS: tl.constexpr, FP8: tl.constexpr,
        INTERPRET: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    # Per-expert row ranges and tile counts (E <= E_POW2, a few hundred at most).
    eidx = tl.arange(0, E_POW2)
    emask = eidx < E
    ends = tl.minimum(tl.load(group_end_ptr + eidx, mask=emask, other=0), M)
    starts = tl.minimum(tl.load(group_end_ptr + eidx - 1, mask=emask & (eidx > 0), other=0), M)
    rows = ends - starts
    if HAS_ROWS:
        rows = tl.minimum(rows, tl.load(group_rows_ptr + eidx, mask=emask, other=0))
    rows = tl.maximum(rows, 0)
    m_tiles = (rows + BLOCK_M - 1) // BLOCK_M
    n_tiles = tl.cdiv(N, BLOCK_N)
    tiles = m_tiles * n_tiles
    cum = tl.cumsum(tiles, 0)  # inclusive: expert e's tiles are [cum[e] - tiles[e], cum[e])
    total = tl.sum(tiles, 0)
    for tile in range(pid, total, NUM_PROGRAMS):
        e = tl.sum((cum <= tile).to(tl.int32), 0)
        sel = eidx == e
        first = tl.sum(tl.where(sel, cum - tiles, 0), 0)
        mt = tl.sum(tl.where(sel, m_tiles, 0), 0)
        start = tl.sum(tl.where(sel, starts, 0), 0)
        nrows = tl.sum(tl.where(sel, rows, 0), 0)
        local = tile - first
        pid_n = local // mt  # m tiles inner: concurrent programs share the weight tile
        pid_m = local - pid_n * mt
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Clamp instead of masking: out-of-range rows/columns reload a valid one, never stored.
        rows_a = (start + tl.minimum(offs_m, nrows - 1)).to(tl.int64)
        cols_b = tl.minimum(offs_n, N - 1)
        e64 = e.to(tl.int64)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am
        b_ptrs = b_ptr + e64 * stride_be + cols_b[None, :].to(tl.int64) * stride_bn
        as_ptrs = as_ptr + rows_a * stride_asm
        bs_ptrs = bs_ptr + e64 * stride_bse + (cols_b // 128) * stride_bsn
        acc = _dot_tile(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, K, stride_ak, stride_bk, stride_ask,
                        stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K, FP8, INTERPRET, EVEN_K, False)
        rows_c = (start + offs_m).to(tl.int64)
        c_ptrs = c_ptr + rows_c[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = (offs_m < nrows)[:, None] & (offs_n < N)[None, :]
        if INTERPRET:
            acc = bf16_rne(acc)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def masked_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, count_ptr,
        M, N, K,
        stride_ae, stride_am, stride_ak, stride_be, stride_bn, stride_bk,
        stride_ce, stride_cm, stride_cn,
        stride_ase, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        FP8: tl.constexpr, INTERPRET: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr):
    pid_n = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    count = tl.minimum(tl.load(count_ptr + e), M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_b = tl.minimum(offs_n, N - 1)
    b_ptrs = b_ptr + e * stride_be + cols_b[None, :].to(tl.int64) * stride_bn
    bs_ptrs = bs_ptr + e * stride_bse + (cols_b // 128) * stride_bsn
    for m0 in range(0, count, BLOCK_M):  # no iteration at all for an expert with no tokens
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows_a = tl.minimum(offs_m, count - 1).to(tl.int64)
        a_ptrs = a_ptr + e * stride_ae + rows_a[:, None] * stride_am
        as_ptrs = as_ptr + e * stride_ase + rows_a * stride_asm
        acc = _dot_tile(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, K, stride_ak, stride_bk, stride_ask,
                        stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K, FP8, INTERPRET, EVEN_K, SWAP_AB)
        c_base = c_ptr + e * stride_ce
        if SWAP_AB:  # acc is [BN, BM]
            c_ptrs = c_base + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None] * stride_cn
            c_mask = (offs_m < count)[None, :] & (offs_n < N)[:, None]
        else:
            c_ptrs = c_base + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
            c_mask = (offs_m < count)[:, None] & (offs_n < N)[None, :]
        if INTERPRET:
            acc = bf16_rne(acc)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
