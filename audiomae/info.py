"""What can run here: ``python -m audiomae.info``.

Prints the versions (Python, torch, Triton, CUDA), the backend overrides in force, and for every
registered op and a small example input on each device, which backend the automatic choice takes
and why each other backend cannot run.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Callable, Dict, List, Tuple

import torch

from . import __version__, dispatch

# modules that register op implementations with the dispatcher (optional ones are skipped)
OP_MODULES = ("ops", "ops_step", "ops_cuda")


def _import_op_modules() -> List[str]:
    problems = []
    for name in OP_MODULES:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except Exception as e:
            problems.append(f"audiomae.{name} not importable ({type(e).__name__}: {e})")
    return problems


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# Example inputs, small but shaped as the model calls each op: op -> (device, dtype) -> (args, text)
def _window_attention_example(device: str, dtype: torch.dtype) -> Tuple[tuple, str]:
    grid, window, shift, heads, head_dim = (8, 8), (4, 4), (2, 0), 16, 32
    C = heads * head_dim
    qkv = torch.zeros(1, grid[0] * grid[1], 3 * C, device=device, dtype=dtype)
    tau = torch.ones(heads, device=device, dtype=dtype)
    bias = torch.zeros(heads, window[0] * window[1], window[0] * window[1], device=device, dtype=dtype)
    desc = (f"qkv {list(qkv.shape)} {_dtype_name(dtype)} on {device}, grid {grid[0]}x{grid[1]}, "
            f"window {window[0]}x{window[1]}, shift {shift}, {heads} heads of {head_dim}")
    return (qkv, tau, bias, grid, window, shift, heads), desc


def _masked_patch_embed_example(device, dtype):
    spec = torch.zeros(2, 1, 256, 128, device=device, dtype=dtype)
    weight, bias = torch.zeros(64, 1, 16, 16, device=device, dtype=dtype), torch.zeros(64, device=device, dtype=dtype)
    pos = torch.zeros(1, 129, 64, device=device, dtype=dtype)
    ids_keep = torch.zeros(2, 25, dtype=torch.int64, device=device)
    return (spec, weight, bias, pos, ids_keep), f"spec {list(spec.shape)} {_dtype_name(dtype)} on {device}, 25 kept"


def _decoder_unshuffle_example(device, dtype):
    x = torch.zeros(2, 26, 64, device=device, dtype=dtype)
    mask_token = torch.zeros(1, 1, 64, device=device, dtype=dtype)
    pos = torch.zeros(1, 129, 64, device=device, dtype=dtype)
    ids_restore = torch.zeros(2, 128, dtype=torch.int64, device=device)
    return (x, mask_token, ids_restore, pos, False), f"x {list(x.shape)} {_dtype_name(dtype)} on {device}, 128 tokens"


def _masked_norm_pix_loss_example(device, dtype):
    pred = torch.zeros(2, 128, 256, device=device, dtype=dtype)
    spec = torch.zeros(2, 1, 256, 128, device=device, dtype=dtype)
    mask = torch.ones(2, 128, device=device, dtype=dtype)
    return (pred, spec, mask, 16, True), f"pred {list(pred.shape)} {_dtype_name(dtype)} on {device}, patch 16"


def _fbank_features_example(device, dtype):
    waves = torch.zeros(2, 16000, device=device)
    return (waves, 128, "audioset", dtype), f"waveforms {list(waves.shape)} on {device} -> {_dtype_name(dtype)}"


def _gelu_mlp_example(device, dtype):
    x = torch.zeros(2, 64, 512, device=device, dtype=dtype)
    w1, b1 = torch.zeros(2048, 512, device=device, dtype=dtype), torch.zeros(2048, device=device, dtype=dtype)
    w2, b2 = torch.zeros(512, 2048, device=device, dtype=dtype), torch.zeros(512, device=device, dtype=dtype)
    return (x, w1, b1, w2, b2), f"x {list(x.shape)} {_dtype_name(dtype)} on {device}, 512 -> 2048 -> 512"


def _random_masking_ids_example(device, dtype):
    return (2, 128, 25, torch.device(device)), f"2 x 128 patches on {device}, 25 kept"


EXAMPLES: Dict[str, Callable[[str, torch.dtype], Tuple[tuple, str]]] = {
    "random_masking_ids": _random_masking_ids_example,
    "window_attention": _window_attention_example,
    "masked_patch_embed": _masked_patch_embed_example,
    "decoder_unshuffle": _decoder_unshuffle_example,
    "masked_norm_pix_loss": _masked_norm_pix_loss_example,
    "fbank_features": _fbank_features_example,
    "gelu_mlp": _gelu_mlp_example,
}


def _versions() -> List[str]:
    lines = [f"audiomae {__version__}", f"python {platform.python_version()} ({sys.platform})",
             f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # missing or broken
        lines.append(f"triton not importable ({type(e).__name__}: {e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), "
                         f"CUDA runtime {torch.version.cuda}")
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "torch built without CUDA"
        lines.append(f"CUDA not available ({built})")
    for var in (dispatch.ENV_VAR, "AUDIOMAE_CUDA_WA_KERNEL", "TRITON_INTERPRET"):
        lines.append(f"{var}={os.environ.get(var, '')!r}")
    return lines


def _devices() -> List[Tuple[str, torch.dtype]]:
    out = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        out += [("cuda", torch.bfloat16), ("cuda", torch.float32)]
    return out


def report() -> str:
    """The whole report as text."""
    lines = _versions() + _import_op_modules()
    for op in dispatch.registered_ops():
        order = dispatch.preference(op)
        forced = dispatch.forced_backend(op)
        registered = [b for b in dispatch.BACKENDS if b in getattr(dispatch, "_REGISTRY", {}).get(op, {})]
        lines += ["", f"{op} (implementations: {', '.join(registered)}; automatic order: {', '.join(order)}"
                  + (f"; forced: {forced})" if forced else ")")]
        example = EXAMPLES.get(op)
        if example is None:
            lines.append("  (no example input to check the backends with)")
            continue
        for device, dtype in _devices():
            try:
                args, desc = example(device, dtype)
                try:
                    chosen = dispatch.would_choose(op, *args)
                except dispatch.BackendUnavailableError as e:
                    chosen = f"none ({e})"
                lines.append(f"  {desc}: runs on {chosen}")
                slower = dispatch.passed_over(op, *args)
                for backend, why in dispatch.reasons(op, *args).items():
                    text = "available" if not why else "unavailable: " + "; ".join(why)
                    if not why and slower.get(backend):
                        text += " (passed over: " + "; ".join(slower[backend]) + ")"
                    elif not why and backend not in order:
                        text += " (when asked for: not in the automatic order)"
                    lines.append(f"    {backend:<7} {text}")
            except Exception as e:  # an example out of date with its op must not break the report
                lines.append(f"  (example on {device} failed: {type(e).__name__}: {e})")
    return "\n".join(lines)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2 ** 20:.1f} MiB" if n_bytes >= 2 ** 20 else f"{n_bytes / 1024:.1f} KiB"


def _safetensors_metadata(path: str) -> dict:
    """The text metadata of a safetensors file (this package writes its format and version there)."""
    from safetensors import safe_open  # read_checkpoint has read the file, so the package is there
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def describe_checkpoint(path: str) -> str:
    """What a checkpoint file holds, as text: who wrote it, the model (read from the file's config, or
    inferred from its shapes and the release's ``args``), its parameter count, the training progress
    of a training checkpoint, and the input options its run recorded."""
    from .checkpoint import CheckpointError, infer_config, is_safetensors, read_checkpoint, reading_once, torch_load
    from .config import AudioMAEConfig

    path = os.path.expanduser(os.fspath(path))
    with reading_once():
        sd, file_cfg, args = read_checkpoint(path)
        raw = _safetensors_metadata(path) if is_safetensors(path) else torch_load(path)
    raw = raw if isinstance(raw, dict) else {}
    lines = [f"checkpoint {path} ({_size(os.path.getsize(path))})"]
    if raw.get("format") == "audiomae" or file_cfg is not None:
        training = "optimizer" in raw
        what = "training checkpoint" if training else "model file"
        lines.append(f"written by audiomae {raw.get('version', '(version not recorded)')}: {what}")
    elif "model" in raw and args is not None:
        lines.append("written by the released code (a dict with 'model' and its run's 'args')")
    else:
        lines.append("a bare state dict (no configuration recorded: the model is inferred from its shapes)")
    if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
        raise CheckpointError(f"{path}: not an Audio-MAE checkpoint: patch_embed.proj.weight and cls_token are "
                              f"missing (first keys: {', '.join(list(sd)[:6])})")
    pretraining = any(k.startswith("decoder_") for k in sd)
    try:
        cfg = AudioMAEConfig.from_dict(dict(file_cfg) if file_cfg else infer_config(sd, args))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its configuration is not usable: {e}") from None
    grid_problem = None
    table = sd.get("pos_embed", sd.get("decoder_pos_embed"))
    if not file_cfg and table is not None and table.dim() == 3:
        from .checkpoint import _checkpoint_grid
        try:  # infer_config falls back to the default input when the table fits no grid: say so instead
            _checkpoint_grid("pos_embed", table, cfg.patch_size, stride=cfg.stride if cfg.overlapping else None)
        except CheckpointError as e:
            grid_problem = str(e)
    if pretraining:
        lines.append("model: pretraining Audio-MAE (encoder and decoder); embeds, reconstructs, fine-tunes")
    elif "head.weight" in sd:
        from .commands import _scoring, _single_label
        pool = "mean of the patch tokens" if cfg.global_pool else "cls token"
        n = cfg.num_classes
        lines.append(f"model: classifier, {n} class{'es' if n != 1 else ''} ({pool}); classify gives "
                     f"{_scoring(_single_label({}, args))}")
    else:
        lines.append("model: encoder only (no decoder, no head)")
    from .checkpoint import _DEFAULT_DECODER_HEADS, _DEFAULT_HEADS

    def guess(width: int, table: dict, per_head: int) -> str:
        """How the head count was chosen where the weights do not hold it."""
        return (" (not in the weights: the preset's for this width)" if width in table else
                f" (not in the weights: width / {per_head})")

    guessed = "" if file_cfg else guess(cfg.embed_dim, _DEFAULT_HEADS, 64)
    heads = f"{cfg.num_heads} head{'s' if cfg.num_heads != 1 else ''}"
    lines.append(f"encoder: width {cfg.embed_dim}, depth {cfg.depth}, {heads}{guessed}, MLP "
                 f"{int(cfg.embed_dim * cfg.mlp_ratio)}")
    T, F = cfg.img_size
    t, f = cfg.grid_size
    every = f" every {cfg.stride} (overlapping)" if cfg.overlapping else ""
    if grid_problem:
        lines.append(f"input: not known from the file ({grid_problem})")
    else:
        lines.append(f"input: {T} frames x {F} mel bins ({T * 0.01:.2f} s); patches {cfg.patch_size} x "
                     f"{cfg.patch_size}{every}, a {t} x {f} grid of {t * f}; position table {cfg.pos_embed_kind!r}")
    if pretraining:
        dec_guessed = "" if file_cfg or cfg.decoder_mode != "global" else \
            guess(cfg.decoder_embed_dim, _DEFAULT_DECODER_HEADS, 32)
        dec = f"decoder: {cfg.decoder_mode}, {cfg.decoder_depth} blocks, width {cfg.decoder_embed_dim}, " \
              f"{cfg.decoder_num_heads} head{'s' if cfg.decoder_num_heads != 1 else ''}{dec_guessed}"
        if cfg.num_local_blocks:
            dec += (f" ({cfg.num_local_blocks} local: {cfg.window[0]} x {cfg.window[1]} windows, "
                    f"shift {cfg.shift_size})" if cfg.decoder_mode == "hybrid" else
                    f", {cfg.window[0]} x {cfg.window[1]} windows, shift {cfg.shift_size}")
        lines.append(dec)
        ratio = (f"{cfg.mask_t_prob:g} of the time rows and {cfg.mask_f_prob:g} of the frequency columns"
                 if cfg.mask_mode == "time_frequency" else f"ratio {cfg.mask_ratio:g}")
        lines.append(f"masking: {cfg.mask_mode}, {ratio}; {'norm-pix' if cfg.norm_pix_loss else 'plain'} loss")
    fixed_names = ("pos_embed", "decoder_pos_embed")  # the models' only parameters without gradients
    trainable = sum(v.numel() for k, v in sd.items() if k not in fixed_names)
    fixed = sum(v.numel() for k, v in sd.items() if k in fixed_names)
    lines.append(f"parameters: {trainable:,} trainable, {fixed:,} fixed (the position tables)")
    if isinstance(raw.get("step"), int) and isinstance(raw.get("epoch"), int):
        # "epoch" is the epoch in progress (0-based), "epoch_step" the steps taken in it
        sched = raw.get("schedule") if isinstance(raw.get("schedule"), dict) else {}
        total = sched.get("total_steps")
        done = raw["epoch"]
        k = raw.get("epoch_step")
        progress = [f"{done} epoch{'' if done == 1 else 's'} done"
                    + (f" and {k} step{'' if k == 1 else 's'} of the next" if k else ""),
                    f"step {raw['step']}" + (f" of {total}" if isinstance(total, int) else "")]
        if isinstance(sched.get("lr"), float):
            progress.append(f"peak lr {sched['lr']:.3g}")
        if isinstance(raw.get("best"), (int, float)):
            progress.append(f"best score {raw['best']:.4f}")
        finished = isinstance(total, int) and raw["step"] >= total
        lines.append("training: " + ", ".join(progress)
                     + (" (finished: a resume with more --epochs trains on)" if finished else " (--resume continues it)"))
    elif isinstance(raw.get("epoch"), int) and args is not None and not isinstance(args, dict):
        lines.append(f"training: the release's run, saved after {raw['epoch'] + 1} epochs")
    from .checkpoint import run_options
    recorded = run_options(args)
    inputs = [f"{k} {recorded[k]}" for k in ("command", "stats", "dataset", "clip_seconds", "target_length",
                                              "downmix") if recorded.get(k) not in (None, "")]
    if recorded.get("class_names"):
        inputs.append(f"{len(recorded['class_names'])} class names")
    if inputs:
        lines.append("run: " + ", ".join(inputs))
    return "\n".join(lines)


def main(argv=None) -> int:
    """``audiomae info`` (the report) or ``audiomae info CHECKPOINT`` (what the file holds)."""
    checkpoint = argv[0] if argv else None
    if checkpoint in ("-h", "--help"):
        print("usage: python -m audiomae.info [CHECKPOINT]\n\nWithout a file: the versions, devices and fused-op "
              "backends; with one: what the checkpoint holds (as audiomae info CHECKPOINT).")
        return 0
    if checkpoint is None:
        print(report())
        return 0
    from .checkpoint import CheckpointError
    try:
        print(describe_checkpoint(checkpoint))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
