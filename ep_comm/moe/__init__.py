"""Expert compute on top of dispatch/combine: the MoE layer (``layer``), the grouped GEMM
launchers (``gemm``) and the EP-vs-TP cost model (``cost_model``).

The layer's public names are available here (``from ep_comm import moe; moe.MoE(...)``). They
are loaded on first use: importing ``ep_comm.moe.cost_model`` must not import Triton's kernels,
because whether they run in the interpreter is fixed when they are first imported
(``TRITON_INTERPRET=1`` on CPU).
"""
from __future__ import annotations

import importlib

__all__ = ["ExpertGroups", "ExpertWeights", "MoE", "default_expected_m", "dequantize_weight",
           "expert_ffn_contiguous", "expert_ffn_masked", "group_by_expert", "moe_ep_low_latency",
           "moe_ep_normal", "moe_reference", "moe_tp", "permute", "quantize_weight_fp8",
           "unpermute"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("ep_comm.moe.layer"), name)
    raise AttributeError(f"module 'ep_comm.moe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
