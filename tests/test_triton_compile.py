"""Every Triton kernel compiles for real GPUs (sm_80 and sm_90), without a GPU.

The interpreter that runs the kernel tests on CPUs is more lenient than the compiler (types,
layouts, shapes of dot operands), so each kernel is also compiled ahead of time, to PTX and a cubin,
with the exact arguments and meta-parameters its launcher passes for representative shapes: the
launcher runs with its kernel launch intercepted. Skipped when this Triton has no ahead-of-time
compile API (checked on a trivial kernel first, so that an error in a kernel is never skipped).
"""
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from benchmarks.aot import as_jit, captured, compile_for  # noqa: E402

ARCHS = (80, 90)


@triton.jit
def _trivial(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


@pytest.fixture(scope="module")
def aot():
    try:
        compile_for(as_jit(_trivial), (torch.empty(4), 4), {"BLOCK": 16, "num_warps": 1}, 90)
    except Exception as e:  # this Triton's ahead-of-time API differs, or no compiler for the target
        pytest.skip(f"ahead-of-time compilation unavailable here: {type(e).__name__}: {e}")
    return compile_for


def compile_all(aot, launches):
    assert launches, "no kernel was launched"
    for fn, args, kwargs in launches:
        for arch in ARCHS:
            compiled = aot(fn, args, dict(kwargs), arch)
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin for sm_{arch}"


TUNED = {"fwd": {"block_m": 16, "num_warps": 1, "groups_per_program": 4},
         "bwd": {"block_m": 32, "num_warps": 2, "groups_per_program": 2}}


@pytest.mark.parametrize("dtype,tuning", [(torch.float32, {}), (torch.bfloat16, {}), (torch.bfloat16, TUNED),
                                          (torch.float16, {})],
                         ids=["fp32", "bf16", "bf16-tuned", "fp16"])
def test_window_attention_kernels_compile(aot, monkeypatch, dtype, tuning):
    from audiomae.kernels import window_attention as wa

    monkeypatch.setattr(wa, "TUNING", tuning)
    qkv = torch.randn(2, 64 * 8, 3 * 64, dtype=dtype)
    tau, bias = torch.full((2,), 0.1, dtype=dtype), torch.zeros(2, 16, 16, dtype=dtype)
    with captured(wa) as launches:
        wa._window_attention_fwd(qkv, tau, bias, [64, 8], [4, 4], [2, 0], 2)
        wa._window_attention_bwd(qkv[..., :64].contiguous(), qkv, tau, bias, [64, 8], [4, 4], [2, 0], 2)
    compile_all(aot, launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
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
    with captured(patch_embed, unshuffle, masked_loss) as launches:
        monkeypatch.setitem(patch_embed.TUNING, "bwd_split", 3)
        patch_embed.masked_patch_embed_fwd(spec, weight, bias, pos, ids)
        patch_embed.masked_patch_embed_bwd(torch.randn(B, K, D, dtype=torch.float32), spec, weight, ids, True)
        unshuffle.decoder_unshuffle_fwd(x, torch.randn(1, 1, D, dtype=dtype), restore, pos, False)
        unshuffle.decoder_unshuffle_bwd(torch.randn(B, 80, D, dtype=torch.float32), restore, 1 + K, dtype, False)
        masked_loss.masked_norm_pix_loss_fwd(pred, spec, mask, 16, True, True)
    compile_all(aot, launches)


@pytest.mark.parametrize("method", ["dft", "fft", "dft-hopper"])
def test_fbank_kernels_compile(aot, monkeypatch, method):
    """The default tilings (the DFT kernel's of older GPUs on CPU tensors; "dft-hopper": the one it
    takes on sm_90 and later)."""
    from audiomae.kernels import fbank

    monkeypatch.setitem(fbank.TUNING, "method", method.split("-")[0])
    if method == "dft-hopper":
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
        assert fbank._blocks(torch.device("cuda"))[:4] == (32, 32, 64, 4)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        wide = fbank._blocks(torch.device("cuda"))
        assert wide[:4] == (64, 16, 128, 8)
        for key, value in zip(("block_t", "block_s", "block_k", "num_warps"), wide):
            monkeypatch.setitem(fbank.TUNING, key, value)
    with captured(fbank) as launches:
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
    if not isinstance(_loop_changes_type, JITFunction):  # defined under the interpreter: it runs
        _loop_changes_type[(1,)](x, 4)
    with pytest.raises(Exception, match="(?i)loop|type"):
        aot(as_jit(_loop_changes_type), (x, 4), {"num_warps": 1}, 90)


def test_compiled_costs_are_read_from_the_cubin(aot):
    """benchmarks.aot's report: registers and a SASS instruction count for a compiled kernel."""
    from benchmarks.aot import _cuobjdump, cubin_costs

    if _cuobjdump() is None:
        pytest.skip("Triton's cuobjdump is not installed here")
    costs = cubin_costs(aot(as_jit(_trivial), (torch.empty(4), 4), {"BLOCK": 16, "num_warps": 1}, 90).asm["cubin"])
    assert costs["registers"] > 0 and costs["instructions"] > 5 and costs["local bytes"] == 0


def test_compiled_as_a_launch_specialises_its_arguments(aot):
    """Arguments are specialised as a launch specialises them: an aligned tensor and a stride
    divisible by 16 let the compiler vectorise (16-byte loads), and an integer 1 is a constant.
    Without that the costs in benchmarks.aot would describe code that never runs."""
    rows = torch.empty(128, 128)
    meta = {"BLOCK": 128, "num_warps": 1}  # 4 floats per thread
    ptx = aot(as_jit(_copy_rows), (rows, rows, 128), meta, 90).asm["ptx"]
    assert "ld.global.v4" in ptx, "a 16-byte aligned row of floats was not loaded with vector loads"
    ptx_odd = aot(as_jit(_copy_rows), (rows, rows, 127), meta, 90).asm["ptx"]
    assert "ld.global.v4" not in ptx_odd and "ld.global" in ptx_odd, "a stride of 127 floats cannot be vectorised"
    ptx_one = aot(as_jit(_copy_rows), (rows, rows, 1), meta, 90).asm["ptx"]
    assert ".param .u32" in ptx and ".param .u32" not in ptx_one, "a stride of 1 is not a compile-time constant"


@triton.jit
def _copy_rows(src, dst, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    row = tl.program_id(0) * stride
    tl.store(dst + row + i, tl.load(src + row + i))


def test_a_captured_launch_replays_alone(monkeypatch):
    """benchmarks.tune times a kernel alone by replaying the launch that benchmarks.aot captured
    from its op: the recorded grid, arguments and meta-parameters are the whole launch."""
    from audiomae.kernels import _common
    from audiomae.kernels import window_attention as wa

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    qkv = torch.randn(3, 8 * 4, 3 * 32)
    tau, bias = torch.rand(2) * 0.2 + 0.05, torch.randn(2, 16, 16)
    geometry = ([8, 4], [4, 4], [2, 0], 2)
    want = wa._window_attention_fwd(qkv, tau, bias, *geometry)
    with captured(wa) as launches:
        wa._window_attention_fwd(qkv, tau, bias, *geometry)
    assert len(launches) == len(launches.grids) == 1
    fn, args, kwargs = launches[0]
    out = args[3]
    out.fill_(float("nan"))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}  # not for the interpreter
    _common.for_current_mode(fn)[launches.grids[0]](*args, **kwargs)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gelu_mlp_kernels_compile(aot, monkeypatch, dtype):
    from audiomae.kernels import gelu_mlp

    monkeypatch.setattr(gelu_mlp, "TUNING", {})
    M, D, H = 300, 96, 384
    x, w1, b1 = torch.randn(M, D, dtype=dtype), torch.randn(H, D, dtype=dtype), torch.randn(H, dtype=dtype)
    w2, h = torch.randn(D, H, dtype=dtype), torch.randn(M, H, dtype=dtype)
    with captured(gelu_mlp) as launches:
        gelu_mlp.gelu_mlp_fc1(x, w1, b1, True)
        gelu_mlp.gelu_mlp_fc1(x[:, :90], w1[:, :90], None, False)  # a K tail, no bias, no h
        gelu_mlp.gelu_mlp_dgelu(x, w2, h, True)
        gelu_mlp.gelu_mlp_dgelu(x[:, :90], w2[:90], h, False)
        if dtype == torch.bfloat16:  # the backward's tile of h loaded before the K loop
            gelu_mlp.TUNING["bwd"] = (128, 128, 64, 8, 8, 4, 1)
            gelu_mlp.gelu_mlp_dgelu(x, w2, h, True)
        # persistent programs (the flattened loop over tiles): the forward with a K tail, the backward without
        gelu_mlp.TUNING.update(fwd=(64, 128, 64, 8, 4, 3, 0, 2), bwd=(64, 256, 64, 8, 8, 3, 0, 1))
        gelu_mlp.gelu_mlp_fc1(x[:, :90], w1[:, :90], b1, True)
        gelu_mlp.gelu_mlp_dgelu(x, w2, h, True)
    compile_all(aot, launches)
