"""Backward of dispatch and combine: checked against the closed form of a scaled round trip."""
import torch

import oracle
from cases import Case, all_inputs, make_buffer


def task_round_trip_gradients(ctx, case: Case):
    """y[t] = sum over ranks r holding t of c_r * x[t], with c_r = r + 1; so
    dy/dx = sum c_r, and d(sum(y * g))/dw = sum over holders of c_r-free weight grads."""
    from ep_comm import autograd
    dev, r, me = ctx.device, ctx.world_size, ctx.rank
    inputs = all_inputs(case, r)
    x, idx, w = (t.to(dev) for t in inputs[me])
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    buf = make_buffer(ctx, case)
    recv_x, recv_idx, recv_w, _, handle = autograd.dispatch(buf, x, idx, w, case.num_experts)
    scale = float(me + 1)
    y = autograd.combine(buf, (recv_x.float() * scale).to(torch.bfloat16), handle)
    g = torch.Generator().manual_seed(case.seed + me)
    gy = torch.randn(y.shape, generator=g).to(dev)
    loss = (y.float() * gy).sum() + (recv_w * scale).sum()
    loss.backward()
    holders = [oracle.ranks_of_token(idx[t].cpu(), case.num_experts, r) for t in range(len(idx))]
    c = torch.tensor([float(sum(h + 1 for h in hs)) for hs in holders], dtype=torch.float64)
    # Each holder h contributes c_h * gy (bf16 rounding of gy is exact to ~2^-8 relative).
    want_gx = gy.double().cpu() * c.unsqueeze(1)
    got = x.grad.double().cpu()
    assert torch.allclose(got, want_gx, rtol=2 ** -6, atol=1e-2), (got - want_gx).abs().max()
    want_gw = c.unsqueeze(1).expand_as(w).contiguous()
    assert torch.allclose(w.grad.double().cpu(), want_gw, rtol=1e-6)
    buf.destroy()
