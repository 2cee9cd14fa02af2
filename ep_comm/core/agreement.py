"""Call agreement: every collective call of a Buffer carries a sequence number and a signature.

All ranks must make the same Buffer calls in the same order with agreeing sizes. Each rank
packs its call into a fixed-size int64 vector (``SIG_LEN`` entries, the same on every rank for
any call, so that exchanging it can never itself fail on mismatched sizes), which travels in
the first exchange of the call (the reference backend prepends it to the count exchange). Each
rank then compares all the vectors it received and, on any difference, raises the same
``CollectiveMismatchError`` on every rank, naming the field, the values and the ranks holding
each, before any payload moves.

A rank whose own input is bad (expert ids out of range, NaN/Inf with the opt-in check) still
takes part in this exchange with a "bad input" status, then raises its ``InputError``; its peers
raise ``PeerInputError`` naming it instead of waiting for a call that will never come.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

from ep_comm.core.constants import (CALL_SIG_COMPARED, CALL_SIG_FIELDS, LL_TAG_SEQ_MOD,
                                    LL_TAG_SEQ_SHIFT)
from ep_comm.errors import CollectiveMismatchError, EpCommError, InputError, PeerInputError

#: ``1``: the kernels backend also agrees on the host in every call, first (one extra small
#: exchange per call; by default only a dispatch from a layout agrees, in the NVLink notify
#: kernel). The reference backend always agrees, in the count exchange it already does.
AGREE_ENV = "EP_COMM_CHECK_AGREEMENT"

#: The low-latency kernels agree in their count words (``ll_tag``) unless this is ``0``; read
#: once per Buffer (docs/faults.md). Every rank must set it alike.
LL_AGREE_ENV = "EP_COMM_LL_KERNEL_AGREEMENT"


def ll_agreement_on() -> bool:
    """Whether the low-latency kernels tag their count words (``LL_AGREE_ENV``, default on)."""
    return os.environ.get(LL_AGREE_ENV, "1") != "0"


#: Marks a signature vector (a stray or corrupted message shows up as a mismatch on "magic").
MAGIC = 0x65705F636F6D6D  # "ep_comm"

#: Operation codes (values of the "op" field).
OPS = {"dispatch": 1, "cached_dispatch": 2, "combine": 3, "low_latency_dispatch": 4,
       "low_latency_combine": 5, "agree": 6}
_OP_NAMES = {v: k for k, v in OPS.items()}

#: dtype codes (values of the "dtype" field); 0 = not applicable.
DTYPES = {torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float32: 3}
_DTYPE_NAMES = {v: str(k).replace("torch.", "") for k, v in DTYPES.items()}

#: Field order of the vector: the magic word, then the device signature's words
#: (``constants.CALL_SIG_FIELDS``, shared with the NVLink notify kernel). ``status``/``bad_token``/
#: ``bad_col``/``bad_value`` describe this rank's own input check (0 = ok, 1 = bad); they are not
#: compared between ranks.
FIELDS = ("magic",) + CALL_SIG_FIELDS
SIG_LEN = len(FIELDS)
_COMPARED = FIELDS[:1 + CALL_SIG_COMPARED]
_STATUS = FIELDS.index("status")


@dataclasses.dataclass(frozen=True, slots=True)
class Signature:
    """What every rank must agree on for one call. -1 = not applicable to this operation.

    Attributes:
        op: key of ``OPS``; hidden: H; dtype: the payload dtype (fp8 when cast on the way);
        num_experts: E; num_topk: K (-1 without top-k); handle: the sequence number of the
        dispatch whose handle this call uses (-1 for none, or a handle of another backend);
        num_max_tokens: ``num_max_dispatch_tokens_per_rank`` in low-latency mode.
    """

    op: str
    hidden: int = -1
    dtype: torch.dtype | None = None
    num_experts: int = -1
    num_topk: int = -1
    handle: int = -1
    num_max_tokens: int = -1


def pack(seq: int, sig: Signature, input_error: "BadInput | None" = None) -> torch.Tensor:
    """[SIG_LEN] int64 on CPU: this rank's vector for call ``seq``."""
    return torch.tensor([MAGIC] + _values(seq, sig, input_error), dtype=torch.int64)


def _values(seq: int, sig: Signature, input_error: "BadInput | None") -> list[int]:
    bad = input_error or BadInput(-1, -1, 0, "")
    return [seq, OPS[sig.op], sig.hidden, DTYPES.get(sig.dtype, 0), sig.num_experts,
            sig.num_topk, sig.handle, sig.num_max_tokens, int(input_error is not None),
            bad.token, bad.col, bad.value]


_I32_MIN, _I32_MAX = -2**31, 2**31 - 1


def device_words(seq: int, sig: Signature, input_error: "BadInput | None" = None) -> list[int]:
    """The vector less its magic word, ``CALL_SIG_WORDS`` int32 values: what the NVLink notify
    kernel exchanges next to the counts (the counts' own tag protocol makes the magic word
    redundant there). Values outside int32 (a bad expert id of 2**40) are clamped, the same
    on every rank, so two ranks still compare equal exactly when their calls agree."""
    values = _values(seq, sig, input_error)
    if input_error is None and seq <= _I32_MAX:  # the sizes are checked ints: no clamp needed
        return values
    return [min(max(v, _I32_MIN), _I32_MAX) for v in values]


def error_from_words(rank: int, rows: dict[int, list[int]],
                     own_error: "BadInput | None" = None) -> EpCommError | None:
    """The error ``check`` raises for the device words ``rows`` (``{rank: CALL_SIG_WORDS
    ints}``, as the notify kernel received them, this rank's own included), or None: the same
    ``CollectiveMismatchError`` / ``InputError`` / ``PeerInputError`` as the reference backend's,
    identical on every rank because every rank received every row."""
    vectors = {r: torch.tensor([MAGIC] + list(w), dtype=torch.int64) for r, w in rows.items()}
    seq = int(rows[rank][0]) if rank in rows else -1
    try:
        check(rank, seq, vectors, own_error)
    except EpCommError as e:
        return e
    return None


#: The device words hashed into a low-latency tag: the compared ones less seq (carried apart)
#: and handle (a dispatch's seq: it would make the hash of a combine change with every call).
LL_TAG_HASHED = tuple(f for f in CALL_SIG_FIELDS[:CALL_SIG_COMPARED] if f not in ("seq", "handle"))
_LL_TAG_HASHED_IDX = tuple(CALL_SIG_FIELDS.index(f) for f in LL_TAG_HASHED)
_HASH_MASK = (1 << LL_TAG_SEQ_SHIFT) - 1


def ll_tag_hash(words: list[int]) -> int:
    """16 bits (FNV-1a 32 folded) of the ``LL_TAG_HASHED`` words of device words ``words``;
    never 0, so that a tag is never 0 (0 = agreement off)."""
    return _fnv16(tuple(words[i] for i in _LL_TAG_HASHED_IDX))


@functools.lru_cache(maxsize=256)
def _fnv16(values: tuple) -> int:
    # Cached: a decode loop repeats a handful of call shapes, and the byte loop would cost
    # ~10 us of Python in every low-latency call.
    h = 0x811C9DC5
    for v in values:
        for byte in (v & 0xFFFFFFFF).to_bytes(4, "little"):
            h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    h = (h ^ (h >> 16)) & _HASH_MASK
    return h or 1


def ll_tag(words: list[int], capturing: bool = False) -> int:
    """The low-latency count words' tag of a call (``constants.LL_TAG_SEQ_SHIFT``): its sequence
    number folded into [1, LL_TAG_SEQ_MOD] (0 while a CUDA graph is captured: a replay
    repeats the captured tag, so graphs are compared by hash only), then the hash. A positive
    int32, the kernels' ``call_tag`` argument."""
    seq = 0 if capturing else (words[0] - 1) % LL_TAG_SEQ_MOD + 1
    return (seq << LL_TAG_SEQ_SHIFT) | ll_tag_hash(words)


def ll_tag_error(rank: int, peer: int, where: str, theirs: int, mine: int,
                 seq_hint: int, note: str | None = None) -> EpCommError:
    """The error of a low-latency kernel that refused ``peer``'s count word (tag ``theirs``,
    this rank's ``mine``; ``where``: phase and expert). ``seq_hint``: this rank's current
    sequence number, from which the folded numbers are unfolded. A sequence difference names
    the rank that skipped a call; a hash difference names the rank whose call differs (the
    field is not known from a hash: ``EP_COMM_CHECK_AGREEMENT=1`` names it). ``note``: what
    refused the call and what the caller does next (default: the low-latency kernels' words);
    the internode kernels compare the same tags in their barrier and notify flags."""
    theirs &= 0xFFFFFFFF
    seq_m, seq_t = mine >> LL_TAG_SEQ_SHIFT, theirs >> LL_TAG_SEQ_SHIFT
    hash_m, hash_t = mine & _HASH_MASK, theirs & _HASH_MASK

    def unfold(s: int) -> int:  # the call number nearest below seq_hint with this folded value
        return seq_hint - (((seq_hint - 1) % LL_TAG_SEQ_MOD + 1 - s) % LL_TAG_SEQ_MOD)

    call = unfold(seq_m) if seq_m else seq_hint
    if note is None:
        note = (f"The low-latency kernels refused rank {peer}'s rows ({where}); the status "
                "stays set until clean_low_latency_buffer. ")
    if theirs == 0:  # a tag is never 0: the peer runs without the agreement
        return CollectiveMismatchError(
            rank, call, LL_AGREE_ENV, {"1": [rank], "0": [peer]},
            note + f"Set {LL_AGREE_ENV} the same on every rank. ")
    if hash_m == hash_t and seq_m and seq_t and seq_m != seq_t:
        other = call + ((seq_t - seq_m + LL_TAG_SEQ_MOD // 2) % LL_TAG_SEQ_MOD
                        - LL_TAG_SEQ_MOD // 2)
        behind = peer if other < call else rank
        return CollectiveMismatchError(
            rank, call, "seq", {f"#{call}": [rank], f"#{other}": [peer]},
            note + f"Rank {behind} skipped a call (its count words carry the lower call "
            "number). ")
    return CollectiveMismatchError(
        rank, call, "signature", {f"hash {hash_m:#06x}": [rank], f"hash {hash_t:#06x}": [peer]},
        note + f"Rank {peer}'s call differs from this rank's call #{call} in one of "
        f"{', '.join(LL_TAG_HASHED)} (the kernels compare a hash of them; "
        f"{AGREE_ENV}=1 names the field). ")


@dataclasses.dataclass(frozen=True, slots=True)
class BadInput:
    """This rank's input failed a check: the first offending token, its top-k column and value,
    and the ``InputError`` text."""

    token: int
    col: int
    value: int
    message: str

    def error(self) -> InputError:
        return InputError(self.message)


def _show(field: str, v: int) -> str:
    if field == "op":
        return _OP_NAMES.get(v, f"?{v}")
    if field == "dtype":
        return _DTYPE_NAMES.get(v, "none" if v == 0 else f"?{v}")
    if field == "seq":
        return f"#{v}"
    if field == "handle":
        return "none" if v < 0 else f"handle of call #{v}"
    return str(v)


def check(rank: int, seq: int, vectors: dict[int, torch.Tensor],
          own_error: BadInput | None = None) -> None:
    """Compare the vectors of the ranks taking part (``{rank: [SIG_LEN] int64}``).

    Raises, identically on every rank: ``CollectiveMismatchError`` for the first differing
    field; then this rank's own ``InputError`` if its input was bad; else ``PeerInputError``
    naming the first rank whose input was bad. Returns None when the call may proceed.
    """
    rows = {r: v.tolist() for r, v in sorted(vectors.items())}
    for i, field in enumerate(_COMPARED):
        values: dict[str, list[int]] = {}
        for r, row in rows.items():
            values.setdefault(_show(field, row[i]), []).append(r)
        if len(values) > 1:
            detail = ""
            if field == "seq":
                detail = ("The sequence numbers count the Buffer calls each rank made: a rank "
                          "with a lower number skipped a call (or a call of it failed "
                          "locally). ")
            raise CollectiveMismatchError(rank, seq, field, values, detail)
    if own_error is not None:
        raise own_error.error()
    # This rank's words can say bad input without own_error: the check ran on the device (the
    # layout kernel, for a call whose ids the host did not read). Its own error comes first.
    bad = [r for r, row in rows.items() if row[_STATUS]]
    for r in sorted(bad, key=lambda r: r != rank):
        tok, col, val = rows[r][_STATUS + 1:_STATUS + 4]
        what = (f"topk_idx[{tok}, {col}] = {val} is out of range" if col >= 0 else
                f"x[{tok}, {-col - 2}] is NaN/Inf" if col <= -2 else "input check failed")
        if r == rank:
            raise InputError(f"{what} (token {tok}): expert ids must lie in [-1, num_experts); "
                             f"found on the device by get_dispatch_layout's kernel, so every "
                             f"rank refused the dispatch that used this layout")
        raise PeerInputError(rank, seq, r, what)


def first_bad_expert(topk_idx: torch.Tensor, num_experts: int) -> BadInput | None:
    """The first entry of ``topk_idx`` [T, K] outside [-1, num_experts), or None.

    Reads the tensor on the host (one synchronisation on CUDA). The message names the token
    (row), the top-k column and the value.
    """
    if topk_idx.numel() == 0:
        return None
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if not bool(bad.any()):
        return None
    flat = int(torch.nonzero(bad.flatten())[0])
    tok, col = divmod(flat, topk_idx.shape[1])
    val = int(topk_idx[tok, col])
    why = ("-1 is the only negative id (no expert)" if val < -1 else
           f"num_experts={num_experts} was passed; ids are never used to infer it")
    return BadInput(tok, col, val, f"topk_idx[{tok}, {col}] = {val} (token {tok}) is outside "
                    f"[-1, {num_experts}): {why}")


def first_non_finite(x: torch.Tensor, name: str = "x") -> BadInput | None:
    """The first token (row) of ``x`` [T, H] holding NaN or Inf, naming its 128-channel block,
    or None. Used by the opt-in ``EP_COMM_CHECK_FINITE=1`` check of the FP8 paths."""
    if x.numel() == 0:
        return None
    bad = ~torch.isfinite(x.float() if x.dtype not in (torch.float32, torch.bfloat16) else x)
    if not bool(bad.any()):
        return None
    tok, ch = (int(v) for v in torch.nonzero(bad)[0])
    lo = ch - ch % 128
    # col = -(channel + 2) tells peers this was the finite check (see ``check``).
    return BadInput(tok, -(ch + 2), 0, f"{name}[{tok}, {ch}] is {float(x[tok, ch])} (token {tok}): in "
                    f"FP8 a NaN/Inf poisons the scale of its whole 128-channel block "
                    f"[{lo}, {lo + 128}) of that token")
