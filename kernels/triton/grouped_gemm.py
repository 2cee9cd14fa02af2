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
128 channels (``a_s[row, k // 128]``, any strides: the contiguous launcher hands column-major
ones, low-latency dispatch produces column-major ones), ``b`` one per 128 x 128 block
(``b_s[e, n // 128, k // 128]``, DeepSeek-V3). ``BLOCK_K`` = 128 = the scale block, and a tile's
columns share one weight-scale block (``BLOCK_N`` divides 128), or are two 128-wide halves with
one scale each (``BLOCK_N`` = 256, contiguous kernel: two accumulators share every A tile).
Every K step is one in-place MMA on a rescaled accumulator (``_fp8_dot_tile``): the promotion
``acc += s * (a @ b)`` that DeepGEMM does, without a second register tile. The scales are
loaded one K step ahead into registers (the software pipeliner turns the operand tiles into
async copies but leaves these small loads in place: loaded and used in the same step, each K
step waited a full global-memory latency on them).

``INTERPRET`` (set by the launchers under ``TRITON_INTERPRET=1`` only) works around two
interpreter bugs: it multiplies bfloat16 ``tl.dot`` operands wrongly (triton issue #11584), so
operands are upcast to fp32 there (exact); and its fp32 -> bf16 cast truncates instead of
rounding to nearest even, so ``bf16_rne`` rounds first (the GPU's cast rounds by itself).
Offsets that can pass 2**31 (expert and row strides) are computed in int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ep_comm.core.constants import FP8_BLOCK

try:  # host-side TMA descriptors (Triton >= 3.4); without them the kernels load by pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
    HAS_TMA = True
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None
    HAS_TMA = False

#: Channels per FP8 scale along K (activations and weights) and rows per weight scale along N.
SCALE_BLOCK = FP8_BLOCK
#: FP8 MMAs on Hopper add into their accumulator with a reduced-precision adder; Triton's default
#: for fp8 lets the whole K loop accumulate that way, and the rescaled accumulator carried across
#: K blocks then lost ~1e-3 relative over K = 7168 (the GPU tests caught it). Promoting every 128
#: (one scale block) makes the compiler add each block's MMA result into the fp32 tile exactly.
FP8_PROMOTE_K = tl.constexpr(128)


@triton.jit
def bf16_rne(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still fp32, so that the
    interpreter's truncating cast to bf16 afterwards is exact. Finite values only."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_ab(a_src, a_row, b_src, b_row, k0, K, offs_k, stride_ak, stride_bk,
             A_TMA: tl.constexpr, B_TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """The K step at ``k0`` of both operands: ``a [BM, BK]`` and ``b [BK, BN]``.

    Pointer mode: ``a_src [BM, 1]`` / ``b_src [1, BN]`` point at k = 0 of the tile's rows /
    columns. TMA mode: ``a_src`` / ``b_src`` are 2D tensor descriptors (blocks [BM, BK] and
    [BN, BK]) and ``a_row`` / ``b_row`` the tile's first row in them; TMA zero-fills past the
    tensor's end, so the K tail needs no mask.
    """
    if A_TMA:
        a = a_src.load([a_row, k0])
    elif EVEN_K:
        a = tl.load(a_src + (k0 + offs_k)[None, :] * stride_ak)
    else:
        a = tl.load(a_src + (k0 + offs_k)[None, :] * stride_ak,
                    mask=(k0 + offs_k < K)[None, :], other=0.0)
    if B_TMA:
        b = tl.trans(b_src.load([b_row, k0]))
    elif EVEN_K:
        b = tl.load(b_src + (k0 + offs_k)[:, None] * stride_bk)
    else:
        b = tl.load(b_src + (k0 + offs_k)[:, None] * stride_bk,
                    mask=(k0 + offs_k < K)[:, None], other=0.0)
    return a, b


@triton.jit
def _dot_tile(a_src, a_row, b_src, b_row, K, stride_ak, stride_bk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              INTERPRET: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr,
              A_TMA: tl.constexpr, B_TMA: tl.constexpr):
    """One bf16 output tile: the K loop over the operands that ``_load_ab`` describes. Returns
    the fp32 accumulator, ``[BN, BM]`` when ``SWAP_AB`` else ``[BM, BN]``."""
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a, b = _load_ab(a_src, a_row, b_src, b_row, k0, K, offs_k, stride_ak, stride_bk,
                        A_TMA, B_TMA, EVEN_K)
        if INTERPRET:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SWAP_AB:
            acc = tl.dot(tl.trans(b), tl.trans(a), acc)
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fp8_dot_tile(a_src, a_row, b_src, b_row, as_ptrs, bs_ptr, K, stride_ak, stride_bk,
                  stride_ask, stride_bsk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  INTERPRET: tl.constexpr, SWAP_AB: tl.constexpr,
                  A_TMA: tl.constexpr, B_TMA: tl.constexpr):
    """One FP8 output tile with per-128 K-block scales, ``BLOCK_K`` = 128 = the scale block.

    Operands as in ``_load_ab`` (the columns lie inside one 128-row block of the weight
    scales: ``BLOCK_N`` divides 128); ``as_ptrs [BM]`` point at the rows' k-block-0 activation
    scales, ``bs_ptr`` (scalar) at the tile's k-block-0 weight scale. Returns the fp32
    accumulator ``[BM, BN]`` (``[BN, BM]`` when ``SWAP_AB``) of ``sum_kb s[kb] * (a_kb @ b_kb)``
    with ``s[kb] = a_s[row, kb] * b_s[kb]``.

    Rescaled accumulator: instead of ``acc += dot(a, b) * s`` (a second [BM, BN] fp32 register
    tile for the product and a [BN] vector of weight scales, which spilled at 128 x 256), the
    accumulator is kept in units of the current block's scale: ``acc' = acc / s[kb]``, so each
    step is ``acc' = dot(a, b, acc' * (s[kb-1] / s[kb]))``, accumulated in place by the tensor
    cores, and the tile is ``acc' * s[last]`` at the end. Exact up to one fp32 rounding per step.
    Scales are clamped below at 1e-30 (``ep_comm.core.fp8`` never produces less than 1e-4 / 448);
    ``acc'`` stays finite while ``|acc| / s`` < 3e38.
    """
    offs_k = tl.arange(0, 128)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
    nk = K // 128
    # Scales prefetched one K step ahead (registers): their load latency hides behind a step.
    a_s_next = tl.load(as_ptrs)
    b_s_next = tl.load(bs_ptr)
    for kb in range(0, nk):
        a, b = _load_ab(a_src, a_row, b_src, b_row, kb * 128, K, offs_k, stride_ak, stride_bk,
                        A_TMA, B_TMA, True)
        s = tl.maximum(a_s_next * b_s_next, 1e-30)  # [BM]
        kn = tl.minimum(kb + 1, nk - 1)  # the last step reloads its own block (unused)
        a_s_next = tl.load(as_ptrs + kn * stride_ask)
        b_s_next = tl.load(bs_ptr + kn * stride_bsk)
        r = s_prev / s
        if INTERPRET:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SWAP_AB:
            acc = tl.dot(tl.trans(b), tl.trans(a), acc * r[None, :], max_num_imprecise_acc=FP8_PROMOTE_K)
        else:
            acc = tl.dot(a, b, acc * r[:, None], max_num_imprecise_acc=FP8_PROMOTE_K)
        s_prev = s
    if SWAP_AB:
        acc = acc * s_prev[None, :]
    else:
        acc = acc * s_prev[:, None]
    return acc


@triton.jit
def _fp8_dot_tile_pair(a_src, a_row, b0_src, b1_src, b_row, as_ptrs, bs0_ptr, bs1_ptr, K,
                       stride_ak, stride_bk, stride_ask, stride_bsk,
                       BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr,
                       A_TMA: tl.constexpr, B_TMA: tl.constexpr):
    """``_fp8_dot_tile`` for a [BM, 256] tile as two [BM, 128] accumulators that share each
    activation tile (one A load feeds two MMAs: half the A traffic of two 128-wide tiles).

    Pointer mode: ``b0_src`` / ``b1_src [1, 128]`` point at k = 0 of the two halves' columns
    (clamped into the expert's N rows). TMA mode: both are the weight descriptor (block
    [128, 128]) and the halves start at rows ``b_row`` and ``b_row + 128``. ``bs0_ptr`` /
    ``bs1_ptr`` (scalars) point at the halves' k-block-0 weight scales. Returns (acc0, acc1),
    fp32 [BM, 128] each.
    """
    offs_k = tl.arange(0, 128)
    acc0 = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    s0_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
    s1_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
    nk = K // 128
    a_s_next = tl.load(as_ptrs)  # scales one K step ahead, as in _fp8_dot_tile
    b0_s_next = tl.load(bs0_ptr)
    b1_s_next = tl.load(bs1_ptr)
    for kb in range(0, nk):
        a, b0 = _load_ab(a_src, a_row, b0_src, b_row, kb * 128, K, offs_k, stride_ak, stride_bk,
                         A_TMA, B_TMA, True)
        if B_TMA:
            b1 = tl.trans(b1_src.load([b_row + 128, kb * 128]))
        else:
            b1 = tl.load(b1_src + (kb * 128 + offs_k)[:, None] * stride_bk)
        s0 = tl.maximum(a_s_next * b0_s_next, 1e-30)
        s1 = tl.maximum(a_s_next * b1_s_next, 1e-30)
        kn = tl.minimum(kb + 1, nk - 1)
        a_s_next = tl.load(as_ptrs + kn * stride_ask)
        b0_s_next = tl.load(bs0_ptr + kn * stride_bsk)
        b1_s_next = tl.load(bs1_ptr + kn * stride_bsk)
        if INTERPRET:
            a = a.to(tl.float32)
            b0 = b0.to(tl.float32)
            b1 = b1.to(tl.float32)
        acc0 = tl.dot(a, b0, acc0 * (s0_prev / s0)[:, None], max_num_imprecise_acc=FP8_PROMOTE_K)
        acc1 = tl.dot(a, b1, acc1 * (s1_prev / s1)[:, None], max_num_imprecise_acc=FP8_PROMOTE_K)
        s0_prev = s0
        s1_prev = s1
    return acc0 * s0_prev[:, None], acc1 * s1_prev[:, None]


@triton.jit
def _store_tile(c_base, acc, offs_m, offs_n, nrows, N, stride_cm, stride_cn,
                INTERPRET: tl.constexpr, SWAP_AB: tl.constexpr):
    """Stores the fp32 tile ``acc`` ([BM, BN], or [BN, BM] when ``SWAP_AB``) as bf16 at rows
    ``offs_m`` (< ``nrows``) and columns ``offs_n`` (< ``N``) of ``c_base``."""
    if SWAP_AB:
        c_ptrs = c_base + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None] * stride_cn
        c_mask = (offs_m < nrows)[None, :] & (offs_n < N)[:, None]
    else:
        c_ptrs = c_base + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        c_mask = (offs_m < nrows)[:, None] & (offs_n < N)[None, :]
    if INTERPRET:
        acc = bf16_rne(acc)
    tl.store(c_ptrs, acc.to(c_base.dtype.element_ty), mask=c_mask)


@triton.jit
def contiguous_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, group_end_ptr, group_rows_ptr,
        M, N, K, E,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
        NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, E_POW2: tl.constexpr, HAS_ROWS: tl.constexpr, FP8: tl.constexpr,
        INTERPRET: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr):
    """``TMA``: ``a_ptr`` is a descriptor of ``a [M, K]`` (block [BM, BK]) and ``b_ptr`` one of
    ``b`` viewed as ``[E * N, K]`` (block [BN, BK], or [128, 128] for the FP8 256-wide pair);
    rows of a tile past its expert's valid rows (or columns past N) then load the next group's
    data (or TMA's zeros past the end) into rows / columns that are never stored."""
    pid = tl.program_id(0)
    # Per-expert row ranges and tile counts (E <= E_POW2, a few hundred at most), once per
    # program: the tile loop below only selects from these vectors.
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
    # inclusive: expert e's tiles are [cum[e] - tiles[e], cum[e]); grouped_gemm_ws.py's
    # _group_table / _tile_coords write the same schedule in Gluon
    cum = tl.cumsum(tiles, 0)
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
        # Clamp instead of masking: out-of-range rows/columns reload a valid one, never stored.
        rows_a = (start + tl.minimum(offs_m, nrows - 1)).to(tl.int64)
        e64 = e.to(tl.int64)
        a_row = start + pid_m * BLOCK_M  # TMA coordinates
        b_row = e * N + pid_n * BLOCK_N
        if TMA:
            a_src = a_ptr
        else:
            a_src = a_ptr + rows_a[:, None] * stride_am
        c_base = c_ptr + start.to(tl.int64) * stride_cm
        if FP8 and BLOCK_N > 128:  # two 128-column halves, one scale block each
            offs_n = pid_n * BLOCK_N + tl.arange(0, 128)
            if TMA:
                b0_src = b_ptr
                b1_src = b_ptr
            else:
                b_e = b_ptr + e64 * stride_be
                b0_src = b_e + tl.minimum(offs_n, N - 1)[None, :].to(tl.int64) * stride_bn
                b1_src = b_e + tl.minimum(offs_n + 128, N - 1)[None, :].to(tl.int64) * stride_bn
            nb = pid_n * (BLOCK_N // 128)  # scale block of the first half
            bs_e = bs_ptr + e64 * stride_bse
            bs1 = tl.minimum(nb + 1, (N - 1) // 128)  # a half past N: clamped, never stored
            acc0, acc1 = _fp8_dot_tile_pair(
                a_src, a_row, b0_src, b1_src, b_row, as_ptr + rows_a * stride_asm,
                bs_e + nb * stride_bsn, bs_e + bs1 * stride_bsn, K, stride_ak, stride_bk,
                stride_ask, stride_bsk, BLOCK_M, INTERPRET, TMA, TMA)
            _store_tile(c_base, acc0, offs_m, offs_n, nrows, N, stride_cm, stride_cn,
                        INTERPRET, False)
            _store_tile(c_base, acc1, offs_m, offs_n + 128, nrows, N, stride_cm, stride_cn,
                        INTERPRET, False)
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            if TMA:
                b_src = b_ptr
            else:
                cols_b = tl.minimum(offs_n, N - 1)
                b_src = b_ptr + e64 * stride_be + cols_b[None, :].to(tl.int64) * stride_bn
            if FP8:  # BLOCK_N divides 128: the tile's columns share one weight-scale block
                bs_ptrs = bs_ptr + e64 * stride_bse + ((pid_n * BLOCK_N) // 128) * stride_bsn
                acc = _fp8_dot_tile(a_src, a_row, b_src, b_row, as_ptr + rows_a * stride_asm,
                                    bs_ptrs, K, stride_ak, stride_bk, stride_ask, stride_bsk,
                                    BLOCK_M, BLOCK_N, INTERPRET, False, TMA, TMA)
            else:
                acc = _dot_tile(a_src, a_row, b_src, b_row, K, stride_ak, stride_bk, BLOCK_M,
                                BLOCK_N, BLOCK_K, INTERPRET, EVEN_K, False, TMA, TMA)
            _store_tile(c_base, acc, offs_m, offs_n, nrows, N, stride_cm, stride_cn,
                        INTERPRET, False)


@triton.jit
def masked_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, count_ptr,
        M, N, K,
        stride_ae, stride_am, stride_ak, stride_be, stride_bn, stride_bk,
        stride_ce, stride_cm, stride_cn,
        stride_ase, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        FP8: tl.constexpr, INTERPRET: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr,
        TMA: tl.constexpr):
    """``TMA``: ``b_ptr`` is a descriptor of the weights viewed as ``[E * N, K]`` (block
    [BN, BK]); the activations are always loaded through (clamped) pointers, so rows past an
    expert's count are never read."""
    pid_n = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    count = tl.minimum(tl.load(count_ptr + e), M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_row = (e * N + pid_n * BLOCK_N).to(tl.int32)
    if TMA:
        b_src = b_ptr
    else:
        cols_b = tl.minimum(offs_n, N - 1)
        b_src = b_ptr + e * stride_be + cols_b[None, :].to(tl.int64) * stride_bn
    # FP8: BLOCK_N divides 128, so the tile's weight rows share one scale block.
    bs_ptrs = bs_ptr + e * stride_bse + ((pid_n * BLOCK_N) // 128) * stride_bsn
    c_base = c_ptr + e * stride_ce
    for m0 in range(0, count, BLOCK_M):  # no iteration at all for an expert with no tokens
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows_a = tl.minimum(offs_m, count - 1).to(tl.int64)
        a_ptrs = a_ptr + e * stride_ae + rows_a[:, None] * stride_am
        if FP8:
            as_ptrs = as_ptr + e * stride_ase + rows_a * stride_asm
            acc = _fp8_dot_tile(a_ptrs, 0, b_src, b_row, as_ptrs, bs_ptrs, K, stride_ak,
                                stride_bk, stride_ask, stride_bsk, BLOCK_M, BLOCK_N, INTERPRET,
                                SWAP_AB, False, TMA)
        else:
            acc = _dot_tile(a_ptrs, 0, b_src, b_row, K, stride_ak, stride_bk, BLOCK_M, BLOCK_N,
                            BLOCK_K, INTERPRET, EVEN_K, SWAP_AB, False, TMA)
        _store_tile(c_base, acc, offs_m, offs_n, count, N, stride_cm, stride_cn, INTERPRET,
                    SWAP_AB)
