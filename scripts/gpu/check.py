"""The GPU check: one command on a CUDA machine, its stages run in order of value, each within a
time budget, the whole plan within 8 minutes (``bash scripts/gpu_check.sh`` runs this).

    python3 scripts/gpu/check.py [--budget SECONDS] [--out DIR] [--dry-run] [--root DIR]

Every command has a budget; a command runs until the plan's cumulative deadline for it (its own
budget plus whatever the commands before it left unused), then its process group gets SIGTERM
and, 5 s later, SIGKILL.  Its log up to then is kept, the JSON it wrote so far (the drivers
rewrite theirs after every case or row) is read, the stage is marked "timed out", and the next
command starts.  A tool that is not installed (compute-sanitizer) skips its command, recorded
as "skipped: not found".  ``--budget`` scales every budget (default 480 s in all).

Results: ``summary.md`` (machine, stage status and wall times, the DESIGN targets met / not met,
the op table, the end-to-end rows), ``results.json`` (the plan, every command's status and the
JSON it wrote) and ``logs.txt`` (every command's log, in order), rewritten after every command,
in ``$OUT`` when that variable is set (a lease copies back at most 8 files), else in
``--out`` or ``benchmarks/results/gpu-<date>/``.  Intermediate files go to a temporary folder.

**transformers.**  The model integrations need transformers >= 5.23 (``mm_encoder_outputs``);
the GPU machine's may be older and it has no package registry.  Before the lease, on a machine
with one, ``--fetch-wheels`` downloads the wheels of :data:`WHEEL_PINS` (pure Python, ~14 MB)
into ``.gpu_wheels/``; the lease carries that folder, and the build stage's first command
(``--overlay``) installs them without dependencies into ``.gpu_overlay/`` when the installed
transformers is older (huggingface_hub only where the installed one is older than the wheel),
which every later command then has first on its ``PYTHONPATH``.  With a recent enough
transformers it does nothing; without wheels it says that the end-to-end rows will fail, and the
rest runs.

``--dry-run`` (CI, no GPU) prints the plan and checks it: the budgets sum to at most 480 s (or
``--budget``), every script a command runs exists and parses (``bash -n``, Python's ``compile``),
every Python driver answers ``--help`` / ``--plan``, every external module imports; exit status
1 on any problem.  ``--root`` checks or runs the plan of another checkout.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from summary import summarize  # noqa: E402  (scripts/gpu/summary.py)

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOTAL_BUDGET = 480          # seconds: a lease's 10-minute command, less the machine's start
GRACE = 5                   # seconds between SIGTERM and SIGKILL
SANITIZER = "compute-sanitizer"
WHEELS = ".gpu_wheels"      # carried to the lease: transformers (+ huggingface_hub) wheels
OVERLAY = ".gpu_overlay"    # where --overlay installs them; first on every command's path
TRANSFORMERS = (5, 23)      # the oldest transformers the integrations work with
# what --fetch-wheels downloads: the transformers the vLLM environment pins, and the oldest
# huggingface_hub it accepts (hub 2.x needs httpx2, which an older machine will not have)
WHEEL_PINS = ("transformers==5.24.0", "huggingface_hub==1.31.0")


@dataclass
class Command:
    label: str
    argv: List[str]                   # "{py}" is the interpreter, "{work}" the scratch folder
    budget: int                       # seconds
    env: Dict[str, str] = field(default_factory=dict)
    probe: Optional[List[str]] = None     # the dry run's cheap call of the same driver
    output: Optional[str] = None      # the JSON file it writes, relative to {work}


@dataclass
class Stage:
    name: str
    why: str
    commands: List[Command]

    @property
    def budget(self) -> int:
        return sum(c.budget for c in self.commands)


# --------------------------------------------------------------------------- the plan
def sanitizer_kernel_filter() -> List[str]:
    """racecheck on the greedy kernel alone where this compute-sanitizer can filter kernels."""
    tool = shutil.which(SANITIZER)
    if tool is None:
        return []
    try:
        text = subprocess.run([tool, "--help"], capture_output=True, text=True,
                              timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return ["--kernel-name", "kns=greedy_kernel"] if "--kernel-name" in text else []


def gpu_test_files(root: pathlib.Path) -> List[str]:
    """The test files with gpu-marked tests.  Only they are collected: a module that cannot be
    imported on the GPU machine (its transformers is older than CI's) would otherwise stop a
    ``-x`` run at collection, before any test."""
    found = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                   if re.search(r"pytest\.mark\.gpu\b", p.read_text()))
    return found or ["tests"]


DRIVER = "scripts/gpu/correctness.py"


def driver(label: str, prefix: List[str], args: List[str], budget: int, output: str,
           env: Optional[Dict[str, str]] = None) -> Command:
    """The correctness driver with ``args`` (behind ``prefix``: a sanitizer); the dry run checks
    the same arguments with ``--plan``."""
    return Command(label, [*prefix, "{py}", DRIVER, *args, "--json", "{work}/" + output], budget,
                   env or {}, probe=["{py}", DRIVER, "--plan", *args], output=output)


def plan(root: pathlib.Path, has_xdist: bool, kernel_filter: List[str]) -> List[Stage]:
    """The stages in order, with budgets summing to :data:`TOTAL_BUDGET`."""
    py = "{py}"
    bench = [py, "-m", "visprune.bench", "--device", "cuda", "--quick", "--no-compile",
             "--target-seconds", "0.25", "--min-reps", "5", "--max-reps", "30", "--quiet"]
    e2e = [py, "benchmarks/e2e.py", "--device", "cuda", "--methods", "trimtokenator", "--keeps",
           "64", "--dtype", "bfloat16", "--reps", "5", "--gen-reps", "0"]
    memcheck = [SANITIZER, "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "20",
                "--report-api-errors", "no"]
    racecheck = [SANITIZER, "--tool", "racecheck", "--error-exitcode", "86", "--print-limit",
                 "20", *kernel_filter]
    return [
        Stage("machine", "what ran: the GPU, its driver, torch / CUDA / Triton, the tools; "
              "recorded even if nothing else works", [
                  Command("machine", [py, "scripts/gpu/check.py", "--machine-info",
                                      "{work}/machine.json"], 12,
                          probe=[py, "scripts/gpu/check.py", "--help"],
                          output="machine.json")]),
        Stage("build", "everything after needs it: a carried transformers where the "
              "machine's is too old for the integrations, the package installed without the "
              "extension first (seconds; later stages run even if the build is cut), then the "
              "extension for sm_90 only, one compile job per core", [
                  Command("transformers", [py, "scripts/gpu/check.py", "--overlay"], 10,
                          probe=[py, "scripts/gpu/check.py", "--help"]),
                  Command("install", [py, "-m", "pip", "install", "--no-deps",
                                      "--no-build-isolation", "--disable-pip-version-check",
                                      "--root-user-action=ignore", "-e", "."], 20,
                          env={"VISPRUNE_NO_EXT": "1"}),
                  Command("extension", [py, "setup.py", "build_ext", "--inplace"], 85,
                          env={"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count())})]),
        Stage("correct", "the biggest unknown (no kernel has run on a GPU): first every op and "
              "method on every backend against the reference at odd shapes and LLaVA's, "
              "fp32/fp16/bf16 (widest coverage per second; it compiles the Triton kernels the "
              "rest reuses), then the gpu-marked tests (deeper checks), stopping at the first "
              "failure; both spread over processes, since compiling each kernel's first call "
              "is most of their time", [
                  driver("ops+methods", [], ["--device", "cuda", "--jobs", "6"], 50,
                         "correct.json"),
                  Command("gpu tests", [py, "-m", "pytest", "-m", "gpu", "-x", "-v", "-rfEs",
                                        "-p", "no:cacheprovider", *gpu_test_files(root),
                                        *(["-n", "8"] if has_xdist else [])], 100)]),
        Stage("sanitize", "memory safety next: memcheck on small calls of every CUDA and Triton "
              "kernel (no caching allocator: each tensor its own allocation, exact bounds), "
              "racecheck on the cooperative greedy kernel", [
                  driver("memcheck", memcheck, ["--device", "cuda", "--shapes", "tiny", "small"],
                         40, "memcheck.json", env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
                  driver("racecheck", racecheck,
                         ["--device", "cuda", "--only", "greedy_select", "greedy_select_varlen",
                          "--backends", "cuda", "--shapes", "tiny", "small", "--dtypes",
                          "float32"], 20, "racecheck.json")]),
        Stage("bench", "speed once the results are known right: latency and launches per call "
              "against the reference; LLaVA-1.5 at B=1 and 64, video at B=1 (the reference's "
              "N x N needs 220 GB at B=64) and video B=64 for the memory-bound ops", [
                  Command("llava15", [*bench, "--shapes", "llava15", "--batch", "1", "64",
                                      "--json", "{work}/bench-llava15.json"], 25,
                          probe=[py, "-m", "visprune.bench", "--help"],
                          output="bench-llava15.json"),
                  Command("video B=1", [*bench, "--shapes", "video", "--batch", "1",
                                        "--json", "{work}/bench-video.json"], 20,
                          probe=[py, "-m", "visprune.bench", "--help"],
                          output="bench-video.json"),
                  Command("video B=64", [*bench, "--shapes", "video", "--batch", "64", "--ops",
                                         "mi_scores", "gather_compact", "--json",
                                         "{work}/bench-video64.json"], 15,
                          probe=[py, "-m", "visprune.bench", "--help"],
                          output="bench-video64.json")]),
        Stage("e2e", "last, the costliest per number: received_attention against the layer's "
              "SDPA at LLaVA-1.5 prefill, then one prefill row per model family at 7B shapes "
              "(random bf16 weights made on the GPU, full depth), unpruned vs keep 64", [
                  Command("attention", [py, "benchmarks/bench_attention.py", "--device", "cuda",
                                        "--quick", "--lengths", "640", "--json",
                                        "{work}/attention.json"], 15,
                          probe=[py, "benchmarks/bench_attention.py", "--help"],
                          output="attention.json"),
                  Command("llava", [*e2e, "--model", "llava", "--json",
                                    "{work}/e2e-llava.json"], 34,
                          probe=[py, "benchmarks/e2e.py", "--help"], output="e2e-llava.json"),
                  Command("qwen2.5-vl", [*e2e, "--model", "qwen2_5_vl", "--visual", "image",
                                         "--json", "{work}/e2e-qwen.json"], 34,
                          probe=[py, "benchmarks/e2e.py", "--help"], output="e2e-qwen.json")]),
    ]


def scaled(stages: List[Stage], total: int) -> List[Stage]:
    """The plan with every budget scaled so that they sum to at most ``total``."""
    factor = total / sum(s.budget for s in stages)
    for s in stages:
        for c in s.commands:
            c.budget = max(1, int(c.budget * factor))
    return stages


def fill(arg: str, py: str, work: str) -> str:
    return arg.replace("{py}", py).replace("{work}", work)


# --------------------------------------------------------------------------- dry run
def _module_file(root: pathlib.Path, module: str) -> Optional[pathlib.Path]:
    """The file ``python -m module`` runs when the module lives in ``root``; None otherwise."""
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__main__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _in_root(root: pathlib.Path, module: str) -> bool:
    top = root / module.split(".")[0]
    return top.is_dir() or top.with_suffix(".py").is_file()


def file_problems(root: pathlib.Path, argv: List[str], py: str) -> List[str]:
    """What is wrong with the files and modules a command names (missing, not parsing)."""
    problems = []
    for j, arg in enumerate(argv):
        path = None
        if arg.endswith((".py", ".sh")) and not arg.startswith("{"):
            path = root / arg
            if not path.is_file():
                problems.append(f"{arg}: missing")
                continue
        elif j > 1 and argv[j - 1] == "-m" and argv[j - 2] == "{py}":
            if _in_root(root, arg):
                path = _module_file(root, arg)
                if path is None:
                    problems.append(f"-m {arg}: no module file in {root}")
                    continue
            elif importlib.util.find_spec(arg) is None:
                problems.append(f"-m {arg}: not importable by {py}")
                continue
        if path is None:
            continue
        if path.suffix == ".sh":
            r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            if r.returncode:
                problems.append(f"{arg}: bash -n: {r.stderr.strip()}")
        else:
            try:        # parse and compile, writing no .pyc
                compile(path.read_bytes(), str(path), "exec")
            except (SyntaxError, ValueError) as e:
                problems.append(f"{arg}: does not compile: {type(e).__name__}: {e}")
    return problems


def dry_run(stages: List[Stage], root: pathlib.Path, py: str, total: int) -> int:
    work = "<work>"
    budget = sum(s.budget for s in stages)
    print(f"GPU check plan: {len(stages)} stages, {budget} s of {total} s, run in {root}")
    problems = file_problems(root, ["scripts/gpu_check.sh"], py)
    probes, started = [], set()
    for n, stage in enumerate(stages, 1):
        print(f"[stage] {stage.name} {stage.budget} s ({n}/{len(stages)}): {stage.why}")
        for c in stage.commands:
            env = " ".join(f"{k}={v}" for k, v in c.env.items())
            line = " ".join(shlex.quote(fill(a, py, work)) for a in c.argv)
            print(f"  [{c.budget:>3} s] {c.label}: {env + ' ' if env else ''}{line}")
            if c.argv[0] != "{py}" and shutil.which(c.argv[0]) is None:
                print(f"          ({c.argv[0]} is not installed here: skipped where it is not)")
            mine = file_problems(root, c.argv, py)
            problems += [f"{stage.name}/{c.label}: {p}" for p in mine]
            if c.probe and not mine and tuple(c.probe) not in started:
                started.add(tuple(c.probe))
                argv = [fill(a, py, work) for a in c.probe]
                probes.append((f"{stage.name}/{c.label}", argv, subprocess.Popen(
                    argv, cwd=root, env=child_env(gpu=False, root=root), stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True)))
    for what, argv, proc in probes:       # started side by side: each imports torch
        _, err = proc.communicate()
        if proc.returncode:
            tail = err.strip().splitlines()[-1] if err.strip() else ""
            problems.append(f"{what}: `{' '.join(argv[1:])}` exited {proc.returncode}: {tail}")
    if budget > total:
        problems.append(f"the budgets sum to {budget} s, over {total} s")
    order = [s.name for s in stages]
    print(f"total budget: {budget} s (limit {total} s); stages: {' -> '.join(order)}")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("dry run: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


# --------------------------------------------------------------------------- running
def child_env(gpu: bool, root: pathlib.Path = ROOT) -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if (root / OVERLAY).is_dir():
        env["PYTHONPATH"] = os.pathsep.join(
            [str(root / OVERLAY)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if gpu:
        # compiled Triton kernels, never the interpreter (CI's setting, if inherited)
        env.pop("TRITON_INTERPRET", None)
    else:
        env.setdefault("TRITON_INTERPRET", "1")
    return env


class Stop(Exception):
    """SIGTERM to the check itself: stop the command running and write what there is."""


def _on_term(signum, frame):
    raise Stop()


def run_command(c: Command, argv: List[str], root: pathlib.Path, log_path: str,
                limit: float) -> Dict[str, Any]:
    """Run one command until ``limit`` seconds; its status, exit code and wall time.  A SIGTERM
    to the check ends it too, with status "stopped"."""
    rec: Dict[str, Any] = {"label": c.label, "argv": argv, "budget_s": c.budget,
                           "limit_s": round(limit, 1), "env": c.env}
    if argv[0] != sys.executable and shutil.which(argv[0]) is None:
        rec.update(status=f"skipped: {argv[0]} not found", wall_s=0.0)
        return rec
    if limit <= 1:
        rec.update(status="skipped: no time left", wall_s=0.0)
        return rec
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(f'{k}={v}' for k, v in c.env.items())} "
                  f"{' '.join(shlex.quote(a) for a in argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=root, env=dict(child_env(gpu=True, root=root), **c.env),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            rec["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            _kill(proc)
            rec["status"] = f"timed out at {limit:.0f} s (partial results kept)"
        except Stop:
            _kill(proc)
            rec["status"] = "stopped"
    rec.update(rc=proc.returncode, wall_s=round(time.monotonic() - t0, 1))
    return rec


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=GRACE)
            return
        except subprocess.TimeoutExpired:
            continue


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_plan(stages: List[Stage], root: pathlib.Path, out: pathlib.Path, total: int) -> int:
    work = tempfile.mkdtemp(prefix="visprune-gpu-check-")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    state: Dict[str, Any] = {"plan": {"budget_s": total, "stages": [
        {"name": s.name, "why": s.why, "budget_s": s.budget,
         "commands": [{"label": c.label, "budget_s": c.budget} for c in s.commands]}
        for s in stages]}, "stages": [], "started": _now()}
    print(f"GPU check: {len(stages)} stages in {sum(s.budget for s in stages)} s; results in {out}")
    for s in stages:
        print(f"  {s.name:<9}{s.budget:>4} s  " + ", ".join(f"{c.label} {c.budget} s"
                                                     for c in s.commands))
    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        return _run_stages(stages, root, out, state, work, t0)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)


def _run_stages(stages: List[Stage], root: pathlib.Path, out: pathlib.Path,
                state: Dict[str, Any], work: str, t0: float) -> int:
    py = sys.executable
    deadline = 0.0
    logs: List[str] = []
    stopped = False
    for stage in stages:
        srec: Dict[str, Any] = {"name": stage.name, "budget_s": stage.budget, "commands": []}
        state["stages"].append(srec)
        s0 = time.monotonic()
        for c in stage.commands:
            deadline += c.budget
            if stopped:
                srec["commands"].append({"label": c.label, "budget_s": c.budget, "wall_s": 0.0,
                                         "status": "skipped: the check was stopped"})
                continue
            argv = [fill(a, py, work) for a in c.argv]
            log_path = os.path.join(work, f"{len(logs):02d}-{stage.name}-"
                                          f"{re.sub(r'[^A-Za-z0-9.]+', '_', c.label)}.log")
            logs.append(log_path)
            rec = run_command(c, argv, root, log_path, t0 + deadline - time.monotonic())
            stopped = rec["status"] == "stopped"
            rec["log"] = log_path
            if c.output:
                rec["result"] = read_json(os.path.join(work, c.output))
            srec["commands"].append(rec)
            srec["wall_s"] = round(time.monotonic() - s0, 1)
            srec["status"] = stage_status(srec["commands"])
            print(f"[{time.monotonic() - t0:5.0f} s] {stage.name}/{c.label}: {rec['status']}"
                  f" ({rec['wall_s']} s)", flush=True)
            write_results(state, logs, out, t0)
        srec["status"] = stage_status(srec["commands"])
    if stopped:
        state["stopped"] = "SIGTERM: the check was stopped from outside"
    state["wall_s"] = round(time.monotonic() - t0, 1)
    write_results(state, logs, out, t0)
    print(summary_text(state, short=True))
    return 0 if all(s["status"] == "ok" for s in state["stages"]) else 1


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def stage_status(commands: List[Dict[str, Any]]) -> str:
    """"ok", or each command that was not, with its status."""
    return "; ".join(f"{c['label']}: {c['status']}" for c in commands
                     if c["status"] != "ok") or "ok"


def summary_text(state: Dict[str, Any], short: bool = False) -> str:
    try:
        return summarize(state, short)
    except Exception:  # noqa: BLE001 - the results and logs must still be written
        return ("# visprune GPU check: the summary failed\n\n```\n" + traceback.format_exc()
                + "```\n")


def write_results(state: Dict[str, Any], logs: List[str], out: pathlib.Path, t0: float) -> str:
    """summary.md, results.json and logs.txt in ``out`` (each written whole, then renamed)."""
    state["elapsed_s"] = round(time.monotonic() - t0, 1)
    text = summary_text(state)
    parts = []
    for path in logs:
        try:
            with open(path, errors="replace") as f:
                parts.append(f"===== {os.path.basename(path)}\n{f.read()}")
        except OSError:
            pass
    for name, content in (("summary.md", text), ("logs.txt", "\n".join(parts)),
                          ("results.json", json.dumps(state, indent=1, default=str))):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, out / name)
    return text


# --------------------------------------------------------------------------- machine
def machine_info(path: str) -> int:
    """The GPU, driver, library versions and tools present, as JSON at ``path``."""
    info: Dict[str, Any] = {"date": _now(), "python": sys.version.split()[0],
                            "cpus": os.cpu_count()}

    def tool(*argv, timeout=5):        # well inside the stage's budget, whatever hangs
        if shutil.which(argv[0]) is None:
            return "not found"
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            return (r.stdout + r.stderr).strip()
        except (OSError, subprocess.SubprocessError) as e:
            return f"failed: {e}"

    info["nvidia_smi"] = tool("nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                              "clocks.max.sm", "--format=csv,noheader")
    info["nvcc"] = tool("nvcc", "--version").splitlines()[-1:]
    info[SANITIZER] = tool(SANITIZER, "--version").splitlines()[-1:]
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as e:  # noqa: BLE001 - recorded: what is broken is what we need to know
        info["torch"] = f"not importable: {e}"
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            info[name] = f"not importable: {e}"
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return 0


# --------------------------------------------------------------------------- main
def _version(package: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str, parts: int = 2) -> tuple:
    return tuple(int(v) for v in re.findall(r"\d+", version)[:parts])


def fetch_wheels(root: pathlib.Path) -> int:
    """Downloads :data:`WHEEL_PINS` as wheels into ``WHEELS`` (run where a package registry is
    reachable, before a lease that carries the folder)."""
    return subprocess.call([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "--disable-pip-version-check", "-d", str(root / WHEELS),
                            *WHEEL_PINS])


def _wanted(wheel: pathlib.Path) -> bool:
    """Whether a carried wheel goes into the overlay: transformers always (the caller decided),
    another package where the installed one is missing or older than the wheel."""
    name, version = wheel.name.split("-")[:2]
    if name == "transformers":
        return True
    have = _version(name)
    return have is None or _release(have, 3) < _release(version, 3)


def overlay(root: pathlib.Path, force: bool = False) -> int:
    """Installs the carried wheels into ``OVERLAY`` when the installed transformers is older
    than :data:`TRANSFORMERS` (``force``: whatever it is); says what it did."""
    have = _version("transformers")
    need = ".".join(map(str, TRANSFORMERS))
    if have is not None and _release(have) >= TRANSFORMERS and not force:
        print(f"transformers {have} >= {need}: no overlay needed")
        return 0
    carried = sorted((root / WHEELS).glob("*.whl"))
    wheels = [str(w) for w in carried if _wanted(w)]
    if not any(w.name.startswith("transformers-") for w in carried):
        print(f"transformers {have} < {need} and no transformers wheel in {WHEELS}/: the "
              f"end-to-end rows will fail (carry {WHEELS}/, made by `check.py --fetch-wheels`)")
        return 0
    code = subprocess.call([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                            "--upgrade", "--disable-pip-version-check",
                            "--root-user-action=ignore", "--target", str(root / OVERLAY),
                            *wheels])
    print(f"transformers {have}: installed {[pathlib.Path(w).name for w in wheels]} into "
          f"{OVERLAY}/ (exit {code}); later commands import from it first")
    return code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=TOTAL_BUDGET,
                   help=f"seconds for the whole plan (default {TOTAL_BUDGET}); every stage's "
                        "budget scales with it")
    p.add_argument("--out", default=None, help="results folder (default: $OUT, else "
                                               "benchmarks/results/gpu-<date>)")
    p.add_argument("--dry-run", action="store_true", help="print and check the plan; run nothing")
    p.add_argument("--root", default=str(ROOT), help="the checkout the commands run in")
    p.add_argument("--fetch-wheels", action="store_true",
                   help=f"download {' and '.join(WHEEL_PINS)} into {WHEELS}/ for a lease to "
                        f"carry; run nothing else")
    p.add_argument("--overlay", action="store_true",
                   help=f"install the wheels of {WHEELS}/ into {OVERLAY}/ if the installed "
                        f"transformers is older than {'.'.join(map(str, TRANSFORMERS))}")
    p.add_argument("--machine-info", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.machine_info:
        return machine_info(args.machine_info)
    if args.fetch_wheels or args.overlay:
        root = pathlib.Path(args.root).resolve()
        return fetch_wheels(root) if args.fetch_wheels else overlay(root)
    if args.budget < 60:
        p.error("--budget must be at least 60 s")
    root = pathlib.Path(args.root).resolve()
    stages = plan(root, importlib.util.find_spec("xdist") is not None, sanitizer_kernel_filter())
    if args.budget != TOTAL_BUDGET:
        stages = scaled(stages, args.budget)
    if args.dry_run:
        return dry_run(stages, root, sys.executable, args.budget)
    out = pathlib.Path(args.out or os.environ.get("OUT") or
                       root / "benchmarks" / "results" / f"gpu-{datetime.date.today()}")
    return run_plan(stages, root, out, args.budget)


if __name__ == "__main__":
    sys.exit(main())
