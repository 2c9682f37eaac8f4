"""The training-step kernels (masked patch embedding, decoder unshuffle, masked norm-pix loss) against
their references: values and every gradient in float32 / bfloat16 / float16, odd shapes, unwritten
outputs, determinism, the dispatch, and the whole model.

Without a GPU the kernels run under Triton's interpreter on CPU tensors: the autouse ``interpret``
fixture sets ``TRITON_INTERPRET=1`` for each test (the kernel modules are imported inside the tests,
so they are built for the interpreter), and the rest of the suite keeps running on the reference.
With a GPU the same tests run on CUDA tensors. Shapes are small because the interpreter is slow.
Every test fills the kernels' output buffers with NaN first, so an element left unwritten fails.
"""
import contextlib
import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

from audiomae import AudioMAE, AudioMAEConfig, dispatch, ops_step  # noqa: E402
from audiomae.masking import random_masking  # noqa: E402
from audiomae.model import masked_mse, norm_pix_target, patchify  # noqa: E402
from audiomae.reference.step import (  # noqa: E402
    decoder_unshuffle_reference,
    masked_norm_pix_loss_reference,
    masked_patch_embed_reference,
    random_masking_ids,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max error against the float64 reference, relative to max |reference| (the size of the values, small
# gradients included). float32 has a fixed bound; for bfloat16/float16 the bound is HALF_FACTOR times the error of PyTorch's own computation
# in that dtype plus a floor of about one unit in the last place (Triton's interpreter truncates
# when it rounds float32 to bfloat16, PyTorch rounds to nearest).
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
HALF_FACTOR = 2.0
KERNELS = ("patch_embed", "unshuffle", "masked_loss")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch, interpret):
    for name in KERNELS:
        monkeypatch.setattr(kernel_module(name), "POISON_OUTPUTS", True)


def kernel_module(name):
    return importlib.import_module(f"audiomae.kernels.{name}")


def gpu_blocks(monkeypatch):
    """Use the GPU tiling under the interpreter too (several programs per axis, partial tiles)."""
    monkeypatch.setattr(kernel_module("patch_embed"), "_blocks", lambda K, D, pp: (64, 64, 64, 4))
    monkeypatch.setattr(kernel_module("unshuffle"), "_blocks", lambda D: (16, min(triton.next_power_of_2(D), 256), 4))
    monkeypatch.setattr(kernel_module("masked_loss"), "_block_l", lambda pp: 16)


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


def run(fn, leaves, dtypes, grad_out, *rest):
    """Output and gradients of ``fn`` with the float64 ``leaves`` cast to ``dtypes`` (None: no grad)."""
    x = [t.detach().to(dt).requires_grad_(t.requires_grad) for t, dt in zip(leaves, dtypes)]
    out = fn(*x, *rest)
    wrt = [t for t in x if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype)) if wrt else []
    return [out.detach()] + [g.detach() for g in grads]


def check(names, got, ref, own, dtype):
    """Kernel (``got``) vs float64 ``ref``; ``own``: PyTorch's own result in ``dtype`` (sets the bound)."""
    errors = {}
    for name, g, r, o in zip(names, got, ref, own):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten or overflow)"
        bound = TOL[dtype] if dtype == torch.float32 else HALF_FACTOR * rel_err(o, r) + TOL[dtype]
        errors[name] = rel_err(g, r)
        assert errors[name] <= bound, f"{name}: error {errors[name]:.3g} > bound {bound:.3g}"
    return errors


# ----------------------------------------------------------------------------------------------
# masking ids
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,L,ratio", [(2, 12, 0.75), (3, 512, 0.8), (1, 7, 0.0)])
def test_random_masking_ids_is_the_release_recipe(B, L, ratio):
    x = torch.randn(B, L, 4)
    noise = torch.rand(B, L)
    ref = random_masking(x, ratio, noise)
    K = int(L * (1 - ratio))
    ids_keep, ids_restore, mask = random_masking_ids(B, L, K, noise=noise)
    assert torch.equal(ids_keep, ref.ids_keep) and torch.equal(ids_restore, ref.ids_restore)
    assert torch.equal(mask, ref.mask) and mask.dtype == ref.mask.dtype
    # without noise: the same random draws as the model's masking
    torch.manual_seed(3)
    ref = random_masking(x, ratio)
    torch.manual_seed(3)
    got = random_masking_ids(B, L, K, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, (ref.ids_keep, ref.ids_restore, ref.mask)))
    with pytest.raises(ValueError, match="noise"):
        random_masking_ids(B, L, K, noise=torch.rand(B, L + 1))


# ----------------------------------------------------------------------------------------------
# masked patch embedding
# ----------------------------------------------------------------------------------------------
def patch_embed_inputs(B, T, F, p, D, K, spec_grad=False, pos_grad=False, transposed=False):
    spec = torch.randn(B, 1, T, F, dtype=torch.float64, device=DEVICE)
    if transposed:  # non-contiguous: a [B, 1, F, T] buffer viewed as [B, 1, T, F]
        spec = torch.randn(B, 1, F, T, dtype=torch.float64, device=DEVICE).transpose(2, 3)
    weight = torch.randn(D, 1, p, p, dtype=torch.float64, device=DEVICE) / p
    bias = torch.randn(D, dtype=torch.float64, device=DEVICE)
    L = (T // p) * (F // p)
    pos = torch.randn(1, 1 + L, D, dtype=torch.float64, device=DEVICE)
    ids_keep = random_masking_ids(B, L, K, device=DEVICE)[0]
    spec.requires_grad_(spec_grad)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    pos.requires_grad_(pos_grad)
    return [spec, weight, bias, pos], ids_keep


def check_patch_embed(leaves, ids_keep, dtype, pos_dtype=torch.float32):
    fn = kernel_module("patch_embed").masked_patch_embed
    dtypes = [dtype, dtype, dtype, pos_dtype]
    out_dtype = torch.promote_types(dtype, pos_dtype)
    grad_out = torch.randn(ids_keep.shape[0], ids_keep.shape[1], leaves[1].shape[0], dtype=torch.float64,
                           device=DEVICE)
    names = ["out"] + [n for n, t in zip(("spec", "weight", "bias", "pos"), leaves) if t.requires_grad]
    got = run(fn, leaves, dtypes, grad_out, ids_keep)
    assert got[0].dtype == out_dtype
    ref = run(masked_patch_embed_reference, leaves, [torch.float64] * 4, grad_out, ids_keep)
    own = run(masked_patch_embed_reference, leaves, dtypes, grad_out, ids_keep) if dtype != torch.float32 else ref
    return check(names, got, ref, own, dtype)


# (B, T, F, p, D, K): odd grids, a cropped remainder, one kept patch, p = 14 (196 pixels, not a power of 2)
PATCH_CASES = [
    pytest.param(2, 48, 32, 16, 24, 1, id="T48F32-p16-D24-K1"),
    pytest.param(3, 64, 48, 16, 40, 5, id="T64F48-p16-D40-K5"),
    pytest.param(2, 50, 35, 16, 24, 6, id="T50F35-cropped-p16-D24-K6"),
    pytest.param(2, 44, 30, 14, 20, 4, id="T44F30-p14-D20-K4"),
]


@pytest.mark.parametrize("B,T,F,p,D,K", PATCH_CASES)
def test_masked_patch_embed_fp32(B, T, F, p, D, K):
    leaves, ids = patch_embed_inputs(B, T, F, p, D, K, spec_grad=True, pos_grad=True)
    check_patch_embed(leaves, ids, torch.float32)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("B,T,F,p,D,K", [PATCH_CASES[1], PATCH_CASES[3]])
def test_masked_patch_embed_half(dtype, B, T, F, p, D, K):
    leaves, ids = patch_embed_inputs(B, T, F, p, D, K, spec_grad=True)
    check_patch_embed(leaves, ids, DTYPES[dtype])


def test_masked_patch_embed_half_positions_and_strides():
    """16-bit positions (output in that dtype) and a non-contiguous spectrogram."""
    leaves, ids = patch_embed_inputs(2, 48, 32, 16, 24, 3, spec_grad=True, transposed=True)
    check_patch_embed(leaves, ids, torch.bfloat16, pos_dtype=torch.bfloat16)


def test_masked_patch_embed_gpu_tiling(monkeypatch):
    """K = 70 and D = 72 span several 64-wide tiles; 256 pixels take four 64-wide steps."""
    gpu_blocks(monkeypatch)
    leaves, ids = patch_embed_inputs(2, 160, 128, 16, 72, 70, spec_grad=True)
    check_patch_embed(leaves, ids, torch.float32)


def test_masked_patch_embed_repeated_ids_and_strided_bias():
    """A row that repeats a patch index gets the sum of its gradients (spec and pos), as the
    reference's gather does; a strided or expanded bias is read by its strides; no bias is zero."""
    leaves, ids = patch_embed_inputs(2, 64, 48, 16, 40, 5, spec_grad=True, pos_grad=True)
    ids[:, 1] = ids[:, 0]
    ids[1, 4] = ids[1, 0]  # three times in the second row
    check_patch_embed(leaves, ids, torch.float32)
    spec, weight, bias, pos = [t.detach().float() for t in leaves]
    fn = kernel_module("patch_embed").masked_patch_embed
    for b in (torch.randn(80, device=DEVICE)[::2], torch.tensor(0.7, device=DEVICE).expand(40)):
        torch.testing.assert_close(fn(spec, weight, b, pos, ids), masked_patch_embed_reference(spec, weight, b, pos, ids),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fn(spec, weight, None, pos, ids),
                               masked_patch_embed_reference(spec, weight, None, pos, ids), rtol=1e-5, atol=1e-5)


def test_masked_patch_embed_ids_outside_the_grid_are_nan_rows():
    """An id outside [0, L) is read from nowhere: its row is NaN (the loss shows it), the other rows
    are right, and the weight gradient reads no pixel for it."""
    leaves, ids = patch_embed_inputs(2, 64, 48, 16, 40, 5)
    spec, weight, bias, pos = [t.detach().float() for t in leaves]
    L = pos.shape[1] - 1
    bad = ids.clone()
    bad[0, 1], bad[1, 3], bad[0, 4] = L + 3, -1, L  # L: the first id past the grid
    fn = kernel_module("patch_embed").masked_patch_embed
    weight.requires_grad_(True)
    out = fn(spec, weight, bias, pos, bad)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[1, 3]).all() and torch.isnan(out[0, 4]).all()
    ref = masked_patch_embed_reference(spec, weight.detach(), bias, pos, ids)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 1] = keep[1, 3] = keep[0, 4] = False
    torch.testing.assert_close(out.detach()[keep], ref[keep], rtol=1e-5, atol=1e-5)
    # every gradient leaves the NaN rows out (whatever gradient reaches them) and reads nothing for them
    spec, bias, pos = (t.clone().requires_grad_(True) for t in (spec, bias, pos))
    out = fn(spec, weight, bias, pos, bad)
    g = torch.randn_like(out)
    g[~keep] = float("nan")  # (a NaN row's gradient is often NaN)
    got = torch.autograd.grad(out, (spec, weight, bias, pos), g)
    g[~keep] = 0
    want = torch.autograd.grad(masked_patch_embed_reference(spec, weight, bias, pos, ids), (spec, weight, bias, pos), g)
    for name, a, b in zip(("spec", "weight", "bias", "pos"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_masked_patch_embed_shapes_the_kernel_cannot_take_go_to_the_reference():
    """Shapes the kernel would index out of its buffers (or read only part of) are its reasons not to
    run: the automatic choice leaves them to the reference, which computes or refuses them."""
    leaves, ids = patch_embed_inputs(2, 64, 48, 16, 40, 5)
    spec, weight, bias, pos = [t.detach().float() for t in leaves]
    L = pos.shape[1] - 1
    bad = {
        "ids_keep must be [B, K] with B = 2": (spec, weight, bias, pos, ids[:1]),
        "pos must be [1, 1 + L, D]": (spec, weight, bias, pos[:, 1:], ids),
        "pos must be [1, 1 + L, D] = [1, 13, 40], got [2, 13, 40] (the kernel takes one table)":
            (spec, weight, bias, pos.expand(2, -1, -1), ids),
        "bias must be [40]": (spec, weight, bias[:20], pos, ids),
    }
    assert L == 12
    for why, args in bad.items():
        reasons = dispatch.reasons("masked_patch_embed", *args)["triton"]
        assert any(why in r for r in reasons), (why, reasons)
        assert dispatch.choose("masked_patch_embed", *args)[0] == "torch"
    # a position table per sample is the reference's (broadcast) computation
    per_sample = torch.randn(2, 1 + L, 40)
    torch.testing.assert_close(ops_step.masked_patch_embed(spec, weight, bias, per_sample, ids),
                               masked_patch_embed_reference(spec, weight, bias, per_sample, ids))
    # shapes no backend computes are refused by name, whichever backend runs (the reference broadcast
    # some of them into a result)
    for backend in ("torch", "triton"):
        with dispatch.use_backend(backend, op="masked_patch_embed"):
            with pytest.raises(ValueError, match=r"masked_patch_embed: pos must be \[1, 1 \+ L, D\]"):
                ops_step.masked_patch_embed(spec, weight, bias, pos[:, 1:], ids)
            with pytest.raises(ValueError, match="masked_patch_embed: ids_keep must be"):
                ops_step.masked_patch_embed(spec, weight, bias, pos, ids[:1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pos_dtype", ["fp32", "same"], ids=["pos-fp32", "pos-same"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_masked_patch_embed_rounds_the_convolution_to_the_input_dtype(dtype, pos_dtype, backend):
    """The convolution's output (bias included) is in the input dtype before the position is added.

    Every patch's convolution is 2^c * (1 + tiny) in channel c, tiny a quarter of the spacing above 1
    (2^-9 in bfloat16, 2^-12 in float16): channels 0 and 1 get tiny from a second pixel, channels 2
    and 3 from the bias. Rounded to the input dtype (to nearest or truncated) that is 2^c, which the
    position -2^c cancels exactly: every output is 0. Kept in float32 it would leave 2^c * tiny."""
    dt = DTYPES[dtype]
    pdt = dt if pos_dtype == "same" else torch.float32
    tiny = torch.finfo(dt).eps / 4
    B, p, D = 2, 4, 4
    T, F = 2 * p, 3 * p
    L = (T // p) * (F // p)
    scale = 2.0 ** torch.arange(D, dtype=torch.float64, device=DEVICE)
    spec = torch.zeros(B, 1, T, F, dtype=torch.float64, device=DEVICE)
    spec[:, :, ::p, ::p] = 1  # the top-left pixel of every patch
    spec[:, :, ::p, 1::p] = tiny  # and its right neighbour
    weight = torch.zeros(D, 1, p, p, dtype=torch.float64, device=DEVICE)
    weight[:, 0, 0, 0] = scale
    weight[:2, 0, 0, 1] = scale[:2]
    bias = torch.zeros(D, dtype=torch.float64, device=DEVICE)
    bias[2:] = tiny * scale[2:]
    pos = (-scale).expand(1, 1 + L, D).contiguous()
    ids_keep = torch.tensor([[4, 0, 3], [1, 5, 2]], device=DEVICE)
    # in exact arithmetic the positions leave 2^c * tiny: the zeros below come from the rounding
    exact = masked_patch_embed_reference(spec, weight, bias, pos, ids_keep)
    assert torch.equal(exact, (tiny * scale).expand(B, 3, D))
    with dispatch.use_backend(backend, op="masked_patch_embed"):
        out = ops_step.masked_patch_embed(spec.to(dt), weight.to(dt), bias.to(dt), pos.to(pdt), ids_keep)
    ref = masked_patch_embed_reference(spec.to(dt), weight.to(dt), bias.to(dt), pos.to(pdt), ids_keep)
    assert out.dtype == ref.dtype == torch.promote_types(dt, pdt)
    assert torch.equal(out, ref) and torch.equal(out, torch.zeros_like(out)), out


@pytest.mark.parametrize("split", [2, 3, 7])
def test_masked_patch_embed_weight_grad_split_over_rows(monkeypatch, split):
    """The weight gradient summed over row slices (uneven, more slices than row blocks)."""
    gpu_blocks(monkeypatch)
    monkeypatch.setitem(kernel_module("patch_embed").TUNING, "bwd_split", split)
    leaves, ids = patch_embed_inputs(3, 160, 128, 16, 72, 70, spec_grad=True)
    check_patch_embed(leaves, ids, torch.float32)


def test_masked_patch_embed_only_needed_grads_and_determinism(monkeypatch):
    """The spectrogram gradient is computed only when the spectrogram needs one, and the weight
    gradient summed over several row slices is the same on every call."""
    gpu_blocks(monkeypatch)
    pe = kernel_module("patch_embed")
    monkeypatch.setitem(pe.TUNING, "bwd_split", 3)
    seen = []
    real = pe.masked_patch_embed_bwd

    def spy(grad, spec, weight, ids_keep, need_spec_grad):
        seen.append(need_spec_grad)
        return real(grad, spec, weight, ids_keep, need_spec_grad)

    monkeypatch.setattr(pe, "masked_patch_embed_bwd", spy)
    leaves, ids = patch_embed_inputs(3, 160, 128, 16, 72, 70)
    spec, weight, bias, pos = [t.detach().float() for t in leaves]
    weight.requires_grad_(True)
    out = pe.masked_patch_embed(spec, weight, bias, pos, ids)
    g = torch.randn_like(out)
    (gw1,) = torch.autograd.grad(out, weight, g)
    out = pe.masked_patch_embed(spec, weight, bias, pos, ids)
    (gw2,) = torch.autograd.grad(out, weight, g)
    assert torch.equal(gw1, gw2)
    spec.requires_grad_(True)
    out = pe.masked_patch_embed(spec, weight, bias, pos, ids)
    dspec, _ = torch.autograd.grad(out, (spec, weight), g)
    assert seen == [False, False, True]
    assert dspec.shape == spec.shape and dspec.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# decoder unshuffle
# ----------------------------------------------------------------------------------------------
def unshuffle_inputs(B, L, K, D, pos_grad=False):
    x = torch.randn(B, 1 + K, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask_token = torch.randn(1, 1, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 1 + L, D, dtype=torch.float64, device=DEVICE, requires_grad=pos_grad)
    ids_restore = random_masking_ids(B, L, K, device=DEVICE)[1]
    return [x, mask_token, pos], ids_restore


def check_unshuffle(leaves, ids_restore, keep_cls, dtype, pos_dtype=torch.float32):
    fn = kernel_module("unshuffle").decoder_unshuffle
    x, mt, pos = leaves

    def call(fn):
        return lambda x, mt, pos: fn(x, mt, ids_restore, pos, keep_cls)

    dtypes = [dtype, torch.float32, pos_dtype]
    B, L = ids_restore.shape
    grad_out = torch.randn(B, L + int(keep_cls), x.shape[-1], dtype=torch.float64, device=DEVICE)
    names = ["out", "x", "mask_token"] + (["pos"] if pos.requires_grad else [])
    got = run(call(fn), leaves, dtypes, grad_out)
    assert got[0].dtype == torch.promote_types(dtype, pos_dtype)
    ref = run(call(decoder_unshuffle_reference), leaves, [torch.float64] * 3, grad_out)
    own = run(call(decoder_unshuffle_reference), leaves, dtypes, grad_out)
    return check(names, got, ref, own, dtype)


# (B, L, K, D): L not a multiple of the row tile, one kept token, nothing removed
UNSHUFFLE_CASES = [
    pytest.param(3, 70, 5, 24, id="L70-K5-D24"),
    pytest.param(2, 37, 1, 20, id="L37-K1-D20"),
    pytest.param(2, 12, 12, 16, id="L12-K12-nothing-removed"),
]


@pytest.mark.parametrize("keep_cls", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("B,L,K,D", UNSHUFFLE_CASES)
def test_decoder_unshuffle_fp32(B, L, K, D, keep_cls):
    leaves, ids = unshuffle_inputs(B, L, K, D, pos_grad=True)
    check_unshuffle(leaves, ids, keep_cls, torch.float32)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("keep_cls", [False, True], ids=["local", "global"])
def test_decoder_unshuffle_half(dtype, keep_cls):
    leaves, ids = unshuffle_inputs(3, 70, 5, 24)
    check_unshuffle(leaves, ids, keep_cls, DTYPES[dtype])
    check_unshuffle(leaves, ids, keep_cls, DTYPES[dtype], pos_dtype=DTYPES[dtype])


@pytest.mark.parametrize("keep_cls", [False, True], ids=["local", "global"])
def test_decoder_unshuffle_gpu_tiling(monkeypatch, keep_cls):
    gpu_blocks(monkeypatch)
    leaves, ids = unshuffle_inputs(2, 70, 14, 40)
    check_unshuffle(leaves, ids, keep_cls, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("keep_cls", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("pos_dtype", ["fp32", "same"], ids=["pos-fp32", "pos-same"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_decoder_unshuffle_rounds_the_mask_token_to_the_input_dtype(dtype, pos_dtype, keep_cls, backend):
    """A float32 mask token is cast to the dtype of ``x`` before the position is added.

    The mask token is 2^c * (1 + tiny) in channel c, tiny a quarter of the spacing above 1 (2^-9 in
    bfloat16, 2^-12 in float16); in the input dtype (rounded to nearest or truncated) it is 2^c,
    which the position -2^c cancels exactly, so every removed row is 0. Kept in float32 it would
    leave 2^c * tiny. The rows from ``x`` (and the cls row) are (k + 1) * 2^c, exactly."""
    dt = DTYPES[dtype]
    pdt = dt if pos_dtype == "same" else torch.float32
    tiny = torch.finfo(dt).eps / 4
    B, L, K, D = 2, 6, 2, 4
    scale = 2.0 ** torch.arange(D, dtype=torch.float32, device=DEVICE)
    x = ((torch.arange(1 + K, device=DEVICE) + 2.0)[:, None] * scale).expand(B, -1, -1).to(dt)
    mask_token = (scale * (1 + tiny)).view(1, 1, D)
    assert mask_token.to(dt).float().equal(scale.view(1, 1, D)) and not mask_token.equal(scale.view(1, 1, D))
    pos = (-scale).expand(1, 1 + L, D).to(pdt)
    ids_restore = random_masking_ids(B, L, K, device=DEVICE)[1]
    kept = (ids_restore < K).unsqueeze(-1)
    rows = torch.gather(x.float()[:, 1:], 1, ids_restore.clamp(max=K - 1).unsqueeze(-1).expand(-1, -1, D))
    expected = torch.where(kept, rows - scale, 0.0)
    if keep_cls:
        expected = torch.cat([x.float()[:, :1] - scale, expected], dim=1)
    with dispatch.use_backend(backend, op="decoder_unshuffle"):
        out = ops_step.decoder_unshuffle(x, mask_token, ids_restore, pos, keep_cls)
    ref = decoder_unshuffle_reference(x, mask_token, ids_restore, pos, keep_cls)
    assert out.dtype == ref.dtype == torch.promote_types(dt, pdt)
    assert torch.equal(out, ref) and torch.equal(out.float(), expected), out


def test_decoder_unshuffle_fp32_forward_is_exact():
    """A copy plus one addition: float32 results are bit-identical to the eager code's."""
    un = kernel_module("unshuffle")
    (x, mt, pos), ids = unshuffle_inputs(2, 70, 14, 24)
    x, mt, pos = x.detach().float(), mt.detach().float(), pos.detach().float()
    for keep_cls in (False, True):
        assert torch.equal(un.decoder_unshuffle(x, mt, ids, pos, keep_cls),
                           decoder_unshuffle_reference(x, mt, ids, pos, keep_cls))


# ----------------------------------------------------------------------------------------------
# masked norm-pix loss
# ----------------------------------------------------------------------------------------------
def loss_inputs(B, T, F, p, K, offset=0.0):
    spec = 3 * torch.randn(B, 1, T, F, dtype=torch.float64, device=DEVICE) + offset
    L = (T // p) * (F // p)
    pred = torch.randn(B, L, p * p, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = random_masking_ids(B, L, K, device=DEVICE)[2]
    return pred, spec, mask


LOSS_CASES = [
    pytest.param(2, 48, 32, 16, 1, id="T48F32-p16-K1"),
    pytest.param(3, 80, 56, 16, 4, id="T80F56-cropped-p16-K4"),
    pytest.param(2, 44, 30, 14, 2, id="T44F30-p14-K2"),
]


def check_loss(pred, spec, mask, p, norm_pix, dtype, spec_dtype=torch.float32):
    fn = kernel_module("masked_loss").masked_norm_pix_loss
    grad_out = torch.tensor(1.7, dtype=torch.float64, device=DEVICE)

    def call(fn):
        return lambda pred, spec: fn(pred, spec, mask, p, norm_pix)

    leaves = [pred, spec]
    got = run(call(fn), leaves, [dtype, spec_dtype], grad_out)
    ref = run(call(masked_norm_pix_loss_reference), leaves, [torch.float64] * 2, grad_out)
    own = run(call(masked_norm_pix_loss_reference), leaves, [dtype, spec_dtype], grad_out)
    return check(["loss", "pred"], got, ref, own, dtype)


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
@pytest.mark.parametrize("B,T,F,p,K", LOSS_CASES)
def test_masked_loss_fp32(B, T, F, p, K, norm_pix):
    pred, spec, mask = loss_inputs(B, T, F, p, K, offset=5.0)
    check_loss(pred, spec, mask, p, norm_pix, torch.float32)


def test_masked_loss_low_variance_patches_feel_the_eps(monkeypatch):
    """Patches whose variance (about 9e-6) is near norm-pix's eps of 1e-6, where the eps shows."""
    pred, spec, mask = loss_inputs(2, 48, 32, 16, 1)
    spec = spec.detach() * 1e-3
    check_loss(pred, spec, mask, 16, True, torch.float32)
    monkeypatch.setattr(kernel_module("masked_loss"), "NORM_PIX_EPS", 1e-5)
    with pytest.raises(AssertionError, match="loss: error"):
        check_loss(pred, spec, mask, 16, True, torch.float32)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_masked_loss_half(dtype):
    pred, spec, mask = loss_inputs(3, 80, 56, 16, 4)
    check_loss(pred, spec, mask, 16, True, DTYPES[dtype])
    check_loss(pred, spec, mask, 16, True, DTYPES[dtype], spec_dtype=DTYPES[dtype])


def test_masked_loss_gpu_tiling(monkeypatch):
    gpu_blocks(monkeypatch)
    pred, spec, mask = loss_inputs(2, 176, 128, 16, 16)  # L = 88: five 16-patch tiles and a ragged half tile
    check_loss(pred, spec, mask, 16, True, torch.float32)


def test_masked_loss_equals_model_forward_loss():
    """The eager model's loss (patchify, norm_pix_target, masked_mse) to 1e-6 relative, in float32."""
    ml = kernel_module("masked_loss")
    pred, spec, mask = loss_inputs(2, 96, 64, 16, 6, offset=-4.0)
    pred, spec = pred.detach().float(), spec.float()
    for norm_pix in (True, False):
        target = patchify(spec, 16)
        target = norm_pix_target(target) if norm_pix else target
        ref = masked_mse(pred, target, mask)
        got = ml.masked_norm_pix_loss(pred, spec, mask, 16, norm_pix)
        assert got.dtype == ref.dtype and got.shape == ()
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_masked_loss_bool_mask_and_no_grad():
    ml = kernel_module("masked_loss")
    pred, spec, mask = loss_inputs(2, 48, 32, 16, 2)
    pred, spec = pred.detach().float(), spec.float()
    got = ml.masked_norm_pix_loss(pred, spec, mask.bool(), 16)
    torch.testing.assert_close(got, masked_norm_pix_loss_reference(pred, spec, mask, 16), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# custom ops: schemas and shape-only (fake) implementations, what torch.compile traces with
# ----------------------------------------------------------------------------------------------
def test_custom_ops_schema_and_fake_impls():
    for name in KERNELS:
        kernel_module(name)  # registers the ops
    (spec, weight, bias, pos), ids_keep = patch_embed_inputs(2, 48, 32, 16, 24, 3)
    spec, weight, bias, pos = [t.detach().float() for t in (spec, weight, bias, pos)]
    (x, mt, dpos), ids_restore = unshuffle_inputs(2, 6, 3, 24)
    x, mt, dpos = x.detach().bfloat16(), mt.detach().float(), dpos.detach().float()
    pred, _, mask = loss_inputs(2, 48, 32, 16, 2)
    ops = torch.ops.audiomae
    cases = [
        (ops.masked_patch_embed_fwd, (spec, weight, bias, pos, ids_keep)),
        (ops.masked_patch_embed_bwd, (torch.randn(2, 3, 24, device=DEVICE), spec, weight, ids_keep, True)),
        (ops.masked_patch_embed_bwd, (torch.randn(2, 3, 24, device=DEVICE), spec, weight, ids_keep, False)),
        (ops.decoder_unshuffle_fwd, (x, mt, ids_restore, dpos, False)),
        (ops.decoder_unshuffle_fwd, (x, mt, ids_restore, dpos, True)),
        (ops.decoder_unshuffle_bwd, (torch.randn(2, 7, 24, device=DEVICE), ids_restore, 4, torch.bfloat16, True)),
        (ops.masked_norm_pix_loss_fwd, (pred.detach().bfloat16(), spec, mask, 16, True, True)),
        (ops.masked_norm_pix_loss_fwd, (pred.detach().float(), spec, mask, 16, False, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def test_dispatch_reasons_and_fallback(monkeypatch):
    pred, spec, mask = loss_inputs(2, 48, 32, 16, 2)
    pred, spec = pred.detach().float(), spec.float()
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        why = dispatch.reasons("masked_norm_pix_loss", pred, spec, mask, 16, True)
        assert why["torch"] == [] and any("CPU" in r for r in why["triton"])
        # the automatic choice falls back to the reference; a forced Triton explains itself
        assert dispatch.choose("masked_norm_pix_loss", pred, spec, mask, 16, True)[0] == "torch"
        with dispatch.use_backend("triton", op="masked_norm_pix_loss"):
            with pytest.raises(dispatch.BackendUnavailableError, match="CPU"):
                ops_step.masked_norm_pix_loss(pred, spec, mask, 16)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose("masked_norm_pix_loss", pred, spec, mask, 16, True)[0] == "triton"
    # a gradient for spec is the reference's job
    spec.requires_grad_(True)
    why = dispatch.reasons("masked_norm_pix_loss", pred, spec, mask, 16, True)["triton"]
    assert any("spec or mask requires grad" in r for r in why)
    assert dispatch.choose("masked_norm_pix_loss", pred, spec, mask, 16, True)[0] == "torch"
    why = dispatch.reasons("masked_patch_embed", spec.detach().double(), torch.zeros(4, 1, 16, 16).double(),
                           torch.zeros(4).double(), torch.zeros(1, 7, 4), torch.zeros(2, 3, dtype=torch.long))
    assert any("dtype torch.float64" in r for r in why["triton"])
    assert set(dispatch.registered_ops()) >= {"masked_patch_embed", "decoder_unshuffle", "masked_norm_pix_loss"}


def test_unshuffle_shapes_the_kernel_cannot_take_go_to_the_reference():
    leaves, ids_restore = unshuffle_inputs(2, 30, 4, 8)
    x, mt, pos = [t.detach().float() for t in leaves]
    bad = {"ids batch": (x, mt, ids_restore[:1], pos, False), "K > L": (torch.randn(2, 40, 8), mt, ids_restore, pos, False),
           "pos rows": (x, mt, ids_restore, pos[:, 1:], False), "mask token": (x, mt[..., :4], ids_restore, pos, False)}
    for name, args in bad.items():
        assert any("do not match" in r for r in dispatch.reasons("decoder_unshuffle", *args)["triton"]), name
        assert dispatch.choose("decoder_unshuffle", *args)[0] == "torch", name
        with pytest.raises(ValueError, match="decoder_unshuffle: shapes .* do not match"):  # on every backend
            ops_step.decoder_unshuffle(*args)
    # K = L + 1 tokens: the reference's expand(B, -1, D) kept one mask token and returned a result
    ids = torch.stack([torch.randperm(6) for _ in range(2)])
    with pytest.raises(ValueError, match="with K <= L"):
        ops_step.decoder_unshuffle(torch.randn(2, 8, 4), torch.randn(1, 1, 4), ids, torch.randn(1, 7, 4), False)
    with pytest.raises(TypeError, match="x must be floating-point, got torch.int64"):
        ops_step.decoder_unshuffle(torch.ones(2, 3, 4, dtype=torch.long), torch.randn(1, 1, 4), ids,
                                   torch.randn(1, 7, 4), False)


def test_unshuffle_ids_outside_the_permutation_are_nan_rows():
    leaves, ids_restore = unshuffle_inputs(2, 30, 4, 8)
    x, mt, pos = [t.detach().float().requires_grad_(True) for t in leaves]
    bad = ids_restore.clone()
    bad[0, 5], bad[1, 7], bad[1, 2] = -3, 30, -1  # 30 = L: beyond the permutation too (it was a mask token)
    fn = kernel_module("unshuffle").decoder_unshuffle
    out = fn(x, mt, bad, pos, False)
    keep = torch.ones(2, 30, dtype=torch.bool)
    keep[0, 5] = keep[1, 7] = keep[1, 2] = False
    assert torch.isnan(out[~keep]).all()
    ref = decoder_unshuffle_reference(x, mt, ids_restore, pos, False)
    torch.testing.assert_close(out[keep], ref[keep])
    # the mask token's gradient leaves the NaN rows out
    g = torch.randn_like(out)
    g[~keep] = 0
    (got,) = torch.autograd.grad(out, mt, g)
    (want,) = torch.autograd.grad(ref, mt, g)
    torch.testing.assert_close(got, want)


def test_a_failing_support_check_is_a_reason_and_triton_interpret_spellings(monkeypatch):
    """A backend whose check raises on odd inputs is passed over (the reference then meets them);
    TRITON_INTERPRET=true counts as Triton counts it."""
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))  # the test op is gone afterwards
    monkeypatch.setattr(dispatch, "_PREFERENCE", dict(dispatch._PREFERENCE))
    calls = []

    def check(x):
        calls.append(x)
        raise ZeroDivisionError("division by zero")

    dispatch.register("test_op_failing_check", "triton", lambda x: "triton", check)
    dispatch.register("test_op_failing_check", "torch", lambda x: "torch")
    dispatch.set_preference("test_op_failing_check", ("triton", "torch"))
    assert dispatch.call("test_op_failing_check", 1) == "torch" and calls == [1]
    with dispatch.use_backend("triton", op="test_op_failing_check"):
        with pytest.raises(dispatch.BackendUnavailableError, match="support check failed: ZeroDivisionError"):
            dispatch.call("test_op_failing_check", 1)
    if DEVICE == "cpu":
        for value in ("true", "On", "y"):
            monkeypatch.setenv("TRITON_INTERPRET", value)
            assert dispatch.triton_reasons(torch.zeros(1)) == []
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert dispatch.triton_reasons(torch.zeros(1))


def test_public_ops_agree_across_backends():
    leaves, ids = patch_embed_inputs(2, 48, 32, 16, 24, 3)
    spec, weight, bias, pos = [t.detach().float() for t in leaves]
    outs = {}
    for backend in ("torch", "triton"):
        with dispatch.use_backend(backend, op="masked_patch_embed"):
            outs[backend] = ops_step.masked_patch_embed(spec, weight, bias, pos, ids)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the whole model
# ----------------------------------------------------------------------------------------------
STEP_OPS = ("masked_patch_embed", "decoder_unshuffle", "masked_norm_pix_loss")


def model_loss_and_grads(model, spec, noise, backend):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draws (the decoder's position-bias MLP) in both runs
    with contextlib.ExitStack() as stack:
        stack.enter_context(dispatch.use_backend("torch", op="window_attention"))  # not under test here
        for op in STEP_OPS:
            stack.enter_context(dispatch.use_backend(backend, op=op))
        out = model(spec, noise=noise)
        out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,stride", [("local", None), ("global", None), ("local", 10)],
                         ids=["local", "global", "overlapping"])
def test_tiny_model_same_loss_and_grads(mode, stride):
    cfg = AudioMAEConfig.preset("tiny", decoder_mode=mode, decoder_depth=2, patch_stride=stride)
    model = AudioMAE(cfg).to(DEVICE)
    spec = torch.randn(2, 1, *cfg.img_size, device=DEVICE)
    noise = torch.rand(2, cfg.num_patches, device=DEVICE)
    ref, ref_grads = model_loss_and_grads(model, spec, noise, "torch")
    got, grads = model_loss_and_grads(model, spec, noise, "triton")
    assert torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.pred, ref.pred, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and "patch_embed.proj.weight" in grads and "mask_token" in grads
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-3)
        assert (g - ref_grads[name]).abs().max() <= 1e-4 * scale, name


# ----------------------------------------------------------------------------------------------
# GPU: the paper's shapes in bfloat16, determinism, torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_paper_shapes_bf16_cuda():
    B, T, F, p, D, Dd, K = 8, 1024, 128, 16, 768, 512, 102
    L = (T // p) * (F // p)
    leaves, ids_keep = patch_embed_inputs(B, T, F, p, D, K)
    errs = check_patch_embed(leaves, ids_keep, torch.bfloat16)
    assert max(errs.values()) < 5e-2
    (x, mt, pos), _ = unshuffle_inputs(B, L, K, Dd)
    ids_restore = random_masking_ids(B, L, K, device=DEVICE)[1]
    check_unshuffle([x, mt, pos], ids_restore, False, torch.bfloat16)
    pred, spec, mask = loss_inputs(B, T, F, p, K)
    check_loss(pred, spec, mask, p, True, torch.bfloat16)


@pytest.mark.gpu
def test_reductions_are_deterministic_cuda():
    leaves, ids = patch_embed_inputs(8, 1024, 128, 16, 768, 102)
    spec, weight, bias, pos = [t.detach().bfloat16() for t in leaves]
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    pe = kernel_module("patch_embed")
    grads = []
    for _ in range(3):
        out = pe.masked_patch_embed(spec, weight, bias, pos.float(), ids)
        grads.append(torch.autograd.grad(out, (weight, bias), torch.ones_like(out)))
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(g, grads[0]))
    (x, mt, pos), ids_restore = unshuffle_inputs(8, 512, 102, 512)
    x, mt = x.detach().bfloat16().requires_grad_(), mt.detach().float().requires_grad_()
    un = kernel_module("unshuffle")
    mts = [torch.autograd.grad(un.decoder_unshuffle(x, mt, ids_restore, pos.float(), False).sum(), mt)[0]
           for _ in range(3)]
    assert all(torch.equal(m, mts[0]) for m in mts)


@pytest.mark.gpu
def test_torch_compile_traces_the_step_ops():
    pe, un, ml = (kernel_module(n) for n in KERNELS)
    B, T, F, p, D, K = 2, 128, 64, 16, 64, 6
    L = (T // p) * (F // p)
    spec = torch.randn(B, 1, T, F, device=DEVICE)
    weight = torch.randn(D, 1, p, p, device=DEVICE, requires_grad=True)
    bias = torch.randn(D, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 1 + L, D, device=DEVICE)
    mt = torch.randn(1, 1, D, device=DEVICE, requires_grad=True)
    head = torch.randn(D, p * p, device=DEVICE) / 8
    ids_keep, ids_restore, mask = random_masking_ids(B, L, K, device=DEVICE)

    def step(spec, weight, bias, mt):
        x = pe.masked_patch_embed(spec, weight, bias, pos, ids_keep)
        x = torch.cat([x.mean(1, keepdim=True), x], dim=1)
        x = un.decoder_unshuffle(x, mt, ids_restore, pos, False)
        return ml.masked_norm_pix_loss(x @ head, spec, mask, p)

    eager = step(spec, weight, bias, mt)
    eager_grads = torch.autograd.grad(eager, (weight, bias, mt))
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(spec, weight, bias, mt)
    grads = torch.autograd.grad(loss, (weight, bias, mt))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_nothing_kept_or_everything_removed():
    """K = 0: the patch embedding has no rows and its parameters no gradient but the position
    table's cls row's zero; the unshuffle gives mask tokens only (and the cls row)."""
    leaves, ids = patch_embed_inputs(2, 32, 32, 16, 8, 0, spec_grad=True, pos_grad=True)
    spec, weight, bias, pos = [t.detach().float().requires_grad_(True) for t in leaves]
    out = kernel_module("patch_embed").masked_patch_embed(spec, weight, bias, pos, ids)
    assert out.shape == (2, 0, 8)
    grads = torch.autograd.grad(out.sum(), (spec, weight, bias, pos), allow_unused=True)
    for g, t in zip(grads, (spec, weight, bias, pos)):
        assert g is None or (g.shape == t.shape and torch.equal(g, torch.zeros_like(t)))

    leaves, ids_restore = unshuffle_inputs(2, 12, 0, 8)
    x, mt, pos = [t.detach().float().requires_grad_(True) for t in leaves]
    fn = kernel_module("unshuffle").decoder_unshuffle
    for keep_cls in (True, False):
        out = fn(x, mt, ids_restore, pos, keep_cls)
        ref = decoder_unshuffle_reference(x, mt, ids_restore, pos, keep_cls)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (x, mt), g), torch.autograd.grad(ref, (x, mt), g)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_loss_and_patch_embed_arguments_no_backend_computes_are_refused_by_name():
    """The reference broadcast mismatched shapes into a loss (pred[:1], mask[0]); a negative patch
    size ran the kernel out of its buffer; integer spectrograms truncated the weights to integers."""
    import numpy as np

    spec, pred, mask = torch.randn(4, 1, 8, 8), torch.randn(4, 4, 16), (torch.rand(4, 4) > 0.5).float()
    for args in ((pred[:1], spec, mask, 4), (pred[..., :1], spec, mask, 4), (pred, spec, mask[0], 4),
                 (pred, spec, mask[:, :1], 4)):
        with pytest.raises(ValueError, match=r"masked_norm_pix_loss: pred .* do not match spec .* need \[B, L, p\*p\*C\]"):
            ops_step.masked_norm_pix_loss(*args)
    for p in (-4, 0, True, 2.0):
        with pytest.raises(ValueError, match="patch_size must be a positive integer"):
            ops_step.masked_norm_pix_loss(pred, spec, mask, p)
    torch.testing.assert_close(ops_step.masked_norm_pix_loss(pred, spec, mask, np.int64(4)),
                               masked_norm_pix_loss_reference(pred, spec, mask, 4))
    w, pos = torch.full((2, 1, 4, 4), 0.5), torch.zeros(1, 5, 2)
    with pytest.raises(TypeError, match="spec must be floating-point, got torch.int64"):
        ops_step.masked_patch_embed(torch.randint(-3, 4, (1, 1, 8, 8)), w, None, pos, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="ids_keep must be \\[B, K\\] with B = 2"):
        ops_step.masked_patch_embed(torch.randn(2, 1, 8, 8), w, None, pos, torch.tensor([[0, 3]]))
    with pytest.raises(TypeError, match="ids_keep must hold integer patch indices"):
        ops_step.masked_patch_embed(torch.randn(1, 1, 8, 8), w, None, pos, torch.tensor([[0.0]]))


def test_the_fused_patch_embedding_follows_autocast_as_the_eager_convolution(interpret, monkeypatch):
    """Under autocast the eager convolution runs in bfloat16 and the positions are added to its result;
    the fused kernel computed in float32. It now gets the autocast dtype (the interpreter truncates
    float32 to bfloat16 where GPUs round, so the values agree to one bfloat16 step here)."""
    import audiomae.kernels.patch_embed as pe
    seen = []
    real = pe.masked_patch_embed
    monkeypatch.setattr(pe, "masked_patch_embed", lambda s, w, b, p, i: seen.append((s.dtype, w.dtype)) or real(s, w, b, p, i))
    torch.manual_seed(0)
    spec, w, b, pos = torch.randn(2, 1, 8, 8), torch.randn(6, 1, 4, 4), torch.randn(6), torch.randn(1, 5, 6)
    ids = torch.tensor([[0, 3], [2, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with dispatch.use_backend("torch", op="masked_patch_embed"):
            ref = ops_step.masked_patch_embed(spec, w, b, pos, ids)
        with dispatch.use_backend("triton", op="masked_patch_embed"):
            out = ops_step.masked_patch_embed(spec, w, b, pos, ids)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert out.dtype == ref.dtype == torch.float32
    step = torch.finfo(torch.bfloat16).eps * (ref - pos[:, 1:][0, ids]).abs()
    assert ((out - ref).abs() <= step * 1.01 + 1e-6).all()
