"""One-pass gather-compaction of the surviving tokens.

The mask form first turns ``mask[B, N]`` into ascending positions with an in-kernel prefix sum
(``_mask_positions_kernel``); both forms then copy the kept rows with ``_gather_rows_kernel``,
which reads each kept row once and writes the contiguous output once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from visprune.common import varlen_counts

from .utils import block, on_device, warps


@triton.jit
def _mask_positions_kernel(mask_ptr, idx_ptr, N, K, BLOCK_N: tl.constexpr):
    """One program per row: ``idx[b, c] = position of the c-th True`` (exclusive prefix sum)."""
    b = tl.program_id(0).to(tl.int64)
    base = tl.full([], 0, tl.int32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        keep = tl.load(mask_ptr + b * N + o_n, mask=o_n < N, other=0).to(tl.int32)
        pos = base + tl.cumsum(keep, axis=0) - keep
        # pos < K: a row with more True entries than the first (only without validation) must
        # not write past its K slots.
        tl.store(idx_ptr + b * K + pos, o_n.to(tl.int64), mask=(keep != 0) & (pos < K))
        base += tl.sum(keep, axis=0)


@triton.jit
def _gather_rows_kernel(x_ptr, sx_b, sx_n, sx_d, idx_ptr, out_ptr, N, K, D,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(b, block of K, block of D)``: ``out[b, c, :] = x[b, idx[b, c], :]``; an index
    outside ``[0, N)`` (possible only without validation) reads nothing and writes zeros."""
    b = tl.program_id(0).to(tl.int64)
    o_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_k = o_k < K
    m = m_k[:, None] & (o_d < D)[None, :]
    rows = tl.load(idx_ptr + b * K + o_k, mask=m_k, other=0)
    m_in = m & ((rows >= 0) & (rows < N))[:, None]
    vals = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_n + o_d[None, :] * sx_d, mask=m_in,
                   other=0)
    tl.store(out_ptr + (b * K + o_k[:, None]) * D + o_d[None, :], vals, mask=m)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """``int64[B, K]`` ascending positions of the True entries (same count per row)."""
    B, N = mask.shape
    K = int(mask[0].sum()) if B else 0
    # Zeros, not empty: a row with fewer True entries than the first (only without validation)
    # leaves slots unwritten, and they must still be in range for the gather.
    idx = torch.zeros(B, K, dtype=torch.long, device=mask.device)
    if B and K:
        _mask_positions_kernel[(B,)](mask.to(torch.int8).contiguous(), idx, N, K,
                                     BLOCK_N=block(N, 16, 1024), num_warps=4)
    return idx


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, c], :]`` as a contiguous ``[B, K, D]`` tensor of ``x``'s dtype."""
    B, N, D = x.shape
    K = index.shape[1]
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)
    if out.numel():
        src, dst = (x.view(torch.uint8), out.view(torch.uint8)) if x.dtype == torch.bool else (x, out)
        BLOCK_K, BLOCK_D = block(K, 1, 16), block(D, 16, 256)
        grid = (B, triton.cdiv(K, BLOCK_K), triton.cdiv(D, BLOCK_D))
        _gather_rows_kernel[grid](src, *src.stride(), index.contiguous(), dst, N, K, D,
                                  BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
                                  num_warps=warps(BLOCK_K * BLOCK_D))
    return out


@on_device
def gather_compact(x, index=None, mask=None, sort=True):
    """``(tokens[B, K, D], indices int64[B, K])``; see :func:`visprune.reference.gather_compact`."""
    if mask is not None:
        index = mask_positions(mask)
    else:
        # sort() and clone() both give a new tensor: the caller's index is never returned.
        index = index.long().sort(dim=-1).values if sort else index.long().clone()
    return gather_rows(x, index), index


@on_device
def gather_compact_varlen(x, cu_seqlens, index=None, mask=None, sort=True):
    """``(tokens[K, D], indices int64[K], cu_seqlens_out int64[B+1])``; see
    :func:`visprune.reference.gather_compact_varlen`.  The dense kernels on ``x[None]`` with
    global positions: one prefix-sum launch (mask form) and one gather launch for all segments."""
    if mask is not None:
        index = mask_positions(mask[None])[0]
        ordered = index
    else:
        # Each segment's entries are together and segments hold ascending ranges, so one global
        # sort orders every segment's entries and keeps the segments in place.
        ordered = index.long().sort().values
        index = ordered if sort else index.long().clone()
    return gather_rows(x[None], index[None])[0], index, varlen_counts(ordered, cu_seqlens)
