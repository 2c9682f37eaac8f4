"""A procedurally generated sound-event dataset: no download, nothing stored.

Ten classes of 16 kHz clips, each drawn with random parameters (frequency, level, onset, duration,
rate, background noise) from ``numpy.random.default_rng([seed, split_id, index])``, so an item is a
pure function of (seed, split, index): every worker process, every run and every machine generate
the same clip. The classes differ in spectral shape and in temporal structure on a log-mel
spectrogram, while the random parameters and the background noise keep them from being separable
by a single feature (several classes are tonal with a random pitch, several are broadband), so a
linear probe on a pretrained encoder has real structure to learn.
"""
from __future__ import annotations

import functools
import zlib
from typing import Any, List, Union

import numpy as np
import torch

from ..audio import SAMPLE_RATE
from .dataset import ClipDataset

CLASS_NAMES: List[str] = [
    "tone",  # steady sinusoid
    "rising_chirp",  # exponential upward sweep
    "falling_chirp",  # exponential downward sweep
    "noise_bursts",  # short white-noise bursts
    "click_train",  # periodic broadband clicks
    "harmonic_stack",  # steady harmonic complex
    "am_tone",  # amplitude-modulated sinusoid (tremolo)
    "fm_tone",  # frequency-modulated sinusoid (vibrato)
    "band_noise",  # steady band-limited noise
    "plucks",  # decaying harmonic notes at random onsets
]

SPLIT_IDS = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def split_id(split: Union[str, int]) -> int:
    """Stable integer for a split name (train 0, val 1, test 2, others a CRC32 of the name)."""
    if isinstance(split, (int, np.integer)):
        if split < 0:
            raise ValueError(f"split id must be non-negative, got {split}")
        return int(split)
    key = str(split).lower()
    return SPLIT_IDS.get(key, zlib.crc32(key.encode()) + 3)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


@functools.lru_cache(maxsize=8)
def _time_axis(n: int, sample_rate: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float64) / sample_rate
    t.flags.writeable = False
    return t


def _sin(phase: np.ndarray) -> np.ndarray:
    """sin of a float64 phase, evaluated in float32 (10x faster; phase error < 1e-2 rad)."""
    return np.sin(phase.astype(np.float32))


def _white(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-variance white noise (uniform samples: spectrally white, and cheap to draw)."""
    return (rng.random(n, dtype=np.float32) - np.float32(0.5)) * np.float32(np.sqrt(12.0))


def _segment_envelope(n: int, start: int, stop: int, fade: int) -> np.ndarray:
    """1 on [start, stop) with linear fades of ``fade`` samples at both ends, 0 elsewhere."""
    env = np.zeros(n, dtype=np.float32)
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return env
    env[start:stop] = 1.0
    f = min(fade, (stop - start) // 2)
    if f > 0:
        ramp = np.linspace(0.0, 1.0, f, endpoint=False, dtype=np.float32)
        env[start : start + f] = ramp
        env[stop - f : stop] = ramp[::-1]
    return env


def _from_spectrum(bins: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Real signal of length n whose rFFT is ``values`` at ``bins`` and 0 elsewhere."""
    spec = np.zeros(n // 2 + 1, dtype=np.complex64)
    np.add.at(spec, bins, values.astype(np.complex64))
    return np.fft.irfft(spec, n).astype(np.float32, copy=False)


def generate_clip(class_id: int, rng: np.random.Generator, num_samples: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One clip of class ``class_id`` (see :data:`CLASS_NAMES`) as float32 [num_samples] in [-1, 1].

    All randomness comes from ``rng``: the same generator state gives the same clip.
    """
    sr = sample_rate
    n = int(num_samples)
    nyq = sr / 2
    t = _time_axis(n, sr)
    # the event occupies [on, off): at least 60 % of what follows its onset
    on = int(rng.uniform(0.0, 0.25) * n)
    off = on + max(int(rng.uniform(0.6, 1.0) * (n - on)), 1)
    env = _segment_envelope(n, on, off, int(0.01 * sr))
    phase0 = rng.uniform(0, 2 * np.pi)

    if class_id == 0:  # tone
        f = _log_uniform(rng, 150.0, 5000.0)
        x = _sin(2 * np.pi * f * t + phase0) * env
    elif class_id in (1, 2):  # exponential chirps over the event
        ratio = rng.uniform(2.5, 8.0)
        if class_id == 1:
            f0 = _log_uniform(rng, 120.0, min(1500.0, 0.8 * nyq / ratio))
        else:
            f0 = _log_uniform(rng, 1000.0, 0.8 * nyq)
            ratio = 1.0 / ratio
        seg_t = np.maximum(t - on / sr, 0.0)
        k = np.log(ratio) / ((off - on) / sr)
        x = _sin(2 * np.pi * f0 * np.expm1(k * seg_t) / k + phase0) * env
    elif class_id == 3:  # white-noise bursts
        x = np.zeros(n, dtype=np.float32)
        for _ in range(int(rng.integers(3, 9))):
            d = min(int(rng.uniform(0.03, 0.2) * sr), n)
            s = int(rng.integers(0, n - d + 1))
            x[s : s + d] = _white(rng, d) * _segment_envelope(d, 0, d, int(0.003 * sr)) * np.float32(rng.uniform(0.4, 1.0))
        x *= np.float32(0.35)
    elif class_id == 4:  # click train: the same short decaying noise click, periodic with jitter
        rate = rng.uniform(4.0, 30.0)
        period = sr / rate
        starts = np.arange(on + rng.uniform(0, period), off, period)
        starts = np.round(starts + rng.normal(0, 0.03 * period, len(starts))).astype(np.int64)
        starts = starts[(starts >= 0) & (starts < n)]
        click_len = int(0.004 * sr)
        click = _white(rng, click_len) * np.exp(-np.arange(click_len) / (rng.uniform(0.0003, 0.0012) * sr)).astype(np.float32)
        x = np.zeros(n + click_len, dtype=np.float32)
        for s in starts:
            x[s : s + click_len] += click
        x = x[:n] / np.float32(max(float(np.abs(click).max()), 1e-9))
    elif class_id == 5:  # harmonic stack (steady), synthesised with one inverse FFT
        f0 = _log_uniform(rng, 90.0, 450.0)
        h = np.arange(1, int(rng.integers(4, 13)) + 1)
        h = h[h * f0 < 0.9 * nyq]
        amps = h ** -rng.uniform(0.3, 1.5) * np.exp(1j * rng.uniform(0, 2 * np.pi, len(h)))
        x = _from_spectrum(np.round(h * f0 * n / sr).astype(np.int64), amps, n)
        x = x / np.float32(max(float(np.abs(x).max()), 1e-9)) * env
    elif class_id == 6:  # AM tone (tremolo)
        f = _log_uniform(rng, 200.0, 4000.0)
        rate = rng.uniform(3.0, 15.0)
        depth = np.float32(rng.uniform(0.7, 1.0))
        mod = 1.0 - depth * 0.5 * (1.0 + _sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
        x = _sin(2 * np.pi * f * t + phase0) * mod * env
    elif class_id == 7:  # FM tone (vibrato)
        fc = _log_uniform(rng, 300.0, 3000.0)
        rate = rng.uniform(2.0, 8.0)
        dev = rng.uniform(0.06, 0.25) * fc
        x = _sin(2 * np.pi * fc * t + (dev / rate) * np.sin(2 * np.pi * rate * t) + phase0) * env
    elif class_id == 8:  # band-limited noise (flat band with random phases, one inverse FFT)
        fc = _log_uniform(rng, 300.0, 5000.0)
        half = rng.uniform(1.15, 1.8)
        lo = int(fc / half * n / sr)
        hi = max(int(min(fc * half, 0.95 * nyq) * n / sr), lo + 1)
        x = _from_spectrum(np.arange(lo, hi), np.exp(2j * np.pi * rng.random(hi - lo)), n)
        x = x / np.float32(max(float(x.std()) * 3.0, 1e-9)) * env
    elif class_id == 9:  # plucks: decaying harmonic notes at random onsets
        x = np.zeros(n, dtype=np.float32)
        for _ in range(int(rng.integers(2, 7))):
            f0 = _log_uniform(rng, 150.0, 1200.0)
            tau = rng.uniform(0.04, 0.3)
            d = min(int(5 * tau * sr), n)
            s = int(rng.integers(0, n - d // 3))
            d = min(d, n - s)
            tt = t[:d]
            s1 = _sin(2 * np.pi * f0 * tt)
            c1 = np.sqrt(np.maximum(0.0, 1.0 - s1 * s1)) * np.sign(_sin(2 * np.pi * f0 * tt + np.pi / 2))
            # sin x + 0.5 sin 2x + 0.25 sin 3x, with sin 2x = 2 sin x cos x, sin 3x = 3 sin x - 4 sin^3 x
            note = s1 + s1 * c1 + 0.25 * (3.0 * s1 - 4.0 * s1 * s1 * s1)
            decay = np.exp(-tt / tau).astype(np.float32)
            x[s : s + d] += note * decay * np.float32(rng.uniform(0.5, 1.0) / 1.75)
    else:
        raise ValueError(f"class_id must be in [0, {len(CLASS_NAMES)}), got {class_id}")

    level = np.float32(_log_uniform(rng, 0.05, 0.6))
    noise_level = np.float32(_log_uniform(rng, 3e-4, 2e-2))
    x = level * x + noise_level * _white(rng, n)
    return np.clip(x, -1.0, 1.0).astype(np.float32, copy=False)


#: the lowest rate the clips are made at (the band-limited noise class needs its band below the Nyquist frequency)
MIN_SAMPLE_RATE = 8000


class SyntheticAudioDataset(ClipDataset):
    """Procedurally generated clips of 10 sound classes (single-label, exactly balanced).

    Clip ``index`` has class ``index % 10`` and is generated from
    ``numpy.random.default_rng([seed, split_id(split), index])``. The default 2.56 s clip gives
    254 fbank frames, padded to a 256-frame model input. Other arguments: see
    :class:`audiomae.data.ClipDataset`.
    """

    multi_label = False

    def __init__(
        self,
        num_clips: int = 1000,
        clip_seconds: float = 2.56,
        seed: int = 0,
        split: Union[str, int] = "train",
        **kwargs: Any,
    ) -> None:
        for name, v in (("num_clips", num_clips), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        super().__init__(clip_seconds, **kwargs)
        if self.sample_rate < MIN_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be at least {MIN_SAMPLE_RATE} Hz for the synthetic clips (below it "
                             f"the noise-band class cannot be made), got {self.sample_rate}")
        self.num_clips = int(num_clips)
        self.seed = int(seed)
        self.split = split
        self.split_id = split_id(split)
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.num_clips

    def labels_of(self, index: int) -> List[int]:
        return [int(index) % len(CLASS_NAMES)]

    def _path(self, index: int) -> str:
        return f"synthetic:{self.split}:{self.seed}:{index}"

    def clip_waveform(self, index: int) -> torch.Tensor:
        """Clip ``index``'s waveform ``[N]``, as ``self[index]["waveform"]``, for any clip number (the clips
        do not depend on the dataset's size): one clip of a large set without making the set."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"a clip number is an integer of at least 0, got {index!r}")
        return torch.from_numpy(self._read(int(index)))

    def _read(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.split_id, int(index)])
        return generate_clip(int(index) % len(CLASS_NAMES), rng, self.clip_samples, self.sample_rate)
