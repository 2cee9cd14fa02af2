"""Every kernel launch goes through a named argument table (ep_comm.backends.kernels.args):
each table must list its kernel's parameters in the .cu signature's order with the same C
kinds, so an argument can never shift by position. CPU only: the .cu files are parsed."""
from __future__ import annotations

import re

import numpy as np
import pytest

from ep_comm.backends.kernels import args
from ep_comm.errors import EpCommError

CASES = [(name, src, kernel) for name, (src, kernels, _) in args.TABLES.items()
         for kernel in kernels]


@pytest.mark.parametrize("table,source,kernel", CASES)
def test_table_matches_the_kernel_signature(table, source, kernel):
    sig = args.kernel_signature(args.kernel_source(source), kernel)
    assert sig == list(args.TABLES[table][2])


def test_every_extern_kernel_of_the_library_has_a_table():
    """A new kernel cannot be launched by position: it needs a table here first."""
    covered = {k for _, (_, kernels, _) in args.TABLES.items() for k in kernels}
    for source in ("layout.cu", "intranode.cu", "internode.cu", "low_latency.cu"):
        text = re.sub(r"//[^\n]*", "", args.kernel_source(source))
        declared = re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)'
                              r'\s+)?(\w+)\s*\(', text)
        assert declared, source
        assert set(declared) <= covered, set(declared) - covered


def test_parser_expands_parameter_macros_and_reads_64_bit_kinds():
    src = ("#define P_ARGS char *base, long long off, \\\n    int cap\n"
           "// k(int wrong) in a comment\n"
           'extern "C" __global__ void __launch_bounds__(128, 1)\n'
           "k(P_ARGS, const int* __restrict__ a, unsigned long long t, uint64_t u, int64_t v) {}\n")
    assert args.kernel_signature(src, "k") == [
        ("base", "p"), ("off", "i64"), ("cap", "i"), ("a", "p"), ("t", "u64"), ("u", "u64"),
        ("v", "i64")]


def test_parser_refuses_an_unknown_parameter_type():
    with pytest.raises(ValueError, match="unknown parameter type"):
        args.kernel_signature('extern "C" __global__ void k(float f) {}', "k")


def test_dispatch_args_macro_passes_every_parameter_in_order():
    """The low-latency argument struct is filled from the parameters in declaration order."""
    src = args.kernel_source("low_latency.cu").replace("\\\n", " ")
    body = src[src.index("#define EP_LL_DISPATCH_ARGS"):]
    body = body[body.index("{") + 1:body.index("}")]
    names = [n.strip().split()[0] for n in body.split(",")]
    cleaned = [n.replace("!=", "").strip() for n in names]
    assert cleaned == [n for n, _ in args.LL_DISPATCH]


def test_inter_regions_macro_passes_every_parameter_in_order():
    src = args.kernel_source("internode.cu").replace("\\\n", " ")
    body = src[src.index("#define EP_INTER_REGIONS "):]
    body = body[body.index("{") + 1:body.index("}")]
    assert [n.strip() for n in body.split(",")] == [n for n, _ in args.INTER_REGIONS]


def test_pack_gives_the_numpy_scalar_of_each_kind():
    values = {n: (1 << 40) + i if k in ("p", "u64", "i64") else i
              for i, (n, k) in enumerate(args.NVL_DISPATCH)}
    packed = args.pack(args.NVL_DISPATCH, values)
    want = {"i": np.int32, "i64": np.int64, "p": np.uint64, "u64": np.uint64}
    for (name, kind), v in zip(args.NVL_DISPATCH, packed):
        assert isinstance(v, want[kind]), name
        assert int(v) == values[name]


def test_pack_rejects_missing_unknown_and_out_of_range():
    values = {n: 0 for n, _ in args.LL_DISPATCH}
    with pytest.raises(EpCommError, match="missing"):
        args.pack(args.LL_DISPATCH, {k: v for k, v in values.items() if k != "x"})
    with pytest.raises(EpCommError, match="unknown"):
        args.pack(args.LL_DISPATCH, dict(values, bogus=1))
    with pytest.raises(EpCommError, match="int32"):
        args.pack(args.LL_DISPATCH, dict(values, hidden=2**31))
    with pytest.raises(EpCommError, match="uint64"):
        args.pack(args.LL_DISPATCH, dict(values, x=-1))


def test_arg_buffer_holds_each_value_at_its_slot_with_its_width():
    import ctypes
    values = {n: (1 << 40) + i if k in ("p", "u64", "i64") else -i
              for i, (n, k) in enumerate(args.INTER_DISPATCH)}
    buf = args.ArgBuffer(args.INTER_DISPATCH, values)
    ctype = {"i": ctypes.c_int32, "i64": ctypes.c_int64, "p": ctypes.c_uint64,
             "u64": ctypes.c_uint64}
    for i, (name, kind) in enumerate(args.INTER_DISPATCH):
        assert ctypes.cast(buf.pointers[i], ctypes.POINTER(ctype[kind])).contents.value == \
            values[name], name
    buf.set("x", 0xABC0)
    buf.set("T", 77)
    assert buf.values()["x"] == 0xABC0 and buf.values()["T"] == 77
    with pytest.raises(EpCommError, match="int32"):
        buf.set("T", 2**31)
    with pytest.raises(EpCommError, match="unknown"):
        buf.set("bogus", 1)


def test_call_signature_argument_is_one_struct_of_int32_words():
    """``CallSig sig`` parses as kind "sig"; its slot holds CALL_SIG_WORDS int32 contiguously
    (the struct the kernel receives by value), patched and range-checked as a whole."""
    import ctypes
    from ep_comm.core.constants import CALL_SIG_WORDS
    src = 'extern "C" __global__ void k(int a, CallSig sig) {}'
    assert args.kernel_signature(src, "k") == [("a", "i"), ("sig", "sig")]
    words = list(range(-3, CALL_SIG_WORDS - 3))
    values = {n: 0 for n, _ in args.NVL_NOTIFY}
    values["sig"] = words
    buf = args.ArgBuffer(args.NVL_NOTIFY, values)
    i = [n for n, _ in args.NVL_NOTIFY].index("sig")
    raw = ctypes.cast(buf.pointers[i], ctypes.POINTER(ctypes.c_int32 * CALL_SIG_WORDS)).contents
    assert list(raw) == words and ctypes.sizeof(raw) == 4 * CALL_SIG_WORDS
    buf.set("sig", [7] * CALL_SIG_WORDS)
    assert buf.values()["sig"] == [7] * CALL_SIG_WORDS
    with pytest.raises(EpCommError, match="int32 words"):
        buf.set("sig", [1] * (CALL_SIG_WORDS - 1))
    with pytest.raises(EpCommError, match="int32 words"):
        buf.set("sig", [2**31] * CALL_SIG_WORDS)
