"""The names DeepEP's Python helpers import from its compiled module (``deep_ep._C`` in v2,
``deep_ep_cpp`` in v1), answered by ep_comm.

``bench/deepep_tests.sh`` runs DeepEP's own test helpers (``deep_ep/utils/*.py`` from a DeepEP
checkout) with a ``deep_ep/_C.py`` that re-exports this module. Names that stand for DeepEP's
NCCL-communicator plumbing have no ep_comm counterpart and raise ``NotImplementedError`` naming
themselves when called; importing them works, as the helpers only call them on request.
"""
from __future__ import annotations

from ep_comm.buffer import Buffer
from ep_comm.compat.event import EventHandle
from ep_comm.config import Config
from ep_comm.core.checks import topk_idx_t
from ep_comm.elastic import BUFFER_ALIGNMENT

is_sm90_compiled = Buffer.is_sm90_compiled
get_low_latency_rdma_size_hint = Buffer.get_low_latency_rdma_size_hint


def get_elastic_buffer_alignment() -> int:
    """Alignment of elastic buffer sizes (2 MiB, as DeepEP)."""
    return BUFFER_ALIGNMENT


def init_jit(*args, **kwargs) -> None:
    """DeepEP compiles its kernels here; ep_comm compiles its own when a Buffer first needs
    them, so there is nothing to set up."""
    del args, kwargs


def _communicator_call(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(
            f"deep_ep._C.{name} works on DeepEP's raw NCCL communicators; ep_comm takes a "
            "torch ProcessGroup instead (ep_comm.ElasticBuffer, "
            "ep_comm.elastic.get_physical_domain_size(group))")
    call.__name__ = name
    return call


get_local_nccl_unique_id = _communicator_call("get_local_nccl_unique_id")
create_nccl_comm = _communicator_call("create_nccl_comm")
destroy_nccl_comm = _communicator_call("destroy_nccl_comm")
get_physical_domain_size = _communicator_call("get_physical_domain_size")
get_logical_domain_size = _communicator_call("get_logical_domain_size")
calculate_elastic_buffer_size = _communicator_call("calculate_elastic_buffer_size")
create_cpu_handle = _communicator_call("create_cpu_handle")

__all__ = ["EventHandle", "Config", "topk_idx_t", "is_sm90_compiled",
           "get_low_latency_rdma_size_hint", "get_elastic_buffer_alignment", "init_jit",
           "get_local_nccl_unique_id", "create_nccl_comm", "destroy_nccl_comm",
           "get_physical_domain_size", "get_logical_domain_size",
           "calculate_elastic_buffer_size", "create_cpu_handle"]
