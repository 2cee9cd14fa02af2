"""Process-group plumbing: ranks, nodes, bounded waits on torch.distributed work.

A ``Comm`` wraps the torch ``ProcessGroup`` that a Buffer was built on (or one made from an
mpi4py communicator) and knows the node layout. Every wait it does is bounded by
``EP_COMM_TIMEOUT_S`` and ends in a ``CommTimeoutError`` naming rank and phase.
"""
from __future__ import annotations

import atexit
import contextlib
import weakref
import datetime
import math
import os
import socket
import time

import torch
import torch.distributed as dist

from ep_comm.errors import (BufferFailedError, CommTimeoutError, EpCommError, InputError,
                            PeerLostError)
from ep_comm.core import agreement

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
        # A token per Comm, the same on every rank (rank 0's), names this Buffer's progress keys
        # in the rendezvous store (see ``record``).
        # The process ids let a rank tell a crashed peer on its host from a stalled one.
        tokens = [None] * self.num_ranks
        dist.all_gather_object(tokens, (os.urandom(6).hex(), os.getpid()), group=group)
        self.uid = tokens[0][0]
        self.pids = [t[1] for t in tokens]
        self.hosts = hosts
        #: sequence number of the current collective call (1 = the first).
        self.seq = 0
        self._pending: tuple | None = None
        self._call: tuple | None = None  # (sig, bad input) of the current call
        self._op = "none"
        #: The first timeout / lost-peer error; every later call raises BufferFailedError.
        self.failure: EpCommError | None = None
        #: Ranks named lost by ``failure`` (masking all of them clears the failure).
        self.lost: set[int] = set()
        self._subgroups: dict[tuple, object] = {}
        self._store = _default_store()
        self._store_lost = False  # the store (hosted by rank 0) stopped answering
        _LIVE_COMMS.add(self)
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

    # -- calls, agreement and failure state -----------------------------------------------
    def raise_if_failed(self) -> None:
        """Raise ``BufferFailedError`` at once if an earlier call timed out or lost a peer."""
        if self.failure is not None:
            raise BufferFailedError(self.rank, self.failure)

    def begin_call(self, sig: "agreement.Signature",
                   bad_input: "agreement.BadInput | None" = None, record: bool = True) -> int:
        """Start collective call ``seq + 1`` with signature ``sig``; ``agree`` exchanges it.

        ``bad_input``: this rank's input failed a check; the call still takes part in the
        agreement exchange (so that peers stop too, naming this rank), then raises.
        """
        self.raise_if_failed()
        self.seq += 1
        self._pending = (sig, bad_input)
        self._call = (sig, bad_input)
        self._op = sig.op
        if record:  # one store write: where this rank is, for peers' diagnoses
            self.record(f"{self.seq}|{sig.op}|in call")
        return self.seq

    def unnumber_call(self) -> None:
        """Give the current call's number back: it raises before any exchange or launch, as a
        local error does, because it found that an earlier call of every rank was refused (a
        kernel's refusal read only at the next call); the ranks then go on with equal numbers."""
        self.seq -= 1

    def agree(self, payload: torch.Tensor | None = None, peers: list[int] | None = None,
              phase: str = "agree") -> torch.Tensor | None:
        """Exchange the pending call's signature (and ``payload``, [n] int64/int32, the same
        length on every rank) with ``peers`` (default: all ranks) in one all-gather, and check
        agreement (``agreement.check``). Returns the gathered payloads [R, n] int64 (rows of
        ranks not in ``peers`` are zero), or None without payload."""
        if self._pending is None:
            raise EpCommError("ep_comm internal: agree() without begin_call()")
        sig, bad = self._pending
        self._pending = None
        mine = agreement.pack(self.seq, sig, bad)
        # Always SIG_LEN + R entries, whatever the call, so that two ranks in different calls
        # still exchange equal sizes (gloo hangs or aborts on unequal ones) and see the mismatch.
        n = self.num_ranks
        body = torch.zeros(n, dtype=torch.int64)
        if payload is not None:
            if payload.numel() != n:
                raise EpCommError(f"ep_comm internal: agreement payload of {payload.numel()} "
                                  f"entries, expected {n}")
            body = payload.cpu().to(torch.int64)
        # on the group's device: an NCCL group gathers CUDA tensors only (gloo stages CUDA data)
        vec = torch.cat([mine, body]).to(self.device)
        out = torch.zeros(self.num_ranks, agreement.SIG_LEN + n, dtype=torch.int64,
                          device=self.device)
        peers = self.all_ranks() if peers is None else peers
        self.gather_rows(out, vec.view(1, -1), peers, phase, "the call signature and counts")
        out = out.cpu()
        agreement.check(self.rank, self.seq, {p: out[p, :agreement.SIG_LEN] for p in peers}, bad)
        return out[:, agreement.SIG_LEN:] if payload is not None else None

    def call_words(self) -> "tuple[list[int], agreement.BadInput | None]":
        """The current call's signature as device words (``agreement.device_words``, for a
        kernel that exchanges it) and this rank's bad input, if any. A runtime driven before
        any Buffer call (internal use) gets an anonymous dispatch of call #0 on every rank."""
        sig, bad = self._call or (agreement.Signature("dispatch"), None)
        return agreement.device_words(self.seq, sig, bad), bad

    def all_ranks(self) -> list[int]:
        return list(range(self.num_ranks))

    def record(self, state: str) -> None:
        """Write this rank's progress (``"seq|op|state"``) to the rendezvous store, so that a
        peer that times out or loses this rank can say where it was (``diagnose``)."""
        if self._store is None:
            return
        try:
            self._store.set(self._key(self.rank), state)
        except Exception:  # noqa: BLE001 - the store's host (rank 0) may be gone; progress
            self._store, self._store_lost = None, True  # records are a diagnostic aid only

    def _key(self, rank: int) -> str:
        return f"ep_comm/{self.uid}/progress/{rank}"

    def diagnose(self, peers: list[int]) -> tuple[list[int], list[int], list[int], str]:
        """Where the ``peers`` are, from the store: ``(lost, late, gave_up, text)``: ranks that
        exited, ranks that have not reached this rank's call, ranks that failed (gave up
        waiting) in it, and a sentence about each."""
        lost, late, gave_up, notes = [], [], [], []
        for p in peers:
            if p == self.rank:
                continue
            state = self._read(p)
            if state is None:
                continue
            seq_s, op, what = (state.split("|") + ["", "", ""])[:3]
            seq = int(seq_s) if seq_s.lstrip("-").isdigit() else -1
            if what == "exited":
                lost.append(p)
                notes.append(f"rank {p} exited (after its call #{seq}, {op})")
            elif seq < self.seq and self._process_gone(p):
                lost.append(p)
                notes.append(f"rank {p} crashed or was killed (its process {self.pids[p]} is "
                             f"gone; its last call: #{seq}, {op})")
            elif seq < self.seq:
                late.append(p)
                notes.append(f"rank {p} has not made call #{self.seq} (its last call: "
                             f"#{seq}, {op}; it skipped a call, or stalled before this one)")
            elif what == "failed":
                gave_up.append(p)
                notes.append(f"rank {p} gave up on its call #{seq} ({op}) after an error")
            elif seq > self.seq:
                notes.append(f"rank {p} is already at call #{seq} ({op})")
        return lost, late, gave_up, "; ".join(notes)

    def _process_gone(self, p: int) -> bool:
        """True if rank ``p`` runs on this host and its process no longer runs (exited, or a
        zombie not yet reaped); False if alive or on another host (unknown)."""
        if self.hosts[p] != self.hosts[self.rank] or not os.path.isdir("/proc/self"):
            return False
        try:
            with open(f"/proc/{self.pids[p]}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def _read(self, p: int) -> str | None:
        if self._store is None:
            # The store lives on rank 0 (torch's rendezvous): unreachable means rank 0 is gone.
            return "-1|unknown|exited" if p == 0 and self._store_lost else None
        try:
            if not self._store.check([self._key(p)]):
                return "0|no call yet|"
            return self._store.get(self._key(p)).decode()
        except Exception:  # noqa: BLE001 - see above
            self._store, self._store_lost = None, True
            return "-1|unknown|exited" if p == 0 else None

    def mark_failed(self, err: EpCommError, lost: list[int]) -> None:
        """Mark failed from outside (a backend's own timeout, e.g. a kernel's status word)."""
        self._fail(err, [p for p in lost if p is not None])

    def _fail(self, err: EpCommError, lost: list[int], pending=()) -> EpCommError:
        """Mark this Comm failed with ``err`` and keep ``pending`` works alive forever.

        A gloo collective that timed out stays posted; destroying it (or its process group)
        blocks until the peer answers, which may be never, so exit would hang. They are held
        here and, at exit, leaked (their destructors never run): the process exits at once.
        ``release_failed_group`` lets go of a group whose pending work has ended (e.g. after
        the group's own gloo timeout) so that ``destroy_process_group`` can free it.
        """
        if self.failure is None:
            self.failure = err
        self.lost |= set(lost)
        _FAILED.append((self.group, tuple(pending)))
        self.record(f"{self.seq}|{self._op}|failed")
        return err

    def unmask_failure(self, masked: set[int]) -> None:
        """Clear the failure when every rank it named lost is masked (mask-and-continue)."""
        if self.failure is not None and self.lost and self.lost <= masked:
            self.failure = None

    def _lost_peer(self, phase: str, error: BaseException, peers, pending=()) -> EpCommError:
        lost, late, gave_up, notes = self.diagnose(peers)
        named = lost or late or gave_up
        detail = f"{notes or 'the transport reported'}: {_short(error)}"
        return self._fail(PeerLostError(self.rank, phase, named, detail), named, pending)

    def _timed_out(self, phase: str, waited_for: str, peer: int | None, peers,
                   pending=()) -> EpCommError:
        lost, late, gave_up, notes = self.diagnose(peers)
        if lost:
            err = PeerLostError(self.rank, phase, lost, f"{notes} (waited {timeout_s():g} s)")
            return self._fail(err, lost, pending)
        named = late or gave_up or ([peer] if peer is not None else [])
        if peer is None and named:
            peer = named[0]
        what = f"{waited_for} in call #{self.seq}" + (f" ({notes})" if notes else "")
        err = CommTimeoutError(self.rank, phase, what, timeout_s(), peer, self.node_of())
        return self._fail(err, named, pending)

    # -- bounded waits -------------------------------------------------------------------
    def wait(self, work, phase: str, waited_for: str, peer: int | None = None,
             peers: list[int] | None = None) -> None:
        """Wait for ``work`` (a torch.distributed Work) at most ``timeout_s()`` seconds.

        Raises ``CommTimeoutError`` or ``PeerLostError`` (naming the peer when the store knows
        it) and marks this Comm failed; a raw transport error never escapes.
        """
        peers = self.all_ranks() if peers is None else peers
        limit = timeout_s()
        deadline = time.monotonic() + limit
        delay = 1e-5
        try:
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise self._timed_out(phase, waited_for, peer, peers, (work,))
                time.sleep(delay)
                delay = min(delay * 2, 1e-3)
            work.wait()
        except EpCommError:
            raise
        except RuntimeError as e:
            raise self._lost_peer(phase, e, peers, (work,)) from None

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits, input_splits,
                   phase: str, what: str, peers: list[int] | None = None) -> None:
        """``all_to_all_single`` with a bounded wait; tensors may have any dtype (sent as bytes).

        ``peers``: the ranks taking part (default all). Splits of the others must be 0: they
        are neither sent to nor waited for (the exchange runs on a group of ``peers`` only).
        """
        group = self.group
        if (peers is not None and len(peers) < self.num_ranks and output_splits is None
                and input_splits is None):
            # Even splits: keep the live ranks' blocks only, exchange, put them back in place.
            r = self.num_ranks
            inp = input.reshape(r, -1)[peers].contiguous()
            out = torch.zeros_like(output.reshape(r, -1)[peers])
            self._collective(dist.all_to_all_single, out, inp, phase, what, peers,
                             group=self._subgroup(peers, phase))
            output.reshape(r, -1)[peers] = out
            return
        if peers is not None and len(peers) < self.num_ranks:
            r = self.num_ranks
            even_out = output.shape[0] // r if output_splits is None else None
            even_in = input.shape[0] // r if input_splits is None else None
            output_splits = [even_out] * r if output_splits is None else list(output_splits)
            input_splits = [even_in] * r if input_splits is None else list(input_splits)
            for p in range(r):
                if p not in peers and (output_splits[p] or input_splits[p]):
                    raise EpCommError(f"ep_comm internal: rows for masked rank {p} in {what}")
            output_splits = [output_splits[p] for p in peers]
            input_splits = [input_splits[p] for p in peers]
            group = self._subgroup(peers, phase)
        self._collective(dist.all_to_all_single, output, input, phase, what, peers,
                         output_split_sizes=None if output_splits is None else list(output_splits),
                         input_split_sizes=None if input_splits is None else list(input_splits),
                         group=group)

    def gather_rows(self, out: torch.Tensor, inp: torch.Tensor, peers: list[int], phase: str,
                    what: str) -> None:
        """``out[p] = inp of rank p`` for p in ``peers`` (an all-gather over them only)."""
        if len(peers) == self.num_ranks:
            self.all_gather(out, inp, phase, what)
            return
        part = torch.zeros(len(peers), *out.shape[1:], dtype=out.dtype, device=out.device)
        self._collective(dist.all_gather_into_tensor, part, inp, phase, what, peers,
                         group=self._subgroup(peers, phase))
        out.zero_()
        out[peers] = part

    def _subgroup(self, peers: list[int], phase: str):
        """A process group of ``peers`` only (cached), for running on with masked ranks.

        Made with ``use_local_synchronization``: only its members take part, so a lost rank
        cannot block it; every member creates it in the same call (the first after masking).
        """
        key = tuple(peers)
        if key not in self._subgroups:
            if self.rank not in peers:
                raise EpCommError(f"ep_comm internal: rank {self.rank} is masked")
            ranks = tuple(self._global(p) for p in peers)
            # One group per set of global ranks per process: torch names a group made with
            # use_local_synchronization after its ranks, so a second one could not be made.
            if ranks not in _SUBGROUPS:
                try:
                    _SUBGROUPS[ranks] = dist.new_group(
                        list(ranks), timeout=datetime.timedelta(seconds=timeout_s()),
                        use_local_synchronization=True)
                except Exception as e:  # noqa: BLE001 - a store/rendezvous failure: name it
                    raise self._lost_peer(f"{phase} (group of ranks {peers})", e,
                                          peers) from None
            self._subgroups[key] = _SUBGROUPS[ranks]
        return self._subgroups[key]

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, phase: str, what: str):
        """``all_gather_into_tensor`` (``output`` is [R * n, ...]) with a bounded wait."""
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._collective(gather, output, input, phase, what, None, group=self.group)

    def _collective(self, op, output: torch.Tensor, input: torch.Tensor, phase: str, what: str,
                    peers: list[int] | None, **kwargs) -> None:
        """``op(output, input, async_op=True, **kwargs)`` (a torch.distributed all-gather or
        all-to-all, tensors sent as bytes) with a bounded wait: the output staged on the host
        where CUDA data rides on gloo, and a transport error raised as the loss of ``peers``
        (default: all ranks)."""
        with self._staged(output) as out_s:
            try:
                work = op(_as_bytes(out_s), _as_bytes(self._host(input)), async_op=True, **kwargs)
            except RuntimeError as e:
                raise self._lost_peer(phase, e, peers or self.all_ranks()) from None
            self.wait(work, phase, what, peers=peers)

    def barrier(self, phase: str) -> None:
        t = torch.zeros(1, device="cpu" if self.staged else self.device)
        try:
            work = dist.all_reduce(t, group=self.group, async_op=True)
        except RuntimeError as e:
            raise self._lost_peer(phase, e, self.all_ranks()) from None
        self.wait(work, phase, "a barrier")

    def exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor],
                 phase: str, what: str, peers: list[int] | None = None) -> dict[int, float]:
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
        # With masked ranks, a group of the live ones: the full group may hold a collective
        # that a lost rank never finished.
        group = (self.group if peers is None or len(peers) == self.num_ranks
                 else self._subgroup(peers, phase))
        ops = [(peer, dist.P2POp(dist.isend, _as_bytes(t), self._global(peer), group))
               for peer, t in sends.items()]
        ops += [(peer, dist.P2POp(dist.irecv, _as_bytes(s), self._global(peer), group))
                for peer, (_, s) in staged_recvs.items()]
        if not ops:
            return waited
        t0 = time.monotonic()
        everyone = sorted(set(sends) | set(recvs) | {self.rank})
        try:
            works = dist.batch_isend_irecv([op for _, op in ops])
        except RuntimeError as e:
            raise self._lost_peer(phase, e, everyone) from None
        deadline = t0 + timeout_s()
        for (peer, op), work in zip(ops, works):
            what_op = what if op.op is dist.irecv else f"the receive of {what}"
            self._wait_until(work, deadline, phase, what_op, peer, everyone, works)
            if op.op is dist.irecv:
                waited[peer] = time.monotonic() - t0
        for dst, s in staged_recvs.values():
            if s is not dst:
                dst.copy_(s)
        return waited

    def _wait_until(self, work, deadline: float, phase: str, waited_for: str, peer: int,
                    peers: list[int], works=()) -> None:
        if self.backend != "gloo":
            self.wait(work, phase, waited_for, peer=peer, peers=peers)
            return
        # gloo's point-to-point works report completion only from wait(), not is_completed().
        left = max(deadline - time.monotonic(), 1e-3)
        try:
            work.wait(timeout=datetime.timedelta(seconds=left))
        except RuntimeError as e:
            if "Timed out" not in str(e):
                raise self._lost_peer(phase, e, [peer, self.rank], works) from None
            raise self._timed_out(phase, waited_for, peer, [peer, self.rank], works) from None

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


def _default_store():
    """The rendezvous store of torch.distributed (a TCPStore on rank 0), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - progress records are optional (see Comm.record)
        return None


def _short(error: BaseException) -> str:
    """One line of a transport error (gloo's messages carry file paths and a banner)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "] " in text and text.startswith("["):
        text = text.split("] ", 1)[1]
    return f"{type(error).__name__}: {text.split('. This is typically')[0][:200]}"


_LEAKED: list = []
#: Process groups of live ranks after masking, by their global ranks (see Comm._subgroup).
_SUBGROUPS: dict[tuple, object] = {}
#: (process group, pending works) of every failed Comm; leaked at exit (see Comm._fail).
_FAILED: list[tuple] = []


def release_failed_group(group) -> None:
    """Forget ``group``'s failed work (call once its pending work has ended, e.g. after its
    gloo timeout, and before ``torch.distributed.destroy_process_group(group)``)."""
    _FAILED[:] = [(g, w) for g, w in _FAILED if g is not group]


def _leak(obj) -> None:
    """Keep ``obj`` alive until the process ends, past interpreter shutdown (see Comm._fail)."""
    import ctypes
    if obj is not None and not any(o is obj for o in _LEAKED):
        _LEAKED.append(obj)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


_LIVE_COMMS: "weakref.WeakSet[Comm]" = weakref.WeakSet()


@atexit.register
def _record_exit() -> None:
    """Tell peers (through the store) that this process is exiting, so that a peer waiting for
    it raises PeerLostError naming it instead of a timeout."""
    for c in list(_LIVE_COMMS):
        c.record(f"{c.seq}|{c._op}|exited")
    for group, works in _FAILED:
        for obj in (group, *works):
            _leak(obj)


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
