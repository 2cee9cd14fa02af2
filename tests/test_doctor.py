"""``python -m ep_comm.tools.doctor``: it runs on a CPU machine, says clearly that there is no GPU,
passes on the reference backend, writes its JSON, and turns each setup failure it can see here
(nvcc missing, unwritable kernel cache, unavailable backend, a hanging rank, NVSHMEM transport
failures) into a named line and a nonzero exit code instead of a crash or a hang."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ep_comm.runtime import jit
from ep_comm.tools.doctor import nvshmem, report, roundtrip, software, toolchain

ROOT = Path(__file__).resolve().parent.parent


def _doctor(*args, env=None, timeout=120):
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "ep_comm.tools.doctor", *args], capture_output=True,
                       text=True, timeout=timeout, env=full_env, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr


def _line(out: str, name: str) -> str:
    """The table line of check ``section/name``."""
    hits = [ln for ln in out.splitlines() if ln.startswith(name + " ")]
    assert hits, f"no line {name!r} in:\n{out}"
    return hits[0]


def test_doctor_passes_on_cpu_reports_no_gpu_and_writes_json(tmp_path):
    json_path = tmp_path / "doctor.json"
    code, out = _doctor("--json", str(json_path))
    assert code == 0, out
    assert "no GPU" in _line(out, "gpu/CUDA")
    for mode in ("normal", "low_latency"):
        assert " pass " in _line(out, f"roundtrip/reference {mode}"), out
        assert "skipped: no GPU" in _line(out, f"roundtrip/kernels {mode}")
    assert "skipped: no GPU" in _line(out, "nvshmem/transport IBGDA")
    assert "OK: every check that applies passed" in out

    data = json.loads(json_path.read_text())
    assert data["ok"] is True and data["exit_code"] == 0
    for key in ("python", "torch", "triton", "cuda", "nvcc", "cache", "p2p", "nvshmem",
                "nics", "mpi", "roundtrip", "checks"):
        assert key in data, key
    assert data["cuda"]["available"] is False and data["cuda"]["device_count"] == 0
    assert set(data["cache"]) >= {"dir", "num_kernels", "writable"}
    assert set(data["nvshmem"]["transports"]) == {"P2P", "IBGDA", "IBRC", "UCX", "libfabric"}
    rows = {(r["backend"], r["mode"]): r for r in data["roundtrip"]["results"]}
    assert rows[("reference", "normal")]["status"] == "pass"
    assert rows[("reference", "low_latency")]["ms"] > 0
    assert rows[("kernels", "normal")]["status"] == "n/a"
    assert data["seconds"] < 30, f"the doctor took {data['seconds']} s on CPU"


def test_broken_nvcc_and_cache_settings_fail_with_their_names(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # root ignores permissions; a file in the path does not
    code, out = _doctor("--quick", env={"EP_COMM_NVCC": "/nonexistent/nvcc",
                                        "EP_COMM_CACHE_DIR": str(blocker / "kernels")})
    nvcc = _line(out, "compiler/nvcc")
    assert "FAIL" in nvcc and "EP_COMM_NVCC='/nonexistent/nvcc' is not an executable" in nvcc
    cache = _line(out, "compiler/kernel cache")
    assert "FAIL" in cache and "is not writable" in cache and "EP_COMM_CACHE_DIR" in cache
    assert "FAILED: 2 check(s): compiler/nvcc, compiler/kernel cache" in out
    assert code == 1


@pytest.fixture
def no_nvcc_anywhere(tmp_path, monkeypatch):
    """nvcc on none of the places find_nvcc looks: PATH, CUDA_HOME, /usr/local/cuda, wheel."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for var in ("EP_COMM_NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(jit, "_SYSTEM_CUDA_HOME", tmp_path / "no_cuda")
    monkeypatch.setattr(jit, "_pip_nvcc", lambda: None)
    jit.nvcc_version.cache_clear()


def test_nvcc_missing_from_path_fails_where_kernels_need_it(no_nvcc_anywhere):
    with_gpu = {c.name: c for c in toolchain.check_toolchain({}, have_gpu=True)}
    assert with_gpu["nvcc"].status == report.FAIL
    assert "nvcc (the CUDA compiler) was not found" in with_gpu["nvcc"].detail
    assert "pip install nvidia-cuda-nvcc" in with_gpu["nvcc"].detail
    without_gpu = {c.name: c for c in toolchain.check_toolchain({}, have_gpu=False)}
    assert without_gpu["nvcc"].status == report.WARN  # CPU users need no compiler


def test_nvcc_found_off_path_says_where(tmp_path, monkeypatch):
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.0'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("EP_COMM_NVCC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    jit.nvcc_version.cache_clear()
    facts = {}
    checks = {c.name: c for c in toolchain.check_toolchain(facts, have_gpu=True)}
    assert checks["nvcc"].status == report.PASS
    assert facts["nvcc"]["source"] == "CUDA_HOME" and str(fake) in checks["nvcc"].detail
    jit.nvcc_version.cache_clear()


def _kernels_roundtrip_on_cpu(ctx):
    events = []
    results = roundtrip.run_roundtrips(ctx.group, ctx.device, ["kernels"], events.append)
    return results, events


def test_unavailable_backend_is_a_failed_line_not_a_crash(cpu_ranks):
    per_rank = cpu_ranks(2).run(_kernels_roundtrip_on_cpu)
    for results, events in per_rank:
        assert [(r["backend"], r["mode"], r["status"]) for r in results] == [
            ("kernels", "normal", report.FAIL), ("kernels", "low_latency", report.FAIL)]
        assert all("backend unavailable" in r["detail"] for r in results)
        assert [e["event"] for e in events] == ["start", "result", "start", "result"]


def test_a_rank_that_hangs_is_reported_as_a_hang():
    events = [{"event": "ready", "rank": 0}, {"event": "ready", "rank": 1},
              {"event": "start", "rank": 0, "backend": "kernels", "mode": "normal"},
              {"event": "start", "rank": 1, "backend": "kernels", "mode": "normal"},
              {"event": "result", "rank": 0, "backend": "kernels", "mode": "normal",
               "status": report.PASS, "ms": 1.0, "first_ms": 2.0},
              {"event": "timeout", "seconds": 5}]
    rows = roundtrip.merge_events(events, 2, ["kernels"], "rank 1 log tail")
    assert rows[0]["status"] == report.FAIL
    assert "ranks [1] started but never finished" in rows[0]["detail"]
    assert "hang" in rows[0]["detail"]
    assert rows[1]["status"] == report.FAIL and "earlier check hung" in rows[1]["detail"]


def test_spawned_ranks_past_the_time_limit_are_killed_and_reported():
    t0 = time.monotonic()
    events, _ = roundtrip.spawn_roundtrips(2, False, ["reference"], timeout=0.5,
                                           ranks_per_node=None)
    assert time.monotonic() - t0 < 15
    rows = roundtrip.merge_events(events, 2, ["reference"], "")
    assert all(r["status"] == report.FAIL for r in rows)


def test_a_port_taken_before_rank_0_binds_it_is_tried_again(monkeypatch):
    """The free port the doctor picks may be taken by another process before rank 0's store
    binds it (the GPU suite's doctor beside test shards, session 17: every roundtrip failed
    with EADDRINUSE). The first pick here is a port another socket listens on."""
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    picks = [busy.getsockname()[1]]
    real = roundtrip._free_port
    monkeypatch.setattr(roundtrip, "_free_port", lambda: picks.pop(0) if picks else real())
    try:
        events, tails = roundtrip.spawn_roundtrips(2, False, ["reference"], timeout=120,
                                                   ranks_per_node=None)
    finally:
        busy.close()
    assert not picks  # the taken port was tried first
    rows = roundtrip.merge_events(events, 2, ["reference"], tails)
    assert rows and all(r["status"] == report.PASS for r in rows), rows


IBRC_FAILS = """\
vm:1:1 [0] NVSHMEM INFO PE 0 (process) affinity to 32 CPUs
/dvs/p4/build/src/modules/transport/ibrc/ibrc.cpp:1500: NULL value no active IB device found
vm:1:1 [0] NVSHMEM INFO init failed for remote transport: ibrc
EP_COMM_PROBE {"pe": 0, "ok": true, "n_pes": 2}
"""
IBGDA_WORKS = """\
vm:1:1 [0] NVSHMEM INFO Successfully initialized the transport: IBGDA. It will be used for \
device-side APIs over IB.
EP_COMM_PROBE {"pe": 0, "ok": true, "n_pes": 1}
"""


def test_nvshmem_probe_output_is_read_into_status_and_reason():
    ibrc = nvshmem.parse_probe("IBRC", [IBRC_FAILS], timed_out=False, timeout=30)
    assert ibrc["ok"] is False and "no active IB device" in ibrc["reason"]
    assert nvshmem.parse_probe("IBGDA", [IBGDA_WORKS], False, 30)["ok"] is True
    p2p = nvshmem.parse_probe("P2P", [IBRC_FAILS, IBRC_FAILS], False, 30)
    assert p2p["ok"] is True and "2 PE" in p2p["reason"]
    hung = nvshmem.parse_probe("P2P", ["", ""], timed_out=True, timeout=30)
    assert hung["ok"] is False and "did not finish within 30 s" in hung["reason"]
    crashed = nvshmem.parse_probe("UCX", ['EP_COMM_PROBE {"pe": 0, "ok": false, "error": '
                                          '"ImportError: no nvshmem"}'], False, 30)
    assert crashed["ok"] is False and "ImportError" in crashed["reason"]


def test_doctor_under_torchrun_uses_the_jobs_group():
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        "-m", "ep_comm.tools.doctor", "--nodes", "1"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert out.count("ep_comm doctor on") == 1, "only rank 0 prints the report"
    assert " pass " in _line(out, "roundtrip/nodes")
    assert "2 ranks on 1 node(s)" in _line(out, "roundtrip/reference low_latency")


def test_mpi4py_that_fails_to_import_is_reported_with_its_error(tmp_path, monkeypatch):
    """The probe runs in a subprocess, so a failing mpi4py is planted on its PYTHONPATH; the
    line must name the exception, not the first line of the traceback."""
    fake = tmp_path / "mpi4py"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        'raise ImportError("libmpi.so.40: cannot open shared object file")\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    facts = {}
    line = {c.name: c for c in software.check_mpi(facts)}["mpi4py"]
    assert line.status == report.WARN
    assert "ImportError: libmpi.so.40: cannot open shared object file" in line.detail, line.detail
    assert "Traceback" not in line.detail
    assert facts["mpi"]["mpi4py"]["error"] == \
        "ImportError: libmpi.so.40: cannot open shared object file"
