"""Rank tasks for tests/test_hf_integration.py: tiny random-weight transformers MoE models (no
download) run unsplit on the whole batch and expert-parallel with the batch split over ranks.

Tolerance (bf16): the EP model's logits must be within ``LOGITS_TOL * max|reference logits|``
of the unsplit model's (``LOGITS_TOL = 2**-6``, about 4 bf16 ulps at the top of the range: the
two compute the same sums in different orders and round the expert outputs to bf16 at different
points, through two to three layers); greedy generation of 16 tokens must be identical, on prompts whose reference continuation
never has two tokens within ``GAP_MIN = 2 * LOGITS_TOL`` of each other (``decisive_prompts``;
closer than that, bf16 rounding alone may pick either).
"""
from __future__ import annotations

import copy
import dataclasses
import os

import torch

LOGITS_TOL = 2.0 ** -6
GAP_MIN = 2 * LOGITS_TOL
#: Candidate prompts per batch row (a few percent of random prompts are decisive on CPU; on the
#: GPU, GPT-OSS's tiny model had 2 in 320: the GPU searches a larger pool, one batched generate).
POOL_PER_ROW = {"cpu": 64, "cuda": 1024}
NEW_TOKENS = 16
VOCAB = 32


def tiny_config(kind: str):
    """A tiny config of ``kind`` (qwen3_moe, mixtral, deepseek_v3, gpt_oss): hidden 64, 8 experts,
    top-2, vocab 128. ``initializer_range`` 0.1 (not 0.02) so that the logits spread out and
    greedy choices are not decided by bf16 rounding."""
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                 num_experts=8, norm_topk_prob=True, head_dim=16)
    if kind == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=32, num_local_experts=8, head_dim=16)
    if kind == "deepseek_v3":
        return tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4, "num_hidden_layers": 3},
                                   intermediate_size=96, moe_intermediate_size=32,
                                   n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                   routed_scaling_factor=2.5, norm_topk_prob=True)
    if kind == "gpt_oss":
        return tf.GptOssConfig(**common, intermediate_size=32, num_local_experts=8, head_dim=16,
                               sliding_window=8)
    raise ValueError(kind)


def build_model(kind: str, device, seed: int = 0):
    """The reference model: bf16, eval, experts_implementation="eager", same weights on every
    rank (seeded)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.bfloat16,
                                             experts_implementation="eager")
    with torch.no_grad():
        # DeepSeek-V3's correction bias starts at zero; give it values so that the grouped
        # top-k really uses it.
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model.to(device).eval()


@dataclasses.dataclass
class HFCase:
    kind: str
    implementation: str = "ep_comm"  # or "ep_comm_ll"
    seq: int = 6
    graphs: bool = False            # GPU: decode steps replayed from CUDA graphs
    backend: str = "auto"
    use_fp8: bool = False
    seed: int = 0
    #: EP_COMM_TIMEOUT_S of the model's Buffers. The GPU suite runs test shards side by side on
    #: one GPU: a rank compiling Triton kernels for its first token counts can then keep its
    #: peer waiting in dispatch for over a minute, beyond the 60 s default.
    timeout_s: float | None = None


def decisive_rows(ref, cand: torch.Tensor):
    """(indices of the prompts of ``cand`` [P, S] whose reference greedy continuation is
    decisive (see ``decisive_prompts``), the teacher-forced logits [P, NEW_TOKENS, V] float32
    of those continuations)."""
    seq = cand.shape[1]
    with torch.no_grad():
        gen = ref.generate(cand, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False)
        logits = ref(gen[:, :-1]).logits.float()[:, seq - 1:]
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).min(dim=1).values
    return torch.nonzero(gap >= GAP_MIN * logits.abs().max()).flatten(), logits


def decisive_prompts(ctx, ref, batch: int, seq: int, seed: int, dev):
    """``batch`` random prompts [batch, seq] whose reference greedy continuation (returned too,
    [batch, seq + NEW_TOKENS]) is decisive: at every step the best token leads the second by
    at least ``GAP_MIN * max|logits|``. Where two tokens are within bf16 rounding of each other
    the reference's own choice is a coin toss, and "identical tokens" would test rounding, not
    the integration. Rank 0 draws a seeded pool of candidates and broadcasts its choice."""
    import torch.distributed as dist
    key = (ctx.world_size, id(ctx.group), ref.config.model_type, batch, seq, seed, str(dev))
    if key in _DECISIVE:  # every rank of a pool runs the same tests, so all ranks hit alike
        return _DECISIVE[key]
    pool = POOL_PER_ROW[torch.device(dev).type] * batch
    cand = torch.randint(3, VOCAB, (pool, seq),
                         generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    keep = torch.full((batch,), -1, dtype=torch.int64)
    if ctx.rank == 0:
        good = decisive_rows(ref, cand)[0][:batch].cpu()
        keep[:good.numel()] = good
    on = keep.to(dev) if dist.get_backend(ctx.group) == "nccl" else keep
    dist.broadcast(on, 0, group=ctx.group)
    keep = on.cpu()
    assert (keep >= 0).all(), f"only {(keep >= 0).sum().item()} of {pool} prompts are decisive"
    ids = cand[keep.to(dev)]
    with torch.no_grad():
        ref_gen = ref.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False)
    _DECISIVE[key] = ids, ref_gen
    return ids, ref_gen


#: decisive_prompts' answers in this rank process, per (world, group, model type, batch, seq,
#: seed, device): the search generates 64 candidates per row with the eager model, the longest
#: step of a GPU test; the tests of one model kind share its answer.
_DECISIVE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rows_of(rank: int, world: int) -> tuple[int, int]:
    """Uneven split of a (2 * world + 1)-row batch: rank 0 takes 3 rows, the others 2."""
    start = 0 if rank == 0 else 3 + 2 * (rank - 1)
    return start, start + (3 if rank == 0 else 2)


def task_hf_model(ctx, case: HFCase):
    """``_task_hf_model`` with ``case.timeout_s`` as EP_COMM_TIMEOUT_S (read by each Buffer when
    made), restored after: the rank process goes on to other tests."""
    old = os.environ.get("EP_COMM_TIMEOUT_S")
    if case.timeout_s is not None:
        os.environ["EP_COMM_TIMEOUT_S"] = str(case.timeout_s)
    try:
        return _task_hf_model(ctx, case)
    finally:
        if old is None:
            os.environ.pop("EP_COMM_TIMEOUT_S", None)
        else:
            os.environ["EP_COMM_TIMEOUT_S"] = old


def _rank_prompts(ctx, case: HFCase):
    """The unsplit model of ``case`` on this rank's device, the decisive prompts of the whole
    batch (2 * world + 1 rows, the same on every rank) and this rank's rows [a, b) of them.
    Returns (ref, ids [B, S], a, b)."""
    ref = build_model(case.kind, ctx.device, case.seed)
    batch = 2 * ctx.world_size + 1
    ids, _ = decisive_prompts(ctx, ref, batch, case.seq, case.seed, ctx.device)
    a, b = rows_of(ctx.rank, ctx.world_size)
    return ref, ids, a, b


def _task_hf_model(ctx, case: HFCase):
    """The unsplit model vs the EP model on this rank's rows of the batch: logits of one forward
    (bf16 tolerance) and 16 greedy tokens (identical). Returns a dict of figures."""
    import ep_comm.integrations.transformers as ep_hf
    ref, ids, a, b = _rank_prompts(ctx, case)
    with torch.no_grad():
        # the unsplit model on this rank's rows, the input the EP model gets: the replicated
        # dense layers then run the same batch size in both (their GEMMs round alike)
        ref_logits = ref(ids[a:b]).logits.float()
        ref_gen = ref.generate(ids[a:b], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False)
    model = copy.deepcopy(ref)
    model.set_experts_implementation(case.implementation)
    full_bytes = sum(m.gate_up_proj.numel() for m in ep_hf.experts_modules(model).values())
    ll_m = 8 if case.implementation == "ep_comm_ll" else None
    ep = ep_hf.shard_experts(model, ctx.group, num_max_dispatch_tokens_per_rank=ll_m,
                             use_fp8=case.use_fp8, backend=case.backend)
    kept = sum(m.gate_up_proj.numel() for m in ep_hf.experts_modules(model).values())
    assert kept * ctx.world_size == full_bytes, (kept, full_bytes)
    trace = PhaseTrace(ctx.rank, ep.buffer, ep_hf)
    try:
        # every rank makes all its calls before any assertion: a rank that stopped early would
        # leave the others waiting in a collective
        with torch.no_grad():
            logits = model(ids[a:b]).logits.float()
            # longer than the kernels' own bound where the case sets one, so that a stalled
            # kernel has reported (its phase, peer, channel and counts in the status words the
            # report prints) before the trace gives up
            trace.wait(max(GPU_WAIT_S, case.timeout_s + 15) if case.timeout_s else GPU_WAIT_S)
            trace.restore()
            err = (logits - ref_logits).abs().max().item()
            scale = ref_logits.abs().max().item()
            diag = {}
            if case.graphs:
                gen = greedy_with_cuda_graph(model, ids[a:b], NEW_TOKENS)
                # Where a difference comes from (every rank makes these calls, whatever its
                # tokens): the same static-cache loop eager on the EP model, and on the unsplit
                # model (the static cache's numerics against the reference's generate).
                diag["ep_eager"] = greedy_with_cuda_graph(model, ids[a:b], NEW_TOKENS,
                                                          graphs=False)
                diag["ref_static"] = greedy_with_cuda_graph(ref, ids[a:b], NEW_TOKENS,
                                                            graphs=False)
            else:
                gen = model.generate(ids[a:b], max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, do_sample=False)
        assert err <= LOGITS_TOL * scale, (
            f"{case}: max |logits - ref| {err:.4g} > {LOGITS_TOL} * {scale:.4g}")
        same = torch.equal(gen, ref_gen)
        notes = "".join(
            f"\n{name} {t.tolist()} ({'equal to' if torch.equal(t, ref_gen) else 'unlike'} ref)"
            for name, t in diag.items())
        assert same, (f"{case} rank {ctx.rank}: greedy tokens differ\nEP  {gen.tolist()}\n"
                      f"ref {ref_gen.tolist()}{notes}")
        if case.implementation == "ep_comm_ll":
            assert ep.calls["low_latency"] > 0 and ep.calls["normal"] > 0, ep.calls
        else:
            assert ep.calls["low_latency"] == 0, ep.calls
        return {"err": err, "scale": scale, "calls": dict(ep.calls)}
    finally:
        trace.restore()
        ep.destroy()


#: Seconds the first EP forward's GPU work may take before ``PhaseTrace.wait`` names where it
#: stands (the tiny models' forward takes milliseconds; the kernels' own timeouts are longer).
GPU_WAIT_S = 60.0

#: The EP model's calls that ``PhaseTrace`` marks: the Buffer's methods, then the integration's
#: expert functions (module attributes of ep_comm.integrations.transformers).
TRACED_BUFFER_CALLS = ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch",
                       "low_latency_combine")
TRACED_EXPERT_CALLS = ("fast_rows", "generic_rows", "fast_ffn_masked", "generic_batched")


class PhaseTrace:
    """A CUDA event recorded after each ep_comm call of the EP model (layout, dispatch, the
    experts, combine), on the stream the call returned on, while ``on``. ``wait(s)`` waits for
    the last one by polling; if the GPU work has not finished after ``s`` seconds it raises an
    AssertionError naming the last phase that finished on this rank and the first that did not
    (a forward that never ends names its phase instead of hanging the rank at its first
    ``.item()``: the qwen3/deepseek GPU tests, 2026-12-07). CPU tensors: nothing recorded."""

    def __init__(self, rank: int, buffer, ep_hf):
        self.rank, self.on, self.events = rank, True, []
        self.buffer = buffer
        self._undo = []
        for name in TRACED_BUFFER_CALLS:
            self._wrap(buffer, name, f"{name}")
        for name in TRACED_EXPERT_CALLS:
            if hasattr(ep_hf, name):
                self._wrap(ep_hf, name, f"experts ({name})")

    def _wrap(self, owner, name: str, label: str) -> None:
        orig = getattr(owner, name)
        had_own = name in vars(owner)

        def traced(*args, **kwargs):
            out = orig(*args, **kwargs)
            if self.on and torch.cuda.is_available() and torch.cuda.is_initialized():
                ev = torch.cuda.Event()
                ev.record()
                self.events.append((f"#{len(self.events) + 1} {label}", ev))
            return out
        setattr(owner, name, traced)
        self._undo.append((owner, name, orig if had_own else None))

    def restore(self) -> None:
        for owner, name, orig in reversed(self._undo):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)
        self._undo.clear()

    def _status_words(self):
        """The first words of the kernels backend's NVLink host status (what a kernel reported,
        read without a device sync), or None on another backend."""
        normal = getattr(getattr(self.buffer, "_backend", None), "normal", None)
        st = getattr(normal, "status", None)
        return None if st is None else list(st.read(8))

    def wait(self, timeout_s: float = GPU_WAIT_S) -> None:
        import time
        self.on = False
        if not self.events:
            return
        deadline = time.monotonic() + timeout_s
        while not self.events[-1][1].query():
            if time.monotonic() > deadline:
                done = [label for label, ev in self.events if ev.query()]
                pending = [label for label, ev in self.events if not ev.query()]
                raise AssertionError(
                    f"rank {self.rank}: the first EP forward's GPU work did not finish in "
                    f"{timeout_s:g} s; {len(done)} of {len(self.events)} phases finished, the "
                    f"last {done[-1] if done else '(none)'}; first unfinished {pending[0]}; "
                    f"NVLink status words now {self._status_words()}")
            time.sleep(0.01)


def _static_decoder(model, ids: torch.Tensor, new_tokens: int):
    """The prompt ids [B, S] through ``model`` into a StaticCache of S + ``new_tokens`` slots.
    Returns (cache, the prompt's logits [B, S, V], static_tok [B, 1] and static_pos [1] (the
    inputs a decode step reads: set them, then call), step() -> logits [B, 1, V])."""
    from transformers import StaticCache
    bsz, s = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=s + new_tokens)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                cache_position=torch.arange(s, device=ids.device))
    static_tok = torch.zeros(bsz, 1, dtype=ids.dtype, device=ids.device)
    static_pos = torch.tensor([s], device=ids.device)

    def step():
        return model(input_ids=static_tok, past_key_values=cache, use_cache=True,
                     cache_position=static_pos).logits

    return cache, out.logits, static_tok, static_pos, step


def warm_up(step, state) -> None:
    """Run ``step`` once (allocator, Triton compiles), then put ``state`` back as it was: the
    tensors the step updates in place (``_cache_tensors`` of the static cache).

    Why: transformers 5's ``StaticLayer.update`` writes a step's keys and values at its own
    ``cumulative_length`` (a device counter each step adds to), not at the ``cache_position``
    it is given. A warm-up left in place moves every later step one slot on: the graph test's
    tokens differed from the second replay on, in the unsplit model as in ep_comm's
    (2026-12-07, session 18; session 17's lockstep comparison restored the whole cache, counter
    included, before each replay, so it never saw the shift)."""
    saved = [t.clone() for t in state]
    step()
    for t, v in zip(state, saved):
        t.copy_(v)


def captured(step, state=()):
    """``step`` captured in a CUDA graph after one warm-up run on a side stream (``warm_up``:
    ``state`` is put back after it, so the first replay is the first step). Returns replay() ->
    the graph's output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up(step, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    def replay():
        graph.replay()
        return static_out

    return replay


def greedy_with_cuda_graph(model, ids: torch.Tensor, new_tokens: int,
                           graphs: bool = True) -> torch.Tensor:
    """Greedy decoding with a static KV cache: the prompt in one eager forward (normal mode),
    then every decode step replayed from one CUDA graph (low-latency mode under
    ``ep_comm_ll``), or run eagerly (``graphs=False``: the same steps, for a diagnosis).
    ids [B, S] -> [B, S + new_tokens]."""
    s = ids.shape[1]
    cache, prompt_logits, static_tok, static_pos, step = _static_decoder(model, ids, new_tokens)
    eos = model.config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])

    def pick(logits):
        # as generate(min_new_tokens=new_tokens) picks: never an end-of-sequence token (its
        # MinNewTokensLengthLogitsProcessor sets their logits to -inf); a plain argmax may take
        # one and then differ from the reference for reasons that are not the model's
        logits = logits[:, -1].clone()
        if eos:
            logits[:, eos] = float("-inf")
        return logits.argmax(-1, keepdim=True)

    tok = pick(prompt_logits)
    toks = [tok]
    static_tok.copy_(tok)
    replay = captured(step, _cache_tensors(cache)) if graphs else step
    for i in range(new_tokens - 1):
        static_tok.copy_(tok)
        static_pos.fill_(s + i)
        tok = pick(replay())
        toks.append(tok)
    return torch.cat([ids] + toks, dim=1)


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a StaticCache holds (each layer's keys, values and write counter, whatever
    their names)."""
    return [t for layer in cache.layers for t in vars(layer).values()
            if isinstance(t, torch.Tensor)]


def graph_vs_eager_steps(model, ids: torch.Tensor, new_tokens: int,
                         graphs: bool = True) -> list[float]:
    """Per decode step of ``greedy_with_cuda_graph``'s loop, max |logits of the CUDA-graph
    replay - logits of the same step run eagerly| on the same cache state: the cache is saved,
    the step runs eagerly, the cache is restored, the graph replays. Decoding goes on with the
    eager step's token, so each step compares the two on one input. ``graphs=False`` replays
    the eager step a second time instead (a check of the save and restore, on CPU).
    ids [B, S] -> ``new_tokens - 1`` floats."""
    s = ids.shape[1]
    cache, prompt_logits, static_tok, static_pos, step = _static_decoder(model, ids, new_tokens)
    tok = prompt_logits[:, -1].argmax(-1, keepdim=True)
    static_tok.copy_(tok)
    replay = captured(step, _cache_tensors(cache)) if graphs else step
    diffs = []
    for i in range(new_tokens - 1):
        static_tok.copy_(tok)
        static_pos.fill_(s + i)
        saved = [t.clone() for t in _cache_tensors(cache)]
        eager = step().float().clone()
        after_eager = [t.clone() for t in _cache_tensors(cache)]
        for t, v in zip(_cache_tensors(cache), saved):
            t.copy_(v)
        got = replay().float()
        diffs.append((got - eager).abs().max().item())
        # the replay wrote the step's keys and values as the eager step did (or not): decode
        # goes on from the eager state either way
        for t, v in zip(_cache_tensors(cache), after_eager):
            t.copy_(v)
        tok = eager[:, -1].argmax(-1, keepdim=True)
    return diffs


def task_hf_graph_lockstep(ctx, case: HFCase):
    """``graph_vs_eager_steps`` of the EP model (as the GPU test runs it: ep_comm.moe's masked
    GEMMs writing into the zero-copy combine buffer) on this rank's rows of the decisive
    prompts. Returns {"diffs": [...], "scale": max |logits| of the unsplit model's prompt}."""
    import ep_comm.integrations.transformers as ep_hf
    ref, ids, a, b = _rank_prompts(ctx, case)
    with torch.no_grad():
        scale = ref(ids[a:b]).logits.float().abs().max().item()
    model = copy.deepcopy(ref)
    model.set_experts_implementation(case.implementation)
    ep = ep_hf.shard_experts(model, ctx.group, num_max_dispatch_tokens_per_rank=8,
                             use_fp8=case.use_fp8, backend=case.backend)
    try:
        with torch.no_grad():
            diffs = graph_vs_eager_steps(model, ids[a:b], NEW_TOKENS)
        return {"diffs": diffs, "scale": scale, "calls": dict(ep.calls)}
    finally:
        ep.destroy()
