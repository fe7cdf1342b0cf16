"""Build and install visprune.

The pure-Python / Triton package needs no compiler.  ``triton_kernels/`` is installed as
``visprune.triton_kernels`` (a top-level ``triton_kernels`` module already exists in the
Triton ecosystem and the two must not shadow each other).

The compiled extension ``visprune._C`` (``csrc/``) is optional:
* its CPU part builds wherever a C++ compiler and the Python headers are present;
* its CUDA part only with a CUDA build of torch and the CUDA toolkit (``CUDA_HOME``);
* ``VISPRUNE_NO_EXT=1`` skips the extension, ``VISPRUNE_FORCE_CUDA=1`` forces the CUDA part.
Without it visprune still installs and imports; ``visprune.available_backends()`` says why.
Build with ``pip install --no-build-isolation`` so that it compiles against the installed torch.
"""
import os
import shutil
import sys
import sysconfig

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _skip(why):
    print(f"visprune: building without the compiled extension ({why})", file=sys.stderr)
    return [], {}


def _extension():
    """``(ext_modules, cmdclass)`` of visprune._C, or empty ones with the reason printed."""
    if _flag("VISPRUNE_NO_EXT"):
        return _skip("VISPRUNE_NO_EXT is set")
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # no torch at build time, or a broken one
        return _skip(f"torch.utils.cpp_extension is not importable: {e}")
    cxx = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()[0]
    if shutil.which(cxx) is None:
        return _skip(f"no C++ compiler ({cxx!r} not found)")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return _skip("the Python development headers (Python.h) are missing")

    force_cuda = _flag("VISPRUNE_FORCE_CUDA")
    with_cuda = force_cuda or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)
    sources = ["csrc/ops.cpp", "csrc/cpu/kernels.cpp", "csrc/cpu/varlen.cpp", "csrc/cpu/video.cpp"]
    # -ffp-contract=off: the kernels choose where FMA is used (see csrc/cpu/kernels.cpp).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # ATen's parallel_for is an inline OpenMP region; without -fopenmp it runs serially.
        # The extension then shares the libgomp that torch has already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    kwargs = dict(extra_link_args=link_flags)
    if with_cuda:
        sources.append("csrc/cuda/kernels.cu")
        kwargs["define_macros"] = [("VISPRUNE_WITH_CUDA", None)]
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}
        ext = cpp_extension.CUDAExtension("visprune._C", sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext = cpp_extension.CppExtension("visprune._C", sources, **kwargs)
    print(f"visprune: building visprune._C ({'CPU + CUDA' if with_cuda else 'CPU'})", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension()

setup(
    name="visprune",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for training-free visual-token pruning in multimodal models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["visprune", "visprune.methods", "visprune.integrations",
              "visprune.integrations.transformers", "visprune.integrations.vllm",
              "visprune.bench",
              "visprune.triton_kernels"],
    package_dir={"visprune.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # No upper bound and no newer pin: an installed torch (e.g. the 2.13.0 CPU build) satisfies it.
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "transformers": ["transformers>=5.23"],
        "test": ["triton>=3.0", "numpy", "pytest", "pytest-benchmark", "hypothesis",
                 "transformers>=5.23"],
    },
)
