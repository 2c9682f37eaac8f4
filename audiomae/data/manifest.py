"""AudioSet-style datasets described by a manifest and a class-labels CSV (the AST/Audio-MAE format).

Manifest (JSON)::

    {"data": [{"wav": "audio/YxYz.wav", "labels": "/m/09x0r,/m/05zppz"}, ...]}

Relative ``wav`` paths are resolved against the manifest's folder (or ``root``). A CSV or TSV
manifest with a header naming the columns ``wav`` and ``labels`` is read the same way.

Label file (CSV, header ``index,mid,display_name``; display names may contain quoted commas)::

    index,mid,display_name
    0,/m/09x0r,"Speech"
    1,/m/05zppz,"Male speech, man speaking"

Both files are checked completely when the dataset is built: a malformed file fails at once with a
:class:`~audiomae.data.DataError` naming the file and the line (CSV, JSON syntax) or the entry
(``data[i]``) at fault. Audio files themselves are read lazily (see the bad-data handling in
:mod:`audiomae.data.dataset`).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..audio import load_audio
from .dataset import ClipDataset, DataError

logger = logging.getLogger("audiomae.data")

PathLike = Union[str, "os.PathLike[str]"]
_MISSING = object()  # an entry without 'labels'


@dataclass(frozen=True)
class LabelSet:
    """Classes of a label file: ``mids[i]`` and ``names[i]`` belong to class index ``i``."""

    mids: List[str]
    names: List[str]

    def __len__(self) -> int:
        return len(self.mids)

    @property
    def index(self) -> Dict[str, int]:
        return {m: i for i, m in enumerate(self.mids)}


_AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff", ".opus", ".m4a")


def _not_text(path: str, what: str, e: UnicodeDecodeError) -> DataError:
    """The error for a file that is not UTF-8 text, with what it most likely is instead."""
    ext = os.path.splitext(path)[1].lower()
    if ext in _AUDIO_EXTENSIONS and what == "manifest":
        hint = (" It is an audio file: --data takes a manifest (.json, .csv, .tsv) or a folder of class "
                "sub-folders (audio files to embed are given as arguments of audiomae embed).")
    elif ext in _AUDIO_EXTENSIONS:
        hint = f" It is an audio file, not a {what} (a CSV with index,mid,display_name columns)."
    elif ext in (".gz", ".bz2", ".xz", ".zip", ".zst"):
        hint = " It is compressed: decompress it first."
    else:
        hint = " Save it as UTF-8."
    return DataError(f"{path}: the {what} is not UTF-8 text (byte {e.start}: {e.reason}).{hint}")


def read_label_csv(path: PathLike) -> LabelSet:
    """Read a class-labels CSV (``index,mid,display_name``).

    Indices must be the integers 0..C-1, each once, in any order; mids must be unique.
    ``display_name`` is optional (the mid is used when it is missing).
    """
    path = os.fspath(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot open the label file: {e.strerror or e}") from e
    try:
        return _read_label_rows(f, path)
    except UnicodeDecodeError as e:
        raise _not_text(path, "label file", e) from None
    finally:
        f.close()


def _csv_error(path: str, reader: Any, e: csv.Error) -> DataError:
    hint = (" (a field's opening quote is never closed: look for an unmatched \" at or before this line)"
            if "unexpected end of data" in str(e) else "")
    return DataError(f"{path}, line {reader.line_num}: malformed CSV: {e}{hint}")


def _read_label_rows(f: Any, path: str) -> LabelSet:
    reader = csv.reader(f, strict=True)  # an unclosed quote is an error, not the rest of the file in one field
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise _csv_error(path, reader, e) from e
    if header is None:
        raise DataError(f"{path}: the label file is empty (expected a header 'index,mid,display_name')")
    cols = [h.strip().lower() for h in header]
    for need in ("index", "mid"):
        if need not in cols:
            raise DataError(
                f"{path}, line 1: the header {header!r} has no '{need}' column "
                "(expected 'index,mid,display_name')"
            )
    i_idx, i_mid = cols.index("index"), cols.index("mid")
    i_name = cols.index("display_name") if "display_name" in cols else None
    by_index: Dict[int, Tuple[str, str]] = {}
    line_of_index: Dict[int, int] = {}
    line_of_mid: Dict[str, int] = {}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise _csv_error(path, reader, e) from e
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(i_idx, i_mid):
            raise DataError(f"{path}, line {line}: expected at least {max(i_idx, i_mid) + 1} fields, got {len(row)}: {row!r}")
        raw_index, mid = row[i_idx].strip(), row[i_mid].strip()
        if not re.fullmatch(r"-?[0-9]+", raw_index):  # int() also takes 1_0 (10) and other digits
            raise DataError(f"{path}, line {line}: index {raw_index!r} is not an integer")
        index = int(raw_index)
        if index < 0:
            raise DataError(f"{path}, line {line}: negative index {index}")
        if not mid:
            raise DataError(f"{path}, line {line}: empty mid")
        if index in by_index:
            raise DataError(
                f"{path}, line {line}: duplicate index {index} (first on line {line_of_index[index]})"
            )
        if mid in line_of_mid:
            raise DataError(f"{path}, line {line}: duplicate mid {mid!r} (first on line {line_of_mid[mid]})")
        name = row[i_name].strip() if i_name is not None and i_name < len(row) else ""
        by_index[index] = (mid, name or mid)
        line_of_index[index] = line
        line_of_mid[mid] = line
    if not by_index:
        raise DataError(f"{path}: the label file has a header but no classes")
    missing = sorted(set(range(len(by_index))) - set(by_index))
    if missing:
        extra = sorted(i for i in by_index if i >= len(by_index))
        raise DataError(
            f"{path}: class indices must be 0..{len(by_index) - 1}; missing {missing[:10]}, "
            f"out of range {extra[:10]} (line {line_of_index[extra[0]]})"
        )
    mids = [by_index[i][0] for i in range(len(by_index))]
    names = [by_index[i][1] for i in range(len(by_index))]
    return LabelSet(mids, names)


def _split_labels(labels: Any, where: str) -> List[str]:
    if isinstance(labels, str):
        parts = labels.split(",")
    elif isinstance(labels, (list, tuple)) and all(isinstance(x, str) for x in labels):
        parts = list(labels)
    else:
        raise DataError(f"{where}: 'labels' must be a string of comma-separated mids or a list of strings, got {labels!r}")
    out: List[str] = []
    for p in parts:
        p = p.strip()
        if p and p not in out:
            out.append(p)
    return out


def read_manifest(path: PathLike) -> List[Tuple[str, Any, str]]:
    """Read a manifest: a list of ``(wav, labels, where)``, ``where`` naming the entry for messages.

    JSON: ``{"data": [{"wav": ..., "labels": ...}, ...]}`` (a bare list of entries is accepted too).
    CSV/TSV (by extension): a header with ``wav`` and, for labelled data, ``labels`` columns.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in _AUDIO_EXTENSIONS and os.path.isfile(path):
        raise DataError(f"{path}: an audio file, not a manifest: --data takes a manifest (.json, .csv, .tsv) or a "
                        "folder of class sub-folders (audio files to embed are given as arguments of audiomae embed)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if ext in (".csv", ".tsv"):
                return _read_table_manifest(f, path, "\t" if ext == ".tsv" else ",")
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot open the manifest: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise _not_text(path, "manifest", e) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from e
    except RecursionError:
        raise DataError(f"{path}: its JSON nests too deeply to be a manifest (expected {{\"data\": [{{\"wav\": ..., "
                        "\"labels\": ...}}, ...]}})") from None
    if isinstance(doc, dict):
        if "data" not in doc:
            raise DataError(f"{path}: the manifest has no 'data' key (expected {{\"data\": [{{\"wav\": ..., \"labels\": ...}}, ...]}})")
        entries = doc["data"]
    else:
        entries = doc
    if not isinstance(entries, list):
        raise DataError(f"{path}: 'data' must be a list of entries, got {type(entries).__name__}")
    out = []
    for i, e in enumerate(entries):
        where = f"{path}: data[{i}]"
        if not isinstance(e, dict):
            raise DataError(f"{where}: an entry must be an object with 'wav' and 'labels', got {type(e).__name__}")
        if "wav" not in e:
            raise DataError(f"{where}: missing key 'wav'")
        wav = e["wav"]
        if not isinstance(wav, str) or not wav.strip():
            raise DataError(f"{where}: 'wav' must be a non-empty string, got {wav!r}")
        out.append((wav, e.get("labels", _MISSING), where))
    return out


def _read_table_manifest(f: Any, path: str, delimiter: str) -> List[Tuple[str, Any, str]]:
    reader = csv.reader(f, delimiter=delimiter, strict=True)  # an unclosed quote is an error
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the manifest is empty (expected a header with 'wav' and 'labels')")
        cols = [h.strip().lower() for h in header]
        if "wav" not in cols:
            raise DataError(f"{path}, line 1: the header {header!r} has no 'wav' column")
        i_wav = cols.index("wav")
        i_lab = cols.index("labels") if "labels" in cols else None
        out = []
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}, line {line}"
            if len(row) != len(header):
                raise DataError(f"{where}: expected {len(header)} fields, got {len(row)}: {row!r}")
            wav = row[i_wav].strip()
            if not wav:
                raise DataError(f"{where}: empty 'wav'")
            out.append((wav, row[i_lab] if i_lab is not None else _MISSING, where))
    except csv.Error as e:
        raise _csv_error(path, reader, e) from e
    return out


class ManifestDataset(ClipDataset):
    """Clips listed in an AudioSet/AST manifest, with multi-hot targets from a label CSV.

    ``ManifestDataset(manifest, label_csv, clip_seconds=None, root=None, multi_label=True, ...)``

    manifest: JSON (``{"data": [{"wav", "labels"}]}``), or CSV/TSV with ``wav`` and ``labels`` columns.
    label_csv: the class list (``index,mid,display_name``). ``None`` for unlabelled data (e.g.
      pretraining): then ``labels`` may be absent and targets are empty (``num_classes == 0``).
    root: folder that relative ``wav`` paths are resolved against. By default the manifest's folder,
      unless none of the first relative paths exists there and some exist relative to the working
      directory (as AST's recipes write them, ``./data/...``): then the working directory, with a note.
    multi_label: ``False`` for single-label data (ESC-50, Speech Commands): every entry must then
      carry exactly one label; targets are one-hot either way.
    Other keyword arguments: see :class:`audiomae.data.ClipDataset` (``features``,
    ``max_bad_fraction``, ``transform``, ...).
    """

    def __init__(
        self,
        manifest: PathLike,
        label_csv: Optional[PathLike] = None,
        clip_seconds: Optional[float] = None,
        *,
        root: Optional[PathLike] = None,
        multi_label: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(clip_seconds, **kwargs)
        self.manifest_path = os.fspath(manifest)
        self.label_csv = os.fspath(label_csv) if label_csv is not None else None
        self.multi_label = bool(multi_label)
        if self.label_csv is not None:
            self.label_set: Optional[LabelSet] = read_label_csv(self.label_csv)
            self.class_names = list(self.label_set.names)
            self.class_mids = list(self.label_set.mids)
        else:
            self.label_set = None
            self.class_names = []
            self.class_mids = []
        entries = read_manifest(self.manifest_path)
        if not entries:
            raise DataError(f"{self.manifest_path}: the manifest lists no clips")
        base = os.fspath(root) if root is not None else self._relative_base(entries)
        lookup = self.label_set.index if self.label_set is not None else {}
        self.paths: List[str] = []
        self._labels: List[Tuple[int, ...]] = []
        for wav, labels, where in entries:
            wav = os.path.expanduser(wav.strip())
            self.paths.append(wav if os.path.isabs(wav) else _under(base, wav))
            if self.label_set is None:
                self._labels.append(())
                continue
            if labels is _MISSING:
                raise DataError(f"{where}: missing key 'labels'")
            mids = _split_labels(labels, where)
            if not mids:
                raise DataError(f"{where}: no labels")
            idx = []
            for m in mids:
                if m not in lookup:
                    raise DataError(f"{where}: unknown label {m!r} (not in {self.label_csv})")
                idx.append(lookup[m])
            if not self.multi_label and len(idx) != 1:
                raise DataError(f"{where}: {len(idx)} labels {mids!r} in a single-label dataset")
            self._labels.append(tuple(idx))
        self._warn_repeats(entries)

    def _warn_repeats(self, entries) -> None:
        """A file listed twice is two clips (counted twice in evaluation): said, with the first ones,
        and whether their labels disagree."""
        if len(set(self.paths)) == len(self.paths):
            return
        first: dict = {}
        repeats, disagree = [], 0
        for i, p in enumerate(self.paths):
            j = first.setdefault(p, i)
            if j != i:
                repeats.append((j, i))
                disagree += self._labels[j] != self._labels[i]
        shown = "; ".join(f"{entries[i][2]} repeats {entries[j][2]}" for j, i in repeats[:3])
        logger.warning("%s: %d entr%s repeat a file listed before (each is a clip of its own%s): %s%s",
                       self.manifest_path, len(repeats), "ies" if len(repeats) != 1 else "y",
                       f"; {disagree} with other labels" if disagree else "", shown, " ..." if len(repeats) > 3 else "")

    def _relative_base(self, entries, probe: int = 20) -> str:
        """The folder relative paths are taken from: the manifest's, or the working directory when only
        there do the first ``probe`` relative paths exist."""
        here = os.path.dirname(os.path.abspath(self.manifest_path))
        rel = [os.path.expanduser(w.strip()) for w, _, _ in entries]
        rel = [w for w in rel if not os.path.isabs(w)][:probe]
        cwd = os.getcwd()
        if not rel or here == cwd or any(os.path.exists(os.path.join(here, w)) for w in rel):
            return here
        if any(os.path.exists(os.path.join(cwd, w)) for w in rel):
            logger.warning("%s: its relative paths are not found next to it but in the working directory %s; "
                           "reading them from there (pass --data-root / root= to choose)", self.manifest_path, cwd)
            return cwd
        return here

    def __len__(self) -> int:
        return len(self.paths)

    def labels_of(self, index: int) -> List[int]:
        return list(self._labels[index])

    def _path(self, index: int) -> str:
        return self.paths[index]

    def _read(self, index: int):
        return load_audio(self.paths[index], sample_rate=self.sample_rate, mono=True, downmix=self.downmix)


def _under(base: str, relative: str) -> str:
    """``relative`` from ``base``, tidied (``./a.wav`` is ``a.wav``) unless it steps up (``..``): the
    folder it steps up from may be a link, which the OS follows and a tidied path would not."""
    joined = os.path.join(base, relative)
    parts = relative.replace(os.altsep or os.sep, os.sep).split(os.sep)
    return joined if ".." in parts else os.path.normpath(joined)


def write_manifest(path: PathLike, entries: Sequence[Dict[str, str]]) -> None:
    """Write ``{"data": entries}`` as JSON (one entry per line, readable and diff-friendly)."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"data": [\n')
        f.write(",\n".join(json.dumps(e, ensure_ascii=False) for e in entries))
        f.write("\n]}\n")
