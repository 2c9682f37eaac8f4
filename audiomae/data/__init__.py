"""Datasets, loaders and augmentations for Audio-MAE.

* :class:`SyntheticAudioDataset` - 10 procedurally generated sound classes, no download.
* :class:`ManifestDataset` - AudioSet/AST JSON manifest + class-labels CSV (multi-label).
* :class:`FolderDataset` - one sub-folder per class.
* :func:`make_loader`, :class:`FeatureExtractor`, :func:`label_weights`,
  :class:`DistributedWeightedSampler` - loading, features on the training device, weighted sampling.
* :func:`mixup`, :func:`waveform_mixup`, :func:`spec_augment`, :func:`roll_and_magnitude` - the recipes' augmentations.

All datasets return ``{"waveform" | "input", "target", "index", "bad"}`` items and share the
handling of unreadable files described in :mod:`audiomae.data.dataset`.
"""
from .augment import mixup, roll_and_magnitude, spec_augment, waveform_mixup
from .dataset import (
    BadFileTracker,
    ClipDataset,
    DataError,
    TooManyBadFilesError,
    collate_items,
    default_target_length,
    fix_length,
)
from .folder import AUDIO_EXTENSIONS, FolderDataset
from .loader import (
    ClipLoader,
    DistributedWeightedSampler,
    FeatureExtractor,
    label_counts,
    label_weights,
    make_loader,
    seed_worker,
    weighted_sampler,
)
from .manifest import LabelSet, ManifestDataset, read_label_csv, read_manifest, write_manifest
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .synthetic import SyntheticAudioDataset, generate_clip

__all__ = [
    "AUDIO_EXTENSIONS",
    "BadFileTracker",
    "ClipDataset",
    "ClipLoader",
    "DataError",
    "DistributedWeightedSampler",
    "FeatureExtractor",
    "FolderDataset",
    "LabelSet",
    "ManifestDataset",
    "SYNTHETIC_CLASS_NAMES",
    "SyntheticAudioDataset",
    "TooManyBadFilesError",
    "collate_items",
    "default_target_length",
    "fix_length",
    "generate_clip",
    "label_counts",
    "label_weights",
    "make_loader",
    "mixup",
    "waveform_mixup",
    "read_label_csv",
    "read_manifest",
    "roll_and_magnitude",
    "seed_worker",
    "spec_augment",
    "weighted_sampler",
    "write_manifest",
]
