"""Plain PyTorch references of the training-step ops: masked patch embedding, the decoder's
unshuffle, the masked norm-pix loss and the log-mel front end.

Each function is written as the model's eager code computes the same thing, operation for
operation, so that the ``torch`` backend gives the model's numbers bit for bit. They are the CPU
path and the oracle the Triton kernels in :mod:`audiomae.kernels` are tested against.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# masking bookkeeping
# ----------------------------------------------------------------------------------------------
def random_masking_ids(batch: int, length: int, len_keep: int, device=None,
                       noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The release's unstructured masking, without touching the tokens.

    Per sample ``noise ~ U[0, 1)`` of length ``length`` (or the given ``noise`` [B, L]);
    ``ids_shuffle = argsort(noise)``, ``ids_restore = argsort(ids_shuffle)``. Returns
    ``ids_keep`` [B, len_keep] (int64, the first ``len_keep`` of ``ids_shuffle``), ``ids_restore``
    [B, L] (int64) and ``mask`` [B, L] (float32, 1 = removed), exactly as
    :func:`audiomae.masking.random_masking` computes them (same random draws when ``noise`` is None).
    Tie rule: equal noise values keep index order (a stable argsort, as the ``cuda`` backend sorts;
    NaN last), so a given ``noise`` with ties gives the same ids on every backend and device.
    Everything stays on the device: no host synchronisation.
    """
    if noise is None:
        noise = torch.rand(batch, length, device=device)
    elif not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor [B, L] = [{batch}, {length}], got {type(noise).__name__}")
    elif noise.shape != (batch, length):
        raise ValueError(f"noise for unstructured masking must be [B, L] = [{batch}, {length}], "
                         f"got {list(noise.shape)}")
    if not 0 <= len_keep <= length:
        raise ValueError(f"len_keep must be in [0, {length}], got {len_keep}")
    # stable: ties in index order (continuous noise has none in practice: the release's ids)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # of a permutation: no ties
    ids_keep = ids_shuffle[:, :len_keep]
    # the release builds [0]*K + [1]*(L-K) and gathers it with ids_restore: the same values
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return ids_keep, ids_restore, mask


# ----------------------------------------------------------------------------------------------
# encoder input
# ----------------------------------------------------------------------------------------------
def masked_patch_embed_reference(spec: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 pos: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Embed every patch, add positions, keep ``ids_keep``: the model's eager path.

    ``spec`` [B, C, T, F], ``weight`` [D, C, p, p], ``bias`` [D], ``pos`` [1, 1 + L, D] (row 0 is the
    cls token's), ``ids_keep`` [B, K] -> ``[B, K, D]`` with
    ``out[b, k] = conv(spec)[b, l] + pos[0, 1 + l]``, ``l = ids_keep[b, k]`` (time-major patch index).
    """
    p = weight.shape[-1]
    x = F.conv2d(spec, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos[:, 1:, :]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------
# decoder input
# ----------------------------------------------------------------------------------------------
def decoder_unshuffle_reference(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                                pos: torch.Tensor, keep_cls: bool) -> torch.Tensor:
    """Append mask tokens, restore the original token order, add positions.

    ``x`` [B, 1 + K, D] (cls first, then the kept tokens in kept order), ``mask_token`` [1, 1, D],
    ``ids_restore`` [B, L], ``pos`` [1, 1 + L, D] -> ``[B, L, D]``, or ``[B, 1 + L, D]`` with the cls
    token in front when ``keep_cls`` (global decoders). Row ``l`` is ``x[b, 1 + r]`` when
    ``r = ids_restore[b, l] < K``, else the mask token (cast to ``x.dtype``), plus ``pos[0, 1 + l]``.
    """
    B, L = ids_restore.shape
    mask_tokens = mask_token.to(x.dtype).expand(B, L - (x.shape[1] - 1), -1)
    seq = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if keep_cls:
        return torch.cat([x[:, :1, :], seq], dim=1) + pos
    return seq + pos[:, 1:, :]


# ----------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------
def patchify_reference(spec: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, T, F]`` -> ``[B, (T/p)*(F/p), p*p*C]``, time-major patches, each row-major; remainders cropped."""
    B, C, T, Fq = spec.shape
    h, w = T // p, Fq // p
    x = spec[:, :, : h * p, : w * p].reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def masked_norm_pix_loss_reference(pred: torch.Tensor, spec: torch.Tensor, mask: torch.Tensor, patch_size: int,
                                   norm_pix: bool = True) -> torch.Tensor:
    """Mean over removed patches of the per-patch MSE between ``pred`` [B, L, p*p] and the patches of
    ``spec`` [B, 1, T, F], each normalised to zero mean and unit (unbiased) variance when ``norm_pix``
    (``(x - mean) / sqrt(var + 1e-6)``): ``sum(mse * mask) / sum(mask)``."""
    target = patchify_reference(spec, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------------
# front end
# ----------------------------------------------------------------------------------------------
def fbank_features_reference(waveforms: torch.Tensor, target_length: Optional[int] = 1024, stats="audioset",
                             out_dtype: torch.dtype = torch.float32, mode: str = "exact",
                             num_mel_bins: int = 128) -> torch.Tensor:
    """The model input from 16 kHz waveforms: :func:`audiomae.audio.waveform_to_input` (clip mean
    removed, Kaldi fbank, pad with zeros or cut to ``target_length``, ``(x - mean) / (2 std)``),
    written in ``out_dtype``. ``[B, N]`` -> ``[B, 1, T, num_mel_bins]``; ``[N]`` -> ``[1, T, num_mel_bins]``.
    ``mode`` is accepted for symmetry with the kernel; the reference is always exact."""
    from ..audio import SAMPLE_RATE, waveform_to_input

    # like the kernels it is the reference of, it does not look for non-finite samples (no device sync)
    return waveform_to_input(waveforms, SAMPLE_RATE, target_length, stats, num_mel_bins,
                             check_finite=False).to(out_dtype)
