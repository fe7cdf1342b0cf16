"""FastVID (both model paths) against its original's code.

The goldens are the statement-by-statement transliterations in ``tests/fastvid_originals.py``
(the LLaVA-OneVision block of ``Qwen2Model.forward`` and the Qwen2.5-VL block of
``Qwen2_5_VLForConditionalGeneration.forward``), run one video at a time on the same tokens.  In
float64 (the float64 reference: its density peaks in float64 too) the kept positions must be
identical and the tokens within float32 rounding (visprune's density peaks and merge compute in
float32); in fp32 / fp16 / bf16, where the original's segmentation and saliency ranks are
computed in that dtype, the positions must still be identical.
"""
import importlib

import pytest
import torch

from visprune import available_backends
from visprune.methods import fastvid

import fastvid_originals as orig

CPU = torch.device("cpu")
BACKENDS = [name for name, why in available_backends(CPU).items() if why == "ok"]
ONEVISION, QWEN = "llava_onevision", "qwen2_5_vl"
fastvid_module = importlib.import_module("visprune.methods.fastvid")

# visprune's argument -> the original's
ORIGINAL_NAMES = {"r": "fastvid_retention_ratio", "c": "fastvid_DySeg_c",
                  "tau": "fastvid_DySeg_tau", "ignore": "fastvid_DySeg_ignore",
                  "d": "fastvid_STPrune_d", "p": "fastvid_DTM_p", "beta": "fastvid_DTM_beta",
                  "k": "knn"}


def make_video(B, T, P, D, seed, dtype=torch.float64, G=12):
    """``(video[B, T, P, D], saliency[B, T, P], global_features[B, T, G])``: frames in scenes
    (a shared scene vector, a per-frame drift and per-token noise), so that adjacent frames'
    cosines spread around the thresholds (near 1 within a scene, near 0 across); continuous
    values (no ties)."""
    g = torch.Generator().manual_seed(seed)
    scene = (torch.rand(B, T, generator=g) < 0.25).long().cumsum(1)
    base = torch.randn(B, T + 1, D, generator=g, dtype=torch.float64)
    drift = 0.35 * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    frame = base.gather(1, scene[..., None].expand(B, T, D)) + drift
    x = frame[:, :, None] + 0.8 * torch.randn(B, T, P, D, generator=g, dtype=torch.float64)
    base_g = torch.randn(B, T + 1, G, generator=g, dtype=torch.float64)
    gf = base_g.gather(1, scene[..., None].expand(B, T, G)) \
        + 0.3 * torch.randn(B, T, G, generator=g, dtype=torch.float64)
    sal = torch.rand(B, T, P, generator=g, dtype=torch.float64)
    return x.to(dtype), sal.to(dtype), gf.to(dtype)


def original(variant, x, sal, gf, b, t, dpc_dtype=torch.float64, noise=None, **kw):
    """The transliterated original on video ``b``'s first ``t`` frames, packed as it takes
    them: ``(tokens, positions)``."""
    P, D = x.shape[2:]
    packed = x[b, :t].reshape(t * P, D).contiguous()
    args = {ORIGINAL_NAMES[n]: v for n, v in kw.items()}
    if variant == ONEVISION:
        return orig.fastvid_llava_onevision(packed, sal[b, :t].reshape(-1), gf[b, :t], t,
                                            dpc_dtype=dpc_dtype, noise=noise, **args)
    mean = packed.view(t, P, D).mean(1) if gf is None else gf[b, :t]
    return orig.fastvid_qwen2_5_vl(packed, sal[b, :t], mean, t, dpc_dtype=dpc_dtype,
                                   noise=noise, **args)


def check_golden(res, variant, x, sal, gf, frames, atol=None, **kw):
    """Every row of ``res`` is the original's result on that video alone: the same positions,
    the tokens within ``atol`` (relative to the largest |token|; ``None``: positions only), -1
    and zero tokens past the row's length."""
    B, T, P, D = x.shape
    L = res.indices.shape[1]
    assert res.tokens.shape == (B, L, D) and res.tokens.dtype == x.dtype
    assert res.lengths.tolist() == [int((i >= 0).sum()) for i in res.indices]
    for b, t in enumerate(frames):
        tokens, positions = original(variant, x, sal, gf, b, t, **kw)
        n = int(res.lengths[b])
        assert res.indices[b, :n].tolist() == positions.tolist(), (b, t, kw)
        assert (res.indices[b, n:] == -1).all() and not res.tokens[b, n:].any()
        if atol is not None and n:
            scale = max(1.0, float(x.abs().max()))
            torch.testing.assert_close(res.tokens[b, :n], tokens, rtol=0, atol=atol * scale)


def run(variant, x, sal, gf, frames=None, **kw):
    return fastvid(x, sal, global_features=gf, variant=variant, frames=frames, **kw)


# --------------------------------------------------------------------------- golden parity
SETTINGS = {
    ONEVISION: [{}, {"r": 0.3}, {"r": 0.3, "p": 1}, {"r": 0.3, "p": 2}, {"r": 0.4, "p": 3, "c": 3},
                {"r": 0.3, "c": 1, "tau": -2.0}, {"r": 0.3, "tau": 2.0}, {"r": 0.3, "d": 0.0},
                {"r": 0.3, "d": 1.0}, {"r": 1.0, "d": 0.5}, {"r": 0.0}, {"r": 0.3, "k": 3},
                {"r": 0.3, "k": 60}, {"r": 0.3, "beta": 0.0}, {"r": 0.3, "beta": 1.0},
                {"r": 0.5, "d": 0.9, "p": 2, "c": 2, "tau": 0.5}],
    QWEN: [{}, {"r": 0.1}, {"p": 1}, {"p": 2, "ignore": 0.99}, {"c": 1, "tau": -2.0},
           {"c": 1, "tau": -2.0, "ignore": 2.0}, {"c": 1, "tau": -2.0, "ignore": -2.0},
           {"tau": 2.0}, {"d": 0.0}, {"d": 1.0}, {"r": 1.0}, {"r": 0.0}, {"k": 3}, {"k": 60},
           {"beta": 0.0}, {"beta": 1.0}, {"r": 0.5, "d": 0.9, "p": 3, "c": 2, "tau": 0.5}],
}
# (T, P, D, frames of a ragged batch): odd P and D, one- and two-frame videos
SHAPES = [(8, 196, 24, [8, 5]), (13, 49, 7, [13, 1, 12]), (6, 30, 3, [6, 2]),
          (32, 30, 8, [32])]


@pytest.mark.parametrize("variant", [ONEVISION, QWEN])
def test_matches_the_original_in_float64(variant):
    """Ragged batches, odd shapes, every setting (segments of one frame and of many, anchor
    strides 1 to 4, no anchors, no salient tokens, k above the candidates, the blend's
    bounds): the original's positions, its merged tokens within float32 rounding."""
    for i, kw in enumerate(SETTINGS[variant]):
        for seed in (i % len(SHAPES), (i + 1) % len(SHAPES)):      # two shapes each
            T, P, D, frames = SHAPES[seed]
            x, sal, gf = make_video(len(frames), T, P, D, seed)
            g = gf if variant == ONEVISION else None
            check_golden(run(variant, x, sal, g, frames, **kw), variant, x, sal, g, frames,
                         atol=2e-6, **kw)


@pytest.mark.parametrize("variant", [ONEVISION, QWEN])
def test_the_cases_cover_what_they_claim(variant):
    """The golden cases reach what the original's branches distinguish: one-frame and
    multi-frame segments, several anchor frames in a segment, Qwen's sub-segments."""
    seen = set()
    for seed, (T, P, D, frames) in enumerate(SHAPES):
        x, sal, gf = make_video(len(frames), T, P, D, seed)
        g = gf if variant == ONEVISION else x.mean(2)
        for kw in SETTINGS[variant]:
            p = kw.get("p", 4)
            for b, t in enumerate(frames):
                sim = (torch.nn.functional.normalize(g[b, :t], dim=-1)[:-1]
                       * torch.nn.functional.normalize(g[b, :t], dim=-1)[1:]).sum(-1)
                segments = fastvid_module._segments(
                    sim, t, kw.get("c", 8), kw.get("tau", 0.9 if variant == ONEVISION else 0.84))
                for lo, L in segments:
                    seen.add("one-frame" if L == 1 else "multi-frame")
                    if L > p:
                        seen.add("several anchor frames")
                    inner = (sim[lo:lo + L - 1] < kw.get("ignore", 0.95)).sum()
                    if L > 1 and 0 < inner < L - 1:
                        seen.add("sub-segments")
    assert seen == {"one-frame", "multi-frame", "several anchor frames", "sub-segments"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", [ONEVISION, QWEN])
def test_matches_the_original_in_low_precision(variant, dtype):
    """fp32 / fp16 / bf16 tokens, features and saliency: the segmentation and the salient
    ranks are the original's operations in that dtype (the same values and choices), the
    density peaks float32 (the original's ``.float()``; compared with its float64 form): the
    same positions.  The merged tokens: float32 arithmetic rounded once to the dtype, where the
    original merges in the dtype (its cosines in bf16 move tokens to other anchors), so they
    are compared with the original's merge on float64 copies of the same values."""
    one_rounding = {torch.float32: 1e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
    compared = 0
    for seed, (T, P, D, frames) in enumerate(SHAPES[:3]):
        x, sal, gf = make_video(len(frames), T, P, D, seed, dtype)
        g = gf if variant == ONEVISION else None
        wide = [None if t is None else t.double() for t in (x, sal, g)]
        if variant == QWEN:       # the mean token in the dtype, as the original takes it
            wide[2] = x.mean(2).double()
        for kw in SETTINGS[variant][:6]:
            res = run(variant, x, sal, g, frames, **kw)
            check_golden(res, variant, x, sal, g, frames, **kw)
            for b, t in enumerate(frames):
                tokens, positions = original(variant, *wide, b, t, **kw)
                n = int(res.lengths[b])
                if res.indices[b, :n].tolist() == positions.tolist():
                    compared += 1
                    torch.testing.assert_close(
                        res.tokens[b, :n].double(), tokens, rtol=0,
                        atol=one_rounding[dtype] * float(x.abs().max()))
    assert compared >= 10


@pytest.mark.parametrize("variant", [ONEVISION, QWEN])
def test_exact_ties_follow_the_stated_rule(variant):
    """Exact density ties, where the original's noise decides: copies of tokens within a frame
    (equal densities, a zero distance between them), ``k = 2`` (two mutual nearest neighbours
    have equal densities) and ``k = 1`` (every density is 1).  The original without its noise
    and with the stated tie rule (a density tie to the lower index, centres by best score, ties
    to the lowest index) keeps the same positions.  At most 25 candidates per frame, so that
    the original's ``cdist`` computes direct differences (exact zeros between copies, the same
    distance both ways).  (The merged tokens may differ here: two anchors that are copies of
    each other tie in every cosine, and the original's argmax gives the second one to the
    first's slot, where visprune keeps every anchor in its own.)"""
    for seed, (T, P, D) in enumerate([(6, 20, 4), (9, 25, 3)]):
        x, sal, gf = make_video(2, T, P, D, seed)
        x[:, :, 1::4] = x[:, :, 0::4][:, :, :x[:, :, 1::4].shape[2]]
        x[:, 1::2, 2::5] = x[:, 1::2, 3::5][:, :, :x[:, 1::2, 2::5].shape[2]]
        g = gf if variant == ONEVISION else None
        for kw in ({"r": 0.5}, {"r": 0.6, "p": 1}, {"r": 0.5, "c": 1, "tau": -2.0},
                   {"r": 0.5, "k": 2}, {"r": 0.5, "k": 1}):
            check_golden(run(variant, x, sal, g, **kw), variant, x, sal, g, [T, T], **kw)


@pytest.mark.parametrize("variant", [ONEVISION, QWEN])
def test_the_originals_noise_changes_nothing_on_continuous_tokens(variant):
    """The docstring's statement: the original adds ``1e-6·rand`` to the density; on
    continuous tokens (no two densities within the noise) it keeps the same positions, with
    any noise, as without it and as visprune; its density peaks in float32 as it runs."""
    for seed, (T, P, D) in enumerate([(8, 30, 16), (16, 49, 8)]):
        x, sal, gf = make_video(1, T, P, D, seed, torch.float32)
        g = gf if variant == ONEVISION else None
        kw = {"r": 0.4} if variant == ONEVISION else {}
        want = run(variant, x, sal, g, **kw).indices[0].tolist()
        assert want == original(variant, x, sal, g, 0, T, torch.float32, **kw)[1].tolist()
        for noise_seed in range(4):
            noise = torch.Generator().manual_seed(noise_seed)
            _, got = original(variant, x, sal, g, 0, T, torch.float32, noise, **kw)
            assert got.tolist() == want, (seed, noise_seed)


def test_defaults_are_the_originals_scripts():
    """``r``, ``tau`` by variant (0.10 / 0.9 LLaVA-OneVision, 0.27 / 0.84 Qwen2.5-VL), and
    c = 8, d = 0.4, p = 4, beta = 0.6, ignore = 0.95, k = 4 for both."""
    x, sal, gf = make_video(1, 8, 196, 8, 0)
    explicit = dict(c=8, d=0.4, p=4, beta=0.6, ignore=0.95, k=4)
    for variant, r, tau in ((ONEVISION, 0.10, 0.9), (QWEN, 0.27, 0.84)):
        a = run(variant, x, sal, gf, None)
        b = run(variant, x, sal, gf, None, r=r, tau=tau, **explicit)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)
        c = run(variant, x, sal, gf, None, r=r + 0.1)
        assert not torch.equal(a.lengths, c.lengths)
    check_golden(run(ONEVISION, x, sal, gf), ONEVISION, x, sal, gf, [8], atol=2e-6)


def test_global_features_none_is_the_mean_token():
    x, sal, _ = make_video(2, 7, 20, 6, 3)
    for variant in (ONEVISION, QWEN):
        a = run(variant, x, sal, None, r=0.5)
        b = run(variant, x, sal, x.mean(2), r=0.5)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


def test_counts_of_the_onevision_path():
    """196 tokens, r = 0.1: 19 retained per frame, 12 salient, 7 anchors per frame of the
    segment spread over its anchor frames.  One segment of 8 frames (c = 1, tau below every
    cosine): anchor frames 3 and 7 (every p = 4 counted from the end), 7·8 // 2 = 28 merged
    tokens each beside their 12 salient ones."""
    x, sal, gf = make_video(1, 8, 196, 8, 0)
    res = run(ONEVISION, x, sal, gf, c=1, tau=-2.0)
    per_frame = torch.bincount(res.indices[0] // 196, minlength=8).tolist()
    assert per_frame == [12, 12, 12, 40, 12, 12, 12, 40]


# --------------------------------------------------------------------------- batches, inputs
@pytest.mark.parametrize("variant", [ONEVISION, QWEN])
def test_batch_rows_equal_videos_alone(variant):
    """Each row of a ragged batch (frames as a list or a tensor) is its video's result alone;
    what the padding frames hold does not matter; the inputs are not modified."""
    frames = [10, 3, 7, 10, 1]
    x, sal, gf = make_video(5, 10, 30, 12, 3, torch.float32)
    g = gf if variant == ONEVISION else None
    saved = [t.clone() for t in (x, sal, gf)]
    res = run(variant, x, sal, g, frames, r=0.4)
    for t, s in zip((x, sal, gf), saved):
        assert torch.equal(t, s)
    junk = [t.clone() for t in (x, sal, gf)]
    for b, t in enumerate(frames):
        for j in junk:
            j[b, t:] = float("nan")
    again = run(variant, junk[0], junk[1], junk[2] if g is not None else None,
                torch.tensor(frames), r=0.4)
    assert torch.equal(again.indices, res.indices) and torch.equal(again.tokens, res.tokens)
    for b, t in enumerate(frames):
        alone = run(variant, x[b:b + 1, :t], sal[b:b + 1, :t],
                    None if g is None else g[b:b + 1, :t], r=0.4)
        n = int(res.lengths[b])
        assert int(alone.lengths[0]) == n and alone.indices.shape[1] == n
        assert torch.equal(alone.indices[0], res.indices[b, :n])
        assert torch.equal(alone.tokens[0], res.tokens[b, :n])


@pytest.mark.parametrize("variant", [ONEVISION, QWEN])
def test_layout_and_backend_do_not_matter(variant):
    """A D-major copy, a strided view and every available backend (reference, the compiled
    CPU kernels, Triton's interpreter) keep the same positions, the merged tokens within
    float32 rounding."""
    x, sal, gf = make_video(2, 6, 12, 16, 5, torch.float32)
    g = gf if variant == ONEVISION else None
    want = run(variant, x, sal, g, [6, 4], r=0.5)
    big = torch.zeros(2, 6, 12, 2 * 16)
    big[..., ::2] = x
    for other in (x.transpose(2, 3).contiguous().transpose(2, 3), big[..., ::2]):
        got = run(variant, other, sal.transpose(1, 2).contiguous().transpose(1, 2), g, [6, 4],
                  r=0.5)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.tokens, want.tokens)
    assert "reference" in BACKENDS
    for be in BACKENDS:
        got = run(variant, x, sal, g, [6, 4], r=0.5, backend=be)
        assert torch.equal(got.indices, want.indices), be
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)


def test_empty_batch_and_nothing_kept():
    for variant in (ONEVISION, QWEN):
        res = fastvid(torch.randn(0, 3, 4, 5), torch.rand(0, 3, 4), variant=variant)
        assert res.indices.shape == (0, 0) and res.tokens.shape == (0, 0, 5)
    x, sal, gf = make_video(2, 3, 7, 4, 0)
    res = run(ONEVISION, x, sal, gf)           # int(7 · 0.1) = 0 tokens retained per frame
    assert res.indices.shape == (2, 0) and res.lengths.tolist() == [0, 0]


# --------------------------------------------------------------------------- errors
X = torch.randn(2, 4, 3, 5)
S = torch.rand(2, 4, 3)
G = torch.randn(2, 4, 6)
BAD = [
    (dict(video=X[0]), ValueError, "video"),
    (dict(video=X.long()), TypeError, "video"),
    (dict(video=X.numpy()), TypeError, "video"),
    (dict(video=X[:, :, :0]), ValueError, "video"),
    (dict(video=X[..., :0]), ValueError, "video"),
    (dict(video=X[:, :0], saliency=S[:, :0]), ValueError, "frames"),
    (dict(saliency=S[0]), ValueError, "saliency"),
    (dict(saliency=S[:, :3]), ValueError, "saliency"),
    (dict(saliency=S[..., :2]), ValueError, "saliency"),
    (dict(saliency=S.long()), TypeError, "saliency"),
    (dict(saliency=S.tolist()), TypeError, "saliency"),
    (dict(global_features=G[0]), ValueError, "global_features"),
    (dict(global_features=G[:1]), ValueError, "global_features"),
    (dict(global_features=G[..., :0]), ValueError, "global_features"),
    (dict(global_features=G.int()), TypeError, "global_features"),
    (dict(variant="llava"), ValueError, "variant"),
    (dict(variant=None), ValueError, "variant"),
    (dict(r=1.5), ValueError, "r"),
    (dict(r=-0.1), ValueError, "r"),
    (dict(r=float("nan")), ValueError, "r"),
    (dict(r="0.1"), TypeError, "r"),
    (dict(r=True), TypeError, "r"),
    (dict(c=0), ValueError, "c"),
    (dict(c=2.0), TypeError, "c"),
    (dict(c=True), TypeError, "c"),
    (dict(tau=float("nan")), ValueError, "tau"),
    (dict(tau="0.9"), TypeError, "tau"),
    (dict(ignore=float("nan")), ValueError, "ignore"),
    (dict(ignore=None), TypeError, "ignore"),
    (dict(d=1.5), ValueError, "d"),
    (dict(d=None), TypeError, "d"),
    (dict(p=0), ValueError, "p"),
    (dict(p=1.5), TypeError, "p"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(beta=torch.tensor(0.5)), TypeError, "beta"),
    (dict(k=0), ValueError, "k"),
    (dict(k=None), TypeError, "k"),
    (dict(frames=[4]), ValueError, "frames"),
    (dict(frames=[4, 5]), ValueError, "frames"),
    (dict(frames=[0, 4]), ValueError, "frames"),
    (dict(frames=torch.tensor([2.0, 3.0])), TypeError, "frames"),
    (dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("bad,error,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_argument_errors_name_the_argument_before_any_work(bad, error, name, monkeypatch):
    """A ValueError / TypeError whose message names the argument, raised before any op runs."""
    def refuse(*a, **k):
        raise AssertionError("an op ran before the arguments were refused")
    for op in ("dpc_knn_varlen", "cluster_merge", "gather_compact"):
        monkeypatch.setattr(fastvid_module.ops, op, refuse)
    monkeypatch.setattr(fastvid_module, "padded_result", refuse)
    args = dict(video=X, saliency=S, global_features=G)
    args.update(bad)
    video, saliency = args.pop("video"), args.pop("saliency")
    with pytest.raises(error, match=rf"\b{name}\b"):
        fastvid(video, saliency, **args)


def test_global_features_is_keyword_only():
    with pytest.raises(TypeError):
        fastvid(X, S, G)
