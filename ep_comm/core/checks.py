"""Argument checks shared by every public call. Each raises ``InputError`` with a message that
names the argument, what was expected and what was given, before any communication starts."""
from __future__ import annotations

import torch

from ep_comm.core.constants import FP8_BLOCK
from ep_comm.errors import InputError

#: dtype of top-k expert indices (DeepEP's ``topk_idx_t``).
topk_idx_t = torch.int64


def _fail(msg: str):
    raise InputError(msg)


def tensor(name: str, t, *, dtype=None, dims: int | None = None, shape=None, device=None,
           contiguous: bool = True) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given dtype, number of dims, shape (None entries
    match anything), device type, and (by default) contiguous rows."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            _fail(f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        _fail(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            _fail(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device.type != device.type:
        _fail(f"{name} must be on {device.type}, got {t.device}")
    if device is not None and device.type == "cuda" and t.device != device:
        _fail(f"{name} is on {t.device} but this rank's Buffer uses {device}")
    if contiguous and not t.is_contiguous():
        _fail(f"{name} must be contiguous (call .contiguous())")
    return t


def num_experts(e: int, num_ranks: int) -> int:
    if not isinstance(e, int) or e <= 0:
        _fail(f"num_experts must be a positive int, got {e!r}")
    if e % num_ranks:
        _fail(f"num_experts={e} is not divisible by the number of ranks {num_ranks}: experts "
              f"are split evenly and contiguously over ranks")
    return e


def topk_idx(t, device, num_tokens: int | None = None) -> torch.Tensor:
    tensor("topk_idx", t, dtype=topk_idx_t, dims=2, device=device)
    if num_tokens is not None and t.shape[0] != num_tokens:
        _fail(f"topk_idx has {t.shape[0]} rows but x has {num_tokens} tokens")
    return t


def topk_idx_range(t: torch.Tensor, e: int) -> None:
    """Values in [-1, e). Reads the tensor (a host sync), so only where a sync happens anyway."""
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= e):
        _fail(f"topk_idx values must be -1 or in [0, {e}), got range "
              f"[{int(t.min())}, {int(t.max())}]")


def topk_weights(t, idx: torch.Tensor, device) -> torch.Tensor:
    return tensor("topk_weights", t, dtype=torch.float32, shape=tuple(idx.shape), device=device)


def x_payload(x, device, name: str = "x"):
    """Split ``x`` (bf16 tensor, or (fp8 tensor, float32 scales) tuple) into (payload, scales)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            _fail(f"{name} as a tuple must be (x_fp8, scales), got {len(x)} items")
        q, s = x
        tensor(f"{name}[0]", q, dtype=torch.float8_e4m3fn, dims=2, device=device)
        h = q.shape[1]
        if h % FP8_BLOCK:
            _fail(f"hidden {h} of the fp8 payload must be a multiple of {FP8_BLOCK}")
        tensor(f"{name}[1] (scales)", s, dtype=torch.float32, shape=(q.shape[0], h // FP8_BLOCK),
               device=device)
        return q, s
    tensor(name, x, dtype=torch.bfloat16, dims=2, device=device)
    return x, None


def hidden_ok(h: int) -> None:
    if h <= 0 or (h * 2) % 16:
        _fail(f"hidden must be a positive multiple of 8 (16-byte rows), got {h}")


def event(prev) -> None:
    from ep_comm.event import EventOverlap
    if prev is not None and not isinstance(prev, EventOverlap):
        _fail(f"previous_event must be an ep_comm.EventOverlap or None, got {type(prev).__name__}")


def comm_stream_flags(previous_event, async_finish: bool, allocate_on_comm_stream: bool) -> None:
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        _fail("allocate_on_comm_stream=True needs previous_event and async_finish=True "
              "(the outputs are allocated on the communication stream)")
    event(previous_event)


def alignment(expert_alignment: int) -> None:
    if not isinstance(expert_alignment, int) or expert_alignment < 1:
        _fail(f"expert_alignment must be an int >= 1, got {expert_alignment!r}")


def worst_tokens(num_worst_tokens: int) -> None:
    if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
        _fail(f"num_worst_tokens must be an int >= 0, got {num_worst_tokens!r}")


def sig(t):
    """What the checks of a tensor argument look at (dtype, shape, device, contiguity), as a
    hashable key; a non-tensor gives its type, so it never matches a validated tensor.

    ``Buffer`` validates a call fully the first time its key is seen (and always under
    ``EP_COMM_DEBUG=1``); a later call whose key is in the validated set passed the same
    checks, so this comparison is its guard."""
    if isinstance(t, torch.Tensor):
        return (t.dtype, t.shape, t.device, t.is_contiguous())
    return (type(t),)
