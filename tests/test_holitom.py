"""HoliTom's merging before the LLM against its original's code.

The golden is the statement-by-statement transliteration in ``tests/holitom_originals.py``
(``holitom/llava_arch.py`` of cokeshao/HoliTom), run one video at a time on the same tokens: the
output positions must be identical, in the original's order, and the merged tokens within a
float tolerance (visprune's DPC-kNN and merge run in fp32).
"""
import importlib

import numpy as np
import pytest
import torch

from visprune import available_backends
from visprune.methods import holitom

import holitom_originals as orig

CPU = torch.device("cpu")
BACKENDS = [name for name, why in available_backends(CPU).items() if why == "ok"]
module = importlib.import_module("visprune.methods.holitom")
ARGS = {"retain_ratio": "retain_ratio", "tau": "tau", "beta": "Beta", "d": "D", "k": "K",
        "max_window": "max_window_size"}


def make_video(B, T, P, D, seed, dtype=torch.float64, static=0.5):
    """``(video[B, T, P, D], attention[B, T, P])``: a share ``static`` of the positions varies
    slowly (similar across frames) and changes at a cut in the middle; the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, P, D, generator=g, dtype=torch.float64)
    n = int(P * static)
    x[:, :, :n] = x[:, :1, :n] + 0.05 * torch.randn(B, T, n, D, generator=g, dtype=torch.float64)
    cut = T // 2
    x[:, cut:, :n] = torch.randn(B, 1, n, D, generator=g, dtype=torch.float64) + \
        0.05 * torch.randn(B, T - cut, n, D, generator=g, dtype=torch.float64)
    attention = torch.rand(B, T, P, generator=g, dtype=torch.float64)
    return x.to(dtype), attention.to(dtype)


def original(x, a, generator=None, dist_dtype=torch.float64, **kw):
    """The transliteration on one video ``x[T, P, D]``, visprune's keyword names."""
    kw = {ARGS[k]: v for k, v in kw.items()}
    return orig.holitom_video(x, a, dist_dtype=dist_dtype, generator=generator, **kw)


def check(res, b, tokens, positions, atol):
    n = int(res.lengths[b])
    assert n == positions.numel()
    assert torch.equal(res.indices[b, :n], positions)
    assert (res.indices[b, n:] == -1).all() and (res.tokens[b, n:] == 0).all()
    torch.testing.assert_close(res.tokens[b, :n].double(), tokens.double(), rtol=0, atol=atol)


SHAPES = [(8, 16, 32), (7, 9, 5), (1, 10, 4), (12, 25, 17), (5, 3, 8), (3, 1, 6), (16, 49, 64)]
SETTINGS = [{}, {"d": 0.5}, {"d": 1.0, "beta": None}, {"retain_ratio": 0.25, "tau": 0.65},
            {"max_window": 3, "d": 0.3, "k": 3}, {"retain_ratio": 1.0, "d": 0.7},
            {"retain_ratio": 0.0}]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kw", SETTINGS, ids=str)
def test_matches_the_original_in_float64(shape, kw):
    """The float64 transliteration's positions, in its order; its tokens within fp32 rounding."""
    T, P, D = shape
    for seed in range(2):
        x, a = make_video(1, T, P, D, seed)
        tokens, positions, _ = original(x[0], a[0], **kw)
        check(holitom(x, a, **kw), 0, tokens, positions, 1e-5)


@pytest.mark.parametrize("kw", SETTINGS[:4], ids=str)
def test_matches_the_original_in_float32(kw):
    """On fp32 tokens, the original's own precision (``cdist`` in fp32)."""
    x, a = make_video(1, 10, 36, 48, 7, torch.float32)
    tokens, positions, _ = original(x[0], a[0], dist_dtype=torch.float32, **kw)
    check(holitom(x, a, **kw), 0, tokens, positions, 1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_the_originals_density_noise_changes_nothing_on_continuous_tokens(seed):
    """The original breaks density ties with ``1e-6·rand``; visprune breaks them by index.  On
    continuous tokens there are none: the original with its noise keeps the same positions."""
    x, a = make_video(1, 12, 36, 24, seed)
    kw = {"d": 0.5, "retain_ratio": 0.2}
    res = holitom(x, a, **kw)
    for draw in range(3):
        g = torch.Generator().manual_seed(100 * seed + draw)
        tokens, positions, _ = original(x[0], a[0], generator=g, **kw)
        check(res, 0, tokens, positions, 1e-5)


def test_one_centre_is_the_groups_first_token():
    """With one centre (``k = 1``) every density is ``exp(0)``: the original's centre is its
    noise's pick; visprune's the group's first token, every other token merged into it."""
    x = torch.randn(1, 1, 20, 8, dtype=torch.float64).expand(1, 6, 20, 8)
    res = holitom(x, torch.rand(1, 6, 20), retain_ratio=0.01)       # r' = 0.06: one centre
    assert res.indices.tolist() == [[0]]
    want = 0.6 * x[0, 0, 0] + 0.4 * x[0, 0, 1:].mean(0)
    torch.testing.assert_close(res.tokens[0, 0], want, rtol=0, atol=1e-6)
    tokens, positions, _ = original(x[0], torch.rand(6, 20, dtype=torch.float64),
                                    retain_ratio=0.01)
    check(res, 0, tokens, positions, 1e-6)


def test_windows_are_the_originals_dynamic_programme():
    """The windows and the tokens they remove, on similarity patterns with many equal-valued
    choices (whole-frame repeats, ties between windows), every window limit."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        T, P = int(rng.integers(1, 14)), int(rng.integers(1, 6))
        sim = torch.from_numpy(rng.choice([0.5, 0.9], size=(T - 1, P),
                                          p=[0.3 + 0.4 * (trial % 2), 0.7 - 0.4 * (trial % 2)]))
        for max_window in (1, 2, 3, 1024):
            want = orig.select_static_windows(sim, T, 0.8, max_window)
            removed = module._removed(module._runs((sim > 0.8)[None]))
            windows, total = module.holitom_windows(removed.numpy(), [T], max_window)
            assert (windows[0], float(total[0])) == want


def test_batch_rows_equal_videos_alone():
    """Each row of a ragged batch is its video's result alone (its frames), and what the
    padding frames hold (tokens and attention) does not matter."""
    frames = [10, 3, 7, 10, 1]
    x, a = make_video(5, 10, 12, 16, 3, torch.float32)
    kw = {"d": 0.4, "retain_ratio": 0.3}
    res = holitom(x, a, frames=frames, **kw)
    junk, junk_a = x.clone(), a.clone()
    for b, t in enumerate(frames):
        junk[b, t:] = float("nan")
        junk_a[b, t:] = float("inf")
    other = holitom(junk, junk_a, frames=torch.tensor(frames), **kw)
    assert torch.equal(other.indices, res.indices) and torch.equal(other.tokens, res.tokens)
    for b, t in enumerate(frames):
        alone = holitom(x[b:b + 1, :t], a[b:b + 1, :t], **kw)
        n = int(res.lengths[b])
        assert int(alone.lengths[0]) == n and alone.indices.shape[1] == n
        assert torch.equal(alone.indices[0], res.indices[b, :n])
        torch.testing.assert_close(alone.tokens[0], res.tokens[b, :n], rtol=1e-6, atol=1e-6)
        tokens, positions, _ = original(x[b, :t].double(), a[b, :t].double(), **kw)
        check(res, b, tokens, positions, 1e-5)


def test_full_batch_matches_the_original():
    x, a = make_video(4, 8, 25, 12, 11)
    res = holitom(x, a, d=0.5)
    for b in range(4):
        tokens, positions, _ = original(x[b], a[b], d=0.5)
        check(res, b, tokens, positions, 1e-5)


def test_inputs_are_not_modified():
    x, a = make_video(2, 6, 16, 8, 1, torch.float32)
    view = x.transpose(2, 3).contiguous().transpose(2, 3)            # a non-contiguous layout
    before = [t.clone() for t in (x, a, view)]
    for v in (x, view):
        holitom(v, a, d=0.5, frames=[6, 4])
    for t, b in zip((x, a, view), before):
        assert torch.equal(t, b)


def test_backends_agree():
    x, a = make_video(2, 6, 20, 16, 5, torch.float32)
    want = holitom(x, a, d=0.5, frames=[6, 5], backend="reference")
    for be in BACKENDS:
        got = holitom(x, a, d=0.5, frames=[6, 5], backend=be)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.lengths, want.lengths)
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_runs_and_keeps_its_dtype(dtype):
    x, a = make_video(2, 6, 16, 8, 2, dtype)
    res = holitom(x, a, d=0.5)
    assert res.tokens.dtype == dtype and res.indices.dtype == torch.long
    n = int(res.lengths.min())
    assert (res.indices[:, :n] >= 0).all() and torch.isfinite(res.tokens).all()


def test_static_video_keeps_its_budget_in_static_tokens():
    """A video whose frames are all the same is one window: only static tokens, ``round(P·r')``
    of them, ``r' = min(r·T, 1)``, at frame 0's positions."""
    x = torch.randn(1, 1, 20, 8).expand(1, 6, 20, 8)
    res = holitom(x, torch.rand(1, 6, 20), retain_ratio=0.1)
    assert int(res.lengths[0]) == round(20 * min(0.1 * 6, 1))
    assert (res.indices[0] < 20).all()


def test_empty_batch_and_empty_budget():
    res = holitom(torch.randn(0, 3, 4, 5), torch.rand(0, 3, 4))
    assert res.indices.shape == (0, 0) and res.tokens.shape == (0, 0, 5)
    res = holitom(torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4), retain_ratio=0.0)
    assert res.indices.shape == (2, 0) and res.lengths.tolist() == [0, 0]


# --------------------------------------------------------------------------- errors
X = torch.randn(2, 4, 3, 5)
A = torch.rand(2, 4, 3)
BAD = [
    (lambda: holitom(X[0], A), ValueError, r"\bvideo\b"),
    (lambda: holitom(X.long(), A), TypeError, r"\bvideo\b"),
    (lambda: holitom(X, A[:, :3]), ValueError, r"\battention\b"),
    (lambda: holitom(X, A.long()), TypeError, r"\battention\b"),
    (lambda: holitom(X, None), ValueError, r"\battention\b"),
    (lambda: holitom(X, A.clone().fill_(float("nan"))), ValueError, r"\battention\b"),
    (lambda: holitom(X, A, retain_ratio=1.5), ValueError, r"\bretain_ratio\b"),
    (lambda: holitom(X, A, retain_ratio="0.1"), TypeError, r"\bretain_ratio\b"),
    (lambda: holitom(X, A, tau=2.0), ValueError, r"\btau\b"),
    (lambda: holitom(X, A, beta=-0.1), ValueError, r"\bbeta\b"),
    (lambda: holitom(X, A, d=float("nan")), ValueError, r"\bd\b"),
    (lambda: holitom(X, A, k=0), ValueError, r"\bk\b"),
    (lambda: holitom(X, A, k=2.0), TypeError, r"\bk\b"),
    (lambda: holitom(X, A, max_window=0), ValueError, r"\bmax_window\b"),
    (lambda: holitom(X, A, frames=[4, 5]), ValueError, r"\bframes\b"),
    (lambda: holitom(X, A, backend="gpu"), ValueError, r"\bbackend\b"),
]


@pytest.mark.parametrize("call,error,match", BAD)
def test_argument_errors_come_before_any_work(call, error, match, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")
    monkeypatch.setattr(module, "frame_cosine", no_work)
    with pytest.raises(error, match=match):
        call()


def test_attention_is_optional_with_d_one():
    x, _ = make_video(1, 6, 16, 8, 4)
    res = holitom(x, None, d=1.0)
    tokens, positions, _ = original(x[0], torch.zeros(6, 16, dtype=torch.float64), d=1.0)
    check(res, 0, tokens, positions, 1e-5)
