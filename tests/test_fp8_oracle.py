"""ep_comm's FP8 cast, its ue8m0 packing and the MoE layer's quantisers against the independent
oracle of tests/oracle.py (written from the e4m3fn / ue8m0 definitions; it never imports
ep_comm). First the oracle is checked against the format itself (all 256 codes, ties, carries),
then ep_comm against the oracle, bit for bit.

The Triton quantiser runs in the Triton interpreter without CUDA (TRITON_INTERPRET=1, set
before ep_comm is imported), on the GPU under ``-m gpu``.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import oracle  # noqa: E402

GPU = torch.cuda.is_available()


def rows_of_every_size(t: int, h: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """[t, h]: rows from 1e-9 to 1e6 in size, an all-zero block (the 1e-4 amax floor), a row
    whose amax is exactly 448 (scale 1), tiny subnormal-producing values beside a large one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * torch.logspace(-9, 6, t).unsqueeze(1)
    x[0, :128] = 0
    if t > 1:
        x[1] = torch.linspace(-448, 448, h)
    if t > 2:
        x[2, :128] = 1e-3
        x[2, 7] = 300.0  # other channels of the block become e4m3 subnormals
    return x.to(dtype)


# ----------------------------------------------------------------- the oracle vs the format
def test_oracle_encodes_every_finite_e4m3_value_to_its_own_code():
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    vals = oracle.e4m3_value(codes)
    finite = ~torch.isnan(vals)
    assert int(finite.sum()) == 254  # 0x7F and 0xFF are the NaNs
    assert float(vals[finite].abs().max()) == 448.0
    assert float(vals[1]) == 2.0 ** -9 and float(vals[8]) == 2.0 ** -6
    back = oracle.e4m3_bits(vals[finite].float())
    # +0 and -0 are distinct codes and stay distinct
    assert torch.equal(back, codes[finite])


def test_oracle_rounds_ties_to_even_and_carries_into_the_exponent():
    cases = {1.0625: 0x38, 1.1875: 0x3A, 1.9999: 0x40, 3.99: 0x48, 2.0 ** -10: 0x00,
             3 * 2.0 ** -10: 0x02, -1.96875: 0xC0, 447.9: 0x7E, 464.0 - 1e-3: 0x7E,
             0.0107421875: 0x06}  # 5.5 subnormal steps: tie to 6
    got = oracle.e4m3_bits(torch.tensor(list(cases), dtype=torch.float32))
    assert got.tolist() == list(cases.values())
    with pytest.raises(ValueError):
        oracle.e4m3_bits(torch.tensor([465.0]))  # 464 is a tie and rounds to even: 448


def test_oracle_agrees_with_torch_float8_on_random_values():
    # A second opinion on the encoder (torch's cast is not used by the oracle itself).
    g = torch.Generator().manual_seed(3)
    v = (torch.randn(20000, generator=g) * torch.logspace(-12, 2.6, 20000)).clamp(-448, 448)
    assert torch.equal(oracle.e4m3_bits(v), v.to(torch.float8_e4m3fn).view(torch.uint8))


def test_oracle_scales_follow_the_definition():
    x = torch.zeros(2, 256)
    x[0, :128] = 0.5
    x[0, 128:] = 3.0
    x[1, 5] = -7.0  # the other block is all zero: amax floor 1e-4
    s = oracle.fp8_scales(x)
    want = torch.tensor([[0.5, 3.0], [7.0, 1e-4]], dtype=torch.float32) / torch.tensor(448.0)
    assert torch.equal(s, want)
    p = oracle.fp8_scales(x, round_scale=True)
    assert p.tolist() == [[2.0 ** -9, 2.0 ** -7], [2.0 ** -6, 2.0 ** -22]]
    packed = oracle.ue8m0_pack(torch.tensor([[2.0 ** -9, 2.0 ** -7, 1.0, 2.0]]))
    assert packed.tolist() == [[118 | (120 << 8) | (127 << 16) | (128 << 24) - 2 ** 32]]
    assert oracle.ue8m0_unpack(packed).tolist() == [[2.0 ** -9, 2.0 ** -7, 1.0, 2.0]]
    big = oracle.ue8m0_pack(torch.full((1, 4), 2.0 ** 10))  # byte 3 = 137: negative int32
    assert int(big) < 0 and oracle.ue8m0_unpack(big).tolist() == [[2.0 ** 10] * 4]


# ------------------------------------------------------------- ep_comm vs the oracle
@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (False, True)],
                         ids=["amax_scale", "pow2_scale", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_core_cast_is_bit_identical_to_the_oracle(round_scale, use_ue8m0, dtype):
    from ep_comm.core import fp8
    x = rows_of_every_size(40, 1024, seed=5, dtype=dtype)
    q, s = fp8.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    q_want, s_want = oracle.fp8_quantize(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == s_want.dtype and s.shape == s_want.shape
    assert torch.equal(oracle.fp8_codes(q), q_want), "fp8 payload differs from the oracle"
    assert torch.equal(s, s_want), "fp8 scales differ from the oracle"
    assert torch.equal(fp8.dequantize(q, s).double(),
                       oracle.fp8_dequantize(q_want, s_want).float().double())


def test_core_ue8m0_pack_and_unpack_match_the_oracle_byte_order():
    from ep_comm.core import fp8
    g = torch.Generator().manual_seed(9)
    scales = torch.ldexp(torch.ones(6, 16), torch.randint(-40, 20, (6, 16), generator=g))
    packed = fp8.pack_ue8m0(scales)
    assert torch.equal(packed, oracle.ue8m0_pack(scales))
    assert torch.equal(fp8.unpack_ue8m0(packed), scales)


@pytest.mark.parametrize("round_scale", [False, True], ids=["amax_scale", "pow2_scale"])
def test_moe_triton_quantiser_is_bit_identical_to_the_oracle(round_scale):
    from ep_comm.moe import gemm
    dev = torch.device("cuda" if GPU else "cpu")
    x = rows_of_every_size(24, 384, seed=7)
    q, s = gemm.quantize_fp8(x.to(dev), round_scale=round_scale)
    q_want, s_want = oracle.fp8_quantize(x, round_scale=round_scale)
    assert torch.equal(oracle.fp8_codes(q.cpu()), q_want)
    assert torch.equal(s.cpu(), s_want)


def test_moe_weight_quantiser_uses_amax_over_448_per_128_block():
    from ep_comm.moe import layer
    g = torch.Generator().manual_seed(11)
    w = torch.randn(2, 256, 384, generator=g) * torch.logspace(-3, 2, 2).view(2, 1, 1)
    q, s = layer.quantize_weight_fp8(w.to(torch.bfloat16))
    wf = w.to(torch.bfloat16).float()
    for e in range(2):
        for bi in range(256 // 128):
            for bj in range(384 // 128):
                blk = wf[e, bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
                amax = torch.maximum(blk.abs().amax(), torch.tensor(oracle.AMAX_FLOOR))
                sc = amax / torch.tensor(oracle.E4M3_MAX)
                assert float(s[e, bi, bj]) == float(sc), (e, bi, bj)
                codes = oracle.e4m3_bits(blk / sc)
                got = oracle.fp8_codes(q[e, bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
                                       .contiguous())
                assert torch.equal(got, codes), (e, bi, bj)
