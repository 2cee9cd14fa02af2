"""EventOverlap: a CUDA event plus the tensors that must stay alive until it completes."""
from __future__ import annotations

import torch


class EventOverlap:
    """Completion of an asynchronous ep_comm operation.

    On CUDA it wraps a ``torch.cuda.Event`` recorded on the stream that ran the operation; on the
    CPU reference backend operations complete before returning and the event is empty.

    ``with event: body`` runs ``body`` overlapped with the operation, then makes the current
    stream wait for it.
    """

    def __init__(self, event: "torch.cuda.Event | None" = None, extra_tensors: tuple = ()):
        self.event = event
        # Tensors used by the operation: kept alive until the caller has waited.
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make torch's current CUDA stream wait for the event (no-op on CPU)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the event has completed."""
        if self.event is not None:
            self.event.synchronize()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.current_stream_wait()
        return False

    def __repr__(self):
        return f"EventOverlap(cuda_event={self.event is not None})"


def capture_event(device: torch.device) -> EventOverlap:
    """An EventOverlap recorded now on the current stream of ``device`` (empty on CPU)."""
    if device.type != "cuda":
        return EventOverlap()
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return EventOverlap(ev)
