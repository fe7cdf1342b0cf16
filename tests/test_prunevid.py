"""PruneVid's pre-LLM stage against its original's code.

The golden is the statement-by-statement transliteration of ``merge_frames_dynamic`` and the
functions it calls (``tests/prunevid_originals.py``), run one video at a time in float64 without
the density noise (the documented tie rule): the output positions (kept tokens, cluster centres,
static tokens in their window's first frame) must be identical, in the original's order, and the
tokens within fp32 tolerance of the float64 ones.
"""
import importlib
import random

import pytest
import torch

from visprune import available_backends, ops
from visprune.methods import prunevid

import prunevid_originals as orig

pv = importlib.import_module("visprune.methods.prunevid")
CPU = torch.device("cpu")
BACKENDS = [name for name, why in available_backends(CPU).items() if why == "ok"]
# the original's argument names → visprune's
# Triton runs in its CPU interpreter here: the heavier tests leave it to test_backends_agree
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]
NAMES = {"threshold": "tau", "temporal_segment_ratio": "temporal_ratio"}


def make_video(B, T, P, D, kind, seed, dtype=torch.float64):
    """``[B, T, P, D]`` tokens: ``randn``; ``scenes`` (shots of a few frames sharing a mean,
    half the positions nearly constant within a shot: several windows and static positions);
    ``still`` (every frame nearly the same: one window, most positions static)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, P, D, generator=g, dtype=torch.float64)
    if kind == "scenes":
        shot = torch.randint(2, 5, (T,), generator=g).repeat_interleave(
            torch.randint(2, 5, (T,), generator=g))[:T]
        shot = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long),
                                       (shot[1:] != shot[:-1]).long()]), 0)
        base = torch.randn(B, int(shot.max()) + 1, P, D, generator=g, dtype=torch.float64)
        noise = torch.where(torch.arange(P)[:, None] < P // 2, 0.05, 0.8)
        x = base[:, shot] * 2 + noise * x
    elif kind == "still":
        x = torch.randn(B, 1, P, D, generator=g, dtype=torch.float64) + 0.1 * x
    return x.to(dtype)


def golden(x_row, **kw):
    """The transliterated original on one video ``[T, P, D]`` in float64:
    ``(tokens, positions)``."""
    T, P, D = x_row.shape
    return orig.merge_frames_dynamic(x_row.double().reshape(1, T * P, D), T,
                                     dist_dtype=torch.float64, **kw)


def ours(x, backend=None, frames=None, **kw):
    return prunevid(x, backend=backend, frames=frames,
                    **{NAMES.get(a, a): v for a, v in kw.items()})


def check_row(res, b, want_tokens, want_pos, what, atol=1e-5):
    n = int(res.lengths[b])
    assert n == len(want_pos), (what, n, len(want_pos))
    assert res.indices[b, :n].tolist() == want_pos.tolist(), what
    got = res.tokens[b, :n].double()
    tol = atol if res.tokens.dtype in (torch.float32, torch.float64) else 2e-2
    assert torch.allclose(got, want_tokens, atol=tol, rtol=tol), \
        (what, float((got - want_tokens).abs().max()))
    assert (res.indices[b, n:] == -1).all() and not res.tokens[b, n:].any(), what


SHAPES = [(16, 144, 32), (8, 49, 16), (5, 30, 8), (13, 37, 24), (3, 15, 4), (2, 17, 5),
          (1, 20, 8), (7, 1, 3), (6, 14, 6)]


@pytest.mark.parametrize("T,P,D", SHAPES)
@pytest.mark.parametrize("kind", ["randn", "scenes", "still"])
def test_matches_the_original(T, P, D, kind):
    """Every shape (odd ones, one frame, one token per frame, groups at the 14-token limit) and
    every backend: the original's positions, in its order, and its tokens."""
    for seed in range(1 if T * P > 600 else 2):
        x = make_video(1, T, P, D, kind, seed)
        want_tokens, want_pos = golden(x[0])
        for be in BACKENDS:
            if be == "triton" and (T * P > 300 or seed):
                continue                       # the interpreter: small shapes only
            check_row(ours(x, be), 0, want_tokens, want_pos, (be, T, P, D, kind, seed))


@pytest.mark.parametrize("kw", [
    {"threshold": 0.5}, {"threshold": 0.95}, {"temporal_segment_ratio": 0.5},
    {"temporal_segment_ratio": 1.0}, {"temporal_segment_ratio": 0.0}, {"cluster_ratio": 0.25},
    {"cluster_ratio": 1.0}, {"cluster_ratio": 0.0}, {"k": 3}, {"k": 5}, {"k": 50},
    {"max_unclustered": 0}, {"max_unclustered": 40}])
def test_matches_the_original_with_other_settings(kw):
    """(``k = 1`` and ``k = 2`` are left out: every density is then ``exp(0)``, or two mutual
    nearest neighbours have the same one; exact ties here, and the original's order comes from
    ``cdist``'s rounding, which is not symmetric.)"""
    for kind in ("scenes", "randn"):
        x = make_video(1, 12, 36, 12, kind, 3)
        want_tokens, want_pos = golden(x[0], **kw)
        check_row(ours(x, "reference", **kw), 0, want_tokens, want_pos, (kw, kind))


def test_the_cases_reach_every_branch():
    """The shapes above give several windows, static and dynamic groups, groups clustered and
    groups kept (otherwise the parity test would not test them)."""
    x = make_video(1, 16, 144, 32, "scenes", 0)[0]
    means = x.mean(1)[None]
    labels, _ = orig.cluster_dpc_knn(means, 4, 7, torch.float64)
    windows = orig.segment_lengths(orig.refine_clusters(labels))[0]
    assert len(windows) >= 2 and (windows >= 2).all()
    tokens, pos = golden(x)
    assert len(pos) < 16 * 144 // 2            # clustered and static tokens merged
    small = make_video(1, 6, 14, 6, "randn", 0)[0]
    assert len(golden(small)[1]) == 6 * 14     # groups of 14: kept as they are


def test_windows_are_refine_clusters_and_segment_lengths():
    """The window rule on random label sequences (every length 1–24, few and many labels) is the
    original's ``refine_clusters`` followed by ``segment_lengths``; every window has two frames
    or more unless the video has one."""
    rnd = random.Random(0)
    for _ in range(1500):
        T = rnd.randint(1, 24)
        labels = [rnd.randrange(rnd.randint(1, 6)) for _ in range(T)]
        want = orig.segment_lengths(orig.refine_clusters(torch.tensor([labels])))[0].tolist()
        assert pv._windows(labels) == want, labels
        assert T == 1 or min(want) >= 2, labels          # no one-frame window but T = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_inputs(dtype):
    """fp32 / bf16 / fp16 tokens: the original's positions on the same (rounded) values, the
    tokens in the input's dtype."""
    for kind in ("scenes", "randn"):
        x = make_video(2, 9, 40, 16, kind, 5, dtype)
        res = ours(x, "cpu" if "cpu" in BACKENDS else "reference")
        assert res.tokens.dtype == dtype
        for b in range(2):
            want_tokens, want_pos = golden(x[b])
            check_row(res, b, want_tokens, want_pos, (dtype, kind, b))


def density_gaps(x, k):
    """The smallest gap between two densities, and between two scores, of one DPC-kNN call of
    the original on ``x[1, N, D]`` (float64): how far the ``1e-6·rand`` noise is from reordering
    them."""
    N, D = x.shape[1:]
    dist = torch.cdist(x.double(), x.double())[0] / D ** 0.5
    density = (-(dist.topk(min(k, N), largest=False).values ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, dist, dist.max()).amin(-1)
    gaps = [v.sort().values.diff().min() if N > 1 else torch.tensor(1.0)
            for v in (density, density * delta)]
    return min(float(g) for g in gaps)


def test_the_original_with_its_density_noise_gives_the_same_result(monkeypatch):
    """The original adds ``1e-6·rand`` to the density.  Where no two densities or scores of a
    clustering are within the noise of each other (checked: every gap above 1e-5), it gives the
    deterministic rule's positions and tokens for every noise draw.  (Closer values, common at
    PLLaVA's 144-token groups, make the original itself random.)"""
    seen = []
    plain = orig.cluster_dpc_knn

    def recorded(x, cluster_num, k=5, **kw):
        seen.append(density_gaps(x, k))
        return plain(x, cluster_num, k, **kw)

    monkeypatch.setattr(orig, "cluster_dpc_knn", recorded)
    for seed, (T, P, D) in enumerate([(8, 30, 16), (6, 24, 12), (9, 20, 8)]):
        x = make_video(1, T, P, D, "scenes", seed)[0] * 0.2
        seen.clear()
        want_tokens, want_pos = golden(x)
        assert len(seen) >= 3 and min(seen) > 1e-5, (seed, seen)
        for draw in range(3):
            g = torch.Generator().manual_seed(100 * seed + draw)
            tokens, pos = orig.merge_frames_dynamic(x.reshape(1, T * P, D), T,
                                                    dist_dtype=torch.float64, generator=g)
            assert pos.tolist() == want_pos.tolist(), (seed, draw)
            assert torch.allclose(tokens, want_tokens, atol=1e-12)
        check_row(ours(x[None]), 0, want_tokens, want_pos, seed)


def test_ties_go_to_the_lowest_index():
    """Exact copies (equal densities and scores): deterministic, the lower position first, and
    the transliteration's tie rule (``generator=None``) agrees."""
    x = make_video(1, 4, 30, 6, "randn", 0)
    x[:, :, 15:] = x[:, :, :15]                # every token has an exact copy in its frame
    x[:, 2:] = x[:, :2]
    want_tokens, want_pos = golden(x[0])
    for be in BACKENDS:
        res = ours(x, be)
        check_row(res, 0, want_tokens, want_pos, be)
        assert torch.equal(ours(x, be).indices, res.indices)


def test_batch_rows_and_ragged_videos_equal_each_video_alone():
    x = make_video(3, 10, 30, 8, "scenes", 1)
    frames = [10, 4, 1]
    for be in FAST_BACKENDS:
        res = ours(x, be, frames=frames)
        assert res.lengths.tolist() == [len(golden(x[b, :t])[1]) for b, t in enumerate(frames)]
        for b, t in enumerate(frames):
            alone = ours(x[b:b + 1, :t].clone(), be)
            n = int(alone.lengths[0])
            assert torch.equal(res.indices[b, :n], alone.indices[0]), (be, b)
            assert torch.equal(res.tokens[b, :n], alone.tokens[0]), (be, b)
            check_row(res, b, *golden(x[b, :t]), (be, b))
        full = ours(x, be)
        for b in range(3):
            alone = ours(x[b:b + 1], be)
            n = int(alone.lengths[0])
            assert torch.equal(full.indices[b, :n], alone.indices[0]), (be, b)


def test_ragged_padding_is_never_read():
    x = make_video(2, 8, 20, 8, "scenes", 2)
    y = x.clone()
    y[1, 5:] = float("nan")
    a = ours(x, "reference", frames=torch.tensor([8, 5]))
    b = ours(y, "reference", frames=torch.tensor([8, 5]))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


def test_small_chunks_give_the_same_result(monkeypatch):
    """Windows worked through in groups of any size: the same result."""
    x = make_video(2, 12, 30, 8, "scenes", 4)
    whole = ours(x, "reference", frames=[12, 9])
    monkeypatch.setattr(pv, "CHUNK_BYTES", 1)
    small = ours(x, "reference", frames=[12, 9])
    assert torch.equal(whole.indices, small.indices)
    assert torch.allclose(whole.tokens, small.tokens, atol=1e-6)


def test_inputs_unmodified_and_layout_does_not_matter():
    x = make_video(2, 5, 20, 8, "scenes", 6, torch.float32)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    saved = strided.clone()
    for be in BACKENDS:
        a = ours(x, be)
        b = ours(strided, be)
        assert torch.equal(strided, saved), be
        assert torch.equal(a.indices, b.indices), be
        assert torch.allclose(a.tokens, b.tokens, atol=1e-6), be


def test_backends_agree():
    for kind in ("scenes", "randn", "still"):
        x = make_video(2, 5, 24, 8, kind, 7, torch.float32)
        ref = ours(x, "reference")
        for be in BACKENDS:
            res = ours(x, be)
            assert torch.equal(res.indices, ref.indices) and torch.equal(res.lengths,
                                                                         ref.lengths), be
            assert torch.allclose(res.tokens, ref.tokens, atol=1e-5), be


def test_positions_are_distinct_and_follow_the_frames():
    """Every row's positions are distinct positions of its real frames, a static token's in its
    window's first frame, and the frames never go back through the output."""
    x = make_video(2, 12, 40, 8, "scenes", 8)
    res = ours(x, "reference", frames=[12, 7])
    for b, t in enumerate([12, 7]):
        kept = res.indices[b, :int(res.lengths[b])]
        assert len(set(kept.tolist())) == len(kept)
        assert ((kept >= 0) & (kept < t * 40)).all()
        assert ((kept // 40)[1:] >= (kept // 40)[:-1]).all()


def test_empty_batch():
    res = prunevid(torch.zeros(0, 4, 5, 3))
    assert res.tokens.shape == (0, 0, 3) and res.indices.shape == (0, 0)
    assert res.lengths.shape == (0,)


@pytest.mark.parametrize("kw,error,match", [
    ({"tau": 1.5}, ValueError, "tau"), ({"tau": float("nan")}, ValueError, "tau"),
    ({"tau": "0.8"}, TypeError, "tau"), ({"temporal_ratio": 1.5}, ValueError, "temporal_ratio"),
    ({"temporal_ratio": -0.1}, ValueError, "temporal_ratio"),
    ({"cluster_ratio": 2.0}, ValueError, "cluster_ratio"), ({"k": 0}, ValueError, "k"),
    ({"k": 2.5}, TypeError, "k"), ({"k": True}, TypeError, "k"),
    ({"max_unclustered": -1}, ValueError, "max_unclustered"),
    ({"frames": [3, 5]}, ValueError, "frames"), ({"frames": [3]}, ValueError, "frames"),
    ({"frames": [0, 2]}, ValueError, "frames"), ({"backend": "nope"}, ValueError, "nope"),
])
def test_bad_arguments_are_refused_before_any_work(kw, error, match, monkeypatch):
    def started(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(ops, "dpc_knn_varlen", started)
    monkeypatch.setattr(ops, "cluster_merge", started)
    x = torch.randn(2, 4, 5, 3)
    with pytest.raises(error, match=match):
        prunevid(x, **kw)


@pytest.mark.parametrize("video,match", [
    (torch.randn(4, 5, 3), "video"), (torch.ones(1, 4, 5, 3, dtype=torch.long), "video"),
    (torch.randn(1, 4, 0, 3), "video"), (torch.randn(1, 0, 5, 3), "frames")])
def test_bad_videos_are_refused(video, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prunevid(video)
