"""The in-tree build backend: wheels hold the package (kernels under audiomae.kernels) and valid metadata."""
import importlib.util
import pathlib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _backend():
    spec = importlib.util.spec_from_file_location("build_backend", ROOT / "tools" / "build_backend.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wheel_contents_and_metadata(tmp_path):
    be = _backend()
    assert be.get_requires_for_build_wheel() == [] and be.get_requires_for_build_editable() == []
    name = be.build_wheel(str(tmp_path))
    with zipfile.ZipFile(tmp_path / name) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
        record = zf.read(next(n for n in names if n.endswith("RECORD"))).decode()
        entry = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "audiomae/model.py" in names and "audiomae/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # no top-level `kernels` package
    assert not any(n.endswith(".pyc") for n in names)
    assert "Requires-Dist: torch>=2.1" in meta
    assert "Requires-Dist: triton>=3.0; platform_system == 'Linux'" in meta
    assert 'Requires-Dist: pytest>=7; extra == "test"' in meta
    assert "audiomae = audiomae.cli:main" in entry
    assert all(n in record for n in names)


def test_editable_wheel_points_at_the_tree(tmp_path):
    be = _backend()
    name = be.build_editable(str(tmp_path))
    with zipfile.ZipFile(tmp_path / name) as zf:
        pth = [n for n in zf.namelist() if n.endswith(".pth")]
        assert len(pth) == 1
        assert zf.read(pth[0]).decode().strip() == str(ROOT)
