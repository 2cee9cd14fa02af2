"""The MoE layer on top of dispatch/combine: expert parallel (EP), and tensor parallel (TP) for
comparison, with the same expert kernels.

One layer, for tokens ``x [T, H]`` with the caller's routing ``topk_idx [T, K]`` (global expert
ids, -1 = none) and ``topk_weights [T, K]``::

    y[t] = sum_k topk_weights[t, k] * FFN_{topk_idx[t, k]}(x[t])
    FFN_e(x) = (silu(x @ gate_e.T) * (x @ up_e.T)) @ down_e.T

Weights (``ExpertWeights``): ``w13 [E, 2I, H]`` (gate rows ``[0, I)``, up rows ``[I, 2I)``) and
``w2 [E, H, I]``, bf16 or FP8 tuples with 128 x 128 block scales (``quantize_weight_fp8``).

EP, normal mode (prefill, training; host-synchronising like dispatch itself, unless
``num_worst_tokens`` sizes the buffers in advance)::

    get_dispatch_layout -> dispatch (bf16 or FP8) -> group_by_expert + permute (per-expert
    contiguous rows) -> grouped GEMM w13 -> silu(gate) * up [-> FP8] -> grouped GEMM w2 ->
    unpermute (weights applied, a token's local experts summed) -> combine

EP, low-latency mode (decode; no host synchronisation, CUDA-graph capturable)::

    low_latency_dispatch -> masked GEMM w13 on recv_x as is (FP8 tuple or bf16) -> silu * up
    [-> FP8] on the valid rows -> masked GEMM w2 (into the zero-copy combine buffer) ->
    low_latency_combine (weights applied there)

TP (experts split along I; every rank holds all E experts' ``I / R`` slice)::

    all_gather x, topk_idx, topk_weights (all R * T tokens) -> the same local expert pipeline
    over all E experts -> reduce_scatter (sum of the R partial outputs, each rank keeps its T)

GEMM implementation (``impl``): ``"triton"`` (the kernels of ``ep_comm.moe.gemm``: CUDA tensors, or
any tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (plain torch, float32 math, host
synchronising: for CPU runs), ``"auto"``: triton on CUDA tensors or in the interpreter, else
torch. The choice is made once per call from the inputs, never after a failure.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.distributed as dist
import triton

from ep_comm.core import fp8 as fp8_format
from ep_comm.moe import gemm
from ep_comm.moe import launch
from ep_comm.moe.launch import KernelPlan, PlanCache
from ep_comm.runtime.comm import gather_tensors, reduce_scatter_tensors
from ep_comm.errors import InputError
from ep_comm.kernels.triton import permute as _permute

from ep_comm.core.constants import FP8_BLOCK
from ep_comm.core.fp8 import FP8_DTYPE
#: Grouping kernels (``group_by_expert``): chunks of ids per program and the most id slices.
GROUPING_CHUNKS = 4
GROUPING_MAX_SLICES = 64


# ----------------------------------------------------------------------------- weights
def quantize_weight_fp8(w: torch.Tensor, chunk: int = 8):
    """Block-quantise ``w [E, N, K]`` to ``(w_fp8 [E, N, K] float8_e4m3fn, scales [E,
    ceil(N/128), ceil(K/128)] float32)``: one scale per 128 x 128 block, ``amax / 448`` (amax
    clamped below at 1e-4), as DeepSeek-V3. Works ``chunk`` experts at a time (float32 copies)."""
    e, n, k = w.shape
    nb, kb = triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)
    q = torch.empty(e, n, k, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(e, nb, kb, dtype=torch.float32, device=w.device)
    for e0 in range(0, e, chunk):
        wc = w[e0:e0 + chunk].float()
        c = wc.shape[0]
        wp = torch.nn.functional.pad(wc, (0, kb * FP8_BLOCK - k, 0, nb * FP8_BLOCK - n))
        blocks = wp.view(c, nb, FP8_BLOCK, kb, FP8_BLOCK)
        amax = blocks.abs().amax(dim=(2, 4)).clamp(min=fp8_format.AMAX_MIN)
        scale = amax / fp8_format.FP8_MAX
        qc = (blocks / scale[:, :, None, :, None]).to(FP8_DTYPE).view(c, nb * FP8_BLOCK, kb * FP8_BLOCK)
        q[e0:e0 + c] = qc[:, :n, :k]
        s[e0:e0 + c] = scale
    return q, s


def dequantize_weight(w) -> torch.Tensor:
    """float32 values of a bf16 weight or an FP8 block-scaled weight tuple."""
    return gemm._dequant_b(w)


@dataclasses.dataclass
class ExpertWeights:
    """Weights of the experts one rank computes.

    Attributes:
        w13: [E_l, 2 * I_l, H] bf16 or (fp8, block scales): gate rows ``[0, I_l)``, up rows
            ``[I_l, 2 * I_l)``.
        w2: [E_l, H, I_l] bf16 or (fp8, block scales).
        first_expert: global id of expert 0 of ``w13`` (EP: ``rank * E / R``; TP: 0).
    """

    w13: object
    w2: object
    first_expert: int = 0
    #: launch plans of the expert FFNs on these weights, by shape (``ep_comm.moe.launch``;
    #: kept here, not globally, because they hold the weights' TMA descriptors)
    plans: PlanCache = dataclasses.field(default_factory=PlanCache, repr=False, compare=False)

    def weights_key(self) -> tuple:
        """What a plan on these weights depends on besides shapes: the weight tensors
        themselves (a reassigned ``w13`` / ``w2`` gets new plans)."""
        return (_data(self.w13).data_ptr(), _data(self.w2).data_ptr(), self.fp8)

    @property
    def fp8(self) -> bool:
        return isinstance(self.w13, (tuple, list))

    @property
    def num_experts(self) -> int:
        return _data(self.w13).shape[0]

    @property
    def hidden(self) -> int:
        return _data(self.w13).shape[2]

    @property
    def intermediate(self) -> int:
        return _data(self.w13).shape[1] // 2

    @staticmethod
    def shard_ep(w13: torch.Tensor, w2: torch.Tensor, rank: int, num_ranks: int,
                 use_fp8: bool = False) -> "ExpertWeights":
        """Rank ``rank``'s experts ``[rank * E / R, (rank + 1) * E / R)`` of the full bf16
        weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (block-quantised when ``use_fp8``)."""
        e = w13.shape[0]
        if e % num_ranks:
            raise InputError(f"{e} experts cannot be split evenly over {num_ranks} ranks")
        per = e // num_ranks
        a, b = w13[rank * per:(rank + 1) * per], w2[rank * per:(rank + 1) * per]
        return ExpertWeights(*_maybe_fp8(a.contiguous(), b.contiguous(), use_fp8), rank * per)

    @staticmethod
    def shard_tp(w13: torch.Tensor, w2: torch.Tensor, rank: int, num_ranks: int,
                 use_fp8: bool = False) -> "ExpertWeights":
        """Rank ``rank``'s slice ``[rank * I / R, (rank + 1) * I / R)`` of every expert's
        intermediate dimension (gate, up and down alike); with ``use_fp8`` the slice must be a
        multiple of 128, so its 128 x 128 blocks are those of the full weights."""
        i = w13.shape[1] // 2
        if i % num_ranks or (use_fp8 and (i // num_ranks) % FP8_BLOCK):
            raise InputError(f"intermediate {i} must split evenly over {num_ranks} ranks"
                             + (f" into multiples of {FP8_BLOCK} (FP8 block scales)" if use_fp8 else ""))
        per = i // num_ranks
        sl = slice(rank * per, (rank + 1) * per)
        a = torch.cat([w13[:, :i][:, sl], w13[:, i:][:, sl]], dim=1).contiguous()
        b = w2[:, :, sl].contiguous()
        return ExpertWeights(*_maybe_fp8(a, b, use_fp8), 0)


def _maybe_fp8(a, b, use_fp8):
    if not use_fp8:
        return a, b
    return quantize_weight_fp8(a), quantize_weight_fp8(b)


def _data(t):
    return t[0] if isinstance(t, (tuple, list)) else t


# ----------------------------------------------------------------------------- groups
@dataclasses.dataclass
class ExpertGroups:
    """Where each (row, top-k slot) of a dispatched batch lives in the expert-contiguous buffer.

    Attributes:
        dest: [N, K] int32, the row of copy k of row n in the permuted buffer, -1 for none.
        group_end: [E] int32, cumulative end row of each expert's group (groups padded to the
            alignment; ``torch._grouped_mm``'s ``offs``).
        group_rows: [E] int32, valid rows at the start of each group.
        num_rows: rows of the permuted buffer (host int; the exact padded total when the caller
            knew it, else the upper bound ``N * K + E * (alignment - 1)``).
    """

    dest: torch.Tensor
    group_end: torch.Tensor
    group_rows: torch.Tensor
    num_rows: int


def group_by_expert(topk_idx: torch.Tensor, num_experts: int, alignment: int = 1,
                    num_rows: int | None = None, impl: str = "auto") -> ExpertGroups:
    """Per-expert contiguous groups of ``topk_idx [N, K]`` (any integer dtype; local expert ids
    in ``[0, E)``, anything else = not here), with each expert's group padded to ``alignment``
    rows.

    Within an expert, copies keep the order of their rows (source rank, then token) and slots:
    a stable sort of the (row, slot) pairs by expert. Device work only, no host
    synchronisation. ``num_rows``: the padded total if known (e.g.
    ``sum(num_recv_tokens_per_expert_list)``). ``impl``: ``"triton"`` runs two kernels
    (``kernels/permute.py``: in normal mode this runs right after dispatch's host wait, when
    every microsecond of host launch time is GPU idle time), ``"torch"`` the same groups in
    torch ops; ``"auto"`` as for the GEMMs.
    """
    if (not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2
            or topk_idx.dtype.is_floating_point or topk_idx.dtype.is_complex
            or topk_idx.dtype == torch.bool):
        raise InputError(f"topk_idx must be a [N, K] integer tensor, got "
                         f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} "
                         f"{list(getattr(topk_idx, 'shape', []))}")
    if num_experts < 0 or alignment < 1:
        raise InputError(f"num_experts must be >= 0 and alignment >= 1, got {num_experts} "
                         f"and {alignment}")
    n, k = topk_idx.shape
    dev = topk_idx.device
    if num_rows is None:
        num_rows = n * k + num_experts * (alignment - 1)
    if _use_triton(impl, topk_idx):
        plan = _GROUPING_PLANS.plan(lambda: (_tensor_key(topk_idx), num_experts, alignment),
                                    lambda: _GroupingPlan(topk_idx, num_experts, alignment))
        dest, group_end, group_rows = plan(topk_idx)
        return ExpertGroups(dest, group_end, group_rows, int(num_rows))
    flat = topk_idx.reshape(-1).to(torch.int64)
    key = torch.where((flat >= 0) & (flat < num_experts), flat,
                      torch.full_like(flat, num_experts))
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    cnt = counts[:num_experts]
    aligned = (cnt + alignment - 1) // alignment * alignment
    group_end = torch.cumsum(aligned, 0)
    seg_start = torch.cat([group_end - aligned, group_end.new_full((1,), -1)])
    sorted_key, order = torch.sort(key, stable=True)
    raw_start = torch.cumsum(counts, 0) - counts
    rank_in_group = torch.arange(n * k, device=dev) - raw_start[sorted_key]
    dest_sorted = torch.where(sorted_key < num_experts, seg_start[sorted_key] + rank_in_group,
                              torch.full_like(sorted_key, -1))
    dest = torch.empty_like(dest_sorted).scatter_(0, order, dest_sorted)
    return ExpertGroups(dest.view(n, k).to(torch.int32), group_end.to(torch.int32),
                        cnt.to(torch.int32), int(num_rows))


def _pad4(n: int) -> int:
    return (n + 3) // 4 * 4


class _GroupingPlan:
    """The two grouping launches of ``group_by_expert`` for one ``topk_idx`` shape, strides,
    dtype and device, ``num_experts`` and ``alignment``; ``plan(topk_idx)`` -> (dest [N, K],
    group_end [E], group_rows [E]) int32, views of one allocation (each part starts on a
    16-byte boundary: Triton specialises pointer arguments on that alignment)."""

    def __init__(self, topk_idx: torch.Tensor, num_experts: int, alignment: int):
        n, k = topk_idx.shape
        nk = n * k
        self.device = topk_idx.device
        self.n, self.k, self.e = n, k, num_experts
        block, warps, span, slices = _grouping_geometry(nk, num_experts)
        sizes = [_pad4(nk), _pad4(num_experts), _pad4(num_experts), slices * num_experts]
        self.total = sum(sizes)
        self.starts = [sum(sizes[:i]) for i in range(4)]
        self.slices = slices
        self.grid = (num_experts, slices)
        strides = (topk_idx.stride(0), topk_idx.stride(1))
        self.count = KernelPlan(_permute.expert_count_kernel, (
            None, None, None, nk, k, num_experts, span, *strides),
            dict(BLOCK=block, num_warps=warps), slots=(0, 1, 2))
        self.dest = KernelPlan(_permute.expert_dest_kernel, (
            None, None, None, None, None, nk, k, num_experts, slices, span, alignment,
            *strides), dict(BLOCK=block, E_POW2=triton.next_power_of_2(num_experts),
                            S_POW2=triton.next_power_of_2(slices), num_warps=warps),
            slots=(0, 1, 2, 3, 4))

    def __call__(self, topk_idx: torch.Tensor):
        e, (_, s1, s2, s3) = self.e, self.starts
        flat = torch.empty(self.total, dtype=torch.int32, device=self.device)
        dest = flat[:self.n * self.k].view(self.n, self.k)
        group_rows = flat[s1:s1 + e]
        group_end = flat[s2:s2 + e]
        if e:
            part = flat[s3:]
            self.count(self.grid, (topk_idx, part, dest))
            self.dest(self.grid, (topk_idx, part, dest, group_end, group_rows))
        return dest, group_end, group_rows


#: grouping plans by (topk_idx shape, strides, dtype, device; experts; alignment)
_GROUPING_PLANS = PlanCache()


@functools.lru_cache(maxsize=256)
def _grouping_geometry(nk: int, num_experts: int) -> tuple[int, int, int, int]:
    """(BLOCK, warps, span, slices) of the grouping kernels for ``nk`` (row, slot) pairs:
    computed once per shape (the layer calls this every step with the same sizes)."""
    block = min(2048, max(16, triton.next_power_of_2(max(nk, 1))))
    warps = 8 if block >= 2048 else 4
    # at most GROUPING_CHUNKS chunks per program (short dependent loops), at most
    # GROUPING_MAX_SLICES slices (the dest kernel sums an [S, E] table per program)
    span = block * max(GROUPING_CHUNKS, triton.cdiv(triton.cdiv(nk, GROUPING_MAX_SLICES), block))
    slices = max(1, triton.cdiv(nk, span))
    return block, warps, span, slices


def _use_triton(impl: str, t: torch.Tensor) -> bool:
    if impl not in ("auto", "triton", "torch"):
        raise InputError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        return t.is_cuda or gemm.interpreting()
    return impl == "triton"


def permute(x, groups: ExpertGroups, impl: str = "auto"):
    """Rows of ``x [N, H]`` (bf16 or the FP8 tuple) copied to their experts' groups:
    ``out[groups.dest[n, k]] = x[n]``. Returns ``[groups.num_rows, H]`` (padding rows
    uninitialised), an FP8 tuple for an FP8 input, its scales ``[num_rows, H / 128]`` stored
    column-major (stride(0) == 1: the scale layout the grouped GEMM reads, so it needs no copy)."""
    data, scales = (x if isinstance(x, (tuple, list)) else (x, None))
    n, h = data.shape
    out = torch.empty(groups.num_rows, h, dtype=data.dtype, device=data.device)
    outs = None
    if scales is not None:
        outs = torch.empty(scales.shape[1], groups.num_rows, dtype=scales.dtype,
                           device=data.device).t()
    if n and groups.num_rows:
        if _use_triton(impl, data):
            sc, osc = (scales, outs) if scales is not None else (data, out)
            plan = _PERMUTE_PLANS.plan(
                lambda: (_operand_key(x), _tensor_key(groups.dest), groups.num_rows),
                lambda: _permute_plan(data, scales, sc, groups.dest, out, osc))
            plan[0](plan[1], (data, sc, groups.dest, out, osc))
        else:
            d = groups.dest.reshape(-1).long()
            rows = torch.arange(n, device=data.device).repeat_interleave(groups.dest.shape[1])
            ok = d >= 0
            out[d[ok]] = data[rows[ok]]
            if scales is not None:
                outs[d[ok]] = scales[rows[ok]]
    return (out, outs) if scales is not None else out


def _block_h(h: int) -> int:
    """Columns per program of the permute kernels (the whole row in the interpreter)."""
    return triton.next_power_of_2(h) if gemm.interpreting() else min(2048, triton.next_power_of_2(h))


def _permute_plan(data, scales, sc, dest, out, osc):
    """(KernelPlan, grid) of ``permute_kernel`` for these tensors' shapes and strides."""
    n, h = data.shape
    block_h = _block_h(h)
    g = scales.shape[1] if scales is not None else 1
    return (KernelPlan(_permute.permute_kernel, (
        None, None, None, None, None, h, g, dest.shape[1],
        data.stride(0), out.stride(0), dest.stride(0), dest.stride(1),
        sc.stride(0), sc.stride(1), osc.stride(0), osc.stride(1)),
        dict(BLOCK_H=block_h, G_POW2=triton.next_power_of_2(g),
             HAS_SCALES=scales is not None, num_warps=4), slots=(0, 1, 2, 3, 4)),
        (n, triton.cdiv(h, block_h)))


#: permute / unpermute plans by shapes, strides, dtypes and devices (and rows)
_PERMUTE_PLANS = PlanCache()
_UNPERMUTE_PLANS = PlanCache()


def unpermute(y: torch.Tensor, groups: ExpertGroups, topk_weights: torch.Tensor,
              impl: str = "auto") -> torch.Tensor:
    """``out[n] = sum_k topk_weights[n, k] * y[groups.dest[n, k]]`` (fp32 sum) -> ``[N, H]``
    bf16; rows with no local copy are zero."""
    n, k = groups.dest.shape
    h = y.shape[1]
    out = torch.empty(n, h, dtype=torch.bfloat16, device=y.device)
    if n == 0:
        return out
    w = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    if _use_triton(impl, y):
        def build():
            block_h = _block_h(h)
            return (KernelPlan(_permute.unpermute_kernel, (
                None, None, None, None, h, k, y.stride(0), out.stride(0),
                groups.dest.stride(0), groups.dest.stride(1), w.stride(0), w.stride(1)),
                dict(BLOCK_H=block_h, INTERPRET=gemm.interpreting(), num_warps=4),
                slots=(0, 1, 2, 3)), (n, triton.cdiv(h, block_h)))
        plan = _UNPERMUTE_PLANS.plan(
            lambda: (_tensor_key(y), _tensor_key(groups.dest), _tensor_key(w)), build)
        plan[0](plan[1], (y, groups.dest, w, out))
    else:
        d = groups.dest.long()
        ok = d >= 0
        rows = y.float()[d.clamp(min=0)]  # [N, K, H]
        wk = torch.where(ok, w, torch.zeros_like(w))
        out.copy_((rows * wk.unsqueeze(-1)).sum(1))
    return out


# ----------------------------------------------------------------------------- expert FFN
def expert_ffn_contiguous(x, groups: ExpertGroups, weights: ExpertWeights,
                          impl: str = "auto") -> torch.Tensor:
    """The experts on the contiguous groups: ``x [P, H]`` bf16 (FP8 tuple when the weights are
    FP8; a bf16 input is then quantised here) -> ``[P, H]`` bf16 (valid rows only written)."""
    data = _data(x)
    triton_ = _use_triton(impl, data)
    if weights.fp8 and not isinstance(x, (tuple, list)):
        x = gemm.quantize_fp8(x) if triton_ else fp8_format.per_token_cast_to_fp8(x)
    if not weights.fp8 and isinstance(x, (tuple, list)):
        raise InputError("FP8 activations need FP8 weights (ExpertWeights.shard_*(use_fp8=True))")
    if triton_:
        key = _contiguous_key(x, groups, weights) if launch.PLANS else None
        plan = weights.plans.get(key) if key is not None else None
        if plan is None:
            plan, y = _ContiguousFFN.first_call(x, groups, weights)
            if key is not None:
                weights.plans.put(key, plan)
            return y
        return plan(x, groups)
    gu = gemm.grouped_gemm_contiguous_torch(x, weights.w13, groups.group_end,
                                            group_rows=groups.group_rows)
    h = gemm.silu_mul_quant_fp8_torch(gu) if weights.fp8 else gemm.silu_mul_torch(gu)
    return gemm.grouped_gemm_contiguous_torch(h, weights.w2, groups.group_end,
                                              group_rows=groups.group_rows)


def expert_ffn_masked(x, count: torch.Tensor, weights: ExpertWeights, *,
                      expected_m: int | None = None, out: torch.Tensor | None = None,
                      impl: str = "auto") -> torch.Tensor:
    """The experts on the masked groups: ``x [E_l, M, H]`` (bf16 or FP8 tuple with any scale
    strides, e.g. low-latency dispatch's ``recv_x``), ``count [E_l]`` int32 -> ``[E_l, M, H]``
    bf16 (into ``out`` if given), rows past the counts untouched."""
    data = _data(x)
    if weights.fp8 != isinstance(x, (tuple, list)):
        raise InputError("low-latency expert GEMMs need FP8 activations with FP8 weights and "
                         "bf16 with bf16 (dispatch with use_fp8 matching the weights)")
    if _use_triton(impl, data):
        key = _masked_key(x, count, expected_m, out, weights) if launch.PLANS else None
        plan = weights.plans.get(key) if key is not None else None
        if plan is None:
            plan, y = _MaskedFFN.first_call(x, count, weights, expected_m, out)
            if key is not None:
                weights.plans.put(key, plan)
            return y
        return plan(x, count, out)
    gu = gemm.grouped_gemm_masked_torch(x, weights.w13, count)
    if weights.fp8:
        q, s = gemm.silu_mul_quant_fp8_torch(gu)
        h = (q, s)
    else:
        h = gemm.silu_mul_torch(gu)
    return gemm.grouped_gemm_masked_torch(h, weights.w2, count, out=out)


# ----------------------------------------------------------------------------- FFN plans
def _tensor_key(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


def _operand_key(x) -> tuple:
    """Shape, strides, dtype and device of a bf16 operand or both parts of an FP8 tuple."""
    if isinstance(x, (tuple, list)):
        return len(x), *(_tensor_key(t) if isinstance(t, torch.Tensor) else type(t) for t in x)
    return _tensor_key(x) if isinstance(x, torch.Tensor) else (type(x),)


def _masked_key(x, count, expected_m, out, weights: ExpertWeights) -> tuple:
    return ("masked", _operand_key(x), _operand_key(count), expected_m,
            None if out is None else _tensor_key(out), weights.weights_key())


def _contiguous_key(x, groups: ExpertGroups, weights: ExpertWeights) -> tuple:
    return ("contiguous", _operand_key(x), _tensor_key(groups.group_end),
            _tensor_key(groups.group_rows), weights.weights_key())


class _MaskedFFN:
    """``expert_ffn_masked`` (Triton) for one shape: masked GEMM w13 -> SiLU * up [-> FP8] ->
    masked GEMM w2, three launches through plans built, with the full checks, on the first
    call (``first_call``). A later call with an equal ``_masked_key`` (shapes, strides, dtypes,
    devices, the same weights) only allocates the intermediates and launches."""

    def __init__(self, up, act, down):
        self.up, self.act, self.down = up, act, down

    @classmethod
    def first_call(cls, x, count, weights: ExpertWeights, expected_m, out):
        """(plan, output of this call)."""
        up, gu = gemm.masked_plan(x, weights.w13, count, expected_m=expected_m)
        up.launch(x, count, gu)
        act = gemm.act_plan(gu, count, silu=True, quant=weights.fp8, round_scale=False,
                            column_major_scales=None)
        h = act.run(gu, count)
        down, y = gemm.masked_plan(h, weights.w2, count, expected_m=expected_m, out=out)
        down.launch(h, count, y)
        return cls(up, act, down), y

    def __call__(self, x, count, out):
        gu = self.up.run(x, count)
        h = self.act.run(gu, count)
        return self.down.run(h, count, out)


class _ContiguousFFN:
    """``expert_ffn_contiguous`` (Triton) for one shape: GEMM w13 -> SiLU * up [-> FP8] on the
    rows below the last group's end -> GEMM w2, as ``_MaskedFFN`` (plans from the first call)."""

    def __init__(self, up, act, down):
        self.up, self.act, self.down = up, act, down

    @classmethod
    def first_call(cls, x, groups: ExpertGroups, weights: ExpertWeights):
        """(plan, output of this call); ``x`` is FP8 exactly when the weights are."""
        up, gu = gemm.contiguous_plan(x, weights.w13, groups.group_end,
                                      group_rows=groups.group_rows)
        up.launch(x, groups.group_end, groups.group_rows, gu)
        # SiLU * up on the rows below the last group's end only (a device-side count: the
        # rows after it, where num_rows is an upper bound, hold no data); the [P, 2I] output
        # is one group of P rows to the kernel, so no [1, P, 2I] views are needed.
        used = groups.group_end[-1:]
        act = gemm.act_plan(gu, used, silu=True, quant=weights.fp8, round_scale=False,
                            column_major_scales=True, flat_count=True)
        h = act.run(gu, used)
        down, y = gemm.contiguous_plan(h, weights.w2, groups.group_end,
                                       group_rows=groups.group_rows)
        down.launch(h, groups.group_end, groups.group_rows, y)
        return cls(up, act, down), y

    def __call__(self, x, groups: ExpertGroups):
        gu = self.up.run(x, groups.group_end, groups.group_rows)
        h = self.act.run(gu, groups.group_end[-1:])
        return self.down.run(h, groups.group_end, groups.group_rows)


# ----------------------------------------------------------------------------- EP
def _check_inputs(x, topk_idx, topk_weights, weights: ExpertWeights):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
        raise InputError(f"x must be a [T, H] bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    if x.shape[1] != weights.hidden:
        raise InputError(f"x has hidden {x.shape[1]}, the weights {weights.hidden}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0] or topk_idx.dtype != torch.int64:
        raise InputError(f"topk_idx must be [{x.shape[0]}, K] int64, got {topk_idx.dtype} "
                         f"{list(topk_idx.shape)}")
    if topk_weights.shape != topk_idx.shape or topk_weights.dtype != torch.float32:
        raise InputError(f"topk_weights must be {list(topk_idx.shape)} float32, got "
                         f"{topk_weights.dtype} {list(topk_weights.shape)}")


def _quantize_tokens(x: torch.Tensor):
    """``gemm.quantize_fp8(x)`` of the layer's ``x [T, H]`` bf16 (checked by
    ``_check_inputs``), through a plan per shape."""
    return _QUANT_PLANS.plan(lambda: _tensor_key(x), lambda: gemm.act_plan(
        x, None, silu=False, quant=True, round_scale=False, column_major_scales=None)).run(x)


#: token quantisation plans by x's shape, strides, dtype and device
_QUANT_PLANS = PlanCache()


def moe_ep_normal(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  weights: ExpertWeights, buffer, num_experts: int, *, use_fp8: bool | None = None,
                  expert_alignment: int = 1, num_worst_tokens: int = 0,
                  impl: str = "auto") -> torch.Tensor:
    """Expert-parallel MoE layer, normal mode.

    Args:
        x: [T, H] bf16 tokens of this rank.
        topk_idx: [T, K] int64 global expert ids (-1 = none); topk_weights: [T, K] float32.
        weights: this rank's experts (``ExpertWeights.shard_ep``).
        buffer: an ``ep_comm.Buffer`` over the expert-parallel group.
        num_experts: E, all experts of the layer.
        use_fp8: dispatch FP8 (needs FP8 weights); None: FP8 exactly when the weights are.
        expert_alignment: rows each expert's group is padded to (our GEMMs need none: 1).
        num_worst_tokens: 0: dispatch waits on the host for the receive counts and every buffer
            has its exact size. > 0 (at least the most rows a rank can receive, e.g. the sum of
            all ranks' T): dispatch sizes its outputs to this, the grouping counts on the GPU and
            the permuted buffer takes its upper bound (``num_worst_tokens * K`` rows plus
            alignment padding), so nothing in the layer waits for the host and, on the kernels
            backend with ``impl="triton"``, the whole layer can be captured in a CUDA graph.
            The price is memory (expert buffers sized by the bound, about twice the exact size
            at top-8 over many ranks); the gain is that the GPU does not idle while the host
            launches the expert work after dispatch's wait.
        impl: GEMM implementation (see the module docstring).

    Returns:
        [T, H] bf16, ``sum_k topk_weights[t, k] * FFN_{topk_idx[t, k]}(x[t])``.
    """
    _check_inputs(x, topk_idx, topk_weights, weights)
    use_fp8 = weights.fp8 if use_fp8 is None else use_fp8
    if use_fp8 and not weights.fp8:
        raise InputError("use_fp8 needs FP8 weights (ExpertWeights.shard_ep(use_fp8=True))")
    local = num_experts // buffer.group_size
    if local != weights.num_experts:
        raise InputError(f"{num_experts} experts over {buffer.group_size} ranks is {local} per "
                         f"rank, but the weights hold {weights.num_experts}")
    triton_ = _use_triton(impl, x)
    if use_fp8:
        x_in = _quantize_tokens(x) if triton_ else fp8_format.per_token_cast_to_fp8(x)
    else:
        x_in = x
    n_rank, n_rdma, n_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x_in, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=n_expert, topk_idx=topk_idx,
        topk_weights=topk_weights, expert_alignment=expert_alignment,
        num_worst_tokens=num_worst_tokens)
    lay = group_by_expert(recv_idx, local, expert_alignment,
                        num_rows=None if num_worst_tokens else sum(counts), impl=impl)
    xp = permute(recv_x, lay, impl)
    y = expert_ffn_contiguous(xp, lay, weights, impl)
    rows = unpermute(y, lay, recv_w, impl)
    combined, _, _ = buffer.combine(rows, handle)
    return combined


def default_expected_m(num_max_dispatch_tokens_per_rank: int, num_ranks: int, num_topk: int,
                       num_experts: int) -> int:
    """Expected largest valid count per local expert in low-latency mode: twice the mean
    (``M * R * K / E``) for routing imbalance, at most ``R * M``."""
    mean = num_max_dispatch_tokens_per_rank * num_ranks * num_topk / num_experts
    return max(1, min(num_ranks * num_max_dispatch_tokens_per_rank, math.ceil(2 * mean)))


def moe_ep_low_latency(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                       weights: ExpertWeights, buffer, num_experts: int,
                       num_max_dispatch_tokens_per_rank: int, *, use_fp8: bool | None = None,
                       expected_m: int | None = None, zero_copy: bool = True,
                       impl: str = "auto") -> torch.Tensor:
    """Expert-parallel MoE layer, low-latency mode (no host synchronisation with
    ``impl="triton"`` on the kernels backend).

    Args as ``moe_ep_normal``, plus ``num_max_dispatch_tokens_per_rank`` (the Buffer's M),
    ``expected_m`` (BLOCK_M hint of the masked GEMM; default ``default_expected_m``) and
    ``zero_copy`` (write the down GEMM straight into the combine buffer).

    Returns:
        [T, H] bf16.
    """
    _check_inputs(x, topk_idx, topk_weights, weights)
    use_fp8 = weights.fp8 if use_fp8 is None else use_fp8
    if use_fp8 != weights.fp8:
        raise InputError("low-latency mode needs use_fp8 to match the weights' format (FP8 "
                         "dispatch with FP8 weights, bf16 with bf16)")
    r = buffer.group_size
    if expected_m is None:
        expected_m = default_expected_m(num_max_dispatch_tokens_per_rank, r, topk_idx.shape[1],
                                        num_experts)
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=use_fp8)
    out = buffer.get_next_low_latency_combine_buffer(handle) if zero_copy else None
    y = expert_ffn_masked(recv_x, count, weights, expected_m=expected_m, out=out, impl=impl)
    combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle,
                                                zero_copy=zero_copy)
    return combined


# ----------------------------------------------------------------------------- TP
def moe_tp(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
           weights: ExpertWeights, group, *, use_fp8: bool | None = None,
           expert_alignment: int = 1, impl: str = "auto") -> torch.Tensor:
    """Tensor-parallel MoE layer: every rank computes every expert on its ``I / R`` slice for
    the tokens of all ranks (all-gathered), and the partial outputs are reduce-scattered.

    Args:
        x: [T, H] bf16 (T the same on every rank); topk_idx [T, K] int64 global ids;
            topk_weights [T, K] float32.
        weights: ``ExpertWeights.shard_tp`` of the full weights (all E experts).
        group: the tensor-parallel ProcessGroup (NCCL or gloo).
        use_fp8: gather FP8 activations (needs FP8 weights); None: as the weights.

    Returns:
        [T, H] bf16, the same function as the EP layer.
    """
    _check_inputs(x, topk_idx, topk_weights, weights)
    use_fp8 = weights.fp8 if use_fp8 is None else use_fp8
    r = dist.get_world_size(group)
    t = x.shape[0]
    triton_ = _use_triton(impl, x)

    def gather(v: torch.Tensor) -> torch.Tensor:
        raw = v.view(torch.uint8) if v.dtype == FP8_DTYPE else v
        out = torch.empty((r * t, *raw.shape[1:]), dtype=raw.dtype, device=raw.device)
        gather_tensors(out, raw.contiguous(), group)
        return out.view(FP8_DTYPE) if v.dtype == FP8_DTYPE else out

    if use_fp8:
        q, s = gemm.quantize_fp8(x) if triton_ else fp8_format.per_token_cast_to_fp8(x)
        x_all = (gather(q), gather(s))
    else:
        x_all = gather(x)
    idx_all, w_all = gather(topk_idx), gather(topk_weights)
    lay = group_by_expert(idx_all, weights.num_experts, expert_alignment, impl=impl)
    xp = permute(x_all, lay, impl)
    y = expert_ffn_contiguous(xp, lay, weights, impl)
    partial = unpermute(y, lay, w_all, impl)
    out = torch.empty(t, partial.shape[1], dtype=partial.dtype, device=partial.device)
    reduce_scatter_tensors(out, partial, group)
    return out


# ----------------------------------------------------------------------------- module
class MoE(torch.nn.Module):
    """A MoE layer (the expert part; routing is the caller's) over a process group.

    Args:
        w13: [E, 2I, H] bf16 full gate/up weights (every rank passes the same); w2: [E, H, I].
        group: the ProcessGroup of the layer (EP and TP use the same ranks).
        parallel: ``"ep"`` (experts split over ranks, dispatch/combine through ``buffer``) or
            ``"tp"`` (intermediate split, all-gather / reduce-scatter over ``group``).
        buffer: an ``ep_comm.Buffer`` over ``group`` (EP only).
        mode: ``"normal"`` or ``"low_latency"`` (EP only; the Buffer must have been created
            with ``low_latency_mode=True`` and a size hint for
            ``num_max_dispatch_tokens_per_rank``).
        use_fp8: FP8 weights (128 x 128 block scales) and FP8 activations.
        num_max_dispatch_tokens_per_rank: low-latency M.
        expert_alignment, num_worst_tokens, impl: as ``moe_ep_normal`` (EP normal mode).

    ``forward(x [T, H] bf16, topk_idx [T, K] int64, topk_weights [T, K] float32) -> [T, H]``.
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, group, *, parallel: str = "ep",
                 buffer=None, mode: str = "normal", use_fp8: bool = False,
                 num_max_dispatch_tokens_per_rank: int | None = None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, impl: str = "auto"):
        super().__init__()
        if parallel not in ("ep", "tp"):
            raise InputError(f"parallel must be 'ep' or 'tp', got {parallel!r}")
        if mode not in ("normal", "low_latency"):
            raise InputError(f"mode must be 'normal' or 'low_latency', got {mode!r}")
        if parallel == "ep" and buffer is None:
            raise InputError("parallel='ep' needs an ep_comm.Buffer (buffer=...)")
        if mode == "low_latency" and parallel == "ep" and not num_max_dispatch_tokens_per_rank:
            raise InputError("mode='low_latency' needs num_max_dispatch_tokens_per_rank")
        self.group, self.buffer, self.parallel, self.mode = group, buffer, parallel, mode
        self.num_experts = w13.shape[0]
        self.use_fp8, self.impl, self.expert_alignment = use_fp8, impl, expert_alignment
        self.num_worst_tokens = num_worst_tokens
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        rank, r = dist.get_rank(group), dist.get_world_size(group)
        shard = ExpertWeights.shard_ep if parallel == "ep" else ExpertWeights.shard_tp
        self.weights = shard(w13, w2, rank, r, use_fp8=use_fp8)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        if self.parallel == "tp":
            return moe_tp(x, topk_idx, topk_weights, self.weights, self.group,
                          expert_alignment=self.expert_alignment, impl=self.impl)
        if self.mode == "low_latency":
            return moe_ep_low_latency(x, topk_idx, topk_weights, self.weights, self.buffer,
                                      self.num_experts, self.num_max_dispatch_tokens_per_rank,
                                      impl=self.impl)
        return moe_ep_normal(x, topk_idx, topk_weights, self.weights, self.buffer,
                             self.num_experts, expert_alignment=self.expert_alignment,
                             num_worst_tokens=self.num_worst_tokens, impl=self.impl)


# ----------------------------------------------------------------------------- reference
def moe_reference(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  w13, w2, fp8_activations: bool = False) -> torch.Tensor:
    """Dense single-process MoE in float64, a plain loop over experts (the tests' oracle).

    ``x [T, H]``, ``topk_idx [T, K]`` global ids (-1 = none), ``topk_weights [T, K]``, full
    weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (bf16, float, or FP8 tuples).
    ``fp8_activations``: cast ``x`` and the SiLU output to the FP8 format first, as the FP8
    layer does (the oracle then differs from the layer by rounding only). Returns ``[T, H]``
    float64.
    """
    def act(v):
        if not fp8_activations:
            return v
        q, s = fp8_format.per_token_cast_to_fp8(v.float())
        return fp8_format.dequantize(q, s).double()

    def expert(w, e):  # one expert's float64 weight (whole-tensor float64 copies of
        # DeepSeek-V3-sized weights would take gigabytes)
        one = (w[0][e:e + 1], w[1][e:e + 1]) if isinstance(w, tuple) else w[e:e + 1]
        return dequantize_weight(one)[0].double()

    xd = act(x.double())
    num_experts = (w13[0] if isinstance(w13, tuple) else w13).shape[0]
    out = torch.zeros_like(xd)
    for e in range(num_experts):
        tok, slot = torch.nonzero(topk_idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = xd[tok] @ expert(w13, e).T
        i = gu.shape[1] // 2
        h = act(torch.nn.functional.silu(gu[:, :i]) * gu[:, i:])
        out.index_add_(0, tok, (h @ expert(w2, e).T) * topk_weights[tok, slot].double().unsqueeze(1))
    return out
