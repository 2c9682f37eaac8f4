"""The training step's fused ops against the model's eager code, at ViT-B shapes (input 1024 x 128,
patch 16 -> 512 patches, 102 kept at mask ratio 0.8, encoder width 768, decoder width 512):

- masked patch embedding: embed only the kept patches and add their positions, vs the release's
  embed-all-then-gather (:func:`audiomae.ops_step.masked_patch_embed`);
- decoder unshuffle: mask tokens in, original order back, positions added
  (:func:`audiomae.ops_step.decoder_unshuffle`);
- masked norm-pix loss (:func:`audiomae.ops_step.masked_norm_pix_loss`);
- the transformer MLP ``fc2(gelu(fc1(x)))`` of the decoder and of the encoder, with the GELU and
  its derivative in the epilogues of Triton GEMMs vs cuBLAS GEMMs and PyTorch's GELU kernels
  (:func:`audiomae.ops.gelu_mlp`); on CUDA also the PyTorch MLP under ``torch.compile``, whose
  GELU kernels inductor generates, the alternative a compiled training step has;
- random masking ids: the release's recipe in PyTorch vs the one-launch CUDA kernel
  (:func:`audiomae.ops_cuda.random_masking_ids`), when the extension can be built.

Each op runs through the dispatch with the ``torch`` backend (the eager reference, the "ref" row)
and the ``triton`` backend, forward and forward + backward (gradients of the parameters and
activations the model trains: weight and bias; x and mask_token; pred; all five for the MLP).
Outputs and gradients are checked against a float64 computation before timing. Ops missing from
:mod:`audiomae.ops_step` and :mod:`audiomae.ops` are skipped with a note.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from audiomae import dispatch

from .harness import Context, Result, close_enough, dtype_name, error_note, free_memory, time_fn

SECTION = "step_ops"
T, FREQ, P, D, DD = 1024, 128, 16, 768, 512
L = (T // P) * (FREQ // P)  # 512
K = int(L * (1 - 0.8))  # 102
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # the kernel tests' floors


@dataclass
class OpCase:
    """An op: ``make(batch, seed)`` -> (float64 leaves, indices of the leaves that get gradients,
    the other arguments); ``op`` is the public function's name in ``audiomae.ops_step``."""

    name: str
    op: str
    make: Callable[[int, int], Tuple[List[torch.Tensor], Sequence[int], Tuple]]


def _ids(batch: int, g: torch.Generator):
    from audiomae.reference.step import random_masking_ids

    noise = torch.rand(batch, L, generator=g)
    return random_masking_ids(batch, L, K, noise=noise)


def _patch_embed(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    spec = torch.randn(batch, 1, T, FREQ, generator=g, dtype=torch.float64)
    weight = torch.randn(D, 1, P, P, generator=g, dtype=torch.float64) / P
    bias = torch.randn(D, generator=g, dtype=torch.float64)
    pos = torch.randn(1, 1 + L, D, generator=g, dtype=torch.float64)
    ids_keep = _ids(batch, g)[0]
    return [spec, weight, bias, pos], (1, 2), (ids_keep,)


def _unshuffle(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1 + K, DD, generator=g, dtype=torch.float64)
    mask_token = torch.randn(1, 1, DD, generator=g, dtype=torch.float64)
    pos = torch.randn(1, 1 + L, DD, generator=g, dtype=torch.float64)
    ids_restore = _ids(batch, g)[1]
    return [x, mask_token], (0, 1), (ids_restore, pos, False)


def _loss(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, L, P * P, generator=g, dtype=torch.float64)
    spec = torch.randn(batch, 1, T, FREQ, generator=g, dtype=torch.float64)
    mask = _ids(batch, g)[2].to(torch.float64)
    return [pred, spec, mask], (0,), (P,)


def _mlp(tokens: int, width: int):
    def make(batch: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, tokens, width, generator=g, dtype=torch.float64)
        w1 = torch.randn(4 * width, width, generator=g, dtype=torch.float64) / width ** 0.5
        b1 = torch.randn(4 * width, generator=g, dtype=torch.float64) * 0.1
        w2 = torch.randn(width, 4 * width, generator=g, dtype=torch.float64) / (4 * width) ** 0.5
        b2 = torch.randn(width, generator=g, dtype=torch.float64) * 0.1
        return [x, w1, b1, w2, b2], (0, 1, 2, 3, 4), ()
    return make


CASES = [
    OpCase("masked patch embedding", "masked_patch_embed", _patch_embed),
    OpCase("decoder unshuffle", "decoder_unshuffle", _unshuffle),
    OpCase("masked norm-pix loss", "masked_norm_pix_loss", _loss),
    OpCase("decoder MLP (GELU)", "gelu_mlp", _mlp(L, DD)),
    OpCase("encoder MLP (GELU)", "gelu_mlp", _mlp(K + 1, D)),
]


def _op(name: str):
    """The public function ``name`` of :mod:`audiomae.ops_step` or :mod:`audiomae.ops`, or None."""
    from audiomae import ops, ops_step

    return getattr(ops_step, name, None) or getattr(ops, name, None)


_COMPILED: dict = {}


def _call(case: OpCase, backend: str, leaves, extra, compiled: bool = False):
    fn = _op(case.op)
    if compiled:  # one compiled function per case (its own shapes: no recompiling for dynamic ones)
        if case.name not in _COMPILED:
            _COMPILED[case.name] = torch.compile(fn)
        fn = _COMPILED[case.name]
    if case.op == "decoder_unshuffle":  # (x, mask_token, ids_restore, pos, keep_cls)
        args = (leaves[0], leaves[1], *extra)
    else:
        args = (*leaves, *extra)
    with dispatch.use_backend(backend, op=case.op):
        return fn(*args)


def _prepare(case: OpCase, batch: int, seed: int, dtype: torch.dtype, device, backward: bool):
    leaves, grad_idx, extra = case.make(batch, seed)
    leaves = [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in leaves]
    if case.op == "masked_norm_pix_loss":
        leaves[2] = leaves[2].float()  # the mask stays float32, as the model passes it
    extra = tuple((e.to(device=device, dtype=dtype) if e.is_floating_point() else e.to(device))
                  if isinstance(e, torch.Tensor) else e for e in extra)
    for i in grad_idx:
        leaves[i].requires_grad_(backward)
    return leaves, grad_idx, extra


def _outputs(case, backend, leaves, grad_idx, extra, backward, seed=7):
    out = _call(case, backend, leaves, extra)
    if not backward:
        return [out.detach()]
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, [leaves[i] for i in grad_idx], grad_out)
    return [out.detach()] + [x.detach() for x in grads]


def check(case: OpCase, batch: int, dtype: torch.dtype, device, backward: bool) -> Tuple[bool, str]:
    exact = _outputs(case, "torch", *_prepare(case, batch, 1, torch.float64, device, backward), backward)
    own = _outputs(case, "torch", *_prepare(case, batch, 1, dtype, device, backward), backward)
    try:
        got = _outputs(case, "triton", *_prepare(case, batch, 1, dtype, device, backward), backward)
    except Exception as e:
        return False, error_note(e, "raised ")
    for i, (g, r, o) in enumerate(zip(got, exact, own)):
        ok, err, bound = close_enough(g, r, o, FLOOR[dtype])
        if not ok:
            what = "output" if i == 0 else f"gradient {i}"
            return False, f"wrong {what}: relative error {err:.3g} > bound {bound:.3g}"
    return True, "ok"


def _why_not(case: OpCase, device, dtype) -> Optional[str]:
    if _op(case.op) is None:
        return f"neither audiomae.ops_step nor audiomae.ops has {case.op}"
    leaves, _, extra = _prepare(case, 1, 0, dtype, device, False)
    args = (leaves[0], leaves[1], *extra) if case.op == "decoder_unshuffle" else (*leaves, *extra)
    return "; ".join(dispatch.reasons(case.op, *args)["triton"]) or None


def run(ctx: Context) -> None:
    report, device = ctx.report, ctx.device
    batch = int(ctx.options.get("step_batch") or (64 if device.type == "cuda" else 4))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report.describe(SECTION, f"Batch {batch}, {dtype_name(dtype)}; `fwd+bwd` includes the gradients the model "
                             "needs (patch embedding: weight, bias; unshuffle: x, mask_token; loss: pred; MLP: x and "
                             "both layers' weights and biases). The MLPs: decoder [batch, 512, 512] -> 2048 -> 512, "
                             "encoder [batch, 103, 768] -> 3072 -> 768.",
                    spec=f"[{batch}, 1, {T}, {FREQ}]", patch=P, patches=L, kept=K, encoder_dim=D, decoder_dim=DD)
    targs = ctx.timing_args()
    for case in CASES:
        why = _why_not(case, device, dtype)
        backends = [("eager (torch backend)", "torch", True, False)]
        if case.op == "gelu_mlp" and device.type == "cuda":
            backends.append(("torch backend + torch.compile", "torch", False, True))
        if why:
            report.note(SECTION, f"{case.name}, triton: not run ({why})")
        else:
            backends.append(("triton (audiomae)", "triton", False, False))
        for backward in (False, True):
            params = {"op": case.name, "pass": "fwd+bwd" if backward else "fwd", "dtype": dtype_name(dtype),
                      "batch": batch}
            for label, backend, is_ref, compiled in backends:
                if ctx.budget.expired():
                    report.note(SECTION, "time budget used up: the remaining measurements were not made")
                    return
                if backend != "torch":
                    ok, msg = check(case, 2, dtype, device, backward)
                    if not ok:
                        report.note(SECTION, f"{case.name}, {params['pass']}, {backend}: not timed, {msg}")
                        continue
                sets = [_prepare(case, batch, s, dtype, device, backward) for s in range(3)]

                def step(leaves, grad_idx, extra, backend=backend, backward=backward, compiled=compiled):
                    out = _call(case, backend, leaves, extra, compiled)
                    if backward:
                        torch.autograd.grad(out, [leaves[i] for i in grad_idx], torch.ones_like(out))

                try:
                    t = time_fn(step, sets, device, **targs)
                    report.add(Result(SECTION, label, params, t, reference=is_ref))
                except Exception as e:
                    note = error_note(e)
                    report.add(Result(SECTION, label, params, None, note=note, reference=is_ref))
                del sets
                free_memory(device)
    _masking(ctx, batch)


def _masking(ctx: Context, batch: int) -> None:
    """Random masking ids: the release's recipe in PyTorch (noise, two argsorts, gather) against the
    one-launch CUDA kernel; both checked equal on a seeded Philox stream before timing."""
    from audiomae import ops_cuda

    report, device = ctx.report, ctx.device
    name, params = "random masking ids", {"op": "random masking ids", "pass": "fwd", "dtype": "int64",
                                          "batch": batch}
    backends = [("eager (torch backend)", "torch", True)]
    why = "; ".join(dispatch.reasons("random_masking_ids", batch, L, K, device).get("cuda", ["not registered"]))
    if why:
        report.note(SECTION, f"{name}, cuda: not run ({why})")
    else:
        try:
            with dispatch.use_backend("torch", op="random_masking_ids"):
                want = ops_cuda.random_masking_ids(batch, L, K, device, seed=1234)
            with dispatch.use_backend("cuda", op="random_masking_ids"):
                got = ops_cuda.random_masking_ids(batch, L, K, device, seed=1234)
            same = all(torch.equal(a, b) for a, b in zip(want, got))
            if same:
                backends.append(("cuda (audiomae)", "cuda", False))
            else:
                report.note(SECTION, f"{name}, cuda: not timed, differs from the torch backend on seed 1234")
        except Exception as e:
            report.note(SECTION, f"{name}, cuda: not timed, {error_note(e, 'raised ')}")
    for label, backend, is_ref in backends:
        if ctx.budget.expired():
            report.note(SECTION, "time budget used up: the remaining measurements were not made")
            return

        def step(backend=backend):
            with dispatch.use_backend(backend, op="random_masking_ids"):
                ops_cuda.random_masking_ids(batch, L, K, device)

        try:
            t = time_fn(step, [()], device, **ctx.timing_args())
            report.add(Result(SECTION, label, params, t, reference=is_ref))
        except Exception as e:
            report.add(Result(SECTION, label, params, None, note=error_note(e), reference=is_ref))
