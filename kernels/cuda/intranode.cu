// Normal-mode kernels over NVLink: notify (count exchange), dispatch (also cached), combine.
//
// Transport. Each rank's NVLink buffer (ep_comm.regions.IntranodeRegions) holds, per channel c
// and source rank s, a ring of S slots that only rank s writes; a tail word (written by s, in
// the receiver's buffer) says how many slots s has published, a head word (written by the
// receiver, in s's buffer) how many it has consumed. Both carry the kernel's tag (a sequence
// number kept on the device, see finish_block) so words of an earlier call are never taken for
// this one and nothing needs resetting between calls (CUDA-graph replays included). The tag
// also carries a hash of the call's row layout (ring_shape, intranode_common.cuh): ranks that
// disagree on it (another hidden in a combine or cached dispatch, which no signature exchange
// checks) never take each other's words instead of reading rows of the wrong size. Every
// numbered kernel also announces its kind and row layout to its peers first, so a rank whose
// peer runs another kernel or layout as the same number (a skipped call, another hidden) sees
// it while it waits and every rank stops at once, naming the difference ("kernel
// announcements", intranode_common.cuh), where it used to wait for its timeout.
// Every ring ends with a handshake: the sender publishes its last tail with the done bit, the
// receiver answers with a head word that has the done bit once it will never touch the ring or
// its tail word again, and the sender waits for that answer. So when a kernel finishes on a
// rank, every peer is finished with the rings that rank writes, and the next kernel may reuse
// them at once.
// A receiver answers only a ring whose sender it has heard from in this kernel (a word with
// this kernel's tag), even a ring that carries no row: the head word it answers in lives in
// the sender's buffer, and the dispatch and the combine use the same one for a pair of ranks.
// A combine receiver that answered an empty ring at its start could overwrite, before the
// sender read it, the answer its own dispatch receiver had just written, which the peer's
// dispatch sender was still to see: that sender then waited in vain (the transformers GPU
// stall of 2026-12-07, two ranks time-sharing one GPU, tiny models whose channels are mostly
// empty).
//
// Roles. A dispatch or combine grid has 2 * C blocks of kThreads: even blocks send on channel
// blockIdx / 2, odd blocks receive. A channel owns a contiguous range of the source's tokens,
// so each ring carries tokens in token order. Tokens a rank keeps are never put in a ring:
// the dispatch sender writes them straight into the outputs, the combine receiver reads them
// straight from its input.
//
// Bounded waits. Every spin loop is done by one thread per warp group and gives up after
// timeout_ns of no progress; it then reports through the host status word (intranode_common.cuh)
// and the group leaves through its barriers, so the kernel always ends.
#include "intranode_common.cuh"

using namespace ep_nvl;

namespace {

// The ring of channel c from source s inside the buffer at `base`.
// Ring (c, s) of a buffer: source s's part of the ring area starts at s * ring_stride, a
// stride fixed for the Buffer (ep_comm.core.regions.IntranodeRegions), whatever the call's
// channels, slots and row size. A sender's first window is written before it hears from the
// receiver in that kernel; that is safe only where it writes nothing but its own rings, which
// its previous kernel drained. With one packed [C, R, S] area a call of another layout (another
// Config or hidden) could place it over another sender's ring that a slow receiver still
// reads (3 or more ranks).
__device__ __forceinline__ char* ring_of(char* base, long long off_ring, long long ring_stride,
                                         int c, int s, int S, long long slot_bytes) {
    return base + off_ring + s * ring_stride + static_cast<long long>(c) * S * slot_bytes;
}

__device__ __forceinline__ uint64_t* word_of(char* base, long long off, int c, int r) {
    return reinterpret_cast<uint64_t*>(base + off) + c * kMaxRanks + r;
}


// Wait (one thread) until the ring has room for n more slots. Returns false on timeout.
// Every wait reports the count it saw as -1 when the word carries another tag (another kernel,
// call or row layout: ep_comm.backends.kernels.status words it so).
__device__ bool wait_for_room(const Waits& k, const uint64_t* head_word, uint32_t tail, int n,
                              int S, unsigned long long timeout_ns, int phase, int peer, int c) {
    const uint64_t deadline = globaltimer_ns() + timeout_ns;
    int spins = 0;
    while (true) {
        const uint64_t w = ld_acquire_sys(head_word);
        const bool ours = word_tag(w) == k.tag;
        const uint32_t head = ours ? word_count(w) : 0u;
        if (tail + n - head <= static_cast<uint32_t>(S)) return true;
        if ((++spins & 63) == 0 &&
            wait_gives_up(k, peer, phase, c, deadline, ours ? static_cast<long long>(head) : -1,
                          tail + n - S))
            return false;
    }
}

// Wait (one thread) for the receiver's final answer on a ring: head == tail with the done bit.
__device__ void wait_for_drain(const Waits& k, const uint64_t* head_word, uint32_t tail,
                               unsigned long long timeout_ns, int phase, int peer, int c) {
    const uint64_t want = make_word(k.tag, tail, true);
    const uint64_t deadline = globaltimer_ns() + timeout_ns;
    int spins = 0;
    uint64_t w;
    while ((w = ld_acquire_sys(head_word)) != want) {
        if ((++spins & 63) == 0 &&
            wait_gives_up(k, peer, phase, c, deadline,
                          word_tag(w) == k.tag ? static_cast<long long>(word_count(w)) : -1,
                          tail))
            return;
    }
}

struct DispatchArgs {
    char* const* peers;
    int rank, R, C, S, window;
    long long off_ctrl, off_tail, off_head, off_ring, ring_stride, slot_bytes;
    int off_payload, off_scales, off_idx, off_w, off_pos;
    const int4* x;
    int row_int4;
    const float* x_scales;
    int num_scales;
    const int64_t* topk_idx;
    const float* topk_weights;
    int K, L;
    const bool* is_token_in_rank;
    int T;
    const int* rank_prefix_matrix;
    int* send_pos;
    int4* recv_x;
    float* recv_scales;
    int64_t* recv_topk_idx;
    float* recv_topk_weights;
    int* recv_src_idx;
    int* recv_src_rank;
    int num_rows;
    const int* num_recv_dev;
    int zero_padding;
    // Expanded layout (ElasticBuffer do_expand; see nvl_dispatch): the flag, the inputs and the
    // outputs that replace recv_x / recv_scales / recv_topk_weights.
    int expand;
    const int* expand_pos;
    const int* expand_base;
    int4* exp_x;
    float* exp_scales;
    float* exp_w;
    int num_exp_rows, expert_alignment, zero_exp_padding;
    int* host_status;
    unsigned long long timeout_ns;
};

__shared__ int s_abort[kMaxRanks];
__shared__ int s_count[kMaxRanks];
__shared__ uint32_t s_tail[kMaxRanks];
__shared__ int s_done[kMaxRanks];
// The running block's kernel identity and report target (Waits), set by one thread at the
// block's start (begin_channel_block, nvl_notify) and passed to the waits by reference: in
// shared memory, so that the kernels' loops keep no register for it.
__shared__ Waits s_waits;

// The start of a dispatch or combine block. Grid 2 * C: block 2c sends channel c, block 2c + 1
// receives it. With one rank there is no ring and one of the two would idle, so both take half
// of the channel's tokens [tb, te); otherwise [tb, te) is the whole channel. The caller zeroes
// its own shared per-rank array first; the barrier here covers it, s_abort and s_waits. shape:
// the kernel's ring_shape, hashed into the tag of every ring word it writes and accepts; what:
// its kernel_what, announced to every peer with the tag (block 0, see "kernel announcements"
// in intranode_common.cuh).
struct ChannelBlock {
    // the kernel's waits (s_waits): its tag (this call's number with the shape of its rows,
    // ring_tag), its kind and row layout (kernel_what), this rank's control words (ctrl[0]:
    // calls so far)
    const Waits& k;
    int c;           // channel
    bool receiver;
    int tb, te;
};

__device__ __forceinline__ ChannelBlock begin_channel_block(char* const* peers, int rank, int R,
                                                            int C, int T, long long off_ctrl,
                                                            int* host_status, uint32_t shape,
                                                            uint32_t what) {
    // One thread computes the tag and the barrier below hands it to the others: with every
    // thread hashing the shape itself, ptxas spilled more in the dispatch kernel (sm_90a).
    if (threadIdx.x == 0) {
        uint32_t* ctrl = ctrl_of(peers[rank], off_ctrl);
        s_waits = make_waits(peers, off_ctrl, rank, R, host_status,
                             ring_tag(*reinterpret_cast<volatile uint32_t*>(ctrl) + 1u, shape),
                             what);
    }
    if (threadIdx.x < kMaxRanks) s_abort[threadIdx.x] = 0;
    __syncthreads();
    ChannelBlock b{s_waits};
    if (blockIdx.x == 0) announce_kernel(b.k);
    b.c = blockIdx.x >> 1;
    b.receiver = (blockIdx.x & 1) != 0;
    const int t0 = channel_begin(T, b.c, C), t1 = channel_begin(T, b.c + 1, C);
    b.tb = t0;
    b.te = t1;
    if (R == 1) (b.receiver ? b.tb : b.te) = t0 + (t1 - t0) / 2;
    return b;
}

// The small fields of one token (fp8 scales, top-k ids and weights), loaded by one warp into
// registers before its payload copy starts, so their round trip overlaps the payload's instead
// of adding one per field. Lane l holds scales l and l + 32 (more than 64 scales, hidden >
// 8192, are copied by a loop after the payload) and top-k entry l (K <= MAX_TOPK <= 32).
// Expanding, lane l also holds pos, the index of the token among its source's tokens routed to
// expert l (expand_pos).
struct SmallFields {
    float s0, s1;
    int64_t idx;
    float w;
    int pos;
};

// From this rank's inputs (token t).
__device__ __forceinline__ SmallFields load_small_input(const DispatchArgs& a, int t, int lane) {
    SmallFields f{0.0f, 0.0f, -1, 0.0f, 0};
    if (a.x_scales != nullptr) {
        const float* s = a.x_scales + static_cast<long long>(t) * a.num_scales;
        if (lane < a.num_scales) f.s0 = __ldg(s + lane);
        if (lane + 32 < a.num_scales) f.s1 = __ldg(s + lane + 32);
    }
    if (a.topk_idx != nullptr && lane < a.K)
        f.idx = __ldg(a.topk_idx + static_cast<long long>(t) * a.K + lane);
    if (a.topk_weights != nullptr && lane < a.K)
        f.w = __ldg(a.topk_weights + static_cast<long long>(t) * a.K + lane);
    if (a.expand && lane < a.K) f.pos = __ldg(a.expand_pos + static_cast<long long>(t) * a.K + lane);
    return f;
}

// Scales of f (and any past the first 64, read from src now) to dst.
template <bool kRemoteSrc>
__device__ __forceinline__ void store_scales(float* dst, const float* src, const SmallFields& f,
                                             int num_scales, int lane) {
    if (lane < num_scales) dst[lane] = f.s0;
    if (lane + 32 < num_scales) dst[lane + 32] = f.s1;
    for (int i = lane + 64; i < num_scales; i += 32) dst[i] = kRemoteSrc ? __ldcg(src + i) : __ldg(src + i);
}

// A token of source s (payload at src, scales at src_scales, small fields f with local expert
// ids) into its expanded rows, one per top-k entry whose expert is here (one warp). Row of entry
// k: expand_base[s, expert] + f.pos (see nvl_notify), so within an expert the rows come by source
// rank, then source token, as the rows of a non-expanded dispatch do. A row past source s's
// block of the expert (expand_base[s + 1, expert]) is dropped: only a token naming an expert
// twice (which the layout counts once) can reach one, and it must not land in another block.
// One row (row_int4 int4 at src) into every row of dst that lane k < K names in my_row (rows
// outside [0, num_rows) are skipped), by one warp. Each piece of the source is loaded into the
// warp's stage once and stored K times: a token with K entries here then costs the round trips
// of one row, where K warp_copy calls would wait K times as long for the same source.
__device__ __forceinline__ void warp_copy_fanout(int4* __restrict__ dst, int row_int4, int my_row,
                                                 int K, int num_rows,
                                                 const int4* __restrict__ src, int lane) {
    int4* stage = warp_stage() + lane;
    for (int piece = 0; piece < row_int4; piece += kStagePerWarp) {
        const int n = row_int4 - piece - lane;  // element u * 32 of this lane's view exists iff u * 32 < n
#pragma unroll
        for (int u = 0; u < kStagePerLane; ++u)
            if (u * 32 < n) cp_async16(stage + u * 32, src + piece + lane + u * 32);
        cp_async_wait_all();  // each lane stores only what it loaded itself: no warp barrier
        for (int k = 0; k < K; ++k) {
            const int row = __shfl_sync(kFullMask, my_row, k);
            if (row < 0 || row >= num_rows) continue;
            int4* d = dst + static_cast<long long>(row) * row_int4 + piece + lane;
#pragma unroll
            for (int u = 0; u < kStagePerLane; ++u)
                if (u * 32 < n) d[u * 32] = stage[u * 32];
        }
    }
}

// A token of source s (payload at src, scales at src_scales, small fields f with local expert
// ids) into its expanded rows, one per top-k entry whose expert is here (one warp). Row of entry
// k: expand_base[s, expert] + f.pos (see nvl_notify), so within an expert the rows come by source
// rank, then source token, as the rows of a non-expanded dispatch do. A row past source s's
// block of the expert (expand_base[s + 1, expert]) is dropped: only a token naming an expert
// twice (which the layout counts once) can reach one, and it must not land in another block.
// Rows past num_exp_rows are dropped too (overflow: notify reported it).
template <bool kRemoteSrc>
__device__ __forceinline__ void put_token_expanded(const DispatchArgs& a, const int4* src,
                                                   const float* src_scales, const SmallFields& f,
                                                   int s, int lane) {
    int my_row = -1;
    if (lane < a.K && f.idx >= 0) {
        const int* base = a.expand_base + s * a.L + static_cast<int>(f.idx);
        const int lo = __ldg(base), hi = __ldg(base + a.L);
        if (f.pos < hi - lo && lo + f.pos < a.num_exp_rows) my_row = lo + f.pos;
    }
    warp_copy_fanout(a.exp_x, a.row_int4, my_row, a.K, a.num_exp_rows, src, lane);
    if (a.exp_w != nullptr && my_row >= 0) a.exp_w[my_row] = f.w;  // lane k: entry k's weight
    if (a.exp_scales == nullptr) return;
    for (int k = 0; k < a.K; ++k) {
        const int row = __shfl_sync(kFullMask, my_row, k);
        if (row < 0) continue;
        store_scales<kRemoteSrc>(a.exp_scales + static_cast<long long>(row) * a.num_scales,
                                 src_scales, f, a.num_scales, lane);
    }
}

// Token t of this rank into a slot of a peer's ring (one warp).
__device__ __forceinline__ void put_token_in_slot(const DispatchArgs& a, char* slot, int row,
                                                  int t, int d, int lane) {
    const SmallFields f = load_small_input(a, t, lane);
    if (lane == 0) *reinterpret_cast<int4*>(slot) = make_int4(row, t, 0, 0);
    warp_copy(reinterpret_cast<int4*>(slot + a.off_payload),
                     a.x + static_cast<long long>(t) * a.row_int4, a.row_int4, lane);
    if (a.x_scales != nullptr)
        store_scales<false>(reinterpret_cast<float*>(slot + a.off_scales),
                            a.x_scales + static_cast<long long>(t) * a.num_scales, f,
                            a.num_scales, lane);
    if (a.topk_idx != nullptr && lane < a.K)
        reinterpret_cast<int*>(slot + a.off_idx)[lane] = to_local(f.idx, d, a.L);
    if (a.topk_weights != nullptr && lane < a.K)
        reinterpret_cast<float*>(slot + a.off_w)[lane] = f.w;
    if (a.expand && lane < a.K) reinterpret_cast<int*>(slot + a.off_pos)[lane] = f.pos;
}

// Token t of this rank straight into this rank's outputs at `row`, or its expanded rows (one
// warp).
__device__ __forceinline__ void put_token_local(const DispatchArgs& a, int row, int t, int lane) {
    SmallFields f = load_small_input(a, t, lane);
    f.idx = to_local(f.idx, a.rank, a.L);
    const int4* src = a.x + static_cast<long long>(t) * a.row_int4;
    const float* src_scales = a.x_scales + static_cast<long long>(t) * a.num_scales;
    if (a.expand) {
        put_token_expanded<false>(a, src, src_scales, f, a.rank, lane);
    } else {
        warp_copy(a.recv_x + static_cast<long long>(row) * a.row_int4, src, a.row_int4, lane);
        if (a.x_scales != nullptr)
            store_scales<false>(a.recv_scales + static_cast<long long>(row) * a.num_scales,
                                src_scales, f, a.num_scales, lane);
    }
    if (a.topk_idx != nullptr && lane < a.K)
        a.recv_topk_idx[static_cast<long long>(row) * a.K + lane] = f.idx;
    if (a.recv_topk_weights != nullptr && lane < a.K)  // null when expanding: exp_w has them
        a.recv_topk_weights[static_cast<long long>(row) * a.K + lane] = f.w;
    if (lane == 0) {
        a.recv_src_idx[row] = t;
        a.recv_src_rank[row] = a.rank;
    }
}

// A slot of ring (c, s) in this rank's buffer into the outputs (one warp). The header, the
// small fields and the first payload loads do not depend on each other: one round trip.
// Which fields travel is decided by this rank's outputs, not its inputs: a rank without tokens
// of its own passes empty (null) x_scales / topk tensors but still receives those fields.
__device__ __forceinline__ void take_token_from_slot(const DispatchArgs& a, const char* slot,
                                                     int s, int lane) {
    const int4 header = ld_cg(reinterpret_cast<const int4*>(slot));
    const float* src_scales = reinterpret_cast<const float*>(slot + a.off_scales);
    const int4* src = reinterpret_cast<const int4*>(slot + a.off_payload);
    SmallFields f{0.0f, 0.0f, -1, 0.0f, 0};
    if (a.recv_scales != nullptr || a.exp_scales != nullptr) {
        if (lane < a.num_scales) f.s0 = __ldcg(src_scales + lane);
        if (lane + 32 < a.num_scales) f.s1 = __ldcg(src_scales + lane + 32);
    }
    if (a.recv_topk_idx != nullptr && lane < a.K)
        f.idx = __ldcg(reinterpret_cast<const int*>(slot + a.off_idx) + lane);
    if ((a.recv_topk_weights != nullptr || a.exp_w != nullptr) && lane < a.K)
        f.w = __ldcg(reinterpret_cast<const float*>(slot + a.off_w) + lane);
    if (a.expand && lane < a.K) f.pos = __ldcg(reinterpret_cast<const int*>(slot + a.off_pos) + lane);
    const int row = header.x;
    if (row < 0 || row >= a.num_rows) return;  // num_worst_tokens overflow: notify reported it
    if (a.expand) {
        put_token_expanded<true>(a, src, src_scales, f, s, lane);
    } else {
        warp_copy(a.recv_x + static_cast<long long>(row) * a.row_int4, src, a.row_int4, lane);
        if (a.recv_scales != nullptr)
            store_scales<true>(a.recv_scales + static_cast<long long>(row) * a.num_scales,
                               src_scales, f, a.num_scales, lane);
    }
    if (a.recv_topk_idx != nullptr && lane < a.K)
        a.recv_topk_idx[static_cast<long long>(row) * a.K + lane] = f.idx;
    if (a.recv_topk_weights != nullptr && lane < a.K)
        a.recv_topk_weights[static_cast<long long>(row) * a.K + lane] = f.w;
    if (lane == 0) {
        a.recv_src_idx[row] = header.y;
        a.recv_src_rank[row] = s;
    }
}

// Sender block of channel c: warp group g sends tokens [t0, t1) of this channel to rank g (its
// own tokens straight into the outputs). Rows in the receiver's output: the receiver's block for
// this rank starts at rank_prefix_matrix[rank - 1, d]; within it, tokens keep their order.
// [t0, t1) is the whole channel, except with one rank (see nvl_dispatch).
__device__ void dispatch_send(const DispatchArgs& a, int c, const Waits& k, int t0, int t1) {
    const uint32_t tag = k.tag;
    const int warp = threadIdx.x >> 5, lane = lane_id();
    const int wpg = kWarps / a.R;
    const int g = warp / wpg;
    if (g >= a.R) return;
    const int d = g, wig = warp % wpg, gthreads = wpg * 32, gtid = threadIdx.x - g * gthreads;
    const int bar_id = 1 + g;

    // Tokens before t0 that go to d: where the rows of [t0, t1) start.
    int cnt = 0;
    for (int t = gtid; t < t0; t += gthreads)
        cnt += a.is_token_in_rank[static_cast<long long>(t) * a.R + d] ? 1 : 0;
    cnt = __reduce_add_sync(kFullMask, cnt);
    if (lane == 0 && cnt) atomicAdd(&s_count[g], cnt);
    group_sync(bar_id, gthreads);
    int sent = s_count[g];
    const int row_base = a.rank == 0 ? 0 : a.rank_prefix_matrix[(a.rank - 1) * a.R + d];

    const bool remote = d != a.rank;
    char* me = a.peers[a.rank];
    char* ring = remote ? ring_of(a.peers[d], a.off_ring, a.ring_stride, c, a.rank, a.S, a.slot_bytes)
                        : nullptr;
    uint64_t* tail_word = remote ? word_of(a.peers[d], a.off_tail, c, a.rank) : nullptr;
    const uint64_t* head_word = word_of(me, a.off_head, c, d);
    uint32_t tail = 0;
    bool aborted = false;
    // Window flags are loaded one window ahead, so their round trip overlaps the copies.
    auto window_flag = [&](int w) {
        return w < t1 && lane < min(a.window, t1 - w) &&
               a.is_token_in_rank[static_cast<long long>(w + lane) * a.R + d];
    };
    bool in_next = window_flag(t0);
    for (int w0 = t0; w0 < t1; w0 += a.window) {
        const int nw = min(a.window, t1 - w0);
        const bool in = in_next;
        in_next = window_flag(w0 + a.window);
        const unsigned mask = __ballot_sync(kFullMask, in);
        const int n = __popc(mask);
        if (a.send_pos != nullptr && wig == 0 && lane < nw)
            a.send_pos[static_cast<long long>(w0 + lane) * a.R + d] =
                in ? row_base + sent + __popc(mask & ((1u << lane) - 1u)) : -1;
        if (n == 0) continue;  // same mask in every warp of the group: uniform
        if (remote) {
            if (gtid == 0 && !wait_for_room(k, head_word, tail, n, a.S, a.timeout_ns,
                                            kPhaseDispatchSend, d, c))
                s_abort[g] = 1;
            group_sync(bar_id, gthreads);
            if (s_abort[g]) {
                aborted = true;
                break;
            }
        }
        unsigned m = mask;
        for (int j = 0; m != 0u; ++j, m &= m - 1u) {
            if (j % wpg != wig) continue;
            const int t = w0 + __ffs(m) - 1;
            const int row = row_base + sent + j;
            if (remote)
                put_token_in_slot(a, ring + static_cast<long long>((tail + j) % a.S) * a.slot_bytes,
                                  row, t, d, lane);
            else if (row < a.num_rows)
                put_token_local(a, row, t, lane);
        }
        sent += n;
        if (remote) {
            __threadfence_system();  // this warp's slot stores before the tail moves
            group_sync(bar_id, gthreads);
            tail += n;
            if (gtid == 0) st_release_sys(tail_word, make_word(tag, tail, false));
        }
    }
    if (remote && !aborted && gtid == 0) {
        st_release_sys(tail_word, make_word(tag, tail, true));
        wait_for_drain(k, head_word, tail, a.timeout_ns, kPhaseDispatchSend, d, c);
    }
}

// Zeroes (receiver block of channel c, all threads) the expanded rows that no token fills: the
// rows of each expert past its received ones up to its aligned end (expand_base[R, e] rounded
// up to expert_alignment: block starts are multiples of it), and the rows past the last
// expert's aligned end (the worst-case rows of a dispatch without CPU sync). No received row is
// among them, so this runs alongside the copies.
__device__ void zero_expanded_padding(const DispatchArgs& a, int c) {
    const int A = a.expert_alignment;
    const int* ends = a.expand_base + a.R * a.L;
    auto zero_rows = [&](long long lo, long long hi, long long first, long long stride) {
        hi = min(hi, static_cast<long long>(a.num_exp_rows));
        for (long long i = lo * a.row_int4 + first; i < hi * a.row_int4; i += stride)
            a.exp_x[i] = make_int4(0, 0, 0, 0);
        if (a.exp_scales != nullptr)
            for (long long i = lo * a.num_scales + first; i < hi * a.num_scales; i += stride)
                a.exp_scales[i] = 0.0f;
        if (a.exp_w != nullptr)
            for (long long i = lo + first; i < hi; i += stride) a.exp_w[i] = 0.0f;
    };
    if (A > 1)  // one block per expert
        for (int e = c; e < a.L; e += a.C) {
            const long long end = __ldg(ends + e);
            zero_rows(end, (end + A - 1) / A * A, threadIdx.x, kThreads);
        }
    const long long last = a.L > 0 ? __ldg(ends + a.L - 1) : 0;
    zero_rows((last + A - 1) / A * A, a.num_exp_rows, static_cast<long long>(c) * kThreads + threadIdx.x,
              static_cast<long long>(a.C) * kThreads);
}

// Receiver block of channel c: warp group g drains ring (c, s) for s = rank + 1 + g (mod R).
__device__ void dispatch_recv(const DispatchArgs& a, int c, const Waits& k) {
    const uint32_t tag = k.tag;
    if (a.zero_padding) {  // num_worst_tokens: rows past the received count are zero
        const long long n_recv = *a.num_recv_dev;
        const long long stride = static_cast<long long>(a.C) * kThreads;
        const long long first = static_cast<long long>(c) * kThreads + threadIdx.x;
        if (a.recv_x != nullptr)
            for (long long i = n_recv * a.row_int4 + first;
                 i < static_cast<long long>(a.num_rows) * a.row_int4; i += stride)
                a.recv_x[i] = make_int4(0, 0, 0, 0);
        if (a.recv_scales != nullptr)
            for (long long i = n_recv * a.num_scales + first;
                 i < static_cast<long long>(a.num_rows) * a.num_scales; i += stride)
                a.recv_scales[i] = 0.0f;
        // The padding rows' ids and weights here too (-1 and 0, as the reference pads them):
        // torch.full on the host would cost one launch per tensor.
        for (long long i = n_recv + first; i < a.num_rows; i += stride) {
            a.recv_src_idx[i] = -1;
            a.recv_src_rank[i] = -1;
        }
        if (a.recv_topk_idx != nullptr)
            for (long long i = n_recv * a.K + first; i < static_cast<long long>(a.num_rows) * a.K;
                 i += stride)
                a.recv_topk_idx[i] = -1;
        if (a.recv_topk_weights != nullptr)
            for (long long i = n_recv * a.K + first; i < static_cast<long long>(a.num_rows) * a.K;
                 i += stride)
                a.recv_topk_weights[i] = 0.0f;
    }
    if (a.zero_exp_padding) zero_expanded_padding(a, c);
    if (a.R == 1) return;
    const int warp = threadIdx.x >> 5, lane = lane_id();
    const int wpg = kWarps / (a.R - 1);
    const int g = warp / wpg;
    if (g >= a.R - 1) return;
    const int s = (a.rank + 1 + g) % a.R;
    const int wig = warp % wpg, gthreads = wpg * 32, gtid = threadIdx.x - g * gthreads;
    const int bar_id = 1 + g;
    char* me = a.peers[a.rank];
    const char* ring = ring_of(me, a.off_ring, a.ring_stride, c, s, a.S, a.slot_bytes);
    const uint64_t* tail_word = word_of(me, a.off_tail, c, s);
    uint64_t* head_word = word_of(a.peers[s], a.off_head, c, a.rank);
    uint32_t head = 0;
    while (true) {
        if (gtid == 0) {
            const uint64_t deadline = globaltimer_ns() + a.timeout_ns;
            int spins = 0;
            uint64_t w;
            while (true) {
                w = ld_acquire_sys(tail_word);
                if (word_tag(w) == tag && (word_count(w) > head || word_done(w))) break;
                if ((++spins & 63) == 0 &&
                    wait_gives_up(k, s, kPhaseDispatchRecv, c, deadline,
                                  word_tag(w) == tag ? static_cast<long long>(word_count(w)) : -1,
                                  head + 1)) {
                    s_abort[g] = 1;
                    break;
                }
            }
            s_tail[g] = word_count(w);
            s_done[g] = word_done(w) ? 1 : 0;
        }
        group_sync(bar_id, gthreads);
        if (s_abort[g]) return;
        const uint32_t tail = s_tail[g];
        const bool done = s_done[g] != 0;
        for (uint32_t j = head + wig; j < tail; j += wpg)
            take_token_from_slot(a, ring + static_cast<long long>(j % a.S) * a.slot_bytes, s, lane);
        group_sync(bar_id, gthreads);  // every slot read before the sender may reuse it
        head = tail;
        if (gtid == 0) st_release_sys(head_word, make_word(tag, head, done));
        if (done) return;
    }
}

}  // namespace

// ------------------------------------------------------------------------------------ notify
namespace {

// Aligned received count of each local expert, then (expand_bases) its block start.
__shared__ int s_expert_start[kMaxLocalExperts];

// expand_base of nvl_notify from the counts rows and the aligned counts in s_expert_start
// (the whole block calls it after writing them). Warp 0 turns the counts into exclusive
// prefixes: lane l sums a contiguous run of experts, a warp scan offsets the runs.
__device__ void expand_bases(const volatile int* counts, int R, int L, int* expand_base) {
    __syncthreads();
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x, run = (L + 31) / 32;
        const int lo = min(L, lane * run), hi = min(L, lo + run);
        int sum = 0;
        for (int e = lo; e < hi; ++e) sum += s_expert_start[e];
        int before = sum;  // inclusive warp scan, then minus own run
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int v = __shfl_up_sync(kFullMask, before, d);
            if (lane >= d) before += v;
        }
        before -= sum;
        for (int e = lo; e < hi; ++e) {
            const int aligned = s_expert_start[e];
            s_expert_start[e] = before;
            before += aligned;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < L; e += blockDim.x) {
        int row = s_expert_start[e];
        for (int s = 0; s < R; ++s) {
            expand_base[s * L + e] = row;
            row += counts[s * kNotifyRow + kRowExperts + e];
        }
        expand_base[R * L + e] = row;
    }
}

}  // namespace

// One block. Writes this rank's counts row (with the call's signature) into every rank's buffer
// (itself included), raises its flag there, waits (bounded) for every rank's flag, compares
// every rank's signature with its own, then computes from the rows:
//   rank_prefix_matrix [R, R] int32: [i, j] = tokens ranks 0..i send to rank j;
//   recv_per_expert [L] int32: tokens this rank receives per local expert;
//   num_tokens_of_rank [R] int32: tokens on each rank (combine splits them into channels);
//   num_recv_dev [1] int32 and host_status[kInfoNumRecv]: tokens this rank receives;
//   expand_base [R + 1, L] int32, or null when the dispatch does not expand: [s, e] = the first
//     expanded row of source s's tokens for local expert e = the expert's block start (exclusive
//     prefix over experts of the received counts, each rounded up to expert_alignment) plus the
//     counts of sources before s; [R, e] = the end of expert e's received rows.
// num_tokens_per_rank: [R] int32, num_tokens_per_expert: [R * L] int32 (this rank's layout).
// id_check: null, or the Buffer's bad-id record written by the layout kernel (bad_id_key): a
//   bad id there becomes this rank's input-check words (unless the host's check set them), so
//   every rank refuses the call naming it; the record is cleared for the next layout.
// sig: this call's signature (CallSig). The signature rides in the counts row, so agreement
// costs no exchange of its own. Every rank receives every row, so when any two ranks differ
// every rank sees a difference, and the same first differing word: every rank refuses the call
// (STATUS_DISAGREE, no outputs, num_recv_dev = -1 so that a dispatch kernel already queued
// behind it moves nothing), with every rank's signature copied to the host.
//
// Flags. Rank s's flag word in this rank's buffer says how far it is: 2 * tag once its row of
// this call is written ("posted"), 2 * tag + 1 once it has read every row ("read", refused calls
// only). A refused call has no dispatch kernel behind it to hold the ranks together, so a
// refusing rank waits for every rank's "read" before it ends: its next call's row cannot
// replace one that a slow peer is still to read. Each wait accepts the value it waits for or
// the one that can follow it before the waiter looks (a fast rank's "read" while a slow one
// waits for "posted"; the next call's "posted" while it waits for "read"); any other value is
// another call (tags that differ: a rank made other kernels) and times out, as it always did.
namespace {

static_assert(kCallSigWords == kCallSigCompared + 4,
              "the signature ends in status, bad_token, bad_col, bad_value (constants.CALL_SIG_FIELDS)");

__shared__ int s_first_word[kMaxRanks];  // first differing compared word of rank p, else kCallSigCompared
__shared__ int s_bad_input[kMaxRanks];   // rank p's status word (1: its input failed a host check)

// Thread 0: the refusal's fields and code. Not claimed through ctrl[2] like report(): the call
// is refused on every rank alike and the runtimes stay in step, so the host clears the word and
// the Buffer stays usable; nothing else runs on this rank while the one notify block does.
__device__ void report_refusal(int* host_status, const uint32_t* ctrl, const CallSig& sig, int R) {
    // An earlier failure (a claimed status word: a timeout, or a finding of another kernel)
    // stands: the host would clear a refusal and keep the Buffer.
    if (*reinterpret_cast<const volatile uint32_t*>(ctrl + 2) != 0u) return;
    int peer = -1, word = kCallSigCompared;
    for (int p = 0; p < R; ++p)
        if (s_first_word[p] < word) word = s_first_word[p], peer = p;
    if (peer < 0) {  // only a bad input: name the first rank whose input failed
        for (int p = 0; p < R && peer < 0; ++p)
            if (s_bad_input[p]) peer = p;
        word = -1;
    }
    volatile int* s = host_status;
    s[1] = kPhaseNotify;
    s[2] = peer;
    s[3] = word;
    // from the host copy of the rows: once every rank has read, the rows may be replaced
    s[4] = word >= 0 ? s[kInfoCallSigs + peer * kCallSigWords + word] : 0;
    s[5] = word >= 0 ? sig.w[word] : 0;
    __threadfence_system();
    s[0] = kStatusDisagree;
    __threadfence_system();
}

// Wait (one thread) until rank p's flag in this rank's buffer is `want` or `want + 1` (see
// "Flags"), or with `or_later` any value from `want` on (the "read" wait: a peer posts a later
// value only once it has read every row of this call); false (reported) after timeout_ns, or
// as soon as rank p announces another kernel as this number or any rank found one
// (wait_gives_up; k: this notify's announcement).
__device__ bool wait_flag(const Waits& k, const uint32_t* flag, uint32_t want,
                          unsigned long long timeout_ns, int p, bool or_later = false) {
    const uint64_t deadline = globaltimer_ns() + timeout_ns;
    int spins = 0;
    uint32_t v;
    while ((v = ld_acquire_sys(flag)) - want > 1u &&
           !(or_later && static_cast<int32_t>(v - want) >= 0)) {
        if ((++spins & 63) == 0 && wait_gives_up(k, p, kPhaseNotify, -1, deadline, v, want))
            return false;
    }
    return true;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256, 1)
nvl_notify(char* const* __restrict__ peers, int rank, int R, int T, int L, int num_worst_tokens,
           const int* __restrict__ num_tokens_per_rank, const int* __restrict__ num_tokens_per_expert,
           long long off_ctrl, long long off_flag, long long off_counts,
           int* __restrict__ rank_prefix_matrix, int* __restrict__ recv_per_expert,
           int* __restrict__ num_tokens_of_rank, int* __restrict__ num_recv_dev,
           int expert_alignment, int* __restrict__ expand_base, int* host_status,
           unsigned long long timeout_ns, CallSig sig, unsigned long long* id_check) {
    char* me = peers[rank];
    uint32_t* ctrl = reinterpret_cast<uint32_t*>(me + off_ctrl);
    const uint32_t tag = *reinterpret_cast<volatile uint32_t*>(ctrl) + 1u;
    // This kernel's announcement (intranode_common.cuh, "kernel announcements"): a notify has
    // no ring rows, its kind alone is announced; the flags below carry the plain number.
    if (threadIdx.x == 0)
        s_waits = make_waits(peers, off_ctrl, rank, R, host_status,
                             ring_tag(tag, ring_shape(kKernelNotify, 0, 0, 0, 0, 0, 0, 0)),
                             kernel_what(kKernelNotify, 0, 0, 0, 0));
    const Waits& k = s_waits;  // announced and read after the barrier below
    __shared__ int aborted, refused;
    // The signature as sent: the host's, with the layout kernel's bad id (id_check) in its
    // input-check words when the host found none. The record is consumed (cleared) here.
    __shared__ int s_sig[kCallSigWords];
    if (threadIdx.x < kCallSigWords) s_sig[threadIdx.x] = sig.w[threadIdx.x];
    __syncthreads();
    announce_kernel(k);
    if (threadIdx.x == 0) {
        aborted = refused = 0;
        const unsigned long long bad = id_check != nullptr ? *id_check : kNoBadId;
        if (bad != kNoBadId) {
            *id_check = kNoBadId;
            if (s_sig[kCallSigCompared] == 0) {
                s_sig[kCallSigCompared] = 1;
                s_sig[kCallSigCompared + 1] = static_cast<int>(bad >> EP_ID_CHECK_TOKEN_SHIFT);
                s_sig[kCallSigCompared + 2] =
                    static_cast<int>((bad >> EP_ID_CHECK_COL_SHIFT) &
                                     ((1ull << (EP_ID_CHECK_TOKEN_SHIFT - EP_ID_CHECK_COL_SHIFT)) - 1));
                s_sig[kCallSigCompared + 3] = static_cast<int>(static_cast<uint32_t>(bad));
            }
        }
    }
    __syncthreads();
    for (int p = 0; p < R; ++p) {
        int* row = reinterpret_cast<int*>(peers[p] + off_counts) + rank * kNotifyRow;
        if (threadIdx.x == 0) row[0] = T;
        if (threadIdx.x < kCallSigWords) row[kRowSig + threadIdx.x] = s_sig[threadIdx.x];
        if (threadIdx.x < R) row[kRowRanks + threadIdx.x] = num_tokens_per_rank[threadIdx.x];
        for (int e = threadIdx.x; e < L; e += blockDim.x)
            row[kRowExperts + e] = num_tokens_per_expert[p * L + e];
    }
    __threadfence_system();  // each thread's row stores before the flags
    __syncthreads();
    const uint32_t posted = 2u * tag, read_all = posted + 1u;  // see "Flags" above
    if (threadIdx.x < R)
        st_release_sys(reinterpret_cast<uint32_t*>(peers[threadIdx.x] + off_flag) + rank, posted);
    if (threadIdx.x < R &&
        !wait_flag(k, reinterpret_cast<const uint32_t*>(me + off_flag) + threadIdx.x, posted,
                   timeout_ns, threadIdx.x))
        aborted = 1;
    __syncthreads();
    if (aborted) {
        // No counts: a dispatch or combine queued behind this call (num_worst_tokens: the host
        // does not wait) must move nothing and take no number, as behind a refusal.
        if (threadIdx.x == 0) *num_recv_dev = -1;
        finish_block(ctrl);
        return;
    }
    const volatile int* counts = reinterpret_cast<const volatile int*>(me + off_counts);
    // Agreement: thread p compares rank p's signature with this call's.
    if (threadIdx.x < R) {
        const volatile int* theirs = counts + threadIdx.x * kNotifyRow + kRowSig;
        int first = kCallSigCompared;
        for (int w = kCallSigCompared - 1; w >= 0; --w)
            if (theirs[w] != sig.w[w]) first = w;
        s_first_word[threadIdx.x] = first;
        s_bad_input[threadIdx.x] = theirs[kCallSigCompared] != 0;
        if (first < kCallSigCompared || s_bad_input[threadIdx.x]) refused = 1;
    }
    __syncthreads();
    if (refused) {
        // Every rank's signature to the host first (the error names each value and its ranks),
        // then the fields and the code.
        for (int i = threadIdx.x; i < R * kCallSigWords; i += blockDim.x)
            reinterpret_cast<volatile int*>(host_status)[kInfoCallSigs + i] =
                counts[(i / kCallSigWords) * kNotifyRow + kRowSig + i % kCallSigWords];
        if (threadIdx.x == 0) *num_recv_dev = -1;
        __threadfence_system();
        __syncthreads();  // every row read by this block: say so, then wait for the others
        if (threadIdx.x < R)
            st_release_sys(reinterpret_cast<uint32_t*>(peers[threadIdx.x] + off_flag) + rank,
                           read_all);
        if (threadIdx.x < R &&
            !wait_flag(k, reinterpret_cast<const uint32_t*>(me + off_flag) + threadIdx.x,
                       read_all, timeout_ns, threadIdx.x, true))
            aborted = 1;
        __syncthreads();
        // A peer that never confirmed is a timeout (reported, the Buffer fails); else the
        // refusal, which leaves the Buffer usable.
        if (threadIdx.x == 0 && !aborted) report_refusal(host_status, ctrl, sig, R);
        finish_block(ctrl);
        return;
    }
    if (threadIdx.x < R) {
        const int j = threadIdx.x;
        int acc = 0;
        for (int i = 0; i < R; ++i) {
            acc += counts[i * kNotifyRow + kRowRanks + j];
            rank_prefix_matrix[i * R + j] = acc;
        }
        num_tokens_of_rank[j] = counts[j * kNotifyRow];
    }
    for (int e = threadIdx.x; e < L; e += blockDim.x) {
        int acc = 0;
        for (int s = 0; s < R; ++s) acc += counts[s * kNotifyRow + kRowExperts + e];
        recv_per_expert[e] = acc;
        reinterpret_cast<volatile int*>(host_status)[kInfoExpertCounts + e] = acc;
        s_expert_start[e] = (acc + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
    if (expand_base != nullptr) expand_bases(counts, R, L, expand_base);
    if (threadIdx.x == 0) {
        int n = 0;
        for (int s = 0; s < R; ++s) n += counts[s * kNotifyRow + kRowRanks + rank];
        *num_recv_dev = n;
        reinterpret_cast<volatile int*>(host_status)[kInfoNumRecv] = n;
        __threadfence_system();
        if (num_worst_tokens > 0 && n > num_worst_tokens)
            report(host_status, ctrl, kStatusOverflow, kPhaseNotify, -1, -1, n,
                   num_worst_tokens);
    }
    finish_block(ctrl);
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
nvl_dispatch(char* const* __restrict__ peers, int rank, int R, int C, int S, int window,
             long long off_ctrl, long long off_tail, long long off_head, long long off_ring,
             long long ring_stride, long long slot_bytes, int off_payload, int off_scales,
             int off_idx, int off_w, int off_pos,
             const int4* __restrict__ x, int row_int4, const float* __restrict__ x_scales,
             int num_scales, const int64_t* __restrict__ topk_idx,
             const float* __restrict__ topk_weights, int K, int L,
             const bool* __restrict__ is_token_in_rank, int T,
             const int* __restrict__ rank_prefix_matrix, int* __restrict__ send_pos,
             int4* __restrict__ recv_x, float* __restrict__ recv_scales,
             int64_t* __restrict__ recv_topk_idx, float* __restrict__ recv_topk_weights,
             int* __restrict__ recv_src_idx, int* __restrict__ recv_src_rank, int num_rows,
             const int* __restrict__ num_recv_dev, int zero_padding, int expand,
             const int* __restrict__ expand_pos, const int* __restrict__ expand_base,
             int4* __restrict__ exp_x, float* __restrict__ exp_scales, float* __restrict__ exp_w,
             int num_exp_rows, int expert_alignment, int zero_exp_padding, int* host_status,
             unsigned long long timeout_ns) {
    const DispatchArgs a{peers, rank, R, C, S, window, off_ctrl, off_tail, off_head, off_ring,
                         ring_stride, slot_bytes, off_payload, off_scales, off_idx, off_w,
                         off_pos, x,
                         row_int4, x_scales, num_scales, topk_idx, topk_weights, K, L,
                         is_token_in_rank, T, rank_prefix_matrix, send_pos, recv_x, recv_scales,
                         recv_topk_idx, recv_topk_weights, recv_src_idx, recv_src_rank, num_rows,
                         num_recv_dev, zero_padding, expand, expand_pos, expand_base, exp_x,
                         exp_scales, exp_w, num_exp_rows, expert_alignment, zero_exp_padding,
                         host_status, timeout_ns};
    if (threadIdx.x < kMaxRanks) s_count[threadIdx.x] = 0;
    // Everything a receiver's reading of a slot depends on; the pointers are not (null on a
    // rank without tokens).
    // The notify kernel refused this call (on every rank): move nothing, and take no kernel
    // number either (no finish_block), as the internode kernels do. A dispatch queued behind a
    // refused notify (num_worst_tokens: the host does not wait for the notify) would otherwise
    // number itself where a refusal without num_worst_tokens launches no dispatch, and a fast
    // rank's next notify would post a flag its slower peer, still waiting for the refused
    // call's "read" flag, takes for another call (a timeout instead of the refusal).
    if (*reinterpret_cast<const volatile int*>(num_recv_dev) < 0) return;
    const ChannelBlock b = begin_channel_block(
        peers, rank, R, C, T, off_ctrl,
        host_status, ring_shape(kKernelDispatch, row_int4, num_scales, K, L, expand, C, S),
        kernel_what(kKernelDispatch, row_int4, K, num_scales, expand));
    // One rank: the receiver block writes the padding rows only (after every copied row), then
    // copies its half of the channel like the sender. One call site each: inlined once.
    if (b.receiver) dispatch_recv(a, b.c, b.k);
    if (!b.receiver || R == 1) dispatch_send(a, b.c, b.k, b.tb, b.te);
    finish_block(b.k.ctrl);
}

// ----------------------------------------------------------------------------------- combine
namespace {

__shared__ int s_lo[kMaxRanks];
__shared__ int s_hi[kMaxRanks];
__shared__ uint32_t s_k[kMaxRanks];

// First index i in [lo, hi) with v[i] >= key (v ascending there), else hi.
__device__ __forceinline__ int lower_bound(const int* v, int lo, int hi, int key) {
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (v[mid] < key) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// The combine reduction stages kReduceBatch sources x kReduceChunks int4 per lane per round
// trip (kStagePerLane in all) and keeps kReduceChunks x 8 float accumulators in registers.
// 4 x 4: a bf16 row of hidden 7168 with up to 4 sources (2 ranks and 2 biases) in 7 round
// trips, where a register-held reduction needed 14 (4 chunks of accumulators and 2 sources of
// loads spilled: 80 registers per thread).
constexpr int kReduceChunks = 4;
constexpr int kReduceBatch = kStagePerLane / kReduceChunks;

// Sum of row chunks [base, base + 32 * kReduceChunks) of the nsrc sources, for this lane:
// each element gets 0 + src[0] + src[1] + ... in float32, in source order, whatever the batches.
__device__ __forceinline__ void reduce_chunks(float (&acc)[kReduceChunks][8],
                                              const int4* const* src, int nsrc, int base, int n,
                                              int lane) {
    int4* stage = warp_stage();
#pragma unroll
    for (int u = 0; u < kReduceChunks; ++u)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[u][e] = 0.0f;
    for (int q0 = 0; q0 < nsrc; q0 += kReduceBatch) {
#pragma unroll
        for (int b = 0; b < kReduceBatch; ++b) {
            if (q0 + b >= nsrc) break;
            const int4* p = src[q0 + b];
#pragma unroll
            for (int u = 0; u < kReduceChunks; ++u) {
                const int i = base + u * 32 + lane;
                if (i < n) cp_async16(stage + (b * kReduceChunks + u) * 32 + lane, p + i);
            }
        }
        cp_async_wait_all();
#pragma unroll
        for (int b = 0; b < kReduceBatch; ++b) {
            if (q0 + b >= nsrc) break;
#pragma unroll
            for (int u = 0; u < kReduceChunks; ++u)
                if (base + u * 32 + lane < n)
                    add_bf16x8(acc[u], stage[(b * kReduceChunks + u) * 32 + lane]);
        }
    }
}

struct CombineArgs {
    char* const* peers;
    int rank, R, C, S, window;
    long long off_ctrl, off_tail, off_head, off_ring, ring_stride, slot_bytes;
    int off_payload, off_w;
    const int4* x;
    int row_int4;
    const float* topk_w;
    int K;
    const int* recv_src_idx;
    const int* rank_prefix_matrix;
    const int* num_tokens_of_rank;
    const bool* is_token_in_rank;
    const int* send_pos;
    int T;
    const int4* bias0;
    const int4* bias1;
    int4* out;
    float* out_w;
    int* host_status;
    unsigned long long timeout_ns;
};

// Sender block of channel c: warp group g sends back, to d = rank + 1 + g (mod R), the rows
// this rank received from d whose source token lies in d's channel c, in row order (which is
// d's token order).
__device__ void combine_send(const CombineArgs& a, int c, const Waits& k) {
    const uint32_t tag = k.tag;
    if (a.R == 1) return;
    const int warp = threadIdx.x >> 5, lane = lane_id();
    const int wpg = kWarps / (a.R - 1);
    const int g = warp / wpg;
    if (g >= a.R - 1) return;
    const int d = (a.rank + 1 + g) % a.R;
    const int wig = warp % wpg, gthreads = wpg * 32, gtid = threadIdx.x - g * gthreads;
    const int bar_id = 1 + g;
    if (gtid == 0) {
        const int lo = d == 0 ? 0 : a.rank_prefix_matrix[(d - 1) * a.R + a.rank];
        const int hi = a.rank_prefix_matrix[d * a.R + a.rank];
        const int td = a.num_tokens_of_rank[d];
        s_lo[g] = lower_bound(a.recv_src_idx, lo, hi, channel_begin(td, c, a.C));
        s_hi[g] = lower_bound(a.recv_src_idx, lo, hi, channel_begin(td, c + 1, a.C));
    }
    group_sync(bar_id, gthreads);
    const int r0 = s_lo[g], r1 = s_hi[g];
    char* me = a.peers[a.rank];
    char* ring = ring_of(a.peers[d], a.off_ring, a.ring_stride, c, a.rank, a.S, a.slot_bytes);
    uint64_t* tail_word = word_of(a.peers[d], a.off_tail, c, a.rank);
    const uint64_t* head_word = word_of(me, a.off_head, c, d);
    uint32_t tail = 0;
    bool aborted = false;
    for (int r = r0; r < r1; r += a.window) {
        const int n = min(a.window, r1 - r);
        if (gtid == 0 && !wait_for_room(k, head_word, tail, n, a.S, a.timeout_ns,
                                        kPhaseCombineSend, d, c))
            s_abort[g] = 1;
        group_sync(bar_id, gthreads);
        if (s_abort[g]) {
            aborted = true;
            break;
        }
        for (int j = wig; j < n; j += wpg) {
            char* slot = ring + static_cast<long long>((tail + j) % a.S) * a.slot_bytes;
            warp_copy(reinterpret_cast<int4*>(slot + a.off_payload),
                             a.x + static_cast<long long>(r + j) * a.row_int4, a.row_int4, lane);
            if (a.topk_w != nullptr && lane < a.K)
                reinterpret_cast<float*>(slot + a.off_w)[lane] =
                    __ldg(a.topk_w + static_cast<long long>(r + j) * a.K + lane);
        }
        __threadfence_system();
        group_sync(bar_id, gthreads);
        tail += n;
        if (gtid == 0) st_release_sys(tail_word, make_word(tag, tail, false));
    }
    if (!aborted && gtid == 0) {
        st_release_sys(tail_word, make_word(tag, tail, true));
        wait_for_drain(k, head_word, tail, a.timeout_ns, kPhaseCombineSend, d, c);
    }
}

// Receiver block of channel c: reduces this rank's tokens [t0, t1) of channel c (the whole
// channel, except with one rank: see nvl_combine), a window at a time.
// For token t the contributions are, in rank order, its row on each rank that received it
// (this rank's own row read from x at send_pos[t, rank], the others from the rings), summed in
// float32 from 0, then the biases; the same order as the reference backend.
__device__ void combine_recv(const CombineArgs& a, int c, const Waits& k, int t0, int t1) {
    const uint32_t tag = k.tag;
    const int warp = threadIdx.x >> 5, lane = lane_id();
    char* me = a.peers[a.rank];
    bool aborted = false;
    for (int w0 = t0; w0 < t1; w0 += a.window) {
        const int nw = min(a.window, t1 - w0);
        unsigned masks[kMaxRanks];
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r)
            masks[r] = __ballot_sync(kFullMask, r < a.R && lane < nw &&
                                     a.is_token_in_rank[static_cast<long long>(w0 + lane) * a.R + r]);
        // Row of token w0 + lane in this rank's own received rows (-1 if none), loaded with the
        // masks so a token's reduction does not wait for it (a window is at most 32 tokens).
        const int own_row_of_lane =
            lane < nw ? __ldg(a.send_pos + static_cast<long long>(w0 + lane) * a.R + a.rank) : -1;
        if (threadIdx.x == 0) {
            for (int r = 0; r < a.R && !s_abort[0]; ++r) {
                const int n = __popc(masks[r]);
                if (r == a.rank || n == 0) continue;
                const uint32_t need = s_k[r] + n;
                const uint64_t* tail_word = word_of(me, a.off_tail, c, r);
                const uint64_t deadline = globaltimer_ns() + a.timeout_ns;
                int spins = 0;
                uint64_t w;
                while (!(word_tag(w = ld_acquire_sys(tail_word)) == tag && word_count(w) >= need)) {
                    if ((++spins & 63) == 0 &&
                        wait_gives_up(k, r, kPhaseCombineRecv, c, deadline,
                                      word_tag(w) == tag ? static_cast<long long>(word_count(w))
                                                         : -1,
                                      need)) {
                        s_abort[0] = 1;
                        break;
                    }
                }
            }
        }
        __syncthreads();
        if (s_abort[0]) {
            aborted = true;
            break;
        }
        for (int j = warp; j < nw; j += kWarps) {
            const int t = w0 + j;
            const long long own_row = __shfl_sync(kFullMask, own_row_of_lane, j);
            const int4* src[kMaxRanks + 2];  // rows in rank order, then the biases
            const float* src_w[kMaxRanks];
            int ns = 0;
#pragma unroll
            for (int r = 0; r < kMaxRanks; ++r) {
                if (r >= a.R || !((masks[r] >> j) & 1u)) continue;
                if (r == a.rank) {
                    src[ns] = a.x + own_row * a.row_int4;
                    src_w[ns] = a.topk_w != nullptr ? a.topk_w + own_row * a.K : nullptr;
                } else {
                    const uint32_t k = s_k[r] + __popc(masks[r] & ((1u << j) - 1u));
                    const char* slot = ring_of(me, a.off_ring, a.ring_stride, c, r, a.S, a.slot_bytes) +
                                       static_cast<long long>(k % a.S) * a.slot_bytes;
                    src[ns] = reinterpret_cast<const int4*>(slot + a.off_payload);
                    src_w[ns] = reinterpret_cast<const float*>(slot + a.off_w);
                }
                ++ns;
            }
            const long long out_row = static_cast<long long>(t) * a.row_int4;
            int nsrc = ns;
            if (a.bias0 != nullptr) src[nsrc++] = a.bias0 + out_row;
            if (a.bias1 != nullptr) src[nsrc++] = a.bias1 + out_row;
            for (int base = 0; base < a.row_int4; base += 32 * kReduceChunks) {
                float acc[kReduceChunks][8];
                reduce_chunks(acc, src, nsrc, base, a.row_int4, lane);
#pragma unroll
                for (int u = 0; u < kReduceChunks; ++u) {
                    const int i = base + u * 32 + lane;
                    if (i < a.row_int4) a.out[out_row + i] = pack_bf16x8(acc[u]);
                }
            }
            if (a.out_w != nullptr && lane < a.K) {
                float acc = 0.0f;
#pragma unroll
                for (int q = 0; q < kMaxRanks; ++q)
                    if (q < ns) acc += __ldcg(src_w[q] + lane);
                a.out_w[static_cast<long long>(t) * a.K + lane] = acc;
            }
        }
        __syncthreads();  // every slot of the window read before the heads move
        if (threadIdx.x == 0) {
            for (int r = 0; r < a.R; ++r) {
                const int n = __popc(masks[r]);
                if (r == a.rank || n == 0) continue;
                s_k[r] += n;
                st_release_sys(word_of(a.peers[r], a.off_head, c, a.rank), make_word(tag, s_k[r], false));
            }
        }
        __syncthreads();  // s_k of the next window
    }
    if (!aborted && threadIdx.x == 0)
        for (int r = 0; r < a.R; ++r) {
            if (r == a.rank) continue;
            // Hear this kernel's last tail from r (its done bit) before the answer: r's
            // previous kernel has then seen whatever this rank answered it in the same word
            // (see the top of this file). Every sender publishes its done tail, rows or not.
            const uint64_t* tail_word = word_of(me, a.off_tail, c, r);
            const uint64_t deadline = globaltimer_ns() + a.timeout_ns;
            int spins = 0;
            uint64_t w;
            bool heard = true;
            while (!(word_tag(w = ld_acquire_sys(tail_word)) == tag && word_done(w))) {
                if ((++spins & 63) == 0 &&
                    wait_gives_up(k, r, kPhaseCombineRecv, c, deadline,
                                  word_tag(w) == tag ? static_cast<long long>(word_count(w)) : -1,
                                  s_k[r])) {
                    heard = false;
                    break;
                }
            }
            if (!heard) break;
            st_release_sys(word_of(a.peers[r], a.off_head, c, a.rank), make_word(tag, s_k[r], true));
        }
}

}  // namespace

// Grid 2 * C blocks of kThreads. Shapes (N rows received by this rank in the dispatch, T tokens
// of this rank):
//   x: [N, row_int4] bf16 rows as int4, topk_w: [N, K] float32 or null,
//   recv_src_idx: [N] int32, rank_prefix_matrix: [R, R], num_tokens_of_rank: [R],
//   is_token_in_rank / send_pos: [T, R], bias0 / bias1: [T, row_int4] or null,
//   out: [T, row_int4] bf16, out_w: [T, K] float32 or null,
//   num_recv_dev: [1] int32, the dispatch's received rows (-1: its notify refused the call).
extern "C" __global__ void __launch_bounds__(kThreads, 1)
nvl_combine(char* const* __restrict__ peers, int rank, int R, int C, int S, int window,
            long long off_ctrl, long long off_tail, long long off_head, long long off_ring,
            long long ring_stride, long long slot_bytes, int off_payload, int off_w,
            const int4* __restrict__ x,
            int row_int4, const float* __restrict__ topk_w, int K,
            const int* __restrict__ recv_src_idx, const int* __restrict__ rank_prefix_matrix,
            const int* __restrict__ num_tokens_of_rank, const bool* __restrict__ is_token_in_rank,
            const int* __restrict__ send_pos, int T, const int4* __restrict__ bias0,
            const int4* __restrict__ bias1, int4* __restrict__ out, float* __restrict__ out_w,
            const int* __restrict__ num_recv_dev, int* host_status,
            unsigned long long timeout_ns) {
    // The dispatch of this handle was refused by its notify kernel (on every rank; with
    // num_worst_tokens the host learns it only at its next call, and may have queued this
    // combine already): its routes were never written, so read none of them, and take no
    // kernel number, as the refused dispatch took none.
    if (*reinterpret_cast<const volatile int*>(num_recv_dev) < 0) return;
    const CombineArgs a{peers, rank, R, C, S, window, off_ctrl, off_tail, off_head, off_ring,
                        ring_stride, slot_bytes, off_payload, off_w, x, row_int4, topk_w, K,
                        recv_src_idx,
                        rank_prefix_matrix, num_tokens_of_rank, is_token_in_rank, send_pos, T,
                        bias0, bias1, out, out_w, host_status, timeout_ns};
    if (threadIdx.x < kMaxRanks) s_k[threadIdx.x] = 0;
    // A combine slot holds a row and K weights: no scales, experts or expanded rows.
    const ChannelBlock b =
        begin_channel_block(peers, rank, R, C, T, off_ctrl, host_status,
                            ring_shape(kKernelCombine, row_int4, 0, K, 0, 0, C, S),
                            kernel_what(kKernelCombine, row_int4, K, 0, 0));
    // One rank: nothing to send; both blocks reduce, each its half of the channel (no ring is
    // read, so the halves need no coordination).
    if (b.receiver || R == 1)
        combine_recv(a, b.c, b.k, b.tb, b.te);
    else
        combine_send(a, b.c, b.k);
    finish_block(b.k.ctrl);
}
