"""The C++ host extension: compiled at first use into the kernel cache, like the cubins.

Issue #22 allows a small C++ extension for the host-path targets Python cannot reach; the
low-latency calls are that case (docs/host_path.md has the profile). This module builds
``kernels/host/*.cpp`` with ``torch.utils.cpp_extension.load`` (g++ and ninja; ~20 s once per
source, torch and Python version), into ``cache_dir()/host/<hash>``, and loads it. Nothing is
compiled at install, and nothing here runs at import.

The extension is used only where it loads: where it cannot be built (no compiler, no ninja) or
``EP_COMM_HOST_EXT=0`` is set, the Python path runs every call, and a failed build says so once
(a warning with the reason; ``python -m ep_comm.doctor`` shows it too). It never changes a
result: the Python path stays the validator and the reference of every step.

Public functions:
    load(name) -> module or None: the extension built from ``kernels/host/<name>.cpp``.
    status(name) -> str: "loaded", "off (EP_COMM_HOST_EXT=0)" or why it did not build.
    cached(name) -> Path or None: the built extension, if the cache holds it.
    tools_missing() -> list[str]: what the build needs and this machine lacks.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

from ep_comm.runtime import jit

#: ``0`` keeps every call on the Python host path (the extension is neither built nor used).
HOST_EXT_ENV = "EP_COMM_HOST_EXT"

_lock = threading.Lock()
_loaded: dict[str, object] = {}
_why_not: dict[str, str] = {}


def enabled() -> bool:
    """False under ``EP_COMM_HOST_EXT=0``."""
    return os.environ.get(HOST_EXT_ENV, "1") != "0"


def source_path(name: str) -> Path:
    return Path(jit.kernels_dir()).parent / "host" / f"{name}.cpp"


def _build_dir(name: str, source: bytes) -> tuple[str, Path]:
    import torch
    key = hashlib.sha256(source + f"|{torch.__version__}|{sys.version_info[:2]}|-O2".encode())
    digest = key.hexdigest()[:16]
    return f"ep_comm_{name}_{digest}", jit.cache_dir() / "host" / digest


def load(name: str):
    """The extension module of ``kernels/host/<name>.cpp``, built on first use, or None (off,
    or the build failed: ``status(name)`` says why, and the first failure warns)."""
    if not enabled():  # read at each load (once per Buffer), so a test or a job can switch
        return None
    mod = _loaded.get(name)
    if mod is not None or name in _why_not:
        return mod
    with _lock:
        if name in _loaded or name in _why_not:
            return _loaded.get(name)
        try:
            src = source_path(name)
            mod_name, build = _build_dir(name, src.read_bytes())
            build.mkdir(parents=True, exist_ok=True)
            # Our own flock (dropped by the kernel when its holder dies), not only
            # cpp_extension's lock file, which a process killed mid-build leaves behind and
            # every later load then waits on forever. A built module is imported directly.
            with jit._file_lock(build / "ep_comm.lock"):
                built = cached(name)
                if built is None:
                    from torch.utils import cpp_extension
                    stale = build / "lock"
                    if stale.exists():
                        stale.unlink()  # we hold the flock: nobody else is building
                    cpp_extension.load(mod_name, [str(src)], build_directory=str(build),
                                       extra_cflags=["-O2"], verbose=False)
                    built = cached(name)
                mod = _import(mod_name, built)
        except Exception as e:  # any build failure: the Python path runs, and says so once
            _why_not[name] = f"not built: {type(e).__name__}: {str(e).strip()[:400]}"
            warnings.warn(f"ep_comm: the C++ host path {name} could not be built, the calls use "
                          f"the Python host path ({_why_not[name]})", RuntimeWarning,
                          stacklevel=2)
            return None
        _loaded[name] = mod
        return mod


def _import(mod_name: str, path: Path | None):
    """The module ``mod_name`` from the shared object ``path`` (torch first: it needs libtorch)."""
    import importlib.util
    import torch  # noqa: F401  (loads the libraries the extension links)
    if path is None:
        raise ImportError(f"the build left no {mod_name}*.so")
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[mod_name] = mod
    return mod


def tools_missing() -> list[str]:
    """What the build needs and this machine lacks (a C++ compiler, ninja)."""
    import shutil
    missing = [] if (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")) else [
        "a C++ compiler (c++ / g++)"]
    try:
        from torch.utils.cpp_extension import is_ninja_available
        ninja = is_ninja_available()
    except ImportError:
        ninja = bool(shutil.which("ninja"))
    return missing + ([] if ninja else ["ninja (pip install ninja)"])


def cached(name: str) -> Path | None:
    """The built extension of ``kernels/host/<name>.cpp`` in the cache, if it is there."""
    mod_name, build = _build_dir(name, source_path(name).read_bytes())
    found = sorted(build.glob(f"{mod_name}*.so")) if build.is_dir() else []
    return found[0] if found else None


def status(name: str) -> str:
    """How the extension ``name`` stands in this process: "loaded", "not loaded yet", or why
    it is not used."""
    if not enabled():
        return f"off ({HOST_EXT_ENV}=0)"
    if name in _loaded:
        return "loaded"
    return _why_not.get(name, "not loaded yet")


__all__ = ["HOST_EXT_ENV", "enabled", "load", "status", "source_path",
           "tools_missing", "cached"]
