"""Grouped GEMMs (contiguous and masked layouts, bf16 and FP8) against float64 references.

On a machine without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set
here before ep_comm is imported) at small shapes; ``-m gpu`` runs the same checks at
DeepSeek-V3 shapes on a GPU.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ep_comm.core import fp8  # noqa: E402
from ep_comm.moe import gemm
from ep_comm.errors import InputError  # noqa: E402
from ep_comm.moe import quantize_weight_fp8  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (run with -m gpu on the GPU machine)")
SENTINEL = 7.0  # written into out beforehand: rows a kernel must not write keep it


# ----------------------------------------------------------------------------- oracles
def dequant_act(a) -> torch.Tensor:
    if isinstance(a, tuple):
        return fp8.dequantize(a[0], a[1]).double()
    return a.double()


def dequant_weight(b) -> torch.Tensor:
    return gemm._dequant_b(b).double() if isinstance(b, tuple) else b.double()


#: Accumulation error of Hopper's FP8 tensor cores, per unit of sum(|terms|): their adder keeps
#: about 14 significant bits inside a K block (DeepSeek-V3 report, sec. 3.3.2), so each partial
#: sum of a 128-wide block can be off by about 2**-14 of the magnitudes it adds; 2**-12 bounds it
#: with margin. Under cancellation that is far more than 2**-12 of the largest output value
#: (seen on the H200: 1 value of 2560 off by 0.029 at max |ref| 9.8).
FP8_ACCUMULATION = 2.0 ** -12


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, what: str = "",
                      magnitude: torch.Tensor | None = None):
    """bf16 output of an fp32-accumulated product: half a bf16 ulp of the value (2**-9
    relative) plus summation error, bounded by 2**-12 of the largest value; for FP8 operands
    (``magnitude`` = |A| @ |B|^T, the sum of |terms| of each output) also FP8_ACCUMULATION of
    that sum."""
    if ref.numel() == 0:
        return
    err = (out.double() - ref).abs()
    tol = 2.0 ** -8 * ref.abs() + 2.0 ** -12 * ref.abs().max() + 1e-6
    if magnitude is not None:
        tol = tol + FP8_ACCUMULATION * magnitude
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {ref.numel()} values off, worst "
                           f"{err.max().item():.4g} at |ref| max {ref.abs().max().item():.4g}")


def generator(seed: int) -> torch.Generator:
    """A seeded generator on DEV: at DeepSeek-V3 shapes (16 experts x 4096 x 7168 weights) the
    CPU generator takes seconds per test, the GPU's milliseconds."""
    return torch.Generator(device=DEV).manual_seed(seed)


def make_act(rows: int, k: int, use_fp8: bool, g: torch.Generator):
    """[rows, k] bf16 rows of mixed magnitude (or their FP8 cast), drawn on ``g``'s device."""
    d = g.device
    x = torch.randn(rows, k, generator=g, device=d) * (1 + 3 * torch.rand(rows, 1, generator=g,
                                                                          device=d))
    x = x.to(torch.bfloat16).to(DEV)
    return fp8.per_token_cast_to_fp8(x) if use_fp8 else x


def make_weight(e: int, n: int, k: int, use_fp8: bool, g: torch.Generator):
    """[e, n, k] bf16 weights (or their FP8 blocks), drawn on ``g``'s device."""
    w = (torch.randn(e, n, k, generator=g, device=g.device) / k ** 0.5).to(torch.bfloat16).to(DEV)
    return quantize_weight_fp8(w) if use_fp8 else w


def counts_to_groups(counts, alignment):
    sizes = [(c + alignment - 1) // alignment * alignment for c in counts]
    ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    return (ends.to(torch.int32).to(DEV), torch.tensor(counts, dtype=torch.int32, device=DEV),
            int(ends[-1]) if len(sizes) else 0)


def check_contiguous(counts, n, k, use_fp8, alignment, seed, config=None, pass_rows=True):
    g = generator(seed)
    e = len(counts)
    ends, rows, m = counts_to_groups(counts, alignment)
    a = make_act(m, k, use_fp8, g)
    b = make_weight(e, n, k, use_fp8, g)
    out = torch.full((m, n), SENTINEL, dtype=torch.bfloat16, device=DEV)
    gemm.grouped_gemm_contiguous(a, b, ends, group_rows=rows if pass_rows else None, out=out,
                                 config=config)
    ad, bd = dequant_act(a), dequant_weight(b)
    start = 0
    for i, c in enumerate(counts):
        end = int(ends[i])
        valid = c if pass_rows else end - start
        rows = ad[start:start + valid]
        mag = rows.abs() @ bd[i].abs().T if use_fp8 else None
        assert_bf16_close(out[start:start + valid], rows @ bd[i].T, f"expert {i}", mag)
        assert (out[start + valid:end] == SENTINEL).all(), f"expert {i}: padding rows written"
        start = end


def check_masked(counts, m, n, k, use_fp8, seed, config=None, expected_m=None):
    g = generator(seed)
    e = len(counts)
    a = make_act(e * m, k, use_fp8, g)
    if use_fp8:  # the layout of low-latency dispatch: scales column-major in the last two dims
        a = (a[0].view(e, m, k), fp8.column_major_last2(a[1].view(e, m, k // 128)))
        assert a[1].stride(1) == 1
    else:
        a = a.view(e, m, k)
    b = make_weight(e, n, k, use_fp8, g)
    count = torch.tensor(counts, dtype=torch.int32, device=DEV)
    out = torch.full((e, m, n), SENTINEL, dtype=torch.bfloat16, device=DEV)
    gemm.grouped_gemm_masked(a, b, count, out=out, config=config, expected_m=expected_m)
    ad = (fp8.dequantize(a[0], a[1]) if use_fp8 else a).double()
    bd = dequant_weight(b)
    for i, c in enumerate(counts):
        c = min(c, m)
        mag = ad[i, :c].abs() @ bd[i].abs().T if use_fp8 else None
        assert_bf16_close(out[i, :c], ad[i, :c] @ bd[i].T, f"expert {i}", mag)
        assert (out[i, c:] == SENTINEL).all(), f"expert {i}: rows past the count written"


# ----------------------------------------------------------------------------- CPU (interpreter)
SMALL = gemm.GemmConfig(16, 32, 32, 4, 1)
SMALL_FP8 = gemm.GemmConfig(16, 32, 128, 4, 1)


TMA_IDS = {False: "pointers", True: "tma"}


@pytest.mark.parametrize("tma", [False, True], ids=TMA_IDS.get)
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("counts,alignment", [
    ([5, 0, 37, 16], 1),          # an empty expert, counts off the block size
    ([0, 0, 3, 0, 40, 1], 16),    # mostly empty experts, groups padded to 16 rows
    ([33], 1),                    # a single expert
])
def test_contiguous_gemm_ragged_groups_match_float64(counts, alignment, use_fp8, tma):
    # TMA: tiles past a group's rows load the next group's rows (never stored); pointers: clamped
    cfg = dataclasses.replace(SMALL_FP8 if use_fp8 else SMALL, tma=tma)
    check_contiguous(counts, n=96, k=256, use_fp8=use_fp8, alignment=alignment, seed=len(counts),
                     config=cfg)


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_contiguous_gemm_default_config_and_padding_rows_computed(use_fp8):
    # no group_rows: the whole (padded) group is computed; N not a multiple of the block.
    check_contiguous([7, 20, 0, 9], n=80, k=128, use_fp8=use_fp8, alignment=8, seed=3,
                     pass_rows=False)


@pytest.mark.parametrize("tma", [False, True], ids=TMA_IDS.get)
@pytest.mark.parametrize("n", [300, 256, 128], ids=["n300_half_past_n", "n256", "n128"])
def test_contiguous_fp8_256_wide_tiles_two_scale_blocks_match_float64(n, tma):
    # BLOCK_N 256 = two 128-column halves with their own weight scales; at N=300 the second
    # half of the last tile is partly past N and at N=128 wholly past it (clamped, not stored).
    cfg = gemm.GemmConfig(16, 256, 128, 4, 1, tma=tma)
    check_contiguous([5, 0, 21, 16], n=n, k=384, use_fp8=True, alignment=1, seed=11, config=cfg)


def test_fp8_gemm_scales_spanning_many_decades_match_float64():
    # The kernel keeps its accumulator in units of the current K block's scale; scales that
    # jump by 1e6 between K blocks (and tiny ones near the 1e-4 / 448 floor) must not lose
    # accuracy or overflow.
    g = torch.Generator().manual_seed(12)
    e, n, k = 2, 64, 512
    counts = [9, 14]
    ends, rows, m = counts_to_groups(counts, 1)
    x = torch.randn(m, k, generator=g)
    x = x * torch.tensor([1e-9, 1e3, 1e-3, 1.0]).repeat_interleave(128)[None, :]
    a = fp8.per_token_cast_to_fp8(x.to(torch.bfloat16).to(DEV))
    w = torch.randn(e, n, k, generator=g) / k ** 0.5
    w = w * torch.tensor([1e2, 1e-4, 1.0, 1e-6]).repeat_interleave(128)[None, None, :]
    b = quantize_weight_fp8(w.to(torch.bfloat16).to(DEV))
    for cfg in (gemm.GemmConfig(16, 32, 128, 4, 1), gemm.GemmConfig(16, 256, 128, 4, 1)):
        out = gemm.grouped_gemm_contiguous(a, b, ends, group_rows=rows, config=cfg)
        ad, bd = dequant_act(a), dequant_weight(b)
        for i, (lo, hi) in enumerate(((0, 9), (9, 23))):
            assert_bf16_close(out[lo:hi], ad[lo:hi] @ bd[i].T, f"expert {i}, {cfg}")
    am = (a[0].view(1, m, k), fp8.column_major_last2(a[1].view(1, m, k // 128)))
    cnt = torch.tensor([m], dtype=torch.int32, device=DEV)
    for swap in (False, True):
        out = gemm.grouped_gemm_masked(am, (b[0][:1], b[1][:1]), cnt,
                                       config=gemm.GemmConfig(16, 32, 128, 4, 1, swap_ab=swap))
        assert_bf16_close(out[0], dequant_act(a) @ dequant_weight(b)[0].T, f"masked swap={swap}")


def test_fp8_config_rules_are_enforced():
    g = torch.Generator().manual_seed(13)
    ends, rows, m = counts_to_groups([4, 4], 1)
    a = make_act(m, 256, True, g)
    b = make_weight(2, 64, 256, True, g)
    with pytest.raises(InputError, match="block_k == 128"):
        gemm.grouped_gemm_contiguous(a, b, ends, config=gemm.GemmConfig(16, 32, 64, 4, 1))
    with pytest.raises(InputError, match="block_n <= 256"):
        gemm.grouped_gemm_contiguous(a, b, ends, config=gemm.GemmConfig(16, 512, 128, 4, 1))
    am = (a[0].view(2, 4, 256), a[1].view(2, 4, 2))
    with pytest.raises(InputError, match="block_n <= 128"):
        gemm.grouped_gemm_masked(am, b, torch.full((2,), 4, dtype=torch.int32, device=DEV),
                                 config=gemm.GemmConfig(16, 256, 128, 4, 1))


@pytest.mark.parametrize("tma", [False, True], ids=TMA_IDS.get)
def test_contiguous_gemm_k_not_multiple_of_block(tma):
    check_contiguous([9, 0, 17], n=48, k=72, use_fp8=False, alignment=1, seed=4,
                     config=dataclasses.replace(SMALL, tma=tma))


def test_tma_falls_back_to_pointers_where_operands_do_not_allow_it():
    # K = 12 bf16: a 24-byte row stride is not 16-byte aligned, so TMA cannot describe it;
    # auto picks pointers, tma=True says why it cannot.
    check_contiguous([3, 5], n=32, k=12, use_fp8=False, alignment=1, seed=14,
                     config=dataclasses.replace(SMALL, block_k=16))
    g = torch.Generator().manual_seed(15)
    ends, rows, m = counts_to_groups([3, 5], 1)
    with pytest.raises(InputError, match="cannot be TMA-described"):
        gemm.grouped_gemm_contiguous(make_act(m, 12, False, g), make_weight(2, 32, 12, False, g),
                                     ends, config=gemm.GemmConfig(16, 32, 16, 4, 1, tma=True))


def test_contiguous_gemm_all_experts_empty_writes_nothing():
    check_contiguous([0, 0, 0], n=32, k=128, use_fp8=False, alignment=1, seed=5, config=SMALL)


@pytest.mark.parametrize("tma", [False, True], ids=TMA_IDS.get)
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("swap_ab", [False, True], ids=["mk", "swap"])
def test_masked_gemm_reads_and_writes_only_valid_rows(use_fp8, swap_ab, tma):
    cfg = gemm.GemmConfig(16, 32, 128 if use_fp8 else 32, 4, 1, swap_ab=swap_ab, tma=tma)
    # 0 tokens, 1 token, a count spanning 3 m tiles, a full expert, a count above M (clamped)
    check_masked([0, 1, 37, 48, 60], m=48, n=96, k=256, use_fp8=use_fp8, seed=6, config=cfg)


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_masked_gemm_default_config(use_fp8):
    check_masked([3, 0, 17], m=24, n=64, k=256, use_fp8=use_fp8, seed=7, expected_m=8)


def test_masked_gemm_garbage_past_count_is_not_read():
    # NaN rows past the count must not leak into the valid rows (they would if they were read
    # into the MMA: NaN * 0 is NaN).
    g = torch.Generator().manual_seed(8)
    e, m, n, k = 2, 32, 32, 64
    a = make_act(e * m, k, False, g).view(e, m, k).clone()
    count = torch.tensor([5, 20], dtype=torch.int32, device=DEV)
    a[0, 5:] = float("nan")
    a[1, 20:] = float("nan")
    b = make_weight(e, n, k, False, g)
    out = gemm.grouped_gemm_masked(a, b, count, config=SMALL)
    assert torch.isfinite(out[0, :5]).all() and torch.isfinite(out[1, :20]).all()
    assert_bf16_close(out[1, :20], a[1, :20].double() @ b[1].double().T)


def test_gemm_rejects_bad_arguments_with_clear_errors():
    e, n, k = 2, 32, 128
    a = torch.zeros(8, k, dtype=torch.bfloat16, device=DEV)
    b = torch.zeros(e, n, k, dtype=torch.bfloat16, device=DEV)
    ends = torch.tensor([4, 8], dtype=torch.int32, device=DEV)
    with pytest.raises(InputError, match="a must be"):
        gemm.grouped_gemm_contiguous(torch.zeros(8, k + 1, dtype=torch.bfloat16, device=DEV), b, ends)
    with pytest.raises(InputError, match="group_end must be an int32"):
        gemm.grouped_gemm_contiguous(a, b, ends.long())
    with pytest.raises(InputError, match="both be bf16 or both fp8"):
        gemm.grouped_gemm_contiguous(fp8.per_token_cast_to_fp8(a), b, ends)
    with pytest.raises(InputError, match="b scales must be"):
        gemm.grouped_gemm_contiguous(fp8.per_token_cast_to_fp8(a),
                                     (b.to(torch.float8_e4m3fn), torch.ones(e, 1, 2, device=DEV)), ends)
    with pytest.raises(InputError, match="contiguous along its last"):
        gemm.grouped_gemm_contiguous(torch.zeros(k, 8, dtype=torch.bfloat16, device=DEV).T, b, ends)
    with pytest.raises(InputError, match="bfloat16"):
        gemm.grouped_gemm_contiguous(a.float(), b, ends)
    with pytest.raises(InputError, match="count must be an int32 tensor of shape"):
        gemm.grouped_gemm_masked(a.view(2, 4, k), b, torch.zeros(3, dtype=torch.int32, device=DEV))
    with pytest.raises(InputError, match="out must be"):
        gemm.grouped_gemm_masked(a.view(2, 4, k), b, torch.zeros(2, dtype=torch.int32, device=DEV),
                                 out=torch.empty(2, 4, n + 1, dtype=torch.bfloat16, device=DEV))


def test_block_size_heuristic_follows_tokens_per_expert():
    small = gemm.contiguous_config(64 * 32, 4096, 7168, 64, fp8=False)
    large = gemm.contiguous_config(64 * 512, 4096, 7168, 64, fp8=True, warp_specialized=False)
    mid = gemm.contiguous_config(64 * 128, 4096, 7168, 64, fp8=True, warp_specialized=False)
    assert small.block_m == 64 and large.block_m == 256 and large.block_k == 128
    assert (mid.block_m, mid.block_n) == (128, 256)
    for cfg in (small, large, mid):  # 3 or 4 stages of A + B tiles fit 227 KB of shared memory
        elem = 1 if cfg.block_k == 128 else 2
        assert cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * elem <= 200 * 1024
    dec = gemm.masked_config(8, 4096, 7168, fp8=True)
    assert dec.block_m == 16 and dec.swap_ab and dec.block_k == 128
    assert gemm.masked_config(None, 4096, 7168, fp8=False).block_m == 64
    # FP8 masked: swap-AB up to 32 tokens, a 64-row token tile without swap at 64
    for m in (1, 16, 32):
        c = gemm.masked_config(m, 4096, 7168, fp8=True)
        assert c.swap_ab and c.num_stages == 4 and c.block_m == max(16, m)
    c64 = gemm.masked_config(64, 4096, 7168, fp8=True)
    assert c64.block_m == 64 and not c64.swap_ab
    # The warp-specialized FP8 kernel where it runs (Hopper), the Triton kernel elsewhere.
    auto = gemm.contiguous_config(64 * 512, 4096, 7168, 64, fp8=True)
    assert auto.warp_specialized == (gemm.ws_available() is None)
    assert not gemm.contiguous_config(64 * 512, 4096, 7168, 64, fp8=False).warp_specialized
    assert not gemm.contiguous_config(64 * 32, 4096, 7168, 64, fp8=True).warp_specialized


@pytest.mark.skipif(gemm.ws_available() is None, reason="the warp-specialized kernel runs here")
def test_warp_specialized_config_says_why_it_cannot_run():
    ends, rows, m = counts_to_groups([3, 5], 1)
    g = torch.Generator().manual_seed(7)
    a, b = make_act(m, 128, True, g), make_weight(2, 256, 128, True, g)
    with pytest.raises(InputError, match="warp_specialized cannot run here"):
        gemm.grouped_gemm_contiguous(a, b, ends, config=gemm.WS_FP8_CONFIG)
    with pytest.raises(InputError, match="fp8 operands only"):
        gemm.grouped_gemm_contiguous(make_act(m, 128, False, g), make_weight(2, 256, 128, False, g),
                                     ends, config=gemm.WS_FP8_CONFIG)
    with pytest.raises(InputError, match="needs blocks"):
        gemm.grouped_gemm_contiguous(a, b, ends, config=dataclasses.replace(
            gemm.WS_FP8_CONFIG, block_m=256, block_n=128))


# ----------------------------------------------------------------------------- GPU, real shapes
H, I = 7168, 2048


#: The local expert step of the tiny transformers models (tests/hf_cases.py: hidden 64, expert
#: intermediate 32, 4 local experts, top-2), as ep_comm.integrations.transformers.fast_rows runs
#: it with the default configurations: grouping, permutation, the gate-up GEMM [P, 64] x [64, 64]
#: and the down GEMM [P, 32] x [64, 32], each checked against torch. Run in a child process: the
#: transformers GPU test (2 ranks sharing the GPU) sat in a sync after its first forward until its
#: pool gave up (2026-12-07) while every ep_comm kernel passed its hidden-64 cases, so one of these
#: may never finish; a child with a timeout turns that into a failure that says so.
TINY_STEP = """
import sys, torch
from ep_comm import moe
from ep_comm.moe import gemm
torch.manual_seed(0)
dev = torch.device("cuda")
for rows in (7, 1, 0, 40):
    idx = torch.randint(-1, 4, (rows, 2), device=dev)
    lay = moe.group_by_expert(idx, 4, num_rows=int((idx >= 0).sum()))
    x = torch.randn(rows, 64, device=dev).to(torch.bfloat16)
    xp = moe.permute(x, lay)
    for n, k in ((64, 64), (64, 32)):
        a = xp if k == 64 else xp[:, :32].contiguous()
        w = (torch.randn(4, n, k, device=dev) / 8).to(torch.bfloat16)
        out = gemm.grouped_gemm_contiguous(a, w, lay.group_end, group_rows=lay.group_rows)
        ref = gemm.grouped_gemm_contiguous_torch(a, w, lay.group_end, group_rows=lay.group_rows)
        torch.cuda.synchronize()
        valid = torch.zeros(a.shape[0], dtype=torch.bool, device=dev)
        start = 0
        for end, r in zip(lay.group_end.tolist(), lay.group_rows.tolist()):
            valid[start:start + min(r, end - start)] = True
            start = end
        if valid.any():
            err = (out[valid].float() - ref[valid].float()).abs().max().item()
            assert err <= 2.0 ** -6 * max(1.0, ref[valid].float().abs().max().item()), err
        print(f"rows {rows} n {n} k {k}: {int(valid.sum())} valid rows match", flush=True)
print("ok")
"""


@pytest.mark.gpu
@gpu_only
def test_gpu_tiny_model_expert_step_finishes_and_matches_torch():
    import subprocess
    import sys
    try:
        done = subprocess.run([sys.executable, "-c", TINY_STEP], capture_output=True, text=True,
                              timeout=150)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the tiny model's expert step did not finish in 150 s; it printed:\n{out}")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"rc {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("tma", [False, True], ids=TMA_IDS.get)
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("n,k", [(2 * I, H), (H, I)], ids=["gate_up", "down"])
def test_gpu_contiguous_gemm_deepseek_shapes(n, k, use_fp8, tma):
    counts = [0, 1, 127, 128, 129, 517, 1000, 0, 64, 300, 2, 255, 256, 0, 33, 700]
    m = sum(counts)
    # The Triton kernel's configuration (the warp-specialized one has its own tests below).
    cfg = dataclasses.replace(gemm.contiguous_config(m, n, k, len(counts), use_fp8,
                                                     warp_specialized=False), tma=tma)
    check_contiguous(counts, n=n, k=k, use_fp8=use_fp8, alignment=128, seed=100, config=cfg)
    check_contiguous(counts, n=n, k=k, use_fp8=use_fp8, alignment=1, seed=101, config=cfg)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("n,k", [(2 * I, H), (H, I)], ids=["gate_up", "down"])
@pytest.mark.parametrize("expected_m,tma", [(None, False), (8, True), (128, False)],
                         ids=["None-pointers", "8-tma", "128-pointers"])
def test_gpu_masked_gemm_deepseek_shapes(n, k, use_fp8, expected_m, tma):
    """Every shape x dtype x expected_m (the config heuristic's three regimes), TMA and pointer
    loads alternating over expected_m: each load path meets every shape and dtype without the
    full product (the two paths share the tile loop; their differences are the loads)."""
    counts = [0, 1, 7, 16, 17, 64, 65, 200, 256, 3, 0, 40]
    cfg = dataclasses.replace(gemm.masked_config(expected_m, n, k, use_fp8), tma=tma)
    check_masked(counts, m=256, n=n, k=k, use_fp8=use_fp8, seed=102, config=cfg)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("cfg", [gemm.GemmConfig(128, 256, 128, 8, 3), gemm.GemmConfig(128, 128, 128, 8, 4),
                                 gemm.GemmConfig(64, 256, 128, 4, 4), gemm.GemmConfig(64, 128, 128, 4, 4),
                                 gemm.GemmConfig(128, 256, 128, 8, 4), gemm.GemmConfig(256, 128, 128, 8, 4),
                                 gemm.GemmConfig(256, 128, 128, 16, 4), gemm.GemmConfig(128, 128, 128, 4, 4)],
                         ids=lambda c: f"{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages}")
@pytest.mark.parametrize("tma", [False, True], ids=TMA_IDS.get)
def test_gpu_contiguous_fp8_every_swept_config_is_right(cfg, tma):
    # bench/gemm.py times these configurations: each must also compute the right thing.
    counts = [0, 1, 127, 129, 517, 0, 64, 300]
    check_contiguous(counts, n=2 * I, k=H, use_fp8=True, alignment=1, seed=103,
                     config=dataclasses.replace(cfg, tma=tma))


ws_only = pytest.mark.skipif(gemm.ws_available() is not None,
                             reason=f"warp-specialized FP8 GEMM: {gemm.ws_available()}")


@pytest.mark.gpu
@gpu_only
@ws_only
@pytest.mark.parametrize("n,k,stages", [(2 * I, H, 2), (2 * I, H, 4), (H, I, 3), (300, 1024, 2),
                                          (300, 1024, 4)],
                         ids=["gate_up-2", "gate_up-4", "down-3", "n300-2", "n300-4"])
def test_gpu_contiguous_fp8_warp_specialized_matches_float64(n, k, stages):
    # Ragged groups (empty, 1 row, one under / over a 128-row tile, several tiles), with and
    # without alignment padding and valid-row counts; n=300: the second 128-column half of the
    # last tile lies partly past N (its weight-scale block clamped, its columns not stored).
    cfg = dataclasses.replace(gemm.WS_FP8_CONFIG, num_stages=stages)
    counts = [0, 1, 127, 128, 129, 517, 1000, 0, 64, 300, 2, 255, 256, 0, 33, 700]
    check_contiguous(counts, n=n, k=k, use_fp8=True, alignment=128, seed=200 + stages, config=cfg)
    check_contiguous(counts, n=n, k=k, use_fp8=True, alignment=1, seed=210 + stages, config=cfg,
                     pass_rows=False)


@pytest.mark.gpu
@gpu_only
@ws_only
def test_gpu_contiguous_fp8_warp_specialized_many_experts_and_one_row():
    # 256 experts (the whole tile table in one [256] vector per role), most of them empty or
    # tiny; then a single row in a single expert.
    g = torch.Generator().manual_seed(220)
    counts = torch.randint(0, 6, (256,), generator=g).tolist()
    counts[17], counts[200] = 300, 129
    check_contiguous(counts, n=512, k=256, use_fp8=True, alignment=1, seed=221,
                     config=gemm.WS_FP8_CONFIG)
    check_contiguous([1], n=256, k=128, use_fp8=True, alignment=1, seed=222,
                     config=gemm.WS_FP8_CONFIG)


@pytest.mark.gpu
@gpu_only
@ws_only
def test_gpu_default_fp8_config_is_warp_specialized_and_repeatable():
    # The heuristic picks the Gluon kernel on Hopper; two runs give the same bits (no race in the
    # ring: a slot overwritten before both consumer warpgroups released it would show).
    g = generator(230)
    counts = [512] * 8
    ends, rows, m = counts_to_groups(counts, 1)
    a, b = make_act(m, H, True, g), make_weight(8, 2 * I, H, True, g)
    assert gemm.contiguous_config(m, 2 * I, H, 8, True).warp_specialized
    outs = [gemm.grouped_gemm_contiguous(a, b, ends) for _ in range(3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    other = gemm.grouped_gemm_contiguous(a, b, ends, config=gemm.contiguous_config(
        m, 2 * I, H, 8, True, warp_specialized=False)).double()
    # Each is within half a bf16 ulp (plus summation error) of the exact product, so the two
    # differ by at most one ulp: 2**-7 relative.
    err = (outs[0].double() - other).abs()
    assert (err <= 2.0 ** -7 * other.abs() + 2.0 ** -11 * other.abs().max()).all(), \
        f"warp-specialized vs Triton kernel: worst {err.max().item():.4g}"
