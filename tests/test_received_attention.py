"""``received_attention`` on every available backend against an independent float64 formula.

The formula (:func:`received_literal`) follows the contract literally: for each selected query row
the explicit softmax of its masked, scaled scores over the keys it may see, per head, the max or
mean over heads, the span's columns summed over the rows.  It shares no code with
:mod:`visprune.reference` (which forms the full ``[B, H, L, Lk]`` map).  The Triton kernels run
in the interpreter on CPU, so the shapes are small; odd ones on purpose (L = 1, 7, 37, 255;
dh = 8, 24, 40; GQA; a cache offset Lk > L; padding).
"""
import math

import pytest
import torch

import visprune
from visprune import backends, checks, ops

from helpers import gen, randn

BACKENDS = ["reference"] + [name for name, why in
                            visprune.available_backends(torch.device("cpu")).items()
                            if why == "ok" and name != "reference"]
# Outputs are float32 sums of probabilities accumulated in fp32; atol is relative to the largest
# |output| (at least 1).  fp16 inputs are the same numbers in every backend (the formula reads the
# rounded values), but the Triton interpreter multiplies fp16 tiles in lower precision.
TOL = {torch.float32: dict(rtol=2e-5, atol_rel=2e-5),
       torch.float16: dict(rtol=1e-3, atol_rel=1e-3)}


# =========================================================================== the formula
def _rows(b, queries, valid, pos, s0, length):
    L = len(valid)
    if isinstance(queries, torch.Tensor):
        return [i for i in range(L) if bool(queries[b, i])]
    if queries == "after":
        return [i for i in range(L) if valid[i] and pos[i] >= s0 + length]
    if queries == "span":
        return [i for i in range(L) if valid[i] and s0 <= pos[i] < s0 + length]
    last = [i for i in range(L) if valid[i]]
    return last[-1:]


def received_literal(q, k, start, length, queries="after", heads="max", key_mask=None,
                     scale=None):
    """float64 ``[B, length]``, one query row at a time."""
    B, H, L, dh = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, off = H // Hkv, Lk - L
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    starts = start.tolist() if isinstance(start, torch.Tensor) else [start] * B
    qd, kd = q.double(), k.double()
    out = torch.zeros(B, length, dtype=torch.float64)
    for b in range(B):
        s0 = starts[b]
        pos = [i + off for i in range(L)]
        valid = [key_mask is None or bool(key_mask[b, p]) for p in pos]
        for i in _rows(b, queries, valid, pos, s0, length):
            keys = [j for j in range(pos[i] + 1) if key_mask is None or bool(key_mask[b, j])]
            if not keys:
                continue                          # a row with no key to attend to adds 0
            received = torch.zeros(H, length, dtype=torch.float64)
            for h in range(H):
                logits = scale * (kd[b, h // G, keys] @ qd[b, h, i])
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                row = torch.zeros(Lk, dtype=torch.float64)
                row[keys] = weights
                received[h] = row[s0:s0 + length]
            out[b] += received.max(0).values if heads == "max" else received.mean(0)
    return out


# =========================================================================== data
def make_qk(B, H, Hkv, L, Lk, dh, seed, dtype=torch.float32, layout="contiguous"):
    """Seeded ``q[B, H, L, dh]``, ``k[B, Hkv, Lk, dh]``; ``layout="transposed"`` gives views of
    ``[B, L, H, dh]`` storage (how a model's projections come out before ``transpose(1, 2)``)."""
    if layout == "transposed":
        q = randn((B, L, H, dh), seed, dtype).transpose(1, 2)
        k = randn((B, Lk, Hkv, dh), seed + 1, dtype).transpose(1, 2)
        assert not q.is_contiguous() or L == 1
    else:
        q, k = randn((B, H, L, dh), seed, dtype), randn((B, Hkv, Lk, dh), seed + 1, dtype)
    return q, k


def left_padding(B, Lk, pads):
    """``bool[B, Lk]``: row ``b`` starts with ``pads[b]`` padding positions."""
    return torch.arange(Lk)[None, :] >= torch.tensor(pads)[:, None]


def assert_close(got, want, dtype):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    tol = TOL[dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol["rtol"], atol=tol["atol_rel"] * scale)


# =========================================================================== cases
# id, (B, H, Hkv, L, Lk, dh), start, length, queries, heads, padding (per row, or None), dtype,
# layout.  A start list is a per-row start tensor; a queries "rows" is a random bool mask.
CASES = [
    ("L1-decode", (2, 2, 1, 1, 9, 8), 2, 5, "last", "max", None, torch.float32, "contiguous"),
    ("L1-after", (2, 4, 2, 1, 12, 24), [1, 4], 6, "after", "mean", [0, 3], torch.float32,
     "contiguous"),
    ("L7", (2, 4, 2, 7, 7, 24), 1, 3, "after", "max", None, torch.float32, "contiguous"),
    ("L7-mean-offset", (1, 2, 2, 7, 11, 8), 3, 4, "span", "mean", None, torch.float32,
     "contiguous"),
    ("L37-gqa4-pad", (2, 4, 1, 37, 45, 40), [3, 10], 20, "span", "max", [0, 6], torch.float32,
     "contiguous"),
    ("L37-last-pad", (2, 4, 2, 37, 37, 24), [2, 5], 20, "last", "mean", [4, 0], torch.float32,
     "contiguous"),
    ("L37-rows", (2, 2, 1, 37, 40, 8), [0, 9], 25, "rows", "max", [0, 12], torch.float32,
     "contiguous"),
    ("L37-transposed", (2, 4, 4, 37, 37, 40), 5, 24, "after", "max", [3, 0], torch.float32,
     "transposed"),
    ("L37-fp16", (2, 4, 2, 37, 41, 24), [4, 1], 17, "after", "mean", [0, 2], torch.float16,
     "transposed"),
    ("L255", (1, 2, 2, 255, 255, 40), 35, 150, "after", "max", None, torch.float32,
     "contiguous"),
    ("L255-gqa-span-pad", (2, 4, 2, 255, 260, 8), [20, 40], 100, "span", "mean", [0, 17],
     torch.float32, "contiguous"),
    ("whole-sequence", (2, 2, 1, 37, 37, 24), 0, 37, "span", "max", [0, 5], torch.float32,
     "contiguous"),
    ("length0", (2, 2, 2, 7, 7, 8), 3, 0, "after", "max", None, torch.float32, "contiguous"),
]


def _case_inputs(shape, start, queries, padding, dtype, layout, seed=0):
    B, H, Hkv, L, Lk, dh = shape
    q, k = make_qk(B, H, Hkv, L, Lk, dh, seed, dtype, layout)
    key_mask = left_padding(B, Lk, padding) if padding is not None else None
    if isinstance(start, list):
        start = torch.tensor(start)
    if queries == "rows":
        # Random rows, including padded ones whose keys are all masked (they add 0).
        queries = torch.rand(B, L, generator=gen(seed + 7)) < 0.5
    return q, k, start, key_mask, queries


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cid, shape, start, length, queries, heads, padding, dtype, layout",
                         CASES, ids=[c[0] for c in CASES])
def test_matches_literal(backend, cid, shape, start, length, queries, heads, padding, dtype,
                         layout):
    q, k, start, key_mask, queries = _case_inputs(shape, start, queries, padding, dtype, layout)
    before = [t.clone() for t in (q, k)]
    want = received_literal(q, k, start, length, queries, heads, key_mask)
    got = ops.received_attention(q, k, start, length, queries=queries, heads=heads,
                                 key_mask=key_mask, backend=backend)
    assert_close(got, want, dtype)
    for t, b in zip((q, k), before):
        assert torch.equal(t, b), "received_attention modified an input"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("queries", ["after", "span", "last", "rows"])
@pytest.mark.parametrize("heads", ["max", "mean"])
def test_every_query_mode_and_head_reduction(backend, queries, heads):
    """Every mode × reduction on one padded GQA shape with a per-row start and a custom scale."""
    q, k, start, key_mask, queries = _case_inputs((2, 4, 2, 21, 26, 24), [2, 7], queries,
                                                  [0, 4], torch.float32, "contiguous", seed=3)
    want = received_literal(q, k, start, 9, queries, heads, key_mask, scale=0.3)
    got = ops.received_attention(q, k, start, 9, queries=queries, heads=heads,
                                 key_mask=key_mask, scale=0.3, backend=backend)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_add_zero_never_nan(backend):
    """Row 1 has every key masked: no valid query row ("after" gives 0); rows selected explicitly
    in it, and in row 0's padded prefix, have no key to attend to and add 0, not NaN."""
    B, H, L, dh = 2, 2, 9, 8
    q, k = make_qk(B, H, H, L, L, dh, 5)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[0, :3] = False
    key_mask[1] = False
    for queries in ("after", "span", "last", torch.ones(B, L, dtype=torch.bool)):
        got = ops.received_attention(q, k, 0, 4, queries=queries, key_mask=key_mask,
                                     backend=backend)
        want = received_literal(q, k, 0, 4, queries, "max", key_mask)
        assert_close(got, want, torch.float32)
        assert torch.equal(got[1], torch.zeros(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend):
    q, k = make_qk(2, 2, 1, 5, 8, 8, 1)
    assert ops.received_attention(q, k, 8, 0, backend=backend).shape == (2, 0)
    q0, k0 = make_qk(0, 2, 1, 5, 8, 8, 1)
    assert ops.received_attention(q0, k0, 1, 3, backend=backend).shape == (0, 3)
    got = ops.received_attention(q[:, :, :0], k, 1, 3, backend=backend)        # L = 0
    assert torch.equal(got, torch.zeros(2, 3))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_deterministic(backend):
    q, k, start, key_mask, _ = _case_inputs((2, 4, 2, 37, 40, 24), [1, 6], "after", [0, 3],
                                            torch.float32, "contiguous", seed=9)
    runs = [ops.received_attention(q, k, start, 20, key_mask=key_mask, backend=backend)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_default_backend_is_the_cpu_default():
    q, k = make_qk(1, 2, 2, 7, 7, 8, 2)
    name = backends.default_backend(torch.device("cpu"))
    assert torch.equal(ops.received_attention(q, k, 1, 3),
                       ops.received_attention(q, k, 1, 3, backend=name))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_opaque_to_torch_compile(backend):
    torch._dynamo.reset()
    q, k = make_qk(2, 2, 1, 9, 11, 8, 4)
    key_mask = left_padding(2, 11, [0, 2])

    def f(q, k, key_mask):
        return ops.received_attention(q, k, 2, 5, key_mask=key_mask, heads="mean",
                                      backend=backend)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, key_mask)
    assert torch.equal(got, f(q, k, key_mask))


# =========================================================================== validate=False
def _count_reads(monkeypatch):
    calls = []
    real = checks.read

    def read(*values):
        calls.append(len(values))
        return real(*values)

    monkeypatch.setattr(checks, "read", read)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_skips_the_start_range_read(backend, monkeypatch):
    q, k = make_qk(2, 2, 2, 7, 10, 8, 6)
    start = torch.tensor([1, 4])
    calls = _count_reads(monkeypatch)
    checked = ops.received_attention(q, k, start, 5, backend=backend)
    assert calls == [2]
    unchecked = ops.received_attention(q, k, start, 5, backend=backend, validate=False)
    assert calls == [2] and torch.equal(checked, unchecked)
    with pytest.raises(ValueError, match=r"start has values in \[1, 6\].*Lk=10"):
        ops.received_attention(q, k, torch.tensor([1, 6]), 5, backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_unvalidated_bad_start_stays_in_bounds(backend):
    """Without the check, a span past Lk is memory-safe: the CPU kernel raises naming start;
    Triton gives the columns outside [0, Lk) nothing."""
    q, k = make_qk(2, 2, 2, 7, 10, 8, 6)
    bad = torch.tensor([1, 8])
    if backend == "cpu":
        with pytest.raises(ValueError, match="start has value 8 in row 1"):
            ops.received_attention(q, k, bad, 5, validate=False, backend=backend)
        return
    got = ops.received_attention(q, k, bad, 5, queries="span", validate=False, backend=backend)
    assert torch.isfinite(got).all() and torch.equal(got[1, 2:], torch.zeros(3))
    want = received_literal(q, k, torch.tensor([1, 0]), 5, "span")
    assert_close(got[0], want[0], torch.float32)


# =========================================================================== the CUDA extension
def test_cuda_backend_is_refused():
    q, k = make_qk(1, 2, 2, 7, 7, 8, 2)
    with pytest.raises(RuntimeError, match="cuda"):
        ops.received_attention(q, k, 1, 3, backend="cuda")


def test_cuda_extension_has_no_kernel(monkeypatch):
    """Where the CUDA extension is available it has no kernel for this op: refused before any
    work, naming the op and the backend to use."""
    monkeypatch.setattr(backends, "_extension_status", lambda name, device: (True, "ok"))
    q, k = make_qk(1, 2, 2, 7, 7, 8, 2)
    with pytest.raises(NotImplementedError, match="received_attention.*CUDA.*triton"):
        ops.received_attention(q, k, 1, 3, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(visprune.available_backends(torch.device("cuda"))["cuda"] != "ok",
                    reason="needs the CUDA kernels of visprune._C")
def test_cuda_extension_op_raises_for_cuda_tensors():
    q, k = make_qk(1, 2, 2, 7, 7, 8, 2)
    q, k = q.cuda(), k.cuda()
    with pytest.raises(NotImplementedError, match="received_attention has no kernel"):
        torch.ops.visprune.received_attention(q, k, torch.ones(1, dtype=torch.long, device="cuda"),
                                              3, "after", None, "max", None, 0.3)


# =========================================================================== argument errors
@pytest.fixture
def qk():
    return make_qk(2, 4, 2, 5, 8, 8, 0)


def _call(q, k, start=1, length=3, **kw):
    return ops.received_attention(q, k, start, length, backend="reference", **kw)


def test_bad_q(qk):
    q, k = qk
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        _call(q.tolist(), k)
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, L, dh\], got shape \(4, 5, 8\)"):
        _call(q[0], k)
    with pytest.raises(TypeError, match="q must have dtype .*got torch.int64"):
        _call(q.long(), k.long())
    with pytest.raises(ValueError, match="q must have dh >= 1"):
        _call(q[..., :0], k[..., :0])


def test_bad_k(qk):
    q, k = qk
    with pytest.raises(ValueError, match=r"k must have shape \[B, Hkv, Lk, dh\], got shape"):
        _call(q, k[0])
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        _call(q, k.half())
    with pytest.raises(ValueError, match=r"k must have shape .*dh=8.*\(2, 2, 8, 4\)"):
        _call(q, k[..., :4])
    with pytest.raises(ValueError, match=r"k must have shape .*B=2.*\(1, 2, 8, 8\)"):
        _call(q, k[:1])
    with pytest.raises(ValueError, match="Hkv=3 must divide q's H=4"):
        _call(q, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="Lk >= L.*Lk=4, L=5"):
        _call(q, k[:, :, :4], start=0)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        _call(q, k.to("meta"))


def test_bad_start(qk):
    q, k = qk
    with pytest.raises(TypeError, match="start must be an int"):
        _call(q, k, start=1.0)
    with pytest.raises(TypeError, match="start must be an int or an integer tensor.*float32"):
        _call(q, k, start=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"start must be .*shape \[B\] = \(2,\), got shape \(3,\)"):
        _call(q, k, start=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="start=6 with length=3 is out of range.*Lk=8"):
        _call(q, k, start=6)
    with pytest.raises(ValueError, match="start=-1"):
        _call(q, k, start=-1)
    with pytest.raises(ValueError, match=r"start has values in \[-2, 1\]"):
        _call(q, k, start=torch.tensor([-2, 1]))


def test_bad_length(qk):
    q, k = qk
    with pytest.raises(ValueError, match="length must be >= 0, got -1"):
        _call(q, k, length=-1)
    with pytest.raises(TypeError, match="length must be an int, got float"):
        _call(q, k, length=2.0)
    with pytest.raises(ValueError, match="length=9 is larger than the key positions"):
        _call(q, k, start=0, length=9)


def test_bad_queries(qk):
    q, k = qk
    with pytest.raises(ValueError, match=r"queries must be one of \('after', 'span', 'last'\).*"
                                         r"got 'before'"):
        _call(q, k, queries="before")
    with pytest.raises(ValueError, match=r"queries must have shape \[B, L\] = \(2, 5\), got \(2, 8\)"):
        _call(q, k, queries=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="queries must have dtype bool"):
        _call(q, k, queries=torch.ones(2, 5))


def test_bad_heads(qk):
    with pytest.raises(ValueError, match=r"heads must be one of \('max', 'mean'\), got 'sum'"):
        _call(*qk, heads="sum")


def test_bad_key_mask(qk):
    q, k = qk
    with pytest.raises(ValueError, match=r"key_mask must have shape \[B, Lk\] = \(2, 8\), got \(2, 5\)"):
        _call(q, k, key_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask must have dtype bool"):
        _call(q, k, key_mask=torch.ones(2, 8, dtype=torch.int64))


@pytest.mark.parametrize("scale, exc", [(0.0, ValueError), (-1.0, ValueError),
                                        (float("inf"), ValueError), (float("nan"), ValueError),
                                        ("0.5", TypeError), (True, TypeError)])
def test_bad_scale(scale, exc, qk):
    with pytest.raises(exc, match="scale must be a positive"):
        _call(*qk, scale=scale)


def test_bad_validate(qk):
    with pytest.raises(TypeError, match="validate must be a bool"):
        _call(*qk, validate="no")
