"""Hugging Face transformers (5.x) MoE models running expert-parallel on ep_comm.

Usage (every rank of ``group`` runs the same lines on its own part of the batch)::

    import ep_comm.integrations.transformers as ep_hf    # registers "ep_comm" and "ep_comm_ll"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 experts_implementation="ep_comm_ll").cuda()
    ep = ep_hf.shard_experts(model, group, num_max_dispatch_tokens_per_rank=128)
    out = model.generate(my_part_of_the_batch, max_new_tokens=16)   # prefill: normal mode,
                                                                      # decode: low-latency mode

Plug point: ``ExpertsInterface`` (``transformers.integrations.moe``), not
``EPImplementationInterface`` (``transformers.distributed``), because of how EP deployments use
the batch. transformers' own EP path (``DistributedConfig(ep_size=...)``) either requires every
rank of the EP group to see the same batch (EP group == TP group) or turns the dense weights into
FSDP2 shards; neither is "dense layers replicated, ranks split the batch". It also needs
torchrun, accelerate and a DeviceMesh, and wraps the weights in DTensors. ``ExpertsInterface``
is called at exactly the point we need (after the model's own router, before the shared
experts: ``experts(hidden [T, H], top_k_index [T, K] global ids, top_k_weights [T, K])``), so
the model keeps its router bit for bit (top-k, normalisation, scaling, DeepSeek-V3's grouped
top-k with the correction bias, GPT-OSS's softmax over the top-k logits) and its shared experts,
and we do the rest: ``shard_experts`` keeps each rank's contiguous slice
``[r * E / R, (r + 1) * E / R)`` of every experts module's weights (the full tensors are freed:
after this call no reference to them remains), and the registered forward dispatches the
rank's tokens to the ranks that own their experts, runs the local experts and combines.

Implementations (``experts_implementation=`` at load, or ``model.set_experts_implementation``):

* ``"ep_comm"``: normal mode (``Buffer.dispatch`` / ``combine``; host-synchronising) always.
* ``"ep_comm_ll"``: low-latency mode on decode steps, normal mode on the others. A forward is a
  decode step when the model was called with one token per sequence (a forward pre-hook reads
  ``input_ids`` / ``inputs_embeds``); so ``generate()`` prefills in normal mode and decodes in
  low-latency mode. All ranks must agree on the kind of step (in lockstep generation every
  rank's step is a decode step at the same time; a one-token prompt on one rank with a longer
  one on another would not agree). ``EpCommExperts.mode`` forces one mode for all calls.
  Low-latency steps never wait on the host and can be captured in CUDA graphs (with
  ``impl="triton"``/``"auto"`` on the kernels backend); a rank's decode batch must be at most
  ``num_max_dispatch_tokens_per_rank``. With a ``StaticCache`` (transformers 5), put the cache
  back after the warm-up step that precedes a capture: its layers write each step at their own
  counter, not at the ``cache_position`` passed, and a warm-up left in place makes every replay
  decode one slot late (tests/hf_cases.py ``warm_up``).

Expert compute. SiLU-gated experts with ``[E, 2I, H]`` gate/up (gate rows first) and ``[E, H,
I]`` down weights, no biases (Qwen3-MoE, Mixtral, DeepSeek-V3) run through ``ep_comm.moe``'s
grouping, permutation and Triton grouped GEMMs (``fast_rows`` / ``fast_ffn_masked``; where the
Triton GEMMs do not run, e.g. on CPU, ``F.linear`` per expert in bf16) with the module's own
gate (``_apply_gate``) between the GEMMs; with ``use_fp8=True`` (FP8 128 x 128 block-scaled
weights) the whole of ``moe_ep_normal`` / ``moe_ep_low_latency``. Other experts modules
routed through the interface (GPT-OSS: transposed ``[E, H, 2I]`` weights, interleaved gate/up,
biases, clamped SwiGLU) run the module's own math (``_apply_gate``, biases, ``act_fn``) on the
local experts in torch: a loop over local experts in normal mode, a batched matmul over the
fixed-size expert buffers in low-latency mode (graph-capturable, computes the padding rows
too). FP8 is refused there.

Numerics: tokens travel in bf16 (a model in another dtype is cast for the exchange and its
output cast back); routing weights are applied in float32. The local compute rounds where the
model's eager experts forward rounds, so that the expert-parallel model follows the unsplit one
through near-tied routing decisions (DeepSeek-V3's grouped top-k reads the previous layer's
output; one ulp there can flip an expert, issue #25): the gate's ``act_fn(gate) * up`` in the
model's dtype (two roundings, not one fused), and in normal mode each weighted expert output
rounded to the model's dtype before the sum (``eager_term``). Normal mode on the bf16 model
with top-2 routing and no Triton GEMMs gives the eager experts' output bit for bit; with the
Triton GEMMs the GEMMs' own summation order differs from cuBLAS' (a rare ulp). Low-latency
combine applies the weights on the receiving side and sums in float32 (the expert side never
sees the weights), so a row there can be an ulp off eager's. Inference only: the registered
forward does not carry gradients through dispatch/combine.

Unsupported: a model with a MoE block that does not call an ``@use_experts_implementation``
experts module (per-expert ``nn.ModuleList`` blocks, remote-code models), FP8-quantised experts
(``FP8Experts``; load the checkpoint dequantised and pass ``use_fp8=True`` instead), experts
counts not divisible by the group size. These raise ``UnsupportedModelError`` naming the class.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys

import torch
import torch.distributed as dist


def _import_transformers_moe():
    """``transformers.integrations.moe``, imported with the Hugging Face ``kernels`` package
    (a dependency of transformers 5.x) as the top-level ``kernels``. Run from this repository's
    root (``python -m pytest``), the current directory comes first on ``sys.path`` and its
    ``kernels/`` folder (our device code, installed as ``ep_comm.kernels``) would shadow it:
    transformers then fails on ``from kernels import CUDAProperties``. So the entries that
    point at the repository root are left out of ``sys.path`` while transformers loads."""
    root = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))
    spec = importlib.util.find_spec("kernels") if "kernels" not in sys.modules else None
    origin = os.path.realpath(spec.origin) if spec is not None and spec.origin else ""
    if not origin.startswith(os.path.join(root, "kernels") + os.sep):
        return importlib.import_module("transformers.integrations.moe")
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.realpath(p or os.getcwd()) != root]
    try:
        return importlib.import_module("transformers.integrations.moe")
    finally:
        sys.path[:] = saved


_hf_moe = _import_transformers_moe()
ExpertsInterface = _hf_moe.ExpertsInterface

from ep_comm import moe
from ep_comm.buffer import Buffer
from ep_comm.errors import InputError

#: The names registered in transformers' ExpertsInterface.
IMPL_NORMAL = "ep_comm"
IMPL_LOW_LATENCY = "ep_comm_ll"
IMPLEMENTATIONS = (IMPL_NORMAL, IMPL_LOW_LATENCY)
#: Values of ``EpCommExperts.mode``.
MODES = ("auto", "normal", "low_latency")

#: Parameters of an experts module that hold one slice per expert (dim 0 = expert).
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias",
                 "down_proj_bias")


class UnsupportedModelError(InputError):
    """The model (or one of its MoE blocks) cannot run on this integration; the message names
    the class and the reason."""


# ----------------------------------------------------------------------------- state
@dataclasses.dataclass
class LayerState:
    """One experts module's part of the binding.

    Attributes:
        num_experts: E, the layer's global expert count.
        hidden: H.
        weights: ``moe.ExpertWeights`` of the local experts for the fast (SiLU, ep_comm.moe
            GEMMs) path, None for the module's own math (generic path).
    """

    num_experts: int
    hidden: int
    weights: moe.ExpertWeights | None


class EpCommExperts:
    """What ``shard_experts`` returns: the group, the Buffer(s) and the per-layer state.

    Attributes:
        group, rank, world_size: the expert-parallel process group.
        buffer: the ep_comm Buffer (normal and, when ``num_max_dispatch_tokens_per_rank`` was
            given, low-latency mode).
        num_max_dispatch_tokens_per_rank: low-latency M (None: no low-latency mode).
        mode: ``"auto"`` (``ep_comm_ll`` picks low-latency on decode steps), ``"normal"`` or
            ``"low_latency"`` (every call of either implementation in that mode).
        layers: {module name: LayerState} of the sharded experts modules.
        calls: {"normal": n, "low_latency": n} MoE calls so far (for tests and benches).
    """

    def __init__(self, model, group, buffer: Buffer, num_max_dispatch_tokens_per_rank,
                 use_fp8: bool, impl: str):
        self.model, self.group, self.buffer = model, group, buffer
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.use_fp8, self.impl = use_fp8, impl
        self.mode = "auto"
        self.layers: dict[str, LayerState] = {}
        self.calls = {"normal": 0, "low_latency": 0}
        self.decode_step = False
        # The low-latency buffers need a clean after normal-mode use of the same Buffer.
        self._last_mode = "normal"
        self._hook = model.register_forward_pre_hook(self._note_step, with_kwargs=True)

    def _note_step(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        self.decode_step = isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == 1

    def choose_mode(self, implementation: str) -> str:
        if self.mode != "auto":
            return self.mode
        if implementation == IMPL_LOW_LATENCY and self.decode_step:
            return "low_latency"
        return "normal"

    def destroy(self) -> None:
        """Remove the hook and free the Buffer (collective on the kernels backend)."""
        self._hook.remove()
        self.buffer.destroy()

    # ------------------------------------------------------------------ forward
    def run(self, module, st: LayerState, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor, implementation: str) -> torch.Tensor:
        """``sum_k top_k_weights[t, k] * Expert_{top_k_index[t, k]}(hidden_states[t])`` over the
        group: hidden_states [T, H], top_k_index [T, K] global ids, top_k_weights [T, K] ->
        [T, H] in hidden_states.dtype."""
        if hidden_states.dim() != 2 or hidden_states.shape[1] != st.hidden:
            raise InputError(f"{type(module).__name__}: hidden_states must be [T, {st.hidden}], "
                             f"got {list(hidden_states.shape)}")
        mode = self.choose_mode(implementation)
        x = hidden_states.to(torch.bfloat16)
        idx = top_k_index.to(torch.int64)
        w = top_k_weights.to(torch.float32)
        self.calls[mode] += 1
        if mode == "low_latency":
            out = self._low_latency(module, st, x, idx, w)
        else:
            out = self._normal(module, st, x, idx, w, hidden_states.dtype)
        self._last_mode = mode
        return out.to(hidden_states.dtype)

    def _normal(self, module, st, x, idx, w, model_dtype):
        if st.weights is not None and st.weights.fp8:
            # FP8 rounds nothing like the bf16 model: ep_comm.moe's own FP8 layer
            return moe.moe_ep_normal(x, idx, w, st.weights, self.buffer, st.num_experts,
                                     impl=self.impl)
        buf = self.buffer
        n_rank, n_rdma, n_expert, in_rank, _ = buf.get_dispatch_layout(idx, st.num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=n_expert, topk_idx=idx,
            topk_weights=w)
        if st.weights is not None:
            rows = fast_rows(module, st.weights, recv_x, recv_idx, recv_w, sum(counts),
                             self.impl, model_dtype)
        else:
            rows = generic_rows(module, recv_x, recv_idx, recv_w, model_dtype)
        combined, _, _ = buf.combine(rows, handle)
        return combined

    def _low_latency(self, module, st, x, idx, w):
        m = self.num_max_dispatch_tokens_per_rank
        if m is None:
            raise InputError("low-latency mode needs shard_experts(..., "
                             "num_max_dispatch_tokens_per_rank=M)")
        if x.shape[0] > m:
            raise InputError(f"low-latency mode: this rank has {x.shape[0]} tokens in the step, "
                             f"more than num_max_dispatch_tokens_per_rank={m}")
        buf = self.buffer
        if self._last_mode != "low_latency" and not _capturing(x):
            buf.clean_low_latency_buffer(m, st.hidden, st.num_experts)
        if st.weights is not None and st.weights.fp8:
            return moe.moe_ep_low_latency(x, idx, w, st.weights, buf, st.num_experts, m,
                                          impl=self.impl)
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, m, st.num_experts,
                                                               use_fp8=False)
        if st.weights is not None:
            # the down GEMM writes straight into the combine buffer (as moe_ep_low_latency)
            out = buf.get_next_low_latency_combine_buffer(handle)
            expected_m = moe.default_expected_m(m, self.world_size, idx.shape[1],
                                                st.num_experts)
            y = fast_ffn_masked(module, st.weights, recv_x, count, self.impl, expected_m, out)
            combined, _, _ = buf.low_latency_combine(y, idx, w, handle, zero_copy=True)
            return combined
        y = generic_batched(module, recv_x, slice(None)).to(torch.bfloat16)
        combined, _, _ = buf.low_latency_combine(y, idx, w, handle)
        return combined


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------- generic math
def generic_batched(module, x: torch.Tensor, experts) -> torch.Tensor:
    """The module's own expert math on ``x [G, n, H]`` with the local experts ``experts`` (a
    slice of G experts): ``[G, n, H]`` in the weights' dtype. Follows the flags of
    ``@use_experts_implementation``: transposed weights (``x @ W``) or not (``x @ W.T``),
    biases, gate/up through the module's ``_apply_gate`` (GPT-OSS: interleaved, clamped) or
    ``act_fn`` on ``up_proj`` alone, optional post-expert norm."""
    def linear(v, name):
        wt = getattr(module, name)[experts]
        out = torch.bmm(v.to(wt.dtype), wt if module.is_transposed else wt.transpose(1, 2))
        if module.has_bias:
            out = out + getattr(module, name + "_bias")[experts].unsqueeze(1)
        return out

    if module.has_gate:
        h = module._apply_gate(linear(x, "gate_up_proj"))
    else:
        h = module.act_fn(linear(x, "up_proj"))
    y = linear(h, "down_proj")
    if getattr(module, "has_post_expert_norm", False):  # transformers >= 5.2x only
        y = module.post_expert_norm(y)
    return y


def generic_rows(module, recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor,
                 model_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Normal-mode local compute with the module's own math: ``recv_x [N, H]`` bf16,
    ``recv_idx [N, K]`` local expert ids (-1 = elsewhere), ``recv_w [N, K]`` float32 -> ``[N,
    H]`` bf16, each row the weighted sum over its local experts, each weighted output rounded
    to ``model_dtype`` first (``eager_term``)."""
    out = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    for e in torch.unique(recv_idx[recv_idx >= 0]).tolist():
        tok, slot = torch.where(recv_idx == e)
        y = generic_batched(module, recv_x[tok].unsqueeze(0), slice(e, e + 1))[0]
        out.index_add_(0, tok, eager_term(y, recv_w[tok, slot], model_dtype))
    return out.to(torch.bfloat16)


def eager_term(y: torch.Tensor, w: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """One expert's weighted output as transformers' eager experts forward adds it up:
    ``y [..., H]`` (the expert's output in the weights' dtype) times ``w [...]`` (float32),
    rounded to ``model_dtype`` (the dtype of the hidden states the model passed in), returned
    as float32 ``[..., H]``.

    Eager computes ``(y * w).to(hidden_states.dtype)`` and ``index_add_``s it into a
    ``hidden_states.dtype`` accumulator, so each term is rounded to the model's dtype before
    any sum. Summing the unrounded terms in float32 instead (what ``ep_comm.moe``'s unpermute
    and combine do) gives rows 1 ulp off the model's in about a third of the elements; in
    DeepSeek-V3 the next layer's grouped top-k reads those and flips near-ties (issue #25).
    The routing weights' dtype does not matter here: whether the model passes them in float32
    (DeepSeek-V3, Mixtral) or bf16 (Qwen3-MoE, GPT-OSS), bf16 x bf16 is exact in float32, so
    ``round(y * w)`` is the same value eager gets. With top-2 routing the combined row (the
    float32 sum of at most two such terms, rounded once) is then the eager row bit for bit,
    wherever the two experts live; with top-k > 2 eager adds in the model's dtype expert by
    expert, and the rows can differ by an ulp."""
    return (y.float() * w.unsqueeze(-1)).to(model_dtype).float()


def _triton_gemms(impl: str, x: torch.Tensor) -> bool:
    """Whether ``ep_comm.moe``'s Triton grouped GEMMs run (its ``impl`` rule: ``"auto"`` =
    on CUDA tensors or under ``TRITON_INTERPRET=1``)."""
    from ep_comm.moe import gemm
    if impl not in ("auto", "triton", "torch"):
        raise InputError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return impl == "triton" or (impl == "auto" and (x.is_cuda or gemm.interpreting()))


def fast_rows(module, weights, recv_x: torch.Tensor, recv_idx: torch.Tensor,
              recv_w: torch.Tensor, num_rows: int, impl: str,
              model_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Normal-mode local compute of SiLU experts (``_fast_path_ok``) with bf16 weights:
    ``recv_x [N, H]`` bf16, ``recv_idx [N, K]`` local expert ids (-1 = elsewhere), ``recv_w
    [N, K]`` float32, ``num_rows`` the (row, local expert) pairs received (host int) -> ``[N,
    H]`` bf16. ``ep_comm.moe``'s grouping and permutation, the experts by
    ``fast_ffn_contiguous``, each weighted output rounded as eager does (``eager_term``)."""
    lay = moe.group_by_expert(recv_idx, weights.num_experts, num_rows=num_rows, impl=impl)
    xp = moe.permute(recv_x, lay, impl)
    y = fast_ffn_contiguous(module, weights, xp, lay, impl)
    d = lay.dest.long()
    w = torch.where(d >= 0, recv_w, torch.zeros_like(recv_w))  # slots elsewhere add zero
    acc = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    for k in range(d.shape[1]):  # slot by slot: no [N, K, H] float32 temporary
        acc += eager_term(y[d[:, k].clamp(min=0)], w[:, k], model_dtype)
    return acc.to(torch.bfloat16)


def fast_ffn_contiguous(module, weights, xp: torch.Tensor, lay, impl: str) -> torch.Tensor:
    """The local experts on the expert-contiguous rows ``xp [P, H]`` bf16 (``lay``:
    ``moe.ExpertGroups``) -> ``[P, H]`` bf16 (valid rows only written). The gate through the
    module's own ``_apply_gate`` (``act_fn(gate) * up`` in bf16, so rounded twice, as eager;
    ``ep_comm.moe``'s fused SiLU-mul rounds once and differs by an ulp in about a quarter
    of the elements). GEMMs: ``ep_comm.moe``'s Triton grouped GEMMs, or, where those do not run,
    ``F.linear`` per expert in bf16, the module's own GEMM (``moe``'s torch GEMMs compute in
    float32 and round differently)."""
    from ep_comm.moe import gemm
    if _triton_gemms(impl, xp):
        gu = gemm.grouped_gemm_contiguous(xp, weights.w13, lay.group_end,
                                          group_rows=lay.group_rows)
        # rows after the last group (none here: num_rows is exact) would hold garbage; the
        # down GEMM reads valid rows only
        h = module._apply_gate(gu)
        return gemm.grouped_gemm_contiguous(h, weights.w2, lay.group_end,
                                            group_rows=lay.group_rows)
    out = torch.empty(xp.shape, dtype=torch.bfloat16, device=xp.device)
    start = 0
    for e, (end, rows) in enumerate(zip(lay.group_end.tolist(), lay.group_rows.tolist())):
        n = min(rows, end - start)
        if n > 0:
            out[start:start + n] = _expert_linear(module, weights, e, xp[start:start + n])
        start = end
    return out


def fast_ffn_masked(module, weights, recv_x: torch.Tensor, count: torch.Tensor, impl: str,
                    expected_m: int, out: torch.Tensor) -> torch.Tensor:
    """Low-latency local compute of SiLU experts with bf16 weights: ``recv_x [E_l, R * M, H]``
    bf16, ``count [E_l]`` int -> ``out [E_l, R * M, H]`` bf16 (rows past the counts
    untouched). Rounds as ``fast_ffn_contiguous`` (the module's ``_apply_gate``); with Triton
    no host synchronisation (graph-capturable: the gate runs on every row of the buffer)."""
    from ep_comm.moe import gemm
    if _triton_gemms(impl, recv_x):
        gu = gemm.grouped_gemm_masked(recv_x, weights.w13, count, expected_m=expected_m)
        h = module._apply_gate(gu)
        return gemm.grouped_gemm_masked(h, weights.w2, count, expected_m=expected_m, out=out)
    for e, c in enumerate(count.tolist()):
        c = min(c, recv_x.shape[1])
        if c > 0:
            out[e, :c] = _expert_linear(module, weights, e, recv_x[e, :c])
    return out


def _expert_linear(module, weights, e: int, x: torch.Tensor) -> torch.Tensor:
    """Local expert ``e`` on ``x [n, H]`` bf16 exactly as the eager forward computes it ->
    ``[n, H]`` bf16."""
    f = torch.nn.functional
    w13, w2 = weights.w13[e], weights.w2[e]
    h = module._apply_gate(f.linear(x.to(w13.dtype), w13))
    return f.linear(h, w2).to(torch.bfloat16)


# ----------------------------------------------------------------------------- registration
def _binding(module) -> tuple[EpCommExperts, LayerState]:
    st = getattr(module, "_ep_comm_state", None)
    if st is None:
        raise InputError(f"{type(module).__name__} runs experts_implementation "
                         f"{module.config._experts_implementation!r} but its experts were not "
                         "sharded: call ep_comm.integrations.transformers.shard_experts(model, "
                         "group) first")
    return st


def ep_comm_experts_forward(self, hidden_states, top_k_index, top_k_weights, **kwargs):
    """ExpertsInterface entry ``"ep_comm"``: normal mode."""
    binding, st = _binding(self)
    return binding.run(self, st, hidden_states, top_k_index, top_k_weights, IMPL_NORMAL)


def ep_comm_ll_experts_forward(self, hidden_states, top_k_index, top_k_weights, **kwargs):
    """ExpertsInterface entry ``"ep_comm_ll"``: low-latency mode on decode steps."""
    binding, st = _binding(self)
    return binding.run(self, st, hidden_states, top_k_index, top_k_weights, IMPL_LOW_LATENCY)


ExpertsInterface.register(IMPL_NORMAL, ep_comm_experts_forward)
ExpertsInterface.register(IMPL_LOW_LATENCY, ep_comm_ll_experts_forward)


# ----------------------------------------------------------------------------- sharding
def experts_modules(model) -> dict[str, torch.nn.Module]:
    """The model's experts modules routed through ``ExpertsInterface`` (classes decorated with
    ``@use_experts_implementation``), by module name. Raises ``UnsupportedModelError`` naming
    the class of a MoE block that is not routed through the interface, of an FP8-quantised
    experts module, or of the model when it has no such module at all."""
    found = {}
    for name, m in model.named_modules():
        # the attributes @use_experts_implementation sets on every decorated experts module
        # (transformers 5.x; 5.25 adds _is_expert_parallel, which 5.17 does not have)
        if all(hasattr(m, a) for a in ("has_gate", "has_bias", "is_transposed",
                                       "is_concatenated")):
            if any(n.endswith("_scale_inv") for n, _ in m.named_parameters(recurse=False)):
                raise UnsupportedModelError(
                    f"{name} ({type(m).__name__}) holds FP8-quantised experts: load the model "
                    "dequantised (bf16) and pass shard_experts(..., use_fp8=True)")
            found[name] = m
    for name, m in model.named_modules():
        if _looks_like_moe_block(m) and not any(
                k == name or k.startswith(name + ".") for k in found):
            raise UnsupportedModelError(
                f"{name} ({type(m).__name__}) is a MoE block whose experts are not routed "
                "through transformers' ExpertsInterface (no @use_experts_implementation experts "
                "module), so ep_comm cannot take them over")
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no experts module routed through transformers' "
            "ExpertsInterface (@use_experts_implementation); supported: Qwen3-MoE, Mixtral, "
            "DeepSeek-V3, GPT-OSS and other models whose experts use that decorator")
    return found


def _looks_like_moe_block(m) -> bool:
    experts = getattr(m, "experts", None)
    if isinstance(experts, torch.nn.ModuleList):
        return True
    cls = type(m).__name__.lower()
    return ("moe" in cls or "sparse" in cls) and isinstance(experts, torch.nn.Module)


def _fast_path_ok(m) -> bool:
    """Experts that ep_comm.moe's GEMMs compute exactly: SiLU(gate) * up with concatenated
    [E, 2I, H] gate/up (gate rows first), [E, H, I] down, no biases, no post norm."""
    return (m.has_gate and m.is_concatenated and not m.is_transposed and not m.has_bias
            and not getattr(m, "has_post_expert_norm", False)
            and getattr(type(m), "_apply_gate", None) is getattr(_hf_moe, "_default_apply_gate", 0)
            and isinstance(getattr(m, "act_fn", None), torch.nn.Module)
            and type(m.act_fn).__name__ in ("SiLU", "SiLUActivation"))


def default_buffer(group, hidden: int, num_experts: int,
                   num_max_dispatch_tokens_per_rank: int | None, backend: str = "auto") -> Buffer:
    """A Buffer sized for bf16 tokens of ``hidden`` channels, normal mode, plus low-latency mode
    for up to ``num_max_dispatch_tokens_per_rank`` tokens per rank when given."""
    r = dist.get_world_size(group)
    cfg = Buffer.get_dispatch_config(r)
    nvl = cfg.get_nvl_buffer_size_hint(hidden * 2, r)
    rdma = cfg.get_rdma_buffer_size_hint(hidden * 2, r)
    ll = num_max_dispatch_tokens_per_rank is not None
    if ll:
        rdma = max(rdma, Buffer.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, r, num_experts))
    return Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=ll,
                  backend=backend, explicitly_destroy=True)


def shard_experts(model, group=None, *, buffer: Buffer | None = None,
                  num_max_dispatch_tokens_per_rank: int | None = None, use_fp8: bool = False,
                  impl: str = "auto", backend: str = "auto") -> EpCommExperts:
    """Bind ``model``'s experts to ep_comm over ``group`` (collective: every rank calls it).

    Keeps rank r's experts ``[r * E / R, (r + 1) * E / R)`` of every experts module (the other
    experts' weights are freed), attaches the binding the registered forwards use, and switches
    the model to ``"ep_comm"`` unless it already runs ``"ep_comm"`` or ``"ep_comm_ll"``.

    Args:
        model: a transformers model, every rank holding the same weights (same checkpoint or
            same seed), on the rank's device; bf16 is the intended dtype.
        group: the expert-parallel ProcessGroup (default: the world).
        buffer: an ep_comm Buffer over ``group`` (default: ``default_buffer`` sized for the
            model; it must have ``low_latency_mode=True`` for low-latency mode).
        num_max_dispatch_tokens_per_rank: low-latency M, the largest decode batch of a rank;
            None: normal mode only.
        use_fp8: FP8 (128 x 128 block-scaled) expert weights and activations, SiLU experts only.
        impl: ``ep_comm.moe`` GEMM implementation (``"auto"``, ``"triton"``, ``"torch"``).
        backend: Buffer backend when ``buffer`` is None.

    Returns:
        The ``EpCommExperts`` binding (``destroy()`` frees the Buffer).
    """
    mods = experts_modules(model)  # unsupported models fail here, before any collective
    group = group if group is not None else dist.group.WORLD
    r, world = dist.get_rank(group), dist.get_world_size(group)
    states: dict[str, tuple] = {}
    hidden = num_experts = None
    for name, m in mods.items():
        if getattr(m, "_ep_comm_state", None) is not None:
            raise InputError(f"{name} ({type(m).__name__}) is already sharded")
        if getattr(m, "_is_expert_parallel", False):
            raise UnsupportedModelError(
                f"{name} ({type(m).__name__}) is already expert-parallel through transformers' "
                "DistributedConfig; load the model without distributed_config")
        main = m.gate_up_proj if m.has_gate else m.up_proj
        e = main.shape[0]
        h = main.shape[1] if m.is_transposed else main.shape[2]
        if e % world:
            raise UnsupportedModelError(f"{name} ({type(m).__name__}): {e} experts cannot be "
                                        f"split evenly over {world} ranks")
        fast = _fast_path_ok(m)
        if use_fp8 and not fast:
            raise UnsupportedModelError(f"{name} ({type(m).__name__}): use_fp8 needs SiLU "
                                        "experts without biases (ep_comm.moe's FP8 GEMMs)")
        if hidden not in (None, h) or num_experts not in (None, e):
            # one Buffer serves every layer: its size hints assume one (H, E)
            raise UnsupportedModelError(f"{name} ({type(m).__name__}): layers with different "
                                        "hidden sizes or expert counts are not supported")
        hidden, num_experts = h, e
        states[name] = (m, e, h, fast)
    if buffer is None:
        buffer = default_buffer(group, hidden, num_experts, num_max_dispatch_tokens_per_rank,
                                backend)
    binding = EpCommExperts(model, group, buffer, num_max_dispatch_tokens_per_rank, use_fp8,
                            impl)
    for name, (m, e, h, fast) in states.items():
        per = e // world
        sl = slice(r * per, (r + 1) * per)
        for pname in EXPERT_PARAMS:
            p = getattr(m, pname, None)
            if isinstance(p, torch.Tensor):
                # clone: a view would keep the full tensor alive
                setattr(m, pname, torch.nn.Parameter(p.data[sl].clone(), requires_grad=False))
        m.num_experts = per
        weights = None
        if fast:
            w13, w2 = m.gate_up_proj.data, m.down_proj.data
            if use_fp8:
                weights = moe.ExpertWeights(moe.quantize_weight_fp8(w13),
                                            moe.quantize_weight_fp8(w2), r * per)
            else:
                weights = moe.ExpertWeights(w13, w2, r * per)
        st = LayerState(e, h, weights)
        binding.layers[name] = st
        m._ep_comm_state = (binding, st)
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_experts_implementation", None) not in IMPLEMENTATIONS:
        model.set_experts_implementation(IMPL_NORMAL)
    return binding
