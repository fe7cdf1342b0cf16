"""What a run reports: the environment, the table and its notes, the JSON rows, the chart."""
from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from typing import Any, Dict, List, Optional

import torch

from .. import __version__
from .cases import COMPILED
from .timing import CPU_MIN_SAMPLE_S, GiB


# --------------------------------------------------------------------------- environment
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_flags() -> frozenset:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (``avx2``, ``avx512f``, ...);
    empty where that file cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def dtype_name(dtype: torch.dtype) -> str:
    """``"float16"`` for ``torch.float16``: the name the table, the JSON rows and ``--dtype`` use."""
    return str(dtype).replace("torch.", "")


def environment(device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "visprune_version": __version__,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- table
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
    head += ["GB/s", "% copy BW", "% roofline", "launches"] if gpu else []
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
                     f"{100 * r['fraction_of_roofline']:.1f}" if ran else "-",
                     "-" if r.get("launches") is None else str(r["launches"])]
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


def clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def footnotes(unavailable: Dict[str, str], *, device: torch.device, compile_ref: bool, compile_max_k: int,
              mem_limit: int, roofline: bool, cases_done: int, elapsed: float,
              interrupted: bool) -> List[str]:
    """The notes under the table: backends not timed and why, how the run measured, what it covered."""
    notes = [f"{b}: {why}" for b, why in unavailable.items()]
    notes.append(f"{COMPILED}: torch.compile of the reference op, "
                 + (f"compile time excluded; n/a where it fails, captures nothing, "
                    f"or k > {compile_max_k}" if compile_ref else
                    "not run (pass --compile; a CPU inductor compile takes ~30 s per case)"))
    notes.append("median of interleaved repetitions (each repetition times every backend once); "
                 + ("CUDA events around one call, L2 flushed and the GPU idle before each"
                    if device.type == "cuda" else
                    f"wall clock, each sample repeats the call for >= {CPU_MIN_SAMPLE_S * 1e3:.0f} ms"))
    notes.append("IQR: interquartile range of the repetitions over the median (noise on a shared machine)")
    notes.append("check: the backend's output against the reference's (indices identical, floats close)")
    notes.append(f"a backend whose estimated memory exceeds {mem_limit / GiB:.1f} GiB is skipped "
                 f"(--mem-limit)")
    if roofline:
        notes.append("GB/s: the op's minimum traffic / median time; roofline: minimum traffic at the copy "
                     "bandwidth + the DESIGN algorithm's flops at the matmul rate, over the median")
        notes.append("launches: GPU operations (kernels, copies, memsets) of one call, from "
                     "torch.profiler's CUDA activity")
    notes.append(f"{cases_done} cases in {clock(elapsed)}" + (" (interrupted)" if interrupted else ""))
    return notes


def write_json(rows: List[Dict[str, Any]], path: str) -> None:
    """One object per op x shape x backend; strict JSON (a value not measured is null, never NaN).
    Written whole or not at all (a temporary file renamed), so a killed run leaves the last rows."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, allow_nan=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- chart
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
