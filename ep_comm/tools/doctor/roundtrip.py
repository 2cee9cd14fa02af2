"""The end-to-end check: a dispatch + combine round trip (normal and low-latency mode) on every
backend this machine can run, each verified against an independent computation; and the rank
processes that run it: spawned on this host and merged into one line per (backend, mode), or,
under torchrun / mpirun, run on the job's own group across its nodes."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from ep_comm.tools.doctor.probes import first_line, kill_group
from ep_comm.tools.doctor.report import FAIL, NA, PASS, WARN, Check

EXIT_GRACE_S = 10.0  # after the last check, how long rank processes may take to exit
# Round-trip sizes: small enough to be instant on CPU, big enough to cross every code path
# (tokens routed to no rank, to one rank, to several; -1 entries; fp8 needs hidden % 128 == 0).
RT_TOKENS, RT_HIDDEN, RT_TOPK, RT_EXPERTS_PER_RANK = 48, 256, 4, 4


class Mismatch(AssertionError):
    """A round trip produced a result that the independent check does not accept."""


def _rank_inputs(src: int, num_experts: int):
    """Rank ``src``'s tokens, routing and weights; every rank can rebuild every rank's.

    Row t of rank s holds s and t in its first two channels and small integers elsewhere, so
    bf16 holds it exactly and a received row names its origin. Token 0 goes to no expert.
    """
    import torch
    g = torch.Generator().manual_seed(7919 + src)
    t, h = RT_TOKENS, RT_HIDDEN
    idx = torch.rand(t, num_experts, generator=g).topk(RT_TOPK, dim=1).indices
    idx[torch.rand(t, RT_TOPK, generator=g) < 0.2] = -1
    idx[0] = -1
    weights = torch.rand(t, RT_TOPK, generator=g) + 0.5
    rows = torch.arange(t)[:, None]
    x = ((torch.arange(h)[None, :] + 7 * rows + 31 * src) % 61 - 30).float()
    x[:, 0], x[:, 1] = float(src), rows[:, 0].float()
    return x.to(torch.bfloat16), idx.to(torch.int64), weights.float()


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _roundtrip_normal(group, backend: str, device, ranks_per_node) -> dict:
    import torch
    import torch.distributed as dist
    import ep_comm
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    e = RT_EXPERTS_PER_RANK * world
    inputs = [_rank_inputs(s, e) for s in range(world)]
    x, idx, w = (v.to(device) for v in inputs[rank])
    cfg = ep_comm.Buffer.get_dispatch_config(world)
    buf = ep_comm.Buffer(group, num_nvl_bytes=cfg.get_nvl_buffer_size_hint(RT_HIDDEN * 2, world),
                         num_rdma_bytes=cfg.get_rdma_buffer_size_hint(RT_HIDDEN * 2, world),
                         backend=backend, ranks_per_node=ranks_per_node)
    try:
        times = []
        for _ in range(2):
            _sync(device)
            t0 = time.perf_counter()
            per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
                x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
                topk_weights=w)
            combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
            _sync(device)
            times.append(time.perf_counter() - t0)
        _verify_normal(rank, world, e, inputs, recv_x, recv_idx, recv_w, counts, combined,
                       combined_w)
    except BaseException:
        _destroy_after_error(buf)
        raise
    buf.destroy()
    return {"first_ms": times[0] * 1e3, "ms": times[1] * 1e3}


def _destroy_after_error(buf) -> None:
    """Free a Buffer while an error propagates; a second error is printed, not raised, so
    that the report names the first one."""
    try:
        buf.destroy()
    except Exception as e:  # noqa: BLE001 - the error being raised is the one to report
        print(f"ep_comm doctor: Buffer.destroy() after a failed check also failed: {e}",
              file=sys.stderr)


def _verify_normal(rank, world, num_experts, inputs, recv_x, recv_idx, recv_w, counts,
                   combined, combined_w) -> None:
    import torch
    per = num_experts // world
    lo = rank * per
    rows, topk, weights, want_counts = [], [], [], [0] * per
    for s, (x, idx, w) in enumerate(inputs):
        for t in range(idx.shape[0]):
            experts = idx[t].tolist()
            if not any(lo <= v < lo + per for v in experts):
                continue
            rows.append(x[t])
            topk.append([v - lo if lo <= v < lo + per else -1 for v in experts])
            weights.append(w[t])
            for v in set(experts):
                if lo <= v < lo + per:
                    want_counts[v - lo] += 1
    if recv_x.shape[0] != len(rows):
        raise Mismatch(f"dispatch: rank {rank} received {recv_x.shape[0]} tokens, expected "
                       f"{len(rows)}")
    if rows and not torch.equal(recv_x.cpu(), torch.stack(rows)):
        raise Mismatch(f"dispatch: rank {rank} received wrong rows (or in the wrong order)")
    if rows and recv_idx.cpu().tolist() != topk:
        raise Mismatch(f"dispatch: rank {rank} recv_topk_idx differs from the expected local ids")
    if rows and not torch.equal(recv_w.cpu(), torch.stack(weights)):
        raise Mismatch(f"dispatch: rank {rank} recv_topk_weights differ from the weights sent")
    if list(counts) != want_counts:
        raise Mismatch(f"dispatch: rank {rank} num_recv_tokens_per_expert_list {list(counts)}, "
                       f"expected {want_counts}")
    x, idx, w = inputs[rank]
    owners = [len({v // per for v in idx[t].tolist() if v >= 0}) for t in range(idx.shape[0])]
    n = torch.tensor(owners, dtype=torch.float32)[:, None]
    if not torch.equal(combined.cpu().float(), x.float() * n):
        bad = (combined.cpu().float() != x.float() * n).any(dim=1).nonzero().flatten().tolist()
        raise Mismatch(f"combine: rank {rank} tokens {bad[:8]} are not the sum of the rows "
                       "sent back")
    if not torch.allclose(combined_w.cpu(), w * n, rtol=1e-6, atol=0):
        raise Mismatch(f"combine: rank {rank} combined_topk_weights are not the sum")


def _roundtrip_low_latency(group, backend: str, device, ranks_per_node) -> dict:
    import torch
    import torch.distributed as dist
    import ep_comm
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    e = RT_EXPERTS_PER_RANK * world
    m = RT_TOKENS
    inputs = [_rank_inputs(s, e) for s in range(world)]
    x, idx, w = (v.to(device) for v in inputs[rank])
    cfg = ep_comm.Buffer.get_dispatch_config(world)
    rdma = ep_comm.Buffer.get_low_latency_rdma_size_hint(m, RT_HIDDEN, world, e)
    buf = ep_comm.Buffer(group, num_nvl_bytes=cfg.get_nvl_buffer_size_hint(RT_HIDDEN * 2, world),
                         num_rdma_bytes=rdma, low_latency_mode=True, backend=backend,
                         ranks_per_node=ranks_per_node)
    try:
        times = []
        for _ in range(2):
            _sync(device)
            t0 = time.perf_counter()
            recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(
                x, idx, m, e, use_fp8=False)
            combined, _, _ = buf.low_latency_combine(recv_x, idx, w, handle)
            _sync(device)
            times.append(time.perf_counter() - t0)
        _verify_ll_dispatch(rank, world, e, inputs, recv_x, recv_count, fp8_scales=None)
        _verify_ll_combine(rank, inputs, combined)
        (q, scales), recv_count, handle, _, _ = buf.low_latency_dispatch(x, idx, m, e,
                                                                         use_fp8=True)
        _sync(device)
        _verify_ll_dispatch(rank, world, e, inputs, q, recv_count, fp8_scales=scales)
    except BaseException:
        _destroy_after_error(buf)
        raise
    buf.destroy()
    return {"first_ms": times[0] * 1e3, "ms": times[1] * 1e3}


def _verify_ll_dispatch(rank, world, num_experts, inputs, recv_x, recv_count, fp8_scales):
    import torch
    per = num_experts // world
    what = "low_latency_dispatch" + (" (fp8)" if fp8_scales is not None else "")
    counts = recv_count.cpu().tolist()
    for local in range(per):
        g = rank * per + local
        want = [(s, t) for s, (_, idx, _) in enumerate(inputs) for t in range(idx.shape[0])
                if g in idx[t].tolist()]
        if counts[local] != len(want):
            raise Mismatch(f"{what}: rank {rank} recv_count[{local}] = {counts[local]}, "
                           f"expected {len(want)}")
        rows = recv_x[local, :len(want)].cpu().float()
        if fp8_scales is not None:
            scales = fp8_scales[local, :len(want)].cpu().float()
            rows = rows * scales.repeat_interleave(128, dim=1)
        got = []
        cands = torch.stack([inputs[s][0][t].float() for s, t in want]) if want else None
        for i in range(len(want)):
            if fp8_scales is None:  # bf16 carries the origin exactly in channels 0 and 1
                s, t = int(rows[i, 0].item()), int(rows[i, 1].item())
            else:  # fp8 rounds those channels: take the expected token nearest to the row
                s, t = want[int((rows[i] - cands).abs().amax(dim=1).argmin())]
            if not (0 <= s < world and 0 <= t < RT_TOKENS):
                raise Mismatch(f"{what}: rank {rank} expert {local} row {i} holds no valid token")
            ref = inputs[s][0][t].float()
            tol = ref.abs() * 0.07 + ref.abs().max() * 1e-3 if fp8_scales is not None else 0
            if not bool(((rows[i] - ref).abs() <= tol).all()):
                raise Mismatch(f"{what}: rank {rank} expert {local} row {i} (token {t} of rank "
                               f"{s}) does not hold that token's data")
            got.append((s, t))
        if sorted(got) != want:
            raise Mismatch(f"{what}: rank {rank} expert {local} received tokens {sorted(got)[:6]}"
                           f"..., expected {want[:6]}...")
        for s in range(world):  # each source's tokens contiguous, in token order
            pos = [i for i, (src, _) in enumerate(got) if src == s]
            if pos and (pos != list(range(pos[0], pos[0] + len(pos)))
                        or [got[i][1] for i in pos] != sorted(got[i][1] for i in pos)):
                raise Mismatch(f"{what}: rank {rank} expert {local}: tokens from rank {s} are "
                               "not contiguous and in source order")


def _verify_ll_combine(rank, inputs, combined) -> None:
    x, idx, w = inputs[rank]
    want = x.float() * (w * (idx >= 0)).sum(dim=1, keepdim=True)
    got = combined.cpu().float()
    bad = ((got - want).abs() > want.abs() * 1e-2 + 1e-2).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise Mismatch(f"low_latency_combine: rank {rank} tokens {bad[:8]} are not the weighted "
                       "sum of the expert rows")


ROUNDTRIPS: dict[str, Callable] = {"normal": _roundtrip_normal,
                                   "low_latency": _roundtrip_low_latency}


def run_roundtrips(group, device, backends: list[str], emit: Callable[[dict], None],
                   ranks_per_node: int | None = None) -> list[dict]:
    """Every (backend, mode) round trip on this rank; ``emit`` each event as it happens."""
    import torch.distributed as dist
    from ep_comm.errors import BackendUnavailableError
    rank = dist.get_rank(group)
    results = []
    for backend in backends:
        for mode, fn in ROUNDTRIPS.items():
            emit({"event": "start", "rank": rank, "backend": backend, "mode": mode})
            res = {"event": "result", "rank": rank, "backend": backend, "mode": mode}
            try:
                res.update(fn(group, backend, device, ranks_per_node), status=PASS,
                           detail="matches the independent check")
            except BackendUnavailableError as e:
                res.update(status=FAIL, detail=f"backend unavailable: {e.reason}")
            except ImportError as e:
                res.update(status=FAIL, detail=f"cannot import a module it needs: {e}")
            except Mismatch as e:
                res.update(status=FAIL, detail=f"wrong result: {e}")
            except Exception as e:  # noqa: BLE001 - any failure is a report line, with its type
                tb = traceback.extract_tb(e.__traceback__)
                where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
                res.update(status=FAIL, detail=f"{type(e).__name__}: {first_line(str(e), 400)}"
                           f"{where}")
            emit(res)
            results.append(res)
    return results


def worker_main(args) -> int:
    """One rank of the round trip that ``spawn_roundtrips`` started."""
    from ep_comm.runtime.launcher import init_distributed
    import torch
    use_gpu = args.worker_gpu
    group = init_distributed(use_gpu=use_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    with open(args.worker, "a") as f:
        def emit(ev):
            f.write(json.dumps(ev) + "\n")
            f.flush()
        emit({"event": "ready", "rank": int(os.environ["RANK"]), "device": str(device)})
        run_roundtrips(group, device, args.backends.split(","), emit, args.ranks_per_node)
        emit({"event": "done", "rank": int(os.environ["RANK"])})
    import torch.distributed as dist
    dist.destroy_process_group()
    return 0


#: Start-ups tried when rank 0's store finds its port taken (EADDRINUSE).
PORT_TRIES = 3


def spawn_roundtrips(world: int, use_gpu: bool, backends: list[str], timeout: float,
                     ranks_per_node: int | None) -> tuple[list[dict], str]:
    """Start ``world`` rank processes on this host, wait at most ``timeout`` s, and return
    (per-rank events, the tail of their output).

    The port is free when chosen but is released before rank 0's store binds it; another
    process may take it in between (the GPU suite runs the doctor beside test shards that open
    ports all the time: session 17's run failed every roundtrip with EADDRINUSE). A start-up
    that failed that way is stopped at once and tried again on a new port."""
    deadline = time.monotonic() + timeout
    for _ in range(PORT_TRIES):
        events, tails, port_taken = _spawn_once(world, use_gpu, backends,
                                                deadline - time.monotonic(), ranks_per_node,
                                                _free_port())
        if not port_taken:
            break
    return events, tails


def _spawn_once(world: int, use_gpu: bool, backends: list[str], timeout: float,
                ranks_per_node: int | None, port: int) -> tuple[list[dict], str, bool]:
    """One start of ``spawn_roundtrips``'s rank processes on ``port``: (events, tails, whether
    rank 0 found the port taken; then every rank was stopped at once, since the others would
    wait for a store that never answers until the time limit)."""
    tmp = tempfile.mkdtemp(prefix="ep_comm_doctor_")
    import ep_comm
    # The ranks must import this ep_comm even when it is not installed (run from a checkout).
    pkg_parent = str(Path(ep_comm.__file__).resolve().parent.parent)
    procs, logs = [], []
    for r in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   PYTHONPATH=pkg_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("EP_COMM_TIMEOUT_S", "10")
        if not use_gpu:
            env["OMP_NUM_THREADS"] = "1"
        # Through the package's __main__ (cli.main hands --worker to worker_main): running
        # this module itself with -m would load it twice, as __main__ and by its own name.
        argv = [sys.executable, "-m", "ep_comm.tools.doctor",
                "--worker", os.path.join(tmp, f"{r}.jsonl"), "--backends", ",".join(backends)]
        if use_gpu:
            argv.append("--worker-gpu")
        if ranks_per_node:
            argv += ["--ranks-per-node", str(ranks_per_node)]
        log = open(os.path.join(tmp, f"{r}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout
    timed_out = exit_hang = False
    done_at = None
    port_taken = False
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if now > deadline:
            timed_out = True
            break
        if procs[0].poll() not in (None, 0) and done_at is None and _port_taken(logs[0]):
            port_taken = True
            break
        if done_at is None and _all_done(tmp, world):
            done_at = now
        if done_at is not None and now - done_at > EXIT_GRACE_S:
            exit_hang = True  # every check finished; tear-down (NCCL, NVSHMEM) hangs
            break
        time.sleep(0.05)
    for p in procs:
        kill_group(p)
    events, tails = [], []
    for r, (p, log) in enumerate(zip(procs, logs)):
        path = os.path.join(tmp, f"{r}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                events += [json.loads(ln) for ln in f if ln.strip()]
        log.seek(0)
        text = log.read()
        log.close()
        if timed_out or (p.returncode not in (0, None) and not exit_hang):
            tails.append(f"--- rank {r} (exit {p.returncode}):\n" + "\n".join(
                text.strip().splitlines()[-15:]))
    shutil.rmtree(tmp, ignore_errors=True)
    if timed_out:
        events.append({"event": "timeout", "seconds": timeout})
    if exit_hang:
        events.append({"event": "exit_hang", "seconds": EXIT_GRACE_S})
    return events, "\n".join(tails), port_taken


def _port_taken(log) -> bool:
    """Whether rank 0's output (its open log file) says its store could not bind the port."""
    log.flush()
    with open(log.name) as f:
        text = f.read()
    return "EADDRINUSE" in text or "address already in use" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_done(tmp: str, world: int) -> bool:
    for r in range(world):
        try:
            with open(os.path.join(tmp, f"{r}.jsonl")) as f:
                if '"event": "done"' not in f.read():
                    return False
        except FileNotFoundError:
            return False
    return True


def merge_events(events: list[dict], world: int, backends: list[str], tail: str) -> list[dict]:
    """One row per (backend, mode): pass only if every rank passed."""
    timed_out = any(ev["event"] == "timeout" for ev in events)
    ready = {ev["rank"] for ev in events if ev["event"] == "ready"}
    rows = []
    for backend in backends:
        for mode in ROUNDTRIPS:
            key = (backend, mode)
            res = {ev["rank"]: ev for ev in events
                   if ev["event"] == "result" and (ev["backend"], ev["mode"]) == key}
            started = {ev["rank"] for ev in events
                       if ev["event"] == "start" and (ev["backend"], ev["mode"]) == key}
            row = {"backend": backend, "mode": mode, "world": world, "per_rank": res}
            failed = {r: v for r, v in res.items() if v["status"] != PASS}
            if len(res) == world and not failed:
                row.update(status=PASS, ms=max(v["ms"] for v in res.values()),
                           first_ms=max(v["first_ms"] for v in res.values()))
            elif failed:
                details = dict.fromkeys(v["detail"] for v in failed.values())
                row.update(status=FAIL, detail=f"ranks {sorted(failed)}: " + " / ".join(details))
            elif started:
                missing = sorted(set(range(world)) - set(res))
                row.update(status=FAIL, detail=(
                    f"ranks {missing} started but never finished ("
                    + ("the doctor's time limit expired: a hang" if timed_out else "crashed")
                    + ")" + (f"\n{tail}" if tail else "")))
            else:
                why = ("no rank started (start-up failed)" if len(ready) < world else
                       "not run: an earlier check hung")
                row.update(status=FAIL, detail=why + (f"\n{tail}" if tail and not rows else ""))
            rows.append(row)
    return rows


def check_roundtrip(facts: dict, args, have_gpu: bool, num_gpus: int) -> list[Check]:
    if have_gpu:
        world = args.world or num_gpus
        backends = ["reference", "kernels"]
        where = f"{world} GPU process(es), NCCL"
    else:
        world = args.world or 2
        backends = ["reference"]
        where = f"{world} CPU processes, gloo"
    t0 = time.perf_counter()
    events, tail = spawn_roundtrips(world, have_gpu, backends, args.timeout, args.ranks_per_node)
    rows = merge_events(events, world, backends, tail)
    facts["roundtrip"] = {"world": world, "where": where, "seconds": time.perf_counter() - t0,
                          "results": rows}
    out = [_roundtrip_line(row, where) for row in rows]
    if any(ev["event"] == "exit_hang" for ev in events):
        out.append(Check("roundtrip", "process exit", WARN,
                         f"every check finished but the ranks did not exit within "
                         f"{EXIT_GRACE_S:g} s (NCCL or NVSHMEM tear-down hangs); killed them"))
    if not have_gpu:
        for mode in ROUNDTRIPS:
            facts["roundtrip"]["results"].append(
                {"backend": "kernels", "mode": mode, "status": NA, "detail": "no GPU"})
            out.append(Check("roundtrip", f"kernels {mode}", NA,
                             "skipped: no GPU (the kernels backend needs CUDA GPUs)"))
    return out


def _roundtrip_line(row: dict, where: str) -> Check:
    name = f"{row['backend']} {row['mode']}"
    if row["status"] == PASS:
        return Check("roundtrip", name, PASS,
                     f"{row['ms']:.2f} ms (first call {row['first_ms']:.1f} ms), {where}, "
                     "matches the independent check")
    return Check("roundtrip", name, row["status"], f"{where}: {row['detail']}")


def local_rank() -> int:
    """This process's rank on its node, from whichever launcher started it (0 if none)."""
    for var in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def roundtrip_in_group(args, local_checks: list[Check]) -> tuple[list[Check], dict, bool]:
    """Under torchrun / mpirun: the round trip on the job's own group, across its nodes.

    Only local rank 0 of each node checked its machine (``local_checks``); rank 0 reports
    the failures and warnings that the other nodes found, marked with their host."""
    import torch
    import torch.distributed as dist
    from ep_comm.runtime.launcher import init_distributed
    group = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    nodes = len(dict.fromkeys(hosts))
    mine = [dataclasses.asdict(c) for c in local_checks if c.status in (FAIL, WARN)]
    found = [None] * world
    dist.all_gather_object(found, (local_rank() == 0 and rank != 0, mine))
    checks = [Check(c["section"], f"{c['name']} @ {hosts[r]} (rank {r})", c["status"],
                    c["detail"]) for r, (report, cs) in enumerate(found) if report for c in cs]
    if args.nodes is not None:
        ok = nodes == args.nodes
        checks.append(Check("roundtrip", "nodes", PASS if ok else FAIL,
                            f"{world} ranks on {nodes} host(s) {sorted(set(hosts))}; expected "
                            f"{args.nodes}"))
    backends = ["reference", "kernels"] if device.type == "cuda" else ["reference"]
    results = run_roundtrips(group, device, backends, lambda ev: None, args.ranks_per_node)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    events = [dict(ev) for per in gathered for ev in per]
    rows = merge_events(events, world, backends, "")
    where = f"{world} ranks on {nodes} node(s), {dist.get_backend()}"
    checks += [_roundtrip_line(row, where) for row in rows]
    dist.destroy_process_group()
    return checks, {"world": world, "nodes": nodes, "hosts": hosts, "results": rows}, rank == 0
