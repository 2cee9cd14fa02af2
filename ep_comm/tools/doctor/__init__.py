"""``python -m ep_comm.tools.doctor``: can this machine run ep_comm, and if not, why not.

One module per thing it checks (``software``, ``gpu``, ``toolchain``, ``nvshmem``,
``roundtrip``), ``report`` for the table they fill, and ``cli`` for the command itself; its
docstring (and ``--help``) says what the command prints and when it fails.
"""
from ep_comm.tools.doctor.cli import collect, main
from ep_comm.tools.doctor.gpu import check_cuda, check_env, check_p2p
from ep_comm.tools.doctor.nvshmem import check_nics, check_nvshmem
from ep_comm.tools.doctor.report import FAIL, INFO, NA, PASS, WARN, Check, print_table
from ep_comm.tools.doctor.roundtrip import run_roundtrips, spawn_roundtrips
from ep_comm.tools.doctor.software import check_mpi, check_software
from ep_comm.tools.doctor.toolchain import check_compile, check_toolchain

__all__ = ["FAIL", "INFO", "NA", "PASS", "WARN", "Check", "check_compile", "check_cuda",
           "check_env", "check_mpi", "check_nics", "check_nvshmem", "check_p2p",
           "check_software", "check_toolchain", "collect", "main", "print_table",
           "run_roundtrips", "spawn_roundtrips"]
