"""Shared base of the clip datasets: the item format and the handling of unreadable files.

Every dataset in :mod:`audiomae.data` returns items of one format::

    {"waveform": float32 [clip_samples],   # 16 kHz mono, zero-padded or cut to the clip length
     "length":   int,                      # its real samples (clip_samples unless it was padded)
     "target":   float32 [num_classes],    # multi-hot (multi-label) or one-hot (single-label)
     "index":    int,                      # the index the item was actually read from
     "bad":      [(path, reason), ...]}    # files that failed and were replaced by another clip

With ``features=True`` the item carries ``"input"`` (the normalised model input ``[1, T, 128]``,
computed in the loading process with :func:`audiomae.audio.waveform_to_input`) instead of
``"waveform"``.

Padding. A clip shorter than the clip length is zero-padded as a waveform (so clips batch), and
its model input is what the release computes: the fbank of its real samples, padded after the
log (rows of the padding value, +0.467 after AudioSet normalisation, not the log-floor of
silence). The features of a batch follow ``"length"`` for that
(:class:`audiomae.data.FeatureExtractor`, :func:`audiomae.audio.pad_beyond`). A longer clip is cut
to the clip length, by default what the model input holds (10.255 s fill 1024 frames), as the
release cuts the fbank of the whole file at the input length.

Bad data. A file that cannot be read (corrupt, empty, missing, an unreadable sample rate, or
non-finite samples) does not end an epoch: the dataset substitutes the next readable clip
(index + 1, + 2, ... modulo the length, so the choice is deterministic), and the item lists the
failures in ``"bad"``. Evaluation and embedding drop such stand-ins (``"substituted"`` in a
batch, see :func:`collate_items`): there every readable clip counts once and an unreadable one
not at all. Accounting happens in exactly one process: in the main process when the
dataset is indexed there (directly, or by a loader without worker processes), and otherwise by the
loader (:func:`audiomae.data.make_loader`), which feeds the ``"bad"`` lists of each batch into the
dataset's :class:`BadFileTracker` in the main process. The tracker reports each bad path once
(logger ``audiomae.data``), counts them (``dataset.bad_count``, ``dataset.bad_files``), and raises
:class:`TooManyBadFilesError` once the bad files exceed ``max_bad_fraction`` of the clips read,
judged after ``min_attempts`` clips or all of a smaller dataset (each clip counts once).
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..audio import SAMPLE_RATE, AudioLoadError, check_downmix, frames_span, get_stats, num_frames, waveform_to_input

logger = logging.getLogger("audiomae.data")

BadEntry = Tuple[str, str]
_REPORTED: set = set()  # bad paths already reported by any tracker of this process

#: Exceptions that mark a file as unreadable. AudioLoadError is the audio module's own; soundfile
#: raises RuntimeError subclasses (LibsndfileError), the OS raises OSError, decoders ValueError.
READ_ERRORS = (AudioLoadError, RuntimeError, OSError, ValueError, EOFError)


class DataError(ValueError):
    """A manifest, label file or data folder is malformed; the message names the file and the spot."""


class TooManyBadFilesError(RuntimeError):
    """More than the allowed fraction of the clips read so far could not be decoded."""


class BadFileTracker:
    """Counts reads and bad files, reports each bad path once, and applies the threshold.

    A clip counts once, however often it is read again (as a substitute, in a later epoch or in
    another worker process): ``attempts`` are the distinct clips read well plus the distinct bad
    files, and ``bad_attempts`` the distinct bad files, so the fraction is that of the data, not of
    how long a run has been reading it. (Good reads passed without their indices count each time.)
    ``max_bad_fraction``: the largest tolerated fraction ``bad_attempts / attempts``.
    ``min_attempts``: no judgement before this many clips, so that a single early failure of an
    otherwise healthy dataset does not trip a 1 % threshold; a smaller dataset is judged once all
    its clips have been read (by this process: a fixed share of a small dataset is not judged on its
    own), and under a sampler that draws with replacement (which may never reach every clip) after
    ``min_attempts`` reads. Set ``max_bad_fraction=1.0`` to never raise.
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_attempts: int = 100) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_attempts < 1:
            raise ValueError(f"min_attempts must be >= 1, got {min_attempts}")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_attempts = int(min_attempts)
        self.attempts = 0
        self.bad_attempts = 0
        self.bad_files: Dict[str, str] = {}  # path -> reason, in the order first seen
        self._seen: Optional[bytearray] = None  # one byte per clip: read well already
        self._replacement = False  # some sampler draws with replacement
        self.reads = 0  # every read, repeats included

    def expect(self, size: int, replacement: bool = False) -> None:
        """The dataset has ``size`` clips, which a sampler reads (drawing with ``replacement``): see
        :attr:`judged_after`."""
        size = int(size)
        if self._seen is None or len(self._seen) != size:
            self._seen = bytearray(size)
            self.attempts = self.bad_attempts
        self._replacement |= bool(replacement)

    @property
    def judged_after(self) -> int:
        """The number of distinct clips read before the threshold applies: ``min_attempts``, or all
        clips of a smaller dataset (a process reading a share of one is judged once shuffling has
        brought it every clip, which a fixed share never does)."""
        if self._seen is not None:
            return max(1, min(self.min_attempts, len(self._seen)))
        return self.min_attempts

    def _judged(self) -> bool:
        return self.attempts >= self.judged_after or (self._replacement and self.reads >= self.min_attempts)

    @property
    def bad_count(self) -> int:
        """Number of distinct bad files seen."""
        return len(self.bad_files)

    @property
    def bad_fraction(self) -> float:
        return self.bad_attempts / self.attempts if self.attempts else 0.0

    def carry(self, size: int, good: Iterable[int]) -> None:
        """Count the clips ``good`` of a dataset of ``size``, which an earlier run read well (a resumed
        embedding), as read here, then apply the threshold."""
        self.expect(size)
        for i in good:
            if not self._seen[i]:
                self._seen[i] = 1
                self.attempts += 1
        self.check()

    def update(self, bad: Iterable[Sequence[str]], good: int, indices: Optional[Iterable[int]] = None) -> None:
        """Record ``good`` successful reads (of the clips ``indices``, when given: those not read
        before count) and the failed reads ``bad`` ((path, reason) pairs), report new bad paths,
        then apply the threshold."""
        bad = list(bad)
        self.reads += int(good) + len(bad)
        if indices is not None and self._seen is not None:
            good = 0
            for i in indices:
                if not self._seen[i]:
                    self._seen[i] = 1
                    good += 1
        n_bad = 0
        for path, reason in bad:
            path = str(path)
            if path in self.bad_files:
                continue  # counted when first seen
            n_bad += 1
            self.bad_files[path] = str(reason)
            if path not in _REPORTED:  # once per process, also when two datasets share a file
                _REPORTED.add(path)
                logger.warning("skipping unreadable audio file %s: %s", path, reason)
        self.attempts += int(good) + n_bad
        self.bad_attempts += n_bad
        self.check()

    def update_from_batch(self, batch: Dict[str, Any]) -> None:
        """Account for a collated batch (see :func:`audiomae.data.collate_items`)."""
        bad = batch.get("bad", [])
        index = batch["index"]
        self.update(bad, good=len(index), indices=index.tolist() if torch.is_tensor(index) else list(index))

    def check(self) -> None:
        if self._judged() and self.bad_fraction > self.max_bad_fraction:
            raise TooManyBadFilesError(self.summary())

    def summary(self, max_paths: int = 10) -> str:
        lines = [
            f"{self.bad_count} audio file{'s' if self.bad_count != 1 else ''} could not be decoded, "
            f"{self.bad_fraction:.2%} of the {self.attempts} clips read, more than the {self.max_bad_fraction:.2%} allowed (--max-bad-fraction, "
            f"max_bad_fraction={self.max_bad_fraction:g}); first bad files:"
        ]
        for path, reason in list(self.bad_files.items())[:max_paths]:
            lines.append(f"  {path}: {reason}")
        if self.bad_count > max_paths:
            lines.append(f"  ... and {self.bad_count - max_paths} more")
        return "\n".join(lines)

    def reset(self) -> None:
        self.attempts = 0
        self.bad_attempts = 0
        self.bad_files.clear()
        self.reads = 0
        if self._seen is not None:
            self._seen = bytearray(len(self._seen))


def frames_for(num_samples: int) -> int:
    """Number of fbank frames of a clip (25 ms window, 10 ms shift, snip edges)."""
    return num_frames(num_samples)


#: the model input length of the release's AudioSet recipes, in frames
RELEASE_TARGET_LENGTH = 1024


def default_target_length(clip_samples: int) -> int:
    """Frames the model input is padded to: the next power of two of the clip's frame count.

    This gives the lengths the released recipes use: 10 s -> 998 frames -> 1024 (AudioSet),
    5 s -> 512 (ESC-50), 1 s -> 128 (Speech Commands), 2.56 s -> 256. Pass ``target_length``
    explicitly for anything else.
    """
    n = max(frames_for(clip_samples), 16)
    return 1 << (n - 1).bit_length()


def fix_length(waveform: torch.Tensor, length: int) -> torch.Tensor:
    """Cut (keeping the start) or zero-pad a 1-D waveform to ``length`` samples."""
    n = waveform.shape[-1]
    if n == length:
        return waveform
    if n > length:
        return waveform[..., :length]
    return torch.nn.functional.pad(waveform, (0, length - n))


class ClipDataset(Dataset):
    """Base class: fixed-length 16 kHz clips with targets, bad-file substitution and accounting.

    Subclasses set ``class_names`` and ``multi_label`` and implement ``__len__``, ``_read(index)``
    (return a 1-D waveform at ``sample_rate``; raise on an unreadable file), ``_path(index)`` (for
    messages) and ``labels_of(index)`` (class indices of a clip).

    Arguments shared by all datasets:
      clip_seconds: every waveform is cut or zero-padded to ``round(clip_seconds * sample_rate)``;
        None: to what the model input holds (``target_length`` frames, 1024 by default: 10.255 s), so
        that a longer clip gives the release's input, which cuts the fbank at ``target_length``.
      sample_rate: the rate of the items' waveforms (files are resampled to it; default 16000). The
        model input is the 16 kHz fbank, so features of items at another rate are resampled to
        16 kHz, and a lower rate loses the bands above its Nyquist frequency.
      features: return ``"input"`` ([1, T, num_mel_bins], normalised) instead of ``"waveform"``.
      target_length, stats, num_mel_bins: passed to ``waveform_to_input`` in features mode;
        ``target_length`` defaults to :func:`default_target_length`.
      transform: a callable applied to the decoded waveform (its real length, before padding or
        cutting), e.g. :func:`audiomae.data.roll_and_magnitude`.
      max_bad_fraction, min_attempts: the bad-file threshold (see :class:`BadFileTracker`).
      max_substitutions: how many following clips to try before giving up on an item.
      downmix: how a file's channels become one (``"first"``, the release's, or ``"mean"``; see
        :func:`audiomae.audio.load_audio`).
    """

    class_names: List[str] = []
    multi_label: bool = False

    def __init__(
        self,
        clip_seconds: Optional[float],
        *,
        sample_rate: int = SAMPLE_RATE,
        features: bool = False,
        target_length: Optional[int] = None,
        stats: Any = "audioset",
        num_mel_bins: int = 128,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        max_bad_fraction: float = 0.01,
        min_attempts: int = 100,
        max_substitutions: int = 100,
        downmix: str = "first",
    ) -> None:
        if target_length is not None and (isinstance(target_length, bool) or
                                          not isinstance(target_length, numbers.Integral) or target_length < 1):
            raise ValueError(f"target_length must be a positive number of frames (or None for the default), got "
                             f"{target_length!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not sample_rate > 0 \
                or sample_rate != int(sample_rate):
            raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
        if clip_seconds is not None and (isinstance(clip_seconds, bool) or not isinstance(clip_seconds, numbers.Real)
                                         or not math.isfinite(clip_seconds)):
            raise ValueError(f"clip_seconds must be a positive number of seconds (or None for the model input's span), "
                             f"got {clip_seconds!r}")
        self.sample_rate = int(sample_rate)
        self.features = bool(features)
        if clip_seconds is None:
            # as the release: a clip gives up to the frames of the model input (1024 by default: 10.255 s)
            self.target_length = int(target_length) if target_length else RELEASE_TARGET_LENGTH
            clip_seconds = frames_span(self.target_length) / SAMPLE_RATE
        elif not clip_seconds > 0:
            raise ValueError(f"clip_seconds must be positive, got {clip_seconds}")
        else:
            # frames are 16 kHz fbank frames whatever the rate of the items (the model input is resampled)
            self.target_length = int(target_length) if target_length else \
                default_target_length(int(round(clip_seconds * SAMPLE_RATE)))
        self.clip_seconds = float(clip_seconds)
        self.clip_samples = int(round(clip_seconds * sample_rate))
        if num_frames(self.clip_samples, self.sample_rate) == 0:
            raise ValueError(f"clip_seconds={clip_seconds:g} is shorter than one 25 ms analysis frame")
        get_stats(stats)  # a name, a pair or NormStats: a wrong one is named now, not at the first item
        self.stats = stats
        self.num_mel_bins = int(num_mel_bins)
        self.transform = transform
        self.max_substitutions = int(max_substitutions)
        self.downmix = check_downmix(downmix)
        self.bad_tracker = BadFileTracker(max_bad_fraction, min_attempts)
        self._known_bad: Dict[int, str] = {}  # per process: index -> reason, never re-read

    # ---- subclass interface -------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, index: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _path(self, index: int) -> str:
        return f"<clip {index}>"

    def labels_of(self, index: int) -> List[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- public API ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels_per_clip(self) -> List[List[int]]:
        """Class indices of every clip (used for weighted sampling, see :func:`label_weights`)."""
        return [self.labels_of(i) for i in range(len(self))]

    def target(self, index: int) -> torch.Tensor:
        t = torch.zeros(self.num_classes, dtype=torch.float32)
        labels = self.labels_of(index)
        if labels:
            t[list(labels)] = 1.0
        return t

    @property
    def bad_count(self) -> int:
        return self.bad_tracker.bad_count

    @property
    def bad_files(self) -> Dict[str, str]:
        return dict(self.bad_tracker.bad_files)

    @property
    def max_bad_fraction(self) -> float:
        return self.bad_tracker.max_bad_fraction

    @max_bad_fraction.setter
    def max_bad_fraction(self, value: float) -> None:
        self.bad_tracker.max_bad_fraction = float(value)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} clips")
        index %= n
        bad: List[BadEntry] = []
        waveform = None
        tries = min(n, self.max_substitutions + 1)
        used = index
        for k in range(tries):
            used = (index + k) % n
            reason = self._known_bad.get(used)
            if reason is None:
                try:
                    waveform = self._checked_read(used)
                except READ_ERRORS as e:
                    reason = _reason(e)
                    self._known_bad[used] = reason
            if reason is None:
                break
            bad.append((self._path(used), reason))
        in_main = get_worker_info() is None
        if in_main and self.bad_tracker._seen is None:
            self.bad_tracker.expect(n)
        if waveform is None:
            if in_main:
                self.bad_tracker.update(bad, good=0)  # may raise with the full summary
            shown = "\n".join(f"  {p}: {r}" for p, r in bad[:10])
            raise TooManyBadFilesError(
                f"no readable clip among the {tries} clips from index {index} on:\n{shown}"
            )
        if in_main:
            self.bad_tracker.update(bad, good=1, indices=(used,))
        item: Dict[str, Any] = {"target": self.target(used), "index": used, "bad": bad}
        if self.transform is not None:
            waveform = self.transform(waveform)
            if not isinstance(waveform, torch.Tensor) or waveform.dim() != 1 or not waveform.is_floating_point():
                got = f"a tensor of shape {tuple(waveform.shape)} ({waveform.dtype})" \
                    if isinstance(waveform, torch.Tensor) else f"a {type(waveform).__name__}"
                raise TypeError(f"the dataset's transform must return a 1-D float tensor (the waveform), got {got}")
            if num_frames(waveform.shape[-1], self.sample_rate) == 0:
                raise ValueError(f"the dataset's transform returned {waveform.shape[-1]} samples for clip {used}, fewer "
                                 "than one 25 ms analysis frame")
        item["length"] = min(int(waveform.shape[-1]), self.clip_samples)
        waveform = fix_length(waveform, self.clip_samples)
        if self.features:
            item["input"] = waveform_to_input(
                waveform[None],
                sample_rate=self.sample_rate,
                target_length=self.target_length,
                stats=self.stats,
                num_mel_bins=self.num_mel_bins,
                lengths=[item["length"]],
            )[0]
        else:
            item["waveform"] = waveform
        return item

    def _checked_read(self, index: int) -> torch.Tensor:
        w = self._read(index)
        # checked with numpy: a single-threaded pass, where torch's intra-op threads can stall
        # on a busy machine when a loader runs without worker processes
        a = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2 and 1 in a.shape:
            a = a.reshape(-1)
        if a.ndim != 1:
            raise ValueError(f"expected a mono waveform, got shape {a.shape}")
        if a.size == 0:
            raise ValueError("no samples")
        if num_frames(a.size, self.sample_rate) == 0:  # its input would be all padding
            raise ValueError(f"{a.size} samples ({a.size * 1000 // self.sample_rate} ms at {self.sample_rate} Hz) is "
                             "shorter than one 25 ms analysis frame")
        if not np.isfinite(a).all():
            raise ValueError("non-finite samples")
        return torch.from_numpy(a)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} clips, {self.num_classes} classes, "
            f"{self.clip_seconds:g} s, multi_label={self.multi_label}, features={self.features})"
        )


def _reason(e: BaseException) -> str:
    """Why a read failed, without the path (which the reports show beside it)."""
    cause = getattr(e, "cause", None) if isinstance(e, AudioLoadError) else None
    if isinstance(cause, str) and cause.strip():
        return cause.strip()
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def collate_items(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack a list of items into a batch; the ``"bad"`` lists are concatenated.

    Returns ``{"waveform": [B, N]`` or ``"input": [B, 1, T, F], "length": int64 [B], "target": [B, C],
    "index": int64 [B], "substituted": bool [B], "bad": [(path, reason), ...]}``, where
    ``substituted`` marks the items that stand in for an unreadable clip (their ``"bad"`` list is
    not empty): training can use them, evaluation and embedding drop them, since the clip they
    carry is also read at its own index.
    """
    batch: Dict[str, Any] = {}
    for key in ("waveform", "input", "target"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    batch["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    if "length" in items[0]:
        batch["length"] = torch.tensor([int(it["length"]) for it in items], dtype=torch.long)
    batch["substituted"] = torch.tensor([bool(it.get("bad")) for it in items], dtype=torch.bool)
    batch["bad"] = [tuple(b) for it in items for b in it.get("bad", ())]
    for key in items[0]:
        if key not in batch:
            batch[key] = torch.utils.data.default_collate([it[key] for it in items])
    return batch


def base_dataset(dataset: Any) -> Any:
    """Follow ``.dataset`` links (``Subset`` and similar wrappers) to the underlying dataset."""
    seen = 0
    while not hasattr(dataset, "bad_tracker") and hasattr(dataset, "dataset") and seen < 16:
        dataset = dataset.dataset
        seen += 1
    return dataset
