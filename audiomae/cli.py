"""The ``audiomae`` command (also ``python -m audiomae``).

Sub-commands: pretrain, finetune, evaluate, embed, reconstruct, demo, info. Every option has a
default from the paper's recipe or, for the data, the embedded synthetic dataset, so each command
runs as it is; ``--config run/config.json`` repeats a saved run (explicit options still win).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

DESCRIPTION = """Audio-MAE: masked-autoencoder pretraining on log-mel spectrograms, fine-tuning,
evaluation, embeddings and reconstructions. With no --data, commands use the embedded synthetic
dataset (10 procedurally generated sound classes, nothing to download)."""


def _add_data(p: argparse.ArgumentParser, clip_default: Optional[float] = None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (embedded, default), an AudioSet-style JSON manifest "
                        "({\"data\": [{\"wav\": ..., \"labels\": \"/m/..,/m/..\"}]}) or a folder with one "
                        "sub-folder of audio files per class")
    g.add_argument("--labels", help="class-labels CSV (index,mid,display_name) for a manifest")
    g.add_argument("--eval-data", help="manifest or folder for evaluation (default: --data)")
    g.add_argument("--clip-seconds", type=float, default=clip_default,
                   help="clip length in seconds (default: 2.56 for synthetic, 10 for files)")
    g.add_argument("--target-length", type=int, help="model input frames (default: from the clip length; "
                                                     "1024 for 10 s AudioSet clips)")
    g.add_argument("--stats", default="audioset", help="normalisation statistics: audioset, esc50, "
                                                       "speechcommands, none, or MEAN,STD")
    g.add_argument("--num-clips", type=int, default=2000, help="synthetic training clips (default 2000)")
    g.add_argument("--num-eval-clips", type=int, default=500, help="synthetic evaluation clips (default 500)")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1) - 1 if (os.cpu_count() or 1) > 1 else 0,
                   help="audio decoding worker processes")
    g.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop when more than this fraction of the clips read so far cannot be decoded (default 0.01)")


def _add_run(p: argparse.ArgumentParser, out_default: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", "-o", default=out_default, help=f"run folder (default {out_default})")
    g.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision on GPU (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto",
                   help="fused-op backend (default: Triton kernels on GPU, PyTorch references on CPU)")
    g.add_argument("--config", help="a run's saved config.json to repeat (explicit options win)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train(p: argparse.ArgumentParser, epochs: int, blr: float, batch: int, warmup: float, wd: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help=f"(default {epochs})")
    g.add_argument("--batch-size", type=int, default=batch, help=f"per-process batch (default {batch})")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--blr", type=float, default=blr, help=f"base lr; lr = blr * effective batch / 256 (default {blr})")
    g.add_argument("--lr", type=float, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=0.0, help="cosine floor")
    g.add_argument("--warmup-epochs", type=float, default=warmup, help=f"per-step linear warmup (default {warmup})")
    g.add_argument("--weight-decay", type=float, default=wd, help=f"AdamW decay, not on norms/biases/tokens (default {wd})")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile; default: torch's default mode). "
                        "max-autotune-no-cudagraphs also searches matmul tilings and can fuse pointwise "
                        "epilogues into them; it compiles for much longer")
    g.add_argument("--weighted-sampling", action="store_true", help="sample clips by inverse label frequency (AudioSet)")
    g.add_argument("--epoch-size", type=int, help="clips per epoch (default: the dataset's size)")
    g.add_argument("--resume", help="a training checkpoint, or 'auto' for the run folder's last one")
    g.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--max-nan-steps", type=int, default=20, help="stop after this many non-finite losses in a row")
    g.add_argument("--log-every", type=int, default=10, help="metrics.jsonl every N steps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiomae", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="masked-autoencoder pretraining (the paper's recipe)",
                       description="Pretrain an Audio-MAE: mask 80 %% of the patches and reconstruct them.")
    p.add_argument("--model", default="tiny", help="size preset: tiny, small, base (ViT-B), large, huge (default tiny)")
    p.add_argument("--decoder-mode", choices=["local", "global", "hybrid"], help="decoder attention (default local)")
    p.add_argument("--mask-ratio", type=float, default=0.8)
    p.add_argument("--mask-mode", default="unstructured", choices=["unstructured", "time", "frequency", "time_frequency"])
    p.add_argument("--no-norm-pix-loss", action="store_true", help="plain pixel targets")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no roll-and-magnitude augmentation")
    p.add_argument("--init", help="start from these weights (a pretraining checkpoint)")
    _add_data(p)
    _add_train(p, epochs=32, blr=2e-4, batch=32, warmup=3, wd=1e-4)
    _add_run(p, "runs/pretrain")

    p = sub.add_parser("finetune", help="fine-tune a classifier from a pretrained checkpoint",
                       description="Fine-tune with layer-wise lr decay, mixup, SpecAugment and optional 2D masking.")
    p.add_argument("--pretrained", help="pretrained checkpoint (released or ours); none: from scratch")
    p.add_argument("--model", default="tiny", help="size preset when training from scratch")
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.5, help="mixup alpha (0: off)")
    p.add_argument("--no-spec-augment", dest="spec_augment", action="store_false")
    p.add_argument("--freq-mask", type=int, default=48, help="SpecAugment frequency mask width bound")
    p.add_argument("--time-mask", type=int, default=192, help="SpecAugment time mask width bound")
    p.add_argument("--mask-2d", action="store_true", help="structured time/frequency token masking in training")
    p.add_argument("--mask-t-prob", type=float, default=0.2)
    p.add_argument("--mask-f-prob", type=float, default=0.2)
    _add_data(p)
    _add_train(p, epochs=60, blr=1e-3, batch=32, warmup=4, wd=1e-4)
    _add_run(p, "runs/finetune")

    p = sub.add_parser("evaluate", help="mAP / AUC / d-prime or accuracy of a classifier, with a per-class report")
    p.add_argument("checkpoint", help="classifier checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    _add_data(p)
    _add_run(p, "runs/evaluate")

    p = sub.add_parser("embed", help="audio files or a manifest -> embeddings file")
    p.add_argument("inputs", nargs="*", help="audio files (or use --data for a manifest/folder/synthetic)")
    p.add_argument("--checkpoint", required=True, help="pretraining or classifier checkpoint")
    p.add_argument("--out", default="embeddings.pt", help="output file: .pt or .npz (default embeddings.pt)")
    p.add_argument("--per-patch", action="store_true", help="also store per-patch embeddings [N, L, D]")
    p.add_argument("--batch-size", type=int, default=32)
    _add_data(p)
    _add_run(p, "runs/embed")

    p = sub.add_parser("reconstruct", help="one clip -> PNG of input / masked / reconstruction (+ WAV)")
    p.add_argument("audio", help="audio file, or synthetic:N for clip N of the embedded dataset")
    p.add_argument("--checkpoint", required=True, help="pretraining checkpoint (with decoder)")
    p.add_argument("--out", default="reconstruction.png")
    p.add_argument("--wav", help="also write the reconstruction as audio (Griffin-Lim) to this file")
    p.add_argument("--mask-ratio", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", default="audioset")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("demo", help="the main job on the embedded data: pretrain, reconstruct, linear probe")
    p.add_argument("--output-dir", "-o", default="runs/demo")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-clips", type=int, default=1000)
    p.add_argument("--num-eval-clips", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")

    sub.add_parser("info", help="versions, devices and which fused-op backends can run here")
    return parser


def _version() -> str:
    from . import __version__
    return f"audiomae {__version__}"


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: List[str]) -> Dict[str, Any]:
    opts = {k: v for k, v in vars(args).items() if k != "command"}
    cfg_path = opts.pop("config", None)
    if cfg_path:
        try:
            with open(cfg_path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {cfg_path}: {e}")
        sub = parser._subparsers._group_actions[0].choices[args.command]  # the command's own parser
        actions = sub._option_string_actions
        explicit = {actions[a.split("=")[0]].dest for a in argv if a.startswith("-") and a.split("=")[0] in actions}
        for k, v in saved.items():
            if k in opts and k not in explicit:
                opts[k] = v
    return opts


def _check(opts: Dict[str, Any], parser: argparse.ArgumentParser) -> None:
    for k in ("epochs", "batch_size"):
        if k in opts and opts[k] is not None and opts[k] < 1:
            parser.error(f"--{k.replace('_', '-')} must be at least 1, got {opts[k]}")
    if "mask_ratio" in opts and not 0.0 <= opts["mask_ratio"] < 1.0:
        parser.error(f"--mask-ratio must be in [0, 1), got {opts['mask_ratio']}")
    if opts.get("stats") and "," in str(opts["stats"]):
        try:
            m, s = (float(v) for v in opts["stats"].split(","))
        except ValueError:
            parser.error(f"--stats {opts['stats']}: expected a name or MEAN,STD")
        opts["stats"] = (m, s)
    for k in ("pretrained", "init", "checkpoint", "labels"):
        if opts.get(k) and not os.path.exists(opts[k]):
            parser.error(f"--{k} {opts[k]}: no such file")
    if opts.get("data") not in (None, "synthetic") and not os.path.exists(opts["data"]):
        parser.error(f"--data {opts['data']}: no such file or folder (use 'synthetic', a manifest or a folder)")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "info":
        from .info import main as info_main
        info_main()
        return 0
    opts = _options(args, parser, argv)
    _check(opts, parser)
    if opts.get("backend") not in (None, "auto"):
        from . import dispatch
        dispatch.set_backend(opts["backend"])
    from .checkpoint import CheckpointError
    from .train import TrainingError
    try:
        from .data import DataError, TooManyBadFilesError
        known = (CheckpointError, TrainingError, DataError, TooManyBadFilesError)
    except ImportError:  # pragma: no cover
        known = (CheckpointError, TrainingError)
    try:
        if args.command == "pretrain":
            from .train import pretrain
            pretrain(opts)
        elif args.command == "finetune":
            from .train import finetune
            finetune(opts)
        elif args.command == "evaluate":
            from .train import evaluate
            evaluate(opts)
        elif args.command == "embed":
            from .commands import embed
            embed(opts)
        elif args.command == "reconstruct":
            from .commands import reconstruct
            reconstruct(opts)
        elif args.command == "demo":
            from .commands import demo
            demo(opts)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume auto", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
