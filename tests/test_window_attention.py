"""The fused Triton window attention against the reference: values, every gradient, the shift mask,
dtypes, determinism, the whole model, and torch.compile.

Without a GPU the kernels run under Triton's interpreter on CPU tensors: the ``interpret`` fixture
sets ``TRITON_INTERPRET=1`` for one test only. The kernels choose between the interpreter and the
GPU compiler at each launch, so it does not matter which module imported triton first, and the rest
of the suite keeps running on the reference. Shapes are small because the interpreter is slow.
Every test fills the kernels' output buffers with NaN first, so an element left unwritten fails.
"""
import re

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from audiomae import AudioMAE, AudioMAEConfig, dispatch, ops  # noqa: E402
from audiomae.kernels import window_attention as wa  # noqa: E402
from audiomae.reference import shift_mask, window_attention_reference, window_geometry  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max error against the float64 reference, relative to max(1, max |reference|): at most FACTOR times
# the error any computation in that dtype starts with, plus TOL[dtype]. That baseline is the larger
# of PyTorch's own error (the reference run in the dtype) and the error of exact (float64) math on
# inputs rounded to the dtype; the second matters for tau's gradient, a sum with cancellations whose
# error is set by the rounding of the inputs and which PyTorch's own run sometimes misses by luck.
# float32 with moderate temperatures: ~1e-6 baselines, so the bound is ~1e-5; with 1/tau = 100 the
# baselines grow to ~1e-5 and the bound follows them.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-4}
FACTOR = 2.0


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(wa, "POISON_OUTPUTS", True)


def make_inputs(batch, grid, window, shift, heads, head_dim, device="cpu", tau=None, bias_scale=2.0):
    """float64 leaves (qkv, tau, bias) and the clamped geometry."""
    window, shift = window_geometry(grid, window, shift)
    C, A = heads * head_dim, window[0] * window[1]
    qkv = torch.randn(batch, grid[0] * grid[1], 3 * C, dtype=torch.float64, device=device)
    if tau is None:
        tau = torch.empty(heads, dtype=torch.float64).uniform_(0.05, 1.5)
    tau = torch.as_tensor(tau, dtype=torch.float64).to(device)
    bias = bias_scale * torch.randn(heads, A, A, dtype=torch.float64, device=device)
    return (qkv, tau, bias), (tuple(grid), window, shift, heads)


def run(fn, inputs, geometry, grad_out, dtype):
    """Output and (qkv, tau, bias) gradients of ``fn`` with the inputs cast to ``dtype``."""
    x = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*x, *geometry)
    grads = torch.autograd.grad(out, x, grad_out.to(dtype))
    return [out.detach()] + [g.detach() for g in grads]


def kernel(qkv, tau, bias, grid, window, shift, heads):
    return wa.window_attention(qkv, tau, bias, grid, window, shift, heads)


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


NAMES = ("out", "grad_qkv", "grad_tau", "grad_bias")


def check_against_reference(inputs, geometry, dtype, floor=None):
    """Kernel vs float64 reference for the output and every gradient; returns the errors."""
    grad_out = torch.randn(inputs[0].shape[0], inputs[0].shape[1], inputs[0].shape[2] // 3, dtype=torch.float64,
                           device=inputs[0].device)
    ref = run(window_attention_reference, inputs, geometry, grad_out, torch.float64)
    got = run(kernel, inputs, geometry, grad_out, dtype)
    errors = {}
    for name, g, r in zip(NAMES, got, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten or overflow)"
        errors[name] = rel_err(g, r)
    own = run(window_attention_reference, inputs, geometry, grad_out, dtype)
    rounded = run(window_attention_reference, [t.to(dtype).double() for t in inputs], geometry,
                  grad_out.to(dtype).double(), torch.float64)
    floor = TOL[dtype] if floor is None else floor
    bounds = {name: FACTOR * max(rel_err(o, r), rel_err(x, r)) + floor
              for name, o, x, r in zip(NAMES, own, rounded, ref)}
    for name in NAMES:
        assert errors[name] <= bounds[name], f"{name}: error {errors[name]:.3g} > bound {bounds[name]:.3g}"
    return errors


# (batch, grid, window, shift, heads, head_dim): odd grids, packed and single windows, every head dim
CASES = [
    pytest.param(2, (12, 6), (4, 3), (2, 1), 3, 16, id="grid12x6-win4x3-shift2,1-h3x16-b2"),
    pytest.param(1, (12, 6), (4, 3), (0, 0), 2, 32, id="grid12x6-win4x3-noshift-h2x32-b1"),
    pytest.param(2, (16, 8), (4, 4), (2, 0), 4, 16, id="grid16x8-win4x4-shift2,0-h4x16-b2"),
    pytest.param(1, (16, 8), (8, 8), (4, 0), 1, 16, id="grid16x8-win8x8-shift4,0-h1x16-b1"),
    pytest.param(3, (8, 3), (4, 4), (2, 2), 2, 64, id="grid8x3-win4x4clamped-shift2,2-h2x64-b3"),
    pytest.param(1, (4, 6), (8, 8), (2, 2), 1, 32, id="grid4x6-win8x8clamped-h1x32-b1"),
    pytest.param(1, (8, 4), (4, 4), (2, 2), 1, 128, id="grid8x4-win4x4-shift2,2-h1x128-b1"),
    pytest.param(2, (6, 4), (2, 2), (1, 1), 2, 24, id="grid6x4-win2x2-shift1,1-h2x24-b2"),
]


@pytest.mark.parametrize("batch,grid,window,shift,heads,head_dim", CASES)
def test_matches_reference_fp32(interpret, batch, grid, window, shift, heads, head_dim):
    inputs, geometry = make_inputs(batch, grid, window, shift, heads, head_dim)
    check_against_reference(inputs, geometry, torch.float32)


# head dims below the 16-wide tile, 1 x 1 windows, a grid one patch long
SMALL_CASES = [
    pytest.param(2, (8, 4), (4, 4), (2, 0), 2, 8, id="grid8x4-win4x4-h2x8"),
    pytest.param(1, (6, 5), (3, 5), (1, 2), 3, 4, id="grid6x5-win3x5-h3x4"),
    pytest.param(2, (3, 4), (1, 1), (0, 0), 2, 16, id="grid3x4-win1x1-h2x16"),
    pytest.param(2, (1, 5), (1, 5), (0, 2), 1, 16, id="grid1x5-win1x5-shift0,2-h1x16"),
]


@pytest.mark.parametrize("batch,grid,window,shift,heads,head_dim", SMALL_CASES)
def test_matches_reference_small_heads_and_windows_fp32(interpret, batch, grid, window, shift, heads, head_dim):
    inputs, geometry = make_inputs(batch, grid, window, shift, heads, head_dim)
    check_against_reference(inputs, geometry, torch.float32)


def test_zero_query_and_key_rows(interpret):
    """A token whose query or key is zero (a padding token's projection without bias): its cosines
    are 0, as the reference's normalisation makes them, not NaN."""
    (qkv, tau, bias), geometry = make_inputs(2, (8, 4), (4, 4), (2, 0), 2, 16)
    C = 2 * 16
    qkv[0, 3, :16] = 0  # head 0's query of token 3
    qkv[1, 5, C + 16: 2 * C] = 0  # head 1's key of token 5
    check_against_reference((qkv, tau, bias), geometry, torch.float32)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("batch,grid,window,shift,heads,head_dim", [CASES[i] for i in (0, 2, 3, 6)])
def test_matches_reference_half(interpret, dtype, batch, grid, window, shift, heads, head_dim):
    inputs, geometry = make_inputs(batch, grid, window, shift, heads, head_dim)
    check_against_reference(inputs, geometry, DTYPES[dtype])


@pytest.mark.parametrize("batch,grid,window,shift,heads,head_dim", [CASES[i] for i in (0, 2, 3, 6)])
def test_matches_reference_fp16_products(interpret, monkeypatch, batch, grid, window, shift, heads, head_dim):
    """The GPU path for half-precision inputs (16-bit operands of the attention products, tf32x3
    cosines) run by the interpreter, which multiplies float16 blocks correctly (its bfloat16 products
    are what keeps the interpreter on float32 products)."""
    monkeypatch.setattr(wa, "_interpreting", lambda: False)
    inputs, geometry = make_inputs(batch, grid, window, shift, heads, head_dim)
    check_against_reference(inputs, geometry, torch.float16)


@pytest.mark.parametrize("block_m,gpp,heads_fast", [(16, 3, True), (32, 2, False), (64, 4, True)])
@pytest.mark.parametrize("batch,grid,window,shift,heads,head_dim", [CASES[0], CASES[2]])
def test_tilings_and_groups_per_program(interpret, monkeypatch, block_m, gpp, heads_fast, batch, grid, window,
                                        shift, heads, head_dim):
    """Overridden tilings (as the tuning sweeps set them): packed windows, several window groups per
    program with a partial last one, either grid order; forward and every gradient."""
    for direction in ("fwd", "bwd"):
        monkeypatch.setitem(wa.TUNING, direction, dict(block_m=block_m, num_warps=2, heads_fast=heads_fast,
                                                      groups_per_program=gpp))
    inputs, geometry = make_inputs(batch, grid, window, shift, heads, head_dim)
    check_against_reference(inputs, geometry, torch.float32)


@pytest.mark.parametrize("window,head_dim,dtype,hopper,fp32_products,warps,gpp", [
    ((8, 8), 16, torch.bfloat16, True, True, 8, 1),  # wgmma faults on Hopper: float32 products
    ((8, 8), 16, torch.float16, False, False, 4, 1),
    ((8, 8), 64, torch.bfloat16, True, True, 8, 1),
    ((4, 8), 32, torch.bfloat16, True, False, 2, 1),  # 32-row tiles: mma.sync, unaffected
    ((4, 4), 32, torch.bfloat16, True, False, 1, 4),  # the paper's layer: one warp, 4 windows
    ((4, 4), 64, torch.bfloat16, True, False, 2, 1),
    ((4, 4), 32, torch.float32, False, True, 4, 1),
])
def test_tiling_defaults(monkeypatch, window, head_dim, dtype, hopper, fp32_products, warps, gpp):
    """The default tiling per shape and device: 16-bit tiles of 64 rows on a Hopper GPU take float32
    products (no wgmma), and 16-token windows one warp over 4 windows."""
    monkeypatch.setattr(wa, "_wgmma_device", lambda device: hopper)
    monkeypatch.setattr(wa, "TUNING", {})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (qkv, tau, bias), geometry = make_inputs(2, (2 * window[0], window[1]), window, (0, 0), 2, head_dim)
    plan = wa._plan(qkv.to(dtype), tau.to(dtype), bias.to(dtype), *geometry)
    for direction in ("fwd", "bwd"):
        meta = plan[direction]["meta"]
        assert meta["DOT_FP32"] == fp32_products and (meta["COS_PRECISION"] == "ieee") == fp32_products, meta
        assert plan[direction]["num_warps"] == warps and meta["GPP"] == gpp, plan[direction]


@pytest.mark.parametrize("seed", range(6))
def test_random_geometries(interpret, seed):
    """Windows from 1 x 2 to 8 x 8, 1-3 windows per axis, any shift, 1-4 heads, batch 1-3."""
    g = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(n, (), generator=g))

    window = [(1, 2), (2, 2), (2, 4), (4, 3), (3, 5), (4, 4), (8, 4), (8, 8)][pick(8)]
    grid = tuple(w * (1 + pick(3)) for w in window)
    shift = tuple(pick(w) for w in window)
    inputs, geometry = make_inputs(1 + pick(3), grid, window, shift, 1 + pick(4), (16, 24, 32, 64)[pick(4)])
    check_against_reference(inputs, geometry, torch.float32)


def test_mixed_dtypes_as_under_autocast(interpret):
    """bf16 qkv and bias with a float32 tau (the model under autocast): grads come back per input dtype."""
    (qkv, tau, bias), geometry = make_inputs(2, (8, 4), (4, 4), (2, 0), 2, 16)
    x = [qkv.bfloat16().requires_grad_(), tau.float().requires_grad_(), bias.bfloat16().requires_grad_()]
    out = kernel(*x, *geometry)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert [t.grad.dtype for t in x] == [torch.bfloat16, torch.float32, torch.bfloat16]
    r = [t.detach().double().requires_grad_() for t in x]
    ref = window_attention_reference(*r, *geometry)
    ref.sum().backward()
    assert rel_err(out, ref.detach()) < 3e-2
    assert rel_err(x[1].grad, r[1].grad) < 3e-2


@pytest.mark.parametrize("grid,window,shift", [
    pytest.param((12, 6), (4, 3), (2, 1), id="grid12x6-win4x3-shift2,1"),
    pytest.param((8, 8), (4, 4), (2, 2), id="grid8x8-win4x4-shift2,2"),
    pytest.param((16, 8), (4, 4), (2, 0), id="grid16x8-win4x4-shift2,0"),
    pytest.param((6, 4), (2, 2), (1, 1), id="grid6x4-win2x2-shift1,1"),
    pytest.param((8, 4), (4, 4), (0, 0), id="grid8x4-win4x4-noshift"),
])
def test_in_kernel_shift_mask_matches_reference_mask(interpret, grid, window, shift):
    """Read the kernel's mask out of its attention weights: equal scores (q = k, no bias) and v = the
    one-hot of each token's position in its window give out[i] = softmax row i over positions, which
    is uniform over the unmasked positions and ~e^-100 elsewhere."""
    T, Fq = grid
    A = window[0] * window[1]
    nt, nf = T // window[0], Fq // window[1]
    pos = torch.arange(A).view(window[0], window[1])
    # in-window position of every token of the rolled grid, then back to original token order
    rolled = pos.repeat(nt, nf)  # [T, F]
    original = torch.roll(rolled, shifts=shift, dims=(0, 1)).reshape(-1)
    head_dim = max(16, A)
    qk = torch.ones(1, T * Fq, head_dim)
    v = F.one_hot(original, head_dim).float().unsqueeze(0)
    qkv = torch.cat([qk, qk, v], dim=-1)
    out = kernel(qkv, torch.ones(1), torch.zeros(1, A, A), grid, window, shift, 1)
    # back to [windows, A (query position), A (key position)]
    out = torch.roll(out[0].view(T, Fq, head_dim), shifts=(-shift[0], -shift[1]), dims=(0, 1))
    weights = out.view(nt, window[0], nf, window[1], head_dim).permute(0, 2, 1, 3, 4).reshape(nt * nf, A, -1)[..., :A]
    allowed = weights > 1e-20
    expected = shift_mask(grid, window, shift) == 0
    assert torch.equal(allowed, expected)
    uniform = expected.float() / expected.float().sum(-1, keepdim=True)
    torch.testing.assert_close(weights, uniform, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_probabilities_are_rounded_to_the_input_dtype_for_v(interpret, dtype, backend):
    """The probabilities are in the input dtype where they multiply v (``attn @ v``) and where they
    multiply the output's gradient (v's gradient), as the reference's softmax returns them.

    A 1 x 2 window whose cosines are 0 (q and k orthogonal) with tau 1 has the bias for its scores:
    (0, -x) in the first row, x = 31/128 (exact in both dtypes), and (0, 0) in the second. The first
    row's float32 probabilities (p0, p1) lie just above values (r0, r1) of the input dtype, so
    rounding to nearest and truncation agree, and r0 + r1 != 1; the second row's are 1/2, exactly.
    v's first channel (r1, -r0) then cancels exactly in the first row (output 0), where float32
    probabilities leave p0 * r1 - p1 * r0 (6e-4 in bfloat16, 6e-5 in float16); the next two
    channels (1, 0) and (0, 1) give r0 and r1. An output gradient (1, -2 * r0) in the first channel
    gives v's gradient r0 - r0 = 0 at the first key (p0 - r0 with float32 probabilities) and
    r1 - r0 at the second; the other channels get none."""
    dt = DTYPES[dtype]
    x = 31 / 128
    p = torch.softmax(torch.tensor([0.0, -x]), 0)
    r = p.to(dt).float()
    spacing = torch.finfo(dt).eps * 2.0 ** torch.floor(torch.log2(r))
    assert ((p > r) & (p - r < spacing / 2)).all() and r.sum() != 1
    assert (p[0] * r[1] - p[1] * r[0]).abs() > 1e-5
    D = 4
    qkv = torch.zeros(1, 2, 3 * D)
    qkv[0, :, 0] = 1  # q = e0
    qkv[0, :, D + 1] = 1  # k = e1
    qkv[0, :, 2 * D] = torch.stack([r[1], -r[0]])
    qkv[0, 0, 2 * D + 1] = 1
    qkv[0, 1, 2 * D + 2] = 1
    tau = torch.ones(1)
    bias = torch.tensor([[[0.0, -x], [0.0, 0.0]]])
    grad_out = torch.zeros(1, 2, D)
    grad_out[0, :, 0] = torch.stack([torch.tensor(1.0), -2 * r[0]])
    geometry = ((1, 2), (1, 2), (0, 0), 1)
    zero = torch.tensor(0.0)
    expected = torch.stack([torch.stack([zero, r[0], r[1], zero]),
                            torch.stack([(r[1] - r[0]) / 2, zero + 0.5, zero + 0.5, zero])]).unsqueeze(0)
    expected_dv = torch.zeros(1, 2, D)
    expected_dv[0, 1, 0] = r[1] - r[0]

    def out_and_v_grad(fn):
        leaf = qkv.to(dt).requires_grad_()
        out = fn(leaf, tau.to(dt), bias.to(dt), *geometry)
        (grad,) = torch.autograd.grad(out, leaf, grad_out.to(dt))
        return out.detach(), grad[..., 2 * D:]

    with dispatch.use_backend(backend, op="window_attention"):
        out, dv = out_and_v_grad(ops.window_attention)
    ref, ref_dv = out_and_v_grad(window_attention_reference)
    assert out.dtype == ref.dtype == dv.dtype == dt
    assert torch.equal(out, ref) and torch.equal(out.float(), expected), out
    assert torch.equal(dv, ref_dv) and torch.equal(dv.float(), expected_dv), dv


def test_masked_logit_is_added_not_skipped(interpret):
    """tau below 0.01 (1/tau clamped to 100), and just above it, and a bias of +150 on masked pairs: the masked logits beat
    the unmasked ones, so adding -100 (the release) and skipping them give different answers."""
    grid, window, shift, heads = (8, 4), (4, 4), (2, 2), 2
    (qkv, _, _), geometry = make_inputs(2, grid, window, shift, heads, 16)
    # head 1 just above the clamp: 0.01 itself rounds below it in float32 (0.0099999998), where the
    # float64 reference of the rounded inputs gives no gradient and the bound would be loose
    tau = torch.tensor([0.004, 0.010000001], dtype=torch.float64)
    m = shift_mask(grid, window, shift).double()  # [windows, A, A]
    # the last window has all four regions; give its masked pairs a large bias
    bias = (150.0 * (m[-1] != 0)).expand(heads, -1, -1).contiguous()
    # logits are 100 x cos here, so float32 rounding of cos (~6e-8) alone moves them by ~1e-5
    check_against_reference((qkv, tau, bias), geometry, torch.float32, floor=5e-5)
    with torch.no_grad():
        added = kernel(qkv.float(), tau.float(), bias.float(), *geometry)
        # the same attention with masked pairs removed instead of penalised
        skipped = window_attention_reference(qkv, tau, torch.where(m[-1] != 0, -torch.inf, bias), *geometry)
    assert (added.double() - skipped).abs().max() > 0.1
    # tau below the clamp gets no gradient; tau above it does
    t = tau.float().requires_grad_()
    kernel(qkv.float(), t, bias.float(), *geometry).square().sum().backward()
    assert t.grad[0] == 0 and t.grad[1] != 0


@pytest.mark.gpu
def test_tau_and_bias_grads_are_deterministic_odd_shape_cuda():
    """Determinism needs a GPU (the interpreter runs programs one after another): an odd window and
    head count, where window groups and heads split unevenly over programs."""
    inputs, geometry = make_inputs(3, (12, 6), (4, 3), (2, 1), 2, 16, device="cuda")
    grad_out = torch.randn(3, 72, 32, device="cuda")
    first = run(kernel, inputs, geometry, grad_out, torch.float32)
    second = run(kernel, inputs, geometry, grad_out, torch.float32)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_strided_inputs(interpret):
    """qkv as a column slice of a wider tensor and a non-contiguous grad: read through strides."""
    (qkv, tau, bias), geometry = make_inputs(2, (8, 4), (4, 2), (2, 1), 2, 16)
    wide = torch.randn(2, 32, qkv.shape[-1] + 8, dtype=torch.float64)
    wide[..., 4:4 + qkv.shape[-1]] = qkv
    view = wide[..., 4:4 + qkv.shape[-1]]
    assert not view.is_contiguous()
    grad_out = torch.randn(2, 64, 32, dtype=torch.float64)[:, ::2]
    got = run(kernel, (view, tau, bias), geometry, grad_out, torch.float32)
    ref = run(window_attention_reference, (qkv, tau, bias), geometry, grad_out, torch.float64)
    for name, g, r in zip(NAMES, got, ref):
        assert rel_err(g, r) < 1e-5, name


def test_inference_saves_nothing(interpret):
    inputs, geometry = make_inputs(1, (8, 4), (4, 4), (2, 0), 2, 16)
    qkv, tau, bias = (t.float() for t in inputs)
    out = kernel(qkv, tau, bias, *geometry)
    assert out.grad_fn is None
    with torch.no_grad():
        assert kernel(qkv.requires_grad_(), tau, bias, *geometry).grad_fn is None
    assert kernel(qkv, tau, bias, *geometry).grad_fn is not None


def test_poisoned_buffers_are_nan():
    """The poisoning the other tests rely on: kernel buffers start as NaN while it is on."""
    assert wa.POISON_OUTPUTS
    assert wa._alloc((3, 4), torch.float32, "cpu").isnan().all()


def test_rejects_what_it_cannot_run(interpret):
    (qkv, tau, bias), (grid, window, shift, heads) = make_inputs(1, (8, 4), (4, 4), (0, 0), 2, 16)
    qkv, tau, bias = qkv.float(), tau.float(), bias.float()
    with pytest.raises(ValueError, match="does not match"):
        kernel(qkv, tau, bias, (8, 8), window, shift, heads)
    with pytest.raises(ValueError, match="does not tile"):
        kernel(qkv, tau, bias, grid, (3, 4), shift, heads)
    with pytest.raises(ValueError, match="shift"):
        kernel(qkv, tau, bias, grid, window, (4, 0), heads)
    with pytest.raises(ValueError, match="bias must be"):
        kernel(qkv, tau, bias[:, :8], grid, window, shift, heads)
    # what the dispatcher is told, so that it falls back to the reference instead
    why = dispatch.reasons("window_attention", qkv.double(), tau, bias, grid, window, shift, heads)["triton"]
    assert any("dtype" in w for w in why)
    why = dispatch.reasons("window_attention", torch.zeros(1, 32, 3 * 256), tau, bias, grid, window, shift, 1)["triton"]
    assert any("head_dim 256" in w for w in why)
    big = torch.zeros(1, 9 * 8, 3 * 32)
    why = dispatch.reasons("window_attention", big, tau, torch.zeros(2, 72, 72), (9, 8), (9, 8), (0, 0), 2)["triton"]
    assert any("window area" in w for w in why)


def test_dispatch_runs_the_kernel_under_the_interpreter(interpret):
    inputs, geometry = make_inputs(1, (8, 4), (4, 4), (2, 0), 2, 16)
    args = [t.float() for t in inputs] + list(geometry)
    assert dispatch.choose("window_attention", *args)[0] == "triton"
    torch.testing.assert_close(ops.window_attention(*args), kernel(*args), rtol=0, atol=0)


def _tiny_model_loss_and_grads(model, spec, noise, backend):
    """Loss and gradients with window attention on ``backend``, every other op on the reference."""
    model.zero_grad(set_to_none=True)
    with dispatch.use_backend("torch"), dispatch.use_backend(backend, op="window_attention"):
        out = model(spec, mask_ratio=0.75, noise=noise)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_model_same_loss_and_grads(interpret):
    model = AudioMAE(AudioMAEConfig.preset("tiny")).eval()  # eval: no meta-MLP dropout
    spec, noise = torch.randn(2, 1, 256, 128), torch.rand(2, 128)
    loss_t, grads_t = _tiny_model_loss_and_grads(model, spec, noise, "triton")
    loss_r, grads_r = _tiny_model_loss_and_grads(model, spec, noise, "torch")
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-6, atol=1e-6)
    assert grads_t.keys() == grads_r.keys()
    assert any(".attn.tau" in n for n in grads_t) and any("meta_mlp" in n for n in grads_t)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_traces_through_without_graph_breaks(interpret):
    """Dynamo captures the whole tiny model in one graph with the Triton ops in it (the interpreter
    cannot run inductor's compiled graph, so the graph runs eagerly here; inductor is tested on GPU)."""
    model = AudioMAE(AudioMAEConfig.preset("tiny")).eval()
    spec, noise = torch.randn(1, 1, 256, 128), torch.rand(1, 128)
    torch._dynamo.reset()
    with dispatch.use_backend("torch"), dispatch.use_backend("triton", op="window_attention"):
        explained = torch._dynamo.explain(model)(spec, noise=noise)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
        assert "audiomae.window_attention_fwd" in targets, targets
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        loss = compiled(spec, noise=noise).loss
        loss.backward()
    with dispatch.use_backend("torch"):
        ref = model(spec, noise=noise).loss
    torch._dynamo.reset()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


# --- GPU ------------------------------------------------------------------------------------------
@pytest.fixture
def no_tf32():
    """References in full float32 (PyTorch would otherwise use tf32 for float32 matmuls on CUDA)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("batch,grid,window,shift,heads,head_dim", CASES)
def test_matches_reference_on_cuda(no_tf32, dtype, batch, grid, window, shift, heads, head_dim):
    inputs, geometry = make_inputs(batch, grid, window, shift, heads, head_dim, device="cuda")
    check_against_reference(inputs, geometry, DTYPES[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_paper_shape_on_cuda(no_tf32, dtype):
    """The paper's decoder layer: grid 64 x 8, window 4 x 4, shift (2, 0), 16 heads of 32, batch 8."""
    inputs, geometry = make_inputs(8, (64, 8), (4, 4), (2, 0), 16, 32, device="cuda")
    check_against_reference(inputs, geometry, DTYPES[dtype])


@pytest.mark.gpu
def test_masked_logit_is_added_not_skipped_on_cuda(no_tf32):
    grid, window, shift, heads = (8, 4), (4, 4), (2, 2), 2
    (qkv, _, _), geometry = make_inputs(2, grid, window, shift, heads, 16, device="cuda")
    tau = torch.tensor([0.004, 0.010000001], dtype=torch.float64, device="cuda")
    m = shift_mask(grid, window, shift).double().cuda()
    bias = (150.0 * (m[-1] != 0)).expand(heads, -1, -1).contiguous()
    check_against_reference((qkv, tau, bias), geometry, torch.float32, floor=5e-5)


@pytest.mark.gpu
def test_paper_shape_on_cuda_deterministic():
    inputs, geometry = make_inputs(8, (64, 8), (4, 4), (2, 0), 16, 32, device="cuda")
    grad_out = torch.randn(8, 512, 512, device="cuda")
    first = run(kernel, inputs, geometry, grad_out, torch.bfloat16)
    second = run(kernel, inputs, geometry, grad_out, torch.bfloat16)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_automatic_choice_on_cuda():
    """Triton for small and float32 layers; the CUDA register kernels for the paper's bf16 layer at
    batch 128 (where they were measured faster), when the extension can be built here."""
    from audiomae import cuda_ext

    inputs, geometry = make_inputs(1, (8, 4), (4, 4), (2, 0), 2, 16, device="cuda")
    assert dispatch.choose("window_attention", *[t.float() for t in inputs], *geometry)[0] == "triton"
    assert dispatch.choose("window_attention", *[t.bfloat16() for t in inputs], *geometry)[0] == "triton"
    qkv = torch.randn(128, 512, 3 * 512, device="cuda", dtype=torch.bfloat16)
    tau, bias = torch.ones(16, device="cuda"), torch.zeros(16, 16, 16, device="cuda")
    expected = "cuda" if not cuda_ext.why_not() else "triton"
    assert dispatch.choose("window_attention", qkv, tau, bias, (64, 8), (4, 4), (2, 0), 16)[0] == expected


@pytest.mark.gpu
def test_compile_tiny_model_on_cuda(no_tf32):
    """Inductor compiles the whole tiny model (fullgraph: no graph breaks) with the Triton window
    attention inside, and gives the eager loss and gradients."""
    model = AudioMAE(AudioMAEConfig.preset("tiny")).cuda().eval()
    spec, noise = torch.randn(2, 1, 256, 128, device="cuda"), torch.rand(2, 128, device="cuda")
    torch._dynamo.reset()
    eager_loss, eager_grads = _tiny_model_loss_and_grads(model, spec, noise, "triton")
    with dispatch.use_backend("torch"), dispatch.use_backend("triton", op="window_attention"):
        explained = torch._dynamo.explain(model)(spec, mask_ratio=0.75, noise=noise)
        assert explained.graph_break_count == 0
        compiled = torch.compile(model, fullgraph=True)
        model.zero_grad(set_to_none=True)
        loss = compiled(spec, mask_ratio=0.75, noise=noise).loss
        loss.backward()
    torch._dynamo.reset()
    torch.testing.assert_close(loss.detach(), eager_loss, rtol=1e-4, atol=1e-5)
    params = dict(model.named_parameters())
    for name, g in eager_grads.items():
        torch.testing.assert_close(params[name].grad, g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("heads", [0, 5, 2.0, True], ids=["zero", "not-dividing", "float", "bool"])
def test_a_head_count_that_cannot_split_the_channels_is_a_clear_error(heads):
    from audiomae import ops
    qkv, tau, bias = torch.randn(1, 16, 24), torch.ones(2, 1, 1), torch.zeros(2, 16, 16)
    with pytest.raises(ValueError, match=r"C divisible by num_heads >= 1; got qkv \[1, 16, 24\]"):
        ops.window_attention(qkv, tau, bias, (4, 4), (4, 4), (0, 0), heads)


def test_geometry_no_backend_computes_is_refused_on_every_backend():
    """The reference took a negative shift (rolled by it, masked for another) and failed in a view for
    a grid that does not match the tokens; the fused backends already refused both by name."""
    from audiomae import ops
    qkv, tau, bias = torch.randn(1, 32, 12), torch.ones(1), torch.randn(1, 4, 4)
    for grid, window, shift, why in (((8, 4), (2, 2), (-1, 0), "shift (-1, 0) must lie in [0, window)"),
                                     ((4, 4), (2, 2), (0, 0), "grid 4 x 4 does not match 32 tokens"),
                                     ((8, 4), (3, 2), (0, 0), "window 3 x 2 does not tile the 8 x 4 grid")):
        b = torch.randn(1, window[0] * window[1], window[0] * window[1])
        with pytest.raises(ValueError, match=r"window_attention: .*" + re.escape(why)):
            ops.window_attention(qkv, tau, b, grid, window, shift, 1)
    with pytest.raises(ValueError, match=r"tau must be \[1\], got \[2\]"):
        ops.window_attention(qkv, torch.ones(2), bias, (8, 4), (2, 2), (0, 0), 1)


def test_the_reference_takes_16_bit_qkv_with_float32_tau_and_bias():
    """bfloat16 qkv with float32 parameters failed in the reference ('expected scalar type Float') while
    the Triton kernel took them; the reference's matmul now runs in qkv's dtype, as under autocast."""
    from audiomae import dispatch, ops
    qkv = torch.randn(1, 16, 12).bfloat16()
    with dispatch.use_backend("torch"):
        out = ops.window_attention(qkv, torch.ones(1), torch.zeros(1, 4, 4), (4, 4), (2, 2), (0, 0), 1)
    ref = ops.window_attention(qkv.float(), torch.ones(1), torch.zeros(1, 4, 4), (4, 4), (2, 2), (0, 0), 1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
