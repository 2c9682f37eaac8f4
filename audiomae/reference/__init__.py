"""Plain PyTorch references of every fused op: the CPU path and the test oracle of the kernels."""
from .window_attention import shift_mask, window_attention_reference, window_geometry  # noqa: F401
