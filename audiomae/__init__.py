"""audiomae: fast, faithful Audio-MAE (Masked Autoencoders that Listen).

>>> import audiomae, torch
>>> model = audiomae.AudioMAE(audiomae.AudioMAEConfig.preset("tiny"))
>>> loss, pred, mask = model(torch.randn(2, 1, 256, 128))
"""
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# the names are imported on first use: ``import audiomae.cli`` (the command line) does not load
# torch, so ``audiomae --help`` answers at once and a Ctrl-C while torch loads reaches the command
_EXPORTS = {
    "AudioMAEConfig": "config", "PRESETS": "config",
    "AudioMAE": "model", "AudioMAEClassifier": "model", "MAEOutput": "model", "patchify": "model",
    "unpatchify": "model",
    "CheckpointAdaptedWarning": "checkpoint", "CheckpointError": "checkpoint",
    # the audio front end (it pulls in scipy and soundfile)
    "fbank": "audio", "load_audio": "audio", "waveform_to_input": "audio", "load_input": "audio",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .audio import fbank, load_audio, load_input, waveform_to_input  # noqa: F401
    from .checkpoint import CheckpointAdaptedWarning, CheckpointError  # noqa: F401
    from .config import PRESETS, AudioMAEConfig  # noqa: F401
    from .model import AudioMAE, AudioMAEClassifier, MAEOutput, patchify, unpatchify  # noqa: F401


def __getattr__(name):
    import importlib
    if name in _EXPORTS:
        value = getattr(importlib.import_module("." + _EXPORTS[name], __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    if name == "audio":
        return importlib.import_module(".audio", __name__)
    raise AttributeError(f"module 'audiomae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
