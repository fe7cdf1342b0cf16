"""CDPruner's greedy MAP inference of a conditional DPP with Triton.

The DPP kernel is ``L = R S R``: ``S_ij = cos(x_i, x_j)``, ``R = diag(r)``.  Its greedy MAP
(incremental Cholesky, see :mod:`visprune.methods.cdpruner`) keeps per batch row a residual
``res_i`` (``dist²(x̂_i, span of the selected x̂)``) and one Cholesky row ``c_t[N]`` per step:

    ``e_i = (S_si - Σ_{t'<t} c_t's · c_t'i) / sqrt(res_s)``,  ``c_t = e``,  ``res_i -= e_i²``,

and picks the next token by the largest gain ``r_i² · res_i`` among those with ``res_i > eps``
(else the lowest-index candidate left: all are spent, and a spent pick updates nothing).
The recurrence is sequential in ``k``; each step is O(N·t) for the Cholesky dots plus one row of
``S``.  ``_dpp_map_kernel`` runs all ``k`` steps in one program per batch row: the Cholesky rows
``[k, N]``, the residuals and the liveness live in a global scratch the program alone touches
(L1/L2-resident at LLaVA sizes; a CTA barrier orders each step's stores before the next step's
loads, which other threads of the program make), so any ``N`` fits one code path.  Row ``s`` of
``S`` comes from:

* ``gram`` (N <= GRAM_MAX_N): ``_cosine_gram_kernel`` writes ``S`` once with tensor-core
  ``tl.dot`` tiles (true fp32 for fp32 tokens), in batch chunks under GRAM_BUDGET_BYTES; a step
  then reads one row of it;
* ``stream`` (large N, where ``N²`` does not fit): computed on the fly from the tokens, N·D per
  step.

Ties go to the lowest index (argmax with left tie-break; blocks of N merged in order, a later
block winning only with a strictly larger gain).  Non-candidates and selected tokens carry
``-inf``, spent candidates ``-1`` and the others a gain ``>= 0``, so a pick is a live candidate
while one remains, whatever NaN/Inf the inputs hold.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .mi_scores import token_stats
from .utils import block, cosine, interpreting, on_device, tile_dots

GRAM_MAX_N = 4096                  # above this the S rows are computed on the fly
GRAM_BUDGET_BYTES = 1 << 30        # S workspace per batch chunk


@triton.jit
def _cosine_gram_kernel(x_ptr, sx_b, sx_n, sx_d, inv_ptr, sim_ptr, N, D,
                        INTERPRETED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(b, row block, column block)``: ``sim[b, i, j] = cos(x_i, x_j)``."""
    b = tl.program_id(0).to(tl.int64)
    o_i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_j = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < N
    m_j = o_j < N
    acc = tile_dots(x_ptr + b * sx_b, o_i, m_i, o_j, m_j, sx_n, sx_d, D, INTERPRETED, BLOCK,
                    BLOCK, BLOCK_D)
    n_i = tl.load(inv_ptr + b * N + o_i, mask=m_i, other=0.0)
    n_j = tl.load(inv_ptr + b * N + o_j, mask=m_j, other=0.0)
    tl.store(sim_ptr + b * N * N + o_i[:, None] * N + o_j[None, :],
             cosine(acc, n_i[:, None], n_j[None, :]), mask=m_i[:, None] & m_j[None, :])


@triton.jit
def _cosines(x_ptr, sx_n, sx_d, inv_ptr, s, o_n, m_n, D, DIAG: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The stream path's ``cos(x_s, x_n)`` for the tokens ``o_n``, or with ``DIAG`` their
    ``cos(x_n, x_n)``, rounded as ``s == n`` would be."""
    o_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m_d = (d0 + o_d) < D
        b_x = tl.load(x_ptr + o_n[:, None] * sx_n + (d0 + o_d)[None, :] * sx_d,
                      mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        if DIAG:
            dot += tl.sum(b_x * b_x, axis=1)
        else:
            b_s = tl.load(x_ptr + s * sx_n + (d0 + o_d) * sx_d, mask=m_d, other=0.0)
            dot += tl.sum(b_x * b_s.to(tl.float32)[None, :], axis=1)
    n_n = tl.load(inv_ptr + o_n, mask=m_n, other=0.0)
    if DIAG:
        return cosine(dot, n_n, n_n)
    return cosine(dot, tl.load(inv_ptr + s), n_n)


@triton.jit
def _key(res, r2, live, eps):
    """The choice key: the gain ``r² · res`` if the token still adds something (``res > eps``,
    gain not NaN), ``-1`` if it is spent, ``-inf`` if it is not a live candidate."""
    gain = r2 * res
    key = tl.where((res > eps) & (gain == gain), gain, -1.0)
    return tl.where(live, key, float("-inf"))


@triton.jit
def _fold(key, n0, best_v, best_i):
    """Fold a block's ``(max, first argmax)`` into the running best; blocks come in index order,
    so only a strictly larger value wins (left tie-break)."""
    v, i = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    better = v > best_v
    return tl.where(better, v, best_v), tl.where(better, n0 + i.to(tl.int64), best_i)


@triton.jit(do_not_specialize=["k"])
def _dpp_map_kernel(x_ptr, sx_b, sx_n, sx_d, inv_ptr, sim_ptr, r_ptr, cand_ptr, res_ptr,
                    live_ptr, chol_ptr, out_ptr, N, D, k, eps,
                    GRAM: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per batch row: all ``k`` steps.  Scratch of row ``b``: ``res[b, N]``,
    ``live[b, N]`` (int8), ``chol[b, k, N]`` (Cholesky row ``t`` at ``chol[b, t]``)."""
    b = tl.program_id(0).to(tl.int64)
    p_x = x_ptr + b * sx_b
    p_inv = inv_ptr + b * N
    p_sim = sim_ptr + b * N * N
    p_r = r_ptr + b * N
    p_res = res_ptr + b * N
    p_live = live_ptr + b * N
    p_chol = chol_ptr + b * k * N

    # The start: res = ||x̂||² (exactly 1 for a unit vector, whose S_ii is 1 up to rounding; 0
    # for a zero token, NaN for a non-finite one), and the first pick.
    best_v = tl.full([], float("-inf"), tl.float32)
    best_i = tl.zeros([], tl.int64)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        if GRAM:
            res = tl.load(p_sim + o_n * (N + 1), mask=m_n, other=0.0)
        else:
            res = _cosines(p_x, sx_n, sx_d, p_inv, 0, o_n, m_n, D, True, BLOCK_N, BLOCK_D)
        res = tl.where(res > 0.5, 1.0, res)
        live = m_n
        if HAS_MASK:
            live = live & (tl.load(cand_ptr + b * N + o_n, mask=m_n, other=0) != 0)
        r = tl.load(p_r + o_n, mask=m_n, other=0.0)
        tl.store(p_res + o_n, res, mask=m_n)
        tl.store(p_live + o_n, live.to(tl.int8), mask=m_n)
        best_v, best_i = _fold(_key(res, r * r, live, eps), n0, best_v, best_i)
    tl.debug_barrier()

    s = best_i
    took = best_v >= 0       # picked for its gain; else every candidate left is spent
    for t in range(0, k):
        tl.store(out_ptr + b * k + t, s)
        if t + 1 < k:
            # a pick taken for its gain has res > eps; a spent one's is not used (the clamp only
            # keeps the square root of a negative residual from being computed)
            denom = tl.sqrt_rn(tl.maximum(tl.load(p_res + s), eps))
            best_v = tl.full([], float("-inf"), tl.float32)
            best_i = tl.zeros([], tl.int64)
            for n0 in range(0, N, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                m_n = o_n < N
                live = (tl.load(p_live + o_n, mask=m_n, other=0) != 0) & (o_n != s)
                res = tl.load(p_res + o_n, mask=m_n, other=0.0)
                if took:
                    if GRAM:
                        sim = tl.load(p_sim + s * N + o_n, mask=m_n, other=0.0)
                    else:
                        sim = _cosines(p_x, sx_n, sx_d, p_inv, s, o_n, m_n, D, False, BLOCK_N,
                                       BLOCK_D)
                    done = tl.zeros([BLOCK_N], dtype=tl.float32)
                    for t0 in range(0, t, BLOCK_T):
                        o_t = t0 + tl.arange(0, BLOCK_T)
                        m_t = o_t < t
                        c_s = tl.load(p_chol + o_t * N + s, mask=m_t, other=0.0)
                        c_n = tl.load(p_chol + o_t[:, None] * N + o_n[None, :],
                                      mask=m_t[:, None] & m_n[None, :], other=0.0)
                        done += tl.sum(c_s[:, None] * c_n, axis=0)
                    e = tl.div_rn(sim - done, denom)
                    tl.store(p_chol + t * N + o_n, e, mask=m_n)
                    res = res - e * e
                    tl.store(p_res + o_n, res, mask=m_n)
                tl.store(p_live + o_n, live.to(tl.int8), mask=m_n)
                r = tl.load(p_r + o_n, mask=m_n, other=0.0)
                best_v, best_i = _fold(_key(res, r * r, live, eps), n0, best_v, best_i)
            tl.debug_barrier()
            s = best_i
            took = best_v >= 0


@on_device
def dpp_map(x: torch.Tensor, relevance: torch.Tensor, k: int,
            mask: Optional[torch.Tensor] = None, eps: float = 1e-4,
            path: str = "auto") -> torch.Tensor:
    """``int64[B, k]`` greedy DPP MAP in selection order; see
    :func:`visprune.methods.cdpruner.dpp_map_torch`.  ``path`` forces ``"gram"`` or ``"stream"``.
    """
    B, N, D = x.shape
    out = torch.empty(B, k, dtype=torch.long, device=x.device)
    if k == 0 or B == 0:
        return out
    _, inv = token_stats(x, norm="cosine")
    r = relevance.float().contiguous()
    cand = mask.to(torch.int8).contiguous() if mask is not None else None
    gram = path == "gram" or (path == "auto" and N <= GRAM_MAX_N)
    # One block of N up to 1024 tokens (the gram path's step reads a row of S and a
    # [BLOCK_T, BLOCK_N] tile of Cholesky rows); the stream path's blocks also hold an
    # x tile [BLOCK_N, BLOCK_D], so they stay at 128 tokens, with 8 warps.  Tiles of 4096
    # Cholesky entries: no register spills on sm_90 with Triton 3.6 or 3.9 (8192-entry tiles
    # spill with 3.6, 4 warps on the stream path with fp32 tokens).
    BLOCK_N = block(N, 16, 1024 if gram else 128)
    BLOCK_T = max(1, 4096 // BLOCK_N)
    BLOCK_D = block(D, 16, 64)
    num_warps = 8 if BLOCK_N >= 512 or not gram else 4
    chunk = max(1, GRAM_BUDGET_BYTES // (N * N * 4)) if gram else B
    for b0 in range(0, B, chunk):
        sl = slice(b0, min(B, b0 + chunk))
        xb = x[sl]
        nB = xb.shape[0]
        res = torch.empty(nB, N, dtype=torch.float32, device=x.device)
        live = torch.empty(nB, N, dtype=torch.int8, device=x.device)
        chol = torch.empty(nB, k, N, dtype=torch.float32, device=x.device)
        sim = res
        if gram:
            sim = torch.empty(nB, N, N, dtype=torch.float32, device=x.device)
            tile = 64 if N > 32 else 16
            # 64 x 64 tiles over 64-wide slices of D, 32-wide for fp32 (as greedy's tile pass)
            _cosine_gram_kernel[(nB, triton.cdiv(N, tile), triton.cdiv(N, tile))](
                xb, *xb.stride(), inv[sl], sim, N, D, INTERPRETED=interpreting(), BLOCK=tile,
                BLOCK_D=block(D, 16, 32 if x.dtype == torch.float32 else 64), num_warps=8)
        _dpp_map_kernel[(nB,)](
            xb, *xb.stride(), inv[sl], sim, r[sl], cand[sl] if cand is not None else live, res,
            live, chol, out[sl], N, D, k, float(eps), GRAM=gram, HAS_MASK=cand is not None,
            BLOCK_N=BLOCK_N, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return out
