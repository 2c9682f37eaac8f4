"""Fused shifted-window scaled cosine attention (Swin-V2 "CR"), forward and backward, in Triton.

Semantics are exactly :func:`audiomae.reference.window_attention_reference`: for every (sample,
window, head), ``softmax(cos(q, k) / max(tau, 0.01) + bias + shift_mask) @ v``, with the cyclic
shift, the window partition and their inverses done as index arithmetic.

Layout. ``qkv`` is ``[B, T*F, 3C]`` in token order (time-major ``T x F`` grid, channels ordered
``(3, heads, head_dim)``). Token ``(t, f)`` of the grid rolled by ``-shift`` is the original token
``((t + st) % T, (f + sf) % F)``; windows are ``wt x wf`` tiles of the rolled grid, numbered row-major,
positions row-major inside a window. The kernels load q, k, v of a window straight from ``qkv`` with
these indices and store the output (or the gradients) at the same token positions, so there is no
roll, partition, permute or copy around them.

Tiling. One program handles one head of ``GPP`` window groups in turn, ``WPB`` consecutive windows
each (windows are numbered across the whole batch): a ``BLOCK_M``-row tile of tokens (``BLOCK_M >=
WPB * A``, ``A = wt * wf <= 64``; 16 to 64 rows, see :func:`_tile`) whose scores form a
block-diagonal ``BLOCK_M x BLOCK_M`` tile. Entries between different windows are ``-inf``
(probability exactly 0); a row never spans two windows, so each row's softmax is exact in
registers. With several groups per program the next group's tiles are loaded while the current
one computes, and the backward's bias and tau partial sums cover all of the program's groups. For
the paper's layer (4 x 4 windows, head_dim 32, bf16) forward and backward programs run one warp
over 4 windows, one window at a time (the fastest tiling in both directions that
``benchmarks/tune.py`` timed on an H100; see :func:`_tile`). The grid is flat,
heads fastest, so that neighbouring programs read neighbouring bytes of each token's row.

Precision. Norms, scores, softmax and every accumulation are float32. The cosines are computed to
float32 accuracy for every input dtype (``tf32x3`` tensor-core passes for bf16/fp16 inputs on GPUs,
plain float32 otherwise): ``1/tau`` magnifies their rounding. The other products take their operands
in the input dtype (probabilities and score gradients rounded to it, as PyTorch does in that dtype),
and run in full float32 (``input_precision="ieee"``, no tf32) for float32 inputs.

Shift mask. Along an axis of size ``n`` with window ``w`` and shift ``s > 0``, rolled position
``pos`` lies in region 0 (``pos < n - w``), 1 (``n - w <= pos < n - s``) or 2 (``pos >= n - s``);
two tokens of a window whose (time, frequency) regions differ get ``-100`` added to their logit
(added, never skipped: with ``1/tau`` up to 100 and a bias, a masked logit can still win).

Backward. The scores are recomputed (a window's row fits in registers, nothing is saved but the
inputs). Gradients of q, k, v are written into ``grad_qkv`` in token order. The gradients of ``tau``
and ``bias`` are reduced deterministically: every program writes its partial sums (a scalar and an
``A x A`` tile per head: the sum of its diagonal blocks) to a buffer that a final ``torch.sum``
reduces; there are no atomics.

Everything is registered as ``torch.ops.audiomae.window_attention_fwd`` / ``_bwd`` with
:func:`torch.library.triton_op`, with the autograd formula attached, so ``torch.compile`` traces
through without graph breaks. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors.
"""
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ..reference.window_attention import window_attention_problems
from ._common import alloc, interpreting as _interpreting, launcher as _launcher
from torch.library import triton_op

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_WINDOW_AREA = 64
MAX_HEAD_DIM = 128
# Tests set this to fill every output buffer with NaN before the kernels run, so an element a
# kernel fails to write shows up instead of passing with stale memory.
POISON_OUTPUTS = False
# Tiling overrides for tuning sweeps (benchmarks/tune.py): {"fwd" | "bwd": {"block_m": rows,
# "num_warps": warps, "heads_fast": bool, "groups_per_program": n}}; empty means the defaults of
# :func:`_tile` (heads fast, one group of windows per program). A program loops over its groups.
TUNING: dict = {}


# --- kernels --------------------------------------------------------------------------------------
# Reductions go through tl.reduce with Triton's own combine functions rather than tl.sum / tl.max:
# those are @triton.jit functions fixed in one mode when triton is imported, while these combines
# work in both modes (the interpreter recognises them and reduces with numpy), so the kernels run
# under TRITON_INTERPRET=1 whatever the environment was when triton was first imported. They are
# spelled out in full (no module-level alias) so that inductor can copy the kernels' source.

@triton.jit
def _window_attention_fwd_kernel(
    QKV, TAU, BIAS, OUT,
    stride_qkv_b, stride_qkv_l, stride_out_b, stride_out_l,
    n_windows,  # B * windows per sample
    H, G,  # heads, programs per head (each takes GPP window groups; programs = H * G)
    T: tl.constexpr, F: tl.constexpr, WT: tl.constexpr, WF: tl.constexpr, ST: tl.constexpr,
    SF: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    WPB: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COS_PRECISION: tl.constexpr, HEADS_FAST: tl.constexpr, GPP: tl.constexpr,
):
    A: tl.constexpr = WT * WF
    NW: tl.constexpr = (T // WT) * (F // WF)  # windows per sample
    LOW: tl.constexpr = QKV.dtype.element_ty  # the products run on values rounded to the input dtype
    if DOT_FP32:
        DOT: tl.constexpr = tl.float32
    else:
        DOT: tl.constexpr = QKV.dtype.element_ty
    # one flat grid of H * G programs; with HEADS_FAST the heads of a window group run side by side,
    # so neighbouring programs read neighbouring bytes of each token's row
    if HEADS_FAST:
        h = tl.program_id(0) % H
        prog = tl.program_id(0) // H
    else:
        prog = tl.program_id(0) % G
        h = tl.program_id(0) // G
    r = tl.arange(0, BLOCK_M)
    w_local = r // A
    pos = r % A
    d = tl.arange(0, BLOCK_D)
    # the clamp of tau happens in its dtype, as in the reference; the bias tile is loaded once
    tau_c = tl.maximum(tl.load(TAU + h).to(tl.float32), 0.01).to(TAU.dtype.element_ty).to(tl.float32)
    inv_tau = 1.0 / tau_c
    same = w_local[:, None] == w_local[None, :]
    bias = tl.load(BIAS + h * A * A + pos[:, None] * A + pos[None, :], mask=same, other=0.0).to(tl.float32)

    # this program's first window group: tile row -> (window, position) -> rolled-grid (tr, fr) ->
    # original token
    w_global = prog * GPP * WPB + w_local
    valid = (w_local < WPB) & (w_global < n_windows)
    b = w_global // NW
    tr = ((w_global % NW) // (F // WF)) * WT + pos // WF
    fr = ((w_global % NW) % (F // WF)) * WF + pos % WF
    token = ((tr + ST) % T) * F + (fr + SF) % F
    row = b.to(tl.int64) * stride_qkv_b + token.to(tl.int64) * stride_qkv_l + h * D
    io_mask = valid[:, None] & (d < D)[None, :]
    q_next = tl.load(QKV + row[:, None] + d[None, :], mask=io_mask, other=0.0)
    k_next = tl.load(QKV + row[:, None] + d[None, :] + C, mask=io_mask, other=0.0)
    v_next = tl.load(QKV + row[:, None] + d[None, :] + 2 * C, mask=io_mask, other=0.0)
    for it in tl.range(0, GPP):  # GPP window groups, one after the other
        q = q_next.to(tl.float32)
        k = k_next.to(tl.float32)
        v = v_next
        w_global = (prog * GPP + it) * WPB + w_local
        valid = (w_local < WPB) & (w_global < n_windows)
        b = w_global // NW
        tr = ((w_global % NW) // (F // WF)) * WT + pos // WF
        fr = ((w_global % NW) % (F // WF)) * WF + pos % WF
        token = ((tr + ST) % T) * F + (fr + SF) % F
        io_mask = valid[:, None] & (d < D)[None, :]
        if GPP > 1:  # start loading the next group's tiles; they arrive while this one computes
            w_n = w_global + WPB
            valid_n = (w_local < WPB) & (w_n < n_windows) & (it + 1 < GPP)
            tr_n = ((w_n % NW) // (F // WF)) * WT + pos // WF
            fr_n = ((w_n % NW) % (F // WF)) * WF + pos % WF
            row_n = ((w_n // NW).to(tl.int64) * stride_qkv_b
                     + (((tr_n + ST) % T) * F + (fr_n + SF) % F).to(tl.int64) * stride_qkv_l + h * D)
            mask_n = valid_n[:, None] & (d < D)[None, :]
            q_next = tl.load(QKV + row_n[:, None] + d[None, :], mask=mask_n, other=0.0)
            k_next = tl.load(QKV + row_n[:, None] + d[None, :] + C, mask=mask_n, other=0.0)
            v_next = tl.load(QKV + row_n[:, None] + d[None, :] + 2 * C, mask=mask_n, other=0.0)
        region = r * 0  # shift region of each token: entries across regions get -100
        if ST > 0:
            region += 3 * ((tr >= T - WT).to(tl.int32) + (tr >= T - ST).to(tl.int32))
        if SF > 0:
            region += (fr >= F - WF).to(tl.int32) + (fr >= F - SF).to(tl.int32)

        # F.normalize: x / max(||x||, 1e-12), norms in float32
        # (one reciprocal per row, then products: within 2 ulp of the division)
        qn = q * (1.0 / tl.maximum(tl.sqrt_rn(tl.reduce(q * q, 1, tl.standard._sum_combine)), 1e-12))[:, None]
        kn = k * (1.0 / tl.maximum(tl.sqrt_rn(tl.reduce(k * k, 1, tl.standard._sum_combine)), 1e-12))[:, None]
        cos = tl.dot(qn, tl.trans(kn), input_precision=COS_PRECISION)  # float32 accuracy

        s = cos * inv_tau + bias
        s = tl.where(region[:, None] == region[None, :], s, s - 100.0)
        s = tl.where(same, s, float("-inf"))
        e = tl.exp(s - tl.reduce(s, 1, tl.standard._elementwise_max)[:, None])
        p = e * (1.0 / tl.reduce(e, 1, tl.standard._sum_combine))[:, None]
        o = tl.dot(p.to(LOW).to(DOT), v.to(DOT), input_precision=DOT_PRECISION)

        out_row = b.to(tl.int64) * stride_out_b + token.to(tl.int64) * stride_out_l + h * D
        tl.store(OUT + out_row[:, None] + d[None, :], o.to(OUT.dtype.element_ty), mask=io_mask)


@triton.jit
def _window_attention_bwd_kernel(
    QKV, TAU, BIAS, DOUT, DQKV, DTAU_PARTIAL, DBIAS_PARTIAL,
    stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l, stride_dqkv_b, stride_dqkv_l,
    n_windows, H, G,
    T: tl.constexpr, F: tl.constexpr, WT: tl.constexpr, WF: tl.constexpr, ST: tl.constexpr,
    SF: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr, WPB: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COS_PRECISION: tl.constexpr, HEADS_FAST: tl.constexpr, GPP: tl.constexpr,
):
    A: tl.constexpr = WT * WF
    NW: tl.constexpr = (T // WT) * (F // WF)
    LOW: tl.constexpr = QKV.dtype.element_ty
    if DOT_FP32:
        DOT: tl.constexpr = tl.float32
    else:
        DOT: tl.constexpr = QKV.dtype.element_ty
    # one flat grid of H * G programs; with HEADS_FAST the heads of a window group run side by side,
    # so neighbouring programs read neighbouring bytes of each token's row
    if HEADS_FAST:
        h = tl.program_id(0) % H
        prog = tl.program_id(0) // H
    else:
        prog = tl.program_id(0) % G
        h = tl.program_id(0) // G
    r = tl.arange(0, BLOCK_M)
    w_local = r // A
    pos = r % A
    d = tl.arange(0, BLOCK_D)
    tau_c = tl.maximum(tl.load(TAU + h).to(tl.float32), 0.01).to(TAU.dtype.element_ty).to(tl.float32)
    inv_tau = 1.0 / tau_c
    same = w_local[:, None] == w_local[None, :]
    bias = tl.load(BIAS + h * A * A + pos[:, None] * A + pos[None, :], mask=same, other=0.0).to(tl.float32)

    # the first window group's tiles (same index arithmetic as the forward kernel)
    w_global = prog * GPP * WPB + w_local
    valid = (w_local < WPB) & (w_global < n_windows)
    b = w_global // NW
    tr = ((w_global % NW) // (F // WF)) * WT + pos // WF
    fr = ((w_global % NW) % (F // WF)) * WF + pos % WF
    token = ((tr + ST) % T) * F + (fr + SF) % F
    row = b.to(tl.int64) * stride_qkv_b + token.to(tl.int64) * stride_qkv_l + h * D
    do_row = b.to(tl.int64) * stride_do_b + token.to(tl.int64) * stride_do_l + h * D
    io_mask = valid[:, None] & (d < D)[None, :]
    q_next = tl.load(QKV + row[:, None] + d[None, :], mask=io_mask, other=0.0)
    k_next = tl.load(QKV + row[:, None] + d[None, :] + C, mask=io_mask, other=0.0)
    v_next = tl.load(QKV + row[:, None] + d[None, :] + 2 * C, mask=io_mask, other=0.0)
    do_next = tl.load(DOUT + do_row[:, None] + d[None, :], mask=io_mask, other=0.0)
    # tau and bias partial sums over this program's GPP window groups, stored once at the end
    dtau_acc = tl.full((BLOCK_M,), 0.0, tl.float32)
    db_acc = tl.full((BLOCK_A, BLOCK_A), 0.0, tl.float32)
    for it in tl.range(0, GPP):  # GPP window groups, one after the other
        q = q_next.to(tl.float32)
        k = k_next.to(tl.float32)
        v = v_next
        do = do_next
        w_global = (prog * GPP + it) * WPB + w_local
        valid = (w_local < WPB) & (w_global < n_windows)
        b = w_global // NW
        tr = ((w_global % NW) // (F // WF)) * WT + pos // WF
        fr = ((w_global % NW) % (F // WF)) * WF + pos % WF
        token = ((tr + ST) % T) * F + (fr + SF) % F
        io_mask = valid[:, None] & (d < D)[None, :]
        if GPP > 1:  # start loading the next group's tiles; they arrive while this one computes
            w_n = w_global + WPB
            valid_n = (w_local < WPB) & (w_n < n_windows) & (it + 1 < GPP)
            tr_n = ((w_n % NW) // (F // WF)) * WT + pos // WF
            fr_n = ((w_n % NW) % (F // WF)) * WF + pos % WF
            token_n = (((tr_n + ST) % T) * F + (fr_n + SF) % F).to(tl.int64)
            row_n = (w_n // NW).to(tl.int64) * stride_qkv_b + token_n * stride_qkv_l + h * D
            do_row_n = (w_n // NW).to(tl.int64) * stride_do_b + token_n * stride_do_l + h * D
            mask_n = valid_n[:, None] & (d < D)[None, :]
            q_next = tl.load(QKV + row_n[:, None] + d[None, :], mask=mask_n, other=0.0)
            k_next = tl.load(QKV + row_n[:, None] + d[None, :] + C, mask=mask_n, other=0.0)
            v_next = tl.load(QKV + row_n[:, None] + d[None, :] + 2 * C, mask=mask_n, other=0.0)
            do_next = tl.load(DOUT + do_row_n[:, None] + d[None, :], mask=mask_n, other=0.0)
        region = r * 0
        if ST > 0:
            region += 3 * ((tr >= T - WT).to(tl.int32) + (tr >= T - ST).to(tl.int32))
        if SF > 0:
            region += (fr >= F - WF).to(tl.int32) + (fr >= F - SF).to(tl.int32)

        # recompute the forward
        q_len = tl.sqrt_rn(tl.reduce(q * q, 1, tl.standard._sum_combine))
        k_len = tl.sqrt_rn(tl.reduce(k * k, 1, tl.standard._sum_combine))
        q_den = tl.maximum(q_len, 1e-12)
        k_den = tl.maximum(k_len, 1e-12)
        q_inv = 1.0 / q_den
        k_inv = 1.0 / k_den
        qn = q * q_inv[:, None]
        kn = k * k_inv[:, None]
        cos = tl.dot(qn, tl.trans(kn), input_precision=COS_PRECISION)  # float32 accuracy
        s = cos * inv_tau + bias
        s = tl.where(region[:, None] == region[None, :], s, s - 100.0)
        s = tl.where(same, s, float("-inf"))
        e = tl.exp(s - tl.reduce(s, 1, tl.standard._elementwise_max)[:, None])
        p = e * (1.0 / tl.reduce(e, 1, tl.standard._sum_combine))[:, None]

        # softmax and products
        dv = tl.dot(tl.trans(p.to(LOW).to(DOT)), do.to(DOT), input_precision=DOT_PRECISION)
        dp = tl.dot(do.to(DOT), tl.trans(v.to(DOT)), input_precision=DOT_PRECISION)
        # d logits; 0 between windows and on empty rows
        ds = p * (dp - tl.reduce(p * dp, 1, tl.standard._sum_combine)[:, None])

        # tau: d/d(tau_c) = -sum(ds * cos) / tau_c^2, finished (and clamped) after the reduction
        dtau_acc += tl.reduce(ds * cos, 1, tl.standard._sum_combine)
        # bias: the sum of the WPB diagonal A x A blocks of ds (ds is 0 off them and on empty rows)
        if WPB == 1:
            db = ds  # BLOCK_A == BLOCK_M
        elif WPB * A == BLOCK_M:  # A a power of two: sum the [WPB, A, WPB, A] view (BLOCK_A == A)
            db = tl.reduce(tl.reshape(ds, [WPB, A, WPB, A]), 2, tl.standard._sum_combine)
            db = tl.reduce(db, 0, tl.standard._sum_combine)
        else:  # one-hot position matrices [BLOCK_M, BLOCK_A], exact in float32
            onehot = ((pos[:, None] == tl.arange(0, BLOCK_A)[None, :]) & valid[:, None]).to(tl.float32)
            db = tl.dot(tl.trans(onehot), tl.dot(ds, onehot, input_precision="ieee"), input_precision="ieee")
        db_acc += db

        # q, k through the cosine and F.normalize (whose clamp passes no gradient below 1e-12)
        dcos = ds * inv_tau
        dcos = dcos.to(LOW).to(DOT)
        dqn = tl.dot(dcos, kn.to(LOW).to(DOT), input_precision=DOT_PRECISION)
        dkn = tl.dot(tl.trans(dcos), qn.to(LOW).to(DOT), input_precision=DOT_PRECISION)
        q_proj = tl.where(q_len >= 1e-12, tl.reduce(dqn * qn, 1, tl.standard._sum_combine), 0.0)
        k_proj = tl.where(k_len >= 1e-12, tl.reduce(dkn * kn, 1, tl.standard._sum_combine), 0.0)
        dq = (dqn - qn * q_proj[:, None]) * q_inv[:, None]
        dk = (dkn - kn * k_proj[:, None]) * k_inv[:, None]

        out_row = b.to(tl.int64) * stride_dqkv_b + token.to(tl.int64) * stride_dqkv_l + h * D
        dq_ptrs = DQKV + out_row[:, None] + d[None, :]
        tl.store(dq_ptrs, dq.to(DQKV.dtype.element_ty), mask=io_mask)
        tl.store(dq_ptrs + C, dk.to(DQKV.dtype.element_ty), mask=io_mask)
        tl.store(dq_ptrs + 2 * C, dv.to(DQKV.dtype.element_ty), mask=io_mask)

    tl.store(DTAU_PARTIAL + prog * H + h, tl.reduce(dtau_acc, 0, tl.standard._sum_combine))
    a = tl.arange(0, BLOCK_A)
    db_ptrs = DBIAS_PARTIAL + (prog * H + h) * A * A + a[:, None] * A + a[None, :]
    tl.store(db_ptrs, db_acc, mask=(a < A)[:, None] & (a < A)[None, :])


# --- launchers ------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _alloc(shape, dtype, device) -> torch.Tensor:
    return alloc(shape, dtype, device, POISON_OUTPUTS)


def _plan(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid: List[int], window: List[int],
          shift: List[int], num_heads: int) -> dict:
    """Check the inputs and choose the tiling; raises ValueError with what is wrong."""
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"qkv must be [B, T*F, 3*C], got {tuple(qkv.shape)}")
    B, L, C3 = qkv.shape
    C = C3 // 3
    T, F = (int(x) for x in grid)
    wt, wf = (int(x) for x in window)
    st, sf = (int(x) for x in shift)
    if C % num_heads:
        raise ValueError(f"C = {C} is not divisible by num_heads = {num_heads}")
    D = C // num_heads
    A = wt * wf
    # what no backend computes (the public op checks it too), then this kernel's own limits
    problems = window_attention_problems(qkv, tau, bias, grid, window, shift, num_heads)
    if A > MAX_WINDOW_AREA:
        problems.append(f"window area {A} > {MAX_WINDOW_AREA}")
    if D > MAX_HEAD_DIM:
        problems.append(f"head_dim {D} > {MAX_HEAD_DIM}")
    if qkv.dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {qkv.dtype} is not one of {SUPPORTED_DTYPES}")
    if problems:
        raise ValueError("window_attention: " + "; ".join(problems))
    block_d = max(16, _next_pow2(D))
    # Triton's interpreter multiplies bfloat16 blocks as raw integers: there the products take the
    # operands rounded to the input dtype and widened back to float32, which is the same arithmetic.
    # On Hopper GPUs, 16-bit tiles of 64 rows (windows of more than 32 tokens) would compile to wgmma,
    # which faults with an illegal memory access there (Triton 3.6 on an H100, 8 x 8 windows): those
    # take float32 products too, the arithmetic of the interpreter's path, on FMA units.
    dot_fp32 = qkv.dtype == torch.float32 or _interpreting() or (A > 32 and _wgmma_device(qkv.device))
    n_windows = B * (T // wt) * (F // wf)
    # The cosines are computed to float32 accuracy whatever the input dtype: 1/tau (up to 100)
    # magnifies their rounding, and tau's gradient, a sum with cancellations, is the first to show it.
    # On GPUs, half-precision inputs get three tf32 tensor-core passes (tf32x3) for it.
    cos_precision = "ieee" if dot_fp32 else "tf32x3"
    meta = dict(T=T, F=F, WT=wt, WF=wf, ST=st, SF=sf, C=C, D=D, BLOCK_D=block_d, DOT_FP32=dot_fp32,
                DOT_PRECISION="ieee" if dot_fp32 else "tf32", COS_PRECISION=cos_precision)
    launches = {}
    for direction in ("fwd", "bwd"):
        block_m, num_warps, gpp = _tile(A, block_d, dot_fp32, direction == "bwd")
        heads_fast = True
        override = TUNING.get(direction)
        if override:
            block_m = max(int(override.get("block_m", block_m)), _next_pow2(A), 16)
            num_warps = int(override.get("num_warps", num_warps))
            heads_fast = bool(override.get("heads_fast", heads_fast))
            gpp = max(1, int(override.get("groups_per_program", gpp)))
        wpb = block_m // A
        groups = triton.cdiv(n_windows, wpb)  # window groups of WPB windows
        programs = triton.cdiv(groups, gpp)  # per head, each taking GPP groups
        launches[direction] = dict(programs=(programs * num_heads,), groups=programs, num_warps=num_warps,
                                   meta=dict(meta, BLOCK_M=block_m, WPB=wpb, HEADS_FAST=heads_fast, GPP=gpp))
    bwd = launches["bwd"]["meta"]
    # the bias-gradient tile: the whole tile (one window), one window (A a power of two), or one-hot
    bwd["BLOCK_A"] = (bwd["BLOCK_M"] if bwd["WPB"] == 1 else A if bwd["WPB"] * A == bwd["BLOCK_M"]
                      else max(16, _next_pow2(A)))
    return dict(n_windows=n_windows, A=A, C=C, **launches)


_WGMMA: dict = {}  # CUDA device index -> whether it has wgmma (compute capability 9.x)


def _wgmma_device(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _WGMMA:
        _WGMMA[index] = torch.cuda.get_device_capability(index)[0] == 9
    return _WGMMA[index]


def _tile(area: int, block_d: int, fp32: bool, backward: bool) -> Tuple[int, int, int]:
    """(BLOCK_M, num_warps, GPP): rows of packed windows per program, warps, window groups per program.

    16-bit inputs: one window per program with as few warps as keep the tiles in registers. For
    16-token windows and heads up to 32 wide that is one warp looping over 4 windows, loading the next
    window while the current one computes: on an H100 (``benchmarks/tune.py``, the paper's layer at
    batch 256, bf16, head_dim 32) the fastest tiling of the sweep in both directions, forward 0.214 ms
    and backward 0.502 ms against 0.291 ms and 0.980 ms with 2 warps and one window per program.
    Packed windows waste most of a block-diagonal score tile while more warps per tile add layout
    shuffles (``python -m benchmarks.aot`` counts registers, spills and instructions without a GPU).
    Float32 products (float32 inputs, and 16-bit windows of more than 32 tokens on Hopper) hold more
    registers: packed tiles, more warps, and with 8 x 8 windows (64 rows at least) some spills remain.
    """
    if fp32:
        rows = 16 if (block_d > 64 and not backward) else 32
    else:
        rows = 16
    block_m = max(16, _next_pow2(area), rows)
    work = block_m * max(block_m, block_d)  # elements of the largest tile
    gpp = 1
    if not fp32:
        if block_m == 16 and block_d <= 32:
            num_warps, gpp = 1, 4
        elif block_m <= 32 and block_d <= 64:
            num_warps = 2
        elif backward and block_m >= 64 and block_d > 64:  # 8 x 8 windows, wide heads: fewer spills
            num_warps = 8
        else:
            num_warps = 4
    elif work <= 1024:
        num_warps = 4
    else:
        num_warps = 16 if (backward and block_m <= 32 and block_d > 64) else 8
    return block_m, num_warps, gpp


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@triton_op("audiomae::window_attention_fwd", mutates_args=())
def _window_attention_fwd(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid: List[int],
                          window: List[int], shift: List[int], num_heads: int) -> torch.Tensor:
    plan = _plan(qkv, tau, bias, grid, window, shift, num_heads)
    qkv, tau, bias = _last_dim_contiguous(qkv), tau.contiguous(), bias.contiguous()
    B, L, _ = qkv.shape
    out = _alloc((B, L, plan["C"]), qkv.dtype, qkv.device)
    kernel = _launcher(_window_attention_fwd_kernel)
    launch = plan["fwd"]
    kernel[launch["programs"]](
        qkv, tau, bias, out, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        plan["n_windows"], num_heads, launch["groups"], **launch["meta"], num_warps=launch["num_warps"])
    return out


@triton_op("audiomae::window_attention_bwd", mutates_args=())
def _window_attention_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor,
                          grid: List[int], window: List[int], shift: List[int],
                          num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(qkv, tau, bias, grid, window, shift, num_heads)
    qkv, tau, bias = _last_dim_contiguous(qkv), tau.contiguous(), bias.contiguous()
    grad_out = _last_dim_contiguous(grad_out)
    A, launch = plan["A"], plan["bwd"]
    groups = launch["groups"]
    grad_qkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    dtau_partial = _alloc((groups, num_heads), torch.float32, qkv.device)
    dbias_partial = _alloc((groups, num_heads, A, A), torch.float32, qkv.device)
    kernel = _launcher(_window_attention_bwd_kernel)
    kernel[launch["programs"]](
        qkv, tau, bias, grad_out, grad_qkv, dtau_partial, dbias_partial,
        qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1),
        grad_qkv.stride(0), grad_qkv.stride(1), plan["n_windows"], num_heads, groups,
        **launch["meta"], num_warps=launch["num_warps"])
    tau_c = tau.clamp(min=0.01).float()
    grad_tau = torch.where(tau >= 0.01, -dtau_partial.sum(0) / (tau_c * tau_c), 0.0).to(tau.dtype)
    grad_bias = dbias_partial.sum(0).to(bias.dtype)
    return grad_qkv, grad_tau, grad_bias


# Shapes only, for tracing (torch.compile still sees the kernels: triton_op decomposes the op
# into them when it lowers the graph).
@_window_attention_fwd.register_fake
def _window_attention_fwd_fake(qkv, tau, bias, grid, window, shift, num_heads):
    plan = _plan(qkv, tau, bias, grid, window, shift, num_heads)
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], plan["C"])


@_window_attention_bwd.register_fake
def _window_attention_bwd_fake(grad_out, qkv, tau, bias, grid, window, shift, num_heads):
    _plan(qkv, tau, bias, grid, window, shift, num_heads)
    return qkv.new_empty(qkv.shape), tau.new_empty(tau.shape), bias.new_empty(bias.shape)  # contiguous, as the kernel's


def _setup_context(ctx, inputs, output):
    qkv, tau, bias, grid, window, shift, num_heads = inputs
    ctx.save_for_backward(qkv, tau, bias)
    ctx.geometry = (grid, window, shift, num_heads)


def _backward(ctx, grad_out):
    qkv, tau, bias = ctx.saved_tensors
    grad_qkv, grad_tau, grad_bias = torch.ops.audiomae.window_attention_bwd(grad_out, qkv, tau, bias, *ctx.geometry)
    need = ctx.needs_input_grad
    return (grad_qkv if need[0] else None, grad_tau if need[1] else None, grad_bias if need[2] else None,
            None, None, None, None)


# Only when some input requires grad does the forward save anything (qkv, tau and bias themselves).
_window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- public function ------------------------------------------------------------------------------
def window_attention(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor, grid, window, shift,
                     num_heads: int) -> torch.Tensor:
    """Fused shifted-window cosine attention (Triton), differentiable in qkv, tau and bias.

    Args:
        qkv: ``[B, T * F, 3 * C]`` in token order (time-major), channels ``(3, heads, head_dim)``;
            float32, bfloat16 or float16; head_dim <= 128.
        tau: ``[heads]`` temperatures (logits are divided by ``max(tau, 0.01)``).
        bias: ``[heads, A, A]`` position bias, ``A = window[0] * window[1] <= 64``.
        grid, window, shift: (time, frequency) in patches, window and shift already clamped
            (:func:`audiomae.reference.window_geometry`).
        num_heads: number of heads.
    Returns:
        ``[B, T * F, C]`` in token order, dtype of ``qkv``.

    Example::

        >>> qkv = torch.randn(2, 64 * 8, 3 * 512, device="cuda", dtype=torch.bfloat16)
        >>> tau, bias = torch.ones(16, device="cuda"), torch.zeros(16, 16, 16, device="cuda")
        >>> out = window_attention(qkv, tau, bias, (64, 8), (4, 4), (2, 0), 16)   # [2, 512, 512]
    """
    return torch.ops.audiomae.window_attention_fwd(qkv, tau, bias, [int(x) for x in grid], [int(x) for x in window],
                                                   [int(x) for x in shift], int(num_heads))
