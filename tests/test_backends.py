"""Every non-reference backend against the reference: indices identical, scores within a per-dtype
tolerance, gathered tokens bitwise equal.

CPU section: the backends that can run on CPU tensors here (Triton under ``TRITON_INTERPRET=1``,
the C++ extension once built).  The interpreter is slow, so the cases are a chosen handful of
representative shapes rather than a cross-product; N = 255 only with small D and k.
GPU section (``@pytest.mark.gpu``, skipped without CUDA): the same comparisons on CUDA tensors,
bf16 included, larger shapes, and a large-N greedy that must not allocate an N² matrix.
A backend module that lacks an op makes its tests fail (AttributeError), never skip.
"""
import pytest
import torch

import visprune
from visprune import ops

from helpers import (assert_greedy_matches_literal, equal_count_mask, mi_scores_literal, randn,
                     random_mask, with_duplicates)

# Scores are float32 whatever the input dtype (inputs are upcast; arithmetic accumulates in
# fp32), so every dtype gets an fp32-level tolerance; atol is relative to the largest |score|
# (at least 1).  Measured differences between backends are ~2e-7 of that scale.
TOL = {
    torch.float32: dict(rtol=1e-5, atol_rel=1e-5),
    torch.float16: dict(rtol=1e-5, atol_rel=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol_rel=1e-5),
}

OBJECTIVES = ("maxmin", "maxsum")
METRICS = ("cosine", "l2")


def _others(device):
    return [name for name, why in visprune.available_backends(torch.device(device)).items()
            if why == "ok" and name != "reference"]


CPU_BACKENDS = _others("cpu")
GPU_BACKENDS = _others("cuda")


# =========================================================================== data
def make_x(B, N, D, seed, dtype=torch.float32, layout="contiguous", device="cpu"):
    """Seeded ``[B, N, D]`` tokens; ``layout`` picks a non-contiguous view of the same shape."""
    def base(*shape):
        return randn(shape, seed).to(device=device, dtype=dtype)

    if layout == "contiguous":
        x = base(B, N, D)
    elif layout == "transposed":                      # [N, B, D] storage
        x = base(N, B, D).transpose(0, 1)
    elif layout == "strided_n":                       # every other token
        x = base(B, 2 * N, D)[:, ::2]
    elif layout == "strided_d":                       # last-dim stride 2
        x = base(B, N, 2 * D)[:, :, ::2]
    else:
        raise AssertionError(layout)
    if N > 1 and not (B == 1 and layout == "transposed"):
        assert x.is_contiguous() == (layout == "contiguous"), layout
    return x


def sparse_rows_mask(B, N, k, seed):
    """bool[B, N]: row 0 has exactly ``k`` candidates (the sparsest), the others about half."""
    mask = random_mask(B, N, seed, p=0.5, min_true=k)
    mask[0] = equal_count_mask(1, N, k, seed + 1)[0]
    return mask


def _snapshot(*tensors):
    return [None if t is None else t.clone() for t in tensors]


def _assert_unchanged(tensors, snapshot):
    for t, s in zip(tensors, snapshot):
        if t is not None:
            torch.testing.assert_close(t, s, rtol=0, atol=0, equal_nan=True,
                                       msg="an op modified its input")


def assert_scores_close(got, ref, dtype):
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.device == ref.device
    tol = TOL[dtype]
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol["rtol"], atol=tol["atol_rel"] * scale)


def _objective_values(x_row, cands, selected, objective, metric):
    """float64 objective value of each remaining candidate (the start key when nothing is
    selected yet), for the mismatch report only."""
    xr = x_row.double()
    cols = cands if not selected else selected
    if metric == "l2":
        sq = (xr * xr).sum(-1)
        d = sq[cands][:, None] + sq[cols][None, :] - 2 * xr[cands] @ xr[cols].T
    else:
        xn = xr / xr.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        d = 1 - xn[cands] @ xn[cols].T
    d = d.clamp_min(0)
    if not selected and objective == "maxmin":
        d.fill_diagonal_(float("inf"))
    vals = d.min(-1).values if objective == "maxmin" else d.sum(-1)
    return dict(zip(cands, vals.tolist()))


def assert_same_selection(got, ref, x, objective, metric, mask=None, start="auto",
                          tolerant=False):
    """Indices must be identical; on a mismatch, report the float64 objective values of both picks
    at the first divergent step so a near-tie is told apart from a bug at a glance.

    ``tolerant`` (random tokens at large N on a GPU, where fp32 near-ties flip with the summation
    order): a mismatch passes if every pick of ``got`` is a float64 near-best along its own path."""
    assert got.dtype == torch.int64 and got.shape == ref.shape and got.device == ref.device
    if torch.equal(got, ref):
        return
    if tolerant:
        assert_greedy_matches_literal(x.cpu(), got.cpu(), objective, metric,
                                      None if mask is None else mask.cpu(), start)
        return
    got, ref = got.cpu(), ref.cpu()
    b, t = [int(v) for v in (got != ref).nonzero()[0]]
    selected = ref[b, :t].tolist()
    cands = [i for i in range(x.shape[1])
             if (mask is None or bool(mask[b, i])) and i not in selected]
    value = _objective_values(x[b].cpu(), cands, selected, objective, metric)
    g, r = int(got[b, t]), int(ref[b, t])
    twins = " (bitwise-identical tokens: an exact tie, owed to the lower index)" \
        if 0 <= g < x.shape[1] and torch.equal(x[b, g], x[b, r]) else ""
    raise AssertionError(
        f"indices differ first at row {b} step {t}: backend picked {g} "
        f"(float64 value {value.get(g, 'not a candidate')}), reference picked {r} "
        f"(float64 value {value.get(r)}){twins}; start={start!r}\nbackend:   {got[b].tolist()}\n"
        f"reference: {ref[b].tolist()}")


# =========================================================================== runners
def run_mi_scores(backend, B, N, M, D, dtype, metric, use_text_mask, layout="contiguous",
                  device="cpu", seed=0):
    visual = make_x(B, N, D, seed, dtype, layout, device)
    text = make_x(B, M, D, seed + 1, dtype, "contiguous", device)
    text_mask = None
    if use_text_mask:
        text_mask = random_mask(B, M, seed + 2, p=0.5, min_true=1).to(device)
    snap = _snapshot(visual, text, text_mask)
    got = ops.mi_scores(visual, text, text_mask=text_mask, metric=metric, backend=backend)
    ref = ops.mi_scores(visual, text, text_mask=text_mask, metric=metric, backend="reference")
    _assert_unchanged((visual, text, text_mask), snap)
    assert_scores_close(got, ref, dtype)


def run_greedy(backend, B, N, D, k, objective, metric, dtype=torch.float32, variant="plain",
               layout="contiguous", device="cpu", seed=0):
    x = make_x(B, N, D, seed, dtype, layout, device)
    mask, start = None, "auto"
    if variant == "mask":
        mask = sparse_rows_mask(B, N, k, seed + 1).to(device)
    elif variant == "dups":
        x = with_duplicates(x.cpu(), max(k, N // 3), seed + 2).to(device)
    elif variant == "start":
        start = N // 2
    elif variant == "exact":
        # Exact-arithmetic tokens: small integers (l2) or ±1 with D = 16 (cosine, norm 4); every
        # distance is exact in fp32 whatever the summation order, so ties are real ties.
        g = torch.Generator().manual_seed(seed + 3)
        if metric == "l2":
            x = torch.randint(-2, 3, (B, N, D), generator=g)
        else:
            x = torch.randint(0, 2, (B, N, 16), generator=g) * 2 - 1
        x = x.to(device=device, dtype=dtype)
    elif variant == "nonfinite":
        # The shared convention: a NaN distance counts as 0.  A NaN entry makes every distance
        # of its token NaN; so does an Inf entry under cosine (normalising gives NaN).
        x = x.clone()
        x[:, 2, 0] = float("nan")
        x[:, N - 3, D // 2] = float("nan")
        if metric == "cosine":
            x[:, N // 2, 1] = float("inf")
    else:
        assert variant == "plain", variant
    snap = _snapshot(x, mask)
    got = ops.greedy_select(x, k, objective=objective, metric=metric, mask=mask, start=start,
                            backend=backend)
    ref = ops.greedy_select(x, k, objective=objective, metric=metric, mask=mask, start=start,
                            backend="reference")
    _assert_unchanged((x, mask), snap)
    assert_same_selection(got, ref, x, objective, metric, mask, start,
                          tolerant=device != "cpu" and variant in ("plain", "mask", "start"))


def run_gather(backend, B, N, D, K, form, dtype=torch.float32, layout="contiguous",
               device="cpu", seed=0, index_dtype=torch.int64):
    x = make_x(B, N, D, seed, dtype, layout, device)
    perm = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(seed + 1 + b))
                        for b in range(B)])[:, :K]
    if form == "mask":
        index, mask, sort = None, torch.zeros(B, N, dtype=torch.bool).scatter_(1, perm, True), True
        mask = mask.to(device)
    else:
        index, mask, sort = perm.to(device=device, dtype=index_dtype), None, form == "sorted"
    snap = _snapshot(x, index, mask)
    tokens, indices = ops.gather_compact(x, index, mask=mask, sort=sort, backend=backend)
    ref_tokens, ref_indices = ops.gather_compact(x, index, mask=mask, sort=sort,
                                                 backend="reference")
    _assert_unchanged((x, index, mask), snap)
    assert indices.dtype == torch.int64 and torch.equal(indices, ref_indices)
    assert tokens.dtype == dtype and tokens.shape == ref_tokens.shape
    assert tokens.device == x.device
    assert torch.equal(tokens, ref_tokens), "gathered tokens must be exact copies"


def run_prune(backend, B, N, M, D, keep, stage1, dtype=torch.float32, use_mask=False,
              use_text_mask=False, mi_metric="l2", objective="maxsum", metric="cosine",
              layout="contiguous", device="cpu", seed=0):
    visual = make_x(B, N, D, seed, dtype, layout, device)
    text = make_x(B, M, D, seed + 1, dtype, "contiguous", device)
    text_mask = random_mask(B, M, seed + 2, p=0.5).to(device) if use_text_mask else None
    n1 = stage1 if isinstance(stage1, int) else int(stage1 * N + 0.5)
    mask = sparse_rows_mask(B, N, n1, seed + 3).to(device) if use_mask else None
    kw = dict(stage1_keep=stage1, text_mask=text_mask, mask=mask, mi_metric=mi_metric,
              objective=objective, metric=metric)
    snap = _snapshot(visual, text, text_mask, mask)
    got = ops.prune(visual, text, keep, backend=backend, **kw)
    ref = ops.prune(visual, text, keep, backend="reference", **kw)
    _assert_unchanged((visual, text, text_mask, mask), snap)
    assert isinstance(got, visprune.PruneResult)
    assert got.indices.dtype == torch.int64 and got.lengths.dtype == torch.int64
    assert torch.equal(got.lengths, ref.lengths)
    if device != "cpu" and not torch.equal(got.indices, ref.indices):
        _assert_prune_near_ties(got, backend, visual, text, keep, n1, kw)
    else:
        assert torch.equal(got.indices, ref.indices), f"\n{got.indices}\n{ref.indices}"
        assert got.tokens.dtype == dtype and torch.equal(got.tokens, ref.tokens)


def _assert_prune_near_ties(got, backend, visual, text, keep, n1, kw, rel_tol=1e-5):
    """A GPU prune that differs from the reference on random tokens must differ by near-ties
    only: its stage-1 survivors are float64 near-best by MI score, and its stage-2 picks on them
    are float64 near-best greedy steps (the tolerant check of :func:`assert_same_selection`)."""
    from visprune.common import topk_mask
    mask, text_mask = kw["mask"], kw["text_mask"]
    scores = ops.mi_scores(visual, text, text_mask=text_mask, metric=kw["mi_metric"],
                           backend=backend)
    survivors = topk_mask(scores, n1, mask)
    exact = mi_scores_literal(visual.cpu(), text.cpu(),
                              None if text_mask is None else text_mask.cpu(), kw["mi_metric"])
    for b in range(visual.shape[0]):
        cands = exact[b] if mask is None else exact[b][mask[b].cpu()]
        cut = cands.sort(descending=True).values[n1 - 1]
        tol = rel_tol * max(1.0, float(exact[b].abs().max()))
        assert bool((exact[b][survivors[b].cpu()] >= cut - tol).all()), f"row {b}: stage 1"
    chosen = ops.greedy_select(visual, keep, objective=kw["objective"], metric=kw["metric"],
                               mask=survivors, backend=backend)
    assert torch.equal(chosen.sort(-1).values, got.indices)
    assert_greedy_matches_literal(visual.cpu(), chosen.cpu(), kw["objective"], kw["metric"],
                                  survivors.cpu())
    assert torch.equal(got.tokens, visual.gather(1, got.indices[..., None].expand(
        -1, -1, visual.shape[-1])))


# =========================================================================== CPU cases
MI_CASES = [
    # B, N, M, D, dtype, metric, text_mask, layout
    pytest.param(1, 1, 1, 3, torch.float32, "l2", False, "contiguous", id="tiny-l2"),
    pytest.param(1, 1, 1, 3, torch.float32, "cosine", False, "contiguous", id="tiny-cos"),
    pytest.param(3, 7, 5, 48, torch.float32, "l2", True, "contiguous", id="n7-l2-tmask"),
    pytest.param(3, 7, 5, 48, torch.float32, "cosine", True, "contiguous", id="n7-cos-tmask"),
    pytest.param(3, 64, 9, 100, torch.float16, "l2", True, "contiguous", id="n64-fp16-l2-tmask"),
    pytest.param(3, 64, 9, 100, torch.float16, "cosine", False, "contiguous", id="n64-fp16-cos"),
    pytest.param(1, 255, 3, 100, torch.float32, "l2", False, "contiguous", id="n255-l2"),
    pytest.param(1, 255, 3, 100, torch.float32, "cosine", True, "contiguous", id="n255-cos-tmask"),
    pytest.param(3, 7, 2, 48, torch.float32, "l2", True, "transposed", id="transposed-l2"),
    pytest.param(3, 7, 2, 48, torch.float16, "cosine", False, "strided_d", id="strided-d-cos"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B, N, M, D, dtype, metric, use_text_mask, layout", MI_CASES)
def test_mi_scores_matches_reference(backend, B, N, M, D, dtype, metric, use_text_mask, layout):
    run_mi_scores(backend, B, N, M, D, dtype, metric, use_text_mask, layout)


def _greedy_cases():
    cases = []
    for objective in OBJECTIVES:
        for metric in METRICS:
            tag = f"{objective}-{metric}"
            cases += [
                pytest.param(3, 7, 48, 5, objective, metric, torch.float32, "plain", "contiguous",
                             id=f"{tag}-n7"),
                pytest.param(1, 64, 100, 16, objective, metric, torch.float32, "plain",
                             "contiguous", id=f"{tag}-n64-d100"),
                pytest.param(1, 255, 3, 16, objective, metric, torch.float32, "plain",
                             "contiguous", id=f"{tag}-n255-d3"),
                pytest.param(3, 64, 48, 12, objective, metric, torch.float16, "plain",
                             "contiguous", id=f"{tag}-n64-fp16"),
                pytest.param(3, 255, 3, 8, objective, metric, torch.float32, "mask", "contiguous",
                             id=f"{tag}-n255-mask"),
                pytest.param(2, 64, 48, 10, objective, metric, torch.float32, "dups",
                             "contiguous", id=f"{tag}-n64-dups"),
                pytest.param(3, 7, 3, 7, objective, metric, torch.float32, "start", "contiguous",
                             id=f"{tag}-n7-start-k=n"),
                pytest.param(2, 40, 3, 40, objective, metric, torch.float32, "exact",
                             "contiguous", id=f"{tag}-n40-exact-ties-k=n"),
                pytest.param(2, 64, 48, 12, objective, metric, torch.float32, "nonfinite",
                             "contiguous", id=f"{tag}-n64-nan-inf"),
                pytest.param(3, 64, 100, 8, objective, metric, torch.float32, "plain",
                             "strided_d" if metric == "cosine" else "transposed",
                             id=f"{tag}-n64-noncontig"),
            ]
    cases += [
        pytest.param(1, 1, 3, 1, "maxmin", "cosine", torch.float32, "plain", "contiguous",
                     id="maxmin-n1"),
        pytest.param(3, 1, 48, 1, "maxsum", "l2", torch.float16, "plain", "contiguous",
                     id="maxsum-n1-fp16"),
        pytest.param(3, 7, 3, 0, "maxmin", "cosine", torch.float32, "plain", "contiguous",
                     id="k0"),
        pytest.param(3, 7, 3, 0, "maxsum", "l2", torch.float32, "mask", "contiguous",
                     id="k0-mask"),
        pytest.param(3, 64, 48, 10, "maxmin", "cosine", torch.float16, "mask", "strided_n",
                     id="maxmin-cosine-fp16-mask-strided-n"),
        pytest.param(3, 64, 16, 16, "maxsum", "cosine", torch.float16, "exact", "contiguous",
                     id="maxsum-cosine-fp16-exact-ties"),
        pytest.param(3, 255, 48, 16, "maxmin", "cosine", torch.float16, "mask", "transposed",
                     id="maxmin-cosine-n255-d48-fp16-mask-transposed"),
        pytest.param(3, 255, 48, 16, "maxsum", "l2", torch.float32, "dups", "contiguous",
                     id="maxsum-l2-n255-d48-dups"),
    ]
    return cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B, N, D, k, objective, metric, dtype, variant, layout", _greedy_cases())
def test_greedy_select_matches_reference(backend, B, N, D, k, objective, metric, dtype, variant,
                                         layout):
    run_greedy(backend, B, N, D, k, objective, metric, dtype, variant, layout)


GATHER_CASES = [
    # B, N, D, K, form, dtype, layout, index dtype
    pytest.param(1, 1, 3, 1, "sorted", torch.float32, "contiguous", torch.int64, id="n1"),
    pytest.param(3, 7, 48, 4, "sorted", torch.float32, "contiguous", torch.int64, id="n7-sorted"),
    pytest.param(3, 7, 48, 4, "unsorted", torch.float16, "contiguous", torch.int32,
                 id="n7-unsorted-fp16-int32"),
    pytest.param(3, 7, 48, 4, "mask", torch.float32, "contiguous", torch.int64, id="n7-mask"),
    pytest.param(3, 7, 48, 0, "sorted", torch.float32, "contiguous", torch.int64, id="k0"),
    pytest.param(3, 7, 48, 7, "unsorted", torch.float32, "contiguous", torch.int64, id="k=n"),
    pytest.param(2, 255, 100, 64, "sorted", torch.float16, "contiguous", torch.int64,
                 id="n255-sorted-fp16"),
    pytest.param(2, 255, 100, 64, "mask", torch.float32, "contiguous", torch.int64,
                 id="n255-mask"),
    pytest.param(3, 64, 100, 16, "unsorted", torch.float32, "transposed", torch.int64,
                 id="transposed-unsorted"),
    pytest.param(3, 64, 100, 16, "sorted", torch.float16, "strided_d", torch.int64,
                 id="strided-d-sorted"),
    pytest.param(3, 64, 3, 16, "mask", torch.float32, "strided_n", torch.int64,
                 id="strided-n-mask"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B, N, D, K, form, dtype, layout, index_dtype", GATHER_CASES)
def test_gather_compact_matches_reference(backend, B, N, D, K, form, dtype, layout, index_dtype):
    run_gather(backend, B, N, D, K, form, dtype, layout, index_dtype=index_dtype)


PRUNE_CASES = [
    # B, N, M, D, keep, stage1, dtype, mask, text_mask, mi_metric, objective, metric, layout
    pytest.param(3, 64, 5, 48, 8, 32, torch.float32, False, False, "l2", "maxsum", "cosine",
                 "contiguous", id="defaults-int-stage1"),
    pytest.param(3, 64, 5, 48, 8, 0.5, torch.float32, False, True, "cosine", "maxmin", "l2",
                 "contiguous", id="float-stage1-tmask-cos-maxmin-l2"),
    pytest.param(3, 64, 5, 48, 6, 20, torch.float16, True, True, "l2", "maxsum", "l2",
                 "contiguous", id="mask-tmask-fp16"),
    pytest.param(2, 255, 4, 3, 12, 0.2, torch.float32, True, False, "l2", "maxmin", "cosine",
                 "contiguous", id="n255-mask-float-stage1"),
    pytest.param(3, 7, 2, 100, 3, 0.8, torch.float32, False, False, "cosine", "maxsum", "cosine",
                 "transposed", id="n7-transposed"),
    pytest.param(1, 7, 1, 3, 7, 7, torch.float32, False, False, "l2", "maxmin", "cosine",
                 "contiguous", id="keep=n"),
    pytest.param(3, 64, 5, 48, 0, 4, torch.float32, False, False, "l2", "maxsum", "cosine",
                 "contiguous", id="keep0"),
    pytest.param(3, 64, 5, 100, 8, 0.5, torch.float16, True, False, "l2", "maxsum", "cosine",
                 "strided_d", id="strided-d-mask-fp16"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B, N, M, D, keep, stage1, dtype, use_mask, use_text_mask, mi_metric, "
                         "objective, metric, layout", PRUNE_CASES)
def test_prune_matches_reference(backend, B, N, M, D, keep, stage1, dtype, use_mask,
                                 use_text_mask, mi_metric, objective, metric, layout):
    run_prune(backend, B, N, M, D, keep, stage1, dtype, use_mask, use_text_mask, mi_metric,
              objective, metric, layout)


# =========================================================================== GPU cases
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("B, N, M, D, use_text_mask, layout", [
    (1, 7, 5, 48, True, "contiguous"),
    (3, 576, 64, 4096, True, "contiguous"),
    (8, 2880, 32, 100, False, "transposed"),
])
def test_gpu_mi_scores_matches_reference(backend, dtype, metric, B, N, M, D, use_text_mask,
                                         layout):
    run_mi_scores(backend, B, N, M, D, dtype, metric, use_text_mask, layout, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("B, N, D, k, variant, layout", [
    (3, 7, 48, 5, "plain", "contiguous"),
    (1, 576, 4096, 64, "plain", "contiguous"),
    (8, 576, 1024, 128, "mask", "contiguous"),
    (2, 1000, 256, 100, "dups", "contiguous"),
    (3, 255, 100, 64, "start", "strided_d"),
    (2, 300, 16, 300, "exact", "contiguous"),
    (1, 2880, 256, 320, "plain", "transposed"),
])
def test_gpu_greedy_select_matches_reference(backend, dtype, objective, metric, B, N, D, k,
                                             variant, layout):
    run_greedy(backend, B, N, D, k, objective, metric, dtype, variant, layout, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("B, N, D, K, form, layout", [
    (1, 7, 48, 3, "sorted", "contiguous"),
    (64, 576, 4096, 64, "sorted", "contiguous"),
    (8, 2880, 1000, 320, "unsorted", "transposed"),
    (8, 576, 4096, 192, "mask", "strided_d"),
])
def test_gpu_gather_compact_matches_reference(backend, dtype, B, N, D, K, form, layout):
    run_gather(backend, B, N, D, K, form, dtype, layout, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("B, N, M, D, keep, stage1, use_mask, use_text_mask, layout", [
    (1, 576, 64, 4096, 64, 0.8, False, True, "contiguous"),
    (8, 576, 64, 4096, 128, 400, True, True, "contiguous"),
    (2, 2880, 32, 1024, 320, 0.5, False, False, "transposed"),
])
def test_gpu_prune_matches_reference(backend, dtype, B, N, M, D, keep, stage1, use_mask,
                                     use_text_mask, layout):
    run_prune(backend, B, N, M, D, keep, stage1, dtype, use_mask, use_text_mask, layout=layout,
              device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b == "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gpu_large_n_greedy_has_no_n_squared_allocation(backend, objective):
    B, N, D, k = 1, 16384, 256, 64
    x = make_x(B, N, D, 5, torch.float16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = ops.greedy_select(x, k, objective=objective, metric="cosine", backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < N * N * 4 // 8, f"greedy_select allocated {extra} bytes at N={N}"
    ref = ops.greedy_select(x, k, objective=objective, metric="cosine", backend="reference")
    assert_same_selection(got, ref, x, objective, "cosine")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_empty_batch_shapes(backend):
    """B = 0 keeps the contract's shapes on every backend."""
    v, t = torch.randn(0, 7, 5), torch.randn(0, 3, 5)
    out = ops.prune(v, t, 2, backend=backend)
    assert out.tokens.shape == (0, 2, 5) and out.indices.shape == (0, 2)
    tokens, idx = ops.gather_compact(v, mask=torch.zeros(0, 7, dtype=torch.bool), backend=backend)
    assert tokens.shape == (0, 0, 5) and idx.shape == (0, 0)
    assert ops.greedy_select(v, 3, backend=backend).shape == (0, 3)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("sort", [True, False])
def test_gather_never_returns_the_callers_index(backend, sort):
    index = torch.tensor([[2, 0]])
    _, got = ops.gather_compact(torch.randn(1, 4, 3), index, sort=sort, backend=backend)
    got[0, 0] = 3
    assert index.tolist() == [[2, 0]]
