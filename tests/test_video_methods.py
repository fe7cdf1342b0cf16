"""The video methods (EVS, VidCom2, DyCoke's stage 1) against their originals' code.

The goldens are the statement-by-statement transliterations in ``tests/video_originals.py`` (vLLM
0.32's ``compute_retention_mask`` functions, DyCoke's ``dycole_ttm``), run one video at a time on
the same tokens in the same dtype: float64 (the float64 reference) and fp32 / fp16 / bf16, where
the originals' rounding decides ranks and ties.  The kept positions must be identical, in the
original's order, and the tokens their rows bit for bit.
"""
import importlib
import importlib.util
import json
import pathlib

import pytest
import torch
import torch.nn.functional as F

from visprune import available_backends
from visprune.methods import dycoke, dycoke_count, evs, evs_count, vidcom2, vidcom2_count

import video_originals as orig

CPU = torch.device("cpu")
BACKENDS = [name for name, why in available_backends(CPU).items() if why == "ok"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KINDS = ["randn", "static", "quantized", "offset"]
video_helpers = importlib.import_module("visprune.methods._video")


def make_video(B, T, P, D, dtype, kind, seed):
    """``[B, T, P, D]`` tokens: ``randn``; ``static`` (a run of positions identical in every
    frame, and some frames repeated: cosines of exactly 1); ``quantized`` (few distinct values:
    exact ties); ``offset`` (a large shared offset: cosines near 1, which tie after bf16
    rounding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, P, D, generator=g, dtype=torch.float64)
    if kind == "static":
        x[:, :, : P // 2] = x[:, :1, : P // 2]
        x[:, 1::3] = x[:, 0:T - 1:3][:, :x[:, 1::3].shape[1]]
    elif kind == "quantized":
        x = torch.round(x)
    elif kind == "offset":
        x = 0.05 * x + torch.randn(B, 1, 1, D, generator=g, dtype=torch.float64)
    return x.to(dtype)


def bits(t):
    """``t``'s bytes: equal bits compare equal, NaNs included."""
    return t.contiguous().view(torch.uint8)


def packed(x, b, t):
    """Video ``b``'s first ``t`` frames as the originals take them: ``[t·P, D]``, contiguous."""
    return x[b, :t].reshape(t * x.shape[2], x.shape[3]).contiguous()


def check_mask_method(res, x, frames, golden, grid, q):
    """``res`` keeps, in every row, the positions of ``golden``'s mask of that video alone."""
    B, T, P, D = x.shape
    h, w = grid
    L = res.indices.shape[1]
    assert res.tokens.shape == (B, L, D) and res.tokens.dtype == x.dtype
    for b, t in enumerate(frames):
        want = golden(packed(x, b, t), (t, 2 * h, 2 * w), 2, q).nonzero().squeeze(-1)
        n = int(res.lengths[b])
        assert n == want.numel(), (b, n, want.numel())
        assert res.indices[b, :n].tolist() == want.tolist(), b
        assert (res.indices[b, n:] == -1).all() and not res.tokens[b, n:].any()
        assert torch.equal(bits(res.tokens[b, :n]), bits(packed(x, b, t)[want]))


# --------------------------------------------------------------------------- golden parity
@pytest.fixture(params=[1, None], ids=["frame-by-frame", "default-steps"])
def steps(request, monkeypatch):
    """The video methods' frame-wise loops one frame at a time, or in their default steps."""
    if request.param is not None:
        monkeypatch.setattr(video_helpers, "CHUNK_BYTES", request.param)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,golden", [(evs, orig.evs_retention_mask),
                                           (vidcom2, orig.vidcom2_retention_mask)],
                         ids=["evs", "vidcom2"])
def test_matches_vllm(method, golden, dtype, kind, steps):
    """Ragged batches of each dtype and kind of tokens, several rates: vLLM's kept positions."""
    for seed, (T, h, w, D, frames) in enumerate([(7, 2, 3, 16, [7, 3, 1]), (9, 3, 3, 8, [8, 9]),
                                                 (4, 1, 5, 33, [4])]):
        x = make_video(len(frames), T, h * w, D, dtype, kind, seed)
        for q in (0.0, 0.3, 0.75, 0.95):
            check_mask_method(method(x, q, frames=frames), x, frames, golden, (h, w), q)


@pytest.mark.parametrize("method,golden", [(evs, orig.evs_retention_mask),
                                           (vidcom2, orig.vidcom2_retention_mask)],
                         ids=["evs", "vidcom2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_vllm_on_non_finite_tokens(method, golden, dtype):
    """NaN, ±inf and zero tokens rank as vLLM ranks them (its sorts place NaN first)."""
    x = make_video(2, 6, 6, 8, dtype, "randn", 7)
    x[0, 2, 1] = float("nan")
    x[0, 4, 3, 2] = float("inf")
    x[1, 1, 0] = 0.0
    x[1, 3, 5, 0] = -float("inf")
    for q in (0.2, 0.6):
        res = method(x, q, frames=[6, 5])
        for b, t in enumerate([6, 5]):
            want = golden(packed(x, b, t), (t, 4, 6), 2, q).nonzero().squeeze(-1)
            assert res.indices[b, :int(res.lengths[b])].tolist() == want.tolist()


@pytest.mark.parametrize("method,golden", [(evs, orig.evs_retention_mask),
                                           (vidcom2, orig.vidcom2_retention_mask)],
                         ids=["evs", "vidcom2"])
def test_matches_vllm_on_a_long_narrow_video(method, golden):
    """40,000 tokens of one channel per video, two videos: the whole-video reductions are split
    across threads in vLLM's single-output calls, and visprune makes the same calls."""
    x = make_video(2, 200, 200, 2, torch.float32, "offset", 11)
    check_mask_method(method(x, 0.5), x, [200, 200], golden, (1, 200), 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dycoke_matches_the_original(dtype, steps):
    """Every frame count from 1 to 13 (the original's crash cases T <= 4 by the documented
    choice), odd P, rates 0, 1 and between: the original's tokens and positions, in its order."""
    for k, (P, D) in zip((0.7, 0.0, 1.0, 0.45, 0.3), ((7, 8), (12, 5), (5, 16), (9, 3), (196, 4))):
        for kind in KINDS:
            frames = [13, 1, 2, 3, 4, 5, 8, 9, 12]
            x = make_video(len(frames), 13, P, D, dtype, kind, P)
            res = dycoke(x, k, frames=frames)
            for b, t in enumerate(frames):
                tokens, positions = orig.dycoke_ttm(packed(x, b, t), P, k)
                n = int(res.lengths[b])
                assert n == positions.numel() == dycoke_count(P, t, k), (t, k)
                assert res.indices[b, :n].tolist() == positions.tolist(), (t, k, kind)
                assert torch.equal(bits(res.tokens[b, :n]), bits(tokens))
                assert (res.indices[b, n:] == -1).all() and not res.tokens[b, n:].any()


def test_dycoke_keeps_what_the_loops_say():
    """At the original's shape (196 tokens, k = 0.7: 58 per compared frame).  8 frames: frames
    0, 4 and 6 whole (frame 6, the last group's frame 2, is left alone by the T - 4 loop bound),
    the others compared.  9 frames: frame 6 compared with frame 4 too, frame 8 (odd, unpaired)
    dropped."""
    x = make_video(2, 9, 196, 4, torch.float32, "randn", 0)
    res = dycoke(x, frames=[8, 9])
    n = int((1 - 0.7) * 196)
    for b, whole in ((0, [0, 4, 6]), (1, [0, 4])):
        frame = res.indices[b, :int(res.lengths[b])] // 196
        per_frame = torch.bincount(frame, minlength=9).tolist()
        assert per_frame == [196 if t in whole else (n if t < 8 else 0) for t in range(9)]
        assert frame.tolist() == sorted(frame.tolist())           # frame by frame


def test_evs_ties_go_to_the_lowest_position():
    """Every token the same vector: every later frame scores the same, so the stable sort keeps
    frame 0 and then the lowest positions."""
    x = torch.ones(1, 5, 6, 4, dtype=torch.bfloat16)
    for q in (0.5, 0.9):
        n = evs_count(6, 5, q)
        assert evs(x, q).indices[0].tolist() == list(range(n))


# --------------------------------------------------------------------------- counts, batches
def test_counts_are_vllms():
    for P in (1, 4, 196, 391):
        for T in (1, 2, 7, 32):
            for q in (0.0, 0.1, 0.3, 0.7, 0.75, 0.9, 0.999):
                assert evs_count(P, T, q) == orig.evs_retained_count(P, T, q)
                assert vidcom2_count(P, T, q) == orig.vidcom2_retained_count(P, T, q)


@pytest.mark.parametrize("method,arg", [(evs, 0.6), (vidcom2, 0.6), (dycoke, 0.7)],
                         ids=["evs", "vidcom2", "dycoke"])
def test_batch_rows_equal_videos_alone(method, arg):
    """Each row of a ragged batch is its video's result alone (its frames, no padding), and
    what the padding frames hold does not matter."""
    frames = [10, 3, 7, 10, 1]
    x = make_video(5, 10, 6, 12, torch.bfloat16, "offset", 3)
    res = method(x, arg, frames=frames)
    junk = x.clone()
    for b, t in enumerate(frames):
        junk[b, t:] = float("nan")
    assert torch.equal(method(junk, arg, frames=frames).indices, res.indices)
    for b, t in enumerate(frames):
        alone = method(x[b:b + 1, :t], arg)
        n = int(res.lengths[b])
        assert int(alone.lengths[0]) == n and alone.indices.shape[1] == n
        assert torch.equal(alone.indices[0], res.indices[b, :n])
        assert torch.equal(alone.tokens[0], res.tokens[b, :n])


@pytest.mark.parametrize("method,arg", [(evs, 0.5), (vidcom2, 0.5), (dycoke, 0.7)],
                         ids=["evs", "vidcom2", "dycoke"])
def test_layout_and_backend_do_not_matter(method, arg):
    """A D-major copy, a strided view and every backend keep the contiguous tokens' positions
    (the originals take packed tokens: visprune reduces over a contiguous D like them)."""
    x = make_video(2, 6, 10, 24, torch.float32, "offset", 5)
    want = method(x, arg, frames=[6, 4])
    big = torch.zeros(2, 6, 10, 2 * 24)
    big[..., ::2] = x
    for other in (x.transpose(2, 3).contiguous().transpose(2, 3), big[..., ::2]):
        assert torch.equal(method(other, arg, frames=[6, 4]).indices, want.indices)
    for be in BACKENDS:
        got = method(x, arg, frames=torch.tensor([6, 4]), backend=be)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.tokens, want.tokens)


# --------------------------------------------------------------------------- frame_cosine
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frame_cosine_is_cosine_similarity(dtype, steps):
    """Bitwise ``F.cosine_similarity``'s values (frame by frame or in steps), with and without
    ``F.normalize`` first, zero tokens included."""
    x = make_video(2, 7, 5, 67, dtype, "randn", 1) * 3
    x[1, 2, 3] = 0
    cos = video_helpers.frame_cosine
    assert torch.equal(bits(cos(x)), bits(F.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1)))
    a, b = x[:, 0::2][:, :3], x[:, 1::2]
    assert torch.equal(bits(cos(a, b)), bits(F.cosine_similarity(a, b, dim=-1)))
    assert torch.equal(bits(cos(a, b, prenormalize=True)),
                       bits(F.cosine_similarity(F.normalize(a, p=2, dim=-1),
                                                F.normalize(b, p=2, dim=-1), dim=-1)))


# --------------------------------------------------------------------------- errors
X = torch.randn(2, 4, 3, 5)
BAD = [
    (lambda: evs(X, 1.0), ValueError, r"\bq\b"),
    (lambda: evs(X, -0.1), ValueError, r"\bq\b"),
    (lambda: vidcom2(X, float("nan")), ValueError, r"\bq\b"),
    (lambda: evs(X, "0.5"), TypeError, r"\bq\b"),
    (lambda: vidcom2(X, True), TypeError, r"\bq\b"),
    (lambda: dycoke(X, 1.5), ValueError, r"\bk\b"),
    (lambda: dycoke(X, None), TypeError, r"\bk\b"),
    (lambda: evs(X[0], 0.5), ValueError, r"\bvideo\b"),
    (lambda: evs(X.long(), 0.5), TypeError, r"\bvideo\b"),
    (lambda: vidcom2(X[:, :, :0], 0.5), ValueError, r"\bvideo\b"),
    (lambda: dycoke(X[..., :0]), ValueError, r"\bvideo\b"),
    (lambda: evs(X, 0.5, frames=[4]), ValueError, r"\bframes\b"),
    (lambda: evs(X, 0.5, frames=[4, 5]), ValueError, r"\bframes\b"),
    (lambda: vidcom2(X, 0.5, frames=[0, 4]), ValueError, r"\bframes\b"),
    (lambda: dycoke(X, frames=torch.tensor([2.0, 3.0])), TypeError, r"\bframes\b"),
    (lambda: dycoke(X, frames=[2, "3"]), TypeError, r"\bframes\b"),
    (lambda: evs(X[:, :0], 0.5), ValueError, r"\bframes\b"),
    (lambda: evs(X, 0.5, backend="gpu"), ValueError, r"\bbackend\b"),
]


@pytest.mark.parametrize("call,error,match", BAD)
def test_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_benchmark_runs(tmp_path):
    """benchmarks/bench_video_methods.py on a tiny video: each method keeps its original's tokens (the
    script exits otherwise), and every row has times, a speed-up and peak memory."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / \
        "bench_video_methods.py"
    spec = importlib.util.spec_from_file_location("bench_video", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--reps", "2", "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert sorted(r["method"] for r in rows) == ["dycoke", "evs", "vidcom2"]
    for r in rows:
        assert r["visprune_ms"] > 0 and r["original_ms"] > 0
        assert r["speedup"] == r["original_ms"] / r["visprune_ms"]
        assert r["visprune_peak_MB"] >= 0 and r["original_peak_MB"] >= 0


def test_empty_batch():
    for method in (evs, vidcom2, dycoke):
        res = method(torch.randn(0, 3, 4, 5), 0.5)
        assert res.indices.shape == (0, 0) and res.tokens.shape == (0, 0, 5)
