"""The kernel toolchain: nvcc, the NVSHMEM headers, the target architecture, the kernel
cache, and (``--compile``) compiling every kernel."""
from __future__ import annotations

import os
import shutil
import time

from ep_comm.tools.doctor.probes import first_line
from ep_comm.tools.doctor.report import FAIL, INFO, PASS, WARN, Check


def _unhinted(message: str) -> str:
    """An ep_comm error message without its "run the doctor" sentence (we are the doctor)."""
    from ep_comm.errors import DOCTOR_HINT
    return message.replace(DOCTOR_HINT, "").strip()


def _nvcc_source(path: str) -> str:
    """Where ``ep_comm.runtime.jit.find_nvcc`` found ``path`` (its search order)."""
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
    from ep_comm.runtime import jit
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
    out.append(check_host_path(facts, build=False))
    return out


def check_host_path(facts: dict, build: bool) -> Check:
    """The C++ host path of the low-latency calls (ep_comm.runtime.host_ext): off, built,
    buildable, or why not (then those calls take the Python host path: slower, same results).
    ``build``: build it now (``--compile``) instead of only looking."""
    from ep_comm.runtime import host_ext
    name = "host_path"
    facts["host_path"] = fact = {"enabled": host_ext.enabled(), "cached": None, "status": None}
    if not host_ext.enabled():
        fact["status"] = host_ext.status(name)
        return Check("compiler", "C++ host path", INFO,
                     f"{host_ext.HOST_EXT_ENV}=0: the low-latency calls use the Python host path")
    if build:
        host_ext.load(name)
    found = host_ext.cached(name)
    fact["cached"], fact["status"] = (str(found) if found else None), host_ext.status(name)
    if found:
        return Check("compiler", "C++ host path", PASS, f"built: {found}")
    missing = host_ext.tools_missing()
    if missing or fact["status"].startswith("not built"):
        why = fact["status"] if fact["status"].startswith("not built") else (
            "missing " + ", ".join(missing))
        return Check("compiler", "C++ host path", WARN,
                     f"{why}; the low-latency calls use the Python host path (same results, "
                     f"more host time per call)")
    return Check("compiler", "C++ host path", INFO,
                 "built at the first low-latency Buffer (~20 s, once; --compile builds it now)")


def _check_cache(facts: dict, info: dict, have_gpu: bool) -> Check:
    from ep_comm.runtime import jit
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
    from ep_comm.runtime import jit
    t0 = time.perf_counter()
    try:
        mods = jit.compile_all_kernels()
    except jit.JitError as e:
        facts["compile"] = {"ok": False, "error": str(e)}
        return [Check("compiler", "compile kernels", FAIL, first_line(_unhinted(str(e)), 400))]
    dt = time.perf_counter() - t0
    fresh = [m.name for m in mods if not m.from_cache]
    facts["compile"] = {"ok": True, "modules": [m.name for m in mods], "compiled": fresh,
                        "seconds": round(dt, 2)}
    return [Check("compiler", "compile kernels", PASS,
                  f"{len(mods)} modules in {dt:.1f} s ({len(fresh)} compiled now, the rest "
                  "cached)"), check_host_path(facts, build=True)]
