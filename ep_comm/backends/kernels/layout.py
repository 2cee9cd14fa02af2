"""``get_dispatch_layout`` on the GPU (``kernels/cuda/layout.cu``), one launch per call, shared
by the NVLink and the internode runtimes.

The kernel adds its counts into a scratch of zeros and its last block writes the totals and
leaves zeros again, so the outputs need no zeroing launch. The scratch is one per (E, stream):
layouts on one stream run one after the other, layouts on two streams (an async one on the comm
stream beside one on the compute stream) may overlap and must not share one. A launch plan per
(K, E) is packed once; a call patches pointers, T and the scratch.
"""
from __future__ import annotations

import torch

from ep_comm.backends.kernels import args

#: Threads of a layout block (one token each).
LAYOUT_THREADS = 256
_SLOT = {name: i for i, (name, _) in enumerate(args.NVL_LAYOUT)}


class LayoutKernel:
    """The layout kernel of one runtime: its plans and scratches.

    Args:
        num_ranks: R.
        device: the runtime's CUDA device.
        id_check: address of the Buffer's bad-id record for the per-call id check
            (``constants.ID_CHECK_*``; the NVLink notify kernel reads it), or 0 for none.
    """

    def __init__(self, num_ranks: int, device, id_check: int = 0):
        from ep_comm.runtime import jit
        self.module = jit.compile_kernels("layout", ["layout.cu"], nvshmem=False)
        self.num_ranks, self.device, self.id_check = num_ranks, device, id_check
        self.plans: dict = {}    # (K, E) -> jit.PreparedLaunch
        self.scratch: dict = {}  # (E, stream handle) -> [R + E + 1] int32 zeros
        #: the C++ twin (host_path.LayoutHostPath) once ``enable_host_path`` loaded it
        self.host_path = None

    def enable_host_path(self):
        """Load the C++ host path of later calls; it learns each (K, E) plan, token count and
        stream from this class's calls. Returns it, or None (off, or not buildable)."""
        if self.host_path is None:
            from ep_comm.backends.kernels import host_path
            ext = host_path.load_extension()
            if ext is not None:
                self.host_path = host_path.LayoutHostPath(ext, self.num_ranks, self.device,
                                                          LAYOUT_THREADS)
        return self.host_path

    def __call__(self, topk_idx: torch.Tensor, num_experts: int, stream: int):
        """-> (counts [R + E] int32: tokens per rank, then per expert; is_token_in_rank [T, R]
        bool), from topk_idx [T, K] int64, launched on ``stream`` (a handle)."""
        t, k = topk_idx.shape
        r, dev = self.num_ranks, topk_idx.device
        # every element written by the kernel (no tokens: no launch, zeros)
        counts = (torch.empty if t > 0 else torch.zeros)(r + num_experts, dtype=torch.int32,
                                                         device=dev)
        in_rank = torch.empty(t, r, dtype=torch.bool, device=dev)
        if t > 0:
            launch = self._plan(k, num_experts)
            a = launch.args.slots
            a[_SLOT["topk_idx"]].value, a[_SLOT["T"]].value = topk_idx.data_ptr(), t
            a[_SLOT["num_tokens_per_rank"]].value = counts.data_ptr()
            a[_SLOT["num_tokens_per_expert"]].value = counts.data_ptr() + 4 * r
            a[_SLOT["is_token_in_rank"]].value = in_rank.data_ptr()
            scratch = a[_SLOT["scratch"]].value = self._scratch(num_experts, stream)
            launch.grid = -(-t // LAYOUT_THREADS)
            launch.launch(stream)
            if self.host_path is not None:
                self.host_path.learn(launch, k, num_experts, t, stream, scratch)
        return counts, in_rank

    def _plan(self, num_topk: int, num_experts: int):
        plan = self.plans.get((num_topk, num_experts))
        if plan is None:
            values = {n: 0 for n, _ in args.NVL_LAYOUT}
            values.update(K=num_topk, E=num_experts, R=self.num_ranks, id_check=self.id_check)
            plan = self.plans[num_topk, num_experts] = self.module.prepare(
                "nvl_get_dispatch_layout", args.ArgBuffer(args.NVL_LAYOUT, values), 1,
                LAYOUT_THREADS, (self.num_ranks + num_experts) * 4)
        return plan

    def _scratch(self, num_experts: int, stream: int) -> int:
        s = self.scratch.get((num_experts, stream))
        if s is None:
            s = self.scratch[num_experts, stream] = torch.zeros(
                self.num_ranks + num_experts + 1, dtype=torch.int32, device=self.device)
        return s.data_ptr()
