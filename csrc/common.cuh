// Shared helpers of the kernels: dtype conversions, warp reductions, launches, device guard.
//
// Built two ways: by nvcc for the GPU, and with AUDIOMAE_EMULATE defined as plain C++ whose CUDA
// threads are host threads (emulate.h), so the same kernel code runs and is race-checked on a CPU.
#pragma once

#ifdef AUDIOMAE_EMULATE
#include "emulate.h"
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>

#include "audiomae_cuda.h"

namespace am {

constexpr unsigned kFullMask = 0xffffffffu;

// --- conversions (explicit: the extension builds with __CUDA_NO_HALF_CONVERSIONS__ and friends) ---
__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __host__ __device__ __forceinline__ T from_float(float x);
template <> __host__ __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __host__ __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and widened back: the value a T operand holds (exact for float).
template <typename T> __host__ __device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// --- warp reductions over aligned groups of `width` lanes (a power of two, at most 32) ---
// Every lane of the warp must call these (the shuffles name the full mask).
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
__device__ __forceinline__ float group_max(float v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__host__ __device__ __forceinline__ int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}
__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// Makes `device` current for a launch and restores the caller's device afterwards.
struct DeviceGuard {
  int previous = -1;
  bool changed = false;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous) == cudaSuccess && previous != device) changed = cudaSetDevice(device) == cudaSuccess;
  }
  ~DeviceGuard() {
    if (changed) cudaSetDevice(previous);
  }
};

}  // namespace am

// Launch `kernel` (a function pointer) on `stream`. Under emulation the grid runs on host threads.
#ifdef AUDIOMAE_EMULATE
#define AM_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu::launch((grid), (block), (smem), [&]() { kernel(__VA_ARGS__); })
#else
#define AM_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#endif

// The dynamic shared memory of the block, as bytes.
#ifdef AUDIOMAE_EMULATE
#define AM_DYNAMIC_SMEM(name) unsigned char* name = emu::shared_memory()
#else
#define AM_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
