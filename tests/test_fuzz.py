"""Property-based differential tests of the ops and the methods (hypothesis).

Every example is a small random case (shape, dtype, memory layout, mask, special tokens, exact
duplicates, counts) run on every available backend ("reference", "cpu", "triton"); the
properties are the contract's:

* indices are unique per row, in range, candidates of the mask, ``k == 0`` gives ``[B, 0]``;
* the inputs are never modified (every byte of their storage, views included);
* a batch row gives what it gives alone: ``op(x)[b] == op(x[b:b+1])[0]``;
* every backend returns the reference's indices on finite inputs, except where the README
  documents that rounding decides (near-ties, D = 1, non-finite or overflowing tokens, steps
  where every remaining candidate duplicates a selected token, the maxmin start when every
  candidate has a duplicate): a divergence is accepted only there, or when the two choices are
  worth the same up to rounding in a float64 recomputation and are not bitwise-identical tokens
  (among those the lowest index wins on every backend);
* ``mi_scores`` within a dtype tolerance of a float64 recomputation, bitwise-identical scores for
  bitwise-identical tokens;
* every bad argument raises ``ValueError`` / ``TypeError`` naming it, before any backend work,
  with the same exception on every backend.

Each example is built from one seed that hypothesis draws (:class:`Chooser` makes uniform
choices from it, the tensors come from seeded torch generators): a failure prints
``case=build(SEED)``, and ``greedy_cases(Chooser(SEED))`` (or the test's other builder) gives the
case back.  Triton runs in its CPU interpreter, so its shapes stay small (N <= 64, D <= 32, and
no bf16); larger N (255) run on the other backends only.

Default profile ("visprune-fuzz", tests/conftest.py): fixed examples (derandomized), no
example database, about a minute on two cores.  ``VISPRUNE_FUZZ=large`` selects
"visprune-fuzz-large": eight times as many examples, freshly drawn, and larger shapes.
"""
from __future__ import annotations

import math
import os
import random
import re
from contextlib import ExitStack
from unittest import mock

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import visprune  # noqa: E402
from visprune import ops  # noqa: E402
from visprune.backends import backend_status  # noqa: E402
from visprune.methods import divprune, holov, prumerge, trimtokenator  # noqa: E402
from visprune.methods import dycoke, dycoke_count, evs, evs_count  # noqa: E402
from visprune.methods import fastvid, holitom, prunevid, vidcom2, vidcom2_count  # noqa: E402
from visprune.methods import holov as holov_module  # noqa: E402

import fastvid_originals  # noqa: E402
import holitom_originals  # noqa: E402
import prunevid_originals  # noqa: E402
import video_originals  # noqa: E402

from helpers import (distance_matrix_literal, equal_count_mask, mi_scores_literal,  # noqa: E402
                     start_values_literal, step_values_literal, with_duplicates)

LARGE = os.environ.get("VISPRUNE_FUZZ") == "large"
PROFILE = settings.get_profile("visprune-fuzz-large" if LARGE else "visprune-fuzz")


def fuzz(examples: int) -> settings:
    return settings(PROFILE, max_examples=examples * (8 if LARGE else 1))


CPU = torch.device("cpu")
BACKENDS = [b for b in ("reference", "cpu", "triton") if backend_status(b, CPU)[0]]
TRITON_N, TRITON_D = (128, 64) if LARGE else (64, 32)
N_CHOICES = [33, 7, 64, 16, 5, 255, 3, 2, 1] + ([128, 300] if LARGE else [])
D_CHOICES = [16, 7, 32, 3, 2, 1] + ([64, 96] if LARGE else [])
B_CHOICES = [1, 2, 2, 3, 3, 0]
FRACTIONS = [0.5, 1.0, 0.25, 0.75, 0.1, 0.0]


class Chooser(random.Random):
    """The choices of one example, from one seed that hypothesis draws: uniform over the
    options (hypothesis' own draws favour the smallest values, which left most examples with
    B = 0 or k = 0 at the default example counts)."""

    def pick(self, options):
        return self.choice(list(options))

    def flip(self) -> bool:
        return self.random() < 0.5

    def seed_value(self) -> int:
        return self.randrange(2**31)

    def part(self, n: int, fractions=FRACTIONS) -> int:
        """A count in ``[0, n]``: a drawn fraction of ``n``, rounded, at least 1 unless the
        fraction is 0."""
        f = self.pick(fractions)
        return 0 if f == 0 or n == 0 else max(1, min(n, round(f * n)))


def cases(make, **kw):
    """The strategy of ``make(chooser, **kw)``: one drawn seed per example, kept in the case
    (``"case_seed"``) so that a printed failure can be rebuilt."""
    def build(seed):
        case = make(Chooser(seed), **kw)
        case["case_seed"] = seed
        return case
    return st.integers(0, 2**32 - 1).map(build)
FLOATS = [torch.float32, torch.float16]
SPECIALS = ["zero", "tiny", "huge", "nan", "inf", "-inf"]
FINITE_SPECIALS = ["zero", "tiny"]        # finite and without overflow: results still agree
LAYOUTS = ["d_major", "contiguous", "stepped", "expand"]


def backends_for(N: int, D: int):
    """The backends a case runs on: Triton's interpreter only on small shapes."""
    return [b for b in BACKENDS if b != "triton" or (N <= TRITON_N and D <= TRITON_D)]


# =========================================================================== inputs
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """Every byte of ``t``'s storage (a view's whole base, including what the view skips)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


class Untouched:
    """Snapshots of the storages of the given tensors; :meth:`check` asserts none changed."""

    def __init__(self, *tensors):
        self.saved = [(t, storage_bytes(t).clone(), t.shape, t.stride())
                      for t in tensors if isinstance(t, torch.Tensor)]

    def check(self, what: str) -> None:
        for t, data, shape, stride in self.saved:
            assert t.shape == shape and t.stride() == stride, f"{what}: an input was reshaped"
            assert torch.equal(storage_bytes(t), data), f"{what} modified an input"


def lay_out(x: torch.Tensor, layout: str, seed: int) -> torch.Tensor:
    """``x``'s values (for ``"expand"``: row 0's, repeated) in the memory layout ``layout``."""
    B, N, D = x.shape
    if layout == "d_major":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "stepped":
        big = torch.randn(B, 2 * N, 2 * D + 1, generator=_gen(seed)).to(x.dtype)
        big[:, ::2, 1::2] = x
        return big[:, ::2, 1::2]
    if layout == "expand":
        return x[:1].expand(B, N, D)
    return x.contiguous()


def bool_layout(m: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return m.t().contiguous().t()
    if layout == "expand":
        return m[:1].expand_as(m)
    return m


def token_specs(r, *, b_choices=B_CHOICES, n_choices=N_CHOICES, d_choices=D_CHOICES,
                specials=SPECIALS, duplicates=None, layouts=LAYOUTS, min_d=1, dtypes=FLOATS):
    """A tokens tensor's description: shape, dtype, seed, layout, special tokens (up to four),
    exact duplicates (``duplicates``: None = drawn, True or False)."""
    b = r.pick(b_choices)
    n = r.pick(n_choices)
    d = r.pick([v for v in d_choices if v >= min_d])
    spec = {"B": b, "N": n, "D": d, "dtype": r.pick(dtypes),
            "seed": r.seed_value(), "layout": r.pick(layouts),
            "specials": [], "n_distinct": None}
    if b and specials:
        many = r.pick([0, 1, 2, 4])
        spec["specials"] = [(r.randrange(b), r.randrange(n), r.pick(specials), r.randrange(d))
                            for _ in range(many)]
    dup = r.flip() if duplicates is None else duplicates
    if dup and n >= 2:
        spec["n_distinct"] = max(1, min(n - 1, r.part(n, [0.5, 0.25, 0.75, 0.1, 0.0])))
    return spec


def make_tokens(spec) -> torch.Tensor:
    """The tensor ``spec`` describes (specials first, so duplicates may copy them)."""
    B, N, D = spec["B"], spec["N"], spec["D"]
    x = torch.randn(B, N, D, generator=_gen(spec["seed"]))
    for b, i, kind, j in spec["specials"]:
        if kind == "zero":
            x[b, i] = 0.0
        elif kind == "tiny":
            x[b, i] *= 1e-30
        elif kind == "huge":
            x[b, i] *= 1e19
        else:
            x[b, i, j] = float(kind)
    if spec["n_distinct"] is not None:
        x = with_duplicates(x, spec["n_distinct"], spec["seed"] + 1)
    return lay_out(x.to(spec["dtype"]), spec["layout"], spec["seed"] + 2)


def finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def overflow_free(x: torch.Tensor) -> bool:
    """No token whose squared norm overflows fp32 (the README's l2 / Triton exception)."""
    return bool(torch.isfinite(x.double().square().sum(-1).float()).all()) if x.numel() else True


def eligible_for_equality(x: torch.Tensor) -> bool:
    """Inputs on which the contract promises identical indices: finite, no overflowing norm,
    D > 1 (with D = 1 every cosine is ±1 only up to rounding)."""
    return x.shape[2] > 1 and finite(x) and overflow_free(x)


def masks(r, B: int, N: int, kinds=("random", "none", "all", "single")):
    """A candidate mask ``bool[B, N]`` (or None), in a drawn layout."""
    kind = r.pick(kinds)
    if kind == "none":
        return None
    seed = r.seed_value()
    if kind == "all":
        m = torch.ones(B, N, dtype=torch.bool)
    elif kind == "single":
        m = torch.zeros(B, N, dtype=torch.bool)
        if B:
            m[torch.arange(B), torch.randint(0, N, (B,), generator=_gen(seed))] = True
    else:
        m = torch.rand(B, N, generator=_gen(seed)) < r.pick([0.3, 0.6, 0.9])
        if B:
            m[torch.arange(B), torch.randint(0, N, (B,), generator=_gen(seed + 1))] = True
    return bool_layout(m, r.pick(["contiguous", "transposed", "expand"]))


def candidate_count(mask, B: int, N: int) -> int:
    if mask is None or B == 0:
        return N
    return int(mask.sum(-1).min())


def as_count(value: int, kind: str):
    """``value`` as one of the integer forms the contract accepts."""
    return {"int": value, "numpy": np.int64(value), "numpy32": np.int32(value),
            "tensor": torch.tensor(value), "tensor32": torch.tensor(value, dtype=torch.int32)}[kind]


COUNT_KINDS = ["int", "int", "numpy", "numpy32", "tensor", "tensor32"]


def row(t, b):
    return None if t is None else t[b:b + 1]


BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements' bytes, in a fresh tensor with standard strides."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` copied bit for bit (through an integer view: ``torch.gather`` on bf16
    rewrites NaN payloads)."""
    B, _, D = x.shape
    if idx.numel() == 0:
        return x.new_empty(B, idx.shape[1], D)
    src = x.view(BITS[x.element_size()]) if x.dtype.is_floating_point or x.dtype.is_complex \
        else x
    out = src.gather(1, idx[..., None].expand(-1, -1, D))
    return out.view(x.dtype) if src is not x else out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and bits (NaNs included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.equal(raw_bytes(a), raw_bytes(b))
    return torch.equal(a, b)


# =========================================================================== shared checks
def check_selection(idx: torch.Tensor, B: int, k: int, N: int, mask, what: str) -> None:
    """``int64[B, k]``, unique per row, in range, candidates of ``mask``."""
    assert idx.dtype == torch.int64 and tuple(idx.shape) == (B, k), (what, idx.dtype, idx.shape)
    for b in range(B):
        r = idx[b].tolist()
        assert len(set(r)) == k, f"{what}: row {b} repeats an index: {r}"
        assert all(0 <= i < N for i in r), f"{what}: row {b} out of range: {r}"
        if mask is not None:
            assert all(bool(mask[b, i]) for i in r), f"{what}: row {b} picks a non-candidate {r}"


def groups(x_row):
    """For each token of ``x_row[N, D]``, the lowest index of its bitwise-identical copies."""
    seen, out = {}, []
    for tok in x_row:
        key = raw_bytes(tok).numpy().tobytes()
        out.append(seen.setdefault(key, len(out)))
    return out


def start_rule(objective, start):
    """The objective whose start rule picks step 0: ``start="linear"`` is maxsum's."""
    return "maxsum" if start == "linear" else objective


def rounding_step(group, cands, selected, objective, t, forced_start):
    """Whether step ``t`` is one the README leaves to rounding even among exact copies: every
    remaining candidate duplicates a selected token (all distances are rounding noise), or the
    maxmin start when every candidate has a duplicate."""
    if t == 0:
        if forced_start or objective != "maxmin":
            return False
        counts = {}
        for i in cands:
            counts[group[i]] = counts.get(group[i], 0) + 1
        return all(counts[group[i]] > 1 for i in cands)
    chosen = {group[s] for s in selected}
    return all(group[i] in chosen for i in cands)


def lower_copy_violation(x_row, mask_row, picks, objective, forced_start, first=None):
    """A pick that has a bitwise-identical, lower-indexed candidate still unpicked (it must have
    won: identical tokens get identical distances on every backend), or None.  An int start is
    forced, not chosen; steps decided by rounding (:func:`rounding_step`) end the check.
    ``first``: the objective of the start rule (:func:`start_rule`), default ``objective``."""
    N = x_row.shape[0]
    group = groups(x_row)
    remaining = [i for i in range(N) if mask_row is None or bool(mask_row[i])]
    for t, p in enumerate(picks):
        if rounding_step(group, remaining, picks[:t], (first or objective) if t == 0 else objective,
                         t, forced_start):
            return None
        for q in ([] if t == 0 and forced_start else remaining):
            if q >= p:
                break
            if group[q] == group[p]:
                return t, p, q
        remaining.remove(p)
    return None


def greedy_divergence(x_row, mask_row, objective, metric, start, want, got):
    """None if ``got`` is ``want`` or differs only at a rounding tie; else why it is wrong.

    At the first step where they differ (both followed the same picks before): a step the
    README leaves to rounding (:func:`rounding_step`) is accepted; otherwise the two choices
    are recomputed in float64, and a tie within 1e-5 (relative) between tokens that are not
    bitwise identical is decided by rounding, which the README allows."""
    want, got = list(want), list(got)
    if want == got:
        return None
    t = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
    forced = isinstance(start, int)
    if t == 0 and forced:
        return f"step 0 must be start={start}"
    N = x_row.shape[0]
    group = groups(x_row)
    cands = [i for i in range(N) if (mask_row is None or bool(mask_row[i])) and i not in want[:t]]
    if rounding_step(group, cands, want[:t], start_rule(objective, start) if t == 0 else objective,
                     t, forced):
        return None
    a, b = want[t], got[t]
    if group[a] == group[b]:
        return f"step {t}: {a} and {b} are the same token, the lower index must win"
    dist = distance_matrix_literal(x_row, metric)
    vals = (start_values_literal(dist, cands, start_rule(objective, start)) if t == 0
            else step_values_literal(dist, cands, want[:t], objective))
    va, vb = vals[cands.index(a)], vals[cands.index(b)]
    if abs(va - vb) <= 1e-5 * max(1.0, abs(va), abs(vb)):
        return None
    return f"step {t}: {a} (float64 value {va}) vs {b} ({vb}): not a rounding tie"


def run_all(fn, backends, *tensors):
    """``{backend: fn(backend)}``, asserting that no call modified ``tensors``."""
    guard = Untouched(*tensors)
    out = {}
    for be in backends:
        out[be] = fn(be)
        guard.check(be)
    return out


# =========================================================================== greedy_select
def greedy_cases(r, finite_only=False, duplicates=None, layouts=LAYOUTS):
    spec = token_specs(r, specials=FINITE_SPECIALS if finite_only else SPECIALS,
                       duplicates=duplicates, layouts=layouts, min_d=2 if finite_only else 1)
    B, N = spec["B"], spec["N"]
    mask = masks(r, B, N)
    n_cand = candidate_count(mask, B, N)
    k = r.part(n_cand)
    always = [i for i in range(N) if mask is None or B == 0 or bool(mask[:, i].all())]
    start = r.pick(["auto", "auto", "linear"])
    if always and r.flip():
        start = always[r.part(len(always) - 1, [0.5, 0.0, 1.0, 0.25])]
    return {"spec": spec, "mask": mask, "k": k, "k_kind": r.pick(COUNT_KINDS),
            "start": start, "start_kind": r.pick(COUNT_KINDS),
            "objective": r.pick(["maxmin", "maxsum"]),
            "metric": r.pick(["cosine", "l2"])}


def run_greedy(case, x, be):
    start = case["start"]
    if not isinstance(start, str):
        start = as_count(start, case["start_kind"])
    return ops.greedy_select(x, as_count(case["k"], case["k_kind"]), objective=case["objective"],
                             metric=case["metric"], mask=case["mask"], start=start, backend=be)


def check_greedy_case(case, batch_rows=True):
    x, mask, k = make_tokens(case["spec"]), case["mask"], case["k"]
    B, N, D = x.shape
    bes = backends_for(N, D)
    out = run_all(lambda be: run_greedy(case, x, be), bes, x, mask)
    for be, idx in out.items():
        check_selection(idx, B, k, N, mask, f"greedy_select[{be}]")
        if isinstance(case["start"], int) and k:
            assert (idx[:, 0] == case["start"]).all(), f"{be}: does not start at {case['start']}"
        if finite(x):
            for b in range(B):
                bad = lower_copy_violation(x[b], None if mask is None else mask[b],
                                           idx[b].tolist(), case["objective"],
                                           isinstance(case["start"], int),
                                           start_rule(case["objective"], case["start"]))
                assert bad is None, (f"greedy_select[{be}] row {b} step {bad[0]} picks {bad[1]}, "
                                     f"but {bad[2]} is the same token with a lower index")
        if batch_rows:
            for b in range(B):
                alone = run_greedy(case, x[b:b + 1], be) if mask is None else \
                    ops.greedy_select(x[b:b + 1], k, objective=case["objective"],
                                      metric=case["metric"], mask=row(mask, b),
                                      start=case["start"], backend=be)
                assert torch.equal(alone[0], idx[b]), (
                    f"greedy_select[{be}]: row {b} of the batch {idx[b].tolist()} != the row "
                    f"alone {alone[0].tolist()}")
    return x, out


@fuzz(45)
@given(case=cases(greedy_cases))
def test_greedy_select_indices_are_valid_on_any_input(case):
    """Any input (NaN, ±Inf, huge, tiny, zero tokens, duplicates, any layout and mask): unique,
    in-range candidates, start respected, inputs untouched, batch rows as single rows, and
    among bitwise-identical tokens (finite inputs) the lowest index is picked first."""
    check_greedy_case(case)


@fuzz(45)
@given(case=cases(greedy_cases, finite_only=True))
def test_greedy_select_backends_agree(case):
    """Finite tokens (Gaussian, with zero / tiny tokens and exact duplicates): every backend
    picks the reference's indices, up to rounding ties (float64 recomputation)."""
    x, out = check_greedy_case(case, batch_rows=False)
    if not eligible_for_equality(x):
        return
    mask = case["mask"]
    for be, idx in out.items():
        for b in range(x.shape[0]):
            why = greedy_divergence(x[b], None if mask is None else mask[b], case["objective"],
                                    case["metric"], case["start"], out["reference"][b].tolist(),
                                    idx[b].tolist())
            assert why is None, f"greedy_select[{be}] row {b} differs from the reference: {why}"


@fuzz(30)
@given(case=cases(greedy_cases, finite_only=True, duplicates=True))
def test_greedy_select_exact_duplicates_agree_on_any_layout(case):
    """Exact duplicates in every layout (D-major, stepped, expanded): every backend picks the
    same copy, the lowest index, and the same indices as on a contiguous copy."""
    x, out = check_greedy_case(case, batch_rows=False)
    if not eligible_for_equality(x):
        return
    mask = case["mask"]
    contiguous = x.contiguous()
    for be, idx in out.items():
        again = run_greedy(case, contiguous, be)
        assert torch.equal(again, idx), (f"greedy_select[{be}]: {case['spec']['layout']} layout "
                                         f"{idx.tolist()} != contiguous {again.tolist()}")
        for b in range(x.shape[0]):
            why = greedy_divergence(x[b], None if mask is None else mask[b], case["objective"],
                                    case["metric"], case["start"], out["reference"][b].tolist(),
                                    idx[b].tolist())
            assert why is None, f"greedy_select[{be}] row {b} differs from the reference: {why}"


# =========================================================================== mi_scores
def mi_cases(r, finite_only=False):
    spec = token_specs(r, specials=FINITE_SPECIALS if finite_only else SPECIALS)
    B, N, D = spec["B"], spec["N"], spec["D"]
    M = r.pick([5, 2, 9, 1])
    tm_kind = r.pick(["random", "none", "all", "single"])
    return {"spec": spec, "M": M, "text_seed": r.seed_value(),
            "text_layout": r.pick(LAYOUTS), "text_mask": tm_kind,
            "text_mask_layout": r.pick(["contiguous", "transposed", "expand"]),
            "metric": r.pick(["l2", "cosine"])}


def make_text(case):
    spec = case["spec"]
    B, D, M = spec["B"], spec["D"], case["M"]
    t = torch.randn(B, M, D, generator=_gen(case["text_seed"])).to(spec["dtype"])
    t = lay_out(t, case["text_layout"], case["text_seed"] + 1)
    kind, g = case["text_mask"], _gen(case["text_seed"] + 2)
    if kind == "none":
        return t, None
    if kind == "all":
        tm = torch.ones(B, M, dtype=torch.bool)
    else:
        tm = (torch.rand(B, M, generator=g) < 0.5) if kind == "random" else \
            torch.zeros(B, M, dtype=torch.bool)
        if B:
            tm[torch.arange(B), torch.randint(0, M, (B,), generator=g)] = True
    return t, bool_layout(tm, case["text_mask_layout"])


def mi_tolerance(visual, text, metric):
    """Absolute tolerance of an fp32-accumulated score (inputs already in their dtype)."""
    if metric == "cosine":
        return 2e-5
    def largest(t):
        return t.double().square().sum(-1).max().item()
    return 2e-5 * (1.0 + largest(visual) + largest(text))


@fuzz(40)
@given(case=cases(mi_cases))
def test_mi_scores_properties(case):
    """float32[B, N] on every backend, inputs untouched, batch rows as single rows (within
    fp32 rounding); on finite inputs within an fp32 tolerance of a float64 recomputation;
    bitwise-identical tokens get bitwise-identical scores on every backend."""
    x = make_tokens(case["spec"])
    text, tm = make_text(case)
    B, N, D = x.shape
    metric = case["metric"]
    out = run_all(lambda be: ops.mi_scores(x, text, text_mask=tm, metric=metric, backend=be),
                  backends_for(N, D), x, text, tm)
    ok_values = finite(x, text) and overflow_free(x) and overflow_free(text)
    want = mi_scores_literal(x, text, tm, metric) if ok_values and B else None
    for be, s in out.items():
        assert s.dtype == torch.float32 and tuple(s.shape) == (B, N), (be, s.dtype, s.shape)
        for b in range(B):
            alone = ops.mi_scores(x[b:b + 1], text[b:b + 1], text_mask=row(tm, b), metric=metric,
                                  backend=be)
            # floats: within the tolerance (a batched matrix product may round a row
            # differently from the row alone), non-finite exactly where the batch has them
            assert torch.equal(alone[0].isnan(), s[b].isnan()), (be, b, alone[0], s[b])
            real = ~s[b].isnan()
            assert torch.allclose(alone[0][real], s[b][real], rtol=1e-5, atol=1e-5), (
                f"mi_scores[{be}]: row {b} in the batch != alone, max diff "
                f"{(alone[0] - s[b])[real].abs().max()}")
            if finite(x[b]):
                for i, j in enumerate(groups(x[b])):
                    assert same_bits(s[b, i], s[b, j]), (
                        f"mi_scores[{be}] row {b}: tokens {j} and {i} are identical, "
                        f"scores {s[b, j].item()} != {s[b, i].item()}")
        if want is not None:
            tol = mi_tolerance(x, text, metric)
            err = (s.double() - want).abs().max().item()
            assert err <= tol, f"mi_scores[{be}] is {err} from the float64 scores (tolerance {tol})"


# =========================================================================== gather_compact
GATHER_X_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
INDEX_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def gather_cases(r):
    spec = token_specs(r, dtypes=[torch.float32], duplicates=False)
    B, N = spec["B"], spec["N"]
    K = r.part(N)
    index_dtypes = [d for d in INDEX_DTYPES if N - 1 <= torch.iinfo(d).max]
    return {"spec": spec, "x_dtype": r.pick(GATHER_X_DTYPES), "K": K,
            "form": r.pick(["index", "index", "mask"]),
            "sort": r.flip(), "index_dtype": r.pick(index_dtypes),
            "index_layout": r.pick(["contiguous", "transposed", "expand",
                                                  "stepped"]),
            "seed": r.seed_value()}


def make_gather_inputs(case):
    spec = case["spec"]
    x = make_tokens(spec)
    if case["x_dtype"] != torch.float32:
        dt = case["x_dtype"]
        if dt.is_floating_point:
            x = x.to(dt)                  # specials carry over (fp16: huge becomes inf)
        else:
            x = torch.nan_to_num(x * 40, nan=0.0, posinf=0.0, neginf=0.0).clamp(-100, 100).to(dt)
    B, N, _ = x.shape
    K, g = case["K"], _gen(case["seed"])
    if case["form"] == "mask":
        m = equal_count_mask(B, N, K, case["seed"])
        return x, None, bool_layout(m, case["index_layout"] if case["index_layout"] != "stepped"
                                    else "contiguous")
    index = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)]) if B else \
        torch.empty(0, K, dtype=torch.long)
    index = index.to(case["index_dtype"])
    layout = case["index_layout"]
    if layout == "transposed":
        index = index.t().contiguous().t()
    elif layout == "expand":
        index = index[:1].expand_as(index)
    elif layout == "stepped":
        big = torch.zeros(B, 2 * K + 1, dtype=index.dtype)
        big[:, 1::2] = index
        index = big[:, 1::2]
    return x, index, None


@fuzz(60)
@given(case=cases(gather_cases))
def test_gather_compact_properties(case):
    """Any real x dtype, index dtype and layout, both forms: bit-exact rows, the requested
    order, identical on every backend, inputs untouched, batch rows as single rows."""
    x, index, mask = make_gather_inputs(case)
    B, N, D = x.shape
    bes = [b for b in backends_for(N, D)
           if not (b == "triton" and x.dtype == torch.bfloat16)]   # the interpreter's bf16
    sort = case["sort"]
    out = run_all(lambda be: ops.gather_compact(x, index, mask=mask, sort=sort, backend=be),
                  bes, x, index, mask)
    if mask is not None:
        want_idx = (torch.stack([m.nonzero().flatten() for m in mask]) if B else
                    torch.empty(0, 0, dtype=torch.long))
    else:
        want_idx = index.long().sort(-1).values if sort else index.long()
    want_tok = take_rows(x, want_idx)
    for be, (tokens, idx) in out.items():
        assert torch.equal(idx, want_idx) and idx.dtype == torch.int64, (be, idx, want_idx)
        assert same_bits(tokens, want_tok), f"gather_compact[{be}] rows are not exact copies"
        for b in range(B):
            t1, i1 = ops.gather_compact(x[b:b + 1], row(index, b), mask=row(mask, b), sort=sort,
                                        backend=be)
            assert same_bits(t1[0], tokens[b]) and torch.equal(i1[0], idx[b]), (be, b)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=str)
@fuzz(4)
@given(B=st.integers(0, 2), N=st.integers(1, 9), D=st.integers(1, 5), form=st.sampled_from(
    ["index", "mask"]), seed=st.integers(0, 2**31 - 1))
def test_gather_compact_complex_and_float8_x_are_consistent(dtype, B, N, D, form, seed):
    """complex / float8 x: either gathered exactly on every backend, or a TypeError naming x on
    every backend; nothing else."""
    x = torch.randn(B, N, D, generator=_gen(seed))
    x = torch.complex(x, -x) if dtype.is_complex else x.to(dtype)
    K = N // 2
    index = torch.stack([torch.randperm(N, generator=_gen(seed + b))[:K] for b in range(B)]) \
        if B else torch.empty(0, K, dtype=torch.long)
    mask = None
    if form == "mask":
        mask = torch.zeros(B, N, dtype=torch.bool).scatter_(1, index, True)
        index = None
    outcome = {}
    for be in BACKENDS:
        try:
            tokens, idx = ops.gather_compact(x, index, mask=mask, backend=be)
        except TypeError as e:
            assert re.search(r"\bx\b", str(e)), f"{be}: TypeError not naming x: {e}"
            outcome[be] = ("TypeError", str(e))
        except Exception as e:  # noqa: BLE001 - anything else breaks the contract
            raise AssertionError(f"gather_compact[{be}] on {dtype} x raised "
                                 f"{type(e).__name__}: {e}") from e
        else:
            assert same_bits(tokens, take_rows(x, idx)), (
                f"gather_compact[{be}] on {dtype} x: wrong rows")
            outcome[be] = ("ok", None)
    kinds = {be: o[0] for be, o in outcome.items()}
    assert len(set(kinds.values())) == 1, f"backends disagree on {dtype} x: {outcome}"


# =========================================================================== prune / trimtokenator
def prune_cases(r, finite_only=False):
    case = mi_cases(r, finite_only=finite_only)
    spec = case["spec"]
    B, N = spec["B"], spec["N"]
    if finite_only:
        spec["D"] = max(spec["D"], 2)
    mask = masks(r, B, N)
    n_cand = candidate_count(mask, B, N)
    n1 = r.part(n_cand, [0.75, 1.0, 0.5, 0.25, 0.0])
    keep = r.part(n1)
    if r.flip() or n1 == 0:
        stage1 = n1
    else:
        # a fraction of N that rounds half up to n1
        stage1 = (n1 - 0.5 + r.uniform(0.001, 0.999)) / N
        if not 0.0 < stage1 <= 1.0 or math.floor(stage1 * N + 0.5) != n1:
            stage1 = n1
    case.update({"mask": mask, "keep": keep, "keep_kind": r.pick(COUNT_KINDS),
                 "stage1": stage1, "n1": n1,
                 "objective": r.pick(["maxsum", "maxmin"]),
                 "gmetric": r.pick(["cosine", "l2"])})
    return case


def run_prune(case, x, text, tm, mask, be, keep=None):
    return ops.prune(x, text, as_count(case["keep"], case["keep_kind"]) if keep is None else keep,
                     stage1_keep=case["stage1"], text_mask=tm, mask=mask,
                     mi_metric=case["metric"], objective=case["objective"],
                     metric=case["gmetric"], backend=be)


def check_prune_result(res, x, keep, mask, what):
    B, N, D = x.shape
    idx = res.indices
    check_selection(idx, B, keep, N, mask, what)
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), f"{what}: indices are not ascending"
    assert res.lengths.dtype == torch.int64 and res.lengths.tolist() == [keep] * B, what
    assert same_bits(res.tokens, take_rows(x, idx)), f"{what}: tokens are not the indexed rows"


def prune_divergence(case, x, text, tm, mask, b, be, want, got):
    """None if ``got`` differs from ``want`` only by a rounding tie (stage 1 or stage 2)."""
    if want == got:
        return None
    xb, tb = x[b:b + 1], text[b:b + 1]
    s = mi_scores_literal(xb, tb, row(tm, b), case["metric"])[0]
    N, n1 = x.shape[1], case["n1"]
    cands = [i for i in range(N) if mask is None or bool(mask[b, i])]
    order = sorted(cands, key=lambda i: (-s[i].item(), i))
    if n1 < len(order):
        edge = abs(s[order[n1 - 1]].item() - s[order[n1]].item())
        if edge <= 1e-5 * max(1.0, abs(s[order[n1]].item())):
            return None                                       # stage-1 near-tie
    surv = torch.zeros(1, N, dtype=torch.bool)
    surv[0, order[:n1]] = True
    keep = len(want)
    traj = {name: ops.greedy_select(xb, keep, objective=case["objective"],
                                    metric=case["gmetric"], mask=surv, backend=name)[0].tolist()
            for name in ("reference", be)}
    if sorted(traj[be]) != got:
        return f"{be}'s prune {got} is not its greedy selection on the survivors {traj[be]}"
    return greedy_divergence(x[b], surv[0], case["objective"], case["gmetric"], "auto",
                             traj["reference"], traj[be])


def prune_on_every_backend(case):
    """The case's inputs and ``prune`` on every backend that takes its shape."""
    x = make_tokens(case["spec"])
    text, tm = make_text(case)
    mask = case["mask"]
    out = run_all(lambda be: run_prune(case, x, text, tm, mask, be),
                  backends_for(x.shape[1], x.shape[2]), x, text, tm, mask)
    return x, text, tm, mask, out


@fuzz(40)
@given(case=cases(prune_cases))
def test_prune_properties(case):
    """Any input: ascending unique in-range candidates, exact rows, lengths == keep, inputs
    untouched, batch rows as single rows, trimtokenator == prune."""
    x, text, tm, mask, out = prune_on_every_backend(case)
    B = x.shape[0]
    for be, res in out.items():
        check_prune_result(res, x, case["keep"], mask, f"prune[{be}]")
        tt = trimtokenator(x, text, case["keep"], stage1_keep=case["stage1"], text_mask=tm,
                           mask=mask, mi_metric=case["metric"], objective=case["objective"],
                           metric=case["gmetric"], backend=be)
        assert all(same_bits(a, b) for a, b in zip(tt, res)), f"trimtokenator[{be}] != prune"
        for b in range(B):
            alone = run_prune(case, x[b:b + 1], text[b:b + 1], row(tm, b), row(mask, b), be)
            assert torch.equal(alone.indices[0], res.indices[b]), (
                f"prune[{be}]: row {b} in the batch {res.indices[b].tolist()} != alone "
                f"{alone.indices[0].tolist()}")


@fuzz(40)
@given(case=cases(prune_cases, finite_only=True))
def test_prune_backends_agree(case):
    """Finite inputs: every backend keeps the reference's tokens, up to rounding ties in the
    MI ranking or in the greedy stage (float64 recomputation)."""
    x, text, tm, mask, out = prune_on_every_backend(case)
    B = x.shape[0]
    if not (eligible_for_equality(x) and finite(text) and overflow_free(text)):
        return
    for be, res in out.items():
        check_prune_result(res, x, case["keep"], mask, f"prune[{be}]")
        for b in range(B):
            why = prune_divergence(case, x, text, tm, mask, b, be,
                                   out["reference"].indices[b].tolist(), res.indices[b].tolist())
            assert why is None, f"prune[{be}] row {b} differs from the reference: {why}"


# =========================================================================== divprune
@fuzz(30)
@given(case=cases(greedy_cases, finite_only=True))
def test_divprune_backends_agree(case):
    """DivPrune: ascending unique candidates, exact rows, lengths == keep, batch rows as single
    rows, and the reference's tokens on every backend up to rounding ties."""
    x, mask, keep = make_tokens(case["spec"]), case["mask"], case["k"]
    B, N, D = x.shape
    out = run_all(lambda be: divprune(x, keep, mask=mask, backend=be), backends_for(N, D), x, mask)
    for be, res in out.items():
        check_prune_result(res, x, keep, mask, f"divprune[{be}]")
        for b in range(B):
            alone = divprune(x[b:b + 1], keep, mask=row(mask, b), backend=be)
            assert torch.equal(alone.indices[0], res.indices[b]), (be, b)
        if not eligible_for_equality(x) or torch.equal(res.indices, out["reference"].indices):
            continue
        for b in range(B):
            traj = {name: ops.greedy_select(x[b:b + 1], keep, objective="maxmin",
                                            metric="cosine", mask=row(mask, b),
                                            backend=name)[0].tolist()
                    for name in ("reference", be)}
            assert sorted(traj[be]) == res.indices[b].tolist(), (be, b)
            why = greedy_divergence(x[b], None if mask is None else mask[b], "maxmin", "cosine",
                                    "auto", traj["reference"], traj[be])
            assert why is None, f"divprune[{be}] row {b} differs from the reference: {why}"


# =========================================================================== holov
def holov_cases(r, bad_attn=False):
    spec = token_specs(r, specials=[] if not bad_attn else SPECIALS, min_d=2)
    B, N = spec["B"], spec["N"]
    case = {"spec": spec, "keep": r.part(N),
            "num_crops": r.pick([4, 16, 3, 7, 2, 1]),
            "alpha": r.pick([0.09, 0.0, 1.0]),
            "redistribute": True if bad_attn else r.flip(),
            "attn_seed": r.seed_value(), "attn_bad": []}
    if bad_attn and B:
        case["attn_bad"] = [(r.randrange(B), r.randrange(N), r.pick(["nan", "inf", "-inf"]))
                            for _ in range(r.randint(1, N))]
        case["attn_all"] = r.pick([None, "nan", "inf"])
    return case


def make_attn(case):
    spec = case["spec"]
    a = torch.rand(spec["B"], spec["N"], generator=_gen(case["attn_seed"]))
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-6)
    for b, i, kind in case["attn_bad"]:
        a[b, i] = float(kind)
    if case.get("attn_all"):
        a[:] = float(case["attn_all"])
    return a.to(spec["dtype"])


def check_holov_result(res, x, keep, redistribute, what):
    B, N, D = x.shape
    idx = res.indices
    assert tuple(idx.shape) == (B, keep) and idx.dtype == torch.int64, (what, idx.shape)
    assert res.lengths.tolist() == [keep] * B and tuple(res.tokens.shape) == (B, keep, D), what
    for b in range(B):
        r = idx[b].tolist()
        real = [i for i in r if i != -1]
        assert all(0 <= i < N for i in real), f"{what}: row {b} out of range: {r}"
        assert len(set(real)) == len(real), f"{what}: row {b} repeats an index: {r}"
        if redistribute:
            assert len(real) == keep, f"{what}: row {b} has padding with redistribute=True: {r}"
        for j, i in enumerate(r):
            want = x[b, i] if i >= 0 else torch.zeros_like(x[b, 0])
            assert same_bits(res.tokens[b, j], want), f"{what}: row {b} slot {j} is not x[{i}]"


def holov_near_tie(x, attn, case, be) -> bool:
    """Whether the two similarity-variance paths give crop scores whose budget split sits on a
    rounding boundary (a share ``w·keep`` within 1e-4 of an integer, or two shares within
    1e-5): then the allocation is decided by rounding."""
    N, C, keep = x.shape[1], case["num_crops"], case["keep"]
    v = holov_module.similarity_variance(x, C)
    s = holov_module.crop_scores(v, attn, C, float(case["alpha"])).double()
    w = s / (s.sum(-1, keepdim=True) + 1e-6)
    share = w * keep
    frac = share - share.floor()
    if bool(((frac < 1e-4) | (frac > 1 - 1e-4)).any()):
        return True
    ws = w.sort(-1).values
    return bool(((ws[:, 1:] - ws[:, :-1]).abs() < 1e-5).any())


@fuzz(30)
@given(case=cases(holov_cases))
def test_holov_properties_and_backends_agree(case):
    """HoloV on finite attention: indices unique or -1 (only with redistribute=False), exact
    rows, zero padding, lengths == keep, batch rows as single rows, inputs untouched, the
    reference's indices on every backend (unless the budget split sits on a rounding edge)."""
    x, attn = make_tokens(case["spec"]), make_attn(case)
    B, N, D = x.shape
    kw = dict(num_crops=case["num_crops"], alpha=case["alpha"], redistribute=case["redistribute"])
    out = run_all(lambda be: holov(x, attn, case["keep"], backend=be, **kw), backends_for(N, D),
                  x, attn)
    for be, res in out.items():
        check_holov_result(res, x, case["keep"], case["redistribute"], f"holov[{be}]")
        for b in range(B):
            alone = holov(x[b:b + 1], attn[b:b + 1], case["keep"], backend=be, **kw)
            assert torch.equal(alone.indices[0], res.indices[b]), (be, b)
        if not torch.equal(res.indices, out["reference"].indices) and finite(x):
            assert holov_near_tie(x, attn, case, be), (
                f"holov[{be}] {res.indices.tolist()} != reference "
                f"{out['reference'].indices.tolist()}")


@fuzz(25)
@given(case=cases(holov_cases, bad_attn=True))
def test_holov_non_finite_attention_never_empties_the_output(case):
    """NaN / ±Inf in attn with redistribute=True: exactly keep real tokens (no -1), or a clear
    ValueError naming attn; never silent zero tokens."""
    x, attn = make_tokens(case["spec"]), make_attn(case)
    B, N, D = x.shape
    for be in backends_for(N, D):
        guard = Untouched(x, attn)
        try:
            res = holov(x, attn, case["keep"], num_crops=case["num_crops"], alpha=case["alpha"],
                        redistribute=True, backend=be)
        except ValueError as e:
            assert "attn" in str(e), f"holov[{be}]: ValueError not naming attn: {e}"
            continue
        guard.check(f"holov[{be}]")
        check_holov_result(res, x, case["keep"], True, f"holov[{be}]")


# =========================================================================== prumerge
def prumerge_cases(r):
    spec = token_specs(r, specials=[], duplicates=False,
                       n_choices=[40, 16, 64, 33, 7, 3, 2, 1])
    return {"spec": spec, "dk": r.pick([2, 3, 8, 16]),
            "seed": r.seed_value(), "plus": r.flip(),
            "iqr_scope": r.pick(["image", "batch"]),
            "sharp": r.pick([1.0, 4.0, 12.0])}


def make_prumerge_inputs(case):
    spec = case["spec"]
    B, N = spec["B"], spec["N"]
    x = make_tokens(spec)
    g = _gen(case["seed"])
    keys = torch.randn(B, N, case["dk"], generator=g).to(spec["dtype"])
    logits = torch.randn(B, N, generator=g) * case["sharp"]
    cls_attn = logits.softmax(-1) if N else logits
    return x, cls_attn, keys


def check_prumerge_result(res, B, N, D, what):
    idx, lengths = res.indices, res.lengths
    L1 = idx.shape[1]
    assert tuple(res.tokens.shape) == (B, L1, D) and lengths.dtype == torch.int64, what
    for b in range(B):
        r, n = idx[b].tolist(), int(lengths[b])
        real = [i for i in r if i != -1]
        assert len(set(real)) == len(real), f"{what}: row {b} repeats an index: {r}"
        assert all(0 <= i < N for i in real), f"{what}: row {b} out of range: {r}"
        assert 2 <= n <= L1 and all(i >= 0 for i in r[:n - 1]) and r[n - 1] == -1, (
            f"{what}: row {b} length {n} does not match its indices {r}")
        assert all(i == -1 for i in r[n:]), f"{what}: row {b} has indices past its length"
        assert not bool(res.tokens[b, n:].any()), f"{what}: row {b} padding is not zero"
    if B:
        assert int(lengths.max()) == L1, f"{what}: padded to {L1}, longest row {lengths.max()}"


def cluster_near_tie(keys_row, kept) -> bool:
    """Whether a kept token's 32 nearest keys are decided by a rounding tie (float64 cosines of
    the 32nd and 33rd neighbours within 1e-5)."""
    N = keys_row.shape[0]
    if N <= 33:
        return False
    k = keys_row.double()
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = k @ k.t()
    for i in kept:
        c = torch.cat([cos[i, :i], cos[i, i + 1:]]).sort(descending=True).values
        if abs(c[31] - c[32]).item() < 1e-5:
            return True
    return False


@fuzz(30)
@given(case=cases(prumerge_cases))
def test_prumerge_properties_and_backends_agree(case):
    """PruMerge / PruMerge+: indices unique or -1, lengths consistent with the indices (kept
    tokens then the extra token), zero padding, inputs untouched; identical indices and lengths
    on every backend and merged tokens within fp32 tolerance; batch rows as single rows for
    iqr_scope="image"."""
    x, cls_attn, keys = make_prumerge_inputs(case)
    B, N, D = x.shape
    kw = dict(plus=case["plus"], iqr_scope=case["iqr_scope"])
    out = run_all(lambda be: prumerge(x, cls_attn, keys, backend=be, **kw), backends_for(N, D),
                  x, cls_attn, keys)
    ref = out["reference"]
    for be, res in out.items():
        check_prumerge_result(res, B, N, D, f"prumerge[{be}]")
        assert torch.equal(res.indices, ref.indices) and torch.equal(res.lengths, ref.lengths), (
            f"prumerge[{be}] {res.indices.tolist()} != reference {ref.indices.tolist()}")
        if not any(cluster_near_tie(keys[b], [i for i in ref.indices[b].tolist() if i >= 0])
                   for b in range(B)):
            tol = 1e-2 if x.dtype == torch.float16 else 1e-4
            scale = 1.0 + x.float().abs().max().item() if x.numel() else 1.0
            err = (res.tokens.float() - ref.tokens.float()).abs().max().item() if x.numel() else 0
            assert err <= tol * scale, f"prumerge[{be}] merged tokens differ by {err}"
        if case["iqr_scope"] == "image":
            for b in range(B):
                alone = prumerge(x[b:b + 1], cls_attn[b:b + 1], keys[b:b + 1], backend=be, **kw)
                n = int(res.lengths[b])
                assert int(alone.lengths[0]) == n, (be, b)
                assert torch.equal(alone.indices[0, :n], res.indices[b, :n]), (be, b)


# =========================================================================== video methods
# name: (method, its count, the rates drawn, the transliterated original: positions of one video)
VIDEO_METHODS = {
    "evs": (evs, evs_count, [0.0, 0.25, 0.5, 0.75, 0.9, 0.99],
            lambda v, t, h, w, q: video_originals.evs_retention_mask(v, (t, h, w), 1, q)
            .nonzero().squeeze(-1)),
    "vidcom2": (vidcom2, vidcom2_count, [0.0, 0.25, 0.5, 0.75, 0.9, 0.99],
                lambda v, t, h, w, q: video_originals.vidcom2_retention_mask(v, (t, h, w), 1, q)
                .nonzero().squeeze(-1)),
    "dycoke": (dycoke, dycoke_count, [0.7, 0.0, 0.3, 0.5, 0.9, 1.0],
               lambda v, t, h, w, k: video_originals.dycoke_ttm(v, h * w, k)[1]),
}


def video_cases(r):
    T = r.pick([1, 2, 3, 4, 5, 6, 8, 9, 13])
    h, w = r.pick([(1, 1), (1, 3), (2, 2), (2, 3), (3, 3), (1, 7), (4, 4)])
    spec = token_specs(r, n_choices=[T * h * w])
    method = r.pick(sorted(VIDEO_METHODS))
    frames = None
    if spec["B"] and r.flip():
        frames = [r.randint(1, T) for _ in range(spec["B"])]
        frames = r.pick([frames, torch.tensor(frames), np.array(frames)])
    return {"spec": spec, "T": T, "grid": (h, w), "method": method,
            "rate": r.pick(VIDEO_METHODS[method][2]), "frames": frames}


@fuzz(40)
@given(case=cases(video_cases))
def test_video_methods_properties(case):
    """EVS, VidCom2, DyCoke on any tokens, layout and ragged frame counts: per row the count of
    the method's rule, unique in-range positions of the row's real frames (ascending for EVS and
    VidCom2), -1 and zero tokens past it, the input's rows bit for bit, the transliterated
    original's positions (one video at a time, packed), the row's result alone, inputs untouched,
    the same result on every backend."""
    spec, T, (h, w) = case["spec"], case["T"], case["grid"]
    fn, count, _, original = VIDEO_METHODS[case["method"]]
    x3 = make_tokens(spec)
    x = x3.unflatten(1, (T, h * w))
    B, _, P, D = x.shape
    frames = [T] * B if case["frames"] is None else [int(t) for t in case["frames"]]
    out = run_all(lambda be: fn(x, case["rate"], frames=case["frames"], backend=be),
                  backends_for(T * P, D), x)
    ref = out["reference"]
    for be, res in out.items():
        what = f"{case['method']}[{be}]"
        assert torch.equal(res.indices, ref.indices) and same_bits(res.tokens, ref.tokens), what
        assert res.lengths.tolist() == [count(P, t, case["rate"]) for t in frames], what
        L = res.indices.shape[1]
        assert tuple(res.tokens.shape) == (B, L, D) and res.tokens.dtype == x.dtype, what
    for b, t in enumerate(frames):
        n = int(ref.lengths[b])
        kept = ref.indices[b, :n]
        in_range = bool(((kept >= 0) & (kept < t * P)).all())
        assert len(set(kept.tolist())) == n and in_range, (b, kept)
        if case["method"] != "dycoke":
            assert bool((kept[1:] > kept[:-1]).all()), (b, kept)
        assert bool((ref.indices[b, n:] == -1).all()) and not bool(ref.tokens[b, n:].any())
        assert same_bits(ref.tokens[b:b + 1, :n], take_rows(x3[b:b + 1], kept[None])), b
        packed = x[b, :t].reshape(t * P, D).contiguous()
        assert kept.tolist() == original(packed, t, h, w, case["rate"]).tolist(), (b, t)
        alone = fn(x[b:b + 1, :t], case["rate"])
        assert torch.equal(alone.indices[0], kept), b


def fastvid_cases(r):
    T = r.pick([1, 2, 3, 4, 5, 6, 8, 9, 13])
    P = r.pick([1, 3, 4, 6, 7, 9, 16, 20])
    # half the examples continuous (no specials, copies or D = 1), compared with the original
    clean = r.flip()
    spec = token_specs(r, n_choices=[T * P], specials=() if clean else SPECIALS,
                       duplicates=False if clean else None, min_d=2 if clean else 1)
    frames = None
    if spec["B"] and r.flip():
        frames = [r.randint(1, T) for _ in range(spec["B"])]
        frames = r.pick([frames, torch.tensor(frames), np.array(frames)])
    return {"spec": spec, "T": T, "P": P, "frames": frames,
            "variant": r.pick(["llava_onevision", "qwen2_5_vl"]),
            "saliency": r.pick(["rand", "ties", "nan"]), "seed": r.seed_value(),
            "global": r.pick([None, "float32", "same"]),
            "kw": {"r": r.pick([0.1, 0.3, 0.5, 1.0, 0.0]), "c": r.pick([8, 1, 2]),
                   "tau": r.pick([0.9, 0.84, -2.0, 2.0]), "ignore": r.pick([0.95, 0.5, 2.0]),
                   "d": r.pick([0.4, 0.0, 1.0]), "p": r.pick([4, 1, 2]),
                   "beta": r.pick([0.6, 0.0, 1.0]),
                   "k": r.pick([4, 7] if clean else [4, 1, 2, 7])}}


@fuzz(20)
@given(case=cases(fastvid_cases))
def test_fastvid_properties(case):
    """FastVID on any tokens (specials, duplicates, layouts), saliency (ties, NaN), global
    features or none, ragged frame counts and settings: per row unique ascending positions of
    the row's real frames, -1 and zero tokens past its length, inputs untouched, the row's
    result alone; on finite tokens every backend's positions (merged tokens within a dtype
    tolerance); on finite continuous tokens (no specials or copies, D > 1, k > 2: no density
    ties) the transliterated original's positions, one video at a time."""
    spec, T, P, kw = case["spec"], case["T"], case["P"], case["kw"]
    x = make_tokens(spec).unflatten(1, (T, P))
    B, _, _, D = x.shape
    g = _gen(case["seed"])
    sal = torch.rand(B, T, P, generator=g)
    if case["saliency"] == "ties":
        sal = torch.round(4 * sal)
    elif case["saliency"] == "nan" and sal.numel():
        sal.view(-1)[torch.randint(0, sal.numel(), (3,), generator=g)] = math.nan
    gf = None if case["global"] is None else torch.randn(B, T, 5, generator=g).to(
        torch.float32 if case["global"] == "float32" else x.dtype)
    frames = [T] * B if case["frames"] is None else [int(t) for t in case["frames"]]

    def call(be, v=x, s=sal, f=gf, fr=case["frames"]):
        return fastvid(v, s, global_features=f, variant=case["variant"], frames=fr, backend=be,
                       **kw)

    out = run_all(call, backends_for(T * P, D), x, sal, gf)
    ref = out["reference"]
    for be, res in out.items():
        what = f"fastvid[{be}]"
        L = res.indices.shape[1]
        assert tuple(res.tokens.shape) == (B, L, D) and res.tokens.dtype == x.dtype, what
        assert res.lengths.tolist() == [int((i >= 0).sum()) for i in res.indices], what
        if eligible_for_equality(x.flatten(1, 2)):
            assert torch.equal(res.indices, ref.indices), what
            tol = 1e-5 if x.dtype == torch.float32 else 2e-3
            torch.testing.assert_close(res.tokens.float(), ref.tokens.float(), rtol=tol,
                                       atol=tol)
    clean = (not spec["specials"] and spec["n_distinct"] is None and D > 1 and kw["k"] > 2)
    for b, t in enumerate(frames):
        n = int(ref.lengths[b])
        kept = ref.indices[b, :n]
        assert bool(((kept >= 0) & (kept < t * P)).all()), (b, kept)
        assert bool((kept[1:] > kept[:-1]).all()), (b, kept)
        assert bool((ref.indices[b, n:] == -1).all()) and not bool(ref.tokens[b, n:].any())
        alone = call(None, x[b:b + 1, :t], sal[b:b + 1, :t],
                     None if gf is None else gf[b:b + 1, :t], None)
        assert torch.equal(alone.indices[0], kept), b
        if clean:
            packed = x[b, :t].reshape(t * P, D).contiguous()
            names = {"r": "fastvid_retention_ratio", "c": "fastvid_DySeg_c",
                     "tau": "fastvid_DySeg_tau", "ignore": "fastvid_DySeg_ignore",
                     "d": "fastvid_STPrune_d", "p": "fastvid_DTM_p", "beta": "fastvid_DTM_beta",
                     "k": "knn"}
            args = {names[n_]: v for n_, v in kw.items()}
            if case["variant"] == "llava_onevision":
                args.pop("fastvid_DySeg_ignore")
                glob = packed.view(t, P, D).mean(1) if gf is None else gf[b, :t]
                _, want = fastvid_originals.fastvid_llava_onevision(
                    packed, sal[b, :t].reshape(-1), glob, t, dpc_dtype=torch.float64, **args)
            else:
                glob = packed.view(t, P, D).mean(1) if gf is None else gf[b, :t]
                _, want = fastvid_originals.fastvid_qwen2_5_vl(
                    packed, sal[b, :t], glob, t, dpc_dtype=torch.float64, **args)
            assert kept.tolist() == want.tolist(), (b, t)


# =========================================================================== PruneVid
def prunevid_cases(r):
    T = r.pick([1, 2, 3, 4, 5, 8])
    P = r.pick([1, 3, 7, 15, 16, 20])
    spec = token_specs(r, n_choices=[T * P], specials=FINITE_SPECIALS, min_d=2)
    frames = None
    if spec["B"] and r.flip():
        frames = [r.randint(1, T) for _ in range(spec["B"])]
        frames = r.pick([frames, torch.tensor(frames), np.array(frames)])
    return {"spec": spec, "T": T, "frames": frames,
            "kw": {"tau": r.pick([0.8, 0.5, 0.95, -1.0, 1.0]),
                   "temporal_ratio": r.pick([0.25, 0.5, 1.0, 0.0]),
                   "cluster_ratio": r.pick([0.5, 0.25, 1.0, 0.0]),
                   "k": r.pick([7, 3, 50]), "max_unclustered": r.pick([14, 0, 4])}}


@fuzz(10)
@given(case=cases(prunevid_cases))
def test_prunevid_properties(case):
    """PruneVid on any finite tokens (zero and tiny tokens, exact duplicates, layouts), settings
    and ragged frame counts: per row distinct positions of the row's real frames, whose frames
    never go back through the output, -1 and zero tokens past the length, inputs untouched, the
    row's result alone (bit for bit), the same positions and lengths on every backend (tokens
    within fp32 rounding); without exact ties (no duplicates or special tokens), the
    transliterated original's positions (one video at a time, float64)."""
    spec, T, kw = case["spec"], case["T"], case["kw"]
    x3 = make_tokens(spec)
    x = x3.unflatten(1, (T, x3.shape[1] // T))
    B, _, P, D = x.shape
    frames = [T] * B if case["frames"] is None else [int(t) for t in case["frames"]]
    # each group of tokens is one more DPC-kNN call: Triton's interpreter on the smaller videos
    out = run_all(lambda be: prunevid(x, frames=case["frames"], backend=be, **kw),
                  [be for be in backends_for(T * P, D) if be != "triton" or T * P <= 48], x)
    ref = out["reference"]
    for be, res in out.items():
        assert torch.equal(res.indices, ref.indices), be
        assert torch.equal(res.lengths, ref.lengths), be
        assert res.tokens.dtype == x.dtype and res.tokens.shape == (B, res.indices.shape[1], D)
        assert torch.allclose(res.tokens.float(), ref.tokens.float(), atol=1e-4, rtol=1e-3), be
    ties = spec["n_distinct"] is not None or spec["specials"]
    for b, t in enumerate(frames):
        n = int(ref.lengths[b])
        kept = ref.indices[b, :n]
        assert len(set(kept.tolist())) == n and bool(((kept >= 0) & (kept < t * P)).all())
        assert bool(((kept // P)[1:] >= (kept // P)[:-1]).all()), (b, kept)
        assert bool((ref.indices[b, n:] == -1).all()) and not bool(ref.tokens[b, n:].any())
        alone = prunevid(x[b:b + 1, :t], **kw)
        assert torch.equal(alone.indices[0], kept) and same_bits(alone.tokens[0],
                                                                 ref.tokens[b, :n]), b
        if not ties:
            packed = x[b, :t].reshape(1, t * P, D).double()
            _, want = prunevid_originals.merge_frames_dynamic(
                packed, t, threshold=kw["tau"], k=kw["k"],
                temporal_segment_ratio=kw["temporal_ratio"], cluster_ratio=kw["cluster_ratio"],
                max_unclustered=kw["max_unclustered"], dist_dtype=torch.float64)
            assert kept.tolist() == want.tolist(), (b, t)


# =========================================================================== HoliTom
def holitom_cases(r):
    T = r.pick([1, 2, 3, 4, 6, 9])
    P = r.pick([1, 3, 4, 6, 9])
    spec = token_specs(r, n_choices=[T * P], specials=FINITE_SPECIALS)
    frames = None
    if spec["B"] and r.flip():
        frames = [r.randint(1, T) for _ in range(spec["B"])]
        frames = r.pick([frames, torch.tensor(frames), np.array(frames)])
    return {"spec": spec, "T": T, "frames": frames, "repeat": r.pick([0.0, 0.5, 0.9]),
            "ties": r.flip(), "attn_seed": r.seed_value(),
            "kw": {"retain_ratio": r.pick([0.1, 0.25, 0.5, 1.0, 0.0]),
                   "tau": r.pick([0.8, 0.65, 1.0, -1.0]), "d": r.pick([0.0, 0.5, 1.0]),
                   "beta": r.pick([0.6, None]), "k": r.pick([7, 1, 3]),
                   "max_window": r.pick([1024, 2])}}


@fuzz(25)
@given(case=cases(holitom_cases))
def test_holitom_properties(case):
    """HoliTom on any finite tokens (frames repeated at a share of the positions, so that
    windows form), attention with or without ties, any setting and ragged frame counts: per row
    unique in-range positions of the row's real frames, -1 and zero tokens past them, the same
    result on every backend and for the row alone, inputs untouched; on fp32 tokens without
    duplicates and attention without ties, the transliterated original's positions (run on the
    fp32 tokens: the similarities decide in the input's dtype)."""
    spec, T, kw = case["spec"], case["T"], case["kw"]
    x = make_tokens(spec).unflatten(1, (T, spec["N"] // T))
    B, _, P, D = x.shape
    g = _gen(case["attn_seed"])
    keep = torch.rand(B, T, P, generator=g) < case["repeat"]
    if case["repeat"]:
        x = x.clone()           # (the drawn layout stays for cases without repeats)
        for t in range(1, T):
            x[:, t] = torch.where(keep[:, t, :, None], x[:, t - 1], x[:, t])
    attention = torch.rand(B, T, P, generator=g)
    if case["ties"]:
        attention = (attention * 3).round()
    frames = [T] * B if case["frames"] is None else [int(t) for t in case["frames"]]
    out = run_all(lambda be: holitom(x, attention, frames=case["frames"], backend=be, **kw),
                  backends_for(T * P, D), x, attention)
    ref = out["reference"]
    tol = 1e-5 if x.dtype == torch.float32 else 2e-3
    for be, res in out.items():
        assert torch.equal(res.indices, ref.indices) and torch.equal(res.lengths, ref.lengths), be
        assert res.tokens.dtype == x.dtype and res.tokens.shape == (B, ref.indices.shape[1], D)
        torch.testing.assert_close(res.tokens.float(), ref.tokens.float(), rtol=tol, atol=tol)
    compare = x.dtype == torch.float32 and not spec["specials"] and not case["ties"] \
        and spec["n_distinct"] is None and D >= 2
    for b, t in enumerate(frames):
        n = int(ref.lengths[b])
        kept = ref.indices[b, :n]
        assert len(set(kept.tolist())) == n and bool(((kept >= 0) & (kept < t * P)).all()), b
        assert bool((ref.indices[b, n:] == -1).all()) and not bool(ref.tokens[b, n:].any())
        alone = holitom(x[b:b + 1, :t], attention[b:b + 1, :t], **kw)
        assert torch.equal(alone.indices[0], kept), b
        torch.testing.assert_close(alone.tokens[0].float(), ref.tokens[b, :n].float(),
                                   rtol=tol, atol=tol)
        if compare:
            names = {"retain_ratio": "retain_ratio", "tau": "tau", "beta": "Beta", "d": "D",
                     "k": "K", "max_window": "max_window_size"}
            _, positions, _ = holitom_originals.holitom_video(
                x[b, :t], attention[b, :t], dist_dtype=torch.float64,
                **{names[k]: v for k, v in kw.items()})
            assert kept.tolist() == positions.tolist(), (b, t)


# =========================================================================== video ops
def dpc_cases(r, finite_only=False):
    spec = token_specs(r, specials=FINITE_SPECIALS if finite_only else SPECIALS,
                       min_d=2 if finite_only else 1)
    B, N = spec["B"], spec["N"]
    mask = masks(r, B, N)
    return {"spec": spec, "mask": mask, "C": r.part(candidate_count(mask, B, N)),
            "k": r.pick([1, 2, 4, 5, 7, 300])}


def check_dpc(r, B, N, C, mask, what):
    assert r.centers.shape == (B, C) and r.centers.dtype == torch.long, what
    assert r.assign.shape == (B, N) and r.assign.dtype == torch.long, what
    for b in range(B):
        cand = torch.ones(N, dtype=torch.bool) if mask is None else mask[b]
        centers = r.centers[b].tolist()
        assert len(set(centers)) == C and all(0 <= c < N and cand[c] for c in centers), \
            f"{what}: centers {centers} not unique candidates"
        assert ((r.assign[b] >= 0) == (cand & (C > 0))).all() and (r.assign[b] < C).all(), \
            f"{what}: assign {r.assign[b].tolist()}"
        assert r.assign[b, r.centers[b]].tolist() == list(range(C)), f"{what}: a centre's slot"
        for f in (r.density, r.delta, r.score):
            assert f.dtype == torch.float32 and (f[b][~cand] == 0).all(), what


@fuzz(30)
@given(case=cases(dpc_cases))
def test_dpc_knn_properties(case):
    """Any input (NaN, ±Inf, huge, tiny, zero tokens, duplicates, layouts, masks, k above N):
    unique candidate centres, each in its own slot, every candidate assigned, -1 elsewhere,
    inputs untouched, a batch row as the row alone; on finite inputs the reference's centres and
    assignment on every backend."""
    x, mask, C, k = make_tokens(case["spec"]), case["mask"], case["C"], case["k"]
    B, N, D = x.shape
    out = run_all(lambda be: ops.dpc_knn(x, C, k=k, mask=mask, backend=be),
                  backends_for(N, D), x, mask)
    for be, r in out.items():
        check_dpc(r, B, N, C, mask, f"dpc_knn[{be}]")
        for b in range(B):
            alone = ops.dpc_knn(x[b:b + 1], C, k=k, mask=row(mask, b), backend=be)
            assert torch.equal(alone.centers[0], r.centers[b]), f"dpc_knn[{be}] row {b}"
        if eligible_for_equality(x):
            want = out["reference"]
            assert torch.equal(r.centers, want.centers), f"dpc_knn[{be}] centers"
            assert torch.equal(r.assign, want.assign), f"dpc_knn[{be}] assign"
            torch.testing.assert_close(r.delta, want.delta, rtol=1e-4, atol=1e-5)


def merge_cases(r):
    spec = token_specs(r, specials=FINITE_SPECIALS, b_choices=[1, 2, 3])
    B, N = spec["B"], spec["N"]
    return {"spec": spec, "mask": masks(r, B, N), "C": r.part(N),
            "centers_seed": r.seed_value(), "given": r.flip(), "weights": r.flip(),
            "metric": r.pick(["cosine", "l2"]), "include": r.flip(),
            "blend": r.pick([None, 0.0, 0.3, 0.6, 1.0]), "rule": r.pick(["clamp", "fixed"])}


@fuzz(25)
@given(case=cases(merge_cases))
def test_cluster_merge_properties(case):
    """Finite tokens, any centres, assignment given or computed, weights, masks and blends:
    indices are the centres, sizes the members' weight, every backend's tokens within a dtype
    tolerance of the reference's, the input's dtype, inputs untouched."""
    x, mask, C = make_tokens(case["spec"]), case["mask"], case["C"]
    B, N, D = x.shape
    g = _gen(case["centers_seed"])
    centers = torch.stack([torch.randperm(N, generator=g)[:C] for _ in range(B)])
    assign = torch.randint(-1, max(C, 1), (B, N), generator=g) if case["given"] and C else None
    weights = torch.rand(B, N, generator=g) * (torch.rand(B, N, generator=g) > 0.2) \
        if case["weights"] else None
    kw = dict(metric=case["metric"], mask=mask, weights=weights,
              include_centers=case["include"], blend=case["blend"], blend_rule=case["rule"])
    out = run_all(lambda be: ops.cluster_merge(x, centers, assign, backend=be, **kw),
                  backends_for(N, D), x, mask, centers, assign, weights)
    want = out["reference"]
    tol = 1e-5 if x.dtype == torch.float32 else 2e-3
    for be, r in out.items():
        assert r.tokens.dtype == x.dtype and r.tokens.shape == (B, C, D), be
        assert torch.equal(r.indices, centers), be
        if case["given"] or D >= 2:
            # (with D = 1 every cosine is ±1: a computed assignment is a rounding tie)
            torch.testing.assert_close(r.sizes, want.sizes, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r.tokens.float(), want.tokens.float(), rtol=tol, atol=tol)


def temporal_cases(r):
    spec = token_specs(r, specials=SPECIALS, b_choices=[1, 2], n_choices=[8, 6, 1, 12])
    T = r.pick([1, 2, 3, 4])
    return {"spec": spec, "T": T, "fill": r.pick([-math.inf, 255.0, 0.0]),
            "dycoke": r.flip()}


@fuzz(20)
@given(case=cases(temporal_cases))
def test_temporal_similarity_properties(case):
    """Any tokens (NaN and ±Inf give NaN, as the reference): every backend within 1e-5 of the
    reference, the fill where a frame has no reference, inputs untouched."""
    x = make_tokens(case["spec"])
    B, N, D = x.shape
    T = case["T"]
    P = N // T if N >= T else 1
    video = x[:, :T * P].reshape(B, T, P, D) if N >= T else x[:, :1].expand(B, T, 1, D)
    ref = [-1 if t % 4 == 0 else (t - t % 4 if t % 4 < 3 else t - 1) for t in range(T)] \
        if case["dycoke"] else None
    out = run_all(lambda be: ops.temporal_similarity(video, reference=ref, fill=case["fill"],
                                                     backend=be), backends_for(N, D), x)
    for be, got in out.items():
        assert got.shape == (B, T, P) and got.dtype == torch.float32, be
        assert (got[:, 0] == case["fill"]).all(), be
        torch.testing.assert_close(got, out["reference"], rtol=1e-5, atol=1e-5, equal_nan=True)


# =========================================================================== argument errors
class WorkStarted(AssertionError):
    pass


def no_backend_work():
    """Context: any backend op called raises :class:`WorkStarted` (checks must come first)."""
    import sys
    stack = ExitStack()
    for modname in ("visprune.reference", "visprune.triton_kernels", "visprune._ext"):
        mod = sys.modules.get(modname)
        if mod is None:
            continue
        for op in ("mi_scores", "greedy_select", "gather_compact", "prune", "dpc_knn",
                   "dpc_knn_varlen", "cluster_merge", "temporal_similarity"):
            if hasattr(mod, op):
                def spy(*a, _op=op, _m=modname, **k):
                    raise WorkStarted(f"{_m}.{_op} ran before the arguments were refused")
                stack.enter_context(mock.patch.object(mod, op, spy))
    return stack


B_, N_, M_, D_ = 2, 6, 3, 4


def _x(seed=0, B=B_, N=N_, D=D_):
    return torch.randn(B, N, D, generator=_gen(seed))


def _mask_with(counts):
    m = torch.zeros(len(counts), N_, dtype=torch.bool)
    for b, c in enumerate(counts):
        m[b, :c] = True
    return m


BAD_COUNTS = [("bool", True), ("np_bool", np.bool_(True)), ("float", 2.0),
              ("np_float", np.float64(2.0)), ("str", "2"), ("none", None),
              ("tensor_bool_0d", torch.tensor(True)), ("tensor_1elem", torch.tensor([2])),
              ("tensor_float_0d", torch.tensor(2.0)), ("tensor_2d", torch.tensor([[2]])),
              ("negative", -1)]

# (label, argument named, call(backend)); every call must be refused before any work.
ERRORS = []


def _err(label, name):
    def deco(fn):
        ERRORS.append(pytest.param(fn, name, id=label))
        return fn
    return deco


for _label, _v in BAD_COUNTS:
    _err(f"greedy-k-{_label}", "k")(
        lambda be, v=_v: ops.greedy_select(_x(), v, backend=be))
    _err(f"prune-keep-{_label}", "keep")(
        lambda be, v=_v: ops.prune(_x(), _x(1, N=M_), v, backend=be))
    if _label not in ("float", "np_float"):     # a float stage1_keep is a fraction
        _err(f"prune-stage1_keep-{_label}", "stage1_keep")(
            lambda be, v=_v: ops.prune(_x(), _x(1, N=M_), 1, stage1_keep=v, backend=be))
    if _label not in ("none",):
        _err(f"greedy-start-{_label}", "start")(
            lambda be, v=_v: ops.greedy_select(_x(), 2, start=v, backend=be))
    _err(f"holov-keep-{_label}", "keep")(
        lambda be, v=_v: holov(_x(), torch.rand(B_, N_), v, backend=be))
    _err(f"divprune-keep-{_label}", "k|keep")(
        lambda be, v=_v: divprune(_x(), v, backend=be))

    _err(f"dpc-num_centers-{_label}", "num_centers")(
        lambda be, v=_v: ops.dpc_knn(_x(), v, backend=be))
    if _label not in ("negative",):
        _err(f"dpc-k-{_label}", "k")(lambda be, v=_v: ops.dpc_knn(_x(), 2, k=v, backend=be))

_err("greedy-k-too-large", "k")(lambda be: ops.greedy_select(_x(), N_ + 1, backend=be))
_err("dpc-num_centers-over-N", "num_centers")(lambda be: ops.dpc_knn(_x(), N_ + 1, backend=be))
_err("dpc-num_centers-over-candidates", "num_centers")(
    lambda be: ops.dpc_knn(_x(), 3, mask=_mask_with([5, 2]), backend=be))
_err("dpc-k-zero", "k")(lambda be: ops.dpc_knn(_x(), 2, k=0, backend=be))
_err("dpc-mask-shape", "mask")(
    lambda be: ops.dpc_knn(_x(), 2, mask=torch.ones(B_, N_ + 1, dtype=torch.bool), backend=be))
_err("dpc-x-no-D", "x")(lambda be: ops.dpc_knn(_x(D=0), 2, backend=be))
_err("dpc-varlen-num_centers-over-segment", "num_centers")(
    lambda be: ops.dpc_knn_varlen(_x()[0], torch.tensor([0, 2, N_]), [3, 1], backend=be))
_err("dpc-varlen-cu_seqlens", "cu_seqlens")(
    lambda be: ops.dpc_knn_varlen(_x()[0], torch.tensor([0, 2, N_ + 1]), [1, 1], backend=be))
_err("merge-centers-dtype", "centers")(
    lambda be: ops.cluster_merge(_x(), torch.zeros(B_, 2), backend=be))
_err("merge-centers-range", "centers")(
    lambda be: ops.cluster_merge(_x(), torch.full((B_, 2), N_), backend=be))
_err("merge-centers-repeated", "centers")(
    lambda be: ops.cluster_merge(_x(), torch.zeros(B_, 2, dtype=torch.long), backend=be))
_err("merge-assign-slot", "assign")(
    lambda be: ops.cluster_merge(_x(), torch.tensor([[0, 1]] * B_), torch.full((B_, N_), 2),
                                 backend=be))
_err("merge-assign-shape", "assign")(
    lambda be: ops.cluster_merge(_x(), torch.tensor([[0, 1]] * B_),
                                 torch.zeros(B_, N_ - 1, dtype=torch.long), backend=be))
_err("merge-weights-negative", "weights")(
    lambda be: ops.cluster_merge(_x(), torch.tensor([[0, 1]] * B_), weights=-torch.ones(B_, N_),
                                 backend=be))
_err("merge-weights-nan", "weights")(
    lambda be: ops.cluster_merge(_x(), torch.tensor([[0, 1]] * B_),
                                 weights=torch.full((B_, N_), math.nan), backend=be))
_err("merge-blend", "blend")(
    lambda be: ops.cluster_merge(_x(), torch.tensor([[0, 1]] * B_), blend=-0.1, backend=be))
_err("merge-blend-bool", "blend")(
    lambda be: ops.cluster_merge(_x(), torch.tensor([[0, 1]] * B_), blend=True, backend=be))
_err("merge-blend_rule", "blend_rule")(
    lambda be: ops.cluster_merge(_x(), torch.tensor([[0, 1]] * B_), blend=0.5, blend_rule="max",
                                 backend=be))
_err("temporal-video-shape", "video")(lambda be: ops.temporal_similarity(_x(), backend=be))
_err("temporal-reference-range", "reference")(
    lambda be: ops.temporal_similarity(_x()[None], reference=[-1, 2], backend=be))
_err("temporal-fill", "fill")(
    lambda be: ops.temporal_similarity(_x()[None], fill=None, backend=be))
_err("greedy-k-over-candidates", "k")(
    lambda be: ops.greedy_select(_x(), 3, mask=_mask_with([5, 2]), backend=be))
_err("greedy-k-over-empty-row", "k")(
    lambda be: ops.greedy_select(_x(), 1, mask=_mask_with([5, 0]), backend=be))
_err("greedy-start-out-of-range", "start")(lambda be: ops.greedy_select(_x(), 2, start=N_,
                                                                        backend=be))
_err("greedy-start-negative", "start")(lambda be: ops.greedy_select(_x(), 2, start=-1,
                                                                    backend=be))
_err("greedy-start-string", "start")(lambda be: ops.greedy_select(_x(), 2, start="first",
                                                                  backend=be))
_err("greedy-start-not-candidate", "start")(
    lambda be: ops.greedy_select(_x(), 2, start=5, mask=_mask_with([6, 4]), backend=be))
_err("greedy-objective", "objective")(lambda be: ops.greedy_select(_x(), 2, objective="maxmax",
                                                                   backend=be))
_err("greedy-objective-none", "objective")(lambda be: ops.greedy_select(_x(), 2, objective=None,
                                                                        backend=be))
_err("greedy-metric", "metric")(lambda be: ops.greedy_select(_x(), 2, metric="dot", backend=be))
_err("greedy-metric-upper", "metric")(lambda be: ops.greedy_select(_x(), 2, metric="L2",
                                                                   backend=be))
_err("greedy-x-list", "x")(lambda be: ops.greedy_select(_x().tolist(), 2, backend=be))
_err("greedy-x-2d", "x")(lambda be: ops.greedy_select(_x()[0], 2, backend=be))
_err("greedy-x-4d", "x")(lambda be: ops.greedy_select(_x()[None], 2, backend=be))
for _dt in (torch.float64, torch.int64, torch.bool, torch.complex64, torch.uint8):
    _err(f"greedy-x-{_dt}", "x")(lambda be, dt=_dt: ops.greedy_select(_x().to(dt), 2, backend=be))
_err("greedy-mask-uint8", "mask")(lambda be: ops.greedy_select(
    _x(), 2, mask=torch.ones(B_, N_, dtype=torch.uint8), backend=be))
_err("greedy-mask-float", "mask")(lambda be: ops.greedy_select(
    _x(), 2, mask=torch.ones(B_, N_), backend=be))
_err("greedy-mask-shape", "mask")(lambda be: ops.greedy_select(
    _x(), 2, mask=torch.ones(B_, N_ + 1, dtype=torch.bool), backend=be))
_err("greedy-mask-1d", "mask")(lambda be: ops.greedy_select(
    _x(), 2, mask=torch.ones(N_, dtype=torch.bool), backend=be))
_err("greedy-mask-3d", "mask")(lambda be: ops.greedy_select(
    _x(), 2, mask=torch.ones(B_, N_, 1, dtype=torch.bool), backend=be))
_err("greedy-mask-list", "mask")(lambda be: ops.greedy_select(
    _x(), 2, mask=[[True] * N_] * B_, backend=be))

_err("mi-visual-1d", "visual")(lambda be: ops.mi_scores(_x()[0, 0], _x(1, N=M_), backend=be))
_err("mi-visual-float64", "visual")(lambda be: ops.mi_scores(_x().double(), _x(1, N=M_).double(),
                                                             backend=be))
_err("mi-text-dtype", "text")(lambda be: ops.mi_scores(_x(), _x(1, N=M_).half(), backend=be))
_err("mi-text-D", "text")(lambda be: ops.mi_scores(_x(), _x(1, N=M_, D=D_ + 1), backend=be))
_err("mi-text-B", "text")(lambda be: ops.mi_scores(_x(), _x(1, B=B_ + 1, N=M_), backend=be))
_err("mi-text-empty", "text")(lambda be: ops.mi_scores(_x(), _x(1, N=0), backend=be))
_err("mi-text-none", "text")(lambda be: ops.mi_scores(_x(), None, backend=be))
_err("mi-text_mask-empty-row", "text_mask")(lambda be: ops.mi_scores(
    _x(), _x(1, N=M_), text_mask=torch.tensor([[True, False, False], [False] * 3]), backend=be))
_err("mi-text_mask-int", "text_mask")(lambda be: ops.mi_scores(
    _x(), _x(1, N=M_), text_mask=torch.ones(B_, M_, dtype=torch.int64), backend=be))
_err("mi-text_mask-shape", "text_mask")(lambda be: ops.mi_scores(
    _x(), _x(1, N=M_), text_mask=torch.ones(B_, N_, dtype=torch.bool), backend=be))
_err("mi-metric", "metric")(lambda be: ops.mi_scores(_x(), _x(1, N=M_), metric="dot", backend=be))

_X = _x()
_err("gather-neither", "index|mask")(lambda be: ops.gather_compact(_X, backend=be))
_err("gather-both", "index|mask")(lambda be: ops.gather_compact(
    _X, torch.tensor([[0], [1]]), mask=_mask_with([1, 1]), backend=be))
for _dt in (torch.uint16, torch.uint32, torch.uint64, torch.float32, torch.float16, torch.bool,
            torch.complex64):
    _err(f"gather-index-{_dt}", "index")(lambda be, dt=_dt: ops.gather_compact(
        _X, torch.tensor([[0, 2], [1, 3]]).to(dt), backend=be))
_err("gather-index-list", "index")(lambda be: ops.gather_compact(_X, [[0, 2], [1, 3]],
                                                                 backend=be))
_err("gather-index-1d", "index")(lambda be: ops.gather_compact(_X, torch.tensor([0, 2]),
                                                               backend=be))
_err("gather-index-3d", "index")(lambda be: ops.gather_compact(_X, torch.zeros(2, 2, 1).long(),
                                                               backend=be))
_err("gather-index-batch", "index")(lambda be: ops.gather_compact(_X, torch.tensor([[0, 2]]),
                                                                  backend=be))
_err("gather-index-too-large", "index")(lambda be: ops.gather_compact(
    _X, torch.tensor([[0, N_], [1, 2]]), backend=be))
_err("gather-index-negative", "index")(lambda be: ops.gather_compact(
    _X, torch.tensor([[0, -1], [1, 2]]), backend=be))
_err("gather-index-duplicate", "index")(lambda be: ops.gather_compact(
    _X, torch.tensor([[0, 1], [3, 3]]), backend=be))
_err("gather-index-duplicate-unsorted", "index")(lambda be: ops.gather_compact(
    _X, torch.tensor([[0, 1], [3, 3]]), sort=False, backend=be))
_err("gather-index-int8-negative", "index")(lambda be: ops.gather_compact(
    _X, torch.tensor([[0, -3], [1, 2]], dtype=torch.int8), backend=be))
_err("gather-mask-ragged", "mask")(lambda be: ops.gather_compact(_X, mask=_mask_with([2, 3]),
                                                                 backend=be))
_err("gather-mask-uint8", "mask")(lambda be: ops.gather_compact(
    _X, mask=_mask_with([2, 2]).to(torch.uint8), backend=be))
_err("gather-mask-shape", "mask")(lambda be: ops.gather_compact(
    _X, mask=torch.ones(B_, N_ + 1, dtype=torch.bool), backend=be))
_err("gather-sort-int", "sort")(lambda be: ops.gather_compact(_X, torch.tensor([[0], [1]]),
                                                              sort=1, backend=be))
_err("gather-sort-str", "sort")(lambda be: ops.gather_compact(_X, torch.tensor([[0], [1]]),
                                                              sort="yes", backend=be))
_err("gather-x-2d", "x")(lambda be: ops.gather_compact(_X[0], torch.tensor([[0], [1]]),
                                                       backend=be))
_err("gather-x-uint16", "x")(lambda be: ops.gather_compact(
    _X.to(torch.int32).to(torch.uint16), torch.tensor([[0], [1]]), backend=be))
_err("gather-x-list", "x")(lambda be: ops.gather_compact(_X.tolist(), torch.tensor([[0], [1]]),
                                                         backend=be))

_T = _x(1, N=M_)
_err("prune-stage1-over-N", "stage1_keep")(lambda be: ops.prune(_X, _T, 2, stage1_keep=N_ + 1,
                                                                backend=be))
_err("prune-stage1-below-keep", "stage1_keep")(lambda be: ops.prune(_X, _T, 4, stage1_keep=3,
                                                                    backend=be))
_err("prune-stage1-fraction-zero", "stage1_keep")(lambda be: ops.prune(_X, _T, 0,
                                                                       stage1_keep=0.0,
                                                                       backend=be))
_err("prune-stage1-fraction-big", "stage1_keep")(lambda be: ops.prune(_X, _T, 1, stage1_keep=1.5,
                                                                      backend=be))
_err("prune-stage1-fraction-nan", "stage1_keep")(lambda be: ops.prune(
    _X, _T, 1, stage1_keep=float("nan"), backend=be))
_err("prune-stage1-fraction-below-keep", "stage1_keep")(lambda be: ops.prune(
    _X, _T, 4, stage1_keep=0.5, backend=be))
_err("prune-stage1-over-candidates", "stage1_keep")(lambda be: ops.prune(
    _X, _T, 2, stage1_keep=4, mask=_mask_with([6, 3]), backend=be))
_err("prune-keep-over-N", "keep")(lambda be: ops.prune(_X, _T, N_ + 1, stage1_keep=N_,
                                                       backend=be))
_err("prune-mi_metric", "mi_metric")(lambda be: ops.prune(_X, _T, 2, mi_metric="dot", backend=be))
_err("prune-objective", "objective")(lambda be: ops.prune(_X, _T, 2, objective="sum", backend=be))
_err("prune-metric", "metric")(lambda be: ops.prune(_X, _T, 2, metric="l1", backend=be))
_err("prune-text-dtype", "text")(lambda be: ops.prune(_X, _T.half(), 2, backend=be))
_err("prune-mask-shape", "mask")(lambda be: ops.prune(
    _X, _T, 2, mask=torch.ones(B_, N_ - 1, dtype=torch.bool), backend=be))
_err("prune-text_mask-empty-row", "text_mask")(lambda be: ops.prune(
    _X, _T, 2, text_mask=torch.tensor([[True, False, False], [False] * 3]), backend=be))
_err("prune-validate-int", "validate")(lambda be: ops.prune(_X, _T, 2, validate=1, backend=be))
_err("greedy-validate-none", "validate")(lambda be: ops.greedy_select(_X, 2, validate=None,
                                                                      backend=be))

_err("holov-keep-over-N", "keep")(lambda be: holov(_X, torch.rand(B_, N_), N_ + 1, backend=be))
_err("holov-attn-shape", "attn")(lambda be: holov(_X, torch.rand(B_, N_ + 1), 2, backend=be))
_err("holov-num_crops-zero", "num_crops")(lambda be: holov(_X, torch.rand(B_, N_), 2, num_crops=0,
                                                           backend=be))
_err("holov-num_crops-float", "num_crops")(lambda be: holov(_X, torch.rand(B_, N_), 2,
                                                            num_crops=2.0, backend=be))
_err("holov-alpha-str", "alpha")(lambda be: holov(_X, torch.rand(B_, N_), 2, alpha="0.1",
                                                  backend=be))
_err("holov-redistribute-int", "redistribute")(lambda be: holov(_X, torch.rand(B_, N_), 2,
                                                                redistribute=1, backend=be))
_err("divprune-keep-over-N", "k|keep")(lambda be: divprune(_X, N_ + 1, backend=be))
_err("prumerge-cls_attn-shape", "cls_attn")(lambda be: prumerge(_X, torch.rand(B_, N_ + 1), _X,
                                                                backend=be))
_err("prumerge-keys-shape", "keys")(lambda be: prumerge(_X, torch.rand(B_, N_), _X[:, :-1],
                                                        backend=be))
_err("prumerge-iqr_scope", "iqr_scope")(lambda be: prumerge(_X, torch.rand(B_, N_), _X,
                                                            iqr_scope="all", backend=be))
_err("prumerge-plus-int", "plus")(lambda be: prumerge(_X, torch.rand(B_, N_), _X, plus=1,
                                                      backend=be))

_V = _x(2, N=2 * 3).unflatten(1, (2, 3))                       # [B, T=2, P=3, D]
for _label, _fn, _rate in (("evs", evs, 0.5), ("vidcom2", vidcom2, 0.5), ("dycoke", dycoke, 0.7)):
    _arg = "k" if _fn is dycoke else "q"
    for _bad_label, _bad in (("one", 1.0 if _fn is not dycoke else 1.5), ("negative", -0.25),
                             ("nan", float("nan")), ("str", "0.5"), ("bool", True),
                             ("none", None), ("tensor", torch.tensor(0.5))):
        _err(f"{_label}-{_arg}-{_bad_label}", _arg)(
            lambda be, f=_fn, v=_bad: f(_V, v, backend=be))
    _err(f"{_label}-video-3d", "video")(lambda be, f=_fn, v=_rate: f(_V[0], v, backend=be))
    _err(f"{_label}-video-int", "video")(lambda be, f=_fn, v=_rate: f(_V.long(), v, backend=be))
    _err(f"{_label}-video-no-tokens", "video")(
        lambda be, f=_fn, v=_rate: f(_V[:, :, :0], v, backend=be))
    _err(f"{_label}-video-no-frames", "frames")(
        lambda be, f=_fn, v=_rate: f(_V[:, :0], v, backend=be))
    for _bad_label, _bad in (("short", [2]), ("zero", [2, 0]), ("over-T", [3, 2]),
                             ("float", torch.tensor([2.0, 1.0])), ("str", ["2", "1"])):
        _err(f"{_label}-frames-{_bad_label}", "frames")(
            lambda be, f=_fn, v=_rate, fr=_bad: f(_V, v, frames=fr, backend=be))

_S = torch.rand(2, 2, 3)                                         # FastVID's saliency of _V
for _bad_label, _bad in (("one", 1.5), ("negative", -0.25), ("nan", float("nan")), ("str", "0.5"),
                         ("bool", True), ("tensor", torch.tensor(0.5))):
    for _arg in ("r", "d", "beta"):
        _err(f"fastvid-{_arg}-{_bad_label}", _arg)(
            lambda be, a=_arg, v=_bad: fastvid(_V, _S, backend=be, **{a: v}))
for _arg in ("tau", "ignore"):
    _err(f"fastvid-{_arg}-nan", _arg)(
        lambda be, a=_arg: fastvid(_V, _S, backend=be, **{a: float("nan")}))
for _arg in ("c", "p", "k"):
    for _bad_label, _bad in (("zero", 0), ("float", 2.0), ("bool", True)):
        _err(f"fastvid-{_arg}-{_bad_label}", _arg)(
            lambda be, a=_arg, v=_bad: fastvid(_V, _S, backend=be, **{a: v}))
_err("fastvid-variant", "variant")(lambda be: fastvid(_V, _S, variant="llava", backend=be))
_err("fastvid-video-3d", "video")(lambda be: fastvid(_V[0], _S, backend=be))
_err("fastvid-video-int", "video")(lambda be: fastvid(_V.long(), _S, backend=be))
_err("fastvid-saliency-shape", "saliency")(lambda be: fastvid(_V, _S[..., :2], backend=be))
_err("fastvid-saliency-int", "saliency")(lambda be: fastvid(_V, _S.long(), backend=be))
_err("fastvid-global_features-shape", "global_features")(
    lambda be: fastvid(_V, _S, global_features=_S[:1], backend=be))
_err("fastvid-global_features-no-channels", "global_features")(
    lambda be: fastvid(_V, _S, global_features=_S[..., :0], backend=be))
_err("fastvid-frames-over-T", "frames")(lambda be: fastvid(_V, _S, frames=[3, 2], backend=be))

_A = torch.rand(2, 2, 3)
for _bad_label, _bad in (("ratio-over-one", {"retain_ratio": 1.5}), ("tau-str", {"tau": "0.8"}),
                         ("beta-nan", {"beta": float("nan")}), ("d-negative", {"d": -0.5}),
                         ("k-zero", {"k": 0}), ("max_window-float", {"max_window": 2.0})):
    _err(f"holitom-{_bad_label}", next(iter(_bad)))(
        lambda be, kw=_bad: holitom(_V, _A, backend=be, **kw))
_err("holitom-attention-shape", "attention")(lambda be: holitom(_V, _A[:, :1], backend=be))
_err("holitom-attention-none", "attention")(lambda be: holitom(_V, None, backend=be))
_err("holitom-frames-over-T", "frames")(lambda be: holitom(_V, _A, frames=[3, 2], backend=be))


for _arg, _bads in (("tau", [1.5, -1.5, float("nan"), "0.8", None, True]),
                    ("temporal_ratio", [1.5, -0.25, float("nan"), "0.25"]),
                    ("cluster_ratio", [2.0, -0.5, None]), ("k", [0, 2.5, True, None]),
                    ("max_unclustered", [-1, 1.5, "14"])):
    for _i, _bad in enumerate(_bads):
        _err(f"prunevid-{_arg}-{_i}", _arg)(lambda be, a=_arg, v=_bad: prunevid(_V, backend=be,
                                                                             **{a: v}))
_err("prunevid-video-3d", "video")(lambda be: prunevid(_V[0], backend=be))
_err("prunevid-video-int", "video")(lambda be: prunevid(_V.long(), backend=be))
_err("prunevid-frames-over-T", "frames")(lambda be: prunevid(_V, frames=[3, 2], backend=be))
_err("prunevid-frames-zero", "frames")(lambda be: prunevid(_V, frames=[2, 0], backend=be))


@pytest.mark.parametrize("call,name", ERRORS)
def test_bad_arguments_are_refused_before_any_work(call, name):
    """A ValueError / TypeError naming the argument, raised before any backend op runs, and the
    same exception on every backend."""
    seen = {}
    for be in BACKENDS:
        with no_backend_work():
            try:
                call(be)
            except WorkStarted as e:
                raise AssertionError(f"[{be}] {e}") from None
            except (ValueError, TypeError) as e:
                assert re.search(rf"\b({name})\b", str(e)), (
                    f"[{be}] {type(e).__name__} does not name {name}: {e}")
                seen[be] = (type(e).__name__, str(e))
            except Exception as e:  # noqa: BLE001 - anything else breaks the contract
                raise AssertionError(f"[{be}] {type(e).__name__} instead of a ValueError / "
                                     f"TypeError naming {name}: {e}") from e
            else:
                raise AssertionError(f"[{be}] accepted the bad argument ({name})")
    assert len(set(seen.values())) == 1, f"backends disagree: {seen}"


@fuzz(12)
@given(B=st.integers(1, 3), N=st.integers(2, 40), D=st.integers(1, 8),
       k_value=st.integers(0, 40), seed=st.integers(0, 2**31 - 1),
       bad=st.sampled_from(BAD_COUNTS[:-1]))
def test_bad_counts_on_any_shape(B, N, D, k_value, seed, bad):
    """The refused count forms fail on any shape, before any work, naming the argument, and the
    accepted forms (NumPy and 0-d integer tensors) give the int's result."""
    x = torch.randn(B, N, D, generator=_gen(seed))
    k = min(k_value, N)
    guard = Untouched(x)
    for be in backends_for(N, D):
        with no_backend_work():
            with pytest.raises((TypeError, ValueError), match=r"\bk\b"):
                ops.greedy_select(x, bad[1], backend=be)
        want = ops.greedy_select(x, k, objective="maxsum", backend=be)
        for kind in ("numpy", "numpy32", "tensor", "tensor32"):
            got = ops.greedy_select(x, as_count(k, kind), objective="maxsum", backend=be)
            assert torch.equal(got, want), (be, kind)
        guard.check(be)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@fuzz(15)
@given(N=st.integers(2, 12), extra=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_compiled_ops_name_their_count_arguments(N, extra, seed):
    """torch.ops.visprune.* called directly (no Python value checks): too large a count names
    the argument that is too large (stage1_keep for prune, k for greedy_select)."""
    x = torch.randn(1, N, 4, generator=_gen(seed))
    t = torch.randn(1, 3, 4, generator=_gen(seed + 1))
    with pytest.raises(ValueError, match=r"\bstage1_keep\b"):
        torch.ops.visprune.prune(x, t, 1, N + extra, None, None, "l2", "maxsum", "cosine")
    with pytest.raises(ValueError, match=r"\bk\b"):
        torch.ops.visprune.greedy_select(x, N + extra, "maxmin", "cosine", None, -1)
    few = torch.zeros(1, N, dtype=torch.bool)
    few[0, 0] = True
    with pytest.raises(ValueError, match=r"\bstage1_keep\b"):
        torch.ops.visprune.prune(x, t, 1, 2, None, few, "l2", "maxsum", "cosine")
    with pytest.raises(ValueError, match=r"\bk\b"):
        torch.ops.visprune.greedy_select(x, 2, "maxmin", "cosine", few, -1)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
def test_available_backends_takes_a_device_string(device):
    """``available_backends`` with a string, a torch.device or None: a dict of every backend,
    and the string and torch.device forms agree."""
    got = visprune.available_backends(device)
    assert set(got) >= {"reference", "triton", "cuda", "cpu"} and got["reference"] == "ok"
    if device is not None:
        assert got == visprune.available_backends(torch.device("cpu"))
