"""The cost models: ep_comm.moe.cost_model (EP vs TP layer) and bench/internode_model.py."""
import json
import math
import os
import sys

import pytest

from ep_comm.moe import cost_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import internode_model  # noqa: E402


def test_rank_hit_probability_matches_counting():
    layer = cost_model.Layer(num_experts=16, num_topk=2)
    # 4 ranks x 4 experts: a token misses a rank when both experts lie in the other 12
    assert cost_model.rank_hit_probability(layer, 4) == pytest.approx(1 - math.comb(12, 2) / math.comb(16, 2))
    assert cost_model.rank_hit_probability(layer, 1) == 1.0


def test_ep_and_tp_predictions_add_up_and_grow_with_tokens():
    layer, hw = cost_model.Layer(), cost_model.Hardware()
    for r in (2, 16):
        ep = cost_model.predict_ep(layer, hw, r, 4096)
        assert ep["layer"] == pytest.approx(ep["dispatch"] + ep["gemm"] + ep["elementwise"] + ep["combine"])
        assert cost_model.predict_ep(layer, hw, r, 8192)["layer"] > ep["layer"]
        tp = cost_model.predict_tp(layer, hw, r, 4096)
        assert tp["layer"] == pytest.approx(tp["all_gather"] + tp["gemm"] + tp["elementwise"] + tp["reduce_scatter"])


def test_routing_stats_match_closed_forms():
    # one node: everything stays home
    s = internode_model.routing_stats(8, 8, samples=4000)
    assert s["nodes"] == 1 and s["remote_nodes"] == 0
    # 2 nodes (top-4 nodes allows both): uniform routing, so distinct ranks follow the
    # closed form and a token misses a node only when all 8 experts lie in the other one
    s = internode_model.routing_stats(16, 8, samples=20000)
    layer = cost_model.Layer()
    assert s["ranks"] == pytest.approx(16 * cost_model.rank_hit_probability(layer, 16), rel=0.01)
    p_one = 2 * math.comb(128, 8) / math.comb(256, 8)
    assert s["nodes"] == pytest.approx(2 - p_one, abs=0.01)
    assert s["remote_nodes"] == pytest.approx((2 - p_one) - (1 - p_one / 2), abs=0.02)
    # 8 nodes, top-4 nodes: at most 4 distinct nodes per token
    s = internode_model.routing_stats(64, 8, samples=4000)
    assert 3 < s["nodes"] <= 4 and s["remote_nodes"] < s["nodes"]


def test_internode_model_phases_and_counted_bandwidth():
    p = {"nic_gbps": 50.0, "nvl_gbps": 150.0, "fixed_us": 20.0, "hbm_gbps": 2000.0}
    stats = {"nodes": 3.0, "remote_nodes": 2.5, "ranks": 6.0}
    r = internode_model.predict(stats, p, 4096, 7168, 8, 8)
    for op in ("dispatch", "combine"):
        x = r[op]
        assert x["serial_us"] == pytest.approx(20 + sum(x["phases_us"].values()))
        assert x["pipelined_us"] == pytest.approx(20 + max(x["phases_us"].values()))
        assert x["pipelined_rdma_gbps"] > x["serial_rdma_gbps"]
    # the network phase is the slot bytes of the remote copies over the NIC
    slot = 7168 + 7168 / 128 * 4 + 16 + 4 * 8 + 8 * 8
    assert r["dispatch"]["phases_us"]["network"] == pytest.approx(4096 * 2.5 * slot / 50e9 * 1e6)
    # twice the NIC bandwidth halves the network phase
    r2 = internode_model.predict(stats, dict(p, nic_gbps=100.0), 4096, 7168, 8, 8)
    assert r2["dispatch"]["phases_us"]["network"] == pytest.approx(r["dispatch"]["phases_us"]["network"] / 2)


def test_internode_model_reads_measured_parameters(tmp_path):
    # A 2-GPU normal run and an internode token sweep feed the NVLink fraction and fixed cost.
    import json
    (tmp_path / "normal-kernels-2r-h200.json").write_text(json.dumps(
        {"status": "ok", "device": "NVIDIA H200 x 2", "figures": {"dispatch_bf16_gbps": 381.6}}))
    (tmp_path / "internode-kernels-2r-h200.json").write_text(json.dumps(
        {"status": "ok", "device": "NVIDIA H200 x 2", "figures": {},
         "sweep_tokens": [{"num_tokens": 1024, "dispatch_bf16_us": 80.0},
                          {"num_tokens": 256, "dispatch_bf16_us": 31.5}]}))
    # shared-GPU runs never feed the model
    (tmp_path / "internode-kernels-4r-h200-shared.json").write_text(json.dumps(
        {"status": "ok", "device": "NVIDIA H200 x 2 (ranks sharing GPUs)", "figures": {},
         "sweep_tokens": [{"num_tokens": 1, "dispatch_bf16_us": 9999.0}]}))
    args = internode_model.argparse.Namespace(nic_gbps=50.0, nvl_gbps=None, fixed_us=None,
                                              hbm_gbps=None, out=str(tmp_path))
    p, src = internode_model.parameters(args)
    assert p["fixed_us"] == 31.5 and "measured" in src["fixed_us"]
    assert p["nvl_gbps"] == pytest.approx(160 * 381.6 / 2 / 477)
    assert "measured" in src["nvl_gbps"]


def test_hardware_from_gemm_results_takes_the_weight_stream_fraction_of_the_dtype(tmp_path):
    # bench/gemm.py's calibration: HBM bandwidth and, per dtype, the decode-regime fraction of it
    # at which the masked GEMM streams weights; the decode GEMM time follows it.
    path = tmp_path / "gemm-kernels-1r-x.json"
    path.write_text(json.dumps({"bench": "gemm", "calibration": {
        "hbm_gbps": 4000.0, "weight_stream_fraction_bf16": 0.97,
        "weight_stream_fraction_fp8": 0.5}}))
    fp8 = cost_model.hardware_from_results(gemm_json=str(path), dtype="fp8")
    bf16 = cost_model.hardware_from_results(gemm_json=str(path), dtype="bf16")
    plain = cost_model.hardware_from_results(gemm_json=str(path))
    assert fp8.hbm_gbps == bf16.hbm_gbps == 4000.0
    assert (fp8.weight_stream_fraction, bf16.weight_stream_fraction) == (0.5, 0.97)
    assert plain.weight_stream_fraction == cost_model.Hardware().weight_stream_fraction
    layer = cost_model.Layer(7168, 2048, 256, 8, fp8=True)
    t_half = cost_model.gemm_time_s(layer, fp8, 256, 1, masked=True)
    fp8.weight_stream_fraction = 1.0
    assert t_half == pytest.approx(2 * cost_model.gemm_time_s(layer, fp8, 256, 1, masked=True))
