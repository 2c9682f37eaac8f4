// Warp-level tensor-core primitives with register fragments: mma.sync m16n8k16 (16-bit inputs,
// float32 accumulators) and movmatrix (8x8 transpose of 16-bit elements), sm_80 and later.
//
// Fragments (lane = 4 * g + t, g = lane / 4, t = lane % 4), every register two 16-bit elements:
//   Tile16 (a 16 x 16 tile, the A operand): r[0] = (row g,     cols 2t, 2t+1)
//                                          r[1] = (row g + 8, cols 2t, 2t+1)
//                                          r[2] = (row g,     cols 2t+8, 2t+9)
//                                          r[3] = (row g + 8, cols 2t+8, 2t+9)
//   B operand (16 x 8, k x n): b0 = (k = 2t, 2t+1; n = g), b1 = (k = 2t+8, 2t+9; n = g)
//   accumulator (16 x 8 float32): c[0], c[1] = (row g, cols 2t, 2t+1); c[2], c[3] = (row g + 8, same)
// Each register of a Tile16 is the fragment of one 8 x 8 block (row g, cols 2t, 2t+1 of the block),
// which is what movmatrix transposes.
//
// movmatrix needs PTX ISA 7.8 (CUDA 11.8, the oldest toolkit of the torch versions the package
// supports). Under AUDIOMAE_EMULATE (emulate.h) the lanes exchange their registers through the
// warp's table and each lane computes its own outputs, summing products in k order in float32.
#pragma once

#include "common.cuh"

namespace am {

struct Tile16 {
  uint32_t r[4];
};

// --- 16-bit bit patterns --------------------------------------------------------------------------
__device__ __forceinline__ uint16_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint16_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
template <typename T> __device__ __forceinline__ T from_bits16(uint16_t b);
template <> __device__ __forceinline__ __half from_bits16<__half>(uint16_t b) { return __ushort_as_half(b); }
template <> __device__ __forceinline__ __nv_bfloat16 from_bits16<__nv_bfloat16>(uint16_t b) {
  return __ushort_as_bfloat16(b);
}

// Two floats rounded to T in one register (lo in the low half: the lower column).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return (uint32_t)bits16(from_float<T>(lo)) | ((uint32_t)bits16(from_float<T>(hi)) << 16);
}
template <typename T> __device__ __forceinline__ float lo_of(uint32_t r) {
  return to_float(from_bits16<T>((uint16_t)(r & 0xffffu)));
}
template <typename T> __device__ __forceinline__ float hi_of(uint32_t r) {
  return to_float(from_bits16<T>((uint16_t)(r >> 16)));
}

// The pair p[0], p[1] in one register, element by element (p need not be 4-byte aligned).
template <typename T> __device__ __forceinline__ uint32_t load_pair(const T* p) {
  return (uint32_t)bits16(p[0]) | ((uint32_t)bits16(p[1]) << 16);
}
template <typename T> __device__ __forceinline__ void store_pair(T* p, uint32_t v) {
  p[0] = from_bits16<T>((uint16_t)(v & 0xffffu));
  p[1] = from_bits16<T>((uint16_t)(v >> 16));
}

#ifdef AUDIOMAE_EMULATE
namespace emu_mma {
inline float element(uint32_t reg, int half, bool bf16) {
  const uint16_t b = (uint16_t)(half ? reg >> 16 : reg & 0xffffu);
  return bf16 ? __bfloat162float(__nv_bfloat16{b}) : __half2float(__half{b});
}
}  // namespace emu_mma

// c (16 x 8) += a (16 x 16) b (16 x 8)
template <typename T>
inline void mma16816(float c[4], const Tile16& a, uint32_t b0, uint32_t b1) {
  constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const uint32_t mine[6] = {a.r[0], a.r[1], a.r[2], a.r[3], b0, b1};
  const uint32_t* all = emu::warp_publish(mine, 6);
  const int lane = (int)(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = g + 8 * (i / 2), n = 2 * t + (i % 2);
    float s = c[i];
    for (int k = 0; k < 16; ++k) {
      // A(m, k): lane 4 (m % 8) + (k % 8) / 2, register (m >= 8) + 2 (k >= 8), half k % 2
      const int la = 4 * (m % 8) + (k % 8) / 2, ra = (m >= 8) + 2 * (k >= 8);
      // B(k, n): lane 4 n + (k % 8) / 2, register 4 + (k >= 8), half k % 2
      const int lb = 4 * n + (k % 8) / 2, rb = 4 + (k >= 8);
      s = std::fma(emu_mma::element(all[8 * la + ra], k % 2, bf16), emu_mma::element(all[8 * lb + rb], k % 2, bf16), s);
    }
    out[i] = s;
  }
  emu::warp_release();
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

// The fragment of the transposed 8 x 8 block.
inline uint32_t transpose8x8(uint32_t x) {
  const uint32_t* all = emu::warp_publish(&x, 1);
  const int lane = (int)(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  // element (r, c) of the block sits in lane 4 r + c / 2, half c % 2; we want (2t, g) and (2t + 1, g)
  const uint32_t lo_src = all[8 * (4 * (2 * t) + g / 2)], hi_src = all[8 * (4 * (2 * t + 1) + g / 2)];
  const uint32_t lo = (g % 2 ? lo_src >> 16 : lo_src) & 0xffffu, hi = (g % 2 ? hi_src >> 16 : hi_src) & 0xffffu;
  emu::warp_release();
  return lo | (hi << 16);
}
#else
template <typename T> __device__ __forceinline__ void mma16816(float c[4], const Tile16& a, uint32_t b0, uint32_t b1);

template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const Tile16& a, uint32_t b0,
                                                                    uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the host never launches these kernels below sm_80
#endif
}

template <> __device__ __forceinline__ void mma16816<__half>(float c[4], const Tile16& a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
#else
  __trap();
  return x;
#endif
}
#endif

// The Tile16 of the transposed 16 x 16 tile: block (0, 1) and (1, 0) swap places, each transposed.
__device__ __forceinline__ Tile16 transpose16(const Tile16& x) {
  Tile16 y;
  y.r[0] = transpose8x8(x.r[0]);
  y.r[1] = transpose8x8(x.r[2]);
  y.r[2] = transpose8x8(x.r[1]);
  y.r[3] = transpose8x8(x.r[3]);
  return y;
}

}  // namespace am
