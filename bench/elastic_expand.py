"""What ``do_expand`` costs: ElasticBuffer's expert-grouped dispatch against dispatch followed by
``ep_comm.moe.group_by_expert`` + ``permute`` (what a caller of the v1 API does).

Within one node on the kernels backend the dispatch kernel writes the expanded rows itself (no
row moves after the transport); elsewhere ElasticBuffer gathers the rows into their expert
slots (``permute`` scatters them there). The figure of interest is ``expand_extra_us`` =
expanded dispatch - plain dispatch, against ``group_permute_us`` = group_by_expert + permute on
the plain dispatch's output.

    python bench/elastic_expand.py [--tokens 4096 --hidden 7168 --topk 8 --experts 256]

One process (1 rank, the kernels backend on a GPU, the reference backend on CPU). Writes
bench/results/elastic_expand-<backend>-1r-<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import time

import torch
import torch.distributed as dist


def _timed(fn, cuda: bool, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--alignment", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29677")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    import ep_comm
    from ep_comm import moe
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(0)
    buf = ep_comm.ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=a.tokens,
                                hidden=a.hidden, explicitly_destroy=True)
    x = torch.randn(a.tokens, a.hidden, device=dev).to(torch.bfloat16)
    idx = torch.rand(a.tokens, a.experts, device=dev).topk(a.topk, dim=1).indices
    kw = dict(topk_idx=idx, num_experts=a.experts, expert_alignment=a.alignment)
    recv_x, recv_idx, _, h, _ = buf.dispatch(x, **kw)
    rows = sum(h.num_recv_tokens_per_expert_list)

    def group_permute():
        g = moe.group_by_expert(recv_idx, a.experts, alignment=a.alignment, num_rows=rows)
        moe.permute(recv_x, g)

    ex, _, _, eh, _ = buf.dispatch(x, **kw, do_expand=True)
    g = moe.group_by_expert(recv_idx, a.experts, alignment=a.alignment, num_rows=rows)
    same = torch.equal(g.dest.long(), eh.expand_rows)  # one layout: the GEMM reads either
    figures = {
        "dispatch_us": _timed(lambda: buf.dispatch(x, **kw), cuda, a.reps),
        "dispatch_expand_us": _timed(lambda: buf.dispatch(x, **kw, do_expand=True), cuda, a.reps),
        "group_permute_us": _timed(group_permute, cuda, a.reps),
        "expanded_rows": int(ex.shape[0]),
        "same_layout_as_permute": bool(same),
    }
    figures["expand_extra_us"] = figures["dispatch_expand_us"] - figures["dispatch_us"]
    backend = buf.runtime.backend_name
    device = f"{torch.cuda.get_device_name()} x 1" if cuda else "cpu"
    tag = "h200" if cuda and "H200" in device else ("cpu" if not cuda else "gpu")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                                text=True).stdout.strip())
    out = {"bench": "elastic_expand", "backend": backend, "commit": commit, "dirty": dirty,
           "device": device, "num_ranks": 1,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "config": vars(a), "figures": figures}
    path = pathlib.Path(__file__).parent / "results" / f"elastic_expand-{backend}-1r-{tag}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(figures))
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
