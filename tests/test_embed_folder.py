"""`audiomae embed --out DIR/`: rows written as they are made, kept through an interruption or a
failure, continued with --resume; and the memory and disk checks of both outputs."""
import json
import os
import signal

import numpy as np
import pytest
import torch

from audiomae.cli import main

SR = 16000
DATA = ["--data", "synthetic", "--num-clips", "20", "--batch-size", "4", "--num-workers", "0", "--quiet"]


def _wavs(folder, n):
    import soundfile as sf
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        x = (0.1 * np.random.default_rng(i).standard_normal(SR * (1 + i % 3))).astype("float32")
        sf.write(str(folder / f"{i}.wav"), x, SR)
        paths.append(str(folder / f"{i}.wav"))
    return paths


def _folder(path):
    arrays = {k: np.load(path / f"{k}.npy") for k in ("embeddings", "patch_embeddings", "targets", "readable")
              if (path / f"{k}.npy").exists()}
    meta = {k: json.loads((path / f"{k}.json").read_text()) for k in ("paths", "info", "progress")}
    return arrays, meta


def test_folder_holds_the_rows_of_the_file_output(tmp_path, tiny_ckpt, capsys):
    files = _wavs(tmp_path / "audio", 7)
    assert main(["embed", *files, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "e.pt"), "--per-patch",
                 "--batch-size", "3", "--quiet"]) == 0
    assert main(["embed", *files, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "e") + "/", "--per-patch",
                 "--batch-size", "3", "--quiet"]) == 0
    assert "wrote the embeddings of 7 clips to" in capsys.readouterr().out
    ref = torch.load(tmp_path / "e.pt", weights_only=False)
    arrays, meta = _folder(tmp_path / "e")
    np.testing.assert_array_equal(arrays["embeddings"], ref["embeddings"].numpy())
    np.testing.assert_array_equal(arrays["patch_embeddings"], ref["patch_embeddings"].numpy())
    assert arrays["readable"].all() and arrays["readable"].shape == (7,) and "targets" not in arrays
    assert meta["paths"] == ref["paths"] == [os.path.abspath(f) for f in files]
    assert meta["progress"] == {"done": 7, "rows": 7, "complete": True, "unreadable": 0}
    info = meta["info"]
    assert (info["rows"], info["dim"], info["patches"], info["target_length"]) == (7, 64, 128, 256)
    assert info["checkpoint"] == os.path.abspath(tiny_ckpt) and info["format"] == "audiomae-embeddings"


def test_a_folder_of_a_dataset_keeps_a_row_per_clip(tmp_path, tiny_ckpt, capsys):
    """An unreadable clip has a row of NaN and readable False; the others are the .pt file's rows."""
    for cls, n in (("a", 3), ("b", 2)):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(n):
            import soundfile as sf
            sf.write(str(tmp_path / "ds" / cls / f"{i}.wav"),
                     (0.1 * np.random.default_rng(i).standard_normal(SR // 2)).astype("float32"), SR)
    (tmp_path / "ds" / "b" / "bad.wav").write_text("not audio")
    common = ["embed", "--checkpoint", tiny_ckpt, "--data", str(tmp_path / "ds"), "--clip-seconds", "0.5",
              "--max-bad-fraction", "1", "--num-workers", "0", "--quiet", "--batch-size", "4"]
    assert main([*common, "--out", str(tmp_path / "e.pt")]) == 0
    assert main([*common, "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "1 unreadable file: their rows are NaN and readable.npy False; 5 of 6 clips embedded" in err
    ref = torch.load(tmp_path / "e.pt", weights_only=False)
    arrays, meta = _folder(tmp_path / "e")
    names = [os.path.relpath(p, tmp_path / "ds") for p in meta["paths"]]
    bad = names.index("b/bad.wav")
    assert arrays["readable"].tolist() == [i != bad for i in range(6)]
    assert np.isnan(arrays["embeddings"][bad]).all() and np.isnan(arrays["targets"][bad]).all()
    good = arrays["readable"]
    np.testing.assert_array_equal(arrays["embeddings"][good], ref["embeddings"].numpy())
    np.testing.assert_array_equal(arrays["targets"][good], ref["targets"].numpy())
    assert [p for p, ok in zip(meta["paths"], good) if ok] == ref["paths"]
    assert meta["info"]["class_names"] == ref["class_names"] == ["a", "b"]
    assert meta["progress"]["unreadable"] == 1


class _StopAt:
    """Wraps FolderRows.write: at call ``at`` runs ``action`` (after the write, or instead of it)."""

    def __init__(self, monkeypatch, at, action, before=False):
        from audiomae import embeddings
        self.calls, self.original = 0, embeddings.FolderRows.write
        stopper = self

        def write(rows, *a, **k):
            stopper.calls += 1
            if before and stopper.calls == at:
                action()
            stopper.original(rows, *a, **k)
            if not before and stopper.calls == at:
                action()
        monkeypatch.setattr(embeddings.FolderRows, "write", write)


def _raise(e):
    def action():
        raise e
    return action


@pytest.mark.parametrize("how", ["sigint", "sigterm", "ctrl_c_in_a_batch", "error"])
def test_an_interrupted_or_failed_run_keeps_its_rows_and_resumes(how, tmp_path, tiny_ckpt, monkeypatch, capsys):
    full = tmp_path / "full.pt"
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--per-patch", "--out", str(full)]) == 0
    out = tmp_path / "part"
    with monkeypatch.context() as m:
        if how in ("sigint", "sigterm"):  # the signal while batch 3 is made: that batch is still written
            sig = signal.SIGINT if how == "sigint" else signal.SIGTERM
            _StopAt(m, 3, lambda: signal.raise_signal(sig), before=True)
            kept = 12
        elif how == "ctrl_c_in_a_batch":  # the second Ctrl-C, or one outside the handler: at once
            _StopAt(m, 3, _raise(KeyboardInterrupt()), before=True)
            kept = 8
        else:
            _StopAt(m, 3, _raise(OSError(28, "No space left on device")), before=True)
            kept = 8
        code = main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--per-patch", "--out", str(out)])
    err = capsys.readouterr().err
    progress = json.loads((out / "progress.json").read_text())
    assert progress["done"] == kept and not progress["complete"]
    if how == "error":
        assert code == 1 and "No space left on device" in err
        assert f"keeps the {kept} of 20 clips embedded so far; the same command with --resume continues" in err
    else:  # the shell's 128 + the signal's number; 143 is what a scheduler reads as a preemption
        assert code == (143 if how == "sigterm" else 130)
        assert f"interrupted after {kept} of 20 clips; {out}/ keeps them, and the same command with --resume" in err
    assert "Traceback" not in err

    # without --resume or --overwrite the folder is not touched
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--per-patch", "--out", str(out)]) == 1
    assert f"holds embeddings ({kept} of 20 rows done); --resume continues them" in capsys.readouterr().err

    with monkeypatch.context() as m:
        seen = _StopAt(m, 0, lambda: None)
        assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--per-patch", "--out", str(out), "--resume"]) == 0
    assert seen.calls == (20 - kept) // 4  # only the clips not done
    ref = torch.load(full, weights_only=False)
    arrays, meta = _folder(out)
    np.testing.assert_array_equal(arrays["embeddings"], ref["embeddings"].numpy())
    np.testing.assert_array_equal(arrays["patch_embeddings"], ref["patch_embeddings"].numpy())
    np.testing.assert_array_equal(arrays["targets"], ref["targets"].numpy())
    assert meta["progress"]["complete"] and meta["progress"]["done"] == 20


def test_resuming_audio_files_reads_only_those_not_done(tmp_path, tiny_ckpt, monkeypatch, capsys):
    import audiomae.commands as commands
    files = _wavs(tmp_path / "audio", 6)
    out = tmp_path / "e"
    with monkeypatch.context() as m:
        _StopAt(m, 2, _raise(KeyboardInterrupt()))
        assert main(["embed", *files, "--checkpoint", tiny_ckpt, "--out", str(out), "--batch-size", "2",
                     "--quiet"]) == 130
    read = []
    original = commands.read_clip
    monkeypatch.setattr(commands, "read_clip", lambda p, *a, **k: read.append(p) or original(p, *a, **k))
    assert main(["embed", *files, "--checkpoint", tiny_ckpt, "--out", str(out), "--batch-size", "2", "--quiet",
                 "--resume"]) == 0
    assert read == files[4:]  # checked once, then embedded from what the check decoded
    assert main(["embed", *files, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "all.pt"), "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"),
                                  torch.load(tmp_path / "all.pt", weights_only=False)["embeddings"].numpy())
    assert main(["embed", *files, "--checkpoint", tiny_ckpt, "--out", str(out), "--resume"]) == 0
    assert "every clip is embedded already (6 rows); nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("change,message", [
    (["--target-length", "512"], "target_length: 256 there, 512 now"),
    (["--per-patch"], "per_patch: False there, True now"),
    (["--stats", "esc50"], "stats: 'audioset' there, 'esc50' now"),
    (["--num-clips", "24"], "rows: 20 there, 24 now; source.num_clips: 20 there, 24 now"),
])
def test_resume_needs_the_same_inputs_and_options(change, message, tmp_path, tiny_ckpt, monkeypatch, capsys):
    out = tmp_path / "e"
    with monkeypatch.context() as m:
        _StopAt(m, 1, _raise(KeyboardInterrupt()))
        assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(out)]) == 130
    before = (out / "embeddings.npy").read_bytes(), (out / "progress.json").read_text()
    capsys.readouterr()
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, *change, "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert message in err and "--overwrite to start afresh" in err and "Traceback" not in err
    assert ((out / "embeddings.npy").read_bytes(), (out / "progress.json").read_text()) == before
    # --overwrite starts afresh with the new options
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, *change, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "progress.json").read_text())["complete"]


def test_folder_checks_before_any_work(tmp_path, tiny_ckpt, monkeypatch, capsys):
    import audiomae.commands as commands

    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(commands, "load_any", fail)
    files = _wavs(tmp_path / "audio", 2)
    # --resume without a folder of embeddings
    assert main(["embed", *files, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert "holds no embeddings to continue" in capsys.readouterr().err
    # a folder with other files
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    monkeypatch.undo()
    assert main(["embed", *files, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "other"), "--quiet"]) == 1
    assert "the folder holds other files (notes.txt); give a new or empty folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


@pytest.mark.parametrize("argv,message", [
    (["--out", "e.npy"], "--out e.npy: the embeddings file must end in .pt (torch) or .npz (numpy); a folder"),
    (["--out", "e.pt", "--resume"], "--resume is for a folder of embeddings (--out DIR/)"),
    (["--out", "e.npz", "--overwrite"], "--overwrite is for a folder of embeddings (--out DIR/)"),
    (["--out", "e/", "--resume", "--overwrite"], "--resume continues a folder's embeddings, --overwrite replaces"),
])
def test_bad_output_options(argv, message, tmp_path, tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["embed", "x.wav", "--checkpoint", tiny_ckpt, *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_file_output_that_does_not_fit_in_memory_is_refused(tmp_path, tiny_ckpt, monkeypatch, capsys):
    from audiomae import embeddings
    monkeypatch.setattr(embeddings, "available_memory", lambda: 100_000)
    out = tmp_path / "e.pt"
    # 20 clips x (128 patches x 64 + 64 + 10 targets) x 4 bytes
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--per-patch", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the embeddings and per-patch embeddings of 20 clips take 645.8 KiB, more than the 97.7 KiB" in err
    assert f"give a folder (--out {tmp_path / 'e'}/)" in err and not out.exists()
    # the pooled rows alone fit (20 x 64 x 4 + 20 x 10 x 4 bytes of targets)
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(out)]) == 0


def test_a_folder_that_does_not_fit_on_the_disk_is_refused(tmp_path, tiny_ckpt, monkeypatch, capsys):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 50_000, 50_000))
    out = tmp_path / "e"
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--per-patch", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the embeddings of 20 clips take 645.8 KiB on disk, 48.8 KiB is free there" in err
    assert not any(n.endswith(".npy") for n in os.listdir(out))


def test_a_second_signal_while_the_rows_are_saved_waits_for_the_save(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """A preemption often signals twice: the one that comes while the kept rows are flushed does not cut
    the save short (a second SIGTERM would end the process there, a second Ctrl-C raise in it)."""
    from audiomae import embeddings
    out = tmp_path / "e"
    _StopAt(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGTERM), before=True)
    original = embeddings.FolderRows._write_progress

    def progress(rows, complete):
        if rows.done:  # the save after the stop
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
        original(rows, complete)
    monkeypatch.setattr(embeddings.FolderRows, "_write_progress", progress)
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(out)]) == 143  # the first signal's
    assert "interrupted after 12 of 20 clips" in capsys.readouterr().err
    assert json.loads((out / "progress.json").read_text())["done"] == 12


def test_a_signal_during_a_periodic_save_stops_after_it(tmp_path, tiny_ckpt, monkeypatch, capsys):
    from audiomae import embeddings
    monkeypatch.setattr(embeddings, "FLUSH_SECONDS", 0.0)  # a save after every batch
    original, calls = embeddings.FolderRows._write_progress, []

    def progress(rows, complete):
        calls.append(rows.done)
        if rows.done == 8:
            signal.raise_signal(signal.SIGINT)
        original(rows, complete)
    monkeypatch.setattr(embeddings.FolderRows, "_write_progress", progress)
    out = tmp_path / "e"
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(out)]) == 130
    assert "interrupted after 8 of 20 clips" in capsys.readouterr().err
    assert json.loads((out / "progress.json").read_text())["done"] == 8


def _bad_dataset(tmp_path):
    import soundfile as sf
    for cls, n in (("a", 7), ("b", 6)):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(n):
            sf.write(str(tmp_path / "ds" / cls / f"{i}.wav"),
                     (0.1 * np.random.default_rng(i).standard_normal(SR // 2)).astype("float32"), SR)
    for p in ("a/3bad.wav", "b/4bad.wav"):
        (tmp_path / "ds" / p).write_text("not audio")
    return ["embed", "--checkpoint", None, "--data", str(tmp_path / "ds"), "--clip-seconds", "0.5",
            "--num-workers", "0", "--quiet", "--batch-size", "4", "--out", str(tmp_path / "e")]


def test_a_resume_is_held_to_the_bad_file_limit_and_reads_mended_files_again(tmp_path, tiny_ckpt, capsys):
    import soundfile as sf
    argv = _bad_dataset(tmp_path)
    argv[2] = tiny_ckpt
    assert main(argv) == 1  # 2 of 15 unreadable, more than the 1 % allowed
    err = capsys.readouterr().err
    assert "2 audio files could not be decoded" in err and "keeps the 12 of 15 clips embedded so far" in err
    # the clips embedded before count: the resumed run reaches the same verdict
    assert main([*argv, "--resume"]) == 1
    assert "2 audio files could not be decoded, 13.33% of the 15 clips read" in capsys.readouterr().err
    # mended, the files are read again, also the one before the rows done
    for p in ("a/3bad.wav", "b/4bad.wav"):
        sf.write(str(tmp_path / "ds" / p), (0.1 * np.random.default_rng(9).standard_normal(SR // 2)).astype("float32"),
                 SR)
    assert main([*argv, "--resume"]) == 0
    arrays, meta = _folder(tmp_path / "e")
    assert arrays["readable"].all() and np.isfinite(arrays["embeddings"]).all()
    assert main([*argv[:-1], str(tmp_path / "all.pt")]) == 0
    np.testing.assert_array_equal(arrays["embeddings"], torch.load(tmp_path / "all.pt")["embeddings"].numpy())


def test_a_finished_folder_reads_its_unreadable_clips_again_on_resume(tmp_path, tiny_ckpt, capsys):
    import soundfile as sf
    argv = _bad_dataset(tmp_path)
    argv[2] = tiny_ckpt
    argv += ["--max-bad-fraction", "1"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "e" / "progress.json").read_text())["unreadable"] == 2
    assert main([*argv, "--resume"]) == 0  # nothing mended: the same rows
    assert "2 unreadable files" in capsys.readouterr().err
    sf.write(str(tmp_path / "ds" / "a" / "3bad.wav"), np.zeros(SR // 2, dtype="float32"), SR)
    assert main([*argv, "--resume"]) == 0
    progress = json.loads((tmp_path / "e" / "progress.json").read_text())
    assert progress["complete"] and progress["unreadable"] == 1
    assert int(np.load(tmp_path / "e" / "readable.npy").sum()) == 14


def test_a_stop_in_the_last_batch_completes_the_folder(tmp_path, tiny_ckpt, monkeypatch, capsys):
    out = tmp_path / "e"
    with monkeypatch.context() as m:
        _StopAt(m, 5, lambda: signal.raise_signal(signal.SIGINT))
        assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(out)]) == 0
    assert json.loads((out / "progress.json").read_text())["complete"]
    assert "wrote the embeddings of 20 clips" in capsys.readouterr().out
    # a folder whose rows are all done but not marked complete (its run ended just then) is finished
    (out / "progress.json").write_text(json.dumps({"done": 20, "rows": 20, "complete": False, "unreadable": 0}))
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "progress.json").read_text())["complete"]
    assert "wrote the embeddings of 20 clips" in capsys.readouterr().out


def test_a_run_that_ended_while_writing_its_json_leaves_a_usable_folder(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "e"
    out.mkdir()
    (out / "info.json.tmp12345").write_text("{")
    (out / "progress.json.tmp12345").write_text("")
    assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["embeddings.npy", "info.json", "paths.json", "progress.json", "readable.npy",
                                       "targets.npy"]


def test_resume_goes_by_contents_not_names_or_times(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """A touched, copied or linked checkpoint is the same one; a manifest whose labels changed is not."""
    import shutil
    ckpt = tmp_path / "ck.pt"
    shutil.copy(tiny_ckpt, ckpt)
    out = tmp_path / "e"
    with monkeypatch.context() as m:
        _StopAt(m, 1, _raise(KeyboardInterrupt()))
        assert main(["embed", "--checkpoint", str(ckpt), *DATA, "--out", str(out)]) == 130
    os.utime(ckpt, (1, 1))
    os.symlink(ckpt, tmp_path / "link.pt")
    with monkeypatch.context() as m:
        _StopAt(m, 1, _raise(KeyboardInterrupt()))
        assert main(["embed", "--checkpoint", str(tmp_path / "link.pt"), *DATA, "--out", str(out), "--resume"]) == 130
    assert json.loads((out / "progress.json").read_text())["done"] == 8
    torch.save(torch.load(ckpt, weights_only=False) | {"extra": 1}, ckpt)
    assert main(["embed", "--checkpoint", str(ckpt), *DATA, "--out", str(out), "--resume"]) == 1
    assert "checkpoint_sha256:" in capsys.readouterr().err

    # a manifest with other labels for the same files
    files = _wavs(tmp_path / "audio", 3)
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"data": [{"wav": f, "labels": "/m/a"} for f in files]}))
    argv = ["embed", "--checkpoint", str(ckpt), "--data", str(manifest), "--labels", str(tmp_path / "labels.csv"),
            "--num-workers", "0", "--quiet", "--batch-size", "2", "--out", str(tmp_path / "m")]
    with monkeypatch.context() as m:
        _StopAt(m, 1, _raise(KeyboardInterrupt()))
        assert main(argv) == 130
    manifest.write_text(json.dumps({"data": [{"wav": f, "labels": "/m/b"} for f in files]}))
    assert main([*argv, "--resume"]) == 1
    assert "source.data_sha256:" in capsys.readouterr().err


def test_an_existing_file_without_an_extension(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "emb").write_text("mine")
    with pytest.raises(SystemExit):
        main(["embed", "x.wav", "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "emb")])
    assert "is a file, and a name without a .pt or .npz extension is taken as a folder" in capsys.readouterr().err


def test_a_resume_after_a_missing_file_of_a_manifest_comes_back(tmp_path, tiny_ckpt, capsys):
    """paths.json held a missing file's path untidied (m/../audio/3.wav) and the others tidied: once the
    file was back, the resume refused the folder as another set of clips."""
    files = _wavs(tmp_path / "audio", 4)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "m.json").write_text(json.dumps({"data": [{"wav": f"../audio/{i}.wav"} for i in range(4)]}))
    kept = (tmp_path / "kept.wav")
    os.replace(files[3], kept)
    argv = ["embed", "--checkpoint", tiny_ckpt, "--data", str(tmp_path / "m" / "m.json"), "--out",
            str(tmp_path / "e") + "/", "--max-bad-fraction", "0.5", "--batch-size", "2", "--num-workers", "0",
            "--quiet"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "e" / "progress.json").read_text())["unreadable"] == 1
    os.replace(kept, files[3])
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    progress = json.loads((tmp_path / "e" / "progress.json").read_text())
    assert progress["complete"] and progress["unreadable"] == 0


def test_a_full_disk_is_named_with_the_file_it_stopped(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """A folder's JSON on a full disk said only '[Errno 28] No space left on device' and left its
    temporary file; a .pt output's full disk said torch's 'basic_ios::clear: iostream error'."""
    import errno
    import shutil
    from collections import namedtuple
    import audiomae.embeddings as E

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "e"
    with monkeypatch.context() as m:
        m.setattr(E.json, "dump", full)
        assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(out) + "/"]) == 1
    err = capsys.readouterr().err
    assert "error: No space left on device: " in err and "info.json" in err and "Traceback" not in err
    assert not [n for n in os.listdir(out) if ".tmp" in n]

    def torch_full(*a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")

    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", torch_full)
        m.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
        assert main(["embed", "--checkpoint", tiny_ckpt, *DATA, "--out", str(tmp_path / "e.pt")]) == 1
    assert "cannot be written: No space left on device (0 bytes free where it goes)" in capsys.readouterr().err
