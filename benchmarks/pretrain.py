"""The full pretraining step of Audio-MAE ViT-B (input 1024 x 128, local decoder, mask ratio 0.8).

Three columns, the same model and optimizer (AdamW, betas (0.9, 0.95), weight decay 1e-4 on the
weights, as the training loop builds it) with bf16 autocast on CUDA (float32 on the CPU):

- ``eager (torch backend)``: every fused op forced to its PyTorch reference
  (``audiomae.dispatch.use_backend("torch")``) and PyTorch's default (multi-tensor) AdamW, i.e. the
  released code's computation;
- ``fused (auto)``: the automatic backends (Triton kernels on CUDA) and the training loop's AdamW
  (PyTorch's single-kernel ``fused=True`` on CUDA);
- ``fused + torch.compile``: the same model wrapped in ``torch.compile``.

``--op-backends op=backend,...`` (``benchmarks.run``) forces those ops' backends in the two fused
columns, e.g. ``gelu_mlp=triton`` for the MLP with the GELU in its GEMMs, which the automatic
choice does not take; the column labels say so.

A step here is forward + backward + optimizer step on a spectrogram batch already on the device;
``samples/s`` = batch / median step time. MFU (model FLOPs utilisation) = model FLOPs per second /
the bf16 matmul peak measured on this device in this run (see :func:`mae_flops`). The breakdown
times each phase of a step with device events: data (host-to-device copy of pinned 10 s waveforms)
-> fbank -> encoder -> decoder -> loss -> backward -> optimizer.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Sequence

import torch

from audiomae import AudioMAE, AudioMAEConfig, dispatch

from .harness import Context, Result, Timing, event, error_note, free_memory, is_oom, synchronize, time_fn

SECTION = "pretrain"
BREAKDOWN = "pretrain_breakdown"
PHASES = ("data", "fbank", "encoder", "decoder", "loss", "backward", "optimizer")
MASK_RATIO = 0.8


def mae_flops(cfg: AudioMAEConfig, mask_ratio: float = MASK_RATIO) -> Dict[str, int]:
    """Model FLOPs (matmuls; one multiply-add = 2 FLOPs) per sample of one pretraining step.

    With L patches of p x p, K = int(L (1 - mask_ratio)) kept, encoder width D over N = K + 1
    tokens (cls included), decoder width Dd over L tokens, MLP ratio r (hidden rD):

    - patch embedding of the kept patches: ``2 K p^2 D``
    - encoder block: ``N ((8 + 4r) D^2 + 4 N D)``: qkv ``6 D^2``, proj ``2 D^2``, MLP ``4 r D^2`` per
      token; ``q k^T`` and ``attn v`` ``2 N D`` each per token
    - ``decoder_embed``: ``2 N D Dd``
    - local decoder block: ``L ((8 + 4r) Dd^2 + 4 A Dd)``, attention inside windows of A tokens
      (global decoder block: ``(L + 1) ((8 + 4r) Dd^2 + 4 (L + 1) Dd)``)
    - ``decoder_pred``: ``2 L Dd p^2``
    - training step = 3 x forward (the backward pass costs two forwards).

    Not counted (small or not matmuls): the position-bias MLP (once per layer and step, not per
    sample), LayerNorms, softmax, GELU, the loss and the optimizer. ViT-B: 69.95 GFLOP forward,
    209.85 GFLOP per sample per step.
    """
    p = cfg.patch_size
    L = cfg.num_patches
    K = int(L * (1 - mask_ratio))
    N = K + 1
    D, Dd, r = cfg.embed_dim, cfg.decoder_embed_dim, cfg.mlp_ratio
    per_token = int((8 + 4 * r) * D * D)
    per_token_dec = int((8 + 4 * r) * Dd * Dd)
    A = cfg.window[0] * cfg.window[1]
    n_local = cfg.num_local_blocks
    n_global = cfg.decoder_depth - n_local
    parts = {
        "patch_embed": 2 * K * p * p * cfg.in_chans * D,
        "encoder": cfg.depth * N * (per_token + 4 * N * D),
        "decoder_embed": 2 * N * D * Dd,
        "decoder": (n_local * L * (per_token_dec + 4 * A * Dd)
                    + n_global * (L + 1) * (per_token_dec + 4 * (L + 1) * Dd)),
        "decoder_pred": 2 * L * Dd * p * p * cfg.in_chans,
    }
    parts["forward"] = sum(parts.values())
    parts["step"] = 3 * parts["forward"]
    return parts


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _build(cfg: AudioMAEConfig, device: torch.device, fused_optimizer: bool = True):
    """The model and its AdamW: the training loop's (single-kernel on CUDA) for the fused columns,
    PyTorch's default multi-tensor AdamW (the released code's) for the eager column."""
    from audiomae.train.optim import adamw, param_groups

    torch.manual_seed(0)
    model = AudioMAE(cfg).to(device).train()
    opt = adamw(param_groups(model, 1e-4), 1e-4, (0.9, 0.95), fused=None if fused_optimizer else False)
    return model, opt


def _step_fn(model, opt, device):
    def step(spec):
        with _autocast(device):
            loss = model(spec, mask_ratio=MASK_RATIO).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _specs(cfg: AudioMAEConfig, batch: int, device, n: int = 2) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 1, *cfg.img_size, generator=g).to(device) for _ in range(n)]


def _fits(cfg, batch, device) -> bool:
    model, opt = _build(cfg, device)
    try:
        _step_fn(model, opt, device)(_specs(cfg, batch, device, 1)[0])
        synchronize(device)
        return True
    except Exception as e:
        if not is_oom(e):
            raise
        return False
    finally:
        del model, opt
        free_memory(device)


SEARCHED = (32, 64, 96, 128, 192, 256, 384, 512)


def largest_batch(cfg, device, candidates: Sequence[int] = SEARCHED) -> Optional[int]:
    """The largest candidate batch whose eager step fits in memory (one step per candidate): the
    eager model needs the most memory of the three columns, so all of them run at that batch."""
    best = None
    with dispatch.use_backend("torch"):
        for b in candidates:
            if not _fits(cfg, b, device):
                break
            best = b
    return best


def run(ctx: Context) -> None:
    report, device = ctx.report, ctx.device
    opts = ctx.options
    preset = opts.get("model") or "base"
    cfg = AudioMAEConfig.preset(preset, mask_ratio=MASK_RATIO)
    batch = opts.get("batch")
    if batch in (None, "", "default"):
        batch = "auto" if device.type == "cuda" else 2
    if batch == "auto":
        batch = largest_batch(cfg, device)
        if batch is None:
            report.note(SECTION, "batch search: not even 32 samples fit in memory")
            return
        report.note(SECTION, f"batch {batch}: the largest of the searched sizes ({', '.join(map(str, SEARCHED))}) "
                             "whose eager step fits in memory")
    batch = int(batch)
    flops = mae_flops(cfg)
    peak_tflops, peak_dtype = ctx.matmul_tflops()
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    report.describe(SECTION, (
        f"AudioMAE `{preset}` ({cfg.embed_dim}/{cfg.depth} encoder, {cfg.decoder_embed_dim}/{cfg.decoder_depth} "
        f"{cfg.decoder_mode} decoder), input {cfg.img_size[0]} x {cfg.img_size[1]}, mask ratio {MASK_RATIO}, AdamW "
        "(PyTorch's default for the eager column, the training loop's single-kernel one on CUDA for the fused "
        "columns). A step = forward + backward + optimizer on a batch already on the device. Model FLOPs per sample and "
        f"step: {flops['step'] / 1e9:.2f} GFLOP (3 x forward; see `benchmarks/pretrain.py::mae_flops`); "
        f"MFU is against the measured {str(peak_dtype).replace('torch.', '')} matmul peak "
        f"({peak_tflops:.1f} TFLOP/s)."),
        config=cfg.to_dict(), flops_per_sample=flops, peak_matmul_tflops=peak_tflops,
        peak_matmul_dtype=str(peak_dtype).replace("torch.", ""))
    # the compiled column: True (torch's default), a torch.compile mode, or a dict of inductor options
    mode = opts.get("compile_mode") or opts.get("compile_options") or None
    how = ", ".join(f"{k}={v}" for k, v in mode.items()) if isinstance(mode, dict) else mode
    forced = opts.get("op_backends") or {}
    # (label, backend, compiled, is_ref, forced op backends, --pretrain-columns key); with forced op
    # backends the fused and compiled columns run twice: with them first (should the time budget
    # run out), then without them, the baseline they are compared with, measured in the same run
    variants = [(f, ", ".join(f"{k}={v}" for k, v in f.items())) for f in ([forced, {}] if forced else [{}])]
    columns = [("eager (torch backend)", "torch", False, True, {}, "eager")]
    columns += [("fused (auto" + (f"; {also}" if also else "") + ")", None, False, False, f, "fused")
                for f, also in variants]
    columns += [("fused + torch.compile" + (f" ({', '.join(x for x in (how, also) if x)})" if how or also else ""),
                 None, mode or True, False, f, "compile") for f, also in variants]
    wanted = opts.get("pretrain_columns")
    if wanted:
        columns = [c for c in columns if c[5] in wanted]
    elif device.type != "cuda":
        columns = columns[:1]
        report.note(SECTION, "on the CPU every op's automatic choice is its PyTorch reference, so only the eager "
                             "column is run")
    if opts.get("no_compile"):
        columns = [c for c in columns if not c[2]]
    params = {"model": preset, "batch": batch, "precision": precision}
    n_steps = 5 if ctx.quick else 10
    for label, backend, compiled, is_ref, op_forced, _ in columns:
        if compiled and ctx.budget.left() < (60 if device.type == "cuda" else 300):
            report.note(SECTION, f"{label}: not run (less than a minute of the time budget left for compiling)")
            continue
        if ctx.budget.expired():
            report.note(SECTION, f"{label}: not run (time budget used up)")
            continue
        profile_to = os.path.join(opts["plot_dir"], "profile.txt") if opts.get("profile") and opts.get("plot_dir") \
            else None
        report.add(_time_column(cfg, batch, device, label, backend, compiled, is_ref, params, flops, peak_tflops,
                                n_steps, profile_to, op_forced))
        if not compiled and not ctx.budget.expired():
            _breakdown(ctx, cfg, batch, label, backend, is_ref, op_forced)


# Device kernels by what they compute, first match wins (names as CUDA libraries, Triton, inductor
# and this package's kernels spell them).
KERNEL_CATEGORIES = (
    ("window attention", r"window_attention|wa_(forward|backward)"),
    ("encoder attention (SDPA)", r"flash|fmha|attention|sdpa|cudnn.*mha"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|sm\d+_.*(tn|nt|nn|tt)_|ampere_|hopper_|wgmma|_mma_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("front end (fbank)", r"fbank|fft|stft|mel"),
    ("step ops (embed, unshuffle, loss)", r"patch_embed|unshuffle|masked_loss|norm_pix|random_masking"),
    ("norms", r"layer_norm|layernorm|_norm_"),
    ("fused by inductor", r"^triton_"),
    ("copies and fills", r"memcpy|memset|copy|fill|cat|index|gather|scatter"),
    ("elementwise and reductions", r"elementwise|vectorized|reduce|unrolled"),
)


def kernel_category(name: str) -> str:
    import re

    low = name.lower()
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, low):
            return category
    return "other"


def kernel_summary(kernels: Sequence, steps: int) -> str:
    """Markdown tables of device kernels ``(name, microseconds)`` over ``steps`` steps: time per step
    by category, and the 25 kernels that take the most."""
    per_cat: Dict[str, float] = {}
    per_name: Dict[str, List[float]] = {}
    for name, us in kernels:
        per_cat[kernel_category(name)] = per_cat.get(kernel_category(name), 0.0) + us
        per_name.setdefault(name, []).append(us)
    total = sum(per_cat.values()) or 1.0
    lines = ["| kernels | ms per step | % of kernel time |", "|---|---|---|"]
    for cat, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {us / steps / 1e3:.3f} | {100 * us / total:.1f} |")
    lines.append(f"| all | {total / steps / 1e3:.3f} | 100.0 |")
    lines += ["", "| kernel | category | calls per step | ms per step |", "|---|---|---|---|"]
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    for name, times in top:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {kernel_category(name)} | {len(times) / steps:g} | {sum(times) / steps / 1e3:.3f} |")
    return "\n".join(lines)


def _device_kernels(prof) -> List:
    """(name, microseconds) of every device-side event of a torch.profiler run."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            out.append((e.name, e.time_range.elapsed_us()))
    return out


def _profile(step, specs, device, label: str, path: str, steps: int = 2) -> None:
    """Append to ``path`` the device kernels of ``steps`` steps by category and the top kernels, then
    torch.profiler's operator table (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(specs[i % len(specs)])
        synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    kernels = _device_kernels(prof) if device.type == "cuda" else []
    with open(path, "a") as f:
        f.write(f"## {label}: {steps} steps\n\n")
        if kernels:
            f.write(kernel_summary(kernels, steps) + "\n\n")
        f.write(f"{table}\n\n")


def backends(backend: Optional[str], op_backends: Optional[Dict[str, str]] = None) -> contextlib.ExitStack:
    """A context forcing ``backend`` for every op (None: the automatic choice), then ``op_backends``
    ({op: backend}) for those ops."""
    stack = contextlib.ExitStack()
    if backend:
        stack.enter_context(dispatch.use_backend(backend))
    for op, b in (op_backends or {}).items():
        stack.enter_context(dispatch.use_backend(b, op=op))
    return stack


def _time_column(cfg, batch, device, label, backend, compiled, is_ref, params, flops, peak_tflops, n_steps,
                 profile_to: Optional[str] = None, op_backends: Optional[Dict[str, str]] = None) -> Result:
    model, opt = _build(cfg, device, fused_optimizer=not is_ref)
    # compiled: True (torch's default mode), a torch.compile mode or a dict of inductor options
    if compiled:
        from audiomae import ops_cuda

        ops_cuda.prepare_for_compile()
    fwd_model = (torch.compile(model, mode=compiled if isinstance(compiled, str) else None,
                               options=compiled if isinstance(compiled, dict) else None) if compiled else model)
    step = _step_fn(fwd_model, opt, device)
    specs = _specs(cfg, batch, device)
    ctx_backend = backends(backend, op_backends)
    metrics = {}
    try:
        with ctx_backend:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if compiled:
                start, end = event(device), event(device)
                start.record()
                step(specs[0])
                end.record()
                synchronize(device)
                metrics["first step s (compile)"] = start.elapsed_time(end) / 1e3
            t = time_fn(step, [(s,) for s in specs], device, warmup_ms=0.0, rep_ms=0.0, min_reps=n_steps,
                        flush_l2=False, probes=1)
            if profile_to:
                _profile(step, specs, device, label, profile_to)
    except Exception as e:
        note = error_note(e)
        del model, opt, fwd_model, specs
        free_memory(device)
        return Result(SECTION, label, params, None, note=note, reference=is_ref)
    seconds = t.median_ms * 1e-3
    tflops = flops["step"] * batch / seconds / 1e12
    metrics = {"samples/s": batch / seconds, "model TFLOP/s": tflops, "MFU %": 100.0 * tflops / peak_tflops,
               **metrics}
    if device.type == "cuda":
        metrics["peak memory GiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del model, opt, fwd_model, specs
    free_memory(device)
    return Result(SECTION, label, params, t, metrics, reference=is_ref)


def _fbank(waves, frames: int):
    from audiomae import ops_step
    fn = getattr(ops_step, "fbank_features", None)
    if fn is not None:
        return fn(waves, frames, "audioset")
    from audiomae.audio import waveform_to_input
    return waveform_to_input(waves, 16000, frames, "audioset")


def _fbank_backend(device) -> str:
    """The backend ``fbank_features`` runs with on ``device`` under the automatic choice."""
    try:
        from audiomae.ops_step import fbank_features  # noqa: F401  (registers the op)

        wave = torch.zeros(1, 16000, device=device)
        with dispatch.use_backend(None):
            return dispatch.choose("fbank_features", wave, 100, "audioset", torch.float32, "exact", 128)[0]
    except Exception as e:  # an old layout without the op, or no backend for these inputs
        return f"unknown ({type(e).__name__})"


def _breakdown(ctx: Context, cfg, batch, label, backend, is_ref, op_backends: Optional[Dict[str, str]] = None) -> None:
    """Per-phase device time of ``n`` eager steps (not compiled: a compiled step has no phases)."""
    device = ctx.device
    frames = cfg.img_size[0]
    model, opt = _build(cfg, device, fused_optimizer=not is_ref)
    g = torch.Generator().manual_seed(1)
    samples_per_clip = 16000 * frames * 10 // 1024  # 10 s for 1024 frames (998 frames, padded), as AudioSet
    waves = [torch.randn(batch, samples_per_clip, generator=g) * 0.1 for _ in range(2)]
    if device.type == "cuda":
        waves = [w.pin_memory() for w in waves]
    n = 3 if ctx.quick else 6
    samples: Dict[str, List[float]] = {p: [] for p in PHASES}
    totals: List[float] = []
    ctx_backend = backends(backend, op_backends)
    try:
        with ctx_backend:
            for i in range(n + 1):  # the first step warms up
                ev = [event(device) for _ in range(len(PHASES) + 1)]
                ev[0].record()
                w = waves[i % 2].to(device, non_blocking=True)
                ev[1].record()
                with torch.no_grad():
                    spec = _fbank(w, frames)
                ev[2].record()
                with _autocast(device):
                    latent, m = model.forward_encoder(spec, MASK_RATIO)
                    ev[3].record()
                    pred = model.forward_decoder(latent, m.ids_restore)
                    ev[4].record()
                    loss = model.forward_loss(spec, pred, m.mask)
                    ev[5].record()
                loss.backward()
                ev[6].record()
                opt.step()
                opt.zero_grad(set_to_none=True)
                ev[7].record()
                synchronize(device)
                if i:
                    for j, p in enumerate(PHASES):
                        samples[p].append(ev[j].elapsed_time(ev[j + 1]))
                    totals.append(ev[0].elapsed_time(ev[-1]))
    except Exception as e:
        note = error_note(e)
        ctx.report.note(BREAKDOWN, f"{label}: {note}")
        del model, opt
        free_memory(device)
        return
    total = Timing.from_samples(totals).median_ms
    ctx.report.describe(BREAKDOWN, (
        f"Device time of each phase of {n} steps at batch {batch} (median per phase; not compiled). `data` "
        f"copies pinned waveforms ({samples_per_clip / 16000:g} s per clip) to the device; `fbank` is the model "
        "input computed on the device (`audiomae.ops_step.fbank_features`: the reference under the torch backend, "
        f"under auto the backend the dispatch picks: {_fbank_backend(device)})."))
    for p in PHASES:
        t = Timing.from_samples(samples[p])
        ctx.report.add(Result(BREAKDOWN, label, {"phase": p, "batch": batch}, t,
                              {"% of step": 100.0 * t.median_ms / total if total else None}, reference=is_ref),
                       save=False)
    ctx.report.add(Result(BREAKDOWN, label, {"phase": "whole step", "batch": batch}, Timing.from_samples(totals),
                          {"% of step": 100.0}, reference=is_ref))
    del model, opt
    free_memory(device)
