"""The GPU kernels backend: normal mode over NVLink (``ep_comm.backends.kernels.intranode``) or, when the group
spans several nodes, over NVSHMEM + NVLink (``ep_comm.backends.kernels.internode``), and low-latency mode over
NVSHMEM (``ep_comm.backends.kernels.low_latency``), behind the one Backend interface.

Each mode is a separate runtime that owns its memory; this class only routes calls, so a
Buffer that is not in low-latency mode never initialises NVSHMEM.
"""
from __future__ import annotations

import os

from ep_comm.backends.base import Backend
from ep_comm.core.agreement import AGREE_ENV
from ep_comm.runtime.comm import Comm
from ep_comm.errors import InputError


class KernelsBackend(Backend):
    name = "kernels"

    def __init__(self, comm: Comm, *, num_nvl_bytes: int, num_rdma_bytes: int,
                 low_latency_mode: bool, allow_nvlink_for_low_latency_mode: bool):
        self.comm = comm
        # EP_COMM_CHECK_AGREEMENT=1: every call agrees on the host first (fuses_agreement).
        self._agree_on_host = os.environ.get(AGREE_ENV) == "1"
        if comm.num_nodes > 1:
            from ep_comm.backends.kernels.internode import InternodeRuntime
            self.normal = InternodeRuntime(comm, num_rdma_bytes)
        else:
            from ep_comm.backends.kernels.intranode import IntranodeRuntime
            self.normal = IntranodeRuntime(comm, num_nvl_bytes)
            # Only the NVLink dispatch writes expanded rows; internode keeps ElasticBuffer's copy.
            self.expands_in_dispatch = True
        self.ll = None
        if low_latency_mode:
            from ep_comm.backends.kernels.low_latency import LowLatencyRuntime
            self.ll = LowLatencyRuntime(comm, num_rdma_bytes, allow_nvlink_for_low_latency_mode)

    def _ll(self):
        if self.ll is None:
            raise InputError("low-latency calls need a Buffer created with low_latency_mode=True")
        return self.ll

    # normal mode
    def get_dispatch_layout(self, topk_idx, num_experts):
        return self.normal.get_dispatch_layout(topk_idx, num_experts)

    def dispatch(self, x, x_scales, **kw):
        return self.normal.dispatch(x, x_scales, **kw)

    def combine(self, x, handle, topk_weights, biases, config):
        return self.normal.combine(x, handle, topk_weights, biases, config)

    def comm_stream(self):
        return self.normal.comm_stream()

    def min_nvl_bytes(self):
        nvl = getattr(self.normal, "nvl", None)  # the NVLink runtime's buffer (one node)
        return None if nvl is None else nvl.min_nbytes

    def fuses_agreement(self, op: str, waits_for_counts: bool) -> bool:
        """A dispatch from a layout on NVLink whose host waits for the counts: the notify
        kernel exchanges the signature with the counts and refuses a disagreeing call, and the
        host raises before the dispatch kernel is launched (``IntranodeRuntime.dispatch``).
        Every other call agrees on the host only with ``EP_COMM_CHECK_AGREEMENT=1``; and then
        every call does, this one too (the kernel checks as well): two ranks in different calls
        (one skipped a call) must meet in the same exchange, and a host exchange on one rank
        never meets a notify kernel on the other."""
        return (op == "dispatch" and waits_for_counts and not self._agree_on_host
                and getattr(self.normal, "carries_call_signature", False))

    # low-latency mode
    def low_latency_dispatch(self, *args, **kw):
        return self._ll().low_latency_dispatch(*args, **kw)

    def low_latency_combine(self, *args, **kw):
        return self._ll().low_latency_combine(*args, **kw)

    def get_next_low_latency_combine_buffer(self, handle):
        return self._ll().get_next_low_latency_combine_buffer(handle)

    def check_low_latency_send(self, kind, handle=None):
        ll = self.ll
        if ll is not None and ll.hooks_out:  # only a hook not yet called can make it fail
            ll.check_send(kind, handle)

    def layout_host_path(self):
        return self.normal.layout_host_path()

    def normal_host_path(self):
        return getattr(self.normal, "enable_host_path", lambda: None)()

    def ll_host_path(self):
        return self.ll.enable_host_path() if self.ll is not None else None

    def clean_low_latency_buffer(self, *args):
        return self._ll().clean_low_latency_buffer(*args)

    def mask_buffer(self):
        return self._ll().mask_buffer()

    def destroy(self):
        if self.ll is not None:
            self.ll.destroy()
            self.ll = None
        if self.normal is not None:
            self.normal.destroy()
            self.normal = None
