"""Plain-PyTorch reference of every visprune op: the ground truth for tests.

Readable first: every op is written the way the method describes it, with an explicit
``[B, N, N]`` distance matrix and one Python iteration per greedy step (vectorised over the
batch); ``mi_scores`` in the text-summary form the contract states (each score a reduction of one
token with the summary, so identical tokens score identically).  Arguments are assumed to be validated by :mod:`visprune.ops`.

Numerical conventions shared by every backend (see ``README.md``):

* arithmetic in float32, whatever the input dtype; fp32 matrix products are true fp32 (no TF32);
* ``cos(a, b) = a·b / (max(|a|, eps) · max(|b|, eps))`` with ``eps = 1e-12`` (``F.normalize``),
  so a zero vector has cosine 0 with everything;
* a pairwise distance is clamped to ``[0, +inf]``: rounding can make ``1 - cos`` of two equal
  tokens slightly negative, and a NaN distance (from NaN/Inf tokens) counts as 0;
* every top-k / argmax breaks ties toward the lowest index.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .common import (EPS, DPCResult, MergeResult, PruneResult, descending_order, stage1_count,
                     topk_mask, true_fp32)

__all__ = ["mi_scores", "pairwise_distance", "greedy_select", "gather_compact", "prune",
           "greedy_select_varlen", "prune_varlen", "gather_compact_varlen", "received_attention",
           "dpc_distance", "dpc_knn", "dpc_knn_varlen", "nearest_center", "cluster_merge",
           "temporal_similarity", "PruneResult", "DPCResult", "MergeResult", "stage1_count",
           "descending_order", "topk_mask"]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous float32.  Contiguous because a reduction over ``D`` of a D-major view
    rounds bitwise-identical tokens differently by position, and exact duplicates must tie."""
    return x.float().contiguous()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(_fp32(x), dim=-1, eps=EPS)


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the last dim of ``values[B, N, M]`` restricted to ``mask[B, M]``."""
    if mask is None:
        return values.mean(-1)
    keep = mask[:, None, :]
    # masked_fill, not a 0/1 weight: a NaN/Inf in a padding token must not leak (NaN·0 = NaN).
    return values.masked_fill(~keep, 0.0).sum(-1) / keep.sum(-1)


def mi_scores(visual: torch.Tensor, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
              metric: str = "l2") -> torch.Tensor:
    """Text–visual alignment score of each visual token, ``float32[B, N]``; higher = better.

    ``l2``: ``-(1/M_b) Σ_j ||v_i - t_j||²``; ``cosine``: ``(1/M_b) Σ_j cos(v_i, t_j)``, the mean
    over the valid text tokens ``j`` of row ``b``.
    """
    # Both are linear in a summary of the valid text tokens (their mean unit vector; their mean
    # offset and spread around the text mean), so each score is a reduction over D of one token
    # with that summary: elementwise products summed per token, never a matrix product, whose
    # rounding can depend on a token's row position (identical tokens must score identically).
    t = _fp32(text)
    valid = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if text_mask is None \
        else text_mask
    n = valid.sum(1)[:, None, None]

    def mean(values):          # over the valid text tokens; padding (even NaN/Inf) cannot leak
        return values.masked_fill(~valid[..., None], 0.0).sum(1, keepdim=True) / n

    if metric == "cosine":
        return (_normalize(visual) * mean(_normalize(t))).sum(-1)
    # l2: centring on the text mean keeps a large common offset from cancelling in the rounding
    # of the expanded square: -mean_j ||v-t_j||² = -(||v'||² - 2 v'·mean(t') + mean(||t'||²)).
    center = mean(t)
    v, t = _fp32(visual) - center, t - center
    spread = mean((t * t).sum(-1, keepdim=True))
    return -((v * (v - 2 * mean(t))).sum(-1) + spread[..., 0])


def pairwise_distance(x: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """``float32[B, N, N]`` distances: ``1 - cos`` or squared L2, clamped to ``[0, inf]``.

    The Gram matrix is formed in float64 and rounded to float32: a float32 matrix product can
    round a product differently by the tokens' row and column positions (BLAS tile edges), and
    bitwise-identical tokens must get bitwise-identical distances so that exact ties go to the
    lowest index.  Rounded from float64, they agree except in the ~1e-9 of cases where a float32
    rounding boundary falls within float64 noise."""
    y = _normalize(x) if metric == "cosine" else _fp32(x)
    y64 = y.double()
    gram = (y64 @ y64.transpose(1, 2)).float()
    if metric == "cosine":
        d = 1.0 - gram
    else:
        sq = (y * y).sum(-1)
        d = sq[:, :, None] + sq[:, None, :] - 2.0 * gram
    return torch.where(d > 0, d, torch.zeros_like(d))      # also maps NaN to 0


def greedy_select(x: torch.Tensor, k: int, objective: str = "maxmin", metric: str = "cosine",
                  mask: Optional[torch.Tensor] = None, start: Union[str, int] = "auto") -> torch.Tensor:
    """Incremental greedy diverse subset, ``int64[B, k]`` in selection order.

    ``maxmin``: next = ``argmax_{i∉S} min_{s∈S} d(i, s)``; ``maxsum``: ``argmax_{i∉S} Σ_{s∈S} d(i, s)``.
    ``start="auto"``: maxmin starts at ``argmax_i min_{j≠i} d(i, j)`` (the most isolated
    candidate; ``+inf`` when it is the only one), maxsum at ``argmax_i Σ_j d(i, j)`` (``j`` over the
    candidates, ``d(i, i)`` included as computed, i.e. ~0).  ``start="linear"``: maxsum's rule
    for either objective (the kernels compute it in O(N·D) from the candidates' mean; here it is
    the pairwise sum that defines it).  An int starts every row there.
    """
    B, N, _ = x.shape
    out = torch.empty(B, k, dtype=torch.long, device=x.device)
    if k == 0:
        return out
    dist = pairwise_distance(x, metric)
    cand = torch.ones(B, N, dtype=torch.bool, device=x.device) if mask is None else mask.clone()
    neg_inf = torch.tensor(-math.inf, device=x.device)
    rows = torch.arange(B, device=x.device)

    if isinstance(start, int):
        s = torch.full((B,), start, dtype=torch.long, device=x.device)
    else:
        pair = cand[:, :, None] & cand[:, None, :]
        if objective == "maxmin" and start == "auto":
            eye = torch.eye(N, dtype=torch.bool, device=x.device)
            key = dist.masked_fill(~pair | eye, math.inf).min(-1).values
        else:
            key = dist.masked_fill(~pair, 0.0).sum(-1)
        s = torch.where(cand, key, neg_inf).argmax(-1)

    # Running min / sum of d(i, S) over the selected set; distances are >= 0, never NaN.
    run = torch.full((B, N), math.inf if objective == "maxmin" else 0.0, device=x.device)
    for t in range(k):
        out[:, t] = s
        cand[rows, s] = False
        d_s = dist[rows, s]                                              # [B, N]
        run = torch.minimum(run, d_s) if objective == "maxmin" else run + d_s
        if t + 1 < k:
            s = torch.where(cand, run, neg_inf).argmax(-1)
    return out


def gather_compact(x: torch.Tensor, index: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None, sort: bool = True):
    """Gather the kept rows: ``(tokens[B, K, D], indices[B, K] int64)``.

    With ``mask[B, N]`` the kept rows are the True ones, in order.  With ``index[B, K]`` they are
    those positions, ascending when ``sort`` else in the given order.
    """
    if mask is not None:
        B = mask.shape[0]
        index = mask.nonzero()[:, 1].reshape(B, int(mask[0].sum()) if B else 0)
    else:
        # sort() and clone() both give a new tensor: the caller's index is never returned.
        index = index.long().sort(dim=-1).values if sort else index.long().clone()
    # Rows are copied bit for bit: torch.gather rewrites the bits of a bf16 NaN on CPU, so
    # floating tokens go through an integer view of the same width (unless a gradient is needed).
    src = x if x.requires_grad or not x.dtype.is_floating_point else x.view(_BITS[x.element_size()])
    tokens = torch.gather(src, 1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    return (tokens if src is x else tokens.view(x.dtype)), index


def prune(visual: torch.Tensor, text: torch.Tensor, keep: int, stage1_keep: Union[int, float] = 0.8,
          text_mask: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
          mi_metric: str = "l2", objective: str = "maxsum", metric: str = "cosine") -> PruneResult:
    """TrimTokenator: keep the ``stage1_keep`` tokens best aligned with the text (``mi_scores``),
    then the ``keep`` most diverse of those (``greedy_select``), compacted in original order."""
    B, N, _ = visual.shape
    n1 = stage1_count(N, stage1_keep)
    survivors = topk_mask(mi_scores(visual, text, text_mask, mi_metric), n1, mask)
    chosen = greedy_select(visual, keep, objective=objective, metric=metric, mask=survivors)
    tokens, indices = gather_compact(visual, chosen, sort=True)
    lengths = torch.full((B,), keep, dtype=torch.long, device=visual.device)
    return PruneResult(tokens, indices, lengths)


# --------------------------------------------------------------------------- varlen (ragged) batches
# Segment b of a packed [T, D] tensor is rows [cu[b], cu[b+1]).  Each op is a loop over the
# segments calling the dense op above on that segment alone: the definition of the varlen ops.
def _segments(cu_seqlens: torch.Tensor):
    c = cu_seqlens.tolist()
    return list(zip(c[:-1], c[1:]))


def _segment_mask(mask: Optional[torch.Tensor], lo: int, hi: int) -> Optional[torch.Tensor]:
    return None if mask is None else mask[None, lo:hi]


def greedy_select_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, k, objective: str = "maxmin",
                         metric: str = "cosine", mask: Optional[torch.Tensor] = None,
                         start: Union[str, int] = "auto") -> torch.Tensor:
    """``int64[K]``: :func:`greedy_select` on each segment, its ``k[b]`` picks as global
    positions in selection order, segments one after another."""
    picks = [greedy_select(x[None, lo:hi], kb, objective, metric, _segment_mask(mask, lo, hi),
                           start)[0] + lo
             for (lo, hi), kb in zip(_segments(cu_seqlens), k) if kb > 0]
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long, device=x.device)


def prune_varlen(visual: torch.Tensor, cu_seqlens: torch.Tensor, text: torch.Tensor, keep,
                 stage1_keep: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, mi_metric: str = "l2",
                 objective: str = "maxsum", metric: str = "cosine") -> PruneResult:
    """:func:`prune` on each segment with its text row ``text[b]``: ``PruneResult(tokens[K, D],
    indices[K] global, lengths[B] = keep)``; ``stage1_keep`` is the survivor count per segment."""
    tokens, indices = [visual.new_empty(0, visual.shape[1])], [visual.new_empty(0, dtype=torch.long)]
    for b, ((lo, hi), kb) in enumerate(zip(_segments(cu_seqlens), keep)):
        if kb == 0:
            continue
        r = prune(visual[None, lo:hi], text[b:b + 1], kb, int(stage1_keep[b]),
                  None if text_mask is None else text_mask[b:b + 1], _segment_mask(mask, lo, hi),
                  mi_metric, objective, metric)
        tokens.append(r.tokens[0])
        indices.append(r.indices[0] + lo)
    lengths = torch.tensor(list(keep), dtype=torch.long, device=visual.device)
    return PruneResult(torch.cat(tokens), torch.cat(indices), lengths)


def gather_compact_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor,
                          index: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                          sort: bool = True):
    """:func:`gather_compact` on each segment: ``(tokens[K, D], indices[K] global,
    cu_seqlens_out[B+1] int64)``; a segment's entries of ``index`` are those in its range."""
    tokens, indices, counts = [x.new_empty(0, x.shape[1])], [x.new_empty(0, dtype=torch.long)], [0]
    for lo, hi in _segments(cu_seqlens):
        if mask is not None:
            t, i = gather_compact(x[None, lo:hi], mask=mask[None, lo:hi])
        else:
            mine = index[(index >= lo) & (index < hi)].long()
            t, i = gather_compact(x[None, lo:hi], (mine - lo)[None], sort=sort)
        tokens.append(t[0])
        indices.append(i[0] + lo)
        counts.append(counts[-1] + i.shape[1])
    return (torch.cat(tokens), torch.cat(indices),
            torch.tensor(counts, dtype=torch.long, device=x.device))


def received_attention(q: torch.Tensor, k: torch.Tensor, start: Union[int, torch.Tensor],
                       length: int, queries: Union[str, torch.Tensor] = "after",
                       heads: str = "max", key_mask: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None) -> torch.Tensor:
    """Attention received by the ``length`` keys at ``[start_b, start_b + length)``,
    ``float32[B, length]``, from the query rows ``queries`` (FastV, FitPrune).

    ``q[B, H, L, dh]`` are the last ``L`` of the ``Lk`` positions of ``k[B, Hkv, Lk, dh]`` (head
    ``h`` reads kv head ``h // (H / Hkv)``).  ``P_h = softmax(scale · q_h k_h^T)`` over the keys at
    or before each query's position with ``key_mask`` True; ``out[b, t] = Σ_{i ∈ Q_b} R_h
    P_h[i, start_b + t]`` with ``R`` the max or mean over heads.  Formed as the full
    ``[B, H, L, Lk]`` map, in float64.
    """
    B, H, L, dh = q.shape
    Lk = k.shape[2]
    dev = q.device
    scale = dh ** -0.5 if scale is None else scale
    start = torch.as_tensor(start, dtype=torch.long, device=dev).expand(B)
    kd = k.double().repeat_interleave(H // k.shape[1], dim=1)         # repeat_kv
    scores = scale * (q.double() @ kd.transpose(-1, -2))                # [B, H, L, Lk]

    pos = torch.arange(L, device=dev) + (Lk - L)                        # each query's key position
    allowed = (torch.arange(Lk, device=dev)[None, :] <= pos[:, None])[None]      # [1, L, Lk]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    prob = scores.masked_fill(~allowed[:, None], -math.inf).softmax(-1)
    prob = torch.where(allowed[:, None], prob, 0.0)                     # a row with no key: 0
    per_row = prob.amax(1) if heads == "max" else prob.mean(1)          # [B, L, Lk]

    valid = torch.ones(B, L, dtype=torch.bool, device=dev) if key_mask is None \
        else key_mask[:, Lk - L:]
    end = (start + length)[:, None]
    if isinstance(queries, torch.Tensor):
        rows = queries
    elif queries == "after":
        rows = valid & (pos[None] >= end)
    elif queries == "span":
        rows = valid & (pos[None] >= start[:, None]) & (pos[None] < end)
    else:                                                               # "last" valid row
        last = torch.where(valid, torch.arange(L, device=dev), -1).amax(1, keepdim=True) \
            if L else torch.full((B, 1), -1, device=dev)
        rows = torch.arange(L, device=dev)[None] == last

    cols = (start[:, None] + torch.arange(length, device=dev))[:, None, :].expand(B, L, length)
    received = torch.where(rows[..., None], per_row.gather(2, cols), 0.0)
    return received.sum(1).float()


# --------------------------------------------------------------------------- video: DPC-kNN, merge
def dpc_distance(x: torch.Tensor) -> torch.Tensor:
    """``float32[B, N, N]``: DPC-kNN's squared Euclidean distances, :func:`pairwise_distance`'s
    ``"l2"`` (not yet divided by ``D``) and exactly 0 between tokens that are equal element for
    element (a token and itself included), which rounding of the expanded square would miss."""
    B, N, D = x.shape
    d = pairwise_distance(x, "l2")
    if B * N == 0:
        return d
    same = torch.unique(_fp32(x).reshape(B * N, D), dim=0, return_inverse=True)[1].reshape(B, N)
    return d.masked_fill(same[:, :, None] == same[:, None, :], 0.0)


def dpc_knn(x: torch.Tensor, num_centers: int, k: int = 5,
            mask: Optional[torch.Tensor] = None) -> DPCResult:
    """Density-peak clustering (DPC-kNN) on the full ``[B, N, N]`` matrix; see ``README.md``.

    With ``e(i, j)`` the :func:`dpc_distance` and ``n`` the candidates of a row:
    ``m_i`` = the sum, in ascending order, of the ``min(k, n)`` smallest ``e(i, j)`` over the
    candidates ``j`` (``e(i, i) = 0`` among them), divided by ``min(k, n)·D``; density
    ``ρ_i = exp(-m_i)``; ``j`` is denser than ``i`` when ``m_j < m_i``, or ``m_j == m_i`` and
    ``j < i``; ``δ_i = sqrt(min_{j denser} e(i, j) / D)``, for the densest candidate
    ``sqrt(max_{j, l} e(j, l) / D)``; score ``ρ·δ``; the ``num_centers`` best scores (ties → lowest
    index, NaN last) are the centres; each candidate goes to its nearest centre (ties → lowest
    slot), each centre to its own slot.
    """
    B, N, D = x.shape
    dev = x.device
    cand = torch.ones(B, N, dtype=torch.bool, device=dev) if mask is None else mask
    dist = dpc_distance(x)
    pair = cand[:, :, None] & cand[:, None, :]
    keff = cand.sum(-1).clamp(max=k)
    near = dist.masked_fill(~pair, math.inf).sort(-1).values
    s = torch.zeros(B, N, device=dev)
    for t in range(min(k, N)):                      # ascending order, one term at a time
        s = torch.where(t < keff[:, None], s + near[:, :, t], s)
    m = s / (keff * D).clamp(min=1).float()[:, None]
    idx = torch.arange(N, device=dev)
    denser = cand[:, None, :] & ((m[:, None, :] < m[:, :, None])
                                 | ((m[:, None, :] == m[:, :, None]) & (idx[None, :] < idx[:, None])))
    top = dist.masked_fill(~pair, -math.inf).flatten(1).amax(-1) if N else dist.new_zeros(B)
    e = torch.where(denser.any(-1), dist.masked_fill(~denser, math.inf).amin(-1), top[:, None])
    zero = torch.zeros((), device=dev)
    density = torch.where(cand, torch.exp(-m), zero)
    delta = torch.where(cand, torch.sqrt(e / D), zero)
    score = torch.where(cand, density * delta, zero)
    centers = descending_order(score, cand)[:, :num_centers].contiguous()
    assign = _nearest_slot(dist, centers, cand)
    return DPCResult(centers, assign, density, delta, score)


def _nearest_slot(dist: torch.Tensor, centers: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """``int64[B, N]``: the slot of the nearest centre by ``dist[B, N, N]`` (torch's argmin:
    ties → lowest slot), each centre its own, -1 where ``cand`` is False or there is none."""
    B, N, _ = dist.shape
    C = centers.shape[1]
    if C == 0:
        return torch.full((B, N), -1, dtype=torch.long, device=dist.device)
    assign = dist.gather(2, centers[:, None, :].expand(B, N, C)).argmin(-1)
    assign.scatter_(1, centers, torch.arange(C, device=dist.device).expand(B, C).contiguous())
    return torch.where(cand, assign, -1)


def dpc_knn_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, num_centers, k: int = 5,
                   mask: Optional[torch.Tensor] = None) -> DPCResult:
    """:func:`dpc_knn` on each segment of a packed ``x[T, D]``: centres as global positions,
    segments one after another (``num_centers[b]`` each), per-token fields ``[T]`` (``assign``
    local to the segment's slots)."""
    T = x.shape[0]
    dev = x.device
    assign = torch.full((T,), -1, dtype=torch.long, device=dev)
    fields = [torch.zeros(T, device=dev) for _ in range(3)]
    centers = [torch.empty(0, dtype=torch.long, device=dev)]
    for (lo, hi), c in zip(_segments(cu_seqlens), num_centers):
        if hi == lo:
            continue
        r = dpc_knn(x[None, lo:hi], c, k, _segment_mask(mask, lo, hi))
        centers.append(r.centers[0] + lo)
        assign[lo:hi] = r.assign[0]
        for f, v in zip(fields, (r.density, r.delta, r.score)):
            f[lo:hi] = v[0]
    return DPCResult(torch.cat(centers), assign, *fields)


def nearest_center(x: torch.Tensor, centers: torch.Tensor, metric: str = "l2",
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``int64[B, N]``: each token's nearest centre slot by :func:`pairwise_distance` (ties →
    lowest slot), each centre its own slot, -1 where ``mask`` is False."""
    B, N, _ = x.shape
    cand = torch.ones(B, N, dtype=torch.bool, device=x.device) if mask is None else mask
    return _nearest_slot(pairwise_distance(x, metric), centers.long(), cand)


def cluster_merge(x: torch.Tensor, centers: torch.Tensor, assign: Optional[torch.Tensor] = None,
                  metric: str = "l2", mask: Optional[torch.Tensor] = None,
                  weights: Optional[torch.Tensor] = None, include_centers: bool = True,
                  blend: Optional[float] = None, blend_rule: str = "clamp") -> MergeResult:
    """One merged token per centre, computed in float64: ``MergeResult(tokens[B, C, D],
    indices = centers, sizes[B, C])``; see ``README.md``.

    Members of slot ``c``: the tokens with ``assign == c`` (:func:`nearest_center` by ``metric``
    when ``assign`` is None), ``mask`` True and weight > 0, the centres themselves only with
    ``include_centers``.  ``n_c = Σ w_j`` over them (``w = 1`` without ``weights``),
    ``mean_c = Σ w_j x_j / n_c``.  ``blend=None``: the token is ``mean_c``; else
    ``a·anchor + (1 - a)·mean_c`` with ``a = max(blend, 1/(n_c + 1))`` (``"clamp"``) or
    ``a = blend`` (``"fixed"``).  A slot without members gives its anchor ``x[centers]``.
    """
    B, N, D = x.shape
    C = centers.shape[1]
    centers = centers.long()
    if assign is None:
        assign = nearest_center(x, centers, metric, mask)
    else:
        assign = assign.long()
        if mask is not None:
            assign = torch.where(mask, assign, -1)
    w = torch.ones(B, N, dtype=torch.float64, device=x.device) if weights is None \
        else weights.double()
    member = (assign >= 0) & (w > 0)
    if not include_centers:
        member &= ~torch.zeros_like(member).scatter_(1, centers, True)
    slot = torch.where(member, assign, C)
    xs = x.double()
    part = torch.where(member[..., None], xs * w[..., None], 0.0)
    sums = xs.new_zeros(B, C + 1, D).scatter_add_(1, slot[..., None].expand(B, N, D), part)[:, :C]
    size = xs.new_zeros(B, C + 1).scatter_add_(1, slot, torch.where(member, w, 0.0))[:, :C]
    anchor = xs.gather(1, centers[..., None].expand(B, C, D))
    full = (size > 0)[..., None]
    mean = torch.where(full, sums / size.clamp(min=1e-300)[..., None], anchor)
    if blend is None:
        out = mean
    else:
        a = torch.full_like(size, float(blend))
        if blend_rule == "clamp":
            a = torch.maximum(a, 1.0 / (size + 1.0))
        a = torch.where(full[..., 0], a, 1.0)[..., None]
        out = a * anchor + (1.0 - a) * mean
    return MergeResult(out.to(x.dtype), centers.clone(), size.float())


def temporal_similarity(video: torch.Tensor, reference=None,
                        fill: float = -math.inf) -> torch.Tensor:
    """``float32[B, T, P]``: ``cos(video[b, t, p], video[b, ref[t], p])`` with ``ref[t] = t - 1``
    (or ``reference[t]``); ``fill`` where ``ref[t] < 0`` (frame 0 by default)."""
    B, T, P, D = video.shape
    ref = torch.arange(T, device=video.device) - 1 if reference is None \
        else torch.as_tensor(reference, device=video.device).long()
    y = _normalize(video)
    sim = (y * y[:, ref.clamp(min=0)]).sum(-1)
    return torch.where(ref[None, :, None] >= 0, sim, torch.tensor(float(fill), device=video.device))
