"""FastVID (both model paths) against its original's code path, side by side on the same tokens:
time and peak memory.

    python benchmarks/bench_fastvid.py [--reps 10] [--json out.json] [--md out.md] [--quick]
        [--shapes 32x196x896 64x196x896 ...] [--threads N]

Video shapes: ``T × P`` = 32 × 196 and 64 × 196 tokens (6,272 and 12,544), ``D`` = 896
(Qwen2-0.5B-sized) and 3584 (LLaVA-OneVision-7B / Qwen2.5-VL-7B), one video, fp32 on CPU.  The
original's code paths are the statement-by-statement transliterations in
``tests/fastvid_originals.py`` run as the original runs: float32 distances, its ``1e-6·rand``
density noise (a seeded generator), the tokens in float32 (the model's dtype would be bf16 on
a GPU; CPU matrix products in bf16 are slow and not what the comparison is about).  Settings:
each variant's defaults (LLaVA-OneVision ``r = 0.10, tau = 0.9``; Qwen2.5-VL ``r = 0.27,
tau = 0.84, ignore = 0.95``; ``c = 8, d = 0.4, p = 4, beta = 0.6``).  The tokens are frames in
scenes (a scene vector, a per-frame drift and per-token noise), so that DySeg finds segments of
several frames as on real video.  Before timing, each pair is checked to keep the same tokens
(positions identical, merged tokens within 1e-4 of the largest |token|).

Time and peak memory are measured as in ``bench_video_methods.py`` (interleaved repetitions,
best and median; the resident set's peak during one call above its start, the inputs already
resident).
"""
import os
import sys

import torch

from visprune.bench import fmt_time
from visprune.methods import fastvid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
import fastvid_originals as orig  # noqa: E402
from bench_video_methods import (TIMING_COLUMNS, TIMING_RULE, command_line,  # noqa: E402
                                 environment, header, parse, report, timed_row, timing_cells)

SHAPES = [(32, 196, 896), (64, 196, 896), (32, 196, 3584), (64, 196, 3584)]
QUICK = [(8, 196, 16)]       # --quick: the harness's smoke test
VARIANTS = ("llava_onevision", "qwen2_5_vl")


def make_inputs(T, P, D, seed=0):
    """``video[1, T, P, D]``, ``saliency[1, T, P]`` and the global features ``[1, T, D]`` (the
    mean token: Qwen2.5-VL's definition; LLaVA-OneVision's attention-pooled feature is another
    vector per frame of the same role)."""
    g = torch.Generator().manual_seed(seed)
    scene = (torch.rand(T, generator=g) < 0.2).long().cumsum(0)
    frame = torch.randn(T + 1, D, generator=g)[scene] + 0.3 * torch.randn(T, D, generator=g)
    video = (frame[:, None] + torch.randn(T, P, D, generator=g))[None]
    saliency = torch.softmax(4 * torch.rand(1, T, P, generator=g), -1)
    return video, saliency, video.mean(2)


def original(variant, video, saliency, global_features):
    """The original's path on the packed video, its noise drawn from a seeded generator."""
    T, P, D = video.shape[1:]
    packed = video[0].reshape(T * P, D)
    noise = torch.Generator().manual_seed(0)
    if variant == "llava_onevision":
        return orig.fastvid_llava_onevision(packed, saliency[0].reshape(-1), global_features[0],
                                            T, noise=noise)
    return orig.fastvid_qwen2_5_vl(packed, saliency[0], global_features[0], T, noise=noise)


def main(argv=None):
    parser = command_line(__doc__.splitlines()[0], threads=True)
    parser.add_argument("--shapes", nargs="+", help="TxPxD shapes instead of the default four")
    args = parse(parser, argv)
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    rows = []
    for T, P, D in shapes:
        video, saliency, gf = make_inputs(T, P, D, seed=T + D)
        for variant in VARIANTS:
            def ours():
                return fastvid(video, saliency, global_features=gf, variant=variant)

            def theirs():
                return original(variant, video, saliency, gf)

            mine, (tokens, positions) = ours(), theirs()
            n = int(mine.lengths[0])
            if not torch.equal(mine.indices[0, :n], positions) or not torch.allclose(
                    mine.tokens[0, :n], tokens, rtol=0, atol=1e-4 * float(video.abs().max())):
                raise SystemExit(f"{variant} {T}x{P}x{D}: visprune and the original disagree")
            r = timed_row(ours, theirs, video, args.reps, variant=variant, T=T, P=P, D=D, B=1,
                          kept=n)
            rows.append(r)
            print(f"{variant} {T}x{P} D={D}: {fmt_time(r['visprune_ms'])} vs "
                  f"{fmt_time(r['original_ms'])}", file=sys.stderr)
    env = environment(args.reps)
    lines = [header("FastVID against its original's code path", env,
                    "each variant's default settings"), "",
             f"| variant | T × P | D | kept | {TIMING_COLUMNS} |", "|---" * 4 + TIMING_RULE + "|"]
    lines += [f"| {r['variant']} | {r['T']} × {r['P']} | {r['D']} | {r['kept']} | "
              f"{timing_cells(r)} |" for r in rows]
    report(rows, env, lines, args)


if __name__ == "__main__":
    main()
