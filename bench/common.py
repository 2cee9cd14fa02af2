"""Shared helpers of the benchmarks in ``bench/``: start-up, timing, checks, inputs, JSON results.

Every benchmark runs under torchrun (one process per GPU, NCCL) or on CPU (gloo, reference
backend, small sizes), starts through ``ep_comm.runtime.launcher.init_distributed`` and writes one JSON
file per backend as ``/work/shared/RESULTS.md`` describes:
``<out>/<bench>-<backend>-<ranks>r-<device>.json``.

Timing (``Timer``): each timed run of an operation starts with every rank synchronised. On CUDA
that is a device synchronise, a one-element NCCL all-reduce and then a short spin kernel
(``--pad-us``, 500 us by default; longer for a phase whose host launch takes longer, see
``Timer``) before the start event: the all-reduce ends on every GPU at
about the same moment, and while the spin kernel runs the host enqueues the operation, so the
events measure GPU time from a common start, without the Python launch overhead (as DeepEP's
back-to-back ``bench`` loop does). ``--pad-us 0`` measures host overhead too. On CPU it is a
gloo barrier and the wall clock. A figure is the median over ``--iters`` timed runs after
``--warmup`` untimed ones; the value reported for the run is the mean over ranks of each rank's
figure (every rank's value is kept under ``per_rank`` in the JSON).

The one-line-per-figure table of a folder of results, held against the reference figures, is
``python bench/summary.py --dir DIR`` (``bench/gpu_suite.sh`` prints it last); plain-text
tables are ``tables.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("ep_comm") is None:  # a plain checkout that is not installed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results"
#: Backends a benchmark can time: the two ep_comm backends, and a plain all_to_all_single of
#: the same bytes ("NCCL alone"; on CPU it runs on gloo).
BACKENDS = ("kernels", "reference", "nccl")
#: Cycles per microsecond assumed for the spin kernel of the start pad (H100/H200 ~1.7-2 GHz;
#: the pad only has to outlast the host's enqueueing, so the exact clock does not matter).
_CYCLES_PER_US = 1900


# ------------------------------------------------------------------------------ start-up
@dataclasses.dataclass
class BenchContext:
    """One rank of a benchmark run."""

    rank: int
    num_ranks: int
    group: object
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def log(self, *args) -> None:
        """Print on rank 0 only."""
        if self.rank == 0:
            print(*args, flush=True)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark takes."""
    parser.add_argument("--backend", default=None,
                        help="comma-separated list of kernels, reference, nccl (each writes its "
                             "own JSON); default: kernels on GPUs, reference on CPU")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder of the JSON results")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random routing")
    parser.add_argument("--pad-us", type=float, default=500.0,
                        help="CUDA only: spin before each timed run so the host's launch "
                             "overhead is not timed (0: time it too)")
    parser.add_argument("--cpu", action="store_true",
                        help="run on CPU with gloo even when GPUs are present")


def init(args) -> BenchContext:
    """Start torch.distributed (torchrun, mpirun or a single process) and describe this rank."""
    from ep_comm.runtime.launcher import init_distributed
    group = init_distributed(use_gpu=False if args.cpu else None)
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    from ep_comm.runtime.comm import GLOO_DEVICE_ENV
    shared = (not args.cpu and dist.get_backend(group) == "gloo"
              and os.environ.get(GLOO_DEVICE_ENV) == "cuda" and torch.cuda.is_available())
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" or shared else torch.device("cpu"))
    if shared and rank == 0:
        print(f"note: {GLOO_DEVICE_ENV}=cuda (gloo group, ranks may share GPUs): a check of the "
              "code path; its timings are not measurements of anything", flush=True)
    return BenchContext(rank, n, group, device)


def finish(ctx: BenchContext, exit_code: int) -> int:
    """Leave cleanly: all ranks meet, then the process group is destroyed (a process that
    exits with a live gloo or NCCL group can abort in its destructors). Returns exit_code."""
    dist.barrier(group=ctx.group)
    dist.destroy_process_group()
    return exit_code


def fill_defaults(args, ctx: BenchContext, gpu: dict, cpu: dict) -> None:
    """Set every option left at None to its GPU or CPU default (CPU ones are small)."""
    defaults = gpu if ctx.on_gpu else cpu
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def parse_backends(spec: str | None, ctx: BenchContext) -> list[str]:
    """The backends named in ``--backend`` (default: kernels on GPUs, reference on CPU)."""
    if not spec:
        return ["kernels" if ctx.on_gpu else "reference"]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return names


def start_sweep_bench(args, gpu: dict, cpu: dict) -> tuple[BenchContext, list[str]]:
    """The start of the dispatch/combine benches (normal, low_latency): process group and
    device, this machine's defaults, ``--sweep-iters`` (half of ``--iters``, at least 2), the
    expert count checked against the ranks. Returns (ctx, the backends to run)."""
    ctx = init(args)
    fill_defaults(args, ctx, gpu, cpu)
    if args.sweep_iters is None:
        args.sweep_iters = max(2, args.iters // 2)
    if args.experts % ctx.num_ranks:
        raise SystemExit(f"--experts {args.experts} must divide by the {ctx.num_ranks} ranks")
    return ctx, parse_backends(args.backend, ctx)


def parse_ints(spec: str | None) -> list[int]:
    """``"8,16,24"`` -> ``[8, 16, 24]``; None or "" -> ``[]``."""
    return [int(s) for s in spec.split(",") if s.strip()] if spec else []


# ------------------------------------------------------------------------------ timing
class Timer:
    """Times phases of an operation with all ranks synchronised before each phase.

    ``run([(name, fn), ...])`` calls the phases in order, ``warmup + iters`` times; before every
    phase all ranks synchronise, so each phase is timed alone even when the previous one left
    work in flight on other ranks (e.g. the send half of a hooked dispatch). Returns the median
    seconds of each phase on this rank. Phases may pass results along through a closure.

    The spin kernel before a phase lasts ``pad_us`` or, when the phase's host launch time was
    longer, 1.25 x that time (the largest over ranks): a phase that launches many kernels (a
    whole MoE layer: tens of launches, milliseconds of Python on a slow host) is then fully
    enqueued before its first kernel starts, so the events measure GPU time as documented
    above, not the GPU waiting for the host. The host launch time is the wall time of one call
    of the phase, made first with the GPU idle and no spin kernel; for a phase that waits for
    the GPU itself (normal-mode dispatch reads its receive counts) it includes that wait, and
    what the host launches after the wait stays in the measured time: no spin kernel can cover
    it. ``pad_us = 0`` keeps measuring the host too. ``host`` holds the host launch seconds of
    each phase of the last ``run``.
    """

    def __init__(self, ctx: BenchContext, warmup: int, iters: int, pad_us: float = 500.0):
        self.ctx, self.warmup, self.iters = ctx, max(0, warmup), max(1, iters)
        self.pad_us = pad_us if ctx.on_gpu else 0.0
        self.host: dict[str, float] = {}
        if ctx.on_gpu:
            self._flag = torch.zeros(1, device=ctx.device)

    def sync(self, pad_us: float | None = None) -> None:
        """All ranks meet here (and on CUDA, their GPUs are idle and start together, then spin
        ``pad_us``, default the Timer's)."""
        if self.ctx.on_gpu:
            torch.cuda.synchronize(self.ctx.device)
            dist.all_reduce(self._flag, group=self.ctx.group)  # the current stream waits on it
            pad = self.pad_us if pad_us is None else pad_us
            if pad and hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(int(pad * _CYCLES_PER_US))
        else:
            dist.barrier(group=self.ctx.group)

    def _timed(self, fn) -> tuple[float, float]:
        """(measured seconds, host launch seconds) of one call."""
        if self.ctx.on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            host = time.perf_counter() - t0
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, host
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        return host, host

    def run(self, phases) -> dict[str, float]:
        samples: dict[str, list[float]] = {name: [] for name, _ in phases}
        self.host = {}
        for name, fn in phases:  # the host launch time of each phase (also a warm-up call)
            self.sync(0.0)
            self.host[name] = self._timed(fn)[1]
        pad = {name: max(self.pad_us, 1.25 * h * 1e6) if self.pad_us else 0.0
               for name, h in self.host.items()}
        if self.ctx.on_gpu and self.pad_us:  # every rank spins as long as the slowest needs
            v = torch.tensor(list(pad.values()), dtype=torch.float64, device=self.ctx.device)
            dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.ctx.group)
            pad = dict(zip(pad, v.tolist()))
        for i in range(self.warmup + self.iters):
            for name, fn in phases:
                self.sync(pad[name])
                t = self._timed(fn)[0]
                if i >= self.warmup:
                    samples[name].append(t)
        self.sync()
        return {name: statistics.median(v) for name, v in samples.items()}


def gather(ctx: BenchContext, obj) -> list:
    """``obj`` of every rank, by rank (pickled; small objects only)."""
    out = [None] * ctx.num_ranks
    dist.all_gather_object(out, obj, group=ctx.group)
    return out


def reduce_figures(ctx: BenchContext, mine: dict[str, float]) -> tuple[dict, dict]:
    """(mean over ranks, list by rank) of every figure. All ranks must pass the same keys."""
    every = gather(ctx, mine)
    per_rank = {k: [d[k] for d in every] for k in mine}
    return {k: sum(v) / len(v) for k, v in per_rank.items()}, per_rank


def gbps(num_bytes: float, seconds: float) -> float:
    return num_bytes / seconds / 1e9 if seconds > 0 else float("nan")


# ------------------------------------------------------------------------------ checks
class CheckError(RuntimeError):
    """A backend produced a wrong result before timing: no figure is reported for it."""


def agree(ctx: BenchContext, problems: list[str]) -> None:
    """Raise ``CheckError`` on every rank if any rank found a problem (so that all ranks stop
    together instead of some waiting in the next collective)."""
    every = gather(ctx, problems)
    bad = [f"rank {r}: {p}" for r, ps in enumerate(every) for p in ps]
    if bad:
        raise CheckError("result check failed, no figures reported: " + "; ".join(bad[:6]))


def calc_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - cosine-like similarity of two tensors (0 = equal); DeepEP's tests use the same."""
    a, b = a.double(), b.double()
    denom = (a * a + b * b).sum()
    return float(1 - 2 * (a * b).sum() / denom) if float(denom) > 0 else 0.0


# ------------------------------------------------------------------------------ inputs
def make_routing(ctx: BenchContext, num_tokens: int, num_experts: int, num_topk: int,
                 seed: int, salt: int = 0):
    """Random routing: [T, K] int64 distinct experts per token and [T, K] float32 weights.

    Each token picks the top-k of uniform random scores (so k distinct experts, uniform).
    Seeded by (seed, salt, rank): reruns are repeatable, ranks differ.
    """
    g = torch.Generator(device="cpu").manual_seed(
        (seed * 1_000_003 + salt * 7919 + ctx.rank) % (2 ** 62))
    scores = torch.rand(num_tokens, num_experts, generator=g)
    topk_idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    weights = torch.rand(num_tokens, num_topk, generator=g, dtype=torch.float32) + 0.1
    return topk_idx.to(ctx.device), weights.to(ctx.device)


def make_x(ctx: BenchContext, num_tokens: int, hidden: int, seed: int, salt: int = 0):
    """[T, H] bf16 random activations on this rank's device."""
    g = torch.Generator(device=ctx.device).manual_seed(
        (seed * 1_000_003 + salt * 7919 + ctx.rank + 17) % (2 ** 62))
    return torch.randn(num_tokens, hidden, generator=g, device=ctx.device).to(torch.bfloat16)


def fp8_row_bytes(hidden: int) -> int:
    """Bytes of one token in FP8 with one float32 scale per 128 channels (DeepEP's count)."""
    return hidden + hidden // 128 * 4


def exchange_counts(ctx: BenchContext, send_counts: list[int]) -> list[int]:
    """Rows this rank receives from each rank, given the rows it sends to each rank."""
    send = torch.tensor(send_counts, dtype=torch.int64, device=ctx.device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=ctx.group)
    return recv.tolist()


def a2a_rows(ctx: BenchContext, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits):
    """One ``all_to_all_single`` of uint8 rows (every dtype travels as bytes; gloo has no bf16)."""
    dist.all_to_all_single(out, inp, output_split_sizes=list(out_splits),
                           input_split_sizes=list(in_splits), group=ctx.group)


# ------------------------------------------------------------------------------ results
def shares_gpus(ctx: BenchContext) -> bool:
    """True when this run's ranks share GPUs (a gloo group on CUDA): timings mean nothing."""
    return (ctx.on_gpu and ctx.group is not None and dist.get_backend(ctx.group) == "gloo")


def device_name(ctx: BenchContext) -> str:
    """``"<GPU name> x <ranks>"`` or ``"cpu x <ranks>"`` (devices this run used)."""
    if ctx.on_gpu:
        name = f"{torch.cuda.get_device_name(ctx.device)} x {ctx.num_ranks}"
        return name + " (ranks sharing GPUs)" if shares_gpus(ctx) else name
    return f"cpu x {ctx.num_ranks}"


def gpu_slug(name: str) -> str:
    """The model in a GPU's name, for file names: "NVIDIA H100 80GB HBM3" -> ``h100``."""
    words = [w for w in name.lower().split() if w not in ("nvidia", "tesla", "geforce")]
    return re.sub(r"[^a-z0-9]", "", words[0] if words else "gpu") or "gpu"


def device_slug(ctx: BenchContext) -> str:
    """Short device name for file names: ``h200``, ``h100``, ``cpu`` (``h200-shared`` when the
    ranks share GPUs, so such a run never replaces a measurement)."""
    if not ctx.on_gpu:
        return "cpu"
    slug = gpu_slug(torch.cuda.get_device_name(ctx.device))
    return slug + "-shared" if shares_gpus(ctx) else slug


_GIT: tuple | None = None


def git_info() -> tuple[str, bool | None]:
    """(commit, dirty) of the repository; dirty ignores bench/results (the outputs). Outside a
    git checkout: ``EP_COMM_COMMIT`` or "unknown", and None."""
    global _GIT
    if _GIT is None:
        try:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                                    capture_output=True, text=True, timeout=20).stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--",
                 ".", ":(exclude)bench/results"],
                check=True, capture_output=True, text=True, timeout=20).stdout
            _GIT = (commit, bool(status.strip()))
        except (OSError, subprocess.SubprocessError):
            _GIT = (os.environ.get("EP_COMM_COMMIT", "unknown"), None)
    return _GIT


def result_path(out_dir, bench: str, backend: str, num_ranks: int, slug: str) -> Path:
    return Path(out_dir) / f"{bench}-{backend}-{num_ranks}r-{slug}.json"


def write_result(ctx: BenchContext, out_dir, bench: str, backend: str, config: dict,
                 figures: dict, *, status: str = "ok", error: str | None = None,
                 **extra) -> Path | None:
    """Write the JSON of one benchmark run (rank 0 only; returns its path there, else None).

    ``status`` is ``ok``, ``unavailable`` (the backend cannot run here; ``error`` says why) or
    ``failed``; ``extra`` keys (sweeps, per_rank, points) are stored beside ``figures``.
    """
    if ctx.rank != 0:
        return None
    commit, dirty = git_info()
    record = {
        "bench": bench, "backend": backend, "commit": commit, "dirty": dirty,
        "device": device_name(ctx), "num_ranks": ctx.num_ranks,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "status": status, "config": config, "figures": figures,
    }
    if error is not None:
        record["error"] = error
    record.update(extra)
    path = result_path(out_dir, bench, backend, ctx.num_ranks, device_slug(ctx))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(record), indent=2) + "\n")
    tmp.replace(path)
    return path


def _finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run_backends(ctx: BenchContext, bench: str, backends: list[str], out_dir, config: dict,
                 measure) -> int:
    """Run ``measure(backend) -> (figures, extra)`` for each backend and write its JSON.

    A backend that raises ``BackendUnavailableError`` is recorded as ``unavailable`` and
    skipped; any other error is printed with its traceback and recorded as ``failed``; the
    next backend still runs. All ranks agree on the outcome before moving on. Returns the exit
    code: 1 if any backend failed, else 0.
    """
    from ep_comm.errors import BackendUnavailableError
    exit_code = 0
    for backend in backends:
        ctx.log(f"\n=== {bench}: backend {backend}, {ctx.num_ranks} rank(s), {device_name(ctx)}")
        outcome, figures, extra = "ok", {}, {}
        try:
            figures, extra = measure(backend)
        except BackendUnavailableError as e:
            outcome, message = "unavailable", str(e)
        except Exception as e:  # noqa: BLE001 - recorded, printed with traceback, run goes on
            outcome, message = "failed", f"{type(e).__name__}: {e}"
            print(f"[rank {ctx.rank}] {bench}/{backend} failed:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
        else:
            message = None
        every = gather(ctx, (outcome, message))
        worst = next((o for o in ("failed", "unavailable") if any(e[0] == o for e in every)), "ok")
        if worst != "ok":
            reasons = sorted({m for o, m in every if o == worst and m})
            message = " | ".join(reasons) or "failed on another rank"
            ctx.log(f"{bench}/{backend}: {worst.upper()}: {message}")
            write_result(ctx, out_dir, bench, backend, config, {}, status=worst, error=message)
            if worst == "failed":
                exit_code = 1
            continue
        path = write_result(ctx, out_dir, bench, backend, config, figures, **extra)
        ctx.log(f"wrote {path}")
    return exit_code


# ------------------------------------------------------------------------------ tables
# The plain-text tables live in tables.py; the benches print through these names.
from tables import figures_table, fmt, format_table, print_table  # noqa: E402,F401


def measure_nccl_with_sweep(ctx, args, bench: str, measure_point, sweep_warmup: int):
    """The plain-NCCL baseline of a bench: ``measure_point(ctx, args, tokens, timer, salt)`` at
    ``args.tokens`` (printed as a table), then at every ``--sweep-tokens`` size.

    Returns ``(figures, extra, sweep_rows)``: the reduced figures of the main point, the JSON
    extras (per-rank figures, process-group backend, ``sweep_tokens`` rows when swept) and the
    sweep rows (``{"num_tokens": t, **figures}``; empty without a sweep) for the bench's table.
    """
    timer = Timer(ctx, args.warmup, args.iters, args.pad_us)
    figures, per_rank = reduce_figures(ctx, measure_point(ctx, args, args.tokens, timer, 0))
    figures_table(ctx, figures, per_rank,
                  f"{bench} / nccl all_to_all_single alone / {ctx.num_ranks} rank(s), "
                  f"{args.tokens} tokens per rank (times in us, GB/s)")
    extra = {"per_rank": per_rank, "process_group": dist.get_backend(ctx.group)}
    rows = []
    sweep = parse_ints(args.sweep_tokens)
    if sweep:
        sweep_timer = Timer(ctx, min(args.warmup, sweep_warmup), args.sweep_iters, args.pad_us)
        for i, tokens in enumerate(sweep):
            f, _ = reduce_figures(ctx, measure_point(ctx, args, tokens, sweep_timer, 100 + i))
            rows.append({"num_tokens": tokens, **f})
        extra["sweep_tokens"] = rows
    return figures, extra, rows
