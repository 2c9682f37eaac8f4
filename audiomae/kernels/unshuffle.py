"""Decoder unshuffle: mask tokens in, original token order back, positions added, in one pass.

The eager decoder concatenates the kept tokens with ``L - K`` copies of the mask token, gathers the
sequence back into the original order with ``ids_restore``, (for global decoders) puts the cls
token back in front and adds the position table: three full-size temporaries. Here each output
row is read from where it comes from and written once:

    out[b, l] = (x[b, 1 + r] if r < K else mask_token) + pos[0, 1 + l],   r = ids_restore[b, l]

preceded by ``x[b, 0] + pos[0, 0]`` when ``keep_cls`` (see
:func:`audiomae.reference.step.decoder_unshuffle_reference`). The mask token is cast to ``x.dtype``
first and the sum is rounded once to ``promote_types(x.dtype, pos.dtype)``, as the eager code does.

Backward: ``ids_restore`` is a permutation, so each kept row of ``grad_x`` receives exactly one
output row (a scatter without collisions; the cls row gets zeros for local decoders). The mask
token's gradient, a sum over every removed position of the batch, is reduced deterministically:
one float32 partial sum per program, then a fixed-order sum.

Layers: Triton kernels -> launchers (``torch.library`` custom ops) -> ``torch.autograd.Function``
-> :func:`decoder_unshuffle`.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import alloc, interpreting as _interpreting, launcher as _launcher
from torch.library import triton_op

POISON_OUTPUTS = False  # tests set this: output buffers start as NaN, so an unwritten element shows


def _alloc(shape, dtype, device) -> torch.Tensor:
    return alloc(shape, dtype, device, POISON_OUTPUTS)


def _blocks(D: int):
    """(BLOCK_L rows, BLOCK_D channels, num_warps)."""
    if _interpreting():  # few, large tiles: the interpreter pays per operation, not per element
        return 128, triton.next_power_of_2(D), 4
    return 16, min(triton.next_power_of_2(D), 256), 4


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
# Reductions use tl.reduce with Triton's own combine function and accumulators start from tl.full:
# tl.sum and tl.zeros are @triton.jit helpers whose mode (GPU or interpreter) is fixed when triton
# is first imported, while these work in both, whatever the environment was then.


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr, mt_ptr, ids_ptr, pos_ptr, out_ptr,
    K, L_OUT, D,
    s_xb, s_xk, s_xd,
    s_md,
    s_ib, s_il,
    s_pl, s_pd,
    s_ob, s_ol, s_od,
    KEEP_CLS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    o = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # output row
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_o = o < L_OUT
    mask_d = offs_d < D
    l = o - KEEP_CLS  # patch position; -1 is the cls row
    is_cls = l < 0
    r = tl.load(ids_ptr + b * s_ib + l * s_il, mask=mask_o & (l >= 0), other=0).to(tl.int64)
    bad = (l >= 0) & ((r < 0) | (r >= L_OUT - KEEP_CLS))  # not from a permutation: a NaN row, read from nowhere
    from_x = is_cls | ((r >= 0) & (r < K))
    src = tl.where(is_cls, 0, 1 + r)
    m2 = mask_o[:, None] & mask_d[None, :]
    xv = tl.load(x_ptr + b * s_xb + src[:, None] * s_xk + offs_d[None, :] * s_xd,
                 mask=m2 & from_x[:, None], other=0.0).to(tl.float32)
    mt = tl.load(mt_ptr + offs_d * s_md, mask=mask_d, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    v = tl.where(from_x[:, None], xv, mt[None, :])
    pos = tl.load(pos_ptr + (l + 1)[:, None] * s_pl + offs_d[None, :] * s_pd, mask=m2, other=0.0)
    out = tl.where(bad[:, None], float("nan"), v + pos.to(tl.float32))
    tl.store(out_ptr + b * s_ob + o[:, None] * s_ol + offs_d[None, :] * s_od, out.to(out_ptr.dtype.element_ty),
             mask=m2)


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr, ids_ptr, dx_ptr, part_ptr,
    K, L_OUT, D, NUM_L_BLOCKS,
    s_gb, s_gl, s_gd,
    s_ib, s_il,
    s_xb, s_xk, s_xd,
    KEEP_CLS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    o = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_o = o < L_OUT
    mask_d = offs_d < D
    l = o - KEEP_CLS
    is_cls = l < 0
    r = tl.load(ids_ptr + b * s_ib + l * s_il, mask=mask_o & (l >= 0), other=0).to(tl.int64)
    bad = (l >= 0) & ((r < 0) | (r >= L_OUT - KEEP_CLS))  # (a NaN row in the forward: its gradient goes nowhere)
    from_x = is_cls | ((r >= 0) & (r < K))
    m2 = mask_o[:, None] & mask_d[None, :]
    g = tl.load(g_ptr + b * s_gb + o[:, None] * s_gl + offs_d[None, :] * s_gd, mask=m2, other=0.0).to(tl.float32)
    # kept rows (and the cls row) go back to where they came from
    dst = tl.where(is_cls, 0, 1 + r)
    tl.store(dx_ptr + b * s_xb + dst[:, None] * s_xk + offs_d[None, :] * s_xd, g.to(dx_ptr.dtype.element_ty),
             mask=m2 & from_x[:, None])
    if not KEEP_CLS:
        if pid_l == 0:  # the cls token does not reach a local decoder
            zero = tl.full((BLOCK_D,), 0.0, tl.float32)
            tl.store(dx_ptr + b * s_xb + offs_d * s_xd, zero.to(dx_ptr.dtype.element_ty), mask=mask_d)
    # removed rows: this program's share of the mask token's gradient
    part = tl.reduce(tl.where((from_x | bad)[:, None], 0.0, g), 0, tl.standard._sum_combine)
    tl.store(part_ptr + (b * NUM_L_BLOCKS + pid_l) * D + offs_d, part, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# launchers (custom ops)
# ----------------------------------------------------------------------------------------------
@triton_op("audiomae::decoder_unshuffle_fwd", mutates_args=())
def decoder_unshuffle_fwd(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor,
                          keep_cls: bool) -> torch.Tensor:
    """``x`` [B, 1 + K, D], ``mask_token`` [1, 1, D], ``ids_restore`` [B, L], ``pos`` [1, 1 + L, D]
    -> ``[B, L (+ 1), D]`` in ``promote_types(x.dtype, pos.dtype)``."""
    B, L = ids_restore.shape
    D = x.shape[-1]
    l_out = L + int(keep_cls)
    out = _alloc((B, l_out, D), torch.promote_types(x.dtype, pos.dtype), x.device)
    if B == 0 or D == 0 or l_out == 0:
        return out
    bl, bd, warps = _blocks(D)
    mt = mask_token.reshape(D)
    grid = (triton.cdiv(l_out, bl), triton.cdiv(D, bd), B)
    _launcher(_unshuffle_fwd_kernel)[grid](
        x, mt, ids_restore, pos, out,
        x.shape[1] - 1, l_out, D,
        x.stride(0), x.stride(1), x.stride(2),
        mt.stride(0),
        ids_restore.stride(0), ids_restore.stride(1),
        pos.stride(1), pos.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        KEEP_CLS=int(keep_cls), BLOCK_L=bl, BLOCK_D=bd, num_warps=warps,
    )
    return out


@triton_op("audiomae::decoder_unshuffle_bwd", mutates_args=())
def decoder_unshuffle_bwd(grad: torch.Tensor, ids_restore: torch.Tensor, num_x_rows: int, x_dtype: torch.dtype,
                          keep_cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``x`` ([B, num_x_rows, D] in ``x_dtype``) and of the mask token ([D], float32)
    from ``grad`` [B, L (+ 1), D]."""
    B, L = ids_restore.shape
    D = grad.shape[-1]
    l_out = L + int(keep_cls)
    dx = _alloc((B, num_x_rows, D), x_dtype, grad.device)
    bl, bd, warps = _blocks(D)
    n_l = triton.cdiv(l_out, bl)
    partial = _alloc((B, n_l, D), torch.float32, grad.device)
    if B == 0 or D == 0:
        return dx, partial.sum((0, 1))
    _launcher(_unshuffle_bwd_kernel)[(n_l, triton.cdiv(D, bd), B)](
        grad, ids_restore, dx, partial,
        num_x_rows - 1, l_out, D, n_l,
        grad.stride(0), grad.stride(1), grad.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        dx.stride(0), dx.stride(1), dx.stride(2),
        KEEP_CLS=int(keep_cls), BLOCK_L=bl, BLOCK_D=bd, num_warps=warps,
    )
    return dx, partial.sum((0, 1))


# Shapes only, for tracing (torch.compile still sees the kernels: triton_op decomposes the ops
# into them when it lowers the graph).
@decoder_unshuffle_fwd.register_fake
def _(x, mask_token, ids_restore, pos, keep_cls):
    B, L = ids_restore.shape
    return x.new_empty((B, L + int(keep_cls), x.shape[-1]), dtype=torch.promote_types(x.dtype, pos.dtype))


@decoder_unshuffle_bwd.register_fake
def _(grad, ids_restore, num_x_rows, x_dtype, keep_cls):
    D = grad.shape[-1]
    return grad.new_empty((grad.shape[0], num_x_rows, D), dtype=x_dtype), grad.new_empty((D,), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class DecoderUnshuffleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_token, ids_restore, pos, keep_cls):
        out = decoder_unshuffle_fwd(x, mask_token, ids_restore, pos, keep_cls)
        ctx.save_for_backward(ids_restore)
        ctx.meta = (x.shape[1], x.dtype, mask_token.shape, mask_token.dtype, pos.dtype, bool(keep_cls))
        return out

    @staticmethod
    def backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        rows, x_dtype, mt_shape, mt_dtype, pos_dtype, keep_cls = ctx.meta
        need_x, need_mt, _, need_pos = ctx.needs_input_grad[:4]
        dx = dmt = dpos = None
        if need_x or need_mt:
            dx, dmt = decoder_unshuffle_bwd(grad, ids_restore, rows, x_dtype, keep_cls)
            dmt = dmt.reshape(mt_shape).to(mt_dtype)
        if need_pos:
            per_pos = grad.sum(0, keepdim=True)
            if not keep_cls:
                per_pos = torch.cat([per_pos.new_zeros(1, 1, grad.shape[-1]), per_pos], dim=1)
            dpos = per_pos.to(pos_dtype)
        return (dx if need_x else None, dmt if need_mt else None, None, dpos, None)


def decoder_unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor,
                      keep_cls: bool) -> torch.Tensor:
    """Decoder input from the embedded encoder output: mask tokens, original order, positions.

    Args:
        x: ``[B, 1 + K, D]`` ``decoder_embed`` output, cls token first, then the kept tokens in kept
            order (float32 / bfloat16 / float16).
        mask_token: ``[1, 1, D]`` learned mask token (cast to ``x.dtype`` before use).
        ids_restore: ``[B, L]`` int64 permutation from the masking (``r < K``: kept token ``r``); an
            entry outside ``[0, L)`` gives a row of NaN (read from nowhere). The backward needs the permutation:
            it writes each row of ``x``'s gradient once, where the permutation sends it (the
            reference, :func:`audiomae.reference.step.decoder_unshuffle_reference`, takes any ids).
        pos: ``[1, 1 + L, D]`` decoder position table, row 0 for the cls token.
        keep_cls: keep the cls token in front (global decoders) or drop it (local decoders).

    Returns:
        ``[B, L, D]`` (or ``[B, 1 + L, D]`` with ``keep_cls``) in ``promote_types(x.dtype, pos.dtype)``.

    Example::

        x = decoder_unshuffle(model.decoder_embed(latent), model.mask_token, ids_restore,
                              model.decoder_pos_embed, keep_cls=False)   # [B, L, D']
    """
    return DecoderUnshuffleFunction.apply(x, mask_token, ids_restore, pos, bool(keep_cls))
