// Kaldi-compatible log-mel filterbank on the GPU: waveforms -> the normalised model input in one launch.
//
// One warp per frame (400 samples every 160, snip_edges); each block of W warps takes W * F
// consecutive frames of one clip, warp w the frames first + w, first + w + W, ... (W = 4 and F = 4
// unless AUDIOMAE_CUDA_FBANK_WARPS = 1, 2 or 4 and AUDIOMAE_CUDA_FBANK_FRAMES_PER_WARP = 1..64 say
// otherwise: tuning knobs).
//
// Per frame:
//  1. in float32 and in the reference's order: samples minus the clip mean (the caller's), the frame
//     mean removed, pre-emphasis y[n] = x[n] - 0.97 x[n-1] (x[-1] = x[0]), the Hann window;
//  2. the 512-point real DFT in float64 as a four-step FFT, 512 = 16 x 32 with n = 32 n1 + n2 and
//     k = k1 + 16 k2: lane n2 holds y[32 n1 + n2] for n1 = 0..15 (the coalesced load order) and takes
//     their 16-point DFT in registers, times the twiddles W512^(n2 k1) (a float64 table, read
//     coalesced: entry k1 * 32 + n2); a transpose
//     through shared memory gives lanes 2 k1 and 2 k1 + 1 the even and odd n2 of column k1, each
//     takes the 16-point DFT of its half and the pair combines them (one shuffle per value) into bins
//     k1 + 16 k2, k2 = 0..15: bins 0..255 (Kaldi's filters give the Nyquist bin 256 no weight);
//  3. the power re^2 + im^2 (float32) to shared memory, the mel projection over each filter's
//     non-zero bins (lane m takes filters m, m + 32, ...), log(max(e, float32 eps)), (v - mean) / scale;
//  4. the row stored in the output dtype. Rows past the clip's last frame are padding: 0 before
//     normalisation. Frames past the output's rows are not computed.
// Why float64 in the FFT: pre-emphasis leaves the lowest bins 20-30 nats below a frame's peak, and
// an FFT's intermediate values carry the whole frame's energy, so float32 FFTs (this one in float32,
// cuFFT, pocketfft) are off by up to ~2e-3 nats there on the chirp fixture. In float64 what is left is
// the rounding of the float32 samples that the reference computes too (1.2e-3 nats from float64 at
// worst on that fixture). The FFT is about 700 float64 instructions per lane and frame (sm_90 code),
// a few percent of the dense DFT's work.
#include <cmath>
#include <cstdlib>

#include "common.cuh"

namespace am {
namespace fb {

constexpr int kWin = 400;
constexpr int kShift = 160;
constexpr int kMaxWarps = 4;       // warps per block: at most 4 (39 KB of shared memory), 4 unless tuned
constexpr int kFramesPerWarp = 4;  // frames each warp takes in a block, unless tuned (H100: 0.200-0.226 ms
                                   // for 64 clips of 10 s over every shape; 4 x 4 within 1 % of the best)
constexpr int kLd = 34;            // row stride (elements) of the transpose buffers: conflict-free both ways
constexpr int kTransposeElems = 16 * kLd;
constexpr int kPowerFloats = 256;  // bins 0..255
constexpr size_t kWarpBytes = 2 * kTransposeElems * sizeof(double) + kPowerFloats * sizeof(float);
constexpr float kPreemph = 0.97f;
constexpr float kFloor = 1.1920928955078125e-07f;  // float32 eps, the floor of the mel energies

// (re, im) times e^{-i theta} with c = cos theta, s = sin theta
__device__ __forceinline__ void rotate(double& re, double& im, double c, double s) {
  const double r = re * c + im * s;
  im = im * c - re * s;
  re = r;
}

// cos(2 pi m / 16) and sin(2 pi m / 16), m = 0..7
__device__ __forceinline__ double cos16(int m) {
  constexpr double c[8] = {1.0, 0.9238795325112867, 0.7071067811865476, 0.3826834323650898,
                           0.0, -0.3826834323650898, -0.7071067811865476, -0.9238795325112867};
  return c[m];
}
__device__ __forceinline__ double sin16(int m) {
  constexpr double s[8] = {0.0, 0.3826834323650898, 0.7071067811865476, 0.9238795325112867,
                           1.0, 0.9238795325112867, 0.7071067811865476, 0.3826834323650898};
  return s[m];
}

// One radix-2 stage of span HALF: butterflies (a, a + HALF) with the twiddle W16^(j * 8 / HALF).
template <int HALF>
__device__ __forceinline__ void dft16_stage(double (&r)[16], double (&i)[16]) {
#pragma unroll
  for (int base = 0; base < 16; base += 2 * HALF) {
#pragma unroll
    for (int j = 0; j < HALF; ++j) {
      const int m = j * (8 / HALF);
      const int a = base + j, b = a + HALF;
      double vr = r[b], vi = i[b];
      if (m == 4) {  // times -i
        vr = i[b];
        vi = -r[b];
      } else if (m != 0) {
        rotate(vr, vi, cos16(m), sin16(m));
      }
      r[b] = r[a] - vr;
      i[b] = i[a] - vi;
      r[a] = r[a] + vr;
      i[a] = i[a] + vi;
    }
  }
}

// In place: X[k] = sum over n of x[n] e^{-2 pi i n k / 16}, radix 2 (decimation in time) in registers.
// Every index is a compile-time constant, so the bit reversal is free and trivial twiddles cost nothing.
__device__ __forceinline__ void dft16(double (&re)[16], double (&im)[16]) {
  double r[16], i[16];
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    const int rev = ((n & 1) << 3) | ((n & 2) << 1) | ((n & 4) >> 1) | ((n & 8) >> 3);
    r[n] = re[rev];
    i[n] = im[rev];
  }
  dft16_stage<1>(r, i);
  dft16_stage<2>(r, i);
  dft16_stage<4>(r, i);
  dft16_stage<8>(r, i);
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    re[n] = r[n];
    im[n] = i[n];
  }
}

// cos(2 pi k / 32) and sin(2 pi k / 32), k = 0..15
__device__ __forceinline__ double cos32(int k) {
  constexpr double c[16] = {1.0, 0.9807852804032304, 0.9238795325112867, 0.8314696123025452,
                            0.7071067811865476, 0.5555702330196022, 0.3826834323650898, 0.19509032201612825,
                            0.0, -0.19509032201612825, -0.3826834323650898, -0.5555702330196022,
                            -0.7071067811865476, -0.8314696123025452, -0.9238795325112867, -0.9807852804032304};
  return c[k];
}
__device__ __forceinline__ double sin32(int k) { return k <= 8 ? cos32(8 - k) : cos32(k - 8); }

template <typename OutT>
__global__ void __launch_bounds__(kMaxWarps * 32) fbank_kernel(
    const float* __restrict__ wave, int64_t wave_sb, int64_t wave_sn, const float* __restrict__ clip_mean,
    int chunks, int frames_per_warp, int frames, int t_out, int num_mel, const float* __restrict__ window,
    const double* __restrict__ twiddle, const int* __restrict__ mel_lo, const int* __restrict__ mel_off,
    const float* __restrict__ mel_w, OutT* __restrict__ out, int64_t out_sb, int64_t out_st, int64_t out_sm,
    int normalize, float norm_mean, float norm_scale) {
  AM_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  double* t_re = reinterpret_cast<double*>(smem + warp * kWarpBytes);  // [16 k1][kLd], columns n2
  double* t_im = t_re + kTransposeElems;
  float* power = reinterpret_cast<float*>(t_im + kTransposeElems);  // [256] bins
  const int64_t b = blockIdx.x / chunks;
  const int first = (blockIdx.x % chunks) * (warps * frames_per_warp) + warp;
  const float* clip = wave + b * wave_sb;
  OutT* rows = out + b * out_sb;
  const float pad = normalize ? (0.0f - norm_mean) / norm_scale : 0.0f;
  const float mean_c = clip_mean != nullptr ? clip_mean[b] : 0.0f;
  const int k1 = lane >> 1, odd = lane & 1;  // the column and half of the second stage

  for (int it = 0; it < frames_per_warp; ++it) {
    const int t = first + it * warps;  // the same for the whole warp
    if (t >= t_out) break;
    if (t >= frames) {  // padding row
      for (int m = lane; m < num_mel; m += 32) rows[(int64_t)t * out_st + m * out_sm] = from_float<OutT>(pad);
      continue;
    }
    // 1. samples, frame mean, pre-emphasis and window in float32, in the reference's order
    const float* x0 = clip + (int64_t)t * kShift * wave_sn;
    float x[16];
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int n = 32 * j + lane;
      x[j] = n < kWin ? x0[n * wave_sn] - mean_c : 0.0f;
      sum += x[j];
    }
    const float mean = group_sum(sum, 32) / (float)kWin;
    double re[16], im[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int n = 32 * j + lane;
      float y = 0.0f;
      if (n < kWin) {
        const float prev = n > 0 ? x0[(n - 1) * wave_sn] - mean_c : x[0];
        const float d = x[j] - mean, d_prev = prev - mean;
        y = (d - __fmul_rn(kPreemph, d_prev)) * window[n];  // rounded product, not an FMA: the reference's
      }
      re[j] = (double)y;
      im[j] = 0.0;
    }
    // 2a. 16-point DFTs over n1, then the twiddles W512^(n2 k1)
    dft16(re, im);
#pragma unroll
    for (int k = 1; k < 16; ++k) rotate(re[k], im[k], twiddle[k * 32 + lane], twiddle[512 + k * 32 + lane]);
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      t_re[k * kLd + lane] = re[k];
      t_im[k * kLd + lane] = im[k];
    }
    __syncwarp();
    // 2b. column k1: this lane's half (n2 = 2 m + odd), its 16-point DFT over m
#pragma unroll
    for (int m = 0; m < 16; ++m) {
      re[m] = t_re[k1 * kLd + 2 * m + odd];
      im[m] = t_im[k1 * kLd + 2 * m + odd];
    }
    dft16(re, im);
    // X[k1 + 16 k2] = E_even[k2] + W32^k2 E_odd[k2]: the odd lane applies W32^k2 (the even lane a
    // factor 1, exactly), then the even lane finishes k2 = 0..7 and the odd lane k2 = 8..15
#pragma unroll
    for (int k = 1; k < 16; ++k) rotate(re[k], im[k], odd ? cos32(k) : 1.0, odd ? sin32(k) : 0.0);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const double got_r = __shfl_xor_sync(kFullMask, odd ? re[k] : re[k + 8], 1);
      const double got_i = __shfl_xor_sync(kFullMask, odd ? im[k] : im[k + 8], 1);
      const double xr = odd ? got_r + re[k + 8] : re[k] + got_r;
      const double xi = odd ? got_i + im[k + 8] : im[k] + got_i;
      power[k1 + 16 * (k + 8 * odd)] = (float)(xr * xr + xi * xi);
    }
    __syncwarp();
    // 3. mel projection, log, normalisation
    for (int m = lane; m < num_mel; m += 32) {
      const int lo = mel_lo[m], o0 = mel_off[m], o1 = mel_off[m + 1];
      // 0, or NaN when a sample is NaN or infinite: the reference's energies are all NaN then (its
      // product over all bins sees 0 * NaN), those of filters without bins included
      float e = mean - mean;
      for (int q = o0; q < o1; ++q) e += mel_w[q] * power[lo + q - o0];
      float v = logf(e < kFloor ? kFloor : e);  // NaN stays NaN, as the reference's clamp_min keeps it
      if (normalize) v = (v - norm_mean) / norm_scale;
      rows[(int64_t)t * out_st + m * out_sm] = from_float<OutT>(v);
    }
    // no barrier needed before the next frame: it writes the transpose buffers, last read before the
    // barrier above, and the power buffer only after its own first barrier
  }
}

// A tuning knob from the environment: unset or empty gives `fallback`; a value outside `allowed` -1.
int knob(const char* name, int fallback, int lo, int hi, bool power_of_two) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == 0) return fallback;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  const bool ok = *end == 0 && v >= lo && v <= hi && (!power_of_two || (v & (v - 1)) == 0);
  return ok ? (int)v : -1;
}

template <typename OutT>
int launch(const am_fbank_args* a, int warps, int frames_per_warp, const float* wave, const float* clip_mean,
           const float* window, const double* twiddle, const int* mel_lo, const int* mel_off, const float* mel_w,
           void* out, void* stream) {
  const int per_block = warps * frames_per_warp;
  const int chunks = (int)(((int64_t)a->t_out + per_block - 1) / per_block);
  const int frames = (int)(1 + (a->samples - kWin) / kShift);
  const size_t smem = kWarpBytes * warps;  // 9.5 KB per warp
  DeviceGuard guard(a->device);
  auto kernel = fbank_kernel<OutT>;
  AM_LAUNCH(kernel, dim3((unsigned)((int64_t)chunks * a->batch)), dim3(warps * 32), smem, stream, wave,
            a->wave_stride_b, a->wave_stride_n, clip_mean, chunks, frames_per_warp, frames, a->t_out, a->num_mel,
            window, twiddle, mel_lo, mel_off, mel_w, static_cast<OutT*>(out), a->out_stride_b, a->out_stride_t,
            a->out_stride_m, a->normalize, a->norm_mean, a->norm_scale);
  return (int)cudaGetLastError();
}

}  // namespace fb
}  // namespace am

extern "C" {

int am_fbank(const am_fbank_args* a, const float* wave, const float* clip_mean, const float* window,
             const double* twiddle, const int* mel_lo, const int* mel_off, const float* mel_w, void* out,
             void* stream) {
  if (a == nullptr || a->batch < 0 || a->samples < am::fb::kWin || a->t_out < 1 || a->t_out > (1 << 30) ||
      a->num_mel < 1 || !std::isfinite(a->norm_mean) || !std::isfinite(a->norm_scale) || a->norm_scale == 0.0f)
    return AM_ERR_ARGS;
  const int warps = am::fb::knob("AUDIOMAE_CUDA_FBANK_WARPS", am::fb::kMaxWarps, 1, am::fb::kMaxWarps, true);
  const int fpw = am::fb::knob("AUDIOMAE_CUDA_FBANK_FRAMES_PER_WARP", am::fb::kFramesPerWarp, 1, 64, false);
  if (warps < 0 || fpw < 0) return AM_ERR_FBANK_TUNING;
  const int64_t frames = 1 + (a->samples - am::fb::kWin) / am::fb::kShift;
  const int64_t chunks = (a->t_out + (int64_t)warps * fpw - 1) / ((int64_t)warps * fpw);
  if (frames > (int64_t)1 << 30 || chunks * a->batch > (int64_t)0x7fffffff) return AM_ERR_ARGS;
  if (a->batch == 0) return AM_OK;
  if (wave == nullptr || window == nullptr || twiddle == nullptr || mel_lo == nullptr || mel_off == nullptr ||
      mel_w == nullptr || out == nullptr)
    return AM_ERR_ARGS;
  switch (a->dtype) {
    case AM_FLOAT32:
      return am::fb::launch<float>(a, warps, fpw, wave, clip_mean, window, twiddle, mel_lo, mel_off, mel_w, out,
                                   stream);
    case AM_FLOAT16:
      return am::fb::launch<__half>(a, warps, fpw, wave, clip_mean, window, twiddle, mel_lo, mel_off, mel_w, out,
                                    stream);
    case AM_BFLOAT16:
      return am::fb::launch<__nv_bfloat16>(a, warps, fpw, wave, clip_mean, window, twiddle, mel_lo, mel_off, mel_w,
                                           out, stream);
    default:
      return AM_ERR_ARGS;
  }
}

}  // extern "C"
