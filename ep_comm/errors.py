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
