"""Normal-mode layout, dispatch and combine on the reference backend (gloo) against the oracle."""
import pytest
import torch

from cases import (Case, task_dispatch_combine, task_dispatch_without_topk, task_layout,
                   task_worst_tokens_overflow)


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


@pytest.mark.parametrize("world", [2, 4])
def test_layout_counts_a_duplicate_id_once_per_token(cpu_ranks, world):
    """Rows naming one expert twice (or three times), -1 in every slot position, rows of all -1:
    num_tokens_per_expert counts a token once per distinct expert (the oracle's rule)."""
    cpu_ranks(world).run(task_layout, Case(seed=3 + world, dups=True, num_topk=6))


def test_layout_duplicate_ids_by_hand():
    from ep_comm.core import routing
    idx = torch.tensor([[1, 1, 3, -1], [-1, -1, -1, -1], [2, 2, 2, 0], [-1, 3, 1, -1]])
    per_rank, per_node, per_expert, in_rank = routing.compute_dispatch_layout(idx, 4, 2, 2)
    assert per_expert.tolist() == [1, 2, 1, 2]
    assert per_rank.tolist() == [3, 3] and per_node is None
    assert in_rank.tolist() == [[True, True], [False, False], [True, True], [True, True]]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_dispatch_combine_duplicate_ids_holes_and_unrouted_tokens(cpu_ranks, world, fp8):
    cpu_ranks(world).run(task_dispatch_combine, Case(seed=91 + world, dups=True, fp8=fp8,
                                                     num_topk=5, with_bias=True))


def test_dispatch_combine_topk_at_the_normal_mode_maximum(cpu_ranks):
    from ep_comm.core.constants import NORMAL_MAX_TOPK
    cpu_ranks(2).run(task_dispatch_combine, Case(seed=33, num_topk=NORMAL_MAX_TOPK,
                                                 num_experts=2 * NORMAL_MAX_TOPK, dups=True))


def test_cached_fp8_dispatch_is_the_oracles_cast(cpu_ranks):
    """Cached dispatch of a new fp8 tuple: payload and scales bit-exact to the oracle's cast."""
    cpu_ranks(2).run(task_dispatch_combine, Case(seed=43, fp8=True, hidden=512, num_topk=3))


def test_dispatch_without_topk_idx(cpu_ranks):
    cpu_ranks(2).run(task_dispatch_without_topk, Case(seed=47))
    cpu_ranks(2).run(task_dispatch_without_topk, Case(seed=48, fp8=True, dups=True))


@pytest.mark.parametrize("world", [2, 3])
def test_num_worst_tokens_overflow_is_a_clear_error(cpu_ranks, world):
    got = cpu_ranks(world).run(task_worst_tokens_overflow, Case(seed=57, num_experts=24))
    assert got == ["raised"] * world, got
