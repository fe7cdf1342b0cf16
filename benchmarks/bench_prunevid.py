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
import os
import sys

import torch

from visprune.bench import fmt_time
from visprune.methods import prunevid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import prunevid_originals as orig  # noqa: E402
from bench_video_methods import (TIMING_COLUMNS, TIMING_RULE, command_line,  # noqa: E402
                                 environment, header, parse, report, timed_row, timing_cells)

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
    args = parse(command_line(__doc__.splitlines()[0], threads=True), argv)
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
        r = timed_row(lambda: prunevid(video), lambda: original(video, noise), video, args.reps,
                      method="prunevid", T=T, P=P, D=D, B=1, kept=n,
                      original_fp32_positions_exact=fp32_same, order_swaps=swapped)
        rows.append(r)
        print(f"prunevid {T}x{P} D={D}: {fmt_time(r['visprune_ms'])} vs "
              f"{fmt_time(r['original_ms'])}", file=sys.stderr)
    env = environment(args.reps)
    lines = [header("PruneVid (pre-LLM stage) against its original's code path", env,
                    "tau 0.8, temporal ratio 0.25, cluster ratio 0.5, k 7"), "",
             f"| T × P | D | kept | {TIMING_COLUMNS} | order swaps | original fp32 = exact |",
             "|---" * 3 + TIMING_RULE + "|---|---|"]
    lines += [f"| {r['T']} × {r['P']} | {r['D']} | {r['kept']} | {timing_cells(r)} | "
              f"{r['order_swaps']} | {'yes' if r['original_fp32_positions_exact'] else 'no'} |"
              for r in rows]
    report(rows, env, lines, args)


if __name__ == "__main__":
    main()
