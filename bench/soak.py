"""Soak: thousands of dispatch/combine calls with random shapes, a fault every 500 calls.

Each rank runs rounds (a dispatch and a combine = 2 calls; normal and low-latency mode in turn)
with random token counts, hidden sizes and top-k, each checked exactly against the independent
oracle of tests/oracle.py (bf16 rows bit-exact; combine within one bf16 rounding of the float64
sum). Every ``--fault-every`` calls one fault is injected (cycling through disagreements on
hidden / num_experts / top-k / dtype, a reordered call, a skipped call, expert ids out of range,
a NaN with the finite check on, and a stalled rank) and the run recovers (same Buffer for the
faults that leave it usable; a new process group and Buffer after a stall). A fault is
*survived* when every rank raised the named error and the next round was exact.

Counts at start and end: open file descriptors, threads, and on CUDA the allocated GPU memory.
Writes ``bench/results/soak-<backend>-<ranks>r-<device>.json``.

    python bench/soak.py --ranks 4 --calls 10000          # CPU, gloo, reference backend
    python bench/soak.py --ranks 2 --calls 2000 --gpu     # 2 ranks sharing one GPU (kernels)
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

FAULTS = ["hidden", "num_experts", "topk", "dtype", "reorder", "skip", "bad_ids", "ll_hidden",
          "nan", "stall", "ll_fp8", "bad_ids_ll"]
BAD_VALUES = ["E", "E+1", "E+5", "-2", "1000"]
EXPECT = {  # fault -> errors every rank may raise (all ranks must raise one of them)
    "bad_ids": ("InputError", "PeerInputError"), "bad_ids_ll": ("InputError", "PeerInputError"),
    "nan": ("InputError", "PeerInputError"), "stall": ("CommTimeoutError", "PeerLostError"),
}


def resources(device) -> dict:
    import torch
    out = {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
           "os_threads": len(os.listdir("/proc/self/task"))}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["gpu_bytes"] = torch.cuda.memory_allocated()
    return out


#: Seconds past --max-minutes after which a rank counts as hung (a stall fault's recovery and
#: the final checks take well under this).
HANG_GRACE_S = 30


def worker(rank, world, port, args, results):
    import faulthandler
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      EP_COMM_TIMEOUT_S=str(args.timeout))
    # A rank still running well past --max-minutes prints where it is (then main gives up on it)
    if args.max_minutes < 1e8:
        faulthandler.dump_traceback_later(args.max_minutes * 60 + HANG_GRACE_S, exit=False)
    try:
        results.put((rank, run_rank(rank, world, args)))
    except BaseException:  # noqa: BLE001 - reported with the rank number
        results.put((rank, {"crash": traceback.format_exc()}))


def run_rank(rank, world, args) -> dict:
    import torch
    import torch.distributed as dist
    import cases
    import fault_cases as fc
    import low_latency_cases as llc
    from multiproc import RankContext
    from ep_comm.runtime.comm import release_failed_group

    torch.set_num_threads(1)
    if args.gpu:
        torch.cuda.set_device(0)
        os.environ["EP_COMM_GLOO_DEVICE"] = "cuda"
        # Every call agrees on the host (one extra exchange), so that a skipped call meets the
        # others' next call there; by default only a dispatch from a layout agrees (in the
        # NVLink notify kernel), docs/faults.md.
        os.environ["EP_COMM_CHECK_AGREEMENT"] = "1"
        dev = torch.device("cuda", 0)
    else:
        dev = torch.device("cpu")
    backend = "kernels" if args.gpu else "reference"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group_timeout = datetime.timedelta(seconds=2 * args.timeout + 2)
    group = dist.new_group(list(range(world)), timeout=group_timeout)
    ctx = RankContext(rank, world, group, dev)
    e = 4 * world
    ll_tokens = 16
    stats = {"rounds": 0, "calls": 0, "faults_injected": 0, "faults_survived": 0,
             "bad_inputs_tried": 0, "silent_wrong_results": 0, "unexpected_errors": [],
             "fault_log": []}

    def new_buffer():
        case = cases.Case(num_experts=e, backend=backend)
        return cases.make_buffer(ctx, case, low_latency_max_tokens=ll_tokens, hidden=256)

    buf = new_buffer()
    start = None
    rng = random.Random(1234)  # the same on every rank: shapes must agree
    calls_since_fault, fault_i, t0 = 0, 0, time.monotonic()
    while stats["calls"] < args.calls and time.monotonic() - t0 < args.max_minutes * 60:
        seed = rng.randrange(1 << 30)
        hidden, topk = rng.choice([128, 256]), rng.randint(1, 4)
        try:
            if stats["rounds"] % 2 == 0:
                case = cases.Case(seed=seed, num_tokens=rng.randint(0, 24), ragged=rng.randint(0, 4),
                                  hidden=hidden, num_experts=e, num_topk=topk, backend=backend)
                fc.normal_round(ctx, buf, case)
            else:
                case = llc.LLCase(seed=seed, max_tokens=ll_tokens, num_tokens=rng.randint(0, 16),
                                  hidden=256, num_experts=e, num_topk=topk, backend=backend)
                llc.one_round(ctx, buf, case, 0)
        except AssertionError as err:  # a result differed without an error: silent and wrong
            stats["silent_wrong_results"] += 1
            stats["unexpected_errors"].append(f"round {stats['rounds']}: {err}"[:300])
        stats["rounds"] += 1
        stats["calls"] += 2
        calls_since_fault += 2
        if start is None and stats["rounds"] == 2:  # lazily created state (both modes) exists
            start = resources(dev)
        if calls_since_fault < args.fault_every:
            continue
        calls_since_fault = 0
        kinds = args.faults.split(",")
        kind = kinds[fault_i % len(kinds)]
        fault_i += 1
        stats["faults_injected"] += 1
        odd = fault_i % world
        ok, detail = True, ""
        if kind == "stall":
            res = stall_fault(ctx, buf, odd, args.timeout, e)
            errs = res["error"]
            ok = errs in EXPECT["stall"] and res["elapsed"] < args.timeout + 2 + (
                args.timeout + 1.5 if rank == odd else 0)
            ok = ok and res["later"] == "BufferFailedError"
            # Recovery: a new group and Buffer over every rank (the staller is alive again).
            # The old group's pending work ends at its gloo timeout; then it can be freed.
            buf.destroy()
            del buf
            store_barrier(f"soak/recover/{fault_i}", world)  # the staller ends later
            time.sleep(group_timeout.total_seconds() + 0.5)
            release_failed_group(group)
            dist.destroy_process_group(group)
            import gc
            gc.collect()
            # Every rank of the job takes part, so the group gets a fresh name (a group made with
            # use_local_synchronization over the same ranks would reuse the old one's keys).
            group = dist.new_group(list(range(world)), timeout=group_timeout)
            ctx = RankContext(rank, world, group, dev)
            buf = new_buffer()
            detail = errs
        else:
            if kind.startswith("bad_ids"):
                stats["bad_inputs_tried"] += 1
                where = "ll" if kind.endswith("ll") else rng.choice(["dispatch", "layout"])
                res = fc.task_bad_ids(ctx, where, BAD_VALUES[fault_i % len(BAD_VALUES)], odd,
                                      backend)
                want = ("InputError",) if rank == odd else (
                    (None,) if where == "layout" else ("PeerInputError",))
            elif kind == "nan":
                stats["bad_inputs_tried"] += 1
                res = fc.task_nan_check(ctx, odd, backend)
                want = ("InputError",) if rank == odd else ("PeerInputError",)
            else:
                res = fc.task_disagree(ctx, kind, odd, backend)
                want = ("CollectiveMismatchError",)
            ok = res["error"] in want and res.get("after", "exact") == "exact"
            detail = res["error"]
        if ok:
            stats["faults_survived"] += 1
        else:
            stats["unexpected_errors"].append(f"fault {kind}: {res}"[:400])
            if res.get("error") is None and kind != "bad_ids":
                stats["silent_wrong_results"] += 1
        stats["fault_log"].append([stats["calls"], kind, detail])
        if rank == 0:  # progress: a run cut by an outer limit still shows how far it got
            print(f"soak: {stats['calls']} calls, fault {kind}: {detail or 'ok'} "
                  f"({'survived' if ok else 'NOT survived'}), {time.monotonic() - t0:.0f} s",
                  flush=True)
    buf.destroy()
    import gc
    gc.collect()
    stats["resources_start"], stats["resources_end"] = start, resources(dev)
    stats["seconds"] = time.monotonic() - t0
    dist.destroy_process_group(group)
    return stats


#: Seconds a rank waits at a recovery barrier for the others (a stall's recovery takes a few).
BARRIER_TIMEOUT_S = 60.0


def store_barrier(key: str, world: int, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """All ranks meet here, through the rendezvous store (the process group may be broken).
    Raises RuntimeError after ``timeout_s`` if some rank did not come (it crashed or hangs):
    the soak then ends with that rank's report instead of waiting for it forever."""
    import torch.distributed as dist
    store = dist.distributed_c10d._get_default_store()
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while (arrived := store.add(key, 0)) < world:
        if time.monotonic() > deadline:
            raise RuntimeError(f"soak barrier {key!r}: {arrived} of {world} ranks arrived in "
                               f"{timeout_s:g} s")
        time.sleep(0.01)


def stall_fault(ctx, buf, staller: int, timeout: float, e: int) -> dict:
    """``staller`` sleeps past the timeout before a dispatch; every rank must end with a named
    error and then find the Buffer failed."""
    import cases
    import fault_cases as fc
    case = cases.Case(seed=99, num_experts=e)
    x, idx, w = (t.to(ctx.device) for t in cases.all_inputs(case, ctx.world_size)[ctx.rank])
    if ctx.rank == staller:
        time.sleep(timeout + 1.5)
    res = fc._outcome(lambda: fc._layout_and_dispatch(buf, x, idx, w, e))
    res["later"] = fc._later_call(buf, x, idx, w, e)["error"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--calls", type=int, default=10000)
    p.add_argument("--fault-every", type=int, default=500)
    p.add_argument("--timeout", type=float, default=2.0, help="EP_COMM_TIMEOUT_S of the run")
    p.add_argument("--max-minutes", type=float, default=1e9, help="stop early after this long")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated fault kinds")
    p.add_argument("--gpu", action="store_true", help="kernels backend, ranks sharing GPU 0")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, port, args, results))
             for r in range(args.ranks)]
    for pr in procs:
        pr.start()
    import queue
    wait_s = args.max_minutes * 60 + HANG_GRACE_S + 15 if args.max_minutes < 1e8 else None
    per_rank = {}
    try:
        for _ in procs:
            r, value = results.get(timeout=wait_s)
            per_rank[r] = value
            if "crash" in value:  # now, not after the others (which may wait for this rank)
                print(f"--- rank {r} crashed:\n{value['crash']}", flush=True)
    except queue.Empty:
        missing = sorted(set(range(args.ranks)) - set(per_rank))
        print(f"soak: ranks {missing} gave no result {wait_s:.0f} s after the start (a hang; "
              "their stacks are above)")
        for pr in procs:
            pr.kill()
        return 1
    for pr in procs:
        pr.join(timeout=60)
    if any("crash" in v for v in per_rank.values()):
        return 1  # each crash was printed as it came
    ranks = [per_rank[r] for r in range(args.ranks)]
    leaks = []
    for r, st in enumerate(ranks):
        a, b = st["resources_start"], st["resources_end"]
        for key in a:
            if b[key] > a[key]:
                leaks.append(f"rank {r}: {key} {a[key]} -> {b[key]}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip())
    device = "cpu"
    if args.gpu:
        import torch
        from common import gpu_slug  # bench/common.py (this script's folder is on sys.path)
        device = gpu_slug(torch.cuda.get_device_name(0))
    backend = "kernels" if args.gpu else "reference"
    figures = {
        "calls": ranks[0]["calls"], "rounds": ranks[0]["rounds"],
        "faults_injected": ranks[0]["faults_injected"],
        "faults_survived": min(st["faults_survived"] for st in ranks),
        "bad_inputs_tried": ranks[0]["bad_inputs_tried"],
        "silent_wrong_results": sum(st["silent_wrong_results"] for st in ranks),
        "leaks": len(leaks), "seconds": max(st["seconds"] for st in ranks),
    }
    record = {
        "bench": "soak", "backend": backend, "commit": commit, "dirty": dirty,
        "device": device if not args.gpu else f"{device} x 1 ({args.ranks} ranks sharing)",
        "num_ranks": args.ranks,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {"calls_asked": args.calls, "fault_every": args.fault_every,
                   "timeout_s": args.timeout, "max_minutes": args.max_minutes,
                   "faults": args.faults.split(",")},
        "figures": figures, "leaks": leaks,
        "unexpected": [u for st in ranks for u in st["unexpected_errors"]][:50],
        "fault_log": ranks[0]["fault_log"],
        "resources": {r: [st["resources_start"], st["resources_end"]]
                      for r, st in enumerate(ranks)},
    }
    out = Path(args.out) / f"soak-{backend}-{args.ranks}r-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(figures))
    print(f"wrote {out}")
    return 0 if figures["silent_wrong_results"] == 0 and not leaks and \
        figures["faults_survived"] == figures["faults_injected"] else 1


if __name__ == "__main__":
    sys.exit(main())
