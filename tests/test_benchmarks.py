"""The benchmark harness on the CPU: timing statistics and input rotation, results files and tables,
the FLOP count of ViT-B, the attention-variant registry and its correctness gate, byte accounting,
the plot, the command line, and the GPU suite script (parsed, not run)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from audiomae import AudioMAEConfig  # noqa: E402
from audiomae.reference import window_attention_reference  # noqa: E402
from benchmarks import attention, harness, pretrain, run  # noqa: E402
from benchmarks.harness import Report, Result, Timing  # noqa: E402

CPU = torch.device("cpu")


# --- timing ------------------------------------------------------------------------------------------
def test_quantile_interpolates_like_numpy():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert harness.quantile(xs, 0.5) == 3.0
    assert harness.quantile(xs, 0.2) == pytest.approx(1.8)
    assert harness.quantile(xs, 0.8) == pytest.approx(4.2)
    assert harness.quantile([7.0], 0.2) == 7.0


def test_time_fn_gives_sane_stats_and_rotates_inputs():
    sets = [(torch.randn(64, 64), i) for i in range(3)]
    seen = []

    def fn(x, i):
        seen.append(i)
        return x @ x

    t = harness.time_fn(fn, sets, CPU, warmup_ms=1.0, rep_ms=5.0, min_reps=7)
    assert t.reps >= 7
    assert 0 < t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.median_ms < 1000
    assert set(seen) == {0, 1, 2}
    # consecutive calls never reuse the same input set
    assert all(a != b for a, b in zip(seen, seen[1:]))


def test_time_fn_setup_runs_outside_each_call():
    calls = []
    harness.time_fn(lambda: calls.append("call"), [()], CPU, warmup_ms=0.0, rep_ms=0.0, min_reps=3,
                    setup=lambda inputs: calls.append("setup"), probes=1)
    assert calls[0::2] == ["setup"] * (len(calls) // 2) and calls[1::2] == ["call"] * (len(calls) // 2)


def test_close_enough_is_the_kernel_tests_rule():
    exact = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    own = exact + 1e-3
    assert harness.close_enough(exact + 1.5e-3, exact, own, floor=0.0)[0]
    ok, err, bound = harness.close_enough(exact + 3e-3, exact, own, floor=0.0)
    assert not ok and err == pytest.approx(1e-3) and bound == pytest.approx(2 * 1e-3 / 3)
    assert not harness.close_enough(torch.zeros(2), exact, own, floor=1.0)[0]  # wrong shape
    assert not harness.close_enough(exact * float("nan"), exact, own, floor=1.0)[0]


# --- results ---------------------------------------------------------------------------------------------
def _env():
    return {"device_type": "cpu", "device": "CPU, 2 cores (test)", "cpu": "test", "cpu_cores": 2,
            "torch": "2.13.0+cpu", "triton": "3.9.0", "cuda": None, "python": "3.11", "date": "2026-01-01 00:00 UTC"}


def test_report_writes_json_and_markdown_with_ratios(tmp_path):
    rep = Report(str(tmp_path), _env(), {"quick": True})
    rep.peaks["copy bandwidth (GB/s)"] = 10.0
    p = {"pass": "fwd", "dtype": "bf16", "batch": 32}
    rep.add(Result("attention", "eager reference", p, Timing(2.0, 1.9, 2.2, 1.8, 10), {"GB/s": 1.5}, reference=True))
    rep.add(Result("attention", "fast", p, Timing(1.0, 0.9, 1.1, 0.8, 10), {"GB/s": 3.0}))
    rep.add(Result("attention", "fast", {**p, "batch": 64}, Timing(1.5, 1.4, 1.6, 1.3, 10)))  # no reference row
    rep.add(Result("attention", "broken", p, None, note="out of memory"))
    rep.note("attention", "xformers: not run (not importable)")
    rep.note("attention", "xformers: not run (not importable)")  # notes are not repeated
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["device"] == "CPU, 2 cores (test)"
    rows = data["results"]
    assert [r["speedup_vs_reference"] for r in rows] == [1.0, 2.0, None, None]
    assert rows[1]["median_ms"] == 1.0 and rows[1]["p20_ms"] == 0.9 and rows[1]["p80_ms"] == 1.1
    assert rows[3]["note"] == "out of memory" and "median_ms" not in rows[3]
    assert data["notes"]["attention"] == ["xformers: not run (not importable)"]
    md = (tmp_path / "results.md").read_text()
    assert "| variant | pass | dtype | batch | median ms | p20-p80 ms | vs ref | GB/s | note |" in md
    assert "| fast | fwd | bf16 | 32 | 1.00 | 0.900-1.10 | 2.00x | 3.00 |  |" in md
    assert "| broken | fwd | bf16 | 32 |  |  |  |  | out of memory |" in md
    assert "- xformers: not run (not importable)" in md
    assert "torch: 2.13.0+cpu" in md and "copy bandwidth (GB/s) 10.0" in md


def test_machine_slug_names_device_and_torch():
    assert harness.machine_slug(_env()) == "cpu-2core-torch2.13"
    gpu = {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0+cu128"}
    assert harness.machine_slug(gpu) == "nvidia-h100-80gb-hbm3-torch2.13"


def test_environment_on_cpu_names_versions_and_date():
    env = harness.environment(CPU)
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    assert env["date"].endswith("UTC") and env["cpu_cores"] == os.cpu_count()


def test_budget_parts():
    b = harness.Budget(100.0)
    assert 99.0 < b.left() <= 100.0 and not b.expired()
    assert b.part(0.25).seconds == pytest.approx(25.0, abs=0.5)
    assert harness.Budget(0.0).expired()


def test_plot_sweep_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for name, scale in (("eager reference", 2.0), ("fast", 1.0)):
        for b in (32, 64, 128):
            for pas in ("fwd", "fwd+bwd"):
                m = scale * b / 32
                rows.append(Result("attention", name, {"pass": pas, "dtype": "bf16", "shift": (2, 0), "batch": b},
                                   Timing(m, 0.9 * m, 1.1 * m, 0.8 * m, 10)))
    rows.append(Result("attention", "skipped", {"pass": "fwd", "dtype": "bf16", "shift": (2, 0), "batch": 32}))
    path = harness.plot_sweep(rows, str(tmp_path / "attention.png"), "batch", ("pass", "dtype", "shift"), "test")
    assert path and pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert harness.plot_sweep([], str(tmp_path / "none.png"), "batch", ("pass",), "t") is None


def test_replot_from_results_json(tmp_path):
    pytest.importorskip("matplotlib")
    rep = Report(str(tmp_path), _env())
    for b in (1, 2):
        rep.add(Result("attention", "eager reference", {"pass": "fwd", "dtype": "fp32", "shift": (2, 0), "batch": b},
                       Timing(b, b, b, b, 5), {"GB/s": 1.0}, reference=True))
    rows = harness.results_from_json(json.loads((tmp_path / "results.json").read_text()))
    assert rows[0].params["shift"] == (2, 0) and rows[1].timing.median_ms == 2 and rows[0].reference
    assert run.main(["--replot", str(tmp_path)]) == 0
    assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG"


# --- FLOPs and bytes ------------------------------------------------------------------------------
def test_vit_b_flops_match_the_hand_count():
    f = pretrain.mae_flops(AudioMAEConfig.preset("base"), 0.8)
    # kept patches K = int(512 * 0.2) = 102, encoder tokens N = 103, D = 768, Dd = 512, window 16
    patch_embed = 2 * 102 * 256 * 768  # 40,108,032
    encoder = 12 * 103 * (24 * 768 ** 2 + 4 * 103 * 768)  # 17,887,629,312
    decoder_embed = 2 * 103 * 768 * 512  # 81,002,496
    decoder = 16 * 512 * (24 * 512 ** 2 + 4 * 16 * 512)  # 51,808,043,008
    pred = 2 * 512 * 512 * 256  # 134,217,728
    assert f["forward"] == patch_embed + encoder + decoder_embed + decoder + pred == 69_951_000_576
    assert f["step"] == 3 * 69_951_000_576 == 209_853_001_728


def test_global_decoder_flops_count_all_tokens():
    cfg = AudioMAEConfig.preset("base", decoder_mode="global", decoder_depth=8)
    f = pretrain.mae_flops(cfg, 0.8)
    assert f["decoder"] == 8 * 513 * (24 * 512 ** 2 + 4 * 513 * 512)


def test_attention_bytes_moved():
    u = 32 * 512 * 512 * 2  # batch 32, 512 tokens, 512 channels, bf16
    assert attention.bytes_moved(32, torch.bfloat16, backward=False) == 4 * u == 67_108_864
    assert attention.bytes_moved(32, torch.bfloat16, backward=True) == 11 * u
    assert attention.bytes_moved(1, torch.float32, backward=False) == 4 * 512 * 512 * 4


# --- attention variants -----------------------------------------------------------------------------
def test_registry_has_the_variants_and_takes_new_ones():
    names = set(attention.VARIANTS)
    assert {"eager reference", "sdpa", "flex_attention (compiled)", "xformers", "triton (audiomae)",
            "cuda mma (audiomae)", "cuda smem (audiomae)"} <= names
    assert [v.name for v in attention.VARIANTS.values() if v.reference] == ["eager reference"]
    try:
        @attention.variant("test variant", available=lambda device: "never here")
        def mine(qkv, tau, bias, grid, window, shift, num_heads):
            return window_attention_reference(qkv, tau, bias, grid, window, shift, num_heads)

        v = attention.VARIANTS["test variant"]
        assert v.fn is mine and v.available(CPU) == "never here" and not v.reference
    finally:
        attention.VARIANTS.pop("test variant", None)


def test_backends_that_cannot_run_here_say_why():
    for name in ("triton (audiomae)", "cuda mma (audiomae)", "cuda smem (audiomae)"):
        why = attention.VARIANTS[name].available(CPU)
        if why is None:
            pytest.skip(f"{name} can run on CPU tensors here")
        assert isinstance(why, str) and why


@pytest.mark.parametrize("shift", [(2, 0), (0, 0), (2, 2)])
def test_sdpa_variant_equals_the_reference(shift):
    grid, window, heads = (8, 4), (4, 4), 2
    qkv = torch.randn(2, 32, 3 * heads * 8, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor([0.005, 0.7], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(heads, 16, 16, dtype=torch.float64, requires_grad=True)
    ref = window_attention_reference(qkv, tau, bias, grid, window, shift, heads)
    got = attention.sdpa(qkv, tau, bias, grid, window, shift, heads)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, (qkv, tau, bias), g), torch.autograd.grad(ref, (qkv, tau, bias), g)):
        torch.testing.assert_close(a, b)


def test_partition_roundtrip():
    qkv = torch.randn(2, 64 * 8, 3 * 16 * 4)
    q, k, v = attention.partition(qkv, (64, 8), (4, 4), (2, 0), 16)
    assert q.shape == (2, 32, 16, 16, 4)
    back = attention.unpartition(v, (64, 8), (4, 4), (2, 0))
    torch.testing.assert_close(back, qkv[..., 2 * 64:])


def test_a_wrong_variant_is_not_timed():
    def ignores_shift(qkv, tau, bias, grid, window, shift, num_heads):
        return window_attention_reference(qkv, tau, bias, grid, window, (0, 0), num_heads)

    wrong = attention.Variant("ignores shift", ignores_shift, lambda d: None)
    ok, msg = attention.check_variant(wrong, 1, torch.float32, (2, 0), CPU, backward=False)
    assert not ok and msg.startswith("wrong out")
    ok, msg = attention.check_variant(attention.VARIANTS["sdpa"], 1, torch.float32, (2, 0), CPU, backward=True)
    assert ok, msg

    def raises(*args):
        raise RuntimeError("unsupported")

    ok, msg = attention.check_variant(attention.Variant("r", raises, lambda d: None), 1, torch.float32, (0, 0), CPU,
                                      backward=False)
    assert not ok and "RuntimeError: unsupported" in msg


def test_step_op_gate_checks_the_mlp_against_float64(monkeypatch):
    pytest.importorskip("triton")
    from benchmarks import step_ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    small = step_ops.OpCase("small MLP", "gelu_mlp", step_ops._mlp(9, 32))
    assert step_ops._why_not(small, CPU, torch.float32) is None
    assert step_ops.check(small, 2, torch.float32, CPU, backward=True) == (True, "ok")
    assert step_ops.check(small, 2, torch.bfloat16, CPU, backward=False) == (True, "ok")
    # a wrong result is not timed
    import audiomae.kernels.gelu_mlp as km

    real = km.gelu_mlp_dgelu

    def halved(dy, w, h, write_partial):
        dh, part = real(dy, w, h, write_partial)
        return dh * 0.5, part

    monkeypatch.setattr(km, "gelu_mlp_dgelu", halved)
    ok, msg = step_ops.check(small, 2, torch.float32, CPU, backward=True)
    assert not ok and msg.startswith("wrong gradient")


# --- command line and the GPU suite --------------------------------------------------------------------
def test_cli_rejects_unknown_sections():
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "attention,nope"])
    args = run.parse_args(["--only", "fbank,pretrain", "--quick", "--batch", "auto"])
    assert args.sections == ["fbank", "pretrain"] and args.quick and args.batch == "auto"


def test_compile_options_are_parsed_checked_and_passed_to_torch_compile(monkeypatch):
    args = run.parse_args(["--only", "pretrain", "--compile-options",
                           "coordinate_descent_tuning=true, triton.cudagraphs=False,max_autotune_gemm_backends=ATEN"])
    assert args.compile_options == {"coordinate_descent_tuning": True, "triton.cudagraphs": False,
                                    "max_autotune_gemm_backends": "ATEN"}
    assert run.inductor_options("realize_opcount_threshold=30") == {"realize_opcount_threshold": 30}
    for bad in (["--compile-options", "no_such_option=1"], ["--compile-options", "coordinate_descent_tuning"],
                ["--compile-options", ","],
                ["--compile-mode", "max-autotune", "--compile-options", "coordinate_descent_tuning=true"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)
    seen = {}

    def fake_compile(model, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = AudioMAEConfig.preset("tiny")
    with pytest.raises(RuntimeError, match="stop here"):
        pretrain._time_column(cfg, 1, torch.device("cpu"), "c", None, {"coordinate_descent_tuning": True}, False,
                              {}, pretrain.mae_flops(cfg, 0.8), 1.0, 1)
    assert seen == {"mode": None, "options": {"coordinate_descent_tuning": True}}


def test_op_backends_are_parsed_checked_and_forced_in_the_fused_columns(monkeypatch):
    args = run.parse_args(["--only", "pretrain", "--op-backends", "gelu_mlp=triton, window_attention=cuda"])
    assert args.op_backends == {"gelu_mlp": "triton", "window_attention": "cuda"}
    assert run.parse_args([]).op_backends is None
    for bad in ("no_such_op=triton", "gelu_mlp=tpu", "gelu_mlp", ","):
        with pytest.raises(SystemExit):
            run.parse_args(["--op-backends", bad])
        with pytest.raises(ValueError):
            run.op_backends(bad)
    from audiomae import dispatch

    with pretrain.backends("torch", {"gelu_mlp": "triton"}):
        assert dispatch.forced_backend("gelu_mlp") == "triton"
        assert dispatch.forced_backend("window_attention") == "torch"
    assert dispatch.forced_backend("gelu_mlp") is None
    seen = []

    def fake_step_fn(model, opt, device):
        return lambda spec: seen.append((dispatch.forced_backend("gelu_mlp"), dispatch.forced_backend("fbank_features")))

    monkeypatch.setattr(pretrain, "_step_fn", fake_step_fn)
    cfg = AudioMAEConfig.preset("tiny")
    result = pretrain._time_column(cfg, 1, CPU, "fused", None, False, False, {}, pretrain.mae_flops(cfg, 0.8), 1.0,
                                   1, op_backends={"gelu_mlp": "triton"})
    assert result.timing is not None and seen and set(seen) == {("triton", None)}


def test_forced_op_backends_run_next_to_the_automatic_columns(monkeypatch, tmp_path):
    """With --op-backends the fused and compiled columns run twice, with the forced backends and with
    the automatic choice (the baseline of the same run); the eager reference never."""
    ran = []

    def fake_time_column(cfg, batch, device, label, backend, compiled, is_ref, params, flops, peak, n, profile_to,
                         op_backends):
        ran.append((label, backend, bool(compiled), is_ref, dict(op_backends)))
        return harness.Result(pretrain.SECTION, label, params, None, note="not timed", reference=is_ref)

    monkeypatch.setattr(pretrain, "_time_column", fake_time_column)
    monkeypatch.setattr(pretrain, "_breakdown", lambda *a, **k: None)
    forced = {"gelu_mlp": "triton"}
    for columns, want in [(None, 5), (("compile",), 2)]:
        ran.clear()
        ctx = harness.Context(CPU, True, Report(str(tmp_path), _env()), harness.Budget(1e9),
                              dict(batch=1, model="tiny", op_backends=forced,
                                   pretrain_columns=columns or ("eager", "fused", "compile")))
        ctx._matmul = (1.0, torch.float32)
        pretrain.run(ctx)
        assert len(ran) == want
    assert ran == [("fused + torch.compile (gelu_mlp=triton)", None, True, False, forced),
                   ("fused + torch.compile", None, True, False, {})]
    ran.clear()
    ctx.options["pretrain_columns"] = ("eager", "fused")
    pretrain.run(ctx)
    assert ran == [("eager (torch backend)", "torch", False, True, {}),
                   ("fused (auto; gelu_mlp=triton)", None, False, False, forced), ("fused (auto)", None, False, False, {})]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the clean skip without CUDA")
def test_cli_skips_cleanly_without_cuda(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--out", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stdout and not (tmp_path / "r").exists()


def test_cli_runs_a_small_cpu_section(tmp_path):
    rc = run.main(["--only", "fbank", "--quick", "--device", "cpu", "--fbank-batch", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    timed = {r["name"]: r for r in data["results"] if r["section"] == "fbank"}
    assert timed["reference, batched"]["reference"] and timed["reference, batched"]["median_ms"] > 0
    assert timed["reference, per clip"]["metrics"]["clips/s"] > 0
    assert data["sections"]["fbank"]["clip_samples"] == 160000
    md = (tmp_path / "results.md").read_text()
    assert "Log-mel front end" in md and "triton (audiomae): not run" in md


def test_tuning_file_with_only_mlp_rows_sets_the_mlp_tiling(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from audiomae.kernels import gelu_mlp

    monkeypatch.setattr(gelu_mlp, "TUNING", {})
    keys = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps(dict(rows=[dict(kernel="mlp", direction="bwd", method="triton", ms=0.4,
                                               **dict(zip(keys, (64, 128, 64, 8, 4, 3))))])))
    out = tmp_path / "r"
    assert run.main(["--only", "fbank", "--quick", "--device", "cpu", "--fbank-batch", "1", "--tuning", str(tune),
                     "--out", str(out)]) == 0
    assert gelu_mlp.TUNING == {"bwd": (64, 128, 64, 8, 4, 3)}
    assert "MLP tiling" in json.loads((out / "results.json").read_text())["config"]
    # a sweep with nothing usable (its kernels all failed) measures with the default tilings
    tune.write_text(json.dumps(dict(rows=[dict(kernel="mlp", direction="fwd", method="torch", ms=0.3),
                                          dict(kernel="mlp", direction="fwd", method="triton", error="x")])))
    gelu_mlp.TUNING.clear()
    assert run.main(["--only", "fbank", "--quick", "--device", "cpu", "--fbank-batch", "1", "--tuning", str(tune),
                     "--out", str(out)]) == 0
    assert gelu_mlp.TUNING == {}
    assert json.loads((out / "results.json").read_text())["config"]["tuning"] == "none usable; default tilings"


def test_cpu_table_from_pytest_benchmark_json():
    from benchmarks.cpu_table import table

    data = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}, "torch": "2.13", "cpu_count": 2},
            "datetime": "2026-01-01T00:00:00", "benchmarks": [
                {"group": "g", "name": "slow", "stats": {"median": 0.002, "q1": 0.0019, "q3": 0.0021, "rounds": 5}},
                {"group": "g", "name": "fast", "stats": {"median": 0.001, "q1": 0.0009, "q3": 0.0011, "rounds": 9}}]}
    md = table(data)
    assert "- CPU: Test CPU" in md and "## g" in md
    assert "| fast | 1 | 0.9-1.1 | 9 | 2.00x |" in md


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_script_parses():
    out = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_best_attention_tiling_from_a_tune_json(tmp_path):
    rows = [
        dict(kernel="attention", direction="fwd", block_m=16, num_warps=2, heads_fast=True, groups_per_program=1,
             ms=0.30),
        dict(kernel="attention", direction="fwd", block_m=16, num_warps=1, heads_fast=True, groups_per_program=4,
             ms=0.21),
        dict(kernel="attention", direction="fwd", block_m=64, num_warps=1, heads_fast=True, groups_per_program=4,
             error="OutOfResources: shared memory"),
        dict(kernel="attention", direction="bwd", block_m=32, num_warps=2, heads_fast=False, groups_per_program=16,
             ms=0.80),
        dict(kernel="attention", direction="bwd", block_m=16, num_warps=2, heads_fast=True, groups_per_program=1,
             ms=1.05),
        dict(kernel="fbank", method="fft", ms=0.01),
    ]
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(dict(device="x", rows=rows)))
    assert run.best_attention_tiling(str(path)) == {
        "fwd": dict(block_m=16, num_warps=1, heads_fast=True, groups_per_program=4),
        "bwd": dict(block_m=32, num_warps=2, heads_fast=False, groups_per_program=16)}
    path.write_text(json.dumps(dict(rows=[rows[2], rows[-1]])))
    with pytest.raises(SystemExit, match="no timed attention rows"):
        run.best_attention_tiling(str(path))
    assert run.best_mlp_tiling(str(path)) == {}
    keys = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
    mlp = [dict(kernel="mlp", direction="fwd", method="torch", ms=0.1),
           dict(kernel="mlp", direction="fwd", method="triton", ms=0.3, **dict(zip(keys, (128, 256, 64, 8, 8, 3)))),
           dict(kernel="mlp", direction="fwd", method="triton", ms=0.2, **dict(zip(keys, (128, 128, 64, 8, 4, 4)))),
           dict(kernel="mlp", direction="bwd", method="triton", error="OutOfResources",
                **dict(zip(keys, (256, 256, 64, 8, 8, 3)))),
           dict(kernel="mlp", direction="bwd", method="triton", ms=0.5, **dict(zip(keys, (64, 128, 64, 8, 4, 4)))),
           dict(kernel="mlp", direction="bwd", method="torch", ms=0.6)]
    # PyTorch's forward (0.1 ms) beats every tiling: that half stays on PyTorch's ops
    path.write_text(json.dumps(dict(rows=rows + mlp)))
    assert run.best_mlp_tiling(str(path)) == {"fwd": "torch", "bwd": (64, 128, 64, 8, 4, 4)}
    mlp[0]["ms"] = 0.25
    path.write_text(json.dumps(dict(rows=rows + mlp)))
    assert run.best_mlp_tiling(str(path)) == {"fwd": (128, 128, 64, 8, 4, 4), "bwd": (64, 128, 64, 8, 4, 4)}
    # the backward's 7th value (its tile of h loaded before the K loop) comes along when it won
    mlp.append(dict(kernel="mlp", direction="bwd", method="triton", ms=0.4,
                    **dict(zip(keys + ("prefetch_h",), (128, 128, 64, 8, 8, 4, 1)))))
    path.write_text(json.dumps(dict(rows=rows + mlp)))
    assert run.best_mlp_tiling(str(path))["bwd"] == (128, 128, 64, 8, 8, 4, 1)
    # and the 8th (persistent programs per SM), with the 7th before it
    for direction, ms in (("bwd", 0.3), ("fwd", 0.15)):
        mlp.append(dict(kernel="mlp", direction=direction, method="triton", ms=ms, prefetch_h=0,
                        **dict(zip(keys + ("persistent",), (64, 256, 64, 8, 8, 3, 2)))))
    path.write_text(json.dumps(dict(rows=rows + mlp)))
    assert run.best_mlp_tiling(str(path)) == {"fwd": (64, 256, 64, 8, 8, 3, 0, 2), "bwd": (64, 256, 64, 8, 8, 3, 0, 2)}


def test_profile_kernel_categories_and_summary():
    from benchmarks import pretrain

    cases = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "nvjet_tst_128x256_64x4_1x2_h_bz_TNT": "matmul",
        "_window_attention_bwd_kernel": "window attention",
        "void am::wa::wa_backward_mma_kernel<__nv_bfloat16, 32, true>(...)": "window attention",
        "flash_fwd_kernel": "encoder attention (SDPA)",
        "triton_poi_fused_gelu_5": "fused by inductor",
        "void at::native::(anonymous namespace)::fused_adamw_kernel": "optimizer",
        "_patch_embed_fwd_kernel": "step ops (embed, unshuffle, loss)",
        "Memcpy HtoD (Pinned -> Device)": "copies and fills",
        "something new": "other",
    }
    for name, category in cases.items():
        assert pretrain.kernel_category(name) == category, name
    text = pretrain.kernel_summary([("nvjet_tst_a", 3000.0), ("nvjet_tst_a", 1000.0), ("flash_fwd_kernel", 4000.0)], 2)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1] == "| matmul | 2.000 | 50.0 |" and rows[2] == "| encoder attention (SDPA) | 2.000 | 50.0 |"
    assert "| all | 4.000 | 100.0 |" in rows
    assert "| `nvjet_tst_a` | matmul | 1 | 2.000 |" in rows


def test_variant_selection_by_name_or_part():
    assert attention.selects(["triton", "cuda"], "cuda mma (audiomae)")
    assert attention.selects(["Triton (audiomae)"], "triton (audiomae)")
    assert not attention.selects(["cuda"], "triton (audiomae)")
    assert not attention.selects(["", " "], "sdpa")


def test_environ_sets_unsets_and_restores(monkeypatch):
    from benchmarks.harness import environ

    monkeypatch.setenv("AUDIOMAE_TEST_A", "before")
    monkeypatch.delenv("AUDIOMAE_TEST_B", raising=False)
    with pytest.raises(RuntimeError):
        with environ(AUDIOMAE_TEST_A=None, AUDIOMAE_TEST_B="inside"):
            assert "AUDIOMAE_TEST_A" not in os.environ and os.environ["AUDIOMAE_TEST_B"] == "inside"
            raise RuntimeError
    assert os.environ["AUDIOMAE_TEST_A"] == "before" and "AUDIOMAE_TEST_B" not in os.environ


def test_a_variant_of_the_wrong_dtype_or_without_gradients_is_not_timed():
    def float32_out(qkv, tau, bias, grid, window, shift, num_heads):
        return window_attention_reference(qkv.float(), tau.float(), bias.float(), grid, window, shift, num_heads)

    ok, msg = attention.check_variant(attention.Variant("f32", float32_out, lambda d: None), 1, torch.bfloat16, (2, 0),
                                      CPU, backward=False)
    assert not ok and "out is torch.float32, not torch.bfloat16" in msg

    def no_bias(qkv, tau, bias, grid, window, shift, num_heads):
        return window_attention_reference(qkv, tau, bias.detach(), grid, window, shift, num_heads)

    ok, msg = attention.check_variant(attention.Variant("nb", no_bias, lambda d: None), 1, torch.float32, (0, 0), CPU,
                                      backward=True)
    assert not ok and msg.startswith("no gradients of its output") and "raised" not in msg


VARIANT_MODULE = '''
from audiomae.reference import window_attention_reference
from benchmarks.attention import variant


@variant("plugin right")
def right(qkv, tau, bias, grid, window, shift, num_heads):
    return window_attention_reference(qkv, tau, bias, grid, window, shift, num_heads)


@variant("plugin batchdep")
def batchdep(qkv, tau, bias, grid, window, shift, num_heads):
    out = window_attention_reference(qkv, tau, bias, grid, window, shift, num_heads)
    return out * 0 if qkv.shape[0] > 1 else out
'''


def test_out_of_tree_variants_with_import_and_results_kept_across_runs(tmp_path, capsys):
    mod = tmp_path / "myvariants.py"
    mod.write_text(VARIANT_MODULE)
    out = tmp_path / "out"
    try:
        assert run.main(["--import", str(mod), "--list-variants"]) == 0
        assert "plugin right" in capsys.readouterr().out
        rc = run.main(["--import", str(mod), "--only", "attention", "--quick", "--device", "cpu", "--variants",
                       "plugin,nosuch", "--attention-batches", "1,2", "--attention-dtypes", "fp32", "--out", str(out)])
        assert rc == 0
        data = json.loads((out / "results.json").read_text())
        names = {r["name"] for r in data["results"]}
        assert "plugin right" in names and "plugin batchdep" not in names  # wrong at batch 2: not timed
        notes = " ".join(data["notes"]["attention"])
        assert "plugin batchdep" in notes and "batch 2: not timed" in notes and "--variants nosuch" in notes
        assert (out / "attention.png").exists()
    finally:
        for name in ("plugin right", "plugin batchdep"):
            attention.VARIANTS.pop(name, None)
        sys.modules.pop("benchmarks_import_myvariants", None)
    # a second run of another section keeps the attention rows
    assert run.main(["--only", "fbank", "--quick", "--device", "cpu", "--fbank-batch", "1", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    sections = {r["section"] for r in data["results"]}
    assert sections == {"attention", "fbank"} and (out / "attention.png").exists()
    assert any("kept from an earlier run" in n for n in data["notes"]["attention"])
    # results of another device are moved aside, not lost
    data["environment"]["device"] = "some GPU"
    (out / "results.json").write_text(json.dumps(data))
    assert run.main(["--only", "fbank", "--quick", "--device", "cpu", "--fbank-batch", "1", "--out", str(out)]) == 0
    assert any(p.name.startswith("results-") for p in out.iterdir())
    assert {r["section"] for r in json.loads((out / "results.json").read_text())["results"]} == {"fbank"}


@pytest.mark.parametrize("argv,message", [
    (["--attention-batches", "2,x"], "expected comma-separated whole numbers"),
    (["--attention-dtypes", "fp64"], "unknown fp64"),
    (["--batch", "-1"], "expected a whole number of at least 1"),
    (["--pretrain-columns", "nosuch"], "unknown nosuch"),
    (["--time-budget", "0"], "must be a positive number"),
])
def test_cli_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.main(argv + ["--device", "cpu"])
    assert message in capsys.readouterr().err


def test_cli_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "tune.json"
    for text, message in [(None, "No such file"), ("{", "not JSON"), ("[1, 2]", "expected the JSON object")]:
        if text is not None:
            bad.write_text(text)
        with pytest.raises(SystemExit, match=message):
            run.main(["--only", "fbank", "--device", "cpu", "--tuning", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="cannot read"):
        run.main(["--replot", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="--import nosuchmodule"):
        run.main(["--import", "nosuchmodule", "--list-variants"])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write there"):
        run.main(["--only", "fbank", "--device", "cpu", "--out", str(tmp_path / "file" / "sub")])


def test_kept_sections_name_the_run_that_measured_them(tmp_path):
    """Merged twice, kept rows still name their own run (commit, settings, peaks), once."""
    def report(commit, sections, rows):
        env = {"device": "CPU test", "commit": commit, "date": f"day {commit}", "torch": "2.x"}
        r = Report(str(tmp_path), env, {"sections": ",".join(sections), "quick": commit == "AAA"})
        r.peaks = {"bw": commit}
        kept = harness.keep_earlier_sections(r, sections)
        for section in rows:
            r.add(Result(section, "x (ref)", {"batch": 1}, Timing(1.0, 1.0, 1.0, 1.0, 3), reference=True))
        return r, kept

    report("AAA", ["fbank"], ["fbank"])
    _, kept = report("BBB", ["step_ops"], ["step_ops"])
    assert kept == ["fbank"]
    r, kept = report("CCC", ["step_ops"], ["step_ops"])
    assert kept == ["fbank"]
    notes = r.notes["fbank"]
    assert len([n for n in notes if n.startswith(harness.KEPT_NOTE)]) == 1
    assert "commit AAA" in notes[0] and "quick=yes" in notes[0] and "bw AAA" in notes[0] and "BBB" not in notes[0]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["sections"]["fbank"]["measured_in"]["commit"] == "AAA"
    # an unreadable file is moved aside under a name of its own each time
    for _ in range(2):
        (tmp_path / "results.json").write_text("{ truncated")
        report("DDD", ["fbank"], ["fbank"])
    assert sorted(p.name for p in tmp_path.glob("results-unreadable*.json")) == ["results-unreadable-2.json",
                                                                                  "results-unreadable.json"]
