// Command-line driver of the emulated kernels (see emulate.h): runs one launch-API call on files.
//
//   emulate DIR      DIR/args.txt holds "key=value" integers, first of all op=<name>:
//     op=plan      prints the forward and backward am_wa_plan of the window attention arguments
//     op=wa_fwd    qkv.bin tau_c.bin bias.bin -> out.bin (out_elems elements)
//     op=wa_bwd    qkv.bin grad_out.bin tau_c.bin bias.bin -> grad_qkv.bin (dqkv_elems elements),
//                  dtau_partial.bin, dbias_partial.bin
//     op=mask      [noise.bin] -> ids_keep.bin ids_restore.bin mask.bin
//     op=philox    c0..c3 k0 k1 -> prints the four output words
//     op=fbank     wave.bin [clip_mean.bin] window.bin twiddle.bin mel_lo.bin mel_off.bin mel_w.bin
//                  -> out.bin (out_elems elements); the fields of am_fbank_args, norm_mean
//                  and norm_scale as the bits of float32 values
// Window attention arguments are the fields of am_wa_args (dtype, batch, grid_t, ...). Output
// buffers start filled with 0xFF bytes (NaN, or -1 for integers) so unwritten elements show. Prints
// rc=<status> (0 on success) and exits 0 unless the files are unusable.
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "audiomae_cuda.h"

namespace {

std::map<std::string, std::string> g_args;
std::string g_dir;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "emulate: %s\n", what.c_str());
  std::exit(2);
}

long long arg(const char* key, long long fallback = -1, bool required = true) {
  auto it = g_args.find(key);
  if (it == g_args.end()) {
    if (required) die(std::string("missing argument ") + key);
    return fallback;
  }
  return std::strtoll(it->second.c_str(), nullptr, 0);
}

unsigned long long uarg(const char* key) {
  auto it = g_args.find(key);
  if (it == g_args.end()) die(std::string("missing argument ") + key);
  return std::strtoull(it->second.c_str(), nullptr, 0);
}

std::vector<unsigned char> read_file(const char* name) {
  const std::string path = g_dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) die("cannot open " + path);
  std::vector<unsigned char> data;
  unsigned char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) data.insert(data.end(), buf, buf + n);
  std::fclose(f);
  return data;
}

// An exactly sized heap copy (so that address sanitizing sees any access past the end).
struct Buffer {
  unsigned char* p = nullptr;
  size_t n = 0;
  explicit Buffer(size_t bytes, int fill = 0xFF) : p(new unsigned char[bytes ? bytes : 1]), n(bytes) {
    std::memset(p, fill, bytes);
  }
  explicit Buffer(const std::vector<unsigned char>& v) : Buffer(v.size()) {
    if (!v.empty()) std::memcpy(p, v.data(), v.size());
  }
  ~Buffer() { delete[] p; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

void write_file(const char* name, const Buffer& b) {
  const std::string path = g_dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(b.p, 1, b.n, f) != b.n) die("cannot write " + path);
  std::fclose(f);
}

am_wa_args wa_args() {
  am_wa_args a;
  a.dtype = (int)arg("dtype");
  a.device = 0;
  a.batch = (int)arg("batch");
  a.grid_t = (int)arg("grid_t");
  a.grid_f = (int)arg("grid_f");
  a.win_t = (int)arg("win_t");
  a.win_f = (int)arg("win_f");
  a.shift_t = (int)arg("shift_t");
  a.shift_f = (int)arg("shift_f");
  a.heads = (int)arg("heads");
  a.head_dim = (int)arg("head_dim");
  a.qkv_stride_b = arg("qkv_stride_b", 0, false);
  a.qkv_stride_l = arg("qkv_stride_l", 0, false);
  a.out_stride_b = arg("out_stride_b", 0, false);
  a.out_stride_l = arg("out_stride_l", 0, false);
  a.dqkv_stride_b = arg("dqkv_stride_b", 0, false);
  a.dqkv_stride_l = arg("dqkv_stride_l", 0, false);
  return a;
}

size_t element_size(int dtype) { return dtype == AM_FLOAT32 ? 4 : 2; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: emulate DIR");
  g_dir = argv[1];
  {
    const std::vector<unsigned char> text = read_file("args.txt");
    std::string s(text.begin(), text.end());
    size_t i = 0;
    while (i < s.size()) {
      while (i < s.size() && std::isspace((unsigned char)s[i])) ++i;
      size_t j = i;
      while (j < s.size() && !std::isspace((unsigned char)s[j])) ++j;
      if (j > i) {
        const std::string tok = s.substr(i, j - i);
        const size_t eq = tok.find('=');
        if (eq == std::string::npos) die("bad argument " + tok);
        g_args[tok.substr(0, eq)] = tok.substr(eq + 1);
      }
      i = j;
    }
  }
  const std::string op = g_args.count("op") ? g_args["op"] : "";
  int rc = 0;
  if (op == "plan") {
    const am_wa_args a = wa_args();
    for (int backward = 0; backward < 2; ++backward) {
      am_wa_plan p{};
      rc = am_wa_make_plan(&a, backward, &p);
      std::printf("%s rc=%d blocks_x=%d warps=%d windows_per_warp=%d wmma=%d smem_bytes=%lld kernel=%d\n",
                  backward ? "backward" : "forward", rc, p.blocks_x, p.warps, p.windows_per_warp, p.wmma,
                  (long long)p.smem_bytes, p.kernel);
    }
    return 0;
  } else if (op == "wa_fwd") {
    const am_wa_args a = wa_args();
    Buffer qkv(read_file("qkv.bin")), tau(read_file("tau_c.bin")), bias(read_file("bias.bin"));
    Buffer out((size_t)arg("out_elems") * element_size(a.dtype));
    rc = am_wa_forward(&a, qkv.p, reinterpret_cast<const float*>(tau.p), reinterpret_cast<const float*>(bias.p),
                       out.p, nullptr);
    write_file("out.bin", out);
  } else if (op == "wa_bwd") {
    const am_wa_args a = wa_args();
    am_wa_plan p{};
    rc = am_wa_make_plan(&a, 1, &p);
    if (rc == 0) {
      Buffer qkv(read_file("qkv.bin")), gout(read_file("grad_out.bin"));
      Buffer tau(read_file("tau_c.bin")), bias(read_file("bias.bin"));
      const size_t area = (size_t)a.win_t * a.win_f;
      Buffer dqkv((size_t)arg("dqkv_elems") * element_size(a.dtype));
      Buffer dtau((size_t)p.blocks_x * a.heads * 4);
      Buffer dbias((size_t)p.blocks_x * a.heads * area * area * 4);
      rc = am_wa_backward(&a, qkv.p, gout.p, reinterpret_cast<const float*>(tau.p),
                          reinterpret_cast<const float*>(bias.p), dqkv.p, reinterpret_cast<float*>(dtau.p),
                          reinterpret_cast<float*>(dbias.p), p.blocks_x + (int)arg("rows_off_by", 0, false), nullptr);
      write_file("grad_qkv.bin", dqkv);
      write_file("dtau_partial.bin", dtau);
      write_file("dbias_partial.bin", dbias);
    }
    std::printf("blocks_x=%d\n", p.blocks_x);
  } else if (op == "mask") {
    const int batch = (int)arg("batch"), length = (int)arg("length"), keep = (int)arg("len_keep");
    const bool has_noise = arg("has_noise", 0, false) != 0;
    std::vector<unsigned char> noise_data;
    if (has_noise) noise_data = read_file("noise.bin");
    Buffer noise(noise_data);
    Buffer ids_keep((size_t)batch * keep * 8), ids_restore((size_t)batch * length * 8), mask((size_t)batch * length * 4);
    rc = am_random_masking(batch, length, keep, uarg("seed"), uarg("offset"),
                           has_noise ? reinterpret_cast<const float*>(noise.p) : nullptr,
                           arg("noise_stride_b", 0, false), arg("noise_stride_l", 0, false),
                           reinterpret_cast<int64_t*>(ids_keep.p), reinterpret_cast<int64_t*>(ids_restore.p),
                           reinterpret_cast<float*>(mask.p), 0, nullptr);
    write_file("ids_keep.bin", ids_keep);
    write_file("ids_restore.bin", ids_restore);
    write_file("mask.bin", mask);
  } else if (op == "fbank") {
    am_fbank_args a{};
    a.dtype = (int)arg("dtype");
    a.device = 0;
    a.batch = (int)arg("batch");
    a.t_out = (int)arg("t_out");
    a.num_mel = (int)arg("num_mel");
    a.normalize = (int)arg("normalize");
    a.samples = arg("samples");
    a.wave_stride_b = arg("wave_stride_b");
    a.wave_stride_n = arg("wave_stride_n");
    a.out_stride_b = arg("out_stride_b");
    a.out_stride_t = arg("out_stride_t");
    a.out_stride_m = arg("out_stride_m");
    const uint32_t mean_bits = (uint32_t)uarg("norm_mean_bits"), scale_bits = (uint32_t)uarg("norm_scale_bits");
    std::memcpy(&a.norm_mean, &mean_bits, 4);
    std::memcpy(&a.norm_scale, &scale_bits, 4);
    const bool has_mean = arg("has_clip_mean", 0, false) != 0;
    std::vector<unsigned char> mean_data;
    if (has_mean) mean_data = read_file("clip_mean.bin");
    Buffer wave(read_file("wave.bin")), clip_mean(mean_data), window(read_file("window.bin"));
    Buffer twiddle(read_file("twiddle.bin"));
    Buffer mel_lo(read_file("mel_lo.bin")), mel_off(read_file("mel_off.bin")), mel_w(read_file("mel_w.bin"));
    Buffer out((size_t)arg("out_elems") * element_size(a.dtype));
    rc = am_fbank(&a, reinterpret_cast<const float*>(wave.p),
                  has_mean ? reinterpret_cast<const float*>(clip_mean.p) : nullptr,
                  reinterpret_cast<const float*>(window.p), reinterpret_cast<const double*>(twiddle.p),
                  reinterpret_cast<const int*>(mel_lo.p),
                  reinterpret_cast<const int*>(mel_off.p), reinterpret_cast<const float*>(mel_w.p), out.p, nullptr);
    write_file("out.bin", out);
  } else if (op == "philox") {
    const uint32_t ctr[4] = {(uint32_t)uarg("c0"), (uint32_t)uarg("c1"), (uint32_t)uarg("c2"), (uint32_t)uarg("c3")};
    const uint32_t key[2] = {(uint32_t)uarg("k0"), (uint32_t)uarg("k1")};
    uint32_t out[4];
    am_philox4x32_10(ctr, key, out);
    std::printf("%08x %08x %08x %08x\n", out[0], out[1], out[2], out[3]);
  } else {
    die("unknown op " + op);
  }
  std::printf("rc=%d %s\n", rc, am_error_string(rc));
  return 0;
}
