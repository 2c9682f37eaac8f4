"""Training checkpoints that never lose work: atomic writes, full state, exact resume."""
from __future__ import annotations

import os
import sys
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..checkpoint import CheckpointError, atomic_save, torch_load

LAST = "checkpoint-last.pt"
BEST = "checkpoint-best.pt"


def rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_training_state(path: str, *, model, optimizer, scaler, step: int, epoch: int, epoch_step: int,
                        args: Dict[str, Any], schedule: Dict[str, Any], best: Optional[float] = None,
                        extra: Optional[Dict[str, Any]] = None) -> None:
    """Everything a run needs to continue: model (released key names, so ``from_pretrained`` reads
    it), optimizer, lr schedule, grad scaler, step counters, RNG states, model config and run args."""
    from .. import __version__

    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_file_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "schedule": schedule,
        "step": step, "epoch": epoch, "epoch_step": epoch_step, "best": best,
        "rng": rng_state(), "args": args,
        "format": "audiomae", "kind": type(model).__name__, "version": __version__,
    }
    if extra:
        state.update(extra)
    atomic_save(state, path)


def load_training_state(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"cannot resume: {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save: a zip archive or a pickle
        raise CheckpointError(f"cannot resume from {path}: not a PyTorch checkpoint (it starts with {head!r})")
    try:
        state = torch_load(path, map_location)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from None
    except Exception as e:
        # torch's message spans many lines and suggests weights_only=False, which would run code from
        # the file: only the line that says what is wrong
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0] if lines else "")
        raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {why}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume from {path}: not a training checkpoint (a {type(state).__name__})")
    missing = [k for k in ("model", "optimizer", "step", "epoch", "epoch_step", "rng", "schedule") if k not in state]
    rng = state.get("rng")
    if "rng" not in missing and not (isinstance(rng, dict) and all(k in rng for k in ("torch", "python", "numpy"))):
        missing.append("the rng's torch, python and numpy states")
    if not isinstance(state.get("schedule", {}), dict):
        missing.append("a schedule dict")
    if missing:
        raise CheckpointError(f"cannot resume from {path}: not a training checkpoint (missing {', '.join(missing)}); "
                              "use it with --init/--pretrained instead")
    return state


def resolve_resume(resume: Optional[str], out_dir: str) -> Optional[str]:
    """``auto`` -> the run folder's last checkpoint when there is one; a folder -> its last checkpoint;
    a path -> that path."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(out_dir, LAST)
        if os.path.isfile(path):
            return path
        if os.environ.get("RANK", "0") == "0":
            print(f"note: --resume auto: no checkpoint in {out_dir} yet ({LAST}); starting from the beginning",
                  file=sys.stderr)
        return None
    if os.path.isdir(resume):
        # a run folder: its last checkpoint, as "auto" reads the output folder's
        path = os.path.join(resume, LAST)
        if os.path.isfile(path):
            return path
        held = sorted(n for n in os.listdir(resume) if n.startswith("checkpoint-") and n.endswith(".pt"))
        raise CheckpointError(f"cannot resume: {resume} is a folder without {LAST}"
                              + (f" (it holds {', '.join(held)}: give one of them)" if held else ""))
    return resume
