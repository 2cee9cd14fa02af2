"""Cost model of one MoE layer, expert parallel (EP) against tensor parallel (TP), 1 to 256 ranks.

Inputs are measurements (``Hardware``): grouped-GEMM throughput as a function of tokens per
expert (contiguous and masked kernels, from ``bench/gemm.py`` or the calibration of
``bench/moe.py``), HBM read bandwidth, the bandwidth that dispatch/combine and NCCL collectives
reach over NVLink inside a node, a stated NIC bandwidth across nodes, and fixed per-operation
costs. ``predict_ep`` / ``predict_tp`` return the time of each part; ``table`` evaluates a range
of rank counts; ``python -m ep_comm.moe.cost_model`` prints the table (markdown) and the rank count
from which EP is faster.

The layer (``Layer``): T tokens per rank, top-k of E experts, hidden H, expert intermediate I.
Both variants do the same expert FLOPs per rank, ``6 * T * k * H * I`` (gate+up ``2 * 2I * H``
and down ``2 * H * I`` per token-expert pair), and read the same expert weight bytes per rank
(``3 * H * I * E / R`` elements); they differ in what they move and in GEMM shapes:

* EP: each rank keeps E / R whole experts. A token goes once to each rank that owns at least
  one of its experts: with uniform routing that is rank r with probability
  ``p = 1 - C(E - E/R, k) / C(E, k)``, so a rank receives ``T * R * p`` rows, ``T * (R-1) * p``
  of them from other ranks, and sends as many back in combine. Rows from ranks of the same
  node cross NVLink, the others the NIC (each rank's share of its node's NIC); the two links
  run in parallel (time = the slower one). Per expert, ``m = T * R * k / E`` rows.
  Elementwise passes (permute, SiLU * up (+ FP8 cast), weighted unpermute) are HBM-bound.
* TP: each rank keeps every expert's ``I / R`` slice. All-gather of the ``T * R`` tokens (ring:
  each rank receives ``(R - 1) * T`` rows), the experts on all of them (``m`` as EP; GEMMs with
  N = 2I / R and K = I / R, modelled at the measured throughput of the full-size shape, which
  favours TP at large R), reduce-scatter of ``R * T`` bf16 partial rows (each rank sends and
  receives ``(R - 1) * T`` rows). Across nodes a ring's every step crosses a NIC.

GEMM time of ``n_experts`` experts with ``m`` rows each: ``max(flops / tflops(m), weight bytes
/ (hbm * weight_stream_fraction))``, with ``tflops(m)`` interpolated log-linearly in m over the
measured points (below the smallest point: the weight-streaming bound takes over).

Assumptions: uniform random routing, no overlap between communication and computation (the
layers run their parts back to back), dispatch of the format the GEMMs use (FP8 with per-128
scales, or bf16), combine in bf16.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path


@dataclasses.dataclass
class Layer:
    """Sizes of the MoE layer (defaults: DeepSeek-V3)."""

    hidden: int = 7168
    intermediate: int = 2048
    num_experts: int = 256
    num_topk: int = 8
    fp8: bool = True

    def row_bytes(self) -> float:
        """Bytes of one dispatched token: FP8 + one float32 scale per 128 channels, or bf16."""
        h = self.hidden
        return h + h / 128 * 4 if self.fp8 else 2 * h

    def weight_bytes_per_expert(self) -> float:
        """Bytes of one expert's gate, up and down weights (+ FP8 128 x 128 block scales)."""
        n = 3 * self.hidden * self.intermediate
        return n * (1 + 4 / 128 ** 2) if self.fp8 else 2 * n


@dataclasses.dataclass
class Hardware:
    """Measured figures of one GPU and its links (defaults: H200, HARDWARE.md and bench runs).

    Attributes:
        gemm_points: ``[(tokens_per_expert, TFLOP/s)]`` of the two expert GEMMs together
            (contiguous layout), by ``"fp8"`` / ``"bf16"``.
        masked_points: the same for the masked (low-latency) GEMMs.
        hbm_gbps: HBM read bandwidth.
        weight_stream_fraction: fraction of ``hbm_gbps`` at which GEMMs stream weights.
        elementwise_fraction: fraction of ``hbm_gbps`` (counting read + write bytes) reached
            by the permute / SiLU / unpermute passes.
        nvlink_gbps: bytes per second one rank receives from peers in the same node during
            dispatch / combine (DeepEP's count minus the rank's own rows).
        collective_gbps: the same for NCCL all-gather / reduce-scatter inside a node.
        nic_gbps: per rank, across nodes (400 Gb/s ConnectX-7 per GPU: 50 GB/s; stated,
            the measured machines have no NIC).
        ranks_per_node: GPUs sharing NVLink.
        ep_fixed_us: fixed cost of one dispatch or combine (launch, notify, barrier).
        collective_fixed_us: fixed cost of one NCCL collective.
    """

    gemm_points: dict = dataclasses.field(default_factory=lambda: {
        "fp8": [(8, 110.0), (32, 380.0), (128, 620.0), (512, 900.0), (1024, 950.0)],
        "bf16": [(8, 60.0), (32, 220.0), (128, 410.0), (512, 600.0), (1024, 630.0)]})
    masked_points: dict = dataclasses.field(default_factory=lambda: {
        "fp8": [(8, 100.0), (32, 380.0), (64, 700.0)],
        "bf16": [(8, 55.0), (32, 210.0), (64, 400.0)]})
    hbm_gbps: float = 4200.0
    weight_stream_fraction: float = 0.78
    elementwise_fraction: float = 0.7
    nvlink_gbps: float = 340.0
    collective_gbps: float = 340.0
    nic_gbps: float = 50.0
    ranks_per_node: int = 8
    ep_fixed_us: float = 25.0
    collective_fixed_us: float = 15.0


def _interp(points: list, m: float) -> float:
    """TFLOP/s at m tokens per expert, log-linear between measured points, flat past the last,
    proportional to m below the first (the weight-bound regime)."""
    pts = sorted(points)
    if m <= pts[0][0]:
        return pts[0][1] * m / pts[0][0]
    for (m0, t0), (m1, t1) in zip(pts, pts[1:]):
        if m <= m1:
            f = (math.log(m) - math.log(m0)) / (math.log(m1) - math.log(m0))
            return t0 + f * (t1 - t0)
    return pts[-1][1]


def rank_hit_probability(layer: Layer, num_ranks: int, experts_per_group: int | None = None) -> float:
    """Probability that a token's k distinct uniform experts include one of a group of
    ``experts_per_group`` experts (default: one rank's ``E / R``)."""
    e, k = layer.num_experts, layer.num_topk
    g = experts_per_group if experts_per_group is not None else e // num_ranks
    if e - g < k:
        return 1.0
    return 1.0 - math.comb(e - g, k) / math.comb(e, k)


def gemm_time_s(layer: Layer, hw: Hardware, num_experts: float, m: float, masked: bool,
                intermediate: float | None = None) -> float:
    """Both expert GEMMs of ``num_experts`` experts with ``m`` rows each."""
    i = intermediate if intermediate is not None else layer.intermediate
    if m <= 0:
        return 0.0
    flops = 6 * num_experts * m * layer.hidden * i
    points = (hw.masked_points if masked else hw.gemm_points)["fp8" if layer.fp8 else "bf16"]
    t_compute = flops / (_interp(points, m) * 1e12)
    wbytes = layer.weight_bytes_per_expert() * (i / layer.intermediate) * num_experts
    t_weights = wbytes / (hw.hbm_gbps * 1e9 * hw.weight_stream_fraction)
    return max(t_compute, t_weights)


def _link_time_s(layer: Layer, hw: Hardware, num_ranks: int, rows_intra: float,
                 rows_inter: float, row_bytes: float, intra_gbps: float) -> float:
    t_intra = rows_intra * row_bytes / (intra_gbps * 1e9)
    t_inter = rows_inter * row_bytes / (hw.nic_gbps * 1e9)
    return max(t_intra, t_inter)


def predict_ep(layer: Layer, hw: Hardware, num_ranks: int, tokens_per_rank: int,
               mode: str = "normal") -> dict:
    """Seconds of each part of the EP layer on one rank: dispatch, experts (GEMMs and
    elementwise passes), combine, and their sum ``layer``."""
    r, t, h = num_ranks, tokens_per_rank, layer.hidden
    g = min(r, hw.ranks_per_node)
    p = rank_hit_probability(layer, r)
    recv_rows = t * r * p
    peers = t * (r - 1) * p
    intra = peers * (g - 1) / (r - 1) if r > 1 else 0.0
    inter = peers - intra
    local_rows = t * p
    # own rows still go through the buffers: a read and a write of HBM
    t_local = 2 * local_rows * layer.row_bytes() / (hw.hbm_gbps * 1e9 * hw.elementwise_fraction)
    fixed = hw.ep_fixed_us * 1e-6
    t_dispatch = fixed + max(_link_time_s(layer, hw, r, intra, inter, layer.row_bytes(),
                                          hw.nvlink_gbps), t_local)
    t_combine = fixed + max(_link_time_s(layer, hw, r, intra, inter, 2 * h, hw.nvlink_gbps),
                            2 * local_rows * 2 * h / (hw.hbm_gbps * 1e9 * hw.elementwise_fraction))
    m = t * r * layer.num_topk / layer.num_experts
    local_experts = layer.num_experts / r
    t_gemm = gemm_time_s(layer, hw, local_experts, m, masked=(mode == "low_latency"))
    t_elem = _elementwise_s(layer, hw, pairs=m * local_experts, rows=recv_rows,
                            permute=(mode != "low_latency"))
    return {"dispatch": t_dispatch, "gemm": t_gemm, "elementwise": t_elem,
            "combine": t_combine, "layer": t_dispatch + t_gemm + t_elem + t_combine,
            "recv_rows": recv_rows, "tokens_per_expert": m}


def predict_tp(layer: Layer, hw: Hardware, num_ranks: int, tokens_per_rank: int) -> dict:
    """Seconds of each part of the TP layer on one rank: all_gather, experts, reduce_scatter."""
    r, t, h = num_ranks, tokens_per_rank, layer.hidden
    g = min(r, hw.ranks_per_node)
    rows = t * (r - 1)
    fixed = hw.collective_fixed_us * 1e-6 if r > 1 else 0.0
    if r <= g:
        t_gather = fixed + rows * layer.row_bytes() / (hw.collective_gbps * 1e9)
        t_scatter = fixed + rows * 2 * h / (hw.collective_gbps * 1e9)
    else:  # a ring across nodes: every step's traffic crosses a NIC
        bw = min(hw.collective_gbps, hw.nic_gbps)
        t_gather = fixed + rows * layer.row_bytes() / (bw * 1e9)
        t_scatter = fixed + rows * 2 * h / (bw * 1e9)
    m = t * r * layer.num_topk / layer.num_experts
    t_gemm = gemm_time_s(layer, hw, layer.num_experts, m, masked=False,
                         intermediate=layer.intermediate / r)
    t_elem = _elementwise_s(layer, hw, pairs=t * r * layer.num_topk, rows=t * r, permute=True,
                            intermediate=layer.intermediate / r)
    return {"all_gather": t_gather, "gemm": t_gemm, "elementwise": t_elem,
            "reduce_scatter": t_scatter, "layer": t_gather + t_gemm + t_elem + t_scatter,
            "tokens_per_expert": m}


def _elementwise_s(layer: Layer, hw: Hardware, pairs: float, rows: float, permute: bool,
                   intermediate: float | None = None) -> float:
    """HBM bytes of the passes around the GEMMs, at ``elementwise_fraction`` of HBM."""
    h = layer.hidden
    i = intermediate if intermediate is not None else layer.intermediate
    act = layer.row_bytes()
    total = pairs * (2 * 2 * i + (i + i / 128 * 4 if layer.fp8 else 2 * i))  # SiLU * up
    if permute:
        total += pairs * 2 * act                 # permute: read + write each copy
        total += pairs * 2 * h + rows * 2 * h    # unpermute: read copies, write rows
    return total / (hw.hbm_gbps * 1e9 * hw.elementwise_fraction)


def table(layer: Layer, hw: Hardware, ranks=(2, 4, 8, 16, 32, 64, 128, 256),
          prefill_tokens: int = 4096, decode_tokens: int = 128) -> list[dict]:
    """EP and TP layer times (ms) for each rank count, prefill and decode."""
    rows = []
    for r in ranks:
        if layer.num_experts % r:
            continue
        ep_p = predict_ep(layer, hw, r, prefill_tokens, "normal")
        tp_p = predict_tp(layer, hw, r, prefill_tokens)
        ep_d = predict_ep(layer, hw, r, decode_tokens, "low_latency")
        tp_d = predict_tp(layer, hw, r, decode_tokens)
        rows.append({"ranks": r, "nodes": max(1, r // hw.ranks_per_node),
                     "ep_prefill_ms": ep_p["layer"] * 1e3, "tp_prefill_ms": tp_p["layer"] * 1e3,
                     "ep_decode_ms": ep_d["layer"] * 1e3, "tp_decode_ms": tp_d["layer"] * 1e3,
                     "prefill_tp_over_ep": tp_p["layer"] / ep_p["layer"],
                     "decode_tp_over_ep": tp_d["layer"] / ep_d["layer"]})
    return rows


def ep_wins_from(rows: list[dict], key: str) -> int | None:
    """Smallest rank count from which EP is faster at every larger count in ``rows``."""
    start = None
    for row in rows:
        if row[key] > 1.0:
            start = row["ranks"] if start is None else start
        else:
            start = None
    return start


def markdown(rows: list[dict], layer: Layer, hw: Hardware) -> str:
    lines = [f"MoE layer, hidden {layer.hidden}, intermediate {layer.intermediate}, "
             f"top-{layer.num_topk} of {layer.num_experts}, {'FP8' if layer.fp8 else 'BF16'}; "
             f"NVLink {hw.nvlink_gbps:.0f} GB/s per GPU inside a node of {hw.ranks_per_node}, "
             f"NIC {hw.nic_gbps:.0f} GB/s per GPU across nodes; per-rank layer time in ms",
             "",
             "| ranks | nodes | EP prefill | TP prefill | TP/EP | EP decode | TP decode | TP/EP |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['nodes']} | {r['ep_prefill_ms']:.3f} | "
                     f"{r['tp_prefill_ms']:.3f} | {r['prefill_tp_over_ep']:.2f} | "
                     f"{r['ep_decode_ms']:.3f} | {r['tp_decode_ms']:.3f} | "
                     f"{r['decode_tp_over_ep']:.2f} |")
    p, d = ep_wins_from(rows, "prefill_tp_over_ep"), ep_wins_from(rows, "decode_tp_over_ep")
    lines += ["", f"EP is faster from {p if p else 'no'} ranks on in prefill (4096 tokens per "
              f"rank) and from {d if d else 'no'} ranks on in decode (128 tokens per rank)."]
    return "\n".join(lines)


def hardware_from_results(gemm_json: str | None = None, moe_json: str | None = None,
                          dtype: str | None = None, **overrides) -> Hardware:
    """A ``Hardware`` whose measured fields come from ``bench/gemm.py`` and/or ``bench/moe.py``
    results (their ``calibration`` entries), the rest from the defaults or ``overrides``.
    ``dtype`` ("bf16" / "fp8"): take ``weight_stream_fraction_<dtype>`` where a result has it
    (the masked GEMM streams FP8 and BF16 weights at different fractions of HBM)."""
    hw = Hardware()
    for path in (gemm_json, moe_json):
        if not path:
            continue
        rec = json.loads(Path(path).read_text())
        cal = rec.get("calibration") or {}
        for key in ("gemm_points", "masked_points"):
            for dtype, pts in (cal.get(key) or {}).items():
                getattr(hw, key)[dtype] = [tuple(p) for p in pts]
        for key in ("hbm_gbps", "weight_stream_fraction", "elementwise_fraction", "nvlink_gbps",
                    "collective_gbps", "ep_fixed_us", "collective_fixed_us"):
            if cal.get(key) is not None:
                setattr(hw, key, float(cal[key]))
        if dtype and cal.get(f"weight_stream_fraction_{dtype}") is not None:
            hw.weight_stream_fraction = float(cal[f"weight_stream_fraction_{dtype}"])
        if rec.get("bench") == "gemm" and cal.get("hbm_gbps") is None:
            hbm = (rec.get("figures") or {}).get("hbm_read_gbps")
            if hbm:
                hw.hbm_gbps = float(hbm)
    for k, v in overrides.items():
        if v is not None:
            setattr(hw, k, v)
    return hw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="EP vs TP MoE layer cost model")
    p.add_argument("--gemm-json", help="bench/results/gemm-*.json to calibrate from")
    p.add_argument("--moe-json", help="bench/results/moe-*.json to calibrate from")
    p.add_argument("--nic-gbps", type=float, default=None, help="per-GPU NIC bandwidth (50)")
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="BF16 experts and dispatch (default FP8)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    a = p.parse_args(argv)
    hw = hardware_from_results(a.gemm_json, a.moe_json, nic_gbps=a.nic_gbps,
                               ranks_per_node=a.ranks_per_node)
    layer = Layer(fp8=not a.bf16)
    rows = table(layer, hw)
    print(markdown(rows, layer, hw))
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
