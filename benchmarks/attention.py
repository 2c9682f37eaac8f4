"""Shifted-window cosine attention: the variants one could use for the decoder, side by side.

Shape: the paper's local decoder layer, a 64 x 8 token grid, 4 x 4 windows, shift (2, 0) (odd
layers) and (0, 0) (even layers), 16 heads of 32 channels. Every variant computes
``window_attention_reference(qkv, tau, bias, grid, window, shift, num_heads)``: ``qkv`` is
``[B, 512, 1536]`` in token order, the output ``[B, 512, 512]``.

Adding a variant: write a function with that signature and register it::

    from benchmarks.attention import variant

    @variant("my variant", available=lambda device: None if device.type == "cuda" else "needs CUDA")
    def my_variant(qkv, tau, bias, grid, window, shift, num_heads):
        ...
        return out  # [B, T * F, C], token order

Its output (and, for the backward pass, its gradients of qkv, tau and bias) is checked against the
float64 reference before it is timed; a variant that is wrong is reported and not timed.

Bytes moved per call (the least traffic the op needs, what a fused kernel should approach; tau
and the bias, a few KB, are not counted), with ``u = B * L * C * itemsize``:
forward reads qkv (3u) and writes out (u): 4u; forward + backward adds a backward pass that reads
qkv (3u) and grad_out (u) and writes grad_qkv (3u): 11u in all.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from audiomae import dispatch, ops
from audiomae.reference import shift_mask, window_attention_reference

from .harness import (Context, Result, close_enough, dtype_name, environ, error_note, free_memory, plot_sweep,
                      rotation_count, time_fn)

SECTION = "attention"
GRID = (64, 8)
WINDOW = (4, 4)
SHIFTS = ((2, 0), (0, 0))
HEADS = 16
HEAD_DIM = 32
# Correctness bound before timing: relative error <= 2 x PyTorch's own error in the dtype + a floor
# of about one unit in the last place of the dtype (a variant that scales q by 1/tau before the
# product, or reduces in another order, rounds differently; a wrong mask or shift is off by 0.1-1).
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    fn: Callable  # (qkv, tau, bias, grid, window, shift, num_heads) -> out
    available: Callable[[torch.device], Optional[str]]  # why it cannot run on this device (None: it can)
    reference: bool = False


VARIANTS: Dict[str, Variant] = {}


def selects(selected: Sequence[str], name: str) -> bool:
    """Whether ``--variants`` picks the variant ``name``: one of its entries is the name or a part of it
    (case-insensitive), so that ``cuda`` picks both CUDA rows and no entry needs quotes."""
    return any(s.strip() and s.strip().lower() in name.lower() for s in selected)


def variant(name: str, available: Optional[Callable[[torch.device], Optional[str]]] = None,
            reference: bool = False):
    """Register ``fn`` as window-attention variant ``name`` (decorator)."""

    def register(fn: Callable) -> Callable:
        VARIANTS[name] = Variant(name, fn, available or (lambda device: None), reference)
        return fn

    return register


# ----------------------------------------------------------------------------------------------
# shared pieces: window partition in plain PyTorch
# ----------------------------------------------------------------------------------------------
def partition(qkv: torch.Tensor, grid, window, shift, num_heads):
    """``[B, T*F, 3C]`` -> q, k, v each ``[B, nW, H, A, hd]`` (rolled by -shift, windows row-major)."""
    B, L, C3 = qkv.shape
    (T, Fq), (wt, wf), (st, sf) = grid, window, shift
    hd = C3 // 3 // num_heads
    x = qkv.view(B, T, Fq, C3)
    if st or sf:
        x = torch.roll(x, shifts=(-st, -sf), dims=(1, 2))
    nt, nf = T // wt, Fq // wf
    x = x.view(B, nt, wt, nf, wf, 3, num_heads, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
    return x.reshape(3, B, nt * nf, num_heads, wt * wf, hd).unbind(0)


def unpartition(out: torch.Tensor, grid, window, shift) -> torch.Tensor:
    """Inverse of :func:`partition` for the output: ``[B, nW, H, A, hd]`` -> ``[B, T*F, H*hd]``."""
    B, nW, H, A, hd = out.shape
    (T, Fq), (wt, wf), (st, sf) = grid, window, shift
    nt, nf = T // wt, Fq // wf
    x = out.view(B, nt, nf, H, wt, wf, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, T, Fq, H * hd)
    if st or sf:
        x = torch.roll(x, shifts=(st, sf), dims=(1, 2))
    return x.reshape(B, T * Fq, H * hd)


def cosine_qk(q: torch.Tensor, k: torch.Tensor, tau: torch.Tensor):
    """q and k normalised, q scaled by ``1 / max(tau, 0.01)``: then ``q . k`` is the cosine logit."""
    scale = (1.0 / tau.clamp(min=0.01)).to(q.dtype).view(1, 1, -1, 1, 1)
    return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)


def additive_mask(bias: torch.Tensor, grid, window, shift, dtype: torch.dtype) -> torch.Tensor:
    """``[nW, H, A, A]``: the position bias plus the shifted-window mask (0 / -100) of each window."""
    nW = (grid[0] // window[0]) * (grid[1] // window[1])
    H, A, _ = bias.shape
    if shift[0] or shift[1]:
        m = shift_mask(grid, window, shift, bias.device).to(dtype)
        return bias.to(dtype).unsqueeze(0) + m.unsqueeze(1)
    return bias.to(dtype).unsqueeze(0).expand(nW, H, A, A)


# ----------------------------------------------------------------------------------------------
# the variants
# ----------------------------------------------------------------------------------------------
@variant("eager reference", reference=True)
def eager_reference(qkv, tau, bias, grid, window, shift, num_heads):
    """The release's computation (roll, partition, cosine logits, bias, mask, softmax)."""
    return window_attention_reference(qkv, tau, bias, grid, window, shift, num_heads)


@variant("sdpa")
def sdpa(qkv, tau, bias, grid, window, shift, num_heads):
    """``F.scaled_dot_product_attention`` over the windows (windows x heads as the head axis), the
    bias and shift mask as a float ``attn_mask`` broadcast over the batch, ``scale=1``."""
    q, k, v = partition(qkv, grid, window, shift, num_heads)
    q, k = cosine_qk(q, k, tau)
    B, nW, H, A, hd = q.shape
    mask = additive_mask(bias, grid, window, shift, q.dtype).reshape(1, nW * H, A, A)
    out = F.scaled_dot_product_attention(q.reshape(B, nW * H, A, hd), k.reshape(B, nW * H, A, hd),
                                         v.reshape(B, nW * H, A, hd), attn_mask=mask, scale=1.0)
    return unpartition(out.view(B, nW, H, A, hd), grid, window, shift)


def _flex_available(device: torch.device) -> Optional[str]:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as e:
        return f"torch.nn.attention.flex_attention not importable ({type(e).__name__}: {e})"
    return None


@functools.lru_cache(maxsize=None)
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    # the sweep changes dtype, batch, grad mode and shift: allow the recompilations that takes
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=16)
def _flex_block_mask(length: int, area: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_window(b, h, q_idx, kv_idx):
        return (q_idx // area) == (kv_idx // area)

    return create_block_mask(same_window, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


@variant("flex_attention (compiled)", available=_flex_available)
def flex(qkv, tau, bias, grid, window, shift, num_heads):
    """FlexAttention on the window-ordered sequence: a block mask keeps each query inside its window,
    a ``score_mod`` adds the bias and shift mask; ``torch.compile``'d."""
    q, k, v = partition(qkv, grid, window, shift, num_heads)
    q, k = cosine_qk(q, k, tau)
    B, nW, H, A, hd = q.shape
    mod = additive_mask(bias, grid, window, shift, torch.float32).contiguous()  # scores are float32

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + mod[q_idx // A, h, q_idx % A, kv_idx % A]

    def seq(t):  # [B, nW, H, A, hd] -> [B, H, nW * A, hd]
        return t.permute(0, 2, 1, 3, 4).reshape(B, H, nW * A, hd)

    out = _flex_compiled()(seq(q), seq(k), seq(v), score_mod=add_bias,
                           block_mask=_flex_block_mask(nW * A, A, qkv.device), scale=1.0)
    return unpartition(out.view(B, H, nW, A, hd).permute(0, 2, 1, 3, 4), grid, window, shift)


def _xformers_available(device: torch.device) -> Optional[str]:
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:
        return f"xformers not importable ({type(e).__name__})"
    return None if device.type == "cuda" else "xformers memory_efficient_attention needs CUDA"


@variant("xformers", available=_xformers_available)
def xformers_mea(qkv, tau, bias, grid, window, shift, num_heads):
    """xformers ``memory_efficient_attention`` with the bias and shift mask as a tensor ``attn_bias``."""
    import xformers.ops as xops

    q, k, v = partition(qkv, grid, window, shift, num_heads)
    q, k = cosine_qk(q, k, tau)
    B, nW, H, A, hd = q.shape

    def bmhk(t):  # [B, nW, H, A, hd] -> [B, A, nW * H, hd]
        return t.permute(0, 3, 1, 2, 4).reshape(B, A, nW * H, hd)

    mask = additive_mask(bias, grid, window, shift, q.dtype).reshape(1, nW * H, A, A).expand(B, -1, -1, -1)
    out = xops.memory_efficient_attention(bmhk(q), bmhk(k), bmhk(v), attn_bias=mask, scale=1.0)
    return unpartition(out.view(B, A, nW, H, hd).permute(0, 2, 3, 1, 4), grid, window, shift)


def _backend_available(backend: str) -> Callable[[torch.device], Optional[str]]:
    def why_not(device: torch.device) -> Optional[str]:
        qkv = torch.empty(1, GRID[0] * GRID[1], 3 * HEADS * HEAD_DIM, device=device, dtype=torch.bfloat16)
        tau = torch.ones(HEADS, device=device, dtype=torch.bfloat16)
        bias = torch.zeros(HEADS, 16, 16, device=device, dtype=torch.bfloat16)
        reasons = dispatch.reasons("window_attention", qkv, tau, bias, GRID, WINDOW, SHIFTS[0], HEADS)[backend]
        return "; ".join(reasons) or None

    return why_not


@variant("triton (audiomae)", available=_backend_available("triton"))
def ours_triton(qkv, tau, bias, grid, window, shift, num_heads):
    """The package's fused Triton kernels, through the public op."""
    with dispatch.use_backend("triton", op="window_attention"):
        return ops.window_attention(qkv, tau, bias, grid, window, shift, num_heads)


def _cuda_kernels(kind: str):
    """Runs the CUDA op's ``kind`` kernels (``AUDIOMAE_CUDA_WA_KERNEL``, read at each launch)."""
    from audiomae import ops_cuda

    return environ(**{ops_cuda.KERNEL_ENV: kind})


class _CudaKernels(torch.autograd.Function):
    """The CUDA op's forward and backward, both with the kernels named: the register kernels (``mma``,
    what the dispatch layer runs for this shape) or the shared-memory ones (``smem``). The backward
    runs after the variant returns, so the choice travels with the graph."""

    @staticmethod
    def forward(ctx, kind, qkv, tau, bias, geometry):
        ctx.kind, ctx.geometry = kind, geometry
        ctx.save_for_backward(qkv, tau, bias)
        with _cuda_kernels(kind):
            return torch.ops.audiomae.window_attention_cuda_fwd(qkv, tau, bias, *geometry)

    @staticmethod
    def backward(ctx, grad_out):
        qkv, tau, bias = ctx.saved_tensors
        with _cuda_kernels(ctx.kind):
            grads = torch.ops.audiomae.window_attention_cuda_bwd(grad_out, qkv, tau, bias, *ctx.geometry)
        return (None, *grads, None)


def _cuda_kernels_available(kind: str) -> Callable[[torch.device], Optional[str]]:
    backend = _backend_available("cuda")

    def why_not(device: torch.device) -> Optional[str]:
        why = backend(device)
        if why is None and kind == "mma" and torch.cuda.get_device_capability(device)[0] < 8:
            why = "the register kernels need an sm_80 or newer GPU"
        return why

    return why_not


def _with_cuda_kernels(kind: str) -> Callable:
    def run(qkv, tau, bias, grid, window, shift, num_heads):
        from audiomae import ops_cuda

        ops_cuda._ops()  # registers the custom ops
        geometry = ([int(x) for x in grid], [int(x) for x in window], [int(x) for x in shift], int(num_heads))
        return _CudaKernels.apply(kind, qkv, tau, bias, geometry)

    run.__doc__ = f"The CUDA op with AUDIOMAE_CUDA_WA_KERNEL={kind} in both directions."
    return run


variant("cuda mma (audiomae)", available=_cuda_kernels_available("mma"))(_with_cuda_kernels("mma"))
variant("cuda smem (audiomae)", available=_cuda_kernels_available("smem"))(_with_cuda_kernels("smem"))


# ----------------------------------------------------------------------------------------------
# accounting, inputs, checks
# ----------------------------------------------------------------------------------------------
def bytes_moved(batch: int, dtype: torch.dtype, backward: bool, grid=GRID, heads=HEADS, head_dim=HEAD_DIM) -> int:
    """Least memory traffic per call (see the module docstring): 4u forward, 11u forward + backward."""
    u = batch * grid[0] * grid[1] * heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return (11 if backward else 4) * u


def make_inputs(batch: int, dtype: torch.dtype, device, seed: int = 0, requires_grad: bool = False):
    """(qkv, tau, bias, grad_out) in ``dtype``: qkv ~ N(0, 1), tau in [0.05, 1.5], bias ~ 2 N(0, 1)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # generated where they are used: fast at batch 256
    C, A = HEADS * HEAD_DIM, WINDOW[0] * WINDOW[1]
    L = GRID[0] * GRID[1]

    def rand(*shape, normal=True):
        fn = torch.randn if normal else torch.rand
        return fn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    qkv = rand(batch, L, 3 * C)
    tau = (0.05 + 1.45 * rand(HEADS, normal=False).float()).to(dtype)
    bias = 2.0 * rand(HEADS, A, A)
    grad = rand(batch, L, C)
    leaves = [t.requires_grad_(requires_grad) for t in (qkv, tau, bias)]
    return (*leaves, grad)


def _run(fn, leaves, grad_out, shift, backward: bool) -> List[torch.Tensor]:
    x = [t.detach().requires_grad_(backward) for t in leaves]
    out = fn(*x, GRID, WINDOW, shift, HEADS)
    if not backward:
        return [out.detach()]
    try:
        grads = torch.autograd.grad(out, x, grad_out)
    except Exception as e:
        raise _BackwardFailed(e) from e
    return [out.detach()] + [g.detach() for g in grads]


class _BackwardFailed(RuntimeError):
    """The gradients of a variant's output could not be taken (e.g. an input it does not use)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def check_variant(v: Variant, batch: int, dtype: torch.dtype, shift, device, backward: bool) -> Tuple[bool, str]:
    """Output (and gradients) of ``v`` against the float64 reference; (ok, description)."""
    qkv, tau, bias, grad = make_inputs(batch, dtype, device, seed=1234)
    exact = _run(window_attention_reference, [t.double() for t in (qkv, tau, bias)], grad.double(), shift, backward)
    own = _run(window_attention_reference, [qkv, tau, bias], grad, shift, backward)
    try:
        got = _run(v.fn, [qkv, tau, bias], grad, shift, backward)
    except _BackwardFailed as e:  # the variant ran; its gradients could not be taken
        return False, error_note(e.cause, "no gradients of its output: ")
    except Exception as e:  # a variant that cannot run these inputs is reported, not fatal
        return False, error_note(e, "raised ")
    names = ("out", "grad_qkv", "grad_tau", "grad_bias")
    worst = []
    for name, g, r, o in zip(names, got, exact, own):
        if g.dtype != o.dtype:  # timed as a row of this dtype, so it must compute in it
            return False, f"{name} is {g.dtype}, not {o.dtype} as for {o.dtype} inputs"
        ok, err, bound = close_enough(g, r, o, FLOOR[dtype])
        worst.append(f"{name} {err:.2g}")
        if not ok:
            return False, f"wrong {name}: relative error {err:.3g} > bound {bound:.3g}"
    return True, ", ".join(worst)


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------
def sweep_config(ctx: Context) -> Tuple[Sequence[int], Sequence[torch.dtype], Sequence[Tuple[int, int]]]:
    opts = ctx.options
    if ctx.device.type == "cuda":
        batches, dtypes = (32, 64, 128, 256), ("bf16", "fp16")
    else:
        batches, dtypes = ((1, 4) if ctx.quick else (1, 2, 4, 8)), ("fp32", "bf16")
    batches = opts.get("attention_batches") or batches
    dtypes = opts.get("attention_dtypes") or dtypes
    return tuple(batches), tuple(DTYPES[d] for d in dtypes), SHIFTS


def run(ctx: Context) -> None:
    report, device = ctx.report, ctx.device
    batches, dtypes, shifts = sweep_config(ctx)
    report.describe(SECTION, (
        "Forward (`fwd`) and forward + backward (`fwd+bwd`, gradients of qkv, tau and bias) per call. "
        "`MB moved` and `GB/s` count the least traffic the op needs (fwd: read qkv and write out, 4 x B x L x C "
        "elements; fwd+bwd: 11 x B x L x C); `% BW` is that rate over the copy bandwidth measured in this run. Every "
        "variant is checked against the float64 reference before it is timed."),
        grid=GRID, window=WINDOW, heads=HEADS, head_dim=HEAD_DIM, tokens=GRID[0] * GRID[1],
        qkv_shape="[B, 512, 1536]", out_shape="[B, 512, 512]")
    peak_bw = ctx.bandwidth_gbps()
    variants = []
    for v in VARIANTS.values():
        why = v.available(device)
        if why:
            report.note(SECTION, f"{v.name}: not run ({why})")
        else:
            variants.append(v)
    selected = ctx.options.get("attention_variants")
    if selected:
        variants = [v for v in variants if v.reference or selects(selected, v.name)]
        unmatched = [e for e in selected if not any(selects([e], v.name) for v in VARIANTS.values())]
        if unmatched:
            report.note(SECTION, f"--variants {', '.join(unmatched)}: no registered variant has such a name "
                                 f"(python -m benchmarks.run --list-variants)")
    targs = ctx.timing_args()
    skipped = 0
    check_batches = sorted({min(batches), max(batches)})
    for dtype in dtypes:
        # correctness first, at the smallest and the largest batch of the sweep; a variant not
        # checked (time budget) is not timed and counts as skipped
        usable = {}
        for shift in shifts:
            for v in variants:
                for backward in (False, True):
                    key = (v.name, tuple(shift), backward)
                    for b in check_batches:
                        if ctx.budget.expired():
                            usable.pop(key, None)
                            break
                        ok, msg = check_variant(v, b, dtype, shift, device, backward)
                        usable[key] = ok
                        if not ok:
                            report.note(SECTION, f"{v.name}, {'fwd+bwd' if backward else 'fwd'}, "
                                                 f"{dtype_name(dtype)}, shift {shift}, batch {b}: not timed, {msg}")
                            break
                free_memory(device)
        unchecked = sum(1 for shift in shifts for v in variants for backward in (False, True)
                        if (v.name, tuple(shift), backward) not in usable)
        skipped += unchecked * len(batches)
        for batch in batches:
            sets = None
            for shift in shifts:
                for backward in (False, True):
                    for v in variants:
                        if not usable.get((v.name, tuple(shift), backward)):
                            continue
                        params = {"pass": "fwd+bwd" if backward else "fwd", "dtype": dtype_name(dtype),
                                  "shift": tuple(shift), "batch": batch}
                        if ctx.budget.expired():
                            skipped += 1
                            continue
                        if sets is None:  # the same inputs for every shift, pass and variant of this batch
                            nsets = rotation_count(bytes_moved(batch, dtype, True), device, most=3)
                            sets = [make_inputs(batch, dtype, device, seed=s) for s in range(nsets)]
                        report.add(_time_one(v, sets, shift, backward, device, targs, batch, dtype, peak_bw, params))
            del sets
            free_memory(device)
    if skipped:
        report.note(SECTION, f"time budget used up: {skipped} measurements not made")
    plot_dir = ctx.options.get("plot_dir")
    if plot_dir:
        path = plot(report.results, plot_dir, report.env.get("device"))
        if path:
            report.note(SECTION, f"plot: {os.path.basename(path)}")


def plot(results, out_dir: str, device_name: Optional[str]) -> Optional[str]:
    """``out_dir/attention.png``: time per call against batch size, one panel per pass, dtype and shift."""
    rows = [r for r in results if r.section == SECTION]
    return plot_sweep(rows, os.path.join(out_dir, "attention.png"), x="batch", panels=("pass", "dtype", "shift"),
                      title=f"Shifted-window cosine attention, grid {GRID[0]}x{GRID[1]}, window "
                            f"{WINDOW[0]}x{WINDOW[1]}, {HEADS} heads x {HEAD_DIM} ({device_name})")


def _time_one(v: Variant, sets, shift, backward: bool, device, targs, batch, dtype, peak_bw, params) -> Result:
    def fwd(qkv, tau, bias, grad):
        with torch.no_grad():
            v.fn(qkv, tau, bias, GRID, WINDOW, shift, HEADS)

    def fwd_bwd(qkv, tau, bias, grad):
        out = v.fn(qkv, tau, bias, GRID, WINDOW, shift, HEADS)
        torch.autograd.grad(out, (qkv, tau, bias), grad)

    leaves = [(*(t.detach().requires_grad_(backward) for t in s[:3]), s[3]) for s in sets]
    try:
        t = time_fn(fwd_bwd if backward else fwd, leaves, device, **targs)
    except Exception as e:
        note = error_note(e)
        free_memory(device)
        return Result(SECTION, v.name, params, None, note=note, reference=v.reference)
    nbytes = bytes_moved(batch, dtype, backward)
    gbps = nbytes / (t.median_ms * 1e-3) / 1e9
    metrics = {"MB moved": nbytes / 1e6, "GB/s": gbps, "% BW": 100.0 * gbps / peak_bw if peak_bw else None}
    return Result(SECTION, v.name, params, t, metrics, reference=v.reference)
