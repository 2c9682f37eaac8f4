"""What can run here: ``python -m audiomae.info``.

Prints the versions (Python, torch, Triton, CUDA), the backend overrides in force, and for every
registered op and a small example input on each device, which backend the automatic choice takes
and why each other backend cannot run.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Callable, Dict, List, Tuple

import torch

from . import __version__, dispatch, ops  # noqa: F401  (ops registers the backends)


def _window_attention_example(device: str, dtype: torch.dtype) -> Tuple[tuple, str]:
    grid, window, shift, heads, head_dim = (8, 8), (4, 4), (2, 0), 16, 32
    C = heads * head_dim
    qkv = torch.zeros(1, grid[0] * grid[1], 3 * C, device=device, dtype=dtype)
    tau = torch.ones(heads, device=device, dtype=dtype)
    bias = torch.zeros(heads, window[0] * window[1], window[0] * window[1], device=device, dtype=dtype)
    desc = (f"qkv {list(qkv.shape)} {str(dtype).replace('torch.', '')} on {device}, grid {grid[0]}x{grid[1]}, "
            f"window {window[0]}x{window[1]}, shift {shift}, {heads} heads of {head_dim}")
    return (qkv, tau, bias, grid, window, shift, heads), desc


# op -> builds (args, description) for a device and dtype
EXAMPLES: Dict[str, Callable[[str, torch.dtype], Tuple[tuple, str]]] = {
    "window_attention": _window_attention_example,
}


def _versions() -> List[str]:
    lines = [f"audiomae {__version__}", f"python {platform.python_version()} ({sys.platform})",
             f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # missing or broken
        lines.append(f"triton not importable ({type(e).__name__}: {e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), "
                         f"CUDA runtime {torch.version.cuda}")
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "torch built without CUDA"
        lines.append(f"CUDA not available ({built})")
    for var in (dispatch.ENV_VAR, "TRITON_INTERPRET"):
        lines.append(f"{var}={os.environ.get(var, '')!r}")
    return lines


def _devices() -> List[Tuple[str, torch.dtype]]:
    out = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        out += [("cuda", torch.bfloat16), ("cuda", torch.float32)]
    return out


def report() -> str:
    """The whole report as text."""
    lines = _versions()
    for op in dispatch.registered_ops():
        order = getattr(dispatch, "_PREFERENCE", {}).get(op, ("triton", "torch"))
        forced = dispatch.forced_backend(op)
        lines += ["", f"{op} (automatic order: {', '.join(order)}"
                  + (f"; forced: {forced})" if forced else ")")]
        example = EXAMPLES.get(op)
        if example is None:
            lines.append("  (no example input to check backends with)")
            continue
        for device, dtype in _devices():
            args, desc = example(device, dtype)
            try:
                chosen = dispatch.choose(op, *args)[0]
            except dispatch.BackendUnavailableError as e:
                chosen = f"none ({e})"
            lines.append(f"  {desc}: runs on {chosen}")
            for backend, why in dispatch.reasons(op, *args).items():
                lines.append(f"    {backend:<7} " + ("available" if not why else "unavailable: " + "; ".join(why)))
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
