// Helpers of the low-latency kernels: memory-model primitives, bounded waits that report
// through a host-mapped status word, and the FP8 cast of ep_comm/fp8.py reproduced bit for bit.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "common.cuh"

namespace ep_ll {

using namespace ep_common;

// Channels per FP8 scale; fp8 e4m3fn's largest finite value and the floor on a block's amax
// (ep_comm/core/fp8.py defines the format).
constexpr int kFp8Block = EP_FP8_BLOCK;
constexpr float kFp8Max = EP_FP8_MAX;
constexpr float kAmaxMin = EP_FP8_AMAX_MIN;

// Phase bits of a launch: the send part, the receive part, or both (no hook).
constexpr int kSendPhase = 1;
constexpr int kRecvPhase = 2;

// Host status word (int32[EP_LL_INFO_BAD_ID + 4], host-mapped; report_bad_id below writes the
// last four), written once by the first block that times out:
//   [0] code (0 = fine, 1 = timeout), [1] phase, [2] peer rank, [3] index (expert),
//   [4] what was awaited (kAwait*: a count word, arrivals, a peer's acknowledgement), [5] value
//   seen, [6] value wanted.
// The fields are written before the code, with a system fence between, so a host that sees the
// code sees the fields. ep_comm/backends/kernels/status.py decodes it.
constexpr int kStatusTimeout = EP_STATUS_TIMEOUT;
constexpr int kStatusDisagree = EP_STATUS_DISAGREE;
constexpr int kPhaseDispatchRecv = EP_PHASE_LL_DISPATCH_RECV;
constexpr int kPhaseCombineRecv = EP_PHASE_LL_COMBINE_RECV;
constexpr int kPhaseDispatchSend = EP_PHASE_LL_DISPATCH_SEND;
constexpr int kPhaseCombineSend = EP_PHASE_LL_COMBINE_SEND;
constexpr int kAwaitCount = EP_LL_AWAIT_COUNT;
constexpr int kAwaitArrivals = EP_LL_AWAIT_ARRIVALS;
constexpr int kAwaitAck = EP_LL_AWAIT_ACK;
// Words of a kind's per-half block counters and progress (ep_comm/core/constants.py LL_DONE_*,
// LL_PROGRESS_*; regions.LowLatencyRegions *_done, *_progress).
constexpr int kDoneReset = EP_LL_DONE_RESET;
constexpr int kDoneSend = EP_LL_DONE_SEND;
constexpr int kDoneRecv = EP_LL_DONE_RECV;
constexpr int kProgressSent = EP_LL_PROGRESS_SENT;
constexpr int kProgressReceived = EP_LL_PROGRESS_RECEIVED;

// Spin until *p >= target or the deadline passes. Returns whether the target was reached and
// the last value seen (for the error message). `abort` (the status claim, or null): give up
// early once any block of this buffer has reported (the call is refused: the agreement).
__device__ __forceinline__ bool wait_at_least(const uint64_t* p, uint64_t target,
                                              uint64_t deadline_ns, uint64_t* seen,
                                              const int* abort = nullptr) {
    uint64_t v;
    int spins = 0;
    while ((v = ld_acquire_sys(p)) < target) {
        // The timer is read every few polls only: it is a slow register.
        if ((++spins & 63) == 0 &&
            (globaltimer_ns() > deadline_ns ||
             (abort != nullptr && *static_cast<const volatile int*>(abort) != 0))) {
            *seen = v;
            return false;
        }
    }
    *seen = v;
    return true;
}

// The first caller in the whole buffer claims the status word (device-memory CAS: atomics on
// host memory over PCIe are not reliable), writes the fields, then the code.
__device__ __forceinline__ void report_timeout(volatile int* host_status, int* claim, int phase,
                                               int peer, int index, int what, uint64_t seen,
                                               uint64_t wanted) {
    if (host_status == nullptr || atomicCAS(claim, 0, 1) != 0) return;
    host_status[1] = phase;
    host_status[2] = peer;
    host_status[3] = index;
    host_status[4] = what;
    host_status[5] = static_cast<int>(seen);
    host_status[6] = static_cast<int>(wanted);
    __threadfence_system();
    host_status[0] = kStatusTimeout;
    __threadfence_system();
}

// Call tags (the agreement, ep_comm/core/constants.py LL_TAG_*): a count word is
// (tag << 32) | (rows + 1); tag 0 = agreement off (the word is rows + 1, as without tags).
constexpr int kTagSeqShift = EP_LL_TAG_SEQ_SHIFT;
constexpr uint32_t kTagHashMask = (1u << kTagSeqShift) - 1;

__device__ __forceinline__ uint64_t tagged_count(int tag, uint64_t rows_plus_one) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(tag)) << 32) | rows_plus_one;
}

// Whether a peer's tag agrees with this call's: equal hashes, and equal sequence numbers unless
// either is 0 (a CUDA graph capture). Always true with agreement off (mine == 0).
__device__ __forceinline__ bool tags_agree(int mine, uint32_t theirs) {
    const uint32_t m = static_cast<uint32_t>(mine);
    if (m == 0) return true;
    if ((m & kTagHashMask) != (theirs & kTagHashMask)) return false;
    const uint32_t sm = m >> kTagSeqShift, st = theirs >> kTagSeqShift;
    return sm == 0 || st == 0 || sm == st;
}

// A peer's count word carried another call's tag: [0] STATUS_DISAGREE, [1] phase, [2] peer,
// [3] index (expert), [4] the peer's tag, [5] this rank's (status.py decodes it).
__device__ __forceinline__ void report_disagree(volatile int* host_status, int* claim, int phase,
                                                int peer, int index, uint32_t theirs, int mine) {
    if (host_status == nullptr || atomicCAS(claim, 0, 1) != 0) return;
    host_status[1] = phase;
    host_status[2] = peer;
    host_status[3] = index;
    host_status[4] = static_cast<int>(theirs);
    host_status[5] = mine;
    host_status[6] = 0;
    __threadfence_system();
    host_status[0] = kStatusDisagree;
    __threadfence_system();
}

// A top-k entry outside [-1, num_experts) (the per-call id check; the entry is not sent): the
// first reporter in the buffer (claim[1], device memory) writes token, column and value into
// words [EP_LL_INFO_BAD_ID + 1, + 4) of the host status, then the flag. Not claim[0]: the call
// itself goes on (waits must not give up), the host raises InputError at its next read.
__device__ __forceinline__ void report_bad_id(volatile int* host_status, int* claim, int t,
                                              int k, int64_t e) {
    if (host_status == nullptr || atomicCAS(claim + 1, 0, 1) != 0) return;
    host_status[EP_LL_INFO_BAD_ID + 1] = t;
    host_status[EP_LL_INFO_BAD_ID + 2] = k;
    host_status[EP_LL_INFO_BAD_ID + 3] =
        e > INT_MAX ? INT_MAX : e < INT_MIN ? INT_MIN : static_cast<int>(e);
    __threadfence_system();
    host_status[EP_LL_INFO_BAD_ID] = 1;
    __threadfence_system();
}

__device__ __forceinline__ bool rank_masked(const int* mask, int peer, int me) {
    // A rank never masks itself: its own tokens always go to its own experts.
    return peer != me && mask[peer] != 0;
}

// ---------------------------------------------------------------------------------- FP8 cast
// Per block of 128 channels (ep_comm/fp8.py, each step exact IEEE arithmetic):
//   amax = max(|x|, 1e-4); scale = amax / 448 (correctly rounded division);
//   scale = next power of two >= scale (round_scale); q = e4m3fn(x / scale), nearest-even.
__device__ __forceinline__ float fp8_scale(float amax, bool round_scale) {
    float s = __fdiv_rn(fmaxf(amax, kAmaxMin), kFp8Max);
    if (round_scale) {
        // s > 0 and normal (>= 1e-4 / 448): a power of two has no mantissa bits; any other
        // value goes up to the next exponent.
        uint32_t u = __float_as_uint(s);
        if (u & 0x7fffffu) u = (u & 0x7f800000u) + 0x800000u;
        s = __uint_as_float(u);
    }
    return s;
}

// |x / scale| <= 448 * (1 + 2^-24) by construction, which rounds to 448: saturation never
// changes a value, it only keeps the instruction's contract.
__device__ __forceinline__ uint8_t to_e4m3(float v) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ void bf16x8_to_float(const int4& v, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        float2 p = __bfloat1622float2(h[j]);
        f[2 * j] = p.x;
        f[2 * j + 1] = p.y;
    }
}

// Max over the 16 lanes of a half warp (lanes 0-15 and 16-31 are two 128-channel blocks when
// each lane holds 8 channels). Every lane of the warp must call it.
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
    for (int o = 8; o >= 1; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

__device__ __forceinline__ int warp_sum(int v) { return __reduce_add_sync(kFullMask, v); }

}  // namespace ep_ll
