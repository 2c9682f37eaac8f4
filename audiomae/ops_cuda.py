"""The ``cuda`` backend: the C++/CUDA kernels of ``csrc/`` as torch.library custom ops, registered
with :mod:`audiomae.dispatch`, plus the masking op's torch reference.

Ops:

- ``window_attention``: ``cuda`` backend (:func:`window_attention_cuda`), forward and backward
  kernels with the same arithmetic as the Triton ones, one warp per window and head, in two sets:
  register kernels (``mma``: everything in registers, mma.sync tensor cores; 16-token windows,
  float16/bfloat16, head_dim 16, 32 or 64, sm_80+: the decoder's layers) and shared-memory kernels
  (``smem``: every other shape; wmma tensor cores for float16/bfloat16 when the window area and
  head_dim are multiples of 16). The first applies wherever it can; ``AUDIOMAE_CUDA_WA_KERNEL=smem``
  (or ``mma``, or ``auto``) decides instead (:func:`window_attention_kernel`). The automatic order
  is ``("cuda", "triton", "torch")`` (set in :mod:`audiomae.ops`), and the automatic choice passes
  over ``cuda`` except where its register kernels were measured faster than Triton's (16-bit layers
  of at least :data:`MMA_MIN_PAIRS` (window, head) pairs; ``benchmarks/attention.py`` on an H100).
  ``AUDIOMAE_BACKEND=cuda`` or ``audiomae.dispatch.set_backend("cuda", op="window_attention")``
  forces it everywhere it can run.
- ``random_masking_ids``: the release's unstructured masking ids (:func:`random_masking_ids`):
  ``torch`` (:func:`random_masking_ids_reference`, any device) and ``cuda`` (one launch: noise,
  per-sample sort, ids_keep, ids_restore and mask). The automatic choice is ``cuda`` on CUDA devices
  (7x the release's torch path on an H100). With a ``seed`` both backends draw the same
  Philox4x32-10 bits and give the same ids; with ``noise`` both give ``argsort(noise)`` with ties in
  index order; with neither, ``torch`` draws ``torch.rand`` as the release and ``cuda`` Philox bits
  from a seed of torch's CPU generator.
- ``fbank_features``: the model input from 16 kHz waveforms (:func:`fbank_features_cuda`): one
  launch, a warp per frame, the reference's float32 framing, a float64 four-step FFT (16 x 32),
  power, the mel filters over their non-zero bins, log, padding and normalisation. The automatic
  choice on GPUs with fast float64 units (6.2x the batched reference on an H100), which its FFT runs
  on: data-centre GPUs (A100, H100) have them at half the float32 rate, most others at 1/32 to 1/64,
  and there the batched reference runs.

The first automatic choice of a ``cuda`` op builds the extension if needed; if that fails, a warning
says why and the next backend runs.

Importing this module builds and imports nothing: that happens when a ``cuda`` op is first chosen or
run (:func:`audiomae.cuda_ext.load`), and :func:`audiomae.cuda_ext.why_not` explains when it cannot.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import dispatch
from .reference.step import random_masking_ids as _release_random_masking_ids
from .reference.window_attention import window_attention_problems as _geometry_problems



def _ext():
    """:mod:`audiomae.cuda_ext`, imported when first needed: importing the package leaves it out, so
    ``python -m audiomae.cuda_ext`` runs it as a fresh module."""
    from . import cuda_ext
    return cuda_ext


def load_extension():
    """Build or load the extension (``audiomae.cuda_ext.load``): the backends' preparation step."""
    return _ext().load()


WINDOW_ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_WINDOW_AREA = 64  # AM_WA_MAX_AREA in csrc/audiomae_cuda.h
MAX_HEAD_DIM = 128  # AM_WA_MAX_HEAD_DIM
MAX_MASK_LENGTH = 4096  # AM_MASK_MAX_LENGTH
KERNEL_ENV = "AUDIOMAE_CUDA_WA_KERNEL"  # read by the launch functions (csrc/audiomae_cuda.h)
WINDOWS_PER_WARP_ENV = "AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP"  # a tuning knob, also read there
KERNEL_CHOICES = ("auto", "smem", "mma")
MMA_HEAD_DIMS = (16, 32, 64)
# Tests set this to fill every output of the kernels with NaN (ids with -1) before they run, so an
# element a kernel fails to write shows up instead of passing with stale memory.
POISON_OUTPUTS = False


# ----------------------------------------------------------------------------------------------
# window attention
# ----------------------------------------------------------------------------------------------
def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def window_attention_smem(area: int, head_dim: int, dtype: torch.dtype, backward: bool) -> Tuple[int, int]:
    """(bytes per warp, bytes of a one-warp block) of the kernels' shared memory: the layout of
    ``make_layout`` in csrc/window_attention.cu, repeated here so that support can be told without
    building the extension (a test checks the two agree)."""
    A, D = int(area), int(head_dim)
    es = 4 if dtype == torch.float32 else 2
    wmma = dtype != torch.float32 and A % 16 == 0 and D % 16 == 0
    ld_op, ld_aat = (D + 8, A + 8) if wmma else (D + 1, A + 1)
    ld_aa, ld_st = (A + 4, D + 4) if wmma else (A + 1, D + 1)
    off = 0

    def take(nbytes: int, align: int) -> None:
        nonlocal off
        off = _round_up(off, align) + nbytes

    take(4 * A, 16)  # tokens
    take(4 * A, 16)  # shift regions
    take(8 * A if backward else 0, 16)  # row norms
    for _ in range(4 if backward else 3):  # q, k, v (, dO)
        take(A * ld_op * es, 128)
    s_bytes, st_bytes = _round_up(A * ld_aa * 4, 128), _round_up(A * ld_st * 4, 128)
    take(max((2 if backward else 1) * s_bytes, st_bytes), 128)  # cos (, dP) / staging
    for _ in range(2 if backward else 1):  # P (, dCos)
        take(A * ld_aat * es, 128)
    take(4 * A * A if backward else 0, 128)  # bias gradient
    warp = _round_up(off, 128)
    return warp, warp + (64 if backward else 0)


def mma_applies(area: int, head_dim: int, dtype: torch.dtype, capability: Tuple[int, int]) -> bool:
    """Whether the register kernels cover this shape (``mma_applies`` in csrc/window_attention.cu)."""
    return (dtype in (torch.float16, torch.bfloat16) and int(area) == 16 and int(head_dim) in MMA_HEAD_DIMS
            and tuple(capability)[0] >= 8)


def window_attention_kernel(area: int, head_dim: int, dtype: torch.dtype, capability: Tuple[int, int]) -> str:
    """``"mma"`` or ``"smem"``: the kernels the CUDA op runs for this shape on a GPU of this compute
    capability, after ``AUDIOMAE_CUDA_WA_KERNEL``. Raises ValueError for a choice that cannot be met."""
    want = os.environ.get(KERNEL_ENV, "") or "auto"
    if want not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={want!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    fits = mma_applies(area, head_dim, dtype, capability)
    if want == "mma" and not fits:
        raise ValueError(f"{KERNEL_ENV}=mma: the register kernels need 16-token windows, float16 or bfloat16, "
                         f"head_dim in {MMA_HEAD_DIMS} and an sm_80+ GPU; got area {area}, head_dim {head_dim}, "
                         f"{dtype}, sm_{capability[0]}{capability[1]}")
    return "mma" if fits and want != "smem" else "smem"


_DEVICE_INFO: dict = {}  # device index -> (compute capability, shared memory per block)


def _device_info(device: torch.device) -> Optional[Tuple[Tuple[int, int], int]]:
    """(compute capability, opt-in shared memory per block) of a CUDA device, queried once per device;
    None while torch.compile traces and the device was not queried before (tracing cannot follow the
    query; the launch functions check the same and raise with the reason)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    info = _DEVICE_INFO.get(index)
    if info is None and not dispatch._compiling():
        props = torch.cuda.get_device_properties(index)
        info = _DEVICE_INFO[index] = ((props.major, props.minor),
                                      int(getattr(props, "shared_memory_per_block_optin", 48 * 1024)))
    return info


def _window_attention_cuda_why_not(qkv, tau, bias, grid, window, shift, num_heads) -> List[str]:
    out = list(_ext().why_not())
    if qkv.device.type != "cuda":
        out.append(f"tensors are on {qkv.device.type} (the CUDA kernels need CUDA tensors)")
    elif tau.device != qkv.device or bias.device != qkv.device:
        out.append("qkv, tau and bias are on different devices")
    if qkv.dtype not in WINDOW_ATTENTION_DTYPES:
        out.append(f"dtype {qkv.dtype} is not one of float32, bfloat16, float16")
    for name, t in (("tau", tau), ("bias", bias)):
        if not t.dtype.is_floating_point or t.dtype == torch.float64:
            out.append(f"{name} dtype {t.dtype} (float32, bfloat16 or float16)")
    wpw = os.environ.get(WINDOWS_PER_WARP_ENV, "")
    if wpw and not (wpw.isdigit() and 1 <= int(wpw) <= 64):
        out.append(f"{WINDOWS_PER_WARP_ENV}={wpw!r}: expected an integer from 1 to 64 (or unset)")
    geometry = _geometry_problems(qkv, tau, bias, grid, window, shift, num_heads)
    out += geometry
    if not geometry:
        head_dim = qkv.shape[-1] // 3 // num_heads
        area = int(window[0]) * int(window[1])
        sizes_ok = head_dim <= MAX_HEAD_DIM and area <= MAX_WINDOW_AREA
        if head_dim > MAX_HEAD_DIM:
            out.append(f"head_dim {head_dim} > {MAX_HEAD_DIM}")
        if area > MAX_WINDOW_AREA:
            out.append(f"window area {window[0]} x {window[1]} = {area} > {MAX_WINDOW_AREA}")
        info = _device_info(qkv.device) if qkv.device.type == "cuda" else None
        if sizes_ok and info is not None and qkv.dtype in WINDOW_ATTENTION_DTYPES:
            (capability, limit), kernel = info, "smem"
            try:
                kernel = window_attention_kernel(area, head_dim, qkv.dtype, capability)
            except ValueError as e:
                out.append(str(e))
            need = window_attention_smem(area, head_dim, qkv.dtype, True)[1]
            if kernel == "smem" and need > limit:
                out.append(f"window area {area} with head_dim {head_dim} in {qkv.dtype} needs {need // 1024} KB of "
                           f"shared memory per block for the backward pass; this GPU allows {limit // 1024} KB")
    return out


def window_attention_finish_backward(tau: torch.Tensor, bias: torch.Tensor, dtau_partial: torch.Tensor,
                                     dbias_partial: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad_tau and grad_bias from the kernels' per-block partial sums (a fixed-order sum: deterministic).

    The logits are cos / max(tau, 0.01): d/dtau = -sum(dlogits * cos) / tau_c^2 where tau >= 0.01 (the
    clamp passes the gradient at the bound, as torch's clamp does), 0 below it."""
    tau_c = tau.detach().clamp(min=0.01).float()
    grad_tau = torch.where(tau.detach() >= 0.01, -dtau_partial.sum(0) / (tau_c * tau_c), 0.0).to(tau.dtype)
    return grad_tau, dbias_partial.sum(0).to(bias.dtype)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


_OPS = None


def _define_ops():
    """Registers the custom ops (once, on first use): torch.compile traces through them with the fake
    implementations and calls the kernels at run time."""
    from torch.library import custom_op

    @custom_op("audiomae::window_attention_cuda_fwd", mutates_args=())
    def wa_fwd(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid: List[int], window: List[int],
               shift: List[int], num_heads: int) -> torch.Tensor:
        ext = _ext().load()
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        tau_c = tau.clamp(min=0.01).float().contiguous()  # the clamp in tau's dtype, as the reference does
        return ext.window_attention_fwd(qkv, tau_c, bias.float().contiguous(), grid, window, shift, num_heads,
                                        _stream(qkv.device), POISON_OUTPUTS)

    @wa_fwd.register_fake
    def _(qkv, tau, bias, grid, window, shift, num_heads):
        return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)

    @custom_op("audiomae::window_attention_cuda_bwd", mutates_args=())
    def wa_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid: List[int],
               window: List[int], shift: List[int], num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ext = _ext().load()
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        grad_out = grad_out.to(qkv.dtype)
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        tau_c = tau.clamp(min=0.01).float().contiguous()
        grad_qkv, dtau_partial, dbias_partial = ext.window_attention_bwd(
            grad_out, qkv, tau_c, bias.float().contiguous(), grid, window, shift, num_heads, _stream(qkv.device),
            POISON_OUTPUTS)
        grad_tau, grad_bias = window_attention_finish_backward(tau, bias, dtau_partial, dbias_partial)
        return grad_qkv, grad_tau, grad_bias

    @wa_bwd.register_fake
    def _(grad_out, qkv, tau, bias, grid, window, shift, num_heads):
        # contiguous whatever the inputs' strides, as the binding allocates them
        return qkv.new_empty(qkv.shape), tau.new_empty(tau.shape), bias.new_empty(bias.shape)

    def setup_context(ctx, inputs, output):
        qkv, tau, bias, grid, window, shift, num_heads = inputs
        ctx.save_for_backward(qkv, tau, bias)
        ctx.geometry = (grid, window, shift, num_heads)

    def backward(ctx, grad_out):
        qkv, tau, bias = ctx.saved_tensors
        grad_qkv, grad_tau, grad_bias = torch.ops.audiomae.window_attention_cuda_bwd(grad_out, qkv, tau, bias,
                                                                                     *ctx.geometry)
        need = ctx.needs_input_grad
        return (grad_qkv if need[0] else None, grad_tau if need[1] else None, grad_bias if need[2] else None,
                None, None, None, None)

    wa_fwd.register_autograd(backward, setup_context=setup_context)

    @custom_op("audiomae::random_masking_ids_cuda", mutates_args=())
    def masking(batch: int, length: int, len_keep: int, device: torch.device, noise: Optional[torch.Tensor],
                seed: int, offset: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ext = _ext().load()
        return ext.random_masking_ids(batch, length, len_keep, noise, device, seed % 2 ** 64, offset % 2 ** 64,
                                      _stream(device), POISON_OUTPUTS)

    @masking.register_fake
    def _(batch, length, len_keep, device, noise, seed, offset):
        return (torch.empty(batch, len_keep, dtype=torch.int64, device=device),
                torch.empty(batch, length, dtype=torch.int64, device=device),
                torch.empty(batch, length, dtype=torch.float32, device=device))

    return wa_fwd, wa_bwd, masking


def _ops():
    global _OPS
    if _OPS is None:
        _OPS = _define_ops()
    return _OPS


def prepare_for_compile() -> bool:
    """Load the extension now if some op would choose the ``cuda`` backend (forced, or first in its
    automatic order) and it can be built here: torch.compile uses it only once it is loaded (see
    :func:`audiomae.cuda_ext.why_not`). Call before compiling a model; returns whether it is loaded."""
    wanted = any(dispatch.forced_backend(op) == "cuda" or dispatch.preference(op)[:1] == ("cuda",)
                 for op in dispatch.registered_ops())
    if wanted and not _ext().is_loaded() and not _ext().why_not():
        try:
            _ext().load()
        except RuntimeError as e:  # a failed build: the other backends run, as in eager mode
            warnings.warn(f"audiomae: the CUDA extension is not used: {e}", RuntimeWarning, stacklevel=2)
    if _ext().is_loaded() and torch.cuda.is_available():
        _device_info(torch.device("cuda"))  # the choice needs it, and tracing cannot query it
    return _ext().is_loaded()


def window_attention_cuda(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid: Sequence[int],
                          window: Sequence[int], shift: Sequence[int], num_heads: int) -> torch.Tensor:
    """Shifted-window cosine attention with the CUDA kernels, differentiable in qkv, tau and bias.

    Same contract as :func:`audiomae.ops.window_attention` (``[B, T*F, 3C]`` -> ``[B, T*F, C]``, see
    :func:`audiomae.reference.window_attention_reference`): CUDA tensors, float32/bfloat16/float16,
    window area <= 64, head_dim <= 128, window and shift already clamped. Builds the extension on
    first use.
    """
    _ops()
    return torch.ops.audiomae.window_attention_cuda_fwd(qkv, tau, bias, [int(x) for x in grid],
                                                        [int(x) for x in window], [int(x) for x in shift],
                                                        int(num_heads))


# The automatic choice (audiomae.ops: "cuda" before "triton") takes the CUDA op only where it was
# measured faster than the Triton kernels: the register kernels (16-token windows, 16-bit, sm_80+)
# on at least MMA_MIN_PAIRS (window, head) pairs. On an H100 (torch 2.11, triton 3.6, bf16, the paper's
# layer, shift (2, 0); benchmarks/results/nvidia-h100-80gb-hbm3-torch2.11/results.md), forward +
# backward: batch 32 0.162 ms CUDA vs 0.146 ms Triton, batch 64 0.248 vs 0.241, batch 128 0.381 vs
# 0.395, batch 256 0.664 vs 0.721; forward: batch 128 0.109 vs 0.117, batch 256 0.196 vs 0.218. The
# shared-memory kernels took 2-4x Triton's time at every batch.
MMA_MIN_PAIRS = 65536  # batch 128 of the paper's layer (32 windows x 16 heads per clip)


def _window_attention_cuda_passed_over(qkv, tau, bias, grid, window, shift, num_heads) -> List[str]:
    info = _device_info(qkv.device)
    if info is None:
        return ["the GPU was not queried before tracing"]
    head_dim = qkv.shape[-1] // 3 // num_heads
    area = int(window[0]) * int(window[1])
    if not mma_applies(area, head_dim, qkv.dtype, info[0]) or os.environ.get(KERNEL_ENV, "") == "smem":
        return ["the shared-memory kernels (the register kernels need 16-token windows, float16 or bfloat16, "
                f"head_dim in {MMA_HEAD_DIMS} and sm_80+) are slower than Triton's"]
    pairs = qkv.shape[0] * (int(grid[0]) // int(window[0])) * (int(grid[1]) // int(window[1])) * int(num_heads)
    if pairs < MMA_MIN_PAIRS:
        return [f"{pairs} (window, head) pairs: below {MMA_MIN_PAIRS} Triton's kernels are faster"]
    return []


dispatch.register("window_attention", "cuda", window_attention_cuda, _window_attention_cuda_why_not,
                  _window_attention_cuda_passed_over, prepare=load_extension)


# ----------------------------------------------------------------------------------------------
# random masking
# ----------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a constant a and b holding uint32 values in int64, exactly
    (16-bit halves keep every intermediate below 2^50)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    t1, t2 = a * b_lo, a * b_hi  # < 2^48 each
    low = (t1 & _MASK32) + ((t2 & 0xFFFF) << 16)
    lo = low & _MASK32
    hi = ((t1 >> 32) + (t2 >> 16) + (low >> 32)) & _MASK32
    return hi, lo


def philox4x32_10(counter: Sequence[torch.Tensor], key: Tuple[int, int]) -> Tuple[torch.Tensor, ...]:
    """Random123's Philox4x32-10 on int64 tensors holding uint32 words (the generator of the CUDA
    masking kernel): four counter words and a two-word key -> four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
        hi0, lo0 = _mulhilo32(0xD2511F53, c0)
        hi1, lo1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_noise_bits(batch: int, length: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """The CUDA kernel's noise as integers [B, L] in [0, 2^32): the first word of Philox4x32-10 with
    key (seed low, seed high) and counter (n low, n high, offset low, offset high), n = b * L + l.
    Dividing by 2^32 gives uniform noise in [0, 1); the order of the integers is the masking order."""
    seed, offset = int(seed) % 2 ** 64, int(offset) % 2 ** 64
    n = torch.arange(batch * length, dtype=torch.int64, device=device)
    words = (n & _MASK32, n >> 32, torch.full_like(n, offset & _MASK32), torch.full_like(n, offset >> 32))
    return philox4x32_10(words, (seed & _MASK32, seed >> 32))[0].view(batch, length)


def _check_masking_args(batch, length, len_keep, noise) -> None:
    for name, v in (("batch", batch), ("length", length), ("len_keep", len_keep)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"random_masking_ids: {name} must be a whole number of at least 0, got {v!r}")
    if noise is not None and not isinstance(noise, torch.Tensor):
        raise TypeError(f"random_masking_ids: noise must be a tensor [B, L], got {type(noise).__name__}")
    if noise is not None and tuple(noise.shape) != (batch, length):
        raise ValueError(f"noise for unstructured masking must be [B, L] = [{batch}, {length}], "
                         f"got {list(noise.shape)}")
    if not 0 <= len_keep <= length:
        raise ValueError(f"len_keep must be in [0, {length}], got {len_keep}")


def random_masking_ids_reference(batch: int, length: int, len_keep: int, device=None,
                                 noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                                 offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The release's unstructured masking ids in PyTorch (the ``torch`` backend, any device).

    The sort keys are ``noise`` when given, else Philox bits of ``seed``/``offset``
    (:func:`philox_noise_bits`), else ``torch.rand`` as the release draws it
    (:func:`audiomae.reference.step.random_masking_ids`). ``ids_shuffle = argsort(keys)`` with equal
    keys in index order (a stable sort; NaN last), ``ids_restore = argsort(ids_shuffle)``. Returns
    ``ids_keep`` [B, len_keep] int64, ``ids_restore`` [B, L] int64, ``mask`` [B, L] (1 = removed) in
    the default dtype.
    """
    if noise is None and seed is None:
        return _release_random_masking_ids(batch, length, len_keep, device)
    _check_masking_args(batch, length, len_keep, noise)
    keys = noise if noise is not None else philox_noise_bits(batch, length, seed, offset, device)
    ids_shuffle = torch.argsort(keys, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return ids_shuffle[:, :len_keep], ids_restore, mask


def _masking_device(device, noise) -> torch.device:
    if noise is not None:
        return noise.device
    return torch.device(device if device is not None else "cpu")


def _random_masking_ids_cuda_why_not(batch, length, len_keep, device=None, noise=None, seed=None,
                                     offset=0) -> List[str]:
    out = list(_ext().why_not())
    dev = _masking_device(device, noise)
    if dev.type != "cuda":
        out.append(f"device is {dev.type} (the CUDA kernel needs a CUDA device)")
    if not 0 <= length <= MAX_MASK_LENGTH:
        out.append(f"length {length} > {MAX_MASK_LENGTH} (one block sorts a sample in shared memory)")
    if not 0 <= len_keep <= length:
        out.append(f"len_keep {len_keep} is not in [0, {length}]")
    if noise is not None:
        if noise.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            out.append(f"noise dtype {noise.dtype} (the kernel sorts float32 keys; float16 and bfloat16 widen "
                       "exactly, float64 would not)")
        if tuple(noise.shape) != (batch, length):
            out.append(f"noise must be [{batch}, {length}], got {list(noise.shape)}")
        if torch.is_grad_enabled() and noise.requires_grad:
            out.append("noise requires grad")
    return out


def _as_int64(x: int) -> int:
    """The 64 bits of ``x`` as a signed integer (custom ops take int64; the kernel reads them unsigned)."""
    x = int(x) % 2 ** 64
    return x - 2 ** 64 if x >= 2 ** 63 else x


def _random_masking_ids_cuda(batch: int, length: int, len_keep: int, device=None,
                             noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                             offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_masking_args(batch, length, len_keep, noise)
    dev = _masking_device(device, noise)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if noise is not None:
        noise = noise.detach().float()
        seed = 0
    elif seed is None:  # a seed from torch's CPU generator: reproducible under torch.manual_seed, no sync
        seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
    _ops()
    ids_keep, ids_restore, mask = torch.ops.audiomae.random_masking_ids_cuda(batch, length, len_keep, dev, noise,
                                                                            _as_int64(seed), _as_int64(offset))
    return ids_keep, ids_restore, mask.to(torch.get_default_dtype())


def random_masking_ids(batch: int, length: int, len_keep: int, device=None, noise: Optional[torch.Tensor] = None,
                       seed: Optional[int] = None, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The release's unstructured masking ids through the dispatch layer (``torch`` or ``cuda``).

    ``noise`` [B, L] (the order to sort by), or ``seed``/``offset`` (Philox4x32-10 noise, the same on
    both backends), or neither (``torch``: ``torch.rand`` as the release; ``cuda``: Philox with a seed
    drawn from torch's CPU generator). Returns ``ids_keep`` [B, len_keep], ``ids_restore`` [B, L]
    (int64) and ``mask`` [B, L] (1 = removed, default dtype). Tie rule: equal noise values keep index
    order (a stable argsort); NaN sorts last. Example::

        >>> ids_keep, ids_restore, mask = random_masking_ids(8, 512, 102, "cuda", seed=1234)
    """
    sizes = []
    for name, v in (("batch", batch), ("length", length), ("len_keep", len_keep), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer, torch.SymInt)):
            raise ValueError(f"random_masking_ids: {name} must be a whole number, got {v!r}")
        sizes.append(int(v))
    _check_masking_args(*sizes[:3], noise)
    return dispatch.call("random_masking_ids", *sizes[:3], device, noise, seed, sizes[3])


dispatch.register("random_masking_ids", "torch", random_masking_ids_reference)
dispatch.register("random_masking_ids", "cuda", _random_masking_ids_cuda, _random_masking_ids_cuda_why_not,
                  prepare=load_extension)
# cuda first: on an H100 (torch 2.11) the one-launch kernel took 0.0115 ms for batch 64 x 512 patches
# at mask ratio 0.8, against 0.0803 ms for the release's torch.rand + two argsorts. Unseeded calls
# then draw Philox noise from a seed of torch's CPU generator (reproducible under torch.manual_seed,
# not the same stream as torch.rand).
dispatch.set_preference("random_masking_ids", ("cuda",))


# ----------------------------------------------------------------------------------------------
# fbank
# ----------------------------------------------------------------------------------------------
# tuning knobs read by the launch function (csrc/audiomae_cuda.h): warps per block (1, 2 or 4) and
# frames per warp (1..64); unset: 4 and 4
FBANK_WARPS_ENV = "AUDIOMAE_CUDA_FBANK_WARPS"
FBANK_FRAMES_PER_WARP_ENV = "AUDIOMAE_CUDA_FBANK_FRAMES_PER_WARP"
_FBANK_WIN, _FBANK_NFFT = 400, 512


@functools.lru_cache(maxsize=16)
def fbank_tables(device: torch.device, num_mel_bins: int):
    """The kernel's constant tables on ``device``: (window [400] float32, twiddles [2 * 16 * 32]
    float64: cos of ``2 pi (n2 k1 mod 512) / 512`` at ``k1 * 32 + n2`` and its sin 512 entries later,
    each filter's first weighted bin ``mel_lo`` [M] int32, offsets ``mel_off`` [M + 1] int32 into the
    weights ``mel_w`` (float32, the filter's bins from its first to its last non-zero weight)). Window and filters are the
    reference's float32 values. Raises ValueError if a filter weights the Nyquist bin (Kaldi's never
    do; the kernel computes bins 0..255)."""
    from .audio import mel_filterbank

    n = torch.arange(_FBANK_WIN, dtype=torch.float64)
    window = (0.5 - 0.5 * torch.cos(2.0 * math.pi * n / (_FBANK_WIN - 1))).to(torch.float32)
    k1 = torch.arange(16, dtype=torch.int64)[:, None]
    n2 = torch.arange(32, dtype=torch.int64)[None, :]
    angle = 2.0 * math.pi * ((n2 * k1) % _FBANK_NFFT).to(torch.float64) / _FBANK_NFFT
    twiddle = torch.cat([torch.cos(angle).flatten(), torch.sin(angle).flatten()])
    mel = mel_filterbank(int(num_mel_bins), _FBANK_NFFT).to(torch.float32)  # [M, 257], the reference's weights
    lo, off, weights = [], [0], []
    for row in mel:
        nz = torch.nonzero(row).flatten()
        first, last = (int(nz[0]), int(nz[-1])) if nz.numel() else (0, -1)
        lo.append(first)
        weights.append(row[first:last + 1])
        off.append(off[-1] + last + 1 - first)
    if mel[:, _FBANK_NFFT // 2].abs().sum() > 0:
        raise ValueError("the CUDA fbank kernel computes bins 0..255, but a mel filter weights the Nyquist bin")
    mel_w = torch.cat(weights) if off[-1] else torch.zeros(1)
    dev = torch.device(device)
    return (window.to(dev), twiddle.to(dev), torch.tensor(lo, dtype=torch.int32, device=dev),
            torch.tensor(off, dtype=torch.int32, device=dev), mel_w.contiguous().to(dev))


def fbank_cuda_reasons(waveforms: torch.Tensor) -> List[str]:
    """Why the CUDA kernel cannot run here, beyond the inputs' dtype and shape (which
    :mod:`audiomae.ops_step` checks for every fused front end): the extension, the device, the knobs."""
    out = list(_ext().why_not())
    if waveforms.device.type != "cuda":
        out.append(f"waveforms are on {waveforms.device.type} (the CUDA kernel needs CUDA tensors)")
    warps, frames = os.environ.get(FBANK_WARPS_ENV, ""), os.environ.get(FBANK_FRAMES_PER_WARP_ENV, "")
    if warps and warps not in ("1", "2", "4"):
        out.append(f"{FBANK_WARPS_ENV}={warps!r}: expected 1, 2 or 4 (or unset)")
    if frames and not (frames.isdigit() and 1 <= int(frames) <= 64):
        out.append(f"{FBANK_FRAMES_PER_WARP_ENV}={frames!r}: expected an integer from 1 to 64 (or unset)")
    return out


@torch.library.custom_op("audiomae::fbank_features_cuda", mutates_args=())
def _fbank_op(waveforms: torch.Tensor, target_length: int, normalize: bool, norm_mean: float, norm_std: float,
              out_dtype: torch.dtype, num_mel_bins: int) -> torch.Tensor:
    """The CUDA kernel as a custom op (opaque to torch.compile, shapes from the fake below):
    ``waveforms`` [B, N] float -> [B, 1, T, num_mel_bins]; ``target_length < 0`` keeps every frame."""
    B, N = waveforms.shape
    t_out = 1 + (N - _FBANK_WIN) // 160 if target_length < 0 else target_length
    out = torch.empty((B, 1, t_out, num_mel_bins), dtype=out_dtype, device=waveforms.device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if B == 0:
        return out
    ext = _ext().load()
    x = waveforms.to(torch.float32)
    clip_mean = x.mean(dim=-1)  # the reference's per-clip mean, subtracted as samples are read
    window, twiddle, mel_lo, mel_off, mel_w = fbank_tables(x.device, num_mel_bins)
    ext.fbank(x, clip_mean, window, twiddle, mel_lo, mel_off, mel_w, out, normalize, norm_mean, 2.0 * norm_std,
              _stream(x.device))
    return out


@_fbank_op.register_fake
def _(waveforms, target_length, normalize, norm_mean, norm_std, out_dtype, num_mel_bins):
    B, N = waveforms.shape
    t_out = 1 + (N - _FBANK_WIN) // 160 if target_length < 0 else target_length
    return waveforms.new_empty((B, 1, t_out, num_mel_bins), dtype=out_dtype)


def fbank_features_cuda(waveforms: torch.Tensor, target_length: Optional[int] = 1024, stats="audioset",
                        out_dtype: torch.dtype = torch.float32, mode: str = "exact",
                        num_mel_bins: int = 128) -> torch.Tensor:
    """The model input from 16 kHz waveforms with the CUDA kernel (``csrc/fbank.cu``): the contract of
    :func:`audiomae.ops_step.fbank_features`. One launch after the clip means: per frame the
    reference's float32 framing, a float64 four-step FFT (16 x 32), power, the mel filters over their
    non-zero bins, log, padding and normalisation, written in ``out_dtype``. Within 1.2e-3 nats of a
    float64 computation on the test fixtures (run as host code, ``csrc/emulate.h``; the float32
    reference: 2.2e-3), and 1.1e-3 on an H100 on chirps in noise (``benchmarks/tune.py``)."""
    from .audio import fused_fbank_args

    x, single, target, s = fused_fbank_args(waveforms, target_length, stats, out_dtype, mode, num_mel_bins)
    out = _fbank_op(x, target, s is not None, s.mean if s else 0.0, s.std if s else 0.5, out_dtype,
                      int(num_mel_bins))
    return out[0] if single else out


# The automatic choice (audiomae.ops_step: "cuda", then the batched reference) takes the CUDA fbank on
# GPUs with fast float64 units, which its FFT runs on: the data-centre parts of compute capability 8.0,
# 9.0 and 10.0 (A100, H100/H200, B200: float64 at half the float32 rate; most others run it at 1/32-1/64).
# The older fast-float64 parts (6.0, 7.0) are left out: CUDA 13 no longer compiles for them, and no
# build for them with an older toolkit has been tried.
# On an H100 (torch 2.11, 64 clips of 10 s, float32 out) it took 0.204 ms against 1.27 ms for the
# batched reference (cuFFT), 1.63 ms for the Triton kernel and 74.4 ms for torchaudio clip by clip
# (benchmarks/results/nvidia-h100-80gb-hbm3-torch2.11/fbank.md). It was timed on no other GPU.
FAST_FLOAT64_CAPABILITIES = ((8, 0), (9, 0), (10, 0))


def _fbank_cuda_passed_over(waveforms, *args, **kwargs) -> List[str]:
    info = _device_info(waveforms.device)
    if info is None:
        return ["the GPU was not queried before tracing"]
    if info[0] not in FAST_FLOAT64_CAPABILITIES:
        major, minor = info[0]
        return [f"sm_{major}{minor} has slow float64 units (the kernel's FFT is float64); the batched reference "
                "is used"]
    return []


# The custom ops are registered at import (which builds and loads nothing): a registration made
# inside a region that torch.compile traces would break the graph.
_ops()
