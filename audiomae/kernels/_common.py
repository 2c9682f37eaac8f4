"""Launch helpers shared by the Triton kernel modules."""
from __future__ import annotations

import os

import torch
import triton


def alloc(shape, dtype, device, poison: bool) -> torch.Tensor:
    """An output buffer that the kernel writes completely; ``poison`` fills it with NaN first (tests
    set each module's ``POISON_OUTPUTS``), so an element a kernel forgot to write shows."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: float32 operands get full float32
    products (Triton's default would be tf32); 16-bit operands ignore the setting and use the tensor
    cores with float32 accumulation."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_upcast(dtype: torch.dtype, interpret: bool) -> bool:
    """Whether to upcast ``tl.dot`` operands of ``dtype`` to float32 first: Triton's interpreter
    multiplies bfloat16 operands as their raw 16-bit patterns; in float32 the products of bfloat16
    values are exact, so upcasting there gives what the tensor cores give."""
    return dtype == torch.bfloat16 and interpret


def interpreting() -> bool:
    """Whether Triton's interpreter (``TRITON_INTERPRET=1``) is in force now."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.3
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


_VARIANTS = {}


def for_current_mode(kernel):
    """``kernel`` compiled for the GPU, or run by Triton's interpreter when ``TRITON_INTERPRET=1``.

    ``triton.jit`` picks one of the two when it decorates; the mode is checked again at each launch
    so that both can be used in one process whatever the environment was at import time.
    """
    from triton.runtime.interpreter import InterpretedFunction

    interpret = interpreting()
    if isinstance(kernel, InterpretedFunction) == interpret:
        return kernel
    key = (kernel.fn, interpret)
    if key not in _VARIANTS:
        _VARIANTS[key] = triton.jit(kernel.fn)  # reads the mode from the environment now
    return _VARIANTS[key]


def launcher(kernel):
    """``kernel`` ready to launch inside a ``torch.library.triton_op``: wrapped with ``wrap_triton``
    when compiled for the GPU (so ``torch.compile`` can trace it), called directly under the
    interpreter (which cannot be traced, and which ``wrap_triton`` refuses in some torch versions)."""
    from torch.library import wrap_triton
    from triton.runtime.interpreter import InterpretedFunction

    kernel = for_current_mode(kernel)
    return kernel if isinstance(kernel, InterpretedFunction) else wrap_triton(kernel)
