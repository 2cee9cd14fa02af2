"""``python -m ep_comm.tools.doctor``: can this machine run ep_comm, and if not, why not.

Prints one table: software versions, the CUDA compiler and kernel cache, each GPU, the
NVLink / P2P matrix, NVSHMEM and each of its transports, NICs, MPI; then a dispatch + combine
round trip (normal and low-latency mode) on every backend this machine can run, checked
against an independent computation. Every probe runs with a time limit, so the doctor itself
never hangs, and a missing piece is a failed (or not applicable) line with its reason, never
a crash.

    python -m ep_comm.tools.doctor                 # or: ep-comm-doctor
    python -m ep_comm.tools.doctor --json out.json # also write everything as JSON
    torchrun --nnodes=2 --nproc-per-node=8 ... -m ep_comm.tools.doctor --nodes 2   # across nodes

Exit code 0 only when every check that applies here passed. Statuses: ``pass``; ``FAIL``
(counts); ``warn`` (works, but something is off or slow; does not count); ``n/a`` (does not
apply to this machine, e.g. kernels without a GPU); ``info``.

Which checks apply: nvcc and the kernel cache apply where there is a GPU (the kernels are
compiled on first use) or where ``EP_COMM_NVCC`` / ``EP_COMM_CACHE_DIR`` is set explicitly (a
setting that points nowhere is always an error). NVSHMEM P2P applies with a GPU; the remote
transports (IBGDA, IBRC, UCX, libfabric) are reported but only warn, as the kernels run within
one node. See ``docs/troubleshooting.md`` for what each failure means and how to fix it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ep_comm.tools.doctor.gpu import check_cuda, check_env, check_p2p
from ep_comm.tools.doctor.nvshmem import check_nics, check_nvshmem
from ep_comm.tools.doctor.report import FAIL, Check, print_table
from ep_comm.tools.doctor.roundtrip import (check_roundtrip, local_rank, roundtrip_in_group,
                                            worker_main)
from ep_comm.tools.doctor.software import check_mpi, check_software
from ep_comm.tools.doctor.toolchain import check_compile, check_toolchain


def collect(args) -> tuple[list[Check], dict]:
    """Every check of this machine (and the round trip, unless under torchrun)."""
    facts: dict[str, Any] = {"host": socket.gethostname(),
                             "time": datetime.datetime.now().isoformat(timespec="seconds")}
    checks = check_software(facts)
    import torch
    have_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    num_gpus = torch.cuda.device_count() if have_gpu else 0
    checks += check_cuda(facts)
    checks += check_p2p(facts)
    checks += check_env(facts, num_gpus)
    checks += check_toolchain(facts, have_gpu)
    if args.compile:
        checks += check_compile(facts)
    nic_checks, has_nic = check_nics(facts)
    checks += check_nvshmem(facts, have_gpu, num_gpus, has_nic, probe=not args.quick)
    checks += nic_checks
    checks += check_mpi(facts)
    return checks, facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ep_comm.tools.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write every check and fact as JSON")
    p.add_argument("--quick", action="store_true",
                   help="skip the NVSHMEM transport probes and the round trip")
    p.add_argument("--compile", action="store_true",
                   help="also compile every kernel file now (first time: a minute or more)")
    p.add_argument("--world", type=int, default=None,
                   help="processes for the round trip (default: every GPU, or 2 on CPU)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds for the whole round trip before it counts as a hang "
                        "(default 60 on CPU, 180 with GPUs: the first run compiles kernels)")
    p.add_argument("--nodes", type=int, default=None,
                   help="under torchrun/mpirun: the number of hosts the job must span")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="passed to Buffer: fewer than the ranks on a host runs the internode path")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-gpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backends", default="reference", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)

    from ep_comm.runtime.launcher import launched_by
    t0 = time.perf_counter()
    in_job = launched_by() != "single" and int(os.environ.get(
        "WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))) > 1
    if in_job and local_rank() != 0:  # one rank per node checks the machine
        checks, facts = [], {"host": socket.gethostname()}
    else:
        checks, facts = collect(args)
    printer = True
    if args.nodes is not None and args.nodes > 1 and not in_job:
        checks.append(Check("roundtrip", "nodes", FAIL,
                            f"--nodes {args.nodes} needs a multi-node launch: torchrun "
                            f"--nnodes={args.nodes} ... -m ep_comm.tools.doctor "
                            f"--nodes {args.nodes}"))
    elif not args.quick and in_job:
        rt_checks, facts["roundtrip"], printer = roundtrip_in_group(args, checks)
        checks += rt_checks
    elif not args.quick:
        if args.timeout is None:
            args.timeout = 180.0 if facts["cuda"]["available"] else 60.0
        checks += check_roundtrip(facts, args, facts["cuda"]["available"],
                                  facts["cuda"]["device_count"])
    failed = [c for c in checks if c.status == FAIL]
    code = 1 if failed else 0
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    if printer:
        print(f"ep_comm doctor on {facts['host']} ({facts['time']}, {facts['seconds']:.1f} s)")
        print_table(checks)
        names = ", ".join(f"{c.section}/{c.name}" for c in failed)
        print("\n" + (f"FAILED: {len(failed)} check(s): {names}" if failed else
                      "OK: every check that applies passed"))
        print("Causes and fixes: docs/troubleshooting.md")
        if args.json:
            report = {"ok": not failed, "exit_code": code, **facts,
                      "checks": [dataclasses.asdict(c) for c in checks]}
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    sys.stdout.flush()
    return code
