"""Stream order of the normal-mode calls of one Buffer (ep_comm.buffer, ``Buffer._sync_begin``
...), on the fake GPU (tests/fake_gpu.py) with recording stand-ins of torch's streams and events.

A synchronous call runs on the current stream (no stream switch), an async one on the comm
stream. The kernels of one Buffer must still run one after the other in call order (they share
the sequence word ctrl[0], counters and rings): after a comm-stream call the next synchronous
call makes the current stream wait for it (once); after a synchronous call (once a comm-stream
call was made) the next comm-stream call waits for it as well as for ``previous_event``. A
purely synchronous user records no event and waits on nothing. Both the Python path and the
C++ host path (built at first use; the "cpp" cases skip without a compiler) are checked, and
ElasticBuffer's ``async_with_compute_stream``.
"""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

import ep_comm
from ep_comm.event import EventOverlap
from ep_comm.runtime import host_ext, jit

import fake_gpu

T, H, E, K = 16, 256, 8, 2
HAVE_CXX = bool(shutil.which("ninja") and (shutil.which("c++") or shutil.which("g++")))


class World:
    """Two fake streams (compute, comm), torch's current stream among them, and a log of
    ("wait", stream, event), ("wait_stream", stream, other), ("record", stream, event) and
    ("launch", kernel, stream) in the order they happened."""

    def __init__(self):
        self.log = []
        self.compute = FakeStream(self, "compute", 0x100)
        self.comm = FakeStream(self, "comm", 0x200)
        self.current = self.compute
        self.events = 0

    def ops(self, kind):
        return [e for e in self.log if e[0] == kind]

    def since(self, mark):
        return self.log[mark:]


class FakeStream:
    def __init__(self, world, name, handle):
        self.world, self.name, self.handle = world, name, handle

    def wait_event(self, ev):
        self.world.log.append(("wait", self.name, ev.name))

    def wait_stream(self, other):
        self.world.log.append(("wait_stream", self.name, other.name))


def _event_class(world):
    class RecEvent(fake_gpu.FakeEvent):
        def __init__(self, *a, **k):
            super().__init__()
            world.events += 1
            self.name = f"ev{world.events}"

        def record(self, stream=None):
            world.log.append(("record", (stream or world.current).name, self.name))
    return RecEvent


@contextlib.contextmanager
def streams(monkeypatch, buf, module):
    """Install the recording streams and events around ``buf`` (a fake_gpu Buffer)."""
    world = World()

    @contextlib.contextmanager
    def stream(s):
        saved, world.current = world.current, s
        try:
            yield
        finally:
            world.current = saved

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: world.current)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "Event", _event_class(world))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    monkeypatch.setattr(jit, "current_stream_handle", lambda index: world.current.handle)
    buf._comm_stream = world.comm
    previous = module.on_launch

    def on_launch(name, values):
        world.log.append(("launch", name, world.current.name))
        if previous is not None:
            previous(name, values)
    module.on_launch = on_launch
    yield world


@pytest.fixture(params=["python", "cpp"])
def setup(monkeypatch, request):
    monkeypatch.delenv(host_ext.HOST_EXT_ENV, raising=False)
    if request.param == "cpp" and not HAVE_CXX:
        pytest.skip("the C++ host path needs a C++ compiler and ninja to build")
    with fake_gpu.fake_buffer(monkeypatch, num_nvl_bytes=1 << 26) as (buf, module):
        if request.param == "python":
            buf._normal_host = buf._layout_host = None
        else:
            assert buf._normal_host is not None, host_ext.status("host_path")
        with streams(monkeypatch, buf, module) as world:
            yield buf, module, world, request.param


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    return x, idx, w


def _layout(buf, idx, **flags):
    ntpr, _, ntpe, in_rank, ev = buf.get_dispatch_layout(idx, E, **flags)
    return dict(num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                topk_idx=idx), ev


def _dispatch(buf, x, idx, w, **flags):
    kw, _ = _layout(buf, idx)
    return buf.dispatch(x, **kw, topk_weights=w, num_worst_tokens=2 * T, **flags)


def _combine(buf, handle, **flags):
    y = torch.zeros(handle.num_recv_rows, H, dtype=torch.bfloat16)
    return buf.combine(y, handle, **flags)


def _warm(buf, module, mode):
    """Two synchronous rounds (the C++ path learns the shapes on the first); returns the
    handle of the last dispatch."""
    x, idx, w = _inputs()
    for _ in range(2):
        handle = _dispatch(buf, x, idx, w)[4]
        _combine(buf, handle)
    if mode == "cpp":
        native, launches = module.native_launches, len(module.launches)
        handle = _dispatch(buf, x, idx, w)[4]
        _combine(buf, handle)
        # every launch of the round (layout, notify, dispatch, combine) made by C++
        assert module.native_launches - native == len(module.launches) - launches >= 4
    return handle


def test_a_synchronous_only_user_records_no_event_and_waits_on_nothing(setup):
    buf, module, world, mode = setup
    _warm(buf, module, mode)
    x, idx, w = _inputs(1)
    for _ in range(3):
        handle = _dispatch(buf, x, idx, w)[4]
        _combine(buf, handle)
        buf.dispatch(x, handle=handle)
    assert world.ops("launch") and all(op[2] == "compute" for op in world.ops("launch"))
    assert [op for op in world.log if op[0] != "launch"] == []
    assert not getattr(buf, "_ordered", False) and world.events == 0


def test_a_synchronous_call_after_an_async_one_waits_for_the_comm_stream_once(setup):
    """Async dispatch of batch B on the comm stream, then a synchronous combine of batch A
    before B's event was waited on: the combine's kernels go after B's on the GPU."""
    buf, module, world, mode = setup
    handle_a = _warm(buf, module, mode)
    x, idx, w = _inputs(2)
    kw, _ = _layout(buf, idx)
    mark = len(world.log)
    out_b = buf.dispatch(x, **kw, topk_weights=w, num_worst_tokens=2 * T, async_finish=True)
    event_b = out_b[5].event
    assert event_b is not None
    async_part = world.since(mark)
    assert ("wait_stream", "comm", "compute") in async_part
    assert ("record", "comm", event_b.name) == async_part[-1]
    assert all(op[2] == "comm" for op in async_part if op[0] == "launch")

    native = module.native_launches
    mark = len(world.log)
    _combine(buf, handle_a)  # synchronous, before waiting on B's event
    first = world.since(mark)
    assert first[0] == ("wait", "compute", event_b.name), first
    launches = [i for i, op in enumerate(first) if op[0] == "launch"]
    assert launches and all(first[i][2] == "compute" for i in launches)
    assert [op for op in first if op[0] == "wait"] == [("wait", "compute", event_b.name)]
    if mode == "cpp":
        assert module.native_launches - native == len(launches)  # the C++ path did it

    mark = len(world.log)
    _combine(buf, handle_a)  # the wait is not repeated: stream order carries it
    assert [op for op in world.since(mark) if op[0] == "wait"] == []

    out_b[5].current_stream_wait()
    _combine(buf, out_b[4])


def test_a_synchronous_layout_and_cached_dispatch_after_an_async_call_wait_too(setup):
    buf, module, world, mode = setup
    handle_a = _warm(buf, module, mode)
    x, idx, w = _inputs(3)
    for call in (lambda: _layout(buf, idx),
                 lambda: buf.dispatch(x, handle=handle_a)):
        _, _, ev = _combine(buf, handle_a, async_finish=True)
        mark = len(world.log)
        call()
        waits = [op for op in world.since(mark) if op[0] == "wait"]
        assert waits == [("wait", "compute", ev.event.name)]
        assert world.since(mark)[0] == waits[0]


def test_an_async_call_waits_for_the_last_synchronous_call_and_its_previous_event(setup):
    """Once a comm-stream call was made, a synchronous call records where its kernels end;
    the next async call given previous_event (which covers only what the caller chose) waits
    for that too."""
    buf, module, world, mode = setup
    handle_a = _warm(buf, module, mode)
    _, _, ev = _combine(buf, handle_a, async_finish=True)  # ordered mode from here on
    ev.current_stream_wait()

    mark = len(world.log)
    _combine(buf, handle_a)  # synchronous
    sync_part = world.since(mark)
    records = [op for op in sync_part if op[0] == "record"]
    assert len(records) == 1 and records[0][1] == "compute" and sync_part[-1] == records[0]
    sync_event = records[0][2]

    user = torch.cuda.Event()  # the caller's previous_event, recorded elsewhere
    mark = len(world.log)
    _, _, ev2 = _combine(buf, handle_a, previous_event=EventOverlap(user), async_finish=True)
    async_part = world.since(mark)
    waits = [op for op in async_part if op[0] in ("wait", "wait_stream")]
    assert ("wait", "comm", user.name) in waits
    assert ("wait", "comm", sync_event) in waits
    first_launch = next(i for i, op in enumerate(async_part) if op[0] == "launch")
    assert async_part.index(("wait", "comm", sync_event)) < first_launch
    assert async_part[first_launch][2] == "comm"

    mark = len(world.log)
    _, _, ev3 = _combine(buf, handle_a, previous_event=EventOverlap(user), async_finish=True)
    # no synchronous call since: only the caller's event
    assert [op for op in world.since(mark) if op[0] == "wait"] == [("wait", "comm", user.name)]


def test_allocate_on_comm_stream_without_async_finish_hands_its_event_to_the_next_call(setup):
    """A comm-stream call that makes the current stream wait itself (previous_event without
    async_finish) does it through the event the next synchronous call waits for."""
    buf, module, world, mode = setup
    handle_a = _warm(buf, module, mode)
    user = torch.cuda.Event()
    mark = len(world.log)
    _, _, ev = _combine(buf, handle_a, previous_event=EventOverlap(user))
    assert ev.event is None
    part = world.since(mark)
    done = part[-2]
    assert done[0] == "record" and done[1] == "comm"
    assert part[-1] == ("wait", "compute", done[2])


def test_elastic_buffer_async_calls_keep_the_same_order(monkeypatch):
    """ElasticBuffer(async_with_compute_stream=True) runs the inner Buffer's calls on the comm
    stream: a later synchronous ElasticBuffer call waits for them, and the next async one for
    the synchronous one."""
    monkeypatch.delenv(host_ext.HOST_EXT_ENV, raising=False)
    from test_elastic_expand_host import _elastic_over
    with fake_gpu.fake_buffer(monkeypatch, num_nvl_bytes=1 << 26) as (buf, module):
        with streams(monkeypatch, buf, module) as world:
            eb = _elastic_over(buf, T)
            eb.device = torch.device("cuda", 0)  # take the stream branch of _stream_scope
            monkeypatch.setattr(eb, "get_theoretical_num_sms", lambda *a: 20, raising=False)
            x, idx, w = _inputs(4)
            _, _, _, h_a, _ = eb.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                          do_cpu_sync=False)
            assert world.ops("record") == [] and world.ops("wait") == []
            out_b = eb.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                do_cpu_sync=False, async_with_compute_stream=True)
            ev_b = out_b[4].event
            mark = len(world.log)
            eb.combine(torch.zeros(h_a.dispatch_handle.num_recv_rows, H, dtype=torch.bfloat16),
                       h_a)
            part = world.since(mark)
            assert part[0] == ("wait", "compute", ev_b.name), part
            sync_event = [op for op in part if op[0] == "record"][-1][2]
            mark = len(world.log)
            eb.combine(torch.zeros(h_a.dispatch_handle.num_recv_rows, H, dtype=torch.bfloat16),
                       h_a, async_with_compute_stream=True)
            assert ("wait", "comm", sync_event) in world.since(mark)
