"""``deep_ep.buffer`` as ep_comm answers it (v1 kept ``Buffer`` and ``EventHandle`` here)."""
from ep_comm.buffer import Buffer
from ep_comm.compat.event import EventHandle, EventOverlap
from ep_comm.config import Config

EP_COMM_ALIAS = True

__all__ = ["Buffer", "EventHandle", "EventOverlap", "Config"]
