"""Patch masking: the release's unstructured recipe and the structured (time / frequency) variants.

All functions work on time-major token sequences ``[B, L, D]`` with ``L = T * F`` patches.
They return the kept tokens and the bookkeeping the decoder and loss need:

- ``ids_keep`` [B, K]: the original index of each kept token, in the order they are kept;
- ``ids_restore`` [B, L]: gathering ``cat([kept, masked])`` with it restores the original order;
- ``mask`` [B, L]: 1 for removed patches, 0 for kept ones, in the original order.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch


class Masking(NamedTuple):
    x: torch.Tensor  # [B, K, D] kept tokens
    mask: torch.Tensor  # [B, L] 1 = removed
    ids_restore: torch.Tensor  # [B, L]
    ids_keep: torch.Tensor  # [B, K]


def num_kept(length: int, ratio: float) -> int:
    """The release's count of kept items: ``int(length * (1 - ratio))``, at least one."""
    return max(1, int(length * (1 - ratio)))


def check_ratio(value, name: str = "mask_ratio", interval: str = "[0, 1)", why: str = "") -> float:
    """``value`` as a float after checking it is a real number in ``interval`` (``"[0, 1)"``,
    ``"(0, 1)"`` or ``"[0, 1]"``); a ValueError (TypeError for a non-number) naming ``name``, the
    interval and ``why`` otherwise."""
    why = f" ({why})" if why else ""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in {interval}{why}, got {value!r} ({type(value).__name__})")
    value = float(value)
    low_ok = value > 0.0 if interval[0] == "(" else value >= 0.0
    high_ok = value <= 1.0 if interval[-1] == "]" else value < 1.0
    if math.isnan(value) or not (low_ok and high_ok):
        raise ValueError(f"{name} must be in {interval}{why}, got {value}")
    return value


# the forward call's rule for the pretraining mask_ratio (a config may hold 0: classifiers never mask with it)
PRETRAIN_RATIO = "(0, 1)"
PRETRAIN_RATIO_WHY = "the loss is the mean over the masked patches, the encoder sees the kept ones"


def num_masked(grid: Tuple[int, int], mode: str, mask_ratio: float, t_ratio: Optional[float] = None,
               f_ratio: Optional[float] = None) -> int:
    """How many of the ``T * F`` patches each sample's masking removes (the same for every sample), for
    the ratios as :func:`mask_tokens` uses them."""
    T, F = grid
    if mode == "unstructured":
        return T * F - int(T * F * (1 - mask_ratio))
    t = mask_ratio if mode == "time" or t_ratio is None else t_ratio
    f = mask_ratio if mode == "frequency" or f_ratio is None else f_ratio
    kept_t = num_kept(T, t) if mode in ("time", "time_frequency") else T
    kept_f = num_kept(F, f) if mode in ("frequency", "time_frequency") else F
    return T * F - kept_t * kept_f


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b, k], :]`` for ``x`` [B, L, D] and ``ids`` [B, K]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None) -> Masking:
    """Unstructured masking exactly as the release does it.

    Per sample, ``noise ~ U[0, 1)`` of length L (or the given ``noise`` [B, L]); the tokens with the
    ``int(L * (1 - mask_ratio))`` smallest noise values are kept, in increasing-noise order.
    """
    from .reference.step import random_masking_ids  # the one implementation of the recipe

    B, L, _ = x.shape
    mask_ratio = check_ratio(mask_ratio)
    ids_keep, ids_restore, mask = random_masking_ids(B, L, int(L * (1 - mask_ratio)), x.device, noise)
    return Masking(gather_tokens(x, ids_keep), mask, ids_restore, ids_keep)


def _keep_lines(n: int, ratio: float, noise: torch.Tensor) -> torch.Tensor:
    """Boolean [B, n]: the ``int(n * (1 - ratio))`` lines (at least one) with the smallest noise are
    kept; equal noise values keep index order (a stable argsort, as unstructured masking)."""
    keep = num_kept(n, ratio)
    ids = torch.argsort(noise, dim=1, stable=True)[:, :keep]
    out = torch.zeros(noise.shape, dtype=torch.bool, device=noise.device)
    return out.scatter_(1, ids, True)


def structured_keep(batch: int, grid: Tuple[int, int], mode: str, t_ratio: float, f_ratio: float,
                    noise: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Boolean keep map [B, T * F] for ``mode`` in time | frequency | time_frequency.

    Whole time rows (``time``), whole frequency columns (``frequency``) or both are removed.
    ``noise`` (optional) is [B, T] for time, [B, F] for frequency, [B, T + F] for time_frequency
    (time noise first); the lines with the smallest noise are kept, ties in index order. The ratios
    are in [0, 1]; at least one line of each axis is kept.
    """
    T, F = grid
    sizes = {"time": (T,), "frequency": (F,), "time_frequency": (T, F)}
    if mode not in sizes:
        raise ValueError(f"structured masking mode must be one of {sorted(sizes)}, got {mode!r}")
    if mode in ("time", "time_frequency"):
        t_ratio = check_ratio(t_ratio, "the time masking ratio", "[0, 1]")
    if mode in ("frequency", "time_frequency"):
        f_ratio = check_ratio(f_ratio, "the frequency masking ratio", "[0, 1]")
    n = sum(sizes[mode])
    if noise is None:
        noise = torch.rand(batch, n, device=device)
    elif not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise for {mode} masking must be a torch.Tensor [B, {n}], got {type(noise).__name__}")
    elif noise.shape != (batch, n):
        raise ValueError(f"noise for {mode} masking must be [B, {n}], got {list(noise.shape)}")
    keep_t = torch.ones(batch, T, dtype=torch.bool, device=noise.device)
    keep_f = torch.ones(batch, F, dtype=torch.bool, device=noise.device)
    if mode in ("time", "time_frequency"):
        keep_t = _keep_lines(T, t_ratio, noise[:, :T])
    if mode in ("frequency", "time_frequency"):
        keep_f = _keep_lines(F, f_ratio, noise[:, n - F:])
    return (keep_t[:, :, None] & keep_f[:, None, :]).reshape(batch, T * F)


def masking_from_keep(x: torch.Tensor, keep: torch.Tensor) -> Masking:
    """Masking from a boolean keep map [B, L] with the same number of kept tokens in every row.

    Kept tokens stay in their original (time-major) order.
    """
    B, L, _ = x.shape
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every sample must keep the same number of tokens")
    # stable sort puts kept tokens (key 0) first, each group in original order
    ids_shuffle = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, : int(counts[0])]
    mask = (~keep).float()
    return Masking(gather_tokens(x, ids_keep), mask, ids_restore, ids_keep)


def mask_tokens(x: torch.Tensor, grid: Tuple[int, int], mode: str, mask_ratio: float,
                t_ratio: Optional[float] = None, f_ratio: Optional[float] = None,
                noise: Optional[torch.Tensor] = None) -> Masking:
    """Dispatch on ``mode``: unstructured uses ``mask_ratio``; ``time`` and ``frequency`` use
    ``mask_ratio`` for their axis; ``time_frequency`` uses ``t_ratio`` and ``f_ratio``."""
    if mode == "unstructured":
        return random_masking(x, mask_ratio, noise)
    t = mask_ratio if mode == "time" or t_ratio is None else t_ratio
    f = mask_ratio if mode == "frequency" or f_ratio is None else f_ratio
    keep = structured_keep(x.shape[0], grid, mode, t, f, noise=noise, device=x.device)
    return masking_from_keep(x, keep)


def masking_keeps_nothing(grid: Tuple[int, int], mode: str, mask_ratio: float) -> list:
    """[] if the unstructured masking on ``grid`` keeps at least one patch (the release keeps
    ``int(L * (1 - mask_ratio))``, which a ratio close to 1 makes 0), else the problem. The structured
    modes always keep a line."""
    T, F = grid
    L = T * F
    if mode != "unstructured" or int(L * (1 - mask_ratio)) > 0:
        return []
    return [f"{mask_ratio:g} keeps none of the {L} patches of the {T} x {F} patch grid (int({L} x (1 - ratio)) = 0; "
            f"a ratio keeps one where {L} x (1 - ratio) >= 1, about {(L - 1) / L:.4g} or less)"]


def masking_removes_nothing(grid: Tuple[int, int], mode: str, mask_ratio: float, t_ratio: float,
                            f_ratio: float) -> list:
    """[] if the pretraining masking ``mode`` on ``grid`` removes at least one patch per sample, else
    the problem, naming the ratios that decide it."""
    if num_masked(grid, mode, mask_ratio, t_ratio, f_ratio):
        return []
    T, F = grid
    if mode == "time_frequency":
        return [f"mask_t_prob={t_ratio} and mask_f_prob={f_ratio} mask no patch with time_frequency masking; "
                "the pretraining loss is the mean over the masked patches and needs at least one per sample"]
    hint = ("use a larger mask_ratio, in (0, 1)" if num_masked(grid, mode, math.nextafter(1.0, 0.0), t_ratio, f_ratio)
            else f"no mask_ratio does on this grid (one {mode} line is always kept): use another mask_mode")
    return [f"mask_ratio={mask_ratio} masks no patch of the {T} x {F} patch grid with {mode} masking; the "
            f"pretraining loss is the mean over the masked patches and needs at least one per sample: {hint}"]
