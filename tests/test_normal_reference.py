"""Normal-mode layout, dispatch and combine on the reference backend (gloo) against the oracle."""
import pytest

from cases import Case, task_dispatch_combine, task_layout


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("seed", [1, 2])
def test_layout_matches_oracle(cpu_ranks, world, seed):
    cpu_ranks(world).run(task_layout, Case(seed=seed))


def test_layout_counts_tokens_per_node(cpu_ranks):
    cpu_ranks(4).run(task_layout, Case(seed=5, ranks_per_node=2))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("seed", [11, 12])
def test_dispatch_combine_random_routing_with_bias(cpu_ranks, world, seed):
    cpu_ranks(world).run(task_dispatch_combine, Case(seed=seed, with_bias=True))


@pytest.mark.parametrize("routing", ["to_rank0", "skip_last_rank", "empty_rank1", "one_token"])
def test_dispatch_combine_skewed_routing(cpu_ranks, routing):
    cpu_ranks(4).run(task_dispatch_combine, Case(seed=21, routing=routing))


@pytest.mark.parametrize("topk", [1, 9])
def test_dispatch_combine_topk_extremes(cpu_ranks, topk):
    cpu_ranks(2).run(task_dispatch_combine, Case(seed=31, num_topk=topk, num_experts=32))


def test_dispatch_fp8_tuple_is_exact(cpu_ranks):
    cpu_ranks(2).run(task_dispatch_combine, Case(seed=41, fp8=True, hidden=384))


def test_dispatch_expert_alignment_rounds_counts(cpu_ranks):
    cpu_ranks(2).run(task_dispatch_combine, Case(seed=51, alignment=8))


def test_dispatch_num_worst_tokens_pads_with_minus_one(cpu_ranks):
    cpu_ranks(2).run(task_dispatch_combine, Case(seed=61, worst=200))


def test_dispatch_zero_tokens_everywhere(cpu_ranks):
    cpu_ranks(2).run(task_dispatch_combine, Case(seed=71, num_tokens=0, ragged=0))


def test_dispatch_four_ranks_as_two_nodes(cpu_ranks):
    cpu_ranks(4).run(task_dispatch_combine, Case(seed=81, ranks_per_node=2))


def test_async_finish_previous_event_and_comm_stream_allocation(cpu_ranks):
    cpu_ranks(2).run(task_dispatch_combine, Case(seed=101, async_mode=True))
