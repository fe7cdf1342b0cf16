"""The video ops with Triton: DPC-kNN density peaks, the nearest-centre merge, frame similarity.

DPC-kNN never forms the ``N×N`` matrix (see :func:`visprune.reference.dpc_knn` for the math):

* ``_knn_kernel``: one program per (row, block of tokens) runs over every column block of its
  row, ``tl.dot`` distance tiles (true fp32 for fp32 tokens), and keeps the ``k`` smallest
  distances of each token in registers (``k`` extractions of the tile's row minimum a tile,
  ``k`` is small) and its largest; it stores the mean neighbour distance ``m`` and that largest;
* ``_delta_kernel``: a second pass over the same tiles, the minimum over the denser columns
  (``m_j < m_i``, ties to the lower index); the densest token takes the row's largest distance;
* the centres are the top scores (a stable sort in the launcher), then ``_nearest_kernel``
  assigns every token to its nearest centre over tiles of centres (ties to the lowest slot).

Memory: ``O(N)`` per-token fields besides the tokens.  Tokens equal element for element are
at distance exactly 0 (a class label per token from ``torch.unique``), as in the reference.

The merge sorts the members by slot (a stable sort, so the sums run in token order) and sums each
slot's members in one program per (slot, block of D): deterministic, no atomics.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from visprune.common import descending_order, segment_ids

from .mi_scores import token_stats
from .utils import (COSINE, EPS, METRICS, block, clamp_distance, cosine, interpreting,
                    on_device, segment, tile_dots, warps)

BLOCK_TILE = 64           # tokens per side of a distance tile (columns; rows: _tile_rows)


@triton.jit
def _dpc_tile(p_x, o_i, m_i, sq_i, cls_i, o_j, m_j, sq_ptr, cls_ptr, bos, sx_n, sx_d, D,
              INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """DPC-kNN's squared distances of a tile: ``||x_i||² + ||x_j||² - 2 x_i·x_j`` clamped to
    ``[0, inf]``, exactly 0 between tokens of one class."""
    dots = tile_dots(p_x, o_i, m_i, o_j, m_j, sx_n, sx_d, D, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_D)
    sq_j = tl.load(sq_ptr + bos + o_j, mask=m_j, other=0.0)
    cls_j = tl.load(cls_ptr + bos + o_j, mask=m_j, other=-1)
    d = clamp_distance(sq_i[:, None] + sq_j[None, :] - 2.0 * dots)
    return tl.where(cls_i[:, None] == cls_j[None, :], 0.0, d)


@triton.jit
def _candidates(cand_ptr, bos, o, m, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        m = m & (tl.load(cand_ptr + bos + o, mask=m, other=0) != 0)
    return m


@triton.jit
def _row_base(x_ptr, sx_b, sx_n, b, bos, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        return x_ptr + bos * sx_n
    return x_ptr + b * sx_b


@triton.jit(do_not_specialize=["N"])
def _knn_kernel(x_ptr, sx_b, sx_n, sx_d, sq_ptr, cls_ptr, cand_ptr, m_ptr, top_ptr, cu_ptr, N, D,
                K: tl.constexpr, KP: tl.constexpr, HAS_MASK: tl.constexpr,
                IS_VARLEN: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(row b, block of tokens)``: ``m`` = the ascending sum of each token's
    ``min(K, candidates)`` smallest distances over the candidates (its own 0 first) divided by
    that count times ``D``, and ``top`` = its largest distance to a candidate."""
    b = tl.program_id(0).to(tl.int64)
    bos, n = segment(cu_ptr, b, N, IS_VARLEN)
    o_i = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < n
    p_x = _row_base(x_ptr, sx_b, sx_n, b, bos, IS_VARLEN)
    sq_i = tl.load(sq_ptr + bos + o_i, mask=m_i, other=0.0)
    cls_i = tl.load(cls_ptr + bos + o_i, mask=m_i, other=-2)
    o_k = tl.arange(0, KP)
    o_l = tl.arange(0, BLOCK_N)
    # K running smallest per token; the padding slots (KP > K) hold -inf so they are never the
    # largest, which is the one a smaller distance replaces.
    knn = tl.where(o_k[None, :] < K, float("inf"), float("-inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    top = tl.zeros([BLOCK_M], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_N):
        o_j = j0 + o_l
        m_j = _candidates(cand_ptr, bos, o_j, o_j < n, HAS_MASK)
        count += m_j.to(tl.int32)
        d = _dpc_tile(p_x, o_i, m_i, sq_i, cls_i, o_j, m_j, sq_ptr, cls_ptr, bos, sx_n, sx_d, D,
                      INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_D)
        top = tl.maximum(top, tl.max(tl.where(m_j[None, :], d, 0.0), axis=1))
        d = tl.where(m_j[None, :], d, float("inf"))
        for _ in tl.static_range(K):
            v, j = tl.min(d, axis=1, return_indices=True)
            worst, w = tl.max(knn, axis=1, return_indices=True)
            knn = tl.where((o_k[None, :] == w[:, None]) & (v < worst)[:, None], v[:, None], knn)
            d = tl.where(o_l[None, :] == j[:, None], float("inf"), d)
    keff = tl.minimum(tl.sum(count, axis=0), K)
    left = tl.where(o_k[None, :] < K, knn, float("inf"))
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in tl.static_range(K):
        v, j = tl.min(left, axis=1, return_indices=True)
        s = tl.where(t < keff, s + v, s)
        left = tl.where(o_k[None, :] == j[:, None], float("inf"), left)
    m = tl.div_rn(s, (tl.maximum(keff, 1) * D).to(tl.float32))
    tl.store(m_ptr + bos + o_i, m, mask=m_i)
    tl.store(top_ptr + bos + o_i, top, mask=m_i)


@triton.jit(do_not_specialize=["N"])
def _delta_kernel(x_ptr, sx_b, sx_n, sx_d, sq_ptr, cls_ptr, cand_ptr, m_ptr, top_ptr, rho_ptr,
                  delta_ptr, score_ptr, cu_ptr, N, D, HAS_MASK: tl.constexpr,
                  IS_VARLEN: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(row b, block of tokens)``: ``δ = sqrt(e / D)`` with ``e`` the distance to the
    nearest denser candidate (the row's largest distance for the densest), ``ρ = exp(-m)`` and
    the score ``ρ·δ``; 0 for the tokens that are not candidates."""
    b = tl.program_id(0).to(tl.int64)
    bos, n = segment(cu_ptr, b, N, IS_VARLEN)
    o_i = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < n
    c_i = _candidates(cand_ptr, bos, o_i, m_i, HAS_MASK)
    p_x = _row_base(x_ptr, sx_b, sx_n, b, bos, IS_VARLEN)
    sq_i = tl.load(sq_ptr + bos + o_i, mask=m_i, other=0.0)
    cls_i = tl.load(cls_ptr + bos + o_i, mask=m_i, other=-2)
    mm_i = tl.load(m_ptr + bos + o_i, mask=m_i, other=0.0)
    o_l = tl.arange(0, BLOCK_N)
    gmax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(0, n, BLOCK_N):
        o_j = j0 + o_l
        m_j = _candidates(cand_ptr, bos, o_j, o_j < n, HAS_MASK)
        gmax = tl.maximum(gmax, tl.load(top_ptr + bos + o_j, mask=m_j, other=0.0))
    e = tl.full([BLOCK_M], float("inf"), tl.float32)
    found = tl.zeros([BLOCK_M], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_N):
        o_j = j0 + o_l
        m_j = _candidates(cand_ptr, bos, o_j, o_j < n, HAS_MASK)
        d = _dpc_tile(p_x, o_i, m_i, sq_i, cls_i, o_j, m_j, sq_ptr, cls_ptr, bos, sx_n, sx_d, D,
                      INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_D)
        mm_j = tl.load(m_ptr + bos + o_j, mask=m_j, other=0.0)
        denser = m_j[None, :] & ((mm_j[None, :] < mm_i[:, None])
                                 | ((mm_j[None, :] == mm_i[:, None]) & (o_j[None, :] < o_i[:, None])))
        e = tl.minimum(e, tl.min(tl.where(denser, d, float("inf")), axis=1))
        found = tl.maximum(found, tl.max(denser.to(tl.int32), axis=1))
    e = tl.where(found > 0, e, tl.max(gmax, axis=0))
    delta = tl.sqrt_rn(tl.div_rn(e, tl.zeros([BLOCK_M], dtype=tl.float32) + D))
    rho = tl.exp(-mm_i)
    tl.store(rho_ptr + bos + o_i, tl.where(c_i, rho, 0.0), mask=m_i)
    tl.store(delta_ptr + bos + o_i, tl.where(c_i, delta, 0.0), mask=m_i)
    tl.store(score_ptr + bos + o_i, tl.where(c_i, rho * delta, 0.0), mask=m_i)


@triton.jit(do_not_specialize=["N", "C"])
def _nearest_kernel(x_ptr, sx_b, sx_n, sx_d, norm_ptr, cls_ptr, cand_ptr, ctr_ptr, cc_ptr,
                    own_ptr, out_ptr, cu_ptr, N, D, C, METRIC: tl.constexpr,
                    HAS_CLS: tl.constexpr, HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
                    INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Program ``(row b, block of tokens)``: the slot of each token's nearest centre (ties to the
    lowest slot), over tiles of the row's centres (``ctr``: positions within the row, ``C`` a row
    dense, ``cc[b] .. cc[b+1]`` packed); a centre's own slot (``own`` >= 0) for a centre, -1 for
    a token that is not a candidate or a row without centres.  ``norm``: squared norms (l2) or
    inverse norms (cosine); ``cls``: classes at distance 0 (DPC-kNN)."""
    b = tl.program_id(0).to(tl.int64)
    bos, n = segment(cu_ptr, b, N, IS_VARLEN)
    o_i = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < n
    c_i = _candidates(cand_ptr, bos, o_i, m_i, HAS_MASK)
    p_x = _row_base(x_ptr, sx_b, sx_n, b, bos, IS_VARLEN)
    if IS_VARLEN:
        c0 = tl.load(cc_ptr + b)
        nc = tl.load(cc_ptr + b + 1) - c0
    else:
        c0 = b * C
        nc = c0 * 0 + C
    n_i = tl.load(norm_ptr + bos + o_i, mask=m_i, other=0.0)
    cls_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_CLS:
        cls_i = tl.load(cls_ptr + bos + o_i, mask=m_i, other=-2)
    o_l = tl.arange(0, BLOCK_N)
    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    slot = tl.zeros([BLOCK_M], dtype=tl.int64)
    for s0 in range(0, nc, BLOCK_N):
        o_s = s0 + o_l
        m_s = o_s < nc
        o_j = tl.load(ctr_ptr + c0 + o_s, mask=m_s, other=0)
        dots = tile_dots(p_x, o_i, m_i, o_j, m_s, sx_n, sx_d, D, INTERPRETED, BLOCK_M, BLOCK_N,
                     BLOCK_D)
        n_j = tl.load(norm_ptr + bos + o_j, mask=m_s, other=0.0)
        if METRIC == COSINE:
            d = clamp_distance(1.0 - cosine(dots, n_i[:, None], n_j[None, :]))
        else:
            d = clamp_distance(n_i[:, None] + n_j[None, :] - 2.0 * dots)
        if HAS_CLS:
            cls_j = tl.load(cls_ptr + bos + o_j, mask=m_s, other=-1)
            d = tl.where(cls_i[:, None] == cls_j[None, :], 0.0, d)
        d = tl.where(m_s[None, :], d, float("inf"))
        v, j = tl.min(d, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = v < best       # strictly: an earlier tile holds the lower slots
        best = tl.where(better, v, best)
        slot = tl.where(better, s0 + j.to(tl.int64), slot)
    own = tl.load(own_ptr + bos + o_i, mask=m_i, other=-1)
    slot = tl.where(own >= 0, own, slot)
    slot = tl.where(c_i & (nc > 0), slot, -1)
    tl.store(out_ptr + bos + o_i, slot, mask=m_i)


@triton.jit
def _merge_kernel(x_ptr, sx_b, sx_n, sx_d, w_ptr, order_ptr, start_ptr, ctr_ptr, out_ptr,
                  size_ptr, N, D, C, blend, HAS_W: tl.constexpr, BLEND: tl.constexpr,
                  CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(slot b·C + c, block of D)``: the weighted mean of the slot's members
    ``order[start[s] .. start[s+1])`` (flat token positions ``b·N + i``, in token order), blended
    with the anchor ``x[b, ctr[s]]``; a slot without members gives the anchor."""
    s = tl.program_id(0).to(tl.int64)
    b = s // C
    o_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    lo = tl.load(start_ptr + s)
    hi = tl.load(start_ptr + s + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    size = tl.zeros([BLOCK_M], dtype=tl.float32)
    o_m = tl.arange(0, BLOCK_M)
    for r0 in range(lo, hi, BLOCK_M):
        m_m = (r0 + o_m) < hi
        tok = tl.load(order_ptr + r0 + o_m, mask=m_m, other=0)
        i = tok - b * N
        if HAS_W:
            w = tl.load(w_ptr + tok, mask=m_m, other=0.0)
        else:
            w = m_m.to(tl.float32)
        b_x = tl.load(x_ptr + b * sx_b + i[:, None] * sx_n + o_d[None, :] * sx_d,
                      mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b_x * w[:, None], axis=0)
        size += w
    n = tl.sum(size, axis=0)
    anchor = tl.load(x_ptr + b * sx_b + tl.load(ctr_ptr + s) * sx_n + o_d * sx_d, mask=m_d,
                     other=0.0).to(tl.float32)
    mean = tl.div_rn(acc, tl.maximum(n, 1e-30))
    if BLEND:
        a = tl.full([], blend, tl.float32)
        if CLAMP:
            a = tl.maximum(a, tl.div_rn(1.0, n + 1.0))
        out = a * anchor + (1.0 - a) * mean
    else:
        out = mean
    out = tl.where(n > 0, out, anchor)
    tl.store(out_ptr + s * D + o_d, out.to(out_ptr.dtype.element_ty), mask=m_d)
    if tl.program_id(1) == 0:
        tl.store(size_ptr + s, n)


@triton.jit
def _temporal_kernel(x_ptr, sx_b, sx_t, sx_p, sx_d, ref_ptr, out_ptr, T, P, D, fill,
                     BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(b·T + t, block of positions)``: ``cos(x[b, t, p], x[b, ref[t], p])``, one read
    of the two frames' blocks; ``fill`` where ``ref[t] < 0``."""
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    r = tl.load(ref_ptr + t).to(tl.int64)
    rr = tl.where(r >= 0, r, t)
    o_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    o_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
    sa = tl.zeros([BLOCK_P], dtype=tl.float32)
    sb = tl.zeros([BLOCK_P], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = m_p[:, None] & ((d0 + o_d) < D)[None, :]
        off = o_p[:, None] * sx_p + (d0 + o_d)[None, :] * sx_d
        a = tl.load(x_ptr + b * sx_b + t * sx_t + off, mask=m, other=0.0).to(tl.float32)
        c = tl.load(x_ptr + b * sx_b + rr * sx_t + off, mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(a * c, axis=1)
        sa += tl.sum(a * a, axis=1)
        sb += tl.sum(c * c, axis=1)
    # NaN stays NaN (a token with a NaN has a NaN unit vector, as F.normalize gives it)
    inv_a = tl.where(sa == sa, 1.0 / tl.maximum(tl.sqrt(sa), EPS), float("nan"))
    inv_b = tl.where(sb == sb, 1.0 / tl.maximum(tl.sqrt(sb), EPS), float("nan"))
    out = tl.where(r >= 0, cosine(dot, inv_a, inv_b), fill)
    tl.store(out_ptr + bt * P + o_p, out, mask=m_p)


# --------------------------------------------------------------------------- launchers
def _slice(x: torch.Tensor, D: int) -> int:
    """The width of the D slices of a distance tile: 64-wide for fp16 / bf16, 16-wide for fp32
    (its tiles hold twice the registers; 32-wide fp32 slices spill 24-52 B on sm_90)."""
    return block(D, 16, 16 if x.dtype == torch.float32 else 64)


def _tile_rows(x: torch.Tensor):
    """``(tokens per row block, warps)``: 64 with 8 warps, and 32 with 4 for fp32, whose 64-row
    tiles spill 12-32 B in the kNN, delta and nearest-centre kernels with Triton 3.6 on sm_90
    (32 rows with 8 warps: still 12 B in one nearest-centre variant)."""
    return (BLOCK_TILE // 2, 4) if x.dtype == torch.float32 else (BLOCK_TILE, 8)


def _classes(x2: torch.Tensor) -> torch.Tensor:
    """``int32[T]``: a label per token of ``x2[T, D]``, equal for tokens equal element for
    element (a token holding a NaN equals only itself)."""
    if x2.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int32, device=x2.device)
    return torch.unique(x2.float(), dim=0, return_inverse=True)[1].to(torch.int32)


def _layout(x, cu_seqlens, nmax):
    """``(B, N, n, strides, cu)`` of a dense ``x[B, N, D]`` or packed ``x[T, D]``."""
    if cu_seqlens is None:
        B, N, _ = x.shape
        return B, N, N, x.stride(), x
    return cu_seqlens.numel() - 1, x.shape[0], nmax, (0,) + x.stride(), cu_seqlens


def _dpc_fields(x, k, cand, cu_seqlens=None, nmax=0):
    """``(density, delta, score, sq, cls)`` per token, flat ``[B·N]`` or ``[T]``."""
    B, N, n, strides, cu = _layout(x, cu_seqlens, nmax)
    D = x.shape[-1]
    x3 = x if cu_seqlens is None else x[None]
    _, sq = token_stats(x3, norm="l2")
    sq = sq.reshape(-1)
    cls = _classes(x3.reshape(-1, D))
    T = sq.numel()
    # separate tensors: the op's outputs must not share storage
    m, top, rho, delta, score = (torch.empty(T, dtype=torch.float32, device=x.device)
                                 for _ in range(5))
    BLOCK_D, (BLOCK_M, num_warps) = _slice(x, D), _tile_rows(x)
    grid = (B, triton.cdiv(max(n, 1), BLOCK_M))
    common = dict(HAS_MASK=cand is not None, IS_VARLEN=cu_seqlens is not None,
                  INTERPRETED=interpreting(), BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                  num_warps=num_warps)
    cand_arg = cand if cand is not None else sq
    k = min(k, max(n, 1))     # no row has more candidates: the same result, fewer registers
    # The kNN tiles are half as wide: the k extractions per tile hold more of it in registers
    # (64-wide fp32 tiles spill 24-40 B on sm_90).
    _knn_kernel[grid](x, *strides, sq, cls, cand_arg, m, top, cu, N, D, K=k,
                      KP=triton.next_power_of_2(k), BLOCK_N=BLOCK_TILE // 2, **common)
    _delta_kernel[grid](x, *strides, sq, cls, cand_arg, m, top, rho, delta, score, cu, N, D,
                        BLOCK_N=BLOCK_TILE, **common)
    return rho, delta, score, sq, cls


def _nearest(x, norms, cls, cand, centers, cc, own, metric, cu_seqlens=None, nmax=0):
    """``int64`` slot per token (flat): :func:`_nearest_kernel` over the row's centres."""
    B, N, n, strides, cu = _layout(x, cu_seqlens, nmax)
    D = x.shape[-1]
    out = torch.empty(norms.numel(), dtype=torch.long, device=x.device)
    C = centers.shape[1] if cu_seqlens is None else 0
    BLOCK_D = _slice(x, D)
    BLOCK_M, num_warps = _tile_rows(x)
    _nearest_kernel[(B, triton.cdiv(max(n, 1), BLOCK_M))](
        x, *strides, norms, cls if cls is not None else norms,
        cand if cand is not None else norms, centers, cc if cc is not None else centers, own, out,
        cu, N, D, C, METRIC=METRICS[metric], HAS_CLS=cls is not None, HAS_MASK=cand is not None,
        IS_VARLEN=cu_seqlens is not None, INTERPRETED=interpreting(), BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_TILE, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return out


def _own_slots(T, flat_centers, slots, device):
    """``int64[T]``: each centre's slot at its flat position, -1 elsewhere."""
    return torch.full((T,), -1, dtype=torch.long, device=device).scatter_(0, flat_centers, slots)


@on_device
def dpc_knn(x: torch.Tensor, num_centers: int, k: int = 5,
            mask: Optional[torch.Tensor] = None):
    """``(centers, assign, density, delta, score)``; see :func:`visprune.reference.dpc_knn`."""
    B, N, _ = x.shape
    dev = x.device
    if B * N == 0:
        z = torch.zeros(B, N, device=dev)
        return (torch.empty(B, num_centers, dtype=torch.long, device=dev),
                torch.full((B, N), -1, dtype=torch.long, device=dev), z, z.clone(), z.clone())
    cand = mask.reshape(-1).to(torch.int8).contiguous() if mask is not None else None
    rho, delta, score, sq, cls = _dpc_fields(x, k, cand)
    centers = descending_order(score.view(B, N), mask)[:, :num_centers].contiguous()
    slots = torch.arange(num_centers, device=dev).repeat(B)
    flat = (centers + torch.arange(B, device=dev)[:, None] * N).reshape(-1)
    own = _own_slots(B * N, flat, slots, dev)
    assign = _nearest(x, sq, cls, cand, centers, None, own, "l2")
    return (centers, assign.view(B, N), rho.view(B, N), delta.view(B, N), score.view(B, N))


@on_device
def dpc_knn_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, num_centers: List[int], k: int = 5,
                   mask: Optional[torch.Tensor] = None):
    """The packed form; see :func:`visprune.reference.dpc_knn_varlen`.  One launch of each kernel
    for every segment; the segment lengths are read once (the grid)."""
    T = x.shape[0]
    dev = x.device
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.long().contiguous()
    if T == 0 or B == 0:
        z = torch.zeros(T, device=dev)
        return (torch.empty(0, dtype=torch.long, device=dev),
                torch.full((T,), -1, dtype=torch.long, device=dev), z, z.clone(), z.clone())
    lo = cu[:-1].clamp(0, T)
    nmax = int((torch.maximum(cu[1:].clamp(0, T), lo) - lo).max())
    cand = mask.to(torch.int8).contiguous() if mask is not None else None
    rho, delta, score, sq, cls = _dpc_fields(x, k, cand, cu, nmax)
    # Each segment's best scores: one stable sort by score, then one by segment.
    counts = torch.tensor(list(num_centers), dtype=torch.long, device=dev)
    order = descending_order(score[None], None if mask is None else mask[None])[0]
    seg, by_seg = segment_ids(cu, order).sort(stable=True)
    order = order[by_seg]
    rank = torch.arange(T, device=dev) - lo[seg]
    take = rank < counts[seg]
    centers = order[take]
    slots = rank[take]
    cc = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    own = _own_slots(T, centers, slots, dev)
    local = (centers - lo[seg[take]]).contiguous()
    assign = _nearest(x, sq, cls, cand, local, cc, own, "l2", cu, nmax)
    return centers, assign, rho, delta, score


@on_device
def cluster_merge(x: torch.Tensor, centers: torch.Tensor, assign: Optional[torch.Tensor] = None,
                  metric: str = "l2", mask: Optional[torch.Tensor] = None,
                  weights: Optional[torch.Tensor] = None, include_centers: bool = True,
                  blend: Optional[float] = None, blend_rule: str = "clamp"):
    """``(tokens, indices, sizes)``; see :func:`visprune.reference.cluster_merge`."""
    B, N, D = x.shape
    C = centers.shape[1]
    dev = x.device
    indices = centers.long().clone()
    if B * C == 0:
        return (torch.empty(B, C, D, dtype=x.dtype, device=dev), indices,
                torch.zeros(B, C, device=dev))
    # Clamped, and slots outside [0, C) ignored: unvalidated values never lead outside x.
    centers = indices.clamp(0, N - 1).contiguous()
    flat = (centers + torch.arange(B, device=dev)[:, None] * N).reshape(-1)
    if assign is None:
        own = _own_slots(B * N, flat, torch.arange(C, device=dev).repeat(B), dev)
        cand = mask.reshape(-1).to(torch.int8).contiguous() if mask is not None else None
        _, norms = token_stats(x, norm=metric)
        assign = _nearest(x, norms.reshape(-1), None, cand, centers, None, own, metric)
    else:
        assign = assign.long().reshape(-1)
        if mask is not None:
            assign = torch.where(mask.reshape(-1), assign, -1)
    w = weights.float().reshape(-1).contiguous() if weights is not None else None
    member = (assign >= 0) & (assign < C)
    if w is not None:
        member &= w > 0
    if not include_centers:
        member &= torch.zeros_like(member).scatter_(0, flat, True).logical_not()
    rows = torch.arange(B * N, device=dev) // max(N, 1)
    key = torch.where(member, rows * C + assign, B * C)
    skey, order = key.sort(stable=True)
    start = torch.searchsorted(skey, torch.arange(B * C + 1, device=dev))
    out = torch.empty(B, C, D, dtype=x.dtype, device=dev)
    sizes = torch.empty(B, C, dtype=torch.float32, device=dev)
    BLOCK_D = block(D, 16, 128)
    _merge_kernel[(B * C, triton.cdiv(D, BLOCK_D))](
        x, *x.stride(), w if w is not None else sizes, order, start, centers, out, sizes, N, D, C,
        0.0 if blend is None else float(blend), HAS_W=w is not None, BLEND=blend is not None,
        CLAMP=blend_rule == "clamp", BLOCK_M=32, BLOCK_D=BLOCK_D, num_warps=4)
    return out, indices, sizes


@on_device
def temporal_similarity(video: torch.Tensor, reference: Optional[List[int]] = None,
                        fill: float = float("-inf")):
    """``float32[B, T, P]``; see :func:`visprune.reference.temporal_similarity`."""
    B, T, P, D = video.shape
    out = torch.empty(B, T, P, dtype=torch.float32, device=video.device)
    if out.numel() == 0:
        return out
    ref = torch.tensor(list(range(-1, T - 1)) if reference is None else list(reference),
                       dtype=torch.int32, device=video.device)
    BLOCK_P, BLOCK_D = block(P, 1, 32), block(D, 16, 128)
    _temporal_kernel[(B * T, triton.cdiv(P, BLOCK_P))](
        video, *video.stride(), ref, out, T, P, D, float(fill), BLOCK_P=BLOCK_P,
        BLOCK_D=BLOCK_D, num_warps=warps(BLOCK_P * BLOCK_D))
    return out
