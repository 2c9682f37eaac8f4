"""Audio-MAE models: the pretraining masked autoencoder and the fine-tuning classifier.

A clip goes: ``[B, 1, T, F]`` log-mel -> patch embedding -> + fixed sin-cos positions -> masking ->
ViT encoder -> (pretraining) decoder over kept tokens + mask tokens -> per-patch prediction ->
norm-pix loss on the removed patches; (fine-tuning) mean of patch tokens -> fc_norm -> head.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn

from .config import MASK_MODES, AudioMAEConfig
from .layers import Block, PatchEmbed, SwinBlock
from .masking import (PRETRAIN_RATIO, PRETRAIN_RATIO_WHY, Masking, check_ratio, mask_tokens, masking_from_keep,
                      masking_removes_nothing, structured_keep)
from .ops_step import decoder_unshuffle, masked_norm_pix_loss, masked_patch_embed, random_masking_ids
from .pos_embed import sincos_2d


@dataclass
class MAEOutput:
    """Result of :class:`AudioMAE`'s forward pass; unpacks and indexes as ``(loss, pred, mask)``, so
    code written for the release's tuple (``model(x)[0]`` is the loss) keeps working."""

    loss: torch.Tensor  # scalar
    pred: torch.Tensor  # [B, L, p*p] predicted patches (time-major), normalised if norm_pix_loss
    mask: torch.Tensor  # [B, L] 1 = removed
    ids_restore: Optional[torch.Tensor] = None  # [B, L]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.loss, self.pred, self.mask))

    def __getitem__(self, index):
        return (self.loss, self.pred, self.mask)[index]

    def __len__(self) -> int:
        return 3


def patchify(spec: torch.Tensor, p: int, stride: Optional[int] = None) -> torch.Tensor:
    """``[B, C, T, F]`` -> ``[B, grid_t * grid_f, p*p*C]``: time-major patches, each row-major (p time rows
    of p bins, the channels last), one every ``stride`` (default ``p``: the patches tile the input).

    A remainder that does not fill a whole patch is cropped, as the strided convolution does.
    """
    if spec.dim() != 4:
        raise ValueError(f"patchify expects [B, C, T, F], got shape {tuple(spec.shape)}")
    for name, v in (("patch size", p), ("stride", p if stride is None else stride)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:  # numpy integers too
            raise ValueError(f"patchify's {name} must be a positive integer, got {v!r}")
    p, stride = int(p), None if stride is None else int(stride)
    B, C, T, Fq = spec.shape
    if stride is not None and stride != p:  # overlapping patches: the release's unfold
        x = spec.unfold(2, p, stride).unfold(3, p, stride)  # [B, C, h, w, p, p]
        return x.permute(0, 2, 3, 4, 5, 1).reshape(B, x.shape[2] * x.shape[3], p * p * C)
    h, w = T // p, Fq // p
    x = spec[:, :, : h * p, : w * p].reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: Tuple[int, int], stride: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, L, p*p*C]`` -> ``[B, C, (grid_t - 1) * s + p, (grid_f - 1) * s + p]``
    (``C`` channels, 1 for spectrograms); where patches overlap (``stride`` below ``p``) each value is the
    mean of the patches covering it."""
    h, w = grid
    if x.dim() != 3 or x.shape[1] != h * w or x.shape[2] == 0 or x.shape[2] % (p * p):
        raise ValueError(f"unpatchify of a {h} x {w} grid of {p} x {p} patches expects [B, {h * w}, {p * p} x "
                         f"channels], got shape {tuple(x.shape)}")
    B, C = x.shape[0], x.shape[2] // (p * p)
    if stride is not None and stride != p:
        size = ((h - 1) * stride + p, (w - 1) * stride + p)
        # fold's layout: one column per patch, its values channel-major (patchify puts the channel last)
        cols = x.reshape(B, h * w, p, p, C).permute(0, 4, 2, 3, 1).reshape(B, C * p * p, h * w)
        total = torch.nn.functional.fold(cols, size, p, stride=stride)
        count = torch.nn.functional.fold(torch.ones_like(cols[:1]), size, p, stride=stride)
        return total / count
    x = x.reshape(B, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * p, w * p)


def norm_pix_target(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch ``(x - mean) / sqrt(var + eps)``, unbiased variance, as the release."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-patch MSE averaged over removed patches: ``sum(loss * mask) / sum(mask)``."""
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def local_grid(cfg: AudioMAEConfig) -> Tuple[int, int]:
    """The token grid the local decoder blocks attend over: the patch grid, and with overlapping
    patches the time axis grown to a multiple of the window by repeating its last row, as the release
    does (101 x 12 patches become 102 x 12 for its 6 x 6 windows)."""
    T, Fq = cfg.grid_size
    if not cfg.overlapping:
        return T, Fq
    w = min(cfg.window[0], T)
    return T + (-T) % w, Fq


def local_windows_fit(cfg: AudioMAEConfig) -> bool:
    """Whether the local decoder's windows tile the frequency axis of overlapping patches, which (as
    in the release) is never padded; True without local blocks or overlapping patches."""
    if not (cfg.num_local_blocks and cfg.overlapping):
        return True
    Fq = cfg.grid_size[1]
    return Fq % min(cfg.window[1], Fq) == 0


def _check_local_windows(cfg: AudioMAEConfig) -> None:
    """:func:`local_windows_fit`, said before the blocks report the padded grid."""
    if not local_windows_fit(cfg):
        T, Fq = cfg.grid_size
        raise ValueError(
            f"a {cfg.window[0]} x {cfg.window[1]} decoder window does not tile the {Fq} frequency patches of the "
            f"{T} x {Fq} grid of patches every {cfg.stride}: the local decoder repeats time rows to tile the time "
            "axis, never frequency columns; use "
            + ("" if cfg.stride == 10 else "patch_stride=10 (the release's: 12 frequency patches on 128 mel bins), ")
            + "another window_size, or decoder_mode='global'")


class _Encoder(nn.Module):
    """Shared ViT encoder pieces; attribute names are the released top-level keys."""

    config: AudioMAEConfig

    def _build_encoder(self, cfg: AudioMAEConfig, drop_path: float = 0.0) -> None:
        # the model's own copy: the caller's config edited later does not describe another model than this
        cfg = dataclasses.replace(cfg)
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(cfg.embed_dim, cfg.grid_size, cfg.pos_embed_kind,
                                                overlapping=cfg.overlapping), requires_grad=False)
        rates = torch.linspace(0, drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, drop_path=r, eps=cfg.layer_norm_eps) for r in rates)

    def _check_input(self, spec: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(spec, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor [B, 1, T, F], got {type(spec).__module__}.{type(spec).__name__}"
                            + ("; convert it with torch.from_numpy" if type(spec).__module__ == "numpy" else ""))
        if not spec.dtype.is_floating_point:
            raise TypeError(f"expected a floating-point spectrogram, got dtype {spec.dtype}")
        weight = getattr(self.patch_embed.proj, "weight", None)
        if not isinstance(weight, torch.Tensor):  # a projection replaced by another module (an adapter)
            weight = self.cls_token
        if spec.dtype != weight.dtype:
            # autocast casts float32/16-bit tensors, never float64 ones: a float64 input (or model) under
            # autocast would reach the convolution with mixed dtypes
            castable = (torch.float32, torch.float16, torch.bfloat16)
            if not (torch.is_autocast_enabled(spec.device.type) and spec.dtype in castable
                    and weight.dtype in castable):
                advice = f"convert the input (spec.to({weight.dtype}))"
                if spec.dtype == torch.float64:
                    advice += " or the model (model.double()); torch.autocast does not cast float64 tensors"
                elif weight.dtype in castable:
                    advice += " or run under torch.autocast"
                raise TypeError(f"input dtype {spec.dtype} differs from the model's {weight.dtype}: {advice}")
        if spec.ndim == 3:
            if spec.shape[0] == cfg.in_chans and tuple(spec.shape[1:]) == cfg.img_size:
                raise ValueError(f"expected input [B, 1, T, F], got one clip {list(spec.shape)} (as load_input "
                                 "returns it); add the batch axis with spec.unsqueeze(0), or torch.stack clips")
            raise ValueError(f"expected input [B, 1, T, F], got {list(spec.shape)}; add the channel axis with "
                             f"spec.unsqueeze(1)")
        if spec.ndim != 4 or spec.shape[1] != cfg.in_chans or tuple(spec.shape[2:]) != cfg.img_size:
            if spec.ndim == 4 and spec.shape[1] == cfg.in_chans and spec.shape[3] == cfg.img_size[1]:
                fix = "pad or cut the time axis with audiomae.audio.pad_or_cut, or build the model for this length"
            elif spec.ndim == 4 and spec.shape[1] == cfg.in_chans and spec.shape[2] == cfg.img_size[0]:
                fix = f"the model takes {cfg.img_size[1]} mel bins (fbank(..., num_mel_bins={cfg.img_size[1]}))"
            else:
                fix = "[batch, channel, time frames, mel bins]"
            raise ValueError(f"expected input [B, {cfg.in_chans}, {cfg.img_size[0]}, {cfg.img_size[1]}] "
                             f"(time frames, mel bins), got {list(spec.shape)}; {fix}")
        if spec.shape[0] == 0:
            raise ValueError(f"expected a batch of at least one clip, got {list(spec.shape)}")

    @staticmethod
    def _check_noise(noise: Optional[torch.Tensor], spec: torch.Tensor) -> None:
        """``noise`` (fixing the masking) is None or a tensor on the input's device."""
        if noise is None:
            return
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__module__}.{type(noise).__name__}; "
                            "convert it with torch.as_tensor(noise, device=spec.device)")
        if noise.device != spec.device:
            raise ValueError(f"noise is on {noise.device} but the input is on {spec.device}: move it with "
                             "noise.to(spec.device)")

    def _init_encoder_weights(self) -> None:
        # as the release: xavier-uniform on the flattened conv kernel, std 0.02 tokens, xavier linears
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_linear_ln(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def tokens(self, spec: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions: ``[B, 1, T, F]`` -> ``[B, L, D]``."""
        self._check_input(spec)
        return self.patch_embed(spec) + self.pos_embed[:, 1:, :]

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the cls token and run the blocks: ``[B, K, D]`` -> ``[B, 1 + K, D]``."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x


def _fusable(patch_embed: nn.Module) -> bool:
    """Whether the fused embedding of the kept patches computes what ``patch_embed`` would: it is this
    package's, its projection a plain ``nn.Conv2d`` (not replaced by another module, such as an adapter,
    or a subclass with its own forward), and no forward or backward hooks watch them (global ones
    included), which the fused op, not calling the modules, would not run."""
    from torch.nn.modules import module as torch_module

    proj = getattr(patch_embed, "proj", None)
    if type(patch_embed) is not PatchEmbed or type(proj) is not nn.Conv2d:
        return False
    p = patch_embed.patch_size
    if (proj.kernel_size, proj.stride, proj.padding, proj.dilation, proj.groups) != ((p, p), (p, p), (0, 0), (1, 1), 1):
        return False  # a convolution made otherwise than the patch embedding's
    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in patch_embed.modules())


class AudioMAE(_Encoder):
    """The pretraining masked autoencoder (the release's ``models_mae``).

    >>> cfg = AudioMAEConfig.preset("tiny")
    >>> model = AudioMAE(cfg)
    >>> loss, pred, mask = model(torch.randn(2, 1, 256, 128))
    """

    encoder_only = False  # set by from_pretrained(..., encoder_only=True)

    def __init__(self, config: Optional[AudioMAEConfig] = None, **overrides):
        super().__init__()
        cfg = AudioMAEConfig.of(config)
        cfg = cfg.replace(**overrides) if overrides else cfg
        _check_local_windows(cfg)
        self._build_encoder(cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        D = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(D, cfg.grid_size, cfg.pos_embed_kind,
                                                        overlapping=cfg.overlapping), requires_grad=False)
        blocks = []
        for i in range(cfg.decoder_depth):
            if i < cfg.num_local_blocks:
                shift = (0, 0) if i % 2 == 0 else cfg.shift_size
                blocks.append(SwinBlock(D, cfg.decoder_num_heads, local_grid(cfg), cfg.window, shift,
                                        cfg.mlp_ratio, cfg.layer_norm_eps, cfg.meta_hidden_dim, cfg.meta_dropout))
            else:
                blocks.append(Block(D, cfg.decoder_num_heads, cfg.mlp_ratio, eps=cfg.layer_norm_eps))
        self.decoder_blocks = nn.ModuleList(blocks)
        self.decoder_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self.apply(self._init_linear_ln)
        self._init_encoder_weights()
        nn.init.normal_(self.mask_token, std=0.02)
        for blk in self.decoder_blocks:
            if isinstance(blk, SwinBlock):
                nn.init.ones_(blk.attn.tau)

    # --- pieces ----------------------------------------------------------------------------
    def forward_encoder(self, spec: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None,
                        mask_mode: Optional[str] = None) -> Tuple[torch.Tensor, Masking]:
        """``[B, 1, T, F]`` -> (normed encoder output ``[B, 1 + K, D]`` for kept tokens, masking).

        ``mask_ratio`` in [0, 1); ``time_frequency`` masking uses the config's ``mask_t_prob`` and
        ``mask_f_prob`` instead."""
        cfg = self.config
        mode = mask_mode or cfg.mask_mode
        if mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mode!r}")
        mask_ratio = check_ratio(mask_ratio)
        self._check_input(spec)
        self._check_noise(noise, spec)
        if mode == "unstructured" and not cfg.overlapping and _fusable(self.patch_embed):
            # embed only the kept patches: the same values as embedding all of them, then gathering (which
            # runs the patch embedding module: one replaced or watched by hooks)
            B, L = spec.shape[0], cfg.num_patches
            ids_keep, ids_restore, mask = random_masking_ids(B, L, int(L * (1 - mask_ratio)), spec.device, noise)
            proj = self.patch_embed.proj
            m = Masking(masked_patch_embed(spec, proj.weight, proj.bias, self.pos_embed, ids_keep), mask,
                        ids_restore, ids_keep)
        else:
            m = mask_tokens(self.tokens(spec), cfg.grid_size, mode, mask_ratio, cfg.mask_t_prob, cfg.mask_f_prob,
                            noise)
        return self.norm(self.encode_tokens(m.x)), m

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, 1 + K, D]`` -> predicted patches ``[B, L, p*p]``."""
        if self.encoder_only:
            raise RuntimeError("this AudioMAE was loaded with encoder_only=True (its decoder blocks left out): it "
                               "embeds, but cannot reconstruct or train; load it without encoder_only for that")
        cfg = self.config
        n_local = cfg.num_local_blocks
        # mask tokens appended, original order restored, positions added; local (and hybrid)
        # decoding drops the cls token: windows cover patch tokens only
        x = decoder_unshuffle(self.decoder_embed(latent), self.mask_token, ids_restore, self.decoder_pos_embed,
                              keep_cls=not n_local)
        (T, Fq), (padded, _) = cfg.grid_size, local_grid(cfg)
        for i, blk in enumerate(self.decoder_blocks):
            if i == 0 and n_local and padded > T:  # the release's overlap rule: repeat the last time row
                x = x.unflatten(1, (T, Fq))
                x = torch.cat([x, x[:, -1:].expand(-1, padded - T, -1, -1)], dim=1).flatten(1, 2)
            x = blk(x)
            if i == n_local - 1 and padded > T:
                x = x[:, : T * Fq]
        pred = self.decoder_pred(self.decoder_norm(x))
        return pred if n_local else pred[:, 1:, :]

    def forward_loss(self, spec: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE against the (norm-pix) target patches, averaged over the removed patches."""
        cfg = self.config
        if cfg.overlapping:  # the fused loss cuts non-overlapping patches; overlapping ones are unfolded
            target = patchify(spec, cfg.patch_size, cfg.stride)
            return masked_mse(pred, norm_pix_target(target) if cfg.norm_pix_loss else target, mask)
        return masked_norm_pix_loss(pred, spec, mask, cfg.patch_size, cfg.norm_pix_loss)

    def forward(self, spec: torch.Tensor, mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None,
                mask_mode: Optional[str] = None) -> MAEOutput:
        """Masked reconstruction of ``spec`` [B, 1, T, F].

        ``mask_ratio`` defaults to the config's (0.8); it is in (0, 1) and must mask at least one
        patch (the loss is the mean over the masked ones). ``noise`` fixes the masking: [B, L] for the
        unstructured recipe (the release's, bit for bit), [B, T] / [B, F] / [B, T + F] for the
        time / frequency / time_frequency modes, on the input's device; equal values keep index order.
        """
        cfg = self.config
        ratio = check_ratio(cfg.mask_ratio if mask_ratio is None else mask_ratio, "mask_ratio", PRETRAIN_RATIO,
                            PRETRAIN_RATIO_WHY)
        mode = mask_mode or cfg.mask_mode
        if mode in MASK_MODES:  # else forward_encoder says so
            problem = masking_removes_nothing(cfg.grid_size, mode, ratio, cfg.mask_t_prob, cfg.mask_f_prob)
            if problem:
                raise ValueError(problem[0])
        latent, m = self.forward_encoder(spec, ratio, noise, mask_mode)
        pred = self.forward_decoder(latent, m.ids_restore)
        loss = self.forward_loss(spec, pred, m.mask)
        return MAEOutput(loss, pred, m.mask, m.ids_restore)

    @torch.no_grad()
    def embed(self, spec: torch.Tensor, per_patch: bool = False) -> torch.Tensor:
        """Encoder embeddings of unmasked input: pooled ``[B, D]`` (mean of the normed patch tokens), or
        per patch ``[B, L, D]`` (time-major) with ``per_patch=True``."""
        pooled, patches = self.embed_both(spec)
        return patches if per_patch else pooled

    @torch.no_grad()
    def embed_both(self, spec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(embed(spec), embed(spec, per_patch=True))`` from one pass of the encoder."""
        x = self.norm(self.encode_tokens(self.tokens(spec)))[:, 1:, :]
        return x.mean(dim=1), x

    @torch.no_grad()
    def reconstruct(self, spec: torch.Tensor, mask_ratio: Optional[float] = None,
                    noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (without gradients, as :meth:`embed`) as a spectrogram (patch statistics
        restored when the model predicts normalised patches) and the mask (1 = removed), both the
        patch-covered part of the input ``[B, C, T, F]``: all of it where the patches tile it, else less
        (patch 14 on 256 x 128 covers 252 x 126). Where patches overlap, each value is the mean of the
        patches covering it, and the mask the fraction of those patches that were removed (16 x 16
        patches every 10 cover 1016 x 126 of 1024 x 128). The mask has one channel."""
        out = self(spec, mask_ratio, noise)
        p, s = self.config.patch_size, self.config.stride
        pred = out.pred
        if self.config.norm_pix_loss:
            target = patchify(spec, p, s)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        grid = self.config.grid_size
        mask = unpatchify(out.mask.unsqueeze(-1).expand(-1, -1, p * p).to(pred.dtype), p, grid, s)
        return unpatchify(pred, p, grid, s), mask

    @classmethod
    def from_pretrained(cls, path_or_state_dict, config: Optional[AudioMAEConfig] = None,
                        map_location="cpu", **overrides) -> "AudioMAE":
        """Load a released checkpoint, a bare state dict, a safetensors file or a file this package wrote.

        With ``config=None`` the configuration is read from the file (or inferred from its shapes).
        A checkpoint for another input length is adapted (the position tables are rebuilt). The model
        comes back in eval mode (no dropout or drop-path); call ``.train()`` to train it.

        ``encoder_only=True`` leaves the decoder's blocks out, for embeddings at an input length whose
        patch grid the decoder's windows do not tile (``img_size=(1000, 128)``: 62 x 8 patches); that
        model embeds, and refuses to reconstruct or train.
        """
        from .checkpoint import load_model
        return load_model(cls, path_or_state_dict, config, map_location=map_location, **overrides)

    def save_pretrained(self, path: Union[str, "os.PathLike"], **extra) -> None:
        """Write ``{'model': state_dict, 'config': ...}``; loadable here and (the 'model' entry) by the release.
        A model loaded from a file keeps its run's options (``args``: how it was trained, its input
        statistics) in the file written, unless ``args=`` is given."""
        from .checkpoint import save_model
        save_model(self, path, extra)


class AudioMAEClassifier(_Encoder):
    """The fine-tuning classifier (the release's ``models_vit``): encoder without ``norm``, mean pool of
    the patch tokens, ``fc_norm``, ``head``. Optional structured 2D masking of the tokens in training
    (``config.finetune_mask_2d``), without mask tokens."""

    def __init__(self, config: Optional[AudioMAEConfig] = None, num_classes: Optional[int] = None,
                 global_pool: Optional[bool] = None, **overrides):
        super().__init__()
        cfg = AudioMAEConfig.of(config)
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        if global_pool is not None:
            overrides["global_pool"] = global_pool
        cfg = cfg.replace(**overrides) if overrides else cfg
        self._build_encoder(cfg, drop_path=cfg.drop_path_rate)
        if cfg.global_pool:
            self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        else:
            self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.apply(self._init_linear_ln)
        self._init_encoder_weights()
        nn.init.trunc_normal_(self.head.weight, std=2e-5)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward_features(self, spec: torch.Tensor, mask_2d: Optional[bool] = None,
                         noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled features ``[B, D]`` (after fc_norm, or the cls token after norm without global pool)."""
        cfg = self.config
        x = self.tokens(spec)
        use_mask = (cfg.finetune_mask_2d and self.training) if mask_2d is None else mask_2d
        if use_mask:
            self._check_noise(noise, spec)
            keep = structured_keep(x.shape[0], cfg.grid_size, "time_frequency", cfg.finetune_mask_t_prob,
                                   cfg.finetune_mask_f_prob, noise=noise, device=x.device)
            x = masking_from_keep(x, keep).x
        elif noise is not None:
            raise ValueError("noise fixes the 2D token masking, which is off here (eval mode, or mask_2d=False, "
                             "or a config without finetune_mask_2d): pass mask_2d=True to mask, or no noise")
        x = self.encode_tokens(x)
        if cfg.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, spec: torch.Tensor, mask_2d: Optional[bool] = None,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for ``spec`` [B, 1, T, F]."""
        return self.head(self.forward_features(spec, mask_2d, noise))

    @torch.no_grad()
    def embed(self, spec: torch.Tensor, per_patch: bool = False) -> torch.Tensor:
        """Pooled features ``[B, D]`` or per-patch encoder tokens ``[B, L, D]``."""
        pooled, patches = self.embed_both(spec)
        return patches if per_patch else pooled

    @torch.no_grad()
    def embed_both(self, spec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(embed(spec), embed(spec, per_patch=True))`` from one pass of the encoder."""
        x = self.encode_tokens(self.tokens(spec))
        pooled = self.fc_norm(x[:, 1:, :].mean(dim=1)) if self.config.global_pool else self.norm(x)[:, 0]
        return pooled, x[:, 1:, :]

    @classmethod
    def from_pretrained(cls, path_or_state_dict, config: Optional[AudioMAEConfig] = None,
                        num_classes: Optional[int] = None, map_location="cpu", **overrides) -> "AudioMAEClassifier":
        """Load a fine-tuned classifier, or the encoder of a pretraining checkpoint (new head), in eval
        mode (see :meth:`AudioMAE.from_pretrained`)."""
        from .checkpoint import load_model
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        return load_model(cls, path_or_state_dict, config, map_location=map_location, **overrides)

    def save_pretrained(self, path, **extra) -> None:
        """As :meth:`AudioMAE.save_pretrained`: a classifier loaded from a file keeps its run's options
        (single-label or not, class names, input statistics), which classify and embed read."""
        from .checkpoint import save_model
        save_model(self, path, extra)
