"""The varlen (packed, ragged batch) ops against their definition: every segment of a packed
``[T, D]`` tensor gives what the dense op gives on that segment alone.

Each available backend's varlen op is compared with the same backend's dense op, called once per
segment (indices identical, tokens bitwise equal), and the reference's varlen op with the dense
reference.  Segments of lengths 0, 1, 7 and 255 side by side, D = 33 and 100, masks, exact
duplicates (ties), per-segment and uniform counts, fp32 and fp16.  The Triton kernels run under
``TRITON_INTERPRET=1`` on CPU, so N = 255 comes with small D and k.  Then gradients, the
unvalidated path, the value checks and one error test per argument.  GPU cases (bf16, large
segments, the CUDA extension) are marked ``gpu``.
"""
import pytest
import torch

import visprune
from visprune import ops

from helpers import gen, randn, with_duplicates


def _backends(device):
    return [name for name, why in visprune.available_backends(torch.device(device)).items()
            if why == "ok"]


CPU_BACKENDS = _backends("cpu")
GPU_BACKENDS = [b for b in _backends("cuda") if b != "reference"]

# name: segment lengths, D
CASES = {
    "mixed": ([1, 7, 0, 40], 33),
    "long": ([255, 3, 0, 17], 33),
    "wide": ([12, 0, 30, 9], 100),
}


def packed(lengths, D, seed, dtype=torch.float32, dups=0, device="cpu"):
    """``(x[T, D], cu_seqlens int32[B+1])``; ``dups``: each segment holds only that many distinct
    tokens (exact copies scattered through it), so exact ties decide."""
    segs = []
    for b, n in enumerate(lengths):
        s = randn((1, n, D), seed + b)
        if dups and n > dups:
            s = with_duplicates(s, dups, seed + 100 + b)
        segs.append(s[0])
    x = torch.cat(segs).to(device=device, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    return x, cu


def segments(cu):
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def seg_mask(lengths, seed, need, device="cpu"):
    """``bool[T]`` with about 70 % True and at least ``need[b]`` True in segment ``b``."""
    g = gen(seed)
    parts = []
    for n, k in zip(lengths, need):
        m = torch.rand(n, generator=g) < 0.7
        if int(m.sum()) < k:
            m[torch.randperm(n, generator=g)[:k]] = True
        parts.append(m)
    return torch.cat(parts).to(device)


def dense_greedy(x, cu, k, backend, mask=None, **kw):
    """The dense op on each segment alone, shifted to global positions."""
    out = []
    for (lo, hi), kb in zip(segments(cu), k):
        if kb:
            m = None if mask is None else mask[None, lo:hi]
            out.append(ops.greedy_select(x[None, lo:hi], kb, mask=m, backend=backend, **kw)[0] + lo)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


# =========================================================================== greedy_select_varlen
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case, objective, metric, start, masked, dups, dtype, uniform", [
    ("mixed", "maxmin", "cosine", "auto", False, 0, torch.float32, False),
    ("mixed", "maxsum", "l2", 0, True, 0, torch.float16, True),
    ("long", "maxsum", "cosine", "auto", True, 5, torch.float32, False),
    ("long", "maxmin", "l2", "auto", False, 0, torch.float16, False),
    ("wide", "maxmin", "cosine", 2, False, 4, torch.float32, True),
    ("wide", "maxsum", "l2", "auto", False, 0, torch.float32, False),
])
def test_greedy_select_varlen_matches_dense_per_segment(backend, case, objective, metric, start,
                                                         masked, dups, dtype, uniform):
    lengths, D = CASES[case]
    x, cu = packed(lengths, D, seed=len(case) + D, dtype=dtype, dups=dups)
    # k_b <= n_b; the empty segment takes 0 (a uniform k is 0 only there, via a list)
    k = [min(n, 4) for n in lengths] if uniform else [min(n, 1 + (3 * b) % 6) for b, n in
                                                      enumerate(lengths)]
    mask = seg_mask(lengths, 3, k) if masked else None
    if masked and start != "auto":
        mask[cu[:-1].long()[torch.tensor(lengths) > 0] + start] = True
    kw = dict(objective=objective, metric=metric, start=start)
    got = ops.greedy_select_varlen(x, cu, k, mask=mask, backend=backend, **kw)
    assert got.dtype == torch.long and got.shape == (sum(k),)
    assert torch.equal(got, dense_greedy(x, cu, k, backend, mask, **kw))
    if backend != "reference":
        assert torch.equal(got, ops.greedy_select_varlen(x, cu, k, mask=mask, backend="reference",
                                                         **kw))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_greedy_select_varlen_uniform_int_k_and_count_forms(backend):
    x, cu = packed([5, 9, 6], 16, seed=4)
    want = ops.greedy_select_varlen(x, cu, [3, 3, 3], backend=backend)
    assert torch.equal(ops.greedy_select_varlen(x, cu, 3, backend=backend), want)
    assert torch.equal(ops.greedy_select_varlen(x, cu.long(), torch.tensor([3, 3, 3]),
                                                backend=backend), want)
    assert torch.equal(want, dense_greedy(x, cu, [3, 3, 3], "reference"))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_greedy_select_varlen_exact_duplicates_tie_to_the_lower_index(backend):
    row = randn((1, 3, 8), 7)[0]
    x = torch.cat([row, row, row[:1], row])           # segments [row, row] and [row[0], row]
    cu = torch.tensor([0, 6, 10])
    for objective in ("maxmin", "maxsum"):
        got = ops.greedy_select_varlen(x, cu, [3, 3], objective=objective, backend=backend)
        assert torch.equal(got, ops.greedy_select_varlen(x, cu, [3, 3], objective=objective,
                                                         backend="reference")), objective
        # each segment's picks are distinct tokens, the first copy of each
        assert got[:3].sort().values.tolist() == [0, 1, 2], objective


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("objective, start", [("maxmin", "auto"), ("maxsum", "auto"),
                                              ("maxsum", 1)])
def test_triton_varlen_stream_path_matches_the_reference(objective, start, monkeypatch):
    from visprune.triton_kernels import greedy
    monkeypatch.setattr(greedy, "GRAM_MAX_N", 16)     # segments longer than 16: stream path
    x, cu = packed([40, 0, 3, 23], 20, seed=11)
    k = [6, 0, 2, 5]
    mask = seg_mask([40, 0, 3, 23], 12, k)
    mask[cu[:-1].long()[[0, 2, 3]] + 1] = True
    got = ops.greedy_select_varlen(x, cu, k, objective=objective, start=start, mask=mask,
                                   backend="triton")
    assert torch.equal(got, ops.greedy_select_varlen(x, cu, k, objective=objective, start=start,
                                                     mask=mask, backend="reference"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_greedy_select_varlen_empty_batch_and_zero_counts(backend):
    x, cu = packed([4, 0, 3], 8, seed=1)
    assert ops.greedy_select_varlen(x, cu, 0, backend=backend).shape == (0,)
    empty = torch.empty(0, 8)
    assert ops.greedy_select_varlen(empty, torch.zeros(1, dtype=torch.int32), [],
                                    backend=backend).shape == (0,)
    got = ops.greedy_select_varlen(x, cu, [0, 0, 3], backend=backend)
    assert sorted(got.tolist()) == [4, 5, 6]


# =========================================================================== prune_varlen
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case, stage1, mi_metric, objective, metric, masked, text_masked, dtype", [
    ("mixed", 0.8, "l2", "maxsum", "cosine", False, True, torch.float32),
    ("long", "counts", "cosine", "maxmin", "l2", True, False, torch.float16),
    ("wide", 0.5, "l2", "maxmin", "cosine", True, True, torch.float32),
])
def test_prune_varlen_matches_dense_per_segment(backend, case, stage1, mi_metric, objective,
                                                metric, masked, text_masked, dtype):
    lengths, D = CASES[case]
    x, cu = packed(lengths, D, seed=21 + D, dtype=dtype, dups=3 if case == "long" else 0)
    B = len(lengths)
    text = randn((B, 5, D), 22).to(dtype)
    tm = torch.arange(5)[None] < torch.tensor([5, 2, 1, 4])[:, None] if text_masked else None
    if stage1 == "counts":
        stage1 = [min(n, 6) for n in lengths]
    counts = [int(s1) for s1 in (stage1 if isinstance(stage1, list) else
                                 [int(stage1 * n + 0.5) for n in lengths])]
    keep = [min(c, 2 + b) for b, c in enumerate(counts)]
    mask = seg_mask(lengths, 23, counts) if masked else None
    kw = dict(mi_metric=mi_metric, objective=objective, metric=metric)
    got = ops.prune_varlen(x, cu, text, keep, stage1_keep=stage1, text_mask=tm, mask=mask,
                           backend=backend, **kw)
    assert got.lengths.tolist() == keep
    toks, idx = [], []
    for b, (lo, hi) in enumerate(segments(cu)):
        if keep[b] == 0:
            continue
        s1 = stage1[b] if isinstance(stage1, list) else stage1
        r = ops.prune(x[None, lo:hi], text[b:b + 1], keep[b], stage1_keep=s1,
                      text_mask=None if tm is None else tm[b:b + 1],
                      mask=None if mask is None else mask[None, lo:hi], backend=backend, **kw)
        toks.append(r.tokens[0])
        idx.append(r.indices[0] + lo)
    assert torch.equal(got.indices, torch.cat(idx))
    assert torch.equal(got.tokens, torch.cat(toks))
    if backend != "reference":
        ref = ops.prune_varlen(x, cu, text, keep, stage1_keep=stage1, text_mask=tm, mask=mask,
                               backend="reference", **kw)
        assert torch.equal(got.indices, ref.indices)


# =========================================================================== gather_compact_varlen
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", ["index_sorted", "index_unsorted", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32, torch.bool])
def test_gather_compact_varlen_matches_dense_per_segment(backend, form, dtype):
    lengths = [7, 0, 1, 12]
    x, cu = packed(lengths, 33, seed=31)
    x = (x > 0) if dtype == torch.bool else (x * 100).to(dtype)
    g = gen(32)
    picks = [torch.randperm(n, generator=g)[:k] for n, k in zip(lengths, [3, 0, 1, 5])]
    index = torch.cat([p + lo for p, (lo, _) in zip(picks, segments(cu))])
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[index] = True
    if form == "mask":
        got = ops.gather_compact_varlen(x, cu, mask=mask, backend=backend)
    else:
        got = ops.gather_compact_varlen(x, cu, index.int(), sort=form == "index_sorted",
                                        backend=backend)
    tokens, indices, cu_out = got
    assert cu_out.dtype == torch.long and cu_out.tolist() == [0, 3, 3, 4, 9]
    want_t, want_i = [], []
    for p, (lo, hi) in zip(picks, segments(cu)):
        if form == "mask":
            t, i = ops.gather_compact(x[None, lo:hi], mask=mask[None, lo:hi], backend=backend)
        else:
            t, i = ops.gather_compact(x[None, lo:hi], p[None], sort=form == "index_sorted",
                                      backend=backend)
        want_t.append(t[0])
        want_i.append(i[0] + lo)
    assert torch.equal(indices, torch.cat(want_i))
    assert torch.equal(tokens, torch.cat(want_t))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_gradients_match_the_reference(backend):
    x, cu = packed([6, 0, 9], 12, seed=41)
    text = randn((3, 4, 12), 42)
    index = torch.tensor([4, 1, 8, 13, 6])
    grads = {}
    for b in dict.fromkeys(["reference", backend]):
        y = x.clone().requires_grad_(True)
        tokens, _, _ = ops.gather_compact_varlen(y, cu, index, sort=False, backend=b)
        r = ops.prune_varlen(y, cu, text, [2, 0, 3], stage1_keep=5, backend=b)
        weights = torch.arange(tokens.numel(), dtype=torch.float32).reshape(tokens.shape)
        ((tokens * weights).sum() + (r.tokens ** 2).sum()).backward()
        grads[b] = y.grad
    assert grads["reference"].abs().sum() > 0
    assert torch.equal(grads[backend], grads["reference"])


# =========================================================================== validate=False
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_validate_false_gives_the_same_results(backend):
    x, cu = packed([9, 0, 5], 16, seed=51)
    text = randn((3, 3, 16), 52)
    for v in (True, False):
        got = [ops.greedy_select_varlen(x, cu, [3, 0, 2], start=1, backend=backend, validate=v),
               *ops.prune_varlen(x, cu, text, [2, 0, 1], stage1_keep=0.6, backend=backend,
                                 validate=v),
               *ops.gather_compact_varlen(x, cu, torch.tensor([3, 1, 10]), backend=backend,
                                          validate=v)]
        if v:
            want = got
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_unvalidated_bad_offsets_stay_in_bounds(backend):
    x, _ = packed([10], 8, seed=61)
    for cu in (torch.tensor([0, 14, 10]), torch.tensor([3, 2, 25])):   # past T, decreasing
        try:
            out = ops.greedy_select_varlen(x, cu, [2, 1], backend=backend, validate=False)
        except ValueError:        # the CPU kernels report what they meet
            continue
        assert out.shape == (3,) and ((out >= -1) & (out < 10)).all()


# =========================================================================== errors
def _args():
    x, cu = packed([4, 0, 5], 8, seed=71)
    return x, cu, randn((3, 2, 8), 72)


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, cu, t: ops.greedy_select_varlen(x[None], cu, 1), ValueError, r"x must have shape \[T, D\]"),
    (lambda x, cu, t: ops.greedy_select_varlen(x.long(), cu, 1), TypeError, "x must have dtype"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, [0, 4, 4, 9], 1), TypeError, "cu_seqlens must be"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu.float(), 1), TypeError, "cu_seqlens must have dtype"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu[None], 1), ValueError, r"cu_seqlens must have shape \[B\+1\]"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, torch.tensor([0, 4, 3, 9]), 1), ValueError, "never decrease"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, torch.tensor([0, 4, 4, 8]), [1, 0, 1]), ValueError, "end at T=9"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, torch.tensor([1, 4, 4, 9]), [1, 0, 1]), ValueError, "start at 0"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 1, 1]), ValueError, "k=1 is larger than segment 1's length"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0]), ValueError, r"k must have one count per segment \(B=3\), got 2"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, -1, 1]), ValueError, "k must be >= 0"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1.5]), TypeError, r"k\[2\] must be an int"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, torch.tensor([1., 0., 1.])), TypeError, "k must be an int"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, 2.0), TypeError, "k must be an int"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], objective="mean"), ValueError, "objective must be one of"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], metric="dot"), ValueError, "metric must be one of"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], mask=torch.ones(9)), TypeError, "mask must have dtype bool"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], mask=torch.ones(1, 9, dtype=torch.bool)), ValueError, r"mask must have shape \[T\]"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [4, 0, 1], mask=torch.arange(9) != 1), ValueError, "k=4 is larger than the number of candidate tokens in segment 0"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], start=-1), ValueError, "start=-1 must be >= 0"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], start="first"), ValueError, "start must be 'auto'"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], start=4), ValueError, "out of range for segment 0"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], start=1, mask=torch.arange(9) != 5), ValueError, "not a candidate.*segment 2"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, [1, 0, 1], validate=1), TypeError, "validate must be a bool"),
    (lambda x, cu, t: ops.greedy_select_varlen(x, cu, 1, backend="tpu"), ValueError, "backend must be one of"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t[:2], [1, 0, 1]), ValueError, r"text must have shape \[B, M, D\] with B=3"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t.half(), [1, 0, 1]), TypeError, "text has dtype"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 0, 1], text_mask=torch.zeros(3, 2, dtype=torch.bool)), ValueError, "text_mask has no True entry"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 0, 1], text_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, r"text_mask must have shape \[B, M\]"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [3, 0, 1], stage1_keep=2), ValueError, "need keep <= stage1_keep"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [2, 0, 1], stage1_keep=0.3), ValueError, "keeps 1 tokens of segment 0"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 0, 1], stage1_keep=1.5), ValueError, r"stage1_keep as a fraction must be in \(0, 1\]"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 0, 1], stage1_keep=[2, 0]), ValueError, "stage1_keep must have one count per segment"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 0, 1], stage1_keep=[5, 0, 2]), ValueError, "larger than segment 0's length"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 0, 1], stage1_keep="all"), TypeError, "stage1_keep must be an int count or a float"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 1, 1]), ValueError, "keep"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 0, 1], mi_metric="dot"), ValueError, "mi_metric must be one of"),
    (lambda x, cu, t: ops.prune_varlen(x, cu, t, [1, 0, 1], mask=torch.arange(9) < 2), ValueError, "stage1_keep=3 is larger than the number of candidate tokens in segment 0"),
    (lambda x, cu, t: ops.gather_compact_varlen(x, cu), ValueError, "exactly one of index or mask"),
    (lambda x, cu, t: ops.gather_compact_varlen(x.to(torch.complex64), cu, mask=torch.ones(9, dtype=torch.bool)), TypeError, "x must have dtype"),
    (lambda x, cu, t: ops.gather_compact_varlen(x, cu, torch.tensor([[1, 5]])), TypeError, r"index must be an integer tensor of shape \[K\]"),
    (lambda x, cu, t: ops.gather_compact_varlen(x, cu, torch.tensor([1, 9])), ValueError, r"expected \[0, 9\)"),
    (lambda x, cu, t: ops.gather_compact_varlen(x, cu, torch.tensor([5, 5])), ValueError, "duplicate"),
    (lambda x, cu, t: ops.gather_compact_varlen(x, cu, torch.tensor([5, 1])), ValueError, "each segment's positions together"),
    (lambda x, cu, t: ops.gather_compact_varlen(x, cu, mask=torch.ones(8, dtype=torch.bool)), ValueError, r"mask must have shape \[T\]"),
    (lambda x, cu, t: ops.gather_compact_varlen(x, cu, torch.tensor([1]), sort=None), TypeError, "sort must be a bool"),
])
def test_varlen_errors_name_the_argument(call, exc, match):
    x, cu, t = _args()
    with pytest.raises(exc, match=match):
        call(x, cu, t)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_varlen_errors_come_before_any_work(backend):
    x, cu, t = _args()
    with pytest.raises(ValueError, match="k=1 is larger than segment 1's length"):
        ops.greedy_select_varlen(x, cu, [1, 1, 1], backend=backend)


# =========================================================================== GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
def test_gpu_varlen_matches_dense_per_segment(backend, dtype, objective):
    lengths = [576, 1, 0, 2880, 130]
    x, cu = packed(lengths, 256, seed=81, dtype=dtype, device="cuda")
    k = [64, 1, 0, 320, 13]
    got = ops.greedy_select_varlen(x, cu, k, objective=objective, backend=backend)
    assert torch.equal(got.cpu(), dense_greedy(x, cu, k, backend, objective=objective).cpu())
    text = randn((5, 16, 256), 82).to(device="cuda", dtype=dtype)
    r = ops.prune_varlen(x, cu, text, k, stage1_keep=0.8, objective=objective, backend=backend)
    ref = ops.prune_varlen(x, cu, text, k, stage1_keep=0.8, objective=objective,
                           backend="reference")
    assert torch.equal(r.indices.cpu(), ref.indices.cpu())
    assert torch.equal(r.tokens, ref.tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_varlen_long_segments_take_the_stream_path(backend):
    lengths = [5000, 17, 4200]
    x, cu = packed(lengths, 64, seed=91, device="cuda")
    k = [40, 3, 30]
    for objective in ("maxmin", "maxsum"):
        got = ops.greedy_select_varlen(x, cu, k, objective=objective, backend=backend)
        assert torch.equal(got.cpu(), ops.greedy_select_varlen(
            x, cu, k, objective=objective, backend="reference").cpu())
