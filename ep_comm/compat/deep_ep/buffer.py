"""``deep_ep.buffer`` as ep_comm answers it: DeepEP v1's ``Buffer`` semantics on ep_comm.

One difference from ``ep_comm.Buffer`` is kept here rather than in the public Buffer, whose
contract (API.md) returns the top-k weights of a dispatch as sent: DeepEP v1 zeroes the weight
of every slot whose expert lives on another rank (``recv_topk_idx == -1``), so that a combine of
the weights gives back each token's own weights. Code written for DeepEP relies on that (its
tests compare the combined weights with the originals), so this ``Buffer`` does the same.
"""
from __future__ import annotations

import torch

from ep_comm.buffer import Buffer as _EpCommBuffer
from ep_comm.compat.event import EventHandle, EventOverlap
from ep_comm.config import Config

EP_COMM_ALIAS = True


class Buffer(_EpCommBuffer):
    """``ep_comm.Buffer`` with DeepEP v1's dispatch weights (see the module docstring)."""

    def dispatch(self, *args, **kwargs):
        recv_x, recv_idx, recv_w, counts, handle, event = super().dispatch(*args, **kwargs)
        event = self._zero_weights_elsewhere(recv_idx, recv_w, event)
        return recv_x, recv_idx, recv_w, counts, handle, event

    # internode_dispatch needs no override: ep_comm.Buffer's calls self.dispatch, this one.

    def _zero_weights_elsewhere(self, recv_idx, recv_w, event):
        """Slots of experts elsewhere (``recv_idx < 0``) weigh 0, in place on the fresh output
        ``recv_w [N, K]`` float32. Returns the event the caller waits on.

        With ``async_finish`` the dispatch is still running on the communication stream when it
        returns: zeroing on the caller's stream would race with the kernel writing ``recv_w``
        (the kernel could write after the zeroing; DeepEP's async test caught it). The zeroing
        then goes on the communication stream, after the dispatch, and the returned event is
        recorded after it."""
        if recv_w is None or recv_idx is None:
            return event
        if getattr(event, "event", None) is None:  # finished in the caller's stream order
            recv_w.masked_fill_(recv_idx < 0, 0.0)
            return event
        stream = self.get_comm_stream()
        with torch.cuda.stream(stream):
            recv_w.masked_fill_(recv_idx < 0, 0.0)
        done = torch.cuda.Event()
        done.record(stream)
        return type(event)(done, extra_tensors=event.extra_tensors)


__all__ = ["Buffer", "EventHandle", "EventOverlap", "Config"]
