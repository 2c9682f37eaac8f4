"""Fixed 2D sin-cos position tables.

The release builds its table for a grid it reports as (F, T) = (8, 64) while the tokens are ordered
time-major, so token ``i`` gets the 1D code of ``i mod T`` in the first half of the channels and of
``i div T`` in the second half: a scrambled but unique code per position. ``kind="released"``
reproduces that table (the released weights were trained with it); ``kind="grid"`` gives each token
the code of its true (time, frequency) position instead.

With overlapping patches the release reports the grid as (T, F), so its table codes ``i mod F`` (the
frequency index) first and ``i div F`` (the time index) second: ``released`` is that table there.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[len(pos), dim]: sin(pos * w_k) then cos(pos * w_k), w_k = 1 / 10000^(2k / dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos code needs an even dimension, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: Tuple[int, int], kind: str = "released", cls_token: bool = True,
              overlapping: bool = False) -> torch.Tensor:
    """Position table ``[1, cls + T * F, dim]`` (float32) for a (time, frequency) patch grid; the
    ``released`` kind depends on whether the patches overlap (``overlapping``), as in the release."""
    t, f = grid
    idx = np.arange(t * f)
    if kind == "released" and overlapping:
        first, second = idx % f, idx // f
    elif kind == "released":
        first, second = idx % t, idx // t
    elif kind == "grid":
        first, second = idx // f, idx % f  # (time, frequency) of each time-major token
    else:
        raise ValueError(f"unknown position table kind {kind!r}; use 'released' or 'grid'")
    table = np.concatenate([sincos_1d(dim // 2, first), sincos_1d(dim // 2, second)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros([1, dim]), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)
