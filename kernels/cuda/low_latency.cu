// Low-latency (decode) dispatch and combine over NVSHMEM.
//
// Every rank runs the same kernels on its own stream; ranks synchronise only through signal
// words in the symmetric buffer (ep_comm/regions.py LowLatencyRegions). Data goes either as
// stores through nvshmem_ptr (NVLink peers, when allowed) or as NVSHMEM puts with a signal
// (every byte, when NVLink is not allowed or the peer is not reachable by loads and stores).
//
// Completion protocol (both kernels): for every (expert, peer) pair the sender writes a count
// word = rows + 1 (with the agreement, on unless agreement.LL_AGREE_ENV is 0, the call's tag in its
// upper 32 bits: a receiver whose own tag differs refuses that peer, see tags_agree), and adds 1
// to an arrival word after each row's bytes (a release after the stores, or putmem_signal,
// which delivers the signal after the data). The receiver waits for
// the count word, then for arrivals == count: then all rows are in its memory. Count words do not
// depend on the data, so they go out first. The receiver zeroes both words after reading them.
// A word is written again only in the next call on the same buffer half, and that call cannot
// start before this one finished receiving: the combine that follows a dispatch waits for every
// peer's count words, which each peer sends only after its own dispatch receive, and the
// dispatch after a combine waits likewise (see ep_comm/low_latency.py, "Reuse of a half").
//
// Slots: a source rank writes its token t for local expert e of rank d into slot [e, me, i] of
// d's dispatch_recv, with i = the number of tokens before t routed to the same expert. So slots
// hold tokens in source-token order, and the receiver lays blocks out by ascending source rank:
// the result is deterministic and equal to the reference backend's layout.
//
// Launch: 1024 threads per block, at most one block per SM, grid <= SM count: every block is
// resident, so a block that waits never keeps another block of the same grid from running.

#include <nvshmem.h>
#include <nvshmemx.h>

#include "low_latency_common.cuh"

namespace ep_ll {

constexpr int kThreads = EP_LL_THREADS;
constexpr int kWarps = kThreads / 32;
// Top-k slots: one routing warp per slot (LL_MAX_TOPK; the host rejects more).
constexpr int kMaxTopk = kWarps;
// Ranks: one waiting thread per source rank.
constexpr int kMaxRanks = kThreads;
// Bytes of a message header (the source token index, then 12 bytes of padding).
constexpr int kHeaderBytes = 16;

// Tokens t' in [0, t_end) whose top-k row contains expert g (each row counted once). Warp-wide.
__device__ __forceinline__ int rows_with_expert(const int64_t* topk_idx, int num_topk, int64_t g,
                                                int t_end, int lane) {
    int n = 0;
    for (int t = lane; t < t_end; t += 32) {
        const int64_t* row = topk_idx + static_cast<size_t>(t) * num_topk;
        bool hit = false;
        for (int k = 0; k < num_topk; ++k) hit |= (__ldg(row + k) == g);
        n += hit ? 1 : 0;
    }
    return warp_sum(n);
}

// Largest s in [0, n) with begin[s] <= idx (begin nondecreasing, begin[0] == 0 <= idx). When
// idx < begin[n] this is the block that holds row idx: a block with no rows has the same begin
// as the next one, so it is never the largest.
__device__ __forceinline__ int find_block(const int* begin, int n, int idx) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (begin[mid] <= idx) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Writes a signal word on `pe`: a store through the peer pointer when NVLink is allowed and the
// peer is reachable, else an NVSHMEM signal operation.
__device__ __forceinline__ void signal_set(uint64_t* sym, uint64_t value, int pe, bool nvlink) {
    uint64_t* p = nvlink ? static_cast<uint64_t*>(nvshmem_ptr(sym, pe)) : nullptr;
    if (p != nullptr) {
        st_release_sys(p, value);
    } else {
        nvshmemx_signal_op(sym, value, NVSHMEM_SIGNAL_SET, pe);
    }
}

// Warp copy of n16 16-byte words.
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int n16, int lane) {
    int j = lane;
    for (; j + 96 < n16; j += 128) {
        int4 a = ld_cg(src + j), b = ld_cg(src + j + 32), c = ld_cg(src + j + 64),
             d = ld_cg(src + j + 96);
        dst[j] = a;
        dst[j + 32] = b;
        dst[j + 64] = c;
        dst[j + 96] = d;
    }
    for (; j < n16; j += 32) dst[j] = ld_cg(src + j);
}

// ===================================================================== reuse of a half, acked
// A send on (kind, half) overwrites what the previous send on it left in each destination's
// buffer. In order (no receive hooks) the chain of waits between calls keeps it behind every
// peer's receive (ep_comm/backends/kernels/low_latency.py, "Reuse of a half"). Receive hooks
// break the chain: a rank may send D0, D1, receive D0 and send D2 into half 0 while a peer has
// not received D0 yet. So every receive is acknowledged: once every block has read the call's
// rows and reset its words, the last block writes the number of receives completed on
// (kind, half) into ack[me] of every unmasked rank (itself included); and every send first
// waits until each unmasked destination's ack[destination] reaches the sends this rank made
// before it on (kind, half). In order the wait passes at once. All counters live on the device
// (CUDA graph replays keep them) among the signal words (clean_low_latency_buffer zeroes them).
struct HalfSync {
    int* done;           // local int32 [LL_DONE_WORDS]: block counters (kDone*)
    uint64_t* progress;  // local uint64 [LL_PROGRESS_WORDS]: sends made, receives completed
    uint64_t* ack;       // symmetric uint64 [LL_MAX_RANKS]: [s] = receives rank s completed
};

// Every block, before the first store of its send phase. Returns false (the whole block) after a
// timeout, which it reports, or when another block's report ends the wait (`abortable`).
__device__ __forceinline__ bool wait_acks(const HalfSync& h, const int* mask, int num_ranks,
                                          int me, uint64_t timeout_ns, volatile int* host_status,
                                          int* claim, int phase, bool abortable) {
    __shared__ int s_fail;
    if (threadIdx.x == 0) s_fail = 0;
    __syncthreads();
    // Written by an earlier kernel's last block (finish_send): stable while this one runs.
    const uint64_t sent = *reinterpret_cast<volatile uint64_t*>(h.progress + kProgressSent);
    if (sent > 0) {
        const uint64_t deadline = globaltimer_ns() + timeout_ns;
        const int* abort = abortable ? claim : nullptr;
        for (int d = threadIdx.x; d < num_ranks; d += kThreads) {
            if (rank_masked(mask, d, me)) continue;
            uint64_t seen;
            if (!wait_at_least(h.ack + d, sent, deadline, &seen, abort)) {
                report_timeout(host_status, claim, phase, d, -1, kAwaitAck, seen, sent);
                s_fail = 1;
            }
        }
    }
    __syncthreads();
    return s_fail == 0;
}

// Every block, at the end of its send phase: the last block counts the send (every block read
// the count before it arrived here).
__device__ __forceinline__ void finish_send(const HalfSync& h) {
    __syncthreads();
    if (threadIdx.x == 0 &&
        atomicAdd(h.done + kDoneSend, 1) == static_cast<int>(gridDim.x) - 1) {
        atomicExch(h.done + kDoneSend, 0);
        h.progress[kProgressSent] += 1;
    }
}

// Every block, once it has read all of this call's rows: the last block counts the receive and
// writes the count into ack[me] of every unmasked rank.
__device__ __forceinline__ void finish_recv(const HalfSync& h, const int* mask, int num_ranks,
                                            int me, bool nvlink) {
    __shared__ int s_last;
    __shared__ uint64_t s_received;
    __syncthreads();
    if (threadIdx.x == 0) {
        // The block's reads and word resets before its arrival (bar.sync, then a fence at system
        // scope: the acknowledgement lets a peer write here again, over NVLink or the NIC).
        __threadfence_system();
        s_last = atomicAdd(h.done + kDoneRecv, 1) == static_cast<int>(gridDim.x) - 1;
        if (s_last) {
            atomicExch(h.done + kDoneRecv, 0);
            s_received = h.progress[kProgressReceived] + 1;
            h.progress[kProgressReceived] = s_received;
        }
    }
    __syncthreads();
    if (!s_last) return;
    for (int d = threadIdx.x; d < num_ranks; d += kThreads)
        if (!rank_masked(mask, d, me)) signal_set(h.ack + me, s_received, d, nvlink);
}

// ==================================================================================== dispatch
struct DispatchArgs {
    const __nv_bfloat16* x;      // [T, H] bf16
    const int64_t* topk_idx;     // [T, K]
    int num_tokens, num_topk, hidden, num_experts, num_ranks, rank, max_tokens;
    bool round_scale, ue8m0, nvlink;
    int phases;
    uint8_t* send_stage;         // local [M] msgs (dispatch_send of this half)
    uint8_t* recv_msgs;          // symmetric [L, R, M] msgs (dispatch_recv of this half)
    uint64_t* recv_count_sig;    // symmetric [L, R]
    uint64_t* recv_arrive_sig;   // symmetric [L, R]
    int msg_stride;              // bytes between slots (LowLatencyRegions.msg_bytes)
    const int* mask;             // [R] int32, 1 = masked
    void* recv_x;                // [L, R*M, H] fp8 or bf16
    void* recv_scales;           // storage [L, G, R*M] float32, or [L, G/4, R*M] int32 (ue8m0)
    int* src_info;               // [L, R*M]
    int* range_begin;            // [L, R]
    int* range_count;            // [L, R]
    int* recv_count;             // [L]
    int* cum_stats;              // [L] or null
    long long* wait_stats;       // [R] or null
    volatile int* host_status;   // int32[8] host-mapped
    int* status_claim;           // local int32
    uint64_t timeout_ns;
    int call_tag;                // upper 32 bits of the count words; 0 = agreement off
    int* done_counter;           // local int32 [LL_DONE_WORDS] (dispatch_done of this half)
    uint64_t* progress;          // local uint64 [LL_PROGRESS_WORDS] (dispatch_progress)
    uint64_t* ack_sig;           // symmetric uint64 [LL_MAX_RANKS] (dispatch_ack)
};

// Sends count words: one warp per destination expert g (all experts, over the whole grid).
__device__ __forceinline__ void dispatch_send_counts(const DispatchArgs& a, int warp, int lane) {
    const int local = a.num_experts / a.num_ranks;
    for (int g = blockIdx.x * kWarps + warp; g < a.num_experts; g += gridDim.x * kWarps) {
        const int pe = g / local;
        if (rank_masked(a.mask, pe, a.rank)) continue;
        const int n = rows_with_expert(a.topk_idx, a.num_topk, g, a.num_tokens, lane);
        if (lane == 0) {
            uint64_t* sig = a.recv_count_sig + static_cast<size_t>(g % local) * a.num_ranks + a.rank;
            signal_set(sig, tagged_count(a.call_tag, static_cast<uint64_t>(n) + 1), pe,
                       a.nvlink);
        }
    }
}

// Casts and sends the tokens of this block: token t is cast once and written straight into each
// destination slot (NVLink) and/or into the staging slot for puts.
template <bool kFp8>
__device__ __forceinline__ void dispatch_send_tokens(const DispatchArgs& a, int warp, int lane) {
    __shared__ int s_valid[kMaxTopk], s_pe[kMaxTopk], s_expert[kMaxTopk];
    __shared__ uint8_t* s_sym[kMaxTopk];
    __shared__ uint8_t* s_p2p[kMaxTopk];
    const int local = a.num_experts / a.num_ranks;
    const int k_n = a.num_topk;
    const int hidden = a.hidden;
    const int num_chunks = hidden / 8;  // 8 channels (16 bf16 bytes) per lane
    const int send_bytes = kHeaderBytes + (kFp8 ? hidden + hidden / kFp8Block * 4 : hidden * 2);

    for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
        // Routing: warp k resolves top-k slot k.
        if (warp < k_n) {
            const int64_t* row = a.topk_idx + static_cast<size_t>(t) * k_n;
            const int64_t g = __ldg(row + warp);
            bool valid = g >= 0 && g < a.num_experts;
            if (lane == 0 && !valid && g != -1)
                report_bad_id(a.host_status, a.status_claim, t, warp, g);
            // The same expert twice in one row is sent once (by its first slot).
            const bool dup = lane < warp && valid && __ldg(row + lane) == g;
            if (__any_sync(kFullMask, dup)) valid = false;
            const int pe = valid ? static_cast<int>(g / local) : 0;
            if (valid && rank_masked(a.mask, pe, a.rank)) valid = false;
            int slot = 0;
            if (valid) slot = rows_with_expert(a.topk_idx, k_n, g, t, lane);
            if (lane == 0) {
                s_valid[warp] = valid;
                s_p2p[warp] = nullptr;
                if (valid) {
                    const int e = static_cast<int>(g % local);
                    const size_t index = (static_cast<size_t>(e) * a.num_ranks + a.rank) *
                                         a.max_tokens + slot;
                    uint8_t* sym = a.recv_msgs + index * a.msg_stride;
                    s_sym[warp] = sym;
                    s_pe[warp] = pe;
                    s_expert[warp] = e;
                    if (a.nvlink) s_p2p[warp] = static_cast<uint8_t*>(nvshmem_ptr(sym, pe));
                }
            }
        }
        __syncthreads();

        bool stage = false;  // some destination takes a put: write the staging slot too
        for (int k = 0; k < k_n; ++k) stage |= (s_valid[k] && s_p2p[k] == nullptr);
        uint8_t* stage_msg = a.send_stage + static_cast<size_t>(t) * a.msg_stride;

        if (threadIdx.x == 0) {
            const int4 header = make_int4(t, 0, 0, 0);
            if (stage) *reinterpret_cast<int4*>(stage_msg) = header;
            for (int k = 0; k < k_n; ++k)
                if (s_valid[k] && s_p2p[k] != nullptr) *reinterpret_cast<int4*>(s_p2p[k]) = header;
        }

        const int4* x_row = reinterpret_cast<const int4*>(a.x + static_cast<size_t>(t) * hidden);
        // Warp-aligned chunks: the half-warp amax reduction needs every lane of the warp.
        for (int base = warp * 32; base < num_chunks; base += kThreads) {
            const int c = base + lane;
            const bool active = c < num_chunks;
            const int4 v = active ? __ldg(x_row + c) : make_int4(0, 0, 0, 0);
            if constexpr (kFp8) {
                float f[8];
                bf16x8_to_float(v, f);
                float amax = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(f[j]));
                amax = half_warp_max(amax);
                const float scale = fp8_scale(amax, a.round_scale);
                uint32_t lo = 0, hi = 0;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    lo |= static_cast<uint32_t>(to_e4m3(__fdiv_rn(f[j], scale))) << (8 * j);
                    hi |= static_cast<uint32_t>(to_e4m3(__fdiv_rn(f[j + 4], scale))) << (8 * j);
                }
                // Even lanes store 16 bytes (theirs and the next lane's 8): half the store
                // instructions, and full 16-byte NVLink writes. num_chunks is even (hidden % 128
                // == 0), so an active even lane always has an active partner. Every lane shuffles.
                const uint32_t nlo = __shfl_down_sync(kFullMask, lo, 1);
                const uint32_t nhi = __shfl_down_sync(kFullMask, hi, 1);
                if (active) {
                    const int4 q = make_int4(static_cast<int>(lo), static_cast<int>(hi),
                                             static_cast<int>(nlo), static_cast<int>(nhi));
                    const size_t q_off = kHeaderBytes + static_cast<size_t>(c) * 8;
                    const size_t s_off = kHeaderBytes + hidden + static_cast<size_t>(c / 16) * 4;
                    const bool writes_q = (lane & 1) == 0;
                    const bool writes_scale = (lane & 15) == 0;
                    if (stage) {
                        if (writes_q) *reinterpret_cast<int4*>(stage_msg + q_off) = q;
                        if (writes_scale) *reinterpret_cast<float*>(stage_msg + s_off) = scale;
                    }
                    for (int k = 0; k < k_n; ++k) {
                        uint8_t* dst = s_p2p[k];
                        if (!s_valid[k] || dst == nullptr) continue;
                        if (writes_q) *reinterpret_cast<int4*>(dst + q_off) = q;
                        if (writes_scale) *reinterpret_cast<float*>(dst + s_off) = scale;
                    }
                }
            } else {
                if (active) {
                    const size_t off = kHeaderBytes + static_cast<size_t>(c) * 16;
                    if (stage) *reinterpret_cast<int4*>(stage_msg + off) = v;
                    for (int k = 0; k < k_n; ++k) {
                        uint8_t* dst = s_p2p[k];
                        if (s_valid[k] && dst != nullptr) *reinterpret_cast<int4*>(dst + off) = v;
                    }
                }
            }
        }
        __syncthreads();

        // Arrival signals: after the whole block's stores (bar.sync, then a release add at
        // system scope by one thread: the barrier orders the other threads' stores before it
        // and the release is cumulative, as DeepEP's bar.sync + st.release.sys; a separate
        // fence.sc.sys would only add its drain latency to every token), or a put whose signal
        // lands after its data.
        if (warp < k_n && s_valid[warp]) {
            const int pe = s_pe[warp];
            uint64_t* arrive = a.recv_arrive_sig +
                               static_cast<size_t>(s_expert[warp]) * a.num_ranks + a.rank;
            if (s_p2p[warp] != nullptr) {
                if (lane == 0)
                    red_add_release_sys(static_cast<uint64_t*>(nvshmem_ptr(arrive, pe)), 1);
            } else {
                nvshmemx_putmem_signal_nbi_warp(s_sym[warp], stage_msg, send_bytes, arrive, 1,
                                                NVSHMEM_SIGNAL_ADD, pe);
            }
        }
        __syncthreads();  // the routing table in shared memory is rewritten for the next token
    }
}

// Receives: one block per local expert waits for every unmasked source, lays the blocks out by
// ascending source rank and copies messages into the outputs. Returns false on a timeout.
template <bool kFp8>
__device__ __forceinline__ bool dispatch_recv(const DispatchArgs& a, int warp, int lane) {
    __shared__ int s_count[kMaxRanks];
    __shared__ int s_begin[kMaxRanks + 1];
    __shared__ int s_fail;
    const int r_n = a.num_ranks;
    const int local = a.num_experts / r_n;
    const int rows = r_n * a.max_tokens;
    const int hidden = a.hidden;
    const int groups = hidden / kFp8Block;

    for (int e = blockIdx.x; e < local; e += gridDim.x) {
        if (threadIdx.x == 0) s_fail = 0;
        __syncthreads();
        for (int s = threadIdx.x; s < r_n; s += kThreads) {
            int n = 0;
            if (!rank_masked(a.mask, s, a.rank)) {
                const uint64_t t0 = globaltimer_ns();
                const uint64_t deadline = t0 + a.timeout_ns;
                uint64_t* count_sig = a.recv_count_sig + static_cast<size_t>(e) * r_n + s;
                uint64_t* arrive_sig = a.recv_arrive_sig + static_cast<size_t>(e) * r_n + s;
                uint64_t seen;
                // With agreement on, a refusal anywhere in this buffer ends every wait.
                const int* abort = a.call_tag != 0 ? a.status_claim : nullptr;
                if (!wait_at_least(count_sig, 1, deadline, &seen, abort)) {
                    report_timeout(a.host_status, a.status_claim, kPhaseDispatchRecv, s, e,
                                   kAwaitCount, seen, 1);
                    s_fail = 1;
                } else if (!tags_agree(a.call_tag, static_cast<uint32_t>(seen >> 32))) {
                    // Another call's count (a skipped call, or another signature): none of
                    // this expert's rows are written; the words stay for clean_low_latency_buffer.
                    report_disagree(a.host_status, a.status_claim, kPhaseDispatchRecv, s, e,
                                    static_cast<uint32_t>(seen >> 32), a.call_tag);
                    s_fail = 1;
                } else {
                    n = static_cast<int>(static_cast<uint32_t>(seen)) - 1;
                    if (!wait_at_least(arrive_sig, static_cast<uint64_t>(n), deadline, &seen,
                                       abort)) {
                        report_timeout(a.host_status, a.status_claim, kPhaseDispatchRecv, s, e,
                                       kAwaitArrivals, seen, n);
                        s_fail = 1;
                    } else {
                        // Read once by this thread only: reset for the next call on this half.
                        st_relaxed_sys(count_sig, 0);
                        st_relaxed_sys(arrive_sig, 0);
                        if (a.wait_stats != nullptr)
                            atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_stats + s),
                                      static_cast<unsigned long long>(globaltimer_ns() - t0));
                    }
                }
            }
            s_count[s] = n;
        }
        __syncthreads();
        if (s_fail) return false;
        if (threadIdx.x == 0) {
            int acc = 0;
            for (int s = 0; s < r_n; ++s) {
                s_begin[s] = acc;
                const bool masked = rank_masked(a.mask, s, a.rank);
                // Masked sources: (0, 0), as the reference backend reports them.
                a.range_begin[e * r_n + s] = masked ? 0 : acc;
                a.range_count[e * r_n + s] = s_count[s];
                acc += s_count[s];
            }
            s_begin[r_n] = acc;
            a.recv_count[e] = acc;
            if (a.cum_stats != nullptr) atomicAdd(a.cum_stats + e, acc);
        }
        __syncthreads();
        const int total = s_begin[r_n];
        const size_t expert_row0 = static_cast<size_t>(e) * rows;

        // The expert's rows are copied by the whole block at once, 16-byte word by 16-byte word
        // (a row per warp would leave most warps idle: ~R*T*K/E rows per expert, e.g. 4 of 32),
        // with kUnroll loads in flight per thread before their stores.
        const uint8_t* msgs0 = a.recv_msgs + static_cast<size_t>(e) * r_n * a.max_tokens *
                                                 a.msg_stride;
        const int n16 = kFp8 ? hidden / 16 : hidden / 8;  // payload words of a row
        int4* recv_x = static_cast<int4*>(a.recv_x) + expert_row0 * n16;
        const int words = total * n16;
        constexpr int kUnroll = 4;
        for (int base = threadIdx.x; base < words; base += kThreads * kUnroll) {
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int w = base + u * kThreads;
                if (w < words) {
                    const int idx = w / n16;
                    const int s = find_block(s_begin, r_n, idx);
                    const uint8_t* msg = msgs0 + (static_cast<size_t>(s) * a.max_tokens +
                                                  (idx - s_begin[s])) * a.msg_stride;
                    v[u] = ld_cg(reinterpret_cast<const int4*>(msg + kHeaderBytes) + (w - idx * n16));
                }
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int w = base + u * kThreads;
                if (w < words) recv_x[w] = v[u];
            }
        }
        // Source indices and scales: one element per thread, row index fastest, so the stores
        // into the column-major scales [L, G, R*M] are coalesced.
        for (int idx = threadIdx.x; idx < total; idx += kThreads) {
            const int s = find_block(s_begin, r_n, idx);
            const uint8_t* msg = msgs0 + (static_cast<size_t>(s) * a.max_tokens +
                                          (idx - s_begin[s])) * a.msg_stride;
            a.src_info[expert_row0 + idx] = __ldcg(reinterpret_cast<const int*>(msg));
        }
        if constexpr (kFp8) {
            const int cols = a.ue8m0 ? groups / 4 : groups;
            const int n = total * cols;
            for (int w = threadIdx.x; w < n; w += kThreads) {
                const int j = w / total, idx = w - j * total;
                const int s = find_block(s_begin, r_n, idx);
                const float* scales = reinterpret_cast<const float*>(
                    msgs0 + (static_cast<size_t>(s) * a.max_tokens + (idx - s_begin[s])) *
                                a.msg_stride + kHeaderBytes + hidden);
                const size_t out = (static_cast<size_t>(e) * cols + j) * rows + idx;
                if (!a.ue8m0) {
                    static_cast<float*>(a.recv_scales)[out] = __ldcg(scales + j);
                } else {
                    // Four power-of-two scales -> their exponent bytes, little-endian in an int32.
                    uint32_t packed = 0;
#pragma unroll
                    for (int q = 0; q < 4; ++q)
                        packed |= ((__float_as_uint(__ldcg(scales + 4 * j + q)) >> 23) & 0xffu)
                                  << (8 * q);
                    static_cast<int*>(a.recv_scales)[out] = static_cast<int>(packed);
                }
            }
        }
        for (int row = total + threadIdx.x; row < rows; row += kThreads)
            a.src_info[expert_row0 + row] = -1;
        __syncthreads();  // shared counts are rewritten for the next expert
    }
    return true;
}

// The phases of one launch (a.phases) around the acknowledged reuse of a half: wait for the
// acknowledgements, send(), count the send; recv() (false after a timeout or a refusal: nothing
// is acknowledged), count the receive and acknowledge it. DispatchArgs or CombineArgs.
template <typename Args, typename Send, typename Recv>
__device__ __forceinline__ void run_phases(const Args& a, int send_phase, Send send, Recv recv) {
    const HalfSync sync{a.done_counter, a.progress, a.ack_sig};
    if (a.phases & kSendPhase) {
        if (!wait_acks(sync, a.mask, a.num_ranks, a.rank, a.timeout_ns, a.host_status,
                       a.status_claim, send_phase, a.call_tag != 0))
            return;
        send();
        finish_send(sync);
    }
    if ((a.phases & kRecvPhase) && recv()) finish_recv(sync, a.mask, a.num_ranks, a.rank, a.nvlink);
}

template <bool kFp8>
__device__ __forceinline__ void dispatch(const DispatchArgs& a) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    run_phases(
        a, kPhaseDispatchSend,
        [&] {
            dispatch_send_counts(a, warp, lane);
            dispatch_send_tokens<kFp8>(a, warp, lane);
        },
        [&] { return dispatch_recv<kFp8>(a, warp, lane); });
}

// ===================================================================================== combine
struct CombineArgs {
    const __nv_bfloat16* x;      // [L, R*M, H] expert outputs (user tensor or zero-copy buffer)
    bool zero_copy;              // x is the symmetric combine_send of this half
    const int* src_info;         // [L, R*M]
    const int* range_begin;      // [L, R]
    const int* range_count;      // [L, R]
    const int64_t* topk_idx;     // [T, K]
    const float* topk_weights;   // [T, K]
    __nv_bfloat16* out;          // [T, H]
    int num_tokens, num_topk, hidden, num_experts, num_ranks, rank, max_tokens;
    bool nvlink;
    int phases;
    __nv_bfloat16* send_stage;   // local symmetric [L, R*M, H] (combine_send of this half)
    __nv_bfloat16* recv_rows;    // symmetric [E, M, H] (combine_recv of this half)
    uint64_t* recv_count_sig;    // symmetric [E]
    uint64_t* recv_arrive_sig;   // symmetric [E]
    int* done_counter;           // local int32 [LL_DONE_WORDS] (combine_done of this half)
    const int* mask;
    long long* wait_stats;       // [R] or null
    volatile int* host_status;
    int* status_claim;
    uint64_t timeout_ns;
    int call_tag;                // upper 32 bits of the count words; 0 = agreement off
    uint64_t* progress;          // local uint64 [LL_PROGRESS_WORDS] (combine_progress)
    uint64_t* ack_sig;           // symmetric uint64 [LL_MAX_RANKS] (combine_ack)
};

// Sends expert outputs back: one block per local expert; a warp per row; count words to every
// unmasked source rank (rows + 1), arrivals added after each row.
__device__ __forceinline__ void combine_send(const CombineArgs& a, int warp, int lane) {
    __shared__ int s_count[kMaxRanks];
    __shared__ int s_begin[kMaxRanks];
    __shared__ int s_cum[kMaxRanks + 1];
    const int r_n = a.num_ranks;
    const int local = a.num_experts / r_n;
    const int rows = r_n * a.max_tokens;
    const int hidden = a.hidden;
    const int n16 = hidden / 8;

    for (int e = blockIdx.x; e < local; e += gridDim.x) {
        const int g = a.rank * local + e;
        for (int s = threadIdx.x; s < r_n; s += kThreads) {
            const bool masked = rank_masked(a.mask, s, a.rank);
            s_count[s] = masked ? 0 : a.range_count[e * r_n + s];
            s_begin[s] = a.range_begin[e * r_n + s];
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int acc = 0;
            for (int s = 0; s < r_n; ++s) {
                s_cum[s] = acc;
                acc += s_count[s];
            }
            s_cum[r_n] = acc;
        }
        __syncthreads();
        for (int s = threadIdx.x; s < r_n; s += kThreads) {
            if (rank_masked(a.mask, s, a.rank)) continue;
            signal_set(a.recv_count_sig + g,
                       tagged_count(a.call_tag, static_cast<uint64_t>(s_count[s]) + 1), s,
                       a.nvlink);
        }
        const int total = s_cum[r_n];
        const size_t expert_row0 = static_cast<size_t>(e) * rows;
        // NVLink peers: the block copies all of the expert's rows for them at once, 16-byte word
        // by 16-byte word, kUnroll loads in flight per thread (a row per warp would leave most
        // warps idle: ~R*T*K/E rows per expert). Rows for put peers are skipped here.
        const int words = total * n16;
        constexpr int kUnroll = 4;
        if (a.nvlink) {
            for (int base = threadIdx.x; base < words; base += kThreads * kUnroll) {
                int4 v[kUnroll];
                int4* dst[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int w = base + u * kThreads;
                    dst[u] = nullptr;
                    if (w < words) {
                        const int idx = w / n16;
                        const int s = find_block(s_cum, r_n, idx);
                        const size_t src_row = expert_row0 + s_begin[s] + (idx - s_cum[s]);
                        const int t = __ldg(a.src_info + src_row);
                        const int c = w - idx * n16;
                        int4* p2p = static_cast<int4*>(nvshmem_ptr(
                            a.recv_rows + (static_cast<size_t>(g) * a.max_tokens + t) * hidden, s));
                        if (p2p != nullptr) {
                            dst[u] = p2p + c;
                            v[u] = __ldg(reinterpret_cast<const int4*>(a.x + src_row * hidden) + c);
                        }
                    }
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u)
                    if (dst[u] != nullptr) *dst[u] = v[u];
            }
        }
        // Put peers: a warp per row, the put's signal lands after its data.
        for (int idx = warp; idx < total; idx += kWarps) {
            const int s = find_block(s_cum, r_n, idx);
            if (a.nvlink && nvshmem_ptr(a.recv_rows, s) != nullptr) continue;
            const int row = s_begin[s] + (idx - s_cum[s]);
            const size_t src_row = expert_row0 + row;
            const int t = __ldg(a.src_info + src_row);
            const int4* src = reinterpret_cast<const int4*>(a.x + src_row * hidden);
            __nv_bfloat16* dst_sym = a.recv_rows + (static_cast<size_t>(g) * a.max_tokens + t) * hidden;
            // Puts read from symmetric memory: the zero-copy buffer, or a copy into it.
            const __nv_bfloat16* put_src = a.send_stage + src_row * hidden;
            if (!a.zero_copy) {
                warp_copy(reinterpret_cast<int4*>(a.send_stage + src_row * hidden), src, n16, lane);
                __syncwarp();
            }
            nvshmemx_putmem_signal_nbi_warp(dst_sym, put_src, static_cast<size_t>(hidden) * 2,
                                            a.recv_arrive_sig + g, 1, NVSHMEM_SIGNAL_ADD, s);
        }
        __syncthreads();
        // NVLink peers' arrivals: one release add of the row count per peer after the block's
        // stores (bar.sync orders them before the release; the receiver waits for arrivals ==
        // rows, whether they came as one add or one per row).
        if (a.nvlink) {
            for (int s = threadIdx.x; s < r_n; s += kThreads) {
                if (s_count[s] == 0 || rank_masked(a.mask, s, a.rank)) continue;
                uint64_t* arrive = static_cast<uint64_t*>(nvshmem_ptr(a.recv_arrive_sig + g, s));
                if (arrive != nullptr)
                    red_add_release_sys(arrive, static_cast<uint64_t>(s_count[s]));
            }
        }
        __syncthreads();  // shared tables are rewritten for the next expert
    }
}

// Receives: every block waits until all experts of unmasked ranks have delivered (count word,
// then arrivals), the last block to finish waiting resets the words, then each block reduces
// its tokens: out[t] = sum over distinct experts g of row t: (sum of t's weights for g) * row.
__device__ __forceinline__ bool combine_recv(const CombineArgs& a, int warp, int lane) {
    __shared__ int s_fail, s_last;
    __shared__ float s_weight[kMaxTopk];
    __shared__ const __nv_bfloat16* s_row[kMaxTopk];
    const int r_n = a.num_ranks;
    const int local = a.num_experts / r_n;
    const int hidden = a.hidden;
    const int k_n = a.num_topk;

    if (threadIdx.x == 0) s_fail = 0;
    __syncthreads();
    const uint64_t t0 = globaltimer_ns();
    const uint64_t deadline = t0 + a.timeout_ns;
    for (int g = threadIdx.x; g < a.num_experts; g += kThreads) {
        const int owner = g / local;
        if (rank_masked(a.mask, owner, a.rank)) continue;
        uint64_t seen;
        const int* abort = a.call_tag != 0 ? a.status_claim : nullptr;
        if (!wait_at_least(a.recv_count_sig + g, 1, deadline, &seen, abort)) {
            report_timeout(a.host_status, a.status_claim, kPhaseCombineRecv, owner, g,
                           kAwaitCount, seen, 1);
            s_fail = 1;
            continue;
        }
        if (!tags_agree(a.call_tag, static_cast<uint32_t>(seen >> 32))) {
            report_disagree(a.host_status, a.status_claim, kPhaseCombineRecv, owner, g,
                            static_cast<uint32_t>(seen >> 32), a.call_tag);
            s_fail = 1;
            continue;
        }
        const uint64_t n = static_cast<uint32_t>(seen) - 1ull;
        if (!wait_at_least(a.recv_arrive_sig + g, n, deadline, &seen, abort)) {
            report_timeout(a.host_status, a.status_claim, kPhaseCombineRecv, owner, g,
                           kAwaitArrivals, seen, n);
            s_fail = 1;
            continue;
        }
        if (blockIdx.x == 0 && a.wait_stats != nullptr)
            atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_stats + owner),
                      static_cast<unsigned long long>(globaltimer_ns() - t0));
    }
    __syncthreads();
    if (s_fail) return false;
    if (threadIdx.x == 0) {
        __threadfence();
        s_last = atomicAdd(a.done_counter + kDoneReset, 1) == static_cast<int>(gridDim.x) - 1;
    }
    __syncthreads();
    if (s_last) {
        // Every block has read the words: zero them for the next call on this half.
        for (int g = threadIdx.x; g < a.num_experts; g += kThreads) {
            st_relaxed_sys(a.recv_count_sig + g, 0);
            st_relaxed_sys(a.recv_arrive_sig + g, 0);
        }
        if (threadIdx.x == 0) atomicExch(a.done_counter + kDoneReset, 0);
    }

    for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
        if (threadIdx.x < k_n) {
            const int k = threadIdx.x;
            const int64_t* row = a.topk_idx + static_cast<size_t>(t) * k_n;
            const float* w = a.topk_weights + static_cast<size_t>(t) * k_n;
            const int64_t g = __ldg(row + k);
            bool valid = g >= 0 && g < a.num_experts &&
                         !rank_masked(a.mask, static_cast<int>(g / local), a.rank);
            for (int j = 0; j < k && valid; ++j) valid = __ldg(row + j) != g;
            float weight = 0.0f;
            if (valid)
                for (int j = k; j < k_n; ++j)
                    if (__ldg(row + j) == g) weight += __ldg(w + j);
            s_weight[k] = weight;
            s_row[k] = valid ? a.recv_rows + (static_cast<size_t>(g) * a.max_tokens + t) * hidden
                             : nullptr;
        }
        __syncthreads();
        int4* out_row = reinterpret_cast<int4*>(a.out + static_cast<size_t>(t) * hidden);
        for (int c = threadIdx.x; c < hidden / 8; c += kThreads) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            // kLoads rows' words are loaded before any is used, so their latencies overlap; the
            // sum still runs over k in ascending order (the same rounding as one at a time).
            constexpr int kLoads = 4;  // 8 spills at 64 registers (1024 threads)
            for (int k0 = 0; k0 < k_n; k0 += kLoads) {
                int4 v[kLoads];
#pragma unroll
                for (int u = 0; u < kLoads; ++u) {
                    const int k = k0 + u;
                    const __nv_bfloat16* src = k < k_n ? s_row[k] : nullptr;
                    if (src != nullptr) v[u] = ld_cg(reinterpret_cast<const int4*>(src) + c);
                }
#pragma unroll
                for (int u = 0; u < kLoads; ++u) {
                    const int k = k0 + u;
                    if (k >= k_n || s_row[k] == nullptr) continue;
                    float f[8];
                    bf16x8_to_float(v[u], f);
                    const float w = s_weight[k];
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[j] += w * f[j];
                }
            }
            int4 packed;
            __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
            for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
            out_row[c] = packed;
        }
        __syncthreads();  // the row table is rewritten for the next token
    }
    return true;
}

__device__ __forceinline__ void combine(const CombineArgs& a) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    run_phases(a, kPhaseCombineSend, [&] { combine_send(a, warp, lane); },
               [&] { return combine_recv(a, warp, lane); });
}

}  // namespace ep_ll

// ================================================================================ entry points
// Parameters in the order ep_comm/low_latency.py passes them (pointers as uint64, ints as
// int32, the timeout as uint64). Keep the two in step.
#define EP_LL_DISPATCH_PARAMS                                                                   \
    const __nv_bfloat16 *x, const int64_t *topk_idx, int num_tokens, int num_topk, int hidden,   \
        int num_experts, int num_ranks, int rank, int max_tokens, int round_scale, int ue8m0,     \
        int nvlink, int phases, uint8_t *send_stage, uint8_t *recv_msgs,                         \
        uint64_t *recv_count_sig, uint64_t *recv_arrive_sig, int msg_stride, const int *mask,    \
        void *recv_x, void *recv_scales, int *src_info, int *range_begin, int *range_count,      \
        int *recv_count, int *cum_stats, long long *wait_stats, int *host_status,                \
        int *status_claim, uint64_t timeout_ns, int call_tag, int *done_counter,                 \
        uint64_t *progress, uint64_t *ack_sig

#define EP_LL_DISPATCH_ARGS                                                                     \
    ep_ll::DispatchArgs {                                                                        \
        x, topk_idx, num_tokens, num_topk, hidden, num_experts, num_ranks, rank, max_tokens,     \
            round_scale != 0, ue8m0 != 0, nvlink != 0, phases, send_stage, recv_msgs,            \
            recv_count_sig, recv_arrive_sig, msg_stride, mask, recv_x, recv_scales, src_info,    \
            range_begin, range_count, recv_count, cum_stats, wait_stats, host_status,            \
            status_claim, timeout_ns, call_tag, done_counter, progress, ack_sig                  \
    }

extern "C" __global__ void __launch_bounds__(ep_ll::kThreads, 1)
    ep_ll_dispatch_fp8(EP_LL_DISPATCH_PARAMS) {
    ep_ll::dispatch<true>(EP_LL_DISPATCH_ARGS);
}

extern "C" __global__ void __launch_bounds__(ep_ll::kThreads, 1)
    ep_ll_dispatch_bf16(EP_LL_DISPATCH_PARAMS) {
    ep_ll::dispatch<false>(EP_LL_DISPATCH_ARGS);
}

extern "C" __global__ void __launch_bounds__(ep_ll::kThreads, 1)
    ep_ll_combine(const __nv_bfloat16 *x, int zero_copy, const int *src_info,
                  const int *range_begin, const int *range_count, const int64_t *topk_idx,
                  const float *topk_weights, __nv_bfloat16 *out, int num_tokens, int num_topk,
                  int hidden, int num_experts, int num_ranks, int rank, int max_tokens,
                  int nvlink, int phases, __nv_bfloat16 *send_stage, __nv_bfloat16 *recv_rows,
                  uint64_t *recv_count_sig, uint64_t *recv_arrive_sig, int *done_counter,
                  const int *mask, long long *wait_stats, int *host_status, int *status_claim,
                  uint64_t timeout_ns, int call_tag, uint64_t *progress, uint64_t *ack_sig) {
    ep_ll::combine(ep_ll::CombineArgs{
        x, zero_copy != 0, src_info, range_begin, range_count, topk_idx, topk_weights, out,
        num_tokens, num_topk, hidden, num_experts, num_ranks, rank, max_tokens, nvlink != 0,
        phases, send_stage, recv_rows, recv_count_sig, recv_arrive_sig, done_counter, mask,
        wait_stats, host_status, status_claim, timeout_ns, call_tag, progress, ack_sig});
}
