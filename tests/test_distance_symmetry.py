"""The cosine distance is symmetric in every backend: ``d(i, j)`` and ``d(j, i)`` are the same
float.  It matters where two distances must tie exactly: when the most isolated token belongs to
a mutual-nearest pair, both tokens' start keys are that one distance, and the tie must go to the
lower index in every backend, dense and varlen, on every Triton path.

The pairs below are small integer vectors (exact in fp16 and fp32, so their dot product and
squared norms are exact) whose cosine rounds differently when the product is formed with one
inverse norm first, ``(x_i·x_j · n_i) · n_j``, than with the other: a one-sided product breaks
the tie toward the higher index.  The other tokens come in tight clusters of two or three around
random directions, so the pair is the most isolated by a wide margin and every later pick is far
from a near-tie (the backends round the cosine differently, but only exact ties decide here).
"""
import pytest
import torch

import visprune
from visprune import ops

from helpers import gen

CPU_BACKENDS = [name for name, why in visprune.available_backends(torch.device("cpu")).items()
                if why == "ok"]
TRITON = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton backend unavailable")

# (x_p, x_q) in the first two dimensions, p < q: cos ≈ 0.95, 0.95, 0.93, 0.90.
PAIRS = (((1, 1), (1, 2)), ((1, 1), (2, 1)), ((1, 1), (3, 7)), ((1, 1), (5, 14)))


def _one_sided_cosines(a, b):
    """``((a·b)·n_a)·n_b`` and ``((a·b)·n_b)·n_a`` rounded in fp32 as a kernel would."""
    a, b = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    dot = (a * b).sum()
    na, nb = 1.0 / (a * a).sum().sqrt(), 1.0 / (b * b).sum().sqrt()
    return float((dot * na) * nb), float((dot * nb) * na)


def row_with_pair(n, D, seed, pair, p, q):
    """``float32[n, D]``: tokens ``p < q`` are the pair, the others clusters of 2 or 3."""
    a, b = _one_sided_cosines(*pair)
    assert a > b, "the one-sided product must favour q (d(q, p) > d(p, q))"
    g = gen(seed)
    others = [i for i in torch.randperm(n, generator=g).tolist() if i not in (p, q)]
    assert len(others) >= 2
    sizes = [2] * (len(others) // 2)
    sizes[-1] += len(others) % 2             # no singleton: it would be the most isolated
    x = torch.zeros(n, D)
    start = 0
    for size in sizes:
        members = others[start:start + size]
        start += size
        x[members] = torch.randn(D, generator=g) + 0.03 * torch.randn(size, D, generator=g)
    x[p, :2] = torch.tensor(pair[0], dtype=torch.float32)
    x[q, :2] = torch.tensor(pair[1], dtype=torch.float32)
    return x


# rows of a dense batch: (p, q) per row; the pair spans two tiles of the distance pass in row 2
DENSE = ((0, 5), (3, 4), (9, 70), (12, 30))
# segments of a packed batch: (n, p, q)
SEGMENTS = ((9, 2, 7), (4, 0, 3), (23, 11, 12), (15, 1, 14))


def dense_batch(N=75, D=16, dtype=torch.float32):
    rows = [row_with_pair(N, D, 10 + r, PAIRS[r], p, q) for r, (p, q) in enumerate(DENSE)]
    return torch.stack(rows).to(dtype)


def packed_batch(D=16, dtype=torch.float32):
    segs = [row_with_pair(n, D, 20 + s, PAIRS[s], p, q) for s, (n, p, q) in enumerate(SEGMENTS)]
    lengths = [n for n, _, _ in SEGMENTS]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    return torch.cat(segs).to(dtype), cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_most_isolated_mutual_pair_starts_at_the_lower_index(backend, dtype):
    x = dense_batch(dtype=dtype)
    got = ops.greedy_select(x, 6, objective="maxmin", metric="cosine", backend=backend)
    assert got[:, 0].tolist() == [p for p, _ in DENSE]
    assert torch.equal(got, ops.greedy_select(x, 6, objective="maxmin", metric="cosine",
                                              backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_most_isolated_mutual_pair_starts_at_the_lower_index_varlen(backend, dtype):
    x, cu = packed_batch(dtype=dtype)
    k = [min(n, 5) for n, _, _ in SEGMENTS]
    got = ops.greedy_select_varlen(x, cu, k, objective="maxmin", metric="cosine", backend=backend)
    firsts = torch.tensor([0] + k[:-1]).cumsum(0)
    assert (got[firsts] - cu[:-1]).tolist() == [p for _, p, _ in SEGMENTS]
    assert torch.equal(got, ops.greedy_select_varlen(x, cu, k, objective="maxmin",
                                                     metric="cosine", backend="reference"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prune_with_maxmin_keeps_the_lower_index_of_the_pair(backend):
    """Stage 1 keeps every token, so stage 2 starts at the pair: its lower index is kept and the
    selection is the reference's, dense and varlen."""
    x = dense_batch()
    B, N, D = x.shape
    text = torch.randn(B, 3, D, generator=gen(5))
    kw = dict(stage1_keep=N, objective="maxmin", metric="cosine")
    got = ops.prune(x, text, 6, backend=backend, **kw).indices
    assert torch.equal(got, ops.prune(x, text, 6, backend="reference", **kw).indices)
    assert all(p in row and q not in row for row, (p, q) in zip(got.tolist(), DENSE))

    x, cu = packed_batch()
    lengths = [n for n, _, _ in SEGMENTS]
    k = [2] * len(lengths)
    text = torch.randn(len(lengths), 3, x.shape[1], generator=gen(6))
    kw = dict(stage1_keep=lengths, objective="maxmin", metric="cosine")
    got = ops.prune_varlen(x, cu, text, k, backend=backend, **kw).indices
    assert torch.equal(got, ops.prune_varlen(x, cu, text, k, backend="reference", **kw).indices)
    for (n, p, q), lo in zip(SEGMENTS, cu.tolist()):
        assert lo + p in got.tolist() and lo + q not in got.tolist()


@TRITON
@pytest.mark.parametrize("path", ["gram", "stream"])
def test_triton_paths_start_at_the_lower_index(path):
    """The stream path (no stored matrix: distances of the start pass and of every step formed
    on the fly) must break the tie as the gram path does."""
    from visprune.triton_kernels import greedy
    x = dense_batch()
    got = greedy.greedy_select(x, 6, "maxmin", "cosine", None, "auto", path=path)
    assert torch.equal(got, ops.greedy_select(x, 6, backend="reference"))
    x, cu = packed_batch()
    k = [min(n, 5) for n, _, _ in SEGMENTS]
    got = greedy.greedy_select_varlen(x, cu, k, "maxmin", "cosine", path=path)
    assert torch.equal(got, ops.greedy_select_varlen(x, cu, k, backend="reference"))


@TRITON
@pytest.mark.parametrize("N", [15, 37, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_cosine_matrices_are_exactly_symmetric(N, dtype):
    """Greedy selection's stored distances and CDPruner's stored cosines, on random tokens (one
    tile and several), are bitwise symmetric."""
    import triton

    from visprune.triton_kernels import dpp, greedy
    from visprune.triton_kernels.mi_scores import token_stats
    from visprune.triton_kernels.utils import interpreting
    x = torch.randn(2, N, 24, generator=gen(N)).to(dtype)
    _, inv = token_stats(x, norm="cosine")
    splits = triton.cdiv(N, greedy._tile(N))
    dist = torch.empty(2, N, N)
    greedy._start_pass(x, inv, None, torch.empty(2, splits, N), dist, "cosine", "maxmin", splits)
    assert torch.equal(dist, dist.transpose(1, 2))
    tile = greedy._tile(N)
    sim = torch.empty(2, N, N)
    dpp._cosine_gram_kernel[(2, triton.cdiv(N, tile), triton.cdiv(N, tile))](
        x, *x.stride(), inv, sim, N, 24, INTERPRETED=interpreting(), BLOCK=tile, BLOCK_D=32)
    assert torch.equal(sim, sim.transpose(1, 2))
