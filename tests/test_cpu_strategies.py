"""The C++ CPU backend's greedy strategies, each forced (VISPRUNE_CPU_GREEDY), against the
reference: all pairs through BLAS panels kept as a triangle ("gram"), the hand-written register
tiles ("tiles"), rows streamed per step ("stream"), and the automatic choice; the instruction-set
levels (VISPRUNE_CPU_ISA, in subprocesses: it is read once per process); batches that the CPU ops
run in row chunks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from visprune import _ext, ops
from visprune.bench.report import cpu_flags

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason=f"visprune._C not built: {_ext.IMPORT_ERROR}")

STRATEGIES = ("gram", "tiles", "stream", "auto")
# D = 300: the tiles' k range runs in several panel slices (128 or 256 dims each)
SHAPES = [(1, 1, 8), (2, 7, 5), (3, 33, 17), (1, 130, 64), (2, 257, 40), (2, 130, 300)]


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


@pytest.mark.parametrize("forced", ["gram", "stream"])
def test_lowered_matmul_precision_keeps_indices(monkeypatch, forced):
    """A caller that lowered torch's fp32 matmul precision: the BLAS path is not used (it could
    round through bf16 / TF32), the indices stay the reference's."""
    monkeypatch.setenv("VISPRUNE_CPU_GREEDY", forced)
    x = _tokens(2, 257, 40, seed=5)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = ops.greedy_select(x, 30, backend="cpu")
    finally:
        torch.set_float32_matmul_precision(old)
    assert torch.equal(got, ops.greedy_select(x, 30, backend="reference"))


# --------------------------------------------------------------------------- instruction sets
def _run(code, **env):
    full = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


_ORDERS = """
import json, torch
from visprune import ops
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 150, 300, generator=g) + 0.5 * torch.randn(2, 1, 300, generator=g)
x[:, 140] = x[:, 3]
out = {}
for objective in ("maxmin", "maxsum"):
    for metric in ("cosine", "l2"):
        out[objective + metric] = ops.greedy_select(x, 150, objective=objective, metric=metric,
                                                    backend="cpu").tolist()
print(json.dumps(out))
"""


@pytest.mark.skipif("avx512f" not in cpu_flags() or "avx2" not in cpu_flags(),
                    reason="needs a CPU with AVX-512 (to compare its tiles with the AVX2 ones)")
def test_avx512_tiles_equal_avx2_tiles_bitwise():
    """The AVX-512 (8×32) and AVX2 (6×16) Gram tiles run the same multiply-add chain per pair,
    k sliced differently: whole selection orders (k = N, every near-tie decided by the last
    bit) agree between the two processes."""
    native = json.loads(_run(_ORDERS, VISPRUNE_CPU_GREEDY="tiles"))
    avx2 = json.loads(_run(_ORDERS, VISPRUNE_CPU_GREEDY="tiles", VISPRUNE_CPU_ISA="avx2"))
    assert native == avx2


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_capped_isa(isa):
    """The slower kernels that VISPRUNE_CPU_ISA selects (what an AVX2-only or non-x86 CPU runs)
    against the reference, through this file's strategy tests in a subprocess."""
    if isa == "avx2" and "avx2" not in cpu_flags():
        pytest.skip("the CPU has no AVX2")
    env = dict(os.environ, VISPRUNE_CPU_ISA=isa)
    env.pop("VISPRUNE_CPU_GREEDY", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "test_strategy_ or test_prune_under"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


# --------------------------------------------------------------------------- row chunks
def test_row_chunks_match_reference():
    """B = 4, N = 600, D = 4096 fp32 is 39 MB: the CPU ops run it in two chunks of two rows
    (24 MiB cap).  Every row's result is the reference's, and a kernel error names the batch
    row, not the row within its chunk."""
    B, N, D = 4, 600, 4096
    assert B * N * D * 4 > 24 << 20 >= 2 * N * D * 4   # more than one chunk, two rows each
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                            # chunks hold >= one row per thread
    try:
        _check_row_chunks(B, N, D)
    finally:
        torch.set_num_threads(threads)


def _check_row_chunks(B, N, D):
    from visprune.methods.cdpruner import dpp_map, dpp_map_torch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, D, generator=g) + 0.5 * torch.randn(B, 1, D, generator=g)
    x[:, 500] = x[:, 7]
    t = torch.randn(B, 5, D, generator=g)
    for objective in ("maxmin", "maxsum"):
        got, want = _both(x, 20, objective=objective)
        assert torch.equal(got, want), objective
    got = ops.prune(x, t, 16, backend="cpu")
    want = ops.prune(x, t, 16, backend="reference")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(ops.mi_scores(x, t, backend="cpu"),
                               ops.mi_scores(x, t, backend="reference"), rtol=1e-5, atol=1e-6)
    r = torch.rand(B, N, generator=g)
    assert torch.equal(dpp_map(x, r, 12, backend="cpu"), dpp_map_torch(x, r, 12))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[3, 2:] = False                                 # row 3 (chunk 2, its second row)
    with pytest.raises(ValueError, match=r"k=5 is larger than the number of candidate tokens "
                                         r"\(2 in row 3\)"):
        ops.greedy_select(x, 5, mask=mask, backend="cpu", validate=False)
