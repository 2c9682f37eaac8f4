// Python binding of the CUDA kernels: checks tensors, allocates outputs, calls the C launch API.
//
// Needs only torch's C++ headers and pybind11 (torch/extension.h), no CUDA headers: the caller passes
// the CUDA stream as an integer (torch.cuda.current_stream(device).cuda_stream), and the kernels'
// launch functions (audiomae_cuda.h) take plain pointers. The Python side (audiomae/ops_cuda.py)
// wraps these functions as torch.library custom ops.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <vector>

#include "audiomae_cuda.h"

namespace {

// Failed checks raise std::runtime_error (RuntimeError in Python) with a message built from
// std::string pieces. TORCH_CHECK's stream formatting (c10::str) is not used: a failed check with a
// formatted message crashed the process (SIGSEGV) in this extension on an H100 machine with
// torch 2.11+cu130, while messages without formatting raised normally.
std::string piece(const char* s) { return s; }
std::string piece(const std::string& s) { return s; }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string piece(T v) {
  return std::to_string(v);
}
std::string piece(at::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}
std::string piece(at::ScalarType t) { return c10::toString(t); }
std::string piece(const at::Device& d) { return d.str(); }

template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  ((s += piece(a)), ...);
  return s;
}

#define AM_CHECK(cond, ...)                                    \
  do {                                                         \
    if (!(cond)) throw std::runtime_error(cat(__VA_ARGS__));   \
  } while (0)

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return AM_FLOAT32;
    case at::kHalf:
      return AM_FLOAT16;
    case at::kBFloat16:
      return AM_BFLOAT16;
    default:
      AM_CHECK(false, "audiomae CUDA kernels take float32, float16 or bfloat16 tensors, got ", t.scalar_type());
  }
  return -1;
}

void check_status(int code, const char* what) {
  AM_CHECK(code == AM_OK, "audiomae CUDA ", what, " failed: ", am_error_string(code), " (code ", code, ")");
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<uintptr_t>(stream)); }

std::vector<int64_t> pair(const std::vector<int64_t>& v, const char* name) {
  AM_CHECK(v.size() == 2, name, " must have two entries (time, frequency), got ", v.size());
  return v;
}

at::Tensor output(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  return poison ? at::full(shape, std::numeric_limits<double>::quiet_NaN(), options) : at::empty(shape, options);
}

// Checks the window attention inputs and fills the launch arguments (strides of qkv; the others later).
am_wa_args wa_args(const at::Tensor& qkv, const at::Tensor& tau_c, const at::Tensor& bias,
                   const std::vector<int64_t>& grid_v, const std::vector<int64_t>& window_v,
                   const std::vector<int64_t>& shift_v, int64_t heads) {
  const auto grid = pair(grid_v, "grid"), window = pair(window_v, "window"), shift = pair(shift_v, "shift");
  AM_CHECK(qkv.is_cuda(), "qkv must be a CUDA tensor");
  AM_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0, "qkv must be [B, T*F, 3*C], got ", qkv.sizes());
  AM_CHECK(qkv.stride(2) == 1, "qkv's channels must be contiguous (stride 1)");
  AM_CHECK(heads > 0 && (qkv.size(2) / 3) % heads == 0, "C = ", qkv.size(2) / 3, " is not divisible by ", heads,
           " heads");
  AM_CHECK(grid[0] * grid[1] == qkv.size(1), "grid ", grid[0], " x ", grid[1], " does not match ", qkv.size(1),
           " tokens");
  const int64_t area = window[0] * window[1];
  AM_CHECK(tau_c.is_cuda() && tau_c.scalar_type() == at::kFloat && tau_c.is_contiguous() && tau_c.dim() == 1 &&
               tau_c.size(0) == heads,
           "tau_c must be a contiguous float32 CUDA tensor of ", heads, " elements");
  AM_CHECK(bias.is_cuda() && bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 3 &&
               bias.size(0) == heads && bias.size(1) == area && bias.size(2) == area,
           "bias must be a contiguous float32 CUDA tensor [", heads, ", ", area, ", ", area, "]");
  AM_CHECK(tau_c.device() == qkv.device() && bias.device() == qkv.device(),
           "qkv, tau_c and bias must be on one device");
  for (int64_t v : {grid[0], grid[1], window[0], window[1], shift[0], shift[1]})
    AM_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "grid, window and shift must be small non-negative integers");
  AM_CHECK(qkv.size(0) <= std::numeric_limits<int>::max(), "batch too large");
  am_wa_args a;
  a.dtype = dtype_code(qkv);
  a.device = qkv.get_device();
  a.batch = (int)qkv.size(0);
  a.grid_t = (int)grid[0];
  a.grid_f = (int)grid[1];
  a.win_t = (int)window[0];
  a.win_f = (int)window[1];
  a.shift_t = (int)shift[0];
  a.shift_f = (int)shift[1];
  a.heads = (int)heads;
  a.head_dim = (int)(qkv.size(2) / 3 / heads);
  a.qkv_stride_b = qkv.stride(0);
  a.qkv_stride_l = qkv.stride(1);
  a.out_stride_b = a.out_stride_l = a.dqkv_stride_b = a.dqkv_stride_l = 0;
  return a;
}

// softmax(cos(q, k) / tau_c + bias + shift mask) @ v per window and head: [B, T*F, 3C] -> [B, T*F, C].
at::Tensor window_attention_fwd(const at::Tensor& qkv, const at::Tensor& tau_c, const at::Tensor& bias,
                                std::vector<int64_t> grid, std::vector<int64_t> window, std::vector<int64_t> shift,
                                int64_t heads, int64_t stream, bool poison) {
  am_wa_args a = wa_args(qkv, tau_c, bias, grid, window, shift, heads);
  at::Tensor out = output({qkv.size(0), qkv.size(1), qkv.size(2) / 3}, qkv.options(), poison);
  a.out_stride_b = out.stride(0);
  a.out_stride_l = out.stride(1);
  check_status(am_wa_forward(&a, qkv.data_ptr(), tau_c.data_ptr<float>(), bias.data_ptr<float>(), out.data_ptr(),
                             as_stream(stream)),
               "window attention forward");
  return out;
}

// grad_qkv and the partial sums of the tau and bias gradients ([blocks, heads], [blocks, heads, A, A]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& tau_c, const at::Tensor& bias,
    std::vector<int64_t> grid, std::vector<int64_t> window, std::vector<int64_t> shift, int64_t heads,
    int64_t stream, bool poison) {
  am_wa_args a = wa_args(qkv, tau_c, bias, grid, window, shift, heads);
  AM_CHECK(grad_out.is_cuda() && grad_out.device() == qkv.device() && grad_out.scalar_type() == qkv.scalar_type(),
           "grad_out must be a CUDA tensor of qkv's device and dtype");
  AM_CHECK(grad_out.dim() == 3 && grad_out.size(0) == qkv.size(0) && grad_out.size(1) == qkv.size(1) &&
               grad_out.size(2) == qkv.size(2) / 3,
           "grad_out must be [B, T*F, C], got ", grad_out.sizes());
  AM_CHECK(grad_out.stride(2) == 1, "grad_out's channels must be contiguous (stride 1)");
  a.out_stride_b = grad_out.stride(0);
  a.out_stride_l = grad_out.stride(1);
  am_wa_plan plan;
  check_status(am_wa_make_plan(&a, 1, &plan), "window attention backward");
  const int64_t area = (int64_t)a.win_t * a.win_f;
  at::Tensor grad_qkv = output(qkv.sizes(), qkv.options(), poison);
  a.dqkv_stride_b = grad_qkv.stride(0);
  a.dqkv_stride_l = grad_qkv.stride(1);
  const auto f32 = qkv.options().dtype(at::kFloat);
  at::Tensor dtau = output({plan.blocks_x, heads}, f32, poison);
  at::Tensor dbias = output({plan.blocks_x, heads, area, area}, f32, poison);
  check_status(am_wa_backward(&a, qkv.data_ptr(), grad_out.data_ptr(), tau_c.data_ptr<float>(),
                              bias.data_ptr<float>(), grad_qkv.data_ptr(), dtau.data_ptr<float>(),
                              dbias.data_ptr<float>(), plan.blocks_x, as_stream(stream)),
               "window attention backward");
  return {grad_qkv, dtau, dbias};
}

// The launch plan (blocks_x, warps, windows_per_warp, wmma, smem_bytes, kernel) of a forward or backward call.
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t> window_attention_plan(
    const at::Tensor& qkv, const at::Tensor& tau_c, const at::Tensor& bias, std::vector<int64_t> grid,
    std::vector<int64_t> window, std::vector<int64_t> shift, int64_t heads, bool backward) {
  const am_wa_args a = wa_args(qkv, tau_c, bias, grid, window, shift, heads);
  am_wa_plan p;
  check_status(am_wa_make_plan(&a, backward ? 1 : 0, &p), "window attention plan");
  return {p.blocks_x, p.warps, p.windows_per_warp, p.wmma, p.smem_bytes, p.kernel};
}

// ids_keep [B, K] int64, ids_restore [B, L] int64, mask [B, L] float32 (1 = removed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_ids(int64_t batch, int64_t length, int64_t len_keep,
                                                                 c10::optional<at::Tensor> noise, at::Device device,
                                                                 uint64_t seed, uint64_t offset, int64_t stream,
                                                                 bool poison) {
  AM_CHECK(device.is_cuda() && device.has_index(), "random_masking_ids needs a CUDA device with an index");
  AM_CHECK(batch >= 0 && batch <= std::numeric_limits<int>::max(), "batch out of range");
  AM_CHECK(length >= 0 && length <= AM_MASK_MAX_LENGTH, "length must be in [0, ", AM_MASK_MAX_LENGTH, "], got ",
           length);
  AM_CHECK(len_keep >= 0 && len_keep <= length, "len_keep must be in [0, ", length, "], got ", len_keep);
  const float* noise_ptr = nullptr;
  int64_t sb = 0, sl = 0;
  if (noise.has_value()) {
    const at::Tensor& n = *noise;
    AM_CHECK(n.device() == device && n.scalar_type() == at::kFloat && n.dim() == 2 && n.size(0) == batch &&
                 n.size(1) == length,
             "noise must be a float32 tensor [", batch, ", ", length, "] on ", device);
    noise_ptr = n.data_ptr<float>();
    sb = n.stride(0);
    sl = n.stride(1);
  }
  const auto opts = at::TensorOptions().device(device);
  at::Tensor keep = output({batch, len_keep}, opts.dtype(at::kLong), false);
  at::Tensor restore = output({batch, length}, opts.dtype(at::kLong), false);
  at::Tensor mask = output({batch, length}, opts.dtype(at::kFloat), poison);
  if (poison) {
    keep.fill_(-1);
    restore.fill_(-1);
  }
  check_status(am_random_masking((int)batch, (int)length, (int)len_keep, seed, offset, noise_ptr, sb, sl,
                                 keep.data_ptr<int64_t>(), restore.data_ptr<int64_t>(), mask.data_ptr<float>(),
                                 device.index(), as_stream(stream)),
               "random masking");
  return {keep, restore, mask};
}

// The log-mel model input of 16 kHz clips, written into out [B, 1, T, M] (allocated by the caller). The
// tables are those of audiomae.ops_cuda.fbank_tables: their sizes are checked, their contents trusted.
void fbank(const at::Tensor& wave, const at::Tensor& clip_mean, const at::Tensor& window, const at::Tensor& twiddle,
           const at::Tensor& mel_lo, const at::Tensor& mel_off, const at::Tensor& mel_w,
           at::Tensor& out, bool normalize, double norm_mean, double norm_scale, int64_t stream) {
  AM_CHECK(wave.is_cuda() && wave.scalar_type() == at::kFloat && wave.dim() == 2,
           "wave must be a float32 CUDA tensor [B, N], got ", wave.sizes());
  const int64_t B = wave.size(0), M = out.dim() == 4 ? out.size(3) : -1;
  AM_CHECK(wave.size(1) >= 400, "fbank needs at least 400 samples per clip, got ", wave.size(1));
  AM_CHECK(out.device() == wave.device() && out.dim() == 4 && out.size(0) == B && out.size(1) == 1 && M >= 1,
           "out must be [B, 1, T, M] on the waves' device, got ", out.sizes());
  AM_CHECK(out.is_non_overlapping_and_dense(), "out must not overlap itself (every element is written once)");
  AM_CHECK(B <= std::numeric_limits<int>::max() && out.size(2) <= std::numeric_limits<int>::max() &&
               M <= std::numeric_limits<int>::max(),
           "fbank sizes out of range");
  auto table = [&](const at::Tensor& t, at::ScalarType type, int64_t n, const char* name) {
    AM_CHECK(t.device() == wave.device() && t.scalar_type() == type && t.is_contiguous() && t.dim() == 1 &&
                 (n < 0 || t.size(0) == n),
             name, " must be a contiguous 1-D ", type, " tensor", n >= 0 ? " of " : "", n >= 0 ? std::to_string(n) : "",
             " on the waves' device, got ", t.sizes());
  };
  table(clip_mean, at::kFloat, B, "clip_mean");
  table(window, at::kFloat, 400, "window");
  table(twiddle, at::kDouble, 1024, "twiddle");
  table(mel_lo, at::kInt, M, "mel_lo");
  table(mel_off, at::kInt, M + 1, "mel_off");
  table(mel_w, at::kFloat, -1, "mel_w");
  am_fbank_args a{};
  a.dtype = dtype_code(out);
  a.device = wave.get_device();
  a.batch = (int)B;
  a.t_out = (int)out.size(2);
  a.num_mel = (int)M;
  a.normalize = normalize ? 1 : 0;
  a.samples = wave.size(1);
  a.wave_stride_b = wave.stride(0);
  a.wave_stride_n = wave.stride(1);
  a.out_stride_b = out.stride(0);
  a.out_stride_t = out.stride(2);
  a.out_stride_m = out.stride(3);
  a.norm_mean = (float)norm_mean;
  a.norm_scale = (float)norm_scale;
  check_status(am_fbank(&a, wave.data_ptr<float>(), clip_mean.data_ptr<float>(), window.data_ptr<float>(),
                        twiddle.data_ptr<double>(), mel_lo.data_ptr<int>(),
                        mel_off.data_ptr<int>(), mel_w.data_ptr<float>(), out.data_ptr(), as_stream(stream)),
               "fbank");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "audiomae CUDA kernels: shifted-window cosine attention, random masking and the fbank front end";
  m.def("window_attention_fwd", &window_attention_fwd, "window attention forward", py::arg("qkv"), py::arg("tau_c"),
        py::arg("bias"), py::arg("grid"), py::arg("window"), py::arg("shift"), py::arg("heads"), py::arg("stream"),
        py::arg("poison") = false);
  m.def("window_attention_bwd", &window_attention_bwd, "window attention backward", py::arg("grad_out"),
        py::arg("qkv"), py::arg("tau_c"), py::arg("bias"), py::arg("grid"), py::arg("window"), py::arg("shift"),
        py::arg("heads"), py::arg("stream"), py::arg("poison") = false);
  m.def("window_attention_plan", &window_attention_plan, "launch plan of the window attention kernels",
        py::arg("qkv"), py::arg("tau_c"), py::arg("bias"), py::arg("grid"), py::arg("window"), py::arg("shift"),
        py::arg("heads"), py::arg("backward"));
  m.def("random_masking_ids", &random_masking_ids, "unstructured random masking", py::arg("batch"),
        py::arg("length"), py::arg("len_keep"), py::arg("noise"), py::arg("device"), py::arg("seed"),
        py::arg("offset"), py::arg("stream"), py::arg("poison") = false);
  m.def("fbank", &fbank, "Kaldi log-mel filterbank of 16 kHz clips (the model input)", py::arg("wave"),
        py::arg("clip_mean"), py::arg("window"), py::arg("twiddle"), py::arg("mel_lo"),
        py::arg("mel_off"), py::arg("mel_w"), py::arg("out"), py::arg("normalize"),
        py::arg("norm_mean"), py::arg("norm_scale"), py::arg("stream"));
  m.attr("max_window_area") = AM_WA_MAX_AREA;
  m.attr("max_head_dim") = AM_WA_MAX_HEAD_DIM;
  m.attr("max_mask_length") = AM_MASK_MAX_LENGTH;
}
