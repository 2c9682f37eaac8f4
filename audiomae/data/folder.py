"""A labelled dataset from a folder tree: one sub-folder per class.

::

    root/
      dog/   a.wav  b.flac  sub/c.ogg
      rain/  d.wav

Classes are the sub-folders of ``root``, sorted by name (hidden folders and the folders archivers
and NAS boxes add, such as ``__MACOSX`` and ``@eaDir``, skipped); a class's clips are the audio
files anywhere below its folder, sorted by path. Single-label, one-hot targets. Audio files left
out (directly in ``root``, of another format) and files two classes reach through a link are
counted in a warning.
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
# folders that archivers, NAS boxes and file systems add, which are no class (nor part of one)
SYSTEM_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "lost+found"})
# audio files of other formats, which are counted when left out (pass extensions= to read them)
OTHER_AUDIO = (".mp3", ".aif", ".aiff", ".m4a", ".opus", ".wma", ".aac")


def _kept(name: str) -> bool:
    return not name.startswith(".") and name not in SYSTEM_FOLDERS


_WARNED: set = set()


def _warn_once(msg: str, *args) -> None:
    """A warning about a folder, once per process: a run reading the folder for training and for
    evaluation (or a cross-validation's folds) says it once."""
    text = msg % args
    if text not in _WARNED:
        _WARNED.add(text)
        logger.warning("%s", text)


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
        entries = list(os.scandir(self.root))
        classes = sorted(d.name for d in entries if d.is_dir() and _kept(d.name))
        if not classes:
            raise DataError(f"{self.root}: no class sub-folders (expected one folder of audio files per class)")
        loose = sum(1 for d in entries if d.is_file() and os.path.splitext(d.name)[1].lower() in exts)
        if loose:
            _warn_once("%d audio file%s directly in %s %s in no class folder and left out", loose,
                       "s" if loose != 1 else "", self.root, "are" if loose != 1 else "is")
        self.class_names = classes
        self.paths: List[str] = []
        self._labels: List[int] = []
        class_of_file = {}  # real path -> class: a file that two classes reach (through a link) is named
        in_two: List[str] = []
        other: dict = {}
        for ci, name in enumerate(classes):
            found = []
            seen = set()  # folders walked, by real path: a link back up the tree is entered once
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, name), followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = sorted(d for d in dirnames if _kept(d))
                for fn in filenames:
                    ext = os.path.splitext(fn)[1].lower()
                    if fn.startswith("."):
                        continue
                    if ext not in exts:
                        if ext in OTHER_AUDIO:
                            other[ext] = other.get(ext, 0) + 1
                        continue
                    first = class_of_file.setdefault(os.path.join(real, fn), ci)
                    if first != ci:
                        in_two.append(f"{os.path.join(dirpath, fn)} (also in {classes[first]})")
                    found.append(os.path.join(dirpath, fn))
            if not found:
                _warn_once("class folder %s holds no audio files (%s)", os.path.join(self.root, name), ", ".join(exts))
            found.sort()
            self.paths.extend(found)
            self._labels.extend([ci] * len(found))
        if other:
            counts = ", ".join(f"{n} {e}" for e, n in sorted(other.items()))
            _warn_once("left out %s file%s under %s: only %s files are read (convert the others, or, from "
                       "Python, pass FolderDataset(extensions=...) for other formats that soundfile decodes)",
                       counts, "s" if sum(other.values()) != 1 else "", self.root, ", ".join(exts))
        if in_two:
            shown = "; ".join(in_two[:3])
            _warn_once("%d audio file%s in two class folders (through a link), with both labels: %s%s",
                       len(in_two), "s are" if len(in_two) != 1 else " is", shown, " ..." if len(in_two) > 3 else "")
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
