"""Ahead-of-time compilation of the Triton kernels, no GPU needed, and what the compiled code costs.

    python -m benchmarks.aot [--arch 90] [--batch 256]

Each kernel is compiled exactly as its launcher would launch it (the launcher runs with the launch
intercepted, see :func:`captured`), to PTX and a cubin for ``sm_<arch>``. The report lists, per
window-attention tiling (rows per program, warps, window groups per program), the registers per
thread, local-memory (spill) bytes, the static SASS instruction count, and the instructions the
GPU must issue per window and head (instructions x warps / windows per loop iteration): both
kernels are straight-line code inside one loop over window groups, whose body runs once per group,
so that is close to the executed count (the prologue, counted too, runs once per program). With
132 SMs x 4 schedulers it gives a floor on the kernel's time from instruction issue alone, beside
the one from memory traffic; the registers per thread give the programs that fit on an SM. ``tests/test_triton_compile.py`` uses the same helpers to check that every kernel compiles.

With nvcc installed it also compiles ``csrc/window_attention.cu`` for ``sm_<arch>`` and reports the
same for the CUDA op's register kernels (one warp per window and head, a loop over the warp's
windows): registers, spill bytes, warps per SM and the instructions of the loop body; and for the
CUDA fbank kernel (``csrc/fbank.cu``), with its float64 instructions counted apart. For the fused
MLP's GEMM kernels it lists, per tiling, registers, spills, shared memory, programs per SM and
whether the dots compiled to Hopper ``wgmma``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def compile_for(fn, args, kwargs: Dict[str, Any], arch: int):
    """Compile the JIT function ``fn`` as ``fn[grid](*args, **kwargs)`` would launch it, for
    ``sm_<arch>``; returns Triton's compiled kernel (``.asm`` holds ``ptx`` and ``cubin``).

    Arguments are specialised as a launch specialises them: an integer equal to 1 becomes a
    constant, and integers divisible by 16 and 16-byte aligned tensors are marked so (Triton's
    ``tt.divisibility``), which is what lets the compiler vectorise loads and stores. Tensors are
    taken as allocated on the GPU, whose allocations are aligned."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    options["enable_fp_fusion"] = True  # what a launch gets by default (named: Triton 3.9 warns otherwise)
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        kind, spec = _specialize(value, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        signature[p.name] = kind
        if isinstance(spec, str) and spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _specialize(value, specialize: bool, align: bool):
    """(type, specialisation) of a launch argument, as ``JITFunction`` computes it."""
    if isinstance(value, torch.Tensor):
        # a GPU allocation: aligned, whatever the CPU stand-in's address
        return "*" + _DTYPES[value.dtype], "D" if align else ""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:  # older Triton: no alignment or constant specialisation
        return _arg_type(value), ""
    kind, spec = native_specialize_impl(BaseBackend, value, False, specialize, align)
    return kind, spec


def as_jit(kernel):
    """The compiled-mode ``JITFunction`` of a kernel, whatever ``TRITON_INTERPRET`` says."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


class Launches(list):
    """The recorded launches, ``(jit function, args, kwargs)`` each; ``grids[i]`` is the grid of
    launch ``i``, so that it can be replayed alone: ``fn[grids[i]](*args, **kwargs)``."""

    def __init__(self):
        super().__init__()
        self.grids: List[Any] = []


class _Capture:
    """Stands in for ``kernel[grid]``: records the launch instead of running it."""

    def __init__(self, fn, launches: Launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, args, dict(kwargs)))
            self.launches.grids.append(grid)
        return launch


@contextlib.contextmanager
def captured(*modules):
    """Within the block, the kernel launches of ``modules`` (``audiomae.kernels.*``) are recorded as
    ``(jit function, args, kwargs)`` instead of run, with the GPU tilings (not the interpreter's);
    the yielded :class:`Launches` also has their grids. What the launchers compute around their
    kernels still runs (on buffers the kernels did not write)."""
    launches = Launches()
    saved = []
    for m in modules:
        for name, value in (("_launcher", lambda k: _Capture(as_jit(k), launches)),
                            ("_for_current_mode", lambda k: _Capture(as_jit(k), launches)),
                            ("_interpreting", lambda: False)):
            if hasattr(m, name):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, value)
    try:
        yield launches
    finally:
        for m, name, value in reversed(saved):
            setattr(m, name, value)


def _cuobjdump() -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def cubin_costs(cubin: bytes) -> Dict[str, int]:
    """Registers, local-memory (spill) bytes, shared memory and SASS instruction count of a cubin
    (the ``cuobjdump`` that ships with Triton); empty when the tool is missing."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    out = {"instructions": sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line))}
    for key, name in (("REG", "registers"), ("STACK", "local bytes"), ("SHARED", "shared bytes")):
        m = re.search(key + r":(\d+)", usage)
        if m:
            out[name] = int(m.group(1))
    return out


def attention_report(arch: int = 90, batch: int = 256) -> List[Dict[str, Any]]:
    """Compiled costs of both attention kernels for the paper's decoder layer (bf16, 64 x 8 grid,
    4 x 4 windows, shift (2, 0), 16 heads of 32) across tilings; one row per (kernel, tiling)."""
    from audiomae.kernels import window_attention as wa

    H, D = 16, 32
    qkv = torch.empty(batch, 512, 3 * H * D, dtype=torch.bfloat16)
    tau, bias = torch.full((H,), 0.1, dtype=torch.bfloat16), torch.zeros(H, 16, 16, dtype=torch.bfloat16)
    geometry = ([64, 8], [4, 4], [2, 0], H)
    rows = []
    saved = dict(wa.TUNING)
    try:
        for tiling in [None] + [dict(block_m=bm, num_warps=nw, groups_per_program=g)
                                for bm in (16, 32, 64) for nw in (1, 2, 4) for g in (1, 4)]:
            wa.TUNING.clear()
            if tiling:
                wa.TUNING.update(fwd=tiling, bwd=tiling)
            with captured(wa) as launches:
                wa._window_attention_fwd(qkv, tau, bias, *geometry)
                wa._window_attention_bwd(qkv[..., :H * D], qkv, tau, bias, *geometry)
            for (fn, args, kwargs), direction in zip(launches, ("fwd", "bwd")):
                row = dict(direction=direction, tiling="default" if tiling is None else "",
                           block_m=kwargs["BLOCK_M"], num_warps=kwargs["num_warps"], groups_per_program=kwargs["GPP"])
                try:
                    costs = cubin_costs(compile_for(fn, args, kwargs, arch).asm["cubin"])
                except Exception as e:  # a tiling the compiler refuses
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                    rows.append(row)
                    continue
                row.update(costs)
                if "registers" in costs:
                    row["programs per SM"] = programs_per_sm(costs["registers"], kwargs["num_warps"],
                                                             costs.get("shared bytes", 0))
                windows = kwargs["WPB"]  # per iteration of the loop over window groups
                if "instructions" in costs:
                    row["warp instructions per window-head"] = costs["instructions"] * kwargs["num_warps"] / windows
                rows.append(row)
    finally:
        wa.TUNING.clear()
        wa.TUNING.update(saved)
    return rows


def mlp_report(arch: int = 90, batch: int = 64) -> List[Dict[str, Any]]:
    """Compiled costs of the fused MLP's two GEMM kernels (:mod:`audiomae.kernels.gelu_mlp`) at the
    decoder's shape (``batch`` x 512 tokens, 512 -> 2048), bf16, for the default tiling and each
    candidate of ``benchmarks.tune.MLP_TILINGS``: registers, spills, shared memory (the pipeline's
    buffers included), programs per SM and whether the dots became Hopper ``wgmma`` instructions."""
    from audiomae.kernels import gelu_mlp as km

    from .tune import MLP_KEYS, MLP_TILINGS

    M, D, H = batch * 512, 512, 2048
    bf = torch.bfloat16
    x, w1, b1 = torch.empty(M, D, dtype=bf), torch.empty(H, D, dtype=bf), torch.empty(H, dtype=bf)
    w2, h = torch.empty(D, H, dtype=bf), torch.empty(M, H, dtype=bf)
    rows = []
    saved = dict(km.TUNING)
    try:
        for direction in ("fwd", "bwd"):
            for tiling in [None] + MLP_TILINGS[direction]:
                km.TUNING.clear()
                if tiling:
                    km.TUNING[direction] = tiling
                with captured(km) as launches:
                    if direction == "fwd":
                        km.gelu_mlp_fc1(x, w1, b1, True)
                    else:
                        km.gelu_mlp_dgelu(x, w2, h, True)
                fn, args, kwargs = launches[0]
                used = (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["GROUP_M"],
                        kwargs["num_warps"], kwargs["num_stages"])
                used += (int(kwargs.get("PREFETCH_H", 0)), km._tiling(direction, M, H, D, bf)[7])
                row = dict(direction=direction, tiling="default" if tiling is None else "", **dict(zip(MLP_KEYS, used)))
                try:
                    compiled = compile_for(fn, args, kwargs, arch)
                except Exception as e:  # a tiling the compiler refuses
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                    rows.append(row)
                    continue
                costs = cubin_costs(compiled.asm["cubin"])
                row.update({k: v for k, v in costs.items() if k != "shared bytes"})
                row["shared bytes"] = int(getattr(compiled.metadata, "shared", 0) or 0)
                row["wgmma"] = "wgmma.mma_async" in compiled.asm.get("ptx", "")
                if "registers" in costs:
                    row["programs per SM"] = programs_per_sm(costs["registers"], kwargs["num_warps"],
                                                             row["shared bytes"])
                rows.append(row)
    finally:
        km.TUNING.clear()
        km.TUNING.update(saved)
    return rows


def _sass_functions(sass: str) -> Dict[str, List[str]]:
    """{mangled name: [instruction text, ...]} of a cuobjdump -sass listing."""
    out: Dict[str, List[str]] = {}
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def loop_body(instructions) -> Optional[int]:
    """Instructions in the body of the function's loop: the span of the longest backward branch in
    line. Out-of-line code (the divergence fallbacks of shuffles, ``BRA.DIV`` targets, and slow paths
    reached by ``CALL``) sits after the function and jumps back into it; those jumps are not loops.
    None when there is no loop."""
    index = {a: i for i, (a, _) in enumerate(instructions)}
    out_of_line = [int(m.group(1), 16) for _, t in instructions
                   for m in [re.search(r"(?:BRA\.DIV\s+\S+|CALL\.\S+)\s+0x([0-9a-f]+)", t)] if m]
    end = min(out_of_line, default=float("inf"))
    best = None
    for i, (address, text) in enumerate(instructions):
        m = re.match(r"(?:@!?P\d\s+)?BRA(?:\.U)?\s+(?:`\(\.L_x_\d+\)\s+)?0x([0-9a-f]+)", text)
        if m and address < end and int(m.group(1), 16) < address and int(m.group(1), 16) in index:
            span = i - index[int(m.group(1), 16)] + 1
            best = span if best is None else max(best, span)
    return best


def _compile_csrc(source: str, arch: int):
    """(resource usage, {mangled name: SASS instructions}) of ``csrc/<source>`` compiled for
    ``sm_<arch>`` with the extension's flags; None when nvcc, csrc/ or cuobjdump is missing."""
    from audiomae import cuda_ext

    nvcc, src, tool = cuda_ext.find_nvcc(), cuda_ext.source_dir(), _cuobjdump()
    if nvcc is None or src is None or tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [nvcc, "-cubin", *cuda_ext.NVCC_FLAGS, *cuda_ext.TORCH_NVCC_FLAGS,
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", cubin, os.path.join(src, source)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    return dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage)), _sass_functions(sass)


def _resources(res: str, row: Dict[str, Any], warps: int) -> None:
    for key, field in (("REG", "registers"), ("STACK", "local bytes")):
        found = re.search(key + r":(\d+)", res)
        if found:
            row[field] = int(found.group(1))
    if "registers" in row:
        row["warps per SM"] = warps * programs_per_sm(row["registers"], warps)


def _csrc_rows(source: str, arch: int, pattern: str, fields) -> List[Dict[str, Any]]:
    """One row per kernel of ``csrc/<source>`` whose mangled name matches ``pattern``: ``fields(match,
    instructions)`` plus the instruction count, registers, spill bytes and warps per SM (blocks of 4
    warps); empty when nvcc, csrc/ or cuobjdump is missing."""
    compiled = _compile_csrc(source, arch)
    if compiled is None:
        return []
    resources, functions = compiled
    rows = []
    for name, instructions in sorted(functions.items()):
        m = re.search(pattern, name)
        if m:
            row = dict(fields(m, instructions), instructions=len(instructions))
            _resources(resources.get(name, ""), row, 4)
            rows.append(row)
    return rows


def cuda_report(arch: int = 90) -> List[Dict[str, Any]]:
    """Compiled costs of the CUDA op's register window-attention kernels (bfloat16, vector accesses,
    head_dim 16, 32 and 64) for ``sm_<arch>``, with the instructions of the loop over a warp's windows;
    empty when nvcc or cuobjdump is missing."""
    return _csrc_rows("window_attention.cu", arch, r"wa_(forward|backward)_mma_kernelI13__nv_bfloat16Li(\d+)ELb1E",
                      lambda m, ins: {"direction": "fwd" if m.group(1) == "forward" else "bwd",
                                      "head_dim": int(m.group(2)),
                                      "warp instructions per window-head": loop_body(ins)})


def fbank_cuda_report(arch: int = 90) -> List[Dict[str, Any]]:
    """Compiled costs of the CUDA fbank kernel (csrc/fbank.cu, one warp per frame, blocks of 4 warps)
    per output dtype for ``sm_<arch>``, with its static count of float64 instructions; empty when nvcc
    or cuobjdump is missing."""
    names = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}
    return _csrc_rows("fbank.cu", arch, r"fbank_kernelI(f|6__half|13__nv_bfloat16)E",
                      lambda m, ins: {"out_dtype": names[m.group(1)],
                                      "float64 instructions": sum(1 for _, t in ins if re.match(
                                          r"(?:@!?P\d\s+)?D(?:ADD|FMA|MUL)\b", t))})


def _cuda_table(rows: List[Dict[str, Any]], batch: int, sms: int = 132, clock_ghz: float = 1.98) -> str:
    keys = ["direction", "head_dim", "registers", "local bytes", "warps per SM", "instructions",
            "warp instructions per window-head"]
    head = keys + [f"issue floor ms (batch {batch}, 16 heads)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    window_heads = batch * 32 * 16
    for r in sorted(rows, key=lambda r: (r["direction"], r["head_dim"])):
        per = r.get("warp instructions per window-head")
        floor = "" if per is None or r["head_dim"] != 32 else \
            f"{per * window_heads / (sms * 4 * clock_ghz * 1e9) * 1e3:.3f}"
        lines.append("| " + " | ".join([str(r.get(k, "")) for k in keys] + [floor]) + " |")
    return "\n".join(lines)


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int = 0) -> int:
    """Programs (thread blocks) resident on one sm_80/sm_90 SM: 64 K registers allocated per warp in
    units of 256, at most 64 warps, 32 blocks and 227 KB of shared memory."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps = min(65536 // per_warp, 64)
    blocks = min(warps // num_warps, 32)
    if shared_bytes:
        blocks = min(blocks, (227 * 1024) // (shared_bytes + 1024))
    return blocks


def _table(rows: List[Dict[str, Any]], batch: int, sms: int = 132, clock_ghz: float = 1.98) -> str:
    keys = ["direction", "tiling", "block_m", "num_warps", "groups_per_program", "registers", "local bytes",
            "programs per SM", "instructions", "warp instructions per window-head"]
    head = keys + [f"issue floor ms (batch {batch})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    window_heads = batch * 32 * 16
    seen = set()
    for r in sorted(rows, key=lambda r: (r["direction"], r.get("warp instructions per window-head", 1e12))):
        key = (r["direction"], r["block_m"], r["num_warps"], r["groups_per_program"])
        if key in seen and r["tiling"] != "default":
            continue
        seen.add(key)
        per = r.get("warp instructions per window-head")
        floor = "" if per is None else f"{per * window_heads / (sms * 4 * clock_ghz * 1e9) * 1e3:.3f}"
        cells = [str(r.get(k, r.get("error", "") if k == "registers" else "")) for k in keys]
        if per is not None:
            cells[-1] = f"{per:.0f}"
        lines.append("| " + " | ".join(cells + [floor]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    ap.add_argument("--batch", type=int, default=256, help="batch for the issue-time floor column (default 256)")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        print("aot: triton is not installed")
        return 1
    if _cuobjdump() is None:
        print("aot: Triton's cuobjdump was not found; registers and instruction counts are not available")
    rows = attention_report(args.arch, args.batch)
    print(f"## window attention kernels, sm_{args.arch}, bf16, the paper's decoder layer\n")
    print("Issue floor: warp instructions per window-head x windows x heads / (132 SMs x 4 schedulers x "
          "1.98 GHz), the time instruction issue alone takes on an H100 (static counts of straight-line code).\n")
    print(_table(rows, args.batch))
    cuda_rows = cuda_report(args.arch)
    if cuda_rows:
        print(f"\n## the CUDA op's register kernels (csrc/window_attention_mma.cuh), sm_{args.arch}, bf16\n")
        print("One warp per (window, head); blocks of 4 warps. The loop over a warp's windows is straight-line "
              "code, so its body is the instructions one window and head takes. The issue floor is for the "
              "paper's layer (head_dim 32).\n")
        print(_cuda_table(cuda_rows, args.batch))
    else:
        print("\n(the CUDA kernels are not compiled here: nvcc, csrc/ or cuobjdump is missing)")
    keys = ["direction", "tiling", "block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages", "prefetch_h", "persistent",
            "registers", "local bytes", "shared bytes", "programs per SM", "wgmma", "instructions"]
    print(f"\n## the fused MLP's GEMM kernels (audiomae/kernels/gelu_mlp.py), sm_{args.arch}, bf16\n")
    print("The decoder's MLP, 64 x 512 tokens, 512 -> 2048: `fwd` the fc1 GEMM with bias and GELU epilogue, `bwd` "
          "the GEMM into the hidden layer with the GELU-derivative epilogue and bias column sums.\n")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in mlp_report(args.arch):
        print("| " + " | ".join(str(r.get(k, r.get("error", "") if k == "registers" else "")) for k in keys) + " |")
    fbank_rows = fbank_cuda_report(args.arch)
    if fbank_rows:
        keys = ["out_dtype", "registers", "local bytes", "warps per SM", "instructions", "float64 instructions"]
        print(f"\n## the CUDA fbank kernel (csrc/fbank.cu), sm_{args.arch}\n")
        print("One warp per frame, blocks of 4 warps. Static instruction counts of the whole kernel; the loop "
              "over a warp's frames is most of it.\n")
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in fbank_rows:
            print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
