"""Mutation score of the CPU tests: a fixed list of targeted mutations of the host code, each
applied to a temporary copy of the repository, and the few CPU tests that should catch it run
against that copy (PYTHONPATH and the working directory point at the copy, so the rank
processes the tests spawn import the mutated package too).

A mutant is *killed* when its tests fail (or time out: a mutation that makes a wait hang is
caught by the suite's own timeouts too, only more slowly), and *survives* when they pass.
Every mutation must apply to the source exactly once, and the unmutated copy must pass every
selected test first (otherwise the score would count broken tests as kills).

Usage:  python bench/mutation.py [--only ID ...] [--timeout S] [--jobs N] [--out PATH]
Writes bench/results/mutation-cpu.json: the score, and per mutant its target, what it breaks,
the tests run, the outcome, the seconds, and for a survivor why it survives.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("ep_comm", "tests", "kernels", "pyproject.toml")

# ------------------------------------------------------------------ test selections
T = "tests/"
ROUTING = [T + "test_routing.py"]
LAYOUT = [T + "test_routing.py", T + "test_normal_reference.py::test_layout_counts_tokens_per_node"]
FP8 = [T + "test_fp8_oracle.py"]
NORMAL = [T + "test_normal_reference.py::test_dispatch_combine_duplicate_ids_holes_and_unrouted_tokens[bf16-2]",
          T + "test_normal_reference.py::test_dispatch_combine_random_routing_with_bias[11-4]"]
NORMAL_FP8 = [T + "test_normal_reference.py::test_cached_fp8_dispatch_is_the_oracles_cast",
              T + "test_normal_reference.py::test_dispatch_combine_duplicate_ids_holes_and_unrouted_tokens[fp8-2]"]
NO_TOPK = [T + "test_normal_reference.py::test_dispatch_without_topk_idx"]
ALIGN = [T + "test_normal_reference.py::test_dispatch_expert_alignment_rounds_counts"]
WORST = [T + "test_normal_reference.py::test_dispatch_num_worst_tokens_pads_with_minus_one",
         T + "test_normal_reference.py::test_num_worst_tokens_overflow_is_a_clear_error[2]"]
LL = [T + "test_low_latency_reference.py::test_ll_skewed_routing[dup]",
      T + "test_low_latency_reference.py::test_ll_bf16_random_routing_matches_oracle[1-2]"]
LL_FP8 = [T + "test_low_latency_reference.py::test_ll_fp8_rounded_and_ue8m0_scales[True-False]",
          T + "test_low_latency_reference.py::test_ll_fp8_payload_and_scales_are_exact[2]"]
LL_STATS = [T + "test_low_latency_reference.py::test_wait_cost_stats_grow_for_a_late_peer[2]"]
LL_CUM = [T + "test_low_latency_reference.py::test_ll_many_rounds_with_stats"]
TIMEOUT_PEER = [T + "test_timeouts_reference.py::test_low_latency_timeout_names_the_peer_that_never_calls"]


def checks(*names):
    return [T + f"test_input_checks.py::test_bad_input_raises_clear_error[{n}]" for n in names]


CARVER = [T + "test_regions_carver.py"]
LL_REGIONS = [T + "test_low_latency_host.py::test_regions_are_aligned_disjoint_and_inside_the_total",
              T + "test_low_latency_host.py::test_region_sizes_follow_the_documented_layout"]
NVL_REGIONS = [T + "test_intranode_host.py"]
AGREE_KERNEL = [T + "test_kernel_agreement.py"]
EXPAND = [T + "test_elastic_expand_host.py"]
INTER_REGIONS = [T + "test_internode_host.py"]
LL_BAD_ID = [T + "test_low_latency_host.py::test_bad_id_found_by_the_dispatch_kernel_is_an_input_error_then_cleared"]
LL_TAGS = [T + "test_low_latency_host.py"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    target: str                        # file the mutation edits
    breaks: str                        # what the mutation does, in words
    edits: tuple                       # ((find, replace), ...): each ``find`` occurs once
    tests: tuple
    equivalent: str = ""               # set when the mutant is known to be equivalent: why


def M(id, target, breaks, edits, tests, equivalent=""):
    if isinstance(edits[0], str):
        edits = (edits,)
    return Mutant(id, target, breaks, tuple(tuple(e) for e in edits), tuple(tests), equivalent)


R, F, B = "ep_comm/core/routing.py", "ep_comm/core/fp8.py", "ep_comm/backends/reference.py"
C, H, G = "ep_comm/core/checks.py", "ep_comm/handles.py", "ep_comm/core/regions.py"
S, A = "ep_comm/backends/kernels/status.py", "ep_comm/core/agreement.py"
KB, KI = "ep_comm/backends/kernels/backend.py", "ep_comm/backends/kernels/intranode.py"
KL = "ep_comm/backends/kernels/low_latency.py"

MUTANTS = [
    # ---------------------------------------------------------------- routing / layout math
    M("routing-expert0-as-none", R, "expert 0 treated like -1 in token_ranks",
      ("torch.where(topk_idx >= 0, torch.div", "torch.where(topk_idx > 0, torch.div"), ROUTING),
    M("routing-rank-column-shift", R, "is_token_in_rank keeps the wrong columns",
      ("return hit[:, :num_ranks].contiguous()", "return hit[:, 1:num_ranks + 1].contiguous()"),
      ROUTING),
    M("routing-per-rank-off-by-one", R, "num_tokens_per_rank off by one",
      ("per_rank = in_rank.sum(dim=0, dtype=torch.int32)",
       "per_rank = in_rank.sum(dim=0, dtype=torch.int32) + 1"), ROUTING),
    M("routing-duplicates-counted-per-slot", R, "the duplicate-id bug: per-expert counts per slot",
      ("repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]", "repeat[:, 1:] = False"), ROUTING),
    M("routing-expert0-not-counted", R, "per-expert count skips expert 0",
      ("distinct[distinct >= 0]", "distinct[distinct > 0]"), ROUTING),
    M("routing-per-node-all", R, "a token counts for a node only if all its ranks are hit",
      ("in_rank.view(-1, num_nodes, ranks_per_node).any(dim=2)",
       "in_rank.view(-1, num_nodes, ranks_per_node).all(dim=2)"), LAYOUT),
    M("routing-per-node-on-one-node", R, "num_tokens_per_rdma_rank given for a single node",
      ("if num_nodes > 1:", "if num_nodes >= 1:"), LAYOUT),
    M("routing-send-position-off-by-one", R, "send positions start at 1",
      ("dim=0, dtype=torch.int32) - 1", "dim=0, dtype=torch.int32)"), ROUTING),
    M("routing-local-topk-boundary", R, "local_topk_idx keeps the first expert of the next rank",
      ("(topk_idx < lo + experts_per_rank)", "(topk_idx <= lo + experts_per_rank)"), ROUTING),
    # ---------------------------------------------------------------- fp8 format
    M("fp8-scale-over-240", F, "scale = amax / 240 instead of / 448",
      ("scale = amax / torch.full_like(amax, FP8_MAX)", "scale = amax / torch.full_like(amax, 240.0)"),
      FP8),
    M("fp8-ceil-pow2-doubles-powers", F, "exact powers of two rounded up to the next one",
      ("exponent = exponent - (mantissa == 0.5).to(exponent.dtype)", "exponent = exponent"), FP8),
    M("fp8-ue8m0-byte-order-reversed", F, "ue8m0 bytes packed and unpacked big-endian (both)",
      (("return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)",
        "return b[..., 3] | (b[..., 2] << 8) | (b[..., 1] << 16) | (b[..., 0] << 24)"),
       ("parts = [(packed >> (8 * j)) & 0xFF for j in range(4)]",
        "parts = [(packed >> (8 * (3 - j))) & 0xFF for j in range(4)]")), FP8),
    M("fp8-amax-floor-raised", F, "amax floor 1e-3 instead of 1e-4",
      ("amax = xf.abs().amax(dim=-1).clamp(min=AMAX_MIN)",
       "amax = xf.abs().amax(dim=-1).clamp(min=AMAX_MIN * 10)"), FP8),
    M("fp8-round-scale-ignored", F, "round_scale has no effect without ue8m0",
      ("if round_scale or use_ue8m0:", "if use_ue8m0:"), FP8 + LL_FP8),
    M("fp8-dequantize-divides", F, "dequantize divides by the scale",
      ("return (xf * scales.unsqueeze(-1)).view(x_fp8.shape)",
       "return (xf / scales.unsqueeze(-1)).view(x_fp8.shape)"), FP8),
    M("fp8-unpack-exponent-off-by-one", F, "unpacked ue8m0 scales twice too large",
      ("return (exp_bytes << 23).view(torch.float32)",
       "return ((exp_bytes + 1) << 23).view(torch.float32)"), FP8),
    M("fp8-pack-drops-high-byte", F, "the fourth scale of each word is lost",
      ("| (b[..., 3] << 24)", ""), FP8),
    # ---------------------------------------------------------------- reference: normal mode
    M("ref-scales-doubled-on-cached", B, "fp8 scales doubled when no top-k is passed (cached)",
      ("recv_scales = exchange(x_scales, 0) if x_scales is not None else None",
       "recv_scales = exchange(x_scales * (1 if topk_idx is not None else 2), 0) "
       "if x_scales is not None else None"), NORMAL_FP8),
    M("ref-last-row-dropped", B, "the last received row is zeroed",
      ("            return out\n\n        recv_x = exchange(x, 0)",
       "            if n_recv:\n                out[n_recv - 1] = 0\n            return out\n\n"
       "        recv_x = exchange(x, 0)"), NORMAL),
    M("ref-source-rank-order", B, "recv_src_rank labels sources in reverse",
      ("torch.arange(r, dtype=torch.int32, device=dev), matrix[:, me])",
       "torch.arange(r, dtype=torch.int32, device=dev).flip(0), matrix[:, me].flip(0))"), NORMAL),
    M("ref-source-index-order", B, "recv_src_idx of each source in reverse order",
      ("my_idx = torch.cat([torch.nonzero(is_token_in_rank[:, j]).flatten()",
       "my_idx = torch.cat([torch.nonzero(is_token_in_rank[:, j]).flatten().flip(0)"), NORMAL),
    M("ref-expert-count-max", B, "received per-expert counts: max over sources, not the sum",
      ("recv_per_expert = expert_counts.view(r, per_rank).sum(dim=0, dtype=torch.int32)",
       "recv_per_expert = expert_counts.view(r, per_rank).amax(dim=0).to(torch.int32)"), NORMAL),
    M("ref-alignment-skipped", B, "num_recv_tokens_per_expert_list not rounded to the alignment",
      ("count_list = [align(c, expert_alignment) for c in counts]", "count_list = counts"), ALIGN),
    M("ref-local-topk-boundary", B, "received top-k keeps the next rank's first expert",
      ("(sent >= lo) & (sent < lo + per_rank)", "(sent >= lo) & (sent <= lo + per_rank)"), NORMAL),
    M("ref-weights-slot-order", B, "received weights in reversed slot order",
      ("recv_topk_weights = exchange(topk_weights, 0.0)",
       "recv_topk_weights = exchange(topk_weights.flip(1).contiguous(), 0.0)"), NORMAL),
    M("ref-worst-overflow-unchecked", B, "num_worst_tokens overflow not checked",
      ("if num_worst_tokens and n_recv > num_worst_tokens:", "if False:"), WORST),
    M("ref-worst-padding-topk", B, "padding rows of recv_topk_idx are 0, not -1",
      ("recv_topk_idx = torch.full((rows, topk_idx.shape[1]), -1, dtype=topk_idx.dtype,",
       "recv_topk_idx = torch.full((rows, topk_idx.shape[1]), 0, dtype=topk_idx.dtype,"), WORST),
    M("ref-bias-pair-second-lost", B, "only the first tensor of a bias pair is added",
      ("for b in biases:\n            acc += b.float()", "for b in biases[:1]:\n            acc += b.float()"),
      NORMAL),
    M("ref-combine-last-wins", B, "combine keeps one row per token instead of the sum",
      ("acc.index_add_(0, send_idx, back.float())", "acc.index_copy_(0, send_idx, back.float())"),
      NORMAL),
    M("ref-combine-weights-lost", B, "combined_topk_weights not returned",
      ("combined_w = gather_back(topk_weights) if topk_weights is not None else None",
       "combined_w = None"), NORMAL),
    M("ref-no-topk-skips-counts", B, "dispatch without top-k returns no counts",
      ("counts = handle.num_recv_tokens_per_expert.tolist()",
       "counts = handle.num_recv_tokens_per_expert.tolist() if topk_idx is not None else []"),
      NO_TOPK),
    # ---------------------------------------------------------------- reference: low latency
    M("ll-duplicates-counted-per-slot", B, "low-latency counts a token once per slot",
      ("cnts.append(len(sel))", "cnts.append(int((topk_idx == p * per_rank + e).sum()))"), LL),
    M("ll-cumulative-stats-not-added", B, "cumulative_local_expert_recv_stats never added to",
      ("cumulative_local_expert_recv_stats.add_(recv_count)",
       "cumulative_local_expert_recv_stats.add_(recv_count * 0)"), LL_CUM),
    M("ll-dispatch-wait-stats-noop", B, "dispatch wait-cost statistics never added to",
      ("dispatch_wait_recv_cost_stats[p] += ns", "dispatch_wait_recv_cost_stats[p] += 0"), LL_STATS),
    M("ll-combine-wait-stats-noop", B, "combine wait-cost statistics never added to",
      ("combine_wait_recv_cost_stats[p] += int((agree_wait",
       "combine_wait_recv_cost_stats[p] += 0 * int((agree_wait"), LL_STATS),
    M("ll-src-info-off-by-one", B, "src_info one past the token index",
      ("src_info[e, begin:begin + n] = recvs[(\"src\", p)][sl]",
       "src_info[e, begin:begin + n] = recvs[(\"src\", p)][sl] + 1"), LL),
    M("ll-range-begin-zero", B, "every range begins at row 0",
      ("range_begin[e, p], range_count[e, p] = begin, n", "range_begin[e, p], range_count[e, p] = 0, n"),
      LL),
    M("ll-duplicate-weights-max", B, "a token naming one expert twice gets one weight, not the sum",
      ("w = (topk_weights * (topk_idx == p * per_rank + e)).sum(dim=1)[toks]",
       "w = (topk_weights * (topk_idx == p * per_rank + e)).amax(dim=1)[toks]"), LL),
    M("ll-round-scale-ignored", B, "the low-latency cast ignores round_scale",
      ("fp8.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)",
       "fp8.per_token_cast_to_fp8(x, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)"), LL_FP8),
    M("ll-scales-swapped-blocks", B, "received scales of the first two blocks swapped",
      ("recv_scales[e, begin:begin + n] = recvs[(\"s\", p)][sl]",
       "recv_scales[e, begin:begin + n] = recvs[(\"s\", p)][sl][:, [1, 0, *range(2, recvs[(\"s\", p)].shape[1])]]"),
      LL_FP8),
    # ---------------------------------------------------------------- checks
    M("check-dtype-skipped", C, "tensor dtype never checked",
      ("if t.dtype not in allowed:", "if False:"), checks("x_dtype", "topk_dtype")),
    M("check-dims-skipped", C, "number of dims never checked",
      ("if dims is not None and t.dim() != dims:", "if False:"), checks("x_dims")),
    M("check-shape-entries-skipped", C, "only the rank of a shape is checked",
      ("if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):",
       "if t.dim() != len(shape):"), checks("layout_rows", "weights_shape", "fp8_scales_shape")),
    M("check-contiguity-skipped", C, "non-contiguous input accepted",
      ("if contiguous and not t.is_contiguous():", "if False:"), checks("x_noncontiguous")),
    M("check-experts-divisible-skipped", C, "num_experts not divisible by ranks accepted",
      ("if e % num_ranks:", "if False:"), checks("experts_not_divisible")),
    M("check-alignment-zero-accepted", C, "expert_alignment=0 accepted",
      ("expert_alignment < 1:", "expert_alignment < 0:"), checks("alignment")),
    M("check-comm-stream-flags-skipped", C, "allocate_on_comm_stream without async accepted",
      ("if allocate_on_comm_stream and (previous_event is None or not async_finish):", "if False:"),
      checks("comm_stream_flags")),
    M("check-topk-rows-skipped", C, "topk_idx rows not compared with x",
      ("if num_tokens is not None and t.shape[0] != num_tokens:", "if False:"), checks("topk_rows")),
    # ---------------------------------------------------------------- handles
    M("handle-recv-rows-ignore-worst", H, "num_recv_rows ignores num_worst_tokens",
      ("return self.num_worst_tokens if self.num_worst_tokens > 0 else self.num_recv_tokens",
       "return self.num_recv_tokens"), WORST),
    M("handle-num-tokens-off-by-one", H, "handle.num_tokens one short",
      ("return self.is_token_in_rank.shape[0]", "return self.is_token_in_rank.shape[0] - 1"),
      NORMAL[:1]),
    # ---------------------------------------------------------------- regions
    M("regions-claims-overlap", G, "consecutive regions overlap by one byte",
      ("self._top = align(self._top + nbytes, REGION_ALIGN)",
       "self._top = align(self._top + nbytes - 1, REGION_ALIGN)"), CARVER + LL_REGIONS),
    M("regions-ll-message-without-header", G, "low-latency messages lose their 16-byte header",
      ("return align(16 + max(hidden * 2, fp8), 16)", "return align(max(hidden * 2, fp8), 16)"),
      LL_REGIONS),
    M("regions-nvl-slot-without-topk", G, "normal-mode slots reserve no room for the expanded "
      "positions (ids, weights and positions: 12 bytes per top-k entry)",
      ("return align(hidden_bytes + scales + NORMAL_MAX_TOPK * 12 + 16, 16)",
       "return align(hidden_bytes + scales + NORMAL_MAX_TOPK * 8 + 16, 16)"), NVL_REGIONS),
    M("regions-inter-scales-half", G, "internode slot: the scales get half their bytes",
      ("idx = align(scales + self.num_scales * 4, 16)", "idx = align(scales + self.num_scales * 2, 16)"),
      INTER_REGIONS),
    # ---------------------------------------------------------------- kernels backend, host side
    # (the fake GPU of tests/fake_gpu.py runs the real host Python with recorded launches)
    M("status-disagree-ignores-the-rows", S, "a notify refusal decoded without the signature rows "
      "(a generic error instead of the reference's CollectiveMismatchError)",
      ("if code == STATUS_DISAGREE and call_sigs:", "if code == STATUS_DISAGREE and not call_sigs:"),
      AGREE_KERNEL),
    M("agreement-device-words-drop-the-op", A, "the op word never differs between ranks",
      ("    values = _values(seq, sig, input_error)\n",
       "    values = _values(seq, sig, input_error)\n    values[1] = 0\n"), AGREE_KERNEL),
    M("kernels-never-fuse-the-agreement", KB, "the kernels backend still agrees on the host for "
      "a dispatch the notify kernel checks (an extra round trip)",
      ("return (op == \"dispatch\" and waits_for_counts", "return (op == \"never\" and waits_for_counts"),
      AGREE_KERNEL),
    M("expand-positions-count-the-entry-itself", KI, "each expanded position is one too high",
      ("- torch.searchsorted(keys, keys)", "- torch.searchsorted(keys, keys) + 1"), EXPAND),
    M("device-bad-id-named-as-a-peer", A, "this rank's own bad id, found on the device, is "
      "raised as a PeerInputError naming itself",
      ("        if r == rank:\n", "        if r == -1:\n"), AGREE_KERNEL),
    M("layout-kernel-gets-no-id-record", KI, "the layout kernel is not given the bad-id record "
      "(its per-call id check never runs)",
      ("LayoutKernel(self.num_ranks, self.device, self._id_check.data_ptr())",
       "LayoutKernel(self.num_ranks, self.device)"), AGREE_KERNEL),
    M("ll-bad-id-never-raised", S, "the low-latency dispatch kernel's bad-id report is never "
      "decoded (the id is dropped silently)",
      ("or not words[LL_INFO_BAD_ID]:", "or True:"), LL_BAD_ID),
    M("ll-bad-id-claim-kept", KL, "the reporter's claim is not released: later bad ids are "
      "never reported", ('at = reg["status_claim"].offset + 4', 'at = reg["status_claim"].offset + 8'),
      LL_BAD_ID),
    M("ll-agreement-off-by-default", A, "the low-latency count words carry no call tag unless "
      "asked for", ('return os.environ.get(LL_AGREE_ENV, "1") != "0"',
                    'return os.environ.get(LL_AGREE_ENV, "0") != "0"'), LL_TAGS),
    M("expand-base-over-num-recv", KI, "the expand bases overlap the received-count word",
      ("expand_base = small[r * r + local + r + 1:]", "expand_base = small[r * r + local + r:]"),
      EXPAND),
]


# ------------------------------------------------------------------ running
def make_copy(dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in COPIED:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name),
                            ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        else:
            shutil.copy2(src, os.path.join(dst, name))


def run_tests(copy: str, tests, timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, tail of the output) of pytest in ``copy``."""
    env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1",
               EP_COMM_TEST_SEED=os.environ.get("EP_COMM_TEST_SEED", "12345"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the session holds pytest and its rank processes
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - t0, out[-3000:]
    return ("passed" if proc.returncode == 0 else "failed"), time.monotonic() - t0, out[-3000:]


def apply(copy: str, mutant: Mutant) -> str:
    """Apply the mutant's edits to ``copy``; returns the original text (to restore)."""
    path = os.path.join(copy, mutant.target)
    original = open(path).read()
    text = original
    for find, replace in mutant.edits:
        n = text.count(find)
        if n != 1:
            raise ValueError(f"{mutant.id}: {find!r} occurs {n} times in {mutant.target}")
        text = text.replace(find, replace)
    with open(path, "w") as f:
        f.write(text)
    return original


def run_mutant(copy: str, mutant: Mutant, timeout: float) -> dict:
    path = os.path.join(copy, mutant.target)
    original = apply(copy, mutant)
    try:
        outcome, secs, tail = run_tests(copy, mutant.tests, timeout)
    finally:
        with open(path, "w") as f:
            f.write(original)
    killed = outcome != "passed"
    rec = {"id": mutant.id, "target": mutant.target, "breaks": mutant.breaks,
           "tests": list(mutant.tests), "outcome": outcome, "killed": killed,
           "seconds": round(secs, 1)}
    if killed:
        lines = [ln for ln in tail.splitlines() if ln.startswith(("FAILED", "ERROR", "E "))]
        last = tail.strip().splitlines()[-1:] or ["(no output)"]
        rec["caught_by"] = (lines[0] if lines else last[0])[:300]
    else:
        rec["why_it_survives"] = mutant.equivalent or "NOT EXPLAINED: the selected tests miss it"
    print(f"{'killed ' if killed else 'SURVIVED'} {mutant.id:40s} {outcome:8s} {secs:6.1f} s",
          flush=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per mutant")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (one copy each)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "mutation-cpu.json"))
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids)), "duplicate mutant ids"
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="ep_comm_mutation_")
    try:
        copies = [os.path.join(tmp, f"copy{j}") for j in range(max(1, args.jobs))]
        for c in copies:
            make_copy(c)
        for m in mutants:  # every edit must apply exactly once before anything runs
            original = apply(copies[0], m)
            with open(os.path.join(copies[0], m.target), "w") as f:
                f.write(original)
        baseline = None
        if not args.skip_baseline:
            union = sorted({t for m in mutants for t in m.tests})
            outcome, secs, tail = run_tests(copies[0], union, args.timeout * 4)
            baseline = {"outcome": outcome, "seconds": round(secs, 1), "tests": len(union)}
            print(f"baseline (unmutated, {len(union)} selections): {outcome} in {secs:.0f} s",
                  flush=True)
            if outcome != "passed":
                print(tail)
                return 2
        records = [None] * len(mutants)
        free = list(copies)

        def work(i):
            copy = free.pop()
            try:
                records[i] = run_mutant(copy, mutants[i], args.timeout)
            finally:
                free.append(copy)

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            list(pool.map(work, range(len(mutants))))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    killed = sum(r["killed"] for r in records)
    survivors = [r for r in records if not r["killed"]]
    result = {
        "bench": "mutation", "backend": "reference", "device": "cpu",
        "host": platform.node(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": os.environ.get("EP_COMM_TEST_SEED", "12345"),
        "mutants": len(records), "killed": killed,
        "score": round(killed / max(1, len(records)), 4),
        "target_score": 0.95,
        "survivors": [{"id": r["id"], "why": r["why_it_survives"]} for r in survivors],
        "baseline": baseline, "per_mutant_timeout_s": args.timeout,
        "total_seconds": round(time.monotonic() - t_start, 1),
        "results": records,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"score {killed}/{len(records)} = {result['score']:.1%} killed; "
          f"{len(survivors)} survivor(s); {result['total_seconds']:.0f} s; -> {args.out}")
    for r in survivors:
        print(f"  survivor {r['id']}: {r['why_it_survives']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
