"""Exceptions raised by ep_comm.

Every error a user can hit names what was wrong and what to do. Setup and timeout errors point
to ``python -m ep_comm.tools.doctor``, which checks the machine end to end.
"""

DOCTOR_HINT = ("Run `python -m ep_comm.tools.doctor` to check this machine's setup; "
               "docs/troubleshooting.md maps each error to its cause and fix.")


class EpCommError(RuntimeError):
    """Base class of every error that ep_comm raises on purpose."""


class InputError(EpCommError, ValueError):
    """An argument has the wrong shape, dtype, device or value. Raised before any kernel runs."""


class BufferTooSmallError(InputError):
    """A call needs more communication memory than the Buffer was created with.

    Attributes:
        kind: ``"num_nvl_bytes"`` or ``"num_rdma_bytes"``.
        needed: bytes the call needs.
        allocated: bytes the Buffer has.
    """

    def __init__(self, kind: str, needed: int, allocated: int, what: str):
        self.kind, self.needed, self.allocated = kind, needed, allocated
        super().__init__(
            f"{what} needs {kind} >= {needed} bytes ({needed / 2**20:.1f} MiB), but the Buffer "
            f"was created with {allocated} bytes; create the Buffer with {kind}={needed} "
            f"(see the size hints in ep_comm.Config and Buffer.get_low_latency_rdma_size_hint)")


class BackendUnavailableError(EpCommError):
    """The requested backend cannot run here. The message names the reason and the alternative."""

    def __init__(self, backend: str, reason: str, alternative: str):
        self.backend, self.reason = backend, reason
        super().__init__(f"backend={backend!r} is not available: {reason}. {alternative} "
                         f"{DOCTOR_HINT}")


class CommTimeoutError(EpCommError, TimeoutError):
    """A bounded wait expired: a peer did not answer in time.

    Attributes:
        rank: the rank that waited.
        phase: which step of which operation (e.g. ``"dispatch/notify"``).
        peer: the rank waited for, or None when unknown (a collective).
        node: the node of ``rank`` when the run spans nodes, else None.
    """

    def __init__(self, rank: int, phase: str, waited_for: str, timeout_s: float,
                 peer: int | None = None, node: int | None = None):
        self.rank, self.phase, self.peer, self.node = rank, phase, peer, node
        where = f"rank {rank}" + (f" (node {node})" if node is not None else "")
        who = f"rank {peer}" if peer is not None else "a peer"
        super().__init__(
            f"{where} timed out after {timeout_s:g} s in phase '{phase}' waiting for {waited_for} "
            f"from {who}. Likely causes: the rank waited for stopped calling (it crashed, raised, or skipped "
            f"or reordered a call), the ranks disagree on arguments (num_experts, hidden, "
            f"num_max_dispatch_tokens_per_rank), or, with backend='kernels', the GPUs cannot "
            f"reach each other's memory (no NVLink P2P, NVSHMEM transport down). Raise "
            f"EP_COMM_TIMEOUT_S only for very slow first calls. {DOCTOR_HINT}")


class KernelError(EpCommError):
    """A kernel reported a failure through its status word (not a timeout).

    Raisers name the rank, the kernel and the status code; a code the host does not know
    usually means the cached cubin is older than the Python side (clear ``EP_COMM_CACHE_DIR``).
    """


class CollectiveMismatchError(EpCommError):
    """The ranks disagree on a collective call: raised on every rank before any payload moves.

    Every call of a Buffer is a collective; its sequence number and signature (operation,
    hidden, dtype, num_experts, top-k, handle, ...) travel with the first exchange of the call
    (``ep_comm.core.agreement``). A disagreement is reported by every rank, with the same text.

    Attributes:
        rank: the rank raising.
        call: this rank's sequence number of the call (1 = first collective of the Buffer).
        field: the first field that differs (``"op"``, ``"hidden"``, ``"num_experts"``, ...).
        values: {value: [ranks]} for that field.
        odd_ranks: the ranks in the minority (the likely culprits; all but the largest group),
            or [] when no group is larger than every other (two ranks that differ: which one
            is wrong is not known).
        usable: whether the Buffer goes on (True wherever the disagreement is found before any
            kernel starts to exchange; the NVLink kernels that find it mid-call, see
            ``ep_comm.backends.kernels.status.nvl_kernel_mismatch``, leave it failed).
    """

    def __init__(self, rank: int, call: int, field: str, values: dict, detail: str = "",
                 usable: bool = True):
        self.rank, self.call, self.field, self.values = rank, call, field, values
        self.usable = usable
        groups = sorted(values.items(), key=lambda kv: (-len(kv[1]), min(kv[1])))
        tied = len(groups) > 1 and len(groups[0][1]) == len(groups[1][1])
        self.odd_ranks = [] if tied else sorted(r for _, ranks in groups[1:] for r in ranks)
        parts = "; ".join(f"ranks {ranks} have {field}={v}" for v, ranks in groups)
        after = ("Nothing was sent; the Buffer is still usable." if usable else
                 "The Buffer is failed: destroy it and create a new one.")
        odd = ("No group of ranks is larger than the others, so which side is wrong is not "
               "known. " if tied else f"Rank(s) {self.odd_ranks} differ from the rest. ")
        super().__init__(
            f"rank {rank}: the ranks disagree on call #{call} of this Buffer: {parts}. "
            f"{odd}{detail}Every rank must make the same "
            f"Buffer calls in the same order with the same sizes (a rank that skipped, reordered "
            f"or added a call is the usual cause). {after}")


class PeerInputError(EpCommError):
    """Another rank rejected its own input of this call (it raised ``InputError``); this rank
    stops too, before any payload moves, instead of waiting for it.

    Attributes:
        rank: the rank raising; peer: the rank whose input was bad; message: its error text.
    """

    def __init__(self, rank: int, call: int, peer: int, message: str):
        self.rank, self.call, self.peer = rank, call, peer
        super().__init__(f"rank {rank}: call #{call} stopped because rank {peer} rejected its "
                         f"input ({message}). Nothing was sent; the Buffer is still usable.")


class PeerLostError(EpCommError):
    """A peer exited, crashed or closed its connection while this rank waited for it.

    Attributes:
        rank: the rank raising; phase: the step it was in; peers: the ranks found lost (may be
        empty when the transport did not say which); peer: the first of them or None.
    """

    def __init__(self, rank: int, phase: str, peers: list[int], detail: str):
        self.rank, self.phase, self.peers = rank, phase, list(peers)
        self.peer = self.peers[0] if self.peers else None
        who = f"rank(s) {self.peers}" if self.peers else "a peer (rank unknown)"
        super().__init__(
            f"rank {rank} lost {who} in phase '{phase}': {detail}. This Buffer is now failed; "
            f"recover with a new Buffer over the survivors or by masking the lost rank(s) "
            f"(docs/faults.md).")


class BufferFailedError(EpCommError):
    """A call on a Buffer that failed earlier (timeout or lost peer). Raised at once, with no
    communication. ``cause`` is the first error; see docs/faults.md for recovery."""

    def __init__(self, rank: int, cause: BaseException):
        self.rank, self.cause = rank, cause
        super().__init__(
            f"rank {rank}: this Buffer failed earlier ({type(cause).__name__}: {cause}); no further "
            f"calls run on it. Recover with a new Buffer over the survivors, or mask the lost "
            f"rank(s) with low_latency_update_mask_buffer(rank) (docs/faults.md).")
