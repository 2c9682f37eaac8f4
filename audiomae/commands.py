"""Commands built on the loops: embed, reconstruct, and the demo (the main job end to end)."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .checkpoint import CheckpointError, adaptations_as_notes, read_checkpoint, reading_once, run_options
from .data.dataset import frames_for
from .model import AudioMAE, AudioMAEClassifier

NUM_MEL_BINS = 128
FRAME_SHIFT_S = 0.010


class InputError(Exception):
    """The command cannot use one of its inputs or outputs (an audio file, an output path, an option
    value that does not fit the checkpoint); the message names it."""


def load_any(path: str, **overrides):
    """A pretraining checkpoint (with decoder) as AudioMAE, anything else as AudioMAEClassifier."""
    sd, _, _ = read_checkpoint(path)
    if any(k.startswith("decoder_") for k in sd):
        return AudioMAE.from_pretrained(path, **overrides)
    return AudioMAEClassifier.from_pretrained(path, **overrides)


def _device(name: str) -> torch.device:
    from . import dispatch
    from .train.distributed import pick_device
    device = pick_device(name)
    dispatch.check_device(device)  # a forced backend that cannot run here stops before any work
    return device


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_clip(path: str, downmix: str = "first", folder_hint: str = "use --data for a folder of class sub-folders"
              ) -> torch.Tensor:
    """A file's 16 kHz mono waveform (``downmix`` as in :func:`audiomae.audio.load_audio`), checked to be
    long enough for one fbank frame. Raises AudioLoadError (unreadable file) or InputError (too short),
    each naming the file."""
    from .audio import SAMPLE_RATE, AudioLoadError, load_audio
    try:
        wave = load_audio(path, SAMPLE_RATE, mono=True, downmix=downmix)
    except AudioLoadError:
        if os.path.isdir(path):
            raise AudioLoadError(path, f"a folder, not an audio file ({folder_hint})") from None
        raise
    if frames_for(wave.shape[-1]) == 0:
        raise InputError(f"cannot use audio file {path!r}: {wave.shape[-1]} samples ({wave.shape[-1] * 1000 // SAMPLE_RATE} ms"
                         f" at {SAMPLE_RATE} Hz) is shorter than one 25 ms analysis frame")
    return wave


class DecodedClips:
    """The waveforms :func:`check_audio_files` decoded, kept up to a memory budget so that the
    command does not decode them again; ``get(path)`` reads a file that was not kept."""

    BUDGET_BYTES = 512 * 2 ** 20

    def __init__(self, downmix: str):
        self.downmix, self.kept, self.size = downmix, {}, 0

    def offer(self, path: str, wave: torch.Tensor) -> None:
        n = wave.numel() * wave.element_size()
        if path not in self.kept and self.size + n <= self.BUDGET_BYTES:
            self.kept[path], self.size = wave, self.size + n

    def get(self, path: str) -> torch.Tensor:
        wave = self.kept.pop(path, None)
        if wave is None:
            return read_clip(path, self.downmix)
        self.size -= wave.numel() * wave.element_size()
        return wave


def check_audio_files(files: Sequence[str], downmix: str = "first", done: str = "embedded",
                      folder_hint: str = "use --data for a folder of class sub-folders",
                      clips: Optional[DecodedClips] = None, progress: bool = False) -> List[int]:
    """Read every file once before any model work; returns each file's number of fbank frames, and
    hands the waveforms to ``clips`` (which keeps what its budget allows). Raises AudioLoadError /
    InputError for one unusable file, InputError listing them for several (``nothing was {done}``).
    ``progress``: a progress bar when there are many files."""
    from .audio import AudioLoadError
    from tqdm.auto import tqdm
    frames, problems = [], []
    for f in tqdm(files, desc="checking files", unit="file", leave=False, dynamic_ncols=True,
                  disable=not progress or len(files) < 64):
        try:
            wave = read_clip(f, downmix, folder_hint)
            frames.append(frames_for(wave.shape[-1]))
            if clips is not None:
                clips.offer(f, wave)
        except (AudioLoadError, InputError) as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        lines = "\n".join(f"  {e}" for e in problems)
        raise InputError(f"{len(problems)} of {len(files)} audio files cannot be used; nothing was {done}:\n{lines}")
    return frames


def _output_folder(path: str, option: str) -> None:
    """Create the folder of an output file, or fail with a message naming the option and the path."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{option} {path}: is a folder; give a file name")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InputError(f"{option} {path}: cannot create the folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"{option} {path}: the folder {folder} is not writable")
    try:  # a place that takes no files (a read-only mount, /proc) says so only when one is made
        import tempfile
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".audiomae-probe-"):
            pass
    except OSError as e:
        raise InputError(f"{option} {path}: cannot write files in {folder}: {e.strerror or e}") from None


def write_output(path: str, option: str, write) -> None:
    """``write(tmp)`` to a file beside ``path`` (with its extension, which writers read the format
    from), renamed over ``path`` when complete: an output is never left half-written, and a failure
    is an InputError naming the option and the path."""
    target = os.path.realpath(path)  # through a link, to the file it names
    folder = os.path.dirname(target)
    ext = os.path.splitext(target)[1]
    tmp = os.path.join(folder, f".audiomae-{os.getpid()}{ext}")
    try:
        write(tmp)
        if os.path.exists(target):  # the file replaced keeps its permissions
            import shutil
            shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as e:  # torch.save and soundfile raise RuntimeError subclasses
        cause = e  # torch's writer says a full disk as a RuntimeError whose cause is the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        why = getattr(cause, 'strerror', None) or getattr(e, 'strerror', None)
        if why is None:  # a writer's own words (torch: "iostream error", libsndfile: "System error"): a full disk?
            import shutil
            try:
                free = shutil.disk_usage(folder).free
            except OSError:
                free = None
            why = (f"No space left on device ({free} bytes free where it goes)" if free is not None and free < 1 << 20
                   else str(e))
        raise InputError(f"{option} {path}: cannot be written: {why}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_for_length(checkpoint: str, target_length: Optional[int]):
    """The checkpoint's model; with ``target_length``, rebuilt for inputs of that many frames (its
    position tables adapted; a pretraining model's encoder only where its decoder windows do not tile
    that length), or InputError when that length does not fit the model. What loading
    adapts is a note."""
    with adaptations_as_notes():
        if not target_length:
            return load_any(checkpoint)
        size = (int(target_length), NUM_MEL_BINS)
        try:
            try:
                return load_any(checkpoint, img_size=size)
            except ValueError as e:
                if "does not tile" not in str(e):
                    raise
            # a pretraining checkpoint whose decoder windows do not tile this length: embedding needs
            # only the encoder
            return AudioMAE.from_pretrained(checkpoint, img_size=size, encoder_only=True)
        except CheckpointError:
            raise
        except ValueError as e:
            raise InputError(f"--target-length {target_length} does not fit {checkpoint}: {e}") from None


def _checkpoint_options(opts: Dict[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """``opts`` with the input options of ``names`` not given taken from the checkpoint's run
    (:func:`audiomae.train.loop.inherit_run_options`), with a note naming those that differ."""
    from .train.loop import _note_inherited, inherit_run_options
    _, _, args = read_checkpoint(opts["checkpoint"])
    opts, changed = inherit_run_options(opts, args, None, names, where=opts["checkpoint"])
    _note_inherited(changed, opts["checkpoint"])
    return opts


def _seconds(frames: int) -> str:
    return f"{frames * FRAME_SHIFT_S:.2f} s"


class EmbedInterrupted(KeyboardInterrupt):
    """``embed`` stopped by Ctrl-C or SIGTERM after making the rows done so far final; ``signum`` is
    the signal's number (None for a Ctrl-C the handler did not see)."""

    def __init__(self, message: str, signum: Optional[int] = None):
        super().__init__(message)
        self.message, self.signum = message, signum


def _embed_identity(opts: Dict[str, Any], files: Sequence[str], T: int, stats: Any) -> Dict[str, Any]:
    """What an embeddings folder's rows depend on (its ``info.json``): a resumed run must match it."""
    import hashlib

    def digest(path: str) -> str:  # what a file holds (a copy, a touched file or a link are the same)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    ckpt = os.path.realpath(opts["checkpoint"])
    source: Dict[str, Any] = {"files": bool(files)}
    if not files:
        data = opts.get("data")
        real = None if data == "synthetic" else os.path.realpath(data)
        source.update(data=data if real is None else real,
                      labels=os.path.realpath(opts["labels"]) if opts.get("labels") else None,
                      data_root=os.path.realpath(opts["data_root"]) if opts.get("data_root") else None,
                      single_label=bool(opts.get("single_label")), clip_seconds=opts.get("clip_seconds"))
        # a manifest's labels (and its label file's names) are in no path: their contents count
        if real is not None and os.path.isfile(real):
            source["data_sha256"] = digest(real)
        if opts.get("labels") and os.path.isfile(opts["labels"]):
            source["labels_sha256"] = digest(opts["labels"])
        if data == "synthetic":
            source.update(num_clips=opts.get("num_clips", 2000), seed=opts.get("seed", 0))
    return {"checkpoint": ckpt, "checkpoint_sha256": digest(ckpt),
            "target_length": int(T), "stats": stats if isinstance(stats, (str, type(None))) else str(stats),
            "downmix": opts.get("downmix") or "first", "per_patch": bool(opts.get("per_patch")), "source": source}


def embed(opts: Dict[str, Any]) -> str:
    """Embeddings of audio files (positional inputs) or of a dataset (``--data``) -> a .pt or .npz
    file, or a folder of .npy files written as the clips are embedded (``--resume`` continues one;
    see :mod:`audiomae.embeddings`).

    Every file is read and checked first: if any cannot be used, nothing is embedded and the error
    names them all. Files are cut or zero-padded to the model input length (``target_length``, by
    default the checkpoint's), with a warning counting the files that were cut."""
    from .audio import SAMPLE_RATE, waveform_to_input
    from .embeddings import (EmbeddingOutputError, FolderRows, MemoryRows, check_folder, check_output_name,
                             is_folder_output)
    from tqdm.auto import tqdm

    path = opts.get("out") or "embeddings.pt"
    problem = check_output_name(path)
    if problem:
        raise InputError(f"--out {path}: {problem}")
    folder = is_folder_output(path)
    if folder:
        path = path.rstrip("/" + os.sep) or path
    elif opts.get("resume"):
        raise InputError(f"--resume continues a folder of embeddings (--out DIR/); --out {path} is a file, "
                         "written once every clip is embedded")
    files = list(opts.get("inputs") or [])
    if not files and not opts.get("data"):
        raise InputError("nothing to embed: give audio files or --data")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise InputError("embed runs in one process (under torchrun or srun every process would embed everything "
                         "and write the same file); run it as one process")
    if not folder:
        _output_folder(path, "--out")
    # before any reading: a folder's state must fit --resume / --overwrite, and the files a resumed
    # folder has embedded already are not read again
    done_before = 0
    if folder:
        try:
            progress = check_folder(path, bool(opts.get("resume")), bool(opts.get("overwrite")))
        except EmbeddingOutputError as e:
            raise InputError(str(e)) from None
        if progress is not None and opts.get("resume") and files:
            done_before = min(len(files), max(0, int(progress["done"])))
    with reading_once():  # the run's options, the checkpoint's kind, the model: one read of the file
        opts = _checkpoint_options(opts, ("stats", "clip_seconds", "downmix", "single_label"))
        downmix = opts.get("downmix") or "first"
        device = _device(opts.get("device", "auto"))
        clips = DecodedClips(downmix)
        frames = check_audio_files(files[done_before:], downmix, clips=clips,
                                   progress=not opts.get("quiet")) if files else []
        model = _load_for_length(opts["checkpoint"], opts.get("target_length")).to(device).eval()
    T = model.config.img_size[0]
    D, L = int(model.config.embed_dim), int(model.config.num_patches)
    stats = opts.get("stats", "audioset")
    per_patch = bool(opts.get("per_patch"))
    bs = int(opts.get("batch_size", 32))
    dataset = None
    if files:
        longer = sum(n > T for n in frames)
        if longer:
            _warn(f"{longer} of {len(frames)} {'file is' if len(frames) == 1 else 'files are'} longer than the model input of {_seconds(T)} ({T} frames); "
                  f"only their first {_seconds(T)} are embedded (--target-length sets the input length)")
        paths = [os.path.abspath(f) for f in files]
        classes = None
    else:
        from .train.loop import build_dataset
        # the clips give what the model input holds unless --clip-seconds says otherwise
        dataset = build_dataset(dict(opts, target_length=T), "val" if opts.get("eval_data") else "train")
        clip = getattr(dataset, "clip_samples", None)
        if clip and frames_for(int(clip)) > T:
            _warn(f"the dataset's clips are read up to {clip / SAMPLE_RATE:.2f} s (--clip-seconds), more than the model "
                  f"input of {_seconds(T)} ({T} frames): of longer files only the first {_seconds(T)} are embedded "
                  "(--clip-seconds and --target-length set the lengths)")
        # absolute, the same way whether a file is there or not (a resume after a missing file came back
        # compares them), and not tidied: a manifest's ../ may step up from a link
        paths = [p if p.startswith("synthetic:") or os.path.isabs(p) else os.path.join(os.getcwd(), p)
                 for p in map(dataset._path, range(len(dataset)))]
        classes = int(dataset.num_classes)
        if not classes:
            _warn(f"{opts['data']}: its clips have no classes, so the targets are empty; a manifest's labels are "
                  "read with its class-label CSV (--labels class_labels_indices.csv)")
    try:
        if folder:
            info = _embed_identity(opts, files, T, stats)
            if dataset is not None:
                info["class_names"] = [str(n) for n in (getattr(dataset, "class_names", []) or [])]
            rows = FolderRows(path, info, paths, D, L if per_patch else None, classes,
                              resume=bool(opts.get("resume")), overwrite=bool(opts.get("overwrite")))
        else:
            rows = MemoryRows(path, len(paths), D, L if per_patch else None, classes)
    except EmbeddingOutputError as e:
        raise InputError(str(e)) from None
    start = rows.done if folder else 0
    # a resumed folder's unreadable clips are read again (their files may have been mended), first
    retry = [] if not folder or files else [int(i) for i in np.flatnonzero(~rows.arrays["readable"][:start])]
    if folder and rows.complete and rows.was_complete and not retry:
        print(f"{path}: every clip is embedded already ({rows.rows} rows); nothing to do")
        return path
    order = retry + list(range(start, len(paths)))

    def batches():
        """``(positions, keep, model input of the kept clips, their targets)`` of the clips ``order``."""
        if files:
            for i in range(0, len(order), bs):
                chunk = order[i:i + bs]
                x = torch.stack([waveform_to_input(clips.get(files[j]), SAMPLE_RATE, T, stats) for j in chunk])
                yield chunk, torch.ones(len(chunk), dtype=torch.bool), x, None
            return
        from .data import FeatureExtractor
        from .data.dataset import base_dataset
        from .train.loop import _loader, _readable
        feats = FeatureExtractor(target_length=T, stats=stats, device=device)
        loader = _loader(dataset, opts, order, bs)
        tracker = getattr(base_dataset(dataset), "bad_tracker", None)
        if tracker is not None and start:
            # the clips read well before count towards --max-bad-fraction as if this run read them
            tracker.carry(len(dataset), np.flatnonzero(rows.arrays["readable"][:start]).tolist())
        k = 0
        for batch in loader:
            keep = _readable(batch)
            n = len(keep)
            x = feats({key: batch[key][keep] for key in ("input", "waveform", "length") if key in batch}) \
                if keep.any() else None
            yield order[k:k + n], keep, x, batch["target"][keep].float()
            k += n

    from .train.loop import GracefulInterrupt
    total = -(-len(order) // bs)
    stop = GracefulInterrupt(enabled=folder, message="stopping after this batch, with the rows embedded so far")
    with stop:  # (also while the rows are saved after a stop: a second signal then waits for the save)
        try:
            for positions, keep, x, targets in tqdm(batches(), total=total, desc="embedding", unit="batch",
                                                    disable=opts.get("quiet"), dynamic_ncols=True):
                if x is None:
                    pooled, per = torch.empty(0, D), None
                elif per_patch:
                    pooled, per = model.embed_both(x.to(device))
                    per = per.float().cpu()
                else:
                    pooled, per = model.embed(x.to(device)), None
                rows.write(positions, keep, pooled.float().cpu(), per, targets)
                if stop.requested:
                    raise KeyboardInterrupt
        except BaseException as e:
            if not folder:
                raise
            rows.save(resend=False)
            if not (isinstance(e, KeyboardInterrupt) and rows.complete):  # a stop in the last batch: done
                if isinstance(e, KeyboardInterrupt):
                    raise EmbedInterrupted(f"interrupted after {rows.done} of {rows.rows} clips; {path}/ keeps them, "
                                           "and the same command with --resume continues", stop.signum) from None
                _warn(f"{path} keeps the {rows.done} of {rows.rows} clips embedded so far; the same command with "
                      "--resume continues once the problem is solved")
                raise
    if folder:
        rows.save(complete=True)
        bad, good = rows.unreadable(), rows.readable_rows()
        if not good:
            raise InputError(f"no readable clip in the dataset ({rows.rows} clips)")
        if bad:
            _warn(f"{bad} unreadable file{'s' if bad != 1 else ''}: their rows are NaN and readable.npy False; "
                  f"{good} of {rows.rows} clips embedded")
        shapes = ", ".join(f"{k}.npy {list(s)}" for k, s in rows.shapes.items() if k != "readable")
        print(f"wrote the embeddings of {rows.rows} clips to {path}/ ({shapes})")
        return path
    arrays = rows.result()
    if not rows.pos:
        raise InputError(f"no readable clip in the dataset ({len(paths)} clips)")
    out: Dict[str, Any] = {"checkpoint": os.path.abspath(opts["checkpoint"]), "embeddings": arrays["embeddings"]}
    if files:
        out["paths"] = paths
        if per_patch:
            out["patch_embeddings"] = arrays["patch_embeddings"]
    else:
        out["targets"] = arrays["targets"]
        if per_patch:
            out["patch_embeddings"] = arrays["patch_embeddings"]
        out["class_names"] = list(getattr(dataset, "class_names", []) or [])
        out["indices"] = torch.tensor(rows.indices, dtype=torch.long)  # the clip of each row
        out["paths"] = [paths[i] for i in rows.indices]
        if getattr(dataset, "bad_count", 0):
            _warn(f"{dataset.bad_count} unreadable file{'s' if dataset.bad_count != 1 else ''} left out: "
                  f"{rows.pos} of {len(dataset)} clips embedded")
    if path.lower().endswith(".npz"):
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **{k: (v.numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in out.items()})
    else:
        def write(tmp):
            torch.save(out, tmp)
    write_output(path, "--out", write)
    print(f"wrote {tuple(out['embeddings'].shape)} embeddings to {path}")
    return path


def _run_label_file(saved: Dict[str, Any]) -> Optional[str]:
    """The class-label CSV a run recorded: this package's ``labels``, the release's ``label_csv``."""
    return next((saved[k] for k in ("labels", "label_csv") if isinstance(saved.get(k), str) and saved[k]), None)


def _class_labels(opts: Dict[str, Any], args: Any, num_classes: int):
    """``(mids, names, where)`` of a classifier's classes: ``--labels`` (checked against the classes
    the run recorded, if it did), else the class names its run recorded, else the label CSV its run
    read (this package's ``labels``, the release's ``label_csv``) while it is where the run read it;
    ``(None, None, None)`` when none is known."""
    from .data.manifest import read_label_csv
    from .train.loop import _class_mismatch, compared_classes
    saved = run_options(args)
    run_names = [str(n) for n in saved["class_names"]] if isinstance(saved.get("class_names"), list) else None
    run_mids = saved.get("class_mids")
    run_mids = [str(m) for m in run_mids] if isinstance(run_mids, list) and run_names and \
        len(run_mids) == len(run_names) else None
    if opts.get("labels"):
        labels, where = read_label_csv(opts["labels"]), f"--labels {opts['labels']}"
        if run_names is not None:
            trained, given = compared_classes(run_names, run_mids, list(labels.names), list(labels.mids))
            if trained != given:
                raise InputError(f"--labels {opts['labels']}: " + _class_mismatch(
                    trained, given, "the label file", "give the label file the model was trained with, or leave out "
                    "--labels to name the classes as the run did"))
    elif run_names is not None:
        if len(run_names) != num_classes:
            raise InputError(f"{opts['checkpoint']}: its run recorded {len(run_names)} class names for {num_classes} "
                             "outputs; give the classes with --labels")
        return run_mids or [""] * len(run_names), run_names, "the checkpoint's run"
    else:
        path = _run_label_file(saved)
        if path is None or not os.path.isfile(path):
            return None, None, None
        labels, where = read_label_csv(path), f"the run's label file {path}"
    if len(labels) != num_classes:
        raise InputError(f"{where} has {len(labels)} class{'es' if len(labels) != 1 else ''}, the checkpoint "
                         f"predicts {num_classes}: give the class-labels CSV the model was trained with")
    return list(labels.mids), list(labels.names), where


def _single_label(opts: Dict[str, Any], args: Any) -> bool:
    """Whether a classifier's scores are a softmax over its classes (it was trained with cross-entropy):
    ``--single-label`` when given, else how its run trained it. This package's runs record it (older
    ones: class folders and the synthetic set are single-label, a manifest with --single-label). The
    release's AudioSet script trains with BCE unless its ``use_soft`` (whatever the dataset), its
    ESC-50 script (whose arguments have no ``use_soft``) with cross-entropy; arguments without
    ``use_soft`` whose ``dataset`` is one the release scores as multi-label (AudioSet, Speech
    Commands) are multi-label. Else multi-label."""
    from .train.loop import _given
    if "single_label" in _given(opts) and opts.get("single_label"):
        return True
    saved = run_options(args)
    if isinstance(args, dict):
        if isinstance(saved.get("multi_label"), bool):
            return not saved["multi_label"]
        data = saved.get("data")
        if isinstance(data, str) and not data.lower().endswith((".json", ".csv", ".tsv")):
            return True  # the synthetic set or class folders (wherever they are now)
        return bool(saved.get("single_label"))
    if saved:  # the release's
        if "use_soft" in saved:
            return bool(saved["use_soft"])
        return str(saved.get("dataset", "")).lower() not in ("audioset", "speechcommands")
    return False


def _scoring(single: bool) -> str:
    return "probabilities (softmax: one class per clip)" if single else "scores (sigmoid: each class on its own)"


def classify(opts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Audio files -> each file's top classes with their scores (sigmoid for a multi-label model, the
    release's AudioSet one among them; softmax for a single-label one), printed and, with ``--out``,
    written as CSV or JSON. Every file is read and checked before the model runs."""
    from .audio import SAMPLE_RATE, waveform_to_input
    from .data import DataError
    from tqdm.auto import tqdm

    files = list(opts.get("inputs") or [])
    out_path = opts.get("out")
    if out_path and not out_path.lower().endswith((".csv", ".json")):
        raise InputError(f"--out {out_path}: the results file must end in .csv or .json")
    if out_path:
        _output_folder(out_path, "--out")
    top_k = 5 if opts.get("top_k") is None else int(opts["top_k"])
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    with reading_once():
        sd, _, args = read_checkpoint(opts["checkpoint"])
        if "head.weight" not in sd:
            kind = "a pretraining checkpoint" if any(k.startswith("decoder_") for k in sd) else "an encoder"
            raise InputError(f"{opts['checkpoint']} is {kind} without a classification head: fine-tune it first "
                             f"(audiomae finetune --pretrained {opts['checkpoint']} ...), or use audiomae embed for "
                             "its embeddings")
        single = _single_label(opts, args)
        opts = _checkpoint_options(opts, ("stats", "downmix"))
        try:
            mids, names, where = _class_labels(opts, args, int(sd["head.weight"].shape[0]))
        except DataError as e:
            raise InputError(str(e)) from None
        downmix = opts.get("downmix") or "first"
        device = _device(opts.get("device", "auto"))
        clips = DecodedClips(downmix)
        frames = check_audio_files(files, downmix, "classified", "classify takes audio files", clips)
        model = _load_for_length(opts["checkpoint"], opts.get("target_length")).to(device).eval()
    if tuple(model.head.weight.shape) != tuple(sd["head.weight"].shape):
        raise InputError(f"{opts['checkpoint']}: its head {tuple(sd['head.weight'].shape)} does not fit its encoder "
                         f"(width {model.config.embed_dim}): the file is not a consistent classifier")
    C = model.num_classes
    if names is None:
        lost = _run_label_file(run_options(args))
        why = (f"its run's label file {lost} is not on this machine" if lost
               else f"{opts['checkpoint']} records no class names")
        _warn(f"{why}: classes are shown by index (give the class-labels CSV the model was trained with, --labels "
              "class_labels_indices.csv for AudioSet)")
        mids, names = [""] * C, [f"class {i}" for i in range(C)]
    top_k = min(top_k, C)
    T = model.config.img_size[0]
    hop = opts.get("hop")
    if hop is None:
        longer = sum(n > T for n in frames)
        if longer:
            _warn(f"{longer} of {len(files)} {'file is' if len(files) == 1 else 'files are'} longer than the model "
                  f"input of {_seconds(T)} ({T} frames); only their first {_seconds(T)} are classified (--hop "
                  "SECONDS classifies whole files, window by window)")
    stats = opts.get("stats") or "audioset"
    bs = int(opts.get("batch_size", 32))
    from .audio import frames_span
    window = frames_span(T)  # the samples of one model input
    step = None if hop is None else max(1, int(round(float(hop) * SAMPLE_RATE)))

    if step is not None and step > window:
        _warn(f"--hop {hop:g} is longer than the model input of {window / SAMPLE_RATE:g} s: the audio between the "
              "windows is not classified")

    def windows(n: int) -> List[int]:
        """Start samples of a file's windows: one without --hop (or for a file shorter than one, which
        is zero-padded as a short clip is); else one every ``step`` samples, and a last one that ends
        where the file ends."""
        if step is None or n <= window:
            return [0]
        starts = list(range(0, n - window + 1, step))
        if starts[-1] + window < n:
            starts.append(n - window)
        return starts

    def top(row: torch.Tensor) -> List[Dict[str, Any]]:
        v, ix = row.topk(top_k)
        return [{"rank": r + 1, "index": j, "mid": mids[j], "name": names[j], "score": p}
                for r, (p, j) in enumerate(zip(v.tolist(), ix.tolist()))]

    def score(x: torch.Tensor, what: str) -> torch.Tensor:
        logits = model(x.to(device)).float().cpu()
        if not bool(torch.isfinite(logits).all()):
            raise InputError(f"the model's scores for {what} are not finite: {opts['checkpoint']} holds non-finite "
                             "weights (nothing was written)")
        return logits.softmax(-1) if single else logits.sigmoid()

    results: List[Dict[str, Any]] = []
    with torch.no_grad():
        if step is None:
            for i in tqdm(range(0, len(files), bs), desc="classifying", unit="batch", disable=opts.get("quiet")):
                batch = files[i:i + bs]
                x = torch.stack([waveform_to_input(clips.get(f), SAMPLE_RATE, T, stats) for f in batch])
                for f, row in zip(batch, score(x, batch[0] if len(batch) == 1 else f"{batch[0]} ...")):
                    results.append({"path": os.path.abspath(f), "top": top(row)})
        else:
            for f in tqdm(files, desc="classifying", unit="file", disable=opts.get("quiet")):
                wave = clips.get(f)
                starts = windows(wave.shape[-1])
                rows = []
                for i in range(0, len(starts), bs):
                    x = torch.stack([waveform_to_input(wave[s:s + window], SAMPLE_RATE, T, stats)
                                     for s in starts[i:i + bs]])
                    rows.append(score(x, f))
                per = torch.cat(rows)
                # the file: the mean probability of single-label windows, the highest multi-label score
                whole = per.mean(0) if single else per.amax(0)
                results.append({"path": os.path.abspath(f), "top": top(whole),
                                "windows": [{"start": s / SAMPLE_RATE, "top": top(row)} for s, row in zip(starts, per)]})
    over = "" if step is None else (f"; whole files in windows of {window / SAMPLE_RATE:g} s every "
                                    f"{step / SAMPLE_RATE:g} s, a file's score the {'mean' if single else 'highest'} "
                                    "over its windows")
    print(f"top {top_k} of {C} class{'es' if C != 1 else ''}, {_scoring(single)}{over}"
          + (f"; names from {where}" if where else ""))

    def named(t: Dict[str, Any]) -> str:
        return t["name"] + (f" ({t['mid']})" if t["mid"] and t["mid"] != t["name"] else "")

    for r in results:
        print(r["path"])
        for t in r["top"]:
            print(f"  {t['score']:.3f}  {named(t)}")
        for wdw in r.get("windows", []) if len(r.get("windows", [])) > 1 else []:
            print(f"    {wdw['start']:8.2f} s  " + ", ".join(f"{t['name']} {t['score']:.2f}" for t in wdw["top"]))
    if out_path:
        def write(tmp):
            if out_path.lower().endswith(".json"):
                import json
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(results, f, indent=2, allow_nan=False)
                return
            import csv
            # a file name that is not UTF-8 is written as its own bytes, as the file system holds it
            with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                w = csv.writer(f)
                w.writerow(["path", "start", "rank", "index", "mid", "name", "score"])
                for r in results:
                    # the file's rows (start empty), then each window's (start in seconds)
                    for start, tops in [("", r["top"])] + [(f"{x['start']:.3f}", x["top"]) for x in r.get("windows", [])]:
                        for t in tops:
                            w.writerow([r["path"], start, t["rank"], t["index"], t["mid"], t["name"],
                                        f"{t['score']:.6f}"])
        write_output(out_path, "--out", write)
        print(f"wrote {out_path}")
    return results


def _clip_input(src: str, T: int, stats, downmix: str = "first") -> torch.Tensor:
    from .audio import SAMPLE_RATE, waveform_to_input
    if src.startswith("synthetic:"):
        from .data import SyntheticAudioDataset
        try:
            idx = int(src.split(":", 1)[1])
        except ValueError:
            idx = -1
        if idx < 0:
            raise InputError(f"{src}: expected synthetic:N with N a clip number (0, 1, 2, ...)")
        wave = SyntheticAudioDataset(num_clips=1, split="val").clip_waveform(idx)  # not a set of idx + 1 clips
        return waveform_to_input(wave, target_length=T, stats=stats)
    wave = read_clip(src, downmix, "reconstruct takes one audio file")
    n = frames_for(wave.shape[-1])
    if n > T:
        _warn(f"{src} is {wave.shape[-1] / SAMPLE_RATE:.2f} s long; only its first {_seconds(T)} (the model input, "
              f"{T} frames) are reconstructed")
    elif n < T // 2:
        _warn(f"{src} is {wave.shape[-1] / SAMPLE_RATE:.2f} s long, less than half the model input of {_seconds(T)}: "
              "the rest is padding, which the picture and the loss include (padding is easy to predict)")
    return waveform_to_input(wave, SAMPLE_RATE, T, stats)


def _check_picture_path(path: str) -> None:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("drawing the reconstruction needs matplotlib (pip install matplotlib)") from None
    kinds = dict(FigureCanvasAgg(Figure()).get_supported_filetypes())
    import shutil
    tex = matplotlib.rcParams.get("pgf.texsystem", "xelatex")  # the one matplotlib runs for PGF
    if not shutil.which(tex):
        kinds.pop("pgf", None)
        if ext == "pgf":
            raise InputError(f"--out {path}: a PGF picture needs LaTeX ({tex}, matplotlib's pgf.texsystem), which is "
                             "not installed here; use .pdf or .svg for a vector picture")
    if ext not in kinds:
        raise InputError(f"--out {path}: " + (f"unknown picture format '.{ext}'" if ext else "no file extension")
                         + " (use one of "
                         f"{', '.join('.' + k for k in sorted(kinds))})")
    _output_folder(path, "--out")


# the audio formats the reconstruction is written in: those libsndfile writes and reads back whole,
# at the model's sample rate, by their extension (raw needs a sample format, xi and wve change the
# rate, sd2 leaves a resource file beside it, and the rest are not audio players' formats)
_AUDIO_OUTPUTS = ("wav", "flac", "ogg", "mp3", "aiff", "au", "caf", "w64", "rf64")


def _check_audio_path(path: str) -> None:
    import soundfile as sf
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    usable = [e for e in _AUDIO_OUTPUTS if e.upper() in sf.available_formats()]
    if ext not in usable:
        what = "no file extension" if not ext else (
            f"'.{ext}' is not written here" if ext.upper() in sf.available_formats() else f"unknown audio format '.{ext}'")
        raise InputError(f"--wav {path}: {what} (use {', '.join('.' + e for e in usable)})")
    _output_folder(path, "--wav")


def reconstruct(opts: Dict[str, Any]) -> str:
    """One clip -> PNG of input / masked input / reconstruction / reconstruction + visible (+ WAV)."""
    from .reconstruct import mel_to_audio, reconstruction_figure, write_wav

    ratio = float(opts.get("mask_ratio", 0.8))
    if not 0.0 < ratio < 1.0:
        raise InputError(f"--mask-ratio must be in (0, 1) for a reconstruction (some patches must be removed "
                         f"and some kept), got {ratio}")
    _check_picture_path(opts["out"])
    if opts.get("wav"):
        _check_audio_path(opts["wav"])
    with reading_once():
        sd, _, _ = read_checkpoint(opts["checkpoint"])
        if not any(k.startswith("decoder_") for k in sd):
            kind, other = ("a fine-tuned classifier", "audiomae embed and classify take it") if "head.weight" in sd \
                else ("an encoder without a decoder", "audiomae embed takes it")
            raise InputError(f"{opts['checkpoint']} is {kind}: reconstruct needs a pretraining checkpoint, whose "
                             f"decoder makes the reconstruction ({other})")
        opts = _checkpoint_options(opts, ("stats", "downmix"))
        device = _device(opts.get("device", "auto"))
        with adaptations_as_notes():
            model = AudioMAE.from_pretrained(opts["checkpoint"]).to(device).eval()
    if model.config.mask_mode == "time_frequency":
        given = opts.get("explicit_options")
        if ("mask_ratio" in given) if given is not None else ratio != 0.8:
            c = model.config
            raise InputError(f"--mask-ratio does not apply to {opts['checkpoint']}: its model masks time and frequency "
                             f"lines (--mask-mode time_frequency, {c.mask_t_prob:g} of the time lines and "
                             f"{c.mask_f_prob:g} of the frequency lines, from its config); leave it out")
    from .masking import masking_keeps_nothing
    problem = masking_keeps_nothing(model.config.grid_size, model.config.mask_mode, ratio)
    if problem:
        raise InputError(f"--mask-ratio {problem[0]}, and the reconstruction is made from the kept ones")
    T = model.config.img_size[0]
    x = _clip_input(opts["audio"], T, opts.get("stats", "audioset"), opts.get("downmix") or "first").unsqueeze(0).to(device)
    g = torch.Generator().manual_seed(int(opts.get("seed", 0)))
    cfg = model.config  # the noise the model's masking draws: per patch, or per time / frequency line
    lines = {"time": cfg.grid_size[0], "frequency": cfg.grid_size[1], "time_frequency": sum(cfg.grid_size)}
    noise = torch.rand(1, lines.get(cfg.mask_mode, cfg.num_patches), generator=g).to(device)
    with torch.no_grad():
        covered, covered_mask = model.reconstruct(x, ratio, noise=noise)
        loss = model(x, ratio, noise=noise).loss
    # frames and bins no patch covers (patch 14 on 128 bins, or overlapping patches) stay the input's
    h, w = covered.shape[-2:]
    recon, mask = x.clone(), torch.zeros_like(x)
    recon[..., :h, :w], mask[..., :h, :w] = covered, covered_mask
    write_output(opts["out"], "--out", lambda tmp: reconstruction_figure(
        x[0, 0], recon[0, 0], mask[0, 0], tmp,
        title=f"{os.path.basename(opts['audio'])}: masked-patch loss {float(loss):.3f}"))
    print(f"wrote {opts['out']} (loss on the removed patches {float(loss):.4f})")
    if opts.get("wav"):
        pasted = x[0, 0] * (1 - mask[0, 0]) + recon[0, 0] * mask[0, 0]
        wave = mel_to_audio(pasted.cpu(), opts.get("stats", "audioset"))
        write_output(opts["wav"], "--wav", lambda tmp: write_wav(tmp, wave))
        print(f"wrote {opts['wav']}")
    return opts["out"]


def _refuse_another_run(out: str, overwrite: bool) -> None:
    """A demo starts afresh in its folder: one that holds another command's run (its checkpoint, or a
    cross-validation's folds) is refused unless ``overwrite``; an earlier demo's is replaced."""
    import json
    from .train.state import LAST
    held = [n for n in (LAST, "model.pt", os.path.join("fold-1", LAST)) if os.path.isfile(os.path.join(out, n))]
    if not held or overwrite:
        return
    try:
        with open(os.path.join(out, "config.json")) as f:
            command = json.load(f).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    if command == "demo":
        return
    what = f"a {command} run" if isinstance(command, str) else "a run"
    raise InputError(f"{out} holds {what} ({held[0]}), which the demo would replace: choose another --output-dir, "
                     "or give --overwrite to replace it")


def demo(opts: Dict[str, Any]) -> Dict[str, float]:
    """The main job on the embedded dataset: pretrain a tiny Audio-MAE, draw a reconstruction, and
    linear-probe its frozen embeddings against the same encoder untrained."""
    from .data import FeatureExtractor
    from .train.loop import build_dataset, embed_dataset, linear_probe, pretrain

    import importlib.util

    out = opts["output_dir"]
    _refuse_another_run(out, bool(opts.get("overwrite")))
    t0 = time.time()
    draw = importlib.util.find_spec("matplotlib") is not None
    if not draw:
        _warn("matplotlib is not installed: the demo skips the reconstruction picture (pip install matplotlib)")
    pre = dict(opts, model="tiny", data="synthetic", blr=1e-2, weight_decay=0.05, warmup_epochs=1,
               min_lr=1e-5, accum_iter=1, mask_ratio=0.8, mask_mode="unstructured", augment=True, num_workers=0,
               stats="audioset", log_every=10, save_every_steps=0, max_nan_steps=20, precision="auto",
               resume=None, overwrite=True)  # each demo run starts afresh in its folder
    print(f"[1/3] pretraining a tiny Audio-MAE on {opts['num_clips']} synthetic clips for {opts['epochs']} epochs")
    pretrain(pre)
    ckpt = os.path.join(out, "model.pt")

    png = os.path.join(out, "reconstruction.png")
    if draw:
        print("[2/3] reconstruction of a held-out clip")
        reconstruct({"checkpoint": ckpt, "audio": "synthetic:3", "out": png, "device": opts.get("device", "auto"),
                     "seed": 0, "mask_ratio": 0.8})
    else:
        print("[2/3] reconstruction of a held-out clip: skipped (no matplotlib)")

    print("[3/3] linear probe on frozen embeddings (10 classes, chance = 10 %)")
    device = _device(opts.get("device", "auto"))
    train_set = build_dataset(pre, "train")
    val_set = build_dataset(pre, "val")
    trained = AudioMAE.from_pretrained(ckpt).to(device)
    feats = FeatureExtractor(target_length=trained.config.img_size[0], stats="audioset", device=device)
    torch.manual_seed(opts.get("seed", 0))
    untrained = AudioMAE(trained.config).to(device)
    results = {}
    for name, model in [("pretrained", trained), ("untrained", untrained)]:
        tx, ty = embed_dataset(model, train_set, pre, device, feats, desc=f"embedding ({name})")
        vx, vy = embed_dataset(model, val_set, pre, device, feats, desc=f"embedding ({name})")
        results[name] = linear_probe(tx, ty, vx, vy)["accuracy"]
    print()
    print(f"  linear-probe accuracy, pretrained encoder : {results['pretrained'] * 100:5.1f} %")
    print(f"  linear-probe accuracy, untrained encoder  : {results['untrained'] * 100:5.1f} %")
    print("  chance                                    :  10.0 %")
    print(f"  reconstruction picture: {png if draw else 'none (no matplotlib)'}   ({time.time() - t0:.0f} s in all)")
    return results
