"""The package's structure and the GPU-path defects that a CPU can show: no production import of
the reference, a device guard on every Triton entry point, sync-free calls with
``validate=False``, Triton ops opaque to ``torch.compile``, the same gradients on every backend,
and memory safety of the kernels when value checks are skipped."""
import ast
import pathlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import visprune
from visprune import common, ops
from visprune.backends import backend_status

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRITON = backend_status("triton", torch.device("cpu"))[0]
CPU_EXT = backend_status("cpu", torch.device("cpu"))[0]
BACKENDS = ["reference"] + (["triton"] if TRITON else []) + (["cpu"] if CPU_EXT else [])
needs_triton = pytest.mark.skipif(not TRITON, reason="triton backend unavailable")


def _tokens(B, N, D, seed=0):
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- structure
def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield (node.module or ""), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_no_production_module_imports_the_reference():
    """Only the backend table may load it (to run ``backend="reference"``); nothing else uses it."""
    production = [p for p in (ROOT / "visprune").rglob("*.py")
                  if p.name not in ("reference.py", "backends.py")]
    production += list((ROOT / "triton_kernels").glob("*.py"))
    assert len(production) > 10
    for path in production:
        for module, names in _imports(path):
            assert not module.endswith("reference") and "reference" not in names, \
                f"{path.relative_to(ROOT)} imports the reference ({module} {names})"


@needs_triton
def test_every_triton_entry_point_is_device_guarded():
    import importlib
    entry = {"mi_scores": ["mi_scores"], "greedy": ["greedy_select"],
             "gather": ["gather_compact"], "prune": ["prune"],
             "holov": ["similarity_variance"], "prumerge": ["merge"],
             "attention": ["received_attention"],
             "video": ["dpc_knn", "dpc_knn_varlen", "cluster_merge", "temporal_similarity"]}
    for mod, names in entry.items():
        m = importlib.import_module(f"visprune.triton_kernels.{mod}")
        for name in names:
            assert getattr(getattr(m, name), "device_guarded", False), f"{mod}.{name}"


@needs_triton
def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    from visprune.triton_kernels.utils import on_device
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Recorder)

    class FakeCuda:
        device = torch.device("cuda", 1)

    seen = []
    launcher = on_device(lambda x, y, *, z: seen.append((x, y, z)) or "ran")
    assert launcher(FakeCuda(), 2, z=3) == "ran"
    assert entered == [torch.device("cuda", 1), "exit"] and len(seen) == 1
    launcher(torch.zeros(1), 2, z=3)                   # CPU tensors: no device switch
    assert len(entered) == 2 and len(seen) == 2


def test_available_backends_takes_device_strings():
    assert visprune.available_backends("cpu") == visprune.available_backends(torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        visprune.available_backends("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_triton_is_not_ok_for_cuda_tensors_without_cuda():
    assert visprune.available_backends(torch.device("cuda"))["triton"] != "ok"


# --------------------------------------------------------------------------- host syncs
class _HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: ``item()``, ``bool()`` and ``int()`` go through
    ``aten._local_scalar_dense``; ``tolist()`` is counted by a patch.  (On CPU tensors a copy to
    the host is invisible, so this shows the Python layers free of reads, not a GPU trace.)"""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _host_reads(fn, monkeypatch):
    mode = _HostReads()
    original = torch.Tensor.tolist

    def tolist(t):
        mode.reads += 1
        return original(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with mode:
        fn()
    monkeypatch.setattr(torch.Tensor, "tolist", original)
    return mode.reads


@needs_triton
@pytest.mark.parametrize("path", ["gram", "stream"])
def test_validate_false_calls_are_free_of_host_reads(path, monkeypatch):
    from visprune.triton_kernels import greedy
    if path == "stream":
        monkeypatch.setattr(greedy, "GRAM_MAX_N", 16)
    x, t = _tokens(2, 40, 16), _tokens(2, 5, 16, seed=1)
    mask = torch.rand(2, 40, generator=torch.Generator().manual_seed(2)) > 0.3
    tm = torch.tensor([[True] * 5, [True, False, True, False, True]])
    idx = torch.stack([torch.randperm(40)[:6] for _ in range(2)])
    q, k = _tokens(2, 24, 8).reshape(2, 2, 12, 8), _tokens(2, 14, 8, seed=3)[:, None]
    km = torch.arange(14)[None] >= torch.tensor([[0], [3]])
    calls = {
        "mi_scores": lambda v: ops.mi_scores(x, t, text_mask=tm, backend="triton", validate=v),
        "greedy_select": lambda v: [ops.greedy_select(x, 5, objective=o, mask=mask, start=s,
                                                      backend="triton", validate=v)
                                    for o in ("maxmin", "maxsum") for s in ("auto", 3)],
        "gather_compact": lambda v: ops.gather_compact(x, idx, backend="triton", validate=v),
        "prune": lambda v: ops.prune(x, t, 4, stage1_keep=10, text_mask=tm, mask=mask,
                                     backend="triton", validate=v),
        "received_attention": lambda v: [
            ops.received_attention(q, k, torch.tensor([3, 5]), 6, queries=queries, key_mask=km,
                                   backend="triton", validate=v)
            for queries in ("after", "last", mask[:, :12])],
    }
    for name, call in calls.items():
        assert _host_reads(lambda: call(False), monkeypatch) == 0, name
    # The default validates with one read per call (two greedy calls with an int start also
    # check that the start is a candidate, in the same read).
    assert _host_reads(lambda: calls["prune"](True), monkeypatch) == 1
    assert _host_reads(lambda: calls["gather_compact"](True), monkeypatch) == 1
    assert _host_reads(lambda: calls["received_attention"](True), monkeypatch) == 3


def test_validate_must_be_a_bool():
    with pytest.raises(TypeError, match="validate"):
        ops.greedy_select(_tokens(1, 5, 3), 2, validate="no")


# --------------------------------------------------------------------------- memory safety
@needs_triton
@pytest.mark.parametrize("path_n", [4096, 16])
def test_unvalidated_bad_values_stay_in_range_on_triton(path_n, monkeypatch):
    """Without the value checks, invalid values give unspecified but in-range results (no
    out-of-bounds access): k above the candidates (gram and stream paths), uneven masks."""
    from visprune.triton_kernels import greedy
    monkeypatch.setattr(greedy, "GRAM_MAX_N", path_n)
    x = _tokens(2, 40, 8)
    few = torch.zeros(2, 40, dtype=torch.bool)
    few[:, :3] = True
    got = ops.greedy_select(x, 6, mask=few, backend="triton", validate=False)
    assert got.shape == (2, 6) and bool(((got >= 0) & (got < 40)).all())
    assert sorted(got[0, :3].tolist()) == [0, 1, 2]          # the candidates come first
    uneven = few.clone()
    uneven[1, 10:14] = True
    tokens, idx = ops.gather_compact(x, mask=uneven, backend="triton", validate=False)
    assert idx.shape == (2, 3) and bool(((idx >= 0) & (idx < 40)).all())
    assert torch.equal(tokens, x.gather(1, idx[..., None].expand(-1, -1, 8)))


@pytest.mark.skipif(not CPU_EXT, reason="the compiled extension is not built")
def test_unvalidated_bad_values_raise_from_the_cpu_kernels():
    """The CPU kernels meet these bad values in work they do anyway and name the argument."""
    x = _tokens(2, 40, 8)
    few = torch.zeros(2, 40, dtype=torch.bool)
    few[:, :3] = True
    with pytest.raises(ValueError, match="k=6 is larger than the number of candidate"):
        ops.greedy_select(x, 6, mask=few, backend="cpu", validate=False)
    uneven = few.clone()
    uneven[1, 10:14] = True
    with pytest.raises(ValueError, match="different counts"):
        ops.gather_compact(x, mask=uneven, backend="cpu", validate=False)
    with pytest.raises(ValueError, match="index"):
        ops.gather_compact(x, torch.tensor([[1, 40], [0, 2]]), backend="cpu", validate=False)


@needs_triton
def test_unvalidated_out_of_range_index_reads_nothing():
    x = _tokens(1, 10, 4)
    tokens, _ = ops.gather_compact(x, torch.tensor([[1, 12]]), sort=False, backend="triton",
                                   validate=False)
    assert torch.equal(tokens[0, 0], x[0, 1]) and torch.equal(tokens[0, 1], torch.zeros(4))


# --------------------------------------------------------------------------- torch.library
COMPILE_FIRST = """
import torch
from visprune import ops
x = torch.randn(1, 20, 8)
for backend in {backends!r}:
    f = torch.compile(lambda x: ops.greedy_select(x, 4, backend=backend), fullgraph=True,
                      backend="aot_eager")
    assert torch.equal(f(x), ops.greedy_select(x, 4, backend=backend)), backend
print("compiled")
"""


def test_a_compiled_call_may_be_the_first_call():
    """In a fresh process the backend's module is not loaded yet: torch.compile must trace its
    import (it refuses importlib)."""
    import os
    import subprocess
    import sys
    backends = [b for b in BACKENDS if b != "reference"]
    out = subprocess.run([sys.executable, "-c", COMPILE_FIRST.format(backends=backends)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


@needs_triton
def test_triton_ops_are_opaque_to_torch_compile():
    torch._dynamo.reset()
    x, t = _tokens(2, 24, 16), _tokens(2, 5, 16, seed=2)
    mask = torch.rand(2, 24, generator=torch.Generator().manual_seed(3)) > 0.2

    def pipeline(x, t, mask):
        s = ops.mi_scores(x, t, backend="triton")
        g = ops.greedy_select(x, 5, mask=mask, objective="maxsum", backend="triton")
        tok, idx = ops.gather_compact(x, g, backend="triton")
        kept, kept_idx = ops.gather_compact(x, mask=(torch.arange(24) % 3 == 1).expand(2, 24),
                                            backend="triton")
        r = ops.prune(x, t, 4, stage1_keep=0.5, mask=mask, backend="triton")
        return s, g, tok, idx, kept, kept_idx, r.tokens, r.indices, r.lengths

    want = pipeline(x, t, mask)
    got = torch.compile(pipeline, fullgraph=True, backend="aot_eager")(x, t, mask)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_compact_and_prune_gradients_are_the_same_on_every_backend(backend):
    """``tokens`` is differentiable w.r.t. ``x`` on every backend (as ``torch.gather``), with the
    same gradient; the discrete selection passes none."""
    x0, t = _tokens(2, 30, 8), _tokens(2, 4, 8, seed=1)
    w = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(5))
    idx = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(b))[:6]
                       for b in range(2)])
    grads = {}
    for b in ("reference", backend):
        x = x0.clone().requires_grad_()
        tokens, _ = ops.gather_compact(x, idx, sort=False, backend=b)
        (tokens * w).sum().backward()
        y = x0.clone().requires_grad_()
        r = ops.prune(y, t, 6, stage1_keep=20, backend=b)
        (r.tokens * w).sum().backward()
        grads[b] = (x.grad, y.grad)
    want = torch.zeros_like(x0).scatter_(1, idx[..., None].expand(-1, -1, 8), w)
    assert torch.equal(grads[backend][0], want)
    assert torch.equal(grads[backend][1], grads["reference"][1])


def test_true_fp32_restores_the_callers_precision():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with common.true_fp32():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        from visprune.methods import holov
        holov(_tokens(1, 20, 8), torch.rand(1, 20), 5, num_crops=4, backend="reference")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(old)


@needs_triton
def test_stream_maxsum_start_needs_no_pairwise_pass(monkeypatch):
    """maxsum's start key on the stream path is linear in a per-row summary: the pairwise tile
    pass (N²·D work) must not run; the picks still match the reference."""
    from visprune import reference
    from visprune.triton_kernels import greedy

    def forbidden(*a, **k):
        raise AssertionError("the pairwise start pass ran for maxsum")

    monkeypatch.setattr(greedy, "_start_pass", forbidden)
    x = _tokens(2, 300, 12, seed=7)
    x[1, 5, 0] = float("nan")
    mask = torch.rand(2, 300, generator=torch.Generator().manual_seed(8)) > 0.3
    for metric in ("cosine", "l2"):
        for m in (None, mask):
            got = greedy.greedy_select(x, 7, "maxsum", metric, m, "auto", path="stream")
            want = reference.greedy_select(x, 7, "maxsum", metric, m, "auto")
            assert torch.equal(got, want), (metric, m is None)
