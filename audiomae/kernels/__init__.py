"""Triton kernels, one file per fused op family.

Nothing here is imported by ``import audiomae``: :mod:`audiomae.ops` imports a kernel module the
first time its backend runs, so a missing or broken Triton never breaks the package, and importing
the package never touches CUDA.

- :mod:`audiomae.kernels.window_attention`: fused shifted-window cosine attention, forward and
  backward, as ``torch.ops.audiomae.window_attention_fwd`` / ``window_attention_bwd``.
"""
