"""``Buffer.get_local_buffer_tensor``: this rank's communication buffer viewed as a tensor.

DeepEP returns a view of its NVLink buffer (or its RDMA buffer) so callers can stage data in it.
Here the NVLink buffer of the kernels backend is the CUDA IPC allocation of
``ep_comm.runtime.ipc.NvlBuffer``; it is wrapped without a copy through
``__cuda_array_interface__``. The reference backend has no communication buffer, and the
NVSHMEM (RDMA) buffer is not exposed: both raise ``BackendUnavailableError`` naming the case.
"""
from __future__ import annotations

import torch

from ep_comm.errors import BackendUnavailableError, InputError


class _RawBytes:
    """A device byte range in the CUDA array interface, for ``torch.as_tensor``."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3}


def local_buffer_tensor(buffer, dtype: torch.dtype, size=None, offset: int = 0,
                        use_rdma_buffer: bool = False) -> torch.Tensor:
    """View of ``buffer``'s local NVLink buffer from byte ``offset`` as ``dtype``.

    Args:
        buffer: an ``ep_comm.Buffer`` on the kernels backend.
        dtype: element type of the view.
        size: optional ``torch.Size``: the first ``size.numel()`` elements viewed as ``size``.
        offset: byte offset into the buffer (a multiple of the element size).
        use_rdma_buffer: DeepEP's RDMA buffer; not exposed by ep_comm (raises).

    Returns:
        [num_nvl_bytes - offset) // elem] 1-D tensor of ``dtype`` (or ``size``) sharing memory
        with the buffer: writes are visible to the kernels and to peers that map it.
    """
    if use_rdma_buffer:
        raise BackendUnavailableError(
            buffer.backend_name, "get_local_buffer_tensor(use_rdma_buffer=True): the NVSHMEM "
            "buffer is owned by the low-latency/internode runtime and not exposed as a tensor",
            "Use the NVLink buffer (use_rdma_buffer=False).")
    nvl = getattr(getattr(buffer.backend, "normal", None), "nvl", None)
    if nvl is None:
        raise BackendUnavailableError(
            buffer.backend_name, "this Buffer has no NVLink buffer to view (the reference "
            "backend moves data with collectives; the kernels backend needs num_nvl_bytes > 0)",
            "Create the Buffer with backend='kernels' and num_nvl_bytes > 0.")
    elem = torch.empty((), dtype=dtype).element_size()
    if not isinstance(offset, int) or offset < 0 or offset % elem or offset > nvl.nbytes:
        raise InputError(f"offset must be a multiple of {elem} in [0, {nvl.nbytes}], got {offset!r}")
    raw = torch.as_tensor(_RawBytes(nvl.local_ptr() + offset, nvl.nbytes - offset),
                          device=buffer.device)
    out = raw[: (raw.numel() // elem) * elem].view(dtype)
    if size is not None:
        size = torch.Size(size)
        if size.numel() > out.numel():
            raise InputError(f"size {tuple(size)} needs {size.numel()} elements, the buffer "
                             f"holds {out.numel()} from offset {offset}")
        out = out[: size.numel()].view(size)
    return out
