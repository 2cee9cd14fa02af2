"""Launchers of the expert kernels: grouped GEMMs (``kernels/grouped_gemm.py``) and the FP8
quantiser / SiLU(gate) * up (``kernels/quant.py``).

Each launcher checks shapes, dtypes, devices and strides (raising ``ep_comm.InputError`` with
the argument's name), picks block sizes with the heuristic below, and launches once: no per-call
search, no host synchronisation (so the low-latency path stays CUDA-graph capturable).

Operands
--------
An activation operand ``a`` is a bf16 tensor, or the FP8 tuple ``(a_fp8 float8_e4m3fn,
a_scales float32 [..., K // 128])`` (``ep_comm.core.fp8``'s format; the scales may have any strides,
e.g. the column-major ones of low-latency dispatch). A weight operand ``b`` is ``[E, N, K]``
bf16 (``nn.Linear`` layout per expert: ``y = x @ b[e].T``), or ``(b_fp8 [E, N, K],
b_scales float32 [E, ceil(N / 128), ceil(K / 128)])`` with 128 x 128 block scales (DeepSeek-V3).
``a`` and ``b`` are both bf16 or both FP8; the output is bf16.

Block-size heuristic (``contiguous_config`` / ``masked_config``)
---------------------------------------------------------------
H100/H200 (sm_90), 132 SMs, 227 KB shared memory per block:

* operand loads: TMA (host tensor descriptors; ``GemmConfig.tma`` None = wherever the
  operands allow it, else pointer loads). Third H200 run, same configurations: BF16 gate_up at
  512 tokens 520-580 TFLOP/s with pointers, 604-633 with TMA; FP8 765-803 vs 846-890. The masked
  kernel loads only the weights by TMA (the activations by clamped pointers: rows past an
  expert's count are never read); there TMA and pointers measured the same.
* contiguous: ``BLOCK_M`` = 64 when the average rows per expert (``M / E``, known on the host)
  is <= 64 (decode-sized groups: half the padding waste), else 128. ``BLOCK_N`` = 256 when
  N >= 256 (one A tile feeds twice the MMA work; 128 x 256 is the largest fp32 accumulator that
  fits 8 warps' registers), else 128. ``BLOCK_K`` = 64 for bf16, 128 for FP8 (= the scale
  block: the scales are applied once per K step). 8 warps and 3 stages at BLOCK_M 128, 4 warps
  and 4 stages at 64. FP8 with >= 256 rows per expert: 256 x 128 (one scalar weight scale and a
  [256] activation-scale vector per K step; 842-890 TFLOP/s at 512 tokens vs 758-864 for
  128 x 256), 3 stages (3 x 48 KB). The grid is persistent: one program per SM.
  FP8 history: 300 TFLOP/s at 128 x 256 on the first H200 run with
  ``acc += dot(a, b) * (a_s[:, None] * b_s[None, :])`` (the product tile spilled); the
  accumulator is now kept in units of the current scale (``kernels/grouped_gemm.py``: one
  in-place MMA per K step), the scales are prefetched one K step ahead, and TMA feeds the MMAs.
  Re-checked on H200 with TMA (gate_up, 512 and 1024 tokens, alternating timed runs): rescaled
  accumulator 881-981 TFLOP/s, ``acc += dot(a, b) * s`` per K block 699-714 at every config.
  Row-major activation scales are copied column-major once per call (M * K / 128 floats,
  about 1% of the A bytes) so each K step loads them as one contiguous vector.
* FP8 on Hopper: the warp-specialized Gluon kernel (``kernels/grouped_gemm_ws.py``, 128 x 256
  tiles, a TMA producer warp, two consumer warpgroups that are not in lockstep, coalesced
  epilogue) where N >= 256 and more than 64 rows per expert. One H200, 5 alternating rounds,
  TFLOP/s ws / Triton kernel: gate_up (K = 7168) 844/728 at 128 rows, 986/862 at 256,
  1015/904 at 512, 1040/952 at 1024; down (K = 2048) 739/657, 896/773, 954/821, 986/846
  (bench/results/gemm-kernels-1r-h200.json). Before the coalesced epilogue the down GEMM lost to
  the Triton kernel from 512 rows on, hence no K condition any more.
* masked (decode; weight-bandwidth bound): the token tile ``BLOCK_M`` covers the expected valid
  rows per expert (``expected_m``, default 64: up to 64 tokens per expert read each weight tile
  exactly once), rounded up to a power of two, at least 16. ``BLOCK_N`` = 128, ``BLOCK_K`` = 64
  (bf16) / 128 (FP8). bf16 up to 64: ``SWAP_AB`` (weights in the MMA's M dimension, tokens in
  its N dimension), 4 warps, 5 stages: 0.87-0.99 of HBM read bandwidth. FP8 up to 32: swap-AB,
  4 warps, 4 stages (0.83-0.90 at 1 token; 6 stages measured 0.80-0.86: fewer CTAs per SM);
  FP8 at 64: no swap, 64 x 128, 4 stages (0.79-0.82; swap-AB there measured 0.60-0.68).
  Above 64: 8 warps, 4 stages, no swap. (16, 128) is as good at 1 token and 4x worse at 64
  (weights re-read per 16-token tile), so BLOCK_M follows ``expected_m``.
* under ``TRITON_INTERPRET=1`` (CPU tests) small blocks, and bf16 operands are upcast to fp32
  inside the kernel (the interpreter's bf16 ``tl.dot`` is wrong).

``bench/gemm.py`` times the alternatives next to the chosen configuration and prints them, so
the heuristic can be checked against measurements on the machine.

Torch versions (``*_torch``) compute the same functions with plain torch ops in float32 (host
synchronising: they are for CPU runs without the Triton interpreter and for cross-checks).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from ep_comm.core import fp8 as fp8_format
from ep_comm.errors import InputError
from ep_comm.kernels.triton import grouped_gemm as _gg
from ep_comm.kernels.triton import grouped_gemm_ws as _ws
from ep_comm.kernels.triton import quant as _quant
from ep_comm.moe.launch import KernelPlan

from ep_comm.core.constants import FP8_BLOCK as SCALE_BLOCK  # channels per scale along K
from ep_comm.core.fp8 import FP8_DTYPE


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Block sizes and launch parameters of one grouped GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False
    #: Load operands with TMA (tensor descriptors) instead of pointers: None = wherever the
    #: operands allow it (16-byte aligned base and row strides, ``[E, N]`` dims of the weights
    #: mergeable into one), False = pointers, True = TMA or an error.
    tma: bool | None = None
    #: Contiguous FP8 only: the warp-specialized Gluon kernel (``kernels/grouped_gemm_ws.py``;
    #: Hopper, TMA operands, tile fixed at 128 x 256 x 128, ``num_stages`` = ring depth 2-4,
    #: ``num_warps`` = 4 per consumer warpgroup).
    warp_specialized: bool = False


#: The warp-specialized FP8 configuration (``contiguous_config`` picks it on Hopper).
WS_FP8_CONFIG = GemmConfig(_ws.BLOCK_M, _ws.BLOCK_N, _ws.BLOCK_K, num_warps=4,
                           num_stages=_ws.STAGES, tma=True, warp_specialized=True)


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when the Triton kernels run in the interpreter (``TRITON_INTERPRET=1`` at import;
    fixed from then on, so computed once)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_gg.contiguous_gemm_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _fail(msg: str):
    raise InputError(msg)


def _split(name: str, t):
    """``t`` or ``(t_fp8, scales)`` -> (data, scales or None)."""
    if isinstance(t, (tuple, list)):
        if len(t) != 2:
            _fail(f"{name} must be a tensor or a (fp8 tensor, scales) pair, got {len(t)} items")
        data, scales = t
        if not isinstance(data, torch.Tensor) or data.dtype != FP8_DTYPE:
            _fail(f"{name}[0] must be a float8_e4m3fn tensor, got "
                  f"{getattr(data, 'dtype', type(data).__name__)}")
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
            _fail(f"{name}[1] (scales) must be a float32 tensor, got "
                  f"{getattr(scales, 'dtype', type(scales).__name__)}")
        return data, scales
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a tensor or a (fp8 tensor, scales) pair, got {type(t).__name__}")
    if t.dtype != torch.bfloat16:
        _fail(f"{name} must be bfloat16 or an (float8_e4m3fn, float32 scales) pair, got {t.dtype}")
    return t, None


def _check_device(names_tensors, interp: bool):
    dev = names_tensors[0][1].device
    for name, t in names_tensors:
        if t.device != dev:
            _fail(f"{name} is on {t.device} but {names_tensors[0][0]} is on {dev}")
    if not interp and dev.type != "cuda":
        _fail(f"the Triton kernels need CUDA tensors, got {names_tensors[0][0]} on {dev}; on a "
              f"CPU set TRITON_INTERPRET=1 before importing ep_comm, or use the *_torch versions")
    return dev


def _check_k_contiguous(name: str, t: torch.Tensor):
    if t.stride(-1) != 1:
        _fail(f"{name} must be contiguous along its last (K) dimension, got strides "
              f"{tuple(t.stride())} (call .contiguous())")


def _check_operands(a, a_s, b, b_s, lead: tuple, what: str):
    """Shapes of a [*lead, K] / b [E, N, K] and their scales; returns (E, N, K, fp8)."""
    if b.dim() != 3:
        _fail(f"b must be [num_experts, N, K], got shape {list(b.shape)}")
    e, n, k = b.shape
    if a.dim() != len(lead) + 1 or a.shape[-1] != k:
        want = ", ".join(map(str, lead)) + f", {k}"
        _fail(f"a must be [{want}] ({what}, K = b.shape[2]), got shape {list(a.shape)}")
    if any(s is not None and s != d for s, d in zip(lead, a.shape)):
        want = ", ".join("*" if s is None else str(s) for s in lead)
        _fail(f"a must be [{want}, {k}] ({what}), got shape {list(a.shape)}")
    fp8 = a_s is not None
    if fp8 != (b_s is not None):
        _fail("a and b must both be bf16 or both fp8 tuples, got "
              f"a {'fp8' if fp8 else 'bf16'} and b {'fp8' if b_s is not None else 'bf16'}")
    _check_k_contiguous("a", a)
    _check_k_contiguous("b", b)
    if fp8:
        if k % SCALE_BLOCK:
            _fail(f"fp8 operands need K % 128 == 0 (one scale per 128 channels), got K={k}")
        want_as = list(a.shape[:-1]) + [k // SCALE_BLOCK]
        if list(a_s.shape) != want_as:
            _fail(f"a scales must be {want_as} (one per row per 128 channels), "
                  f"got {list(a_s.shape)}")
        want_bs = [e, triton.cdiv(n, SCALE_BLOCK), k // SCALE_BLOCK]
        if list(b_s.shape) != want_bs:
            _fail(f"b scales must be {want_bs} (128 x 128 blocks of [E, N, K]), "
                  f"got {list(b_s.shape)}")
    return e, n, k, fp8


def _check_counts(name: str, t, e: int, dev):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.shape != (e,):
        _fail(f"{name} must be an int32 tensor of shape [{e}], got "
              f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    if t.device != dev:
        _fail(f"{name} is on {t.device}, the operands on {dev}")
    if t.stride(0) != 1:
        _fail(f"{name} must be contiguous")


def _check_out(out, shape, dev):
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=dev)
    if out.dtype != torch.bfloat16 or list(out.shape) != list(shape) or out.device != dev:
        _fail(f"out must be a bfloat16 tensor of shape {list(shape)} on {dev}, got "
              f"{out.dtype} {list(out.shape)} on {out.device}")
    if out.stride(-1) != 1:
        _fail("out must be contiguous along its last dimension")
    return out


def _tma_ok(t: torch.Tensor, rows_dims: int) -> bool:
    """True when ``t`` (K-contiguous) can be described as a 2D TMA tensor ``[rows, K]`` whose
    rows merge its first ``rows_dims`` dims: 16-byte aligned base and row stride, and the merged
    dims laid out as one (``stride[i] == shape[i+1] * stride[i+1]``)."""
    es = t.element_size()
    if t.data_ptr() % 16 or (t.stride(-2) * es) % 16 or t.shape[-1] * es < 16:
        return False
    return all(t.stride(i) == t.shape[i + 1] * t.stride(i + 1) for i in range(rows_dims - 1))


def _use_tma(cfg: GemmConfig, operands: list[tuple[str, torch.Tensor, int]]) -> bool:
    """Resolves ``cfg.tma`` against the operands [(name, tensor, rows_dims)]."""
    if cfg.tma is False:
        return False
    if not _gg.HAS_TMA:
        if cfg.tma:
            _fail("config.tma=True, but this Triton has no host tensor descriptors")
        return False
    bad = [name for name, t, dims in operands if not _tma_ok(t, dims)]
    if bad and cfg.tma:
        _fail(f"config.tma=True, but {', '.join(bad)} cannot be TMA-described (needs 16-byte "
              f"aligned base and row stride, and the leading dims contiguous)")
    return not bad


def _desc(t: torch.Tensor, rows_dims: int, block: list[int]):
    """2D tensor descriptor of ``t`` with its first ``rows_dims`` dims merged into rows."""
    shape = [t.numel() // t.shape[-1] if t.numel() else 0, t.shape[-1]]
    return _gg.TensorDescriptor(t, shape, [t.stride(-2), 1], block)


# ----------------------------------------------------------------------------- heuristics
def ws_available(device: torch.device | None = None) -> str | None:
    """None when the warp-specialized FP8 kernel can run on ``device`` (default: the current
    CUDA device), else why not."""
    if not _ws.HAS_GLUON:
        return "this Triton has no Gluon Hopper API (triton.experimental.gluon)"
    if interpreting():
        return "Gluon kernels do not run under TRITON_INTERPRET"
    if not torch.cuda.is_available():
        return "no CUDA device"
    index = device.index if device is not None and device.index is not None else \
        torch.cuda.current_device()
    cap = _capability(index)
    if cap != (9, 0):
        return f"it is written for Hopper (sm_90); this GPU is sm_{cap[0]}{cap[1]}"
    return None


def contiguous_config(num_rows: int, n: int, k: int, num_groups: int, fp8: bool,
                      interpret: bool = False, warp_specialized: bool | None = None) -> GemmConfig:
    """Block sizes of the contiguous grouped GEMM (see the module docstring for the reasons).
    ``warp_specialized``: None = the Gluon FP8 kernel where ``ws_available()`` says it runs,
    False = the Triton kernel."""
    if interpret:
        avg = num_rows / max(num_groups, 1)
        return GemmConfig(16 if avg <= 16 else 32, 32, 128 if fp8 else 32, 4, 1)
    avg = num_rows / max(num_groups, 1)
    if (fp8 and avg > 64 and n >= 256
            and warp_specialized is not False and ws_available() is None):
        return WS_FP8_CONFIG
    if fp8 and avg >= 256:  # one weight-scale block per tile; no padding waste at >= 256 rows
        return GemmConfig(256, 128, 128, num_warps=8, num_stages=3)
    block_m = 64 if avg <= 64 else 128
    block_n = 256 if n >= 256 else 128
    block_k = 128 if fp8 else 64
    if block_m == 128:
        return GemmConfig(block_m, block_n, block_k, num_warps=8, num_stages=3)
    return GemmConfig(block_m, block_n, block_k, num_warps=4, num_stages=4)


def masked_config(expected_m: int | None, n: int, k: int, fp8: bool,
                  interpret: bool = False) -> GemmConfig:
    """Block sizes of the masked (low-latency) grouped GEMM (see the module docstring)."""
    m = 64 if expected_m is None else max(1, int(expected_m))
    block_m = max(16, triton.next_power_of_2(m))
    if interpret:
        return GemmConfig(min(block_m, 32), 32, 128 if fp8 else 32, 4, 1, swap_ab=block_m <= 16)
    block_m = min(block_m, 128)
    block_k = 128 if fp8 else 64
    if fp8 and block_m <= 32:
        return GemmConfig(block_m, 128, block_k, num_warps=4, num_stages=4, swap_ab=True)
    if fp8 and block_m == 64:
        return GemmConfig(64, 128, block_k, num_warps=4, num_stages=4)
    if block_m <= 64:
        return GemmConfig(block_m, 128, block_k, num_warps=4, num_stages=5, swap_ab=True)
    return GemmConfig(block_m, 128, block_k, num_warps=8, num_stages=4)


def _check_ws_config(cfg: GemmConfig, fp8: bool, dev: torch.device, no_tma: list[str]):
    """``no_tma``: the operands that cannot be TMA-described."""
    if not fp8:
        _fail("config.warp_specialized is for fp8 operands only")
    if (cfg.block_m, cfg.block_n, cfg.block_k) != (_ws.BLOCK_M, _ws.BLOCK_N, _ws.BLOCK_K):
        _fail(f"config.warp_specialized needs blocks ({_ws.BLOCK_M}, {_ws.BLOCK_N}, "
              f"{_ws.BLOCK_K}), got ({cfg.block_m}, {cfg.block_n}, {cfg.block_k})")
    if not 2 <= cfg.num_stages <= 4:
        _fail(f"config.warp_specialized needs num_stages in 2..4 (48 KB each), got {cfg.num_stages}")
    if cfg.tma is False:
        _fail("config.warp_specialized loads by TMA: tma=False contradicts it")
    if no_tma:
        _fail(f"config.warp_specialized loads by TMA, but {', '.join(no_tma)} cannot be "
              f"TMA-described (needs 16-byte aligned base and row stride, leading dims contiguous)")
    why = ws_available(dev)
    if why is not None:
        _fail(f"config.warp_specialized cannot run here: {why}")


def _check_config(cfg: GemmConfig, fp8: bool, max_block_n_fp8: int):
    for f in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, f)
        if v < 16 or v & (v - 1):
            _fail(f"config.{f} must be a power of two >= 16, got {v}")
    if fp8 and cfg.block_k != SCALE_BLOCK:
        _fail(f"fp8 needs config.block_k == 128 (the scale block), got {cfg.block_k}")
    if fp8 and cfg.block_n > max_block_n_fp8:
        _fail(f"fp8 needs config.block_n <= {max_block_n_fp8} here (a tile's columns must share "
              f"one weight-scale block, or be two 128-wide halves), got {cfg.block_n}")
    if cfg.swap_ab and fp8 and cfg.block_n > SCALE_BLOCK:
        _fail("swap_ab with fp8 needs config.block_n <= 128")


# ----------------------------------------------------------------------------- grouped GEMMs
def grouped_gemm_contiguous(a, b, group_end: torch.Tensor, *, group_rows: torch.Tensor | None = None,
                            out: torch.Tensor | None = None,
                            config: GemmConfig | None = None) -> torch.Tensor:
    """Grouped GEMM on the contiguous (normal-mode) layout.

    Args:
        a: [M, K] bf16, or (a_fp8 [M, K] float8_e4m3fn, a_scales [M, K // 128] float32).
            Expert e's rows are ``[group_end[e-1], group_end[e-1] + rows_e)`` (group_end[-1]
            taken as 0).
        b: [E, N, K] bf16, or (b_fp8 [E, N, K], b_scales [E, ceil(N/128), K // 128] float32).
        group_end: [E] int32 on a's device, cumulative end row of each expert's group
            (non-decreasing, <= M; as ``torch._grouped_mm``'s ``offs``). Groups may hold
            alignment padding at their end.
        group_rows: [E] int32 or None: valid rows at the start of each group (<= its size); the
            rest of the group is neither computed nor written. None: every row is valid.
        out: [M, N] bf16 to write into (rows outside every group's valid range are untouched),
            or None to allocate.
        config: block sizes; None chooses by ``contiguous_config``.

    Returns:
        out: [M, N] bf16, ``out[r] = a[r] @ b[e].T`` for each valid row r of expert e.
    """
    plan, out = contiguous_plan(a, b, group_end, group_rows=group_rows, out=out, config=config)
    return plan.launch(a, group_end, group_rows, out)


class ContiguousGemmPlan:
    """``grouped_gemm_contiguous`` for one shape, after its checks (``contiguous_plan``).

    ``run(a, group_end, group_rows, out=None)`` computes the same on new tensors with the
    shapes, strides, dtypes and device of the first call's (and the same weights ``b``): the
    caller guarantees that (``ep_comm.moe.layer``'s step plans key on them), this checks only
    what a new tensor can change without changing its shape: TMA's 16-byte alignment.
    """

    def __init__(self, kernel_plan: KernelPlan | None, grid: tuple, out_shape, device,
                 fp8: bool, a_desc=None, a_scales_transpose: bool = False):
        self.kernel_plan = kernel_plan
        self.grid = grid
        self.out_shape = out_shape
        self.device = device
        self.fp8 = fp8
        #: (descriptor class, its arguments after the tensor) of a TMA-loaded ``a``, else None
        self.a_desc = a_desc
        self.a_scales_transpose = a_scales_transpose

    def run(self, a, group_end, group_rows=None, out=None) -> torch.Tensor:
        """[M, N] bf16 (``out`` if given)."""
        if out is None:
            out = torch.empty(self.out_shape, dtype=torch.bfloat16, device=self.device)
        return self.launch(a, group_end, group_rows, out)

    def launch(self, a, group_end, group_rows, out) -> torch.Tensor:
        if self.kernel_plan is None:  # nothing to compute (M, N or E is 0)
            return out
        data, scales = a if self.fp8 else (a, a)
        if self.a_scales_transpose:
            scales = fp8_format.column_major_last2(scales)
        a_arg = data
        if self.a_desc is not None:
            if data.data_ptr() % 16:
                _fail("a must stay 16-byte aligned for the TMA plan of this shape (its first "
                      "call was); pass a fresh allocation or call grouped_gemm_contiguous")
            cls, rest = self.a_desc
            a_arg = cls(data, *rest)
        rows = group_rows if group_rows is not None else group_end
        self.kernel_plan(self.grid, (a_arg, out, scales, group_end, rows))
        return out


def contiguous_plan(a, b, group_end: torch.Tensor, *, group_rows: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, config: GemmConfig | None = None):
    """The checks, configuration and launch plan of ``grouped_gemm_contiguous`` for these
    arguments (same meaning): returns (``ContiguousGemmPlan``, out), ``out`` allocated if None.
    Raises ``InputError`` as ``grouped_gemm_contiguous`` does."""
    a, a_s = _split("a", a)
    b, b_s = _split("b", b)
    e, n, k, fp8 = _check_operands(a, a_s, b, b_s, (None,), "contiguous rows")
    m = a.shape[0]
    interp = interpreting()
    named = [("a", a), ("b", b), ("group_end", group_end)] + ([("a scales", a_s), ("b scales", b_s)] if fp8 else [])
    dev = _check_device(named, interp)
    _check_counts("group_end", group_end, e, dev)
    if group_rows is not None:
        _check_counts("group_rows", group_rows, e, dev)
    out = _check_out(out, (m, n), dev)
    if m == 0 or n == 0 or e == 0:
        return ContiguousGemmPlan(None, (1,), (m, n), dev, fp8), out
    cfg = config or contiguous_config(m, n, k, e, fp8, interp)
    if cfg.warp_specialized:
        no_tma = [name for name, t, dims in (("a", a, 1), ("b", b, 2)) if not _tma_ok(t, dims)]
        if no_tma and config is None:  # the heuristic's choice: the Triton kernel instead
            cfg = contiguous_config(m, n, k, e, fp8, interp, warp_specialized=False)
        else:
            _check_ws_config(cfg, fp8, dev, no_tma)
    if not cfg.warp_specialized:
        _check_config(cfg, fp8, 2 * SCALE_BLOCK)
    if cfg.swap_ab:
        _fail("the contiguous GEMM has no swap_ab variant")
    transpose = fp8 and a_s.stride(0) != 1 and m > 1
    if transpose:
        # [M, K/128] row-major -> column-major: each K step then loads BM consecutive floats.
        a_s = fp8_format.column_major_last2(a_s)
    n_tiles = triton.cdiv(n, cfg.block_n)
    max_tiles = (triton.cdiv(m, cfg.block_m) + e) * n_tiles
    sms = 4 if interp else _num_sms(dev.index if dev.index is not None else torch.cuda.current_device())
    num_programs = max(1, min(sms, max_tiles))
    rows = group_rows if group_rows is not None else group_end
    if cfg.warp_specialized:
        kplan, a_desc = _ws_plan(a, a_s, b, b_s, out, group_end, rows, group_rows is not None,
                                 cfg, num_programs)
        return ContiguousGemmPlan(kplan, (num_programs,), (m, n), dev, fp8, a_desc,
                                  transpose), out
    a_s_ = a_s if fp8 else a
    b_s_ = b_s if fp8 else b
    as_strides = (a_s.stride(0), a_s.stride(1)) if fp8 else (0, 0)
    bs_strides = (b_s.stride(0), b_s.stride(1), b_s.stride(2)) if fp8 else (0, 0, 0)
    tma = _use_tma(cfg, [("a", a, 1), ("b", b, 2)])
    a_arg, b_arg, a_desc = a, b, None
    if tma:
        bn = SCALE_BLOCK if fp8 and cfg.block_n > SCALE_BLOCK else cfg.block_n
        a_arg = _desc(a, 1, [cfg.block_m, cfg.block_k])
        a_desc = (_gg.TensorDescriptor, ([m, k], [a.stride(0), 1], [cfg.block_m, cfg.block_k]))
        b_arg = _desc(b, 2, [bn, cfg.block_k])
    kplan = KernelPlan(_gg.contiguous_gemm_kernel, (
        a_arg, b_arg, out, a_s_, b_s_, group_end, rows,
        m, n, k, e,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1), *as_strides, *bs_strides), dict(
        NUM_PROGRAMS=num_programs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, E_POW2=max(16, triton.next_power_of_2(e)),
        HAS_ROWS=group_rows is not None, FP8=fp8, INTERPRET=interp,
        EVEN_K=k % cfg.block_k == 0, TMA=tma, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages), slots=(0, 2, 3, 5, 6))
    return ContiguousGemmPlan(kplan, (num_programs,), (m, n), dev, fp8, a_desc, transpose), out


def _ws_plan(a, a_s, b, b_s, out, group_end, rows, has_rows: bool, cfg: GemmConfig,
             num_programs: int):
    """(KernelPlan, a's descriptor recipe) of the warp-specialized FP8 kernel on operands
    ``_check_ws_config`` passed (``kernels/grouped_gemm_ws.py``). The weights' descriptor is
    built here once; ``a``'s is rebuilt per call from the recipe."""
    m, k = a.shape
    e, n = b.shape[0], b.shape[1]
    la, lb = _ws.smem_layouts()
    a_rest = ([m, k], [a.stride(0), 1], [_ws.BLOCK_M, _ws.BLOCK_K], la)
    a_desc = _ws.TensorDescriptor(a, *a_rest)
    b_desc = _ws.TensorDescriptor(b, [e * n, k], [b.stride(1), 1], [_ws.BLOCK_N, _ws.BLOCK_K], lb)
    kplan = KernelPlan(_ws.fp8_contiguous_ws_kernel, (
        a_desc, b_desc, out, a_s, b_s, group_end, rows,
        m, n, k, e, out.stride(0), a_s.stride(0), a_s.stride(1),
        b_s.stride(0), b_s.stride(1), b_s.stride(2)), dict(
        NUM_PROGRAMS=num_programs, E_POW2=max(32, triton.next_power_of_2(e)),
        HAS_ROWS=has_rows, NUM_STAGES=cfg.num_stages,
        num_warps=4, maxnreg=_ws.LAUNCH_MAXNREG), slots=(0, 2, 3, 5, 6))
    return kplan, (_ws.TensorDescriptor, a_rest)


def grouped_gemm_masked(a, b, count: torch.Tensor, *, expected_m: int | None = None,
                        out: torch.Tensor | None = None,
                        config: GemmConfig | None = None) -> torch.Tensor:
    """Grouped GEMM on the masked (low-latency) layout, e.g. straight on low-latency dispatch's
    ``recv_x`` (bf16 or its FP8 tuple with column-major scales, no copy or dequantisation).

    Args:
        a: [E, M, K] bf16, or (a_fp8 [E, M, K] float8_e4m3fn, a_scales [E, M, K // 128]
            float32, any strides).
        b: [E, N, K] bf16, or (b_fp8 [E, N, K], b_scales [E, ceil(N/128), K // 128] float32).
        count: [E] int32 on a's device: rows ``[0, count[e])`` of expert e are valid (values
            above M are treated as M); the other rows are neither read nor written.
        expected_m: the expected largest valid count (a host-side hint that picks BLOCK_M; a
            count above it is still right, it only re-reads the weights). None: 64.
        out: [E, M, N] bf16 to write into, or None to allocate (rows past the counts are then
            uninitialised).
        config: block sizes; None chooses by ``masked_config``.

    Returns:
        out: [E, M, N] bf16, ``out[e, :count[e]] = a[e, :count[e]] @ b[e].T``.
    """
    plan, out = masked_plan(a, b, count, expected_m=expected_m, out=out, config=config)
    return plan.launch(a, count, out)


class MaskedGemmPlan:
    """``grouped_gemm_masked`` for one shape, after its checks (``masked_plan``).

    ``run(a, count, out=None)`` computes the same on new tensors with the shapes, strides,
    dtypes and device of the first call's (and the same weights ``b``); the caller guarantees
    that (``ep_comm.moe.layer``'s step plans key on them).
    """

    def __init__(self, kernel_plan: KernelPlan | None, grid: tuple, out_shape, device, fp8: bool):
        self.kernel_plan = kernel_plan
        self.grid = grid
        self.out_shape = out_shape
        self.device = device
        self.fp8 = fp8

    def run(self, a, count, out=None) -> torch.Tensor:
        """[E, M, N] bf16 (``out`` if given)."""
        if out is None:
            out = torch.empty(self.out_shape, dtype=torch.bfloat16, device=self.device)
        return self.launch(a, count, out)

    def launch(self, a, count, out) -> torch.Tensor:
        if self.kernel_plan is not None:
            data, scales = a if self.fp8 else (a, a)
            self.kernel_plan(self.grid, (data, out, scales, count))
        return out


def masked_plan(a, b, count: torch.Tensor, *, expected_m: int | None = None,
                out: torch.Tensor | None = None, config: GemmConfig | None = None):
    """The checks, configuration and launch plan of ``grouped_gemm_masked`` for these
    arguments (same meaning): returns (``MaskedGemmPlan``, out), ``out`` allocated if None.
    Raises ``InputError`` as ``grouped_gemm_masked`` does."""
    a, a_s = _split("a", a)
    b, b_s = _split("b", b)
    e, n, k, fp8 = _check_operands(a, a_s, b, b_s, (b.shape[0] if b.dim() == 3 else None, None),
                                   "experts x max tokens")
    m = a.shape[1]
    interp = interpreting()
    named = [("a", a), ("b", b), ("count", count)] + ([("a scales", a_s), ("b scales", b_s)] if fp8 else [])
    dev = _check_device(named, interp)
    _check_counts("count", count, e, dev)
    out = _check_out(out, (e, m, n), dev)
    if m == 0 or n == 0 or e == 0:
        return MaskedGemmPlan(None, (1,), (e, m, n), dev, fp8), out
    cfg = config or masked_config(expected_m, n, k, fp8, interp)
    _check_config(cfg, fp8, SCALE_BLOCK)
    a_s_ = a_s if fp8 else a
    b_s_ = b_s if fp8 else b
    as_strides = (a_s.stride(0), a_s.stride(1), a_s.stride(2)) if fp8 else (0, 0, 0)
    bs_strides = (b_s.stride(0), b_s.stride(1), b_s.stride(2)) if fp8 else (0, 0, 0)
    grid = (triton.cdiv(n, cfg.block_n), e)
    tma = _use_tma(cfg, [("b", b, 2)])
    b_arg = _desc(b, 2, [cfg.block_n, cfg.block_k]) if tma else b
    kplan = KernelPlan(_gg.masked_gemm_kernel, (
        a, b_arg, out, a_s_, b_s_, count, m, n, k,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1), out.stride(2), *as_strides, *bs_strides), dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, FP8=fp8,
        INTERPRET=interp, EVEN_K=k % cfg.block_k == 0, SWAP_AB=cfg.swap_ab, TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages), slots=(0, 2, 3, 5))
    return MaskedGemmPlan(kplan, grid, (e, m, n), dev, fp8), out


# ----------------------------------------------------------------------------- quant / SiLU
def _act_launch(x, count, *, silu: bool, quant: bool, round_scale: bool,
                column_major_scales: bool | None, out=None):
    plan = act_plan(x, count, silu=silu, quant=quant, round_scale=round_scale,
                    column_major_scales=column_major_scales, out=out)
    return plan.run(x, count, out)


class ActPlan:
    """``quant_kernel`` (FP8 cast, SiLU * up, or both) for one input shape, after the checks
    (``act_plan``). ``run(x, count, out=None)`` allocates the outputs and launches on a new
    ``x`` with the first call's shape, strides, dtype and device (the caller guarantees it).

    The kernel addresses rows as ``[E, M]`` with explicit strides, so a 2D input is passed as
    it is (expert stride 0), with no ``unsqueeze`` views; ``flat_count`` plans (the layer's)
    also accept a device count with a 2D input: rows ``m < count[0]`` only.
    """

    def __init__(self, kernel_plan: KernelPlan | None, grid: tuple, quant: bool, out_shape,
                 scale_shape, scale_transposed: bool, device):
        self.kernel_plan = kernel_plan
        self.grid = grid
        self.quant = quant
        self.out_shape = out_shape
        self.scale_shape = scale_shape
        self.scale_transposed = scale_transposed
        self.device = device

    def run(self, x: torch.Tensor, count=None, out=None):
        """(q, scales) when quantising, else the bf16 output (``out`` if given)."""
        if self.quant:
            q = torch.empty(self.out_shape, dtype=FP8_DTYPE, device=self.device)
            s = torch.empty(self.scale_shape, dtype=torch.float32, device=self.device)
            if self.scale_transposed:
                s = s.transpose(-1, -2)
        else:
            q = out if out is not None else torch.empty(self.out_shape, dtype=torch.bfloat16,
                                                        device=self.device)
            s = q
        if self.kernel_plan is not None:
            self.kernel_plan(self.grid, (x, q, s, count if count is not None else x))
        return (q, s) if self.quant else q


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of ``t`` addressed as [E, M, C] (a 2D tensor: E = 1, expert stride 0)."""
    return tuple(t.stride()) if t.dim() == 3 else (0, t.stride(0), t.stride(1))


def act_plan(x, count, *, silu: bool, quant: bool, round_scale: bool,
             column_major_scales: bool | None, out=None, flat_count: bool = False) -> ActPlan:
    """The checks and launch plan of ``quantize_fp8`` / ``silu_mul`` / ``silu_mul_quant_fp8``
    for ``x`` (same arguments). ``flat_count``: a count may come with a 2D ``x`` (one group)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float32):
        _fail(f"x must be a bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() not in (2, 3):
        _fail(f"x must be [T, C] or [E, M, C], got shape {list(x.shape)}")
    interp = interpreting()
    dev = _check_device([("x", x)], interp)
    _check_k_contiguous("x", x)
    c = x.shape[-1]
    width = c // 2 if silu else c
    if silu and c % 2:
        _fail(f"x's last dimension must be even ([gate | up]), got {c}")
    if quant and width % SCALE_BLOCK:
        _fail(f"the {'intermediate' if silu else 'hidden'} size must be a multiple of 128 for "
              f"the fp8 cast, got {width}")
    e, m = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
    if count is not None:
        if x.dim() != 3 and not flat_count:
            _fail("count is only accepted with a 3D [E, M, C] input")
        _check_counts("count", count, e, dev)
    groups = triton.cdiv(width, SCALE_BLOCK)
    out_shape = (*x.shape[:-1], width)
    scale_shape, transposed = None, False
    if quant:
        transposed = (x.dim() == 3) if column_major_scales is None else column_major_scales
        scale_shape = ((*x.shape[:-2], groups, x.shape[-2]) if transposed
                       else (*x.shape[:-1], groups))
    else:
        out = _check_out(out, out_shape, dev)
    if e * m == 0:
        return ActPlan(None, (1,), quant, out_shape, scale_shape, transposed, dev)
    # strides of the outputs as ``run`` allocates them (or of the caller's ``out``)
    q = out if out is not None else torch.empty(out_shape, dtype=FP8_DTYPE, device="meta")
    s_strides = (0, 0, 0)
    if quant:
        s = torch.empty(scale_shape, dtype=torch.float32, device="meta")
        s_strides = _strides3(s.transpose(-1, -2) if transposed else s)
    block_g = min(16, triton.next_power_of_2(groups))
    grid = (e * m, triton.cdiv(groups, block_g))
    kplan = KernelPlan(_quant.quant_kernel, (
        x, q, q, x, m, width, groups, width if silu else 0,
        *_strides3(x), *_strides3(q), *s_strides), dict(
        BLOCK_G=block_g, SILU=silu, QUANT=quant, HAS_COUNT=count is not None,
        ROUND_SCALE=round_scale, INTERPRET=interp, num_warps=4), slots=(0, 1, 2, 3))
    return ActPlan(kplan, grid, quant, out_shape, scale_shape, transposed, dev)


def quantize_fp8(x: torch.Tensor, *, count: torch.Tensor | None = None, round_scale: bool = False,
                 column_major_scales: bool | None = None):
    """Per-token 128-channel FP8 cast, bit-identical to ``ep_comm.core.fp8.per_token_cast_to_fp8``.

    Args:
        x: [T, H] or [E, M, H] bf16 / float32, H % 128 == 0.
        count: [E] int32 (3D only): only rows ``m < count[e]`` are cast; others are left as is.
        round_scale: round each scale up to a power of two.
        column_major_scales: store the scales column-major in their last two dims (the layout of
            low-latency dispatch); None: column-major for 3D inputs, row-major for 2D.

    Returns:
        (x_fp8 [..., H] float8_e4m3fn, scales [..., H // 128] float32).
    """
    return _act_launch(x, count, silu=False, quant=True, round_scale=round_scale,
                       column_major_scales=column_major_scales)


def silu_mul(x: torch.Tensor, *, count: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` in fp32, stored as bf16 ``[..., I]``.

    ``x`` is [T, 2I] or [E, M, 2I] (bf16 or float32); with ``count`` [E] int32 (3D only) only
    rows ``m < count[e]`` are computed and written.
    """
    return _act_launch(x, count, silu=True, quant=False, round_scale=False,
                       column_major_scales=None, out=out)


def silu_mul_quant_fp8(x: torch.Tensor, *, count: torch.Tensor | None = None,
                       round_scale: bool = False, column_major_scales: bool | None = None):
    """``silu(gate) * up`` cast straight to the FP8 tuple (one pass, no bf16 intermediate).

    Args as ``silu_mul`` and ``quantize_fp8``. Returns (h_fp8 [..., I] float8_e4m3fn,
    scales [..., I // 128] float32), scales column-major for 3D inputs unless told otherwise.
    """
    return _act_launch(x, count, silu=True, quant=True, round_scale=round_scale,
                       column_major_scales=column_major_scales)


# ----------------------------------------------------------------------------- torch versions
def _dequant_a(a):
    data, s = (a if isinstance(a, (tuple, list)) else (a, None))
    return data.float() if s is None else fp8_format.dequantize(data, s)


def _dequant_b(b):
    if not isinstance(b, (tuple, list)):
        return b.float()
    w, s = b
    e, n, k = w.shape
    full = s.repeat_interleave(SCALE_BLOCK, 1)[:, :n].repeat_interleave(SCALE_BLOCK, 2)[:, :, :k]
    return w.float() * full


def grouped_gemm_contiguous_torch(a, b, group_end, *, group_rows=None, out=None) -> torch.Tensor:
    """``grouped_gemm_contiguous`` in plain torch (float32 math, host-synchronising)."""
    af, bf = _dequant_a(a), _dequant_b(b)
    if out is None:
        out = torch.empty(af.shape[0], bf.shape[1], dtype=torch.bfloat16, device=af.device)
    ends = group_end.tolist()
    rows = group_rows.tolist() if group_rows is not None else None
    start = 0
    for e, end in enumerate(ends):
        n_rows = end - start if rows is None else min(rows[e], end - start)
        if n_rows > 0:
            out[start:start + n_rows] = (af[start:start + n_rows] @ bf[e].T).to(torch.bfloat16)
        start = end
    return out


def grouped_gemm_masked_torch(a, b, count, *, out=None, expected_m=None) -> torch.Tensor:
    """``grouped_gemm_masked`` in plain torch (float32 math, host-synchronising)."""
    af, bf = _dequant_a(a), _dequant_b(b)
    if out is None:
        out = torch.empty(af.shape[0], af.shape[1], bf.shape[1], dtype=torch.bfloat16,
                          device=af.device)
    for e, c in enumerate(count.tolist()):
        c = min(c, af.shape[1])
        if c > 0:
            out[e, :c] = (af[e, :c] @ bf[e].T).to(torch.bfloat16)
    return out


def silu_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """``silu_mul`` in plain torch (float32 math, bf16 result)."""
    g, u = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(torch.bfloat16)


def silu_mul_quant_fp8_torch(x: torch.Tensor, round_scale: bool = False):
    """``silu_mul_quant_fp8`` in plain torch (row-major scales)."""
    g, u = x.float().chunk(2, dim=-1)
    h = torch.nn.functional.silu(g) * u
    shape = h.shape
    q, s = fp8_format.per_token_cast_to_fp8(h.reshape(-1, shape[-1]), round_scale=round_scale)
    return q.view(shape), s.view(*shape[:-1], -1)
