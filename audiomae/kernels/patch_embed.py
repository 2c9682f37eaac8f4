"""Masked patch embedding: embed only the kept patches, straight from the spectrogram.

The eager encoder embeds all L patches (a strided convolution), adds the position table and then
gathers the K kept tokens (K = 102 of 512 at the paper's 0.8 mask ratio), so four fifths of the
embedding work and memory traffic are thrown away. Here each program gathers the pixels of its
kept patches directly from ``spec`` (patch ``l = t * Fg + f``, time-major, each patch row-major),
multiplies them by the flattened kernel ``[D, p*p]`` with ``tl.dot`` and adds the bias and
``pos[0, 1 + l]``:

    out[b, k] = patches(spec)[b, l] @ W.T + bias + pos[0, 1 + l],   l = ids_keep[b, k]

which equals ``gather(conv(spec) + pos[:, 1:], ids_keep)``
(:func:`audiomae.reference.step.masked_patch_embed_reference`). The convolution result is rounded
to the input dtype before the position is added, as the eager convolution's output is.

Backward: the weight and bias gradients are reductions over all kept tokens of the batch. The
tokens are cut into slices (about two programs per multiprocessor in all, see
:func:`_weight_grad_split`); one program owns a ``[BLOCK_N, BLOCK_J]`` tile of one slice and loops
over its tokens in a fixed order, and the float32 slice sums are added in a fixed order too
(deterministic, no atomics). The spectrogram gradient (only when ``spec`` requires
grad) computes ``grad @ W`` per kept token and adds it into its patch; removed patches get zeros. ``pos`` gets a
gradient only if it requires one (it is a frozen table in the model).

Layers: Triton kernels -> launchers (``torch.library`` custom ops, traceable by ``torch.compile``)
-> ``torch.autograd.Function`` -> :func:`masked_patch_embed`.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import alloc, dot_precision, dot_upcast, interpreting as _interpreting, launcher as _launcher
from torch.library import triton_op

POISON_OUTPUTS = False  # tests set this: output buffers start as NaN, so an unwritten element shows


def _alloc(shape, dtype, device) -> torch.Tensor:
    return alloc(shape, dtype, device, POISON_OUTPUTS)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
# Reductions use tl.reduce with Triton's own combine function and accumulators start from tl.full:
# tl.sum and tl.zeros are @triton.jit helpers whose mode (GPU or interpreter) is fixed when triton
# is first imported, while these work in both, whatever the environment was then.


@triton.jit
def _patch_embed_fwd_kernel(
    spec_ptr, w_ptr, bias_ptr, pos_ptr, ids_ptr, out_ptr,
    K, D, FG, L,
    s_sb, s_st, s_sf,
    s_wd, s_wj,
    s_pl, s_pd,
    s_ib, s_ik,
    s_ob, s_ok, s_od,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < K
    mask_n = offs_n < D
    l = tl.load(ids_ptr + b * s_ib + offs_m * s_ik, mask=mask_m, other=0).to(tl.int64)
    # an id outside [0, L) reads nothing and gives a NaN row (no read outside the buffers)
    valid = mask_m & (l >= 0) & (l < L)
    l = tl.where(valid, l, 0)
    # top-left pixel of each kept patch
    base = spec_ptr + b * s_sb + ((l // FG) * P)[:, None] * s_st + ((l % FG) * P)[:, None] * s_sf
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for j0 in range(0, P * P, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask_j = j < P * P
        a = tl.load(base + (j // P)[None, :] * s_st + (j % P)[None, :] * s_sf,
                    mask=valid[:, None] & mask_j[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * s_wd + j[:, None] * s_wj,
                    mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    # the convolution's output is in the input dtype
    acc = (acc + bias[None, :]).to(spec_ptr.dtype.element_ty).to(tl.float32)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    pos = tl.load(pos_ptr + (1 + l)[:, None] * s_pl + offs_n[None, :] * s_pd, mask=valid[:, None] & mask_n[None, :],
                  other=0.0)
    out = tl.where(valid[:, None], acc + pos.to(tl.float32), float("nan"))
    tl.store(out_ptr + b * s_ob + offs_m[:, None] * s_ok + offs_n[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _patch_embed_bwd_weight_kernel(
    g_ptr, spec_ptr, ids_ptr, dw_ptr, db_ptr,
    K, R, D, FG, L, CHUNK,
    s_gb, s_gk, s_gd,
    s_sb, s_st, s_sf,
    s_ib, s_ik,
    s_dws, s_dbs,
    P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dW[n, j] = sum_r g[r, n] * patch[r, j] and db[n] = sum_r g[r, n] over the R = B * K kept tokens;
    program (n, j, s) sums rows [s * CHUNK, (s + 1) * CHUNK) into slice s of the outputs (strides
    s_dws, s_dbs; one slice, the gradients themselves, when there is no split)."""
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    r_lo = pid_s * CHUNK
    r_hi = tl.minimum(R, r_lo + CHUNK)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_n = offs_n < D
    mask_j = offs_j < P * P
    acc = tl.full((BLOCK_N, BLOCK_J), 0.0, tl.float32)
    acc_b = tl.full((BLOCK_N,), 0.0, tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask_r = r < r_hi
        b = (r // K).to(tl.int64)
        k = r % K
        l = tl.load(ids_ptr + b * s_ib + k * s_ik, mask=mask_r, other=0).to(tl.int64)
        valid = mask_r & (l >= 0) & (l < L)  # (an id outside [0, L) made a NaN row: nothing to read)
        l = tl.where(valid, l, 0)
        # the gradient reaching the convolution is in its output dtype (the input dtype)
        g = tl.load(g_ptr + b[:, None] * s_gb + k[:, None] * s_gk + offs_n[None, :] * s_gd,
                    mask=valid[:, None] & mask_n[None, :], other=0.0).to(spec_ptr.dtype.element_ty)
        a = tl.load(spec_ptr + b[:, None] * s_sb + ((l // FG) * P)[:, None] * s_st + ((l % FG) * P)[:, None] * s_sf
                    + (offs_j // P)[None, :] * s_st + (offs_j % P)[None, :] * s_sf,
                    mask=valid[:, None] & mask_j[None, :], other=0.0)
        acc_b += tl.reduce(g.to(tl.float32), 0, tl.standard._sum_combine)
        if UPCAST:
            g, a = g.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(tl.trans(g), a, acc, input_precision=PREC)
    tl.store(dw_ptr + pid_s * s_dws + offs_n[:, None] * (P * P) + offs_j[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_j[None, :])
    if pid_j == 0:
        tl.store(db_ptr + pid_s * s_dbs + offs_n, acc_b.to(db_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _patch_embed_bwd_spec_kernel(
    g_ptr, w_ptr, dspec_ptr,
    K, D,
    s_gb, s_gk, s_gd,
    s_wd, s_wj,
    s_db, s_dk, s_dj,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dpatch[b, k, j] = sum_n g[b, k, n] * W[n, j], one float32 row per kept token (the launcher
    adds the rows into the patches they came from)."""
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_m = offs_m < K
    mask_j = offs_j < P * P
    acc = tl.full((BLOCK_M, BLOCK_J), 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(g_ptr + b * s_gb + offs_m[:, None] * s_gk + offs_d[None, :] * s_gd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_d[:, None] * s_wd + offs_j[None, :] * s_wj,
                    mask=mask_d[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PREC)
    ptrs = dspec_ptr + b * s_db + offs_m[:, None].to(tl.int64) * s_dk + offs_j[None, :] * s_dj
    tl.store(ptrs, acc, mask=mask_m[:, None] & mask_j[None, :])


# ----------------------------------------------------------------------------------------------
# launchers (custom ops)
# ----------------------------------------------------------------------------------------------
def _valid_ids(ids_keep: torch.Tensor, L: int):
    """(ids clamped into [0, L), which of them were there): an id outside made a NaN row, whose
    gradient goes nowhere."""
    ids = ids_keep.long()
    valid = (ids >= 0) & (ids < L)
    return ids.clamp(0, max(L - 1, 0)), valid

def _blocks(K: int, D: int, pp: int):
    """(BLOCK_M tokens, BLOCK_N channels, BLOCK_J pixels, num_warps)."""
    if _interpreting():  # few, large tiles: the interpreter pays per operation, not per element
        return 64, min(triton.next_power_of_2(D), 128), triton.next_power_of_2(pp), 4
    return 64, 64, 64, 4


# Tuning override (tests, sweeps): {"bwd_split": n} fixes the number of row slices of the weight
# gradient; empty means the heuristic of _weight_grad_split.
TUNING: dict = {}


def _weight_grad_split(tiles: int, rows: int, block_rows: int, device: torch.device) -> int:
    """Row slices for the weight-gradient kernel: its (D x p^2) tiles alone are too few programs to
    fill a GPU (48 for ViT-B), so the B * K rows are split until there are about two programs per
    multiprocessor, each slice keeping at least 4 blocks of rows."""
    if "bwd_split" in TUNING:
        return max(1, int(TUNING["bwd_split"]))
    if _interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    most = max(1, rows // (4 * block_rows))
    return max(1, min(most, triton.cdiv(2 * sms, max(tiles, 1))))


@triton_op("audiomae::masked_patch_embed_fwd", mutates_args=())
def masked_patch_embed_fwd(spec: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos: torch.Tensor,
                           ids_keep: torch.Tensor) -> torch.Tensor:
    """``spec`` [B, 1, T, F], ``weight`` [D, 1, p, p] and ``bias`` [D] in one dtype, ``pos`` [1, 1 + L, D],
    ``ids_keep`` [B, K] -> ``[B, K, D]`` in ``promote_types(spec.dtype, pos.dtype)``."""
    B, _, T, Fq = spec.shape
    D, p = weight.shape[0], weight.shape[-1]
    K = ids_keep.shape[1]
    out = _alloc((B, K, D), torch.promote_types(spec.dtype, pos.dtype), spec.device)
    if B == 0 or K == 0 or D == 0:
        return out
    w = weight.reshape(D, p * p)
    bm, bn, bj, warps = _blocks(K, D, p * p)
    grid = (triton.cdiv(K, bm), triton.cdiv(D, bn), B)
    _launcher(_patch_embed_fwd_kernel)[grid](
        spec, w, bias, pos, ids_keep, out,
        K, D, Fq // p, (T // p) * (Fq // p),
        spec.stride(0), spec.stride(2), spec.stride(3),
        w.stride(0), w.stride(1),
        pos.stride(1), pos.stride(2),
        ids_keep.stride(0), ids_keep.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        P=p, BLOCK_M=bm, BLOCK_N=bn, BLOCK_J=bj, PREC=dot_precision(spec.dtype),
        UPCAST=dot_upcast(spec.dtype, _interpreting()),
        num_warps=warps,
    )
    return out


@triton_op("audiomae::masked_patch_embed_bwd", mutates_args=())
def masked_patch_embed_bwd(grad: torch.Tensor, spec: torch.Tensor, weight: torch.Tensor, ids_keep: torch.Tensor,
                           need_spec_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (spec, weight, bias) from ``grad`` [B, K, D]; the spec gradient is an empty tensor
    unless ``need_spec_grad``."""
    B, _, T, Fq = spec.shape
    D, p = weight.shape[0], weight.shape[-1]
    K = ids_keep.shape[1]
    pp = p * p
    fg = Fq // p
    # removed patches (and a cropped remainder) get zero gradient: start from zeros
    dspec = torch.zeros_like(spec) if need_spec_grad else spec.new_empty((0,))
    if D == 0:
        return dspec, _alloc((D, 1, p, p), weight.dtype, spec.device), _alloc((D,), weight.dtype, spec.device)
    bm, bn, bj, warps = _blocks(K, D, pp)
    prec = dot_precision(spec.dtype)
    tiles = triton.cdiv(D, bn) * triton.cdiv(pp, bj)
    split = _weight_grad_split(tiles, B * K, bm, spec.device)
    chunk = triton.cdiv(triton.cdiv(max(B * K, 1), split), bm) * bm  # a whole number of row blocks
    split = triton.cdiv(max(B * K, 1), chunk)
    if split == 1:
        dw_out = dw = _alloc((D, 1, p, p), weight.dtype, spec.device)
        db_out = db = _alloc((D,), weight.dtype, spec.device)
    else:  # float32 partial sums per slice of rows, reduced below in a fixed order (deterministic)
        dw_out = _alloc((split, D, pp), torch.float32, spec.device)
        db_out = _alloc((split, D), torch.float32, spec.device)
    grid = (triton.cdiv(D, bn), triton.cdiv(pp, bj), split)
    _launcher(_patch_embed_bwd_weight_kernel)[grid](
        grad, spec, ids_keep, dw_out, db_out,
        max(K, 1), B * K, D, fg, (T // p) * fg, chunk,
        grad.stride(0), grad.stride(1), grad.stride(2),
        spec.stride(0), spec.stride(2), spec.stride(3),
        ids_keep.stride(0), ids_keep.stride(1),
        dw_out.stride(0) if split > 1 else 0, db_out.stride(0) if split > 1 else 0,
        P=p, BLOCK_R=bm, BLOCK_N=bn, BLOCK_J=bj, PREC=prec, UPCAST=dot_upcast(spec.dtype, _interpreting()),
        num_warps=warps,
    )
    if split > 1:
        dw = dw_out.sum(0).to(weight.dtype).reshape(D, 1, p, p)
        db = db_out.sum(0).to(weight.dtype)
    if need_spec_grad and B * K > 0:
        w = weight.reshape(D, pp)
        dpatch = _alloc((B, K, pp), torch.float32, spec.device)
        grid = (triton.cdiv(K, bm), triton.cdiv(pp, bj), B)
        _launcher(_patch_embed_bwd_spec_kernel)[grid](
            grad, w, dpatch,
            K, D,
            grad.stride(0), grad.stride(1), grad.stride(2),
            w.stride(0), w.stride(1),
            dpatch.stride(0), dpatch.stride(1), dpatch.stride(2),
            P=p, BLOCK_M=bm, BLOCK_D=bn, BLOCK_J=bj, PREC=prec, UPCAST=dot_upcast(spec.dtype, _interpreting()),
            num_warps=warps,
        )
        # each token's gradient added into its patch (a repeated index gets the sum), the patch grid
        # folded back to [T, F]; removed patches and a cropped remainder stay zero
        tg = T // p
        ids, valid = _valid_ids(ids_keep, tg * fg)
        grid_grad = dpatch.new_zeros(B, tg * fg, pp).scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, pp),
                                                                   torch.where(valid.unsqueeze(-1), dpatch, 0.0))
        folded = grid_grad.view(B, tg, fg, p, p).permute(0, 1, 3, 2, 4).reshape(B, tg * p, fg * p)
        dspec[:, 0, :tg * p, :fg * p] = folded.to(spec.dtype)
    return dspec, dw, db


# Shapes only, for tracing (torch.compile still sees the kernels: triton_op decomposes the ops
# into them when it lowers the graph).
@masked_patch_embed_fwd.register_fake
def _(spec, weight, bias, pos, ids_keep):
    return spec.new_empty((spec.shape[0], ids_keep.shape[1], weight.shape[0]),
                          dtype=torch.promote_types(spec.dtype, pos.dtype))


@masked_patch_embed_bwd.register_fake
def _(grad, spec, weight, ids_keep, need_spec_grad):
    dspec = torch.empty_like(spec) if need_spec_grad else spec.new_empty((0,))
    return dspec, torch.empty_like(weight), weight.new_empty((weight.shape[0],))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class MaskedPatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, weight, bias, pos, ids_keep):
        out = masked_patch_embed_fwd(spec, weight, bias, pos, ids_keep)
        ctx.save_for_backward(spec, weight, ids_keep)
        ctx.pos_shape, ctx.pos_dtype = pos.shape, pos.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        spec, weight, ids_keep = ctx.saved_tensors
        need_spec, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
        dspec = dw = db = dpos = None
        if need_spec or need_w or need_b:
            dspec, dw, db = masked_patch_embed_bwd(grad, spec, weight, ids_keep, bool(need_spec))
        if need_pos:
            # added per sample (a repeated index gets the sum), then summed over the batch
            B, K, D = grad.shape
            ids, valid = _valid_ids(ids_keep, ctx.pos_shape[1] - 1)
            per_sample = grad.new_zeros(B, ctx.pos_shape[1], D)
            per_sample[:, 1:].scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, D),
                                           torch.where(valid.unsqueeze(-1), grad, 0.0))
            dpos = per_sample.sum(0, keepdim=True).to(ctx.pos_dtype)
        return (dspec if need_spec else None, dw if need_w else None, db if need_b else None, dpos, None)


def masked_patch_embed(spec: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos: torch.Tensor,
                       ids_keep: torch.Tensor) -> torch.Tensor:
    """Embed the kept patches of ``spec`` and add their positions, reading only those patches.

    Args:
        spec: ``[B, 1, T, F]`` float32 / bfloat16 / float16 spectrogram (any strides); a remainder
            that does not fill a whole patch is ignored, as by the strided convolution.
        weight: ``[D, 1, p, p]`` patch-embedding kernel (``patch_embed.proj.weight``), cast to
            ``spec.dtype``; ``bias``: ``[D]`` or None, likewise.
        pos: ``[1, 1 + L, D]`` position table, row 0 the cls token's (unused here); ``L = (T // p) * (F // p)``.
        ids_keep: ``[B, K]`` int64 time-major patch indices (``t * (F // p) + f``) to embed, in
            ``[0, L)`` (an index outside gives a row of NaN, read from nowhere); a row may repeat an
            index (its gradients add up).

    Returns:
        ``[B, K, D]`` in ``promote_types(spec.dtype, pos.dtype)``: ``gather(conv(spec) + pos[:, 1:], ids_keep)``.

    Example::

        ids_keep, ids_restore, mask = random_masking_ids(B, L, K, spec.device)
        x = masked_patch_embed(spec, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                               model.pos_embed, ids_keep)            # [B, K, D]
    """
    weight = weight.to(spec.dtype)
    # the kernel reads the bias as a dense vector: a strided or expanded one is copied first
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.to(spec.dtype).contiguous()
    return MaskedPatchEmbedFunction.apply(spec, weight, bias, pos, ids_keep)
