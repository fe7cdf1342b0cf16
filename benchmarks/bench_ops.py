"""Every op x available backend x shape, grouped by (op, shape) so backends compare side by side.

The quick subset by default; ``--bench-full`` for every DESIGN shape.  Triton is not timed on
CPU (its interpreter is not a performance backend); the C++ ``cpu`` and CUDA backends appear
as soon as :func:`visprune.available_backends` reports them.
"""
import pytest

from visprune import bench


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    backends, _ = bench.backend_plan(bench.resolve_device(config.getoption("--bench-device")))
    if config.getoption("--bench-compile"):
        backends.append(bench.COMPILED)
    shapes = bench.shape_grid(quick=not config.getoption("--bench-full"))
    params = [pytest.param(case, backend, id=f"{case.label.replace(' ', '-')}-{backend}")
              for case in bench.cases(list(bench.OPS), shapes) for backend in backends]
    metafunc.parametrize("case,backend", params)


def test_op(benchmark, case, backend, bench_device, bench_dtype, timed):
    itemsize = bench_dtype.itemsize
    why = bench.skip_reason(case, backend, itemsize, bench.memory_limit(bench_device))
    if why:
        pytest.skip(why)
    inputs = bench.make_inputs(case.shape, bench_device, bench_dtype)
    args, kwargs = case.spec.call(inputs, case.shape)
    try:
        fn, info = bench.backend_call(case, backend, args, kwargs, bench_device)
    except Exception as e:  # noqa: BLE001
        if backend == bench.COMPILED:
            pytest.skip(f"torch.compile of the reference failed: {type(e).__name__}: {e}")
        raise
    benchmark.group = case.label
    benchmark.extra_info.update(op=case.op, shape=case.shape_label, backend=backend,
                                device=bench_device.type, dtype=bench.dtype_name(bench_dtype),
                                **info)
    benchmark(timed(fn))
