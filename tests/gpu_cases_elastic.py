"""GPU cases of ``ElasticBuffer.dispatch(do_expand=True)``: the backend under test against the
reference backend (the oracle of the expanded layout, see tests/test_elastic.py) on the same
process group, bit for bit: the expanded rows, FP8 scales and weights, the handle, then a
combine of the expanded rows. On the kernels backend within one node the NVLink dispatch kernel
writes the expanded rows itself (no gather after it); the reference gathers them.

Padding rows (no entry lands there) are compared only with ``do_zero_padding`` (zero on both);
otherwise their content is unspecified.
"""
from __future__ import annotations

import dataclasses

import torch

from gpu_cases_normal import NCase, fp8_cast, n_inputs, n_tokens
from gpu_common import Failures, check_status, sync

#: handle fields that must be equal (tensors bit for bit, ints and lists exactly).
HANDLE_FIELDS = ("num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list",
                 "psum_num_recv_tokens_per_scaleup_rank", "psum_num_recv_tokens_per_expert",
                 "num_unaligned_recv_tokens_per_expert", "recv_src_metadata",
                 "dst_buffer_slot_idx", "expand_rows", "expand_src", "expand_slot")


@dataclasses.dataclass(frozen=True)
class ECase:
    """An expanding dispatch: the routing and payload of ``case`` (its ``alignment`` is the
    expert alignment), with or without CPU sync, zero padding, weights; ``cached``: then a
    cached dispatch of new data along the handle (the copy path on every backend)."""
    case: NCase
    sync: bool = True
    zero_padding: bool = False
    weights: bool = True
    cached: bool = False


def expand_cases(base: int) -> list:
    """bf16 and fp8, alignments 1 and 128 (and 4), CPU sync or worst-case rows, ragged token
    counts, -1 entries, distinct random top-k ids, an empty rank, one token per rank, hiddens
    other than 7168."""
    return [
        ECase(NCase(seed=base, hidden=1000, num_tokens=40, ragged=9, num_experts=16,
                    num_topk=4, drop=0.15), cached=True),
        ECase(NCase(seed=base + 1, hidden=1536, num_tokens=33, ragged=5, num_experts=32,
                    num_topk=6, fp8=True, alignment=128), sync=False, zero_padding=True),
        ECase(NCase(seed=base + 2, hidden=2048, num_tokens=21, num_experts=8, num_topk=2,
                    routing="empty_last", alignment=128), zero_padding=True),
        ECase(NCase(seed=base + 3, hidden=512, num_experts=16, num_topk=3, routing="one_token",
                    fp8=True), sync=False, weights=False),
        ECase(NCase(seed=base + 4, hidden=4096, num_tokens=150, ragged=-40, num_experts=64,
                    num_topk=8, drop=0.05, alignment=4), zero_padding=True),
    ]


def _cpu(v):
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, (tuple, list)):
        return type(v)(_cpu(u) for u in v)
    return v


def compare_expanded(fails: Failures, got, ref, zero_padding: bool, label: str) -> None:
    """Expanded dispatch results ``got`` vs ``ref`` ((recv_x, recv_idx, recv_w, handle))."""
    gx, gi, gw, gh = _cpu(got)
    rx, ri, rw, rh = _cpu(ref)
    # padding: unspecified content (the handle stays on its device: the mask comes to the CPU)
    rows = slice(None) if zero_padding else (rh.expand_src >= 0).cpu()
    pairs = zip(gx, rx) if isinstance(rx, tuple) else [(gx, rx)]
    for part, (g, r) in zip(("recv_x", "recv_x scales"), pairs):
        fails.equal(f"{label} {part}", g[rows], r[rows])
    fails.equal(f"{label} recv_topk_idx", gi, ri)
    if rw is not None:
        fails.equal(f"{label} recv_topk_weights", gw[rows], rw[rows])
    else:
        fails.equal(f"{label} recv_topk_weights", gw, rw)
    for field in HANDLE_FIELDS:
        fails.equal(f"{label} handle.{field}", _cpu(getattr(gh, field)), _cpu(getattr(rh, field)))


def run_expand_case(ctx, buf, ref, ec: ECase, fails: Failures, corrupt: bool = False) -> None:
    case, r, me, dev = ec.case, ctx.world_size, ctx.rank, ctx.device
    fails.where = f"{ec} (seed={case.seed})"
    nmax = max(1, max(n_tokens(case, q, r) for q in range(r)))
    x, idx, w = (t.to(dev) for t in n_inputs(case, me, r))
    send = fp8_cast(x) if case.fp8 else x
    kw = dict(topk_idx=idx, topk_weights=w if ec.weights else None,
              num_experts=case.num_experts, num_max_tokens_per_rank=nmax,
              expert_alignment=case.alignment, do_cpu_sync=ec.sync, do_expand=True,
              do_zero_padding=ec.zero_padding)
    got = buf.dispatch(send, **kw)[:4]
    want = ref.dispatch(send, **kw)[:4]
    if corrupt and got[3].num_expanded_tokens > 0:
        (got[0][0] if case.fp8 else got[0]).view(torch.uint8)[0, 0] ^= 1
    compare_expanded(fails, got, want, ec.zero_padding, "dispatch")

    # Combine of the expanded rows (same input rows on both), with the expanded weights.
    n_exp = want[3].num_expanded_tokens
    g = torch.Generator().manual_seed(case.seed * 7 + me)
    y = torch.randn(n_exp, case.hidden, generator=g).to(torch.bfloat16).to(dev)
    yw = want[2] if ec.weights else None
    got_c = buf.combine(y, got[3], topk_weights=yw)[:2]
    want_c = ref.combine(y, want[3], topk_weights=yw)[:2]
    fails.equal("combine combined_x", _cpu(got_c[0]), _cpu(want_c[0]))
    fails.equal("combine combined_topk_weights", _cpu(got_c[1]), _cpu(want_c[1]))

    if ec.cached:
        x2 = (torch.randn(x.shape, generator=g) * 3).to(torch.bfloat16).to(dev)
        send2 = fp8_cast(x2) if case.fp8 else x2
        ckw = dict(topk_weights=kw["topk_weights"], handle=got[3], do_expand=True,
                   do_zero_padding=ec.zero_padding)
        got2 = buf.dispatch(send2, **ckw)[:3]
        ckw["handle"] = want[3]
        want2 = ref.dispatch(send2, **ckw)[:3]
        compare_expanded(fails, (*got2, got[3]), (*want2, want[3]), ec.zero_padding, "cached")


def task_elastic_expand(ctx, backend: str, cases: list, corrupt: bool = False):
    """Every case on one ElasticBuffer of ``backend`` and one of the reference. Returns the
    number of cases (or, with ``corrupt``, the failure messages: the checks' self-test)."""
    import ep_comm
    hidden = max(ec.case.hidden for ec in cases)
    nmax = max(max(1, max(n_tokens(ec.case, q, ctx.world_size) for q in range(ctx.world_size)))
               for ec in cases)
    make = dict(num_max_tokens_per_rank=nmax, hidden=hidden, explicitly_destroy=True)
    buf = ep_comm.ElasticBuffer(ctx.group, backend=backend, **make)
    ref = ep_comm.ElasticBuffer(ctx.group, backend="reference", **make)
    fails = Failures(ctx.rank)
    try:
        for ec in cases:
            run_expand_case(ctx, buf, ref, ec, fails, corrupt)
            sync(ctx)
            check_status(buf.runtime)
    finally:
        buf.destroy()
        ref.destroy()
    if corrupt:
        return fails.messages
    fails.raise_if_any(f"ElasticBuffer do_expand {backend} vs reference")
    return len(cases)
