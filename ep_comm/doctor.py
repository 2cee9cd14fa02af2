"""``python -m ep_comm.doctor``: can this machine run ep_comm, and if not, why not.

Prints one table: software versions, the CUDA compiler and kernel cache, each GPU, the
NVLink / P2P matrix, NVSHMEM and each of its transports, NICs, MPI; then a dispatch + combine
round trip (normal and low-latency mode) on every backend this machine can run, checked
against an independent computation. Every probe runs with a time limit, so the doctor itself
never hangs, and a missing piece is a failed (or not applicable) line with its reason, never
a crash.

    python -m ep_comm.doctor                 # or: ep-comm-doctor
    python -m ep_comm.doctor --json out.json # also write everything as JSON
    torchrun --nnodes=2 --nproc-per-node=8 ... -m ep_comm.doctor --nodes 2   # across nodes

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
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

PASS, FAIL, WARN, NA, INFO = "pass", "FAIL", "warn", "n/a", "info"
TRANSPORTS = {  # name -> the NVSHMEM environment that selects it (and only it)
    "P2P": {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_IB_ENABLE_IBGDA": "0"},
    "IBGDA": {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_IB_ENABLE_IBGDA": "1"},
    "IBRC": {"NVSHMEM_REMOTE_TRANSPORT": "ibrc", "NVSHMEM_IB_ENABLE_IBGDA": "0"},
    "UCX": {"NVSHMEM_REMOTE_TRANSPORT": "ucx", "NVSHMEM_IB_ENABLE_IBGDA": "0"},
    "libfabric": {"NVSHMEM_REMOTE_TRANSPORT": "libfabric", "NVSHMEM_IB_ENABLE_IBGDA": "0"},
}
PROBE_TIMEOUT_S = 30.0
EXIT_GRACE_S = 10.0  # after the last check, how long rank processes may take to exit
# Round-trip sizes: small enough to be instant on CPU, big enough to cross every code path
# (tokens routed to no rank, to one rank, to several; -1 entries; fp8 needs hidden % 128 == 0).
RT_TOKENS, RT_HIDDEN, RT_TOPK, RT_EXPERTS_PER_RANK = 48, 256, 4, 4


@dataclasses.dataclass
class Check:
    """One line of the report."""

    section: str
    name: str
    status: str
    detail: str
    data: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def _cmd(argv: list[str], timeout: float = 10.0) -> tuple[int | None, str]:
    """Run a command; (exit code or None when it could not run or timed out, its output)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None, f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(argv)} did not finish within {timeout:g} s"
    except OSError as e:
        return None, f"{argv[0]}: {e}"
    return p.returncode, (p.stdout + p.stderr).strip()


def _first_line(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _unhinted(message: str) -> str:
    """An ep_comm error message without its "run the doctor" sentence (we are the doctor)."""
    from ep_comm.errors import DOCTOR_HINT
    return message.replace(DOCTOR_HINT, "").strip()


def _dist_version(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _which(name: str) -> str | None:
    """``shutil.which`` that also looks next to this Python (an un-activated venv's bin/)."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which(name, path=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a child started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait()


# --------------------------------------------------------------------------- software
def check_software(facts: dict) -> list[Check]:
    out = [Check("software", "python", INFO, f"{platform.python_version()} ({sys.executable})")]
    facts["python"] = {"version": platform.python_version(), "executable": sys.executable}
    import torch
    facts["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                      "nccl": _nccl_version(torch)}
    out.append(Check("software", "torch", INFO,
                     f"{torch.__version__} (built for CUDA "
                     f"{torch.version.cuda or 'none: CPU build'})"))
    try:
        import triton
        facts["triton"] = {"version": triton.__version__}
        out.append(Check("software", "triton", INFO, triton.__version__))
    except ImportError as e:
        facts["triton"] = {"version": None, "error": str(e)}
        out.append(Check("software", "triton", WARN,
                         f"not importable ({e}); the Triton kernels need it: pip install triton"))
    import ep_comm
    facts["ep_comm"] = {"version": ep_comm.__version__, "path": os.path.dirname(ep_comm.__file__)}
    out.append(Check("software", "ep_comm", INFO,
                     f"{ep_comm.__version__} ({os.path.dirname(ep_comm.__file__)})"))
    return out


def _nccl_version(torch) -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        v = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


# ------------------------------------------------------------------------- CUDA, GPUs
def _driver_version() -> str | None:
    rc, out = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if rc == 0 and out:
        return out.splitlines()[0].strip()
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module\s+(\S+)", text)
    return m.group(1) if m else _first_line(text)


def check_cuda(facts: dict) -> list[Check]:
    import torch
    available = torch.cuda.is_available()
    n = torch.cuda.device_count() if available else 0
    driver = _driver_version()
    facts["cuda"] = {"available": available, "runtime": torch.version.cuda, "driver": driver,
                     "device_count": n,
                     "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if not available:
        why = ("torch is a CPU build" if torch.version.cuda is None else
               "no GPU visible to torch (driver missing, or CUDA_VISIBLE_DEVICES="
               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        return [Check("gpu", "CUDA", NA, f"no GPU: {why}; driver {driver or 'not found'}. "
                      "The kernels backend needs GPUs; the reference backend runs on CPU")]
    out = [Check("gpu", "CUDA", INFO, f"runtime {torch.version.cuda}, driver {driver or 'unknown'},"
                  f" {n} GPU(s), NCCL {facts['torch']['nccl'] or 'unknown'}")]
    gpus = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        g = {"index": i, "name": p.name, "sms": p.multi_processor_count,
             "memory_gib": round(p.total_memory / 2**30, 1),
             "capability": f"{p.major}.{p.minor}"}
        gpus.append(g)
        status = INFO if p.major >= 9 else WARN
        note = "" if p.major >= 9 else " (kernels target sm_90a; set EP_COMM_CUDA_ARCH)"
        out.append(Check("gpu", f"GPU {i}", status, f"{p.name}, sm_{p.major}{p.minor}, "
                         f"{p.multi_processor_count} SMs, {g['memory_gib']} GiB{note}"))
    facts["gpus"] = gpus
    return out


def check_p2p(facts: dict) -> list[Check]:
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rc, topo = _cmd(["nvidia-smi", "topo", "-m"])
    facts["p2p"] = {"matrix": [], "nvidia_smi_topo": topo if rc == 0 else None}
    if n == 0:
        return [Check("gpu", "P2P / NVLink", NA, "skipped: no GPU")]
    matrix = [[i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(n)]
              for i in range(n)]
    facts["p2p"]["matrix"] = matrix
    links = _topo_links(topo, n) if rc == 0 else {}
    facts["p2p"]["links"] = {f"{i}-{j}": v for (i, j), v in links.items()}
    missing = [(i, j) for i in range(n) for j in range(n) if not matrix[i][j]]
    pairs = ", ".join(f"{i}-{j} {links.get((i, j), 'P2P')}" for i in range(n)
                      for j in range(i + 1, n)) or "one GPU: no pairs"
    if missing:
        return [Check("gpu", "P2P / NVLink", FAIL,
                      f"no peer access between GPUs {', '.join(f'{i}->{j}' for i, j in missing)}"
                      f" ({pairs}); the kernels backend needs NVLink P2P between local GPUs: use "
                      "backend='reference', or fix the topology (see docs/troubleshooting.md)")]
    weak = [f"{i}-{j} {v}" for (i, j), v in links.items() if i < j and not v.startswith("NV")]
    if weak:
        return [Check("gpu", "P2P / NVLink", WARN,
                      f"P2P works but these pairs are not joined by NVLink: {', '.join(weak)} "
                      "(PCIe peer traffic is several times slower)")]
    return [Check("gpu", "P2P / NVLink", PASS, pairs)]


def _topo_links(topo: str, n: int) -> dict[tuple[int, int], str]:
    """``{(i, j): "NV18" | "SYS" | ...}`` from ``nvidia-smi topo -m``."""
    links = {}
    for line in topo.splitlines():
        m = re.match(r"\s*GPU(\d+)\s+(.*)", line)
        if not m:
            continue
        i, cells = int(m.group(1)), m.group(2).split()
        for j in range(min(n, len(cells))):
            if j != i:
                links[(i, j)] = cells[j]
    return links


MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
                 "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
EP_COMM_VARS = ("EP_COMM_TIMEOUT_S", "EP_COMM_NVCC", "EP_COMM_CUDA_ARCH", "EP_COMM_CACHE_DIR",
                "NVSHMEM_HOME", "NVSHMEM_SYMMETRIC_SIZE", "NVSHMEM_REMOTE_TRANSPORT",
                "NVSHMEM_IB_ENABLE_IBGDA")


def check_env(facts: dict, num_gpus: int) -> list[Check]:
    """The variables ep_comm reads, and whether NVLink multicast (NVLS) is switched off."""
    from ep_comm.comm import DEFAULT_TIMEOUT_S
    seen = {k: os.environ[k] for k in EP_COMM_VARS if k in os.environ}
    mc = {k: os.environ.get(k) for k in MULTICAST_OFF}
    facts["env"] = {"ep_comm": seen, "multicast": mc}
    out = [Check("env", "settings", INFO, ", ".join(f"{k}={v}" for k, v in seen.items())
                 or f"defaults (EP_COMM_TIMEOUT_S={DEFAULT_TIMEOUT_S:g})")]
    on = [k for k, off in MULTICAST_OFF.items() if mc[k] != off]
    if not on:
        out.append(Check("env", "NVLink multicast", INFO, "off for NCCL, NVSHMEM and torch"))
    else:
        status = WARN if num_gpus >= 2 else INFO
        out.append(Check("env", "NVLink multicast", status,
                         f"may be used by {', '.join(on)} (ep_comm never uses it); if runs hang "
                         "or fail around NVLS / multicast objects, set "
                         + " ".join(f"{k}={v}" for k, v in MULTICAST_OFF.items())))
    return out


# ------------------------------------------------------------------- compiler, cache
def _nvcc_source(path: str) -> str:
    """Where ``ep_comm.jit.find_nvcc`` found ``path`` (its search order)."""
    if os.environ.get("EP_COMM_NVCC"):
        return "EP_COMM_NVCC"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.realpath(path) == os.path.realpath(os.path.join(home, "bin", "nvcc")):
        return "CUDA_HOME"
    on_path = shutil.which("nvcc")
    if on_path and os.path.realpath(on_path) == os.path.realpath(path):
        return "PATH"
    if path.startswith("/usr/local/cuda"):
        return "/usr/local/cuda (not on PATH)"
    return "the nvidia-cuda-nvcc wheel"


def check_toolchain(facts: dict, have_gpu: bool) -> list[Check]:
    from ep_comm import jit
    info = jit.cache_info()
    facts["nvcc"] = {"path": info["nvcc"], "version": info["nvcc_version"],
                     "error": info["nvcc_error"],
                     "source": _nvcc_source(info["nvcc"]) if info["nvcc"] else None}
    out = []
    needed = have_gpu or bool(os.environ.get("EP_COMM_NVCC"))
    if info["nvcc"]:
        out.append(Check("compiler", "nvcc", PASS, f"{info['nvcc_version']} at {info['nvcc']} "
                         f"(found via {facts['nvcc']['source']})"))
    else:
        why = ("needed: the kernels are compiled on first use" if have_gpu else
               "EP_COMM_NVCC is set, so it must work" if needed else
               "not needed here (no GPU): only the kernels backend compiles")
        out.append(Check("compiler", "nvcc", FAIL if needed else WARN,
                         f"{_unhinted(info['nvcc_error'])} [{why}]"))
    facts["nvshmem_headers"] = {"include": info["nvshmem_include"],
                                "version": info["nvshmem_version"], "error": info["nvshmem_error"]}
    if info["nvshmem_include"]:
        out.append(Check("compiler", "NVSHMEM headers", PASS,
                         f"{info['nvshmem_version']} at {info['nvshmem_include']}"))
    else:
        out.append(Check("compiler", "NVSHMEM headers", FAIL if have_gpu else WARN,
                         _unhinted(info["nvshmem_error"] or "not found")))
    out.append(Check("compiler", "target arch", INFO, f"sm_{info['arch']}"))
    out.append(_check_cache(facts, info, have_gpu))
    return out


def _check_cache(facts: dict, info: dict, have_gpu: bool) -> Check:
    from ep_comm import jit
    explicit = bool(os.environ.get("EP_COMM_CACHE_DIR"))
    facts["cache"] = {"dir": info["cache_dir"], "num_kernels": info["num_cubins"],
                      "explicit": explicit, "writable": None, "error": None}
    try:
        jit._writable_cache_dir()  # creates it if needed, then writes a temp file
        facts["cache"]["writable"] = True
    except jit.CacheDirError as e:
        facts["cache"]["writable"] = False
        facts["cache"]["error"] = str(e)
        why = ("needed: compiled kernels are kept there" if have_gpu else
               "EP_COMM_CACHE_DIR is set, so it must work" if explicit else
               "not needed here (no GPU)")
        return Check("compiler", "kernel cache", FAIL if have_gpu or explicit else WARN,
                     f"{_unhinted(str(e))} [{why}]")
    return Check("compiler", "kernel cache", PASS,
                 f"{info['cache_dir']} (writable, {info['num_cubins']} compiled kernels"
                 f"{'; set by EP_COMM_CACHE_DIR' if explicit else ''})")


def check_compile(facts: dict) -> list[Check]:
    """``--compile``: build (or find in the cache) every kernel file now."""
    from ep_comm import jit
    t0 = time.perf_counter()
    try:
        mods = jit.compile_all_kernels()
    except jit.JitError as e:
        facts["compile"] = {"ok": False, "error": str(e)}
        return [Check("compiler", "compile kernels", FAIL, _first_line(_unhinted(str(e)), 400))]
    dt = time.perf_counter() - t0
    fresh = [m.name for m in mods if not m.from_cache]
    facts["compile"] = {"ok": True, "modules": [m.name for m in mods], "compiled": fresh,
                        "seconds": round(dt, 2)}
    return [Check("compiler", "compile kernels", PASS,
                  f"{len(mods)} modules in {dt:.1f} s ({len(fresh)} compiled now, the rest "
                  "cached)")]


# ---------------------------------------------------------------------------- NVSHMEM
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
            _kill_group(p)
            out, _ = p.communicate()
        outputs.append(out or "")
    shutil.rmtree(tmp, ignore_errors=True)
    return _parse_probe(name, outputs, timed_out, timeout)


def _parse_probe(name: str, outputs: list[str], timed_out: bool, timeout: float) -> dict:
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
        ok, why = False, (errors[0] if errors else "a probe process died: " + _first_line(text))
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


# ------------------------------------------------------------------------- NICs, MPI
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
    rc, ibv = _cmd(["ibv_devinfo", "-l"]) if shutil.which("ibv_devinfo") else (None, None)
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


_MPI4PY_PROBE = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
                 "print(mpi4py.__version__); print(MPI.Get_library_version().splitlines()[0])")


def check_mpi(facts: dict) -> list[Check]:
    mpirun = _which("mpirun")
    version = None
    if mpirun:
        rc, out = _cmd([mpirun, "--version"])
        m = re.search(r"^\s*Version:\s*(\S+)", out, re.M)  # MPICH's Hydra
        version = (f"MPICH/Hydra {m.group(1)}" if m else _first_line(out)) if rc == 0 else \
            f"--version failed: {_first_line(out)}"
    rc, out = _cmd([sys.executable, "-c", _MPI4PY_PROBE], timeout=20)
    lines = out.splitlines()
    if rc == 0 and lines:
        mpi4py = {"version": lines[0],
                  "library": " ".join(lines[1].split()) if len(lines) > 1 else None}
    else:
        mpi4py = {"version": None, "error": _first_line(out, 300)}
    facts["mpi"] = {"mpirun": mpirun, "mpirun_version": version, "mpi4py": mpi4py}
    checks = [Check("mpi", "mpirun", INFO if mpirun else WARN,
                    f"{mpirun} ({version})" if mpirun else
                    "not found (only needed for mpirun launches; torchrun works without it)")]
    if mpi4py["version"]:
        checks.append(Check("mpi", "mpi4py", INFO,
                            f"{mpi4py['version']} ({mpi4py['library'] or 'library unknown'})"))
    else:
        checks.append(Check("mpi", "mpi4py", WARN,
                            f"not usable ({mpi4py['error']}); needed only for Buffer(comm=...): "
                            "pip install 'ep_comm[mpi]'"))
    return checks


# -------------------------------------------------------------------- round trip (ranks)
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
                res.update(status=FAIL, detail=f"{type(e).__name__}: {_first_line(str(e), 400)}"
                           f"{where}")
            emit(res)
            results.append(res)
    return results


def _worker_main(args) -> int:
    """One rank of the round trip that ``spawn_roundtrips`` started."""
    from ep_comm.launcher import init_distributed
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


def spawn_roundtrips(world: int, use_gpu: bool, backends: list[str], timeout: float,
                     ranks_per_node: int | None) -> tuple[list[dict], str]:
    """Start ``world`` rank processes on this host, wait at most ``timeout`` s, and return
    (per-rank events, the tail of their output)."""
    tmp = tempfile.mkdtemp(prefix="ep_comm_doctor_")
    port = _free_port()
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    procs, logs = [], []
    for r in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   PYTHONPATH=pkg_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("EP_COMM_TIMEOUT_S", "10")
        if not use_gpu:
            env["OMP_NUM_THREADS"] = "1"
        argv = [sys.executable, "-m", "ep_comm.doctor", "--worker", os.path.join(tmp, f"{r}.jsonl"),
                "--backends", ",".join(backends)]
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
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if now > deadline:
            timed_out = True
            break
        if done_at is None and _all_done(tmp, world):
            done_at = now
        if done_at is not None and now - done_at > EXIT_GRACE_S:
            exit_hang = True  # every check finished; tear-down (NCCL, NVSHMEM) hangs
            break
        time.sleep(0.05)
    for p in procs:
        _kill_group(p)
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
    return events, "\n".join(tails)


def _all_done(tmp: str, world: int) -> bool:
    for r in range(world):
        try:
            with open(os.path.join(tmp, f"{r}.jsonl")) as f:
                if '"event": "done"' not in f.read():
                    return False
        except FileNotFoundError:
            return False
    return True


def _merge(events: list[dict], world: int, backends: list[str], tail: str) -> list[dict]:
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
    rows = _merge(events, world, backends, tail)
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


def _local_rank() -> int:
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
    from ep_comm.launcher import init_distributed
    group = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    nodes = len(dict.fromkeys(hosts))
    mine = [dataclasses.asdict(c) for c in local_checks if c.status in (FAIL, WARN)]
    found = [None] * world
    dist.all_gather_object(found, (_local_rank() == 0 and rank != 0, mine))
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
    rows = _merge(events, world, backends, "")
    where = f"{world} ranks on {nodes} node(s), {dist.get_backend()}"
    checks += [_roundtrip_line(row, where) for row in rows]
    dist.destroy_process_group()
    return checks, {"world": world, "nodes": nodes, "hosts": hosts, "results": rows}, rank == 0


# ------------------------------------------------------------------------------ report
def print_table(checks: list[Check], file=sys.stdout) -> None:
    w_name = max(len(f"{c.section}/{c.name}") for c in checks)
    print(f"{'check':<{w_name}}  {'status':<6}  detail", file=file)
    print(f"{'-' * w_name}  ------  {'-' * 40}", file=file)
    for c in checks:
        lines = c.detail.splitlines() or [""]
        print(f"{c.section + '/' + c.name:<{w_name}}  {c.status:<6}  {lines[0]}", file=file)
        for ln in lines[1:]:
            print(f"{'':<{w_name}}  {'':<6}  {ln}", file=file)


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
    p = argparse.ArgumentParser(prog="python -m ep_comm.doctor", description=__doc__,
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
        return _worker_main(args)

    from ep_comm.launcher import launched_by
    t0 = time.perf_counter()
    in_job = launched_by() != "single" and int(os.environ.get(
        "WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))) > 1
    if in_job and _local_rank() != 0:  # one rank per node checks the machine
        checks, facts = [], {"host": socket.gethostname()}
    else:
        checks, facts = collect(args)
    printer = True
    if args.nodes is not None and args.nodes > 1 and not in_job:
        checks.append(Check("roundtrip", "nodes", FAIL,
                            f"--nodes {args.nodes} needs a multi-node launch: torchrun "
                            f"--nnodes={args.nodes} ... -m ep_comm.doctor --nodes {args.nodes}"))
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


if __name__ == "__main__":
    sys.exit(main())
