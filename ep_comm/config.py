"""Configuration of the normal-mode kernels and the size of communication buffers.

One source of truth for the sizes that host and device code must agree on: the kernels get
these numbers as launch arguments (see ``ep_comm.regions``), never from a copy of them.

Why the defaults are what they are (no tuning tables keyed by rank count):

* ``num_sms``: normal-mode kernels use ``num_sms`` SMs, one channel per 2 SMs (a sender and a
  receiver block). 24 SMs move a 2-rank H200 dispatch at >300 GB/s in the peer-store
  measurements of HARDWARE.md (24 CTAs -> 310 GB/s) and leave 108 SMs to compute.
* ``nvl_chunk`` (tokens a sender writes before it publishes its tail, and the window a combine
  receiver reduces at once) is ``NVL_WINDOW_TOKENS`` = 24: a multiple of the warps of a block
  (24) and of every sender warp group (24 / R warps for R = 1, 2, 3, 4, 6, 8), so every warp
  moves the same number of tokens per window; at most 32 because a window is one warp ballot.
* ``nvl_buffer`` (ring size, in tokens, per channel and peer) holds ``NVL_RING_CHUNKS`` = 4
  windows: the sender runs up to 3 windows ahead of the receiver, which covers the ~2 us
  NVLink round trip of a head update at the per-channel rate (~25 GB/s x 2 us = 50 KB, about
  4 token rows of 14 KB: 3 windows of 24 are far more than that, so no bubble).
"""
from __future__ import annotations

import dataclasses

#: Token count granularity of the low-latency FP8 cast and of the FP8 tuple: one scale per 128 channels.
FP8_BLOCK = 128
#: Largest top-k the kernels support (topk ids and weights travel inside a token's slot).
MAX_TOPK = 16
#: Memory alignment of every region of a communication buffer (bytes): 16-byte vector stores.
REGION_ALIGN = 128
#: Ring depth of the normal-mode NVLink buffer, in chunks (see module docstring).
NVL_RING_CHUNKS = 4
#: Default SM budget of the normal-mode kernels.
DEFAULT_NUM_SMS = 24
#: Tokens per window of the NVLink kernels (see module docstring); at most 32 (one ballot).
NVL_WINDOW_TOKENS = 24
#: Most ranks in one NVLink domain that the intranode kernels support (control-word arrays).
NVL_MAX_RANKS = 8
#: Most channels (num_sms // 2) the intranode kernels support (control-word arrays).
NVL_MAX_CHANNELS = 64
#: Most local experts per rank in the intranode notify step (per-expert counts exchanged).
NVL_MAX_LOCAL_EXPERTS = 1024
#: Internode path (kernels/internode.cu): most nodes (checked on the host), most experts in
#: all (the notify counts rows), ranks per node at most NVL_MAX_RANKS.
INTER_MAX_NODES = 256
INTER_MAX_EXPERTS = 2048
#: Received rows per token of capacity the internode combine staging holds, at most R (see
#: ep_comm.regions.InternodeRegions): top-8 routing sends a token to 8 ranks at most.
INTER_ROWS_PER_TOKEN = 16
#: Arrival counters per node and tag parity of the internode kernels: a node's slots are
#: counted in at most this many chunks of ``Config.rdma_chunk`` or more slots, so a chunk is
#: forwarded (dispatch) or summed (combine) as soon as it has landed (kernels/internode.cu).
INTER_DISPATCH_CHUNKS = 64
#: Tokens per rank that ``get_rdma_buffer_size_hint`` sizes the internode buffer for.
INTER_DEFAULT_TOKENS = 4096


def align(n: int, a: int = REGION_ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return (n + a - 1) // a * a


def token_slot_bytes(hidden_bytes: int) -> int:
    """Bytes of one token's slot in a normal-mode ring buffer.

    A slot holds the payload (``hidden_bytes``: hidden * 2 for bf16, hidden for fp8), the fp8
    scales (one float32 per 128 channels of a bf16-sized payload, always reserved so that one
    buffer serves both payload kinds), ``MAX_TOPK`` top-k ids (int32) and weights (float32),
    and a 16-byte header (source token index, flags).
    """
    hidden = hidden_bytes // 2
    scales = (hidden + FP8_BLOCK - 1) // FP8_BLOCK * 4
    return align(hidden_bytes + scales + MAX_TOPK * 8 + 16, 16)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch configuration of a normal-mode dispatch or combine.

    Args:
        num_sms: SMs the kernel may occupy (even: one sender and one receiver block per channel).
        nvl_chunk: tokens a sender writes to a peer ring before publishing its tail.
        nvl_buffer: ring size in tokens per channel and peer (a multiple of ``nvl_chunk``).
        rdma_chunk: internode: fewest slots per arrival chunk (a node's slots are counted in
            chunks of ``max(rdma_chunk, capacity / INTER_DISPATCH_CHUNKS)``; a chunk is
            forwarded or summed once all of it has landed). The same on every rank of a call.
        rdma_buffer: kept for DeepEP's signature; the internode kernels hold a whole batch in
            the ``num_rdma_bytes`` buffer (no ring), so nothing reads it.
    """

    num_sms: int = DEFAULT_NUM_SMS
    nvl_chunk: int = 8
    nvl_buffer: int = 32
    rdma_chunk: int = 16
    rdma_buffer: int = 128

    def __post_init__(self):
        if self.num_sms < 2 or self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be an even number >= 2, got {self.num_sms}")
        for name in ("nvl_chunk", "nvl_buffer", "rdma_chunk", "rdma_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be positive, got {getattr(self, name)}")
        if self.nvl_buffer < self.nvl_chunk or self.rdma_buffer < self.rdma_chunk:
            raise ValueError(f"Config buffers must hold at least one chunk: {self}")

    @property
    def num_channels(self) -> int:
        """Channels: each channel is one sender and one receiver block."""
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer (``num_nvl_bytes``) this config needs for ``num_ranks`` local ranks.

        Args:
            hidden_bytes: bytes of one token row as sent: ``hidden * max(element_size, 2)``.
            num_ranks: ranks sharing NVLink (ranks per node).
        """
        from ep_comm import regions
        return regions.IntranodeRegions(self, hidden_bytes, num_ranks).total_bytes

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int,
                                  ranks_per_node: int = NVL_MAX_RANKS,
                                  num_max_tokens_per_rank: int = INTER_DEFAULT_TOKENS) -> int:
        """Bytes of RDMA buffer (``num_rdma_bytes``) for normal mode across nodes.

        Args:
            hidden_bytes: bytes of one token row as sent: ``hidden * max(element_size, 2)``.
            num_ranks: all ranks of the group.
            ranks_per_node: ranks per node (the nodes are ``num_ranks / ranks_per_node``).
            num_max_tokens_per_rank: most tokens one rank dispatches in one call.
        """
        from ep_comm import regions
        p = min(ranks_per_node, num_ranks)
        reg = regions.InternodeRegions(max(hidden_bytes // 2, 1), num_ranks, p, 0)
        return reg.bytes_for(num_max_tokens_per_rank)


def default_config(num_ranks: int, num_sms: int = DEFAULT_NUM_SMS,
                   hidden_bytes: int = 7168 * 2) -> Config:
    """The analytic configuration for ``num_ranks`` NVLink peers (see the module docstring).

    The NVLink window and ring depth do not depend on the rank count or the hidden size: the
    ring memory grows with both (``IntranodeRegions``), the time per window does not.
    """
    del num_ranks, hidden_bytes  # accepted for a stable signature; the formula needs neither
    return Config(num_sms=num_sms, nvl_chunk=NVL_WINDOW_TOKENS,
                  nvl_buffer=NVL_WINDOW_TOKENS * NVL_RING_CHUNKS, rdma_chunk=16, rdma_buffer=128)
