"""The training loops: pretraining, fine-tuning, evaluation, embedding, linear probing.

Each entry point takes a plain dict of options (what the command line parses), so runs can be
repeated from the ``config.json`` saved in every run folder.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import ops_cuda
from ..config import AudioMAEConfig
from ..masking import masking_keeps_nothing, masking_removes_nothing
from ..model import AudioMAE, AudioMAEClassifier
from . import distributed as D
from .metrics import coverage_note, multilabel_metrics, singlelabel_metrics
from .optim import (FINETUNE_NO_DECAY, LEGACY_NO_DECAY, PRETRAIN_NO_DECAY, adamw, effective_lr, lr_at, param_groups,
                    set_lr)
from .sampler import ResumableSampler
from .state import BEST, LAST, load_training_state, resolve_resume, rng_state, save_training_state, set_rng_state

log = logging.getLogger("audiomae.train")


class TrainingError(RuntimeError):
    """A run cannot go on (too many non-finite losses, inconsistent resume, ...)."""


# --- run plumbing ------------------------------------------------------------------------------
class RunLog:
    """Metrics as JSON lines (``metrics.jsonl``), and TensorBoard when it is installed; rank 0 only."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_strict_json(record), allow_nan=False) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('phase', 'train')}/{k}", v, record["step"])

    def truncate_after(self, step: int, evaluation_too: bool = False) -> None:
        """On resume: drop the records of steps after ``step`` (they are trained again), in the JSON
        lines and in TensorBoard (purge_step), so each step is logged once; ``evaluation_too`` also
        drops the evaluation records of ``step`` itself (an evaluation that is run again)."""
        if not self.enabled:
            return
        if os.path.isfile(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut off by the crash
                    if isinstance(rec, dict) and evaluation_too and rec.get("phase") == "eval" \
                            and int(rec.get("step", 0)) == step:
                        continue
                    if not isinstance(rec, dict) or int(rec.get("step", 0)) <= step:
                        kept.append(json.dumps(_strict_json(rec), allow_nan=False) + "\n")
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        if self.tb is not None:
            log_dir = self.tb.log_dir
            self.tb.close()
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir, purge_step=step + 1)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _strict_json(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (JSON's null): NaN and Infinity are not JSON, and strict
    parsers refuse them (a d-prime of an AUC of 1 is infinite, a skipped step's loss NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def _plain(v: Any) -> Any:
    """numpy scalars as Python numbers, tuples as lists (recursively): what JSON and a safe load keep."""
    if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _json_safe(opts: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: _plain(v) for k, v in opts.items()}
    return {k: v for k, v in out.items() if type(v) in (str, int, float, bool, list, type(None))}


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cpu" and precision != "fp32":
        log.warning("precision %s is for GPUs; using fp32 on the CPU", precision)
        return "fp32"
    return precision


def build_dataset(opts: Dict[str, Any], split: str, features_in_workers: bool = False):
    """The dataset named by ``opts['data']``: ``synthetic``, a JSON/CSV manifest, or a class-folder root."""
    from .. import data as data_mod

    src = opts.get("data", "synthetic")
    common = dict(max_bad_fraction=opts.get("max_bad_fraction", 0.01), downmix=opts.get("downmix") or "first")
    if split != "train" and opts.get("eval_data"):
        src = opts["eval_data"]
    if src == "synthetic":
        n = opts.get("num_clips", 2000) if split == "train" else opts.get("num_eval_clips", 500)
        return data_mod.SyntheticAudioDataset(num_clips=n, clip_seconds=opts.get("clip_seconds") or 2.56,
                                              seed=opts.get("seed", 0), split=split, **common)
    path = src
    if not os.path.exists(path):
        flag = "--data" if split == "train" or not opts.get("eval_data") else "--eval-data"
        raise TrainingError(f"{flag} {path}: no such file or folder (use 'synthetic', a manifest or a folder)")
    # by default a file gives what the model input holds (the release cuts its fbank at the input length)
    clip = opts.get("clip_seconds") or None
    common["target_length"] = opts.get("target_length") or None
    if os.path.isdir(path):
        # (--labels read for the other set, a manifest, is used there: no note)
        other = opts.get("data") if split != "train" else opts.get("eval_data")
        used_elsewhere = isinstance(other, str) and other != "synthetic" and os.path.isfile(other)
        if opts.get("labels") and not used_elsewhere and (path, "labels") not in _NOTED \
                and os.environ.get("RANK", "0") == "0":
            _NOTED.add((path, "labels"))
            print(f"note: --labels {opts['labels']} is not used: the classes of the folder {path} are its "
                  "sub-folders, by name", file=sys.stderr)
        return data_mod.FolderDataset(path, clip_seconds=clip, **common)
    single = bool(opts.get("single_label"))
    ds = data_mod.ManifestDataset(path, opts.get("labels"), clip_seconds=clip, multi_label=not single,
                                  root=opts.get("data_root"), **common)
    scored = opts.get("command", "finetune") in ("finetune", "evaluate")  # embedding has no loss or score
    if not single and scored and "single_label" in opts and path not in _NOTED and os.environ.get("RANK", "0") == "0" \
            and len(ds) > 1 and all(len(c) == 1 for c in ds.labels_per_clip()):
        _NOTED.add(path)
        print(f"note: every clip of {path} has one label; pass --single-label for cross-entropy and accuracy "
              "(ESC-50, Speech Commands), without it the clips are multi-label (BCE, mAP)", file=sys.stderr)
    return ds


_NOTED: set = set()  # manifests the single-label note was printed for


def _check_files_exist(dataset, flag: str, source: str, first: int = 32) -> None:
    """A manifest whose first clips are none of them files (a wrong root, a moved folder) is an error
    now, not after an epoch of training (bad files are otherwise skipped as they are met)."""
    from ..data import ManifestDataset  # class folders list files that exist; synthetic clips have none
    if not isinstance(dataset, ManifestDataset) or not dataset.paths:
        return
    paths = dataset.paths
    head = paths[:first]
    if not any(os.path.isfile(p) for p in head):
        raise TrainingError(f"{flag} {source}: none of its first {len(head)} clips is a file (the first: {head[0]}); "
                            "check the manifest's paths, or give the folder they start from with --data-root")


def _need_classes(dataset, opts: Dict[str, Any], what: str) -> None:
    """A classifier needs classes: a manifest without a label file has none."""
    if not getattr(dataset, "num_classes", 0):
        source = (opts.get("eval_data") if what == "evaluate" else None) or opts.get("data")
        raise TrainingError(f"cannot {what} on {source}: its clips have no classes; a manifest needs its "
                            "class-label CSV (--labels class_labels_indices.csv, with index,mid,display_name "
                            "columns)")


def _need_two_classes(dataset, opts: Dict[str, Any]) -> None:
    """Single-label training needs two classes at least: a softmax over one has no loss to learn from,
    and scores 1.0 (a class folder with one sub-folder: often one level too high)."""
    if getattr(dataset, "multi_label", True) or getattr(dataset, "num_classes", 0) != 1:
        return
    source, name = opts.get("data"), dataset.class_names[0]
    hint = ""
    inner = os.path.join(str(source), name)
    if os.path.isdir(inner):
        subs = sorted(d.name for d in os.scandir(inner) if d.is_dir() and not d.name.startswith("."))
        if len(subs) > 1:
            shown = ", ".join(subs[:4]) + (", ..." if len(subs) > 4 else "")
            hint = f"; its sub-folders ({shown}) look like the classes: --data {inner}"
    raise TrainingError(f"cannot fine-tune on {source}: it has one class ({name}), and single-label training "
                        f"needs two or more (a softmax over one class learns nothing){hint}")


def _target_length(opts: Dict[str, Any], dataset) -> int:
    if opts.get("target_length"):
        return int(opts["target_length"])
    if getattr(dataset, "target_length", None):
        return int(dataset.target_length)  # in 16 kHz frames, whatever the items' rate
    from ..data.dataset import default_target_length
    return default_target_length(dataset.clip_samples)


def _loader(dataset, opts, sampler, batch_size):
    from ..data import make_loader
    return make_loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=opts.get("num_workers", 0),
                       drop_last=False, shuffle=False)


def _infinite_steps(epochs: int, steps_per_epoch: int) -> int:
    return max(1, epochs * steps_per_epoch)


# --- the shared optimisation loop ---------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after writing a checkpoint of its last finished step;
    ``signum`` is the signal that asked for it (None where another process was asked)."""

    def __init__(self, step: int, path: str, signum: Optional[int] = None):
        super().__init__(f"interrupted after step {step}; checkpoint {path}")
        self.step, self.path, self.signum = step, path, signum


class GracefulInterrupt:
    """While active (in the main thread), the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's
    preemption, ``kill``, torchrun passing either on) only sets ``requested``, so the loop can finish
    its step and checkpoint. A second Ctrl-C stops at once; a second SIGTERM does not, because one
    preemption often comes twice (a scheduler signals every process of a job, and torchrun passes
    its own on to its workers): a scheduler ends the job itself once its grace period is over."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True, hard_second: bool = False,
                 message: str = "stopping after this step, with a checkpoint"):
        import threading
        self.enabled = bool(enabled) and threading.current_thread() is threading.main_thread()
        self.hard_second = bool(hard_second)
        self.message = message
        self.requested = False
        self.signum: Optional[int] = None  # the first signal's number
        self._previous: Dict[int, Any] = {}
        self._workers_before = False
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a loader worker forked with this handler: it goes on serving
            return
        if self.requested:
            if signum == signal.SIGTERM:
                return  # the same preemption again (see the class docstring)
            signal.signal(signum, self._restore(signum))
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if self.hard_second and signal.SIGINT in self._previous:
            # a process waiting in a collective runs no Python handler until the wait ends (a peer
            # that hangs: never): the next Ctrl-C ends it at once, from the operating system
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stderr.write(f"\n{signal.Signals(signum).name}: {self.message} (Ctrl-C again to stop at once)\n")

    def _restore(self, signum):
        previous = self._previous.get(signum)
        if previous is None:
            return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        return previous

    def __enter__(self) -> "GracefulInterrupt":
        if self.enabled:
            for sig in self.SIGNALS:
                # not where a signal is ignored (SIGINT in a background job): the run must not stop on it
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        from ..data import loader
        self._workers_before = loader.WORKERS_IGNORE_STOP_SIGNALS
        loader.WORKERS_IGNORE_STOP_SIGNALS = bool(self._previous)  # workers started from now on
        return self

    def __exit__(self, *exc) -> None:
        for sig in list(self._previous):
            signal.signal(sig, self._restore(sig))
        self._previous.clear()
        from ..data import loader
        loader.WORKERS_IGNORE_STOP_SIGNALS = self._workers_before


# AdamW's betas: the release pretrains with (0.9, 0.95) and fine-tunes with PyTorch's default (0.9, 0.999)
PRETRAIN_BETAS = (0.9, 0.95)
FINETUNE_BETAS = (0.9, 0.999)
# the release's fine-tuning defaults (main_finetune_as.py; the CLI's defaults too)
FINETUNE_WEIGHT_DECAY, FINETUNE_MIN_LR = 5e-4, 1e-6


def _remove_partial_saves(folder: str) -> None:
    """A process killed while it wrote a checkpoint leaves the partial file (as large as a
    checkpoint): a run starting in the folder deletes those of writers that are gone, and says so."""
    from ..checkpoint import remove_partial_saves
    for name, size in remove_partial_saves(folder):
        shown = f"{size / 2 ** 30:.1f} GiB" if size >= 2 ** 30 else f"{size / 2 ** 20:.1f} MiB"
        print(f"note: deleted {os.path.join(folder, name)} ({shown}), the partial file of a checkpoint write that "
              "was killed", file=sys.stderr)


class Trainer:
    """One optimisation loop for both models: accumulation, autocast, clipping, NaN skipping,
    per-step lr, progress, metrics, atomic checkpoints and exact resume."""

    def __init__(self, model: nn.Module, opts: Dict[str, Any], dataset, device: torch.device, info: D.DistInfo,
                 step_fn, layer_decay: Optional[float] = None, on_epoch_end=None, betas=PRETRAIN_BETAS,
                 no_decay: Sequence[str] = PRETRAIN_NO_DECAY):
        self.opts = opts
        self.model = model.to(device)
        self.device = device
        self.info = info
        self.step_fn = step_fn  # (model, batch) -> loss
        self.on_epoch_end = on_epoch_end
        self.out_dir = opts["output_dir"]
        self.precision = _resolve_precision(opts.get("precision", "auto"), device)
        accum = int(opts.get("accum_iter", 1))
        batch = int(opts["batch_size"])
        if accum < 1 or batch < 1:
            raise SystemExit("error: --batch-size and --accum-iter must be positive")
        self.accum = accum
        self.eff_batch = batch * accum * info.world_size
        self.lr = opts.get("lr") or effective_lr(opts["blr"], self.eff_batch)
        # the optimizer's arithmetic is float32: an lr (or lr x weight decay) past its range fails in the step
        wd = float(opts.get("weight_decay") or 0.0)
        if not (math.isfinite(self.lr) and self.lr * max(1.0, wd) <= torch.finfo(torch.float32).max):
            where = "--lr" if opts.get("lr") else f"--blr {opts['blr']:g} x the effective batch {self.eff_batch} / 256"
            raise TrainingError(f"the learning rate {self.lr:g} ({where}){f' x the weight decay {wd:g}' if wd > 1 else ''} "
                                "is beyond float32's range, in which the optimizer computes")
        # the model is on its device already: on CUDA this is the single-kernel AdamW
        self.layer_decay, self.betas = layer_decay, tuple(betas)
        self._build_optimizer(no_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        weights = None
        if opts.get("weighted_sampling"):
            from ..data import label_weights
            weights = label_weights(dataset)
            if not bool((weights > 0).any()):
                raise TrainingError("--weighted-sampling weighs the clips by their labels, and these clips have "
                                    "none (a manifest needs its class-label CSV, --labels; class folders label "
                                    "their clips)")
        n_samples = opts.get("epoch_size") or len(dataset)
        try:
            self.sampler = ResumableSampler(len(dataset), shuffle=True, seed=opts.get("seed", 0), rank=info.rank,
                                            world_size=info.world_size, weights=weights, num_samples=n_samples,
                                            replacement=not opts.get("no_replacement"))
        except ValueError as e:
            raise TrainingError(f"--epoch-size {n_samples}: {e} (leave out --no-replacement)" if "replacement" in str(e)
                                else str(e)) from None
        self.loader = _loader(dataset, opts, self.sampler, batch)
        self.batches_per_epoch = math.ceil(self.sampler.per_rank / batch)
        # the last step of an epoch takes the batches left over from whole accumulation groups
        self._set_steps_per_epoch(max(1, math.ceil(self.batches_per_epoch / accum)))
        self.step = 0
        self.epoch = 0
        self.epoch_step = 0
        self.best: Optional[float] = None
        self.eval_pending = False  # the epoch just finished is not evaluated yet
        self.nan_streak = 0
        self.skipped = 0
        self._stop: Optional[GracefulInterrupt] = None  # while run() runs
        self._stop_seen = False  # some process was asked to stop (learnt through _finite's all-reduce)
        self._last_save: Optional[Tuple[int, str]] = None  # (step, name) of the last checkpoint written
        if info.is_main and opts.get("overwrite") and not opts.get("resume"):
            _clear_old_run(self.out_dir)  # the new run's inputs are read and its model built: the old run goes
        self.runlog = RunLog(self.out_dir, info.is_main, opts.get("tensorboard", True))
        if info.is_main:
            _remove_partial_saves(self.out_dir)
        self.ddp = None
        if info.enabled:
            # the buffers are constants the model computes alike everywhere (the decoder's relative
            # coordinates): no broadcast of them before every forward
            import inspect
            ddp = nn.parallel.DistributedDataParallel
            # (torch >= 2.13 names it forward_sync_buffers; the buffers agree at the start anyway)
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
                else {"broadcast_buffers": False}
            self.ddp = ddp(self.model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
        self.forward_model = self.ddp or self.model
        if opts.get("compile") or opts.get("compile_mode"):
            mode = opts.get("compile_mode")
            ops_cuda.prepare_for_compile()  # a cuda backend the model would choose must be loaded to be traced
            self.forward_model = torch.compile(self.forward_model, mode=None if mode in (None, "default") else mode)

    def _build_optimizer(self, no_decay: Sequence[str]) -> None:
        self.no_decay = tuple(no_decay)
        groups = param_groups(self.model, self.opts["weight_decay"], self.layer_decay, self.no_decay)
        self.optimizer = adamw(groups, self.lr, self.betas)

    def _set_steps_per_epoch(self, n: int) -> None:
        self.steps_per_epoch = n
        self.total_steps = int(self.opts["epochs"]) * n
        self.warmup_steps = int(round(self.opts.get("warmup_epochs", 0) * n))

    @property
    def schedule(self) -> Dict[str, Any]:
        # "leftover_steps": epochs end with a step over the batches left from whole accumulation
        # groups (checkpoints without the key come from versions that left them out)
        return {"lr": self.lr, "min_lr": self.opts.get("min_lr", 0.0), "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "leftover_steps": self.steps_per_epoch == math.ceil(self.batches_per_epoch / self.accum),
                "no_decay": list(self.no_decay), "clips_per_step": self.eff_batch}

    def current_lr(self) -> float:
        return lr_at(self.step, self.total_steps, self.warmup_steps, self.lr, self.opts.get("min_lr", 0.0))

    # -- checkpoints --
    def save(self, name: str = LAST) -> None:
        # every process's random state (masks, augmentation draws differ by rank), gathered on all
        ranks = None
        if self.info.enabled:
            ranks = [None] * self.info.world_size
            torch.distributed.all_gather_object(ranks, rng_state())
        if self.info.is_main:
            save_training_state(os.path.join(self.out_dir, name), model=self.model, optimizer=self.optimizer,
                                scaler=self.scaler, step=self.step, epoch=self.epoch, epoch_step=self.epoch_step,
                                args=_json_safe(self.opts), schedule=self.schedule, best=self.best,
                                extra={"rng_ranks": ranks, "eval_pending": self.eval_pending and name == LAST})
        D.barrier()
        self._last_save = (self.step, name)

    def resume(self, path: str) -> None:
        state = load_training_state(path)
        saved = state["schedule"].get("steps_per_epoch")
        if saved != self.steps_per_epoch and "leftover_steps" not in state["schedule"] \
                and saved == max(1, self.batches_per_epoch // self.accum):
            # written by an earlier version, whose epochs left the batches past whole accumulation
            # groups out: the run goes on with its own schedule
            self._set_steps_per_epoch(saved)
            if self.info.is_main:
                print(f"note: {path} counts {saved} steps per epoch (the batches left over from whole "
                      "accumulation groups untrained, as the run started); continuing so", file=sys.stderr)
        if state["schedule"].get("steps_per_epoch") != self.steps_per_epoch:
            raise TrainingError(f"cannot resume from {path}: it was made with {state['schedule'].get('steps_per_epoch')} "
                                f"steps per epoch, this run has {self.steps_per_epoch} (batch size, accumulation, "
                                "data or process count changed); give the run's options again (--config "
                                f"{os.path.join(os.path.dirname(os.path.abspath(path)), 'config.json')} repeats them)")
        clips = state["schedule"].get("clips_per_step")  # (checkpoints of earlier versions do not say)
        if isinstance(clips, int) and clips != self.eff_batch and state.get("epoch_step"):  # (mid-epoch only)
            raise TrainingError(f"cannot resume from {path}: its steps took {clips} clips each (batch size x "
                                f"accumulation x processes), this run's take {self.eff_batch}, and its epoch "
                                "stopped mid-way: it goes on from the clip it stopped at only with the steps it began "
                                "with. Give the run's options again (--config "
                                f"{os.path.join(os.path.dirname(os.path.abspath(path)), 'config.json')} repeats them)")
        kind = state.get("kind")
        if kind and kind != type(self.model).__name__:
            raise TrainingError(f"cannot resume from {path}: it is a checkpoint of {kind}, this run trains "
                                f"{type(self.model).__name__} (use it with --init / --pretrained instead)")
        # a run keeps the weight-decay rule it began with (checkpoints without the key come from
        # versions that never decayed the tokens; for a classifier that is the fine-tuning rule)
        rule = tuple(state["schedule"].get("no_decay", LEGACY_NO_DECAY))
        if rule != self.no_decay:
            self._build_optimizer(rule)
        decays = [g["weight_decay"] for g in self.optimizer.param_groups]
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()
            raise TrainingError(f"cannot resume from {path}: its model or optimizer does not fit this run's "
                                f"({first[0] if first else type(e).__name__}{' ...' if len(first) > 1 else ''}); "
                                "resume with the options the run was started with (its config.json)") from None
        # the checkpoint's groups carry the decay they were saved with; the run's options say what applies
        # (the resumed run's own by default, see _resumed_run_inputs; a given --weight-decay changes it)
        for g, decay in zip(self.optimizer.param_groups, decays):
            g["weight_decay"] = decay
        if state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.best = state.get("best")
        # an evaluation left pending is run again when the run evaluates (its rows, if any, go)
        self.eval_pending = bool(state.get("eval_pending")) and self.epoch_step == 0 and self.on_epoch_end is not None
        self.runlog.truncate_after(self.step, evaluation_too=self.eval_pending)
        ranks = state.get("rng_ranks")
        if ranks and len(ranks) == self.info.world_size:
            set_rng_state(ranks[self.info.rank])
        elif self.info.rank == 0:
            set_rng_state(state["rng"])
        # else: a checkpoint without the other processes' states keeps this process's own seeding, so
        # that processes do not all draw rank 0's numbers
        if self.info.is_main:
            print(f"resumed from {path} at epoch {self.epoch}, step {self.step} (lr {self.current_lr():.3g})")
            was = state["schedule"].get("lr")
            if isinstance(was, float) and not math.isclose(was, self.lr, rel_tol=1e-9):
                print(f"note: the peak lr is {self.lr:.4g} (from this run's options), the run began with {was:.4g}: "
                      "the schedule goes on with the new one", file=sys.stderr)

    # -- one optimiser step over `accum` batches --
    def _flags(self, nonfinite: torch.Tensor) -> float:
        """All-reduce ``[nonfinite, asked to stop]`` over the processes (every agreement of the loop
        is this one collective, so processes at different agreement points still match); records
        whether any process was asked to stop, and returns the summed ``nonfinite``."""
        asked = self._stop is not None and self._stop.requested
        flag = torch.stack([nonfinite, torch.full_like(nonfinite, 1.0 if asked else 0.0)]).to(self.device)
        if self.info.enabled:
            torch.distributed.all_reduce(flag)
        bad, stop = flag.tolist()
        self._stop_seen = self._stop_seen or stop > 0
        return bad

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process; the same all-reduce carries whether any
        process was asked to stop (:meth:`_agreed`), so stopping together costs no extra one."""
        return self._flags((~torch.isfinite(loss.detach()).all()).float()) == 0

    def _grads_finite(self) -> bool:
        """Whether every gradient is finite: a finite loss can still give an inf or NaN gradient
        (a square root at 0, an overflow in bfloat16), which one step would write into the weights.
        The gradients are the same on every process after DDP's reduction."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)])).all())

    def train_step(self, batches: List[Dict[str, Any]]) -> Optional[float]:
        set_lr(self.optimizer, self.current_lr())
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            ctx = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
            with ctx:
                with _autocast(self.device, self.precision):
                    loss = self.step_fn(self.forward_model, batch)
                if not self._finite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    return None
                self.scaler.scale(loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
        # a non-finite gradient skips the step (fp16's scaler does that itself and lowers its scale);
        # with clipping, the norm that clipping computes tells
        clip = self.opts.get("clip_grad")
        finite = True
        if clip:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            finite = self.scaler.is_enabled() or bool(torch.isfinite(norm))
        elif not self.scaler.is_enabled():
            finite = self._grads_finite()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def _check_replicas(self) -> None:
        """Under DDP every process must end with the same weights (one all-gather of a checksum)."""
        if not self.info.enabled:
            return
        with torch.no_grad():
            total = sum(p.double().sum() for p in self.model.parameters()).reshape(1).to(self.device)
        sums = D.all_gather_cat(total)
        if not bool((sums == sums[0]).all()):
            raise TrainingError(f"the {self.info.world_size} processes ended with different weights: {sums.tolist()}")
        if self.info.is_main:
            print(f"weights identical on all {self.info.world_size} processes (ranks agree)")

    def run(self) -> Dict[str, Any]:
        if self.info.is_main and self.step == 0 and 0 < self.total_steps <= self.warmup_steps:
            w, e = float(self.opts.get("warmup_epochs") or 0), int(self.opts["epochs"])
            fix = (f"the demo warms up for {w:g} epoch{'' if w == 1 else 's'}: give more --epochs"
                   if self.opts.get("command") == "demo" else "--warmup-epochs sets the warmup")
            ws, ts = self.warmup_steps, self.total_steps
            print(f"warning: the warmup ({w:g} epoch{'' if w == 1 else 's'}, {ws} step{'' if ws == 1 else 's'}) is not "
                  f"shorter than the run ({e} epoch{'' if e == 1 else 's'}, {ts} step{'' if ts == 1 else 's'}): the lr "
                  f"never reaches its peak of {self.lr:.3g} ({fix})", file=sys.stderr)
        # Ctrl-C or SIGTERM finishes the step in progress and writes a checkpoint before stopping;
        # with several processes, all of them stop after the same step (see _agreed)
        with GracefulInterrupt(hard_second=self.info.enabled) as stop:
            self._stop, self._stop_seen = stop, False
            try:
                return self._run(stop)
            finally:
                self._stop = None

    def _agreed(self, stop: "GracefulInterrupt", collective: bool = False) -> bool:
        """Whether to stop now: asked in this process, or (with several) in any of them, so that all
        stop after the same step and write its checkpoint together. ``collective`` asks all of them
        now (before each step, at an epoch's end, and where a process's loader stopped on the
        signal); otherwise what the last loss check's all-reduce carried."""
        if not self.info.enabled:
            return stop.requested
        if collective:
            self._flags(torch.zeros((), device=self.device))
        return self._stop_seen

    def _end_epoch(self, stop: "GracefulInterrupt") -> None:
        try:
            self.on_epoch_end(self)
        except Exception as e:
            if not stop.requested:
                raise
            # the interrupt also stopped the evaluation's loader workers: the checkpoint written before
            # the evaluation stands, and a resume evaluates the epoch
            self._note_error_after_stop(e, "the epoch's evaluation", "a resume evaluates the epoch")
            self.runlog.close()
            raise Interrupted(self.step, os.path.join(self.out_dir, LAST), stop.signum) from None
        self.eval_pending = False

    def _note_error_after_stop(self, e: BaseException, what: str, consequence: str) -> None:
        """An error after a stop request is taken as the stop's (it ends loader workers too), and named,
        in case it was one of its own."""
        first = str(e).splitlines()[0] if str(e) else ""
        rank = f" (rank {self.info.rank})" if self.info.enabled else ""
        print(f"note{rank}: {what} ended with {type(e).__name__}{': ' + first if first else ''} after the stop was asked "
              f"for ({consequence})", file=sys.stderr)

    def _stop_here(self, save: bool = True) -> None:
        """The run was asked to stop between steps: checkpoint this point (unless just done), then stop."""
        if save and self._last_save != (self.step, LAST):  # (--save-every-steps may have just written it)
            self.save()
        self.runlog.close()
        raise Interrupted(self.step, os.path.join(self.out_dir, LAST), self._stop.signum if self._stop else None)

    def _run(self, stop: "GracefulInterrupt") -> Dict[str, Any]:
        opts = self.opts
        max_nan = int(opts.get("max_nan_steps", 20))
        save_every = int(opts.get("save_every_steps") or 0)
        epochs = int(opts["epochs"])
        last_loss = float("nan")
        window = [0.0, 0]  # finite losses since the last log row: sum, count
        start_step = self.step
        if self.eval_pending and self.on_epoch_end is not None:
            if self.info.is_main:
                tqdm.write(f"evaluating epoch {self.epoch} (the checkpoint was written before its evaluation ended)")
            self._end_epoch(stop)
            self.save()
        while self.epoch < epochs:
            self.model.train()
            self.loader.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, start=self.epoch_step * self.accum * int(opts["batch_size"]))
            rng = torch.get_rng_state()  # the loader's seed draw must not shift the training RNG (exact resume)
            it = iter(self.loader)
            torch.set_rng_state(rng)
            bar = tqdm(total=self.steps_per_epoch, initial=self.epoch_step, disable=not self.info.is_main
                       or opts.get("quiet"), desc=f"epoch {self.epoch + 1}/{epochs}", unit="step", dynamic_ncols=True)
            t0, seen = time.time(), 0
            while self.epoch_step < self.steps_per_epoch:
                batches = []
                for _ in range(self.accum):
                    try:
                        batches.append(next(it))
                    except StopIteration:
                        break
                    except Exception as e:
                        if stop.requested:  # the interrupt also stopped the loader's workers
                            bar.close()
                            self._note_error_after_stop(e, "reading the next batch",
                                                        "the checkpoint holds the last finished step")
                            if self.info.enabled:  # the others are at this step's agreement: meet them there
                                self._agreed(stop, collective=True)
                            self._stop_here()
                        raise
                if not batches:
                    break
                # with several processes, whether any was asked to stop is agreed before each step
                # (where a process whose loader the signal stopped meets the others), so that all
                # stop after the same step: one small all-reduce per step
                if self.info.enabled and self._agreed(stop, collective=True):
                    bar.close()
                    self._stop_here()
                lr = self.current_lr()  # the step's lr (train_step sets it)
                loss = self.train_step(batches)
                n = sum(len(b["target"]) for b in batches) * self.info.world_size
                if loss is None:
                    self.nan_streak += 1
                    self.skipped += 1
                    if self.info.is_main:
                        tqdm.write(f"step {self.step}: non-finite loss or gradients, step skipped "
                                   f"({self.nan_streak} in a row)")
                    if self.nan_streak > max_nan:
                        raise TrainingError(f"{self.nan_streak} non-finite steps in a row (limit --max-nan-steps "
                                            f"{max_nan}): the run diverged; lower the learning rate or check the data")
                else:
                    self.nan_streak = 0
                    last_loss = loss
                    window[0] += loss
                    window[1] += 1
                self.step += 1
                self.epoch_step += 1
                seen += n
                rate = seen / max(1e-9, time.time() - t0)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                bar.update(1)
                if self.step % max(1, int(opts.get("log_every", 10))) == 0 or self.epoch_step == self.steps_per_epoch:
                    # the mean loss of the steps since the last row, over the processes (every
                    # process logs at the same steps)
                    mean = window[0] / window[1] if window[1] else float("nan")
                    window = [0.0, 0]
                    logged = float(D.all_reduce_mean(torch.tensor([mean], device=self.device)).item()) \
                        if self.info.enabled else mean
                    # "epoch" counts from 1, as the evaluation rows, which name the epoch just finished
                    self.runlog.write({"phase": "train", "step": self.step, "epoch": self.epoch + 1, "loss": logged,
                                       "lr": lr, "samples_per_s": rate, "skipped_steps": self.skipped})
                if save_every and self.step % save_every == 0:
                    self.save()
                if self.epoch_step < self.steps_per_epoch and self._agreed(stop):
                    bar.close()
                    self._stop_here()
            bar.close()
            self.epoch += 1
            self.epoch_step = 0
            if self.on_epoch_end is not None:
                self.eval_pending = True
                self.save()  # the epoch's training is kept should its evaluation fail (a resume runs it)
                self._end_epoch(stop)
            self.save()
            if self.epoch < epochs and self._agreed(stop, collective=True):
                self._stop_here(save=False)
        self.runlog.close()
        self._check_replicas()
        if self.info.enabled and self.step > start_step:
            last_loss = float(D.all_reduce_mean(torch.tensor([last_loss], device=self.device)).item())
        return {"steps": self.step, "epochs": self.epoch, "loss": last_loss, "skipped_steps": self.skipped,
                "best": self.best, "trained_steps": self.step - start_step}


def _skipped_note(summary: Dict[str, Any]) -> str:
    """The end of a run says how many of its steps were skipped for a non-finite loss (each one also
    said so as it happened): a short run can end with most of them skipped and no limit reached."""
    k, n = summary.get("skipped_steps", 0), summary.get("trained_steps", 0)
    return f" ({k} of the {n} steps skipped: non-finite loss or gradients)" if k else ""


def _clear_old_run(out_dir: str) -> None:
    """``--overwrite``: the old run's checkpoints, logs and reports go (the main process's part, as a
    run starting afresh in the folder creates its log; an input refused before leaves them)."""
    import shutil

    # (an evaluation's results in the folder were of the old run's model)
    for name in (LAST, BEST, "model.pt", "metrics.jsonl", "best_report.csv", "metrics.json", "report.csv",
                 "evaluate-config.json"):
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            os.remove(p)
    shutil.rmtree(os.path.join(out_dir, "tensorboard"), ignore_errors=True)


def _refuse_to_overwrite(opts: Dict[str, Any], info: D.DistInfo) -> None:
    """A new training run must not replace the checkpoint of another one in its folder unasked.
    Every process decides alike; with ``--overwrite`` the old run is cleared once the new one has
    started (:func:`_clear_old_run`, when its inputs have been read and its model built)."""
    out = opts["output_dir"]
    resume = opts.get("resume")
    if resume and resume != "auto" and not opts.get("overwrite"):
        # another run's checkpoint continued here: not over a run this folder holds
        source = os.path.join(resume, LAST) if os.path.isdir(resume) else resume
        here = os.path.join(out, LAST)
        if os.path.isfile(here) and os.path.realpath(os.path.dirname(os.path.abspath(source))) != os.path.realpath(out):
            raise TrainingError(f"{out} holds another run ({LAST}) than the one --resume {resume} continues: give "
                                f"--output-dir {os.path.dirname(os.path.abspath(source))} to continue that run in its "
                                "own folder, or another --output-dir")
        return
    if resume or opts.get("overwrite"):
        return
    if not opts.get("cv_folds") and os.path.isfile(os.path.join(out, "fold-1", LAST)):
        raise TrainingError(f"{out} holds a cross-validation (fold-1/{LAST}): continue it with --cv-folds and "
                            "--resume auto, or choose another --output-dir")
    if not os.path.isfile(os.path.join(out, LAST)):
        return
    raise TrainingError(f"{out} holds a run ({LAST}): continue it with --resume auto, start "
                        "afresh there with --overwrite, or choose another --output-dir")


# the options that name files or folders: from Python a ~ in them is the home folder too (the CLI
# makes them absolute already), so that all of a run's files go to one folder
_PATH_KEYS = ("output_dir", "checkpoint", "pretrained", "init", "data", "eval_data", "labels", "data_root", "resume")


def _expand_paths(opts: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (os.path.expanduser(v) if k in _PATH_KEYS and isinstance(v, str) else v) for k, v in opts.items()}


def _setup(opts: Dict[str, Any], training: bool = False) -> Tuple[torch.device, D.DistInfo]:
    """Device, process group and seed; a training run's folder is checked (see _refuse_to_overwrite)
    and made. The config is written later (:func:`write_config`): a training run's once it has started,
    an evaluation's with its results, so that a refused start leaves the folder's."""
    # an earlier run in this process can survive its return in a reference cycle (the frames that
    # torch's first optimizer captures while it imports its compiler hold the trainer): its model,
    # optimizer state and memory on the device go before this run allocates its own
    gc.collect()
    device = D.pick_device(opts.get("device", "auto"))
    from .. import dispatch

    dispatch.check_device(device)  # a forced backend that cannot run here stops the run before it starts
    info = D.init(device)  # the rank is known from here (torchrun's or SLURM's variables)
    if training:
        _refuse_to_overwrite(opts, info)
    if device.type == "cuda" and info.enabled:
        device = D.pick_device("cuda", info.local_rank)
    torch.manual_seed(int(opts.get("seed", 0)) + info.rank)
    if info.is_main:
        os.makedirs(opts["output_dir"], exist_ok=True)
    D.barrier()
    return device, info


def write_config(opts: Dict[str, Any], info: D.DistInfo, evaluation: bool = False) -> None:
    """The run's options as ``config.json`` (what ``--config`` repeats); ``resume`` and ``overwrite``
    are what was done to the folder, not how the run goes, and are left out. An evaluation in a
    folder whose ``config.json`` is another command's (a training run's folder) writes
    ``evaluate-config.json`` instead, so that the run can still be repeated and resumed."""
    if info.is_main:
        kept = {k: v for k, v in _json_safe(opts).items() if k not in ("resume", "overwrite")}
        name = "config.json"
        if evaluation:
            path = os.path.join(opts["output_dir"], name)
            try:
                with open(path) as f:
                    command = json.load(f).get("command", "")
            except FileNotFoundError:
                command = "evaluate"
            except (OSError, ValueError, AttributeError):
                command = ""  # a file this evaluation did not write: kept
            if command != "evaluate":
                name = "evaluate-config.json"
                who = f"the {command} run's" if isinstance(command, str) and command else "another command's"
                print(f"note: {path} is {who}: this evaluation's options go to {name}", file=sys.stderr)
            kept.setdefault("command", "evaluate")
            if isinstance(kept.get("checkpoint"), str):  # as a run's other paths: --config repeats it from anywhere
                kept["checkpoint"] = os.path.abspath(kept["checkpoint"])
        with open(os.path.join(opts["output_dir"], name), "w") as f:
            json.dump(kept, f, indent=2, sort_keys=True)


@contextlib.contextmanager
def _model_input(T: int):
    """A model that cannot be built for the input length (or the options): one error, not a traceback.
    Checkpoint errors say what they say."""
    from ..checkpoint import CheckpointError

    try:
        yield
    except CheckpointError:
        raise
    except ValueError as e:
        if "patch_stride=" in str(e) and "img_size" not in str(e):
            raise TrainingError(f"--patch-stride does not fit the model: {e}") from None
        raise TrainingError(f"cannot build the model for an input of {T} frames (--target-length, or from "
                            f"--clip-seconds) with these options: {e}") from None


def _class_mids(dataset) -> Optional[List[str]]:
    """A dataset's label CSV mids, or None (class folders, synthetic data: only names)."""
    mids = getattr(dataset, "class_mids", None)
    return list(mids) if mids else None


def compared_classes(names: List[str], mids: Optional[List[str]], other_names: List[str],
                     other_mids: Optional[List[str]]) -> Tuple[List[str], List[str]]:
    """What tells two class lists apart: the mids where both have them (display names can repeat
    or be reworded; mids cannot), else the names (class folders are their names)."""
    if mids and other_mids:
        return list(mids), list(other_mids)
    return list(names), list(other_names)


def _class_mismatch(train: List[str], other: List[str], where: str = "the evaluation data",
                    fix: str = "give both the same classes (the same labels CSV, or class folders with the same names)"
                    ) -> str:
    if train and not other:
        return (f"{where} has no classes, the training data {len(train)}: a manifest's labels are read with its "
                "class-label CSV (--labels class_labels_indices.csv)")
    only_train = [c for c in train if c not in other]
    only_other = [c for c in other if c not in train]
    if not only_train and not only_other:
        return (f"{where} has the training classes in another order; class indices would be "
                f"scored against the wrong classes: {fix}")
    parts = [f"{len(train)} classes in training, {len(other)} in {where}"]
    if only_train:
        parts.append(f"only in training: {', '.join(only_train[:5])}{' ...' if len(only_train) > 5 else ''}")
    if only_other:
        parts.append(f"only in {where}: {', '.join(only_other[:5])}{' ...' if len(only_other) > 5 else ''}")
    return f"{where}'s classes differ from the training data's (" + "; ".join(parts) + f"): {fix}"


def _features(opts, dataset, device):
    from ..data import FeatureExtractor
    return FeatureExtractor(target_length=_target_length(opts, dataset), stats=opts.get("stats", "audioset"),
                            device=device)


def _model_config(opts: Dict[str, Any], target_length: int) -> AudioMAEConfig:
    return AudioMAEConfig.preset(opts.get("model", "tiny"), img_size=(target_length, 128), **_stride_fields(opts),
                                 decoder_mode=opts.get("decoder_mode") or AudioMAEConfig.preset(opts.get("model", "tiny")).decoder_mode,
                                 mask_ratio=opts.get("mask_ratio", 0.8), mask_mode=opts.get("mask_mode", "unstructured"),
                                 mask_t_prob=opts.get("mask_t_prob", PRETRAIN_MASK_T_PROB),
                                 mask_f_prob=opts.get("mask_f_prob", PRETRAIN_MASK_F_PROB),
                                 norm_pix_loss=not opts.get("no_norm_pix_loss", False))


def _stride_fields(opts: Dict[str, Any]) -> Dict[str, Any]:
    """``--patch-stride``'s config field (overlapping patches take the release's 6 x 6 decoder windows:
    ``AudioMAEConfig.window``)."""
    return {} if opts.get("patch_stride") is None else dict(patch_stride=opts["patch_stride"])


# the release's pretraining script (main_pretrain.py) masks 0.7 of the time columns and 0.3 of the
# frequency rows in its 2D mode (its model's own defaults are 0.6 and 0.5, AudioMAEConfig's)
PRETRAIN_MASK_T_PROB, PRETRAIN_MASK_F_PROB = 0.7, 0.3


# --- pretraining --------------------------------------------------------------------------------
def _given(opts: Dict[str, Any]) -> set:
    """The options the caller chose: those the CLI recorded as typed, else (from Python) every one
    that is set."""
    typed = opts.get("explicit_options")
    return set(typed) if typed is not None else {k for k, v in opts.items() if v is not None}


def _architecture_conflicts(opts: Dict[str, Any], cfg: AudioMAEConfig, given) -> List[str]:
    """The given --model / --decoder-mode options that describe another model than ``cfg``."""
    wrong = []
    if "model" in given and opts.get("model"):
        want = AudioMAEConfig.preset(opts["model"])
        if (want.embed_dim, want.depth, want.decoder_embed_dim) != (cfg.embed_dim, cfg.depth, cfg.decoder_embed_dim):
            wrong.append(f"--model {opts['model']}")
    if "decoder_mode" in given and opts.get("decoder_mode") and opts["decoder_mode"] != cfg.decoder_mode:
        wrong.append(f"--decoder-mode {opts['decoder_mode']}")
    if "patch_stride" in given and opts.get("patch_stride") is not None and opts["patch_stride"] != cfg.stride:
        wrong.append(f"--patch-stride {opts['patch_stride']}")
    return wrong


def _resumed_objective(opts: Dict[str, Any], cfg: AudioMAEConfig) -> Dict[str, Any]:
    """A resumed pretraining run trains its own objective: a masking or loss option given that differs
    from the run's is an error (it was taken silently and recorded, the run going on with its own);
    those left out are the run's in the options recorded, so that config.json repeats this run."""
    run = {"mask_ratio": cfg.mask_ratio, "mask_mode": cfg.mask_mode, "mask_t_prob": cfg.mask_t_prob,
           "mask_f_prob": cfg.mask_f_prob, "no_norm_pix_loss": not cfg.norm_pix_loss,
           "decoder_mode": cfg.decoder_mode, "patch_stride": cfg.stride if cfg.overlapping else None}
    given = _given(opts) if opts.get("explicit_options") is not None else set()
    wrong = []
    for k, v in run.items():
        if k in given and k not in ("decoder_mode", "patch_stride") and opts.get(k) is not None and opts[k] != v:
            flag = "--" + k.replace("_", "-")
            wrong.append(flag if isinstance(v, bool) else f"{flag} {opts[k]}")
            wrong[-1] += (f" (the run's: {'given' if v else 'not given'})" if isinstance(v, bool)
                          else f" (the run's: {v})")
    if wrong:
        raise TrainingError(f"cannot resume with {' and '.join(wrong)}: a resumed run trains the objective it began "
                            "with; leave those options out, or start a new run from its model with --init")
    return dict(opts, **{k: v for k, v in run.items() if k not in given})


def _patches(cfg: AudioMAEConfig) -> str:
    """How ``cfg``'s patches are cut, where they overlap (for messages about its architecture)."""
    return f", patches every {cfg.stride}" if cfg.overlapping else ""


def _init_overrides(opts: Dict[str, Any]) -> Dict[str, Any]:
    """``--init``: the objective options given (mask ratio, mode and 2D fractions, norm-pix loss) apply to the loaded
    model; the architecture is the file's, so a --model or --decoder-mode that differs is an error."""
    typed = opts.get("explicit_options")
    given = _given(opts)
    from ..checkpoint import infer_config, read_checkpoint
    sd, file_cfg, file_args = read_checkpoint(opts["init"])
    try:
        saved = AudioMAEConfig.from_dict(dict(file_cfg) if file_cfg else infer_config(sd, file_args))
    except (ValueError, TypeError):
        saved = None  # loading the file says what is wrong with it
    if saved is not None and typed is not None:  # only options the user gave can contradict the file
        wrong = _architecture_conflicts(opts, saved, given)
        if wrong:
            raise TrainingError(f"--init {opts['init']} holds a model of width {saved.embed_dim}, depth {saved.depth}, "
                                f"{saved.decoder_mode} decoder{_patches(saved)}: {' and '.join(wrong)} cannot apply to it (the "
                                "architecture is the file's; leave those options out, or start without --init)")
    out: Dict[str, Any] = {}
    if "mask_ratio" in given and opts.get("mask_ratio") is not None:
        out["mask_ratio"] = float(opts["mask_ratio"])
    if "mask_mode" in given and opts.get("mask_mode"):
        out["mask_mode"] = opts["mask_mode"]
    for k in ("mask_t_prob", "mask_f_prob"):
        if k in given and opts.get(k) is not None:
            out[k] = float(opts[k])
    if "no_norm_pix_loss" in given:
        out["norm_pix_loss"] = not opts.get("no_norm_pix_loss", False)
    return out


def _resumed_run_inputs(opts: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[dict]]:
    """A resumed run reads its files as it began (a run from before ``--downmix`` averaged the
    channels), keeps its weight decay and lr floor unless given, and keeps its model: returns the
    options and the checkpoint's model config (None when not resuming)."""
    resume = opts.get("resume")
    path = os.path.join(opts["output_dir"], LAST) if resume == "auto" else resume
    if path and os.path.isdir(path):
        path = os.path.join(path, LAST)  # a run folder: its last checkpoint (see resolve_resume)
    if not path or not os.path.isfile(path):
        return opts, None
    from ..checkpoint import read_checkpoint
    _, cfg, args = read_checkpoint(path)
    # the optimisation options whose defaults have changed since: a run goes on with its own
    opts, changed = inherit_run_options(opts, args, None, names=("downmix", "weight_decay", "min_lr"), where=path)
    _note_inherited(changed, path)
    _note_other_inputs(opts, args, path)
    return opts, cfg


# the options that say which clips a run reads and in which order: a resume with others goes on
# with them, and says so (the same data order and draws as an uninterrupted run need the same ones)
_DATA_OPTIONS = ("data", "data_root", "labels", "seed")


def _note_other_inputs(opts: Dict[str, Any], args: Any, path: str) -> None:
    if not isinstance(args, dict) or os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return

    def norm(k, v):
        if k == "seed":
            return int(v if v is not None else 0)
        if isinstance(v, str) and v != "synthetic":
            return os.path.normpath(os.path.abspath(os.path.expanduser(v)))
        return v

    other = [k for k in _DATA_OPTIONS if k in args and norm(k, args[k]) != norm(k, opts.get(k))]
    if other:
        def shown(d):
            flags = [f"--{k.replace('_', '-')}" + (f" {d[k]}" if d.get(k) is not None else "") for k in other]
            return " and ".join(f if d.get(k) is not None else f"no {f}" for k, f in zip(other, flags))
        print(f"note: the run of {path} began with {shown(args)}, this run gives {shown(opts)}: it goes on with "
              "these, so the clips and their order from here on differ from an uninterrupted run's", file=sys.stderr)


def _recorded_inputs(opts: Dict[str, Any]) -> Dict[str, Any]:
    """The input options a run's checkpoints record with their values also when a Python caller
    left them out (a checkpoint without ``downmix`` reads as a run from before the option, which
    averaged the channels; later commands would then average them for this run too)."""
    return dict(opts, downmix=opts.get("downmix") or "first")


def pretrain(opts: Dict[str, Any]) -> Dict[str, Any]:
    """Masked-autoencoder pretraining with the paper's recipe (see ``audiomae pretrain --help``)."""
    from ..data import roll_and_magnitude
    opts = _expand_paths(opts)

    from ..checkpoint import adaptations_as_notes, reading_once
    with reading_once():  # a checkpoint read while setting up (resume, --init) comes from disk once
        opts, resumed_cfg = _resumed_run_inputs(opts)
        opts = _recorded_inputs(opts)

        device, info = _setup(opts, training=True)
        dataset = build_dataset(opts, "train")
        _check_files_exist(dataset, "--data", opts.get("data"))
        T = _target_length(opts, dataset)
        with _model_input(T):
            if resumed_cfg:
                # the run's own model (e.g. a decoder depth that presets no longer give)
                run_cfg = AudioMAEConfig.from_dict(resumed_cfg)
                typed = opts.get("explicit_options")
                wrong = _architecture_conflicts(opts, run_cfg, set(typed)) if typed is not None else []
                if wrong:
                    raise TrainingError(f"cannot resume: {' and '.join(wrong)} does not fit this run's model (width "
                                        f"{run_cfg.embed_dim}, depth {run_cfg.depth}, {run_cfg.decoder_mode} decoder{_patches(run_cfg)}); "
                                        "resume with the options the run was started with (its config.json)")
                if run_cfg.img_size[0] != T:
                    raise TrainingError(f"cannot resume: the run's model takes {run_cfg.img_size[0]} frames, these "
                                        f"options give {T} (resume with the options the run was started with, its "
                                        "config.json: --clip-seconds, --target-length)")
                opts = _resumed_objective(opts, run_cfg)
                model = AudioMAE(run_cfg)
            elif opts.get("init"):
                with adaptations_as_notes():
                    model = AudioMAE.from_pretrained(opts["init"], img_size=(T, 128), **_init_overrides(opts))
            else:
                model = AudioMAE(_model_config(opts, T))
        cfg = model.config  # a masking that removes no patch has no loss: said before the first step
        problem = masking_removes_nothing(cfg.grid_size, cfg.mask_mode, cfg.mask_ratio, cfg.mask_t_prob, cfg.mask_f_prob)
        if problem:
            T_, F_ = cfg.grid_size
            which = (f"--mask-t-prob {cfg.mask_t_prob:g} and --mask-f-prob {cfg.mask_f_prob:g}"
                     if cfg.mask_mode == "time_frequency" else f"--mask-ratio {cfg.mask_ratio:g}")
            raise TrainingError(f"{which} remove no patch of the {T_} x {F_} patch grid with --mask-mode "
                                f"{cfg.mask_mode}, and the loss is taken on the removed patches: remove more")
        problem = masking_keeps_nothing(cfg.grid_size, cfg.mask_mode, cfg.mask_ratio)
        if problem:
            raise TrainingError(f"--mask-ratio {problem[0]}, and the encoder learns from the kept ones")
        feats = _features(opts, dataset, device)
        ratio = model.config.mask_ratio

        def step_fn(m, batch):
            wave = batch["waveform"].to(device, non_blocking=True)
            lengths = batch.get("length")  # clips padded to the clip length: roll and features follow them
            if opts.get("augment", True):
                wave = roll_and_magnitude(wave, lengths=lengths)
            return m(feats(wave, lengths), mask_ratio=ratio).loss

        on_epoch_end = None
        if opts.get("eval_data"):
            eval_set = build_dataset(opts, "val")
            _check_files_exist(eval_set, "--eval-data", opts["eval_data"])

            def on_epoch_end(tr: Trainer):
                loss = held_out_loss(tr.model, eval_set, opts, device, feats, info, ratio)
                tr.runlog.write({"phase": "eval", "step": tr.step, "epoch": tr.epoch, "loss": loss})
                if info.is_main:
                    tqdm.write(f"epoch {tr.epoch}: held-out masked-patch loss {loss:.4f} ({len(eval_set)} clips)")

        trainer = Trainer(model, opts, dataset, device, info, step_fn, on_epoch_end=on_epoch_end)
        path = resolve_resume(opts.get("resume"), opts["output_dir"])
        if path:
            trainer.resume(path)
        elif opts.get("resume") and opts["resume"] != "auto":
            raise SystemExit(f"error: --resume {opts['resume']}: no such checkpoint")
        else:  # a start from step 0: rows of an earlier start that left no checkpoint are trained again
            trainer.runlog.truncate_after(0, evaluation_too=True)
        write_config(opts, info)
    if info.is_main:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"pretraining {n / 1e6:.2f}M parameters on {device} ({trainer.precision}), {len(dataset)} clips, "
              f"input {T}x128, effective batch {trainer.eff_batch}, lr {trainer.lr:.3g}, {trainer.total_steps} steps")
    summary = trainer.run()
    if info.is_main:
        # the run's options go with it: embed and reconstruct read its inputs as it did
        model.save_pretrained(os.path.join(opts["output_dir"], "model.pt"), args=_json_safe(opts))
        where = os.path.join(opts["output_dir"], "model.pt")
        if summary["trained_steps"]:
            print(f"done: final loss {summary['loss']:.4f}{_skipped_note(summary)}; model in {where}")
        else:
            print(f"nothing to train: the run had finished its {summary['epochs']} epochs (step {summary['steps']}); "
                  f"raise --epochs to train further; model in {where}")
    if opts.get("cleanup", True):
        D.cleanup()
    return summary


# --- fine-tuning and evaluation -----------------------------------------------------------------
def _loss_fn(multi_label: bool, smoothing: float = 0.0):
    """BCE with logits (multi-label), or cross-entropy with (soft) targets; ``smoothing`` moves that
    much of each single-label target evenly onto all classes (timm's LabelSmoothingCrossEntropy,
    which the release's ESC-50 script uses with 0.1)."""
    if multi_label:
        return lambda logits, target: F.binary_cross_entropy_with_logits(logits, target)

    def cross_entropy(logits, target):
        if smoothing:
            target = target * (1.0 - smoothing) + smoothing / target.shape[-1]
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return cross_entropy


@torch.no_grad()
def _rank_batches(dataset, opts: Dict[str, Any], info, desc: str):
    """This rank's share of a dataset in order, as ``(batch, keep)``: ``keep`` [B] marks the readable
    clips that are not repeats. Every rank gets the same number of clips (for gathers at equal sizes):
    the last ones wrap around to the first, and ``keep`` leaves those repeats out (clip
    ``r + i * world_size`` is rank r's i-th)."""
    n, world = len(dataset), info.world_size
    sampler = ResumableSampler(n, shuffle=False, rank=info.rank, world_size=world, num_samples=-(-n // world) * world)
    loader = _loader(dataset, opts, sampler, int(opts.get("eval_batch_size") or opts.get("batch_size", 32)))
    done = 0
    for batch in tqdm(loader, desc=desc, disable=not info.is_main or opts.get("quiet"), unit="batch",
                      dynamic_ncols=True, leave=False):
        b = len(batch["target"])
        position = info.rank + world * torch.arange(done, done + b)
        done += b
        yield batch, _readable(batch) & (position < n)


@torch.no_grad()  # (the decorator of the generator above covers only its own steps)
def predict(model: nn.Module, dataset, opts: Dict[str, Any], device, feats, info=D.DistInfo(),
            desc="evaluating") -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores (sigmoid or softmax) and targets of a whole dataset, gathered from every rank."""
    model.eval()
    precision = _resolve_precision(opts.get("precision", "auto"), device)
    scores, targets, kept = [], [], []
    for batch, keep in _rank_batches(dataset, opts, info, desc):
        x = feats(batch)
        with _autocast(device, precision):
            logits = model(x).float()
        scores.append(torch.sigmoid(logits) if dataset.multi_label else torch.softmax(logits, -1))
        targets.append(batch["target"].to(device).float())
        kept.append(keep.to(device))
    s, t, k = torch.cat(scores), torch.cat(targets), torch.cat(kept)
    # gathered at equal sizes from every rank, then the stand-ins for unreadable clips dropped
    k = D.all_gather_cat(k.to(torch.uint8)).cpu().bool()
    return D.all_gather_cat(s).cpu()[k], D.all_gather_cat(t).cpu()[k]


@torch.no_grad()
def held_out_loss(model: nn.Module, dataset, opts: Dict[str, Any], device, feats, info=D.DistInfo(),
                  mask_ratio: float = 0.8, seed: int = 0) -> float:
    """Mean masked-patch loss of a pretraining model over a dataset (each readable clip once, over
    every rank), each clip masked by noise drawn from ``seed`` and its index: the same masks after
    every epoch, with any number of processes or batch size, and in every run (``--seed`` does not
    move them, so runs compare); the training random state is left as it was."""
    was_training = model.training
    model.eval()
    precision = _resolve_precision(opts.get("precision", "auto"), device)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of per-clip losses, clips
    width = _noise_width(getattr(model, "module", model).config)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # only the generators that fork_rng restores: the CPU's and the run's GPU
        torch.random.default_generator.manual_seed(seed + info.rank)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed + info.rank)
        for batch, keep in _rank_batches(dataset, opts, info, "held-out loss"):
            clips = int(keep.sum())
            if not clips:
                continue
            x = feats({k: batch[k][keep] for k in ("input", "waveform", "length") if k in batch})
            noise = _clip_noise(batch["index"][keep].tolist(), width, seed).to(device)
            with _autocast(device, precision):
                loss = model(x, mask_ratio=mask_ratio, noise=noise).loss.double()
            # every clip has the same number of masked patches: the batch's loss is its clips' mean
            total += torch.stack([loss * clips, loss.new_tensor(float(clips))])
    model.train(was_training)
    if info.enabled:
        total = D.all_reduce_mean(total)
    if total[1] == 0:
        raise TrainingError(f"no readable clip in the held-out set ({len(dataset)} clips)")
    return float(total[0] / total[1])


def _noise_width(cfg: AudioMAEConfig) -> int:
    """The number of noise values per clip that fix the pretraining masking of ``cfg``'s mode."""
    T, F = cfg.grid_size
    return {"unstructured": T * F, "time": T, "frequency": F, "time_frequency": T + F}[cfg.mask_mode]


def _clip_noise(indices: Sequence[int], width: int, seed: int) -> torch.Tensor:
    """``[len(indices), width]`` masking noise, each row drawn from ``seed`` and its clip's index."""
    rows = [torch.rand(width, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))) for i in indices]
    return torch.stack(rows) if rows else torch.zeros(0, width)


def _readable(batch: Dict[str, Any]) -> torch.Tensor:
    """bool [B]: the items of a batch that are their own clip, not a stand-in for an unreadable one
    (see :func:`audiomae.data.dataset.collate_items`)."""
    n = len(batch["target"])
    sub = batch.get("substituted")
    return torch.ones(n, dtype=torch.bool) if sub is None else ~torch.as_tensor(sub, dtype=torch.bool)


def compute_metrics(scores, targets, dataset) -> Dict[str, Any]:
    names = list(getattr(dataset, "class_names", None) or [])
    if dataset.multi_label:
        return multilabel_metrics(scores, targets, names or None)
    return singlelabel_metrics(scores, targets, names or None)


def headline(metrics: Dict[str, Any]) -> Tuple[str, float]:
    return ("mAP", metrics["mAP"]) if "mAP" in metrics else ("accuracy", metrics["accuracy"])


def improves(value: float, best: Optional[float]) -> bool:
    """Whether an evaluation's headline ``value`` replaces the ``best`` so far: the first one does, a
    higher one does (ties keep the earlier), and any number replaces a NaN (an evaluation whose
    classes had no positive clip), which nothing could otherwise beat."""
    return best is None or value > best or (math.isnan(best) and not math.isnan(value))


def write_report(metrics: Dict[str, Any], path: str) -> None:
    """Per-class report as CSV (class, name, then the per-class metrics)."""
    rows = metrics["per_class"]
    keys = list(rows[0].keys()) if rows else ["class", "name"]
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def finetune(opts: Dict[str, Any], leave_group: bool = True) -> Dict[str, Any]:
    """Fine-tune a classifier from a pretrained checkpoint (see ``audiomae finetune --help``); with
    ``opts["cv_folds"]``, a cross-validation (:func:`cross_validate`). ``leave_group=False`` keeps a
    multi-process group joined for a following run."""
    opts = _expand_paths(opts)
    if opts.get("cv_folds"):
        return cross_validate(opts)
    opts = {"weight_decay": FINETUNE_WEIGHT_DECAY, "min_lr": FINETUNE_MIN_LR, **opts}  # for Python callers
    from ..checkpoint import adaptations_as_notes, reading_once
    with reading_once():  # a checkpoint read while setting up (resume, --init) comes from disk once
        opts, resumed_cfg = _resumed_run_inputs(opts)
        if resumed_cfg:
            # the run's patches, whatever --pretrained has (its model is the checkpoint's)
            run_stride = AudioMAEConfig.from_dict(resumed_cfg).stride
            if "patch_stride" in _given(opts) and opts.get("patch_stride") not in (None, run_stride):
                raise TrainingError(f"cannot resume: --patch-stride {opts['patch_stride']} does not fit this run's "
                                    f"model (patches every {run_stride}); resume with the options the run was "
                                    "started with (its config.json)")
            opts["patch_stride"] = run_stride
        opts = _recorded_inputs(opts)
        from ..data import mixup, roll_and_magnitude, spec_augment, waveform_mixup

        device, info = _setup(opts, training=True)
        train_set = build_dataset(opts, "train")
        _need_classes(train_set, opts, "fine-tune")
        _need_two_classes(train_set, opts)
        eval_set = build_dataset(opts, "val")
        _check_files_exist(train_set, "--data", opts.get("data"))
        _check_files_exist(eval_set, "--eval-data" if opts.get("eval_data") else "--data",
                           opts.get("eval_data") or opts.get("data"))
        if opts.get("data", "synthetic") != "synthetic" and not opts.get("eval_data") and info.is_main:
            print(f"warning: no --eval-data: the scores after each epoch, the best checkpoint and its report are "
                  f"measured on the training data ({opts['data']}); give a held-out set for a fair score",
                  file=sys.stderr)
        T = _target_length(opts, train_set)
        overrides = dict(img_size=(T, 128), num_classes=train_set.num_classes, drop_path_rate=opts.get("drop_path", 0.1),
                         finetune_mask_2d=bool(opts.get("mask_2d", False)),
                         finetune_mask_t_prob=opts.get("mask_t_prob", 0.2), finetune_mask_f_prob=opts.get("mask_f_prob", 0.2))
        overrides.update(_stride_fields(opts))
        trained, evaluated = compared_classes(train_set.class_names, _class_mids(train_set), eval_set.class_names,
                                              _class_mids(eval_set))
        if trained != evaluated:
            raise TrainingError(_class_mismatch(trained, evaluated))
        with _model_input(T):
            if opts.get("pretrained"):
                with adaptations_as_notes():
                    model = AudioMAEClassifier.from_pretrained(opts["pretrained"], **overrides)
                if "model" in _given(opts) and opts.get("model") and not opts.get("resume"):
                    want, got = AudioMAEConfig.preset(opts["model"]), model.config
                    if (want.embed_dim, want.depth) != (got.embed_dim, got.depth):
                        raise TrainingError(f"--model {opts['model']} (width {want.embed_dim}, {want.depth} blocks) is "
                                            f"not the model of --pretrained {opts['pretrained']} (width "
                                            f"{got.embed_dim}, {got.depth} blocks): leave out --model, which sets "
                                            "the size of a model trained from scratch")
            else:
                model = AudioMAEClassifier(AudioMAEConfig.preset(opts.get("model", "tiny")), **overrides)
        feats = _features(opts, train_set, device)
        smoothing = float(opts.get("label_smoothing") or 0.0)
        if smoothing and train_set.multi_label:
            raise TrainingError("--label-smoothing applies to single-label data (cross-entropy, --single-label); these "
                                "clips are multi-label (BCE)")
        loss_of = _loss_fn(train_set.multi_label, smoothing)
        from ..audio import get_stats
        st = get_stats(opts.get("stats", "audioset"))
        mask_value = 0.0 if st is None else -st.mean / (2 * st.std)

        mix = float(opts.get("mixup", 0) or 0)
        mix_mode = opts.get("mixup_mode") or "batch"

        roll_mag = opts.get("roll_mag") or "off"

        def step_fn(m, batch):
            y = batch["target"].to(device).float()
            if roll_mag != "off":
                if "waveform" not in batch:
                    raise TrainingError("--roll-mag needs waveform batches, not precomputed features")
                w = roll_and_magnitude(batch["waveform"].to(device, non_blocking=True), roll=roll_mag == "both",
                                       lengths=batch.get("length"))
                batch = dict(batch, waveform=w)
            if mix > 0 and mix_mode == "waveform":
                # the release's: clips mixed with other clips before the fbank, each with probability `mix`
                if "waveform" not in batch:
                    raise TrainingError("--mixup-mode waveform needs waveform batches, not precomputed features")
                lengths = batch.get("length")
                w, y, _ = waveform_mixup(batch["waveform"].to(device, non_blocking=True), y, prob=mix,
                                         lengths=None if lengths is None else lengths.to(device))
                batch = dict(batch, waveform=w)
            x = feats(batch)
            if mix > 0 and mix_mode == "batch":
                x, y, _ = mixup(x, y, alpha=mix)
            if opts.get("spec_augment", True):
                # the release masks the log-mel before normalisation with 0: that value, normalised
                x = spec_augment(x, freq_mask=opts.get("freq_mask", 48), time_mask=opts.get("time_mask", 192),
                                 mask_value=mask_value)
            return loss_of(m(x), y)

        def on_epoch_end(tr: Trainer):
            scores, targets = predict(tr.model, eval_set, opts, device, feats, info)
            metrics = compute_metrics(scores, targets, eval_set)
            name, value = headline(metrics)
            tr.runlog.write({"phase": "eval", "step": tr.step, "epoch": tr.epoch,
                             **{k: v for k, v in metrics.items() if k != "per_class"}})
            if info.is_main:
                tqdm.write(f"epoch {tr.epoch}: {name} {value:.4f}{coverage_note(metrics)}")
            if improves(value, tr.best):
                tr.best = value
                tr.save(BEST)
                if info.is_main:
                    write_report(metrics, os.path.join(opts["output_dir"], "best_report.csv"))

        # the classes go into the checkpoints (their args), so evaluate can check a dataset against them
        opts = dict(opts, class_names=list(train_set.class_names), class_mids=_class_mids(train_set),
                    multi_label=bool(train_set.multi_label))
        trainer = Trainer(model, opts, train_set, device, info, step_fn, layer_decay=opts.get("layer_decay", 0.75),
                          on_epoch_end=on_epoch_end, betas=FINETUNE_BETAS, no_decay=FINETUNE_NO_DECAY)
        path = resolve_resume(opts.get("resume"), opts["output_dir"])
        if path:
            trainer.resume(path)
        else:  # a start from step 0: rows of an earlier start that left no checkpoint are trained again
            trainer.runlog.truncate_after(0, evaluation_too=True)
        write_config(opts, info)
    summary = trainer.run()
    if info.is_main:
        model.save_pretrained(os.path.join(opts["output_dir"], "model.pt"), args=_json_safe(opts))
        name = "mAP" if train_set.multi_label else "accuracy"
        print(f"done: best {name} {summary['best']:.4f}{_skipped_note(summary)}; best checkpoint in "
              f"{os.path.join(opts['output_dir'], BEST)}")
    summary["metric"] = "mAP" if train_set.multi_label else "accuracy"
    if leave_group:
        D.cleanup()
    return summary


FOLD = "{fold}"  # the place of the fold number in cross-validation manifest paths


def fold_paths(opts: Dict[str, Any], fold: int) -> Tuple[str, str]:
    """The training and evaluation manifests of ``fold`` (``{fold}`` in ``--data`` and ``--eval-data``)."""
    return opts["data"].replace(FOLD, str(fold)), opts["eval_data"].replace(FOLD, str(fold))


def cross_validate(opts: Dict[str, Any]) -> Dict[str, Any]:
    """K-fold cross-validation, as the recipes score ESC-50 (5 folds, accuracy): one fine-tuning per
    fold, on ``--data`` and evaluated on ``--eval-data`` with ``{fold}`` replaced by 1..K, each in
    ``OUTPUT_DIR/fold-K`` (``--resume auto`` resumes every fold, finished ones at once). The score of
    a fold is its best evaluation; writes ``cv.json`` with the folds' scores, their mean and spread."""
    k = int(opts["cv_folds"])
    out = opts["output_dir"]
    if opts.get("resume") and opts["resume"] != "auto":
        raise TrainingError(f"--cv-folds resumes with --resume auto (each fold from its own folder), not --resume "
                            f"{opts['resume']}, which would be every fold's")
    if not opts.get("overwrite") and not opts.get("resume"):
        # a folder of another run or cross-validation: refused before anything is written
        if os.path.isfile(os.path.join(out, LAST)):
            raise TrainingError(f"{out} holds a run that is not a cross-validation ({LAST}); choose another "
                                "--output-dir")
        _refuse_to_overwrite(dict(opts, output_dir=os.path.join(out, "fold-1")), D.DistInfo())
    if os.environ.get("RANK", "0") == "0":  # the whole cross-validation, for --config (each fold has its own)
        os.makedirs(out, exist_ok=True)
        write_config(opts, D.DistInfo())
    folds = []
    for f in range(1, k + 1):
        data, eval_data = fold_paths(opts, f)
        if os.environ.get("RANK", "0") == "0":
            print(f"fold {f}/{k}: training on {data}, evaluating on {eval_data}")
        summary = finetune(dict(opts, cv_folds=None, data=data, eval_data=eval_data,
                                output_dir=os.path.join(out, f"fold-{f}")), leave_group=False)
        folds.append({"fold": f, "best": summary["best"], "metric": summary["metric"],
                      "output_dir": os.path.join(out, f"fold-{f}")})
    scores = torch.tensor([float(r["best"]) for r in folds], dtype=torch.float64)
    result = {"metric": folds[0]["metric"], "folds": folds, "mean": float(scores.mean()),
              "std": float(scores.std(unbiased=False)), "k": k}
    if os.environ.get("RANK", "0") == "0":
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "cv.json"), "w") as f:
            json.dump(_strict_json(result), f, indent=2, allow_nan=False)
        shown = ", ".join(f"{r['best']:.4f}" for r in folds)
        print(f"cross-validation: {result['metric']} {result['mean']:.4f} +- {result['std']:.4f} over {k} folds "
              f"({shown}); {os.path.join(out, 'cv.json')}")
    D.cleanup()
    return result


# the input options a checkpoint's run recorded, which later commands on it take unless given
INHERITED_OPTIONS = ("stats", "clip_seconds", "target_length", "downmix", "single_label")


def _check_recorded(k: str, v: Any, where: str) -> None:
    """A value a checkpoint's run recorded (a file edited by hand, or of another program) is checked
    as the option would be typed: one error naming it, not a failure deep in the front end."""
    from ..audio import check_downmix, get_stats
    from ..checkpoint import CheckpointError
    try:
        if k == "stats":
            get_stats(v)
        elif k == "downmix":
            check_downmix(v)
        elif k in ("clip_seconds", "target_length") and not (
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise ValueError(f"{k} must be a positive number")
        elif k == "single_label" and not isinstance(v, bool):
            raise ValueError("single_label must be true or false")
    except (TypeError, ValueError) as e:
        flag = "--" + k.replace("_", "-")
        raise CheckpointError(f"{where} records {k}={v!r} from its run, which is not usable ({e}); give {flag} "
                              "to choose the value") from None


def inherit_run_options(opts: Dict[str, Any], args: Any, cfg: Optional[dict] = None,
                        names: Sequence[str] = INHERITED_OPTIONS,
                        where: str = "the checkpoint") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``opts`` with the options of ``names`` that the caller did not give taken from the checkpoint:
    its run's recorded options (``args``: ours a dict, the release's an ``argparse.Namespace``, whose
    ``dataset`` names the statistics), and the model's input length from its ``cfg``. Given options
    are ``opts["explicit_options"]`` (the CLI records them), else the ones that are not None.
    Returns ``(options, the inherited ones that differ from opts)``."""
    given = _given(opts)
    from ..checkpoint import run_options
    saved = run_options(args)
    if isinstance(args, dict) and "downmix" not in saved:
        saved = dict(saved, downmix="mean")  # this package's runs before the option averaged the channels
    if "stats" not in saved and isinstance(saved.get("dataset"), str):
        from ..audio import DATASET_STATS
        if saved["dataset"] in DATASET_STATS:
            saved = dict(saved, stats=saved["dataset"])
    out, changed = dict(opts), {}
    for k in names:
        if k in given or saved.get(k) is None:
            continue
        v = tuple(saved[k]) if isinstance(saved[k], list) else saved[k]
        _check_recorded(k, v, where)
        if out.get(k) != v and not (k == "single_label" and not v and not out.get(k)):
            changed[k] = v
        out[k] = v
    if "target_length" in names and "target_length" not in given and not out.get("target_length") \
            and isinstance(cfg, dict) and cfg.get("img_size"):
        out["target_length"] = int(cfg["img_size"][0])  # the model's input length
    return out, changed


def _flag(key: str, value: Any) -> str:
    name = "--" + key.replace("_", "-")
    if value is True:
        return name
    if value is False:
        return f"no {name}"
    if isinstance(value, tuple):
        return f"{name} {','.join(f'{x:g}' for x in value)}"
    return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"


# the defaults of the inherited input options (those a checkpoint's run recorded at them need no note)
_INPUT_DEFAULTS = {"stats": "audioset", "downmix": "first", "single_label": False}


def _note_inherited(changed: Dict[str, Any], path: str) -> None:
    """One line naming the options taken from a checkpoint that differ from the defaults."""
    changed = {k: v for k, v in changed.items() if k not in _INPUT_DEFAULTS or v != _INPUT_DEFAULTS[k]}
    if changed and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        shown = ", ".join(_flag(k, v) for k, v in changed.items())
        print(f"note: {path} was trained with {shown}; using the same (give an option to override it)",
              file=sys.stderr)


def evaluate(opts: Dict[str, Any]) -> Dict[str, Any]:
    """Evaluate a classifier checkpoint; writes metrics.json and a per-class CSV report. Input options
    not given (statistics, clip and input length, downmix, single-label) are the checkpoint's run's."""
    from ..checkpoint import read_checkpoint
    opts = _expand_paths(opts)
    sd, cfg, args = read_checkpoint(opts["checkpoint"])  # read once: the model is built from these
    # the class-label CSV of the run too, while it is where the run read it
    saved_labels = args.get("labels") if isinstance(args, dict) else None
    names = INHERITED_OPTIONS + (("labels",) if isinstance(saved_labels, str) and os.path.isfile(saved_labels) else ())
    opts, changed = inherit_run_options(opts, args, cfg, names=names, where=opts["checkpoint"])
    _note_inherited(changed, opts["checkpoint"])
    if "single_label" not in _given(opts) and not opts.get("single_label"):
        # scored as the run trained: its class folders or synthetic set were single-label (recorded as
        # multi_label), as the release's ESC-50 run (the rule classify follows)
        from ..commands import _single_label
        opts["single_label"] = _single_label(opts, args)
        data = opts.get("data")
        scored_so = opts["single_label"] and isinstance(data, str) and data.lower().endswith((".json", ".csv", ".tsv"))
    else:
        scored_so = False
    device, info = _setup(opts)
    if scored_so and info.is_main:
        print(f"note: {opts['checkpoint']} was trained single-label (cross-entropy): {opts['data']} is scored so, "
              "accuracy over a softmax", file=sys.stderr)
    dataset = build_dataset(opts, "val")
    _need_classes(dataset, opts, "evaluate")
    T = _target_length(opts, dataset)
    if "head.weight" not in sd:
        kind = "a pretraining checkpoint" if any(k.startswith("decoder_") for k in sd) else "an encoder"
        raise TrainingError(f"{opts['checkpoint']} is {kind} without a classification head: fine-tune it first "
                            f"(audiomae finetune --pretrained {opts['checkpoint']} ...), or use audiomae embed "
                            "for its embeddings")
    if sd["head.weight"].shape[0] != dataset.num_classes:
        held_out = args.get("eval_data") if isinstance(args, dict) else None
        hint = ""
        if isinstance(held_out, str) and opts.get("data") != held_out:
            hint = f" (its run's held-out set is {held_out}: give it as --data, or --config with the run's config.json)"
        elif opts.get("data", "synthetic") == "synthetic" and not _given(opts) & {"data"}:
            hint = " (with no --data the evaluation is of the embedded synthetic dataset: give the run's data)"
        raise TrainingError(f"{opts['checkpoint']} predicts {sd['head.weight'].shape[0]} classes, the data has "
                            f"{dataset.num_classes}{hint}")
    # the classes the run trained on (by their mids where both have them; older checkpoints
    # recorded the names only)
    names = args.get("class_names") if isinstance(args, dict) else None
    if isinstance(names, list):
        mids = args.get("class_mids")
        trained, here = compared_classes(names, mids if isinstance(mids, list) else None,
                                         list(dataset.class_names), _class_mids(dataset))
        if trained != here:
            raise TrainingError(f"{opts['checkpoint']}: " + _class_mismatch(trained, here))
    model = AudioMAEClassifier.from_pretrained({"model": sd, "config": cfg, "args": args},
                                               img_size=(T, 128)).to(device)
    feats = _features(opts, dataset, device)
    scores, targets = predict(model, dataset, opts, device, feats, info)
    metrics = compute_metrics(scores, targets, dataset)
    write_config(opts, info, evaluation=True)  # with the results it describes
    if info.is_main:
        write_report(metrics, os.path.join(opts["output_dir"], "report.csv"))
        with open(os.path.join(opts["output_dir"], "metrics.json"), "w") as f:
            json.dump(_strict_json({k: v for k, v in metrics.items() if k != "per_class"}), f, indent=2,
                      allow_nan=False)
        name, value = headline(metrics)
        extra = f", AUC {metrics['AUC']:.4f}, d' {metrics['d_prime']:.3f}" if "AUC" in metrics else ""
        skipped = getattr(dataset, "bad_count", 0)
        skipped = f" ({skipped} unreadable file{'s' if skipped != 1 else ''} left out)" if skipped else ""
        print(f"{name} {value:.4f}{extra} on {len(targets)} clips{skipped}{coverage_note(metrics)}; per-class report in "
              f"{os.path.join(opts['output_dir'], 'report.csv')}")
    D.cleanup()
    return metrics


# --- embeddings and the linear probe ------------------------------------------------------------
@torch.no_grad()
def embed_dataset(model: nn.Module, dataset, opts: Dict[str, Any], device, feats, per_patch: bool = False,
                  desc: str = "embedding", indices: Optional[List[int]] = None,
                  patches: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[N, D]`` (or ``[N, L, D]``) and targets of the readable clips of a dataset, in
    dataset order (an unreadable file has no row); ``indices``, when given, receives the dataset
    index of each row; ``patches``, when given (a list), receives the per-patch embeddings ``[N, L, D]``
    of the same pass (as its one element)."""
    sampler = ResumableSampler(len(dataset), shuffle=False)
    loader = _loader(dataset, opts, sampler, int(opts.get("batch_size", 32)))
    model.eval()
    out, targets, rows = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=opts.get("quiet"), dynamic_ncols=True, leave=False):
        keep = _readable(batch)
        if not keep.any():
            continue
        x = feats({k: batch[k][keep] for k in ("input", "waveform", "length") if k in batch})
        if patches is not None:
            pooled, per = model.embed_both(x)
            out.append(pooled.float().cpu())
            rows.append(per.float().cpu())
        else:
            out.append(model.embed(x, per_patch=per_patch).float().cpu())
        targets.append(batch["target"][keep].float())
        if indices is not None:
            indices.extend(int(i) for i in torch.as_tensor(batch["index"])[keep])
    if not out:
        raise TrainingError(f"no readable clip in the dataset ({len(dataset)} clips)")
    if patches is not None:
        patches.append(torch.cat(rows))
    return torch.cat(out), torch.cat(targets)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 multi_label: bool = False, epochs: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4,
                 seed: int = 0) -> Dict[str, Any]:
    """Logistic regression on frozen embeddings (standardised with the training statistics)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    head = nn.Linear(tx.shape[1], train_y.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_of = _loss_fn(multi_label)
    for _ in range(epochs):
        opt.zero_grad()
        loss_of(head(tx), train_y).backward()
        opt.step()
    with torch.no_grad():
        logits = head(vx)
        scores = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
    return multilabel_metrics(scores, val_y) if multi_label else singlelabel_metrics(scores, val_y)
