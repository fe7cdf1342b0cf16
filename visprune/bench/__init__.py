"""The visprune benchmark harness: ``python -m visprune.bench`` (:mod:`.cli`), and the case library
of ``benchmarks/`` (pytest-benchmark), so that both time the same things.

    cases.py    shape families, the ops with their cost models, the cases and their inputs
    timing.py   devices, the memory guard, the interleaved measurement, the device's limits
    runner.py   one case on every backend: calls, torch.compile of the reference, checks, rows
    report.py   environment, table and notes, JSON rows, chart
    cli.py      the command line (``__main__.py`` runs it)
"""
from .cases import (BATCHES, COMPILED, FAMILIES, FULL_FAMILIES, OPS, QUICK_FAMILIES, QUICK_SMALL_D, Case,
                    Family, OpSpec, Shape, cases, input_bytes, make_inputs, select_ops, shape_grid)
from .cli import main, parse_args
from .report import dtype_name, environment, fmt_time, format_table, plot, write_json
from .runner import backend_call, backend_plan, run_case, same_result
from .timing import (DEFAULT_COMPILE_MAX_K, GiB, Timing, count_launches, default_dtype,
                     device_limits, measure, medians, memory_limit, needs_memory, resolve_device,
                     skip_reason, synchronize)

__all__ = [
    "BATCHES", "COMPILED", "FAMILIES", "FULL_FAMILIES", "OPS", "QUICK_FAMILIES", "QUICK_SMALL_D", "Case",
    "Family", "OpSpec", "Shape", "cases", "input_bytes", "make_inputs", "select_ops", "shape_grid",
    "main", "parse_args",
    "dtype_name", "environment", "fmt_time", "format_table", "plot", "write_json",
    "backend_call", "backend_plan", "run_case", "same_result",
    "DEFAULT_COMPILE_MAX_K", "GiB", "Timing", "count_launches", "default_dtype", "device_limits",
    "measure", "medians", "memory_limit",
    "needs_memory", "resolve_device", "skip_reason", "synchronize",
]
