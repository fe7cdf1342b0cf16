"""The GPU check (``scripts/gpu_check.sh``, ``scripts/gpu/``) without a GPU, so that it cannot rot
before a GPU comes: its dry run (stages in order, budgets within 8 minutes, every command's
script present and parsing, every driver answering), the budget / kill / partial-result
mechanism on stand-in commands, and the correctness driver's CPU smoke and comparisons."""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import torch

import visprune
from visprune import bench, methods, ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORDER = ["machine", "build", "correct", "sanitize", "bench", "e2e"]


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = load("gpu_check", ROOT / "scripts" / "gpu" / "check.py")
summary = load("gpu_summary", ROOT / "scripts" / "gpu" / "summary.py")
correctness = load("gpu_correctness", ROOT / "scripts" / "gpu" / "correctness.py")


def dry_run(*args):
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", *args],
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- the plan
def test_dry_run_prints_a_plan_that_fits_in_eight_minutes():
    r = dry_run()
    assert r.returncode == 0, r.stdout + r.stderr
    stages = re.findall(r"^\[stage\] (\w+) (\d+) s", r.stdout, re.M)
    assert [name for name, _ in stages] == ORDER
    assert sum(int(b) for _, b in stages) <= 480
    assert "dry run: ok" in r.stdout
    # every command is shown with its budget, and the stage budgets are their commands'
    commands = re.findall(r"^  \[\s*(\d+) s\] ", r.stdout, re.M)
    assert sum(map(int, commands)) == sum(int(b) for _, b in stages)
    # pytest collects only the files with gpu-marked tests
    pytest_line = next(ln for ln in r.stdout.splitlines() if "gpu tests:" in ln)
    assert "tests/test_backends.py" in pytest_line and "tests/test_fuzz.py" not in pytest_line


def test_budget_scales_every_stage():
    full = check.plan(ROOT, False, [])
    half = check.scaled(check.plan(ROOT, False, []), 240)
    assert sum(s.budget for s in half) <= 240
    assert [s.name for s in half] == ORDER
    for a, b in zip(full, half):
        assert 0 < b.budget < a.budget


def test_dry_run_fails_on_a_missing_a_broken_and_a_failing_driver(tmp_path):
    """A copy of the checkout whose correctness driver does not parse, whose end-to-end script
    is gone and whose attention benchmark exits non-zero: each is named, exit status 1."""
    for name in ("visprune", "tests", "triton_kernels", "setup.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__", "results"))
    driver = tmp_path / "scripts" / "gpu" / "correctness.py"
    driver.write_text(driver.read_text().replace("def run(", "def run(:", 1))
    (tmp_path / "benchmarks" / "e2e.py").unlink()
    (tmp_path / "benchmarks" / "bench_attention.py").write_text("import sys\nsys.exit(3)\n")
    r = dry_run("--root", str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    problems = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBLEM: ")]
    assert any("scripts/gpu/correctness.py: does not compile" in p for p in problems), problems
    assert any("benchmarks/e2e.py: missing" in p for p in problems), problems
    assert any("bench_attention.py --help` exited 3" in p for p in problems), problems
    assert "dry run: ok" not in r.stdout


# --------------------------------------------------------------------------- running a plan
def alive(pid, wait=3.0):
    """Whether ``pid`` still runs (a zombie waiting for its reaper does not count)."""
    end = time.monotonic() + wait
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                running = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
        if not running or time.monotonic() > end:
            return running
        time.sleep(0.1)


def _py(code):
    return check.Command("x", ["{py}", "-c", code], 1)


def test_each_command_stops_at_its_deadline_and_keeps_what_it_wrote(tmp_path):
    """A command past its deadline is killed with its children; the JSON it wrote before is
    kept; a missing tool is skipped; the next commands still run; the results are written."""
    child = tmp_path / "child.pid"
    slow = check.Command(
        "slow", ["{py}", "-c",
                 "import json, subprocess, sys, time\n"
                 "json.dump({'rows': 1}, open(sys.argv[1] + '/slow.json', 'w'))\n"
                 "p = subprocess.Popen(['sleep', '60'])\n"
                 f"open({str(child)!r}, 'w').write(str(p.pid))\n"
                 "print('partial', flush=True)\n"
                 "time.sleep(60)", "{work}"], 2, output="slow.json")
    fine = check.Command("fine", ["{py}", "-c", "print('fine')"], 2)
    failing = check.Command("failing", ["{py}", "-c", "raise SystemExit(4)"], 2)
    missing = check.Command("missing", ["no-such-tool-here", "--version"], 2)
    stages = [check.Stage("one", "", [slow, fine]), check.Stage("two", "", [failing, missing])]
    t0 = time.monotonic()
    rc = check.run_plan(stages, ROOT, tmp_path / "out", total=8)
    wall = time.monotonic() - t0
    assert rc == 1
    # the slow command had 2 s (+ the grace kill); the others took what they took
    assert wall < 2 + check.GRACE + 6, wall
    assert not alive(int(child.read_text())), "the command's child outlived it"
    state = json.loads((tmp_path / "out" / "results.json").read_text())
    one, two = state["stages"]
    assert one["commands"][0]["status"].startswith("timed out")
    assert one["commands"][0]["result"] == {"rows": 1}
    assert one["commands"][1]["status"] == "ok"
    assert two["commands"][0]["status"] == "failed (exit 4)"
    assert two["commands"][1]["status"] == "skipped: no-such-tool-here not found"
    logs = (tmp_path / "out" / "logs.txt").read_text()
    assert "partial" in logs and "fine" in logs
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| one | slow |" in summary and "timed out" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "logs.txt", "results.json", "summary.md"]


def test_a_command_gets_the_time_earlier_ones_left(tmp_path):
    """Deadlines are cumulative: a quick first command leaves its unused budget to the next."""
    quick = _py("pass")
    quick.budget = 4
    needs_more = _py("import time; time.sleep(2.5)")
    needs_more.budget = 1
    rc = check.run_plan([check.Stage("s", "", [quick, needs_more])], ROOT, tmp_path, total=5)
    state = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0, state["stages"]
    assert state["stages"][0]["commands"][1]["limit_s"] > 2.5


def test_sigterm_to_the_check_stops_it_and_writes_what_there_is(tmp_path):
    long = _py("import time; time.sleep(30)")
    long.budget = 30
    after = _py("pass")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        rc = check.run_plan([check.Stage("s", "", [long, after])], ROOT, tmp_path, total=31)
    finally:
        timer.cancel()
    assert rc == 1
    state = json.loads((tmp_path / "results.json").read_text())
    statuses = [c["status"] for c in state["stages"][0]["commands"]]
    assert statuses == ["stopped", "skipped: the check was stopped"]
    assert "stopped from outside" in (tmp_path / "summary.md").read_text()


# --------------------------------------------------------------------------- the driver
def run_driver(tmp_path, *args):
    out = tmp_path / "correct.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu" / "correctness.py"),
                        "--device", "cpu", *args, "--json", str(out)], capture_output=True,
                       text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["summary"]["complete"] and not res["summary"]["failures"]
    return res


def test_correctness_driver_cpu_smoke_covers_every_op_and_method(tmp_path):
    res = run_driver(tmp_path, "--dtypes", "float32")
    backends = [b for b, why in visprune.available_backends("cpu").items()
                if why == "ok" and b != "reference"]
    assert res["environment"]["checked_backends"] == backends
    # every op and method but the methods' token counts (integer arithmetic, no tensors)
    wanted = ([n for n in ops.__all__ if not n.endswith("Result")]        # not the result types
              + [n for n in methods.__all__ if not n.endswith("_count")])
    for name in wanted:
        mine = [rec for rec in res["records"] if rec["name"] == name]
        assert mine and all(rec["status"] in ("ok", "unsupported") for rec in mine), name
        with_backend = {rec["backend"] for rec in mine} - {"(none)"}
        assert not with_backend or with_backend == set(backends), (name, with_backend)


def test_correctness_driver_merges_its_workers(tmp_path):
    res = run_driver(tmp_path, "--jobs", "2", "--only", "mi_scores")      # fp32 and fp16
    assert {(rec["shape"], rec["dtype"]) for rec in res["records"]} == {
        ("tiny", "float32"), ("tiny", "float16")}
    assert {rec["name"] for rec in res["records"]} == {"mi_scores"}


def test_compare_tells_matches_from_mismatches():
    idx = torch.tensor([[3, 1, 2]])
    assert correctness.compare(idx, idx.clone()) is None
    assert "differs first at (0, 1)" in correctness.compare(torch.tensor([[3, 2, 1]]), idx)
    x = torch.randn(4, 8).half()
    one_ulp = (x.view(torch.int16) + 1).view(torch.float16)        # one rounding away
    assert correctness.compare(one_ulp, x) is None
    assert correctness.compare(x * 1.01, x) is not None
    scores = torch.randn(2, 9)
    assert correctness.compare(scores + 1e-3, scores) is not None
    res = visprune.PruneResult(x[None], idx, torch.tensor([3]))
    wrong = visprune.PruneResult(x[None], idx, torch.tensor([2]))
    assert "output.lengths" in correctness.compare(wrong, res)
    assert "float32" in correctness.compare(scores.double(), scores)


def test_driver_records_the_first_failure_of_a_pair_and_skips_its_rest(tmp_path):
    def scores(i, b):
        s = ops.mi_scores(i["visual"], i["text"], backend="reference")
        return s if b == "reference" else s + 1.0        # backend "fake" is off by one

    cases = [correctness.Case("mi_scores", "off", scores),
             correctness.Case("mi_scores", "off again", scores),
             correctness.Case("divprune", "", lambda i, b: methods.divprune(
                 i["visual"], i["shape"].k, backend="reference"))]
    out = tmp_path / "r.json"
    results = correctness.Results(str(out), {})
    lines = []
    ok = correctness.run(cases, [("tiny", "float32")], ["fake"], torch.device("cpu"), results,
                         log=lines.append)
    assert not ok
    recs = json.loads(out.read_text())["records"]
    assert [(r["name"], r["status"]) for r in recs] == [("mi_scores", "mismatch"),
                                                          ("divprune", "ok")]
    assert "output: " in recs[0]["detail"]
    assert results.summary()["skipped_after_failure"] == 1


# --------------------------------------------------------------------------- the summary
def _state_with_results(tmp_path):
    """A finished plan's state whose results have the shapes the real commands write: bench
    rows from a real (CPU) run, relabelled as the GPU rows the targets read."""
    path = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--shapes", "tiny", "--batch", "1",
                       "--ops", "prune", "gather_compact", "--min-reps", "1", "--max-reps", "1",
                       "--target-seconds", "0", "--quiet", "--json", str(path)]) == 0
    rows = []
    for r in json.loads(path.read_text()):
        if r["backend"] == "cpu":
            r = dict(r, backend="triton")
        for B, ms, speedup, fraction in ((1, 0.04, 80.0, 0.9), (64, 2.0, 9.0, 0.3)):
            rows.append(dict(r, family="llava15", B=B, D=4096, time_ms=ms,
                             speedup_vs_reference=speedup if r["backend"] != "reference" else 1.0,
                             fraction_of_roofline=fraction, fraction_of_copy_bw=fraction,
                             achieved_GBps=2000.0, launches=3, shape=f"llava15 B={B}"))
    e2e = [{"method": "none", "keep": None, "kept": 576.0, "prefill_ms": 60.0, "speedup": 1.0,
            "prune_ms": 0.0, "prune_share": 0.0},
           {"method": "trimtokenator", "keep": 64, "kept": 64.0, "prefill_ms": 20.0,
            "speedup": 3.0, "prune_ms": 0.4, "prune_share": 0.02}]
    attention = {"rows": [{"L": 640, "backend": "triton", "dtype": "float16", "op_ms": 0.05,
                           "sdpa_ms": 0.04, "eager_ms": 0.5}]}

    def cmd(label, result, **extra):
        return dict({"label": label, "budget_s": 10, "wall_s": 1.0, "status": "ok",
                     "result": result}, **extra)

    log = tmp_path / "pytest.log"
    log.write_text("[gw0] [ 50%] PASSED tests/test_backends.py::test_gpu_a[x]\n"
                   "[gw1] [100%] FAILED tests/test_backends.py::test_gpu_b[y]\n"
                   "FAILED tests/test_backends.py::test_gpu_b[y] - AssertionError: indices\n"
                   "==== 1 failed, 1 passed in 9.0s ====\n")
    mismatch = {"name": "divprune", "variant": "", "shape": "tiny", "dtype": "bfloat16",
                "backend": "cuda", "status": "mismatch", "detail": "output.indices: differs"}
    correct = {"environment": {"backends": {"triton": "ok"}}, "records": [mismatch],
               "summary": {"ok": 5, "mismatch": 1, "complete": False, "failures": [mismatch]}}
    return {"plan": {"budget_s": 480}, "started": "now", "wall_s": 400.0, "stages": [
        {"name": "correct", "commands": [cmd("ops+methods", correct),
                                         cmd("gpu tests", None, log=str(log))]},
        {"name": "bench", "commands": [cmd("llava15", rows)]},
        {"name": "e2e", "commands": [cmd("attention", attention), cmd("llava", e2e),
                                     cmd("qwen2.5-vl", None)]}]}


def test_targets_are_judged_from_the_measured_rows(tmp_path):
    state = _state_with_results(tmp_path)
    judged = summary.targets(state)

    def met(prefix, backend):
        found = [t["met"] for t in judged if t["target"].startswith(prefix)
                 and t["backend"] == backend]
        assert len(found) == 1, (prefix, backend, judged)
        return found[0]

    assert met("prune, LLaVA-1.5, B=1: ≤ 50 µs", "triton") is True             # 40 µs
    assert met("prune, LLaVA-1.5, B=1: ≥ 50×", "triton") is True               # 80×
    assert met("prune, LLaVA-1.5, B=64", "triton") is False                    # 30 % of bound
    assert met("gather_compact", "triton") is False                            # 30 % at B=64
    assert met("greedy_select, N=16384", "-") is None                          # not measured
    assert met("received_attention", "triton") is False                        # 50 vs 40 µs
    assert met("e2e LLaVA-1.5-7B shapes, keep 64: prefill", "default") is True  # 3×
    assert met("e2e LLaVA-1.5-7B shapes, keep 64: pruning", "default") is False  # 2 %
    text = summary.summarize(state)
    for heading in ("## Stages", "## DESIGN.md targets", "## Correctness", "## Ops",
                    "## End to end"):
        assert heading in text
    assert "| met |" in text and "NOT met" in text
    assert "{'PASSED': 1, 'FAILED': 1, 'ERROR': 0, 'SKIPPED': 0}; 1 failed, 1 passed" in text
    assert "FAILED tests/test_backends.py::test_gpu_b[y] - AssertionError" in text
    assert "5 ok, 1 mismatch" in text and "(incomplete)" in text
    assert "mismatch: divprune [] tiny bfloat16 cuda: output.indices: differs" in text
    assert "## Ops" not in summary.summarize(state, short=True)


# --------------------------------------------------------------------------- transformers overlay
def _wheel(folder: pathlib.Path, name: str, version: str) -> pathlib.Path:
    """A minimal pure-Python wheel of a package ``name`` whose ``__version__`` is ``version``."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_overlay_installs_the_carried_transformers_first_on_the_path(tmp_path, monkeypatch,
                                                                     capsys):
    """An installed transformers older than the integrations need: the carried wheel goes into
    the overlay, and every command's environment imports it first; without wheels the check
    says the end-to-end rows will fail and goes on; a recent one needs nothing."""
    versions = {"transformers": "5.17.0", "packaging": "24.0", "vpstandin": None}
    monkeypatch.setattr(check, "_version", versions.get)
    assert check.overlay(tmp_path) == 0
    assert "the end-to-end rows will fail" in capsys.readouterr().out
    assert not (tmp_path / check.OVERLAY).exists()

    (tmp_path / check.WHEELS).mkdir()
    _wheel(tmp_path / check.WHEELS, "packaging", "0.1")     # older than the installed one: left
    _wheel(tmp_path / check.WHEELS, "vpstandin", "1.0")     # not installed: goes in
    assert check.overlay(tmp_path) == 0
    assert "no transformers wheel" in capsys.readouterr().out
    assert not (tmp_path / check.OVERLAY).exists()
    _wheel(tmp_path / check.WHEELS, "transformers", "99.1.0")
    assert check.overlay(tmp_path) == 0
    assert ("installed ['transformers-99.1.0-py3-none-any.whl', "
            "'vpstandin-1.0-py3-none-any.whl']") in capsys.readouterr().out
    assert not (tmp_path / check.OVERLAY / "packaging").exists()
    env = check.child_env(gpu=True, root=tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / check.OVERLAY)
    got = subprocess.run([sys.executable, "-c", "import transformers as t; print(t.__version__,"
                          " t.__file__)"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert got[0] == "99.1.0" and got[1].startswith(str(tmp_path / check.OVERLAY))

    monkeypatch.setattr(check, "_version", lambda package: "5.25.0")
    assert check.overlay(tmp_path) == 0
    assert "no overlay needed" in capsys.readouterr().out
    assert "PYTHONPATH" not in check.child_env(gpu=True, root=tmp_path / "elsewhere") or \
        str(tmp_path) not in check.child_env(gpu=True, root=tmp_path / "elsewhere")["PYTHONPATH"]
