/* The C launch API of the CUDA kernels: plain pointers, sizes and strides, a stream.
 *
 * The kernels (*.cu) need only the CUDA toolkit; the Python binding (bindings.cpp) checks tensors,
 * allocates outputs and calls these functions. Every function returns 0 on success, a negative
 * AM_ERR_* code for bad arguments, or a positive cudaError_t; am_error_string() explains a code.
 * Strides are in elements. `stream` is a cudaStream_t; `device` is the CUDA device index the
 * pointers live on (the launch functions make it current for the launch and restore the caller's).
 */
#ifndef AUDIOMAE_CUDA_H_
#define AUDIOMAE_CUDA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum am_dtype { AM_FLOAT32 = 0, AM_FLOAT16 = 1, AM_BFLOAT16 = 2 };

enum am_status {
  AM_OK = 0,
  AM_ERR_ARGS = -1,         /* unsupported or inconsistent sizes */
  AM_ERR_SHARED_MEM = -2,   /* the window / head size needs more shared memory than the device has */
  AM_ERR_KERNEL_CHOICE = -3, /* AUDIOMAE_CUDA_WA_KERNEL names no kernel, or one that does not apply */
  AM_ERR_WINDOWS_PER_WARP = -4, /* AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP is not an integer in 1..64 */
  AM_ERR_PLAN = -5,             /* the caller's partial-sum buffers do not match the launch's plan */
  AM_ERR_FBANK_TUNING = -6      /* AUDIOMAE_CUDA_FBANK_WARPS or AUDIOMAE_CUDA_FBANK_FRAMES_PER_WARP is invalid */
};

/* Limits of the window attention kernels (the Python side repeats them in audiomae/ops_cuda.py). */
#define AM_WA_MAX_AREA 64
#define AM_WA_MAX_HEAD_DIM 128

/* Shifted-window cosine attention. qkv is [batch, T*F, 3*C] in token order (time-major grid),
 * channels (3, heads, head_dim), the channel stride 1; C = heads * head_dim. Window and shift are
 * already clamped to the grid: the window tiles the grid and 0 <= shift < window per axis. */
typedef struct {
  int dtype;                                 /* am_dtype of qkv, out, grad_out, grad_qkv */
  int device;
  int batch, grid_t, grid_f, win_t, win_f, shift_t, shift_f, heads, head_dim;
  int64_t qkv_stride_b, qkv_stride_l;        /* qkv */
  int64_t out_stride_b, out_stride_l;        /* forward: out; backward: grad_out */
  int64_t dqkv_stride_b, dqkv_stride_l;      /* backward: grad_qkv */
} am_wa_args;

/* Two sets of kernels, one warp per (window, head) in both:
 * AM_WA_KERNEL_SMEM: every window size and dtype; rows staged in shared memory, wmma tensor cores for
 *   16-bit dtypes when the area and head_dim are multiples of 16;
 * AM_WA_KERNEL_MMA: 16-token windows, float16/bfloat16, head_dim 16, 32 or 64, sm_80+; everything in
 *   registers, mma.sync tensor cores. Chosen where it applies, unless the environment variable
 *   AUDIOMAE_CUDA_WA_KERNEL says smem (it may also say mma, or auto, the default). */
/* AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP = 1..64 sets windows_per_warp (a tuning knob; unset: automatic). */
#define AM_WA_KERNEL_SMEM 0
#define AM_WA_KERNEL_MMA 1

/* How a launch is laid out; the caller needs blocks_x to size the partial-sum buffers. */
typedef struct {
  int blocks_x;           /* backward: rows of the partial sums. smem kernels: the grid is (blocks_x, heads);
                             mma kernels: blocks_x chunks of windows_per_warp windows, a warp per (chunk, head) */
  int warps;              /* warps per block, one (window, head) at a time per warp */
  int windows_per_warp;   /* consecutive windows each warp takes (1 in the forward unless the knob sets it) */
  int wmma;               /* 1: the products run on tensor cores (16-bit inputs, area and head_dim % 16 == 0) */
  int64_t smem_bytes;     /* dynamic shared memory per block */
  int kernel;             /* AM_WA_KERNEL_SMEM or AM_WA_KERNEL_MMA */
} am_wa_plan;

int am_wa_make_plan(const am_wa_args* args, int backward, am_wa_plan* plan);

/* out[b, token, h*D + d] = softmax(cos(q, k) / tau_c[h] + bias[h] + shift mask) @ v for each window.
 * tau_c: [heads] float32, already clamped (max(tau, 0.01)); bias: [heads, A, A] float32 contiguous. */
int am_wa_forward(const am_wa_args* args, const void* qkv, const float* tau_c, const float* bias,
                  void* out, void* stream);

/* grad_qkv (same layout as qkv, every element written), and deterministic partial sums:
 * dtau_partial [blocks_x, heads] holds sum(dlogits * cos) (grad_tau = -sum / tau_c^2 where tau >= 0.01),
 * dbias_partial [blocks_x, heads, A, A] holds sum(dlogits); the caller sums over blocks_x.
 * partial_rows: the rows the caller allocated (blocks_x of its am_wa_make_plan call); AM_ERR_PLAN
 * when the launch's own plan differs (the environment changed in between). */
int am_wa_backward(const am_wa_args* args, const void* qkv, const void* grad_out, const float* tau_c,
                   const float* bias, void* grad_qkv, float* dtau_partial, float* dbias_partial,
                   int partial_rows, void* stream);

/* Unstructured random masking in one launch, one block per sample. Per sample the sort keys are
 * (noise, index) pairs: noise[b, l] (float32, any strides) when `noise` is not NULL, else the first
 * 32-bit word of Philox4x32-10 with key (seed_lo, seed_hi) and counter (n_lo, n_hi, offset_lo,
 * offset_hi), n = b * length + l. Ascending order of the keys is ids_shuffle (ties of equal noise
 * broken by the smaller index, i.e. a stable argsort; NaN sorts last, -0.0 equals 0.0).
 * Writes ids_keep [batch, len_keep] int64 (contiguous), ids_restore [batch, length] int64 and
 * mask [batch, length] float32 (1 = removed). length <= AM_MASK_MAX_LENGTH. */
#define AM_MASK_MAX_LENGTH 4096
int am_random_masking(int batch, int length, int len_keep, uint64_t seed, uint64_t offset,
                      const float* noise, int64_t noise_stride_b, int64_t noise_stride_l,
                      int64_t* ids_keep, int64_t* ids_restore, float* mask, int device, void* stream);

/* Kaldi-compatible log-mel filterbank (the release's front end) of 16 kHz clips, written as the model
 * input: wave [batch, samples] float32 (any strides) minus clip_mean[b] (NULL: 0), frames of 400 samples
 * every 160 (snip_edges), DC removal, pre-emphasis 0.97, window[400], 512-point power spectrum,
 * mel filter m = sum over q < mel_off[m + 1] - mel_off[m] of mel_w[mel_off[m] + q] * power[mel_lo[m] + q]
 * (bins <= 255), log(max(e, float32 eps)), then (v - norm_mean) / norm_scale
 * when normalize is 1. out [batch, t_out, num_mel] (strides in elements, any dtype of am_dtype): row t
 * holds frame t for t < 1 + (samples - 400) / 160, padding (0 before normalisation) after it.
 * Tuning knobs (read at each launch; unset: 4 and 4): AUDIOMAE_CUDA_FBANK_WARPS = 1, 2 or 4 warps per
 * block, AUDIOMAE_CUDA_FBANK_FRAMES_PER_WARP = 1..64 frames per warp; other values: AM_ERR_FBANK_TUNING.
 * twiddle [2 * 16 * 32] float64: cos of 2 pi (n2 * k1 mod 512) / 512 at k1 * 32 + n2, its sin 512 later.
 * The tables are trusted (audiomae.ops_cuda.fbank_tables builds them): every filter's bins lie in 0..255
 * and mel_off is non-decreasing up to the length of mel_w. t_out <= 2^30; norm_mean and norm_scale finite,
 * norm_scale non-zero. */
typedef struct {
  int dtype; /* am_dtype of out */
  int device;
  int batch, t_out, num_mel, normalize;
  int64_t samples;
  int64_t wave_stride_b, wave_stride_n;
  int64_t out_stride_b, out_stride_t, out_stride_m;
  float norm_mean, norm_scale;
} am_fbank_args;

int am_fbank(const am_fbank_args* args, const float* wave, const float* clip_mean, const float* window,
             const double* twiddle, const int* mel_lo, const int* mel_off, const float* mel_w, void* out,
             void* stream);

/* Philox4x32-10 (Random123), for tests of the generator: out[0..3] for counter ctr[0..3], key[0..1]. */
void am_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

const char* am_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* AUDIOMAE_CUDA_H_ */
