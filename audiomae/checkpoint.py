"""Reading and writing checkpoints: released files, bare state dicts, safetensors, this package's files.

Loading never executes code from a file: ``torch.load(weights_only=True)`` with only
``argparse.Namespace`` (the release's ``args`` entry) allowed beyond plain containers and tensors.
All adaptation (configuration inferred from shapes, another input length, a pretraining
checkpoint into the classifier) happens here, in one place, and says what it did.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import pickle
import re
import tempfile
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Tuple

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
import torch.nn.functional as F

from .config import POS_EMBED_KINDS, PRESETS, AudioMAEConfig, patch_grid
from .pos_embed import sincos_2d

FORMAT = "audiomae"
_PREFIXES = ("module.", "_orig_mod.")
_POS_KEYS = ("pos_embed", "decoder_pos_embed")
# head counts cannot be read from weights: take the preset's for that width
_DEFAULT_HEADS = {p["embed_dim"]: p["num_heads"] for p in PRESETS.values()}
# likewise a global decoder's (local blocks hold theirs: one tau per head)
_DEFAULT_DECODER_HEADS = {p["decoder_embed_dim"]: p["decoder_num_heads"] for p in PRESETS.values()}
# the release's inputs: 128 mel bins, and 1024 (AudioSet), 512 (ESC-50) or 128 (Speech Commands) frames
_RELEASE_MELS = 128
_RELEASE_FRAMES = (1024, 512, 128)
# the release's overlapping ("custom") patches step 10 frames and bins (use_custom_patch in its args)
RELEASE_OVERLAP_STRIDE = 10


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the requested model."""


class CheckpointAdaptedWarning(UserWarning):
    """A checkpoint was loaded with an adaptation (dropped parts, new head, rebuilt position tables)."""


@contextlib.contextmanager
def adaptations_as_notes():
    """For the command line: inside, each :class:`CheckpointAdaptedWarning` is printed as one
    ``note:`` line on stderr (not a warning with a source line); other warnings pass on."""
    import sys
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointAdaptedWarning)
        try:
            yield
        finally:
            pending = list(caught)
    for w in pending:
        if issubclass(w.category, CheckpointAdaptedWarning):
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# --- reading -------------------------------------------------------------------------------------
_READ_ONCE: Optional[Dict[tuple, Any]] = None  # the files read inside reading_once(), by path and version


@contextlib.contextmanager
def reading_once():
    """Inside this context each checkpoint file is read from disk once: a command that looks into a
    checkpoint several times (its run's options, its kind, then the model) reads a large file once.
    What was read is dropped when the context ends."""
    global _READ_ONCE
    outer = _READ_ONCE
    if outer is None:
        _READ_ONCE = {}
    try:
        yield
    finally:
        _READ_ONCE = outer


def _check_crc(path: str) -> None:
    """torch.load does not compare a zip archive's stored checksums with its data, so a damaged file
    (a partial copy, a flipped bit) would load with wrong weights: compare them first (a fast pass)."""
    bad = None
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # written without checksums (torch.serialization.set_crc32_options(False))
                try:
                    with z.open(info) as f:
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile:  # reading to the end compares the checksum
                    bad = info.filename
                    break
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError):
        return  # not a readable archive (a legacy pickle, a cut file): torch.load says what is wrong
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: the data of {bad} does not match its stored checksum (a partial "
                              "download or copy, or a disk error); fetch or copy the file again")


# what the release's ``args`` hold besides plain values: the namespace, and the paths its submitit
# launcher sets (output_dir, log_dir, job_dir); rebuilding either runs no code
_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                 pathlib.PureWindowsPath]


def torch_load(path: str, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)`` allowing ``argparse.Namespace`` and paths (the release's
    ``args``); inside :func:`reading_once` a file unchanged since it was read is not read again."""
    key = None
    if _READ_ONCE is not None:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, str(map_location))
        if key in _READ_ONCE:
            return _READ_ONCE[key]
    _check_crc(path)
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        obj = torch.load(path, map_location=map_location, weights_only=True)
    if key is not None and _READ_ONCE is not None:
        _READ_ONCE[key] = obj
    return obj


def is_safetensors(path: str) -> bool:
    """A safetensors file, by its name (``.safetensors`` in any case) or its content: an 8-byte header
    length, then the JSON header."""
    if path.lower().endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < (1 << 28)


def read_checkpoint(src, map_location="cpu") -> Tuple[Dict[str, torch.Tensor], Optional[dict], Any]:
    """Return ``(state_dict, config_dict or None, released args or None)`` from a path or a dict."""
    if isinstance(src, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(src))  # never a folder named ~
        if os.path.isdir(path):
            raise CheckpointError(f"{path} is a directory, not a checkpoint file")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        if is_safetensors(path):
            return _read_safetensors(path, map_location)
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive (or, with the legacy format, a pickle: protocol byte 0x80)
        if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; "
                                  f"this file starts with {head!r})")
        try:
            obj = torch_load(path, map_location)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0] if lines else "")
            raise CheckpointError(
                f"{path}: holds objects other than tensors and plain containers ({why}). Checkpoints are "
                "loaded with weights_only=True so that no code from the file runs; if you trust the file, "
                "re-save its weights as a plain state dict (torch.save(model.state_dict(), ...)) or as "
                "safetensors.") from None
        except Exception as e:  # truncated or non-checkpoint files
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    elif isinstance(src, dict):
        path, obj = "<dict>", src
    else:
        raise CheckpointError(f"expected a file path or a state dict, got {type(src).__name__}")
    return _unwrap(obj, path)


def _read_safetensors(path: str, map_location) -> Tuple[Dict[str, torch.Tensor], Optional[dict], Any]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install safetensors)") from None
    device = str(map_location) if map_location is not None else "cpu"
    try:
        with safe_open(path, framework="pt", device=device) as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        cfg = json.loads(meta["config"]) if "config" in meta else None
        extra = json.loads(meta["extra"]) if "extra" in meta else {}
    except ValueError as e:
        raise CheckpointError(f"{path}: its metadata is not the JSON this package writes ({e})") from None
    if cfg is not None and not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: its metadata's config is a JSON {type(cfg).__name__}, not an object of "
                              "AudioMAEConfig fields")
    return _strip(sd), cfg, extra.get("args") if isinstance(extra, dict) else None


def _unwrap(obj: Any, path: str):
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a state dict or a checkpoint), got {type(obj).__name__}")
    cfg, args = None, None
    if "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
        cfg = obj.get("config") if isinstance(obj.get("config"), dict) else None
        args = obj.get("args")
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        cfg = obj.get("config") if isinstance(obj.get("config"), dict) else None
    else:
        sd = obj
    names = [k for k in sd if not isinstance(k, str)]
    if names:
        raise CheckpointError(f"{path}: the state dict's keys must be parameter names (strings), got "
                              f"{', '.join(repr(k) for k in names[:6])}")
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if not bad:
        empty = [k for k, v in sd.items() if v.is_meta or v.layout != torch.strided]
        if empty:
            v = sd[empty[0]]
            raise CheckpointError(f"{path}: {len(empty)} tensor{'s' if len(empty) != 1 else ''} of the state dict "
                                  f"{'hold' if len(empty) != 1 else 'holds'} no dense values (the first: {empty[0]}, "
                                  f"{'on the meta device' if v.is_meta else f'layout {v.layout}'}); save the model's "
                                  "weights after they are materialised, as dense tensors")
    if bad:
        raise CheckpointError(f"{path}: the state dict holds non-tensor entries: {', '.join(map(str, bad[:8]))}")
    return _strip(sd), cfg, args


def _strip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys without the wrappers' prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``), in any
    order and number: ``torch.compile(DDP(model))`` saves ``_orig_mod.module.``."""
    out = {}
    for k, v in sd.items():
        stripped = True
        while stripped and isinstance(k, str):
            stripped = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        out[k] = v
    return out


def run_options(args: Any) -> Dict[str, Any]:
    """A checkpoint's recorded run options as a dict: this package's dict as it is, the release's
    ``argparse.Namespace`` as its fields, anything else (None) as no options."""
    if isinstance(args, dict):
        return args
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


# --- configuration from a file -------------------------------------------------------------------
def _count(sd, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: Dict[str, torch.Tensor], args: Any = None) -> Dict[str, Any]:
    """Configuration fields that a state dict's shapes (and a released ``args`` namespace) determine.

    The encoder's head count is not in the weights: it is the preset's for that width (6, 12, 16 for
    384, 768, 1024), else ``width // 64``; likewise a global decoder's (16 for 512, else ``width //
    32``); pass ``config=`` for other models. A state dict that lacks a weight the shapes are read from,
    or holds one of another rank, raises CheckpointError naming it."""
    try:
        return _infer_config(sd, args)
    except KeyError as e:
        raise CheckpointError(f"an incomplete Audio-MAE state dict: {e.args[0]} is missing") from None
    except IndexError:
        odd = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sd.items()
                        if isinstance(k, str) and k.endswith(("attn.tau", ".weight")) and v.dim() == 0)
        raise CheckpointError(f"a damaged Audio-MAE state dict: weights of an unexpected rank ({odd or 'a 0-d weight'})"
                              ) from None


def _infer_config(sd: Dict[str, torch.Tensor], args: Any = None) -> Dict[str, Any]:
    if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
        raise CheckpointError("not an Audio-MAE state dict: patch_embed.proj.weight and cls_token are missing "
                              f"(first keys: {', '.join(list(sd)[:6])})")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4 or sd["cls_token"].dim() != 3:
        raise CheckpointError(f"not an Audio-MAE state dict: patch_embed.proj.weight is {tuple(w.shape)} (a "
                              f"[D, 1, p, p] convolution kernel) and cls_token {tuple(sd['cls_token'].shape)} (a "
                              "[1, 1, D] token)")
    D, in_chans, p = w.shape[0], w.shape[1], w.shape[-1]
    cfg: Dict[str, Any] = dict(embed_dim=D, in_chans=in_chans, patch_size=p, depth=_count(sd, "blocks."),
                               num_heads=_DEFAULT_HEADS.get(D, max(1, D // 64)))
    if "blocks.0.mlp.fc1.weight" in sd:
        cfg["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / D
    table = sd.get("pos_embed", sd.get("decoder_pos_embed"))
    custom = isinstance(args, argparse.Namespace) and getattr(args, "use_custom_patch", None) is True
    told = isinstance(args, argparse.Namespace) and getattr(args, "use_custom_patch", None) is False
    if table is not None and table.dim() == 3:
        try:
            grid, kind, stride = _checkpoint_grid("pos_embed" if "pos_embed" in sd else "decoder_pos_embed", table, p,
                                                  stride=RELEASE_OVERLAP_STRIDE if custom else p if told else None)
        except CheckpointError:
            grid, kind, stride = None, None, None  # loading says so if the table has to be adapted
        if grid is not None:
            stride = None if stride == p else stride
            if stride is not None:
                cfg["patch_stride"] = stride
            cfg["img_size"] = _input_size(grid, p, stride)
            if kind is None and "decoder_pos_embed" in sd and "pos_embed" in sd:
                kind = _fixed_kind(sd["decoder_pos_embed"], grid, stride is not None and stride != p)
            if kind is not None:
                cfg["pos_embed_kind"] = kind
    if custom and RELEASE_OVERLAP_STRIDE < p:
        cfg.setdefault("patch_stride", RELEASE_OVERLAP_STRIDE)
    if "decoder_embed.weight" in sd:
        Dd = sd["decoder_embed.weight"].shape[0]
        depth = _count(sd, "decoder_blocks.")
        local = [f"decoder_blocks.{i}.attn.tau" in sd for i in range(depth)]
        n_local = sum(local)
        if local != [True] * n_local + [False] * (depth - n_local):
            raise CheckpointError("decoder blocks mix local and global layers in an order this package does not "
                                  "build (local blocks must come first)")
        mode = "local" if n_local == depth else "global" if n_local == 0 else "hybrid"
        heads = (sd["decoder_blocks.0.attn.tau"].shape[0] if n_local
                 else _DEFAULT_DECODER_HEADS.get(Dd, max(1, Dd // 32)))
        cfg.update(decoder_embed_dim=Dd, decoder_depth=depth, decoder_num_heads=heads, decoder_mode=mode)
        if mode == "hybrid":
            cfg["hybrid_local_depth"] = n_local
        if n_local:
            cfg["meta_hidden_dim"] = sd["decoder_blocks.0.attn.meta_mlp.fc1.weight"].shape[0]
    if "head.weight" in sd:
        cfg["num_classes"] = sd["head.weight"].shape[0]
        cfg["global_pool"] = "fc_norm.weight" in sd
    if isinstance(args, argparse.Namespace):
        cfg.update(_fields_from_args(vars(args), classifier="head.weight" in sd))
    return cfg


# release argument -> config field, by the script that wrote the checkpoint. The same names mean
# different things: main_pretrain.py's mask_2d / mask_t_prob / mask_f_prob choose and size the
# structured pretraining masking (random_masking_2d instead of random_masking(mask_ratio)), while
# main_finetune_as.py's size the 2D masking of the classifier's input tokens in fine-tuning.
_PRETRAIN_ARGS = {"norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio",
                  "mask_t_prob": "mask_t_prob", "mask_f_prob": "mask_f_prob"}
_FINETUNE_ARGS = {"mask_2d": "finetune_mask_2d", "mask_t_prob": "finetune_mask_t_prob",
                  "mask_f_prob": "finetune_mask_f_prob"}


def _fields_from_args(a: Dict[str, Any], classifier: bool) -> Dict[str, Any]:
    """Config fields from a released ``args`` namespace: a fine-tuning run's (``classifier``, the
    state dict has a head) or a pretraining run's. Values of the wrong type are ignored."""
    out: Dict[str, Any] = {}
    for arg, field in (_FINETUNE_ARGS if classifier else _PRETRAIN_ARGS).items():
        v = a.get(arg)
        if isinstance(v, (bool, int, float)):
            out[field] = type(getattr(AudioMAEConfig, field))(v)
    if not classifier:
        if a.get("mask_2d") is True:  # the release then masks time rows and frequency columns
            out["mask_mode"] = "time_frequency"
        if a.get("no_shift") is True:
            out["shift_size"] = (0, 0)
    return out


def _input_size(grid: Tuple[int, int], patch: int, stride: Optional[int] = None) -> Tuple[int, int]:
    """The input (frames, mel bins) for a patch grid: the release's input where its grid is this one
    (1024 frames at patch 14 give 73 time patches, the remainder dropped), else the least input with
    that grid (whole patches, or ``(n - 1) * stride + patch`` for patches every ``stride``)."""
    t, f = grid
    s = patch if stride is None else stride
    frames = next((n for n in _RELEASE_FRAMES if patch_grid((n, n), patch, s)[0] == t), (t - 1) * s + patch)
    mels = _RELEASE_MELS if patch_grid((_RELEASE_MELS,) * 2, patch, s)[0] == f else (f - 1) * s + patch
    return frames, mels


def _fixed_kind(table: torch.Tensor, grid: Tuple[int, int], overlapping: bool = False) -> Optional[str]:
    """Which fixed sin-cos table (``'released'`` or ``'grid'``) ``table`` is for ``grid`` (of
    overlapping patches or not: the release's table differs); None when it is neither (a trained
    table). On a one-row or one-column grid the two kinds coincide: 'released'."""
    if table.dim() != 3 or table.shape[1] - 1 != grid[0] * grid[1] or table.shape[-1] % 4:
        return None
    D = table.shape[-1]
    t = table.detach().float().cpu()
    # a table stored in half precision carries its rounding
    atol = max(1e-5, torch.finfo(table.dtype).eps) if table.is_floating_point() else 1e-5
    return next((k for k in POS_EMBED_KINDS if torch.allclose(t, sincos_2d(D, grid, k, overlapping=overlapping),
                                                              atol=atol)), None)


def _checkpoint_grid(name: str, table: torch.Tensor, patch: int, file_grid: Optional[Tuple[int, int]] = None,
                     stride: Optional[int] = None) -> Tuple[Tuple[int, int], Optional[str], Optional[int]]:
    """The patch grid (time, frequency) a checkpoint's position table ``name`` was made for, its fixed
    kind (``'released'`` / ``'grid'``, or None for a trained table), and the patches' stride where
    known (None: not told, taken as non-overlapping).

    The grid is ``file_grid`` (from the file's config, patches every ``stride``) when given.
    Otherwise it is the release's: ``128 // patch`` frequency patches (128 mel bins) or, for the
    release's table of overlapping patches (every 10, or every ``stride`` when the file's arguments
    say so), their 12; else the fixed sin-cos code of another grid names its grid. A trained table of
    another number of mel bins cannot be told from its shape: save such models with
    ``save_pretrained``, which records the config."""
    L = table.shape[1] - 1
    if file_grid is not None:
        if file_grid[0] * file_grid[1] != L:
            raise CheckpointError(
                f"{name}: the checkpoint's table has {L} positions, but the {file_grid[0]}x{file_grid[1]} "
                f"patch grid of its own config has {file_grid[0] * file_grid[1]}: the file's config does not "
                "describe its weights. Re-save the weights with the config they were trained with.")
        overlapping = stride is not None and stride < patch
        return tuple(file_grid), _fixed_kind(table, file_grid, overlapping), stride
    f = max(1, _RELEASE_MELS // patch)
    hint = (L // f, f) if L > 0 and L % f == 0 else None
    s = RELEASE_OVERLAP_STRIDE if stride is None else stride
    fo = patch_grid((_RELEASE_MELS,) * 2, patch, s)[0] if s < patch else 0
    # the release's overlapping patches: its table then codes frequency first (pos_embed.sincos_2d)
    overlap = (L // fo, fo) if fo and L > 0 and L % fo == 0 else None
    overlapping = stride is not None and stride < patch  # the file says its patches overlap
    if overlapping:
        hint = overlap  # the release's 12 frequency patches, else the grid the fixed table names
    elif stride is None:
        # The readings at 128 mel bins, non-overlapping first: the release's table of a 12-row grid is
        # that of a 12-column grid of overlapping patches, and most files are non-overlapping.
        kind = _fixed_kind(table, hint) if hint is not None else None
        if kind is not None:
            return hint, kind, None
        if overlap is not None and _fixed_kind(table, overlap, True) == "released":
            return overlap, "released", s
    grids = ([hint] if hint else []) + [(t, L // t) for t in range(1, L + 1) if L % t == 0 and (t, L // t) != hint]
    for grid in grids:
        kind = _fixed_kind(table, grid, overlapping)
        if kind is not None:
            return grid, kind, s if overlapping else None
    if hint is not None:
        # a trained table, read at the release's frequency count
        return hint, None, s if overlapping else None
    raise CheckpointError(
        f"{name}: the checkpoint's {L} positions fit no patch grid: the table is not the fixed sin-cos code "
        f"of any grid, and {L} is not a multiple of the {f} frequency patches of {_RELEASE_MELS} mel bins at "
        f"patch size {patch}. Load it at the size it was trained with (config= or img_size=, and patch_stride= "
        "for overlapping patches), then save it "
        "with save_pretrained, which records that size, before loading it at another.")


# --- loading into a model ------------------------------------------------------------------------
def _adapt_pos_table(name: str, old: torch.Tensor, new: torch.Tensor, old_grid: Tuple[int, int],
                     kind: Optional[str], new_grid: Tuple[int, int], overlapping: bool = False
                     ) -> Tuple[torch.Tensor, str]:
    """The model's table ``new`` for a checkpoint table ``old`` of another grid: the fixed sin-cos code
    of the checkpoint's ``kind`` rebuilt for the new grid, or, for a trained table (``kind`` None),
    ``old`` interpolated (bicubic over the patch grid)."""
    D = old.shape[-1]
    if kind is not None:
        what = "grid of overlapping patches" if overlapping else "grid"
        return (sincos_2d(D, new_grid, kind, overlapping=overlapping).to(new.dtype),
                f"{name}: fixed sin-cos table rebuilt for the {new_grid[0]}x{new_grid[1]} {what} "
                f"({kind!r} kind, as the checkpoint's {old_grid[0]}x{old_grid[1]} table)")
    body = old[:, 1:].reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2).float()
    body = F.interpolate(body, size=new_grid, mode="bicubic", align_corners=False)
    table = torch.cat([old[:, :1].float(), body.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1).to(old.dtype)
    return table, f"{name}: trained table interpolated from {old_grid[0]}x{old_grid[1]} to {new_grid[0]}x{new_grid[1]}"


def load_model(cls, src, config: Optional[AudioMAEConfig] = None, map_location="cpu", strict: bool = True,
               encoder_only: bool = False, **overrides):
    """Build ``cls`` (AudioMAE or AudioMAEClassifier) and load ``src`` into it; see ``from_pretrained``.

    ``encoder_only`` (AudioMAE) leaves the decoder's blocks out: the model embeds at input sizes whose
    patch grid the decoder's windows do not tile, and refuses to reconstruct."""

    if config is not None:
        config = AudioMAEConfig.of(config)  # a preset name or a dict of fields also do
    sd, file_cfg, args = read_checkpoint(src, map_location)
    if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
        raise CheckpointError("not an Audio-MAE state dict: patch_embed.proj.weight and cls_token are missing "
                              f"(first keys: {', '.join(list(sd)[:6])})")
    where = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "state dict"
    is_pretrain_model = cls.__name__ == "AudioMAE"
    has_decoder = any(k.startswith("decoder_") for k in sd)
    has_head = "head.weight" in sd
    if is_pretrain_model and not has_decoder:
        what = "a fine-tuned classifier (head.weight, fc_norm)" if has_head else "an encoder without a decoder"
        raise CheckpointError(
            f"{where} is {what}: the decoder weights (decoder_embed.*, decoder_blocks.*, decoder_pred.*, "
            "mask_token) are missing, so it cannot be loaded into the pretraining AudioMAE. Load it with "
            "AudioMAEClassifier.from_pretrained (which also gives embeddings).")

    heads_guessed = config is None and not file_cfg and "num_heads" not in overrides
    decoder_heads_guessed = config is None and not file_cfg and "decoder_num_heads" not in overrides
    if config is None:
        fields = dict(file_cfg) if file_cfg else infer_config(sd, args)
        if file_cfg is None and not has_decoder and not is_pretrain_model:
            fields.setdefault("num_classes", overrides.get("num_classes", AudioMAEConfig.num_classes))
        try:
            config = AudioMAEConfig.from_dict(fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: its configuration is not usable: {e}") from None
    if encoder_only:
        if not is_pretrain_model:
            raise TypeError("encoder_only is for AudioMAE.from_pretrained (a classifier has no decoder)")
        overrides.update(decoder_depth=0, hybrid_local_depth=None)
    if overrides:
        config = config.replace(**overrides)
    model = cls(config)
    target = model.state_dict()
    notes: List[str] = []

    sd = dict(sd)
    if encoder_only:
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder_blocks.")}
        model.encoder_only = True
    if not is_pretrain_model:
        dropped = sorted({k.split(".")[0] for k in sd
                          if k.startswith(("decoder_", "mask_token")) or (k.startswith("norm.") and "norm.weight" not in target)})
        if dropped:
            sd = {k: v for k, v in sd.items() if k.split(".")[0] not in dropped}
            notes.append("took the encoder of a pretraining checkpoint; dropped " + ", ".join(dropped))
        if ("head.weight" not in sd) or (sd["head.weight"].shape != target["head.weight"].shape):
            if "head.weight" in sd:
                notes.append(f"head for {sd['head.weight'].shape[0]} classes not loaded")
            notes.append(f"new head for {config.num_classes} classes (randomly initialised)")
            for k in ("head.weight", "head.bias"):
                sd[k] = target[k]
            if "fc_norm.weight" not in sd and "fc_norm.weight" in target:
                for k in ("fc_norm.weight", "fc_norm.bias"):
                    sd[k] = target[k]
                notes.append("new fc_norm (initialised to identity)")

    kinds = set()
    for name in _POS_KEYS:
        if name in sd and name in target and sd[name].shape != target[name].shape and \
                sd[name].dim() == 3 and sd[name].shape[-1] == target[name].shape[-1]:
            # the checkpoint's grid: its own config's, else what infer_config reads from the shapes
            file_grid, file_stride = None, None
            if file_cfg:
                try:
                    saved = AudioMAEConfig.from_dict(file_cfg)
                except (TypeError, ValueError) as e:
                    raise CheckpointError(f"{where}: its configuration is not usable: {e}") from None
                file_grid, file_stride = saved.grid_size, saved.stride
            elif isinstance(args, argparse.Namespace) and getattr(args, "use_custom_patch", None) is True:
                file_stride = RELEASE_OVERLAP_STRIDE
            old_grid, kind, _ = _checkpoint_grid(name, sd[name], sd["patch_embed.proj.weight"].shape[-1], file_grid,
                                                 file_stride)
            sd[name], msg = _adapt_pos_table(name, sd[name], target[name], old_grid, kind, config.grid_size,
                                             config.overlapping)
            notes.append(msg)
            if kind is not None:
                kinds.add(kind)
    if len(kinds) == 1 and config.pos_embed_kind not in kinds:
        kind = kinds.pop()
        notes.append(f"pos_embed_kind={kind!r} (the checkpoint's tables), not {config.pos_embed_kind!r}")
        config = config.replace(pos_embed_kind=kind)
        model.config = config

    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in target if k in sd and sd[k].shape != target[k].shape]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if mismatched:
            parts.append("shape mismatch: " + "; ".join(mismatched[:10]) + (" ..." if len(mismatched) > 10 else ""))
        if missing:
            parts.append("missing from the checkpoint: " + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            parts.append("not in the model: " + ", ".join(unexpected[:12]) + (" ..." if len(unexpected) > 12 else ""))
        raise CheckpointError(
            f"{where} does not fit {cls.__name__} with embed_dim={config.embed_dim}, depth={config.depth}, "
            f"img_size={config.img_size}, decoder_mode={config.decoder_mode}: " + " | ".join(parts))
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=strict)
    if heads_guessed and config.embed_dim not in _DEFAULT_HEADS:  # a preset's width: its head count
        notes.append(f"the file records no configuration and the weights do not hold the head count: assumed "
                     f"num_heads={config.num_heads} for width {config.embed_dim} (pass num_heads= if the model "
                     "had another)")
    if decoder_heads_guessed and has_decoder and config.decoder_mode == "global" \
            and config.decoder_embed_dim not in _DEFAULT_DECODER_HEADS:
        notes.append(f"the file records no configuration and a global decoder's weights do not hold its head count: "
                     f"assumed decoder_num_heads={config.decoder_num_heads} for width {config.decoder_embed_dim} "
                     "(pass decoder_num_heads= if the model had another)")
    # the run that trained these weights (its single-label flag, class names, input statistics), kept for
    # save_pretrained to write again: only for the model the file holds, not for a new head on its encoder
    same_kind = has_head == (not is_pretrain_model) and not any(n.startswith("new head") for n in notes)
    model._run_args = args if same_kind else None
    model.eval()  # loaded for use; training loops switch to train()
    if notes:
        warnings.warn(f"loading {where} into {cls.__name__}: " + "; ".join(notes), CheckpointAdaptedWarning,
                      stacklevel=3)
    return model


# --- writing -------------------------------------------------------------------------------------
PARTIAL_PREFIX = ".tmp-"


def remove_partial_saves(folder: str, min_age_s: float = 10.0) -> List[Tuple[str, int]]:
    """Delete the temporary files of :func:`atomic_save` in ``folder`` whose writer is gone (a process
    killed while it wrote a checkpoint leaves one, as large as the checkpoint). A file some process
    still writes holds a lock and is kept; so is one younger than ``min_age_s`` (the moment between
    its creation and its lock). Returns ``(name, size)`` of each deleted file. Without ``fcntl``
    (Windows) nothing is deleted."""
    removed: List[Tuple[str, int]] = []
    if fcntl is None or not os.path.isdir(folder):
        return removed
    import time
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(PARTIAL_PREFIX) and name.endswith(".pt")):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # renamed or removed meanwhile
        try:
            st = os.fstat(fd)
            if time.time() - st.st_mtime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer
            try:
                os.unlink(path)
            except OSError:
                continue
            removed.append((name, st.st_size))
        finally:
            os.close(fd)
    return removed


def atomic_save(obj: Any, path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename into place (``~`` is the home
    folder)."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        what = "it is a folder" if os.path.isdir(path) else "a name ending in / is a folder's"
        raise CheckpointError(f"cannot write {path}: {what}; give a file name (e.g. "
                              f"{os.path.join(path, 'model.pt')})")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".pt", dir=folder)
    try:
        if fcntl is not None:
            # held while the file is written and renamed: remove_partial_saves tells a write in
            # progress from one a killed process left by this lock
            fcntl.flock(fd, fcntl.LOCK_EX)
        # mkstemp makes the file private (0600): give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # torch's writer reports a failed write (a full disk) as a RuntimeError whose cause is the OSError
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(e, RuntimeError) and cause is not None:
            raise OSError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from None
        raise


_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _check_loadable(value: Any, where: str) -> None:
    """Extra entries of a saved model must be what a safe load (``weights_only=True`` with
    ``argparse.Namespace``, as :func:`torch_load` reads) gives back: tensors, numbers, strings,
    dtypes, devices, sizes, None, ``argparse.Namespace`` (the release's ``args``), and lists, tuples
    and dicts (also ordered ones, as ``state_dict()`` returns) of them."""
    # exact types: numpy's float64 is a float, but pickles as a numpy scalar that a safe load refuses
    if type(value) in _SAFE_LEAVES or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple, set):
        for i, v in enumerate(value):
            _check_loadable(v, f"{where}[{i}]")
        return
    if type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            if type(k) not in _SAFE_LEAVES:
                raise TypeError(f"save_pretrained: the key {k!r} in {where} is a {type(k).__name__}; a safe load "
                                "reads back only str and number keys")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if type(value) is argparse.Namespace:
        _check_loadable(dict(vars(value)), where)
        return
    raise TypeError(f"save_pretrained: {where} is a {type(value).__module__}.{type(value).__name__}, which a safe "
                    "load (weights_only=True) would refuse, making the file unreadable: convert it to a str, number, "
                    "list, dict or tensor")


def _plain_paths(args: Any) -> Any:
    """Run options with their pathlib paths (a release run launched with submitit holds some) as
    strings: the file written needs no more than the namespace allowed to be read safely."""
    if isinstance(args, argparse.Namespace):
        return argparse.Namespace(**_plain_paths(vars(args)))
    if isinstance(args, dict):
        return {k: str(v) if isinstance(v, pathlib.PurePath) else v for k, v in args.items()}
    return args


# the entries a saved model's file holds of its own: extra entries cannot replace them
RESERVED_ENTRIES = ("model", "config", "format", "version", "kind")


def save_model(model, path, extra: Optional[Dict[str, Any]] = None, **more) -> None:
    """Write ``{'model': state_dict (released key names), 'config': dict, 'format': 'audiomae', ...}``,
    or a safetensors file (config in its metadata) when ``path`` ends with ``.safetensors``; ``extra``
    (and keyword arguments) are further entries, none of :data:`RESERVED_ENTRIES`."""
    from . import __version__

    extra = {**(extra or {}), **more}
    taken = [k for k in RESERVED_ENTRIES if k in extra]
    if taken:
        raise ValueError(f"save_pretrained: {', '.join(taken)} {'is an entry' if len(taken) == 1 else 'are entries'} "
                         f"of the model's own ({', '.join(RESERVED_ENTRIES)}); give the extra entr"
                         f"{'y' if len(taken) == 1 else 'ies'} another name (e.g. train_{taken[0]})")

    if getattr(model, "encoder_only", False):
        raise CheckpointError(f"cannot write {os.fspath(path)}: this AudioMAE was loaded with encoder_only=True, "
                              "without its decoder blocks; the file would load as a model with no decoder blocks "
                              "(save the full model, or the encoder's embeddings)")
    path = os.path.expanduser(os.fspath(path))
    run = _plain_paths(getattr(model, "_run_args", None))  # the run options of the file it was loaded from
    if "args" not in extra and run is not None:
        if not path.lower().endswith(".safetensors"):
            extra["args"] = run
        elif isinstance(run, dict):  # the metadata is JSON: this package's options, when they are plain
            try:
                json.dumps(run, allow_nan=False)
                extra["args"] = run
            except (TypeError, ValueError):
                pass
    for key, value in extra.items():
        _check_loadable(value, key)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg = model.config.to_file_dict()
    if path.lower().endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CheckpointError("writing .safetensors needs the safetensors package (pip install safetensors)") from None
        meta = {"config": json.dumps(cfg), "format": FORMAT, "version": __version__}
        if extra:
            try:  # safetensors metadata is text: the extras go in as JSON
                meta["extra"] = json.dumps(extra, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"save_pretrained to {path}: the extra entries go into the safetensors metadata as "
                                f"JSON, which cannot hold them ({e}); save to a .pt file for tensors") from None
        if os.path.isdir(path):
            raise CheckpointError(f"cannot write {path}: it is a folder; give a file name")
        save_file(sd, path, metadata=meta)
        return
    atomic_save({"model": sd, "config": cfg, "format": FORMAT, "version": __version__,
                 "kind": type(model).__name__, **extra}, path)
