"""The C++ host path (kernels/host/host_path.cpp) of the low-latency calls, the layout and the
normal-mode NVLink dispatch and combine on the fake GPU (tests/fake_gpu.py): a later call of a
learnt shape is launched from C++ with exactly the arguments the Python path gives, and
everything the C++ side has not learnt (a new shape, bad input, a hook, a status word already
set) goes to the Python path, which raises its own error.

The extension is built at first use (~20 s, then cached); without a C++ compiler and ninja
these tests skip, saying so."""
from __future__ import annotations

import shutil

import pytest
import torch

import ep_comm
from ep_comm.core import agreement
from ep_comm.core.constants import LL_INFO_BAD_ID, NVL_INFO_EXPERT_COUNTS, NVL_INFO_NUM_RECV
from ep_comm.errors import CommTimeoutError, InputError
from ep_comm.runtime import host_ext

import fake_gpu

pytestmark = pytest.mark.skipif(
    not (shutil.which("ninja") and (shutil.which("c++") or shutil.which("g++"))),
    reason="the C++ host path needs a C++ compiler and ninja to build")

M, H, E, K = 32, 256, 8, 3
OUTPUTS = {"recv_x", "recv_scales", "src_info", "range_begin", "range_count", "recv_count",
           "out"}


@pytest.fixture
def ll(monkeypatch):
    monkeypatch.delenv(host_ext.HOST_EXT_ENV, raising=False)
    rdma = ep_comm.Buffer.get_low_latency_rdma_size_hint(M, H, 1, E)
    with fake_gpu.fake_buffer(monkeypatch, low_latency_mode=True,
                              num_rdma_bytes=rdma) as (buf, module):
        assert buf._ll_host is not None, host_ext.status("host_path")
        yield buf, module


def _inputs(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, E, (t, K), generator=g)
    w = torch.rand(t, K, generator=g)
    return x, idx, w


def _round_trip(buf, x, idx, w, **kw):
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, **kw)
    y = torch.randn(E, M, H).to(torch.bfloat16)
    out, _, _ = buf.low_latency_combine(y, idx, w, handle)
    return recv, count, handle, y, out


def _python_only(buf):
    """Context: the Buffer's calls take the Python path (the C++ path set aside)."""
    class Ctx:
        def __enter__(self):
            self.host, buf._ll_host = buf._ll_host, None

        def __exit__(self, *exc):
            buf._ll_host = self.host
    return Ctx()


def test_extension_writes_the_runtimes_per_call_arguments():
    from ep_comm.backends.kernels import host_path
    from ep_comm.backends.kernels.low_latency import LL_COMBINE_PER_CALL, LL_DISPATCH_PER_CALL
    ext = host_path.load_extension()
    assert tuple(ext.DISPATCH_SLOTS) == LL_DISPATCH_PER_CALL
    assert tuple(ext.COMBINE_SLOTS) == LL_COMBINE_PER_CALL


@pytest.mark.parametrize("use_fp8", [True, False])
def test_cpp_launches_exactly_what_the_python_path_launches(ll, use_fp8):
    buf, module = ll
    x, idx, w = _inputs(13)
    for _ in range(2):  # one call per buffer half: the Python path learns both plans
        _round_trip(buf, x, idx, w, use_fp8=use_fp8)
    assert module.native_launches == 0
    runs = {}
    for path in ("python", "cpp"):
        for half in (0, 1):
            start = len(module.launches)
            if path == "python":
                with _python_only(buf):
                    res = _round_trip(buf, x, idx, w, use_fp8=use_fp8)
            else:
                res = _round_trip(buf, x, idx, w, use_fp8=use_fp8)
            tag = agreement.ll_tag(buf.comm.call_words()[0])  # the combine's: the last call
            runs[path, half] = (module.launches[start:], res, tag)
    assert module.native_launches == 4  # two dispatches and two combines through C++
    for half in (0, 1):
        (py_l, py_res, py_tag), (c_l, c_res, c_tag) = runs["python", half], runs["cpp", half]
        assert [(n, g) for n, g, _ in py_l] == [(n, g) for n, g, _ in c_l]
        recv, count, handle, y, out = c_res
        recv_x, scales = recv if use_fp8 else (recv, None)
        assert handle.buffer_idx == half == py_res[2].buffer_idx
        produced = {"recv_x": recv_x, "recv_scales": scales, "src_info": handle.src_info,
                    "range_begin": handle.range_begin, "range_count": handle.range_count,
                    "recv_count": count}
        for (name, _, py_args), (_, _, c_args) in zip(py_l, c_l):
            assert py_args.keys() == c_args.keys()
            for arg, value in c_args.items():
                if name.startswith("ep_ll_dispatch") and arg in produced:
                    t = produced[arg]
                    assert value == (0 if t is None else t.data_ptr()), (name, arg)
                elif name == "ep_ll_combine" and arg == "out":
                    assert value == out.data_ptr()
                elif name == "ep_ll_combine" and arg in ("src_info", "range_begin",
                                                         "range_count"):
                    assert value == getattr(handle, arg).data_ptr()
                elif arg == "x" and name == "ep_ll_combine":
                    assert value == y.data_ptr()
                elif arg == "call_tag":
                    # the same signature hash; the call numbers are the calls' own
                    assert value & 0xFFFF == py_args[arg] & 0xFFFF != 0
                else:
                    assert value == py_args[arg], (name, arg)
        assert c_l[-1][2]["call_tag"] == c_tag and py_l[-1][2]["call_tag"] == py_tag
        # outputs: the same shapes, dtypes, strides
        for a, b in zip(py_res[:2], c_res[:2]):
            for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                assert (u.shape, u.dtype, u.stride()) == (v.shape, v.dtype, v.stride())
        assert (py_res[4].shape, py_res[4].dtype) == (out.shape, out.dtype)


def test_calls_are_numbered_and_halves_alternate_as_on_the_python_path(ll):
    buf, module = ll
    x, idx, w = _inputs(5)
    halves = []
    for i in range(6):
        _, _, handle, _, _ = _round_trip(buf, x, idx, w)
        halves.append(handle.buffer_idx)
        assert buf.comm.seq == 2 * (i + 1)
        assert buf.comm.call[0].op == "low_latency_combine"
    assert halves == [0, 1, 0, 1, 0, 1]
    assert module.native_launches == 8


def test_what_cpp_has_not_learnt_goes_to_the_python_path(ll):
    buf, module = ll
    x, idx, w = _inputs(7)
    for _ in range(3):
        _round_trip(buf, x, idx, w)
    n = module.native_launches
    assert n == 2
    # a new number of tokens: Python runs it (and learns it)
    x2, idx2, w2 = _inputs(9, seed=1)
    _round_trip(buf, x2, idx2, w2)
    assert module.native_launches == n
    # a receive hook: Python
    _, _, handle, _, hook = buf.low_latency_dispatch(x, idx, M, E, return_recv_hook=True)
    hook()
    assert module.native_launches == n
    buf.low_latency_combine(torch.zeros(E, M, H, dtype=torch.bfloat16), idx, w, handle)
    n = module.native_launches  # that combine's shape is known: C++
    # bad input of a known shape's sizes: the Python path's own error, before any launch
    launches = len(module.launches)
    with pytest.raises(InputError, match="contiguous"):
        buf.low_latency_dispatch(torch.randn(H, 7).to(torch.bfloat16).t(), idx, M, E)
    with pytest.raises(InputError):
        buf.low_latency_dispatch(x.float(), idx, M, E)
    with pytest.raises(InputError):
        buf.low_latency_dispatch(x, idx.to(torch.int32), M, E)
    with pytest.raises(InputError):
        buf.low_latency_combine(torch.zeros(E, M, H, dtype=torch.bfloat16), idx, w.double(),
                                handle)
    assert len(module.launches) == launches


def test_a_status_word_already_set_is_raised_by_the_python_path(ll):
    buf, module = ll
    x, idx, w = _inputs(4)
    for _ in range(3):
        _round_trip(buf, x, idx, w)
    n = module.native_launches
    words = buf.backend.ll._status
    words._view[LL_INFO_BAD_ID:LL_INFO_BAD_ID + 4] = (1, 2, 1, 99)  # a dispatch kernel's report
    with pytest.raises(InputError, match=r"topk_idx\[2, 1\] = 99"):
        buf.low_latency_dispatch(x, idx, M, E)
    assert module.native_launches == n
    _round_trip(buf, x, idx, w)  # cleared: C++ again
    assert module.native_launches == n + 2
    words._view[0] = 1  # a timeout: raised at every later call, never launched
    for _ in range(2):
        with pytest.raises(CommTimeoutError):
            buf.low_latency_dispatch(x, idx, M, E)
    assert module.native_launches == n + 2


def test_combine_out_and_zero_copy_through_cpp(ll):
    buf, module = ll
    x, idx, w = _inputs(6)
    out = torch.empty(6, H, dtype=torch.bfloat16)
    for i in range(4):
        _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E)
        stage = buf.get_next_low_latency_combine_buffer(handle)
        res, _, _ = buf.low_latency_combine(stage, idx, w, handle, zero_copy=True, out=out)
        assert res is out
        last = module.launches[-1][2]
        assert last["x"] == stage.data_ptr() and last["zero_copy"] == 1
        assert last["out"] == out.data_ptr()
    assert module.native_launches == 4  # calls 3 and 4, dispatch and combine


@pytest.mark.parametrize("env", [(host_ext.HOST_EXT_ENV, "0"), ("EP_COMM_DEBUG", "1"),
                                 ("EP_COMM_CHECK_IDS", "1"), ("EP_COMM_CHECK_FINITE", "1")])
def test_per_call_host_checks_or_the_switch_keep_the_python_path(monkeypatch, env):
    monkeypatch.setenv(*env)
    rdma = ep_comm.Buffer.get_low_latency_rdma_size_hint(M, H, 1, E)
    with fake_gpu.fake_buffer(monkeypatch, low_latency_mode=True,
                              num_rdma_bytes=rdma) as (buf, module):
        assert buf._ll_host is None
        x, idx, w = _inputs(3)
        for _ in range(4):
            _round_trip(buf, x, idx, w)
        assert module.native_launches == 0


# ------------------------------------------------------------------------------ the layout
@pytest.fixture
def nvl(monkeypatch):
    monkeypatch.delenv(host_ext.HOST_EXT_ENV, raising=False)
    with fake_gpu.fake_buffer(monkeypatch, num_nvl_bytes=1 << 24) as (buf, module):
        assert buf._layout_host is not None, host_ext.status("host_path")
        yield buf, module


def test_layout_through_cpp_launches_what_the_python_path_launches(nvl):
    buf, module = nvl
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, E, (37, K), generator=g)
    py = buf.get_dispatch_layout(idx, E)  # first call of this shape: Python, learnt
    assert module.native_launches == 0
    c = buf.get_dispatch_layout(idx, E)
    assert module.native_launches == 1
    (_, _, py_args), (_, grid, c_args) = module.launches[-2:]
    assert grid == module.launches[-2][1]
    for arg, value in c_args.items():
        if arg == "num_tokens_per_rank":
            assert value == c[0].data_ptr()
        elif arg == "num_tokens_per_expert":
            assert value == c[2].data_ptr() == c[0].data_ptr() + 4 * buf.group_size
        elif arg == "is_token_in_rank":
            assert value == c[3].data_ptr()
        else:
            assert value == py_args[arg], arg
    assert c[1] is None and c[4].event is None
    for a, b in zip(py[:4], c[:4]):
        if a is not None:
            assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


def test_layout_declines_what_it_has_not_learnt(nvl):
    buf, module = nvl
    idx = torch.randint(0, E, (12, K))
    buf.get_dispatch_layout(idx, E)
    buf.get_dispatch_layout(idx, E)
    assert module.native_launches == 1
    buf.get_dispatch_layout(torch.randint(0, E, (13, K)), E)  # a new token count
    buf.get_dispatch_layout(idx[:, :2].contiguous(), E)          # a new top-k
    assert module.native_launches == 1
    with pytest.raises(InputError, match="contiguous"):
        buf.get_dispatch_layout(idx.t().contiguous().t(), E)
    with pytest.raises(InputError):
        buf.get_dispatch_layout(idx.to(torch.int32), E)
    with pytest.raises(InputError):
        buf.get_dispatch_layout(idx.tolist(), E)
    with pytest.raises(InputError):
        buf.get_dispatch_layout(idx, 0)
    assert module.native_launches == 1


# ------------------------------------------------------------------ the normal-mode dispatch
TN, HN, EN, KN = 24, 256, 8, 3
#: What the fake notify kernel reports to a dispatch from a layout: rows received, per expert.
RECV_COUNTS = [3, 2, 4, 1, 0, 5, 2, 3]


@pytest.fixture(params=[1, 2], ids=["1rank", "2ranks"])
def nd(monkeypatch, request):
    """Rank 0 of a one- or two-rank Buffer on the fake GPU whose notify 'kernel' of a dispatch
    from a layout writes RECV_COUNTS (its local experts' part) into the status words, as the
    real one does before the count wait."""
    monkeypatch.delenv(host_ext.HOST_EXT_ENV, raising=False)
    with fake_gpu.fake_buffer(monkeypatch, num_ranks=request.param,
                              num_nvl_bytes=1 << 26) as (buf, module):
        assert buf._normal_host is not None, host_ext.status("host_path")
        words = buf.backend.normal.status._view
        local = RECV_COUNTS[:EN // request.param]

        def notify(name, args):
            if name == "nvl_notify" and args["num_worst_tokens"] == 0:
                words[NVL_INFO_NUM_RECV] = sum(local)
                words[NVL_INFO_EXPERT_COUNTS:NVL_INFO_EXPERT_COUNTS + len(local)] = local
        module.on_launch = notify
        yield buf, module


def _normal_inputs(buf, t=TN, fp8=False, seed=0):
    """(x: [t, H] bf16 or the (fp8, scales [t, H / 128] float32) pair, the layout and top-k
    keyword arguments of a dispatch)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, EN, (t, KN), generator=g)
    w = torch.rand(t, KN, generator=g)
    x = torch.randn(t, HN, generator=g).to(torch.bfloat16)
    if fp8:
        x = (x.to(torch.float8_e4m3fn), torch.rand(t, HN // 128, generator=g))
    lay = buf.get_dispatch_layout(idx, EN)
    return x, dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                   num_tokens_per_expert=lay[2], topk_idx=idx, topk_weights=w)


def _python_path(buf):
    """Context: the Buffer's dispatches take the Python path (the C++ path set aside)."""
    class Ctx:
        def __enter__(self):
            self.host, buf._normal_host = buf._normal_host, None

        def __exit__(self, *exc):
            buf._normal_host = self.host
    return Ctx()


def _made(res, cached: bool) -> dict:
    """{kernel argument: the tensor of this call's results it points at}: what a call made."""
    recv = res[0]
    recv_x, scales = recv if isinstance(recv, tuple) else (recv, None)
    made = {"recv_x": recv_x, "recv_scales": scales}
    if not cached:
        h = res[4]
        made.update(recv_topk_idx=res[1], recv_topk_weights=res[2],
                    rank_prefix_matrix=h.rank_prefix_matrix, send_pos=h.send_pos,
                    recv_src_idx=h.recv_src_idx, recv_src_rank=h.recv_src_rank,
                    num_recv_dev=h.backend_state.num_recv,
                    recv_per_expert=h.num_recv_tokens_per_expert,
                    num_tokens_of_rank=h.backend_state.num_tokens_of_rank)
    return made


def _tensors_alike(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    if isinstance(a, tuple):
        for i, (u, v) in enumerate(zip(a, b)):
            _tensors_alike(u, v, f"{what}[{i}]")
        return
    assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), what


def test_extension_writes_the_nvlink_runtimes_per_call_arguments():
    from ep_comm.backends.kernels import args, host_path
    ext = host_path.load_extension()
    assert tuple(ext.NVL_NOTIFY_SLOTS) == args.NVL_NOTIFY_PER_CALL
    assert tuple(ext.NVL_DISPATCH_SLOTS) == args.NVL_DISPATCH_PER_CALL
    assert tuple(ext.NVL_COMBINE_SLOTS) == args.NVL_COMBINE_PER_CALL
    for table, per_call in ((args.NVL_NOTIFY, args.NVL_NOTIFY_PER_CALL),
                            (args.NVL_DISPATCH, args.NVL_DISPATCH_PER_CALL),
                            (args.NVL_COMBINE, args.NVL_COMBINE_PER_CALL)):
        assert set(per_call) <= {n for n, _ in table}


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("mode", ["worst", "layout", "cached"])
def test_normal_dispatch_cpp_launches_exactly_what_the_python_path_launches(nd, mode, fp8):
    """Call after call, alternating the paths: the same kernels and grids, every argument
    equal except the outputs (each pointing at its own call's results) and the signature's
    call number (each its own call's); results alike in shape, dtype and stride; the calls
    numbered one by one with the same Signature."""
    buf, module = nd
    x, kw = _normal_inputs(buf, fp8=fp8)
    cached = mode == "cached"
    first = buf.dispatch(x, **kw, expert_alignment=4)  # from the layout: learnt
    if cached:
        def call():
            return buf.dispatch(x, handle=first[4], expert_alignment=4)
    else:
        def call():
            return buf.dispatch(x, **kw, expert_alignment=4,
                                num_worst_tokens=2 * TN if mode == "worst" else 0)
    call()  # this kind's first call: the Python path, learnt
    host = buf._normal_host
    assert host.calls == (1 if mode == "layout" else 0)
    for _ in range(3):
        runs = {}
        for path in ("python", "cpp"):
            start, native, seq = len(module.launches), module.native_launches, buf.comm.seq
            events = len(module.native_events)
            if path == "python":
                with _python_path(buf):
                    res = call()
            else:
                res = call()
            assert buf.comm.seq == seq + 1
            launched = module.launches[start:]
            assert module.native_launches - native == (len(launched) if path == "cpp" else 0)
            if path == "cpp" and mode == "layout":  # the count wait: one event, after notify
                assert [e[0] for e in module.native_events[events:]] == ["record", "sync"]
            runs[path] = (launched, res, seq + 1, buf.comm.call[0], buf.comm.call_words()[0])
        (py_l, py_res, py_seq, py_sig, _), (c_l, c_res, c_seq, c_sig, c_words) = \
            runs["python"], runs["cpp"]
        assert [(n, g) for n, g, _ in py_l] == [(n, g) for n, g, _ in c_l]
        assert [n for n, _, _ in c_l] == (["nvl_dispatch"] if cached
                                          else ["nvl_notify", "nvl_dispatch"])
        assert py_sig == c_sig
        py_made, c_made = _made(py_res, cached), _made(c_res, cached)
        for (name, _, py_args), (_, _, c_args) in zip(py_l, c_l):
            assert py_args.keys() == c_args.keys()
            for arg, value in c_args.items():
                if arg in c_made:
                    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
                    assert value == ptr(c_made[arg]), (name, arg)
                    assert py_args[arg] == ptr(py_made[arg]), (name, arg)
                elif arg == "sig":  # the agreement's words: the same call, its own number
                    assert value == c_words and value[0] == c_seq and py_args[arg][0] == py_seq
                    assert value[1:] == py_args[arg][1:]
                else:
                    assert value == py_args[arg], (name, arg)
        for i, what in enumerate(("recv_x", "recv_topk_idx", "recv_topk_weights")):
            _tensors_alike(py_res[i], c_res[i], what)
        assert py_res[3] == c_res[3]  # the count list
        assert type(py_res[5]) is type(c_res[5])
        if cached:
            assert c_res[4] is first[4]
            continue
        ph, ch = py_res[4], c_res[4]
        for field in ("rank", "num_ranks", "num_experts", "num_recv_tokens", "num_worst_tokens",
                      "num_tokens_per_rdma_rank", "num_channels"):
            assert getattr(ph, field) == getattr(ch, field), field
        assert ch.is_token_in_rank is kw["is_token_in_rank"]
        assert ch.num_tokens_per_rank is kw["num_tokens_per_rank"]
        for field in ("rank_prefix_matrix", "send_pos", "recv_src_idx", "recv_src_rank",
                      "num_recv_tokens_per_expert"):
            _tensors_alike(getattr(ph, field), getattr(ch, field), field)
        assert ph.backend_state.counts_host == ch.backend_state.counts_host
        if mode == "layout":
            local = RECV_COUNTS[:EN // buf.group_size]
            assert ch.num_recv_tokens == sum(local)
            assert c_res[3] == [4 * -(-c // 4) for c in local]
            assert c_res[3] is not ch.backend_state.counts_host
    assert host.calls == (4 if mode == "layout" else 3)


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes a tensor's elements cover."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else -1
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


#: Outputs the kernels write 16 bytes at a time (the others, small int32 arrays, element-wise).
WIDE = ("recv_x", "recv_scales", "recv_topk_idx", "recv_topk_weights")


def _assert_disjoint_and_aligned(made: dict) -> None:
    """The rows' outputs 16-byte aligned, and no two outputs sharing a byte (the C++ path
    carves several from one allocation)."""
    spans = sorted((*_byte_span(t), name) for name, t in made.items()
                   if t is not None and t.numel())
    for lo, _, name in spans:
        assert name not in WIDE or lo % 16 == 0, name
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{an} overlaps {bn}"


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("mode", ["worst", "layout", "cached"])
def test_cpp_dispatch_outputs_share_allocations_only_with_what_lives_as_long(nd, mode, fp8):
    """The C++ dispatches make the payload and its scales in one allocation, and the handle's
    arrays with the received top-k rows in another (kernels/host/host_path.cpp, Slab): the
    outputs never overlap, and the payload never shares the handle's allocation (a handle kept
    until combine must not keep a large recv_x alive)."""
    buf, module = nd
    x, kw = _normal_inputs(buf, fp8=fp8)
    first = buf.dispatch(x, **kw)
    worst = 2 * TN if mode == "worst" else 0
    if mode == "cached":  # this kind's first call: learnt
        buf.dispatch(x, handle=first[4])
    else:
        buf.dispatch(x, **kw, num_worst_tokens=worst)
    calls = buf._normal_host.calls
    res = (buf.dispatch(x, handle=first[4]) if mode == "cached"
           else buf.dispatch(x, **kw, num_worst_tokens=worst))
    assert buf._normal_host.calls == calls + 1
    made = _made(res, mode == "cached")
    _assert_disjoint_and_aligned(made)
    payload = made["recv_x"].untyped_storage().data_ptr()
    if made["recv_scales"] is not None:
        assert made["recv_scales"].untyped_storage().data_ptr() == payload
    if mode != "cached":
        h = res[4]
        for t in (h.rank_prefix_matrix, h.recv_src_idx, h.recv_src_rank, res[1], res[2]):
            assert t.untyped_storage().data_ptr() != payload


@pytest.mark.parametrize("use_fp8", [True, False])
def test_cpp_low_latency_dispatch_outputs_are_disjoint_and_the_payload_apart(ll, use_fp8):
    buf, module = ll
    x = torch.randn(M, H).to(torch.bfloat16)
    idx = torch.randint(-1, E, (M, 4))
    for _ in range(3):  # the first two calls learn (one per buffer half), the third is C++
        recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=use_fp8)
    assert buf._ll_host.calls >= 1
    recv_x, scales = recv if use_fp8 else (recv, None)
    made = {"recv_x": recv_x, "recv_scales": scales, "src_info": handle.src_info,
            "range_begin": handle.range_begin, "range_count": handle.range_count,
            "recv_count": count}
    _assert_disjoint_and_aligned(made)
    if scales is not None:
        assert scales.untyped_storage().data_ptr() == recv_x.untyped_storage().data_ptr()
        assert scales.stride() == (scales.shape[1] * scales.shape[2], 1, scales.shape[1])
    assert handle.src_info.untyped_storage().data_ptr() != recv_x.untyped_storage().data_ptr()


def test_a_handle_from_the_cpp_path_drives_cached_dispatch_and_combine(nd):
    buf, module = nd
    x, kw = _normal_inputs(buf)
    for _ in range(3):
        recv, _, _, _, handle, _ = buf.dispatch(x, **kw, num_worst_tokens=2 * TN)
        again = buf.dispatch(x, handle=handle)
        assert again[0].shape == recv.shape and again[4] is handle
        out, out_w, _ = buf.combine(recv, handle, topk_weights=torch.rand(2 * TN, KN))
        assert out.shape == (TN, HN) and out_w.shape == (TN, KN)
        launched = module.launches[-1][2]
        assert launched["send_pos"] == handle.send_pos.data_ptr()
        assert launched["recv_src_idx"] == handle.recv_src_idx.data_ptr()
    assert buf._normal_host.calls == 4  # the last two fresh and the last two cached ones
    assert buf._normal_host.combine_calls == 2  # the last two combines


def _bad_fresh_calls(x, kw, t):
    """(what, call arguments) of a fresh dispatch the Python path refuses with InputError."""
    swap = lambda **kv: dict(kw, **kv)  # noqa: E731
    return [
        ("x float32", x.float(), kw),
        ("x not contiguous", torch.randn(HN, t).to(torch.bfloat16).t(), kw),
        ("x 1-D", x.flatten(), kw),
        ("x a 3-tuple", (x, x, x), kw),
        ("fp8 scales float64", (x.to(torch.float8_e4m3fn),
                                torch.rand(t, HN // 128, dtype=torch.float64)), kw),
        ("num_tokens_per_rank int64", x,
         swap(num_tokens_per_rank=kw["num_tokens_per_rank"].long())),
        ("is_token_in_rank int32", x, swap(is_token_in_rank=kw["is_token_in_rank"].int())),
        ("num_tokens_per_expert int64", x,
         swap(num_tokens_per_expert=kw["num_tokens_per_expert"].long())),
        ("num_tokens_per_expert missing", x, swap(num_tokens_per_expert=None)),
        ("topk_idx int32", x, swap(topk_idx=kw["topk_idx"].int())),
        ("topk_idx of other tokens", x, swap(topk_idx=kw["topk_idx"][:-1])),
        ("topk_weights float64", x, swap(topk_weights=kw["topk_weights"].double())),
        ("topk_weights without topk_idx", x, swap(topk_idx=None)),
        ("topk_idx a list", x, swap(topk_idx=kw["topk_idx"].tolist())),
    ]


@pytest.mark.parametrize("worst", [2 * TN, 0])
def test_normal_dispatch_declines_odd_input_and_the_python_path_raises(nd, worst):
    buf, module = nd
    x, kw = _normal_inputs(buf)
    for _ in range(3):
        buf.dispatch(x, **kw, num_worst_tokens=worst)
    assert buf._normal_host.calls == 2
    bad = _bad_fresh_calls(x, kw, TN) + [
        ("num_worst_tokens a float", x, dict(kw, num_worst_tokens=float(worst))),
        ("num_worst_tokens < 0", x, dict(kw, num_worst_tokens=-1)),
        ("expert_alignment 0", x, dict(kw, expert_alignment=0)),
        ("expert_alignment a float", x, dict(kw, expert_alignment=1.0)),
    ]
    for what, bad_x, bad_kw in bad:
        bad_kw = dict({"num_worst_tokens": worst}, **bad_kw)
        launches, seq = len(module.launches), buf.comm.seq
        with pytest.raises(InputError):
            buf.dispatch(bad_x, **bad_kw)
        # refused before anything ran: nothing launched, the call not numbered
        assert (len(module.launches), buf.comm.seq) == (launches, seq), what
    assert buf._normal_host.calls == 2
    # odd but valid: the Python path runs them (and learns the new sizes)
    storage = torch.empty(TN * HN + 1, dtype=torch.bfloat16)
    misaligned = storage[1:].view(TN, HN).copy_(x)
    x2, kw2 = _normal_inputs(buf, t=TN + 5, seed=1)
    for call_x, call_kw in ((misaligned, kw), (x2, kw2),
                            (x, dict(kw, num_tokens_per_rdma_rank=torch.zeros(1, dtype=torch.int32))),
                            (x, dict(kw, expert_alignment=2))):
        native = module.native_launches
        buf.dispatch(call_x, **dict({"num_worst_tokens": worst}, **call_kw))
        assert module.native_launches == native
    buf.dispatch(x2, **kw2, num_worst_tokens=worst)  # learnt by the call above
    assert buf._normal_host.calls == 3
    import dataclasses
    same_config = dataclasses.replace(buf.get_dispatch_config(buf.group_size))  # a new object
    buf.dispatch(x, **kw, num_worst_tokens=worst, config=same_config)  # the same plans
    assert buf._normal_host.calls == 4


def test_cached_dispatch_declines_odd_input_and_the_python_path_raises(nd):
    buf, module = nd
    x, kw = _normal_inputs(buf)
    handle = buf.dispatch(x, **kw)[4]
    for _ in range(3):
        buf.dispatch(x, handle=handle)
    assert buf._normal_host.calls == 2
    import dataclasses
    for what, call_x, extra in [
            ("x of other tokens", x[:-1], {}),
            ("x float32", x.float(), {}),
            ("top-k ids with a handle", x, dict(topk_idx=kw["topk_idx"])),
            ("a layout with a handle", x, dict(num_tokens_per_rank=kw["num_tokens_per_rank"])),
            ("num_worst_tokens < 0", x, dict(num_worst_tokens=-1)),
            ("a handle not made by the NVLink kernels", x,
             dict(handle=dataclasses.replace(handle, backend_state=None)))]:
        native = module.native_launches
        with pytest.raises(InputError):
            buf.dispatch(call_x, **dict(dict(handle=handle), **extra))
        assert module.native_launches == native, what
    native = module.native_launches
    buf.dispatch(x, handle=handle, num_worst_tokens=5)  # ignored with a handle: Python runs it
    assert module.native_launches == native
    buf.dispatch(x, handle=handle)
    assert module.native_launches == native + 1


def test_normal_dispatch_stream_flags_and_expand_keep_the_python_path(nd):
    from ep_comm.backends.base import ExpandRequest
    from ep_comm.event import EventOverlap
    buf, module = nd
    x, kw = _normal_inputs(buf)
    for _ in range(3):
        buf.dispatch(x, **kw, num_worst_tokens=2 * TN)
    native = module.native_launches
    for flags in (dict(async_finish=True), dict(previous_event=EventOverlap()),
                  dict(previous_event=EventOverlap(), async_finish=True,
                       allocate_on_comm_stream=True),
                  dict(expand=ExpandRequest(rows=4 * TN, zero_padding=True))):
        buf.dispatch(x, **kw, num_worst_tokens=2 * TN, **flags)
    assert module.native_launches == native


def test_a_status_word_already_set_is_raised_by_the_python_path_normal(nd):
    from ep_comm.core.constants import STATUS_OVERFLOW
    buf, module = nd
    x, kw = _normal_inputs(buf)
    for _ in range(3):
        buf.dispatch(x, **kw, num_worst_tokens=2 * TN)
    native = module.native_launches
    words = buf.backend.normal.status._view
    words[0:6] = (STATUS_OVERFLOW, 2, 0, 0, 3 * TN, 2 * TN)  # a dispatch kernel's report
    with pytest.raises(InputError, match="more than num_worst_tokens"):
        buf.dispatch(x, **kw, num_worst_tokens=2 * TN)
    with pytest.raises(ep_comm.errors.EpCommError, match="failed earlier"):
        buf.dispatch(x, handle=None, **kw, num_worst_tokens=2 * TN)
    assert module.native_launches == native


def test_a_refusal_reported_at_the_count_wait_raises_as_on_the_python_path(nd):
    """A dispatch from a layout whose notify kernel refuses the call (STATUS_DISAGREE): the
    C++ path has launched the notify, waited and found the word set; the call is numbered and
    the Python path's error raised from the word, which is then cleared: the next call runs
    through C++ again."""
    from ep_comm.core.constants import STATUS_DISAGREE
    buf, module = nd
    x, kw = _normal_inputs(buf)
    for _ in range(3):
        buf.dispatch(x, **kw)
    words = buf.backend.normal.status._view
    refuse = [True]
    counts = module.on_launch

    def notify(name, args):
        counts(name, args)
        if name == "nvl_notify" and refuse[0]:
            words[0:6] = (STATUS_DISAGREE, 0, 0, 2, 7168, 256)  # rank 0 differs in hidden
    module.on_launch = notify
    errors = []
    for path in ("python", "cpp"):
        seq, native = buf.comm.seq, module.native_launches
        with pytest.raises(ep_comm.errors.EpCommError) as e:
            if path == "python":
                with _python_path(buf):
                    buf.dispatch(x, **kw)
            else:
                buf.dispatch(x, **kw)
        errors.append((type(e.value), str(e.value)))
        assert buf.comm.seq == seq + 1
        assert module.native_launches == native + (1 if path == "cpp" else 0)  # notify only
        assert words[0] == 0  # cleared: the Buffer stays usable
    assert errors[0] == errors[1] and "refused the call" in errors[0][1]
    refuse[0] = False
    calls = buf._normal_host.calls
    buf.dispatch(x, **kw)
    assert buf._normal_host.calls == calls + 1


@pytest.mark.parametrize("env", [(host_ext.HOST_EXT_ENV, "0"), ("EP_COMM_DEBUG", "1"),
                                 ("EP_COMM_CHECK_IDS", "1"), ("EP_COMM_CHECK_FINITE", "1"),
                                 ("EP_COMM_CHECK_AGREEMENT", "1")])
def test_per_call_host_checks_or_the_switch_keep_normal_dispatch_on_python(monkeypatch, env):
    """... and the combine: every call of every kind on the Python path."""
    monkeypatch.setenv(*env)
    with fake_gpu.fake_buffer(monkeypatch, num_nvl_bytes=1 << 26) as (buf, module):
        assert buf._normal_host is None and buf.backend.normal.host_path is None
        x, kw = _normal_inputs(buf)
        native = module.native_launches
        for worst in (2 * TN, 0):
            for _ in range(3):
                recv, _, recv_w, _, handle, _ = buf.dispatch(x, **kw, num_worst_tokens=worst)
                buf.dispatch(x, handle=handle)
                buf.combine(recv, handle, topk_weights=recv_w)
        assert module.native_launches == native
        assert [n for n, _, _ in module.launches].count("nvl_combine") == 6


# ------------------------------------------------------------------- the normal-mode combine
def _combine_inputs(buf, handle, weights: bool, bias: str, seed=0):
    """(x [N, H] bf16, topk_weights [N, K] float32 or None, bias) of a combine along
    ``handle``; ``bias``: "none", "one" (a tensor), "one-tuple" ((tensor,)), "two" (a list of
    two [T, H] bf16 tensors)."""
    g = torch.Generator().manual_seed(seed)
    n, t = handle.num_recv_rows, handle.num_tokens
    x = torch.randn(n, HN, generator=g).to(torch.bfloat16)
    w = torch.rand(n, KN, generator=g) if weights else None
    b = [torch.randn(t, HN, generator=g).to(torch.bfloat16) for _ in range(2)]
    return x, w, {"none": None, "one": b[0], "one-tuple": (b[0],), "two": b}[bias]


def _normal_handle(buf, mode: str, seed=0, t=TN):
    """A dispatch's (recv_x, handle): with num_worst_tokens (``mode`` "worst") or from the
    layout ("layout")."""
    x, kw = _normal_inputs(buf, t=t, seed=seed)
    res = buf.dispatch(x, **kw, num_worst_tokens=2 * t if mode == "worst" else 0)
    return res[0], res[4]


@pytest.mark.parametrize("bias", ["none", "one", "one-tuple", "two"])
@pytest.mark.parametrize("weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("mode", ["worst", "layout"])
def test_normal_combine_cpp_launches_exactly_what_the_python_path_launches(nd, mode, weights,
                                                                           bias):
    """Call after call, alternating the paths: the same kernel and grid, every argument equal
    except the outputs (each pointing at its own call's results); results alike in shape,
    dtype and stride; each call numbered with the same Signature."""
    buf, module = nd
    _, handle = _normal_handle(buf, mode)
    x, w, b = _combine_inputs(buf, handle, weights, bias)
    host = buf._normal_host
    buf.combine(x, handle, topk_weights=w, bias=b)  # this plan's first call: Python, learnt
    assert host.combine_calls == 0
    for _ in range(3):
        runs = {}
        for path in ("python", "cpp"):
            start, native, seq = len(module.launches), module.native_launches, buf.comm.seq
            if path == "python":
                with _python_path(buf):
                    res = buf.combine(x, handle, topk_weights=w, bias=b)
            else:
                res = buf.combine(x, handle, topk_weights=w, bias=b)
            assert buf.comm.seq == seq + 1
            launched = module.launches[start:]
            assert module.native_launches - native == (1 if path == "cpp" else 0)
            runs[path] = (launched, res, buf.comm.call)
        (py_l, py_res, py_call), (c_l, c_res, c_call) = runs["python"], runs["cpp"]
        assert [(n, g) for n, g, _ in py_l] == [(n, g) for n, g, _ in c_l]
        assert [n for n, _, _ in c_l] == ["nvl_combine"]
        assert py_call == c_call and c_call[1] is None
        assert c_call[0] == agreement.Signature("combine", HN, torch.bfloat16, EN,
                                                KN if weights else -1, -1)
        (_, _, py_args), (_, _, c_args) = py_l[0], c_l[0]
        assert py_args.keys() == c_args.keys()
        made = {"out": (py_res[0], c_res[0]), "out_w": (py_res[1], c_res[1])}
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        for arg, value in c_args.items():
            if arg in made:
                assert value == ptr(made[arg][1]) and py_args[arg] == ptr(made[arg][0]), arg
            else:
                assert value == py_args[arg], arg
        biases = [] if b is None else ([b] if isinstance(b, torch.Tensor) else list(b))
        assert c_args["bias0"] == (biases[0].data_ptr() if biases else 0)
        assert c_args["bias1"] == (biases[1].data_ptr() if len(biases) > 1 else 0)
        assert c_args["x"] == x.data_ptr() and c_args["topk_w"] == ptr(w)
        assert c_args["T"] == TN and c_args["send_pos"] == handle.send_pos.data_ptr()
        _tensors_alike(py_res[0], c_res[0], "combined_x")
        _tensors_alike(py_res[1], c_res[1], "combined_topk_weights")
        assert c_res[0].shape == (TN, HN) and (c_res[1] is None) == (not weights)
        assert type(py_res[2]) is type(c_res[2]) and c_res[2].event is None
    assert host.combine_calls == 3


def test_normal_combine_runs_any_handle_of_a_learnt_plan_through_cpp(nd):
    """The plan is (hidden, top-k, weights or not, experts, Config): handles of other routings
    (other received rows N) and other token counts T run through C++, as do equal but new
    Configs. The Python path's checks of a combine depend on N and T only through equalities
    the C++ guard checks itself (x and the weights have the handle's N rows, a bias is
    [T, H])."""
    import dataclasses
    buf, module = nd
    host = buf._normal_host
    _, handle = _normal_handle(buf, "layout")
    x, w, b = _combine_inputs(buf, handle, True, "one")
    buf.combine(x, handle, topk_weights=w, bias=b)
    assert host.combine_calls == 0
    rows = set()
    for i, (mode, t) in enumerate([("layout", TN), ("worst", TN), ("layout", TN + 7),
                                   ("worst", 5), ("layout", TN)]):
        _, handle = _normal_handle(buf, mode, seed=i + 1, t=t)
        x, w, b = _combine_inputs(buf, handle, True, "one", seed=i)
        seq = buf.comm.seq
        out, out_w, _ = buf.combine(x, handle, topk_weights=w, bias=b)
        assert host.combine_calls == i + 1 and buf.comm.seq == seq + 1
        assert out.shape == (t, HN) and out_w.shape == (t, KN)
        assert module.launches[-1][2]["T"] == t
        rows.add(handle.num_recv_rows)
    assert len(rows) > 1
    same_config = dataclasses.replace(buf.get_dispatch_config(buf.group_size))  # a new object
    buf.combine(x, handle, topk_weights=w, bias=b, config=same_config)
    assert host.combine_calls == 6


def test_combine_plans_beyond_what_cpp_keeps_are_taught_again(nd):
    """The C++ object of a Config keeps 16 combine plans (the newest): a plan it forgot runs
    on the Python path once and is taught again; a stream-flag call of a known plan runs on
    the Python path and teaches nothing new."""
    buf, module = nd
    host = buf._normal_host
    _, handle = _normal_handle(buf, "worst")
    rows = handle.num_recv_rows

    def call(hidden, **kw):
        buf.combine(torch.zeros(rows, hidden, dtype=torch.bfloat16), handle, **kw)

    hiddens = [128 * (i + 1) for i in range(17)]
    for hidden in hiddens:
        call(hidden)
    obj = host._obj("combine", 0, buf.get_dispatch_config(buf.group_size))
    assert obj.num_plans() == 16 and not obj.knows(hiddens[0], 0, False, EN)
    calls = host.combine_calls
    call(hiddens[-1])
    assert host.combine_calls == calls + 1
    call(hiddens[0])  # forgotten: the Python path, which teaches it again
    assert host.combine_calls == calls + 1 and obj.knows(hiddens[0], 0, False, EN)
    call(hiddens[0])
    assert host.combine_calls == calls + 2
    native, taught = module.native_launches, set(host._taught)
    call(hiddens[0], async_finish=True)
    assert module.native_launches == native and host._taught == taught


def _bad_combines(x, w, b, handle):
    """(what, x, keyword arguments) of a combine the Python path refuses with InputError
    before the call is numbered."""
    n, t = handle.num_recv_rows, handle.num_tokens
    kw = dict(topk_weights=w, bias=b)
    swap = lambda **kv: dict(kw, **kv)  # noqa: E731
    return [
        ("x float32", x.float(), kw),
        ("x not contiguous", torch.randn(HN, n).to(torch.bfloat16).t(), kw),
        ("x 1-D", x.flatten(), kw),
        ("x 3-D", x.unsqueeze(0), kw),
        ("x of other rows", torch.cat([x, x[:1]]), kw),
        ("x a list", x.tolist(), kw),
        ("topk_weights float64", x, swap(topk_weights=w.double())),
        ("topk_weights of other rows", x, swap(topk_weights=w[:-1])),
        ("topk_weights 1-D", x, swap(topk_weights=w[:, 0].contiguous())),
        ("topk_weights not contiguous", x, swap(topk_weights=w.t().contiguous().t())),
        ("topk_weights a list", x, swap(topk_weights=w.tolist())),
        ("bias float32", x, swap(bias=b.float())),
        ("bias of other tokens", x, swap(bias=b[:-1])),
        ("bias not contiguous", x, swap(bias=b.t().contiguous().t())),
        ("bias a 3-tuple", x, swap(bias=(b, b, b))),
        ("bias (None,)", x, swap(bias=(None,))),
        ("bias (tensor, None)", x, swap(bias=(b, None))),
        ("bias a 2-tuple with a bad second", x, swap(bias=(b, b.float()))),
        ("bias a list of floats", x, swap(bias=[1.0, 2.0])),
        ("handle a tuple", x, dict(kw, handle=tuple(handle))),
        ("handle None", x, dict(kw, handle=None)),
    ]


@pytest.mark.parametrize("mode", ["worst", "layout"])
def test_normal_combine_declines_odd_input_and_the_python_path_raises(nd, mode):
    buf, module = nd
    host = buf._normal_host
    _, handle = _normal_handle(buf, mode)
    x, w, b = _combine_inputs(buf, handle, True, "one")
    for _ in range(3):
        buf.combine(x, handle, topk_weights=w, bias=b)
    assert host.combine_calls == 2
    for what, bad_x, bad_kw in _bad_combines(x, w, b, handle):
        call_kw = dict(dict(handle=handle), **bad_kw)
        launches, seq = len(module.launches), buf.comm.seq
        with pytest.raises(InputError):
            buf.combine(bad_x, **call_kw)
        # refused before anything ran: nothing launched, the call not numbered
        assert (len(module.launches), buf.comm.seq) == (launches, seq), what
    # a handle the NVLink kernels did not make: numbered, then refused by the runtime, as the
    # Python path does it (nothing launched)
    import dataclasses
    launches, seq = len(module.launches), buf.comm.seq
    with pytest.raises(InputError, match="not made by the kernels backend"):
        buf.combine(x, dataclasses.replace(handle, backend_state=None), topk_weights=w, bias=b)
    assert (len(module.launches), buf.comm.seq) == (launches, seq + 1)
    assert host.combine_calls == 2
    # odd but valid: the Python path runs them (and learns the new plans)
    storage = torch.empty(x.numel() + 1, dtype=torch.bfloat16)
    misaligned = storage[1:].view(x.shape).copy_(x)
    wide = torch.zeros(x.shape[0], 2 * HN, dtype=torch.bfloat16)
    for call_x, call_kw in ((misaligned, dict(topk_weights=w, bias=b)),
                            (x, dict(topk_weights=None, bias=b)),
                            (x, dict(topk_weights=w[:, :2].contiguous(), bias=b)),
                            (wide, dict(topk_weights=w)),
                            (x, dict(topk_weights=w, bias=b, async_finish=True)),
                            (x, dict(topk_weights=w, bias=b,
                                     previous_event=ep_comm.EventOverlap()))):
        native, seq = module.native_launches, buf.comm.seq
        buf.combine(call_x, handle, **call_kw)
        assert module.native_launches == native and buf.comm.seq == seq + 1
    buf.combine(x, handle, topk_weights=None, bias=b)  # learnt by the call above
    buf.combine(wide, handle, topk_weights=w)
    assert host.combine_calls == 4


def test_a_status_word_already_set_is_raised_by_the_python_path_combine(nd):
    """A refusal left in the status word (cleared when read: the Buffer stays usable) and a
    kernel's failure (the runtime is broken for good): the Python path raises both, nothing
    launched; after the refusal the next combine runs through C++ again."""
    from ep_comm.core.constants import STATUS_DISAGREE, STATUS_OVERFLOW
    buf, module = nd
    host = buf._normal_host
    _, handle = _normal_handle(buf, "worst")
    x, w, b = _combine_inputs(buf, handle, True, "two")
    for _ in range(2):
        buf.combine(x, handle, topk_weights=w, bias=b)
    assert host.combine_calls == 1
    words = buf.backend.normal.status._view
    errors = []
    for path in ("python", "cpp"):
        words[0:6] = (STATUS_DISAGREE, 0, 0, 2, 7168, 256)
        launches, seq = len(module.launches), buf.comm.seq
        with pytest.raises(ep_comm.errors.EpCommError) as e:
            if path == "python":
                with _python_path(buf):
                    buf.combine(x, handle, topk_weights=w, bias=b)
            else:
                buf.combine(x, handle, topk_weights=w, bias=b)
        errors.append((type(e.value), str(e.value)))
        assert (len(module.launches), buf.comm.seq) == (launches, seq + 1)
        assert words[0] == 0
    assert errors[0] == errors[1]
    buf.combine(x, handle, topk_weights=w, bias=b)
    assert host.combine_calls == 2
    words[0:6] = (STATUS_OVERFLOW, 2, 0, 0, 3 * TN, 2 * TN)  # a dispatch kernel's report
    native = module.native_launches
    with pytest.raises(InputError, match="more than num_worst_tokens"):
        buf.combine(x, handle, topk_weights=w, bias=b)
    with pytest.raises(ep_comm.errors.EpCommError, match="failed earlier"):
        buf.combine(x, handle, topk_weights=w, bias=b)
    assert module.native_launches == native and host.combine_calls == 2


def test_a_failed_launch_numbers_the_combine_and_raises(nd):
    """An error after the guard (here the launch) numbers the call first, as the Python path
    has numbered it before its backend runs, and raises JitError."""
    from ep_comm.runtime import jit
    buf, module = nd
    _, handle = _normal_handle(buf, "worst")
    x, w, b = _combine_inputs(buf, handle, True, "none")
    buf.combine(x, handle, topk_weights=w)
    launch = buf.backend.normal._plans[("combine", HN, KN, EN,
                                        buf.get_dispatch_config(buf.group_size))][0]
    launch.block += 1  # the fake launcher refuses a block other than the plan's learnt one
    try:
        seq = buf.comm.seq
        with pytest.raises(jit.JitError, match="nvl_combine"):
            buf.combine(x, handle, topk_weights=w)
        assert buf.comm.seq == seq + 1
        assert buf.comm.call[0] == agreement.Signature("combine", HN, torch.bfloat16, EN, KN)
    finally:
        launch.block -= 1


# ------------------------------------------------------------------ receive hooks' order
def _ll_dispatch(buf, x, idx, hook):
    return buf.low_latency_dispatch(x, idx, M, E, use_fp8=False, return_recv_hook=hook)


def test_a_send_on_a_half_whose_receive_is_pending_is_refused_before_numbering(ll):
    """D0 and D1 sent with hooks, D2 before D0's hook: D2 would overwrite D0's half (here and
    on the peers), so it raises InputError before the call is numbered; once D0 is received it
    runs. A combine of a dispatch not yet received is refused alike."""
    from ep_comm.errors import InputError
    buf, module = ll
    x, idx, w = _inputs(M)
    d0 = _ll_dispatch(buf, x, idx, True)
    d1 = _ll_dispatch(buf, x, idx, True)
    seq = buf.comm.seq
    with pytest.raises(InputError, match=r"dispatch before last \(buffer half 0\).*hook"):
        _ll_dispatch(buf, x, idx, False)
    y = torch.zeros(E, M, H, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="has not been received"):
        buf.low_latency_combine(y, idx, w, d0[2])
    assert buf.comm.seq == seq  # refused before numbering: the ranks stay in step
    d0[4]()
    d2 = _ll_dispatch(buf, x, idx, False)
    assert d2[2].buffer_idx == 0 and buf.comm.seq == seq + 1
    d1[4]()
    c0 = buf.low_latency_combine(y, idx, w, d0[2], return_recv_hook=True)
    with pytest.raises(InputError, match=r"combine before last \(buffer half 0\)"):
        buf.low_latency_combine(y, idx, w, d2[2])
    c0[2]()
    buf.low_latency_combine(y, idx, w, d2[2])


def test_the_cpp_path_declines_while_a_hook_is_out_and_clean_forgets_hooks(ll):
    buf, module = ll
    x, idx, w = _inputs(M)
    for _ in range(3):  # both halves learnt, then C++
        _ll_dispatch(buf, x, idx, False)
    host, rt = buf._ll_host, buf.backend.ll
    calls = host.calls
    assert calls >= 1
    d = _ll_dispatch(buf, x, idx, True)
    assert rt.hooks_out == 1
    _ll_dispatch(buf, x, idx, False)  # the other half: allowed, through Python
    assert host.calls == calls
    buf.clean_low_latency_buffer(M, H, E)
    assert rt.hooks_out == 0
    d[4]()  # a hook handed out before the clean: no count goes below zero
    assert rt.hooks_out == 0
    for _ in range(2):
        _ll_dispatch(buf, x, idx, False)
    assert host.calls > calls
