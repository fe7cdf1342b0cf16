"""VisPruner against a float64 transliteration of the original's selection code.

``original_selection`` below is ``LlavaMetaForCausalLM.encode_images`` of Theia-4869/VisPruner
(``llava/model/llava_arch.py``, commit aefa01a), from ``image_attentions.mean(dim=1)`` to the
``index_masks`` it returns, copied statement by statement with the model calls taken out: one
batch, the original's own loop, a fresh ``a @ bᵀ`` per round.  ``fixed=True`` applies the two
documented fixes (the even half's index width, ``r`` at most ``|A|``); ``stable=True`` makes its
argsorts stable (the original's are not, so its tie order is unspecified).  It is written from
the original, not from :mod:`visprune.methods.vispruner` (which uses a Gram matrix and batched
gathers), and run in float64: the removal ranking compares max-cosines that are close together,
so the comparison is made at equal precision (float64 on both sides).
"""
import math

import numpy as np
import pytest
import torch

from visprune import available_backends
from visprune.methods.vispruner import vispruner

CPU = torch.device("cpu")
BACKENDS = [name for name, why in available_backends(CPU).items() if why == "ok"]


def original_selection(image_features, image_attentions, visual_token_num, important_ratio, *,
                       fixed=False, stable=False):
    """bool[B, N] index mask, as ``encode_images`` (``image_attentions`` already ``[B, N]``: the
    original's ``image_attentions.mean(dim=1)`` of the ``[B, H, N]`` CLS rows)."""
    B, N, C = image_features.shape
    device = image_features.device

    important_token_num = int(visual_token_num * important_ratio)  # T_imp = T * r
    diverse_token_num = visual_token_num - important_token_num     # T_div = T * (1 - r)

    token_indices = image_attentions.argsort(dim=-1, descending=True, stable=stable)  # (B, N)
    important_indices = token_indices[:, :important_token_num]  # (B, T_imp)
    residual_indices = token_indices[:, important_token_num:]   # (B, N - T_imp)

    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, C)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if fixed:
            r = min(r, (R + 1) // 2)           # fix: remove at most all of the even half
        if r <= 0:
            break

        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R),
                                           residual_indices]  # (B, R, C)
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)       # (B, ⌈R/2⌉, ⌊R/2⌋)
        scores = scores.max(dim=-1).values     # (B, ⌈R/2⌉)

        distinct_indices = scores.argsort(dim=-1, descending=True, stable=stable)[:, r:]
        width = a.shape[-2] - r if fixed else R // 2 - r   # the original: R // 2 - r
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, width),
                                       distinct_indices],
            residual_indices[..., 1::2]
        ], dim=-1)  # (B, R - r)

    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)  # (B, T)
    else:
        selected_indices = important_indices  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, selected_indices, True)
    return index_masks


def kept(mask):
    """The original's kept positions in the order its mask feeds them to the LLM."""
    return [row.nonzero().flatten().tolist() for row in mask]


def inputs(B, N, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    x += 0.5 * torch.randn(B, 1, D, generator=g, dtype=torch.float64)   # CLIP-like common offset
    attn = torch.rand(B, N, generator=g, dtype=torch.float64).pow(4)
    return x.to(dtype), (attn / attn.sum(-1, keepdim=True)).to(dtype)


def check(res, x, keep):
    B = x.shape[0]
    assert res.indices.dtype == torch.int64 and res.indices.shape == (B, keep)
    assert torch.equal(res.lengths, torch.full((B,), keep))
    assert res.tokens.dtype == x.dtype
    assert torch.equal(res.tokens, x[torch.arange(B)[:, None], res.indices])
    assert (res.indices.diff(dim=-1) > 0).all()


# --------------------------------------------------------------------------- the original
@pytest.mark.parametrize("keep,ratio", [(64, 0.5), (128, 0.5), (192, 0.5), (64, 0.25),
                                        (65, 0.5), (576, 0.5), (32, 1.0), (9, 0.0)])
def test_matches_the_original(keep, ratio):
    x, attn = inputs(1, 576, 64, seed=keep)
    res = vispruner(x, attn, keep, important_ratio=ratio)
    check(res, x, keep)
    assert res.indices.tolist() == kept(original_selection(x, attn, keep, ratio))


@pytest.mark.parametrize("keep,failure", [(66, IndexError), (63, IndexError), (8, RuntimeError),
                                          (1, RuntimeError)])
def test_odd_sizes_fixed(keep, failure):
    """N=576, ratio 0.5: an odd ``N - T_imp`` (keep 66: 543 candidates; keep 63: 545) makes
    the original's index tensors fail to broadcast; too few tokens left for a round of ``r``
    (keep 8, 1) makes it expand to a negative width.  The fixed transliteration runs; ours
    equals it."""
    x, attn = inputs(1, 576, 64, seed=keep)
    with pytest.raises(failure):
        original_selection(x, attn, keep, 0.5)
    res = vispruner(x, attn, keep)
    check(res, x, keep)
    assert res.indices.tolist() == kept(original_selection(x, attn, keep, 0.5, fixed=True))


def test_one_token_too_few_fixed():
    """N=20, keep 7, ratio 0.25: 19 candidates, then 11 (odd, ``R//2 - r = 0``): the original
    keeps no even-half token in that round and returns 6 tokens."""
    x, attn = inputs(1, 20, 16, seed=3)
    assert original_selection(x, attn, 7, 0.25).sum() == 6
    res = vispruner(x, attn, 7, important_ratio=0.25)
    check(res, x, 7)
    assert res.indices.tolist() == kept(original_selection(x, attn, 7, 0.25, fixed=True))


def original_is_exact(N, keep, ratio):
    """Whether the original's rounds for these sizes all take its correct branch: every odd
    ``R`` has ``R//2 - r == 1`` (the one width that broadcasts to ``|A| - r``) and ``r <= |A|``.
    Sizes only: the branch does not depend on the data."""
    important = int(keep * ratio)
    diverse, R = keep - important, N - important
    while diverse > 0:
        r = min(8, R - diverse)
        if r <= 0:
            break
        if r > (R + 1) // 2 or (R % 2 and R // 2 - r != 1):
            return False
        R -= r
    return True


@pytest.mark.parametrize("N", [20, 33, 48])
def test_every_budget_small_n(N):
    """Every keep and four ratios: ours equals the fixed transliteration, and the original equals
    it wherever it takes only its correct branch.  Elsewhere it raises, returns too few tokens,
    or (two wrong rounds compensating) the right count of other tokens."""
    x, attn = inputs(1, N, 16, seed=N)
    exact = 0
    for keep in range(1, N + 1):
        for ratio in (0.0, 0.25, 0.5, 1.0):
            want = kept(original_selection(x, attn, keep, ratio, fixed=True))
            assert vispruner(x, attn, keep, important_ratio=ratio).indices.tolist() == want
            if original_is_exact(N, keep, ratio):
                assert kept(original_selection(x, attn, keep, ratio)) == want
                exact += 1
    assert exact > N          # the comparison with the unfixed original is not vacuous


def test_compensating_bugs_change_the_tokens():
    """N=20, keep 6, ratio 0.5: at R=17 the original keeps none of the even half (one too few),
    at R=8 it removes all of it (one too many): 6 tokens, but not the fixed rounds' 6."""
    x, attn = inputs(1, 20, 16, seed=20)
    got = kept(original_selection(x, attn, 6, 0.5))
    want = kept(original_selection(x, attn, 6, 0.5, fixed=True))
    assert len(got[0]) == 6 and got != want
    assert vispruner(x, attn, 6).indices.tolist() == want


# --------------------------------------------------------------------------- batching, dtypes
def test_batch_equals_rows():
    x, attn = inputs(3, 576, 64, seed=7, dtype=torch.float32)
    res = vispruner(x, attn, 64)
    for b in range(3):
        one = vispruner(x[b:b + 1], attn[b:b + 1], 64)
        assert torch.equal(res.indices[b:b + 1], one.indices)
        assert torch.equal(res.tokens[b:b + 1], one.tokens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_run_in_fp32(dtype):
    x, attn = inputs(2, 576, 64, seed=11, dtype=dtype)
    res = vispruner(x, attn, 64)
    check(res, x, 64)
    assert torch.equal(res.indices, vispruner(x.float(), attn.float(), 64).indices)


def test_non_contiguous_inputs():
    x, attn = inputs(2, 100, 32, seed=5, dtype=torch.float32)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    at = attn.t().contiguous().t()
    assert not xt.is_contiguous() and not at.is_contiguous()
    assert torch.equal(vispruner(xt, at, 20).indices, vispruner(x, attn, 20).indices)


# --------------------------------------------------------------------------- ties, edge values
def test_attention_ties_go_to_the_lowest_index():
    x, _ = inputs(2, 50, 8, seed=1, dtype=torch.float32)
    attn = torch.full((2, 50), 0.02)
    attn[1, 30:] = 0.03          # 20 tokens tie at the top, the others tie below
    res = vispruner(x, attn, 25, important_ratio=1.0)
    assert res.indices[0].tolist() == list(range(25))
    assert res.indices[1].tolist() == list(range(5)) + list(range(30, 50))


def test_similarity_ties_keep_the_list_order():
    """Identical tokens (cosines exactly 1): every score ties, so each round removes the first
    ``r`` tokens of the even half.  Attention decreasing by index makes the list 0..N-1:
    R=10, r=5 removes 0, 2, 4, 6, 8; then [1, 3, 5, 7, 9] → A=[1, 5, 9], r=1 removes 1."""
    x = torch.ones(1, 10, 4)
    attn = torch.linspace(1.0, 0.1, 10)[None]
    res = vispruner(x, attn, 4, important_ratio=0.0)
    assert res.indices.tolist() == [[3, 5, 7, 9]]
    # longer rows, where torch's unstable sort does reorder ties (over 16 elements on CPU)
    x, attn = torch.ones(2, 60, 4), torch.linspace(1.0, 0.1, 60).expand(2, -1)
    for keep in (5, 11, 30):
        want = kept(original_selection(x.double(), attn.double(), keep, 0.0, fixed=True,
                                       stable=True))
        assert vispruner(x, attn, keep, important_ratio=0.0).indices.tolist() == want


def test_exact_duplicates_tie():
    """Exactly representable cosines (±1/2 entries): pairs of duplicates tie at 1, and the
    stable transliteration agrees with ours in fp32."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 2, (1, 40, 4), generator=g).float() * 2 - 1      # norm 2
    x = torch.cat([base, base[:, torch.randperm(40, generator=g)]], 1)        # N=80
    attn = torch.rand(1, 80, generator=g)
    for keep in (3, 6, 10, 13, 40):
        want = kept(original_selection(x.double(), attn.double(), keep, 0.5, fixed=True,
                                       stable=True))
        assert vispruner(x, attn, keep).indices.tolist() == want


def test_degenerate_values_give_valid_indices():
    x, attn = inputs(3, 40, 8, seed=2, dtype=torch.float32)
    x[0, 5] = 0.0                       # zero norm: cosine 0 (the original: NaN)
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    attn[1, 3] = float("nan")
    attn[2, :] = 0.0
    res = vispruner(x, attn, 12)
    for row in res.indices:
        assert len(set(row.tolist())) == 12 and 0 <= row.min() and row.max() < 40
    assert vispruner(x[:1], attn[:1], 40).indices.tolist() == [list(range(40))]


def test_nan_attention_ranks_last():
    x, attn = inputs(1, 30, 8, seed=4, dtype=torch.float32)
    attn[0, 3] = float("nan")
    assert 3 not in vispruner(x, attn, 29, important_ratio=1.0).indices.tolist()[0]


def test_empty_batch():
    res = vispruner(torch.zeros(0, 10, 4), torch.zeros(0, 10), 3)
    assert res.tokens.shape == (0, 3, 4) and res.indices.shape == (0, 3)
    assert res.lengths.shape == (0,)


# --------------------------------------------------------------------------- backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_agrees(backend, dtype):
    x, attn = inputs(2, 200, 64, seed=9, dtype=dtype)
    want = vispruner(x, attn, 40, backend="reference")
    got = vispruner(x, attn, 40, backend=backend)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.tokens, want.tokens)


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("call,error,match", [
    (lambda x, a: vispruner(x.numpy(), a, 4), TypeError, "features must be a torch.Tensor"),
    (lambda x, a: vispruner(x[0], a, 4), ValueError, r"features must have shape \[B, N, D\]"),
    (lambda x, a: vispruner(x.int(), a, 4), TypeError, "features must have dtype"),
    (lambda x, a: vispruner(x, a[:, :9], 4), ValueError, "cls_attn must have shape"),
    (lambda x, a: vispruner(x, a[0], 4), ValueError, r"cls_attn must have shape \[B, N\]"),
    (lambda x, a: vispruner(x, a.long(), 4), TypeError, "cls_attn must have dtype"),
    (lambda x, a: vispruner(x, a, 0), ValueError, r"keep must be in \[1, N\] = \[1, 10\], got "
                                                  r"keep=0"),
    (lambda x, a: vispruner(x, a, 11), ValueError, "got keep=11"),
    (lambda x, a: vispruner(x, a, 2.0), TypeError, "keep must be an int, got float"),
    (lambda x, a: vispruner(x, a, 4, important_ratio=1.5), ValueError,
     r"important_ratio must be in \[0, 1\], got 1.5"),
    (lambda x, a: vispruner(x, a, 4, important_ratio=-0.1), ValueError, "important_ratio"),
    (lambda x, a: vispruner(x, a, 4, important_ratio=math.nan), ValueError, "important_ratio"),
    (lambda x, a: vispruner(x, a, 4, important_ratio=True), TypeError,
     "important_ratio must be a float in \\[0, 1\\], got bool"),
    (lambda x, a: vispruner(x, a, 4, important_ratio="0.5"), TypeError, "important_ratio"),
    (lambda x, a: vispruner(x, a, 4, backend="cuda"), RuntimeError, "backend 'cuda'"),
    (lambda x, a: vispruner(x, a, 4, backend="fast"), ValueError, "backend must be one of"),
], ids=["features-type", "features-shape", "features-dtype", "cls_attn-N", "cls_attn-ndim",
        "cls_attn-dtype", "keep-0", "keep-over-N", "keep-float", "ratio-high", "ratio-low",
        "ratio-nan", "ratio-bool", "ratio-str", "backend-missing", "backend-unknown"])
def test_argument_errors(call, error, match):
    x, a = torch.randn(2, 10, 4), torch.rand(2, 10)
    with pytest.raises(error, match=match):
        call(x, a)


def test_ratio_accepts_ints_and_numpy():
    x, a = inputs(1, 30, 8, seed=6, dtype=torch.float32)
    assert torch.equal(vispruner(x, a, 8, important_ratio=1).indices,
                       vispruner(x, a, 8, important_ratio=np.float32(1.0)).indices)
    assert torch.equal(vispruner(x, a, 8, important_ratio=0).indices,
                       vispruner(x, a, 8, important_ratio=0.0).indices)
