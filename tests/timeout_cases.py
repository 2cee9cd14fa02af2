"""A rank that skips a call: the others must raise CommTimeoutError naming rank and phase."""
import time

import pytest
import torch

from cases import Case, all_inputs, make_buffer


def task_skip_dispatch(ctx, case: Case, skipper: int):
    from ep_comm.errors import CommTimeoutError
    dev = ctx.device
    x, idx, w = (t.to(dev) for t in all_inputs(case, ctx.world_size)[ctx.rank])
    buf = make_buffer(ctx, case)
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, case.num_experts)
    if ctx.rank == skipper:
        buf.destroy()
        return "skipped"
    t0 = time.monotonic()
    with pytest.raises(CommTimeoutError) as info:
        buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                     is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=idx, topk_weights=w)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.monotonic() - t0
    err = info.value
    assert err.rank == ctx.rank and err.phase.startswith("dispatch"), str(err)
    assert f"rank {ctx.rank}" in str(err) and "dispatch" in str(err) and "doctor" in str(err)
    buf.destroy()
    return elapsed
