"""Public fused ops. The model calls only these; :mod:`audiomae.dispatch` decides which backend runs.

Every op has a plain PyTorch reference in :mod:`audiomae.reference` (the CPU path and the test
oracle); kernels register themselves for the ``triton`` and ``cuda`` backends. Kernel modules are
imported the first time their backend runs, so ``import audiomae`` never imports Triton (a missing
or broken install only shows up as a reason in :func:`audiomae.dispatch.reasons`) and never
touches CUDA.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import dispatch
from .reference import window_attention_reference

# --- window attention -----------------------------------------------------------------------------
WINDOW_ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WINDOW_ATTENTION_MAX_AREA = 64
WINDOW_ATTENTION_MAX_HEAD_DIM = 128


def _window_attention_triton(qkv, tau, bias, grid, window, shift, num_heads):
    from .kernels.window_attention import window_attention as fused

    return fused(qkv, tau, bias, grid, window, shift, num_heads)


def _window_attention_triton_why_not(qkv, tau, bias, grid, window, shift, num_heads) -> List[str]:
    out = dispatch.triton_reasons(qkv, tau, bias)
    if not out:
        import triton

        if int(triton.__version__.split(".")[0]) < 3:
            out.append(f"triton {triton.__version__} is too old (needs >= 3.0)")
    if not hasattr(torch.library, "triton_op"):
        out.append(f"torch {torch.__version__} has no torch.library.triton_op (needs torch >= 2.6)")
    head_dim = qkv.shape[-1] // 3 // num_heads
    if head_dim > WINDOW_ATTENTION_MAX_HEAD_DIM:
        out.append(f"head_dim {head_dim} > {WINDOW_ATTENTION_MAX_HEAD_DIM}")
    area = window[0] * window[1]
    if area > WINDOW_ATTENTION_MAX_AREA:
        out.append(f"window area {window[0]} x {window[1]} = {area} > {WINDOW_ATTENTION_MAX_AREA}")
    if qkv.dtype not in WINDOW_ATTENTION_DTYPES:
        out.append(f"dtype {qkv.dtype} is not one of float32, bfloat16, float16")
    if tau.device != qkv.device or bias.device != qkv.device:
        out.append("qkv, tau and bias are on different devices")
    return out


dispatch.register("window_attention", "torch", window_attention_reference)
dispatch.register("window_attention", "triton", _window_attention_triton, _window_attention_triton_why_not)
# cuda first where its register kernels were measured faster (large 16-bit layers; see
# audiomae.ops_cuda.MMA_MIN_PAIRS), the Triton kernels everywhere else on GPUs
dispatch.set_preference("window_attention", ("cuda", "triton", "torch"))


def window_attention(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid: Tuple[int, int],
                     window: Tuple[int, int], shift: Tuple[int, int], num_heads: int) -> torch.Tensor:
    """Shifted-window scaled cosine attention: ``[B, T*F, 3C]`` qkv in token order -> ``[B, T*F, C]``.

    See :func:`audiomae.reference.window_attention_reference` for the exact semantics. CUDA tensors
    run the CUDA register kernels (:mod:`audiomae.ops_cuda`) on large 16-bit layers of 16-token
    windows, the fused Triton kernels (:mod:`audiomae.kernels.window_attention`) otherwise; CPU
    tensors the reference. ``AUDIOMAE_BACKEND`` or :func:`audiomae.dispatch.set_backend` overrides.
    """
    return dispatch.call("window_attention", qkv, tau, bias, grid, window, shift, num_heads)

# The compiled CUDA kernels (csrc/) register as the ``cuda`` backend of window_attention and of
# random_masking_ids; importing builds nothing (the extension is built on first use).
from . import ops_cuda  # noqa: E402,F401
