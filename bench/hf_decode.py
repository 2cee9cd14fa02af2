"""A transformers DeepSeek-V3-shaped model (random weights, a few layers) on ep_comm vs
transformers' own experts implementations: decode tokens/s and per-layer MoE time at several
batch sizes, prefill time per MoE layer.

    python bench/hf_decode.py                 # one GPU: writes hf_decode-kernels-1r-<gpu>.json + PNG
    python bench/hf_decode.py --smoke --cpu   # tiny CPU check of the code path (reference backend)

Implementations compared (each on the same weights):
* ``ep_comm``: ``ep_comm.integrations.transformers`` with ``experts_implementation="ep_comm_ll"``:
  prefill in normal mode, decode steps in low-latency mode, each decode step replayed from a
  CUDA graph; one rank, so dispatch/combine run through ep_comm's kernels with every expert
  local (the figures are the cost of the EP machinery on one GPU, not a multi-GPU speed-up).
* ``grouped_mm``: transformers' default (``torch._grouped_mm``), decode steps also in CUDA
  graphs where capture works (the JSON says when it did not).
* ``deepgemm``: transformers' DeepGEMM experts, where it runs (it fetches a hub kernel; the
  JSON records the error where it cannot).

Figures per implementation and batch b (decode): ``decode_tok_s_b{b}`` (b tokens per step over
the median step time), ``moe_decode_us_b{b}`` (one MoE block, router + experts + shared
experts, on [b, 1, H], graph-replayed); prefill: ``moe_prefill_us`` (one MoE block on
``--prefill-tokens`` tokens, eager). Sizes are options; the defaults (hidden 2048, 64 experts,
top-6, 4 layers) keep the run near a minute on one H200.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

IMPLS = ("ep_comm", "grouped_mm", "deepgemm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--moe-intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (the first dense)")
    p.add_argument("--batches", default=None, help="decode batch sizes, e.g. 1,32,128")
    p.add_argument("--prompt", type=int, default=None, help="prompt length of the decode runs")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per batch")
    p.add_argument("--prefill-tokens", type=int, default=None)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


GPU_DEFAULTS = dict(hidden=2048, experts=64, topk=6, moe_intermediate=768, layers=4,
                    batches="1,32,128", prompt=16, steps=24, prefill_tokens=4096, warmup=3,
                    iters=10)
SMOKE = dict(hidden=64, experts=8, topk=2, moe_intermediate=32, layers=2, batches="1,4",
             prompt=4, steps=3, prefill_tokens=32, warmup=1, iters=2)


def make_config(a):
    from transformers import DeepseekV3Config
    heads = max(2, a.hidden // 128)
    return DeepseekV3Config(
        vocab_size=4096 if not a.smoke else 64, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
        moe_intermediate_size=a.moe_intermediate, num_hidden_layers=a.layers,
        num_attention_heads=heads, num_key_value_heads=heads, n_routed_experts=a.experts,
        n_shared_experts=1, num_experts_per_tok=a.topk, n_group=min(8, a.experts // 4) or 1,
        topk_group=max(1, min(4, a.experts // 16)), first_k_dense_replace=1,
        kv_lora_rank=min(512, a.hidden // 4), q_lora_rank=min(1536, a.hidden // 2),
        qk_rope_head_dim=min(64, a.hidden // 32), qk_nope_head_dim=min(128, a.hidden // 16),
        v_head_dim=min(128, a.hidden // 16), routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=a.prompt + a.steps + 8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)


# ----------------------------------------------------------------------------- timing
def timed(ctx, fn, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if ctx.on_gpu:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def graphed(ctx, fn):
    """``fn`` captured in a CUDA graph on GPU (returns (replay, outputs, True)); on CPU or when
    capture fails, (fn, None, False) with the reason printed."""
    if not ctx.on_gpu:
        return fn, None, False
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        return g.replay, out, True
    except Exception as e:  # noqa: BLE001 - recorded in the JSON as "graphs": false
        ctx.log(f"  CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); eager")
        torch.cuda.synchronize()
        return fn, None, False


def decode_figures(ctx, a, model, batch: int, ep=None) -> dict:
    """Prefill a [batch, prompt] prompt into a static cache, then time one decode step
    (graph-replayed where capture works) and one MoE block on [batch, 1, H]."""
    from transformers import StaticCache
    dev = ctx.device
    ids = torch.randint(3, model.config.vocab_size, (batch, a.prompt),
                        generator=torch.Generator().manual_seed(a.seed)).to(dev)
    # transformers 5's StaticLayer writes each step at its own counter (one slot on per step,
    # whatever cache_position says): room for the prompt, the capture's warm-up step and
    # every timed step (an index past the end is a device-side assert)
    cache = StaticCache(config=model.config,
                        max_cache_len=a.prompt + 1 + a.warmup + a.steps + 4)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True,
              cache_position=torch.arange(a.prompt, device=dev))
        tok = ids[:, -1:].clone()
        pos = torch.tensor([a.prompt], device=dev)

        def step():
            return model(input_ids=tok, past_key_values=cache, use_cache=True,
                         cache_position=pos).logits

        run, _, g1 = graphed(ctx, step)
        t_step = timed(ctx, run, a.warmup, a.steps)
        mlp = moe_block(model)
        x = torch.randn(batch, 1, model.config.hidden_size, device=dev, dtype=torch.bfloat16)
        if ep is not None:
            ep.mode = "low_latency"  # the block alone: no model forward marks the decode step
        run_m, _, g2 = graphed(ctx, lambda: mlp(x))
        t_moe = timed(ctx, run_m, a.warmup, a.iters)
        if ep is not None:
            ep.mode = "auto"
    return {f"decode_tok_s_b{batch}": batch / t_step, f"decode_step_us_b{batch}": t_step * 1e6,
            f"moe_decode_us_b{batch}": t_moe * 1e6, f"graphs_b{batch}": bool(g1 and g2)}


def moe_block(model):
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            return layer.mlp
    raise RuntimeError("no MoE layer")


def prefill_figures(ctx, a, model, ep=None) -> dict:
    mlp = moe_block(model)
    x = torch.randn(1, a.prefill_tokens, model.config.hidden_size, device=ctx.device,
                    dtype=torch.bfloat16, generator=None)
    if ep is not None:
        ep.mode = "normal"
    with torch.no_grad():
        t = timed(ctx, lambda: mlp(x), a.warmup, a.iters)
    if ep is not None:
        ep.mode = "auto"
    return {"moe_prefill_us": t * 1e6}


# ----------------------------------------------------------------------------- main
def run_impl(ctx, a, base, impl: str, batches: list[int]) -> dict:
    import ep_comm.integrations.transformers as ep_hf
    model = copy.deepcopy(base) if impl != "ep_comm" else base
    ep = None
    if impl == "ep_comm":
        model.set_experts_implementation("ep_comm_ll")
        ep = ep_hf.shard_experts(model, ctx.group, num_max_dispatch_tokens_per_rank=max(batches),
                                 backend="kernels" if ctx.on_gpu else "reference")
    else:
        model.set_experts_implementation(impl)
    try:
        figs = prefill_figures(ctx, a, model, ep)
        for b in batches:
            figs.update(decode_figures(ctx, a, model, b, ep))
        return figs
    finally:
        if ep is not None:
            ep.destroy()
        del model


def plot(records: dict, batches: list[int], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ok = {k: v for k, v in records.items() if v.get("status") == "ok"}
    for name, rec in ok.items():
        f = rec["figures"]
        axes[0].plot(batches, [f.get(f"decode_tok_s_b{b}") for b in batches], "o-", label=name)
        axes[1].plot(batches, [f.get(f"moe_decode_us_b{b}") for b in batches], "o-", label=name)
    axes[2].bar(list(ok), [r["figures"]["moe_prefill_us"] / 1e3 for r in ok.values()])
    axes[0].set(xscale="log", xlabel="decode batch", ylabel="tokens/s", title="decode")
    axes[1].set(xscale="log", xlabel="decode batch", ylabel="us", title="one MoE block, decode")
    axes[2].set(ylabel="ms", title="one MoE block, prefill")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    a = parse_args(argv)
    ctx = common.init(a)
    common.fill_defaults(a, ctx, SMOKE if a.smoke else GPU_DEFAULTS, SMOKE)
    if ctx.num_ranks != 1:
        ctx.log("hf_decode runs on one rank (one GPU)")
        return common.finish(ctx, 2)
    batches = common.parse_ints(a.batches)
    from transformers import AutoModelForCausalLM
    import ep_comm.integrations.transformers  # noqa: F401 - registers the implementations
    torch.manual_seed(a.seed)
    cfg = make_config(a)
    with torch.device(ctx.device):
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    config = {k: getattr(a, k) for k in ("hidden", "experts", "topk", "moe_intermediate",
                                         "layers", "prompt", "steps", "prefill_tokens")}
    config["batches"] = batches
    records = {}
    impls = [i for i in a.impls.split(",") if i]
    # ep_comm last: shard_experts changes the base model in place
    for impl in sorted(impls, key=lambda i: i == "ep_comm"):
        ctx.log(f"{impl} ...")
        t0 = time.time()
        try:
            figs = run_impl(ctx, a, base, impl, batches)
            records[impl] = {"status": "ok", "figures": figs}
        except Exception as e:  # noqa: BLE001 - an implementation that cannot run here
            if ctx.on_gpu:
                torch.cuda.synchronize()
            records[impl] = {"status": "unavailable", "figures": {},
                             "error": f"{type(e).__name__}: {str(e)[:300]}"}
        ctx.log(f"  {impl}: {records[impl]['status']} in {time.time() - t0:.1f} s "
                f"{json.dumps(records[impl]['figures'], default=str)[:400]}"
                f"{records[impl].get('error', '')}")
    backend = "kernels" if ctx.on_gpu else "reference"
    ep_figs = records.get("ep_comm", {}).get("figures", {})
    path = common.write_result(ctx, a.out, "hf_decode", backend, config, ep_figs,
                               status=records.get("ep_comm", {}).get("status", "failed"),
                               implementations=records)
    if path is not None and not a.no_plot:
        try:
            png = path.with_suffix(".png")
            plot(records, batches, png, f"transformers DeepSeek-V3-shaped, {common.device_name(ctx)}")
            ctx.log(f"wrote {path} and {png}")
        except ImportError as e:
            ctx.log(f"wrote {path}; no plot ({e}; pip install -e '.[bench]')")
    return common.finish(ctx, 0 if records.get("ep_comm", {}).get("status") == "ok" else 1)


if __name__ == "__main__":
    sys.exit(main())
