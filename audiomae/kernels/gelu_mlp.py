"""Transformer MLP ``fc2(gelu(fc1(x)))`` with the GELU in the epilogues of two Triton GEMMs.

In the eager block (and in the block ``torch.compile`` builds around cuBLAS) the hidden activation
of the MLP, 4x the width of the block, is written and read back by separate element-wise kernels:
the forward writes ``h = fc1(x)``, reads it for ``g = gelu(h)``; the backward writes
``dg = dy @ W2``, reads it and ``h`` for ``dh = dg * gelu'(h)``, and reads ``dh`` again for the
bias gradient. Here:

- forward: one GEMM computes ``h = x @ W1^T + b1`` and writes both ``h`` (kept for the backward)
  and ``g = gelu(h)`` from its accumulator; ``y = g @ W2^T + b2`` is cuBLAS (``torch.addmm``);
- backward: one GEMM computes ``dy @ W2``, multiplies it by ``gelu'(h)`` in its epilogue and
  writes ``dh``, plus one float32 column sum per row block for ``db1`` (summed afterwards in a
  fixed order: deterministic); the weight and input gradients are cuBLAS matmuls.

Either half can run on PyTorch's ops instead (``TUNING["fwd"]`` or ``TUNING["bwd"]`` set to
``"torch"``), for a GPU where the sweep of ``benchmarks.tune --only mlp`` finds cuBLAS plus a
separate GELU pass faster than the fused GEMM: the forward still keeps ``gelu(h)`` for ``fc2``'s
weight gradient, so the backward does not compute it again.

Rounding follows the eager computation in the input dtype: ``h`` is rounded to the dtype before
the GELU is applied, ``dy @ W2`` is rounded before it is multiplied by ``gelu'(h)``, and the GELU
and its derivative are PyTorch's exact (erf) forms, evaluated in float32. The result equals the
eager MLP up to the summation order of the matmuls. float32 inputs use full float32 products (no
tf32).

Layers: Triton kernels -> launchers (``torch.library`` custom ops) -> ``torch.autograd.Function``
-> :func:`gelu_mlp`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from torch.library import triton_op

from ._common import alloc, dot_precision, dot_upcast, interpreting as _interpreting, launcher as _launcher

POISON_OUTPUTS = False  # tests set this: output buffers start as NaN, so an unwritten element shows
# tests set this: the SM count that persistent tilings assume (None: the device's), so that small
# shapes give each persistent program several tiles on a GPU too
SMS = None

# Tiling override (tests, sweeps): {"fwd": (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages
# [, PREFETCH_H[, PERSISTENT]]), "bwd": (...)}; a missing key means the defaults of _tiling. The
# backward's optional 7th value (0 or 1, default 0; always 0 for the forward) loads its tile of h
# before the K loop instead of after it: the read overlaps the matmul, and the tile's registers stay
# taken meanwhile. The optional 8th (0, 1 or 2, default 0) launches that many persistent programs
# per SM, each looping over output tiles, instead of one program per tile. The value "torch"
# computes that half with PyTorch's ops instead of the Triton GEMM (cuBLAS, then PyTorch's GELU or
# GELU derivative): ``benchmarks.run --tuning`` sets it where the sweep measured PyTorch faster than
# every tiling.
TUNING: dict = {}


def _on_torch(which: str) -> bool:
    """Whether the ``fwd`` or ``bwd`` half runs on PyTorch's ops (``TUNING[which] == "torch"``)."""
    value = TUNING.get(which)
    if isinstance(value, str):
        if value != "torch":
            raise ValueError(f"gelu_mlp TUNING[{which!r}] = {value!r}: expected 'torch' or a tiling "
                             "(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, PREFETCH_H"
                             "[, PERSISTENT]])")
        return True
    return False


def _alloc(shape, dtype, device) -> torch.Tensor:
    return alloc(shape, dtype, device, POISON_OUTPUTS)


def _tiling(which: str, M: int, N: int, K: int, dtype: torch.dtype) -> Tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, PREFETCH_H, PERSISTENT) of the
    ``fwd`` or ``bwd`` kernel (PREFETCH_H is 0 for ``fwd``; PERSISTENT is the number of persistent
    programs per SM, 0 for one program per output tile).

    The 16-bit defaults are the widest tiles that compile for sm_90 without (fwd: with 24 bytes of)
    register spills (``python -m benchmarks.aot``); ``python -m benchmarks.tune --only mlp`` times
    the candidates on a GPU, and ``benchmarks.run --tuning`` applies the fastest."""
    if which in TUNING and not _on_torch(which):
        tiling = tuple(int(v) for v in TUNING[which])
        prefetch_ok = len(tiling) < 7 or tiling[6] == 0 or (which == "bwd" and tiling[6] == 1)
        if not (6 <= len(tiling) <= 8 and prefetch_ok and (len(tiling) < 8 or tiling[7] in (0, 1, 2))):
            raise ValueError(f"gelu_mlp TUNING[{which!r}] = {TUNING[which]!r}: expected 6 values "
                             "(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), optionally a 7th "
                             "(PREFETCH_H: 0, or 1 for 'bwd') and an 8th (PERSISTENT: 0, 1 or 2 programs "
                             "per SM), or 'torch'")
        return tiling + (0,) * (8 - len(tiling))
    if _interpreting():  # few, large tiles: the interpreter pays per operation, not per element
        return (min(64, triton.next_power_of_2(max(M, 16))), min(64, triton.next_power_of_2(max(N, 16))),
                min(64, triton.next_power_of_2(max(K, 16))), 4, 4, 1, 0, 0)
    if dtype == torch.float32:
        return 64, 64, 32, 8, 4, 3, 0, 0
    # 16-bit: the backward's epilogue also holds a tile of h, so its tiles are half as wide
    return (128, 256, 64, 8, 8, 3, 0, 0) if which == "fwd" else (128, 128, 64, 8, 8, 4, 0, 0)


def _programs(device: torch.device, per_sm: int, tiles: int) -> int:
    """Programs to launch for ``tiles`` output tiles: one per tile, or ``per_sm`` persistent
    programs per SM, at most one per tile. The SM count is ``SMS`` when set, else the CUDA device's,
    else 3 (CPU tensors: Triton's interpreter, or a launch captured for ahead-of-time compilation)."""
    if not per_sm:
        return tiles
    sms = SMS or (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3)
    return max(1, min(tiles, per_sm * sms))


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
# Accumulators start from tl.full, reductions use tl.reduce with Triton's own combine function, and
# the tile order and ceil-divisions are written out in each kernel: tl.zeros, tl.sum, tl.cdiv and any
# other @triton.jit helper keep the mode (GPU or interpreter) of the moment triton was first
# imported, while these work in both, whatever the environment was then.

# The constants are written as literals in the kernels (0.7071067811865476 = 1 / sqrt(2),
# 0.3989422804014327 = 1 / sqrt(2 pi), PyTorch's kAlpha), so that a copy of a kernel's source, as
# torch.compile makes of user-defined Triton kernels, needs no module globals.


@triton.jit
def _fc1_gelu_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, g_ptr,
    M, N, K,
    s_xm, s_xk, s_wn, s_wk, s_hm, s_hn, s_gm, s_gn,
    n_programs,
    HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr, EVEN_K: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """h = x @ w^T + b (x [M, K], w [N, K]); g = gelu(h) from h rounded to the output dtype.

    One output tile per program, or with PERSISTENT the tiles pid, pid + n_programs, ... of a
    persistent program, in one loop that Triton flattens and software-pipelines across tiles (so
    that a tile's epilogue can overlap the loads of the next)."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    if PERSISTENT:
        my_tiles = (num_m * num_n - pid + n_programs - 1) // n_programs
    else:  # a loop of one trip with constant bounds, which the compiler removes
        my_tiles = 1
    for i in tl.range(0, my_tiles, flatten=PERSISTENT):
        tile = pid + i * n_programs
        # tiles in groups of GROUP_M row blocks, so the programs running together share their B
        # tiles in L2 (inlined: a @triton.jit helper would be fixed to the mode of its first import)
        in_group = GROUP_M * num_n
        first_m = (tile // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % size_m
        pid_n = (tile % in_group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows and columns past the end wrap around for the loads (always in bounds, no masks in the
        # loop); the stores below are masked
        rows = offs_m % M
        cols = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + rows[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk
        b_ptrs = w_ptr + cols[None, :].to(tl.int64) * s_wn + offs_k[:, None] * s_wk
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)
                b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            a_ptrs += BLOCK_K * s_xk
            b_ptrs += BLOCK_K * s_wk
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        h = acc.to(g_ptr.dtype.element_ty)
        hf = h.to(tl.float32)
        g = hf * 0.5 * (1.0 + tl.math.erf(hf * 0.7071067811865476))
        store = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        m64 = offs_m[:, None].to(tl.int64)
        if WRITE_H:
            tl.store(h_ptr + m64 * s_hm + offs_n[None, :] * s_hn, h, mask=store)
        tl.store(g_ptr + m64 * s_gm + offs_n[None, :] * s_gn, g.to(g_ptr.dtype.element_ty), mask=store)


@triton.jit
def _dgelu_kernel(
    dy_ptr, w_ptr, h_ptr, dh_ptr, part_ptr,
    M, N, K,
    s_dm, s_dk, s_wk, s_wn, s_hm, s_hn, s_om, s_on, s_pm,
    n_programs,
    WRITE_PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH_H: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dh = round(dy @ w) * gelu'(h) (dy [M, K], w [K, N], h [M, N]); with WRITE_PARTIAL, the
    float32 column sums of dh over the tile's rows go to part[tile row, :]. Tiles per program as
    in _fc1_gelu_kernel."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    if PERSISTENT:
        my_tiles = (num_m * num_n - pid + n_programs - 1) // n_programs
    else:  # a loop of one trip with constant bounds, which the compiler removes
        my_tiles = 1
    for i in tl.range(0, my_tiles, flatten=PERSISTENT):
        tile = pid + i * n_programs
        # tiles in groups of GROUP_M row blocks, so the programs running together share their B
        # tiles in L2 (inlined: a @triton.jit helper would be fixed to the mode of its first import)
        in_group = GROUP_M * num_n
        first_m = (tile // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % size_m
        pid_n = (tile % in_group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_m % M
        cols = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = dy_ptr + rows[:, None].to(tl.int64) * s_dm + offs_k[None, :] * s_dk
        b_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * s_wk + cols[None, :] * s_wn
        # the tile of h: with PREFETCH_H loaded here, so that its read overlaps the matmul (rows and
        # columns past the end wrap around, like the operands', and are never stored), else after the
        # loop, with fewer registers taken during it
        if PREFETCH_H:
            h_tile = tl.load(h_ptr + rows[:, None].to(tl.int64) * s_hm + cols[None, :] * s_hn)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)
                b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            a_ptrs += BLOCK_K * s_dk
            b_ptrs += BLOCK_K * s_wk
        keep_m = offs_m < M
        store = keep_m[:, None] & (offs_n < N)[None, :]
        m64 = offs_m[:, None].to(tl.int64)
        if not PREFETCH_H:
            h_tile = tl.load(h_ptr + m64 * s_hm + offs_n[None, :] * s_hn, mask=store, other=0.0)
        hf = h_tile.to(tl.float32)
        dg = acc.to(dh_ptr.dtype.element_ty).to(tl.float32)  # the eager backward rounds dy @ W2 first
        cdf = 0.5 * (1.0 + tl.math.erf(hf * 0.7071067811865476))
        pdf = tl.exp(-0.5 * hf * hf) * 0.3989422804014327
        dh = (dg * (cdf + hf * pdf)).to(dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + m64 * s_om + offs_n[None, :] * s_on, dh, mask=store)
        if WRITE_PARTIAL:
            col = tl.reduce(tl.where(keep_m[:, None], dh.to(tl.float32), 0.0), 0, tl.standard._sum_combine)
            tl.store(part_ptr + pid_m.to(tl.int64) * s_pm + offs_n, col, mask=offs_n < N)


# ----------------------------------------------------------------------------------------------
# launchers (custom ops)
# ----------------------------------------------------------------------------------------------
@triton_op("audiomae::gelu_mlp_fc1", mutates_args=())
def gelu_mlp_fc1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 write_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K], ``weight`` [N, K], ``bias`` [N] or None, one dtype -> (``h = x @ weight^T + bias``,
    ``gelu(h)``), both [M, N] in that dtype; ``h`` is an empty tensor unless ``write_h``."""
    M, K = x.shape
    N = weight.shape[0]
    g = _alloc((M, N), x.dtype, x.device)
    h = _alloc((M, N), x.dtype, x.device) if write_h else x.new_empty((0, 0))
    if M == 0 or N == 0:
        return h, g
    if K == 0:  # an empty product: h is the bias
        h0 = (bias if bias is not None else x.new_zeros(N)).expand(M, N)
        return (h0.clone() if write_h else h), torch.nn.functional.gelu(h0.float()).to(x.dtype)
    bm, bn, bk, group, warps, stages, _, per_sm = _tiling("fwd", M, N, K, x.dtype)
    hs = h.stride() if write_h else (0, 0)
    programs = _programs(x.device, per_sm, triton.cdiv(M, bm) * triton.cdiv(N, bn))
    _launcher(_fc1_gelu_kernel)[(programs,)](
        x, weight, bias if bias is not None else weight, h, g,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), hs[0], hs[1], g.stride(0), g.stride(1),
        programs if per_sm else 0,  # unused with one program per tile: a constant
        HAS_BIAS=bias is not None, WRITE_H=bool(write_h), EVEN_K=K % bk == 0, PERSISTENT=bool(per_sm),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
        PREC=dot_precision(x.dtype), UPCAST=dot_upcast(x.dtype, _interpreting()), num_warps=warps, num_stages=stages,
    )
    return h, g


@triton_op("audiomae::gelu_mlp_dgelu", mutates_args=())
def gelu_mlp_dgelu(dy: torch.Tensor, weight: torch.Tensor, h: torch.Tensor,
                   write_partial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``dy`` [M, K] (gradient of ``fc2``'s output), ``weight`` [K, N] (``fc2.weight``), ``h`` [M, N]
    -> (``dh = (dy @ weight) * gelu'(h)`` [M, N] in ``h.dtype``, float32 column sums of ``dh`` per
    block of rows [row blocks, N], or an empty tensor unless ``write_partial``)."""
    M, K = dy.shape
    N = weight.shape[1]
    dh = _alloc((M, N), h.dtype, h.device)
    bm, bn, bk, group, warps, stages, prefetch, per_sm = _tiling("bwd", M, N, K, h.dtype)
    blocks_m = triton.cdiv(M, bm)
    part = _alloc((blocks_m, N), torch.float32, h.device) if write_partial else h.new_empty((0, 0), dtype=torch.float32)
    if M == 0 or N == 0:
        return dh, part
    if K == 0:  # an empty product: no gradient reaches h
        return dh.zero_(), (part.zero_() if write_partial else part)
    programs = _programs(h.device, per_sm, blocks_m * triton.cdiv(N, bn))
    _launcher(_dgelu_kernel)[(programs,)](
        dy, weight, h, dh, part,
        M, N, K,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
        dh.stride(0), dh.stride(1), part.stride(0) if write_partial else 0,
        programs if per_sm else 0,
        WRITE_PARTIAL=bool(write_partial), EVEN_K=K % bk == 0, PREFETCH_H=bool(prefetch), PERSISTENT=bool(per_sm),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
        PREC=dot_precision(h.dtype), UPCAST=dot_upcast(h.dtype, _interpreting()), num_warps=warps, num_stages=stages,
    )
    return dh, part


# Shapes only, for tracing (torch.compile still sees the kernels: triton_op decomposes the ops
# into them when it lowers the graph).
@gelu_mlp_fc1.register_fake
def _(x, weight, bias, write_h):
    g = x.new_empty((x.shape[0], weight.shape[0]))
    return (torch.empty_like(g) if write_h else x.new_empty((0, 0))), g


@gelu_mlp_dgelu.register_fake
def _(dy, weight, h, write_partial):
    bm = _tiling("bwd", dy.shape[0], weight.shape[1], dy.shape[1], h.dtype)[0]
    rows = (dy.shape[0] + bm - 1) // bm if write_partial else 0
    return (h.new_empty((dy.shape[0], weight.shape[1])),
            h.new_empty((rows, weight.shape[1] if write_partial else 0), dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class GeluMlpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, train):
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: D may be 0
        # h (the 4x-wide pre-activation) is kept only when a gradient will flow into fc1 or x
        need_h = bool(train) and any(ctx.needs_input_grad[:3])
        if _on_torch("fwd"):  # cuBLAS, then PyTorch's GELU (torch.compile fuses it as for nn.GELU)
            h = torch.nn.functional.linear(x2, w1, b1)
            g = torch.nn.functional.gelu(h)
            if not need_h:
                h = x2.new_empty((0, 0))
        else:
            h, g = gelu_mlp_fc1(x2, w1, b1, need_h)
        y = torch.addmm(b2, g, w2.t()) if b2 is not None else g @ w2.t()
        if train:
            ctx.save_for_backward(x2, w1, w2, h, g)
            ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, w1, w2, h, g = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(math.prod(dy.shape[:-1]), dy.shape[-1]).to(g.dtype)
        dx = dw1 = db1 = dw2 = db2 = None
        if need_w2:
            dw2 = dy2.t() @ g
        if need_b2:
            db2 = dy2.sum(0)
        if need_x or need_w1 or need_b1:
            if _on_torch("bwd"):  # cuBLAS, then PyTorch's GELU derivative and bias sum, as in eager
                dh = torch.ops.aten.gelu_backward(dy2 @ w2, h)
                if need_b1:
                    db1 = dh.sum(0)
            else:
                dh, part = gelu_mlp_dgelu(dy2, w2, h, bool(need_b1))
                if need_b1:
                    db1 = part.sum(0).to(dh.dtype)
            if need_x:
                dx = (dh @ w1).reshape(ctx.x_shape)
            if need_w1:
                dw1 = dh.t() @ x2
        return dx, dw1, db1, dw2, db2, None


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
             b2: Optional[torch.Tensor]) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` with the GELU fused into the GEMMs' epilogues (see the module docstring).

    Args:
        x: ``[..., D]`` float32 / bfloat16 / float16.
        w1: ``[H, D]`` (``fc1.weight``); ``b1``: ``[H]`` or None.
        w2: ``[E, H]`` (``fc2.weight``); ``b2``: ``[E]`` or None. All in ``x.dtype`` (under autocast,
            :func:`audiomae.ops.gelu_mlp` casts them first, as autocast does for ``nn.Linear``).

    Returns:
        ``[..., E]`` in ``x.dtype``: ``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)``; differentiable
        once (no double backward).
    """
    # under no_grad nothing is saved and h is not written, although the parameters require grad
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    # the kernel reads b1 as a dense vector: a strided or expanded bias is copied first
    b1 = b1.contiguous() if b1 is not None else None
    return GeluMlpFunction.apply(x, w1, b1, w2, b2, train)
