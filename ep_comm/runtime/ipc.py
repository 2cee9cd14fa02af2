"""NVLink buffers shared by the local ranks through CUDA IPC, and host-mapped status memory.

``NvlBuffer(comm, nbytes)`` allocates ``nbytes`` of device memory on this rank with
``cudaMalloc`` (outside torch's caching allocator, so ``free()`` really returns it), zeroes it,
exports a ``cudaIpcMemHandle_t``, gathers every local rank's handle over the process group and
opens the peers' handles. ``peer_ptrs`` is then the address of every rank's buffer as seen from
this GPU (this rank's own included), and ``peer_ptrs_dev`` the same as an int64 device tensor
that kernels index by rank.

``HostStatus(nwords)`` is pinned host memory mapped into the device address space: kernels
write status words into it and the host reads them without a device synchronisation.

cuda.bindings is imported inside the functions so that ``import ep_comm`` works without it.
"""
from __future__ import annotations

import ctypes

import torch

from ep_comm.errors import BackendUnavailableError

#: Bytes of a cudaIpcMemHandle_t.
IPC_HANDLE_BYTES = 64
# cudaIpcMemLazyEnablePeerAccess, cudaHostAllocPortable | cudaHostAllocMapped (driver_types.h).
_IPC_LAZY_PEER_ACCESS = 1
_HOST_ALLOC_PORTABLE_MAPPED = 1 | 2


def _rt():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as e:
            raise BackendUnavailableError(
                "kernels", "cuda.bindings (cuda-python) is not installed, so NVLink buffers "
                "cannot be shared with CUDA IPC", "pip install cuda-bindings, or use "
                "backend='reference'.") from e
    return runtime


def check(result, what: str):
    """Unpack a cuda.bindings ``(err, *values)`` result; raise with ``what`` on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(getattr(err, "value", err)) != 0:
        rt = _rt()
        _, name = rt.cudaGetErrorName(err)
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise BackendUnavailableError("kernels", f"{what} failed with {name}",
                                      "Check that the local GPUs can reach each other over "
                                      "NVLink/P2P (nvidia-smi topo -m), or use "
                                      "backend='reference'.")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def use_device(index: int) -> None:
    """Make ``index`` current for cuda.bindings' runtime too: it keeps its own notion of the
    current device, which need not follow ``torch.cuda.set_device``."""
    check(_rt().cudaSetDevice(index), f"cudaSetDevice({index})")


def _handle_bytes(handle) -> bytes:
    """The 64 raw bytes of a cudaIpcMemHandle_t (read through its C struct address)."""
    return ctypes.string_at(int(handle.getPtr()), IPC_HANDLE_BYTES)


def _handle_from_bytes(raw: bytes):
    handle = _rt().cudaIpcMemHandle_t()
    ctypes.memmove(int(handle.getPtr()), raw, IPC_HANDLE_BYTES)
    return handle


class NvlBuffer:
    """One rank's NVLink buffer, mapped on every local rank (see the module docstring).

    Attributes:
        nbytes: bytes per rank.
        min_nbytes: the smallest ``nbytes`` of the ranks (exchanged with the IPC handles): what
            a layout every rank must compute alike is sized by (the rings' per-source stride).
        peer_ptrs: list of R ints, the device address of rank r's buffer on this GPU.
        peer_ptrs_dev: [R] int64 device tensor of the same addresses.
    """

    def __init__(self, comm, nbytes: int):
        rt = _rt()
        self.comm, self.nbytes = comm, nbytes
        self.rank, self.num_ranks = comm.rank, comm.num_ranks
        self._local = 0
        self._opened: list[int] = []
        dev = comm.device
        self.device_index = dev.index if dev.index is not None else torch.cuda.current_device()
        use_device(self.device_index)
        self._local = int(check(rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
        check(rt.cudaMemset(self._local, 0, max(nbytes, 1)), "cudaMemset of the NVLink buffer")
        check(rt.cudaDeviceSynchronize(), "zeroing the NVLink buffer")
        ptrs = [0] * self.num_ranks
        ptrs[self.rank] = self._local
        self.min_nbytes = nbytes
        if self.num_ranks > 1:
            raw = _handle_bytes(check(rt.cudaIpcGetMemHandle(self._local), "cudaIpcGetMemHandle"))
            # each rank's handle, then its nbytes (8 bytes, little-endian)
            row = IPC_HANDLE_BYTES + 8
            mine = torch.frombuffer(bytearray(raw + int(nbytes).to_bytes(8, "little")),
                                    dtype=torch.uint8).to(dev)
            every = torch.empty(self.num_ranks * row, dtype=torch.uint8, device=dev)
            comm.all_gather(every, mine, "buffer/ipc", "CUDA IPC handles")
            every = every.cpu().view(self.num_ranks, row)
            self.min_nbytes = min(int.from_bytes(bytes(every[p, IPC_HANDLE_BYTES:].tolist()),
                                                 "little") for p in range(self.num_ranks))
            every = every[:, :IPC_HANDLE_BYTES]
            for p in range(self.num_ranks):
                if p == self.rank:
                    continue
                handle = _handle_from_bytes(bytes(every[p].tolist()))
                ptr = int(check(rt.cudaIpcOpenMemHandle(handle, _IPC_LAZY_PEER_ACCESS),
                                f"cudaIpcOpenMemHandle of rank {p}'s NVLink buffer"))
                self._opened.append(ptr)
                ptrs[p] = ptr
        self.peer_ptrs = ptrs
        self.peer_ptrs_dev = torch.tensor(ptrs, dtype=torch.int64, device=dev)

    @property
    def local_ptr(self) -> int:
        return self._local

    def free(self, synchronize_peers: bool = True) -> None:
        """Unmap the peers' buffers and free this one. With ``synchronize_peers``, the ranks
        meet (bounded) before the free, so no peer still maps it; a Buffer whose peer is
        gone (after a timeout) frees without meeting."""
        rt = _rt()
        if not self._local:
            return
        use_device(self.device_index)
        check(rt.cudaDeviceSynchronize(), "synchronising before freeing the NVLink buffer")
        for ptr in self._opened:
            check(rt.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")
        self._opened = []
        if synchronize_peers and self.num_ranks > 1:
            self.comm.barrier("buffer/destroy")
        check(rt.cudaFree(self._local), "cudaFree of the NVLink buffer")
        self._local = 0
        self.peer_ptrs_dev = None


class HostStatus:
    """``nwords`` int32 of pinned host memory that kernels write through ``device_ptr``."""

    def __init__(self, nwords: int, device_index: int):
        rt = _rt()
        use_device(device_index)
        self.nwords = nwords
        self._host = int(check(rt.cudaHostAlloc(nwords * 4, _HOST_ALLOC_PORTABLE_MAPPED),
                               "cudaHostAlloc of the status word"))
        ctypes.memset(self._host, 0, nwords * 4)
        self.device_ptr = int(check(rt.cudaHostGetDevicePointer(self._host, 0),
                                    "cudaHostGetDevicePointer"))
        self._view = (ctypes.c_int32 * nwords).from_address(self._host)

    @property
    def host_ptr(self) -> int:
        """The words' host address (what the C++ host path reads; 0 after ``free``)."""
        return self._host

    def read(self, n: int | None = None) -> list[int]:
        """The first ``n`` words (all by default) as the host sees them now (no device
        synchronisation). Reading only the words needed keeps a per-call check cheap."""
        if not self._host:
            raise RuntimeError("ep_comm internal: HostStatus read after free()")
        return self._view[:self.nwords if n is None else n]

    def clear(self, start: int = 0) -> None:
        """Zero the words from ``start`` on (all by default)."""
        ctypes.memset(self._host + start * 4, 0, (self.nwords - start) * 4)

    def free(self) -> None:
        if self._host:
            self._view = None
            check(_rt().cudaFreeHost(self._host), "cudaFreeHost of the status word")
            self._host = 0
