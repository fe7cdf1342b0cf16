"""Smoke tests of the benchmark harness (visprune.bench): tiny shapes, a few repetitions."""
import ast
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from visprune import bench, ops

CPU = torch.device("cpu")
TINY = bench.shape_grid(["tiny"], batches=[2])[0]
FAST = dict(min_reps=3, max_reps=3, target_s=0.01)
ROW_KEYS = {"op", "shape", "backend", "status", "time_ms", "speedup_vs_reference",
            "speedup_vs_compiled", "device", "device_name", "dtype", "torch_version", "triton_version",
            "date", "reps", "B", "N", "D", "M", "k"}


def _run_case(case, backends, **kw):
    args = dict(compile_ref=False, compile_max_k=bench.DEFAULT_COMPILE_MAX_K, mem_limit=1 << 30, limits={},
                timing=FAST)
    args.update(kw)
    return {r["backend"]: r for r in bench.run_case(case, CPU, torch.float32, backends, **args)}


def test_cli_quick_json(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "visprune.bench", "--quick", "--shapes", "tiny", "--batch", "2",
         "--min-reps", "3", "--max-reps", "3", "--target-seconds", "0.01", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == set(bench.OPS)
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["torch_version"] == torch.__version__
        assert r["backend"] != "triton"          # never timed on CPU, even with TRITON_INTERPRET=1
        assert r["status"] == "ok" and r["reps"] == 3
        assert math.isfinite(r["time_ms"]) and r["time_ms"] > 0
        assert r["q1_ms"] <= r["time_ms"] <= r["q3_ms"]
        if r["backend"] == "reference":
            assert r["speedup_vs_reference"] == 1.0
    assert "triton: not timed on CPU" in proc.stdout          # the table's footnote
    assert "[1/" in proc.stderr                               # progress lines


def test_speedups_come_from_measured_times(monkeypatch):
    """A fake second backend (the reference plus a 2 ms sleep) is really timed, and its speed-up is
    the ratio of the two medians (no ordering asserted: a loaded machine can stall either one)."""
    real = bench.runner.backend_call

    def fake(case, backend, args, kwargs, device):
        if backend != "slow":
            return real(case, backend, args, kwargs, device)
        fn, _ = real(case, "reference", args, kwargs, device)
        return (lambda: (time.sleep(0.002), fn())[1]), {}

    monkeypatch.setattr(bench.runner, "backend_call", fake)
    rows = _run_case(bench.Case("greedy_select:maxmin", TINY), ["reference", "slow"])
    ref, slow = rows["reference"], rows["slow"]
    assert slow["check"] == "ok"
    assert slow["min_ms"] >= 2.0 and slow["reps"] == ref["reps"] == 3
    assert slow["speedup_vs_reference"] == pytest.approx(ref["time_ms"] / slow["time_ms"])
    assert ref["speedup_vs_reference"] == 1.0 and slow["speedup_vs_compiled"] is None


def test_mismatch_is_reported(monkeypatch):
    real = bench.runner.backend_call

    def wrong(case, backend, args, kwargs, device):
        if backend != "wrong":
            return real(case, backend, args, kwargs, device)
        fn, _ = real(case, "reference", args, kwargs, device)
        return (lambda: fn().flip(-1)), {}

    monkeypatch.setattr(bench.runner, "backend_call", wrong)
    rows = _run_case(bench.Case("greedy_select:maxsum", TINY), ["reference", "wrong"])
    assert rows["wrong"]["check"] == "MISMATCH"


def test_reference_over_memory_limit_is_skipped_not_run():
    video = bench.Shape("video", 64, 16384, 3584, 64, 1024)
    case = bench.Case("greedy_select:maxmin", video)
    assert bench.skip_reason(case, "reference", 2, 80 << 30).startswith("skipped: needs")
    assert bench.skip_reason(case, "cuda", 2, 80 << 30) is None          # kernels need no N x N matrix
    # the tiny case with a limit between the inputs and the reference's N x N scratch
    tiny = bench.Case("prune", TINY)
    limit = bench.needs_memory(tiny, "cuda", 4) + 1
    rows = _run_case(tiny, ["reference"], mem_limit=limit)
    r = rows["reference"]
    assert r["status"].startswith("skipped") and "time_ms" not in r and r["speedup_vs_reference"] is None
    json.dumps(list(rows.values()), allow_nan=False)


def test_compile_failure_reports_na(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    rows = _run_case(bench.Case("mi_scores", TINY), ["reference"], compile_ref=True)
    assert rows["reference"]["status"] == "ok"
    assert rows["reference"]["speedup_vs_compiled"] is None
    assert rows[bench.COMPILED]["status"].startswith("n/a: torch.compile failed")
    assert "time_ms" not in rows[bench.COMPILED]


def test_compile_skipped_above_max_k():
    case = bench.Case("prune", bench.shape_grid(["video"], batches=[1])[0])
    assert "compile-max-k" in bench.skip_reason(case, bench.COMPILED, 2, 1 << 50)
    assert bench.skip_reason(bench.Case("mi_scores", case.shape), bench.COMPILED, 2, 1 << 50) is None


def test_triton_never_timed_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    timed, notes = bench.backend_plan(CPU)
    assert "triton" not in timed and "reference" in timed
    assert "not timed on CPU" in notes["triton"]


def test_shape_grids():
    quick = bench.shape_grid(quick=True)
    assert [(s.B, s.N, s.D, s.k) for s in quick] == [(1, 576, 4096, 64), (1, 576, 256, 64)]
    full = bench.shape_grid()
    assert {(s.N, s.D) for s in full} == {(576, 4096), (2880, 4096), (16384, 3584)}
    assert {s.B for s in full} == {1, 8, 64} and {s.k for s in full} == {64, 128, 192, 320, 1024}
    # mi_scores does not depend on k: one case per (B, N, D, M)
    assert len(bench.cases(["mi_scores"], full)) == 9 and len(bench.cases(["prune"], full)) == 15


def test_select_ops():
    assert bench.select_ops(["greedy_select"]) == ["greedy_select:maxmin", "greedy_select:maxsum"]
    assert bench.select_ops(["prune", "greedy_select:maxsum"]) == ["greedy_select:maxsum", "prune"]
    with pytest.raises(ValueError, match="unknown op"):
        bench.select_ops(["nope"])
    assert set(bench.select_ops(None)) == set(bench.OPS)
    assert {spec.fn for spec in bench.OPS.values()} == {ops.mi_scores, ops.greedy_select,
                                                         ops.gather_compact, ops.prune}


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedup.png"
    assert bench.main(["--quick", "--shapes", "tiny", "--ops", "mi_scores", "prune", "--quiet",
                       "--min-reps", "1", "--max-reps", "1", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib -> ImportError
    assert bench.main(["--quick", "--shapes", "tiny", "--plot", os.devnull]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_bench_does_not_import_the_reference():
    """The ops are timed through visprune.ops; the stage-1 rule comes from visprune.common."""
    for path in pathlib.Path(bench.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.split(".")[-1] == "reference" for n in names), f"{path.name}: {names}"


def test_bench_attention_quick(tmp_path):
    """benchmarks/bench_attention.py at LLaVA-1.5's shape: both sides run and agree."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "attention.json"
    bench.main(["--device", "cpu", "--quick", "--lengths", "640", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["op_ms"] > 0 and row["eager_ms"] > 0 and row["op_runs"] == row["eager_runs"] == 3
    assert row["max_abs_diff"] < 1e-4 * max(1.0, row["max_abs_value"])
    assert row["eager_bytes_computed"] > 50 * row["op_bytes_computed"]


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "cdpruner", "dart"])
def test_bench_method_vs_original(method, capsys):
    """benchmarks/bench_<method>.py: checks that visprune and the original's code path pick the
    same tokens (it exits otherwise), then prints the side-by-side table."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"bench_{method}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{method}", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--device", "cpu", "--reps", "1"])
    table = capsys.readouterr().out
    assert table.count("\n| 1 |") == 1 and table.count("\n| 8 |") == 1, table


@pytest.mark.parametrize("script,column,values", [
    ("bench_video_methods", "method", ["evs", "vidcom2", "dycoke"]),
    ("bench_fastvid", "variant", ["llava_onevision", "qwen2_5_vl"]),
    ("bench_prunevid", "method", ["prunevid"]),
    ("bench_holitom", "setting", ["defaults", "d=0.5"]),
])
def test_video_benchmarks_quick(script, column, values, tmp_path):
    """benchmarks/<script>.py on a tiny video: each method keeps its original's tokens (the
    script exits otherwise), and every row has times, a speed-up from them, peak memory and the
    machine."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(script, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--quick", "--reps", "2", "--json", str(tmp_path / "rows.json"),
                 "--md", str(tmp_path / "rows.md")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r[column] for r in rows] == values
    for r in rows:
        assert r["visprune_ms"] > 0 and r["original_ms"] > 0 and r["kept"] > 0
        assert math.isclose(r["speedup"], r["original_ms"] / r["visprune_ms"])
        assert r["visprune_peak_MB"] >= 0 and r["original_peak_MB"] >= 0
        assert r["reps"] == 2 and r["machine"] and r["torch"] == torch.__version__
    assert len((tmp_path / "rows.md").read_text().splitlines()) == 4 + len(rows)
