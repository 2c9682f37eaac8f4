"""Backend dispatch: overrides (environment, set_backend, use_backend), reasons, automatic choice,
and that a missing Triton never breaks the package."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from audiomae import dispatch, info, ops  # noqa: F401  (ops registers the backends)
from audiomae.dispatch import BackendUnavailableError

OP = "window_attention"


@pytest.fixture(autouse=True)
def _clean_dispatch(monkeypatch):
    """No override leaks in or out: empty forced table, no environment variable, no interpreter."""
    monkeypatch.setattr(dispatch, "_FORCED", {})
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def example(dtype=torch.float32):
    """Window attention inputs: grid 8 x 4, window 4 x 4, shift (2, 0), 2 heads of 16."""
    qkv = torch.randn(1, 32, 3 * 32, dtype=dtype)
    return qkv, torch.ones(2, dtype=dtype), torch.zeros(2, 16, 16, dtype=dtype), (8, 4), (4, 4), (2, 0), 2


def triton_importable():
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


needs_triton = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")


def test_automatic_choice_on_cpu_is_torch():
    assert dispatch.choose(OP, *example())[0] == "torch"
    why = dispatch.reasons(OP, *example())
    assert why["torch"] == []
    assert why["triton"]  # CPU tensors without the interpreter, or triton missing
    assert why["cuda"]  # not implemented, or (audiomae.ops_cuda imported) no CUDA here


@needs_triton
def test_automatic_choice_under_the_interpreter_is_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose(OP, *example())[0] == "triton"
    # ... unless the kernel cannot run these inputs: then the reference, with the reason logged
    assert dispatch.choose(OP, *example(torch.float64))[0] == "torch"


def test_automatic_choice_logs_why_a_backend_was_skipped(caplog):
    with caplog.at_level(logging.DEBUG, logger="audiomae.dispatch"):
        dispatch.choose(OP, *example())
    assert any("triton not used" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("interpret", [False, True], ids=["torch-backend", "triton-interpreter"])
def test_the_training_forward_traces_as_one_graph(monkeypatch, interpret):
    """torch.compile sees the whole training forward of the model as one graph: the dispatch layer
    (backend choice, its checks and its logging) adds no graph break, with either backend."""
    if interpret:
        if not triton_importable():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from audiomae import AudioMAE, AudioMAEConfig

    torch._dynamo.reset()
    cfg = AudioMAEConfig.preset("tiny")
    model = AudioMAE(cfg).train()
    spec = torch.randn(2, 1, *cfg.img_size)
    chosen = dispatch.choose("window_attention", *example())[0]
    assert chosen == ("triton" if interpret else "torch")
    explained = torch._dynamo.explain(lambda s: model(s, mask_ratio=0.8).loss)(spec)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
    torch._dynamo.reset()


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.forced_backend(OP) == "torch"
    assert dispatch.choose(OP, *example())[0] == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "TRITON")  # case-insensitive
    assert dispatch.forced_backend(OP) == "triton"
    with pytest.raises(BackendUnavailableError, match="backend 'triton' was asked for"):
        dispatch.choose(OP, *example())
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.forced_backend(OP) is None


def test_set_backend_takes_precedence_over_the_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.set_backend("torch")
    assert dispatch.choose(OP, *example())[0] == "torch"
    dispatch.set_backend(None)  # the automatic choice, as the docstring and the error message say
    assert dispatch.forced_backend(OP) is None
    assert dispatch.choose(OP, *example())[0] == "torch"  # the automatic choice on the CPU
    dispatch.set_backend("auto", op=OP)
    assert dispatch.forced_backend(OP) is None
    dispatch._FORCED.clear()  # no setting left: the environment applies again
    assert dispatch.forced_backend(OP) == "triton"


def test_per_op_setting_beats_the_global_one():
    dispatch.set_backend("cuda")
    dispatch.set_backend("torch", op=OP)
    assert dispatch.forced_backend(OP) == "torch"
    assert dispatch.forced_backend("some_other_op") == "cuda"


def test_a_backend_forced_for_every_op_leaves_the_ops_without_it_to_the_automatic_choice(monkeypatch):
    """gelu_mlp has no CUDA version: forcing cuda everywhere (or by the environment) keeps the automatic
    choice for it, so that the model still runs; forcing it for that op alone raises."""
    x, w1, b1, w2, b2 = torch.randn(3, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    for force in ("set_backend", "environment"):
        if force == "set_backend":
            dispatch.set_backend("cuda")
        else:
            monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
        assert dispatch.forced_backend(OP) == "cuda" and dispatch.forced_backend("gelu_mlp") is None
        assert dispatch.choose("gelu_mlp", x, w1, b1, w2, b2)[0] == "torch"
        torch.testing.assert_close(ops.gelu_mlp(x, w1, b1, w2, b2), ops.gelu_mlp_reference(x, w1, b1, w2, b2))
        dispatch._FORCED.clear()
    dispatch.set_backend("cuda", op="gelu_mlp")
    with pytest.raises(BackendUnavailableError, match="no cuda implementation of gelu_mlp"):
        ops.gelu_mlp(x, w1, b1, w2, b2)


def test_check_device_refuses_a_forced_backend_that_cannot_run_on_the_device(monkeypatch):
    dispatch.check_device("cpu")  # nothing forced: nothing to refuse
    with dispatch.use_backend("torch"):
        dispatch.check_device("cpu")
    with dispatch.use_backend("cuda"):
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' was asked for but cannot run on cpu") as e:
            dispatch.check_device("cpu")
        assert e.value.backend == "cuda" and e.value.op is None
        assert "the device is cpu (the CUDA kernels need CUDA tensors)" in e.value.reasons
    if triton_importable():
        with dispatch.use_backend("triton", op="gelu_mlp"):
            with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
                dispatch.check_device(torch.device("cpu"))
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            dispatch.check_device("cpu")
            assert dispatch.device_reasons("triton", "meta") == ["tensors are on meta, Triton kernels need CUDA"]
    assert dispatch.device_reasons("torch", "cpu") == []


def test_use_backend_restores_the_previous_setting():
    dispatch.set_backend("torch", op=OP)
    with dispatch.use_backend("triton", op=OP):
        assert dispatch.forced_backend(OP) == "triton"
        with dispatch.use_backend(None, op=OP):
            assert dispatch.forced_backend(OP) is None
        assert dispatch.forced_backend(OP) == "triton"
    assert dispatch.forced_backend(OP) == "torch"
    with dispatch.use_backend("cuda"):
        assert dispatch.forced_backend("x") == "cuda"
    assert None not in dispatch._FORCED
    with pytest.raises(RuntimeError), dispatch.use_backend("triton"):
        raise RuntimeError("restored even on errors")
    assert None not in dispatch._FORCED


def test_forced_unavailable_backend_raises_its_reasons():
    with dispatch.use_backend("cuda"):
        with pytest.raises(BackendUnavailableError) as err:
            ops.window_attention(*example())
    for reason in dispatch.reasons(OP, *example())["cuda"]:  # the reasons are the message
        assert reason in str(err.value)
    with dispatch.use_backend("triton"):
        with pytest.raises(BackendUnavailableError) as err:
            ops.window_attention(*example(torch.float64))
    msg = str(err.value)
    assert "backend 'triton' was asked for but cannot run" in msg and dispatch.ENV_VAR in msg
    if triton_importable():
        assert "tensors are on the CPU" in msg and "dtype torch.float64" in msg
    else:
        assert "triton is not importable" in msg


@needs_triton
def test_triton_reasons_for_unsupported_inputs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qkv, tau, bias, grid, window, shift, heads = example()
    assert dispatch.reasons(OP, qkv, tau, bias, grid, window, shift, heads)["triton"] == []
    why = dispatch.reasons(OP, torch.zeros(1, 32, 3 * 256), tau, bias, grid, window, shift, 1)["triton"]
    assert why == ["head_dim 256 > 128"]
    why = dispatch.reasons(OP, torch.zeros(1, 72, 96), tau, torch.zeros(2, 72, 72), (9, 8), (9, 8), (0, 0), 2)["triton"]
    assert why == ["window area 9 x 8 = 72 > 64"]
    why = dispatch.reasons(OP, *example(torch.float64))["triton"]
    assert why == ["dtype torch.float64 is not one of float32, bfloat16, float16"]


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        dispatch.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        with dispatch.use_backend("tpu"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register(OP, "numpy", lambda *a: None)
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        dispatch.choose(OP, *example())


def test_unknown_op_and_failing_checks(monkeypatch):
    with pytest.raises(KeyError, match="no implementation registered"):
        dispatch.choose("no_such_op")
    monkeypatch.setitem(dispatch._REGISTRY, "flaky_op", {})
    monkeypatch.setitem(dispatch._PREFERENCE, "flaky_op", ("triton", "torch"))

    def broken_check(*args):
        raise RuntimeError("boom")

    dispatch.register("flaky_op", "triton", lambda x: "triton", broken_check)
    dispatch.register("flaky_op", "torch", lambda x: "torch")
    assert dispatch.reasons("flaky_op", 1)["triton"] == ["support check failed: RuntimeError: boom"]
    assert "flaky_op" in dispatch.registered_ops()


def test_triton_reasons_when_triton_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    why = dispatch.triton_reasons(torch.zeros(1))
    assert len(why) == 1 and why[0].startswith("triton is not importable")
    assert dispatch.choose(OP, *example())[0] == "torch"


def test_import_without_triton_never_fails():
    """A fresh interpreter where triton cannot be imported: the package imports, the model runs on
    the reference, nothing imports triton or initialises CUDA."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, audiomae\n"
        "from audiomae import dispatch\n"
        "m = audiomae.AudioMAE(audiomae.AudioMAEConfig.preset('tiny')).eval()\n"
        "with torch.no_grad(): m(torch.randn(1, 1, 256, 128))\n"
        "why = dispatch.reasons('window_attention', torch.zeros(1, 32, 96), torch.ones(2), torch.zeros(2, 16, 16),"
        " (8, 4), (4, 4), (0, 0), 2)['triton']\n"
        "assert why[0].startswith('triton is not importable'), why\n"
        "assert not torch.cuda.is_initialized()\n"
        "import audiomae.info; audiomae.info.report()\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in (dispatch.ENV_VAR, "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


def test_import_does_not_import_triton():
    code = "import sys, audiomae, audiomae.ops, audiomae.model; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_info_lists_ops_backends_and_versions(capsys):
    assert info.main([]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "triton" in text
    assert "window_attention (implementations: torch, triton" in text and "automatic order: triton, torch" in text
    assert "runs on torch" in text
    assert "gelu_mlp (implementations: torch, triton; automatic order: torch)" in text
    assert "x [2, 64, 512] float32 on cpu, 512 -> 2048 -> 512: runs on torch" in text
    for backend in ("torch", "triton", "cuda"):
        assert f"    {backend}" in text


def _toy_op(monkeypatch, triton_passed_over=None, triton_prepare=None):
    """A throwaway op with a triton and a torch implementation (the registry is restored afterwards)."""
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))
    monkeypatch.setattr(dispatch, "_PREFERENCE", dict(dispatch._PREFERENCE))
    dispatch.register("toy", "torch", lambda x: ("torch", x))
    dispatch.register("toy", "triton", lambda x: ("triton", x), passed_over=triton_passed_over,
                      prepare=triton_prepare)
    dispatch.set_preference("toy", ("triton",))


def test_a_passed_over_backend_is_skipped_automatically_but_runs_when_forced(monkeypatch, caplog):
    _toy_op(monkeypatch, triton_passed_over=lambda x: ["slower below 10"] if x < 10 else [])
    assert dispatch.call("toy", 3) == ("torch", 3)
    assert dispatch.call("toy", 30) == ("triton", 30)
    with caplog.at_level(logging.DEBUG, logger="audiomae.dispatch"):
        dispatch.choose("toy", 3)
    assert "slower below 10" in caplog.text
    with dispatch.use_backend("triton", op="toy"):
        assert dispatch.call("toy", 3) == ("triton", 3)
    assert dispatch.reasons("toy", 3)["triton"] == []  # it can run them
    assert dispatch.passed_over("toy", 3) == {"torch": [], "triton": ["slower below 10"]}
    assert dispatch.would_choose("toy", 3) == "torch"


def test_a_failed_prepare_step_falls_through_with_a_warning(monkeypatch):
    calls = []

    def prepare():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("building the extension failed: no compiler")

    _toy_op(monkeypatch, triton_prepare=prepare)
    assert dispatch.would_choose("toy", 0) == "triton" and not calls  # no one-time step for a question
    with pytest.warns(RuntimeWarning, match="toy: the triton backend is not used: building the extension failed"):
        assert dispatch.call("toy", 1) == ("torch", 1)
    assert dispatch.call("toy", 2) == ("triton", 2)  # the step succeeds now
    assert len(calls) == 2
    with dispatch.use_backend("triton", op="toy"):  # forcing runs the implementation itself
        assert dispatch.call("toy", 3) == ("triton", 3)
    assert len(calls) == 2


@pytest.mark.parametrize("batch,dtype,window,head_dim,kernel_env,taken", [
    (128, torch.bfloat16, (4, 4), 32, "", True),  # the paper's layer at batch 128: 65536 (window, head) pairs
    (256, torch.float16, (4, 4), 32, "auto", True),
    (64, torch.bfloat16, (4, 4), 32, "", False),  # Triton is faster on fewer pairs
    (256, torch.float32, (4, 4), 32, "", False),  # the shared-memory kernels: Triton is faster
    (256, torch.bfloat16, (4, 4), 128, "", False),
    (256, torch.bfloat16, (8, 4), 32, "", False),
    (256, torch.bfloat16, (4, 4), 32, "smem", False),
])
def test_the_cuda_window_attention_is_taken_where_it_was_measured_faster(monkeypatch, batch, dtype, window, head_dim,
                                                                        kernel_env, taken):
    from audiomae import ops_cuda

    monkeypatch.setattr(ops_cuda, "_device_info", lambda device: ((9, 0), 232448))
    monkeypatch.setenv(ops_cuda.KERNEL_ENV, kernel_env)
    heads = 512 // head_dim
    qkv = torch.empty(batch, 512, 3 * 512, dtype=dtype, device="meta")
    tau, bias = torch.empty(heads, device="meta"), torch.empty(heads, window[0] * window[1], window[0] * window[1])
    why = ops_cuda._window_attention_cuda_passed_over(qkv, tau, bias, (64, 8), window, (0, 0), heads)
    assert (why == []) == taken, why


def test_auto_overrides_the_environment_and_the_global_setting(monkeypatch):
    """set_backend(None) / 'auto' is the automatic choice whatever AUDIOMAE_BACKEND says (as the error
    message advises), and a per-op 'auto' beats a backend forced for every op."""
    from audiomae import AudioMAE, AudioMAEConfig

    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match=r"Unset AUDIOMAE_BACKEND or call .*set_backend\(None\)"):
        dispatch.choose(OP, *example())
    dispatch.set_backend(None)
    assert dispatch.forced_backend(OP) is None
    assert dispatch.choose(OP, *example())[0] == "torch"
    model = AudioMAE(AudioMAEConfig.preset("tiny")).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 1, 256, 128)).loss)
    dispatch.set_backend("cuda")
    dispatch.set_backend("auto", op=OP)
    assert dispatch.forced_backend(OP) is None and dispatch.forced_backend("fbank_features") == "cuda"
    assert dispatch.choose(OP, *example())[0] == "torch"
    with pytest.raises(BackendUnavailableError, match=r"Call audiomae.dispatch.set_backend\(None\) .*precedence"):
        dispatch.choose("fbank_features", torch.zeros(1, 16000))
    dispatch.set_backend("cuda", op=OP)  # forced for this op only: the advice names the op
    with pytest.raises(BackendUnavailableError, match=r"set_backend\(None, op='window_attention'\)"):
        dispatch.choose(OP, *example())


def test_set_backend_rejects_bad_backends_and_unknown_ops():
    for bad in (3, 1.0, ["torch"]):
        with pytest.raises(ValueError, match="torch, triton, cuda or 'auto'"):
            dispatch.set_backend(bad)
    with pytest.raises(ValueError, match=r"unknown op 'window_atention'; the ops are .*window_attention"):
        dispatch.set_backend("triton", op="window_atention")
    with pytest.raises(ValueError, match="unknown op"):
        with dispatch.use_backend("torch", op="gelu"):
            pass
    with pytest.raises(ValueError, match="op must be an op name"):
        dispatch.set_backend("torch", op=5)
    assert dispatch._FORCED == {}  # nothing stored by a refused call
    for op in dispatch.registered_ops():  # every real op is taken, and 'AUTO' is the automatic choice
        with dispatch.use_backend("torch", op=op):
            assert dispatch.forced_backend(op) == "torch"
    dispatch.set_backend("AUTO", op=OP)
    assert dispatch._FORCED == {OP: None}


def test_an_op_not_yet_registered_is_imported_before_it_is_refused(monkeypatch):
    """Ops register when their module is imported: set_backend imports the op modules before it
    refuses a name, so an op whose module was not imported yet is accepted (and registered)."""
    import audiomae

    monkeypatch.setattr(dispatch, "_REGISTRY", {k: v for k, v in dispatch._REGISTRY.items()
                                                if k not in ("masked_patch_embed", "decoder_unshuffle")})
    monkeypatch.setattr(dispatch, "_PREFERENCE", dict(dispatch._PREFERENCE))
    monkeypatch.setattr(audiomae, "ops_step", audiomae.ops_step)  # the package attribute, restored
    monkeypatch.delitem(sys.modules, "audiomae.ops_step")  # as if never imported (restored afterwards)
    assert "masked_patch_embed" not in dispatch.registered_ops()
    dispatch.set_backend("torch", op="masked_patch_embed")
    assert "masked_patch_embed" in dispatch.registered_ops()
    assert dispatch.forced_backend("masked_patch_embed") == "torch"


def test_the_environment_variable_is_named_when_it_holds_no_backend(monkeypatch):
    """AUDIOMAE_BACKEND=bogus raised 'unknown backend' from every op without naming the variable, and
    'triton ' (a trailing space from a shell script) was no backend."""
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"AUDIOMAE_BACKEND='bogus': unknown backend 'bogus'"):
        dispatch.forced_backend(OP)
    monkeypatch.setenv(dispatch.ENV_VAR, " torch ")
    assert dispatch.forced_backend(OP) == "torch"


def test_fbank_features_takes_the_same_arguments_on_every_backend():
    """A fused front end's int() took target_length True (1 frame) or 2.7 (2 frames) and 2.5 mel bins,
    which the reference refused; the reference took an integer out_dtype."""
    from audiomae import ops_step
    w = 0.1 * torch.randn(2, 1200)
    for kw, message in (({"target_length": True}, "target_length must be a positive whole number, got True"),
                        ({"target_length": 2.7}, "target_length must be a positive whole number, got 2.7"),
                        ({"num_mel_bins": 2.5}, "num_mel_bins must be a positive whole number, got 2.5")):
        with pytest.raises(ValueError, match=message):
            ops_step.fbank_features(w, **{"target_length": 8, **kw})
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype, got torch.int32"):
        ops_step.fbank_features(w, 8, out_dtype=torch.int32)
    assert ops_step.fbank_features(w, None).shape == (2, 1, 6, 128)  # 1 + (1200 - 400) // 160 frames
