"""``EventHandle``: DeepEP's C++ event type (``deep_ep_cpp.EventHandle`` / ``deep_ep._C.EventHandle``).

Constructing one records a CUDA event on the current stream; ``current_stream_wait()`` makes the
then-current stream wait for it. ``EventOverlap(EventHandle())`` (Megatron-LM's fused all-to-all)
works with ``ep_comm.EventOverlap``: ``torch`` streams wait on it through ``wait(stream)``.
Without CUDA (the reference backend on CPU) work completes before returning, so the handle
holds no event and waiting does nothing.
"""
from __future__ import annotations

import torch

from ep_comm.event import EventOverlap as _BaseEventOverlap


class EventHandle:
    """A CUDA event recorded on the current stream when constructed (nothing without CUDA)."""

    __slots__ = ("event",)

    def __init__(self):
        self.event = None
        if torch.cuda.is_available():
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for the recorded work."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def wait(self, stream=None) -> None:
        """Make ``stream`` (default: current) wait; what ``torch.cuda.Stream.wait_event`` calls."""
        if self.event is not None:
            self.event.wait(stream if stream is not None else torch.cuda.current_stream())

    def synchronize(self) -> None:
        """Block the host until the recorded work is done."""
        if self.event is not None:
            self.event.synchronize()

    def query(self) -> bool:
        """True once the recorded work is done."""
        return self.event is None or self.event.query()

    def __repr__(self):
        return f"EventHandle(cuda_event={self.event is not None})"


class EventOverlap(_BaseEventOverlap):
    """``ep_comm.EventOverlap`` that also holds an ``EventHandle`` (DeepEP's
    ``EventOverlap(EventHandle())``): waiting goes through the handle, so it works without
    CUDA too."""

    def current_stream_wait(self) -> None:
        if isinstance(self.event, EventHandle):
            self.event.current_stream_wait()
        else:
            super().current_stream_wait()

    def synchronize(self) -> None:
        if isinstance(self.event, EventHandle):
            self.event.synchronize()
        else:
            super().synchronize()
