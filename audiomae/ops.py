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
import torch.nn.functional as F

from . import dispatch
from .reference import window_attention_reference
from .reference.window_attention import window_attention_problems

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
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or \
            qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"window_attention: qkv must be [B, T*F, 3C] with C divisible by num_heads >= 1; got qkv "
                         f"{list(qkv.shape)}, num_heads={num_heads!r}")
    problems = window_attention_problems(qkv, tau, bias, grid, window, shift, num_heads)
    if problems:  # on every backend (the reference rolled by a negative shift, or failed in a view)
        raise ValueError("window_attention: " + "; ".join(problems))
    return dispatch.call("window_attention", qkv, tau, bias, grid, window, shift, num_heads)


# --- transformer MLP with GELU --------------------------------------------------------------------
GELU_MLP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _autocast_dtype(x: torch.Tensor):
    """The dtype autocast gives ``nn.Linear`` on ``x``'s device now, or None when it is off."""
    kind = x.device.type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        return torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):  # a device type without autocast
        return None


def gelu_mlp_reference(x, w1, b1, w2, b2):
    """``fc2(gelu(fc1(x)))`` as ``nn.Linear`` -> ``nn.GELU()`` -> ``nn.Linear`` compute it (autocast included)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _gelu_mlp_args(x, w1, b1, w2, b2):
    """The arguments in the dtype the matmuls run in: autocast's when it is on (for the dtypes autocast
    casts: float32, float16, bfloat16; float64 stays, as autocast leaves it for ``nn.Linear``), else
    unchanged."""
    dt = _autocast_dtype(x)
    if dt is None:
        return x, w1, b1, w2, b2
    return tuple(t.to(dt) if t is not None and t.dtype in GELU_MLP_DTYPES else t for t in (x, w1, b1, w2, b2))


def _gelu_mlp_triton(x, w1, b1, w2, b2):
    from .kernels.gelu_mlp import gelu_mlp as fused

    args = _gelu_mlp_args(x, w1, b1, w2, b2)
    with torch.autocast(x.device.type, enabled=False):
        return fused(*args)


def _gelu_mlp_triton_why_not(x, w1, b1, w2, b2) -> List[str]:
    tensors = [t for t in (x, w1, b1, w2, b2) if t is not None]
    out = dispatch.triton_reasons(*tensors)
    if not hasattr(torch.library, "triton_op"):
        out.append(f"torch {torch.__version__} has no torch.library.triton_op (needs torch >= 2.6)")
    if x.dim() < 1 or w1.dim() != 2 or w2.dim() != 2 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0] \
            or (b1 is not None and tuple(b1.shape) != (w1.shape[0],)) \
            or (b2 is not None and tuple(b2.shape) != (w2.shape[0],)):
        out.append(f"shapes x {list(x.shape)}, w1 {list(w1.shape)}, b1 {None if b1 is None else list(b1.shape)}, "
                   f"w2 {list(w2.shape)}, b2 {None if b2 is None else list(b2.shape)} do not chain "
                   "([..., D], [H, D], [H], [E, H], [E])")
    dtypes = {t.dtype for t in _gelu_mlp_args(x, w1, b1, w2, b2) if t is not None}
    if len(dtypes) > 1:
        out.append(f"mixed dtypes {sorted(map(str, dtypes))} (one dtype, or autocast)")
    elif dtypes and not dtypes <= set(GELU_MLP_DTYPES):
        out.append(f"dtype {dtypes.pop()} is not one of float32, bfloat16, float16")
    if len({t.device for t in tensors}) > 1:
        out.append(f"tensors on several devices: {sorted({str(t.device) for t in tensors})}")
    return out


dispatch.register("gelu_mlp", "torch", gelu_mlp_reference)
dispatch.register("gelu_mlp", "triton", _gelu_mlp_triton, _gelu_mlp_triton_why_not)
# The fused kernels are chosen on request only (set_backend("triton", op="gelu_mlp")): they replace
# cuBLAS GEMMs, and the automatic choice takes them only where they are measured faster.
dispatch.set_preference("gelu_mlp", ("torch",))


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2) -> torch.Tensor:
    """The transformer MLP ``fc2(gelu(fc1(x)))`` (exact GELU): ``x`` [..., D], ``w1`` [H, D], ``b1`` [H]
    or None, ``w2`` [E, H], ``b2`` [E] or None -> ``[..., E]``, under autocast as ``nn.Linear`` runs.

    The ``triton`` backend (:mod:`audiomae.kernels.gelu_mlp`) computes the GELU and its derivative in
    the epilogues of its GEMMs instead of separate passes over the 4x-wide hidden activation; it runs
    when asked for (``audiomae.dispatch.set_backend("triton", op="gelu_mlp")``); the automatic choice
    is the PyTorch reference.
    """
    return dispatch.call("gelu_mlp", x, w1, b1, w2, b2)


# The compiled CUDA kernels (csrc/) register as the ``cuda`` backend of window_attention and of
# random_masking_ids; importing builds nothing (the extension is built on first use).
from . import ops_cuda  # noqa: E402,F401
