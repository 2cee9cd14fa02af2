"""The reference backend over NCCL on GPUs (1 and 2 ranks): the oracle must itself be right
where it is used as one."""
import pytest

from autograd_cases import task_round_trip_gradients
from cases import Case, task_dispatch_combine, task_layout

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("world", [1, 2])
def test_reference_layout_on_gpus(gpu_ranks, world):
    gpu_ranks(world).run(task_layout, Case(seed=101, num_experts=32))


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", [
    Case(seed=111, hidden=2048, num_experts=32, num_topk=8, with_bias=True),
    Case(seed=112, hidden=512, fp8=True),
    Case(seed=113, worst=256, routing="to_rank0"),
    Case(seed=114, routing="empty_rank1"),
], ids=["bf16-bias", "fp8", "worst-to-rank0", "empty-rank"])
def test_reference_dispatch_combine_on_gpus(gpu_ranks, world, case):
    if case.routing == "empty_rank1" and world == 1:
        pytest.skip("needs a second rank")
    gpu_ranks(world).run(task_dispatch_combine, case)


def test_reference_backward_on_gpus(gpu_ranks):
    gpu_ranks(2).run(task_round_trip_gradients, Case(seed=121))
