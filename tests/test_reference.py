"""The reference backend against hand-computed cases, float64 transliterations of DESIGN.md's
formulas, and the contract's properties (ties, masks, k=0, NaN/Inf, inputs untouched)."""
import math

import pytest
import torch

from visprune import ops
from visprune.reference import PruneResult

from helpers import (assert_greedy_matches_literal, distinct_groups, equal_count_mask,
                     greedy_literal, mi_scores_literal, randn, random_mask, stable_topk_literal,
                     with_duplicates)

REF = dict(backend="reference")
OBJECTIVES = ("maxmin", "maxsum")
METRICS = ("cosine", "l2")


def _assert_close_scaled(got, want, rtol=1e-5, atol_rel=1e-5):
    """fp32 result vs a float64 transliteration: atol relative to the values' magnitude."""
    want = want.to(got.dtype)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol_rel * scale)


def _rows(t):
    return [row.tolist() for row in t]


# =========================================================================== mi_scores
def test_mi_scores_hand_computed_l2_and_cosine_with_zero_text_token_and_padding():
    visual = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    # text: t0 = 0 (zero vector), t1 = (2, 0), t2 = padding (masked out)
    text = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [100.0, -7.0]]])
    text_mask = torch.tensor([[True, True, False]])
    # l2: v0: -(|(1,0)|² + |(-1,0)|²)/2 = -(1 + 1)/2 = -1; v1: -(9 + (4 + 9))/2 = -11
    l2 = ops.mi_scores(visual, text, text_mask=text_mask, metric="l2", **REF)
    assert l2.dtype == torch.float32 and l2.shape == (1, 2)
    torch.testing.assert_close(l2, torch.tensor([[-1.0, -11.0]]))
    # cosine: a zero vector has cosine 0 with everything; cos(v0, t1) = 1, cos(v1, t1) = 0
    cos = ops.mi_scores(visual, text, text_mask=text_mask, metric="cosine", **REF)
    torch.testing.assert_close(cos, torch.tensor([[0.5, 0.0]]))


def test_mi_scores_default_metric_is_l2():
    v, t = randn((2, 5, 4), 1), randn((2, 3, 4), 2)
    torch.testing.assert_close(ops.mi_scores(v, t, **REF), ops.mi_scores(v, t, metric="l2", **REF))
    cosine = ops.mi_scores(v, t, metric="cosine", **REF)
    assert not torch.allclose(ops.mi_scores(v, t, **REF), cosine)


def test_mi_scores_token_equal_to_the_only_text_token_scores_highest():
    v = randn((1, 6, 5), 3)
    t = v[:, 4:5].clone() * 1.0
    for metric in METRICS:
        assert int(ops.mi_scores(v, t, metric=metric, **REF).argmax()) == 4


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "text_mask"])
def test_mi_scores_matches_float64_literal(metric, dtype, use_mask):
    B, N, M, D = 3, 7, 5, 6
    visual, text = randn((B, N, D), 10, dtype), randn((B, M, D), 11, dtype)
    text_mask = None
    if use_mask:
        text_mask = torch.tensor([[True, True, True, True, True],
                                  [True, False, True, False, False],
                                  [False, False, False, True, False]])
    got = ops.mi_scores(visual, text, text_mask=text_mask, metric=metric, **REF)
    assert got.dtype == torch.float32 and got.shape == (B, N)
    _assert_close_scaled(got, mi_scores_literal(visual, text, text_mask, metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_mi_scores_padding_values_do_not_matter(metric):
    B, N, M, D = 2, 5, 6, 4
    visual, text = randn((B, N, D), 20), randn((B, M, D), 21)
    text_mask = torch.tensor([[True, False, True, True, False, False],
                              [False, False, False, False, False, True]])
    junk = text.clone()
    junk[~text_mask] = 1e3 * randn((int((~text_mask).sum()), D), 22)
    got = ops.mi_scores(visual, junk, text_mask=text_mask, metric=metric, **REF)
    for b in range(B):
        valid = text[b:b + 1, text_mask[b]]
        torch.testing.assert_close(got[b:b + 1], ops.mi_scores(visual[b:b + 1], valid,
                                                               metric=metric, **REF))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_mi_scores_nonfinite_padding_is_excluded(bad):
    visual, text = randn((1, 4, 3), 30), randn((1, 3, 3), 31)
    text_mask = torch.tensor([[True, True, False]])
    poisoned = text.clone()
    poisoned[0, 2] = bad
    for metric in METRICS:
        torch.testing.assert_close(
            ops.mi_scores(visual, poisoned, text_mask=text_mask, metric=metric, **REF),
            ops.mi_scores(visual, text[:, :2], metric=metric, **REF))


# =========================================================================== greedy_select
# Points on a line (D = 1), squared L2: x = 0, 1, 3, 10.
LINE = torch.tensor([[[0.0], [1.0], [3.0], [10.0]]])


def test_greedy_maxmin_l2_on_a_line_hand_computed():
    # start: nearest-neighbour distances 1, 1, 4, 49 -> token 3 (x=10) is the most isolated;
    # then the farthest from {10} is 0 (100); then min to {10, 0}: x=1 -> 1, x=3 -> 9 -> token 2.
    got = ops.greedy_select(LINE, 4, objective="maxmin", metric="l2", **REF)
    assert _rows(got) == [[3, 0, 2, 1]]


def test_greedy_maxsum_l2_on_a_line_hand_computed():
    # start: distance sums 110, 86, 62, 230 -> token 3; then sums to {10}: 100, 81, 49 -> 0;
    # then sums to {10, 0}: x=1 -> 81 + 1 = 82, x=3 -> 49 + 9 = 58 -> token 1 (maxmin picks 2).
    got = ops.greedy_select(LINE, 4, objective="maxsum", metric="l2", **REF)
    assert _rows(got) == [[3, 0, 1, 2]]


def _directions(angles_deg, radii):
    return torch.tensor([[[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))]
                          for a, r in zip(angles_deg, radii)]])


# Unit directions at 0, 60, 90, 150, 225 degrees with unequal lengths (cosine ignores length).
# Pairwise angles: 01 60, 02 90, 03 150, 04 135, 12 30, 13 90, 14 165, 23 60, 24 135, 34 75.
FAN = _directions([0, 60, 90, 150, 225], [1.0, 3.0, 0.5, 2.0, 4.0])


def test_greedy_maxmin_cosine_on_directions_hand_computed():
    # start: nearest-neighbour angles 60, 30, 30, 60, 75 -> token 4; farthest from it: token 1
    # (165°); then min angle to {4, 1}: t0 60, t2 30, t3 75 -> 3; then t0 60 vs t2 30 -> 0; then 2.
    got = ops.greedy_select(FAN, 5, objective="maxmin", metric="cosine", **REF)
    assert _rows(got) == [[4, 1, 3, 0, 2]]


def test_greedy_maxsum_cosine_on_directions_hand_computed():
    # 1 - cos: 30° .134, 60° .5, 75° .741, 90° 1, 135° 1.707, 150° 1.866, 165° 1.966.
    # start sums: t0 5.07, t1 3.60, t2 3.34, t3 4.11, t4 6.12 -> 4; then d to t4 -> 1 (1.966);
    # sums to {4, 1}: t0 2.21, t2 1.84, t3 1.74 -> 0; then t2 2.84 vs t3 3.61 -> 3; then 2.
    got = ops.greedy_select(FAN, 5, objective="maxsum", metric="cosine", **REF)
    assert _rows(got) == [[4, 1, 0, 3, 2]]


def test_greedy_defaults_are_maxmin_cosine_auto_start():
    x = randn((2, 12, 4), 40)
    assert torch.equal(ops.greedy_select(x, 6, **REF),
                       ops.greedy_select(x, 6, objective="maxmin", metric="cosine", start="auto",
                                         **REF))
    assert _rows(ops.greedy_select(FAN, 5, **REF)) == [[4, 1, 3, 0, 2]]


# Exact duplicates on a line: x = 0, 10, 10, 0, 5 (3 distinct values), squared L2, exact in fp32.
DUP_LINE = torch.tensor([[[0.0], [10.0], [10.0], [0.0], [5.0]]])


def test_greedy_maxmin_ties_go_to_lowest_index_hand_computed():
    # start: tokens 0-3 have a duplicate (nearest distance 0), token 4 has 25 -> 4; then every
    # other token is at 25 from x=5 -> tie -> 0; then min to {5, 0}: t1 25, t2 25, t3 0 -> 1.
    got = ops.greedy_select(DUP_LINE, 3, objective="maxmin", metric="l2", **REF)
    assert _rows(got) == [[4, 0, 1]]


def test_greedy_maxsum_ties_go_to_lowest_index_hand_computed():
    # start sums: t0..t3 225 each, t4 100 -> tie -> 0; sums to {0}: t1 100, t2 100, t3 0, t4 25
    # -> 1; sums to {0, 1}: t2 100, t3 100, t4 50 -> tie -> 2.
    got = ops.greedy_select(DUP_LINE, 3, objective="maxsum", metric="l2", **REF)
    assert _rows(got) == [[0, 1, 2]]


def test_greedy_cosine_ties_between_duplicate_directions_hand_computed():
    # t0 = t3 = (1, 0), t1 = t2 = (0, 1), t4 = (-1, -1): t4 is the only token without a duplicate
    # (start); all others are at 135° from it -> 0; then t1 and t2 tie at 90° from t0 -> 1.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, -1.0]]])
    got = ops.greedy_select(x, 3, objective="maxmin", metric="cosine", **REF)
    assert _rows(got) == [[4, 0, 1]]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
def test_greedy_matches_float64_brute_force_on_random_inputs(objective, metric, dtype, use_mask):
    B, N, D, k = 3, 24, 5, 10
    x = randn((B, N, D), 50, dtype)
    mask = random_mask(B, N, 51, p=0.6, min_true=k) if use_mask else None
    got = ops.greedy_select(x, k, objective=objective, metric=metric, mask=mask, **REF)
    assert got.dtype == torch.int64 and got.shape == (B, k)
    assert_greedy_matches_literal(x, got, objective, metric, mask)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
def test_greedy_matches_brute_force_exactly_on_exact_arithmetic_data(objective, metric):
    """Small-integer tokens (l2) and ±1 tokens with D = 16 (cosine, norm 4) make every distance
    exact in fp32, so ties are exact and must all go to the lowest index, for any k up to N."""
    B, N = 2, 20
    g = torch.Generator().manual_seed(60)
    if metric == "l2":
        x = torch.randint(-2, 3, (B, N, 3), generator=g).float()
    else:
        x = torch.randint(0, 2, (B, N, 16), generator=g).float() * 2 - 1
    for k in (1, 7, N):
        got = ops.greedy_select(x, k, objective=objective, metric=metric, **REF)
        assert torch.equal(got, greedy_literal(x, k, objective, metric)), k


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
def test_greedy_picks_lowest_index_among_duplicate_tokens(objective, metric):
    B, N, D, n_distinct = 2, 30, 6, 12
    x = with_duplicates(randn((B, N, D), 70), n_distinct, 71)
    got = ops.greedy_select(x, n_distinct, objective=objective, metric=metric, **REF)
    for b in range(B):
        group = distinct_groups(x[b])
        chosen = []
        for pick in got[b].tolist():
            members = [i for i in range(N) if group[i] == group[pick] and i not in chosen]
            assert pick == min(members), (b, pick, members)
            chosen.append(pick)
        if objective == "maxmin":  # a farthest-point pick never repeats a token value
            assert len({group[i] for i in chosen}) == len(chosen)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
def test_greedy_indices_unique_in_range_and_masked(objective, metric):
    B, N, D = 4, 17, 3
    x = randn((B, N, D), 80)
    mask = random_mask(B, N, 81, p=0.5, min_true=6)
    got = ops.greedy_select(x, 6, objective=objective, metric=metric, mask=mask, **REF)
    for b in range(B):
        row = got[b].tolist()
        assert len(set(row)) == 6 and all(0 <= i < N for i in row)
        assert all(bool(mask[b, i]) for i in row)


def test_greedy_mask_with_single_candidate_per_row_and_k_equals_candidates():
    x = randn((2, 5, 3), 90)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3] = True
    mask[1, 0] = True
    for objective in OBJECTIVES:
        assert _rows(ops.greedy_select(x, 1, objective=objective, mask=mask, **REF)) == [[3], [0]]
    mask = random_mask(2, 9, 91, p=0.5)
    mask[1] = mask[0]
    n = int(mask[0].sum())
    got = ops.greedy_select(randn((2, 9, 3), 92), n, mask=mask, **REF)
    for b in range(2):
        assert sorted(got[b].tolist()) == mask[b].nonzero().flatten().tolist()


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
def test_greedy_int_start_is_first_then_follows_the_definition(objective, metric):
    B, N, D, k = 2, 15, 4, 6
    x = randn((B, N, D), 100)
    for start in (0, 7, N - 1):
        got = ops.greedy_select(x, k, objective=objective, metric=metric, start=start, **REF)
        assert (got[:, 0] == start).all()
        assert_greedy_matches_literal(x, got, objective, metric, start=start)


def test_greedy_int_start_with_mask():
    x = randn((2, 10, 4), 101)
    mask = random_mask(2, 10, 102, p=0.6, min_true=4)
    mask[:, 5] = True
    got = ops.greedy_select(x, 4, start=5, mask=mask, **REF)
    assert (got[:, 0] == 5).all()
    assert_greedy_matches_literal(x, got, "maxmin", "cosine", mask, start=5)


def test_greedy_k_zero_returns_empty_int64():
    x = randn((3, 5, 2), 110)
    for mask in (None, random_mask(3, 5, 111)):
        got = ops.greedy_select(x, 0, mask=mask, **REF)
        assert got.shape == (3, 0) and got.dtype == torch.int64


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
def test_greedy_single_token(objective, metric):
    x = randn((2, 1, 4), 120)
    got = ops.greedy_select(x, 1, objective=objective, metric=metric, **REF)
    assert _rows(got) == [[0], [0]]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("poison", ["nan_tokens", "inf_tokens", "mixed", "all_nan", "huge"])
def test_greedy_nonfinite_inputs_give_unique_in_range_indices(objective, metric, poison):
    B, N, D = 3, 9, 4
    x = randn((B, N, D), 130)
    if poison == "nan_tokens":
        x[:, [1, 4]] = math.nan
    elif poison == "inf_tokens":
        x[:, 2, 0] = math.inf
        x[:, 6] = -math.inf
    elif poison == "mixed":
        x[0, 0, 1] = math.nan
        x[1, 3] = math.inf
        x[2, :, 2] = -math.inf
    elif poison == "all_nan":
        x[:] = math.nan
    else:
        x[:, 5] = 3e38  # its squared norm overflows to inf
    mask = random_mask(B, N, 131, p=0.7, min_true=5)
    for m, k in ((None, N), (mask, 5)):
        got = ops.greedy_select(x, k, objective=objective, metric=metric, mask=m, **REF)
        for b in range(B):
            row = got[b].tolist()
            assert len(set(row)) == k and all(0 <= i < N for i in row)
            if m is not None:
                assert all(bool(m[b, i]) for i in row)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("start", ["auto", 4])
def test_greedy_maxsum_nan_token_counts_as_distance_zero(metric, start):
    """The reference's convention: a NaN distance counts as 0.  With maxsum a NaN token adds
    nothing to any sum and its own sum stays 0, so it is picked last and the other picks are
    exactly those made without it."""
    B, N, D, bad = 2, 9, 4, 2
    x = randn((B, N, D), 125)
    x_nan = x.clone()
    x_nan[:, bad, 0] = math.nan
    got = ops.greedy_select(x_nan, N, objective="maxsum", metric=metric, start=start, **REF)
    keep = [i for i in range(N) if i != bad]
    start_wo = start if start == "auto" else keep.index(start)
    without = ops.greedy_select(x[:, keep], N - 1, objective="maxsum", metric=metric,
                                start=start_wo, **REF)
    assert _rows(got) == [[keep[i] for i in row] + [bad] for row in without.tolist()]


@pytest.mark.parametrize("metric", METRICS)
def test_greedy_maxmin_nan_token_makes_every_start_key_zero(metric):
    """d(i, nan) = 0 gives every token a nearest distance of 0: the auto start is the lowest
    index; with an int start the NaN token (run 0) is picked last, the rest as without it."""
    B, N, D, bad = 2, 8, 3, 5
    x = randn((B, N, D), 126)
    x_nan = x.clone()
    x_nan[:, bad, 1] = math.nan
    assert (ops.greedy_select(x_nan, 3, objective="maxmin", metric=metric, **REF)[:, 0] == 0).all()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, 0] = False
    first = ops.greedy_select(x_nan, 1, objective="maxmin", metric=metric, mask=mask, **REF)
    assert _rows(first) == [[1], [1]]
    got = ops.greedy_select(x_nan, N, objective="maxmin", metric=metric, start=3, **REF)
    keep = [i for i in range(N) if i != bad]
    without = ops.greedy_select(x[:, keep], N - 1, objective="maxmin", metric=metric,
                                start=keep.index(3), **REF)
    assert _rows(got) == [[keep[i] for i in row] + [bad] for row in without.tolist()]


# =========================================================================== gather_compact
def _numbered(B, N, D, dtype=torch.float32):
    """x[b, n, :] = 100 b + n, so each gathered row tells where it came from."""
    base = (100 * torch.arange(B)[:, None] + torch.arange(N)[None, :]).to(dtype)
    return base[:, :, None].expand(B, N, D).contiguous()


def test_gather_index_sorted_keeps_original_order():
    x = _numbered(2, 6, 3)
    index = torch.tensor([[4, 0, 2], [5, 1, 3]])
    tokens, indices = ops.gather_compact(x, index, **REF)
    assert indices.dtype == torch.int64 and _rows(indices) == [[0, 2, 4], [1, 3, 5]]
    assert torch.equal(tokens[:, :, 0], torch.tensor([[0.0, 2.0, 4.0], [101.0, 103.0, 105.0]]))
    assert tokens.shape == (2, 3, 3) and tokens.is_contiguous()


def test_gather_index_unsorted_keeps_given_order():
    x = _numbered(2, 6, 3)
    index = torch.tensor([[4, 0, 2], [5, 1, 3]], dtype=torch.int32)
    tokens, indices = ops.gather_compact(x, index, sort=False, **REF)
    assert indices.dtype == torch.int64 and _rows(indices) == [[4, 0, 2], [5, 1, 3]]
    assert torch.equal(tokens[:, :, 0], torch.tensor([[4.0, 0.0, 2.0], [105.0, 101.0, 103.0]]))


def test_gather_mask_form_in_original_order():
    x = _numbered(2, 5, 2)
    mask = torch.tensor([[False, True, True, False, True], [True, False, False, True, True]])
    for sort in (True, False):
        tokens, indices = ops.gather_compact(x, mask=mask, sort=sort, **REF)
        assert _rows(indices) == [[1, 2, 4], [0, 3, 4]]
        assert torch.equal(tokens[:, :, 1], torch.tensor([[1.0, 2.0, 4.0], [100.0, 103.0, 104.0]]))


def test_gather_empty_selection():
    x = _numbered(2, 4, 3)
    tokens, indices = ops.gather_compact(x, mask=torch.zeros(2, 4, dtype=torch.bool), **REF)
    assert tokens.shape == (2, 0, 3) and indices.shape == (2, 0)
    tokens, indices = ops.gather_compact(x, torch.zeros(2, 0, dtype=torch.long), **REF)
    assert tokens.shape == (2, 0, 3) and indices.shape == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64])
def test_gather_preserves_dtype_and_values(dtype):
    x = randn((2, 7, 5), 140).mul(10).to(dtype)
    index = torch.tensor([[6, 1, 3], [0, 2, 5]])
    tokens, indices = ops.gather_compact(x, index, **REF)
    assert tokens.dtype == dtype
    for b in range(2):
        for j, i in enumerate(indices[b].tolist()):
            assert torch.equal(tokens[b, j], x[b, i])


@pytest.mark.parametrize("view", ["transposed", "strided", "sliced_d"])
def test_gather_non_contiguous_input(view):
    B, N, D = 3, 8, 5
    base = randn((N, B, 2 * D), 150)
    x = {"transposed": base.transpose(0, 1)[:, :, :D],
         "strided": randn((B, 2 * N, D), 151)[:, ::2],
         "sliced_d": base.transpose(0, 1)[:, :, 1::2]}[view]
    assert not x.is_contiguous()
    index = torch.tensor([[7, 0, 3], [2, 6, 1], [5, 4, 0]])
    tokens, indices = ops.gather_compact(x, index, **REF)
    mask = torch.zeros(B, N, dtype=torch.bool).scatter_(1, index, True)
    tokens_m, indices_m = ops.gather_compact(x, mask=mask, **REF)
    assert torch.equal(indices, indices_m)
    for b in range(B):
        assert torch.equal(tokens[b], x[b, indices[b]])
        assert torch.equal(tokens_m[b], x[b, indices[b]])


# =========================================================================== prune
def prune_composition(visual, text, keep, n1, text_mask=None, mask=None, mi_metric="l2",
                      objective="maxsum", metric="cosine"):
    """The literal pipeline: mi_scores -> stable top-n1 (ties to the lowest index) among the
    candidates -> greedy_select on the survivors -> gather in ascending index order."""
    B, N, _ = visual.shape
    scores = ops.mi_scores(visual, text, text_mask=text_mask, metric=mi_metric, **REF)
    survivors = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        cands = [i for i in range(N) if mask is None or bool(mask[b, i])]
        survivors[b, stable_topk_literal(scores[b].tolist(), n1, cands)] = True
    chosen = ops.greedy_select(visual, keep, objective=objective, metric=metric, mask=survivors,
                               **REF)
    indices = chosen.sort(-1).values
    tokens = torch.stack([visual[b, indices[b]] for b in range(B)])
    return tokens, indices


def _check_prune_result(res, visual, keep, mask=None):
    assert isinstance(res, PruneResult)
    B = visual.shape[0]
    assert res.tokens.shape == (B, keep, visual.shape[2]) and res.tokens.dtype == visual.dtype
    assert res.indices.dtype == torch.int64 and res.lengths.dtype == torch.int64
    assert res.lengths.tolist() == [keep] * B
    for b in range(B):
        row = res.indices[b].tolist()
        assert row == sorted(set(row)), "indices must be unique and ascending"
        assert torch.equal(res.tokens[b], visual[b, res.indices[b]])
        if mask is not None:
            assert all(bool(mask[b, i]) for i in row)


@pytest.mark.parametrize("mi_metric", ["l2", "cosine"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("stage1", [11, 0.6], ids=["int", "float"])
def test_prune_equals_literal_composition(mi_metric, objective, metric, stage1):
    B, N, M, D, keep = 3, 20, 4, 6, 5
    visual, text = randn((B, N, D), 160), randn((B, M, D), 161)
    text_mask = torch.tensor([[True, True, True, True], [True, False, False, True],
                              [False, True, False, False]])
    n1 = 11 if isinstance(stage1, int) else 12                   # 0.6 * 20 = 12
    res = ops.prune(visual, text, keep, stage1_keep=stage1, text_mask=text_mask,
                    mi_metric=mi_metric, objective=objective, metric=metric, **REF)
    _check_prune_result(res, visual, keep)
    tokens, indices = prune_composition(visual, text, keep, n1, text_mask, None, mi_metric,
                                        objective, metric)
    assert torch.equal(res.indices, indices)
    assert torch.equal(res.tokens, tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prune_with_mask_equals_literal_composition(dtype):
    B, N, M, D, keep = 3, 16, 3, 5, 4
    visual, text = randn((B, N, D), 170, dtype), randn((B, M, D), 171, dtype)
    mask = random_mask(B, N, 172, p=0.6, min_true=9)
    res = ops.prune(visual, text, keep, stage1_keep=9, mask=mask, **REF)
    _check_prune_result(res, visual, keep, mask)
    tokens, indices = prune_composition(visual, text, keep, 9, mask=mask)
    assert torch.equal(res.indices, indices) and torch.equal(res.tokens, tokens)


def test_prune_defaults_are_0p8_l2_maxsum_cosine():
    B, N, M, D, keep = 2, 10, 3, 4, 3
    visual, text = randn((B, N, D), 180), randn((B, M, D), 181)
    res = ops.prune(visual, text, keep, **REF)
    _, indices = prune_composition(visual, text, keep, 8, mi_metric="l2", objective="maxsum",
                                   metric="cosine")
    assert torch.equal(res.indices, indices)


def test_prune_stage1_ties_go_to_lowest_index_hand_computed():
    # text = {0}; l2 scores of x = 3, 1, -1, 2, 1 are -9, -1, -1, -4, -1 (three-way tie).
    visual = torch.tensor([[[3.0], [1.0], [-1.0], [2.0], [1.0]]])
    text = torch.zeros(1, 1, 1)
    # stage1_keep=2: survivors {1, 2} (not 4) -> both kept.
    res = ops.prune(visual, text, 2, stage1_keep=2, objective="maxsum", metric="cosine", **REF)
    assert _rows(res.indices) == [[1, 2]]
    # stage1_keep=3: survivors {1, 2, 4}; cosine distances 2 between +1 and -1, 0 between the
    # two +1 -> start sums t1 2, t2 4, t4 2 -> 2; then t1 and t4 tie at 2 -> 1.
    res = ops.prune(visual, text, 2, stage1_keep=3, objective="maxsum", metric="cosine", **REF)
    assert _rows(res.indices) == [[1, 2]]
    # keep 1 of the survivors {1, 2, 4}: the maxsum start alone -> 2.
    res = ops.prune(visual, text, 1, stage1_keep=3, objective="maxsum", metric="cosine", **REF)
    assert _rows(res.indices) == [[2]]


@pytest.mark.parametrize("N, fraction, n1", [
    (10, 0.25, 3),   # 2.5 rounds half up (not to even) -> 3
    (6, 0.75, 5),    # 4.5 -> 5 (round-half-even would give 4)
    (10, 0.24, 2),   # 2.4 -> 2
    (10, 0.26, 3),   # 2.6 -> 3
    (7, 1.0, 7),     # the whole row
])
def test_prune_float_stage1_keep_is_fraction_of_n_rounded_half_up(N, fraction, n1):
    B, M, D = 2, 3, 4
    visual, text = randn((B, N, D), 190), randn((B, M, D), 191)
    # keep == n1 keeps exactly the stage-1 survivors: the top-n1 mi_scores.
    res = ops.prune(visual, text, n1, stage1_keep=fraction, **REF)
    scores = ops.mi_scores(visual, text, **REF)
    for b in range(B):
        assert res.indices[b].tolist() == stable_topk_literal(scores[b].tolist(), n1, range(N))
    with pytest.raises(ValueError, match="keep"):
        ops.prune(visual, text, n1 + 1, stage1_keep=fraction, **REF)


def test_prune_int_stage1_keep_one_is_a_count_not_a_fraction():
    visual, text = randn((1, 6, 3), 200), randn((1, 2, 3), 201)
    res = ops.prune(visual, text, 1, stage1_keep=1, **REF)
    assert res.indices.tolist() == [[int(ops.mi_scores(visual, text, **REF).argmax())]]
    with pytest.raises(ValueError):
        ops.prune(visual, text, 2, stage1_keep=1, **REF)
    assert ops.prune(visual, text, 6, stage1_keep=1.0, **REF).indices.tolist() == [list(range(6))]


def test_prune_keep_zero():
    visual, text = randn((2, 5, 3), 210), randn((2, 2, 3), 211)
    res = ops.prune(visual, text, 0, stage1_keep=2, **REF)
    assert res.tokens.shape == (2, 0, 3) and res.indices.shape == (2, 0)
    assert res.lengths.tolist() == [0, 0]


# =========================================================================== side effects
def _call_every_op(visual, text, text_mask, mask, index, gmask):
    ops.mi_scores(visual, text, text_mask=text_mask, metric="l2", **REF)
    ops.mi_scores(visual, text, text_mask=text_mask, metric="cosine", **REF)
    for objective in OBJECTIVES:
        for metric in METRICS:
            ops.greedy_select(visual, 3, objective=objective, metric=metric, mask=mask, **REF)
    ops.gather_compact(visual, index, **REF)
    ops.gather_compact(visual, index, sort=False, **REF)
    ops.gather_compact(visual, mask=gmask, **REF)
    ops.prune(visual, text, 2, stage1_keep=4, text_mask=text_mask, mask=mask, **REF)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inputs_are_never_modified(dtype):
    B, N, M, D = 2, 8, 3, 4
    visual = randn((N, B, D), 220, dtype).transpose(0, 1)             # non-contiguous too
    text = randn((B, M, D), 221, dtype)
    text_mask = torch.tensor([[True, False, True], [False, True, False]])
    mask = random_mask(B, N, 222, p=0.7, min_true=5)
    index = torch.tensor([[5, 1, 3], [0, 7, 2]])
    gmask = equal_count_mask(B, N, 3, 223)
    inputs = (visual, text, text_mask, mask, index, gmask)
    before = [t.clone() for t in inputs]
    _call_every_op(*inputs)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b)


def test_ops_leave_global_matmul_precision_unchanged():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        x = randn((1, 6, 3), 230)
        ops.greedy_select(x, 3, **REF)
        ops.mi_scores(x, x, **REF)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)
