// Host emulation of the CUDA features the kernels use, for testing them without a GPU.
//
// With AUDIOMAE_EMULATE defined, the .cu files compile as C++20 with g++: every CUDA thread of a block
// is a host thread, blocks run one after another, warp shuffles and __syncwarp are barriers of the 32
// threads of a warp, __syncthreads a barrier of the block, wmma fragments hold whole 16x16 tiles (each
// element of a stored tile written by one lane, as on the GPU). Shared memory is filled with 0xFF
// bytes (NaN) at block start. Built with -fsanitize=thread this finds shared-memory races (a missing
// __syncwarp or __syncthreads), with -fsanitize=address out-of-bounds accesses; divergent barriers
// abort. It checks the kernels' logic, not their speed or the hardware's rounding of expf.
#pragma once

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// --- runtime API subset ---------------------------------------------------------------------------
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulated CUDA: %s\n", what);
  std::abort();
}

inline std::atomic<int> g_last_error{0};
inline std::atomic<int> g_device{0};
inline std::atomic<long> g_granted_smem{0};

inline long env_long(const char* name, long fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atol(v) : fallback;
}

// The per-block opt-in shared memory of the emulated device (an H100's by default).
inline long smem_optin() { return env_long("AM_EMULATE_SMEM_OPTIN", 227L * 1024); }

}  // namespace emu

inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::g_device.load();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  emu::g_device.store(d);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrComputeCapabilityMajor) {
    *v = (int)emu::env_long("AM_EMULATE_CC_MAJOR", 9);  // an H100's by default
    return cudaSuccess;
  }
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = (int)emu::smem_optin();
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > emu::smem_optin()) return cudaErrorInvalidValue;
  emu::g_granted_smem.store(value);
  return cudaSuccess;
}
struct cudaFuncAttributes {
  int binaryVersion, ptxVersion;
};
template <typename K>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K) {
  attr->binaryVersion = attr->ptxVersion = (int)emu::env_long("AM_EMULATE_BINARY_VERSION", 90);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return emu::g_last_error.exchange(0); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    default: return "unknown error (emulated)";
  }
}

// --- 16-bit floating-point types ------------------------------------------------------------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return (float)f;
}
inline __half __float2half_rn(float v) {
  const _Float16 f = (_Float16)v;  // round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = (uint32_t)b.x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {(uint16_t)(u >> 16)};
}

// --- threads, blocks, barriers --------------------------------------------------------------------
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

struct Block {
  explicit Block(unsigned threads, size_t smem_bytes)
      : all((std::ptrdiff_t)threads), xchg(threads / 32), wide(threads / 32), active(threads / 32) {
    for (unsigned w = 0; w < threads / 32; ++w) {
      warps.emplace_back(new std::barrier<>(32));
      active[w].store(32);
    }
    bytes = smem_bytes;
    smem = static_cast<unsigned char*>(::operator new[](smem_bytes ? smem_bytes : 1, std::align_val_t(128)));
    std::memset(smem, 0xFF, smem_bytes);
  }
  ~Block() { ::operator delete[](smem, std::align_val_t(128)); }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::array<uint64_t, 32>> xchg;
  std::vector<std::array<uint32_t, 32 * 8>> wide;  // up to 8 registers per lane (mma.sync operands)
  std::vector<std::atomic<int>> active;
  unsigned char* smem;
  size_t bytes;
};

inline thread_local Block* t_block = nullptr;

inline unsigned char* shared_memory() { return t_block->smem; }

inline void warp_barrier() {
  const unsigned w = threadIdx.x / 32;
  if (t_block->active[w].load() != 32) fail("a warp barrier or shuffle with lanes that have exited");
  t_block->warps[w]->arrive_and_wait();
}

template <class Body>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Body&& body) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x % 32 || block.x > 1024 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    g_last_error.store(cudaErrorInvalidConfiguration);
    return;
  }
  const long granted = g_granted_smem.exchange(0);
  if ((long)smem_bytes > smem_optin() || ((long)smem_bytes > 48 * 1024 && (long)smem_bytes > granted)) {
    g_last_error.store(cudaErrorInvalidValue);  // too much, or more than 48 KB without opting in
    return;
  }
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk(block.x, smem_bytes);
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&blk, &body, t, x, y, z] {
            threadIdx = dim3(t, 0, 0);
            blockIdx = dim3(x, y, z);
            t_block = &blk;
            body();
            blk.active[t / 32].fetch_sub(1);
            blk.warps[t / 32]->arrive_and_drop();
            blk.all.arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
      }
}

}  // namespace emu

inline void __syncthreads() { emu::t_block->all.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask");
  emu::warp_barrier();
}

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu || width != 32) emu::fail("shuffle with a partial mask or width");
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto& slot = emu::t_block->xchg[w];
  std::memcpy(&slot[lane], &v, sizeof(V));
  emu::warp_barrier();
  V r;
  std::memcpy(&r, &slot[(lane ^ (unsigned)lane_mask) & 31u], sizeof(V));
  emu::warp_barrier();
  return r;
}

namespace emu {

// Every lane of the warp publishes n (<= 8) 32-bit registers; returns the warp's table, lane l's
// registers at [8 * l, 8 * l + n). Valid until warp_release(), which every lane calls after reading.
inline const uint32_t* warp_publish(const uint32_t* mine, int n) {
  if (n > 8) fail("more than 8 registers per lane in one exchange");
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto& slot = t_block->wide[w];
  std::memcpy(&slot[8 * lane], mine, 4 * (size_t)n);
  warp_barrier();
  return slot.data();
}
inline void warp_release() { warp_barrier(); }

}  // namespace emu

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }  // the emulator builds with -ffp-contract=off

inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }

// --- wmma: whole-tile fragments -------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles are emulated");
  float v[256];
};

inline float element(__half x) { return __half2float(x); }
inline float element(__nv_bfloat16 x) { return __bfloat162float(x); }

inline void check(const void* p, unsigned ldm, unsigned multiple) {
  if (reinterpret_cast<uintptr_t>(p) % 32) emu::fail("wmma pointer not 256-bit aligned");
  if (ldm % multiple) emu::fail("wmma leading dimension not a multiple of 16 bytes");
}

template <class F>
inline void fill_fragment(F& f, float x) {
  for (float& e : f.v) e = x;
}

template <class T, class L>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check(p, ldm, 8);
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k)
      f.v[m * 16 + k] = element(std::is_same<L, row_major>::value ? p[m * ldm + k] : p[m + k * ldm]);
}

template <class T, class L>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check(p, ldm, 8);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n)
      f.v[k * 16 + n] = element(std::is_same<L, row_major>::value ? p[k * ldm + n] : p[k + n * ldm]);
}

template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[m * 16 + n];
      for (int k = 0; k < 16; ++k) s = std::fma(a.v[m * 16 + k], b.v[k * 16 + n], s);
      out[m * 16 + n] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check(p, ldm, 4);
  for (unsigned e = threadIdx.x % 32; e < 256; e += 32) {  // each element by one lane
    const unsigned m = e / 16, n = e % 16;
    p[layout == mem_row_major ? m * ldm + n : m + n * ldm] = f.v[e];
  }
}

}  // namespace wmma
}  // namespace nvcuda
