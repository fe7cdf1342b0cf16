"""PruMerge / PruMerge+ (arXiv 2403.15388): adaptive selection by CLS attention, then merging.

The original (``token_prune_merge_advanced[_plus]`` in LLaVA-PruMerge) is batch-size-1 and merges
in a Python double loop.  Here every step is batched; the merge step is one Triton kernel
(:mod:`visprune.triton_kernels.prumerge`) or the plain-PyTorch :func:`merge_reference`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import checks
from ..common import EPS, NAN_COSINE, PruneResult, descending_order, true_fp32
from ._common import use_triton

__all__ = ["prumerge", "prumerge_cls_attention", "outlier_ratio", "raster_step", "merge_reference"]

NEIGHBOURS = 32          # the original's cluster size: each kept token absorbs its 32 nearest keys


def prumerge_cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``float32[B, N]``: row 0 of ``softmax(q kᵀ · C^-0.5)``, columns 1..N.

    ``q``, ``k``: ``[B, N+1, C]``, the raw ``q_proj`` / ``k_proj`` outputs of CLIP's last layer
    (CLS first) taken as one C-wide head, as the original does.  Only the CLS row is computed.
    """
    checks.cls_qk(q, k)
    if q.shape[1] < 2:
        raise ValueError(f"q and k need the CLS token and at least one patch (N+1 >= 2), "
                         f"got N+1={q.shape[1]}")
    scale = q.shape[-1] ** -0.5
    with true_fp32():
        logits = (q[:, :1].float() @ k.float().transpose(1, 2)) * scale        # [B, 1, N+1]
    return logits.softmax(-1)[:, 0, 1:]


def outlier_ratio(cls_attn: torch.Tensor, iqr_scope: str = "image") -> torch.Tensor:
    """``float64[B]``: the fraction of IQR outliers, ``#{a > Q3 + 1.5·IQR} / count``.

    Percentiles are numpy's default (linear interpolation) computed in float32 like the
    original's ``np.percentile`` on a float32 array, so the outlier count is bit-identical.
    ``"image"``: per row; ``"batch"``: pooled over the whole batch (the original's behaviour).
    """
    a = cls_attn.float()
    groups = a.reshape(1, -1) if iqr_scope == "batch" else a
    probs = torch.tensor([0.25, 0.75], dtype=torch.float32, device=a.device)
    q1, q3 = torch.quantile(groups, probs, dim=-1)
    upper = q3 + 1.5 * (q3 - q1)
    count = (groups > upper[:, None]).sum(-1)
    return (count.double() / groups.shape[-1]).expand(a.shape[0])


def raster_step(ratio: torch.Tensor, n: int) -> torch.Tensor:
    """``int64[B]``: PruMerge+'s sampling stride ``int(int(1/ratio)/3)``, at least 1.

    The original crashes on a stride of 0 (``ratio > 1/3``, which the IQR rule never produces:
    at most a quarter of the values lie above Q3) and on ``ratio == 0`` (``1/0``).  For 0 we take
    the limit ``ratio → 0⁺``: an unbounded stride, i.e. the single raster sample 0.
    """
    step = torch.floor(torch.floor(1.0 / ratio) / 3)
    step = torch.where(ratio > 0, step, torch.full_like(ratio, float(n)))
    return step.clamp(1, max(n, 1)).long()          # any stride >= n samples only position 0


def _kept_index(a: torch.Tensor, ratio: torch.Tensor,
                plus: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index[B, N], lengths[B], selected[B, N])``: per row the top-n tokens by CLS attention
    (descending, ties → lowest index), then for PruMerge+ the raster samples not already kept
    (ascending); ``index`` is -1 past ``lengths``, ``selected`` marks the kept positions."""
    B, N = a.shape
    slot = torch.arange(N, device=a.device)
    n_top = torch.floor(N * ratio).long().clamp(min=1)                  # at least one token
    order = descending_order(a)
    top = slot < n_top[:, None]
    selected = torch.zeros_like(top).scatter_(1, order, top)
    index = torch.where(top, order, -1)
    if not plus:
        return index, n_top, selected
    step = raster_step(ratio, N)
    raster = (slot % step[:, None] == 0) & (slot < N - 1) & ~selected   # range(0, N-1, step)
    # the raster samples first, ascending
    raster_pos = (~raster).to(torch.uint8).sort(dim=-1, stable=True).indices
    lengths = n_top + raster.sum(-1)
    added = raster_pos.gather(1, (slot - n_top[:, None]).clamp(min=0))
    index = torch.where(top, order, torch.where(slot < lengths[:, None], added, -1))
    return index, lengths, selected | raster


def merge_reference(keys: torch.Tensor, features: torch.Tensor, attn: torch.Tensor,
                    index: torch.Tensor, out: torch.Tensor) -> None:
    """Plain-PyTorch merge step, written into ``out[B, L, D]``.

    For each kept token ``i = index[b, l]`` (-1: padding, written as zeros): its ``NEIGHBOURS``
    nearest other tokens ``j`` by cosine of the keys (ties → lowest index), and
    ``out = x_i + Σ_j attn_j · x_j`` (the original's unnormalised weights).
    """
    B, L = index.shape
    N = keys.shape[1]
    valid = index >= 0
    safe = index.clamp(min=0)
    kn = F.normalize(keys.float(), dim=-1, eps=EPS)
    with true_fp32():
        cos = kn.gather(1, safe[..., None].expand(-1, -1, kn.shape[-1])) @ kn.transpose(1, 2)
    cos = torch.where(cos.isnan(), NAN_COSINE, cos).scatter_(2, safe[..., None], -math.inf)
    nbr = cos.sort(dim=-1, descending=True, stable=True).indices[..., :min(NEIGHBOURS, N - 1)]
    weights = torch.zeros(B, L, N, device=keys.device)
    weights.scatter_(2, nbr, attn.float().gather(1, nbr.flatten(1)).view_as(nbr))
    weights.scatter_(2, safe[..., None], 1.0)                    # the kept token itself
    weights *= valid[..., None]
    with true_fp32():
        out.copy_(weights @ features.float())


def prumerge(features: torch.Tensor, cls_attn: torch.Tensor, keys: torch.Tensor, *,
             plus: bool = False, iqr_scope: str = "image",
             backend: Optional[str] = None) -> PruneResult:
    """PruMerge (``plus=False``) or PruMerge+ (``plus=True``): ``PruneResult`` of adaptive length.

    Args:
        features: ``[B, N, D]`` the visual tokens to prune (CLIP's ``select_layer`` hidden
            states, before the projector, in LLaVA).
        cls_attn: ``[B, N]`` CLS→patch attention of CLIP's last layer
            (:func:`prumerge_cls_attention`).
        keys: ``[B, N, Dk]`` that layer's ``k_proj`` outputs of the patches (CLS removed).
        plus: add PruMerge+'s spatially uniform raster samples.
        iqr_scope: ``"image"`` (default) computes the IQR outlier ratio per image; ``"batch"``
            pools it over the batch like the original.
        backend: ``"triton"`` runs the merge step as one Triton kernel; any other backend
            (``None`` = the default for the device) the plain-PyTorch merge.

    Returns ``PruneResult(tokens[B, L+1, D], indices[B, L+1], lengths[B])``.  Row ``b`` holds its
    kept tokens in top-k order (descending ``cls_attn``, ties → lowest index), then (PruMerge+)
    the added raster samples ascending, each merged with its 32 nearest keys' tokens; then one
    extra token ``Σ_{j not kept} cls_attn_j · x_j`` (index -1); then zero padding (index -1).
    ``lengths[b]`` counts the kept tokens plus the extra one.
    """
    checks.tensor("features", features, 3, "[B, N, D]")
    checks.tensor("cls_attn", cls_attn, 2, "[B, N]")
    checks.tensor("keys", keys, 3, "[B, N, Dk]")
    checks.matching("cls_attn", cls_attn, "features", features, "[B, N]", 2)
    checks.matching("keys", keys, "features", features, "[B, N, Dk]", 2)
    checks.choice("iqr_scope", iqr_scope, ("image", "batch"))
    checks.flag("plus", plus)
    B, N, D = features.shape
    if N == 0:
        raise ValueError("features must have at least one token (N >= 1), got N=0")
    triton = use_triton(backend, features.device)
    if B == 0:
        empty = torch.empty(0, 1, dtype=torch.long, device=features.device)
        return PruneResult(features.new_zeros(0, 1, D), empty, empty[:, 0])

    a = cls_attn.float()
    index, lengths, selected = _kept_index(a, outlier_ratio(a, iqr_scope), plus)
    L = int(lengths.max())                   # the output's shape depends on the data: one sync
    index = index[:, :L].contiguous()

    tokens = features.new_zeros(B, L + 1, D)
    if triton:
        from visprune.triton_kernels import prumerge as _kernels
        _kernels.merge(keys, features, a, index, tokens[:, :L], neighbours=NEIGHBOURS)
    else:
        merge_reference(keys, features, a, index, tokens[:, :L])
    with true_fp32():
        extra = (a * ~selected)[:, None, :] @ features.float()          # [B, 1, D]
    tokens.scatter_(1, lengths.view(B, 1, 1).expand(B, 1, D), extra.to(tokens.dtype))
    return PruneResult(tokens, F.pad(index, (0, 1), value=-1), lengths + 1)
