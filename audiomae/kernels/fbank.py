"""Log-mel filterbank on the GPU: waveform -> normalised model input in one kernel.

Computes what :func:`audiomae.audio.waveform_to_input` computes for 16 kHz clips (the release's
``torchaudio.compliance.kaldi.fbank`` front end): the clip mean is removed, then per frame of 400
samples every 160 (snip_edges):

1. DC removal (the frame's mean) and pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]`` (``x[-1] = x[0]``),
   explicitly in float32;
2. the 512-point DFT of the Hann-windowed frame as two matrix products against a precomputed
   ``[n, k]`` cosine and sine basis with the window folded in (only the bins that some mel filter
   weights are computed: 1..255 of 257 at 128 filters), in float32 accuracy
   (``tl.dot(..., input_precision="ieee")``: Triton's default, tf32, is off by up to ~1 nat here);
3. power ``re^2 + im^2`` and the mel projection (another ``tl.dot``, float32);
4. ``log(max(e, 1.1920929e-07))``; rows past the clip's last frame are 0 (padding to
   ``target_length``; frames past ``target_length`` are not computed);
5. ``(x - mean) / (2 std)`` with the dataset statistics, written in ``out_dtype``.

Each program owns ``BLOCK_T`` frames of one clip and all mel bins: for each chunk of DFT bins it
accumulates the real and imaginary parts over the samples, squares them and adds their mel
projection, so no spectrogram is ever written to memory. The frames are gathered from the
waveform (they overlap; the re-reads hit the cache).

That is the default method, ``"dft"``. The ``"fft"`` method computes the same function in three
steps: a kernel writes the pre-emphasised, windowed, zero-padded frames ``[B, T, 512]``,
``torch.fft.rfft`` (cuFFT on GPUs, float32) transforms them, and a second kernel does power, mel,
log, padding and normalisation. It moves the frames and the spectrum through memory but does tens of
times fewer FLOPs; its error is that of the device's float32 FFT, as the reference front end's on the
same device (tested within 1.5x of it on the fixtures), which is not the 1e-3 bound of the default:
on an H100 (cuFFT, torch 2.11) it measured 4.2e-3 nats from float64 on chirps in noise
(``benchmarks/tune.py``), against 9.7e-4 for ``"dft"``, and it took 0.711 ms for 64 clips of 10 s
against 1.63 ms for ``"dft"`` (1.13 ms at the tiling it takes on Hopper, see :func:`_blocks`) and
1.27 ms for the batched PyTorch reference (``benchmarks/results/nvidia-h100-80gb-hbm3-torch2.11/fbank.md``).

Only the exact mode exists: a faster DFT (single-pass tf32 or bf16) is off by up to 1-5 nats on
wide-dynamic-range audio, and no error bound for a cheaper compromise has been measured here.

Layers: Triton kernel -> launcher (a ``torch.library`` custom op; no gradient) -> :func:`fbank_features`.
The op is opaque to ``torch.compile`` (a ``custom_op`` with a shape-only fake implementation, not a
``triton_op``): its launcher builds and caches constant tables, which graph tracing must not see,
and there is nothing around a front end for the compiler to fuse it with.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import alloc, for_current_mode as _for_current_mode, interpreting as _interpreting
from torch.library import custom_op

SAMPLE_RATE = 16000
WIN = 400  # 25 ms
SHIFT = 160  # 10 ms
N_FFT = 512
PREEMPHASIS = 0.97
FLOOR = 1.1920928955078125e-07  # float32 eps, torchaudio's energy floor
POISON_OUTPUTS = False  # tests set this: output buffers start as NaN, so an unwritten element shows


def _alloc(shape, dtype, device) -> torch.Tensor:
    return alloc(shape, dtype, device, POISON_OUTPUTS)


# How the DFT is done: "dft", one kernel with the DFT as float32 matrix products (the default),
# "fft", a framing kernel, torch.fft.rfft and a power/mel/log kernel (a spectrum round trip through
# memory, far fewer FLOPs). TUNING["method"] overrides the default.
METHODS = ("dft", "fft")
DEFAULT_METHOD = "dft"
# Overrides for tuning sweeps (benchmarks/tune.py): "method", "block_t_frames" (framing kernel of
# "fft"), and any of "block_t", "block_s", "block_k",
# "num_warps", "precision" ("ieee", the default, 9.7e-4 nats from float64 on chirps in noise on an
# H100, or "tf32x3": three tf32 tensor-core passes, faster, whose error in this kernel's DFT has no
# committed measurement, so the default stays "ieee"); empty means the defaults.
TUNING: dict = {}


def _blocks(device: torch.device):
    """(BLOCK_T frames, BLOCK_S samples, BLOCK_K DFT bins, num_warps, dot precision) of the DFT kernel.

    On Hopper and later the default is the faster of the two tilings the sweep timed on an H100
    (``benchmarks/tune.py``, 64 clips of 10 s, ``tune-fbank.json``): 64 x 16 x 128 with 8 warps took
    1.13 ms, 32 x 32 x 64 with 4 warps 1.61 ms, at the same error. Compiled for sm_80 the wider
    tiling spills 3 KB per thread (``benchmarks.aot``'s ``compile_for``), so older GPUs keep the
    narrower one."""
    if _interpreting():  # few, large tiles: the interpreter pays per operation, not per element
        return 256, 256, 256, 4, "ieee"
    wide = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    bt, bs, bk, nw = (64, 16, 128, 8) if wide else (32, 32, 64, 4)
    t = TUNING
    return (t.get("block_t", bt), t.get("block_s", bs), t.get("block_k", bk), t.get("num_warps", nw),
            t.get("precision", "ieee"))


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
# Reductions use tl.reduce with Triton's own combine function and accumulators start from tl.full:
# tl.sum and tl.zeros are @triton.jit helpers whose mode (GPU or interpreter) is fixed when triton
# is first imported, while these work in both, whatever the environment was then.


@triton.jit
def _fbank_kernel(
    wave_ptr, cos_ptr, sin_ptr, mel_ptr, out_ptr,
    NF, T_OUT, NMEL,
    s_wb, s_wn,
    s_ob, s_ot, s_of,
    NORM_MEAN, NORM_SCALE,
    NS_PAD: tl.constexpr, NB_PAD: tl.constexpr, BLOCK_MEL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    WIN: tl.constexpr, SHIFT: tl.constexpr, PREEMPH: tl.constexpr, FLOOR: tl.constexpr,
    NORMALIZE: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_mel = tl.arange(0, BLOCK_MEL)
    valid_t = t < NF
    wave = wave_ptr + b * s_wb + (t * SHIFT)[:, None] * s_wn  # frame starts, [BLOCK_T, 1]
    if pid_t * BLOCK_T < NF:
        # 1. frame means (DC removal)
        total = tl.full((BLOCK_T,), 0.0, tl.float32)
        for n0 in range(0, NS_PAD, BLOCK_S):
            n = n0 + tl.arange(0, BLOCK_S)
            x = tl.load(wave + n[None, :] * s_wn, mask=valid_t[:, None] & (n < WIN)[None, :], other=0.0)
            total += tl.reduce(x, 1, tl.standard._sum_combine)
        mean = total / WIN
        energy = tl.full((BLOCK_T, BLOCK_MEL), 0.0, tl.float32)
        for k0 in range(0, NB_PAD, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            re = tl.full((BLOCK_T, BLOCK_K), 0.0, tl.float32)
            im = tl.full((BLOCK_T, BLOCK_K), 0.0, tl.float32)
            for n0 in range(0, NS_PAD, BLOCK_S):
                n = n0 + tl.arange(0, BLOCK_S)
                m2 = valid_t[:, None] & (n < WIN)[None, :]
                x = tl.load(wave + n[None, :] * s_wn, mask=m2, other=0.0)
                x_prev = tl.load(wave + tl.maximum(n - 1, 0)[None, :] * s_wn, mask=m2, other=0.0)
                # DC removal and pre-emphasis in float32, as the reference orders them
                y = (x - mean[:, None]) - PREEMPH * (x_prev - mean[:, None])
                y = tl.where(m2, y, 0.0)
                basis = n[:, None] * NB_PAD + k[None, :]
                re = tl.dot(y, tl.load(cos_ptr + basis), re, input_precision=PREC)
                im = tl.dot(y, tl.load(sin_ptr + basis), im, input_precision=PREC)
            power = re * re + im * im
            mel = tl.load(mel_ptr + k[:, None] * BLOCK_MEL + offs_mel[None, :])
            energy = tl.dot(power, mel, energy, input_precision=PREC)
        logmel = tl.log(tl.where(energy < FLOOR, FLOOR, energy))  # NaN stays NaN, as in the reference
        value = tl.where(valid_t[:, None], logmel, 0.0)  # padding rows are 0 before normalisation
    else:
        value = tl.full((BLOCK_T, BLOCK_MEL), 0.0, tl.float32)
    if NORMALIZE:
        value = tl.div_rn(value - NORM_MEAN, NORM_SCALE)
    tl.store(out_ptr + b * s_ob + t[:, None] * s_ot + offs_mel[None, :] * s_of, value.to(out_ptr.dtype.element_ty),
             mask=(t < T_OUT)[:, None] & (offs_mel < NMEL)[None, :])


@triton.jit
def _fbank_frames_kernel(
    wave_ptr, win_ptr, frames_ptr,
    NT,
    s_wb, s_wn,
    s_fb, s_ft,
    BLOCK_T: tl.constexpr, NFFT: tl.constexpr, WIN: tl.constexpr, SHIFT: tl.constexpr,
    PREEMPH: tl.constexpr,
):
    """Method "fft", step 1: frames [B, NT, NFFT] = window * preemph(frame - mean), zero-padded."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.arange(0, NFFT)
    valid_t = t < NT
    m2 = valid_t[:, None] & (n < WIN)[None, :]
    wave = wave_ptr + b * s_wb + (t * SHIFT)[:, None] * s_wn
    x = tl.load(wave + n[None, :] * s_wn, mask=m2, other=0.0)
    mean = tl.reduce(x, 1, tl.standard._sum_combine) / WIN
    x_prev = tl.load(wave + tl.maximum(n - 1, 0)[None, :] * s_wn, mask=m2, other=0.0)
    # DC removal and pre-emphasis in float32, in the order of the reference (and the "dft" method)
    y = (x - mean[:, None]) - PREEMPH * (x_prev - mean[:, None])
    y = tl.where(m2, y * tl.load(win_ptr + n)[None, :], 0.0)
    tl.store(frames_ptr + b * s_fb + t[:, None] * s_ft + n[None, :], y, mask=valid_t[:, None])


@triton.jit
def _fbank_mel_kernel(
    ri_ptr, mel_ptr, out_ptr,
    NT, T_OUT, NMEL, K_FIRST,
    s_rb, s_rt,
    s_ob, s_ot, s_of,
    NORM_MEAN, NORM_SCALE,
    NB_PAD: tl.constexpr, NBINS: tl.constexpr, BLOCK_MEL: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, FLOOR: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
):
    """Method "fft", step 3: the spectrum (real/imaginary pairs, [B, NT, NBINS, 2]) -> power -> mel
    projection -> log -> padding rows -> normalisation, written in the output dtype."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_mel = tl.arange(0, BLOCK_MEL)
    valid_t = t < NT
    if pid_t * BLOCK_T < NT:
        energy = tl.full((BLOCK_T, BLOCK_MEL), 0.0, tl.float32)
        for k0 in range(0, NB_PAD, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kb = K_FIRST + k
            m2 = valid_t[:, None] & (kb < NBINS)[None, :]
            ptrs = ri_ptr + b * s_rb + t[:, None] * s_rt + (2 * kb)[None, :]
            re = tl.load(ptrs, mask=m2, other=0.0)
            im = tl.load(ptrs + 1, mask=m2, other=0.0)
            power = re * re + im * im
            mel = tl.load(mel_ptr + k[:, None] * BLOCK_MEL + offs_mel[None, :])
            energy = tl.dot(power, mel, energy, input_precision=PREC)
        logmel = tl.log(tl.where(energy < FLOOR, FLOOR, energy))
        value = tl.where(valid_t[:, None], logmel, 0.0)  # padding rows are 0 before normalisation
    else:
        value = tl.full((BLOCK_T, BLOCK_MEL), 0.0, tl.float32)
    if NORMALIZE:
        value = tl.div_rn(value - NORM_MEAN, NORM_SCALE)
    tl.store(out_ptr + b * s_ob + t[:, None] * s_ot + offs_mel[None, :] * s_of, value.to(out_ptr.dtype.element_ty),
             mask=(t < T_OUT)[:, None] & (offs_mel < NMEL)[None, :])


# ----------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------
def _mel_rows(num_mel_bins: int, block_k: int):
    """The bins ``k_first, k_first + 1, ...`` that some mel filter weights, padded to a multiple of
    ``block_k``: ``(k [NB_PAD] int64, mel matrix [NB_PAD, BLOCK_MEL] float32, k_first, NB_PAD, BLOCK_MEL)``;
    rows past the Nyquist bin are zero."""
    from ..audio import mel_filterbank

    mel = mel_filterbank(num_mel_bins, N_FFT, SAMPLE_RATE).to(torch.float64)  # [M, 257]
    used = torch.nonzero(mel.abs().sum(0) > 0).flatten()
    k_first, k_last = (int(used[0]), int(used[-1])) if used.numel() else (0, 0)
    nb_pad = triton.cdiv(k_last - k_first + 1, block_k) * block_k
    block_mel = triton.next_power_of_2(num_mel_bins)
    k = torch.arange(k_first, k_first + nb_pad, dtype=torch.int64)
    k_in = k[k <= N_FFT // 2]
    mel_t = torch.zeros(nb_pad, block_mel, dtype=torch.float32)
    mel_t[: k_in.numel(), :num_mel_bins] = mel[:, k_in].t().to(torch.float32)
    return k, mel_t, k_first, nb_pad, block_mel


def _hann(length: int) -> torch.Tensor:
    """Kaldi's symmetric Hann window over the 400-sample frame, zero past it, float64 ``[length]``."""
    n = torch.arange(length, dtype=torch.float64)
    return torch.where(n < WIN, 0.5 - 0.5 * torch.cos(2.0 * math.pi * n / (WIN - 1)), torch.zeros(()))


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device, num_mel_bins: int, block_s: int, block_k: int):
    """Windowed DFT basis (cos, sin) ``[NS_PAD, NB_PAD]`` for the weighted bins ``k0, k0 + 1, ...``,
    and the mel matrix ``[NB_PAD, BLOCK_MEL]`` for the same bins, float32 on ``device``."""
    k, mel_t, _, nb_pad, block_mel = _mel_rows(num_mel_bins, block_k)
    ns_pad = triton.cdiv(WIN, block_s) * block_s
    window = _hann(ns_pad)
    n = torch.arange(ns_pad, dtype=torch.int64)
    phase = (n[:, None] * k[None, :]) % N_FFT  # exact angle reduction
    angle = 2.0 * math.pi * phase.to(torch.float64) / N_FFT
    in_range = (k <= N_FFT // 2).to(torch.float64)[None, :]
    cos = (window[:, None] * torch.cos(angle) * in_range).to(torch.float32)
    sin = (window[:, None] * torch.sin(angle) * in_range).to(torch.float32)
    return (cos.contiguous().to(device), sin.contiguous().to(device), mel_t.to(device), ns_pad, nb_pad, block_mel)


@functools.lru_cache(maxsize=16)
def _fft_constants(device: torch.device, num_mel_bins: int, block_k: int):
    """Hann window ``[N_FFT]`` (zero past 400 samples), the mel matrix ``[NB_PAD, BLOCK_MEL]`` of
    :func:`_mel_rows` and ``k_first``; float32 on ``device``."""
    _, mel_t, k_first, nb_pad, block_mel = _mel_rows(num_mel_bins, block_k)
    return _hann(N_FFT).to(torch.float32).to(device), mel_t.to(device), k_first, nb_pad, block_mel


def _fbank_fft(x: torch.Tensor, out: torch.Tensor, nf: int, t_out: int, num_mel_bins: int, normalize: bool,
               norm_mean: float, norm_std: float) -> None:
    """Method "fft": a framing kernel, ``torch.fft.rfft`` (cuFFT on GPUs, float32), and a kernel for
    power, mel, log, padding and normalisation. Writes ``out``."""
    B = x.shape[0]
    nt = min(nf, t_out)  # frames past target_length are not computed
    t = TUNING
    if _interpreting():
        bt_frames, bt_mel, bk, warps, prec = 64, 256, 256, 4, "ieee"
    else:
        bt_frames, bt_mel, bk = t.get("block_t_frames", 8), t.get("block_t", 32), t.get("block_k", 64)
        warps, prec = t.get("num_warps", 4), t.get("precision", "ieee")
    window, mel, k_first, nb_pad, block_mel = _fft_constants(x.device, num_mel_bins, bk)
    frames = _alloc((B, nt, N_FFT), torch.float32, x.device)
    _for_current_mode(_fbank_frames_kernel)[(triton.cdiv(nt, bt_frames), B)](
        x, window, frames, nt, x.stride(0), x.stride(1), frames.stride(0), frames.stride(1),
        BLOCK_T=bt_frames, NFFT=N_FFT, WIN=WIN, SHIFT=SHIFT, PREEMPH=PREEMPHASIS, num_warps=4,
    )
    ri = torch.view_as_real(torch.fft.rfft(frames, n=N_FFT, dim=-1))  # [B, nt, 257, 2] float32
    if ri.stride(-1) != 1 or ri.stride(-2) != 2:
        ri = ri.contiguous()
    _for_current_mode(_fbank_mel_kernel)[(triton.cdiv(t_out, bt_mel), B)](
        ri, mel, out, nt, t_out, num_mel_bins, k_first,
        ri.stride(0), ri.stride(1),
        out.stride(0), out.stride(2), out.stride(3),
        float(norm_mean), float(2.0 * norm_std),
        NB_PAD=nb_pad, NBINS=N_FFT // 2 + 1, BLOCK_MEL=block_mel, BLOCK_T=bt_mel, BLOCK_K=bk,
        FLOOR=FLOOR, NORMALIZE=bool(normalize), PREC=prec, num_warps=warps,
    )


# ----------------------------------------------------------------------------------------------
# launcher (custom op)
# ----------------------------------------------------------------------------------------------
@custom_op("audiomae::fbank_features", mutates_args=())
def fbank_features_op(waveforms: torch.Tensor, target_length: int, normalize: bool, norm_mean: float,
                      norm_std: float, out_dtype: torch.dtype, num_mel_bins: int) -> torch.Tensor:
    """``waveforms`` [B, N] (16 kHz, N >= 400) -> ``[B, 1, T, num_mel_bins]`` in ``out_dtype``;
    ``target_length < 0`` keeps every frame."""
    B, N = waveforms.shape
    nf = 1 + (N - WIN) // SHIFT
    t_out = nf if target_length < 0 else target_length
    out = _alloc((B, 1, t_out, num_mel_bins), out_dtype, waveforms.device)
    if B == 0 or t_out == 0:
        return out
    x = waveforms.to(torch.float32)
    x = x - x.mean(dim=-1, keepdim=True)  # the clip mean, as waveform_to_input removes it
    method = TUNING.get("method", DEFAULT_METHOD)
    if method not in METHODS:
        raise ValueError(f"fbank method must be one of {METHODS}, got {method!r}")
    if method == "fft":
        _fbank_fft(x, out, nf, t_out, num_mel_bins, normalize, norm_mean, norm_std)
        return out
    bt, bs, bk, warps, prec = _blocks(x.device)
    cos, sin, mel, ns_pad, nb_pad, block_mel = _constants(x.device, num_mel_bins, bs, bk)
    _for_current_mode(_fbank_kernel)[(triton.cdiv(t_out, bt), B)](
        x, cos, sin, mel, out,
        nf, t_out, num_mel_bins,
        x.stride(0), x.stride(1),
        out.stride(0), out.stride(2), out.stride(3),
        float(norm_mean), float(2.0 * norm_std),
        NS_PAD=ns_pad, NB_PAD=nb_pad, BLOCK_MEL=block_mel,
        BLOCK_T=bt, BLOCK_S=bs, BLOCK_K=bk,
        WIN=WIN, SHIFT=SHIFT, PREEMPH=PREEMPHASIS, FLOOR=FLOOR,
        NORMALIZE=bool(normalize), PREC=prec, num_warps=warps,
    )
    return out


# Shapes only, for tracing.
@fbank_features_op.register_fake
def _(waveforms, target_length, normalize, norm_mean, norm_std, out_dtype, num_mel_bins):
    B, N = waveforms.shape
    t_out = 1 + (N - WIN) // SHIFT if target_length < 0 else target_length
    return waveforms.new_empty((B, 1, t_out, num_mel_bins), dtype=out_dtype)


def fbank_features(waveforms: torch.Tensor, target_length: Optional[int] = 1024, stats="audioset",
                   out_dtype: torch.dtype = torch.float32, mode: str = "exact",
                   num_mel_bins: int = 128) -> torch.Tensor:
    """Audio-MAE's model input from 16 kHz waveforms, computed on the GPU.

    Equals :func:`audiomae.audio.waveform_to_input` for 16 kHz input (the clip mean is removed here):
    Kaldi fbank (400/160 frames, snip_edges, Hann, 512-point DFT, 128 HTK-mel filters, log with the
    float32-eps floor), padded with zeros or cut to ``target_length`` frames, normalised as
    ``(x - mean) / (2 std)``.

    Args:
        waveforms: ``[B, N]`` or ``[N]`` float samples at 16 kHz (N >= 400), computed in float32.
        target_length: frames of the output (1024 for AudioSet); None keeps all ``1 + (N - 400) // 160``.
        stats: normalisation statistics as :func:`audiomae.audio.get_stats` takes them (a dataset
            name, ``(mean, std)``, or None for the raw log-mel values).
        out_dtype: float32, bfloat16 or float16.
        mode: ``"exact"`` (float32-accurate DFT); the only mode.
        num_mel_bins: mel filters (128 for Audio-MAE).

    Returns:
        ``[B, 1, T, num_mel_bins]`` (``[1, T, num_mel_bins]`` for ``[N]`` input) in ``out_dtype``.

    Example::

        spec = fbank_features(waves.cuda(), target_length=1024, stats="audioset", out_dtype=torch.bfloat16)
    """
    from ..audio import fused_fbank_args

    x, single, target, s = fused_fbank_args(waveforms, target_length, stats, out_dtype, mode, num_mel_bins)
    out = fbank_features_op(x, target, s is not None, s.mean if s else 0.0, s.std if s else 1.0, out_dtype,
                            int(num_mel_bins))
    return out[0] if single else out
