"""Rank imbalance benchmark: dispatch and combine when ranks hold unequal numbers of tokens.

For each mode (normal: BF16 dispatch from the layout + combine; low_latency: FP8 dispatch +
BF16 combine), it measures
  * two balanced points (every rank ``base`` tokens, and every rank ``base x max factor``),
    which fix the two parameters of the model below;
  * one rank (``--heavy-rank``) with 2x .. 8x the others' tokens (``--factors``);
  * a few random skews (``--random-skews``; each rank between base/2 and base x max factor).
Dispatch and combine are timed apart, all ranks synchronised before each (see
bench/common.py); the time of a phase is the slowest rank's median (the step is not over
before every rank has its data). Each point is printed beside the model's prediction; the JSON
holds them under ``points`` (with each rank's time), the fitted parameters under ``model``, and
predictions for larger runs under ``model_predictions``; a PNG plot is written beside it when
matplotlib is importable.

    torchrun --nproc-per-node=2 bench/imbalance.py --backend kernels,reference,nccl
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from typing import Sequence

import common
import torch

import ep_comm
from ep_comm.core import routing

GPU_DEFAULTS = dict(normal_tokens=512, ll_tokens=16, hidden=7168, topk=8, experts=256,
                    warmup=3, iters=15)
CPU_DEFAULTS = dict(normal_tokens=32, ll_tokens=4, hidden=512, topk=8, experts=32,
                    warmup=1, iters=3)
MODES = ("normal", "low_latency")
PHASES = ("dispatch", "combine")


# ------------------------------------------------------------------------------ the model
def expected_copies(num_ranks: int, num_topk: int, num_experts: int, per_expert: bool) -> float:
    """Expected copies of one token that one given other rank receives, under uniform random
    routing (each token picks ``num_topk`` distinct experts of ``num_experts``; each rank owns
    ``num_experts / num_ranks`` of them).

    Normal mode sends a token once to each rank owning at least one of its experts:
    ``1 - C(E - E/R, k) / C(E, k)``. Low-latency mode sends it once per selected expert:
    ``k / R``.
    """
    if per_expert:
        return num_topk / num_ranks
    local = num_experts // num_ranks
    return 1.0 - math.comb(num_experts - local, num_topk) / math.comb(num_experts, num_topk)


def busiest_bytes(tokens_per_rank: Sequence[int], row_bytes: float, num_topk: int,
                  num_experts: int, per_expert: bool) -> float:
    """Off-rank bytes of the busiest rank: the most any rank sends, or the most any rank
    receives, whichever is more (expected values; see ``model_time_us``)."""
    r = len(tokens_per_rank)
    c = expected_copies(r, num_topk, num_experts, per_expert)
    total = sum(tokens_per_rank)
    send = max(t * (r - 1) * c for t in tokens_per_rank)
    recv = max((total - t) * c for t in tokens_per_rank)
    return max(send, recv) * row_bytes


def model_time_us(tokens_per_rank: Sequence[int], *, row_bytes: float, num_topk: int,
                  num_experts: int, per_expert: bool, bandwidth_gbps: float,
                  latency_us: float) -> float:
    """Predicted time (us) of one dispatch or combine with ``tokens_per_rank[i]`` tokens on
    rank i (the rank count is ``len(tokens_per_rank)``).

    Every GPU has its own links and can send and receive at ``bandwidth_gbps`` at once (NVLink
    is full duplex, and the kernels spread a rank's traffic over all its peers), so a step
    ends when the rank with the most traffic has moved it:

        t = latency_us + max(max_i S_i, max_j R_j) / bandwidth

    S_i: bytes rank i sends to other ranks, R_j: bytes rank j receives from other ranks, both
    expected values under uniform random top-k routing (``expected_copies`` c per token and
    other rank; ``row_bytes`` per copy): S_i = T_i (R - 1) c b and R_j = (sum_i T_i - T_j) c b.
    Dispatch rows are BF16 (2 H bytes) in normal mode and FP8 messages (H + H/128 x 4 + 16)
    in low-latency mode; combine sends BF16 rows back along the same routes, which swaps S and
    R and so gives the same maximum. A rank's own tokens are local copies (HBM, ~10x faster
    than a link) and are left in the latency term.

    The two parameters are fitted from the balanced measurements (``fit_model``): with
    imbalance, the heavy rank's sending (or, with many ranks, a light rank's receiving) grows
    while the latency stays, which is what the model predicts for any rank count.
    """
    b = busiest_bytes(tokens_per_rank, row_bytes, num_topk, num_experts, per_expert)
    if not math.isfinite(bandwidth_gbps) or bandwidth_gbps <= 0:
        return latency_us
    return latency_us + b / (bandwidth_gbps * 1e3)


def fit_model(busiest: Sequence[float], times_us: Sequence[float]) -> tuple[float, float]:
    """(bandwidth_gbps, latency_us) of ``t = latency + bytes / bandwidth`` by least squares.

    A negative latency is clamped to 0 (line through the origin); times that do not grow with
    the bytes give an infinite bandwidth (the model is then the mean latency).
    """
    n = len(busiest)
    mx, mt = sum(busiest) / n, sum(times_us) / n
    sxx = sum((x - mx) ** 2 for x in busiest)
    slope = sum((x - mx) * (t - mt) for x, t in zip(busiest, times_us)) / sxx if sxx else 0.0
    if slope <= 0:
        return math.inf, mt
    latency = mt - slope * mx
    if latency < 0:
        sxx0 = sum(x * x for x in busiest)
        slope, latency = sum(x * t for x, t in zip(busiest, times_us)) / sxx0, 0.0
    return 1.0 / (slope * 1e3), latency


# ------------------------------------------------------------------------------ points
def make_points(num_ranks: int, base: int, factors: list[int], num_random: int, heavy: int,
                seed: int) -> list[dict]:
    """The token counts per rank to measure (the same on every rank: seeded, no exchange)."""
    fmax = max(factors + [1])
    points = [{"kind": "balanced", "tokens_per_rank": [base] * num_ranks}]
    if fmax > 1:
        points.append({"kind": "balanced", "tokens_per_rank": [base * fmax] * num_ranks})
    for f in factors:
        if f > 1:
            counts = [base] * num_ranks
            counts[heavy % num_ranks] = base * f
            points.append({"kind": f"one rank x{f}", "tokens_per_rank": counts})
    rng = random.Random(seed)
    for i in range(num_random):
        counts = [min(base * fmax, max(1, round(base * 2 ** rng.uniform(-1, math.log2(fmax)))))
                  for _ in range(num_ranks)]
        points.append({"kind": f"random {i + 1}", "tokens_per_rank": counts})
    return points


def row_bytes(mode: str, phase: str, hidden: int) -> float:
    if mode == "low_latency" and phase == "dispatch":
        return common.fp8_row_bytes(hidden) + 16
    return hidden * 2


# ------------------------------------------------------------------------------ measuring
class NormalRunner:
    """Normal-mode dispatch (from the layout, BF16) and combine on one ep_comm Buffer."""

    def __init__(self, ctx, args, backend):
        self.ctx, self.args = ctx, args
        ep_comm.Buffer.set_num_sms(args.num_sms)
        r = ctx.num_ranks
        self.dcfg = ep_comm.Buffer.get_dispatch_config(r)
        self.ccfg = ep_comm.Buffer.get_combine_config(r)
        need = max(c.get_nvl_buffer_size_hint(args.hidden * 2, r) for c in (self.dcfg, self.ccfg))
        self.buffer = ep_comm.Buffer(ctx.group, num_nvl_bytes=need, backend=backend,
                                     explicitly_destroy=True)

    def phases(self, x, topk_idx, weights):
        buf, e = self.buffer, self.args.experts
        ntpr, _, ntpe, in_rank, _ = buf.get_dispatch_layout(topk_idx, e)
        state = {}

        def dispatch():
            state["d"] = buf.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                      num_tokens_per_expert=ntpe, config=self.dcfg)

        def combine():
            buf.combine(state["d"][0], state["d"][4], config=self.ccfg)

        dispatch()
        every = common.gather(self.ctx, ntpr.cpu())
        want = sum(int(n[self.ctx.rank]) for n in every)
        got = state["d"][0].shape[0]
        common.agree(self.ctx, [] if got == want else
                     [f"dispatch received {got} rows, the layouts say {want}"])
        return [("dispatch", dispatch), ("combine", combine)]

    def close(self):
        self.buffer.destroy()


class LowLatencyRunner:
    """Low-latency FP8 dispatch and BF16 combine on one ep_comm Buffer sized for the largest
    token count of the run (``num_max_dispatch_tokens_per_rank`` is the same on all ranks)."""

    def __init__(self, ctx, args, backend, max_tokens):
        self.ctx, self.args, self.m = ctx, args, max_tokens
        r, e, h = ctx.num_ranks, args.experts, args.hidden
        rdma = ep_comm.Buffer.get_low_latency_rdma_size_hint(max_tokens, h, r, e)
        self.buffer = ep_comm.Buffer(ctx.group, num_rdma_bytes=rdma, low_latency_mode=True,
                                     num_qps_per_rank=max(1, e // r), backend=backend,
                                     explicitly_destroy=True)
        self.sim = common.make_x(ctx, e * max_tokens, h, args.seed, 999).view(
            e // r, r * max_tokens, h)

    def phases(self, x, topk_idx, weights):
        buf, e, m = self.buffer, self.args.experts, self.m
        state = {}

        def dispatch():
            state["d"] = buf.low_latency_dispatch(x, topk_idx, m, e, use_fp8=True)

        def combine():
            buf.low_latency_combine(self.sim, topk_idx, weights, state["d"][2])

        dispatch()
        every = common.gather(self.ctx, topk_idx.cpu())
        local = e // self.ctx.num_ranks
        lo = self.ctx.rank * local
        want = sum(torch.bincount(i[i >= 0].flatten(), minlength=e)[lo:lo + local]
                   for i in every).tolist()
        got = state["d"][1].cpu().tolist()
        common.agree(self.ctx, [] if got == want else [f"recv_count {got} != {want}"])
        combine()
        return [("dispatch", dispatch), ("combine", combine)]

    def close(self):
        self.buffer.destroy()


class NcclRunner:
    """all_to_all_single of the same bytes as the mode's dispatch, and back for combine."""

    def __init__(self, ctx, args, mode):
        self.ctx, self.args, self.mode = ctx, args, mode

    def phases(self, x, topk_idx, weights):
        ctx, r, e, h = self.ctx, self.ctx.num_ranks, self.args.experts, self.args.hidden
        if self.mode == "normal":
            send_counts = routing.is_token_in_rank(topk_idx, e, r).sum(0).tolist()
        else:
            owners = torch.div(topk_idx[topk_idx >= 0], e // r, rounding_mode="floor")
            send_counts = torch.bincount(owners, minlength=r).tolist()
        recv_counts = common.exchange_counts(ctx, send_counts)
        d_row, dev = int(row_bytes(self.mode, "dispatch", h)), ctx.device
        d_send = torch.zeros(sum(send_counts), d_row, dtype=torch.uint8, device=dev)
        d_recv = torch.empty(sum(recv_counts), d_row, dtype=torch.uint8, device=dev)
        c_send = torch.zeros(sum(recv_counts), 2 * h, dtype=torch.uint8, device=dev)
        c_recv = torch.empty(sum(send_counts), 2 * h, dtype=torch.uint8, device=dev)
        return [("dispatch", lambda: common.a2a_rows(ctx, d_recv, d_send, recv_counts,
                                                     send_counts)),
                ("combine", lambda: common.a2a_rows(ctx, c_recv, c_send, send_counts,
                                                    recv_counts))]

    def close(self):
        pass


def measure_mode(ctx, args, backend: str, mode: str, timer) -> tuple[list[dict], dict]:
    """Measure every point of one mode; returns (points, fitted model per phase)."""
    base = args.normal_tokens if mode == "normal" else args.ll_tokens
    factors = common.parse_ints(args.factors) or [1]
    points = make_points(ctx.num_ranks, base, factors, args.random_skews, args.heavy_rank,
                         args.seed)
    max_tokens = max(max(p["tokens_per_rank"]) for p in points)
    if backend == "nccl":
        runner = NcclRunner(ctx, args, mode)
    elif mode == "normal":
        runner = NormalRunner(ctx, args, backend)
    else:
        runner = LowLatencyRunner(ctx, args, backend, max_tokens)
    try:
        for i, p in enumerate(points):
            t = p["tokens_per_rank"][ctx.rank]
            topk_idx, weights = common.make_routing(ctx, t, args.experts, args.topk, args.seed, i)
            x = common.make_x(ctx, t, args.hidden, args.seed, i)
            mine = timer.run(runner.phases(x, topk_idx, weights))
            every = common.gather(ctx, mine)
            for ph in PHASES:
                p[f"{ph}_us_per_rank"] = [d[ph] * 1e6 for d in every]
                p[f"{ph}_us"] = max(p[f"{ph}_us_per_rank"])
    finally:
        runner.close()
    model = {}
    balanced = [p for p in points if p["kind"] == "balanced"]
    for ph in PHASES:
        rb = row_bytes(mode, ph, args.hidden)
        kw = dict(row_bytes=rb, num_topk=args.topk, num_experts=args.experts,
                  per_expert=mode == "low_latency")
        xs = [busiest_bytes(p["tokens_per_rank"], **kw) for p in balanced]
        bw, lat = fit_model(xs, [p[f"{ph}_us"] for p in balanced])
        model[ph] = {"bandwidth_gbps": bw, "latency_us": lat, "row_bytes": rb,
                     "fitted_from": "balanced points"}
        for p in points:
            p[f"{ph}_busiest_bytes"] = busiest_bytes(p["tokens_per_rank"], **kw)
            p[f"{ph}_model_us"] = model_time_us(p["tokens_per_rank"], bandwidth_gbps=bw,
                                                latency_us=lat, **kw)
    for p in points:
        p["mode"] = mode
    return points, model


def predictions(args, mode: str, model: dict) -> list[dict]:
    """The model's times for larger runs: balanced, and one rank with the largest factor."""
    base = args.normal_tokens if mode == "normal" else args.ll_tokens
    fmax = max(common.parse_ints(args.factors) or [1])
    out = []
    for r in (2, 4, 8, 16, 32):
        for label, counts in (("balanced", [base] * r), (f"one rank x{fmax}",
                                                        [base * fmax] + [base] * (r - 1))):
            row = {"mode": mode, "num_ranks": r, "kind": label}
            for ph in PHASES:
                m = model[ph]
                row[f"{ph}_model_us"] = model_time_us(
                    counts, row_bytes=m["row_bytes"], num_topk=args.topk,
                    num_experts=args.experts, per_expert=mode == "low_latency",
                    bandwidth_gbps=m["bandwidth_gbps"], latency_us=m["latency_us"])
            out.append(row)
    return out


def _err(measured, modelled):
    return 100.0 * (modelled - measured) / measured if measured else float("nan")


def plot(points: list[dict], models: dict, path, title: str) -> str:
    """Measured time against the busiest rank's off-rank bytes, with the model's line (which
    is straight in these axes); returns a note to print."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no PNG plot (pip install matplotlib)"
    modes = [m for m in MODES if any(p["mode"] == m for p in points)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(10, 3.8 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        pts = [p for p in points if p["mode"] == mode]
        for col, ph in enumerate(PHASES):
            ax = axes[row][col]
            for kind, marker in (("balanced", "o"), ("one rank", "s"), ("random", "^")):
                sel = [p for p in pts if p["kind"].startswith(kind)]
                ax.scatter([p[f"{ph}_busiest_bytes"] / 1e6 for p in sel],
                           [p[f"{ph}_us"] for p in sel], marker=marker, label=kind)
                for p in sel:
                    if kind == "one rank":
                        ax.annotate(p["kind"].split()[-1], (p[f"{ph}_busiest_bytes"] / 1e6,
                                                            p[f"{ph}_us"]), fontsize=7)
            m = models[mode][ph]
            top = max(p[f"{ph}_busiest_bytes"] for p in pts)
            xs = [0.0, top]
            ys = [m["latency_us"] + (x / (m["bandwidth_gbps"] * 1e3)
                                     if math.isfinite(m["bandwidth_gbps"]) else 0.0) for x in xs]
            ax.plot([x / 1e6 for x in xs], ys, color="gray", linestyle="--",
                    label=f"model: {common.fmt(m['latency_us'])} us + bytes / "
                          f"{common.fmt(m['bandwidth_gbps'])} GB/s")
            ax.set_title(f"{mode} {ph}")
            ax.set_xlabel("busiest rank's off-rank traffic (MB, expected)")
            ax.set_ylabel("time, slowest rank (us)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--modes", default="normal,low_latency", help="normal, low_latency or both")
    p.add_argument("--normal-tokens", type=int, help="base tokens per rank, normal mode "
                                                     "(GPU 512, CPU 32)")
    p.add_argument("--ll-tokens", type=int, help="base tokens per rank, low-latency mode "
                                                 "(GPU 16, CPU 4)")
    p.add_argument("--hidden", type=int, help="hidden size (GPU 7168, CPU 512)")
    p.add_argument("--topk", type=int, help="experts per token (8)")
    p.add_argument("--experts", type=int, help="experts in all (GPU 256, CPU 32)")
    p.add_argument("--num-sms", type=int, default=24, help="SMs of the normal-mode kernels")
    p.add_argument("--factors", default="1,2,4,8", help="token factors of the heavy rank")
    p.add_argument("--random-skews", type=int, default=3, help="random token distributions")
    p.add_argument("--heavy-rank", type=int, default=0, help="the rank with more tokens")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = common.init(args)
    common.fill_defaults(args, ctx, GPU_DEFAULTS, CPU_DEFAULTS)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if ctx.num_ranks < 2:
        ctx.log("imbalance needs at least 2 ranks (imbalance between ranks): nothing to measure")
        return common.finish(ctx, 0)
    if args.experts % ctx.num_ranks:
        raise SystemExit(f"--experts {args.experts} must divide by the {ctx.num_ranks} ranks")
    backends = common.parse_backends(args.backend, ctx)
    config = {"normal_tokens": args.normal_tokens, "ll_tokens": args.ll_tokens,
              "hidden": args.hidden, "num_topk": args.topk, "num_experts": args.experts,
              "num_sms": args.num_sms, "factors": args.factors, "random_skews": args.random_skews,
              "heavy_rank": args.heavy_rank, "modes": modes, "warmup": args.warmup,
              "iters": args.iters, "pad_us": args.pad_us, "seed": args.seed}

    def measure(backend):
        timer = common.Timer(ctx, args.warmup, args.iters, args.pad_us)
        all_points, models, figures, preds = [], {}, {}, []
        for mode in modes:
            points, model = measure_mode(ctx, args, backend, mode, timer)
            all_points += points
            models[mode] = model
            preds += predictions(args, mode, model)
            rows = []
            for p in points:
                rows.append([p["kind"], ",".join(map(str, p["tokens_per_rank"]))] +
                            [v for ph in PHASES for v in (
                                p[f"{ph}_us"], p[f"{ph}_model_us"],
                                _err(p[f"{ph}_us"], p[f"{ph}_model_us"]))])
            common.print_table(
                ctx, ["point", "tokens per rank", "dispatch us", "model", "err %",
                      "combine us", "model", "err %"], rows,
                f"imbalance / {backend} / {mode} / {ctx.num_ranks} ranks "
                f"(slowest rank's median; model fitted on the balanced points)")
            for ph in PHASES:
                m = model[ph]
                ctx.log(f"  model {mode} {ph}: bandwidth {common.fmt(m['bandwidth_gbps'])} GB/s, "
                        f"latency {common.fmt(m['latency_us'])} us")
                figures[f"{mode}_{ph}_model_gbps"] = m["bandwidth_gbps"]
                figures[f"{mode}_{ph}_model_latency_us"] = m["latency_us"]
                errs = [abs(_err(p[f"{ph}_us"], p[f"{ph}_model_us"])) for p in points]
                figures[f"{mode}_{ph}_model_mean_abs_err_pct"] = sum(errs) / len(errs)
                fmax = max(common.parse_ints(args.factors) or [1])
                heavy = [p for p in points if p["kind"] == f"one rank x{fmax}"]
                if heavy:  # the heavy rank at the largest factor vs all ranks at base
                    figures[f"{mode}_{ph}_slowdown_x{fmax}"] = \
                        heavy[0][f"{ph}_us"] / points[0][f"{ph}_us"]
        pred_rows = [[p["mode"], p["num_ranks"], p["kind"], p["dispatch_model_us"],
                      p["combine_model_us"]] for p in preds]
        common.print_table(ctx, ["mode", "ranks", "tokens", "dispatch us", "combine us"],
                           pred_rows, "model predictions for larger runs (same per-rank links)")
        if ctx.rank == 0 and not args.no_plot:
            png = common.result_path(args.out, "imbalance", backend, ctx.num_ranks,
                                     common.device_slug(ctx)).with_suffix(".png")
            png.parent.mkdir(parents=True, exist_ok=True)
            ctx.log(plot(all_points, models, png, f"imbalance / {backend} / {ctx.num_ranks} ranks / "
                                          f"{common.device_name(ctx)}"))
        return figures, {"points": all_points, "model": models, "model_predictions": preds}

    code = common.run_backends(ctx, "imbalance", backends, args.out, config, measure)
    return common.finish(ctx, code)


if __name__ == "__main__":
    sys.exit(main())
