"""The GPU check's ``summary.md``: the machine, every stage's status and wall time, the DESIGN.md
targets met / not met with their numbers, the op table and the end-to-end rows, from the state
``scripts/gpu/check.py`` keeps (each command's status, log and the JSON it wrote)."""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional

REFERENCE = ("reference", "reference_compiled")


def _commands(state: Dict[str, Any], stage: str) -> List[Dict[str, Any]]:
    return next((s["commands"] for s in state["stages"] if s["name"] == stage), [])


def _result(state: Dict[str, Any], stage: str, label: str) -> Any:
    return next((c.get("result") for c in _commands(state, stage) if c["label"] == label), None)


def _log(state: Dict[str, Any], stage: str, label: str) -> str:
    for c in _commands(state, stage):
        if c["label"] == label and c.get("log"):
            try:
                with open(c["log"], errors="replace") as f:
                    return f.read()
            except OSError:
                return ""
    return ""


def _us(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.3g} ms" if ms < 1e3 else f"{ms / 1e3:.2f} s"


def _x(ratio: Optional[float]) -> str:
    if not ratio:
        return "-"
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.2g}×"


def bench_rows(state: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for c in _commands(state, "bench"):
        if isinstance(c.get("result"), list):
            rows += c["result"]
    return rows


# --------------------------------------------------------------------------- targets
def targets(state: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One line per DESIGN.md GPU target and backend: what was measured and whether it meets it
    (None: not measured)."""
    rows = [r for r in bench_rows(state) if r.get("backend") not in REFERENCE
            and r.get("time_ms") is not None]
    out: List[Dict[str, Any]] = []

    def add(target, found: Iterable[Dict[str, Any]], measure, met):
        found = list(found)
        for r in found:
            value = measure(r)
            out.append({"target": target, "backend": r["backend"], "shape": r.get("shape"),
                        "measured": value[0], "met": None if value[1] is None else met(value[1])})
        if not found:
            out.append({"target": target, "backend": "-", "shape": "-",
                        "measured": "not measured", "met": None})

    def pick(op, family, B, D):
        return [r for r in rows if r["op"].startswith(op) and r["family"] == family
                and r["B"] == B and r["D"] == D]

    def speedup(r):
        s = r.get("speedup_vs_reference")
        return (f"{_x(s)} ({_us(r['time_ms'])})" if s else "no reference time", s)

    add("prune, LLaVA-1.5, B=1: ≤ 50 µs on an H100-class GPU", pick("prune", "llava15", 1, 4096),
        lambda r: (_us(r["time_ms"]), r["time_ms"]), lambda ms: ms <= 0.050)
    add("prune, LLaVA-1.5, B=1: ≥ 50× the reference", pick("prune", "llava15", 1, 4096),
        speedup, lambda s: s >= 50)
    add("prune, LLaVA-1.5, B=64: within 2× of read-once + Gram at peak",
        pick("prune", "llava15", 64, 4096),
        lambda r: (f"{100 * r['fraction_of_roofline']:.0f} % of that bound ({_us(r['time_ms'])})",
                   r.get("fraction_of_roofline")), lambda f: f >= 0.5)
    add("gather_compact: ≥ 80 % of the measured copy bandwidth (B=64)",
        pick("gather_compact", "llava15", 64, 4096) + pick("gather_compact", "video", 64, 3584),
        lambda r: (f"{100 * r['fraction_of_copy_bw']:.0f} % ({r['achieved_GBps']:.0f} GB/s)",
                   r.get("fraction_of_copy_bw")), lambda f: f >= 0.8)
    add("greedy_select, N=16384: runs, ≥ 20× the reference",
        pick("greedy_select", "video", 1, 3584), speedup, lambda s: s >= 20)

    att = [r for r in (_result(state, "e2e", "attention") or {}).get("rows", [])
           if r.get("L") == 640]
    add("received_attention, LLaVA-1.5 prefill: ≤ the layer's SDPA call", att,
        lambda r: (f"{_us(r.get('op_ms'))} vs SDPA {_us(r.get('sdpa_ms'))}",
                   r["op_ms"] / r["sdpa_ms"] if r.get("op_ms") and r.get("sdpa_ms") else None),
        lambda ratio: ratio <= 1.0)

    llava = [dict(r, backend="default") for r in _result(state, "e2e", "llava") or []
             if r.get("keep") == 64]
    add("e2e LLaVA-1.5-7B shapes, keep 64: prefill ≥ 2.5× unpruned", llava,
        lambda r: (f"{r['speedup']:.2f}× ({r['prefill_ms']:.1f} ms)", r["speedup"]),
        lambda s: s >= 2.5)
    add("e2e LLaVA-1.5-7B shapes, keep 64: pruning < 1 % of the pruned prefill", llava,
        lambda r: (f"{100 * r['prune_share']:.2f} % ({r['prune_ms']:.3f} ms)", r["prune_share"]),
        lambda f: f < 0.01)
    return out


# --------------------------------------------------------------------------- sections
def _machine(state: Dict[str, Any]) -> List[str]:
    m = _result(state, "machine", "machine") or {}
    gpu = m.get("gpu") or m.get("nvidia_smi") or "unknown GPU"
    return [f"# visprune GPU check: {gpu}, {m.get('date', state.get('started', ''))}", "",
            f"torch {m.get('torch', '?')} (CUDA {m.get('cuda', '?')}), triton "
            f"{m.get('triton', '?')}, transformers {m.get('transformers', '?')}, python "
            f"{m.get('python', '?')}, {m.get('cpus', '?')} CPUs; nvidia-smi: "
            f"{m.get('nvidia_smi', '?')}; nvcc: {' '.join(m.get('nvcc') or ['?'])}; "
            f"compute-sanitizer: {' '.join(m.get('compute-sanitizer') or ['?'])}", "",
            f"Plan {state['plan']['budget_s']} s, ran {state.get('wall_s', state.get('elapsed_s'))}"
            f" s." + (f" {state['stopped']}." if state.get("stopped") else "")]


def _stages(state: Dict[str, Any]) -> List[str]:
    lines = ["", "## Stages", "", "| stage | command | budget | wall | status |",
             "| --- | --- | ---: | ---: | --- |"]
    for s in state["stages"]:
        for c in s["commands"]:
            lines.append(f"| {s['name']} | {c['label']} | {c['budget_s']} s | {c['wall_s']} s "
                         f"| {c['status']} |")
    return lines


def _correctness(state: Dict[str, Any]) -> List[str]:
    lines = ["", "## Correctness", ""]
    for stage, label in (("correct", "ops+methods"), ("sanitize", "memcheck"),
                         ("sanitize", "racecheck")):
        res = _result(state, stage, label)
        if not isinstance(res, dict):
            lines.append(f"- {stage}/{label}: no results")
            continue
        s = res.get("summary", {})
        backends = res.get("environment", {}).get("backends", {})
        lines.append(f"- {stage}/{label}: {s.get('ok', 0)} ok, {s.get('mismatch', 0)} mismatch, "
                     f"{s.get('error', 0)} error, {s.get('unsupported', 0)} unsupported, "
                     f"{s.get('uncovered', 0)} uncovered, {s.get('skipped_after_failure', 0)} "
                     f"skipped after a failure"
                     + ("" if s.get("complete") else " (incomplete)")
                     + (f"; backends: {backends}" if label == "ops+methods" else ""))
        for f in s.get("failures", [])[:12]:
            detail = (f.get("detail") or "").splitlines()[:1]
            lines.append(f"  - {f['status']}: {f['name']} [{f.get('variant', '')}] "
                         f"{f.get('shape', '')} {f.get('dtype', '')} {f.get('backend', '')}: "
                         f"{detail[0] if detail else ''}")
    log = _log(state, "correct", "gpu tests")
    # one line per test with -v: "tests/x.py::t PASSED [ 1%]", or with xdist
    # "[gw0] [  1%] PASSED tests/x.py::t" (the short summary's "FAILED tests/..." lines are not)
    outcomes = re.findall(r"^(?:\[gw\d+\] \[\s*\d+%\] (\w+) tests/|tests/\S+ (\w+))", log, re.M)
    counts = {w: sum(w in pair for pair in outcomes) for w in ("PASSED", "FAILED", "ERROR",
                                                                "SKIPPED")}
    last = [ln.strip("= ") for ln in log.splitlines() if re.match(r"=+ .* in [\d.]+s", ln)]
    lines.append(f"- gpu-marked tests: {counts}" + (f"; {last[-1]}" if last else
                                                   " (no final line: cut or crashed)"))
    lines += [f"  - {ln}" for ln in log.splitlines() if ln.startswith(("FAILED ", "ERROR "))][:10]
    for label in ("memcheck", "racecheck"):
        found = [ln.strip("= ") for ln in _log(state, "sanitize", label).splitlines()
                 if "SUMMARY:" in ln]
        lines.append(f"- compute-sanitizer {label}: " + ("; ".join(found) if found else
                                                          "no summary line"))
    return lines


def _targets(state: Dict[str, Any]) -> List[str]:
    lines = ["", "## DESIGN.md targets", "", "| target | backend | measured | met |",
             "| --- | --- | --- | --- |"]
    for t in targets(state):
        met = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['backend']} | {t['measured']} | {met} |")
    return lines


def _ops(state: Dict[str, Any]) -> List[str]:
    rows = bench_rows(state)
    if not rows:
        return ["", "## Ops", "", "no benchmark rows"]
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["backend"] not in REFERENCE))
    head = "| op | shape | reference | " + " | ".join(
        f"{b} (launches, vs ref, check)" for b in backends) + " |"
    lines = ["", "## Ops (median per call, cold L2; launches per call)", "", head,
             "| --- | --- | ---: | " + " | ".join("---:" for _ in backends) + " |"]
    cases: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["shape"]), {})[r["backend"]] = r
    for (op, shape), by in cases.items():
        ref = by.get("reference", {})
        cells = []
        for b in backends:
            r = by.get(b, {})
            if r.get("time_ms") is None:
                cells.append(r.get("status", "-"))
                continue
            launches = "-" if r.get("launches") is None else r["launches"]
            cells.append(f"{_us(r['time_ms'])} ({launches}, {_x(r.get('speedup_vs_reference'))}, "
                         f"{r.get('check', '-')})")
        ref_cell = _us(ref.get("time_ms")) if ref.get("time_ms") else ref.get("status", "-")
        lines.append(f"| {op} | {shape} | {ref_cell} | " + " | ".join(cells) + " |")
    return lines


def _e2e(state: Dict[str, Any]) -> List[str]:
    lines = ["", "## End to end (prefill; random bf16 weights, 7B shapes)", "",
             "| family | method | keep | kept | prefill | speed-up | pruning | share |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in ("llava", "qwen2.5-vl"):
        for r in _result(state, "e2e", label) or []:
            lines.append(f"| {label} | {r['method']} | {r['keep'] or '-'} | {r['kept']:.0f} | "
                         f"{r['prefill_ms']:.1f} ms | {r['speedup']:.2f}× | "
                         f"{r['prune_ms']:.3f} ms | {100 * r['prune_share']:.2f} % |")
    for r in (_result(state, "e2e", "attention") or {}).get("rows", []):
        lines.append("")
        lines.append(f"received_attention at L={r['L']} (B=1, 32 heads of 128, {r['dtype']}): "
                     f"op {_us(r.get('op_ms'))}, SDPA {_us(r.get('sdpa_ms'))}, eager map "
                     f"{_us(r.get('eager_ms'))}")
    return lines


def summarize(state: Dict[str, Any], short: bool = False) -> str:
    """The markdown summary; ``short``: without the op and end-to-end tables (for a terminal
    that shows only the end of the output)."""
    parts = _machine(state) + _stages(state) + _targets(state) + _correctness(state)
    if not short:
        parts += _ops(state) + _e2e(state)
    return "\n".join(parts) + "\n"
