"""Software versions (Python, torch, Triton, ep_comm) and MPI (``mpirun``, mpi4py)."""
from __future__ import annotations

import os
import platform
import re
import shutil
import sys

from ep_comm.tools.doctor.probes import error_line, first_line, run_cmd
from ep_comm.tools.doctor.report import INFO, WARN, Check


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


def _which(name: str) -> str | None:
    """``shutil.which`` that also looks next to this Python (an un-activated venv's bin/)."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which(name, path=path)


_MPI4PY_PROBE = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
                 "print(mpi4py.__version__); print(MPI.Get_library_version().splitlines()[0])")


def check_mpi(facts: dict) -> list[Check]:
    mpirun = _which("mpirun")
    version = None
    if mpirun:
        rc, out = run_cmd([mpirun, "--version"])
        m = re.search(r"^\s*Version:\s*(\S+)", out, re.M)  # MPICH's Hydra
        version = (f"MPICH/Hydra {m.group(1)}" if m else first_line(out)) if rc == 0 else \
            f"--version failed: {first_line(out)}"
    rc, out = run_cmd([sys.executable, "-c", _MPI4PY_PROBE], timeout=20)
    lines = out.splitlines()
    if rc == 0 and lines:
        mpi4py = {"version": lines[0],
                  "library": " ".join(lines[1].split()) if len(lines) > 1 else None}
    else:
        mpi4py = {"version": None, "error": error_line(out, 300)}
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
