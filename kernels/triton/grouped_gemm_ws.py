"""Warp-specialized FP8 grouped GEMM on the contiguous (normal-mode) layout, for Hopper (sm_90),
written in Gluon (Triton's explicit-layout dialect: the warps, barriers and MMA waits are ours).

Same function as ``kernels/grouped_gemm.py``'s ``contiguous_gemm_kernel`` with ``FP8=True``:
``out[rows of e] = (a[rows] * a_s) @ (b[e] * b_s).T`` with per-row-per-128-channel activation
scales and 128 x 128 block weight scales (DeepSeek-V3), fp32 accumulation, bf16 output; rows
past an expert's valid count are neither computed into ``out`` nor written.

Why a second kernel. Block scales must be applied once per 128-wide K step, and Hopper's FP8
MMA accumulates in reduced precision, so each K step's product is computed from zero and then
added in fp32 with its scale (``acc += p * s``: the "promotion" of DeepGEMM). In the plain Triton
kernel that needs the product and the accumulator tile in registers at once (255 registers and
spills at 256 x 128 with 8 warps), every warp waits for its MMA before the scaled add, and the
software pipeline keeps all warps of the block in lockstep (a block-wide barrier per K step), so
the tensor cores idle during every add: 0.90-0.98 PFLOP/s at DeepSeek-V3 gate_up shapes.

Here each block has three roles that run concurrently and meet only at shared-memory barriers:

* a producer warp (40 registers) that issues the TMA loads of the A and B tiles into a
  ``STAGES``-deep ring (``ready[s]`` signalled by TMA's byte count, ``empty[s]`` by the
  consumers);
* two consumer warpgroups (232 registers each), each owning 64 of the tile's 128 rows and all
  256 columns as two 128-column halves (one weight-scale block each): per K step and half,
  ``p = wgmma(a, b)`` from zero, wait, ``acc_h += p * (a_s[row] * b_s[h])``. One product tile
  (64 registers) is reused for both halves, so 2 x 64 accumulator + 64 product registers fit.
  The two warpgroups are not synchronised with each other: while one adds, the other's MMA runs.

Tile order as in the Triton kernel (persistent blocks walk ``pid, pid + NUM_PROGRAMS, ...`` over
the flat tile list; within an expert the m tiles are the inner index so that concurrently running
blocks share the weight tile through L2); every role decodes the same tile sequence from the
group ends itself, so no host synchronisation and no tile table in memory.

Shared memory: ``STAGES`` x (128 x 128 + 256 x 128) bytes = 48 KB per stage, 3 stages, and the
epilogue's layout-conversion scratch (8 KB per consumer warpgroup, allocated by the compiler).
Gluon kernels do not run under ``TRITON_INTERPRET``; the CPU tests exercise the Triton kernel and
the GPU tests compare this one with the float64 reference and with the Triton kernel.
"""
from __future__ import annotations

import functools

__all__ = ["HAS_GLUON", "TensorDescriptor", "fp8_contiguous_ws_kernel", "smem_layouts"]

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_wait, fence_async_shared)
    # Triton 3.6 names the TMA load async_copy_global_to_shared; 3.9 renamed it async_load.
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    HAS_GLUON = True
except ImportError:  # pragma: no cover - Triton without Gluon's Hopper API
    HAS_GLUON = False

#: Tile of one block: rows (two consumer warpgroups of 64), columns (two weight-scale blocks), K.
BLOCK_M = 128
BLOCK_N = 256
BLOCK_K = 128
#: Depth of the shared-memory ring (3 x 48 KB): on one H200, 5 alternating rounds at
#: DeepSeek-V3 shapes, 128-1024 rows per expert, summed over both GEMMs, 3 stages beat 4 by 1%
#: and 2 by 3% (bench/results/logs/gemm-bench-h200-ws.txt).
STAGES = 3
#: Registers per thread of the consumer warpgroups and of the producer warp's warpgroup
#: (setmaxnreg; 2 x 128 x 232 + 128 x 40 = 64512 of the SM's 65536).
CONSUMER_REGS = 232
PRODUCER_REGS = 40
#: Registers per thread at launch: 12 warps (2 consumer warpgroups + the producer's warpgroup).
LAUNCH_MAXNREG = 168


@functools.lru_cache(maxsize=None)
def smem_layouts():
    """(A tile, B tile) NVMMA shared layouts: K-contiguous, 128-byte swizzle (what TMA writes
    and wgmma reads). Cached: building them costs tens of microseconds per GEMM launch."""
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float8e4nv),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float8e4nv))


if HAS_GLUON:
    _CONSUMER_REGS = gl.constexpr(CONSUMER_REGS)
    _PRODUCER_REGS = gl.constexpr(PRODUCER_REGS)

    @gluon.jit
    def _add(x, y):
        return x + y

    @gluon.jit
    def _group_table(group_end_ptr, group_rows_ptr, M, E, N, E_POW2: gl.constexpr,
                     HAS_ROWS: gl.constexpr, TILE_M: gl.constexpr, TILE_N: gl.constexpr,
                     WARPS: gl.constexpr):
        """Per-expert (start row, valid rows, m tiles, inclusive tile cumsum) as [E_POW2]
        vectors spread over ``WARPS`` warps, and the total tile count."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        eidx = gl.arange(0, E_POW2, layout=layout)
        emask = eidx < E
        ends = gl.minimum(gl.load(group_end_ptr + eidx, mask=emask, other=0), M)
        starts = gl.minimum(gl.load(group_end_ptr + eidx - 1, mask=emask & (eidx > 0), other=0), M)
        rows = ends - starts
        if HAS_ROWS:
            rows = gl.minimum(rows, gl.load(group_rows_ptr + eidx, mask=emask, other=0))
        rows = gl.maximum(rows, 0)
        m_tiles = (rows + TILE_M - 1) // TILE_M
        tiles = m_tiles * gl.cdiv(N, TILE_N)
        cum = gl.associative_scan(tiles, 0, _add)  # inclusive (gl.cumsum is newer than 3.6)
        return eidx, starts, rows, m_tiles, cum, tiles, gl.sum(tiles, 0)

    @gluon.jit
    def _tile_coords(tile, eidx, starts, rows, m_tiles, cum, tiles):
        """Flat tile index -> (expert, first row, valid rows, m tile, n tile). The same schedule
        as ``kernels/grouped_gemm.py``'s ``contiguous_gemm_kernel`` (Gluon functions cannot call
        Triton ones): keep the two in step, the GPU tests compare the kernels' outputs."""
        e = gl.sum((cum <= tile).to(gl.int32), 0)
        sel = eidx == e
        first = gl.sum(gl.where(sel, cum - tiles, 0), 0)
        mt = gl.sum(gl.where(sel, m_tiles, 0), 0)
        start = gl.sum(gl.where(sel, starts, 0), 0)
        nrows = gl.sum(gl.where(sel, rows, 0), 0)
        local = tile - first
        pid_n = local // mt  # m tiles inner: concurrent blocks share the weight tile
        pid_m = local - pid_n * mt
        return e, start, nrows, pid_m, pid_n

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, group_end_ptr, group_rows_ptr,
                  M, N, K, E, NUM_PROGRAMS: gl.constexpr, E_POW2: gl.constexpr,
                  HAS_ROWS: gl.constexpr):
        """One warp: TMA loads of every K step of every tile of this block into the ring."""
        TILE_M: gl.constexpr = a_bufs.type.shape[1]
        TILE_N: gl.constexpr = b_bufs.type.shape[1]
        TILE_K: gl.constexpr = a_bufs.type.shape[2]
        NSTAGE: gl.constexpr = a_bufs.type.shape[0]
        eidx, starts, rows, m_tiles, cum, tiles, total = _group_table(
            group_end_ptr, group_rows_ptr, M, E, N, E_POW2, HAS_ROWS, TILE_M, TILE_N, 1)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        nk = K // TILE_K
        it = 0
        for tile in range(gl.program_id(0), total, NUM_PROGRAMS):
            e, start, nrows, pid_m, pid_n = _tile_coords(tile, eidx, starts, rows, m_tiles, cum,
                                                         tiles)
            a_row = start + pid_m * TILE_M
            b_row = e * N + pid_n * TILE_N  # b viewed as [E * N, K]
            for kb in range(nk):
                s = it % NSTAGE
                # A slot is free once both consumer warpgroups released it; barriers start in
                # phase 1 complete, so the first pass over the ring does not wait.
                mbarrier.wait(empty.index(s), ((it // NSTAGE) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                _tma_load(a_desc, [a_row, kb * TILE_K], ready.index(s), a_bufs.index(s))
                _tma_load(b_desc, [b_row, kb * TILE_K], ready.index(s), b_bufs.index(s))
                it += 1

    @gluon.jit
    def _consumer(a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, group_end_ptr,
                  group_rows_ptr, M, N, K, E, stride_cm, stride_asm, stride_ask, stride_bse,
                  stride_bsn, stride_bsk, NUM_PROGRAMS: gl.constexpr, E_POW2: gl.constexpr,
                  HAS_ROWS: gl.constexpr, HALF: gl.constexpr):
        """One warpgroup: rows ``[HALF * 64, HALF * 64 + 64)`` of every tile, both column halves."""
        TILE_M: gl.constexpr = a_bufs.type.shape[1]
        TILE_N: gl.constexpr = b_bufs.type.shape[1]
        TILE_K: gl.constexpr = a_bufs.type.shape[2]
        NSTAGE: gl.constexpr = a_bufs.type.shape[0]
        WG_M: gl.constexpr = TILE_M // 2
        HALF_N: gl.constexpr = TILE_N // 2
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, HALF_N, 32])
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        # the epilogue's store layout: 8 bf16 (16 bytes) per thread, 16 threads per 128-column
        # row, a warp on 2 rows, the warpgroup's 4 warps down the 64 rows
        st_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        st_row_l: gl.constexpr = gl.SliceLayout(1, st_l)
        st_col_l: gl.constexpr = gl.SliceLayout(0, st_l)
        eidx, starts, rows, m_tiles, cum, tiles, total = _group_table(
            group_end_ptr, group_rows_ptr, M, E, N, E_POW2, HAS_ROWS, TILE_M, TILE_N, 4)
        nk = K // TILE_K
        last_nb = (N - 1) // HALF_N  # last weight-scale block along N
        zero = gl.zeros([WG_M, HALF_N], gl.float32, mma)
        it = 0
        for tile in range(gl.program_id(0), total, NUM_PROGRAMS):
            e, start, nrows, pid_m, pid_n = _tile_coords(tile, eidx, starts, rows, m_tiles, cum,
                                                         tiles)
            local = pid_m * TILE_M + HALF * WG_M + gl.arange(0, WG_M, layout=row_l)
            # Rows past the group's valid rows: clamped for the scale loads, never stored.
            as_ptrs = as_ptr + (start + gl.minimum(local, nrows - 1)).to(gl.int64) * stride_asm
            bs_e = bs_ptr + e.to(gl.int64) * stride_bse
            bs0_ptr = bs_e + (pid_n * 2) * stride_bsn
            bs1_ptr = bs_e + gl.minimum(pid_n * 2 + 1, last_nb) * stride_bsn  # past N: unused
            acc0 = zero
            acc1 = zero
            # Scales two K steps ahead in registers: a load issued in step kb is first used in
            # step kb + 2, a whole step of MMAs later (one step ahead left its latency exposed
            # before the next step's MMA issue).
            sa = gl.load(as_ptrs)
            sb0 = gl.load(bs0_ptr)
            sb1 = gl.load(bs1_ptr)
            k1 = gl.minimum(1, nk - 1)
            sa_n = gl.load(as_ptrs + k1 * stride_ask)
            sb0_n = gl.load(bs0_ptr + k1 * stride_bsk)
            sb1_n = gl.load(bs1_ptr + k1 * stride_bsk)
            for kb in range(nk):
                s = it % NSTAGE
                mbarrier.wait(ready.index(s), (it // NSTAGE) & 1)
                a_v = a_bufs.index(s).slice(HALF * WG_M, WG_M)
                b_v = b_bufs.index(s)
                p = warpgroup_mma(a_v, b_v.slice(0, HALF_N).permute((1, 0)), zero,
                                  use_acc=False, is_async=True)
                s0 = gl.expand_dims(sa * sb0, 1)
                s1 = gl.expand_dims(sa * sb1, 1)
                sa = sa_n
                sb0 = sb0_n
                sb1 = sb1_n
                kn = gl.minimum(kb + 2, nk - 1)  # past the end: reloads the last block (unused)
                sa_n = gl.load(as_ptrs + kn * stride_ask)
                sb0_n = gl.load(bs0_ptr + kn * stride_bsk)
                sb1_n = gl.load(bs1_ptr + kn * stride_bsk)
                p = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
                acc0 = acc0 + p * s0
                p = warpgroup_mma(a_v, b_v.slice(HALF_N, HALF_N).permute((1, 0)), zero,
                                  use_acc=False, is_async=True)
                p = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
                # Both MMAs of this warpgroup have read the slot: release it to the producer.
                mbarrier.arrive(empty.index(s), count=1)
                acc1 = acc1 + p * s1
                it += 1
            # Epilogue: each half is moved (through shared memory) from the MMA layout, where a
            # thread holds column pairs of 8 rows (4-byte stores, half-filled sectors), into
            # one where a warp writes two whole 256-byte rows with 16-byte stores. On one H200
            # that took the gate_up GEMM at 512 rows per expert from 955-969 to 1034-1039
            # TFLOP/s and the down GEMM (16 K steps, so the epilogue weighs more) from 797-826
            # to 968-981 (bench/results/logs/gemm-ws-epilogue-h200.txt).
            rows_st = pid_m * TILE_M + HALF * WG_M + gl.arange(0, WG_M, layout=st_row_l)
            rmask = gl.expand_dims(rows_st < nrows, 1)
            cols = pid_n * TILE_N + gl.arange(0, HALF_N, layout=st_col_l)
            c_rows = c_ptr + (start + rows_st).to(gl.int64) * stride_cm
            ptrs = gl.expand_dims(c_rows, 1) + gl.expand_dims(cols, 0)
            gl.store(ptrs, gl.convert_layout(acc0.to(gl.bfloat16), st_l),
                     mask=rmask & gl.expand_dims(cols < N, 0))
            gl.store(ptrs + HALF_N, gl.convert_layout(acc1.to(gl.bfloat16), st_l),
                     mask=rmask & gl.expand_dims(cols + HALF_N < N, 0))

    @gluon.jit
    def fp8_contiguous_ws_kernel(
            a_desc, b_desc, c_ptr, as_ptr, bs_ptr, group_end_ptr, group_rows_ptr,
            M, N, K, E, stride_cm, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
            NUM_PROGRAMS: gl.constexpr, E_POW2: gl.constexpr, HAS_ROWS: gl.constexpr,
            NUM_STAGES: gl.constexpr):
        """``a_desc``: TMA descriptor of ``a [M, K]`` fp8, block [128, 128]; ``b_desc``: of ``b``
        viewed as ``[E * N, K]`` fp8, block [256, 128]; ``c_ptr``: bf16 ``[M, N]`` with unit
        column stride; ``as_ptr``: float32 activation scales (``[M, K / 128]``, any strides,
        column-major preferred), ``bs_ptr``: float32 weight scales ``[E, ceil(N / 128), K / 128]``;
        ``group_end_ptr`` / ``group_rows_ptr``: int32 [E] as in the Triton kernel. Launch with
        ``num_warps=4`` (the first consumer warpgroup; the kernel adds the other two roles)."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES] + a_desc.block_type.shape,
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES] + b_desc.block_type.shape,
                                           b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
        fence_async_shared()
        gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, group_end_ptr,
                         group_rows_ptr, M, N, K, E, stride_cm, stride_asm, stride_ask,
                         stride_bse, stride_bsn, stride_bsk, NUM_PROGRAMS, E_POW2, HAS_ROWS, 0)),
            (_consumer, (a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, group_end_ptr,
                         group_rows_ptr, M, N, K, E, stride_cm, stride_asm, stride_ask,
                         stride_bse, stride_bsn, stride_bsk, NUM_PROGRAMS, E_POW2, HAS_ROWS, 1)),
            (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, group_end_ptr,
                         group_rows_ptr, M, N, K, E, NUM_PROGRAMS, E_POW2, HAS_ROWS)),
        ], [4, 1], [_CONSUMER_REGS, _PRODUCER_REGS])
