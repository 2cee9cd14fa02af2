"""Host-side pieces of the internode path that need no GPU: the symmetric buffer layout
(``ep_comm.core.regions.InternodeRegions``) and the size hint it feeds."""
import pytest

from ep_comm.config import Config
from ep_comm.core.constants import NORMAL_MAX_TOPK as MAX_TOPK
from ep_comm.core.constants import REGION_ALIGN
from ep_comm.core.regions import InternodeRegions


@pytest.mark.parametrize("ranks,rpn", [(2, 1), (4, 2), (16, 8), (64, 8)])
@pytest.mark.parametrize("hidden", [1000, 2048, 7168])
def test_hint_gives_the_capacity_it_promises(ranks, rpn, hidden):
    for tokens in (1, 129, 4096):
        need = Config().get_rdma_buffer_size_hint(hidden * 2, ranks, ranks_per_node=rpn,
                                                  num_max_tokens_per_rank=tokens)
        reg = InternodeRegions(hidden, ranks, rpn, need)
        assert reg.cap >= tokens and reg.total_bytes <= need
        assert InternodeRegions(hidden, ranks, rpn, need - REGION_ALIGN * 4).cap < tokens + 1
        assert reg.rows_cap == min(ranks, 16) * reg.cap


def test_control_regions_do_not_move_with_hidden_or_bytes():
    a = InternodeRegions(1000, 8, 4, 10 << 20)
    b = InternodeRegions(7168, 8, 4, 900 << 20)
    for name in ("ctrl", "barrier", "notify_flag", "counts", "dispatch_arrive", "combine_arrive"):
        assert a[name] == b[name]
    assert a.control_bytes == b.control_bytes


@pytest.mark.parametrize("elem,k", [(2, 1), (2, 8), (1, 9), (1, MAX_TOPK)])
def test_slot_fields_fit_and_do_not_overlap(elem, k):
    reg = InternodeRegions(7168, 16, 8, 1 << 30)
    o = reg.slot_offsets(elem, k)
    assert reg.header_bytes >= 16 + 4 * 8 and o["payload"] == reg.header_bytes
    assert o["scales"] == o["payload"] + 7168 * elem
    assert o["topk_idx"] >= o["scales"] + 7168 // 128 * 4
    assert o["topk_weights"] == o["topk_idx"] + MAX_TOPK * 4
    assert o["put_bytes"] <= reg.slot_bytes
    # combine: a bf16 row then the weights, inside the slot
    assert o["combine_weights"] >= o["payload"] + 7168 * 2
    assert o["payload"] + o["combine_put_bytes"] <= reg.slot_bytes
    for v in o.values():
        assert v % 16 == 0 or v in (o["topk_weights"],)


def test_zero_bytes_gives_zero_capacity():
    assert InternodeRegions(2048, 4, 2, 0).cap == 0


@pytest.mark.parametrize("tokens", [1, 100, 4096, 50000])
def test_dispatch_chunks_cover_the_capacity(tokens):
    from ep_comm.core.constants import INTER_DISPATCH_CHUNKS
    probe = InternodeRegions(7168, 16, 8, 1 << 20)
    nbytes = probe.bytes_for(tokens)
    reg = InternodeRegions(7168, 16, 8, nbytes)
    assert reg.cap >= tokens
    # the data regions are carved after the counters and fit the buffer
    assert reg.total_bytes <= nbytes
    assert reg.regions["combine_src"].offset > reg.regions["dispatch_work"].offset
    # every slot position maps to one of the chunk counters, chunks are never tiny
    for rdma_chunk in (1, 16, 1000):
        slots = reg.chunk_slots(rdma_chunk)
        assert (reg.cap - 1) // slots < INTER_DISPATCH_CHUNKS and slots >= rdma_chunk
    assert reg.regions["dispatch_arrive"].nbytes >= 2 * reg.num_nodes * INTER_DISPATCH_CHUNKS * 8


@pytest.mark.parametrize("ranks,rpn", [(4, 2), (16, 8)])
def test_combine_src_halves_alternate_and_fit(ranks, rpn):
    """Two combines in a row stage their inputs in different halves of combine_src (a same-node
    peer may still read the previous one), both inside the region and the buffer."""
    reg = InternodeRegions(7168, ranks, rpn, 64 << 20)
    region = reg.regions["combine_src"]
    half = reg.rows_cap * reg.row_c
    a, b = reg.combine_src_offset(0), reg.combine_src_offset(1)
    assert a == region.offset and b == a + half and reg.combine_src_offset(2) == a
    assert region.nbytes >= 2 * half and b + half <= region.offset + region.nbytes
    assert region.offset + region.nbytes <= reg.total_bytes <= 64 << 20
