"""Every Triton kernel compiles for real GPUs (sm_80 and sm_90), without a GPU.

The interpreter that runs the kernel tests on CPUs is more lenient than the compiler (types,
layouts, shapes of dot operands), so each kernel is also compiled ahead of time, to PTX and a cubin,
with the exact arguments and meta-parameters its launcher passes for representative shapes: the
launcher runs with its kernel launch intercepted. Skipped when this Triton has no ahead-of-time
compile API (checked on a trivial kernel first, so that an error in a kernel is never skipped).
"""
import contextlib

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

ARCHS = (80, 90)

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def compile_for(fn, args, kwargs, arch):
    """Compile the JIT function ``fn`` as ``fn[grid](*args, **kwargs)`` would launch it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    options["enable_fp_fusion"] = True  # what a launch gets by default (named: Triton 3.9 warns otherwise)
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
        else:
            signature[p.name] = _arg_type(value)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


@triton.jit
def _trivial(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


@pytest.fixture(scope="module")
def aot():
    try:
        from triton.runtime.jit import JITFunction

        fn = _trivial if isinstance(_trivial, JITFunction) else JITFunction(_trivial.fn)
        compile_for(fn, (torch.empty(4), 4), {"BLOCK": 16, "num_warps": 1}, 90)
    except Exception as e:  # this Triton's ahead-of-time API differs, or no compiler for the target
        pytest.skip(f"ahead-of-time compilation unavailable here: {type(e).__name__}: {e}")
    return compile_for


class _Capture:
    """Stands in for ``kernel[grid]``: records the launch instead of running it."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, args, dict(kwargs)))
        return launch


@contextlib.contextmanager
def captured(monkeypatch, *modules):
    """Intercept every kernel launch of ``modules`` (compiled-mode kernels, not interpreted)."""
    from triton.runtime.jit import JITFunction

    launches = []

    def as_jit(kernel):
        return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)

    for m in modules:
        if hasattr(m, "_launcher"):
            monkeypatch.setattr(m, "_launcher", lambda k: _Capture(as_jit(k), launches))
        if hasattr(m, "_for_current_mode"):
            monkeypatch.setattr(m, "_for_current_mode", lambda k: _Capture(as_jit(k), launches))
        if hasattr(m, "_interpreting"):
            monkeypatch.setattr(m, "_interpreting", lambda: False)  # the GPU tilings
    yield launches


def compile_all(aot, launches):
    assert launches, "no kernel was launched"
    for fn, args, kwargs in launches:
        for arch in ARCHS:
            compiled = aot(fn, args, dict(kwargs), arch)
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin for sm_{arch}"


TUNED = {"fwd": {"block_m": 16, "num_warps": 1, "groups_per_program": 4},
         "bwd": {"block_m": 32, "num_warps": 2, "groups_per_program": 2}}


@pytest.mark.parametrize("dtype,tuning", [(torch.float32, {}), (torch.bfloat16, {}), (torch.bfloat16, TUNED)],
                         ids=["fp32", "bf16", "bf16-tuned"])
def test_window_attention_kernels_compile(aot, monkeypatch, dtype, tuning):
    from audiomae.kernels import window_attention as wa

    monkeypatch.setattr(wa, "TUNING", tuning)
    qkv = torch.randn(2, 64 * 8, 3 * 64, dtype=dtype)
    tau, bias = torch.full((2,), 0.1, dtype=dtype), torch.zeros(2, 16, 16, dtype=dtype)
    with captured(monkeypatch, wa) as launches:
        wa._window_attention_fwd(qkv, tau, bias, [64, 8], [4, 4], [2, 0], 2)
        wa._window_attention_bwd(qkv[..., :64].contiguous(), qkv, tau, bias, [64, 8], [4, 4], [2, 0], 2)
    compile_all(aot, launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_kernels_compile(aot, monkeypatch, dtype):
    from audiomae.kernels import masked_loss, patch_embed, unshuffle

    B, D, K = 2, 96, 20
    spec = torch.randn(B, 1, 160, 128, dtype=dtype)
    weight, bias = torch.randn(D, 1, 16, 16, dtype=dtype), torch.randn(D, dtype=dtype)
    pos = torch.randn(1, 1 + 80, D, dtype=torch.float32)
    ids = torch.randint(0, 80, (B, K))
    restore = torch.argsort(torch.rand(B, 80), dim=1)
    x = torch.randn(B, 1 + K, D, dtype=dtype)
    pred, mask = torch.randn(B, 80, 256, dtype=dtype), (torch.rand(B, 80) < 0.8).to(dtype)
    with captured(monkeypatch, patch_embed, unshuffle, masked_loss) as launches:
        monkeypatch.setitem(patch_embed.TUNING, "bwd_split", 3)
        patch_embed.masked_patch_embed_fwd(spec, weight, bias, pos, ids)
        patch_embed.masked_patch_embed_bwd(torch.randn(B, K, D, dtype=torch.float32), spec, weight, ids, True)
        unshuffle.decoder_unshuffle_fwd(x, torch.randn(1, 1, D, dtype=dtype), restore, pos, False)
        unshuffle.decoder_unshuffle_bwd(torch.randn(B, 80, D, dtype=torch.float32), restore, 1 + K, dtype, False)
        masked_loss.masked_norm_pix_loss_fwd(pred, spec, mask, 16, True, True)
    compile_all(aot, launches)


@pytest.mark.parametrize("method", ["dft", "fft"])
def test_fbank_kernels_compile(aot, monkeypatch, method):
    from audiomae.kernels import fbank

    monkeypatch.setitem(fbank.TUNING, "method", method)
    with captured(monkeypatch, fbank) as launches:
        fbank.fbank_features_op(torch.randn(2, 16000), 100, True, -4.27, 4.57, torch.bfloat16, 128)
    compile_all(aot, launches)


@triton.jit
def _loop_changes_type(x_ptr, n):
    acc = 0  # an int constant that the loop turns into a float tensor
    for i in range(n):
        acc += tl.load(x_ptr + i)
    tl.store(x_ptr, acc)


def test_a_kernel_the_compiler_refuses_fails_here(aot):
    """The check has teeth: a loop-carried value that changes type runs under the interpreter but
    is refused by the compiler."""
    from triton.runtime.jit import JITFunction

    x = torch.randn(4)
    interpreted = _loop_changes_type if not isinstance(_loop_changes_type, JITFunction) else None
    if interpreted is not None:
        interpreted[(1,)](x, 4)
    fn = _loop_changes_type if isinstance(_loop_changes_type, JITFunction) else JITFunction(_loop_changes_type.fn)
    with pytest.raises(Exception, match="(?i)loop|type"):
        aot(fn, (x, 4), {"num_warps": 1}, 90)
