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
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from visprune.bench import fmt_time  # noqa: E402
from visprune.methods import holitom  # noqa: E402

import holitom_originals as orig  # noqa: E402
from bench_video_methods import (TIMING_COLUMNS, TIMING_RULE, command_line,  # noqa: E402
                                 environment, header, parse, report, timed_row, timing_cells)

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
    args = parse(command_line(__doc__.splitlines()[0]), argv)
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
            r = timed_row(ours, theirs, video, args.reps, method="holitom", setting=label, T=T,
                          P=P, D=D, B=1, kept=n, windows=len(windows))
            rows.append(r)
            print(f"holitom {label} {T}x{P} D={D}: {fmt_time(r['visprune_ms'])} vs "
                  f"{fmt_time(r['original_ms'])}", file=sys.stderr)
    env = environment(args.reps, retain_ratio=0.1, tau=0.8)
    lines = [header("HoliTom against its original's code path", env, "retain_ratio 0.1, tau 0.8"),
             "", f"| setting | T × P | D | windows | kept | {TIMING_COLUMNS} |",
             "|---" * 5 + TIMING_RULE + "|"]
    lines += [f"| {r['setting']} | {r['T']} × {r['P']} | {r['D']} | {r['windows']} | "
              f"{r['kept']} | {timing_cells(r)} |" for r in rows]
    report(rows, env, lines, args)


if __name__ == "__main__":
    main()
