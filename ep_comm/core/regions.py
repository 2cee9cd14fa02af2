"""Where each piece of a communication buffer lives: the one layout host and kernels share.

A communication buffer (the NVLink buffer of normal mode, the NVSHMEM symmetric buffer of
low-latency and internode mode) is one flat allocation carved into named regions. The classes
below compute every region's byte offset and size from the sizes of the problem; the host
code passes those offsets to the kernels as arguments, so there is exactly one place where
the order and size of regions is written down.
"""
from __future__ import annotations

import dataclasses

from ep_comm.core.constants import (CALL_SIG_WORDS, FP8_BLOCK, INTER_DISPATCH_CHUNKS,
                                    INTER_MAX_EXPERTS, INTER_ROWS_PER_TOKEN, LL_DONE_WORDS,
                                    LL_MAX_EXPERTS, LL_MAX_RANKS, LL_PROGRESS_WORDS,
                                    NORMAL_MAX_TOPK, NVL_CTRL_WORDS, NVL_MAX_CHANNELS,
                                    NVL_MAX_RANKS, NVL_NOTIFY_ROW, REGION_ALIGN, align)
from ep_comm.errors import InputError

#: Top-k entries a normal-mode slot carries (the slot layouts below reserve this many).
MAX_TOPK = NORMAL_MAX_TOPK


def token_slot_bytes(hidden_bytes: int) -> int:
    """Bytes of one token's slot in a normal-mode ring buffer.

    A slot holds the payload (``hidden_bytes``: hidden * 2 for bf16, hidden for fp8), the fp8
    scales (one float32 per 128 channels of a bf16-sized payload, always reserved so that one
    buffer serves both payload kinds), ``NORMAL_MAX_TOPK`` top-k ids (int32), weights
    (float32) and expanded positions (int32), and a 16-byte header (source token index, flags).
    """
    hidden = hidden_bytes // 2
    scales = (hidden + FP8_BLOCK - 1) // FP8_BLOCK * 4
    return align(hidden_bytes + scales + NORMAL_MAX_TOPK * 12 + 16, 16)


@dataclasses.dataclass(frozen=True)
class Region:
    """A byte range of a buffer: ``[offset, offset + nbytes)``."""
    name: str
    offset: int
    nbytes: int


class Carver:
    """Claims regions one after the other, each aligned to ``REGION_ALIGN`` bytes."""

    def __init__(self):
        self.regions: dict[str, Region] = {}
        self._top = 0

    def claim(self, name: str, nbytes: int) -> Region:
        region = Region(name, self._top, nbytes)
        self.regions[name] = region
        self._top = align(self._top + nbytes, REGION_ALIGN)
        return region

    @property
    def total_bytes(self) -> int:
        return self._top

    def __getitem__(self, name: str) -> Region:
        return self.regions[name]


class IntranodeRegions(Carver):
    """The NVLink buffer of one rank in normal mode (peers write into it over NVLink).

    Control words come first and have fixed sizes (``NVL_MAX_RANKS``, ``NVL_MAX_CHANNELS``,
    ``NVL_MAX_LOCAL_EXPERTS``), so their offsets never move when hidden, the config or the
    payload kind changes between calls: a stale word is never read at a new place.

    * ``ctrl``: uint32 [NVL_CTRL_WORDS]: [0] sequence number of the last finished kernel (every
      communicating kernel uses ``ctrl[0] + 1`` as its tag, with the row layout hashed in for
      ring words (see ``tail``), and the last block to finish bumps it, so the tag lives on
      the device and CUDA-graph replays stay correct), [1] blocks of the running kernel that
      finished, [2] status claim (the first failing block sets it), [3] the stop word (set
      by any rank that found a peer in another kernel: every wait of every later kernel then
      stops), [4] claimed by the one wait of this rank that publishes its finding. From
      [NVL_CTRL_ANNOUNCE], uint64 [NVL_MAX_RANKS]: ``[s]`` written by rank s at the start of each
      numbered kernel, its tag and kind and row layout, so that a rank waiting in a kernel sees
      at once that a peer runs another one; from [NVL_CTRL_FINDING], uint64 [NVL_MAX_RANKS, 3]:
      ``[s]`` written by rank s when it found one (both ranks, both announcements)
      (``constants.NVL_CTRL_*``, ``kernels/cuda/intranode_common.cuh``).
    * ``notify_flag``: uint32 [NVL_MAX_RANKS]: ``[s]`` = 2 * the tag of the notify in which rank
      s wrote its counts row here, + 1 once it read every row of a refused call
      (``kernels/cuda/intranode.cu``, "Flags").
    * ``notify_counts``: int32 [NVL_MAX_RANKS, NVL_NOTIFY_ROW]: row s, written by rank s: its token
      count T_s, its tokens per destination rank [R], its tokens per expert of this rank [L].
    * ``tail``: uint64 [NVL_MAX_CHANNELS, NVL_MAX_RANKS]: ``[c, s]`` written by rank s: slots
      published into ring (c, s), as ``tag << 32 | done << 31 | count``. A dispatch or combine
      kernel's tag is its ``ctrl[0] + 1`` XOR a 12-bit hash of its row layout shifted to bits
      20..31 (``ring_shape`` / ``ring_tag`` in ``kernels/cuda/intranode_common.cuh``), so ranks
      that disagree on the layout never take each other's words.
    * ``head``: uint64 [NVL_MAX_CHANNELS, NVL_MAX_RANKS]: ``[c, d]`` written by rank d: slots
      rank d consumed from this rank's ring (c, this rank) in d's buffer, ``tag << 32 | count``.
    * ``ring``: [R] parts of ``ring_stride`` bytes, part s holding [C, S] slots of
      ``slot_bytes``: ring (c, s) holds tokens (dispatch) or rows (combine) that rank s sends
      here through channel c. C = ``config.num_channels``, S = ``config.nvl_buffer``. Last,
      because its size depends on the call. ``ring_stride`` is fixed for a Buffer (its
      ``num_nvl_bytes`` shared by the R parts), whatever the call's C, S and row size: a
      sender writes its first window before hearing from the receiver, which is safe only
      where nothing but its own drained rings can lie (kernels/cuda/intranode.cu, ring_of).

    A slot: a 16-byte header (int32 destination row, int32 source token index), the payload
    (``row_bytes``: hidden * 2 for bf16, hidden for fp8), the fp8 scales (float32 [hidden/128]),
    the top-k ids (int32 [MAX_TOPK]), weights (float32 [MAX_TOPK]) and expanded positions
    (int32 [MAX_TOPK]: for slot k, the index of this token among its source's tokens routed to
    expert k, in token order; sent only by an expanding dispatch); see ``slot_offsets``.
    """

    def __init__(self, config, hidden_bytes: int, num_ranks: int,
                 nvl_bytes: int | None = None):
        # config: an ep_comm.Config (only num_channels and nvl_buffer are read; not imported
        # here, so that the public Config can build regions without an import circle).
        # nvl_bytes: the Buffer's NVLink bytes, which fix ring_stride; None (the size hint):
        # the parts are as large as this call needs.
        super().__init__()
        c, r, s = config.num_channels, num_ranks, config.nvl_buffer
        self.num_channels, self.num_ranks, self.num_slots = c, r, s
        self.hidden_bytes = hidden_bytes
        self.slot_bytes = token_slot_bytes(hidden_bytes)
        self.claim("ctrl", NVL_CTRL_WORDS * 4)
        self.claim("notify_flag", NVL_MAX_RANKS * 4)
        self.claim("notify_counts", NVL_MAX_RANKS * NVL_NOTIFY_ROW * 4)
        self.claim("tail", NVL_MAX_CHANNELS * NVL_MAX_RANKS * 8)
        self.claim("head", NVL_MAX_CHANNELS * NVL_MAX_RANKS * 8)
        need = c * s * self.slot_bytes
        self.ring_stride = need
        if nvl_bytes is not None and r > 0:
            # the part each source gets of the buffer's ring area, in 16-byte units as the
            # slots (so a buffer of the size hint gives every part at least `need`); below
            # need, total_bytes is above nvl_bytes and the call is refused
            # (BufferTooSmallError), as before
            self.ring_stride = max(need, (nvl_bytes - self.total_bytes) // r // 16 * 16)
        self.claim("ring", r * self.ring_stride)

    def slot_offsets(self) -> dict[str, int]:
        """Byte offsets inside a slot: header, payload, scales, topk_idx, topk_weights, topk_pos.

        Sized for the bf16 payload (``hidden_bytes``); an fp8 payload (half of it) and its
        scales fit in the same places."""
        hidden = self.hidden_bytes // 2
        payload = 16
        scales = payload + self.hidden_bytes
        topk_idx = scales + align((hidden + FP8_BLOCK - 1) // FP8_BLOCK * 4, 16)
        topk_weights = topk_idx + MAX_TOPK * 4
        topk_pos = topk_weights + MAX_TOPK * 4
        end = topk_pos + MAX_TOPK * 4
        assert end <= self.slot_bytes, (end, self.slot_bytes)
        return {"header": 0, "payload": payload, "scales": scales, "topk_idx": topk_idx,
                "topk_weights": topk_weights, "topk_pos": topk_pos}


class InternodeRegions(Carver):
    """The NVSHMEM symmetric buffer of normal mode across nodes (kernels/internode.cu).

    R ranks = N nodes x P ranks per node, H = hidden. Control regions come first with sizes
    that depend on R, N and ``INTER_MAX_EXPERTS`` only, so they stay put when H changes:

    * ``ctrl``: uint32 [16], local: [0] kernel sequence number (tag = [0] + 1), [1] finished
      blocks, [2] status claim, [3] tag of the last barrier passed, [4] barrier failed, [5] tag
      of the last kernel refused at its barrier (a call that disagrees).
    * ``barrier``: uint64 [R]: ``[q]`` = the tag of the last kernel rank q started (barrier),
      with q's call tag in the upper 32 bits.
    * ``notify_flag``: uint64 [R]: ``[q]`` = 2 * the tag of the notify in which q wrote its
      row, + 1 once q refused that kernel; q's call tag in the upper 32 bits.
    * ``counts``: int32 [R, CALL_SIG_WORDS + R + N + INTER_MAX_EXPERTS]: row q, written by rank
      q: its call signature, its tokens per rank, per node, per expert.
    * ``dispatch_arrive``: uint64 [2, N, INTER_DISPATCH_CHUNKS]: slots landed here from source
      node n (this rank as a proxy), counted per chunk of ``chunk_slots`` consecutive slots, one
      set per tag parity.
    * ``combine_arrive``: uint64 [2, N, INTER_DISPATCH_CHUNKS]: partial rows landed here from
      node m (combine, this rank as a source), counted per chunk of slot positions, one set per
      tag parity.
    * ``dispatch_work``: uint64 [2]: local, per tag parity: the next work item of the running
      kernel (dispatch: (chunk, proxy, source node) forwarding items in chunk order; combine:
      runs of tokens to sum, in order).

    Then the data regions, sized by the token capacity ``cap`` (tokens one rank may send, so
    slots per node region) that fits in ``num_rdma_bytes``:

    * ``dispatch_recv``: [N, cap] slots: as a proxy, the tokens of source (n, my local index);
      in combine, the partial rows this rank sends back (staged for the put).
    * ``dispatch_stage``: [N, cap] slots: tokens staged for the put to node m; in combine, the
      partial rows that node m's proxy sends back for this rank's tokens.
    * ``combine_src``: [2, rows_cap] rows of ``row_c`` bytes: this rank's combine input (bf16
      row, then MAX_TOPK float32 weights) where the proxies of its node read it over NVLink.
      Two halves, taken by the parity of the combine's call number (``combine_src_offset``;
      the number is agreed by every rank): the host stages a combine's input before its kernel
      starts, and a same-node peer may still read the previous combine's input (no kernel
      between two combines proves that it has finished; one between them does, by its
      barrier, and two calls of one parity always have a numbered call, so a kernel, between
      them).
      ``rows_cap = min(R, INTER_ROWS_PER_TOKEN) * cap`` (a rank receives at most R rows per
      token slot of the others; top-k routing gives at most K on average).

    A slot (``slot_offsets``): int4 header (source token index), P int32 output rows, then the
    payload (bf16 or fp8), fp8 scales, top-k ids (int32) and weights (float32).
    """

    def __init__(self, hidden: int, num_ranks: int, ranks_per_node: int, num_rdma_bytes: int):
        super().__init__()
        r, p = num_ranks, ranks_per_node
        n = r // p
        self.hidden, self.num_ranks, self.ranks_per_node, self.num_nodes = hidden, r, p, n
        self.num_scales = (hidden + FP8_BLOCK - 1) // FP8_BLOCK
        self.header_bytes = align(16 + 4 * p, 16)
        self.slot_bytes = align(self.header_bytes + hidden * 2 + align(self.num_scales * 4, 16)
                                + 2 * MAX_TOPK * 4, 16)
        self.row_c = align(hidden * 2 + MAX_TOPK * 4, 16)
        self.row_ints = CALL_SIG_WORDS + r + n + INTER_MAX_EXPERTS
        self.claim("ctrl", 16 * 4)
        self.claim("barrier", r * 8)
        self.claim("notify_flag", r * 8)
        self.claim("counts", r * self.row_ints * 4)
        self.claim("dispatch_arrive", 2 * n * INTER_DISPATCH_CHUNKS * 8)
        self.claim("combine_arrive", 2 * n * INTER_DISPATCH_CHUNKS * 8)
        self.claim("dispatch_work", 2 * 8)
        self.control_bytes = self.total_bytes
        self.rows_per_token = min(r, INTER_ROWS_PER_TOKEN)
        unit = self.bytes_per_token()
        self.cap = max(0, (num_rdma_bytes - self.control_bytes - 3 * REGION_ALIGN) // unit)
        self.rows_cap = self.rows_per_token * self.cap
        self.claim("dispatch_recv", n * self.cap * self.slot_bytes)
        self.claim("dispatch_stage", n * self.cap * self.slot_bytes)
        self.claim("combine_src", 2 * self.rows_cap * self.row_c)

    def combine_src_offset(self, parity: int) -> int:
        """Byte offset of the ``combine_src`` half a combine of this ``parity`` (its call
        number; taken mod 2) stages its input in."""
        return self.regions["combine_src"].offset + (parity & 1) * self.rows_cap * self.row_c

    def chunk_slots(self, rdma_chunk: int) -> int:
        """Slots per arrival chunk: at least ``rdma_chunk`` (``Config.rdma_chunk``), and few
        enough chunks for INTER_DISPATCH_CHUNKS counters to cover the capacity (a buffer sized
        for far more tokens than sent forwards in coarser chunks)."""
        return max(rdma_chunk, -(-self.cap // INTER_DISPATCH_CHUNKS))

    def bytes_per_token(self) -> int:
        """Buffer bytes per token of capacity (two slots per node, the combine rows of both
        ``combine_src`` halves)."""
        return 2 * self.num_nodes * self.slot_bytes + 2 * self.rows_per_token * self.row_c

    def bytes_for(self, num_tokens: int) -> int:
        """``num_rdma_bytes`` that gives a capacity of ``num_tokens`` tokens per rank."""
        return self.control_bytes + 3 * REGION_ALIGN + num_tokens * self.bytes_per_token()

    def slot_offsets(self, elem_bytes: int, num_topk: int) -> dict[str, int]:
        """Byte offsets in a slot for a call: ``payload``, ``scales``, ``topk_idx``,
        ``topk_weights``, ``put_bytes`` (dispatch: bytes sent from the slot start);
        ``combine_weights`` and ``combine_put_bytes`` (combine: a bf16 row then the weights,
        bytes sent from ``payload``)."""
        payload = self.header_bytes
        scales = payload + self.hidden * elem_bytes
        idx = align(scales + self.num_scales * 4, 16)
        w = idx + MAX_TOPK * 4
        cw = align(payload + self.hidden * 2, 16)
        out = {"payload": payload, "scales": scales, "topk_idx": idx, "topk_weights": w,
               "put_bytes": align(w + num_topk * 4, 16), "combine_weights": cw,
               "combine_put_bytes": align(cw + num_topk * 4 - payload, 16)}
        assert out["put_bytes"] <= self.slot_bytes and cw + MAX_TOPK * 4 <= self.slot_bytes
        return out


def low_latency_message_bytes(hidden: int) -> int:
    """Bytes of one token message in low-latency dispatch: a 16-byte header (source token index)
    and the largest payload, bf16 (``hidden * 2``), which also holds fp8 + scales."""
    fp8 = hidden + hidden // FP8_BLOCK * 4
    return align(16 + max(hidden * 2, fp8), 16)


class LowLatencyRegions(Carver):
    """The NVSHMEM symmetric buffer of low-latency mode (identical on every rank).

    With E experts, R ranks, L = E / R local experts, M = ``num_max_dispatch_tokens_per_rank``,
    H = hidden, msg = ``low_latency_message_bytes(H)`` (16-byte header with the source token
    index, then the payload: H fp8 bytes and H / 128 float32 scales, or H bf16):

    ``status_claim`` comes first: int32 [4], local: the first block that times out claims the
    host status word (see ``ep_comm.backends.kernels.low_latency``). Then the signal words, both
    halves together, so that ``signals_end`` bytes from the start hold every word that must be
    zero between calls (``clean_low_latency_buffer`` zeroes them; a complete call leaves them
    zero). For each half ``b`` (0 or 1):

    * ``dispatch_count{b}``: uint64 [L, R] (of ``LL_MAX_EXPERTS`` words): source rank s writes
      its token count for local expert e, plus one, into ``[e, s]`` (0 = not written yet).
    * ``dispatch_arrive{b}``: uint64 [L, R] (of ``LL_MAX_EXPERTS``): messages from s for e that
      have landed (each message adds 1 after its bytes, so count and arrivals together mean
      "all data here").
    * ``combine_count{b}``: uint64 [E] (of ``LL_MAX_EXPERTS``): rows the owner of global expert g
      sends back, plus one.
    * ``combine_arrive{b}``: uint64 [E] (of ``LL_MAX_EXPERTS``): rows of g that have landed.
    * ``dispatch_done{b}`` / ``combine_done{b}``: int32 [``LL_DONE_WORDS``], local: block
      counters of a kernel on this half (``LL_DONE_*``: waits finished, the last block resets
      the combine words; sends finished, the last counts the send; receives finished, the last
      counts the receive and acknowledges it).
    * ``dispatch_progress{b}`` / ``combine_progress{b}``: uint64 [``LL_PROGRESS_WORDS``],
      local: sends made and receives completed on this kind and half.
    * ``dispatch_ack{b}`` / ``combine_ack{b}``: uint64 [``LL_MAX_RANKS``]: ``[s]`` = the
      receives of this kind on this half that rank s has completed (s writes it, once all its
      blocks have read the call's rows). A send waits until every unmasked destination's word
      reaches this rank's sends made before it on the kind and half: the destination has read
      the call this send would overwrite (receive hooks let a rank send two calls ahead of a
      peer's receive; see ``ep_comm.backends.kernels.low_latency``, "Reuse of a half").

    Every signal word has one place whatever M, hidden and E (L * R = E <= ``LL_MAX_EXPERTS``):
    a call of another shape never finds a word of another layout, and ranks that disagree on
    E meet in the same words, whose call tags name the disagreement.

    Data, for each half ``b``, inside that half's own area of ``half_bytes`` (from
    ``signals_end + b * half_bytes``):

    * ``dispatch_send{b}``: M msgs: staging of this rank's tokens for NVSHMEM puts.
    * ``dispatch_recv{b}``: [L, R, M] msgs: slot ``[e, s, i]`` holds the i-th token (in token
      order) that source s sends to local expert e.
    * ``combine_send{b}``: [L, R * M, H] bf16: the zero-copy buffer of
      ``get_next_low_latency_combine_buffer``, and the staging of combine puts.
    * ``combine_recv{b}``: [E, M, H] bf16: row ``[g, t]`` is expert g's output for token t.

    A dispatch and its combine use the same half; consecutive dispatches alternate halves, so two
    results can be alive at once. Dispatch and combine regions never overlap: a peer's combine
    may land while this rank still reads the dispatch of the same half.

    Why fixed half areas: with ``capacity`` (the Buffer's symmetric bytes, the same on every
    rank) each half's area is half of what follows the signal words, whatever M and hidden, so
    a call of one shape on half b never writes where the previous call (another shape, on the
    other half) is still read; carved back to back per shape, half 1 of a larger shape would
    overlap half 0 of a smaller one. Without ``capacity`` the areas are exactly what the shape
    needs (``total_bytes`` is then the size hint).
    """

    def __init__(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                 num_experts: int, capacity: int | None = None):
        super().__init__()
        m, r, e = num_max_dispatch_tokens_per_rank, num_ranks, num_experts
        local = e // r
        self.msg_bytes = low_latency_message_bytes(hidden)
        self.row_bytes = hidden * 2
        self.claim("status_claim", 4 * 4)
        if e > LL_MAX_EXPERTS:
            raise InputError(f"low-latency mode supports at most {LL_MAX_EXPERTS} experts, "
                             f"got num_experts={e}")
        for b in (0, 1):
            self.claim(f"dispatch_count{b}", LL_MAX_EXPERTS * 8)
            self.claim(f"dispatch_arrive{b}", LL_MAX_EXPERTS * 8)
            self.claim(f"combine_count{b}", LL_MAX_EXPERTS * 8)
            self.claim(f"combine_arrive{b}", LL_MAX_EXPERTS * 8)
            for kind in ("dispatch", "combine"):
                self.claim(f"{kind}_done{b}", LL_DONE_WORDS * 4)
                self.claim(f"{kind}_progress{b}", LL_PROGRESS_WORDS * 8)
                self.claim(f"{kind}_ack{b}", LL_MAX_RANKS * 8)
        #: Bytes from offset 0 that hold every signal word (zero between calls).
        self.signals_end = self.total_bytes
        data = (("dispatch_send", m * self.msg_bytes),
                ("dispatch_recv", local * r * m * self.msg_bytes),
                ("combine_send", local * r * m * self.row_bytes),
                ("combine_recv", e * m * self.row_bytes))
        #: Bytes one half's data needs for this shape.
        self.half_need = sum(align(n, REGION_ALIGN) for _, n in data)
        room = 0 if capacity is None else (capacity - self.signals_end) // 2
        #: Bytes of each half's area (the need, or half the capacity's data room if larger).
        self.half_bytes = max(self.half_need, room // REGION_ALIGN * REGION_ALIGN)
        for b in (0, 1):
            self._top = self.signals_end + b * self.half_bytes
            for name, nbytes in data:
                self.claim(f"{name}{b}", nbytes)
        self._top = self.signals_end + 2 * self.half_bytes


__all__ = ["Region", "Carver", "IntranodeRegions", "InternodeRegions", "LowLatencyRegions",
           "low_latency_message_bytes", "token_slot_bytes"]
