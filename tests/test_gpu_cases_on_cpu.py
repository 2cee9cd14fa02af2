"""The GPU suites' test logic, proven on CPU: the tasks of gpu_cases_*.py run on 2 gloo ranks with
the reference backend as the backend under test (reference vs reference, and both vs the
expectations computed in the tasks). If these pass, a failure of the same task on the GPU
machine with ``backend="kernels"`` points at the kernels, not at the test.

Deliberately corrupted results must be caught (``test_checks_catch_*``): a comparison that
passes everything would prove nothing. CUDA graphs, free-memory and stream-overlap checks need
a GPU; those tests skip here with the reason.
"""
import pytest
import torch

import gpu_cases_elastic as gpu_elastic
import gpu_common as common
import gpu_cases_lifecycle as life
import gpu_cases_low_latency as llg
import gpu_cases_normal as normal
from gpu_cases_normal import NCase
from low_latency_cases import LLCase
from multiproc import run_ranks

BASE = common.fresh_seed()
SMALL_HIDDENS = (256, 512, 1000, 384, 64)


def test_normal_sweep_reference_against_itself_and_expectation(cpu_ranks):
    print(f"base seed {BASE}")
    cases = normal.normal_cases(BASE, 2, count=12, hiddens=SMALL_HIDDENS, max_tokens=40)
    assert cpu_ranks(2).run(normal.task_normal_sweep, "reference", cases) == [12, 12]


def test_normal_sweep_on_one_rank_with_other_sm_budget(cpu_ranks):
    cases = normal.normal_cases(BASE + 1, 1, count=6, hiddens=SMALL_HIDDENS, max_tokens=30)
    cpu_ranks(1).run(normal.task_normal_sweep, "reference", cases, None, "sync", 8)


def test_normal_back_to_back_task_on_the_reference(cpu_ranks):
    """The back-to-back rounds task (the NVLink handshake race's GPU test) on CPU ranks: its
    rounds, its comparison and its return value."""
    case = NCase(seed=3900, hidden=64, num_topk=2, num_experts=8, num_tokens=6, ragged=3)
    assert cpu_ranks(2).run(normal.task_normal_back_to_back, "reference", case, 5) == [5, 5]


def test_normal_interleaved_streams_task_on_the_reference(cpu_ranks):
    """The interleaved-streams task (the stream order's GPU test) on CPU ranks: its calls, its
    comparisons and its return value."""
    case = NCase(seed=3950, hidden=128, num_topk=3, num_experts=8, num_tokens=12, ragged=3)
    assert cpu_ranks(2).run(normal.task_normal_interleaved_streams, "reference", case, 2) == [2, 2]


def test_normal_two_batches_task_on_the_reference(cpu_ranks):
    """Two dispatches then two combines (the internode combine_src halves' GPU test) on CPU ranks."""
    case = NCase(seed=4100, hidden=256, num_topk=4, num_experts=16, num_tokens=20)
    assert cpu_ranks(2).run(normal.task_normal_two_batches, "reference", case, 2) == [2, 2]


def test_normal_two_batches_task_as_two_nodes_of_two(cpu_ranks):
    """The same task in the internode GPU test's setting (4 ranks, EP_COMM_TEST_RANKS_PER_NODE=2):
    the reference rounds once however the ranks are grouped, and the task models it so."""
    case = NCase(seed=4150, hidden=256, num_topk=4, num_experts=16, num_tokens=20)
    got = cpu_ranks(4).run(common.task_with_env, {common.RANKS_PER_NODE_ENV: "2"},
                           normal.task_normal_two_batches, "reference", case, 2)
    assert got == [2] * 4


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_combine_of_partials_one_rounding_is_the_exact_sum_rounded(ranks):
    """combine_of_partials with one group (or groups of one rank: no partial is rounded) is the
    exact float64 sum rounded once: its float32 sums are exact, so it stands for the reference
    and the NVLink kernels in any order of addition."""
    case = NCase(seed=BASE + 4170, hidden=512, num_topk=8, num_experts=64, num_tokens=96)
    for me in range(ranks):
        inputs = {me: normal.n_inputs(case, me, ranks)}
        x, idx, _ = inputs[me]
        exact, _ = normal.expected_combine(case, me, inputs, ranks)
        want = exact.to(torch.bfloat16)
        assert torch.equal(normal.combine_of_partials(case, x, idx, ranks, ranks), want)
        assert torch.equal(normal.combine_of_partials(case, x, idx, ranks, 1), want)


def test_combine_of_partials_reproduces_the_2x2_gpu_failure_of_session_16():
    """The failure of test_two_dispatches_then_two_combines[4r-2x2] on 2026-12-07 (base seed
    610779369; every rank, every combine, about 20% of the elements) was the internode
    kernels' bf16 rounding of each node's partial, compared bit for bit with the reference's
    single rounding: the model with groups of 2 ranks gives the kernels' reported values."""
    case = NCase(seed=610779369 + 12504, hidden=2048, num_topk=8, num_experts=64, num_tokens=96)
    x, idx, _ = normal.n_inputs(case, 2, 4, step=0)  # rank 2, round 0, batch A
    got = normal.combine_of_partials(case, x, idx, 4, 2)
    want = normal.combine_of_partials(case, x, idx, 4, 4)
    assert common.describe_difference(got, want) == (
        "44659 of 225280 elements differ; first at [0, 12]: got -3.375, want -3.359375; "
        "largest |difference| 32")


def test_normal_uneven_buffers_task_on_the_reference(cpu_ranks):
    """The uneven-num_nvl_bytes task (the rings' stride GPU test) on CPU ranks."""
    cases = [NCase(seed=4200, hidden=256, num_topk=4, num_experts=16, num_tokens=20)]
    assert cpu_ranks(2).run(normal.task_normal_uneven_buffers, "reference", cases) == [1, 1]


def test_normal_through_cpp_task_on_the_reference(cpu_ranks):
    # the GPU test's task: rounds of one shape, checked; the reference has no C++ host path
    cases = [NCase(seed=BASE + 40, hidden=256, fp8=True, worst=-1),
             NCase(seed=BASE + 41, hidden=512, num_topk=3, alignment=4, routing="empty_last")]
    assert cpu_ranks(2).run(normal.task_normal_through_cpp, "reference", cases, 2) == [
        [[0, 0], [0, 0]], [[0, 0], [0, 0]]]


@pytest.mark.parametrize("mode", ["previous_event", "async"])
def test_normal_stream_modes(cpu_ranks, mode):
    cases = [NCase(seed=BASE + 7, hidden=256, fp8=True, worst=-1, bias=2),
             NCase(seed=BASE + 8, hidden=512, num_topk=9, alignment=4)]
    cpu_ranks(2).run(normal.task_normal_sweep, "reference", cases, None, mode)


@pytest.mark.parametrize("kind,field", [
    ("recv_x", "dispatch recv_x"), ("topk_weights", "dispatch recv_topk_weights"),
    ("src_idx", "handle.recv_src_idx"), ("counts", "num_recv_tokens_per_expert_list"),
    ("combine", "combined_x")])
def test_checks_catch_corrupted_results(cpu_ranks, kind, field):
    case = NCase(seed=BASE + 3, hidden=256, num_tokens=20, drop=0.0)
    messages = cpu_ranks(2).run(normal.task_normal_sweep, "reference", [case], kind)
    flat = [m for per_rank in messages for m in per_rank]
    assert any(field in m for m in flat), f"corruption {kind!r} not reported: {flat}"
    # The report names the case (with its seed), the rank and the size of the difference.
    hit = next(m for m in flat if field in m)
    assert f"seed={case.seed}" in hit and "rank " in hit and ("want" in hit or "exact" in hit), hit


def test_sum_check_bounds():
    """The combine tolerance: one bf16 rounding passes, two bf16 ulps or a NaN do not."""
    exact = torch.tensor([[1.0, 3.0, -1000.0, 0.0]], dtype=torch.float64)
    mag = exact.abs()
    assert common.describe_sum_error(exact.to(torch.bfloat16), exact, mag) is None
    off = exact.clone()
    off[0, 1] = 3.0 * (1 + 2 * 2 ** -7)
    msg = common.describe_sum_error(off.to(torch.bfloat16), exact, mag)
    assert msg and "[0, 1]" in msg and "tolerance" in msg, msg
    nan = exact.to(torch.bfloat16)
    nan[0, 3] = float("nan")
    assert "NaN" in common.describe_sum_error(nan, exact, mag)


def test_difference_report_is_bit_exact():
    a = torch.tensor([1.0, float("nan"), -0.0])
    assert common.describe_difference(a, a.clone()) is None  # NaN equals itself bit for bit
    b = a.clone()
    b[2] = 0.0  # -0.0 vs 0.0 differ in bits
    msg = common.describe_difference(b, a)
    assert msg.startswith("1 of 3 elements differ; first at [2]"), msg
    assert "shape" in common.describe_difference(a[:2], a)


def test_backward_matches_closed_form(cpu_ranks):
    cpu_ranks(2).run(normal.task_normal_backward, "reference",
                     NCase(seed=BASE + 4, hidden=512, num_topk=6))


def test_bad_inputs_fail_fast_and_leave_buffer_usable(cpu_ranks):
    cpu_ranks(2).run(life.task_normal_bad_inputs, "reference")


def test_stuck_peer_times_out():
    # A fresh pool: the reference leaves the skipped collective posted on the gloo group.
    elapsed = run_ranks(life.task_normal_stuck_peer, 2, "reference", 1, "2", timeout=60)
    assert elapsed[1] == "skipped" and 1.0 <= elapsed[0] <= 12, elapsed


@pytest.mark.parametrize("fp8", [False, True])
def test_graph_task_checks_with_eager_steps(cpu_ranks, fp8):
    """The CUDA-graph task's static-input steps and checks, run eagerly (no capture on CPU)."""
    case = NCase(seed=BASE + 11, hidden=256, fp8=fp8, num_tokens=24, num_topk=5, num_experts=16)
    cpu_ranks(2).run(normal.task_normal_graph, "reference", case, 3, False)


@pytest.mark.parametrize("variant", ["fp8-ue8m0-out", "bf16-hook-zero-copy"])
def test_low_latency_graph_task_checks_with_eager_steps(cpu_ranks, variant):
    if variant == "fp8-ue8m0-out":
        case = LLCase(seed=BASE + 12, max_tokens=8, num_tokens=8, hidden=512, num_experts=8,
                      fp8=True, round_scale=True, ue8m0=True, use_out=True)
    else:
        case = LLCase(seed=BASE + 13, max_tokens=8, num_tokens=5, hidden=256, num_experts=8,
                      hook=True, zero_copy=True)
    cpu_ranks(2).run(llg.task_ll_graph, "reference", case, 3, False)


def test_graph_and_memory_tasks_skip_without_gpu(cpu_ranks):
    got = cpu_ranks(2).run(normal.task_normal_graph, "reference", NCase(seed=BASE))
    got += cpu_ranks(2).run(life.task_normal_create_destroy, "reference")
    assert all(str(g).startswith("skipped") for g in got), got
    pytest.skip("CUDA-graph capture and free-GPU-memory checks need a GPU (ran as no-ops)")


def test_low_latency_sweep(cpu_ranks):
    cases = (llg.ll_cases(BASE, 8, max_tokens=12, hidden=512, num_experts=8)
             + llg.ll_cases(BASE + 50, 4, max_tokens=6, hidden=384, num_experts=16, nvlink=False)
             + llg.ll_cases(BASE + 60, 3, max_tokens=6, hidden=64, num_experts=8))
    cpu_ranks(2).run(llg.task_ll_sweep, "reference", cases)


def test_low_latency_repeated_shape_task_on_the_reference(cpu_ranks):
    """The task behind the C++ host path GPU test: repeated rounds checked against the oracle;
    the reference backend has no C++ path (0 calls)."""
    cases = [LLCase(seed=BASE + 60, max_tokens=8, num_tokens=6, ragged=1, hidden=256,
                    num_experts=8, fp8=True, iterations=3),
             LLCase(seed=BASE + 61, max_tokens=8, num_tokens=5, hidden=256, num_experts=8,
                    use_out=True, zero_copy=True, iterations=3)]
    assert cpu_ranks(2).run(llg.task_ll_through_cpp, "reference", cases) == [[0, 0], [0, 0]]


@pytest.mark.parametrize("kind,fragment", [("row", "rows differ"),
                                            ("src_info", "token order"),
                                            ("recv_count", "recv_count")])
def test_checks_catch_corrupted_low_latency_results(cpu_ranks, kind, fragment):
    case = LLCase(seed=BASE + 21, max_tokens=8, num_tokens=8, hidden=256, num_experts=8,
                  drop=0.0)
    messages = cpu_ranks(2).run(llg.task_ll_sweep, "reference", [case], kind)
    flat = [m for per_rank in messages for m in per_rank]
    assert any(fragment in m and f"seed={case.seed}" in m for m in flat), \
        f"corruption {kind!r} not reported: {flat}"


def test_low_latency_clean_after_normal_mode(cpu_ranks):
    cpu_ranks(2).run(llg.task_ll_clean_after_normal, "reference", BASE % 100000, 512, 8, 12)


def test_low_latency_timeout_through_env_wrapper():
    from low_latency_cases import task_ll_skip_dispatch
    got = run_ranks(common.task_with_env, 2, {"EP_COMM_TIMEOUT_S": "2"}, task_ll_skip_dispatch,
                    LLCase(seed=BASE % 1000), 1, timeout=60)
    assert got[1] == "skipped" and 1.0 <= got[0] <= 12, got


@pytest.mark.parametrize("world,rpn", [(2, 1), (4, 2)], ids=["2x1", "2x2"])
def test_normal_sweep_as_several_nodes(cpu_ranks, world, rpn):
    """The internode GPU tests' setting (EP_COMM_TEST_RANKS_PER_NODE below the rank count):
    the reference on 2 nodes matches itself and the expectation, num_tokens_per_rdma_rank
    included."""
    cases = normal.normal_cases(common.fresh_seed(), world, count=4, max_tokens=48)
    got = cpu_ranks(world).run(common.task_with_env, {common.RANKS_PER_NODE_ENV: str(rpn)},
                               normal.task_normal_sweep, "reference", cases)
    assert got == [4] * world


def test_edge_routing_cases_on_cpu_ranks(cpu_ranks):
    # the edge routings the NVLink and internode GPU tests share, on the reference backend
    cases = normal.edge_routing_cases(BASE + 500)
    assert cpu_ranks(2).run(normal.task_normal_sweep, "reference", cases) == [len(cases)] * 2


@pytest.mark.parametrize("world", [3, 4])
def test_many_rank_small_cases(cpu_ranks, world):
    """The 3/4/8-rank GPU lists (duplicates, top-k at NORMAL_MAX_TOPK included) on the reference:
    the expectations agree with the reference at an odd rank count too."""
    cases = normal.small_cases(BASE + 700 + world, world)
    assert cpu_ranks(world).run(normal.task_normal_sweep, "reference", cases) == [len(cases)] * world


def test_ll_many_rank_small_cases_at_three_ranks(cpu_ranks):
    from ep_comm.core.constants import LL_MAX_TOPK
    cases = (llg.ll_cases(BASE + 800, 4, max_tokens=6, hidden=512, num_experts=24)
             + [LLCase(seed=BASE + 890, max_tokens=4, num_tokens=4, hidden=512,
                       num_experts=LL_MAX_TOPK + 1, num_topk=LL_MAX_TOPK, fp8=True,
                       ue8m0=True, round_scale=True)])
    cpu_ranks(3).run(llg.task_ll_sweep, "reference", cases)


def test_elastic_expand_cases_reference_against_itself(cpu_ranks):
    cases = gpu_elastic.expand_cases(BASE + 40)
    assert cpu_ranks(2).run(gpu_elastic.task_elastic_expand, "reference", cases) == [5, 5]
    assert cpu_ranks(1).run(gpu_elastic.task_elastic_expand, "reference", cases) == [5]


def test_elastic_expand_checks_catch_a_corrupted_row(cpu_ranks):
    cases = gpu_elastic.expand_cases(BASE + 50)[:2]
    messages = cpu_ranks(2).run(gpu_elastic.task_elastic_expand, "reference", cases, True)
    flat = [m for per_rank in messages for m in per_rank]
    assert any("dispatch recv_x" in m for m in flat), flat
