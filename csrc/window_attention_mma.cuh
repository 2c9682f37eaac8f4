// Register-resident window attention kernels for the decoder's shape: 16-token windows, 16-bit
// dtypes, head_dim 16, 32 or 64, sm_80 and later. Included by window_attention.cu (its Geometry and
// arithmetic; see there for the semantics).
//
// One warp per (window, head), nothing in shared memory. A window's 16 rows of q, k, v (and dO) are
// loaded straight from the token-order tensors into tensor-core fragments (mma.cuh; lane 4g + t
// holds rows g and g + 8, and a quarter of each row's columns, see load_rows_frag); every product
// is mma.sync m16n8k16 with float32 accumulators; a 16 x 16 score tile lives in the accumulator
// layout, where a row's 16 entries are spread over the 4 lanes of a quad, so row maxima and sums are
// two shuffles; the accumulator layout of the probabilities is the A-operand layout of the next
// product, and operands needed transposed (V, dO, Kn, Qn, P, dCos) are transposed in registers with
// movmatrix. The arithmetic is that of the shared-memory kernels: norms, softmax and the softmax
// gradient in float32, q, k normalised and rounded to T before QK^T, P and dCos rounded to T before
// their products, dq and dk through the normalisation with the unrounded rows.
//
// Work split. Warp s of the grid takes head s % heads and the windows_per_warp consecutive windows of
// chunk s / heads (the heads of a window in neighbouring warps, so that a block reads longer runs of
// a token's row); the bias, 1 / tau and the lane's positions in a window are set up once per warp.
// The backward accumulates the bias gradient in registers (each lane owns 8 fixed (i, j) entries) and
// sum(dlogits * cos) for tau, and writes them as partial row s / heads: deterministic, no atomics.
#pragma once

#include "mma.cuh"

namespace am {
namespace wa {

constexpr int kMmaWarps = 4;  // warps per block of the register kernels
// On sm_90 the backward for head_dim <= 32 is held to 128 registers, so that 16 warps fit on an SM
// (SASS: 128 instead of 168 registers, two spilled values reloaded per window); at head_dim 64, or
// on sm_80 (whose code then spills dozens of values inside the loop), it is not.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kBackwardMinBlocks = 1;
#else
constexpr int kBackwardMinBlocks = 4;
#endif

// Where this lane's rows (g, g + 8) sit inside a window, as (time, frequency) offsets from its
// corner (from the host's tables), and which of the lane's 8 score entries get the shift mask in a
// window of the last row (mask_t) or of the last column (mask_f): bit 4 nt + i for entry (nt, i) of
// the accumulator layout (see Acc16). The same for every window.
//
// Shift regions (window_attention.cu's header) differ inside a window only in the last window row
// (time) or column (frequency): there, position offset d along an axis with window w and shift s > 0
// is on the far side when d >= w - s, and two positions are masked when they are on different sides
// along either axis.
struct LanePos {
  int rt[2], rf[2];
  unsigned mask_t, mask_f;
};

__device__ __forceinline__ void lane_positions(const Geometry& g, int lane, LanePos& p) {
  const int gq = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int a = gq + 8 * hr;
    p.rt[hr] = (int)(g.pos_t >> (4 * a)) & 15;
    p.rf[hr] = (int)(g.pos_f >> (4 * a)) & 15;
  }
  p.mask_t = p.mask_f = 0;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = 8 * nt + 2 * t + (i & 1);
      const int ct = (int)(g.pos_t >> (4 * col)) & 15, cf = (int)(g.pos_f >> (4 * col)) & 15;
      const int hr = i >> 1;
      if (g.st > 0 && (p.rt[hr] >= g.wt - g.st) != (ct >= g.wt - g.st)) p.mask_t |= 1u << (4 * nt + i);
      if (g.sf > 0 && (p.rf[hr] >= g.wf - g.sf) != (cf >= g.wf - g.sf)) p.mask_f |= 1u << (4 * nt + i);
    }
}

// Window number w as (sample, window row, window column), stepped to the next window without
// divisions (a warp's windows are consecutive).
struct WindowCursor {
  int b, row, col;
  __device__ __forceinline__ WindowCursor(const Geometry& g, int w) {
    const int per_sample = g.nwt * g.nwf;
    b = w / per_sample;
    const int wi = w - b * per_sample;
    row = wi / g.nwf;
    col = wi - row * g.nwf;
  }
  __device__ __forceinline__ void next(const Geometry& g) {
    if (++col == g.nwf) {
      col = 0;
      if (++row == g.nwt) {
        row = 0;
        ++b;
      }
    }
  }
};

// The window for this lane: the tokens of rows g and g + 8, and its masked score entries.
struct LaneWindow {
  int tok[2];
  unsigned masked;
};

__device__ __forceinline__ void lane_window(const Geometry& g, const LanePos& p, const WindowCursor& cur,
                                            LaneWindow& lw) {
  const int t0 = cur.row * g.wt + g.st, f0 = cur.col * g.wf + g.sf;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    int t = t0 + p.rt[hr], f = f0 + p.rf[hr];  // rolled back to the original grid: < 2T, < 2F
    if (t >= g.T) t -= g.T;
    if (f >= g.F) f -= g.F;
    lw.tok[hr] = t * g.F + f;
  }
  lw.masked = (cur.row == g.nwt - 1 ? p.mask_t : 0u) | (cur.col == g.nwf - 1 ? p.mask_f : 0u);
}

// A 16 x 16 float32 tile in the accumulator layout: v[nt][i] is row g + 8 (i / 2), column
// 8 nt + 2t + i % 2 (column index 2 nt + i % 2 of the lane's four, LanePos::ct/cf order).
struct Acc16 {
  float v[2][4];
};

__device__ __forceinline__ void zero(Acc16& a) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) a.v[nt][i] = 0.f;
}

// acc += A Bt^T over one 16-wide k chunk: A's rows are acc's rows, Bt's rows are acc's columns.
template <typename T>
__device__ __forceinline__ void mma_abt(Acc16& acc, const Tile16& a, const Tile16& bt) {
  mma16816<T>(acc.v[0], a, bt.r[0], bt.r[2]);
  mma16816<T>(acc.v[1], a, bt.r[1], bt.r[3]);
}

// The tile rounded to T, as an A operand (register hr + 2 nt holds v[nt][2 hr], v[nt][2 hr + 1]).
template <typename T>
__device__ __forceinline__ Tile16 to_tile(const Acc16& a) {
  Tile16 t;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) t.r[hr + 2 * nt] = pack2<T>(a.v[nt][2 * hr], a.v[nt][2 * hr + 1]);
  return t;
}

// Rows and columns. Lane 4g + t holds rows g and g + 8 and, of each, the D / 4 contiguous columns
// [t D / 4, (t + 1) D / 4): one 8- or 16-byte access per row (two for D = 64) when kVec. Its pair j
// of columns (t D / 4 + 2j, + 1) is the pair at columns 2t (j even) or 2t + 8 (j odd) of tile j / 2.
// So the tiles hold the columns in another order than the matrix; every product contracts over
// the columns of both its operands in the same order, or (P V, dCos Kn, P^T dO, dCos^T Qn) puts
// them in its result's columns in that order, which the stores undo: the results are unchanged.
template <int N>
struct alignas(N >= 4 ? 16 : 4 * N) Words {
  uint32_t w[N];
};

// A vector access on a GPU faults unless aligned to its size; x86 does not care, so the emulation
// checks (the host's rows_vec_aligned decides which accesses are vectors).
__device__ __forceinline__ void check_vec_aligned(const void* p, size_t bytes) {
#ifdef AUDIOMAE_EMULATE
  if (reinterpret_cast<uintptr_t>(p) % bytes) emu::fail("misaligned vector access");
#else
  (void)p;
  (void)bytes;
#endif
}

// Rows g and g + 8 (starting at r0 and r1) of a [16, D] matrix, as D / 16 tiles.
template <typename T, int D, bool kVec>
__device__ __forceinline__ void load_rows_frag(Tile16 (&x)[D / 16], const T* r0, const T* r1, int t) {
  constexpr int P = D / 8;  // pairs per lane and row
  const T* rows[2] = {r0 + t * (D / 4), r1 + t * (D / 4)};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    Words<P> v;
    if constexpr (kVec) {
      check_vec_aligned(rows[hr], alignof(Words<P>));
      v = *reinterpret_cast<const Words<P>*>(rows[hr]);
    } else {
#pragma unroll
      for (int j = 0; j < P; ++j) v.w[j] = load_pair<T>(rows[hr] + 2 * j);
    }
#pragma unroll
    for (int j = 0; j < P; ++j) x[j >> 1].r[hr + 2 * (j & 1)] = v.w[j];
  }
}

// Rows g and g + 8 of a product [16, D] (D / 16 accumulator tiles, columns in the tiles' order)
// rounded to T and stored at r0 and r1.
template <typename T, int D, bool kVec>
__device__ __forceinline__ void store_rows_acc(T* r0, T* r1, const Acc16 (&x)[D / 16], int t) {
  constexpr int P = D / 8;
  T* rows[2] = {r0 + t * (D / 4), r1 + t * (D / 4)};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    Words<P> v;
#pragma unroll
    for (int j = 0; j < P; ++j) v.w[j] = pack2<T>(x[j >> 1].v[j & 1][2 * hr], x[j >> 1].v[j & 1][2 * hr + 1]);
    if constexpr (kVec) {
      check_vec_aligned(rows[hr], alignof(Words<P>));
      *reinterpret_cast<Words<P>*>(rows[hr]) = v;
    } else {
#pragma unroll
      for (int j = 0; j < P; ++j) store_pair<T>(rows[hr] + 2 * j, v.w[j]);
    }
  }
}

// |x|^2 of rows g and g + 8 (float32, reduced over the quad), and 1 / max(|x|, 1e-12) from it.
template <typename T, int D>
__device__ __forceinline__ void row_norms(const Tile16 (&x)[D / 16], float sq[2], float inv[2]) {
  float ss[2] = {0.f, 0.f};
#pragma unroll
  for (int c = 0; c < D / 16; ++c)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float lo = lo_of<T>(x[c].r[r]), hi = hi_of<T>(x[c].r[r]);
      ss[r & 1] = fmaf(lo, lo, ss[r & 1]);
      ss[r & 1] = fmaf(hi, hi, ss[r & 1]);
    }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    sq[hr] = group_sum(ss[hr], 4);
    inv[hr] = rsqrtf(fmaxf(sq[hr], 1e-24f));  // within 2 ulp of 1 / max(sqrt(sq), 1e-12)
  }
}

// x * (1 / max(|x|, 1e-12)) per row, rounded to T.
template <typename T, int D>
__device__ __forceinline__ void normalized(Tile16 (&y)[D / 16], const Tile16 (&x)[D / 16], const float inv[2]) {
#pragma unroll
  for (int c = 0; c < D / 16; ++c)
#pragma unroll
    for (int r = 0; r < 4; ++r)
      y[c].r[r] = pack2<T>(lo_of<T>(x[c].r[r]) * inv[r & 1], hi_of<T>(x[c].r[r]) * inv[r & 1]);
}

// Logits of the lane's 8 entries: cos / tau_c + bias + shift mask (-100 added across regions).
__device__ __forceinline__ void logits(Acc16& s, const Acc16& cosine, float inv_tau, const float (&bias)[2][4],
                                       const LaneWindow& lw) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float x = fmaf(cosine.v[nt][i], inv_tau, bias[nt][i]);
      if ((lw.masked >> (4 * nt + i)) & 1u) x -= 100.f;
      s.v[nt][i] = x;
    }
}

// Softmax of each row of the tile, in place (float32).
__device__ __forceinline__ void softmax_rows(Acc16& s) {
  constexpr float kLog2e = 1.4426950408889634f;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float m = fmaxf(fmaxf(s.v[0][2 * hr], s.v[0][2 * hr + 1]), fmaxf(s.v[1][2 * hr], s.v[1][2 * hr + 1]));
    m = group_max(m, 4);
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float x = exp2f((s.v[nt][2 * hr + e] - m) * kLog2e);
        s.v[nt][2 * hr + e] = x;
        sum += x;
      }
    const float inv = __fdividef(1.0f, group_sum(sum, 4));  // sum in [1, 16]
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) s.v[nt][2 * hr + e] *= inv;
  }
}

// The lane's 8 entries of bias[h] ([16, 16] float32).
__device__ __forceinline__ void load_bias(float (&out)[2][4], const float* bias_h, int lane) {
  const int gq = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) out[nt][i] = bias_h[(gq + 8 * (i >> 1)) * 16 + 8 * nt + 2 * t + (i & 1)];
}

// Gradient through F.normalize for rows g, g + 8: (dn - n <dn, n>) / max(|x|, 1e-12), n = x * inv
// in float32 from the raw rows x; no projection where |x| < 1e-12 (the clamp's side; sq = |x|^2).
template <typename T, int D>
__device__ __forceinline__ void normalize_grad(Acc16 (&dn)[D / 16], const Tile16 (&x)[D / 16], const float sq[2],
                                               const float inv[2]) {
  float dot[2] = {0.f, 0.f};
#pragma unroll
  for (int c = 0; c < D / 16; ++c)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const uint32_t reg = x[c].r[hr + 2 * nt];
        dot[hr] = fmaf(dn[c].v[nt][2 * hr], lo_of<T>(reg) * inv[hr], dot[hr]);
        dot[hr] = fmaf(dn[c].v[nt][2 * hr + 1], hi_of<T>(reg) * inv[hr], dot[hr]);
      }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    dot[hr] = group_sum(dot[hr], 4);
    if (!(sq[hr] >= 1e-24f)) dot[hr] = 0.f;
  }
#pragma unroll
  for (int c = 0; c < D / 16; ++c)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const uint32_t reg = x[c].r[hr + 2 * nt];
        float& a = dn[c].v[nt][2 * hr];
        float& b = dn[c].v[nt][2 * hr + 1];
        a = (a - lo_of<T>(reg) * inv[hr] * dot[hr]) * inv[hr];
        b = (b - hi_of<T>(reg) * inv[hr] * dot[hr]) * inv[hr];
      }
}

// A warp's work: head h and the windows [first, last) of its chunk, and what it sets up once for
// them. False for the warps past the last (chunk, head) of the grid.
struct WarpTask {
  int chunk, h, first, last;
  LanePos pos;
  float bias[2][4];
  float inv_tau;
};

__device__ __forceinline__ bool warp_task(const Geometry& g, const float* tau_c, const float* bias,
                                          int windows_per_warp, int chunks, WarpTask& w) {
  const int64_t slot = (int64_t)blockIdx.x * kMmaWarps + (threadIdx.x >> 5);
  if (slot >= (int64_t)chunks * g.H) return false;
  const int lane = threadIdx.x & 31;
  w.chunk = (int)(slot / g.H);
  w.h = (int)(slot - (int64_t)w.chunk * g.H);
  w.first = w.chunk * windows_per_warp;
  w.last = imin(w.first + windows_per_warp, g.n_windows);
  lane_positions(g, lane, w.pos);
  load_bias(w.bias, bias + (size_t)w.h * 256, lane);
  w.inv_tau = 1.0f / tau_c[w.h];
  return true;
}

// One window and head up to the probabilities: q and k normalised (float32 norms, rounded to T),
// their cosines and the softmax of the logits.
template <int D>
struct Scores {
  Tile16 qn[D / 16], kn[D / 16];
  float qsq[2], qinv[2], ksq[2], kinv[2];
  Acc16 cosine, p;
};

template <typename T, int D>
__device__ __forceinline__ void window_scores(Scores<D>& sc, const Tile16 (&q)[D / 16], const Tile16 (&k)[D / 16],
                                              const WarpTask& w, const LaneWindow& lw) {
  row_norms<T, D>(q, sc.qsq, sc.qinv);
  normalized<T, D>(sc.qn, q, sc.qinv);
  row_norms<T, D>(k, sc.ksq, sc.kinv);
  normalized<T, D>(sc.kn, k, sc.kinv);
  zero(sc.cosine);
#pragma unroll
  for (int c = 0; c < D / 16; ++c) mma_abt<T>(sc.cosine, sc.qn[c], sc.kn[c]);
  logits(sc.p, sc.cosine, w.inv_tau, w.bias, lw);
  softmax_rows(sc.p);
}

template <typename T, int D, bool kVec>
__global__ void __launch_bounds__(32 * kMmaWarps) wa_forward_mma_kernel(const T* __restrict__ qkv,
                                                                        const float* __restrict__ tau_c,
                                                                        const float* __restrict__ bias,
                                                                        T* __restrict__ out, Geometry g,
                                                                        int windows_per_warp, int chunks) {
  constexpr int NC = D / 16;
  WarpTask w;
  if (!warp_task(g, tau_c, bias, windows_per_warp, chunks, w)) return;  // the whole warp; no barrier follows
  const int t = threadIdx.x & 3, C = g.C;
  WindowCursor cur(g, w.first);
  for (int win = w.first; win < w.last; ++win, cur.next(g)) {
    LaneWindow lw;
    lane_window(g, w.pos, cur, lw);
    const T* src = qkv + (int64_t)cur.b * g.qkv_sb + (int64_t)w.h * D;
    const T* r0 = src + (int64_t)lw.tok[0] * g.qkv_sl;
    const T* r1 = src + (int64_t)lw.tok[1] * g.qkv_sl;
    Tile16 q[NC], k[NC], v[NC];
    load_rows_frag<T, D, kVec>(q, r0, r1, t);
    load_rows_frag<T, D, kVec>(k, r0 + C, r1 + C, t);
    load_rows_frag<T, D, kVec>(v, r0 + 2 * C, r1 + 2 * C, t);
    Scores<D> sc;
    window_scores<T, D>(sc, q, k, w, lw);
    const Tile16 p = to_tile<T>(sc.p);

    Acc16 o[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      zero(o[c]);
      mma_abt<T>(o[c], p, transpose16(v[c]));
    }
    T* dst = out + (int64_t)cur.b * g.out_sb + (int64_t)w.h * D;
    store_rows_acc<T, D, kVec>(dst + (int64_t)lw.tok[0] * g.out_sl, dst + (int64_t)lw.tok[1] * g.out_sl, o, t);
  }
}

template <typename T, int D, bool kVec>
__global__ void __launch_bounds__(32 * kMmaWarps, D <= 32 ? kBackwardMinBlocks : 1) wa_backward_mma_kernel(
    const T* __restrict__ qkv, const T* __restrict__ gout, const float* __restrict__ tau_c,
    const float* __restrict__ bias, T* __restrict__ dqkv, float* __restrict__ dtau_part,
    float* __restrict__ dbias_part, Geometry g, int windows_per_warp, int chunks) {
  constexpr int NC = D / 16;
  WarpTask w;
  if (!warp_task(g, tau_c, bias, windows_per_warp, chunks, w)) return;  // the whole warp; no barrier follows
  const int lane = threadIdx.x & 31, t = lane & 3, gq = lane >> 2, C = g.C;
  Acc16 dbias;
  zero(dbias);
  float dtau = 0.f;
  WindowCursor cur(g, w.first);
  for (int win = w.first; win < w.last; ++win, cur.next(g)) {
    LaneWindow lw;
    lane_window(g, w.pos, cur, lw);
    const T* src = qkv + (int64_t)cur.b * g.qkv_sb + (int64_t)w.h * D;
    const T* r0 = src + (int64_t)lw.tok[0] * g.qkv_sl;
    const T* r1 = src + (int64_t)lw.tok[1] * g.qkv_sl;
    const T* go = gout + (int64_t)cur.b * g.out_sb + (int64_t)w.h * D;
    Tile16 q[NC], k[NC], v[NC], dout[NC];
    load_rows_frag<T, D, kVec>(q, r0, r1, t);
    load_rows_frag<T, D, kVec>(k, r0 + C, r1 + C, t);
    load_rows_frag<T, D, kVec>(v, r0 + 2 * C, r1 + 2 * C, t);
    load_rows_frag<T, D, kVec>(dout, go + (int64_t)lw.tok[0] * g.out_sl, go + (int64_t)lw.tok[1] * g.out_sl, t);

    Scores<D> sc;
    window_scores<T, D>(sc, q, k, w, lw);
    const Acc16& p = sc.p;
    Acc16 dp;  // dP = dO V^T
    zero(dp);
#pragma unroll
    for (int c = 0; c < NC; ++c) mma_abt<T>(dp, dout[c], v[c]);

    // ds = p (dp - sum_j p dp); dtau += ds cos; dbias += ds; dCos = ds / tau_c
    Acc16 dc;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float dot = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) dot = fmaf(p.v[nt][2 * hr + e], dp.v[nt][2 * hr + e], dot);
      dot = group_sum(dot, 4);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 2 * hr + e;
          const float ds = p.v[nt][i] * (dp.v[nt][i] - dot);
          dtau = fmaf(ds, sc.cosine.v[nt][i], dtau);
          dbias.v[nt][i] += ds;
          dc.v[nt][i] = ds * w.inv_tau;
        }
    }
    const Tile16 pt = to_tile<T>(p), dct = to_tile<T>(dc);

    T* dst = dqkv + (int64_t)cur.b * g.dq_sb + (int64_t)w.h * D;
    T* w0 = dst + (int64_t)lw.tok[0] * g.dq_sl;
    T* w1 = dst + (int64_t)lw.tok[1] * g.dq_sl;
    Acc16 acc[NC];
    // dV = P^T dO
    const Tile16 ptt = transpose16(pt);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      zero(acc[c]);
      mma_abt<T>(acc[c], ptt, transpose16(dout[c]));
    }
    store_rows_acc<T, D, kVec>(w0 + 2 * C, w1 + 2 * C, acc, t);
    // dQn = dCos Kn, then through the normalisation of q
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      zero(acc[c]);
      mma_abt<T>(acc[c], dct, transpose16(sc.kn[c]));
    }
    normalize_grad<T, D>(acc, q, sc.qsq, sc.qinv);
    store_rows_acc<T, D, kVec>(w0, w1, acc, t);
    // dKn = dCos^T Qn, then through the normalisation of k
    const Tile16 dctt = transpose16(dct);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      zero(acc[c]);
      mma_abt<T>(acc[c], dctt, transpose16(sc.qn[c]));
    }
    normalize_grad<T, D>(acc, k, sc.ksq, sc.kinv);
    store_rows_acc<T, D, kVec>(w0 + C, w1 + C, acc, t);
  }

  // partial row `chunk`: each (i, j) of the bias gradient belongs to exactly one lane
  float* db = dbias_part + ((size_t)w.chunk * g.H + w.h) * 256;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) db[(gq + 8 * (i >> 1)) * 16 + 8 * nt + 2 * t + (i & 1)] = dbias.v[nt][i];
  dtau = group_sum(dtau, 32);
  if (lane == 0) dtau_part[(size_t)w.chunk * g.H + w.h] = dtau;
}

}  // namespace wa
}  // namespace am
