"""The GPUs: CUDA runtime and driver, each device, the P2P / NVLink matrix, and the
environment variables ep_comm reads (NVLink multicast among them)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ep_comm.tools.doctor.probes import first_line, run_cmd
from ep_comm.tools.doctor.report import FAIL, INFO, NA, PASS, WARN, Check


def _driver_version() -> str | None:
    rc, out = run_cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if rc == 0 and out:
        return out.splitlines()[0].strip()
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module\s+(\S+)", text)
    return m.group(1) if m else first_line(text)


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
    rc, topo = run_cmd(["nvidia-smi", "topo", "-m"])
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
    from ep_comm.runtime.comm import DEFAULT_TIMEOUT_S
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
