"""Host-side logic of the low-latency kernels backend, on CPU: buffer regions, kernel argument
packing against the .cu signatures, status-word decoding, grid sizes and the NVSHMEM
bootstrap helpers. Nothing here needs a GPU or nvshmem4py."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ep_comm.backends.kernels import args
from ep_comm.backends.kernels import low_latency as ll
from ep_comm.runtime import jit
from ep_comm.runtime import nvshmem as nr
from ep_comm.errors import InputError
from ep_comm.core.constants import LL_MAX_EXPERTS, REGION_ALIGN
from ep_comm.errors import CommTimeoutError, EpCommError, KernelError
from ep_comm.core.regions import LowLatencyRegions, low_latency_message_bytes

SIZES = [(1, 128, 1, 8), (16, 256, 2, 16), (128, 7168, 2, 256), (128, 7168, 8, 256),
         (7, 2048, 4, 32), (256, 4096, 2, 64)]


# ------------------------------------------------------------------------------ regions
@pytest.mark.parametrize("m,h,r,e", SIZES)
def test_regions_are_aligned_disjoint_and_inside_the_total(m, h, r, e):
    reg = LowLatencyRegions(m, h, r, e)
    spans = sorted((x.offset, x.offset + x.nbytes, x.name) for x in reg.regions.values())
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{an} overlaps {bn}"
    for x in reg.regions.values():
        assert x.offset % REGION_ALIGN == 0, x
    assert spans[-1][1] <= reg.total_bytes


@pytest.mark.parametrize("m,h,r,e", SIZES)
def test_region_sizes_follow_the_documented_layout(m, h, r, e):
    reg = LowLatencyRegions(m, h, r, e)
    local = e // r
    msg = low_latency_message_bytes(h)
    assert msg % 16 == 0 and msg >= 16 + 2 * h and msg >= 16 + h + h // 128 * 4
    for b in (0, 1):
        for n in ("dispatch_count", "dispatch_arrive", "combine_count", "combine_arrive"):
            assert reg[f"{n}{b}"].nbytes == LL_MAX_EXPERTS * 8 >= local * r * 8
        assert reg[f"dispatch_send{b}"].nbytes == m * msg
        assert reg[f"dispatch_recv{b}"].nbytes == local * r * m * msg
        assert reg[f"combine_send{b}"].nbytes == local * r * m * h * 2
        assert reg[f"combine_recv{b}"].nbytes == e * m * h * 2


def test_every_signal_word_lies_before_signals_end_and_no_data_does():
    reg = LowLatencyRegions(128, 7168, 2, 256)
    signals = [n for n in reg.regions if n.startswith(("dispatch_count", "dispatch_arrive",
                                                        "combine_count", "combine_arrive",
                                                        "dispatch_done", "combine_done",
                                                        "dispatch_progress", "combine_progress",
                                                        "dispatch_ack", "combine_ack",
                                                        "status_claim"))]
    assert len(signals) == 2 * 10 + 1
    for n in signals:
        assert reg[n].offset + reg[n].nbytes <= reg.signals_end
    for n in set(reg.regions) - set(signals):
        assert reg[n].offset >= reg.signals_end, n


def test_each_half_of_every_shape_lies_in_that_halfs_fixed_area():
    """With the Buffer's capacity, half b's data of any shape stays inside half b's area, so
    consecutive calls of two shapes (on the two halves) never overlap."""
    shapes = [(128, 7168), (32, 2048), (7, 4096), (256, 1024), (1, 128)]
    cap = max(LowLatencyRegions(m, h, 4, 32).total_bytes for m, h in shapes) + 4096 + 7
    regs = [LowLatencyRegions(m, h, 4, 32, cap) for m, h in shapes]
    data = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")
    for reg in regs:
        assert reg.total_bytes <= cap and reg.signals_end == regs[0].signals_end
        assert reg.half_bytes == regs[0].half_bytes
        for b in (0, 1):
            lo = reg.signals_end + b * reg.half_bytes
            for n in data:
                x = reg[f"{n}{b}"]
                assert lo <= x.offset and x.offset + x.nbytes <= lo + reg.half_bytes, (reg, x)
    for a in regs:
        for b in regs:
            for n in data:
                for n2 in data:
                    x, y = a[f"{n}0"], b[f"{n2}1"]
                    assert x.offset + x.nbytes <= y.offset, (x, y)
    # without the capacity: exactly the shape's need (the size hint)
    small = LowLatencyRegions(7, 4096, 4, 32)
    assert small.total_bytes == small.signals_end + 2 * small.half_need


def test_size_hint_is_the_regions_total():
    from ep_comm import Buffer
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 2, 256) == \
        LowLatencyRegions(128, 7168, 2, 256).total_bytes


# (argument tables and their signature checks: tests/test_kernel_args.py)


def test_status_decoder_names_rank_phase_peer_and_expert():
    from ep_comm.backends.kernels import status
    assert status.decode_status([0] * 8, status.LOW_LATENCY, 0, 5.0) is None
    err = status.decode_status([1, 1, 3, 7, 0, 0, 1, 0], status.LOW_LATENCY, rank=2, limit_s=5.0)
    assert isinstance(err, CommTimeoutError)
    assert err.rank == 2 and err.peer == 3 and err.phase == "low_latency_dispatch/recv"
    assert "local expert 7" in str(err) and "rank 2" in str(err) and "rank 3" in str(err)
    assert "doctor" in str(err)
    err = status.decode_status([1, 2, 0, 250, 1, 3, 9, 0], status.LOW_LATENCY, rank=1,
                               limit_s=2.0)
    assert err.phase == "low_latency_combine/recv" and err.peer == 0
    assert "3 of 9 arrived" in str(err) and "global expert 250" in str(err)
    assert isinstance(status.decode_status([7, 0, 0, 0, 0, 0, 0, 0], status.LOW_LATENCY, 0, 1.0),
                      KernelError)


def test_status_decoder_names_a_send_that_waited_for_a_peers_receive():
    """The acknowledged reuse of a half: a send that timed out waiting for a peer's receive of
    the previous call on its half names the peer, the phase and the likely cause (a receive
    hook not called)."""
    from ep_comm.backends.kernels import status
    from ep_comm.core.constants import (LL_AWAIT_ACK, PHASE_LL_COMBINE_SEND,
                                        PHASE_LL_DISPATCH_SEND)
    err = status.decode_status([1, PHASE_LL_DISPATCH_SEND, 1, -1, LL_AWAIT_ACK, 2, 3, 0],
                               status.LOW_LATENCY, rank=0, limit_s=5.0)
    assert isinstance(err, CommTimeoutError)
    assert err.rank == 0 and err.peer == 1 and err.phase == "low_latency_dispatch/send"
    assert "received 2 of this rank's 3" in str(err) and "receive hook" in str(err)
    err = status.decode_status([1, PHASE_LL_COMBINE_SEND, 3, -1, LL_AWAIT_ACK, 0, 1, 0],
                               status.LOW_LATENCY, rank=2, limit_s=5.0)
    assert err.phase == "low_latency_combine/send" and "previous combine" in str(err)


# ------------------------------------------------------------------------ launch shapes
def test_grid_is_bounded_by_sms_and_at_least_one():
    assert ll.grid_size(132, 0, 0) == 1
    assert ll.grid_size(132, 128, 8) == 128
    assert ll.grid_size(132, 4096, 8) == 132


def test_scales_shape_for_float_and_ue8m0():
    assert ll.scales_shape(7168, False) == (56, torch.float32)
    assert ll.scales_shape(7168, True) == (14, torch.int32)


# -------------------------------------------------------------------- nvshmem bootstrap
@pytest.mark.parametrize("text,value", [("1073741824", 1 << 30), ("2G", 2 << 30),
                                        ("512M", 512 << 20), ("64k", 64 << 10),
                                        ("1.5G", 3 << 29), ("3GB", 3 << 30)])
def test_heap_size_parses_nvshmem_notation(text, value):
    assert nr.parse_size(text) == value


def test_bad_heap_size_is_a_clear_error():
    with pytest.raises(EpCommError, match="NVSHMEM_SYMMETRIC_SIZE"):
        nr.parse_size("lots")


def test_heap_size_covers_the_first_buffer_unless_the_user_set_it():
    heap, from_user = nr.heap_bytes_for(3 << 30, None)
    assert not from_user and heap >= 2 * (3 << 30) + nr.HEAP_SLACK_BYTES and heap % (1 << 20) == 0
    assert nr.heap_bytes_for(1, None)[0] == nr.MIN_HEAP_BYTES
    assert nr.heap_bytes_for(3 << 30, "1G") == (1 << 30, True)


def test_pool_picks_the_smallest_fitting_buffer_deterministically():
    assert nr.pick_pooled([], 1) is None
    assert nr.pick_pooled([8, 4, 4, 16], 4) == 1
    assert nr.pick_pooled([8, 4, 16], 9) == 2
    assert nr.pick_pooled([8], 9) is None


def test_allocation_sizes_are_aligned_and_never_zero():
    assert nr.aligned(0) == nr.ALLOC_ALIGN
    assert nr.aligned(nr.ALLOC_ALIGN + 1) == 2 * nr.ALLOC_ALIGN


def test_import_needs_no_gpu_packages():
    # (torch itself imports cuda.bindings, so only the packages ep_comm could pull in are checked)
    code = ("import sys, ep_comm, ep_comm.backends.kernels.low_latency, ep_comm.runtime.nvshmem\n"
            "bad = [m for m in ('cuda.core', 'nvshmem', 'cupy') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------- runtime launch flow (faked GPU)
class _FakeModule:
    """Stands in for the compiled module: records each launch as a dict of named arguments."""

    cubin_path = "fake.cubin"

    def __init__(self):
        self.launches = []

    def prepare(self, kernel, arg_buffer, grid, block, shared_mem=0):
        params = args.LL_DISPATCH if "dispatch" in kernel else args.LL_COMBINE
        assert arg_buffer.params == params and block == ll.THREADS
        return jit.PreparedLaunch(kernel, arg_buffer, grid, block, shared_mem, self._record)

    def _record(self, prepared, stream):
        self.launches.append((prepared.name, prepared.grid, prepared.args.values()))


class _FakeComm:
    def __init__(self, rank=1, num_ranks=2):
        self.rank, self.num_ranks, self.device = rank, num_ranks, torch.device("cpu", 0)
        self.barriers = []
        self.seq, self.sig = 0, None

    def call_words(self):
        from ep_comm.core import agreement
        return agreement.device_words(self.seq, self.sig or agreement.Signature("dispatch")), None

    def barrier(self, phase):
        self.barriers.append(phase)

    def node_of(self):
        return None


class _FakeHostStatus:
    """ep_comm.runtime.ipc.HostStatus without CUDA: a plain int32 array."""

    def __init__(self, nwords, device_index):
        self.words = [0] * nwords
        self.device_ptr = 0x7F0000001000

    def read(self):
        return list(self.words)

    def clear(self, start=0):
        self.words[start:] = [0] * (len(self.words) - start)

    def free(self):
        self.words = None


@pytest.fixture
def runtime(monkeypatch):
    return _make_runtime(monkeypatch)


def _make_runtime(monkeypatch):
    from ep_comm.runtime import ipc
    from ep_comm.runtime import jit

    class Props:
        multi_processor_count = 132

    module = _FakeModule()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: None)
    monkeypatch.setattr(ipc, "HostStatus", _FakeHostStatus)
    monkeypatch.setattr(jit, "compile_kernels", lambda *a, **k: module)
    monkeypatch.setattr(nr, "acquire", lambda comm, n: nr.SymmetricBuffer(
        torch.zeros(nr.aligned(n), dtype=torch.uint8), nr.aligned(n)))
    monkeypatch.setattr(nr, "bind_module", lambda m: None)
    monkeypatch.setattr(jit, "current_stream_handle", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    m, h, e = 8, 256, 8
    rt = ll.LowLatencyRuntime(_FakeComm(), LowLatencyRegions(m, h, 2, e).total_bytes, True)
    rt.fake_module, rt.sizes = module, (m, h, e)
    return rt


def _dispatch(rt, hook=False, fp8=True, ue8m0=False, t=5):
    m, h, e = rt.sizes
    x = torch.zeros(t, h, dtype=torch.bfloat16)
    idx = torch.zeros(t, 3, dtype=torch.int64)
    return rt.low_latency_dispatch(x, idx, m, e, use_fp8=fp8, round_scale=ue8m0,
                                   use_ue8m0=ue8m0, cumulative_local_expert_recv_stats=None,
                                   dispatch_wait_recv_cost_stats=None, return_recv_hook=hook)


def test_runtime_init_synchronises_ranks(runtime):
    assert runtime.comm.barriers == ["low_latency/init"]


def test_dispatch_without_hook_is_one_launch_of_both_phases(runtime):
    recv_x, scales, count, handle, hook = _dispatch(runtime)
    assert hook is None and len(runtime.fake_module.launches) == 1
    kernel, grid, a = runtime.fake_module.launches[0]
    assert kernel == "ep_ll_dispatch_fp8" and a["phases"] == ll.SEND_PHASE | ll.RECV_PHASE
    m, h, e = runtime.sizes
    reg = runtime.regions(m, h, e)
    assert a["recv_msgs"] == runtime.base + reg["dispatch_recv0"].offset
    assert a["recv_count_sig"] == runtime.base + reg["dispatch_count0"].offset
    assert a["status_claim"] == runtime.base + reg["status_claim"].offset
    assert a["msg_stride"] == reg.msg_bytes and a["num_ranks"] == 2 and a["rank"] == 1
    assert a["recv_x"] == recv_x.data_ptr() and a["recv_scales"] == scales.data_ptr()
    assert a["src_info"] == handle.src_info.data_ptr() and a["recv_count"] == count.data_ptr()
    assert a["cum_stats"] == 0 and a["wait_stats"] == 0
    assert a["host_status"] == runtime._status.device_ptr
    assert a["timeout_ns"] == int(ll.timeout_s() * 1e9)
    assert recv_x.shape == (e // 2, 2 * m, h) and recv_x.dtype == torch.float8_e4m3fn
    assert scales.shape == (e // 2, 2 * m, h // 128) and scales.stride() == (h // 128 * 2 * m, 1, 2 * m)


def test_ue8m0_scales_are_packed_int32_and_imply_round_scale(runtime):
    _, scales, _, _, _ = _dispatch(runtime, ue8m0=True)
    m, h, e = runtime.sizes
    assert scales.dtype == torch.int32 and scales.shape == (e // 2, 2 * m, h // 512)
    a = runtime.fake_module.launches[0][2]
    assert a["ue8m0"] == 1 and a["round_scale"] == 1


def test_consecutive_dispatches_alternate_halves(runtime):
    h0 = _dispatch(runtime)[3]
    h1 = _dispatch(runtime, fp8=False)[3]
    h2 = _dispatch(runtime)[3]
    assert (h0.buffer_idx, h1.buffer_idx, h2.buffer_idx) == (0, 1, 0)
    m, h, e = runtime.sizes
    reg = runtime.regions(m, h, e)
    launches = runtime.fake_module.launches
    assert launches[1][0] == "ep_ll_dispatch_bf16"
    assert launches[1][2]["recv_msgs"] == runtime.base + reg["dispatch_recv1"].offset
    # each half's acknowledged reuse has its own counters and ack words (kernels' HalfSync)
    for i, half in ((0, 0), (1, 1), (2, 0)):
        for arg, name in (("done_counter", "dispatch_done"), ("progress", "dispatch_progress"),
                          ("ack_sig", "dispatch_ack")):
            assert launches[i][2][arg] == runtime.base + reg[f"{name}{half}"].offset, (i, arg)


def test_hook_launches_send_now_and_receive_once_when_called(runtime):
    *_, hook = _dispatch(runtime, hook=True)
    launches = runtime.fake_module.launches
    assert len(launches) == 1 and launches[0][2]["phases"] == ll.SEND_PHASE
    hook()
    assert len(launches) == 2 and launches[1][2]["phases"] == ll.RECV_PHASE
    assert {k: v for k, v in launches[1][2].items() if k != "phases"} == \
        {k: v for k, v in launches[0][2].items() if k != "phases"}
    with pytest.raises(Exception, match="already called"):
        hook()


def test_combine_uses_the_half_of_its_dispatch_and_zero_copy_buffer(runtime):
    _dispatch(runtime)
    _, _, _, handle, _ = _dispatch(runtime)
    assert handle.buffer_idx == 1
    m, h, e = runtime.sizes
    zbuf = runtime.get_next_low_latency_combine_buffer(handle)
    assert zbuf.shape == (e // 2, 2 * m, h) and zbuf.dtype == torch.bfloat16
    reg = runtime.regions(m, h, e)
    assert zbuf.data_ptr() == runtime.base + reg["combine_send1"].offset
    idx = torch.zeros(5, 3, dtype=torch.int64)
    w = torch.ones(5, 3)
    out = torch.empty(5, h, dtype=torch.bfloat16)
    y = torch.zeros(e // 2, 2 * m, h, dtype=torch.bfloat16)
    res, hook = runtime.low_latency_combine(y, idx, w, handle, zero_copy=True, use_logfmt=False,
                                            out=out, return_recv_hook=True,
                                            combine_wait_recv_cost_stats=None)
    assert res is out
    kernel, _, a = runtime.fake_module.launches[-1]
    assert kernel == "ep_ll_combine" and a["phases"] == ll.SEND_PHASE
    assert a["x"] == zbuf.data_ptr() and a["zero_copy"] == 1 and a["out"] == out.data_ptr()
    assert a["recv_rows"] == runtime.base + reg["combine_recv1"].offset
    for arg, name in (("done_counter", "combine_done1"), ("progress", "combine_progress1"),
                      ("ack_sig", "combine_ack1")):
        assert a[arg] == runtime.base + reg[name].offset, arg
    hook()
    assert runtime.fake_module.launches[-1][2]["phases"] == ll.RECV_PHASE


def test_status_word_raises_at_the_next_call_until_cleaned(runtime):
    runtime._status.words[:7] = [1, 1, 0, 2, 1, 3, 4]
    with pytest.raises(CommTimeoutError, match="low_latency_dispatch/recv"):
        _dispatch(runtime)
    with pytest.raises(CommTimeoutError):
        _dispatch(runtime)
    m, h, e = runtime.sizes
    runtime.sym.tensor[:8] = 7
    runtime.clean_low_latency_buffer(m, h, e)
    assert int(runtime.sym.tensor[:runtime.regions(m, h, e).signals_end].sum()) == 0
    assert runtime.comm.barriers[-1] == "low_latency/clean"
    _dispatch(runtime)


def test_clean_stops_every_rank_before_zeroing_then_meets_them_again(runtime, monkeypatch):
    """clean_low_latency_buffer: synchronise, barrier, zero, synchronise, barrier. A peer's
    send phases still queued (after a timeout here) write into this rank's buffer until that
    peer has synchronised, i.e. until the first barrier: zeroing before it kept stale words."""
    m, h, e = runtime.sizes
    ops = []
    signals = runtime.regions(m, h, e).signals_end
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: ops.append("sync"))

    def barrier(phase):
        ops.append(("barrier", int(runtime.sym.tensor[:signals].count_nonzero())))
        if ops.count("sync") == 1:  # the clean's first barrier
            # the peer's late sends land while it has not yet reached this barrier
            runtime.sym.tensor[:8] = 7
        runtime.comm.barriers.append(phase)
    monkeypatch.setattr(runtime.comm, "barrier", barrier)
    runtime._status.words[:3] = [1, 1, 0]
    runtime.clean_low_latency_buffer(m, h, e)
    assert [op if op == "sync" else op[0] for op in ops] == ["sync", "barrier", "sync", "barrier"]
    assert ops[3] == ("barrier", 0)  # zeroed between the two barriers
    assert int(runtime.sym.tensor[:signals].count_nonzero()) == 0
    assert runtime.comm.barriers[-2:] == ["low_latency/clean/stopped", "low_latency/clean"]
    assert not any(runtime._status.read())


def test_a_pooled_symmetric_buffer_is_zeroed_after_every_rank_stopped(monkeypatch):
    """nvshmem.acquire reusing a pooled buffer: synchronise, barrier, then zero (a peer's
    kernels of the buffer's last owner may still write into it until then); a fresh
    allocation needs no barrier."""
    ops = []
    tensor = torch.full((nr.ALLOC_ALIGN,), 5, dtype=torch.uint8)
    pooled = nr.SymmetricBuffer(tensor, nr.ALLOC_ALIGN, _released=True)

    class Comm:
        num_ranks, rank = 2, 0

        def barrier(self, phase):
            ops.append(("barrier", phase, int(tensor.count_nonzero())))
            tensor[:4] = 9  # a peer's late write, before it reached the barrier

    state = nr._State(initialized=True, world=(0, 1), device=0, pool=[pooled])
    monkeypatch.setattr(nr, "_STATE", state)
    monkeypatch.setattr(nr, "_world_of", lambda comm: (0, 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: ops.append(("sync",)))
    got = nr.acquire(Comm(), 100)
    assert got is pooled and not got._released and state.pool == []
    assert ops == [("sync",), ("barrier", "nvshmem/reuse", nr.ALLOC_ALIGN)]
    assert int(tensor.count_nonzero()) == 0


def test_destroy_returns_the_buffer_once(runtime):
    released = []
    runtime.sym.release = lambda: released.append(1)
    runtime.destroy()
    runtime.destroy()
    assert released == [1]


def test_kernel_round_scale_bit_trick_equals_fp8_ceil_pow2():
    """kernels/low_latency_common.cuh fp8_scale rounds up to a power of two by clearing the
    mantissa and adding one to the exponent; the reference uses frexp. Same bits everywhere
    scales can be (amax >= 1e-4, so scale >= 1e-4 / 448: always a normal float)."""
    from ep_comm.core import fp8
    g = torch.Generator().manual_seed(0)
    amax = torch.cat([torch.exp(torch.randn(100000, generator=g) * 8).clamp(min=1e-4),
                      torch.tensor([1e-4, 448.0, 896.0, 1.0, 3000.0])])
    scale = amax / torch.full_like(amax, fp8.FP8_MAX)
    u = scale.view(torch.int32).numpy().astype(np.uint32)
    trick = np.where(u & 0x7FFFFF, (u & 0x7F800000) + 0x800000, u).astype(np.uint32)
    want = fp8.ceil_pow2(scale).view(torch.int32).numpy().astype(np.uint32)
    assert np.array_equal(trick, want)


def test_reused_plans_take_each_calls_pointers_and_hooks_their_own(runtime):
    """A plan is built once per (kernel, shape, half, scale format); later calls patch only the
    per-call arguments. A hook launched after other calls used its plan still receives its own
    call's pointers."""
    m, h, e = runtime.sizes
    launches = runtime.fake_module.launches
    _, _, _, h0, hook0 = _dispatch(runtime, hook=True, t=5)   # half 0: builds the plan
    first = dict(launches[-1][2])
    _dispatch(runtime)                                       # half 1
    x = torch.zeros(3, h, dtype=torch.bfloat16)
    idx = torch.ones(3, 2, dtype=torch.int64)
    stats = torch.zeros(e // 2, dtype=torch.int32)
    recv_x, scales, count, h2, _ = runtime.low_latency_dispatch(
        x, idx, m, e, use_fp8=True, round_scale=False, use_ue8m0=False,
        cumulative_local_expert_recv_stats=stats, dispatch_wait_recv_cost_stats=None,
        return_recv_hook=False)                              # half 0 again: the plan reused
    a = launches[-1][2]
    assert h2.buffer_idx == 0 and len(runtime._plans) == 2
    assert a["x"] == x.data_ptr() and a["topk_idx"] == idx.data_ptr()
    assert a["num_tokens"] == 3 and a["num_topk"] == 2 and a["cum_stats"] == stats.data_ptr()
    assert a["recv_x"] == recv_x.data_ptr() and a["recv_scales"] == scales.data_ptr()
    assert a["src_info"] == h2.src_info.data_ptr() and a["recv_count"] == count.data_ptr()
    assert a["range_begin"] == h2.range_begin.data_ptr()
    assert a["range_count"] == h2.range_count.data_ptr()
    fixed = set(first) - set(ll.LL_DISPATCH_PER_CALL)
    assert fixed and all(a[n] == first[n] for n in fixed)
    # the four int32 outputs: one allocation, disjoint contiguous views
    l_, rows = e // 2, 2 * m
    assert h2.src_info.shape == (l_, rows) and h2.range_begin.shape == (l_, 2)
    assert h2.range_count.shape == (l_, 2) and count.shape == (l_,)
    assert all(t.is_contiguous() for t in (h2.src_info, h2.range_begin, h2.range_count, count))
    starts = sorted((t.data_ptr(), t.numel() * 4) for t in
                    (h2.src_info, h2.range_begin, h2.range_count, count))
    assert all(p + n <= q for (p, n), (q, _) in zip(starts, starts[1:]))
    hook0()
    b = launches[-1][2]
    assert b["phases"] == ll.RECV_PHASE and b["num_tokens"] == 5
    assert b["src_info"] == h0.src_info.data_ptr() and b["cum_stats"] == 0


# ------------------------------------------- call agreement in the count words (issue 23)
def _tagged_runtime(monkeypatch):
    from ep_comm.core import agreement
    monkeypatch.setenv(agreement.LL_AGREE_ENV, "1")
    return _make_runtime(monkeypatch)


def _begin(rt, seq, op="low_latency_dispatch", hidden=256, dtype=torch.float8_e4m3fn, e=8, k=3):
    from ep_comm.core import agreement
    rt.comm.seq, rt.comm.sig = seq, agreement.Signature(op, hidden, dtype, e, k, -1, rt.sizes[0])


def test_count_words_carry_the_call_tag_by_default(monkeypatch):
    """The low-latency kernel agreement is on unless EP_COMM_LL_KERNEL_AGREEMENT=0: with the
    variable unset every launch passes the call's tag."""
    from ep_comm.core import agreement
    monkeypatch.delenv(agreement.LL_AGREE_ENV, raising=False)
    rt = _make_runtime(monkeypatch)
    assert rt.tags_calls
    _begin(rt, 3)
    _dispatch(rt)
    tag = rt.fake_module.launches[-1][2]["call_tag"]
    assert tag == agreement.ll_tag(rt.comm.call_words()[0]) and tag != 0


def test_count_words_carry_no_tag_when_turned_off(monkeypatch):
    """With EP_COMM_LL_KERNEL_AGREEMENT=0 every launch passes call_tag 0: the kernels write
    and read count words as plain rows + 1."""
    from ep_comm.core import agreement
    monkeypatch.setenv(agreement.LL_AGREE_ENV, "0")
    runtime = _make_runtime(monkeypatch)
    assert not runtime.tags_calls
    _begin(runtime, 5)
    _, _, _, handle, hook = _dispatch(runtime, hook=True)
    hook()
    m, h, e = runtime.sizes
    runtime.low_latency_combine(torch.zeros(e // 2, 2 * m, h, dtype=torch.bfloat16),
                                torch.zeros(5, 3, dtype=torch.int64), torch.ones(5, 3), handle,
                                zero_copy=False, use_logfmt=False, out=None,
                                return_recv_hook=False, combine_wait_recv_cost_stats=None)
    assert [a["call_tag"] for _, _, a in runtime.fake_module.launches] == [0, 0, 0]


def test_each_call_passes_its_own_tag_through_reused_plans_and_hooks(monkeypatch):
    """With the variable on, every launch's call_tag is agreement.ll_tag of the current call's
    device words (sequence number and signature hash), patched into a reused plan per call; a
    hook launched later still passes its own call's tag."""
    from ep_comm.core import agreement
    from ep_comm.core.constants import LL_TAG_SEQ_SHIFT
    rt = _tagged_runtime(monkeypatch)
    launches = rt.fake_module.launches
    tags = []
    for seq in (1, 2, 3):
        _begin(rt, seq)
        _, _, _, _, hook = _dispatch(rt, hook=seq == 1)
        if seq == 1:
            hook1 = hook
        tags.append(agreement.ll_tag(rt.comm.call_words()[0]))
        assert launches[-1][2]["call_tag"] == tags[-1]
    assert len(rt._plans) == 2  # seq 1 and 3 shared the half-0 plan
    assert [t >> LL_TAG_SEQ_SHIFT for t in tags] == [1, 2, 3]
    assert len({t & 0xFFFF for t in tags}) == 1  # same signature: same hash
    hook1()
    assert launches[-1][2]["call_tag"] == tags[0] and launches[-1][2]["phases"] == ll.RECV_PHASE


def test_tags_in_a_graph_capture_carry_no_sequence_number(monkeypatch):
    """Captured launches replay the captured arguments: their tag has sequence bits 0 (compared
    by hash only, tags_agree), the same whatever call number the capture was."""
    from ep_comm.core.constants import LL_TAG_SEQ_SHIFT
    rt = _tagged_runtime(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    got = []
    for seq in (4, 9):
        _begin(rt, seq)
        _dispatch(rt)
        got.append(rt.fake_module.launches[-1][2]["call_tag"])
    assert got[0] == got[1] and got[0] >> LL_TAG_SEQ_SHIFT == 0 and got[0] != 0


@pytest.mark.parametrize("field,value", [("hidden", 512), ("dtype", torch.bfloat16),
                                         ("num_experts", 16), ("num_topk", 4),
                                         ("num_max_tokens", 16)])
def test_tag_hash_differs_for_every_disagreeing_size(field, value):
    from ep_comm.core import agreement
    base = dict(op="low_latency_dispatch", hidden=256, dtype=torch.float8_e4m3fn,
                num_experts=8, num_topk=3, handle=-1, num_max_tokens=8)
    tag = lambda sig, seq=7: agreement.ll_tag(agreement.device_words(seq, sig))  # noqa: E731
    a = tag(agreement.Signature(**base))
    b = tag(agreement.Signature(**{**base, field: value}))
    assert a != b and (a & 0xFFFF) != (b & 0xFFFF) and a >> 16 == b >> 16 == 7
    assert 0 < a < 2**31 and 0 < b < 2**31  # an int32 kernel argument, never 0 (= off)
    # the sequence number folds into [1, LL_TAG_SEQ_MOD]; handle is not hashed
    from ep_comm.core.constants import LL_TAG_SEQ_MOD
    assert tag(agreement.Signature(**base), LL_TAG_SEQ_MOD + 7) == a
    assert tag(agreement.Signature(**{**base, "handle": 3})) == a


def _disagree_words(theirs, mine, peer=0, phase=1, expert=2):
    from ep_comm.core.constants import STATUS_DISAGREE
    return [STATUS_DISAGREE, phase, peer, expert, theirs, mine, 0, 0]


def test_decoder_names_the_rank_that_skipped_a_call():
    """Same hash, call numbers 4 here and 3 on the peer: the peer skipped a call; the error is a
    CollectiveMismatchError on field seq naming it, with the unfolded call numbers."""
    from ep_comm.backends.kernels import status
    from ep_comm.errors import CollectiveMismatchError
    h = 0x1234
    err = status.decode_status(_disagree_words((3 << 16) | h, (4 << 16) | h), status.LOW_LATENCY,
                               rank=1, limit_s=3.0, seq=4)
    assert isinstance(err, CollectiveMismatchError) and err.field == "seq"
    assert err.values == {"#4": [1], "#3": [0]} and err.call == 4
    assert "Rank 0 skipped a call" in str(err) and "low_latency_dispatch/recv" in str(err)
    assert "local expert 2" in str(err)
    # the other side: this rank is behind (seq hint past the fold)
    from ep_comm.core.constants import LL_TAG_SEQ_MOD
    err = status.decode_status(_disagree_words((5 << 16) | h, (4 << 16) | h, peer=1, phase=2),
                               status.LOW_LATENCY, rank=0, limit_s=3.0, seq=LL_TAG_SEQ_MOD + 4)
    assert err.values == {f"#{LL_TAG_SEQ_MOD + 4}": [0], f"#{LL_TAG_SEQ_MOD + 5}": [1]}
    assert "Rank 0 skipped a call" in str(err) and "low_latency_combine/recv" in str(err)


def test_decoder_names_the_rank_whose_signature_differs():
    from ep_comm.backends.kernels import status
    from ep_comm.errors import CollectiveMismatchError
    err = status.decode_status(_disagree_words((2 << 16) | 0x0AAA, (2 << 16) | 0x0BBB, peer=1),
                               status.LOW_LATENCY, rank=0, limit_s=3.0, seq=2)
    assert isinstance(err, CollectiveMismatchError) and err.field == "signature"
    assert err.values == {"hash 0x0bbb": [0], "hash 0x0aaa": [1]} and err.call == 2
    assert "Rank 1's call differs" in str(err) and "hidden" in str(err)
    assert "EP_COMM_CHECK_AGREEMENT=1" in str(err)


def test_disagreement_status_raises_at_the_next_call_until_cleaned(monkeypatch):
    from ep_comm.errors import CollectiveMismatchError
    rt = _tagged_runtime(monkeypatch)
    _begin(rt, 2)
    rt._status.words[:8] = _disagree_words((1 << 16) | 5, (2 << 16) | 5)
    for _ in range(2):
        with pytest.raises(CollectiveMismatchError, match="skipped a call"):
            _dispatch(rt)
    m, h, e = rt.sizes
    rt.clean_low_latency_buffer(m, h, e)
    _dispatch(rt)


def test_decoder_names_a_peer_that_runs_without_the_agreement():
    from ep_comm.backends.kernels import status
    from ep_comm.core import agreement
    err = status.decode_status(_disagree_words(0, (2 << 16) | 7, peer=1), status.LOW_LATENCY,
                               rank=0, limit_s=3.0, seq=2)
    assert err.field == agreement.LL_AGREE_ENV and err.values == {"1": [0], "0": [1]}


def test_bad_id_found_by_the_dispatch_kernel_is_an_input_error_then_cleared(runtime):
    """The dispatch kernel's per-call id check (words from LL_INFO_BAD_ID, no code): the next
    status read raises InputError naming token, column and value, then clears those words and
    the reporter's device claim, so the Buffer goes on; a timeout code is never cleared by it."""
    from ep_comm.core.constants import LL_INFO_BAD_ID
    from ep_comm.errors import InputError
    _dispatch(runtime)
    m, h, e = runtime.sizes
    at = runtime.regions(m, h, e)["status_claim"].offset + 4
    runtime.sym.tensor[at:at + 4] = 1  # the kernel's claim
    runtime._status.words[LL_INFO_BAD_ID:LL_INFO_BAD_ID + 4] = [1, 3, 1, 17]
    with pytest.raises(InputError, match=r"topk_idx\[3, 1\] = 17 \(token 3\)"):
        _dispatch(runtime)
    assert runtime._status.words == [0] * len(runtime._status.words)
    assert runtime.sym.tensor[at:at + 4].tolist() == [0, 0, 0, 0]
    _dispatch(runtime)  # usable again
    runtime._status.words[0] = 1  # a timeout and a bad id: the timeout wins and stays
    runtime._status.words[LL_INFO_BAD_ID] = 1
    from ep_comm.errors import CommTimeoutError
    for _ in range(2):
        with pytest.raises(CommTimeoutError):
            _dispatch(runtime)


def test_signal_words_have_one_place_for_every_shape():
    """Another M, hidden or E (a change between calls, or ranks that disagree) finds every
    signal word where the other layout has it, so the call tags in the count words name a
    disagreement and no word of one layout is read as another's."""
    regs = [LowLatencyRegions(m, h, 4, e) for m, h, e in
            [(128, 7168, 256), (8, 1024, 32), (64, 2048, 2048), (1, 128, 4)]]
    names = [n for n in regs[0].regions if not n.startswith(("dispatch_send", "dispatch_recv",
                                                             "combine_send", "combine_recv"))]
    for reg in regs[1:]:
        assert reg.signals_end == regs[0].signals_end
        for n in names:
            assert reg[n] == regs[0][n], n
    with pytest.raises(InputError, match="at most 2048 experts"):
        LowLatencyRegions(8, 1024, 4, 4096)
