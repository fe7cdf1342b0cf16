"""Incremental greedy diverse selection (farthest point / max-sum) with Triton.

The greedy loop is sequential in ``k`` but each step is an O(N) update of a running vector
``run_i = min_s d(i, s)`` (maxmin) or ``Σ_s d(i, s)`` (maxsum) followed by one argmax; the
distances are never recomputed from scratch.  Two paths:

* ``gram`` (N <= GRAM_MAX_N): ``_dist_tile_kernel`` writes the ``[N, N]`` distance matrix once
  with tensor-core ``tl.dot`` tiles (true fp32 for fp32 inputs) and, in the same pass, the
  per-row partial reductions the start rule needs; ``_greedy_gram_kernel`` then runs all ``k``
  steps in one program per row with ``run`` held in registers, reading one distance row a step.
  Rows are processed in batch chunks so the workspace stays under GRAM_BUDGET_BYTES.
* ``stream`` (large N): no N² buffer.  maxmin's start rule comes from the same tile kernel
  without the store; maxsum's is linear in a per-row summary (:func:`_maxsum_start_key`, N·D
  work), and so is ``start="linear"``, maxsum's rule for either objective
  (:func:`_linear_start_key`; on the gram path too, in place of the tiles' key).  Each step is one launch of ``_greedy_step_kernel`` over blocks of N that computes
  ``d(i, s)`` on the fly from the tokens, updates ``run`` in memory and folds its block's
  (max, argmax) into one packed int64 per row with ``atomic_max``; the next launch reads that
  one value to find ``s`` (O(1) per program, whatever N).

Ties go to the lowest index everywhere (argmax with left tie-break; across blocks the largest
value, then the smallest index, packed so that one integer max decides both).  Excluded tokens (non-candidates, already selected) carry
``-inf``; live ones carry a value >= 0 (distances are clamped), so argmax always finds a live
candidate while one remains, whatever NaN/Inf the input holds.
"""
from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl

from visprune.common import segment_ids

from .mi_scores import text_summary, token_stats
from .utils import (COSINE, MAXMIN, METRICS, OBJECTIVES, block, clamp_distance, cosine,
                    interpreting, on_device, segment as _segment, tile_dots, warps)

GRAM_MAX_N = 4096                  # the in-register running vector of one program
GRAM_BUDGET_BYTES = 1 << 30        # distance-matrix workspace per batch chunk
STREAM_SPLITS = 16                 # programs per row block in the start pass of the stream path


@triton.jit
def _distance(dot, n_i, n_j, METRIC: tl.constexpr):
    """``1 - cos`` from ``x_i·x_j`` and inverse norms, or ``||x_i||² + ||x_j||² - 2 x_i·x_j``."""
    if METRIC == COSINE:
        d = 1.0 - cosine(dot, n_i, n_j)
    else:
        d = n_i + n_j - 2.0 * dot
    return clamp_distance(d)


@triton.jit
def _picks(ck_ptr, b, k, bos, IS_VARLEN: tl.constexpr):
    """Where row ``b`` writes its picks: ``(first slot, count, added to a pick)``: ``(b·k, k, 0)``
    dense; ``(ck[b], ck[b+1] - ck[b], bos)`` packed (global positions)."""
    if IS_VARLEN:
        o0 = tl.load(ck_ptr + b)
        kk = tl.load(ck_ptr + b + 1) - o0
        shift = bos
    else:
        o0 = b * k
        kk = o0 * 0 + k
        shift = bos * 0
    return o0, kk, shift


@triton.jit
def _dist_tile_kernel(x_ptr, sx_b, sx_n, sx_d, norm_ptr, cand_ptr, dist_ptr, part_ptr,
                      cu_ptr, doff_ptr, N, D, num_splits,
                      METRIC: tl.constexpr, OBJ: tl.constexpr, HAS_MASK: tl.constexpr,
                      STORE: tl.constexpr, INTERPRETED: tl.constexpr, IS_VARLEN: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(b, row block, split)``: distances of the row block to every ``BLOCK_N`` column
    block ``split, split + num_splits, ...``; optionally stored to ``dist[b]``, and reduced over
    the candidate columns into ``part[b, split, rows]``: ``min_{j≠i} d`` (maxmin) or ``Σ_j d``
    (maxsum), the start rule's per-row key.  Packed (``IS_VARLEN``): row ``b`` is segment ``b``,
    its ``n×n`` distances at ``doff[b]`` and its partials at ``part[bos·num_splits + split·n]``."""
    b = tl.program_id(0).to(tl.int64)
    bos, n = _segment(cu_ptr, b, N, IS_VARLEN)
    o_i = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    m_i = o_i < n
    if IS_VARLEN:
        p_x = x_ptr + bos * sx_n
        p_dist = dist_ptr + tl.load(doff_ptr + b)
    else:
        p_x = x_ptr + b * sx_b
        p_dist = dist_ptr + b * N * N
    n_i = tl.load(norm_ptr + bos + o_i, mask=m_i, other=0.0)
    if OBJ == MAXMIN:
        red = tl.full([BLOCK_M], float("inf"), tl.float32)
    else:
        red = tl.zeros([BLOCK_M], dtype=tl.float32)
    for jb in range(split, tl.cdiv(n, BLOCK_N), num_splits):
        o_j = (jb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_j = o_j < n
        acc = tile_dots(p_x, o_i, m_i, o_j, m_j, sx_n, sx_d, D, INTERPRETED, BLOCK_M, BLOCK_N,
                        BLOCK_D)
        n_j = tl.load(norm_ptr + bos + o_j, mask=m_j, other=0.0)
        d = _distance(acc, n_i[:, None], n_j[None, :], METRIC)
        if STORE:
            tl.store(p_dist + o_i[:, None] * n + o_j[None, :], d,
                     mask=m_i[:, None] & m_j[None, :])
        use = m_j
        if HAS_MASK:
            use = use & (tl.load(cand_ptr + bos + o_j, mask=m_j, other=0) != 0)
        if OBJ == MAXMIN:
            use2 = use[None, :] & (o_i[:, None] != o_j[None, :])
            red = tl.minimum(red, tl.min(tl.where(use2, d, float("inf")), axis=1))
        else:
            red += tl.sum(tl.where(use[None, :], d, 0.0), axis=1)
    tl.store(part_ptr + bos * num_splits + split * n + o_i, red, mask=m_i)


@triton.jit
def _start_key(part_ptr, cand_ptr, bos, n, o_n, m_n, num_splits, start,
               OBJ: tl.constexpr, HAS_MASK: tl.constexpr, AUTO: tl.constexpr, BLOCK: tl.constexpr):
    """The start rule's key of tokens ``o_n`` of the row at ``bos`` of length ``n`` (``-inf``
    where excluded) and their liveness."""
    alive = m_n
    if HAS_MASK:
        alive = alive & (tl.load(cand_ptr + bos + o_n, mask=m_n, other=0) != 0)
    if AUTO:
        if OBJ == MAXMIN:
            key = tl.full([BLOCK], float("inf"), tl.float32)
        else:
            key = tl.zeros([BLOCK], dtype=tl.float32)
        for p in range(0, num_splits):
            part = tl.load(part_ptr + bos * num_splits + p * n + o_n, mask=m_n, other=0.0)
            if OBJ == MAXMIN:
                key = tl.minimum(key, part)
            else:
                key += part
        key = tl.where(alive, key, float("-inf"))
    else:
        key = tl.where((o_n == start) & m_n, 0.0, float("-inf"))
    return key, alive


@triton.jit(do_not_specialize=["k", "start"])
def _greedy_gram_kernel(dist_ptr, cand_ptr, part_ptr, out_ptr, cu_ptr, ck_ptr, doff_ptr, N, k,
                        num_splits, start, OBJ: tl.constexpr, HAS_MASK: tl.constexpr,
                        AUTO: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row (packed: per segment, with its own ``k``): all greedy steps over a
    stored distance matrix."""
    b = tl.program_id(0).to(tl.int64)
    bos, n = _segment(cu_ptr, b, N, IS_VARLEN)
    o0, kk, shift = _picks(ck_ptr, b, k, bos, IS_VARLEN)
    if IS_VARLEN:
        p_dist = dist_ptr + tl.load(doff_ptr + b)
    else:
        p_dist = dist_ptr + b * N * N
    o_n = tl.arange(0, BLOCK)
    m_n = o_n < n
    key, alive = _start_key(part_ptr, cand_ptr, bos, n, o_n, m_n, num_splits, start,
                            OBJ, HAS_MASK, AUTO, BLOCK)
    if OBJ == MAXMIN:
        run = tl.full([BLOCK], float("inf"), tl.float32)
    else:
        run = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(0, kk):
        s = tl.argmax(key, axis=0, tie_break_left=True)
        # min: an empty packed segment (only with unvalidated counts) still records a valid row
        tl.store(out_ptr + o0 + t, tl.minimum(s.to(tl.int64) + shift, N - 1))
        alive = alive & (o_n != s)
        row = tl.load(p_dist + s.to(tl.int64) * n + o_n, mask=m_n, other=0.0)
        if OBJ == MAXMIN:
            run = tl.minimum(run, row)
        else:
            run += row
        key = tl.where(alive, run, float("-inf"))


@triton.jit
def _publish(key, base, sel_ptr):
    """Fold this block's best ``(value, first index)`` into the row's selection slot.

    The pair is packed into one int64 ordered like the choice (larger value first, then lower
    index): ``(bits(value) + 1) << 32 | (2³² - 1 - index)``; values are >= 0 or ``-inf`` (not a
    candidate: packs as 0, below any live token).  The bit pattern of a non-negative float orders
    like its value, so ``atomic_max`` gives the argmax with the left tie-break whatever order the
    blocks arrive in: deterministic, and no block reads the other blocks' partials.
    """
    val, idx = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    low = tl.full([], 4294967295, tl.int64) - (base + idx).to(tl.int64)
    packed = ((val.to(tl.int32, bitcast=True).to(tl.int64) + 1) << 32) | low
    tl.atomic_max(sel_ptr, tl.where(val >= 0, packed, 0))


@triton.jit
def _unpack(packed):
    """The index of a :func:`_publish` slot (0 when no candidate was left)."""
    low = packed & tl.full([], 4294967295, tl.int64)
    return tl.where(packed > 0, tl.full([], 4294967295, tl.int64) - low, 0)


@triton.jit
def _greedy_init_kernel(part_ptr, cand_ptr, run_ptr, sel_ptr, cu_ptr, N, num_splits, start,
                        OBJ: tl.constexpr, HAS_MASK: tl.constexpr, AUTO: tl.constexpr,
                        IS_VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """Stream path: the running vector's initial state, and the start rule's choice published
    to selection slot 0."""
    b = tl.program_id(0).to(tl.int64)
    bos, n = _segment(cu_ptr, b, N, IS_VARLEN)
    pb = tl.program_id(1)
    o_n = pb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < n
    key, alive = _start_key(part_ptr, cand_ptr, bos, n, o_n, m_n, num_splits, start,
                            OBJ, HAS_MASK, AUTO, BLOCK)
    init = float("inf") if OBJ == MAXMIN else 0.0
    tl.store(run_ptr + bos + o_n, tl.where(alive, init, float("-inf")), mask=m_n)
    _publish(key, pb * BLOCK, sel_ptr + b)


@triton.jit(do_not_specialize=["k", "t"])
def _greedy_step_kernel(x_ptr, sx_b, sx_n, sx_d, norm_ptr, run_ptr, sel_ptr, out_ptr, cu_ptr,
                        ck_ptr, N, D, k, t, METRIC: tl.constexpr, OBJ: tl.constexpr,
                        IS_VARLEN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stream path, step ``t``: read the chosen ``s`` from slot ``t % 3``, record it, then (unless
    it was the last) fold ``d(·, s)`` into ``run`` and publish this block's best to slot
    ``(t + 1) % 3``.  Slot ``(t + 2) % 3`` was read by step ``t - 1`` and is written by step
    ``t + 1``: block 0 clears it now, so no launch reads a slot it or another block writes."""
    b = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    B = tl.num_programs(0)
    bos, n = _segment(cu_ptr, b, N, IS_VARLEN)
    o0, kk, shift = _picks(ck_ptr, b, k, bos, IS_VARLEN)
    s = _unpack(tl.load(sel_ptr + (t % 3) * B + b))
    if pb == 0:
        if t < kk:
            tl.store(out_ptr + o0 + t, tl.minimum(s + shift, N - 1))
        tl.store(sel_ptr + ((t + 2) % 3) * B + b, tl.zeros([], tl.int64))
    # A block past the row's end has nothing to do (packed rows are shorter than the grid).
    if (t + 1 < kk) & (pb * BLOCK < n):
        o_n = pb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m_n = o_n < n
        o_d = tl.arange(0, BLOCK_D)
        if IS_VARLEN:
            p_x = x_ptr + bos * sx_n
        else:
            p_x = x_ptr + b * sx_b
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            m_d = (d0 + o_d) < D
            b_s = tl.load(p_x + s * sx_n + (d0 + o_d) * sx_d, mask=m_d, other=0.0).to(tl.float32)
            b_x = tl.load(p_x + o_n[:, None] * sx_n + (d0 + o_d)[None, :] * sx_d,
                          mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            dot += tl.sum(b_x * b_s[None, :], axis=1)
        n_i = tl.load(norm_ptr + bos + o_n, mask=m_n, other=0.0)
        d = _distance(dot, n_i, tl.load(norm_ptr + bos + s), METRIC)
        run = tl.load(run_ptr + bos + o_n, mask=m_n, other=float("-inf"))
        if OBJ == MAXMIN:
            new = tl.minimum(run, d)
        else:
            new = run + d
        run = tl.where((run == float("-inf")) | (o_n == s), float("-inf"), new)
        tl.store(run_ptr + bos + o_n, run, mask=m_n)
        _publish(run, pb * BLOCK, sel_ptr + ((t + 1) % 3) * B + b)


def _tile(N: int) -> int:
    """Square tile of the distance pass (64; 16 for tiny N, where a 64 tile is mostly padding)."""
    return 64 if N > 32 else 16


class Packed(NamedTuple):
    """A packed ``[T, D]`` batch as the varlen kernels read it: ``cu`` int64 ``[B+1]`` segment
    offsets, ``ck`` int64 ``[B+1]`` offsets of each segment's picks, ``doff`` int64 ``[B]``
    offsets of each segment's ``n×n`` distances; ``k`` the picks per segment; ``nmax`` the
    longest segment and ``sum_sq`` ``Σ n_b²`` (read once from the device: they size the grid
    and the workspace)."""
    cu: torch.Tensor
    ck: torch.Tensor
    doff: torch.Tensor
    k: List[int]
    nmax: int
    sum_sq: int

    @property
    def B(self) -> int:
        return len(self.k)


def packed(cu_seqlens: torch.Tensor, T: int, k: List[int]) -> Packed:
    """The :class:`Packed` layout of ``cu_seqlens`` (one host read of the segment lengths),
    lengths clamped as :func:`.utils.segment` clamps them."""
    cu = cu_seqlens.long()
    lo = cu[:-1].clamp(0, T)
    n = torch.maximum(cu[1:].clamp(0, T), lo) - lo
    sq = n * n
    nmax, sum_sq = torch.stack([n.max(), sq.sum()]).tolist() if len(k) else (0, 0)
    ck = torch.tensor([0] + list(itertools.accumulate(k)), dtype=torch.long, device=cu.device)
    return Packed(cu.contiguous(), ck, (torch.cumsum(sq, 0) - sq).contiguous(), list(k), nmax,
                  sum_sq)


def _start_pass(x, norms, cand, part, dist, metric, objective, num_splits,
                rows: Optional[Packed] = None):
    if rows is None:
        B, N, D = x.shape
        n, strides, cu, doff = N, x.stride(), norms, norms
    else:
        (N, D), B, n = x.shape, rows.B, rows.nmax
        strides, cu, doff = (0,) + x.stride(), rows.cu, rows.doff
    BLOCK = _tile(n)
    # 64 x 64 tiles with 8 warps over 64-wide slices of D, 32-wide for fp32 (its tiles hold twice
    # the registers): no register spills on sm_90 with Triton 3.6 or 3.9 (4 warps, wider slices
    # or 64-wide fp32 slices with STORE spill).
    BLOCK_D = block(D, 16, 32 if x.dtype == torch.float32 else 64)
    grid = (B, triton.cdiv(n, BLOCK), num_splits)
    _dist_tile_kernel[grid](
        x, *strides, norms, cand if cand is not None else norms,
        dist if dist is not None else norms, part, cu, doff, N, D, num_splits,
        METRIC=METRICS[metric], OBJ=OBJECTIVES[objective], HAS_MASK=cand is not None,
        STORE=dist is not None, INTERPRETED=interpreting(), IS_VARLEN=rows is not None,
        BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=BLOCK_D, num_warps=8)


def _select_gram(x, k, objective, metric, cand, start, norms, out):
    B, N, _ = x.shape
    num_splits = triton.cdiv(N, _tile(N))
    BLOCK = block(N)
    chunk = max(1, GRAM_BUDGET_BYTES // (N * N * 4))
    for b0 in range(0, B, chunk):
        sl = slice(b0, min(B, b0 + chunk))
        xb, nb, cb = x[sl], norms[sl], cand[sl] if cand is not None else None
        nB = xb.shape[0]
        dist = torch.empty(nB, N, N, dtype=torch.float32, device=x.device)
        part = torch.empty(nB, num_splits, N, dtype=torch.float32, device=x.device)
        _start_pass(xb, nb, cb, part, dist, metric, objective, num_splits)
        key, splits = part, num_splits
        if start == "linear":
            key, splits = _linear_start_key(xb, nb, cb, metric), 1
        _greedy_gram_kernel[(nB,)](
            dist, cb if cb is not None else nb, key, out[sl], nb, nb, nb, N, k, splits,
            start if isinstance(start, int) else 0, OBJ=OBJECTIVES[objective],
            HAS_MASK=cb is not None, AUTO=not isinstance(start, int), IS_VARLEN=False,
            BLOCK=BLOCK, num_warps=warps(BLOCK))


def _select_gram_varlen(x, rows, objective, metric, cand, start, norms, out):
    """All segments in one launch of each kernel: their distance matrices packed one after
    another (``Σ n_b²`` floats), one program per segment for the steps."""
    T = x.shape[0]
    num_splits = triton.cdiv(rows.nmax, _tile(rows.nmax))
    BLOCK = block(rows.nmax)
    dist = torch.empty(max(rows.sum_sq, 1), dtype=torch.float32, device=x.device)
    part = torch.empty(num_splits * T, dtype=torch.float32, device=x.device)
    _start_pass(x, norms, cand, part, dist, metric, objective, num_splits, rows)
    if start == "linear":
        part, num_splits = _linear_start_key(x, norms, cand, metric, rows), 1
    _greedy_gram_kernel[(rows.B,)](
        dist, cand if cand is not None else norms, part, out, rows.cu, rows.ck, rows.doff, T, 0,
        num_splits, start if isinstance(start, int) else 0, OBJ=OBJECTIVES[objective],
        HAS_MASK=cand is not None, AUTO=not isinstance(start, int), IS_VARLEN=True, BLOCK=BLOCK,
        num_warps=warps(BLOCK))


def _maxsum_start_key(x, norms, cand, metric):
    """``float32[B, 1, N]``: maxsum's start key from a per-row summary instead of all pairs.

    ``Σ_j d(i, j)`` over the candidates is linear in their mean: ``n·(1 - x̂_i·mean(x̂))`` for
    cosine, ``n·||x_i - x̄||² + const`` for l2, so ranking by ``1 - x̂_i·mean(x̂)`` or by
    ``||x_i - x̄||²`` picks the same token up to rounding (near-ties may order differently from
    the pairwise sum; exact duplicates get identical keys).  A token whose norm is not finite
    takes no part in the mean and gets key 0, as its NaN distances count 0 in the pairwise sum.
    """
    finite = norms > 0 if metric == "cosine" else torch.isfinite(norms)
    use = finite if cand is None else finite & (cand != 0)
    summary = text_summary(x, use, metric, inv=norms if metric == "cosine" else None)
    score, _ = token_stats(x, summary, score_metric=metric)
    key = (1.0 - score) if metric == "cosine" else -score
    return torch.where(finite & (key > 0), key, 0.0)[:, None, :]


def _linear_start_key(x, norms, cand, metric, rows: Optional[Packed] = None):
    """``start="linear"``'s key, flat (``[B·N]``, or ``[T]`` packed): maxsum's start key for
    either objective, from each row's summary (:func:`_maxsum_start_key`; packed, the same
    formulas with segment sums), O(N·D) where maxmin's own start rule needs every pair."""
    if rows is None:
        return _maxsum_start_key(x, norms, cand, metric).reshape(-1)
    T = x.shape[0]
    seg = segment_ids(rows.cu, torch.arange(T, device=x.device))
    finite = norms > 0 if metric == "cosine" else torch.isfinite(norms)
    use = finite if cand is None else finite & (cand != 0)
    y = x.float() * norms[:, None] if metric == "cosine" else x.float()
    y = torch.where(use[:, None], y, 0.0)
    total = torch.zeros(rows.B, x.shape[1], device=x.device).index_add_(0, seg, y)
    count = torch.zeros(rows.B, device=x.device).index_add_(0, seg, use.float())
    mean = (total / count.clamp(min=1)[:, None])[seg]
    if metric == "cosine":
        key = 1.0 - (x.float() * norms[:, None] * mean).sum(-1)
    else:
        key = (x.float() - mean).square().sum(-1)
    return torch.where(finite & (key > 0), key, 0.0).contiguous()


def _select_stream(x, k, objective, metric, cand, start, norms, out,
                   rows: Optional[Packed] = None):
    """The stream path, dense (``x[B, N, D]``) or packed (``x[T, D]`` with ``rows``: a packed
    batch's maxsum start comes from the pairwise tiles, as maxmin's, not from a per-row summary)."""
    dev = x.device
    if rows is None:
        B, N, D = x.shape
        n, steps, strides, cu, ck = N, k, x.stride(), norms, norms
    else:
        (N, D), B, n = x.shape, rows.B, rows.nmax
        steps, strides, cu, ck = max(rows.k), (0,) + x.stride(), rows.cu, rows.ck
    tokens = B * N if rows is None else N
    auto = not isinstance(start, int)
    part = torch.empty(tokens, dtype=torch.float32, device=dev)
    num_splits = 1
    if start == "linear":
        part = _linear_start_key(x, norms, cand, metric, rows)
    elif auto and objective == "maxsum" and rows is None:
        part = _maxsum_start_key(x, norms, cand, metric)
    elif auto:      # maxmin's start needs every pair: tiles without a stored matrix
        num_splits = STREAM_SPLITS
        part = torch.empty(num_splits * tokens, dtype=torch.float32, device=dev)
        _start_pass(x, norms, cand, part, None, metric, objective, num_splits, rows)
    # Blocks of 128 tokens (128 programs a row at N = 16384) over 64-wide slices of D, 8 warps:
    # no register spills on sm_90 (1024-token blocks spill at any warp count).
    BLOCK = block(n, 16, 128)
    BLOCK_D = block(D, 16, 64)
    num_blocks = triton.cdiv(n, BLOCK)
    run = torch.empty(tokens, dtype=torch.float32, device=dev)
    sel = torch.zeros(3, B, dtype=torch.int64, device=dev)
    cand_arg = cand if cand is not None else norms
    _greedy_init_kernel[(B, num_blocks)](
        part, cand_arg, run, sel, cu, N, num_splits, start if not auto else 0,
        OBJ=OBJECTIVES[objective], HAS_MASK=cand is not None, AUTO=auto,
        IS_VARLEN=rows is not None, BLOCK=BLOCK, num_warps=warps(BLOCK))
    for t in range(steps):
        _greedy_step_kernel[(B, num_blocks)](
            x, *strides, norms, run, sel, out, cu, ck, N, D, k, t,
            METRIC=METRICS[metric], OBJ=OBJECTIVES[objective], IS_VARLEN=rows is not None,
            BLOCK=BLOCK, BLOCK_D=BLOCK_D, num_warps=8 if BLOCK == 128 else 4)


@on_device
def greedy_select(x: torch.Tensor, k: int, objective: str = "maxmin", metric: str = "cosine",
                  mask: Optional[torch.Tensor] = None, start: Union[str, int] = "auto",
                  norms: Optional[torch.Tensor] = None, path: str = "auto") -> torch.Tensor:
    """``int64[B, k]`` greedy selection; see :func:`visprune.reference.greedy_select`.

    ``norms`` (``float32[B, N]``: ``1/max(||x||, eps)`` for cosine, ``||x||²`` for l2) may come
    from a pass that already read ``x``; ``path`` forces ``"gram"`` or ``"stream"``.
    """
    B, N, _ = x.shape
    out = torch.empty(B, k, dtype=torch.long, device=x.device)
    if k == 0 or B == 0:
        return out
    if norms is None:
        _, norms = token_stats(x, norm=metric)
    cand = mask.to(torch.int8).contiguous() if mask is not None else None
    if path == "auto":
        path = "gram" if N <= GRAM_MAX_N else "stream"
    select = _select_gram if path == "gram" else _select_stream
    select(x, k, objective, metric, cand, start, norms, out)
    return out


@on_device
def greedy_select_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, k: List[int],
                         objective: str = "maxmin", metric: str = "cosine",
                         mask: Optional[torch.Tensor] = None, start: Union[str, int] = "auto",
                         norms: Optional[torch.Tensor] = None, rows: Optional[Packed] = None,
                         path: str = "auto") -> torch.Tensor:
    """``int64[Σk]`` greedy selection in every segment of a packed ``x[T, D]``; see
    :func:`visprune.reference.greedy_select_varlen`.  One launch per kernel for all segments
    (the stream path: one per step), each program reading its segment's offset, length and ``k``
    from ``cu_seqlens`` and the pick offsets.  ``norms`` (``float32[T]``) and ``rows``
    (:func:`packed`) may come from the caller; ``path`` forces ``"gram"`` or ``"stream"``."""
    T = x.shape[0]
    out = torch.empty(sum(k), dtype=torch.long, device=x.device)
    if out.numel() == 0:
        return out
    if norms is None:
        _, norms = token_stats(x[None], norm=metric)
        norms = norms[0]
    rows = rows if rows is not None else packed(cu_seqlens, T, k)
    cand = mask.to(torch.int8).contiguous() if mask is not None else None
    if path == "auto":
        path = "gram" if rows.nmax <= GRAM_MAX_N and rows.sum_sq * 4 <= GRAM_BUDGET_BYTES \
            else "stream"
    if path == "gram":
        _select_gram_varlen(x, rows, objective, metric, cand, start, norms, out)
    else:
        _select_stream(x, 0, objective, metric, cand, start, norms, out, rows)
    return out
