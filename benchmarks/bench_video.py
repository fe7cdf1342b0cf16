"""DPC-kNN (and the cluster merge) on the C++ CPU backend against the originals' cdist-based code,
at video shapes, in one process on the same tokens: time and peak memory, and the same result.

    python benchmarks/bench_video.py [--reps 3] [--json PATH] [--md PATH]

Shapes: T × P = 32 × 196 and 64 × 196 tokens (LLaVA-OneVision's pooled frames), D ∈ {896, 3584}
(Qwen2-0.5B / Qwen2-7B), C = N / 10 centres (a 10 % budget), k = 7 (PruneVid, HoliTom).

* ``cluster``: ``ops.dpc_knn(x, C, k=7)`` against PruneVid's ``cluster_dpc_knn`` (also HoliTom's
  and FastVID's clustering: ``cdist / sqrt(D)`` on the full N×N matrix, top-k, density, the
  masked min for delta, top-C, ``index_points`` and ``argmin`` for the assignment), transliterated
  in float32 as the original runs it.
* ``cluster+merge``: ``dpc_knn`` + ``cluster_merge(include_centers=False, blend=0.6,
  blend_rule="fixed")`` against HoliTom's ``cluster_dpc_knn`` + ``merge_tokens_by_clustering``
  (its per-cluster loop, default ``BETA=0.6``).

* ``greedy-start``: ``greedy_select`` (maxmin, cosine, k = 64) on a whole video with
  ``start="linear"`` against the exact default ``start="auto"``, both visprune: what the linear
  start saves (the steps are the same O(k·N·D) either way; the starts differ by definition).

Same result: the originals add ``1e-6·rand`` to the density; here that term is 0, so they are
deterministic.  The centres and assignment are compared with the originals' float32 code and with
the same code run in float64 (the exact math, which visprune's reference follows); merged tokens
within float tolerance.

Peak memory: the largest resident set size above the one before the call, sampled every
millisecond by a thread while the call runs (the C++ path's own buffers included; the C
allocator's cached memory is released before each call).
Interleaved repetitions; the ratio is of the medians (and of the minima in brackets).
"""
import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import threading
import time

import torch

from visprune import ops

SHAPES = [(32, 196, 896), (64, 196, 896), (32, 196, 3584), (64, 196, 3584)]
K = 7
BETA = 0.6


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- originals
def index_points(points, idx):
    """PruneVid's ``index_points``: ``points[b, idx[b]]``."""
    B = points.shape[0]
    batch = torch.arange(B, device=points.device).view(B, *([1] * (idx.dim() - 1)))
    return points[batch.expand_as(idx), idx]


def cluster_dpc_knn(x, cluster_num, k, dtype=torch.float32):
    """PruneVid's ``cluster_dpc_knn`` (``models/pllava/modeling_pllava.py``; HoliTom's and
    FastVID's are the same up to the assignment), the density noise set to 0."""
    B, N, C = x.shape
    dist_matrix = torch.cdist(x.to(dtype), x.to(dtype)) / (C ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).type(dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    idx_cluster = index_points(dist_matrix, index_down).argmin(dim=1)
    idx_batch = torch.arange(B)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    return index_down, idx_cluster, dist_matrix


def holitom_merge(feat, cluster_num, k):
    """HoliTom's ``cluster_dpc_knn`` + ``merge_tokens_by_clustering`` (centres sorted, the
    others assigned by argmin of the distance, ``BETA·centre + (1 - BETA)·mean``)."""
    index_center, _, dist_matrix = cluster_dpc_knn(feat, cluster_num, k)
    target = torch.sort(index_center, dim=-1)[0]
    B, N, D = feat.shape
    non_target = torch.stack([torch.arange(N)[~torch.isin(torch.arange(N), target[b])]
                              for b in range(B)])
    nt_feat = torch.gather(feat, 1, non_target[..., None].expand(-1, -1, D))
    d = torch.gather(dist_matrix, 1, non_target[..., None].expand(-1, -1, N))
    d = torch.gather(d, 2, target[:, None, :].expand(-1, d.shape[1], -1))
    idx_cluster = d.argmin(-1)
    out = []
    for b in range(B):
        toks = []
        for i in range(cluster_num):
            m = idx_cluster[b] == i
            if m.any():
                toks.append(BETA * feat[b][target[b][i]] + (1 - BETA) * nt_feat[b][m].mean(0))
            else:
                toks.append(feat[b][target[b][i]])
        out.append(torch.stack(toks))
    return target, torch.stack(out)


def visprune_cluster(x, C):
    r = ops.dpc_knn(x, C, k=K, backend="cpu")
    return r.centers, r.assign


def visprune_merge(x, C):
    r = ops.dpc_knn(x, C, k=K, backend="cpu")
    centers, order = r.centers.sort(-1)          # HoliTom's slot order: ascending index
    # dpc_knn's assignment, its slots renumbered to that order
    slot = torch.empty_like(order).scatter_(1, order, torch.arange(C).expand_as(order))
    assign = torch.where(r.assign >= 0, slot.gather(1, r.assign.clamp(min=0)), -1)
    m = ops.cluster_merge(x, centers, assign, include_centers=False, blend=BETA,
                          blend_rule="fixed", backend="cpu")
    return centers, m.tokens


# --------------------------------------------------------------------------- measuring
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn):
    """``(result, seconds, peak bytes above the resident set before the call)``.  The C
    allocator first returns the memory it keeps from earlier calls (glibc's ``malloc_trim``),
    which a call would otherwise reuse without growing the resident set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    done.set()
    t.join()
    return out, dt, max(peak[0], rss_bytes()) - before


def fmt_t(s):
    return f"{s * 1e3:.0f} ms" if s < 10 else f"{s:.1f} s"


def fmt_m(b):
    return f"{b / 2**20:.0f} MiB"


def run(case, T, P, D, reps):
    N = T * P
    C = N // 10
    x = torch.randn(1, N, D, generator=torch.Generator().manual_seed(T * P + D))
    if case == "greedy-start":
        ours_k = (lambda: ops.greedy_select(x, 64, start="linear", backend="cpu"))
        theirs_k = (lambda: ops.greedy_select(x, 64, start="auto", backend="cpu"))
    else:
        ours, theirs = (visprune_cluster, cluster_dpc_knn) if case == "cluster" \
            else (visprune_merge, holitom_merge)
        theirs_k = (lambda: theirs(x, C, K))
        ours_k = (lambda: ours(x, C))
        ours(x[:, :512], 16)                       # load the kernels once
    t_ours, t_theirs, m_ours, m_theirs = [], [], [], []
    for _ in range(reps):
        a, t, m = measured(ours_k)
        t_ours.append(t)
        m_ours.append(m)
        b, t, m = measured(theirs_k)
        t_theirs.append(t)
        m_theirs.append(m)
    row = {"case": case, "T": T, "P": P, "N": N, "D": D, "C": C, "k": K, "reps": reps,
           "visprune_s": t_ours, "original_s": t_theirs,
           "visprune_peak_bytes": max(m_ours), "original_peak_bytes": max(m_theirs),
           "speedup_median": statistics.median(t_theirs) / statistics.median(t_ours),
           "speedup_min": min(t_theirs) / min(t_ours)}
    # the same result
    if case == "greedy-start":
        row["same_start"] = bool(a[0, 0] == b[0, 0])
    elif case == "cluster":
        # the assignment as each token's centre token (slots follow each side's centre order)
        exact = cluster_dpc_knn(x, C, K, dtype=torch.float64)
        mine = a[0][0][a[1][0]]
        for name, other in (("fp64", exact), ("fp32", b)):
            row[f"centres_equal_{name}_original"] = float(
                (a[0].sort(-1).values == other[0].sort(-1).values).float().mean())
            row[f"centres_in_order_equal_{name}_original"] = bool(torch.equal(a[0], other[0]))
            row[f"assign_equal_{name}_original"] = float(
                (mine == other[0][0][other[1][0]]).float().mean())
    else:
        same = bool(torch.equal(a[0], b[0]))
        row["centres_equal_fp32_original"] = same
        if same:
            row["merged_max_abs_diff"] = float((a[1] - b[1]).abs().max())
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--only", default="", help="cluster | cluster+merge | greedy-start")
    args = ap.parse_args()
    rows = []
    for case in ("cluster", "cluster+merge", "greedy-start"):
        if args.only and args.only != case:
            continue
        for T, P, D in (SHAPES if case != "greedy-start" else SHAPES[1:2]):
            row = run(case, T, P, D, args.reps)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}), flush=True)
    meta = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "load_average": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.md:
        lines = [f"# DPC-kNN on the C++ CPU backend against the originals' cdist-based code",
                 "",
                 f"CPU: **{meta['cpu']}**, {meta['cores']} cores, {meta['threads']} torch threads, "
                 f"torch {meta['torch']}, {meta['date']}, load average at the end "
                 f"{meta['load_average'][0]:.1f} (a shared machine: medians move between runs).",
                 f"`python benchmarks/bench_video.py --reps {args.reps}`: one process, visprune "
                 f"and the original interleaved on the same fp32 tokens; C = N/10, k = {K}. "
                 "Peak = largest resident set above the one before the call.",
                 "",
                 "| case | T × P = N | D | visprune | original | speed-up | visprune peak | "
                 "original peak | same result |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["case"] == "greedy-start":
                same = ("'original' = visprune with the exact start='auto'; the same start token"
                        if r["same_start"] else "'original' = visprune with the exact "
                        "start='auto' (another start token, by definition)")
            elif r["case"] == "cluster":
                same = (f"centres {r['centres_equal_fp64_original']:.4f} / assign "
                        f"{r['assign_equal_fp64_original']:.4f} of the fp64 original's; "
                        f"{r['centres_equal_fp32_original']:.4f} / "
                        f"{r['assign_equal_fp32_original']:.4f} of the fp32 original's")
            else:
                same = ("same centres, merged tokens within "
                        f"{r.get('merged_max_abs_diff', math.nan):.1e}"
                        if r["centres_equal_fp32_original"] else "centres differ (fp32 rounding)")
            lines.append(
                f"| {r['case']} | {r['T']} × {r['P']} = {r['N']} | {r['D']} | "
                f"{fmt_t(statistics.median(r['visprune_s']))} | "
                f"{fmt_t(statistics.median(r['original_s']))} | {r['speedup_median']:.2f}× "
                f"({r['speedup_min']:.2f}×) | {fmt_m(r['visprune_peak_bytes'])} | "
                f"{fmt_m(r['original_peak_bytes'])} | {same} |")
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
