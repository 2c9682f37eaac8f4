// The release's unstructured masking in one launch: noise, per-sample sort, ids_keep, ids_restore, mask.
//
// One block per sample. Every position l gets a 64-bit key (noise bits << 32 | l): the noise is either
// the caller's float32 value mapped to an unsigned integer of the same order, or 32 random bits of
// Philox4x32-10 from (seed, offset) and the position's counter. A bitonic sort of the keys in shared
// memory (length rounded up to a power of two, padding keys sort last) gives ids_shuffle = argsort of
// the noise; the index in the low bits makes every key distinct, so equal noise values keep index order
// (what a stable argsort does). The thread that holds rank r writes ids_keep[r] (r < len_keep),
// ids_restore[l] = r and mask[l] = (r >= len_keep) for l = ids_shuffle[r].
#include "common.cuh"

namespace am {
namespace mask {

// Random123's Philox4x32 with 10 rounds (the generator curand calls Philox4_32_10).
__host__ __device__ __forceinline__ void philox4x32_10(const uint32_t ctr_in[4], const uint32_t key_in[2],
                                                       uint32_t out[4]) {
  uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
  uint32_t k0 = key_in[0], k1 = key_in[1];
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = (uint64_t)0xD2511F53u * c0;
    const uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// An unsigned integer with the order of the float (-0.0 equal to 0.0, NaN after +inf).
__host__ __device__ __forceinline__ uint32_t orderable(float x) {
  if (x != x) return 0xFFFFFFFFu;
  if (x == 0.f) x = 0.f;
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(1024) random_masking_kernel(int L, int K, int N, uint64_t seed, uint64_t offset,
                                                              const float* __restrict__ noise, int64_t noise_sb,
                                                              int64_t noise_sl, int64_t* __restrict__ ids_keep,
                                                              int64_t* __restrict__ ids_restore,
                                                              float* __restrict__ mask) {
  AM_DYNAMIC_SMEM(smem);
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);  // [N], N = next_pow2(L)
  const int b = blockIdx.x;
  const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  for (int l = threadIdx.x; l < N; l += blockDim.x) {
    uint64_t k = ~0ull;  // padding: after every real key
    if (l < L) {
      uint32_t bits;
      if (noise != nullptr) {
        bits = orderable(noise[(int64_t)b * noise_sb + (int64_t)l * noise_sl]);
      } else {
        const uint64_t n = (uint64_t)b * (uint64_t)L + (uint64_t)l;
        const uint32_t ctr[4] = {(uint32_t)n, (uint32_t)(n >> 32), (uint32_t)offset, (uint32_t)(offset >> 32)};
        uint32_t r[4];
        philox4x32_10(ctr, key, r);
        bits = r[0];
      }
      k = ((uint64_t)bits << 32) | (uint32_t)l;
    }
    keys[l] = k;
  }
  __syncthreads();
  // bitonic sort, ascending: pair t compares i = 2t - (t mod j) with i + j
  for (int size = 2; size <= N; size <<= 1) {
    for (int j = size >> 1; j > 0; j >>= 1) {
      for (int t = threadIdx.x; t < (N >> 1); t += blockDim.x) {
        const int i = 2 * t - (t & (j - 1));
        const uint64_t x = keys[i], y = keys[i + j];
        const bool ascending = (i & size) == 0;
        if ((x > y) == ascending) {
          keys[i] = y;
          keys[i + j] = x;
        }
      }
      __syncthreads();
    }
  }
  for (int r = threadIdx.x; r < L; r += blockDim.x) {
    const int l = (int)(uint32_t)keys[r];
    if (r < K) ids_keep[(int64_t)b * K + r] = l;
    ids_restore[(int64_t)b * L + l] = r;
    mask[(int64_t)b * L + l] = r >= K ? 1.f : 0.f;
  }
}

}  // namespace mask
}  // namespace am

extern "C" {

void am_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  am::mask::philox4x32_10(ctr, key, out);
}

int am_random_masking(int batch, int length, int len_keep, uint64_t seed, uint64_t offset, const float* noise,
                      int64_t noise_stride_b, int64_t noise_stride_l, int64_t* ids_keep, int64_t* ids_restore,
                      float* mask, int device, void* stream) {
  if (batch < 0 || length < 0 || length > AM_MASK_MAX_LENGTH || len_keep < 0 ||
      len_keep > length)
    return AM_ERR_ARGS;
  if (batch == 0 || length == 0) return AM_OK;
  const int N = am::next_pow2(length);
  const int threads = am::imax(32, am::imin(1024, N / 2));
  const size_t smem = sizeof(uint64_t) * (size_t)N;  // <= 32 KB
  am::DeviceGuard guard(device);
  auto kernel = am::mask::random_masking_kernel;
  AM_LAUNCH(kernel, dim3(batch), dim3(threads), smem, stream, length, len_keep, N, seed, offset, noise, noise_stride_b,
            noise_stride_l, ids_keep, ids_restore, mask);
  return (int)cudaGetLastError();
}

const char* am_error_string(int code) {
  switch (code) {
    case AM_OK:
      return "no error";
    case AM_ERR_ARGS:
      return "unsupported or inconsistent sizes";
    case AM_ERR_SHARED_MEM:
      return "the window area and head size need more shared memory per block than this device allows";
    case AM_ERR_KERNEL_CHOICE:
      return "AUDIOMAE_CUDA_WA_KERNEL must be auto, smem or mma, and mma needs 16-token windows, float16 or "
             "bfloat16, head_dim 16, 32 or 64 and an sm_80 or newer GPU";
    case AM_ERR_WINDOWS_PER_WARP:
      return "AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP must be an integer from 1 to 64 (or unset)";
    case AM_ERR_PLAN:
      return "the partial-sum buffers were sized for another launch plan (did AUDIOMAE_CUDA_WA_KERNEL or "
             "AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP change during the call?)";
    case AM_ERR_FBANK_TUNING:
      return "AUDIOMAE_CUDA_FBANK_WARPS must be 1, 2 or 4 and AUDIOMAE_CUDA_FBANK_FRAMES_PER_WARP an integer from 1 "
             "to 64 (or unset)";
    default:
      return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

}  // extern "C"
