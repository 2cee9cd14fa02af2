"""Normal mode across nodes (kernels/internode.cu) against the reference backend (issue #11).

The ranks of one machine are split into "nodes" with ``Buffer(..., ranks_per_node=k)``: 2 ranks
as 2 nodes x 1 rank, 4 ranks as 2 nodes x 2 (NVLink inside a node, NVSHMEM puts between the
nodes, here over P2P). The tasks are those of the NVLink tests (gpu_cases_*.py), run with
EP_COMM_TEST_RANKS_PER_NODE set, so the coverage is the same: fresh seeds, hidden 2048/4096/
7168/1000, top-k 1..9, -1 entries, empty ranks, one token, every token to one rank, FP8,
alignment, num_worst_tokens, bias, cached dispatch, async / previous-event, CUDA graphs,
autograd, bad inputs, create/destroy, a stuck peer.

Combine tolerance: the node's partial sum is rounded to bf16 before it crosses the network (one
row per token and node, as DeepEP does), so results differ from the reference by that rounding
too; gpu_common's combine check allows it (see ``Failures.close_sum``: the rounding of each
partial is bounded by the sum of |terms| term).

Run on the GPU machine: python -m pytest -q -m gpu tests/test_internode_gpu.py
"""

import pytest

import gpu_common as common
import gpu_cases_internode as inter
import gpu_cases_lifecycle as life
import gpu_cases_normal as normal
from gpu_cases_normal import NCase
from multiproc import run_ranks

pytestmark = pytest.mark.gpu

BACKEND = common.BACKEND
_seed = common.case_seed
#: (ranks, ranks per node): 2 nodes of 1 rank, 2 nodes of 2 ranks, 4 nodes of 2 ranks (8 ranks:
#: on one GPU with EP_COMM_TEST_RANKS_PER_GPU=8; its tests use small shapes).
LAYOUTS = [(2, 1), (4, 2), (8, 2)]
SMALL = {8}
FULL_LAYOUTS = LAYOUTS[:2]
_ids = [f"{r}r-{r // p}x{p}" for r, p in LAYOUTS]


def _env(rpn: int) -> dict:
    return {common.RANKS_PER_NODE_ENV: str(rpn)}


@pytest.mark.parametrize("world,rpn", LAYOUTS, ids=_ids)
def test_random_cases_bit_exact_dispatch_and_bf16_combine(gpu_ranks, world, rpn):
    if world in SMALL:
        cases = normal.small_cases(_seed(11000 + world), world)
    else:
        cases = normal.normal_cases(_seed(11000 + world), world, count=12)
    got = gpu_ranks(world).run(common.task_with_env, _env(rpn), normal.task_normal_sweep, BACKEND,
                               cases)
    assert got == [len(cases)] * world


@pytest.mark.parametrize("world,rpn", FULL_LAYOUTS, ids=_ids[:2])
def test_two_dispatches_then_two_combines(gpu_ranks, world, rpn):
    """Micro-batch overlap order (dispatch A, dispatch B, combine A, combine B): the second
    combine's input goes to the other combine_src half, which a same-node peer is not reading.
    Each combine bit for bit against the model of the kernels' rounding (each node's partial
    rounded to bf16: gpu_cases_normal.combine_of_partials), not the reference's."""
    case = NCase(seed=_seed(12500 + world), hidden=2048, num_topk=8, num_experts=64,
                 num_tokens=96)
    got = gpu_ranks(world).run(common.task_with_env, _env(rpn), normal.task_normal_two_batches,
                               BACKEND, case)
    assert got == [3] * world


@pytest.mark.parametrize("world,rpn", FULL_LAYOUTS, ids=_ids[:2])
def test_edge_routings(gpu_ranks, world, rpn):
    base = _seed(12000 + world)
    cases = normal.edge_routing_cases(base)
    gpu_ranks(world).run(common.task_with_env, _env(rpn), normal.task_normal_sweep, BACKEND, cases)


@pytest.mark.parametrize("world,rpn", FULL_LAYOUTS, ids=_ids[:2])
@pytest.mark.parametrize("mode", ["previous_event", "async"])
def test_async_finish_and_previous_event(gpu_ranks, world, rpn, mode):
    base = _seed(13000 + world)
    cases = [NCase(seed=base, hidden=7168, num_topk=8, num_experts=64, num_tokens=256),
             NCase(seed=base + 1, hidden=4096, fp8=True, worst=-1, bias=1, num_tokens=128)]
    gpu_ranks(world).run(common.task_with_env, _env(rpn), normal.task_normal_sweep, BACKEND, cases,
                         None, mode)


@pytest.mark.parametrize("world,rpn", FULL_LAYOUTS, ids=_ids[:2])
def test_cuda_graph_with_num_worst_tokens(gpu_ranks, world, rpn):
    if BACKEND == "reference":
        pytest.skip("the reference backend synchronises with the host: not capturable")
    case = NCase(seed=_seed(14000 + world), hidden=4096, fp8=True, num_tokens=128, num_topk=8,
                 num_experts=64)
    gpu_ranks(world).run(common.task_with_env, _env(rpn), normal.task_normal_graph, BACKEND, case, 3)


@pytest.mark.parametrize("world,rpn", FULL_LAYOUTS, ids=_ids[:2])
def test_backward_step_through_autograd(gpu_ranks, world, rpn):
    case = NCase(seed=_seed(15000 + world), hidden=2048, num_topk=6, num_experts=64,
                 num_tokens=200)
    gpu_ranks(world).run(common.task_with_env, _env(rpn), normal.task_normal_backward, BACKEND, case)


@pytest.mark.gpu_alone  # reads the device's free memory: nothing else may allocate meanwhile
@pytest.mark.parametrize("world,rpn", FULL_LAYOUTS, ids=_ids[:2])
def test_create_and_destroy_keeps_free_memory(gpu_ranks, world, rpn):
    got = gpu_ranks(world).run(common.task_with_env, _env(rpn), life.task_normal_create_destroy,
                               BACKEND, 20, 7168, 64)
    print(f"create/destroy x20: {got}")


def test_stuck_peer_raises_timeout_naming_rank_node_and_phase(gpu_ranks):
    gpu_ranks(2)  # skips visibly without 2 GPU ranks
    got = run_ranks(common.task_with_env, 2, _env(1), life.task_normal_stuck_peer, BACKEND, 1, "3",
                    use_gpu=True, timeout=120)
    print(f"timeout after {got[0]:.2f} s")
    assert got[1] == "skipped"


@pytest.mark.parametrize("world,rpn", LAYOUTS, ids=_ids)
def test_bytes_across_nodes_are_the_minimum(gpu_ranks, world, rpn):
    """The kernels' own counters: one slot per (token, other node) in dispatch and one partial
    row per (token, other node) in combine, summed over ranks."""
    if BACKEND == "reference":
        pytest.skip("counters belong to the kernels")
    case = NCase(seed=_seed(16000 + world), hidden=7168, num_topk=8, num_experts=64,
                 num_tokens=300)
    got = gpu_ranks(world).run(common.task_with_env, _env(rpn), inter.task_internode_network_bytes,
                               BACKEND, case, rpn)
    print(f"network bytes (dispatch, combine, token-node pairs): {got[0]}")
