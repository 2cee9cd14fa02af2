"""Run-time compiler, on-disk cache, loader and launcher for the CUDA C++ kernels in ``kernels/``.

Why at run time: the kernels depend on the GPU architecture and on the NVSHMEM release that is
installed next to them, and a wheel built ahead of time would pin both. Compiling on first use
with the machine's own nvcc and NVSHMEM, then caching the cubin on disk, keeps the package pure
Python and every later start fast.

The pipeline, for a module made of one or more ``.cu`` files::

    nvcc -rdc=true -O3 -std=c++17 -lineinfo -gencode=arch=compute_90a,code=sm_90a \
         -cubin x.cu -o x.rdc.cubin
    nvcc -arch=sm_90a -dlink -cubin x.rdc.cubin [libnvshmem_device.a] -o module.cubin

``-rdc`` plus the device link is what lets kernels call the device functions inside the static
``libnvshmem_device.a``. NVRTC cannot do this (it mangles ``uint64_t`` differently from the
nvcc-built archive), which is why this module shells out to nvcc. ``-cubin`` instead of ``-c``
in the first step skips the host compiler passes, which only make host stubs that a cubin never
holds: the result is byte-identical, and a file that includes ``nvshmem.h`` compiles in ~8 s
instead of ~14 s.

Public functions:
    compile_kernels(name, sources, *, nvshmem, arch=None, extra_flags=(), defines=None,
                    src_dir=None) -> CompiledModule
        Compile and device-link (or find in the cache). Needs no GPU: this is also the
        compile-only path that CI uses to check every ``.cu`` file.
    CompiledModule.kernel(name), .init_nvshmem(), .finalize_nvshmem(), .launch(...)
        Load the cubin with cuda.core (lazily, once per process) and launch on torch's stream.
    CompiledModule.prepare(name, arg_buffer, grid, block, shared_mem) -> PreparedLaunch
        The hot path: a launch whose arguments live in C memory, patched by the caller and
        launched with cuda.bindings' ``cuLaunchKernel`` (no per-argument conversion).
    current_stream_handle(device_index): torch's current raw stream, cheaply.
    compile_all_kernels(arch=None) -> list[CompiledModule]: every ``kernels/*.cu`` on its own.
    kernel_sources(), uses_nvshmem(source), kernels_dir(): what there is to compile.
    find_nvcc(), find_nvshmem(), resolve_arch(arch=None), cache_dir(), cache_info().

Environment variables:
    EP_COMM_NVCC        nvcc to use (else CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda, the
                        ``nvidia-cuda-nvcc`` wheel).
    EP_COMM_CUDA_ARCH   target architecture, e.g. ``90a`` (else the current GPU's, else 90a).
    EP_COMM_CACHE_DIR   where cubins are kept (else ``~/.cache/ep_comm/kernels``).
    NVSHMEM_HOME        NVSHMEM install with include/ and lib/ (else the ``nvidia-nvshmem-cu13``
                        wheel).

Nothing here imports torch, cuda.core or nvshmem at module level, so ``import ep_comm.runtime.jit``
works on a CPU-only machine without them.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import importlib.resources
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ep_comm.core.constants import device_defines
from ep_comm.errors import DOCTOR_HINT, EpCommError, InputError

__all__ = [
    "JitError", "ToolchainError", "CompileError", "CacheDirError", "CompiledModule",
    "compile_kernels", "compile_all_kernels", "kernel_sources", "uses_nvshmem", "kernels_dir",
    "find_nvcc", "nvcc_version", "find_nvshmem", "NvshmemInstall", "resolve_arch",
    "cache_dir", "cache_info", "PreparedLaunch", "current_stream_handle",
]

log = logging.getLogger(__name__)

# Bumped whenever the way commands are built changes, so old cubins are not reused.
_SCHEME = "ep_comm.runtime.jit/2"
# Hopper is the machine this project targets; "a" enables the arch-specific instructions
# (wgmma, setmaxnreg, TMA multicast) that sm_90 without the suffix rejects.
DEFAULT_ARCH = "90a"
# Above this many bytes of dynamic shared memory a kernel must opt in through an attribute.
_DEFAULT_MAX_DYNAMIC_SMEM = 48 * 1024
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h")
_SYSTEM_CUDA_HOME = Path("/usr/local/cuda")
_NVCC_INSTALL_HINT = (
    "Install the CUDA toolkit (nvcc >= 12.3 for sm_90a), or `pip install nvidia-cuda-nvcc`, "
    "or point EP_COMM_NVCC (or CUDA_HOME) at an existing one.")
_NVSHMEM_INSTALL_HINT = (
    "Install NVSHMEM with `pip install nvidia-nvshmem-cu13` (or -cu12 for CUDA 12), or set "
    "NVSHMEM_HOME to a directory holding include/nvshmem.h and lib/libnvshmem_device.a.")


# ----------------------------------------------------------------------------------- errors
class JitError(EpCommError):
    """The run-time compiler could not produce or load a kernel module."""


class ToolchainError(JitError):
    """nvcc or NVSHMEM is missing or unusable. The message says how to install it."""


class CompileError(JitError):
    """nvcc failed. The message holds the full command and nvcc's output.

    Attributes:
        command: the argv list that failed.
        output: nvcc's stderr followed by its stdout.
    """

    def __init__(self, command: Sequence[str], output: str):
        self.command, self.output = list(command), output
        super().__init__(f"nvcc failed:\n  {shlex.join(self.command)}\n{output.rstrip()}")


class CacheDirError(JitError):
    """The kernel cache directory cannot be created or written."""


# ------------------------------------------------------------------------------ sources
def kernels_dir() -> Path:
    """The directory holding the CUDA kernel sources (``kernels/cuda``).

    The top-level ``kernels/`` folder is installed as the package ``ep_comm.kernels`` (CUDA
    sources in ``cuda/``, Triton kernels in the subpackage ``triton``); in a plain checkout that
    is not installed it is found next to the ``ep_comm`` folder. A checkout's own folder comes
    first: an editable install of another checkout (a git worktree beside it) maps
    ``ep_comm.kernels`` to that checkout's kernels, which would run with this one's Python.
    """
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "kernels" / "cuda").is_dir():
        return checkout / "kernels" / "cuda"
    try:
        res = importlib.resources.files("ep_comm.kernels")
        if isinstance(res, Path) and (res / "cuda").is_dir():
            return res / "cuda"
    except (ModuleNotFoundError, TypeError):
        pass
    spec = importlib.util.find_spec("ep_comm.kernels")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "cuda").is_dir():
            return Path(loc) / "cuda"
    return Path(__file__).resolve().parents[2] / "kernels" / "cuda"


def kernel_sources(src_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the ``.cu`` files in the kernel directory, sorted."""
    root = Path(src_dir) if src_dir is not None else kernels_dir()
    return sorted(p.name for p in root.glob("*.cu"))


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)


def uses_nvshmem(source: str, src_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``source`` includes an NVSHMEM header, directly or through a local header.

    Such a file must be compiled with ``nvshmem=True`` (include path plus the device library).
    """
    root = Path(src_dir) if src_dir is not None else kernels_dir()
    seen: set[Path] = set()
    todo = [root / source]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for _, header in _INCLUDE_RE.findall(path.read_text(errors="replace")):
            local = path.parent / header
            if local.is_file():
                todo.append(local)
            elif Path(header).name.startswith("nvshmem"):
                return True
    return False


def _hash_sources(root: Path) -> dict[str, str]:
    """sha256 of every source and header under ``root``.

    Hashing all of them instead of tracking which headers each file includes is cheap (a few
    hundred KiB) and cannot miss a dependency; the cost is a rebuild of every module when any
    header changes.
    """
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in _SOURCE_SUFFIXES and path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            digests[path.relative_to(root).as_posix()] = digest
    return digests


# ---------------------------------------------------------------------------- toolchain
def _executable(path: str | os.PathLike | None) -> str | None:
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return str(path)
    return None


def _pip_nvcc() -> str | None:
    """nvcc from the ``nvidia-cuda-nvcc`` wheel.

    CUDA 13 wheels put it at ``nvidia/cu13/bin/nvcc``, CUDA 12 wheels at
    ``nvidia/cuda_nvcc/bin/nvcc``.
    """
    spec = importlib.util.find_spec("nvidia")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cu12", "cuda_nvcc"):
            found = _executable(Path(loc) / sub / "bin" / "nvcc")
            if found:
                return found
    return None


def find_nvcc() -> str:
    """Path of the nvcc to use.

    Order: ``EP_COMM_NVCC`` (an error if it names no executable: a typo should not silently
    pick another compiler), ``CUDA_HOME/bin/nvcc``, ``PATH``, ``/usr/local/cuda/bin/nvcc``, the
    ``nvidia-cuda-nvcc`` wheel.
    """
    explicit = os.environ.get("EP_COMM_NVCC")
    if explicit:
        if _executable(explicit):
            return explicit
        raise ToolchainError(f"EP_COMM_NVCC={explicit!r} is not an executable file. "
                             f"{_NVCC_INSTALL_HINT} {DOCTOR_HINT}")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [
        Path(cuda_home) / "bin" / "nvcc" if cuda_home else None,
        shutil.which("nvcc"),
        _SYSTEM_CUDA_HOME / "bin" / "nvcc",
    ]
    for cand in candidates:
        found = _executable(cand)
        if found:
            return found
    found = _pip_nvcc()
    if found:
        return found
    raise ToolchainError("nvcc (the CUDA compiler) was not found: looked at EP_COMM_NVCC, "
                         f"CUDA_HOME, PATH, {_SYSTEM_CUDA_HOME}/bin and the nvidia-cuda-nvcc "
                         f"wheel. {_NVCC_INSTALL_HINT} {DOCTOR_HINT}")


@functools.lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    """``nvcc --version`` output, which goes into the cache key (a new compiler rebuilds)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise ToolchainError(f"`{nvcc} --version` failed: {e}. {_NVCC_INSTALL_HINT} "
                             f"{DOCTOR_HINT}") from e
    return out.stdout.strip()


@dataclass(frozen=True)
class NvshmemInstall:
    """Where NVSHMEM's headers and static device library are, and which release they are."""

    include: Path
    device_lib: Path
    version: str

    def fingerprint(self) -> dict:
        """What identifies this install in the cache key: paths, release, and the library's
        size and mtime (a reinstall of the same release still rebuilds)."""
        st = self.device_lib.stat()
        return {"include": str(self.include), "lib": str(self.device_lib),
                "version": self.version, "lib_size": st.st_size, "lib_mtime_ns": st.st_mtime_ns}


def _nvshmem_roots() -> list[tuple[str, Path]]:
    """Candidate NVSHMEM installs, each with a word saying where it came from."""
    home = os.environ.get("NVSHMEM_HOME")
    if home:
        return [("NVSHMEM_HOME", Path(home))]  # explicit: never fall back to another install
    has_nvidia = importlib.util.find_spec("nvidia") is not None
    spec = importlib.util.find_spec("nvidia.nvshmem") if has_nvidia else None
    locs = (spec.submodule_search_locations or []) if spec else []
    return [("the nvidia-nvshmem wheel", Path(loc)) for loc in locs]


def _nvshmem_version(include: Path) -> str:
    text = ""
    for header in ("non_abi/nvshmem_version.h", "nvshmem_version.h"):
        if (include / header).is_file():
            text = (include / header).read_text(errors="replace")
            break
    parts = [re.search(rf"#define\s+NVSHMEM_VENDOR_{p}_VERSION\s+(\d+)", text)
             for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def find_nvshmem() -> NvshmemInstall:
    """The NVSHMEM install to compile against: ``NVSHMEM_HOME``, else the PyPI wheel."""
    roots = _nvshmem_roots()
    for _, root in roots:
        include, lib = root / "include", root / "lib" / "libnvshmem_device.a"
        if (include / "nvshmem.h").is_file() and lib.is_file():
            return NvshmemInstall(include, lib, _nvshmem_version(include))
    looked = ", ".join(f"{where} ({root})" for where, root in roots) or "nowhere (no wheel)"
    raise ToolchainError(f"NVSHMEM headers or libnvshmem_device.a not found; looked at {looked}. "
                         f"{_NVSHMEM_INSTALL_HINT} {DOCTOR_HINT}")


_ARCH_RE = re.compile(r"(?:sm_|compute_)?(\d{2,3})([af]?)")


def _normalize_arch(arch: str, where: str) -> str:
    m = _ARCH_RE.fullmatch(str(arch).strip())
    if not m:
        raise InputError(f"{where}={arch!r} is not a CUDA architecture; use e.g. '90a' or 'sm_90a'")
    return m.group(1) + m.group(2)


def resolve_arch(arch: str | None = None) -> str:
    """The architecture to compile for, as ``90a`` / ``80``.

    Order: the argument, ``EP_COMM_CUDA_ARCH``, the current GPU's compute capability (with the
    ``a`` suffix from Hopper on, as the kernels may use arch-specific instructions), else
    ``90a`` so that a machine without a GPU (CI) builds for the target machine.
    """
    if arch is not None:
        return _normalize_arch(arch, "arch")
    env = os.environ.get("EP_COMM_CUDA_ARCH")
    if env:
        return _normalize_arch(env, "EP_COMM_CUDA_ARCH")
    cc = _current_device_capability()
    if cc is None:
        return DEFAULT_ARCH
    major, minor = cc
    return f"{major}{minor}" + ("a" if major >= 9 else "")


def _current_device_capability() -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


# -------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Where cubins are kept: ``EP_COMM_CACHE_DIR`` or ``~/.cache/ep_comm/kernels``."""
    return Path(os.environ.get("EP_COMM_CACHE_DIR") or "~/.cache/ep_comm/kernels").expanduser()


def _writable_cache_dir() -> Path:
    """The cache directory, created if needed; a clear error if it cannot be written."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise CacheDirError(f"kernel cache directory {str(root)!r} is not writable ({e}). Set "
                            f"EP_COMM_CACHE_DIR to a writable directory. {DOCTOR_HINT}") from e
    return root


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive ``flock`` on ``path``: one process compiles a module, the others wait.

    The kernel drops the lock when its holder dies, so a crashed compile never wedges the
    others. (flock is not reliable on some network file systems: keep the cache local.)
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ------------------------------------------------------------------------------ compile
@dataclass(frozen=True)
class _BuildPlan:
    """Everything that decides the cubin's bytes, and the commands that make it."""

    name: str
    src_dir: Path
    sources: tuple[str, ...]
    arch: str
    nvcc: str
    compile_flags: tuple[str, ...]
    nvshmem: NvshmemInstall | None

    def key(self) -> str:
        material = {
            "scheme": _SCHEME, "name": self.name, "sources": self.sources, "arch": self.arch,
            "flags": self.compile_flags, "nvcc": self.nvcc, "nvcc_version": nvcc_version(self.nvcc),
            "files": _hash_sources(self.src_dir),
            "nvshmem": self.nvshmem.fingerprint() if self.nvshmem else None,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def compile_cmd(self, source: str, obj: Path) -> list[str]:
        return [self.nvcc, *self.compile_flags, "-cubin", str(self.src_dir / source),
                "-o", str(obj)]

    def dlink_cmd(self, objs: Iterable[Path], cubin: Path) -> list[str]:
        lib = [str(self.nvshmem.device_lib)] if self.nvshmem else []
        return [self.nvcc, f"-arch=sm_{self.arch}", "-dlink", "-cubin",
                *map(str, objs), *lib, "-o", str(cubin)]


def _define_flag(key: str, value: Any) -> str:
    """``-DKEY=VALUE``; bools become 1/0 (C has no ``True``), None gives a bare ``-DKEY``."""
    if not re.fullmatch(r"[A-Za-z_]\w*", key):
        raise InputError(f"define name {key!r} is not a C identifier")
    if value is None:
        return f"-D{key}"
    if isinstance(value, bool):
        value = int(value)
    return f"-D{key}={value}"


def _plan(name, sources, nvshmem, arch, extra_flags, defines, src_dir) -> _BuildPlan:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise InputError(f"module name {name!r} must be letters, digits, '_', '.', '-' "
                         "(it names the cached file)")
    if isinstance(sources, str):
        sources = [sources]
    root = Path(src_dir).resolve() if src_dir is not None else kernels_dir()
    missing = [s for s in sources if not (root / s).is_file()]
    if not sources or missing:
        raise InputError(f"kernel sources {missing or list(sources)} not found in {root}")
    nvcc = find_nvcc()
    arch = resolve_arch(arch)
    nvshmem_install = find_nvshmem() if nvshmem else None
    flags = ["-rdc=true", "-O3", "-std=c++17", "-lineinfo",
             f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{root}"]
    if nvshmem_install:
        flags.append(f"-I{nvshmem_install.include}")
    # The constants host and device share (ep_comm.core.constants), on every compile: the .cuh
    # files read them and stop with #error without them. Part of the flags, so of the cache key.
    flags += [_define_flag(k, v) for k, v in sorted(device_defines().items())]
    flags += [_define_flag(k, v) for k, v in sorted((defines or {}).items())]
    flags += [str(f) for f in extra_flags]
    return _BuildPlan(name, root, tuple(sources), arch, nvcc, tuple(flags), nvshmem_install)


def _run_nvcc(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(cmd, (proc.stderr or "") + (proc.stdout or ""))


def _build(plan: _BuildPlan, out_cubin: Path, workdir: Path) -> dict:
    """Compile every source to a relocatable cubin (in parallel: NVSHMEM's headers alone take
    ~8 s a file), device-link them into ``out_cubin``; return the commands, for the record."""
    objs = [workdir / f"{i}_{Path(s).stem}.rdc.cubin" for i, s in enumerate(plan.sources)]
    cmds = [plan.compile_cmd(s, o) for s, o in zip(plan.sources, objs)]
    workers = max(1, min(len(cmds), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for fut in [pool.submit(_run_nvcc, c) for c in cmds]:
            fut.result()
    dlink = plan.dlink_cmd(objs, out_cubin)
    _run_nvcc(dlink)
    return {"compile": [shlex.join(c) for c in cmds], "dlink": shlex.join(dlink)}


def _build_into_cache(plan: _BuildPlan, cubin: Path) -> bool:
    """Make ``cubin`` exist; return True if it was already there (built by someone else).

    Built in a private temp dir inside the cache dir (same file system), then moved into place
    with ``os.replace``, so a reader never sees a half-written cubin; the lock keeps several
    ranks from compiling the same module at once.
    """
    root = _writable_cache_dir()
    with _file_lock(cubin.with_suffix(".lock")):
        if cubin.is_file():
            return True
        workdir = Path(tempfile.mkdtemp(prefix=f".{plan.name}-", dir=root))
        try:
            t0 = time.perf_counter()
            log.info("ep_comm: compiling %s (%s) for sm_%s into %s", plan.name,
                     ", ".join(plan.sources), plan.arch, root)
            record = _build(plan, workdir / "out.cubin", workdir)
            record["seconds"] = round(time.perf_counter() - t0, 2)
            (workdir / "out.json").write_text(json.dumps(record, indent=1))
            os.replace(workdir / "out.json", cubin.with_suffix(".json"))
            os.replace(workdir / "out.cubin", cubin)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        log.info("ep_comm: compiled %s in %.1f s", plan.name, time.perf_counter() - t0)
    return False


def compile_kernels(name: str, sources: Sequence[str], *, nvshmem: bool, arch: str | None = None,
                    extra_flags: Sequence[str] = (), defines: Mapping[str, Any] | None = None,
                    src_dir: str | os.PathLike | None = None) -> "CompiledModule":
    """Compile and device-link ``sources`` into one cubin, or reuse the cached one.

    Needs no GPU (loading happens later, on first use of the result), so this is also the
    compile-only check for CI.

    Args:
        name: module name; names the cached file (letters, digits, ``_.-``).
        sources: ``.cu`` file names in the kernel directory, e.g. ``["intranode.cu"]``; they are
            device-linked together, so one may call ``__device__`` functions of another.
        nvshmem: add NVSHMEM's include path and link ``libnvshmem_device.a``; required when a
            source includes ``nvshmem.h`` (see ``uses_nvshmem``).
        arch: e.g. ``"90a"``; None: ``EP_COMM_CUDA_ARCH``, the current GPU, else ``90a``.
        extra_flags: more nvcc flags for the compile step.
        defines: ``{"KEY": value}`` -> ``-DKEY=value`` (bool -> 1/0, None -> bare ``-DKEY``).
        src_dir: directory of the sources (tests, out-of-tree kernels); default ``kernels/``.

    The cache key is a sha256 of every ``.cu``/``.cuh``/``.h`` in the source directory, the
    flags, the arch, ``nvcc --version`` and the NVSHMEM install, so any of them changing
    rebuilds.

    Raises:
        ToolchainError: nvcc, or NVSHMEM when ``nvshmem=True``, not found.
        CompileError: nvcc failed; the message has the command and nvcc's output.
        CacheDirError: the cache directory cannot be written.
        InputError: bad name, missing source, bad arch or define.
    """
    plan = _plan(name, sources, nvshmem, arch, extra_flags, defines, src_dir)
    key = plan.key()
    cubin = cache_dir() / f"{name}-sm_{plan.arch}-{key[:24]}.cubin"
    from_cache = cubin.is_file() or _build_into_cache(plan, cubin)
    return CompiledModule(name=name, cubin_path=cubin, arch=plan.arch, nvshmem=nvshmem,
                          key=key, from_cache=from_cache)


def compile_all_kernels(arch: str | None = None) -> list["CompiledModule"]:
    """Compile every ``kernels/*.cu`` as a module of its own, with NVSHMEM where it is included.

    For CI and ``python -m ep_comm.tools.doctor``: a compile error anywhere shows up at once.
    """
    return [compile_kernels(Path(src).stem, [src], nvshmem=uses_nvshmem(src), arch=arch)
            for src in kernel_sources()]


def cache_info() -> dict:
    """What ``python -m ep_comm.tools.doctor`` reports about the compiler. Never raises.

    Keys: cache_dir, num_cubins, nvcc (path or None), nvcc_version, nvcc_error,
    nvshmem_include (path or None), nvshmem_version, nvshmem_error, arch.
    """
    root = cache_dir()
    info: dict[str, Any] = {"cache_dir": str(root),
                            "num_cubins": len(list(root.glob("*.cubin"))) if root.is_dir() else 0,
                            "nvcc": None, "nvcc_version": None, "nvcc_error": None,
                            "nvshmem_include": None, "nvshmem_version": None,
                            "nvshmem_error": None, "arch": None}
    try:
        info["nvcc"] = find_nvcc()
        lines = nvcc_version(info["nvcc"]).splitlines() or [""]
        info["nvcc_version"] = next((ln for ln in lines if "release" in ln), lines[-1]).strip()
    except JitError as e:
        info["nvcc_error"] = str(e)
    try:
        install = find_nvshmem()
        info["nvshmem_include"], info["nvshmem_version"] = str(install.include), install.version
    except JitError as e:
        info["nvshmem_error"] = str(e)
    try:
        info["arch"] = resolve_arch()
    except Exception as e:  # a broken CUDA setup must not stop the doctor's report
        info["arch"] = f"unknown ({e})"
    return info


# ---------------------------------------------------------------------- load and launch
class _Loaded:
    """One cubin loaded in this process: the cuda.core ObjectCode and what hangs off it."""

    def __init__(self, objcode):
        self.objcode = objcode
        self.kernels: dict[str, Any] = {}
        self.smem_limit: dict[tuple[str, int], int] = {}  # (kernel, device) -> bytes set
        self.nvshmem_obj = None  # NvshmemKernelObject once init_nvshmem() ran
        self.lock = threading.Lock()


_LOADED: dict[str, _Loaded] = {}
_LOADED_LOCK = threading.Lock()
_STREAMS: dict[int, Any] = {}


@functools.lru_cache(maxsize=1)
def cuda_core():
    """cuda.core's names (``cuda.core`` from 0.4/1.x, ``cuda.core.experimental`` before)."""
    try:
        import cuda.core as cc
        cc.ObjectCode  # noqa: B018 - old releases have the package but not the names
    except (ImportError, AttributeError):
        try:
            import cuda.core.experimental as cc
        except ImportError as e:
            raise ToolchainError("cuda.core is needed to load kernels: `pip install cuda-core` "
                                 f"(ep_comm's [gpu] extra). {DOCTOR_HINT}") from e
    return cc


def _nvshmem_core():
    try:
        import nvshmem.core
    except ImportError as e:
        raise ToolchainError("nvshmem4py is needed for NVSHMEM kernels: `pip install "
                             "nvshmem4py-cu13` (ep_comm's [gpu] extra). " + DOCTOR_HINT) from e
    return nvshmem.core


def _current_device() -> int:
    import torch
    return torch.cuda.current_device()


def _load(cubin_path: Path) -> _Loaded:
    key = str(cubin_path)
    loaded = _LOADED.get(key)  # every launch comes here: no lock once loaded
    if loaded is not None:
        return loaded
    with _LOADED_LOCK:
        loaded = _LOADED.get(key)
        if loaded is None:
            cc = cuda_core()
            # cuda.core needs a current context; this is the same primary context torch uses.
            cc.Device(_current_device()).set_current()
            objcode = cc.ObjectCode.from_cubin(cubin_path.read_bytes(), name=cubin_path.stem)
            loaded = _Loaded(objcode)
            _LOADED[key] = loaded
    return loaded


def _to_kernel_arg(arg: Any, index: int):
    """One launch argument as the numpy scalar cuda.core passes by value.

    The driver copies as many bytes as the kernel's parameter has, from the scalar we give, so
    the widths must match the C++ signature: a Python int becomes int32 (``int``), and a 64-bit
    parameter (``size_t``, ``int64_t``, ``uint64_t``) must be passed as ``np.uint64``/``np.int64``.
    """
    if hasattr(arg, "data_ptr"):  # a tensor: the common case first (host time per launch)
        if not arg.is_cuda:
            raise InputError(f"kernel argument {index} is a tensor on {arg.device}; kernels "
                             "need CUDA tensors")
        return np.uint64(arg.data_ptr())
    if isinstance(arg, np.generic):
        return arg
    if isinstance(arg, bool):
        return np.bool_(arg)
    if isinstance(arg, int):
        if not -2**31 <= arg < 2**31:
            raise InputError(f"kernel argument {index} = {arg} does not fit an int32; wrap it as "
                             "np.int64(...) or np.uint64(...) to match a 64-bit parameter")
        return np.int32(arg)
    if isinstance(arg, float):
        return np.float32(arg)
    if arg is None:
        return np.uint64(0)
    raise InputError(f"kernel argument {index} has type {type(arg).__name__}; pass a torch "
                     "tensor, None, bool, int, float or a numpy scalar")


def _stream(cc, stream):
    """A cuda.core Stream for ``stream``: None (torch's current stream), a torch stream, a raw
    ``cudaStream_t`` int, or a cuda.core Stream."""
    if stream is None:
        import torch
        # the raw handle of torch's current stream, straight from the C++ side:
        # torch.cuda.current_stream() resolves its device through a chain of Python calls
        # (is_available, an environment lookup) that cost more than the launch itself.
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        handle = (raw(torch.cuda.current_device()) if raw is not None
                  else torch.cuda.current_stream().cuda_stream)
    elif isinstance(stream, cc.Stream):
        return stream
    else:
        handle = int(getattr(stream, "cuda_stream", stream))
    wrapped = _STREAMS.get(handle)
    if wrapped is None:  # a wrapper does not own the stream, so keeping it is harmless
        wrapped = _STREAMS[handle] = cc.Stream.from_handle(handle)
    return wrapped


def _launch_config(cc, grid, block, shared_mem: int, cooperative: bool):
    kwargs = {"grid": grid, "block": block, "shmem_size": shared_mem}
    if not cooperative:
        return cc.LaunchConfig(**kwargs)
    try:
        return cc.LaunchConfig(**kwargs, is_cooperative=True)  # cuda.core >= 0.4
    except TypeError:
        return cc.LaunchConfig(**kwargs, cooperative_launch=True)


def _allow_dynamic_smem(loaded: _Loaded, name: str, kernel, nbytes: int) -> None:
    """Raise the kernel's dynamic shared memory limit (48 KiB unless asked) to ``nbytes``."""
    device = _current_device()
    if loaded.smem_limit.get((name, device), _DEFAULT_MAX_DYNAMIC_SMEM) >= nbytes:
        return
    from cuda.bindings import driver
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    err, = driver.cuKernelSetAttribute(attr, nbytes, kernel.handle, driver.CUdevice(device))
    if err != driver.CUresult.CUDA_SUCCESS:
        raise JitError(f"cannot give kernel {name} {nbytes} bytes of dynamic shared memory: "
                       f"{err.name} (the GPU's limit per block may be lower)")
    loaded.smem_limit[(name, device)] = nbytes


@dataclass(frozen=True)
class CompiledModule:
    """A compiled cubin in the cache, loaded into this process on first use.

    Attributes:
        name: module name.
        cubin_path: the cached cubin.
        arch: architecture it was built for, e.g. ``"90a"``.
        nvshmem: whether it links NVSHMEM (then call ``init_nvshmem()`` before launching).
        key: the sha256 cache key.
        from_cache: True if the cubin was already there (no compile in this call).
    """

    name: str
    cubin_path: Path
    arch: str
    nvshmem: bool
    key: str
    from_cache: bool

    def _loaded(self) -> _Loaded:
        try:
            return _load(self.cubin_path)
        except JitError:
            raise
        except Exception as e:
            raise JitError(f"cannot load module {self.name} ({self.cubin_path}, built for "
                           f"sm_{self.arch}) on this GPU: {e}. Set EP_COMM_CUDA_ARCH to the "
                           f"GPU's architecture if it is not sm_{self.arch}. {DOCTOR_HINT}") from e

    def _kernel(self, loaded: _Loaded, name: str):
        k = loaded.kernels.get(name)
        if k is None:
            with loaded.lock:
                try:
                    k = loaded.kernels[name] = loaded.objcode.get_kernel(name)
                except Exception as e:
                    raise JitError(f"kernel {name!r} not found or not loadable in module "
                                   f"{self.name} ({self.cubin_path}, sm_{self.arch}): {e}. Is "
                                   "it declared extern \"C\"?") from e
        return k

    def kernel(self, name: str):
        """The cuda.core ``Kernel`` named ``name`` (an ``extern "C"`` name). Needs a GPU."""
        return self._kernel(self._loaded(), name)

    def init_nvshmem(self) -> None:
        """Bind this module's NVSHMEM device state to the running NVSHMEM instance.

        Call after ``nvshmem.core.init(...)`` and before the first launch; a kernel that calls
        NVSHMEM without it reads uninitialised state and hangs or faults. A separate step so
        that the caller, who owns NVSHMEM's life cycle, decides when. NVSHMEM counts these
        calls; pair each with ``finalize_nvshmem()`` before ``nvshmem.core.finalize()``.
        """
        if not self.nvshmem:
            raise JitError(f"module {self.name} was compiled with nvshmem=False")
        nvshmem = _nvshmem_core()
        loaded = self._loaded()
        with loaded.lock:
            obj = nvshmem.NvshmemKernelObject.from_obj(loaded.objcode)
            nvshmem.library_init(obj)
            loaded.nvshmem_obj = obj

    def finalize_nvshmem(self) -> None:
        """Undo ``init_nvshmem()``; call before ``nvshmem.core.finalize()``."""
        loaded = self._loaded()
        with loaded.lock:
            if loaded.nvshmem_obj is not None:
                _nvshmem_core().library_finalize(loaded.nvshmem_obj)
                loaded.nvshmem_obj = None

    def launch(self, kernel_name: str, grid, block, args: Sequence[Any], stream=None,
               shared_mem: int = 0, cooperative: bool = False) -> None:
        """Launch ``kernel_name`` asynchronously, on torch's current stream by default.

        Args:
            grid, block: int or tuple of up to 3 ints.
            args: in the kernel's parameter order. Conversions: torch CUDA tensor -> its data
                pointer (uint64); None -> null pointer; bool -> ``bool``; Python int -> int32
                (an error if it does not fit); float -> float32; numpy scalars as they are, so
                wrap 64-bit values: ``np.uint64(n)`` for ``size_t``/``uint64_t``,
                ``np.int64(n)`` for ``int64_t``, ``np.float64(x)`` for ``double``.
            stream: None (torch's current stream), a torch.cuda.Stream, a raw handle, or a
                cuda.core Stream.
            shared_mem: dynamic shared memory bytes per block; above 48 KiB the kernel's limit
                is raised first (once per kernel and device).
            cooperative: launch as a cooperative kernel (grid-wide sync; all blocks resident).

        Raises:
            JitError: an NVSHMEM module whose ``init_nvshmem()`` has not run (it would hang).
            InputError: an argument that cannot be converted.
        """
        loaded = self._loaded()
        if self.nvshmem and loaded.nvshmem_obj is None:
            raise JitError(f"module {self.name} links NVSHMEM: call init_nvshmem() (after "
                           "nvshmem.core.init) before launching its kernels")
        cc = cuda_core()
        kernel = self._kernel(loaded, kernel_name)
        if shared_mem > _DEFAULT_MAX_DYNAMIC_SMEM:
            _allow_dynamic_smem(loaded, kernel_name, kernel, shared_mem)
        converted = [_to_kernel_arg(a, i) for i, a in enumerate(args)]
        config = _launch_config(cc, grid, block, shared_mem, cooperative)
        cc.launch(_stream(cc, stream), config, kernel, *converted)

    def prepare(self, kernel_name: str, arg_buffer, grid: int, block: int,
                shared_mem: int = 0) -> "PreparedLaunch":
        """A launch of ``kernel_name`` whose arguments are read from ``arg_buffer`` (anything
        with ``address``: the address of a ``void*[n]`` array, e.g.
        ``ep_comm.backends.kernels.args.ArgBuffer``) at each ``PreparedLaunch.launch``.

        The kernel is looked up, its shared memory limit raised and (for an NVSHMEM module) the
        init checked once, here; each launch is then one ``cuLaunchKernel`` call.
        """
        loaded = self._loaded()
        if self.nvshmem and loaded.nvshmem_obj is None:
            raise JitError(f"module {self.name} links NVSHMEM: call init_nvshmem() (after "
                           "nvshmem.core.init) before launching its kernels")
        kernel = self._kernel(loaded, kernel_name)
        if shared_mem > _DEFAULT_MAX_DYNAMIC_SMEM:
            _allow_dynamic_smem(loaded, kernel_name, kernel, shared_mem)
        native = (driver_entry("cuLaunchKernel"), driver_entry("cuStreamIsCapturing"),
                  int(kernel.handle))
        return PreparedLaunch(kernel_name, arg_buffer, grid, block, shared_mem,
                              _driver_launcher(kernel), native)

    def native_event_fns(self) -> tuple[int, int]:
        """(address of ``cuEventRecord``, address of ``cuEventSynchronize``): what the C++ host
        path's count wait calls (a recorder in the CPU tests' fake module)."""
        return driver_entry("cuEventRecord"), driver_entry("cuEventSynchronize")


def current_stream_handle(device_index: int) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``device_index``, from torch's C++
    side (``torch.cuda.current_stream()`` costs several microseconds of Python)."""
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


@functools.lru_cache(maxsize=None)
def driver_entry(symbol: str) -> int:
    """The address of the CUDA driver's ``symbol`` (``cuLaunchKernel``, ``cuStreamIsCapturing``)
    in libcuda, which torch has already loaded on a GPU machine: what the C++ host path
    (``ep_comm.runtime.host_ext``) calls, so that it need not link libcuda itself."""
    import ctypes
    lib = ctypes.CDLL("libcuda.so.1")
    return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value


def _driver_launcher(kernel):
    """``fn(prepared, stream_handle)`` that launches ``kernel`` (a cuda.core Kernel) with
    cuda.bindings' ``cuLaunchKernel`` on the prepared argument array."""
    from cuda.bindings import driver
    # A CUkernel (cuda.core loads libraries) may be launched as a CUfunction (CUDA >= 12.0).
    func = driver.CUfunction(int(kernel.handle))
    success = driver.CUresult.CUDA_SUCCESS
    streams: dict[int, Any] = {}
    cu_launch = driver.cuLaunchKernel

    def launch(p: "PreparedLaunch", stream: int) -> None:
        s = streams.get(stream)
        if s is None:
            s = streams[stream] = driver.CUstream(stream)
        err, = cu_launch(func, p.grid, 1, 1, p.block, 1, 1, p.shared_mem, s, p.args.address, 0)
        if err != success:
            raise JitError(f"cuLaunchKernel({p.name}, grid={p.grid}, block={p.block}, "
                           f"smem={p.shared_mem}) failed: {err.name}")

    return launch


class PreparedLaunch:
    """One kernel of a launch plan: its argument array (``args``), grid, block and shared
    memory, kept between calls. The caller patches ``args`` slots (and ``grid`` if it
    changes) and calls ``launch(stream_handle)``.

    ``launcher`` is ``fn(prepared, stream_handle)``: the cuLaunchKernel call on a GPU, a
    recorder in CPU tests and in ``bench/host_overhead.py --fake-gpu``.

    ``native`` is what the C++ host path (``ep_comm.runtime.host_ext``) launches with instead:
    (address of a ``cuLaunchKernel``-like function, address of a ``cuStreamIsCapturing``-like
    function or 0, the kernel handle), or None where there is none.
    """

    __slots__ = ("name", "args", "grid", "block", "shared_mem", "_launcher", "native")

    def __init__(self, name: str, args, grid: int, block: int, shared_mem: int, launcher,
                 native: "tuple[int, int, int] | None" = None):
        self.name, self.args, self.grid, self.block = name, args, grid, block
        self.shared_mem, self._launcher, self.native = shared_mem, launcher, native

    def launch(self, stream: int) -> None:
        """Launch asynchronously on the raw stream handle ``stream`` with the current args."""
        self._launcher(self, stream)
