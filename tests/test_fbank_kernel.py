"""The fused log-mel kernels against the reference front end (audiomae.audio), a float64 computation
and torchaudio's output (the fixture waves): accuracy, padding / cutting, normalisation, output
dtypes, silence, the dispatch.

Every test runs for each Triton method and for the CUDA kernel (csrc/fbank.cu). Without a GPU the
Triton kernels run under Triton's interpreter on CPU tensors (the autouse ``interpret`` fixture sets
``TRITON_INTERPRET=1`` for each test; the kernel module is imported inside the tests) and the CUDA
kernel as host code (csrc/emulate.h, built with AddressSanitizer); with a GPU the same tests run on
CUDA tensors. Output buffers start as NaN, so an unwritten element fails.
"""
import importlib
import math
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import audiomae.audio as A  # noqa: E402
from audiomae import cuda_ext, dispatch, ops_cuda, ops_step  # noqa: E402
from audiomae.reference.step import fbank_features_reference  # noqa: E402
from conftest import DATA  # noqa: E402
from emulation import EmulatedFbank, build_emulators  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["speech", "chirp_10s", "quiet_noise_0.5s", "one_frame_559"]
LOG_EPS = math.log(1.1920928955078125e-07)  # -15.942385
# bound on the output's rounding, relative to |value|: one unit in the last place (Triton's
# interpreter truncates when it rounds to bfloat16 / float16; the GPU rounds to nearest)
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch, interpret):
    monkeypatch.setattr(kernel_module(), "POISON_OUTPUTS", True)
    monkeypatch.setattr(ops_cuda, "POISON_OUTPUTS", True)


@pytest.fixture(scope="module")
def cuda_kernel(request, tmp_path_factory):
    """What runs the CUDA kernel here: the extension on a GPU, else the emulated kernel."""
    if DEVICE == "cuda":
        reasons = cuda_ext.why_not()
        if reasons:
            pytest.skip("the CUDA extension cannot be used here: " + "; ".join(reasons))
        return cuda_ext.load()
    return EmulatedFbank(build_emulators(request, tmp_path_factory, ("address",))["address"])


@pytest.fixture(autouse=True, params=["dft", "fft", "cuda"])
def method(request, monkeypatch):
    """Every test runs with each way of computing the DFT: Triton kernels with one kernel over the
    dense basis, or frames + FFT + mel; the CUDA kernel."""
    if request.param == "cuda":
        ext = request.getfixturevalue("cuda_kernel")
        if DEVICE == "cpu":
            monkeypatch.setattr(cuda_ext, "load", lambda: ext)
            monkeypatch.setattr(ops_cuda, "_stream", lambda device: 0)
    else:
        monkeypatch.setitem(kernel_module().TUNING, "method", request.param)
    monkeypatch.setattr(sys.modules[__name__], "METHOD", request.param)
    return request.param


METHOD = "dft"  # the method of the running test (the `method` fixture sets it)


def triton_only(method):
    if method == "cuda":
        pytest.skip("a test of the Triton kernels")


def kernel_module():
    return importlib.import_module("audiomae.kernels.fbank")


def kernel(*args, **kwargs):
    fn = ops_cuda.fbank_features_cuda if METHOD == "cuda" else kernel_module().fbank_features
    return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def kaldi():
    with np.load(DATA / "fbank_kaldi.npz") as d:
        return {n: (torch.from_numpy(d["wave/" + n]), torch.from_numpy(d["fbank/" + n]).double()) for n in NAMES}


def float64_fbank(wave: torch.Tensor) -> torch.Tensor:
    w = wave.double()
    return A.fbank(w - w.mean(-1, keepdim=True))


def frame_energy(wave: torch.Tensor) -> torch.Tensor:
    """Energy of each pre-emphasised, windowed frame, float64 ``[..., T, 1]`` (sizes the float32 DFT's error)."""
    x = wave.double().unfold(-1, 400, 160)
    x = x - x.mean(-1, keepdim=True)
    x = x - 0.97 * torch.cat([x[..., :1], x[..., :-1]], -1)
    n = torch.arange(400, dtype=torch.float64, device=x.device)
    power = torch.fft.rfft(x * (0.5 - 0.5 * torch.cos(2 * math.pi * n / 399)), n=512).abs().pow(2)
    return power.sum(-1, keepdim=True)


def check_float32_accuracy(out: torch.Tensor, wave: torch.Tensor) -> float:
    """The kernel against float64: within 1e-4 of each energy plus 1e-10 of its frame's energy (a float32
    DFT's rounding, which matters only in bands more than ~12 nats below the frame), and no worse than
    PyTorch's own float32 front end (an FFT). Returns the max error in nats."""
    ref64 = float64_fbank(wave)
    e_out, e_ref = out.double().exp(), ref64.exp()
    allowed = 1e-4 * e_ref + 1e-10 * frame_energy(wave)
    bad = (e_out - e_ref).abs() > allowed
    err = (out.double() - ref64).abs()
    assert not bad.any(), f"{int(bad.sum())} cells outside the float32 error model, max {err[bad].max():.2e} nats"
    own = (A.fbank(wave.float() - wave.float().mean(-1, keepdim=True)).double() - ref64).abs().max()
    assert err.max() <= 2 * own + 1e-5, f"kernel error {err.max():.2e} vs PyTorch float32 {own:.2e}"
    return err.max().item()


# ----------------------------------------------------------------------------------------------
# accuracy on the fixture waves
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fixture_waves(kaldi, name, method):
    wave, fixture = kaldi[name]
    wave = wave.to(DEVICE)
    out = kernel(wave, None, None)
    frames = 1 + (wave.numel() - 400) // 160
    assert out.shape == (1, frames, 128) and out.dtype == torch.float32
    err64 = check_float32_accuracy(out[0], wave)
    if method in ("dft", "cuda"):  # float32 products over bases rounded once from float64, or a
        assert err64 < 2e-3                 # float64 FFT of the float32 frames
    else:  # the FFT of the device (cuFFT on GPUs), as the reference's on the same device: at most 1.5 x
        # that reference's own distance to float64
        own = (A.fbank(wave.float() - wave.float().mean()).double() - float64_fbank(wave)).abs().max().item()
        assert err64 <= 1.5 * own + 1e-5
    out = out[0].double().cpu()
    # torchaudio (the release's front end): the same hard cap as the reference's own test
    assert (out - fixture).abs().max() < 5e-3
    assert ((out - fixture).abs() <= 1e-4).double().mean() > 0.97
    if method in ("dft", "cuda"):
        # the default's bound: within 1e-3 nats of the reference front end, plus the reference's own distance
        # to float64 and what a float32 DFT cannot resolve in the cell (energies far below their frame's, as in
        # the chirp's deep spectral valleys: the float32 error model's 1e-10 of the frame's energy)
        ref32 = fbank_features_reference(wave.cpu(), None, None)[0].double()
        ref64 = float64_fbank(wave.cpu())
        unresolved = torch.log1p(1e-10 * frame_energy(wave.cpu())[0] / ref64.exp())
        assert ((out - ref32).abs() <= 1e-3 + (ref32 - ref64).abs() + unresolved).all()
    # "fft" (opt-in, documented): the float32 error model and 1.5x the device reference's own error
    # above; in the chirp's valleys it differs from cuFFT's reference by more than 1e-3 on an H100


def test_filter_without_bins_and_silence():
    """Filter 3 holds no FFT bin: always log(eps). Digital silence and a constant are log(eps) everywhere."""
    noise = 0.1 * torch.randn(2, 4000, device=DEVICE)
    out = kernel(noise, None, None)
    assert (out[..., 3] == torch.tensor(LOG_EPS)).all() and (out[..., 4] > LOG_EPS + 1).all()
    quiet = torch.stack([torch.zeros(4000), torch.full((4000,), 0.25)]).to(DEVICE)
    torch.testing.assert_close(kernel(quiet, None, None), torch.full((2, 1, 23, 128), LOG_EPS, device=DEVICE),
                               rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_nan_and_inf_samples_propagate_as_in_the_reference():
    """A NaN or infinite sample makes the clip mean, and so every frame of its clip, NaN in the
    reference; the kernel must not floor that to log(eps). Padding rows stay the padding value."""
    waves = 0.1 * torch.randn(3, 4000)
    waves[0, 1234], waves[1, 7] = float("nan"), float("inf")
    ref = fbank_features_reference(waves, 30, "audioset")
    out = kernel(waves.to(DEVICE), 30, "audioset").cpu()
    assert ref[:2, :, :23].isnan().all() and not ref[:2, :, 23:].isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=1e-3 / (2 * 4.5689974))


# ----------------------------------------------------------------------------------------------
# the whole model input: pad / cut, normalisation, output dtype
# ----------------------------------------------------------------------------------------------
def clips(kaldi, n=3, length=9000):
    speech = kaldi["speech"][0]
    return torch.stack([speech[i * 7000: i * 7000 + length] for i in range(n)]).to(DEVICE)


@pytest.mark.parametrize("target_length,stats", [
    pytest.param(64, "audioset", id="pad-to-64-audioset"),
    pytest.param(40, "esc50", id="cut-to-40-esc50"),
    pytest.param(None, (-5.0, 3.0), id="all-frames-given-stats"),
])
@pytest.mark.parametrize("out_dtype", ["fp32", "bf16", "fp16"])
def test_model_input_matches_waveform_to_input(kaldi, target_length, stats, out_dtype):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[out_dtype]
    waves = clips(kaldi)
    out = kernel(waves, target_length, stats, out_dtype=dtype)
    ref = A.waveform_to_input(waves.cpu(), 16000, target_length, stats).to(DEVICE)
    assert out.shape == ref.shape and out.dtype == dtype
    s = A.get_stats(stats)
    # 1e-3 nats before normalisation, plus the output's rounding
    bound = 1e-3 / (2 * s.std) + ULP[dtype] * ref.abs()
    assert ((out.double() - ref.double()).abs() <= bound).all()
    frames = 1 + (waves.shape[-1] - 400) // 160
    if target_length is not None and target_length > frames:
        padded = out[:, :, frames:].float()
        assert torch.equal(padded, torch.full_like(padded, (0 - s.mean) / (2 * s.std)).to(dtype).float())
        if stats == "audioset":
            assert abs(padded[0, 0, 0, 0].item() - 0.467032) < 1e-3


def test_single_clip_shape_and_public_op(kaldi, method):
    wave = kaldi["speech"][0][:20000].to(DEVICE)
    out = kernel(wave, 128)
    assert out.shape == (1, 128, 128)
    if method != "cuda" or DEVICE == "cuda":  # the dispatch takes the CUDA kernel for CUDA tensors only
        with dispatch.use_backend("cuda" if method == "cuda" else "triton", op="fbank_features"):
            assert torch.equal(ops_step.fbank_features(wave, 128), out)
    with dispatch.use_backend("torch", op="fbank_features"):
        ref = ops_step.fbank_features(wave, 128)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3 / (2 * 4.5689974))


@pytest.mark.parametrize("mels", [64, 80])
def test_other_mel_counts(kaldi, mels):
    wave = kaldi["speech"][0][:12000].to(DEVICE)
    out = kernel(wave, None, None, num_mel_bins=mels)
    ref = A.fbank((wave - wave.mean()).double(), num_mel_bins=mels).float()
    assert out.shape == (1,) + ref.shape
    torch.testing.assert_close(out[0], ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("tiling", [(32, 32, 64, 4), (64, 16, 128, 8)], ids=["sm80", "sm90"])
def test_gpu_tiling(kaldi, monkeypatch, method, precision, tiling):
    """The GPU tilings of the DFT kernel (older GPUs' and Hopper's; for the fft method its two kernels'
    GPU tiles). 32-frame tiles: a full tile, a
    tile that ends inside the clip, and a tile of padding only; 64-frame tiles: one that ends inside
    the clip and one of padding only; with each float32-accurate product precision."""
    triton_only(method)
    monkeypatch.setattr(kernel_module(), "_blocks", lambda device: (*tiling, precision))
    if method == "fft":
        # the fft method's GPU tiles (not the interpreter's one big tile): frame tiles that end inside
        # the clip, and several chunks of DFT bins per mel tile
        monkeypatch.setattr(kernel_module(), "_interpreting", lambda: False)
        frames_tile, mel_tile, bins = (8, 32, 64) if tiling[0] == 32 else (16, 64, 128)
        for key, value in dict(block_t_frames=frames_tile, block_t=mel_tile, block_k=bins, num_warps=tiling[3],
                               precision=precision).items():
            monkeypatch.setitem(kernel_module().TUNING, key, value)
    waves = clips(kaldi, n=1, length=8000)  # 48 frames
    for target in (80, 40):
        out = kernel(waves, target, "audioset")
        ref = A.waveform_to_input(waves.cpu(), 16000, target, "audioset").to(DEVICE)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-3 / (2 * 4.5689974))
    check_float32_accuracy(kernel(waves, None, None)[0], waves[0])


# ----------------------------------------------------------------------------------------------
# errors and dispatch
# ----------------------------------------------------------------------------------------------
def test_unknown_method_is_refused(monkeypatch, method):
    triton_only(method)
    monkeypatch.setitem(kernel_module().TUNING, "method", "fast")
    with pytest.raises(ValueError, match="fbank method must be one of"):
        kernel(torch.randn(1, 4000, device=DEVICE), 20, "audioset")


def test_errors():
    with pytest.raises(ValueError, match="too short"):
        kernel(torch.zeros(399, device=DEVICE))
    with pytest.raises(ValueError, match="float samples"):  # integer samples would need a full scale
        kernel(torch.zeros(1000, dtype=torch.int16, device=DEVICE))
    with pytest.raises(ValueError, match="mode"):
        kernel(torch.zeros(1000, device=DEVICE), mode="fast")
    with pytest.raises(ValueError, match="mode"):
        ops_step.fbank_features(torch.zeros(1000, device=DEVICE), mode="fast")
    with pytest.raises(ValueError, match="out_dtype"):
        kernel(torch.zeros(1000, device=DEVICE), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown normalisation"):
        kernel(torch.zeros(1000, device=DEVICE), stats="nosuchset")


def test_custom_op_schema_and_fake_impl(method):
    kernel_module()  # registers the op
    op = torch.ops.audiomae.fbank_features_cuda if method == "cuda" else torch.ops.audiomae.fbank_features
    for args in [(torch.randn(2, 4000, device=DEVICE), -1, True, -4.0, 4.0, torch.bfloat16, 128),
                 (torch.randn(1, 2000, device=DEVICE), 20, False, 0.0, 1.0, torch.float32, 64)]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_dispatch_reasons(monkeypatch, method):
    triton_only(method)
    wave = torch.randn(2, 4000, device=DEVICE)
    assert "fbank_features" in dispatch.registered_ops()
    # the CUDA kernel is the automatic choice on GPUs with fast float64, the batched reference elsewhere (both
    # faster than the Triton kernel on an H100); the Triton kernel is selectable
    fast = (DEVICE == "cuda" and not cuda_ext.why_not()
            and torch.cuda.get_device_capability() in ops_cuda.FAST_FLOAT64_CAPABILITIES)
    auto = dispatch.choose("fbank_features", wave, 128, "audioset", torch.float32, "exact", 128)[0]
    assert auto == ("cuda" if fast else "torch")
    with dispatch.use_backend("triton", op="fbank_features"):
        assert dispatch.choose("fbank_features", wave, 128, "audioset", torch.float32, "exact", 128)[0] == "triton"
    why = dispatch.reasons("fbank_features", wave.double(), 128)
    assert any("float64" in r for r in why["triton"])
    why = dispatch.reasons("fbank_features", wave.clone().requires_grad_(), 128)
    assert any("not differentiable" in r for r in why["triton"])
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        assert dispatch.choose("fbank_features", wave, 128)[0] == "torch"
        assert dispatch.preference("fbank_features") == ("cuda", "torch")
        with dispatch.use_backend("triton", op="fbank_features"):
            with pytest.raises(dispatch.BackendUnavailableError, match="CPU"):
                ops_step.fbank_features(wave, 128)


# ----------------------------------------------------------------------------------------------
# GPU: 10 s clips at the paper's size, bfloat16 output, torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_audioset_batch_cuda(kaldi):
    chirp, speech = kaldi["chirp_10s"][0], kaldi["speech"][0]
    waves = torch.stack([chirp, chirp.flip(0) * 0.05, torch.cat([speech, speech, speech])[:160000],
                         torch.randn(160000) * 1e-3, torch.zeros(160000), chirp.roll(12345),
                         torch.sin(torch.arange(160000) * 0.3), chirp * 0.9]).cuda()
    out = kernel(waves, None, None)
    for i in range(waves.shape[0]):
        check_float32_accuracy(out[i, 0], waves[i])
    bf16 = kernel(waves, 1024, "audioset", out_dtype=torch.bfloat16)
    ref = A.waveform_to_input(waves.double(), 16000, 1024, "audioset")
    assert bf16.shape == (8, 1, 1024, 128)
    assert ((bf16.double() - ref).abs() <= 2e-3 / (2 * 4.5689974) + 2.0 ** -8 * ref.abs()).all()


@pytest.mark.gpu
def test_torch_compile_traces_fbank(method):
    waves = torch.randn(2, 16000, device="cuda") * 0.1
    # resolved outside the traced function
    op = ops_cuda.fbank_features_cuda if method == "cuda" else kernel_module().fbank_features
    fn = torch.compile(lambda w: op(w, 128, "audioset"), fullgraph=True)
    torch.testing.assert_close(fn(waves), kernel(waves, 128, "audioset"), rtol=0, atol=0)
