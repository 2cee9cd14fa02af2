"""bench/summary.py: internode results are held against 1.3x the NVLink kernels."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import summary  # noqa: E402

CFG = {"num_tokens": 4096, "hidden": 7168, "num_topk": 8, "num_experts": 256, "num_sms": 24}


def _rec(bench, us, cfg=CFG):
    return {"bench": bench, "backend": "kernels", "num_ranks": 2, "status": "ok", "config": cfg,
            "figures": {"dispatch_bf16_us": us, "dispatch_bf16_gbps": 300.0, "combine_us": us}}


def test_internode_rows_compare_with_the_nvlink_run_of_the_same_size():
    rows = summary.summary_rows([_rec("normal", 300.0), _rec("internode", 360.0)])
    inter = [r for r in rows if r[0] == "internode" and r[3] == "dispatch_bf16"]
    assert len(inter) == 1
    assert "390" in inter[0][6] and "1.3x NVLink" in inter[0][6]
    assert inter[0][7] == f"{390 / 360:.2f}x"


def test_internode_rows_without_a_matching_nvlink_run_have_no_target():
    other = dict(CFG, num_tokens=1024)
    rows = summary.summary_rows([_rec("normal", 300.0, other), _rec("internode", 360.0)])
    inter = [r for r in rows if r[0] == "internode" and r[3] == "dispatch_bf16"]
    assert inter and inter[0][6] == "" and inter[0][7] == ""


def test_a_missing_result_is_a_failed_row_for_the_steps_own_backends_only(tmp_path):
    """The moe bench runs without nccl: its step names its backends, so no false FAIL row."""
    text = summary.summarize(tmp_path, ["nccl", "kernels"],
                             ["moe:1:0:kernels", "normal:1:124"])
    failed = [line for line in text.splitlines() if "no result" in line]
    assert len(failed) == 3, text  # moe/kernels, normal/nccl, normal/kernels
    assert not any(line.startswith("moe") and "nccl" in line for line in failed), text
    assert all("timed out" in line for line in failed if line.startswith("normal")), text


def test_gpu_slug_names_the_model_not_the_memory():
    """Result files are named by the GPU model (the soak once wrote ``soak-...-hbm3.json``)."""
    import common
    assert common.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert common.gpu_slug("NVIDIA H200") == "h200"
    assert common.gpu_slug("Tesla V100-SXM2-16GB") == "v100sxm216gb"
    assert common.gpu_slug("") == "gpu"
