// get_dispatch_layout on the GPU: which rank each token goes to, and the counts per rank and
// per expert. The reference computation is ep_comm/core/routing.py; this gives the same tensors.
#include "intranode_common.cuh"

// One thread per token. Counts are gathered in shared memory first, so the global atomics are
// one per block and per non-zero counter instead of one per (token, expert). They go to the
// Buffer's scratch, which is zero between calls: the last block to finish copies the totals to
// the outputs and zeroes the scratch again, so the whole layout is this one launch (no zeroing
// kernel before it; the host time and the GPU time of a call are one launch's).
//
// topk_idx: [T, K] int64 global expert ids, -1 = none (ids outside [0, E) are not counted).
// id_check: null, or the Buffer's bad-id record (bad_id_key): the first id outside [-1, E) is
// kept there with atomicMin, for the next notify kernel to refuse the call on every rank (the
// host checks ids only on a shape's first call: reading them costs a synchronisation).
// num_tokens_per_rank: [R] int32 and num_tokens_per_expert: [E] int32 (a token counts once
// per distinct expert of its row), every element written (by the last block).
// scratch: [R + E + 1] int32, zero on entry and on exit: R + E running counts, then the count of
// blocks done. One per Buffer, E and stream (ep_comm/backends/kernels/layout.py): calls that
// share one run one after the other.
// is_token_in_rank: [T, R] bool, every element written.
// Dynamic shared memory: (R + E) * 4 bytes.
extern "C" __global__ void nvl_get_dispatch_layout(const int64_t* __restrict__ topk_idx, int T,
                                                   int K, int E, int R,
                                                   int* __restrict__ num_tokens_per_rank,
                                                   int* __restrict__ num_tokens_per_expert,
                                                   bool* __restrict__ is_token_in_rank,
                                                   unsigned long long* __restrict__ id_check,
                                                   int* __restrict__ scratch) {
    extern __shared__ int smem[];
    int* s_rank = smem;
    int* s_expert = smem + R;
    __shared__ bool s_last;
    for (int i = threadIdx.x; i < R + E; i += blockDim.x) smem[i] = 0;
    __syncthreads();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < T) {
        const int per_rank = E / R;
        unsigned mask = 0;
        const int64_t* row = topk_idx + static_cast<int64_t>(t) * K;
        // The first kUnrolled ids are loaded before any is used: one memory round trip for a
        // row instead of one per id (a runtime-K loop waits for each load in turn).
        constexpr int kUnrolled = 16;
        int64_t ids[kUnrolled];
#pragma unroll
        for (int k = 0; k < kUnrolled; ++k) ids[k] = k < K ? __ldg(row + k) : -1;
        // A token that names one expert in several slots is one row for that expert: count an
        // id only at its first slot (K <= NORMAL_MAX_TOPK, so the scan of earlier slots is
        // short, and for the first kUnrolled slots it stays in registers).
        auto count = [&](int64_t e) {
            if (e >= 0 && e < E) {
                atomicAdd(&s_expert[e], 1);
                mask |= 1u << (static_cast<int>(e) / per_rank);
            }
        };
        auto seen_before = [&](int64_t e, int k) {
            for (int j = 0; j < k && j < kUnrolled; ++j)
                if (ids[j] == e) return true;
            for (int j = kUnrolled; j < k; ++j)
                if (__ldg(row + j) == e) return true;
            return false;
        };
#pragma unroll
        for (int k = 0; k < kUnrolled; ++k)
            if (k < K && !seen_before(ids[k], k)) count(ids[k]);
        for (int k = kUnrolled; k < K; ++k) {
            const int64_t e = __ldg(row + k);
            if (!seen_before(e, k)) count(e);
        }
        if (id_check != nullptr) {  // the first bad id of the row (rows race by atomicMin)
            int bad_k = -1;
            int64_t bad_e = 0;
#pragma unroll
            for (int k = kUnrolled - 1; k >= 0; --k)
                if (k < K && (ids[k] < -1 || ids[k] >= E)) bad_k = k, bad_e = ids[k];
            for (int k = kUnrolled; k < K && bad_k < 0; ++k) {
                const int64_t e = __ldg(row + k);
                if (e < -1 || e >= E) bad_k = k, bad_e = e;
            }
            if (bad_k >= 0) atomicMin(id_check, ep_common::bad_id_key(t, bad_k, bad_e));
        }
        for (int r = 0; r < R; ++r) {
            const bool in = (mask >> r) & 1u;
            is_token_in_rank[static_cast<int64_t>(t) * R + r] = in;
            if (in) atomicAdd(&s_rank[r], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < R + E; i += blockDim.x)
        if (smem[i]) atomicAdd(&scratch[i], smem[i]);
    // This block's adds before its ticket; the block that draws the last ticket sees them all.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        s_last = atomicAdd(reinterpret_cast<unsigned*>(scratch + R + E), 1u) == gridDim.x - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // Read through atomics (L2, where every block added) and leave zeros for the next call.
    for (int i = threadIdx.x; i < R + E; i += blockDim.x) {
        const int total = atomicExch(&scratch[i], 0);
        if (i < R) num_tokens_per_rank[i] = total;
        else num_tokens_per_expert[i - R] = total;
    }
    if (threadIdx.x == 0) scratch[R + E] = 0;
}
