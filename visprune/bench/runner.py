"""One case on every backend: which backends, how each is called (torch.compile of the reference
included), the check against the reference, and the rows of the case."""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from ..backends import available_backends
from .cases import COMPILED, Case, make_inputs
from .timing import count_launches, free_cache, measure, skip_reason, synchronize


def backend_plan(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """``(backends to time, {backend: why it is not timed})`` for tensors on ``device``."""
    timed, notes = [], {}
    for name, why in available_backends(device).items():
        if name == "triton" and device.type == "cpu":
            notes[name] = ("not timed on CPU: the TRITON_INTERPRET interpreter is a correctness "
                           "tool, not a performance backend")
        elif why == "ok":
            timed.append(name)
        else:
            notes[name] = f"not available: {why}"
    return timed, notes


def _graph_count() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _compile_reference(case: Case, args: tuple, kwargs: dict, device: torch.device):
    """torch.compile of the public op with the reference backend, and what its first call did.

    Graph breaks are expected (host syncs in the argument checks, the greedy loop); whatever
    dynamo captures is compiled and the rest runs eagerly.  Raises when nothing compiles."""
    import torch._dynamo
    torch._dynamo.reset()           # a fresh cache per case: no recompile limit, no stale graphs
    before = _graph_count()
    fn = functools.partial(torch.compile(functools.partial(case.spec.fn, backend="reference"),
                                         dynamic=False), *args, **kwargs)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    info = {"compile_s": round(time.perf_counter() - t0, 2), "compiled_graphs": _graph_count() - before}
    if info["compiled_graphs"] == 0:
        raise RuntimeError("dynamo captured no graph: everything ran eagerly")
    return fn, info


def backend_call(case: Case, backend: str, args: tuple, kwargs: dict,
                 device: torch.device) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    """``(fn, info)``: a no-argument callable running ``case`` on ``backend``, its first call
    (JIT, autotune, compile) already made; ``info`` says what compiling did."""
    if backend == COMPILED:
        return _compile_reference(case, args, kwargs, device)
    fn = functools.partial(case.spec.fn, *args, backend=backend, **kwargs)
    fn()
    synchronize(device)
    return fn, {}


def same_result(a: Any, b: Any) -> bool:
    """Indices identical, floats within a loose fp32 tolerance (both computed from the same input)."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_result(x, y) for x, y in zip(a, b))
    if not a.dtype.is_floating_point:
        return torch.equal(a.cpu(), b.cpu())
    a, b = a.float().cpu(), b.float().cpu()
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or bool((a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-5)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]


def run_case(case: Case, device: torch.device, dtype: torch.dtype, backends: Sequence[str], *,
             compile_ref: bool, compile_max_k: int, mem_limit: int, limits: Dict[str, float],
             timing: Dict[str, Any], seed: int = 0) -> List[Dict[str, Any]]:
    """All rows of one case: every backend's median time, speed-ups and checks."""
    itemsize = dtype.itemsize
    names = list(backends) + ([COMPILED] if compile_ref else [])
    rows = {n: {"op": case.op, "shape": case.shape_label, "family": case.shape.family,
                **{d: getattr(case.shape, d) for d in "BNDMk"}, "backend": n, "status": "ok"}
            for n in names}
    fns: Dict[str, Callable[[], Any]] = {}
    outputs: Dict[str, Any] = {}
    inputs = args = kwargs = None
    for n in names:
        why = skip_reason(case, n, itemsize, mem_limit, compile_max_k)
        if why:
            rows[n]["status"] = why
            continue
        try:
            if inputs is None:
                inputs = make_inputs(case.shape, device, dtype, seed)
                args, kwargs = case.spec.call(inputs, case.shape)
            fns[n], info = backend_call(case, n, args, kwargs, device)
            rows[n].update(info)
            outputs[n] = fns[n]()
            synchronize(device)
        except Exception as e:  # noqa: BLE001 - a failing backend is reported, not fatal
            fns.pop(n, None)
            failed = "n/a: torch.compile failed: " if n == COMPILED else "error: "
            rows[n]["status"] = failed + _first_line(e)
            free_cache(device)
    times = measure(fns, device, **timing) if fns else {}
    if device.type == "cuda":
        for n, fn in fns.items():
            rows[n]["launches"] = count_launches(fn, device)
    ref = outputs.get("reference")
    for n, t in times.items():
        rows[n].update(time_ms=t.median * 1e3, min_ms=min(t.samples) * 1e3,
                       q1_ms=t.quantile(0.25) * 1e3, q3_ms=t.quantile(0.75) * 1e3,
                       reps=len(t.samples), calls_per_rep=t.inner)
        if n != "reference":
            rows[n]["check"] = ("n/a" if ref is None else
                                "ok" if same_result(outputs[n], ref) else "MISMATCH")
    for n, row in rows.items():
        t = times.get(n)
        row["speedup_vs_reference"] = (times["reference"].median / t.median
                                       if t and "reference" in times else None)
        row["speedup_vs_compiled"] = (times[COMPILED].median / t.median
                                      if t and COMPILED in times else None)
        if limits:
            row.update(bytes=case.spec.traffic(case.shape, itemsize), flops=case.spec.flops(case.shape),
                       **limits)
            if t:
                bound = (row["bytes"] / (limits["copy_GBps"] * 1e9)
                         + row["flops"] / (limits["matmul_TFLOPs"] * 1e12))
                row.update(achieved_GBps=row["bytes"] / t.median / 1e9,
                           fraction_of_copy_bw=row["bytes"] / t.median / 1e9 / limits["copy_GBps"],
                           roofline_ms=bound * 1e3, fraction_of_roofline=bound / t.median)
    del inputs, args, kwargs, fns, outputs
    free_cache(device)
    return list(rows.values())
