"""NVSHMEM for ep_comm: one bootstrap per process, symmetric buffers, kernel-module binding.

NVSHMEM is a process-wide singleton: one world (the ranks of one process group), one symmetric
heap. This module owns its life cycle so that every user (low-latency mode now, the internode
path later) goes through the same rules:

* ``acquire(comm, nbytes)`` initialises NVSHMEM on first use (unique id created on rank 0 and
  exchanged over the torch process group, or over an mpi4py communicator when the ``Comm``
  carries one as ``comm.mpi_comm``) and returns a ``SymmetricBuffer`` of at least ``nbytes``.
  Like ``nvshmem_malloc`` it is collective: every rank of the group calls it, in the same order.
* ``SymmetricBuffer.release()`` (a Buffer's ``destroy``) is local and never blocks: the memory
  goes back to a pool that later ``acquire`` calls reuse (smallest buffer that fits). Freeing
  symmetric memory is a collective with a barrier, and a destroy that waits for a rank that
  crashed would hang; the pool also spares each test or model re-creation a collective
  allocation. Decisions depend only on the sequence of sizes asked for, which is the same on
  every rank, so pooled reuse stays symmetric.
* ``bind_module(module)`` runs ``library_init`` for a compiled ``ep_comm.runtime.jit`` module once per
  NVSHMEM instance.
* ``finalize()`` (collective, explicit) frees the pool and finalizes NVSHMEM. It is not called
  at exit on purpose: ``nvshmem_finalize`` is a barrier, and an exit handler that waits for a
  dead peer turns a crash into a hang. NVSHMEM 3.x also reuses its first bootstrap on a
  re-init (NVIDIA/nvshmem#68), so a second world in one process is refused with an error
  instead of being silently wrong.

Heap size: NVSHMEM reserves ``NVSHMEM_SYMMETRIC_SIZE`` at init. If the variable is not set,
this module sets it to twice what the first buffer needs plus ``HEAP_SLACK_BYTES`` (at least
``MIN_HEAP_BYTES``); an allocation NVSHMEM refuses later raises an error that says which value
to set before the first Buffer is created.

GPU-only packages (cuda.core, nvshmem4py) are imported inside functions, so importing this
module works on a CPU-only machine.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading

import numpy as np

from ep_comm.core.constants import align
from ep_comm.errors import DOCTOR_HINT, BackendUnavailableError, EpCommError

#: Environment variable NVSHMEM reads for its symmetric heap size (bytes, or with K/M/G suffix).
HEAP_ENV = "NVSHMEM_SYMMETRIC_SIZE"
#: Headroom on top of the first request (signal words, a second small Buffer, NVSHMEM's own).
HEAP_SLACK_BYTES = 256 << 20
#: Smallest heap this module asks for (NVSHMEM's own default is 1 GiB): enough that a process
#: whose first Buffer is small (a test) can still create a decode-shape one later (2.8 GiB for
#: 128 tokens, hidden 7168, 256 experts, 2 ranks) without setting NVSHMEM_SYMMETRIC_SIZE.
MIN_HEAP_BYTES = 4 << 30
#: Alignment of every symmetric allocation (a cache line of L2 sectors; 16-byte vector access).
ALLOC_ALIGN = 1 << 12

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size written as NVSHMEM accepts it: ``"1073741824"``, ``"512M"``, ``"2G"``.

    Raises:
        EpCommError: the text is not such a size.
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if m is None:
        raise EpCommError(f"{HEAP_ENV}={text!r} is not a size (bytes, or a number with K/M/G)")
    value, unit = float(m.group(1)), m.group(2)
    return int(value * _SUFFIX[unit])


def heap_bytes_for(first_request: int, env_value: str | None) -> tuple[int, bool]:
    """The symmetric heap size to initialise NVSHMEM with, and whether it came from the user.

    Args:
        first_request: bytes of the first symmetric buffer asked for.
        env_value: ``NVSHMEM_SYMMETRIC_SIZE`` as set by the user, or None.
    """
    if env_value:
        return parse_size(env_value), True
    # Room for two buffers of the first size: a Buffer with allow_nvlink on and one with it off,
    # or a new Buffer created before the old one is destroyed, fit without growing the heap.
    want = 2 * first_request + HEAP_SLACK_BYTES
    return max(MIN_HEAP_BYTES, (want + (1 << 20) - 1) // (1 << 20) * (1 << 20)), False


def aligned(n: int, a: int = ALLOC_ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a`` (and at least ``a``: NVSHMEM refuses size 0)."""
    return max(a, align(n, a))


def pick_pooled(pool_sizes: list[int], nbytes: int) -> int | None:
    """Index of the smallest pooled buffer with at least ``nbytes`` (first on ties), or None.

    Deterministic, so every rank picks the same buffer from the same history.
    """
    best = None
    for i, size in enumerate(pool_sizes):
        if size >= nbytes and (best is None or size < pool_sizes[best]):
            best = i
    return best


@dataclasses.dataclass
class SymmetricBuffer:
    """A symmetric allocation of ``nbytes`` (same offset on every rank of the NVSHMEM world).

    Attributes:
        tensor: [nbytes] uint8 CUDA tensor on the symmetric heap (pass ``tensor.data_ptr() +
            offset`` to kernels; peers' copies are reached by NVSHMEM with the same pointer).
        nbytes: its size.
    """

    tensor: object
    nbytes: int
    _released: bool = False

    def release(self) -> None:
        """Give the memory back to the pool (local, never blocks). Idempotent."""
        if not self._released:
            self._released = True
            _STATE.pool.append(self)

    def view(self, offset: int, nbytes: int, dtype=None, shape=None):
        """A tensor over ``[offset, offset + nbytes)`` of this buffer, as ``dtype``/``shape``."""
        t = self.tensor[offset:offset + nbytes]
        if dtype is not None:
            t = t.view(dtype)
        if shape is not None:
            t = t.view(shape)
        return t


@dataclasses.dataclass
class _State:
    initialized: bool = False
    world: tuple[int, ...] | None = None     # global ranks of the group NVSHMEM was built on
    heap_bytes: int = 0
    allocated_bytes: int = 0                 # bytes of symmetric buffers allocated (pool + live)
    device: int | None = None
    pool: list[SymmetricBuffer] = dataclasses.field(default_factory=list)
    bound: dict[str, object] = dataclasses.field(default_factory=dict)  # cubin path -> module
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


_STATE = _State()


def _nvshmem():
    try:
        import nvshmem.core as nvshmem
    except ImportError as e:
        raise BackendUnavailableError(
            "kernels", f"nvshmem4py is not installed ({e}); low-latency mode needs it",
            "Install it with `pip install nvshmem4py-cu13` (ep_comm's [gpu] extra), or use "
            "backend='reference'.") from e
    return nvshmem


def _world_of(comm) -> tuple[int, ...]:
    import torch.distributed as dist
    return tuple(dist.get_global_rank(comm.group, r) for r in range(comm.num_ranks))


def is_initialized() -> bool:
    """Whether this process has an NVSHMEM world (made by ``acquire``)."""
    return _STATE.initialized


def _exchange_unique_id(comm, nvshmem):
    """Rank 0 of ``comm`` makes the unique id; every rank gets it. Bounded wait (Comm)."""
    import torch
    uid = nvshmem.get_unique_id(empty=comm.rank != 0)
    data = uid._data  # numpy array of the nvshmemx_uniqueid_t bytes (nvshmem4py 0.4)
    raw = np.frombuffer(data.tobytes(), dtype=np.uint8)
    mpi_comm = getattr(comm, "mpi_comm", None)
    if mpi_comm is not None:
        got = mpi_comm.bcast(raw.tobytes() if comm.rank == 0 else None, root=0)
        raw = np.frombuffer(got, dtype=np.uint8)
    else:
        mine = torch.from_numpy(raw.copy()).to(comm.device)
        every = torch.empty(comm.num_ranks * raw.size, dtype=torch.uint8, device=comm.device)
        comm.all_gather(every, mine, "nvshmem/bootstrap", "the NVSHMEM unique id of rank 0")
        raw = every[:raw.size].cpu().numpy()
    if comm.rank != 0:
        data[:] = np.frombuffer(raw.tobytes(), dtype=data.dtype).reshape(data.shape)
    return uid


def _init(comm, first_request: int) -> None:
    import torch
    nvshmem = _nvshmem()
    from ep_comm.runtime.jit import cuda_core
    heap, from_user = heap_bytes_for(first_request, os.environ.get(HEAP_ENV))
    if not from_user:
        os.environ[HEAP_ENV] = str(heap)
    device = torch.cuda.current_device()
    dev = cuda_core().Device(device)
    dev.set_current()
    uid = _exchange_unique_id(comm, nvshmem)
    try:
        nvshmem.init(device=dev, uid=uid, rank=comm.rank, nranks=comm.num_ranks,
                     initializer_method="uid")
    except Exception as e:
        raise BackendUnavailableError(
            "kernels", f"NVSHMEM failed to initialise on rank {comm.rank} of {comm.num_ranks} "
            f"(device {device}, {HEAP_ENV}={os.environ.get(HEAP_ENV)}): {e}",
            "Check that every rank creates the Buffer, that the GPUs see each other (P2P), "
            "or use backend='reference'.") from e
    _STATE.initialized = True
    _STATE.world = _world_of(comm)
    _STATE.heap_bytes = heap
    _STATE.device = device


def acquire(comm, nbytes: int) -> SymmetricBuffer:
    """A symmetric buffer of at least ``nbytes``, zero-filled, on every rank of ``comm``.

    Collective: every rank of ``comm`` calls it with the same ``nbytes``, in the same order.
    Initialises NVSHMEM on the first call. A pooled buffer is zeroed after a barrier
    (``_zero_reused``). The caller zeroes what must be zero and synchronises the ranks before
    peers may write into the buffer.

    Raises:
        BackendUnavailableError: NVSHMEM cannot start, or it already runs on another group.
        EpCommError: the symmetric heap is too small (names the variable to set).
    """
    need = aligned(nbytes)
    with _STATE.lock:
        if not _STATE.initialized:
            _init(comm, need)
        elif _STATE.world != _world_of(comm):
            raise BackendUnavailableError(
                "kernels", f"NVSHMEM already runs on ranks {list(_STATE.world)} in this process "
                f"and cannot serve a second group {list(_world_of(comm))} (NVSHMEM has one world "
                "per process)", "Create every low-latency Buffer of a process on the same group.")
        import torch
        if torch.cuda.current_device() != _STATE.device:
            raise EpCommError(f"NVSHMEM was initialised on cuda:{_STATE.device} but the current "
                              f"device is cuda:{torch.cuda.current_device()}")
        i = pick_pooled([b.nbytes for b in _STATE.pool], need)
        if i is not None:
            buf = _STATE.pool.pop(i)
            buf._released = False
            _zero_reused(comm, buf)
            return buf
        nvshmem = _nvshmem()
        try:
            tensor = nvshmem.tensor((need,), dtype=torch.uint8, except_on_del=False)
        except Exception as e:
            raise EpCommError(
                f"NVSHMEM could not allocate {need} symmetric bytes on rank {comm.rank} "
                f"({_STATE.allocated_bytes} bytes already allocated, heap {HEAP_ENV}="
                f"{_STATE.heap_bytes}): {e}. Set {HEAP_ENV}="
                f"{_STATE.allocated_bytes + need + HEAP_SLACK_BYTES} (or more) before the first "
                f"low-latency Buffer of the process is created. {DOCTOR_HINT}") from e
        tensor.zero_()
        _STATE.allocated_bytes += need
        return SymmetricBuffer(tensor, need)


def _zero_reused(comm, buf: SymmetricBuffer) -> None:
    """Zero a pooled buffer only once no rank can still write into it: its last owner's
    kernels on a peer (a send phase still queued there after a timeout here, or a peer slower
    to destroy its Buffer) write into this rank's copy until that peer's device is idle. So:
    every rank synchronises its device, a barrier (bounded, ``Comm.barrier``), then the zero.
    Every rank takes this branch for the same call (pool decisions follow the same history of
    sizes everywhere). The caller synchronises and meets the ranks again before peers may
    write into the new buffer (the runtimes' init barriers)."""
    import torch
    torch.cuda.synchronize()
    comm.barrier("nvshmem/reuse")
    buf.tensor.zero_()


def bind_module(module) -> None:
    """``library_init`` of an ``ep_comm.runtime.jit.CompiledModule`` once per NVSHMEM instance."""
    key = str(module.cubin_path)
    with _STATE.lock:
        if not _STATE.initialized:
            raise EpCommError("ep_comm internal: bind_module before NVSHMEM was initialised")
        if key not in _STATE.bound:
            module.init_nvshmem()
            _STATE.bound[key] = module


def barrier_all_on_stream(stream=None) -> None:
    """``nvshmem_barrier_all`` on a CUDA stream (torch's current stream by default)."""
    import torch
    _nvshmem().barrier_all(stream=stream or torch.cuda.current_stream())


def finalize() -> None:
    """Free every pooled symmetric buffer and finalize NVSHMEM (collective; see module doc).

    Raises:
        EpCommError: a buffer is still in use (destroy its Buffer first).
    """
    with _STATE.lock:
        if not _STATE.initialized:
            return
        nvshmem = _nvshmem()
        live = _STATE.allocated_bytes - sum(b.nbytes for b in _STATE.pool)
        if live:
            raise EpCommError(f"cannot finalize NVSHMEM: {live} symmetric bytes are still used "
                              "by a Buffer; destroy it first")
        for buf in _STATE.pool:
            nvshmem.free_tensor(buf.tensor)
        _STATE.pool.clear()
        for module in _STATE.bound.values():
            module.finalize_nvshmem()
        _STATE.bound.clear()
        nvshmem.finalize()
        _STATE.initialized = False
        _STATE.allocated_bytes = 0
