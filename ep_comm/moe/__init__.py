"""Expert compute on top of dispatch/combine: the MoE layer (``layer``), the grouped GEMM
launchers (``gemm``) and the EP-vs-TP cost model (``cost_model``).

The layer's public names are re-exported here, so ``from ep_comm import moe; moe.MoE(...)``
works. Importing this package imports Triton (the GEMM kernels), not the communication
kernels.
"""
from ep_comm.moe.layer import (ExpertGroups, ExpertWeights, MoE, default_expected_m,
                               dequantize_weight, expert_ffn_contiguous, expert_ffn_masked,
                               group_by_expert, moe_ep_low_latency, moe_ep_normal, moe_reference,
                               moe_tp, permute, quantize_weight_fp8, unpermute)

__all__ = ["ExpertGroups", "ExpertWeights", "MoE", "default_expected_m", "dequantize_weight",
           "expert_ffn_contiguous", "expert_ffn_masked", "group_by_expert", "moe_ep_low_latency",
           "moe_ep_normal", "moe_reference", "moe_tp", "permute", "quantize_weight_fp8",
           "unpermute"]
