"""Shifted-window scaled cosine attention (Swin-V2 "CR" variant), as the release computes it.

Input is the qkv projection's output in token order, ``[B, T * F, 3 * C]`` (time-major grid), and
the output is in token order ``[B, T * F, C]``, ready for the output projection. The reference does
what the release does: cyclic roll by ``-shift``, window partition, per head
``softmax(cos(q, k) / max(tau, 0.01) + bias + shift_mask) @ v``, reverse partition, roll back.
"""
from __future__ import annotations

import functools
from typing import List, Tuple

import torch
import torch.nn.functional as F


def window_geometry(grid: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int]):
    """Clamp window and shift to the grid as the release does.

    window = min(window, grid) per axis; no shift on an axis the window covers entirely.
    Raises when the clamped window does not tile the grid.
    """
    win = tuple(min(w, g) for w, g in zip(window, grid))
    sh = tuple(0 if g <= w else s % w for g, w, s in zip(grid, win, shift))
    if any(g % w for g, w in zip(grid, win)):
        raise ValueError(
            f"a {win[0]} x {win[1]} window does not tile the {grid[0]} x {grid[1]} patch grid; "
            f"choose an input size whose patch grid is a multiple of the window, or another window_size")
    return win, sh


@functools.lru_cache(maxsize=64)
def _shift_mask_cpu(grid: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int]) -> torch.Tensor:
    T, Fq = grid
    region = torch.zeros(T, Fq)
    cnt = 0
    axes = []
    for n, w, s in zip(grid, window, shift):
        axes.append([slice(0, n - w), slice(n - w, n - s), slice(n - s, n)] if s else [slice(0, n)])
    for ht in axes[0]:
        for wf in axes[1]:
            region[ht, wf] = cnt
            cnt += 1
    nt, nf = T // window[0], Fq // window[1]
    win = region.view(nt, window[0], nf, window[1]).permute(0, 2, 1, 3).reshape(nt * nf, -1)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def shift_mask(grid, window, shift, device=None) -> torch.Tensor:
    """Additive mask ``[num_windows, A, A]`` (0 or -100) of the shifted-window layout, Swin's way.

    Window order is row-major over the (time, frequency) window grid, positions row-major inside
    a window, as in the release's ``window_partition``.
    """
    m = _shift_mask_cpu(tuple(grid), tuple(window), tuple(shift))
    return m.to(device) if device is not None else m


def window_attention_problems(qkv, tau, bias, grid, window, shift, num_heads) -> List[str]:
    """What makes the arguments no window attention: the grid against the tokens, a window that
    does not tile it, a shift outside [0, window), tau and bias of other shapes (empty: none)."""
    out = []
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        return [f"qkv must be [B, T*F, 3*C], got {list(qkv.shape)}"]
    C = qkv.shape[-1] // 3
    T, F = (int(x) for x in grid)
    wt, wf = (int(x) for x in window)
    st, sf = (int(x) for x in shift)
    if num_heads < 1 or C % num_heads:
        return [f"C = {C} is not divisible by num_heads = {num_heads}"]
    A = wt * wf
    if T * F != qkv.shape[1]:
        out.append(f"grid {T} x {F} does not match {qkv.shape[1]} tokens")
    if wt < 1 or wf < 1 or T % wt or F % wf:
        out.append(f"window {wt} x {wf} does not tile the {T} x {F} grid")
    if not (0 <= st < max(wt, 1) and 0 <= sf < max(wf, 1)):
        out.append(f"shift {(st, sf)} must lie in [0, window) per axis (clamp it with window_geometry)")
    if tuple(tau.shape) != (num_heads,):
        out.append(f"tau must be [{num_heads}], got {list(tau.shape)}")
    if tuple(bias.shape) != (num_heads, A, A):
        out.append(f"bias must be [{num_heads}, {A}, {A}], got {list(bias.shape)}")
    return out


def window_attention_reference(qkv: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor,
                               grid: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int],
                               num_heads: int) -> torch.Tensor:
    """Reference shifted-window cosine attention.

    Args:
        qkv: ``[B, T * F, 3 * C]`` in token order (time-major), channels ``(3, heads, head_dim)``.
        tau: ``[heads]`` temperatures; logits are divided by ``max(tau, 0.01)``.
        bias: ``[heads, A, A]`` relative position bias, ``A = window[0] * window[1]``.
        grid, window, shift: (time, frequency) in patches; window and shift already clamped
            (see :func:`window_geometry`).
    Returns:
        ``[B, T * F, C]`` in token order.
    """
    B, L, C3 = qkv.shape
    T, Fq = grid
    wt, wf = window
    st, sf = shift
    C = C3 // 3
    hd = C // num_heads
    A = wt * wf
    x = qkv.view(B, T, Fq, C3)
    if st or sf:
        x = torch.roll(x, shifts=(-st, -sf), dims=(1, 2))
    nt, nf = T // wt, Fq // wf
    x = x.view(B, nt, wt, nf, wf, C3).permute(0, 1, 3, 2, 4, 5).reshape(B * nt * nf, A, 3, num_heads, hd)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # [Bw, heads, A, hd]
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn / tau.clamp(min=0.01).view(1, num_heads, 1, 1)
    attn = attn + bias.unsqueeze(0)
    if st or sf:
        m = shift_mask(grid, window, shift, qkv.device).to(attn.dtype)
        attn = (attn.view(B, nt * nf, num_heads, A, A) + m.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, A, A)
    attn = attn.softmax(dim=-1).to(v.dtype)  # (what autocast's matmul does; tau and bias may be float32)
    out = (attn @ v).transpose(1, 2).reshape(B, nt, nf, wt, wf, C)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, T, Fq, C)
    if st or sf:
        out = torch.roll(out, shifts=(st, sf), dims=(1, 2))
    return out.reshape(B, L, C)
