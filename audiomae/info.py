"""What can run here: ``python -m audiomae.info``.

Prints the versions (Python, torch, Triton, CUDA), the backend overrides in force, and for every
registered op and a small example input on each device, which backend the automatic choice takes
and why each other backend cannot run.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Callable, Dict, List, Tuple

import torch

from . import __version__, dispatch

# modules that register op implementations with the dispatcher (optional ones are skipped)
OP_MODULES = ("ops", "ops_step", "ops_cuda")


def _import_op_modules() -> List[str]:
    problems = []
    for name in OP_MODULES:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except Exception as e:
            problems.append(f"audiomae.{name} not importable ({type(e).__name__}: {e})")
    return problems


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# Example inputs, small but shaped as the model calls each op: op -> (device, dtype) -> (args, text)
def _window_attention_example(device: str, dtype: torch.dtype) -> Tuple[tuple, str]:
    grid, window, shift, heads, head_dim = (8, 8), (4, 4), (2, 0), 16, 32
    C = heads * head_dim
    qkv = torch.zeros(1, grid[0] * grid[1], 3 * C, device=device, dtype=dtype)
    tau = torch.ones(heads, device=device, dtype=dtype)
    bias = torch.zeros(heads, window[0] * window[1], window[0] * window[1], device=device, dtype=dtype)
    desc = (f"qkv {list(qkv.shape)} {_dtype_name(dtype)} on {device}, grid {grid[0]}x{grid[1]}, "
            f"window {window[0]}x{window[1]}, shift {shift}, {heads} heads of {head_dim}")
    return (qkv, tau, bias, grid, window, shift, heads), desc


def _masked_patch_embed_example(device, dtype):
    spec = torch.zeros(2, 1, 256, 128, device=device, dtype=dtype)
    weight, bias = torch.zeros(64, 1, 16, 16, device=device, dtype=dtype), torch.zeros(64, device=device, dtype=dtype)
    pos = torch.zeros(1, 129, 64, device=device, dtype=dtype)
    ids_keep = torch.zeros(2, 25, dtype=torch.int64, device=device)
    return (spec, weight, bias, pos, ids_keep), f"spec {list(spec.shape)} {_dtype_name(dtype)} on {device}, 25 kept"


def _decoder_unshuffle_example(device, dtype):
    x = torch.zeros(2, 26, 64, device=device, dtype=dtype)
    mask_token = torch.zeros(1, 1, 64, device=device, dtype=dtype)
    pos = torch.zeros(1, 129, 64, device=device, dtype=dtype)
    ids_restore = torch.zeros(2, 128, dtype=torch.int64, device=device)
    return (x, mask_token, ids_restore, pos, False), f"x {list(x.shape)} {_dtype_name(dtype)} on {device}, 128 tokens"


def _masked_norm_pix_loss_example(device, dtype):
    pred = torch.zeros(2, 128, 256, device=device, dtype=dtype)
    spec = torch.zeros(2, 1, 256, 128, device=device, dtype=dtype)
    mask = torch.ones(2, 128, device=device, dtype=dtype)
    return (pred, spec, mask, 16, True), f"pred {list(pred.shape)} {_dtype_name(dtype)} on {device}, patch 16"


def _fbank_features_example(device, dtype):
    waves = torch.zeros(2, 16000, device=device)
    return (waves, 128, "audioset", dtype), f"waveforms {list(waves.shape)} on {device} -> {_dtype_name(dtype)}"


def _gelu_mlp_example(device, dtype):
    x = torch.zeros(2, 64, 512, device=device, dtype=dtype)
    w1, b1 = torch.zeros(2048, 512, device=device, dtype=dtype), torch.zeros(2048, device=device, dtype=dtype)
    w2, b2 = torch.zeros(512, 2048, device=device, dtype=dtype), torch.zeros(512, device=device, dtype=dtype)
    return (x, w1, b1, w2, b2), f"x {list(x.shape)} {_dtype_name(dtype)} on {device}, 512 -> 2048 -> 512"


def _random_masking_ids_example(device, dtype):
    return (2, 128, 25, torch.device(device)), f"2 x 128 patches on {device}, 25 kept"


EXAMPLES: Dict[str, Callable[[str, torch.dtype], Tuple[tuple, str]]] = {
    "random_masking_ids": _random_masking_ids_example,
    "window_attention": _window_attention_example,
    "masked_patch_embed": _masked_patch_embed_example,
    "decoder_unshuffle": _decoder_unshuffle_example,
    "masked_norm_pix_loss": _masked_norm_pix_loss_example,
    "fbank_features": _fbank_features_example,
    "gelu_mlp": _gelu_mlp_example,
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
    for var in (dispatch.ENV_VAR, "AUDIOMAE_CUDA_WA_KERNEL", "TRITON_INTERPRET"):
        lines.append(f"{var}={os.environ.get(var, '')!r}")
    return lines


def _devices() -> List[Tuple[str, torch.dtype]]:
    out = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        out += [("cuda", torch.bfloat16), ("cuda", torch.float32)]
    return out


def report() -> str:
    """The whole report as text."""
    lines = _versions() + _import_op_modules()
    for op in dispatch.registered_ops():
        order = dispatch.preference(op)
        forced = dispatch.forced_backend(op)
        registered = [b for b in dispatch.BACKENDS if b in getattr(dispatch, "_REGISTRY", {}).get(op, {})]
        lines += ["", f"{op} (implementations: {', '.join(registered)}; automatic order: {', '.join(order)}"
                  + (f"; forced: {forced})" if forced else ")")]
        example = EXAMPLES.get(op)
        if example is None:
            lines.append("  (no example input to check the backends with)")
            continue
        for device, dtype in _devices():
            try:
                args, desc = example(device, dtype)
                try:
                    chosen = dispatch.would_choose(op, *args)
                except dispatch.BackendUnavailableError as e:
                    chosen = f"none ({e})"
                lines.append(f"  {desc}: runs on {chosen}")
                slower = dispatch.passed_over(op, *args)
                for backend, why in dispatch.reasons(op, *args).items():
                    text = "available" if not why else "unavailable: " + "; ".join(why)
                    if not why and slower.get(backend):
                        text += " (passed over: " + "; ".join(slower[backend]) + ")"
                    elif not why and backend not in order:
                        text += " (when asked for: not in the automatic order)"
                    lines.append(f"    {backend:<7} {text}")
            except Exception as e:  # an example out of date with its op must not break the report
                lines.append(f"  (example on {device} failed: {type(e).__name__}: {e})")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
