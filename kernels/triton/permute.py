"""Triton kernels that move dispatched tokens into the per-expert contiguous layout and back.

Normal-mode dispatch returns rows ordered by source rank then token, each row carrying up to K
local expert ids (``recv_topk_idx``, -1 = not on this rank). ``dest [N, K] int32`` (computed by
``ep_comm.moe.group_by_expert``) names the row of the expert-contiguous buffer that copy k of row
n goes to (-1: none).

* ``expert_count_kernel`` / ``expert_dest_kernel``: the layout itself, grid ``[E, S]``: the
  row-major flattened ``[N, K]`` ids are cut into S slices of SPAN ids, and program (e, s)
  reads slice s in chunks. The count kernel sums ``id == e`` per slice (the programs of
  expert 0 also write ``dest = -1`` for ids outside ``[0, E)``); the dest kernel gets its
  group's start from all experts' aligned totals, adds expert e's copies in the slices before
  s and numbers its own by a running prefix sum, so copies keep their (row, slot) order within
  an expert: the same layout
  as the stable sort of ``ep_comm.moe.group_by_expert``'s torch path, in two launches instead of
  some thirty torch ops. That is what matters here: in normal mode this runs right after
  dispatch's host wait, with the GPU idle until the first GEMM is launched, so host launch time
  is GPU time: on one H200 the layout's host time went from 0.9-1.0 ms to 85 us. The price is
  E reads of the id array per kernel (256 experts x 32768 int64 ids: 67 MB, mostly from L2);
  the slices keep every program's loop short. GPU time on one H200
  (``bench/results/logs/layout-kernels-gpu-time-h200.txt``): 47 us for 32768 ids and 256
  experts (torch path 165), 50 us for 65536 ids and 128 experts (178), 46 us for 262144 ids and
  32 experts (272; 241 with one program per expert), 328 us for 262144 ids and 256 experts
  (228: there the reads of E x N x K ids, 537 MB, bound it; TP at 8 ranks).
* ``permute_kernel``: ``out[dest[n, k]] = x[n]`` for every k with ``dest >= 0``; one load of the
  row, up to K stores. With ``HAS_SCALES`` the FP8 scales row is copied along (program 0 of the
  row's column blocks).
* ``unpermute_kernel``: ``out[n] = sum_k w[n, k] * y[dest[n, k]]`` over ``dest >= 0``, in fp32,
  stored as bf16: the expert-output weighting and the reduction over a token's local experts,
  in one pass, before combine sends one row per token back. ``INTERPRET``: round to bf16
  explicitly (the interpreter's cast truncates; see ``grouped_gemm``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ep_comm.kernels.triton.grouped_gemm import bf16_rne


@triton.jit
def _load_ids(idx_ptr, start, NK, TOPK, stride_in, stride_ik, BLOCK: tl.constexpr):
    """Ids ``start .. start + BLOCK`` of the row-major flattened ``[N, K]`` array (their own
    integer type, compared exactly; -1 past the end) and their flat positions."""
    i = start + tl.arange(0, BLOCK)
    ok = i < NK
    n = (i // TOPK).to(tl.int64)
    key = tl.load(idx_ptr + n * stride_in + (i % TOPK) * stride_ik, mask=ok, other=-1)
    return key, i, ok


@triton.jit
def expert_count_kernel(idx_ptr, part_ptr, dest_ptr, NK, TOPK, E, SPAN,
                        stride_in, stride_ik, BLOCK: tl.constexpr):
    """Program (e, s): part[s, e] = #{ids == e among flat ids [s * SPAN, (s + 1) * SPAN)};
    the programs of e == 0 also set dest = -1 where the id is not a local expert (dest flat,
    contiguous ``[N, K]``)."""
    e = tl.program_id(0)
    sl = tl.program_id(1)
    total = tl.zeros((BLOCK,), dtype=tl.int32)
    for j in range(0, SPAN, BLOCK):
        key, i, ok = _load_ids(idx_ptr, sl * SPAN + j, NK, TOPK, stride_in, stride_ik, BLOCK)
        total += (key == e).to(tl.int32)
        if e == 0:
            tl.store(dest_ptr + i, tl.full((BLOCK,), -1, tl.int32),
                     mask=ok & ((key < 0) | (key >= E)))
    tl.store(part_ptr + sl * E + e, tl.sum(total, axis=0))


@triton.jit
def expert_dest_kernel(idx_ptr, part_ptr, dest_ptr, group_end_ptr, group_rows_ptr,
                       NK, TOPK, E, S, SPAN, ALIGN, stride_in, stride_ik,
                       BLOCK: tl.constexpr, E_POW2: tl.constexpr, S_POW2: tl.constexpr):
    """Program (e, s): dest of the copies of expert e among flat ids [s * SPAN, (s + 1) *
    SPAN): its group's start (the aligned totals of the experts before it) + its copies in the
    slices before s + its copies earlier in this slice, in (row, slot) order. The programs of
    slice 0 also write group_end[e] and group_rows[e]."""
    e = tl.program_id(0)
    sl = tl.program_id(1)
    es = tl.arange(0, E_POW2)
    ss = tl.arange(0, S_POW2)
    part = tl.load(part_ptr + ss[:, None] * E + es[None, :],
                   mask=(ss[:, None] < S) & (es[None, :] < E), other=0)
    cnt = tl.sum(part, axis=0)
    aligned = (cnt + ALIGN - 1) // ALIGN * ALIGN
    start_e = tl.sum(tl.where(es < e, aligned, 0), axis=0)
    if sl == 0:
        tl.store(group_end_ptr + e, start_e + tl.sum(tl.where(es == e, aligned, 0), axis=0))
        tl.store(group_rows_ptr + e, tl.sum(tl.where(es == e, cnt, 0), axis=0))
    seen = start_e + tl.sum(tl.sum(tl.where((ss[:, None] < sl) & (es[None, :] == e), part, 0),
                                   axis=1), axis=0)
    for j in range(0, SPAN, BLOCK):
        key, i, ok = _load_ids(idx_ptr, sl * SPAN + j, NK, TOPK, stride_in, stride_ik, BLOCK)
        hit = (key == e).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit  # copies of e earlier in this chunk
        tl.store(dest_ptr + i, seen + before, mask=ok & (hit != 0))
        seen += tl.sum(hit, axis=0)


@triton.jit
def permute_kernel(x_ptr, xs_ptr, dest_ptr, out_ptr, outs_ptr,
                   H, G, TOPK,
                   stride_xn, stride_on, stride_dn, stride_dk,
                   stride_xsn, stride_xsg, stride_osn, stride_osg,
                   BLOCK_H: tl.constexpr, G_POW2: tl.constexpr, HAS_SCALES: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs < H
    x = tl.load(x_ptr + n * stride_xn + offs, mask=hmask)
    if HAS_SCALES:
        offs_g = tl.arange(0, G_POW2)
        gmask = offs_g < G - hb * G_POW2  # only column block 0 copies the scales
        s = tl.load(xs_ptr + n * stride_xsn + offs_g * stride_xsg, mask=gmask)
    for k in range(TOPK):
        d = tl.load(dest_ptr + n * stride_dn + k * stride_dk).to(tl.int64)
        d_ok = tl.maximum(d, 0)
        tl.store(out_ptr + d_ok * stride_on + offs, x, mask=hmask & (offs * 0 + d >= 0))
        if HAS_SCALES:
            tl.store(outs_ptr + d_ok * stride_osn + offs_g * stride_osg, s,
                     mask=gmask & (offs_g * 0 + d >= 0))


@triton.jit
def unpermute_kernel(y_ptr, dest_ptr, w_ptr, out_ptr,
                     H, TOPK,
                     stride_yn, stride_on, stride_dn, stride_dk, stride_wn, stride_wk,
                     BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(TOPK):
        d = tl.load(dest_ptr + n * stride_dn + k * stride_dk).to(tl.int64)
        w = tl.load(w_ptr + n * stride_wn + k * stride_wk)
        ok = offs * 0 + d >= 0  # as a vector: the interpreter rejects scalar & vector masks
        y = tl.load(y_ptr + tl.maximum(d, 0) * stride_yn + offs, mask=hmask & ok, other=0.0)
        acc += y.to(tl.float32) * tl.where(ok, w, 0.0)
    if INTERPRET:
        acc = bf16_rne(acc)
    tl.store(out_ptr + n * stride_on + offs, acc.to(out_ptr.dtype.element_ty), mask=hmask)
