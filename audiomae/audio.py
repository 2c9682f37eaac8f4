"""Audio front end: loading, resampling, Kaldi-compatible log-mel filterbank, normalisation.

This module is the plain PyTorch reference of Audio-MAE's input pipeline (the fused GPU kernels
are checked against it). The released code computes its input with

    w = w - w.mean()
    torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
                                      window_type='hanning', num_mel_bins=128, dither=0.0,
                                      frame_shift=10)

then pads with zeros or cuts to ``target_length`` frames and normalises with the dataset's
statistics as ``(x - mean) / (2 * std)``. :func:`fbank` reproduces the torchaudio function without
depending on torchaudio, batched and on any device; :func:`waveform_to_input` is the whole chain.

Shapes: a waveform is ``[N]`` or ``[B, N]``; its fbank is ``[T, F]`` or ``[B, T, F]`` (time first,
``F = num_mel_bins``); the model input is ``[B, 1, T, F]``.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "SAMPLE_RATE",
    "FLOAT32_EPS",
    "AudioLoadError",
    "load_audio",
    "DOWNMIX_MODES",
    "resample",
    "fbank",
    "mel_filterbank",
    "NormStats",
    "DATASET_STATS",
    "get_stats",
    "normalize",
    "pad_or_cut",
    "num_frames",
    "pad_beyond",
    "waveform_to_input",
    "load_input",
    "StatsAccumulator",
    "compute_stats",
]

SAMPLE_RATE = 16000
#: Floor applied to the mel energies before the log (torchaudio uses float32 eps for every dtype).
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # 1.1920929e-07; log = -15.942385

ArrayLike = Union[torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------------------------
# loading and resampling
# ----------------------------------------------------------------------------------------------
class AudioLoadError(RuntimeError):
    """An audio file could not be read: missing, unreadable, corrupt or empty."""

    def __init__(self, path, cause: str):
        self.path = os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        self.cause = cause
        super().__init__(f"cannot load audio file {self.path!r}: {cause}")


DOWNMIX_MODES = ("first", "mean")


def check_downmix(downmix) -> str:
    """``downmix`` checked to be one of :data:`DOWNMIX_MODES` (a ``ValueError`` otherwise)."""
    if downmix not in DOWNMIX_MODES:
        raise ValueError(f"downmix must be one of {', '.join(map(repr, DOWNMIX_MODES))}, got {downmix!r}")
    return downmix


def load_audio(path, sample_rate: Optional[int] = SAMPLE_RATE, mono: bool = True,
               downmix: str = "first") -> torch.Tensor:
    """Read an audio file (WAV, FLAC, OGG, ... whatever libsndfile reads) as float32.

    Integer formats are scaled to [-1, 1]. With ``mono`` a multi-channel file becomes one channel:
    ``downmix="first"`` keeps the first channel, as the released code's front end does (Kaldi
    fbank reads channel 0), so released checkpoints see what they were trained and evaluated on;
    ``"mean"`` averages the channels. The signal is resampled to ``sample_rate`` (``None`` keeps the
    file's rate) with a polyphase filter.

    Returns ``[N]`` when ``mono``, else ``[C, N]``. Raises :class:`AudioLoadError`, naming the path
    and the cause, for a missing, unreadable, corrupt or empty file.
    """
    import soundfile as sf

    check_downmix(downmix)
    if sample_rate is not None:
        sample_rate = _as_rate(sample_rate, "sample_rate")  # before the file is read: 16000.5 is no rate
    try:
        fspath = os.fspath(path)
    except TypeError as e:
        raise AudioLoadError(path, f"not a file path ({type(path).__name__})") from e
    if not os.path.exists(fspath):
        raise AudioLoadError(fspath, "no such file")
    if not os.path.isfile(fspath):
        raise AudioLoadError(fspath, "not a regular file")
    if os.path.getsize(fspath) == 0:
        raise AudioLoadError(fspath, "the file is empty (0 bytes)")
    try:
        # a name that is not UTF-8 (os.fsdecode's surrogates) as its bytes: libsndfile gets it encoded
        name = os.fsencode(fspath) if isinstance(fspath, str) and not _utf8(fspath) else fspath
        data, file_sr = sf.read(name, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports format and I/O problems as several exception types
        raise AudioLoadError(fspath, f"{type(e).__name__}: {e}") from e
    cut = _wav_cut_short(fspath)
    if cut is not None:
        raise AudioLoadError(fspath, f"the file is cut short: its header declares {cut[0]:.3f} s of audio, it holds "
                                     f"{cut[1]:.3f} s (an interrupted copy or download)")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioLoadError(fspath, "the file contains no audio samples")
    if sample_rate is not None and file_sr < MIN_FILE_RATE:
        raise AudioLoadError(fspath, f"its header declares a sample rate of {file_sr} Hz, below any audio's "
                                     f"({MIN_FILE_RATE} Hz): a damaged header?")
    if not np.isfinite(data).all():
        raise AudioLoadError(fspath, "the file contains non-finite samples (NaN or inf)")
    data = np.ascontiguousarray(data.T)  # [C, N]
    if mono:
        data = data[0] if downmix == "first" else data.mean(axis=0, dtype=np.float32)
    wave = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    if sample_rate is not None and int(file_sr) != sample_rate:
        wave = resample(wave, int(file_sr), sample_rate)
    return wave


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _wav_cut_short(path: str) -> Optional[Tuple[float, float]]:
    """``(declared, held)`` seconds when ``path`` is a RIFF WAV whose data chunk holds less than its
    header declares (libsndfile reads such a file as the shorter clip it holds, and says nothing);
    None otherwise, also for the sizes that writers to a pipe leave (0 or 0xFFFFFFFF) and for RF64."""
    import struct
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = os.fstat(f.fileno()).st_size
            byte_rate = block = 0
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, n = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = f.read(min(n, 16))
                    if len(fmt) < 16:
                        return None
                    byte_rate, block = struct.unpack("<I", fmt[8:12])[0], struct.unpack("<H", fmt[12:14])[0]
                    f.seek(n - 16 + (n & 1), os.SEEK_CUR)
                elif cid == b"data":
                    held = size - f.tell()
                    if n in (0, 0xFFFFFFFF) or byte_rate <= 0 or held >= n or n - held < max(1, block):
                        return None
                    return n / byte_rate, held / byte_rate
                else:
                    f.seek(n + (n & 1), os.SEEK_CUR)
    except (OSError, struct.error):
        return None


def _as_rate(sr, name: str) -> int:
    if isinstance(sr, float) and sr.is_integer():
        sr = int(sr)
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"{name} must be a positive integer number of Hz, got {sr!r}")
    return int(sr)


# the largest up or down factor resampled with the polyphase filter (its length is 20 times that)
_POLYPHASE_LIMIT = 1000
# below this a file's rate is a damaged header, not audio (it would be upsampled many times over)
MIN_FILE_RATE = 1000


def resample(waveform: ArrayLike, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample ``[..., N]`` along the last axis with ``scipy.signal.resample_poly``.

    ``up`` and ``down`` are ``new_sr`` and ``orig_sr`` divided by their gcd; the output has
    ``ceil(N * up / down)`` samples. Where one of them exceeds 1000 (no standard pair of rates: 44.1
    kHz to 16 kHz is 160 / 441; an odd rate such as 44101 Hz is 16000 / 44101), whose polyphase filter
    would take time and memory in proportion, the FFT resampler (``scipy.signal.resample``) gives
    those samples instead. Floating inputs keep their dtype and device (integer inputs come back as
    float32 with the same scale). Not differentiable (computed with SciPy).
    """
    from scipy.signal import resample_poly

    orig_sr = _as_rate(orig_sr, "orig_sr")
    new_sr = _as_rate(new_sr, "new_sr")
    src = _as_tensor(waveform)
    keep = src.dtype if src.is_floating_point() else torch.float32  # float16 / bfloat16 too
    x = _as_float_tensor(src)
    if x.dim() == 0:
        raise ValueError("resample expects a waveform [..., N], got a scalar")
    if orig_sr == new_sr:
        return x.to(keep)
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    arr = x.detach().cpu().numpy()
    if max(up, down) > _POLYPHASE_LIMIT:
        from scipy.signal import resample as fft_resample
        out = fft_resample(arr, -(-arr.shape[-1] * up // down), axis=-1)
    else:
        out = resample_poly(arr, up, down, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=keep)


def _as_tensor(waveform: ArrayLike) -> torch.Tensor:
    """``waveform`` as a tensor, its dtype kept: numpy arrays that torch cannot view (big-endian
    samples, soundfile's '>f4'; reversed views) are copied to native order first."""
    if isinstance(waveform, torch.Tensor):
        return waveform
    if not isinstance(waveform, np.ndarray) and isinstance(waveform, (list, tuple, float)):
        a = np.asarray(waveform)  # Python numbers: float32 samples (numpy would make float64 of them)
        return torch.as_tensor(a.astype(np.float32) if a.dtype == np.float64 else a)
    a = np.asarray(waveform)
    if a.dtype.byteorder not in ("=", "|") or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
    return torch.as_tensor(a)


def _as_float_tensor(waveform: ArrayLike) -> torch.Tensor:
    """Tensor view of ``waveform``: float32/float64 kept, other types converted to float32.

    Integer samples keep their scale (no division by full scale), as torchaudio's fbank does.
    """
    x = _as_tensor(waveform)
    if x.dtype not in (torch.float32, torch.float64):
        if x.is_complex():
            raise TypeError("a waveform must be real-valued")
        x = x.to(torch.float32)
    return x


# ----------------------------------------------------------------------------------------------
# Kaldi-compatible fbank
# ----------------------------------------------------------------------------------------------
def _f32(x):
    """Round to float32 (kept as a float64 array). Each float32 operation below is computed in
    float64 and rounded once, which is the correctly rounded float32 result for + - * /, so the
    filter weights do not depend on the platform's vectorised float32 math."""
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def _nyquist_edges(sample_rate: float, low_freq: float, high_freq: float) -> Tuple[float, float]:
    nyquist = 0.5 * sample_rate
    high = high_freq + nyquist if high_freq <= 0.0 else high_freq
    if not (0.0 <= low_freq < nyquist and 0.0 < high <= nyquist and low_freq < high):
        raise ValueError(
            f"bad mel frequency range: low_freq={low_freq}, high_freq={high_freq} "
            f"(resolved {high}); need 0 <= low < high <= Nyquist = {nyquist}"
        )
    return float(low_freq), float(high)


def mel_filterbank(
    num_mel_bins: int = 128,
    n_fft: int = 512,
    sample_rate: float = SAMPLE_RATE,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Kaldi's triangular HTK-mel filters, as torchaudio's ``get_mel_banks`` builds them.

    Returns ``[num_mel_bins, n_fft // 2 + 1]`` float32. The filters are equally spaced in
    mel = 1127 ln(1 + f / 700) between ``low_freq`` and ``high_freq`` (``<= 0`` means Nyquist plus
    that offset); FFT bin ``k < n_fft / 2`` gets the weight ``max(0, min(up, down))`` of the
    triangle at its mel frequency; the Nyquist bin gets no weight. With 128 filters at 512 points
    some filters hold no bin at all (filter 3 at 16 kHz), which torchaudio accepts and which this
    function reproduces.

    Like Kaldi and torchaudio the weights are computed in float32 arithmetic (the band edges in
    float64, rounded), step by step in torchaudio's order. This matters: a bin at the far edge of a
    triangle has a small weight that one float32 ulp of its mel value (~2.4e-4 near 2800 mel)
    changes by ~1.1e-5 absolute, so a tone sitting on that bin moves its band by up to ~4e-4 in
    the log domain. Float64 weights would differ from the reference by up to ~1e-3 there.
    """
    if num_mel_bins < 1 or n_fft < 2 or n_fft % 2:
        raise ValueError(f"need num_mel_bins >= 1 and an even n_fft >= 2, got {num_mel_bins}, {n_fft}")
    low, high = _nyquist_edges(float(sample_rate), float(low_freq), float(high_freq))
    num_fft_bins = n_fft // 2
    # python-float (float64) scalars, as torchaudio's mel_scale_scalar
    mel_low = 1127.0 * math.log(1.0 + low / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high / 700.0)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    lo32, d32 = _f32(mel_low), _f32(delta)  # scalars meet float32 tensors: rounded to float32
    b = np.arange(num_mel_bins, dtype=np.float64)[:, None]
    left = _f32(lo32 + _f32(b * d32))
    center = _f32(lo32 + _f32(_f32(b + 1.0) * d32))
    right = _f32(lo32 + _f32(_f32(b + 2.0) * d32))
    freq = _f32(_f32(float(sample_rate) / n_fft) * np.arange(num_fft_bins, dtype=np.float64))
    mel = _f32(_f32(1127.0) * _f32(np.log(_f32(1.0 + _f32(freq / _f32(700.0))))))[None, :]
    up = _f32(_f32(mel - left) / _f32(center - left))
    down = _f32(_f32(right - mel) / _f32(right - center))
    weights = np.maximum(0.0, np.minimum(up, down))
    out = np.zeros((num_mel_bins, num_fft_bins + 1), dtype=np.float32)
    out[:, :num_fft_bins] = weights
    return torch.from_numpy(out)


def _frame_params(sample_rate: float, frame_length: float, frame_shift: float) -> Tuple[int, int, int]:
    if not all(math.isfinite(v) and v > 0 for v in (sample_rate, frame_length, frame_shift)):
        raise ValueError(f"sample_rate={sample_rate}, frame_length={frame_length} ms and frame_shift={frame_shift} ms "
                         "must be positive numbers")
    # same integer truncation as torchaudio / Kaldi
    win = int(sample_rate * frame_length * 0.001)
    shift = int(sample_rate * frame_shift * 0.001)
    if win < 2 or shift < 1:
        raise ValueError(
            f"frame_length {frame_length} ms / frame_shift {frame_shift} ms at {sample_rate} Hz give "
            f"{win} / {shift} samples; need at least 2 / 1"
        )
    return win, shift, 1 << (win - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _fbank_constants(device: torch.device, dtype: torch.dtype, sample_rate: float, num_mel_bins: int,
                     win: int, n_fft: int, low_freq: float, high_freq: float):
    """(window [win], mel matrix transposed [n_fft//2+1, num_mel_bins]) on ``device`` in ``dtype``."""
    n = torch.arange(win, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2.0 * math.pi * n / (win - 1))  # Kaldi "hanning": symmetric Hann
    mel = mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq)
    return (window.to(device=device, dtype=dtype),
            mel.t().contiguous().to(device=device, dtype=dtype))


def fbank(
    waveform: ArrayLike,
    sample_rate: float = SAMPLE_RATE,
    num_mel_bins: int = 128,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    energy_floor: Optional[float] = None,
) -> torch.Tensor:
    """Kaldi-compatible log-mel filterbank, as ``torchaudio.compliance.kaldi.fbank`` computes it.

    With the defaults this equals ``kaldi.fbank(w[None], htk_compat=True, sample_frequency=16000,
    use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)``:

    * frames of ``frame_length`` ms every ``frame_shift`` ms, snip_edges (only whole frames:
      ``1 + (N - 400) // 160`` at 16 kHz; a 10 s clip gives 998);
    * per-frame DC removal, then pre-emphasis ``x[n] - p * x[n-1]`` where the first sample of a
      frame is its own predecessor;
    * symmetric Hann window ``0.5 - 0.5 cos(2 pi n / (L - 1))``, zero padding to the next power of
      two (512), power spectrum;
    * triangular HTK-mel filters (:func:`mel_filterbank`), natural log of
      ``max(energy, energy_floor)`` where ``energy_floor`` defaults to float32 eps (log -15.942385).
      (This is the floor of the mel energies, not Kaldi's ``--energy-floor``, which only concerns
      the log-energy coefficient that Audio-MAE does not use.)

    The waveform's mean is *not* removed here (the Audio-MAE preprocessing removes the clip mean
    first; see :func:`waveform_to_input`). Integer samples are converted to float32 without
    rescaling, like torchaudio (int16 PCM gives values 32768 times those of the same audio as floats
    in [-1, 1]: pass floats, or use :func:`waveform_to_input`, which scales PCM); non-finite samples
    give NaN frames, as there (:func:`waveform_to_input` refuses them).

    Args:
        waveform: ``[N]`` or ``[..., N]`` (e.g. ``[B, N]`` equal-length clips), tensor or array,
            on any device.
    Returns:
        ``[frames, num_mel_bins]`` or ``[..., frames, num_mel_bins]``; float64 input gives float64,
        everything else float32.
    Raises:
        ValueError: if the clip is shorter than one frame.
    """
    x = _as_float_tensor(waveform)
    if x.dim() == 0:
        raise ValueError("fbank expects a waveform [N] or [..., N], got a scalar")
    sample_rate = float(sample_rate)
    win, shift, n_fft = _frame_params(sample_rate, float(frame_length), float(frame_shift))
    n = x.shape[-1]
    if n < win:
        hint = ""
        if x.dim() == 2 and x.shape[0] >= win and n <= 8:
            hint = (f" (a waveform of shape {tuple(x.shape)}: the samples are the last axis; for soundfile's "
                    "[samples, channels] layout pass one channel, x[:, 0], or the transpose)")
        raise ValueError(
            f"waveform too short for fbank: {n} samples, but one frame of {frame_length} ms at "
            f"{sample_rate:g} Hz needs {win} samples{hint}"
        )
    if int(num_mel_bins) != num_mel_bins or int(num_mel_bins) < 1:
        raise ValueError(f"num_mel_bins must be a positive whole number, got {num_mel_bins}")
    num_mel_bins = int(num_mel_bins)
    low, high = _nyquist_edges(sample_rate, float(low_freq), float(high_freq))
    floor = FLOAT32_EPS if energy_floor is None else float(energy_floor)
    if not floor > 0.0:
        raise ValueError(f"energy_floor must be positive (it is floored before the log), got {energy_floor}")
    window, mel_t = _fbank_constants(x.device, x.dtype, sample_rate, int(num_mel_bins), win, n_fft,
                                     low, high)

    frames = x.unfold(-1, win, shift)  # [..., T, win] (a view)
    if frames.numel() == 0:  # an empty batch: no frames to compute
        return torch.zeros(frames.shape[:-1] + (mel_t.shape[1],), dtype=mel_t.dtype, device=x.device)
    if x.device.type != "cpu" or frames[..., 0].numel() <= _CPU_FRAMES_PER_PASS:
        return _log_mel(frames, window, mel_t, float(preemphasis), n_fft, floor)
    # On CPUs, a few clips at a time: each pass then stays in the cache (8 clips of 10 s in one pass
    # take about twice as long as clip by clip). Every frame goes through the same operations.
    lead, T = frames.shape[:-2], frames.shape[-2]
    flat = x.reshape(-1, n)
    out = torch.empty((flat.shape[0], T, mel_t.shape[1]), dtype=mel_t.dtype)
    step = max(1, _CPU_FRAMES_PER_PASS // T)
    for i in range(0, flat.shape[0], step):
        out[i:i + step] = _log_mel(flat[i:i + step].unfold(-1, win, shift), window, mel_t, float(preemphasis),
                                   n_fft, floor)
    return out.reshape(*lead, T, mel_t.shape[1])


_CPU_FRAMES_PER_PASS = 1024


def _log_mel(frames: torch.Tensor, window: torch.Tensor, mel_t: torch.Tensor, preemphasis: float, n_fft: int,
             floor: float) -> torch.Tensor:
    """Frames ``[..., T, win]`` -> log mel energies ``[..., T, M]`` (see :func:`fbank`)."""
    frames = frames - frames.mean(dim=-1, keepdim=True)
    if preemphasis != 0.0:
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - preemphasis * prev
    frames = frames * window
    spectrum = torch.fft.rfft(frames, n=n_fft, dim=-1)  # zero-pads win -> n_fft
    # |X|^2 as re^2 + im^2: torchaudio squares |X|, which agrees to 2 float32 ulps and is several
    # times slower on CPUs (a hypot per bin)
    power = spectrum.real.square() + spectrum.imag.square()
    energies = torch.matmul(power, mel_t)
    return energies.clamp_min(floor).log()


# ----------------------------------------------------------------------------------------------
# normalisation, padding, the whole chain
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormStats:
    """Mean and standard deviation of a dataset's unnormalised fbank values."""

    mean: float
    std: float


DATASET_STATS = {
    "audioset": NormStats(-4.2677393, 4.5689974),
    "esc50": NormStats(-6.6268077, 5.358466),
    "speechcommands": NormStats(-6.845978, 5.5654526),
}
_STATS_ALIASES = {"as": "audioset", "esc": "esc50", "sc": "speechcommands"}


def get_stats(stats) -> Optional[NormStats]:
    """Resolve normalisation statistics.

    Accepts a dataset name (case-insensitive; ``-``, ``_`` and spaces ignored, so ``ESC-50`` and
    ``speech_commands`` work; aliases ``as``, ``esc``, ``sc``), a :class:`NormStats`, a
    ``(mean, std)`` pair, or ``None`` / ``"none"`` for no normalisation.
    """
    if stats is None:
        return None
    if isinstance(stats, NormStats):
        out = stats
    elif isinstance(stats, str):
        key = "".join(c for c in stats.strip().lower() if c not in "-_ ")
        if key == "none":
            return None
        key = _STATS_ALIASES.get(key, key)
        if key not in DATASET_STATS:
            choices = ", ".join(sorted(DATASET_STATS)) + ", none (aliases: " + ", ".join(
                f"{a}={b}" for a, b in sorted(_STATS_ALIASES.items())) + ")"
            raise ValueError(f"unknown normalisation statistics {stats!r}; choose one of {choices}, "
                             "or give a mean and a std (MEAN,STD on the command line, a (mean, std) pair in Python)")
        return DATASET_STATS[key]
    elif isinstance(stats, (tuple, list)) and len(stats) == 2:
        out = NormStats(float(stats[0]), float(stats[1]))
    else:
        raise TypeError(f"stats must be a dataset name, NormStats, (mean, std) or None, got {stats!r}")
    if not (math.isfinite(out.mean) and math.isfinite(out.std) and out.std > 0):
        raise ValueError(f"normalisation statistics need a finite mean and a positive std, got {out}")
    return out


def normalize(features: torch.Tensor, stats) -> torch.Tensor:
    """``(features - mean) / (2 * std)``; ``stats`` as accepted by :func:`get_stats` (None: unchanged)."""
    s = get_stats(stats)
    if s is None:
        return features
    return (features - s.mean) / (2.0 * s.std)


def pad_or_cut(features: torch.Tensor, target_length: int) -> torch.Tensor:
    """Pad with zero rows at the end, or keep the first ``target_length`` rows, of the time axis (dim -2).

    Applied to log-mel values before normalisation, so padded rows become ``-mean / (2 std)``
    after it (+0.467032 with AudioSet statistics).
    """
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a tensor [..., T, F], got {type(features).__name__}")
    if features.dim() < 2:
        raise ValueError(f"features must be [..., T, F], got shape {tuple(features.shape)}")
    if isinstance(target_length, bool) or not isinstance(target_length, numbers.Integral) or target_length < 1:
        raise ValueError(f"target_length must be a positive whole number of frames, got {target_length!r}")
    target_length = int(target_length)
    t = features.shape[-2]
    if t == target_length:
        return features
    if t > target_length:
        return features[..., :target_length, :]
    return torch.nn.functional.pad(features, (0, 0, 0, target_length - t))


def frames_span(frames: int, sample_rate: float = SAMPLE_RATE, frame_length: float = 25.0,
                frame_shift: float = 10.0) -> int:
    """Samples that ``frames`` fbank frames cover (the inverse of :func:`num_frames`): one frame
    length, then one shift per further frame (``(T - 1) * 160 + 400`` at 16 kHz)."""
    win, shift, _ = _frame_params(float(sample_rate), float(frame_length), float(frame_shift))
    return (int(frames) - 1) * shift + win


def num_frames(num_samples, sample_rate: float = SAMPLE_RATE, frame_length: float = 25.0,
               frame_shift: float = 10.0):
    """Frames :func:`fbank` makes of ``num_samples`` samples (snip edges: ``1 + (N - 400) // 160`` at
    16 kHz, 0 below one frame). An int gives an int; a tensor of lengths gives a tensor."""
    win, shift, _ = _frame_params(float(sample_rate), float(frame_length), float(frame_shift))
    if isinstance(num_samples, torch.Tensor):
        n = num_samples.long()
        return torch.where(n >= win, 1 + torch.div(n - win, shift, rounding_mode="floor"), torch.zeros_like(n))
    n = int(num_samples)
    return 1 + (n - win) // shift if n >= win else 0


def pad_beyond(features: torch.Tensor, lengths, stats) -> torch.Tensor:
    """Give the rows past each clip's own frames the padding value.

    ``features`` ``[B, ..., T, F]``: model inputs of clips that were zero-padded to a common number
    of samples before :func:`fbank` (a batch); ``lengths`` [B]: each clip's real number of samples
    (16 kHz). Rows ``t >= num_frames(lengths[b])``, which saw padding samples, become what
    :func:`pad_or_cut` puts there, normalised with ``stats``: 0 before normalisation,
    ``-mean / (2 std)`` after it (+0.467032 with AudioSet statistics). The release computes the fbank
    of the real samples only and pads after the log, so this gives its input (the per-frame DC
    removal makes each real frame independent of the padding and of the clip mean). Returns
    ``features`` itself when every clip fills the rows.
    """
    if lengths is None:
        return features
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != features.shape[0] or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be integers [B] = [{features.shape[0]}], got {lengths.dtype} "
                         f"{list(lengths.shape)}")
    frames = num_frames(lengths)
    T = features.shape[-2]
    if frames.device.type == "cpu" and bool((frames >= T).all()):
        return features  # nothing padded (decided on the host: no device sync)
    # the value exactly as pad_or_cut + normalize make it (in float32, like the fused front ends)
    value = normalize(torch.zeros((), dtype=torch.float32, device=features.device), stats).to(features.dtype)
    rows = torch.arange(T, device=features.device)
    # non_blocking: from pageable host memory the copy is staged at once, without waiting for the device
    keep = rows < frames.to(features.device, non_blocking=True).view((-1,) + (1,) * (features.dim() - 2))
    return torch.where(keep.unsqueeze(-1), features, value)


_INT_FULL_SCALE = {torch.int16: 32768.0, torch.int32: 2147483648.0, torch.int8: 128.0}


FUSED_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_fbank_args(waveforms: torch.Tensor, target_length: Optional[int], stats, out_dtype: torch.dtype,
                     mode: str, num_mel_bins: int) -> Tuple[torch.Tensor, bool, int, Optional["NormStats"]]:
    """Checks the arguments of the fused front ends (the Triton and CUDA kernels of
    :func:`audiomae.ops_step.fbank_features`: 16 kHz float samples, ``mode="exact"``, float32 /
    bfloat16 / float16 output) and returns ``(waveforms as [B, N], whether they were [N], target
    length or -1 for every frame, statistics or None)``. Raises ValueError with the reason."""
    if mode != "exact":
        raise ValueError(f"fbank mode must be one of ('exact',), got {mode!r}")
    if out_dtype not in FUSED_OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {FUSED_OUT_DTYPES}, got {out_dtype}")
    if waveforms.dim() not in (1, 2):
        raise ValueError(f"waveforms must be [N] or [B, N], got shape {tuple(waveforms.shape)}")
    if not waveforms.dtype.is_floating_point:
        raise ValueError(f"waveforms must hold float samples, got {waveforms.dtype} (load_audio gives float "
                         "samples in [-1, 1])")
    win = _frame_params(float(SAMPLE_RATE), 25.0, 10.0)[0]
    if waveforms.shape[-1] < win:
        raise ValueError(f"waveform too short for fbank: {waveforms.shape[-1]} samples, but one frame of 25 ms at "
                         f"{SAMPLE_RATE} Hz needs {win} samples")
    if target_length is not None and int(target_length) < 1:
        raise ValueError(f"target_length must be positive, got {target_length}")
    if int(num_mel_bins) < 1:
        raise ValueError(f"num_mel_bins must be positive, got {num_mel_bins}")
    single = waveforms.dim() == 1
    x = waveforms.unsqueeze(0) if single else waveforms
    return x.detach(), single, -1 if target_length is None else int(target_length), get_stats(stats)


def check_waveform_batch(x: torch.Tensor, lengths=None, check_finite: bool = True, on_cpu_only: bool = False):
    """The checks of :func:`waveform_to_input` on its float waveform ``[N]`` or ``[B, N]`` and its
    ``lengths``, which it returns as a tensor (None stays None): non-finite samples (with
    ``check_finite``) and lengths that are not ``B`` whole numbers in ``[0, N]``. ``on_cpu_only``
    skips the checks that would read a GPU tensor back (a device synchronisation on a hot path)."""
    if check_finite and not (on_cpu_only and x.device.type != "cpu") and not bool(torch.isfinite(x).all()):
        bad = ~torch.isfinite(x)
        where = bad.nonzero()[0].tolist()
        count = int(bad.sum())
        raise ValueError(f"waveform holds {count} non-finite sample{'s' if count != 1 else ''} (NaN or inf; the first at index "
                         f"{where[-1] if x.dim() == 1 else tuple(where)}): every frame of the clip would be NaN")
    if lengths is None:
        return None
    if x.dim() != 2:
        raise ValueError("lengths go with a batch of waveforms [B, N]; cut a single clip to its length instead")
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (x.shape[0],) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be {x.shape[0]} whole numbers of samples (one per clip), got "
                         f"{lengths.dtype} of shape {tuple(lengths.shape)}")
    if not (on_cpu_only and lengths.device.type != "cpu") and bool(((lengths < 0) | (lengths > x.shape[-1])).any()):
        raise ValueError(f"lengths must be in [0, {x.shape[-1]}] (the clips' samples), got "
                         f"{lengths.min().item()}..{lengths.max().item()}")
    return lengths


def waveform_to_input(
    waveform: ArrayLike,
    sample_rate: int = SAMPLE_RATE,
    target_length: Optional[int] = 1024,
    stats="audioset",
    num_mel_bins: int = 128,
    lengths=None,
    check_finite: bool = True,
) -> torch.Tensor:
    """The paper's preprocessing: waveform -> model input.

    Per-clip mean removal, resampling to 16 kHz if ``sample_rate`` differs, :func:`fbank`,
    :func:`pad_or_cut` to ``target_length`` frames (None keeps all), :func:`normalize`.

    ``[N]`` gives ``[1, T, F]``; ``[B, N]`` gives ``[B, 1, T, F]``. Floating waveforms are taken
    as they are (expected in [-1, 1]); integer PCM (int8/int16/int32 tensors or arrays) is scaled
    to [-1, 1] by its full scale, as a file reader would, since the statistics assume that range.
    ``lengths`` (``[B]``, with ``[B, N]`` clips zero-padded to a common length): each clip's real
    number of samples at ``sample_rate``; the rows of the frames that reach into the padding then
    hold the padding value, as for a clip computed alone (:func:`pad_beyond`). Non-finite samples
    are refused (ValueError); ``check_finite=False`` skips that pass (NaN frames then, as in the
    fused front ends, which do not look).
    """
    x = _as_tensor(waveform)
    if x.dtype in _INT_FULL_SCALE:
        x = x.to(torch.float32) / _INT_FULL_SCALE[x.dtype]
    elif x.dtype == torch.uint8:
        x = (x.to(torch.float32) - 128.0) / 128.0
    elif not (x.dtype.is_floating_point or x.is_complex()):
        # int64 (numpy's default integer), unsigned 16/32-bit, bool: no full scale to divide by
        raise TypeError(f"waveform samples of type {str(x.dtype).replace('torch.', '')} have no known full scale: "
                        "pass float samples in [-1, 1] (e.g. x / 32768 for 16-bit PCM held in a wider type) or "
                        "int8, int16, int32 or uint8 PCM")
    x = _as_float_tensor(x)
    if x.dim() not in (1, 2):
        raise ValueError(f"waveform must be [N] or [B, N], got shape {tuple(x.shape)}")
    lengths = check_waveform_batch(x, lengths, check_finite)
    x = x - x.mean(dim=-1, keepdim=True)
    sample_rate = _as_rate(sample_rate, "sample_rate")
    if lengths is not None:
        if sample_rate != SAMPLE_RATE:  # the samples that only real samples reach
            lengths = torch.div(lengths.long() * SAMPLE_RATE, sample_rate, rounding_mode="floor")
    if sample_rate != SAMPLE_RATE:
        x = resample(x, sample_rate, SAMPLE_RATE)
    if isinstance(target_length, numbers.Integral) and not isinstance(target_length, bool) and target_length >= 1:
        # the frames kept read only the samples they span (frames are independent of each other, and the
        # clip's mean is removed above): a long file's log-mel is not made whole to keep its start
        x = x[..., : frames_span(int(target_length))]
    feats = fbank(x, sample_rate=SAMPLE_RATE, num_mel_bins=num_mel_bins)
    if target_length is not None:
        feats = pad_or_cut(feats, target_length)
    feats = pad_beyond(normalize(feats, stats), lengths, stats)
    return feats.unsqueeze(-3)


def load_input(path, target_length: Optional[int] = 1024, stats="audioset", downmix: str = "first") -> torch.Tensor:
    """Read a file and make the model input ``[1, T, F]`` (:func:`load_audio` + :func:`waveform_to_input`;
    ``downmix`` as in :func:`load_audio`)."""
    return waveform_to_input(load_audio(path, SAMPLE_RATE, mono=True, downmix=downmix), SAMPLE_RATE,
                             target_length, stats)


# ----------------------------------------------------------------------------------------------
# dataset statistics
# ----------------------------------------------------------------------------------------------
class StatsAccumulator:
    """Running mean and standard deviation of unnormalised fbank values over a dataset.

    Each :meth:`update` reduces its batch in float64 and merges it with the running totals
    (Chan et al.'s parallel variance update), so the result does not depend on how the data are
    batched. :meth:`result` gives the sample standard deviation (``torch.std``'s default).
    Pass fbank values before padding, so padded rows do not count.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0

    def update(self, features: ArrayLike) -> "StatsAccumulator":
        x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
        x = x.detach().reshape(-1).to(torch.float64)
        n = x.numel()
        if n == 0:
            return self
        m = x.mean()
        m2 = float(((x - m) ** 2).sum())
        m = float(m)
        if not (math.isfinite(m) and math.isfinite(m2)):
            raise ValueError("features contain non-finite values")
        total = self.count + n
        d = m - self._mean
        self._mean += d * n / total
        self._m2 += m2 + d * d * self.count * n / total
        self.count = total
        return self

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        if self.count < 2:
            raise ValueError(f"need at least 2 values for a standard deviation, have {self.count}")
        return math.sqrt(self._m2 / (self.count - 1))

    def result(self) -> NormStats:
        return NormStats(self.mean, self.std)


def compute_stats(features: Iterable[ArrayLike]) -> NormStats:
    """:class:`NormStats` of all values in an iterable of fbank tensors/arrays."""
    acc = StatsAccumulator()
    for f in features:
        acc.update(f)
    return acc.result()
