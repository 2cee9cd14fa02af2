"""Normal-mode dispatch/combine on the reference backend (gloo) against the oracle."""
import pytest

from cases import Case, task_dispatch_combine, task_layout


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("seed", [1, 2])
def test_layout_matches_oracle(cpu_ranks, world, seed):
    cpu_ranks(world).run(task_layout, Case(seed=seed))


def test_layout_counts_per_node(cpu_ranks):
    cpu_ranks(4).run(task_layout, Case(seed=5, ranks_per_node=2))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("seed", [11, 12])
def test_dispatch_combine_random_routing(cpu_ranks, world, seed):
    cpu_ranks(world).run(task_dispatch_combine, Case(seed=seed, with_bias=True))
