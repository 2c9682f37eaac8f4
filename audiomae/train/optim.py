"""Optimiser pieces of the paper's recipes: parameter groups, layer-wise lr decay, the lr schedule."""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

# Weight decay follows the release: never on 1-D parameters (norms, temperatures) or biases, and
# never on the parameters a recipe names. Its pretraining (timm's ``add_weight_decay``, no names)
# decays the cls and mask tokens; its fine-tuning (BEiT's ``param_groups_lrd`` with the ViT's
# ``no_weight_decay()``) leaves out the position table and the cls token.
PRETRAIN_NO_DECAY: tuple = ()
FINETUNE_NO_DECAY = ("pos_embed", "cls_token", "dist_token")
#: what this package's pretraining runs left undecayed before it followed the release (their resumes)
LEGACY_NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def no_weight_decay(name: str, param, skip: Sequence[str] = PRETRAIN_NO_DECAY) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def layer_id(name: str, num_layers: int) -> int:
    """Layer index for layer-wise lr decay (the release's ``get_layer_id_for_vit``): tokens, position
    table and patch embedding are layer 0, ``blocks.i`` is layer ``i + 1``, everything after the
    blocks (fc_norm, head) is layer ``num_layers + 1``."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                 skip: Sequence[str] = PRETRAIN_NO_DECAY) -> List[Dict]:
    """AdamW parameter groups: no decay on 1-D parameters, biases and the parameters named in ``skip``
    (the pretraining rule by default, :data:`FINETUNE_NO_DECAY` for the classifier); with
    ``layer_decay`` each group carries ``lr_scale = layer_decay ** (num_layers + 1 - layer)``.
    Frozen parameters (the fixed position tables) are left out."""
    num_layers = len(getattr(model, "blocks", []))
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if no_weight_decay(name, p, skip) else weight_decay
        lid = layer_id(name, num_layers) if layer_decay is not None else 0
        key = (decay, lid)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": decay, "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def adamw(groups: List[Dict], lr: float, betas=(0.9, 0.95), fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over ``groups`` (from :func:`param_groups`, ``names`` dropped). ``fused=None`` picks
    PyTorch's single-kernel AdamW when every parameter is on a CUDA device (the update itself is
    the same; the default multi-tensor one launches a kernel per step of the formula) and the
    default elsewhere."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if fused else None)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Per-step linear warmup to ``lr``, then half-cosine decay to ``min_lr`` at ``total_steps`` (a floor
    above ``lr`` is taken as ``lr``: the schedule never climbs after the warmup)."""
    min_lr = min(min_lr, lr)
    if warmup_steps > 0 and step < warmup_steps:
        return lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def effective_lr(blr: float, effective_batch: int) -> float:
    """The paper's scaling: ``lr = blr * effective batch / 256``."""
    return blr * effective_batch / 256
