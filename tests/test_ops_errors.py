"""Every argument error of the op contract: exception type and a message that names the argument
(and, for shape errors, the shape received and the one expected); backend selection errors."""
import math
import re

import numpy as np
import pytest
import torch

import visprune
from visprune import backends, ops

from helpers import randn

B, N, M, D = 2, 6, 3, 4


@pytest.fixture
def visual():
    return randn((B, N, D), 1)


@pytest.fixture
def text():
    return randn((B, M, D), 2)


def meta_like(t):
    """The same tensor on another device type (``meta``), to trigger device mismatches."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def esc(s):
    return re.escape(s)


# =========================================================================== mi_scores
@pytest.mark.parametrize("bad", [[[[0.0]]], 3.0, None], ids=["list", "float", "none"])
def test_mi_scores_non_tensor_visual_or_text(bad, visual, text):
    with pytest.raises(TypeError, match="visual"):
        ops.mi_scores(bad, text)
    with pytest.raises(TypeError, match="text"):
        ops.mi_scores(visual, bad)


def test_mi_scores_wrong_ndim_names_argument_and_shapes(visual, text):
    with pytest.raises(ValueError, match=r"visual.*\[B, N, D\].*\(6, 4\)"):
        ops.mi_scores(visual[0], text)
    with pytest.raises(ValueError, match=r"text.*\[B, M, D\].*\(1, 2, 3, 4\)"):
        ops.mi_scores(visual, text.reshape(1, 2, 3, 4))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.bool, torch.complex64])
def test_mi_scores_wrong_dtype(dtype, visual, text):
    with pytest.raises(TypeError, match=f"visual.*{esc(str(dtype))}"):
        ops.mi_scores(visual.to(dtype), text)
    with pytest.raises(TypeError, match=f"text.*{esc(str(dtype))}"):
        ops.mi_scores(visual, text.to(dtype))


def test_mi_scores_text_batch_or_hidden_mismatch(visual):
    with pytest.raises(ValueError, match=r"text.*\[2, M, 4\].*\(3, 3, 4\)"):
        ops.mi_scores(visual, randn((3, M, D), 3))
    with pytest.raises(ValueError, match=r"text.*\[2, M, 4\].*\(2, 3, 5\)"):
        ops.mi_scores(visual, randn((B, M, 5), 3))


def test_mi_scores_no_text_tokens(visual):
    with pytest.raises(ValueError, match=r"text.*M=0"):
        ops.mi_scores(visual, torch.empty(B, 0, D))


def test_mi_scores_device_mismatch(visual, text):
    with pytest.raises(ValueError, match="text.*meta.*visual.*cpu"):
        ops.mi_scores(visual, meta_like(text))
    with pytest.raises(ValueError, match="text_mask.*meta"):
        ops.mi_scores(visual, text, text_mask=torch.ones(B, M, dtype=torch.bool, device="meta"))


def test_mi_scores_text_mask_wrong_dtype_or_shape(visual, text):
    with pytest.raises(TypeError, match="text_mask.*bool"):
        ops.mi_scores(visual, text, text_mask=torch.ones(B, M))
    with pytest.raises(ValueError, match=r"text_mask.*\[B, M\].*\(2, 4\)"):
        ops.mi_scores(visual, text, text_mask=torch.ones(B, M + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"text_mask.*\(2, 3, 1\)"):
        ops.mi_scores(visual, text, text_mask=torch.ones(B, M, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="text_mask"):
        ops.mi_scores(visual, text, text_mask=[[True] * M] * B)


def test_mi_scores_empty_text_mask_row(visual, text):
    text_mask = torch.ones(B, M, dtype=torch.bool)
    text_mask[1] = False
    with pytest.raises(ValueError, match=r"text_mask.*row.*\[1\]"):
        ops.mi_scores(visual, text, text_mask=text_mask)


@pytest.mark.parametrize("metric", ["L2", "euclidean", "dot", None, ""])
def test_mi_scores_bad_metric(metric, visual, text):
    with pytest.raises(ValueError, match="metric"):
        ops.mi_scores(visual, text, metric=metric)


# =========================================================================== greedy_select
def test_greedy_non_tensor_wrong_ndim_wrong_dtype(visual):
    with pytest.raises(TypeError, match="x"):
        ops.greedy_select(visual.tolist(), 2)
    with pytest.raises(ValueError, match=r"x.*\[B, N, D\].*\(6, 4\)"):
        ops.greedy_select(visual[0], 2)
    with pytest.raises(TypeError, match="x.*int32"):
        ops.greedy_select(visual.int(), 2)
    with pytest.raises(TypeError, match="x.*float64"):
        ops.greedy_select(visual.double(), 2)


@pytest.mark.parametrize("arg, value", [("objective", "minmax"), ("objective", "MaxMin"),
                                        ("objective", None), ("metric", "dot"),
                                        ("metric", "euclidean"), ("metric", None)])
def test_greedy_bad_objective_or_metric(arg, value, visual):
    with pytest.raises(ValueError, match=arg):
        ops.greedy_select(visual, 2, **{arg: value})


@pytest.mark.parametrize("start", ["first", "AUTO", "", 1.0, None, [0], True, False])
def test_greedy_bad_start(start, visual):
    with pytest.raises(ValueError, match="start"):
        ops.greedy_select(visual, 2, start=start)


@pytest.mark.parametrize("start", [-1, N, N + 10])
def test_greedy_start_out_of_range(start, visual):
    with pytest.raises(ValueError, match=f"start.*{start}"):
        ops.greedy_select(visual, 2, start=start)


def test_greedy_start_masked_out_in_some_row(visual):
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 3] = False
    with pytest.raises(ValueError, match="start=3"):
        ops.greedy_select(visual, 2, start=3, mask=mask)
    ops.greedy_select(visual, 2, start=2, mask=mask)  # a candidate everywhere: accepted


def test_greedy_k_larger_than_candidates(visual):
    with pytest.raises(ValueError, match=f"k={N + 1}.*{N}"):
        ops.greedy_select(visual, N + 1)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :4] = False                      # row 0 keeps 2 candidates
    with pytest.raises(ValueError, match="k=3.*2.*mask"):
        ops.greedy_select(visual, 3, mask=mask)
    assert ops.greedy_select(visual, 2, mask=mask).shape == (B, 2)


def test_greedy_k_larger_than_candidates_with_empty_mask_row(visual):
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="k=1"):
        ops.greedy_select(visual, 1, mask=mask)


@pytest.mark.parametrize("k, exc", [(-1, ValueError), (2.0, TypeError), (True, TypeError),
                                    ("2", TypeError), (None, TypeError)])
def test_greedy_bad_k(k, exc, visual):
    with pytest.raises(exc, match="k"):
        ops.greedy_select(visual, k)


def test_greedy_mask_wrong_dtype_shape_device(visual):
    with pytest.raises(TypeError, match="mask.*bool"):
        ops.greedy_select(visual, 2, mask=torch.ones(B, N, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"mask.*\[B, N\].*\(2, 5\)"):
        ops.greedy_select(visual, 2, mask=torch.ones(B, N - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask.*\(6,\)"):
        ops.greedy_select(visual, 2, mask=torch.ones(N, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask.*meta"):
        ops.greedy_select(visual, 2, mask=torch.ones(B, N, dtype=torch.bool, device="meta"))


# =========================================================================== gather_compact
def test_gather_needs_exactly_one_of_index_and_mask(visual):
    index = torch.tensor([[0, 1], [2, 3]])
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, :2] = True
    with pytest.raises(ValueError, match="index.*mask"):
        ops.gather_compact(visual, index, mask=mask)
    with pytest.raises(ValueError, match="index.*mask"):
        ops.gather_compact(visual)


def test_gather_x_non_tensor_or_wrong_ndim(visual):
    index = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(TypeError, match="x"):
        ops.gather_compact(visual.tolist(), index)
    with pytest.raises(ValueError, match=r"x.*\[B, N, D\].*\(2, 6\)"):
        ops.gather_compact(visual[..., 0], index)


@pytest.mark.parametrize("index", [torch.tensor([[0.0, 1.0], [2.0, 3.0]]),
                                   torch.tensor([[0, 1], [2, 3]], dtype=torch.float16),
                                   torch.tensor([[True, False], [False, True]]),
                                   torch.tensor([0, 1]), torch.zeros(B, 2, 1, dtype=torch.long),
                                   [[0, 1], [2, 3]]],
                         ids=["float32", "float16", "bool", "1d", "3d", "list"])
def test_gather_index_bad_type_or_ndim(index, visual):
    with pytest.raises(TypeError, match="index"):
        ops.gather_compact(visual, index)


def test_gather_index_batch_mismatch(visual):
    with pytest.raises(ValueError, match=r"index.*\[B, K\].*\(3, 2\)"):
        ops.gather_compact(visual, torch.zeros(3, 2, dtype=torch.long) + torch.arange(2))


@pytest.mark.parametrize("bad", [N, N + 3, -1])
def test_gather_index_out_of_range(bad, visual):
    index = torch.tensor([[0, 1], [2, 3]])
    index[1, 0] = bad
    with pytest.raises(ValueError, match=f"index.*{bad}"):
        ops.gather_compact(visual, index)


@pytest.mark.parametrize("sort", [True, False])
def test_gather_index_duplicates(sort, visual):
    index = torch.tensor([[0, 4, 2], [5, 1, 5]])
    with pytest.raises(ValueError, match="index.*duplicate"):
        ops.gather_compact(visual, index, sort=sort)


def test_gather_index_device_mismatch(visual):
    with pytest.raises(ValueError, match="index.*meta"):
        ops.gather_compact(visual, torch.zeros(B, 2, dtype=torch.long, device="meta"))


def test_gather_mask_rows_with_different_counts(visual):
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :2] = True
    with pytest.raises(ValueError, match=r"mask.*different counts.*\[3, 2\]"):
        ops.gather_compact(visual, mask=mask)


def test_gather_mask_wrong_dtype_or_shape(visual):
    with pytest.raises(TypeError, match="mask.*bool"):
        ops.gather_compact(visual, mask=torch.ones(B, N, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask.*\[B, N\].*\(2, 7\)"):
        ops.gather_compact(visual, mask=torch.ones(B, N + 1, dtype=torch.bool))


# =========================================================================== prune
def test_prune_keep_larger_than_stage1_keep(visual, text):
    with pytest.raises(ValueError, match="keep=4.*stage1_keep=3"):
        ops.prune(visual, text, 4, stage1_keep=3)
    with pytest.raises(ValueError, match=r"keep=4.*stage1_keep=0\.5.*3 tokens"):
        ops.prune(visual, text, 4, stage1_keep=0.5)     # 0.5 * 6 = 3


def test_prune_stage1_keep_larger_than_n_or_candidates(visual, text):
    with pytest.raises(ValueError, match=f"stage1_keep={N + 1}.*N={N}"):
        ops.prune(visual, text, 2, stage1_keep=N + 1)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :3] = False                                 # row 1 has 3 candidates
    with pytest.raises(ValueError, match=r"stage1_keep=4.*candidate tokens \(3"):
        ops.prune(visual, text, 2, stage1_keep=4, mask=mask)
    with pytest.raises(ValueError, match=r"stage1_keep=1.0.*candidate tokens \(3"):
        ops.prune(visual, text, 2, stage1_keep=1.0, mask=mask)
    assert ops.prune(visual, text, 2, stage1_keep=3, mask=mask).indices.shape == (B, 2)


@pytest.mark.parametrize("fraction", [0.0, -0.25, 1.5, 1.0000001, math.nan, math.inf])
def test_prune_bad_fraction(fraction, visual, text):
    with pytest.raises(ValueError, match="stage1_keep"):
        ops.prune(visual, text, 1, stage1_keep=fraction)


@pytest.mark.parametrize("stage1_keep", ["0.8", None, True])
def test_prune_stage1_keep_bad_type(stage1_keep, visual, text):
    with pytest.raises(TypeError, match="stage1_keep"):
        ops.prune(visual, text, 1, stage1_keep=stage1_keep)


@pytest.mark.parametrize("keep, exc", [(-1, ValueError), (2.0, TypeError), (True, TypeError),
                                       (None, TypeError)])
def test_prune_bad_keep(keep, exc, visual, text):
    with pytest.raises(exc, match="keep"):
        ops.prune(visual, text, keep, stage1_keep=4)


@pytest.mark.parametrize("arg, value", [("mi_metric", "dot"), ("objective", "minmax"),
                                        ("metric", "euclidean")])
def test_prune_bad_strings(arg, value, visual, text):
    with pytest.raises(ValueError, match=arg):
        ops.prune(visual, text, 2, **{arg: value})


def test_prune_checks_visual_text_and_masks(visual, text):
    with pytest.raises(ValueError, match=r"visual.*\[B, N, D\]"):
        ops.prune(visual[0], text, 2)
    with pytest.raises(TypeError, match="visual"):
        ops.prune(visual.long(), text, 2)
    with pytest.raises(ValueError, match=r"text.*\(2, 3, 5\)"):
        ops.prune(visual, randn((B, M, 5), 4), 2)
    with pytest.raises(ValueError, match=r"mask.*\[B, N\].*\(2, 5\)"):
        ops.prune(visual, text, 2, mask=torch.ones(B, N - 1, dtype=torch.bool))
    text_mask = torch.ones(B, M, dtype=torch.bool)
    text_mask[0] = False
    with pytest.raises(ValueError, match=r"text_mask.*\[0\]"):
        ops.prune(visual, text, 2, text_mask=text_mask)


# =========================================================================== backends
def _each_op(visual, text, backend):
    """One call of each op with valid arguments and the given backend."""
    index = torch.tensor([[0, 1], [2, 3]])
    return [lambda: ops.mi_scores(visual, text, backend=backend),
            lambda: ops.greedy_select(visual, 2, backend=backend),
            lambda: ops.gather_compact(visual, index, backend=backend),
            lambda: ops.prune(visual, text, 2, backend=backend),
            lambda: ops.received_attention(visual[:, None], visual[:, None], 1, 2,
                                           backend=backend)]


@pytest.mark.parametrize("name", ["numpy", "Triton", "", "opencl"])
def test_unknown_backend_name(name, visual, text):
    for call in _each_op(visual, text, name):
        with pytest.raises(ValueError, match="backend"):
            call()


def test_triton_without_interpreter_on_cpu_tensors_raises(monkeypatch, visual, text):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.backend_status("triton", torch.device("cpu"))[0] is False
    for call in _each_op(visual, text, "triton"):
        with pytest.raises(RuntimeError, match="triton.*TRITON_INTERPRET"):
            call()


def test_triton_unimportable_raises(monkeypatch, visual, text):
    monkeypatch.setattr(backends, "_triton_status",
                        lambda device: (False, "triton is not importable (simulated)"))
    for call in _each_op(visual, text, "triton"):
        with pytest.raises(RuntimeError, match="triton.*not importable"):
            call()


def test_cuda_backend_on_cpu_tensors_raises(visual, text):
    for call in _each_op(visual, text, "cuda"):
        with pytest.raises(RuntimeError, match="cuda"):
            call()


@pytest.mark.skipif(visprune.available_backends()["cpu"] == "ok",
                    reason="the compiled extension is built")
def test_cpu_backend_without_extension_raises(visual, text):
    for call in _each_op(visual, text, "cpu"):
        with pytest.raises(RuntimeError, match="cpu.*visprune._C"):
            call()


def test_unavailable_extension_raises_with_the_reason(monkeypatch, visual, text):
    """Simulated: an extension that is missing (or lacks the kernels) is reported, not skipped
    or replaced by another backend."""
    why = "the compiled extension visprune._C is not built (simulated)"
    monkeypatch.setattr(backends, "_extension_status", lambda name, device: (False, why))
    for name in ("cpu", "cuda"):
        for call in _each_op(visual, text, name):
            with pytest.raises(RuntimeError, match=f"{name}.*{esc(why)}"):
                call()


class _Spy:
    """Wraps the reference module's ops and records which were called."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("mi_scores", "greedy_select", "gather_compact", "prune",
                     "received_attention"):
            real = getattr(visprune.reference, name)
            monkeypatch.setattr(visprune.reference, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)
        return wrapper


def test_visprune_backend_env_selects_reference(monkeypatch, visual, text):
    monkeypatch.setenv("VISPRUNE_BACKEND", "reference")
    spy = _Spy(monkeypatch)
    for call in _each_op(visual, text, None):
        call()
    assert spy.calls[:4] == ["mi_scores", "greedy_select", "gather_compact", "prune"]
    assert spy.calls[-1] == "received_attention"


@pytest.mark.parametrize("forced, exc, pattern", [
    ("cuda", RuntimeError, "cuda"),
    ("bogus", ValueError, "backend.*bogus"),
])
def test_visprune_backend_env_is_honoured_even_when_it_cannot_run(monkeypatch, visual, text,
                                                                  forced, exc, pattern):
    monkeypatch.setenv("VISPRUNE_BACKEND", forced)
    for call in _each_op(visual, text, None):
        with pytest.raises(exc, match=pattern):
            call()


def test_visprune_backend_env_forces_triton(monkeypatch, visual, text):
    monkeypatch.setenv("VISPRUNE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in _each_op(visual, text, None):
        with pytest.raises(RuntimeError, match="triton"):
            call()


def test_explicit_backend_argument_beats_env(monkeypatch, visual, text):
    monkeypatch.setenv("VISPRUNE_BACKEND", "bogus")
    spy = _Spy(monkeypatch)
    for call in _each_op(visual, text, "reference"):
        call()
    assert "greedy_select" in spy.calls


def test_default_backend_on_cpu_without_extension_is_reference(monkeypatch, visual, text):
    monkeypatch.delenv("VISPRUNE_BACKEND", raising=False)
    expected = "cpu" if visprune.available_backends(torch.device("cpu"))["cpu"] == "ok" \
        else "reference"
    assert backends.default_backend(torch.device("cpu")) == expected
    if expected == "reference":
        spy = _Spy(monkeypatch)
        ops.greedy_select(visual, 2)
        assert spy.calls == ["greedy_select"]


def test_integer_like_counts_are_accepted(visual, text):
    """NumPy and 0-d tensor integers count as ints for k, start, keep and stage1_keep."""
    want = ops.greedy_select(visual, 2, start=1, backend="reference")
    got = ops.greedy_select(visual, np.int64(2), start=np.int32(1), backend="reference")
    assert torch.equal(got, want)
    assert torch.equal(ops.greedy_select(visual, torch.tensor(2), start=1, backend="reference"), want)
    a = ops.prune(visual, text, np.int64(1), stage1_keep=np.int64(2), backend="reference")
    b = ops.prune(visual, text, 1, stage1_keep=2, backend="reference")
    assert torch.equal(a.indices, b.indices)


def test_value_checks_still_run_under_torch_compile_for_the_reference(visual):
    """Only the compiled extension may skip the value checks while compiling (its kernels repeat
    them); the reference must still refuse k > candidates instead of returning duplicates."""
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, :2] = True
    fn = torch.compile(lambda x, m: ops.greedy_select(x, 4, mask=m, backend="reference"),
                       backend="eager")
    with pytest.raises(ValueError, match="k=4"):
        fn(visual, mask)


def test_text_dtype_must_match_visual(visual, text):
    with pytest.raises(TypeError, match="text has dtype torch.float16 but visual has torch.float32"):
        ops.mi_scores(visual, text.half(), backend="reference")


def test_sort_must_be_a_bool(visual):
    with pytest.raises(TypeError, match="sort must be a bool"):
        ops.gather_compact(visual, torch.zeros(B, 1, dtype=torch.long), sort="no")


def test_numpy_float_fraction_is_accepted(visual, text):
    a = ops.prune(visual, text, 1, stage1_keep=np.float32(0.5), backend="reference")
    b = ops.prune(visual, text, 1, stage1_keep=0.5, backend="reference")
    assert torch.equal(a.indices, b.indices)
