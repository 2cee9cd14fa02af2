"""ep_comm.core.routing (the reference layout math) against the loops of tests/oracle.py, in one
process: random rows with duplicate ids, -1 in every slot, rows routed nowhere, several nodes."""
import pytest
import torch

import oracle
from cases import add_duplicates_and_holes


def random_topk(t, k, e, seed, dups=True, drop=0.2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(t, e, generator=g).topk(min(k, e), dim=1).indices.to(torch.int64)
    idx[torch.rand(t, k, generator=g) < drop] = -1
    if dups:
        add_duplicates_and_holes(idx, g)
    return idx


@pytest.mark.parametrize("t,k,e,r,rpn", [(40, 6, 16, 4, 2), (33, 1, 8, 2, 2), (50, 16, 32, 8, 4),
                                         (0, 4, 8, 2, 1), (25, 9, 24, 3, 3)])
@pytest.mark.parametrize("dups", [False, True], ids=["distinct", "duplicates"])
def test_layout_equals_the_oracle(t, k, e, r, rpn, dups):
    from ep_comm.core import routing
    idx = random_topk(t, k, e, seed=t * 31 + k + r, dups=dups)
    per_rank, per_node, per_expert, in_rank = routing.compute_dispatch_layout(idx, e, r, rpn)
    want = oracle.layout(idx, e, r, rpn)
    assert per_rank.dtype == torch.int32 and per_rank.tolist() == want[0]
    assert (per_node is None) == (want[1] is None)
    if per_node is not None:
        assert per_node.dtype == torch.int32 and per_node.tolist() == want[1]
    assert per_expert.dtype == torch.int32 and per_expert.tolist() == want[2]
    assert in_rank.dtype == torch.bool and in_rank.tolist() == want[3]


def test_send_positions_count_in_token_order_from_the_offset():
    from ep_comm.core import routing
    in_rank = torch.tensor([[True, False], [True, True], [False, False], [False, True],
                            [True, True]])
    pos = routing.send_positions(in_rank, torch.tensor([5, 0]))
    assert pos.dtype == torch.int32
    assert pos.tolist() == [[5, -1], [6, 0], [-1, -1], [-1, 1], [7, 2]]


def test_local_topk_idx_keeps_own_experts_and_duplicates():
    from ep_comm.core import routing
    idx = torch.tensor([[4, 5, 5, -1], [0, 7, 6, 3], [-1, -1, -1, -1]])
    assert routing.local_topk_idx(idx, 1, 4).tolist() == [[0, 1, 1, -1], [-1, 3, 2, -1],
                                                          [-1, -1, -1, -1]]
    assert routing.local_topk_idx(idx, 0, 4).tolist() == [[-1, -1, -1, -1], [0, -1, -1, 3],
                                                          [-1, -1, -1, -1]]


def test_token_ranks_and_distinct_ids():
    from ep_comm.core import routing
    idx = torch.tensor([[3, 3, 0, -1], [-1, 7, 7, 7]])
    assert routing.token_ranks(idx, 8, 4).tolist() == [[1, 1, 0, -1], [-1, 3, 3, 3]]
    assert routing.distinct_ids(idx).tolist() == [[-1, 0, 3, -1], [-1, 7, -1, -1]]
