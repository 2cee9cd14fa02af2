"""NVSHMEM: its versions, each transport (P2P, IBGDA, IBRC, UCX, libfabric) probed in
processes of its own, and the RDMA NICs the remote transports need."""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ep_comm.tools.doctor.probes import first_line, kill_group, run_cmd
from ep_comm.tools.doctor.report import FAIL, INFO, NA, PASS, WARN, Check


TRANSPORTS = {  # name -> the NVSHMEM environment that selects it (and only it)
    "P2P": {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_IB_ENABLE_IBGDA": "0"},
    "IBGDA": {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_IB_ENABLE_IBGDA": "1"},
    "IBRC": {"NVSHMEM_REMOTE_TRANSPORT": "ibrc", "NVSHMEM_IB_ENABLE_IBGDA": "0"},
    "UCX": {"NVSHMEM_REMOTE_TRANSPORT": "ucx", "NVSHMEM_IB_ENABLE_IBGDA": "0"},
    "libfabric": {"NVSHMEM_REMOTE_TRANSPORT": "libfabric", "NVSHMEM_IB_ENABLE_IBGDA": "0"},
}
PROBE_TIMEOUT_S = 30.0


def _dist_version(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_NVSHMEM_PROBE = r'''
import json, os, sys, time
pe, npes, uid_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
res = {"pe": pe, "ok": False}
try:
    import numpy as np
    import nvshmem.core as nvshmem
    try:
        from cuda.core import Device
    except ImportError:
        from cuda.core.experimental import Device
    dev = Device(pe)
    dev.set_current()
    uid = nvshmem.get_unique_id(empty=(pe != 0))
    if npes > 1:
        if pe == 0:
            with open(uid_file + ".tmp", "wb") as f:
                f.write(uid._data.tobytes())
            os.replace(uid_file + ".tmp", uid_file)
        else:
            deadline = time.time() + 20
            while not os.path.exists(uid_file):
                if time.time() > deadline:
                    raise TimeoutError("PE 0 published no NVSHMEM unique id within 20 s")
                time.sleep(0.02)
            with open(uid_file, "rb") as f:
                uid._data[:] = np.frombuffer(f.read(), dtype=uid._data.dtype)
    nvshmem.init(device=dev, uid=uid, rank=pe, nranks=npes, initializer_method="uid")
    res["n_pes"] = nvshmem.n_pes() if hasattr(nvshmem, "n_pes") else npes
    nvshmem.finalize()
    res["ok"] = True
except BaseException as e:
    res["error"] = f"{type(e).__name__}: {e}"
sys.stdout.flush()
print("EP_COMM_PROBE " + json.dumps(res), flush=True)
'''
_REASON_RE = re.compile(r"WARN|ERROR|Unable|fail|No .*device|not found|cannot|error", re.I)


def _probe_transport(name: str, env_sel: dict, npes: int, timeout: float) -> dict:
    """Initialise NVSHMEM on ``npes`` GPUs with only transport ``name`` selected."""
    tmp = tempfile.mkdtemp(prefix="ep_comm_doctor_")
    env = dict(os.environ, NVSHMEM_DEBUG="INFO", NVSHMEM_DEBUG_SUBSYS="ALL",
               NVSHMEM_SYMMETRIC_SIZE=str(64 << 20), **env_sel)
    procs = [subprocess.Popen([sys.executable, "-c", _NVSHMEM_PROBE, str(pe), str(npes),
                               os.path.join(tmp, "uid")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for pe in range(npes)]
    outputs, timed_out = [], False
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(p)
            out, _ = p.communicate()
        outputs.append(out or "")
    shutil.rmtree(tmp, ignore_errors=True)
    return parse_probe(name, outputs, timed_out, timeout)


def parse_probe(name: str, outputs: list[str], timed_out: bool, timeout: float) -> dict:
    text = "\n".join(outputs)
    results = [json.loads(ln.split(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("EP_COMM_PROBE ")]
    lines = [ln.strip() for ln in text.splitlines() if not ln.startswith("EP_COMM_PROBE")]
    marks = [i for i, ln in enumerate(lines)
             if re.search(r"init failed for|Unable to open the|Unable to initialize", ln)]
    # NVSHMEM names the cause just before it says the transport failed; else any warning.
    near = lines[max(0, marks[0] - 3):marks[0] + 1] if marks else lines
    reasons = [ln[:200] for ln in near if _REASON_RE.search(ln)][-3:]
    errors = [r["error"] for r in results if not r.get("ok")]
    lower = text.lower()
    if timed_out:
        ok, why = False, f"NVSHMEM init did not finish within {timeout:g} s (hang)"
    elif errors or len(results) < len(outputs):
        ok, why = False, (errors[0] if errors else "a probe process died: " + first_line(text))
    elif name == "P2P":
        ok, why = True, f"initialised on {results[0].get('n_pes', len(results))} PE(s)"
    else:
        label = "ibgda" if name == "IBGDA" else name.lower()
        if f"successfully initialized the transport: {label}" in lower:
            ok, why = True, "initialised"
        elif "init failed for" in lower or "unable to open the nvshmem_transport" in lower:
            ok, why = False, "NVSHMEM could not initialise it"
        else:
            ok, why = None, "NVSHMEM printed no status for it (built without it?)"
    if not ok and reasons:
        why += ": " + " | ".join(dict.fromkeys(reasons[:3]))
    return {"ok": ok, "reason": why, "output_tail": text[-3000:]}


def check_nvshmem(facts: dict, have_gpu: bool, num_gpus: int, has_nic: bool,
                  probe: bool) -> list[Check]:
    versions = {"nvshmem4py": _dist_version("nvshmem4py-cu13") or _dist_version("nvshmem4py-cu12"),
                "nvidia-nvshmem": (_dist_version("nvidia-nvshmem-cu13")
                                   or _dist_version("nvidia-nvshmem-cu12")),
                "headers": facts.get("nvshmem_headers", {}).get("version")}
    facts["nvshmem"] = {"versions": versions, "transports": {}}
    out = [Check("nvshmem", "NVSHMEM", INFO,
                 f"library {versions['nvidia-nvshmem'] or 'wheel not installed'}, headers "
                 f"{versions['headers'] or 'not found'}, nvshmem4py "
                 f"{versions['nvshmem4py'] or 'not installed'}")]
    if not have_gpu:
        for name in TRANSPORTS:
            facts["nvshmem"]["transports"][name] = {"ok": None, "reason": "skipped: no GPU"}
            out.append(Check("nvshmem", f"transport {name}", NA, "skipped: no GPU"))
        return out
    if not probe:
        out.append(Check("nvshmem", "transports", INFO, "not probed (--quick)"))
        return out
    import importlib.util
    if importlib.util.find_spec("nvshmem") is None:
        msg = ("nvshmem4py is not installed: pip install nvshmem4py-cu13 (ep_comm[gpu]); the "
               "low-latency kernels need it")
        facts["nvshmem"]["transports"] = {n: {"ok": False, "reason": msg} for n in TRANSPORTS}
        out.append(Check("nvshmem", "nvshmem4py", FAIL, msg))
        return out
    npes = min(2, num_gpus)
    with concurrent.futures.ThreadPoolExecutor(len(TRANSPORTS)) as pool:
        futs = {n: pool.submit(_probe_transport, n, env, npes, PROBE_TIMEOUT_S)
                for n, env in TRANSPORTS.items()}
        results = {n: f.result() for n, f in futs.items()}
    for name, res in results.items():
        facts["nvshmem"]["transports"][name] = res
        selected = " ".join(f"{k}={v}" for k, v in TRANSPORTS[name].items())
        if name == "P2P":
            status = PASS if res["ok"] else FAIL
        elif res["ok"]:
            status = PASS
        else:
            status = WARN if has_nic else NA
        prefix = "" if has_nic or name == "P2P" or res["ok"] else "no NIC; "
        out.append(Check("nvshmem", f"transport {name}", status,
                         f"{prefix}{res['reason']} [{selected}]"))
    return out


def check_nics(facts: dict) -> tuple[list[Check], bool]:
    root = Path("/sys/class/infiniband")
    nics = []
    if root.is_dir():
        for dev in sorted(root.iterdir()):
            ports = []
            for port in sorted((dev / "ports").glob("*")):
                def read(name, port=port):
                    try:
                        return (port / name).read_text().strip()
                    except OSError:
                        return "?"
                ports.append({"port": port.name, "state": read("state"),
                              "link_layer": read("link_layer"), "rate": read("rate")})
            nics.append({"name": dev.name, "ports": ports})
    rc, ibv = run_cmd(["ibv_devinfo", "-l"]) if shutil.which("ibv_devinfo") else (None, None)
    facts["nics"] = {"sysfs": nics, "ibv_devinfo": ibv if rc == 0 else None}
    if not nics:
        return [Check("network", "NICs", INFO, "none in /sys/class/infiniband (no RDMA NIC: one "
                      "node only; runs across nodes need IB/RoCE)")], False
    desc = ", ".join(f"{n['name']} " + "/".join(f"{p['state'].split(':')[-1].strip()} "
                                                  f"{p['link_layer']}" for p in n["ports"])
                     for n in nics)
    active = any("ACTIVE" in p["state"] for n in nics for p in n["ports"])
    return [Check("network", "NICs", PASS if active else WARN,
                  desc + ("" if active else " (no port ACTIVE)"))], True
