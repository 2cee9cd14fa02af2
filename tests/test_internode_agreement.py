"""Call agreement in the internode kernels (issue 23), host side, on the fake GPU of
tests/fake_gpu.py: the signature words and call tag each launch gets; a refusal decoded into the
reference backend's errors (a notify whose ranks all ran it: the signature rows; a rank that
ran another kernel: the call tags), raised before the dispatch kernel is launched, or by the
next call where nothing waited; the Buffer usable afterwards, with the call numbers of every
rank in step. What the kernels do runs in the GPU tests of tests/test_faults.py."""
from __future__ import annotations

import contextlib

import pytest
import torch

from ep_comm.backends.kernels import args, status
from ep_comm.core import agreement
from ep_comm.core.constants import (CALL_SIG_FIELDS, CALL_SIG_WORDS, NVL_INFO_CALL_SIGS,
                                    PHASE_BARRIER, PHASE_NOTIFY, STATUS_DISAGREE_TAG)
from ep_comm.errors import CollectiveMismatchError, InputError, PeerInputError

import fake_gpu

STATUS = CALL_SIG_FIELDS.index("status")
SIG = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)


class _Stream:
    def synchronize(self):
        pass


@contextlib.contextmanager
def internode_runtime(monkeypatch, rank=0, nodes=2, per_node=1):
    """An ``InternodeRuntime`` of ``rank`` in ``nodes`` x ``per_node`` ranks on the fake GPU."""
    from ep_comm.backends.kernels.internode import InternodeRuntime
    with fake_gpu.patched(monkeypatch) as module:
        monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: _Stream())
        comm = fake_gpu.FakeComm(rank, nodes * per_node)
        comm.ranks_per_node, comm.num_nodes = per_node, nodes
        comm.node, comm.local_rank = rank // per_node, rank % per_node
        rt = InternodeRuntime(comm, 64 << 20)
        rt.fake_module = module

        def launch(kernel, grid, params, values, shared_mem=0):
            # The internode runtime packs per launch (no plans): keep pack's checks (names
            # complete, values in range), record by name as the fake module does.
            args.pack(params, values)
            module.launches.append((kernel, grid, dict(values)))
            if module.on_launch is not None:
                module.on_launch(kernel, values)
        monkeypatch.setattr(rt, "_launch", launch)
        yield rt


@pytest.fixture
def rt(monkeypatch):
    """Rank 0 of 2 nodes x 1 rank."""
    with internode_runtime(monkeypatch) as runtime:
        yield runtime


def _dispatch(rt, worst=0, t=16, e=8, k=2, hidden=256):
    """A dispatch from a layout (made in torch: the fake layout kernel computes nothing)."""
    from ep_comm.config import default_config
    r = rt.num_ranks
    idx = torch.arange(t * k, dtype=torch.int64).view(t, k) % e
    in_rank = torch.zeros(t, r, dtype=torch.bool)
    in_rank.scatter_(1, idx // (e // r), True)
    per_expert = torch.bincount(idx.flatten(), minlength=e).to(torch.int32)
    return rt.dispatch(
        torch.zeros(t, hidden, dtype=torch.bfloat16), None, handle=None,
        num_tokens_per_rank=in_rank.sum(0, dtype=torch.int32), num_tokens_per_rdma_rank=None,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
        topk_weights=torch.ones(t, k), num_experts=e, expert_alignment=1,
        num_worst_tokens=worst, config=default_config(r))


def _launches(rt, name):
    return [a for n, _, a in rt.fake_module.launches if n == name]


def _refuse_tag(rt, phase, peer, peer_runs_barrier, theirs, mine):
    """What a kernel refusing by call tags leaves in the status word."""
    view = rt.status._view
    view[1:6] = [phase, peer, int(peer_runs_barrier), theirs, mine]
    view[0] = STATUS_DISAGREE_TAG


def _on(name, fn):
    def kernel(kernel_name, values):
        if kernel_name == name:
            fn(values)
    return kernel


def test_every_kernel_gets_its_calls_tag_and_the_notify_its_signature_words(rt):
    rt.comm.begin_call(SIG)
    _, _, _, _, _, handle = _dispatch(rt)
    notify, = _launches(rt, "inter_notify")
    words = agreement.device_words(1, SIG)
    assert notify["sig"] == words
    assert notify["call_tag"] == agreement.ll_tag(words) > 0
    dispatch, = _launches(rt, "inter_dispatch")
    assert dispatch["call_tag"] == notify["call_tag"]  # both kernels of one call
    combine_sig = agreement.Signature("combine", 256, torch.bfloat16, 8, 2)
    rt.comm.begin_call(combine_sig)
    rt.combine(torch.zeros(handle.num_recv_rows, 256, dtype=torch.bfloat16), handle, None, (),
               _config(rt))
    combine, = _launches(rt, "inter_combine")
    assert combine["call_tag"] == agreement.ll_tag(agreement.device_words(2, combine_sig))
    # a combine of a refused dispatch (num_recv -1) returns at once: it reads the handle's count
    assert combine["num_recv_dev"] == handle.backend_state.num_recv.data_ptr()


def _config(rt):
    from ep_comm.config import default_config
    return default_config(rt.num_ranks)


def test_status_word_holds_every_ranks_signature(monkeypatch):
    with internode_runtime(monkeypatch, 0, nodes=4, per_node=8) as big:
        assert big.status.nwords >= NVL_INFO_CALL_SIGS + 32 * CALL_SIG_WORDS


def test_refused_notify_raises_the_mismatch_before_the_dispatch_kernel_and_stays_usable(rt):
    rt.comm.begin_call(SIG)
    rt.fake_module.on_launch = fake_gpu.refusing(rt, "inter_notify",
                                                 fake_gpu.with_word("hidden", 128))
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt)
    fake_gpu.assert_hidden_mismatch_text(e.value)
    assert [n for n, _, _ in rt.fake_module.launches][-1] == "inter_notify"
    # usable: the word is cleared, the call number kept, the next call runs both kernels
    assert rt.status.read(8) == [0] * 8 and rt._broken is None and rt.comm.seq == 1
    rt.fake_module.on_launch = None
    rt.comm.begin_call(SIG)
    _dispatch(rt)
    assert [n for n, _, _ in rt.fake_module.launches][-2:] == ["inter_notify", "inter_dispatch"]


def test_own_bad_input_raises_its_input_error_and_the_peers_name_it(monkeypatch):
    bad = agreement.BadInput(3, 1, 17, "topk_idx[3, 1] = 17 (token 3) is outside [-1, 8)")
    for rank in (0, 1):
        with internode_runtime(monkeypatch, rank) as runtime:
            runtime.comm.begin_call(SIG, bad if rank == 1 else None)

            def refuse(values, runtime=runtime):
                rows = {runtime.rank: list(values["sig"])}
                rows[1 - runtime.rank] = agreement.device_words(
                    1, SIG, None if rank == 1 else bad)
                fake_gpu.refuse_notify(runtime, rows)
            runtime.fake_module.on_launch = _on("inter_notify", refuse)
            if rank == 1:
                with pytest.raises(InputError, match=r"topk_idx\[3, 1\] = 17 \(token 3\)"):
                    _dispatch(runtime)
                assert _launches(runtime, "inter_notify")[0]["sig"][STATUS:] == [1, 3, 1, 17]
            else:
                with pytest.raises(PeerInputError) as e:
                    _dispatch(runtime)
                assert "rank 1" in str(e.value) and "topk_idx[3, 1] = 17" in str(e.value)


def test_skipped_dispatch_is_named_by_the_tags_on_the_rank_that_waited(rt):
    """Rank 0's notify met rank 1's combine (rank 1 skipped this dispatch): a refusal by call
    tags, raised at the count wait, naming rank 1."""
    rt.comm.begin_call(SIG)
    rt.comm.begin_call(SIG)  # call #2
    combine_tag = agreement.ll_tag(agreement.device_words(
        2, agreement.Signature("combine", 256, torch.bfloat16, 8, 2)))
    rt.fake_module.on_launch = _on("inter_notify", lambda v: _refuse_tag(
        rt, PHASE_NOTIFY, 1, True, combine_tag, v["call_tag"]))
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt)
    text = str(e.value)
    assert e.value.field == "signature" and "call #2" in text, text
    assert "Rank 1's call differs" in text and "rank 1 runs a dispatch or combine kernel" in text
    assert "nothing moved" in text
    assert "inter_dispatch" not in [n for n, _, _ in rt.fake_module.launches]
    assert rt.comm.seq == 2 and rt._broken is None


def test_refused_combine_is_raised_by_the_next_call_which_gives_its_number_back(rt):
    """The combine (nothing waits for it) met rank 1's notify of a dispatch: the next call
    raises it before launching anything and does not keep its call number, so that this rank
    and rank 1 (whose dispatch raised at its count wait) go on with the same numbers."""
    rt.comm.begin_call(SIG)
    _, _, _, _, _, handle = _dispatch(rt)
    combine_sig = agreement.Signature("combine", 256, torch.bfloat16, 8, 2)
    rt.comm.begin_call(combine_sig)  # call #2; rank 1 made a dispatch as its call #2
    dispatch_tag = agreement.ll_tag(agreement.device_words(2, SIG))
    rt.fake_module.on_launch = _on("inter_combine", lambda v: _refuse_tag(
        rt, PHASE_BARRIER, 1, False, dispatch_tag, v["call_tag"]))
    rt.combine(torch.zeros(handle.num_recv_rows, 256, dtype=torch.bfloat16), handle, None, (),
               _config(rt))  # returns: the host does not wait for a combine
    rt.fake_module.on_launch = None
    launched = len(rt.fake_module.launches)
    rt.comm.begin_call(SIG)  # call #3
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt)
    text = str(e.value)
    assert e.value.field == "signature" and "call #2" in text, text
    assert "rank 1 runs a notify kernel" in text, text
    assert len(rt.fake_module.launches) == launched  # nothing launched
    assert rt.comm.seq == 2 and rt._broken is None
    rt.comm.begin_call(SIG)  # call #3 again, as on rank 1
    _dispatch(rt)
    assert _launches(rt, "inter_notify")[-1]["sig"][0] == 3


def test_skip_seen_as_call_numbers_names_the_rank_behind(rt):
    """Tags with equal hashes and call numbers one apart: the rank with the lower number
    skipped a call."""
    for _ in range(3):
        rt.comm.begin_call(SIG)
    behind = agreement.ll_tag(agreement.device_words(2, SIG))
    rt.fake_module.on_launch = _on("inter_dispatch", lambda v: _refuse_tag(
        rt, PHASE_BARRIER, 1, True, behind, v["call_tag"]))
    _dispatch(rt, worst=64)  # the dispatch kernel refused; nothing waited
    rt.fake_module.on_launch = None
    rt.comm.begin_call(SIG)
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt, worst=64)
    assert e.value.field == "seq" and "Rank 1 skipped a call" in str(e.value), str(e.value)


def test_refusal_of_a_dispatch_that_did_not_wait_is_raised_by_the_next_call(rt):
    rt.comm.begin_call(SIG)
    rt.fake_module.on_launch = fake_gpu.refusing(rt, "inter_notify",
                                                 fake_gpu.with_word("num_topk", 4))
    _dispatch(rt, worst=64)  # returns: the host did not wait (its dispatch kernel moves nothing)
    rt.fake_module.on_launch = None
    rt.comm.begin_call(SIG)
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt, worst=64)
    assert e.value.field == "num_topk" and "call #1" in str(e.value)
    assert rt.comm.seq == 1  # every rank refused call #1 alike: all give #2 back


def test_a_timeout_still_breaks_the_runtime(rt):
    from ep_comm.core.constants import STATUS_TIMEOUT
    from ep_comm.errors import CommTimeoutError
    rt.comm.begin_call(SIG)
    view = rt.status._view

    def time_out(values):
        view[1:6] = [PHASE_NOTIFY, 1, -1, 0, 2]
        view[0] = STATUS_TIMEOUT
    rt.fake_module.on_launch = _on("inter_notify", time_out)
    with pytest.raises(CommTimeoutError):
        _dispatch(rt)
    assert rt._broken is not None


def test_decoder_names_what_the_other_rank_runs():
    mine = agreement.ll_tag(agreement.device_words(4, SIG))
    theirs = agreement.ll_tag(agreement.device_words(
        4, agreement.Signature("cached_dispatch", 256, torch.bfloat16, 8, -1)))
    err = status.decode_status([STATUS_DISAGREE_TAG, PHASE_BARRIER, 1, 1, theirs, mine],
                               status.INTERNODE, 0, 3.0, node=0, seq=4)
    assert isinstance(err, CollectiveMismatchError) and err.field == "signature"
    assert "barrier (start of an internode kernel)" in str(err)
    assert "rank 1 runs a dispatch or combine kernel" in str(err)


def test_internode_runtime_fuses_the_agreement_of_a_dispatch_from_a_layout():
    from ep_comm.backends.kernels.internode import InternodeRuntime
    assert InternodeRuntime.carries_call_signature is True
