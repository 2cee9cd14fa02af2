"""A toy MoE layer across processes: route, dispatch, run local experts, combine, and check the
result against the same layer computed densely in one process.

CPU (reference backend on gloo), 4 local processes:
    torchrun --nproc-per-node=4 launch/demo.py
GPUs (kernels backend when available):
    torchrun --nproc-per-node=8 launch/demo.py --backend auto
MPI (the Buffer is built from mpi4py's COMM_WORLD):
    mpirun -np 4 python launch/demo.py --mpi
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import ep_comm
from ep_comm.runtime.launcher import init_distributed


def make_layer(hidden: int, num_experts: int, seed: int = 0):
    """Router and expert weights, identical on every rank (same seed)."""
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(hidden, num_experts, generator=g) / hidden ** 0.5
    experts = torch.randn(num_experts, hidden, hidden, generator=g) / hidden ** 0.5
    return router, experts


def route(x: torch.Tensor, router: torch.Tensor, topk: int):
    scores = (x.float() @ router).softmax(dim=-1)
    weights, idx = scores.topk(topk, dim=-1)
    return idx, weights.float()


def dense_moe(x, idx, weights, experts):
    """out[t] = sum_k w[t, k] * x[t] @ W[idx[t, k]] in float32: the single-process answer."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    xf = x.float()
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            out[t] += weights[t, k] * (xf[t] @ experts[int(idx[t, k])])
    return out


def ep_moe(buffer, x, idx, weights, experts, num_experts):
    rank, world = buffer.rank, buffer.group_size
    per_rank = num_experts // world
    per_rank_n, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank_n, num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
        topk_weights=weights)
    # Local experts: each received token is weighted and summed over the experts it chose here.
    y = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    w_local = experts[rank * per_rank:(rank + 1) * per_rank].to(recv_x.device)
    for e in range(per_rank):
        hit = recv_idx == e
        rows = hit.any(dim=1).nonzero().flatten()
        if len(rows):
            w_e = (recv_w * hit).sum(dim=1)[rows].unsqueeze(1)
            y[rows] += w_e * (recv_x[rows].float() @ w_local[e])
    combined, _, _ = buffer.combine(y.to(torch.bfloat16), handle)
    return combined, counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--backend", default="auto", choices=["auto", "kernels", "reference"])
    p.add_argument("--mpi", action="store_true", help="build the Buffer from mpi4py's COMM_WORLD")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks sharing NVLink (default: detected); fewer than on the host "
                        "simulates several nodes")
    args = p.parse_args()

    if args.mpi:
        from mpi4py import MPI
        comm, group = MPI.COMM_WORLD, None
    else:
        comm, group = None, init_distributed()
    hidden_bytes = args.hidden * 2
    if group is None:
        world = comm.Get_size()
    else:
        world = dist.get_world_size(group)
    nvl = ep_comm.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(hidden_bytes, world)
    rdma = ep_comm.Buffer.get_dispatch_config(world).get_rdma_buffer_size_hint(hidden_bytes, world)
    buffer = ep_comm.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, comm=comm,
                            backend=args.backend, ranks_per_node=args.ranks_per_node)
    rank, dev = buffer.rank, buffer.device

    router, experts = make_layer(args.hidden, args.experts)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(torch.bfloat16)
    idx, weights = route(x, router, args.topk)
    t0 = time.perf_counter()
    out, counts = ep_moe(buffer, x.to(dev), idx.to(dev), weights.to(dev), experts, args.experts)
    elapsed = time.perf_counter() - t0
    want = dense_moe(x, idx, weights, experts)
    err = (out.float().cpu() - want).abs().max().item()
    scale = want.abs().max().item()
    ok = err <= 2e-2 * max(scale, 1.0)
    print(f"rank {rank}/{buffer.group_size} (node {buffer.comm.node} of {buffer.comm.num_nodes}) backend={buffer.backend_name} device={dev}: "
          f"received {sum(counts)} token-expert rows for experts {counts}, "
          f"max |ep - dense| = {err:.2e} (output scale {scale:.2f}), {elapsed * 1e3:.1f} ms "
          f"-> {'PASS' if ok else 'FAIL'}", flush=True)
    buffer.destroy()
    if group is not None:
        dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
