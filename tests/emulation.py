"""Running the CUDA kernels as host code (csrc/emulate.h) from tests: building the emulator, passing
tensors to it as files, reading its outputs back."""
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from audiomae import cuda_ext

SANITIZERS = ("thread", "address")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # am_dtype
ENV = dict(ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1",
           UBSAN_OPTIONS="print_stacktrace=1")


def build_emulators(request, tmp_path_factory, sanitizers=SANITIZERS):
    """{sanitizer: executable} for the sanitizers that build and start here, cached between runs in
    pytest's cache (skips the test when none does)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("g++ not installed (the emulated kernels are C++20 host code)")
    cache = getattr(request.config, "cache", None)
    directory = Path(cache.mkdir("audiomae-emulator")) if cache is not None else tmp_path_factory.mktemp("emu")
    out, why = {}, []
    for san in sanitizers:
        try:
            exe = cuda_ext.build_emulator(san, directory)
            emulate(exe, dict(op="philox", c0=0, c1=0, c2=0, c3=0, k0=0, k1=0), {})
            out[san] = exe
        except Exception as e:  # a sanitizer runtime missing or refusing this kernel's memory layout
            why.append(f"{san}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    if not out:
        pytest.skip("no sanitizer build of the emulator runs here: " + "; ".join(why))
    return out


def raw(t: torch.Tensor) -> bytes:
    """The bytes from t's first element to its last (strides kept), as the kernel reads them."""
    t = t.detach().cpu()
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    flat = t.as_strided((span,), (1,), t.storage_offset()).clone()
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def from_raw(data: bytes, dtype, shape) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    view = torch.int16 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.frombuffer(bytearray(data), dtype=view).view(dtype).reshape(shape).clone()


def emulate(exe, args, files, env=None, stderr=None):
    """Run one launch-API call of the emulated kernels: (stdout, {output name: bytes}); ``stderr``, a
    list, receives the run's stderr."""
    with tempfile.TemporaryDirectory(prefix="audiomae-emu-") as d:
        Path(d, "args.txt").write_text(" ".join(f"{k}={v}" for k, v in args.items()))
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        p = subprocess.run([str(exe), d], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, **ENV, **(env or {})))
        if p.returncode != 0:
            raise AssertionError(f"emulated kernel failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr[-6000:]}")
        if stderr is not None:
            stderr.append(p.stderr)
        return p.stdout, {n: Path(d, n).read_bytes() for n in os.listdir(d) if n.endswith(".bin") and n not in files}


def float_bits(x: float) -> int:
    """The bits of x rounded to float32, as an unsigned integer (how the emulator takes float arguments)."""
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


class EmulatedFbank:
    """The binding's ``fbank`` call over the emulated kernel (csrc/fbank.cu), for CPU tensors: what
    :mod:`audiomae.ops_cuda`'s fbank op calls, without a GPU. ``calls`` counts the launches."""

    def __init__(self, exe):
        self.exe, self.calls = exe, 0

    def fbank(self, wave, clip_mean, window, twiddle, mel_lo, mel_off, mel_w, out, normalize, norm_mean, norm_scale,
              stream):
        assert out.is_contiguous() and out.dim() == 4 and out.shape[1] == 1
        B, N = wave.shape
        args = dict(op="fbank", dtype=DTYPE_CODES[out.dtype], batch=B, t_out=out.shape[2], num_mel=out.shape[3],
                    normalize=int(normalize), samples=N, wave_stride_b=wave.stride(0), wave_stride_n=wave.stride(1),
                    out_stride_b=out.stride(0), out_stride_t=out.stride(2), out_stride_m=out.stride(3),
                    norm_mean_bits=float_bits(norm_mean), norm_scale_bits=float_bits(norm_scale), has_clip_mean=1,
                    out_elems=out.numel())
        files = {"wave.bin": raw(wave), "clip_mean.bin": raw(clip_mean), "window.bin": raw(window),
                 "twiddle.bin": raw(twiddle), "mel_lo.bin": raw(mel_lo), "mel_off.bin": raw(mel_off),
                 "mel_w.bin": raw(mel_w)}
        stdout, got = emulate(self.exe, args, files)
        if "rc=0 " not in stdout:
            raise RuntimeError(f"audiomae CUDA fbank failed: {stdout.strip()}")
        self.calls += 1
        out.copy_(from_raw(got["out.bin"], out.dtype, tuple(out.shape)))
