"""Training: gradients of dispatch (a combine) and combine (a cached dispatch) on gloo ranks."""
import pytest

from autograd_cases import task_round_trip_gradients
from cases import Case


@pytest.mark.parametrize("world", [2, 4])
def test_backward_of_dispatch_and_combine(cpu_ranks, world):
    cpu_ranks(world).run(task_round_trip_gradients, Case(seed=91))
