"""HoliTom's merging before the LLM against its original's code path, side by side on the same
tokens: time and peak memory.

    python benchmarks/bench_holitom.py [--reps 10] [--json out.json] [--md out.md] [--quick]

Video shapes: ``T × P`` = 32 × 196 and 64 × 196 pooled tokens (LLaVA-OneVision's 32 frames,
LLaVA-Video's 64), ``D`` = 896 and 3584, one video, fp32 on CPU.  The tokens have scenes of 8
frames in which 60 % of the positions hold nearly the same token (noise 0.05 on a unit-variance
base) and the others change every frame, so the original's windows and static merge do work.
The original's code path is the statement-by-statement transliteration in
``tests/holitom_originals.py`` (``cdist`` in fp32 and its ``1e-6·rand`` density noise, as the
original), run in the same process.  The check runs it without the noise (with one or two
centres, k = min(7, centres) <= 2, densities tie exactly and the noise picks among them; see
the README).  Settings: the original's defaults (``RETAIN_RATIO=0.1``,
``T=0.8``, ``D=0``: every dynamic token chosen by attention) and ``D=0.5`` (half of each frame's
budget to DPC-kNN centres; the original crashes there, the transliteration takes the intended
positions).  Before timing, each pair is checked to keep the same positions in the same order and
tokens within 1e-4.

Time and peak memory are measured as in ``benchmarks/bench_video_methods.py``.
"""
import argparse
import datetime
import json
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from visprune.bench import fmt_time, measure  # noqa: E402
from visprune.bench.report import _cpu_name  # noqa: E402
from visprune.methods import holitom  # noqa: E402

import holitom_originals as orig  # noqa: E402
from bench_video_methods import peak_bytes  # noqa: E402

SHAPES = [(32, 196, 896), (64, 196, 896), (32, 196, 3584), (64, 196, 3584)]
QUICK = [(6, 16, 8)]
SETTINGS = {"defaults": {}, "d=0.5": {"d": 0.5}}


def make_video(T, P, D, seed=0):
    """``(video[1, T, P, D], attention[1, T, P])``: scenes of 8 frames, 60 % of the positions
    nearly constant within a scene."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, T, P, D, generator=g)
    n = int(0.6 * P)
    for s in range(0, T, 8):
        e = min(s + 8, T)
        video[:, s:e, :n] = torch.randn(1, 1, n, D, generator=g) + \
            0.05 * torch.randn(1, e - s, n, D, generator=g)
    return video, torch.rand(1, T, P, generator=g)


def original(video, attention, kw, noise=True):
    """The original's code path; ``noise=False``: without its density noise (ties stated as
    visprune breaks them), for the check."""
    g = torch.Generator().manual_seed(0) if noise else None
    args = {"D": kw.get("d", 0.0)}
    return orig.holitom_video(video[0], attention[0], dist_dtype=torch.float32, generator=g,
                              **args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--md", help="write the table as markdown here")
    parser.add_argument("--quick", action="store_true", help="one tiny shape (a smoke test)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    rows = []
    for T, P, D in QUICK if args.quick else SHAPES:
        video, attention = make_video(T, P, D, T + D)
        for label, kw in SETTINGS.items():
            def ours():
                return holitom(video, attention, **kw)

            def theirs():
                return original(video, attention, kw)
            mine, (tokens, positions, windows) = ours(), original(video, attention, kw, False)
            n = int(mine.lengths[0])
            if not torch.equal(mine.indices[0, :n], positions) or \
                    not torch.allclose(mine.tokens[0, :n], tokens, rtol=0, atol=1e-4):
                raise SystemExit(f"holitom {label} {T}x{P}x{D}: visprune and the original "
                                 f"disagree")
            t = measure({"visprune": ours, "original": theirs}, device, min_reps=args.reps,
                        max_reps=args.reps)
            best = {k: 1e3 * min(v.samples) for k, v in t.items()}
            median = {k: 1e3 * v.median for k, v in t.items()}
            rows.append({"method": "holitom", "setting": label, "T": T, "P": P, "D": D, "B": 1,
                         "kept": n, "windows": len(windows),
                         "visprune_ms": best["visprune"], "original_ms": best["original"],
                         "speedup": best["original"] / best["visprune"],
                         "visprune_median_ms": median["visprune"],
                         "original_median_ms": median["original"],
                         "speedup_median": median["original"] / median["visprune"],
                         "visprune_peak_MB": peak_bytes(ours) / 2**20,
                         "original_peak_MB": peak_bytes(theirs) / 2**20,
                         "input_MB": video.numel() * video.element_size() / 2**20})
            print(f"holitom {label} {T}x{P} D={D}: {fmt_time(best['visprune'])} vs "
                  f"{fmt_time(best['original'])}", file=sys.stderr)
    env = {"machine": f"{_cpu_name()} ({platform.machine()}), {os.cpu_count()} cores",
           "load_average": round(os.getloadavg()[0], 1),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
           "reps": args.reps, "date": datetime.date.today().isoformat(),
           "retain_ratio": 0.1, "tau": 0.8}
    for r in rows:
        r.update(env)
    lines = [f"HoliTom against its original's code path; {env['machine']}, {env['threads']} "
             f"threads, load average {env['load_average']} at the end, torch {env['torch']}, "
             f"float32, one video, {args.reps} interleaved repetitions: best (median); "
             f"retain_ratio 0.1, tau 0.8", "",
             "| setting | T × P | D | windows | kept | visprune | original | speed-up | "
             "peak extra memory: visprune | original | (input) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['T']} × {r['P']} | {r['D']} | {r['windows']} | "
                     f"{r['kept']} | "
                     f"{fmt_time(r['visprune_ms'])} ({fmt_time(r['visprune_median_ms'])}) | "
                     f"{fmt_time(r['original_ms'])} ({fmt_time(r['original_median_ms'])}) | "
                     f"{r['speedup']:.2f}× ({r['speedup_median']:.2f}×) | "
                     f"{r['visprune_peak_MB']:.0f} MB | {r['original_peak_MB']:.0f} MB | "
                     f"{r['input_MB']:.0f} MB |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
