// Shifted-window scaled cosine attention (Swin-V2 "CR"), forward and backward, as CUDA kernels.
//
// Semantics are those of audiomae.reference.window_attention_reference and of the Triton kernels in
// audiomae/kernels/window_attention.py, whose arithmetic this file mirrors:
//   per (sample, window, head): softmax(cos(q, k) / tau_c + bias[h] + shift_mask) @ v,
//   cos from q, k normalised in float32 (x / max(|x|, 1e-12)) and rounded to the input dtype,
//   products summed in float32, the probabilities rounded to the input dtype before @ v.
//
// Layout. qkv is [B, T*F, 3C] in token order, channels (3, heads, head_dim). Rolled-grid position
// (tr, fr) is original token ((tr + st) % T, (fr + sf) % F); windows are wt x wf tiles of the rolled
// grid numbered row-major (over the whole batch), positions row-major inside a window. Kernels read
// q, k, v of a window with these indices and write the output (or the gradients) at the same tokens:
// no roll, partition or copy around them.
//
// Shift mask. Along an axis of size n with window w and shift s > 0, rolled position p lies in region
// (p >= n - w) + (p >= n - s); two positions of a window whose (time, frequency) regions differ get
// -100 added to their logit (added, not skipped, as the release does).
//
// Work split. One warp handles one (window, head) at a time, entirely in its slice of shared memory
// (window area A <= 64, head_dim D <= 128): the rows of q, k, v (and dO) are copied in, q and k are
// normalised in place, and the four small matrix products (QK^T, PV; backward also dO V^T, P^T dO,
// dCos K, dCos^T Q) run either on tensor cores (wmma 16x16x16, float32 accumulators) when the dtype
// is float16/bfloat16 and A, D are multiples of 16 -- the decoder's 16-token windows with 32-wide
// heads are exactly one or two tiles, nothing is padded -- or as float32 FMAs otherwise (float32 inputs
// stay in full float32, no tf32). Row-wise steps (softmax and its gradient) give each row a group of
// next_pow2(min(A, 32)) lanes and reduce with shuffles inside the group.
//
// Backward. Scores are recomputed. Each warp accumulates the bias gradient of its windows (one head)
// in shared memory, each lane owning fixed (i, j) entries, and the tau gradient's sum(dlogits * cos)
// in a register; at the end the block adds its warps' sums in warp order and writes one partial row
// per block. The caller sums the rows: deterministic, no atomics.
//
// Those are the shared-memory kernels, for every shape. For the decoder's shape (16-token windows,
// 16-bit dtypes, head_dim 16, 32 or 64, sm_80+) the plan picks the register kernels of
// window_attention_mma.cuh instead, with the same arithmetic (AUDIOMAE_CUDA_WA_KERNEL overrides).
#include "common.cuh"

#include <cstdlib>
#include <cstring>

namespace am {
namespace wa {

struct Geometry {
  int T, F, wt, wf, st, sf;
  int nwt, nwf;   // windows per axis
  int A, H, D, C;
  int n_windows;  // batch * nwt * nwf
  int64_t qkv_sb, qkv_sl;
  int64_t out_sb, out_sl;  // forward: out; backward: grad_out
  int64_t dq_sb, dq_sl;    // backward: grad_qkv
  // windows of at most 16 positions: position a's (time, frequency) offset in its window is
  // (pos_t >> 4a & 15, pos_f >> 4a & 15), so that kernels need no division for it
  uint64_t pos_t, pos_f;
};

// One warp's slice of shared memory (byte offsets) and the row strides of its matrices (elements).
struct Layout {
  int warps, windows_per_warp, wmma;
  int vec_in, vec_out;  // 16-byte copies: qkv (and grad_out) / out (or grad_qkv) rows are 16-byte aligned
  int ld_op;   // rows of q, k, v, dO (T)
  int ld_aa;   // [A][A] float32 buffers: cos (S), dP
  int ld_aat;  // [A][A] T operands: P, dCos
  int ld_st;   // [A][D] float32 staging of a product's result (shares the space of S and dP)
  int off_tok, off_reg, off_len, off_q, off_k, off_v, off_do, off_s, off_dp, off_st, off_p, off_dc, off_dbias;
  int64_t warp_bytes, block_bytes;
};

// --------------------------------------------------------------------------------------------------
// device helpers
// --------------------------------------------------------------------------------------------------

// Tensor cores for T: float16 always (sm_70+), bfloat16 from sm_80; never for float32.
template <typename T> struct TensorCores { static constexpr bool value = false; };
template <> struct TensorCores<__half> { static constexpr bool value = true; };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <> struct TensorCores<__nv_bfloat16> { static constexpr bool value = false; };
#else
template <> struct TensorCores<__nv_bfloat16> { static constexpr bool value = true; };
#endif

// C[M x N] (float32, row stride ldc) = sum over k < K of A(m, k) B(k, n), operands in shared memory:
// A(m, k) = TA ? a[k * lda + m] : a[m * lda + k];  B(k, n) = TB ? b[n * ldb + k] : b[k * ldb + n].
template <typename T, bool TA, bool TB>
__device__ __forceinline__ void gemm_fma(float* c, int ldc, const T* a, int lda, const T* b, int ldb, int M, int N,
                                         int K, int lane) {
  for (int e = lane; e < M * N; e += 32) {
    const int m = e / N, n = e - m * N;
    float acc = 0.f;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const float x = to_float(TA ? a[k * lda + m] : a[m * lda + k]);
      const float y = to_float(TB ? b[n * ldb + k] : b[k * ldb + n]);
      acc = fmaf(x, y, acc);
    }
    c[m * ldc + n] = acc;
  }
}

// The same product with wmma tiles; M, N, K multiples of 16, lda/ldb multiples of 8, ldc of 4,
// and every pointer 32-byte aligned (the layout guarantees all three).
template <typename T, bool TA, bool TB>
__device__ __forceinline__ void gemm_wmma(float* c, int ldc, const T* a, int lda, const T* b, int ldb, int M, int N,
                                          int K) {
  namespace wm = nvcuda::wmma;
  using LA = typename std::conditional<TA, wm::col_major, wm::row_major>::type;
  using LB = typename std::conditional<TB, wm::col_major, wm::row_major>::type;
  for (int mt = 0; mt < M; mt += 16) {
    for (int nt = 0; nt < N; nt += 16) {
      wm::fragment<wm::accumulator, 16, 16, 16, float> acc;
      wm::fill_fragment(acc, 0.0f);
      for (int kt = 0; kt < K; kt += 16) {
        wm::fragment<wm::matrix_a, 16, 16, 16, T, LA> fa;
        wm::fragment<wm::matrix_b, 16, 16, 16, T, LB> fb;
        wm::load_matrix_sync(fa, TA ? a + kt * lda + mt : a + mt * lda + kt, lda);
        wm::load_matrix_sync(fb, TB ? b + nt * ldb + kt : b + kt * ldb + nt, ldb);
        wm::mma_sync(acc, fa, fb, acc);
      }
      wm::store_matrix_sync(c + mt * ldc + nt, acc, ldc, wm::mem_row_major);
    }
  }
}

template <typename T, bool kWmma, bool TA, bool TB>
__device__ __forceinline__ void gemm(float* c, int ldc, const T* a, int lda, const T* b, int ldb, int M, int N, int K,
                                     int lane) {
  if constexpr (kWmma && TensorCores<T>::value) {
    gemm_wmma<T, TA, TB>(c, ldc, a, lda, b, ldb, M, N, K);
  } else {
    gemm_fma<T, TA, TB>(c, ldc, a, lda, b, ldb, M, N, K, lane);
  }
}

// Token (within its sample) and shift region of every position of window w; returns the sample.
__device__ __forceinline__ int window_setup(const Geometry& g, int w, int lane, int* tok, int* reg) {
  const int per_sample = g.nwt * g.nwf;
  const int b = w / per_sample, wi = w - b * per_sample;
  const int t0 = (wi / g.nwf) * g.wt, f0 = (wi % g.nwf) * g.wf;
  for (int a = lane; a < g.A; a += 32) {
    const int tr = t0 + a / g.wf, fr = f0 + a % g.wf;  // rolled-grid position
    int t = tr + g.st, f = fr + g.sf;                     // < 2T, < 2F
    if (t >= g.T) t -= g.T;
    if (f >= g.F) f -= g.F;
    tok[a] = t * g.F + f;
    int r = 0;
    if (g.st > 0) r += 3 * ((tr >= g.T - g.wt) + (tr >= g.T - g.st));
    if (g.sf > 0) r += (fr >= g.F - g.wf) + (fr >= g.F - g.sf);
    reg[a] = r;
  }
  __syncwarp();
  return b;
}

// dst[a][d] = src[tok[a] * stride_l + d] for the A rows of a window (lanes along d: coalesced).
template <typename T>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, int64_t stride_l, const int* tok, int A, int D,
                                          int lane) {
  for (int a = 0; a < A; ++a) {
    const T* row = src + (int64_t)tok[a] * stride_l;
    for (int d = lane; d < D; d += 32) dst[a * ld + d] = row[d];
  }
}

template <typename T>
__device__ __forceinline__ void store_rows(T* dst, int64_t stride_l, const float* src, int ld, const int* tok, int A,
                                           int D, int lane) {
  for (int a = 0; a < A; ++a) {
    T* row = dst + (int64_t)tok[a] * stride_l;
    for (int d = lane; d < D; d += 32) row[d] = from_float<T>(src[a * ld + d]);
  }
}

// 16 bytes: eight 16-bit values, or four floats.
template <typename T> struct alignas(16) Pack8 { T v[8]; };
struct alignas(16) Float4 { float v[4]; };

// The same copies 16 bytes at a time, for the tensor-core layout (16-bit T, D % 16 == 0, row strides
// of 16 bytes in shared memory) when the global rows are 16-byte aligned too (Layout::vec_in / vec_out).
template <typename T>
__device__ __forceinline__ void load_rows_vec(T* dst, int ld, const T* src, int64_t stride_l, const int* tok, int A,
                                              int D, int lane) {
  const int wpr = D / 8;  // 16-byte words per row
  for (int e = lane; e < A * wpr; e += 32) {
    const int a = e / wpr, w = e - a * wpr;
    *reinterpret_cast<Pack8<T>*>(dst + a * ld + 8 * w) =
        *reinterpret_cast<const Pack8<T>*>(src + (int64_t)tok[a] * stride_l + 8 * w);
  }
}

template <typename T>
__device__ __forceinline__ void store_rows_vec(T* dst, int64_t stride_l, const float* src, int ld, const int* tok,
                                               int A, int D, int lane) {
  const int wpr = D / 8;
  for (int e = lane; e < A * wpr; e += 32) {
    const int a = e / wpr, w = e - a * wpr;
    const Float4 x0 = *reinterpret_cast<const Float4*>(src + a * ld + 8 * w);
    const Float4 x1 = *reinterpret_cast<const Float4*>(src + a * ld + 8 * w + 4);
    Pack8<T> p;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      p.v[i] = from_float<T>(x0.v[i]);
      p.v[4 + i] = from_float<T>(x1.v[i]);
    }
    *reinterpret_cast<Pack8<T>*>(dst + (int64_t)tok[a] * stride_l + 8 * w) = p;
  }
}

template <typename T, bool kWmma>
__device__ __forceinline__ void copy_in(bool vec, T* dst, int ld, const T* src, int64_t stride_l, const int* tok, int A,
                                        int D, int lane) {
  if constexpr (kWmma && sizeof(T) == 2) {
    if (vec) return load_rows_vec(dst, ld, src, stride_l, tok, A, D, lane);
  }
  load_rows(dst, ld, src, stride_l, tok, A, D, lane);
}

template <typename T, bool kWmma>
__device__ __forceinline__ void copy_out(bool vec, T* dst, int64_t stride_l, const float* src, int ld, const int* tok,
                                         int A, int D, int lane) {
  if constexpr (kWmma && sizeof(T) == 2) {
    if (vec) return store_rows_vec(dst, stride_l, src, ld, tok, A, D, lane);
  }
  store_rows(dst, stride_l, src, ld, tok, A, D, lane);
}

// F.normalize of the rows of q and k in place, rounded to T: x * (1 / max(|x|, 1e-12)) with |x| in
// float32 (within an ulp of the division). len[r] = |x| of row r (q rows, then k rows) if len is set.
// One lane per row; the tensor-core layout reads and writes 16 bytes at a time (same arithmetic).
template <typename T, bool kWmma>
__device__ __forceinline__ void normalize_rows(T* qs, T* ks, int ld, int A, int D, float* len, int lane) {
  for (int r = lane; r < 2 * A; r += 32) {
    T* row = r < A ? qs + r * ld : ks + (r - A) * ld;
    float ss = 0.f;
    float inv;
    if constexpr (kWmma && sizeof(T) == 2) {
      for (int c = 0; c < D; c += 8) {
        const Pack8<T> p = *reinterpret_cast<const Pack8<T>*>(row + c);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float x = to_float(p.v[i]);
          ss = fmaf(x, x, ss);
        }
      }
      inv = 1.0f / fmaxf(sqrtf(ss), 1e-12f);
      for (int c = 0; c < D; c += 8) {
        Pack8<T> p = *reinterpret_cast<const Pack8<T>*>(row + c);
#pragma unroll
        for (int i = 0; i < 8; ++i) p.v[i] = from_float<T>(to_float(p.v[i]) * inv);
        *reinterpret_cast<Pack8<T>*>(row + c) = p;
      }
    } else {
      for (int d = 0; d < D; ++d) {
        const float x = to_float(row[d]);
        ss = fmaf(x, x, ss);
      }
      inv = 1.0f / fmaxf(sqrtf(ss), 1e-12f);
      for (int d = 0; d < D; ++d) row[d] = from_float<T>(to_float(row[d]) * inv);
    }
    if (len != nullptr) len[r] = sqrtf(ss);
  }
}

// Lanes of a warp as row groups: `width` = next_pow2(min(A, 32)) lanes per row, 32 / width rows at a
// time; lane `col` of a group takes keys col and col + 32 of its row.
struct RowGroups {
  int width, rows, group, col;
  __device__ __forceinline__ RowGroups(int A, int lane) {
    width = next_pow2(imin(A, 32));
    rows = 32 / width;
    group = lane / width;
    col = lane % width;
  }
};

// Logits of row i, keys j = col, col + 32: cos / tau_c + bias + shift mask, -inf outside the window.
__device__ __forceinline__ void row_logits(float x[2], const float* s, int ld_s, const float* bias_h, const int* reg,
                                           float tc, int A, int i, int col) {
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int j = col + 32 * c;
    x[c] = -INFINITY;
    if (i < A && j < A) {
      x[c] = s[i * ld_s + j] / tc + bias_h[i * A + j];
      if (reg[i] != reg[j]) x[c] -= 100.f;
    }
  }
}

// p = softmax of each row of logits (float32), written rounded to T.
template <typename T>
__device__ __forceinline__ void softmax_rows(T* p, int ld_p, const float* s, int ld_s, const float* bias_h,
                                             const int* reg, float tc, int A, int lane) {
  const RowGroups rg(A, lane);
  for (int i0 = 0; i0 < A; i0 += rg.rows) {
    const int i = i0 + rg.group;
    float x[2];
    row_logits(x, s, ld_s, bias_h, reg, tc, A, i, rg.col);
    const float m = group_max(fmaxf(x[0], x[1]), rg.width);
    float e[2];
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int j = rg.col + 32 * c;
      e[c] = (i < A && j < A) ? expf(x[c] - m) : 0.f;
      sum += e[c];
    }
    sum = group_sum(sum, rg.width);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int j = rg.col + 32 * c;
      if (i < A && j < A) p[i * ld_p + j] = from_float<T>(e[c] / sum);
    }
  }
}

// Backward of the softmax and the logits: ds = p * (dp - sum_j p dp). Writes p and ds / tau_c rounded
// to T (operands of the next products), adds ds to dbias (same lane for the same (i, j) every time)
// and ds * cos to dtau.
template <typename T>
__device__ __forceinline__ void softmax_grad_rows(T* p_op, T* dc_op, int ld_op, const float* s, const float* dp,
                                                  int ld_s, const float* bias_h, const int* reg, float tc, int A,
                                                  int lane, float* dbias, float& dtau) {
  const RowGroups rg(A, lane);
  for (int i0 = 0; i0 < A; i0 += rg.rows) {
    const int i = i0 + rg.group;
    float x[2];
    row_logits(x, s, ld_s, bias_h, reg, tc, A, i, rg.col);
    const float m = group_max(fmaxf(x[0], x[1]), rg.width);
    float e[2];
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int j = rg.col + 32 * c;
      e[c] = (i < A && j < A) ? expf(x[c] - m) : 0.f;
      sum += e[c];
    }
    sum = group_sum(sum, rg.width);
    float p[2], g[2];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int j = rg.col + 32 * c;
      p[c] = 0.f;
      g[c] = 0.f;
      if (i < A && j < A) {
        p[c] = e[c] / sum;
        g[c] = dp[i * ld_s + j];
        dot = fmaf(p[c], g[c], dot);
      }
    }
    dot = group_sum(dot, rg.width);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int j = rg.col + 32 * c;
      if (i < A && j < A) {
        const float ds = p[c] * (g[c] - dot);
        dtau = fmaf(ds, s[i * ld_s + j], dtau);
        dbias[i * A + j] += ds;
        p_op[i * ld_op + j] = from_float<T>(p[c]);
        dc_op[i * ld_op + j] = from_float<T>(ds / tc);
      }
    }
  }
}

// Gradient of rows through F.normalize, written to dst: (dn - n <dn, n>) / max(|x|, 1e-12) with
// n = x / max(|x|, 1e-12) recomputed in float32 from the raw rows x (no projection where |x| < 1e-12,
// the clamp's side). dn: [A][D] float32 in shared memory.
template <typename T>
__device__ __forceinline__ void normalize_grad_rows(T* dst, int64_t dst_stride_l, const float* dn, int ld, const T* x,
                                                    int64_t x_stride_l, const int* tok, const float* len, int A, int D,
                                                    int lane) {
  for (int a = 0; a < A; ++a) {
    const T* xr = x + (int64_t)tok[a] * x_stride_l;
    const float l = len[a];
    const float inv = 1.0f / fmaxf(l, 1e-12f);
    float n[4], g[4];
    float part = 0.f;
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // D <= 128
      const int d = lane + 32 * r;
      n[r] = 0.f;
      g[r] = 0.f;
      if (d < D) {
        n[r] = to_float(xr[d]) * inv;
        g[r] = dn[a * ld + d];
        part = fmaf(g[r], n[r], part);
      }
    }
    float proj = group_sum(part, 32);
    if (!(l >= 1e-12f)) proj = 0.f;
    T* yr = dst + (int64_t)tok[a] * dst_stride_l;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int d = lane + 32 * r;
      if (d < D) yr[d] = from_float<T>((g[r] - n[r] * proj) * inv);
    }
  }
}

// --------------------------------------------------------------------------------------------------
// kernels
// --------------------------------------------------------------------------------------------------
template <typename T, bool kWmma>
__global__ void __launch_bounds__(128) wa_forward_kernel(const T* __restrict__ qkv, const float* __restrict__ tau_c,
                                                         const float* __restrict__ bias, T* __restrict__ out,
                                                         Geometry g, Layout L) {
  AM_DYNAMIC_SMEM(smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, h = blockIdx.y;
  const int w = blockIdx.x * L.warps + warp;
  if (w >= g.n_windows) return;  // the whole warp; the forward has no block-wide barrier
  unsigned char* ws = smem + (size_t)warp * L.warp_bytes;
  int* tok = reinterpret_cast<int*>(ws + L.off_tok);
  int* reg = reinterpret_cast<int*>(ws + L.off_reg);
  T* qs = reinterpret_cast<T*>(ws + L.off_q);
  T* ks = reinterpret_cast<T*>(ws + L.off_k);
  T* vs = reinterpret_cast<T*>(ws + L.off_v);
  float* sb = reinterpret_cast<float*>(ws + L.off_s);
  float* st = reinterpret_cast<float*>(ws + L.off_st);  // same space as sb, used after it
  T* pt = reinterpret_cast<T*>(ws + L.off_p);
  const int A = g.A, D = g.D;

  const int b = window_setup(g, w, lane, tok, reg);
  const T* src = qkv + (int64_t)b * g.qkv_sb + (int64_t)h * D;
  copy_in<T, kWmma>(L.vec_in, qs, L.ld_op, src, g.qkv_sl, tok, A, D, lane);
  copy_in<T, kWmma>(L.vec_in, ks, L.ld_op, src + g.C, g.qkv_sl, tok, A, D, lane);
  copy_in<T, kWmma>(L.vec_in, vs, L.ld_op, src + 2 * g.C, g.qkv_sl, tok, A, D, lane);
  __syncwarp();
  normalize_rows<T, kWmma>(qs, ks, L.ld_op, A, D, static_cast<float*>(nullptr), lane);
  __syncwarp();
  gemm<T, kWmma, false, true>(sb, L.ld_aa, qs, L.ld_op, ks, L.ld_op, A, A, D, lane);  // cos = Qn Kn^T
  __syncwarp();
  softmax_rows(pt, L.ld_aat, sb, L.ld_aa, bias + (size_t)h * A * A, reg, tau_c[h], A, lane);
  __syncwarp();
  gemm<T, kWmma, false, false>(st, L.ld_st, pt, L.ld_aat, vs, L.ld_op, A, D, A, lane);  // P V
  __syncwarp();
  copy_out<T, kWmma>(L.vec_out, out + (int64_t)b * g.out_sb + (int64_t)h * D, g.out_sl, st, L.ld_st, tok, A, D, lane);
}

template <typename T, bool kWmma>
__global__ void __launch_bounds__(128) wa_backward_kernel(const T* __restrict__ qkv, const T* __restrict__ gout,
                                                          const float* __restrict__ tau_c,
                                                          const float* __restrict__ bias, T* __restrict__ dqkv,
                                                          float* __restrict__ dtau_part,
                                                          float* __restrict__ dbias_part, Geometry g, Layout L) {
  AM_DYNAMIC_SMEM(smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, h = blockIdx.y;
  unsigned char* ws = smem + (size_t)warp * L.warp_bytes;
  int* tok = reinterpret_cast<int*>(ws + L.off_tok);
  int* reg = reinterpret_cast<int*>(ws + L.off_reg);
  float* len = reinterpret_cast<float*>(ws + L.off_len);  // |q| rows, then |k| rows
  T* qs = reinterpret_cast<T*>(ws + L.off_q);
  T* ks = reinterpret_cast<T*>(ws + L.off_k);
  T* vs = reinterpret_cast<T*>(ws + L.off_v);
  T* dos = reinterpret_cast<T*>(ws + L.off_do);
  float* sb = reinterpret_cast<float*>(ws + L.off_s);
  float* dpb = reinterpret_cast<float*>(ws + L.off_dp);
  float* st = reinterpret_cast<float*>(ws + L.off_st);  // same space as sb and dpb, used after them
  T* pt = reinterpret_cast<T*>(ws + L.off_p);
  T* dct = reinterpret_cast<T*>(ws + L.off_dc);
  float* dbias = reinterpret_cast<float*>(ws + L.off_dbias);
  const int A = g.A, D = g.D, C = g.C;
  const float tc = tau_c[h];
  const float* bias_h = bias + (size_t)h * A * A;

  for (int e = lane; e < A * A; e += 32) dbias[e] = 0.f;
  __syncwarp();
  float dtau = 0.f;
  const int first = (blockIdx.x * L.warps + warp) * L.windows_per_warp;
  const int last = imin(first + L.windows_per_warp, g.n_windows);
  for (int w = first; w < last; ++w) {
    const int b = window_setup(g, w, lane, tok, reg);
    const T* src = qkv + (int64_t)b * g.qkv_sb + (int64_t)h * D;
    T* dst = dqkv + (int64_t)b * g.dq_sb + (int64_t)h * D;
    copy_in<T, kWmma>(L.vec_in, qs, L.ld_op, src, g.qkv_sl, tok, A, D, lane);
    copy_in<T, kWmma>(L.vec_in, ks, L.ld_op, src + C, g.qkv_sl, tok, A, D, lane);
    copy_in<T, kWmma>(L.vec_in, vs, L.ld_op, src + 2 * C, g.qkv_sl, tok, A, D, lane);
    copy_in<T, kWmma>(L.vec_in, dos, L.ld_op, gout + (int64_t)b * g.out_sb + (int64_t)h * D, g.out_sl, tok, A, D,
                      lane);
    __syncwarp();
    normalize_rows<T, kWmma>(qs, ks, L.ld_op, A, D, len, lane);
    __syncwarp();
    gemm<T, kWmma, false, true>(sb, L.ld_aa, qs, L.ld_op, ks, L.ld_op, A, A, D, lane);     // cos = Qn Kn^T
    gemm<T, kWmma, false, true>(dpb, L.ld_aa, dos, L.ld_op, vs, L.ld_op, A, A, D, lane);   // dP = dO V^T
    __syncwarp();
    softmax_grad_rows(pt, dct, L.ld_aat, sb, dpb, L.ld_aa, bias_h, reg, tc, A, lane, dbias, dtau);
    __syncwarp();
    gemm<T, kWmma, true, false>(st, L.ld_st, pt, L.ld_aat, dos, L.ld_op, A, D, A, lane);   // dV = P^T dO
    __syncwarp();
    copy_out<T, kWmma>(L.vec_out, dst + 2 * C, g.dq_sl, st, L.ld_st, tok, A, D, lane);
    __syncwarp();
    gemm<T, kWmma, false, false>(st, L.ld_st, dct, L.ld_aat, ks, L.ld_op, A, D, A, lane);  // dQn = dCos Kn
    __syncwarp();
    normalize_grad_rows(dst, g.dq_sl, st, L.ld_st, src, g.qkv_sl, tok, len, A, D, lane);
    __syncwarp();
    gemm<T, kWmma, true, false>(st, L.ld_st, dct, L.ld_aat, qs, L.ld_op, A, D, A, lane);   // dKn = dCos^T Qn
    __syncwarp();
    normalize_grad_rows(dst + C, g.dq_sl, st, L.ld_st, src + C, g.qkv_sl, tok, len + A, A, D, lane);
    __syncwarp();
  }

  // the block's partial sums, its warps added in order
  float* red = reinterpret_cast<float*>(smem + (size_t)L.warps * L.warp_bytes);
  dtau = group_sum(dtau, 32);
  if (lane == 0) red[warp] = dtau;
  __syncthreads();
  const int AA = A * A;
  float* out = dbias_part + ((size_t)blockIdx.x * g.H + h) * AA;
  for (int e = threadIdx.x; e < AA; e += blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < L.warps; ++k) s += reinterpret_cast<const float*>(smem + (size_t)k * L.warp_bytes + L.off_dbias)[e];
    out[e] = s;
  }
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int k = 0; k < L.warps; ++k) s += red[k];
    dtau_part[(size_t)blockIdx.x * g.H + h] = s;
  }
}

}  // namespace wa
}  // namespace am

#include "window_attention_mma.cuh"

namespace am {
namespace wa {

// --------------------------------------------------------------------------------------------------
// host side
// --------------------------------------------------------------------------------------------------
constexpr int64_t kDefaultSmem = 48 * 1024;  // per block without opting in
constexpr int64_t kBlockBudget = 96 * 1024;  // at most this per block (up to 4 warps; 1 if one needs more)
constexpr int kMaxWarps = 4;
constexpr int64_t kUnitsPerWave = 16384;     // (window, head) pairs beyond which backward warps take several
constexpr int64_t kUnitsPerWaveMma = 32768;  // the same for the register kernels (more warps resident per SM)

// Which kernels: AUDIOMAE_CUDA_WA_KERNEL = auto (default: the register kernels where they apply),
// smem (always the shared-memory kernels) or mma (the register kernels; an error where they do not
// apply). Returns AM_WA_KERNEL_SMEM or AM_WA_KERNEL_MMA, kAutoKernel, or -1 for another value.
constexpr int kAutoKernel = -2;
int requested_kernel() {
  const char* e = std::getenv("AUDIOMAE_CUDA_WA_KERNEL");
  if (e == nullptr || *e == 0 || std::strcmp(e, "auto") == 0) return kAutoKernel;
  if (std::strcmp(e, "smem") == 0) return AM_WA_KERNEL_SMEM;
  if (std::strcmp(e, "mma") == 0) return AM_WA_KERNEL_MMA;
  return -1;
}

// AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP = n (1..64): every warp takes n consecutive windows (the
// register kernels in both directions, the shared-memory backward), for tuning sweeps; unset or
// empty: the plan's own choice (0). Returns -1 for another value.
int requested_windows_per_warp() {
  const char* e = std::getenv("AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP");
  if (e == nullptr || *e == 0) return 0;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  return (*end == 0 && v >= 1 && v <= 64) ? (int)v : -1;
}

int device_cc_major(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

// The register kernels' domain: 16-bit dtypes, 16-token windows, head_dim 16, 32 or 64, sm_80+.
bool mma_applies(const Geometry& g, int dtype, int cc_major) {
  return dtype != AM_FLOAT32 && g.A == 16 && (g.D == 16 || g.D == 32 || g.D == 64) && cc_major >= 8;
}

bool mma_compiled(int device);  // below the kernels

int make_geometry(const am_wa_args* a, Geometry* g) {
  if (a == nullptr || a->dtype < AM_FLOAT32 || a->dtype > AM_BFLOAT16) return AM_ERR_ARGS;
  if (a->batch < 0 || a->grid_t < 1 || a->grid_f < 1 || a->win_t < 1 || a->win_f < 1 || a->heads < 1 ||
      a->heads > 65535 || a->head_dim < 1 || a->head_dim > AM_WA_MAX_HEAD_DIM)
    return AM_ERR_ARGS;
  if (a->grid_t % a->win_t || a->grid_f % a->win_f) return AM_ERR_ARGS;
  if (a->shift_t < 0 || a->shift_t >= a->win_t || a->shift_f < 0 || a->shift_f >= a->win_f) return AM_ERR_ARGS;
  const int64_t area = (int64_t)a->win_t * a->win_f;
  const int64_t windows = (int64_t)a->batch * (a->grid_t / a->win_t) * (a->grid_f / a->win_f);
  if (area > AM_WA_MAX_AREA || windows > INT32_MAX || (int64_t)a->grid_t * a->grid_f > INT32_MAX ||
      (int64_t)a->heads * a->head_dim > INT32_MAX / 3)
    return AM_ERR_ARGS;
  g->T = a->grid_t;
  g->F = a->grid_f;
  g->wt = a->win_t;
  g->wf = a->win_f;
  g->st = a->shift_t;
  g->sf = a->shift_f;
  g->nwt = a->grid_t / a->win_t;
  g->nwf = a->grid_f / a->win_f;
  g->A = (int)area;
  g->H = a->heads;
  g->D = a->head_dim;
  g->C = a->heads * a->head_dim;
  g->n_windows = (int)windows;
  g->pos_t = g->pos_f = 0;
  for (int i = 0; i < (int)area && i < 16; ++i) {
    g->pos_t |= (uint64_t)(i / a->win_f) << (4 * i);
    g->pos_f |= (uint64_t)(i % a->win_f) << (4 * i);
  }
  g->qkv_sb = a->qkv_stride_b;
  g->qkv_sl = a->qkv_stride_l;
  g->out_sb = a->out_stride_b;
  g->out_sl = a->out_stride_l;
  g->dq_sb = a->dqkv_stride_b;
  g->dq_sl = a->dqkv_stride_l;
  return AM_OK;
}

// Shared-memory layout for one warp and the block shape. smem_limit: the device's per-block maximum.
// forced_wpw: AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP (0: choose).
int make_layout(const Geometry& g, int dtype, bool backward, int64_t smem_limit, int forced_wpw, Layout* L) {
  const int A = g.A, D = g.D;
  const int64_t es = dtype == AM_FLOAT32 ? 4 : 2;
  L->wmma = dtype != AM_FLOAT32 && A % 16 == 0 && D % 16 == 0;
  L->vec_in = L->vec_out = 0;  // decided at launch from the pointers and strides
  // wmma wants row strides of 16 bytes; the FMA path odd strides (no bank conflicts on columns)
  L->ld_op = L->wmma ? D + 8 : D + 1;
  L->ld_aat = L->wmma ? A + 8 : A + 1;
  L->ld_aa = L->wmma ? A + 4 : A + 1;
  L->ld_st = L->wmma ? D + 4 : D + 1;
  int64_t off = 0;
  auto take = [&off](int64_t bytes, int64_t align) {
    off = align_up(off, align);
    const int64_t at = off;
    off += bytes;
    return (int)at;
  };
  L->off_tok = take(4 * A, 16);
  L->off_reg = take(4 * A, 16);
  L->off_len = take(backward ? 8 * A : 0, 16);
  L->off_q = take(A * L->ld_op * es, 128);
  L->off_k = take(A * L->ld_op * es, 128);
  L->off_v = take(A * L->ld_op * es, 128);
  L->off_do = take(backward ? A * L->ld_op * es : 0, 128);
  const int64_t s_bytes = align_up((int64_t)A * L->ld_aa * 4, 128);
  const int64_t st_bytes = align_up((int64_t)A * L->ld_st * 4, 128);
  const int64_t n_s = backward ? 2 : 1;
  L->off_s = take(n_s * s_bytes > st_bytes ? n_s * s_bytes : st_bytes, 128);
  L->off_dp = L->off_s + (int)s_bytes;
  L->off_st = L->off_s;
  L->off_p = take(A * L->ld_aat * es, 128);
  L->off_dc = take(backward ? A * L->ld_aat * es : 0, 128);
  L->off_dbias = take(backward ? 4 * A * A : 0, 128);
  L->warp_bytes = align_up(off, 128);
  const int64_t extra = backward ? 16 * 4 : 0;  // the block reduction's per-warp scratch
  const int64_t budget = smem_limit < kBlockBudget ? smem_limit : kBlockBudget;
  int warps = kMaxWarps;
  while (warps > 1 && warps * L->warp_bytes + extra > budget) --warps;
  L->warps = warps;
  L->block_bytes = warps * L->warp_bytes + extra;
  if (L->block_bytes > smem_limit) return AM_ERR_SHARED_MEM;
  int wpw = 1;
  if (backward) {
#ifdef AUDIOMAE_EMULATE
    const int64_t per_wave = emu::env_long("AM_EMULATE_UNITS_PER_WAVE", kUnitsPerWave);  // tests reach wpw > 1
#else
    const int64_t per_wave = kUnitsPerWave;
#endif
    const int64_t units = (int64_t)g.n_windows * g.H;
    while (wpw < 8 && units / wpw > per_wave) wpw *= 2;
  }
  if (backward && forced_wpw > 0) wpw = forced_wpw;
  L->windows_per_warp = wpw;
  return AM_OK;
}

int64_t device_smem_limit(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess || v <= 0) {
    cudaGetLastError();  // clear it; fall back to what every device allows
    return kDefaultSmem;
  }
  return v;
}

int plan(const am_wa_args* a, bool backward, Geometry* g, Layout* L, am_wa_plan* p) {
  int rc = make_geometry(a, g);
  if (rc != AM_OK) return rc;
  const int want = requested_kernel();
  if (want == -1) return AM_ERR_KERNEL_CHOICE;
  const int forced_wpw = requested_windows_per_warp();
  if (forced_wpw < 0) return AM_ERR_WINDOWS_PER_WARP;
  if (want != AM_WA_KERNEL_SMEM && mma_applies(*g, a->dtype, device_cc_major(a->device)) && mma_compiled(a->device)) {
    L->warps = kMmaWarps;
    L->wmma = 1;
    L->block_bytes = 0;
    // the backward: a warp takes several windows when there are enough (window, head) pairs (fewer
    // tau/bias partial sums). The forward keeps one window per warp: on an H100 (the paper's layer,
    // bf16, batch 256) it took 0.184 ms against 0.196 ms with 4 windows per warp.
#ifdef AUDIOMAE_EMULATE
    const int64_t per_wave = emu::env_long("AM_EMULATE_UNITS_PER_WAVE", kUnitsPerWaveMma);
#else
    const int64_t per_wave = kUnitsPerWaveMma;
#endif
    const int64_t units = (int64_t)g->n_windows * g->H;
    int wpw = 1;
    while (backward && wpw < 8 && units / wpw > per_wave) wpw *= 2;
    if (forced_wpw > 0) wpw = forced_wpw;
    L->windows_per_warp = wpw;
    const int64_t chunks = ((int64_t)g->n_windows + wpw - 1) / wpw;
    if ((chunks * g->H + kMmaWarps - 1) / kMmaWarps > INT32_MAX) return AM_ERR_ARGS;  // the grid's x limit
    if (p != nullptr) {
      p->blocks_x = (int)chunks;  // window chunks
      p->warps = kMmaWarps;
      p->windows_per_warp = wpw;
      p->wmma = 1;
      p->smem_bytes = 0;
      p->kernel = AM_WA_KERNEL_MMA;
    }
    return AM_OK;
  }
  if (want == AM_WA_KERNEL_MMA) return AM_ERR_KERNEL_CHOICE;
  rc = make_layout(*g, a->dtype, backward, device_smem_limit(a->device), forced_wpw, L);
  if (rc != AM_OK) return rc;
  if (p != nullptr) {
    const int per_block = L->warps * L->windows_per_warp;
    p->blocks_x = (g->n_windows + per_block - 1) / per_block;
    p->warps = L->warps;
    p->windows_per_warp = L->windows_per_warp;
    p->wmma = L->wmma;
    p->smem_bytes = L->block_bytes;
    p->kernel = AM_WA_KERNEL_SMEM;
  }
  return AM_OK;
}

template <typename K>
int prepare(K kernel, int64_t smem_bytes, const Layout& L) {
#ifdef AUDIOMAE_EMULATE
  if (emu::env_long("AM_EMULATE_TRACE", 0))
    std::fprintf(stderr, "launch warps=%d wmma=%d vec_in=%d vec_out=%d smem=%lld\n", L.warps, L.wmma, L.vec_in,
                 L.vec_out, (long long)smem_bytes);
#else
  (void)L;
#endif
  if (smem_bytes > kDefaultSmem) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes);
    if (e != cudaSuccess) return (int)e;
  }
  return AM_OK;
}

// Rows at ptr + b * stride_b + token * stride_l + h * D (+ part * C) all start on 16-byte boundaries.
bool rows_aligned16(const void* ptr, int64_t stride_b, int64_t stride_l, const Geometry& g, int64_t es) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride_b * es) % 16 == 0 && (stride_l * es) % 16 == 0 &&
         ((int64_t)g.C * es) % 16 == 0 && ((int64_t)g.D * es) % 16 == 0;
}

template <typename T, bool kWmma>
int forward_typed(const Geometry& g, Layout L, const am_wa_plan& p, const void* qkv, const float* tau_c,
                  const float* bias, void* out, void* stream) {
  L.vec_in = kWmma && rows_aligned16(qkv, g.qkv_sb, g.qkv_sl, g, sizeof(T));
  L.vec_out = kWmma && rows_aligned16(out, g.out_sb, g.out_sl, g, sizeof(T));
  auto kernel = wa_forward_kernel<T, kWmma>;
  int rc = prepare(kernel, L.block_bytes, L);
  if (rc != AM_OK) return rc;
  const dim3 grid(p.blocks_x, g.H), block(32 * L.warps);
  AM_LAUNCH(kernel, grid, block, L.block_bytes, stream, static_cast<const T*>(qkv), tau_c, bias, static_cast<T*>(out),
            g, L);
  return (int)cudaGetLastError();
}

template <typename T, bool kWmma>
int backward_typed(const Geometry& g, Layout L, const am_wa_plan& p, const void* qkv, const void* gout,
                   const float* tau_c, const float* bias, void* dqkv, float* dtau_part, float* dbias_part,
                   void* stream) {
  L.vec_in = kWmma && rows_aligned16(qkv, g.qkv_sb, g.qkv_sl, g, sizeof(T)) &&
             rows_aligned16(gout, g.out_sb, g.out_sl, g, sizeof(T));
  L.vec_out = kWmma && rows_aligned16(dqkv, g.dq_sb, g.dq_sl, g, sizeof(T));
  auto kernel = wa_backward_kernel<T, kWmma>;
  int rc = prepare(kernel, L.block_bytes, L);
  if (rc != AM_OK) return rc;
  const dim3 grid(p.blocks_x, g.H), block(32 * L.warps);
  AM_LAUNCH(kernel, grid, block, L.block_bytes, stream, static_cast<const T*>(qkv), static_cast<const T*>(gout), tau_c,
            bias, static_cast<T*>(dqkv), dtau_part, dbias_part, g, L);
  return (int)cudaGetLastError();
}

// Each lane's quarter of a head's row, ptr + b * stride_b + token * stride_l + h * D (+ part * C)
// + t * D / 4, starts on a boundary of its size in bytes (at most 16), so that the register kernels
// move it in one or two vector accesses.
bool rows_vec_aligned(const void* ptr, int64_t stride_b, int64_t stride_l, const Geometry& g) {
  const int64_t bytes = g.D / 2 < 16 ? g.D / 2 : 16, elems = bytes / 2;
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0 && stride_b % elems == 0 && stride_l % elems == 0 &&
         g.C % elems == 0 && g.D % elems == 0;
}

// Whether this binary's register kernels run as sm_80+ code on `device`: a build for older
// architectures only (e.g. 7.5 with PTX), run on a newer GPU, would reach their trap instead.
bool mma_compiled(int device) {
  DeviceGuard guard(device);
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, wa_forward_mma_kernel<__nv_bfloat16, 32, true>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion >= 80 && attr.ptxVersion >= 80;
}

// The register kernels' grid: one warp per (window chunk, head).
dim3 mma_grid(const Geometry& g, const am_wa_plan& p) {
  const int64_t warps = (int64_t)p.blocks_x * g.H;
  return dim3((unsigned)((warps + kMmaWarps - 1) / kMmaWarps));
}

template <typename T, int D, bool kVec>
int forward_mma(const Geometry& g, const am_wa_plan& p, const void* qkv, const float* tau_c, const float* bias,
                void* out, void* stream) {
  AM_LAUNCH((wa_forward_mma_kernel<T, D, kVec>), mma_grid(g, p), dim3(32 * kMmaWarps), 0, stream,
            static_cast<const T*>(qkv), tau_c, bias, static_cast<T*>(out), g, p.windows_per_warp, p.blocks_x);
  return (int)cudaGetLastError();
}

template <typename T, int D, bool kVec>
int backward_mma(const Geometry& g, const am_wa_plan& p, const void* qkv, const void* gout, const float* tau_c,
                 const float* bias, void* dqkv, float* dtau_part, float* dbias_part, void* stream) {
  AM_LAUNCH((wa_backward_mma_kernel<T, D, kVec>), mma_grid(g, p), dim3(32 * kMmaWarps), 0, stream,
            static_cast<const T*>(qkv), static_cast<const T*>(gout), tau_c, bias, static_cast<T*>(dqkv), dtau_part,
            dbias_part, g, p.windows_per_warp, p.blocks_x);
  return (int)cudaGetLastError();
}

// The register kernels for the runtime dtype, head_dim and alignment.
struct MmaCall {
  const Geometry& g;
  const am_wa_plan& p;
  const void *qkv, *gout;
  const float *tau_c, *bias;
  void* out;  // forward: out; backward: grad_qkv
  float *dtau_part, *dbias_part;
  void* stream;
  bool backward, aligned;

  template <typename T, int D>
  int run_d() const {
    if (backward) {
      return aligned ? backward_mma<T, D, true>(g, p, qkv, gout, tau_c, bias, out, dtau_part, dbias_part, stream)
                     : backward_mma<T, D, false>(g, p, qkv, gout, tau_c, bias, out, dtau_part, dbias_part, stream);
    }
    return aligned ? forward_mma<T, D, true>(g, p, qkv, tau_c, bias, out, stream)
                   : forward_mma<T, D, false>(g, p, qkv, tau_c, bias, out, stream);
  }
  template <typename T>
  int run_t() const {
    switch (g.D) {
      case 16: return run_d<T, 16>();
      case 32: return run_d<T, 32>();
      default: return run_d<T, 64>();
    }
  }
  int run(int dtype) const { return dtype == AM_FLOAT16 ? run_t<__half>() : run_t<__nv_bfloat16>(); }
};

}  // namespace wa
}  // namespace am

extern "C" {

int am_wa_make_plan(const am_wa_args* args, int backward, am_wa_plan* p) {
  am::wa::Geometry g;
  am::wa::Layout L;
  return am::wa::plan(args, backward != 0, &g, &L, p);
}

int am_wa_forward(const am_wa_args* args, const void* qkv, const float* tau_c, const float* bias, void* out,
                  void* stream) {
  using namespace am::wa;
  Geometry g;
  Layout L;
  am_wa_plan p;
  int rc = plan(args, false, &g, &L, &p);
  if (rc != AM_OK || g.n_windows == 0) return rc;
  am::DeviceGuard guard(args->device);
  if (p.kernel == AM_WA_KERNEL_MMA) {
    const bool aligned = rows_vec_aligned(qkv, g.qkv_sb, g.qkv_sl, g) && rows_vec_aligned(out, g.out_sb, g.out_sl, g);
    const MmaCall call{g, p, qkv, nullptr, tau_c, bias, out, nullptr, nullptr, stream, false, aligned};
    return call.run(args->dtype);
  }
  switch (args->dtype) {
    case AM_FLOAT32:
      return forward_typed<float, false>(g, L, p, qkv, tau_c, bias, out, stream);
    case AM_FLOAT16:
      return L.wmma ? forward_typed<__half, true>(g, L, p, qkv, tau_c, bias, out, stream)
                    : forward_typed<__half, false>(g, L, p, qkv, tau_c, bias, out, stream);
    default:
      return L.wmma ? forward_typed<__nv_bfloat16, true>(g, L, p, qkv, tau_c, bias, out, stream)
                    : forward_typed<__nv_bfloat16, false>(g, L, p, qkv, tau_c, bias, out, stream);
  }
}

int am_wa_backward(const am_wa_args* args, const void* qkv, const void* grad_out, const float* tau_c,
                   const float* bias, void* grad_qkv, float* dtau_partial, float* dbias_partial, int partial_rows,
                   void* stream) {
  using namespace am::wa;
  Geometry g;
  Layout L;
  am_wa_plan p;
  int rc = plan(args, true, &g, &L, &p);
  if (rc != AM_OK) return rc;
  if (p.blocks_x != partial_rows) return AM_ERR_PLAN;
  if (g.n_windows == 0) return AM_OK;
  am::DeviceGuard guard(args->device);
  if (p.kernel == AM_WA_KERNEL_MMA) {
    const bool aligned = rows_vec_aligned(qkv, g.qkv_sb, g.qkv_sl, g) && rows_vec_aligned(grad_out, g.out_sb, g.out_sl, g) &&
                         rows_vec_aligned(grad_qkv, g.dq_sb, g.dq_sl, g);
    const MmaCall call{g, p, qkv, grad_out, tau_c, bias, grad_qkv, dtau_partial, dbias_partial, stream, true,
                       aligned};
    return call.run(args->dtype);
  }
  switch (args->dtype) {
    case AM_FLOAT32:
      return backward_typed<float, false>(g, L, p, qkv, grad_out, tau_c, bias, grad_qkv, dtau_partial, dbias_partial,
                                          stream);
    case AM_FLOAT16:
      return L.wmma ? backward_typed<__half, true>(g, L, p, qkv, grad_out, tau_c, bias, grad_qkv, dtau_partial,
                                                   dbias_partial, stream)
                    : backward_typed<__half, false>(g, L, p, qkv, grad_out, tau_c, bias, grad_qkv, dtau_partial,
                                                    dbias_partial, stream);
    default:
      return L.wmma ? backward_typed<__nv_bfloat16, true>(g, L, p, qkv, grad_out, tau_c, bias, grad_qkv,
                                                          dtau_partial, dbias_partial, stream)
                    : backward_typed<__nv_bfloat16, false>(g, L, p, qkv, grad_out, tau_c, bias, grad_qkv,
                                                           dtau_partial, dbias_partial, stream);
  }
}

}  // extern "C"
