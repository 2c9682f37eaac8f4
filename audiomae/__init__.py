"""audiomae: fast, faithful Audio-MAE (Masked Autoencoders that Listen)."""
__version__ = "0.1.0"

from .config import AudioMAEConfig  # noqa: E402
