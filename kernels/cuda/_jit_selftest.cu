// Tiny kernels that prove the run-time compile, load and launch path of ep_comm/jit.py
// (tests/test_jit.py). No NVSHMEM here: this module must load and run on any GPU setup.
#include <cstdint>

// Overridable through compile_kernels(..., defines={"JIT_SELFTEST_VALUE": n}).
#ifndef JIT_SELFTEST_VALUE
#define JIT_SELFTEST_VALUE 7
#endif

// out[i] = value for i < n: checks pointer and int32 arguments.
extern "C" __global__ void jit_selftest_fill(int* out, int n, int value) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = value;
}

// out[0] = a + b, out[1] = JIT_SELFTEST_VALUE: checks 64-bit arguments and -D defines.
extern "C" __global__ void jit_selftest_add64(int64_t* out, uint64_t a, int64_t b) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        out[0] = static_cast<int64_t>(a) + b;
        out[1] = JIT_SELFTEST_VALUE;
    }
}

// One block; fills n_words ints of dynamic shared memory, then writes them back reversed:
// out[i] = n_words - 1 - i. With n_words > 12288 it needs more than 48 KiB, which only works
// once the launcher has raised the kernel's dynamic shared memory limit.
extern "C" __global__ void jit_selftest_smem(int* out, int n_words) {
    extern __shared__ int smem[];
    for (int i = threadIdx.x; i < n_words; i += blockDim.x)
        smem[i] = i;
    __syncthreads();
    for (int i = threadIdx.x; i < n_words; i += blockDim.x)
        out[i] = smem[n_words - 1 - i];
}
