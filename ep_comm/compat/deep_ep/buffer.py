"""``deep_ep.buffer`` as ep_comm answers it: DeepEP v1's ``Buffer`` semantics on ep_comm.

One difference from ``ep_comm.Buffer`` is kept here rather than in the public Buffer, whose
contract (API.md) returns the top-k weights of a dispatch as sent: DeepEP v1 zeroes the weight
of every slot whose expert lives on another rank (``recv_topk_idx == -1``), so that a combine of
the weights gives back each token's own weights. Code written for DeepEP relies on that (its
tests compare the combined weights with the originals), so this ``Buffer`` does the same.
"""
from __future__ import annotations

from ep_comm.buffer import Buffer as _EpCommBuffer
from ep_comm.compat.event import EventHandle, EventOverlap
from ep_comm.config import Config

EP_COMM_ALIAS = True


class Buffer(_EpCommBuffer):
    """``ep_comm.Buffer`` with DeepEP v1's dispatch weights (see the module docstring)."""

    def dispatch(self, *args, **kwargs):
        recv_x, recv_idx, recv_w, counts, handle, event = super().dispatch(*args, **kwargs)
        if recv_w is not None and recv_idx is not None:
            # in place on the fresh output: slots of experts elsewhere weigh 0, as in DeepEP
            recv_w.masked_fill_(recv_idx < 0, 0.0)
        return recv_x, recv_idx, recv_w, counts, handle, event

    def internode_dispatch(self, *args, **kwargs):
        out = super().internode_dispatch(*args, **kwargs)
        recv_idx, recv_w = out[1], out[2]
        if recv_w is not None and recv_idx is not None:
            recv_w.masked_fill_(recv_idx < 0, 0.0)
        return out


__all__ = ["Buffer", "EventHandle", "EventOverlap", "Config"]
