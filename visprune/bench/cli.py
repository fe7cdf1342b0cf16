"""Microbenchmarks of the visprune ops: every op x available backend x the DESIGN shapes.

    python -m visprune.bench [--quick] [--device cpu|cuda] [--ops OP ...] [--shapes FAMILY ...]
                             [--batch B ...] [--compile | --no-compile] [--json FILE] [--plot FILE]

For each case (op, shape) the backends are timed side by side in interleaved rounds (each round
runs every backend once, in rotating order), so load changes on a shared machine hit them alike
(the clocks, CPU and GPU: :mod:`visprune.bench.timing`).
Every figure printed or written is measured in this run; no timing is cached or reused.

Backends are the ones :func:`visprune.available_backends` reports ``"ok"`` for the device, called
through the public ops (argument checks included, as users see them), plus ``torch.compile`` of
the reference (``reference_compiled``) where it compiles.  Triton is never timed on CPU: its
interpreter is a correctness tool, not a performance backend.  Inputs are fp32 on CPU and fp16
on GPU (the DESIGN's GPU targets are fp16/bf16), unless ``--dtype`` says otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .cases import (BATCHES, FAMILIES, FULL_FAMILIES, OPS, QUICK_FAMILIES, QUICK_SMALL_D, cases,
                    select_ops, shape_grid)
from .report import clock, environment, footnotes, format_table, plot, write_json
from .runner import backend_plan, run_case
from .timing import DEFAULT_COMPILE_MAX_K, GiB, default_dtype, device_limits, memory_limit, resolve_device


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
    p.add_argument("--json", metavar="FILE",
                   help="write one JSON row per op x shape x backend (rewritten after every case)")
    p.add_argument("--plot", metavar="FILE", help="write a PNG chart of the speed-ups (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    try:
        args.ops = select_ops(args.ops)
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
                eta = f", ~{clock(spent / i * (len(todo) - i))} left" if i else ""
                print(f"[{i + 1}/{len(todo)} {clock(spent)}{eta}] {case.label}", file=sys.stderr, flush=True)
            rows += run_case(case, device, dtype, backends, compile_ref=compile_ref,
                             compile_max_k=args.compile_max_k, mem_limit=mem_limit, limits=limits,
                             timing=timing, seed=args.seed)
            if args.json:       # after every case: a run stopped from outside keeps its rows
                write_json([dict(r, **env) for r in rows], args.json)
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.perf_counter() - t_start
    for r in rows:
        r.update(env)

    done = len(todo) if not interrupted else len({(r["op"], r["shape"]) for r in rows})
    notes = footnotes(unavailable, device=device, compile_ref=compile_ref, compile_max_k=args.compile_max_k,
                      mem_limit=mem_limit, roofline=bool(limits), cases_done=done, elapsed=elapsed,
                      interrupted=interrupted)
    print(format_table(rows, env, notes))

    if args.json:
        write_json(rows, args.json)
        print(f"wrote {len(rows)} rows to {args.json}")
    if args.plot and rows:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 130 if interrupted else 0
