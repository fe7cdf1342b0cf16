"""What every backend shares: the result type, the contract's constants and the stage-1 rule.

Production code (ops, backends, kernels, methods, integrations) takes these from here and never
from :mod:`visprune.reference`, which is the tests' oracle: a bug in shared code must not hide in
both the thing tested and the thing it is tested against.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

EPS = 1e-12            # cos(a, b) = a·b / (max(|a|, EPS) · max(|b|, EPS)), as F.normalize
NAN_COSINE = -3.0      # a NaN cosine ranks below every real one (|cos| <= 1), in index order
HOLOV_EPS = 1e-6       # HoloV's ``x / (||x|| + 1e-6)`` and its ``+ 1e-6`` denominators
# greedy_select's start as the compiled ops take it: an index >= 0, or one of these rules.
START_AUTO, START_LINEAR = -1, -2
START_CODES = {"auto": START_AUTO, "linear": START_LINEAR}
START_NAMES = {code: name for name, code in START_CODES.items()}


class PruneResult(NamedTuple):
    """Output of :func:`visprune.ops.prune` and of the methods.

    ``tokens[B, L, D]``: the kept (or merged) tokens; ``indices[B, L]`` int64: their input
    positions (-1 for a synthesised token or padding); ``lengths[B]`` int64: valid rows per item.
    """

    tokens: torch.Tensor
    indices: torch.Tensor
    lengths: torch.Tensor


class DPCResult(NamedTuple):
    """Output of :func:`visprune.ops.dpc_knn` (DPC-kNN density-peak clustering).

    ``centers[B, C]`` int64: the centre tokens, by descending ``score`` (ties → lowest index);
    ``assign[B, N]`` int64: each token's centre slot ``0..C-1`` (-1: not a candidate, or
    ``C == 0``); ``density``, ``delta``, ``score`` ``float32[B, N]``: ``ρ``, ``δ`` and ``ρ·δ``
    (0 where not a candidate).  The varlen form returns the same fields packed: ``centers[ΣC]``
    (global positions), the others ``[T]`` (``assign`` local to each segment's slots).
    """

    centers: torch.Tensor
    assign: torch.Tensor
    density: torch.Tensor
    delta: torch.Tensor
    score: torch.Tensor


class MergeResult(NamedTuple):
    """Output of :func:`visprune.ops.cluster_merge`: ``tokens[B, C, D]`` (the input's dtype),
    ``indices[B, C]`` int64 (each merged token's anchor, i.e. ``centers``) and ``sizes[B, C]``
    float32 (the weight merged into each: the member count without ``weights``)."""

    tokens: torch.Tensor
    indices: torch.Tensor
    sizes: torch.Tensor


@contextlib.contextmanager
def true_fp32():
    """IEEE fp32 matrix products inside the block (selection is discrete: TF32 rounding flips
    choices).  Changes torch's matmul precision only when it is not already ``"highest"`` and
    restores it on exit, so a caller that keeps the default never sees a global change.  The
    setting is process-wide: a caller who lowered it and runs visprune in several threads at once
    may see one thread restore it while another is inside the block."""
    old = torch.get_float32_matmul_precision()
    if old == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def stage1_count(n: int, stage1_keep: Union[int, float]) -> int:
    """Stage-1 survivors: an int as is; a float (Python or NumPy) fraction of ``n`` rounded
    half up."""
    if isinstance(stage1_keep, (float, np.floating)):
        return int(math.floor(stage1_keep * n + 0.5))
    return int(stage1_keep)


def descending_order(scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``int64[..., N]``: positions by descending score, ties → lowest index (a stable sort;
    ``torch.topk`` does not promise it).  NaN and ``-inf`` rank after every real score, and
    positions where ``mask`` is False after those."""
    lowest = torch.finfo(torch.float32).min
    key = torch.nan_to_num(scores.float(), nan=lowest, neginf=lowest)
    if mask is not None:
        key = key.masked_fill(~mask, -math.inf)
    return key.sort(dim=-1, descending=True, stable=True).indices


def topk_mask(scores: torch.Tensor, k: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``bool[B, N]``: True at the ``k`` highest scores of each row (ties → lowest index), and
    only where ``mask`` is True (a row with fewer candidates than ``k``, possible only without
    validation, keeps just its candidates)."""
    order = descending_order(scores, mask)[:, :k]
    top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    return top if mask is None else top & mask



# --------------------------------------------------------------------------- varlen (ragged) batches
def segment_ids(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``int64`` segment of each global position (``cu[b] <= p < cu[b+1]``), on the device and
    without a host read; clamped into ``[0, B)`` so that an unvalidated ``cu_seqlens`` never
    indexes outside a per-segment table."""
    B = cu_seqlens.numel() - 1
    seg = torch.searchsorted(cu_seqlens[1:].long().contiguous(), positions.long().contiguous(),
                             right=True)
    return seg.clamp_(0, max(B - 1, 0))


def stage1_counts(cu_seqlens: torch.Tensor, stage1_keep) -> torch.Tensor:
    """``int64[B]`` stage-1 survivors per segment on ``cu_seqlens``' device, without a host read:
    an int for every segment, a list of ints as given, or a float fraction of each segment's
    length rounded half up (:func:`stage1_count`'s rule, in float64 as Python computes it)."""
    dev = cu_seqlens.device
    B = cu_seqlens.numel() - 1
    if isinstance(stage1_keep, (list, tuple)):
        return torch.tensor(list(stage1_keep), dtype=torch.long, device=dev).reshape(B)
    if isinstance(stage1_keep, (float, np.floating)):
        n = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
        return torch.floor(float(stage1_keep) * n + 0.5).long()
    return torch.full((B,), int(stage1_keep), dtype=torch.long, device=dev)


def varlen_topk_mask(scores: torch.Tensor, cu_seqlens: torch.Tensor, k: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``bool[T]``: True at the ``k[b]`` highest scores of each segment ``b`` of ``scores[T]``,
    ranked as :func:`topk_mask` ranks a row (ties → lowest index, NaN and ``-inf`` after every real
    score, non-candidates last), and only where ``mask`` is True.  Two stable sorts of all ``T``
    scores (by score, then by segment), so one pass serves every segment."""
    T = scores.shape[0]
    if T == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    order = descending_order(scores[None], None if mask is None else mask[None])[0]
    seg, by_seg = segment_ids(cu_seqlens, order).sort(stable=True)
    order = order[by_seg]
    rank = torch.arange(T, device=scores.device) - cu_seqlens.long().clamp(0, T)[seg]
    # A scatter of the flags over the permutation `order`: no data-dependent size, no sync.
    top = torch.empty(T, dtype=torch.bool, device=scores.device).scatter_(
        0, order, rank < k.to(scores.device)[seg])
    return top if mask is None else top & mask


def varlen_counts(sorted_positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``int64[B+1]`` cumulative count of ``sorted_positions`` (ascending global positions) in
    each segment: ``out[b]`` = how many lie before ``cu[b]``."""
    return torch.searchsorted(sorted_positions.contiguous(), cu_seqlens.long().contiguous())
