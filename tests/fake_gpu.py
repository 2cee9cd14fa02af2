"""A CPU stand-in for the GPU under the kernels backend's host path: compiled modules whose
prepared launches record instead of calling cuLaunchKernel, a host status word in plain
memory, no IPC. It runs the real Python of ``IntranodeRuntime`` / ``LowLatencyRuntime`` (plans,
argument patching, allocations, handles) on CPU tensors, so tests can check what a launch
receives and ``bench/host_overhead.py --fake-gpu`` can time the Python per call."""
from __future__ import annotations

import contextlib
import ctypes

import torch

from ep_comm.runtime import jit


#: cuLaunchKernel's C signature (CUresult is an int; handles and pointers are void*).
_LAUNCH_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_uint] * 7,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
#: cuEventRecord's and cuEventSynchronize's.
_RECORD_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_SYNC_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class FakeModule:
    """A compiled module whose launches are recorded: (kernel, grid, {name: value})."""

    cubin_path = "fake.cubin"

    def __init__(self, record: bool = True):
        self.launches = []
        self.record = record
        #: ``fn(kernel name, {name: value})`` called at each launch: a test's stand-in for what
        #: the kernel would write (e.g. a status word).
        self.on_launch = None
        self._by_params = {}  # argument array address -> PreparedLaunch (the native recorder)
        self._native = None
        #: launches made by the C++ host path (through ``native``)
        self.native_launches = 0
        #: ("record", event, stream) / ("sync", event) of the C++ path's count waits
        self.native_events = []
        self._event_fns = None

    def prepare(self, kernel, arg_buffer, grid, block, shared_mem=0):
        # ``native``: the C++ host path launches through this ctypes recorder as it would
        # through cuLaunchKernel (no capture query: 0), and the same record is kept.
        prepared = jit.PreparedLaunch(kernel, arg_buffer, grid, block, shared_mem, self._launch,
                                      (self._native_address, 0, len(self._by_params) + 1))
        self._by_params[arg_buffer.address] = prepared
        return prepared

    @property
    def _native_address(self):
        if self._native is None:
            def native(func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
                prepared = self._by_params[params]
                if (bx, by, bz, gy, gz, smem) != (prepared.block, 1, 1, 1, 1,
                                                  prepared.shared_mem):
                    return 1  # CUDA_ERROR_INVALID_VALUE: not the plan's block / shared memory
                prepared.grid = gx
                self.native_launches += 1
                self._launch(prepared, stream or 0)
                return 0
            self._native = _LAUNCH_FN(native)
        return ctypes.cast(self._native, ctypes.c_void_p).value

    def native_event_fns(self):
        """As ``jit.CompiledModule.native_event_fns``: recorders of the C++ path's count wait
        (the event is done at once: the fake notify 'kernel' ran at its launch)."""
        if self._event_fns is None:
            def record(event, stream):
                self.native_events.append(("record", event, stream or 0))
                return 0

            def sync(event):
                self.native_events.append(("sync", event))
                return 0
            self._event_fns = (_RECORD_FN(record), _SYNC_FN(sync))
        return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in self._event_fns)

    def _launch(self, prepared, stream):
        if self.record:
            self.launches.append((prepared.name, prepared.grid, prepared.args.values()))
        if self.on_launch is not None:
            self.on_launch(prepared.name, prepared.args.values())


class FakeHostStatus:
    """ep_comm.runtime.ipc.HostStatus in plain memory (the notify 'kernel' writes nothing, so
    a count wait reads zeros unless a test sets ``words``)."""

    def __init__(self, nwords, device_index=0):
        self.nwords = nwords
        self._view = (ctypes.c_int32 * nwords)()
        self.device_ptr = self.host_ptr = ctypes.addressof(self._view)

    def read(self, n=None):
        return self._view[:self.nwords if n is None else n]

    def clear(self, start=0):
        ctypes.memset(self.device_ptr + start * 4, 0, (self.nwords - start) * 4)

    def free(self):
        pass


class FakeNvl:
    def __init__(self, num_ranks, nbytes):
        self.peer_ptrs_dev = torch.zeros(num_ranks, dtype=torch.int64)
        self.nbytes = self.min_nbytes = nbytes  # every fake rank's buffer alike
        self.freed = []  # synchronize_peers of each free()

    def free(self, synchronize_peers=True):
        self.freed.append(synchronize_peers)


class FakeEvent:
    _next = 0x1000

    def __init__(self):
        # a raw event handle for the C++ path's count wait (any non-zero value)
        FakeEvent._next += 16
        self.cuda_event = FakeEvent._next

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class FakeComm:
    def __init__(self, rank=0, num_ranks=1):
        self.rank, self.num_ranks, self.device = rank, num_ranks, torch.device("cpu", 0)
        self.barriers = []
        # what ep_comm.Buffer reads of a Comm: one node holding every rank
        self.group, self.backend = None, "fake"
        self.ranks_per_node, self.num_nodes, self.node, self.local_rank = num_ranks, 1, 0, rank

        # the fault-handling state ep_comm.Buffer keeps on its Comm (a healthy group)
        self.failure, self.lost, self.seq = None, set(), 0
        self.call = None  # (signature, bad input) of the current call
        self.agreed = []  # phases of the host agreement exchanges made (``agree``)

    def barrier(self, phase):
        self.barriers.append(phase)

    def node_of(self):
        return None

    def raise_if_failed(self):
        pass

    def mark_failed(self, err, peers):
        self.failure = err

    def begin_call(self, sig, bad=None, record=False):
        """Number the call (the Buffer raises a bad input itself when it does not agree)."""
        self.seq += 1
        self.call = (sig, bad)
        return self.seq

    def unnumber_call(self):
        self.seq -= 1

    def call_words(self):
        """As ``Comm.call_words``: the current call's device signature words and bad input (a
        runtime driven without a Buffer: a dispatch signature of call 0)."""
        from ep_comm.core import agreement
        sig, bad = self.call or (agreement.Signature("dispatch"), None)
        return agreement.device_words(self.seq, sig, bad), bad

    def agree(self, payload=None, peers=None, phase="agree"):
        """The Buffer's own agreement exchange (not fused): recorded, always agreeing."""
        self.agreed.append(phase)


@contextlib.contextmanager
def patched(monkeypatch=None):
    """Patch torch.cuda / ipc / jit for the fake runtimes (pytest's monkeypatch, or our own)."""
    from ep_comm.runtime import ipc, nvshmem

    class Props:
        multi_processor_count = 132

    mp = monkeypatch or _MonkeyPatch()
    module = FakeModule()
    mp.setattr(torch.cuda, "get_device_properties", lambda dev: Props())
    mp.setattr(torch.cuda, "synchronize", lambda dev=None: None)
    mp.setattr(torch.cuda, "Stream", lambda dev=None: None)
    mp.setattr(torch.cuda, "Event", FakeEvent)
    mp.setattr(ipc, "HostStatus", FakeHostStatus)
    mp.setattr(ipc, "NvlBuffer", lambda comm, n: FakeNvl(comm.num_ranks, n))
    mp.setattr(jit, "compile_kernels", lambda *a, **k: module)
    mp.setattr(jit, "current_stream_handle", lambda index: 0)
    mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    mp.setattr(nvshmem, "acquire", lambda comm, n: nvshmem.SymmetricBuffer(
        torch.zeros(nvshmem.aligned(n), dtype=torch.uint8), nvshmem.aligned(n)))
    mp.setattr(nvshmem, "bind_module", lambda m: None)
    try:
        yield module
    finally:
        if monkeypatch is None:
            mp.undo()


@contextlib.contextmanager
def intranode_runtime(monkeypatch=None, rank: int = 0, num_ranks: int = 1):
    """An ``IntranodeRuntime`` of rank ``rank`` of ``num_ranks`` on the fake GPU, with the
    module recording its launches as ``fake_module``."""
    from ep_comm.backends.kernels.intranode import IntranodeRuntime
    with patched(monkeypatch) as module:
        rt = IntranodeRuntime(FakeComm(rank, num_ranks), 1 << 30)
        rt.fake_module = module
        yield rt


def layout_and_dispatch(rt, t=16, h=256, e=8, k=2, worst=0):
    """get_dispatch_layout then a dispatch from it on runtime ``rt`` (ids ``arange % e``, zero
    rows, unit weights); returns (the dispatch's results, x)."""
    from ep_comm.config import default_config
    idx = torch.arange(t * k, dtype=torch.int64).view(t, k) % e
    ntpr, _, ntpe, in_rank = rt.get_dispatch_layout(idx, e)
    x = torch.zeros(t, h, dtype=torch.bfloat16)
    w = torch.ones(t, k)
    return rt.dispatch(x, None, handle=None, num_tokens_per_rank=ntpr,
                       num_tokens_per_rdma_rank=None, is_token_in_rank=in_rank,
                       num_tokens_per_expert=ntpe, topk_idx=idx, topk_weights=w,
                       num_experts=e, expert_alignment=1, num_worst_tokens=worst,
                       config=default_config(rt.num_ranks)), x


@contextlib.contextmanager
def fake_buffer(monkeypatch=None, num_ranks: int = 1, **buffer_kw):
    """An ``ep_comm.Buffer`` of rank 0 of ``num_ranks`` (one node) on the fake GPU, kernels
    backend: the public calls run their real Python (checks, guard, runtimes, plans) on CPU
    tensors; nothing travels between ranks. Yields (buffer, the fake module whose ``launches``
    record what was launched)."""
    import ep_comm
    from ep_comm import buffer as buffer_mod

    mp = monkeypatch or _MonkeyPatch()
    mp.setattr(buffer_mod, "Comm", lambda group, ranks_per_node=None: FakeComm(0, num_ranks))
    mp.setattr(buffer_mod.Buffer, "_resolve_backend", lambda self, backend: "kernels")
    try:
        with patched(mp) as module:
            buf = ep_comm.Buffer(None, backend="kernels", explicitly_destroy=True, **buffer_kw)
            try:
                yield buf, module
            finally:
                buf.destroy()
    finally:
        if monkeypatch is None:
            mp.undo()


class _MonkeyPatch:
    def __init__(self):
        self._saved = []

    def setattr(self, obj, name, value):
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)


def refusing(rt, kernel: str, peer_words):
    """An ``on_launch`` for which the notify kernel ``kernel`` ("nvl_notify" or "inter_notify")
    of runtime ``rt`` (rank 0 of 2) refuses the call: rank 1's words are ``peer_words(a copy of
    this rank's words)`` (``with_word`` changes one field)."""
    def on_launch(name, values):
        if name == kernel:
            refuse_notify(rt, {0: values["sig"], 1: peer_words(list(values["sig"]))})
    return on_launch


def with_word(field: str, value: int):
    """``peer_words`` for ``refusing``: this rank's words with ``field`` set to ``value``."""
    from ep_comm.core.constants import CALL_SIG_FIELDS

    def peer_words(words):
        words[CALL_SIG_FIELDS.index(field)] = value
        return words
    return peer_words


def assert_hidden_mismatch_text(err) -> None:
    """The reference backend's text of rank 0's CollectiveMismatchError for call #1 where it
    passed hidden 256 and rank 1 hidden 128 (every value with the ranks holding it)."""
    assert err.field == "hidden"
    text = str(err)
    assert text.startswith("rank 0: the ranks disagree on call #1"), text
    assert "ranks [0] have hidden=256; ranks [1] have hidden=128" in text, text


def refuse_notify(rt, rows: dict[int, list[int]]) -> None:
    """What refusing notify kernels (NVLink or internode) leave in the runtime ``rt``'s host
    status word when every rank ran the notify: every rank's call-signature words, then the
    first differing (word, rank) as the kernels pick them (else the first rank whose status
    word reports a bad input), and the code STATUS_DISAGREE last."""
    from ep_comm.core.constants import (CALL_SIG_FIELDS, CALL_SIG_WORDS, NVL_INFO_CALL_SIGS,
                                        PHASE_NOTIFY, STATUS_DISAGREE)
    status = CALL_SIG_FIELDS.index("status")
    view = rt.status._view
    for r, words in rows.items():
        at = NVL_INFO_CALL_SIGS + r * CALL_SIG_WORDS
        view[at:at + CALL_SIG_WORDS] = words
    mine = rows[rt.rank]
    diffs = [(w, r) for r, row in rows.items() for w in range(status) if row[w] != mine[w]]
    word, peer = min(diffs) if diffs else (-1, min(r for r, row in rows.items() if row[status]))
    view[1:6] = [PHASE_NOTIFY, peer, word, rows[peer][word] if word >= 0 else 0,
                 mine[word] if word >= 0 else 0]
    view[0] = STATUS_DISAGREE
