"""Augmentations of the Audio-MAE recipes, in plain torch (no torchaudio).

* :func:`mixup` - batch-mode mixup of the fine-tuning recipe (timm's ``Mixup`` with
  ``mixup_alpha=0.5, cutmix_alpha=0, mode="batch"``).
* :func:`waveform_mixup` - the released fine-tuning's mixup: a clip mixed with another clip, per
  clip with a probability, with Beta(10, 10) weights, before the fbank.
* :func:`spec_augment` - one frequency mask and one time mask per example (torchaudio's
  ``FrequencyMasking``/``TimeMasking`` with ``iid_masks``).
* :func:`roll_and_magnitude` - the pretraining waveform augmentation.

Randomness: every function takes ``generator``: a ``torch.Generator``, a
``numpy.random.Generator``, or ``None`` (torch's global generator, so ``torch.manual_seed`` and the
per-worker seeding of ``DataLoader`` apply).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

Generator = Union[torch.Generator, np.random.Generator, None]


def _numpy_rng(generator: Generator) -> np.random.Generator:
    """A numpy generator drawn from ``generator`` (used for Beta draws, which torch cannot seed)."""
    if isinstance(generator, np.random.Generator):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return np.random.default_rng(seed)


def _uniform(shape: Tuple[int, ...], generator: Generator) -> torch.Tensor:
    """U[0, 1) float32 draws of ``shape`` on the CPU."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.random(shape, dtype=np.float32))
    return torch.rand(shape, generator=generator)


def mixup(
    x: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.5,
    lam: Optional[float] = None,
    generator: Generator = None,
    num_classes: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Batch-mode mixup: ``lam * x + (1 - lam) * x.flip(0)``, targets mixed with the same ``lam``.

    ``x`` is any batch (waveforms ``[B, N]`` or features ``[B, 1, T, F]``); ``target`` is
    ``[B, C]`` (multi-hot or one-hot), or integer class indices ``[B]`` together with
    ``num_classes``. One ``lam`` per batch, drawn from Beta(alpha, alpha) unless given; each
    example is mixed with its mirror in the batch (the reversed batch), as timm's batch mode does.
    ``alpha <= 0`` means no mixing (``lam = 1``). Returns ``(mixed_x, mixed_target, lam)``; the
    inputs are not modified.
    """
    if lam is None:
        lam = float(_numpy_rng(generator).beta(alpha, alpha)) if alpha > 0 else 1.0
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if not target.is_floating_point():
        if num_classes is None:
            raise ValueError("integer targets need num_classes")
        target = torch.nn.functional.one_hot(target.long(), num_classes).to(torch.float32)
    if x.shape[0] != target.shape[0]:
        raise ValueError(f"batch sizes differ: x {tuple(x.shape)}, target {tuple(target.shape)}")
    mixed_x = x * lam + x.flip(0) * (1.0 - lam)
    mixed_t = target * lam + target.flip(0) * (1.0 - lam)
    return mixed_x, mixed_t, lam


def waveform_mixup(
    waveforms: torch.Tensor,
    target: torch.Tensor,
    prob: float = 0.5,
    lengths: Optional[torch.Tensor] = None,
    generator: Generator = None,
    alpha: float = 10.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released fine-tuning's mixup (its data loader's), on a batch of waveforms ``[B, N]``.

    Each clip, with probability ``prob``, is mixed with another clip of the batch drawn uniformly:
    ``lam * w_i + (1 - lam) * w_j`` with its own ``lam ~ Beta(alpha, alpha)`` (the release: 10), the
    partner cut or zero-padded to the clip's length (``lengths`` [B], its real samples; default N);
    targets ``[B, C]`` become ``lam * y_i + (1 - lam) * y_j``. The release draws the partner from the
    whole dataset; another clip of a shuffled batch is such a draw. The mixture goes to the fbank
    like any clip (the clip mean the release subtracts again does not change the fbank, whose frames
    each lose their own mean). Returns ``(waveforms, targets, lam)``, ``lam`` [B] float32 on the
    waveforms' device, 1 for the clips left as they were; the inputs are not modified. Integer (PCM)
    waveforms are mixed in float32 and come back rounded, in their type.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be [B, N], got shape {tuple(waveforms.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if target.dim() != 2 or not target.is_floating_point() or target.shape[0] != waveforms.shape[0]:
        raise ValueError(f"target must be float [B, C] for the {waveforms.shape[0]} waveforms, got "
                         f"{target.dtype} {tuple(target.shape)}")
    B, N = waveforms.shape
    dev = waveforms.device
    mixed = _uniform((B,), generator) < prob
    offset = (_uniform((B,), generator) * max(B - 1, 1)).long().clamp(max=max(B - 2, 0))
    partner = (torch.arange(B) + 1 + offset) % B
    lam = torch.from_numpy(_numpy_rng(generator).beta(alpha, alpha, size=B).astype(np.float32))
    if B < 2:
        mixed[:] = False  # no other clip to mix with
    lam = torch.where(mixed, lam, torch.ones(()))
    lam, partner = lam.to(dev), partner.to(dev)
    other = waveforms[partner]
    if lengths is not None:
        other = other * (torch.arange(N, device=dev) < torch.as_tensor(lengths, device=dev)[:, None])
    if waveforms.is_floating_point():
        w = lam[:, None].to(waveforms.dtype)
        out = w * waveforms + (1 - w) * other
    else:  # PCM samples: mixed in float32 (lam cast to an integer type is 0), rounded back to the type
        w = lam[:, None]
        info = torch.iinfo(waveforms.dtype)
        out = (w * waveforms.float() + (1 - w) * other.float()).round().clamp(info.min, info.max).to(waveforms.dtype)
    t = lam[:, None].to(target.dtype)
    return out, t * target + (1 - t) * target[partner.to(target.device)], lam


def _band_mask(lead: Tuple[int, ...], size: int, mask_param: int, generator: Generator, device) -> torch.Tensor:
    """Boolean [*lead, size]: one band per example of width floor(U * mask_param) at
    floor(U * (size - width)), as torchaudio's ``mask_along_axis_iid`` draws it, with the bound at
    most the axis (torchaudio 0.10, the release's, left it unbounded: see the README)."""
    mask_param = min(int(mask_param), size)
    width = _uniform(lead, generator) * mask_param
    start = _uniform(lead, generator) * (size - width)
    start_i = start.long()
    end_i = start_i + width.long()
    idx = torch.arange(size)
    mask = (idx >= start_i.unsqueeze(-1)) & (idx < end_i.unsqueeze(-1))
    return mask.to(device)


def spec_augment(
    features: torch.Tensor,
    freq_mask: int = 48,
    time_mask: int = 192,
    generator: Generator = None,
    mask_value: float = 0.0,
) -> torch.Tensor:
    """SpecAugment as in the fine-tuning recipe: per example one frequency band and one time band
    set to ``mask_value``.

    ``features`` is ``[..., T, F]`` (e.g. ``[B, 1, T, F]``); every leading index gets its own masks
    (torchaudio's ``iid_masks=True``). Band widths are ``floor(U[0, 1) * freq_mask)`` bins and
    ``floor(U[0, 1) * time_mask)`` frames (so at most ``freq_mask - 1``; 0 disables), placed
    uniformly inside the axis. Returns a new tensor.

    Note: the release masks the log-mel *before* normalisation, with 0; on a normalised input the
    same operation is ``mask_value = -mean / (2 * std)`` (0.467 for AudioSet statistics).
    """
    if features.dim() < 2:
        raise ValueError(f"features must be [..., T, F], got shape {tuple(features.shape)}")
    lead = tuple(features.shape[:-2])
    t, f = features.shape[-2], features.shape[-1]
    mask = torch.zeros(lead + (t, f), dtype=torch.bool, device=features.device)
    if freq_mask > 0:
        mask |= _band_mask(lead, f, freq_mask, generator, features.device).unsqueeze(-2)
    if time_mask > 0:
        mask |= _band_mask(lead, t, time_mask, generator, features.device).unsqueeze(-1)
    return features.masked_fill(mask, mask_value)


def roll_and_magnitude(
    waveform: torch.Tensor,
    generator: Generator = None,
    roll: bool = True,
    magnitude: bool = True,
    return_params: bool = False,
    lengths=None,
):
    """The pretraining waveform augmentation: a random circular shift and a random gain.

    For each waveform (``[N]``, or each row of ``[..., N]``): ``roll`` by a shift drawn uniformly
    from ``0 .. N - 1`` over the time axis, then scale by ``Beta(10, 10) + 0.5`` (in (0.5, 1.5),
    mean 1), as the release's ``_roll_mag_aug`` does. Apply it to the clip's real samples, before
    padding (the datasets' ``transform`` argument does), or give the real lengths of padded clips
    (``lengths``, shaped like the leading axes, e.g. a batch's ``"length"``): each clip is then
    rolled within its first ``lengths`` samples (shift in ``0 .. length - 1``) and its padding
    stays where it is, so no padding is rolled into the clip.

    Difference from the release, on purpose: the release draws the shift from ``len()`` of a
    ``(1, N)`` array, i.e. from ``range(1)``, so its roll is always 0 and only the gain acts. Here
    the roll is implemented as intended; pass ``roll=False`` to reproduce the release exactly.

    Returns the augmented waveform, or ``(waveform, shifts, gains)`` with ``return_params``
    (``shifts`` int64 and ``gains`` float64, shaped like the leading axes).
    """
    if waveform.dim() < 1:
        raise ValueError("waveform must be [N] or [..., N]")
    lead = tuple(waveform.shape[:-1])
    n = waveform.shape[-1]
    span = None  # per-clip real lengths, or None: the whole axis
    if lengths is not None:
        span = torch.as_tensor(lengths).long().cpu()
        if tuple(span.shape) != lead:
            raise ValueError(f"lengths must be shaped like the leading axes {list(lead)}, got {list(span.shape)}")
        span = span.clamp(0, n)
        if bool((span == n).all()):
            span = None  # nothing padded: the plain roll
    if roll and n > 0:
        u = _uniform(lead, generator).double()
        if span is None:
            shifts = (u * n).long().clamp_(max=n - 1)
        else:
            shifts = torch.minimum((u * span).long(), (span - 1).clamp(min=0))
    else:
        shifts = torch.zeros(lead, dtype=torch.long)
    if magnitude:
        gains = torch.from_numpy(np.asarray(_numpy_rng(generator).beta(10.0, 10.0, size=lead) + 0.5, dtype=np.float64))
    else:
        gains = torch.ones(lead, dtype=torch.float64)
    out = waveform
    if roll and n > 0:
        if span is not None:
            # out[j] = x[(j - shift) mod length] inside the clip, out[j] = x[j] in its padding
            j = torch.arange(n)
            m = span.unsqueeze(-1).clamp(min=1)
            idx = torch.where(j < span.unsqueeze(-1), (j - shifts.unsqueeze(-1)) % m, j)
            out = torch.gather(waveform, -1, idx.expand(lead + (n,)).to(waveform.device))
        elif not lead:
            out = torch.roll(waveform, int(shifts), dims=-1)
        else:
            idx = (torch.arange(n) - shifts.unsqueeze(-1)) % n  # out[j] = x[(j - shift) mod n]
            out = torch.gather(waveform, -1, idx.to(waveform.device))
    g = gains.to(device=waveform.device, dtype=waveform.dtype if waveform.is_floating_point() else torch.float32)
    out = out * (g.unsqueeze(-1) if lead else g)
    if return_params:
        return out, shifts, gains
    return out
