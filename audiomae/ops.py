"""Public fused ops. The model calls only these; which implementation runs is decided here."""
from __future__ import annotations

from typing import Tuple

import torch

from .reference import window_attention_reference


def window_attention(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid: Tuple[int, int],
                     window: Tuple[int, int], shift: Tuple[int, int], num_heads: int) -> torch.Tensor:
    """Shifted-window scaled cosine attention: ``[B, T*F, 3C]`` qkv in token order -> ``[B, T*F, C]``.

    See :func:`audiomae.reference.window_attention_reference` for the exact semantics.
    """
    return window_attention_reference(qkv, tau, bias, grid, window, shift, num_heads)
