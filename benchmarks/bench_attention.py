"""``received_attention`` against the eager attention map and the layer's own SDPA call, side by
side in one process.

The op (the C++ "cpu" backend on CPU, Triton on CUDA) never forms the ``[B, H, L, L]`` map.  The
eager way does what FastV / FitPrune's originals do with ``output_attentions=True``: materialise
``softmax(QKᵀ·scale)`` with the causal mask, take the max over heads, and sum the span's columns
over the query rows after the span.  It is written as lean as eager can be: one ``[B, H, L, L]``
map in the input dtype, masked and softmaxed in place (transformers' eager attention holds at
least two: the scores and their fp32 softmax), so its memory here is a lower bound.  ``sdpa`` is
the attention call of the layer the statistics are taken from (``scaled_dot_product_attention``,
causal, a random ``v`` like ``k``): the op should cost no more than it.

Shapes: LLaVA-1.5's prompt (B=1, H=Hkv=32, dh=128, L=640, the image at 35..611, the text rows
after it) and the same span in long prompts of L = 8192 and 32768.  Times are medians of a few
interleaved runs (one run when a call takes longer than ``--long-s``).  Memory is the extra
beyond the inputs: on CPU computed from the buffers each side allocates (tracemalloc does not see
torch's allocations); on CUDA measured with ``torch.cuda.max_memory_allocated``, the computed
figure in parentheses.  An eager map over the memory limit is not run: "skipped (needs N GB)".

    python benchmarks/bench_attention.py [--device cpu|cuda] [--quick] [--lengths 640,8192]
                                         [--json PATH] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from visprune import ops
from visprune.bench import environment, fmt_time, memory_limit, resolve_device, synchronize

GB = 1e9
B, H, HKV, DH, START, SPAN = 1, 32, 32, 128, 35, 576
LENGTHS = (640, 8192, 32768)


def eager(q, k, start, length):
    """The attention map way, ``float32[B, length]``: received attention of the span from the
    rows after it (head max, column sums)."""
    L = q.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2))                        # [B, H, L, L]
    s.mul_(q.shape[-1] ** -0.5)
    s.masked_fill_(torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    s.sub_(s.amax(-1, keepdim=True)).exp_()                         # softmax, in place
    s.div_(s.sum(-1, keepdim=True, dtype=torch.float32).to(s.dtype))
    per_row = s[:, :, start + length:, start:start + length].amax(1)  # head max
    return per_row.float().sum(1)


def eager_bytes(L, itemsize):
    """The eager way's buffers: the map, the causal mask, the row max and sum, the sliced max."""
    rows = max(L - START - SPAN, 0)
    return B * H * L * L * itemsize + L * L + B * H * L * (itemsize + 4) + B * rows * SPAN * itemsize


def sdpa_bytes(L, itemsize):
    """SDPA's buffers beside its inputs: ``v``, the output and the per-row log-sum-exp."""
    return 2 * B * H * L * DH * itemsize + B * H * L * 4


def op_bytes(L, itemsize, backend, threads):
    """The op's buffers: the row statistics ``[B, H, L]`` and the output; the C++ kernel adds the
    selected rows and per-thread key panels (and fp32 copies of fp16/bf16 inputs), Triton the
    row splits' partial sums (at most ``cdiv(L, 64)`` of them)."""
    total = B * H * L * 4 + B * SPAN * 4
    if backend == "cpu":
        total += B * L * 8 + threads * (HKV * DH * 16 + DH * 16 + 2 * 96) * 4
        if itemsize != 4:
            total += 4 * B * (H + HKV) * L * DH
    else:
        total += -(-L // 64) * B * SPAN * 4 + 3 * B * 8
    return total


def run_once(fn, device):
    """``(seconds, output, peak extra bytes or None)`` of one call."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return seconds, out, peak


def bench_length(L, device, dtype, backend, args, limit):
    g = torch.Generator().manual_seed(L)
    q = torch.randn(B, H, L, DH, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, HKV, L, DH, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, HKV, L, DH, generator=g).to(device=device, dtype=dtype)
    itemsize = dtype.itemsize
    fns = {"op": lambda: ops.received_attention(q, k, START, SPAN, queries="after", heads="max",
                                                backend=backend),
           "eager": lambda: eager(q, k, START, SPAN),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    need = {"op": op_bytes(L, itemsize, backend, torch.get_num_threads()),
            "eager": eager_bytes(L, itemsize), "sdpa": sdpa_bytes(L, itemsize)}
    row = {"L": L, "B": B, "H": H, "Hkv": HKV, "dh": DH, "start": START, "length": SPAN,
           "queries": "after", "heads": "max", "dtype": str(dtype).replace("torch.", ""),
           "backend": backend}
    samples, outs = {}, {}
    for name, fn in fns.items():
        row[f"{name}_bytes_computed"] = need[name]
        if need[name] > limit:
            row[f"{name}_skipped"] = f"skipped (needs {fmt_bytes(need[name])})"
            continue
        if name == "op" and args.skip_op_above and L > args.skip_op_above:
            row[f"{name}_skipped"] = f"skipped (--skip-op-above {args.skip_op_above})"
            continue
        print(f"L={L} {name}: first call ...", file=sys.stderr, flush=True)
        seconds, outs[name], peak = run_once(fn, device)
        # On CUDA the first call compiles the Triton kernels: it is a warm-up, not a sample.
        samples[name] = [] if device.type == "cuda" else [seconds]
        if peak is not None:
            row[f"{name}_bytes_measured"] = peak
    reps = 3 if args.quick else 7
    alive = [n for n in samples if device.type == "cuda" or samples[n][0] < args.long_s]
    for r in range(reps - (device.type != "cuda") if alive else 0):
        for name in alive[r % len(alive):] + alive[:r % len(alive)]:     # rotating order
            samples[name].append(run_once(fns[name], device)[0])
    for name, s in samples.items():
        row[f"{name}_ms"] = statistics.median(s) * 1e3
        row[f"{name}_runs"] = len(s)
    if "op" in outs and "eager" in outs:
        row["max_abs_diff"] = float((outs["op"] - outs["eager"]).abs().max())
        row["max_abs_value"] = float(outs["eager"].abs().max())
    del q, k, v, outs
    return row


def fmt_bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _mem(row, name, device):
    if f"{name}_skipped" in row and f"{name}_ms" not in row:
        return row[f"{name}_skipped"]
    computed = row[f"{name}_bytes_computed"]
    if device.type == "cuda" and f"{name}_bytes_measured" in row:
        return f"{fmt_bytes(row[f'{name}_bytes_measured'])} ({fmt_bytes(computed)})"
    return fmt_bytes(computed)


def table(rows, env, device):
    mem_kind = ("measured (torch.cuda.max_memory_allocated above the inputs; computed in "
                "parentheses)" if device.type == "cuda" else
                "computed from the buffers each side allocates (CPU: not measured)")
    lines = [f"received_attention vs eager attention map: {env['device_name']}, "
             f"{env['threads']} threads, {env['dtype']}, torch {env['torch_version']}, "
             f"triton {env['triton_version']}, {env['date']}",
             f"B={B}, H=Hkv={H}, dh={DH}, span [{START}, {START + SPAN}), queries 'after', heads "
             f"'max'; time: median of the runs shown; memory: {mem_kind}.", "",
             "| L | op backend | op time | eager time | eager/op time | SDPA time | op/SDPA time "
             "| op memory | eager memory | eager/op memory | max abs diff (max value) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        def t(name):
            if f"{name}_ms" not in r:
                return r.get(f"{name}_skipped", "-")
            return f"{fmt_time(r[f'{name}_ms'])} ({r[f'{name}_runs']} run{'s' * (r[f'{name}_runs'] > 1)})"
        ratio_t = (f"{r['eager_ms'] / r['op_ms']:.1f}×" if "eager_ms" in r and "op_ms" in r
                   else "-")
        ratio_s = (f"{r['op_ms'] / r['sdpa_ms']:.2f}×" if "sdpa_ms" in r and "op_ms" in r
                   else "-")
        key = "bytes_measured" if device.type == "cuda" and "op_bytes_measured" in r \
            and "eager_bytes_measured" in r else "bytes_computed"
        ratio_m = f"{r[f'eager_{key}'] / max(r[f'op_{key}'], 1):.0f}×"
        diff = (f"{r['max_abs_diff']:.1e} ({r['max_abs_value']:.3g})" if "max_abs_diff" in r
                else "-")
        lines.append(f"| {r['L']} | {r['backend']} | {t('op')} | {t('eager')} | {ratio_t} | "
                     f"{t('sdpa')} | {ratio_s} | {_mem(r, 'op', device)} | "
                     f"{_mem(r, 'eager', device)} | {ratio_m} | {diff} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when torch sees a GPU, else cpu")
    ap.add_argument("--quick", action="store_true", help="3 runs per side instead of 7")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                    help="comma-separated prompt lengths L (default %(default)s)")
    ap.add_argument("--skip-op-above", type=int, default=0,
                    help="do not run the op above this L (the CPU op at 32k takes minutes)")
    ap.add_argument("--long-s", type=float, default=10.0,
                    help="a first call longer than this many seconds is the only run (CPU)")
    ap.add_argument("--memory-limit-gb", type=float, default=None,
                    help="skip a side whose buffers exceed this (default: half the free RAM, or "
                         "80%% of the free GPU memory)")
    ap.add_argument("--json", default=None, help="write the rows and environment here")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "cpu"
    limit = int(args.memory_limit_gb * GB) if args.memory_limit_gb else memory_limit(device)
    env = environment(device, dtype)
    rows = [bench_length(int(L), device, dtype, backend, args, limit)
            for L in args.lengths.split(",")]
    text = table(rows, env, device)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "memory_limit_bytes": limit, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
