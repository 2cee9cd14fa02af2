"""The GPU kernels backend: normal mode over NVLink (``ep_comm.backends.kernels.intranode``) or, when the group
spans several nodes, over NVSHMEM + NVLink (``ep_comm.backends.kernels.internode``), and low-latency mode over
NVSHMEM (``ep_comm.backends.kernels.low_latency``), behind the one Backend interface.

Each mode is a separate runtime that owns its memory; this class only routes calls, so a
Buffer that is not in low-latency mode never initialises NVSHMEM.
"""
from __future__ import annotations

from ep_comm.backends.base import Backend
from ep_comm.runtime.comm import Comm
from ep_comm.errors import InputError


class KernelsBackend(Backend):
    name = "kernels"

    def __init__(self, comm: Comm, *, num_nvl_bytes: int, num_rdma_bytes: int,
                 low_latency_mode: bool, allow_nvlink_for_low_latency_mode: bool):
        self.comm = comm
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

    # low-latency mode
    def low_latency_dispatch(self, *args, **kw):
        return self._ll().low_latency_dispatch(*args, **kw)

    def low_latency_combine(self, *args, **kw):
        return self._ll().low_latency_combine(*args, **kw)

    def get_next_low_latency_combine_buffer(self, handle):
        return self._ll().get_next_low_latency_combine_buffer(handle)

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
