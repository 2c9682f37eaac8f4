"""The ``audiomae`` command (also ``python -m audiomae``).

Sub-commands: pretrain, finetune, evaluate, embed, classify, reconstruct, demo, info. Training options have
defaults from the paper's recipe and, for the data, the embedded synthetic dataset, so pretrain,
finetune and demo run as they are; ``--config run/config.json`` repeats a saved run (explicit
options still win). ``embed`` needs audio files or ``--data``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import textwrap
from typing import Any, Dict, List, Optional

MODEL_PRESETS = ("tiny", "small", "base", "large", "huge")  # audiomae.config.PRESETS (not imported for --help)
# (the release's names, e.g. vit_base_patch16, are accepted too: audiomae.config.PRESET_ALIASES)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
EMBED_FORMATS = (".pt", ".npz")

DESCRIPTION = """Audio-MAE: masked-autoencoder pretraining on log-mel spectrograms, fine-tuning,
evaluation, embeddings and reconstructions. With no --data, the training commands use the embedded
synthetic dataset (10 procedurally generated sound classes, nothing to download)."""

STATS_HELP = "normalisation statistics: audioset, esc50, speechcommands, none, or MEAN,STD (e.g. -4.27,4.57)"
DOWNMIX_CHOICES = ("first", "mean")  # audiomae.audio.DOWNMIX_MODES, without importing the audio module
DOWNMIX_HELP = ("how a multi-channel file becomes mono: first (its first channel, as the released code "
                "reads files) or mean (the average of its channels)")


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions paragraph by paragraph (blank lines kept) and appends each option's default
    to its help, unless the help already speaks of its default or there is none to show (None, flags)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(" ".join(par.split()), width, initial_indent=indent,
                                         subsequent_indent=indent, break_on_hyphens=False)
                           for par in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0 or (not action.option_strings and action.nargs not in ("?", "*")):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _add_data(p: argparse.ArgumentParser, command: str) -> None:
    """Dataset options. ``command`` selects those that apply: pretrain/finetune read a training set
    and an evaluation set, evaluate one evaluation set, embed one dataset."""
    g = p.add_argument_group("data", "With --data these apply to the dataset; --target-length and --stats "
                                     "also apply to audio files." if command == "embed" else None)
    if command == "embed":
        g.add_argument("--data", help="a dataset to embed instead of audio files: an AudioSet-style JSON manifest, "
                                      "a folder with one sub-folder of audio files per class, or 'synthetic' for "
                                      "the embedded dataset (required when no audio files are given)")
    else:
        g.add_argument("--data", default="synthetic",
                       help="'synthetic' (the embedded dataset), an AudioSet-style JSON manifest "
                            "({\"data\": [{\"wav\": ..., \"labels\": \"/m/..,/m/..\"}]}) or a folder with one "
                            "sub-folder of audio files per class")
    g.add_argument("--labels", help="class-labels CSV (index,mid,display_name) for a manifest")
    g.add_argument("--data-root", help="folder that a manifest's relative audio paths start from (default: the "
                                       "manifest's folder, or the working directory when the paths are found "
                                       "only there)")
    if command in ("finetune", "evaluate", "embed"):
        g.add_argument("--single-label", action="store_true",
                       help="a manifest's clips have one class each (ESC-50, Speech Commands): cross-entropy "
                            "and accuracy instead of BCE and mAP; class folders always are single-label")
    if command == "finetune":
        g.add_argument("--eval-data", help="manifest or folder for evaluation (default: --data)")
    elif command == "pretrain":
        g.add_argument("--eval-data", help="manifest, folder or 'synthetic' (--num-eval-clips of the embedded "
                                           "held-out split) whose masked-patch loss is logged after each epoch, "
                                           "the same masks each time (default: none)")
    g.add_argument("--clip-seconds", type=float,
                   help="dataset clips are cut or zero-padded to this length in seconds (default: 2.56 for "
                        "synthetic; for files what the model input holds, as the release reads them: 10.255 s for "
                        "1024 frames)")
    if command == "embed":
        g.add_argument("--target-length", type=int,
                       help="model input length in frames of 10 ms: each file or clip is cut or zero-padded to "
                            "it, and the checkpoint's position tables are adapted to it. Frames past the last whole "
                            "16-frame patch are left out, as by the patch convolution; a pretraining checkpoint whose "
                            "decoder windows do not tile that length gives its encoder's embeddings (default: the "
                            "checkpoint's input length, e.g. 256 = 2.56 s for tiny, 1024 = 10.24 s for base)")
    else:
        g.add_argument("--target-length", type=int,
                       help="model input frames (default: the checkpoint's input length)" if command == "evaluate" else
                       "model input frames (default: the frames of --clip-seconds when given, rounded up to a power "
                       "of two as in the release's recipes: 10 s gives 1024, but 10.5 s 2048, half of it padding; "
                       "else 1024 = 10.24 s "
                       "as the release's AudioSet recipes; its ESC-50 and Speech Commands recipes use 512 and 128)")
    inherited = command in ("evaluate", "embed")  # they read the checkpoint's run's unless given
    g.add_argument("--stats", default="audioset",
                   help=STATS_HELP + (" (default: the checkpoint run's, else audioset)" if inherited else ""))
    g.add_argument("--downmix", choices=DOWNMIX_CHOICES, default="first",
                   help=DOWNMIX_HELP + (" (default: the checkpoint run's, else first)" if inherited else ""))
    if command in ("pretrain", "finetune"):
        g.add_argument("--num-clips", type=int, default=2000, help="clips of the synthetic training set")
    elif command == "embed":
        g.add_argument("--num-clips", type=int, default=2000, help="clips of the synthetic dataset")
    if command != "embed":
        g.add_argument("--num-eval-clips", type=int, default=500, help="clips of the synthetic evaluation set")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1) - 1 if (os.cpu_count() or 1) > 1 else 0,
                   help="audio decoding worker processes")
    g.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop when more than this fraction of the clips read so far cannot be decoded (judged after "
                        "100 clips, or all of a smaller dataset that one process reads whole)")


def _add_run(p: argparse.ArgumentParser, out_default: Optional[str], seed_help: str) -> None:
    g = p.add_argument_group("run")
    if out_default:
        g.add_argument("--output-dir", "-o", default=out_default, help="run folder")
    g.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    if out_default:
        g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="autocast precision on GPU (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--seed", type=int, default=0, help=seed_help)
    g.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto",
                   help="fused-op backend (auto: on GPUs each op's measured-fastest kernel, CUDA or Triton, where "
                        "it can run; PyTorch references on CPU; torch, triton, cuda: every op that has a version "
                        "on it runs that one, the others the automatic choice)")
    g.add_argument("--config", help="a run's saved config.json to repeat (explicit options win)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train(p: argparse.ArgumentParser, epochs: int, blr: float, batch: int, warmup: float, wd: float,
               min_lr: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=batch, help="clips per step and process")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps per optimizer step")
    g.add_argument("--blr", type=float, default=blr, help="base lr; lr = blr * effective batch / 256")
    g.add_argument("--lr", type=float, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=min_lr, help="floor of the cosine lr schedule")
    g.add_argument("--warmup-epochs", type=float, default=warmup, help="epochs of per-step linear lr warmup")
    g.add_argument("--weight-decay", type=float, default=wd,
                   help="AdamW decay, not on norms and biases (nor, in fine-tuning, on the cls token)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default, or 0: no clipping)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile; default: torch's default mode). "
                        "max-autotune-no-cudagraphs also searches matmul tilings and can fuse pointwise "
                        "epilogues into them; it compiles for much longer")
    g.add_argument("--weighted-sampling", action="store_true", help="sample clips by inverse label frequency (AudioSet)")
    g.add_argument("--no-replacement", action="store_true",
                   help="with --weighted-sampling: each clip at most once an epoch (the release's AS-2M fine-tuning: "
                        "--weighted-sampling --no-replacement --epoch-size 200000); default: with replacement")
    g.add_argument("--epoch-size", type=int, help="clips per epoch (default, or 0: the dataset's size)")
    g.add_argument("--resume", help="a training checkpoint, a run folder (its last one), or 'auto' for the "
                                    "output folder's last one")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds a run's checkpoint, replacing it (without this, "
                        "such a folder needs --resume)")
    g.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0: only per epoch)")
    g.add_argument("--max-nan-steps", type=int, default=20, help="stop when more than this many steps in a row are skipped for a non-finite loss or "
                   "gradient")
    g.add_argument("--log-every", type=int, default=10, help="write a row of metrics.jsonl every N steps (the mean loss of those steps; 0 or 1: every step)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiomae", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, formatter_class=_Formatter)

    p = add("pretrain", "masked-autoencoder pretraining (the paper's recipe)",
            "Pretrain an Audio-MAE: mask 80 % of the spectrogram patches and reconstruct them.")
    p.add_argument("--model", default="tiny", help="size preset: " + ", ".join(MODEL_PRESETS) + " (base: ViT-B)")
    p.add_argument("--decoder-mode", choices=["local", "global", "hybrid"],
                   help="decoder attention (default: the preset's, local for all but huge): local is the "
                        "release's 16 shifted-window blocks, global its 8 ViT blocks (as many as the local "
                        "decoder's on presets whose decoder is not the release's 16 blocks, such as tiny), hybrid "
                        "local then global")
    p.add_argument("--patch-stride", type=int, metavar="S",
                   help="overlapping patches: the preset's patches (16 x 16; huge: 14 x 14) every S frames and bins "
                        "(the release's custom patches: 10, a 101 x 12 grid on 1024 x 128, with its 6 x 6 decoder "
                        "windows; the local decoder needs a stride whose frequency patches those windows tile) "
                        "(default: the patch size, no overlap)")
    p.add_argument("--mask-ratio", type=float, default=0.8, help="fraction of the patches removed, in (0, 1)")
    p.add_argument("--mask-mode", default="unstructured", choices=["unstructured", "time", "frequency", "time_frequency"],
                   help="which patches are removed: random patches, whole time columns, whole frequency rows, "
                        "or both")
    p.add_argument("--mask-t-prob", type=float, default=0.7,
                   help="with --mask-mode time_frequency: fraction of the time columns removed (the release's "
                        "pretraining script's 0.7)")
    p.add_argument("--mask-f-prob", type=float, default=0.3,
                   help="with --mask-mode time_frequency: fraction of the frequency rows removed (the release's 0.3)")
    p.add_argument("--no-norm-pix-loss", action="store_true", help="plain pixel targets (default: per-patch "
                                                                  "normalised targets)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no roll-and-magnitude augmentation")
    p.add_argument("--init", help="start from these weights (a pretraining checkpoint)")
    _add_data(p, "pretrain")
    _add_train(p, epochs=32, blr=2e-4, batch=32, warmup=3, wd=1e-4, min_lr=0.0)
    _add_run(p, "runs/pretrain", "seed of the weights, the masks, the sampling and the synthetic dataset")

    p = add("finetune", "fine-tune a classifier from a pretrained checkpoint",
            "Fine-tune a classifier with layer-wise lr decay, mixup, SpecAugment and optional 2D masking.")
    p.add_argument("--pretrained", help="pretrained checkpoint (released or ours) (default: train from scratch)")
    p.add_argument("--model", default="tiny", help="size preset when training from scratch: " + ", ".join(MODEL_PRESETS))
    p.add_argument("--patch-stride", type=int, metavar="S",
                   help="overlapping patches: the model's patches (16 x 16; huge: 14 x 14) every S frames and bins "
                        "(the release's custom patches: 10); a --pretrained model of another stride keeps its "
                        "weights, its position table is rebuilt for the new grid (default: the pretrained model's, "
                        "else the patch size, no overlap)")
    p.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay per block from the top")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    p.add_argument("--mixup", type=float, default=0.5,
                   help="mixup strength (0: off): the Beta(a, a) parameter in batch mode, the probability that a "
                        "clip is mixed in waveform mode")
    p.add_argument("--mixup-mode", choices=["batch", "waveform"], default="batch",
                   help="batch: the model inputs mixed with the reversed batch, one Beta(a, a) weight per batch "
                        "(timm's batch mode, the paper's recipe); waveform: the released code's data loader, each "
                        "clip mixed with another clip before the fbank with probability --mixup, Beta(10, 10) "
                        "weights per clip")
    p.add_argument("--roll-mag", choices=["off", "gain", "both"], default="off",
                   help="the pretraining waveform augmentation in fine-tuning, as the release's fine-tuning scripts "
                        "turn it on: gain (a random gain, Beta(10, 10) + 0.5: what the release's does, its roll "
                        "never moving), or both (a random circular shift too)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="single-label data: the share of each target spread evenly over the classes (the release's "
                        "ESC-50 script: 0.1)")
    p.add_argument("--no-spec-augment", dest="spec_augment", action="store_false", help="no SpecAugment masking")
    p.add_argument("--freq-mask", type=int, default=48, help="SpecAugment frequency mask width bound")
    p.add_argument("--time-mask", type=int, default=192, help="SpecAugment time mask width bound")
    p.add_argument("--cv-folds", type=int, metavar="K",
                   help="K-fold cross-validation (ESC-50's recipe: 5): one fine-tuning per fold, on --data and "
                        "evaluated on --eval-data with {fold} in both paths replaced by 1..K (the recipes' "
                        "per-fold manifests, e.g. esc_train_data_{fold}.json), each in OUTPUT_DIR/fold-N; "
                        "reports the mean and spread of the folds' best scores in OUTPUT_DIR/cv.json")
    p.add_argument("--mask-2d", action="store_true", help="structured time/frequency token masking in training")
    p.add_argument("--mask-t-prob", type=float, default=0.2, help="with --mask-2d: fraction of time columns removed")
    p.add_argument("--mask-f-prob", type=float, default=0.2,
                   help="with --mask-2d: fraction of frequency rows removed")
    _add_data(p, "finetune")
    # the release's fine-tuning defaults (its scripts keep them): weight decay 5e-4, lr floor 1e-6
    _add_train(p, epochs=60, blr=1e-3, batch=32, warmup=4, wd=5e-4, min_lr=1e-6)
    _add_run(p, "runs/finetune", "seed of the head, the augmentation, the sampling and the synthetic dataset")

    p = add("evaluate", "mAP / AUC / d-prime or accuracy of a classifier, with a per-class report",
            "Evaluate a classifier checkpoint on a dataset; writes metrics.json and report.csv (per class) "
            "to the run folder.")
    p.add_argument("checkpoint", help="classifier checkpoint (from finetune)")
    p.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    _add_data(p, "evaluate")
    _add_run(p, "runs/evaluate", "seed of the synthetic dataset")

    p = add("embed", "audio files or a dataset -> embeddings file",
            "Encoder embeddings (mean of the patch tokens) of audio files or of a dataset, written to a .pt or "
            ".npz file with the keys embeddings [N, D] and paths (the clip of each row), for a dataset also "
            "indices, targets and class_names, and with --per-patch patch_embeddings [N, L, D]. An "
            "unreadable file of a dataset is left out (a warning counts them).\n\n"
            "--out DIR/ (a folder: a name ending in / or without an extension) writes the rows as they are made "
            "instead, one per clip in order, into embeddings.npy, patch_embeddings.npy, targets.npy and readable.npy "
            "(False, with rows of NaN, for an unreadable clip), with paths.json, info.json and progress.json: "
            "nothing has to fit in memory, and a run that is interrupted (Ctrl-C, SIGTERM) or fails keeps the "
            "rows done so far (at most the last 30 s are lost to a kill -9); the same command with --resume "
            "continues it. Load the arrays with numpy.load(path, mmap_mode='r').\n\n"
            "Every audio file is read and checked before the model runs; if any cannot be used (missing, "
            "not audio, empty, corrupt, shorter than 25 ms), nothing is embedded and the error lists them. "
            "Each file is cut or zero-padded to the model input length (--target-length); a warning says "
            "how many files were longer than it.")
    p.add_argument("inputs", nargs="*", metavar="AUDIO", help="audio files (WAV, FLAC, OGG, ...)")
    p.add_argument("--checkpoint", required=True, help="pretraining or classifier checkpoint")
    p.add_argument("--out", default="embeddings.pt",
                   help="output file, .pt (torch) or .npz (numpy), or a folder (DIR/) of .npy files written as the "
                        "clips are embedded")
    p.add_argument("--resume", action="store_true",
                   help="continue an embeddings folder (--out DIR/) that a run left unfinished (its unreadable clips "
                        "are read again); the checkpoint, inputs and options must be the same")
    p.add_argument("--overwrite", action="store_true", help="replace the embeddings a folder (--out DIR/) holds")
    p.add_argument("--per-patch", action="store_true", help="also store per-patch embeddings [N, L, D]")
    p.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    _add_data(p, "embed")
    _add_run(p, None, "seed of the synthetic dataset")

    p = add("classify", "audio files -> their top classes with a classifier checkpoint",
            "Score audio files with a fine-tuned classifier (the release's AS-2M one, or one from finetune) and "
            "print each file's top classes: sigmoid scores for a model trained with BCE (multi-label, AudioSet: "
            "each class on its own), softmax probabilities for one trained with cross-entropy (single-label: "
            "class folders, manifests with --single-label, the release's ESC-50 script), as the checkpoint's run "
            "trained it. Class names come from --labels, else from the checkpoint's run (its recorded names, or "
            "its label file while it is where the run read it), else classes are shown by index. The input "
            "options (--stats, --downmix) are the run's unless given. Every file is read and checked before "
            "the model runs: if any cannot be used, nothing is classified and the error lists them. Each file is "
            "cut or zero-padded to the model input length, or with --hop classified window by window.")
    p.add_argument("inputs", nargs="+", metavar="AUDIO", help="audio files (WAV, FLAC, OGG, ...)")
    p.add_argument("--checkpoint", required=True, help="classifier checkpoint (released fine-tuned, or from finetune)")
    p.add_argument("--labels", help="class-labels CSV (index,mid,display_name; AudioSet's class_labels_indices.csv) "
                                    "(default: the class names the checkpoint's run recorded)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per file")
    p.add_argument("--hop", type=float, metavar="SECONDS",
                   help="classify whole files: the model input slides over each file every SECONDS seconds, the "
                        "last window ending where the file ends; each window's top classes with its start, and the "
                        "file's: the highest score over its windows (multi-label), the mean probability "
                        "(single-label) (default: each file's first model input only)")
    p.add_argument("--out", help="also write the results to this .csv (path, start, rank, index, mid, name, score; "
                                 "start is empty on a file's rows and a window's start in seconds on its rows) or "
                                 ".json file")
    p.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    p.add_argument("--target-length", type=int, help="model input frames (default: the checkpoint's input length)")
    p.add_argument("--single-label", action="store_true",
                   help="softmax probabilities over the classes (default: as the checkpoint's run trained the "
                        "model; sigmoid scores for the release's multi-label AudioSet model)")
    p.add_argument("--stats", help=STATS_HELP + " (default: the checkpoint run's, else audioset)")
    p.add_argument("--downmix", choices=DOWNMIX_CHOICES, help=DOWNMIX_HELP + " (default: the checkpoint run's, "
                                                                            "else first)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("reconstruct", "one clip -> PNG of input / masked / reconstruction (+ WAV)",
            "Mask one clip, reconstruct it with a pretraining checkpoint and draw input, masked input, "
            "reconstruction and reconstruction pasted around the visible patches; prints the loss on the "
            "removed patches. The clip is cut or zero-padded to the model input length.")
    p.add_argument("audio", help="audio file, or synthetic:N for clip N of the embedded dataset")
    p.add_argument("--checkpoint", required=True, help="pretraining checkpoint (with decoder)")
    p.add_argument("--out", default="reconstruction.png", help="picture file (.png, .pdf, .svg, ...); its folder "
                                                              "is created")
    p.add_argument("--wav", help="also write the reconstruction as audio (Griffin-Lim) to this file: .wav, .flac, "
                                 ".ogg, .mp3, .aiff, .au, .caf, .w64 or .rf64")
    p.add_argument("--mask-ratio", type=float, default=0.8,
                   help="fraction of the patches removed, in (0, 1) (a time_frequency model masks the lines its "
                        "config says)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask")
    p.add_argument("--stats", default="audioset", help=STATS_HELP + " (default: the checkpoint run's, else audioset)")
    p.add_argument("--downmix", choices=DOWNMIX_CHOICES, default="first",
                   help=DOWNMIX_HELP + " (default: the checkpoint run's, else first)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")

    p = add("demo", "the main job on the embedded data: pretrain, reconstruct, linear probe",
            "Pretrain a tiny Audio-MAE on the embedded synthetic dataset, draw a reconstruction of a held-out "
            "clip, and compare linear-probe accuracy of the pretrained and an untrained encoder.")
    p.add_argument("--output-dir", "-o", default="runs/demo", help="run folder")
    p.add_argument("--epochs", type=int, default=10, help="pretraining epochs")
    p.add_argument("--num-clips", type=int, default=1000, help="synthetic training clips")
    p.add_argument("--num-eval-clips", type=int, default=500, help="synthetic held-out clips for the probe")
    p.add_argument("--batch-size", type=int, default=32, help="pretraining batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the masks and the synthetic dataset")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run of another command that the folder holds (an earlier demo's is always "
                        "replaced)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("info", "versions, devices and which fused-op backends can run here; or what a checkpoint holds",
            "Print the versions (Python, torch, Triton, CUDA), the backend overrides in force and, for every fused "
            "op on each device, which backend the automatic choice takes and why the others cannot run. With a "
            "checkpoint: who wrote it, the model (from its config, or inferred from its shapes), its parameter "
            "count, a training checkpoint's progress, and the input options its run recorded.")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file (released, a bare state dict, or this "
                                                  "package's) to describe instead")
    return parser


def _version() -> str:
    from . import __version__
    return f"audiomae {__version__}"


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-command's own parser (for its usage line in errors)."""
    return parser._subparsers._group_actions[0].choices[command]


def _typed(sub: argparse.ArgumentParser, dest: str, argv: List[str]) -> str:
    """How the user named the argument ``dest``: the option string typed (``-o`` or ``--output-dir``,
    or an accepted abbreviation), or a positional argument's name."""
    every = {o for a in sub._actions for o in a.option_strings}
    for action in sub._actions:
        if action.dest != dest:
            continue
        if not action.option_strings:
            return action.metavar or action.dest
        for a in argv:
            key = a.split("=", 1)[0]
            if key in action.option_strings:
                return key
            # an abbreviation, unless it is another option's whole name (--data is not --data-root's)
            if key.startswith("--") and len(key) > 2 and key not in every \
                    and any(o.startswith(key) for o in action.option_strings):
                return key
        return max(action.option_strings, key=len)
    return "--" + dest.replace("_", "-")


# what a run records in its config.json besides its options
_RECORDED_KEYS = ("explicit_options", "class_names", "class_mids", "multi_label", "command")


# options that name files or folders: a ~ in them is the home folder, also where the shell leaves it
# (--output-dir=~/run), so that every file of a run goes to one place; those a run records are made
# absolute, so that --config repeats it (and evaluate finds its label file) from any folder
_PATH_OPTIONS = ("output_dir", "checkpoint", "pretrained", "init", "data", "eval_data", "labels", "data_root", "out",
                 "wav", "config", "resume", "audio", "inputs")
_RUN_PATHS = ("output_dir", "pretrained", "init", "data", "eval_data", "labels", "data_root", "resume")


def _path(v: str) -> str:
    if v in ("synthetic", "auto", "") or v.startswith("synthetic:"):
        return v  # the embedded dataset, the run folder's last checkpoint
    return os.path.abspath(os.path.expanduser(v))


def _options(args: argparse.Namespace, sub: argparse.ArgumentParser, argv: List[str]) -> Dict[str, Any]:
    opts = {k: v for k, v in vars(args).items() if k != "command"}
    if isinstance(opts.get("config"), str):
        opts["config"] = os.path.expanduser(opts["config"])
    actions = sub._option_string_actions
    explicit = set()
    for a in argv:  # the options typed, also as the abbreviations argparse accepts
        if a == "--":  # the rest are positional arguments
            break
        key = a.split("=", 1)[0]
        if not key.startswith("-") or key == "-":
            continue
        if not key.startswith("--"):
            key = key[:2]  # a short option, its value maybe attached (-oDIR)
        if key in actions:
            explicit.add(actions[key].dest)
        elif key.startswith("--"):
            explicit.update(act.dest for o, act in actions.items() if o.startswith(key))
    # positional arguments are always the user's
    explicit.update(a.dest for a in sub._actions if not a.option_strings and opts.get(a.dest) not in (None, []))
    explicit.discard("config")
    cfg_path = opts.pop("config", None)
    if cfg_path:
        try:
            with open(cfg_path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            sub.error(f"{_typed(sub, 'config', argv)} {cfg_path}: {e}")
        if not isinstance(saved, dict):
            sub.error(f"{_typed(sub, 'config', argv)} {cfg_path}: expected a JSON object of options")
        unknown = sorted(k for k in saved if k not in opts and k not in _RECORDED_KEYS)
        if unknown:
            print(f"note: --config {cfg_path}: {len(unknown)} option{'s' if len(unknown) != 1 else ''} that "
                  f"'{sub.prog.split()[-1]}' does not take left out: {', '.join(unknown)}", file=sys.stderr)
        # (a run's config.json records every option, its folder among them; one written by hand need not)
        if "downmix" in opts and "downmix" not in saved and "downmix" not in explicit and "output_dir" in saved:
            opts["downmix"] = "mean"  # a run from before --downmix averaged the channels
            print(f"note: --config {cfg_path}: a run from before --downmix, which averaged the channels: "
                  "--downmix mean", file=sys.stderr)
            explicit.add("downmix")
        command = sub.prog.split()[-1]
        other = saved.get("command") or _command_of(saved)
        if command == "pretrain" and other in (None, "pretrain") and saved.get("mask_mode") == "time_frequency":
            # a run from before --mask-t-prob/--mask-f-prob masked the config's 0.6 and 0.5
            for k, v in (("mask_t_prob", 0.6), ("mask_f_prob", 0.5)):
                if k not in saved and k not in explicit:
                    saved = dict(saved, **{k: v})
        # the repeated run's own choices count as given; its defaults stay defaults
        chosen = saved.get("explicit_options")
        chosen = set(chosen) if isinstance(chosen, list) else set(saved)
        if command == "evaluate" and other in ("pretrain", "finetune") and isinstance(saved.get("eval_data"), str):
            # a training run's held-out set is what an evaluation of it scores, not its training data
            saved = dict(saved, data=saved["eval_data"])
            chosen = chosen | {"data"}
            print(f"note: --config {cfg_path}: evaluating on the run's --eval-data {saved['eval_data']}",
                  file=sys.stderr)
        if other not in (None, command):
            # another command's run: only the inputs it was told (its data, statistics, lengths, device),
            # not its defaults (fine-tuning's lr and decay are not pretraining's), its folder or options
            # that mean another thing here
            saved = {k: v for k, v in saved.items() if k in chosen and k in _SHARED_OPTIONS}
            taken = ", ".join(sorted(k for k in saved if k in opts and k not in explicit)) or "none"
            print(f"note: --config {cfg_path} is a '{other}' run: '{command}' takes only the inputs it was "
                  f"given ({taken})", file=sys.stderr)
        typed = set(explicit)
        for k, v in saved.items():
            if k in opts and k not in explicit:
                opts[k] = _config_value(sub, k, v, cfg_path)
                if k in chosen:
                    explicit.add(k)
        # options an earlier version recorded where they did not apply: taken, but not as choices to check
        for k in _inapplicable(opts, command) - typed:
            explicit.discard(k)
    for k in _PATH_OPTIONS:  # typed or from the config
        v, fix = opts.get(k), (_path if k in _RUN_PATHS else os.path.expanduser)
        if isinstance(v, str):
            opts[k] = fix(v)
        elif isinstance(v, list):
            opts[k] = [fix(x) if isinstance(x, str) else x for x in v]
    # the options given (typed or from --config), so that a checkpoint's own settings can fill the rest
    opts["explicit_options"] = sorted(explicit)
    return opts


def _config_value(sub: argparse.ArgumentParser, dest: str, v: Any, cfg_path: str) -> Any:
    """A value from a --config file, checked as the option's own parser would check it typed."""
    action = next((a for a in sub._actions if a.dest == dest), None)
    if action is None:
        return v
    where = f"--config {cfg_path}: {dest}"
    if v is None:  # null: the value of an option whose default is to be absent, else no value at all
        if action.default is None or action.default is argparse.SUPPRESS:
            return v
        sub.error(f"{where} cannot be null (leave it out for the default, {json.dumps(action.default)})")

    def bad(kind: str) -> None:
        sub.error(f"{where} must be {kind}, got {json.dumps(v)}")

    if action.nargs == 0:  # a flag
        if not isinstance(v, bool):
            bad("true or false")
    elif action.nargs in ("*", "+"):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            bad("a list of strings")
    elif action.type is int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            bad("an integer")
        v = int(v)
    elif action.type is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            bad("a number")
        v = float(v)
    elif dest == "stats" and isinstance(v, list):  # MEAN,STD, which a run records as two numbers
        if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            bad("a name or [MEAN, STD]")
    elif not isinstance(v, str):
        bad("a string")
    if action.choices is not None and v not in action.choices:
        sub.error(f"{where} must be one of {', '.join(map(str, action.choices))}, got {json.dumps(v)}")
    return v


# what a run of one command tells another through --config: its inputs, not its recipe or folder
_SHARED_OPTIONS = ("data", "eval_data", "labels", "data_root", "clip_seconds", "target_length", "stats", "downmix",
                   "single_label", "num_clips", "num_eval_clips", "num_workers", "max_bad_fraction", "device",
                   "precision", "seed", "backend", "quiet")


def _command_of(saved: Dict[str, Any]) -> Optional[str]:
    """The command of a config.json written before runs recorded it, from the options only it has."""
    if "layer_decay" in saved or "pretrained" in saved:
        return "finetune"
    if "mask_mode" in saved or "init" in saved:
        return "pretrain"
    return None


def _inapplicable(opts: Dict[str, Any], command: str) -> set:
    """The options that do not apply with the others (refused when typed, see _check)."""
    out = set()
    if command == "pretrain" and not opts.get("init") and opts.get("mask_mode") != "time_frequency":
        out |= {"mask_t_prob", "mask_f_prob"}
    if command == "pretrain" and opts.get("mask_mode") == "time_frequency":
        out.add("mask_ratio")
    if command == "finetune" and not opts.get("mask_2d"):
        out |= {"mask_t_prob", "mask_f_prob"}
    return out


def _unread_sources(opts: Dict[str, Any], command: str) -> Dict[str, str]:
    """The data options that no dataset of this run reads, each with what the run reads instead: the
    synthetic set's sizes when its data are files, a manifest's label file and root when it reads none."""
    if command not in ("pretrain", "finetune", "evaluate", "embed"):
        return {}
    data, held = opts.get("data"), opts.get("eval_data")
    out = {}
    reads = f"this run reads {data}" if data else "this run embeds the audio files given"
    if "num_clips" in opts and data != "synthetic":
        out["num_clips"] = f"applies to --data synthetic (the embedded dataset); {reads}"
    if "num_eval_clips" in opts:
        if command == "pretrain" and held != "synthetic":
            out["num_eval_clips"] = ("applies to --eval-data synthetic (the embedded held-out split); "
                                     + (f"this run evaluates on {held}" if held else "this run has no --eval-data"))
        elif command == "finetune" and (held or data) != "synthetic":
            out["num_eval_clips"] = ("applies to a synthetic evaluation set (--eval-data synthetic, or --data "
                                     f"synthetic without --eval-data); this run evaluates on {held or data}")
        elif command == "evaluate" and data != "synthetic":
            out["num_eval_clips"] = f"applies to --data synthetic (the embedded held-out split); {reads}"
    sources = [v for v in (data, held) if isinstance(v, str) and v != "synthetic"]
    if not sources:
        what = "the embedded synthetic dataset" if data == "synthetic" or held == "synthetic" else "no dataset"
        for k in ("labels", "data_root"):
            if opts.get(k) is not None:
                out[k] = f"applies to a manifest (--data a JSON or CSV file); this run reads {what}"
    return out


def _check(opts: Dict[str, Any], sub: argparse.ArgumentParser, command: str, argv: List[str]) -> None:
    """Checks that need no model: bad values end here with the sub-command's usage and exit status 2."""
    def name(dest: str) -> str:
        return _typed(sub, dest, argv)

    def bounded(dest: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
                why: str = "") -> None:
        v = opts.get(dest)
        if v is None:
            return
        if isinstance(v, float) and not math.isfinite(v):  # nan, inf (and what overflows to it, 1e400)
            sub.error(f"{name(dest)} must be a finite number, got {v:g}")
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            if hi == math.inf:
                rule = f"{'greater than' if lo_open else 'at least'} {lo:g}"
            else:
                rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            sub.error(f"{name(dest)} must be {rule}{why}, got {v:g}")

    for k in ("epochs", "batch_size", "accum_iter", "num_clips", "num_eval_clips", "top_k"):
        bounded(k, 1)
    bounded("target_length", 1)
    bounded("clip_seconds", 0.025, why=" (one 25 ms frame)")
    # 0 means: the dataset's size (epoch size), no clipping, stop at the first non-finite loss, every step
    for k in ("num_workers", "save_every_steps", "weight_decay", "warmup_epochs", "min_lr", "mixup", "freq_mask",
              "time_mask", "epoch_size", "clip_grad", "max_nan_steps", "log_every"):
        bounded(k, 0)
    for k in ("blr", "lr"):
        bounded(k, 0, lo_open=True)
    if opts.get("seed") is not None and not 0 <= opts["seed"] < 2 ** 63:  # torch's generators' 64-bit seeds
        sub.error(f"{name('seed')} must be in [0, 2^63 - 1], got {opts['seed']}")
    if opts.get("model") is not None:
        from .config import PRESET_ALIASES, PRESETS
        if str(opts["model"]).lower() not in PRESETS and str(opts["model"]).lower() not in PRESET_ALIASES:
            sub.error(f"{name('model')} {opts['model']}: no such preset; choose one of {', '.join(MODEL_PRESETS)} "
                      "(or a release name such as vit_base_patch16)")
    if opts.get("hop") is not None and not 0 < opts["hop"] < math.inf:
        sub.error(f"{name('hop')} must be a positive number of seconds, got {opts['hop']:g}")
    if opts.get("patch_stride") is not None:
        from .config import AudioMAEConfig
        try:  # the patch size is the preset's (16, huge's 14), or the pretrained model's
            patch = AudioMAEConfig.preset(opts.get("model") or "tiny").patch_size
        except ValueError:
            patch = 16
        if not 1 <= opts["patch_stride"] <= patch and not opts.get("pretrained"):
            sub.error(f"{name('patch_stride')} must be in [1, {patch}] (the patches are {patch} x {patch}; {patch}: "
                      f"no overlap), got {opts['patch_stride']}")
        if opts["patch_stride"] < 1:
            sub.error(f"{name('patch_stride')} must be a positive number of frames and bins, got {opts['patch_stride']}")
        if command == "pretrain" and opts["patch_stride"] < patch and not opts.get("init") and not opts.get("resume"):
            from .model import local_windows_fit
            try:
                mode = opts.get("decoder_mode") or AudioMAEConfig.preset(opts.get("model") or "tiny").decoder_mode
                cfg = AudioMAEConfig.preset(opts.get("model") or "tiny", patch_stride=opts["patch_stride"],
                                            decoder_mode=mode)
            except ValueError:
                cfg = None  # building the model says what is wrong
            if cfg is not None and not local_windows_fit(cfg):
                f, (wt, wf) = cfg.grid_size[1], cfg.window
                sub.error(f"{name('patch_stride')} {opts['patch_stride']} gives {f} frequency patches on 128 mel bins, "
                          f"which the {mode} decoder's {wt} x {wf} windows do not tile: use --patch-stride 10 (the "
                          "release's, 12 patches) or --decoder-mode global")
    bounded("max_bad_fraction", 0, 1)
    if opts.get("no_replacement") and not opts.get("weighted_sampling"):
        sub.error(f"{name('no_replacement')} applies to --weighted-sampling (uniform sampling already takes each "
                  "clip once an epoch)")
    if opts.get("mixup_mode") == "waveform":
        bounded("mixup", 0, 1, why=" (a probability with --mixup-mode waveform)")
    bounded("layer_decay", 0, 1, lo_open=True)
    bounded("label_smoothing", 0, 1, hi_open=True)
    bounded("drop_path", 0, 1, hi_open=True)
    for k in ("mask_t_prob", "mask_f_prob"):
        bounded(k, 0, 1, hi_open=True, why=" (a fraction of the rows removed; some must stay)")
    typed = set(opts.get("explicit_options") or ())
    for k in sorted(_inapplicable(opts, command) & typed):
        if k == "mask_ratio":
            sub.error(f"{name(k)} does not apply to --mask-mode time_frequency (--mask-t-prob and --mask-f-prob set "
                      "how much of each axis is removed)")
        elif command == "pretrain":
            sub.error(f"{name(k)} applies to --mask-mode time_frequency (this run masks {opts.get('mask_mode')}: "
                      "--mask-ratio sets how much)")
        else:
            sub.error(f"{name(k)} applies to --mask-2d (the structured token masking of fine-tuning)")
    if "mask_ratio" in opts:
        r = opts["mask_ratio"]
        if command == "reconstruct" and not 0.0 < r < 1.0:
            sub.error(f"{name('mask_ratio')} must be in (0, 1) for a reconstruction (some patches must be removed "
                      f"and some kept), got {r}")
        if not 0.0 < r < 1.0:
            sub.error(f"{name('mask_ratio')} must be in (0, 1) (the loss is taken on the removed patches, the "
                      f"encoder sees the kept ones), got {r}")
    if opts.get("stats") is not None:
        from .audio import get_stats
        stats = opts["stats"]
        if isinstance(stats, str) and "," in stats:
            try:
                m, s = (float(v) for v in stats.split(","))
            except ValueError:
                sub.error(f"{name('stats')} {stats}: expected a name or MEAN,STD")
            stats = (m, s)
        try:
            get_stats(stats)
        except (TypeError, ValueError) as e:
            sub.error(f"{name('stats')} {opts['stats']}: {e}")
        opts["stats"] = stats
    for k in ("pretrained", "init", "checkpoint", "labels"):
        if opts.get(k) and not os.path.isfile(opts[k]):
            what = "no such file" if not os.path.exists(opts[k]) else "not a file"
            sub.error(f"{name(k)} {opts[k]}: {what}")
    # an output that is one of the command's inputs would replace it (embeddings over the checkpoint)
    outputs = [k for k in ("out", "wav") if isinstance(opts.get(k), str) and os.path.isfile(opts[k])]
    for k in outputs:
        for src in ("checkpoint", "pretrained", "init", "labels", "data", "audio", "inputs"):
            given = opts.get(src)
            for v in (given if isinstance(given, list) else [given]):
                if isinstance(v, str) and os.path.isfile(v) and os.path.samefile(v, opts[k]):
                    which = "input audio file" if src in ("inputs", "audio") else f"{name(src)} file"
                    sub.error(f"{name(k)} {opts[k]} is this command's {which} too: writing it would replace that "
                              "input; write the output elsewhere")
    if opts.get("cv_folds") is not None:
        bounded("cv_folds", 2)
        for k in ("data", "eval_data"):
            if "{fold}" not in str(opts.get(k) or ""):
                sub.error(f"{name('cv_folds')} needs {{fold}} in {name(k)} (the manifest of each fold, e.g. "
                          f"esc_{'train' if k == 'data' else 'eval'}_data_{{fold}}.json), got {opts.get(k)!r}")
        from .train.loop import fold_paths
        for fold in range(1, int(opts["cv_folds"]) + 1):
            for k, p in zip(("data", "eval_data"), fold_paths(opts, fold)):
                if not os.path.exists(p):
                    sub.error(f"{name(k)} of fold {fold}: {p}: no such file or folder")
    for k in ("data", "eval_data"):
        if opts.get("cv_folds") is None and opts.get(k) not in (None, "synthetic") and not os.path.exists(opts[k]):
            sub.error(f"{name(k)} {opts[k]}: no such file or folder (use 'synthetic', a manifest or a folder)")
    if opts.get("data_root") and not os.path.isdir(opts["data_root"]):
        sub.error(f"{name('data_root')} {opts['data_root']}: no such folder")
    if command in ("pretrain", "finetune") and opts.get("resume") and opts.get("overwrite"):
        sub.error("--resume continues a run, --overwrite starts afresh in its folder: give one")
    if command == "embed":
        if not opts.get("inputs") and not opts.get("data"):
            sub.error("give audio files to embed, or --data with a manifest, a folder or 'synthetic' "
                      "(the embedded dataset)")
        if opts.get("inputs") and opts.get("data"):
            sub.error("give either audio files or --data, not both")
        from .embeddings import check_output_name, is_folder_output
        out = str(opts.get("out") or "")
        problem = check_output_name(out)
        if problem:
            sub.error(f"{name('out')} {out}: {problem}")
        if opts.get("resume") and opts.get("overwrite"):
            sub.error("--resume continues a folder's embeddings, --overwrite replaces them: give one")
        if (opts.get("resume") or opts.get("overwrite")) and not is_folder_output(out):
            flag = "--resume" if opts.get("resume") else "--overwrite"
            sub.error(f"{flag} is for a folder of embeddings (--out DIR/); {name('out')} {out} is a file, written "
                      "once every clip is embedded")
    if opts.get("output_dir"):
        problem = _unwritable(opts["output_dir"])
        if problem:
            sub.error(f"{name('output_dir')} {opts['output_dir']}: {problem}")
    keys = {a.split("=", 1)[0] for a in argv}
    for k, why in sorted(_unread_sources(opts, command).items()):
        if name(k) in keys and _rank() == 0:  # typed (a --config's options may be another run's)
            print(f"note: {name(k)} is not used: it {why}", file=sys.stderr)


def _unwritable(folder: str) -> Optional[str]:
    """Why files cannot be written in ``folder``, or None when they can (a missing folder: whether it
    can be made in its nearest existing parent). Creates nothing that stays."""
    import tempfile
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "exists and is not a folder"
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"cannot make it: {probe} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-check-"):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e})" if probe == os.path.abspath(folder) else \
            f"cannot make it in {probe} ({e.strerror or e})"
    return None


def _negative_values(argv: List[str]) -> List[str]:
    """``--stats -4.27,4.57`` as ``--stats=-4.27,4.57``: argparse would take a value that starts with a
    minus (and is not a plain number) for an option, and log-mel means are negative."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return out + argv[i:]
        if len(a) > 4 and "--stats".startswith(a) and i + 1 < len(argv) and re.match(r"^-\.?\d", argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # a Ctrl-C before the command began its work (while torch loads): nothing was started
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _printable_names() -> None:
    """File names that are not UTF-8 (Python holds their bytes as surrogates) print as their bytes on
    a UTF-8 standard output, escaped elsewhere, rather than stopping the command with an encoding error."""
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors=errors if encoding == "utf8" else "backslashreplace")
            except (ValueError, OSError):  # a stream that cannot be reconfigured: left as it is
                pass


def _main(argv: Optional[List[str]] = None) -> int:
    _printable_names()
    argv = _negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "info":
        from .info import main as info_main
        return info_main(None if args.checkpoint is None else [args.checkpoint])
    sub = _command_parser(parser, args.command)
    opts = _options(args, sub, argv)
    opts["command"] = args.command  # recorded in the run's config.json (see --config)
    _check(opts, sub, args.command, argv)
    if opts.get("backend") not in (None, "auto"):
        from . import dispatch
        dispatch.set_backend(opts["backend"])
    from .audio import AudioLoadError
    from .checkpoint import CheckpointError
    from .commands import InputError
    from .dispatch import BackendUnavailableError
    from .train import TrainingError
    known = (CheckpointError, TrainingError, AudioLoadError, InputError)
    try:
        from .data import DataError, TooManyBadFilesError
        known += (DataError, TooManyBadFilesError)
    except ImportError:  # pragma: no cover
        pass
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
        elif args.command == "classify":
            from .commands import classify
            classify(opts)
        elif args.command == "reconstruct":
            from .commands import reconstruct
            reconstruct(opts)
        elif args.command == "demo":
            from .commands import demo
            demo(opts)
    except known as e:
        print(f"{_error_prefix()}{e}", file=sys.stderr)
        return 1
    except BackendUnavailableError as e:
        if e.backend and opts.get("backend") == e.backend:
            what = f"the {e.op} op cannot run with it here" if e.op else "it cannot run here"
            print(f"error: --backend {e.backend}: {what} ({'; '.join(e.reasons)}); "
                  "--backend auto (the default) runs each op where it can", file=sys.stderr)
        else:
            print(f"{_error_prefix()}{e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine's side: a full disk, a folder made read-only meanwhile, ...
        text = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        print(f"{_error_prefix()}{text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # the shell's convention, 128 + the signal's number: 130 after Ctrl-C, 143 after SIGTERM (which a
        # scheduler reads as a preemption to requeue)
        code = 128 + int(getattr(e, "signum", None) or signal.SIGINT)
        if getattr(e, "message", None):  # a command that says itself what it kept
            print(e.message, file=sys.stderr)
            return code
        if getattr(e, "path", None) and _rank() > 0:
            return code  # every process stopped after the same step: the first one says so
        if getattr(e, "path", None) and args.command == "demo":
            print(f"interrupted after step {e.step}; the demo starts afresh when run again", file=sys.stderr)
        elif getattr(e, "path", None):  # the loop finished its step and wrote a checkpoint
            print(f"interrupted after step {e.step}, checkpoint written ({e.path}); resume with --resume auto",
                  file=sys.stderr)
        elif args.command in ("pretrain", "finetune"):
            print("interrupted; --resume auto continues from the run's last checkpoint, if it has written one "
                  "(--save-every-steps N writes one every N steps)", file=sys.stderr)
        elif args.command == "embed":
            print("interrupted; nothing written (a folder, --out DIR/, keeps the rows made so far and continues "
                  "with --resume)", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return code
    return 0


def _rank() -> int:
    """This process's rank under torchrun or srun with several processes (0 when alone)."""
    for var, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        try:
            if int(os.environ.get(size, "1")) > 1:
                return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return 0


def _error_prefix() -> str:
    """``error: ``, naming the process when there are several (each says what went wrong with it)."""
    return f"error (rank {_rank()}): " if _rank() > 0 else "error: "


if __name__ == "__main__":
    sys.exit(main())
