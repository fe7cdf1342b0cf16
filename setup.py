"""Build and install visprune.

The pure-Python / Triton package needs no compiler.  ``triton_kernels/`` is installed as
``visprune.triton_kernels`` (a top-level ``triton_kernels`` module already exists in the
Triton ecosystem and the two must not shadow each other).
"""
from setuptools import setup

setup(
    name="visprune",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for training-free visual-token pruning in multimodal models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["visprune", "visprune.methods", "visprune.triton_kernels"],
    package_dir={"visprune.triton_kernels": "triton_kernels"},
    # No upper bound and no newer pin: an installed torch (e.g. the 2.13.0 CPU build) satisfies it.
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["triton>=3.0", "numpy", "pytest", "pytest-benchmark"],
    },
)
