"""GPU cases only the internode kernels have: the bytes they put across nodes, counted by the
kernels themselves. Every other internode test runs the normal-mode tasks
(gpu_cases_normal) under EP_COMM_TEST_RANKS_PER_NODE."""
from __future__ import annotations

import torch

from gpu_cases_normal import NCase, layout_args, n_inputs
from gpu_common import check_status, normal_buffer, sync


def task_internode_network_bytes(ctx, backend: str, case: NCase, rpn: int):
    """Bytes the internode kernels put to other nodes, counted by the kernels, against the
    minimum: every (token, other node holding one of its experts) pair once, each way. Returns
    (counted dispatch, counted combine, minimum pairs) summed over all ranks."""
    import torch.distributed as dist
    r, me, dev = ctx.world_size, ctx.rank, ctx.device
    buf = normal_buffer(ctx, backend, case.hidden)
    runtime = buf.backend.normal
    counter = runtime.count_network_bytes(True)
    try:
        inputs = [n_inputs(case, s, r) for s in range(r)]
        x, idx, w = (t.to(dev) for t in inputs[me])
        layout = buf.get_dispatch_layout(idx, case.num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x, topk_idx=idx, topk_weights=w, **layout_args(layout))
        buf.combine(recv_x, handle, topk_weights=recv_w)
        sync(ctx)
        check_status(buf)
        counted = counter.cpu()
        d_bytes, c_bytes = runtime.network_bytes_per_token(case.hidden, 2, case.num_topk)
    finally:
        runtime.count_network_bytes(False)
        buf.destroy()
    per = case.num_experts // r
    pairs = 0
    for s, (_, sidx, _) in enumerate(inputs):
        ranks = torch.where(sidx >= 0, sidx // per, -1)
        for n in range(r // rpn):
            if n == s // rpn:
                continue
            pairs += int(((ranks >= n * rpn) & (ranks < (n + 1) * rpn)).any(dim=1).sum())
    on_gloo = dist.get_backend(ctx.group) == "gloo"
    total = counted.clone() if on_gloo else counted.to(dev)
    dist.all_reduce(total, group=ctx.group)
    total = total.cpu()
    assert int(total[0]) == pairs * d_bytes, (int(total[0]), pairs, d_bytes)
    assert int(total[1]) == pairs * c_bytes, (int(total[1]), pairs, c_bytes)
    return int(total[0]), int(total[1]), pairs

