"""HoloV's per-crop similarity statistics as one Triton kernel.

The tokens are cut into ``C`` contiguous raster crops (size ``N // C``, the first ``N % C`` one
larger).  Within a crop of ``M`` tokens, ``F = x / (||x|| + 1e-6)`` and ``S = F Fᵀ`` with the
diagonal zeroed; the kernel writes, for every token ``i``,

    ``V_i = Σ_j (S_ij - μ_i)² / (M-1)``,  ``μ_i = Σ_j S_ij / (M-1)``  (``j`` over the crop,
    the zeroed diagonal included).

``S`` is block-diagonal, so only the ``C`` blocks of ``M × M`` are ever computed (36 × 36 for
576 tokens and 16 crops), each tile with ``tl.dot`` in true fp32.  One program handles ``BR``
rows of one crop of one image; it makes two passes over the crop's columns (first ``μ``, then
the squared deviations), which keeps the variance free of cancellation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from visprune import common

from .utils import block, on_device

_EPS = tl.constexpr(common.HOLOV_EPS)      # the original's ``x / (x.norm() + 1e-6)``


@triton.jit
def _similarity_tile(p_x, o_r, m_r, o_c, m_c, D, s_xn, s_xd,
                     BR: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    """``S[r, c] = F_r · F_c`` for crop rows ``o_r`` and columns ``o_c``; 0 on the diagonal and
    outside the crop."""
    b_dot = tl.zeros([BR, BC], dtype=tl.float32)
    b_rsq = tl.zeros([BR], dtype=tl.float32)
    b_csq = tl.zeros([BC], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_r = tl.load(p_x + o_r[:, None] * s_xn + o_d[None, :] * s_xd,
                      mask=m_r[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_c = tl.load(p_x + o_c[:, None] * s_xn + o_d[None, :] * s_xd,
                      mask=m_c[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_dot = tl.dot(b_r, tl.trans(b_c), b_dot, input_precision="ieee")
        b_rsq += tl.sum(b_r * b_r, 1)
        b_csq += tl.sum(b_c * b_c, 1)
    b_s = b_dot / (tl.sqrt(b_rsq) + _EPS)[:, None] / (tl.sqrt(b_csq) + _EPS)[None, :]
    m_s = m_r[:, None] & m_c[None, :] & (o_r[:, None] != o_c[None, :])
    return tl.where(m_s, b_s, 0.)


@triton.jit
def _variance_kernel(x_ptr, v_ptr, D, base, rem, s_xb, s_xn, s_xd, s_vb, s_vn,
                     BR: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    start = i_c * base + tl.minimum(i_c, rem)
    M = base + (i_c < rem).to(tl.int64)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < M
    p_x = x_ptr + i_b * s_xb + start * s_xn
    b_sum = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, M, BC):
        o_c = c0 + tl.arange(0, BC)
        b_s = _similarity_tile(p_x, o_r, m_r, o_c, o_c < M, D, s_xn, s_xd, BR, BC, BD)
        b_sum += tl.sum(b_s, 1)
    m1 = tl.maximum(M - 1, 1).to(tl.float32)
    b_mu = b_sum / m1
    b_sq = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, M, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < M
        b_s = _similarity_tile(p_x, o_r, m_r, o_c, m_c, D, s_xn, s_xd, BR, BC, BD)
        b_dev = tl.where(m_c[None, :], b_s - b_mu[:, None], 0.)
        b_sq += tl.sum(b_dev * b_dev, 1)
    tl.store(v_ptr + i_b * s_vb + (start + o_r) * s_vn, b_sq / m1, mask=m_r)


@on_device
def similarity_variance(features: torch.Tensor, num_crops: int) -> torch.Tensor:
    """``float32[B, N]``: each token's ``V_i`` within its crop (see the module docstring).

    ``features[B, N, D]``: any float dtype and strides (loaded as fp32).
    """
    B, N, D = features.shape
    out = torch.zeros(B, N, dtype=torch.float32, device=features.device)
    base, rem = divmod(N, num_crops)
    largest = base + (rem > 0)
    if B == 0 or largest == 0:
        return out
    BR = BC = block(largest, 16, 64)                             # tl.dot needs dims >= 16
    # 32-wide slices of D, 8 warps for 32- and 64-row tiles: no register spills on sm_90 with
    # Triton 3.6 or 3.9 at any dtype (64-wide slices spill, and so do 4 warps at 32 rows).
    BD = block(D, 16, 32)
    grid = (triton.cdiv(largest, BR), num_crops, B)
    _variance_kernel[grid](features, out, D, base, rem, *features.stride(), *out.stride(),
                           BR=BR, BC=BC, BD=BD, num_warps=4 if BR == 16 else 8)
    return out
