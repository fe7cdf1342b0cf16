"""Print the sm_90 compile results as one table and a summary line; exit 1 on any problem.

Each argument is ``RESULTS.json:LOG``: the JSON a compile step wrote, and its log (shown when
the step failed before writing its results).  Compilations of the same kernel whose signature
lines agree (they differ only in Triton's integer specialisations) share a row: the row shows
the largest registers, spills and shared memory among them and their count.

    python3 scripts/gpu_compile/report.py cuda.json:cuda.log triton.json:triton.log
"""
from __future__ import annotations

import json
import os
import sys

COLUMNS = ("toolchain", "kernel", "signature", "regs", "spill st/ld B", "smem B", "n")


def _tail(path, n=40):
    if not os.path.exists(path):
        return f"(no log at {path})"
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def load(args):
    runs, problems = [], []
    for arg in args:
        results, _, log = arg.partition(":")
        try:
            with open(results) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            problems.append(f"{results}: no results ({e}); the end of {log}:\n{_tail(log)}")
    return runs, problems


def rows(runs):
    groups = {}
    for run in runs:
        for r in run["records"]:
            key = (r["toolchain"], r.get("module", ""), r["kernel"], r["signature"])
            g = groups.setdefault(key, {"regs": 0, "st": 0, "ld": 0, "smem": 0, "n": 0,
                                        "first_call": r.get("first_call")})
            g["regs"] = max(g["regs"], r.get("regs", 0))
            g["st"] = max(g["st"], r.get("spill_stores", 0))
            g["ld"] = max(g["ld"], r.get("spill_loads", 0))
            g["smem"] = max(g["smem"], r["smem"])
            g["n"] += 1
    order = {run["toolchain"]: i for i, run in enumerate(runs)}
    return sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 0), kv[0][1:]))


def main(argv):
    runs, problems = load(argv)
    table = rows(runs)
    cells = [COLUMNS] + [(tc, kernel, sig, str(g["regs"]), f"{g['st']}/{g['ld']}", str(g["smem"]),
                          str(g["n"])) for (tc, _, kernel, sig), g in table]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    right = {3, 4, 5, 6}
    for i, c in enumerate(cells):
        print("  ".join(v.rjust(w) if j in right else v.ljust(w)
                        for j, (v, w) in enumerate(zip(c, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))

    spills = [(key, g) for key, g in table if g["st"] or g["ld"]]
    for (tc, module, kernel, sig), g in spills:
        where = f" (first reached by: {g['first_call']})" if g.get("first_call") else ""
        problems.append(f"{tc} {kernel} spills {g['st']} B stores / {g['ld']} B loads "
                        f"[{sig}]{where}")
    for run in runs:
        for r in run["records"]:
            if r.get("error"):
                problems.append(f"{r['toolchain']} {r['kernel']}: {r['error']}")
        for e in run["errors"]:
            problems.append(f"{e['toolchain']} {e['what']}: {e['error']}\n"
                            + "\n".join(e[k] for k in ("output", "trace") if e.get(k)))
    print()
    for p in problems:
        print("FAIL", p)
    steps = ", ".join(f"{run['toolchain']}: {len(run['records'])} kernels compiled "
                      f"({run['calls']} {'launcher calls' if 'triton' in run['toolchain'] else 'sources'}, "
                      f"{run['seconds']:.0f} s)" for run in runs)
    n_errors = len(problems) - len(spills)
    verdict = "OK" if not problems else "FAILED"
    print(f"sm_90 compile check {verdict}: {steps}; {len(spills)} kernel rows with spills, "
          f"{n_errors} errors")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
