"""The fused GELU MLP (:mod:`audiomae.kernels.gelu_mlp`) against ``fc2(gelu(fc1(x)))`` in PyTorch:
the output and every gradient in float32 / bfloat16 / float16, odd shapes, unwritten outputs,
autocast, the dispatch, determinism and the whole model.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (the autouse fixture sets
``TRITON_INTERPRET=1``); with one, the same tests run on CUDA tensors. Output buffers start as NaN,
so an element a kernel forgot to write fails.
"""
import contextlib

import pytest
import torch
import torch.nn as nn

triton = pytest.importorskip("triton")

from audiomae import AudioMAE, AudioMAEConfig, dispatch, ops  # noqa: E402
from audiomae.layers import Mlp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max error against float64, relative to max(1, max |reference|): float32 a fixed bound; 16-bit
# dtypes HALF_FACTOR x PyTorch's own error in that dtype plus about one unit in the last place
# (Triton's interpreter truncates when it rounds float32 to bfloat16, PyTorch rounds to nearest).
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
HALF_FACTOR = 2.0
NAMES = ("y", "dx", "dw1", "db1", "dw2", "db2")
# persistent GPU tilings of both GEMMs (candidates of benchmarks.tune.MLP_TILINGS)
PERSISTENT = {"fwd": (64, 128, 64, 8, 4, 3, 0, 2), "bwd": (64, 256, 64, 8, 8, 3, 0, 1)}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def kernels(monkeypatch, interpret):
    import audiomae.kernels.gelu_mlp as km

    monkeypatch.setattr(km, "POISON_OUTPUTS", True)
    monkeypatch.setattr(km, "TUNING", {})
    monkeypatch.setattr(km, "SMS", 3)  # persistent tilings: several tiles per program, on a GPU too
    return km


def inputs(shape, D, H, E, bias=True, seed=0):
    """float64 leaves (x [*shape, D], w1, b1, w2, b2) with unit-scale activations, and dy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    w1 = torch.randn(H, D, generator=g, dtype=torch.float64) / D ** 0.5
    b1 = torch.randn(H, generator=g, dtype=torch.float64) * 0.5 if bias else None
    w2 = torch.randn(E, H, generator=g, dtype=torch.float64) / H ** 0.5
    b2 = torch.randn(E, generator=g, dtype=torch.float64) * 0.5 if bias else None
    dy = torch.randn(*shape, E, generator=g, dtype=torch.float64)
    return [x, w1, b1, w2, b2], dy


def run(backend, leaves, dy, dtype, grads=(True,) * 5):
    """Output and the gradients of the leaves that ask for one, with ``leaves`` cast to ``dtype``."""
    x = [None if t is None else t.to(DEVICE, dtype).requires_grad_(want) for t, want in zip(leaves, grads)]
    with dispatch.use_backend(backend, op="gelu_mlp"):
        y = ops.gelu_mlp(*x)
    wrt = [t for t in x if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, wrt, dy.to(DEVICE, y.dtype)) if wrt else []
    return [y.detach()] + [g.detach() for g in got]


def rel_err(x, ref):
    return ((x.double().cpu() - ref.double().cpu()).abs().max() / ref.double().abs().max().clamp(min=1.0)).item()


def check(leaves, dy, dtype, grads=(True,) * 5):
    exact = run("torch", leaves, dy, torch.float64, grads)
    own = run("torch", leaves, dy, dtype, grads)
    got = run("triton", leaves, dy, dtype, grads)
    names = ["y"] + [n for n, t, want in zip(NAMES[1:], leaves, grads) if t is not None and want]
    assert len(got) == len(exact) == len(names)
    errors = {}
    for name, g, r, o in zip(names, got, exact, own):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten or overflow)"
        bound = TOL[dtype] if dtype == torch.float32 else HALF_FACTOR * rel_err(o, r) + TOL[dtype]
        errors[name] = rel_err(g, r)
        assert errors[name] <= bound, f"{name}: error {errors[name]:.3g} > bound {bound:.3g}"
    return errors


# ----------------------------------------------------------------------------------------------
# values and gradients
# ----------------------------------------------------------------------------------------------
SHAPES = [((37,), 24, 40, 24), ((2, 9), 33, 17, 9), ((3, 20), 64, 256, 64), ((1,), 16, 16, 16)]


@pytest.mark.parametrize("shape,D,H,E", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_values_and_grads(dtype, shape, D, H, E):
    leaves, dy = inputs(shape, D, H, E)
    check(leaves, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_without_biases(dtype):
    leaves, dy = inputs((19,), 24, 48, 12, bias=False)
    check(leaves, dy, dtype)


@pytest.mark.parametrize("prefetch_h,persistent", [(0, 0), (1, 0), (0, 1), (1, 2)],
                         ids=["h-after-loop", "h-prefetched", "persistent", "persistent-2-per-sm-h-prefetched"])
@pytest.mark.parametrize("even_k", [True, False], ids=["even-k", "odd-k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gpu_style_tiling(kernels, monkeypatch, dtype, even_k, prefetch_h, persistent):
    """Several programs along both axes, partial tiles, row groups, a K loop with and without a tail,
    the backward's tile of h loaded after the K loop or before it; one program per output tile, or
    persistent programs that each loop over several tiles."""
    monkeypatch.setattr(kernels, "TUNING", {"fwd": (16, 32, 16, 2, 4, 1, 0, persistent),
                                            "bwd": (32, 16, 16, 3, 4, 1, prefetch_h, persistent)})
    launched = []
    real = kernels._programs
    monkeypatch.setattr(kernels, "_programs", lambda *a: launched.append((a[2], real(*a))) or launched[-1][1])
    D, E = (48, 32) if even_k else (40, 24)
    leaves, dy = inputs((70,), D, 72, E)
    check(leaves, dy, dtype)
    # (tiles, programs) of each launch: fwd 5 x 3 tiles of 16 x 32, bwd 3 x 5 tiles of 32 x 16; with
    # persistent programs (kernels.SMS = 3) 3 or 6 programs, each with several tiles
    assert launched and all(tiles == 15 for tiles, _ in launched), launched
    assert all(programs == (3 * persistent or tiles) for tiles, programs in launched), launched


@pytest.mark.parametrize("halves", [("torch", None), (None, "torch"), ("torch", "torch")],
                         ids=["fwd-torch", "bwd-torch", "both-torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_either_half_on_pytorch(kernels, monkeypatch, dtype, halves):
    """TUNING[half] = "torch" computes that half with cuBLAS and PyTorch's GELU (or its derivative):
    the same values and gradients, and no Triton kernel runs for it."""
    tuning = {k: v for k, v in zip(("fwd", "bwd"), halves) if v}
    monkeypatch.setattr(kernels, "TUNING", tuning)
    calls = []
    for name in ("gelu_mlp_fc1", "gelu_mlp_dgelu"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    leaves, dy = inputs((2, 9), 24, 40, 12)
    check(leaves, dy, dtype)
    assert ("gelu_mlp_fc1" in calls) == ("fwd" not in tuning)
    assert ("gelu_mlp_dgelu" in calls) == ("bwd" not in tuning)
    # only fc2 trains: no gradient needs h, and h is not kept (gelu(h) is), under either forward
    x = [t.detach().to(DEVICE, dtype) for t in leaves]
    x[3].requires_grad_(True)
    kept = []
    with dispatch.use_backend("triton", op="gelu_mlp"), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        y = ops.gelu_mlp(*x)
    assert kept.count((18, 40)) == 1, kept
    (dw2,) = torch.autograd.grad(y, x[3], dy.to(DEVICE, dtype))
    ref = torch.autograd.grad(ops.gelu_mlp_reference(*x), x[3], dy.to(DEVICE, dtype))[0]
    assert rel_err(dw2, ref) <= 2 * TOL[dtype]


@pytest.mark.parametrize("which,value", [("fwd", "cublas"), ("fwd", (16, 32, 16)), ("fwd", (16, 32, 16, 2, 4, 1, 1)),
                                         ("bwd", (16, 32, 16, 2, 4, 1, 2)), ("bwd", (16, 32, 16, 2, 4, 1, 0, 3)),
                                         ("fwd", (16, 32, 16, 2, 4, 1, 0, 1, 0))],
                         ids=["unknown-name", "short-tiling", "prefetch-in-fwd", "prefetch-not-0-or-1",
                              "persistent-not-0-1-or-2", "too-long"])
def test_a_bad_tuning_value_is_a_clear_error(kernels, monkeypatch, which, value):
    monkeypatch.setattr(kernels, "TUNING", {which: value})
    leaves, _ = inputs((5,), 8, 16, 8)
    x = [t.detach().to(DEVICE, torch.float32).requires_grad_() for t in leaves]
    with dispatch.use_backend("triton", op="gelu_mlp"), pytest.raises(ValueError, match="TUNING"):
        ops.gelu_mlp(*x).sum().backward()


@pytest.mark.parametrize("grads", [(False, True, True, True, True), (True, False, False, True, False),
                                   (False, False, False, True, True), (True, True, False, False, False)],
                         ids=["weights-only", "x-w1-w2", "fc2-only", "x-w1"])
def test_only_the_needed_gradients(grads):
    leaves, dy = inputs((21,), 24, 40, 24)
    check(leaves, dy, torch.float32, grads)


def test_without_grad_equals_with_grad():
    leaves, _ = inputs((2, 11), 24, 40, 24)
    x = [t.to(DEVICE, torch.bfloat16) for t in leaves]
    with dispatch.use_backend("triton", op="gelu_mlp"):
        with torch.no_grad():
            plain = ops.gelu_mlp(*x)
        x[1].requires_grad_(True)
        trained = ops.gelu_mlp(*x)
    assert torch.equal(plain, trained.detach())


def test_h_is_written_only_for_a_gradient_into_fc1(kernels, monkeypatch):
    seen = []
    real = kernels.gelu_mlp_fc1

    def spy(x, w, b, write_h):
        seen.append(write_h)
        return real(x, w, b, write_h)

    monkeypatch.setattr(kernels, "gelu_mlp_fc1", spy)
    leaves, _ = inputs((7,), 16, 32, 16)
    x = [t.to(DEVICE, torch.float32).requires_grad_() for t in leaves]
    with dispatch.use_backend("triton", op="gelu_mlp"):
        with torch.no_grad():  # inference with trainable parameters
            ops.gelu_mlp(*x)
        x[0].requires_grad_(False)
        x[1].requires_grad_(False)
        x[2].requires_grad_(False)
        ops.gelu_mlp(*x).sum().backward()  # only fc2 trains
        x[1].requires_grad_(True)
        ops.gelu_mlp(*x).sum().backward()
    assert seen == [False, False, True]


def test_rounding_follows_the_eager_computation_exactly(kernels):
    """float16 values on a 1/64 grid with few terms: the matmul products and sums are exact in
    float32, so the only roundings are the ones to float16. The kernels round h before the GELU and
    dy @ W2 before the GELU derivative, as the eager MLP does, so h, gelu(h) and dh equal PyTorch's
    except where the two erf implementations round a value differently (one float16 unit in the
    last place, in under 1 % of the elements); the bias sums are float32 sums of the rounded dh."""
    g = torch.Generator().manual_seed(3)

    def grid(*shape, scale):
        return (torch.randint(-scale, scale + 1, shape, generator=g).double() / 64).to(DEVICE, torch.float16)

    M, D, H, E = 48, 16, 64, 16
    x, w1, b1, w2 = grid(M, D, scale=64), grid(H, D, scale=40), grid(H, scale=64), grid(E, H, scale=40)
    dy = grid(M, E, scale=64)
    h_ref = torch.nn.functional.linear(x, w1, b1)
    dh_ref = torch.ops.aten.gelu_backward(dy @ w2, h_ref)

    def same(got, want):
        off = (got.float() - want.float()).abs()
        assert (off <= want.float().abs() * 2 ** -10 + 2 ** -24).all(), off.max().item()
        assert (off > 0).float().mean() < 0.01, f"{(off > 0).sum().item()} of {off.numel()} differ"

    h, gh = kernels.gelu_mlp_fc1(x, w1, b1, True)
    assert torch.equal(h, h_ref)
    same(gh, torch.nn.functional.gelu(h_ref))
    dh, part = kernels.gelu_mlp_dgelu(dy, w2, h, True)
    same(dh, dh_ref)
    torch.testing.assert_close(part.sum(0), dh.float().sum(0), rtol=1e-6, atol=1e-6)


def test_double_backward_says_it_is_not_supported():
    leaves, _ = inputs((5,), 8, 16, 8)
    x = [t.to(DEVICE, torch.float32).requires_grad_() for t in leaves]
    with dispatch.use_backend("triton", op="gelu_mlp"):
        y = ops.gelu_mlp(*x)
    (gx,) = torch.autograd.grad(y, x[0], torch.ones_like(y, requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice|double"):
        gx.sum().backward()


def test_non_contiguous_input():
    leaves, dy = inputs((24,), 40, 32, 16)
    x = leaves[0].t().contiguous().t()  # column-major
    assert not x.is_contiguous()
    check([x] + leaves[1:], dy, torch.float32)


def test_strided_and_expanded_bias_and_transposed_weights():
    """b1 as a strided view or an expanded scalar (the kernel reads a dense vector: the op copies it),
    and weights stored transposed; values and the gradients of the tensors the views come from."""
    leaves, dy = inputs((21,), 24, 40, 12)
    x, w1, _, w2, b2 = [t.float().to(DEVICE) for t in leaves]
    dy = dy.float().to(DEVICE)
    w1 = w1.t().contiguous().t()  # column-major views
    w2 = w2.t().contiguous().t()
    for base, view in ((torch.randn(80, device=DEVICE), lambda t: t[::2]),
                       (torch.tensor(0.7, device=DEVICE), lambda t: t.expand(40))):
        got = {}
        for backend in ("torch", "triton"):
            b = base.clone().requires_grad_(True)
            xw = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
            with dispatch.use_backend(backend, op="gelu_mlp"):
                y = ops.gelu_mlp(xw[0], xw[1], view(b), xw[2], b2)
            got[backend] = [y.detach()] + list(torch.autograd.grad(y, [b] + xw, dy))
        for name, g, r in zip(("y", "b1", "x", "w1", "w2"), got["triton"], got["torch"]):
            assert rel_err(g, r) <= TOL[torch.float32], name


@pytest.mark.parametrize("M,D,H,E", [(0, 16, 32, 16), (3, 0, 8, 4), (3, 4, 8, 0), (3, 4, 0, 4)],
                         ids=["no-rows", "no-inputs", "no-outputs", "no-hidden"])
def test_empty_dimensions_match_the_reference(M, D, H, E):
    leaves = [torch.randn(M, D), torch.randn(H, D), torch.randn(H), torch.randn(E, H), torch.randn(E)]
    outs = {}
    for backend in ("torch", "triton"):
        x = [t.to(DEVICE).requires_grad_() for t in leaves]
        with dispatch.use_backend(backend, op="gelu_mlp"):
            y = ops.gelu_mlp(*x)
        outs[backend] = [y.detach()] + list(torch.autograd.grad(y, x, torch.ones_like(y)))
    assert outs["triton"][0].shape == (M, E)
    for got, want in zip(outs["triton"], outs["torch"]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reductions_are_deterministic(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "TUNING", {"bwd": (16, 32, 16, 2, 4, 1)})
    leaves, dy = inputs((90,), 32, 64, 32)
    first = run("triton", leaves, dy, torch.float32)
    again = run("triton", leaves, dy, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ----------------------------------------------------------------------------------------------
# autocast: the fused op casts as autocast casts nn.Linear
# ----------------------------------------------------------------------------------------------
def test_autocast_matches_the_layers():
    leaves, dy = inputs((2, 13), 32, 64, 32)
    outs = {}
    for backend in ("torch", "triton"):
        x = [t.float().to(DEVICE).requires_grad_() for t in leaves]
        with dispatch.use_backend(backend, op="gelu_mlp"), torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = ops.gelu_mlp(*x)
        grads = torch.autograd.grad(y, x, dy.to(DEVICE, y.dtype))
        outs[backend] = (y, grads)
    (y_ref, g_ref), (y, g) = outs["torch"], outs["triton"]
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for name, a, b in zip(NAMES[1:], g, g_ref):
        assert a.dtype == b.dtype == torch.float32, name
        assert rel_err(a, b) < 3e-2, name


def test_autocast_leaves_float64_alone_as_for_linear():
    leaves, _ = inputs((4,), 8, 16, 8)
    x = [t.to(DEVICE) for t in leaves]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert ops.gelu_mlp(*x).dtype == torch.float64
        why = dispatch.reasons("gelu_mlp", *x)["triton"]
        assert any("float64" in r for r in why), why
        mixed = [x[0].float()] + x[1:]
        assert any("mixed dtypes" in r for r in dispatch.reasons("gelu_mlp", *mixed)["triton"])


def test_mlp_layer_routes_through_the_op(monkeypatch):
    seen = []
    real = dispatch.call

    def spy(op, *args, **kwargs):
        seen.append(op)
        return real(op, *args, **kwargs)

    monkeypatch.setattr(dispatch, "call", spy)
    x = torch.randn(3, 8)
    Mlp(8, 16)(x)
    assert seen == ["gelu_mlp"]
    seen.clear()
    Mlp(8, 16, act=nn.ReLU)(x)  # only the exact GELU is fused
    Mlp(8, 16, act=lambda: nn.GELU(approximate="tanh"))(x)
    Mlp(8, 16, drop=0.1).train()(x)  # dropout between the layers: the modules
    hooked = Mlp(8, 16)
    calls = []
    hooked.fc1.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    hooked(x)  # a hook on a layer: the layers are called, so it runs
    assert seen == [] and calls == [(3, 16)]
    layer = Mlp(8, 16, drop=0.1).eval()
    ref = layer.fc2(layer.act(layer.fc1(x)))
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    assert seen == ["gelu_mlp"]


# ----------------------------------------------------------------------------------------------
# dispatch and the custom ops
# ----------------------------------------------------------------------------------------------
def test_dispatch_is_opt_in_and_explains(monkeypatch):
    leaves, _ = inputs((5,), 16, 32, 16)
    x = [t.float().to(DEVICE) for t in leaves]
    assert dispatch.preference("gelu_mlp") == ("torch",)
    assert dispatch.choose("gelu_mlp", *x)[0] == "torch"
    assert dispatch.reasons("gelu_mlp", *x)["triton"] == []
    bad = [x[0].half()] + x[1:]
    why = dispatch.reasons("gelu_mlp", *bad)["triton"]
    assert any("mixed dtypes" in r for r in why)
    with dispatch.use_backend("triton", op="gelu_mlp"):
        with pytest.raises(dispatch.BackendUnavailableError, match="mixed dtypes"):
            ops.gelu_mlp(*bad)
    why = dispatch.reasons("gelu_mlp", x[0], x[1], x[2], x[3][:, :5], x[4])["triton"]
    assert any("do not chain" in r for r in why)
    why = dispatch.reasons("gelu_mlp", *[t.double() for t in x])["triton"]
    assert any("float64" in r for r in why)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        assert any("CPU" in r for r in dispatch.reasons("gelu_mlp", *x)["triton"])


def test_custom_ops_schema_and_fake_impls(kernels):
    leaves, dy = inputs((12,), 16, 32, 8)
    x, w1, b1, w2, b2 = [t.to(DEVICE, torch.bfloat16) for t in leaves]
    h = kernels.gelu_mlp_fc1(x, w1, b1, True)[0]
    cases = [
        (torch.ops.audiomae.gelu_mlp_fc1, (x, w1, b1, True)),
        (torch.ops.audiomae.gelu_mlp_fc1, (x, w1, None, False)),
        (torch.ops.audiomae.gelu_mlp_dgelu, (dy.to(DEVICE, torch.bfloat16), w2, h, True)),
        (torch.ops.audiomae.gelu_mlp_dgelu, (dy.to(DEVICE, torch.bfloat16), w2, h, False)),
        (torch.ops.audiomae.gelu_mlp_dgelu, (dy.to(DEVICE, torch.bfloat16), w2, h.t().contiguous().t(), True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("tuning", [{}, {"fwd": "torch"}, {"bwd": "torch"}, PERSISTENT],
                         ids=["triton", "fwd-torch", "bwd-torch", "persistent"])
def test_dynamo_traces_the_op_without_graph_breaks(kernels, monkeypatch, tuning):
    """Dynamo captures the dispatch, the autocast casts and the autograd function in one graph (run
    by the eager backend here; inductor's compilation of the kernels is a GPU test below), also with
    a half on PyTorch's ops."""
    monkeypatch.setattr(kernels, "TUNING", tuning)
    leaves, dy = inputs((2, 9), 16, 32, 16)
    x = [t.float().to(DEVICE).requires_grad_() for t in leaves]

    def mlp(*args):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return ops.gelu_mlp(*args)

    with dispatch.use_backend("triton", op="gelu_mlp"):
        eager = mlp(*x)
        eager_grads = torch.autograd.grad(eager, x, dy.to(DEVICE, eager.dtype))
        y = torch.compile(mlp, fullgraph=True, backend="eager")(*x)
        grads = torch.autograd.grad(y, x, dy.to(DEVICE, y.dtype))
    assert torch.equal(y, eager)
    assert all(torch.equal(g, e) for g, e in zip(grads, eager_grads))


# ----------------------------------------------------------------------------------------------
# the whole model
# ----------------------------------------------------------------------------------------------
def model_loss_and_grads(model, spec, noise, backend):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draws (the decoder's position-bias MLP) in both runs
    with contextlib.ExitStack() as stack:
        stack.enter_context(dispatch.use_backend("torch"))  # every other op: the reference
        stack.enter_context(dispatch.use_backend(backend, op="gelu_mlp"))
        out = model(spec, noise=noise)
        out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_model_same_loss_and_grads():
    cfg = AudioMAEConfig.preset("tiny", decoder_depth=2)
    model = AudioMAE(cfg).to(DEVICE)
    spec = torch.randn(2, 1, *cfg.img_size, device=DEVICE)
    noise = torch.rand(2, cfg.num_patches, device=DEVICE)
    ref, ref_grads = model_loss_and_grads(model, spec, noise, "torch")
    got, grads = model_loss_and_grads(model, spec, noise, "triton")
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.pred, ref.pred, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and "blocks.0.mlp.fc1.bias" in grads
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-3)
        assert (g - ref_grads[name]).abs().max() <= 1e-4 * scale, name


# ----------------------------------------------------------------------------------------------
# GPU: the paper's decoder and encoder MLPs in bfloat16, torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("tuning", [{}, PERSISTENT], ids=["default", "persistent"])
@pytest.mark.parametrize("shape,D", [((4, 512), 512), ((8, 103), 768)], ids=["decoder", "encoder"])
def test_paper_shapes_bf16_cuda(kernels, monkeypatch, shape, D, tuning):
    monkeypatch.setattr(kernels, "TUNING", tuning)
    monkeypatch.setattr(kernels, "SMS", None)  # the GPU's own SM count
    leaves, dy = inputs(shape, D, 4 * D, D)
    errors = check(leaves, dy, torch.bfloat16)
    assert max(errors.values()) < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tuning", [{}, {"fwd": "torch"}, {"bwd": "torch"}, PERSISTENT],
                         ids=["triton", "fwd-torch", "bwd-torch", "persistent"])
def test_torch_compile_traces_the_op(kernels, monkeypatch, tuning):
    monkeypatch.setattr(kernels, "TUNING", tuning)
    torch._dynamo.reset()
    leaves, dy = inputs((4, 64), 64, 256, 64)
    x = [t.float().to(DEVICE).requires_grad_() for t in leaves]

    def mlp(*args):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ops.gelu_mlp(*args)

    with dispatch.use_backend("triton", op="gelu_mlp"):
        eager = mlp(*x)
        eager_grads = torch.autograd.grad(eager, x, dy.to(DEVICE, eager.dtype))
        compiled = torch.compile(mlp, fullgraph=True)
        y = compiled(*x)
        grads = torch.autograd.grad(y, x, dy.to(DEVICE, y.dtype))
    torch.testing.assert_close(y, eager, rtol=1e-2, atol=1e-2)
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) < 1e-2
