"""A labelled dataset from a folder tree: one sub-folder per class.

::

    root/
      dog/   a.wav  b.flac  sub/c.ogg
      rain/  d.wav

Classes are the sub-folders of ``root``, sorted by name (hidden folders skipped); a class's clips
are the audio files anywhere below its folder, sorted by path. Single-label, one-hot targets.
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Sequence, Tuple

from ..audio import load_audio
from .dataset import ClipDataset, DataError
from .manifest import PathLike

logger = logging.getLogger("audiomae.data")

AUDIO_EXTENSIONS: Tuple[str, ...] = (".wav", ".flac", ".ogg")


class FolderDataset(ClipDataset):
    """``FolderDataset(root, clip_seconds=None, extensions=(".wav", ".flac", ".ogg"), ...)``

    Raises :class:`~audiomae.data.DataError` when ``root`` is missing, has no class sub-folders, or
    holds no audio files. A class folder without audio files keeps its class index (so indices do
    not depend on which files are present) and is reported with a warning. Other keyword
    arguments: see :class:`audiomae.data.ClipDataset`.
    """

    multi_label = False

    def __init__(
        self,
        root: PathLike,
        clip_seconds: Optional[float] = None,
        *,
        extensions: Sequence[str] = AUDIO_EXTENSIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(clip_seconds, **kwargs)
        self.root = os.fspath(root)
        if isinstance(extensions, str):
            extensions = (extensions,)  # one extension, not its characters
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: not a folder")
        classes = sorted(
            d.name for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith(".")
        )
        if not classes:
            raise DataError(f"{self.root}: no class sub-folders (expected one folder of audio files per class)")
        self.class_names = classes
        self.paths: List[str] = []
        self._labels: List[int] = []
        for ci, name in enumerate(classes):
            found = []
            seen = set()  # folders walked, by real path: a link back up the tree is entered once
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, name), followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in filenames:
                    if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in exts:
                        found.append(os.path.join(dirpath, fn))
            if not found:
                logger.warning("class folder %s holds no audio files (%s)", os.path.join(self.root, name), ", ".join(exts))
            found.sort()
            self.paths.extend(found)
            self._labels.extend([ci] * len(found))
        if not self.paths:
            raise DataError(
                f"{self.root}: no audio files ({', '.join(exts)}) in any of the {len(classes)} class folders"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def labels_of(self, index: int) -> List[int]:
        return [self._labels[index]]

    def _path(self, index: int) -> str:
        return self.paths[index]

    def _read(self, index: int):
        return load_audio(self.paths[index], sample_rate=self.sample_rate, mono=True, downmix=self.downmix)
