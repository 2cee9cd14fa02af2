"""The suite's closing table: one line per figure of a folder of benchmark results, held
against the reference figures measured on the same kind of machine (HARDWARE.md).

    python bench/summary.py --dir bench/results [--backends b1,b2 --expect bench:ranks:rc ...]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tables import fmt, format_table

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


#: Reference figures (HARDWARE.md, 2026-11-22/23, H200) that a result is compared with when it
#: was run at the default sizes: (bench, backend, ranks) -> {figure: (value, source)}.
#: kernels: DeepEP v1 (the target); nccl: NCCL all_to_all_single alone; reference: naive EP in
#: torch (layout, count exchange, host sync, permute, a2a), which the reference backend is.
TARGETS = {
    ("normal", "kernels", 2): {"dispatch_bf16_gbps": 340, "dispatch_bf16_us": 344,
                               "dispatch_fp8_gbps": 246, "dispatch_fp8_us": 245,
                               "combine_gbps": 287, "combine_us": 407, "layout_us": 34},
    ("normal", "kernels", 4): {"dispatch_bf16_gbps": 261, "dispatch_bf16_us": 810,
                               "dispatch_fp8_gbps": 255, "dispatch_fp8_us": 430,
                               "combine_gbps": 355, "combine_us": 600, "layout_us": 40},
    ("normal", "nccl", 2): {"dispatch_bf16_us": 289, "dispatch_bf16_gbps": 405},
    ("normal", "nccl", 4): {"dispatch_bf16_us": 630, "dispatch_bf16_gbps": 337},
    ("normal", "reference", 2): {"dispatch_bf16_notify_us": 1080, "combine_us": 980},
    ("normal", "reference", 4): {"dispatch_bf16_notify_us": 1660, "combine_us": 1700},
    ("low_latency", "kernels", 2): {"dispatch_us": 28, "combine_us": 41, "dispatch_combine_us": 72},
    ("low_latency", "kernels", 4): {"dispatch_us": 34, "combine_us": 56, "dispatch_combine_us": 94},
    ("low_latency", "nccl", 2): {"dispatch_us": 86},
    ("low_latency", "nccl", 4): {"dispatch_us": 100},
    ("low_latency", "reference", 2): {"dispatch_us": 510, "combine_us": 140},
    ("low_latency", "reference", 4): {"dispatch_us": 1150, "combine_us": 290},
}
_TARGET_SOURCE = {"kernels": "DeepEP", "nccl": "NCCL", "reference": "naive"}
#: The sizes the reference figures were measured at.
_DEFAULT_SIZES = {"normal": {"num_tokens": 4096, "hidden": 7168, "num_topk": 8, "num_experts": 256},
                  "low_latency": {"num_tokens": 128, "hidden": 7168, "num_topk": 8,
                                  "num_experts": 256}}


#: Internode results (simulated nodes on one host) against the NVLink kernels of the same run
#: and size: at most this many times their time (issue target).
INTERNODE_VS_NVLINK = 1.3


def _internode_targets(records: list[dict]) -> dict:
    """{ranks: {figure_us: target}} for internode/kernels results: INTERNODE_VS_NVLINK x the
    normal/kernels time of the same ranks and sizes in ``records``."""
    out = {}
    for rec in records:
        if (rec.get("bench"), rec.get("backend"), rec.get("status", "ok")) != ("normal", "kernels", "ok"):
            continue
        twins = [r for r in records if (r.get("bench"), r.get("backend")) == ("internode", "kernels")
                 and r.get("num_ranks") == rec.get("num_ranks") and r.get("config") == rec.get("config")]
        if twins:
            out[rec["num_ranks"]] = {k: INTERNODE_VS_NVLINK * v for k, v in rec["figures"].items()
                                     if k.endswith("_us") and isinstance(v, (int, float))}
    return out


def target_for(record: dict, figure: str, internode: dict | None = None):
    """(value, source) of the reference figure for this result, or None."""
    bench, backend, ranks = record.get("bench"), record.get("backend"), record.get("num_ranks")
    if bench == "internode" and backend == "kernels":
        value = (internode or {}).get(ranks, {}).get(figure)
        return None if value is None else (round(value, 1), f"{INTERNODE_VS_NVLINK}x NVLink")
    sizes = _DEFAULT_SIZES.get(bench)
    cfg = record.get("config", {})
    if not sizes or any(cfg.get(k) != v for k, v in sizes.items()):
        return None
    if bench == "normal" and cfg.get("num_sms", 24) != 24:
        return None
    value = TARGETS.get((bench, backend, ranks), {}).get(figure)
    return None if value is None else (value, _TARGET_SOURCE[backend])


def summary_rows(records: list[dict]) -> list[list]:
    """Rows of the summary table: bench, backend, ranks, figure, us, GB/s, target, vs target.

    A figure's ``_us`` and ``_gbps`` share a row; hook-mode send and receive times share one
    (``send + recv``); imbalance results give one row per mode and phase; a result that is not
    ``ok`` gives one row with its status and reason. "vs target" > 1 means better than the
    target (from the time when there is one, else from the bandwidth).
    """
    rows = []
    internode = _internode_targets(records)
    for rec in sorted(records, key=lambda r: (r.get("bench", ""), -int(r.get("num_ranks") or 0),
                                              r.get("backend", ""))):
        head = [rec.get("bench"), rec.get("backend"), rec.get("num_ranks")]
        status = rec.get("status", "ok")
        if status != "ok":
            reason = (rec.get("error") or "").replace("\n", " ")
            rows.append(head + ["-", status.upper(), None, reason[:NOTE_WIDTH], ""])
            continue
        if rec.get("bench") == "imbalance":
            rows += _imbalance_rows(head, rec)
            continue
        figures = {k: v for k, v in rec.get("figures", {}).items() if k not in SUMMARY_SKIP}
        done = set()
        for name in figures:
            base = re.sub(r"_(us|gbps)$", "", name)
            if base in done:
                continue
            done.add(base)
            if base.endswith("_recv") and f"{base[:-5]}_send_us" in figures:
                continue  # printed with its send half
            us, gb = figures.get(f"{base}_us"), figures.get(f"{base}_gbps")
            label = base
            if base.endswith("_send") and f"{base[:-5]}_recv_us" in figures:
                recv = figures[f"{base[:-5]}_recv_us"]
                label, us = f"{base[:-5]} send + recv", f"{fmt(us)} + {fmt(recv)}"
            elif us is None and gb is None:
                us = figures[name]
            t_us = target_for(rec, f"{base}_us", internode)
            t_gb = target_for(rec, f"{base}_gbps", internode)
            note, ratio = [], None
            if t_us:
                note.append(f"{t_us[0]} us")
                if isinstance(us, (int, float)) and us:
                    ratio = t_us[0] / us
            if t_gb:
                note.append(f"{t_gb[0]} GB/s")
                if ratio is None and isinstance(gb, (int, float)) and gb:
                    ratio = gb / t_gb[0]
            if note:
                note.append((t_us or t_gb)[1])
            rows.append(head + [label, us, gb, " ".join(note), f"{ratio:.2f}x" if ratio else ""])
    return rows


#: Figures kept in the JSON but left out of the summary table (context, not results).
SUMMARY_SKIP = {"recv_tokens"}
#: Width of the note column of the summary table.
NOTE_WIDTH = 64


def _imbalance_rows(head: list, rec: dict) -> list[list]:
    """One row per (mode, phase) of an imbalance result: the slowdown of the heaviest point
    (time of one rank at the largest factor / time balanced), the fitted model as the note."""
    rows = []
    figures = rec.get("figures", {})
    for mode, phases in rec.get("model", {}).items():
        for phase, m in phases.items():
            key = f"{mode}_{phase}"
            slow = next(((k, v) for k, v in figures.items()
                         if k.startswith(f"{key}_slowdown_")), (None, None))
            err = figures.get(f"{key}_model_mean_abs_err_pct")
            bw = m.get("bandwidth_gbps")
            note = (f"model {fmt(m.get('latency_us'))} us + B / "
                    f"{fmt(bw) if bw is not None else 'inf'} GB/s, |err| {fmt(err)}%")
            factor = slow[0].rsplit("_", 1)[-1] if slow[0] else ""
            rows.append(head + [f"{mode} {phase} slowdown {factor}".rstrip(),
                                f"{fmt(slow[1])}x" if slow[1] else None, None, note, ""])
    return rows


def summarize(result_dir, backends=None, expect=()) -> str:
    """The summary table of every JSON in ``result_dir``; ``expect`` lists ``bench:ranks:rc``
    steps whose backends (``backends``) must have a result, else a FAIL row says so."""
    records = []
    for path in sorted(Path(result_dir).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            records.append({"bench": path.stem, "backend": "?", "num_ranks": 0,
                            "status": "failed", "error": f"unreadable result: {e}"})
    have = {(r.get("bench"), r.get("backend"), r.get("num_ranks")) for r in records}
    for item in expect:
        bench, ranks, rc, *own = item.split(":")
        # bench:ranks:rc:b1+b2 names the step's own backends (the moe bench has no nccl run)
        for backend in (own[0].split("+") if own else backends or ()):
            if (bench, backend, int(ranks)) not in have:
                why = ("timed out" if rc in ("124", "137") else
                       "skipped (time budget)" if rc == "skip" else f"exit code {rc}")
                records.append({"bench": bench, "backend": backend, "num_ranks": int(ranks),
                                "status": "failed", "error": f"no result: step {why}"})
    rows = summary_rows(records)
    return format_table(["bench", "backend", "ranks", "figure", "us", "GB/s", "target / note",
                         "vs target"], rows)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=str(DEFAULT_OUT))
    parser.add_argument("--backends", default="", help="backends each --expect step should produce")
    parser.add_argument("--expect", nargs="*", default=[], help="bench:ranks:rc[:b1+b2] of each bench step (its own backends, else --backends)")
    args = parser.parse_args(argv)
    print(summarize(args.dir, [b for b in args.backends.split(",") if b], args.expect))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
