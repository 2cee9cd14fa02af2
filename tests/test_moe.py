"""The MoE layer (EP normal, EP low-latency, TP) against a dense single-process float64 MoE
computed from the same weights, plus its pieces (layout, permute, expert FFNs) on one process.

CPU: gloo ranks on the reference backend, Triton kernels in the interpreter (TRITON_INTERPRET=1
in the rank processes and, without CUDA, in this one), small shapes. ``-m gpu``: 1 and 2 GPUs,
NCCL, the kernels backend, DeepSeek-V3 hidden and intermediate sizes.

Tolerances (relative to the largest |value| of the reference output, elementwise):
* bf16 layer: 2**-6. The layer rounds to bf16 four times (gate/up output, SiLU * up, down
  output, the weighted sum before combine; each at most 2**-9 relative), against float64.
* FP8 layer: 2**-3, against an oracle that casts x and SiLU * up to FP8 like the layer; what
  remains is an FP8 step (2**-4 relative) where a bf16-rounded value lands on the other side
  of an e4m3 rounding boundary, and the bf16 roundings above; the relative Frobenius error
  must also stay below 2**-5.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpu_common import wait_events  # noqa: E402
from multiproc import RankPool  # noqa: E402

from ep_comm import moe  # noqa: E402
from ep_comm.errors import InputError  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class MoECase:
    seed: int = 0
    num_tokens: int = 12          # tokens on rank r: num_tokens + r * ragged
    ragged: int = 3
    hidden: int = 256
    intermediate: int = 128
    num_experts: int = 8
    num_topk: int = 3
    drop: float = 0.1             # probability of a -1 top-k entry
    routing: str = "random"       # random | first_half (experts of the second half get none)
    parallel: str = "ep"          # ep | tp
    mode: str = "normal"          # normal | low_latency
    fp8: bool = False
    alignment: int = 1
    impl: str = "auto"
    backend: str = "reference"
    module: bool = False          # through the MoE nn.Module instead of the functions
    worst: bool = False           # EP normal: num_worst_tokens > all ranks' tokens (no host sync)


def tokens_of(case: MoECase, rank: int) -> int:
    return case.num_tokens + (0 if case.parallel == "tp" else rank * case.ragged)


def make_weights(case: MoECase, device=None):
    """Full bf16 weights w13 [E, 2I, H], w2 [E, H, I], the same on every rank, drawn on
    ``device`` (default CPU). The GPU tasks draw them on their GPU: at DeepSeek-V3 sizes (32
    experts, 1.4 G values) the CPU generator takes tens of seconds per rank; every rank draws
    with the same device type, so all ranks still hold the same weights."""
    device = torch.device(device or "cpu")
    g = torch.Generator(device=device).manual_seed(case.seed)
    e, h, i = case.num_experts, case.hidden, case.intermediate
    w13 = (torch.randn(e, 2 * i, h, generator=g, device=device) / h ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g, device=device) / i ** 0.5).to(torch.bfloat16)
    return w13, w2


def make_inputs(case: MoECase, rank: int):
    """(x [T, H] bf16, topk_idx [T, K] int64, topk_weights [T, K] float32) of a rank (CPU)."""
    g = torch.Generator().manual_seed(case.seed * 1000 + rank + 1)
    t, e, k = tokens_of(case, rank), case.num_experts, case.num_topk
    x = (torch.randn(t, case.hidden, generator=g) * (1 + 2 * torch.rand(t, 1, generator=g)))
    pool = e // 2 if case.routing == "first_half" else e
    idx = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)]) if t else \
        torch.empty(0, k, dtype=torch.int64)
    idx[torch.rand(t, k, generator=g) < case.drop] = -1
    w = torch.rand(t, k, generator=g) + 0.1
    return x.to(torch.bfloat16), idx, w.float()


def reference_weights(case: MoECase, w13, w2):
    """The weights the layer actually multiplies with (FP8 blocks are those of the full
    weights for EP and TP shards alike, see ``ExpertWeights.shard_tp``)."""
    if not case.fp8:
        return w13, w2
    return moe.quantize_weight_fp8(w13), moe.quantize_weight_fp8(w2)


def assert_layer_close(out: torch.Tensor, ref: torch.Tensor, fp8: bool, what: str):
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape, (out.dtype, out.shape)
    if ref.numel() == 0:
        return
    err = (out.double().cpu() - ref.cpu()).abs()
    scale = ref.abs().max().item()
    tol = (2.0 ** -3 if fp8 else 2.0 ** -6) * scale
    assert err.max().item() <= tol, (f"{what}: max error {err.max().item():.4g} > "
                                     f"{tol:.4g} (max |ref| {scale:.4g})")
    if fp8:
        rel = (err.norm() / ref.cpu().norm()).item()
        assert rel <= 2.0 ** -5, f"{what}: relative Frobenius error {rel:.4g}"


def make_buffer(ctx, case: MoECase, max_tokens: int):
    import ep_comm
    r = ctx.world_size
    cfg = ep_comm.Buffer.get_dispatch_config(r)
    nvl = cfg.get_nvl_buffer_size_hint(case.hidden * 2, r)
    rdma = cfg.get_rdma_buffer_size_hint(case.hidden * 2, r)
    ll = case.mode == "low_latency"
    if ll:
        rdma = max(rdma, ep_comm.Buffer.get_low_latency_rdma_size_hint(
            max_tokens, case.hidden, r, case.num_experts))
    return ep_comm.Buffer(ctx.group, num_nvl_bytes=nvl, num_rdma_bytes=rdma,
                          low_latency_mode=ll, backend=case.backend, explicitly_destroy=True)


def task_moe_layers_back_to_back(ctx, case: MoECase, layers: int, wait_s: float = 60.0):
    """``layers`` EP normal layers in a row, each on the previous one's output, with no host
    synchronisation between them but dispatch's count wait (as a transformers model runs its
    MoE blocks); then each layer's output against the dense reference of its input. The GPU
    work must finish within ``wait_s``: else an AssertionError names the layers that finished
    on this rank (instead of the rank hanging at its first read of a result)."""
    torch.manual_seed(case.seed)
    dev = ctx.device
    w13, w2 = make_weights(case, dev)
    x, idx, w = (t.to(dev) for t in make_inputs(case, ctx.rank))
    buf = make_buffer(ctx, case, max(tokens_of(case, r) for r in range(ctx.world_size)))
    weights = moe.ExpertWeights.shard_ep(w13, w2, ctx.rank, ctx.world_size, False)
    inputs, outputs, events = [], [], []
    try:
        for _ in range(layers):
            inputs.append(x)
            x = moe.moe_ep_normal(x, idx, w, weights, buf, case.num_experts, impl=case.impl)
            outputs.append(x)
            if dev.type == "cuda":
                events.append(torch.cuda.Event())
                events[-1].record()
            x = (x.float() / x.float().abs().amax().clamp(min=1e-3)).to(torch.bfloat16)
        wait_events(events, wait_s, f"rank {ctx.rank}: layers")
    finally:
        buf.destroy()
    for i, (inp, out) in enumerate(zip(inputs, outputs)):
        ref = moe.moe_reference(inp, idx, w, *reference_weights(case, w13, w2))
        assert_layer_close(out, ref, False, f"rank {ctx.rank} layer {i} {case}")
    return True


def task_moe_layer(ctx, case: MoECase):
    """Run the layer on this rank's tokens and compare with the dense reference."""
    torch.manual_seed(case.seed)
    dev = ctx.device
    w13, w2 = make_weights(case, dev)
    x, idx, w = make_inputs(case, ctx.rank)
    x, idx, w = x.to(dev), idx.to(dev), w.to(dev)
    # The float64 oracle on the rank's device: on one CPU thread it takes minutes at
    # DeepSeek-V3 sizes.
    ref = moe.moe_reference(x, idx, w, *reference_weights(case, w13.to(dev), w2.to(dev)),
                            fp8_activations=case.fp8)
    max_tokens = max(tokens_of(case, r) for r in range(ctx.world_size))
    # + 3: padding rows on every rank, even one that receives every token
    worst = sum(tokens_of(case, r) for r in range(ctx.world_size)) + 3 if case.worst else 0
    buf = make_buffer(ctx, case, max_tokens) if case.parallel == "ep" else None
    w13d, w2d = w13.to(dev), w2.to(dev)
    if case.module:
        layer = moe.MoE(w13d, w2d, ctx.group, parallel=case.parallel, buffer=buf,
                        mode=case.mode, use_fp8=case.fp8, expert_alignment=case.alignment,
                        num_max_dispatch_tokens_per_rank=max_tokens, num_worst_tokens=worst,
                        impl=case.impl)
        out = layer(x, idx, w)
    elif case.parallel == "tp":
        weights = moe.ExpertWeights.shard_tp(w13d, w2d, ctx.rank, ctx.world_size, case.fp8)
        out = moe.moe_tp(x, idx, w, weights, ctx.group, expert_alignment=case.alignment,
                         impl=case.impl)
    else:
        weights = moe.ExpertWeights.shard_ep(w13d, w2d, ctx.rank, ctx.world_size, case.fp8)
        if case.mode == "low_latency":
            out = moe.moe_ep_low_latency(x, idx, w, weights, buf, case.num_experts, max_tokens,
                                         impl=case.impl)
        else:
            out = moe.moe_ep_normal(x, idx, w, weights, buf, case.num_experts,
                                    expert_alignment=case.alignment, num_worst_tokens=worst,
                                    impl=case.impl)
    if buf is not None:
        buf.destroy()
    assert_layer_close(out, ref, case.fp8, f"rank {ctx.rank} {case}")
    return True


def task_moe_normal_graph(ctx, case: MoECase, replays: int = 3):
    """``moe_ep_normal`` with ``num_worst_tokens`` captured in one CUDA graph (which fails if
    anything in the layer waits for the host), replayed with new tokens and new routing copied
    into the captured inputs; every replay against the dense float64 MoE of its inputs."""
    import torch.distributed as dist
    dev, r = ctx.device, ctx.world_size
    w13, w2 = make_weights(case, dev)
    w13d, w2d = w13.to(dev), w2.to(dev)
    weights = moe.ExpertWeights.shard_ep(w13d, w2d, ctx.rank, r, case.fp8)
    refw = reference_weights(case, w13d, w2d)
    worst = sum(tokens_of(case, q) for q in range(r)) + 3
    buf = make_buffer(ctx, case, max(tokens_of(case, q) for q in range(r)))
    try:
        x0, idx0, w0 = make_inputs(case, ctx.rank)
        xs, idxs, ws = x0.to(dev), idx0.to(dev), w0.to(dev)

        def layer():
            return moe.moe_ep_normal(xs, idxs, ws, weights, buf, case.num_experts,
                                     num_worst_tokens=worst, impl="triton")
        layer()  # compiles every kernel outside the capture
        torch.cuda.synchronize()
        dist.barrier(group=ctx.group)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer()
        for rep in range(1, replays + 1):
            x, idx, w = make_inputs(dataclasses.replace(case, seed=case.seed + 100 * rep), ctx.rank)
            xs.copy_(x)
            idxs.copy_(idx)
            ws.copy_(w)
            out.fill_(float("nan"))  # a row the replay does not write shows
            graph.replay()
            torch.cuda.synchronize()
            ref = moe.moe_reference(xs, idxs, ws, *refw, fp8_activations=case.fp8)
            assert_layer_close(out, ref, case.fp8, f"rank {ctx.rank} graph replay {rep} {case}")
            dist.barrier(group=ctx.group)
    finally:
        buf.destroy()
    return True


# ----------------------------------------------------------------------------- CPU pools
_pools: dict[int, RankPool] = {}


@pytest.fixture(scope="module")
def interp_ranks():
    """``interp_ranks(n).run(task, *args)``: n gloo ranks whose Triton kernels run in the
    interpreter (a pool of this module's own: the shared pool's processes may have imported
    the kernels compiled)."""
    class Runner:
        def __init__(self, n):
            self.n = n

        def run(self, fn, *args):
            if self.n not in _pools:
                _pools[self.n] = RankPool(self.n, env={"TRITON_INTERPRET": "1"})
            try:
                return _pools[self.n].run(fn, *args)
            except Exception:
                _pools.pop(self.n).close(force=True)
                raise
    yield Runner
    for p in _pools.values():
        p.close()
    _pools.clear()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_ep_normal_layer_matches_dense_moe(interp_ranks, world, fp8):
    interp_ranks(world).run(task_moe_layer, MoECase(seed=1 + world, fp8=fp8))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_ep_low_latency_layer_matches_dense_moe(interp_ranks, world, fp8):
    interp_ranks(world).run(task_moe_layer, MoECase(seed=11 + world, fp8=fp8, mode="low_latency"))


@pytest.mark.parametrize("world,fp8", [(2, False), (4, False), (2, True)], ids=["2r-bf16", "4r-bf16", "2r-fp8"])
def test_tp_layer_matches_dense_moe(interp_ranks, world, fp8):
    # FP8 TP needs I / R to be a multiple of 128 (block scales): I = 256 over 2 ranks.
    interp_ranks(world).run(task_moe_layer, MoECase(seed=21 + world, fp8=fp8, parallel="tp",
                                                   intermediate=256 if fp8 else 128))


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_ep_layer_with_experts_that_receive_no_tokens(interp_ranks, mode):
    # only experts 0..3 are routed to: rank 1 of 2 (experts 4..7) computes nothing
    interp_ranks(2).run(task_moe_layer, MoECase(seed=31, routing="first_half", mode=mode))


def test_ep_normal_layer_with_padded_expert_groups(interp_ranks):
    interp_ranks(2).run(task_moe_layer, MoECase(seed=41, alignment=8, num_topk=4, drop=0.0))


@pytest.mark.parametrize("parallel,mode", [("ep", "normal"), ("ep", "low_latency"), ("tp", "normal")])
def test_moe_module_forward_matches_dense_moe(interp_ranks, parallel, mode):
    interp_ranks(2).run(task_moe_layer, MoECase(seed=51, module=True, parallel=parallel, mode=mode))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_ep_layer_with_torch_gemms_matches_dense_moe(interp_ranks, fp8):
    interp_ranks(2).run(task_moe_layer, MoECase(seed=61, impl="torch", fp8=fp8))


@pytest.mark.parametrize("fp8,alignment,module", [(False, 1, False), (True, 4, False),
                                                  (False, 1, True)],
                         ids=["bf16", "fp8-aligned", "module"])
def test_ep_normal_layer_with_num_worst_tokens_matches_dense_moe(interp_ranks, fp8, alignment,
                                                                 module):
    """Buffers sized in advance (no host sync): padding rows must not reach any expert."""
    interp_ranks(2).run(task_moe_layer, MoECase(seed=75, fp8=fp8, alignment=alignment,
                                                module=module, worst=True))


def test_ep_layer_with_a_rank_without_tokens(interp_ranks):
    interp_ranks(2).run(task_moe_layer, MoECase(seed=71, num_tokens=0, ragged=5))


# ----------------------------------------------------------------------------- one process
def layout_oracle(topk_idx, e, alignment):
    """(dest, group_end, group_rows) by plain loops."""
    n, k = topk_idx.shape
    per = [[] for _ in range(e)]
    for r in range(n):
        for j in range(k):
            v = int(topk_idx[r, j])
            if 0 <= v < e:
                per[v].append((r, j))
    dest = torch.full((n, k), -1, dtype=torch.int32)
    ends, start = [], 0
    for ex in range(e):
        for pos, (r, j) in enumerate(per[ex]):
            dest[r, j] = start + pos
        start += -(-len(per[ex]) // alignment) * alignment
        ends.append(start)
    return dest, ends, [len(p) for p in per]


@pytest.mark.parametrize("alignment", [1, 4])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_group_by_expert_groups_copies_by_expert_in_row_order(alignment, impl):
    g = torch.Generator().manual_seed(alignment)
    e, n, k, h = 6, 21, 3, 128
    idx = torch.randint(-1, e + 2, (n, k), generator=g)  # -1 and ids >= e are "not here"
    idx[:, 0][idx[:, 0] == 2] = 3  # expert 2 may get nothing
    idx[idx == 2] = -1
    lay = moe.group_by_expert(idx.to(DEV), e, alignment, impl=impl)
    dest, ends, rows = layout_oracle(idx, e, alignment)
    assert torch.equal(lay.dest.cpu(), dest)
    assert lay.group_end.tolist() == ends and lay.group_rows.tolist() == rows
    assert lay.num_rows >= ends[-1]
    # permute: every copy lands on its row; unpermute: weighted sums
    x = torch.randn(n, h, generator=g).to(torch.bfloat16).to(DEV)
    xp = moe.permute(x, lay, impl)
    for r in range(n):
        for j in range(k):
            if dest[r, j] >= 0:
                assert torch.equal(xp[int(dest[r, j])], x[r])
    from ep_comm.core import fp8
    q, s = fp8.per_token_cast_to_fp8(x)
    qp, sp = moe.permute((q, s), lay, impl)
    ok = dest.flatten() >= 0
    src = torch.arange(n).repeat_interleave(k)[ok]
    dst = dest.flatten()[ok].long()
    assert torch.equal(qp[dst].view(torch.uint8), q[src].view(torch.uint8))
    assert torch.equal(sp[dst], s[src])
    w = torch.rand(n, k, generator=g).to(DEV)
    y = torch.randn(lay.num_rows, h, generator=g).to(torch.bfloat16).to(DEV)
    out = moe.unpermute(y, lay, w, impl)
    ref = torch.zeros(n, h, dtype=torch.float64)
    for r in range(n):
        for j in range(k):
            if dest[r, j] >= 0:
                ref[r] += float(w[r, j]) * y[int(dest[r, j])].double().cpu()
    assert ((out.double().cpu() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-6).all()


def check_layout_kernels(n, k, e, alignment, dtype, seed, strided=False, dev=DEV):
    """The Triton layout (two kernels) equals the torch one (stable sort) exactly, dest and
    group ends and counts, on ids with -1, ids >= E, an expert without copies and repeats of
    one expert within a row; and permute copies every FP8 row and scale row exactly."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randint(-1, e + 2, (n, 2 * k if strided else k), generator=g).to(dtype)
    if e > 2:
        wide[wide == 1] = -1  # expert 1: no copies
    idx = (wide[:, ::2] if strided else wide).to(dev)
    if strided:
        assert not idx.is_contiguous()
    got = moe.group_by_expert(idx, e, alignment, impl="triton")
    want = moe.group_by_expert(idx.cpu(), e, alignment, impl="torch")
    assert torch.equal(got.dest.cpu(), want.dest), "dest differs from the stable-sort layout"
    assert torch.equal(got.group_end.cpu(), want.group_end)
    assert torch.equal(got.group_rows.cpu(), want.group_rows)
    assert got.num_rows == want.num_rows
    assert got.dest.dtype == got.group_end.dtype == got.group_rows.dtype == torch.int32
    h = 256
    from ep_comm.core import fp8 as fp8_format
    x = torch.randn(n, h, generator=g).to(torch.bfloat16).to(dev)
    q, s = moe.gemm.quantize_fp8(x) if dev.type == "cuda" else fp8_format.per_token_cast_to_fp8(x)
    qp, sp = moe.permute((q, s), got, "triton")
    assert sp.stride(0) == 1, "permute must return column-major scales (the GEMM's layout)"
    d = got.dest.flatten().long().cpu()
    ok = d >= 0
    src = torch.arange(n).repeat_interleave(k)[ok]
    assert torch.equal(qp.cpu()[d[ok]].view(torch.uint8), q.cpu()[src].view(torch.uint8))
    assert torch.equal(sp.cpu()[d[ok]], s.cpu()[src])


@pytest.mark.parametrize("n,k,e,alignment,dtype,strided", [
    (0, 4, 5, 1, torch.int64, False),           # no rows: empty groups
    (1, 1, 3, 1, torch.int64, False),           # one copy
    (700, 4, 5, 3, torch.int64, False),         # 2800 ids: two chunks of the count/dest loops
    (520, 16, 5, 2, torch.int64, False),        # 8320 ids: two slices (grid [E, 2])
    (37, 3, 9, 1, torch.int32, True),           # int32 ids, a strided view
    (50, 8, 1, 4, torch.int64, False),          # one expert
], ids=["empty", "one", "two_chunks_aligned", "two_slices", "int32_strided", "one_expert"])
def test_layout_kernels_equal_the_stable_sort_layout(n, k, e, alignment, dtype, strided):
    check_layout_kernels(n, k, e, alignment, dtype, seed=n + 7 * e, strided=strided)


def test_group_by_expert_rejects_bad_input():
    with pytest.raises(InputError, match="alignment"):
        moe.group_by_expert(torch.zeros(2, 2, dtype=torch.int64), 4, 0)
    with pytest.raises(InputError, match="integer tensor"):
        moe.group_by_expert(torch.zeros(2, 2), 4)
    with pytest.raises(InputError, match=r"\[N, K\]"):
        moe.group_by_expert(torch.zeros(4, dtype=torch.int64), 4)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_expert_ffns_on_both_layouts_match_dense_moe(fp8):
    case = MoECase(seed=81, fp8=fp8, num_experts=4, num_topk=2, num_tokens=10)
    w13, w2 = make_weights(case)
    x, idx, w = make_inputs(case, 0)
    idx[idx == 1] = -1  # expert 1: no tokens
    ref = moe.moe_reference(x, idx, w, *reference_weights(case, w13, w2), fp8_activations=fp8)
    weights = moe.ExpertWeights.shard_ep(w13.to(DEV), w2.to(DEV), 0, 1, fp8)
    xd, idxd, wd = x.to(DEV), idx.to(DEV), w.to(DEV)
    # contiguous
    lay = moe.group_by_expert(idxd, case.num_experts, 1)
    xin = moe.gemm.quantize_fp8(xd) if fp8 else xd
    y = moe.expert_ffn_contiguous(moe.permute(xin, lay), lay, weights)
    assert_layer_close(moe.unpermute(y, lay, wd), ref, fp8, "contiguous")
    # masked: tokens of expert e in rows [0, count[e]) of [E, M, H], M larger than any count
    e_, m = case.num_experts, 16
    xm = torch.zeros(e_, m, case.hidden, dtype=torch.bfloat16, device=DEV)
    count = torch.zeros(e_, dtype=torch.int32)
    where = {}
    for t in range(x.shape[0]):
        for j in range(case.num_topk):
            ex = int(idx[t, j])
            if ex >= 0:
                where[(t, j)] = (ex, int(count[ex]))
                xm[ex, count[ex]] = xd[t]
                count[ex] += 1
    if fp8:
        q, s = moe.gemm.quantize_fp8(xm)
        xm = (q, s)
    ym = moe.expert_ffn_masked(xm, count.to(DEV), weights, expected_m=m)
    out = torch.zeros(x.shape[0], case.hidden, dtype=torch.float64)
    for (t, j), (ex, row) in where.items():
        out[t] += float(w[t, j]) * ym[ex, row].double().cpu()
    assert_layer_close(out.to(torch.bfloat16), ref, fp8, "masked")


def test_quantize_weight_fp8_uses_128_blocks():
    w = torch.randn(2, 200, 300) * torch.logspace(-3, 2, 200).view(1, 200, 1)
    q, s = moe.quantize_weight_fp8(w.to(torch.bfloat16))
    assert q.shape == (2, 200, 300) and s.shape == (2, 2, 3)
    d = moe.dequantize_weight((q, s))
    blocks = torch.nn.functional.pad(w, (0, 84, 0, 56)).view(2, 2, 128, 3, 128)
    amax = blocks.abs().amax(dim=(2, 4))
    assert torch.allclose(s, amax / 448, rtol=1e-2)
    err = (d - w.to(torch.bfloat16).float()).abs()
    sc = s.repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)[:, :, :300]
    assert (err <= 2.0 ** -4 * w.abs() + 2.0 ** -9 * sc + 1e-6).all()


def test_shards_reject_uneven_splits():
    w13 = torch.zeros(6, 256, 64, dtype=torch.bfloat16)
    w2 = torch.zeros(6, 64, 128, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="split evenly"):
        moe.ExpertWeights.shard_ep(w13, w2, 0, 4)
    with pytest.raises(InputError, match="multiples of 128"):
        moe.ExpertWeights.shard_tp(w13, w2, 0, 2, use_fp8=True)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,e,alignment", [(4096, 8, 256, 1), (32768, 8, 32, 1),
                                             (32768, 8, 256, 1), (6000, 6, 70, 128),
                                             (1, 8, 256, 1)],
                         ids=["ep_prefill", "tp_8rank_rows_32_experts", "tp_8rank_rows",
                              "odd_experts_aligned", "one_row"])
def test_gpu_layout_kernels_equal_the_stable_sort_layout(n, k, e, alignment):
    """The layout kernels at prefill sizes (DeepSeek-V3 top-8, 256 local experts) against the
    torch layout, exactly; permute of FP8 rows and column-major scales, exactly."""
    if not GPU:
        pytest.skip("needs CUDA")
    check_layout_kernels(n, k, e, alignment, torch.int64, seed=5 * n + e)


@pytest.mark.gpu
@pytest.mark.parametrize("world,fp8", [(1, False), (2, True)], ids=["bf16-1gpu", "fp8-2gpu"])
def test_gpu_ep_normal_layer_with_num_worst_tokens_in_a_cuda_graph(gpu_ranks, world, fp8):
    """The whole normal-mode EP layer (dispatch, layout, GEMMs, combine) without a host sync:
    captured once, replayed with new data and routing, each replay against the dense MoE
    (tolerances as ``test_gpu_moe_layer_kernels_backend_matches_dense_moe``)."""
    case = MoECase(seed=95 + world, hidden=7168, intermediate=2048, num_experts=32, num_topk=8,
                   num_tokens=128, ragged=16, fp8=fp8, backend="kernels", impl="triton",
                   worst=True)
    gpu_ranks(world).run(task_moe_normal_graph, case)


def test_cpu_tiny_model_layers_back_to_back_match(cpu_ranks):
    """``task_moe_layers_back_to_back`` on 2 CPU ranks (reference backend, torch GEMMs): the
    task's own check, before its GPU run below."""
    case = MoECase(seed=97, hidden=64, intermediate=32, num_experts=8, num_topk=2,
                   num_tokens=12, ragged=6, drop=0.0, impl="torch")
    cpu_ranks(2).run(task_moe_layers_back_to_back, case, 3)


@pytest.mark.gpu
def test_gpu_tiny_model_layers_back_to_back_finish_and_match(gpu_ranks):
    """The transformers tests' tiny shapes (hidden 64, intermediate 32, 8 experts, top-2, 12 and
    18 tokens) through the EP normal layer with Triton experts, four layers in a row without a
    host sync between them, 2 ranks: the pattern of the Qwen3-MoE GPU test that stalls without
    CUDA_LAUNCH_BLOCKING (2026-12-07), here without transformers."""
    case = MoECase(seed=97, hidden=64, intermediate=32, num_experts=8, num_topk=2,
                   num_tokens=12, ragged=6, drop=0.0, backend="kernels", impl="triton")
    gpu_ranks(2).run(task_moe_layers_back_to_back, case, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2], ids=["2gpu"])
@pytest.mark.parametrize("parallel,mode,fp8", [("ep", "normal", False), ("ep", "low_latency", True),
                                               ("tp", "normal", True)],
                         ids=["ep-normal-bf16", "ep-low_latency-fp8", "tp-normal-fp8"])
def test_gpu_moe_layer_kernels_backend_matches_dense_moe(gpu_ranks, world, parallel, mode, fp8):
    """The layer on 2 GPUs (NCCL, kernels backend, Triton GEMMs) at DeepSeek-V3 hidden and
    intermediate sizes against the float64 dense MoE of the same weights. Each parallel/mode
    pair runs once, the dtypes spread over them (EP normal FP8 runs in the CUDA-graph test
    above, the one-GPU layer there and in bench/moe.py): the GPU suite's time is one call.

    Tolerance (``assert_layer_close``): bf16, max |error| <= 2**-6 * max |reference| (four bf16
    roundings of at most 2**-9 each, plus fp32 summation over K = 7168); FP8, 2**-3 of the max
    and a relative Frobenius error <= 2**-5 against the oracle that casts x and SiLU * up to FP8.
    """
    case = MoECase(seed=91 + world, hidden=7168, intermediate=2048, num_experts=32, num_topk=8,
                   num_tokens=128, ragged=16, parallel=parallel, mode=mode, fp8=fp8,
                   backend="kernels", impl="triton")
    gpu_ranks(world).run(task_moe_layer, case)
