"""Attention received by a span of keys (FastV, FitPrune), flash-style: no ``[B, H, L, Lk]`` map.

Scores are in base 2: ``s = (q·k) · scale · log2(e)``, so ``P = 2^(s - lse)``.

* Pass 1, ``_row_lse_kernel`` (one program per ``(b, h, block of query rows)``): the log-sum-exp
  of each needed query row over its allowed keys, online over blocks of keys as in
  FlashAttention (running max ``m`` and normaliser ``l``), ``float32[B, H, L]``.  A row with no
  allowed key gets ``+inf``, so that its probabilities ``2^(s - inf)`` are 0, never NaN.
* Pass 2, ``_received_kernel`` (one program per ``(b, block of span columns, row split)``): for
  each block of query rows, the scores against the span's columns only, ``P = 2^(s - lse)``,
  reduced over heads per (row, column) (max, or sum then ``/H`` at the end), the rows outside
  ``Q_b`` zeroed, summed over rows into a register accumulator.  With several row splits each
  writes its partial sums, added afterwards in a fixed order: no atomics, the same result on
  every run.

The query rows are a per-row range ``[lo_b, hi_b)`` (``"after"``, ``"span"``, ``"last"``: also
valid at their own position; a bool mask: its first to last True row, ANDed with the mask only), so blocks of rows
outside it cost nothing in either pass, and pass 2 starts each column block at the first row that
can see it (causal).  Memory: ``O(B·H·L)`` for the row statistics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import block, interpreting, on_device

LOG2E = math.log2(math.e)
# Pass-2 programs to aim for on a GPU (about four per SM of an H100): a batch row's span has only
# ceil(length / BLOCK_N) column blocks, so the query rows are split across programs as well.
TARGET_PROGRAMS = 512


@triton.jit
def _scores(b_q, p_q, sq_l, sq_d, o_i, m_i, p_k, sk_l, sk_d, o_j, m_j, DH, qk_scale,
            NUM_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """``s[i, j] = (q_i·k_j) · qk_scale`` for the rows ``o_i`` and keys ``o_j``: with ``b_q``, the
    rows already loaded (``NUM_D == 1``), else over ``NUM_D`` chunks of ``BLOCK_D`` of ``dh``."""
    o_d = tl.arange(0, BLOCK_D)
    if NUM_D == 1:
        m_d = o_d < DH
        b_k = tl.load(p_k + o_j[:, None] * sk_l + o_d[None, :] * sk_d,
                      mask=m_j[:, None] & m_d[None, :], other=0.0)
        # True fp32 for fp32 inputs; fp16/bf16 use the tensor cores, accumulating in fp32.
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.zeros([o_i.shape[0], o_j.shape[0]], dtype=tl.float32)
        for d0 in range(0, NUM_D * BLOCK_D, BLOCK_D):
            m_d = (d0 + o_d) < DH
            b_qc = tl.load(p_q + o_i[:, None] * sq_l + (d0 + o_d)[None, :] * sq_d,
                           mask=m_i[:, None] & m_d[None, :], other=0.0)
            b_kc = tl.load(p_k + o_j[:, None] * sk_l + (d0 + o_d)[None, :] * sk_d,
                           mask=m_j[:, None] & m_d[None, :], other=0.0)
            b_s = tl.dot(b_qc, tl.trans(b_kc), b_s, input_precision="ieee")
    return b_s * qk_scale


@triton.jit
def _load_rows(p_q, sq_l, sq_d, o_i, m_i, DH, NUM_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The query rows ``o_i`` whole when they fit one chunk (``NUM_D == 1``), else nothing
    (:func:`_scores` then loads them chunk by chunk)."""
    if NUM_D == 1:
        o_d = tl.arange(0, BLOCK_D)
        b_q = tl.load(p_q + o_i[:, None] * sq_l + o_d[None, :] * sq_d,
                      mask=m_i[:, None] & (o_d < DH)[None, :], other=0.0)
    else:
        b_q = None
    return b_q


@triton.jit(do_not_specialize=["L", "Lk"])
def _row_lse_kernel(q_ptr, sq_b, sq_h, sq_l, sq_d, k_ptr, sk_b, sk_h, sk_l, sk_d, km_ptr, lo_ptr,
                    hi_ptr, lse_ptr, H, G, L, Lk, DH, qk_scale, HAS_KEY_MASK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_D: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """``lse[b, h, i] = log2 Σ_j 2^s[i, j]`` over the keys ``j <= i + Lk - L`` with ``key_mask``
    True, for the rows ``i`` of this block inside ``[lo_b, hi_b)``."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    i0 = tl.program_id(1).to(tl.int64) * BLOCK_M
    o_i = i0 + tl.arange(0, BLOCK_M)
    row_lo = tl.load(lo_ptr + b)
    row_hi = tl.load(hi_ptr + b)
    m_i = (o_i >= row_lo) & (o_i < row_hi)
    off = Lk - L
    pos_i = o_i + off                                   # each query's key position
    p_q = q_ptr + b * sq_b + h * sq_h
    b_q = _load_rows(p_q, sq_l, sq_d, o_i, m_i, DH, NUM_D, BLOCK_D)   # held across the keys
    p_k = k_ptr + b * sk_b + (h // G) * sk_h
    # Keys up to the last needed row's position; none when the block holds no needed row.
    active = (i0 < row_hi) & (i0 + BLOCK_M > row_lo)
    n_end = tl.where(active, tl.minimum(row_hi, i0 + BLOCK_M) + off, 0)

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        o_j = n0 + tl.arange(0, BLOCK_N)
        m_j = o_j < Lk
        b_s = _scores(b_q, p_q, sq_l, sq_d, o_i, m_i, p_k, sk_l, sk_d, o_j, m_j, DH, qk_scale,
                      NUM_D, BLOCK_D)
        ok = m_j[None, :] & (o_j[None, :] <= pos_i[:, None])
        if HAS_KEY_MASK:
            ok = ok & (tl.load(km_ptr + b * Lk + o_j, mask=m_j, other=0) != 0)[None, :]
        b_s = tl.where(ok, b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        # A row with no allowed key so far keeps m = -inf: shift by 0 instead (2^(-inf) = 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_l = b_l * tl.exp2(b_m - m_ref) + tl.sum(tl.exp2(b_s - m_ref[:, None]), axis=1)
        b_m = m_new
    lse = tl.where(b_m == float("-inf"), float("inf"), b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)))
    tl.store(lse_ptr + bh * L + o_i, lse, mask=m_i)


@triton.jit(do_not_specialize=["L", "Lk", "length", "num_splits"])
def _received_kernel(q_ptr, sq_b, sq_h, sq_l, sq_d, k_ptr, sk_b, sk_h, sk_l, sk_d, km_ptr, qm_ptr,
                     start_ptr, lo_ptr, hi_ptr, lse_ptr, part_ptr, B, H, G, L, Lk, DH, length,
                     qk_scale, num_splits, MEAN: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                     HAS_QUERY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     NUM_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """``part[split, b, t] = Σ_i R_h P_h[i, start_b + t]`` over this split's share of the query
    rows, for the span columns ``t`` of this block."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    split = tl.program_id(2)
    start = tl.load(start_ptr + b)
    off = Lk - L
    o_t = t0 + tl.arange(0, BLOCK_N)
    m_t = o_t < length
    o_c = start + o_t                                   # the columns' key positions
    # In range even for an unvalidated start: columns outside [0, Lk) read and receive nothing.
    m_c = m_t & (o_c >= 0) & (o_c < Lk)
    if HAS_KEY_MASK:
        m_c = m_c & (tl.load(km_ptr + b * Lk + o_c, mask=m_c, other=0) != 0)
    p_q = q_ptr + b * sq_b
    p_k = k_ptr + b * sk_b
    p_lse = lse_ptr + b * H * L

    # Rows before the block's first column see none of it (causal); this split's row blocks.
    row_hi = tl.load(hi_ptr + b)
    r0 = tl.maximum(tl.load(lo_ptr + b), start + t0 - off)
    n_blocks = tl.cdiv(tl.maximum(row_hi - r0, 0), BLOCK_M)
    per_split = tl.cdiv(n_blocks, num_splits)
    blk_lo = split * per_split
    blk_hi = tl.minimum(n_blocks, blk_lo + per_split)

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for blk in range(blk_lo, blk_hi):
        o_i = r0 + blk * BLOCK_M + tl.arange(0, BLOCK_M)
        m_i = o_i < row_hi
        pos_i = o_i + off
        if HAS_QUERY_MASK:
            sel = m_i & (tl.load(qm_ptr + b * L + o_i, mask=m_i, other=0) != 0)
        elif HAS_KEY_MASK:                              # a valid row: a real token itself
            sel = m_i & (tl.load(km_ptr + b * Lk + pos_i, mask=m_i, other=0) != 0)
        else:
            sel = m_i
        ok = sel[:, None] & m_c[None, :] & (o_c[None, :] <= pos_i[:, None])
        b_r = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for h in range(0, H):
            b_q = _load_rows(p_q + h * sq_h, sq_l, sq_d, o_i, sel, DH, NUM_D, BLOCK_D)
            b_s = _scores(b_q, p_q + h * sq_h, sq_l, sq_d, o_i, sel, p_k + (h // G) * sk_h, sk_l,
                          sk_d, o_c, m_c, DH, qk_scale, NUM_D, BLOCK_D)
            lse = tl.load(p_lse + h * L + o_i, mask=sel, other=float("inf"))
            b_p = tl.where(ok, tl.exp2(b_s - lse[:, None]), 0.0)
            if MEAN:
                b_r += b_p
            else:
                b_r = tl.maximum(b_r, b_p)
        acc += tl.sum(b_r, axis=0)
    if MEAN:
        acc = acc / H
    tl.store(part_ptr + (split * B + b) * length + o_t, acc, mask=m_t)


def query_rows(start, length, queries, query_mask, key_mask, L, Lk):
    """``(lo, hi)`` int64 ``[B]``: each row's query rows lie in ``[lo_b, hi_b)`` (a mask: from its
    first to its last True row); computed on the device (no host sync)."""
    off = Lk - L
    B = start.shape[0]
    full = torch.full((B,), L, dtype=torch.long, device=start.device)
    if queries == "mask":
        rows = torch.arange(L, device=start.device)
        lo = torch.where(query_mask, rows, L).amin(1)
        return lo, torch.maximum(torch.where(query_mask, rows, -1).amax(1) + 1, lo)
    if queries == "after":
        return (start + length - off).clamp(0, L), full
    if queries == "span":
        return (start - off).clamp(0, L), (start + length - off).clamp(0, L)
    if key_mask is None:                                # "last": the last valid row, or none
        return full - 1, full
    rows = torch.arange(L, device=start.device)
    last = torch.where(key_mask[:, off:], rows, -1).amax(1)
    return last.clamp_min(0), last + 1


def _config(L, dh, dtype):
    """``(tiles, pass-1 launch options, pass-2 launch options)``.  fp16/bf16: ``dh`` in one chunk
    (up to 256), the query rows held in registers across pass 1's keys.  fp32: true-fp32 products
    run on the FMA units, whose operands all sit in registers, so ``dh`` goes in chunks of 32 over
    8 warps with fewer pipeline stages (wider chunks, 4 warps or 3 stages spill at sm_90)."""
    if dtype == torch.float32:
        BLOCK_D = block(dh, 16, 32)
        tiles = dict(BLOCK_M=block(L, 16, 64), BLOCK_N=64, NUM_D=triton.cdiv(dh, BLOCK_D),
                     BLOCK_D=BLOCK_D)
        return tiles, dict(num_warps=8, num_stages=1), dict(num_warps=8, num_stages=2)
    BLOCK_M, BLOCK_D = block(L, 16, 128), block(dh, 16, 256)
    tiles = dict(BLOCK_M=BLOCK_M, BLOCK_N=64, NUM_D=triton.cdiv(dh, BLOCK_D), BLOCK_D=BLOCK_D)
    return (tiles, dict(num_warps=8 if BLOCK_M * BLOCK_D >= 128 * 128 else 4),
            dict(num_warps=8 if BLOCK_M >= 128 else 4))


@on_device
def received_attention(q, k, start, length, queries, query_mask, heads, key_mask, scale):
    """``float32[B, length]``; see :func:`visprune.reference.received_attention` (``start``:
    int64 ``[B]``, ``queries``: "after", "span", "last" or "mask" with ``query_mask``)."""
    B, H, L, dh = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if B == 0 or L == 0 or length == 0:
        return torch.zeros(B, length, dtype=torch.float32, device=q.device)
    start = start.to(torch.long).contiguous()
    lo, hi = query_rows(start, length, queries, query_mask, key_mask, L, Lk)
    km = key_mask.to(torch.int8).contiguous() if key_mask is not None else start
    qm = query_mask.to(torch.int8).contiguous() if query_mask is not None else start
    qk_scale = float(scale) * LOG2E
    tiles, launch1, launch2 = _config(L, dh, q.dtype)
    BLOCK_M, BLOCK_N = tiles["BLOCK_M"], tiles["BLOCK_N"]

    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    _row_lse_kernel[(B * H, triton.cdiv(L, BLOCK_M))](
        q, *q.stride(), k, *k.stride(), km, lo, hi, lse, H, H // Hkv, L, Lk, dh, qk_scale,
        HAS_KEY_MASK=key_mask is not None, **tiles, **launch1)

    col_blocks = triton.cdiv(length, BLOCK_N)
    splits = 1 if interpreting() else max(1, min(triton.cdiv(TARGET_PROGRAMS, B * col_blocks),
                                                 triton.cdiv(L, BLOCK_M)))
    part = torch.empty(splits, B, length, dtype=torch.float32, device=q.device)
    _received_kernel[(B, col_blocks, splits)](
        q, *q.stride(), k, *k.stride(), km, qm, start, lo, hi, lse, part, B, H, H // Hkv, L, Lk,
        dh, length, qk_scale, splits, MEAN=heads == "mean", HAS_KEY_MASK=key_mask is not None,
        HAS_QUERY_MASK=query_mask is not None, **tiles, **launch2)
    # The splits' partial sums, added in split order (a fixed-shape reduction: deterministic).
    return part[0] if splits == 1 else part.sum(0)
