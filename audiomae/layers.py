"""Building blocks: patch embedding, pre-norm ViT blocks, post-norm Swin-V2 (CR) window blocks.

Parameter names follow the release (timm's ``Block`` and ``SwinTransformerV2CrBlock``), so state
dicts load with strict key matching.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .reference import window_geometry


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class PatchEmbed(nn.Module):
    """Conv2d(1, D, p, stride s): ``[B, 1, T, F]`` -> ``[B, grid_t * grid_f, D]`` time-major; ``s`` is
    ``p`` (non-overlapping patches) unless given."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, stride: Optional[int] = None):
        super().__init__()
        self.patch_size = patch_size
        self.stride = patch_size if stride is None else stride
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int = None, act=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, out or dim)

    def _fusable(self) -> bool:
        """Whether ``fc2(gelu(fc1(x)))`` may run as one op: exact GELU, no active dropout, and two plain
        ``nn.Linear`` layers without hooks (the op reads their weights and does not call them)."""
        act = self.act
        if not (isinstance(act, nn.GELU) and act.approximate == "none" and (self.drop.p == 0.0 or not self.training)):
            return False
        return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
                   for m in (self.fc1, self.fc2))

    def forward(self, x):
        if self._fusable():
            # one op, so a fused backend can keep the GELU inside its matmuls (the reference is this
            # same computation)
            return ops.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        # dropout after the activation and after fc2, as timm's Mlp (the release's meta-MLP: 0.1 at both)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Global multi-head self-attention (qkv with bias, scale 1/sqrt(head_dim))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def log_relative_coords(window: Tuple[int, int]) -> torch.Tensor:
    """``[A * A, 2]``: sign(d) * ln(1 + |d|) of the (dt, df) offset between window positions i and j."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2).float()
    return torch.sign(rel) * torch.log1p(rel.abs())


class WindowAttention(nn.Module):
    """Scaled cosine attention inside (shifted) windows with a continuous position bias."""

    def __init__(self, dim: int, num_heads: int, window: Tuple[int, int], meta_hidden: int = 384,
                 meta_dropout: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.window = tuple(window)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.meta_mlp = Mlp(2, meta_hidden, num_heads, act=nn.ReLU, drop=meta_dropout)
        self.tau = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("relative_coordinates_log", log_relative_coords(self.window), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """``[heads, A, A]`` bias from the meta-MLP (differentiable, recomputed each call)."""
        A = self.window[0] * self.window[1]
        return self.meta_mlp(self.relative_coordinates_log).transpose(0, 1).reshape(self.num_heads, A, A)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int], shift: Tuple[int, int]) -> torch.Tensor:
        """``x`` [B, T*F, C] token order -> [B, T*F, C]."""
        qkv = self.qkv(x)
        bias = self.position_bias().to(qkv.dtype)
        out = ops.window_attention(qkv, self.tau, bias, grid, self.window, shift, self.num_heads)
        return self.proj(out)


class SwinBlock(nn.Module):
    """Post-norm Swin-V2 (CR) block on a (time, frequency) token grid:
    x + norm1(window_attn(x)); x + norm2(mlp(x))."""

    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int], window: Tuple[int, int],
                 shift: Tuple[int, int], mlp_ratio: float = 4.0, eps: float = 1e-6, meta_hidden: int = 384,
                 meta_dropout: float = 0.1, drop_path: float = 0.0):
        super().__init__()
        self.grid = tuple(grid)
        win, self.shift = window_geometry(self.grid, tuple(window), tuple(shift))
        self.attn = WindowAttention(dim, num_heads, win, meta_hidden, meta_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T*F, C] in token order."""
        x = x + self.drop_path(self.norm1(self.attn(x, self.grid, self.shift)))
        return x + self.drop_path(self.norm2(self.mlp(x)))
