"""The run-time kernel compiler (ep_comm/jit.py): every kernel file compiles for sm_90a, the
on-disk cache is hit and shared safely by concurrent ranks, and every failure names its cause.

CPU-only except the tests marked ``gpu``. Cache and concurrency tests use a trivial kernel in a
temporary source directory so that they stay fast and never depend on the real kernels.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from ep_comm.runtime import jit

ARCH = "90a"


def _nvcc_or_none() -> str | None:
    try:
        return jit.find_nvcc()
    except jit.ToolchainError:
        return None


def _nvshmem_or_none():
    try:
        return jit.find_nvshmem()
    except jit.ToolchainError:
        return None


NVCC = _nvcc_or_none()
NVSHMEM = _nvshmem_or_none()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (see ep_comm.runtime.jit.find_nvcc)")
needs_nvshmem = pytest.mark.skipif(
    NVSHMEM is None, reason="NVSHMEM headers not found: pip install nvidia-nvshmem-cu13")

TRIVIAL_CU = """\
#include "trivial.cuh"
extern "C" __global__ void trivial_fill(int* out) { out[threadIdx.x] = TRIVIAL_VALUE; }
"""
TRIVIAL_CUH = "#define TRIVIAL_VALUE 3\n"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty kernel cache for this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EP_COMM_CACHE_DIR", str(path))
    return path


@pytest.fixture
def src(tmp_path) -> Path:
    """A source directory holding a trivial kernel and the header it includes."""
    path = tmp_path / "src"
    path.mkdir()
    (path / "trivial.cu").write_text(TRIVIAL_CU)
    (path / "trivial.cuh").write_text(TRIVIAL_CUH)
    return path


def _compile_trivial(src: Path, **kw) -> jit.CompiledModule:
    return jit.compile_kernels("trivial", ["trivial.cu"], nvshmem=False, arch=ARCH, src_dir=src,
                               **kw)


def _is_cubin(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == b"\x7fELF"


# ----------------------------------------------------------- every kernel file compiles
@pytest.mark.parametrize("source", jit.kernel_sources())
def test_every_kernel_file_compiles_for_sm90a(source, cache):
    if NVCC is None:
        pytest.skip("nvcc not found: cannot check that the kernels compile")
    nvshmem = jit.uses_nvshmem(source)
    if nvshmem and NVSHMEM is None:
        pytest.skip(f"{source} includes nvshmem.h but NVSHMEM headers are not installed")
    module = jit.compile_kernels(Path(source).stem, [source], nvshmem=nvshmem, arch=ARCH)
    assert _is_cubin(module.cubin_path)
    assert module.arch == ARCH and not module.from_cache


# --------------------------------------------------------------------------------- cache
@needs_nvcc
def test_second_compile_is_a_cache_hit(src, cache):
    first = _compile_trivial(src)
    mtime = first.cubin_path.stat().st_mtime_ns
    second = _compile_trivial(src)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.cubin_path == first.cubin_path
    assert second.cubin_path.stat().st_mtime_ns == mtime
    assert list(cache.glob("*.cubin")) == [first.cubin_path]
    assert first.cubin_path.with_suffix(".json").is_file()  # the commands that built it


@needs_nvcc
def test_editing_an_included_header_recompiles(src, cache):
    first = _compile_trivial(src)
    (src / "trivial.cuh").write_text("#define TRIVIAL_VALUE 4\n")
    second = _compile_trivial(src)
    assert not second.from_cache and second.cubin_path != first.cubin_path


@needs_nvcc
def test_defines_and_flags_are_part_of_the_cache_key(src, cache):
    base = _compile_trivial(src)
    defined = _compile_trivial(src, defines={"EXTRA": 1})
    flagged = _compile_trivial(src, extra_flags=["-Xptxas=-v"])
    assert len({base.cubin_path, defined.cubin_path, flagged.cubin_path}) == 3
    assert not defined.from_cache and not flagged.from_cache


def _compile_in_child(cache_dir: str, src_dir: str, barrier, results) -> None:
    """One 'rank': wait for the others, then compile the same module as they do."""
    os.environ["EP_COMM_CACHE_DIR"] = cache_dir
    try:
        barrier.wait(timeout=60)
        module = _compile_trivial(Path(src_dir))
        results.put(("ok", module.from_cache, str(module.cubin_path)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put(("error", traceback.format_exc(), None))


@needs_nvcc
def test_concurrent_ranks_compile_once_and_share_one_cubin(src, cache):
    ctx = multiprocessing.get_context("spawn")
    n = 3  # each child imports torch (through ep_comm): more would only slow a 2-core CI
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_compile_in_child, args=(str(cache), str(src), barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [detail for status, detail, _ in outcomes if status != "ok"]
    assert not errors, "\n".join(errors)
    assert sorted(from_cache for _, from_cache, _ in outcomes) == [False] + [True] * (n - 1)
    assert len({path for _, _, path in outcomes}) == 1
    assert [p.name for p in cache.glob("*.cubin")] == [Path(outcomes[0][2]).name]
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no temp dirs left behind


@needs_nvcc
@needs_nvshmem
def test_nvshmem_kernel_is_device_linked_with_libnvshmem_device(tmp_path, cache):
    (tmp_path / "pe.cu").write_text(
        "#include <nvshmem.h>\n"
        'extern "C" __global__ void my_pe(int* out) { *out = nvshmem_my_pe(); }\n')
    assert jit.uses_nvshmem("pe.cu", src_dir=tmp_path)
    module = jit.compile_kernels("pe", ["pe.cu"], nvshmem=True, arch=ARCH, src_dir=tmp_path)
    assert _is_cubin(module.cubin_path) and module.nvshmem
    # The device state lives in libnvshmem_device.a: present only if the device link took it.
    assert b"nvshmemi_device_state" in module.cubin_path.read_bytes()


# -------------------------------------------------------------------------------- errors
@needs_nvcc
def test_syntax_error_reports_nvcc_command_and_message(tmp_path, cache):
    (tmp_path / "bad.cu").write_text('extern "C" __global__ void bad(int* out) { *out = 1 }\n')
    with pytest.raises(jit.CompileError) as info:
        jit.compile_kernels("bad", ["bad.cu"], nvshmem=False, arch=ARCH, src_dir=tmp_path)
    message = str(info.value)
    assert 'expected a ";"' in message  # nvcc's own diagnostic
    assert "-rdc=true" in message and str(tmp_path / "bad.cu") in message  # the command
    assert not list(cache.glob("*.cubin"))
    assert not [p for p in cache.iterdir() if p.is_dir()]


@needs_nvcc
def test_unwritable_cache_dir_is_a_clear_error(src, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = blocker / "cache"  # a directory cannot be made under a file, even by root
    monkeypatch.setenv("EP_COMM_CACHE_DIR", str(bad))
    with pytest.raises(jit.CacheDirError) as info:
        _compile_trivial(src)
    assert str(bad) in str(info.value) and "EP_COMM_CACHE_DIR" in str(info.value)


@needs_nvcc
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_cache_dir_is_a_clear_error(src, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    monkeypatch.setenv("EP_COMM_CACHE_DIR", str(ro))
    with pytest.raises(jit.CacheDirError, match="EP_COMM_CACHE_DIR"):
        _compile_trivial(src)


def test_missing_nvcc_named_by_env_is_a_clear_error(src, tmp_path, monkeypatch):
    monkeypatch.setenv("EP_COMM_NVCC", str(tmp_path / "no" / "nvcc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(jit.ToolchainError) as info:
        _compile_trivial(src)
    message = str(info.value)
    assert "EP_COMM_NVCC" in message and "ep_comm.tools.doctor" in message
    assert "pip install nvidia-cuda-nvcc" in message


def test_nvcc_found_nowhere_is_a_clear_error(src, tmp_path, monkeypatch):
    for var in ("EP_COMM_NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(jit, "_SYSTEM_CUDA_HOME", tmp_path / "no_cuda")
    monkeypatch.setattr(jit, "_pip_nvcc", lambda: None)
    with pytest.raises(jit.ToolchainError, match="nvcc .* was not found.*ep_comm.tools.doctor"):
        _compile_trivial(src)


def test_nvcc_is_taken_from_the_env_var_first(tmp_path, monkeypatch):
    fake = tmp_path / "my-nvcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("EP_COMM_NVCC", str(fake))
    assert jit.find_nvcc() == str(fake)


@needs_nvcc
def test_missing_nvshmem_is_a_clear_error(src, tmp_path, monkeypatch, cache):
    monkeypatch.setenv("NVSHMEM_HOME", str(tmp_path / "no_nvshmem"))
    with pytest.raises(jit.ToolchainError) as info:
        jit.compile_kernels("trivial", ["trivial.cu"], nvshmem=True, arch=ARCH, src_dir=src)
    assert "NVSHMEM_HOME" in str(info.value) and "nvidia-nvshmem-cu13" in str(info.value)


def test_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(jit.InputError, match="nope.cu"):
        jit.compile_kernels("x", ["nope.cu"], nvshmem=False, arch=ARCH, src_dir=tmp_path)


# ------------------------------------------------------------------------ small helpers
@pytest.mark.parametrize("given, expected", [("90a", "90a"), ("sm_90a", "90a"),
                                             ("compute_80", "80"), ("sm_100f", "100f")])
def test_arch_from_env_var(given, expected, monkeypatch):
    monkeypatch.setenv("EP_COMM_CUDA_ARCH", given)
    assert jit.resolve_arch() == expected
    assert jit.resolve_arch("89") == "89"  # an explicit argument wins


def test_bad_arch_is_an_input_error(monkeypatch):
    monkeypatch.setenv("EP_COMM_CUDA_ARCH", "hopper")
    with pytest.raises(jit.InputError, match="EP_COMM_CUDA_ARCH"):
        jit.resolve_arch()


def test_uses_nvshmem_follows_local_headers(tmp_path):
    (tmp_path / "common.cuh").write_text("#pragma once\n#include <nvshmemx.h>\n")
    (tmp_path / "a.cu").write_text('#include "common.cuh"\n')
    (tmp_path / "b.cu").write_text("// #include <nvshmem.h> is only mentioned here\n")
    (tmp_path / "nvshmem_free.cuh").write_text("")
    (tmp_path / "c.cu").write_text('#include "nvshmem_free.cuh"\n')  # a local header, not NVSHMEM
    assert [jit.uses_nvshmem(s, tmp_path) for s in ("a.cu", "b.cu", "c.cu")] == [True, False, False]
    assert jit.kernel_sources(tmp_path) == ["a.cu", "b.cu", "c.cu"]


def test_launch_arguments_follow_the_documented_conventions():
    torch = pytest.importorskip("torch")
    convert = jit._to_kernel_arg
    assert convert(5, 0).dtype == np.int32 and convert(5, 0) == 5
    assert convert(np.uint64(2**40), 0).dtype == np.uint64  # numpy scalars pass through
    assert convert(True, 0).dtype == np.bool_
    assert convert(0.5, 0).dtype == np.float32
    assert convert(None, 0) == np.uint64(0)
    with pytest.raises(jit.InputError, match="np.int64"):
        convert(2**31, 3)
    with pytest.raises(jit.InputError, match="CUDA tensors"):
        convert(torch.zeros(1), 1)
    with pytest.raises(jit.InputError, match="type str"):
        convert("x", 2)


class _FakeCudaCore:
    """Stands in for cuda.core so that the launch plumbing is checked without a GPU."""

    def __init__(self):
        self.launches, self.streams = [], []
        fake = self

        class Device:
            def __init__(self, ordinal):
                self.ordinal = ordinal

            def set_current(self):
                pass

        class Kernel:
            handle = object()

        class ObjectCode:
            @staticmethod
            def from_cubin(data, name=""):
                return ObjectCode()

            def get_kernel(self, name):
                if name != "k":
                    raise RuntimeError("CUDA_ERROR_NOT_FOUND")
                return Kernel()

        class Stream:
            @staticmethod
            def from_handle(handle):
                fake.streams.append(handle)
                return Stream()

        class LaunchConfig:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        self.Device, self.ObjectCode, self.Stream, self.LaunchConfig = (
            Device, ObjectCode, Stream, LaunchConfig)

    def launch(self, stream, config, kernel, *args):
        self.launches.append((config.kwargs, args))


def _fake_module(tmp_path, monkeypatch, nvshmem=False):
    fake = _FakeCudaCore()
    monkeypatch.setattr(jit, "cuda_core", lambda: fake)
    monkeypatch.setattr(jit, "_current_device", lambda: 0)
    monkeypatch.setattr(jit, "_LOADED", {})
    monkeypatch.setattr(jit, "_STREAMS", {})
    smem_calls = []
    monkeypatch.setattr(jit, "_allow_dynamic_smem", lambda *a: smem_calls.append(a[-1]))
    cubin = tmp_path / "fake.cubin"
    cubin.write_bytes(b"\x7fELF")
    module = jit.CompiledModule("fake", cubin, ARCH, nvshmem, "0" * 64, True)
    return module, fake, smem_calls


def test_launch_converts_arguments_and_builds_the_config(tmp_path, monkeypatch):
    module, fake, smem_calls = _fake_module(tmp_path, monkeypatch)
    module.launch("k", (4, 1), 128, (np.uint64(7), 3, None), stream=1234, shared_mem=1024)
    module.launch("k", 1, 32, (), stream=1234, shared_mem=100 * 1024, cooperative=True)
    (config, args), (config2, _) = fake.launches
    assert config == {"grid": (4, 1), "block": 128, "shmem_size": 1024}
    assert [a.dtype for a in args] == [np.uint64, np.int32, np.uint64] and args[2] == 0
    assert config2["is_cooperative"] and config2["shmem_size"] == 100 * 1024
    assert smem_calls == [100 * 1024]  # only above 48 KiB
    assert fake.streams == [1234]  # the stream wrapper is made once per handle
    with pytest.raises(jit.JitError, match="extern"):
        module.launch("missing", 1, 1, ())


def test_nvshmem_module_refuses_to_launch_before_init_nvshmem(tmp_path, monkeypatch):
    module, _, _ = _fake_module(tmp_path, monkeypatch, nvshmem=True)
    with pytest.raises(jit.JitError, match="init_nvshmem"):
        module.launch("k", 1, 1, ())


def test_cache_info_reports_dir_cubins_and_toolchain(cache):
    info = jit.cache_info()
    assert info["cache_dir"] == str(cache) and info["num_cubins"] == 0
    assert (info["nvcc"] is None) == (NVCC is None)
    assert info["nvshmem_include"] == (str(NVSHMEM.include) if NVSHMEM else None)


def test_import_needs_neither_cuda_core_nor_nvshmem():
    code = ("import sys; sys.modules['cuda'] = None; sys.modules['nvshmem'] = None; "
            "import ep_comm.runtime.jit")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# ----------------------------------------------------------------------------- GPU only
def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


needs_gpu = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")


@pytest.fixture
def selftest(cache):
    return jit.compile_kernels("jit_selftest", ["_jit_selftest.cu"], nvshmem=False,
                               defines={"JIT_SELFTEST_VALUE": 42})


@pytest.mark.gpu
@needs_gpu
def test_gpu_launch_pointer_int_and_64bit_arguments(selftest):
    import torch
    out = torch.zeros(1000, dtype=torch.int32, device="cuda")
    selftest.launch("jit_selftest_fill", grid=4, block=128, args=(out, out.numel(), 9))
    pair = torch.zeros(2, dtype=torch.int64, device="cuda")
    selftest.launch("jit_selftest_add64", 1, 32, (pair, np.uint64(2**40), np.int64(-3)))
    torch.cuda.synchronize()
    assert bool((out == 9).all())
    assert pair.tolist() == [2**40 - 3, 42]


@pytest.mark.gpu
@needs_gpu
def test_gpu_launch_with_more_than_48k_dynamic_shared_memory(selftest):
    import torch
    n_words = 24 * 1024  # 96 KiB
    out = torch.zeros(n_words, dtype=torch.int32, device="cuda")
    selftest.launch("jit_selftest_smem", 1, 256, (out, n_words), shared_mem=4 * n_words)
    torch.cuda.synchronize()
    assert torch.equal(out, torch.arange(n_words - 1, -1, -1, dtype=torch.int32, device="cuda"))


@pytest.mark.gpu
@needs_gpu
def test_gpu_launch_on_a_side_stream_and_cooperative(selftest):
    import torch
    out = torch.zeros(256, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the default follows torch's current stream
        selftest.launch("jit_selftest_fill", 2, 64, (out, 256, 5))
    selftest.launch("jit_selftest_fill", 2, 64, (out, 128, 6), stream=side, cooperative=True)
    side.synchronize()
    assert out[:128].eq(6).all() and out[128:].eq(5).all()
