"""``ep_comm.Buffer``: expert-parallel dispatch and combine, DeepEP's calling convention.

This module owns the public API: argument checks, buffer-size checks, stream and event
handling. The work itself is done by a backend (``ep_comm.backends.reference`` or the GPU kernels),
chosen explicitly at construction and never switched silently.
"""
from __future__ import annotations

import atexit
import functools
import os
import threading
import weakref

import torch

from ep_comm.backends.base import Backend, ExpandRequest
from ep_comm.config import DEFAULT_NUM_SMS, Config, default_config
from ep_comm.core import agreement, checks
from ep_comm.core.regions import LowLatencyRegions
from ep_comm.errors import (BackendUnavailableError, BufferTooSmallError, CommTimeoutError,
                            EpCommError, InputError, KernelError, PeerLostError)
from ep_comm.event import EventOverlap, capture_event
from ep_comm.handles import DispatchHandle, LowLatencyHandle
from ep_comm.runtime.comm import Comm, group_from_mpi

# -- fault handling (docs/faults.md): call agreement, input ranges, failure state, bounded exit

#: ``1``: the kernels backend also agrees on the host in every call (defined with the agreement).
AGREE_ENV = agreement.AGREE_ENV
#: ``0`` turns off the expert-id range check (it reads topk_idx on the host; on CUDA it is
#: skipped anyway while a CUDA graph is being captured).
CHECK_IDS_ENV = "EP_COMM_CHECK_IDS"
#: ``1`` turns on the NaN/Inf check of FP8 paths (names the first bad token).
CHECK_FINITE_ENV = "EP_COMM_CHECK_FINITE"
#: Seconds that destroy() of a failed Buffer and the exit handler wait for the backend.
DESTROY_TIMEOUT_S = 5.0
_LIVE_BUFFERS: "weakref.WeakSet" = weakref.WeakSet()


def _fault_guard(fn):
    """A collective call: raise at once on a failed Buffer; a timeout, lost peer or kernel error
    marks the Buffer failed; a raw transport error leaves only as ``PeerLostError``."""
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        self.comm.raise_if_failed()
        try:
            return fn(self, *args, **kwargs)
        except (CommTimeoutError, PeerLostError, KernelError) as e:
            if self.comm.failure is None:
                self.comm.mark_failed(e, [getattr(e, "peer", None), *getattr(e, "peers", ())])
            raise
        except EpCommError:
            raise
        except RuntimeError as e:
            if not _is_transport_error(e):
                raise
            err = PeerLostError(self.rank, fn.__name__, [], f"the transport failed ({e})")
            self.comm.mark_failed(err, [])
            raise err from e
    return call


def _is_transport_error(e: BaseException) -> bool:
    text = str(e)
    return any(k in text for k in ("gloo", "NCCL", "Connection", "connection", "GLHF"))
# -- end of fault handling helpers --

BACKENDS = ("auto", "kernels", "reference")


class Buffer:
    """Communication buffers and dispatch/combine for one expert-parallel group.

    Args:
        group: torch ProcessGroup of the expert-parallel ranks (NCCL on GPUs, gloo on CPU).
        num_nvl_bytes: bytes of the NVLink buffer of normal mode, per rank. Size it with
            ``Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(hidden_bytes, R)``.
        num_rdma_bytes: bytes of the NVSHMEM buffer (low-latency mode, and normal mode across
            nodes). Size it with ``Buffer.get_low_latency_rdma_size_hint(...)`` or
            ``Config.get_rdma_buffer_size_hint(...)``.
        low_latency_mode: enable the low-latency (decode) calls.
        num_qps_per_rank: queue pairs per peer for RDMA (accepted for compatibility; NVSHMEM
            chooses its own over NVLink).
        allow_nvlink_for_low_latency_mode: low-latency kernels may store straight into peer
            memory over NVLink; False sends every byte with NVSHMEM puts (the RDMA path).
        allow_mnnvl, use_fabric: DeepEP's multi-node NVLink (MNNVL) and fabric-handle options.
            ep_comm shares memory by CUDA IPC within a node and NVSHMEM across nodes, so True
            raises ``BackendUnavailableError`` (never ignored).
        enable_shrink: DeepEP's rank masking for low-latency mode. ep_comm's mask calls
            (``low_latency_update_mask_buffer`` ...) always work; the flag is kept as an attribute.
        explicitly_destroy: if True, buffers live until ``destroy()``; else until garbage
            collection.
        comm: an mpi4py communicator, used when ``group`` is None (initialises
            torch.distributed from it if needed).
        backend: ``"kernels"`` (GPU kernels), ``"reference"`` (torch.distributed
            collectives), or ``"auto"`` (kernels on CUDA, reference on CPU). An impossible
            choice raises ``BackendUnavailableError``; nothing falls back silently.
        ranks_per_node: ranks that share NVLink; detected from host names when None. Set it
            lower than the ranks on the host to run the internode path on one host.
    """

    #: SMs used by normal-mode kernels (``set_num_sms`` changes it for all Buffers).
    num_sms: int = DEFAULT_NUM_SMS

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, backend: str = "auto",
                 ranks_per_node: int | None = None):
        for name, on in (("allow_mnnvl", allow_mnnvl), ("use_fabric", use_fabric)):
            if on:
                raise BackendUnavailableError(
                    "kernels", f"{name}=True asks for multi-node NVLink fabric memory, which "
                    "ep_comm does not use (CUDA IPC within a node, NVSHMEM across nodes)",
                    f"Drop {name}=True; the ranks of one node still use NVLink.")
        self.enable_shrink = enable_shrink
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an int >= 0, got {v!r}")
        if group is None and comm is not None:
            group = group_from_mpi(comm)
        self.comm = Comm(group, ranks_per_node)
        self.group = group
        self.rank, self.group_size = self.comm.rank, self.comm.num_ranks
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.device = self.comm.device
        self.backend_name = self._resolve_backend(backend)
        self._backend: Backend | None = self._make_backend()
        # Keys (checks.sig of every argument) of the calls that passed full validation; a call
        # with a known key skips the checks it already passed. EP_COMM_DEBUG=1 validates all.
        self._validated: set = set()
        self._combine_sigs: dict = {}  # Buffer._combine_signature's
        # Ranks unmasked since the last clean_low_latency_buffer: a masked rank that kept
        # running may have written signal words no call consumed, so the next low-latency call
        # waits for a clean (see low_latency_update_mask_buffer).
        self._unmasked: set[int] = set()
        # settings read once per Buffer (a call must not pay for os.environ lookups)
        self._debug = os.environ.get("EP_COMM_DEBUG", "0") not in ("", "0")
        self._agree_always = os.environ.get(AGREE_ENV) == "1"
        self._check_ids_mode = os.environ.get(CHECK_IDS_ENV)
        self._check_finite = os.environ.get(CHECK_FINITE_ENV) == "1"
        # The C++ host path of later calls of known shapes (docs/host_path.md): only for
        # calls that make no per-call host check, which keep the Python path.
        self._ll_host = self._layout_host = self._normal_host = None
        if not self._debug and self._check_ids_mode != "1":
            self._layout_host = self._backend.layout_host_path()
            if not self._agree_always and not self._check_finite:
                self._normal_host = self._backend.normal_host_path()
                if low_latency_mode:
                    self._ll_host = self._backend.ll_host_path()
        self._comm_stream = None
        if self.device.type == "cuda":
            self._comm_stream = self._backend.comm_stream() or torch.cuda.Stream(self.device)
        # Stream order of the normal-mode calls (``_sync_begin`` ...): two kernels of one Buffer
        # must never run at once (they share the sequence word ctrl[0], counters and rings).
        # A synchronous call runs on the current stream, an async one on the comm stream; once
        # a call has run on the comm stream (``_ordered``) each side waits for the other's last
        # work. Until then synchronous calls pay one attribute test, nothing else.
        self._ordered = False
        self._comm_done = None   # event after the last comm-stream call, not yet waited for
        self._sync_done = None   # event after the last synchronous call (ordered), not yet waited
        self._sync_event = None  # the event _sync_done records (one per Buffer, re-recorded)
        _LIVE_BUFFERS.add(self)  # fault handling: destroyed (bounded) at exit

    # ------------------------------------------------------------------ construction
    def _resolve_backend(self, backend: str) -> str:
        on_gpu = self.device.type == "cuda"
        if backend == "auto":
            return "kernels" if on_gpu else "reference"
        if backend == "kernels" and not on_gpu:
            raise BackendUnavailableError(
                "kernels", f"the process group uses {self.comm.backend!r}, not NCCL on CUDA "
                "devices (no GPU for this rank)", "Use backend='reference' on CPU.")
        return backend

    def _make_backend(self) -> Backend:
        if self.backend_name == "reference":
            from ep_comm.backends.reference import ReferenceBackend
            return ReferenceBackend(self.comm)
        try:
            from ep_comm.backends.kernels.backend import KernelsBackend
        except ImportError as e:
            raise BackendUnavailableError(
                "kernels", f"the GPU kernels backend could not be imported ({e})",
                "Install the GPU extra (pip install 'ep_comm[gpu]') or pass "
                "backend='reference'.") from e
        return KernelsBackend(self.comm, num_nvl_bytes=self.num_nvl_bytes,
                              num_rdma_bytes=self.num_rdma_bytes,
                              low_latency_mode=self.low_latency_mode,
                              allow_nvlink_for_low_latency_mode=self.allow_nvlink_for_low_latency_mode)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise EpCommError("this Buffer was destroyed; create a new one")
        return self._backend

    @property
    def expands_in_dispatch(self) -> bool:
        """Whether ``dispatch`` takes ``expand=`` (the kernels backend within one node)."""
        return self.backend.expands_in_dispatch

    def destroy(self) -> None:
        """Free the communication buffers. The Buffer cannot be used afterwards.

        Local (never waits for peers on the reference backend). On a failed Buffer the
        backend's teardown is given ``DESTROY_TIMEOUT_S`` seconds, then abandoned with a
        warning, so that a lost peer can never make destroy (or exit) hang.
        """
        self._ll_host = self._layout_host = self._normal_host = None
        if self._backend is not None:
            backend, self._backend = self._backend, None
            if self.comm.failure is None:
                backend.destroy()
            elif not _bounded(backend.destroy, DESTROY_TIMEOUT_S):
                import warnings
                warnings.warn(f"ep_comm.Buffer rank {self.rank}: destroy of a failed Buffer "
                              f"did not finish in {DESTROY_TIMEOUT_S:g} s; abandoned")

    # ------------------------------------------------------------------ fault handling
    @property
    def failed(self) -> bool:
        """True after a timeout or lost peer (until every lost rank is masked)."""
        return self.comm.failure is not None

    @property
    def lost_ranks(self) -> list[int]:
        """Ranks named lost (exited, crashed, or not answering) by the failure, sorted."""
        return sorted(self.comm.lost)

    def _begin_call(self, sig: "agreement.Signature", bad: "agreement.BadInput | None" = None,
                    waits_for_counts: bool = False) -> None:
        """Number this call and hand its signature to the agreement (docs/faults.md).

        A backend that fuses the agreement of this call (``Backend.fuses_agreement``) exchanges
        and checks it itself, and raises ``bad`` after the exchange; otherwise it is exchanged
        here (always on the reference backend, with ``EP_COMM_CHECK_AGREEMENT=1`` on the
        kernels backend) or ``bad`` is raised at once."""
        fused = self.backend.fuses_agreement(sig.op, waits_for_counts)
        agree = fused or self._agree_always
        # The progress record (a store write, tens of microseconds) serves the host's own
        # timeout diagnosis; the kernels report their timeouts themselves (status word).
        record = self._agree_always or self.backend_name == "reference"
        self.comm.begin_call(sig, bad, record=record)
        if fused:
            return
        if agree:
            mask = self.backend.mask_buffer().tolist() if self.low_latency_mode else None
            live = [p for p in range(self.group_size) if not mask or not mask[p] or p == self.rank]
            self.comm.agree(None, live, f"{sig.op}/agree")
        elif bad is not None:
            raise bad.error()

    def _bad_ids(self, topk_idx, num_experts: int, first: bool = True):
        """The first expert id outside [-1, num_experts), or None.

        Reading the ids costs a device-to-host synchronisation on CUDA, which the kernels'
        paths otherwise never need (``num_worst_tokens``, low-latency mode, CUDA graphs). So on
        CUDA tensors the check runs on the first call of each shape (``first``), under ``EP_COMM_DEBUG=1`` and with ``EP_COMM_CHECK_IDS=1``; on CPU tensors (the
        reference backend, where it is free) on every call. ``EP_COMM_CHECK_IDS=0`` turns it off.
        """
        if topk_idx is None:
            return None
        mode = self._check_ids_mode
        if mode == "0":
            return None
        if topk_idx.is_cuda:
            # the common case first: a later call of a known shape (no capture query per call)
            if mode != "1" and not self._debug and not first:
                return None
            if torch.cuda.is_current_stream_capturing():
                return None
        return agreement.first_bad_expert(topk_idx, num_experts)

    def _bad_values(self, x, name: str = "x"):
        """With CHECK_FINITE_ENV=1, the first token of ``x`` holding NaN/Inf, else None."""
        if not self._check_finite:
            return None
        return agreement.first_non_finite(x, name)

    def __del__(self):
        if not getattr(self, "explicitly_destroy", True) and getattr(self, "_backend", None):
            try:
                self.destroy()
            except Exception as e:  # noqa: BLE001 - never raise from a finaliser, but say why
                import warnings
                warnings.warn(f"ep_comm.Buffer could not free its buffers: {e}")

    # ------------------------------------------------------------------ sizing helpers
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM budget of normal-mode kernels (even, >= 2) for all Buffers."""
        if not isinstance(new_num_sms, int) or new_num_sms < 2 or new_num_sms % 2:
            raise InputError(f"num_sms must be an even int >= 2, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The analytic normal-mode ``Config`` for ``num_ranks`` ranks (dispatch and combine)."""
        return default_config(num_ranks, Buffer.num_sms)

    #: DeepEP has both names; combine and dispatch use the same analytic config here.
    get_combine_config = get_dispatch_config

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` that low-latency mode needs for these sizes."""
        return _low_latency_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                  num_experts)

    def get_comm_stream(self):
        """The CUDA stream normal-mode communication runs on (None on CPU)."""
        return self._comm_stream

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap recorded now on the current CUDA stream (pass it as
        ``previous_event``); empty without CUDA. Static, as DeepEP's (``Buffer.capture()``)."""
        return capture_event(torch.device("cuda") if torch.cuda.is_available()
                             else torch.device("cpu"))

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: the kernels are compiled at run time for the device, FP8 (sm_90) included."""
        return True

    def get_local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """This rank's communication buffer as a tensor of ``dtype`` from byte ``offset``
        (1-D over the rest of the buffer, or ``size`` if given), as DeepEP's. See
        ``ep_comm.compat.local_buffer``."""
        from ep_comm.compat.local_buffer import local_buffer_tensor
        return local_buffer_tensor(self, dtype, size, offset, use_rdma_buffer)

    def internode_dispatch(self, x, handle=None, num_tokens_per_rank=None,
                           num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                           num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0,
                           config: Config | None = None, previous_event=None,
                           async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's explicit internode entry: ``dispatch`` with a required ``config`` (ep_comm
        picks the internode path itself whenever the group spans nodes)."""
        if config is None:
            raise InputError("internode_dispatch needs config (as DeepEP's)")
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                             is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                             expert_alignment, num_worst_tokens, config, previous_event,
                             async_finish, allocate_on_comm_stream)

    def internode_combine(self, x, handle, topk_weights=None, bias=None,
                          config: Config | None = None, previous_event=None,
                          async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's explicit internode entry: ``combine`` with a required ``config``."""
        if config is None:
            raise InputError("internode_combine needs config (as DeepEP's)")
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    # ------------------------------------------------------------------ stream plumbing
    # Stream order. A synchronous call runs on the current stream (no stream switch), an async
    # one (async_finish, previous_event, allocate_on_comm_stream; ElasticBuffer's
    # async_with_compute_stream) on the comm stream. The normal-mode kernels of one Buffer
    # (layout, dispatch, combine, on NVLink or across nodes) must run one after the other in
    # call order: they read the same sequence word ctrl[0] and share counters, rings and the
    # bad-id record. So every normal-mode call goes through these four helpers, one convention:
    #   comm-stream call:  _comm_begin(stream) before its kernels, _comm_end(event) after;
    #   synchronous call:  ``if self._ordered:`` _sync_begin() before, _sync_end() after.
    # ``_ordered`` is set by the first comm-stream call, so purely synchronous use records no
    # event and waits on nothing (one attribute test per call). Inside CUDA graph capture the
    # helpers do nothing (an event crossing the capture boundary is an error; torch.cuda.graph
    # synchronises the device before it captures).
    def _sync_begin(self) -> None:
        """Before a synchronous call's kernels (ordered mode): the current stream waits once
        for the last comm-stream call (then stream order carries it)."""
        ev = self._comm_done
        if ev is not None and not torch.cuda.is_current_stream_capturing():
            self._comm_done = None
            torch.cuda.current_stream(self.device).wait_event(ev)

    def _sync_end(self) -> None:
        """After a synchronous call's kernels (ordered mode): record where they end, for the
        next comm-stream call to wait for."""
        if torch.cuda.is_current_stream_capturing():
            return
        ev = self._sync_event
        if ev is None:
            ev = self._sync_event = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._sync_done = ev

    def _in_order(self, fn, *args):
        """``fn(*args)``, a synchronous call (a C++ host path, or the Python path's backend
        call), in stream order (ordered mode: see ``_sync_begin``). The end is recorded also
        after an exception (kernels may be queued) and after a C++ path that declined (the
        Python path it falls back to records again: harmless, and only in ordered mode)."""
        if not self._ordered:
            return fn(*args)
        self._sync_begin()
        try:
            return fn(*args)
        finally:
            self._sync_end()

    def _comm_begin(self, stream) -> None:
        """Before a comm-stream call's kernels (after its wait for previous_event or the
        current stream): ordered mode on; ``stream`` also waits for the last synchronous call,
        which previous_event need not cover."""
        self._ordered = True
        ev = self._sync_done
        if ev is not None and not torch.cuda.is_current_stream_capturing():
            self._sync_done = None
            stream.wait_event(ev)

    def _comm_end(self, event) -> None:
        """After a comm-stream call's kernels: ``event`` (recorded on the comm stream after
        them) is what the next synchronous call waits for."""
        if not torch.cuda.is_current_stream_capturing():
            self._comm_done = event

    def _on_comm_stream(self, fn, previous_event, async_finish, allocate_on_comm_stream, inputs):
        """Run ``fn`` on the communication stream after ``previous_event`` (or the current
        stream), then either return an event (``async_finish``) or make the current stream
        wait. Returns ``(fn's result, EventOverlap)``."""
        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            # Synchronous: run on the current stream. Same order as switching to the comm
            # stream and back, without the switch, the waits and a record_stream per tensor.
            return self._in_order(fn), EventOverlap()
        if self._comm_stream is None:
            if previous_event is not None:
                previous_event.current_stream_wait()
            return fn(), EventOverlap()
        compute = torch.cuda.current_stream(self.device)
        if previous_event is not None:
            self._comm_stream.wait_event(previous_event.event)
        else:
            self._comm_stream.wait_stream(compute)
        self._comm_begin(self._comm_stream)
        try:
            with torch.cuda.stream(self._comm_stream):
                result = fn()
        finally:  # also after a call that raised once its kernels were queued
            ev = torch.cuda.Event()
            ev.record(self._comm_stream)
            self._comm_end(ev)
        for t in _tensors(inputs):
            t.record_stream(self._comm_stream)
        for t in _tensors(result):
            t.record_stream(compute)
        if async_finish:
            return result, EventOverlap(ev, extra_tensors=tuple(_tensors((inputs, result))))
        compute.wait_event(ev)  # what wait_stream does, with the event kept for _comm_end
        return result, EventOverlap()

    def _check_nvl_size(self, hidden_bytes: int, config: Config, what: str,
                        num_tokens: int) -> None:
        need = config.get_nvl_buffer_size_hint(hidden_bytes, self.comm.ranks_per_node)
        # the smallest of the ranks' buffers where the backend knows it: its layout is computed
        # for that one, and every rank must refuse a call alike (before it is numbered)
        have = self.backend.min_nvl_bytes() or self.num_nvl_bytes
        if have < need:
            raise BufferTooSmallError("num_nvl_bytes", need, have,
                                      what if have == self.num_nvl_bytes
                                      else f"{what} (the smallest of the ranks' buffers)")
        if self.comm.num_nodes > 1:
            need = config.get_rdma_buffer_size_hint(
                hidden_bytes, self.group_size, ranks_per_node=self.comm.ranks_per_node,
                num_max_tokens_per_rank=max(num_tokens, 1))
            if self.num_rdma_bytes < need:
                raise BufferTooSmallError("num_rdma_bytes", need, self.num_rdma_bytes, what)

    # ------------------------------------------------------------------ normal mode
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: EventOverlap | None = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """Which tokens go to which rank, from the top-k routing. Local computation, no traffic.

        Args:
            topk_idx: [T, K] int64, global expert ids, -1 for "no expert".
            num_experts: E, divisible by the number of ranks R.

        Returns:
            num_tokens_per_rank: [R] int32, tokens this rank sends to each rank.
            num_tokens_per_rdma_rank: [nodes] int32, tokens sent to each node, or None on one node.
            num_tokens_per_expert: [E] int32, tokens per expert.
            is_token_in_rank: [T, R] bool.
            event: EventOverlap (with ``async_finish``) or an empty one.
        """
        host = self._layout_host
        if (host is not None and previous_event is None and not async_finish
                and not allocate_on_comm_stream):  # a known shape, through C++
            done = self._in_order(host, topk_idx, num_experts)
            if done is not None:
                return (*done, EventOverlap())
        key = ("layout", num_experts, checks.sig(topk_idx))
        first = key not in self._validated
        if self._debug or first:
            checks.num_experts(num_experts, self.group_size)
            checks.topk_idx(topk_idx, self.device)
            self._validated.add(key)
        bad = self._bad_ids(topk_idx, num_experts, first)  # fault handling: ids in [-1, E)
        if bad is not None:
            raise bad.error()
        if previous_event is not None or async_finish or allocate_on_comm_stream:
            checks.comm_stream_flags(previous_event, async_finish, allocate_on_comm_stream)
        result, event = self._on_comm_stream(
            lambda: self.backend.get_dispatch_layout(topk_idx, num_experts),
            previous_event, async_finish, allocate_on_comm_stream, (topk_idx,))
        return (*result, event)

    @_fault_guard
    def dispatch(self, x, handle: DispatchHandle | None = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 topk_idx=None, topk_weights=None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config: Config | None = None,
                 previous_event: EventOverlap | None = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, *, expand: ExpandRequest | None = None):
        """Send each token to every rank that owns at least one of its experts.

        Args:
            x: [T, H] bf16, or a tuple (x_fp8 [T, H] float8_e4m3fn, scales [T, H // 128] float32).
            handle: a DispatchHandle from an earlier dispatch: re-send new ``x`` along the same
                routes with no layout work (then the layout and topk arguments must be None).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                num_tokens_per_expert: from ``get_dispatch_layout``.
            topk_idx: [T, K] int64 global expert ids (-1 = none), or None to not send them.
            topk_weights: [T, K] float32, or None.
            expert_alignment: round each count of ``num_recv_tokens_per_expert_list`` up to this.
            num_worst_tokens: if > 0, outputs have exactly this many rows, padding rows have
                ``recv_topk_idx`` -1 and zero weights, the count list is empty, and the kernels
                do not synchronise with the host (CUDA-graph capturable).
            config: a ``Config``; default ``get_dispatch_config(R)``.
            previous_event, async_finish, allocate_on_comm_stream: stream control, as DeepEP.
            expand: ep_comm's, for ``ElasticBuffer(do_expand=True)``: an ``ExpandRequest``
                (only where ``expands_in_dispatch``; needs ``topk_idx`` and no handle). Then
                recv_x (and its scales) are [N_exp, H] expanded rows, grouped by local expert,
                each expert's block aligned to ``expert_alignment``, and recv_topk_weights is
                [N_exp] float32 (each row's weight); recv_topk_idx stays [N, K].

        Returns:
            recv_x: [N, H] bf16 or the fp8 tuple; rows ordered by source rank, then by token
                index on the source rank.
            recv_topk_idx: [N, K] int64 local expert ids (-1 for experts on other ranks), or None.
            recv_topk_weights: [N, K] float32, the weights as sent, or None.
            num_recv_tokens_per_expert_list: list of L ints, each rounded up to
                ``expert_alignment`` ([] with ``num_worst_tokens``).
            handle: DispatchHandle for combine and cached dispatch.
            event: EventOverlap.
        """
        if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[1], torch.Tensor) \
                and not x[1].is_contiguous():
            x = (x[0], x[1].contiguous())  # DeepEP takes any scale strides (e.g. column-major)
        is_pair = isinstance(x, (tuple, list))
        host = self._normal_host
        if (host is not None and previous_event is None and not async_finish
                and not allocate_on_comm_stream and expand is None
                and (not is_pair or len(x) == 2)):  # a known shape, through C++
            done = self._in_order(
                host.dispatch, x[0] if is_pair else x, x[1] if is_pair else None, handle,
                num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                num_worst_tokens, config or self._default_config())
            if done is not None:
                return (*done, EventOverlap())
        key = ("dispatch", tuple(map(checks.sig, x)) if is_pair else checks.sig(x),
               None if handle is None else (type(handle), getattr(handle, "num_tokens", None),
                                            getattr(handle, "num_experts", None),
                                            getattr(handle, "num_worst_tokens", None)),
               checks.sig(num_tokens_per_rank), checks.sig(num_tokens_per_rdma_rank),
               checks.sig(is_token_in_rank), checks.sig(num_tokens_per_expert),
               checks.sig(topk_idx), checks.sig(topk_weights), expert_alignment,
               num_worst_tokens, config, Buffer.num_sms, expand is not None,
               # 48.0 == 48 in a key: the types make a float a new key, refused by the checks
               type(expert_alignment), type(num_worst_tokens))
        first = key not in self._validated
        if self._debug or first:
            self._validate_dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                    is_token_in_rank, num_tokens_per_expert, topk_idx,
                                    topk_weights, expert_alignment, num_worst_tokens, config)
            if expand is not None and not (self.expands_in_dispatch and handle is None
                                           and topk_idx is not None):
                raise InputError("dispatch(expand=...) needs a backend that expands in its "
                                 "kernels (Buffer.expands_in_dispatch), topk_idx and no handle")
            self._validated.add(key)
        payload, scales = x if is_pair else (x, None)
        config = config or self._default_config()
        if handle is not None:
            num_experts = handle.num_experts
            num_worst_tokens = handle.num_worst_tokens
        else:
            num_experts = num_tokens_per_expert.shape[0]
        if previous_event is not None or async_finish or allocate_on_comm_stream:
            # before the call is numbered: a local error must not advance the sequence
            checks.comm_stream_flags(previous_event, async_finish, allocate_on_comm_stream)
        # fault handling: agree on the call; bad ids / NaN stop every rank (docs/faults.md)
        bad = self._bad_ids(topk_idx, num_experts, first) if handle is None else None
        if bad is None and scales is not None:
            bad = self._bad_values(scales, "x scales") or self._bad_values(payload)
        self._begin_call(agreement.Signature(
            "dispatch" if handle is None else "cached_dispatch", payload.shape[1], payload.dtype,
            num_experts, -1 if topk_idx is None else topk_idx.shape[1],
            -1 if handle is None else getattr(handle.backend_state, "call_seq", -1)), bad,
            waits_for_counts=handle is None and num_worst_tokens == 0)

        # Only an expanding call passes expand: the other backends' dispatch does not take it.
        extra = {} if expand is None else {"expand": expand}

        def run():
            return self.backend.dispatch(
                payload, scales, handle=handle, num_tokens_per_rank=num_tokens_per_rank,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts,
                expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                config=config, **extra)

        inputs = (payload, scales, topk_idx, topk_weights, is_token_in_rank)
        (recv_x, recv_scales, recv_idx, recv_w, counts, new_handle), event = \
            self._on_comm_stream(run, previous_event, async_finish, allocate_on_comm_stream, inputs)
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        if handle is None and new_handle.num_channels == 0:
            new_handle.num_channels = config.num_channels  # DeepEP's C of the tuple view
        if handle is not None:
            return recv, None, None, counts, new_handle, event
        return recv, recv_idx, recv_w, counts, new_handle, event

    def _default_config(self) -> Config:
        return self.get_dispatch_config(self.group_size)

    def _validate_dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                           is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                           expert_alignment, num_worst_tokens, config) -> None:
        """Every check of ``dispatch``'s arguments (InputError / BufferTooSmallError)."""
        payload, scales = checks.x_payload(x, self.device)
        t, hidden = payload.shape
        checks.hidden_ok(hidden)
        checks.alignment(expert_alignment)
        checks.worst_tokens(num_worst_tokens)
        config = config or self._default_config()
        self._check_nvl_size(hidden * max(payload.element_size(), 2), config, "dispatch", t)
        r = self.group_size
        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise InputError(f"handle must be a DispatchHandle, got {type(handle).__name__}")
            if any(a is not None for a in (num_tokens_per_rank, num_tokens_per_rdma_rank,
                                           is_token_in_rank, num_tokens_per_expert, topk_idx,
                                           topk_weights)):
                raise InputError("a cached dispatch (handle=...) takes no layout or top-k "
                                 "arguments: they come from the handle")
            if t != handle.num_tokens:
                raise InputError(f"x has {t} tokens but the handle was made for "
                                 f"{handle.num_tokens}")
        else:
            for name, v in (("num_tokens_per_rank", num_tokens_per_rank),
                            ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
                if v is None:
                    raise InputError(f"dispatch without a handle needs {name} "
                                     f"(from get_dispatch_layout)")
            checks.tensor("num_tokens_per_rank", num_tokens_per_rank, dtype=torch.int32,
                          shape=(r,), device=self.device)
            checks.tensor("is_token_in_rank", is_token_in_rank, dtype=torch.bool,
                          shape=(t, r), device=self.device)
            checks.tensor("num_tokens_per_expert", num_tokens_per_expert, dtype=torch.int32,
                          dims=1, device=self.device)
            checks.num_experts(num_tokens_per_expert.shape[0], r)
            if self.comm.num_nodes > 1:
                checks.tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank,
                              dtype=torch.int32, shape=(self.comm.num_nodes,), device=self.device)
            if topk_idx is not None:
                checks.topk_idx(topk_idx, self.device, t)
                if topk_weights is not None:
                    checks.topk_weights(topk_weights, topk_idx, self.device)
            elif topk_weights is not None:
                raise InputError("topk_weights without topk_idx: pass both or neither")
    @_fault_guard
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights=None, bias=None,
                config: Config | None = None, previous_event: EventOverlap | None = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Send each received row back to its source rank and sum the rows of each token there.

        Args:
            x: [N, H] bf16, one row per row of the dispatch's ``recv_x`` (same order).
            handle: the DispatchHandle of that dispatch.
            topk_weights: [N, K] float32 or None; summed the same way as ``x``.
            bias: None, a [T, H] bf16 tensor, or a pair of them, added to the sum.
            config, previous_event, async_finish, allocate_on_comm_stream: as in dispatch.

        Returns:
            combined_x: [T, H] bf16, ``sum over receiving ranks of their row + bias``,
                accumulated in float32 (tokens sent nowhere get just the bias, or zeros).
            combined_topk_weights: [T, K] float32 or None.
            event: EventOverlap.
        """
        host = self._normal_host
        if (host is not None and previous_event is None and not async_finish
                and not allocate_on_comm_stream):  # a known plan, through C++
            done = self._in_order(host.combine, x, handle, topk_weights, bias,
                                     config or self._default_config())
            if done is not None:
                return done[0], done[1], EventOverlap()
        key = ("combine", checks.sig(x), type(handle),
               getattr(handle, "num_recv_rows", None), getattr(handle, "num_tokens", None),
               checks.sig(topk_weights),
               tuple(map(checks.sig, bias)) if isinstance(bias, (tuple, list)) else
               checks.sig(bias), config, Buffer.num_sms)
        if self._debug or key not in self._validated:
            self._validate_combine(x, handle, topk_weights, bias, config)
            self._validated.add(key)
        biases = () if bias is None else (tuple(bias) if isinstance(bias, (tuple, list)) else (bias,))
        config = config or self._default_config()
        if previous_event is not None or async_finish or allocate_on_comm_stream:
            checks.comm_stream_flags(previous_event, async_finish, allocate_on_comm_stream)
        self._begin_call(self._combine_signature(  # fault handling: call agreement
            x.shape[1], x.dtype, handle.num_experts,
            -1 if topk_weights is None else topk_weights.shape[1],
            getattr(handle.backend_state, "call_seq", -1)))
        (combined, combined_w), event = self._on_comm_stream(
            lambda: self.backend.combine(x, handle, topk_weights, biases, config),
            previous_event, async_finish, allocate_on_comm_stream, (x, topk_weights, *biases))
        return combined, combined_w, event

    def _combine_signature(self, hidden: int, dtype, num_experts: int, num_topk: int,
                           handle_seq: int) -> "agreement.Signature":
        """The combine's Signature. Those of the kernels backend's handles (no ``call_seq``:
        ``handle_seq`` -1) are built once per (hidden, dtype, experts, top-k): a new one cost
        ~1-2 us of every call. A reference-backend handle names its dispatch's number, a new
        Signature each time."""
        if handle_seq != -1:
            return agreement.Signature("combine", hidden, dtype, num_experts, num_topk,
                                       handle_seq)
        key = (hidden, dtype, num_experts, num_topk)
        sig = self._combine_sigs.get(key)
        if sig is None:
            if len(self._combine_sigs) >= 256:  # many shapes: keep the newest
                self._combine_sigs.pop(next(iter(self._combine_sigs)))
            sig = self._combine_sigs[key] = agreement.Signature("combine", hidden, dtype,
                                                                 num_experts, num_topk, -1)
        return sig

    def _validate_combine(self, x, handle, topk_weights, bias, config) -> None:
        """Every check of ``combine``'s arguments (InputError / BufferTooSmallError)."""
        if not isinstance(handle, DispatchHandle):
            raise InputError(f"handle must be the DispatchHandle of a dispatch, got "
                             f"{type(handle).__name__}")
        rows = handle.num_recv_rows
        checks.tensor("x", x, dtype=torch.bfloat16, dims=2, device=self.device)
        if x.shape[0] != rows:
            raise InputError(f"combine x has {x.shape[0]} rows but the dispatch received {rows}")
        checks.hidden_ok(x.shape[1])
        if topk_weights is not None:
            checks.tensor("topk_weights", topk_weights, dtype=torch.float32, dims=2,
                          device=self.device)
            if topk_weights.shape[0] != rows:
                raise InputError(f"topk_weights has {topk_weights.shape[0]} rows, expected {rows}")
        biases = () if bias is None else (tuple(bias) if isinstance(bias, (tuple, list)) else (bias,))
        if len(biases) > 2:
            raise InputError("bias must be a tensor or a pair of tensors")
        for i, b in enumerate(biases):
            checks.tensor(f"bias[{i}]", b, dtype=torch.bfloat16,
                          shape=(handle.num_tokens, x.shape[1]), device=self.device)
        config = config or self._default_config()
        self._check_nvl_size(x.shape[1] * 2, config, "combine", handle.num_tokens)

    # ------------------------------------------------------------------ low-latency mode
    def _check_low_latency(self, m: int, hidden: int, num_experts: int, what: str) -> None:
        if not self.low_latency_mode:
            raise InputError(f"{what} needs a Buffer created with low_latency_mode=True")
        if not isinstance(m, int) or m <= 0:
            raise InputError(f"num_max_dispatch_tokens_per_rank must be a positive int, got {m!r}")
        checks.num_experts(num_experts, self.group_size)
        checks.hidden_ok(hidden)
        # (LowLatencyRegions refuses more than LL_MAX_EXPERTS experts: the signal words' layout)
        need = self.get_low_latency_rdma_size_hint(m, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < need:
            raise BufferTooSmallError("num_rdma_bytes", need, self.num_rdma_bytes, what)

    def _validate_low_latency_dispatch(self, x, topk_idx, m, num_experts,
                                       cumulative_local_expert_recv_stats,
                                       dispatch_wait_recv_cost_stats, use_fp8, round_scale,
                                       use_ue8m0) -> None:
        """Every check of ``low_latency_dispatch``'s arguments (InputError, BufferTooSmallError)."""
        checks.tensor("x", x, dtype=torch.bfloat16, dims=2, device=self.device)
        t, hidden = x.shape
        self._check_low_latency(m, hidden, num_experts, "low_latency_dispatch")
        checks.topk_idx(topk_idx, self.device, t)
        if t > m:
            raise InputError(f"x has {t} tokens, more than num_max_dispatch_tokens_per_rank={m}")
        if use_ue8m0 and not round_scale:
            raise InputError("use_ue8m0=True needs round_scale=True (ue8m0 scales are powers of two)")
        if use_fp8 and hidden % 128:
            raise InputError(f"use_fp8 needs hidden % 128 == 0, got hidden={hidden}")
        if use_fp8 and use_ue8m0 and hidden % 512:
            raise InputError(f"use_ue8m0 needs hidden % 512 == 0, got hidden={hidden}")
        local = num_experts // self.group_size
        if cumulative_local_expert_recv_stats is not None:
            checks.tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                          dtype=torch.int32, shape=(local,), device=self.device)
        if dispatch_wait_recv_cost_stats is not None:
            checks.tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats,
                          dtype=torch.int64, shape=(self.group_size,), device=self.device)

    @_fault_guard
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
                             use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """Decode dispatch into fixed-size per-expert buffers (no host sync on the kernels).

        Args:
            x: [T, H] bf16, T <= ``num_max_dispatch_tokens_per_rank`` (the same on every rank).
            topk_idx: [T, K] int64 global expert ids, -1 = none.
            num_max_dispatch_tokens_per_rank: M, the most tokens any rank dispatches.
            num_experts: E.
            cumulative_local_expert_recv_stats: [L] int32 or None; received counts are added.
            dispatch_wait_recv_cost_stats: [R] int64 or None; nanoseconds spent waiting for
                each source rank are added.
            use_fp8: cast to fp8 with per-128-channel scales on the way.
            round_scale: scales rounded up to powers of two.
            use_ue8m0: scales as packed int32 exponents (needs round_scale; H % 512 == 0).
            async_finish: return an event instead of making the current stream wait.
            return_recv_hook: only send now; ``hook()`` receives later.

        Returns:
            recv_x: [L, R * M, H] bf16, or (fp8 [L, R * M, H], scales [L, R * M, H // 128]
                float32 column-major in the last two dims; int32 [L, R * M, H // 512] with ue8m0).
            recv_count: [L] int32 valid rows per local expert.
            handle: LowLatencyHandle for combine.
            event: EventOverlap.
            hook: callable that receives (with ``return_recv_hook``), else None.
        """
        m = num_max_dispatch_tokens_per_rank
        if self._unmasked:
            self._refuse_after_unmask("low_latency_dispatch")
        host = self._ll_host
        if host is not None and not return_recv_hook:  # a known shape, through C++
            done = host.dispatch(x, topk_idx, m, num_experts, cumulative_local_expert_recv_stats,
                                 dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0)
            if done is not None:
                return (*done, capture_event(self.device) if async_finish else EventOverlap(),
                        None)
        key = ("low_latency_dispatch", checks.sig(x), checks.sig(topk_idx), m, num_experts,
               use_fp8, round_scale, use_ue8m0, checks.sig(cumulative_local_expert_recv_stats),
               checks.sig(dispatch_wait_recv_cost_stats))
        first = key not in self._validated
        if self._debug or first:
            self._validate_low_latency_dispatch(x, topk_idx, m, num_experts,
                                                cumulative_local_expert_recv_stats,
                                                dispatch_wait_recv_cost_stats, use_fp8,
                                                round_scale, use_ue8m0)
            self._validated.add(key)
        hidden = x.shape[1]
        # fault handling: agree on the call; bad ids / NaN stop every rank (docs/faults.md)
        bad = self._bad_ids(topk_idx, num_experts, first)
        if bad is None and use_fp8:
            bad = self._bad_values(x)
        self.backend.check_low_latency_send("dispatch")
        self._begin_call(agreement.Signature(
            "low_latency_dispatch", hidden, torch.float8_e4m3fn if use_fp8 else x.dtype,
            num_experts, topk_idx.shape[1], -1, m), bad)
        recv_x, scales, recv_count, handle, hook = self.backend.low_latency_dispatch(
            x, topk_idx, m, num_experts, use_fp8=use_fp8, round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats,
            return_recv_hook=return_recv_hook)
        event = capture_event(self.device) if async_finish else EventOverlap()
        recv = (recv_x, scales) if use_fp8 else recv_x
        return recv, recv_count, handle, event, hook

    @_fault_guard
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor, handle: LowLatencyHandle,
                            use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None):
        """Decode combine: ``combined_x[t] = sum_k topk_weights[t, k] * out_row(t, topk_idx[t, k])``.

        Args:
            x: [L, R * M, H] bf16 expert outputs in the layout dispatch produced.
            topk_idx: [T, K] int64 and topk_weights: [T, K] float32, as given to dispatch.
            handle: the LowLatencyHandle of that dispatch.
            use_logfmt: accepted for compatibility; rows travel as bf16 (exact) either way.
            zero_copy: ``x`` was written into ``get_next_low_latency_combine_buffer(handle)``.
            async_finish, return_recv_hook: as in low_latency_dispatch.
            out: optional [T, H] bf16 output tensor.
            combine_wait_recv_cost_stats: [R] int64 or None (nanoseconds waited per source).

        Returns:
            combined_x: [T, H] bf16; event: EventOverlap; hook: callable or None.
        """
        if not isinstance(handle, LowLatencyHandle):
            raise InputError(f"handle must be the LowLatencyHandle of a low_latency_dispatch, "
                             f"got {type(handle).__name__}")
        if self._unmasked:
            self._refuse_after_unmask("low_latency_combine")
        host = self._ll_host
        if host is not None and not return_recv_hook:  # a known shape, through C++
            done = host.combine(x, topk_idx, topk_weights, handle, zero_copy, out,
                                combine_wait_recv_cost_stats)
            if done is not None:
                return done, capture_event(self.device) if async_finish else EventOverlap(), None
        m, hidden, e = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        key = ("low_latency_combine", checks.sig(x), checks.sig(topk_idx),
               checks.sig(topk_weights), m, hidden, e, checks.sig(out),
               checks.sig(combine_wait_recv_cost_stats))
        first = key not in self._validated
        if self._debug or first:
            self._check_low_latency(m, hidden, e, "low_latency_combine")
            local, r = e // self.group_size, self.group_size
            checks.tensor("x", x, dtype=torch.bfloat16, shape=(local, r * m, hidden),
                          device=self.device)
            checks.topk_idx(topk_idx, self.device)
            if topk_idx.shape[0] > m:
                raise InputError(f"topk_idx has {topk_idx.shape[0]} tokens, more than "
                                 f"num_max_dispatch_tokens_per_rank={m}")
            checks.topk_weights(topk_weights, topk_idx, self.device)
            if out is not None:
                checks.tensor("out", out, dtype=torch.bfloat16,
                              shape=(topk_idx.shape[0], hidden), device=self.device)
            if combine_wait_recv_cost_stats is not None:
                checks.tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats,
                              dtype=torch.int64, shape=(r,), device=self.device)
            self._validated.add(key)
        self.backend.check_low_latency_send("combine", handle)
        self._begin_call(agreement.Signature(  # fault handling: call agreement
            "low_latency_combine", hidden, x.dtype, e, topk_idx.shape[1],
            getattr(handle.backend_state, "call_seq", -1), m),
            self._bad_ids(topk_idx, e, first))
        combined, hook = self.backend.low_latency_combine(
            x, topk_idx, topk_weights, handle, zero_copy=zero_copy, use_logfmt=use_logfmt,
            out=out, return_recv_hook=return_recv_hook,
            combine_wait_recv_cost_stats=combine_wait_recv_cost_stats)
        event = capture_event(self.device) if async_finish else EventOverlap()
        return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The registered [L, R * M, H] bf16 buffer to write expert outputs into for
        ``low_latency_combine(..., zero_copy=True)``."""
        if not isinstance(handle, LowLatencyHandle):
            raise InputError("handle must be a LowLatencyHandle")
        self._check_low_latency(handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                                handle.num_experts, "get_next_low_latency_combine_buffer")
        return self.backend.get_next_low_latency_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """Reset low-latency state; required after normal-mode use of the same buffer."""
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts,
                                "clean_low_latency_buffer")
        self.backend.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden,
                                              num_experts)
        self._unmasked.clear()

    def _refuse_after_unmask(self, op: str) -> None:
        raise InputError(
            f"{op}: rank(s) {sorted(self._unmasked)} were unmasked since the last "
            "clean_low_latency_buffer. A masked rank that kept running may have left signal "
            "words that no call read; call clean_low_latency_buffer(...) on every rank (the "
            "unmasked ones included) before the next low-latency call")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = True) -> None:
        """Mark ``rank_to_mask`` as failed (``mask=True``) or healthy again (``mask=False``).
        Masked ranks are neither sent to nor waited for by low-latency calls. After unmasking,
        the next low-latency call raises InputError until ``clean_low_latency_buffer`` ran on
        every rank: a masked rank that was alive may have written signal words no call read."""
        if not isinstance(rank_to_mask, int) or not 0 <= rank_to_mask < self.group_size:
            raise InputError(f"rank_to_mask must be in [0, {self.group_size}), got {rank_to_mask!r}")
        buf = self.backend.mask_buffer()
        masked = buf.tolist()  # one read of the device mask serves both uses below
        if not mask and masked[rank_to_mask]:
            self._unmasked.add(rank_to_mask)
        buf[rank_to_mask] = masked[rank_to_mask] = 1 if mask else 0
        # fault handling: masking every lost rank lets the survivors go on (docs/faults.md)
        self.comm.unmask_failure({p for p in range(self.group_size) if masked[p]})

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy the mask ([R] int32, 1 = masked) into ``mask_status``."""
        checks.tensor("mask_status", mask_status, dtype=torch.int32, shape=(self.group_size,),
                      device=self.device)
        mask_status.copy_(self.backend.mask_buffer())

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank (then ``clean_low_latency_buffer`` on every rank before the next
        low-latency call)."""
        mask = self.backend.mask_buffer()
        self._unmasked.update(p for p, v in enumerate(mask.tolist()) if v)
        mask.zero_()


@functools.lru_cache(maxsize=64)
def _low_latency_bytes(m: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """``LowLatencyRegions(...).total_bytes``, once per size (every low-latency call checks
    it; carving the regions costs microseconds)."""
    return LowLatencyRegions(m, hidden, num_ranks, num_experts).total_bytes


def _bounded(fn, timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread; True if it finished within ``timeout_s`` (fault handling:
    a teardown that waits for a lost peer must not hang destroy or exit)."""
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller below
            errors.append(e)
    t = threading.Thread(target=run, daemon=True, name="ep_comm-destroy")
    t.start()
    t.join(timeout_s)
    if errors:
        raise errors[0]
    return not t.is_alive()


@atexit.register
def _destroy_all_at_exit() -> None:
    """Free every live Buffer at exit, each bounded by DESTROY_TIMEOUT_S (fault handling)."""
    for buf in list(_LIVE_BUFFERS):
        if getattr(buf, "_backend", None) is None:
            continue
        try:
            backend, buf._backend = buf._backend, None
            if not _bounded(backend.destroy, DESTROY_TIMEOUT_S):
                print(f"ep_comm: Buffer of rank {buf.rank} did not free its buffers at exit "
                      f"within {DESTROY_TIMEOUT_S:g} s; abandoned", flush=True)
        except Exception as e:  # noqa: BLE001 - exit goes on; say why
            print(f"ep_comm: Buffer of rank {buf.rank} could not free its buffers at exit: {e}",
                  flush=True)


def _tensors(obj):
    """Every tensor inside nested tuples/lists (for record_stream). Lists of numbers (the
    per-expert counts, hundreds of ints) are skipped whole: walking them item by item was the
    largest host cost of a dispatch (bench/host_overhead.py)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        if obj and isinstance(obj[0], (int, float)):
            return
        for o in obj:
            yield from _tensors(o)
