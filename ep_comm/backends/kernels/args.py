"""Named argument tables of the CUDA kernels: the one convention of every kernel launch.

A table lists a kernel's parameters in signature order, each with its C kind: ``"p"`` a
pointer (passed as uint64), ``"i"`` an ``int`` (int32), ``"i64"`` a ``long long``, ``"u64"`` a
``uint64_t``, ``"sig"`` a ``CallSig`` by value (``kernels/cuda/common.cuh``: ``CALL_SIG_WORDS``
int32, a call's signature, ``ep_comm.core.agreement.device_words``; its value is a sequence).
A launch builds a ``{name: value}`` dict and ``pack`` turns it into the numpy scalars
cuda.core passes by value, refusing a missing, unknown or out-of-range argument.
A launch plan keeps its arguments in an ``ArgBuffer`` instead: packed once (checked as
``pack`` checks), then only the slots that change (pointers, counts) are overwritten per call,
and the driver reads the kernel parameters straight from it (``ep_comm.runtime.jit``
``PreparedLaunch``). ``tests/test_kernel_args.py`` parses each .cu file and checks every table against the
kernel's signature (``kernel_signature``), so an argument can never shift by position.
"""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np

from ep_comm.core.constants import CALL_SIG_WORDS
from ep_comm.errors import EpCommError

# Low-latency mode (kernels/cuda/low_latency.cu EP_LL_DISPATCH_PARAMS and ep_ll_combine).
LL_DISPATCH = (
    ("x", "p"), ("topk_idx", "p"), ("num_tokens", "i"), ("num_topk", "i"), ("hidden", "i"),
    ("num_experts", "i"), ("num_ranks", "i"), ("rank", "i"), ("max_tokens", "i"),
    ("round_scale", "i"), ("ue8m0", "i"), ("nvlink", "i"), ("phases", "i"),
    ("send_stage", "p"), ("recv_msgs", "p"), ("recv_count_sig", "p"), ("recv_arrive_sig", "p"),
    ("msg_stride", "i"), ("mask", "p"), ("recv_x", "p"), ("recv_scales", "p"),
    ("src_info", "p"), ("range_begin", "p"), ("range_count", "p"), ("recv_count", "p"),
    ("cum_stats", "p"), ("wait_stats", "p"), ("host_status", "p"), ("status_claim", "p"),
    ("timeout_ns", "u64"), ("call_tag", "i"), ("done_counter", "p"), ("progress", "p"),
    ("ack_sig", "p"),
)
LL_COMBINE = (
    ("x", "p"), ("zero_copy", "i"), ("src_info", "p"), ("range_begin", "p"),
    ("range_count", "p"), ("topk_idx", "p"), ("topk_weights", "p"), ("out", "p"),
    ("num_tokens", "i"), ("num_topk", "i"), ("hidden", "i"), ("num_experts", "i"),
    ("num_ranks", "i"), ("rank", "i"), ("max_tokens", "i"), ("nvlink", "i"), ("phases", "i"),
    ("send_stage", "p"), ("recv_rows", "p"), ("recv_count_sig", "p"), ("recv_arrive_sig", "p"),
    ("done_counter", "p"), ("mask", "p"), ("wait_stats", "p"), ("host_status", "p"),
    ("status_claim", "p"), ("timeout_ns", "u64"), ("call_tag", "i"), ("progress", "p"),
    ("ack_sig", "p"),
)
#: The low-latency arguments that change from call to call, in the order the runtime (and the
#: C++ host path, kernels/host/host_path.cpp) passes them (``phases`` last); every other
#: argument is fixed by the plan's key (shape, buffer half, scale format) and written once, when
#: the plan is built.
LL_DISPATCH_PER_CALL = ("x", "topk_idx", "num_tokens", "num_topk", "recv_x", "recv_scales",
                        "src_info", "range_begin", "range_count", "recv_count", "cum_stats",
                        "wait_stats", "call_tag", "phases")
LL_COMBINE_PER_CALL = ("x", "zero_copy", "src_info", "range_begin", "range_count", "topk_idx",
                       "topk_weights", "out", "num_tokens", "num_topk", "wait_stats", "call_tag",
                       "phases")
#: The layout kernel's arguments that change from call to call (the C++ host path writes them
#: in this order, kernels/host/host_path.cpp).
NVL_LAYOUT_PER_CALL = ("topk_idx", "T", "num_tokens_per_rank", "num_tokens_per_expert",
                       "is_token_in_rank", "scratch")
#: The NVLink notify and dispatch kernels' arguments that change from call to call (the C++
#: host path, kernels/host/host_path.cpp, writes them in this order; ``sig`` is the call's
#: ``CallSig``). The expanding dispatch's are written as "off" (0) by the C++ path, which never
#: runs an expanding call; ``num_exp_rows``, ``expert_alignment`` and ``zero_exp_padding`` of
#: the dispatch kernel are read only by an expanding call.
NVL_NOTIFY_PER_CALL = ("T", "num_tokens_per_rank", "num_tokens_per_expert", "rank_prefix_matrix",
                       "recv_per_expert", "num_tokens_of_rank", "num_recv_dev",
                       "expert_alignment", "expand_base", "sig")
NVL_DISPATCH_PER_CALL = ("x", "x_scales", "topk_idx", "topk_weights", "is_token_in_rank", "T",
                         "rank_prefix_matrix", "send_pos", "recv_x", "recv_scales",
                         "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "recv_src_rank",
                         "num_rows", "num_recv_dev", "expand", "expand_pos", "expand_base",
                         "exp_x", "exp_scales", "exp_w")
#: The NVLink combine kernel's arguments that change from call to call, in the order the C++
#: host path (kernels/host/host_path.cpp, ``NvlCombine``) writes them: the input rows and
#: weights, the handle's routes, the token count, the biases and the outputs.
NVL_COMBINE_PER_CALL = ("x", "topk_w", "recv_src_idx", "rank_prefix_matrix",
                        "num_tokens_of_rank", "is_token_in_rank", "send_pos", "T", "bias0",
                        "bias1", "out", "out_w", "num_recv_dev")
#: ``phases`` bits (kernels/cuda/low_latency_common.cuh kSendPhase / kRecvPhase).
LL_SEND_PHASE = 1
LL_RECV_PHASE = 2


# Normal mode over NVLink (kernels/cuda/layout.cu, intranode.cu).
NVL_LAYOUT = (
    ("topk_idx", "p"), ("T", "i"), ("K", "i"), ("E", "i"), ("R", "i"),
    ("num_tokens_per_rank", "p"), ("num_tokens_per_expert", "p"), ("is_token_in_rank", "p"),
    ("id_check", "p"), ("scratch", "p"),
)
NVL_NOTIFY = (
    ("peers", "p"), ("rank", "i"), ("R", "i"), ("T", "i"), ("L", "i"), ("num_worst_tokens", "i"),
    ("num_tokens_per_rank", "p"), ("num_tokens_per_expert", "p"), ("off_ctrl", "i64"),
    ("off_flag", "i64"), ("off_counts", "i64"), ("rank_prefix_matrix", "p"),
    ("recv_per_expert", "p"), ("num_tokens_of_rank", "p"), ("num_recv_dev", "p"),
    ("expert_alignment", "i"), ("expand_base", "p"), ("host_status", "p"), ("timeout_ns", "u64"),
    ("sig", "sig"), ("id_check", "p"),
)
_NVL_RING = (
    ("peers", "p"), ("rank", "i"), ("R", "i"), ("C", "i"), ("S", "i"), ("window", "i"),
    ("off_ctrl", "i64"), ("off_tail", "i64"), ("off_head", "i64"), ("off_ring", "i64"),
    ("ring_stride", "i64"), ("slot_bytes", "i64"),
)
NVL_DISPATCH = _NVL_RING + (
    ("off_payload", "i"), ("off_scales", "i"), ("off_idx", "i"), ("off_w", "i"),
    ("off_pos", "i"), ("x", "p"),
    ("row_int4", "i"), ("x_scales", "p"), ("num_scales", "i"), ("topk_idx", "p"),
    ("topk_weights", "p"), ("K", "i"), ("L", "i"), ("is_token_in_rank", "p"), ("T", "i"),
    ("rank_prefix_matrix", "p"), ("send_pos", "p"), ("recv_x", "p"), ("recv_scales", "p"),
    ("recv_topk_idx", "p"), ("recv_topk_weights", "p"), ("recv_src_idx", "p"),
    ("recv_src_rank", "p"), ("num_rows", "i"), ("num_recv_dev", "p"), ("zero_padding", "i"),
    ("expand", "i"), ("expand_pos", "p"), ("expand_base", "p"), ("exp_x", "p"),
    ("exp_scales", "p"), ("exp_w", "p"), ("num_exp_rows", "i"), ("expert_alignment", "i"),
    ("zero_exp_padding", "i"), ("host_status", "p"), ("timeout_ns", "u64"),
)
NVL_COMBINE = _NVL_RING + (
    ("off_payload", "i"), ("off_w", "i"), ("x", "p"), ("row_int4", "i"), ("topk_w", "p"),
    ("K", "i"), ("recv_src_idx", "p"), ("rank_prefix_matrix", "p"), ("num_tokens_of_rank", "p"),
    ("is_token_in_rank", "p"), ("send_pos", "p"), ("T", "i"), ("bias0", "p"), ("bias1", "p"),
    ("out", "p"), ("out_w", "p"), ("num_recv_dev", "p"), ("host_status", "p"),
    ("timeout_ns", "u64"),
)

# Normal mode across nodes (kernels/cuda/internode.cu). Every kernel starts with the
# EP_INTER_REGION_PARAMS macro: the symmetric buffer's base and the byte offsets of its regions.
INTER_REGIONS = (
    ("base", "p"), ("off_ctrl", "i64"), ("off_bar", "i64"), ("off_nflag", "i64"),
    ("off_counts", "i64"), ("off_darr", "i64"), ("off_carr", "i64"), ("off_dwork", "i64"),
    ("off_drecv", "i64"), ("off_dstage", "i64"), ("off_csrc", "i64"), ("slot_bytes", "i64"),
    ("row_c", "i64"), ("cap", "i"), ("chunks", "i"), ("chunk_slots", "i"),
)
INTER_NOTIFY = INTER_REGIONS + (
    ("rank", "i"), ("R", "i"), ("P", "i"), ("N", "i"), ("E", "i"), ("num_worst_tokens", "i"),
    ("tokens_per_rank", "p"), ("tokens_per_node", "p"), ("tokens_per_expert", "p"),
    ("rank_prefix_matrix", "p"), ("recv_per_expert", "p"), ("node_counts", "p"),
    ("num_recv_dev", "p"), ("host_status", "p"), ("timeout_ns", "u64"), ("sig", "sig"),
    ("call_tag", "i"),
)
INTER_DISPATCH = INTER_REGIONS + (
    ("rank", "i"), ("R", "i"), ("P", "i"), ("N", "i"), ("T", "i"), ("L", "i"), ("x", "p"),
    ("row_int4", "i"), ("x_scales", "p"), ("num_scales", "i"), ("topk_idx", "p"),
    ("topk_weights", "p"), ("K", "i"), ("has_scales", "i"), ("has_idx", "i"), ("has_w", "i"),
    ("local_pos", "p"), ("node_pos", "p"), ("rank_prefix_matrix", "p"), ("node_counts", "p"),
    ("send_pos", "p"), ("off_payload", "i"), ("off_scales", "i"), ("off_idx", "i"),
    ("off_w", "i"), ("put_bytes", "i"), ("recv_x", "p"), ("recv_scales", "p"),
    ("recv_topk_idx", "p"), ("recv_topk_weights", "p"), ("recv_src_idx", "p"),
    ("recv_src_rank", "p"), ("proxy_rows", "p"), ("num_rows", "i"), ("num_recv_dev", "p"),
    ("zero_padding", "i"), ("net_bytes", "p"), ("host_status", "p"), ("timeout_ns", "u64"),
    ("call_tag", "i"),
)
INTER_COMBINE = INTER_REGIONS + (
    ("rank", "i"), ("R", "i"), ("P", "i"), ("N", "i"), ("T", "i"), ("row_int4", "i"), ("K", "i"),
    ("has_w", "i"), ("proxy_rows", "p"), ("node_counts", "p"), ("node_pos", "p"),
    ("tokens_per_node", "p"), ("off_payload", "i"), ("off_w", "i"), ("put_bytes", "i"),
    ("bias0", "p"), ("bias1", "p"), ("out", "p"), ("out_w", "p"), ("num_recv_dev", "p"),
    ("net_bytes", "p"), ("host_status", "p"), ("timeout_ns", "u64"), ("call_tag", "i"),
)

#: Every table with the .cu file and the kernels that take it (for tests/test_kernel_args.py).
TABLES = {
    "LL_DISPATCH": ("low_latency.cu", ("ep_ll_dispatch_fp8", "ep_ll_dispatch_bf16"), LL_DISPATCH),
    "LL_COMBINE": ("low_latency.cu", ("ep_ll_combine",), LL_COMBINE),
    "NVL_LAYOUT": ("layout.cu", ("nvl_get_dispatch_layout",), NVL_LAYOUT),
    "NVL_NOTIFY": ("intranode.cu", ("nvl_notify",), NVL_NOTIFY),
    "NVL_DISPATCH": ("intranode.cu", ("nvl_dispatch",), NVL_DISPATCH),
    "NVL_COMBINE": ("intranode.cu", ("nvl_combine",), NVL_COMBINE),
    "INTER_NOTIFY": ("internode.cu", ("inter_notify",), INTER_NOTIFY),
    "INTER_DISPATCH": ("internode.cu", ("inter_dispatch",), INTER_DISPATCH),
    "INTER_COMBINE": ("internode.cu", ("inter_combine",), INTER_COMBINE),
}


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
        if kind == "sig":
            out.append(_call_sig(name, values[name]))
            continue
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


def _call_sig(name: str, words) -> np.ndarray:
    """A ``CallSig`` argument: ``CALL_SIG_WORDS`` int32 values, checked."""
    words = [int(w) for w in words]
    if len(words) != CALL_SIG_WORDS or not all(-2**31 <= w < 2**31 for w in words):
        raise EpCommError(f"ep_comm internal: kernel argument {name} must be {CALL_SIG_WORDS} "
                          f"int32 words, got {words}")
    return np.array(words, dtype=np.int32)


_CTYPES = {"p": ctypes.c_uint64, "u64": ctypes.c_uint64, "i64": ctypes.c_int64,
           "i": ctypes.c_int32, "sig": ctypes.c_int32 * CALL_SIG_WORDS}


class ArgBuffer:
    """A kernel's arguments in C memory: one ctypes scalar per parameter and the ``void*``
    array pointing at them that ``cuLaunchKernel`` takes (``address``).

    Built from a full ``{name: value}`` dict (checked like ``pack``). ``set`` overwrites one
    value with the same checks; the hot path holds ``slot(name)`` and assigns ``.value``
    directly (a pointer or a count it already knows to be in range).
    """

    __slots__ = ("params", "index", "slots", "pointers", "address")

    def __init__(self, params, values: dict):
        packed = pack(params, values)  # the checks: names complete, values in range
        self.params = tuple(params)
        self.index = {n: i for i, (n, _) in enumerate(params)}
        self.slots = [_CTYPES[k](*map(int, v)) if k == "sig" else _CTYPES[k](int(v))
                      for (_, k), v in zip(params, packed)]
        self.pointers = (ctypes.c_void_p * max(1, len(self.slots)))(
            *[ctypes.addressof(s) for s in self.slots])
        self.address = ctypes.addressof(self.pointers)

    def slot(self, name: str):
        """The ctypes scalar of parameter ``name`` (assign ``.value`` to patch it; a ``"sig"``
        slot is a ctypes int32 array: assign ``slot[:] = words``)."""
        try:
            return self.slots[self.index[name]]
        except KeyError:
            raise EpCommError(f"ep_comm internal: unknown kernel argument {name!r}") from None

    def set(self, name: str, value: int) -> None:
        """Overwrite one argument, range-checked for its C kind."""
        slot = self.slot(name)
        kind = self.params[self.index[name]][1]
        pack(((name, kind),), {name: value})
        if kind == "sig":
            slot[:] = [int(w) for w in value]
        else:
            slot.value = int(value)

    def values(self) -> dict:
        """name -> int (a list of ints for a ``"sig"``), as the kernel would receive them (for
        tests and fakes)."""
        return {n: list(s) if k == "sig" else s.value
                for (n, k), s in zip(self.params, self.slots)}


def kernel_signature(source: str, kernel: str) -> list[tuple[str, str]]:
    """(name, kind) of each parameter of the ``__global__`` function ``kernel`` in the .cu text.

    Comments are dropped and parameter macros (``EP_LL_DISPATCH_PARAMS``,
    ``EP_INTER_REGION_PARAMS``) expanded, wherever they stand in the list. For the CPU test that
    keeps every table of this module in step with the kernels.
    """
    text = re.sub(r"//[^\n]*", "", source)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"\\\n", " ", text)
    macros = dict(re.findall(r"#define\s+(\w+)[ \t]+([^\n]*)", text))
    found = None
    for m in re.finditer(r"\b" + re.escape(kernel) + r"\s*\(([^)]*)\)\s*\{", text):
        if "__global__" in text[max(0, m.start() - 200):m.start()]:
            found = m
            break
    if found is None:
        raise ValueError(f"__global__ kernel {kernel} not found")
    parts = []
    for p in found.group(1).split(","):
        p = p.strip()
        parts.extend(x.strip() for x in macros[p].split(",")) if p in macros else parts.append(p)
    out = []
    for p in parts:
        name = re.findall(r"\w+", p)[-1]
        if "*" in p:
            kind = "p"
        elif re.search(r"\bCallSig\b", p):
            kind = "sig"
        elif re.search(r"\b(uint64_t|unsigned\s+long\s+long|size_t)\b", p):
            kind = "u64"
        elif re.search(r"\b(long\s+long|int64_t)\b", p):
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
