"""A self-contained PEP 517 / PEP 660 build backend for this pure-Python package.

It needs nothing beyond the standard library, so ``pip install .`` and ``pip install -e .`` work
offline and take a second: nothing is compiled, no build tool is downloaded. The package metadata
is read from ``setup.py`` (its ``METADATA`` dict), the one place it is written down. Wheels hold
``audiomae/`` and the CUDA sources of ``csrc/`` (as ``audiomae/csrc/``, built just in time on first
use, or compiled into the wheel with ``AUDIOMAE_BUILD_CUDA=1``); editable installs point a ``.pth``
file at the source tree.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import runpy
import tarfile
import zipfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_DIRS = {"__pycache__", ".pytest_cache"}
_SKIP_EXT = (".pyc", ".pyo", ".so", ".o")


def _meta() -> Dict:
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="metadata")["METADATA"]


def _dist_name(meta) -> str:
    return f"{meta['name']}-{meta['version']}"


def _metadata_text(meta) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}",
             f"Summary: {meta['description']}", f"License: {meta.get('license', '')}",
             f"Requires-Python: {meta['python_requires']}"]
    lines += [f"Classifier: {c}" for c in meta.get("classifiers", [])]
    lines += [f"Requires-Dist: {r}" for r in meta["install_requires"]]
    for extra, reqs in meta.get("extras_require", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        for r in reqs:
            req, _, marker = r.partition(";")
            cond = f'({marker.strip()}) and extra == "{extra}"' if marker else f'extra == "{extra}"'
            lines.append(f"Requires-Dist: {req.strip()}; {cond}")
    lines.append("Description-Content-Type: text/markdown")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return "\n".join(lines) + "\n\n" + f.read()


def _entry_points(meta) -> str:
    out = []
    for group, items in meta.get("entry_points", {}).items():
        out.append(f"[{group}]")
        out += [item.replace(" ", "") .replace("=", " = ", 1) for item in items]
    return "\n".join(out) + "\n"


def _package_files() -> List[Tuple[str, str]]:
    """(path on disk, path in the wheel) for the package and the CUDA sources."""
    files = []
    for src, dst in (("audiomae", "audiomae"), ("csrc", "audiomae/csrc")):
        base = os.path.join(ROOT, src)
        for d, dirs, names in os.walk(base):
            dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
            for n in sorted(names):
                if n.endswith(_SKIP_EXT):
                    continue
                full = os.path.join(d, n)
                files.append((full, dst + "/" + os.path.relpath(full, base).replace(os.sep, "/")))
    return files


def _write_wheel(wheel_directory: str, contents: List[Tuple[str, bytes]], meta) -> str:
    dist = _dist_name(meta)
    info = f"{dist}.dist-info"
    binary = any(name.endswith(".so") for name, _ in contents)
    tag = _wheel_tag(binary)
    contents = contents + [
        (f"{info}/METADATA", _metadata_text(meta).encode()),
        (f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: audiomae-build-backend\nRoot-Is-Purelib: "
                          f"{str(not binary).lower()}\nTag: {tag}\n".encode()),
        (f"{info}/entry_points.txt", _entry_points(meta).encode()),
    ]
    record = []
    for name, data in contents:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    filename = f"{dist}-{tag}.whl"
    os.makedirs(wheel_directory, exist_ok=True)
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in contents:
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)
    return filename


def _cuda_extension() -> List[Tuple[str, bytes]]:
    """With AUDIOMAE_BUILD_CUDA=1, the CUDA extension compiled now as ``audiomae/_cuda_ext.so`` (needs
    torch with CUDA, nvcc and ninja in the build environment: install with --no-build-isolation; no
    GPU; architectures from TORCH_CUDA_ARCH_LIST, else sm_80 and sm_90)."""
    if os.environ.get("AUDIOMAE_BUILD_CUDA", "") in ("", "0"):
        return []
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "audiomae.cuda_ext", "--prebuilt", tmp], cwd=ROOT, check=True)
        return [("audiomae/_cuda_ext.so", _read(os.path.join(tmp, "_cuda_ext.so")))]


def _wheel_tag(binary: bool) -> str:
    if not binary:
        return "py3-none-any"
    import sys
    import sysconfig

    py = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    return f"{py}-{py}-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- PEP 517 -------------------------------------------------------------------------------------
def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    meta = _meta()
    return _write_wheel(wheel_directory, [(dst, _read(src)) for src, dst in _package_files()] + _cuda_extension(),
                        meta)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    meta = _meta()
    return _write_wheel(wheel_directory, [(f"_{meta['name']}_editable.pth", (ROOT + "\n").encode())], meta)


def build_sdist(sdist_directory, config_settings=None):
    meta = _meta()
    dist = _dist_name(meta)
    tracked = ["setup.py", "pyproject.toml", "README.md", "pytest.ini", "tools/build_backend.py"]
    files = [(os.path.join(ROOT, p), p) for p in tracked if os.path.exists(os.path.join(ROOT, p))]
    files += [(src, ("csrc/" + dst[len("audiomae/csrc/"):]) if dst.startswith("audiomae/csrc/") else dst)
              for src, dst in _package_files()]
    filename = f"{dist}.tar.gz"
    os.makedirs(sdist_directory, exist_ok=True)
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz") as tf:
        pkg_info = _metadata_text(meta).encode()
        ti = tarfile.TarInfo(f"{dist}/PKG-INFO")
        ti.size = len(pkg_info)
        tf.addfile(ti, io.BytesIO(pkg_info))
        for src, dst in files:
            tf.add(src, arcname=f"{dist}/{dst}")
    return filename
