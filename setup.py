"""Package metadata, and a setuptools entry point for tools that run setup.py directly.

``pip install .`` uses the in-tree backend in tools/build_backend.py (see pyproject.toml), which
reads ``METADATA`` below: pure Python, nothing compiled, no download of build tools.

The Triton kernels live in ``audiomae/kernels`` (installed as ``audiomae.kernels``, so they
never collide with the unrelated ``kernels`` package on PyPI) and are compiled by Triton at
first use. CUDA sources in ``csrc/`` are built just in time by torch's extension tools.
"""
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "audiomae", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


METADATA = dict(
    name="audiomae",
    version=_version(),
    description="Fast, faithful Audio-MAE (Masked Autoencoders that Listen): models, fused kernels, training",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.22",
        "soundfile>=0.12",
        "scipy>=1.8",
        "tqdm>=4.60",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "safetensors>=0.4", "matplotlib>=3.5"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.5"],
        "plot": ["matplotlib>=3.5"],
        "cuda": ["ninja>=1.11"],  # builds the csrc/ extension just in time
    },
    entry_points={"console_scripts": ["audiomae=audiomae.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Multimedia :: Sound/Audio :: Analysis",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

if __name__ == "__main__":
    from setuptools import find_packages, setup

    setup(packages=find_packages(include=["audiomae", "audiomae.*"]), package_data={"audiomae": ["py.typed"]},
          **METADATA)
