"""Low-latency kernels (NVSHMEM) against the oracle and the independent FP8 oracle on 1, 2, 3, 4
and 8 ranks (issue #9, #26; ranks may share GPUs, see conftest.py: 3, 4 and 8 ranks get a short
list of small cases).

Cases are batched per Buffer shape inside one task call; seeds are fresh and printed (replay
with EP_COMM_TEST_SEED=<base>). The checks (tests/low_latency_cases.py, wrapped by
tests/gpu_cases_*.py) are proven on CPU by test_gpu_cases_on_cpu.py. EP_COMM_TEST_BACKEND=reference
runs this file on the reference over NCCL (graph test skipped).

Run on the GPU machine: python -m pytest -q -m gpu tests/test_low_latency_gpu.py
"""

import pytest

import gpu_common as common
import gpu_cases_low_latency as llg
import low_latency_cases as llc
from low_latency_cases import LLCase
from multiproc import run_ranks

pytestmark = pytest.mark.gpu

BACKEND, WORLDS, FULL = common.BACKEND, common.WORLDS, common.FULL_WORLDS
_seed = common.case_seed


@pytest.mark.parametrize("world", FULL)
def test_ll_random_cases_over_nvlink(gpu_ranks, world):
    """0..M tokens with different counts per rank, hidden 2048/4096/7168, top-k 1..9, -1
    entries, bf16 and fp8 (plain, round_scale, ue8m0), hook and not, zero_copy and out=, stats;
    hidden 64 too (bf16);
    every valid row, source index, recv_count and range checked; combine within bf16 rounding.
    Includes the decode shape (128 tokens, hidden 7168, top-8 of 256 experts)."""
    base = _seed(1000 * world)
    cases = (llg.ll_cases(base, 10, max_tokens=32, hidden=2048, num_experts=32)
             + llg.ll_cases(base + 100, 8, max_tokens=64, hidden=4096, num_experts=64)
             + llg.ll_cases(base + 200, 8, max_tokens=128, hidden=7168, num_experts=32)
             # hidden 64 (128-byte rows, bf16 only): the tiny transformers models' decode
             + llg.ll_cases(base + 250, 3, max_tokens=8, hidden=64, num_experts=8)
             + [LLCase(seed=base + 300, max_tokens=128, num_tokens=128, ragged=0, hidden=7168,
                       num_experts=256, num_topk=8, fp8=True, hook=True),
                LLCase(seed=base + 301, max_tokens=128, num_tokens=100, ragged=28, hidden=7168,
                       num_experts=256, num_topk=8, zero_copy=True)])
    gpu_ranks(world).run(llg.task_ll_sweep, BACKEND, cases)


@pytest.mark.parametrize("world", FULL)
def test_ll_repeated_shapes_run_through_the_cpp_host_path(gpu_ranks, world):
    """A decode loop: one shape per Buffer, 6 rounds of fresh data; rounds 3-6 are launched
    by the C++ host path (both calls), with exact dispatch and combine against the oracle:
    fp8, bf16 with out= and zero-copy, stats, ue8m0, put-only, an empty rank."""
    base = _seed(1700 + world)
    cases = [LLCase(seed=base, max_tokens=128, num_tokens=128, ragged=0, hidden=7168,
                    num_experts=256, num_topk=8, fp8=True, iterations=6),
             LLCase(seed=base + 1, max_tokens=32, num_tokens=20, ragged=5, hidden=2048,
                    num_experts=32, num_topk=6, use_out=True, zero_copy=True, iterations=6),
             LLCase(seed=base + 2, max_tokens=16, num_tokens=9, hidden=1024, num_experts=16,
                    fp8=True, round_scale=True, ue8m0=True, stats=False, iterations=6),
             LLCase(seed=base + 3, max_tokens=16, num_tokens=16, ragged=0, hidden=1024,
                    num_experts=16, routing="empty_rank1", nvlink=False, iterations=6)]
    made = gpu_ranks(world).run(llg.task_ll_through_cpp, BACKEND, cases)
    if BACKEND == "kernels":  # the reference backend has no C++ host path
        for rank_made in made:
            assert rank_made == [8] * len(cases), f"C++ calls per case: {rank_made}"


@pytest.mark.parametrize("world", [w for w in WORLDS if w not in FULL])
def test_ll_small_cases_on_many_ranks(gpu_ranks, world):
    """3, 4 and 8 ranks: bf16 and fp8 (plain, round_scale, ue8m0), hook, zero_copy, out=,
    stats, duplicates, empty ranks, at small shapes; NVLink and put-only; top-k LL_MAX_TOPK."""
    from ep_comm.core.constants import LL_MAX_TOPK
    base = _seed(1500 + world)
    e = 8 * world
    cases = (llg.ll_cases(base, 6, max_tokens=16, hidden=1024, num_experts=e)
             + llg.ll_cases(base + 50, 4, max_tokens=8, hidden=512, num_experts=e, nvlink=False)
             + [LLCase(seed=base + 90, max_tokens=8, num_tokens=8, hidden=512,
                       num_experts=max(e, -(-LL_MAX_TOPK // world) * world),
                       num_topk=LL_MAX_TOPK, fp8=True,
                       ue8m0=True, round_scale=True)])
    gpu_ranks(world).run(llg.task_ll_sweep, BACKEND, cases)


@pytest.mark.parametrize("world", FULL)
def test_ll_put_only_path_without_nvlink(gpu_ranks, world):
    """allow_nvlink_for_low_latency_mode=False: every byte through NVSHMEM puts."""
    base = _seed(2000 + world)
    cases = (llg.ll_cases(base, 8, max_tokens=64, hidden=7168, num_experts=64, nvlink=False)
             + llg.ll_cases(base + 50, 6, max_tokens=16, hidden=2048, num_experts=32, nvlink=False))
    gpu_ranks(world).run(llg.task_ll_sweep, BACKEND, cases)


@pytest.mark.parametrize("world", FULL)
@pytest.mark.parametrize("variant", ["fp8-out", "bf16-hook-zero-copy"])
def test_ll_cuda_graph_of_dispatch_and_combine_replays_changing_data(gpu_ranks, world, variant):
    if BACKEND == "reference":
        pytest.skip("the reference backend synchronises with the host: not capturable")
    seed = _seed(3000 + world)
    if variant == "fp8-out":
        case = LLCase(seed=seed, max_tokens=64, num_tokens=64, hidden=7168, num_experts=64,
                      num_topk=8, fp8=True, round_scale=True, use_out=True)
    else:
        case = LLCase(seed=seed, max_tokens=32, num_tokens=20, hidden=2048, num_experts=32,
                      num_topk=5, hook=True, zero_copy=True)
    gpu_ranks(world).run(llg.task_ll_graph, BACKEND, case, 4)


@pytest.mark.parametrize("world", FULL)
@pytest.mark.parametrize("hook", [False, True])
def test_ll_two_results_alive(gpu_ranks, world, hook):
    case = LLCase(seed=_seed(4000 + world), max_tokens=32, num_tokens=24, hidden=4096,
                  num_experts=32, num_topk=6, fp8=True, hook=hook, backend=BACKEND)
    gpu_ranks(world).run(llc.task_ll_two_alive, case)


@pytest.mark.parametrize("world", [2, 3])
def test_ll_peer_two_sends_ahead_of_a_late_receive(gpu_ranks, world):
    """Receive hooks: rank 0 (and 2) receive D0 and send D2 into buffer half 0 while rank 1
    idles 1 s before it receives D0. Each send waits for every destination's acknowledgement
    of the previous call on its half (kernels/cuda/low_latency.cu HalfSync), so D2 lands only
    after rank 1 has read D0: all three dispatches and two combines are exact. Without the
    acknowledgement D2 overwrote D0's count words and rows there (a refused call or wrong rows)."""
    case = LLCase(seed=_seed(4500 + world), max_tokens=32, num_tokens=24, hidden=2048,
                  num_experts=16 * world, num_topk=6, fp8=True, backend=BACKEND)
    assert gpu_ranks(world).run(llc.task_ll_peer_two_sends_ahead, case, 1, 1.0) == \
        ["ok"] * world


@pytest.mark.parametrize("world", FULL)
def test_ll_clean_buffer_after_normal_mode(gpu_ranks, world):
    gpu_ranks(world).run(llg.task_ll_clean_after_normal, BACKEND, _seed(5000 + world) % 100000,
                         2048, 32, 32)


@pytest.mark.parametrize("world", FULL)
def test_ll_shapes_that_change_between_calls(gpu_ranks, world):
    """(M, hidden) change from call to call on one Buffer, and two live results of two shapes:
    each half's data lies in that half's fixed area (regions.LowLatencyRegions), so a call
    never lands where the previous call of another shape is still read."""
    case = LLCase(seed=_seed(6500 + world), num_experts=32, num_topk=6, fp8=True,
                  backend=BACKEND)
    shapes = [(128, 100, 4096), (32, 32, 2048), (64, 7, 7168), (128, 1, 2048), (16, 9, 4096)]
    assert gpu_ranks(world).run(llc.task_ll_shape_changes, case, shapes) == ["ok"] * world


def test_ll_masked_rank_that_stops_calling(gpu_ranks):
    """Rank 1 stops calling; rank 0 masks it (low_latency_update_mask_buffer) and its next
    three rounds finish with the oracle's answer for a world without rank 1."""
    case = LLCase(seed=_seed(6000), max_tokens=32, num_tokens=24, hidden=2048, num_experts=32,
                  num_topk=6, fp8=True, backend=BACKEND)
    got = gpu_ranks(2).run(llc.task_ll_masked, case, 1)
    assert got == ["ok", "stopped"], got


def test_ll_skipped_dispatch_times_out_naming_rank_and_phase(gpu_ranks):
    """Rank 1 skips a low-latency dispatch: rank 0 gets CommTimeoutError (EP_COMM_TIMEOUT_S=3)
    naming rank 0 and the low_latency_dispatch phase within a few seconds. On a fresh pool of
    2 GPU ranks (a skipped call may leave the group out of step); a hang is reported after
    120 s."""
    gpu_ranks(2)  # skips visibly with fewer than 2 GPUs
    case = LLCase(seed=_seed(7000), max_tokens=32, hidden=2048, num_experts=32, backend=BACKEND)
    got = run_ranks(common.task_with_env, 2, {"EP_COMM_TIMEOUT_S": "3"}, llc.task_ll_skip_dispatch,
                    case, 1, use_gpu=True, timeout=120)
    assert got[1] == "skipped" and 1.5 < got[0] < 15, got
