"""The C++ CPU backend's greedy strategies, each forced (VISPRUNE_CPU_GREEDY), against the
reference: all pairs through BLAS panels kept as a triangle ("gram"), the hand-written register
tiles ("tiles"), rows streamed per step ("stream"), and the automatic choice."""
import pytest
import torch

from visprune import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason=f"visprune._C not built: {_ext.IMPORT_ERROR}")

STRATEGIES = ("gram", "tiles", "stream", "auto")
SHAPES = [(1, 1, 8), (2, 7, 5), (3, 33, 17), (1, 130, 64), (2, 257, 40)]


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    if request.param == "auto":
        monkeypatch.delenv("VISPRUNE_CPU_GREEDY", raising=False)
    else:
        monkeypatch.setenv("VISPRUNE_CPU_GREEDY", request.param)
    return request.param


def _tokens(B, N, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g) + 0.5 * torch.randn(B, 1, D, generator=g)
    if N >= 7:   # exact duplicates in different BLAS tiles, and a zero token
        x[:, N - 1] = x[:, 1]
        x[:, N // 2] = x[:, 1]
        x[:, 3] = x[:, N - 2]
        x[:, 4] = 0
    return x.to(dtype)


def _both(x, k, **kw):
    got = ops.greedy_select(x, k, backend="cpu", **kw)
    want = ops.greedy_select(x, k, backend="reference", **kw)
    return got, want


@pytest.mark.parametrize("B,N,D", SHAPES)
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_strategy_matches_reference(strategy, B, N, D, objective, metric):
    x = _tokens(B, N, D, seed=N + D)
    # k up to N // 2: once only copies of picked tokens are left their order is rounding noise
    for k in {1, min(N, 5), max(1, N // 2)}:
        got, want = _both(x, k, objective=objective, metric=metric)
        assert torch.equal(got, want), (strategy, k)


@pytest.mark.parametrize("B,N,D", SHAPES[2:])
@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
def test_strategy_masks_starts_fp16(strategy, B, N, D, objective):
    x = _tokens(B, N, D, seed=3, dtype=torch.float16)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(B, N, generator=g) > 0.4
    mask[:, :6] = True
    k = 5
    got, want = _both(x, k, objective=objective, mask=mask)
    assert torch.equal(got, want)
    got, want = _both(x, k, objective=objective, start=2)
    assert torch.equal(got, want)
    # candidates that are not rows 0..c-1 (a gathered copy) and a start among them
    got, want = _both(x, k, objective=objective, mask=mask, start=5)
    assert torch.equal(got, want)


def test_strategy_duplicates_go_to_lower_index(strategy):
    """Every token has an exact copy further on, at positions that fall in different panels:
    after the first picks, every tie must go to the lower index of a pair."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 150, 96, generator=g)
    x = torch.cat([base, base.flip(1)], 1)          # token i == token 299 - i
    for objective in ("maxmin", "maxsum"):
        got, want = _both(x, 40, objective=objective, start=0)
        assert torch.equal(got, want)
    # farthest-point: each pick's twin is at distance ~0 from then on, so the 150 picks are one
    # per pair, and every tie between twins went to the lower index
    got = ops.greedy_select(x, 150, objective="maxmin", backend="cpu")
    assert torch.equal(got.sort(-1).values, torch.arange(150)[None])


def test_prune_under_each_strategy(strategy):
    g = torch.Generator().manual_seed(11)
    v, t = torch.randn(3, 200, 48, generator=g), torch.randn(3, 9, 48, generator=g)
    v[:, 150] = v[:, 20]
    for objective in ("maxsum", "maxmin"):
        got = ops.prune(v, t, 17, objective=objective, backend="cpu")
        want = ops.prune(v, t, 17, objective=objective, backend="reference")
        assert torch.equal(got.indices, want.indices)


def test_lowered_matmul_precision_keeps_indices(monkeypatch):
    """A caller that lowered torch's fp32 matmul precision: the BLAS path is not used (it could
    round through bf16 / TF32), the indices stay the reference's."""
    monkeypatch.setenv("VISPRUNE_CPU_GREEDY", "gram")
    x = _tokens(2, 257, 40, seed=5)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = ops.greedy_select(x, 30, backend="cpu")
    finally:
        torch.set_float32_matmul_precision(old)
    assert torch.equal(got, ops.greedy_select(x, 30, backend="reference"))
