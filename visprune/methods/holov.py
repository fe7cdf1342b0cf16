"""HoloV (NeurIPS 2025, arXiv 2510.02912): a token budget spread over spatial crops.

Each contiguous raster crop gets a share of the budget proportional to a holistic score
(attention plus the spread of its tokens' similarities); within a crop the most attended tokens
are kept.  The per-crop similarity statistics are a Triton kernel
(:mod:`visprune.triton_kernels.holov`), a C++ CPU kernel (``torch.ops.visprune.holov_variance``:
each pair's product once, over the triangle) or the plain-PyTorch :func:`similarity_variance`; the
allocation is vectorised over crops; the final gather is :func:`visprune.ops.gather_compact`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import checks, ops
from ..common import HOLOV_EPS, PruneResult, descending_order, true_fp32
from ..backends import checked_name

__all__ = ["holov", "crop_layout", "similarity_variance", "crop_scores", "allocate"]



def crop_layout(n: int, num_crops: int, device=None) -> Tuple[torch.Tensor, ...]:
    """Contiguous raster crops: size ``n // C``, the first ``n % C`` crops one larger
    (``torch.tensor_split``'s rule).  Returns int64 ``start[C]`` and ``size[C]``, and the padded
    layout ``pos[C, Mmax]`` (crop ``c``'s token positions; 0 past its size) with ``valid[C, Mmax]``.
    """
    base, rem = divmod(n, num_crops)
    c = torch.arange(num_crops, device=device)
    start, size = c * base + c.clamp(max=rem), base + (c < rem).long()
    slot = torch.arange(base + (rem > 0), device=device)
    valid = slot < size[:, None]
    return start, size, torch.where(valid, start[:, None] + slot, 0), valid


def similarity_variance(features: torch.Tensor, num_crops: int) -> torch.Tensor:
    """``float32[B, N]``: ``V_i = Σ_j (S_ij - μ_i)² / (M-1)``, ``μ_i = Σ_j S_ij / (M-1)``, with
    ``S = F Fᵀ`` (diagonal zeroed) over the ``M`` tokens of ``i``'s crop, ``F = x/(||x||+1e-6)``.

    Plain PyTorch, batched over images and crops: the block diagonal of ``S`` only.  The crops
    of one size are contiguous, so each size is a view ``[B, C', M, D]`` of the tokens (no copy
    of the features: at B = 8, D = 4096 a copy is 75 MB of fresh pages per call), and ``S`` is
    the raw products scaled by the norms, ``x_i·x_j / ((|x_i|+ε)(|x_j|+ε))``, instead of products
    of normalised copies.
    """
    B, N, D = features.shape
    base, rem = divmod(N, num_crops)
    x = features.float()
    parts = []
    # the first `rem` crops hold base + 1 tokens, the others base (crop_layout's rule)
    for first, count, m in ((0, rem, base + 1), (rem * (base + 1), num_crops - rem, base)):
        if count == 0 or m == 0:
            continue
        xs = x[:, first:first + count * m].reshape(B, count, m, D)     # a view when x is contiguous
        norm = xs.norm(dim=-1) + HOLOV_EPS                               # [B, C', M]
        with true_fp32():
            s = xs @ xs.transpose(-1, -2)                                # [B, C', M, M]
        s = s / norm[..., :, None] / norm[..., None, :]
        s = s.masked_fill(torch.eye(m, dtype=torch.bool, device=s.device), 0.0)
        m1 = max(m - 1, 1)
        mu = s.sum(-1) / m1
        parts.append(((s - mu[..., None]).square().sum(-1) / m1).reshape(B, count * m))
    if not parts:
        return torch.zeros(B, N, device=features.device)
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def crop_scores(variance: torch.Tensor, attn: torch.Tensor, num_crops: int,
                alpha: float) -> torch.Tensor:
    """``float32[B, C]``: ``mean_i(A_i + alpha·γ·V_i)`` per crop, ``A = 1000·attn``,
    ``γ = mean|A| / (mean|V| + 1e-6)``; a one-token crop scores its attention, an empty one 0."""
    _, size, pos, valid = crop_layout(attn.shape[1], num_crops, attn.device)
    a = attn.float()[:, pos].masked_fill(~valid, 0.0)                     # [B, C, Mmax]
    v = variance[:, pos].masked_fill(~valid, 0.0)
    m = size.clamp(min=1)
    big_a = 1000.0 * a
    gamma = (big_a.abs().sum(-1) / m) / (v.abs().sum(-1) / m + HOLOV_EPS)
    score = (big_a + alpha * gamma[..., None] * v).masked_fill(~valid, 0.0).sum(-1) / m
    return torch.where(size > 1, score, a.sum(-1))


def _share(scores: torch.Tensor, budget: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """HoloV's rule, ``int64[B, C]``: ``w = score / (Σ score + 1e-6)`` over the eligible crops,
    ``floor(w · budget)`` each, the remaining tokens +1 to the crops with the largest ``w``
    (ties → lowest crop).  Where the original would crash (more remaining tokens than crops:
    all-zero scores) the +1s go round again."""
    C = scores.shape[1]
    w = torch.where(eligible, scores, 0.0)
    w = w / (w.sum(-1, keepdim=True) + HOLOV_EPS)
    q = torch.floor(w * budget[:, None]).clamp(min=0).long()
    rest = (budget - q.sum(-1)).clamp(min=0)
    order = torch.where(eligible, w, -torch.inf).sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(C, device=order.device).expand_as(order))
    n = eligible.sum(-1).clamp(min=1)
    extra = (rest // n)[:, None] + (rank < (rest % n)[:, None]).long()
    return q + torch.where(eligible, extra, 0)


def allocate(scores: torch.Tensor, size: torch.Tensor, keep: int,
             redistribute: bool = True) -> torch.Tensor:
    """``int64[B, C]`` tokens taken per crop (``<= size``), in float64 on the scores' device.

    ``redistribute=False``: one round of :func:`_share` over all crops, each crop then takes
    ``min(q, M)`` (the original; what a full crop cannot use is lost, and zero-padded later).
    ``redistribute=True``: the overflow of full crops is shared again among the crops that are
    not full, by the same rule, until none overflows (at most ``C`` rounds: each one fills a
    crop for good; a round without overflow changes nothing).

    A crop score that is NaN (a NaN in ``attn``) counts as 0 and ``+inf`` as the largest float32,
    so every image still gets exactly ``keep`` tokens where the crops hold them.
    """
    lim = torch.finfo(torch.float32).max
    scores = torch.nan_to_num(scores.detach().double(), nan=0.0, posinf=lim, neginf=0.0)
    size = size.to(scores.device)
    B, C = scores.shape
    all_crops = torch.ones(B, C, dtype=torch.bool, device=scores.device)
    q = _share(scores, torch.full((B,), keep, dtype=torch.long, device=scores.device), all_crops)
    on_host = scores.device.type == "cpu"
    for _ in range(C if redistribute else 0):
        overflow = (q - size).clamp(min=0).sum(-1)
        # The early exit reads the device; it is taken only where that costs no sync.
        if on_host and not bool((overflow > 0).any()):
            break
        q = torch.minimum(q, size)
        q = q + _share(scores, overflow, q < size)
    return torch.minimum(q, size)


def _kept_positions(attn: torch.Tensor, num_crops: int, take: torch.Tensor,
                    keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(index[B, keep], fill[B, keep])``.  ``index``: crop by crop, all of a crop's tokens in
    raster order if it takes them all, else its ``take`` most attended (descending, ties →
    lowest index); -1 past the kept count.  ``fill``: ``index`` with the -1 slots pointing at
    distinct unkept tokens, so that one gather serves every row."""
    start, size, pos, valid = crop_layout(attn.shape[1], num_crops, attn.device)
    slot = torch.arange(pos.shape[1], device=attn.device)
    by_attn = descending_order(attn[:, pos], valid)
    slots = torch.where((take == size)[:, :, None], slot, by_attn)        # [B, C, Mmax]
    chosen = slot < take[:, :, None]
    rank = torch.where(chosen, 0, torch.where(valid, 1, 2)).flatten(1)    # kept, unkept, padding
    perm = rank.sort(dim=-1, stable=True).indices[:, :keep]
    fill = (start[:, None] + slots).flatten(1).gather(1, perm)
    count = chosen.sum((1, 2)).clamp(max=keep)
    index = torch.where(torch.arange(keep, device=attn.device) < count[:, None], fill, -1)
    return index, fill


def holov(features: torch.Tensor, attn: torch.Tensor, keep: int, *, num_crops: int = 16,
          alpha: float = 0.09, redistribute: bool = True,
          backend: Optional[str] = None) -> PruneResult:
    """HoloV: ``PruneResult(tokens[B, keep, D], indices[B, keep], lengths[B] = keep)``.

    Args:
        features: ``[B, N, D]`` the visual tokens to prune.
        attn: ``[B, N]`` the vision encoder's CLS→patch attention (nonnegative).
        keep: tokens kept per image, ``<= N``.
        num_crops: contiguous raster crops the budget is spread over (more than ``N`` select
            as ``N`` crops of one token: the extra crops are empty).
        alpha: weight of the similarity-variance term.
        redistribute: ``True`` (default) gives a full crop's unused budget to the other crops;
            ``False`` reproduces the original, which zero-pads the output to ``keep`` tokens.
        backend: ``"triton"`` runs the similarity statistics as a Triton kernel, ``"cpu"`` (the
            default for CPU tensors when ``visprune._C`` is built) as a C++ kernel, any other
            backend in plain PyTorch; every backend is passed to
            :func:`visprune.ops.gather_compact`.

    Output order is the original's: crop by crop; within a crop that keeps all its tokens, raster
    order, else descending attention.  Zero-padded rows (only with ``redistribute=False``) have
    index -1 and count in ``lengths``: the original feeds those zero tokens to the model.
    """
    checks.tensor("features", features, 3, "[B, N, D]")
    checks.tensor("attn", attn, 2, "[B, N]")
    checks.matching("attn", attn, "features", features, "[B, N]", 2)
    B, N, _ = features.shape
    keep = checks.count("keep", keep)
    if keep > N:
        raise ValueError(f"keep={keep} is larger than the number of tokens N={N}")
    num_crops = checks.count("num_crops", num_crops)
    if num_crops == 0:
        raise ValueError("num_crops must be >= 1, got 0")
    # More crops than tokens: the first N crops hold one token each and the rest none, which
    # neither score nor take any budget; N crops give the same selection without the empty ones'
    # memory (num_crops is unbounded otherwise: 10**9 crops would be gigabytes of crop scores).
    num_crops = min(num_crops, max(N, 1))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    checks.flag("redistribute", redistribute)

    name = checked_name(backend, features.device)
    if name == "triton":
        from visprune.triton_kernels import holov as _kernels
        variance = _kernels.similarity_variance(features, num_crops)
    elif name == "cpu":
        from visprune._ext import holov_variance
        variance = holov_variance(features, num_crops)
    else:
        variance = similarity_variance(features, num_crops)
    scores = crop_scores(variance, attn, num_crops, float(alpha))
    size = crop_layout(N, num_crops, features.device)[1]
    take = allocate(scores, size, keep, redistribute)
    index, fill = _kept_positions(attn, num_crops, take, keep)
    # fill is distinct and in range by construction: no value check (and no sync) needed
    tokens, _ = ops.gather_compact(features, fill, sort=False, backend=backend, validate=False)
    tokens = tokens.masked_fill((index < 0)[..., None], 0)
    lengths = torch.full((B,), keep, dtype=torch.long, device=features.device)
    return PruneResult(tokens, index, lengths)
