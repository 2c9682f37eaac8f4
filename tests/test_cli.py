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
    for cmd in ["pretrain", "finetune", "evaluate", "embed", "reconstruct", "demo", "info"]:
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "--blr" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--epochs", "0"], "--epochs must be at least 1"),
    (["pretrain", "--mask-ratio", "1.5"], "--mask-ratio must be in [0, 1)"),
    (["pretrain", "--data", "/no/such/manifest.json"], "no such file or folder"),
    (["finetune", "--pretrained", "/no/such.pt"], "--pretrained /no/such.pt: no such file"),
    (["pretrain", "--stats", "1,2,3"], "expected a name or MEAN,STD"),
    (["pretrain", "--precision", "fp8"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
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


def test_end_to_end(tmp_path):
    pre = tmp_path / "pre"
    run_cli("pretrain", "--epochs", "1", "-o", str(pre), *SMALL)
    assert (pre / "model.pt").exists() and (pre / "checkpoint-last.pt").exists()
    cfg = json.loads((pre / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["batch_size"] == 8
    rec = [json.loads(l) for l in (pre / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == 4 and all(math_ok(r["loss"]) for r in rec)

    png, wav = tmp_path / "r.png", tmp_path / "r.wav"
    run_cli("reconstruct", "synthetic:1", "--checkpoint", str(pre / "model.pt"), "--out", str(png), "--wav", str(wav))
    assert png.stat().st_size > 10_000 and wav.stat().st_size > 10_000

    emb = tmp_path / "e.npz"
    run_cli("embed", "--checkpoint", str(pre / "model.pt"), "--out", str(emb), *SMALL)
    import numpy as np
    z = np.load(emb)
    assert z["embeddings"].shape == (32, 64) and z["targets"].shape == (32, 10)

    ft = tmp_path / "ft"
    run_cli("finetune", "--pretrained", str(pre / "model.pt"), "--epochs", "1", "-o", str(ft), "--mask-2d", *SMALL)
    assert (ft / "checkpoint-best.pt").exists() and (ft / "best_report.csv").exists()

    ev = tmp_path / "ev"
    out = run_cli("evaluate", str(ft / "checkpoint-best.pt"), "-o", str(ev), *SMALL).stdout
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


def test_ddp_two_cpu_processes_agree(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "ddp_agree.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", script, str(tmp_path)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ranks agree" in proc.stdout
    state = torch.load(tmp_path / "checkpoint-last.pt", weights_only=True)
    assert state["step"] == 4  # 32 clips / (2 ranks x batch 4)
