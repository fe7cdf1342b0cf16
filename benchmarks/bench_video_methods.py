"""The video methods (EVS, VidCom2, DyCoke's stage 1) against their originals' code paths, side by
side on the same tokens: time and peak memory.

    python benchmarks/bench_video_methods.py [--reps 10] [--json out.json] [--md out.md] [--quick]

Video shapes: ``T × P`` = 32 × 196 and 64 × 196 merged tokens (6,272 and 12,544), ``D`` = 896
(Qwen2-0.5B-sized) and 3584 (Qwen2.5-VL-7B / LLaVA-OneVision-7B), one video, fp32 on CPU.  The
originals' code paths are the statement-by-statement transliterations in
``tests/video_originals.py`` (vLLM 0.32's ``compute_retention_mask`` of ``evs.py`` /
``vidcom2.py`` followed by the boolean gather vLLM applies, ``emb[mask]``; DyCoke's
``dycole_ttm``), run in the same process; pruning rate 0.75 for EVS and VidCom2, ``k = 0.7`` for
DyCoke.  Before timing, each pair is checked to keep the same tokens.

Time: interleaved repetitions (:func:`visprune.bench.measure`), the best and the median of each;
on a machine shared with other work the best is the least disturbed run.  Peak memory: the
largest resident set during one call above the resident set at its start (Linux: ``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, freed heap memory returned first with
``malloc_trim``), with the input tokens already resident.
"""
import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import sys

import torch

from visprune.bench import fmt_time, measure
from visprune.bench.report import _cpu_name
from visprune.methods import dycoke, evs, vidcom2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import video_originals as orig  # noqa: E402

SHAPES = [(32, 196, 896), (64, 196, 896), (32, 196, 3584), (64, 196, 3584)]
QUICK = [(6, 196, 16)]       # --quick: the harness's smoke test
GRID = (14, 14)              # P = 196 merged tokens: a 28 × 28 patch grid, merge size 2
RATE, DYCOKE_K = 0.75, 0.7


def original_mask(golden):
    """vLLM's per-video path: the retention mask, then the kept tokens."""
    def run(video):
        T, P, D = video.shape[1:]
        emb = video[0].reshape(T * P, D)
        mask = golden(emb, (T, 2 * GRID[0], 2 * GRID[1]), 2, RATE)
        return emb[mask], mask.nonzero().squeeze(-1)
    return run


def original_dycoke(video):
    T, P, D = video.shape[1:]
    return orig.dycoke_ttm(video[0].reshape(T * P, D), P, DYCOKE_K)


METHODS = {
    "evs": (lambda v: evs(v, RATE), original_mask(orig.evs_retention_mask)),
    "vidcom2": (lambda v: vidcom2(v, RATE), original_mask(orig.vidcom2_retention_mask)),
    "dycoke": (lambda v: dycoke(v, DYCOKE_K), original_dycoke),
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_bytes(fn) -> int:
    """Bytes of resident memory one call of ``fn`` adds at its peak (Linux only)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # VmHWM := VmRSS
    start = _status("VmRSS")
    fn()
    return _status("VmHWM") - start


def command_line(description: str, threads: bool = False) -> argparse.ArgumentParser:
    """The video benchmarks' options: ``--reps``, ``--json``, ``--md``, ``--quick`` and, with
    ``threads``, ``--threads`` (:func:`parse` applies it)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--md", help="write the table as markdown here")
    parser.add_argument("--quick", action="store_true", help="one tiny shape (a smoke test)")
    if threads:
        parser.add_argument("--threads", type=int, help="torch's thread count (default: torch's)")
    return parser


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The parsed options, ``--threads`` applied where given."""
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args


def timed_row(ours, theirs, video: torch.Tensor, reps: int, **fields) -> dict:
    """``fields`` and the measurements of the calls ``ours`` and ``theirs`` (interleaved, ``reps``
    repetitions): best and median in ms, the speed-ups, the peak extra memory of one call."""
    t = measure({"visprune": ours, "original": theirs}, torch.device("cpu"), min_reps=reps,
                max_reps=reps)
    best = {k: 1e3 * min(v.samples) for k, v in t.items()}
    median = {k: 1e3 * v.median for k, v in t.items()}
    return {**fields, "visprune_ms": best["visprune"], "original_ms": best["original"],
            "speedup": best["original"] / best["visprune"],
            "visprune_median_ms": median["visprune"], "original_median_ms": median["original"],
            "speedup_median": median["original"] / median["visprune"],
            "visprune_peak_MB": peak_bytes(ours) / 2**20,
            "original_peak_MB": peak_bytes(theirs) / 2**20,
            "input_MB": video.numel() * video.element_size() / 2**20}


def environment(reps: int, **extra) -> dict:
    """What the rows were measured on (added to each row)."""
    return {"machine": f"{_cpu_name()} ({platform.machine()}), {os.cpu_count()} cores",
            "load_average": round(os.getloadavg()[0], 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
            "reps": reps, "date": datetime.date.today().isoformat(), **extra}


def header(what: str, env: dict, settings: str) -> str:
    """The table's first line."""
    return (f"{what}; {env['machine']}, {env['threads']} threads, load average "
            f"{env['load_average']} at the end, torch {env['torch']}, float32, one video, "
            f"{env['reps']} interleaved repetitions: best (median); {settings}")


TIMING_COLUMNS = ("visprune | original | speed-up | peak extra memory: visprune | original | "
                  "(input)")
TIMING_RULE = "|---" * 6


def timing_cells(r: dict) -> str:
    """A row's cells under :data:`TIMING_COLUMNS`."""
    return (f"{fmt_time(r['visprune_ms'])} ({fmt_time(r['visprune_median_ms'])}) | "
            f"{fmt_time(r['original_ms'])} ({fmt_time(r['original_median_ms'])}) | "
            f"{r['speedup']:.2f}× ({r['speedup_median']:.2f}×) | "
            f"{r['visprune_peak_MB']:.0f} MB | {r['original_peak_MB']:.0f} MB | "
            f"{r['input_MB']:.0f} MB")


def report(rows, env: dict, lines, args) -> None:
    """Adds ``env`` to every row, prints the table ``lines`` and writes ``--json`` / ``--md``."""
    for r in rows:
        r.update(env)
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")


def main(argv=None):
    args = parse(command_line(__doc__.splitlines()[0]), argv)
    rows = []
    for T, P, D in QUICK if args.quick else SHAPES:
        video = torch.randn(1, T, P, D, generator=torch.Generator().manual_seed(T + D))
        video += 0.5 * torch.randn(1, 1, 1, D, generator=torch.Generator().manual_seed(1))
        for name, (ours, original) in METHODS.items():
            mine, theirs = ours(video), original(video)
            n = int(mine.lengths[0])
            if not torch.equal(mine.indices[0, :n], theirs[1]):
                raise SystemExit(f"{name} {T}x{P}x{D}: visprune and the original disagree")
            r = timed_row(lambda: ours(video), lambda: original(video), video, args.reps,
                          method=name, T=T, P=P, D=D, B=1, kept=n)
            rows.append(r)
            print(f"{name} {T}x{P} D={D}: {fmt_time(r['visprune_ms'])} vs "
                  f"{fmt_time(r['original_ms'])}", file=sys.stderr)
    env = environment(args.reps, rate=RATE, dycoke_k=DYCOKE_K)
    lines = [header("Video methods against their originals' code paths", env,
                    f"q = {RATE} (EVS, VidCom2), k = {DYCOKE_K} (DyCoke)"), "",
             f"| method | T × P | D | kept | {TIMING_COLUMNS} |", "|---" * 4 + TIMING_RULE + "|"]
    lines += [f"| {r['method']} | {r['T']} × {r['P']} | {r['D']} | {r['kept']} | "
              f"{timing_cells(r)} |" for r in rows]
    report(rows, env, lines, args)


if __name__ == "__main__":
    main()
