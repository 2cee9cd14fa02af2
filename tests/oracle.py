"""An independent model of the contract (../shared/API.md), written with plain Python loops.

It shares no code with ep_comm: every test compares a backend's output with what these loops
say, computed from the inputs of *all* ranks (each rank regenerates every rank's inputs from
the same seeds, so no communication is needed to know the expected answer).
"""
from __future__ import annotations

import torch


def owner(expert: int, num_experts: int, num_ranks: int) -> int:
    return expert // (num_experts // num_ranks)


def ranks_of_token(row, num_experts, num_ranks) -> list[int]:
    """Sorted distinct ranks owning the experts in one top-k row (-1 skipped)."""
    return sorted({owner(int(e), num_experts, num_ranks) for e in row.tolist() if e >= 0})


def layout(topk_idx, num_experts, num_ranks, ranks_per_node):
    t = topk_idx.shape[0]
    per_rank = [0] * num_ranks
    per_expert = [0] * num_experts
    in_rank = [[False] * num_ranks for _ in range(t)]
    nodes = num_ranks // ranks_per_node
    per_node = [0] * nodes
    for i in range(t):
        seen_nodes = set()
        for r in ranks_of_token(topk_idx[i], num_experts, num_ranks):
            per_rank[r] += 1
            in_rank[i][r] = True
            seen_nodes.add(r // ranks_per_node)
        for n in seen_nodes:
            per_node[n] += 1
        for e in set(int(v) for v in topk_idx[i].tolist() if v >= 0):
            per_expert[e] += 1
    return per_rank, (per_node if nodes > 1 else None), per_expert, in_rank


def dispatch(dst, xs, topk_idxs, topk_weights, num_experts, alignment=1):
    """What rank ``dst`` receives. ``xs[r]``: [T_r, ...] tensor of rank r (any dtype, any
    trailing shape: payload or scales), ``topk_idxs[r]``, ``topk_weights[r]`` (or None).

    Returns dict with lists: rows (tensors), topk (lists of local ids), weights (lists),
    src (source rank, token index) and counts (per local expert, aligned).
    """
    num_ranks = len(xs)
    per_rank = num_experts // num_ranks
    lo = dst * per_rank
    rows, topk, weights, src = [], [], [], []
    counts = [0] * per_rank
    for s in range(num_ranks):
        for t in range(topk_idxs[s].shape[0]):
            row = topk_idxs[s][t].tolist()
            if dst not in ranks_of_token(topk_idxs[s][t], num_experts, num_ranks):
                continue
            rows.append(xs[s][t])
            topk.append([e - lo if lo <= e < lo + per_rank else -1 for e in row])
            if topk_weights is not None:
                weights.append(topk_weights[s][t].tolist())
            src.append((s, t))
            for e in set(row):
                if lo <= e < lo + per_rank:
                    counts[e - lo] += 1
    aligned = [(c + alignment - 1) // alignment * alignment for c in counts]
    return {"rows": rows, "topk": topk, "weights": weights, "src": src, "counts": counts,
            "aligned": aligned}


def combine(me, num_tokens, recv_src_by_rank, ys_by_rank, bias=None):
    """combined_x of rank ``me``: for every rank r, every row i that r received from (me, t)
    adds ``ys_by_rank[r][i]`` to token t, in float64. ``recv_src_by_rank[r]`` lists the
    (source rank, token) of r's received rows."""
    hidden = next((y.shape[1] for y in ys_by_rank if y.dim() == 2), 0)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for r, srcs in enumerate(recv_src_by_rank):
        for i, (s, t) in enumerate(srcs):
            if s == me:
                acc[t] += ys_by_rank[r][i].double()
    if bias is not None:
        for b in bias:
            acc += b.double()
    return acc


def low_latency_dispatch(dst, xs, topk_idxs, num_experts, masked=()):
    """Per local expert of ``dst``, per source rank (not masked): the list of (token index,
    row) it must receive, in token order."""
    num_ranks = len(xs)
    per_rank = num_experts // num_ranks
    out = {}
    for e in range(per_rank):
        g = dst * per_rank + e
        for s in range(num_ranks):
            if s in masked and s != dst:
                continue
            out[(e, s)] = [(t, xs[s][t]) for t in range(topk_idxs[s].shape[0])
                           if g in topk_idxs[s][t].tolist()]
    return out


def low_latency_combine(me, topk_idx, topk_weights, expert_out, num_experts, num_ranks,
                        masked=()):
    """combined[t] = sum_k w[t, k] * expert_out(rank, local expert, t) in float64, where
    ``expert_out(r, e, t)`` returns the row rank r's expert e produced for token (me, t);
    experts on masked ranks contribute nothing."""
    t_n, k_n = topk_idx.shape
    rows = []
    for t in range(t_n):
        acc = None
        for k in range(k_n):
            g = int(topk_idx[t, k])
            if g < 0:
                continue
            r = owner(g, num_experts, num_ranks)
            if r in masked and r != me:
                continue
            v = expert_out(r, g - r * (num_experts // num_ranks), t).double() * float(topk_weights[t, k])
            acc = v if acc is None else acc + v
        rows.append(acc)
    return rows
