"""Reconstruction pictures and audio, as the paper's audible examples.

``reconstruction_figure`` draws four panels: the input, the masked input, the reconstruction, and
the reconstruction pasted into the removed patches around the visible ones. ``mel_to_audio``
inverts a normalised log-mel spectrogram: undo the normalisation and the log, map mel energies back
to linear power with the pseudo-inverse of the mel matrix, then Griffin-Lim for the phase.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .audio import SAMPLE_RATE, get_stats, mel_filterbank


def denormalize(spec: torch.Tensor, stats="audioset") -> torch.Tensor:
    s = get_stats(stats)
    return spec if s is None else spec * (2 * s.std) + s.mean


def mel_to_audio(log_mel: torch.Tensor, stats="audioset", n_iter: int = 64, n_fft: int = 512,
                 win_length: int = 400, hop_length: int = 160) -> torch.Tensor:
    """``[T, 128]`` normalised log-mel (the model's input layout, one clip; ``[1, T, 128]`` and
    ``[1, 1, T, 128]`` too) -> waveform ``[N]`` at 16 kHz. ``T`` is at least 3 frames."""
    if not torch.is_tensor(log_mel):
        raise TypeError(f"mel_to_audio takes a tensor [T, mel bins], got {type(log_mel).__name__}")
    shape = tuple(log_mel.shape)
    while log_mel.dim() > 2 and log_mel.shape[0] == 1:
        log_mel = log_mel[0]
    if log_mel.dim() != 2:
        raise ValueError(f"mel_to_audio takes one clip's log-mel [T, mel bins], got shape {shape} (index the "
                         "batch and channel first, e.g. recon[0, 0])")
    if log_mel.shape[0] < 3:
        raise ValueError(f"mel_to_audio needs at least 3 frames (30 ms) to invert, got {log_mel.shape[0]}")
    if log_mel.is_complex() or not log_mel.is_floating_point():
        raise TypeError(f"mel_to_audio takes a real floating-point log-mel, got {log_mel.dtype}")
    log_mel = log_mel.detach().cpu()
    fb = mel_filterbank(log_mel.shape[-1], n_fft=n_fft).double()  # [M, n_fft//2+1]
    energy = denormalize(log_mel.double(), stats).exp()  # [T, M]
    power = (energy @ torch.linalg.pinv(fb).T).clamp_min(0.0)  # [T, bins]
    mag = power.sqrt().T  # [bins, T]
    window = torch.hann_window(win_length, periodic=False, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    angles = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=g, dtype=torch.float64))
    spec = mag * angles
    for _ in range(n_iter):
        wave = torch.istft(spec, n_fft, hop_length, win_length, window, center=True)
        rebuilt = torch.stft(wave, n_fft, hop_length, win_length, window, center=True, return_complex=True)
        rebuilt = rebuilt[:, : mag.shape[1]]
        if rebuilt.shape[1] < mag.shape[1]:
            rebuilt = torch.nn.functional.pad(rebuilt, (0, mag.shape[1] - rebuilt.shape[1]))
        spec = mag * torch.exp(1j * torch.angle(rebuilt))
    wave = torch.istft(spec, n_fft, hop_length, win_length, window, center=True)
    peak = wave.abs().max()
    return (wave / peak * 0.9 if peak > 0 else wave).float()


def reconstruction_figure(spec: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor, path: str,
                          title: Optional[str] = None) -> None:
    """Save a PNG with input, masked input, reconstruction and reconstruction + visible patches.

    All three tensors are one clip ``[T, F]`` (time first); ``mask`` is 1 on removed patches (with
    overlapping patches, the fraction of the patches covering a value that were removed: the masked
    panel hides the values in no kept patch, the pasted one blends by the fraction)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: drawing the reconstruction needs matplotlib (pip install matplotlib)") from None
    spec, recon, mask = (t.detach().float().cpu() for t in (spec, recon, mask))
    # hidden: in no kept patch (overlapping patches give fractions: removed from some patches only)
    hidden = mask >= 1
    masked = spec.masked_fill(hidden, float("nan"))
    pasted = spec * (1 - mask) + recon * mask
    panels = [("input", spec), (f"masked input ({hidden.float().mean() * 100:.0f} % removed)", masked),
              ("reconstruction", recon), ("reconstruction + visible", pasted)]
    vmin, vmax = float(spec.min()), float(spec.max())
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 * len(panels)), sharex=True)
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(img.T.numpy(), origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="magma",
                  interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("mel bin")
    axes[-1].set_xlabel("frame (10 ms)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # through a file object: a PostScript picture would otherwise carry the file's name (a temporary
    # one, the output being written beside its place and moved there) as its title
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    with open(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=100)
    plt.close(fig)


def write_wav(path: str, wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    import soundfile as sf
    sf.write(path, wave.detach().cpu().numpy(), sample_rate)
