"""audiomae: fast, faithful Audio-MAE (Masked Autoencoders that Listen).

>>> import audiomae, torch
>>> model = audiomae.AudioMAE(audiomae.AudioMAEConfig.preset("tiny"))
>>> loss, pred, mask = model(torch.randn(2, 1, 256, 128))
"""
__version__ = "0.2.0"

from .config import AudioMAEConfig, PRESETS  # noqa: E402,F401
from .model import AudioMAE, AudioMAEClassifier, MAEOutput, patchify, unpatchify  # noqa: E402,F401
from .checkpoint import CheckpointAdaptedWarning, CheckpointError  # noqa: E402,F401


def __getattr__(name):
    # the audio front end is imported on first use (it pulls in scipy and soundfile)
    if name in ("fbank", "load_audio", "waveform_to_input", "load_input", "audio"):
        import importlib
        audio = importlib.import_module(".audio", __name__)
        return audio if name == "audio" else getattr(audio, name)
    raise AttributeError(f"module 'audiomae' has no attribute {name!r}")
