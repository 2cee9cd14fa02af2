"""Named argument tables of the CUDA kernels: the one convention of every kernel launch.

A table lists a kernel's parameters in signature order, each with its C kind: ``"p"`` a
pointer (passed as uint64), ``"i"`` an ``int`` (int32), ``"i64"`` a ``long long``, ``"u64"`` a
``uint64_t``. A launch builds a ``{name: value}`` dict and ``pack`` turns it into the numpy
scalars cuda.core passes by value, refusing a missing, unknown or out-of-range argument.
``tests/test_kernel_args.py`` parses each .cu file and checks every table against the
kernel's signature (``kernel_signature``), so an argument can never shift by position.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ep_comm.errors import EpCommError

# Kernel parameters in signature order (kernels/low_latency.cu EP_LL_LL_DISPATCH and
# ep_ll_combine), each with its C kind: "p" pointer (uint64), "i" int (int32), "u64" uint64_t.
# tests/test_low_latency_host.py parses the .cu file and checks both lists against it.
LL_DISPATCH = (
    ("x", "p"), ("topk_idx", "p"), ("num_tokens", "i"), ("num_topk", "i"), ("hidden", "i"),
    ("num_experts", "i"), ("num_ranks", "i"), ("rank", "i"), ("max_tokens", "i"),
    ("round_scale", "i"), ("ue8m0", "i"), ("nvlink", "i"), ("phases", "i"),
    ("send_stage", "p"), ("recv_msgs", "p"), ("recv_count_sig", "p"), ("recv_arrive_sig", "p"),
    ("msg_stride", "i"), ("mask", "p"), ("recv_x", "p"), ("recv_scales", "p"),
    ("src_info", "p"), ("range_begin", "p"), ("range_count", "p"), ("recv_count", "p"),
    ("cum_stats", "p"), ("wait_stats", "p"), ("host_status", "p"), ("status_claim", "p"),
    ("timeout_ns", "u64"),
)
LL_COMBINE = (
    ("x", "p"), ("zero_copy", "i"), ("src_info", "p"), ("range_begin", "p"),
    ("range_count", "p"), ("topk_idx", "p"), ("topk_weights", "p"), ("out", "p"),
    ("num_tokens", "i"), ("num_topk", "i"), ("hidden", "i"), ("num_experts", "i"),
    ("num_ranks", "i"), ("rank", "i"), ("max_tokens", "i"), ("nvlink", "i"), ("phases", "i"),
    ("send_stage", "p"), ("recv_rows", "p"), ("recv_count_sig", "p"), ("recv_arrive_sig", "p"),
    ("done_counter", "p"), ("mask", "p"), ("wait_stats", "p"), ("host_status", "p"),
    ("status_claim", "p"), ("timeout_ns", "u64"),
)


def pack(params, values: dict) -> list:
    """Kernel arguments in signature order as the numpy scalars cuda.core passes by value.

    Args:
        params: a table of this module, e.g. ``LL_DISPATCH``.
        values: name -> int (pointers as integer addresses, 0 for null; bools as 0/1).

    Raises:
        EpCommError: a parameter is missing, unknown, or out of its C type's range.
    """
    names = [n for n, _ in params]
    extra = set(values) - set(names)
    missing = [n for n in names if n not in values]
    if extra or missing:
        raise EpCommError(f"ep_comm internal: kernel arguments missing {missing}, unknown "
                          f"{sorted(extra)}")
    out = []
    for name, kind in params:
        v = int(values[name])
        if kind == "i":
            if not -2**31 <= v < 2**31:
                raise EpCommError(f"ep_comm internal: kernel argument {name}={v} is not an int32")
            out.append(np.int32(v))
        elif kind == "i64":
            if not -2**63 <= v < 2**63:
                raise EpCommError(f"ep_comm internal: kernel argument {name}={v} is not an int64")
            out.append(np.int64(v))
        else:
            if not 0 <= v < 2**64:
                raise EpCommError(f"ep_comm internal: kernel argument {name}={v} is not a uint64")
            out.append(np.uint64(v))
    return out


def kernel_signature(source: str, kernel: str) -> list[tuple[str, str]]:
    """(name, kind) of each parameter of ``kernel`` in the .cu text (macros expanded one level).

    For the CPU test that keeps every table of this module in step with the kernels.
    """
    text = re.sub(r"\\\n", " ", source)
    macros = dict(re.findall(r"#define\s+(\w+)\s+(.*)", text))
    m = re.search(r"\b" + kernel + r"\s*\(([^)]*)\)", text)
    if m is None:
        raise ValueError(f"kernel {kernel} not found")
    params = m.group(1).strip()
    if params in macros:
        params = macros[params]
    out = []
    for p in params.split(","):
        p = p.strip()
        name = re.findall(r"\w+", p)[-1]
        if "*" in p:
            kind = "p"
        elif re.search(r"\buint64_t\b", p):
            kind = "u64"
        elif re.search(r"\b(long long|int64_t)\b", p):
            kind = "i64"
        elif re.search(r"\bint\b", p):
            kind = "i"
        else:
            raise ValueError(f"unknown parameter type in {p!r}")
        out.append((name, kind))
    return out


def kernel_source(name: str) -> str:
    """Text of ``kernels/cuda/<name>`` (for the signature tests)."""
    from ep_comm.runtime.jit import kernels_dir
    return (Path(kernels_dir()) / name).read_text()
