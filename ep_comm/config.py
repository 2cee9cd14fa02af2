"""Configuration of the normal-mode kernels and the size of communication buffers.

One source of truth for the sizes that host and device code must agree on: the kernels get
these numbers as launch arguments (see ``ep_comm.core.regions``), never from a copy of them.

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
import functools

from ep_comm.core import regions
from ep_comm.core.constants import (DEFAULT_NUM_SMS, INTER_DEFAULT_TOKENS, NVL_MAX_RANKS,
                                    NVL_RING_CHUNKS, NVL_WINDOW_TOKENS)


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
        rdma_buffer: DeepEP's fifth positional argument (its RDMA ring size). Accepted so that
            ``Config(sms, nvl_chunk, nvl_buffer, rdma_chunk, rdma_buffer)`` runs unchanged, and
            checked, but not stored: the internode kernels hold a whole batch in the
            ``num_rdma_bytes`` buffer (no ring).
    """

    num_sms: int = DEFAULT_NUM_SMS
    nvl_chunk: int = 8
    nvl_buffer: int = 32
    rdma_chunk: int = 16
    rdma_buffer: dataclasses.InitVar[int] = 128

    def __post_init__(self, rdma_buffer: int):
        if self.num_sms < 2 or self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be an even number >= 2, got {self.num_sms}")
        for name in ("nvl_chunk", "nvl_buffer", "rdma_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be positive, got {getattr(self, name)}")
        if self.nvl_buffer < self.nvl_chunk or rdma_buffer < self.rdma_chunk:
            raise ValueError(f"Config buffers must hold at least one chunk: {self}, "
                             f"rdma_buffer={rdma_buffer}")

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
        from ep_comm.core import regions
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
        from ep_comm.core import regions
        p = min(ranks_per_node, num_ranks)
        reg = regions.InternodeRegions(max(hidden_bytes // 2, 1), num_ranks, p, 0)
        return reg.bytes_for(num_max_tokens_per_rank)


@functools.lru_cache(maxsize=64)  # Config is frozen: one instance per argument set (a call
# without config= asked for a new one each time: ~2 us of a dispatch's host time)
def default_config(num_ranks: int, num_sms: int = DEFAULT_NUM_SMS,
                   hidden_bytes: int = 7168 * 2) -> Config:
    """The analytic configuration for ``num_ranks`` NVLink peers (see the module docstring).

    The NVLink window and ring depth do not depend on the rank count or the hidden size: the
    ring memory grows with both (``IntranodeRegions``), the time per window does not.
    """
    del num_ranks, hidden_bytes  # accepted for a stable signature; the formula needs neither
    return Config(num_sms=num_sms, nvl_chunk=NVL_WINDOW_TOKENS,
                  nvl_buffer=NVL_WINDOW_TOKENS * NVL_RING_CHUNKS, rdma_chunk=16)
