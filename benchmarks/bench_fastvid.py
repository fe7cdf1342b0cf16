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
import argparse
import datetime
import json
import os
import platform
import sys

import torch

from visprune.bench import fmt_time, measure
from visprune.bench.report import _cpu_name
from visprune.methods import fastvid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
import fastvid_originals as orig  # noqa: E402
from bench_video_methods import peak_bytes  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--md", help="write the table as markdown here")
    parser.add_argument("--quick", action="store_true", help="one tiny shape (a smoke test)")
    parser.add_argument("--shapes", nargs="+", help="TxPxD shapes instead of the default four")
    parser.add_argument("--threads", type=int, help="torch's thread count (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    device = torch.device("cpu")
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
            t = measure({"visprune": ours, "original": theirs}, device, min_reps=args.reps,
                        max_reps=args.reps)
            best = {k: 1e3 * min(v.samples) for k, v in t.items()}
            median = {k: 1e3 * v.median for k, v in t.items()}
            rows.append({"variant": variant, "T": T, "P": P, "D": D, "B": 1, "kept": n,
                         "visprune_ms": best["visprune"], "original_ms": best["original"],
                         "speedup": best["original"] / best["visprune"],
                         "visprune_median_ms": median["visprune"],
                         "original_median_ms": median["original"],
                         "speedup_median": median["original"] / median["visprune"],
                         "visprune_peak_MB": peak_bytes(ours) / 2**20,
                         "original_peak_MB": peak_bytes(theirs) / 2**20,
                         "input_MB": video.numel() * video.element_size() / 2**20})
            print(f"{variant} {T}x{P} D={D}: {fmt_time(best['visprune'])} vs "
                  f"{fmt_time(best['original'])}", file=sys.stderr)
    env = {"machine": f"{_cpu_name()} ({platform.machine()}), {os.cpu_count()} cores",
           "load_average": round(os.getloadavg()[0], 1),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
           "reps": args.reps, "date": datetime.date.today().isoformat()}
    for r in rows:
        r.update(env)
    lines = [f"FastVID against its original's code path; {env['machine']}, {env['threads']} "
             f"threads, load average {env['load_average']} at the end, torch {env['torch']}, "
             f"float32, one video, {args.reps} interleaved repetitions: best (median); each "
             f"variant's default settings", "",
             "| variant | T × P | D | kept | visprune | original | speed-up | peak extra memory: "
             "visprune | original | (input) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['T']} × {r['P']} | {r['D']} | {r['kept']} | "
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
