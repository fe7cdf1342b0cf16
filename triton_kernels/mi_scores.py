"""Text–visual alignment scores against a per-batch text summary (no N×M matrix).

Both metrics reduce to a summary of the valid text tokens of a row:
``l2``:     ``-(1/M) Σ_j ||v - t_j||² = -(||v'||² - 2 v'·mean(t') + mean(||t'||²))`` with every
            token centred on the (rounded) text mean ``c``: ``v' = v - c``, ``t' = t - c``.
            Near ``c`` those subtractions are exact, so a large offset common to all tokens
            cancels exactly instead of in the rounding of the expanded square;
``cosine``: ``(1/M) Σ_j cos(v, t_j)  = v·mean(t̂) / max(||v||, eps)``.
``_text_summary_kernel`` reduces the text to the summary (for cosine after
``_token_stats_kernel`` gave the text tokens' inverse norms); ``_token_stats_kernel`` then reads
each visual token once and produces its score and, for the fused pipeline, the norm term the
greedy selection needs, so the visual tokens are read a single time for both.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .utils import COSINE, EPS, L2, METRICS, block, on_device, segment, warps

# _token_stats_kernel's SCORE is a metric code or NO_SCORE; NORM one of the three below.
NO_SCORE = tl.constexpr(2)
INV_NORM, SQ_NORM, NO_NORM = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _text_tile(t_ptr, st_b, st_m, st_d, mask_ptr, b, m0, M, o_d, m_d, HAS_MASK: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """Text tokens ``m0 .. m0+BLOCK_M`` of row ``b`` over the columns ``o_d`` as fp32, padding and
    out-of-range tokens zeroed, with their token indices and validity."""
    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    if HAS_MASK:
        m_m = m_m & (tl.load(mask_ptr + b * M + o_m, mask=o_m < M, other=0) != 0)
    b_t = tl.load(t_ptr + b * st_b + o_m[:, None] * st_m + o_d[None, :] * st_d,
                  mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    return b_t, o_m, m_m


@triton.jit
def _text_summary_kernel(t_ptr, st_b, st_m, st_d, mask_ptr, inv_ptr, summ_ptr, resid_ptr,
                         spread_ptr, M, D, HAS_MASK: tl.constexpr, METRIC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(b, block of D)`` over the valid text tokens of row ``b``: ``summ = mean_j t_j``
    (l2: the centre ``c``) or ``mean_j t̂_j`` (cosine, ``inv`` = the tokens' ``1/max(||t||, eps)``);
    for l2 also ``resid = mean_j (t_j - c)`` and this block's share of ``mean_j ||t_j - c||²``
    into ``spread[b, block]``."""
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    o_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        b_t, o_m, m_m = _text_tile(t_ptr, st_b, st_m, st_d, mask_ptr, b, m0, M, o_d, m_d,
                                   HAS_MASK, BLOCK_M)
        count += m_m.to(tl.float32)
        if METRIC == COSINE:
            b_t = b_t * tl.load(inv_ptr + b * M + o_m, mask=m_m, other=0.0)[:, None]
        acc += tl.sum(b_t, axis=0)
    n = tl.sum(count, axis=0)
    mean = acc / n
    tl.store(summ_ptr + b * D + o_d, mean, mask=m_d)
    if METRIC == L2:
        resid = tl.zeros([BLOCK_D], dtype=tl.float32)
        spread = tl.zeros([BLOCK_M], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            b_t, _, m_m = _text_tile(t_ptr, st_b, st_m, st_d, mask_ptr, b, m0, M, o_d, m_d,
                                     HAS_MASK, BLOCK_M)
            dev = tl.where(m_m[:, None] & m_d[None, :], b_t - mean[None, :], 0.0)
            resid += tl.sum(dev, axis=0)
            spread += tl.sum(dev * dev, axis=1)
        tl.store(resid_ptr + b * D + o_d, resid / n, mask=m_d)
        tl.store(spread_ptr + b * tl.num_programs(1) + pd, tl.sum(spread, axis=0) / n)


@triton.jit
def _token_stats_kernel(x_ptr, sx_b, sx_n, sx_d, summ_ptr, resid_ptr, spread_ptr, num_spread,
                        score_ptr, norm_ptr, cu_ptr, N, D, SCORE: tl.constexpr,
                        NORM: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """One pass over ``x[b, block of N, :]``: the MI score (``SCORE``: COSINE, L2 or NO_SCORE)
    and a norm term (``NORM``: ``1/max(||x||, eps)``, ``||x||²`` or none).  Packed
    (``IS_VARLEN``, ``x[T, D]``): row ``b`` is segment ``b`` of ``cu_seqlens``, scored against
    text summary ``b``."""
    b = tl.program_id(0).to(tl.int64)
    bos, n = segment(cu_ptr, b, N, IS_VARLEN)
    o_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n
    o_d = tl.arange(0, BLOCK_D)
    if IS_VARLEN:
        p_x = x_ptr + bos * sx_n
    else:
        p_x = x_ptr + b * sx_b
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)     # v·summ (cosine) or ||v'||² - 2 v'·t̄' (l2)
    for d0 in range(0, D, BLOCK_D):
        m_d = (d0 + o_d) < D
        b_x = tl.load(p_x + o_n[:, None] * sx_n + (d0 + o_d)[None, :] * sx_d,
                      mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(b_x * b_x, axis=1)
        if SCORE != NO_SCORE:
            b_s = tl.load(summ_ptr + b * D + d0 + o_d, mask=m_d, other=0.0)
            if SCORE == COSINE:
                acc += tl.sum(b_x * b_s[None, :], axis=1)
            else:
                b_r = tl.load(resid_ptr + b * D + d0 + o_d, mask=m_d, other=0.0)
                dev = tl.where(m_d[None, :], b_x - b_s[None, :], 0.0)
                acc += tl.sum(dev * (dev - 2.0 * b_r[None, :]), axis=1)
    # NaN stays NaN (the GPU's max would drop it and give 1/EPS): a token with a NaN has a NaN
    # unit vector, as F.normalize gives it.
    inv = tl.where(sq == sq, 1.0 / tl.maximum(tl.sqrt(sq), EPS), float("nan"))
    if SCORE == COSINE:
        tl.store(score_ptr + bos + o_n, acc * inv, mask=m_n)
    if SCORE == L2:
        spread = tl.full([], 0.0, tl.float32)
        for p in range(0, num_spread):
            spread += tl.load(spread_ptr + b * num_spread + p)
        tl.store(score_ptr + bos + o_n, -(acc + spread), mask=m_n)
    if NORM == INV_NORM:
        tl.store(norm_ptr + bos + o_n, inv, mask=m_n)
    if NORM == SQ_NORM:
        tl.store(norm_ptr + bos + o_n, sq, mask=m_n)


def text_summary(text: torch.Tensor, text_mask: Optional[torch.Tensor], metric: str,
                 inv: Optional[torch.Tensor] = None):
    """``(summary, resid float32[B, D], spread float32[B, blocks])`` of the valid text tokens: the
    mean (l2) or mean unit vector (cosine); for l2 the mean deviation from that (rounded) mean and
    the spread around it, split over blocks of D.  ``inv``: the tokens' inverse norms for cosine,
    when a pass over them already gave them."""
    B, M, D = text.shape
    BLOCK_M, BLOCK_D = block(M, 1, 32), block(D, 16, 128)
    num_pd = triton.cdiv(D, BLOCK_D)
    if metric == "cosine" and inv is None:
        _, inv = token_stats(text, norm=metric)
    summ, resid = torch.empty(2, B, D, dtype=torch.float32, device=text.device)
    spread = torch.empty(B, num_pd, dtype=torch.float32, device=text.device)
    mask = text_mask.to(torch.int8).contiguous() if text_mask is not None else summ
    _text_summary_kernel[(B, num_pd)](
        text, *text.stride(), mask, inv if inv is not None else summ, summ, resid, spread, M, D,
        HAS_MASK=text_mask is not None, METRIC=METRICS[metric], BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D, num_warps=4)
    return summ, resid, spread


def token_stats(x: torch.Tensor, summary: Optional[Tuple[torch.Tensor, ...]] = None,
                score_metric: Optional[str] = None, norm: Optional[str] = None,
                cu_seqlens: Optional[torch.Tensor] = None, nmax: int = 0):
    """One read of ``x[B, N, D]``: ``(scores float32[B, N] | None, norms float32[B, N] | None)``.

    ``score_metric`` with ``summary`` from :func:`text_summary` gives MI scores; ``norm="cosine"``
    gives ``1/max(||x||, eps)`` and ``norm="l2"`` gives ``||x||²`` for the greedy distances.
    Packed: ``x[T, D]`` with ``cu_seqlens`` (int64 ``[B+1]``) and the longest segment ``nmax``
    gives ``[T]`` outputs, segment ``b`` scored against summary row ``b``.
    """
    if cu_seqlens is None:
        B, N, D = x.shape
        n, shape, strides, cu = N, (B, N), x.stride(), x
    else:
        (N, D), B, n = x.shape, cu_seqlens.numel() - 1, nmax
        shape, strides, cu = (N,), (0,) + x.stride(), cu_seqlens
    score = torch.empty(shape, dtype=torch.float32, device=x.device) if score_metric else None
    norms = torch.empty(shape, dtype=torch.float32, device=x.device) if norm else None
    summ, resid, spread = summary if summary is not None else (x, x, x)
    BLOCK_N, BLOCK_D = block(n, 1, 64), block(D, 16, 128)
    grid = (B, triton.cdiv(n, BLOCK_N))
    _token_stats_kernel[grid](
        x, *strides, summ, resid, spread, spread.shape[1] if summary is not None else 0,
        score if score is not None else x, norms if norms is not None else x, cu, N, D,
        SCORE=NO_SCORE.value if score is None else METRICS[score_metric],
        NORM=(NO_NORM if norms is None else INV_NORM if norm == "cosine" else SQ_NORM).value,
        IS_VARLEN=cu_seqlens is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=warps(BLOCK_N * BLOCK_D))
    return score, norms


@on_device
def mi_scores(visual, text, text_mask=None, metric="l2"):
    """``float32[B, N]`` alignment scores; see :func:`visprune.reference.mi_scores`."""
    B, N, _ = visual.shape
    if B == 0 or N == 0:
        return torch.empty(B, N, dtype=torch.float32, device=visual.device)
    score, _ = token_stats(visual, text_summary(text, text_mask, metric), score_metric=metric)
    return score
