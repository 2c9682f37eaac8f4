"""Loaders: worker processes decode audio, the training device computes the features.

``make_loader`` wraps a ``torch.utils.data.DataLoader`` whose workers only decode and cut/pad
waveforms; :class:`FeatureExtractor` turns each batch into the model input on the training device.
The loader also does the main-process bookkeeping of unreadable files (see
:mod:`audiomae.data.dataset`) and reseeds its shuffling every epoch.

Weighted sampling follows the release's recipe for the unbalanced AudioSet: a class seen ``c``
times in the dataset weighs ``1000 / (c + 0.01)``, and a clip weighs the sum of its classes'
weights (:func:`label_weights`).
"""
from __future__ import annotations

import math
import operator
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from ..audio import SAMPLE_RATE, check_waveform_batch, pad_beyond, waveform_to_input
from .dataset import BadFileTracker, TooManyBadFilesError, base_dataset, collate_items


# ----------------------------------------------------------------------------------------------
# weights and samplers
# ----------------------------------------------------------------------------------------------
def _labels_and_classes(dataset_or_labels: Any, num_classes: Optional[int]):
    if hasattr(dataset_or_labels, "labels_per_clip"):
        labels = dataset_or_labels.labels_per_clip()
        if num_classes is None:
            num_classes = dataset_or_labels.num_classes
    else:
        labels = [list(l) for l in dataset_or_labels]
    def index_of(i: int, c: Any) -> int:
        try:  # ints, numpy integers, integer tensors of one element
            index = None if isinstance(c, bool) else operator.index(c)
        except TypeError:
            index = None
        if index is None or index < 0 or (num_classes is not None and index >= num_classes):
            within = f"an integer in [0, {num_classes})" if num_classes is not None else "a non-negative integer"
            raise ValueError(f"clip {i}: class index {c!r} is not a class ({within})")
        return index

    labels = [[index_of(i, c) for c in l] for i, l in enumerate(labels)]
    if num_classes is None:
        num_classes = 1 + max((max(l) for l in labels if len(l)), default=-1)
    return labels, int(num_classes)


def label_counts(dataset_or_labels: Any, num_classes: Optional[int] = None) -> np.ndarray:
    """How many clips carry each class: float64 [num_classes]."""
    labels, num_classes = _labels_and_classes(dataset_or_labels, num_classes)
    counts = np.zeros(num_classes, dtype=np.float64)
    for l in labels:
        for c in l:
            counts[c] += 1
    return counts


def label_weights(dataset_or_labels: Any, num_classes: Optional[int] = None) -> torch.Tensor:
    """Per-clip sampling weights, as the release derives them for AudioSet.

    ``class_weight[c] = 1000 / (count[c] + 0.01)`` over the dataset; ``clip_weight[i]`` = sum of the
    class weights of clip i's labels (0 for a clip without labels). Accepts a dataset with
    ``labels_per_clip()`` or a sequence of per-clip class-index lists. Returns float64 [N].
    """
    labels, num_classes = _labels_and_classes(dataset_or_labels, num_classes)
    class_w = 1000.0 / (label_counts(labels, num_classes) + 0.01)
    w = np.zeros(len(labels), dtype=np.float64)
    for i, l in enumerate(labels):
        if len(l):
            w[i] = class_w[np.asarray(list(l), dtype=np.int64)].sum()
    return torch.from_numpy(w)


def weighted_sampler(
    dataset_or_weights: Any, num_samples: Optional[int] = None, generator: Optional[torch.Generator] = None
) -> WeightedRandomSampler:
    """``WeightedRandomSampler`` (with replacement) over :func:`label_weights`; ``num_samples``
    draws per epoch (default: the dataset's length)."""
    weights = dataset_or_weights if isinstance(dataset_or_weights, torch.Tensor) else label_weights(dataset_or_weights)
    return WeightedRandomSampler(weights, int(num_samples or len(weights)), replacement=True, generator=generator)


def _dist_info(num_replicas: Optional[int], rank: Optional[int]):
    if num_replicas is None or rank is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("distributed sampling needs num_replicas and rank, or an initialised process group")
        num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
        rank = torch.distributed.get_rank() if rank is None else rank
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} not in [0, {num_replicas})")
    return int(num_replicas), int(rank)


class DistributedWeightedSampler(Sampler):
    """Weighted sampling with replacement, split across ranks.

    Every rank draws the same ``num_samples * num_replicas`` indices from
    ``multinomial(weights)`` with a generator seeded by ``seed + epoch``, and keeps the draws
    ``rank, rank + num_replicas, ...``: the ranks get disjoint shares of one weighted draw, so the
    union over ranks is distributed exactly as a single-process weighted epoch. ``num_samples`` is
    per rank (default ``ceil(len(weights) / num_replicas)``). Call ``set_epoch`` every epoch.

    (The release instead splits the dataset into per-rank shards and draws within each shard with
    an unseeded generator; the split here keeps every clip reachable from every rank.)
    """

    def __init__(
        self,
        weights: Union[torch.Tensor, Sequence[float]],
        num_samples: Optional[int] = None,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        seed: int = 0,
        replacement: bool = True,
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.dim() != 1 or len(self.weights) == 0:
            raise ValueError("weights must be a non-empty 1-D sequence")
        self.num_replicas, self.rank = _dist_info(num_replicas, rank)
        self.num_samples = int(num_samples or math.ceil(len(self.weights) / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas
        self.replacement = replacement
        if not replacement and self.total_size > len(self.weights):
            raise ValueError("without replacement, num_samples * num_replicas must not exceed len(weights)")
        self.seed = int(seed)
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total_size, self.replacement, generator=g)
        return iter(draws[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


# ----------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------
#: set while a training loop turns Ctrl-C and SIGTERM into "checkpoint after this step" (see
#: audiomae.train.loop.GracefulInterrupt; workers forked from it read it, others get it through
#: their worker_init_fn): a worker then ignores both signals, which a scheduler or a terminal also
#: sends it, and goes on serving batches until the loop stops (a worker ends when the main process
#: is gone). Were it to end, the step, or an epoch's evaluation whose collectives the other
#: processes wait in, would fail with a loader error instead.
WORKERS_IGNORE_STOP_SIGNALS = False


def seed_worker(worker_id: int, ignore_stop_signals: Optional[bool] = None) -> None:
    """``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed; ignore SIGINT and
    SIGTERM when ``ignore_stop_signals`` (default: ``WORKERS_IGNORE_STOP_SIGNALS`` as this process
    sees it)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    if WORKERS_IGNORE_STOP_SIGNALS if ignore_stop_signals is None else ignore_stop_signals:
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


class _WorkerInit:
    """:func:`seed_worker` as the loaders' default ``worker_init_fn``, carrying
    ``WORKERS_IGNORE_STOP_SIGNALS`` to workers that a ``spawn`` or ``forkserver`` start method makes
    (they import this module afresh, where a forked one inherits the flag): the flag is read when
    the loader starts its workers, which is when this object is pickled for them."""

    def __init__(self) -> None:
        self.quiet: Optional[bool] = None  # in the main process (and forked workers): the flag itself

    def __getstate__(self) -> Dict[str, Any]:
        return {"quiet": WORKERS_IGNORE_STOP_SIGNALS}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.quiet = state["quiet"]

    def __call__(self, worker_id: int) -> None:
        seed_worker(worker_id, self.quiet)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


class ClipLoader:
    """An iterable over collated batches (see :func:`make_loader`).

    Each ``iter()`` is one epoch: the shuffling generator is reseeded from ``(seed, epoch)`` and a
    sampler with ``set_epoch`` is told the epoch; the epoch then advances by one (``set_epoch``
    sets it explicitly, e.g. when resuming). With worker processes, every batch's ``"bad"`` list is
    added to the dataset's :class:`BadFileTracker` here, in the main process, which reports new
    bad files and raises :class:`TooManyBadFilesError` past the threshold.
    """

    def __init__(self, loader: DataLoader, tracker: BadFileTracker, account: bool, seed: int,
                 generator: Optional[torch.Generator]) -> None:
        self.loader = loader
        self.bad_tracker = tracker
        self._account = account
        self.seed = int(seed)
        self._generator = generator
        self.epoch = 0

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def batch_size(self) -> Optional[int]:
        return self.loader.batch_size

    @property
    def bad_count(self) -> int:
        return self.bad_tracker.bad_count

    @property
    def bad_files(self) -> Dict[str, str]:
        return dict(self.bad_tracker.bad_files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        if self._generator is not None:
            self._generator.manual_seed(_epoch_seed(self.seed, epoch))
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)
        it = iter(self.loader)
        try:
            for batch in it:
                if self._account:
                    self.bad_tracker.update_from_batch(batch)
                yield batch
        except TooManyBadFilesError as e:
            _shut_down(self.loader, it)
            # raised in a worker process: DataLoader wraps the message in the worker's traceback
            msg = str(e)
            if "Original Traceback" not in msg:
                raise
            raise TooManyBadFilesError(msg.rsplit("TooManyBadFilesError: ", 1)[-1].strip()) from None
        except BaseException:
            _shut_down(self.loader, it)
            raise


def _shut_down(loader: DataLoader, it: Any) -> None:
    """Stop the worker processes of a loader's iterator that an error (or the caller) left: left to
    the interpreter's exit, they would be joined after being sent SIGTERM, which workers of a run that
    stops gracefully ignore, so the process would never end."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception:  # already gone
            pass
    if getattr(loader, "_iterator", None) is it:  # persistent workers: the next epoch makes new ones
        loader._iterator = None


def make_loader(
    dataset: Any,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    sampler: Optional[Sampler] = None,
    drop_last: bool = False,
    seed: int = 0,
    distributed: bool = False,
    *,
    weighted: bool = False,
    num_samples: Optional[int] = None,
    num_replicas: Optional[int] = None,
    rank: Optional[int] = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: Optional[int] = None,
    collate_fn: Callable[[List[Dict[str, Any]]], Any] = collate_items,
    worker_init_fn: Optional[Callable[[int], None]] = seed_worker,
    multiprocessing_context: Any = None,
) -> ClipLoader:
    """A :class:`ClipLoader` over ``dataset`` yielding collated batches
    (``{"waveform" | "input", "target", "index", "bad"}``, see :func:`collate_items`).

    Sampling, in order of precedence: ``sampler`` if given; ``weighted`` -> :func:`label_weights`
    with a ``WeightedRandomSampler`` (or a :class:`DistributedWeightedSampler` when
    ``distributed``), ``num_samples`` draws per epoch (per rank when distributed); ``distributed``
    -> ``DistributedSampler(shuffle=shuffle, seed=seed, drop_last=drop_last)``; else a seeded
    random or a sequential order. ``num_replicas``/``rank`` default to the process group's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator: Optional[torch.Generator] = torch.Generator()
    generator.manual_seed(_epoch_seed(seed, 0))
    if sampler is None:
        if weighted:
            weights = label_weights(dataset)
            if distributed:
                sampler = DistributedWeightedSampler(weights, num_samples, num_replicas, rank, seed=seed)
            else:
                sampler = weighted_sampler(weights, num_samples, generator=generator)
        elif distributed:
            nr, rk = _dist_info(num_replicas, rank)
            sampler = DistributedSampler(dataset, num_replicas=nr, rank=rk, shuffle=shuffle, seed=seed, drop_last=drop_last)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=generator)
        else:
            sampler = SequentialSampler(dataset)
    kwargs: Dict[str, Any] = {}
    if worker_init_fn is seed_worker:
        worker_init_fn = _WorkerInit()
    if num_workers > 0:
        kwargs.update(persistent_workers=persistent_workers, worker_init_fn=worker_init_fn,
                      multiprocessing_context=multiprocessing_context)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        **kwargs,
    )
    base = base_dataset(dataset)
    tracker = getattr(base, "bad_tracker", None)
    if tracker is None:
        tracker = BadFileTracker()
    try:  # judged after min_attempts clips or all of a smaller dataset, or min_attempts weighted draws
        weighted = getattr(sampler, "weights", None) is not None  # (an unweighted shuffle draws no repeats)
        tracker.expect(len(base), replacement=weighted and bool(getattr(sampler, "replacement", False)))
    except TypeError:  # a dataset or sampler without a length
        pass
    # Without workers the dataset accounts for its reads itself, in this process.
    return ClipLoader(loader, tracker, account=num_workers > 0, seed=seed, generator=generator)


# ----------------------------------------------------------------------------------------------
# features on the training device
# ----------------------------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """Waveform batch ``[B, N]`` -> model input ``[B, 1, T, num_mel_bins]`` on ``device``.

    Mean removal, Kaldi-compatible fbank, pad/cut to ``target_length`` frames and normalisation
    with ``stats`` (see :func:`audiomae.audio.waveform_to_input`), computed where the waveforms
    are moved to (``device``; ``None`` keeps the input's device). Also accepts a batch dict from
    :func:`make_loader`: its ``"input"`` (precomputed by a ``features=True`` dataset) is moved to the
    device as is, otherwise its ``"waveform"`` is transformed.
    """

    def __init__(
        self,
        target_length: Optional[int] = 1024,
        stats: Any = "audioset",
        device: Union[str, torch.device, None] = None,
        num_mel_bins: int = 128,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        super().__init__()
        self.target_length = target_length
        self.stats = stats
        self.device = torch.device(device) if device is not None else None
        self.num_mel_bins = int(num_mel_bins)
        self.sample_rate = int(sample_rate)

    def forward(self, batch: Union[torch.Tensor, Dict[str, Any]], lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``lengths`` [B]: each clip's real samples (a batch dict's ``"length"`` when not given);
        the rows of frames past them get the padding value (:func:`audiomae.audio.pad_beyond`)."""
        if isinstance(batch, dict):
            if "input" in batch:
                x = batch["input"]
                return x.to(self.device, non_blocking=True) if self.device is not None else x
            if lengths is None:
                lengths = batch.get("length")
            if "waveform" not in batch:
                raise ValueError(f"a batch for the feature extractor holds 'waveform' (and 'length') or 'input'; this "
                                 f"one has {', '.join(map(repr, batch)) or 'no keys'}")
            batch = batch["waveform"]
        w = batch.to(self.device, non_blocking=True) if self.device is not None else batch
        if self.sample_rate == SAMPLE_RATE and w.is_floating_point() and w.ndim == 2:
            # the fused front end (a CUDA or Triton kernel on GPUs, the reference on CPUs)
            from ..ops_step import fbank_features
            # waveform_to_input's checks, where they cost no device synchronisation (on a GPU a
            # non-finite clip shows as a non-finite loss, whose step is skipped)
            check_waveform_batch(w, lengths, on_cpu_only=True)
            x = fbank_features(w, self.target_length, self.stats, torch.float32, "exact", self.num_mel_bins)
            return pad_beyond(x, lengths, self.stats)
        return waveform_to_input(
            w,
            sample_rate=self.sample_rate,
            target_length=self.target_length,
            stats=self.stats,
            num_mel_bins=self.num_mel_bins,
            lengths=lengths,
        )

    def extra_repr(self) -> str:
        return (f"target_length={self.target_length}, stats={self.stats!r}, device={self.device}, "
                f"num_mel_bins={self.num_mel_bins}")
