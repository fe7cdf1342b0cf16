"""pytest-benchmark setup for ``benchmarks/``: collects ``bench_*.py``, adds the benchmark options.

    pytest benchmarks --benchmark-only                  # the quick subset (a few minutes on a CPU)
    pytest benchmarks --benchmark-only --bench-full     # every DESIGN shape
    pytest benchmarks --benchmark-only --bench-compile  # also torch.compile of the reference

The plain test command (``python -m pytest`` from the repository root, ``testpaths = tests``)
never reaches this directory.  ``bench_ops.py`` takes its cases, inputs and backends from
:mod:`visprune.bench`, so it and ``python -m visprune.bench`` time the same things.
"""
import pytest
import torch

from visprune import bench


def pytest_addoption(parser):
    group = parser.getgroup("visprune benchmarks")
    group.addoption("--bench-full", action="store_true",
                    help="every DESIGN shape (default: the quick subset of python -m visprune.bench --quick)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device of the benchmarked tensors (default: cuda when available, else cpu)")
    group.addoption("--bench-compile", action="store_true",
                    help=f"also time torch.compile of the reference, as backend {bench.COMPILED!r}")


def pytest_collect_file(file_path, parent):
    # bench_*.py are benchmark modules; a file named on the command line is collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    """The device every benchmark puts its tensors on."""
    return bench.resolve_device(pytestconfig.getoption("--bench-device"))


@pytest.fixture(scope="session")
def bench_dtype(bench_device) -> torch.dtype:
    """fp32 on CPU, fp16 on GPU (the DESIGN's GPU targets are fp16/bf16)."""
    return bench.default_dtype(bench_device)


@pytest.fixture
def timed(bench_device):
    """``timed(fn)``: ``fn`` plus a device synchronisation, so that pytest-benchmark's wall clock
    covers the whole GPU call."""
    def wrap(fn):
        def call():
            out = fn()
            bench.synchronize(bench_device)
            return out
        return call
    return wrap
