// Helpers of the normal-mode NVLink kernels (layout.cu, intranode.cu): limits that must match
// ep_comm/core/constants.py, memory-model primitives for words that peers write over NVLink,
// bounded waits, and the status word the host decodes (ep_comm/backends/kernels/status.py).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>

#include "common.cuh"

namespace ep_nvl {

using namespace ep_common;

// Sizes of the control-word arrays of ep_comm.core.regions.IntranodeRegions (strides below use
// them): most ranks, channels, local experts.
constexpr int kMaxRanks = EP_NVL_MAX_RANKS;
constexpr int kMaxChannels = EP_NVL_MAX_CHANNELS;
constexpr int kMaxLocalExperts = EP_NVL_MAX_LOCAL_EXPERTS;
// int32 words of a notify counts row: T_s, the call signature (kCallSigWords), per-rank
// counts (kMaxRanks), per-local-expert counts (kMaxLocalExperts).
constexpr int kNotifyRow = EP_NVL_NOTIFY_ROW;
constexpr int kRowSig = 1;
constexpr int kRowRanks = kRowSig + kCallSigWords;
constexpr int kRowExperts = kRowRanks + kMaxRanks;
static_assert(kRowExperts + kMaxLocalExperts == kNotifyRow, "notify row layout");
// Warps of a dispatch/combine block: a multiple of every sender group (24 / R for R in
// 1, 2, 3, 4, 6, 8) and of the default window (NVL_WINDOW_TOKENS = 24).
constexpr int kWarps = EP_NVL_WARPS;
constexpr int kThreads = kWarps * 32;
// Bit 31 of a tail word's count: the sender has published its last slot.
constexpr uint32_t kDoneBit = 0x80000000u;

// Host status word (int32 [16], host-mapped). The first failing block claims it (ctrl[2]),
// writes the fields, then the code, with system fences between, so a host that sees the code
// sees the fields: [0] code, [1] phase, [2] peer rank, [3] channel, [4] value seen,
// [5] value wanted, [6] and [7] two more (STATUS_DISAGREE_KERNEL: the tags, and this rank's
// own kernel at [9] and [10], constants.NVL_INFO_OWN_KERNEL). [8] is the received token count
// written by the notify kernel.
// int32 [16 + kMaxLocalExperts] in all (NVL_STATUS_WORDS; ep_comm.backends.kernels.status
// decodes it).
constexpr int kStatusTimeout = EP_STATUS_TIMEOUT;
constexpr int kStatusOverflow = EP_STATUS_OVERFLOW;  // more received tokens than num_worst_tokens
// The notify kernel refused the call (signatures differ, or a rank's input was bad): [2] the
// first rank that differs, [3] the first differing word (-1: only a bad input), [4] its value
// there, [5] this rank's value; from [kInfoCallSigs] every rank's signature, R x kCallSigWords.
constexpr int kStatusDisagree = EP_STATUS_DISAGREE;
constexpr int kPhaseNotify = EP_PHASE_NOTIFY;
constexpr int kPhaseDispatchSend = EP_PHASE_DISPATCH_SEND;
constexpr int kPhaseDispatchRecv = EP_PHASE_DISPATCH_RECV;
constexpr int kPhaseCombineSend = EP_PHASE_COMBINE_SEND;
constexpr int kPhaseCombineRecv = EP_PHASE_COMBINE_RECV;
constexpr int kInfoNumRecv = EP_NVL_INFO_NUM_RECV;
constexpr int kInfoOwnKernel = EP_NVL_INFO_OWN_KERNEL;  // STATUS_DISAGREE_KERNEL: own what, tag
// [kInfoExpertCounts + e], e < L: tokens this rank receives for local expert e (notify), read by
// the host after its sync without a device-to-host copy.
constexpr int kInfoExpertCounts = EP_NVL_INFO_EXPERT_COUNTS;
constexpr int kInfoCallSigs = EP_NVL_INFO_CALL_SIGS;

// Named barrier of one warp group (ids 1..15; 0 is __syncthreads).
__device__ __forceinline__ void group_sync(int id, int num_threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}


// Staging of row copies through shared memory (intranode.cu). A copy through registers has as
// many bytes in flight as a thread has registers to hold them (80 per thread in a 768-thread
// block: 8 int4 at most, and the combine reduction spilled at 4), and a copy kernel's speed is
// bytes in flight over latency. cp.async (16-byte global -> shared, no register) lets each lane
// have kStagePerLane int4 in flight: 8 KiB per warp, 192 KiB per block (one block per SM).
// Each lane reads back only what it staged itself, so no barrier is needed, and cp.async.cg
// reads through L2, as data that peers write must be read.
constexpr int kStagePerLane = 16;
constexpr int kStagePerWarp = 32 * kStagePerLane;  // int4
// ep_comm.intranode.KERNEL_SMEM: dynamic shared memory of a dispatch/combine block.
constexpr int kStageBytes = kWarps * kStagePerWarp * 16;

__device__ __forceinline__ void cp_async16(int4* smem_dst, const int4* gmem_src) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem_src) : "memory");
}

// Wait for every cp.async of this thread (they are then visible to this thread).
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}

// This block's staging area, kStagePerWarp int4 per warp (launched with kStageBytes of dynamic
// shared memory).
extern __shared__ int4 s_stage[];

__device__ __forceinline__ int4* warp_stage() { return s_stage + (threadIdx.x >> 5) * kStagePerWarp; }

// Copy n int4 with one warp, through the warp's staging area: every lane issues up to
// kStagePerLane independent 16-byte cp.async before it waits, so a 14 KiB bf16 row takes two
// memory round trips and a 7 KiB fp8 row one (the time of a row copy is its round trips).
// Sources: this rank's inputs, or ring slots that peers wrote (read through L2 either way).
__device__ __forceinline__ void warp_copy(int4* __restrict__ dst, const int4* __restrict__ src,
                                          int n, int lane) {
    int4* stage = warp_stage() + lane;
    src += lane;
    dst += lane;
    n -= lane;  // element u * 32 of this lane's view exists iff u * 32 < n
    for (; n >= kStagePerWarp; n -= kStagePerWarp, src += kStagePerWarp, dst += kStagePerWarp) {
#pragma unroll
        for (int u = 0; u < kStagePerLane; ++u) cp_async16(stage + u * 32, src + u * 32);
        cp_async_wait_all();
#pragma unroll
        for (int u = 0; u < kStagePerLane; ++u) dst[u * 32] = stage[u * 32];
    }
    if (n > 0) {  // the last, partial piece of the row
#pragma unroll
        for (int u = 0; u < kStagePerLane; ++u)
            if (u * 32 < n) cp_async16(stage + u * 32, src + u * 32);
        cp_async_wait_all();
#pragma unroll
        for (int u = 0; u < kStagePerLane; ++u)
            if (u * 32 < n) dst[u * 32] = stage[u * 32];
    }
}

// Global expert id -> local id on rank d (-1 when the expert lives elsewhere or is -1).
__device__ __forceinline__ int to_local(int64_t e, int d, int L) {
    const int64_t lo = static_cast<int64_t>(d) * L;
    return (e >= lo && e < lo + L) ? static_cast<int>(e - lo) : -1;
}

// Float sums of 8 bf16 (one int4) into acc, and 8 floats rounded to bf16 (one int4).
__device__ __forceinline__ void add_bf16x8(float* acc, int4 v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float2 f = __bfloat1622float2(h[q]);
        acc[2 * q] += f.x;
        acc[2 * q + 1] += f.y;
    }
}

__device__ __forceinline__ int4 pack_bf16x8(const float* acc) {
    int4 out;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
    return out;
}

// Claim the status word once for the whole buffer (device-memory CAS; atomics on host memory
// over PCIe are not reliable), write the fields, then the code. w6, w7, and own0, own1 (at
// NVL_INFO_OWN_KERNEL): more words, written by STATUS_DISAGREE_KERNEL only (0 otherwise).
__device__ __forceinline__ void report(int* host_status, uint32_t* ctrl, int code, int phase,
                                       int peer, int channel, long long seen, long long wanted,
                                       uint32_t w6 = 0u, uint32_t w7 = 0u, uint32_t own0 = 0u,
                                       uint32_t own1 = 0u) {
    if (atomicCAS(reinterpret_cast<unsigned*>(ctrl + 2), 0u, 1u) != 0u) return;
    volatile int* s = host_status;
    s[1] = phase;
    s[2] = peer;
    s[3] = channel;
    s[4] = static_cast<int>(seen);
    s[5] = static_cast<int>(wanted);
    s[6] = static_cast<int>(w6);
    s[7] = static_cast<int>(w7);
    s[kInfoOwnKernel] = static_cast<int>(own0);
    s[kInfoOwnKernel + 1] = static_cast<int>(own1);
    __threadfence_system();
    s[0] = code;
    __threadfence_system();
}

// Every block of a communicating kernel calls this last (all threads): the last block to
// finish advances the sequence number ctrl[0], so the next kernel on this rank uses a new tag.
// All blocks read ctrl[0] at their start, before they can be counted here.
__device__ __forceinline__ void finish_block(uint32_t* ctrl) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned prev = atomicAdd(ctrl + 1, 1u);
        if (prev == gridDim.x - 1) {
            ctrl[1] = 0;
            ctrl[0] = ctrl[0] + 1;
            __threadfence();
        }
    }
}

// The token range [begin, end) of channel c when T tokens are split over C channels.
__device__ __forceinline__ int channel_begin(int num_tokens, int c, int num_channels) {
    return static_cast<int>((static_cast<long long>(num_tokens) * c) / num_channels);
}

// Tag and count of a tail/head word.
__device__ __forceinline__ uint32_t word_tag(uint64_t w) { return static_cast<uint32_t>(w >> 32); }
__device__ __forceinline__ uint32_t word_count(uint64_t w) {
    return static_cast<uint32_t>(w) & ~kDoneBit;
}
__device__ __forceinline__ bool word_done(uint64_t w) {
    return (static_cast<uint32_t>(w) & kDoneBit) != 0u;
}
__device__ __forceinline__ uint64_t make_word(uint32_t tag, uint32_t count, bool done) {
    return (static_cast<uint64_t>(tag) << 32) | count | (done ? kDoneBit : 0u);
}

// The layout half of a ring word's tag. Two ranks whose kernels would lay out or read a slot
// differently (another hidden or dtype, so another row_int4; scales, top-k, experts per rank,
// expanded rows; another ring geometry) must never take each other's tail/head words: a
// receiver that did would read rows of the wrong size, silently. So the tag carries, besides
// the call number, a 12-bit hash of what both sides of a ring must agree on, and a rank whose
// peer disagrees never takes its words: it sees the peer's announcement of the other layout
// and stops (see "kernel announcements" below), or, where the peer runs no kernel of this
// number, reports a timeout naming it (either way the Buffer then fails).
// Only scalar arguments go in, never pointers: a rank with no tokens passes null inputs (see
// take_token_from_slot) and still agrees with its peers.
// The kernel kind is hashed too: a rank that skipped a call may run a combine against its
// peer's cached dispatch, whose slots hold other things.
// Kinds of the numbered kernels (ep_comm/core/constants.py NVL_KERNEL_*; the host names them).
constexpr uint32_t kKernelDispatch = EP_NVL_KERNEL_DISPATCH;
constexpr uint32_t kKernelCombine = EP_NVL_KERNEL_COMBINE;
constexpr uint32_t kKernelNotify = EP_NVL_KERNEL_NOTIFY;
constexpr int kRingShapeBits = EP_NVL_RING_SHAPE_BITS;
constexpr uint32_t kRingShapeMask = (1u << kRingShapeBits) - 1u;
// The tag is (call number) XOR (shape << kRingSeqBits): the low 20 bits are the call number's,
// untouched. The words of a ring are only ever compared for equality with the running kernel's
// tag, and a word left by any of the previous 2^20 - 1 kernels of this rank (the previous call
// above all, which wrote every word of the rings it used) differs from it in those bits
// whatever the shapes; so the shape costs no protection against stale words, except for a word
// left untouched for a multiple of 2^20 kernels (a channel unused since: more channels now than
// in any call since) whose shape bits then happen to cancel the call numbers' upper bits.
// Between two ranks in the same call the low bits are equal, and the tags differ exactly when
// the shapes do.
constexpr int kRingSeqBits = 32 - kRingShapeBits;
constexpr uint32_t kRingSeqMask = (1u << kRingSeqBits) - 1u;

// One step of the hash: v enters through an odd multiplier (a bijection of the 32-bit words),
// then an xor-shift / odd multiply / xor-shift spreads every input bit over the upper bits.
__device__ __forceinline__ uint32_t ring_mix(uint32_t h, uint32_t v) {
    h ^= v * 0x9E3779B1u;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    return h;
}

// kind: kKernelDispatch / kKernelCombine; the others as the kernels' arguments (combine: 0 for
// num_scales, L and expand, which it does not have). row_int4 is added last, times an odd
// constant, to the top 12 bits of the others' hash: modulo 2^12 that is a bijection of
// row_int4, so calls that differ only in their row size (the common mistake: another hidden or
// dtype) always get different shapes unless the rows differ by a multiple of 4096 int4
// (64 KiB); any other difference collides with probability about 2^-12.
__device__ __forceinline__ uint32_t ring_shape(uint32_t kind, int row_int4, int num_scales, int K,
                                               int L, int expand, int C, int S) {
    uint32_t h = ring_mix(0x6A09E667u, kind);
    h = ring_mix(h, static_cast<uint32_t>(num_scales));
    h = ring_mix(h, static_cast<uint32_t>(K));
    h = ring_mix(h, static_cast<uint32_t>(L));
    h = ring_mix(h, static_cast<uint32_t>(expand != 0));
    h = ring_mix(h, static_cast<uint32_t>(C));
    h = ring_mix(h, static_cast<uint32_t>(S));
    return ((h >> kRingSeqBits) + static_cast<uint32_t>(row_int4) * 0x5BDu) & kRingShapeMask;
}

// The tag of a ring kernel: its call number (ctrl[0] + 1) with the shape in the upper bits.
__device__ __forceinline__ uint32_t ring_tag(uint32_t seq, uint32_t shape) {
    return seq ^ (shape << kRingSeqBits);
}

// ----------------------------------------------------------------------- kernel announcements
// The tags keep ranks that run different kernels as the same number (a skipped or extra call,
// another hidden or top-k) from taking each other's words, but then each waits in vain until
// its timeout, which names the peer and no more. So every numbered kernel (notify, dispatch,
// combine) first announces itself to every peer: its tag and what it runs (kind and row
// layout, kernel_what) in one uint64 of the peer's control words (announce_words, one per
// source rank, constants.NVL_CTRL_ANNOUNCE). A wait that is not answered looks, every 64 spins,
// at the announcement of the rank it waits for (wait_gives_up): the same kernel number (the
// low kRingSeqBits of the tags) with another tag or description is a peer in another kernel or
// layout, and no wait of this kernel can succeed (or, where the shapes' hashes collide, none
// should).
// An announcement lives only until that rank's next kernel replaces it, so what a rank finds
// must not depend on when its peers look: the finder publishes a finding (both ranks and both
// announcements, finding_words) into every rank's control words, its own included, and sets
// every rank's stop word. From then on every wait of every NVLink kernel of the Buffer, on
// every rank, stops at its next look and reports the finding (STATUS_DISAGREE_KERNEL; the host
// names the field: operation, dtype, hidden, top-k, expand): the rank the finder waited for,
// a third rank that waited for either, a rank that came late to the kernel, and every kernel
// already queued behind it. The stop word is never cleared: the kernels stopped in the middle
// of an exchange, and the host fails the Buffer.
// No false alarm: ranks run their numbered kernels in lockstep (each needs every peer's
// kernel of the same number to finish), so a peer's announcement is of its kernel n - 1, n or
// n + 1 while this rank runs n, never of one 2^20 kernels away; a peer in the same kernel with
// the same layout announces exactly this tag. A kernel that returns without a number (behind a
// refused notify) announces nothing.
constexpr int kCtrlStop = EP_NVL_CTRL_STOP;          // uint32: nonzero once a finding is here
constexpr int kCtrlPublished = EP_NVL_CTRL_PUBLISHED;  // uint32, local: this rank published
constexpr int kCtrlAnnounce = EP_NVL_CTRL_ANNOUNCE;  // uint32 index of uint64 [kMaxRanks]
constexpr int kCtrlFinding = EP_NVL_CTRL_FINDING;    // uint32 index of uint64 [kMaxRanks][3]
static_assert(kCtrlAnnounce % 2 == 0 && kCtrlFinding % 2 == 0, "uint64 words");
// Word 0 of a finding: valid bit | b << 8 | a (a: the finder, b: the rank whose announcement
// differed from a's); words 1 and 2: a's and b's announcements.
constexpr uint64_t kFindingValid = 1ull << 63;

// The control words of the buffer at `base` (any rank's).
__device__ __forceinline__ uint32_t* ctrl_of(char* base, long long off_ctrl) {
    return reinterpret_cast<uint32_t*>(base + off_ctrl);
}
__device__ __forceinline__ uint64_t* announce_words(uint32_t* ctrl) {
    return reinterpret_cast<uint64_t*>(ctrl + kCtrlAnnounce);
}
__device__ __forceinline__ uint64_t* finding_words(uint32_t* ctrl, int source) {
    return reinterpret_cast<uint64_t*>(ctrl + kCtrlFinding) + 3 * source;
}

// The low half of an announcement (constants.NVL_ANN_*): kind, row size in int4 (clamped to
// its field), top-k, fp8 (scales travel), expanding.
__device__ __forceinline__ uint32_t kernel_what(uint32_t kind, int row_int4, int K, int num_scales,
                                                int expand) {
    const uint32_t row = min(static_cast<uint32_t>(row_int4), (1u << EP_NVL_ANN_ROW_BITS) - 1u);
    const uint32_t k = min(static_cast<uint32_t>(K), (1u << EP_NVL_ANN_TOPK_BITS) - 1u);
    return kind | (row << EP_NVL_ANN_ROW_SHIFT) | (k << EP_NVL_ANN_TOPK_SHIFT) |
           (num_scales > 0 ? 1u << EP_NVL_ANN_FP8_BIT : 0u) |
           (expand != 0 ? 1u << EP_NVL_ANN_EXPAND_BIT : 0u);
}

// What every bounded wait of one numbered kernel needs besides its own word: the kernel's
// identity (its announcement: tag and what), the ranks' buffers, and where to report.
struct Waits {
    char* const* peers;
    long long off_ctrl;
    int rank, R;
    uint32_t* ctrl;  // this rank's control words
    int* host_status;
    uint32_t tag, what;
    __device__ __forceinline__ uint64_t announcement() const {
        return (static_cast<uint64_t>(tag) << 32) | what;
    }
};

__device__ __forceinline__ Waits make_waits(char* const* peers, long long off_ctrl, int rank,
                                            int R, int* host_status, uint32_t tag,
                                            uint32_t what) {
    return Waits{peers, off_ctrl, rank, R, ctrl_of(peers[rank], off_ctrl), host_status, tag,
                 what};
}

// Thread p < R of one block tells rank p which kernel this rank runs as this number. Called
// once per numbered kernel, before its first wait. This rank's own word is written too: the
// notify kernel's thread `rank` waits for this rank's own flag, and must find its own tag.
__device__ __forceinline__ void announce_kernel(const Waits& k) {
    const int p = static_cast<int>(threadIdx.x);
    // Relaxed: nothing is ordered after it, and a release would put a system fence at the
    // start of every kernel.
    if (p < k.R)
        st_relaxed_sys(announce_words(ctrl_of(k.peers[p], k.off_ctrl)) + k.rank,
                       k.announcement());
}

// One thread: this rank (a) found that rank b announced `theirs` under this kernel's number.
// The finding goes to every rank's control words (this rank's too), then their stop words.
__device__ __forceinline__ void publish_finding(const Waits& k, int b, uint64_t theirs) {
    for (int q = 0; q < k.R; ++q) {
        uint32_t* ctrl = ctrl_of(k.peers[q], k.off_ctrl);
        uint64_t* f = finding_words(ctrl, k.rank);
        st_relaxed_sys(f + 1, k.announcement());
        st_relaxed_sys(f + 2, theirs);
        st_release_sys(f, kFindingValid | (static_cast<uint64_t>(b) << 8) |
                              static_cast<uint64_t>(k.rank));  // after words 1 and 2
        st_release_sys(ctrl + kCtrlStop, 1u);                  // after the finding
    }
}

// Report the first finding in this rank's control words (by finder rank), as
// STATUS_DISAGREE_KERNEL: [1] phase, [2] a, [3] b, [4] / [5] a's and b's what, [6] / [7] their
// tags, and this rank's own kernel (what, tag) at NVL_INFO_OWN_KERNEL, so that the host can put
// this rank beside a or b (status.nvl_kernel_mismatch). Called once the stop word is seen (it
// is set after a finding, so one is there), or by the publisher after it published.
__device__ __forceinline__ void report_finding(const Waits& k, int phase) {
    for (int q = 0; q < k.R; ++q) {
        const uint64_t* f = finding_words(k.ctrl, q);
        const uint64_t head = ld_acquire_sys(f);
        if ((head & kFindingValid) == 0u) continue;
        const uint64_t ann_a = ld_acquire_sys(f + 1), ann_b = ld_acquire_sys(f + 2);
        report(k.host_status, k.ctrl, EP_STATUS_DISAGREE_KERNEL, phase,
               static_cast<int>(head & 0xFF), static_cast<int>((head >> 8) & 0xFF),
               static_cast<uint32_t>(ann_a), static_cast<uint32_t>(ann_b),
               static_cast<uint32_t>(ann_a >> 32), static_cast<uint32_t>(ann_b >> 32), k.what,
               k.tag);
        return;
    }
}

// What a bounded wait of the kernel `k` on peer p does every 64 spins, one thread. True (stop
// waiting): a finding is here (reported); or peer p announces another kernel as this number
// (published, then reported); or the deadline passed (a timeout with seen / wanted, as
// report()).
static __device__ __noinline__ bool wait_gives_up(const Waits& k, int p, int phase, int channel,
                                                  uint64_t deadline, long long seen,
                                                  long long wanted) {
    if (ld_acquire_sys(k.ctrl + kCtrlStop) != 0u) {
        report_finding(k, phase);
        return true;
    }
    const uint64_t ann = ld_acquire_sys(announce_words(k.ctrl) + p);
    const uint32_t their_tag = static_cast<uint32_t>(ann >> 32);
    // The whole announcement is compared, not only the tag: two layouts whose 12-bit hashes
    // collide still differ in what they announce (kind, row size, top-k, fp8, expand).
    if (ann != k.announcement() && ((their_tag ^ k.tag) & kRingSeqMask) == 0u) {
        // One finding per rank: several waits of this kernel (other peers, other channels) may
        // find at once, and two publishers would interleave the words of this rank's slot.
        // The others stop (the publisher reports; so do they, if its finding is here by then).
        if (atomicCAS(k.ctrl + kCtrlPublished, 0u, 1u) == 0u) publish_finding(k, p, ann);
        report_finding(k, phase);
        return true;
    }
    if (globaltimer_ns() > deadline) {
        report(k.host_status, k.ctrl, kStatusTimeout, phase, p, channel, seen, wanted);
        return true;
    }
    return false;
}

}  // namespace ep_nvl
