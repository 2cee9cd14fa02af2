"""Normal-mode kernels (NVLink) against the reference backend on 1, 2, 3, 4 and 8 ranks (issue #8,
#26). Ranks may share GPUs (EP_COMM_TEST_RANKS_PER_GPU, see conftest.py): on one H200 with 8
ranks per GPU every rank count runs; 3, 4 and 8 ranks get a short list of small cases.

Every test runs many cases inside one task call (kernel compile and rank start-up are paid
once). Seeds are fresh each run and printed; replay a failure with EP_COMM_TEST_SEED=<base>.
The test logic is proven on CPU by test_gpu_cases_on_cpu.py (the same tasks, reference vs
reference). EP_COMM_TEST_BACKEND=reference runs this file on the reference over NCCL, which
checks the logic on GPUs too (the CUDA-graph test then skips: the reference syncs the host).

Run on the GPU machine: python -m pytest -q -m gpu tests/test_intranode_gpu.py
"""

import pytest

import gpu_common as common
import gpu_cases_lifecycle as life
import gpu_cases_normal as normal
from gpu_cases_normal import NCase
from multiproc import run_ranks

pytestmark = pytest.mark.gpu

BACKEND, WORLDS, FULL = common.BACKEND, common.WORLDS, common.FULL_WORLDS
_seed = common.case_seed


@pytest.mark.parametrize("world", FULL)
def test_random_cases_bit_exact_dispatch_and_bf16_combine(gpu_ranks, world):
    """18 fresh cases on one Buffer: hidden 2048/4096/7168/1000, top-k 1..9, -1 entries, fp8
    tuples, expert_alignment 1/4/128, num_worst_tokens, bias, special routings; layout, recv_x,
    top-k ids and weights, counts, handle fields bit-exact; combine within bf16 rounding."""
    cases = normal.normal_cases(_seed(1000 * world), world, count=18)
    assert gpu_ranks(world).run(normal.task_normal_sweep, BACKEND, cases) == [18] * world


@pytest.mark.parametrize("world", FULL)
def test_repeated_shapes_run_through_the_cpp_host_path(gpu_ranks, world):
    """A training / prefill loop: one shape per Buffer, 4 rounds of fresh data and routing;
    rounds 2-4 launch the dispatch, the cached dispatch and the combine (with top-k weights,
    with and without a bias; its received rows change with the routing of a dispatch from a
    layout) from the C++ host path, exact against the reference: fp8 with num_worst_tokens
    at the bench's shape (128 tokens x 7168, top-8 of 256), bf16 from a layout with ragged
    ranks and expert_alignment 4, bf16 from a layout with an empty rank and a bias, fp8 with
    num_worst_tokens, -1 entries and alignment 128."""
    base = _seed(2500 + world)
    cases = [NCase(seed=base, num_tokens=128, ragged=0, hidden=7168, num_experts=256,
                   num_topk=8, fp8=True, worst=-1),
             NCase(seed=base + 1, num_tokens=40, ragged=7, hidden=2048, num_experts=32,
                   num_topk=4, alignment=4),
             NCase(seed=base + 2, num_tokens=24, hidden=1024, num_experts=16, num_topk=3,
                   routing="empty_last", bias=1),
             NCase(seed=base + 3, num_tokens=33, ragged=3, hidden=4096, num_experts=64,
                   num_topk=6, fp8=True, alignment=128, worst=-1, drop=0.3)]
    made = gpu_ranks(world).run(normal.task_normal_through_cpp, BACKEND, cases)
    if BACKEND == "kernels":  # the reference backend has no C++ host path
        for rank_made in made:
            # rounds 2-4: the dispatch and the cached dispatch of each, and the combine
            assert rank_made == [[6, 3]] * len(cases), \
                f"C++ [dispatches, combines] per case: {rank_made}"


@pytest.mark.parametrize("world", [w for w in WORLDS if w not in FULL])
def test_small_cases_on_many_ranks(gpu_ranks, world):
    """3, 4 and 8 ranks: random cases, empty / skewed / dropped routings, duplicate ids, top-k
    at NORMAL_MAX_TOPK, fp8, num_worst_tokens, at small shapes (ranks share one GPU)."""
    cases = normal.small_cases(_seed(1500 + world), world)
    assert gpu_ranks(world).run(normal.task_normal_sweep, BACKEND, cases) == [len(cases)] * world


@pytest.mark.parametrize("world", FULL)
def test_edge_routings(gpu_ranks, world):
    """Zero tokens on a rank, a single token, every token to rank 0, every entry -1, top-9 of
    256 experts, 4096 tokens (layout at scale), in bf16 and fp8 (see edge_routing_cases);
    duplicate ids in rows, -1 in every slot, rows routed nowhere, top-k at NORMAL_MAX_TOPK."""
    base = _seed(2000 + world)
    cases = normal.edge_routing_cases(base)
    cases.append(NCase(seed=base + 21, hidden=2048, num_experts=256, num_topk=8,
                       num_tokens=4096, ragged=0, drop=0.0, fp8=True))
    gpu_ranks(world).run(normal.task_normal_sweep, BACKEND, cases)


@pytest.mark.parametrize("world", FULL)
@pytest.mark.parametrize("mode", ["previous_event", "async"])
def test_async_finish_previous_event_and_comm_stream_allocation(gpu_ranks, world, mode):
    """Inputs land on the compute stream ~10 ms late (poison before): with previous_event the
    kernels must wait for that event, without it for the compute stream; results read after
    the returned event (``with event:``) must match the reference."""
    base = _seed(3000 + world)
    cases = [NCase(seed=base, hidden=7168, num_topk=8, num_experts=64, num_tokens=256),
             NCase(seed=base + 1, hidden=4096, fp8=True, worst=-1, bias=1, num_tokens=128),
             NCase(seed=base + 2, hidden=2048, num_topk=3, alignment=4, routing="to_rank0")]
    gpu_ranks(world).run(normal.task_normal_sweep, BACKEND, cases, None, mode)


@pytest.mark.parametrize("world", FULL)
@pytest.mark.parametrize("num_sms", [2, 48])
def test_other_sm_budgets(gpu_ranks, world, num_sms):
    """Buffer.set_num_sms: one channel and more channels than the default; results unchanged."""
    base = _seed(3500 + 10 * world + num_sms)
    cases = [NCase(seed=base, hidden=7168, num_topk=8, num_experts=64, num_tokens=300),
             NCase(seed=base + 1, hidden=2048, fp8=True, worst=-1, num_tokens=64, bias=2)]
    gpu_ranks(world).run(normal.task_normal_sweep, BACKEND, cases, None, "sync", num_sms)


@pytest.mark.parametrize("world", FULL)
def test_two_dispatches_then_two_combines(gpu_ranks, world):
    """Micro-batch overlap order (dispatch A, dispatch B, combine A, combine B), synchronous,
    each combine bit for bit against the exact sum rounded once, as the reference Buffer's
    (gpu_cases_normal.task_normal_two_batches)."""
    case = NCase(seed=_seed(12600 + world), hidden=2048, num_topk=8, num_experts=64,
                 num_tokens=96)
    assert gpu_ranks(world).run(normal.task_normal_two_batches, BACKEND, case) == [3] * world


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_with_different_buffer_sizes_agree_on_the_rings(gpu_ranks, world):
    """num_nvl_bytes differing between ranks: the rings' per-source stride is the smallest
    buffer's on every rank (gpu_cases_normal.task_normal_uneven_buffers)."""
    base = _seed(12700 + world)
    e = 8 * world  # divisible by the ranks (2 and 3)
    cases = [NCase(seed=base, hidden=2048, num_topk=4, num_experts=4 * e, num_tokens=80),
             NCase(seed=base + 1, hidden=7168, fp8=True, num_topk=8, num_experts=8 * e,
                   num_tokens=40, worst=-1)]
    assert gpu_ranks(world).run(normal.task_normal_uneven_buffers, BACKEND, cases) == [2] * world


def test_back_to_back_rounds_with_mostly_empty_rings_finish_and_match(gpu_ranks):
    """200 rounds of layout, dispatch and combine queued without a host sync, 24 channels for a
    handful of tokens (most rings empty), 2 ranks: the NVLink handshake race behind the
    transformers GPU stall of 2026-12-07 (gpu_cases_normal.task_normal_back_to_back)."""
    case = NCase(seed=_seed(3900), hidden=64, num_topk=2, num_experts=8, num_tokens=6,
                 ragged=3)
    assert gpu_ranks(2).run(normal.task_normal_back_to_back, BACKEND, case) == [200, 200]


def test_async_and_synchronous_calls_interleaved_across_streams_stay_ordered(gpu_ranks):
    """2 ranks, one Buffer, two micro-batches: async dispatch of B (comm stream), then the
    synchronous combine of an earlier dispatch A before B's event is waited on, then the wait
    and the combine of B (async, with a previous_event that predates a delayed synchronous
    cached dispatch of A): the Buffer keeps its kernels in call order across the two streams
    (gpu_cases_normal.task_normal_interleaved_streams); every result exact against the
    reference, the GPU work bounded."""
    case = NCase(seed=_seed(3950), hidden=1024, num_topk=4, num_experts=16, num_tokens=96,
                 ragged=5)
    assert gpu_ranks(2).run(normal.task_normal_interleaved_streams, BACKEND, case) == [3, 3]


@pytest.mark.parametrize("world", FULL)
@pytest.mark.parametrize("fp8,hidden", [(False, 7168), (True, 4096)])
def test_cuda_graph_with_num_worst_tokens_replays_changing_data(gpu_ranks, world, fp8, hidden):
    if BACKEND == "reference":
        pytest.skip("the reference backend synchronises with the host: not capturable")
    case = NCase(seed=_seed(4000 + world), hidden=hidden, fp8=fp8, num_tokens=128, num_topk=8,
                 num_experts=64)
    gpu_ranks(world).run(normal.task_normal_graph, BACKEND, case, 4)


@pytest.mark.parametrize("world", FULL)
def test_backward_step_through_autograd(gpu_ranks, world):
    for i, hidden in enumerate((2048, 7168)):
        case = NCase(seed=_seed(5000 + 10 * world + i), hidden=hidden, num_topk=6,
                     num_experts=64, num_tokens=200)
        gpu_ranks(world).run(normal.task_normal_backward, BACKEND, case)


@pytest.mark.parametrize("world", FULL)
def test_bad_inputs_raise_before_any_kernel(gpu_ranks, world):
    gpu_ranks(world).run(life.task_normal_bad_inputs, BACKEND)


@pytest.mark.gpu_alone  # reads the device's free memory: nothing else may allocate meanwhile
@pytest.mark.parametrize("world", FULL)
def test_create_and_destroy_100_buffers_keeps_free_memory(gpu_ranks, world):
    got = gpu_ranks(world).run(life.task_normal_create_destroy, BACKEND, 100, 7168, 64)
    print(f"create/destroy x100: {got}")


def test_stuck_peer_raises_timeout_naming_rank_and_phase(gpu_ranks):
    """Rank 1 skips a dispatch: rank 0 gets CommTimeoutError (EP_COMM_TIMEOUT_S=3) naming
    rank 0 and the dispatch phase within a few seconds, a further call raises too, and its
    Buffer is destroyed. On a fresh pool of 2 GPU ranks (multiproc's convention for tests that
    break their group), so it cannot hang the shared pool; a hang is reported after 120 s."""
    gpu_ranks(2)  # skips visibly with fewer than 2 GPUs
    got = run_ranks(life.task_normal_stuck_peer, 2, BACKEND, 1, "3", use_gpu=True, timeout=120)
    print(f"timeout after {got[0]:.2f} s")
    assert got[1] == "skipped"
