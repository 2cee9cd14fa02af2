"""Where each piece of a communication buffer lives: the one layout host and kernels share.

A communication buffer (the NVLink buffer of normal mode, the NVSHMEM symmetric buffer of
low-latency and internode mode) is one flat allocation carved into named regions. The classes
below compute every region's byte offset and size from the sizes of the problem; the host
code passes those offsets to the kernels as arguments, so there is exactly one place where
the order and size of regions is written down.
"""
from __future__ import annotations

import dataclasses

from ep_comm.config import (FP8_BLOCK, MAX_TOPK, NVL_MAX_CHANNELS, NVL_MAX_LOCAL_EXPERTS,
                            NVL_MAX_RANKS, REGION_ALIGN, Config, align, token_slot_bytes)

#: int32 words of one notify counts row: T_s, [NVL_MAX_RANKS] per-rank, [L] per-expert counts.
NOTIFY_ROW = 1 + NVL_MAX_RANKS + NVL_MAX_LOCAL_EXPERTS


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

    * ``ctrl``: uint32 [4], local only: [0] sequence number of the last finished kernel (every
      communicating kernel uses ``ctrl[0] + 1`` as its tag and the last block to finish bumps
      it, so the tag lives on the device and CUDA-graph replays stay correct), [1] blocks of
      the running kernel that finished, [2] status claim (the first failing block sets it).
    * ``notify_flag``: uint32 [NVL_MAX_RANKS]: ``[s]`` = the tag of the notify in which rank s
      wrote its counts row here.
    * ``notify_counts``: int32 [NVL_MAX_RANKS, NOTIFY_ROW]: row s, written by rank s: its token
      count T_s, its tokens per destination rank [R], its tokens per expert of this rank [L].
    * ``tail``: uint64 [NVL_MAX_CHANNELS, NVL_MAX_RANKS]: ``[c, s]`` written by rank s: slots
      published into ring (c, s), as ``tag << 32 | done << 31 | count``.
    * ``head``: uint64 [NVL_MAX_CHANNELS, NVL_MAX_RANKS]: ``[c, d]`` written by rank d: slots
      rank d consumed from this rank's ring (c, this rank) in d's buffer, ``tag << 32 | count``.
    * ``ring``: [C, R, S] slots of ``slot_bytes``: ring (c, s) holds tokens (dispatch) or rows
      (combine) that rank s sends here through channel c. C = ``config.num_channels``,
      S = ``config.nvl_buffer``. Last, because its size depends on the call.

    A slot: a 16-byte header (int32 destination row, int32 source token index), the payload
    (``row_bytes``: hidden * 2 for bf16, hidden for fp8), the fp8 scales (float32 [hidden/128]),
    the top-k ids (int32 [MAX_TOPK]) and weights (float32 [MAX_TOPK]); see ``slot_offsets``.
    """

    def __init__(self, config: Config, hidden_bytes: int, num_ranks: int):
        super().__init__()
        c, r, s = config.num_channels, num_ranks, config.nvl_buffer
        self.num_channels, self.num_ranks, self.num_slots = c, r, s
        self.hidden_bytes = hidden_bytes
        self.slot_bytes = token_slot_bytes(hidden_bytes)
        self.claim("ctrl", 4 * 4)
        self.claim("notify_flag", NVL_MAX_RANKS * 4)
        self.claim("notify_counts", NVL_MAX_RANKS * NOTIFY_ROW * 4)
        self.claim("tail", NVL_MAX_CHANNELS * NVL_MAX_RANKS * 8)
        self.claim("head", NVL_MAX_CHANNELS * NVL_MAX_RANKS * 8)
        self.claim("ring", c * r * s * self.slot_bytes)

    def slot_offsets(self) -> dict[str, int]:
        """Byte offsets inside a slot: header, payload, scales, topk_idx, topk_weights.

        Sized for the bf16 payload (``hidden_bytes``); an fp8 payload (half of it) and its
        scales fit in the same places."""
        hidden = self.hidden_bytes // 2
        payload = 16
        scales = payload + self.hidden_bytes
        topk_idx = scales + align((hidden + FP8_BLOCK - 1) // FP8_BLOCK * 4, 16)
        topk_weights = topk_idx + MAX_TOPK * 4
        end = topk_weights + MAX_TOPK * 4
        assert end <= self.slot_bytes, (end, self.slot_bytes)
        return {"header": 0, "payload": payload, "scales": scales, "topk_idx": topk_idx,
                "topk_weights": topk_weights}


class InternodeRegions(Carver):
    """The NVSHMEM symmetric buffer of the internode (RDMA) leg of normal mode.

    Sized for ``num_ranks`` peers at most (a node count at most the rank count): rings of
    ``config.rdma_buffer`` slots per channel and source node, tail/head counters per ring.
    """

    def __init__(self, config: Config, hidden_bytes: int, num_ranks: int):
        super().__init__()
        c, n, s = config.num_channels, num_ranks, config.rdma_buffer
        self.slot_bytes = token_slot_bytes(hidden_bytes)
        self.claim("status", 16 * 4)
        self.claim("counts", n * (n + 1) * 4)
        self.claim("ring", c * n * s * self.slot_bytes)
        self.claim("tail", c * n * 8)
        self.claim("head", c * n * 8)


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

    Signal words come first, both halves together, so that ``signals_end`` bytes from the start
    hold every word that must be zero between calls (``clean_low_latency_buffer`` zeroes them;
    a complete call leaves them zero). For each half ``b`` (0 or 1):

    * ``dispatch_count{b}``: uint64 [L, R]: source rank s writes its token count for local
      expert e, plus one, into ``[e, s]`` (0 = not written yet).
    * ``dispatch_arrive{b}``: uint64 [L, R]: messages from s for e that have landed (each
      message adds 1 after its bytes, so count and arrivals together mean "all data here").
    * ``combine_count{b}``: uint64 [E]: rows the owner of global expert g sends back, plus one.
    * ``combine_arrive{b}``: uint64 [E]: rows of g that have landed.
    * ``combine_done{b}``: int32 [4], local: combine receive blocks that finished waiting (the
      last one resets the combine words of this half).

    and ``status_claim``: int32 [4], local: the first block that times out claims the host
    status word (see ``ep_comm.low_latency``).

    Data, for each half ``b``:

    * ``dispatch_send{b}``: M msgs: staging of this rank's tokens for NVSHMEM puts.
    * ``dispatch_recv{b}``: [L, R, M] msgs: slot ``[e, s, i]`` holds the i-th token (in token
      order) that source s sends to local expert e.
    * ``combine_send{b}``: [L, R * M, H] bf16: the zero-copy buffer of
      ``get_next_low_latency_combine_buffer``, and the staging of combine puts.
    * ``combine_recv{b}``: [E, M, H] bf16: row ``[g, t]`` is expert g's output for token t.

    A dispatch and its combine use the same half; consecutive dispatches alternate halves, so two
    results can be alive at once. Dispatch and combine regions never overlap: a peer's combine
    may land while this rank still reads the dispatch of the same half.
    """

    def __init__(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                 num_experts: int):
        super().__init__()
        m, r, e = num_max_dispatch_tokens_per_rank, num_ranks, num_experts
        local = e // r
        self.msg_bytes = low_latency_message_bytes(hidden)
        self.row_bytes = hidden * 2
        for b in (0, 1):
            self.claim(f"dispatch_count{b}", local * r * 8)
            self.claim(f"dispatch_arrive{b}", local * r * 8)
            self.claim(f"combine_count{b}", e * 8)
            self.claim(f"combine_arrive{b}", e * 8)
            self.claim(f"combine_done{b}", 4 * 4)
        self.claim("status_claim", 4 * 4)
        #: Bytes from offset 0 that hold every signal word (zero between calls).
        self.signals_end = self.total_bytes
        for b in (0, 1):
            self.claim(f"dispatch_send{b}", m * self.msg_bytes)
            self.claim(f"dispatch_recv{b}", local * r * m * self.msg_bytes)
            self.claim(f"combine_send{b}", local * r * m * self.row_bytes)
            self.claim(f"combine_recv{b}", e * m * self.row_bytes)


__all__ = ["Region", "Carver", "IntranodeRegions", "InternodeRegions", "LowLatencyRegions",
           "low_latency_message_bytes", "MAX_TOPK"]
