"""Call agreement fused into the NVLink notify kernel (issue 23), host side, on the fake GPU of
tests/fake_gpu.py: the signature words each dispatch passes to ``nvl_notify``; a refusal
(``STATUS_DISAGREE``) decoded into the reference backend's errors, before the dispatch kernel is
launched; no extra host exchange where the kernel agrees; the Buffer usable afterwards. What the
kernel itself does runs in the GPU tests of tests/test_faults.py."""
from __future__ import annotations

import pytest
import torch

from ep_comm.backends.kernels import status
from ep_comm.core import agreement
from ep_comm.core.constants import (CALL_SIG_FIELDS, CALL_SIG_WORDS, NORMAL_MAX_TOPK,
                                    NVL_ANN_EXPAND_BIT, NVL_ANN_FP8_BIT, NVL_ANN_ROW_BITS,
                                    NVL_ANN_ROW_SHIFT, NVL_ANN_TOPK_BITS, NVL_ANN_TOPK_SHIFT,
                                    NVL_CTRL_ANNOUNCE, NVL_CTRL_FINDING, NVL_CTRL_WORDS,
                                    NVL_INFO_OWN_KERNEL,
                                    NVL_KERNEL_COMBINE, NVL_KERNEL_DISPATCH, NVL_KERNEL_NOTIFY,
                                    NVL_MAX_RANKS,
                                    NVL_RING_SHAPE_BITS, PHASE_COMBINE_RECV,
                                    PHASE_DISPATCH_RECV, PHASE_DISPATCH_SEND, PHASE_NOTIFY,
                                    STATUS_DISAGREE, STATUS_DISAGREE_KERNEL, STATUS_TIMEOUT)
from ep_comm.errors import CollectiveMismatchError, CommTimeoutError, EpCommError, InputError, \
    PeerInputError

import fake_gpu

HIDDEN = CALL_SIG_FIELDS.index("hidden")
STATUS = CALL_SIG_FIELDS.index("status")


@pytest.fixture
def two_ranks(monkeypatch):
    """Rank 0 of 2 on the fake GPU: IntranodeRuntime with its recording module."""
    with fake_gpu.intranode_runtime(monkeypatch, 0, 2) as rt:
        yield rt


def _dispatch(rt, worst=0):
    return fake_gpu.layout_and_dispatch(rt, worst=worst)[0]


def _refuse_with(rt, peer_words):
    """``fake_gpu.refusing`` of the NVLink notify kernel."""
    return fake_gpu.refusing(rt, "nvl_notify", peer_words)


def _call(rt, sig, bad=None):
    """Number a call on the runtime's fake Comm, as ``Buffer._begin_call`` does."""
    rt.comm.begin_call(sig, bad)


def test_notify_gets_the_calls_signature_words(two_ranks):
    rt = two_ranks
    for seq in (1, 2):
        sig = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)
        _call(rt, sig)
        _dispatch(rt)
        notify = [a for n, _, a in rt.fake_module.launches if n == "nvl_notify"][-1]
        assert notify["sig"] == agreement.device_words(seq, sig)
        assert notify["sig"][:STATUS] == [seq, agreement.OPS["dispatch"], 256, 1, 8, 2, -1, -1]


def test_device_words_are_the_agreement_vector_less_magic_and_clamped():
    sig = agreement.Signature("combine", 7168, torch.float8_e4m3fn, 256, 8, 3)
    bad = agreement.BadInput(3, 1, 2**40, "x")
    want = agreement.pack(5, sig, bad).tolist()[1:-1] + [2**31 - 1]  # the value clamped
    assert agreement.device_words(5, sig, bad) == want
    assert len(agreement.device_words(5, sig)) == CALL_SIG_WORDS == len(agreement.FIELDS) - 1


def test_refusal_raises_the_mismatch_naming_ranks_field_and_values_before_the_dispatch_kernel(
        two_ranks):
    rt = two_ranks
    sig = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)
    _call(rt, sig)
    rt.fake_module.on_launch = _refuse_with(rt, fake_gpu.with_word("hidden", 128))
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt)
    fake_gpu.assert_hidden_mismatch_text(e.value)
    names = [n for n, _, _ in rt.fake_module.launches]
    assert names[-1] == "nvl_notify", names  # the dispatch kernel was never launched
    # The refusal leaves the Buffer usable: the word is cleared, the next call goes on.
    assert rt.status.read(8) == [0] * 8 and rt._broken is None
    rt.fake_module.on_launch = None
    _call(rt, sig)
    _dispatch(rt)
    assert [n for n, _, _ in rt.fake_module.launches][-2:] == ["nvl_notify", "nvl_dispatch"]


def test_skipped_call_is_named_by_its_sequence_number(two_ranks):
    rt = two_ranks
    sig = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)
    _call(rt, sig)
    _call(rt, sig)  # call #2 here; rank 1 skipped one and is at its call #1
    rt.fake_module.on_launch = _refuse_with(rt, lambda mine: agreement.device_words(1, sig))
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt)
    assert e.value.field == "seq" and "#1" in str(e.value) and "#2" in str(e.value)
    assert "skipped a call" in str(e.value)


def test_own_bad_input_raises_its_input_error_after_the_exchange(two_ranks):
    rt = two_ranks
    sig = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)
    bad = agreement.BadInput(3, 1, 17, "topk_idx[3, 1] = 17 (token 3) is outside [-1, 8)")
    _call(rt, sig, bad)

    def kernel(name, values):
        if name == "nvl_notify":
            assert values["sig"][STATUS] == 1 and values["sig"][STATUS + 1:] == [3, 1, 17]
            fake_gpu.refuse_notify(rt, {0: values["sig"], 1: agreement.device_words(1, sig)})
    rt.fake_module.on_launch = kernel
    with pytest.raises(InputError, match=r"topk_idx\[3, 1\] = 17 \(token 3\)"):
        _dispatch(rt)


def test_peer_bad_input_raises_peer_input_error_naming_it(two_ranks):
    rt = two_ranks
    sig = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)
    _call(rt, sig)
    rt.fake_module.on_launch = _refuse_with(
        rt, lambda mine: agreement.device_words(1, sig, agreement.BadInput(5, 0, 99, "bad")))
    with pytest.raises(PeerInputError) as e:
        _dispatch(rt)
    assert "rank 1" in str(e.value) and "topk_idx[5, 0] = 99" in str(e.value)


def test_bad_id_found_by_the_layout_kernel_is_this_ranks_input_error(two_ranks):
    """No host check ran (a later call of the shape), but the notify kernel put the layout
    kernel's bad-id record into this rank's words: an InputError here, not a PeerInputError
    naming itself; and it comes before a peer's bad input."""
    rt = two_ranks
    sig = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)
    _call(rt, sig)

    def kernel(name, values):
        if name == "nvl_notify":
            assert values["sig"][STATUS] == 0  # the host found nothing
            assert values["id_check"] == rt._id_check.data_ptr()
            mine = list(values["sig"])
            mine[STATUS:STATUS + 4] = [1, 3, 1, 17]  # what the kernel sends from id_check
            fake_gpu.refuse_notify(rt, {0: mine, 1: agreement.device_words(
                1, sig, agreement.BadInput(0, 0, 99, "bad"))})
    rt.fake_module.on_launch = kernel
    with pytest.raises(InputError, match=r"topk_idx\[3, 1\] = 17 is out of range \(token 3\)"):
        _dispatch(rt)


def test_layout_and_notify_share_the_bad_id_record(two_ranks):
    """The layout kernel and the notify kernel get the same record, which starts empty (all
    ones); the key packs token, column and value as the kernels' bad_id_key does."""
    from ep_comm.core.constants import ID_CHECK_COL_SHIFT, ID_CHECK_TOKEN_SHIFT
    rt = two_ranks
    seen = {}

    def kernel(name, values):
        seen[name] = values.get("id_check")
    rt.fake_module.on_launch = kernel
    _call(rt, agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2))
    _dispatch(rt)
    assert seen["nvl_get_dispatch_layout"] == seen["nvl_notify"] == rt._id_check.data_ptr()
    assert rt._id_check.tolist() == [-1]
    key = (3 << ID_CHECK_TOKEN_SHIFT) | (1 << ID_CHECK_COL_SHIFT) | (17 & 0xFFFFFFFF)
    assert (key >> ID_CHECK_TOKEN_SHIFT, (key >> ID_CHECK_COL_SHIFT) & 0xFF, key & 0xFFFFFFFF) \
        == (3, 1, 17)
    assert ID_CHECK_TOKEN_SHIFT - ID_CHECK_COL_SHIFT == 8  # top-k columns < 256


def test_refusal_of_a_call_that_did_not_wait_is_raised_by_the_next_call(two_ranks):
    """num_worst_tokens: nothing waits for the notify kernel, so its refusal is raised by the
    next call of the runtime (the dispatch kernel itself moved nothing)."""
    rt = two_ranks
    sig = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)
    _call(rt, sig)
    rt.fake_module.on_launch = _refuse_with(rt, fake_gpu.with_word("num_topk", 4))
    _dispatch(rt, worst=64)  # returns: the host did not wait
    rt.fake_module.on_launch = None
    _call(rt, sig)
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt, worst=64)
    assert e.value.field == "num_topk" and "call #1" in str(e.value)


def test_decoder_without_rows_still_names_peer_and_field():
    words = [STATUS_DISAGREE, PHASE_NOTIFY, 1, HIDDEN, 128, 256]
    err = status.decode_status(words, status.NVLINK, 0, 3.0)
    assert "rank 1" in str(err) and "hidden" in str(err) and "128" in str(err)


@pytest.mark.parametrize("phase", [PHASE_DISPATCH_SEND, PHASE_COMBINE_RECV])
def test_ring_wait_that_saw_another_tag_says_the_layout_may_differ(phase):
    """The cached dispatch and combine have no signature exchange: ranks that disagree on the
    row layout are kept apart by the ring words' tags (``ring_shape``), and each times out. A
    ring wait reports -1 as the count it saw when the word carried another tag; the timeout
    names the peer and says what that means, another row layout among the causes."""
    err = status.decode_status([STATUS_TIMEOUT, phase, 1, 2, -1, 5], status.NVLINK, 0, 3.0)
    assert isinstance(err, CommTimeoutError) and err.peer == 1
    assert "channel 2" in str(err) and "another row layout" in str(err)
    # a count of this kernel (a slow or stuck peer), or the notify's flags: no such guess
    for words in ([STATUS_TIMEOUT, phase, 1, 2, 3, 5], [STATUS_TIMEOUT, PHASE_NOTIFY, 1, -1, -1, 8]):
        err = status.decode_status(words, status.NVLINK, 0, 3.0)
        assert err.peer == 1 and "another row layout" not in str(err)


# ------------------------------------------- the NVLink kernels' announcements (no timeout)
def _what(kind: int, row_int4: int = 0, k: int = 0, fp8: int = 0, expand: int = 0) -> int:
    """An announcement's low word as ``kernel_what`` in kernels/cuda/intranode_common.cuh
    packs it (``constants.NVL_ANN_*``)."""
    return (kind | row_int4 << NVL_ANN_ROW_SHIFT | k << NVL_ANN_TOPK_SHIFT
            | fp8 << NVL_ANN_FP8_BIT | expand << NVL_ANN_EXPAND_BIT)


def _finding_words(what_a: int, what_b: int, tag_a: int = 5, tag_b: int = 5, a: int = 0,
                   b: int = 1, phase: int = PHASE_DISPATCH_RECV, own: tuple = (0, 0)) -> list[int]:
    """The status words of a wait that stopped on rank a's finding that rank b announced
    another kernel (``report_finding`` in kernels/cuda/intranode_common.cuh), as int32:
    [0..7], the received count [8] (0), this rank's own kernel (what, tag)."""
    def i32(v):
        return v - (1 << 32) if v >= 1 << 31 else v
    words = [STATUS_DISAGREE_KERNEL, phase, a, b, i32(what_a), i32(what_b), i32(tag_a),
             i32(tag_b), 0, i32(own[0]), i32(own[1])]
    assert len(words) == NVL_INFO_OWN_KERNEL + 2
    return words


D, C, N = NVL_KERNEL_DISPATCH, NVL_KERNEL_COMBINE, NVL_KERNEL_NOTIFY


@pytest.mark.parametrize("mine, theirs, field, values", [
    (_what(D, 32, 2), _what(C, 32, 2), "op", None),
    (_what(N), _what(C, 32, 2), "op", None),
    (_what(D, 32, 2), _what(D, 16, 2, fp8=1), "dtype", {"bf16": [0], "fp8": [1]}),
    (_what(C, 32, 2), _what(C, 16, 2), "hidden", {256: [0], 128: [1]}),
    (_what(D, 28, 8, fp8=1), _what(D, 28, 4, fp8=1), "num_topk", {8: [0], 4: [1]}),
    (_what(D, 32, 2), _what(D, 32, 2, expand=1), "expand", {0: [0], 1: [1]}),
])
def test_kernel_mismatch_names_the_first_field_that_differs(mine, theirs, field, values):
    """STATUS_DISAGREE_KERNEL: rank 0 found rank 1's announcement of another kernel or row
    layout under the same kernel number. The host names the first differing field of the two
    announcements (operation, dtype, hidden, top-k, expand) with both values and ranks, as a
    CollectiveMismatchError that leaves the Buffer failed; on rank 0 and on rank 1 alike."""
    for rank, other in ((0, 1), (1, 0)):
        err = status.decode_status(_finding_words(mine, theirs), status.NVLINK, rank, 3.0,
                                   seq=7)
        assert isinstance(err, CollectiveMismatchError) and not err.usable
        assert err.field == field and err.call == 7 and err.rank == rank
        if values is None:  # the operations, named as the user called them
            assert sorted(err.values.values()) == [[0], [1]]
            assert any("combine" in str(v) for v in err.values)
        else:
            assert err.values == values
        text = str(err)
        assert f"rank {rank}:" in text and f"rank {other} runs its" in text
        assert "(this rank in dispatch/receive)" in text
        assert "The Buffer is failed" in text and "still usable" not in text


@pytest.mark.parametrize("own_tag, groups, odd", [
    (7, [[0], [1, 2]], [0]),   # rank 2 ran rank 1's kernel: beside it; rank 0 is the odd one
    (5, [[0, 2], [1]], [1]),   # rank 2 ran rank 0's kernel
    (5 + 1, [[0], [1]], []),  # a later kernel of rank 2 (queued behind) stopped: no side
])
def test_kernel_mismatch_seen_by_a_third_rank_names_both_ranks_of_the_finding(own_tag, groups,
                                                                                odd):
    """Rank 2 stopped on rank 0's finding about rank 1 (every rank's waits stop on a finding
    published to all): its error names ranks 0 and 1, their values, and where it stopped; with
    its own kernel's tag equal to a's or b's it stands beside that rank, so the odd rank of
    three is named."""
    words = _finding_words(_what(C, 32, 2), _what(D, 32, 2), tag_a=5, tag_b=7,
                           phase=PHASE_COMBINE_RECV, own=(_what(D, 32, 2), own_tag))
    err = status.decode_status(words, status.NVLINK, 2, 3.0, seq=3)
    assert err.field == "op" and sorted(err.values.values()) == groups
    assert err.odd_ranks == odd
    text = str(err)
    assert text.startswith("rank 2:") and "rank 0 runs its combine" in text
    assert "where rank 1 runs its dispatch" in text and "(this rank in combine/receive)" in text


def test_kernel_mismatch_of_equal_announcements_names_the_layout_hashes():
    """Equal kind, dtype, hidden, top-k and expand, but other tags (channels, ring slots or
    experts per rank differ, which only the tag's hash carries): field "layout", each rank's
    hash."""
    w = _what(C, 32, 2)
    seq_bits = 32 - NVL_RING_SHAPE_BITS
    words = _finding_words(w, w, 9 | 0x34 << seq_bits, 9 | 0x12 << seq_bits, phase=PHASE_NOTIFY)
    err = status.decode_status(words, status.NVLINK, 0, 3.0, seq=2)
    assert err.field == "layout" and err.values == {"layout hash 0x034": [0],
                                                    "layout hash 0x012": [1]}
    assert "(this rank in dispatch/notify)" in str(err)


def test_kernel_mismatch_fails_the_runtime_and_its_comm(two_ranks):
    """A cached dispatch or combine is not waited for: the kernels' finding is raised by the next
    call that reads the status word, as the CollectiveMismatchError naming the field; the
    runtime is failed and so is its Comm (the Buffer's later calls raise BufferFailedError at
    once), since the kernels stopped mid-exchange."""
    rt = two_ranks
    sig = agreement.Signature("dispatch", 256, torch.bfloat16, 8, 2)
    _call(rt, sig)

    def kernel(name, values):  # the dispatch kernel finds rank 1 running a combine
        if name == "nvl_dispatch":
            view = rt.status._view
            view[1:NVL_INFO_OWN_KERNEL + 2] = _finding_words(_what(D, 32, 2),
                                                             _what(C, 32, 2))[1:]
            view[0] = STATUS_DISAGREE_KERNEL
    rt.fake_module.on_launch = kernel
    _dispatch(rt)  # returns: the host checks the status after the count wait, before this
    rt.fake_module.on_launch = None
    _call(rt, sig)
    launched = len(rt.fake_module.launches)
    with pytest.raises(CollectiveMismatchError) as e:
        _dispatch(rt)
    assert e.value.field == "op" and e.value.call == 2 and not e.value.usable
    after = [n for n, _, _ in rt.fake_module.launches[launched:]]
    assert after == ["nvl_get_dispatch_layout"], after  # raised before the notify
    assert rt.comm.failure is e.value and rt._broken is e.value
    with pytest.raises(EpCommError, match="failed earlier"):
        _dispatch(rt)


def test_announcement_fields_fit_their_word_and_the_control_words():
    """The announcement's fields do not overlap and fit the low 32 bits (bits 30-31 stay 0);
    the uint64 announcements and findings start 8-byte aligned inside the ctrl region, which
    holds one announcement and one three-word finding per rank."""
    fields = [(0, 2), (NVL_ANN_ROW_SHIFT, NVL_ANN_ROW_BITS),
              (NVL_ANN_TOPK_SHIFT, NVL_ANN_TOPK_BITS), (NVL_ANN_FP8_BIT, 1),
              (NVL_ANN_EXPAND_BIT, 1)]
    bits = [b for lo, n in fields for b in range(lo, lo + n)]
    assert len(bits) == len(set(bits)) and max(bits) < 30
    assert max(NVL_KERNEL_DISPATCH, NVL_KERNEL_COMBINE, NVL_KERNEL_NOTIFY) < 4
    assert (1 << NVL_ANN_TOPK_BITS) > NORMAL_MAX_TOPK
    assert NVL_CTRL_ANNOUNCE % 2 == 0 and NVL_CTRL_FINDING % 2 == 0
    assert NVL_CTRL_FINDING == NVL_CTRL_ANNOUNCE + 2 * NVL_MAX_RANKS
    assert NVL_CTRL_WORDS == NVL_CTRL_FINDING + 6 * NVL_MAX_RANKS
    assert NVL_MAX_RANKS <= 256  # a finding's ranks are 8-bit fields
    from ep_comm.core.regions import IntranodeRegions
    from ep_comm.config import default_config
    reg = IntranodeRegions(default_config(8), 7168 * 2, 8)
    ctrl = reg["ctrl"]
    assert ctrl.offset % 8 == 0 and ctrl.nbytes == NVL_CTRL_WORDS * 4


def _fake_buffer_calls(monkeypatch, agree_env: str | None):
    import ep_comm.buffer as buffer_mod
    if agree_env is not None:
        monkeypatch.setenv(buffer_mod.AGREE_ENV, agree_env)
    return fake_gpu.fake_buffer(monkeypatch, num_nvl_bytes=1 << 30)


@pytest.mark.parametrize("agree_env", [None, "1"])
def test_fused_dispatch_makes_no_host_agreement_exchange(monkeypatch, agree_env):
    """By default a dispatch from a layout that waits for its counts agrees in the notify
    kernel only, and the other calls not at all; with EP_COMM_CHECK_AGREEMENT=1 every call
    agrees on the host first (the notify kernel still gets the words)."""
    with _fake_buffer_calls(monkeypatch, agree_env) as (buf, module):
        t, k, e = 8, 2, 8
        x = torch.zeros(t, 256, dtype=torch.bfloat16)
        idx = torch.arange(t * k, dtype=torch.int64).view(t, k) % e
        w = torch.ones(t, k)
        per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
        layout = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                      is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                      topk_idx=idx, topk_weights=w)
        recv, _, _, _, handle, _ = buf.dispatch(x, **layout)
        assert buf.comm.agreed == ([] if agree_env is None else ["dispatch/agree"])
        notify = [a for n, _, a in module.launches if n == "nvl_notify"][-1]
        assert notify["sig"][:STATUS] == [1, agreement.OPS["dispatch"], 256, 1, e, k, -1, -1]
        buf.dispatch(x, num_worst_tokens=64, **layout)
        buf.combine(recv, handle)
        expect = ["dispatch/agree"] * 2 + ["combine/agree"] if agree_env == "1" else []
        assert buf.comm.agreed == expect


def test_fused_dispatch_sends_a_bad_input_through_the_notify_kernel(monkeypatch):
    """Buffer level, default settings: a dispatch whose ids are out of range still makes its
    notify exchange, with the bad-input status and the offending token in its words (so that
    its peers raise PeerInputError naming this rank instead of waiting for it), then raises its
    own InputError from the refusal; the dispatch kernel is never launched."""
    with _fake_buffer_calls(monkeypatch, None) as (buf, module):
        t, k, e = 8, 2, 8
        x = torch.zeros(t, 256, dtype=torch.bfloat16)
        idx = torch.arange(t * k, dtype=torch.int64).view(t, k) % e
        per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
        bad = idx.clone()
        bad[3, 1] = 17
        rt = buf._backend.normal

        def kernel(name, values):
            if name == "nvl_notify":  # the real kernel refuses: a rank's status word is 1
                fake_gpu.refuse_notify(rt, {0: values["sig"]})
        module.on_launch = kernel
        with pytest.raises(InputError, match=r"17"):
            buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                         is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                         topk_idx=bad, topk_weights=torch.ones(t, k))
        names = [n for n, _, _ in module.launches]
        assert names.count("nvl_notify") == 1 and "nvl_dispatch" not in names
        sig = [a for n, _, a in module.launches if n == "nvl_notify"][0]["sig"]
        assert sig[STATUS] == 1 and sig[STATUS + 1:] == [3, 1, 17]
        assert buf.comm.agreed == []


@pytest.mark.parametrize("failed", [False, True], ids=["healthy", "failed"])
def test_nvlink_teardown_meets_the_peers_only_while_the_buffer_is_healthy(two_ranks, failed):
    """A Buffer failed by any exchange of its Comm (here: as by a host agreement that timed
    out, the runtime's own kernels never failed) frees its NVLink buffer without meeting the
    peers: the peer it would wait for may be gone (the GPU soak's stall recovery timed out in
    destroy before, 2026-12-07)."""
    from ep_comm.errors import CommTimeoutError
    nvl = two_ranks.nvl
    if failed:
        two_ranks.comm.mark_failed(CommTimeoutError(0, "agree", "an all-gather", 2.0, peer=1), {1})
    two_ranks.destroy()
    assert nvl.freed == [not failed]
