"""The command line: help, clear errors, a short end-to-end run, kill -9 + resume, and DDP on 2 CPUs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from audiomae.cli import main

ENV = dict(os.environ, PYTHONUNBUFFERED="1")
SMALL = ["--num-clips", "32", "--num-eval-clips", "16", "--batch-size", "8", "--num-workers", "0", "--quiet"]
SMALL_EMBED = ["--data", "synthetic", "--num-clips", "32", "--batch-size", "8", "--num-workers", "0", "--quiet"]
SMALL_EVAL = ["--num-eval-clips", "16", "--batch-size", "8", "--num-workers", "0", "--quiet"]


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "audiomae", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"audiomae {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ["pretrain", "finetune", "evaluate", "embed", "classify", "reconstruct", "demo", "info"]:
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "--blr" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--epochs", "0"], "--epochs must be at least 1"),
    (["pretrain", "--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
    (["pretrain", "--mask-ratio", "0"], "--mask-ratio must be in (0, 1)"),
    (["pretrain", "--data", "/no/such/manifest.json"], "no such file or folder"),
    (["finetune", "--pretrained", "/no/such.pt"], "--pretrained /no/such.pt: no such file"),
    (["pretrain", "--stats", "1,2,3"], "expected a name or MEAN,STD"),
    (["pretrain", "--precision", "fp8"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    (["pretrain", "--model", "gigantic"], "--model gigantic: no such preset"),
    (["pretrain", "--lr", "-1"], "--lr must be greater than 0"),
    (["pretrain", "--num-workers", "-1"], "--num-workers must be at least 0"),
    (["pretrain", "--epoch-size", "-5"], "--epoch-size must be at least 0"),
    (["pretrain", "--max-nan-steps", "-1"], "--max-nan-steps must be at least 0"),
    (["pretrain", "--clip-grad", "-1"], "--clip-grad must be at least 0"),
    (["pretrain", "--weight-decay", "-1"], "--weight-decay must be at least 0"),
    (["pretrain", "--warmup-epochs", "-1"], "--warmup-epochs must be at least 0"),
    (["pretrain", "--clip-seconds", "0.01"], "--clip-seconds must be at least 0.025 (one 25 ms frame)"),
    (["finetune", "--mask-t-prob", "1.0"], "--mask-t-prob must be in [0, 1)"),
    (["finetune", "--layer-decay", "0"], "--layer-decay must be in (0, 1]"),
    (["finetune", "--no-replacement"], "--no-replacement applies to --weighted-sampling"),
    (["finetune", "--mask-t-prob", "0.3"], "--mask-t-prob applies to --mask-2d"),
    (["pretrain", "--mask-mode", "time_frequency", "--mask-ratio", "0.5"],
     "--mask-ratio does not apply to --mask-mode time_frequency"),
    (["finetune", "--mixup-mode", "waveform", "--mixup", "2"],
     "--mixup must be in [0, 1] (a probability with --mixup-mode waveform)"),
    (["evaluate", "x.pt", "--max-bad-fraction", "1.5"], "--max-bad-fraction must be in [0, 1]"),
    (["finetune", "--eval-data", "/no/such/eval.json"], "--eval-data /no/such/eval.json: no such file"),
    (["finetune", "--data-root", "/no/such/root"], "--data-root /no/such/root: no such folder"),
    # infinities (typed, or overflowing to one) would train to NaN weights or fail deep inside
    (["pretrain", "--lr", "inf"], "--lr must be a finite number, got inf"),
    (["finetune", "--blr", "1e400"], "--blr must be a finite number, got inf"),
    (["pretrain", "--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["pretrain", "--warmup-epochs", "inf"], "--warmup-epochs must be a finite number"),
    (["pretrain", "--clip-seconds", "inf"], "--clip-seconds must be a finite number"),
    (["finetune", "--mixup", "inf"], "--mixup must be a finite number"),
    (["pretrain", "--mask-ratio", "nan"], "--mask-ratio must be in (0, 1)"),
    (["classify", "a.wav", "--checkpoint", "c.pt", "--hop", "inf"], "--hop must be a positive number of seconds"),
    (["pretrain", "--seed", "-1"], "--seed must be in [0, 2^63 - 1], got -1"),
    (["embed", "a.wav", "--checkpoint", "c.pt", "--seed", str(2 ** 64)], "--seed must be in [0, 2^63 - 1]"),
])
def test_bad_input_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_checkpoint_is_one_line_error(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    code = main(["reconstruct", "synthetic:0", "--checkpoint", str(junk), "--out", str(tmp_path / "r.png")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "junk.pt" in err


# --- input and output problems: one `error:` line, no traceback ---------------------------------
SR = 16000


def _wav(path, seconds, nan=False):
    import numpy as np
    import soundfile as sf
    x = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype("float32")
    if nan:
        x[len(x) // 2] = np.nan
    sf.write(str(path), x, SR, subtype="FLOAT" if nan else "PCM_16")
    return str(path)


def _bad_audio(kind, d):
    p = d / f"{kind}.wav"
    if kind == "missing":
        pass
    elif kind == "folder":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "not_audio":
        p.write_text("this is text, not audio\n" * 20)
    elif kind == "truncated":
        p.write_bytes(open(_wav(d / "full.wav", 1.0), "rb").read()[:30])
    elif kind == "nan":
        _wav(p, 1.0, nan=True)
    elif kind == "short":
        _wav(p, 0.005)
    return str(p)


def assert_one_error_line(err, *names):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    for name in names:
        assert name in err, err


@pytest.fixture
def no_model(monkeypatch):
    """Makes loading a model fail, to show that a command stops before any model work."""
    import audiomae.commands as commands

    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(commands, "load_any", fail)
    monkeypatch.setattr(commands.AudioMAE, "from_pretrained", fail)


BAD_AUDIO = ["missing", "folder", "empty", "not_audio", "truncated", "nan", "short"]


@pytest.mark.parametrize("kind", BAD_AUDIO)
def test_embed_bad_audio_is_one_line_error(kind, tmp_path, tiny_ckpt, no_model, capsys):
    bad = _bad_audio(kind, tmp_path)
    out = tmp_path / "e.pt"
    assert main(["embed", "--checkpoint", tiny_ckpt, bad, "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err, bad)
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("kind", ["not_audio", "short"])
def test_reconstruct_bad_audio_is_one_line_error(kind, tmp_path, tiny_ckpt, capsys):
    bad = _bad_audio(kind, tmp_path)
    out = tmp_path / "r.png"
    assert main(["reconstruct", "--checkpoint", tiny_ckpt, bad, "--out", str(out)]) == 1
    assert_one_error_line(capsys.readouterr().err, bad)
    assert not out.exists()


def test_embed_checks_every_file_before_the_model(tmp_path, tiny_ckpt, no_model, capsys):
    ok = _wav(tmp_path / "ok.wav", 1.0)
    missing, short = _bad_audio("missing", tmp_path), _bad_audio("short", tmp_path)
    out = tmp_path / "e.pt"
    assert main(["embed", "--checkpoint", tiny_ckpt, ok, missing, short, "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err, "2 of 3 audio files", missing, short, "nothing was embedded")
    assert ok not in err and not out.exists()


def test_embed_files_warns_about_cropping_and_honours_target_length(tmp_path, tiny_ckpt, capsys):
    files = [_wav(tmp_path / "a.wav", 1.0), _wav(tmp_path / "b.wav", 5.0)]
    out = tmp_path / "sub" / "e.pt"
    assert main(["embed", "--checkpoint", tiny_ckpt, *files, "--out", str(out), "--quiet", "--per-patch"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 files are longer than the model input of 2.56 s (256 frames)" in err
    z = torch.load(out, weights_only=False)
    assert z["embeddings"].shape == (2, 64) and z["patch_embeddings"].shape == (2, 16 * 8, 64)
    assert z["paths"] == [os.path.abspath(f) for f in files]

    out2 = tmp_path / "e2.npz"
    assert main(["embed", "--checkpoint", tiny_ckpt, *files, "--out", str(out2), "--quiet", "--per-patch",
                 "--target-length", "512"]) == 0
    assert "longer than the model input" not in capsys.readouterr().err
    import numpy as np
    z = np.load(out2)
    assert z["embeddings"].shape == (2, 64) and z["patch_embeddings"].shape == (2, 32 * 8, 64)

    # 17 patches, which the decoder's 4 x 4 windows do not tile: embedding needs only the encoder
    assert main(["embed", "--checkpoint", tiny_ckpt, *files, "--out", str(out2), "--quiet", "--per-patch",
                 "--target-length", "272"]) == 0
    z = np.load(out2)
    assert z["embeddings"].shape == (2, 64) and z["patch_embeddings"].shape == (2, 17 * 8, 64)
    assert np.isfinite(z["embeddings"]).all()

    assert main(["embed", "--checkpoint", tiny_ckpt, *files, "--out", str(out2), "--target-length", "8"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--target-length 8 does not fit")


def test_embed_downmix(tmp_path, tiny_ckpt):
    """A stereo file is embedded from its first channel by default (as the release reads files), from
    the channel mean with --downmix mean."""
    import numpy as np
    import soundfile as sf
    rng = np.random.default_rng(1)
    left, right = (0.1 * rng.standard_normal((2, SR))).astype("float32")
    sf.write(str(tmp_path / "st.wav"), np.stack([left, right], 1), SR, subtype="FLOAT")
    sf.write(str(tmp_path / "l.wav"), left, SR, subtype="FLOAT")
    sf.write(str(tmp_path / "m.wav"), (left + right) / 2, SR, subtype="FLOAT")
    z = {}
    for name, extra in [("st", []), ("st_mean", ["--downmix", "mean"]), ("l", []), ("m", [])]:
        out = tmp_path / f"{name}.pt"
        assert main(["embed", "--checkpoint", tiny_ckpt, str(tmp_path / (name.split("_")[0] + ".wav")), *extra,
                     "--out", str(out), "--quiet"]) == 0
        z[name] = torch.load(out, weights_only=False)["embeddings"]
    torch.testing.assert_close(z["st"], z["l"])
    torch.testing.assert_close(z["st_mean"], z["m"])
    assert not torch.allclose(z["st"], z["st_mean"])


def test_downmix_choices_are_the_audio_modules():
    from audiomae.audio import DOWNMIX_MODES
    from audiomae.cli import DOWNMIX_CHOICES
    assert DOWNMIX_CHOICES == DOWNMIX_MODES


def test_embed_synthetic_only_when_asked(tmp_path, tiny_ckpt, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["embed", "--checkpoint", tiny_ckpt])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: audiomae embed" in err and "give audio files to embed, or --data" in err
    assert not (tmp_path / "embeddings.pt").exists()
    assert main(["embed", "--checkpoint", tiny_ckpt, "--data", "synthetic", "--num-clips", "4", "--num-workers", "0",
                 "--quiet"]) == 0
    assert torch.load(tmp_path / "embeddings.pt", weights_only=False)["embeddings"].shape == (4, 64)


@pytest.mark.parametrize("extra,message", [
    (["--out", "e.txt"], "--out e.txt: the embeddings file must end in .pt (torch) or .npz (numpy)"),
    (["--stats", "bogus"], "--stats bogus: unknown normalisation statistics"),
    (["--target-length", "0"], "--target-length must be at least 1"),
    (["--data", "synthetic"], "either audio files or --data, not both"),
])
def test_embed_bad_options_rejected_before_work(extra, message, tmp_path, tiny_ckpt, no_model, capsys):
    ok = _wav(tmp_path / "ok.wav", 1.0)
    with pytest.raises(SystemExit) as e:
        main(["embed", "--checkpoint", tiny_ckpt, ok, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: audiomae embed" in err
    assert_one_error_line(err.replace("audiomae embed: error:", "error:"), message)


@pytest.mark.parametrize("argv,usage,message", [
    (["evaluate", "nope.pt"], "usage: audiomae evaluate", "checkpoint nope.pt: no such file"),
    (["finetune", "--pretr", "/no/such.pt"], "usage: audiomae finetune", "--pretr /no/such.pt: no such file"),
    (["pretrain", "-o", "x", "--epochs", "0"], "usage: audiomae pretrain", "--epochs must be at least 1"),
])
def test_errors_use_the_subcommand_usage(argv, usage, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert usage in err and message in err and "usage: audiomae [-h]" not in err
    assert "--checkpoint" not in err.split("error:")[1]


def test_reconstruct_outputs_and_mask_ratio(tmp_path, tiny_ckpt, capsys):
    ok = _wav(tmp_path / "ok.wav", 3.0)
    for ratio in ("0", "1"):
        with pytest.raises(SystemExit) as e:
            main(["reconstruct", "--checkpoint", tiny_ckpt, ok, "--mask-ratio", ratio])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "usage: audiomae reconstruct" in err and "--mask-ratio must be in (0, 1)" in err
    assert main(["reconstruct", "--checkpoint", tiny_ckpt, ok, "--out", str(tmp_path / "r.txt")]) == 1
    assert_one_error_line(capsys.readouterr().err, "--out", "r.txt", "unknown picture format")
    assert main(["reconstruct", "--checkpoint", tiny_ckpt, ok, "--wav", str(tmp_path / "r.xyz"),
                 "--out", str(tmp_path / "r.png")]) == 1
    assert_one_error_line(capsys.readouterr().err, "--wav", "unknown audio format")
    png = tmp_path / "new" / "dir" / "r.png"
    assert main(["reconstruct", "--checkpoint", tiny_ckpt, ok, "--out", str(png)]) == 0
    captured = capsys.readouterr()
    assert png.stat().st_size > 1000 and "loss on the removed patches" in captured.out and "nan" not in captured.out
    assert "only its first 2.56 s" in captured.err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["reconstruct", "--checkpoint", tiny_ckpt, ok, "--out", str(blocker / "r.png")]) == 1
    assert_one_error_line(capsys.readouterr().err, "--out", "cannot create the folder")


@pytest.mark.parametrize("ext", ["eps", "svg", "pdf"])
def test_reconstruct_pictures_hold_no_temporary_file_name(ext, tmp_path, tiny_ckpt, capsys):
    """The picture is written beside its place under another name and moved there: the name it was
    written under is in no picture (PostScript takes its title from the file's name)."""
    ok = _wav(tmp_path / "ok.wav", 3.0)
    out = tmp_path / f"r.{ext}"
    assert main(["reconstruct", "--checkpoint", tiny_ckpt, ok, "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith({"eps": b"%!PS", "svg": b"<?xml", "pdf": b"%PDF"}[ext])
    assert b".audiomae-" not in data
    assert {p.name for p in tmp_path.iterdir()} == {"ok.wav", out.name}  # and no temporary file is left


@pytest.mark.parametrize("fields", [dict(patch_size=14, decoder_mode="global"), dict(patch_stride=10)],
                         ids=["patch14", "overlapping"])
def test_reconstruct_where_patches_leave_a_border(fields, tmp_path, capsys, monkeypatch):
    """Patch 14 on 128 bins (and patches every 10) cover less than the input: the picture and the
    audio show the input there, unmasked, instead of failing on the shapes."""
    from audiomae import AudioMAE, AudioMAEConfig
    import audiomae.reconstruct as rec

    ckpt = tmp_path / "m.pt"
    model = AudioMAE(AudioMAEConfig.preset("tiny", **fields))
    model.save_pretrained(ckpt)
    seen = {}
    monkeypatch.setattr(rec, "reconstruction_figure", lambda spec, recon, mask, path, title=None: seen.update(
        spec=spec, recon=recon, mask=mask) or open(path, "wb").close())
    wav = tmp_path / "r.wav"
    assert main(["reconstruct", "--checkpoint", str(ckpt), _wav(tmp_path / "ok.wav", 2.56), "--out",
                 str(tmp_path / "r.png"), "--wav", str(wav)]) == 0
    assert "wrote" in capsys.readouterr().out and wav.stat().st_size > 1000
    spec, recon, mask = seen["spec"], seen["recon"], seen["mask"]
    assert spec.shape == recon.shape == mask.shape == (256, 128)
    h, w = model.reconstruct(spec[None, None], noise=torch.rand(1, model.config.num_patches))[0].shape[-2:]
    assert (h, w) == ((252, 126) if "patch_size" in fields else (256, 126))
    assert torch.equal(recon[:, w:], spec[:, w:]) and torch.equal(recon[h:], spec[h:])
    assert float(mask[:, w:].abs().sum()) == 0 and float(mask[h:].abs().sum()) == 0
    assert 0.5 < float(mask[:h, :w].mean()) < 1.0  # 80 % of the patches removed


COMMANDS = ["pretrain", "finetune", "evaluate", "embed", "classify", "reconstruct", "demo", "info"]


def test_every_option_has_help_and_shows_its_default():
    import argparse
    from audiomae.cli import build_parser, _command_parser
    parser = build_parser()
    for cmd in COMMANDS:
        sub = _command_parser(parser, cmd)
        assert sub.description, cmd
        fmt = sub.formatter_class(prog=cmd)
        for a in sub._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, (cmd, a.dest)
            if a.option_strings and a.default is not None and a.nargs != 0:
                assert "default" in fmt._get_help_string(a), (cmd, a.dest)


def test_help_texts(capsys):
    def helptext(cmd):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        return " ".join(capsys.readouterr().out.split())

    text = helptext("pretrain")
    assert "mask 80 % of the" in text and "%%" not in text
    assert "--mask-ratio MASK_RATIO fraction of the patches removed, in (0, 1) (default: 0.8)" in text
    evaluate, embed = helptext("evaluate"), helptext("embed")
    for gone in ("--num-clips", "--eval-data", "synthetic training clips"):
        assert gone not in evaluate
    for gone in ("--num-eval-clips", "--eval-data", "--output-dir", "synthetic training clips"):
        assert gone not in embed
    assert "nothing is embedded and the error lists them" in embed
    assert "(default: the checkpoint's input length" in embed
    assert "(default: reconstruction.png)" in helptext("reconstruct")
    assert "(default: runs/demo)" in helptext("demo")


def test_end_to_end(tmp_path):
    pre = tmp_path / "pre"
    run_cli("pretrain", "--epochs", "1", "-o", str(pre), *SMALL)
    assert (pre / "model.pt").exists() and (pre / "checkpoint-last.pt").exists()
    cfg = json.loads((pre / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["batch_size"] == 8
    rec = [json.loads(l) for l in (pre / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == 4 and all(math_ok(r["loss"]) for r in rec)
    # AdamW's betas as in the release: (0.9, 0.95) for pretraining, PyTorch's default for fine-tuning
    state = torch.load(pre / "checkpoint-last.pt", weights_only=False)
    assert {tuple(g["betas"]) for g in state["optimizer"]["param_groups"]} == {(0.9, 0.95)}

    png, wav = tmp_path / "r.png", tmp_path / "r.wav"
    run_cli("reconstruct", "synthetic:1", "--checkpoint", str(pre / "model.pt"), "--out", str(png), "--wav", str(wav))
    assert png.stat().st_size > 10_000 and wav.stat().st_size > 10_000

    emb = tmp_path / "e.npz"
    run_cli("embed", "--checkpoint", str(pre / "model.pt"), "--out", str(emb), *SMALL_EMBED)
    import numpy as np
    z = np.load(emb)
    assert z["embeddings"].shape == (32, 64) and z["targets"].shape == (32, 10)
    assert z["indices"].tolist() == list(range(32)) and len(z["paths"]) == 32

    ft = tmp_path / "ft"
    run_cli("finetune", "--pretrained", str(pre / "model.pt"), "--epochs", "1", "-o", str(ft), "--mask-2d", *SMALL)
    assert (ft / "checkpoint-best.pt").exists() and (ft / "best_report.csv").exists()
    state = torch.load(ft / "checkpoint-last.pt", weights_only=False)
    assert {tuple(g["betas"]) for g in state["optimizer"]["param_groups"]} == {(0.9, 0.999)}

    ev = tmp_path / "ev"
    out = run_cli("evaluate", str(ft / "checkpoint-best.pt"), "-o", str(ev), *SMALL_EVAL).stdout
    assert "accuracy" in out
    metrics = json.loads((ev / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert len((ev / "report.csv").read_text().splitlines()) == 11  # header + 10 classes

    # repeat a run from its saved config
    again = tmp_path / "again"
    run_cli("pretrain", "--config", str(pre / "config.json"), "-o", str(again))
    assert json.loads((again / "config.json").read_text())["num_clips"] == 32


def math_ok(x):
    return x == x and abs(x) < 1e6


def test_kill_9_then_resume_auto_matches_straight_run(tmp_path):
    args = ["pretrain", "--epochs", "2", "--num-clips", "64", "--batch-size", "8", "--num-workers", "0", "--quiet",
            "--save-every-steps", "1"]
    straight = tmp_path / "straight"
    run_cli(*args, "-o", str(straight))
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "audiomae", *args, "-o", str(crashed)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = crashed / "checkpoint-last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            step = torch.load(ckpt, weights_only=True)["step"]
            if step >= 3:
                break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (crashed / "model.pt").exists()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 3 <= killed_at < 16
    out = run_cli(*args, "-o", str(crashed), "--resume", "auto").stdout
    assert f"step {killed_at}" in out
    a = torch.load(straight / "model.pt", weights_only=True)["model"]
    b = torch.load(crashed / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(tmp_path, sig):
    """SIGINT to the whole process group (as Ctrl-C in a terminal, loader workers included), or SIGTERM
    (a scheduler preempting the job), in the first epoch of a run without --save-every-steps: the step
    ends, a checkpoint of it is written, and --resume auto ends with the weights of a run never
    interrupted. Before, the work since the last epoch end was lost, and with no checkpoint
    --resume auto started afresh without a word."""
    args = ["pretrain", "--epochs", "2", "--num-clips", "192", "--batch-size", "8", "--num-workers", "1", "--quiet",
            "--log-every", "1"]
    straight = tmp_path / "straight"
    run_cli(*args, "-o", str(straight))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "audiomae", *args, "-o", str(run)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    os.killpg(proc.pid, getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0 and (run / "model.pt").exists():
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + getattr(signal, sig), err  # 130 or 143, as the shell's convention has it
    state = torch.load(run / "checkpoint-last.pt", weights_only=False)
    # mostly mid-epoch 1 (24 steps per epoch); on a busy machine the signal may land later, not at the end
    assert 3 <= state["step"] < 48
    assert f"interrupted after step {state['step']}, checkpoint written" in err and "Traceback" not in err
    assert not (run / "model.pt").exists()
    out = run_cli(*args, "-o", str(run), "--resume", "auto").stdout
    assert f"step {state['step']}" in out
    a = torch.load(straight / "model.pt", weights_only=True)["model"]
    b = torch.load(run / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_without_a_checkpoint_says_so(tmp_path):
    out = run_cli("pretrain", "--epochs", "1", *SMALL, "-o", str(tmp_path / "r"), "--resume", "auto").stderr
    assert "no checkpoint in" in out and "starting from the beginning" in out


def _torchrun(script: str, port: int, out) -> subprocess.CompletedProcess:
    """``script`` (in tests/scripts) launched by torchrun as 2 CPU processes, with ``out`` as its folder."""
    path = os.path.join(os.path.dirname(__file__), "scripts", script)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), path, str(out)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_ddp_two_cpu_processes_agree(tmp_path):
    proc = _torchrun("ddp_agree.py", 29533, tmp_path)
    assert "ranks agree" in proc.stdout and "resume and evaluation per rank ok" in proc.stdout
    state = torch.load(tmp_path / "checkpoint-last.pt", weights_only=True)
    assert state["step"] == 8  # 2 epochs of 32 clips / (2 ranks x batch 4), the second after a resume


def test_ddp_a_signal_to_one_process_stops_all_after_the_same_step(tmp_path):
    proc = _torchrun("ddp_interrupt.py", 29534, tmp_path)
    assert "interrupted together at step 3 twice, resumed exactly" in proc.stdout


def test_embed_dataset_leaves_unreadable_files_out(tmp_path, tiny_ckpt, capsys):
    from audiomae.cli import main

    for cls, n in (("a", 3), ("b", 2)):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(n):
            _wav(tmp_path / "ds" / cls / f"{i}.wav", 0.5)
    (tmp_path / "ds" / "b" / "bad.wav").write_text("not audio")
    out = tmp_path / "e.pt"
    assert main(["embed", "--checkpoint", tiny_ckpt, "--data", str(tmp_path / "ds"), "--clip-seconds", "0.5",
                 "--max-bad-fraction", "1", "--out", str(out), "--num-workers", "0", "--quiet"]) in (0, None)
    z = torch.load(out)
    names = [os.path.relpath(p, tmp_path / "ds") for p in z["paths"]]
    assert z["embeddings"].shape[0] == z["targets"].shape[0] == 5 and "b/bad.wav" not in names
    assert sorted(names) == ["a/0.wav", "a/1.wav", "a/2.wav", "b/0.wav", "b/1.wav"]
    assert z["targets"].sum(0).tolist() == [3, 2]
    assert "1 unreadable file left out: 5 of 6 clips embedded" in capsys.readouterr().err


TINY_RUN = ["--num-clips", "16", "--num-eval-clips", "8", "--batch-size", "8", "--epochs", "1", "--num-workers", "0",
            "--quiet"]


def test_a_new_run_does_not_replace_another_runs_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["pretrain", "-o", out, *TINY_RUN]) == 0
    ckpt = os.path.join(out, "checkpoint-last.pt")
    before = os.path.getmtime(ckpt), (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["pretrain", "-o", out, *TINY_RUN, "--num-clips", "24"]) == 1
    err = capsys.readouterr().err
    assert "holds a run" in err and "--resume auto" in err and "--overwrite" in err and "Traceback" not in err
    assert (os.path.getmtime(ckpt), (tmp_path / "run" / "metrics.jsonl").read_text()) == before  # untouched
    assert main(["pretrain", "-o", out, *TINY_RUN, "--resume", "auto"]) == 0  # continuing is fine
    assert "nothing to train: the run had finished its 1 epochs (step 2)" in capsys.readouterr().out
    assert main(["pretrain", "-o", out, *TINY_RUN, "--overwrite"]) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # one record of the new run: the old run's log went with its checkpoint
    # a run that crashed before its first checkpoint left a log: --overwrite clears it too
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "metrics.jsonl").write_text('{"phase": "train", "step": 1, "loss": 1.0}\n')
    assert main(["pretrain", "-o", str(crashed), *TINY_RUN, "--overwrite"]) == 0
    assert [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()] == [2]


def test_overwrite_keeps_the_old_run_until_the_new_one_has_started(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "-o", str(out), *TINY_RUN]) == 0
    kept = {n: (out / n).read_bytes() for n in ("checkpoint-last.pt", "model.pt", "metrics.jsonl", "config.json")}
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    capsys.readouterr()
    # an input refused (a file that is no checkpoint, a masking that removes nothing): the old run stays
    for bad in (["--init", str(junk)], ["--mask-mode", "time_frequency", "--mask-t-prob", "0", "--mask-f-prob", "0"]):
        assert main(["pretrain", "-o", str(out), *TINY_RUN, "--overwrite", *bad]) == 1
        assert "Traceback" not in capsys.readouterr().err
        assert {n: (out / n).read_bytes() for n in kept} == kept
    with pytest.raises(SystemExit):
        main(["pretrain", "-o", str(out), *TINY_RUN, "--overwrite", "--resume", "auto"])
    assert "--resume continues a run, --overwrite starts afresh in its folder: give one" in capsys.readouterr().err
    for name in ("metrics.json", "report.csv", "evaluate-config.json"):  # an evaluation of the old run's model
        (out / name).write_text("{}")
    assert main(["pretrain", "-o", str(out), *TINY_RUN, "--overwrite", "--seed", "1"]) == 0
    assert (out / "checkpoint-last.pt").read_bytes() != kept["checkpoint-last.pt"]
    assert not any((out / n).exists() for n in ("metrics.json", "report.csv", "evaluate-config.json"))


def test_resume_from_an_unfitting_checkpoint_is_one_line_error(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["pretrain", "-o", out, *TINY_RUN]) == 0
    ckpt = os.path.join(out, "checkpoint-last.pt")
    capsys.readouterr()
    assert main(["finetune", "-o", str(tmp_path / "ft"), *TINY_RUN, "--resume", ckpt]) == 1
    err = capsys.readouterr().err
    assert "checkpoint of AudioMAE" in err and "AudioMAEClassifier" in err and "Traceback" not in err
    before = (tmp_path / "run" / "config.json").read_text()
    assert main(["pretrain", "-o", out, *TINY_RUN, "--resume", "auto", "--model", "small"]) == 1
    err = capsys.readouterr().err
    assert "does not fit this run" in err and "config.json" in err and "Traceback" not in err
    assert (tmp_path / "run" / "config.json").read_text() == before  # a refused start leaves the run's config
    assert main(["pretrain", "-o", out, *TINY_RUN[2:], "--num-clips", "24", "--resume", "auto"]) == 1
    assert "steps per epoch" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").read_text() == before
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert main(["pretrain", "-o", str(tmp_path / "j"), *TINY_RUN, "--resume", str(junk)]) == 1
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "weights_only" not in err


def test_model_that_cannot_take_the_input_length_is_one_line_error(tmp_path, capsys):
    assert main(["pretrain", "-o", str(tmp_path / "r"), *TINY_RUN, "--target-length", "100"]) == 1
    err = capsys.readouterr().err
    assert "input of 100 frames" in err and "Traceback" not in err
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    assert main(["finetune", "-o", str(tmp_path / "f"), *TINY_RUN, "--pretrained", str(junk)]) == 1
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "frames" not in err  # a checkpoint error, as it is


def test_model_preset_names_of_the_release_are_accepted(tmp_path):
    from audiomae.cli import _check, _command_parser, build_parser

    parser = build_parser()
    for name in ("base", "vit_base_patch16", "B"):
        argv = ["pretrain", "--model", name]
        sub = _command_parser(parser, "pretrain")
        _check(vars(parser.parse_args(argv)), sub, "pretrain", argv)  # no SystemExit


def test_config_loses_to_abbreviated_options(tmp_path):
    from audiomae.cli import _command_parser, _options, build_parser

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"batch_size": 8, "epochs": 3}))
    parser = build_parser()
    argv = ["pretrain", "--config", str(cfg), "--batch", "16"]
    opts = _options(parser.parse_args(argv), _command_parser(parser, "pretrain"), argv)
    assert opts["batch_size"] == 16 and opts["epochs"] == 3


def _wav16(path, seconds=0.3, freq=440.0):
    import numpy as np
    import soundfile as sf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t), 16000, subtype="PCM_16")


def _class_folders(root, classes, per_class=4):
    for k, c in enumerate(classes):
        for i in range(per_class):
            _wav16(os.path.join(root, c, f"{i}.wav"), freq=200.0 * (k + 1) + 10 * i)


def test_finetune_without_eval_data_warns_that_it_scores_the_training_set(tmp_path, capsys):
    _class_folders(str(tmp_path / "tr"), ["a", "b"])
    assert main(["finetune", "--data", str(tmp_path / "tr"), "--clip-seconds", "0.64", "-o", str(tmp_path / "ft"),
                 *TINY_RUN]) == 0
    assert "measured on the training data" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tmp_path / "tr"), "--eval-data", str(tmp_path / "tr"), "--clip-seconds",
                 "0.64", "-o", str(tmp_path / "ft2"), *TINY_RUN]) == 0
    assert "measured on the training data" not in capsys.readouterr().err


def test_finetune_refuses_evaluation_classes_that_differ(tmp_path, capsys):
    _class_folders(str(tmp_path / "tr"), ["a", "b", "c"])
    _class_folders(str(tmp_path / "ev"), ["a", "c", "z"])
    code = main(["finetune", "--data", str(tmp_path / "tr"), "--eval-data", str(tmp_path / "ev"), "--clip-seconds",
                 "0.64", "-o", str(tmp_path / "ft"), *TINY_RUN])
    err = capsys.readouterr().err
    assert code == 1 and "classes differ" in err and "only in training: b" in err and "z" in err


def test_single_label_manifest(tmp_path, capsys):
    """An ESC-50-style manifest (one label per clip): --single-label trains with cross-entropy and
    reports accuracy; without it, a note says so."""
    lines = ["index,mid,display_name"] + [f"{k},/m/{c},{c}" for k, c in enumerate("abc")]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    entries = []
    for k, c in enumerate("abc"):
        for i in range(4):
            p = str(tmp_path / "audio" / f"{c}{i}.wav")
            _wav16(p, freq=200.0 * (k + 1) + 10 * i)
            entries.append({"wav": f"audio/{c}{i}.wav", "labels": f"/m/{c}"})
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    data = ["--data", str(tmp_path / "m.json"), "--labels", str(tmp_path / "labels.csv"), "--clip-seconds", "0.64"]
    assert main(["finetune", *data, "-o", str(tmp_path / "ml"), *TINY_RUN]) == 0
    captured = capsys.readouterr()
    assert "pass --single-label" in captured.err and "mAP" in captured.out
    assert main(["finetune", *data, "--single-label", "-o", str(tmp_path / "sl"), *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "--single-label" not in out
    assert main(["finetune", *data, "--label-smoothing", "0.1", "-o", str(tmp_path / "ls"), *TINY_RUN]) == 1
    assert_one_error_line(capsys.readouterr().err, "--label-smoothing applies to single-label data")
    assert main(["finetune", *data, "--single-label", "--label-smoothing", "0.1", "-o", str(tmp_path / "ls"),
                 *TINY_RUN]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "sl" / "checkpoint-best.pt"), *data, "--single-label", "-o",
                 str(tmp_path / "ev"), "--num-workers", "0", "--quiet"]) == 0
    assert "accuracy" in json.loads((tmp_path / "ev" / "metrics.json").read_text())
    # a checkpoint fine-tuned single-label is evaluated so without the flag
    assert main(["evaluate", str(tmp_path / "sl" / "model.pt"), *data, "-o", str(tmp_path / "ev2"),
                 "--num-workers", "0", "--quiet"]) == 0
    assert "accuracy" in json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    # classes are told by their mids: reworded display names are the same classes, the same names
    # on other mids are not (they used to be scored against the wrong classes)
    (tmp_path / "renamed.csv").write_text("index,mid,display_name\n0,/m/a,A (renamed)\n1,/m/b,B\n2,/m/c,C\n")
    (tmp_path / "swapped.csv").write_text("index,mid,display_name\n0,/m/b,a\n1,/m/a,b\n2,/m/c,c\n")
    capsys.readouterr()
    for csv_name, ok in (("renamed.csv", True), ("swapped.csv", False)):
        code = main(["evaluate", str(tmp_path / "sl" / "model.pt"), "--data", str(tmp_path / "m.json"), "--labels",
                     str(tmp_path / csv_name), "--clip-seconds", "0.64", "-o", str(tmp_path / "ev3"),
                     "--num-workers", "0", "--quiet"])
        err = capsys.readouterr().err
        assert (code == 0) == ok, err
        if not ok:
            assert "the training classes in another order" in err


def test_evaluate_refuses_data_with_other_classes_than_the_checkpoints(tmp_path, capsys):
    _class_folders(str(tmp_path / "tr"), ["a", "b", "c"])
    _class_folders(str(tmp_path / "other"), ["a", "b", "d"])
    assert main(["finetune", "--data", str(tmp_path / "tr"), "--clip-seconds", "0.64", "-o", str(tmp_path / "ft"),
                 *TINY_RUN]) == 0
    for ckpt in ("checkpoint-best.pt", "model.pt"):
        capsys.readouterr()
        code = main(["evaluate", str(tmp_path / "ft" / ckpt), "--data", str(tmp_path / "other"), "--clip-seconds",
                     "0.64", "-o", str(tmp_path / "ev"), "--num-workers", "0", "--quiet"])
        err = capsys.readouterr().err
        assert code == 1 and "classes differ" in err and "only in training: c" in err, ckpt
    assert main(["evaluate", str(tmp_path / "ft" / "model.pt"), "--data", str(tmp_path / "tr"), "--clip-seconds",
                 "0.64", "-o", str(tmp_path / "ev"), "--num-workers", "0", "--quiet"]) == 0
    # class folders have names only: a manifest whose label CSV names the same classes is their data
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/x,a\n1,/m/y,b\n2,/m/z,c\n")
    entries = [{"wav": os.path.join(str(tmp_path / "tr"), c, "0.wav"), "labels": m} for c, m in zip("abc", "xyz")]
    (tmp_path / "m.json").write_text(json.dumps({"data": [dict(e, labels="/m/" + e["labels"]) for e in entries]}))
    assert main(["evaluate", str(tmp_path / "ft" / "model.pt"), "--data", str(tmp_path / "m.json"), "--labels",
                 str(tmp_path / "labels.csv"), "--single-label", "--clip-seconds", "0.64", "-o", str(tmp_path / "ev4"),
                 "--num-workers", "0", "--quiet"]) == 0, capsys.readouterr().err


def test_finetune_waveform_mixup_mode(tmp_path, monkeypatch):
    """--mixup-mode waveform mixes the clips (with their lengths) before the fbank, not the batch after."""
    import audiomae.data as data_mod
    calls = {"waveform": [], "batch": 0}
    real = data_mod.waveform_mixup

    def spy(w, y, prob, lengths=None, **kw):
        calls["waveform"].append((w.dim(), prob, lengths is not None))
        return real(w, y, prob=prob, lengths=lengths, **kw)

    def no_batch_mixup(*a, **k):
        calls["batch"] += 1
        raise AssertionError("batch mixup in waveform mode")

    gains = []
    real_rm = data_mod.roll_and_magnitude

    def rm_spy(w, *a, roll=True, lengths=None, **kw):
        gains.append((roll, lengths is not None))
        return real_rm(w, *a, roll=roll, lengths=lengths, **kw)

    monkeypatch.setattr(data_mod, "waveform_mixup", spy)
    monkeypatch.setattr(data_mod, "mixup", no_batch_mixup)
    monkeypatch.setattr(data_mod, "roll_and_magnitude", rm_spy)
    assert main(["finetune", "--mixup-mode", "waveform", "--mixup", "0.5", "-o", str(tmp_path / "ft"), *TINY_RUN]) == 0
    assert calls["waveform"] and all(c == (2, 0.5, True) for c in calls["waveform"]) and calls["batch"] == 0
    assert gains == []  # --roll-mag off by default
    assert main(["finetune", "--roll-mag", "gain", "--mixup", "0", "-o", str(tmp_path / "ft2"), *TINY_RUN]) == 0
    assert gains and all(g == (False, True) for g in gains)  # the release's: gain only, within each clip
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["mixup_mode"] == "waveform"


def test_evaluate_embed_and_reconstruct_take_the_checkpoints_input_options(tmp_path, capsys):
    """A model trained with other statistics, clip length and downmix is scored, embedded and
    reconstructed with those unless told otherwise (before, the defaults silently changed the inputs)."""
    _class_folders(str(tmp_path / "tr"), ["a", "b", "c"])
    trained = ["--stats", "0,0.2", "--clip-seconds", "0.64", "--downmix", "mean"]
    assert main(["finetune", "--data", str(tmp_path / "tr"), *trained, "-o", str(tmp_path / "ft"), *TINY_RUN]) == 0
    ckpt = str(tmp_path / "ft" / "checkpoint-best.pt")
    capsys.readouterr()
    scores = {}
    for name, extra in [("same", trained), ("inherited", [])]:
        out = tmp_path / f"ev-{name}"
        assert main(["evaluate", ckpt, "--data", str(tmp_path / "tr"), *extra, "-o", str(out), "--quiet",
                     "--num-workers", "0"]) == 0
        scores[name] = json.loads((out / "metrics.json").read_text())
        text = capsys.readouterr().err
        if name == "inherited":
            assert "was trained with --stats 0,0.2, --clip-seconds 0.64, --downmix mean; using the same" in text
    assert scores["same"] == scores["inherited"]  # (a one-epoch model: the embeddings below tell them apart)
    # an explicit option still wins, and changes the inputs
    assert main(["evaluate", ckpt, "--data", str(tmp_path / "tr"), "--stats", "audioset", "-o", str(tmp_path / "ev3"),
                 "--quiet", "--num-workers", "0"]) == 0
    assert "was trained with --clip-seconds 0.64, --downmix mean; using the same" in capsys.readouterr().err
    # embed: the same embeddings with and without the options
    emb = {}
    for name, extra in [("same", trained), ("inherited", []), ("other", ["--stats", "audioset"])]:
        out = tmp_path / f"{name}.pt"
        assert main(["embed", "--checkpoint", ckpt, "--data", str(tmp_path / "tr"), *extra, "--out", str(out),
                     "--quiet", "--num-workers", "0"]) == 0
        emb[name] = torch.load(out, weights_only=False)["embeddings"]
    torch.testing.assert_close(emb["same"], emb["inherited"], rtol=0, atol=0)
    assert not torch.allclose(emb["same"], emb["other"])


def test_inherit_run_options():
    from audiomae.train.loop import inherit_run_options
    args = {"stats": [0.0, 0.2], "clip_seconds": 0.64, "downmix": "mean", "single_label": True, "target_length": None}
    cfg = {"img_size": [64, 128]}
    # from the CLI: only the typed options count as given
    opts = {"stats": "audioset", "clip_seconds": None, "downmix": "first", "single_label": False,
            "target_length": None, "explicit_options": ["downmix"]}
    got, changed = inherit_run_options(opts, args, cfg)
    assert got["stats"] == (0.0, 0.2) and got["clip_seconds"] == 0.64 and got["downmix"] == "first"
    assert got["single_label"] is True and got["target_length"] == 64
    assert set(changed) == {"stats", "clip_seconds", "single_label"}
    # from Python: what is not None is given
    got, _ = inherit_run_options({"stats": "esc50", "clip_seconds": None}, args, cfg)
    assert got["stats"] == "esc50" and got["clip_seconds"] == 0.64
    # the release's argparse.Namespace: its dataset names the statistics
    import argparse
    got, changed = inherit_run_options({"explicit_options": []}, argparse.Namespace(dataset="esc50", blr=1e-3), None)
    assert got["stats"] == "esc50" and changed == {"stats": "esc50"}
    assert inherit_run_options({"stats": "audioset", "explicit_options": []}, None, None)[0]["stats"] == "audioset"


def test_classifier_commands_need_the_manifests_labels(tmp_path, capsys):
    """A manifest without --labels has no classes: finetune and evaluate say so (before, finetune
    trained a 0-class head, printed 'mAP nan' and exited 0)."""
    entries = []
    for i in range(4):
        _wav16(str(tmp_path / "audio" / f"{i}.wav"), freq=300.0 + 50 * i)
        entries.append({"wav": f"audio/{i}.wav", "labels": "/m/a"})
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    data = ["--data", str(tmp_path / "m.json"), "--clip-seconds", "0.64"]
    assert main(["finetune", *data, "-o", str(tmp_path / "ft"), *TINY_RUN]) == 1
    assert_one_error_line(capsys.readouterr().err, "its clips have no classes; a manifest needs its class-label CSV")
    assert not (tmp_path / "ft" / "checkpoint-best.pt").exists()
    from audiomae import AudioMAEClassifier, AudioMAEConfig
    AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=1).save_pretrained(tmp_path / "c.pt")
    assert main(["evaluate", str(tmp_path / "c.pt"), *data, "-o", str(tmp_path / "ev"), "--quiet"]) == 1
    assert_one_error_line(capsys.readouterr().err, "its clips have no classes")
    # embedding needs no classes, but says why the targets are empty
    assert main(["embed", "--checkpoint", str(tmp_path / "c.pt"), *data, "--out", str(tmp_path / "e.pt"),
                 "--quiet", "--num-workers", "0"]) == 0
    assert "its clips have no classes, so the targets are empty; a manifest's labels are read with its " \
        "class-label CSV (--labels" in capsys.readouterr().err
    assert torch.load(tmp_path / "e.pt", weights_only=False)["targets"].shape == (4, 0)
    # evaluation data without its labels, against a model with classes
    AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=2).save_pretrained(
        tmp_path / "c2.pt", args={"class_names": ["a", "b"]})
    assert main(["evaluate", str(tmp_path / "c2.pt"), *data, "-o", str(tmp_path / "ev2"), "--quiet"]) == 1


def test_unusable_run_folder_and_backend_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for cmd in (["pretrain"], ["finetune"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "-o", str(tmp_path / "afile" / "sub")])
        assert e.value.code == 2
        assert f"cannot make it: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "-o", str(tmp_path / "afile")])
    assert "exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a usage error leaves no run folder behind
        main(["finetune", "--data-root", str(tmp_path / "nowhere"), "-o", str(tmp_path / "new" / "run")])
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "new").exists()
    if not torch.cuda.is_available():
        from audiomae import dispatch
        with dispatch.use_backend(None):  # main() forces the backend process-wide; undone here
            code = main(["pretrain", "--backend", "cuda", "-o", str(tmp_path / "r"), *SMALL, "--epochs", "1"])
        assert dispatch.forced_backend("window_attention") in (None, "auto") or os.environ.get("AUDIOMAE_BACKEND")
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert_one_error_line(err, "--backend cuda: it cannot run here (")
        assert "--backend auto (the default) runs each op where it can" in err
        assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_pretrain_init_applies_the_objective_options_and_refuses_another_architecture(tmp_path, capsys):
    """--init keeps the file's architecture; the mask ratio, mask mode and loss options given apply
    (before, all of them were silently dropped)."""
    first = tmp_path / "a"
    assert main(["pretrain", "-o", str(first), *TINY_RUN]) == 0
    second = tmp_path / "b"
    assert main(["pretrain", "--init", str(first / "model.pt"), "--mask-ratio", "0.5", "--no-norm-pix-loss",
                 "--mask-mode", "time", "-o", str(second), *TINY_RUN]) == 0
    cfg = torch.load(second / "model.pt", weights_only=False)["config"]
    assert cfg["mask_ratio"] == 0.5 and cfg["norm_pix_loss"] is False and cfg["mask_mode"] == "time"
    third = tmp_path / "t"
    assert main(["pretrain", "--init", str(first / "model.pt"), "--mask-mode", "time_frequency", "--mask-t-prob", "0.5",
                 "-o", str(third), *TINY_RUN]) == 0
    cfg = torch.load(third / "model.pt", weights_only=False)["config"]
    assert cfg["mask_mode"] == "time_frequency" and cfg["mask_t_prob"] == 0.5 and cfg["mask_f_prob"] == 0.3  # the file's
    capsys.readouterr()
    code = main(["pretrain", "--init", str(first / "model.pt"), "--model", "base", "--decoder-mode", "global",
                 "-o", str(tmp_path / "c"), *TINY_RUN])
    assert code == 1
    assert_one_error_line(capsys.readouterr().err, "--model base and --decoder-mode global cannot apply to it")


def test_pretrain_eval_data_logs_a_held_out_loss_and_leaves_training_alone(tmp_path, capsys):
    """--eval-data gives pretraining a held-out masked-patch loss after each epoch (before, the option
    was accepted and did nothing); the training itself, random draws included, is unchanged."""
    run = ["--num-clips", "16", "--batch-size", "8", "--epochs", "2", "--num-workers", "0", "--quiet"]
    assert main(["pretrain", "-o", str(tmp_path / "plain"), *run]) == 0
    assert main(["pretrain", "-o", str(tmp_path / "ev"), "--eval-data", "synthetic", "--num-eval-clips", "6",
                 *run]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: held-out masked-patch loss" in out and "epoch 2: held-out masked-patch loss" in out
    recs = [json.loads(l) for l in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["phase"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2] and all(math_ok(r["loss"]) for r in evals)
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ev" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_options_the_command_does_not_take_are_named(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": 1, "bogus_opt": 3, "explicit_options": [], "pretrained": "x.pt"}))
    assert main(["pretrain", "--config", str(cfg), "-o", str(tmp_path / "r"), *SMALL]) == 0
    err = capsys.readouterr().err
    assert "2 options that 'pretrain' does not take left out: bogus_opt, pretrained" in err


def test_embed_refuses_several_processes(tmp_path, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["embed", "--checkpoint", tiny_ckpt, *SMALL_EMBED, "--out", str(tmp_path / "e.pt")]) == 1
    assert_one_error_line(capsys.readouterr().err, "embed runs in one process")


def test_finetune_cross_validation_over_fold_manifests(tmp_path, capsys):
    """--cv-folds K: one fine-tuning per fold on the recipes' per-fold manifests, the mean and spread
    of the folds' best scores in cv.json; --resume auto goes over finished folds at once."""
    lines = ["index,mid,display_name"] + [f"{k},/m/{c},{c}" for k, c in enumerate("ab")]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    clips = {}
    for fold in (1, 2):
        clips[fold] = []
        for k, c in enumerate("ab"):
            for i in range(3):
                p = f"audio/{fold}{c}{i}.wav"
                _wav16(str(tmp_path / p), freq=250.0 * (k + 1) + 20 * i + 5 * fold)
                clips[fold].append({"wav": p, "labels": f"/m/{c}"})
    for fold in (1, 2):
        other = 2 if fold == 1 else 1
        (tmp_path / f"train_{fold}.json").write_text(json.dumps({"data": clips[other]}))
        (tmp_path / f"eval_{fold}.json").write_text(json.dumps({"data": clips[fold]}))
    args = ["finetune", "--cv-folds", "2", "--data", str(tmp_path / "train_{fold}.json"), "--eval-data",
            str(tmp_path / "eval_{fold}.json"), "--labels", str(tmp_path / "labels.csv"), "--single-label",
            "--clip-seconds", "0.64", "-o", str(tmp_path / "cv"), *TINY_RUN]
    assert main(args) == 0
    out = capsys.readouterr().out
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert cv["k"] == 2 and cv["metric"] == "accuracy" and [r["fold"] for r in cv["folds"]] == [1, 2]
    for r in cv["folds"]:
        assert (tmp_path / "cv" / f"fold-{r['fold']}" / "checkpoint-best.pt").exists()
        cfg = json.loads((tmp_path / "cv" / f"fold-{r['fold']}" / "config.json").read_text())
        assert cfg["data"].endswith(f"train_{r['fold']}.json") and cfg["eval_data"].endswith(f"eval_{r['fold']}.json")
    scores = [r["best"] for r in cv["folds"]]
    assert cv["mean"] == pytest.approx(sum(scores) / 2)
    assert "cross-validation: accuracy" in out and "over 2 folds" in out
    assert main(args + ["--resume", "auto"]) == 0  # both folds done: nothing retrained, the same scores
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["folds"] == cv["folds"]
    # the whole cross-validation is repeatable with --config
    saved = json.loads((tmp_path / "cv" / "config.json").read_text())
    assert saved["cv_folds"] == 2 and "{fold}" in saved["data"] and "{fold}" in saved["eval_data"]
    # a new cross-validation in that folder is refused before it replaces the config
    assert main([*args, "--seed", "5"]) == 1
    assert "holds a run" in capsys.readouterr().err
    assert json.loads((tmp_path / "cv" / "config.json").read_text()) == saved
    assert "resume" not in saved and "overwrite" not in saved  # what was done to the folder, not the run
    # a plain run and a cross-validation do not share a folder
    plain = [a for a in args if a not in ("--cv-folds", "2")]
    plain[plain.index("--data") + 1] = str(tmp_path / "train_1.json")
    plain[plain.index("--eval-data") + 1] = str(tmp_path / "eval_1.json")
    assert main(plain) == 1
    assert "holds a cross-validation" in capsys.readouterr().err
    assert main([*plain[:plain.index("-o")], "-o", str(tmp_path / "one"), *plain[plain.index("-o") + 2:]]) == 0
    assert main([*args[:args.index("-o")], "-o", str(tmp_path / "one"), *args[args.index("-o") + 2:]]) == 1
    assert "holds a run that is not a cross-validation" in capsys.readouterr().err
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["finetune", "--cv-folds", "2", "--data", str(tmp_path / "train_1.json"), "--eval-data",
              str(tmp_path / "eval_{fold}.json")])
    assert "--cv-folds needs {fold} in --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--cv-folds", "3", *args[3:7]])
    assert "--data of fold 3:" in capsys.readouterr().err


def test_repeating_and_resuming_runs_keep_their_own_choices(tmp_path, monkeypatch, capsys):
    """--config repeats a run's choices, not its defaults (a repeated --init run is not refused for the
    default --model); a resumed run keeps its model even when the presets changed since; a typed
    positional or attached short option beats --config."""
    from audiomae import AudioMAE, AudioMAEConfig
    from audiomae import config as config_mod
    a = tmp_path / "a"
    assert main(["pretrain", "-o", str(a), *TINY_RUN]) == 0
    AudioMAE(AudioMAEConfig.preset("tiny", depth=1)).save_pretrained(tmp_path / "shallow.pt")  # not a preset
    b = tmp_path / "b"
    assert main(["pretrain", "--init", str(tmp_path / "shallow.pt"), "--mask-ratio", "0.6", "-o", str(b),
                 *TINY_RUN]) == 0
    c = tmp_path / "c"
    assert main(["pretrain", "--config", str(b / "config.json"), "-o", str(c), *TINY_RUN]) == 0
    assert torch.load(c / "model.pt", weights_only=False)["config"]["mask_ratio"] == 0.6
    # the preset's decoder depth changes after the run began: resume keeps the run's 4 blocks
    monkeypatch.setitem(config_mod.PRESETS["tiny"], "decoder_depth", 3)
    assert main(["pretrain", "-o", str(a), *TINY_RUN[:-3], "--epochs", "2", "--quiet", "--resume", "auto"]) == 0
    assert torch.load(a / "model.pt", weights_only=False)["config"]["decoder_depth"] == 4
    # positional and -oDIR beat the config's values
    capsys.readouterr()
    ev_cfg = tmp_path / "ev.json"
    ev_cfg.write_text(json.dumps({"checkpoint": "/no/such.pt", "output_dir": "/no/such/dir"}))
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "missing.pt"), f"-o{tmp_path / 'ev'}", "--config", str(ev_cfg)])
    err = capsys.readouterr().err
    assert str(tmp_path / "missing.pt") in err and "/no/such.pt" not in err


def test_checkpoints_from_before_downmix_are_read_with_the_channel_mean():
    from audiomae.train.loop import inherit_run_options
    got, changed = inherit_run_options({"downmix": "first", "explicit_options": []}, {"stats": "audioset"},
                                       names=("downmix",))
    assert got["downmix"] == "mean" and changed == {"downmix": "mean"}
    got, changed = inherit_run_options({"downmix": "first", "explicit_options": []}, {"downmix": "first"},
                                       names=("downmix",))
    assert got["downmix"] == "first" and changed == {}


def test_finetune_defaults_are_the_releases_and_a_resumed_run_keeps_its_own(tmp_path, capsys):
    """Fine-tuning decays weights by 5e-4 down to an lr of 1e-6 (the release's defaults); a run begun
    with other values (an earlier version's 1e-4 and 0) goes on with them when resumed."""
    from audiomae.cli import build_parser
    ft = build_parser().parse_args(["finetune"])
    pre = build_parser().parse_args(["pretrain"])
    assert (ft.weight_decay, ft.min_lr) == (5e-4, 1e-6) and (pre.weight_decay, pre.min_lr) == (1e-4, 0.0)
    _class_folders(str(tmp_path / "tr"), ["a", "b"])
    out = tmp_path / "ft"
    run = ["finetune", "--data", str(tmp_path / "tr"), "--eval-data", str(tmp_path / "tr"), "--clip-seconds", "0.64",
           "-o", str(out), *TINY_RUN]
    assert main(run) == 0
    ckpt = out / "checkpoint-last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["args"]["weight_decay"] == 5e-4 and state["schedule"]["min_lr"] == 1e-6
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.0, 5e-4}
    state["args"].update(weight_decay=1e-4, min_lr=0.0)  # as a run of an earlier version recorded them
    torch.save(state, ckpt)
    capsys.readouterr()
    assert main([*run[:-3], "--epochs", "2", "--quiet", "--resume", "auto"]) == 0
    assert "was trained with --weight-decay 0.0001, --min-lr 0; using the same" in capsys.readouterr().err
    state = torch.load(ckpt, weights_only=True)
    assert state["args"]["weight_decay"] == 1e-4 and state["schedule"]["min_lr"] == 0.0
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.0, 1e-4}
    # a weight decay given on the resume applies from there on
    assert main([*run[:-3], "--epochs", "3", "--quiet", "--resume", "auto", "--weight-decay", "0.002"]) == 0
    state = torch.load(ckpt, weights_only=True)
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.0, 0.002}


def test_embed_and_reconstruct_read_the_checkpoint_once(tmp_path, tiny_ckpt, monkeypatch):
    """The run's options, the checkpoint's kind and the model come from one read of the file."""
    import audiomae.checkpoint as ck
    reads = []
    real = torch.load

    def counting(path, *a, **k):
        reads.append(os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(torch, "load", counting)
    ok = _wav(tmp_path / "ok.wav", 1.0)
    assert main(["embed", "--checkpoint", tiny_ckpt, ok, "--out", str(tmp_path / "e.pt"), "--quiet"]) == 0
    assert reads.count(tiny_ckpt) == 1
    reads.clear()
    assert main(["reconstruct", "--checkpoint", tiny_ckpt, ok, "--out", str(tmp_path / "r.png")]) == 0
    assert reads.count(tiny_ckpt) == 1
    assert ck._READ_ONCE is None  # nothing is kept after the command
    reads.clear()
    ck.read_checkpoint(tiny_ckpt)
    ck.read_checkpoint(tiny_ckpt)
    assert reads.count(tiny_ckpt) == 2  # outside the context every call reads the file
    with ck.reading_once():
        ck.read_checkpoint(tiny_ckpt)
        os.utime(tiny_ckpt, ns=(0, 0))  # a file changed since: read again
        ck.read_checkpoint(tiny_ckpt)
    assert reads.count(tiny_ckpt) == 4


def test_weighted_sampling_without_replacement_needs_enough_clips(tmp_path, capsys):
    _class_folders(str(tmp_path / "tr"), ["a", "b"])  # 8 clips
    run = ["finetune", "--data", str(tmp_path / "tr"), "--eval-data", str(tmp_path / "tr"), "--clip-seconds", "0.64",
           "--weighted-sampling", "--no-replacement", *TINY_RUN]
    assert main([*run, "-o", str(tmp_path / "a"), "--epoch-size", "9"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--epoch-size", "9 clips per epoch cannot be drawn without "
                          "replacement from the 8 clips of non-zero weight")
    assert main([*run, "-o", str(tmp_path / "b"), "--epoch-size", "6"]) == 0
    state = torch.load(tmp_path / "b" / "checkpoint-last.pt", weights_only=True)
    assert state["args"]["no_replacement"] is True and state["step"] == 1  # 6 clips, batch 8: one step


def test_pretrain_two_d_masking_takes_the_release_scripts_fractions(tmp_path, capsys):
    """--mask-mode time_frequency removes 0.7 of the time columns and 0.3 of the frequency rows, as
    the release's pretraining script passes them (its model's defaults, 0.6 and 0.5, are the config's)."""
    from audiomae import AudioMAEConfig
    assert (AudioMAEConfig().mask_t_prob, AudioMAEConfig().mask_f_prob) == (0.6, 0.5)
    out = tmp_path / "tf"
    assert main(["pretrain", "--mask-mode", "time_frequency", "-o", str(out), *TINY_RUN]) == 0
    cfg = torch.load(out / "model.pt", weights_only=False)["config"]
    assert (cfg["mask_t_prob"], cfg["mask_f_prob"]) == (0.7, 0.3)
    assert main(["pretrain", "--mask-mode", "time_frequency", "--mask-f-prob", "0.25", "-o", str(tmp_path / "b"),
                 *TINY_RUN]) == 0
    assert torch.load(tmp_path / "b" / "model.pt", weights_only=False)["config"]["mask_f_prob"] == 0.25
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--mask-t-prob", "0.5", "-o", str(tmp_path / "c"), *TINY_RUN])
    assert e.value.code == 2
    assert "--mask-t-prob applies to --mask-mode time_frequency" in capsys.readouterr().err
    # a run from before the options masked the config's 0.6 and 0.5: repeating it keeps them
    old = json.loads((out / "config.json").read_text())
    old.pop("mask_t_prob"), old.pop("mask_f_prob")
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["pretrain", "--config", str(tmp_path / "old.json"), "-o", str(tmp_path / "d"), *TINY_RUN]) == 0
    cfg = torch.load(tmp_path / "d" / "model.pt", weights_only=False)["config"]
    assert (cfg["mask_t_prob"], cfg["mask_f_prob"]) == (0.6, 0.5)


def test_resume_from_a_run_folder_reads_its_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["pretrain", "-o", str(out), *TINY_RUN]) == 0
    capsys.readouterr()
    assert main(["pretrain", "-o", str(out), *TINY_RUN[:-3], "--epochs", "2", "--resume", str(out), "--seed", "1"]) == 0
    got = capsys.readouterr()
    assert f"resumed from {out / 'checkpoint-last.pt'} at epoch 1" in got.out
    # the run's recorded options are read as with auto
    assert f"note: the run of {out / 'checkpoint-last.pt'} began with --seed 0" in got.err
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["epoch"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "checkpoint-3.pt").write_bytes(b"")
    assert main(["pretrain", "-o", str(tmp_path / "b"), *TINY_RUN, "--resume", str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"{empty} is a folder without checkpoint-last.pt (it holds checkpoint-3.pt" in err
    assert "does not exist" not in err and "Traceback" not in err


@pytest.mark.skipif(os.name != "posix", reason="the writer's lock is an flock")
def test_a_run_deletes_the_partial_file_a_killed_checkpoint_write_left(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["pretrain", "-o", str(out), *TINY_RUN]) == 0
    partial = out / ".tmp-k9x.pt"  # a kill -9 during torch.save leaves it, as large as a checkpoint
    partial.write_bytes(b"\0" * (3 * 2 ** 20))
    os.utime(partial, (time.time() - 600, time.time() - 600))
    capsys.readouterr()
    assert main(["pretrain", "-o", str(out), *TINY_RUN[:-3], "--epochs", "2", "--quiet", "--resume", "auto"]) == 0
    assert f"note: deleted {partial} (3.0 MiB), the partial file of a checkpoint write that was killed" \
        in capsys.readouterr().err
    assert not partial.exists() and not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_a_resume_with_another_seed_or_data_says_it_goes_on_with_them(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["pretrain", "-o", str(out), *TINY_RUN]) == 0
    capsys.readouterr()
    more = [*TINY_RUN[:-3], "--quiet", "--resume", "auto"]
    assert main(["pretrain", "-o", str(out), *more, "--epochs", "2"]) == 0
    assert main(["pretrain", "--config", str(out / "config.json"), "--epochs", "3", "--resume", "auto"]) == 0
    assert "note: the run of" not in capsys.readouterr().err  # the same inputs: nothing to say
    assert main(["pretrain", "-o", str(out), *more, "--epochs", "4", "--seed", "5"]) == 0
    err = capsys.readouterr().err
    assert f"note: the run of {out / 'checkpoint-last.pt'} began with --seed 0, this run gives --seed 5: it goes on " \
           "with these" in err


def test_resume_reads_its_checkpoint_once(tmp_path, monkeypatch):
    out = tmp_path / "a"
    assert main(["pretrain", "-o", str(out), *TINY_RUN]) == 0
    reads = []
    real = torch.load

    def counting(path, *a, **k):
        reads.append(os.path.basename(os.fspath(path)))
        return real(path, *a, **k)

    monkeypatch.setattr(torch, "load", counting)
    assert main(["pretrain", "-o", str(out), *TINY_RUN[:-3], "--epochs", "2", "--quiet", "--resume", "auto"]) == 0
    assert reads.count("checkpoint-last.pt") == 1
    import audiomae.checkpoint as ck
    assert ck._READ_ONCE is None


def test_a_tilde_in_path_options_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """--output-dir=~/run (where the shell leaves the ~): every file of the run goes to one folder,
    and a second run there is refused as for any folder that holds a run."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--output-dir=~/run", *TINY_RUN]) == 0
    run = tmp_path / "home" / "run"
    assert {"config.json", "metrics.jsonl", "checkpoint-last.pt", "model.pt"} <= {p.name for p in run.iterdir()}
    assert not (tmp_path / "~").exists()
    assert main(["pretrain", "--output-dir=~/run", *TINY_RUN]) == 1
    assert "holds a run" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["finetune", "--pretrained=~/run/model.pt", "-o", str(tmp_path / "ft"), *TINY_RUN]) == 0
    # what loading adapted is a note on the command line, not a warning with a source line
    assert "note: loading " + str(run / "model.pt") + " into AudioMAEClassifier: took the encoder" in \
        capsys.readouterr().err


def test_pretrainings_model_file_carries_the_runs_input_options(tmp_path, capsys):
    """The file a pretraining run names at its end (model.pt) records the run's options, so embed and
    reconstruct read their inputs as the run did (as they do from its checkpoints)."""
    _class_folders(str(tmp_path / "tr"), ["a", "b"])
    assert main(["pretrain", "--data", str(tmp_path / "tr"), "--stats", "0,0.2", "--clip-seconds", "0.64",
                 "-o", str(tmp_path / "pt"), *TINY_RUN]) == 0
    args = torch.load(tmp_path / "pt" / "model.pt", weights_only=True)["args"]
    assert args["stats"] == [0.0, 0.2] and args["clip_seconds"] == 0.64
    capsys.readouterr()
    assert main(["embed", "--checkpoint", str(tmp_path / "pt" / "model.pt"), "--data", str(tmp_path / "tr"),
                 "--out", str(tmp_path / "e.pt"), "--quiet", "--num-workers", "0"]) == 0
    assert "was trained with --stats 0,0.2, --clip-seconds 0.64; using the same" in capsys.readouterr().err


def test_weighted_sampling_of_clips_without_labels_is_one_line_error(tmp_path, capsys):
    _class_folders(str(tmp_path / "tr"), ["a"])
    entries = [{"wav": str(p), "labels": ""} for p in sorted((tmp_path / "tr" / "a").iterdir())]
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    assert main(["pretrain", "--data", str(tmp_path / "m.json"), "--weighted-sampling", "--clip-seconds", "0.64",
                 "-o", str(tmp_path / "pt"), *TINY_RUN]) == 1
    assert_one_error_line(capsys.readouterr().err, "--weighted-sampling weighs the clips by their labels")


def test_negative_statistics_are_taken_as_the_value_of_stats(tmp_path):
    """Log-mel means are negative: --stats -4.27,4.57 is a value, not an option."""
    assert main(["pretrain", "--stats", "-4.27,4.57", "-o", str(tmp_path / "a"), *TINY_RUN]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["stats"] == [-4.27, 4.57]


def test_runs_record_absolute_paths_and_evaluate_takes_the_runs_label_file(tmp_path, monkeypatch, capsys):
    """config.json names the data, labels and run folder absolutely, so --config repeats the run from
    another folder; evaluate finds the class-label CSV the run trained with."""
    lines = ["index,mid,display_name"] + [f"{k},/m/{c},{c}" for k, c in enumerate("ab")]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    entries = []
    for k, c in enumerate("ab"):
        for i in range(4):
            _wav16(str(tmp_path / "audio" / f"{c}{i}.wav"), freq=300.0 * (k + 1) + 10 * i)
            entries.append({"wav": f"audio/{c}{i}.wav", "labels": f"/m/{c}"})
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--data", "m.json", "--labels", "labels.csv", "--clip-seconds", "0.64", "-o", "ft",
                 *TINY_RUN]) == 0
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["data"] == str(tmp_path / "m.json") and cfg["labels"] == str(tmp_path / "labels.csv")
    assert cfg["output_dir"] == str(tmp_path / "ft")
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["finetune", "--config", str(tmp_path / "ft" / "config.json"), "-o", "again", *TINY_RUN]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ft" / "model.pt"), "--data", str(tmp_path / "m.json"), "-o", "ev",
                 "--quiet", "--num-workers", "0"]) == 0
    assert f"--labels {tmp_path / 'labels.csv'}" in capsys.readouterr().err
    assert "mAP" in json.loads((tmp_path / "elsewhere" / "ev" / "metrics.json").read_text())


def test_config_of_another_commands_run_gives_only_its_chosen_options(tmp_path, capsys, monkeypatch):
    """pretrain --config of a fine-tuning run takes what that run was told (here its clip length), not
    fine-tuning's defaults (lr, weight decay, warmup)."""
    _class_folders(str(tmp_path / "tr"), ["a", "b"])
    assert main(["finetune", "--data", str(tmp_path / "tr"), "--clip-seconds", "0.64", "-o", str(tmp_path / "ft"),
                 *TINY_RUN]) == 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["command"] == "finetune"
    capsys.readouterr()
    assert main(["pretrain", "--config", str(tmp_path / "ft" / "config.json"), "-o", str(tmp_path / "pt"),
                 *TINY_RUN]) == 0
    assert "is a 'finetune' run: 'pretrain' takes only the inputs it was given" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "pt" / "config.json").read_text())
    assert (cfg["blr"], cfg["weight_decay"], cfg["min_lr"], cfg["warmup_epochs"]) == (2e-4, 1e-4, 0.0, 3)
    assert cfg["clip_seconds"] == 0.64 and cfg["data"] == str(tmp_path / "tr") and cfg["command"] == "pretrain"
    # a config from before runs recorded their command: its options tell
    older = json.loads((tmp_path / "ft" / "config.json").read_text())
    older.pop("command")
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert main(["pretrain", "--config", str(tmp_path / "older.json"), "-o", str(tmp_path / "pt0"), *TINY_RUN]) == 0
    assert "is a 'finetune' run" in capsys.readouterr().err
    assert json.loads((tmp_path / "pt0" / "config.json").read_text())["blr"] == 2e-4
    # nor its folder, or options that mean another thing here (pretraining's 2D fractions)
    assert main(["pretrain", "--data", str(tmp_path / "tr"), "--clip-seconds", "0.64", "--mask-mode",
                 "time_frequency", "--mask-t-prob", "0.5", "-o", str(tmp_path / "pt2"), *TINY_RUN]) == 0
    capsys.readouterr()
    cfg_path = tmp_path / "pt2" / "config.json"
    assert main(["finetune", "--config", str(cfg_path), "--pretrained", str(tmp_path / "pt2" / "model.pt"),
                 "-o", str(tmp_path / "ft2"), *TINY_RUN]) == 0
    cfg = json.loads((tmp_path / "ft2" / "config.json").read_text())
    assert cfg["mask_t_prob"] == 0.2 and cfg["output_dir"] == str(tmp_path / "ft2")
    assert (tmp_path / "pt2" / "model.pt").exists()
    # an earlier version's config with options that did not apply is repeated, not refused; a ~ in its
    # paths is the home folder
    old = json.loads(cfg_path.read_text())
    old.update(mask_ratio=0.5, output_dir="~/again", explicit_options=old["explicit_options"] + ["mask_ratio"])
    old.pop("command")
    (tmp_path / "old.json").write_text(json.dumps(old))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["pretrain", "--config", str(tmp_path / "old.json"), *TINY_RUN]) == 0
    assert (tmp_path / "home" / "again" / "model.pt").exists()


def test_a_manifest_of_missing_files_is_refused_before_training(tmp_path, capsys):
    """Evaluation files that are all missing (a wrong root) stop the run at once, not after an epoch."""
    _class_folders(str(tmp_path / "tr"), ["a", "b"])
    lines = ["index,mid,display_name", "0,/m/a,a", "1,/m/b,b"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "ev.json").write_text(json.dumps({"data": [{"wav": "/moved/x.wav", "labels": "/m/a"}]}))
    code = main(["finetune", "--data", str(tmp_path / "tr"), "--eval-data", str(tmp_path / "ev.json"), "--labels",
                 str(tmp_path / "labels.csv"), "--clip-seconds", "0.64", "-o", str(tmp_path / "ft"), *TINY_RUN])
    err = capsys.readouterr().err
    assert code == 1 and "none of its first 1 clips is a file (the first: /moved/x.wav)" in err
    assert not (tmp_path / "ft" / "checkpoint-last.pt").exists()


def test_errors_of_other_processes_name_their_rank(tmp_path, tiny_ckpt, monkeypatch, capsys):
    from audiomae import cli
    from audiomae.cli import main

    for env, want in (({"RANK": "1", "WORLD_SIZE": "2"}, "error (rank 1): "),
                      ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, "error (rank 3): "),
                      ({"RANK": "1", "WORLD_SIZE": "1"}, "error: "), ({}, "error: ")):
        for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert cli._error_prefix() == want, env
    # a RANK left over in one process's environment names nothing
    wav = _wav(tmp_path / "clip.wav", 0.5)
    assert main(["embed", "--checkpoint", tiny_ckpt, "--data", wav, "--out", str(tmp_path / "e.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "an audio file, not a manifest" in err

def test_patch_stride_through_pretraining_and_finetuning(tmp_path, capsys):
    """--patch-stride 10: the release's custom patches and their 6 x 6 decoder windows; fine-tuning a
    non-overlapping model with it rebuilds the position table; --init and a bad stride are errors."""
    from audiomae import AudioMAE, AudioMAEClassifier

    pre = str(tmp_path / "pre")
    assert main(["pretrain", "-o", pre, *TINY_RUN, "--patch-stride", "10"]) == 0
    model = AudioMAE.from_pretrained(os.path.join(pre, "model.pt"))
    assert model.config.patch_stride == 10 and model.config.window == (6, 6)
    assert model.config.grid_size == (25, 12) and json.load(open(os.path.join(pre, "config.json")))["patch_stride"] == 10
    # the stride is the file's: another one with --init is an error naming it
    assert main(["pretrain", "-o", str(tmp_path / "again"), *TINY_RUN, "--init", os.path.join(pre, "model.pt"),
                 "--patch-stride", "16"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--patch-stride 16", "cannot apply")
    plain = str(tmp_path / "plain")
    assert main(["pretrain", "-o", plain, *TINY_RUN]) == 0
    ft = str(tmp_path / "ft")
    assert main(["finetune", "-o", ft, *TINY_RUN, "--pretrained", os.path.join(plain, "model.pt"),
                 "--patch-stride", "10"]) == 0
    assert "rebuilt for the 25x12 grid of overlapping patches" in capsys.readouterr().err
    clf = AudioMAEClassifier.from_pretrained(os.path.join(ft, "checkpoint-best.pt"))
    assert clf.config.patch_stride == 10
    # the run's stride is resumed without the option
    assert main(["finetune", "-o", ft, *TINY_RUN, "--pretrained", os.path.join(plain, "model.pt"), "--epochs", "2",
                 "--resume", "auto"]) == 0
    assert AudioMAEClassifier.from_pretrained(os.path.join(ft, "checkpoint-last.pt")).config.patch_stride == 10
    # a stride that does not fit the pretrained model's patches names the option
    assert main(["finetune", "-o", str(tmp_path / "ft20"), *TINY_RUN, "--pretrained", os.path.join(plain, "model.pt"),
                 "--patch-stride", "20"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--patch-stride does not fit the model", "patch_stride=20")
    # the global decoder takes any stride; the local one one whose frequency patches its windows tile
    assert main(["pretrain", "-o", str(tmp_path / "g8"), *TINY_RUN, "--patch-stride", "8", "--decoder-mode",
                 "global"]) == 0
    # its resume and --init need no --decoder-mode: the model is the file's
    assert main(["pretrain", "-o", str(tmp_path / "g8"), *TINY_RUN, "--epochs", "2", "--patch-stride", "8",
                 "--resume", "auto"]) == 0
    assert main(["pretrain", "-o", str(tmp_path / "g8i"), *TINY_RUN, "--patch-stride", "8", "--init",
                 str(tmp_path / "g8" / "model.pt")]) == 0
    # a fine-tuning run resumed with another stride names the option
    assert main(["finetune", "-o", ft, *TINY_RUN, "--epochs", "3", "--resume", "auto", "--patch-stride", "16"]) == 1
    assert_one_error_line(capsys.readouterr().err, "cannot resume: --patch-stride 16", "patches every 10")
    for bad, message in ((["--patch-stride", "0"], "--patch-stride must be in [1, 16]"),
                         (["--patch-stride", "15", "--model", "huge"], "--patch-stride must be in [1, 14]"),
                         (["--patch-stride", "8"], "gives 15 frequency patches on 128 mel bins, which the local "
                                                   "decoder's 6 x 6 windows do not tile"),
                         (["--patch-stride", "12", "--decoder-mode", "hybrid"], "the hybrid decoder's")):
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "-o", str(tmp_path / "bad"), *TINY_RUN, *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_reconstruction_figure_hides_what_no_kept_patch_covers(tmp_path, monkeypatch):
    """Overlapping patches give a fractional mask: the masked panel hides only the values in no kept
    patch, and its title counts those."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    from audiomae.reconstruct import reconstruction_figure

    shown, titles = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda self, img, **kw: shown.append(img))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, **kw: titles.append(t))
    spec = torch.randn(40, 20)
    mask = torch.zeros(40, 20)
    mask[:10] = 1.0  # a quarter hidden
    mask[10:20] = 0.5  # seen through a kept patch
    reconstruction_figure(spec, torch.zeros(40, 20), mask, str(tmp_path / "f.png"))
    masked = torch.from_numpy(shown[1]).T
    assert bool(masked[:10].isnan().all()) and not bool(masked[10:].isnan().any())
    assert titles[1] == "masked input (25 % removed)"
    torch.testing.assert_close(torch.from_numpy(shown[3]).T[10:20], spec[10:20] * 0.5)


def test_info_describes_a_checkpoint(tmp_path, capsys):
    import argparse
    from audiomae import AudioMAE, AudioMAEClassifier, AudioMAEConfig

    run = str(tmp_path / "run")
    assert main(["pretrain", "-o", run, *TINY_RUN, "--patch-stride", "10"]) == 0
    capsys.readouterr()
    assert main(["info", os.path.join(run, "checkpoint-last.pt")]) == 0
    out = capsys.readouterr().out
    model = AudioMAE.from_pretrained(os.path.join(run, "model.pt"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "written by audiomae" in out and "training checkpoint" in out and "pretraining Audio-MAE" in out
    assert "every 10 (overlapping), a 25 x 12 grid of 300" in out and "6 x 6 windows" in out
    assert f"parameters: {trainable:,} trainable" in out
    assert "1 epoch done, step 2 of 2" in out and "run: command pretrain, stats audioset" in out

    # the release's file: 'model' and its run's argparse args; a classifier of 7 classes
    clf = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=7)
    released = tmp_path / "released.pth"
    torch.save({"model": clf.state_dict(), "epoch": 3, "args": argparse.Namespace(dataset="esc50", mask_2d=True)},
               released)
    assert main(["info", str(released)]) == 0
    out = capsys.readouterr().out
    trainable = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    assert "written by the released code" in out and "classifier, 7 classes" in out
    assert f"parameters: {trainable:,} trainable" in out and "saved after 4 epochs" in out and "dataset esc50" in out
    assert "(not in the weights: the preset's for this width)" in out and "16 x 8 grid of 128" in out

    bare = tmp_path / "bare.pt"
    torch.save(clf.state_dict(), bare)
    assert main(["info", str(bare)]) == 0
    assert "a bare state dict" in capsys.readouterr().out

    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, junk)
    for path, message in ((junk, "not an Audio-MAE checkpoint"), (tmp_path / "none.pt", "not found"),
                          (_wav(tmp_path / "a.wav", 1.0), "not a PyTorch checkpoint")):
        assert main(["info", str(path)]) == 1
        assert_one_error_line(capsys.readouterr().err, message)


def test_classify_prints_and_writes_the_top_classes(tmp_path, capsys):
    import argparse
    import csv
    from audiomae import AudioMAEClassifier, AudioMAEConfig
    from audiomae.audio import load_input

    files = [_wav(tmp_path / f"c{i}.wav", 1.0 + i) for i in range(3)]
    # a run of this package: single-label classes of the synthetic set, names recorded
    ft = str(tmp_path / "ft")
    assert main(["finetune", "-o", ft, *TINY_RUN]) == 0
    ckpt = os.path.join(ft, "checkpoint-best.pt")
    capsys.readouterr()
    assert main(["classify", *files, "--checkpoint", ckpt, "--top-k", "10", "--out", str(tmp_path / "r.json"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "top 10 of 10 classes, probabilities (softmax" in out and "names from the checkpoint's run" in out
    rows = json.load(open(tmp_path / "r.json"))
    model = AudioMAEClassifier.from_pretrained(ckpt)
    with torch.no_grad():
        want = model(torch.stack([load_input(f, target_length=256) for f in files])).softmax(-1)
    names = torch.load(ckpt, weights_only=False)["args"]["class_names"]
    for r, f, w in zip(rows, files, want):
        assert r["path"] == os.path.abspath(f) and [t["rank"] for t in r["top"]] == list(range(1, 11))
        assert [t["name"] for t in r["top"]] == [names[t["index"]] for t in r["top"]]
        got = torch.tensor([t["score"] for t in r["top"]])
        torch.testing.assert_close(got, w[[t["index"] for t in r["top"]]], rtol=1e-5, atol=1e-6)
        assert bool((got[:-1] >= got[1:]).all()) and abs(float(got.sum()) - 1) < 1e-5
        assert f"  {r['top'][0]['score']:.3f}  {r['top'][0]['name']}" in out

    # the release's file: multi-label (sigmoid), no names; --labels names the classes
    clf = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=4)
    released = tmp_path / "released.pth"
    torch.save({"model": clf.state_dict(), "args": argparse.Namespace(dataset="audioset", use_soft=False,
                                                                       label_csv="/nowhere/labels.csv")}, released)
    assert main(["classify", files[0], "--checkpoint", str(released), "--top-k", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "its run's label file /nowhere/labels.csv is not on this machine" in captured.err
    assert "scores (sigmoid" in captured.out and "class " in captured.out
    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f"{i},/m/{i}x,Sound {i}\n" for i in range(4)))
    assert main(["classify", files[0], "--checkpoint", str(released), "--labels", str(labels), "--top-k", "2",
                 "--out", str(tmp_path / "r.csv"), "--quiet"]) == 0
    table = list(csv.DictReader(open(tmp_path / "r.csv")))
    with torch.no_grad():
        want = clf.eval()(load_input(files[0], target_length=256)[None]).sigmoid()[0]
    assert [r["rank"] for r in table] == ["1", "2"] and table[0]["mid"] == f"/m/{table[0]['index']}x"
    assert table[0]["name"] == f"Sound {table[0]['index']}"
    assert abs(float(table[0]["score"]) - float(want.max())) < 1e-5
    assert "(/m/" in capsys.readouterr().out

    bad = tmp_path / "bad.csv"
    bad.write_text("index,mid,display_name\n0,/m/a,A\n")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio")
    pre = tmp_path / "pre.pt"
    from audiomae import AudioMAE
    AudioMAE(AudioMAEConfig.preset("tiny")).save_pretrained(pre)
    for argv, message in (
            (["--checkpoint", str(released), "--labels", str(bad)], "has 1 class, the checkpoint predicts 4"),
            (["--checkpoint", str(pre)], "without a classification head"),
            (["--checkpoint", str(released), "--out", str(tmp_path / "r.txt")], "must end in .csv or .json")):
        assert main(["classify", files[0], *argv, "--quiet"]) == 1
        assert_one_error_line(capsys.readouterr().err, message)
    with pytest.raises(SystemExit) as e:
        main(["classify", files[0], "--checkpoint", str(released), "--top-k", "0"])
    assert e.value.code == 2 and "--top-k must be" in capsys.readouterr().err
    assert main(["classify", files[0], str(junk), "--checkpoint", str(released), "--quiet"]) == 1
    assert "junk.wav" in capsys.readouterr().err



def test_classify_scores_as_the_run_trained_and_refuses_what_it_cannot_score(tmp_path, capsys):
    import argparse
    from audiomae import AudioMAEClassifier, AudioMAEConfig
    from audiomae.commands import _single_label

    # the release: its AudioSet script trains with BCE unless use_soft, whatever the dataset; its
    # ESC-50 script (no use_soft in its arguments) with cross-entropy; arguments without use_soft
    # of a dataset the release scores as multi-label are multi-label
    for args, single in ((argparse.Namespace(dataset="esc50", use_soft=False), False),
                         (argparse.Namespace(dataset="audioset", use_soft=True), True),
                         (argparse.Namespace(dataset="esc50"), True), (argparse.Namespace(nb_classes=50), True),
                         (argparse.Namespace(dataset="audioset"), False),
                         (argparse.Namespace(dataset="speechcommands"), False),
                         (None, False),
                         # this package's runs: recorded, else what their data was
                         ({"multi_label": True, "data": "/x/folder"}, False),
                         ({"data": "/gone/class_folders"}, True), ({"data": "synthetic"}, True),
                         ({"data": "/x/m.json", "single_label": True}, True), ({"data": "/x/m.json"}, False)):
        assert _single_label({}, args) is single, args
    assert _single_label({"single_label": True, "explicit_options": ["single_label"]}, None) is True

    wav = _wav(tmp_path / "a.wav", 1.0)
    clf = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=3)
    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n2,/m/c,C\n")
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("index,mid,display_name\n0,/m/b,B\n1,/m/a,A\n2,/m/c,C\n")
    ours = tmp_path / "ours.pt"
    clf.save_pretrained(ours, args={"class_names": ["A", "B", "C"], "class_mids": ["/m/a", "/m/b", "/m/c"],
                                    "multi_label": True, "downmix": "first"})
    assert main(["classify", wav, "--checkpoint", str(ours), "--labels", str(labels), "--quiet"]) == 0
    capsys.readouterr()
    # another order of the same classes would name every score wrongly
    assert main(["classify", wav, "--checkpoint", str(ours), "--labels", str(swapped), "--quiet"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--labels", "leave out --labels")
    # a head that does not fit its encoder, and non-finite weights
    sd = clf.state_dict()
    torch.save(dict(sd, **{"head.weight": torch.zeros(3, 32)}), tmp_path / "head.pt")
    nan = dict(sd, **{"head.bias": torch.full((3,), float("nan"))})
    torch.save(nan, tmp_path / "nan.pt")
    out = tmp_path / "r.json"
    for name, message in (("head.pt", "does not fit its encoder"), ("nan.pt", "are not finite")):
        assert main(["classify", wav, "--checkpoint", str(tmp_path / name), "--out", str(out), "--quiet"]) == 1
        assert_one_error_line(capsys.readouterr().err, message)
    assert not out.exists()
    # devices and inputs: one line each, the device before any audio is read
    for device, message in (("foo", "not a device name"), ("mps", "not available here"), ("cuda:3", "cuda:3")):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as e:  # the message is the process's one line on stderr, status 1
            main(["classify", str(tmp_path / "missing.wav"), "--checkpoint", str(ours), "--device", device])
        assert str(e.value.code).startswith(f"error: --device {device}") and message in str(e.value.code)
    assert main(["classify", str(tmp_path / "missing.wav"), str(tmp_path), "--checkpoint", str(ours), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "nothing was classified" in err and "classify takes audio files" in err and "--data" not in err


def test_info_on_odd_files(tmp_path, capsys):
    import subprocess
    from audiomae import AudioMAEClassifier, AudioMAEConfig

    clf = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=1)
    sd = clf.state_dict()
    torch.save({k: v for k, v in sd.items() if k != "pos_embed"}, tmp_path / "nopos.pt")
    assert main(["info", str(tmp_path / "nopos.pt")]) == 0
    out = capsys.readouterr().out
    assert "classifier, 1 class (" in out and "classify gives scores (sigmoid" in out
    torch.save(dict(sd, pos_embed=sd["pos_embed"][:, :100]), tmp_path / "short.pt")
    assert main(["info", str(tmp_path / "short.pt")]) == 0
    assert "input: not known from the file" in capsys.readouterr().out
    torch.save(dict(sd, **{"patch_embed.proj.weight": torch.zeros(64)}), tmp_path / "flat.pt")
    assert main(["info", str(tmp_path / "flat.pt")]) == 1
    assert_one_error_line(capsys.readouterr().err, "not an Audio-MAE state dict")
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        clf.save_pretrained(tmp_path / "ok.safetensors")
        assert main(["info", str(tmp_path / "ok.safetensors")]) == 0
        from audiomae import __version__
        assert f"written by audiomae {__version__}" in capsys.readouterr().out
        for meta in ({"config": "{not json"}, {"config": "[1, 2]"}):
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"), metadata=meta)
            for argv in (["info", str(tmp_path / "bad.safetensors")],
                         ["classify", _wav(tmp_path / "a.wav", 1.0), "--checkpoint", str(tmp_path / "bad.safetensors")]):
                assert main(argv) == 1
                assert_one_error_line(capsys.readouterr().err, "metadata")
    assert main(["info", ""]) == 1
    assert_one_error_line(capsys.readouterr().err, "not found")
    # a release file of overlapping patches with a trained table: its grid is the args' stride's
    import argparse
    from audiomae import AudioMAE
    over = AudioMAE(AudioMAEConfig.preset("tiny", patch_stride=10, img_size=(1024, 128))).state_dict()
    over = dict(over, pos_embed=torch.randn_like(over["pos_embed"]))
    torch.save({"model": over, "args": argparse.Namespace(use_custom_patch=True)}, tmp_path / "custom.pth")
    assert main(["info", str(tmp_path / "custom.pth")]) == 0
    assert "patches 16 x 16 every 10 (overlapping), a 101 x 12 grid" in capsys.readouterr().out
    # the module itself takes the file too
    done = subprocess.run([sys.executable, "-m", "audiomae.info", str(tmp_path / "nopos.pt")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "classifier, 1 class" in done.stdout
    done = subprocess.run([sys.executable, "-m", "audiomae.info", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m audiomae.info")


def test_classify_whole_files_window_by_window(tmp_path, capsys):
    import argparse
    from audiomae import AudioMAEClassifier, AudioMAEConfig
    from audiomae.audio import load_audio, waveform_to_input

    long_wav, short_wav = _wav(tmp_path / "long.wav", 7.0), _wav(tmp_path / "short.wav", 1.0)
    clf = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=5).eval()
    for use_soft in (False, True):
        ckpt = tmp_path / f"c{use_soft}.pth"
        torch.save({"model": clf.state_dict(), "args": argparse.Namespace(dataset="audioset", use_soft=use_soft)}, ckpt)
        out = tmp_path / f"r{use_soft}.json"
        assert main(["classify", long_wav, short_wav, "--checkpoint", str(ckpt), "--hop", "2", "--top-k", "5",
                     "--out", str(out), "--quiet", "--batch-size", "3"]) == 0
        printed = capsys.readouterr().out
        assert ("the mean over its windows" if use_soft else "the highest over its windows") in printed
        rows = json.load(open(out))
        wave = load_audio(long_wav)
        # 2.575 s windows every 2 s over 7 s: 0, 2, 4, and one that ends where the file ends
        assert [w["start"] for w in rows[0]["windows"]] == [0.0, 2.0, 4.0, 4.425]
        assert "windows of 2.575 s every 2 s" in printed
        with torch.no_grad():
            x = torch.stack([waveform_to_input(wave[s:s + 41200], 16000, 256) for s in (0, 32000, 64000, 70800)])
            want = clf(x).softmax(-1) if use_soft else clf(x).sigmoid()
        for w, expected in zip(rows[0]["windows"], want):
            got = torch.tensor([t["score"] for t in sorted(w["top"], key=lambda t: t["index"])])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        whole = want.mean(0) if use_soft else want.amax(0)
        got = torch.tensor([t["score"] for t in sorted(rows[0]["top"], key=lambda t: t["index"])])
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
        assert [w["start"] for w in rows[1]["windows"]] == [0.0]  # shorter than one window
    # a hop longer than the file or the window: no window past the end, a warning about the gaps
    assert main(["classify", _wav(tmp_path / "three.wav", 3.0), "--checkpoint", str(ckpt), "--hop", "5", "--out",
                 str(out), "--quiet"]) == 0
    assert [w["start"] for w in json.load(open(out))[0]["windows"]] == [0.0, 0.425]
    assert "the audio between the windows is not classified" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["classify", long_wav, "--checkpoint", str(ckpt), "--hop", "0"])
    assert e.value.code == 2 and "--hop must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("budget,reads", [(None, 3), (0, 6)], ids=["kept", "over-budget"])
def test_embed_and_classify_decode_each_file_once_within_the_budget(budget, reads, tmp_path, monkeypatch):
    import audiomae.commands as commands
    from audiomae import AudioMAEClassifier, AudioMAEConfig

    files = [_wav(tmp_path / f"c{i}.wav", 1.0) for i in range(3)]
    ckpt = tmp_path / "c.pt"
    AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=2).save_pretrained(ckpt)
    if budget is not None:
        monkeypatch.setattr(commands.DecodedClips, "BUDGET_BYTES", budget)
    calls = []
    real = commands.read_clip
    monkeypatch.setattr(commands, "read_clip", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    assert main(["classify", *files, "--checkpoint", str(ckpt), "--quiet"]) == 0
    assert len(calls) == reads
    calls.clear()
    assert main(["embed", *files, "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.pt"), "--quiet"]) == 0
    assert len(calls) == reads


@pytest.mark.parametrize("saved,message", [
    ({"batch_size": "abc"}, 'batch_size must be an integer, got "abc"'),
    ({"epochs": 1.5}, "epochs must be an integer, got 1.5"),
    ({"blr": "fast"}, 'blr must be a number, got "fast"'),
    ({"quiet": 1}, "quiet must be true or false, got 1"),
    ({"precision": "fp8"}, 'precision must be one of auto, bf16, fp16, fp32, got "fp8"'),
    ({"data": [{"wav": "a.wav", "labels": "/m/x"}]}, 'data must be a string, got [{"wav"'),  # a manifest
    ({"batch_size": None}, "batch_size cannot be null (leave it out for the default, 32)"),
    ({"model": None}, 'model cannot be null (leave it out for the default, "tiny")'),
    ({"seed": None}, "seed cannot be null (leave it out for the default, 0)"),
])
def test_config_values_are_checked_as_typed_ones(saved, message, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(cfg), "-o", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {cfg}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_config_written_by_hand_keeps_the_default_downmix(tmp_path, capsys):
    """Only a run's own config.json (which records its folder) from before --downmix means the
    channel mean; a hand-written one without the option keeps the default."""
    from audiomae.cli import _options, build_parser
    for saved, want in (({"epochs": 1}, "first"), ({"epochs": 1, "output_dir": str(tmp_path)}, "mean")):
        cfg = tmp_path / "c.json"
        cfg.write_text(json.dumps(saved))
        argv = ["pretrain", "--config", str(cfg)]
        args = build_parser().parse_args(argv)
        sub = build_parser()._subparsers._group_actions[0].choices["pretrain"]
        assert _options(args, sub, argv[1:])["downmix"] == want
        assert ("averaged the channels" in capsys.readouterr().err) == (want == "mean")


def test_an_output_place_that_takes_no_files_fails_before_any_work(tmp_path, tiny_ckpt, no_model, monkeypatch,
                                                                  capsys):
    """A read-only mount or /proc passes the permission check: a file made there shows it."""
    import tempfile
    ok = _wav(tmp_path / "ok.wav", 1.0)

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    for argv, option in ((["embed", ok, "--out", str(tmp_path / "e.pt")], "--out"),
                         (["classify", ok, "--out", str(tmp_path / "c.csv")], "--out"),
                         (["reconstruct", ok, "--out", str(tmp_path / "r.png")], "--out")):
        assert main([*argv, "--checkpoint", tiny_ckpt, "--quiet"] if argv[0] != "reconstruct"
                    else [*argv, "--checkpoint", tiny_ckpt]) == 1
        assert_one_error_line(capsys.readouterr().err, f"{option} ", "cannot write files in", "Read-only file system")


def test_a_failed_write_is_one_line_and_leaves_no_file(tmp_path, tiny_ckpt, monkeypatch, capsys):
    ok = _wav(tmp_path / "ok.wav", 1.0)
    out = tmp_path / "e.pt"

    def broken(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed")
    monkeypatch.setattr(torch, "save", broken)
    assert main(["embed", ok, "--checkpoint", tiny_ckpt, "--out", str(out), "--quiet"]) == 1
    assert_one_error_line(capsys.readouterr().err, f"--out {out}: cannot be written", "open file failed")
    assert sorted(os.listdir(tmp_path)) == ["ok.wav"]


def test_reconstruct_wav_without_an_extension(tmp_path, tiny_ckpt, no_model, capsys):
    ok = _wav(tmp_path / "ok.wav", 1.0)
    assert main(["reconstruct", ok, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "r.png"),
                 "--wav", str(tmp_path / "noext")]) == 1
    assert_one_error_line(capsys.readouterr().err, "no file extension (use .wav, .flac, .ogg")
    # formats libsndfile knows but that do not give the clip back (no sample format, another rate)
    for ext in ("raw", "xi", "sd2"):
        assert main(["reconstruct", ok, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "r.png"),
                     "--wav", str(tmp_path / f"r.{ext}")]) == 1
        assert_one_error_line(capsys.readouterr().err, f"'.{ext}' is not written here (use .wav, .flac")
    assert sorted(os.listdir(tmp_path)) == ["ok.wav"]  # refused before anything is written
    from audiomae.commands import _check_audio_path
    for ext in ("wav", "flac", "ogg", "aiff"):
        _check_audio_path(str(tmp_path / f"r.{ext}"))


def test_reconstruct_needs_a_pretraining_checkpoint(tmp_path, capsys):
    from audiomae import AudioMAEClassifier, AudioMAEConfig
    AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=3).save_pretrained(tmp_path / "c.pt")
    assert main(["reconstruct", _wav(tmp_path / "ok.wav", 1.0), "--checkpoint", str(tmp_path / "c.pt"),
                 "--out", str(tmp_path / "r.png")]) == 1
    assert_one_error_line(capsys.readouterr().err, "is a fine-tuned classifier: reconstruct needs a pretraining "
                          "checkpoint")


def test_a_warmup_as_long_as_the_run_is_named(tmp_path, capsys):
    assert main(["pretrain", "-o", str(tmp_path / "r"), *TINY_RUN, "--warmup-epochs", "1"]) == 0
    assert "warning: the warmup (1 epoch, 2 steps) is not shorter than the run (1 epoch, 2 steps): the lr never " \
        "reaches its peak" in capsys.readouterr().err
    assert main(["pretrain", "-o", str(tmp_path / "r2"), *TINY_RUN, "--epochs", "2", "--warmup-epochs", "1"]) == 0
    assert "warmup" not in capsys.readouterr().err


def test_info_of_a_finished_run(tmp_path, capsys):
    assert main(["pretrain", "-o", str(tmp_path / "r"), *TINY_RUN, "--warmup-epochs", "0"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "r" / "checkpoint-last.pt")]) == 0
    out = capsys.readouterr().out
    assert "step 2 of 2" in out and "(finished: a resume with more --epochs trains on)" in out


def test_finetune_refuses_a_model_size_that_is_not_the_pretrained_ones(tmp_path, tiny_ckpt, capsys):
    run = ["finetune", "--pretrained", tiny_ckpt, "-o", str(tmp_path / "ft"), *TINY_RUN]
    assert main([*run, "--model", "small"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--model small (width 384, 12 blocks) is not the model of "
                          f"--pretrained {tiny_ckpt} (width 64")
    assert main([*run, "--model", "tiny", "--target-length", "256"]) == 0


def test_a_run_with_stats_mean_std_repeats_with_its_config(tmp_path, capsys):
    assert main(["pretrain", "-o", str(tmp_path / "r"), *TINY_RUN, "--stats=-4.2,4.5", "--warmup-epochs", "0"]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["stats"] == [-4.2, 4.5]
    assert main(["pretrain", "--config", str(tmp_path / "r" / "config.json"), "--resume", "auto",
                 "--epochs", "2"]) == 0
    (tmp_path / "c.json").write_text(json.dumps({"stats": [1, 2, 3]}))
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", str(tmp_path / "c.json"), "-o", str(tmp_path / "r2")])
    assert "stats must be a name or [MEAN, STD], got [1, 2, 3]" in capsys.readouterr().err


def test_an_output_through_a_link_is_written_to_the_file_it_names(tmp_path, tiny_ckpt):
    ok = _wav(tmp_path / "ok.wav", 1.0)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "e.pt").write_bytes(b"old")
    os.chmod(tmp_path / "real" / "e.pt", 0o640)
    os.symlink(tmp_path / "real" / "e.pt", tmp_path / "link.pt")
    assert main(["embed", ok, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "link.pt"), "--quiet"]) == 0
    assert os.path.islink(tmp_path / "link.pt")
    assert torch.load(tmp_path / "real" / "e.pt", weights_only=False)["embeddings"].shape == (1, 64)
    assert os.stat(tmp_path / "real" / "e.pt").st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path / "real")) == ["e.pt"]


def test_reconstruct_a_model_that_masks_time_and_frequency_lines(tmp_path, capsys):
    from audiomae import AudioMAE, AudioMAEConfig
    AudioMAE(AudioMAEConfig.preset("tiny", mask_mode="time_frequency")).save_pretrained(tmp_path / "m.pt")
    assert main(["reconstruct", _wav(tmp_path / "ok.wav", 2.56), "--checkpoint", str(tmp_path / "m.pt"),
                 "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_a_finetune_run_that_recorded_another_model_size_resumes(tmp_path, tiny_ckpt, capsys):
    """Runs from before --model was checked against --pretrained recorded it: their resume goes on."""
    out = tmp_path / "ft"
    assert main(["finetune", "--pretrained", tiny_ckpt, "-o", str(out), *TINY_RUN, "--target-length", "256"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"], cfg["explicit_options"] = "small", sorted(set(cfg["explicit_options"]) | {"model"})
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["finetune", "--config", str(out / "config.json"), "--resume", "auto", "--epochs", "2"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--lr", "1e300"], "the learning rate 1e+300 (--lr) is beyond float32's range"),
    (["--blr", "1e300"], "the learning rate 3.125e+298 (--blr 1e+300 x the effective batch 8 / 256)"),
    (["--lr", "1", "--weight-decay", "1e300"], "x the weight decay 1e+300 is beyond float32's range"),
    (["--mask-mode", "time_frequency", "--mask-t-prob", "0", "--mask-f-prob", "0"],
     "--mask-t-prob 0 and --mask-f-prob 0 remove no patch of the 16 x 8 patch grid"),
], ids=["lr", "blr", "weight-decay", "no-patch-masked"])
def test_a_run_that_cannot_train_says_so_before_its_first_step(argv, message, tmp_path, capsys):
    """An lr the optimizer's float32 arithmetic cannot hold, or a masking with nothing to reconstruct:
    one error before any step (not a traceback from inside the optimizer or the model) and no model."""
    out = tmp_path / "run"
    assert main(["pretrain", "-o", str(out), *TINY_RUN, *argv]) == 1
    assert_one_error_line(capsys.readouterr().err, message)
    assert not (out / "model.pt").exists() and not (out / "checkpoint-last.pt").exists()


def test_a_full_disk_while_a_checkpoint_is_written_is_one_error_and_keeps_the_last_one(tmp_path, capsys,
                                                                                     monkeypatch):
    """torch's writer turns a failed write into a RuntimeError (its cause the OSError): the run ends
    with the disk's error in one line, the checkpoint written before stays, and no partial file is left."""
    import errno
    from audiomae import checkpoint

    out = tmp_path / "run"
    assert main(["pretrain", "-o", str(out), *TINY_RUN, "--save-every-steps", "1"]) == 0
    before = (out / "checkpoint-last.pt").read_bytes()
    save = torch.save

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1846272 vs 1846160")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    capsys.readouterr()
    assert main(["pretrain", "-o", str(out), *TINY_RUN, "--epochs", "2", "--resume", "auto"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err, "No space left on device", "checkpoint-last.pt")
    assert "enforce fail" not in err
    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert (out / "checkpoint-last.pt").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_a_full_disk_while_embeddings_are_written_names_the_disk(tmp_path, tiny_ckpt, capsys, monkeypatch):
    import errno
    from audiomae import commands

    def full(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 98816 vs 98736")
    monkeypatch.setattr(commands.torch, "save", full)
    out = tmp_path / "e.pt"
    assert main(["embed", _wav(tmp_path / "a.wav", 1.0), "--checkpoint", tiny_ckpt, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err, "--out", "cannot be written: No space left on device")
    assert "enforce fail" not in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("resume", [True, False], ids=["resume-auto", "no-resume"])
def test_a_start_after_one_that_left_no_checkpoint_logs_each_step_once(command, resume, tmp_path, capsys):
    """A run killed in its first epoch (before any checkpoint) leaves rows in metrics.jsonl; the run
    started again trains those steps again, and each step has one row."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"phase": "train", "step": s, "epoch": 1, "loss": 9.0}) + "\n"
                                               for s in (1, 2)) + '{"phase": "train", "st')  # cut by the kill
    argv = [command, "-o", str(out), *TINY_RUN, "--log-every", "1"] + (["--resume", "auto"] if resume else [])
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("phase") == "train"]
    assert steps == [1, 2] and all(r.get("loss") != 9.0 for r in rows)


def test_the_command_line_loads_torch_only_for_a_command_and_a_ctrl_c_meanwhile_is_one_line(tmp_path, monkeypatch,
                                                                                          capsys):
    code = ("import sys, audiomae.cli as c; print('torch' in sys.modules); "
            "c.build_parser().parse_args(['pretrain', '--help'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("False\n") and "--resume" in proc.stdout
    import audiomae
    assert audiomae.AudioMAEConfig.preset("tiny").depth > 0 and "AudioMAE" in dir(audiomae)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        audiomae.nope
    from audiomae import dispatch

    def ctrl_c(*a, **k):  # as if it came while the command's modules load
        raise KeyboardInterrupt

    monkeypatch.setattr(dispatch, "set_backend", ctrl_c)
    assert main(["pretrain", "-o", str(tmp_path / "r"), "--num-clips", "16", "--quiet", "--backend", "torch"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_end_of_a_run_counts_its_skipped_steps(tmp_path, monkeypatch, capsys):
    from audiomae.train import loop
    real, calls = loop.Trainer.train_step, []

    def skip_the_first(self, batches):  # a non-finite loss: the step is skipped (train_step returns None)
        calls.append(self.step)
        return None if len(calls) == 1 else real(self, batches)

    monkeypatch.setattr(loop.Trainer, "train_step", skip_the_first)
    assert main(["pretrain", "-o", str(tmp_path / "r"), *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert "done: final loss" in out and "(1 of the 2 steps skipped: non-finite loss or gradients)" in out
    assert main(["pretrain", "-o", str(tmp_path / "s"), *TINY_RUN]) == 0  # nothing skipped: nothing said
    assert "skipped" not in capsys.readouterr().out
    calls.clear()
    assert main(["finetune", "-o", str(tmp_path / "f"), *TINY_RUN]) == 0
    assert "(1 of the 2 steps skipped: non-finite loss or gradients)" in capsys.readouterr().out


def test_the_demo_replaces_an_earlier_demo_but_not_another_commands_run(tmp_path, capsys):
    demo = ["demo", "--epochs", "1", "--num-clips", "16", "--num-eval-clips", "8", "--batch-size", "8", "--quiet"]
    assert main([*demo, "-o", str(tmp_path / "d")]) in (0, None)
    err = capsys.readouterr().err  # the demo has no --warmup-epochs: its warning says what it does take
    assert "(the demo warms up for 1 epoch: give more --epochs)" in err and "--warmup-epochs" not in err
    assert main([*demo, "-o", str(tmp_path / "d")]) in (0, None)  # a demo starts afresh in its own folder
    run = tmp_path / "run"
    assert main(["pretrain", "-o", str(run), *TINY_RUN]) == 0
    kept = {n: (run / n).read_bytes() for n in ("checkpoint-last.pt", "model.pt", "metrics.jsonl", "config.json")}
    capsys.readouterr()
    assert main([*demo, "-o", str(run)]) == 1
    assert f"{run} holds a pretrain run (checkpoint-last.pt), which the demo would replace" in capsys.readouterr().err
    assert {n: (run / n).read_bytes() for n in kept} == kept
    assert main([*demo, "-o", str(run), "--overwrite"]) in (0, None)
    assert json.loads((run / "config.json").read_text())["command"] == "demo"


def test_an_evaluation_in_a_training_runs_folder_keeps_the_runs_config(tmp_path, monkeypatch, capsys):
    run = tmp_path / "ft"
    assert main(["finetune", "-o", str(run), *TINY_RUN]) == 0
    before = (run / "config.json").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(run / "model.pt"), "-o", str(run), *SMALL_EVAL]) == 0
    assert f"note: {run / 'config.json'} is the finetune run's: this evaluation's options go to evaluate-config.json" \
        in capsys.readouterr().err
    assert (run / "config.json").read_text() == before
    assert json.loads((run / "evaluate-config.json").read_text())["command"] == "evaluate"
    assert main(["finetune", "--config", str(run / "config.json"), "--epochs", "2", "--resume", "auto"]) == 0
    assert f"resumed from {run / 'checkpoint-last.pt'} at epoch 1" in capsys.readouterr().out
    # an evaluation's own folder: its config.json, replaced by the next evaluation's; the checkpoint
    # recorded as an absolute path, as the README says of a run's paths
    ev = tmp_path / "ev"
    for _ in range(2):
        monkeypatch.chdir(tmp_path)
        assert main(["evaluate", os.path.join("ft", "model.pt"), "-o", str(ev), *SMALL_EVAL]) == 0
        saved = json.loads((ev / "config.json").read_text())
        assert saved["command"] == "evaluate" and saved["checkpoint"] == str(run / "model.pt")
    assert not (ev / "evaluate-config.json").exists() and "note:" not in capsys.readouterr().err


def test_reconstruct_refuses_a_mask_ratio_that_a_time_frequency_model_does_not_use(tmp_path, capsys):
    run = tmp_path / "tf"
    assert main(["pretrain", "-o", str(run), *TINY_RUN, "--mask-mode", "time_frequency"]) == 0
    ok = _wav(tmp_path / "ok.wav", 1.0)
    argv = ["reconstruct", ok, "--checkpoint", str(run / "model.pt"), "--out", str(tmp_path / "r.png")]
    capsys.readouterr()
    assert main([*argv, "--mask-ratio", "0.5"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--mask-ratio does not apply", "--mask-mode time_frequency, 0.7 "
                          "of the time lines and 0.3 of the frequency lines")
    assert not (tmp_path / "r.png").exists()
    assert main(argv) == 0 and (tmp_path / "r.png").exists()


def test_an_error_names_the_option_as_typed_not_another_that_it_begins(tmp_path, tiny_ckpt, capsys):
    from audiomae.cli import _typed, build_parser
    sub = build_parser()._subparsers._group_actions[0].choices["embed"]
    argv = ["--data", "m.json", "--data-root", "x"]
    assert _typed(sub, "data_root", argv) == "--data-root" and _typed(sub, "data", argv) == "--data"
    assert _typed(sub, "data_root", ["--data", "m.json", "--data-r", "x"]) == "--data-r"  # an abbreviation
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"data": [{"wav": "a.wav", "labels": "/m/a"}]}))
    with pytest.raises(SystemExit):
        main(["embed", "--checkpoint", tiny_ckpt, "--data", str(manifest), "--data-root", str(tmp_path / "no"),
              "--out", str(tmp_path / "e.pt")])
    assert f"error: --data-root {tmp_path / 'no'}: no such folder" in capsys.readouterr().err


def test_an_output_that_is_an_input_of_the_command_is_refused(tmp_path, tiny_ckpt, capsys):
    import shutil
    ckpt = tmp_path / "m.pt"
    shutil.copy(tiny_ckpt, ckpt)
    ok = _wav(tmp_path / "ok.wav", 0.5)
    before = ckpt.read_bytes(), (tmp_path / "ok.wav").read_bytes()
    os.symlink(ckpt, tmp_path / "link.pt")
    for argv, message in (
            (["embed", ok, "--checkpoint", str(ckpt), "--out", str(tmp_path / "link.pt")],
             "--out {}/link.pt is this command's --checkpoint file too"),
            (["embed", ok, "--checkpoint", str(ckpt), "--out", ok], "--out {}/ok.wav is this command's input audio"),
            (["reconstruct", ok, "--checkpoint", str(ckpt), "--out", str(tmp_path / "r.png"), "--wav", ok],
             "--wav {}/ok.wav is this command's input audio file too")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message.format(tmp_path) in capsys.readouterr().err
    assert (ckpt.read_bytes(), (tmp_path / "ok.wav").read_bytes()) == before


def test_evaluate_with_a_finetune_runs_config_scores_its_held_out_set(tmp_path, capsys):
    for split, n in (("tr", 4), ("ev", 3)):
        rows = [{"wav": _wav(tmp_path / f"{split}{i}.wav", 0.5), "labels": "/m/a" if i % 2 else "/m/b"}
                for i in range(n)]
        (tmp_path / f"{split}.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n")
    run = tmp_path / "ft"
    assert main(["finetune", "-o", str(run), "--data", str(tmp_path / "tr.json"), "--eval-data",
                 str(tmp_path / "ev.json"), "--labels", str(tmp_path / "labels.csv"), "--batch-size", "2",
                 "--epochs", "1", "--num-workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run / "model.pt"), "--config", str(run / "config.json"), "-o",
                 str(tmp_path / "ev")]) == 0
    got = capsys.readouterr()
    assert f"evaluating on the run's --eval-data {tmp_path / 'ev.json'}" in got.err
    assert " on 3 clips" in got.out  # the held-out set's 3, not the 4 it trained on
    # without --data: the synthetic set, whose 10 classes do not fit; the error names the run's held-out set
    assert main(["evaluate", str(run / "model.pt"), "-o", str(tmp_path / "ev2"), "--quiet"]) == 1
    assert f"predicts 2 classes, the data has 10 (its run's held-out set is {tmp_path / 'ev.json'}: give it as " \
           "--data" in capsys.readouterr().err


@pytest.mark.parametrize("recorded,message", [
    ({"downmix": "left"}, "records downmix='left' from its run, which is not usable (downmix must be one of"),
    ({"stats": 5}, "records stats=5 from its run, which is not usable"),
    ({"clip_seconds": -1}, "records clip_seconds=-1 from its run, which is not usable"),
])
def test_a_checkpoint_whose_run_recorded_an_unusable_input_option_is_one_error(recorded, message, tmp_path,
                                                                               tiny_ckpt, capsys):
    state = torch.load(tiny_ckpt, weights_only=False)
    state["args"] = dict(state.get("args") or {}, **recorded)
    ckpt = tmp_path / "edited.pt"
    torch.save(state, ckpt)
    ok = _wav(tmp_path / "ok.wav", 0.5)
    assert main(["embed", ok, "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.pt"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"error: {ckpt} {message}" in err and "Traceback" not in err
    flag = "--" + next(iter(recorded)).replace("_", "-")
    assert f"give {flag} to choose the value" in err
    assert main(["embed", ok, "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.pt"), "--quiet", flag,
                 {"downmix": "first", "stats": "audioset", "clip_seconds": "0.5"}[flag[2:].replace("-", "_")]]) == 0


def test_data_options_that_no_dataset_reads_are_noted(tmp_path, capsys):
    """--num-clips, --num-eval-clips, --labels and --data-root typed where no dataset of the run reads
    them say so (they were taken silently); where a set reads them, nothing is said."""
    assert main(["pretrain", "-o", str(tmp_path / "a"), *TINY_RUN]) == 0  # --num-eval-clips, no --eval-data
    err = capsys.readouterr().err
    assert ("note: --num-eval-clips is not used: it applies to --eval-data synthetic (the embedded held-out "
            "split); this run has no --eval-data") in err
    assert "--num-clips is not used" not in err
    assert main(["pretrain", "-o", str(tmp_path / "b"), "--eval-data", "synthetic", *TINY_RUN]) == 0
    assert "is not used" not in capsys.readouterr().err
    wav, labels = _wav(tmp_path / "x.wav", 1.0), tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n0,/m/a,A\n")
    assert main(["embed", "--checkpoint", str(tmp_path / "a" / "model.pt"), str(wav), "--num-clips", "3",
                 "--labels", str(labels), "--out", str(tmp_path / "e.npz"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("note: --num-clips is not used: it applies to --data synthetic (the embedded dataset); this run "
            "embeds the audio files given") in err
    assert "note: --labels is not used: it applies to a manifest (--data a JSON or CSV file); this run reads " \
           "no dataset" in err
    with pytest.raises(SystemExit):  # a usage error is all a refused command prints
        main(["finetune", "--data-root", str(tmp_path), "--epochs", "0", "-o", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert "is not used" not in err and "--epochs must be at least 1" in err
    assert main(["finetune", "--data-root", str(tmp_path), "-o", str(tmp_path / "d"), *TINY_RUN]) == 0
    assert "note: --data-root is not used: it applies to a manifest (--data a JSON or CSV file); this run reads " \
           "the embedded synthetic dataset" in capsys.readouterr().err


def test_a_data_error_in_a_loader_worker_ends_the_process(tmp_path):
    """A worker that meets a set it cannot read (no readable clip) raised in the main process, which
    printed the error and then never exited: its interpreter joined the workers, which a run that stops
    gracefully has ignore SIGTERM. The workers are stopped with the error: exit status 1."""
    from audiomae import AudioMAE, AudioMAEConfig
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio")
    manifest = tmp_path / "bad.json"
    manifest.write_text(json.dumps({"data": [{"wav": str(tmp_path / "empty.wav")},
                                             {"wav": str(tmp_path / "text.wav")}]}))
    AudioMAE(AudioMAEConfig.preset("tiny")).save_pretrained(str(tmp_path / "m.pt"))
    for argv in (["pretrain", "-o", str(tmp_path / "r"), "--epochs", "1"],
                 ["embed", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "e") + "/"]):
        try:
            proc = subprocess.run([sys.executable, "-m", "audiomae", *argv, "--data", str(manifest), "--batch-size",
                                   "2", "--num-workers", "1", "--quiet"], capture_output=True, text=True, env=ENV,
                                  timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"audiomae {argv[0]} did not exit after a data error in a loader worker")
        assert proc.returncode == 1, proc.stderr
        assert "no readable clip among the 2 clips" in proc.stderr and "Traceback" not in proc.stderr


def test_finetuning_on_one_class_is_refused_with_the_folder_that_holds_the_classes(tmp_path, capsys):
    """A class folder one level too high (train/audio/{dog,cat}) was one class: a softmax over it has no
    loss, and the run reported accuracy 1.0."""
    for c in ("dog", "cat"):
        (tmp_path / "train" / "audio" / c).mkdir(parents=True)
        _wav(tmp_path / "train" / "audio" / c / "a.wav", 0.5)
    code = main(["finetune", "--data", str(tmp_path / "train"), "-o", str(tmp_path / "r"), *TINY_RUN])
    err = capsys.readouterr().err
    assert code == 1
    assert_one_error_line(err, f"cannot fine-tune on {tmp_path / 'train'}: it has one class (audio), and "
                               "single-label training needs two or more (a softmax over one class learns nothing); "
                               f"its sub-folders (cat, dog) look like the classes: --data {tmp_path / 'train' / 'audio'}")


@pytest.mark.skipif(os.name != "posix", reason="file names as bytes that are not UTF-8 are a POSIX matter")
def test_classify_prints_and_writes_a_file_name_that_is_not_utf8(tmp_path):
    """The name's bytes go to a UTF-8 standard output and CSV as they are (both stopped the command
    with a UnicodeEncodeError)."""
    from audiomae import AudioMAEClassifier, AudioMAEConfig
    AudioMAEClassifier(AudioMAEConfig.preset("tiny", num_classes=3)).save_pretrained(str(tmp_path / "c.pt"))
    plain = _wav(tmp_path / "plain.wav", 1.0)
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav")
    try:
        os.rename(os.fsencode(plain), raw)
    except OSError:  # pragma: no cover - a file system that only takes UTF-8 names
        pytest.skip("this file system refuses names that are not UTF-8")
    proc = subprocess.run([sys.executable, "-m", "audiomae", "classify", os.fsdecode(raw), "--checkpoint",
                           str(tmp_path / "c.pt"), "--out", str(tmp_path / "top.csv")], capture_output=True,
                          env=dict(ENV, PYTHONIOENCODING="utf-8"), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert raw in proc.stdout.splitlines()
    assert (tmp_path / "top.csv").read_bytes().splitlines()[1].startswith(raw + b",,1,")


def test_resuming_another_runs_checkpoint_does_not_replace_the_run_in_the_output_folder(tmp_path, capsys):
    """--resume DIR with an --output-dir that holds another run silently replaced that run's checkpoint,
    model and log; continuing in the run's own folder, or in a new one, still works."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", "-o", str(a), *TINY_RUN]) == 0
    assert main(["pretrain", "-o", str(b), *TINY_RUN]) == 0
    before = (a / "checkpoint-last.pt").read_bytes()
    capsys.readouterr()
    assert main(["pretrain", "-o", str(a), "--resume", str(b), *TINY_RUN, "--epochs", "2"]) == 1
    assert_one_error_line(capsys.readouterr().err, f"{a} holds another run (checkpoint-last.pt) than the one --resume "
                                                   f"{b} continues: give --output-dir {b} to continue")
    assert (a / "checkpoint-last.pt").read_bytes() == before
    assert main(["pretrain", "-o", str(b), "--resume", str(b / "checkpoint-last.pt"), *TINY_RUN, "--epochs", "2"]) == 0
    assert main(["pretrain", "-o", str(tmp_path / "c"), "--resume", str(b), *TINY_RUN, "--epochs", "3"]) == 0


def test_a_resumed_pretraining_run_keeps_and_records_its_objective(tmp_path, capsys):
    """--mask-ratio or --no-norm-pix-loss given to a resume were recorded in config.json while the run
    went on with its own; left out, config.json recorded the defaults (and --config repeated another
    model). A different one is refused; the run's own are what config.json holds."""
    out = tmp_path / "r"
    assert main(["pretrain", "-o", str(out), *TINY_RUN, "--decoder-mode", "global", "--mask-ratio", "0.6"]) == 0
    capsys.readouterr()
    assert main(["pretrain", "-o", str(out), *TINY_RUN, "--epochs", "2", "--resume", "auto", "--mask-ratio", "0.5",
                 "--no-norm-pix-loss"]) == 1
    assert_one_error_line(capsys.readouterr().err, "cannot resume with --mask-ratio 0.5 (the run's: 0.6) and "
                                                   "--no-norm-pix-loss (the run's: not given)")
    assert main(["pretrain", "-o", str(out), *TINY_RUN, "--epochs", "2", "--resume", "auto"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["mask_ratio"], saved["decoder_mode"], saved["no_norm_pix_loss"]) == (0.6, "global", False)


def test_a_resume_with_another_batch_size_is_refused_also_when_the_steps_per_epoch_match(tmp_path, capsys):
    """49 clips are 7 steps of 7 and 7 of 8: a resume in the middle of an epoch was taken, and skipped 8
    clips per step done instead of 7 (clips of the epoch never trained). At an epoch's end it may."""
    run = ["--num-clips", "49", "--num-workers", "0", "--quiet", "--warmup-epochs", "0", "--epochs", "1"]
    out = tmp_path / "r"
    assert main(["pretrain", "-o", str(out), *run, "--batch-size", "7"]) == 0
    last = out / "checkpoint-last.pt"
    state = torch.load(last, weights_only=False)
    assert state["epoch_step"] == 0
    mid = dict(state, step=3, epoch=0, epoch_step=3)  # as a run stopped after its third step writes it
    torch.save(mid, last)
    capsys.readouterr()
    assert main(["pretrain", "-o", str(out), *run, "--batch-size", "8", "--resume", "auto"]) == 1
    assert_one_error_line(capsys.readouterr().err, "its steps took 7 clips each (batch size x accumulation x "
                                                   "processes), this run's take 8, and its epoch stopped mid-way")
    torch.save(state, last)  # at the epoch's end: nothing of it is left to skip
    assert main(["pretrain", "-o", str(out), *run, "--batch-size", "8", "--epochs", "2", "--resume", "auto"]) == 0


def test_a_refused_evaluation_leaves_the_folders_config_and_results_together(tmp_path, capsys):
    """evaluate wrote config.json before it checked the checkpoint: a refused one left a config naming
    it beside the results of the one before."""
    from audiomae import AudioMAE, AudioMAEClassifier, AudioMAEConfig
    AudioMAEClassifier(AudioMAEConfig.preset("tiny", num_classes=10)).save_pretrained(str(tmp_path / "c.pt"))
    AudioMAE(AudioMAEConfig.preset("tiny")).save_pretrained(str(tmp_path / "p.pt"))
    out = tmp_path / "ev"
    assert main(["evaluate", str(tmp_path / "c.pt"), "-o", str(out), *SMALL_EVAL]) == 0
    before = (out / "config.json").read_text()
    assert json.loads(before)["checkpoint"] == str(tmp_path / "c.pt")
    assert main(["evaluate", str(tmp_path / "p.pt"), "-o", str(out), *SMALL_EVAL]) == 1
    assert "without a classification head" in capsys.readouterr().err
    assert (out / "config.json").read_text() == before


def test_evaluate_scores_a_single_label_run_single_label_on_a_manifest(tmp_path, capsys):
    """A model fine-tuned on class folders (single-label, recorded as multi_label false) was scored on a
    manifest of the same clips with sigmoids and mAP; classify already scored it with its softmax."""
    for c in ("cat", "dog"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(2):
            _wav(tmp_path / "d" / c / f"{i}.wav", 0.5)
    run = ["--batch-size", "2", "--num-workers", "0", "--quiet", "--epochs", "1", "--target-length", "64"]
    assert main(["finetune", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "ft"), *run]) == 0
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/cat,cat\n1,/m/dog,dog\n")
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": str(tmp_path / "d" / c / "0.wav"), "labels": f"/m/{c}"}
                                                          for c in ("cat", "dog")]}))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ft" / "checkpoint-best.pt"), "--data", str(tmp_path / "m.json"),
                 "--labels", str(tmp_path / "labels.csv"), "-o", str(tmp_path / "ev"), "--num-workers", "0",
                 "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "was trained single-label (cross-entropy)" in captured.err
    assert captured.out.splitlines()[-1].startswith("accuracy ")
    assert "accuracy" in json.loads((tmp_path / "ev" / "metrics.json").read_text())


def test_a_mask_ratio_that_keeps_no_patch_is_refused(tmp_path, capsys):
    """0.995 keeps int(128 x 0.005) = 0 of the tiny model's patches: pretraining and reconstruct took it
    (the latter's message says some patches must be kept)."""
    assert main(["pretrain", "-o", str(tmp_path / "r"), *TINY_RUN, "--mask-ratio", "0.995"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--mask-ratio 0.995 keeps none of the 128 patches of the 16 x 8 "
                          "patch grid", "about 0.9922 or less", "the encoder learns from the kept ones")
    assert main(["pretrain", "-o", str(tmp_path / "r"), *TINY_RUN]) == 0
    assert main(["reconstruct", "synthetic:1", "--checkpoint", str(tmp_path / "r" / "model.pt"), "--mask-ratio",
                 "0.995", "--out", str(tmp_path / "x.png")]) == 1
    assert_one_error_line(capsys.readouterr().err, "--mask-ratio 0.995 keeps none of the 128 patches",
                          "the reconstruction is made from the kept ones")
    assert not (tmp_path / "x.png").exists()
    assert main(["reconstruct", "synthetic:1", "--checkpoint", str(tmp_path / "r" / "model.pt"), "--mask-ratio",
                 str(127 / 128), "--out", str(tmp_path / "one.png")]) == 0  # keeps one patch


def test_a_pgf_picture_without_latex_is_refused_before_the_model_runs(tmp_path, capsys, monkeypatch):
    """PGF passed the format check, and failed after the run with 'No such file or directory' (the
    missing xelatex)."""
    import shutil
    from audiomae import AudioMAE, AudioMAEConfig
    AudioMAE(AudioMAEConfig.preset("tiny")).save_pretrained(str(tmp_path / "m.pt"))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert main(["reconstruct", "synthetic:1", "--checkpoint", str(tmp_path / "m.pt"), "--out",
                 str(tmp_path / "r.pgf")]) == 1
    assert_one_error_line(capsys.readouterr().err, "a PGF picture needs LaTeX (xelatex, matplotlib's pgf.texsystem)")
