"""The one decoder of the host status words that every kernel family writes.

Each runtime owns a host-mapped int32 status word (``ep_comm.runtime.ipc.HostStatus``). The
first block of a kernel that gives up (a bounded wait timed out, too many rows arrived) claims
it, writes the fields, then the code, with system fences between, so a host that sees the code
sees the fields. The host reads it without synchronising (it is host memory).

Layouts (the device side: ``kernels/cuda/intranode_common.cuh`` and ``low_latency_common.cuh``;
codes and phases: ``ep_comm.core.constants``):

* normal mode, NVLink and internode (``NVLINK``, ``INTERNODE``): ``[0]`` code, ``[1]`` phase,
  ``[2]`` peer rank, ``[3]`` channel (-1: none), ``[4]`` value seen (an NVLink ring wait:
  -1 when the word carries another kernel's tag, i.e. another call or row layout), ``[5]``
  value wanted;
  ``[8]`` the received row count and from ``[16]`` the per-expert counts (notify's results,
  not errors). ``STATUS_DISAGREE`` (the NVLink notify kernel refused a call whose ranks
  disagree, or one whose rank had a bad input): ``[2]`` the first rank that differs, ``[3]``
  the index of the first differing word of the call signature (``CALL_SIG_FIELDS``; -1: a
  bad input only), ``[4]`` that rank's value, ``[5]`` this rank's; from
  ``[NVL_INFO_CALL_SIGS]`` every rank's signature words (``call_sigs``), from which the error
  is the one ``ep_comm.core.agreement`` raises on the reference backend. The internode notify
  kernel reports the same way when every rank ran it (``INTERNODE``, phase notify).
  ``STATUS_DISAGREE_TAG`` (internode only: a rank ran another kernel, or another call's
  dispatch / combine kernel, at this point; the barrier and notify flags carry each rank's
  call tag, ``agreement.ll_tag``): ``[1]`` phase (barrier or notify), ``[2]`` that rank,
  ``[3]`` what it ran (0: a notify, 1: a dispatch or combine kernel), ``[4]`` its call tag,
  ``[5]`` this rank's; decoded by ``agreement.ll_tag_error``.
  ``STATUS_DISAGREE_KERNEL`` (NVLink only: a rank a found that rank b announced another
  kernel, or the same kernel with another row layout, under its kernel's number, and every
  rank's waits stopped on that finding; ``kernels/cuda/intranode_common.cuh``, "kernel
  announcements"): ``[1]`` the phase this rank stopped in, ``[2]`` a, ``[3]`` b, ``[4]`` /
  ``[5]`` their kernel kind and row layout (``what``, ``constants.NVL_CTRL_ANNOUNCE``), ``[6]``
  / ``[7]`` their tags, from ``[NVL_INFO_OWN_KERNEL]`` this rank's own what and tag; decoded by
  ``nvl_kernel_mismatch``.
* low-latency (``LOW_LATENCY``): ``[0]`` code, ``[1]`` phase, ``[2]`` peer rank, ``[3]`` expert
  index, ``[4]`` what was awaited (0: a count word, 1: arrivals), ``[5]`` seen, ``[6]`` wanted.
  ``STATUS_DISAGREE`` (unless ``EP_COMM_LL_KERNEL_AGREEMENT=0``: a peer's count word carried
  another call's tag, ``agreement.ll_tag``): ``[2]`` that peer, ``[3]`` the expert, ``[4]`` the
  peer's tag, ``[5]`` this rank's; decoded by ``agreement.ll_tag_error``. From
  ``[LL_INFO_BAD_ID]`` (no code: the call went on): flag, token, column and value of a top-k
  entry outside [-1, num_experts) that the dispatch kernel found and did not send
  (``decode_bad_id``).
"""
from __future__ import annotations

import dataclasses

from ep_comm.core import agreement
from ep_comm.core.constants import (CALL_SIG_FIELDS, CALL_SIG_WORDS, LL_AWAIT_ACK,
                                    LL_AWAIT_COUNT, LL_INFO_BAD_ID, NVL_INFO_CALL_SIGS,
                                    NVL_INFO_NUM_RECV, PHASE_BARRIER, PHASE_COMBINE_RECV,
                                    PHASE_COMBINE_SEND, PHASE_DISPATCH_RECV, PHASE_DISPATCH_SEND,
                                    PHASE_LL_COMBINE_RECV, PHASE_LL_COMBINE_SEND,
                                    PHASE_LL_DISPATCH_RECV, PHASE_LL_DISPATCH_SEND, PHASE_NOTIFY,
                                    STATUS_DISAGREE, STATUS_DISAGREE_KERNEL, STATUS_DISAGREE_TAG,
                                    STATUS_NO_P2P, STATUS_OK, STATUS_OVERFLOW, STATUS_TIMEOUT,
                                    NVL_ANN_EXPAND_BIT, NVL_ANN_FP8_BIT, NVL_ANN_ROW_BITS,
                                    NVL_ANN_ROW_SHIFT, NVL_ANN_TOPK_BITS, NVL_ANN_TOPK_SHIFT,
                                    NVL_INFO_OWN_KERNEL, NVL_KERNEL_COMBINE, NVL_KERNEL_DISPATCH,
                                    NVL_KERNEL_NOTIFY, NVL_RING_SHAPE_BITS)
from ep_comm.errors import BackendUnavailableError, CollectiveMismatchError, CommTimeoutError, \
    EpCommError, InputError, KernelError


@dataclasses.dataclass(frozen=True)
class Family:
    """How one kernel family names its phases and what each phase waits for."""

    name: str
    phases: dict
    waited_for: dict


NVLINK = Family(
    "the NVLink kernels",
    {PHASE_NOTIFY: "dispatch/notify", PHASE_DISPATCH_SEND: "dispatch/send",
     PHASE_DISPATCH_RECV: "dispatch/receive", PHASE_COMBINE_SEND: "combine/send",
     PHASE_COMBINE_RECV: "combine/receive"},
    {PHASE_NOTIFY: "its token counts (the notify step of dispatch: did it call dispatch?)",
     PHASE_DISPATCH_SEND: "free ring slots or the final acknowledgement (the peer's dispatch "
                          "receiver)",
     PHASE_DISPATCH_RECV: "token slots (the peer's dispatch sender)",
     PHASE_COMBINE_SEND: "free ring slots or the final acknowledgement (the peer's combine "
                         "receiver)",
     PHASE_COMBINE_RECV: "expert output rows (the peer's combine sender)"},
)

#: NVLink phases whose waits read a ring's tail/head word (-1 seen: the word had another tag).
_NVL_RING_PHASES = (PHASE_DISPATCH_SEND, PHASE_DISPATCH_RECV, PHASE_COMBINE_SEND,
                    PHASE_COMBINE_RECV)

INTERNODE = Family(
    "the internode kernels",
    {**NVLINK.phases, PHASE_BARRIER: "barrier (start of an internode kernel)"},
    {**NVLINK.waited_for,
     PHASE_DISPATCH_RECV: "the tokens its proxy received from it (dispatch)",
     PHASE_COMBINE_RECV: "partial rows from the proxy of that rank's node (combine)",
     PHASE_BARRIER: "the start of the same kernel (did it make the same call?)"},
)

LOW_LATENCY = Family(
    "the low-latency kernels",
    {PHASE_LL_DISPATCH_RECV: "low_latency_dispatch/recv",
     PHASE_LL_COMBINE_RECV: "low_latency_combine/recv",
     PHASE_LL_DISPATCH_SEND: "low_latency_dispatch/send",
     PHASE_LL_COMBINE_SEND: "low_latency_combine/send"},
    {PHASE_LL_DISPATCH_RECV: "tokens for local expert {index}",
     PHASE_LL_COMBINE_RECV: "expert outputs of global expert {index}",
     PHASE_LL_DISPATCH_SEND: "its receive of this rank's previous dispatch on the same buffer "
                             "half",
     PHASE_LL_COMBINE_SEND: "its receive of this rank's previous combine on the same buffer "
                            "half"},
)


#: What each numbered NVLink kernel is, as the user called it (``NVL_KERNEL_*``).
NVL_KERNEL_NAMES = {
    NVL_KERNEL_NOTIFY: "dispatch from a layout (its count exchange)",
    NVL_KERNEL_DISPATCH: "dispatch (moving tokens: a cached dispatch, or a dispatch from a "
                         "layout after its count exchange)",
    NVL_KERNEL_COMBINE: "combine",
}


def kernel_what(what: int) -> dict:
    """The fields of an NVLink kernel's announcement (its low word, ``constants.NVL_ANN_*``):
    ``op`` (a ``NVL_KERNEL_*``), ``dtype`` ("fp8" when scales travel, else "bf16"), ``hidden``
    (elements of a row: 16-byte units times 16 for fp8, times 8 for bf16), ``num_topk`` and
    ``expand`` (0 or 1)."""
    what &= 0xFFFFFFFF
    fp8 = (what >> NVL_ANN_FP8_BIT) & 1
    row_int4 = (what >> NVL_ANN_ROW_SHIFT) & ((1 << NVL_ANN_ROW_BITS) - 1)
    return {"op": what & 3, "dtype": "fp8" if fp8 else "bf16",
            "hidden": row_int4 * (16 if fp8 else 8),
            "num_topk": (what >> NVL_ANN_TOPK_SHIFT) & ((1 << NVL_ANN_TOPK_BITS) - 1),
            "expand": (what >> NVL_ANN_EXPAND_BIT) & 1}


def nvl_kernel_mismatch(rank: int, a: int, b: int, where: str, what_a: int, what_b: int,
                        tag_a: int, tag_b: int, call: int,
                        own_tag: int | None = None) -> CollectiveMismatchError:
    """The error of the NVLink kernels' finding (``STATUS_DISAGREE_KERNEL``): rank ``a`` found
    that rank ``b`` runs another kernel, or the same kernel with another row layout, under the
    same kernel number, and every rank's kernels stopped on that finding.

    ``what_a`` / ``what_b``: the two announcements' low words (``kernel_what``); ``tag_a`` /
    ``tag_b``: the two tags (their upper bits hash the rest of the layout: channels, ring slots,
    experts per rank); ``where``: the phase this rank stopped in; ``call``: this rank's current
    call number; ``own_tag``: the tag of this rank's kernel that stopped, which puts a third rank
    beside a or b when it ran the same kernel (a later kernel, queued behind, never matches: its
    number differs). The field named is the first of op, dtype, hidden, num_topk, expand that
    differs, else ``layout``. The Buffer is failed: the kernels stopped in the middle of an
    exchange."""
    da, db = kernel_what(what_a), kernel_what(what_b)
    field = next((f for f in ("op", "dtype", "hidden", "num_topk", "expand") if da[f] != db[f]),
                 "layout")

    def shown(w: dict, tag: int):
        if field == "op":
            return NVL_KERNEL_NAMES.get(w["op"], f"kernel kind {w['op']}")
        if field == "layout":  # the tags' upper bits: the same call number, other layouts
            return f"layout hash {(tag & 0xFFFFFFFF) >> (32 - NVL_RING_SHAPE_BITS):#05x}"
        return w[field]

    def name(w: dict) -> str:
        return NVL_KERNEL_NAMES.get(w["op"], "kernel")
    group_a, group_b = [a], [b]
    if rank not in (a, b) and own_tag is not None:
        own = own_tag & 0xFFFFFFFF
        if own == tag_a & 0xFFFFFFFF:
            group_a.append(rank)
        elif own == tag_b & 0xFFFFFFFF:
            group_b.append(rank)
    values = {shown(da, tag_a): sorted(group_a), shown(db, tag_b): sorted(group_b)}
    if rank in (a, b):
        other, theirs, mine = (b, db, da) if rank == a else (a, da, db)
        found = (f"rank {other} runs its {name(theirs)} under the kernel number where this rank "
                 f"runs its {name(mine)}")
    else:
        found = (f"rank {a} runs its {name(da)} under the kernel number where rank {b} runs "
                 f"its {name(db)}")
    detail = (f"The NVLink kernels found it ({found}; the layouts differ in {field}); every "
              f"rank's kernels stopped at once (this rank in {where}). Nothing on the host "
              "waits for a cached dispatch or a combine, so the call that raises this may come "
              "after the refused one, whose outputs are undefined. ")
    return CollectiveMismatchError(rank, call, field, values, detail, usable=False)


def decode_status(words, family: Family, rank: int, limit_s: float,
                  node: int | None = None, call_sigs=None,
                  own_input: "agreement.BadInput | None" = None,
                  seq: int = 0) -> EpCommError | None:
    """The error a status word reports, or None when its code is 0.

    Args:
        words: the int32 words of the status (at least 6 for normal mode, 7 for low-latency).
        family: ``NVLINK``, ``INTERNODE`` or ``LOW_LATENCY``.
        rank: this rank (the one whose kernel reported).
        limit_s: the timeout the kernel ran with, in seconds.
        node: this rank's node, named in the error when the group spans nodes.
        call_sigs: with ``STATUS_DISAGREE``, the words from ``NVL_INFO_CALL_SIGS``: R rows of
            ``CALL_SIG_WORDS`` int32, rank r's signature of the refused call in row r.
        own_input: this rank's bad input in the refused call, if any (its ``InputError``
            text, which the words do not hold).
        seq: this rank's current call number (low-latency ``STATUS_DISAGREE`` and internode
            ``STATUS_DISAGREE_TAG``: unfolds the tags' call numbers; NVLink
            ``STATUS_DISAGREE_KERNEL``: the call number the error names).
    """
    code = int(words[0])
    if code == STATUS_OK:
        return None
    phase_id, peer = int(words[1]), int(words[2])
    phase = family.phases.get(phase_id, f"phase {phase_id}")
    if family is LOW_LATENCY:
        if code == STATUS_DISAGREE:
            thing = family.waited_for.get(phase_id, "a signal").format(index=int(words[3]))
            return agreement.ll_tag_error(rank, peer, f"{phase}, {thing}", int(words[4]),
                                          int(words[5]), seq)
        if code != STATUS_TIMEOUT:
            return KernelError(f"rank {rank}: low-latency kernel reported unknown status {code} "
                               f"(words {list(map(int, words[:8]))})")
        index, what, seen, wanted = (int(w) for w in words[3:7])
        thing = family.waited_for.get(phase_id, "a signal").format(index=index)
        if what == LL_AWAIT_ACK:
            waited = (f"the acknowledgement of {thing} (it has received {seen} of this rank's "
                      f"{wanted} earlier calls there; did it call the receive hook?)")
        elif what == LL_AWAIT_COUNT:
            waited = f"the count of {thing} (count word still {seen})"
        else:
            waited = f"{thing} ({seen} of {wanted} arrived)"
        return CommTimeoutError(rank, phase, waited, limit_s, peer, node)
    channel, seen, wanted = (int(w) for w in words[3:6])
    if code == STATUS_DISAGREE_KERNEL and family is NVLINK:  # [2] a, [3] b: the finding's ranks
        own = int(words[NVL_INFO_OWN_KERNEL + 1]) if len(words) > NVL_INFO_OWN_KERNEL + 1 else None
        return nvl_kernel_mismatch(rank, peer, channel, phase, seen, wanted, int(words[6]),
                                   int(words[7]), seq, own)
    if code == STATUS_DISAGREE_TAG and family is INTERNODE:
        runs = "a notify kernel (a dispatch from a layout)" if channel == 0 else \
            "a dispatch or combine kernel"
        note = (f"The internode kernels refused the call at {phase}: rank {peer} runs {runs} of "
                "another call there (the kernels compare the call tags their flags carry); "
                "nothing moved. ")
        return agreement.ll_tag_error(rank, peer, phase, seen, wanted, seq, note)
    if code == STATUS_TIMEOUT:
        where = f" on channel {channel}" if channel >= 0 else ""
        saw = f"saw {seen}"
        if family is NVLINK and phase_id in _NVL_RING_PHASES and seen == -1:
            # A ring word whose tag is not this kernel's: its call number and row layout
            # (kernels/cuda/intranode_common.cuh ring_shape) are hashed into the tag.
            saw = ("saw only a word of another kernel there: that rank has not started this "
                   "call, runs another call, or runs it with another row layout (hidden, "
                   "dtype, top-k or config differ)")
        return CommTimeoutError(
            rank, phase, f"{family.waited_for.get(phase_id, 'a signal')}{where} ({saw}, "
            f"wanted {wanted})", limit_s, peer, node)
    if code == STATUS_DISAGREE and call_sigs:
        n = len(call_sigs) // CALL_SIG_WORDS
        rows = {r: list(call_sigs[r * CALL_SIG_WORDS:(r + 1) * CALL_SIG_WORDS]) for r in range(n)}
        err = agreement.error_from_words(rank, rows, own_input)
        if err is not None:
            return err
    if code == STATUS_DISAGREE:  # no rows, or rows that agree: say what the kernel saw
        field = CALL_SIG_FIELDS[channel] if 0 <= channel < len(CALL_SIG_FIELDS) else "input"
        return EpCommError(f"rank {rank}: {family.name} refused the call: rank {peer} differs "
                           f"in {field} ({seen} there, {wanted} here)")
    if code == STATUS_OVERFLOW:
        return InputError(f"rank {rank} receives {seen} tokens, more than "
                          f"num_worst_tokens={wanted}")
    if code == STATUS_NO_P2P and family is INTERNODE:
        return BackendUnavailableError(
            "kernels", f"rank {rank}: rank {peer} of this node is not reachable with "
            "nvshmem_ptr (no NVLink/P2P mapping between the GPUs of one node)",
            "Check `python -m ep_comm.doctor` (P2P matrix) or set ranks_per_node to the ranks "
            "that share NVLink.")
    return EpCommError(f"{family.name} reported status {code} in {phase} (peer {peer})")


def read_normal_status(host_status, family: Family, rank: int, limit_s: float, num_ranks: int,
                       **kw) -> tuple[int, EpCommError | None]:
    """(status code, the error it reports or None) of a normal-mode runtime's host status words
    (``ipc.HostStatus``; no device sync): the first ``NVL_INFO_NUM_RECV`` words, and with
    ``STATUS_DISAGREE`` every rank's call signature (``num_ranks`` rows from
    ``NVL_INFO_CALL_SIGS``). ``kw``: ``decode_status``'s node, own_input, seq."""
    words = host_status.read(NVL_INFO_NUM_RECV)
    if not any(words):
        return STATUS_OK, None
    if words[0] == STATUS_DISAGREE_KERNEL:  # and this rank's own kernel, after the count
        words = host_status.read(NVL_INFO_OWN_KERNEL + 2)
    sigs = None
    if words[0] == STATUS_DISAGREE:
        sigs = host_status.read(NVL_INFO_CALL_SIGS + num_ranks * CALL_SIG_WORDS)[NVL_INFO_CALL_SIGS:]
    return words[0], decode_status(words, family, rank, limit_s, call_sigs=sigs, **kw)


def decode_bad_id(words) -> InputError | None:
    """The InputError of the low-latency dispatch kernel's per-call id check (words from
    ``LL_INFO_BAD_ID``: flag, token, column, value), or None when the flag is 0."""
    if len(words) < LL_INFO_BAD_ID + 4 or not words[LL_INFO_BAD_ID]:
        return None
    tok, col, val = (int(w) for w in words[LL_INFO_BAD_ID + 1:LL_INFO_BAD_ID + 4])
    return InputError(f"topk_idx[{tok}, {col}] = {val} (token {tok}) is outside "
                      f"[-1, num_experts): found on the device by low_latency_dispatch's kernel "
                      f"(the host reads ids on a shape's first call only), which did not send "
                      f"that entry")
