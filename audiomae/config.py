"""Model configuration: one dataclass, presets for the released sizes, and a tiny one.

Field names follow the released code's arguments where it has them (``img_size``, ``patch_size``,
``embed_dim``, ``depth``, ``num_heads``, ``decoder_*``); a released ``args`` namespace maps onto
this dataclass field by field where the names agree, and :mod:`audiomae.checkpoint` translates the rest
(the release's integer ``decoder_mode``, ``mask_2d`` as ``mask_mode``).
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

DECODER_MODES = ("local", "global", "hybrid")
MASK_MODES = ("unstructured", "time", "frequency", "time_frequency")
POS_EMBED_KINDS = ("released", "grid")


@dataclass
class AudioMAEConfig:
    """Everything that fixes the shapes and semantics of an Audio-MAE model.

    ``img_size`` is (time frames, mel bins) of the model input ``[B, 1, T, F]``. The patch grid is
    ``(T // patch_size, F // patch_size)`` and tokens are ordered time-major (``t * grid_f + f``).
    With ``patch_stride`` below ``patch_size`` the patches overlap (the release's custom patches:
    16 x 16 every 10) and the grid is ``((T - p) // s + 1, (F - p) // s + 1)``: 101 x 12 on 1024 x 128.
    """

    img_size: Tuple[int, int] = (1024, 128)
    patch_size: int = 16
    patch_stride: Optional[int] = None  # None: patch_size (non-overlapping patches, the released models')
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # decoder (pretraining only)
    decoder_embed_dim: int = 512
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    decoder_mode: str = "local"  # local (Swin-V2 windows, the paper's) | global (ViT) | hybrid
    hybrid_local_depth: Optional[int] = None  # hybrid: this many local blocks, then global; default half
    # (time, frequency) in patches; None: the release's, 4 x 4, or 6 x 6 with overlapping patches
    window_size: Optional[Tuple[int, int]] = None
    shift_size: Tuple[int, int] = (2, 0)  # the release shifts time only; the paper's text implies (2, 2)
    meta_hidden_dim: int = 384  # hidden width of the continuous position-bias MLP
    meta_dropout: float = 0.1
    # masking and loss
    mask_ratio: float = 0.8
    mask_mode: str = "unstructured"  # unstructured | time | frequency | time_frequency
    # time_frequency pretraining masking: the fractions of the time lines and of the frequency lines
    # removed; the release model's defaults (its pretraining script, and `audiomae pretrain`, pass 0.7 / 0.3)
    mask_t_prob: float = 0.6
    mask_f_prob: float = 0.5
    norm_pix_loss: bool = True
    pos_embed_kind: str = "released"  # released (the release's scrambled table) | grid (principled t, f)
    layer_norm_eps: float = 1e-6
    # fine-tuning
    num_classes: int = 527
    global_pool: bool = True
    drop_path_rate: float = 0.0
    finetune_mask_2d: bool = False  # structured 2D masking of the classifier's input tokens in training
    finetune_mask_t_prob: float = 0.2
    finetune_mask_f_prob: float = 0.2

    def __post_init__(self) -> None:
        self.img_size = _pair(self.img_size, "img_size")
        if self.window_size is not None:
            self.window_size = _pair(self.window_size, "window_size")
        self.shift_size = _pair(self.shift_size, "shift_size")
        problems = []
        if self.decoder_mode not in DECODER_MODES:
            problems.append(f"decoder_mode={self.decoder_mode!r} is not one of {DECODER_MODES}")
        if self.mask_mode not in MASK_MODES:
            problems.append(f"mask_mode={self.mask_mode!r} is not one of {MASK_MODES}")
        if self.pos_embed_kind not in POS_EMBED_KINDS:
            problems.append(f"pos_embed_kind={self.pos_embed_kind!r} is not one of {POS_EMBED_KINDS}")
        positive = ("patch_size", "embed_dim", "num_heads", "decoder_embed_dim", "decoder_num_heads")
        bad = [n for n in positive if not _is_int(getattr(self, n)) or getattr(self, n) <= 0]
        problems += [f"{n}={getattr(self, n)!r} must be a positive integer" for n in bad]
        if "patch_size" not in bad and any(s < self.patch_size for s in self.img_size):
            problems.append(f"img_size={self.img_size} must be at least one patch ({self.patch_size}) per axis")
        s = self.patch_stride
        if s is not None and not (_is_int(s) and s > 0 and ("patch_size" in bad or s <= self.patch_size)):
            problems.append(f"patch_stride={s!r} must be a positive integer no larger than patch_size "
                            f"({self.patch_size}), or None for non-overlapping patches")
        elif s is not None and "patch_size" not in bad and s == self.patch_size:
            self.patch_stride = None  # one meaning, one spelling: configs compare and record alike
        if self.window_size is not None and "patch_size" not in bad and not problems and \
                self.window_size == ((6, 6) if self.stride < self.patch_size else (4, 4)):
            self.window_size = None  # the release's window for these patches (files before the field held (4, 4))
        for name, heads_name in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if name in bad or heads_name in bad:
                continue
            dim, heads = getattr(self, name), getattr(self, heads_name)
            if dim % heads:
                problems.append(f"{name}={dim} is not divisible by its number of heads ({heads_name}={heads})")
            if dim % 4:
                problems.append(f"{name}={dim} must be a multiple of 4 for the 2D sin-cos position table")
        problems += self._masking_problems()
        problems += self._other_problems(bad)
        if any(w <= 0 for w in (self.window_size or (1, 1))) or any(s < 0 for s in self.shift_size):
            problems.append(f"window_size={self.window_size} must be positive and shift_size={self.shift_size} >= 0")
        if problems:
            raise ValueError("invalid AudioMAEConfig: " + "; ".join(problems))

    def _other_problems(self, bad_sizes) -> list:
        """Depths, widths, rates and switches: the values a model can be built from, named when not."""
        problems = []
        for name, least in (("depth", 0), ("decoder_depth", 0), ("in_chans", 1), ("meta_hidden_dim", 1),
                            ("num_classes", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < least:
                problems.append(f"{name}={v!r} must be {'a positive' if least else 'a non-negative'} integer")
        if not _is_real(self.mlp_ratio) or not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio={self.mlp_ratio!r} must be a positive number")
        elif "embed_dim" not in bad_sizes and int(self.embed_dim * self.mlp_ratio) < 1:
            problems.append(f"mlp_ratio={self.mlp_ratio!r} leaves the MLP of width {self.embed_dim} no hidden unit")
        for name in ("drop_path_rate", "meta_dropout"):
            v = getattr(self, name)
            if not _is_real(v) or not 0.0 <= v < 1.0:
                problems.append(f"{name}={v!r} must be a rate in [0, 1)")
        if not _is_real(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            problems.append(f"layer_norm_eps={self.layer_norm_eps!r} must be a positive number")
        h = self.hybrid_local_depth
        if h is not None and (not _is_int(h) or (_is_int(self.decoder_depth) and not 0 <= h <= self.decoder_depth)):
            problems.append(f"hybrid_local_depth={h!r} must be an integer in [0, decoder_depth={self.decoder_depth}]")
        for name in ("global_pool", "norm_pix_loss", "finetune_mask_2d"):
            v = getattr(self, name)
            if isinstance(v, bool) or (_is_int(v) and v in (0, 1)):
                setattr(self, name, bool(v))
            else:
                problems.append(f"{name}={v!r} must be True or False")
        return problems

    def _masking_problems(self) -> list:
        """The masking fields in range: ``mask_ratio`` in [0, 1) (a classifier's config never masks
        with it, and older files hold 0), the probabilities in [0, 1]. Whether a pretraining masking
        removes at least one patch is checked by the forward call, which uses it."""
        from .masking import check_ratio

        problems = []
        for name in ("mask_ratio", "mask_t_prob", "mask_f_prob", "finetune_mask_t_prob", "finetune_mask_f_prob"):
            try:  # the probabilities remove lines, one of each axis is always kept
                check_ratio(getattr(self, name), name, "[0, 1)" if name == "mask_ratio" else "[0, 1]")
            except (TypeError, ValueError) as e:
                problems.append(str(e))
        return problems

    # --- derived quantities -------------------------------------------------------------------
    @property
    def stride(self) -> int:
        """The step between patches: ``patch_stride``, or ``patch_size`` when patches do not overlap."""
        return self.patch_size if self.patch_stride is None else self.patch_stride

    @property
    def window(self) -> Tuple[int, int]:
        """The local decoder's window (time, frequency): ``window_size``, else the release's, 4 x 4 on
        non-overlapping patches and 6 x 6 on overlapping ones (its models_mae fixes both)."""
        if self.window_size is not None:
            return self.window_size
        return (6, 6) if self.overlapping else (4, 4)

    @property
    def overlapping(self) -> bool:
        """Whether neighbouring patches share input (``patch_stride < patch_size``)."""
        return self.stride < self.patch_size

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Patch grid (time, frequency): whole patches, each ``stride`` after the previous one."""
        return patch_grid(self.img_size, self.patch_size, self.stride)

    @property
    def num_patches(self) -> int:
        t, f = self.grid_size
        return t * f

    @property
    def num_local_blocks(self) -> int:
        if self.decoder_mode == "local":
            return self.decoder_depth
        if self.decoder_mode == "global":
            return 0
        return self.decoder_depth // 2 if self.hybrid_local_depth is None else self.hybrid_local_depth

    def replace(self, **changes: Any) -> "AudioMAEConfig":
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_file_dict(self) -> Dict[str, Any]:
        """``to_dict()`` as checkpoints record it: the fields added since the first release of this
        package left out while they hold their defaults, so that files of models without them load in
        the versions before them too."""
        d = self.to_dict()
        for name in ("patch_stride", "window_size"):
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AudioMAEConfig":
        if not isinstance(d, dict):
            raise TypeError(f"from_dict takes a dict of AudioMAEConfig fields, got {type(d).__name__}")
        _check_names(d)
        return cls(**d)

    @classmethod
    def of(cls, config: Any) -> "AudioMAEConfig":
        """``config`` as an AudioMAEConfig: one already, None (the defaults), a preset name, or a dict
        of fields (``to_dict()``'s)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            return cls.preset(config)
        if isinstance(config, dict):
            return cls.from_dict(config)
        raise TypeError(f"expected an AudioMAEConfig, a preset name or a dict of its fields, got "
                        f"{type(config).__name__}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AudioMAEConfig":
        """A named preset: ``tiny``, ``small``, ``base`` (the released ViT-B), ``large``, ``huge``.

        ``decoder_mode="global"`` on ``small``, ``base`` or ``large`` also gives the release's global
        decoder depth (8 blocks, where the local decoder has 16) unless ``decoder_depth`` is given."""
        if not isinstance(name, str):
            raise TypeError(f"a preset is named by a string, one of {sorted(PRESETS)}; got {name!r}")
        key = PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        _check_names(overrides)
        fields = {**PRESETS[key], **overrides}
        if (fields.get("decoder_mode") == "global" and "decoder_depth" not in overrides
                and PRESETS[key].get("decoder_depth") == _DECODER["decoder_depth"]):
            # the release's decoders: 16 Swin blocks when local, 8 ViT blocks when global
            fields["decoder_depth"] = GLOBAL_DECODER_DEPTH
        return cls(**fields)


def patch_grid(img_size: Tuple[int, int], patch: int, stride: Optional[int] = None) -> Tuple[int, int]:
    """The (time, frequency) grid of ``patch`` x ``patch`` patches every ``stride`` (default: ``patch``)
    on an input of ``img_size``; a remainder no patch covers is left out, as the convolution does."""
    s = patch if stride is None else stride
    return tuple((n - patch) // s + 1 if n >= patch else 0 for n in img_size)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v


def _check_names(fields: Dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(AudioMAEConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown AudioMAEConfig field(s): {', '.join(unknown)}")


def _pair(v: Any, name: str) -> Tuple[int, int]:
    if _is_int(v):
        return (int(v), int(v))
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    # int() would cut 1024.7 silently; whole floats (1024.0) are taken
    if not all(_is_int(x) or (isinstance(x, float) and x.is_integer()) for x in (a, b)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (int(a), int(b))


_DECODER = dict(decoder_embed_dim=512, decoder_depth=16, decoder_num_heads=16, decoder_mode="local")
GLOBAL_DECODER_DEPTH = 8  # the release's global decoder; preset(..., decoder_mode="global") takes it
PRESETS: Dict[str, Dict[str, Any]] = {
    # The demo / test size (also the fixtures' size): 256 frames x 128 mel bins, 16 x 8 patches.
    "tiny": dict(img_size=(256, 128), embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64,
                 decoder_depth=4, decoder_num_heads=4, decoder_mode="local"),
    "small": dict(embed_dim=384, depth=12, num_heads=6, **_DECODER),
    "base": dict(embed_dim=768, depth=12, num_heads=12, **_DECODER),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, **_DECODER),
    # Patch 14 on 1024 x 128 leaves a 73 x 9 grid (remainders cropped), which 4 x 4 windows do not
    # tile, so this size uses the release's global decoder (8 blocks).
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, decoder_mode="global"),
}
PRESET_ALIASES = {"s": "small", "b": "base", "l": "large", "h": "huge", "vit_b": "base", "vit-b": "base",
                  "mae_vit_small_patch16": "small", "mae_vit_base_patch16": "base",
                  "mae_vit_large_patch16": "large", "mae_vit_huge_patch14": "huge",
                  "vit_small_patch16": "small", "vit_base_patch16": "base", "vit_large_patch16": "large",
                  "vit_huge_patch14": "huge"}
