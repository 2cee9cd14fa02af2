// Device primitives shared by every ep_comm kernel family (intranode_common.cuh,
// low_latency_common.cuh): the clock of bounded waits, and loads/stores of words that another
// GPU writes (over NVLink stores or NVSHMEM puts), which need system-scope ordering.
#pragma once

#include <climits>
#include <cstdint>

// Constants shared with the host come from ep_comm/core/constants.py, passed by the run-time
// compiler (ep_comm.runtime.jit) as -DEP_<NAME>=<value>; they are never restated here.
#ifndef EP_FP8_BLOCK
#error "compile through ep_comm.runtime.jit: it defines the EP_* constants of ep_comm.core.constants"
#endif

namespace ep_common {

constexpr unsigned kFullMask = 0xffffffffu;

// Nanoseconds of the GPU's global timer: the deadline of every spin-wait.
__device__ __forceinline__ uint64_t globaltimer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Acquire loads pair with the peer's release store/add: data written before it is visible.
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_relaxed_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void red_add_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Data a peer wrote into this GPU's memory: read through L2 only (L1 is not coherent with it).
__device__ __forceinline__ int4 ld_cg(const int4* p) { return __ldcg(p); }
// Inputs of a kernel that nobody writes while it runs.
__device__ __forceinline__ int4 ld_nc(const int4* p) { return __ldg(p); }

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// A collective call's signature (ep_comm.core.agreement.device_words): sequence number,
// operation, sizes, handle and this rank's input-check result, passed by value as one kernel
// argument (host kind "sig", ep_comm.backends.kernels.args), so the words of a call are fixed
// at its launch, CUDA-graph replays included. The first kCallSigCompared words must be equal
// on every rank; the names of the words live on the host (constants.CALL_SIG_FIELDS).
constexpr int kCallSigWords = EP_CALL_SIG_WORDS;
constexpr int kCallSigCompared = EP_CALL_SIG_COMPARED;
struct CallSig {
    int w[kCallSigWords];
};

// The per-call expert-id check on the device (constants.ID_CHECK_*): the layout kernel keeps the
// first id outside [-1, E) in one uint64 with atomicMin on this key (token, then column, first),
// the next notify kernel reads it into its signature's status words. kNoBadId: none.
constexpr unsigned long long kNoBadId = ~0ull;
__device__ __forceinline__ unsigned long long bad_id_key(int t, int k, int64_t e) {
    const int v = e > INT_MAX ? INT_MAX : e < INT_MIN ? INT_MIN : static_cast<int>(e);
    return (static_cast<unsigned long long>(t) << EP_ID_CHECK_TOKEN_SHIFT) |
           (static_cast<unsigned long long>(k) << EP_ID_CHECK_COL_SHIFT) | static_cast<uint32_t>(v);
}

}  // namespace ep_common
