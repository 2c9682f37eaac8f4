"""The C++/CUDA extension in ``csrc/``: availability, just-in-time build, compile checks.

The extension (window attention forward/backward, one-launch random masking) is built the first
time a ``cuda`` backend op runs, with torch's extension tools (``torch.utils.cpp_extension.load``,
ninja, nvcc) into ``~/.cache/audiomae/ext/<torch>-<cuda>-<arch>`` (``AUDIOMAE_EXT_DIR`` overrides
the root), once per torch/CUDA version and GPU architecture; an install built with
``AUDIOMAE_BUILD_CUDA=1`` ships it prebuilt as ``audiomae._cuda_ext``. Importing ``audiomae`` never
builds or imports it. Without a CUDA build of torch, a GPU, nvcc or ninja, :func:`why_not` says what
is missing and the ops run on the other backends. ``AUDIOMAE_NO_CUDA_EXT=1`` turns it off.

Command line::

    python -m audiomae.cuda_ext                   # can it be used here, and why not
    python -m audiomae.cuda_ext --build           # build (or load) it now
    python -m audiomae.cuda_ext --check-compile   # nvcc for sm_80 and sm_90 and g++ on the binding:
                                                  # no GPU needed, only the CUDA toolkit
    python -m audiomae.cuda_ext --prebuilt DIR    # DIR/_cuda_ext.so for an install-time build
    python -m audiomae.cuda_ext --emulator        # build the kernels as host code (csrc/emulate.h)

Sources: ``audiomae_cuda.h`` (the C launch API: plain pointers, sizes, strides, a stream),
``window_attention.cu``, ``random_masking.cu`` and ``fbank.cu`` (kernels and launchers; only the CUDA
toolkit's headers), ``bindings.cpp`` (pybind11 module through ``torch/extension.h``; no CUDA headers, so it
compiles against a CPU build of torch too).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

EXT_NAME = "audiomae_cuda"
PREBUILT = "audiomae._cuda_ext"
CUDA_SOURCES = ("window_attention.cu", "random_masking.cu", "fbank.cu")
CPP_SOURCES = ("bindings.cpp",)
HEADERS = ("audiomae_cuda.h", "common.cuh", "mma.cuh", "window_attention_mma.cuh")
EMULATOR_SOURCES = ("emulate.h", "emulate_main.cpp")
CHECK_ARCHS = ("80", "90")
DISABLE_ENV = "AUDIOMAE_NO_CUDA_EXT"
DIR_ENV = "AUDIOMAE_EXT_DIR"

CXX_FLAGS = ["-O3", "-std=c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
# what torch adds to every nvcc command of an extension (torch.utils.cpp_extension.COMMON_NVCC_FLAGS)
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]

_lock = threading.Lock()
_module = None
_build_error: Optional[str] = None


# --- where things are -----------------------------------------------------------------------------
def source_dir() -> Optional[Path]:
    """``csrc/`` of a source checkout, or its installed copy ``audiomae/csrc``; None when absent."""
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):
        if all((d / f).is_file() for f in CUDA_SOURCES + CPP_SOURCES + HEADERS):
            return d
    return None


def find_nvcc() -> Optional[str]:
    """nvcc from ``CUDA_HOME`` / ``CUDA_PATH``, the ``PATH``, or ``/usr/local/cuda``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def toolkit_root() -> Optional[str]:
    """The CUDA toolkit folder (with ``include/cuda_runtime.h``): ``CUDA_HOME`` / ``CUDA_PATH``, else
    the folder above nvcc's ``bin`` (following links), else ``/usr/local/cuda``."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = find_nvcc()
    if nvcc:
        candidates += [str(Path(nvcc).parent.parent), str(Path(nvcc).resolve().parent.parent)]
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return c
    return None


def _use_toolkit(cpp_extension) -> None:
    """Point torch's extension builder at the toolkit when its own guess (the folder above the first
    nvcc on PATH) has no CUDA headers, e.g. when that nvcc is a wrapper script in /usr/local/bin."""
    root = toolkit_root()
    home = getattr(cpp_extension, "CUDA_HOME", None)
    if root and (not home or not (Path(home) / "include" / "cuda_runtime.h").is_file()):
        cpp_extension.CUDA_HOME = root


def _prebuilt_present() -> bool:
    try:
        return importlib.util.find_spec(PREBUILT) is not None
    except (ImportError, ValueError):
        return False


def cache_root() -> Path:
    root = os.environ.get(DIR_ENV)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "audiomae" / "ext"


def _arch_flags() -> Tuple[str, List[str]]:
    """(tag, nvcc flags) for the GPUs visible now, or for ``TORCH_CUDA_ARCH_LIST`` when it is set."""
    import torch

    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:  # torch turns it into -gencode flags itself
        tag = "arch" + "_".join(a.replace(".", "").replace("+PTX", "ptx") for a in env.replace(",", ";").split(";") if a)
        return tag, []
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    flags = [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps]
    return "sm" + "_".join(f"{a}{b}" for a, b in caps), flags


def build_dir() -> Path:
    """Where the just-in-time build goes: one folder per torch version, CUDA version and GPU arch."""
    import torch

    tag, _ = _arch_flags()
    return cache_root() / f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-{tag}"


# --- availability ---------------------------------------------------------------------------------
def why_not() -> List[str]:
    """Why the extension cannot be used here (empty when it can). Cheap: builds and imports nothing.

    While torch.compile traces, only a loaded extension counts (the checks below read the file system,
    which tracing cannot follow): load it first (:func:`load`, or any eager call of a ``cuda`` op)."""
    if _module is not None:
        return []
    from .dispatch import _compiling

    if _compiling():
        return ["the extension is not loaded (torch.compile uses it once it is: call audiomae.cuda_ext.load() "
                "before compiling)"]
    out = []
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        out.append(f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}")
    import torch

    if torch.version.cuda is None:
        out.append(f"torch {torch.__version__} is built without CUDA")
    elif not torch.cuda.is_available():
        out.append("no CUDA device is visible")
    if _build_error is not None:
        out.append(f"building the CUDA extension failed earlier in this process: {_build_error}")
    if not _prebuilt_present() and torch.version.cuda is not None:
        if source_dir() is None:
            out.append("the extension is not prebuilt and its sources (csrc/) are not installed")
        if find_nvcc() is None:
            out.append("the extension is not prebuilt and nvcc is not found (set CUDA_HOME or put nvcc on PATH)")
        elif toolkit_root() is None:
            out.append("the extension is not prebuilt and the CUDA toolkit's headers are not found next to nvcc "
                       "(set CUDA_HOME to the toolkit folder)")
        if shutil.which("ninja") is None:
            out.append("the extension is not prebuilt and ninja is not installed (pip install ninja)")
    return out


def available() -> bool:
    """True when the extension is loaded or can be built and loaded here."""
    return not why_not()


def is_loaded() -> bool:
    return _module is not None


# --- loading --------------------------------------------------------------------------------------
def _short(error: BaseException, lines: int = 12) -> str:
    text = str(error).strip().splitlines()
    return " | ".join(text[-lines:]) if text else type(error).__name__


def load(verbose: bool = False):
    """The extension module: imported if prebuilt, else built just in time (once per torch, CUDA and
    GPU architecture, cached on disk) and loaded. Raises RuntimeError with the reasons when it cannot."""
    global _module, _build_error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        reasons = why_not()
        if reasons:
            raise RuntimeError("the audiomae CUDA extension is not available: " + "; ".join(reasons))
        if _prebuilt_present():
            try:
                _module = importlib.import_module(PREBUILT)
                return _module
            except ImportError as e:  # e.g. built against another torch: build just in time instead
                print(f"audiomae: the prebuilt CUDA extension does not load ({e}); building it just in time",
                      file=sys.stderr, flush=True)
        src = source_dir()
        if src is None or toolkit_root() is None or shutil.which("ninja") is None:
            raise RuntimeError("the audiomae CUDA extension is not available: the prebuilt module does not load "
                               "and it cannot be built here (needs csrc/, the CUDA toolkit and ninja)")
        from torch.utils import cpp_extension

        _use_toolkit(cpp_extension)

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        _, arch = _arch_flags()
        start = time.time()
        cached = any(directory.glob(f"{EXT_NAME}*.so"))  # torch rebuilds it only if sources or flags changed
        if not cached:
            print(f"audiomae: building the CUDA extension in {directory} (first use with this torch, CUDA and "
                  "GPU; a minute or two) ...", file=sys.stderr, flush=True)
        try:
            _module = cpp_extension.load(
                name=EXT_NAME,
                sources=[str(src / f) for f in CPP_SOURCES + CUDA_SOURCES],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=NVCC_FLAGS + arch,
                extra_include_paths=[str(src)],
                build_directory=str(directory),
                verbose=verbose,
            )
        except Exception as e:  # compiler errors, missing toolkit pieces: remember, fall back elsewhere
            _build_error = _short(e)
            raise RuntimeError(f"building the audiomae CUDA extension failed (build folder {directory}): "
                               f"{_build_error}") from e
        if not cached or time.time() - start > 5:
            print(f"audiomae: CUDA extension ready ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        return _module


def build_prebuilt(directory, archs: Optional[Sequence[str]] = None, verbose: bool = False) -> Path:
    """Compile the extension as ``_cuda_ext.so`` into ``directory`` (installed as ``audiomae/_cuda_ext.so``
    by an install with ``AUDIOMAE_BUILD_CUDA=1``) and return its path. Needs a CUDA build of torch,
    nvcc and ninja, not a GPU: the architectures are ``archs`` (e.g. ``("80", "90")``), else
    ``TORCH_CUDA_ARCH_LIST``, else sm_80 and sm_90."""
    from torch.utils import cpp_extension

    _use_toolkit(cpp_extension)
    src = source_dir()
    if src is None:
        raise RuntimeError("csrc/ not found next to the audiomae package")
    if archs is None and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        archs = CHECK_ARCHS
    arch = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs or ()]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="audiomae-prebuilt-") as tmp:
        cpp_extension.load(name="_cuda_ext", sources=[str(src / f) for f in CPP_SOURCES + CUDA_SOURCES],
                           extra_cflags=list(CXX_FLAGS), extra_cuda_cflags=NVCC_FLAGS + arch,
                           extra_include_paths=[str(src)], build_directory=tmp, verbose=verbose)
        built = Path(tmp) / "_cuda_ext.so"
        target = directory / built.name
        shutil.copy2(built, target)
    return target


# --- compile checks (no GPU needed) ---------------------------------------------------------------
@dataclass
class CompileResult:
    name: str
    ok: bool
    seconds: float
    command: List[str]
    output: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name:<34} {self.seconds:6.1f} s"


def _run(name: str, cmd: List[str], timeout: float) -> CompileResult:
    start = time.time()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        ok, out = p.returncode == 0, p.stdout
    except subprocess.TimeoutExpired as e:
        ok, out = False, f"timed out after {timeout} s\n{e.stdout or ''}"
    except OSError as e:
        ok, out = False, f"cannot run {cmd[0]}: {e}"
    return CompileResult(name, ok, time.time() - start, cmd, out)


def torch_nvcc_flags() -> List[str]:
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        return list(COMMON_NVCC_FLAGS)
    except Exception:
        return list(TORCH_NVCC_FLAGS)


def nvcc_command(source: Path, arch: str, output: Path, nvcc: Optional[str] = None) -> List[str]:
    """The nvcc command that compiles one .cu file for sm_<arch>, with the flags of the real build."""
    return [nvcc or find_nvcc() or "nvcc", "-c", f"-gencode=arch=compute_{arch},code=sm_{arch}", *NVCC_FLAGS,
            *torch_nvcc_flags(), "-Xcompiler", "-fPIC", f"-I{source.parent}", str(source), "-o", str(output)]


def binding_command(source: Path, cxx: str = "g++") -> List[str]:
    """A g++ syntax check of the binding with torch's and Python's headers."""
    import torch
    from torch.utils.cpp_extension import include_paths

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    inc = [f"-isystem{p}" for p in include_paths()] + [f"-isystem{sysconfig.get_paths()['include']}"]
    return [cxx, "-fsyntax-only", *CXX_FLAGS, "-Wall", f"-DTORCH_EXTENSION_NAME={EXT_NAME}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *inc, f"-I{source.parent}",
            str(source)]


def check_compile(archs: Sequence[str] = CHECK_ARCHS, binding: bool = True, jobs: Optional[int] = None,
                  timeout: float = 600.0) -> List[CompileResult]:
    """Compile every .cu file with nvcc for each architecture (``nvcc -c``: device code and the host
    launchers) and the binding with g++ (``-fsyntax-only``). Needs the CUDA toolkit, not a GPU."""
    src = source_dir()
    if src is None:
        raise RuntimeError("csrc/ not found next to the audiomae package")
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="audiomae-check-") as tmp:
        tasks = [(f"{f} sm_{a}", nvcc_command(src / f, a, Path(tmp) / f"{f}.sm_{a}.o", nvcc))
                 for a in archs for f in CUDA_SOURCES]
        if binding:
            cxx = os.environ.get("CXX", "g++")
            tasks.append((f"{CPP_SOURCES[0]} ({Path(cxx).name} -fsyntax-only)", binding_command(src / CPP_SOURCES[0], cxx)))
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(lambda t: _run(t[0], t[1], timeout), tasks))


# --- host emulation of the kernels (tests without a GPU) ------------------------------------------
def emulator_command(output: Path, sanitizer: Optional[str] = None, cxx: str = "g++") -> List[str]:
    src = source_dir()
    if src is None:
        raise RuntimeError("csrc/ not found next to the audiomae package")
    san = {None: [], "thread": ["-fsanitize=thread"], "address": ["-fsanitize=address,undefined",
                                                                  "-fno-sanitize-recover=undefined"]}[sanitizer]
    return [cxx, "-std=c++20", "-O1", "-g", "-pthread", "-ffp-contract=off", "-DAUDIOMAE_EMULATE", *san, f"-I{src}",
            "-x", "c++", *[str(src / f) for f in CUDA_SOURCES], "-x", "none", str(src / "emulate_main.cpp"),
            "-o", str(output)]


def build_emulator(sanitizer: Optional[str] = None, directory: Optional[Path] = None, cxx: str = "g++") -> Path:
    """The kernels compiled as a host program (see csrc/emulate.h), cached by the sources' hash.
    ``sanitizer``: None, "thread" (races) or "address" (out-of-bounds, undefined behaviour)."""
    src = source_dir()
    if src is None:
        raise RuntimeError("csrc/ not found next to the audiomae package")
    h = hashlib.sha256()
    for f in CUDA_SOURCES + HEADERS + EMULATOR_SOURCES:
        h.update((src / f).read_bytes())
    h.update(" ".join(emulator_command(Path("exe"), sanitizer, cxx)).encode())  # the flags too
    directory = Path(directory) if directory else cache_root() / "emulator"
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / f"emulate-{sanitizer or 'plain'}-{h.hexdigest()[:16]}"
    if exe.is_file():
        return exe
    tmp = exe.with_name(exe.name + f".{os.getpid()}.tmp")
    result = _run(f"emulator ({sanitizer or 'plain'})", emulator_command(tmp, sanitizer, cxx), 900)
    if not result.ok:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the emulator failed:\n{' '.join(result.command)}\n{result.output}")
    os.replace(tmp, exe)
    return exe


# --- command line ---------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audiomae.cuda_ext", description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="build (or load) the extension now")
    parser.add_argument("--check-compile", action="store_true",
                        help="compile the .cu files with nvcc and the binding with g++ (no GPU needed)")
    parser.add_argument("--arch", default=",".join(CHECK_ARCHS), help="architectures for --check-compile (80,90)")
    parser.add_argument("--no-binding", action="store_true", help="--check-compile: skip the binding")
    parser.add_argument("--prebuilt", metavar="DIR", help="compile the extension as DIR/_cuda_ext.so "
                        "(for an install-time build; no GPU needed)")
    parser.add_argument("--emulator", choices=("plain", "thread", "address"), nargs="?", const="plain",
                        help="build the host emulation of the kernels and print its path")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    status = 0
    if args.check_compile:
        archs = [a.strip().replace("sm_", "").replace(".", "") for a in args.arch.split(",") if a.strip()]
        try:
            results = check_compile(archs, binding=not args.no_binding)
        except RuntimeError as e:
            print(f"cannot check: {e}", file=sys.stderr)
            return 2
        for r in results:
            print(r.line())
            if not r.ok or args.verbose:
                print("  $ " + " ".join(r.command))
                print("\n".join("  " + line for line in r.output.rstrip().splitlines()))
        status = 0 if all(r.ok for r in results) else 1
    if args.prebuilt:
        archs = [a.strip().replace("sm_", "").replace(".", "") for a in args.arch.split(",") if a.strip()]
        print(build_prebuilt(args.prebuilt, archs if "--arch" in (argv or sys.argv) else None, args.verbose))
    if args.emulator:
        print(build_emulator(None if args.emulator == "plain" else args.emulator))
    if args.build:
        try:
            m = load(verbose=args.verbose)
            print(f"loaded {m.__name__} from {getattr(m, '__file__', '?')}")
        except RuntimeError as e:
            print(str(e), file=sys.stderr)
            status = 1
    if not (args.check_compile or args.emulator or args.build or args.prebuilt):
        reasons = why_not()
        if reasons:
            print("the CUDA extension cannot be used here:")
            for r in reasons:
                print(f"  - {r}")
        else:
            print("the CUDA extension can be used here" + (" (loaded)" if is_loaded() else
                                                          " (built on first use)" if not _prebuilt_present() else
                                                          " (prebuilt)"))
            if not is_loaded() and not _prebuilt_present():
                print(f"  build folder: {build_dir()}")
    return status


if __name__ == "__main__":
    # run the package's copy of this module: what it builds and loads is what the package then uses
    from audiomae import cuda_ext as _package_module
    sys.exit(_package_module.main())
