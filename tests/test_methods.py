"""The published methods against float64 transliterations of their originals.

Each ``golden_*`` below is written from the algorithm as DESIGN.md states it, the way the
original code runs it: one image at a time, Python loops, float64 numpy.  Where the original
crashes or degenerates, the golden encodes the documented choice (marked "documented choice").
Every method runs on every available backend; the Triton kernels run in the interpreter here.
"""
import importlib
import math

import numpy as np
import pytest
import torch

from visprune import available_backends
from visprune.backends import resolve
from visprune.methods import divprune, holov, prumerge, prumerge_cls_attention, trimtokenator

CPU = torch.device("cpu")
pm = importlib.import_module("visprune.methods.prumerge")     # the modules, not the functions
hv = importlib.import_module("visprune.methods.holov")


def backends(*ops):
    """Every backend that runs on CPU here; skipped while it lacks an op the method needs."""
    params = []
    for name, why in available_backends(CPU).items():
        if why != "ok":
            continue
        missing = [op for op in ops if not hasattr(resolve(name, CPU), op)]
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(
            bool(missing), reason=f"the {name} backend has no {', '.join(missing)} yet")))
    return params


def kernel_backends():
    """The two implementations of a method's own kernels: plain PyTorch and Triton."""
    return [name for name in ("reference", "triton") if available_backends(CPU)[name] == "ok"]


def f64(t):
    return t.detach().double().numpy()


# --------------------------------------------------------------------------- goldens
def golden_trimtokenator(v, t, keep, stage1_keep, mi_metric):
    """One image: MI score, top stage-1 by score, greedy max-sum of cosine distances, sorted."""
    N = len(v)
    n1 = int(math.floor(stage1_keep * N + 0.5)) if isinstance(stage1_keep, float) else stage1_keep
    norm = lambda a: max(np.linalg.norm(a), 1e-12)
    cos = lambda a, b: float(a @ b / (norm(a) * norm(b)))
    score = []
    for i in range(N):
        if mi_metric == "l2":
            score.append(-np.mean([np.sum((v[i] - tj) ** 2) for tj in t]))
        else:
            score.append(np.mean([cos(v[i], tj) for tj in t]))
    survivors = sorted(range(N), key=lambda i: (-score[i], i))[:n1]
    dist = {(i, j): max(0.0, 1.0 - cos(v[i], v[j])) for i in survivors for j in survivors}
    total = {i: sum(dist[i, j] for j in survivors) for i in survivors}
    chosen = [max(survivors, key=lambda i: (total[i], -i))]
    while len(chosen) < keep:
        rest = [i for i in survivors if i not in chosen]
        chosen.append(max(rest, key=lambda i: (sum(dist[i, s] for s in chosen), -i)))
    return sorted(chosen)


def golden_divprune(v, keep):
    """DivPrune's loop: the start is the column with the largest second-smallest distance, then
    the argmax of the min distance to the selected rows; indices sorted."""
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    dist = 1.0 - vn @ vn.T
    s = []
    for i in range(keep):
        scores = np.sort(dist, axis=0)[1, :] if i == 0 else dist[s].min(axis=0)
        s.append(int(np.argmax(scores)))
    return sorted(s)


def golden_outlier_ratio(values):
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    upper = q3 + 1.5 * (q3 - q1)
    return np.sum(values > upper) / len(values)


def golden_prumerge(x, a, k, ratio, plus):
    """One image of ``token_prune_merge_advanced[_plus]``: ``(indices, merged tokens + extra)``."""
    N = len(a)
    n = max(1, int(N * ratio))                                   # documented choice: >= 1 token
    idx = sorted(range(N), key=lambda i: (-a[i], i))[:n]
    if plus:
        # documented choices: stride >= 1; ratio 0 → the limit ratio → 0⁺, only sample 0
        step = max(1, int(int(1 / ratio) / 3)) if ratio > 0 else N
        idx = idx + [p for p in range(0, N - 1, step) if p not in idx]
    kn = k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-12)
    compl = [j for j in range(N) if j not in set(idx)]
    merged = []
    for pos, i in enumerate(idx):
        rest = idx[:pos] + idx[pos + 1:] + compl
        sims = kn[rest] @ kn[i]
        cluster = sorted(zip(sims.tolist(), rest), key=lambda s: (-s[0], s[1]))[:32]
        merged.append(x[i] + sum((a[j] * x[j] for _, j in cluster), np.zeros(x.shape[1])))
    merged.append(sum((a[j] * x[j] for j in compl), np.zeros(x.shape[1])))
    return idx, np.stack(merged)


def golden_holov_variance(x, num_crops):
    """Per token, within its crop: V_i of the zero-diagonal cosine matrix."""
    N = len(x)
    base, rem = divmod(N, num_crops)
    out, s = np.zeros(N), 0
    for c in range(num_crops):
        m = base + (c < rem)
        crop = x[s:s + m]
        f = crop / (np.linalg.norm(crop, axis=1, keepdims=True) + 1e-6)
        S = f @ f.T
        np.fill_diagonal(S, 0.0)
        for i in range(m):
            mu = S[i].sum() / max(m - 1, 1)
            out[s + i] = ((S[i] - mu) ** 2).sum() / max(m - 1, 1)
        s += m
    return out


def golden_holov(x, attn, keep, num_crops, alpha, redistribute):
    N = len(attn)
    base, rem = divmod(N, num_crops)
    crops, s = [], 0
    for c in range(num_crops):
        m = base + (1 if c < rem else 0)
        crops.append(list(range(s, s + m)))
        s += m
    V = golden_holov_variance(x, num_crops)
    scores = []
    for crop in crops:
        if len(crop) == 0:
            scores.append(0.0)                                   # documented choice
        elif len(crop) == 1:
            scores.append(float(attn[crop[0]]))
        else:
            A, Vc = 1000.0 * attn[crop], V[crop]
            gamma = np.abs(A).mean() / (np.abs(Vc).mean() + 1e-6)
            scores.append(float(np.mean(A + alpha * gamma * Vc)))

    def share(budget, eligible):
        total = sum(scores[c] for c in eligible)
        w = {c: scores[c] / (total + 1e-6) for c in eligible}
        q = {c: max(0, math.floor(w[c] * budget)) for c in eligible}
        ranked = sorted(eligible, key=lambda c: (-w[c], c))
        for t in range(max(0, budget - sum(q.values()))):
            q[ranked[t % len(ranked)]] += 1                      # documented choice: go round
        return q

    q = share(keep, list(range(num_crops)))
    while redistribute:
        over = sum(max(0, q[c] - len(crops[c])) for c in range(num_crops))
        if over == 0:
            break
        q = {c: min(q[c], len(crops[c])) for c in range(num_crops)}
        eligible = [c for c in range(num_crops) if q[c] < len(crops[c])]
        for c, extra in share(over, eligible).items():
            q[c] += extra
    out = []
    for c, crop in enumerate(crops):
        if q[c] >= len(crop):
            out += crop
        else:
            out += sorted(crop, key=lambda i: (-attn[i], i))[:q[c]]
    out = out[:keep]
    return out + [-1] * (keep - len(out))


# --------------------------------------------------------------------------- inputs
def sparse_cls_inputs(B, N, C, D, dominant, seed):
    """Features, CLS attention and keys like CLIP's last layer: a few patch keys aligned with the
    CLS query draw most of the attention (``dominant[b]`` of them in row ``b``)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N + 1, C, generator=g)
    k = torch.randn(B, N + 1, C, generator=g)
    for b, n in enumerate(dominant):
        hot = torch.randperm(N, generator=g)[:n] + 1
        k[b, hot] += (3.0 + torch.rand(n, 1, generator=g)) * q[b, :1]
    x = torch.randn(B, N, D, generator=g)
    return x, prumerge_cls_attention(q, k), k[:, 1:]


def check_prumerge(res, x, a, k, plus, iqr_scope):
    B = x.shape[0]
    L = res.tokens.shape[1]
    ratios = ([golden_outlier_ratio(f64(a).ravel())] * B if iqr_scope == "batch"
              else [golden_outlier_ratio(row) for row in f64(a)])
    for b in range(B):
        idx, tokens = golden_prumerge(f64(x[b]), f64(a[b]), f64(k[b]), ratios[b], plus)
        n = len(idx) + 1
        assert res.lengths[b].item() == n
        assert res.indices[b].tolist() == idx + [-1] * (L - len(idx))
        got = res.tokens[b].double().numpy()
        np.testing.assert_allclose(got[:n], tokens, rtol=1e-4, atol=1e-5)
        assert not got[n:].any()


# --------------------------------------------------------------------------- TrimTokenator
@pytest.mark.parametrize("backend", backends("prune"))
@pytest.mark.parametrize("mi_metric", ["l2", "cosine"])
def test_trimtokenator_matches_golden(backend, mi_metric):
    g = torch.Generator().manual_seed(1)
    B, N, M, D, keep = 3, 50, 6, 24, 9
    visual, text = torch.randn(B, N, D, generator=g), torch.randn(B, M, D, generator=g)
    text_mask = torch.ones(B, M, dtype=torch.bool)
    text_mask[1, 4:] = False
    res = trimtokenator(visual, text, keep, stage1_keep=0.7, text_mask=text_mask,
                        mi_metric=mi_metric, backend=backend)
    assert res.tokens.shape == (B, keep, D) and res.lengths.tolist() == [keep] * B
    for b in range(B):
        t = f64(text[b][text_mask[b]])
        want = golden_trimtokenator(f64(visual[b]), t, keep, 0.7, mi_metric)
        assert res.indices[b].tolist() == want
        torch.testing.assert_close(res.tokens[b], visual[b, want])


# --------------------------------------------------------------------------- DivPrune
@pytest.mark.parametrize("backend", backends("greedy_select", "gather_compact"))
def test_divprune_matches_golden(backend):
    g = torch.Generator().manual_seed(2)
    B, N, D, keep = 3, 120, 32, 16
    visual = torch.randn(B, N, D, generator=g) + 0.5 * torch.randn(B, 1, D, generator=g)
    res = divprune(visual, keep, backend=backend)
    assert res.lengths.tolist() == [keep] * B
    for b in range(B):
        want = golden_divprune(f64(visual[b]), keep)
        assert res.indices[b].tolist() == want
        torch.testing.assert_close(res.tokens[b], visual[b, want])


@pytest.mark.parametrize("backend", backends("greedy_select", "gather_compact"))
def test_divprune_mask_is_divprune_of_the_candidates(backend):
    g = torch.Generator().manual_seed(3)
    B, N, D, keep = 2, 60, 16, 8
    visual = torch.randn(B, N, D, generator=g)
    mask = torch.rand(B, N, generator=g) < 0.6
    res = divprune(visual, keep, mask=mask, backend=backend)
    for b in range(B):
        cand = mask[b].nonzero().flatten()
        want = cand[golden_divprune(f64(visual[b, cand]), keep)].tolist()
        assert res.indices[b].tolist() == want


# --------------------------------------------------------------------------- PruMerge
def test_prumerge_cls_attention_is_the_cls_row():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 11, 8, generator=g), torch.randn(2, 11, 8, generator=g)
    for b in range(2):
        logits = f64(q[b]) @ f64(k[b]).T * 8 ** -0.5
        attn = np.exp(logits - logits.max(1, keepdims=True))
        attn /= attn.sum(1, keepdims=True)
        np.testing.assert_allclose(prumerge_cls_attention(q, k)[b].numpy(), attn[0, 1:],
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("iqr_scope", ["image", "batch"])
@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "plus"])
def test_prumerge_matches_golden(backend, plus, iqr_scope):
    x, a, k = sparse_cls_inputs(3, 144, 24, 20, dominant=(3, 12, 7), seed=5)
    res = prumerge(x, a, k, plus=plus, iqr_scope=iqr_scope, backend=backend)
    if iqr_scope == "image":
        assert len(set(res.lengths.tolist())) == 3            # adaptive: every row differs
    check_prumerge(res, x, a, k, plus, iqr_scope)


@pytest.mark.parametrize("backend", backends())
def test_prumerge_degenerate_ratios(backend):
    """Row 0: a gentle ramp, no outlier (ratio 0: one token kept, the last; PruMerge+ adds only
    sample 0).  Row 1: 2 outliers of 8 (ratio 1/4: PruMerge+'s stride int(4/3) = 1 samples
    every position but the last).  N = 8 < 33: fewer than 32 neighbours exist."""
    g = torch.Generator().manual_seed(6)
    x, k = torch.randn(2, 8, 6, generator=g), torch.randn(2, 8, 5, generator=g)
    a = torch.empty(2, 8)
    a[0] = torch.linspace(0.1, 0.15, 8)
    a[1] = torch.tensor([0.01, 0.02, 0.9, 0.015, 0.012, 0.011, 0.5, 0.013])
    for plus in (False, True):
        res = prumerge(x, a, k, plus=plus, backend=backend)
        check_prumerge(res, x, a, k, plus, "image")
    assert prumerge(x, a, k, plus=True, backend=backend).indices[0, :3].tolist() == [7, 0, -1]
    assert prumerge(x, a, k, plus=True, backend=backend).lengths[1].item() == 2 + 5 + 1


def test_raster_step():
    ratio = torch.tensor([0.0, 1 / 576, 0.05, 0.25, 0.4, 1.0], dtype=torch.float64)
    # 0: the limit (only sample 0); 0.4 and 1.0 would be a stride of 0 in the original
    assert pm.raster_step(ratio, 576).tolist() == [576, 192, 6, 1, 1, 1]


@pytest.mark.parametrize("backend", kernel_backends())
def test_prumerge_single_image_and_single_token(backend):
    x, a, k = sparse_cls_inputs(1, 40, 8, 12, dominant=(4,), seed=7)
    check_prumerge(prumerge(x, a, k, plus=True, backend=backend), x, a, k, True, "image")
    one = prumerge(x[:, :1], a[:, :1], k[:, :1], backend=backend)
    assert one.indices.tolist() == [[0, -1]] and one.lengths.tolist() == [2]
    torch.testing.assert_close(one.tokens, torch.cat([x[:, :1], torch.zeros_like(x[:, :1])], 1))


@pytest.mark.parametrize("backend", kernel_backends())
def test_prumerge_neighbour_ties_go_to_the_lowest_index(backend):
    """Keys in {0, ±1} with four nonzeros: every cosine is exact, so many tie at the 32nd
    neighbour; the cluster must take the lowest indices among them, on every path."""
    g = torch.Generator().manual_seed(8)
    B, N, Dk = 2, 90, 16
    keys = torch.zeros(B, N, Dk)
    for b in range(B):
        for i in range(N):
            dims = torch.randperm(Dk, generator=g)[:4]
            keys[b, i, dims] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    x = torch.randn(B, N, 10, generator=g)
    a = torch.rand(B, N, generator=g) ** 6
    check_prumerge(prumerge(x, a, keys, plus=True, backend=backend), x, a, keys, True, "image")


@pytest.mark.parametrize("backend", kernel_backends())
def test_prumerge_dtypes_and_strides(backend):
    x, a, k = sparse_cls_inputs(2, 64, 16, 12, dominant=(2, 5), seed=9)
    want = prumerge(x.half().float(), a, k.half().float(), plus=True, backend="reference")
    xs = x.half().transpose(1, 2).contiguous().transpose(1, 2)             # non-contiguous
    ks = torch.zeros(*k.shape[:2], 2 * k.shape[2], dtype=torch.half)
    ks[..., ::2] = k.half()
    ks = ks[..., ::2]                                                         # strided
    got = prumerge(xs, a, ks, plus=True, backend=backend)
    assert got.tokens.dtype == torch.float16
    assert torch.equal(got.indices, want.indices) and torch.equal(got.lengths, want.lengths)
    torch.testing.assert_close(got.tokens.float(), want.tokens, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif("triton" not in kernel_backends(), reason="triton is not available")
def test_prumerge_merge_kernel_matches_reference():
    x, a, k = sparse_cls_inputs(2, 100, 20, 24, dominant=(3, 6), seed=10)
    index = torch.tensor([[5, 99, 0, 17, -1, -1], [3, 2, 1, 0, 50, 70]])
    want = torch.zeros(2, 6, 24)
    pm.merge_reference(k, x, a, index, want)
    from visprune.triton_kernels import prumerge as kernels
    got = kernels.merge(k, x, a, index, torch.full((2, 6, 24), float("nan")))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not got[0, 4:].any()


# --------------------------------------------------------------------------- HoloV
def concentrated_attention(B, N, seed):
    """CLS attention piled on one crop per image, so that crop's share overflows it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, generator=g)
    for b in range(B):
        logits[b, 7 * b: 7 * b + 6] += 6.0
    return logits.softmax(-1)


@pytest.mark.parametrize("backend", backends("gather_compact"))
@pytest.mark.parametrize("redistribute", [True, False])
def test_holov_matches_golden(backend, redistribute):
    g = torch.Generator().manual_seed(11)
    B, N, D, keep = 3, 100, 24, 40                        # 100 = 16 crops of 7 (×4) and 6 (×12)
    x = torch.randn(B, N, D, generator=g) + torch.randn(B, 1, D, generator=g)
    attn = concentrated_attention(B, N, 12)
    res = holov(x, attn, keep, redistribute=redistribute, backend=backend)
    assert res.tokens.shape == (B, keep, D) and res.lengths.tolist() == [keep] * B
    padded = 0
    for b in range(B):
        want = golden_holov(f64(x[b]), f64(attn[b]), keep, 16, 0.09, redistribute)
        assert res.indices[b].tolist() == want
        kept = [i for i in want if i >= 0]
        torch.testing.assert_close(res.tokens[b, :len(kept)], x[b, kept])
        assert not res.tokens[b, len(kept):].any()
        padded += keep - len(kept)
    assert (padded > 0) == (not redistribute)             # the overflow did happen


@pytest.mark.parametrize("backend", backends("gather_compact"))
def test_holov_edge_shapes(backend):
    g = torch.Generator().manual_seed(13)
    x, attn = torch.randn(2, 10, 8, generator=g), torch.rand(2, 10, generator=g)
    cases = [(6, 16, True), (6, 16, False), (10, 3, True), (0, 4, True), (5, 1, False)]
    for keep, num_crops, redistribute in cases:
        res = holov(x, attn, keep, num_crops=num_crops, redistribute=redistribute, backend=backend)
        for b in range(2):
            want = golden_holov(f64(x[b]), f64(attn[b]), keep, num_crops, 0.09, redistribute)
            assert res.indices[b].tolist() == want, (keep, num_crops, redistribute)


@pytest.mark.parametrize("backend", backends("gather_compact"))
def test_holov_more_crops_than_tokens_costs_no_more(backend):
    """Crops beyond N are empty: 10**9 of them select as 16 (golden-checked above), without
    allocating per empty crop."""
    g = torch.Generator().manual_seed(17)
    x, attn = torch.randn(2, 10, 8, generator=g), torch.rand(2, 10, generator=g)
    want = holov(x, attn, 6, num_crops=16, backend=backend).indices
    assert torch.equal(holov(x, attn, 6, num_crops=10**9, backend=backend).indices, want)


def test_holov_zero_attention_goes_round():
    """All-zero attention: every share is 0 and the whole budget is remainder (the original's
    top-k over crops would fail for keep > num_crops); it goes round the crops."""
    x = torch.randn(1, 40, 8)
    res = holov(x, torch.zeros(1, 40), 12, num_crops=4, backend="reference")
    assert res.indices[0].tolist() == golden_holov(f64(x[0]), np.zeros(40), 12, 4, 0.09, True)
    assert res.indices[0].tolist() == [0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32]


@pytest.mark.parametrize("backend", kernel_backends() + [
    name for name in ("cpu",) if available_backends(CPU)[name] == "ok"])   # + HoloV's C++ kernel
@pytest.mark.parametrize("N,D,num_crops,dtype", [(100, 40, 16, torch.float32),
                                                 (576, 40, 16, torch.float16),
                                                 (70, 40, 3, torch.float32),
                                                 (255, 37, 16, torch.float32),
                                                 (7, 33, 16, torch.float32),     # empty crops
                                                 (1, 9, 1, torch.float32)])
def test_holov_similarity_variance(backend, N, D, num_crops, dtype):
    g = torch.Generator().manual_seed(14)
    x = (torch.randn(2, N, D, generator=g) + torch.randn(2, 1, D, generator=g)).to(dtype)
    if N > 5:
        x[1, 5] = 0                                                        # a zero token
    x = x.transpose(1, 2).contiguous().transpose(1, 2)                    # non-contiguous
    if backend == "triton":
        from visprune.triton_kernels import holov as kernels
        got = kernels.similarity_variance(x, num_crops)
    elif backend == "cpu":                                                # the C++ kernel
        from visprune._ext import holov_variance
        got = holov_variance(x, num_crops)
    else:
        got = hv.similarity_variance(x, num_crops)
    want = np.stack([golden_holov_variance(f64(row), num_crops) for row in x])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(available_backends(CPU)["cpu"] != "ok", reason="visprune._C is not built")
def test_holov_variance_kernel_arguments():
    from visprune._ext import holov_variance
    with pytest.raises(ValueError, match=r"num_crops must be >= 1, got 0"):
        holov_variance(torch.randn(1, 4, 3), 0)
    with pytest.raises(ValueError, match=r"features must have shape \[B, N, D\]"):
        holov_variance(torch.randn(4, 3), 2)
    with pytest.raises(TypeError, match="features must have dtype"):
        holov_variance(torch.ones(1, 4, 3, dtype=torch.long), 2)
    assert holov_variance(torch.randn(0, 4, 3), 2).shape == (0, 4)
    assert holov_variance(torch.randn(2, 0, 3), 2).shape == (2, 0)


# --------------------------------------------------------------------------- arguments
def test_argument_errors():
    x, a, k = torch.randn(2, 10, 4), torch.rand(2, 10), torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="cls_attn"):
        prumerge(x, a[:, :9], k)
    with pytest.raises(ValueError, match="keys"):
        prumerge(x, a, k[:1])
    with pytest.raises(ValueError, match="iqr_scope"):
        prumerge(x, a, k, iqr_scope="dataset")
    with pytest.raises(ValueError, match="keep=11"):
        holov(x, a, 11)
    with pytest.raises(ValueError, match="num_crops"):
        holov(x, a, 3, num_crops=0)
    with pytest.raises(ValueError, match="N\\+1"):
        prumerge_cls_attention(torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    with pytest.raises(RuntimeError, match="cuda"):
        prumerge(x, a, k, backend="cuda")
