"""Contract points of issue #26 on the backend under test (kernels by default; see
gpu_common.BACKEND): num_worst_tokens overflow is a clear error, dispatch without topk_idx,
duplicate ids counted once by the layout kernel, wait-cost statistics of a late peer. The same
tasks pass on the reference backend over gloo (test_normal_reference.py,
test_low_latency_reference.py), which proves their logic on CPU.

Run on the GPU machine: python -m pytest -q -m gpu tests/test_contract_gpu.py
"""
import pytest

import gpu_common as common
from cases import Case, task_dispatch_without_topk, task_layout, task_worst_tokens_overflow
from low_latency_cases import LLCase, task_ll_wait_cost_stats

pytestmark = pytest.mark.gpu

BACKEND = common.BACKEND


@pytest.mark.parametrize("world", [1, 2])
def test_num_worst_tokens_overflow_is_a_clear_error(gpu_ranks, world):
    case = Case(seed=57, num_experts=16, hidden=512, backend=BACKEND)
    assert gpu_ranks(world).run(task_worst_tokens_overflow, case) == ["raised"] * world


def test_num_worst_tokens_overflow_across_nodes(gpu_ranks):
    case = Case(seed=58, num_experts=16, hidden=512, backend=BACKEND, ranks_per_node=2)
    assert gpu_ranks(4).run(task_worst_tokens_overflow, case) == ["raised"] * 4


# one rank in bf16, two ranks in fp8 (with duplicates): the pairs that cover both axes
@pytest.mark.parametrize("world,fp8", [(1, False), (2, True)], ids=["1-bf16", "2-fp8"])
def test_dispatch_without_topk_idx(gpu_ranks, world, fp8):
    case = Case(seed=47 + fp8, hidden=512, fp8=fp8, dups=fp8, backend=BACKEND)
    gpu_ranks(world).run(task_dispatch_without_topk, case)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_layout_kernel_counts_a_duplicate_id_once(gpu_ranks, world):
    from ep_comm.core.constants import NORMAL_MAX_TOPK
    for k in (6, NORMAL_MAX_TOPK):
        gpu_ranks(world).run(task_layout, Case(seed=5 + k, dups=True, num_topk=k,
                                               num_experts=32, backend=BACKEND))


def test_ll_wait_cost_stats_grow_for_a_late_peer(gpu_ranks):
    case = LLCase(seed=17, max_tokens=16, num_tokens=16, ragged=0, hidden=1024, num_experts=8,
                  num_topk=2, drop=0.0, backend=BACKEND)
    got = gpu_ranks(2).run(task_ll_wait_cost_stats, case, 1, 0.3)
    print(f"wait-cost stats (dispatch, combine) per rank: {got}")
