"""CDPruner (NeurIPS 2025, github Theia-4869/CDPruner): instruction-conditioned diverse tokens by
the MAP inference of a conditional determinantal point process (DPP).

The original (``encode_images`` in ``llava/model/llava_arch.py``) builds, for the projector
outputs ``x[B, N, D]`` and a relevance ``r[B, N]`` of each token to the prompt, the kernel

    ``L_ij = r_i · cos(x_i, x_j) · r_j``

and picks ``keep`` tokens greedily by the fast MAP inference of Chen et al. (NeurIPS 2018):
incremental Cholesky rows ``cis`` and marginal gains ``di2s``,

    ``j = argmax_i di2s_i``,  ``e_i = (L_ji - Σ_t cis_tj · cis_ti) / sqrt(di2s_j)``,
    ``cis_t = e``,  ``di2s_i -= e_i²``,  ``di2s_j = -inf``.

The relevance is ``mean_m -cos(image_embeds_i, text_embeds_m)`` (CLIP's projected patch and text
embeddings), min-max normalised ``(r - min + 1e-6) / (max - min)``.  The kept indices are sorted
ascending (original order).

Since ``L = R S R`` (``S`` the cosine matrix, ``R = diag(r)``), the Cholesky rows of ``L`` are
those of ``S`` scaled by ``r``: ``di2s_i = r_i² · res_i`` with ``res_i`` the squared distance of
``x̂_i`` to the span of the selected unit vectors (``1`` at the start, never below 0 in exact
arithmetic).  :func:`dpp_map` runs the recurrence on ``S`` and ranks by ``r_i² · res_i``: the
same choices as the original in exact arithmetic, and a scale-free test of when a token adds
nothing.  Once the selection spans a token (``res_i <= eps``), the original's ``di2s_i`` is
rounding noise (negative values give NaN through the square root, NaN spreads to every gain and
the argmax then repeats already kept tokens, so it may keep fewer than ``keep``).  Here such a
token is *spent*: it ranks after every token that still adds something, spent tokens are taken in
index order, and a spent pick leaves the state unchanged.  ``eps = 1e-4`` (the unit vector lies
within 0.57° of the span) sits far above float32 rounding of ``res`` (≈1e-6 after hundreds of
steps) and below the residuals of real image tokens, so every backend agrees on it.

Other departures from the original, all where it degenerates or for batching:

* ``relevance_scope="image"`` (default) normalises the relevance per image; the original's
  min and max run over the whole batch it is called with (``"batch"`` reproduces it);
* every relevance in the scope equal (one token; the original divides by zero): ``r = 1``;
  NaN relevances take no part in the min and max;
* a zero token has cosine 0 with everything (``F.normalize``; the original's ``x / ||x||`` is
  NaN) and is spent from the start;
* the residuals start at exactly 1 (the original's ``S_ii`` is 1 up to rounding, which would
  break exact relevance ties by noise); fp16/bf16 features are normalised in float32 (the
  original normalises in the model's dtype, then casts);
* optional ``text_mask`` (prompts of different lengths in one batch) and ``mask`` (candidates).

Three implementations of :func:`dpp_map`: :func:`dpp_map_torch` (plain PyTorch, one Python step
per pick, vectorised over the batch: the reference), a Triton kernel
(:mod:`visprune.triton_kernels.dpp`, one program per batch row) and a C++ CPU kernel
(``torch.ops.visprune.dpp_map``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import checks, ops
from ..backends import checked_name
from ..common import EPS, PruneResult

__all__ = ["cdpruner", "dpp_map", "dpp_map_torch", "cdpruner_relevance", "DPP_EPS",
           "RELEVANCE_EPS"]

DPP_EPS = 1e-4          # a token whose res_i = dist²(x̂_i, span of the kept x̂) <= DPP_EPS is spent
RELEVANCE_EPS = 1e-6    # the original's ``(r - min + 1e-6) / (max - min)``


# --------------------------------------------------------------------------- DPP MAP inference
def _unit(diag: torch.Tensor) -> torch.Tensor:
    """The starting residuals ``res_i = ||x̂_i||²`` from the computed ``S_ii``: exactly 1 for a
    unit vector (``S_ii`` is 1 up to rounding, which would otherwise break exact relevance ties by
    noise), else ``S_ii`` (0 for a zero token, NaN for a non-finite one).  Every backend applies
    this rule."""
    return torch.where(diag > 0.5, 1.0, diag)


def dpp_map_torch(x: torch.Tensor, relevance: torch.Tensor, k: int,
                  mask: Optional[torch.Tensor] = None, eps: float = DPP_EPS) -> torch.Tensor:
    """``int64[B, k]``: the greedy MAP of the DPP ``L = R S R`` in selection order (plain PyTorch).

    ``S_ij = cos(x_i, x_j)`` (``F.normalize``, so a zero token has cosine 0 with everything),
    ``R = diag(relevance)``; only the True tokens of ``mask`` are candidates.  Each step takes
    the candidate with the largest gain ``r_i² · res_i`` among those with ``res_i > eps`` (ties →
    lowest index), else the lowest-index candidate (every one is spent), and updates the Cholesky
    rows as the original does.  Arithmetic in float32; the Gram matrix and the Cholesky dot
    products are formed in float64 and rounded, so that bitwise-identical tokens keep
    bitwise-identical gains (exact ties go to the lowest index, whatever the tokens' positions).
    """
    B, N, _ = x.shape
    out = torch.empty(B, k, dtype=torch.long, device=x.device)
    if k == 0 or B == 0:
        return out
    y = F.normalize(x.float().contiguous(), dim=-1, eps=EPS).double()
    sim = (y @ y.transpose(1, 2)).float()                                # [B, N, N]
    r2 = relevance.float() * relevance.float()
    live = torch.ones(B, N, dtype=torch.bool, device=x.device) if mask is None else mask.clone()
    res = _unit(sim.diagonal(dim1=1, dim2=2))
    cis = torch.zeros(k, B, N, dtype=torch.float64, device=x.device)
    rows = torch.arange(B, device=x.device)
    for t in range(k):
        gain = r2 * res
        key = torch.where((res > eps) & (gain == gain), gain, -1.0)      # spent (or NaN): -1
        s = torch.where(live, key, -math.inf).argmax(-1)
        out[:, t] = s
        live[rows, s] = False
        if t + 1 == k:
            break
        took = key[rows, s] >= 0              # a spent pick changes nothing (e = 0)
        done = torch.einsum("tb,tbn->bn", cis[:t, rows, s], cis[:t]).float()
        e = (sim[rows, s] - done) / res[rows, s].sqrt()[:, None]
        e = torch.where(took[:, None], e, 0.0)
        cis[t] = e.double()
        res = res - e * e
    return out


def dpp_map(x: torch.Tensor, relevance: torch.Tensor, k: int, *,
            mask: Optional[torch.Tensor] = None, eps: float = DPP_EPS,
            backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """Greedy MAP inference of the conditional DPP ``L_ij = r_i · cos(x_i, x_j) · r_j``:
    ``int64[B, k]`` indices in selection order.

    Args:
        x: ``[B, N, D]`` the tokens whose cosine similarity is the DPP's ``S`` (any scale).
        relevance: ``[B, N]`` the DPP's quality ``r`` (floating; only ``r²`` matters).
        k: how many to select, ``0 <= k <=`` candidates per row.
        mask: optional ``bool[B, N]``: only True tokens are candidates.
        eps: a token with ``res_i = dist²(x̂_i, span of the selected x̂) <= eps`` is spent (see
            the module docstring); ``>= 0``.
        backend: ``None`` (the C++ kernel on CPU tensors, Triton on CUDA), ``"reference"``
            (:func:`dpp_map_torch`), ``"triton"`` or ``"cpu"``; there is no ``"cuda"`` kernel.
        validate: check that every row holds ``k`` candidates (one host sync).
    """
    checks.tensor("x", x, 3, "[B, N, D]")
    name = _backend(backend, x.device)
    _relevance_arg(relevance, x)
    k, mask = _dpp_args(x, k, mask, eps)
    if _checking(validate, name):
        checks.candidates(mask, k, -1)
    return _dpp_map(name, x, relevance, k, mask, float(eps))


def _dpp_args(x, k, mask, eps, xname="x", kname="k"):
    """Structural checks of :func:`dpp_map` but the relevance; returns ``(k, mask)``."""
    B, N, _ = x.shape
    mask = checks.bool_mask("mask", mask, xname, x, (B, N), "[B, N]")
    k = checks.count(kname, k)
    if k > N:
        raise ValueError(f"{kname}={k} is larger than the number of candidate tokens (N={N})")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return k, mask


def _relevance_arg(relevance, x, xname="x"):
    checks.tensor("relevance", relevance, 2, "[B, N]")
    if tuple(relevance.shape) != tuple(x.shape[:2]):
        raise ValueError(f"relevance must have shape [B, N] = {tuple(x.shape[:2])} to match "
                         f"{xname}, got {tuple(relevance.shape)}")
    checks.same_device(xname, x, "relevance", relevance)


def _dpp_map(name, x, relevance, k, mask, eps):
    if name == "reference":
        return dpp_map_torch(x, relevance, k, mask, eps)
    if name == "triton":
        from visprune.triton_kernels import dpp_map as kernel
    else:
        from visprune._ext import dpp_map as kernel
    return kernel(x, relevance, k, mask, eps)


# --------------------------------------------------------------------------- relevance
def cdpruner_relevance(raw: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       scope: str = "image") -> torch.Tensor:
    """``float32[B, N]``: the original's min-max normalisation ``(r - min + 1e-6) / (max - min)``
    of a raw relevance (higher = more relevant), min and max over each image's candidates
    (``scope="image"``) or over every candidate of the batch (``"batch"``, the original).

    Where the original divides by zero (every relevance in the scope equal, e.g. one token) the
    relevance is 1 everywhere (the DPP depends on ``r`` only up to scale); NaN values take no part
    in the min and max and stay NaN (their tokens then rank last).  Non-candidates get 0.
    """
    raw = raw.float()
    if raw.numel() == 0:
        return raw
    valid = ~torch.isnan(raw)
    if mask is not None:
        valid = valid & mask
    dims = (0, 1) if scope == "batch" else (1,)
    lo = torch.where(valid, raw, math.inf).amin(dim=dims, keepdim=True)
    hi = torch.where(valid, raw, -math.inf).amax(dim=dims, keepdim=True)
    span = hi - lo
    r = torch.where(span > 0, (raw - lo + RELEVANCE_EPS) / span, 1.0)
    r = torch.where(torch.isnan(raw), raw, r)
    return r if mask is None else r.masked_fill(~mask, 0.0)


def _embedding_args(image_embeds, text_embeds, text_mask, features):
    """Structural checks of the relevance embeddings; returns ``(image_embeds, text_embeds
    [B, M, E], text_mask, value check of text_mask or None)``."""
    B, N, _ = features.shape
    checks.tensor("image_embeds", image_embeds, 3, "[B, N, E]")
    checks.matching("image_embeds", image_embeds, "features", features, "[B, N, E]", 2)
    E = image_embeds.shape[2]
    if isinstance(text_embeds, torch.Tensor) and text_embeds.dim() == 2:
        text_embeds = text_embeds.expand(B, *text_embeds.shape)   # the original's: one prompt
    checks.tensor("text_embeds", text_embeds, 3, "[B, M, E] or [M, E]")
    M = text_embeds.shape[1]
    if text_embeds.shape[0] != B or text_embeds.shape[2] != E or M == 0:
        raise ValueError(f"text_embeds must have shape [B, M, E] = [{B}, M >= 1, {E}] or "
                         f"[M >= 1, {E}] to match image_embeds, got {tuple(text_embeds.shape)}")
    checks.same_device("image_embeds", image_embeds, "text_embeds", text_embeds)
    text_mask = checks.bool_mask("text_mask", text_mask, "text_embeds", text_embeds, (B, M),
                                 "[B, M]")
    if text_embeds.dtype != image_embeds.dtype:   # the original's: fp32 and the text tower's
        image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    if text_mask is None or B == 0:
        return image_embeds, text_embeds, text_mask, None

    def message():
        empty = (~text_mask.any(-1)).nonzero().flatten().tolist()
        return f"text_mask has no True entry in row(s) {empty}: every row needs a text row"
    return image_embeds, text_embeds, text_mask, ((~text_mask.any(-1)).any(), message)


def _backend(backend, device):
    name = checked_name(backend, device)
    if name == "cuda":
        raise NotImplementedError("dpp_map has no kernel in the CUDA extension (visprune._C); "
                                  "use backend='triton' (the default for CUDA tensors) or "
                                  "'reference'")
    return name


def _checking(validate, name):
    """Whether to run the value checks (as :mod:`visprune.ops`: not while torch.compile traces
    an opaque op)."""
    checks.flag("validate", validate)
    return validate and not (name != "reference" and torch.compiler.is_compiling())


# --------------------------------------------------------------------------- the method
def cdpruner(features: torch.Tensor, keep: int, *, image_embeds: Optional[torch.Tensor] = None,
             text_embeds: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None,
             relevance: Optional[torch.Tensor] = None, relevance_scope: str = "image",
             mask: Optional[torch.Tensor] = None, eps: float = DPP_EPS,
             backend: Optional[str] = None, validate: bool = True) -> PruneResult:
    """CDPruner: ``PruneResult(tokens[B, keep, D], indices[B, keep] ascending, lengths = keep)``.

    Args:
        features: ``[B, N, D]`` the projector outputs: the DPP's similarity features and the
            tokens returned.
        keep: tokens kept per image (``<=`` candidates).
        image_embeds: ``[B, N, E]`` CLIP's projected patch embeddings
            (``visual_projection(post_layernorm(h))`` of the selected layer's patches).
        text_embeds: ``[B, M, E]``, or ``[M, E]`` shared by the batch as in the original: CLIP's
            projected text embeddings of the prompt (one per 77-token segment).
        text_mask: optional ``bool[B, M]``, True = a real text row (each row needs one).
        relevance: ``[B, N]`` a raw relevance instead of the embeddings (higher = more relevant);
            it is normalised as the embedding relevance is.  Give exactly one of ``relevance`` or
            ``image_embeds`` with ``text_embeds``.
        relevance_scope: min-max normalisation per image (``"image"``, default: a row's choice
            depends on that row only) or over the whole batch (``"batch"``: the original, which
            normalises over every image it is called with, e.g. LLaVA-NeXT's crops of one image).
        mask: optional ``bool[B, N]``: only True tokens are candidates (and count in the
            normalisation).
        eps: the spent threshold of :func:`dpp_map`.
        backend: the DPP kernel (:func:`dpp_map`), the relevance (:func:`visprune.ops.mi_scores`)
            and the gather run on it.
        validate: run the value checks (candidates per row, text rows); see :mod:`visprune.ops`.
    """
    checks.tensor("features", features, 3, "[B, N, D]")
    name = _backend(backend, features.device)
    checks.choice("relevance_scope", relevance_scope, ("image", "batch"))
    B, N, _ = features.shape
    embeds = image_embeds is not None or text_embeds is not None or text_mask is not None
    both = image_embeds is not None and text_embeds is not None
    if (relevance is not None) == embeds or (embeds and not both):
        raise ValueError("cdpruner needs exactly one of relevance [B, N], or image_embeds "
                         "[B, N, E] with text_embeds [B, M, E] (and an optional text_mask)")
    text_check = None
    if relevance is not None:
        _relevance_arg(relevance, features, "features")
    else:
        image_embeds, text_embeds, text_mask, text_check = _embedding_args(
            image_embeds, text_embeds, text_mask, features)
    keep, mask = _dpp_args(features, keep, mask, eps, "features", "keep")
    if _checking(validate, name):
        checks.candidates(mask, keep, -1, what=f"keep={keep}",
                          extra=[text_check] if text_check is not None else [])

    if relevance is None:
        relevance = -ops.mi_scores(image_embeds, text_embeds, text_mask=text_mask,
                                   metric="cosine", backend=name, validate=False)
    r = cdpruner_relevance(relevance, mask, relevance_scope)
    chosen = _dpp_map(name, features, r, keep, mask, float(eps))
    tokens, indices = ops.gather_compact(features, chosen, sort=True, backend=name,
                                         validate=False)   # the DPP's indices are valid
    lengths = torch.full((B,), keep, dtype=torch.long, device=features.device)
    return PruneResult(tokens, indices, lengths)
