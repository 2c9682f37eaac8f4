"""Reading and writing checkpoints: released files, bare state dicts, safetensors, this package's files.

Loading never executes code from a file: ``torch.load(weights_only=True)`` with only
``argparse.Namespace`` (the release's ``args`` entry) allowed beyond plain containers and tensors.
All adaptation (configuration inferred from shapes, another input length, a pretraining
checkpoint into the classifier) happens here, in one place, and says what it did.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import PRESETS, AudioMAEConfig
from .pos_embed import sincos_2d

FORMAT = "audiomae"
_PREFIXES = ("module.", "_orig_mod.")
_POS_KEYS = ("pos_embed", "decoder_pos_embed")
# head counts cannot be read from weights: take the preset's for that width
_DEFAULT_HEADS = {p["embed_dim"]: p["num_heads"] for p in PRESETS.values()}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the requested model."""


class CheckpointAdaptedWarning(UserWarning):
    """A checkpoint was loaded with an adaptation (dropped parts, new head, rebuilt position tables)."""


# --- reading -------------------------------------------------------------------------------------
def read_checkpoint(src, map_location="cpu") -> Tuple[Dict[str, torch.Tensor], Optional[dict], Any]:
    """Return ``(state_dict, config_dict or None, released args or None)`` from a path or a dict."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if os.path.isdir(path):
            raise CheckpointError(f"{path} is a directory, not a checkpoint file")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        if path.endswith(".safetensors"):
            return _read_safetensors(path, map_location)
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive (or, with the legacy format, a pickle: protocol byte 0x80)
        if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; "
                                  f"this file starts with {head!r})")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location=map_location, weights_only=True)
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
    cfg = json.loads(meta["config"]) if "config" in meta else None
    return _strip(sd), cfg, None


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
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: the state dict holds non-tensor entries: {', '.join(map(str, bad[:8]))}")
    return _strip(sd), cfg, args


def _strip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


# --- configuration from a file -------------------------------------------------------------------
def _count(sd, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: Dict[str, torch.Tensor], args: Any = None) -> Dict[str, Any]:
    """Configuration fields that a state dict's shapes (and a released ``args`` namespace) determine.

    The encoder's head count is not in the weights: it is the preset's for that width (6, 12, 16 for
    384, 768, 1024), else ``width // 64``; pass ``config=`` for other models."""
    if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
        raise CheckpointError("not an Audio-MAE state dict: patch_embed.proj.weight and cls_token are missing "
                              f"(first keys: {', '.join(list(sd)[:6])})")
    w = sd["patch_embed.proj.weight"]
    D, in_chans, p = w.shape[0], w.shape[1], w.shape[-1]
    cfg: Dict[str, Any] = dict(embed_dim=D, in_chans=in_chans, patch_size=p, depth=_count(sd, "blocks."),
                               num_heads=_DEFAULT_HEADS.get(D, max(1, D // 64)))
    if "blocks.0.mlp.fc1.weight" in sd:
        cfg["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / D
    if "pos_embed" in sd:
        L = sd["pos_embed"].shape[1] - 1
        f = 128 // p
        if L % f == 0:
            cfg["img_size"] = (L // f * p, 128)
    if "decoder_embed.weight" in sd:
        Dd = sd["decoder_embed.weight"].shape[0]
        depth = _count(sd, "decoder_blocks.")
        local = [f"decoder_blocks.{i}.attn.tau" in sd for i in range(depth)]
        n_local = sum(local)
        if local != [True] * n_local + [False] * (depth - n_local):
            raise CheckpointError("decoder blocks mix local and global layers in an order this package does not "
                                  "build (local blocks must come first)")
        mode = "local" if n_local == depth else "global" if n_local == 0 else "hybrid"
        heads = sd["decoder_blocks.0.attn.tau"].shape[0] if n_local else _DEFAULT_HEADS.get(Dd, max(1, Dd // 32))
        cfg.update(decoder_embed_dim=Dd, decoder_depth=depth, decoder_num_heads=heads, decoder_mode=mode)
        if mode == "hybrid":
            cfg["hybrid_local_depth"] = n_local
        if n_local:
            cfg["meta_hidden_dim"] = sd["decoder_blocks.0.attn.meta_mlp.fc1.weight"].shape[0]
    if "head.weight" in sd:
        cfg["num_classes"] = sd["head.weight"].shape[0]
        cfg["global_pool"] = "fc_norm.weight" in sd
    if isinstance(args, argparse.Namespace):
        a = vars(args)
        for name in ("norm_pix_loss", "mask_ratio", "mask_t_prob", "mask_f_prob"):
            if isinstance(a.get(name), (bool, int, float)) and not isinstance(a.get(name), str):
                cfg[name] = type(getattr(AudioMAEConfig, name))(a[name])
        if a.get("no_shift"):
            cfg["shift_size"] = (0, 0)
        if isinstance(a.get("mask_2d"), bool) and "head.weight" in sd:
            cfg["finetune_mask_2d"] = a["mask_2d"]
    return cfg


# --- loading into a model ------------------------------------------------------------------------
def _grid_of(table: torch.Tensor, grid_f: int) -> Optional[Tuple[int, int]]:
    L = table.shape[1] - 1
    return (L // grid_f, grid_f) if L % grid_f == 0 else None


def _adapt_pos_table(name: str, old: torch.Tensor, new: torch.Tensor, kind: str, new_grid) -> Tuple[torch.Tensor, str]:
    """The model's table for a checkpoint table of another grid: rebuilt when the checkpoint holds the
    fixed sin-cos code of its grid, interpolated (bicubic over the patch grid) when it was trained."""
    D = old.shape[-1]
    old_grid = _grid_of(old, new_grid[1])
    if old_grid is None:
        raise CheckpointError(f"{name}: {old.shape[1] - 1} positions do not form a grid with "
                              f"{new_grid[1]} frequency patches")
    fixed = any(torch.allclose(old.float().cpu(), sincos_2d(D, old_grid, k), atol=1e-5) for k in ("released", "grid"))
    if fixed:
        return new, f"{name}: fixed sin-cos table rebuilt for the {new_grid[0]}x{new_grid[1]} grid"
    body = old[:, 1:].reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2).float()
    body = F.interpolate(body, size=new_grid, mode="bicubic", align_corners=False)
    table = torch.cat([old[:, :1].float(), body.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1).to(old.dtype)
    return table, f"{name}: trained table interpolated from {old_grid[0]}x{old_grid[1]} to {new_grid[0]}x{new_grid[1]}"


def load_model(cls, src, config: Optional[AudioMAEConfig] = None, map_location="cpu", strict: bool = True,
               **overrides):
    """Build ``cls`` (AudioMAE or AudioMAEClassifier) and load ``src`` into it; see ``from_pretrained``."""

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

    if config is None:
        fields = dict(file_cfg) if file_cfg else infer_config(sd, args)
        if file_cfg is None and not has_decoder and not is_pretrain_model:
            fields.setdefault("num_classes", overrides.get("num_classes", AudioMAEConfig.num_classes))
        try:
            config = AudioMAEConfig.from_dict(fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: its configuration is not usable: {e}") from None
    if overrides:
        config = config.replace(**overrides)
    model = cls(config)
    target = model.state_dict()
    notes: List[str] = []

    sd = dict(sd)
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

    for name in _POS_KEYS:
        if name in sd and name in target and sd[name].shape != target[name].shape and \
                sd[name].shape[-1] == target[name].shape[-1]:
            sd[name], msg = _adapt_pos_table(name, sd[name], target[name], config.pos_embed_kind, config.grid_size)
            notes.append(msg)

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
    if notes:
        warnings.warn(f"loading {where} into {cls.__name__}: " + "; ".join(notes), CheckpointAdaptedWarning,
                      stacklevel=3)
    return model


# --- writing -------------------------------------------------------------------------------------
def atomic_save(obj: Any, path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model, path, **extra) -> None:
    """Write ``{'model': state_dict (released key names), 'config': dict, 'format': 'audiomae', ...}``,
    or a safetensors file (config in its metadata) when ``path`` ends with ``.safetensors``."""
    from . import __version__

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    if os.fspath(path).endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CheckpointError("writing .safetensors needs the safetensors package (pip install safetensors)") from None
        save_file(sd, os.fspath(path), metadata={"config": json.dumps(cfg), "format": FORMAT})
        return
    atomic_save({"model": sd, "config": cfg, "format": FORMAT, "version": __version__,
                 "kind": type(model).__name__, **extra}, path)
