"""Model of ep_comm's internode normal mode at EP16 / EP32 / EP64, beside DeepEP's H800 figures.

DeepEP's setting: 4096 tokens per rank, hidden 7168, top-8 of 256 experts with the experts of
each token in at most 4 nodes (group-limited routing, a group = a node), FP8 dispatch, BF16
combine, 8 GPUs per node, one 400 Gb/s NIC per GPU (50 GB/s). DeepEP reports the "bottleneck
RDMA bandwidth": tokens x distinct destination nodes (the sender's own node included) x row
bytes, over the time of the operation (FP8 dispatch rows: H + H / 128 * 4 bytes; BF16 combine
rows: 2H). Published, H800: EP16 43 / 43 GB/s, EP32 58 / 57, EP64 51 / 50 (dispatch / combine).

Routing statistics come from sampling that routing (``routing_stats``). The per-rank phases of
``kernels/internode.cu`` (its header has the design), with the parameters below:

dispatch
  fixed      barrier + notify (count exchange) + launch                      ``fixed_us``
  network    T x remote nodes per token x slot bytes over the NIC            ``nic_gbps``
  forward    rows this rank receives from the other P - 1 proxies of its
             node, pulled over NVLink: T x ranks per token x (P - 1) / P      ``nvl_gbps``
  local      staging copies (read + write of each remote slot) and the
             output writes, in HBM                                           ``hbm_gbps``
combine
  fixed, then the stage copy of the input into the symmetric buffer (HBM), the proxy's pull of
  the node's rows over NVLink, one BF16 partial row per token and node back over the NIC, and
  the source's sum of its nodes' rows (HBM).

The kernels as they are run these phases one after the other for a source node's batch (a
proxy forwards a source node's tokens once all have arrived): "serial" = fixed + sum of the
phases. "pipelined" = fixed + the slowest phase: the bound that chunked forwarding (DeepEP's
design) would reach. Both are printed.

Parameters: ``--nic-gbps`` (stated: 50), ``--nvl-gbps`` (H800 NVLink: DeepEP quotes ~160 GB/s;
scaled by the fraction of the NVLink peak our kernels reach in ``bench/results/normal-kernels-
2r-*.json`` when a 2-GPU run exists, else 0.9 assumed), ``--fixed-us`` (from
``bench/results/internode-kernels-*.json`` dispatch at the smallest token sweep point when
present, else 25 us assumed), ``--hbm-gbps`` (H800 3350 GB/s x 0.7 for copies). Measured
files are looked up in ``--out``. The printout names the source of each.

    python bench/internode_model.py                 # prints the table, writes the JSON
    python bench/internode_model.py --nic-gbps 25   # a 200 Gb/s NIC per GPU

Writes ``bench/results/internode-model.json``.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

import common

#: DeepEP's published H800 bottleneck RDMA bandwidth (GB/s): EP -> (dispatch FP8, combine BF16).
DEEPEP_H800 = {16: (43.0, 43.0), 32: (58.0, 57.0), 64: (51.0, 50.0)}
#: NVLink peak per direction of the GPUs our 2-GPU runs measure (H200: 18 links x 26.5 GB/s).
H200_NVLINK_PEAK_GBPS = 477.0
H800_NVLINK_GBPS = 160.0
H800_HBM_GBPS = 3350.0


def routing_stats(num_ranks: int, ranks_per_node: int, num_experts: int = 256, topk: int = 8,
                  topk_nodes: int = 4, samples: int = 20000, seed: int = 0) -> dict:
    """Per-token averages of group-limited routing (uniform scores): ``topk_nodes`` nodes drawn
    at random (all when there are fewer), then ``topk`` distinct experts among theirs.

    Returns nodes (distinct destination nodes, the sender's included), remote_nodes (without
    the sender's node, a uniformly random one), ranks (distinct destination ranks)."""
    rng = np.random.default_rng(seed)
    nodes_n = num_ranks // ranks_per_node
    per_node = num_experts // nodes_n
    per_rank = num_experts // num_ranks
    g = min(nodes_n, topk_nodes)
    chosen = np.argsort(rng.random((samples, nodes_n)), axis=1)[:, :g]          # [S, g]
    pick = np.argsort(rng.random((samples, g * per_node)), axis=1)[:, :topk]     # [S, k]
    node = np.take_along_axis(chosen, pick // per_node, axis=1)                  # [S, k]
    expert = node * per_node + pick % per_node
    rank = expert // per_rank
    src = rng.integers(0, nodes_n, samples)
    n_nodes = np.array([len(set(r)) for r in node])
    own = (node == src[:, None]).any(axis=1)
    n_ranks = np.array([len(set(r)) for r in rank])
    return {"nodes": float(n_nodes.mean()), "remote_nodes": float((n_nodes - own).mean()),
            "ranks": float(n_ranks.mean())}


def predict(stats: dict, p: dict, tokens: int, hidden: int, topk: int, ranks_per_node: int) -> dict:
    """Per-phase seconds of dispatch (FP8) and combine (BF16) on one rank, both orderings."""
    t, h, pn = tokens, hidden, ranks_per_node
    fp8_row = h + h / 128 * 4
    slot = fp8_row + 16 + 4 * pn + 8 * topk              # header, per-rank rows, ids, weights
    remote = t * stats["remote_nodes"]                   # slots this rank puts on the network
    recv = t * stats["ranks"]                            # rows this rank receives (symmetry)
    nvl_rows = recv * (pn - 1) / pn
    gb = 1e9
    d = {"network": remote * slot / (p["nic_gbps"] * gb),
         "forward": nvl_rows * slot / (p["nvl_gbps"] * gb),
         "local": (2 * remote * slot + recv * fp8_row) / (p["hbm_gbps"] * gb)}
    row_c = 2 * h + 4 * topk
    c = {"stage": 2 * recv * row_c / (p["hbm_gbps"] * gb),
         "forward": nvl_rows * row_c / (p["nvl_gbps"] * gb),
         "network": remote * row_c / (p["nic_gbps"] * gb),
         "local": 2 * t * stats["nodes"] * 2 * h / (p["hbm_gbps"] * gb)}
    fixed = p["fixed_us"] * 1e-6
    out = {}
    for name, phases, row in (("dispatch", d, fp8_row), ("combine", c, 2 * h)):
        serial = fixed + sum(phases.values())
        piped = fixed + max(phases.values())
        counted = t * stats["nodes"] * row                # DeepEP's RDMA byte count
        out[name] = {"phases_us": {k: v * 1e6 for k, v in phases.items()},
                     "serial_us": serial * 1e6, "pipelined_us": piped * 1e6,
                     "serial_rdma_gbps": counted / serial / gb,
                     "pipelined_rdma_gbps": counted / piped / gb,
                     "bottleneck": max(phases, key=phases.get)}
    return out


def _latest(folder: Path, pattern: str) -> dict | None:
    """The newest-named GPU result matching ``pattern`` in ``folder`` (not CPU runs, not runs
    of ranks sharing GPUs), with ``_path`` added; None if there is none."""
    paths = sorted(glob.glob(str(folder / pattern)))
    for path in reversed(paths):
        rec = json.loads(Path(path).read_text())
        device = rec.get("device", "cpu")
        if rec.get("status", "ok") == "ok" and "cpu" not in device and "sharing" not in device:
            rec["_path"] = os.path.relpath(path)
            return rec
    return None


def parameters(a) -> tuple[dict, dict]:
    """Model parameters and where each came from (measured file or stated assumption)."""
    p, src = {"nic_gbps": a.nic_gbps}, {"nic_gbps": "stated: 400 Gb/s NIC per GPU"}
    if a.nvl_gbps is not None:
        p["nvl_gbps"], src["nvl_gbps"] = a.nvl_gbps, "--nvl-gbps"
    else:
        rec = _latest(Path(a.out), "normal-kernels-2r-*.json")
        frac, how = 0.9, "assumed fraction 0.9 (no 2-GPU normal-kernels run yet)"
        if rec and rec["figures"].get("dispatch_bf16_gbps"):
            # 2 ranks: half of what a rank receives is its own (local) rows; the other half
            # crossed NVLink in the measured time.
            frac = min(1.0, rec["figures"]["dispatch_bf16_gbps"] / 2 / H200_NVLINK_PEAK_GBPS)
            how = f"measured fraction {frac:.2f} of the H200 NVLink peak ({rec['_path']})"
        p["nvl_gbps"] = H800_NVLINK_GBPS * frac
        src["nvl_gbps"] = f"H800 {H800_NVLINK_GBPS:.0f} GB/s x {how}"
    if a.fixed_us is not None:
        p["fixed_us"], src["fixed_us"] = a.fixed_us, "--fixed-us"
    else:
        rec = _latest(Path(a.out), "internode-kernels-*.json")
        sweep = rec.get("sweep_tokens") if rec else None  # bench/normal.py --sweep-tokens
        small = min(sweep, key=lambda s: s.get("num_tokens", 1 << 30)) if sweep else None
        if small and small.get("dispatch_bf16_us"):
            p["fixed_us"] = float(small["dispatch_bf16_us"])
            src["fixed_us"] = (f"measured: internode dispatch at {small['num_tokens']} tokens "
                               f"({rec['_path']})")
        else:
            p["fixed_us"] = 25.0
            src["fixed_us"] = "assumed (no internode GPU run yet): barrier + notify + launch"
    p["hbm_gbps"] = a.hbm_gbps if a.hbm_gbps is not None else H800_HBM_GBPS * 0.7
    src["hbm_gbps"] = "--hbm-gbps" if a.hbm_gbps is not None else "H800 3350 GB/s x 0.7 (copies)"
    return p, src


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nic-gbps", type=float, default=50.0)
    ap.add_argument("--nvl-gbps", type=float, default=None)
    ap.add_argument("--fixed-us", type=float, default=None)
    ap.add_argument("--hbm-gbps", type=float, default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--ep", default="16,32,64")
    ap.add_argument("--out", default=str(common.DEFAULT_OUT))
    a = ap.parse_args(argv)
    p, src = parameters(a)
    print("=== internode model (DeepEP's setting: 4096 tokens/rank, hidden 7168, top-8 of 256, "
          "top-4 nodes, FP8 dispatch, BF16 combine, 8 GPUs/node)")
    for k, v in p.items():
        print(f"  {k:10s} {v:8.1f}   {src[k]}")
    points, rows = [], []
    for ep in common.parse_ints(a.ep):
        stats = routing_stats(ep, a.ranks_per_node)
        r = predict(stats, p, a.tokens, a.hidden, 8, a.ranks_per_node)
        ref = DEEPEP_H800.get(ep, (None, None))
        points.append({"ep": ep, "nodes": ep // a.ranks_per_node, "routing": stats, **r,
                       "deepep_h800_rdma_gbps": {"dispatch": ref[0], "combine": ref[1]}})
        for op, i in (("dispatch", 0), ("combine", 1)):
            x = r[op]
            rows.append([f"EP{ep}", op, f"{stats['nodes']:.2f} / {stats['remote_nodes']:.2f}",
                         x["serial_us"], x["serial_rdma_gbps"], x["pipelined_us"],
                         x["pipelined_rdma_gbps"], ref[i], x["bottleneck"]])
    common.print_table(None, ["EP", "op", "nodes / remote per token", "serial us",
                              "serial RDMA GB/s", "pipelined us", "pipelined RDMA GB/s",
                              "DeepEP H800 GB/s", "slowest phase"], rows,
                       "\npredicted per rank; RDMA GB/s counted as DeepEP counts it")
    out = Path(a.out) / "internode-model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    commit, dirty = common.git_info()
    record = {"bench": "internode_model", "backend": "model", "commit": commit, "dirty": dirty,
              "device": "model of an H800-class cluster (8 GPUs per node, one NIC per GPU)",
              "num_ranks": None,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "status": "ok",
              "config": {"num_tokens": a.tokens, "hidden": a.hidden, "num_topk": 8,
                         "num_experts": 256, "topk_nodes": 4, "ranks_per_node": a.ranks_per_node},
              "parameters": p, "parameter_sources": src,
              "figures": {f"ep{pt['ep']}_{op}_{k}": pt[op][k] for pt in points
                          for op in ("dispatch", "combine")
                          for k in ("serial_us", "serial_rdma_gbps", "pipelined_us",
                                    "pipelined_rdma_gbps")},
              "points": points}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
