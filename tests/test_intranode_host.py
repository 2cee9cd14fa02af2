"""CPU tests of the host-side math of the NVLink kernels: buffer regions, launch geometry, size
checks, and a Python model of the kernels' index arithmetic (channels, windows, rows, ring
slots) checked against the reference layout (ep_comm.core.routing)."""
from __future__ import annotations

import bisect

import pytest
import torch

from ep_comm.core import routing
from ep_comm.config import Config, default_config
from ep_comm.core.constants import NORMAL_MAX_TOPK as MAX_TOPK
from ep_comm.core.constants import (NVL_MAX_CHANNELS, NVL_MAX_LOCAL_EXPERTS, NVL_MAX_RANKS,
                                    NVL_WINDOW_TOKENS)
from ep_comm.errors import InputError
from ep_comm.backends.kernels.intranode import (aligned_counts, check_sizes, launch_geometry, nvl_window,
                               regions_for)
from ep_comm.core.constants import NVL_NOTIFY_ROW as NOTIFY_ROW
from ep_comm.core.regions import IntranodeRegions


@pytest.mark.parametrize("hidden", [8, 136, 264, 2048, 4096, 7168])
@pytest.mark.parametrize("num_ranks", [1, 2, 8])
def test_control_words_do_not_move_with_hidden_or_config(hidden, num_ranks):
    base = IntranodeRegions(default_config(num_ranks), 2048 * 2, num_ranks)
    other = IntranodeRegions(Config(num_sms=48, nvl_chunk=6, nvl_buffer=256), hidden * 2, num_ranks)
    for name in ("ctrl", "notify_flag", "notify_counts", "tail", "head", "ring"):
        assert base[name].offset == other[name].offset, name
    assert base["notify_counts"].nbytes == NVL_MAX_RANKS * NOTIFY_ROW * 4
    assert base["tail"].nbytes == base["head"].nbytes == NVL_MAX_CHANNELS * NVL_MAX_RANKS * 8


@pytest.mark.parametrize("hidden", [8, 136, 264, 2048, 7168])
def test_slot_fields_fit_and_are_aligned(hidden):
    reg = IntranodeRegions(default_config(2), hidden * 2, 2)
    offs = reg.slot_offsets()
    assert reg.slot_bytes % 16 == 0 and reg["ring"].offset % 128 == 0
    assert offs["payload"] == 16 and offs["payload"] % 16 == 0
    assert offs["scales"] >= offs["payload"] + hidden * 2  # bf16 payload fits
    assert offs["topk_idx"] >= offs["scales"] + (hidden + 127) // 128 * 4
    assert offs["topk_pos"] == offs["topk_weights"] + MAX_TOPK * 4  # expanded positions
    assert offs["topk_pos"] + MAX_TOPK * 4 <= reg.slot_bytes


def test_ring_size_and_hint_agree():
    cfg = default_config(2, 24)
    reg = IntranodeRegions(cfg, 7168 * 2, 2)
    assert reg["ring"].nbytes == cfg.num_channels * 2 * cfg.nvl_buffer * reg.slot_bytes
    assert cfg.get_nvl_buffer_size_hint(7168 * 2, 2) == reg.total_bytes
    assert regions_for(cfg, 7168, 2).total_bytes == reg.total_bytes


def test_default_config_is_analytic():
    cfg = default_config(2, 24)
    assert cfg.num_channels == 12 and cfg.nvl_chunk == NVL_WINDOW_TOKENS <= 32
    assert cfg.nvl_buffer >= 2 * cfg.nvl_chunk
    assert nvl_window(cfg) == NVL_WINDOW_TOKENS
    # every sender warp group (24 / R warps) moves the same number of tokens per window
    for r in (1, 2, 3, 4, 6, 8):
        assert NVL_WINDOW_TOKENS % (24 // r) == 0


def test_window_is_at_most_half_the_ring_and_one_ballot():
    assert nvl_window(Config(num_sms=24, nvl_chunk=64, nvl_buffer=512)) == 32
    assert nvl_window(Config(num_sms=24, nvl_chunk=8, nvl_buffer=10)) == 5
    with pytest.raises(InputError, match="nvl_buffer"):
        launch_geometry(Config(num_sms=24, nvl_chunk=1, nvl_buffer=1))


def test_launch_geometry_limits():
    assert launch_geometry(Config(num_sms=24)) == (12, 24)
    with pytest.raises(InputError, match="SMs of this GPU"):
        launch_geometry(Config(num_sms=120), num_device_sms=100)
    with pytest.raises(InputError, match="channels"):
        launch_geometry(Config(num_sms=2 * NVL_MAX_CHANNELS + 2))


def test_size_checks():
    check_sizes(8, 8 * NVL_MAX_LOCAL_EXPERTS, MAX_TOPK)
    with pytest.raises(InputError, match="ranks"):
        check_sizes(NVL_MAX_RANKS + 1, 16 * 9, 8)
    with pytest.raises(InputError, match="experts per rank"):
        check_sizes(1, NVL_MAX_LOCAL_EXPERTS + 1, 8)
    with pytest.raises(InputError, match="top-k"):
        check_sizes(2, 16, MAX_TOPK + 1)


def test_aligned_counts():
    assert aligned_counts([0, 1, 127, 128, 129], 128) == [0, 128, 128, 128, 256]
    assert aligned_counts([3, 5], 1) == [3, 5]


# ------------------------------------------------------------- model of the kernels' indices
def _channel_begin(t, c, num_channels):
    return t * c // num_channels


def model_dispatch(in_rank_all, num_channels, window):
    """Rows written per destination, as the kernels compute them.

    Returns ({dst: {row: (src, token)}}, {src: send_pos [T, R]})."""
    r = len(in_rank_all)
    counts = torch.stack([m.sum(0, dtype=torch.int32) for m in in_rank_all])  # [src, dst]
    prefix = torch.cumsum(counts, 0)
    rows = {d: {} for d in range(r)}
    send_pos = {}
    for s, m in enumerate(in_rank_all):
        t = m.shape[0]
        sp = torch.full((t, r), -7, dtype=torch.int32)
        for d in range(r):
            row_base = 0 if s == 0 else int(prefix[s - 1, d])
            for c in range(num_channels):
                t0, t1 = _channel_begin(t, c, num_channels), _channel_begin(t, c + 1, num_channels)
                # one rank: the channel's two blocks each copy half of it (nvl_dispatch)
                mid = t0 + (t1 - t0) // 2
                for b0, b1 in [(t0, t1)] if r > 1 else [(t0, mid), (mid, t1)]:
                    model_dispatch_range(m, d, b0, b1, window, row_base, rows, sp, s)
        send_pos[s] = sp
    return rows, send_pos, prefix


def model_dispatch_range(m, d, t0, t1, window, row_base, rows, sp, s):
    """dispatch_send's warp group for destination d over tokens [t0, t1) of source s."""
    sent = int(m[:t0, d].sum())  # tokens before the range
    for w0 in range(t0, t1, window):
        nw = min(window, t1 - w0)
        mask = [bool(m[w0 + lane, d]) for lane in range(nw)]
        for lane in range(nw):
            sp[w0 + lane, d] = row_base + sent + sum(mask[:lane]) if mask[lane] else -1
        for j, lane in enumerate(lane for lane in range(nw) if mask[lane]):
            row = row_base + sent + j
            assert row not in rows[d]
            rows[d][row] = (s, w0 + lane)
        sent += sum(mask)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_ranks,num_channels,window", [(1, 12, 24), (2, 12, 24), (3, 5, 7),
                                                            (4, 3, 32)])
def test_kernel_row_math_matches_reference_order(seed, num_ranks, num_channels, window):
    g = torch.Generator().manual_seed(seed)
    experts = 8 * num_ranks
    tokens = [int(torch.randint(0, 90, (1,), generator=g)) for _ in range(num_ranks)]
    tokens[0] = 0 if seed == 1 else tokens[0]  # a rank with no tokens
    in_rank_all = []
    for t in tokens:
        idx = torch.randint(-1, experts, (t, 3), generator=g)
        in_rank_all.append(routing.is_token_in_rank(idx, experts, num_ranks))
    rows, send_pos, prefix = model_dispatch(in_rank_all, num_channels, window)
    for d in range(num_ranks):
        n = int(prefix[-1, d])
        assert sorted(rows[d]) == list(range(n))  # every row written once
        got = [rows[d][i] for i in range(n)]
        want = [(s, int(t)) for s in range(num_ranks)
                for t in torch.nonzero(in_rank_all[s][:, d]).flatten()]
        assert got == want  # by source rank, then token index
    for s in range(num_ranks):
        offset = prefix[s] - torch.stack([m.sum(0, dtype=torch.int32) for m in in_rank_all])[s]
        assert torch.equal(send_pos[s], routing.send_positions(in_rank_all[s], offset))
    # combine: rows of source d in channel c, found by binary search on recv_src_idx
    for me in range(num_ranks):
        n = int(prefix[-1, me])
        src_idx = [rows[me][i][1] for i in range(n)]
        for d in range(num_ranks):
            lo = 0 if d == 0 else int(prefix[d - 1, me])
            hi = int(prefix[d, me])
            covered = []
            for c in range(num_channels):
                a = _channel_begin(tokens[d], c, num_channels)
                b = _channel_begin(tokens[d], c + 1, num_channels)
                r0 = bisect.bisect_left(src_idx, a, lo, hi)
                r1 = bisect.bisect_left(src_idx, b, lo, hi)
                assert all(a <= src_idx[i] < b for i in range(r0, r1))
                # the combine receiver of d, channel c, expects exactly these rows in this order
                want = [int(t) for t in torch.nonzero(in_rank_all[d][a:b, me]).flatten() + a]
                assert src_idx[r0:r1] == want
                covered += list(range(r0, r1))
            assert covered == list(range(lo, hi))


def _header_constant(name: str) -> str:
    """The value of ``constexpr int name`` in intranode_common.cuh, with the ``EP_*`` constants
    the compiler defines (ep_comm.core.constants) substituted."""
    import pathlib
    import re

    from ep_comm.core.constants import device_defines
    text = (pathlib.Path(__file__).resolve().parents[1] / "kernels" / "cuda" /
            "intranode_common.cuh").read_text()
    m = re.search(rf"constexpr int {name} = ([^;]+);", text)
    assert m, name
    value = m.group(1).split("//")[0].strip()
    return device_defines().get(value, value)


def test_launch_constants_match_the_kernel_header():
    """KERNEL_THREADS / KERNEL_SMEM of the launcher are what the kernels assume (a block whose
    dynamic shared memory is smaller than kStageBytes would stage rows out of bounds)."""
    from ep_comm.backends.kernels.intranode import KERNEL_SMEM, KERNEL_THREADS
    warps = int(_header_constant("kWarps"))
    per_lane = int(_header_constant("kStagePerLane"))
    assert _header_constant("kThreads") == "kWarps * 32" and KERNEL_THREADS == warps * 32
    assert _header_constant("kStagePerWarp") == "32 * kStagePerLane"
    assert _header_constant("kStageBytes") == "kWarps * kStagePerWarp * 16"
    assert KERNEL_SMEM == warps * 32 * per_lane * 16
    assert KERNEL_SMEM + 1024 <= 227 * 1024  # H100/H200 per-block limit, static smem beside it


def test_status_words_hold_every_local_expert_count():
    """The notify kernel writes each local expert's count at kInfoExpertCounts + e of the host
    status; the host reads the counts list from there (no device-to-host copy)."""
    from ep_comm.core import constants as c
    assert int(_header_constant("kInfoExpertCounts")) == c.NVL_INFO_EXPERT_COUNTS
    assert int(_header_constant("kInfoNumRecv")) == c.NVL_INFO_NUM_RECV
    assert c.NVL_INFO_NUM_RECV < c.NVL_INFO_EXPERT_COUNTS
    assert c.NVL_STATUS_WORDS >= c.NVL_INFO_EXPERT_COUNTS + NVL_MAX_LOCAL_EXPERTS
    assert int(_header_constant("kMaxLocalExperts")) == NVL_MAX_LOCAL_EXPERTS


@pytest.mark.parametrize("num_ranks", [3, 4, 8])
def test_a_sources_rings_stay_in_its_part_whatever_the_layout(num_ranks):
    """Every call of one Buffer puts source s's rings in the same part of the ring area
    (s * ring_stride, the stride fixed by the Buffer's bytes), whatever its channels, ring
    slots and row size: a sender's first window, written before it hears from the receiver,
    never lands on another sender's ring of another layout that a slow receiver still reads."""
    layouts = [(default_config(num_ranks), 7168),
               (Config(num_sms=48, nvl_chunk=6, nvl_buffer=256), 2048),
               (Config(num_sms=2, nvl_chunk=4, nvl_buffer=64), 1000),
               (default_config(num_ranks), 64)]
    nvl = max(IntranodeRegions(c, h * 2, num_ranks).total_bytes for c, h in layouts)
    regs = [IntranodeRegions(c, h * 2, num_ranks, nvl) for c, h in layouts]
    stride = regs[0].ring_stride
    for reg, (cfg, _) in zip(regs, layouts):
        assert reg.ring_stride == stride and reg["ring"].offset == regs[0]["ring"].offset
        assert reg.total_bytes <= nvl  # every layout fits the Buffer sized for the largest
        used = cfg.num_channels * cfg.nvl_buffer * reg.slot_bytes
        assert used <= stride  # source s's rings lie in [s * stride, s * stride + used)
    # a buffer of exactly the size hint of one layout fits that layout
    for cfg, h in layouts:
        hint = IntranodeRegions(cfg, h * 2, num_ranks).total_bytes
        assert IntranodeRegions(cfg, h * 2, num_ranks, hint).total_bytes <= hint
    # too small: the call's total is above the buffer's bytes (refused by the runtime)
    small = IntranodeRegions(layouts[0][0], 7168 * 2, num_ranks, regs[0]["ring"].offset + 1024)
    assert small.total_bytes > regs[0]["ring"].offset + 1024
