"""Where and how long: devices, the memory guard, the interleaved measurement, the device's limits.

CPU: wall clock over enough calls per sample to last a few ms.  GPU: CUDA events around one
call, the L2 cache flushed and the device idle before each (cold-cache times that include the
host's launch overhead).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .cases import COMPILED, Case, input_bytes

GiB = 1 << 30


# --------------------------------------------------------------------------- devices
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


def free_cache(device: torch.device) -> None:
    """Return the caching allocator's unused GPU memory, so the next case starts from free memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


# --------------------------------------------------------------------------- memory guard
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


def count_launches(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """GPU operations (kernels, copies, memsets) that one call of ``fn`` puts on the device, as
    ``torch.profiler``'s CUDA activity records them; None on a CPU.  Each costs a launch, which
    at batch size 1 can outweigh the arithmetic."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def medians(fns: List[Callable[[], Any]], device: torch.device, reps: int) -> List[float]:
    """Median seconds per call of each of ``fns`` (warmed up once here), :func:`measure`d side
    by side for exactly ``reps`` repetitions: the scripts that time a method against its
    original's code path."""
    for fn in fns:
        fn()
    timings = measure(dict(enumerate(fns)), device, min_reps=reps, max_reps=reps)
    return [timings[i].median for i in range(len(fns))]


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
