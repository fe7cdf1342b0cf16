"""PruneVid's pre-LLM stage against its original's code path, side by side on the same tokens:
time and peak memory.

    python benchmarks/bench_prunevid.py [--reps 10] [--json out.json] [--md out.md] [--quick]

Video shapes: ``T × P`` = 32 × 196 and 64 × 196 tokens (6,272 and 12,544), ``D`` = 896 and 3584,
one video, fp32 on CPU, the original's settings (tau 0.8, temporal ratio 0.25, cluster ratio
0.5, k 7, groups of at most 14 kept).  The tokens are shots of 2–6 frames (a shot's frames share
a mean token, half of its positions nearly still): several windows, static and dynamic tokens,
as in a real video.  The original's code path is the statement-by-statement transliteration in
``tests/prunevid_originals.py`` (``merge_frames_dynamic``, float32 ``cdist`` as the original,
with its ``1e-6·rand`` density noise), run in the same process.  Before timing, each pair is
checked to give the positions of the float64 transliteration (the deterministic tie rule, the
noise off) and at each its token within 1e-4; the output slots whose order differs (two
clusters of a group whose scores tie in fp32) are counted (``order_swaps``); whether the
original's own float32 ``cdist`` gives those positions too is recorded
(``original_fp32_positions_exact``): at large ``D`` its rounding changes some choices.

Time: interleaved repetitions (:func:`visprune.bench.measure`), the best and the median of each.
Peak memory: the largest resident set during one call above the resident set at its start
(``bench_video_methods.peak_bytes``), with the input tokens already resident.
"""
import argparse
import datetime
import json
import os
import platform
import sys

import torch

from visprune.bench import fmt_time, measure
from visprune.bench.report import _cpu_name
from visprune.methods import prunevid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import prunevid_originals as orig  # noqa: E402
from bench_video_methods import peak_bytes  # noqa: E402

SHAPES = [(32, 196, 896), (64, 196, 896), (32, 196, 3584), (64, 196, 3584)]
QUICK = [(8, 49, 16)]        # --quick: the harness's smoke test


def make_video(T, P, D, seed=0):
    """``[1, T, P, D]``: shots of 2–6 frames, each with its own mean tokens; half the positions
    nearly still within a shot, the others moving."""
    g = torch.Generator().manual_seed(seed)
    shot = torch.repeat_interleave(torch.arange(T), torch.randint(2, 7, (T,), generator=g))[:T]
    base = torch.randn(int(shot.max()) + 1, P, D, generator=g)
    still = torch.where(torch.arange(P)[:, None] < P // 2, 0.1, 0.7)
    return (base[shot] + still * torch.randn(T, P, D, generator=g))[None]


def original(video, generator=None, dist_dtype=torch.float32):
    T, P, D = video.shape[1:]
    if dist_dtype == torch.float64:
        video = video.double()
    return orig.merge_frames_dynamic(video.reshape(1, T * P, D), T, generator=generator,
                                     dist_dtype=dist_dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--md", help="write the table as markdown here")
    parser.add_argument("--quick", action="store_true", help="one tiny shape (a smoke test)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows = []
    for T, P, D in QUICK if args.quick else SHAPES:
        video = make_video(T, P, D, seed=T + D)
        mine = prunevid(video)
        n = int(mine.lengths[0])
        exact_tokens, exact = original(video, dist_dtype=torch.float64)
        got, order = mine.indices[0, :n].sort()
        want, want_order = exact.sort()
        if not torch.equal(got, want) or not torch.allclose(
                mine.tokens[0, :n][order].double(), exact_tokens[want_order], atol=1e-4,
                rtol=1e-4):
            raise SystemExit(f"prunevid {T}x{P}x{D}: visprune and the original disagree")
        # the same tokens at the same positions; output slots where the order differs (two
        # clusters whose scores are equal in fp32)
        swapped = int((mine.indices[0, :n] != exact).sum())
        # the original's own float32 cdist: the positions it gives without the noise
        fp32_same = torch.equal(original(video)[1], exact)
        noise = torch.Generator().manual_seed(0)
        t = measure({"visprune": lambda: prunevid(video),
                     "original": lambda: original(video, noise)},
                    device, min_reps=args.reps, max_reps=args.reps)
        best = {k: 1e3 * min(v.samples) for k, v in t.items()}
        median = {k: 1e3 * v.median for k, v in t.items()}
        rows.append({"method": "prunevid", "T": T, "P": P, "D": D, "B": 1, "kept": n,
                     "original_fp32_positions_exact": fp32_same, "order_swaps": swapped,
                     "visprune_ms": best["visprune"], "original_ms": best["original"],
                     "speedup": best["original"] / best["visprune"],
                     "visprune_median_ms": median["visprune"],
                     "original_median_ms": median["original"],
                     "speedup_median": median["original"] / median["visprune"],
                     "visprune_peak_MB": peak_bytes(lambda: prunevid(video)) / 2**20,
                     "original_peak_MB": peak_bytes(lambda: original(video, noise)) / 2**20,
                     "input_MB": video.numel() * video.element_size() / 2**20})
        print(f"prunevid {T}x{P} D={D}: {fmt_time(best['visprune'])} vs "
              f"{fmt_time(best['original'])}", file=sys.stderr)
    env = {"machine": f"{_cpu_name()} ({platform.machine()}), {os.cpu_count()} cores",
           "load_average": round(os.getloadavg()[0], 1),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
           "reps": args.reps, "date": datetime.date.today().isoformat()}
    for r in rows:
        r.update(env)
    lines = [f"PruneVid (pre-LLM stage) against its original's code path; {env['machine']}, "
             f"{env['threads']} threads, load average {env['load_average']} at the end, torch "
             f"{env['torch']}, float32, one video, {args.reps} interleaved repetitions: best "
             f"(median); tau 0.8, temporal ratio 0.25, cluster ratio 0.5, k 7", "",
             "| T × P | D | kept | visprune | original | speed-up | peak extra memory: "
             "visprune | original | (input) | order swaps | original fp32 = exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} × {r['P']} | {r['D']} | {r['kept']} | "
                     f"{fmt_time(r['visprune_ms'])} ({fmt_time(r['visprune_median_ms'])}) | "
                     f"{fmt_time(r['original_ms'])} ({fmt_time(r['original_median_ms'])}) | "
                     f"{r['speedup']:.2f}× ({r['speedup_median']:.2f}×) | "
                     f"{r['visprune_peak_MB']:.0f} MB | {r['original_peak_MB']:.0f} MB | "
                     f"{r['input_MB']:.0f} MB | {r['order_swaps']} | "
                     f"{'yes' if r['original_fp32_positions_exact'] else 'no'} |")
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
