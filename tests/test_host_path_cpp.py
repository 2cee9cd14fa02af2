"""The C++ host path of the low-latency calls (kernels/host/host_path.cpp) on the fake GPU
(tests/fake_gpu.py): a later call of a learnt shape is launched from C++ with exactly the
arguments the Python path gives, and everything the C++ side has not learnt (a new shape, bad
input, a hook, a status word already set) goes to the Python path, which raises its own error.

The extension is built at first use (~20 s, then cached); without a C++ compiler and ninja
these tests skip, saying so."""
from __future__ import annotations

import shutil

import pytest
import torch

import ep_comm
from ep_comm.core import agreement
from ep_comm.core.constants import LL_INFO_BAD_ID
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
