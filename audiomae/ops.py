"""Public fused ops. The model calls only these; :mod:`audiomae.dispatch` decides which backend runs.

Every op has a plain PyTorch reference in :mod:`audiomae.reference` (the CPU path and the test
oracle); kernels register themselves for the ``triton`` and ``cuda`` backends.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import dispatch
from .reference import window_attention_reference

dispatch.register("window_attention", "torch", window_attention_reference)


def window_attention(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid: Tuple[int, int],
                     window: Tuple[int, int], shift: Tuple[int, int], num_heads: int) -> torch.Tensor:
    """Shifted-window scaled cosine attention: ``[B, T*F, 3C]`` qkv in token order -> ``[B, T*F, C]``.

    See :func:`audiomae.reference.window_attention_reference` for the exact semantics.
    """
    return dispatch.call("window_attention", qkv, tau, bias, grid, window, shift, num_heads)
