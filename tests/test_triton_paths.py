"""Both paths of the Triton greedy selection (and the batch chunking of the gram path) against
the reference, whichever one ``path="auto"`` would pick for the shape."""
import pytest
import torch

from visprune import reference
from visprune.backends import backend_status

if not backend_status("triton", torch.device("cpu"))[0] and not torch.cuda.is_available():
    pytest.skip("triton backend unavailable", allow_module_level=True)

from visprune.triton_kernels import greedy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tokens(B, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g).to(DEVICE)


@pytest.mark.parametrize("path", ["gram", "stream"])
@pytest.mark.parametrize("objective,metric", [("maxmin", "cosine"), ("maxsum", "l2"),
                                              ("maxmin", "l2"), ("maxsum", "cosine")])
def test_paths_match_reference(path, objective, metric):
    x = _tokens(2, 90, 20, seed=3)
    mask = torch.rand(2, 90, generator=torch.Generator().manual_seed(4)).to(DEVICE) > 0.25
    for m, start in ((None, "auto"), (mask, "auto"), (None, 5)):
        got = greedy.greedy_select(x, 9, objective, metric, m, start, path=path)
        want = reference.greedy_select(x, 9, objective, metric, m, start)
        assert torch.equal(got.cpu(), want.cpu()), (path, objective, metric, start)


def test_stream_path_spans_several_blocks():
    # Blocks of 128 tokens: N = 300 makes the cross-block argmax reduction matter, and the
    # duplicate placed in the third block must lose its tie to the first.
    x = _tokens(1, 300, 4, seed=5)
    x[0, 290] = x[0, 17]
    got = greedy.greedy_select(x, 6, "maxsum", "l2", None, "auto", path="stream")
    want = reference.greedy_select(x, 6, "maxsum", "l2", None, "auto")
    assert torch.equal(got.cpu(), want.cpu())


def test_gram_path_chunks_the_batch(monkeypatch):
    x = _tokens(5, 40, 12, seed=6)
    # A budget of two distance matrices forces three chunks (2 + 2 + 1 rows).
    monkeypatch.setattr(greedy, "GRAM_BUDGET_BYTES", 2 * 40 * 40 * 4)
    got = greedy.greedy_select(x, 7, "maxmin", "cosine", None, "auto", path="gram")
    assert torch.equal(got.cpu(), reference.greedy_select(x, 7, "maxmin", "cosine").cpu())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_l2_mi_scores_survive_a_large_common_offset(backend):
    """Tokens 1000 ± 0.01: the expanded square would cancel to noise; centring keeps the scores
    at fp32 accuracy relative to their own (small) size, so the ranking is exact."""
    from visprune import ops
    g = torch.Generator().manual_seed(8)
    v = 1000 + 0.01 * torch.randn(2, 50, 64, generator=g)
    t = 1000 + 0.01 * torch.randn(2, 5, 64, generator=g)
    exact = -((v.double()[:, :, None] - t.double()[:, None]) ** 2).sum(-1).mean(-1)
    got = ops.mi_scores(v.to(DEVICE), t.to(DEVICE), backend=backend).cpu().double()
    assert ((got - exact).abs().max() / exact.abs().max()) < 1e-5
    assert torch.equal(got.argsort(dim=-1), exact.argsort(dim=-1))
