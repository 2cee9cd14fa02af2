"""Process-group plumbing: ranks, nodes, bounded waits on torch.distributed work.

A ``Comm`` wraps the torch ``ProcessGroup`` that a Buffer was built on (or one made from an
mpi4py communicator) and knows the node layout. Every wait it does is bounded by
``EP_COMM_TIMEOUT_S`` and ends in a ``CommTimeoutError`` naming rank and phase.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import time

import torch
import torch.distributed as dist

from ep_comm.errors import CommTimeoutError, InputError

#: Environment variable that bounds every wait inside ep_comm, in seconds.
TIMEOUT_ENV = "EP_COMM_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 10.0


#: ``cuda`` puts the Buffers of a gloo process group on the current CUDA device, their
#: collectives staged through CPU copies. For ranks that share a GPU (NCCL refuses two ranks on
#: one device): tests and debugging of several ranks on one GPU, not for speed.
GLOO_DEVICE_ENV = "EP_COMM_GLOO_DEVICE"


def _gloo_on_cuda(backend: str) -> bool:
    value = os.environ.get(GLOO_DEVICE_ENV, "cpu")
    if value not in ("cpu", "cuda"):
        raise InputError(f"{GLOO_DEVICE_ENV}={value!r}: use 'cpu' or 'cuda'")
    if backend != "gloo" or value != "cuda":
        return False
    if not torch.cuda.is_available():
        raise InputError(f"{GLOO_DEVICE_ENV}=cuda but torch sees no CUDA device")
    return True


def timeout_s() -> float:
    """The current bound on waits: ``EP_COMM_TIMEOUT_S`` or 10 s."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(value)
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if t <= 0:
        raise InputError(f"{TIMEOUT_ENV} must be positive, got {t}")
    return t


def group_from_mpi(comm, use_gpu: bool | None = None) -> "dist.ProcessGroup":
    """A torch process group with the ranks of the mpi4py communicator ``comm``.

    Initialises torch.distributed (NCCL when ``use_gpu``, default: CUDA available, unless
    ``EP_COMM_GLOO_DEVICE=cuda``; else gloo)
    with a TCP rendezvous whose address rank 0 broadcasts over MPI, and selects the GPU of the
    local rank. ``comm`` must span the whole job when torch.distributed is not yet initialised.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    if dist.is_initialized():
        if dist.get_world_size() != size:
            raise InputError(f"torch.distributed is initialised with {dist.get_world_size()} "
                             f"ranks but the MPI communicator has {size}; pass group= instead")
        return dist.group.WORLD
    local_rank = comm.Split_type(_mpi_shared_type(), key=rank).Get_rank()
    address = None
    if rank == 0:
        address = f"tcp://{_host_address()}:{_free_port()}"
    address = comm.bcast(address, root=0)
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    backend = "gloo"
    if use_gpu:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        # gloo with Buffers on the GPU when ranks share GPUs (GLOO_DEVICE_ENV), else NCCL
        backend = "gloo" if os.environ.get(GLOO_DEVICE_ENV) == "cuda" else "nccl"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size)
    return dist.group.WORLD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _host_address() -> str:
    """This host's address as other hosts reach it (loopback when the name does not resolve)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _mpi_shared_type():
    from mpi4py import MPI
    return MPI.COMM_TYPE_SHARED


class Comm:
    """The process group of a Buffer, its node layout, and bounded collectives."""

    def __init__(self, group, ranks_per_node: int | None = None):
        if group is None:
            raise InputError("Buffer needs a torch ProcessGroup (group=) or an mpi4py "
                             "communicator (comm=)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if self.backend == "nccl" or _gloo_on_cuda(self.backend)
                       else torch.device("cpu"))
        #: CUDA tensors travel through CPU copies (gloo group on GPUs, see GLOO_DEVICE_ENV).
        self.staged = self.backend == "gloo" and self.device.type == "cuda"
        hosts = [None] * self.num_ranks
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        self.hosts = hosts
        detected = hosts.count(hosts[0])
        if ranks_per_node is None:
            ranks_per_node = detected
        if ranks_per_node <= 0 or self.num_ranks % ranks_per_node:
            raise InputError(f"ranks_per_node={ranks_per_node} must divide the group size "
                             f"{self.num_ranks}")
        if ranks_per_node > detected:
            raise InputError(f"ranks_per_node={ranks_per_node} is more than the {detected} "
                             f"ranks found on host {hosts[0]}")
        self.ranks_per_node = ranks_per_node
        self.num_nodes = self.num_ranks // ranks_per_node
        self.node = self.rank // ranks_per_node
        self.local_rank = self.rank % ranks_per_node

    def node_of(self) -> int | None:
        """This rank's node when there are several, else None (for error messages)."""
        return self.node if self.num_nodes > 1 else None

    # -- bounded waits -------------------------------------------------------------------
    def wait(self, work, phase: str, waited_for: str, peer: int | None = None) -> None:
        """Wait for ``work`` (a torch.distributed Work) at most ``timeout_s()`` seconds."""
        limit = timeout_s()
        deadline = time.monotonic() + limit
        delay = 1e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise CommTimeoutError(self.rank, phase, waited_for, limit, peer, self.node_of())
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
        work.wait()

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits, input_splits,
                   phase: str, what: str) -> None:
        """``all_to_all_single`` with a bounded wait; tensors may have any dtype (sent as bytes)."""
        with self._staged(output) as out_s:
            work = dist.all_to_all_single(
                _as_bytes(out_s), _as_bytes(self._host(input)),
                output_split_sizes=None if output_splits is None else list(output_splits),
                input_split_sizes=None if input_splits is None else list(input_splits),
                group=self.group, async_op=True)
            self.wait(work, phase, what)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, phase: str, what: str):
        """``all_gather_into_tensor`` (``output`` is [R * n, ...]) with a bounded wait."""
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        with self._staged(output) as out_s:
            work = gather(_as_bytes(out_s), _as_bytes(self._host(input)), group=self.group,
                          async_op=True)
            self.wait(work, phase, what)

    def barrier(self, phase: str) -> None:
        t = torch.zeros(1, device="cpu" if self.staged else self.device)
        work = dist.all_reduce(t, group=self.group, async_op=True)
        self.wait(work, phase, "a barrier")

    def exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor],
                 phase: str, what: str) -> dict[int, float]:
        """Point-to-point exchange: send ``sends[peer]`` and receive ``recvs[peer]``.

        Only the peers named take part, so masked ranks are neither sent to nor waited for.
        Each wait is bounded by ``timeout_s()``. Returns, per peer received from, the seconds
        waited for it (for wait-cost stats).
        """
        waited = {}
        if self.rank in recvs:  # our own rows never leave the process
            recvs[self.rank].copy_(sends[self.rank])
            waited[self.rank] = 0.0
        sends = {p: self._host(t.contiguous()) for p, t in sorted(sends.items()) if p != self.rank}
        staged_recvs = {p: (t, torch.empty_like(t, device="cpu") if self.staged else t)
                        for p, t in sorted(recvs.items()) if p != self.rank}
        ops = [(peer, dist.P2POp(dist.isend, _as_bytes(t), self._global(peer), self.group))
               for peer, t in sends.items()]
        ops += [(peer, dist.P2POp(dist.irecv, _as_bytes(s), self._global(peer), self.group))
                for peer, (_, s) in staged_recvs.items()]
        if not ops:
            return waited
        t0 = time.monotonic()
        works = dist.batch_isend_irecv([op for _, op in ops])
        deadline = t0 + timeout_s()
        for (peer, op), work in zip(ops, works):
            what_op = what if op.op is dist.irecv else f"the receive of {what}"
            self._wait_until(work, deadline, phase, what_op, peer)
            if op.op is dist.irecv:
                waited[peer] = time.monotonic() - t0
        for dst, s in staged_recvs.values():
            if s is not dst:
                dst.copy_(s)
        return waited

    def _wait_until(self, work, deadline: float, phase: str, waited_for: str, peer: int) -> None:
        if self.backend != "gloo":
            self.wait(work, phase, waited_for, peer=peer)
            return
        # gloo's point-to-point works report completion only from wait(), not is_completed().
        left = max(deadline - time.monotonic(), 1e-3)
        try:
            work.wait(timeout=datetime.timedelta(seconds=left))
        except RuntimeError as e:
            if "Timed out" not in str(e):
                raise
            raise CommTimeoutError(self.rank, phase, waited_for, timeout_s(), peer,
                                   self.node_of()) from None

    # -- CUDA tensors over gloo ------------------------------------------------------------
    def _host(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where this group can send it from: a CPU copy when CUDA data rides on gloo."""
        return t.cpu() if self.staged and t.is_cuda else t

    @contextlib.contextmanager
    def _staged(self, output: torch.Tensor):
        """Yield a tensor to receive into; on a staged group, a CPU copy written back after."""
        if not (self.staged and output.is_cuda):
            yield output
            return
        host = torch.empty_like(output, device="cpu")
        yield host
        output.copy_(host)

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)


def _collective(op, out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``op(out, inp, group=group)`` on any group: on gloo, CUDA tensors go through CPU copies."""
    if dist.get_backend(group) == "gloo" and out.is_cuda:
        host = torch.empty_like(out, device="cpu")
        op(host, inp.cpu(), group=group)
        out.copy_(host)
    else:
        op(out, inp, group=group)


def gather_tensors(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``all_gather_into_tensor`` on any group (gloo: staged through CPU)."""
    _collective(dist.all_gather_into_tensor, out, inp, group)


def reduce_scatter_tensors(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``reduce_scatter_tensor`` (sum) on any group (gloo: staged through CPU)."""
    _collective(dist.reduce_scatter_tensor, out, inp, group)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of ``t`` ([n, row_bytes] for 2-D or more, [bytes] for 1-D), so that every
    dtype (bf16, fp8) travels through every backend (gloo has no bf16/fp8 support) bit-exactly."""
    if not t.is_contiguous():
        raise ValueError("ep_comm internal: communication tensors must be contiguous")
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    if t.dim() == 0:
        t = t.view(1)
    # Rows stay rows (split sizes count rows); each row becomes its bytes.
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8)
