"""The video ops: DPC-kNN density peaks, the cluster merge, frame similarity, and greedy
selection's linear-time start.

Each op's reference is checked against a float64 transliteration of the originals' N×N formulas
(tests/helpers.py), and every backend against the reference on odd shapes (N = 1, 7, 64, 255;
D = 1, 5, 33), masks, exact duplicates and fp16.  The compiled paths are checked not to allocate
an N×N matrix: the C++ one by the peak memory of a process at N = 16384, the Triton one by
every tensor its launcher allocates."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from visprune import ops
from visprune.backends import backend_status

from helpers import cluster_merge_literal, dpc_knn_literal, randn, random_mask, with_duplicates

CPU = torch.device("cpu")
BACKENDS = [b for b in ("reference", "cpu", "triton") if backend_status(b, CPU)[0]]
TRITON_MAX_N = 64
TOL = {torch.float32: 2e-6, torch.float16: 2e-6}   # on the fp32 fields of fp16 tokens too


def backends(N):
    return [b for b in BACKENDS if b != "triton" or N <= TRITON_MAX_N]


def assert_dpc_equal(got, want, what):
    assert torch.equal(got.centers, want.centers), f"{what}: centers"
    assert torch.equal(got.assign, want.assign), f"{what}: assign"
    for name in ("density", "delta", "score"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


# =========================================================================== DPC-kNN
@pytest.mark.parametrize("N,D,C,k", [(40, 8, 5, 7), (64, 33, 10, 4), (23, 5, 23, 5), (9, 3, 2, 20)])
def test_reference_matches_the_originals_formula(N, D, C, k):
    x = randn((2, N, D), seed=N + D)
    r = ops.dpc_knn(x, C, k=k, backend="reference")
    for b in range(2):
        centers, assign, density, delta = dpc_knn_literal(x[b], C, k)
        assert r.centers[b].tolist() == centers
        assert r.assign[b].tolist() == assign
        torch.testing.assert_close(r.density[b].double(), torch.tensor(density, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r.delta[b].double(), torch.tensor(delta, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_reference_matches_the_originals_formula_with_a_mask_and_duplicates():
    x = with_duplicates(randn((1, 30, 6), seed=3), 18, seed=4)
    mask = random_mask(1, 30, seed=5, p=0.7)
    cands = mask[0].nonzero().flatten().tolist()
    r = ops.dpc_knn(x, 6, k=5, mask=mask, backend="reference")
    centers, assign, _, _ = dpc_knn_literal(x[0], 6, 5, cands)
    assert r.centers[0].tolist() == centers
    assert r.assign[0].tolist() == assign
    assert (r.density[~mask] == 0).all() and (r.score[~mask] == 0).all()


CASES = [  # B, N, D, C, k, dtype, duplicates, mask
    (2, 7, 5, 3, 4, torch.float32, False, False),
    (1, 1, 4, 1, 5, torch.float32, False, False),
    (3, 1, 1, 0, 1, torch.float32, False, False),
    (2, 64, 33, 8, 7, torch.float32, True, False),
    (2, 64, 16, 12, 5, torch.float16, False, True),
    (1, 37, 7, 37, 3, torch.float32, True, True),
    (2, 255, 33, 40, 7, torch.float32, True, True),
    (1, 255, 1, 10, 4, torch.float32, False, False),
    # the C++ panels (192 rows × 1024 columns), the delta and assignment fallbacks (C = 3: most
    # tokens have no centre among their 16 nearest)
    (1, 1500, 12, 150, 7, torch.float32, True, True),
    (1, 1500, 12, 3, 4, torch.float32, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])) + str(c[5])[-7:])
def test_backends_agree(case):
    B, N, D, C, k, dtype, dup, masked = case
    x = randn((B, N, D), seed=N * D + C)
    if dup:
        x = with_duplicates(x, max(1, N // 3), seed=N)
    x = x.to(dtype)
    mask = random_mask(B, N, seed=7, p=0.7, min_true=C) if masked else None
    before = x.clone()
    want = ops.dpc_knn(x, C, k=k, mask=mask, backend="reference")
    for be in backends(N):
        got = ops.dpc_knn(x, C, k=k, mask=mask, backend=be)
        assert_dpc_equal(got, want, be)
        assert torch.equal(x, before), f"{be} modified x"
    assert want.centers.shape == (B, C) and want.assign.shape == (B, N)
    for b in range(B):
        cand = torch.ones(N, dtype=torch.bool) if mask is None else mask[b]
        assert len(set(want.centers[b].tolist())) == C and cand[want.centers[b]].all()
        assert ((want.assign[b] >= 0) == (cand & (C > 0))).all()
        assert want.assign[b, want.centers[b]].tolist() == list(range(C))


def test_ties_go_to_the_lowest_index():
    # identical tokens: every density ties, the lowest index is the densest and every score but
    # its is 0; every token sits at distance 0 from every centre and takes slot 0
    x = randn((1, 1, 6), seed=1).expand(1, 12, 6).contiguous()
    for be in backends(12):
        r = ops.dpc_knn(x, 4, k=3, backend=be)
        assert r.centers.tolist() == [[0, 1, 2, 3]]
        assert r.assign.tolist() == [[0, 1, 2, 3] + [0] * 8]
        assert (r.delta == 0).all() and (r.density == 1).all()


def test_a_row_with_fewer_candidates_than_k_uses_all_of_them():
    x = randn((1, 5, 4), seed=2)
    mask = torch.tensor([[True, False, True, False, False]])
    for be in backends(5):
        r = ops.dpc_knn(x, 2, k=7, mask=mask, backend=be)
        d2 = float((x[0, 0] - x[0, 2]).double().square().sum())
        torch.testing.assert_close(r.density[0, [0, 2]].double(),
                                   torch.full((2,), math.exp(-d2 / 2 / 4), dtype=torch.float64))
        assert r.centers.tolist() == [[0, 2]] and r.assign.tolist() == [[0, -1, 1, -1, -1]]


def test_varlen_is_each_segment_alone():
    cu = torch.tensor([0, 30, 30, 71, 80])
    x = randn((80, 9), seed=8)
    mask = random_mask(1, 80, seed=9, p=0.8, min_true=80)[0]
    mask[71:80] = True
    counts = [4, 0, 6, 2]
    for be in backends(41):
        r = ops.dpc_knn_varlen(x, cu, counts, k=5, mask=mask, backend=be)
        off = 0
        for (lo, hi), c in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), counts):
            if hi > lo:
                d = ops.dpc_knn(x[None, lo:hi], c, k=5, mask=mask[None, lo:hi], backend="reference")
                assert r.centers[off:off + c].tolist() == (d.centers[0] + lo).tolist(), be
                assert torch.equal(r.assign[lo:hi], d.assign[0]), be
                torch.testing.assert_close(r.score[lo:hi], d.score[0], rtol=1e-5, atol=1e-6)
            off += c


def test_dpc_refuses_bad_arguments_before_any_work():
    x = randn((2, 6, 4), seed=0)
    bad = [
        (lambda be: ops.dpc_knn(x, 7, backend=be), ValueError, "num_centers=7 is larger"),
        (lambda be: ops.dpc_knn(x, 2, k=0, backend=be), ValueError, "k must be >= 1"),
        (lambda be: ops.dpc_knn(x, 2, k=2.5, backend=be), TypeError, "k must be an int"),
        (lambda be: ops.dpc_knn(x[..., :0], 2, backend=be), ValueError, "D >= 1"),
        (lambda be: ops.dpc_knn(x, 3, mask=torch.arange(6).expand(2, 6) < 2, backend=be),
         ValueError, r"num_centers=3 is larger than the number of candidate tokens \(2"),
        (lambda be: ops.dpc_knn(x[0], 2, backend=be), ValueError, r"shape \[B, N, D\]"),
        (lambda be: ops.dpc_knn_varlen(x[0], torch.tensor([0, 2, 6]), [3, 1], backend=be),
         ValueError, "num_centers=3 is larger than segment 0's length"),
        (lambda be: ops.dpc_knn_varlen(x[0], torch.tensor([0, 2, 6]), [1], backend=be),
         ValueError, "one count per segment"),
    ]
    for be in BACKENDS:
        for call, exc, msg in bad:
            with pytest.raises(exc, match=msg):
                call(be)


def test_cpu_path_allocates_no_n_by_n_matrix():
    """N = 16384: an N×N fp32 matrix would be 1 GiB; the C++ path's peak stays far below."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    script = textwrap.dedent("""
        import resource, torch
        from visprune import ops
        x = torch.randn(1, 16384, 8)
        ops.dpc_knn(x[:, :512], 8, backend="cpu")
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = ops.dpc_knn(x, 64, k=7, backend="cpu")
        assert r.assign.min() >= 0
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, check=True)
    grown_mib = int(out.stdout.split()[-1])
    assert grown_mib < 200, f"peak memory grew by {grown_mib} MiB"


class Allocations(TorchDispatchMode):
    """The largest tensor (bytes) any out-of-place torch op creates inside the block (in-place
    ops, such as the interpreter's copies of the kernels' arguments, allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.__name__.split(".")[0].endswith("_"):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
def test_triton_path_allocates_no_n_by_n_matrix():
    from visprune.triton_kernels import video
    N = 64
    x = randn((1, N, 4), seed=1)
    with Allocations() as seen:
        video.dpc_knn(x, 6, 5, None)
        video.dpc_knn_varlen(x[0], torch.tensor([0, 30, N]), [3, 3], 5, None)
        video.cluster_merge(x, torch.arange(6)[None], None, "cosine", None, None, True, 0.6,
                            "clamp")
    assert 0 < seen.largest <= N * 4 * 4      # x's own size: N tokens of 4 floats


# =========================================================================== cluster merge
MERGES = [  # what, metric, include_centers, blend, rule
    ("fastvid", "cosine", True, 0.6, "clamp"),
    ("fastvid-low-beta", "cosine", True, 0.3, "clamp"),
    ("holitom", "l2", False, 0.6, "fixed"),
    ("holitom-no-beta", "l2", False, 0.0, "clamp"),
    ("prunevid", "l2", True, None, "clamp"),
]


@pytest.mark.parametrize("what,metric,include,blend,rule", MERGES, ids=[m[0] for m in MERGES])
def test_cluster_merge_matches_the_originals_formula(what, metric, include, blend, rule):
    B, N, D = 2, 40, 12
    x = randn((B, N, D), seed=11)
    centers = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(b))[:7]
                           for b in range(B)])
    want = ops.cluster_merge(x, centers, metric=metric, include_centers=include, blend=blend,
                             blend_rule=rule, backend="reference")
    y = torch.nn.functional.normalize(x.double(), dim=-1) if metric == "cosine" else x.double()
    for b in range(B):
        d = torch.cdist(y[b], y[b][centers[b]])
        assign = d.argmin(-1).tolist()
        for s, c in enumerate(centers[b].tolist()):
            assign[c] = s
        lit = cluster_merge_literal(x[b], centers[b].tolist(), assign, include, blend, rule)
        torch.testing.assert_close(want.tokens[b].double(), lit, rtol=1e-6, atol=1e-6)
        sizes = [sum(1 for i, a in enumerate(assign) if a == s and (include or i not in centers[b]))
                 for s in range(7)]
        assert want.sizes[b].tolist() == sizes
    assert torch.equal(want.indices, centers)
    x16 = x.half()
    want16 = ops.cluster_merge(x16, centers, metric=metric, include_centers=include, blend=blend,
                               blend_rule=rule, backend="reference")
    for be in BACKENDS:
        got = ops.cluster_merge(x, centers, metric=metric, include_centers=include, blend=blend,
                                blend_rule=rule, backend=be)
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.sizes, want.sizes) and torch.equal(got.indices, want.indices)
        got16 = ops.cluster_merge(x16, centers, metric=metric, include_centers=include,
                                  blend=blend, blend_rule=rule, backend=be)
        assert got16.tokens.dtype == torch.float16
        torch.testing.assert_close(got16.tokens, want16.tokens, rtol=1e-3, atol=1e-3)


def test_cluster_merge_with_an_assignment_weights_and_a_mask():
    x = randn((1, 9, 5), seed=2)
    centers = torch.tensor([[4, 0, 7]])
    assign = torch.tensor([[1, 0, 0, -1, 0, 2, 1, 2, -1]])
    weights = torch.tensor([[1.0, 2.0, 0.0, 5.0, 1.0, 0.5, 3.0, 1.0, 1.0]])
    mask = torch.tensor([[True] * 8 + [False]])
    lit_assign = [a if m else -1 for a, m in zip(assign[0].tolist(), mask[0].tolist())]
    lit = cluster_merge_literal(x[0], [4, 0, 7], lit_assign, True, 0.5, "clamp",
                                weights[0].tolist())
    for be in BACKENDS:
        got = ops.cluster_merge(x, centers, assign, mask=mask, weights=weights, blend=0.5,
                                backend=be)
        torch.testing.assert_close(got.tokens[0].double(), lit, rtol=1e-6, atol=1e-6)
        assert got.sizes.tolist() == [[3.0, 4.0, 1.5]]
        # a slot without members (all its tokens excluded) gives its anchor
        empty = ops.cluster_merge(x, centers, torch.full((1, 9), -1), backend=be)
        assert torch.equal(empty.tokens, x[:, [4, 0, 7]]) and (empty.sizes == 0).all()


def test_prunevid_merge_of_a_dpc_result():
    x = randn((2, 50, 8), seed=5)
    r = ops.dpc_knn(x, 10, k=7, backend="reference")
    for be in BACKENDS:
        got = ops.cluster_merge(x, r.centers, r.assign, backend=be)
        same = ops.cluster_merge(x, r.centers, backend=be)     # l2 nearest centre: the same slots
        torch.testing.assert_close(got.tokens, same.tokens)
        assert got.sizes.sum().item() == 100


def test_cluster_merge_refuses_bad_arguments():
    x = randn((1, 6, 4), seed=0)
    c = torch.tensor([[1, 3]])
    bad = [
        (dict(centers=torch.tensor([[1, 1]])), ValueError, "centers has duplicate entries"),
        (dict(centers=torch.tensor([[1, 6]])), ValueError, r"centers has values in \[1, 6\]"),
        (dict(centers=c.float()), TypeError, "centers must be an integer tensor"),
        (dict(centers=c, assign=torch.full((1, 6), 2)), ValueError, "assign must hold centre slots"),
        (dict(centers=c, weights=-torch.ones(1, 6)), ValueError, "weights must be finite"),
        (dict(centers=c, blend=1.5), ValueError, r"blend must be in \[0, 1\]"),
        (dict(centers=c, blend_rule="mean"), ValueError, "blend_rule must be one of"),
        (dict(centers=c, metric="dot"), ValueError, "metric must be one of"),
        (dict(centers=c, include_centers=1), TypeError, "include_centers must be a bool"),
    ]
    for be in BACKENDS:
        for kw, exc, msg in bad:
            with pytest.raises(exc, match=msg):
                ops.cluster_merge(x, backend=be, **kw)


# =========================================================================== frame similarity
def test_temporal_similarity_matches_the_cosine_of_the_same_position():
    v = randn((2, 5, 7, 9), seed=3)
    v[0, 2, 3] = 0.0                                     # a zero token: cosine 0
    ref = [-1, 0, 0, 2, 3]                               # DyCoke's group: 1, 2 against 0, 3 against 2
    y = torch.nn.functional.normalize(v.double(), dim=-1, eps=1e-12)
    for reference, frames in ((None, [-1, 0, 1, 2, 3]), (ref, ref)):
        want = torch.stack([(y[:, t] * y[:, r]).sum(-1) if r >= 0
                            else torch.full((2, 7), -math.inf, dtype=torch.float64)
                            for t, r in enumerate(frames)], 1)
        for be in BACKENDS:
            got = ops.temporal_similarity(v, reference=reference, backend=be)
            assert got.dtype == torch.float32 and got.shape == (2, 5, 7)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for be in BACKENDS:
        got = ops.temporal_similarity(v.half(), fill=255.0, backend=be)
        assert (got[:, 0] == 255).all()
    with pytest.raises(ValueError, match=r"reference must hold frames in \[-1, T=5\)"):
        ops.temporal_similarity(v, reference=[-1, 0, 0, 5, 1])
    with pytest.raises(ValueError, match="one entry per frame"):
        ops.temporal_similarity(v, reference=[-1, 0])
    with pytest.raises(TypeError, match="fill must be a float"):
        ops.temporal_similarity(v, fill="x")


# =========================================================================== linear start
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_linear_start_is_the_largest_distance_sum(objective, metric):
    x = randn((2, 50, 16), seed=4)
    mask = random_mask(2, 50, seed=6, p=0.6, min_true=10)
    y = torch.nn.functional.normalize(x.double(), dim=-1) if metric == "cosine" else x.double()
    for be in BACKENDS:
        got = ops.greedy_select(x, 6, objective=objective, metric=metric, mask=mask,
                                start="linear", backend=be)
        for b in range(2):
            cands = mask[b].nonzero().flatten()
            yc = y[b, cands]
            d = 1 - yc @ yc.T if metric == "cosine" else torch.cdist(yc, yc).square()
            assert got[b, 0] == cands[d.sum(-1).argmax()], be
            # the steps are the objective's own: the same as that start given as an index
            same = ops.greedy_select(x[b:b + 1], 6, objective=objective, metric=metric,
                                     mask=mask[b:b + 1], start=int(got[b, 0]), backend=be)
            assert torch.equal(got[b], same[0]), be


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("path", ["gram", "stream"])
def test_linear_start_on_both_triton_paths_and_varlen(path):
    from visprune.triton_kernels import greedy
    x = randn((2, 40, 8), seed=9)
    want = ops.greedy_select(x, 5, start="linear", backend="reference")
    got = greedy.greedy_select(x, 5, "maxmin", "cosine", None, "linear", path=path)
    assert torch.equal(got, want)
    cu = torch.tensor([0, 40, 80])
    got = greedy.greedy_select_varlen(x.reshape(80, 8), cu, [5, 5], "maxmin", "cosine", None,
                                      "linear", path=path)
    assert torch.equal(got, torch.cat([want[0], want[1] + 40]))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_bench_video_originals_give_the_same_result():
    """benchmarks/bench_video.py at a tiny shape: its transliterations of PruneVid's and
    HoliTom's code give the C++ backend's centres, assignment and merged tokens."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_video.py"
    spec = importlib.util.spec_from_file_location("bench_video", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.run("cluster", 2, 40, 16, 1)
    assert row["centres_equal_fp64_original"] == 1.0 and row["assign_equal_fp64_original"] == 1.0
    row = bench.run("cluster+merge", 2, 40, 16, 1)
    assert row["centres_equal_fp32_original"] and row["merged_max_abs_diff"] < 1e-5
    assert bench.run("greedy-start", 2, 40, 16, 1)["visprune_s"]


def test_unvalidated_indices_never_lead_outside_the_tokens():
    """validate=False skips the value checks: out-of-range centres and slots still give a
    result of the right shape on the kernels (the C++ backend raises ValueError)."""
    x = randn((2, 10, 4), seed=1)
    centers = torch.tensor([[0, 99], [-5, 3]])
    assign = torch.tensor([[7, -3] * 5, [1, 0] * 5])
    for be in BACKENDS:
        if be == "reference":
            continue
        try:
            r = ops.cluster_merge(x, centers, assign, backend=be, validate=False)
        except ValueError:
            assert be == "cpu"
            continue
        assert r.tokens.shape == (2, 2, 4) and torch.equal(r.indices, centers)
