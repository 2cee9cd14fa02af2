"""Start-up for multi-process runs: one call that works under torchrun and under mpirun.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) it initialises torch.distributed
from the environment; under mpirun it builds the group from ``mpi4py.MPI.COMM_WORLD``. Each
process takes the GPU of its local rank when CUDA is available (NCCL), else runs on CPU (gloo).
With ``EP_COMM_GLOO_DEVICE=cuda`` the group is gloo even on GPUs (ranks may then share a GPU,
which NCCL refuses: ``ep_comm.runtime.comm.GLOO_DEVICE_ENV``).

    from ep_comm.runtime.launcher import init_distributed
    group = init_distributed()
    buffer = ep_comm.Buffer(group, num_nvl_bytes=...)
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ep_comm.runtime.comm import GLOO_DEVICE_ENV

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


def launched_by() -> str:
    """``"torchrun"``, ``"mpirun"`` or ``"single"`` (one plain process)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if any(v in os.environ for v in MPI_RANK_VARS):
        return "mpirun"
    return "single"


def init_distributed(backend: str | None = None, use_gpu: bool | None = None):
    """Initialise torch.distributed for this process and return the world group.

    Args:
        backend: torch.distributed backend; default NCCL with GPUs, gloo without.
        use_gpu: force GPU use on or off; default: CUDA available.
    """
    if dist.is_initialized():
        return dist.group.WORLD
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    gloo_on_gpu = use_gpu and os.environ.get(GLOO_DEVICE_ENV) == "cuda"
    how = launched_by()
    if how == "mpirun":
        from mpi4py import MPI
        from ep_comm.runtime.comm import group_from_mpi
        return group_from_mpi(MPI.COMM_WORLD, use_gpu=use_gpu)
    if how == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = backend or ("nccl" if use_gpu and not gloo_on_gpu else "gloo")
    kwargs = {}
    if use_gpu:
        local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        torch.cuda.set_device(local % torch.cuda.device_count())
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **kwargs)
    return dist.group.WORLD
