"""PruMerge's merge step as one Triton kernel.

For each kept token ``i``: the ``K`` (=32) tokens ``j ≠ i`` whose keys are nearest by cosine
(ties → lowest index), then ``out_i = x_i + Σ_j attn_j · x_j``.  The original runs this as a
Python double loop over batch and kept tokens; here one program handles ``BQ`` kept tokens of
one image: it streams the keys in blocks of ``BN``, computes the ``[BQ, BN]`` cosine tile with
``tl.dot`` (true fp32), and keeps a running top-K per kept token.

Left tie-break without a second reduction: each candidate is packed into an int64 key, the
cosine's order-preserving int32 image in the high word and ``2³¹-1-j`` in the low word, so a
larger key means a larger cosine, then a lower index, and every key is unique.  The running
top-K is an unordered set of such keys; a block's keys enter it largest first while they beat
its minimum, which takes K steps for the first block and few afterwards.  (``tl.topk``'s bitonic
network would merge blocks too, but Triton's CPU interpreter runs it ~100× slower.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from visprune import common

from .utils import EPS, block, on_device

_NAN_COSINE = tl.constexpr(common.NAN_COSINE)   # a NaN cosine ranks below every real one
_NOT_A_CANDIDATE = tl.constexpr(-(2 ** 63 - 1))   # below every packed (cosine, index) key


@triton.jit
def _pack(cos, idx):
    """int64 keys ordered by ``cos`` (NaN lowest, -0.0 == +0.0), then by lower ``idx``."""
    cos = tl.where(cos != cos, _NAN_COSINE, cos)
    cos = tl.where(cos == 0.0, 0.0, cos)
    bits = cos.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)     # IEEE order as signed ints
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _merge_kernel(k_ptr, x_ptr, a_ptr, i_ptr, o_ptr,
                  N, L, DK, D,
                  s_kb, s_kn, s_kd, s_xb, s_xn, s_xd, s_ab, s_an, s_ib, s_il, s_ob, s_ol, s_od,
                  BQ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                  K: tl.constexpr):
    i_q = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_q = o_q < L
    b_row = tl.load(i_ptr + i_b * s_ib + o_q * s_il, mask=m_q, other=-1).to(tl.int64)
    m_row = b_row >= 0                                    # -1: a padding row, written as zeros
    b_row = tl.where(m_row, b_row, 0)
    p_k = k_ptr + i_b * s_kb
    p_x = x_ptr + i_b * s_xb

    # ||k_i|| of the kept tokens themselves
    b_qsq = tl.zeros([BQ], dtype=tl.float32)
    for d0 in range(0, DK, BK):
        o_d = d0 + tl.arange(0, BK)
        b_q = tl.load(p_k + b_row[:, None] * s_kn + o_d[None, :] * s_kd,
                      mask=m_row[:, None] & (o_d < DK)[None, :], other=0.).to(tl.float32)
        b_qsq += tl.sum(b_q * b_q, 1)
    b_qinv = 1.0 / tl.maximum(tl.sqrt(b_qsq), EPS)

    # The running top-K as an unordered set; its placeholders are distinct so that exactly one
    # entry (the minimum) is replaced per insertion.
    b_top = tl.full([BQ, K], _NOT_A_CANDIDATE, dtype=tl.int64)
    b_top += tl.arange(0, K)[None, :].to(tl.int64)
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < N
        b_dot = tl.zeros([BQ, BN], dtype=tl.float32)
        b_ksq = tl.zeros([BN], dtype=tl.float32)
        for d0 in range(0, DK, BK):
            o_d = d0 + tl.arange(0, BK)
            m_d = o_d < DK
            b_q = tl.load(p_k + b_row[:, None] * s_kn + o_d[None, :] * s_kd,
                          mask=m_row[:, None] & m_d[None, :], other=0.).to(tl.float32)
            b_k = tl.load(p_k + o_n[:, None].to(tl.int64) * s_kn + o_d[None, :] * s_kd,
                          mask=m_n[:, None] & m_d[None, :], other=0.).to(tl.float32)
            b_dot = tl.dot(b_q, tl.trans(b_k), b_dot, input_precision="ieee")
            b_ksq += tl.sum(b_k * b_k, 1)
        b_cos = b_dot * b_qinv[:, None] * (1.0 / tl.maximum(tl.sqrt(b_ksq), EPS))[None, :]
        m_cand = m_n[None, :] & (o_n[None, :].to(tl.int64) != b_row[:, None])
        b_key = tl.where(m_cand, _pack(b_cos, o_n[None, :]), _NOT_A_CANDIDATE)
        # Insert the tile's keys, largest first, while they beat the set's minimum.  Only keys
        # above the minimum at the start of the block can enter, so the loop runs that many
        # times (at most K; few once the set is good).
        b_lo = tl.min(b_top, 1)
        n_new = tl.minimum(tl.max(tl.sum((b_key > b_lo[:, None]).to(tl.int32), 1), 0), K)
        for _ in range(n_new):
            b_best = tl.max(b_key, 1)
            b_lo = tl.min(b_top, 1)
            m_ins = (b_top == b_lo[:, None]) & (b_best > b_lo)[:, None]
            b_top = tl.where(m_ins, b_best[:, None], b_top)
            b_key = tl.where(b_key == b_best[:, None], _NOT_A_CANDIDATE, b_key)

    b_low = b_top - ((b_top >> 32) << 32)                 # the low word, without unsigned constants
    b_nbr = 0x7FFFFFFF - b_low                            # fewer than K candidates: index >= N
    m_nbr = m_row[:, None] & (b_nbr < N)
    b_nbr = tl.where(m_nbr, b_nbr, 0)
    b_w = tl.load(a_ptr + i_b * s_ab + b_nbr * s_an, mask=m_nbr, other=0.).to(tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_self = tl.load(p_x + b_row[:, None] * s_xn + o_d[None, :] * s_xd,
                         mask=m_row[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_nb = tl.load(p_x + b_nbr[:, :, None] * s_xn + o_d[None, None, :] * s_xd,
                       mask=m_nbr[:, :, None] & m_d[None, None, :], other=0.).to(tl.float32)
        b_out = b_self + tl.sum(b_w[:, :, None] * b_nb, 1)
        tl.store(o_ptr + i_b * s_ob + o_q[:, None] * s_ol + o_d[None, :] * s_od,
                 b_out.to(o_ptr.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])


@on_device
def merge(keys: torch.Tensor, features: torch.Tensor, attn: torch.Tensor, index: torch.Tensor,
          out: torch.Tensor, *, neighbours: int = 32) -> torch.Tensor:
    """Write the merged tokens into ``out[B, L, D]`` (any strides) and return it.

    ``keys[B, N, Dk]``, ``features[B, N, D]``, ``attn[B, N]``: any float dtype and strides (loaded
    as fp32); ``index[B, L]`` int64 kept positions, -1 for padding rows (written as zeros).
    ``neighbours`` must be a power of two (the original's 32).
    """
    B, N, DK = keys.shape
    L, D = index.shape[1], features.shape[2]
    if neighbours & (neighbours - 1) or neighbours < 1:
        raise ValueError(f"neighbours must be a power of two, got {neighbours}")
    if B == 0 or L == 0:
        return out
    BQ, BN = 16, 64                                       # tl.dot needs every block dim >= 16
    # 32-wide key slices and [BQ, K, 16] gathers with 8 warps: no register spills on sm_90 with
    # Triton 3.6 or 3.9 at any dtype (64-wide key slices or 32-wide gathers spill for fp32).
    BK = block(DK, 16, 32)
    BD = block(D, 16, 16)                                # [BQ, K, BD] gathered per step
    grid = (triton.cdiv(L, BQ), B)
    _merge_kernel[grid](keys, features, attn, index, out, N, L, DK, D,
                        *keys.stride(), *features.stride(), *attn.stride(), *index.stride(),
                        *out.stride(), BQ=BQ, BN=BN, BK=BK, BD=BD, K=neighbours, num_warps=8)
    return out
