"""Tiling sweeps for the Triton kernels on a CUDA device.

    python -m benchmarks.tune [--out DIR] [--only attention|cuda|fbank|mlp] [--batch N]

For every candidate tiling the kernel's result is checked against the default tiling (attention)
or the float64 reference (fbank) before it is timed (CUDA-event median of ``do_bench``, several
input sets in rotation). Attention rows time the whole op (``ms``) and its kernel alone
(``kernel_ms``: the op's launch replayed, see :func:`benchmarks.aot.captured`). ``cuda`` times the
CUDA op's window-attention kernels (register and shared-memory sets, csrc/) through the extension's
launch functions, for several windows per warp (``AUDIOMAE_CUDA_WA_WINDOWS_PER_WARP``), each checked
against the Triton kernels first. ``fbank`` sweeps the Triton methods' tilings and the CUDA kernel's
launch shapes (``AUDIOMAE_CUDA_FBANK_WARPS`` x ``AUDIOMAE_CUDA_FBANK_FRAMES_PER_WARP``). ``mlp``
sweeps the fused MLP's two GEMM kernels (:mod:`audiomae.kernels.gelu_mlp`), each tiling checked
against PyTorch, next to PyTorch's own time for the same outputs (``benchmarks.run --tuning`` keeps
a half of the MLP on PyTorch's ops where that time beats every tiling). Prints one markdown table per
kernel, best first, and writes ``tune.json`` when ``--out`` is given. The defaults in
``audiomae/kernels`` and ``csrc/`` come from these sweeps, except the fused MLP's: no GPU sweep of
them is committed yet, and its defaults are the spill-free or nearly spill-free tilings of
``python -m benchmarks.aot``.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import time
from typing import Dict, List

import torch

from .harness import environ


def _median_ms(fn, sets: int) -> float:
    from triton.testing import do_bench

    state = {"i": 0}

    def call():
        fn(state["i"] % sets)
        state["i"] += 1

    return float(do_bench(call, warmup=25, rep=100, return_mode="median"))


# the paper's decoder layer: 64 x 8 tokens, 4 x 4 windows, 16 heads of 32
H, D, T, F, WINDOW = 16, 32, 64, 8, (4, 4)
C, A = H * D, WINDOW[0] * WINDOW[1]
SETS = 3  # input sets in rotation


def _attention_inputs(batch: int, dtype: torch.dtype):
    """SETS (qkv, grad_out) pairs on the GPU, and tau (above its clamp) and the bias, in ``dtype``."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkvs = [torch.randn(batch, T * F, 3 * C, device="cuda", dtype=dtype, generator=gen) for _ in range(SETS)]
    gouts = [torch.randn(batch, T * F, C, device="cuda", dtype=dtype, generator=gen) for _ in range(SETS)]
    tau = (torch.rand(H, device="cuda", generator=gen) * 0.2 + 0.02).to(dtype)
    bias = (torch.randn(H, A, A, device="cuda", generator=gen) * 2).to(dtype)
    return qkvs, gouts, tau, bias


def attention(batch: int, dtype: torch.dtype, shift=(2, 0), full: bool = False) -> List[Dict]:
    from audiomae.kernels import window_attention as wa

    from .aot import captured

    qkvs, gouts, tau, bias = _attention_inputs(batch, dtype)
    sets = SETS
    args = ([T, F], list(WINDOW), list(shift), H)
    fwd_op, bwd_op = torch.ops.audiomae.window_attention_fwd, torch.ops.audiomae.window_attention_bwd
    wa.TUNING.clear()
    want_o = fwd_op(qkvs[0], tau, bias, *args).float()
    want_g = bwd_op(gouts[0], qkvs[0], tau, bias, *args)[0].float()
    rows = []
    elt = qkvs[0].element_size()
    n_tok = batch * T * F
    # rows per program x warps x window groups per program (heads fastest: an H100 sweep of the grid
    # order found it as fast or faster in every tiling of the forward). The default grid leaves out 16
    # window groups per program, so that the sweep fits in the GPU suite's time; ``full`` sweeps it.
    rows_opts, groups_opts = (16, 32, 64), ((1, 4, 16) if full else (1, 4))
    for direction in ("fwd", "bwd"):
        for bm, nw, gpp in itertools.product(rows_opts, (1, 2, 4), groups_opts):
            hf = True
            wa.TUNING.clear()
            wa.TUNING[direction] = dict(block_m=bm, num_warps=nw, heads_fast=hf, groups_per_program=gpp)
            row = dict(kernel="attention", direction=direction, dtype=str(dtype).split(".")[-1], batch=batch,
                       shift=list(shift), block_m=bm, num_warps=nw, heads_fast=hf, groups_per_program=gpp)
            try:
                if direction == "fwd":
                    got = fwd_op(qkvs[0], tau, bias, *args).float()
                    err = (got - want_o).abs().max().item()
                    ms = _median_ms(lambda i: fwd_op(qkvs[i], tau, bias, *args), sets)
                    nbytes = n_tok * 4 * C * elt
                else:
                    got = bwd_op(gouts[0], qkvs[0], tau, bias, *args)[0].float()
                    err = (got - want_g).abs().max().item()
                    ms = _median_ms(lambda i: bwd_op(gouts[i], qkvs[i], tau, bias, *args), sets)
                    nbytes = n_tok * 7 * C * elt
                # the kernel alone: the op's launch replayed, without the op's other work (output
                # allocation, and for the backward the reductions of the tau and bias partial sums)
                with captured(wa) as launches:
                    if direction == "fwd":
                        fwd_op(qkvs[0], tau, bias, *args)
                    else:
                        bwd_op(gouts[0], qkvs[0], tau, bias, *args)
                fn, a, kw = launches[0]
                grid = launches.grids[0]
                kernel_ms = _median_ms(lambda i: fn[grid](*a, **kw), 1)
                row.update(max_diff_vs_default=err, ms=ms, gbps=nbytes / ms / 1e6, kernel_ms=kernel_ms,
                           kernel_gbps=nbytes / kernel_ms / 1e6)
            except Exception as e:  # a tiling that does not compile (registers, shared memory)
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    wa.TUNING.clear()
    return rows


def cuda_attention(batch: int, dtype: torch.dtype, shift=(2, 0)) -> List[Dict]:
    """The CUDA op's kernels, forward and backward, by kernel set and windows per warp (the binding's
    calls: the kernels, output allocation and, for the backward, nothing else; the partial sums'
    reduction is the custom op's, outside)."""
    from audiomae import cuda_ext, ops_cuda

    why = cuda_ext.why_not()
    if why:
        print("tune: the CUDA extension cannot be used here: " + "; ".join(why), flush=True)
        return []
    ext = cuda_ext.load()
    qkvs, gouts, tau, bias = _attention_inputs(batch, dtype)
    sets = SETS
    geometry = ([T, F], list(WINDOW), list(shift), H)
    fwd_op, bwd_op = torch.ops.audiomae.window_attention_fwd, torch.ops.audiomae.window_attention_bwd
    want_o = fwd_op(qkvs[0], tau, bias, *geometry).float()
    want_g = bwd_op(gouts[0], qkvs[0], tau, bias, *geometry)[0].float()
    tau_c, bias = tau.float(), bias.float()  # what the custom op passes to the extension
    stream = torch.cuda.current_stream().cuda_stream
    elt = qkvs[0].element_size()
    n_tok = batch * T * F
    rows = []
    for kind, direction, wpw in itertools.product(("mma", "smem"), ("fwd", "bwd"), (0, 1, 2, 4, 8, 16)):
        if kind == "smem" and direction == "fwd" and wpw:
            continue  # the shared-memory forward takes one window per warp
        row = dict(kernel="cuda attention", set=kind, direction=direction, dtype=str(dtype).split(".")[-1],
                   batch=batch, shift=list(shift), automatic=not wpw)
        env = {ops_cuda.KERNEL_ENV: kind, ops_cuda.WINDOWS_PER_WARP_ENV: str(wpw) if wpw else None}
        try:
            with environ(**env):
                row["windows_per_warp"] = ext.window_attention_plan(qkvs[0], tau_c, bias, *geometry,
                                                                    direction == "bwd")[2]
                if direction == "fwd":
                    call = lambda i: ext.window_attention_fwd(qkvs[i], tau_c, bias, *geometry, stream, False)  # noqa: E731
                    err = (call(0).float() - want_o).abs().max().item()
                    nbytes = n_tok * 4 * C * elt
                else:
                    call = lambda i: ext.window_attention_bwd(gouts[i], qkvs[i], tau_c, bias, *geometry, stream,  # noqa: E731
                                                              False)
                    err = (call(0)[0].float() - want_g).abs().max().item()
                    nbytes = n_tok * 7 * C * elt
                ms = _median_ms(call, sets)
            row.update(max_diff_vs_triton=err, ms=ms, gbps=nbytes / ms / 1e6)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def fbank(batch: int) -> List[Dict]:
    from audiomae.audio import DATASET_STATS, waveform_to_input
    from audiomae.kernels import fbank as fk

    sets = 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = torch.arange(160000, device="cuda", dtype=torch.float64) / 16000
    waves = []
    for _ in range(sets):
        f0 = torch.rand(batch, 1, device="cuda", generator=gen, dtype=torch.float64) * 2000 + 100
        w = 0.3 * torch.sin(2 * torch.pi * f0 * t * (1 + t / 20))
        w = w + 0.05 * torch.randn(batch, t.numel(), device="cuda", generator=gen, dtype=torch.float64)
        waves.append((w * 32768).round().clamp(-32768, 32767).div(32768).float())
    ref = waveform_to_input(waves[0].double(), target_length=1024, stats="audioset").float()
    rows = []
    # "fft": the precision is that of the mel projection only (power and filter weights are positive,
    # so tensor-core passes lose no cancelling digits there); the error column says what each costs
    configs = [dict(method="fft", block_t_frames=bf, block_t=bt, block_k=bk, num_warps=nw, precision=prec)
               for prec in ("ieee", "tf32x3", "tf32") for bf in (8, 16) for bt, bk in ((32, 64), (64, 64))
               for nw in (4, 8)]
    # "dft": the default precision, and tf32x3 (three tf32 passes) to measure what it costs in error
    configs += [dict(method="dft", block_t=bt, block_s=bs, block_k=bk, num_warps=nw, precision=prec)
                for prec in ("ieee", "tf32x3") for bt, bs, bk, nw in ((32, 32, 64, 4), (64, 16, 128, 8))]
    for cfg in configs:
        fk.TUNING.clear()
        fk.TUNING.update(cfg)
        row = dict(kernel="fbank", batch=batch, **cfg)
        try:
            got = fk.fbank_features(waves[0], 1024, "audioset")
            # log-domain error: the normalised input is (log - mean) / (2 std)
            err = ((got - ref).abs().max() * 2 * DATASET_STATS["audioset"].std).item()
            ms = _median_ms(lambda i: fk.fbank_features(waves[i], 1024, "audioset"), sets)
            row.update(max_log_err=err, ms=ms, clips_per_s=batch / ms * 1e3)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    fk.TUNING.clear()
    rows += cuda_fbank(waves, ref, batch)
    return rows


def cuda_fbank(waves: List[torch.Tensor], ref: torch.Tensor, batch: int) -> List[Dict]:
    """The CUDA fbank kernel's launch shapes: warps per block x frames per warp (the launch function
    reads them from the environment at each call)."""
    from audiomae import cuda_ext, ops_cuda
    from audiomae.audio import DATASET_STATS

    why = cuda_ext.why_not()
    if why:
        print(f"cuda fbank: not run ({'; '.join(why)})", flush=True)
        return []
    rows = []
    for warps, fpw in itertools.product((1, 2, 4), (1, 2, 4, 8, 16)):
        row = dict(kernel="fbank", batch=batch, method="cuda", num_warps=warps, frames_per_warp=fpw)
        with environ(**{ops_cuda.FBANK_WARPS_ENV: str(warps), ops_cuda.FBANK_FRAMES_PER_WARP_ENV: str(fpw)}):
            try:
                got = ops_cuda.fbank_features_cuda(waves[0], 1024, "audioset")
                err = ((got - ref).abs().max() * 2 * DATASET_STATS["audioset"].std).item()
                ms = _median_ms(lambda i: ops_cuda.fbank_features_cuda(waves[i], 1024, "audioset"), len(waves))
                row.update(max_log_err=err, ms=ms, clips_per_s=batch / ms * 1e3)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


MLP_TILINGS = {  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, PREFETCH_H, PERSISTENT)
    "fwd": [(128, 256, 64, 8, 8, 3, 0, 0), (128, 256, 64, 8, 8, 4, 0, 0), (256, 128, 64, 8, 8, 3, 0, 0),
            (128, 128, 64, 8, 8, 4, 0, 0), (128, 128, 64, 8, 8, 3, 0, 0), (128, 128, 128, 8, 8, 3, 0, 0),
            (64, 256, 64, 8, 4, 4, 0, 0), (128, 64, 64, 8, 4, 4, 0, 0),
            (64, 256, 64, 8, 8, 3, 0, 1), (64, 256, 64, 8, 8, 4, 0, 1), (128, 128, 64, 8, 8, 2, 0, 1),
            (128, 128, 64, 8, 8, 3, 0, 1), (64, 128, 64, 8, 4, 3, 0, 2), (64, 128, 64, 8, 4, 4, 0, 2)],
    # no 4-warp 128 x 128 or 256-wide tiles: their epilogue (a tile of h besides the accumulator)
    # spills 0.6 KB per thread on sm_90 (python -m benchmarks.aot). PREFETCH_H loads the tile of h
    # before the K loop (255 registers, no spills on sm_90): tried on the 8-warp tilings, which run
    # one program per SM, so nothing else overlaps that read
    "bwd": [(128, 128, 64, 8, 8, 4, 0, 0), (128, 128, 64, 8, 8, 3, 0, 0), (64, 128, 64, 8, 4, 4, 0, 0),
            (64, 128, 64, 8, 4, 3, 0, 0), (128, 64, 64, 8, 4, 4, 0, 0), (128, 128, 128, 8, 8, 3, 0, 0),
            (64, 256, 64, 8, 8, 3, 0, 0), (128, 128, 64, 8, 8, 4, 1, 0), (128, 128, 64, 8, 8, 3, 1, 0),
            (64, 256, 64, 8, 8, 3, 1, 0),
            (64, 256, 64, 8, 8, 3, 0, 1), (64, 256, 64, 8, 8, 4, 0, 1), (128, 128, 64, 8, 8, 4, 0, 1),
            (64, 128, 64, 8, 4, 3, 0, 2), (64, 128, 64, 8, 4, 4, 0, 2)],
}
# PERSISTENT (the 8th value): that many programs per SM, each looping over output tiles in one loop
# that Triton flattens and pipelines, so that a tile's epilogue can overlap the next tile's loads (K
# is 512 here: 8 steps of 64 per tile, against an epilogue that writes two tiles, or reads one and
# writes one). The flattened loop holds more registers: the candidates are the tilings that spill
# at most 40 bytes per thread on sm_90 (python -m benchmarks.aot); 128 x 256 and the backward's
# PREFETCH_H spill 0.5 KB.
MLP_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages", "prefetch_h", "persistent")


def mlp(batch: int, tokens: int = 512, width: int = 512, on_row=None) -> List[Dict]:
    """The fused MLP's two GEMM kernels at the decoder's shape (``batch * tokens`` rows, width ->
    4 x width), bfloat16, over MLP_TILINGS, each checked against PyTorch (cuBLAS + its GELU
    kernels) first; the rows with ``method="torch"`` time that PyTorch computation of the same
    outputs, the baseline a tiling has to beat. ``on_row(rows)`` after each row (a sweep cut short
    keeps what it measured)."""
    import torch.nn.functional as F

    from audiomae.kernels import gelu_mlp as km

    M, D, H = batch * tokens, width, 4 * width
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    xs = [torch.randn(M, D, device="cuda", generator=gen).to(bf) for _ in range(SETS)]
    dys = [torch.randn(M, D, device="cuda", generator=gen).to(bf) for _ in range(SETS)]
    w1 = (torch.randn(H, D, device="cuda", generator=gen) / D ** 0.5).to(bf)
    b1 = (torch.randn(H, device="cuda", generator=gen) * 0.1).to(bf)
    w2 = (torch.randn(D, H, device="cuda", generator=gen) / H ** 0.5).to(bf)
    hs = [F.linear(x, w1, b1) for x in xs]
    flops = 2.0 * M * D * H

    def torch_fwd(i):
        h = F.linear(xs[i], w1, b1)
        return h, F.gelu(h)

    def torch_bwd(i):
        dh = torch.ops.aten.gelu_backward(dys[i] @ w2, hs[i])
        return dh, dh.float().sum(0)

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1.0)).item()

    runs = {"fwd": (torch_fwd, lambda i: km.gelu_mlp_fc1(xs[i], w1, b1, True)),
            "bwd": (torch_bwd, lambda i: km.gelu_mlp_dgelu(dys[i], w2, hs[i], True))}
    rows = []
    for direction, (ref_fn, fused_fn) in runs.items():
        ref = ref_fn(0)
        ms = _median_ms(ref_fn, SETS)
        rows.append(dict(kernel="mlp", direction=direction, method="torch", batch=batch, ms=ms,
                         tflops=flops / ms / 1e9))
        print(json.dumps(rows[-1]), flush=True)
        if on_row:
            on_row(rows)
        for tiling in MLP_TILINGS[direction]:
            km.TUNING.clear()
            km.TUNING[direction] = tiling
            row = dict(kernel="mlp", direction=direction, method="triton", batch=batch, **dict(zip(MLP_KEYS, tiling)))
            try:
                got = fused_fn(0)
                if direction == "fwd":
                    err = max(rel(got[0], ref[0]), rel(got[1], ref[1]))
                else:
                    err = max(rel(got[0], ref[0]), rel(got[1].sum(0), ref[1]))
                row["max_rel_diff_vs_torch"] = err
                if err > 2e-2:
                    raise AssertionError(f"differs from PyTorch by {err:.3g}")
                ms = _median_ms(fused_fn, SETS)
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            if on_row:
                on_row(rows)
    km.TUNING.clear()
    return rows


def _table(rows: List[Dict], keys: List[str], metric: str) -> str:
    ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    bad = [r for r in rows if "ms" not in r]
    head = keys + ["ms", metric]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok + bad:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        cells += [f"{r['ms']:.4f}" if "ms" in r else r.get("error", ""), f"{r.get(metric, 0):.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for tune.json")
    ap.add_argument("--only", choices=("attention", "cuda", "fbank", "mlp"), action="append")
    ap.add_argument("--batch", type=int, default=256, help="attention batch (default 256)")
    ap.add_argument("--fbank-batch", type=int, default=64)
    ap.add_argument("--mlp-batch", type=int, default=64, help="MLP: clips of 512 decoder tokens (default 64)")
    ap.add_argument("--full", action="store_true", help="attention: the whole tiling grid (slower)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune: CUDA is not available; nothing to sweep")
        return 0
    importlib.import_module("audiomae.ops")  # registers the custom ops

    only = set(args.only or ("attention", "cuda", "fbank", "mlp"))
    rows: List[Dict] = []
    t0 = time.time()

    def save():  # after each sweep, so that a run cut short by a time limit keeps what it measured
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "tune.json")
            with open(path + ".tmp", "w") as f:  # replaced whole: a run killed mid-write leaves the last one
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
            os.replace(path + ".tmp", path)

    if "attention" in only:
        att = attention(args.batch, torch.bfloat16, full=args.full)
        rows += att
        save()
    if "cuda" in only:
        cu = cuda_attention(args.batch, torch.bfloat16)
        rows += cu
        save()
    if "fbank" in only:
        fb = fbank(args.fbank_batch)
        rows += fb
        save()
    if "mlp" in only:
        before = list(rows)

        def so_far(ml_rows):  # tune.json after every tiling: a sweep stopped by a time limit keeps its rows
            rows[:] = before + ml_rows
            save()

        ml = mlp(args.mlp_batch, on_row=so_far)
        rows[:] = before + ml
        save()
    if "attention" in only:
        for d in ("fwd", "bwd"):
            print(f"\n## attention {d}, bf16, batch {args.batch}, shift (2, 0)\n")
            print(_table([r for r in att if r["direction"] == d], ["block_m", "num_warps", "groups_per_program",
                                                                  "max_diff_vs_default", "kernel_ms"], "gbps"))
    if "cuda" in only and cu:
        for d in ("fwd", "bwd"):
            print(f"\n## CUDA op attention {d}, bf16, batch {args.batch}, shift (2, 0)\n")
            print(_table([r for r in cu if r["direction"] == d], ["set", "windows_per_warp", "automatic",
                                                                 "max_diff_vs_triton"], "gbps"))
    if "fbank" in only:
        print(f"\n## fbank, batch {args.fbank_batch} x 10 s\n")
        print(_table(fb, ["method", "block_t_frames", "block_t", "block_s", "block_k", "num_warps", "frames_per_warp",
                          "precision", "max_log_err"], "clips_per_s"))
    if "mlp" in only:
        for d in ("fwd", "bwd"):
            print(f"\n## fused MLP {d} GEMM, bf16, {args.mlp_batch} x 512 tokens, 512 -> 2048\n")
            print(_table([r for r in ml if r["direction"] == d], ["method", *MLP_KEYS, "max_rel_diff_vs_torch"],
                         "tflops"))
    print(f"\ntune: {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
