"""Text–visual alignment scores against a per-batch text summary (no N×M matrix).

Both metrics are linear in a summary of the valid text tokens of a row:
``l2``:     ``-(1/M) Σ_j ||v - t_j||² = -(||v||² - 2 v·mean(t) + mean(||t||²))``;
``cosine``: ``(1/M) Σ_j cos(v, t_j)  = v·mean(t̂) / max(||v||, eps)``.
``_token_stats_kernel`` gives the text tokens' norms and ``_text_summary_kernel`` reduces the
text to the summary; ``_token_stats_kernel`` then reads each visual token once and produces its score and, for the fused pipeline, the norm term the greedy
selection needs, so the visual tokens are read a single time for both.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .utils import EPS, METRICS, block, warps

NO_SCORE = 2        # _token_stats_kernel: norms only
INV_NORM, SQ_NORM, NO_NORM = 0, 1, 2


@triton.jit
def _text_summary_kernel(t_ptr, st_b, st_m, st_d, mask_ptr, norm_ptr, summ_ptr, tsq_ptr, M, D,
                         HAS_MASK: tl.constexpr, METRIC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(b, block of D)``: ``summ = mean_j t_j`` (l2) or ``mean_j t̂_j`` (cosine) over the
    valid text tokens of row ``b``, and ``tsq = mean_j ||t_j||²`` (l2).  ``norm`` holds the
    per-token ``||t||²`` (l2) or ``1/max(||t||, eps)`` (cosine) from ``_token_stats_kernel``."""
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    o_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    tsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < M
        if HAS_MASK:
            m_m = m_m & (tl.load(mask_ptr + b * M + o_m, mask=o_m < M, other=0) != 0)
        w = m_m.to(tl.float32)
        nrm = tl.load(norm_ptr + b * M + o_m, mask=m_m, other=0.0)
        count += w
        tsq += w * nrm
        b_t = tl.load(t_ptr + b * st_b + o_m[:, None] * st_m + o_d[None, :] * st_d,
                      mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        scale = w * nrm if METRIC == 0 else w
        acc += tl.sum(b_t * scale[:, None], axis=0)
    n = tl.sum(count, axis=0)
    tl.store(summ_ptr + b * D + o_d, acc / n, mask=m_d)
    if pd == 0:
        tl.store(tsq_ptr + b, tl.sum(tsq, axis=0) / n)


@triton.jit
def _token_stats_kernel(x_ptr, sx_b, sx_n, sx_d, summ_ptr, tsq_ptr, score_ptr, norm_ptr, N, D,
                        SCORE: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass over ``x[b, block of N, :]``: the MI score (``SCORE`` = 0 cosine, 1 l2, 2 none)
    and a norm term (``NORM`` = 0: ``1/max(||x||, eps)``, 1: ``||x||²``, 2: none)."""
    b = tl.program_id(0).to(tl.int64)
    o_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m_d = (d0 + o_d) < D
        b_x = tl.load(x_ptr + b * sx_b + o_n[:, None] * sx_n + (d0 + o_d)[None, :] * sx_d,
                      mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(b_x * b_x, axis=1)
        if SCORE != 2:
            b_s = tl.load(summ_ptr + b * D + d0 + o_d, mask=m_d, other=0.0)
            dot += tl.sum(b_x * b_s[None, :], axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(sq), EPS)
    if SCORE == 0:
        tl.store(score_ptr + b * N + o_n, dot * inv, mask=m_n)
    if SCORE == 1:
        tl.store(score_ptr + b * N + o_n, -(sq - 2.0 * dot + tl.load(tsq_ptr + b)), mask=m_n)
    if NORM == 0:
        tl.store(norm_ptr + b * N + o_n, inv, mask=m_n)
    if NORM == 1:
        tl.store(norm_ptr + b * N + o_n, sq, mask=m_n)


def text_summary(text: torch.Tensor, text_mask: Optional[torch.Tensor], metric: str):
    """``(summary float32[B, D], tsq float32[B])`` of the valid text tokens."""
    B, M, D = text.shape
    _, norms = token_stats(text, norm=metric)
    summ = torch.empty(B, D, dtype=torch.float32, device=text.device)
    tsq = torch.empty(B, dtype=torch.float32, device=text.device)
    mask = text_mask.to(torch.int8).contiguous() if text_mask is not None else norms
    BLOCK_M, BLOCK_D = block(M, 1, 32), block(D, 16, 128)
    _text_summary_kernel[(B, triton.cdiv(D, BLOCK_D))](
        text, *text.stride(), mask, norms, summ, tsq, M, D, HAS_MASK=text_mask is not None,
        METRIC=METRICS[metric], BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4)
    return summ, tsq


def token_stats(x: torch.Tensor, summary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                score_metric: Optional[str] = None, norm: Optional[str] = None):
    """One read of ``x[B, N, D]``: ``(scores float32[B, N] | None, norms float32[B, N] | None)``.

    ``score_metric`` with ``summary`` from :func:`text_summary` gives MI scores; ``norm="cosine"``
    gives ``1/max(||x||, eps)`` and ``norm="l2"`` gives ``||x||²`` for the greedy distances.
    """
    B, N, D = x.shape
    score = torch.empty(B, N, dtype=torch.float32, device=x.device) if score_metric else None
    norms = torch.empty(B, N, dtype=torch.float32, device=x.device) if norm else None
    summ, tsq = summary if summary is not None else (x, x)
    BLOCK_N, BLOCK_D = block(N, 1, 64), block(D, 16, 128)
    grid = (B, triton.cdiv(N, BLOCK_N))
    _token_stats_kernel[grid](
        x, *x.stride(), summ, tsq, score if score is not None else x,
        norms if norms is not None else x, N, D,
        SCORE=NO_SCORE if score is None else METRICS[score_metric],
        NORM=NO_NORM if norms is None else (INV_NORM if norm == "cosine" else SQ_NORM),
        EPS=EPS, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=warps(BLOCK_N * BLOCK_D))
    return score, norms


def mi_scores(visual, text, text_mask=None, metric="l2"):
    """``float32[B, N]`` alignment scores; see :func:`visprune.reference.mi_scores`."""
    B, N, _ = visual.shape
    if B == 0 or N == 0:
        return torch.empty(B, N, dtype=torch.float32, device=visual.device)
    score, _ = token_stats(visual, text_summary(text, text_mask, metric), score_metric=metric)
    return score
