// Normal mode across nodes: notify, dispatch (also cached) and combine over NVSHMEM + NVLink.
//
// Ranks are R = N nodes x P ranks per node; rank (m, j) = m * P + j. The proxy of a source rank
// (n, l) in node m is rank (m, l): the rank of node m with the same local index.
//
// Dispatch. A token crosses the network once per destination node: source (n, l) puts it to
// its proxy (m, l) for every node m that holds one of its experts (a local write when m == n),
// into the proxy's receive region [n] at the token's position among the source's tokens for
// node m (node_pos). The slot carries, besides the token, its output row on each rank of node m
// (-1 where it does not go), so the ranks of node m then pull their tokens from the proxies'
// regions over NVLink (nvshmem_ptr) straight into their outputs, in the contract's order (by
// source rank, then token index: the rows were fixed by the notify step's prefix matrix).
// Pipelined: arrivals are counted per chunk of a source node's slots, half of the blocks send
// while the others forward each chunk as soon as it has landed (the senders join them after).
//
// Combine, the reverse. Each rank first stages its expert outputs (and weights) in its symmetric
// buffer (the host copies them there, ep_comm/internode.py). The proxy (m, l) sums, for every
// slot it received from source node n, the rows of the ranks of node m that got the token (over
// NVLink) and sends that one partial row back to the source (n, l) with a put; the source adds
// the partial rows of the token's nodes (and the bias) into its output. So the network carries
// one row per token and node each way, the minimum. Pipelined like dispatch: half of the blocks
// work as proxies (slot positions in order across source nodes), the others sum runs of tokens
// whose partial rows have landed (arrivals counted per chunk of positions).
//
// Synchronisation. Every kernel starts with a barrier of all ranks (flags set with NVSHMEM
// signals, each carrying the kernel's tag: a sequence number kept on the device, the same on
// every rank because every rank runs the same sequence of calls). Once rank x has passed the
// barrier of kernel k, every rank has finished kernel k - 1, so regions are reused without
// per-slot handshakes. Arrivals are counted with NVSHMEM signal adds into counters kept in two
// sets by tag parity: kernel k uses set k & 1 and, after its barrier, clears set (k + 1) & 1
// for kernel k + 1 (nobody reads it any more, nobody writes it before kernel k + 1's barrier).
//
// Bounded waits: every spin gives up after timeout_ns and reports through the host status word
// (intranode_common.cuh: the same layout and decoding as the NVLink kernels).
//
// Call agreement (docs/faults.md). Every kernel gets its call's tag (call_tag: sequence number
// and a hash of the signature, ep_comm.core.agreement.ll_tag) and carries it in the upper 32
// bits of the flags it already sets: the barrier flag (dispatch, combine) and the notify flag.
// The notify kernel also writes the call's whole signature (CallSig) at the head of its counts
// row. Before a kernel moves anything, each rank learns what every rank runs as this kernel
// (learn_peers): a notify, or a dispatch / combine kernel, and its call tag. Ranks that all run
// the notify compare every rank's signature words (they name the field); otherwise ranks that
// run different kernels, or barrier kernels of different call tags, disagree. A disagreement
// is seen by every rank alike (every rank sees every rank's flags), so every rank refuses the
// kernel: nothing moves, every rank acknowledges on its notify flag (2 * tag + 1) and waits for
// every acknowledgement (meet_refused: nobody's next kernel can then overwrite a flag or row
// that a slower rank is still to read), and the kernels' sequence numbers stay in step.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "intranode_common.cuh"

using namespace ep_nvl;

namespace {

// Phases and codes of the host status word beyond the NVLink kernels'.
constexpr int kPhaseBarrier = EP_PHASE_BARRIER;
constexpr int kStatusNoP2P = EP_STATUS_NO_P2P;  // a rank of this node has no nvshmem_ptr mapping

// ctrl words (uint32, this rank's buffer): [0] sequence, [1] finish count, [2] status claim,
// [3] tag of the last barrier passed (blocks other than 0 wait for it), [4] barrier failed,
// [5] tag of the last kernel refused at its barrier (its other blocks end without moving).
constexpr int kCtrlGo = 3;
constexpr int kCtrlAbort = 4;
constexpr int kCtrlRefused = 5;

// The call agreement (see the header). A refusal's status: kStatusDisagree (every rank ran the
// notify: the signature rows decide, as in the NVLink notify; intranode_common.cuh) or
// kStatusDisagreeTag (a rank runs another kernel, or another call's barrier kernel: the call
// tags decide).
constexpr int kStatusDisagreeTag = EP_STATUS_DISAGREE_TAG;
constexpr int kMaxInterRanks = EP_INTER_MAX_RANKS;
constexpr int kInterMaxExperts = EP_INTER_MAX_EXPERTS;  // per-expert counts a counts row holds
// What a rank runs as a kernel, as learn_peers records it: its call tag (a positive int32), with
// this bit when it runs a dispatch or combine kernel (a barrier), without when a notify. The
// same bit marks the acknowledgement of a refusal sent by a barrier kernel.
constexpr uint32_t kKindBarrier = 0x80000000u;
constexpr int kTagSeqShift = EP_LL_TAG_SEQ_SHIFT;
constexpr uint32_t kTagHashMask = (1u << kTagSeqShift) - 1u;

__device__ __forceinline__ uint64_t flag_word(uint32_t high, uint32_t low) {
    return (static_cast<uint64_t>(high) << 32) | low;
}
__device__ __forceinline__ uint32_t flag_high(uint64_t w) { return static_cast<uint32_t>(w >> 32); }

// Whether two call tags agree: equal hashes, and equal sequence numbers unless either is 0 (a
// launch captured in a CUDA graph: replays repeat it). As the low-latency kernels compare them
// (low_latency_common.cuh tags_agree).
__device__ __forceinline__ bool call_tags_agree(uint32_t a, uint32_t b) {
    if ((a & kTagHashMask) != (b & kTagHashMask)) return false;
    const uint32_t sa = a >> kTagSeqShift, sb = b >> kTagSeqShift;
    return sa == 0 || sb == 0 || sa == sb;
}

// Offsets of the regions of this Buffer's symmetric allocation (ep_comm.regions.
// InternodeRegions), the same on every rank.
// chunks / chunk_slots: dispatch arrivals are counted per chunk of chunk_slots consecutive
// slots of a source node (ep_comm.config.INTER_DISPATCH_CHUNKS counters per node and parity).
struct Regions {
    char* base;
    long long off_ctrl, off_bar, off_nflag, off_counts, off_darr, off_carr, off_dwork, off_drecv,
        off_dstage, off_csrc;
    long long slot_bytes, row_c;
    int cap, chunks, chunk_slots;
};

#define EP_INTER_REGION_PARAMS                                                                 \
    char *base, long long off_ctrl, long long off_bar, long long off_nflag, long long off_counts, \
        long long off_darr, long long off_carr, long long off_dwork, long long off_drecv,        \
        long long off_dstage, long long off_csrc, long long slot_bytes, long long row_c, int cap, \
        int chunks, int chunk_slots
#define EP_INTER_REGIONS                                                                       \
    Regions {                                                                                  \
        base, off_ctrl, off_bar, off_nflag, off_counts, off_darr, off_carr, off_dwork,         \
            off_drecv, off_dstage, off_csrc, slot_bytes, row_c, cap, chunks, chunk_slots       \
    }

__device__ __forceinline__ uint32_t* ctrl_of(const Regions& g) {
    return reinterpret_cast<uint32_t*>(g.base + g.off_ctrl);
}
__device__ __forceinline__ uint64_t* words(const Regions& g, long long off) {
    return reinterpret_cast<uint64_t*>(g.base + off);
}
// Arrival counter of chunk c of node n's slots, tag parity `parity`, in the counter region at
// `off` (off_darr: dispatch, slots from source node n; off_carr: combine, partial rows from
// node n), at the same offset on every rank.
__device__ __forceinline__ long long chunk_counter(long long off, const Regions& g, int parity,
                                                   int N, int n, int c) {
    return off + ((static_cast<long long>(parity) * N + n) * g.chunks + c) * 8;
}
__device__ __forceinline__ long long darr_offset(const Regions& g, int parity, int N, int n, int c) {
    return chunk_counter(g.off_darr, g, parity, N, n, c);
}

// Clears the counters of the other tag parity for the next kernel: nobody reads them any more
// (this kernel's barrier has passed) and nobody writes them before the next kernel's barrier.
__device__ void clear_next_parity(const Regions& g, uint32_t tag, int N) {
    const int nxt = (tag + 1) & 1;
    for (int i = threadIdx.x; i < N * g.chunks; i += blockDim.x) {
        words(g, g.off_darr)[static_cast<long long>(nxt) * N * g.chunks + i] = 0;
        words(g, g.off_carr)[static_cast<long long>(nxt) * N * g.chunks + i] = 0;
    }
    if (threadIdx.x == 0) words(g, g.off_dwork)[nxt] = 0;
}

// Slot i of region n (a source node for dispatch, a destination node for combine).
__device__ __forceinline__ char* slot_of(const Regions& g, long long off, int n, long long i) {
    return g.base + off + (static_cast<long long>(n) * g.cap + i) * g.slot_bytes;
}

// Tags grow by one per kernel; a peer may already be one kernel ahead.
__device__ __forceinline__ bool tag_reached(uint64_t seen, uint32_t tag) {
    return static_cast<int32_t>(static_cast<uint32_t>(seen) - tag) >= 0;
}

// Spin (one thread) until *p reaches `want` (by tag_reached when `is_tag`, else >=).
__device__ bool wait_word(const uint64_t* p, uint64_t want, bool is_tag, uint64_t timeout_ns,
                          uint64_t* seen) {
    const uint64_t deadline = globaltimer_ns() + timeout_ns;
    int spins = 0;
    while (true) {
        const uint64_t v = ld_acquire_sys(p);
        if (is_tag ? tag_reached(v, static_cast<uint32_t>(want)) : v >= want) {
            *seen = v;
            return true;
        }
        if ((++spins & 63) == 0 && globaltimer_ns() > deadline) {
            *seen = v;
            return false;
        }
    }
}

__shared__ int s_fail;
__shared__ int s_other;                      // the first rank that runs something else, else R
__shared__ uint32_t s_peer[kMaxInterRanks];  // what each rank runs as this kernel (learn_peers)

// The block waits (a thread per rank) until every rank's flag carries `tag`; a flag that does
// not come in time is reported and sets s_fail.
__device__ void wait_all_flags(const uint64_t* flags, uint32_t tag, int R, int phase,
                               int* host_status, uint32_t* ctrl, uint64_t timeout_ns) {
    for (int q = threadIdx.x; q < R; q += blockDim.x) {
        uint64_t seen;
        if (!wait_word(flags + q, tag, true, timeout_ns, &seen)) {
            report(host_status, ctrl, kStatusTimeout, phase, q, -1,
                   static_cast<long long>(static_cast<uint32_t>(seen)), tag);
            s_fail = 1;
        }
    }
}

// The block, a thread per rank q: waits until it knows what q runs as kernel `tag` and records
// it in s_peer[q] (kKindBarrier | call tag, or the call tag of a notify):
//   q's notify flag at 2 * tag: q runs the notify (its counts row has landed before the flag);
//     at 2 * tag + 1: q refused this kernel (kKindBarrier set if q runs a barrier kernel);
//   q's barrier flag at tag: q runs a dispatch or combine kernel;
//   either flag past this kernel: q has passed it, which no rank does unless every rank agreed
//     (a refusal holds every rank in meet_refused), so q agrees: `self_word`.
// The notify flag is looked at first: a rank that ran the notify of this kernel and went on
// to the dispatch kernel shows both. A rank that shows nothing in time is reported (timeout,
// `phase`) and sets s_fail.
__device__ void learn_peers(const Regions& g, uint32_t tag, uint32_t self_word, int R, int phase,
                            int* host_status, uint32_t* ctrl, uint64_t timeout_ns) {
    const uint64_t* bar = words(g, g.off_bar);
    const uint64_t* nfl = words(g, g.off_nflag);
    for (int q = threadIdx.x; q < R; q += blockDim.x) {
        const uint64_t deadline = globaltimer_ns() + timeout_ns;
        int spins = 0;
        while (true) {
            const uint64_t n = ld_acquire_sys(nfl + q);
            const int dn = static_cast<int32_t>(static_cast<uint32_t>(n) - 2u * tag);
            if (dn == 0 || dn == 1) {
                s_peer[q] = flag_high(n);
                break;
            }
            const uint64_t b = ld_acquire_sys(bar + q);
            const int db = static_cast<int32_t>(static_cast<uint32_t>(b) - tag);
            if (db == 0) {
                s_peer[q] = flag_high(b) | kKindBarrier;
                break;
            }
            if (dn > 1 || db > 0) {
                s_peer[q] = self_word;
                break;
            }
            if ((++spins & 63) == 0 && globaltimer_ns() > deadline) {
                const bool notify = phase == kPhaseNotify;
                report(host_status, ctrl, kStatusTimeout, phase, q, -1,
                       static_cast<long long>(static_cast<uint32_t>(notify ? n : b)),
                       notify ? 2ll * tag : static_cast<long long>(tag));
                s_fail = 1;
                break;
            }
        }
    }
}

// The block: s_other = the first rank whose s_peer word differs from `self_word` (another kind
// of kernel, or call tags that do not agree), else R.
// `kind_only`: only another kind of kernel counts (ranks that all run the notify compare their
// whole signatures instead, which name the field).
__device__ void find_other(uint32_t self_word, int R, bool kind_only) {
    if (threadIdx.x == 0) s_other = R;
    __syncthreads();
    for (int q = threadIdx.x; q < R; q += blockDim.x) {
        const uint32_t w = s_peer[q];
        if ((w & kKindBarrier) != (self_word & kKindBarrier) ||
            (!kind_only && !call_tags_agree(w & ~kKindBarrier, self_word & ~kKindBarrier)))
            atomicMin(&s_other, q);
    }
    __syncthreads();
}

// The block, after it refused kernel `tag`: acknowledges to every rank on the notify flag
// (2 * tag + 1, `ack_high` = this call's tag, with kKindBarrier from a barrier kernel), then
// waits (bounded) for every rank's acknowledgement, so that no rank's next kernel overwrites a
// flag or counts row that another rank is still to read. The quiet first: the notify's row put
// (with its flag at 2 * tag) must land before the acknowledgement replaces that flag.
// A rank that does not acknowledge in time is reported (timeout) and sets s_fail.
__device__ void meet_refused(const Regions& g, uint32_t tag, uint32_t ack_high, int rank, int R,
                             int phase, int* host_status, uint32_t* ctrl, uint64_t timeout_ns) {
    uint64_t* nfl = words(g, g.off_nflag);
    const uint64_t ack = flag_word(ack_high, 2u * tag + 1u);
    nvshmem_quiet();
    __syncthreads();
    for (int q = threadIdx.x; q < R; q += blockDim.x) {
        if (q == rank)
            st_release_sys(nfl + rank, ack);
        else
            nvshmemx_signal_op(nfl + rank, ack, NVSHMEM_SIGNAL_SET, q);
    }
    wait_all_flags(nfl, 2u * tag + 1u, R, phase, host_status, ctrl, timeout_ns);
    __syncthreads();
}

// Thread 0: a refusal by call tags (kStatusDisagreeTag) naming rank `other`. Not claimed
// through ctrl[2] like report(): every rank refuses alike and the kernels stay in step, so the
// host clears the word and the Buffer stays usable.
__device__ void report_tag_refusal(int* host_status, int phase, int other, uint32_t mine) {
    volatile int* st = host_status;
    const uint32_t theirs = s_peer[other];
    st[1] = phase;
    st[2] = other;
    st[3] = (theirs & kKindBarrier) ? 1 : 0;
    st[4] = static_cast<int>(theirs & ~kKindBarrier);
    st[5] = static_cast<int>(mine);
    __threadfence_system();
    st[0] = kStatusDisagreeTag;
    __threadfence_system();
}

// All ranks meet (block 0 does it, the other blocks wait for its word), then block 0 clears
// the other parity's counters. The barrier flag carries the call tag: a rank that runs another
// call here (or the notify kernel) makes every rank refuse the kernel (see the header).
// Returns false on a timeout (reported) or a refusal, for every block.
__device__ bool start_kernel(const Regions& g, uint32_t tag, int call_tag, int rank, int R, int N,
                             int* host_status, uint64_t timeout_ns) {
    uint32_t* ctrl = ctrl_of(g);
    const uint32_t self_word = static_cast<uint32_t>(call_tag) | kKindBarrier;
    if (threadIdx.x == 0) s_fail = 0;
    __syncthreads();
    if (blockIdx.x == 0) {
        uint64_t* flags = words(g, g.off_bar);
        const uint64_t mine = flag_word(static_cast<uint32_t>(call_tag), tag);
        for (int q = threadIdx.x; q < R; q += blockDim.x) {
            if (q == rank)
                st_release_sys(flags + rank, mine);
            else
                nvshmemx_signal_op(flags + rank, mine, NVSHMEM_SIGNAL_SET, q);
        }
        learn_peers(g, tag, self_word, R, kPhaseBarrier, host_status, ctrl, timeout_ns);
        __syncthreads();
        bool refused = false;
        if (!s_fail) {
            find_other(self_word, R, false);
            refused = s_other < R;
            clear_next_parity(g, tag, N);
            if (refused) {
                const int other = s_other;
                meet_refused(g, tag, self_word, rank, R, kPhaseBarrier, host_status, ctrl,
                             timeout_ns);
                if (threadIdx.x == 0 && !s_fail)
                    report_tag_refusal(host_status, kPhaseBarrier, other, call_tag);
            }
        }
        __syncthreads();
        const bool failed = s_fail != 0;
        __syncthreads();  // every thread has read s_fail before thread 0 sets it for a refusal
        if (threadIdx.x == 0) {
            if (failed) st_release_sys(ctrl + kCtrlAbort, 1u);
            else if (refused) st_release_sys(ctrl + kCtrlRefused, tag);
            __threadfence();
            st_release_sys(ctrl + kCtrlGo, tag);
            if (refused) s_fail = 1;
        }
    } else if (threadIdx.x == 0) {
        const uint64_t deadline = globaltimer_ns() + 2 * timeout_ns;
        int spins = 0;
        while (static_cast<int32_t>(ld_acquire_sys(ctrl + kCtrlGo) - tag) < 0) {
            if ((++spins & 63) == 0 && globaltimer_ns() > deadline) {
                s_fail = 1;
                break;
            }
        }
        if (ld_acquire_sys(ctrl + kCtrlAbort) != 0u || ld_acquire_sys(ctrl + kCtrlRefused) == tag)
            s_fail = 1;
    }
    __syncthreads();
    return s_fail == 0;
}

// The start of the dispatch and combine kernels (which take EP_INTER_REGION_PARAMS, rank, R,
// P, N, num_recv_dev, host_status, timeout_ns and call_tag). A kernel of a dispatch whose notify
// refused the call (num_recv_dev = -1, on every rank alike) returns at once without taking a
// kernel tag: the ranks stay in step whether or not the host launched it (it does not wait for
// the notify with num_worst_tokens), and a rank whose notify met another call (a skipped call)
// does not run its dispatch barrier against the others' next call. Then this call's tag and its
// parity, this rank's node and index in it, the thread's warp and lane, and start_kernel's
// barrier; a block that cannot start (a peer missing, a previous call aborted, a call refused
// at the barrier) finishes at once.
#define EP_INTER_KERNEL_START()                                                  \
    if (*reinterpret_cast<const volatile int*>(num_recv_dev) < 0) return;        \
    const Regions g = EP_INTER_REGIONS;                                          \
    uint32_t* ctrl = ctrl_of(g);                                                 \
    const uint32_t tag = *reinterpret_cast<volatile uint32_t*>(ctrl) + 1u;       \
    const int parity = tag & 1, node = rank / P, local = rank % P;              \
    const int warp = threadIdx.x >> 5, lane = lane_id();                         \
    if (!start_kernel(g, tag, call_tag, rank, R, N, host_status, timeout_ns)) {  \
        finish_block(ctrl);                                                      \
        return;                                                                  \
    }

// Output row of token t on rank d: rank d's rows from this rank start after those of ranks
// before it (prefix[rank - 1, d]); local_pos is the token's position among this rank's tokens
// for d (-1: not sent).
__device__ __forceinline__ int out_row(const int* prefix, const int* local_pos, int rank, int R,
                                       int t, int d) {
    const int p = __ldg(local_pos + static_cast<long long>(t) * R + d);
    if (p < 0) return -1;
    return (rank == 0 ? 0 : __ldg(prefix + (rank - 1) * R + d)) + p;
}

}  // namespace

// ------------------------------------------------------------------------------------ notify
namespace {

static_assert(kCallSigWords == kCallSigCompared + 4,
              "the signature ends in status, bad_token, bad_col, bad_value "
              "(constants.CALL_SIG_FIELDS)");

__shared__ unsigned long long s_first_diff;  // min of (word << 32 | rank) over differing words
__shared__ int s_first_bad;                  // the first rank whose input failed a check, else R

// Thread 0: the refusal of a call whose ranks all ran the notify (kStatusDisagree), as the
// NVLink notify reports it: [2] the first rank that differs, [3] the first differing word (-1:
// only a bad input), [4] its value there, [5] this rank's; the rows are already in the host
// status from kInfoCallSigs (the values are read from there: once every rank acknowledged, a
// peer's next notify may replace its row here).
__device__ void report_row_refusal(int* host_status, const CallSig& sig, int R) {
    volatile int* st = host_status;
    int peer, word;
    if (s_first_diff != ~0ull) {
        word = static_cast<int>(s_first_diff >> 32);
        peer = static_cast<int>(s_first_diff & 0xffffffffull);
    } else {
        word = -1;
        peer = s_first_bad;
    }
    st[1] = kPhaseNotify;
    st[2] = peer;
    st[3] = word;
    st[4] = word >= 0 ? st[kInfoCallSigs + peer * kCallSigWords + word] : 0;
    st[5] = word >= 0 ? sig.w[word] : 0;
    __threadfence_system();
    st[0] = kStatusDisagree;
    __threadfence_system();
}

}  // namespace

// One block. Puts this rank's counts row (the call's signature [kCallSigWords], then tokens per
// rank [R], per node [N], per expert [E], int32) into every rank's counts region at row `rank`,
// with its notify flag (2 * tag, and the call tag) on the put, learns what every rank runs as
// this kernel (learn_peers), then refuses the call or computes:
//   rank_prefix_matrix [R, R] int32: [i, j] = tokens ranks 0..i send to rank j;
//   recv_per_expert [L] int32: tokens this rank receives per local expert;
//   node_counts [P, N] int32: [l, n] = tokens rank (n, l) sends to this rank's node (what this
//     node's proxy l receives from source node n);
//   num_recv_dev [1] and host_status[kInfoNumRecv] (+ per-expert counts from kInfoExpertCounts).
// sig: this call's signature (CallSig, ep_comm.core.agreement.device_words); call_tag: its tag
// (agreement.ll_tag). The call is refused on every rank alike (see the file header) when a rank
// runs a dispatch or combine kernel here (kStatusDisagreeTag), or, every rank running the
// notify, when a rank's first kCallSigCompared words differ from this rank's or its status word
// says its input failed a check (kStatusDisagree, every rank's words copied to the host status
// from kInfoCallSigs, decoded by the host into the reference backend's error). A refused notify
// computes nothing and sets num_recv_dev = -1, so the dispatch kernel behind it moves nothing.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
inter_notify(EP_INTER_REGION_PARAMS, int rank, int R, int P, int N, int E, int num_worst_tokens,
             const int* __restrict__ tokens_per_rank, const int* __restrict__ tokens_per_node,
             const int* __restrict__ tokens_per_expert, int* __restrict__ rank_prefix_matrix,
             int* __restrict__ recv_per_expert, int* __restrict__ node_counts,
             int* __restrict__ num_recv_dev, int* __restrict__ host_status,
             unsigned long long timeout_ns, CallSig sig, int call_tag) {
    const Regions g = EP_INTER_REGIONS;
    uint32_t* ctrl = ctrl_of(g);
    const uint32_t tag = *reinterpret_cast<volatile uint32_t*>(ctrl) + 1u;
    const uint32_t self_word = static_cast<uint32_t>(call_tag);  // a notify: no kKindBarrier
    // Row layout: signature, per rank, per node, per expert. The stride does not depend on
    // this call's E (ep_comm.core.regions.InternodeRegions.row_ints): ranks that disagree on
    // num_experts must still find each other's signature.
    const int at_ranks = kCallSigWords, at_nodes = at_ranks + R, at_experts = at_nodes + N;
    const int used_ints = at_experts + E, row_ints = at_experts + kInterMaxExperts;
    const int L = E / R, node = rank / P;
    int* counts = reinterpret_cast<int*>(g.base + g.off_counts);
    int* mine = counts + static_cast<long long>(rank) * row_ints;
    for (int i = threadIdx.x; i < kCallSigWords; i += blockDim.x) mine[i] = sig.w[i];
    for (int i = threadIdx.x; i < R; i += blockDim.x) mine[at_ranks + i] = tokens_per_rank[i];
    for (int i = threadIdx.x; i < N; i += blockDim.x) mine[at_nodes + i] = tokens_per_node[i];
    for (int i = threadIdx.x; i < E; i += blockDim.x) mine[at_experts + i] = tokens_per_expert[i];
    if (threadIdx.x == 0) {
        s_fail = 0;
        s_first_diff = ~0ull;
        s_first_bad = R;
    }
    __threadfence_system();
    __syncthreads();
    uint64_t* flags = words(g, g.off_nflag);
    const uint64_t posted = flag_word(self_word, 2u * tag);
    for (int q = threadIdx.x; q < R; q += blockDim.x) {
        if (q == rank)
            st_release_sys(flags + rank, posted);
        else
            nvshmem_putmem_signal_nbi(mine, mine, static_cast<size_t>(used_ints) * 4,
                                      flags + rank, posted, NVSHMEM_SIGNAL_SET, q);
    }
    learn_peers(g, tag, self_word, R, kPhaseNotify, host_status, ctrl, timeout_ns);
    __syncthreads();
    if (s_fail) {
        __threadfence_system();
        finish_block(ctrl);
        return;
    }
    clear_next_parity(g, tag, N);
    // Agreement: a rank in a barrier kernel here; else each rank's row against this call's.
    find_other(self_word, R, true);
    const int other = s_other;
    if (other == R) {
        for (int q = threadIdx.x; q < R; q += blockDim.x) {
            const int* theirs = counts + static_cast<long long>(q) * row_ints;
            for (int w = 0; w < kCallSigCompared; ++w) {
                if (__ldcg(theirs + w) != sig.w[w]) {
                    atomicMin(&s_first_diff, (static_cast<unsigned long long>(w) << 32) | q);
                    break;
                }
            }
            if (__ldcg(theirs + kCallSigCompared) != 0) atomicMin(&s_first_bad, q);
        }
        __syncthreads();
    }
    const bool by_rows = other == R && (s_first_diff != ~0ull || s_first_bad < R);
    if (other < R || by_rows) {
        // Every rank's words to the host first (the error names each value and its ranks).
        if (by_rows)
            for (int i = threadIdx.x; i < R * kCallSigWords; i += blockDim.x)
                reinterpret_cast<volatile int*>(host_status)[kInfoCallSigs + i] =
                    __ldcg(counts + static_cast<long long>(i / kCallSigWords) * row_ints +
                           i % kCallSigWords);
        if (threadIdx.x == 0) *num_recv_dev = -1;
        __threadfence_system();
        meet_refused(g, tag, self_word, rank, R, kPhaseNotify, host_status, ctrl, timeout_ns);
        // A rank that never acknowledged is a timeout (reported, the Buffer fails); else the
        // refusal, which leaves the Buffer usable.
        if (threadIdx.x == 0 && !s_fail) {
            if (by_rows)
                report_row_refusal(host_status, sig, R);
            else
                report_tag_refusal(host_status, kPhaseNotify, other, self_word);
        }
        finish_block(ctrl);
        return;
    }
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
        int sum = 0;
        for (int q = 0; q < R; ++q) {
            sum += __ldcg(counts + static_cast<long long>(q) * row_ints + at_ranks + j);
            rank_prefix_matrix[q * R + j] = sum;
        }
        if (j == rank) {
            *num_recv_dev = sum;
            host_status[kInfoNumRecv] = sum;
            if (num_worst_tokens > 0 && sum > num_worst_tokens)
                report(host_status, ctrl, kStatusOverflow, kPhaseNotify, rank, -1, sum,
                       num_worst_tokens);
        }
    }
    for (int e = threadIdx.x; e < L; e += blockDim.x) {
        int sum = 0;
        for (int q = 0; q < R; ++q)
            sum += __ldcg(counts + static_cast<long long>(q) * row_ints + at_experts +
                          rank * L + e);
        recv_per_expert[e] = sum;
        if (e < kMaxLocalExperts) host_status[kInfoExpertCounts + e] = sum;
    }
    for (int i = threadIdx.x; i < P * N; i += blockDim.x) {
        const int l = i / N, n = i % N;
        node_counts[i] =
            __ldcg(counts + static_cast<long long>(n * P + l) * row_ints + at_nodes + node);
    }
    // Every row put of this kernel delivered before it ends: a peer may take this rank's next
    // kernel's barrier flag as proof that this row has landed (learn_peers' "past" rule), and
    // over a NIC that flag and this row's put may travel apart (as meet_refused's quiet).
    nvshmem_quiet();
    __threadfence_system();
    finish_block(ctrl);
}

// ---------------------------------------------------------------------------------- dispatch
// Grid of any size (all blocks resident), kThreads each, kStageBytes of dynamic shared memory.
//   x: [T, row_int4] int4 (bf16 or fp8 rows), x_scales: [T, num_scales] float32 or null,
//   topk_idx: [T, K] int64 or null, topk_weights: [T, K] float32 or null;
//   local_pos: [T, R] int32, node_pos: [T, N] int32 (positions, -1 = not sent; see
//   ep_comm/internode.py); rank_prefix_matrix [R, R] and node_counts [P, N] from notify;
//   send_pos: [T, R] int32 written when not null (the handle's rows on each rank);
//   outputs recv_x [num_rows, row_int4], recv_scales [num_rows, num_scales] (when has_scales),
//   recv_topk_idx [num_rows, K] int64 (local ids, when has_idx), recv_topk_weights [num_rows,
//   K] (when has_w), recv_src_idx / recv_src_rank [num_rows] int32;
//   proxy_rows: [N, cap, P] int32, written when not null: the rows of every slot this rank
//   received as a proxy (combine needs them; the slots themselves are reused);
//   net_bytes: when not null, bytes put to other nodes are added to it (benchmark counters);
//   num_recv_dev: rows received (-1: the notify refused the call); call_tag: see the header.
// Slot layout (bytes from the slot start): int4 header {token, 0, 0, 0}, then P int32 rows,
// payload at off_payload, scales at off_scales, top-k ids (int32, global) at off_idx, weights
// at off_w; put_bytes bytes from the start are sent.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
inter_dispatch(EP_INTER_REGION_PARAMS, int rank, int R, int P, int N, int T, int L,
               const int4* __restrict__ x, int row_int4, const float* __restrict__ x_scales,
               int num_scales, const int64_t* __restrict__ topk_idx,
               const float* __restrict__ topk_weights, int K, int has_scales, int has_idx, int has_w,
               const int* __restrict__ local_pos, const int* __restrict__ node_pos,
               const int* __restrict__ rank_prefix_matrix, const int* __restrict__ node_counts,
               int* __restrict__ send_pos, int off_payload, int off_scales, int off_idx,
               int off_w, int put_bytes, int4* __restrict__ recv_x,
               float* __restrict__ recv_scales, int64_t* __restrict__ recv_topk_idx,
               float* __restrict__ recv_topk_weights, int* __restrict__ recv_src_idx,
               int* __restrict__ recv_src_rank, int* __restrict__ proxy_rows, int num_rows,
               const int* __restrict__ num_recv_dev, int zero_padding,
               unsigned long long* __restrict__ net_bytes, int* __restrict__ host_status,
               unsigned long long timeout_ns, int call_tag) {
    EP_INTER_KERNEL_START();
    if (zero_padding) {  // num_worst_tokens: rows past the received count are zero / -1
        const long long n_recv = *num_recv_dev;
        const long long stride = static_cast<long long>(gridDim.x) * kThreads;
        const long long first = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
        for (long long i = n_recv * row_int4 + first; i < static_cast<long long>(num_rows) * row_int4;
             i += stride)
            recv_x[i] = make_int4(0, 0, 0, 0);
        if (has_scales)
            for (long long i = n_recv * num_scales + first;
                 i < static_cast<long long>(num_rows) * num_scales; i += stride)
                recv_scales[i] = 0.0f;
        for (long long i = n_recv + first; i < num_rows; i += stride) {
            recv_src_idx[i] = -1;
            recv_src_rank[i] = -1;
        }
        for (long long i = n_recv * K + first; i < static_cast<long long>(num_rows) * K;
             i += stride) {
            if (has_idx) recv_topk_idx[i] = -1;
            if (has_w) recv_topk_weights[i] = 0.0f;
        }
    }

    // ---- send (the first half of the blocks; all of one block): one warp per token, one slot
    // per destination node of the token. The other blocks start forwarding at once.
    const int send_blocks = gridDim.x > 1 ? (gridDim.x + 1) / 2 : 1;
    const int send_warps = send_blocks * kWarps;
    for (int t = blockIdx.x * kWarps + warp; blockIdx.x < send_blocks && t < T; t += send_warps) {
        if (send_pos != nullptr)
            for (int d = lane; d < R; d += 32)
                send_pos[static_cast<long long>(t) * R + d] =
                    out_row(rank_prefix_matrix, local_pos, rank, R, t, d);
        for (int m = 0; m < N; ++m) {
            const int pos = __ldg(node_pos + static_cast<long long>(t) * N + m);
            if (pos < 0) continue;
            const bool own = m == node;
            // Own node: straight into this rank's receive region (this rank is the proxy).
            char* slot = own ? slot_of(g, g.off_drecv, node, pos) : slot_of(g, g.off_dstage, m, pos);
            if (lane == 0) *reinterpret_cast<int4*>(slot) = make_int4(t, 0, 0, 0);
            for (int j = lane; j < P; j += 32)
                reinterpret_cast<int*>(slot + 16)[j] =
                    out_row(rank_prefix_matrix, local_pos, rank, R, t, m * P + j);
            warp_copy(reinterpret_cast<int4*>(slot + off_payload),
                      x + static_cast<long long>(t) * row_int4, row_int4, lane);
            if (has_scales)
                for (int i = lane; i < num_scales; i += 32)
                    reinterpret_cast<float*>(slot + off_scales)[i] =
                        __ldg(x_scales + static_cast<long long>(t) * num_scales + i);
            if (has_idx && lane < K)
                reinterpret_cast<int*>(slot + off_idx)[lane] =
                    static_cast<int>(__ldg(topk_idx + static_cast<long long>(t) * K + lane));
            if (has_w && lane < K)
                reinterpret_cast<float*>(slot + off_w)[lane] =
                    __ldg(topk_weights + static_cast<long long>(t) * K + lane);
            uint64_t* arrive = reinterpret_cast<uint64_t*>(
                g.base + darr_offset(g, parity, N, node, pos / g.chunk_slots));
            if (own) {
                __threadfence_system();  // every lane's slot stores before the count moves
                __syncwarp();
                if (lane == 0) red_add_release_sys(arrive, 1);
            } else {
                __threadfence_system();  // the NIC (or a peer's copy) reads the staged slot
                __syncwarp();
                nvshmemx_putmem_signal_nbi_warp(slot_of(g, g.off_drecv, node, pos), slot,
                                                static_cast<size_t>(put_bytes), arrive, 1,
                                                NVSHMEM_SIGNAL_ADD, m * P + local);
                if (net_bytes != nullptr && lane == 0) atomicAdd(net_bytes, put_bytes);
            }
        }
    }

    // ---- forward: work item (c, l, n) = chunk c of the slots proxy (node, l) received from
    // source node n. Blocks claim items in chunk order from a counter, so a chunk is forwarded
    // as soon as it has landed while later ones are still on the way; the sending blocks join
    // when their tokens are out. A failure ends every block's claims (kStopItems).
    constexpr unsigned kStopItems = 1u << 30;
    __shared__ char* s_src;
    __shared__ unsigned s_item;
    __shared__ int s_max_count;
    if (threadIdx.x == 0) s_max_count = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < P * N; i += kThreads) atomicMax(&s_max_count, __ldg(node_counts + i));
    __syncthreads();
    const unsigned num_items = static_cast<unsigned>(
        (s_max_count + g.chunk_slots - 1) / g.chunk_slots * P * N);
    unsigned* work = reinterpret_cast<unsigned*>(words(g, g.off_dwork) + parity);
    while (true) {
        if (threadIdx.x == 0) {
            s_item = atomicAdd(work, 1u);
            s_src = nullptr;
            if (s_item < num_items) {
                const int c = s_item / (P * N), l = (s_item / N) % P, n = s_item % N;
                const int proxy = node * P + l, src_rank = n * P + l;
                const int lo = c * g.chunk_slots;
                const int hi = min(__ldg(node_counts + l * N + n), lo + g.chunk_slots);
                char* base = lo < hi ? static_cast<char*>(nvshmem_ptr(g.base, proxy)) : nullptr;
                if (lo < hi && base == nullptr) {
                    report(host_status, ctrl, kStatusNoP2P, kPhaseDispatchRecv, proxy, -1, 0, 0);
                    atomicMax(work, kStopItems);
                } else if (lo < hi) {
                    const uint64_t* arrive =
                        reinterpret_cast<const uint64_t*>(base + darr_offset(g, parity, N, n, c));
                    uint64_t seen;
                    if (wait_word(arrive, static_cast<uint64_t>(hi - lo), false, timeout_ns, &seen)) {
                        s_src = base;
                    } else {
                        report(host_status, ctrl, kStatusTimeout, kPhaseDispatchRecv, src_rank, -1,
                               static_cast<long long>(seen + lo), hi);
                        atomicMax(work, kStopItems);
                    }
                }
            }
        }
        __syncthreads();
        const unsigned item = s_item;
        char* base = s_src;
        __syncthreads();
        if (item >= num_items) break;
        if (base == nullptr) continue;  // an empty chunk (or a failure: the next claim stops)
        const int c = item / (P * N), l = (item / N) % P, n = item % N, src_rank = n * P + l;
        const int lo = c * g.chunk_slots;
        const int hi = min(__ldg(node_counts + l * N + n), lo + g.chunk_slots);
        for (int i = lo + warp; i < hi; i += kWarps) {
            const char* slot = base + g.off_drecv + (static_cast<long long>(n) * g.cap + i) * g.slot_bytes;
            const int* rows = reinterpret_cast<const int*>(slot + 16);
            if (l == local && proxy_rows != nullptr)
                for (int j = lane; j < P; j += 32)
                    proxy_rows[(static_cast<long long>(n) * g.cap + i) * P + j] = __ldcg(rows + j);
            const int row = __ldcg(rows + local);
            if (row < 0 || row >= num_rows) continue;  // not for this rank / worst-case overflow
            warp_copy(recv_x + static_cast<long long>(row) * row_int4,
                      reinterpret_cast<const int4*>(slot + off_payload), row_int4, lane);
            if (has_scales)
                for (int s = lane; s < num_scales; s += 32)
                    recv_scales[static_cast<long long>(row) * num_scales + s] =
                        __ldcg(reinterpret_cast<const float*>(slot + off_scales) + s);
            if (has_idx && lane < K)
                recv_topk_idx[static_cast<long long>(row) * K + lane] =
                    to_local(__ldcg(reinterpret_cast<const int*>(slot + off_idx) + lane), rank, L);
            if (has_w && lane < K)
                recv_topk_weights[static_cast<long long>(row) * K + lane] =
                    __ldcg(reinterpret_cast<const float*>(slot + off_w) + lane);
            if (lane == 0) {
                recv_src_idx[row] = __ldcg(reinterpret_cast<const int*>(slot));
                recv_src_rank[row] = src_rank;
            }
        }
    }
    __threadfence_system();
    finish_block(ctrl);
}

// ----------------------------------------------------------------------------------- combine
// Grid of any size (all blocks resident), kThreads each. Before it, the host staged this rank's
// combine input in the csrc region: row r at off_csrc + r * row_c holds x[r] (bf16, row_int4
// int4) then, when has_w, its K float32 weights.
//   proxy_rows [N, cap, P] and node_counts [P, N] from the dispatch; node_pos [T, N] int32 and
//   tokens_per_node [N] int32 (this rank's tokens per node) from its own dispatch;
//   bias0 / bias1: [T, row_int4] bf16 or null; out [T, row_int4] bf16; out_w [T, K] or null;
//   num_recv_dev: the dispatch's received count (-1: its notify refused the call: see
//   EP_INTER_KERNEL_START); net_bytes: when not null, bytes put to other nodes are added to it;
//   call_tag: this call's tag (agreement, see the header).
// Partial rows travel in the slots of the dstage region (the source's combine receive region,
// [m][pos] for node m), payload at off_payload and weights at off_w; put_bytes bytes from
// off_payload are sent.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
inter_combine(EP_INTER_REGION_PARAMS, int rank, int R, int P, int N, int T, int row_int4, int K,
              int has_w, const int* __restrict__ proxy_rows, const int* __restrict__ node_counts,
              const int* __restrict__ node_pos, const int* __restrict__ tokens_per_node,
              int off_payload, int off_w, int put_bytes, const int4* __restrict__ bias0,
              const int4* __restrict__ bias1, int4* __restrict__ out, float* __restrict__ out_w,
              const int* __restrict__ num_recv_dev, unsigned long long* __restrict__ net_bytes,
              int* __restrict__ host_status, unsigned long long timeout_ns, int call_tag) {
    EP_INTER_KERNEL_START();
    __shared__ const char* s_csrc[kMaxRanks];
    __shared__ int s_max_count;
    __shared__ unsigned s_item;
    if (threadIdx.x == 0) s_max_count = 0;
    if (threadIdx.x < P) {
        const char* p = static_cast<const char*>(nvshmem_ptr(g.base, node * P + threadIdx.x));
        s_csrc[threadIdx.x] = p == nullptr ? nullptr : p + g.off_csrc;
        if (p == nullptr)
            report(host_status, ctrl, kStatusNoP2P, kPhaseCombineSend, node * P + threadIdx.x, -1,
                   0, 0);
    }
    __syncthreads();
    for (int n = threadIdx.x; n < N; n += kThreads) atomicMax(&s_max_count, __ldg(node_counts + local * N + n));
    __syncthreads();
    bool ok = true;
    for (int j = 0; j < P; ++j) ok = ok && s_csrc[j] != nullptr;

    // ---- proxy (the first half of the blocks; all of one block): sum the node's rows of each
    // received slot, send one partial row back. Slots are taken position-major across the
    // source nodes (slot i of every node before slot i + 1), so every source's first tokens
    // complete first and the other blocks can sum them while later ones are on the way.
    const int send_blocks = gridDim.x > 1 ? (gridDim.x + 1) / 2 : 1;
    const long long total = static_cast<long long>(s_max_count) * N;
    for (long long w = blockIdx.x * kWarps + warp; blockIdx.x < send_blocks && ok && w < total;
         w += send_blocks * kWarps) {
        const int n = static_cast<int>(w % N);
        const long long i = w / N;
        if (i >= __ldg(node_counts + local * N + n)) continue;
        const int* rows = proxy_rows + (static_cast<long long>(n) * g.cap + i) * P;
        const bool to_self = n == node;  // the source is this rank: write its receive slot
        char* slot = to_self ? slot_of(g, g.off_dstage, node, i) : slot_of(g, g.off_drecv, n, i);
        int4* dst = reinterpret_cast<int4*>(slot + off_payload);
        for (int c = lane; c < row_int4; c += 32) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int j = 0; j < P; ++j) {
                const int row = __ldg(rows + j);
                if (row < 0) continue;
                add_bf16x8(acc, __ldcg(reinterpret_cast<const int4*>(
                                    s_csrc[j] + static_cast<long long>(row) * g.row_c) + c));
            }
            dst[c] = pack_bf16x8(acc);
        }
        if (has_w && lane < K) {
            float acc = 0.0f;
            for (int j = 0; j < P; ++j) {
                const int row = __ldg(rows + j);
                if (row < 0) continue;
                acc += __ldcg(reinterpret_cast<const float*>(
                                  s_csrc[j] + static_cast<long long>(row) * g.row_c +
                                  static_cast<long long>(row_int4) * 16) + lane);
            }
            reinterpret_cast<float*>(slot + off_w)[lane] = acc;
        }
        uint64_t* arrive = reinterpret_cast<uint64_t*>(
            g.base + chunk_counter(g.off_carr, g, parity, N, node, static_cast<int>(i / g.chunk_slots)));
        if (to_self) {
            __threadfence_system();
            __syncwarp();
            if (lane == 0) red_add_release_sys(arrive, 1);
        } else {
            __threadfence_system();
            __syncwarp();
            nvshmemx_putmem_signal_nbi_warp(slot_of(g, g.off_dstage, node, i) + off_payload,
                                            slot + off_payload, static_cast<size_t>(put_bytes),
                                            arrive, 1, NVSHMEM_SIGNAL_ADD, n * P + local);
            if (net_bytes != nullptr && lane == 0) atomicAdd(net_bytes, put_bytes);
        }
    }

    // ---- source: items of kCombineTokens consecutive tokens, claimed in order; an item waits
    // for the chunks that hold its tokens' partial rows from each of their nodes, then adds
    // them (and the bias) per token. A failure ends every block's claims.
    constexpr int kCombineTokens = 32;
    constexpr unsigned kStopItems = 1u << 30;
    const unsigned num_items = static_cast<unsigned>((T + kCombineTokens - 1) / kCombineTokens);
    unsigned* work = reinterpret_cast<unsigned*>(words(g, g.off_dwork) + parity);
    while (ok) {
        if (threadIdx.x == 0) s_item = atomicAdd(work, 1u);
        __syncthreads();
        const unsigned item = s_item;
        if (item >= num_items) break;
        const int t0 = static_cast<int>(item) * kCombineTokens, t1 = min(T, t0 + kCombineTokens);
        for (int m = threadIdx.x; m < N; m += kThreads) {
            int lo = -1, hi = -1;  // this item's slot positions in node m's region (increasing)
            for (int t = t0; t < t1; ++t) {
                const int pos = __ldg(node_pos + static_cast<long long>(t) * N + m);
                if (pos < 0) continue;
                if (lo < 0) lo = pos;
                hi = pos;
            }
            if (lo < 0) continue;
            const int count = __ldg(tokens_per_node + m);
            for (int c = lo / g.chunk_slots; c <= hi / g.chunk_slots; ++c) {
                const uint64_t want = static_cast<uint64_t>(min(g.chunk_slots, count - c * g.chunk_slots));
                uint64_t seen;
                if (!wait_word(reinterpret_cast<const uint64_t*>(
                                   g.base + chunk_counter(g.off_carr, g, parity, N, m, c)),
                               want, false, timeout_ns, &seen)) {
                    report(host_status, ctrl, kStatusTimeout, kPhaseCombineRecv, m * P + local, -1,
                           static_cast<long long>(c) * g.chunk_slots + static_cast<long long>(seen),
                           static_cast<long long>(c) * g.chunk_slots + static_cast<long long>(want));
                    s_fail = 1;
                    atomicMax(work, kStopItems);
                    break;
                }
            }
        }
        __syncthreads();
        if (s_fail) break;
        for (int t = t0 + warp; t < t1; t += kWarps) {
            const long long out_row = static_cast<long long>(t) * row_int4;
            for (int c = lane; c < row_int4; c += 32) {
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int m = 0; m < N; ++m) {
                    const int pos = __ldg(node_pos + static_cast<long long>(t) * N + m);
                    if (pos < 0) continue;
                    add_bf16x8(acc, __ldcg(reinterpret_cast<const int4*>(
                                        slot_of(g, g.off_dstage, m, pos) + off_payload) + c));
                }
                if (bias0 != nullptr) add_bf16x8(acc, __ldg(bias0 + out_row + c));
                if (bias1 != nullptr) add_bf16x8(acc, __ldg(bias1 + out_row + c));
                out[out_row + c] = pack_bf16x8(acc);
            }
            if (out_w != nullptr && lane < K) {
                float acc = 0.0f;
                for (int m = 0; m < N; ++m) {
                    const int pos = __ldg(node_pos + static_cast<long long>(t) * N + m);
                    if (pos < 0) continue;
                    acc += __ldcg(reinterpret_cast<const float*>(slot_of(g, g.off_dstage, m, pos) + off_w) + lane);
                }
                out_w[static_cast<long long>(t) * K + lane] = acc;
            }
        }
        __syncthreads();  // s_item is rewritten by the next claim
    }
    __threadfence_system();
    finish_block(ctrl);
}
