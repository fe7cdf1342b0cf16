"""The compiled extension visprune._C: its CPU backend against the reference, torch.compile
over visprune.ops, and (marked gpu) its CUDA backend.

Indices must be identical to the reference; floats within the dtype's tolerance.
"""
import os
import shutil

import pytest
import torch

import visprune
from visprune import _ext, ops
from visprune import reference as ref

from helpers import assert_greedy_matches_literal

needs_cpu = pytest.mark.skipif(not _ext.has_cpu(), reason=f"visprune._C not built: {_ext.IMPORT_ERROR}")
needs_cuda = pytest.mark.skipif(not (_ext.has_cuda() and torch.cuda.is_available()),
                                reason="needs the CUDA kernels of visprune._C and a CUDA GPU")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# mi_scores tolerance per input dtype: the op accumulates in fp32 either way, but the l2 scores
# are large (~2·D) and the reference's |v|² - 2v·t + |t|² loses digits to cancellation.
ATOL = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 1e-3}
RTOL = 2e-5


def _tokens(B, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g).to(dtype)


def _mask(B, N, keep_at_least, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, generator=g) > 0.4
    m[:, :keep_at_least] = True
    return m


# --------------------------------------------------------------------------- build / wiring
def test_import_reports_extension_status():
    """Importing visprune never fails; a missing extension or CUDA part is reported, not raised."""
    status = visprune.available_backends(torch.device("cpu"))
    if _ext.has_cpu():
        assert status["cpu"] == "ok" and _ext.IMPORT_ERROR is None
    else:
        assert "visprune._C" in status["cpu"] and _ext.IMPORT_ERROR
    if not _ext.has_cuda():
        assert status["cuda"] != "ok"
        assert ("CUDA" if _ext.has_cpu() else "visprune._C") in status["cuda"]


@pytest.mark.skipif(not os.environ.get("CI") or os.environ.get("VISPRUNE_NO_EXT", "0") != "0"
                    or shutil.which("c++") is None, reason="only CI with a compiler must build it")
def test_ci_builds_the_extension():
    assert _ext.has_cpu(), f"visprune._C did not build in CI: {_ext.IMPORT_ERROR}"


@needs_cpu
def test_cpu_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv("VISPRUNE_BACKEND", raising=False)
    assert visprune.backends.default_backend(torch.device("cpu")) == "cpu"
    assert hasattr(torch.ops.visprune, "greedy_select")


@needs_cpu
def test_cuda_backend_on_cpu_tensors_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        ops.greedy_select(_tokens(1, 8, 4), 2, backend="cuda")


# --------------------------------------------------------------------------- greedy_select
SHAPES = [(1, 1, 1, 1), (2, 7, 3, 4), (3, 33, 17, 10), (2, 130, 65, 64), (1, 257, 130, 31),
          (2, 64, 256, 64), (1, 576, 64, 64)]


@needs_cpu
@pytest.mark.parametrize("B,N,D,k", SHAPES)
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_greedy_select_matches_reference(B, N, D, k, objective, metric):
    x = _tokens(B, N, D, seed=N + D)
    want = ref.greedy_select(x, k, objective, metric)
    got = ops.greedy_select(x, k, objective=objective, metric=metric, backend="cpu")
    assert got.dtype == torch.long and torch.equal(got, want)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_greedy_select_mask_start_dtype(dtype, objective, metric):
    x = _tokens(3, 61, 37, dtype)
    mask = _mask(3, 61, 20)
    for start in ("auto", 5):
        want = ref.greedy_select(x, 12, objective, metric, mask, start)
        got = ops.greedy_select(x, 12, objective=objective, metric=metric, mask=mask, start=start,
                                backend="cpu")
        assert torch.equal(got, want), start
        assert bool(mask.gather(1, got).all())


@needs_cpu
def test_greedy_select_non_contiguous_and_unmodified():
    base = _tokens(2, 40, 24)
    x = base.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2, :]  # strided view
    before = x.clone()
    got = ops.greedy_select(x, 9, objective="maxsum", backend="cpu")
    assert torch.equal(got, ref.greedy_select(x, 9, "maxsum"))
    assert torch.equal(x, before)


@needs_cpu
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_greedy_select_edge_counts(objective, metric):
    x = _tokens(2, 9, 5)
    assert ops.greedy_select(x, 0, objective=objective, metric=metric, backend="cpu").shape == (2, 0)
    for k in (1, 9):  # a single pick, and every token
        want = ref.greedy_select(x, k, objective, metric)
        assert torch.equal(ops.greedy_select(x, k, objective=objective, metric=metric,
                                             backend="cpu"), want)
    one = torch.zeros(2, 9, dtype=torch.bool)
    one[:, 4] = True  # the only candidate: maxmin's start key is +inf there
    assert ops.greedy_select(x, 1, objective=objective, metric=metric, mask=one,
                             backend="cpu").tolist() == [[4], [4]]


# --------------------------------------------------------------------------- ties
@needs_cpu
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("D", [3, 64, 1000])
def test_identical_tokens_go_in_index_order(objective, metric, D):
    x = _tokens(2, 1, D).repeat(1, 37, 1)
    got = ops.greedy_select(x, 11, objective=objective, metric=metric, backend="cpu")
    assert torch.equal(got, ref.greedy_select(x, 11, objective, metric))
    assert got.tolist() == [list(range(11))] * 2


@needs_cpu
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_duplicated_tokens(objective, metric):
    # Every third token repeats an earlier one: the twins tie exactly, and the lower index wins.
    x = _tokens(2, 90, 48, seed=3)
    x[:, 2::3] = x[:, 0:30]
    mask = _mask(2, 90, 30, seed=4)
    for m in (None, mask):
        want = ref.greedy_select(x, 40, objective, metric, m)
        got = ops.greedy_select(x, 40, objective=objective, metric=metric, mask=m, backend="cpu")
        assert torch.equal(got, want)


@needs_cpu
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_zero_tokens(objective, metric):
    x = _tokens(1, 30, 16, seed=5)
    x[:, [3, 17, 18]] = 0
    got = ops.greedy_select(x, 12, objective=objective, metric=metric, backend="cpu")
    assert torch.equal(got, ref.greedy_select(x, 12, objective, metric))


# --------------------------------------------------------------------------- NaN / Inf
def _poisoned(kind, seed=6):
    x = _tokens(2, 40, 12, seed=seed)
    if kind == "nan":
        x[0, 5, 3] = float("nan")
        x[1, [0, 22]] = float("nan")
    elif kind == "inf":
        x[0, 7, 1] = float("inf")
        x[1, 9, 0] = -float("inf")
        x[1, 30] = float("inf")
    else:  # huge: squared norms overflow to inf, normalisation does not
        x[0, 11] = 3e19
        x[1, 2, 5] = -3e19
    return x


@needs_cpu
@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_greedy_select_non_finite(kind, objective, metric):
    x = _poisoned(kind)
    got = ops.greedy_select(x, 25, objective=objective, metric=metric, backend="cpu")
    assert torch.equal(got, ref.greedy_select(x, 25, objective, metric))
    assert all(len(set(row)) == 25 for row in got.tolist())


@needs_cpu
@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
@pytest.mark.parametrize("mi_metric", ["l2", "cosine"])
def test_prune_and_scores_non_finite(kind, mi_metric):
    x = _poisoned(kind)
    t = _tokens(2, 6, 12, seed=7)
    want, got = ref.mi_scores(x, t, None, mi_metric), ops.mi_scores(x, t, metric=mi_metric,
                                                                    backend="cpu")
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=RTOL, atol=ATOL[torch.float32])
    for objective in ("maxmin", "maxsum"):
        r = ref.prune(x, t, 8, 30, None, None, mi_metric, objective, "cosine")
        c = ops.prune(x, t, 8, stage1_keep=30, mi_metric=mi_metric, objective=objective,
                      backend="cpu")
        assert torch.equal(c.indices, r.indices)
        torch.testing.assert_close(c.tokens, r.tokens, rtol=0, atol=0, equal_nan=True)


@needs_cpu
@pytest.mark.parametrize("mi_metric", ["l2", "cosine"])
def test_padded_text_tokens_do_not_leak(mi_metric):
    x, t = _tokens(2, 20, 8), _tokens(2, 4, 8, seed=9)
    tm = torch.tensor([[True, True, False, False], [True, False, True, True]])
    t[0, 3, 2] = float("nan")
    t[1, 1, 0] = float("inf")
    want = ref.mi_scores(x, t, tm, mi_metric)
    got = ops.mi_scores(x, t, text_mask=tm, metric=mi_metric, backend="cpu")
    assert bool(torch.isfinite(want).all())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL[torch.float32])


# --------------------------------------------------------------------------- mi_scores
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("B,N,M,D", [(1, 1, 1, 1), (2, 33, 7, 65), (3, 100, 16, 257)])
def test_mi_scores_matches_reference(dtype, metric, B, N, M, D):
    x, t = _tokens(B, N, D, dtype), _tokens(B, M, D, dtype, seed=2)
    for tm in (None, _mask(B, M, 1, seed=3)):
        want = ref.mi_scores(x, t, tm, metric)
        got = ops.mi_scores(x, t, text_mask=tm, metric=metric, backend="cpu")
        assert got.dtype == torch.float32 and got.shape == (B, N)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL[dtype])


# --------------------------------------------------------------------------- gather_compact
@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_gather_compact_matches_reference(dtype):
    x = (_tokens(3, 29, 13) * 100).to(dtype)
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(29, generator=g)[:11] for _ in range(3)])
    for sort in (True, False):
        want = ref.gather_compact(x, index, None, sort)
        got = ops.gather_compact(x, index, sort=sort, backend="cpu")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    mask = torch.zeros(3, 29, dtype=torch.bool).scatter_(1, index, True)
    want, got = ref.gather_compact(x, None, mask), ops.gather_compact(x, mask=mask, backend="cpu")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].is_contiguous()


@needs_cpu
def test_gather_compact_strided_and_int32_index():
    x = _tokens(2, 50, 20).transpose(1, 2).contiguous().transpose(1, 2)  # last dim not contiguous
    index = torch.tensor([[4, 0, 49], [7, 8, 1]], dtype=torch.int32)
    for sort in (True, False):
        want = ref.gather_compact(x, index, None, sort)
        got = ops.gather_compact(x, index, sort=sort, backend="cpu")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ops.gather_compact(x, index[:, :0], backend="cpu")[0].shape == (2, 0, 20)


# --------------------------------------------------------------------------- prune
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("objective", ["maxsum", "maxmin"])
@pytest.mark.parametrize("mi_metric,metric", [("l2", "cosine"), ("cosine", "l2")])
def test_prune_matches_reference(dtype, objective, mi_metric, metric):
    x, t = _tokens(2, 97, 40, dtype), _tokens(2, 9, 40, dtype, seed=2)
    cases = [dict(), dict(mask=_mask(2, 97, 60)), dict(text_mask=_mask(2, 9, 1, seed=5))]
    for kw in cases:
        for stage1 in (0.8, 50, 97 if "mask" not in kw else 60):
            n1 = ref.stage1_count(97, stage1)
            want = ref.prune(x, t, 17, n1, kw.get("text_mask"), kw.get("mask"), mi_metric,
                             objective, metric)
            got = ops.prune(x, t, 17, stage1_keep=stage1, mi_metric=mi_metric, objective=objective,
                            metric=metric, backend="cpu", **kw)
            assert torch.equal(got.indices, want.indices), (kw.keys(), stage1)
            assert torch.equal(got.tokens, want.tokens) and got.tokens.dtype == dtype
            assert torch.equal(got.lengths, want.lengths)


@needs_cpu
def test_prune_llava_shape():
    x, t = _tokens(1, 576, 256), _tokens(1, 64, 256, seed=2)
    want = ref.prune(x, t, 64, ref.stage1_count(576, 0.8))
    got = ops.prune(x, t, 64, backend="cpu")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.tokens, want.tokens)


@needs_cpu
def test_prune_keep_zero_and_all():
    x, t = _tokens(2, 10, 6), _tokens(2, 3, 6)
    assert ops.prune(x, t, 0, stage1_keep=4, backend="cpu").tokens.shape == (2, 0, 6)
    got, want = ops.prune(x, t, 10, stage1_keep=10, backend="cpu"), ref.prune(x, t, 10, 10)
    assert torch.equal(got.indices, want.indices)


# --------------------------------------------------------------------------- errors
@needs_cpu
def test_bad_input_errors_through_ops():
    x, t = _tokens(2, 10, 6), _tokens(2, 3, 6)
    with pytest.raises(ValueError, match="k=11"):
        ops.greedy_select(x, 11, backend="cpu")
    with pytest.raises(TypeError, match="dtype"):
        ops.greedy_select(x.double(), 2, backend="cpu")
    with pytest.raises(ValueError, match="duplicate"):
        ops.gather_compact(x, torch.tensor([[1, 1], [0, 2]]), backend="cpu")
    with pytest.raises(ValueError, match="text_mask"):
        ops.mi_scores(x, t, text_mask=torch.zeros(2, 3, dtype=torch.bool), backend="cpu")


@needs_cpu
def test_structural_errors_from_the_kernels():
    """Direct torch.ops calls (and compiled graphs) get the checks that read no tensor data from
    C++, with the argument named."""
    vp = torch.ops.visprune
    x, t = _tokens(2, 10, 6), _tokens(2, 3, 6)
    with pytest.raises(ValueError, match="out of range"):
        vp.greedy_select(x, 2, "maxmin", "cosine", None, 10)
    with pytest.raises(ValueError, match="k=11"):
        vp.greedy_select(x, 11, "maxmin", "cosine", None, -1)
    with pytest.raises(ValueError, match="objective"):
        vp.greedy_select(x, 2, "median", "cosine", None, -1)
    with pytest.raises(ValueError, match="metric"):
        vp.mi_scores(x, t, None, "dot")
    with pytest.raises(ValueError, match="mi_metric"):
        vp.prune(x, t, 2, 4, None, None, "dot", "maxsum", "cosine")
    with pytest.raises(TypeError, match="dtype"):
        vp.greedy_select(x.double(), 2, "maxmin", "cosine", None, -1)
    with pytest.raises(TypeError, match="mask"):
        vp.greedy_select(x, 2, "maxmin", "cosine", torch.ones(2, 10), -1)
    with pytest.raises(ValueError, match=r"\[B, M, D\]"):
        vp.mi_scores(x, t[:, :, :4], None, "l2")
    with pytest.raises(ValueError, match="text_mask"):
        vp.mi_scores(x, t, torch.ones(2, 4, dtype=torch.bool), "l2")
    with pytest.raises(ValueError, match="exactly one"):
        vp.gather_compact(x, None, None, True)
    with pytest.raises(TypeError, match="index"):
        vp.gather_compact(x, torch.zeros(2, 2), None, True)
    with pytest.raises(ValueError, match="keep"):
        vp.prune(x, t, 5, 4, None, None, "l2", "maxsum", "cosine")
    with pytest.raises(ValueError, match="stage1_keep=11"):
        vp.prune(x, t, 2, 11, None, None, "l2", "maxsum", "cosine")


@needs_cpu
def test_bad_values_from_the_cpu_kernels():
    """The value checks are visprune.ops' (skipped with validate=False); the CPU kernels raise
    ValueError for the bad values their own work meets, and never read out of bounds."""
    vp = torch.ops.visprune
    x, t = _tokens(2, 10, 6), _tokens(2, 3, 6)
    few = torch.zeros(2, 10, dtype=torch.bool)
    few[:, :3] = True
    with pytest.raises(ValueError, match="k=4 is larger than the number of candidate"):
        vp.greedy_select(x, 4, "maxmin", "cosine", few, -1)
    with pytest.raises(ValueError, match="not a candidate"):
        vp.greedy_select(x, 2, "maxmin", "cosine", few, 7)
    with pytest.raises(ValueError, match="not a candidate"):  # past the last candidate
        vp.greedy_select(x, 2, "maxsum", "l2", few, 9)
    with pytest.raises(ValueError, match="text_mask"):
        vp.mi_scores(x, t, torch.tensor([[True, False, False], [False] * 3]), "l2")
    for sort in (True, False):
        for bad in ([[0, 10], [1, 2]], [[0, 1], [-1, 2]], [[0, 1], [2, 2 ** 40]]):
            with pytest.raises(ValueError, match=r"expected \[0, 10\)"):
                vp.gather_compact(x, torch.tensor(bad), None, sort)
        with pytest.raises(ValueError, match="duplicate"):
            vp.gather_compact(x, torch.tensor([[3, 5, 3], [1, 2, 0]]), None, sort)
    uneven = few.clone()
    uneven[1, 5] = True
    with pytest.raises(ValueError, match="different counts"):
        vp.gather_compact(x, None, uneven, True)
    # prune names the count that is too large for the mask: stage1_keep, not k.
    with pytest.raises(ValueError, match="stage1_keep=5 is larger than the number of candidate"):
        vp.prune(x, t, 2, 5, None, few, "l2", "maxsum", "cosine")
    with pytest.raises(ValueError, match="text_mask"):
        vp.prune(x, t, 2, 3, torch.tensor([[True] * 3, [False] * 3]), None, "l2", "maxsum",
                 "cosine")


@needs_cpu
def test_gather_compact_never_returns_the_callers_index():
    x = _tokens(2, 10, 6)
    for index in (torch.tensor([[4, 1], [0, 9]]), torch.tensor([[1, 4], [0, 9]]),
                  torch.tensor([[4, 1], [0, 9]], dtype=torch.int32)):
        for sort in (True, False):
            before = index.clone()
            _, idx = torch.ops.visprune.gather_compact(x, index, None, sort)
            assert idx.dtype == torch.long and idx.data_ptr() != index.data_ptr()
            idx.fill_(7)
            assert torch.equal(index, before)


# --------------------------------------------------------------------------- layout
def _d_major(x):
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("D", [37, 1000])
def test_duplicates_tie_whatever_the_layout(dtype, objective, metric, D):
    # A D-major view rounds (x*x).sum(-1) of bitwise-identical tokens differently by position
    # unless the tokens are made contiguous first; then a later copy could win the tie.
    g = torch.Generator().manual_seed(D)
    x = torch.cat([torch.randn(1, 1, D, generator=g), torch.randn(1, 1, D, generator=g)
                   .expand(1, 39, D)], 1).to(dtype)
    xd = _d_major(x)
    assert not xd.is_contiguous() and torch.equal(xd, x)
    for start in (0, -1):
        got = torch.ops.visprune.greedy_select(xd, 2, objective, metric, None, start)
        want = ref.greedy_select(xd, 2, objective, metric, None, "auto" if start < 0 else start)
        assert torch.equal(got, want), start
        if start == 0:
            assert got.tolist() == [[0, 1]]
    r = torch.ops.visprune.prune(xd, x[:, :3], 2, 40, None, None, "l2", objective, metric)
    assert torch.equal(r[1], ref.prune(xd, x[:, :3], 2, 40, None, None, "l2", objective, metric)
                       .indices)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_identical_tokens_get_identical_scores_whatever_the_layout(dtype, metric):
    g = torch.Generator().manual_seed(0)
    x = _d_major(torch.randn(2, 1, 301, generator=g).expand(2, 40, 301).to(dtype))
    t = _d_major(torch.randn(2, 5, 301, generator=g).to(dtype))
    s = torch.ops.visprune.mi_scores(x, t, None, metric)
    assert bool((s == s[:, :1]).all())


# --------------------------------------------------------------------------- huge tokens
@needs_cpu
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
def test_overflowing_l2_tokens_give_valid_indices(objective):
    """Finite tokens whose squared norm overflows fp32: the reference's and the CPU kernel's
    dot products of two such tokens may overflow differently (the order of a BLAS sum is not
    the kernel's), so only validity is required where two of them meet."""
    x = _tokens(2, 40, 12, seed=2)
    x[0, 8] = 3e19 * _tokens(1, 1, 12, seed=3)[0, 0]
    x[0, 26] = 1e19
    got = torch.ops.visprune.greedy_select(x, 25, objective, "l2", None, -1)
    assert all(len(set(row)) == 25 and min(row) >= 0 and max(row) < 40 for row in got.tolist())


# --------------------------------------------------------------------------- torch.compile
@needs_cpu
def test_torch_compile_fullgraph_over_ops():
    torch._dynamo.reset()
    x, t = _tokens(2, 40, 16), _tokens(2, 5, 16, seed=2)
    mask, tm = _mask(2, 40, 25), torch.ones(2, 5, dtype=torch.bool)

    def pipeline(x, t, mask, tm):
        s = ops.mi_scores(x, t, text_mask=tm)
        g = ops.greedy_select(x, 5, mask=mask, objective="maxsum")
        tok, idx = ops.gather_compact(x, g)
        kept, kept_idx = ops.gather_compact(x, mask=(torch.arange(40) % 3 == 1).expand(2, 40))
        r = ops.prune(x, t, 4, stage1_keep=0.5, mask=mask, text_mask=tm)
        return s, g, tok, idx, kept, kept_idx, r.tokens, r.indices, r.lengths

    want = pipeline(x, t, mask, tm)
    got = torch.compile(pipeline, fullgraph=True, backend="aot_eager")(x, t, mask, tm)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_cpu
def test_torch_compile_inductor_prune():
    torch._dynamo.reset()
    x, t = _tokens(1, 64, 32), _tokens(1, 8, 32, seed=2)

    def f(x, t):
        r = ops.prune(x * 2, t, 8, stage1_keep=0.75)
        return r.tokens.sum(-1), r.indices

    want = f(x, t)
    got = torch.compile(f, fullgraph=True)(x, t)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("B,N,D,k", [(1, 7, 3, 4), (1, 576, 4096, 64), (3, 300, 65, 100),
                                     (2, 2880, 128, 320)])
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_cuda_greedy_select_matches_reference(B, N, D, k, objective, metric):
    x = _tokens(B, N, D, seed=N).cuda()
    mask = _mask(B, N, k, seed=D).cuda()
    for m in (None, mask):
        want = ref.greedy_select(x, k, objective, metric, m)
        got = ops.greedy_select(x, k, objective=objective, metric=metric, mask=m, backend="cuda")
        if not torch.equal(got, want):
            # Random tokens at large N: fp32 near-ties may flip with the summation order; every
            # pick must still be a float64 near-best along its own path.
            assert_greedy_matches_literal(x.cpu(), got.cpu(), objective, metric,
                                          None if m is None else m.cpu())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_gather_and_prune_match_reference(dtype):
    x, t = _tokens(2, 576, 256, dtype).cuda(), _tokens(2, 64, 256, dtype, seed=2).cuda()
    index = torch.stack([torch.randperm(576)[:64] for _ in range(2)]).cuda()
    for sort in (True, False):
        want = ref.gather_compact(x, index, None, sort)
        got = ops.gather_compact(x, index, sort=sort, backend="cuda")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    want = ref.prune(x, t, 64, ref.stage1_count(576, 0.8))
    got = ops.prune(x, t, 64, backend="cuda")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.tokens, want.tokens)
    x[0, 3] = float("nan")
    assert torch.equal(ops.greedy_select(x, 64, backend="cuda"), ref.greedy_select(x, 64))
