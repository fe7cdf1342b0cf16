"""CDPruner (visprune.methods.cdpruner): the conditional-DPP MAP against a float64
transliteration of the original, the greedy MAP's definition, and every backend against the
others (the Triton kernel in the interpreter, both of its paths).

``original_encode_images`` below is written from Theia-4869/CDPruner,
``llava/model/llava_arch.py`` ``LlavaMetaForCausalLM.encode_images`` (after the projector):
the same statements in the same order, in float64.
"""
import importlib

import numpy as np
import pytest
import torch

from visprune import available_backends
from visprune.methods.cdpruner import DPP_EPS, cdpruner, cdpruner_relevance, dpp_map

from helpers import randn, random_mask, with_duplicates

CPU = torch.device("cpu")
BACKENDS = [b for b in ("reference", "triton", "cpu") if available_backends(CPU)[b] == "ok"]
TRITON = "triton" in BACKENDS
dpp_kernels = importlib.import_module("visprune.triton_kernels.dpp") if TRITON else None


def dpp_all(x, r, k, mask=None, eps=DPP_EPS):
    """``dpp_map`` on every backend, the Triton kernel on both paths: ``{name: indices}``."""
    out = {b: dpp_map(x, r, k, mask=mask, eps=eps, backend=b) for b in BACKENDS if b != "triton"}
    if TRITON:
        for path in ("gram", "stream"):
            out[f"triton-{path}"] = dpp_kernels.dpp_map(x, r, k, mask, eps, path=path)
    return out


def assert_all_equal(results):
    want = results["reference"]
    for name, got in results.items():
        assert torch.equal(got, want), f"{name}:\n{got}\nreference:\n{want}"


# --------------------------------------------------------------------------- the original
def original_encode_images(image_features, image_embeds, text_embeds, visual_token_num):
    """The original's selection, float64: ``(index_masks bool[B, N], select_idx int64[B, T]
    in selection order)``.  ``image_features`` are the projector outputs, ``image_embeds`` the
    CLIP patch embeddings ``[B, N, C]``, ``text_embeds`` the CLIP text embeddings ``[M, C]``."""
    image_features = image_features.double()
    image_embeds, text_embeds = image_embeds.double(), text_embeds.double()
    B, N, C = image_features.shape
    device = image_features.device

    # [CDPruner] Calculate cosine similarity
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, D)
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))  # (B, N, N)

    # [CDPruner] Calculate query relevance
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (B, N, C)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (M, C)
    relevance = torch.matmul(image_embeds, text_embeds.t())  # (B, N, M)
    relevance = (-relevance).mean(dim=-1)  # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())

    # [CDPruner] Construct kernel matrix
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)  # (B, N, N)

    # [CDPruner] Fast MAP inference of conditional DPP
    cis = torch.zeros((visual_token_num, B, N), device=device, dtype=torch.float64)  # (T, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)  # (T, B)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j

        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')

    order = select_idx.t().clone()
    select_idx = torch.sort(select_idx.t()).values  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, select_idx, True)
    return index_masks, order


def inputs(B, N, D, E, M, seed):
    return randn((B, N, D), seed), randn((B, N, E), seed + 1), randn((M, E), seed + 2)


# --------------------------------------------------------------------------- golden
GOLDEN = [(1, 144, 64, 32, 1, 32, 0), (1, 200, 96, 48, 3, 64, 1), (1, 57, 24, 16, 2, 20, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N,D,E,M,keep,seed", GOLDEN)
def test_matches_the_original(backend, B, N, D, E, M, keep, seed):
    x, img, txt = inputs(B, N, D, E, M, seed)
    want_mask, want_order = original_encode_images(x, img, txt, keep)
    got = cdpruner(x, keep, image_embeds=img, text_embeds=txt, backend=backend)
    assert torch.equal(got.indices, want_mask.nonzero()[:, 1].reshape(B, keep))
    assert torch.equal(got.tokens, x[0, got.indices[0]][None])
    assert torch.equal(got.lengths, torch.full((B,), keep))
    # the selection order too (dpp_map), from the relevance the method computes
    raw = -torch.nn.functional.cosine_similarity(img[:, :, None], txt[None, None], dim=-1).mean(-1)
    assert torch.equal(dpp_map(x, cdpruner_relevance(raw), keep, backend=backend), want_order)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_scope_is_the_originals_batch(backend):
    """The original normalises the relevance over the whole batch it is called with."""
    x, img, txt = inputs(3, 120, 48, 24, 2, 5)
    want, _ = original_encode_images(x, img, txt, 30)
    got = cdpruner(x, 30, image_embeds=img, text_embeds=txt, relevance_scope="batch",
                   backend=backend)
    assert torch.equal(got.indices, want.nonzero()[:, 1].reshape(3, 30))
    # the tests can fail: the per-image scope chooses differently on this batch
    alone = cdpruner(x, 30, image_embeds=img, text_embeds=txt, backend=backend)
    assert not torch.equal(alone.indices, got.indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_scope_is_each_image_alone(backend):
    x, img, txt = inputs(3, 120, 48, 24, 2, 5)
    txt3 = torch.stack([txt, txt.flip(0), txt * 2])                  # a prompt per image
    got = cdpruner(x, 30, image_embeds=img, text_embeds=txt3, backend=backend)
    for b in range(3):
        want, _ = original_encode_images(x[b:b + 1], img[b:b + 1], txt3[b], 30)
        assert torch.equal(got.indices[b], want.nonzero()[:, 1]), b


def test_the_golden_comparison_can_fail():
    """A relevance of the wrong sign, no relevance, or no diversity all change the choice."""
    x, img, txt = inputs(1, 144, 64, 32, 1, 0)
    want, _ = original_encode_images(x, img, txt, 32)
    want = want.nonzero()[:, 1][None]
    raw = -torch.nn.functional.cosine_similarity(img[:, :, None], txt[None, None], dim=-1).mean(-1)
    for wrong in (cdpruner(x, 32, relevance=-raw, backend="reference").indices,
                  cdpruner(x, 32, relevance=torch.zeros_like(raw), backend="reference").indices,
                  cdpruner_relevance(raw).topk(32).indices.sort().values):
        assert not torch.equal(wrong, want)
    assert torch.equal(cdpruner(x, 32, relevance=raw, backend="reference").indices, want)


# --------------------------------------------------------------------------- the greedy MAP
def test_dpp_map_is_the_greedy_determinant_maximiser():
    """Each pick maximises det(L_S) over the candidates (float64 determinants, numpy)."""
    x, r = randn((1, 12, 6), 3), torch.rand(1, 12, generator=torch.Generator().manual_seed(4))
    xn = x[0].double().numpy()
    xn = xn / np.linalg.norm(xn, axis=1, keepdims=True)
    L = r[0].double().numpy()[:, None] * (xn @ xn.T) * r[0].double().numpy()[None, :]
    chosen = []
    for _ in range(6):
        dets = [np.linalg.det(L[np.ix_(chosen + [i], chosen + [i])]) if i not in chosen
                else -np.inf for i in range(12)]
        chosen.append(int(np.argmax(dets)))
    for got in dpp_all(x, r, 6).values():
        assert got[0].tolist() == chosen


def test_dpp_map_hand_computed_spent_tokens():
    """x0 = x1 = e1 (a duplicate), x3 = (e1 + e2)/√2, x2 = e2, x4 = 0, x5 = e3.  Gains r²·res:
    pick 0 (ties with 1: lowest index), then 3 (0.81·½ > 0.25·1), then 5; {1, 2, 4} are then
    spent (in the span; x4 from the start) and follow in index order."""
    x = torch.tensor([[[1., 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]]])
    r = torch.tensor([[1.0, 1.0, 0.5, 0.9, 1.0, 0.2]])
    results = dpp_all(x, r, 6)
    assert results["reference"][0].tolist() == [0, 3, 5, 1, 2, 4]
    assert_all_equal(results)
    # eps = 0: nothing is spent but the zero token and exact spans; the order is the same here
    assert dpp_all(x, r, 4, eps=0.0)["reference"][0].tolist()[:3] == [0, 3, 5]


# --------------------------------------------------------------------------- backends
SHAPES = [(1, 1, 3, 1), (2, 7, 5, 1), (2, 7, 5, 7), (2, 255, 37, 1), (1, 255, 37, 255),
          (2, 100, 64, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,N,D,k", SHAPES)
def test_backends_agree(B, N, D, k, dtype):
    x = randn((B, N, D), N + D, dtype)
    r = torch.rand(B, N, generator=torch.Generator().manual_seed(k))
    results = dpp_all(x, r, k)
    assert_all_equal(results)
    got = results["reference"]
    assert got.shape == (B, k) and all(len(set(row)) == k for row in got.tolist())


def test_equal_relevance_ties_go_to_the_lowest_index():
    """With one relevance for all, the first pick is token 0 on every backend (the residuals
    start at exactly 1; N = 300 spans blocks of the Triton stream path), and the picks stay in
    agreement."""
    x = randn((2, 300, 12), 7)
    results = dpp_all(x, torch.ones(2, 300), 12)
    assert_all_equal(results)
    assert results["reference"][:, 0].tolist() == [0, 0]


def test_cpu_steps_split_over_threads():
    """One image with enough work per step (N·(D + k) >= 2^17 multiply-adds) splits each step
    of the C++ kernel over the threads; the result does not depend on the split."""
    x, r = randn((1, 600, 240), 8), torch.rand(1, 600, generator=torch.Generator().manual_seed(9))
    assert_all_equal({b: dpp_map(x, r, 20, backend=b) for b in BACKENDS if b != "triton"})


def test_backends_agree_bf16_and_strided():
    x = randn((2, 60, 40), 9).to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    r = torch.rand(2, 60, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    results = {b: dpp_map(x, r, 20, backend=b) for b in BACKENDS if b != "triton"}
    assert_all_equal(results)


def test_masks():
    x, r = randn((3, 90, 20), 11), torch.rand(3, 90, generator=torch.Generator().manual_seed(2))
    mask = random_mask(3, 90, 12, p=0.3, min_true=16)
    results = dpp_all(x, r, 16, mask=mask)
    assert_all_equal(results)
    assert bool(mask.gather(1, results["reference"]).all())
    # a mask is the DPP of the candidates alone
    for b in range(3):
        cand = mask[b].nonzero()[:, 0]
        alone = dpp_map(x[b:b + 1, cand], r[b:b + 1, cand], 16, backend="reference")
        assert torch.equal(cand[alone[0]], results["reference"][b])


def test_duplicates_and_rank_deficiency():
    """Exact copies tie and go to the lowest index; once the selection spans every token (here
    after one pick per distinct token) the rest follow in index order."""
    base = randn((2, 100, 16), 21)
    x = with_duplicates(base, 10, 22)
    groups = [[int(torch.nonzero((x[b] == x[b, i]).all(-1))[0]) for i in range(100)]
              for b in range(2)]
    r = torch.stack([torch.rand(100, generator=torch.Generator().manual_seed(3))[g]
                     for g in torch.tensor(groups)])          # copies share their relevance
    results = dpp_all(x, r, 100)
    assert_all_equal(results)
    for b, row in enumerate(results["reference"].tolist()):
        assert sorted(row[:10]) == sorted(set(groups[b]))       # one per group, the first copy
        assert row[10:] == sorted(set(range(100)) - set(row[:10]))
    low_rank = randn((2, 80, 5), 23) @ randn((5, 30), 24)      # rank 5 in 30 dimensions
    results = dpp_all(low_rank, torch.rand(2, 80, generator=torch.Generator().manual_seed(6)), 80)
    assert_all_equal(results)
    for row in results["reference"].tolist():
        assert row[5:] == sorted(set(range(80)) - set(row[:5]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # NaN arithmetic in numpy
def test_non_finite_inputs_give_unique_indices():
    x = randn((2, 30, 8), 31)
    x[0, 3, 2] = float("nan")
    x[0, 5] = float("inf")
    x[1, 7] = 0.0
    r = torch.rand(2, 30, generator=torch.Generator().manual_seed(5))
    r[1, 2] = float("nan")
    r[1, 9] = float("inf")
    results = dpp_all(x, r, 30)
    assert_all_equal(results)
    for row in results["reference"].tolist():
        assert sorted(row) == list(range(30))
    # the bad tokens are spent from the start: after the 8 picks that span R^8, with the rest
    row = results["reference"][0].tolist()
    assert 3 not in row[:8] and 5 not in row[:8] and row[8:] == sorted(row[8:])


def test_degenerate_relevance():
    """Every relevance equal (the original divides by zero): r = 1; NaN stays NaN."""
    assert torch.equal(cdpruner_relevance(torch.full((2, 4), 0.3)), torch.ones(2, 4))
    raw = torch.tensor([[0.0, 1.0, float("nan"), 0.5]])
    r = cdpruner_relevance(raw)
    assert torch.allclose(r[0, [0, 1, 3]], torch.tensor([1e-6, 1 + 1e-6, 0.5 + 1e-6]))
    assert torch.isnan(r[0, 2])
    both = cdpruner_relevance(torch.tensor([[0.0, 1.0], [2.0, 4.0]]), scope="batch")
    assert torch.allclose(both, (torch.tensor([[0.0, 1.0], [2.0, 4.0]]) + 1e-6) / 4)
    one = cdpruner(randn((2, 1, 4), 1), 1, relevance=torch.zeros(2, 1), backend="reference")
    assert one.indices.tolist() == [[0], [0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cdpruner_options(backend):
    """A text mask drops rows of the prompt; a mask restricts candidates and the normalisation;
    different embedding dtypes are promoted; k = 0 and B = 0 give empty results."""
    x, img, txt = inputs(2, 50, 24, 16, 4, 41)
    txt2 = txt.expand(2, 4, 16)
    tm = torch.tensor([[True, True, False, False], [True, True, True, True]])
    got = cdpruner(x, 10, image_embeds=img, text_embeds=txt2, text_mask=tm, backend=backend)
    want0 = cdpruner(x[:1], 10, image_embeds=img[:1], text_embeds=txt[:2], backend=backend)
    want1 = cdpruner(x[1:], 10, image_embeds=img[1:], text_embeds=txt, backend=backend)
    assert torch.equal(got.indices, torch.cat([want0.indices, want1.indices]))
    mask = random_mask(2, 50, 3, p=0.5, min_true=10)
    got = cdpruner(x, 10, image_embeds=img, text_embeds=txt, mask=mask, backend=backend)
    assert bool(mask.gather(1, got.indices).all())
    half = cdpruner(x, 10, image_embeds=img, text_embeds=txt.half(), backend=backend)
    assert half.indices.shape == (2, 10)
    empty = cdpruner(x, 0, image_embeds=img, text_embeds=txt, backend=backend)
    assert empty.tokens.shape == (2, 0, 24)
    for scope in ("image", "batch"):
        got = cdpruner(x[:0], 3, relevance=torch.zeros(0, 50), relevance_scope=scope,
                       backend=backend)
        assert got.indices.shape == (0, 3)
        got = cdpruner(x[:, :0], 0, relevance=torch.zeros(2, 0), relevance_scope=scope,
                       backend=backend)
        assert got.tokens.shape == (2, 0, 24)


def test_torch_compile_traces_the_ops():
    x, img, txt = inputs(2, 40, 16, 8, 1, 51)
    for backend in [b for b in BACKENDS if b != "reference"]:
        f = torch.compile(lambda x, i, t: cdpruner(x, 6, image_embeds=i, text_embeds=t,
                                                   backend=backend),
                          fullgraph=True, backend="aot_eager")
        want = cdpruner(x, 6, image_embeds=img, text_embeds=txt, backend=backend)
        assert torch.equal(f(x, img, txt).indices, want.indices), backend


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
def test_triton_entry_point_is_device_guarded():
    assert dpp_kernels.dpp_map.device_guarded


# --------------------------------------------------------------------------- errors
def _good():
    x, img, txt = inputs(2, 6, 4, 3, 2, 61)
    return dict(features=x, keep=2, image_embeds=img, text_embeds=txt)


ERRORS = [
    (dict(features=[[0.0]]), TypeError, "features"),
    (dict(features=torch.zeros(6, 4)), ValueError, r"features.*\[B, N, D\].*\(6, 4\)"),
    (dict(features=torch.zeros(2, 6, 4, dtype=torch.int64)), TypeError, "features.*int64"),
    (dict(keep=2.0), TypeError, "keep"),
    (dict(keep=-1), ValueError, "keep"),
    (dict(keep=7), ValueError, r"keep=7.*N=6"),
    (dict(image_embeds=torch.zeros(2, 5, 3)), ValueError, r"image_embeds.*\(2, 5, 3\)"),
    (dict(image_embeds=torch.zeros(2, 6, 3, dtype=torch.int32)), TypeError, "image_embeds"),
    (dict(text_embeds=torch.zeros(2, 4)), ValueError, r"text_embeds.*\(2, 2, 4\)"),
    (dict(text_embeds=torch.zeros(3, 2, 3)), ValueError, r"text_embeds.*\(3, 2, 3\)"),
    (dict(text_embeds=torch.zeros(1, 1, 1, 3)), ValueError, "text_embeds"),
    (dict(text_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, r"text_mask.*\(2, 3\)"),
    (dict(text_mask=torch.ones(2, 2)), TypeError, "text_mask.*bool"),
    (dict(text_mask=torch.tensor([[True, False], [False, False]])), ValueError,
     r"text_mask.*row\(s\) \[1\]"),
    (dict(relevance=torch.zeros(2, 6)), ValueError, "exactly one of relevance"),
    (dict(image_embeds=None, text_embeds=None), ValueError, "exactly one of relevance"),
    (dict(text_embeds=None), ValueError, "exactly one of relevance"),
    (dict(relevance_scope="row"), ValueError, "relevance_scope"),
    (dict(mask=torch.ones(2, 6)), TypeError, "mask.*bool"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"mask.*\(2, 5\)"),
    (dict(mask=torch.tensor([[True] * 6, [True] + [False] * 5])), ValueError,
     r"keep=2 is larger than the number of candidate tokens \(1"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps="1"), TypeError, "eps"),
    (dict(backend="cuda"), RuntimeError, "cuda"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(validate=1), TypeError, "validate"),
]


@pytest.mark.parametrize("change,exc,match", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_cdpruner_argument_errors(change, exc, match):
    kwargs = {**_good(), **change}
    with pytest.raises(exc, match=match):
        cdpruner(**kwargs)


def test_relevance_argument_errors():
    x = randn((2, 6, 4), 1)
    with pytest.raises(ValueError, match=r"relevance.*\(2, 6\).*\(2, 5\)"):
        cdpruner(x, 2, relevance=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="relevance.*int64"):
        cdpruner(x, 2, relevance=torch.zeros(2, 6, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpp_map_argument_errors(backend):
    x, r = randn((2, 6, 4), 1), torch.rand(2, 6)
    with pytest.raises(ValueError, match=r"x.*\[B, N, D\]"):
        dpp_map(x[0], r, 2, backend=backend)
    with pytest.raises(ValueError, match=r"relevance.*\(2, 6\)"):
        dpp_map(x, r[:, :5], 2, backend=backend)
    with pytest.raises(ValueError, match="k=7"):
        dpp_map(x, r, 7, backend=backend)
    with pytest.raises(ValueError, match=r"mask.*\(2, 6\)"):
        dpp_map(x, r, 2, mask=torch.ones(2, 7, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="eps"):
        dpp_map(x, r, 2, eps=float("nan"), backend=backend)


def test_cpu_kernel_checks_what_validate_false_skips():
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled extension is not built")
    few = torch.zeros(2, 6, dtype=torch.bool)
    few[:, :2] = True
    with pytest.raises(ValueError, match="k=3 is larger than the number of candidate"):
        dpp_map(randn((2, 6, 4), 1), torch.rand(2, 6), 3, mask=few, backend="cpu", validate=False)
    if TRITON:   # Triton stays in range: the candidates first, then index 0 repeated
        got = dpp_map(randn((2, 6, 4), 1), torch.rand(2, 6), 3, mask=few, backend="triton",
                      validate=False)
        assert sorted(got[0, :2].tolist()) == [0, 1] and bool((got >= 0).all() & (got < 6).all())
