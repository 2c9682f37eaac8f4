"""Masked norm-pix loss: the pretraining loss in one pass over the target patches.

The eager loss patchifies the whole spectrogram (a copy), normalises every patch (more copies),
forms ``(pred - target) ** 2`` for every patch and then keeps the removed ones. Here each program
reads ``BLOCK_L`` target patches straight from ``spec`` once, computes each patch's mean and
unbiased variance in registers, the normalised target ``(x - mean) / sqrt(var + 1e-6)``, the
per-patch MSE against ``pred``, and one float32 partial sum of ``mse * mask``; the loss is the
fixed-order sum of the partials divided by ``sum(mask)`` (deterministic).

The loss is a scalar, so its gradient with respect to ``pred`` is known in the forward pass up to
the upstream scale: ``2 (pred - target) / (p * p) * mask / sum(mask)``. When ``pred`` requires grad
the forward kernel writes it (in ``pred.dtype``) and the backward only scales it, so the target
is read once in all. The target is treated as a constant: no gradient reaches ``spec`` or ``mask``
(the automatic backend choice uses the reference when ``spec`` requires grad).

See :func:`audiomae.reference.step.masked_norm_pix_loss_reference` for the semantics.

Layers: Triton kernel -> launcher (a ``torch.library`` custom op) -> ``torch.autograd.Function``
-> :func:`masked_norm_pix_loss`.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import alloc, interpreting as _interpreting, launcher as _launcher
from torch.library import triton_op

NORM_PIX_EPS = 1e-6
POISON_OUTPUTS = False  # tests set this: output buffers start as NaN, so an unwritten element shows


def _alloc(shape, dtype, device) -> torch.Tensor:
    return alloc(shape, dtype, device, POISON_OUTPUTS)


def _block_l(pp: int) -> int:
    if _interpreting():  # few, large tiles: the interpreter pays per operation, not per element
        return 64
    return max(1, min(16, 4096 // triton.next_power_of_2(pp)))


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
# Reductions use tl.reduce with Triton's own combine function and accumulators start from tl.full:
# tl.sum and tl.zeros are @triton.jit helpers whose mode (GPU or interpreter) is fixed when triton
# is first imported, while these work in both, whatever the environment was then.


@triton.jit
def _masked_loss_fwd_kernel(
    pred_ptr, spec_ptr, mask_ptr, den_ptr, part_ptr, grad_ptr,
    L, FG, NUM_L_BLOCKS,
    s_pb, s_pl, s_pj,
    s_sb, s_st, s_sf,
    s_mb, s_ml,
    s_gb, s_gl, s_gj,
    EPS,
    P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, NORM_PIX: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    l = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    j = tl.arange(0, BLOCK_J)
    mask_l = l < L
    mask_j = j < P * P
    m2 = mask_l[:, None] & mask_j[None, :]
    # target patches, straight from the spectrogram (time-major patches, row-major pixels)
    x = tl.load(spec_ptr + b * s_sb + ((l // FG) * P)[:, None] * s_st + ((l % FG) * P)[:, None] * s_sf
                + (j // P)[None, :] * s_st + (j % P)[None, :] * s_sf, mask=m2, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.reduce(x, 1, tl.standard._sum_combine) / (P * P)
        xc = tl.where(m2, x - mean[:, None], 0.0)
        var = tl.reduce(xc * xc, 1, tl.standard._sum_combine) / (P * P - 1)  # unbiased, as torch.var
        target = xc / tl.sqrt_rn((var + EPS).to(tl.float32))[:, None]  # EPS may arrive as float64
    else:
        target = x
    pred = tl.load(pred_ptr + b * s_pb + l[:, None] * s_pl + j[None, :] * s_pj, mask=m2, other=0.0).to(tl.float32)
    diff = tl.where(m2, pred - target, 0.0)
    mse = tl.reduce(diff * diff, 1, tl.standard._sum_combine) / (P * P)
    w = tl.load(mask_ptr + b * s_mb + l * s_ml, mask=mask_l, other=0.0).to(tl.float32)
    tl.store(part_ptr + b * NUM_L_BLOCKS + pid, tl.reduce(mse * w, 0, tl.standard._sum_combine))
    if WRITE_GRAD:
        den = tl.load(den_ptr)
        grad = diff * (2.0 / (P * P)) * (w / den)[:, None]
        tl.store(grad_ptr + b * s_gb + l[:, None] * s_gl + j[None, :] * s_gj, grad.to(grad_ptr.dtype.element_ty),
                 mask=m2)


# ----------------------------------------------------------------------------------------------
# launcher (custom op)
# ----------------------------------------------------------------------------------------------
@triton_op("audiomae::masked_norm_pix_loss_fwd", mutates_args=())
def masked_norm_pix_loss_fwd(pred: torch.Tensor, spec: torch.Tensor, mask: torch.Tensor, patch_size: int,
                             norm_pix: bool, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d pred) for ``pred`` [B, L, p*p], ``spec`` [B, 1, T, F], ``mask`` [B, L].

    The loss is a 0-dim tensor in ``promote_types(pred, spec, mask)``; the gradient is ``[B, L, p*p]``
    in ``pred.dtype`` when ``write_grad``, else an empty tensor.
    """
    B, L, pp = pred.shape
    p = int(patch_size)
    loss_dtype = torch.promote_types(torch.promote_types(pred.dtype, spec.dtype), mask.dtype)
    den = mask.sum(dtype=torch.float32)
    grad = _alloc((B, L, pp), pred.dtype, pred.device) if write_grad else pred.new_empty((0, 0, 0))
    bl = _block_l(pp)
    n_l = triton.cdiv(L, bl)
    partial = _alloc((B, n_l), torch.float32, pred.device)
    if B * L > 0:
        gs = grad.stride() if write_grad else (0, 0, 0)
        _launcher(_masked_loss_fwd_kernel)[(n_l, B)](
            pred, spec, mask, den, partial, grad,
            L, spec.shape[-1] // p, n_l,
            pred.stride(0), pred.stride(1), pred.stride(2),
            spec.stride(0), spec.stride(2), spec.stride(3),
            mask.stride(0), mask.stride(1),
            gs[0], gs[1], gs[2],
            NORM_PIX_EPS,
            P=p, BLOCK_L=bl, BLOCK_J=triton.next_power_of_2(pp), NORM_PIX=bool(norm_pix),
            WRITE_GRAD=bool(write_grad), num_warps=8,
        )
    loss = (partial.sum() / den).to(loss_dtype)
    return loss, grad


# Shapes only, for tracing (torch.compile still sees the kernel: triton_op decomposes the op into
# it when it lowers the graph).
@masked_norm_pix_loss_fwd.register_fake
def _(pred, spec, mask, patch_size, norm_pix, write_grad):
    loss_dtype = torch.promote_types(torch.promote_types(pred.dtype, spec.dtype), mask.dtype)
    grad = torch.empty_like(pred) if write_grad else pred.new_empty((0, 0, 0))
    return pred.new_empty((), dtype=loss_dtype), grad


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class MaskedNormPixLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, spec, mask, patch_size, norm_pix):
        write_grad = bool(ctx.needs_input_grad[0])
        loss, grad = masked_norm_pix_loss_fwd(pred, spec, mask, patch_size, norm_pix, write_grad)
        if write_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def masked_norm_pix_loss(pred: torch.Tensor, spec: torch.Tensor, mask: torch.Tensor, patch_size: int,
                         norm_pix: bool = True) -> torch.Tensor:
    """Audio-MAE's pretraining loss, reading each target patch once from the spectrogram.

    Args:
        pred: ``[B, L, p*p]`` predicted patches (time-major, each row-major), float32 / bfloat16 / float16.
        spec: ``[B, 1, T, F]`` model input; patch ``l = t * (F // p) + f``; a remainder is cropped.
        mask: ``[B, L]`` 1 for removed patches (the loss averages over these), 0 for kept ones.
        patch_size: ``p``.
        norm_pix: normalise each target patch to zero mean, unit unbiased variance (eps 1e-6).

    Returns:
        0-dim loss ``sum(mse * mask) / sum(mask)``; differentiable with respect to ``pred`` only.

    Example::

        loss = masked_norm_pix_loss(pred, spec, mask, patch_size=16)   # = model.forward_loss(spec, pred, mask)
    """
    return MaskedNormPixLossFunction.apply(pred, spec, mask, int(patch_size), bool(norm_pix))
