"""CPU benchmarks for regression tracking (pytest-benchmark); small, about a minute in all.

Not collected by the default test run (``pytest.ini`` points it at ``tests/``)::

    python -m pytest benchmarks -q                                    # time and print the table
    python -m pytest benchmarks --benchmark-json bench.json           # keep the numbers
    python -m pytest benchmarks --benchmark-autosave                  # CI: save, then later
    python -m pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:20%
    python -m benchmarks.cpu_table bench.json > table.md              # markdown of a saved run
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from audiomae import AudioMAE, AudioMAEConfig, dispatch  # noqa: E402
from audiomae.audio import waveform_to_input  # noqa: E402
from audiomae.masking import random_masking  # noqa: E402
from audiomae.reference.step import random_masking_ids  # noqa: E402

from benchmarks import attention  # noqa: E402
from benchmarks.fbank import make_waves  # noqa: E402

CLIPS = 8  # 10 s clips per fbank call


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def waves():
    return make_waves(CLIPS, "cpu", seed=0)


# --- front end: the batched reference against the per-clip loop a data loader runs -----------------
@pytest.mark.benchmark(group="fbank: 8 clips of 10 s -> [8, 1, 1024, 128]")
def test_fbank_batched(benchmark, waves):
    out = benchmark(waveform_to_input, waves, 16000, 1024, "audioset")
    assert out.shape == (CLIPS, 1, 1024, 128)


@pytest.mark.benchmark(group="fbank: 8 clips of 10 s -> [8, 1, 1024, 128]")
def test_fbank_per_clip_loop(benchmark, waves):
    out = benchmark(lambda w: torch.stack([waveform_to_input(x, 16000, 1024, "audioset") for x in w]), waves)
    assert out.shape == (CLIPS, 1, 1024, 128)


# --- masking: ids only (what the fused step needs) against the release's token gather ---------------
@pytest.mark.benchmark(group="masking: batch 64, 512 patches, ratio 0.8")
def test_random_masking_ids(benchmark):
    ids_keep, _, mask = benchmark(random_masking_ids, 64, 512, 102)
    assert ids_keep.shape == (64, 102) and float(mask.sum()) == 64 * 410


@pytest.mark.benchmark(group="masking: batch 64, 512 patches, ratio 0.8")
def test_random_masking_tokens(benchmark):
    x = torch.randn(64, 512, 768)
    m = benchmark(random_masking, x, 0.8)
    assert m.x.shape == (64, 102, 768)


# --- decoder window attention at the paper's shape, batch 2 ------------------------------------------
@pytest.mark.benchmark(group="window attention: batch 2, grid 64x8, window 4x4, shift (2,0), fp32, forward")
@pytest.mark.parametrize("name", ["eager reference", "sdpa"])
def test_window_attention_forward(benchmark, name):
    qkv, tau, bias, _ = attention.make_inputs(2, torch.float32, "cpu")
    fn = attention.VARIANTS[name].fn
    with torch.no_grad():
        out = benchmark(fn, qkv, tau, bias, attention.GRID, attention.WINDOW, (2, 0), attention.HEADS)
    assert out.shape == (2, 512, 512)


# --- the tiny model (the demo's size): forward, and forward + backward --------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = AudioMAE(AudioMAEConfig.preset("tiny")).train()
    spec = torch.randn(4, 1, 256, 128)
    return model, spec


@pytest.mark.benchmark(group="tiny AudioMAE, batch 4, input 256 x 128")
def test_tiny_model_forward(benchmark, tiny):
    model, spec = tiny
    with torch.no_grad(), dispatch.use_backend("torch"):
        out = benchmark(model, spec)
    assert torch.isfinite(out.loss)


@pytest.mark.benchmark(group="tiny AudioMAE, batch 4, input 256 x 128")
def test_tiny_model_forward_backward(benchmark, tiny):
    model, spec = tiny

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(spec).loss
        loss.backward()
        return loss

    with dispatch.use_backend("torch"):
        loss = benchmark(step)
    assert torch.isfinite(loss)
