"""ep_comm: expert-parallel dispatch/combine for Mixture-of-Experts models.

Layers: this package is the public API (``Buffer``, ``Config``, handles, events, errors,
autograd); ``core`` (constants, buffer regions, FP8, routing, checks), ``backends`` (reference
and GPU kernels), ``runtime`` (compiler, IPC, NVSHMEM, process groups, launcher), ``moe``
(layer, GEMMs, cost model) and ``tools`` (doctor) sit below it.

``import ep_comm.compat.deep_ep as deep_ep`` runs code written for DeepEP v1's ``Buffer`` and
v2's ``ElasticBuffer`` (``ep_comm.compat``). GPU-only packages (cuda.core, nvshmem4py) are
imported lazily, so this imports on CPU-only machines.
"""
from ep_comm.buffer import Buffer
from ep_comm.core.checks import topk_idx_t
from ep_comm.config import Config
from ep_comm.elastic import ElasticBuffer, EPHandle
from ep_comm.errors import (BackendUnavailableError, BufferTooSmallError, CommTimeoutError,
                            EpCommError, InputError, KernelError)
from ep_comm.event import EventOverlap
from ep_comm.handles import DispatchHandle, LowLatencyHandle
from ep_comm.runtime.launcher import init_distributed

__version__ = "0.1.0"

__all__ = ["Buffer", "ElasticBuffer", "EPHandle", "Config", "EventOverlap", "DispatchHandle", "LowLatencyHandle", "topk_idx_t",
           "EpCommError", "InputError", "BufferTooSmallError", "BackendUnavailableError",
           "CommTimeoutError", "KernelError", "init_distributed"]
