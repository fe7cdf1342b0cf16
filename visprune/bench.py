"""Microbenchmarks of the visprune ops: every op x available backend x the DESIGN shapes.

    python -m visprune.bench [--quick] [--device cpu|cuda] [--ops OP ...] [--shapes FAMILY ...]
                             [--batch B ...] [--compile | --no-compile] [--json FILE] [--plot FILE]

For each case (op, shape) the backends are timed side by side in interleaved rounds (each round
runs every backend once, in rotating order), so load changes on a shared machine hit them alike.
CPU: wall clock over enough calls per sample to last a few ms.  GPU: CUDA events around one
call, the L2 cache flushed and the device idle before each (cold-cache times that include the
host's launch overhead).
Every figure printed or written is measured in this run; no timing is cached or reused.

Backends are the ones :func:`visprune.available_backends` reports ``"ok"`` for the device, called
through the public ops (argument checks included, as users see them), plus ``torch.compile`` of
the reference (``reference_compiled``) where it compiles.  Triton is never timed on CPU: its
interpreter is a correctness tool, not a performance backend.  Inputs are fp32 on CPU and fp16
on GPU (the DESIGN's GPU targets are fp16/bf16), unless ``--dtype`` says otherwise.

The module is also the case library of ``benchmarks/`` (pytest-benchmark).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import __version__, ops
from .backends import available_backends
from .reference import stage1_count

COMPILED = "reference_compiled"       # torch.compile of the reference, timed like a backend
GiB = 1 << 30


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Family:
    """A model's token geometry: ``N`` visual tokens of width ``D``, ``M`` text tokens."""

    N: int
    D: int
    M: int
    keeps: Tuple[int, ...]


FAMILIES: Dict[str, Family] = {
    "llava15": Family(N=576, D=4096, M=64, keeps=(64, 128, 192)),      # LLaVA-1.5-7B
    "llava_next": Family(N=2880, D=4096, M=64, keeps=(320,)),          # LLaVA-NeXT, 5 tiles
    "video": Family(N=16384, D=3584, M=64, keeps=(1024,)),             # Qwen2-VL-7B video
    "tiny": Family(N=64, D=32, M=8, keeps=(8,)),                       # smoke tests only
}
FULL_FAMILIES = ("llava15", "llava_next", "video")
QUICK_FAMILIES = ("llava15",)
BATCHES = (1, 8, 64)
QUICK_SMALL_D = 256      # --quick adds this width next to the model's: the CPU target at D <= 256


@dataclass(frozen=True)
class Shape:
    family: str
    B: int
    N: int
    D: int
    M: int
    k: int


def shape_grid(families: Optional[Sequence[str]] = None, batches: Optional[Sequence[int]] = None,
               quick: bool = False) -> List[Shape]:
    """The benchmark shapes: every family x batch x keep.  ``quick``: B=1, the first keep, the
    model width plus a ``D=256`` variant, and by default the LLaVA-1.5 family only."""
    families = families or (QUICK_FAMILIES if quick else FULL_FAMILIES)
    out = []
    for name in families:
        f = FAMILIES[name]
        widths = (f.D, QUICK_SMALL_D) if quick and f.D > QUICK_SMALL_D else (f.D,)
        for B in batches or ((1,) if quick else BATCHES):
            for D in widths:
                for k in f.keeps[:1] if quick else f.keeps:
                    out.append(Shape(name, B, f.N, D, f.M, k))
    return out


# --------------------------------------------------------------------------- ops
@dataclass(frozen=True)
class OpSpec:
    """How to call one op on a shape, and what it costs at least (for the roofline columns)."""

    fn: Callable
    dims: str                                           # the Shape fields the op depends on
    call: Callable[[Dict[str, torch.Tensor], Shape], Tuple[tuple, dict]]
    traffic: Callable[[Shape, int], int]                # bytes it must move at least
    flops: Callable[[Shape], int]                       # arithmetic of the DESIGN algorithm
    reference_scratch: Callable[[Shape], int]           # the reference's working memory, bytes


def _dist_scratch(B: int, N: int) -> int:
    # reference.greedy_select: the [B, N, N] fp32 distances, two fp32 temporaries, a bool pair mask.
    return B * N * N * (3 * 4 + 1) + N * N


def _stage1(s: Shape) -> int:
    """Stage-1 survivors of ``prune`` with its default ``stage1_keep``."""
    return stage1_count(s.N, inspect.signature(ops.prune).parameters["stage1_keep"].default)


OPS: Dict[str, OpSpec] = {
    "mi_scores": OpSpec(
        ops.mi_scores, "BNDM",
        lambda t, s: ((t["visual"], t["text"]), {}),
        lambda s, e: (s.B * s.N * s.D + s.B * s.M * s.D) * e + s.B * s.N * 4,
        # linear in a per-batch text summary: one dot product of width D per visual token
        lambda s: 2 * s.B * (s.N + s.M) * s.D,
        lambda s: 4 * s.B * (s.N + s.M) * s.D + 3 * 4 * s.B * s.N * s.M),
    "greedy_select:maxmin": OpSpec(
        ops.greedy_select, "BNDk",
        lambda t, s: ((t["visual"], s.k), {"objective": "maxmin", "metric": "cosine"}),
        lambda s, e: s.B * s.N * s.D * e + s.B * s.k * 8,
        # start="auto" needs every pair's distance: the full Gram matrix
        lambda s: 2 * s.B * s.N * s.N * s.D,
        lambda s: 4 * s.B * s.N * s.D + _dist_scratch(s.B, s.N)),
    "greedy_select:maxsum": OpSpec(
        ops.greedy_select, "BNDk",
        lambda t, s: ((t["visual"], s.k), {"objective": "maxsum", "metric": "cosine"}),
        lambda s, e: s.B * s.N * s.D * e + s.B * s.k * 8,
        # start from a summary vector, then one row of distances per step
        lambda s: 2 * s.B * (s.k + 1) * s.N * s.D,
        lambda s: 4 * s.B * s.N * s.D + _dist_scratch(s.B, s.N)),
    "gather_compact": OpSpec(
        ops.gather_compact, "BNDk",
        lambda t, s: ((t["visual"], t["index"]), {}),
        lambda s, e: 2 * s.B * s.k * s.D * e + 2 * s.B * s.k * 8,
        lambda s: 0,
        lambda s: s.B * s.k * 8 * 3),
    "prune": OpSpec(
        ops.prune, "BNDMk",
        lambda t, s: ((t["visual"], t["text"], s.k), {}),
        lambda s, e: (s.B * s.N * s.D + s.B * s.M * s.D + 2 * s.B * s.k * s.D) * e + s.B * s.k * 8,
        lambda s: 2 * s.B * (s.N + s.M) * s.D + 2 * s.B * (s.k + 1) * _stage1(s) * s.D,
        lambda s: 4 * s.B * (s.N + s.M) * s.D + 3 * 4 * s.B * s.N * s.M + _dist_scratch(s.B, s.N)),
}


def select_ops(names: Optional[Sequence[str]]) -> List[str]:
    """``names`` may be an op (``greedy_select``: every variant) or one variant (``greedy_select:maxsum``)."""
    if not names:
        return list(OPS)
    chosen = [op for op in OPS if op in names or op.split(":")[0] in names]
    unknown = [n for n in names if not any(n in (op, op.split(":")[0]) for op in OPS)]
    if unknown:
        known = sorted(set(OPS) | {op.split(":")[0] for op in OPS})
        raise ValueError(f"unknown op(s) {unknown}; choose from {known}")
    return chosen


@dataclass(frozen=True)
class Case:
    op: str
    shape: Shape

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    @property
    def shape_label(self) -> str:
        s = self.shape
        return f"{s.family} " + " ".join(f"{d}={getattr(s, d)}" for d in self.spec.dims)

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape_label}"


def cases(op_names: Sequence[str], shapes: Sequence[Shape]) -> List[Case]:
    """Every op x shape; an op that does not depend on ``k`` (mi_scores) appears once per shape."""
    out, seen = [], set()
    for op in op_names:
        for shape in shapes:
            case = Case(op, shape)
            if case.label not in seen:
                seen.add(case.label)
                out.append(case)
    return out


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random tokens (standard normal) and a random set of ``k`` distinct positions per row."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, N, D, M, k = shape.B, shape.N, shape.D, shape.M, shape.k
    return {
        "visual": torch.randn(B, N, D, generator=g, device=device, dtype=dtype),
        "text": torch.randn(B, M, D, generator=g, device=device, dtype=dtype),
        "index": torch.rand(B, N, generator=g, device=device).argsort(-1)[:, :k].contiguous(),
    }


def input_bytes(shape: Shape, itemsize: int) -> int:
    s = shape
    return (s.B * s.N * s.D + s.B * s.M * s.D + s.B * s.k * s.D) * itemsize + s.B * s.N * 12


# --------------------------------------------------------------------------- backends
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


def resolve_device(name: Optional[str] = None) -> torch.device:
    """``name`` (``"cpu"`` / ``"cuda"``), or CUDA when torch sees a GPU, else the CPU."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPU (the DESIGN's GPU targets are fp16/bf16 tokens), fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_limit(device: torch.device) -> int:
    """Default budget for one case: 80 % of free GPU memory, or half of the available RAM."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        return avail // 2
    except (OSError, StopIteration, ValueError):
        return 8 * GiB


def needs_memory(case: Case, backend: str, itemsize: int) -> int:
    """Bytes a backend needs for ``case``: the inputs, plus the reference's N x N scratch."""
    base = input_bytes(case.shape, itemsize)
    if backend in ("reference", COMPILED):
        return base + case.spec.reference_scratch(case.shape)
    return base


DEFAULT_COMPILE_MAX_K = 320


def skip_reason(case: Case, backend: str, itemsize: int, mem_limit: int,
                compile_max_k: int = DEFAULT_COMPILE_MAX_K) -> Optional[str]:
    """Why ``backend`` is not run on ``case`` (memory over ``mem_limit``, a compile too long), or None."""
    need = needs_memory(case, backend, itemsize)
    if need > mem_limit:
        return f"skipped: needs ~{need / GiB:.1f} GiB > limit {mem_limit / GiB:.1f} GiB"
    if backend == COMPILED and "k" in case.spec.dims and case.shape.k > compile_max_k:
        return f"skipped: k={case.shape.k} > compile-max-k {compile_max_k} (dynamo unrolls the k-step loop)"
    return None


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


# --------------------------------------------------------------------------- timing
CPU_MIN_SAMPLE_S = 0.005    # a CPU sample repeats the call until it lasts at least this long
L2_FLUSH_BYTES = 256 << 20


@dataclass
class Timing:
    samples: List[float]        # seconds per call, one per repetition
    inner: int                  # calls per sample

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        pos = q * (len(s) - 1)
        lo = int(pos)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def _wall(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure(fns: Dict[str, Callable[[], Any]], device: torch.device, *, min_reps: int = 5,
            max_reps: int = 50, target_s: float = 2.0) -> Dict[str, Timing]:
    """Time already warmed-up callables side by side.

    Each repetition runs every callable once, starting at a rotating position.  The number of
    repetitions fills about ``target_s`` seconds, clamped to ``[min_reps, max_reps]``."""
    names = list(fns)
    once = {n: _wall(fns[n], device) for n in names}
    cuda = device.type == "cuda"
    inner = {n: 1 if cuda else max(1, math.ceil(CPU_MIN_SAMPLE_S / max(once[n], 1e-9))) for n in names}
    per_rep = sum(inner[n] * once[n] for n in names)
    reps = max(min_reps, min(max_reps, int(target_s / max(per_rep, 1e-9))))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if cuda else None
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        if cuda:
            events = []
            for n in order:
                flush.zero_()           # cold L2: the tokens come from HBM, as in a real pipeline step
                # An idle GPU at the start event: host-side launch overhead counts, as a request sees it.
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                events.append((n, start, end))
            torch.cuda.synchronize(device)
            for n, start, end in events:
                samples[n].append(start.elapsed_time(end) / 1e3)
        else:
            for n in order:
                t0 = time.perf_counter()
                for _ in range(inner[n]):
                    fns[n]()
                samples[n].append((time.perf_counter() - t0) / inner[n])
    return {n: Timing(samples[n], inner[n]) for n in names}


def device_limits(device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    """GPU only: the measured device-to-device copy bandwidth and matmul throughput of this run."""
    if device.type != "cuda":
        return {}
    free = torch.cuda.mem_get_info(device)[0]
    n = min(1 * GiB, free // 8) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = measure({"copy": lambda: dst.copy_(src)}, device, min_reps=20, max_reps=100, target_s=0.5)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    mm = measure({"mm": lambda: a @ b}, device, min_reps=10, max_reps=50, target_s=0.5)
    return {"copy_GBps": 2 * 4 * n / copy["copy"].median / 1e9,
            "matmul_TFLOPs": 2 * m ** 3 / mm["mm"].median / 1e12}


# --------------------------------------------------------------------------- the run
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "visprune_version": __version__,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times = measure(fns, device, **timing) if fns else {}
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
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


# --------------------------------------------------------------------------- report
def fmt_time(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    if ms < 1e3:
        return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{ms / 1e3:.2f} s"


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def format_table(rows: List[Dict[str, Any]], env: Dict[str, Any], notes: List[str]) -> str:
    gpu = any("copy_GBps" in r for r in rows)
    head = ["op", "shape", "backend", "median", "IQR", "vs ref", "vs compile"]
    head += ["GB/s", "% copy BW", "% roofline"] if gpu else []
    head += ["check"]
    table = []
    for r in rows:
        line = [r["op"], r["shape"], r["backend"], fmt_time(r.get("time_ms")),
                f"{100 * (r['q3_ms'] - r['q1_ms']) / r['time_ms']:.0f}%" if "time_ms" in r else "-",
                _ratio(r["speedup_vs_reference"]), _ratio(r["speedup_vs_compiled"])]
        if gpu:
            ran = "achieved_GBps" in r
            line += [f"{r['achieved_GBps']:.0f}" if ran else "-",
                     f"{100 * r['fraction_of_copy_bw']:.1f}" if ran else "-",
                     f"{100 * r['fraction_of_roofline']:.1f}" if ran else "-"]
        line.append(r.get("check", "") if r["status"] == "ok" else r["status"])
        table.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    left = {"op", "shape", "backend", "check"}

    def fmt(line):
        return "  ".join(str(x).ljust(w) if h in left else str(x).rjust(w)
                         for x, w, h in zip(line, widths, head)).rstrip()

    title = (f"visprune benchmark: {env['device']} ({env['device_name']}, {env['threads']} torch threads), "
             f"{env['dtype']} inputs, torch {env['torch_version']}, triton {env['triton_version']}, "
             f"{env['date']}")
    if gpu:
        r0 = next(r for r in rows if "copy_GBps" in r)
        title += (f"\nmeasured copy bandwidth {r0['copy_GBps']:.0f} GB/s, "
                  f"matmul {r0['matmul_TFLOPs']:.0f} TFLOP/s ({env['dtype']})")
    widths[-1] = 0                                      # the free-text column is not padded
    out = [title, fmt(head), fmt(["-" * w for w in widths[:-1]] + ["-----"])]
    prev = None
    for r, line in zip(rows, table):
        if prev is not None and (r["op"], r["shape"]) != prev:
            out.append("")
        prev = (r["op"], r["shape"])
        out.append(fmt(line))
    out += ["", "notes:"] + [f"  - {n}" for n in notes]
    return "\n".join(out)


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    """One panel per op: the speed-up over the reference of every backend, per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    op_names = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(op_names), 1, figsize=(11, 3.2 * len(op_names)), squeeze=False)
    for ax, op in zip(axes[:, 0], op_names):
        mine = [r for r in rows if r["op"] == op]
        shapes = list(dict.fromkeys(r["shape"] for r in mine))
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        width = 0.8 / len(backends)
        for i, b in enumerate(backends):
            speedup = {r["shape"]: r["speedup_vs_reference"] for r in mine if r["backend"] == b}
            xs = [j + (i - (len(backends) - 1) / 2) * width for j, s in enumerate(shapes) if speedup.get(s)]
            ys = [speedup[s] for s in shapes if speedup.get(s)]
            bars = ax.bar(xs, ys, width, label=b)
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        times_x = FuncFormatter(lambda v, _: f"{v:.3g}x")
        ax.yaxis.set_major_formatter(times_x)
        ax.yaxis.set_minor_formatter(times_x)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=15, ha="right", fontsize=7)
        ax.set_ylabel("speed-up vs reference")
        ax.set_title(f"{op} ({rows[0]['device']}: {rows[0]['device_name']}, {rows[0]['dtype']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m visprune.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"the small subset: B=1, first keep, D and D={QUICK_SMALL_D} (default families: "
                        f"{' '.join(QUICK_FAMILIES)}); a few minutes on a CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"ops to time (default all): {' '.join(OPS)}; "
                   "a bare name such as greedy_select selects all its variants")
    p.add_argument("--shapes", nargs="+", choices=list(FAMILIES), metavar="FAMILY",
                   help=f"shape families: {' '.join(FAMILIES)} (default: {' '.join(FULL_FAMILIES)}, "
                        f"or {' '.join(QUICK_FAMILIES)} with --quick)")
    p.add_argument("--batch", nargs="+", type=int, metavar="B",
                   help=f"batch sizes (default {' '.join(map(str, BATCHES))}, or 1 with --quick)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="input dtype (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile of the reference (default: on, off with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-max-k", type=int, default=DEFAULT_COMPILE_MAX_K,
                   help="skip torch.compile above this k: dynamo unrolls the greedy loop "
                        f"(default {DEFAULT_COMPILE_MAX_K})")
    p.add_argument("--mem-limit", type=float, default=None, metavar="GiB",
                   help="skip a backend whose estimated memory exceeds this (default: 80%% of free GPU "
                        "memory, half the available RAM)")
    p.add_argument("--min-reps", type=int, default=5, help="repetitions per case, at least (default 5)")
    p.add_argument("--max-reps", type=int, default=50, help="repetitions per case, at most (default 50)")
    p.add_argument("--target-seconds", type=float, default=2.0,
                   help="timed seconds per case that set the repetitions (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; recorded in the JSON rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write one JSON row per op x shape x backend")
    p.add_argument("--plot", metavar="FILE", help="write a PNG chart of the speed-ups (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    try:
        args.ops = select_ops(args.ops)
    except ValueError as e:
        p.error(str(e))
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.min_reps < 1 or args.max_reps < args.min_reps:
        p.error("need 1 <= --min-reps <= --max-reps")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which visprune does not depend on: "
                  "pip install matplotlib (or drop --plot)", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    compile_ref = (not args.quick) if args.compile is None else args.compile
    mem_limit = int(args.mem_limit * GiB) if args.mem_limit is not None else memory_limit(device)
    todo = cases(args.ops, shape_grid(args.shapes, args.batch, args.quick))
    backends, unavailable = backend_plan(device)
    timing = dict(min_reps=args.min_reps, max_reps=args.max_reps, target_s=args.target_seconds)

    env = environment(device, dtype)
    limits = device_limits(device, dtype)
    t_start = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    interrupted = False
    try:
        for i, case in enumerate(todo):
            if not args.quiet:
                spent = time.perf_counter() - t_start
                eta = f", ~{_clock(spent / i * (len(todo) - i))} left" if i else ""
                print(f"[{i + 1}/{len(todo)} {_clock(spent)}{eta}] {case.label}", file=sys.stderr, flush=True)
            rows += run_case(case, device, dtype, backends, compile_ref=compile_ref,
                             compile_max_k=args.compile_max_k, mem_limit=mem_limit, limits=limits,
                             timing=timing, seed=args.seed)
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.perf_counter() - t_start
    for r in rows:
        r.update(env)

    notes = [f"{b}: {why}" for b, why in unavailable.items()]
    notes.append(f"{COMPILED}: torch.compile of the reference op, "
                 + (f"compile time excluded; n/a where it fails, captures nothing, "
                    f"or k > {args.compile_max_k}" if compile_ref else
                    "not run (pass --compile; a CPU inductor compile takes ~30 s per case)"))
    notes.append("median of interleaved repetitions (each repetition times every backend once); "
                 + ("CUDA events around one call, L2 flushed and the GPU idle before each"
                    if device.type == "cuda" else
                    f"wall clock, each sample repeats the call for >= {CPU_MIN_SAMPLE_S * 1e3:.0f} ms"))
    notes.append("IQR: interquartile range of the repetitions over the median (noise on a shared machine)")
    notes.append("check: the backend's output against the reference's (indices identical, floats close)")
    notes.append(f"a backend whose estimated memory exceeds {mem_limit / GiB:.1f} GiB is skipped "
                 f"(--mem-limit)")
    if limits:
        notes.append("GB/s: the op's minimum traffic / median time; roofline: minimum traffic at the copy "
                     "bandwidth + the DESIGN algorithm's flops at the matmul rate, over the median")
    notes.append(f"{len(todo) if not interrupted else len({(r['op'], r['shape']) for r in rows})} cases "
                 f"in {_clock(elapsed)}" + (" (interrupted)" if interrupted else ""))
    print(format_table(rows, env, notes))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, allow_nan=False)
        print(f"wrote {len(rows)} rows to {args.json}")
    if args.plot and rows:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
