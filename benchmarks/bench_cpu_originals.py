"""The C++ CPU backend against the reference and against the originals' algorithms, each case
in a fresh process, side by side (interleaved repetitions) on the same inputs.

    python benchmarks/bench_cpu_originals.py [--reps 15] [--json PATH] [--md PATH] [--only ops|methods]

* ops: ``greedy_select`` (maxmin, maxsum) and ``prune`` on the "cpu" backend against the
  "reference" backend, N = 576, k = 64, D ∈ {4096, 256}, B ∈ {1, 8}.  On a CPU with AVX-512 a
  second row forces the AVX2 paths (``VISPRUNE_CPU_ISA=avx2``, and ``ATEN_CPU_CAPABILITY=avx2``,
  ``MKL_ENABLE_INSTRUCTIONS=AVX2`` for torch's and MKL's kernels).
* methods, N = 576, keep 64, D ∈ {1024, 4096}, B ∈ {1, 8}, against the originals' algorithms:
  DivPrune's loop (the full ``1 - cos`` matrix from one float32 BLAS product, then per step an
  ``index_select`` of the selected rows, ``min``, ``argmax``; one image at a time, as the original
  is batch-size-1), the plain batched PyTorch of TrimTokenator and HoloV
  (``benchmarks/bench_methods.py``), and PruMerge / PruMerge+'s per-token merge loop.
  Every original is checked to select the same tokens before it is timed.

A fresh process per case: first-touch page faults of large temporaries count, as they do in a
serving process that calls a method once per request.
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys

N, M, K = 576, 64, 64


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- originals
def divprune_original(visual, keep):
    """DivPrune's selection as its code does it, one image at a time: the full ``1 - cos``
    matrix (one float32 BLAS product), then at each step the min over the selected rows."""
    import torch
    out = []
    for v in visual:
        vn = v / v.norm(dim=1, keepdim=True)
        dist = 1.0 - torch.mm(vn, vn.t())
        s = torch.empty(keep, dtype=torch.long)
        for i in range(keep):
            if i == 0:
                scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
            else:
                scores = torch.min(torch.index_select(dist, 0, s[:i]), dim=0).values
            s[i] = torch.argmax(scores)
        idx = s.sort().values
        out.append(idx)
    idx = torch.stack(out)
    return idx, visual.gather(1, idx[..., None].expand(-1, -1, visual.shape[-1]))


def prumerge_plus_original_loop(x, a, keys):
    """PruMerge+'s code path: IQR ratio, top-n, the raster samples not already kept (a Python
    membership test per sample), then the per-token merge loop (``original_merge``)."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_methods as bm
    n = a.shape[1]
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75]), dim=-1)
    count = (a > (q3 + 1.5 * (q3 - q1))[:, None]).sum(-1)
    idx_out, tok_out = [], []
    for b in range(a.shape[0]):
        ratio = count[b].item() / n
        idx = a[b].topk(max(1, int(n * ratio))).indices
        step = max(1, int(int(1 / ratio) / 3)) if ratio > 0 else n
        flat = idx.tolist()
        extra_idx = [t for t in range(0, n - 1, step) if t not in flat]
        idx = torch.cat([idx, torch.tensor(extra_idx, dtype=torch.long)])
        idx_out.append(idx)
        tok_out.append(bm.original_merge(x[b], a[b], keys[b], idx))
    return idx_out, tok_out


# --------------------------------------------------------------------------- one case
def _inputs(B, D, seed=0):
    import torch
    from visprune.methods import prumerge_cls_attention
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, N + 1, 1024, generator=g), torch.randn(B, N + 1, 1024, generator=g)
    for b in range(B):          # a few dominant tokens, as in CLIP's last layer
        hot = torch.randperm(N, generator=g)[:4 + 3 * b] + 1
        k[b, hot] += 8.0 * q[b, :1] / math.sqrt(1024)
    x = torch.randn(B, N, D, generator=g) + 0.3 * torch.randn(B, 1, D, generator=g)
    text = torch.randn(B, M, D, generator=g)
    return x, text, prumerge_cls_attention(q, k), k[:, 1:].contiguous()


def run_case(case, reps):
    import torch
    from visprune import ops
    from visprune.bench import measure
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_methods as bm
    from visprune.methods import divprune, holov, prumerge, trimtokenator

    B, D = case["B"], case["D"]
    x, text, a, keys = _inputs(B, D)
    name = case["name"]
    if case["kind"] == "op":
        if name == "prune":
            call = lambda be: lambda: ops.prune(x, text, K, backend=be)
            same = lambda r, p: torch.equal(r.indices, p.indices)
        else:
            obj = name.split(":")[1]
            call = lambda be: lambda: ops.greedy_select(x, K, objective=obj, backend=be)
            same = torch.equal
        ours, other = call("cpu"), call("reference")
    elif name == "divprune":
        ours, other = lambda: divprune(x, K), lambda: divprune_original(x, K)
        same = lambda r, p: torch.equal(r.indices, p[0])
    elif name == "trimtokenator":
        ours, other = lambda: trimtokenator(x, text, K), lambda: bm.plain_trimtokenator(x, text, K)
        same = lambda r, p: torch.equal(r.indices, p[0])
    elif name in ("prumerge", "prumerge+"):
        plus = name == "prumerge+"
        ours = lambda: prumerge(x, a, keys, plus=plus)
        other = (lambda: prumerge_plus_original_loop(x, a, keys)) if plus else \
            (lambda: bm.original_loop_prumerge(x, a, keys))
        same = lambda r, p: all(
            r.indices[b, :len(i)].tolist() == i.tolist()
            and torch.allclose(r.tokens[b, :len(t)].float(), t, rtol=1e-4, atol=1e-4)
            for b, (i, t) in enumerate(zip(*p)))
    else:
        ours = lambda: holov(x, a, K, redistribute=False)
        other = lambda: bm.plain_holov(x, a, K)
        same = lambda r, p: torch.equal(r.indices, p[0])
    # the first call of each is the check (and the warm-up), in this fresh process
    ok = bool(same(ours(), other()))
    t = measure({"ours": ours, "other": other}, torch.device("cpu"), min_reps=reps, max_reps=reps)
    return dict(case, same=ok,
                ours_median=t["ours"].median, ours_min=min(t["ours"].samples),
                other_median=t["other"].median, other_min=min(t["other"].samples),
                speedup_median=t["other"].median / t["ours"].median,
                speedup_min=min(t["other"].samples) / min(t["ours"].samples))


def cases(only, avx512):
    out = []
    if only in (None, "ops"):
        for D in (4096, 256):
            for B in (1, 8):
                for name in ("greedy_select:maxmin", "greedy_select:maxsum", "prune"):
                    for isa in (("native", "avx2") if avx512 else ("native",)):
                        out.append(dict(kind="op", name=name, B=B, D=D, isa=isa, against="reference"))
    if only in (None, "methods"):
        against = {"divprune": "DivPrune's loop (per image)", "trimtokenator": "plain batched",
                   "prumerge": "original merge loop", "prumerge+": "original merge loop",
                   "holov": "plain batched (crop loop)"}
        for name in ("divprune", "trimtokenator", "prumerge", "prumerge+", "holov"):
            for D in (1024, 4096):
                for B in (1, 8):
                    out.append(dict(kind="method", name=name, B=B, D=D, isa="native",
                                    against=against[name]))
    return out


def fmt(s):
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--only", choices=("ops", "methods"))
    p.add_argument("--names", nargs="+", help="only these ops / methods")
    p.add_argument("--skip", nargs="+", default=[], help="cases to leave out, as name:B:D")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case), args.reps)), flush=True)
        return
    import torch
    from visprune.bench.report import cpu_flags
    avx512 = "avx512f" in cpu_flags()
    env_info = dict(cpu=cpu_model(), avx512=avx512, threads=torch.get_num_threads(),
                    torch=torch.__version__, date=datetime.date.today().isoformat(),
                    load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, reps=args.reps)
    rows = []
    todo = [c for c in cases(args.only, avx512)
            if (not args.names or c["name"] in args.names) and f"{c['name']}:{c['B']}:{c['D']}" not in args.skip]
    for case in todo:
        env = dict(os.environ)
        if case["isa"] == "avx2":   # visprune's kernels, torch's and MKL's all kept to AVX2
            env.update(VISPRUNE_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
        proc = subprocess.run([sys.executable, __file__, "--reps", str(args.reps), "--case", json.dumps(case)],
                              capture_output=True, text=True, env=env)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        rows.append(r)
        print(f"{r['name']:22s} B={r['B']} D={r['D']:5d} {r['isa']:6s} ours {fmt(r['ours_median']):>10s} "
              f"{r['against']} {fmt(r['other_median']):>10s}  x{r['speedup_median']:.2f} "
              f"(min x{r['speedup_min']:.2f}) same={r['same']}", flush=True)
    env_info["load_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env_info, "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"CPU: {env_info['cpu']} (AVX-512: {'yes' if avx512 else 'no'}), "
                    f"{env_info['threads']} torch threads, torch {env_info['torch']}, {env_info['date']}, "
                    f"load average {env_info['load']:.1f} at start, {env_info['load_end']:.1f} at end; "
                    f"fresh process per case, {args.reps} interleaved repetitions.\n\n")
            f.write("| case | B | D | kernels | visprune median (min) | against | its median (min) "
                    "| speed-up median (of mins) | same selection |\n|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r['name']} | {r['B']} | {r['D']} | {r['isa']} | {fmt(r['ours_median'])} "
                        f"({fmt(r['ours_min'])}) | {r['against']} | {fmt(r['other_median'])} "
                        f"({fmt(r['other_min'])}) | {r['speedup_median']:.2f}× ({r['speedup_min']:.2f}×) "
                        f"| {'yes' if r['same'] else 'NO'} |\n")


if __name__ == "__main__":
    main()
