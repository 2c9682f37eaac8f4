"""Where ``audiomae embed`` puts its rows.

* :class:`MemoryRows`: one ``.pt`` or ``.npz`` file, written when every clip is embedded, with the
  rows of the clips that were embedded, in order (a dataset's unreadable clips have none).
* :class:`FolderRows`: a folder of ``.npy`` files written as the clips are embedded, so that
  nothing needs to fit in memory and an interrupted or failed run loses at most the last
  ``FLUSH_SECONDS`` of work: ``audiomae embed ... --resume`` continues it. The folder holds one row
  per clip, in order::

      embeddings.npy        float32 [N, D]     pooled embeddings
      patch_embeddings.npy  float32 [N, L, D]  per patch (with --per-patch)
      targets.npy           float32 [N, C]     a dataset's targets
      readable.npy          bool [N]           False: the clip could not be read, its rows are NaN
      paths.json            the clip of each row
      info.json             the checkpoint, input options, shapes and class names
      progress.json         {"done": rows final, "rows": N, "complete": bool}

  Rows at and past ``done`` are not written yet. Read the arrays with
  ``numpy.load(path, mmap_mode="r")`` to keep them on disk.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

FORMAT = "audiomae-embeddings"
VERSION = 1
FILE_FORMATS = (".pt", ".npz")
FLUSH_SECONDS = 30.0
ARRAYS = ("embeddings", "patch_embeddings", "targets", "readable")
FOLDER_FILES = tuple(f"{a}.npy" for a in ARRAYS) + ("paths.json", "info.json", "progress.json")


class EmbeddingOutputError(Exception):
    """The output of ``embed`` cannot be used as asked; the message names it and what to do."""


def is_folder_output(path: str) -> bool:
    """``--out`` names a folder: it ends in a path separator, is a folder, or has no extension."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return True
    return "." not in os.path.basename(path)


def check_output_name(path: str) -> Optional[str]:
    """Why ``path`` cannot be an embeddings output, or None."""
    if not path:
        return "give a .pt or .npz file, or a folder"
    if os.path.isfile(path) and not path.lower().endswith(FILE_FORMATS):
        return ("is a file, and a name without a .pt or .npz extension is taken as a folder of embeddings: give "
                "a .pt or .npz file name, or a folder")
    if is_folder_output(path) or path.lower().endswith(FILE_FORMATS):
        return None
    return ("the embeddings file must end in .pt (torch) or .npz (numpy); a folder (a name without an "
            "extension, or ending in /) gets .npy files written as the clips are embedded")


def gib(n: float) -> str:
    """A size in bytes, in the binary unit that shows it best (``640.0 KiB``, ``29.3 GiB``)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def available_memory() -> Optional[int]:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _shapes(rows: int, dim: int, patches: Optional[int], classes: Optional[int]) -> Dict[str, tuple]:
    shapes = {"embeddings": (rows, dim)}
    if patches:
        shapes["patch_embeddings"] = (rows, patches, dim)
    if classes is not None:
        shapes["targets"] = (rows, classes)
    return shapes


def _nbytes(shapes: Dict[str, tuple]) -> int:
    return sum(4 * int(np.prod(s)) for s in shapes.values())


class MemoryRows:
    """The rows of one ``.pt`` / ``.npz`` file, allocated once for ``rows`` clips (no second copy when
    they are written out) and filled in order; a dataset's unreadable clips are left out."""

    def __init__(self, path: str, rows: int, dim: int, patches: Optional[int] = None,
                 classes: Optional[int] = None):
        shapes = _shapes(rows, dim, patches, classes)
        need, free = _nbytes(shapes), available_memory()
        if free is not None and need > free:
            stem = os.path.splitext(path)[0] or "embeddings"
            what = "embeddings and per-patch embeddings" if patches else "embeddings"
            raise EmbeddingOutputError(
                f"--out {path}: the {what} of {rows} clips take {gib(need)}, more than the {gib(free)} of memory "
                f"available here; give a folder (--out {stem}/) to write them to disk as they are made")
        self.path = path
        self.arrays = {k: torch.empty(s, dtype=torch.float32) for k, s in shapes.items()}
        self.indices: List[int] = []
        self.pos = 0

    def write(self, positions: Sequence[int], keep: torch.Tensor, pooled: torch.Tensor,
              per: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None) -> None:
        """The rows of one batch: ``positions`` [B] the clips' places, ``keep`` bool [B] the readable
        ones, ``pooled`` / ``per`` / ``targets`` the readable ones' rows."""
        n = int(pooled.shape[0])
        for key, rows in (("embeddings", pooled), ("patch_embeddings", per), ("targets", targets)):
            if key in self.arrays and rows is not None:
                self.arrays[key][self.pos: self.pos + n] = rows
        self.indices.extend(int(p) for p, k in zip(positions, keep.tolist()) if k)
        self.pos += n

    def result(self) -> Dict[str, torch.Tensor]:
        """The filled rows: views, no copy (where clips were left out, a .pt file also holds the unused
        rows' bytes, which loading does not show)."""
        return {k: a[: self.pos] for k, a in self.arrays.items()}


@contextlib.contextmanager
def _signals_held(resend: bool = True):
    """Ctrl-C and SIGTERM wait while the rows are made final (a second one would cut the save short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught[:1] if resend else ():  # what came meanwhile, now
            signal.raise_signal(signum)


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk: nothing half-written left, and the file named
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror or str(e), path) from None


def read_progress(folder: str) -> Optional[Dict[str, Any]]:
    """The folder's ``progress.json``, or None when it has none (or one that is not readable)."""
    try:
        with open(os.path.join(folder, "progress.json")) as f:
            p = json.load(f)
        return p if isinstance(p, dict) and isinstance(p.get("done"), int) else None
    except (OSError, ValueError):
        return None


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _differences(saved: Dict[str, Any], now: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


def check_folder(folder: str, resume: bool, overwrite: bool) -> Optional[Dict[str, Any]]:
    """The progress of the embeddings ``folder`` holds (None: none), or EmbeddingOutputError where
    ``resume`` / ``overwrite`` do not fit it: a folder of embeddings needs one of them, ``resume``
    needs such a folder."""
    existing = read_progress(folder) if os.path.isdir(folder) else None
    if existing is None and resume:
        raise EmbeddingOutputError(f"--resume: {folder} holds no embeddings to continue; leave out --resume to "
                                   "start")
    if existing is not None and not resume and not overwrite:
        state = "complete" if existing.get("complete") else \
            f"{existing['done']} of {existing.get('rows', '?')} rows done"
        raise EmbeddingOutputError(f"--out {folder}: holds embeddings ({state}); --resume continues them, "
                                   "--overwrite replaces them")
    return existing


def _own_temporary(name: str) -> bool:
    """A file :func:`_atomic_json` was writing when its process ended."""
    return any(name.startswith(f"{n}.tmp") for n in FOLDER_FILES)


class FolderRows:
    """The rows of an embeddings folder (see the module's docstring), one per clip, written into
    memory-mapped ``.npy`` files; :meth:`save` makes the rows written so far final."""

    def __init__(self, folder: str, info: Dict[str, Any], paths: Sequence[str], dim: int,
                 patches: Optional[int] = None, classes: Optional[int] = None, resume: bool = False,
                 overwrite: bool = False):
        self.folder = folder
        rows = len(paths)
        self.shapes = _shapes(rows, dim, patches, classes)
        self.shapes["readable"] = (rows,)
        self.info = dict(info, format=FORMAT, version=VERSION, rows=rows, dim=dim, patches=patches or None,
                         classes=classes)
        self.rows = rows
        self.was_complete = False
        existing = check_folder(folder, resume, overwrite)
        if existing is not None and resume:
            self._open_existing(paths)
            self.was_complete = bool(existing.get("complete"))
        else:
            self._check_fresh()
            self._create(paths)
        self._written = self.done  # the rows written past ``done``, which the next save makes final
        self.last_save = time.monotonic()

    # --- opening ----------------------------------------------------------------------------
    def _check_fresh(self) -> None:
        folder = self.folder
        if os.path.isdir(folder):
            others = [n for n in os.listdir(folder) if n not in FOLDER_FILES and not _own_temporary(n)]
            if others:
                raise EmbeddingOutputError(f"--out {folder}: the folder holds other files ({', '.join(sorted(others)[:3])}"
                                           f"{', ...' if len(others) > 3 else ''}); give a new or empty folder")
        else:
            try:
                os.makedirs(folder)
            except OSError as e:
                raise EmbeddingOutputError(f"--out {folder}: cannot create the folder: {e.strerror or e}") from None
        if not os.access(folder, os.W_OK):
            raise EmbeddingOutputError(f"--out {folder}: the folder is not writable")

    def _create(self, paths: Sequence[str]) -> None:
        folder = self.folder
        need = sum((1 if k == "readable" else 4) * int(np.prod(s)) for k, s in self.shapes.items())
        try:
            import shutil
            free = shutil.disk_usage(folder).free
            old = sum(os.path.getsize(os.path.join(folder, f"{k}.npy")) for k in ARRAYS
                      if os.path.isfile(os.path.join(folder, f"{k}.npy")))
        except OSError:
            free, old = None, 0
        if free is not None and need > free + old:
            raise EmbeddingOutputError(f"--out {folder}: the embeddings of {self.rows} clips take {gib(need)} on disk, "
                                       f"{gib(free + old)} is free there")
        for name in os.listdir(folder):  # an earlier output is replaced as a whole (--overwrite)
            p = os.path.join(folder, name)
            if (name in FOLDER_FILES or _own_temporary(name)) and os.path.isfile(p):
                os.remove(p)
        _atomic_json(os.path.join(folder, "info.json"), self.info)
        _atomic_json(os.path.join(folder, "paths.json"), list(paths))
        self.arrays: Dict[str, np.ndarray] = {}
        for key, shape in self.shapes.items():
            p = os.path.join(folder, f"{key}.npy")
            dtype = np.bool_ if key == "readable" else np.float32
            arr = np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=shape)
            self._reserve(p)
            self.arrays[key] = arr
        self.done = 0
        self._write_progress(False)

    def _reserve(self, path: str) -> None:
        """Give the file its disk blocks now: a memory-mapped write to a full disk would end the process."""
        if not hasattr(os, "posix_fallocate"):
            return
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            import errno
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise EmbeddingOutputError(f"--out {self.folder}: no room on the disk for {os.path.basename(path)} "
                                           f"({gib(os.fstat(fd).st_size)})") from None
            # a file system that cannot reserve space: the writes allocate it
        finally:
            os.close(fd)

    def _open_existing(self, paths: Sequence[str]) -> None:
        folder = self.folder
        if not os.access(folder, os.W_OK):
            raise EmbeddingOutputError(f"--resume: {folder} is not writable")
        saved = _read_json(os.path.join(folder, "info.json"))
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise EmbeddingOutputError(f"--resume: {folder}/info.json is missing or not an embeddings folder's; "
                                       "--overwrite starts afresh")
        diff = _differences(saved, self.info)
        if diff:
            raise EmbeddingOutputError(f"--resume: {folder} was made with other inputs or options ("
                                       + "; ".join(diff) + "); give the same ones, or --overwrite to start afresh")
        if _read_json(os.path.join(folder, "paths.json")) != list(paths):
            raise EmbeddingOutputError(f"--resume: {folder} holds the embeddings of other clips (paths.json differs); "
                                       "give the same files or dataset, or --overwrite to start afresh")
        self.arrays = {}
        for key, shape in self.shapes.items():
            p = os.path.join(folder, f"{key}.npy")
            try:
                arr = np.load(p, mmap_mode="r+")
            except (OSError, ValueError) as e:
                raise EmbeddingOutputError(f"--resume: {p} cannot be read ({e}); --overwrite starts afresh") from None
            if arr.shape != shape:
                raise EmbeddingOutputError(f"--resume: {p} has shape {arr.shape}, {shape} expected; --overwrite "
                                           "starts afresh")
            self.arrays[key] = arr
        self.done = int(read_progress(folder)["done"])
        if not 0 <= self.done <= self.rows:
            raise EmbeddingOutputError(f"--resume: {folder}/progress.json says {self.done} of {self.rows} rows are "
                                       "done; --overwrite starts afresh")

    # --- writing ----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.done >= self.rows

    def write(self, positions: Sequence[int], keep: torch.Tensor, pooled: torch.Tensor,
              per: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None) -> None:
        """As :meth:`MemoryRows.write`; the rows of unreadable clips are NaN and not readable. Rows are
        final once :meth:`save` has run (every ``FLUSH_SECONDS``, and at the end)."""
        pos = np.asarray(list(positions), dtype=np.int64)
        ok = keep.numpy().astype(bool)
        self.arrays["readable"][pos] = ok
        for key, rows in (("embeddings", pooled), ("patch_embeddings", per), ("targets", targets)):
            if key not in self.arrays:
                continue
            arr = self.arrays[key]
            if rows is not None and ok.any():
                arr[pos[ok]] = rows.numpy()
            if not ok.all():
                arr[pos[~ok]] = np.nan
        if len(pos):
            self._written = max(self._written, int(pos.max()) + 1)
        if time.monotonic() - self.last_save >= FLUSH_SECONDS:
            self.save()

    def save(self, complete: Optional[bool] = None, resend: bool = True) -> None:
        """Flush the arrays and record the rows written so far as done. A Ctrl-C or SIGTERM meanwhile
        waits, and comes after (``resend``) or not (a run that stops anyway)."""
        done = max(self.done, self._written)
        with _signals_held(resend):
            for arr in self.arrays.values():
                arr.flush()
            self.done = done
            self._write_progress(self.complete if complete is None else complete)
        self.last_save = time.monotonic()

    def _write_progress(self, complete: bool) -> None:
        _atomic_json(os.path.join(self.folder, "progress.json"),
                     {"done": self.done, "rows": self.rows, "complete": bool(complete),
                      "unreadable": self.unreadable()})

    def unreadable(self) -> int:
        return int(self.done - int(self.arrays["readable"][: self.done].sum()))

    def readable_rows(self) -> int:
        return int(self.arrays["readable"][: self.done].sum())
