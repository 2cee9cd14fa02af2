"""The documented launchers work: torchrun and mpirun (Buffer from an mpi4py communicator)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "launch", "demo.py")
BIN = os.path.dirname(sys.executable)


def _run(cmd, timeout=240):
    env = dict(os.environ, EP_COMM_TIMEOUT_S="60", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_demo_matches_dense_moe(nproc):
    out = _run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                DEMO, "--tokens", "24", "--hidden", "128", "--backend", "reference"])
    assert out.count("PASS") == nproc, out


def test_mpirun_demo_builds_buffer_from_mpi_comm():
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install 'ep_comm[mpi]')")
    mpirun = shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if mpirun is None:
        pytest.skip("no mpirun found (pip install 'ep_comm[mpi]' brings MPICH's)")
    extra = ["--allow-run-as-root"] if "Open MPI" in subprocess.run(
        [mpirun, "--version"], capture_output=True, text=True).stdout else []
    out = _run([mpirun, *extra, "-np", "2", sys.executable, DEMO, "--mpi", "--tokens", "24",
                "--hidden", "128", "--backend", "reference"])
    assert out.count("PASS") == 2, out


def test_two_torchrun_nodes_on_localhost():
    """Multi-node launch as users run it: one torchrun per node, a shared rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, EP_COMM_TIMEOUT_S="60", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
         "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}", DEMO,
         "--tokens", "24", "--hidden", "128", "--backend", "reference", "--ranks-per-node", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for n in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for n, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {n} exited {p.returncode}:\n{out[-3000:]}"
    joined = "".join(outs)
    assert joined.count("PASS") == 4 and "of 2) backend" in joined, joined
