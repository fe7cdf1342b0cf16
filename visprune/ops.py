"""Public functional ops: argument checks and backend dispatch, nothing else.

Shapes: ``B`` batch, ``N`` visual tokens, ``M`` text tokens, ``D`` hidden size, ``k`` kept tokens.
Inputs may be fp32, fp16 or bf16, contiguous or not; they are never modified.  Every backend
(``None`` = the fastest available, ``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"``) returns
the same indices; see :mod:`visprune.reference` for the exact math.

Every op checks its arguments before any work (:mod:`visprune.checks`).  The checks that read
tensor values (mask counts, index ranges) cost one host-device sync per call; ``validate=False``
skips them, so that ``mi_scores`` / ``greedy_select`` / ``prune`` / the index form of
``gather_compact`` / ``received_attention`` run without a sync (CUDA-graph capture, indices visprune itself produced).
They are also skipped while ``torch.compile`` traces an op of the "triton", "cpu" or "cuda"
backend (opaque ops whose values the trace cannot read).  Without them the kernels stay
memory-safe, but invalid values give unspecified results instead of an error (the CPU kernels
still raise where they meet a bad value; Triton repeats in-range indices; the CUDA kernels record
-1 for a row that runs out of candidates).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from . import checks
from .backends import checked_name, module
from .common import (START_NAMES, DPCResult, MergeResult, PruneResult, stage1_count,
                     stage1_counts)

__all__ = ["mi_scores", "greedy_select", "gather_compact", "prune", "received_attention",
           "greedy_select_varlen", "prune_varlen", "gather_compact_varlen", "dpc_knn",
           "dpc_knn_varlen", "cluster_merge", "temporal_similarity", "PruneResult", "DPCResult",
           "MergeResult"]

def _values(validate: bool, backend: str) -> bool:
    """Whether to run the checks that read tensor values (see the module docstring).  While
    ``torch.compile`` traces, the backends that are opaque ops skip them (reading values would
    break the graph); the reference still runs them (at the cost of a graph break)."""
    checks.flag("validate", validate)
    return validate and not (backend != "reference" and torch.compiler.is_compiling())


# --------------------------------------------------------------------------- ops
def mi_scores(visual: torch.Tensor, text: torch.Tensor, *, text_mask: Optional[torch.Tensor] = None,
              metric: str = "l2", backend: Optional[str] = None,
              validate: bool = True) -> torch.Tensor:
    """Text–visual alignment score of each visual token: ``float32[B, N]``, higher = better aligned.

    Args:
        visual: ``[B, N, D]`` visual tokens.
        text: ``[B, M, D]`` text tokens (same ``B`` and ``D``).
        text_mask: optional ``bool[B, M]``, True = real text token; every row needs at least one.
        metric: ``"l2"``: ``-(1/M_b) Σ_j ||v_i - t_j||²``; ``"cosine"``: ``(1/M_b) Σ_j cos(v_i, t_j)``.
        backend: see the module docstring.
        validate: run the checks that read tensor values (one sync); see the module docstring.
    """
    checks.tensor("visual", visual, 3, "[B, N, D]")
    name = checked_name(backend, visual.device)
    text_mask, text_check = checks.text_args(visual, text, text_mask, metric)
    if text_check is not None and _values(validate, name):
        checks.candidates(None, 0, -1, extra=[text_check])
    return module(name).mi_scores(visual, text, text_mask, metric)


def greedy_select(x: torch.Tensor, k: int, *, objective: str = "maxmin", metric: str = "cosine",
                  mask: Optional[torch.Tensor] = None, start: Union[str, int] = "auto",
                  backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """Incremental greedy diverse subset selection: ``int64[B, k]`` indices in selection order.

    Args:
        x: ``[B, N, D]`` tokens.
        k: how many to select (``0 <= k <=`` candidates per row).
        objective: ``"maxmin"`` (farthest point, DivPrune) or ``"maxsum"`` (TrimTokenator stage 2).
        metric: distance ``"cosine"`` (``1 - cos``) or ``"l2"`` (squared Euclidean).
        mask: optional ``bool[B, N]``: only True tokens are candidates.
        start: ``"auto"`` (maxmin: the most isolated token; maxsum: the largest distance sum),
            ``"linear"`` (maxsum's rule for either objective: O(N·D) where maxmin's exact rule
            needs every pair; see the README) or an int index used for every row.
        backend: see the module docstring.
        validate: run the checks that read tensor values (one sync); see the module docstring.
    """
    checks.tensor("x", x, 3, "[B, N, D]")
    name = checked_name(backend, x.device)
    k, mask, start = checks.selection(x, k, objective, metric, mask, start)
    if _values(validate, name):
        checks.candidates(mask, k, start)
    return module(name).greedy_select(x, k, objective, metric, mask, START_NAMES.get(start, start))


def gather_compact(x: torch.Tensor, index: Optional[torch.Tensor] = None, *,
                   mask: Optional[torch.Tensor] = None, sort: bool = True,
                   backend: Optional[str] = None,
                   validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather the surviving rows into a contiguous ``(tokens[B, K, D], indices[B, K] int64)``.

    Exactly one of ``index[B, K]`` (integer positions, unique per row) or ``mask[B, N]`` (bool,
    the same number of True per row) is given.  With ``sort=True`` the kept rows keep their
    original order; the mask form is always in original order.  ``x`` may be fp32/fp16/bf16/fp64,
    a signed integer, uint8 or bool (``checks.GATHER_DTYPES``); ``tokens`` is differentiable
    w.r.t. ``x`` on every backend.
    The mask form reads the kept count from the device (its output shape depends on it), so only
    the index form is free of syncs with ``validate=False``.
    """
    name = checked_name(backend, checks.tensor("x", x, 3, "[B, N, D]",
                                               dtypes=checks.GATHER_DTYPES).device)
    checks.gather_args(x, index, mask, sort, _values(validate, name))
    return module(name).gather_compact(x, index, mask, sort)


def prune(visual: torch.Tensor, text: torch.Tensor, keep: int, *,
          stage1_keep: Union[int, float] = 0.8, text_mask: Optional[torch.Tensor] = None,
          mask: Optional[torch.Tensor] = None, mi_metric: str = "l2", objective: str = "maxsum",
          metric: str = "cosine", backend: Optional[str] = None,
          validate: bool = True) -> PruneResult:
    """The fused TrimTokenator pipeline: ``PruneResult(tokens[B, keep, D], indices, lengths)``.

    Stage 1 keeps the ``stage1_keep`` visual tokens (int count, or float fraction of N rounded
    half up) with the highest :func:`mi_scores`; stage 2 runs :func:`greedy_select` on those
    survivors; the ``keep`` chosen tokens are returned in original order (ascending ``indices``).
    ``mask[B, N]`` restricts both stages to its True tokens; a fraction stays a fraction of N, so
    with a mask it must not exceed the candidates of the sparsest row.  ``validate``: see the
    module docstring.
    """
    checks.tensor("visual", visual, 3, "[B, N, D]")
    name = checked_name(backend, visual.device)
    text_mask, text_check = checks.text_args(visual, text, text_mask, mi_metric, "mi_metric")
    B, N, _ = visual.shape
    keep = checks.count("keep", keep)
    stage1_keep = checks.fraction_or_count("stage1_keep", stage1_keep)
    n1 = stage1_count(N, stage1_keep)
    if not keep <= n1 <= N:
        raise ValueError(f"need keep <= stage1_keep <= N, got keep={keep}, "
                         f"stage1_keep={stage1_keep} ({n1} tokens), N={N}")
    _, mask, _ = checks.selection(visual, n1, objective, metric, mask, "auto", xname="visual",
                               kname="stage1_keep")
    if _values(validate, name):
        what = f"stage1_keep={stage1_keep}" + (f" ({n1} tokens)" if n1 != stage1_keep else "")
        checks.candidates(mask, n1, -1, what=what,
                          extra=[text_check] if text_check is not None else [])
    return module(name).prune(visual, text, keep, n1, text_mask, mask, mi_metric, objective, metric)


def received_attention(q: torch.Tensor, k: torch.Tensor, start: Union[int, torch.Tensor],
                       length: int, *, queries: Union[str, torch.Tensor] = "after",
                       heads: str = "max", key_mask: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None, backend: Optional[str] = None,
                       validate: bool = True) -> torch.Tensor:
    """Attention received by the ``length`` tokens at ``[start_b, start_b + length)``:
    ``float32[B, length]`` (FastV, FitPrune), without forming the ``[B, H, L, Lk]`` map.

    Args:
        q: ``[B, H, L, dh]`` post-RoPE queries: the last ``L`` of the ``Lk`` key positions.
        k: ``[B, Hkv, Lk, dh]`` post-RoPE keys, ``H % Hkv == 0`` (head ``h`` reads kv head
            ``h // (H / Hkv)``), ``Lk >= L``, same dtype as ``q``.
        start: int or integer tensor ``[B]``: the span's first key position per row.
        length: span length (``0 <= start_b``, ``start_b + length <= Lk``).
        queries: the query rows summed over: ``"after"`` (valid rows at or after the span's
            end), ``"span"`` (valid rows inside it), ``"last"`` (the last valid row), or a bool
            ``[B, L]`` mask used as given.  A row is valid where ``key_mask`` is True at its
            own position.
        heads: ``"max"`` or ``"mean"`` over heads, per query row, before the sum over rows.
        key_mask: optional ``bool[B, Lk]``, False = padding (never attended to).
        scale: the softmax's score scale, default ``dh ** -0.5``.
        backend: see the module docstring; the CUDA extension has no kernel for this op (CUDA
            tensors use "triton").
        validate: check the range of a start tensor (one sync); see the module docstring.
    """
    checks.tensor("q", q, 4, "[B, H, L, dh]")
    name = checked_name(backend, q.device)
    start, length, queries, key_mask, scale = checks.attention_args(
        q, k, start, length, queries, heads, key_mask, scale, _values(validate, name))
    if name == "cuda":
        raise NotImplementedError("received_attention has no kernel in the CUDA extension "
                                  "(visprune._C); use backend='triton' (the default for CUDA "
                                  "tensors) or 'reference'")
    return module(name).received_attention(q, k, start, length, queries, heads, key_mask, scale)


# --------------------------------------------------------------------------- varlen (ragged) batches
# A packed [T, D] tensor holds B segments: segment b is rows [cu_seqlens[b], cu_seqlens[b+1])
# (FlashAttention's varlen layout; Qwen2.5-VL's vision tower emits all images this way).  One
# call serves every segment; each segment's result is that of the dense op on it alone.  Counts
# (k, keep) may differ per segment: their total sizes the output, so a count tensor on the GPU
# is read once.  The Triton and CUDA launchers read the segment lengths once to size their grid
# (FlashAttention's max_seqlen); validate=False skips only the value checks.
def greedy_select_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, k, *,
                         objective: str = "maxmin", metric: str = "cosine",
                         mask: Optional[torch.Tensor] = None, start: Union[str, int] = "auto",
                         backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """:func:`greedy_select` on every segment of a packed batch: ``int64[K]``, ``K = Σ k_b``.

    Segment ``b``'s ``k_b`` picks (global row positions into ``x``, in selection order) sit at
    ``[ck[b], ck[b+1])`` with ``ck`` the cumulative sum of ``k``, and equal
    ``greedy_select(x[None, cu[b]:cu[b+1]], k_b, ...)[0] + cu[b]``.

    Args:
        x: ``[T, D]`` packed tokens.
        cu_seqlens: int32/int64 ``[B+1]`` on ``x``'s device: 0, non-decreasing, ``T`` last.
        k: an int for every segment, or ``B`` ints (sequence or 1-D integer tensor); an empty
            segment needs 0.
        objective, metric: as :func:`greedy_select`.
        mask: optional ``bool[T]``: only True rows are candidates.
        start: ``"auto"``, ``"linear"`` or an int index local to each segment (inside every
            segment with ``k_b > 0``).
        backend: see the module docstring.
        validate: run the checks that read tensor values (one sync); see the module docstring.
    """
    checks.tensor("x", x, 2, "[T, D]")
    name = checked_name(backend, x.device)
    _, k, mask, start = checks.varlen_selection(x, cu_seqlens, k, objective, metric, mask, start)
    if _values(validate, name):
        checks.varlen_values(x.shape[0], cu_seqlens, k, "k", mask, start, picks=k)
    return module(name).greedy_select_varlen(x, cu_seqlens, k, objective, metric, mask,
                                             START_NAMES.get(start, start))


def prune_varlen(visual: torch.Tensor, cu_seqlens: torch.Tensor, text: torch.Tensor, keep, *,
                 stage1_keep=0.8, text_mask: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, mi_metric: str = "l2",
                 objective: str = "maxsum", metric: str = "cosine",
                 backend: Optional[str] = None, validate: bool = True) -> PruneResult:
    """:func:`prune` on every segment of a packed batch: ``PruneResult(tokens[K, D], indices[K],
    lengths[B])`` with ``K = Σ keep_b``; segment ``b``'s kept rows (global positions, ascending)
    sit at ``[ck[b], ck[b+1])``, ``lengths = keep``.

    Args:
        visual: ``[T, D]`` packed visual tokens; ``cu_seqlens`` as :func:`greedy_select_varlen`.
        text: ``[B, M, D]`` text tokens of each segment (padded), ``text_mask`` ``bool[B, M]``.
        keep: an int for every segment or ``B`` ints.
        stage1_keep: an int count, a float fraction of each segment's length (rounded half up),
            or ``B`` ints; ``keep_b <= stage1_b <= n_b`` in every segment with ``keep_b > 0``
            (a segment that keeps nothing is not worked on).
        mask: optional ``bool[T]`` restricting both stages.
        mi_metric, objective, metric, backend, validate: as :func:`prune`.
    """
    checks.tensor("visual", visual, 2, "[T, D]")
    name = checked_name(backend, visual.device)
    B = checks.cu_seqlens(visual, cu_seqlens, "visual")
    checks.tensor("text", text, 3, "[B, M, D]")
    if text.shape[0] != B:
        raise ValueError(f"text must have shape [B, M, D] with B={B} segments (cu_seqlens has "
                         f"{B + 1} entries), got {tuple(text.shape)}")
    text_mask, text_check = checks.text_args(visual[None].expand(B, -1, -1), text, text_mask,
                                             mi_metric, "mi_metric")
    keep = checks.per_segment("keep", keep, B)
    stage1 = checks.varlen_stage1(keep, stage1_keep, B)
    _, _, mask, _ = checks.varlen_selection(visual, cu_seqlens, keep, objective, metric, mask,
                                            "auto", xname="visual", kname="keep")
    n1 = stage1_counts(cu_seqlens, stage1)
    if _values(validate, name):
        if text_check is not None:
            checks.candidates(None, 0, -1, extra=[text_check])
        checks.varlen_values(visual.shape[0], cu_seqlens, n1, "stage1_keep", mask, picks=keep,
                             at_least=keep)
    return module(name).prune_varlen(visual, cu_seqlens, text, keep, n1, text_mask, mask,
                                     mi_metric, objective, metric)


def gather_compact_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor,
                          index: Optional[torch.Tensor] = None, *,
                          mask: Optional[torch.Tensor] = None, sort: bool = True,
                          backend: Optional[str] = None, validate: bool = True
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gather_compact` on every segment of a packed batch: ``(tokens[K, D], indices[K]
    int64, cu_seqlens_out[B+1] int64)``.

    Exactly one of ``index[K]`` (global positions, unique, each segment's entries within its
    range and listed together, segments in order) or ``mask bool[T]``.  ``indices`` are the kept
    rows' global positions, ascending within each segment with ``sort=True`` or the mask form,
    else in the given order; ``cu_seqlens_out`` counts the kept rows per segment, cumulatively.
    ``tokens`` is differentiable w.r.t. ``x``.  The mask form reads its kept count (one sync).
    """
    name = checked_name(backend, checks.tensor("x", x, 2, "[T, D]",
                                               dtypes=checks.GATHER_DTYPES).device)
    checks.varlen_gather_args(x, cu_seqlens, index, mask, sort, _values(validate, name))
    return module(name).gather_compact_varlen(x, cu_seqlens, index, mask, sort)


# --------------------------------------------------------------------------- video
# Density-peak clustering, the cluster merge and the same-position similarity of frames (FastVID,
# PruneVid, HoliTom, EVS, DyCoke).  The CUDA extension has no kernels for them: CUDA tensors run
# the Triton ones.
def _video_op(name: str, op: str):
    if name == "cuda":
        raise NotImplementedError(f"{op} has no kernel in the CUDA extension (visprune._C); use "
                                  f"backend='triton' (the default for CUDA tensors) or "
                                  f"'reference'")
    return getattr(module(name), op)


def dpc_knn(x: torch.Tensor, num_centers: int, *, k: int = 5,
            mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
            validate: bool = True) -> DPCResult:
    """Density-peak clustering (DPC-kNN, as FastVID, PruneVid and HoliTom compute it):
    ``DPCResult(centers[B, C], assign[B, N], density, delta, score)``, without an ``N×N`` matrix.

    Distances are Euclidean scaled by ``1/sqrt(D)`` (the originals' ``cdist / sqrt(D)``), exactly 0
    between equal tokens.  Density ``ρ_i = exp(-mean of the k smallest squared distances of i)``
    (itself, at 0, among them; all candidates when a row has fewer than ``k``); ``δ_i`` = the
    distance to the nearest denser token, for the densest one the largest distance between any
    two; the ``num_centers`` best scores ``ρ·δ`` are the centres (descending, ties → lowest
    index), every token is assigned to its nearest centre (ties → lowest slot).  Deterministic:
    where the originals add ``1e-6·rand`` to break density ties, a density tie goes to the lowest
    index (denser).  See the README for the exact rule.

    Args:
        x: ``[B, N, D]`` tokens, ``D >= 1``.
        num_centers: ``C``, ``0 <= C <=`` candidates of every row.
        k: neighbours in the density, ``>= 1`` (FastVID 4, PruneVid and HoliTom 7).
        mask: optional ``bool[B, N]``: only True tokens take part; the others get ``assign`` -1
            and density, delta, score 0.
        backend, validate: see the module docstring (the Triton path syncs anyway: the labels
            of equal tokens come from ``torch.unique``, whose output size is data-dependent).
    """
    checks.tensor("x", x, 3, "[B, N, D]")
    name = checked_name(backend, x.device)
    num_centers, k, mask = checks.dpc_args(x, num_centers, k, mask)
    if _values(validate, name):
        checks.candidates(mask, num_centers, -1, what=f"num_centers={num_centers}")
    return DPCResult(*_video_op(name, "dpc_knn")(x, num_centers, k, mask))


def dpc_knn_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, num_centers, *, k: int = 5,
                   mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                   validate: bool = True) -> DPCResult:
    """:func:`dpc_knn` on every segment of a packed ``x[T, D]``: ``centers[ΣC]`` (global
    positions, segment ``b``'s ``C_b`` at ``[cC[b], cC[b+1])`` in descending score), and
    ``assign`` (slots local to the segment), ``density``, ``delta``, ``score`` ``[T]``; each
    segment's result is that of the dense op on it alone.

    Args:
        x: ``[T, D]``; ``cu_seqlens`` as :func:`greedy_select_varlen`.
        num_centers: an int for every segment or ``B`` ints, each at most the segment's
            candidates.
        k, mask (``bool[T]``), backend, validate: as :func:`dpc_knn`.
    """
    checks.tensor("x", x, 2, "[T, D]")
    name = checked_name(backend, x.device)
    num_centers, k, mask = checks.dpc_args(x, num_centers, k, mask, varlen_cu=cu_seqlens)
    if _values(validate, name):
        checks.varlen_values(x.shape[0], cu_seqlens, num_centers, "num_centers", mask)
    return DPCResult(*_video_op(name, "dpc_knn_varlen")(x, cu_seqlens, num_centers, k, mask))


def cluster_merge(x: torch.Tensor, centers: torch.Tensor, assign: Optional[torch.Tensor] = None,
                  *, metric: str = "l2", mask: Optional[torch.Tensor] = None,
                  weights: Optional[torch.Tensor] = None, include_centers: bool = True,
                  blend: Optional[float] = None, blend_rule: str = "clamp",
                  backend: Optional[str] = None, validate: bool = True) -> MergeResult:
    """One merged token per centre: ``MergeResult(tokens[B, C, D], indices[B, C], sizes[B, C])``,
    ``indices`` = the anchors (``centers``), ``tokens`` in ``x``'s dtype.

    Slot ``c``'s members are the tokens with ``assign == c``; without ``assign``, every token
    goes to its nearest centre by ``metric`` (``"l2"``: squared Euclidean, as DPC-kNN and
    HoliTom; ``"cosine"``: FastVID), ties → lowest slot, each centre to its own slot.  Only
    ``mask``-True tokens with weight > 0 are members, centres only with ``include_centers``.
    ``n_c = Σ weights`` of the members (their count without ``weights``); the merged token is
    their weighted mean, or with ``blend = β`` the anchor blend ``a·x[centers] + (1-a)·mean``
    with ``a = max(β, 1/(n_c+1))`` (``blend_rule="clamp"``, FastVID's
    ``clamp(1/(n+1), min=β)``) or ``a = β`` (``"fixed"``, HoliTom).  A slot without members
    gives its anchor.  PruneVid: ``cluster_merge(x, r.centers, r.assign)`` of a
    :func:`dpc_knn` result.

    Args:
        x: ``[B, N, D]`` tokens.
        centers: integer ``[B, C]``, unique per row, in ``[0, N)``.
        assign: optional integer ``[B, N]`` of slots in ``[-1, C)`` (-1: not merged).
        weights: optional ``[B, N]`` finite weights ``>= 0``.
        blend: None or ``β`` in ``[0, 1]``; blend_rule: ``"clamp"`` or ``"fixed"``.
        backend, validate: see the module docstring (the value checks: centres, slots,
            weights).
    """
    checks.tensor("x", x, 3, "[B, N, D]")
    name = checked_name(backend, x.device)
    mask, blend = checks.merge_args(x, centers, assign, metric, mask, weights, include_centers,
                                    blend, blend_rule, _values(validate, name))
    return MergeResult(*_video_op(name, "cluster_merge")(x, centers, assign, metric, mask,
                                                         weights, include_centers, blend,
                                                         blend_rule))


def temporal_similarity(video: torch.Tensor, *, reference: Optional[Sequence[int]] = None,
                        fill: float = -math.inf, backend: Optional[str] = None) -> torch.Tensor:
    """``float32[B, T, P]``: cosine of each token to the token at the same spatial position
    ``p`` in frame ``ref[t]`` (default the previous frame, ``t - 1``), read in one pass over
    the two frames; ``fill`` where a frame has no reference (``ref[t] == -1``; frame 0 by default),
    ``-inf`` by default: "nothing similar", so the token ranks as the most dissimilar (EVS keeps
    frame 0 whole with its ``1 - cos = 255``).

    Args:
        video: ``[B, T, P, D]`` tokens (``P`` positions per frame).
        reference: optional ``T`` ints in ``[-1, T)``: the frame each frame is compared with
            (DyCoke's groups of four: ``[-1, 0, 0, 2, -1, 4, 4, 6, ...]``).
        fill: the value where there is no reference.
        backend: see the module docstring.
    """
    checks.tensor("video", video, 4, "[B, T, P, D]")
    name = checked_name(backend, video.device)
    reference = checks.temporal_args(video, reference, fill)
    return _video_op(name, "temporal_similarity")(video, reference, float(fill))
