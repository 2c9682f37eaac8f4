"""The log-mel front end: 10 s clips at 16 kHz -> the model input ``[B, 1, 1024, 128]`` (mean removal,
Kaldi fbank, pad/cut to 1024 frames, AudioSet normalisation).

Variants: torchaudio's ``compliance.kaldi.fbank`` one clip at a time (the release's data loader;
when torchaudio is importable), the package's PyTorch reference one clip at a time and batched
(:func:`audiomae.audio.waveform_to_input` on ``[B, N]``, the reference row), the fused Triton op
(:func:`audiomae.ops_step.fbank_features` with the ``triton`` backend, each of its methods) and the
CUDA kernel (the ``cuda`` backend: ``csrc/fbank.cu``, built on first use). Every variant's output is
checked against a float64 computation before it is timed.

``clips/s`` = B / time; ``RTF`` (real-time factor) = compute time / audio duration (lower is faster).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from audiomae import dispatch
from audiomae.audio import SAMPLE_RATE, normalize, pad_or_cut, waveform_to_input

from .harness import Context, Result, close_enough, error_note, free_memory, time_fn

SECTION = "fbank"
CLIP_SECONDS = 10.0
TARGET_LENGTH = 1024
FLOOR = 1e-3  # absolute floor of the error bound in the normalised domain (~1e-2 nats)


def make_waves(batch: int, device, seed: int = 0, seconds: float = CLIP_SECONDS) -> torch.Tensor:
    """``[B, N]`` float32 clips: noise at a random level plus a few tones, like real recordings."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = int(seconds * SAMPLE_RATE)
    t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE
    level = 10 ** (-3 * torch.rand(batch, 1, generator=g, dtype=torch.float64))
    x = 0.05 * level * torch.randn(batch, n, generator=g, dtype=torch.float64)
    for _ in range(3):
        f = 50 + 7000 * torch.rand(batch, 1, generator=g, dtype=torch.float64)
        a = 0.2 * level * torch.rand(batch, 1, generator=g, dtype=torch.float64)
        x += a * torch.sin(2 * torch.pi * f * t)
    return x.clamp(-1, 1).to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# variants: (name, fn(waves [B, N]) -> [B, 1, T, F], why_not(device) -> reason or None, reference)
# ----------------------------------------------------------------------------------------------
def _torchaudio_why_not(device) -> Optional[str]:
    try:
        import torchaudio.compliance.kaldi  # noqa: F401
    except Exception as e:
        return f"torchaudio not importable ({type(e).__name__})"
    return None


def torchaudio_per_clip(waves: torch.Tensor) -> torch.Tensor:
    """The release's front end, one clip at a time."""
    import torchaudio.compliance.kaldi as kaldi

    out = []
    for w in waves:
        w = w - w.mean()
        f = kaldi.fbank(w[None], htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
                        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
        out.append(normalize(pad_or_cut(f, TARGET_LENGTH), "audioset"))
    return torch.stack(out).unsqueeze(1)


def reference_per_clip(waves: torch.Tensor) -> torch.Tensor:
    """The package's reference, one clip at a time (what a per-clip data loader does)."""
    return torch.stack([waveform_to_input(w, SAMPLE_RATE, TARGET_LENGTH, "audioset") for w in waves])


def reference_batched(waves: torch.Tensor) -> torch.Tensor:
    """The package's reference on the whole ``[B, N]`` batch."""
    return waveform_to_input(waves, SAMPLE_RATE, TARGET_LENGTH, "audioset")


def _fused_op() -> Optional[Callable]:
    from audiomae import ops_step
    return getattr(ops_step, "fbank_features", None)


def _backend_why_not(backend: str) -> Callable[[torch.device], Optional[str]]:
    """Why the fused op's ``backend`` cannot run on ``device`` (None: it can)."""
    def why_not(device) -> Optional[str]:
        if _fused_op() is None:
            return "audiomae.ops_step has no fbank_features"
        probe = torch.zeros(1, 400, device=device)
        try:
            reasons = dispatch.reasons("fbank_features", probe, TARGET_LENGTH, "audioset")[backend]
        except KeyError as e:
            return f"no {backend} fbank_features in the dispatch ({e})"
        return "; ".join(reasons) or None
    return why_not


_triton_why_not = _backend_why_not("triton")


def _triton_method(waves: torch.Tensor, method: str) -> torch.Tensor:
    from audiomae.kernels import fbank as kernel

    saved = kernel.TUNING.get("method")
    kernel.TUNING["method"] = method
    try:
        with dispatch.use_backend("triton", op="fbank_features"):
            return _fused_op()(waves, TARGET_LENGTH, "audioset")
    finally:
        if saved is None:
            kernel.TUNING.pop("method", None)
        else:
            kernel.TUNING["method"] = saved


def triton_fused(waves: torch.Tensor) -> torch.Tensor:
    """The fused Triton kernel (DFT, power, mel, log, pad, normalise in one pass)."""
    return _triton_method(waves, "dft")


def triton_fft(waves: torch.Tensor) -> torch.Tensor:
    """Triton framing kernel, torch.fft.rfft (cuFFT), Triton power/mel/log/normalise kernel."""
    return _triton_method(waves, "fft")


def cuda_fused(waves: torch.Tensor) -> torch.Tensor:
    """The CUDA kernel: float32 framing, a float64 four-step FFT per frame, power, mel, log, pad,
    normalise in one launch."""
    with dispatch.use_backend("cuda", op="fbank_features"):
        return _fused_op()(waves, TARGET_LENGTH, "audioset")


VARIANTS: List[Tuple[str, Callable, Callable[[torch.device], Optional[str]], bool]] = [
    ("torchaudio kaldi.fbank, per clip", torchaudio_per_clip, _torchaudio_why_not, False),
    ("reference, per clip", reference_per_clip, lambda d: None, False),
    ("reference, batched", reference_batched, lambda d: None, True),
    ("triton (audiomae)", triton_fused, _triton_why_not, False),
    ("triton frames + FFT + mel (audiomae)", triton_fft, _triton_why_not, False),
    ("cuda FFT (audiomae)", cuda_fused, _backend_why_not("cuda"), False),
]


def check(fn: Callable, device) -> Tuple[bool, str]:
    """``fn`` on 2 clips against the float64 reference, bound 2 x (float32 reference's error) + FLOOR."""
    waves = make_waves(2, device, seed=99)
    exact = reference_batched(waves.double())
    own = reference_batched(waves)
    try:
        got = fn(waves)
    except Exception as e:
        return False, error_note(e, "raised ")
    ok, err, bound = close_enough(got.float(), exact, own, FLOOR)
    return ok, (f"error {err:.2g}" if ok else f"wrong output: relative error {err:.3g} > bound {bound:.3g}")


def run(ctx: Context) -> None:
    report, device = ctx.report, ctx.device
    batch = int(ctx.options.get("fbank_batch") or (64 if device.type == "cuda" else (2 if ctx.quick else 4)))
    report.describe(SECTION, f"{batch} clips of {CLIP_SECONDS:.0f} s per call, float32. `clips/s` = {batch} / time; "
                             "`RTF` = time / audio duration (lower is faster).",
                    clip_samples=int(CLIP_SECONDS * SAMPLE_RATE), output_shape=f"[{batch}, 1, {TARGET_LENGTH}, 128]",
                    stats="audioset")
    sets = [make_waves(batch, device, seed=s) for s in range(3)]
    targs = ctx.timing_args()
    for name, fn, why_not, is_ref in VARIANTS:
        why = why_not(device)
        if why:
            report.note(SECTION, f"{name}: not run ({why})")
            continue
        if ctx.budget.expired():
            report.note(SECTION, f"{name}: not run (time budget used up)")
            continue
        ok, msg = check(fn, device)
        if not ok:
            report.note(SECTION, f"{name}: not timed, {msg}")
            continue
        params = {"batch": batch, "clip s": CLIP_SECONDS}
        try:
            t = time_fn(lambda w: fn(w), [(w,) for w in sets], device, **targs)
        except Exception as e:
            free_memory(device)
            note = error_note(e)
            report.add(Result(SECTION, name, params, None, note=note, reference=is_ref))
            continue
        seconds = t.median_ms * 1e-3
        report.add(Result(SECTION, name, params, t, {"clips/s": batch / seconds,
                                                     "RTF": seconds / (batch * CLIP_SECONDS)}, reference=is_ref))
    del sets
    free_memory(device)
