"""Every number that host and device code must agree on, written once.

The CUDA sources never restate these: ``ep_comm.runtime.jit`` passes ``DEVICE_CONSTANTS`` to
nvcc as ``-D`` defines on every compile (and hashes them into the cache key), and the headers
read them (``kernels/cuda/*.cuh``: ``constexpr int kMaxRanks = EP_NVL_MAX_RANKS;``). A .cu file
compiled without them stops with ``#error``. ``tests/test_layout.py`` checks that every
``EP_*`` name the sources use is defined here and that every name here is used.

Why each value is what it is:

* ``FP8_BLOCK``: channels per FP8 scale (DeepSeek-V3's 1 x 128 activation blocks, 128 x 128
  weight blocks).
* ``FP8_MAX`` / ``FP8_AMAX_MIN``: e4m3fn's largest finite value; the floor on a block's amax so
  that an all-zero block gets a finite, non-zero scale.
* ``REGION_ALIGN``: bytes every region of a communication buffer is aligned to (16-byte vector
  stores, and 128 keeps regions on separate cache lines).
* ``NORMAL_MAX_TOPK``: top-k entries a normal-mode token slot carries (ids and weights travel in
  the slot; 16 covers every published MoE, DeepSeek-V3's top-8 twice over).
* ``NVL_*``: sizes of the control-word arrays of the NVLink buffer (``core.regions``): most ranks
  per NVLink domain, most channels (``num_sms // 2``), most local experts in the notify row.
* ``NVL_WARPS``: warps of an NVLink dispatch/combine block: a multiple of every sender group
  (24 / R for R in 1, 2, 3, 4, 6, 8) and of the default window ``NVL_WINDOW_TOKENS``.
* ``NVL_WINDOW_TOKENS`` / ``NVL_RING_CHUNKS``: tokens a sender publishes at once (at most 32:
  one warp ballot) and windows per ring (see ``ep_comm.config``).
* ``INTER_*``: the internode kernels' limits (``kernels/cuda/internode.cu``).
* ``LL_THREADS``: threads of a low-latency block. One routing warp per top-k slot gives
  ``LL_MAX_TOPK`` = 32, one waiting thread per source rank gives ``LL_MAX_RANKS`` = 1024.
* ``STATUS_*`` / ``PHASE_*``: the codes and phases kernels write into their host status word
  (``ep_comm.backends.kernels.status`` decodes them).
* ``CALL_SIG_*``: the call signature that the notify kernels (NVLink and internode) exchange
  with the counts (``ep_comm.core.agreement``: the agreement vector less its magic word, as
  int32). The kernels know only the number of words and how many of them are compared; the
  names are here.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------- formats
FP8_BLOCK = 128
FP8_MAX = 448.0
FP8_AMAX_MIN = 1e-4
REGION_ALIGN = 128

# ------------------------------------------------------------------------- normal mode limits
NORMAL_MAX_TOPK = 16
DEFAULT_NUM_SMS = 24
NVL_WINDOW_TOKENS = 24
NVL_RING_CHUNKS = 4
NVL_MAX_RANKS = 8
NVL_MAX_CHANNELS = 64
NVL_MAX_LOCAL_EXPERTS = 1024
NVL_WARPS = 24
#: Largest window: tokens of one warp ballot.
NVL_MAX_WINDOW = 32
# ------------------------------------------------------------------------- call signature
#: The words of a call's signature on the device, in order (``agreement.FIELDS`` less "magic").
#: The first ``CALL_SIG_COMPARED`` must be equal on every rank; ``status`` (1: this rank's input
#: failed a host check) and the first bad entry's token, column and value are not compared.
CALL_SIG_FIELDS = ("seq", "op", "hidden", "dtype", "num_experts", "num_topk", "handle",
                   "num_max_tokens", "status", "bad_token", "bad_col", "bad_value")
CALL_SIG_WORDS = len(CALL_SIG_FIELDS)
CALL_SIG_COMPARED = CALL_SIG_FIELDS.index("status")

#: int32 words of one notify counts row: T_s, the call signature [CALL_SIG_WORDS],
#: [NVL_MAX_RANKS] per-rank, [L] per-expert counts.
NVL_NOTIFY_ROW = 1 + CALL_SIG_WORDS + NVL_MAX_RANKS + NVL_MAX_LOCAL_EXPERTS
#: Host status word of the NVLink/internode kernels: [0..7] the error fields (and
#: [NVL_INFO_OWN_KERNEL, +1] for STATUS_DISAGREE_KERNEL), [8] the received
#: row count (notify), from [16] the received count per local expert, from
#: ``NVL_INFO_CALL_SIGS`` every rank's call signature as the notify kernel received it (written
#: only when the call was refused: ``STATUS_DISAGREE``).
NVL_INFO_NUM_RECV = 8
NVL_INFO_OWN_KERNEL = 9
NVL_INFO_EXPERT_COUNTS = 16
NVL_INFO_CALL_SIGS = NVL_INFO_EXPERT_COUNTS + NVL_MAX_LOCAL_EXPERTS
NVL_STATUS_WORDS = NVL_INFO_CALL_SIGS + NVL_MAX_RANKS * CALL_SIG_WORDS

#: Control words of an NVLink buffer (``regions.IntranodeRegions`` ``ctrl``, uint32): [0] the
#: kernel sequence number, [1] blocks of the running kernel that finished, [2] the status claim,
#: [``NVL_CTRL_STOP``] nonzero once some rank published a finding here (every wait of every
#: later kernel then stops; peers write it), [``NVL_CTRL_PUBLISHED``] claimed (local) by the one
#: wait of this rank that publishes its finding, then from [``NVL_CTRL_ANNOUNCE``] one uint64 per
#: source rank s,
#: written by s at the start of each numbered kernel (its announcement: ``tag << 32 | what``),
#: then from [``NVL_CTRL_FINDING``] three uint64 per source rank s, written by s when it found a
#: rank b announcing another kernel under its kernel's number: ``1 << 63 | b << 8 | s``, s's
#: announcement, b's (``kernels/cuda/intranode_common.cuh``, "kernel announcements").
#: ``what``: the kernel kind (``NVL_KERNEL_*``) in bits 0-1, ``row_int4`` in bits
#: ``NVL_ANN_ROW_SHIFT``.. (``NVL_ANN_ROW_BITS``), the top-k in bits ``NVL_ANN_TOPK_SHIFT``..
#: (``NVL_ANN_TOPK_BITS``), fp8 payload (scales travel) at bit ``NVL_ANN_FP8_BIT``, an
#: expanding dispatch at bit ``NVL_ANN_EXPAND_BIT`` (``status.nvl_kernel_mismatch`` decodes it).
NVL_CTRL_STOP = 3
NVL_CTRL_PUBLISHED = 4
NVL_CTRL_ANNOUNCE = 6
NVL_CTRL_FINDING = NVL_CTRL_ANNOUNCE + 2 * NVL_MAX_RANKS
NVL_CTRL_WORDS = NVL_CTRL_FINDING + 6 * NVL_MAX_RANKS
NVL_KERNEL_DISPATCH = 1
NVL_KERNEL_COMBINE = 2
NVL_KERNEL_NOTIFY = 3
NVL_ANN_ROW_SHIFT = 2
NVL_ANN_ROW_BITS = 20
NVL_ANN_TOPK_SHIFT = 22
NVL_ANN_TOPK_BITS = 6
NVL_ANN_FP8_BIT = 28
NVL_ANN_EXPAND_BIT = 29
#: Upper bits of an NVLink ring tag that carry the row layout's hash (``ring_shape`` in
#: ``kernels/cuda/intranode_common.cuh``); the lower 32 - NVL_RING_SHAPE_BITS are the kernel
#: number's.
NVL_RING_SHAPE_BITS = 12

INTER_MAX_NODES = 256
#: Most ranks of an internode group (INTER_MAX_NODES nodes of NVL_MAX_RANKS): the size of the
#: per-rank arrays of the internode agreement (kernels/cuda/internode.cu).
INTER_MAX_RANKS = INTER_MAX_NODES * NVL_MAX_RANKS
INTER_MAX_EXPERTS = 2048
#: Received rows per token of capacity that the internode combine staging holds, at most R.
INTER_ROWS_PER_TOKEN = 16
#: Arrival counters per node and tag parity: a node's slots are counted in at most this many
#: chunks, so a chunk is forwarded (dispatch) or summed (combine) as soon as it has landed.
INTER_DISPATCH_CHUNKS = 64
#: Tokens per rank that ``Config.get_rdma_buffer_size_hint`` sizes the internode buffer for.
INTER_DEFAULT_TOKENS = 4096

# ---------------------------------------------------------------------- low-latency limits
LL_THREADS = 1024
LL_MAX_TOPK = LL_THREADS // 32
LL_MAX_RANKS = LL_THREADS
#: Experts a low-latency Buffer's signal words are laid out for (regions.LowLatencyRegions): the
#: words sit at the same place for every num_experts up to it, so calls of another E (a change,
#: or ranks that disagree, which the call tags then name) never read another layout's words.
LL_MAX_EXPERTS = 2048
#: int32 words of the low-latency host status word: [0, 8) the first failure (code, phase,
#: peer, ...), then from ``LL_INFO_BAD_ID`` the per-call expert-id check of the dispatch kernel:
#: flag, token, column, value of a top-k entry outside [-1, num_experts) (the entry is not
#: sent; the host raises InputError at its next status read and clears the four words).
LL_INFO_BAD_ID = 8
LL_STATUS_WORDS = LL_INFO_BAD_ID + 4
#: Call tag of the low-latency count words (unless ``EP_COMM_LL_KERNEL_AGREEMENT=0``): the upper
#: 32 bits of every count word carry the sender's tag, ``(seq << LL_TAG_SEQ_SHIFT) | hash``, an
#: int32 kernel argument patched per call (``agreement.ll_tag``). ``hash``: 16 bits of the
#: compared signature words less seq and handle; ``seq``: the call's sequence number folded into
#: [1, LL_TAG_SEQ_MOD], or 0 in a CUDA graph capture (a replay repeats it: compared by hash
#: only). A receiver whose tag differs refuses the peer's rows (``STATUS_DISAGREE``).
LL_TAG_SEQ_SHIFT = 16
LL_TAG_SEQ_MOD = 2**15 - 1

#: The layout kernel's record of the first expert id outside [-1, E) (per-call id check on the
#: device, docs/faults.md): one uint64 per Buffer, all ones = none, else ``token <<
#: ID_CHECK_TOKEN_SHIFT | column << ID_CHECK_COL_SHIFT | (uint32) value`` (value clamped to int32),
#: so that ``atomicMin`` keeps the first entry in row-major order. The next notify kernel moves it
#: into its call signature (status, bad_token, bad_col, bad_value) and clears it.
ID_CHECK_TOKEN_SHIFT = 40
ID_CHECK_COL_SHIFT = 32

# ------------------------------------------------------------------------ status words
STATUS_OK = 0
STATUS_TIMEOUT = 1
#: More received tokens than ``num_worst_tokens`` rows (normal mode).
STATUS_OVERFLOW = 2
#: A rank of this node is not reachable with nvshmem_ptr (internode).
STATUS_NO_P2P = 3
#: The notify kernel refused the call: the ranks' signatures differ, or a rank's input failed
#: its host check (the host rebuilds the error from the signatures, ``NVL_INFO_CALL_SIGS``).
STATUS_DISAGREE = 4
#: An internode kernel refused the call because a rank runs another call at this kernel (the
#: barrier and notify flags carry each rank's call tag, ``agreement.ll_tag``): ``[2]`` that rank,
#: ``[3]`` what it runs there (0: a notify kernel, 1: a dispatch or combine kernel), ``[4]`` its
#: call tag, ``[5]`` this rank's (``status.decode_status``).
STATUS_DISAGREE_TAG = 5
#: An NVLink kernel of some rank a found that rank b runs another kernel, or the same kernel
#: with another row layout, as the same kernel number (their announcements,
#: ``NVL_CTRL_ANNOUNCE``), and every rank's waits stopped on a's finding (``NVL_CTRL_FINDING``):
#: ``[1]`` the phase this rank stopped in, ``[2]`` a, ``[3]`` b, ``[4]`` / ``[5]`` a's and b's
#: ``what``, ``[6]`` / ``[7]`` their tags, ``[NVL_INFO_OWN_KERNEL]`` / ``+ 1`` this rank's own
#: ``what`` and tag in the kernel that stopped (``status.nvl_kernel_mismatch``).
STATUS_DISAGREE_KERNEL = 6

#: Phases of the normal-mode kernels (NVLink and internode).
PHASE_NOTIFY = 1
PHASE_DISPATCH_SEND = 2
PHASE_DISPATCH_RECV = 3
PHASE_COMBINE_SEND = 4
PHASE_COMBINE_RECV = 5
PHASE_BARRIER = 6
#: Phases of the low-latency kernels.
PHASE_LL_DISPATCH_RECV = 1
PHASE_LL_COMBINE_RECV = 2
PHASE_LL_DISPATCH_SEND = 3
PHASE_LL_COMBINE_SEND = 4
#: What a low-latency wait awaited (word [4] of its timeout status): a count word, arrivals,
#: or a peer's acknowledgement of this rank's previous send on the same kind and half.
LL_AWAIT_COUNT = 0
LL_AWAIT_ARRIVALS = 1
LL_AWAIT_ACK = 2
#: int32 words of a low-latency ``*_done`` counter region (regions.LowLatencyRegions), one per
#: kind and half: blocks that finished waiting (the last resets the combine words), blocks that
#: finished the send phase (the last counts the send), blocks that finished receiving (the last
#: counts the receive and acknowledges it to every peer).
LL_DONE_RESET = 0
LL_DONE_SEND = 1
LL_DONE_RECV = 2
LL_DONE_WORDS = 4
#: uint64 words of a low-latency ``*_progress`` region, one per kind and half (local): sends
#: made, receives completed (the acknowledgement's value).
LL_PROGRESS_SENT = 0
LL_PROGRESS_RECEIVED = 1
LL_PROGRESS_WORDS = 2

#: name -> value of every constant the CUDA sources read, as ``-DEP_<name>=<value>``.
DEVICE_CONSTANTS: dict[str, int | float] = {
    "FP8_BLOCK": FP8_BLOCK,
    "FP8_MAX": FP8_MAX,
    "FP8_AMAX_MIN": FP8_AMAX_MIN,
    "NVL_MAX_RANKS": NVL_MAX_RANKS,
    "NVL_MAX_CHANNELS": NVL_MAX_CHANNELS,
    "NVL_MAX_LOCAL_EXPERTS": NVL_MAX_LOCAL_EXPERTS,
    "NVL_WARPS": NVL_WARPS,
    "NVL_INFO_NUM_RECV": NVL_INFO_NUM_RECV,
    "NVL_INFO_OWN_KERNEL": NVL_INFO_OWN_KERNEL,
    "NVL_INFO_EXPERT_COUNTS": NVL_INFO_EXPERT_COUNTS,
    "NVL_INFO_CALL_SIGS": NVL_INFO_CALL_SIGS,
    "NVL_NOTIFY_ROW": NVL_NOTIFY_ROW,
    "CALL_SIG_WORDS": CALL_SIG_WORDS,
    "CALL_SIG_COMPARED": CALL_SIG_COMPARED,
    "LL_THREADS": LL_THREADS,
    "LL_TAG_SEQ_SHIFT": LL_TAG_SEQ_SHIFT,
    "LL_INFO_BAD_ID": LL_INFO_BAD_ID,
    "ID_CHECK_TOKEN_SHIFT": ID_CHECK_TOKEN_SHIFT,
    "ID_CHECK_COL_SHIFT": ID_CHECK_COL_SHIFT,
    "STATUS_TIMEOUT": STATUS_TIMEOUT,
    "STATUS_OVERFLOW": STATUS_OVERFLOW,
    "STATUS_NO_P2P": STATUS_NO_P2P,
    "STATUS_DISAGREE": STATUS_DISAGREE,
    "STATUS_DISAGREE_TAG": STATUS_DISAGREE_TAG,
    "STATUS_DISAGREE_KERNEL": STATUS_DISAGREE_KERNEL,
    "NVL_CTRL_STOP": NVL_CTRL_STOP,
    "NVL_CTRL_PUBLISHED": NVL_CTRL_PUBLISHED,
    "NVL_CTRL_ANNOUNCE": NVL_CTRL_ANNOUNCE,
    "NVL_CTRL_FINDING": NVL_CTRL_FINDING,
    "NVL_KERNEL_DISPATCH": NVL_KERNEL_DISPATCH,
    "NVL_KERNEL_COMBINE": NVL_KERNEL_COMBINE,
    "NVL_KERNEL_NOTIFY": NVL_KERNEL_NOTIFY,
    "NVL_ANN_ROW_SHIFT": NVL_ANN_ROW_SHIFT,
    "NVL_ANN_ROW_BITS": NVL_ANN_ROW_BITS,
    "NVL_ANN_TOPK_SHIFT": NVL_ANN_TOPK_SHIFT,
    "NVL_ANN_TOPK_BITS": NVL_ANN_TOPK_BITS,
    "NVL_ANN_FP8_BIT": NVL_ANN_FP8_BIT,
    "NVL_ANN_EXPAND_BIT": NVL_ANN_EXPAND_BIT,
    "NVL_RING_SHAPE_BITS": NVL_RING_SHAPE_BITS,
    "INTER_MAX_RANKS": INTER_MAX_RANKS,
    "INTER_MAX_EXPERTS": INTER_MAX_EXPERTS,
    "PHASE_NOTIFY": PHASE_NOTIFY,
    "PHASE_DISPATCH_SEND": PHASE_DISPATCH_SEND,
    "PHASE_DISPATCH_RECV": PHASE_DISPATCH_RECV,
    "PHASE_COMBINE_SEND": PHASE_COMBINE_SEND,
    "PHASE_COMBINE_RECV": PHASE_COMBINE_RECV,
    "PHASE_BARRIER": PHASE_BARRIER,
    "PHASE_LL_DISPATCH_RECV": PHASE_LL_DISPATCH_RECV,
    "PHASE_LL_COMBINE_RECV": PHASE_LL_COMBINE_RECV,
    "PHASE_LL_DISPATCH_SEND": PHASE_LL_DISPATCH_SEND,
    "PHASE_LL_COMBINE_SEND": PHASE_LL_COMBINE_SEND,
    "LL_AWAIT_COUNT": LL_AWAIT_COUNT,
    "LL_AWAIT_ARRIVALS": LL_AWAIT_ARRIVALS,
    "LL_AWAIT_ACK": LL_AWAIT_ACK,
    "LL_DONE_RESET": LL_DONE_RESET,
    "LL_DONE_SEND": LL_DONE_SEND,
    "LL_DONE_RECV": LL_DONE_RECV,
    "LL_PROGRESS_SENT": LL_PROGRESS_SENT,
    "LL_PROGRESS_RECEIVED": LL_PROGRESS_RECEIVED,
}


def device_defines() -> dict[str, str]:
    """``DEVICE_CONSTANTS`` as nvcc defines: ``{"EP_FP8_MAX": "448.0f", ...}`` (floats get an
    ``f`` suffix so that device code computes in float32, as the host reference does)."""
    out = {}
    for name, value in DEVICE_CONSTANTS.items():
        out[f"EP_{name}"] = f"{float(value)!r}f" if isinstance(value, float) else str(int(value))
    return out


def align(n: int, a: int = REGION_ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a`` (the one rounding helper: byte offsets, token
    counts, expert alignment)."""
    return (n + a - 1) // a * a
