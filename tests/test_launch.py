"""The documented launchers work: torchrun and mpirun (Buffer from an mpi4py communicator)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "launch", "demo.py")
BIN = os.path.dirname(sys.executable)


def _run(cmd, timeout=240, env=None):
    env = env or dict(os.environ, EP_COMM_TIMEOUT_S="60", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_demo_matches_dense_moe(nproc):
    out = _run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                DEMO, "--tokens", "24", "--hidden", "128", "--backend", "reference"])
    assert out.count("PASS") == nproc, out


def _mpirun():
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install 'ep_comm[mpi]')")
    mpirun = shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if mpirun is None:
        pytest.skip("no mpirun found (pip install 'ep_comm[mpi]' brings MPICH's)")
    extra = ["--allow-run-as-root"] if "Open MPI" in subprocess.run(
        [mpirun, "--version"], capture_output=True, text=True).stdout else []
    return [mpirun, *extra]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mpirun_demo_builds_buffer_from_mpi_comm():
    out = _run([*_mpirun(), "-np", "2", sys.executable, DEMO, "--mpi", "--tokens", "24",
                "--hidden", "128", "--backend", "reference"])
    assert out.count("PASS") == 2, out


def test_two_torchrun_nodes_on_localhost():
    """Multi-node launch as users run it: one torchrun per node, a shared rendezvous."""
    port = _free_port()
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


# ----------------------------------------------------------------------------- GPU
def _gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_env(num_ranks: int, visible: list[int] | None = None) -> dict:
    """Environment of a GPU launch: ranks beyond the GPU count share GPUs (gloo group with the
    Buffers on the GPUs: EP_COMM_GLOO_DEVICE=cuda; NCCL refuses two ranks on one GPU)."""
    env = dict(os.environ, EP_COMM_TIMEOUT_S="60")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, visible))
    if num_ranks > _gpus():
        env["EP_COMM_GLOO_DEVICE"] = "cuda"
    return env


gpu_only = pytest.mark.skipif(not _gpus(), reason="needs a CUDA GPU (run with -m gpu on the GPU machine)")


@pytest.mark.gpu
@gpu_only
def test_gpu_two_torchrun_nodes_run_the_internode_kernels():
    """Two torchrun invocations on localhost as two nodes, each with its own GPUs: node n sees
    the GPUs rotated by n * per_node (CUDA_VISIBLE_DEVICES), so its local rank 0 takes the node's
    first GPU while the peer GPUs stay visible for NVLink P2P. On one GPU both nodes share it."""
    g = _gpus()
    per_node = max(1, g // 2)
    port = _free_port()
    procs = []
    for n in range(2):
        first = (n * per_node) % g
        visible = [(first + i) % g for i in range(g)]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
             f"--nproc-per-node={per_node}", "--master-addr=127.0.0.1", f"--master-port={port}",
             DEMO, "--tokens", "96", "--hidden", "512", "--experts", "16", "--topk", "4",
             "--backend", "kernels", "--ranks-per-node", str(per_node)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env=_gpu_env(2 * per_node, visible)))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for n, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {n} exited {p.returncode}:\n{out[-4000:]}"
    joined = "".join(outs)
    assert joined.count("PASS") == 2 * per_node, joined
    assert joined.count("backend=kernels") == 2 * per_node and "of 2) backend" in joined, joined


@pytest.mark.gpu
@gpu_only
def test_gpu_mpirun_two_ranks_per_simulated_host_run_the_internode_kernels():
    """mpirun with 4 ranks as 2 simulated hosts x 2 ranks (ranks_per_node=2): the internode
    kernels with NVLink inside each host; ranks share GPUs where the machine has fewer than 4."""
    out = _run([*_mpirun(), "-np", "4", sys.executable, DEMO, "--mpi", "--tokens", "96",
                "--hidden", "512", "--experts", "16", "--topk", "4", "--backend", "kernels",
                "--ranks-per-node", "2"], timeout=300, env=_gpu_env(4))
    assert out.count("PASS") == 4, out
    assert out.count("backend=kernels") == 4 and "of 2) backend" in out, out
