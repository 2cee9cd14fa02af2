"""The host path of the kernels backend on a fake GPU (tests/fake_gpu.py): launch plans are
built once per shape and later calls only patch pointers and counts; the Buffer's guard still
rejects bad input after a shape was validated."""
from __future__ import annotations

import pytest
import torch

from ep_comm.backends.kernels import args
from ep_comm.config import default_config

import fake_gpu


@pytest.fixture
def nvl(monkeypatch):
    with fake_gpu.intranode_runtime(monkeypatch) as rt:
        yield rt


_layout_and_dispatch = fake_gpu.layout_and_dispatch


def test_plans_are_built_once_per_shape_and_pointers_follow_each_call(nvl):
    (recv_x, _, _, _, _, handle), x = _layout_and_dispatch(nvl, worst=32)
    plans = dict(nvl._plans)
    (recv_x2, _, _, _, _, handle2), x2 = _layout_and_dispatch(nvl, worst=32)
    assert nvl._plans.keys() == plans.keys() and all(nvl._plans[k] is plans[k] for k in plans)
    names = [n for n, _, _ in nvl.fake_module.launches]
    assert names == ["nvl_get_dispatch_layout", "nvl_notify", "nvl_dispatch"] * 2
    last = nvl.fake_module.launches[-1][2]
    assert last["x"] == x2.data_ptr() and last["recv_x"] == recv_x2.data_ptr()
    assert last["num_rows"] == 32 and last["zero_padding"] == 1 and last["T"] == 16
    assert last["recv_src_idx"] == handle2.recv_src_idx.data_ptr()
    assert set(last) == {n for n, _ in args.NVL_DISPATCH}


def test_layout_is_one_launch_with_a_zeroed_scratch_per_experts_and_stream(nvl, monkeypatch):
    """The layout kernel zeroes and reduces its counts itself (kernels/cuda/layout.cu): one
    launch, given [R + E + 1] int32 zeros of scratch; the same scratch for calls on one stream,
    another for another stream (an async layout on the comm stream may overlap one on the
    compute stream) or another E."""
    from ep_comm.runtime import jit
    idx = torch.arange(32, dtype=torch.int64).view(16, 2) % 8

    def scratch_of_a_call(e=8):
        nvl.get_dispatch_layout(idx, e)
        name, _, values = nvl.fake_module.launches[-1]
        assert name == "nvl_get_dispatch_layout"
        return values["scratch"]

    first, again = scratch_of_a_call(), scratch_of_a_call()
    assert first == again and len(nvl.fake_module.launches) == 2
    monkeypatch.setattr(jit, "current_stream_handle", lambda index: 0xABC)
    other_stream = scratch_of_a_call()
    other_e = scratch_of_a_call(16)
    assert len({first, other_stream, other_e}) == 3
    tensors = {t.data_ptr(): t for t in nvl._layout.scratch.values()}
    assert tensors[first].tolist() == [0] * (nvl.num_ranks + 8 + 1)
    assert tensors[other_e].numel() == nvl.num_ranks + 16 + 1


def test_cached_dispatch_and_combine_launch_with_the_handle_tensors(nvl):
    (recv_x, _, _, _, _, handle), x = _layout_and_dispatch(nvl, worst=32)
    nvl.dispatch(x, None, handle=handle, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, num_experts=8, expert_alignment=1, num_worst_tokens=0,
                 config=default_config(1))
    name, _, a = nvl.fake_module.launches[-1]
    assert name == "nvl_dispatch" and a["send_pos"] == 0 and a["topk_idx"] == 0
    assert a["rank_prefix_matrix"] == handle.rank_prefix_matrix.data_ptr()
    out, _ = nvl.combine(recv_x, handle, None, (), default_config(1))
    name, _, a = nvl.fake_module.launches[-1]
    assert name == "nvl_combine" and a["out"] == out.data_ptr() and a["T"] == 16
    assert a["send_pos"] == handle.send_pos.data_ptr()


def test_timeout_is_read_when_the_runtime_is_created(nvl, monkeypatch):
    before = nvl._timeout_ns
    monkeypatch.setenv("EP_COMM_TIMEOUT_S", "1234")
    _layout_and_dispatch(nvl, worst=32)
    assert nvl.fake_module.launches[-1][2]["timeout_ns"] == before


def _guard_task(ctx, debug):
    """After a valid call of a shape, bad inputs still raise the first call's InputError."""
    import os
    if debug:
        os.environ["EP_COMM_DEBUG"] = "1"
    from check_cases import _buffer, _dispatch, _inputs
    from ep_comm.errors import InputError
    x, idx, w = _inputs()
    buf = _buffer(ctx)
    try:
        handle = _dispatch(buf, x, idx, w)[4]  # validates and remembers this shape
        _dispatch(buf, x, idx, w)  # the guard path
        assert len(buf._validated) >= 2 and buf._debug == debug
        bad = {
            "must have dtype torch.bfloat16": lambda: _dispatch(buf, x.float(), idx, w),
            "contiguous": lambda: _dispatch(buf, x.t().contiguous().t(), idx, w),
            "topk_weights must have shape": lambda: _dispatch(buf, x, idx, w[:, :1].contiguous()),
            "topk_idx must have dtype": lambda: buf.get_dispatch_layout(idx.int(), 8),
            "combine x has": lambda: buf.combine(torch.zeros(3, x.shape[1],
                                                             dtype=torch.bfloat16), handle),
        }
        for message, call in bad.items():
            try:
                call()
            except InputError as e:
                assert message in str(e), (message, str(e))
            else:
                raise AssertionError(f"no InputError for {message!r}")
    finally:
        buf.destroy()
        os.environ.pop("EP_COMM_DEBUG", None)


@pytest.mark.parametrize("debug", [False, True])
def test_guard_rejects_bad_input_after_a_shape_was_validated(cpu_ranks, debug):
    cpu_ranks(1).run(_guard_task, debug)


def test_fake_buffer_runs_the_public_calls_through_the_kernels_runtimes():
    import ep_comm
    nvl = ep_comm.Buffer.get_dispatch_config(1).get_nvl_buffer_size_hint(256 * 2, 1)
    with fake_gpu.fake_buffer(num_nvl_bytes=nvl) as (buf, module):
        idx = torch.arange(16 * 2, dtype=torch.int64).view(16, 2) % 8
        x, w = torch.zeros(16, 256, dtype=torch.bfloat16), torch.ones(16, 2)
        n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, 8)
        recv = buf.dispatch(x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                            is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=idx,
                            topk_weights=w, num_worst_tokens=16)
        buf.combine(recv[0], recv[4])
        assert buf.backend_name == "kernels"
        assert [n for n, _, _ in module.launches] == [
            "nvl_get_dispatch_layout", "nvl_notify", "nvl_dispatch", "nvl_combine"]


def test_host_overhead_bench_runs_on_the_fake_gpu(capsys):
    import importlib.util
    import pathlib
    import sys
    bench = pathlib.Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("host_overhead", bench / "host_overhead.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.main(["--fake-gpu", "--quick", "--calls", "2", "--tokens", "8",
                         "--hidden", "256", "--experts", "16", "--topk", "4"]) == 0
    finally:
        sys.path.remove(str(bench))
    out = capsys.readouterr().out
    for figure in ("layout_host_us", "ll_dispatch_host_us", "ll_combine_host_us",
                   "dispatch_host_minus_wait_us"):
        line = next(l for l in out.splitlines() if l.startswith(figure))
        assert "PASS" in line or "FAIL" in line, line
